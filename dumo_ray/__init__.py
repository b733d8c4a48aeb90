"""dumo_ray: Duality Models (DuMo) - a dual-head DiT trained for one- and few-step generation on Ray."""

__version__ = "0.1.0"
