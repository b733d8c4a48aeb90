import math
from pathlib import Path

import pytest
import torch

from dumo_ray.config import load_config
from dumo_ray.train.local_backend import LocalBackend
from dumo_ray.train.step import NonFiniteError, NonFiniteGuard

ROOT = Path(__file__).resolve().parents[1]


def plain_backend(model, grad_clip):
    """The single-process backend's step around a toy model and SGD."""
    backend = LocalBackend(load_config(ROOT / "configs/digits_local.yaml", [f"optim.grad_clip={grad_clip}", "train.device=cpu"]))
    backend.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint=None)
    return backend


def test_nonfinite_loss_is_skipped_and_weights_stay():
    model = torch.nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    stepper = plain_backend(model, grad_clip=1.0)
    norm, applied = stepper.step(model(torch.ones(1, 3)).sum() * float("nan"))
    assert not applied and math.isnan(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    norm, applied = stepper.step(model(torch.ones(1, 3)).sum())
    assert applied and norm > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_infinite_gradient_is_skipped():
    model = torch.nn.Linear(1, 1)
    before = model.weight.detach().clone()
    stepper = plain_backend(model, grad_clip=0.0)
    loss = torch.sqrt(model.weight - model.weight.detach()).sum()  # value 0, gradient 1 / (2 sqrt(0)) = inf
    assert torch.isfinite(loss)
    norm, applied = stepper.step(loss)
    assert not applied and not math.isfinite(norm)
    assert torch.equal(model.weight, before)


def test_guard_stops_after_n_in_a_row_and_resets_on_success(capsys):
    guard = NonFiniteGuard(limit=3)
    guard.record(False, 100)
    guard.record(False, 200)
    guard.record(True, 300)  # a good step resets the streak
    guard.record(False, 400)
    guard.record(False, 500)
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps .*\(last at image 600\)"):
        guard.record(False, 600)
    assert guard.total == 5
    assert "step skipped" in capsys.readouterr().out
