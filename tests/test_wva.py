"""WVA (ewc_mode="wva") against hand computations: deltas and gradients, SGD and Adam, GA, weight decay, pruning."""

import copy

import pytest
import torch
from testing_utils import MLP, vec_samples
from transformers import TrainerCallback

from hf_ewc import EWCConfig, EWCState, EWCTrainer, HfEwcError, KeepSparsityCallback, collect_importance
from hf_ewc.trainer_support import refuse_unsupported
from hf_ewc.wva import Attenuation, attenuation_factors


def make_args(tmp_path, **kwargs) -> EWCConfig:
    defaults = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "num_train_epochs": 1,
        "learning_rate": 0.05,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "logging_steps": 1,
        "seed": 0,
        "ewc_mode": "wva",
        "ewc_lambda": 2.0,
        "weight_decay": 0.0,
    }
    defaults.update(kwargs)
    return EWCConfig(**defaults)


def state_for(model, samples) -> EWCState:
    importances = collect_importance(model, samples, method="mas", show_progress=False)
    return EWCState().consolidate(model, importances, domain="a")  # mean-normalized Ω


class Recorder(TrainerCallback):
    """Registered before EWCTrainer's callback: sees the gradient before any attenuation and θ right after
    ``optimizer.step()``, before WVA's delta attenuation."""

    def __init__(self, model):
        self.model = model
        self.grads, self.before, self.stepped, self.end = [], [], [], []

    def _snap(self):
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before.append(self._snap())
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters()})

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.stepped.append(self._snap())

    def on_step_end(self, args, state, control, **kwargs):
        self.end.append(self._snap())


def hand_factors(state: EWCState, lam: float, kind: str) -> dict[str, torch.Tensor]:
    out = {}
    for n, omega in state.importances.items():
        omega = omega.double()
        out[n] = 1 / (1 + lam * omega) if kind == "hyperbolic" else torch.exp(-lam * omega)
    return out


def reference_run(model0, rec, factors, *, optim, apply, lr, weight_decay=0.0, masks=None):
    """The trajectory replayed from the recorded gradients with a fresh torch optimizer: ``g ← a·g`` before the
    step (gradients) or ``θ ← θ_prev + a·(θ − θ_prev)`` after it (deltas), then the pruning masks."""
    model = copy.deepcopy(model0).double()
    params = dict(model.named_parameters())
    decay = [p for n, p in params.items() if "bias" not in n]
    no_decay = [p for n, p in params.items() if "bias" in n]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=lr) if optim == "sgd" else torch.optim.AdamW(groups, lr=lr, eps=1e-8)
    out = []
    for grads in rec.grads:
        before = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.grad = grads[n].double() * (factors[n] if apply == "gradients" else 1.0)
        opt.step()
        with torch.no_grad():
            for n, p in params.items():
                if apply == "deltas":
                    p.copy_(before[n] + factors[n] * (p - before[n]))
                if masks is not None and n in masks:
                    p.mul_(masks[n].double())
        out.append({n: p.detach().clone() for n, p in params.items()})
    return out


@pytest.mark.parametrize(
    ("optim", "apply", "kind", "weight_decay"),
    [
        ("sgd", "deltas", "hyperbolic", 0.0),
        ("sgd", "gradients", "exponential", 0.0),
        ("adamw_torch", "deltas", "hyperbolic", 0.1),
        ("adamw_torch", "gradients", "hyperbolic", 0.0),
    ],
)
def test_wva_step_matches_hand_computation(tmp_path, optim, apply, kind, weight_decay):
    model = MLP()
    samples = vec_samples(16)
    state = state_for(model, samples)
    model0 = copy.deepcopy(model)
    lr = 0.05 if optim == "sgd" else 0.01
    args = make_args(
        tmp_path, optim=optim, learning_rate=lr, wva_apply=apply, wva_attenuation=kind, weight_decay=weight_decay
    )
    rec = Recorder(model)
    trainer = EWCTrainer(model=model, args=args, train_dataset=samples, ewc_state=state, callbacks=[rec])
    trainer.train()
    assert trainer.state.global_step == 4 == len(rec.end)  # 16 samples / (2 × 2): GA steps, not micro-batches
    factors = hand_factors(state, 2.0, kind)
    assert min(float(a.min()) for a in factors.values()) < 0.5  # the attenuation is not negligible
    expected = reference_run(model0, rec, factors, optim=optim, apply=apply, lr=lr, weight_decay=weight_decay)
    for got, want in zip(rec.end, expected):
        for n in want:
            torch.testing.assert_close(got[n].double(), want[n], rtol=1e-5, atol=1e-7)
    logs = [log for log in trainer.state.log_history if "ewc/attenuation_min" in log]
    assert len(logs) == 4 and logs[0]["ewc/attenuation_min"] == pytest.approx(
        min(float(a.min()) for a in factors.values()), rel=1e-5
    )
    assert not any("ewc/penalty" in log for log in trainer.state.log_history)  # no loss term


