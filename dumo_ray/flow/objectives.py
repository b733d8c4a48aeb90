"""The three training objectives (method.md section 3) as callable classes.

Each is called as `loss, terms = objective(model, batch, generator, images=seen)` with `batch = {"x0":
(N, C, H, W), "y": (N,)}` and `seen` the training images so far (for the schedules); `loss` is the scalar
to back-propagate and `terms` a dict of detached scalars to log. The training loop never knows which
objective it runs.

- `dumo` (default, reconstructed): every sample trains both heads. L_v on the v-head, L_u on the
  u-head with the MeanFlow identity target built from the JVP of the u-head along (tau, 0, 1),
  tau = stopgrad(v_hat) by default.
- `meanflow`: one output (the u-head), 75% of the batch with r = t, tangent (v_target, 0, 1).
- `flow_matching`: velocity only; the multi-step reference.

Both losses are adaptively weighted, L -> L / stopgrad((L + c)^p) with L the per-sample sum of squared
errors. The weighted loss sits near 1 whatever happens, so the unweighted MSEs are logged too.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from dumo_ray.config import JvpConfig, ObjectiveConfig
from dumo_ray.flow.jvp import CompiledDudt, u_and_dudt
from dumo_ray.flow.path import TimeSampler, broadcast_time, conditional_velocity, interpolate


def per_sample_sse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors per sample, in fp32: (N, ...) -> (N,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).sum(dim=1)


def adaptive_weighted(sse: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """L / stopgrad((L + c)^p), per sample. p = 0 gives back the plain loss."""
    return sse / (sse.detach() + c).pow(p)


def ramp(images: int, length: int) -> float:
    """0 -> 1 linearly over the first `length` training images; 1 throughout when length is 0."""
    return 1.0 if length <= 0 else min(1.0, images / length)


@dataclass
class NoisedBatch:
    """One training batch after the objective's randomness: labels dropped, times and noise drawn."""

    x0: torch.Tensor
    y: torch.Tensor  # labels after class dropout
    dropped: torch.Tensor  # bool (N,): label replaced by the null class
    t: torch.Tensor
    r: torch.Tensor
    x_t: torch.Tensor
    v_t: torch.Tensor  # conditional velocity e - x0

    def first(self, k: int) -> "NoisedBatch":
        """The first k rows (rows are exchangeable: their times and noise are independent draws)."""
        return NoisedBatch(*(getattr(self, f.name)[:k] for f in fields(self)))


