"""Time per training step of each objective on one device, and the GPU-path checks.

    python benchmarks/step_cost.py                       # DuMo-XL/2, batch 64, on CUDA if present
    python benchmarks/step_cost.py --preset DuMo-Tiny/2 --input-size 8 --channels 1 --classes 10 --batch 128

Prints a table (ms/step, images/s, ratio to flow matching at the same guidance setting, peak memory,
forward-equivalents per step, model FLOPs utilisation) and writes it as JSON (--json). On CUDA the main
pass runs in bf16 with the fused (flash) attention and the JVP in fp32 with the math kernel, compiled
with torch.compile (`jvp.compile_jvp: auto`; the "eager JVP" row turns it off); the script first checks
the kernels are usable and the compiled JVP equals the eager one.

Accounting (benchmarks/step_accounting.py states the convention; tests/test_step_accounting.py checks it
against torch's FLOP counter): `fwd_equiv` is what the step runs in forward-equivalents of the batch
(forward 1, backward 2, JVP J = 2.04 for XL/2, the guidance forward 2g or 1 + g with g the fraction of
rows whose target is guided, measured on the timed steps' own draws: the guidance forward runs on those
rows only). Flow matching is listed with guidance off (3) and on (3 + 2g); each row's x_fm divides by
the flow-matching row of the same guidance setting. `mfu` = fwd_equiv x forward FLOPs per image x
images/s / peak, the FLOPs the step runs; `mfu_3F` counts 3 forward FLOPs per image for every objective
(the work of a plain training step per image trained). Peak: the dense bf16 tensor-core figure of the
card, 989 TFLOP/s for the H200 (H200_BF16_DENSE_TFLOPS; the same Hopper tensor cores as the H100 SXM).
"""
from __future__ import annotations

import argparse
import time

import torch

from bench_model import add_model_arguments, bench_device, build_bench_model  # benchmarks/ is on sys.path
from report import report
from step_accounting import forward_flops_per_image, guided_fraction, jvp_forward_equivalents, mfu, peak_tflops, step_passes, total

from dumo_ray.config import JvpConfig, ObjectiveConfig
from dumo_ray.flow import build_objective, u_and_dudt
from dumo_ray.flow.jvp import CompiledDudt, resolve_compile_jvp
from dumo_ray.models import count_parameters

# variant -> (objective settings, jvp settings); guidance is on unless cfg_w = 1, cfg_k = 0
VARIANTS = {
    "flow_matching (guidance off)": (dict(name="flow_matching", cfg_w=1.0, cfg_k=0.0), {}),
    "flow_matching (guidance on)": (dict(name="flow_matching"), {}),
    "meanflow": (dict(name="meanflow"), {}),
    "dumo (guidance off)": (dict(name="dumo", cfg_w=1.0, cfg_k=0.0), {}),
    "dumo (guidance on)": (dict(name="dumo"), {}),  # the default tangent, v_target (as the XL/2 config)
    "dumo tangent v_hat": (dict(name="dumo", tangent="v_hat"), {}),  # v_c on every row: the tangent
    "dumo eager JVP": (dict(name="dumo"), dict(compile_jvp="never")),
    "dumo dual numbers": (dict(name="dumo"), dict(estimator="dual")),
    "dumo finite-diff": (dict(name="dumo"), dict(estimator="finite_difference")),
}


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
    """Seconds per step; step i draws its randomness from seed i (timed steps: warmup .. warmup + steps - 1)."""
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
    per_image = total(flops)
    peak = peak_tflops(name) if device.type == "cuda" else None
    print(f"# forward: {per_image / 1e9:.2f} GFLOP/image (attention {flops['attention'] / per_image:.1%}), JVP "
          f"{jvp_forward_equivalents(flops):.3f} forward-equivalents; peak {peak or '-'} TFLOP/s dense bf16")
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            p.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        objective_settings, jvp_settings = VARIANTS[variant]
        jvp_cfg = JvpConfig(**{"estimator": "jvp", **jvp_settings})
        objective = build_objective(ObjectiveConfig(**objective_settings), args.classes, jvp_cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = time_variant(model, objective, optimizer, data, device, precision, args.steps, args.warmup)
        guided = guided_fraction(objective, data, range(args.warmup, args.warmup + args.steps))
        separate = precision == "bf16" or resolve_compile_jvp(jvp_cfg.compile_jvp, device)
        passes = step_passes(objective, jvp_cost=jvp_forward_equivalents(flops), guided=guided,
                             separate_main_pass=separate, batch=args.batch)
        row = {"variant": variant, "guidance": objective.cfg.guidance, "ms_per_step": seconds * 1000,
               "images_per_s": args.batch / seconds, "guided_rows": guided, "fwd_equiv": sum(passes.values()),
               "passes": passes}
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if peak:
            row["mfu"] = mfu(row["fwd_equiv"], per_image, row["images_per_s"], peak)
            row["mfu_3F"] = mfu(3.0, per_image, row["images_per_s"], peak)
        rows.append(row)
        del optimizer
    for r in rows:  # against flow matching at the same guidance setting
        base = next((b["ms_per_step"] for b in rows if b["variant"].startswith("flow_matching")
                     and b["guidance"] == r["guidance"]), None)
        if base:
            r["x_fm"] = r["ms_per_step"] / base
    cols = ["variant", "ms_per_step", "images_per_s", "x_fm", "peak_mem_gib", "guided_rows", "fwd_equiv", "mfu", "mfu_3F"]
    report(f"{args.preset}, batch {args.batch}, {name}, {precision}, {args.steps} timed steps; peak "
           f"{peak or '-'} TFLOP/s dense bf16", rows, cols, args.json,
           {**vars(args), "device": name, "precision": precision, "peak_tflops": peak,
            "forward_gflop_per_image": per_image / 1e9, "jvp_forward_equivalents": jvp_forward_equivalents(flops)})


if __name__ == "__main__":
    main()
