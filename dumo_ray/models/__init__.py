"""Model registry: `build_model(name, input_size=..., in_channels=..., num_classes=...)`, or from a config."""
from dumo_ray.models.dit import PRESETS, DualHeadDiT, build_model, count_parameters
from dumo_ray.models.factory import build_model_from_config

__all__ = ["PRESETS", "DualHeadDiT", "build_model", "build_model_from_config", "count_parameters"]
