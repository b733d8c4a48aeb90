"""Flow maths: the interpolant and time samplers, the JVP primitive, the objectives, the samplers."""
from dumo_ray.flow.jvp import u_and_dudt
from dumo_ray.flow.objectives import OBJECTIVES, build_objective
from dumo_ray.flow.path import TimeSampler, conditional_velocity, interpolate

__all__ = ["u_and_dudt", "OBJECTIVES", "build_objective", "TimeSampler", "conditional_velocity", "interpolate"]
