"""Prepared brain-MRI slice sets: the on-disk format, the embedded default set, prepare scripts.

This package shadows Hugging Face's ``datasets`` inside this repository; the suite never
depends on that package.
"""

from datasets.format import DatasetFormatError, SliceSet, load_slices, save_slices

__all__ = ["DatasetFormatError", "SliceSet", "load_slices", "save_slices"]
