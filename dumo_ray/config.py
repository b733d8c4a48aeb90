"""Typed run configuration: dataclasses whose defaults are the paper's recipe, YAML files, dotted overrides.

A config is loaded in three layers: the dataclass defaults, then a YAML file, then `--set a.b=c`
overrides. pydantic checks every value's type and range at load time, and each failure is turned into
one line naming the field (`objective.equal_fraction must be in [0, 1], got 1.5`) before any cluster
resource is used. Every field carries a one-line `description`: `dumo-ray config` prints them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, PlainValidator, StrictBool, StrictFloat
from pydantic import StrictInt, StrictStr, ValidationError
from pydantic.dataclasses import dataclass

from dumo_ray.errors import DeterministicError
from dumo_ray.model_presets import PRESETS


class ConfigError(DeterministicError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ---------------------------------------------------------------------------------------------------
# Field types. Strict: YAML's `true` is not a number and `1` is not a string. A range rule's message
# is the end of a sentence that the loader starts with the field's dotted name.


def _rule(test: Callable[[Any], bool], text: str) -> AfterValidator:
    def check(value: Any) -> Any:
        if not test(value):
            raise ValueError(text)
        return value
    return AfterValidator(check)


def _plain_name(value: str) -> bool:
    """A run name is one folder inside storage_path: `..`, a separator or an absolute path would put
    the run, and the checkpoints a rerun resumes from, somewhere else."""
    return value.strip() not in ("", ".", "..") and not any(sep in value for sep in ("/", "\\", "\0"))


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads `3e-4` (no dot) as a string."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _workers(value: Any) -> Union[int, list[int]]:
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise ValueError("must be an integer or a list")
    if isinstance(value, int):
        if value < 1:
            raise ValueError("must be > 0")
        return value
    if not (len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and 1 <= value[0] <= value[1]):
        raise ValueError("must be N or [min, max] with 1 <= min <= max")
    return value


Int, Bool, Str = StrictInt, StrictBool, StrictStr
Number = Annotated[StrictFloat, BeforeValidator(_yaml_number)]  # ints are accepted (and become floats)
Positive = Annotated[Number, _rule(lambda v: v > 0, "must be > 0")]
NonNegative = Annotated[Number, _rule(lambda v: v >= 0, "must be >= 0")]
Fraction = Annotated[Number, _rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")]
PositiveInt = Annotated[Int, _rule(lambda v: v > 0, "must be > 0")]
Count = Annotated[Int, _rule(lambda v: v >= 0, "must be >= 0")]
Steps = Annotated[list[Int], _rule(lambda v: all(s > 0 for s in v), "must be positive")]
Preset = Annotated[Str, _rule(lambda v: v in PRESETS, f"must be one of {', '.join(PRESETS)}")]
Workers = Annotated[Union[int, list[int]], PlainValidator(_workers)]
AutoAlwaysNever = Literal["auto", "always", "never"]

_SECTION = ConfigDict(extra="forbid")  # an unknown key is an error, never silently ignored


def doc(default: Any, description: str) -> Any:
    """A field's default and its one-line doc; a list or dict default is copied for each config."""
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda: type(default)(default), description=description)
    return Field(default, description=description)


@dataclass(config=_SECTION)
class ModelConfig:
    """The dual-head DiT (method.md section 2). Defaults: the paper's 679M DuMo-XL/2 on 32x32x4 latents."""

    preset: Preset = doc("DuMo-XL/2", "model size, a row of the presets table (dumo_ray/model_presets.py)")
    input_size: PositiveInt = doc(32, "latent (or pixel) height and width")
    in_channels: PositiveInt = doc(4, "latent (or pixel) channels")
    num_classes: PositiveInt = doc(1000, "class labels; index num_classes is the null class of guidance")
    head_depth: Int = doc(0, "0: each head is one final layer; k > 0: the last k blocks are duplicated per head (iMF)")
    time_scale: Positive = doc(1.0, "t and t - r enter the sinusoidal embedding as t * time_scale (1.0 measured right)")

    def __post_init__(self) -> None:
        depth = PRESETS[self.preset]["depth"]
        _check(0 <= self.head_depth < depth,
               f"model.head_depth must be in [0, {depth - 1}] for {self.preset}, got {self.head_depth}")


