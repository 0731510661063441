"""Evaluate box-prompt mIoU: ``python eval.py -c configs/coco_box_finetune.yaml -o model.checkpoint=PATH``.

Also ``torchrun --nproc_per_node N eval.py ...``. The code lives in :mod:`samkit.training.evaluate`.
"""

import sys

from samkit.commands.eval import main

if __name__ == "__main__":
    sys.exit(main())
