"""benchmarks/step_accounting.py: the forward-equivalents each objective's step runs, and the FLOP formula
behind step_cost.py's MFU, checked against torch's own FLOP counter on DuMo-Micro.

Tolerance of the whole-step comparison: the formula counts a backward as 2 forwards, but autograd skips
the input gradients of layers whose input needs none (the t / t - r embedders' first Linear reads the
sinusoids). On DuMo-Micro that is 36,864 of ~934,000 forward FLOPs per image, so the measured step may
be up to 2% below the formula (at most 1.3% for flow matching's 3 forward-equivalents, less for the
others), never above it; on DuMo-XL/2 the gap is ~5e-6.
"""
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dumo_ray.config import JvpConfig, ObjectiveConfig
from dumo_ray.flow import build_objective
from dumo_ray.flow.jvp import math_attention
from dumo_ray.models import build_model

from conftest import randomize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from step_accounting import (  # noqa: E402  (benchmarks/ is not a package)
    H200_BF16_DENSE_TFLOPS, expected_guided_fraction, forward_flops_per_image, guided_fraction,
    jvp_forward_equivalents, mfu, peak_tflops, step_passes, total)

N = 16
G, J = 0.5, 2.04  # a guided fraction and a JVP cost, for the hand-derived counts


def passes(objective="dumo", jvp="jvp", separate=True, batch=10, **settings):
    built = build_objective(ObjectiveConfig(name=objective, **settings), 10, JvpConfig(estimator=jvp))
    return sum(step_passes(built, jvp_cost=J, guided=G, separate_main_pass=separate, batch=batch).values())


GUIDANCE_OFF = dict(cfg_w=1.0, cfg_k=0.0)


@pytest.mark.parametrize("kwargs,expected", [
    (dict(objective="flow_matching", **GUIDANCE_OFF), 3),                 # fwd + bwd
    (dict(objective="flow_matching"), 3 + 2 * G),                         # + the guidance pass on the guided rows
    (dict(objective="meanflow"), 2 * G + J + 1 + 2),                      # guidance + JVP + main fwd + bwd
    (dict(tangent="v_hat"), (1 + G) + J + 1 + 2),                         # v_c on every row (the tangent), v_n on guided
    (dict(tangent="v_target"), 2 * G + J + 1 + 2),
    (dict(tangent="v_hat", **GUIDANCE_OFF), 1 + J + 1 + 2),               # the tangent's own forward
    (dict(tangent="v_target", **GUIDANCE_OFF), J + 1 + 2),
    (dict(tangent="v_hat", separate=False), (1 + G) + J + 2),             # fp32 eager: the JVP gives v, u with a graph
    (dict(tangent="v_hat", jvp="finite_difference"), (1 + G) + 1 + 1 + 2),  # u at t - h instead of the JVP
    (dict(tangent="v_hat", u_fraction=0.5), (1 + G) + 0.5 * J + 1 + 2),   # the JVP on 5 of 10 rows
    (dict(tangent="v_hat", u_fraction=0.5, separate=False), (1 + G) + 0.5 * J + 0.5 + 2),
    (dict(tangent="v_hat", lambda_boundary=1.0), (1 + G) + J + 1 + 2 + 3),  # u(x_t, t, t): fwd + bwd
])
def test_forward_equivalents_per_variant(kwargs, expected):
    assert passes(**kwargs) == pytest.approx(expected)


def test_h200_peak_and_mfu():
    assert peak_tflops("NVIDIA H200") == H200_BF16_DENSE_TFLOPS == 989.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("Tesla V100") is None
    # 3 forward-equivalents of 1 TFLOP an image at 100 images/s on a 1,000 TFLOP/s card: 30%
    assert mfu(3.0, 1e12, 100.0, 1000.0) == pytest.approx(0.3)


def test_guided_fraction_under_the_defaults():
    # t in [0, 0.75] and the label kept (90%); flow matching draws t from logit-normal(-0.4, 1), the
    # MeanFlow-type objectives draw two and keep the larger: P = Phi(z)^2.
    phi = 0.5 * (1 + math.erf((math.log(0.75 / 0.25) + 0.4) / math.sqrt(2)))
    fm = build_objective(ObjectiveConfig(name="flow_matching"), 10)
    dumo = build_objective(ObjectiveConfig(name="dumo"), 10)
    assert expected_guided_fraction(fm) == pytest.approx(0.9 * phi, abs=0.01)  # 0.84
    assert expected_guided_fraction(dumo) == pytest.approx(0.9 * phi ** 2, abs=0.01)  # 0.78
    assert expected_guided_fraction(build_objective(ObjectiveConfig(name="dumo", **GUIDANCE_OFF), 10)) == 0.0


def counted(fn) -> float:
    """FLOPs per image that torch's FLOP counter sees (math attention: the CPU's fused kernel is not counted)."""
    with math_attention(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / N


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, 1, 8, 8, generator=g), torch.rand(N, generator=g), torch.rand(N, generator=g) * 0.5,
            torch.randint(0, 10, (N,), generator=g))


@pytest.mark.parametrize("head_depth", [0, 1])
def test_forward_and_jvp_flops_match_the_counter(head_depth):
    model = randomize(build_model("DuMo-Micro/2", input_size=8, in_channels=1, num_classes=10, head_depth=head_depth))
    x, t, r, y = inputs()
    flops = forward_flops_per_image(model)
    assert counted(lambda: model(x, t, r, y)) == total(flops)  # exact: every matmul is in the formula
    with torch.no_grad():
        jvp = counted(lambda: torch.func.jvp(lambda a, b: model(a, b, r, y), (x, t), (torch.randn_like(x), torch.ones_like(t))))
    # Eager forward-mode AD also multiplies by the weights' zero tangent: 3 F executed, 2 L + 3 A needed.
    assert jvp == jvp_forward_equivalents(flops, executed=True) * total(flops)
    assert 2.0 < jvp_forward_equivalents(flops) < 3.0


@pytest.mark.parametrize("objective,settings,estimator", [
    ("flow_matching", GUIDANCE_OFF, "jvp"),
    ("flow_matching", {}, "jvp"),
    ("meanflow", {}, "jvp"),
    ("dumo", {"tangent": "v_hat"}, "jvp"),
    ("dumo", {"tangent": "v_target"}, "jvp"),
    ("dumo", {"tangent": "v_hat", **GUIDANCE_OFF}, "dual"),
    ("dumo", {"tangent": "v_hat"}, "finite_difference"),
])
def test_step_flops_match_the_counter(random_micro_model, objective, settings, estimator):
    built = build_objective(ObjectiveConfig(name=objective, **settings), 10, JvpConfig(estimator=estimator))
    x0, _, _, y = inputs()
    batch = {"x0": x0, "y": y}
    guided = guided_fraction(built, batch, [7])  # the rows the step below guides (same seed)

    def step():
        loss, _ = built(random_micro_model, batch, torch.Generator().manual_seed(7))
        loss.backward()

    measured = counted(step)
    flops = forward_flops_per_image(random_micro_model)
    # On the CPU in fp32 nothing is compiled and no autocast: the JVP pass also gives the main outputs.
    formula = sum(step_passes(built, jvp_cost=jvp_forward_equivalents(flops, executed=True), guided=guided,
                              separate_main_pass=False, batch=N).values()) * total(flops)
    assert 0.98 * formula <= measured <= formula, (measured, formula)