@dataclass(config=_SECTION)
class ObjectiveConfig:
    """Every knob of method.md sections 3-5 (how du/dt is computed is in `jvp`)."""

    name: Literal["dumo", "meanflow", "flow_matching"] = doc("dumo", "the training objective")
    # The study's winner is v_target (with adaptive_p_u 0.5 and, on small trunks, model.head_depth 1).
    tangent: Literal["v_hat", "v_target", "blend"] = doc(
        "v_target", "dumo's JVP x-tangent: v_target (the guided velocity target) | v_hat (stopgrad v-head) | "
                    "blend (v_target moving linearly to v_hat over tangent_blend_images)")
    tangent_blend_images: Count = doc(0, "length of the tangent blend, in images")
    tangent_query: Literal["own_r", "r_equals_t"] = doc(
        "own_r", "where the v-head is queried for the tangent: own_r at (t, r) | r_equals_t at (t, t) (iMF)")
    # `tangent` with tangent=v_hat: the u-head learns the flow map of the v-head's own ODE, without the
    # conditional velocity's noise in its target.
    identity_velocity: Literal["v_target", "tangent"] = doc(
        "v_target", "the v in the u-target v - (t - r) du/dt: v_target (MeanFlow) | tangent (the JVP's field)")
    lambda_boundary: NonNegative = doc(
        0.0, "weight of flow matching on the u-head's boundary u(x_t, t, t) = v (0: off; costs a pass)")
    interval_cap_start: Annotated[Number, _rule(lambda v: 0 < v <= 1, "must be in (0, 1]")] = doc(1.0, "curriculum: t - r capped at this, the cap growing linearly to 1")
    interval_curriculum_images: Count = doc(0, "images over which the interval cap grows to 1 (0: no cap)")
    lambda_u_warmup_images: Count = doc(0, "lambda_u grows linearly from 0 over this many images")
    # separate is Decoupled MeanFlow's sampler.
    time_sampler: Literal["logit_normal", "uniform", "separate"] = doc(
        "logit_normal", "(t, r): two draws, t the larger (logit_normal, uniform) | separate: t and r each "
                        "logit-normal, r clipped to <= t")
    time_mean: Number = doc(-0.4, "logit-normal mean of t (of both draws unless time_sampler is separate)")
    time_std: Positive = doc(1.0, "logit-normal std of t")
    r_mean: Number = doc(-0.4, "logit-normal mean of r (time_sampler separate)")
    r_std: Positive = doc(1.0, "logit-normal std of r (time_sampler separate)")
    equal_fraction: Optional[Fraction] = doc(None, "share of samples with r = t; null: dumo 0.0, meanflow 0.75")
    zero_fraction: Fraction = doc(0.0, "share of samples with r = 0")
    u_fraction: Annotated[Number, _rule(lambda v: 0 < v <= 1, "must be in (0, 1]")] = doc(
        1.0, "dumo: share of each batch that also trains the u-head (its JVP); the v-head trains on every row")
    lambda_v: NonNegative = doc(1.0, "weight of the v-head's loss")
    lambda_u: NonNegative = doc(1.0, "weight of the u-head's loss")
    adaptive_p_v: Optional[NonNegative] = doc(None, "v-loss weighted L / (L + c)^p: this p; null: dumo 0.5, others 1.0")
    adaptive_c_v: Positive = doc(1e-3, "v-loss weighted L / (L + c)^p: this c")
    adaptive_p_u: Optional[NonNegative] = doc(None, "u-loss weighted L / (L + c)^p: this p; null: dumo 0.5, meanflow 1.0")
    adaptive_c_u: Positive = doc(1e-3, "u-loss weighted L / (L + c)^p: this c")
    class_dropout: Fraction = doc(0.1, "share of labels replaced by the null class")
    # Guidance baked into the velocity target: w*v_t + k*v_c + (1-w-k)*v_n; w = 1, k = 0 turns it off.
    # Defaults: MeanFlow-XL's (effective scale w / (1 - k) = 2.5).
    cfg_w: Number = doc(0.2, "guidance: weight of the conditional velocity target v_t")
    cfg_k: Annotated[Number, _rule(lambda v: v < 1, "must be < 1 (scale w / (1 - k))")] = doc(
        0.92, "guidance: weight of the model's own conditional velocity")
    cfg_t_lo: Fraction = doc(0.0, "guidance applies for t in [cfg_t_lo, cfg_t_hi]")
    cfg_t_hi: Fraction = doc(0.75, "guidance applies for t in [cfg_t_lo, cfg_t_hi]")

    def __post_init__(self) -> None:
        _check(self.resolved_equal_fraction + self.zero_fraction <= 1.0,
               "objective.equal_fraction + objective.zero_fraction must be <= 1, got "
               f"{self.resolved_equal_fraction} + {self.zero_fraction}")
        _check(self.cfg_t_lo <= self.cfg_t_hi,
               f"objective.cfg_t_lo ({self.cfg_t_lo}) must be <= objective.cfg_t_hi ({self.cfg_t_hi})")
        _check(self.u_fraction == 1.0 or self.name == "dumo",
               f"objective.u_fraction applies to dumo only (the {self.name} objective has one loss on every row)")

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
    def resolved_adaptive_p_v(self) -> float:
        """DuMo's v-loss is weighted L / (L + c)^0.5 too (the study's round 3: v-head Euler-50 FD-digits 12.1
        vs 16.7 at p = 1, 1-step 16.9 vs 14.3 at equal wall time); flow matching and MeanFlow keep p = 1, their
        papers' weighting, so they stay the baselines they name."""
        if self.adaptive_p_v is not None:
            return self.adaptive_p_v
        return 0.5 if self.name == "dumo" else 1.0

    @property
    def needs_jvp(self) -> bool:
        """dumo and meanflow build their u-target from du/dt; flow matching has no u-head to differentiate."""
        return self.name != "flow_matching"

    @property
    def guidance(self) -> bool:
        return not (self.cfg_w == 1.0 and self.cfg_k == 0.0)


