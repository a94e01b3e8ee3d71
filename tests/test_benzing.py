"""Benzing's estimators (sqrt_fisher, af, masx; siu, sib, sos, onaf) and Kutalev's signal rule for biases, each
against an independent reference written out here."""

import copy

import pytest
import torch
from testing_utils import MLP, lm_samples, tiny_gpt2, vec_samples
from transformers import TrainerCallback, default_data_collator

from hf_ewc import EWCConfig, EWCState, EWCTrainer, HfEwcError, collect_importance
from hf_ewc.importance import IndependentBatches, SIAccumulator


# ---------------------------------------------------------------------------------------------- collected methods
def _per_sample_reference(model, samples, objectives):
    """``(1/N) Σ_n Σ_j transform_j(∇ objective_j(logits_n))`` in float64, one sample and one objective at a time."""
    model = copy.deepcopy(model).double().eval()
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in samples:
        logits = model(pixel_values=s["pixel_values"].double()[None])["logits"][0]
        for objective, transform in objectives(logits):
            grads = torch.autograd.grad(objective, list(params.values()), retain_graph=True)
            for n, g in zip(params, grads):
                out[n] += transform(g)
    return {n: v / len(samples) for n, v in out.items()}


def _exact_fisher_objectives(logits):
    logp = logits.log_softmax(-1)
    for c in range(logits.shape[-1]):
        p = float(logp[c].detach().exp())
        yield logp[c], lambda g, p=p: p * g.square()


def _af_objectives(logits):
    logp = logits.log_softmax(-1)
    for c in range(logits.shape[-1]):
        p = float(logp[c].detach().exp())
        yield logp[c], lambda g, p=p: p * g.abs()


def _masx_objectives(logits):
    yield logits.softmax(-1).max().square(), torch.abs


def _assert_close(got, want):
    for n, v in want.items():
        torch.testing.assert_close(got[n].double(), v, rtol=1e-4, atol=1e-8)


def test_sqrt_fisher_is_the_root_of_the_exact_fisher():
    model, samples = MLP(), vec_samples(12)
    got = collect_importance(model, samples, method="sqrt_fisher", estimator="exact", show_progress=False)
    want = _per_sample_reference(model, samples, _exact_fisher_objectives)
    _assert_close(got, {n: v.sqrt() for n, v in want.items()})


def test_absolute_fisher_against_a_per_class_loop():
    model, samples = MLP(), vec_samples(12)
    got = collect_importance(model, samples, method="af", show_progress=False)
    _assert_close(got, _per_sample_reference(model, samples, _af_objectives))


def test_masx_is_mas_on_the_max_probability():
    model, samples = MLP(), vec_samples(12)
    got = collect_importance(model, samples, method="masx", show_progress=False)
    _assert_close(got, _per_sample_reference(model, samples, _masx_objectives))
    mas = collect_importance(model, samples, method="mas", show_progress=False)
    assert any(not torch.allclose(mas[n], got[n]) for n in got)  # a different quantity


def test_absolute_fisher_on_a_language_model_averages_positions():
    model = tiny_gpt2()
    samples = lm_samples(3, pad_last=2)
    got = collect_importance(
        model, samples, method="af", max_backward_per_batch=10_000, batch_size=3, show_progress=False
    )
    ref = copy.deepcopy(model).double().eval()
    params = dict(ref.named_parameters())
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in samples:
        mask = s["labels"][1:] != -100
        logits = ref(input_ids=s["input_ids"][None], attention_mask=s["attention_mask"][None]).logits[0, :-1]
        logp = logits.log_softmax(-1)
        positions = [t for t in range(len(mask)) if mask[t]]
        for t in positions:
            for c in range(logp.shape[-1]):
                grads = torch.autograd.grad(logp[t, c], list(params.values()), retain_graph=True, allow_unused=True)
                for n, g in zip(params, grads):
                    if g is not None:
                        want[n] += float(logp[t, c].detach().exp()) * g.abs() / len(positions)
    _assert_close(got, {n: v / len(samples) for n, v in want.items()})


def test_absolute_fisher_refuses_a_batch_too_costly():
    with pytest.raises(HfEwcError, match=r"absolute Fisher \(af\) needs .* backward passes"):
        collect_importance(tiny_gpt2(), lm_samples(2), method="af", show_progress=False)


