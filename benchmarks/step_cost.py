"""Time per training step of each objective on one device, and the GPU-path checks.

    python benchmarks/step_cost.py                       # DuMo-XL/2, batch 64, on CUDA if present
    python benchmarks/step_cost.py --preset DuMo-Tiny/2 --input-size 8 --channels 1 --classes 10 --batch 128

Prints a table (ms/step, images/s, ratio to flow matching, peak memory, model FLOPs utilisation) and
writes it as JSON (--json). On CUDA the main pass runs in bf16 with the fused (flash) attention and
the JVP in fp32 with the math kernel, compiled with torch.compile (`jvp.compile_jvp: auto`; the
"eager JVP" row turns it off); the script first checks the kernels are usable and the compiled JVP
equals the eager one.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench_model import add_model_arguments, bench_device, build_bench_model  # benchmarks/ is on sys.path
from report import report

from dumo_ray.config import JvpConfig, ObjectiveConfig
from dumo_ray.flow import build_objective, u_and_dudt
from dumo_ray.flow.jvp import CompiledDudt, resolve_compile_jvp
from dumo_ray.models import count_parameters

# Dense bf16 peak of the card, for the utilisation column (vendor figures).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def forward_flops_per_image(model) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add): 24 T D^2 + 4 T^2 D per block."""
    d = model.pos_embed.shape[-1]
    tokens = model.pos_embed.shape[1]
    blocks = len(model.blocks) + len(model.v_head.blocks) + len(model.u_head.blocks)
    return blocks * (24 * tokens * d * d + 4 * tokens * tokens * d)


# variant -> (objective settings, jvp settings)
VARIANTS = {
    "flow_matching": (dict(name="flow_matching"), {}),
    "meanflow": (dict(name="meanflow"), {}),
    "dumo (guidance off)": (dict(name="dumo", cfg_w=1.0, cfg_k=0.0), {}),
    "dumo (guidance on)": (dict(name="dumo"), {}),
    "dumo eager JVP": (dict(name="dumo"), dict(compile_jvp="never")),
    "dumo dual numbers": (dict(name="dumo"), dict(estimator="dual")),
    "dumo finite-diff": (dict(name="dumo"), dict(estimator="finite_difference")),
}
# Forward-equivalents each step executes (fwd = 1, fwd+bwd = 3, JVP ~ 2), for the "all passes" column.
PASSES = {"flow_matching": 3, "meanflow": 3 + 2, "dumo (guidance off)": 3 + 1 + 2, "dumo (guidance on)": 3 + 2 + 2,
          "dumo eager JVP": 3 + 2 + 2, "dumo dual numbers": 3 + 2 + 2, "dumo finite-diff": 3 + 2 + 1}


def check_kernels(model, device, batch: int) -> dict[str, str]:
    """The plain bf16 pass must run on the flash kernel; the JVP must run (math kernel) and be finite."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    found = {}
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, device=device)
    t = torch.rand(batch, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    if device.type == "cuda":
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            v, _ = model(x, t, t * 0.5, y)
        found["plain pass on flash attention (bf16)"] = f"ok, output {v.dtype}"
    tangent = torch.randn_like(x)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        v, u, dudt = u_and_dudt(model, x, t, t * 0.5, y, tangent, compile_jvp="never")
        found["JVP (fp32, math attention)"] = f"dudt {dudt.dtype}, finite={bool(torch.isfinite(dudt).all())}"
        if resolve_compile_jvp("auto", device):
            start = time.perf_counter()
            _, _, compiled = u_and_dudt(model, x, t, t * 0.5, y, tangent, compile_jvp="always", compiled_dudt=CompiledDudt())
            # dudt is exactly 0 at initialisation (zero-initialised u-head): benchmarks/check_compiled_jvp.py
            # compares on random weights.
            found["compiled JVP (jvp.compile_jvp)"] = (f"first call {time.perf_counter() - start:.0f} s "
                                                             f"(compiles), finite={bool(torch.isfinite(compiled).all())}")
    return found


def time_variant(model, objective, optimizer, data, device, precision, steps: int, warmup: int) -> float:
    def one(i):
        g = torch.Generator(device=device).manual_seed(i)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = objective(model, data, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for i in range(warmup):
        one(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        one(warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--json", default=None)
    args = p.parse_args()

    device = bench_device()
    precision = "bf16" if device.type == "cuda" else "fp32"
    model = build_bench_model(args, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# {args.preset} ({count_parameters(model) / 1e6:.1f}M params), batch {args.batch}, {name}, {precision}, "
          f"torch {torch.__version__}")
    # The checks run at the timed batch size: the compiled JVP is then compiled once, for both.
    for check, result in check_kernels(model, device, args.batch).items():
        print(f"# check: {check}: {result}")

    data = {"x0": torch.randn(args.batch, args.channels, args.input_size, args.input_size, device=device),
            "y": torch.randint(0, args.classes, (args.batch,), device=device)}
    flops = forward_flops_per_image(model)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            p.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        objective_settings, jvp_settings = VARIANTS[variant]
        objective = build_objective(ObjectiveConfig(**objective_settings), args.classes,
                                    JvpConfig(**{"estimator": "jvp", **jvp_settings}))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = time_variant(model, objective, optimizer, data, device, precision, args.steps, args.warmup)
        row = {"variant": variant, "ms_per_step": seconds * 1000, "images_per_s": args.batch / seconds}
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if peak:
            row["mfu_3F"] = 3 * flops * args.batch / seconds / (peak * 1e12)
            row["util_all_passes"] = PASSES[variant] * flops * args.batch / seconds / (peak * 1e12)
        rows.append(row)
        del optimizer
    base = next((r["ms_per_step"] for r in rows if r["variant"] == "flow_matching"), None)
    for r in rows:
        if base:
            r["x_flow_matching"] = r["ms_per_step"] / base
    cols = ["variant", "ms_per_step", "images_per_s", "x_flow_matching", "peak_mem_gib", "mfu_3F", "util_all_passes"]
    report(f"{args.preset}, batch {args.batch}, {name}, {precision}, {args.steps} timed steps", rows, cols, args.json,
           {**vars(args), "device": name, "precision": precision})

if __name__ == "__main__":
    main()
