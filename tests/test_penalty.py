import pytest
import torch

from hf_ewc.penalty import (
    Penalty,
    ewc_penalty,
    penalty_coefficients,
    penalty_gradient_,
    proximal_step_,
    proximal_weights,
    stabilized_coefficients,
    vanilla_coefficients,
)


def _case():
    omega = [torch.tensor([0.0, 1.0, 4.0]), torch.tensor([[2.0, 0.5], [10.0, 1e6]])]
    theta = [torch.tensor([1.0, 2.0, -1.0]), torch.tensor([[0.5, 0.0], [3.0, -2.0]])]
    anchor = [torch.tensor([0.0, 1.0, 1.0]), torch.tensor([[0.0, 1.0], [1.0, -1.0]])]
    return omega, theta, anchor


def test_vanilla_and_stabilized_coefficients_by_hand():
    omega, _, _ = _case()
    lam, eta = 3.0, 0.1
    vanilla = vanilla_coefficients(omega, lam)
    torch.testing.assert_close(vanilla[0], torch.tensor([0.0, 1.5, 6.0]))
    torch.testing.assert_close(vanilla[1], torch.tensor([[3.0, 0.75], [15.0, 1.5e6]]))
    stab = stabilized_coefficients(omega, lam, eta)
    # c = ½λΩ/(1+ηλΩ): Ω=1 → 1.5/1.3; Ω=4 → 6/2.2; Ω=2 → 3/1.6; Ω=0.5 → 0.75/1.15; Ω=10 → 15/4; Ω=1e6 → 1.5e6/300001
    torch.testing.assert_close(stab[0], torch.tensor([0.0, 1.5 / 1.3, 6.0 / 2.2]))
    torch.testing.assert_close(stab[1], torch.tensor([[3.0 / 1.6, 0.75 / 1.15], [15.0 / 4.0, 1.5e6 / 300001.0]]))
    assert penalty_coefficients(omega, lam, mode="vanilla")[1].equal(vanilla[1])


@pytest.mark.parametrize("eta", [1e-4, 1e-2, 1.0, 10.0])
@pytest.mark.parametrize("lam", [1e-3, 1.0, 1e3, 1e9])
def test_stabilized_coefficient_is_bounded_by_one_over_eta(lam, eta):
    omega = [torch.logspace(-8, 8, 101), torch.tensor([0.0, 1e30, float("inf")])]
    for o, c in zip(omega, stabilized_coefficients(omega, lam, eta)):
        assert bool(torch.isfinite(c).all()) and bool((c >= 0).all())
        # one SGD step on the penalty never passes the anchor: η·2c < 1, reaching 1.0 only by float32 rounding
        assert bool((eta * 2 * c <= 1).all())
        moderate = eta * lam * o.double() < 1e5
        assert bool((eta * 2 * c[moderate] < 1).all())


def test_penalty_value_and_gradient_by_hand():
    omega, theta, anchor = _case()
    params = [t.clone().requires_grad_(True) for t in theta]
    coefs = stabilized_coefficients(omega, 3.0, 0.1)
    value = ewc_penalty(params, anchor, coefs)
    expected = sum(float((c * (t - a) ** 2).sum()) for c, t, a in zip(coefs, theta, anchor))
    assert value.dtype == torch.float32 and value.ndim == 0
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)
    value.backward()
    for p, c, t, a in zip(params, coefs, theta, anchor):
        torch.testing.assert_close(p.grad, 2 * c * (t - a))


def test_penalty_gradient_is_zero_at_the_anchor():
    omega, _, anchor = _case()
    params = [a.clone().requires_grad_(True) for a in anchor]
    value = ewc_penalty(params, anchor, vanilla_coefficients(omega, 5.0))
    value.backward()
    assert float(value.detach()) == 0.0
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p))  # no NaN from the norm at 0


def test_penalty_matches_autograd_of_the_plain_formula():
    torch.manual_seed(1)
    shapes = [(3, 4), (7,), (2, 2, 2)]
    theta = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    anchor = [torch.randn(s, dtype=torch.float64) for s in shapes]
    coefs = [torch.rand(s, dtype=torch.float64) for s in shapes]
    assert torch.autograd.gradcheck(lambda *p: ewc_penalty(p, anchor, coefs).double(), theta)


def test_sqrt_coefficients_form_equals_coefficients_form():
    omega, theta, anchor = _case()
    coefs = vanilla_coefficients(omega, 2.0)
    a = ewc_penalty(theta, anchor, coefs)
    b = ewc_penalty(theta, anchor, sqrt_coefficients=[c.sqrt() for c in coefs])
    assert float(a.detach()) == pytest.approx(float(b.detach()))
    with pytest.raises(ValueError, match="exactly one"):
        ewc_penalty(theta, anchor)


def test_proximal_step_is_the_exact_implicit_step():
    omega, theta, anchor = ([t.double() for t in ts] for ts in _case())
    lam, eta = 3.0, 0.1
    params = [t.clone() for t in theta]
    proximal_step_(params, anchor, proximal_weights(omega, lam, eta))
    for p, o, t, a in zip(params, omega, theta, anchor):
        torch.testing.assert_close(p, a + (t - a) / (1 + eta * lam * o))
        # it minimises ‖θ − θ̃‖²/(2η) + ½λΩ(θ − θ*)²: the gradient of that objective vanishes at the result
        torch.testing.assert_close((p - t) / eta + lam * o * (p - a), torch.zeros_like(p), atol=1e-6, rtol=0)