# ---------------------------------------------------------------------------------------------- the SI family
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
        "seed": 0,
        "si_damping": 0.1,
        "importance_normalization": "none",
    }
    defaults.update(kwargs)
    return EWCConfig(**defaults)


class Recorder(TrainerCallback):
    def __init__(self, model):
        self.model = model
        self.grads, self.before, self.end = [], [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters()})

    def on_step_end(self, args, state, control, **kwargs):
        self.end.append({n: p.detach().clone() for n, p in self.model.named_parameters()})


def _train(tmp_path, method, model=None, samples=None, **kwargs):
    model = model if model is not None else MLP()
    samples = samples if samples is not None else vec_samples(16)
    rec = Recorder(model)
    args = make_args(tmp_path, importance_method=method, **kwargs)
    trainer = EWCTrainer(model=model, args=args, train_dataset=samples, callbacks=[rec])
    trainer.train()
    return trainer, rec


def _independent_reference(model, samples, rec, *, batch_size=2, accumulation=2):
    """u_k for every step: the mean cross-entropy of each drawn micro-batch / accumulation, at θ before the step,
    dropout off, in float64."""
    draws = IndependentBatches(
        samples, default_data_collator, batch_size=batch_size, accumulation=accumulation, seed=0
    )
    out = []
    for k, before in enumerate(rec.before):
        ref = copy.deepcopy(model).double().eval()
        ref.load_state_dict({n: v.double() for n, v in before.items()})
        params = dict(ref.named_parameters())
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for chunk in draws.indices(k):
            x = torch.stack([samples[i]["pixel_values"] for i in chunk]).double()
            y = torch.stack([samples[i]["labels"] for i in chunk])
            loss = torch.nn.functional.cross_entropy(ref(pixel_values=x)["logits"], y) / accumulation
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
                total[n] += g
        out.append(total)
    return out


def _si_omega(rec, grads):
    return {n: sum(-grads[k][n].double() * (rec.end[k][n] - rec.before[k][n]).double() for k in range(len(rec.end)))
            for n in rec.end[0]}  # fmt: skip


def _omega(trainer):
    return {n: w.double() for n, w in zip(trainer._si.names, trainer._si.omega)}


