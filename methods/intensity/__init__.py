"""The intensity floor (Meissen et al., 2021): the slice's own intensity as the anomaly map."""

from methods.intensity.method import IntensityConfig, IntensityFloor

__all__ = ["IntensityConfig", "IntensityFloor"]