class Objective:
    """Shared pieces: class dropout, noise, time sampling and the guided velocity target."""

    def __init__(self, cfg: ObjectiveConfig, num_classes: int, jvp: JvpConfig | None = None):
        self.cfg = cfg
        # How du/dt is computed (estimator, fd_step, compile_jvp); without a config: torch.func's JVP.
        jvp = jvp if jvp is not None else JvpConfig(estimator="jvp")
        if jvp.estimator == "auto":
            raise ValueError("jvp.estimator 'auto' is settled when the config loads (it depends on "
                             "distributed.zero_stage): pass the loaded Config's jvp section, or name the estimator")
        self.jvp_options = dict(estimator=jvp.estimator, fd_step=jvp.fd_step, compile_jvp=jvp.compile_jvp,
                                compiled_dudt=CompiledDudt())  # this objective's own compiled pass (made on first use, if on)
        self.null_class = num_classes
        self.times = TimeSampler(cfg.time_sampler, cfg.time_mean, cfg.time_std,
                                 cfg.resolved_equal_fraction, cfg.zero_fraction, cfg.r_mean, cfg.r_std)

    def draw(self, batch: dict[str, torch.Tensor], generator: torch.Generator, images: int = 0) -> NoisedBatch:
        x0, y = batch["x0"].float(), batch["y"]
        n, device = x0.shape[0], x0.device
        dropped = torch.rand(n, generator=generator, device=device) < self.cfg.class_dropout
        y = torch.where(dropped, torch.full_like(y, self.null_class), y)
        t, r = self.sample_times(n, generator, device)
        cap = self.interval_cap(images)
        if cap < 1.0:
            r = torch.maximum(r, t - cap)
        e = torch.randn(x0.shape, generator=generator, device=device)
        return NoisedBatch(x0, y, dropped, t, r, interpolate(x0, e, t), conditional_velocity(x0, e))

    def interval_cap(self, images: int) -> float:
        """The interval curriculum's cap on t - r after `images` training images (1: no cap)."""
        return self.cfg.interval_cap_start + (1.0 - self.cfg.interval_cap_start) * ramp(images, self.cfg.interval_curriculum_images)

    def lambda_u(self, images: int) -> float:
        return self.cfg.lambda_u * ramp(images, self.cfg.lambda_u_warmup_images)

    def sample_times(self, n: int, generator: torch.Generator, device: torch.device):
        return self.times(n, generator, device)

    def guided_rows(self, nb: NoisedBatch) -> torch.Tensor:
        """bool (N,): the rows whose velocity target is guided: t inside [cfg_t_lo, cfg_t_hi], label kept."""
        return (nb.t >= self.cfg.cfg_t_lo) & (nb.t <= self.cfg.cfg_t_hi) & ~nb.dropped

    def guided_target(self, nb: NoisedBatch, v_c: torch.Tensor | None, v_n: torch.Tensor | None) -> torch.Tensor:
        """w * v_t + k * v_c + (1 - w - k) * v_n inside the time window; plain v_t elsewhere and for
        samples whose label was dropped (their rows of v_c / v_n are never read)."""
        if v_c is None:
            return nb.v_t
        w, k = self.cfg.cfg_w, self.cfg.cfg_k
        guided = w * nb.v_t + k * v_c.float() + (1 - w - k) * v_n.float()
        return torch.where(broadcast_time(self.guided_rows(nb), nb.v_t), guided, nb.v_t)

    @staticmethod
    def flow_map_target(nb: NoisedBatch, v_target: torch.Tensor, dudt: torch.Tensor) -> torch.Tensor:
        """The MeanFlow identity as a stop-gradient target: u_tgt = v_tgt - clip(t - r, 0, 1) * du/dt."""
        interval = broadcast_time((nb.t - nb.r).clamp(0.0, 1.0), dudt)
        return (v_target - interval * dudt).detach()

    @torch.no_grad()
    def label_and_null_predictions(self, model: nn.Module, nb: NoisedBatch, r: torch.Tensor, head: int,
                                   every_row_labelled: bool = False):
        """No-grad predictions of one head with the batch labels (v_c) and with the null label (v_n), in
        one pass (the fast attention kernel) over only the rows that need them: v_n for the guided rows
        (in the window, label kept; ~80% of a batch under the defaults), v_c for those too or, with
        `every_row_labelled` (DuMo's tangent is v_c), for every row. Other rows of v_c / v_n are 0 and
        never read (guided_target selects v_t there). Rows are independent in the model (no batch
        statistics), so a row's prediction is the one the full 2N pass gives, up to the rounding of a
        differently blocked matmul.

        Finding the rows costs one device-to-host sync (`nonzero`), and the pass's batch size changes
        from step to step: fine eagerly (this pass is not compiled; only the JVP is, at a fixed shape). A
        compiled main pass must keep this call outside its graph, or compile it with dynamic shapes."""
        guided = self.guided_rows(nb).nonzero().squeeze(1)  # (M,) row indices
        labelled = torch.arange(len(nb.t), device=guided.device) if every_row_labelled else guided
        v_c, v_n = torch.zeros_like(nb.v_t), torch.zeros_like(nb.v_t)
        if len(labelled) == 0:  # no row guided and none needs v_c: nothing to run
            return v_c, v_n
        rows = torch.cat([labelled, guided])
        y = torch.cat([nb.y[labelled], nb.y.new_full((len(guided),), self.null_class)])
        out = model(nb.x_t[rows], nb.t[rows], r[rows], y)[head].float()  # (len(labelled) + M, C, H, W)
        v_c.index_copy_(0, labelled, out[:len(labelled)])
        v_n.index_copy_(0, guided, out[len(labelled):])
        return v_c, v_n

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, images: int = 0):
        """`images`: training images seen so far, for the schedules (interval curriculum, warm-ups)."""
        raise NotImplementedError


