"""Point-prompt inference on one image (the seed's ``point_inference.py``): masks from clicks, saved as
a picture and a ``.npz``.

    python point_inference.py --image-path slice.png --point 300,200 --point 120,340 --checkpoint sam.pth
    python point_inference.py --image_path photo.jpg --point 500,375 --point 1125,625,0 --one-object --download
    python point_inference.py --image_path slice.png --points_prompt "[[868,622]],[[724,466]]" --checkpoint sam.pth

See ``--help`` for every flag; the work is done by :mod:`samkit.commands.point`.
"""

import sys
from pathlib import Path


def main() -> int:
    # Run from a clone without installing: the repository's samkit comes first on the path.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from samkit.commands.point import main as point_inference_main

    return point_inference_main()


if __name__ == "__main__":
    sys.exit(main())
