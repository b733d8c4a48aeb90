import pytest
import torch

from dumo_ray.flow import u_and_dudt
from dumo_ray.flow.jvp import CompiledDudt, relative_error


def central_difference_along(model, x, t, r, y, tangent_x, tangent_r, tangent_t, eps=1e-6):
    """d/ds u(x + s*tx, r + s*tr, t + s*tt) at s = 0, by a float64 central difference."""
    plus = model(x + eps * tangent_x, t + eps * tangent_t, r + eps * tangent_r, y)[1]
    minus = model(x - eps * tangent_x, t - eps * tangent_t, r - eps * tangent_r, y)[1]
    return (plus - minus) / (2 * eps)


@pytest.fixture
def setting(random_micro_model):
    model = random_micro_model.double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.7, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.2, 0.1, 0.5, 0.0], dtype=torch.float64)
    y = torch.tensor([0, 3, 7, 10])
    tangent = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    return model, x, t, r, y, tangent


def test_jvp_matches_central_difference_along_v_0_1(setting):
    model, x, t, r, y, tangent = setting
    v, u, dudt = u_and_dudt(model, x, t, r, y, tangent)
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    reference = central_difference_along(model, x, t, r, y, tangent, zeros, ones)
    assert relative_error(dudt, reference) < 1e-4
    # The primal outputs are the plain forward's.
    v_ref, u_ref = model(x, t, r, y)
    torch.testing.assert_close(u, u_ref)
    torch.testing.assert_close(v, v_ref)


def test_wrong_tangent_order_is_detected(setting):
    """(v, 1, 0) on (x, r, t) is a different derivative: our dudt must not match it."""
    model, x, t, r, y, tangent = setting
    _, _, dudt = u_and_dudt(model, x, t, r, y, tangent)
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    wrong = central_difference_along(model, x, t, r, y, tangent, ones, zeros)
    assert relative_error(dudt, wrong) > 0.1


def test_outputs_carry_gradients_and_dudt_does_not(random_micro_model):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.8, 0.6])
    v, u, dudt = u_and_dudt(random_micro_model, x, t, t / 2, torch.tensor([1, 2]), torch.randn_like(x))
    assert v.requires_grad and u.requires_grad and not dudt.requires_grad
    (v.sum() + u.sum()).backward()
    assert random_micro_model.u_head.final_layer.linear.weight.grad.abs().sum() > 0


def test_finite_difference_estimator_is_close_to_jvp(setting):
    model, x, t, r, y, tangent = setting
    _, _, exact = u_and_dudt(model, x, t, r, y, tangent)
    _, _, approx = u_and_dudt(model, x, t, r, y, tangent, estimator="finite_difference", fd_step=1e-4)
    assert relative_error(approx, exact) < 0.01


def test_unknown_estimator(setting):
    model, x, t, r, y, tangent = setting
    with pytest.raises(ValueError, match="unknown derivative estimator"):
        u_and_dudt(model, x, t, r, y, tangent, estimator="magic")


def test_dual_number_estimator_equals_functorch_jvp(setting):
    model, x, t, r, y, tangent = setting
    v, u, exact = u_and_dudt(model, x, t, r, y, tangent)
    v_dual, u_dual, dual = u_and_dudt(model, x, t, r, y, tangent, estimator="dual")
    torch.testing.assert_close(dual, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u_dual, u)
    assert u_dual.requires_grad and not dual.requires_grad



