"""Fine-tune SAM: ``python train.py -c configs/coco_box_finetune.yaml [-o key=value ...]``.

Also ``torchrun --nproc_per_node N train.py ...``. The loop lives in :mod:`samkit.training.train`.
"""

import sys

from samkit.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