def test_wva_on_plain_sgd_is_the_same_on_deltas_and_on_gradients(tmp_path):
    samples = vec_samples(16)
    base = MLP()
    state = state_for(base, samples)
    ends = {}
    for apply in ("deltas", "gradients"):
        model = copy.deepcopy(base)
        EWCTrainer(
            model=model, args=make_args(tmp_path, wva_apply=apply), train_dataset=samples, ewc_state=state
        ).train()
        ends[apply] = dict(model.named_parameters())
    for n, p in ends["deltas"].items():
        torch.testing.assert_close(p, ends["gradients"][n], rtol=1e-6, atol=1e-7)
    moved = sum(float((p - dict(base.named_parameters())[n]).abs().sum().detach()) for n, p in ends["deltas"].items())
    assert moved > 0


def test_wva_keeps_pruned_weights_at_zero_after_the_attenuated_step(tmp_path):
    model = MLP()
    samples = vec_samples(16)
    state = state_for(model, samples)
    g = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(p.shape, generator=g) > 0.5 for n, p in model.named_parameters() if n.endswith("weight")}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    model0 = copy.deepcopy(model)
    rec = Recorder(model)
    args = make_args(tmp_path, optim="adamw_torch", learning_rate=0.01)
    trainer = EWCTrainer(
        model=model, args=args, train_dataset=samples, ewc_state=state,
        callbacks=[rec, KeepSparsityCallback(masks)],
    )  # fmt: skip
    trainer.train()
    expected = reference_run(
        model0, rec, hand_factors(state, 2.0, "hyperbolic"), optim="adamw", apply="deltas", lr=0.01, masks=masks
    )
    for got, want in zip(rec.end, expected):
        for n in want:
            torch.testing.assert_close(got[n].double(), want[n], rtol=1e-5, atol=1e-7)
            if n in masks:
                assert bool((got[n][~masks[n]] == 0).all())


def test_si_reads_the_unattenuated_gradient_under_gradient_attenuation(tmp_path):
    model = MLP()
    samples = vec_samples(16)
    state = state_for(model, samples)
    rec = Recorder(model)
    args = make_args(tmp_path, wva_apply="gradients", importance_method="si", si_damping=0.1)
    trainer = EWCTrainer(model=model, args=args, train_dataset=samples, ewc_state=state, callbacks=[rec])
    trainer.train()
    for n, _ in model.named_parameters():
        omega = sum(-rec.grads[k][n].double() * (rec.end[k][n] - rec.before[k][n]).double() for k in range(4))
        i = trainer._si.names.index(n)
        torch.testing.assert_close(trainer._si.omega[i].double(), omega, rtol=1e-4, atol=1e-8)


def test_attenuation_factors_and_gradient_factors():
    omega = [torch.tensor([0.0, 1.0, 3.0, 1e6])]
    hyper = attenuation_factors(omega, 2.0, "hyperbolic")[0]
    torch.testing.assert_close(hyper, torch.tensor([1.0, 1 / 3, 1 / 7, 1 / (1 + 2e6)]))
    expo = attenuation_factors(omega, 2.0, "exponential")[0]
    torch.testing.assert_close(expo, torch.tensor([1.0, float(torch.exp(torch.tensor(-2.0))), 0.0024787521, 0.0]))
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    wva = Attenuation.build({"p": p}, {"p": omega[0]}, ewc_lambda=2.0, attenuation="exponential", apply="gradients")
    wva.before_step()
    torch.testing.assert_close(p.grad, expo)
    assert wva.factor_min == 0.0 and wva.factor_mean == pytest.approx(float(expo.mean()))
    with pytest.raises(ValueError, match="choose one of: hyperbolic, exponential"):
        attenuation_factors(omega, 1.0, "linear")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"wva_attenuation": "linear"}, "Unknown wva_attenuation 'linear'; choose one of: hyperbolic, exponential"),
        ({"wva_apply": "weights"}, "Unknown wva_apply 'weights'; choose one of: deltas, gradients"),
        ({"ewc_lr": 0.1}, "ewc_mode='wva' has neither"),
    ],
)
def test_wva_bad_settings_are_refused_with_the_choices(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **kwargs)


def test_wva_under_deepspeed_is_refused(tmp_path):
    with pytest.raises(HfEwcError, match="'wva'.*not supported under DeepSpeed"):
        refuse_unsupported(make_args(tmp_path), fsdp=False, deepspeed=True)


def test_wva_gradients_with_weight_decay_warns(tmp_path, hf_logs):
    model = MLP()
    samples = vec_samples(8)
    state = state_for(model, samples)
    args = make_args(tmp_path, wva_apply="gradients", weight_decay=0.01, optim="adamw_torch", max_steps=1)
    EWCTrainer(model=model, args=args, train_dataset=samples, ewc_state=state).train()
    assert any("does not attenuate AdamW's decoupled weight decay" in r.getMessage() for r in hf_logs)
