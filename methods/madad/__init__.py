"""MAD-AD: masked latent diffusion for unsupervised brain anomaly detection (IPMI 2025)."""

from methods.madad.config import PROFILES, MadadConfig
from methods.madad.method import MADAD

__all__ = ["MADAD", "MadadConfig", "PROFILES"]
