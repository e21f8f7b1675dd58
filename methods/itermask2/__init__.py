"""IterMask2 (Liang et al., MICCAI 2024): iterative spatial and frequency masking."""

from methods.itermask2.frequency import high_pass_phase
from methods.itermask2.masks import masked_error_threshold, sample_training_masks
from methods.itermask2.method import IterMask2, IterMask2Config

__all__ = ["IterMask2", "IterMask2Config", "high_pass_phase", "masked_error_threshold", "sample_training_masks"]
