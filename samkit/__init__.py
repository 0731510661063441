"""samkit: Segment Anything on PyTorch.

Drop-in names from Meta's ``segment_anything``: ``sam_model_registry``, ``SamPredictor``,
``SamAutomaticMaskGenerator`` and the ``build_sam*`` builders, at the same module paths
(``samkit.build_sam``, ``samkit.predictor``, ``samkit.automatic_mask_generator``, ``samkit.modeling.*``,
``samkit.utils.amg``, ``samkit.utils.transforms``): Meta's client code runs with its import changed.
"""

from .automatic_mask_generator import SamAutomaticMaskGenerator
from .build import build_model, build_sam_vit_tiny, load_checkpoint

# As in Meta's package, ``samkit.build_sam`` is both a module and (the package attribute) the vit_h
# builder. Importing the module here loads it (which sets the attribute to the module) and then binds
# the function over it; later imports of ``samkit.build_sam`` find it loaded and leave the attribute.
from .build_sam import build_sam, build_sam_vit_b, build_sam_vit_h, build_sam_vit_l, sam_model_registry
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
from .utils.download import download_checkpoint
from .utils.image import load_image
from .version import __version__ as __version__

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
