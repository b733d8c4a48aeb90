"""Typed run configuration: dataclasses whose defaults are the paper's recipe, YAML files, dotted overrides.

A config is loaded in three layers: the dataclass defaults, then a YAML file, then `--set a.b=c`
overrides. Every value is type-checked and range-checked at load time, so a bad value fails with one
error naming the field (`objective.equal_fraction must be in [0, 1], got 1.5`) before any cluster
resource is used.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(section: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{section}.{name} must be one of {', '.join(choices)}; got {value!r}")


def _in_unit_interval(section: str, name: str, value: float) -> None:
    _check(0.0 <= value <= 1.0, f"{section}.{name} must be in [0, 1], got {value}")


def _positive(section: str, name: str, value: float) -> None:
    _check(value > 0, f"{section}.{name} must be > 0, got {value}")


@dataclass
class ModelConfig:
    """The dual-head DiT (method.md section 2). Defaults: the paper's 679M DuMo-XL/2 on 32x32x4 latents."""

    preset: str = "DuMo-XL/2"
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    # 0: each head is one final layer; k > 0: the last k blocks are duplicated per head (iMF design).
    head_depth: int = 0
    # t and t - r enter the sinusoidal embedding as t * time_scale; 1.0 is measured to be right (method 2).
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        from dumo_ray.model_presets import PRESETS

        _choice("model", "preset", self.preset, tuple(PRESETS))
        _positive("model", "input_size", self.input_size)
        _positive("model", "in_channels", self.in_channels)
        _positive("model", "num_classes", self.num_classes)
        _positive("model", "time_scale", self.time_scale)
        depth = PRESETS[self.preset]["depth"]
        _check(0 <= self.head_depth < depth,
               f"model.head_depth must be in [0, {depth - 1}] for {self.preset}, got {self.head_depth}")