def test_siu_and_sib_decompose_si_and_match_an_independent_reference(tmp_path):
    model0, samples = MLP(), vec_samples(16)
    runs = {m: _train(tmp_path, m, copy.deepcopy(model0), samples) for m in ("si", "siu", "sib")}
    _, rec = runs["siu"]
    u = _independent_reference(model0, samples, rec)
    g = rec.grads
    want_siu = _si_omega(rec, u)
    want_sib = _si_omega(rec, [{n: g[k][n].double() - u[k][n] for n in g[k]} for k in range(len(g))])
    for n in want_siu:
        torch.testing.assert_close(_omega(runs["siu"][0])[n], want_siu[n], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(_omega(runs["sib"][0])[n], want_sib[n], rtol=1e-4, atol=1e-9)
        # ω_SI = ω_SIU + ω_SIB, from three separate runs on the same trajectory
        torch.testing.assert_close(
            _omega(runs["si"][0])[n], _omega(runs["siu"][0])[n] + _omega(runs["sib"][0])[n], rtol=1e-4, atol=1e-9
        )
    assert max(float(w.abs().max()) for w in want_sib.values()) > 0
    state = runs["siu"][0].consolidate(domain="a")
    start = {n: p.detach() for n, p in model0.named_parameters()}
    for n, omega in want_siu.items():
        delta = rec.end[-1][n].double() - start[n].double()
        torch.testing.assert_close(
            state.importances[n].double(), (omega / (delta.square() + 0.1)).clamp(min=0), rtol=1e-4, atol=1e-9
        )
    assert state.domains[0]["method"] == "siu"


def test_the_independent_gradient_does_not_depend_on_gradient_accumulation(tmp_path):
    model0, samples = MLP(), vec_samples(16)
    a, _ = _train(tmp_path / "a", "siu", copy.deepcopy(model0), samples, per_device_train_batch_size=4,
                  gradient_accumulation_steps=1)  # fmt: skip
    b, _ = _train(tmp_path / "b", "siu", copy.deepcopy(model0), samples)
    for n, w in _omega(a).items():
        torch.testing.assert_close(w, _omega(b)[n], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_sos_is_the_bias_corrected_rms_of_the_gradient_or_of_its_noise(tmp_path, alpha):
    model0, samples = MLP(), vec_samples(16)
    trainer, rec = _train(tmp_path, "sos", copy.deepcopy(model0), samples, sos_alpha=alpha)
    u = _independent_reference(model0, samples, rec) if alpha else None
    beta, steps = 0.999, len(rec.grads)
    state = trainer.consolidate()
    for n in rec.grads[0]:
        s = torch.zeros_like(rec.grads[0][n], dtype=torch.float64)
        for k in range(steps):
            noise = (alpha * u[k][n] if alpha else 0) - rec.grads[k][n].double()
            s = beta * s + (1 - beta) * noise.square()
        torch.testing.assert_close(state.importances[n].double(), (s / (1 - beta**steps)).sqrt(), rtol=1e-4, atol=1e-9)
    assert state.domains[0]["options"]["sos_alpha"] == alpha


def test_onaf_is_the_mean_absolute_gradient_over_steps(tmp_path):
    trainer, rec = _train(tmp_path, "onaf")
    state = trainer.consolidate()
    for n in rec.grads[0]:
        want = sum(g[n].double().abs() for g in rec.grads) / len(rec.grads)
        torch.testing.assert_close(state.importances[n].double(), want, rtol=1e-5, atol=1e-9)


def test_si_family_checkpoint_of_another_method_is_refused(tmp_path):
    params = dict(MLP().named_parameters())
    si = SIAccumulator(params, method="sib")
    si.steps = 1
    si.save(tmp_path)
    with pytest.raises(HfEwcError, match="holds running sib sums, but this run collects siu"):
        SIAccumulator(params, method="siu").load(tmp_path)


def test_si_family_bad_settings(tmp_path):
    with pytest.raises(ValueError, match=r"sos_alpha must be in \[0, 1\], got 1.5"):
        make_args(tmp_path, importance_method="sos", sos_alpha=1.5)
    with pytest.raises(ValueError, match="Unknown importance_method 'siux'; choose one of: fisher, sqrt_fisher"):
        make_args(tmp_path, importance_method="siux")
    trainer = EWCTrainer(model=MLP(), args=make_args(tmp_path, importance_method="sib"), train_dataset=vec_samples(4))
    with pytest.raises(HfEwcError, match=r"sib importances come from training steps: call trainer.train\(\)"):
        trainer.consolidate()
    with pytest.raises(HfEwcError, match="'siu' is accumulated during training"):
        collect_importance(MLP(), vec_samples(4), method="siu")


# ---------------------------------------------------------------------------------------------- signal bias rule
def test_signal_activation_rule_uses_post_activation_outputs_and_softmax_at_the_output():
    model, samples = MLP(), vec_samples(10)
    got = collect_importance(model, samples, method="signal", bias="activation", show_progress=False)
    x = torch.stack([s["pixel_values"] for s in samples])
    with torch.no_grad():
        h0 = model.net[1](model.net[0](x))
        h1 = model.net[3](model.net[2](h0))
        probs = model.net[4](h1).softmax(-1)
    torch.testing.assert_close(got["net.0.bias"], h0.abs().mean(0))
    torch.testing.assert_close(got["net.2.bias"], h1.abs().mean(0))
    torch.testing.assert_close(got["net.4.bias"], probs.mean(0))
    torch.testing.assert_close(got["net.2.weight"], model.net[2].weight.detach().abs() * h0.abs().mean(0))


def test_signal_activation_rule_on_gpt2_follows_the_activation_module():
    model = tiny_gpt2()
    samples = lm_samples(4, pad_last=2)
    got = collect_importance(model, samples, method="signal", bias="activation", batch_size=4, show_progress=False)
    mlp, attn = model.transformer.h[0].mlp, model.transformer.h[0].attn
    seen = {}
    hooks = [
        mlp.c_fc.register_forward_hook(lambda m, a, o: seen.__setitem__("fc", o.detach())),
        attn.c_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o.detach())),
    ]
    batch = default_data_collator(samples)
    with torch.no_grad():
        model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    mask = batch["attention_mask"].float().unsqueeze(-1)

    def mean_abs(z):
        return ((z.abs() * mask).sum(1) / mask.sum(1)).mean(0)

    torch.testing.assert_close(got["transformer.h.0.mlp.c_fc.bias"], mean_abs(mlp.act(seen["fc"])))
    torch.testing.assert_close(got["transformer.h.0.attn.c_attn.bias"], mean_abs(seen["attn"]))  # no activation


