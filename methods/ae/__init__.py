"""Dense convolutional autoencoder (Baur et al.)."""

from methods.ae.method import AEConfig, AutoEncoder

__all__ = ["AEConfig", "AutoEncoder"]
