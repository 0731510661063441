"""Users' own data in its real on-disk formats, drawn from ``tests/shapes.py``'s shape images: image +
label folders (8/16/32-bit and palette labels; RGB, 16-bit and float pictures), image + binary-mask
folders, and labelme JSON files. Deterministic for a seed, small and fast."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import measure

from .shapes import make_shapes_image

LABEL_FORMATS = ("png8", "png16", "tif32", "palette")
IMAGE_FORMATS = ("jpg", "png", "tif16", "tiff_float", "palette", "rgba")


def save_label(label: np.ndarray, path_stem: Path, fmt: str) -> Path:
    """An HxW label image in ``fmt`` (one of LABEL_FORMATS); returns the file written."""
    if fmt == "png8":
        path = path_stem.with_suffix(".png")
        Image.fromarray(label.astype(np.uint8), mode="L").save(path)
    elif fmt == "png16":
        path = path_stem.with_suffix(".png")
        Image.fromarray(label.astype(np.uint16)).save(path)  # mode I;16
    elif fmt == "tif32":
        path = path_stem.with_suffix(".tif")
        Image.fromarray(label.astype(np.int32), mode="I").save(path)
    elif fmt == "palette":
        path = path_stem.with_suffix(".png")
        img = Image.fromarray(label.astype(np.uint8), mode="P")
        img.putpalette([v for i in range(256) for v in ((i * 67) % 256, (i * 131) % 256, (i * 29) % 256)])
        img.save(path)
    else:
        raise ValueError(fmt)
    return path


def save_image(image: np.ndarray, path_stem: Path, fmt: str) -> tuple[Path, np.ndarray]:
    """An HxWx3 uint8 picture written as ``fmt``; returns (file, the stored array as read back)."""
    grey = image.mean(axis=2)
    if fmt == "jpg":
        path = path_stem.with_suffix(".jpg")
        Image.fromarray(image).save(path, quality=95)
    elif fmt == "png":
        path = path_stem.with_suffix(".png")
        Image.fromarray(image).save(path)
    elif fmt == "tif16":  # a 12-bit camera: values 400..4400, far from /257's range
        path = path_stem.with_suffix(".tif")
        Image.fromarray((400 + grey * 16).astype(np.uint16)).save(path)
    elif fmt == "tiff_float":
        path = path_stem.with_suffix(".tiff")
        Image.fromarray((grey / 255.0 * 3.5 - 1.0).astype(np.float32), mode="F").save(path)
    elif fmt == "palette":
        path = path_stem.with_suffix(".png")
        Image.fromarray(image).quantize(64).save(path)
    elif fmt == "rgba":
        path = path_stem.with_suffix(".png")
        Image.fromarray(np.dstack([image, np.full(image.shape[:2], 200, np.uint8)])).save(path)
    else:
        raise ValueError(fmt)
    with Image.open(path) as img:
        stored = np.asarray(img.convert("RGB") if img.mode in ("P", "RGBA") else img)
    return path, stored


def make_mask_folder(
    root: Path,
    num_images: int = 4,
    seed: int = 0,
    size: tuple[int, int] = (96, 128),
    layout: str = "labels",
    label_format: str = "png8",
    image_format: str = "jpg",
) -> tuple[Path, dict[str, np.ndarray]]:
    """``root/images/img_<i>.*`` with ``root/labels/img_<i>.*`` (instance label images) or
    ``root/masks/img_<i>/obj_<k>.png`` (binary masks, 0/255). Returns (root, stem -> KxHxW bool masks
    in label-value order)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / layout).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(num_images):
        stem = f"img_{i:02d}"
        image, masks = make_shapes_image(rng, size)
        save_image(image, root / "images" / stem, image_format)
        if layout == "labels":
            label = np.zeros(size, np.int64)
            for k, m in enumerate(masks):
                label[m] = k + 1
            save_label(label, root / "labels" / stem, label_format)
        else:
            (root / "masks" / stem).mkdir()
            for k, m in enumerate(masks):
                Image.fromarray(m.astype(np.uint8) * 255).save(root / "masks" / stem / f"obj_{k:02d}.png")
        truth[stem] = masks
    return root, truth


def polygon_points(mask: np.ndarray) -> list[list[list[float]]]:
    """Outlines of a mask as labelme polygon points ([[x, y], ...] per outline, pixel centres)."""
    padded = np.pad(mask.astype(np.float64), 1)
    out = []
    for contour in measure.find_contours(padded, 0.5):
        if len(contour) >= 3:
            xy = contour[:, ::-1] - 1
            out.append([[round(float(x), 2), round(float(y), 2)] for x, y in xy])
    return out


def labelme_file(
    path: Path, shapes: list[dict], size: tuple[int, int], image: np.ndarray | None, image_path: str | None
) -> None:
    """A labelme JSON (version 5.x fields) with ``shapes``; ``image`` embedded as PNG imageData."""
    data = None
    if image is not None:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        data = base64.b64encode(buf.getvalue()).decode("ascii")
    doc = {
        "version": "5.4.1",
        "flags": {},
        "shapes": shapes,
        "imagePath": image_path or "",
        "imageData": data,
        "imageHeight": size[0],
        "imageWidth": size[1],
    }
    Path(path).write_text(json.dumps(doc))


def shape(label: str, kind: str, points, group_id=None) -> dict:
    return {"label": label, "points": points, "group_id": group_id, "shape_type": kind, "flags": {}}


LABELME_NAMES = ("cell", "nucleus", "debris")


def make_labelme_folder(
    root: Path, num_images: int = 4, seed: int = 0, size: tuple[int, int] = (96, 128)
) -> tuple[Path, dict[str, np.ndarray]]:
    """``root/*.json`` labelme files of shape pictures: even images embed the picture (imageData), odd
    ones point to ``pics/<stem>.png`` (imagePath). Each shape is one polygon per outline; a shape
    with a hole (a ring) is its outer and inner outline with a shared group_id. Returns (root, stem ->
    KxHxW bool drawn masks)."""
    root = Path(root)
    (root / "pics").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(num_images):
        stem = f"photo_{i:02d}"
        image, masks = make_shapes_image(rng, size)
        shapes = []
        for k, mask in enumerate(masks):
            outlines = polygon_points(mask)
            group = k if len(outlines) > 1 else None
            shapes.extend(shape(LABELME_NAMES[k % 3], "polygon", p, group) for p in outlines)
        if i % 2:
            Image.fromarray(image).save(root / "pics" / f"{stem}.png")
            labelme_file(root / f"{stem}.json", shapes, size, None, f"pics\\{stem}.png")
        else:
            labelme_file(root / f"{stem}.json", shapes, size, image, f"{stem}.jpg")
        truth[stem] = masks
    return root, truth
