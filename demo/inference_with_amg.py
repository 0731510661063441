"""Masks of everything in an image, drawn over it in random colours (the seed's automatic mask demo).

    python demo/inference_with_amg.py --input photo.jpg --output amg.png --download
    python demo/inference_with_amg.py --input photos/ --output masks/ --checkpoint sam_vit_b_01ec64.pth \
        --convert-to-rle --points-per-side 16

The same command as ``samkit amg``: a single image and a picture name write the overlay picture; a
folder (or an output directory) writes mask PNGs and metadata.csv, or SA-1B JSON with
--convert-to-rle, per image. See ``--help`` for every flag.
"""

import sys
from pathlib import Path


def main() -> int:
    # Run from a clone without installing: the repository's samkit comes first on the path.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from samkit.commands.amg import add_arguments, run
    from samkit.commands.base import run_standalone

    return run_standalone(add_arguments, run, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
