"""Segment organs through a CT/MR NIfTI scan from a box or clicks on one slice (slice propagation).

    python volume_inference.py --input ct.nii.gz --box 40,120,90,210,170 --checkpoint sam_vit_b_01ec64.pth
    python volume_inference.py --input ct.nii.gz --label 1 --box 40,120,90,210,170 --label 2 --point 52,300,200 --download

See ``--help`` for every flag; the work is done by :mod:`samkit.commands.volume`.
"""

import sys
from pathlib import Path


def main() -> int:
    # Run from a clone without installing: the repository's samkit comes first on the path.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from samkit.commands.volume import main as volume_main

    return volume_main()


if __name__ == "__main__":
    sys.exit(main())
