"""Box-prompt inference on one image (the seed's ``box_inference.py``): a mask per box, saved as a
picture and a ``.npz``.

    python box_inference.py --image-path photo.jpg --box 425,600,700,875 --checkpoint sam_vit_b_01ec64.pth
    python box_inference.py --image-path photo.jpg --box 10,20,200,300 --box 220,40,400,380 --download \
        --amp_level O2 --device cuda

See ``--help`` for every flag; the work is done by :mod:`samkit.commands.box`.
"""

import sys
from pathlib import Path


def main() -> int:
    # Run from a clone without installing: the repository's samkit comes first on the path.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from samkit.commands.box import main as box_inference_main

    return box_inference_main()


if __name__ == "__main__":
    sys.exit(main())
