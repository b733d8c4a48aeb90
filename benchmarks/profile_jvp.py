"""Where a DuMo step's time goes on one device: each pass timed alone, then the JVP pass under
torch.profiler (top operators by device time).

    python benchmarks/profile_jvp.py                      # DuMo-XL/2, batch 64, on CUDA if present
    python benchmarks/profile_jvp.py --preset DuMo-S/2 --input-size 16 --classes 10 --batch 32
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bench_model import add_model_arguments, bench_device, build_bench_model  # benchmarks/ is on sys.path
from report import report

from dumo_ray.flow.jvp import autocast_off, math_attention


def timed(fn, device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    device = bench_device()
    cuda = device.type == "cuda"
    model = build_bench_model(args, device)
    n = args.batch
    x = torch.randn(n, args.channels, args.input_size, args.input_size, device=device)
    t, y = torch.rand(n, device=device), torch.randint(0, args.classes, (n,), device=device)
    r, tangent = t * 0.5, torch.randn_like(x)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def main_pass():
        with bf16:
            v, u = model(x, t, r, y)
        (v.float().square().mean() + u.float().square().mean()).backward()

    def forward(precision, attention):
        def run():
            with torch.no_grad(), (bf16 if precision == "bf16" else autocast_off(device.type)), attention():
                model(x, t, r, y)
        return run

    def jvp(precision):
        def run():
            with torch.no_grad(), math_attention(), (bf16 if precision == "bf16" else autocast_off(device.type)):
                torch.func.jvp(lambda x_, t_: model(x_, t_, r, y)[1], (x, t), (tangent, torch.ones_like(t)))
        return run

    main_precision = "bf16" if cuda else "fp32"
    passes = [(f"main pass fwd+bwd ({main_precision}, default attention)", main_pass),
              (f"forward, no grad ({main_precision}, default attention)", forward(main_precision, contextlib.nullcontext)),
              ("forward, no grad (fp32, math attention)", forward("fp32", math_attention)),
              ("JVP, no grad (fp32, math attention)", jvp("fp32"))]
    if cuda:
        passes.append(("JVP, no grad (bf16, math attention)", jvp("bf16")))
    rows = [{"pass": name, "ms": timed(fn, device, args.repeats)} for name, fn in passes]
    model.zero_grad(set_to_none=True)
    base = rows[0]["ms"]
    for row in rows:
        row["x_main_pass"] = row["ms"] / base
    name = torch.cuda.get_device_name() if cuda else "CPU"
    report(f"{args.preset}, batch {n}, {name}: each pass alone", rows, ["pass", "ms", "x_main_pass"], args.json,
           {**vars(args), "device": name})

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        jvp("fp32")()
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print("\n# the fp32 JVP pass, top operators by self time")
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
