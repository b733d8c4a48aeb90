"""The guidance forward runs only over the rows that need it (t in the window, label kept; DuMo's tangent
needs v_c on every row) and gives the targets and losses of the full 2N pass it replaced.

The reference below is that full pass, as it was: the labelled and null predictions of all N rows in one
batch of 2N. The subset's rows go through the same network in a batch of another size, so a guided row's
prediction may differ by the rounding of a differently blocked fp32 matmul: a few float32 ulps of values
of order 1 (measured here: <= 1e-6). The tolerance, 1e-5 absolute and relative, is ten times that and
still ~1e4 times below any real mistake (a missing or misplaced row changes the target by O(0.1-1)).
Rows whose target is not guided get exactly v_t in both.
"""
from types import MethodType

import pytest
import torch

from dumo_ray.config import ObjectiveConfig
from dumo_ray.flow import build_objective
from dumo_ray.flow.objectives import NoisedBatch

N = 24
TOLERANCE = dict(atol=1e-5, rtol=1e-5)

# cfg_t_lo/hi, class_dropout: which rows are guided
CASES = {
    "mix": dict(cfg_t_lo=0.0, cfg_t_hi=0.6, class_dropout=0.3),  # in and out of the window, dropped and kept
    "none": dict(cfg_t_lo=1.0, cfg_t_hi=1.0, class_dropout=0.1),  # t < 1 always: no row in the window
    "all": dict(cfg_t_lo=0.0, cfg_t_hi=1.0, class_dropout=0.0),  # every row in the window, no label dropped
}
OBJECTIVES = {
    "flow_matching": dict(name="flow_matching"),
    "meanflow": dict(name="meanflow"),
    "dumo tangent v_hat": dict(name="dumo", tangent="v_hat"),  # v_c is the tangent: needed on every row
    "dumo tangent v_target": dict(name="dumo", tangent="v_target"),
}


@torch.no_grad()
def full_pass(self, model, nb: NoisedBatch, r, head, every_row_labelled=False):
    """The replaced implementation: every row with its label and with the null label, 2N rows."""
    y_null = torch.full_like(nb.y, self.null_class)
    outputs = model(torch.cat([nb.x_t, nb.x_t]), torch.cat([nb.t, nb.t]), torch.cat([r, r]), torch.cat([nb.y, y_null]))
    return outputs[head].float().chunk(2)


class RowCounter(torch.nn.Module):
    """The model, recording the batch size of every call made without gradients (the guidance pass)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.no_grad_rows = []

    def forward(self, x_t, t, r, y):
        if not torch.is_grad_enabled():
            self.no_grad_rows.append(len(x_t))
        return self.model(x_t, t, r, y)


def objectives(objective: str, case: str):
    cfg = ObjectiveConfig(**OBJECTIVES[objective], **CASES[case])  # default guidance: w 0.2, k 0.92
    subset, full = build_objective(cfg, 10), build_objective(cfg, 10)
    full.label_and_null_predictions = MethodType(full_pass, full)
    return subset, full


def batch():
    g = torch.Generator().manual_seed(1)
    return {"x0": torch.randn(N, 1, 8, 8, generator=g), "y": torch.randint(0, 10, (N,), generator=g)}


def draw(objective, seed=3):
    return objective.draw(batch(), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
def test_cases_cover_what_they_say(case):
    subset, _ = objectives("dumo tangent v_hat", case)
    nb = draw(subset)
    guided = subset.guided_rows(nb)
    in_window = (nb.t >= subset.cfg.cfg_t_lo) & (nb.t <= subset.cfg.cfg_t_hi)
    if case == "mix":
        # every kind of row: guided, outside the window, dropped inside the window
        assert 0 < int(guided.sum()) < N and bool((~in_window).any()) and bool((in_window & nb.dropped).any())
    else:
        assert int(guided.sum()) == {"none": 0, "all": N}[case]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_subset_target_equals_full_pass(random_micro_model, objective, case):
    subset, full = objectives(objective, case)
    nb = draw(subset)
    r = nb.t if objective == "meanflow" else nb.r
    head = 1 if objective == "meanflow" else 0
    every_row = objective == "dumo tangent v_hat"
    v_c, v_n = subset.label_and_null_predictions(random_micro_model, nb, r, head, every_row_labelled=every_row)
    ref_c, ref_n = full.label_and_null_predictions(random_micro_model, nb, r, head)
    target, reference = subset.guided_target(nb, v_c, v_n), full.guided_target(nb, ref_c, ref_n)

    guided = subset.guided_rows(nb)
    torch.testing.assert_close(target[guided], reference[guided], **TOLERANCE)
    assert torch.equal(target[~guided], nb.v_t[~guided]) and torch.equal(reference[~guided], nb.v_t[~guided])
    if guided.any():  # guidance moved the target: the comparison above is not v_t against v_t
        assert float((reference[guided] - nb.v_t[guided]).abs().max()) > 0.1
    if every_row:  # the tangent: the labelled prediction of every row
        torch.testing.assert_close(v_c, ref_c, **TOLERANCE)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_subset_loss_equals_full_pass_and_runs_fewer_rows(random_micro_model, objective, case):
    subset, full = objectives(objective, case)
    counted = RowCounter(random_micro_model)
    loss, terms = subset(counted, batch(), torch.Generator().manual_seed(3))
    full_loss, full_terms = full(random_micro_model, batch(), torch.Generator().manual_seed(3))
    assert terms.keys() == full_terms.keys()
    for name in terms:
        torch.testing.assert_close(terms[name], full_terms[name], **TOLERANCE, msg=f"{objective}, {case}: {name}")

    guided = int(subset.guided_rows(draw(subset)).sum())  # same seed: the rows the objective drew
    # The guidance pass: v_n on the guided rows, v_c on those (or every row for DuMo's tangent v_hat).
    labelled = N if objective == "dumo tangent v_hat" else guided
    expected = labelled + guided
    # (the only pass without gradients here: fp32 on the CPU takes v, u and du/dt from one JVP)
    assert counted.no_grad_rows == ([expected] if expected else []), counted.no_grad_rows
    assert expected < 2 * N or case == "all"  # the full pass ran 2N rows every time
