import pytest
import torch

from dumo_ray.models import PRESETS, build_model, count_parameters
from dumo_ray.flow.jvp import math_attention, relative_error


def meta_count(name, **kw):
    with torch.device("meta"):
        return count_parameters(build_model(name, input_size=32, in_channels=4, num_classes=1000, **kw))


def test_xl_has_679m_parameters_within_half_a_percent():
    n = meta_count("DuMo-XL/2")
    assert n == 679_410_464
    assert abs(n - 679e6) / 679e6 < 0.005


@pytest.mark.parametrize("name,expected", [("DuMo-S/2", 33_505_568), ("DuMo-B/2", 132_481_568), ("DuMo-L/2", 461_514_784)])
def test_dit_shaped_presets(name, expected):
    assert meta_count(name) == expected


def test_head_depth_moves_blocks_into_both_heads():
    base = meta_count("DuMo-S/2")
    with torch.device("meta"):
        model = build_model("DuMo-S/2", input_size=32, in_channels=4, num_classes=1000, head_depth=2)
    block = count_parameters(model.blocks[0])
    assert len(model.blocks) == PRESETS["DuMo-S/2"]["depth"] - 2
    assert len(model.v_head.blocks) == len(model.u_head.blocks) == 2
    assert count_parameters(model) == base + 2 * block  # k blocks duplicated: +k blocks in all


def test_zero_init_outputs_zero_and_shapes(micro_model):
    x = torch.randn(5, 1, 8, 8)
    t = torch.rand(5)
    v, u = micro_model(x, t, t * 0.3, torch.randint(0, 11, (5,)))
    assert v.shape == u.shape == x.shape
    assert torch.count_nonzero(v) == 0 and torch.count_nonzero(u) == 0


def test_heads_differ_and_depend_on_interval(random_micro_model):
    x = torch.randn(3, 1, 8, 8)
    t = torch.full((3,), 0.8)
    y = torch.tensor([1, 2, 10])  # 10 is the null class
    v, u = random_micro_model(x, t, t * 0.5, y)
    assert not torch.allclose(v, u)
    _, u_other_r = random_micro_model(x, t, t * 0.1, y)
    assert not torch.allclose(u, u_other_r)


def test_fast_attention_equals_math_attention(random_micro_model):
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.randint(0, 10, (4,))
    fast = random_micro_model(x, t, t / 2, y)
    with math_attention():
        slow = random_micro_model(x, t, t / 2, y)
    for a, b in zip(fast, slow):  # two kernels, two summation orders: ~3e-7 of the norm here
        assert relative_error(a, b) < 1e-5


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model preset 'DuMo-XXL/2'"):
        build_model("DuMo-XXL/2", input_size=32, in_channels=4, num_classes=1000)
