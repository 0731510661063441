"""samkit: Segment Anything on PyTorch.

Drop-in names from Meta's ``segment_anything``: ``sam_model_registry``, ``SamPredictor``,
``SamAutomaticMaskGenerator`` and the ``build_sam*`` builders.
"""

from .amg import SamAutomaticMaskGenerator
from .build import (
    build_model,
    build_sam,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    build_sam_vit_tiny,
    load_checkpoint,
    sam_model_registry,
)
from .download import download_checkpoint
from .errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    DownloadError,
    ImageError,
    PromptError,
    SamkitError,
)
from .predictor import SamPredictor
from .utils.allocator import tune_cpu_allocator
from .utils.image import load_image

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DownloadError",
    "ImageError",
    "PromptError",
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "SamkitError",
    "build_model",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_tiny",
    "download_checkpoint",
    "load_checkpoint",
    "load_image",
    "sam_model_registry",
    "tune_cpu_allocator",
]
