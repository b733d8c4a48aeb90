import torch

from dumo_ray.train.ema import EMA, ema_decay_at


def test_decay_warms_up_then_caps():
    assert ema_decay_at(0, 0.999) == 0.1
    assert abs(ema_decay_at(90, 0.999) - 0.91) < 1e-12
    assert ema_decay_at(10**6, 0.999) == 0.999


def test_ema_update_is_a_lerp_with_the_warmed_up_decay():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.99)
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=5)
    d = ema_decay_at(5, 0.99)
    torch.testing.assert_close(ema.module.weight, d * start + (1 - d) * model.weight.detach())
    assert not ema.module.weight.requires_grad