@dataclass(config=_SECTION)
class JvpConfig:
    """How du/dt (the u-head's derivative along the flow) is computed: runtime knobs, not the method's."""

    # auto is settled when the config loads (Config below), so the saved config names the estimator used.
    estimator: Literal["auto", "jvp", "dual", "finite_difference"] = doc(
        "auto", "jvp (torch.func) | dual (forward-mode dual numbers) | finite_difference | auto: "
                "finite_difference under distributed.zero_stage 3, else jvp")
    fd_step: Positive = doc(5e-3, "step h of the finite-difference estimator (along the trajectory, back in t)")
    compile_jvp: AutoAlwaysNever = doc("auto", "torch.compile the jvp estimator's pass: auto (on CUDA) | always | never")


@dataclass(config=_SECTION)
class DataConfig:
    """The training data: a latent folder written by `dumo-ray precompute` (Parquet shards + manifest.json),
    read by both launchers. The digits demo is such a folder too (`dumo-ray digits-tree` + `precompute`)."""

    path: Str = doc("", "the latent folder (the --output of `dumo-ray precompute`)")
    use_flips: Bool = doc(True, "also train on the rows with flip=True (the mirrored images' encodings)")
    normalize: Literal["manifest", "scale", "none"] = doc(
        "manifest", "manifest: per-channel mean/std of the manifest | scale: z * latent_scale | none: as stored")
    latent_scale: Positive = doc(0.18215, "the factor of normalize=scale")
    shuffle_buffer: Count = doc(4096, "rows in each worker's seeded local shuffle buffer")
    # auto: the digits demo yes, ImageNet latents no.
    cache: AutoAlwaysNever = doc("auto", "keep the decoded dataset in Ray's object store instead of rereading Parquet "
                               "every epoch: auto (under 2 GiB) | always | never")