def test_stabilized_sgd_step_never_overshoots_while_vanilla_does():
    omega = [torch.tensor([1.0, 50.0, 1e4])]
    lam, eta = 10.0, 0.1  # ηλΩ = 1, 50, 1e4
    theta, anchor = [torch.tensor([1.0, 1.0, 1.0])], [torch.zeros(3)]
    for mode, overshoot in (("vanilla", True), ("stabilized", False)):
        p = [theta[0].clone().requires_grad_(True)]
        ewc_penalty(p, anchor, penalty_coefficients(omega, lam, mode=mode, lr=eta)).backward()
        stepped = p[0].detach() - eta * p[0].grad
        assert bool((stepped < 0).any()) == overshoot
        if not overshoot:
            assert bool(((stepped >= 0) & (stepped <= 1)).all())


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_lambda_is_refused(bad):
    with pytest.raises(ValueError, match="ewc_lambda"):
        vanilla_coefficients([torch.ones(2)], bad)
    with pytest.raises(ValueError, match="ewc_lambda"):
        stabilized_coefficients([torch.ones(2)], bad, 0.1)


def test_bad_mode_and_missing_lr_are_refused():
    with pytest.raises(ValueError, match="choose one of: stabilized, vanilla"):
        penalty_coefficients([torch.ones(2)], 1.0, mode="proximal")
    with pytest.raises(ValueError, match="step size"):
        penalty_coefficients([torch.ones(2)], 1.0, mode="stabilized")
    with pytest.raises(ValueError, match="η"):
        stabilized_coefficients([torch.ones(2)], 1.0, 0.0)


def test_workspace_form_equals_allocating_form_and_is_reused():
    omega, theta, anchor = _case()
    coefs = stabilized_coefficients(omega, 3.0, 0.1)
    workspace = [torch.empty_like(t) for t in theta]
    for _ in range(2):  # the same buffers serve call after call
        p1 = [t.clone().requires_grad_(True) for t in theta]
        p2 = [t.clone().requires_grad_(True) for t in theta]
        a = ewc_penalty(p1, anchor, coefs)
        b = ewc_penalty(p2, anchor, coefs, workspace=workspace)
        assert float(a.detach()) == pytest.approx(float(b.detach()))
        (a + b).backward()
        for x, y in zip(p1, p2):
            torch.testing.assert_close(x.grad, y.grad)
        # autograd never keeps the workspace as .grad: the next call overwrites it
        assert not any(y.grad.data_ptr() == w.data_ptr() for y, w in zip(p2, workspace))


def test_workspace_form_refuses_a_second_backward():
    omega, theta, anchor = _case()
    params = [t.clone().requires_grad_(True) for t in theta]
    value = ewc_penalty(
        params, anchor, vanilla_coefficients(omega, 1.0), workspace=[torch.empty_like(t) for t in theta]
    )
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per call"):
        value.backward()


def test_direct_gradient_equals_autograd_and_is_exactly_zero_at_the_anchor():
    omega, theta, anchor = _case()
    coefficients = stabilized_coefficients(omega, 3.0, 0.1)
    params = [torch.nn.Parameter(t.clone()) for t in theta]
    ewc_penalty(params, anchor, coefficients).backward()
    expected = [p.grad.clone() for p in params]
    direct = [torch.nn.Parameter(t.clone()) for t in theta]
    direct[0].grad = torch.full_like(direct[0], 0.25)  # an existing gradient is added to; a missing one is created
    two_c = [2 * c for c in coefficients]
    penalty_gradient_(direct, anchor, two_c, [torch.empty_like(t) for t in theta], scale=4.0)
    torch.testing.assert_close(direct[0].grad, 0.25 + 4.0 * expected[0])
    torch.testing.assert_close(direct[1].grad, 4.0 * expected[1])
    at_anchor = [torch.nn.Parameter(a.clone() + 1e3) for a in anchor]  # far from 0: 2c·θ − 2c·θ* would not cancel
    penalty_gradient_(at_anchor, [a + 1e3 for a in anchor], two_c, [torch.empty_like(t) for t in theta])
    assert all(bool((p.grad == 0).all()) for p in at_anchor)


def test_penalty_object_value_gradient_and_loss_agree():
    omega, theta, anchor = _case()
    params = {f"p{i}": torch.nn.Parameter(t.clone()) for i, t in enumerate(theta)}
    anchors = {f"p{i}": a for i, a in enumerate(anchor)}
    importances = {f"p{i}": o for i, o in enumerate(omega)}
    penalty = Penalty.build(params, anchors, importances, mode="stabilized", ewc_lambda=3.0, lr=0.1)
    coefficients = stabilized_coefficients(omega, 3.0, 0.1)
    expected = sum(float((c * (t - a) ** 2).sum()) for c, t, a in zip(coefficients, theta, anchor))
    assert penalty.value() == pytest.approx(expected, rel=1e-6)
    assert float(penalty.loss().detach()) == pytest.approx(expected, rel=1e-6)
    assert penalty.omega_mean == pytest.approx(float(sum(o.sum() for o in omega)) / 7)
    penalty.loss().backward()
    via_autograd = [p.grad.clone() for p in params.values()]
    for p in params.values():
        p.grad = None
    penalty.add_gradient_()
    for p, g in zip(params.values(), via_autograd):
        torch.testing.assert_close(p.grad, g)
