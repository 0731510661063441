"""Text-prompt inference on one image (the seed's ``text_inference.py``): a mask per text prompt, saved
as a picture (each prompt written by its mask) and a ``.npz``.

    python text_inference.py --image-path room.jpg --checkpoint sam_vitb_text_clip.pth --text-prompt floor
    python text_inference.py --image_path photo.jpg --checkpoint sam_vitb_text_blip2.ckpt \
        --text-model-type blip2 --text-prompt "a dog" --text-prompt "a ball" --amp_level O2 --device cuda

Needs the ``samkit[text]`` extra (Hugging Face transformers). See ``--help`` for every flag; the work is
done by :mod:`samkit.commands.text`.
"""

import sys
from pathlib import Path


def main() -> int:
    # Run from a clone without installing: the repository's samkit comes first on the path.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from samkit.commands.text import main as text_inference_main

    return text_inference_main()


if __name__ == "__main__":
    sys.exit(main())