@dataclass
class ObjectiveConfig:
    """Every knob of method.md sections 3-5. `equal_fraction: null` means the objective's own default."""

    name: str = "dumo"  # dumo | meanflow | flow_matching
    # The JVP's x-tangent (dumo): v_target: the (guided) velocity target (the study's winner, with
    # adaptive_p_u 0.5 and, on small trunks, model.head_depth 1) | v_hat: stopgrad(v-head) (as first shipped)
    # | blend: v_target at the start, moving linearly to v_hat over tangent_blend_images.
    tangent: str = "v_target"
    tangent_blend_images: int = 0
    # Where the v-head is queried for the tangent: own_r: at the sample's (t, r) | r_equals_t: at (t, t) (iMF).
    tangent_query: str = "own_r"
    # The velocity v in the u-target v - (t - r) du/dt: v_target (MeanFlow: the noisy conditional velocity)
    # | tangent (the same field the JVP follows; with tangent=v_hat the u-head learns the flow map of the
    # v-head's own ODE from a target without the conditional velocity's noise).
    identity_velocity: str = "v_target"
    # Flow matching on the u-head's boundary u(x_t, t, t) = v, weight lambda_boundary (0: off; costs a pass).
    lambda_boundary: float = 0.0
    # Interval curriculum: t - r capped at interval_cap_start, the cap growing linearly to 1 over
    # interval_curriculum_images (0: no cap). lambda_u grows linearly from 0 over lambda_u_warmup_images.
    interval_cap_start: float = 1.0
    interval_curriculum_images: int = 0
    lambda_u_warmup_images: int = 0
    estimator: str = "jvp"  # jvp (torch.func) | dual (forward-mode dual numbers) | finite_difference
    fd_step: float = 5e-3
    compile_jvp: str = "auto"  # auto (on CUDA) | always | never: torch.compile the jvp estimator's pass
    # logit_normal | uniform: two draws, t the larger, r the smaller | separate: t ~ logit-normal(time_mean,
    # time_std), r ~ logit-normal(r_mean, r_std), r clipped to <= t (Decoupled MeanFlow's sampler).
    time_sampler: str = "logit_normal"
    time_mean: float = -0.4
    time_std: float = 1.0
    r_mean: float = -0.4
    r_std: float = 1.0
    equal_fraction: Optional[float] = None  # share of samples with r = t (dumo 0.0, meanflow 0.75)
    zero_fraction: float = 0.0  # share of samples with r = 0
    lambda_v: float = 1.0
    lambda_u: float = 1.0
    adaptive_p_v: float = 1.0
    adaptive_c_v: float = 1e-3
    adaptive_p_u: Optional[float] = None  # null: the objective's own default (dumo 0.5, meanflow 1.0)
    adaptive_c_u: float = 1e-3
    class_dropout: float = 0.1
    # Guidance baked into the velocity target inside [cfg_t_lo, cfg_t_hi]: w*v_t + k*v_c + (1-w-k)*v_n.
    # w = 1, k = 0 turns it off. Defaults: MeanFlow-XL values (effective scale w / (1 - k) = 2.5).
    cfg_w: float = 0.2
    cfg_k: float = 0.92
    cfg_t_lo: float = 0.0
    cfg_t_hi: float = 0.75

    def __post_init__(self) -> None:
        _choice("objective", "name", self.name, ("dumo", "meanflow", "flow_matching"))
        _choice("objective", "tangent", self.tangent, ("v_hat", "v_target", "blend"))
        _choice("objective", "tangent_query", self.tangent_query, ("own_r", "r_equals_t"))
        _choice("objective", "identity_velocity", self.identity_velocity, ("v_target", "tangent"))
        for name in ("tangent_blend_images", "interval_curriculum_images", "lambda_u_warmup_images"):
            _check(getattr(self, name) >= 0, f"objective.{name} must be >= 0, got {getattr(self, name)}")
        _check(0.0 < self.interval_cap_start <= 1.0,
               f"objective.interval_cap_start must be in (0, 1], got {self.interval_cap_start}")
        _choice("objective", "estimator", self.estimator, ("jvp", "dual", "finite_difference"))
        _choice("objective", "compile_jvp", self.compile_jvp, ("auto", "always", "never"))
        _choice("objective", "time_sampler", self.time_sampler, ("logit_normal", "uniform", "separate"))
        _positive("objective", "fd_step", self.fd_step)
        _positive("objective", "time_std", self.time_std)
        _positive("objective", "r_std", self.r_std)
        if self.equal_fraction is not None:
            _in_unit_interval("objective", "equal_fraction", self.equal_fraction)
        _in_unit_interval("objective", "zero_fraction", self.zero_fraction)
        _check(self.resolved_equal_fraction + self.zero_fraction <= 1.0,
               "objective.equal_fraction + objective.zero_fraction must be <= 1, got "
               f"{self.resolved_equal_fraction} + {self.zero_fraction}")
        _in_unit_interval("objective", "class_dropout", self.class_dropout)
        for name in ("lambda_v", "lambda_u", "lambda_boundary", "adaptive_p_v", "resolved_adaptive_p_u"):
            label = name.removeprefix("resolved_")
            _check(getattr(self, name) >= 0, f"objective.{label} must be >= 0, got {getattr(self, name)}")
        _positive("objective", "adaptive_c_v", self.adaptive_c_v)
        _positive("objective", "adaptive_c_u", self.adaptive_c_u)
        _in_unit_interval("objective", "cfg_t_lo", self.cfg_t_lo)
        _in_unit_interval("objective", "cfg_t_hi", self.cfg_t_hi)
        _check(self.cfg_t_lo <= self.cfg_t_hi,
               f"objective.cfg_t_lo ({self.cfg_t_lo}) must be <= objective.cfg_t_hi ({self.cfg_t_hi})")
        _check(self.cfg_k < 1.0, f"objective.cfg_k must be < 1 (scale w / (1 - k)), got {self.cfg_k}")

    @property
    def resolved_equal_fraction(self) -> float:
        if self.equal_fraction is not None:
            return self.equal_fraction
        return 0.75 if self.name == "meanflow" else 0.0

    @property
    def resolved_adaptive_p_u(self) -> float:
        """DuMo's u-loss is weighted L / (L + c)^0.5 (the study: 1-step FD-digits 38 vs 55 at p = 1 on the
        0.6M model); MeanFlow keeps its paper's p = 1."""
        if self.adaptive_p_u is not None:
            return self.adaptive_p_u
        return 0.5 if self.name == "dumo" else 1.0

    @property
    def guidance(self) -> bool:
        return not (self.cfg_w == 1.0 and self.cfg_k == 0.0)


