"""Masks from point and box prompts on one image, saved as pictures (the seed's prompt demo).

    python demo/inference_with_prompts.py --input photo.jpg --prompt-type all --download
    python demo/inference_with_prompts.py --input photo.jpg --checkpoint sam_vit_b_01ec64.pth \
        --prompt-type point_box --box 100,80,400,500 --point 250,300,0

The same command as ``samkit predict``; see ``--help`` for every flag.
"""

import sys
from pathlib import Path


def main() -> int:
    # Run from a clone without installing: the repository's samkit comes first on the path.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from samkit.commands.base import run_standalone
    from samkit.commands.predict import add_arguments, run

    return run_standalone(add_arguments, run, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
