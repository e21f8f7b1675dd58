"""DAE (Kascenas et al., MIDL 2022): coarse-noise denoising UNet; see method.py and README.md."""

from methods.dae.method import DAEConfig, DenoisingAutoencoder

__all__ = ["DAEConfig", "DenoisingAutoencoder"]
