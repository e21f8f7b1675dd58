"""The embedded default data set: real MNI ICBM152 anatomy from the nilearn wheel, four
contrasts, random deformations and synthetic lesions with exact masks. No download.

``load_embedded()`` is the entry point; docs/embedded-data.md describes every choice.
"""

from datasets.embedded.build import BUILDER_VERSION, build_embedded, cache_root, load_embedded
from datasets.embedded.contrasts import MODALITIES
from datasets.embedded.lesions import SIZE_CLASSES, s1_bucket, s2_bucket

__all__ = [
    "BUILDER_VERSION", "MODALITIES", "SIZE_CLASSES", "build_embedded", "cache_root", "load_embedded",
    "s1_bucket", "s2_bucket",
]