@dataclass(config=_SECTION)
class DistributedConfig:
    """How `dumo-ray train` runs: Ray Train workers with DeepSpeed ZeRO, or one local process."""

    launcher: Literal["ray", "local"] = doc("ray", "ray: TorchTrainer + DeepSpeed ZeRO | local: this process, plain PyTorch, no Ray")
    address: Optional[Str] = doc(None, "Ray cluster address; null: RAY_ADDRESS or a new local Ray")
    # Elastic: Ray Train starts with as many workers as the cluster can host (up to max), restarts with
    # fewer (>= min) when a node is lost, and scales back up when nodes return.
    num_workers: Workers = doc(1, "N, or [min, max] for elastic training")
    elastic_resize_interval_s: NonNegative = doc(60.0, "how often a running elastic group checks for room to grow")
    worker_resources: dict[Str, Number] = doc({}, "extra custom Ray resources per worker")
    use_gpu: Optional[Bool] = doc(None, "null: use GPUs when the cluster has them")
    cpus_per_worker: NonNegative = doc(1.0, "CPUs reserved per worker (also its torch threads)")
    gpus_per_worker: NonNegative = doc(1.0, "GPUs per worker when GPUs are used")
    zero_stage: Annotated[Int, _rule(lambda v: v in (1, 2, 3), "must be 1, 2 or 3")] = doc(2, "DeepSpeed ZeRO stage")
    max_failures: Annotated[Int, _rule(lambda v: v >= -1, "must be >= -1 (-1: unlimited)")] = doc(
        3, "worker restarts (from the last checkpoint) before the run fails; -1: unlimited")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = doc(
        "PACK", "Ray placement group strategy of the workers")
    max_nonfinite_steps: PositiveInt = doc(20, "consecutive NaN/Inf steps tolerated (skipped) before stopping")

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


@dataclass(config=_SECTION)
class TrackingConfig:
    """MLflow. Locally a sqlite store (MLflow >= 3.13 refuses `file:` stores); on a cluster an http:// server."""

    enabled: Bool = doc(True, "log params, metrics, sample grids and the EMA export to MLflow")
    uri: Str = doc("sqlite:///mlflow.db", "MLflow tracking URI: sqlite:///path.db or http://host:port")
    experiment: Str = doc("dumo-ray", "MLflow experiment name")
    parent_run_id: Optional[Str] = doc(None, "set by `dumo-ray tune`: the trial's run is a child of the sweep's run")

    def __post_init__(self) -> None:
        _check(not self.uri.startswith("file:") and not self.uri.startswith("/"),
               f"tracking.uri {self.uri!r}: MLflow >= 3.13 refuses file stores; use sqlite:///path.db or http://host:port")


@dataclass(config=_SECTION)
class OptimConfig:
    """Adam(0.9, 0.95), lr 1e-4 constant, no weight decay, global batch 256, EMA 0.9999, clip 1.0."""

    lr: Positive = doc(1e-4, "Adam learning rate (constant)")
    beta1: Annotated[Number, _rule(lambda v: 0 <= v < 1, "must be in [0, 1)")] = doc(0.9, "Adam beta1")
    beta2: Annotated[Number, _rule(lambda v: 0 <= v < 1, "must be in [0, 1)")] = doc(0.95, "Adam beta2")
    weight_decay: NonNegative = doc(0.0, "AdamW weight decay")
    grad_clip: NonNegative = doc(1.0, "gradient norm clip; 0 disables clipping")
    batch_size: PositiveInt = doc(256, "global batch: images per optimizer step, whatever the number of workers")
    micro_batch_size: Optional[PositiveInt] = doc(
        None, "largest micro-batch a worker runs at once (more is accumulated); null: its whole share")
    ema_decay: Fraction = doc(0.9999, "EMA decay of the weights that sample and are exported")