class DuMoObjective(Objective):
    """Both heads from one input, every sample (method.md 3.1, reconstructed)."""

    def tangent_share_of_v_hat(self, images: int) -> float:
        """How much of the tangent is the v-head's prediction (the rest is the velocity target)."""
        return {"v_hat": 1.0, "v_target": 0.0}.get(self.cfg.tangent, ramp(images, self.cfg.tangent_blend_images))

    def u_rows(self, n: int) -> int:
        """How many of a micro-batch's n rows train the u-head (at least one)."""
        return n if self.cfg.u_fraction >= 1.0 else max(1, round(self.cfg.u_fraction * n))

    def __call__(self, model, batch, generator, images=0):
        cfg = self.cfg
        nb = self.draw(batch, generator, images)
        share = self.tangent_share_of_v_hat(images)
        # The v-head is queried for the tangent (and the guidance predictions) at the sample's r or at r = t.
        r_query = nb.t if cfg.tangent_query == "r_equals_t" else nb.r
        v_c = v_n = None
        if cfg.guidance:
            v_c, v_n = self.label_and_null_predictions(model, nb, r_query, head=0, every_row_labelled=share > 0)
        elif share > 0:
            with torch.no_grad():
                v_c = model(nb.x_t, nb.t, r_query, nb.y)[0].float()
        v_target = self.guided_target(nb, v_c, v_n) if cfg.guidance else nb.v_t
        # v_c is the v-head at the batch's own labels, i.e. stopgrad(v_hat): the velocity head
        # supplies the tangent that bounds the flow-map head.
        tangent = v_target if share == 0 else v_c if share == 1 else share * v_c + (1 - share) * v_target
        # The u-loss (and its JVP, the dear part of the step) on the first u_fraction of the rows; the
        # v-loss on all of them, the other rows' v-head from a plain forward pass.
        k = self.u_rows(len(nb.t))
        head = nb.first(k)
        v_hat, u_hat, dudt = u_and_dudt(model, head.x_t, head.t, head.r, head.y, tangent[:k], **self.jvp_options)
        if k < len(nb.t):
            v_rest, _ = model(nb.x_t[k:], nb.t[k:], nb.r[k:], nb.y[k:])
            v_hat = torch.cat([v_hat, v_rest])
        identity_v = tangent if cfg.identity_velocity == "tangent" else v_target
        u_target = self.flow_map_target(head, identity_v[:k], dudt)
        sse_v, sse_u = per_sample_sse(v_hat, v_target), per_sample_sse(u_hat, u_target)
        loss_v = adaptive_weighted(sse_v, cfg.resolved_adaptive_p_v, cfg.adaptive_c_v).mean()
        loss_u = adaptive_weighted(sse_u, cfg.resolved_adaptive_p_u, cfg.adaptive_c_u).mean()
        loss = cfg.lambda_v * loss_v + self.lambda_u(images) * loss_u
        dim = v_hat[0].numel()
        terms = {"loss_v": loss_v.detach(), "loss_u": loss_u.detach(),
                 "mse_v": sse_v.detach().mean() / dim, "mse_u": sse_u.detach().mean() / dim}
        if cfg.lambda_boundary > 0:
            # The u-head's boundary: u(x_t, t, t) is the velocity itself.
            _, u_boundary = model(nb.x_t, nb.t, nb.t, nb.y)
            sse_b = per_sample_sse(u_boundary, v_target)
            loss_b = adaptive_weighted(sse_b, cfg.resolved_adaptive_p_u, cfg.adaptive_c_u).mean()
            loss = loss + cfg.lambda_boundary * loss_b
            terms.update(loss_boundary=loss_b.detach(), mse_boundary=sse_b.detach().mean() / dim)
        return loss, {"loss": loss.detach(), **terms}


class MeanFlowObjective(Objective):
    """One input, one output: the u-head alone, r = t for 75% of the batch (method.md 3.2)."""

    def __call__(self, model, batch, generator, images=0):
        cfg = self.cfg
        nb = self.draw(batch, generator, images)
        if cfg.guidance:
            # u(x_t, t, t) is the velocity: guidance predictions come from the u-head at r = t.
            v_c, v_n = self.label_and_null_predictions(model, nb, nb.t, head=1)
            v_target = self.guided_target(nb, v_c, v_n)
        else:
            v_target = nb.v_t
        _, u_hat, dudt = u_and_dudt(model, nb.x_t, nb.t, nb.r, nb.y, v_target, **self.jvp_options)
        u_target = self.flow_map_target(nb, v_target, dudt)
        sse_u = per_sample_sse(u_hat, u_target)
        loss_u = adaptive_weighted(sse_u, cfg.resolved_adaptive_p_u, cfg.adaptive_c_u).mean()
        loss = self.lambda_u(images) * loss_u
        return loss, {"loss": loss.detach(), "loss_u": loss_u.detach(), "mse_u": sse_u.detach().mean() / u_hat[0].numel()}


class FlowMatchingObjective(Objective):
    """Velocity only, r ignored (fed as r = t); sampled with many Euler steps (method.md 3.3)."""

    def sample_times(self, n, generator, device):
        t = self.times.base(n, generator, device)
        return t, t.clone()

    def __call__(self, model, batch, generator, images=0):
        cfg = self.cfg
        nb = self.draw(batch, generator, images)
        v_c = v_n = None
        if cfg.guidance:
            v_c, v_n = self.label_and_null_predictions(model, nb, nb.r, head=0)
        v_target = self.guided_target(nb, v_c, v_n)
        v_hat, _ = model(nb.x_t, nb.t, nb.r, nb.y)
        sse_v = per_sample_sse(v_hat, v_target)
        loss_v = adaptive_weighted(sse_v, cfg.resolved_adaptive_p_v, cfg.adaptive_c_v).mean()
        loss = cfg.lambda_v * loss_v
        return loss, {"loss": loss.detach(), "loss_v": loss_v.detach(), "mse_v": sse_v.detach().mean() / v_hat[0].numel()}


OBJECTIVES: dict[str, type[Objective]] = {
    "dumo": DuMoObjective,
    "meanflow": MeanFlowObjective,
    "flow_matching": FlowMatchingObjective,
}


def build_objective(cfg: ObjectiveConfig, num_classes: int, jvp: JvpConfig | None = None) -> Objective:
    """`jvp`: the loaded Config's jvp section (its estimator resolved); None: torch.func's JVP, defaults."""
    return OBJECTIVES[cfg.name](cfg, num_classes, jvp)
