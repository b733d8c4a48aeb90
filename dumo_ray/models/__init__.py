"""Model registry: `build_model(name, input_size=..., in_channels=..., num_classes=...)`."""
from dumo_ray.models.dit import PRESETS, DualHeadDiT, build_model, count_parameters

__all__ = ["PRESETS", "DualHeadDiT", "build_model", "count_parameters"]
