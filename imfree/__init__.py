"""imfree: image-free multi-label image recognition with CLIP."""

__version__ = "0.1.0"
