import pytest
import torch

from dumo_ray.config import JvpConfig, ObjectiveConfig
from dumo_ray.data.digits import load_digits_tensors
from dumo_ray.flow import build_objective
from dumo_ray.flow.objectives import adaptive_weighted, per_sample_sse
from dumo_ray.flow.path import TimeSampler
from dumo_ray.models import build_model



def test_adaptive_weighting_equals_hand_computation():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    sse = per_sample_sse(pred, target)
    assert sse.tolist() == [5.0, 25.0]
    weighted = adaptive_weighted(sse, p=1.0, c=1e-3)
    torch.testing.assert_close(weighted, torch.tensor([5.0 / 5.001, 25.0 / 25.001]))
    weighted_half = adaptive_weighted(sse, p=0.5, c=1.0)
    torch.testing.assert_close(weighted_half, torch.tensor([5.0 / 6.0 ** 0.5, 25.0 / 26.0 ** 0.5]))
    # The weight is a constant: the gradient is that of L scaled by 1 / (L + c)^p.
    weighted.sum().backward()
    torch.testing.assert_close(pred.grad, torch.tensor([[2.0, 4.0], [-6.0, -8.0]]) / torch.tensor([[5.001], [25.001]]))


@pytest.mark.parametrize("equal,zero", [(0.0, 0.0), (0.75, 0.0), (0.25, 0.5), (0.0, 1.0)])
def test_time_sampler_fractions_and_order(equal, zero):
    n = 400
    t, r = TimeSampler(equal_fraction=equal, zero_fraction=zero)(n, torch.Generator().manual_seed(0))
    assert bool((r <= t).all()) and bool((t <= 1).all()) and bool((r >= 0).all())
    assert int((r == t).sum()) == round(equal * n)
    assert int((r == 0).sum()) == round(zero * n)


def test_logit_normal_mean_shifts_times():
    g = torch.Generator().manual_seed(0)
    low, _ = TimeSampler(mean=-2.0)(4000, g)
    high, _ = TimeSampler(mean=2.0)(4000, g)
    assert low.mean() < 0.4 < 0.8 < high.mean()


def test_separate_time_draws_make_large_intervals_common():
    """Decoupled MeanFlow's sampler: t and r from their own logit-normals, r clipped to <= t."""
    g = torch.Generator().manual_seed(0)
    t, r = TimeSampler("separate", mean=0.4, std=1.0, r_mean=-1.2, r_std=1.0)(20000, g)
    assert bool((r <= t).all())
    assert abs(float(torch.logit(t).mean()) - 0.4) < 0.05
    t_sorted, r_sorted = TimeSampler(mean=-0.4)(20000, g)
    # P(t - r > 0.8): ~1.5% against ~0.1% for the sorted pair (method.md section 11).
    assert float((t - r > 0.8).float().mean()) > 0.01 > 5 * float((t_sorted - r_sorted > 0.8).float().mean())


def test_interval_curriculum_caps_the_gap_and_lets_go():
    objective = build_objective(ObjectiveConfig(interval_cap_start=0.2, interval_curriculum_images=1000), num_classes=10)
    gaps = {images: objective.draw(batch(400), torch.Generator().manual_seed(0), images) for images in (0, 500, 1000)}
    assert float((gaps[0].t - gaps[0].r).max()) <= 0.2 + 1e-6
    assert 0.2 < float((gaps[500].t - gaps[500].r).max()) <= 0.6 + 1e-6
    assert float((gaps[1000].t - gaps[1000].r).max()) > 0.6


def batch(n=64, seed=0):
    """Real digits: structure a model can learn (unlike random x0)."""
    x, y = load_digits_tensors()
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return {"x0": x[idx], "y": y[idx]}


