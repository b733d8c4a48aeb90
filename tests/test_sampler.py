import torch

from dumo_ray.flow.jvp import relative_error
from dumo_ray.flow.sampler import chained_jumps, euler, noise_from_seeds, one_step, sample, sample_in_chunks, two_step


def test_one_step_is_x1_minus_u_at_r0_t1(random_micro_model):
    x1 = torch.randn(3, 1, 8, 8)
    y = torch.tensor([1, 4, 9])
    ones, zeros = torch.ones(3), torch.zeros(3)
    expected = x1 - random_micro_model(x1, ones, zeros, y)[1]
    torch.testing.assert_close(one_step(random_micro_model, x1, y), expected)


def test_two_step_follows_the_formula(random_micro_model):
    m = random_micro_model
    x1, y, mid = torch.randn(2, 1, 8, 8), torch.tensor([0, 5]), 0.3
    n = lambda v: torch.full((2,), v)
    x_m = x1 - (1 - mid) * m(x1, n(1.0), n(mid), y)[1]
    expected = x_m - mid * m(x_m, n(mid), n(0.0), y)[1]
    torch.testing.assert_close(two_step(m, x1, y, mid=mid), expected)


def test_chained_jumps_with_two_steps_equals_two_step_at_half(random_micro_model):
    x1, y = torch.randn(2, 1, 8, 8), torch.tensor([2, 3])
    torch.testing.assert_close(chained_jumps(random_micro_model, x1, y, 2), two_step(random_micro_model, x1, y, mid=0.5))


def test_euler_uses_the_velocity_head_at_r_equals_t(random_micro_model):
    m = random_micro_model
    x1, y = torch.randn(2, 1, 8, 8), torch.tensor([2, 3])
    ones = torch.ones(2)
    torch.testing.assert_close(euler(m, x1, y, 1), x1 - m(x1, ones, ones, y)[0])


def test_per_sample_seeds_give_the_same_sample_whatever_the_batch(random_micro_model):
    """Bit-identical in fixed chunks (what `dumo-ray sample` and the sampling pipeline use), whatever the
    split; plain `sample` over other batch shapes only up to fp32 reordering. That is ~3e-7 of the norm
    here, while single elements near 0 move by up to ~1e-5 (the rounding of their O(10) summands), so the
    plain comparison is a relative norm, never elementwise."""
    seeds = [11, 22, 33, 44, 55]
    labels = torch.tensor([0, 1, 2, 3, 4])
    splits = [(0, 2), (2, 3), (3, 5)]
    for steps, method in [(1, "u"), (2, "u"), (4, "u"), (3, "euler")]:
        kw = dict(steps=steps, method=method)
        chunked = sample_in_chunks(random_micro_model, labels, seeds, chunk=4, **kw)
        assert torch.equal(chunked, torch.cat([sample_in_chunks(random_micro_model, labels[a:b], seeds[a:b], chunk=4, **kw)
                                               for a, b in splits]))
        full = sample(random_micro_model, labels, seeds, **kw)
        pieces = torch.cat([sample(random_micro_model, labels[a:b], seeds[a:b], **kw) for a, b in splits])
        assert relative_error(pieces, full) < 1e-5 and relative_error(chunked, full) < 1e-5
    assert torch.equal(noise_from_seeds([7, 8], (1, 8, 8))[1], noise_from_seeds([8], (1, 8, 8))[0])


def test_renoise_two_step_differs_but_is_deterministic(random_micro_model):
    labels, seeds = torch.tensor([1, 2]), [3, 4]
    a = sample(random_micro_model, labels, seeds, steps=2, renoise=True)
    b = sample(random_micro_model, labels, seeds, steps=2, renoise=True)
    c = sample(random_micro_model, labels, seeds, steps=2)
    assert torch.equal(a, b) and not torch.allclose(a, c)