@pytest.mark.slow  # torch.compile, twice (fp32 and bf16)
def test_compiled_jvp_pass_equals_the_eager_one(random_micro_model):
    """`jvp.compile_jvp` (auto = on for CUDA) fuses the tangent pass with torch.compile; forced on
    here, on the CPU, it must give the eager derivative and leave v and u with their gradients. Also under
    bf16 autocast, where the JVP must stay fp32."""
    compiled_dudt = CompiledDudt()  # owned by the caller (each objective has one): no process-wide state
    g = torch.Generator().manual_seed(2)
    x, tangent = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t, r, y = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.2, 0.1, 0.5, 0.0]), torch.tensor([0, 3, 7, 10])
    v, u, eager = u_and_dudt(random_micro_model, x, t, r, y, tangent, compile_jvp="never")
    v_c, u_c, compiled = u_and_dudt(random_micro_model, x, t, r, y, tangent, compile_jvp="always",
                                    compiled_dudt=compiled_dudt)
    # The compiled kernels sum in another order than the eager ones: compared as the runtime check does
    # (relative norm of the difference; fp32 reordering gives ~1e-6, a wrong graph O(1)).
    assert relative_error(compiled, eager) <= CompiledDudt.tolerance
    assert compiled_dudt.verified and not compiled_dudt.disabled  # its one-time check against eager passed
    torch.testing.assert_close(u_c, u)
    assert u_c.requires_grad and v_c.requires_grad and not compiled.requires_grad
    assert relative_error(eager, torch.zeros_like(eager) + eager.mean()) > 0.1  # a real, non-constant derivative
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, u_bf16, compiled_bf16 = u_and_dudt(random_micro_model, x, t, r, y, tangent, compile_jvp="always",
                                              compiled_dudt=compiled_dudt)
    assert compiled_bf16.dtype == torch.float32 and u_bf16.dtype == torch.bfloat16
    assert relative_error(compiled_bf16, eager) <= CompiledDudt.tolerance


def test_compile_jvp_auto_is_on_for_cuda_only():
    from dumo_ray.flow.jvp import resolve_compile_jvp

    assert resolve_compile_jvp("auto", torch.device("cuda")) and not resolve_compile_jvp("auto", torch.device("cpu"))
    assert resolve_compile_jvp("always", torch.device("cpu")) and not resolve_compile_jvp("never", torch.device("cuda"))


@torch.no_grad()  # as u_and_dudt calls it
def test_a_compiled_jvp_that_fails_or_disagrees_with_eager_is_turned_off(random_micro_model):
    """The one-time check: a wrong compiled result (here a stand-in for a compiler fault) is caught on the
    first call with a non-zero derivative, warned about, replaced by the eager result, and not used again."""
    from dumo_ray.flow.jvp import dudt_pass

    g = torch.Generator().manual_seed(3)
    x, tangent = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    t, r, y = torch.tensor([0.9, 0.4]), torch.tensor([0.1, 0.2]), torch.tensor([1, 5])
    eager = dudt_pass(random_micro_model, x, t, r, y, tangent)
    checked = CompiledDudt()
    checked.compiled = lambda *args: 1.5 * dudt_pass(*args)
    with pytest.warns(UserWarning, match="differs from the eager one"):
        torch.testing.assert_close(checked(random_micro_model, x, t, r, y, tangent), eager)
    assert checked.disabled
    torch.testing.assert_close(checked(random_micro_model, x, t, r, y, tangent), eager)

    # A compile that fails (here: a stand-in raising as inductor does without a C compiler) falls back too.
    failing = CompiledDudt()

    def no_compiler(*args):
        raise RuntimeError("Failed to find C compiler")
    failing.compiled = no_compiler
    with pytest.warns(UserWarning, match="compiling the JVP failed .*Failed to find C compiler"):
        torch.testing.assert_close(failing(random_micro_model, x, t, r, y, tangent), eager)
    assert failing.disabled

    # A derivative that is exactly zero (a freshly initialised u-head) proves nothing: checked later.
    waiting = CompiledDudt()
    waiting.compiled = lambda model, x_t, *rest: torch.zeros_like(x_t)
    zero_model = lambda x_t, t_, r_, y_: (x_t * 0, x_t * 0)  # noqa: E731
    assert not waiting(zero_model, x, t, r, y, tangent).any() and not waiting.verified and not waiting.disabled