@dataclass(config=_SECTION)
class TrainConfig:
    """Progress is counted in images; every interval is rounded up to a multiple of the global batch."""

    total_images: PositiveInt = doc(240 * 1_281_167, "training length in images (the default: 240 ImageNet epochs)")
    log_every_images: PositiveInt = doc(25_600, "status line, metrics and report interval")
    sample_every_images: Count = doc(0, "sample grid interval; 0: grids only at the end")
    checkpoint_every_images: PositiveInt = doc(1_280_000, "checkpoint interval")
    keep_checkpoints: PositiveInt = doc(3, "checkpoints kept (older ones are deleted)")
    storage_path: Str = doc("runs", "local dir, NFS path or s3:// / gs:// URI; the run lives in storage_path/name")
    name: Annotated[Str, _rule(_plain_name, "must be a plain name (one folder inside train.storage_path: "
                                            "no '/' or '\\', not '.' or '..')")] = doc(
        "dumo", "run name; rerunning with the same storage_path and name resumes the run")
    seed: Int = doc(0, "seed of all randomness (per rank, step and purpose) and the data order")
    device: Literal["auto", "cpu", "cuda"] = doc("auto", "the local launcher's device: auto | cpu | cuda")
    precision: Literal["auto", "fp32", "bf16"] = doc("auto", "auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")
    sample_steps: Steps = doc([1, 2], "sampling steps of the sample grids")
    sample_mid_time: Annotated[Number, _rule(lambda v: 0 < v < 1, "must be in (0, 1)")] = doc(
        0.5, "intermediate time of 2-step sampling")
    num_sample_images: PositiveInt = doc(100, "images in each sample grid (at most a 10 x 10 grid is drawn)")


INCEPTION_WEIGHTS_ENV = "DUMO_INCEPTION_WEIGHTS"


@dataclass(config=_SECTION)
class EvalConfig:
    """In-training evaluation: Frechet distance of EMA samples (fd_1step, ...), logged and reported.

    The EMA weights sample a fixed, class-balanced set (per-index seeds and labels, the same at every
    evaluation and whatever the number of workers), and the Frechet distance to the reference (plus class
    accuracy for the digits, Inception Score for Inception features) is logged to MLflow and reported to
    Ray Train (`fd_1step`, `fd_2step`, ...), so sweeps can rank on it."""

    every_images: Count = doc(0, "0: evaluate only at the end; otherwise a multiple of train.log_every_images")
    num_images: PositiveInt = doc(1000, "size of the fixed evaluation set (shared out over the workers)")
    steps: Annotated[Steps, _rule(bool, "must not be empty")] = doc([1, 2], "sampling steps scored (fd_1step, ...)")
    euler_steps: Steps = doc([], "also score the v-head integrated with this many Euler steps (fd_euler50, ...)")
    features: Literal["auto", "digits", "fashion", "inception", "none"] = doc(
        "auto", "auto: inception when eval.reference is set, else none; digits / fashion: FD-digits / FD-fashion")
    reference: Str = doc("", "ADM-style reference .npz (mu, sigma) for inception features")
    inception_weights: Str = doc("", f"local Inception-v3 weights file; empty: ${INCEPTION_WEIGHTS_ENV}")
    chunk: PositiveInt = doc(64, "network batch while sampling (fixed, so results do not depend on the split)")


