"""FLARE22 CT (or MR) NIfTI volumes -> 2D .npy slices for fine-tuning SAM (the seed's preprocessing).

    python scripts/preprocess_CT_MR_dataset.py                  # ./datasets/FLARE22Train -> ./datasets/FLARE22Train_processed
    python scripts/preprocess_CT_MR_dataset.py --input-dir data/FLARE22Train --output-dir data/flare_npy \
        --val-fraction 0.2 --image-size 1024

Reads ``images/<case>_0000.nii.gz`` and ``labels/<case>.nii.gz``, writes
``train|val/images|labels/CT_Abd_<case>-<NNN>.npy``. A re-run skips the finished cases. See ``--help``
for every flag and :mod:`samkit.data.ct_preprocess` for the details.
"""

import sys
from pathlib import Path


def main() -> int:
    # Run from a clone without installing: the repository's samkit comes first on the path.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from samkit.commands.preprocess_ct import main as preprocess_main

    return preprocess_main()


if __name__ == "__main__":
    sys.exit(main())
