"""Cycl.UNet (Liang et al., MICCAI 2023): modality-cycle translation with two UNets."""

from methods.cyclunet.method import DEFAULT_INTERMEDIATE, CyclUNet, CyclUNetConfig, erode, intermediate_for

__all__ = ["CyclUNet", "CyclUNetConfig", "DEFAULT_INTERMEDIATE", "erode", "intermediate_for"]