@dataclass(config=_SECTION)
class Config:
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    jvp: JvpConfig = Field(default_factory=JvpConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(self.optim.batch_size >= self.distributed.max_workers,
               f"optim.batch_size {self.optim.batch_size} is smaller than distributed.num_workers "
               f"{self.distributed.num_workers}: every worker needs at least one image per step")
        # ZeRO-3's partitioned parameters pass through autograd Functions without a forward-mode rule:
        # only the finite-difference estimator runs there. Settled here, so the saved config says so.
        zero3 = self.distributed.zero_stage == 3 and self.objective.needs_jvp
        if self.jvp.estimator == "auto":
            self.jvp = dataclasses.replace(self.jvp, estimator="finite_difference" if zero3 else "jvp")
        _check(not zero3 or self.jvp.estimator == "finite_difference",
               f"jvp.estimator {self.jvp.estimator!r} does not run under distributed.zero_stage 3 (partitioned "
               "parameters have no forward-mode derivative): set jvp.estimator=finite_difference (or auto), "
               "or distributed.zero_stage=2")

    @property
    def run_dir(self) -> str:
        return f"{self.train.storage_path.rstrip('/')}/{self.train.name}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. for MLflow params."""
        return {f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()}


# ---------------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> validated dataclasses; pydantic's errors -> one line naming the field

# Keys that left the config: an old YAML gets told where they went, not just "unknown key".
MOVED = {
    "objective.estimator": "moved to jvp.estimator",
    "objective.fd_step": "moved to jvp.fd_step",
    "objective.compile_jvp": "moved to jvp.compile_jvp",
    "data.source": "is gone: both launchers read a latent folder (data.path); the digits demo is one too "
                   "(`dumo-ray digits-tree` + `dumo-ray precompute --vae none --grayscale`)",
    "train.fail_once_at_images": "is no longer a config key: the fault drill is a test hook, the environment "
                                 "variable DUMO_RAY_FAIL_ONCE_AT_IMAGES=N",
}

_TYPE_ERRORS = {
    "int_type": "must be an integer", "int_from_float": "must be an integer",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "bool_type": "must be true or false", "string_type": "must be a string", "list_type": "must be a list",
    "dict_type": "must be a mapping", "dataclass_type": "must be a mapping",
}


def _section_keys(loc: tuple) -> list[str]:
    cls = Config
    for part in loc:
        cls = cls.__pydantic_fields__[part].annotation
    return sorted(cls.__pydantic_fields__)


def _explain(error: dict[str, Any]) -> str:
    """One pydantic error as one line in our words, starting with the dotted field name."""
    ctx = error.get("ctx") or {}
    if isinstance(ctx.get("error"), ConfigError):  # a check across fields: its message names them
        return str(ctx["error"])
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    kind, got = error["type"], error["input"]
    if kind == "unexpected_keyword_argument":
        if key in MOVED:
            return f"{key} {MOVED[key]}"
        return f"unknown config key {key} (known: {', '.join(_section_keys(error['loc'][:-1]))})"
    if kind == "literal_error":
        return f"{key} must be one of {ctx['expected'].replace(chr(39), '').replace(' or ', ', ')}; got {got!r}"
    text = str(ctx["error"]) if kind == "value_error" else _TYPE_ERRORS.get(kind, error["msg"])
    return f"{key} {text}, got {got!r}"


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
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {_yaml_problem(err, raw)}") from None
    nested: dict[str, Any] = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def check_consistency(cfg: Config) -> None:
    """What a run needs across sections (each section, and Config, check their own fields when built)."""
    _check(bool(cfg.data.path), "data.path must name a latent folder (the --output of `dumo-ray precompute`)")
    every = cfg.eval.every_images
    _check(every % cfg.train.log_every_images == 0,
           f"eval.every_images ({every}) must be a multiple of train.log_every_images ({cfg.train.log_every_images}): "
           "evaluations are reported with the status line")
    if cfg.eval.features == "inception":
        _check(bool(cfg.eval.reference), "eval.features 'inception' needs eval.reference: an ADM-style reference .npz "
               "(mu, sigma), e.g. VIRTUAL_imagenet256_labeled.npz, or one written by `dumo-ray evaluate --save-reference`")
    judged = {"digits": (8, "pixel-space digits"), "fashion": (32, "pixel-space Fashion-MNIST")}
    if resolved_eval_features(cfg) in judged:
        m, (size, what) = cfg.model, judged[resolved_eval_features(cfg)]
        _check((m.input_size, m.in_channels, m.num_classes) == (size, 1, 10),
               f"eval.features '{cfg.eval.features}' judges {size}x{size} one-channel images of 10 classes ({what}); "
               f"this model makes {m.input_size}x{m.input_size}x{m.in_channels} of {m.num_classes} classes")


def resolved_eval_features(cfg: Config) -> str:
    """eval.features with `auto` resolved: inception when a reference is set, else none."""
    if cfg.eval.features != "auto":
        return cfg.eval.features
    return "inception" if cfg.eval.reference else "none"


def upgrade_saved(values: dict[str, Any]) -> dict[str, Any]:
    """A config saved before the `jvp` section (an older export or checkpoint), in today's keys. The old
    worker switched jvp/dual to finite differences under ZeRO-3 at run time; `auto` does that now."""
    values = {key: dict(value) if isinstance(value, dict) else value for key, value in values.items()}
    objective, train = values.get("objective", {}), values.get("train", {})
    moved = {key: objective.pop(key) for key in ("estimator", "fd_step", "compile_jvp") if key in objective}
    train.pop("fail_once_at_images", None)
    values.get("data", {}).pop("source", None)
    if moved:
        jvp = values["jvp"] = {**moved, **values.get("jvp", {})}
        if values.get("distributed", {}).get("zero_stage") == 3 and jvp.get("estimator") in ("jvp", "dual"):
            jvp["estimator"] = "auto"
    return values


def config_from_dict(values: dict[str, Any], *, check: bool = True, saved: bool = False) -> Config:
    """Validated Config from nested dicts. check: also the cross-section needs of a run (check_consistency);
    saved: a stored config that may predate today's keys (upgrade_saved)."""
    try:
        cfg = Config(**(upgrade_saved(values) if saved else values))
    except ValidationError as err:
        raise ConfigError(_explain(err.errors()[0])) from None
    if check:
        check_consistency(cfg)
    return cfg


def _line_column(text: str | bytes, index: int) -> str:
    newline = b"\n" if isinstance(text, bytes) else "\n"
    return f"line {text.count(newline, 0, index) + 1}, column {index - (text.rfind(newline, 0, index) + 1) + 1}"


def _yaml_problem(err: yaml.YAMLError, text: str) -> str:
    """PyYAML's multi-line message as one line: where (from its mark, 1-based) and what."""
    mark, context_mark = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
    if isinstance(err, yaml.reader.ReaderError):  # a character YAML does not allow (e.g. NUL)
        where, what = _line_column(text, err.position), str(err).splitlines()[0]
    else:
        mark = mark or context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        if context:
            started = (f" at line {context_mark.line + 1}, column {context_mark.column + 1}"
                       if context_mark is not None and context_mark is not mark else "")
            what = f"{what} ({context}{started})"
    return f"{where}: {what}".replace("\n", " ")


def _read_yaml(path: Path) -> Any:
    """The file parsed as YAML; a file that is not UTF-8 text or not YAML is one ConfigError naming the file and
    the position, instead of PyYAML's multi-line traceback."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at "
                          f"{_line_column(data, err.start)}): is it a YAML config?") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err, text)}") from None


def read_values(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The YAML file's values with the dotted overrides merged in, not yet validated: what the user set."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        _check(path.is_file(), f"config file {path} does not exist")
        loaded = _read_yaml(path) or {}
        _check(isinstance(loaded, dict), f"config file {path} must hold a mapping at the top level")
        values = loaded
    for text in overrides:
        values = _merge(values, parse_override(text))
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                saved: bool = False) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated. Raises ConfigError naming the bad field."""
    return config_from_dict(read_values(path, overrides), saved=saved)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------------
# `dumo-ray config`: the resolved config with each field's doc and default


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def describe_config(cfg: Config, explicit: dict[str, Any] | None = None) -> str:
    """`cfg` as YAML that loads back, each field followed by `# doc (default D)`. `*` marks a value that
    differs from its default; an `auto` default the user left alone shows the value it resolved to,
    unmarked. `explicit`: the values the user set (read_values), to tell the two apart."""
    explicit = explicit or {}
    lines = ["# values marked * differ from their default"]
    for section in dataclasses.fields(Config):
        part = getattr(cfg, section.name)
        lines.append(f"{section.name}:  # {type(part).__doc__.strip().splitlines()[0]}")
        set_here = explicit.get(section.name) if isinstance(explicit.get(section.name), dict) else {}
        for name, info in type(part).__pydantic_fields__.items():
            value, default = getattr(part, name), info.get_default(call_default_factory=True)
            changed = value != default and not (default == "auto" and name not in set_here)
            entry = f"  {name}: {_yaml_value(value)}"
            lines.append(f"{entry:<36} # {'*' if changed else ' '} {info.description} (default {_yaml_value(default)})")
    return "\n".join(lines)
