"""What one training step computes, in forward-equivalents, and the model FLOPs utilisation it implies.

Convention (used by step_cost.py's columns and checked by tests/test_step_accounting.py):
- FLOPs are matmul FLOPs (2 per multiply-add: every Linear, the patch convolution, and attention's
  Q K^T and P V), the ones tensor cores run; normalisation, activations and the optimizer are not counted.
- One forward-equivalent (F) is one forward of the whole batch. A backward is 2 F (gradients of the
  inputs and of the weights). A JVP pass computes the primal and its tangent: a Linear needs 2x, an
  attention matmul 3x (d(QK^T) = dQ K^T + Q dK^T), so J = (2 L + 3 A) / (L + A) F, 2.04 F for DuMo-XL/2
  at 256 tokens: the model FLOPs of the JVP, the ones MFU counts. PyTorch's eager forward-mode AD runs
  3 F: its formula for mm/addmm also multiplies by the weights' tangent, which is zero (FlopCounterMode
  counts it, and an eager Linear's JVP takes ~3.4x its forward on the CPU); whether torch.compile drops
  those products is for the GPU run to show (`jvp_forward_equivalents(..., executed=True)` gives 3).
  A guidance forward over m of the N rows is m / N F.
- What each objective runs (dumo_ray/flow/objectives.py and jvp.py):
    flow_matching: fwd + bwd (3) + guidance 2g
    meanflow:      JVP (J) + [fwd (1) when the main pass is separate] + bwd (2) + guidance 2g
    dumo:          the same main pass on the u_fraction f of the rows (f J, the rest a plain fwd), bwd (2),
                   guidance (g + g, or 1 + g when the tangent uses the v-head: v_c on every row), or without
                   guidance a tangent fwd (1) when the tangent uses the v-head; +3 with lambda_boundary
    finite_difference replaces J by one no-grad fwd (the main pass is then always separate).
  g is the fraction of rows whose target is guided (t in the guidance window, label kept: ~0.84 for flow
  matching and ~0.78 for dumo under the defaults), since the guidance pass runs on those rows only.
  "Separate main pass": under bf16 autocast or with the compiled JVP, the JVP runs without a graph in fp32
  and the main pass runs again with one (the GPU path); in eager fp32 one JVP pass gives both (the CPU).
- MFU = forward-equivalents x forward FLOPs per image x images/s / peak: the FLOPs the step really runs.
  mfu_3F counts 3 F per image whatever the objective (the FLOPs of a plain training step): the useful
  work per image trained, comparable across objectives.
"""
from __future__ import annotations

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets. The H200 SXM has
# the H100 SXM's Hopper GH100 tensor cores and clocks (only memory differs: 141 GB HBM3e, 4.8 TB/s), so
# the same 989 TFLOP/s (the data sheets' 1,979 is with sparsity).
H200_BF16_DENSE_TFLOPS = 989.0
H100_SXM_BF16_DENSE_TFLOPS = 989.0
A100_BF16_DENSE_TFLOPS = 312.0
PEAK_TFLOPS = {"H200": H200_BF16_DENSE_TFLOPS, "H100": H100_SXM_BF16_DENSE_TFLOPS, "A100": A100_BF16_DENSE_TFLOPS}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by its name (e.g. 'NVIDIA H200'); None if not listed."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def forward_flops_per_image(model) -> dict[str, float]:
    """Matmul FLOPs of one forward of one image of a DualHeadDiT: {'linear': ..., 'attention': ...}.

    Per block (T tokens, width D, MLP width H): qkv 3D^2, projection D^2, MLP 2DH multiply-adds per token,
    adaLN D x 6D per image; attention 2 T^2 D multiply-adds per image. Plus the patch embedding and the two
    final layers (D x P per token, P = p^2 C; adaLN D x 2D) and the t and t - r embedders (F x D, D x D)."""
    d = model.pos_embed.shape[-1]
    tokens = model.pos_embed.shape[1]
    blocks = list(model.blocks) + list(model.v_head.blocks) + list(model.u_head.blocks)
    hidden = blocks[0].mlp.fc1.out_features
    patch = model.patch_size ** 2 * model.in_channels
    freq = model.t_embedder.frequency_size
    per_block = tokens * (4 * d * d + 2 * d * hidden) + 6 * d * d
    heads = 2 * (tokens * d * patch + 2 * d * d)
    embedders = 2 * (freq * d + d * d)
    linear = len(blocks) * per_block + tokens * d * patch + heads + embedders
    attention = len(blocks) * 2 * tokens * tokens * d
    return {"linear": 2.0 * linear, "attention": 2.0 * attention}