@pytest.mark.parametrize("name,extra", [
    ("dumo", {}),
    ("dumo", {"tangent": "v_hat"}),
    ("dumo", {"jvp": JvpConfig(estimator="finite_difference", fd_step=5e-3)}),
    ("dumo", {"tangent": "v_target", "cfg_w": 0.5, "cfg_k": 0.3}),
    ("meanflow", {}),
    ("flow_matching", {}),
])
def test_each_objective_loss_decreases_on_a_fixed_batch(name, extra):
    torch.manual_seed(0)
    model = build_model("DuMo-Micro/2", input_size=8, in_channels=1, num_classes=10)
    jvp = extra.pop("jvp", None)
    cfg = ObjectiveConfig(name=name, cfg_w=extra.pop("cfg_w", 1.0), cfg_k=extra.pop("cfg_k", 0.0), **extra)
    objective = build_objective(cfg, num_classes=10, jvp=jvp)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = batch(32)  # a fixed batch to fit: 32 images and 40 steps fall to ~0.5-0.6 of the start
    # The adaptive weight pins the weighted loss near 1: judge the unweighted MSE at fixed draws.
    key = "mse_u" if name == "meanflow" else "mse_v"
    history = []
    for step in range(40):
        loss, terms = objective(model, data, torch.Generator().manual_seed(step % 4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(terms[key]))
    assert sum(history[-8:]) / 8 < 0.8 * sum(history[:8]) / 8
    assert set(terms) >= {"loss", key}


def test_dumo_terms_match_a_hand_built_target(random_micro_model):
    """The u-loss target is v_t - (t - r) * JVP(u; (stopgrad v_hat, 0, 1)); rebuild it by hand."""
    from dumo_ray.flow import u_and_dudt
    from dumo_ray.flow.path import broadcast_time

    cfg = ObjectiveConfig(name="dumo", tangent="v_hat", cfg_w=1.0, cfg_k=0.0, class_dropout=0.0, adaptive_p_v=0.0, adaptive_p_u=0.0)
    objective = build_objective(cfg, num_classes=10)
    data = batch(8)
    loss, terms = objective(random_micro_model, data, torch.Generator().manual_seed(5))
    nb = objective.draw(data, torch.Generator().manual_seed(5))
    with torch.no_grad():
        v_hat = random_micro_model(nb.x_t, nb.t, nb.r, nb.y)[0]
    v, u, dudt = u_and_dudt(random_micro_model, nb.x_t, nb.t, nb.r, nb.y, v_hat)
    u_target = nb.v_t - broadcast_time(nb.t - nb.r, dudt) * dudt
    expected_u = ((u - u_target) ** 2).flatten(1).sum(1).mean()
    expected_v = ((v - nb.v_t) ** 2).flatten(1).sum(1).mean()
    torch.testing.assert_close(terms["loss_u"], expected_u.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss_v"], expected_v.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), (expected_u + expected_v).detach(), rtol=1e-5, atol=1e-6)


def v_head(model, nb, r):
    with torch.no_grad():
        return model(nb.x_t, nb.t, r, nb.y)[0]


@pytest.mark.parametrize("knobs,images,tangent_of", [
    ({"tangent": "v_target"}, 0, lambda m, nb: nb.v_t),
    ({"tangent": "v_hat", "tangent_query": "r_equals_t"}, 0, lambda m, nb: v_head(m, nb, nb.t)),
    ({"tangent": "blend", "tangent_blend_images": 1000}, 0, lambda m, nb: nb.v_t),
    ({"tangent": "blend", "tangent_blend_images": 1000}, 250, lambda m, nb: 0.25 * v_head(m, nb, nb.r) + 0.75 * nb.v_t),
    ({"tangent": "blend", "tangent_blend_images": 1000}, 5000, lambda m, nb: v_head(m, nb, nb.r)),
    ({"tangent": "v_hat", "identity_velocity": "tangent"}, 0, lambda m, nb: v_head(m, nb, nb.r)),
    ({}, 0, lambda m, nb: nb.v_t),  # the default: tangent v_target
])
def test_tangent_knobs_give_the_hand_built_target(random_micro_model, knobs, images, tangent_of):
    """tangent v_target | blend (v_target -> v_hat over tangent_blend_images), tangent_query r_equals_t, and
    identity_velocity tangent (the tangent, not v_t, in u_tgt = v - (t - r) du/dt)."""
    from dumo_ray.flow import u_and_dudt
    from dumo_ray.flow.path import broadcast_time

    cfg = ObjectiveConfig(name="dumo", cfg_w=1.0, cfg_k=0.0, class_dropout=0.0, adaptive_p_v=0.0, adaptive_p_u=0.0, **knobs)
    objective = build_objective(cfg, num_classes=10)
    data = batch(8)
    _, terms = objective(random_micro_model, data, torch.Generator().manual_seed(5), images=images)
    nb = objective.draw(data, torch.Generator().manual_seed(5))
    tangent = tangent_of(random_micro_model, nb)
    _, u, dudt = u_and_dudt(random_micro_model, nb.x_t, nb.t, nb.r, nb.y, tangent)
    velocity = tangent if knobs.get("identity_velocity") == "tangent" else nb.v_t
    u_target = velocity - broadcast_time(nb.t - nb.r, dudt) * dudt
    torch.testing.assert_close(terms["loss_u"], ((u - u_target) ** 2).flatten(1).sum(1).mean().detach(), rtol=1e-5, atol=1e-6)


def test_u_fraction_trains_the_u_head_on_the_first_rows_and_the_v_head_on_all(random_micro_model):
    """u_fraction 0.25 of 8 rows: the u-loss (and its JVP) on the first 2 rows, the v-loss on all 8."""
    from dumo_ray.flow import u_and_dudt
    from dumo_ray.flow.path import broadcast_time

    cfg = ObjectiveConfig(name="dumo", cfg_w=1.0, cfg_k=0.0, class_dropout=0.0, adaptive_p_v=0.0, adaptive_p_u=0.0,
                          u_fraction=0.25)
    objective = build_objective(cfg, num_classes=10)
    data = batch(8)
    rows = []
    counting = lambda x, t, r, y: rows.append(len(x)) or random_micro_model(x, t, r, y)
    _, terms = objective(counting, data, torch.Generator().manual_seed(5))
    assert rows == [2, 6]  # the JVP's pass on 2 rows, a plain forward on the other 6
    nb = objective.draw(data, torch.Generator().manual_seed(5))
    _, u, dudt = u_and_dudt(random_micro_model, nb.x_t[:2], nb.t[:2], nb.r[:2], nb.y[:2], nb.v_t[:2])
    u_target = nb.v_t[:2] - broadcast_time(nb.t[:2] - nb.r[:2], dudt) * dudt
    v = random_micro_model(nb.x_t, nb.t, nb.r, nb.y)[0]
    torch.testing.assert_close(terms["loss_u"], ((u - u_target) ** 2).flatten(1).sum(1).mean().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss_v"], ((v - nb.v_t) ** 2).flatten(1).sum(1).mean().detach(), rtol=1e-5, atol=1e-6)
    assert objective.u_rows(1) == 1 and objective.u_rows(10) == 2 and build_objective(ObjectiveConfig(), 10).u_rows(7) == 7


def test_lambda_u_warmup_and_boundary_term(random_micro_model):
    """loss = lambda_v L_v + lambda_u * ramp(images) L_u + lambda_boundary ||u(x_t, t, t) - v_t||^2."""
    cfg = ObjectiveConfig(name="dumo", cfg_w=1.0, cfg_k=0.0, class_dropout=0.0, adaptive_p_v=0.0, adaptive_p_u=0.0,
                          lambda_u_warmup_images=1000, lambda_boundary=0.5)
    objective = build_objective(cfg, num_classes=10)
    data = batch(8)
    for images, weight_u in [(0, 0.0), (400, 0.4), (1000, 1.0), (9000, 1.0)]:
        loss, terms = objective(random_micro_model, data, torch.Generator().manual_seed(5), images=images)
        expected = terms["loss_v"] + weight_u * terms["loss_u"] + 0.5 * terms["loss_boundary"]
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    nb = objective.draw(data, torch.Generator().manual_seed(5))
    _, u_boundary = random_micro_model(nb.x_t, nb.t, nb.t, nb.y)
    expected_b = ((u_boundary - nb.v_t) ** 2).flatten(1).sum(1).mean().detach()
    torch.testing.assert_close(terms["loss_boundary"], expected_b, rtol=1e-5, atol=1e-6)
    assert terms["loss_boundary"] > 0 and "loss_boundary" not in build_objective(ObjectiveConfig(), 10)(
        random_micro_model, data, torch.Generator().manual_seed(5))[1]


def test_guided_target_formula_and_window():
    cfg = ObjectiveConfig(cfg_w=0.2, cfg_k=0.5, cfg_t_lo=0.0, cfg_t_hi=0.5, class_dropout=0.0)
    objective = build_objective(cfg, num_classes=10)
    nb = objective.draw(batch(6), torch.Generator().manual_seed(0))
    nb.t = torch.tensor([0.1, 0.4, 0.6, 0.9, 0.2, 0.3])
    nb.dropped = torch.tensor([False, False, False, False, True, False])
    v_c, v_n = torch.full_like(nb.v_t, 2.0), torch.full_like(nb.v_t, -1.0)
    target = objective.guided_target(nb, v_c, v_n)
    guided = 0.2 * nb.v_t + 0.5 * 2.0 + 0.3 * -1.0
    for i, use_guidance in enumerate([True, True, False, False, False, True]):
        torch.testing.assert_close(target[i], guided[i] if use_guidance else nb.v_t[i])


def test_class_dropout_rate():
    objective = build_objective(ObjectiveConfig(class_dropout=0.5), num_classes=10)
    nb = objective.draw(batch(2000), torch.Generator().manual_seed(0))
    assert 0.45 < float(nb.dropped.float().mean()) < 0.55
    assert bool((nb.y[nb.dropped] == 10).all())


def test_meanflow_defaults_to_75_percent_r_equals_t():
    objective = build_objective(ObjectiveConfig(name="meanflow"), num_classes=10)
    nb = objective.draw(batch(400), torch.Generator().manual_seed(0))
    assert int((nb.r == nb.t).sum()) == 300


def test_the_jvp_section_chooses_how_dudt_is_computed(random_micro_model):
    """The objective's du/dt follows the config's jvp section: under ZeRO-3, `auto` resolved to finite
    differences, whose u-loss is close to, but not the same as, the exact JVP's. An unresolved `auto` is
    refused rather than guessed."""
    from dumo_ray.config import Config, DistributedConfig

    zero3 = Config(distributed=DistributedConfig(zero_stage=3))
    assert zero3.jvp.estimator == "finite_difference"
    objective_cfg = ObjectiveConfig(cfg_w=1.0, cfg_k=0.0, class_dropout=0.0, adaptive_p_u=0.0)
    data = batch(16)
    mse_u = {}
    for name, jvp in (("exact", Config().jvp), ("zero3", zero3.jvp)):
        objective = build_objective(objective_cfg, num_classes=10, jvp=jvp)
        _, terms = objective(random_micro_model, data, torch.Generator().manual_seed(0))
        mse_u[name] = float(terms["mse_u"])
    assert mse_u["zero3"] != mse_u["exact"]
    assert mse_u["zero3"] == pytest.approx(mse_u["exact"], rel=0.01)
    with pytest.raises(ValueError, match="jvp.estimator 'auto' is settled when the config loads"):
        build_objective(objective_cfg, num_classes=10, jvp=JvpConfig())
