"""Preprocessed FLARE22 CT slices (the fine-tuning seed's ``images/`` + ``labels/`` .npy layout) as
box-prompt samples: one object per organ label present in the slice."""

from __future__ import annotations

import os

import numpy as np

from ..errors import DatasetError
from .common import BoxPromptDataset
from .prompts import boxes_from_masks


def slice_to_uint8(image: np.ndarray) -> np.ndarray:
    """A preprocessed slice (HxWx3 float in [0, 1]) -> the HxWx3 uint8 image samkit trains on.

    ``round(x * 255)``: the 0-255 image a PNG of the slice holds when written the same way, so the
    model sees at inference exactly what it saw in training (``SamPredictor.set_image`` on that
    PNG gives the same input tensor). uint8 arrays are taken as already 0-255.
    """
    if image.dtype == np.uint8:
        return image
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def find_flare_pairs(data_dir: str) -> list[str]:
    """Sorted file names present in both ``data_dir/images`` and ``data_dir/labels`` (``*.npy``).
    A name in only one of them raises DatasetError naming the first such file."""
    for sub in ("images", "labels"):
        if not os.path.isdir(os.path.join(data_dir, sub)):
            raise DatasetError(f"FLARE folder has no {sub}/ sub-folder: {os.path.join(data_dir, sub)}")
    images = {n for n in os.listdir(os.path.join(data_dir, "images")) if n.endswith(".npy")}
    labels = {n for n in os.listdir(os.path.join(data_dir, "labels")) if n.endswith(".npy")}
    unpaired = sorted(images ^ labels)
    if unpaired:
        name = unpaired[0]
        have, lack = ("images", "labels") if name in images else ("labels", "images")
        raise DatasetError(
            f"FLARE slice without its partner: {os.path.join(data_dir, have, name)} "
            f"(no {os.path.join(data_dir, lack, name)}; {len(unpaired)} unpaired)"
        )
    return sorted(images)


class FlareDataset(BoxPromptDataset):
    """FLARE22 slices as written by the seed's preprocessing: ``data_dir/images/<name>.npy`` (HxWx3
    float in [0, 1], usually 1024x1024x3) and ``data_dir/labels/<name>.npy`` (HxW integer organ ids,
    0 = background).

    Image: ``slice_to_uint8`` (round(x * 255)), then the predictor's normalisation of a 0-255
    image. The seed fed the raw [0, 1] values to the encoder without normalising; samkit
    deliberately does not, so that one normalisation holds for training and inference.

    Objects: one binary mask per non-zero label id in the slice, in increasing id order (a slice
    with no organ gives a sample with no valid object). Box prompt: the mask's tight box (x1, y1 =
    last column/row, inclusive, as the seed computed it), each side moved outward by a uniform
    integer in [0, box_jitter] and clipped to [0, W] x [0, H], in original pixels.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        box_jitter: int = 20,
        image_size: int = 1024,
        max_objects: int = 20,
        seed: int = 0,
        return_original_masks: bool = False,
        compact: bool = False,
    ) -> None:
        super().__init__(
            image_size=image_size,
            max_objects=max_objects,
            box_jitter=box_jitter,
            seed=seed,
            return_original_masks=return_original_masks,
            compact=compact,
        )
        self.data_dir = os.fspath(data_dir)
        if not os.path.isdir(self.data_dir):
            raise DatasetError(f"FLARE folder not found: {self.data_dir}")
        names = find_flare_pairs(self.data_dir)
        if not names:
            raise DatasetError(f"no .npy slices in {os.path.join(self.data_dir, 'images')}")
        self._names = np.array(names)  # fixed-width strings: no per-item Python objects

    def __len__(self) -> int:
        return len(self._names)

    def paths(self, index: int) -> tuple[str, str]:
        """(image .npy, label .npy) of slice ``index``."""
        name = str(self._names[index])
        return os.path.join(self.data_dir, "images", name), os.path.join(self.data_dir, "labels", name)

    def _load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image_path, label_path = self.paths(index)
        image, label = _load_npy(image_path), _load_npy(label_path)
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise DatasetError(f"FLARE image must be HxWx3, got {tuple(image.shape)} in {image_path}")
        if image.dtype != np.uint8:
            if image.dtype.kind != "f":
                raise DatasetError(
                    f"FLARE image must be float in [0, 1] or uint8, got {image.dtype} in {image_path}"
                )
            top = float(np.max(image))  # NaN fails the test below too
            # A 0-255 float image times 255 would saturate to white: refuse rather than train on it.
            if not top <= 1.0 + 1e-3:
                raise DatasetError(f"FLARE image values must be in [0, 1], got max {top:g} in {image_path}")
        if label.shape != image.shape[:2] or label.dtype.kind not in "ui":
            raise DatasetError(
                f"FLARE label must be an HxW integer array matching its image {image.shape[:2]}, "
                f"got {tuple(label.shape)} {label.dtype} in {label_path}"
            )
        ids = np.unique(label)  # sorted
        ids = ids[ids != 0]
        ids = ids[self.choose(len(ids), rng)]
        masks = (label[None] == ids[:, None, None]).astype(np.uint8)
        return slice_to_uint8(image), masks, boxes_from_masks(masks)

    def describe(self) -> str:
        return f"FLARE {len(self)} slices from {self.data_dir}"


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read {path}: {err}") from None
