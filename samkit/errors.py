"""Exceptions raised for user mistakes. Each message is one line that names the file, value or flag at fault."""


class SamkitError(Exception):
    """Base class: the command line prints ``str(err)`` on one line and exits non-zero, without a traceback."""


class CheckpointError(SamkitError, ValueError):
    """A checkpoint file is missing, truncated, of another model size, or not a checkpoint at all."""


class ImageError(SamkitError, ValueError):
    """An image file cannot be read, or an array is not an image samkit accepts."""


class PromptError(SamkitError, ValueError):
    """A point or box prompt is malformed or lies outside the image."""


class DownloadError(SamkitError, RuntimeError):
    """A checkpoint could not be downloaded or failed its size/sha256 check."""


class DatasetError(SamkitError, ValueError):
    """A dataset folder or annotation file is missing, unpaired or malformed."""


class ConfigError(SamkitError, ValueError):
    """A config file or ``-o key=value`` override names an unknown key or has a wrong type."""


class SamkitNote(UserWarning):
    """Something samkit did that the user should know (a text branch left out of a plain SAM); the command
    line prints it as one ``note: ...`` line."""
