"""The core primitive: the network's outputs and the total derivative of u along the flow.

MeanFlow identity: u(x_t, r, t) = v(x_t, t) - (t - r) * d/dt u(x_t, r, t), where
d/dt u = (du/dx) . v + du/dt is a Jacobian-vector product with tangent (v, 0, 1) on (x, r, t).
The tangent on r is 0: r is held fixed while t moves (the model sees t and t - r, so moving t moves
both embeddings, which autodiff handles).

Estimators:
- `jvp` (default): forward-mode AD with torch.func.jvp in fp32. Without autocast one pass yields
  (v, u) with their graph and dudt; under bf16 autocast the JVP runs separately in fp32 under no-grad
  and the main pass in bf16 (method.md section 7). The fused SDPA kernels have no forward-mode derivative, so the
  JVP runs with the math attention kernel; the plain forward elsewhere keeps the fast kernel.
- `dual`: the same derivative through dual numbers (torch.autograd.forward_ad) instead of functorch's
  transform; same cost on our benchmark, kept as a fallback where torch.func cannot trace a module.
- `finite_difference`: [u(x_t, r, t) - u(x_t - h*tau, r, t - h)] / h under no-grad; works where
  forward-mode AD does not (e.g. DeepSpeed ZeRO-3).

The JVP stays in fp32 under bf16 autocast: measured on an H200 (benchmarks/profile_jvp.py), an eager bf16
JVP of DuMo-XL/2 is only 12% faster (its time is in unfused elementwise tangent ops, not in matmuls),
not worth its lost precision. Those elementwise tangent ops are what `torch.compile` fuses:
`compile_jvp` (auto = on CUDA) runs the `jvp` estimator's pass, without a graph, through a compiled
function (compiled once per model and input shape; the first step pays the compile). The compiled
function belongs to whoever owns the `CompiledDudt` (each objective has its own): no process-wide state.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dumo_ray.flow.path import broadcast_time


def math_attention():
    """Selects torch's math SDPA kernel, the one with a forward-mode derivative."""
    return sdpa_kernel([SDPBackend.MATH])


def autocast_off(device_type: str):
    """The JVP stays in its inputs' precision (fp32) inside a bf16 autocast region: fp16/bf16 JVPs go NaN."""
    return torch.autocast(device_type=device_type, enabled=False)


def _jvp_forward_ad(fn, primals, tangents):
    """torch.func.jvp's contract (outputs, output tangents) computed with dual tensors."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, tan) for p, tan in zip(primals, tangents)]
        unpacked = [fwAD.unpack_dual(o) for o in fn(*duals)]
    return tuple(o.primal for o in unpacked), tuple(o.tangent for o in unpacked)


JVP_BACKENDS = {"jvp": torch.func.jvp, "dual": _jvp_forward_ad}


def dudt_pass(model: nn.Module, x_t, t, r, y, tangent, jvp=torch.func.jvp) -> torch.Tensor:
    """d/dt u along (tangent, 0, 1), without a graph for the outputs; the caller sets no-grad and precision."""
    with math_attention():
        _, (_, dudt) = jvp(lambda x, t_: model(x, t_, r, y), (x_t, t), (tangent.to(x_t.dtype), torch.ones_like(t)))
    return dudt


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """||result - reference|| / ||reference||: the measure for two passes that sum in different orders.
    Reordering moves single elements by up to the rounding of their largest summands, which can be large
    next to an element that cancels to near 0, so elementwise tolerances are at the mercy of one CPU's
    kernels; the norm of the difference is not."""
    return float((result - reference).detach().norm()) / max(float(reference.detach().norm()), 1e-30)


class CompiledDudt:
    """`dudt_pass` through torch.compile (made on first use), checked once against the eager pass.

    A compiler fault here would corrupt every flow-map target without any error, so the first call with
    a non-zero derivative (at initialisation the zero-initialised u-head makes dudt exactly 0, which
    proves nothing) also runs the eager pass: a relative difference above `tolerance` (TF32 and kernel
    order account for ~1e-4; a wrong graph for O(1)) or a non-finite value turns compiling off for this
    process, with a warning. So does a compile that fails (e.g. no C compiler for Triton on the node):
    the run goes on at the eager pass's speed instead of stopping."""

    tolerance = 1e-2

    def __init__(self):
        self.compiled = None
        self.verified = False
        self.disabled = False

    def __call__(self, model: nn.Module, x_t, t, r, y, tangent) -> torch.Tensor:
        if self.disabled:
            return dudt_pass(model, x_t, t, r, y, tangent)
        if self.compiled is None:
            self.compiled = torch.compile(dudt_pass, dynamic=False)
        try:
            dudt = self.compiled(model, x_t, t, r, y, tangent)
        except Exception as error:  # torch.compile's failures have many types (dynamo, inductor, Triton)
            self.disabled = True
            warnings.warn(f"jvp.compile_jvp: compiling the JVP failed ({type(error).__name__}: "
                          f"{str(error)[:300]}); using the eager pass in this process")
            return dudt_pass(model, x_t, t, r, y, tangent)
        if not self.verified:
            eager = dudt_pass(model, x_t, t, r, y, tangent)
            if eager.any() or not torch.isfinite(dudt).all():
                error = relative_error(dudt, eager)
                self.verified = True
                if not error <= self.tolerance:  # also catches NaN
                    self.disabled = True
                    warnings.warn(f"jvp.compile_jvp: the compiled JVP differs from the eager one (relative "
                                  f"error {error:.3g} > {self.tolerance}); using the eager pass in this process")
                    return eager
        return dudt