@dataclass
class DataConfig:
    """`digits`: scikit-learn's bundled 8x8 digits in memory (single-process trainer only).
    `latents`: a folder written by `dumo-ray precompute` (Parquet shards + manifest.json)."""

    source: str = "latents"
    path: str = ""
    # Rows with flip=True (the mirrored images' encodings) are extra training samples; false skips them.
    use_flips: bool = True
    # manifest: per-channel mean/std from the manifest; scale: z * latent_scale; none: as stored.
    normalize: str = "manifest"
    latent_scale: float = 0.18215
    shuffle_buffer: int = 4096  # rows in each worker's seeded local shuffle buffer
    # Keep the decoded dataset in Ray's object store instead of re-reading the Parquet files every epoch:
    # auto = when it is under 2 GiB (the digits demo yes, ImageNet latents no).
    cache: str = "auto"  # auto | always | never

    def __post_init__(self) -> None:
        _choice("data", "source", self.source, ("digits", "latents"))
        _choice("data", "normalize", self.normalize, ("manifest", "scale", "none"))
        _positive("data", "latent_scale", self.latent_scale)
        _choice("data", "cache", self.cache, ("auto", "always", "never"))
        _check(self.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")


@dataclass
class DistributedConfig:
    """How `dumo-ray train` runs: Ray Train workers with DeepSpeed ZeRO, or one local process."""

    launcher: str = "ray"  # ray: TorchTrainer + DeepSpeed | local: this process, plain PyTorch
    address: Optional[str] = None  # Ray cluster address; None: RAY_ADDRESS or a new local Ray
    # N, or [min, max] for elastic training: Ray Train starts with as many workers as the cluster can host
    # (up to max), restarts with fewer (>= min) when a node is lost, and scales back up when nodes return.
    num_workers: Union[int, list[int]] = 1
    elastic_resize_interval_s: float = 60.0  # how often a running elastic group checks for room to grow
    worker_resources: dict[str, float] = field(default_factory=dict)  # extra custom resources per worker
    use_gpu: Optional[bool] = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    zero_stage: int = 2
    max_failures: int = 3  # worker restarts (from the last checkpoint) before the run fails
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    max_nonfinite_steps: int = 20  # consecutive NaN/Inf steps tolerated (skipped) before stopping

    def __post_init__(self) -> None:
        _choice("distributed", "launcher", self.launcher, ("ray", "local"))
        if isinstance(self.num_workers, list):
            _check(len(self.num_workers) == 2 and 1 <= self.num_workers[0] <= self.num_workers[1],
                   f"distributed.num_workers must be N or [min, max] with 1 <= min <= max, got {self.num_workers}")
        else:
            _positive("distributed", "num_workers", self.num_workers)
        _check(self.elastic_resize_interval_s >= 0,
               f"distributed.elastic_resize_interval_s must be >= 0, got {self.elastic_resize_interval_s}")
        _check(self.cpus_per_worker >= 0, f"distributed.cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        _check(self.gpus_per_worker >= 0, f"distributed.gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        _check(self.zero_stage in (1, 2, 3), f"distributed.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        _check(self.max_failures >= -1, f"distributed.max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")
        _choice("distributed", "placement_strategy", self.placement_strategy,
                ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
        _positive("distributed", "max_nonfinite_steps", self.max_nonfinite_steps)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


@dataclass
class TrackingConfig:
    """MLflow. Locally a sqlite store (MLflow >= 3.13 refuses `file:` stores); on a cluster an http:// server."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "dumo-ray"
    parent_run_id: Optional[str] = None  # set by `dumo-ray tune`: the trial's run is a child of the sweep's run

    def __post_init__(self) -> None:
        _check(not self.uri.startswith("file:") and not self.uri.startswith("/"),
               f"tracking.uri {self.uri!r}: MLflow >= 3.13 refuses file stores; use sqlite:///path.db or http://host:port")


@dataclass
class OptimConfig:
    """Adam(0.9, 0.95), lr 1e-4 constant, no weight decay, global batch 256, EMA 0.9999, clip 1.0."""

    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    batch_size: int = 256  # global batch, images per optimizer step, whatever the number of workers
    # Largest micro-batch one worker runs at once; a worker's share of the global batch above it is split
    # into gradient-accumulation steps. None: the whole share in one pass.
    micro_batch_size: Optional[int] = None
    ema_decay: float = 0.9999

    def __post_init__(self) -> None:
        _positive("optim", "lr", self.lr)
        _check(0.0 <= self.beta1 < 1.0, f"optim.beta1 must be in [0, 1), got {self.beta1}")
        _check(0.0 <= self.beta2 < 1.0, f"optim.beta2 must be in [0, 1), got {self.beta2}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        _positive("optim", "batch_size", self.batch_size)
        if self.micro_batch_size is not None:
            _positive("optim", "micro_batch_size", self.micro_batch_size)
        _in_unit_interval("optim", "ema_decay", self.ema_decay)


@dataclass
class TrainConfig:
    """Progress is counted in images; every interval is rounded up to a multiple of the global batch."""

    total_images: int = 240 * 1_281_167  # 240 ImageNet epochs
    log_every_images: int = 25_600
    sample_every_images: int = 0  # 0: sample grids only at the end
    checkpoint_every_images: int = 1_280_000
    keep_checkpoints: int = 3
    storage_path: str = "runs"  # local dir, NFS path or s3:// / gs:// URI; the run lives in storage_path/name
    name: str = "dumo"  # rerunning with the same storage_path and name resumes the run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    sample_steps: list[int] = field(default_factory=lambda: [1, 2])
    sample_mid_time: float = 0.5
    num_sample_images: int = 100  # images in each sample grid (at most a 10 x 10 grid is drawn)
    # Fault-tolerance drills: the first time a run reaches this many images, one worker raises
    # (0 = never). A marker file in the run directory keeps the restarted run from failing again.
    fail_once_at_images: int = 0

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, f"train.name must be a plain name, got {self.name!r}")
        _positive("train", "total_images", self.total_images)
        _positive("train", "log_every_images", self.log_every_images)
        _check(self.sample_every_images >= 0, f"train.sample_every_images must be >= 0, got {self.sample_every_images}")
        _positive("train", "checkpoint_every_images", self.checkpoint_every_images)
        _positive("train", "keep_checkpoints", self.keep_checkpoints)
        _choice("train", "device", self.device, ("auto", "cpu", "cuda"))
        _choice("train", "precision", self.precision, ("auto", "fp32", "bf16"))
        _check(all(s > 0 for s in self.sample_steps), f"train.sample_steps must be positive, got {self.sample_steps}")
        _check(0.0 < self.sample_mid_time < 1.0, f"train.sample_mid_time must be in (0, 1), got {self.sample_mid_time}")
        _positive("train", "num_sample_images", self.num_sample_images)


INCEPTION_WEIGHTS_ENV = "DUMO_INCEPTION_WEIGHTS"


@dataclass
class EvalConfig:
    """In-training evaluation: the EMA weights sample a fixed, class-balanced set (per-index seeds and
    labels, the same at every evaluation and whatever the number of workers), and the Frechet distance to
    the reference (plus class accuracy for the digits, Inception Score for Inception features) is logged
    to MLflow and reported to Ray Train (`fd_1step`, `fd_2step`, ...), so sweeps can rank on it."""

    every_images: int = 0  # 0: evaluate only at the end; otherwise a multiple of train.log_every_images
    num_images: int = 1000  # size of the fixed evaluation set (shared out over the workers)
    steps: list[int] = field(default_factory=lambda: [1, 2])
    # Also score the v-head integrated with this many Euler steps (fd_euler50, ...): DuMo's multi-step view.
    euler_steps: list[int] = field(default_factory=list)
    # auto: digits for digits data, inception when eval.reference is set, otherwise none.
    features: str = "auto"  # auto | digits | inception | none
    reference: str = ""  # ADM-style reference .npz (mu, sigma) for inception features
    inception_weights: str = ""  # local Inception-v3 weights file; "" reads $DUMO_INCEPTION_WEIGHTS
    chunk: int = 64  # network batch while sampling (fixed, so results do not depend on how work is split)

    def __post_init__(self) -> None:
        _check(self.every_images >= 0, f"eval.every_images must be >= 0, got {self.every_images}")
        _positive("eval", "num_images", self.num_images)
        _check(bool(self.steps) and all(s > 0 for s in self.steps), f"eval.steps must be positive, got {self.steps}")
        _check(all(s > 0 for s in self.euler_steps), f"eval.euler_steps must be positive, got {self.euler_steps}")
        _choice("eval", "features", self.features, ("auto", "digits", "inception", "none"))
        _positive("eval", "chunk", self.chunk)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(self.optim.batch_size >= self.distributed.max_workers,
               f"optim.batch_size {self.optim.batch_size} is smaller than distributed.num_workers "
               f"{self.distributed.num_workers}: every worker needs at least one image per step")

    @property
    def run_dir(self) -> str:
        return f"{self.train.storage_path.rstrip('/')}/{self.train.name}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. for MLflow params."""
        return {f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()}


# ---------------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> typed dataclasses


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        for candidate in inner:
            try:
                return _coerce(value, candidate, key)
            except ConfigError:
                pass
        kinds = " or ".join({int: "an integer", float: "a number", str: "a string"}.get(a, "a list") for a in inner)
        raise ConfigError(f"{key} must be {kinds}, got {value!r}")
    if origin is list:
        _check(isinstance(value, list), f"{key} must be a list, got {value!r}")
        (inner,) = typing.get_args(annotation)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), f"{key} must be a mapping, got {value!r}")
        key_type, value_type = typing.get_args(annotation)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, got {value!r}")
        return value
    if annotation is bool:
        _check(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
        return value
    if annotation is str:
        _check(isinstance(value, str), f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            _check(isinstance(value, dict), f"{prefix}{name} must be a mapping, got {value!r}")
            kwargs[name] = _build(annotation, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, annotation, f"{prefix}{name}")
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """`optim.lr=3e-4` -> {"optim": {"lr": 0.0003}}; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = text.partition("=")
    _check(bool(sep) and bool(key.strip()), f"override {text!r} must look like section.key=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
    nested: dict[str, Any] = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def check_consistency(cfg: Config) -> None:
    """Checks across fields and sections (each section checks its own fields when it is built)."""
    _check(cfg.data.source != "latents" or bool(cfg.data.path),
           "data.path must name a latent folder (the --output of `dumo-ray precompute`) when data.source is 'latents'")
    if cfg.data.source == "digits" and cfg.distributed.launcher != "local":
        raise ConfigError("data.source 'digits' is the in-memory demo of the local trainer: set distributed.launcher=local, "
                          "or write the digits as a latent folder (dumo-ray digits-tree + precompute) and use data.source=latents")
    if cfg.distributed.launcher == "local" and cfg.data.source != "digits":
        raise ConfigError("distributed.launcher 'local' trains on data.source 'digits' only; latents train through Ray")
    every = cfg.eval.every_images
    _check(every % cfg.train.log_every_images == 0,
           f"eval.every_images ({every}) must be a multiple of train.log_every_images ({cfg.train.log_every_images}): "
           "evaluations are reported with the status line")
    if cfg.eval.features == "inception":
        _check(bool(cfg.eval.reference), "eval.features 'inception' needs eval.reference: an ADM-style reference .npz "
               "(mu, sigma), e.g. VIRTUAL_imagenet256_labeled.npz, or one written by `dumo-ray evaluate --save-reference`")
    if cfg.data.source == "digits":
        m = cfg.model
        _check((m.input_size, m.in_channels, m.num_classes) == (8, 1, 10),
               "data.source 'digits' is 8x8 pixels, 1 channel, 10 classes: set model.input_size=8, "
               f"model.in_channels=1, model.num_classes=10 (got {m.input_size}, {m.in_channels}, {m.num_classes})")
    if resolved_eval_features(cfg) == "digits":
        m = cfg.model
        _check((m.input_size, m.in_channels, m.num_classes) == (8, 1, 10),
               "eval.features 'digits' judges 8x8 one-channel images of 10 classes (pixel-space digits); "
               f"this model makes {m.input_size}x{m.input_size}x{m.in_channels} of {m.num_classes} classes")


def resolved_eval_features(cfg: Config) -> str:
    """eval.features with `auto` resolved: digits for the digits data, inception when a reference is set."""
    if cfg.eval.features != "auto":
        return cfg.eval.features
    if cfg.data.source == "digits":
        return "digits"
    return "inception" if cfg.eval.reference else "none"


def config_from_dict(values: dict[str, Any]) -> Config:
    cfg = _build(Config, values, "")
    check_consistency(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated. Raises ConfigError naming the bad field."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        _check(path.is_file(), f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        _check(isinstance(loaded, dict), f"config file {path} must hold a mapping at the top level")
        values = loaded
    for text in overrides:
        values = _merge(values, parse_override(text))
    return config_from_dict(values)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
