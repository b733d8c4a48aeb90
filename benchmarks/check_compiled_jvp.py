"""Compiled vs eager JVP on a model with random (not zero-initialised) heads, so that dudt is non-zero:
at initialisation DiT's zero-initialised output layers make u, and so dudt, exactly zero.

    python benchmarks/check_compiled_jvp.py [--preset DuMo-XL/2 --batch 64]
"""
import argparse
import time

import torch

from bench_model import add_model_arguments, bench_device, build_bench_model  # benchmarks/ is on sys.path

from dumo_ray.flow import u_and_dudt
from dumo_ray.flow.jvp import CompiledDudt

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
add_model_arguments(p)
p.add_argument("--batch", type=int, default=64)
args = p.parse_args()
device = bench_device()
model = build_bench_model(args, device)
with torch.no_grad():
    for parameter in model.parameters():
        parameter.add_(0.02 * torch.randn_like(parameter))
g = torch.Generator(device=device).manual_seed(0)
shape = (args.batch, args.channels, args.input_size, args.input_size)
x, tangent = torch.randn(shape, device=device, generator=g), torch.randn(shape, device=device, generator=g)
t = torch.rand(args.batch, device=device, generator=g)
y = torch.randint(0, args.classes, (args.batch,), device=device, generator=g)
with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
    _, _, eager = u_and_dudt(model, x, t, t * 0.5, y, tangent, compile_jvp="never")
    start = time.perf_counter()
    _, _, compiled = u_and_dudt(model, x, t, t * 0.5, y, tangent, compile_jvp="always", compiled_dudt=CompiledDudt())
    seconds = time.perf_counter() - start
print(f"{args.preset} batch {args.batch} on {device}: |dudt| {float(eager.norm()):.4g}, finite: eager "
      f"{bool(torch.isfinite(eager).all())} compiled {bool(torch.isfinite(compiled).all())}, relative error "
      f"{float((compiled - eager).norm() / eager.norm()):.2e}, max abs error {float((compiled - eager).abs().max()):.2e}, "
      f"first compiled call {seconds:.0f} s")