def resolve_compile_jvp(setting: str, device: torch.device) -> bool:
    """`jvp.compile_jvp`: always | never | auto (on CUDA, where the fused kernels pay off; the CPU
    keeps the eager pass, whose compile takes minutes for a gain of ~1.5x)."""
    return setting == "always" or (setting == "auto" and device.type == "cuda")


def u_and_dudt(
    model: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    y: torch.Tensor,
    tangent: torch.Tensor,
    *,
    estimator: str = "jvp",
    fd_step: float = 5e-3,
    compile_jvp: str = "never",
    compiled_dudt: CompiledDudt | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (v, u, dudt); v and u carry gradients, dudt is the derivative along (tangent, 0, 1) and
    carries none. `model` is the module to differentiate (the training backend unwraps its engine);
    `compiled_dudt` is the caller's compiled pass, used when `compile_jvp` resolves to on."""
    if estimator in JVP_BACKENDS:
        jvp = JVP_BACKENDS[estimator]
        compiled = estimator == "jvp" and resolve_compile_jvp(compile_jvp, x_t.device)
        if compiled and compiled_dudt is None:
            raise ValueError("compile_jvp is on but no CompiledDudt was given (the objective owns one)")
        if compiled or torch.is_autocast_enabled(x_t.device.type):
            # Mixed precision or compiled: the main pass as the caller set it (bf16 autocast: fast kernels),
            # the JVP without a graph (dudt is a stop-gradient target, so its pass needs no backward), in
            # fp32.
            with torch.no_grad(), autocast_off(x_t.device.type):
                if compiled:
                    dudt = compiled_dudt(model, x_t, t, r, y, tangent)
                else:
                    dudt = dudt_pass(model, x_t, t, r, y, tangent, jvp)
            v, u = model(x_t, t, r, y)
            return v, u, dudt
        primals, tangents = (x_t, t), (tangent.to(x_t.dtype), torch.ones_like(t))
        # fp32: one pass gives the outputs with their graph and the tangent (JVP + backward costs ~2x
        # forward + backward, less than a separate forward and JVP).
        with math_attention():
            (v, u), (_, dudt) = jvp(lambda x, t_: model(x, t_, r, y), primals, tangents)
        return v, u, dudt.detach()
    if estimator == "finite_difference":
        v, u = model(x_t, t, r, y)
        # Step back along the trajectory by h, never below t = 0 (h shrinks near the data end).
        h = torch.clamp(torch.minimum(torch.full_like(t, fd_step), t), min=1e-6)
        with torch.no_grad():
            _, u_prev = model(x_t - broadcast_time(h, x_t) * tangent, t - h, r, y)
        dudt = (u.detach() - u_prev) / broadcast_time(h, x_t)
        return v, u, dudt
    raise ValueError(f"unknown derivative estimator {estimator!r}; use 'jvp', 'dual' or 'finite_difference'")