def total(flops: dict[str, float]) -> float:
    return flops["linear"] + flops["attention"]


def jvp_forward_equivalents(flops: dict[str, float], executed: bool = False) -> float:
    """A JVP pass in forward-equivalents: primal + tangent, 2x on Linears, 3x on attention matmuls (the
    model FLOPs); `executed`: what eager forward-mode AD runs, 3x on both (the zero weight tangents' mm)."""
    if executed:
        return 3.0
    return (2 * flops["linear"] + 3 * flops["attention"]) / total(flops)


def guided_fraction(objective, batch: dict[str, torch.Tensor], seeds) -> float:
    """The mean fraction of rows whose target is guided over the steps drawn with `seeds` (the objective's
    own draw, so exactly what those steps ran); 0 without guidance."""
    if not objective.cfg.guidance:
        return 0.0
    fractions = []
    for seed in seeds:
        g = torch.Generator(device=batch["x0"].device).manual_seed(seed)
        fractions.append(float(objective.guided_rows(objective.draw(batch, g)).float().mean()))
    return sum(fractions) / len(fractions)


def expected_guided_fraction(objective, samples: int = 100_000) -> float:
    """guided_fraction over one large batch (standard error ~0.0015 at 100,000 rows)."""
    batch = {"x0": torch.zeros(samples, 1, 1, 1), "y": torch.zeros(samples, dtype=torch.long)}
    return guided_fraction(objective, batch, [0])


def step_passes(objective, *, jvp_cost: float, guided: float, separate_main_pass: bool, batch: int,
                images: int = 0) -> dict[str, float]:
    """The passes one training step of `objective` (a built Objective) runs, in forward-equivalents of
    the batch (module docstring). `guided`: the fraction of rows with a guided target; `batch`: the
    micro-batch size (DuMo's u_fraction rounds to rows); `images`: for DuMo's tangent blend schedule."""
    cfg, estimator = objective.cfg, objective.jvp_options["estimator"]
    guidance = guided if cfg.guidance else 0.0
    if cfg.name == "flow_matching":
        return {"forward": 1.0, "backward": 2.0, "guidance": 2 * guidance}
    if cfg.name == "meanflow":
        rows, tangent_pass = 1.0, 0.0
        guidance_pass = 2 * guidance
    else:
        rows = objective.u_rows(batch) / batch
        share = objective.tangent_share_of_v_hat(images)
        # v_c on every row when the tangent uses the v-head, else only where the target is guided
        guidance_pass = ((1.0 if share > 0 else guidance) + guidance) if cfg.guidance else 0.0
        tangent_pass = 1.0 if (not cfg.guidance and share > 0) else 0.0
    passes = {"guidance": guidance_pass, "tangent": tangent_pass, "backward": 2.0}
    if estimator == "finite_difference":
        passes.update(forward=1.0, du_dt=rows)  # u at (x_t - h tau, t - h), no grad, on the u rows
    elif separate_main_pass:
        passes.update(forward=1.0, du_dt=rows * jvp_cost)
    else:  # one JVP gives v, u (with their graph) and du/dt on the u rows; a plain forward on the rest
        passes.update(forward=1.0 - rows, du_dt=rows * jvp_cost)
    if cfg.name == "dumo" and cfg.lambda_boundary > 0:
        passes["boundary"] = 3.0  # u(x_t, t, t) with its graph: forward + backward
    return passes


def mfu(forward_equivalents: float, flops_per_image: float, images_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: FLOPs the step runs per second over the peak (peak in TFLOP/s)."""
    return forward_equivalents * flops_per_image * images_per_s / (peak * 1e12)
