"""Prepare scripts: raw IXI / ATLAS 2.0 / BraTS 2021 releases -> prepared slice sets.

    python -m datasets.prepare ixi     --raw IXI_MNI   --out data/ixi
    python -m datasets.prepare atlas   --raw ATLAS_2   --out data/atlas
    python -m datasets.prepare s1      --ixi IXI_MNI --atlas ATLAS_2 --out data/s1
    python -m datasets.prepare brats21 --raw BraTS2021 --out data/brats21

See docs/data-preparation.md.
"""

from datasets.prepare.atlas import ATLASConfig, prepare_atlas
from datasets.prepare.brats21 import BraTSConfig, prepare_brats21
from datasets.prepare.common import Outcome, PrepareError, SubjectError
from datasets.prepare.ixi import IXIConfig, prepare_ixi
from datasets.prepare.combine import combine_s1, prepare_s1
from datasets.prepare.s1 import S1Config

__all__ = [
    "ATLASConfig",
    "BraTSConfig",
    "IXIConfig",
    "Outcome",
    "PrepareError",
    "S1Config",
    "SubjectError",
    "combine_s1",
    "prepare_atlas",
    "prepare_brats21",
    "prepare_ixi",
    "prepare_s1",
]