def test_signal_bias_rule_reaches_the_trainer(tmp_path):
    args = make_args(tmp_path, importance_method="signal", signal_bias="activation", max_steps=1)
    model, samples = MLP(), vec_samples(8)
    trainer = EWCTrainer(model=model, args=args, train_dataset=samples)
    trainer.train()
    state = trainer.consolidate()
    assert state.domains[0]["options"]["bias"] == "activation"
    want = collect_importance(model, samples, method="signal", bias="activation", show_progress=False)
    assert not torch.allclose(want["net.0.bias"], model.net[0].bias.detach().abs())  # differs from the |b| rule
    torch.testing.assert_close(state.importances["net.0.bias"], want["net.0.bias"])


def test_signal_activation_rule_counts_every_call_of_a_shared_layer():
    class Shared(torch.nn.Module):
        """One Linear applied twice (weight sharing, ALBERT-style), each time into a ReLU."""

        def __init__(self):
            super().__init__()
            self.inp, self.shared, self.act, self.out = (
                torch.nn.Linear(6, 5), torch.nn.Linear(5, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4),
            )  # fmt: skip

        def forward(self, pixel_values, labels=None):
            h1 = self.act(self.shared(self.inp(pixel_values)))
            return {"logits": self.out(self.act(self.shared(h1)))}

    model, samples = Shared(), vec_samples(8)
    got = collect_importance(model, samples, method="signal", bias="activation", show_progress=False)
    x = torch.stack([s["pixel_values"] for s in samples])
    with torch.no_grad():
        first = torch.relu(model.shared(model.inp(x)))
        second = torch.relu(model.shared(first))
    torch.testing.assert_close(got["shared.bias"], first.abs().mean(0) + second.abs().mean(0))


def test_independent_minibatches_drop_the_fields_the_model_does_not_take(tmp_path):
    """A plain torch dataset with an extra key: the Trainer's loader drops it, and so must the independent draws."""
    samples = [{**s, "idx": i} for i, s in enumerate(vec_samples(16))]
    trainer, _ = _train(tmp_path, "siu", samples=samples)
    assert trainer._si.steps == 4 and sum(float(w.abs().sum()) for w in trainer._si.omega) > 0


def test_sos_resumed_with_another_alpha_is_refused(tmp_path):
    params = dict(MLP().named_parameters())
    si = SIAccumulator(params, method="sos", sos_alpha=1.0)
    si.steps = 1
    si.save(tmp_path)
    with pytest.raises(HfEwcError, match="sos_alpha=1, but this run uses sos_alpha=0"):
        SIAccumulator(params, method="sos", sos_alpha=0.0).load(tmp_path)


def test_sib_is_the_same_whether_si_reads_the_task_or_the_regularized_gradient(tmp_path):
    """With an active penalty, `regularized` adds the penalty's gradient to g; it is added to u as well, so the bias
    g − u (and the SOS noise) does not change."""
    model0, samples = MLP(), vec_samples(16)
    importances = collect_importance(model0, samples, show_progress=False)
    state = EWCState().consolidate(model0, importances, domain="a", normalization="none")
    with torch.no_grad():
        for p in model0.parameters():
            p.add_(0.1)
    omegas = {}
    for gradient in ("task", "regularized"):
        model = copy.deepcopy(model0)
        args = make_args(tmp_path / gradient, importance_method="sib", si_gradient=gradient, ewc_lambda=100.0)
        trainer = EWCTrainer(model=model, args=args, train_dataset=samples, ewc_state=copy.deepcopy(state))
        trainer.train()
        assert trainer._si._penalty is not None
        omegas[gradient] = _omega(trainer)
    for n, w in omegas["task"].items():
        torch.testing.assert_close(omegas["regularized"][n], w, rtol=1e-5, atol=1e-9)
