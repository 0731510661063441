"""Helpers the library and the commands share: transforms, images, pictures, RLE and AMG helpers, checkpoint formats, downloads, demo photos."""
