"""Importances against independent per-sample references written out here with explicit loops."""

import gzip
import itertools
import json
from pathlib import Path

import pytest
import torch
from testing_utils import (
    MLP,
    assert_tensors_close,
    cls_samples,
    lm_samples,
    tiny_bert_classifier,
    tiny_bert_mlm,
    tiny_gpt2,
    tiny_llama,
    vec_samples,
)
from torch import nn
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, default_data_collator

from hf_ewc import HfEwcError, collect_importance
from hf_ewc.importance import CollectionSpec, collect
from hf_ewc.pipeline.prepare import train_tokenizer


MODELS = {
    "gpt2": (tiny_gpt2, lambda: lm_samples(10, pad_last=3), True),
    "llama": (tiny_llama, lambda: lm_samples(10, pad_last=3), True),
    "bert_mlm": (tiny_bert_mlm, lambda: lm_samples(10, pad_last=3), False),
    "bert_cls": (tiny_bert_classifier, lambda: cls_samples(10), False),
    "mlp": (MLP, lambda: vec_samples(10), False),
}

CORPORA = Path(__file__).resolve().parents[1] / "hf_ewc" / "resources" / "corpora"


def _positions(model, sample, shift):
    """Logits [T, V] and labels [T] of one sample at its counted positions (labels −100 dropped)."""
    batch = {k: v.unsqueeze(0) for k, v in sample.items()}
    out = model(**batch)
    logits = out["logits"][0]
    labels = batch["labels"][0]
    if logits.ndim == 1:
        return logits.unsqueeze(0), labels.reshape(1)
    if shift:
        logits, labels = logits[:-1], labels[1:]
    keep = labels != -100
    return logits[keep], labels[keep]


def _reference(model, samples, per_sample_objective, transform, shift):
    """(1/N) Σ_n transform(∇ objective_n): one sample at a time, gradients by torch.autograd.grad."""
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [dict(model.named_parameters())[n] for n in names]
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, params)}
    count = 0
    for sample in samples:
        logits, labels = _positions(model, sample, shift)
        if len(labels) == 0:
            continue
        for objective in per_sample_objective(logits, labels):
            grads = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    total[n] += transform(g.double())
        count += 1
    return {n: (t / count).float() for n, t in total.items()}


def _over_positions(values):
    """A sample's objective from its positions' values: the sum weighted by 1/√T (see importance/fisher.py)."""
    return values.sum() / len(values) ** 0.5


def _empirical(logits, labels):
    yield _over_positions(torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1))


def _mas_probs(logits, labels):
    yield logits.softmax(-1).square().sum(-1).mean()  # MAS: the mean over positions (see importance/mas.py)


def _exact(logits, labels):
    logp = torch.log_softmax(logits, -1)
    T = len(labels)
    for t in range(T):
        for c in range(logits.shape[-1]):
            yield logp[t, c].detach().exp().sqrt() * logp[t, c] / T**0.5


def assert_importances_close(got, expected, rtol=1e-4):
    assert all(v.dtype == torch.float32 for v in got.values())
    assert_tensors_close(got, expected, rtol=rtol, atol=rtol, relative_to="all")


@pytest.mark.parametrize("name", list(MODELS))
def test_empirical_fisher_matches_per_sample_reference(name):
    factory, data, shift = MODELS[name]
    model, samples = factory(), data()
    expected = _reference(model, samples, _empirical, torch.square, shift)
    for engine in ("auto", "loop"):
        got = collect_importance(model, samples, "fisher", batch_size=4, per_sample=engine, show_progress=False)
        assert_importances_close(got, expected)


@pytest.mark.parametrize("name", ["gpt2", "bert_cls", "mlp"])
def test_mas_matches_per_sample_reference(name):
    factory, data, shift = MODELS[name]
    model, samples = factory(), data()
    expected = _reference(model, samples, _mas_probs, torch.abs, shift)
    got = collect_importance(model, samples, "mas", batch_size=4, show_progress=False)
    assert_importances_close(got, expected)


def test_mas_on_logits_differs_from_probs_and_matches_reference():
    model, samples = tiny_bert_classifier(), cls_samples(8)

    def on_logits(logits, labels):
        yield logits.square().sum(-1).mean()

    expected = _reference(model, samples, on_logits, torch.abs, False)
    got = collect_importance(model, samples, "mas", output="logits", batch_size=3, show_progress=False)
    assert_importances_close(got, expected)
    probs = collect_importance(model, samples, "mas", output="probs", batch_size=3, show_progress=False)
    assert not torch.allclose(probs["classifier.weight"], got["classifier.weight"])


@pytest.mark.parametrize("name", ["bert_cls", "mlp"])
def test_exact_fisher_for_classifiers_matches_reference(name):
    factory, data, shift = MODELS[name]
    model, samples = factory(), data()
    expected = _reference(model, samples, _exact, torch.square, shift)
    got = collect_importance(model, samples, "fisher", estimator="exact", batch_size=4, show_progress=False)
    assert_importances_close(got, expected)


def test_exact_fisher_for_a_causal_lm_equals_the_brute_force_expectation():
    """E_y[(∇ Σ_t log p(y_t)/√T)²] by enumerating every label sequence, vs the per-position formula."""
    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=4, n_embd=8, n_layer=1, n_head=2, n_positions=8))
    ids = torch.tensor([[1, 3, 2], [2, 0, 1]])
    samples = [{"input_ids": i, "attention_mask": torch.ones(3, dtype=torch.long), "labels": i} for i in ids]
    model.eval()
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, params)}
    for sample in samples:
        logp = torch.log_softmax(model(input_ids=sample["input_ids"][None]).logits[0, :-1], -1)  # 2 positions
        for ys in itertools.product(range(4), repeat=2):
            prob = float((logp[0, ys[0]] + logp[1, ys[1]]).detach().exp())
            ll = (logp[0, ys[0]] + logp[1, ys[1]]) / 2**0.5
            for n, g in zip(names, torch.autograd.grad(ll, params, retain_graph=True)):
                expected[n] += prob * g.double().square() / len(samples)
    got = collect_importance(model, samples, "fisher", estimator="exact", batch_size=2, show_progress=False)
    assert_importances_close(got, {n: t.float() for n, t in expected.items()})


def test_sampled_fisher_matches_reference_with_the_same_draws():
    """Sample i's k counted positions take the first k uniform numbers of a CPU generator seeded with (seed, i),
    through the inverse of the cumulative distribution: the reference draws them so, and the result does not depend
    on the batch size or the per-sample engine (nor, tested with 2 processes, on the number of processes)."""
    model, samples = tiny_gpt2(), lm_samples(8, pad_last=2)
    seed, batch_size = 7, 4
    model.eval()
    names = [n for n, p in model.named_parameters()]
    params = [p for p in model.parameters()]
    expected = {n: torch.zeros_like(p) for n, p in zip(names, params)}
    count = 0
    for start in range(0, len(samples), batch_size):
        batch = default_data_collator(samples[start : start + batch_size])
        logits = model(**batch).logits[:, :-1]
        mask = batch["labels"][:, 1:] != -100
        probs = logits.detach().softmax(-1)
        draws = torch.zeros(mask.shape, dtype=torch.long)
        for n in range(len(mask)):
            cdf = probs[n][mask[n]].double().cumsum(-1)
            u = torch.rand(len(cdf), 1, generator=torch.Generator().manual_seed(seed * 1_000_003 + start + n),
                           dtype=torch.float64)  # fmt: skip
            draws[n, mask[n]] = (cdf < u * cdf[:, -1:]).sum(-1)
        for n in range(len(mask)):
            ll = _over_positions(torch.log_softmax(logits[n], -1).gather(-1, draws[n][:, None]).squeeze(-1)[mask[n]])
            for name, g in zip(names, torch.autograd.grad(ll, params, retain_graph=True, allow_unused=True)):
                if g is not None:
                    expected[name] += g.square()
            count += 1
    expected = {n: t / count for n, t in expected.items()}
    got = collect_importance(
        model, samples, "fisher", estimator="sampled", batch_size=batch_size, seed=seed, show_progress=False
    )
    assert_importances_close(got, expected)
    again = collect_importance(
        model, samples, "fisher", estimator="sampled", batch_size=batch_size, seed=seed, show_progress=False
    )
    assert all(torch.equal(got[n], again[n]) for n in got)  # seeded: reproducible
    for options in ({"batch_size": 3}, {"per_sample": "loop"}):
        other = collect_importance(
            model,
            samples,
            "fisher",
            estimator="sampled",
            seed=seed,
            show_progress=False,
            **{"batch_size": 4, **options},
        )
        assert_importances_close(other, got)


def test_sampled_fisher_does_not_depend_on_the_padding_of_a_batch():
    """Sequences of 3 to 8 tokens padded on the left to the longest of their batch (position ids given, so the model
    sees the same sequence whatever the padding): a sample's draws, taken over its counted positions only, are the
    same in batches of 2 (little padding) as in one batch of all (up to 5 pads)."""
    g = torch.Generator().manual_seed(3)
    samples = [{"input_ids": torch.randint(1, 40, (int(n),), generator=g).tolist()} for n in [3, 8, 5, 4, 8, 6, 3]]

    def left_padding(batch):
        longest = max(len(s["input_ids"]) for s in batch)
        rows = [(longest - len(s["input_ids"]), s["input_ids"]) for s in batch]
        return {
            "input_ids": torch.tensor([[0] * pad + ids for pad, ids in rows]),
            "attention_mask": torch.tensor([[0] * pad + [1] * len(ids) for pad, ids in rows]),
            "position_ids": torch.tensor([[0] * pad + list(range(len(ids))) for pad, ids in rows]),
            "labels": torch.tensor([[-100] * (pad + 1) + ids[1:] for pad, ids in rows]),  # t0: predicted by none
        }

    model = tiny_llama()
    got = {}
    for size in (2, 7):
        got[size] = collect_importance(
            model, samples, "fisher", estimator="sampled", batch_size=size, data_collator=left_padding,
            show_progress=False,
        )  # fmt: skip
    assert_importances_close(got[2], got[7])


def test_batched_fisher_is_the_squared_minibatch_gradient():
    model, samples = tiny_llama(), lm_samples(12, pad_last=3)
    model.eval()
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, 12, 4):
        lls = []
        for sample in samples[start : start + 4]:
            logits, labels = _positions(model, sample, True)
            lls.append(_over_positions(torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)))
        for (n, _), g in zip(params.items(), torch.autograd.grad(torch.stack(lls).mean(), list(params.values()))):
            expected[n] += g.square() / 3
    result = collect(model, samples, CollectionSpec("fisher", estimator="batched", batch_size=4, show_progress=False))
    assert result.num_samples == 3 and result.options["count_unit"] == "minibatches"
    assert_importances_close(result.importances, expected)
    per_sample = collect_importance(model, samples, "fisher", batch_size=4, show_progress=False)
    # a different quantity: roughly 1/B of the per-sample Fisher
    ratio = sum(float(v.sum()) for v in result.importances.values()) / sum(float(v.sum()) for v in per_sample.values())
    assert 0.05 < ratio < 0.9


def test_signal_importance_by_hand():
    model, samples = MLP(), vec_samples(6)
    x = torch.stack([s["pixel_values"] for s in samples])
    first, second, third = model.net[0], model.net[2], model.net[4]
    with torch.no_grad():
        a1 = x
        a2 = model.net[1](first(a1))
        a3 = model.net[3](second(a2))
    got = collect_importance(model, samples, "signal", batch_size=4, show_progress=False)
    for layer, a, prefix in ((first, a1, "net.0"), (second, a2, "net.2"), (third, a3, "net.4")):
        torch.testing.assert_close(got[f"{prefix}.weight"], layer.weight.detach().abs() * a.abs().mean(0))
        torch.testing.assert_close(got[f"{prefix}.bias"], layer.bias.detach().abs())
    out = collect_importance(model, samples, "signal", bias="output", batch_size=4, show_progress=False)
    torch.testing.assert_close(out["net.0.bias"], first(a1).detach().abs().mean(0))


def test_signal_on_a_transformer_masks_padding_and_counts_tokens():
    model, samples = tiny_gpt2(), lm_samples(4, pad_last=3)
    got = collect_importance(model, samples, "signal", batch_size=4, show_progress=False)
    assert set(got) == {n for n, p in model.named_parameters() if p.requires_grad}
    # wte: |E_v| × mean over samples of the share of attended tokens that are v
    share = torch.zeros(model.config.vocab_size)
    for s in samples:
        ids = s["input_ids"][s["attention_mask"].bool()]
        share.index_add_(0, ids, torch.full((len(ids),), 1.0 / len(ids)))
    share /= len(samples)
    wte = got["transformer.wte.weight"]
    lm_head_part = wte - model.transformer.wte.weight.detach().abs() * share[:, None]
    assert bool((lm_head_part >= -1e-6).all())  # the tied LM head adds its own (non-negative) signal
    ln = model.transformer.ln_f
    hidden = {}
    handle = ln.register_forward_hook(lambda m, a, o: hidden.setdefault("y", o.detach()))
    batch = default_data_collator(samples)
    model(**batch)
    handle.remove()
    y = (hidden["y"] - ln.bias.detach()).abs()
    m = batch["attention_mask"].float()[..., None]
    expected = ((y * m).sum(1) / m.sum(1)).mean(0)
    torch.testing.assert_close(got["transformer.ln_f.weight"], expected)


def test_uniform_is_ones_for_trainable_parameters_only():
    model = tiny_bert_classifier()
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    got = collect_importance(model, None, "uniform")
    assert not any(n.startswith("bert.embeddings") for n in got)
    assert all(bool((v == 1).all()) and v.dtype == torch.float32 for v in got.values())


def test_model_state_is_restored_and_no_gradients_are_left():
    model = tiny_gpt2(dropout=0.1)
    model.train()
    model.transformer.h[0].eval()  # a mixed train/eval pattern must come back as it was
    model.transformer.wpe.weight.requires_grad_(False)
    flags = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    for method in ("fisher", "mas", "signal"):
        got = collect_importance(model, lm_samples(4), method, batch_size=2, show_progress=False)
        assert "transformer.wpe.weight" not in got
        assert {n: m.training for n, m in model.named_modules()} == flags
        assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
        assert all(p.grad is None for p in model.parameters())


def test_collection_is_deterministic_with_dropout_models_and_leaves_the_rng_alone():
    model = tiny_gpt2(dropout=0.5)
    model.train()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = collect_importance(model, lm_samples(4), "fisher", batch_size=2, show_progress=False)
    after = torch.rand(3)
    b = collect_importance(model, lm_samples(4), "fisher", batch_size=2, show_progress=False)
    assert torch.equal(before, after)  # the caller's RNG stream is untouched
    assert all(torch.equal(a[n], b[n]) for n in a)  # eval mode: dropout off


def test_bfloat16_model_accumulates_in_float32():
    model = tiny_llama()
    samples = lm_samples(8)
    reference = collect_importance(model, samples, "fisher", batch_size=4, show_progress=False)
    model = model.to(torch.bfloat16)
    got = collect_importance(model, samples, "fisher", batch_size=4, show_progress=False)
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in got.values())
    total_ref = sum(float(v.sum()) for v in reference.values())
    total = sum(float(v.sum()) for v in got.values())
    assert total == pytest.approx(total_ref, rel=0.1)


def test_inputs_dataloader_max_samples_and_hf_dataset_columns():
    import datasets

    model, samples = tiny_bert_classifier(), cls_samples(10)
    spec = CollectionSpec("fisher", batch_size=4, show_progress=False)
    full = collect(model, samples, spec)
    first6 = collect(model, samples[:6], spec)
    capped = collect(model, samples, CollectionSpec("fisher", batch_size=4, max_samples=6, show_progress=False))
    assert full.num_samples == 10 and capped.num_samples == 6
    assert all(torch.allclose(capped.importances[n], first6.importances[n]) for n in first6.importances)
    loader = DataLoader(samples, batch_size=4, collate_fn=default_data_collator)
    from_loader = collect(model, loader, CollectionSpec("fisher", max_samples=6, show_progress=False))
    assert from_loader.num_samples == 6
    assert all(torch.allclose(from_loader.importances[n], first6.importances[n]) for n in first6.importances)
    table = datasets.Dataset.from_list(
        [{**{k: v.tolist() for k, v in s.items()}, "text": "unused"} for s in samples]
    ).with_format("torch")
    from_hf = collect(model, table, spec)
    assert all(torch.allclose(from_hf.importances[n], full.importances[n]) for n in full.importances)


def test_samples_without_targets_are_not_counted():
    model = tiny_gpt2()
    samples = lm_samples(4)
    samples[1] = {**samples[1], "labels": torch.full((8,), -100)}
    spec = CollectionSpec("fisher", batch_size=4, show_progress=False)
    result = collect(model, samples, spec)
    assert result.num_samples == 3
    expected = collect(model, [samples[i] for i in (0, 2, 3)], spec)
    assert_importances_close(result.importances, expected.importances)


class _NoLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, pixel_values, labels=None):
        return {"loss": self.lin(pixel_values).sum()}


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: collect_importance(MLP(), vec_samples(4), "fisherr"), "Unknown importance method 'fisherr'"),
        (lambda: collect_importance(MLP(), vec_samples(4), "si"), "accumulated during training"),
        (lambda: collect_importance(MLP(), vec_samples(4), estimator="true"), "choose one of: empirical, sampled"),
        (lambda: collect_importance(MLP(), vec_samples(4), "mas", outptu="probs"), "Unknown option"),
        (lambda: collect_importance(MLP(), vec_samples(4), "mas", output="softmax"), "choose one of: probs, logits"),
        (lambda: collect_importance(_NoLogits(), vec_samples(4)), "no logits"),
        (
            lambda: collect_importance(MLP(), [{"pixel_values": s["pixel_values"]} for s in vec_samples(4)]),
            "needs labels",
        ),
        (lambda: collect_importance(tiny_gpt2(), lm_samples(4), estimator="exact"), "use fisher_estimator='sampled'"),
        (lambda: collect_importance(tiny_gpt2(), lm_samples(4), shift_labels=False), "pass shift_labels=True"),
        (lambda: collect_importance(MLP(), []), "empty"),
        (lambda: collect_importance(MLP(), vec_samples(4), max_samples=0), "max_samples must be >= 1"),
        (
            lambda: collect_importance(MLP(), [{**s, "labels": s["labels"].float()} for s in vec_samples(4)]),
            "floating point",
        ),
    ],
)
def test_bad_input_gives_a_clear_error(call, match):
    with pytest.raises(HfEwcError, match=match):
        call()


def test_non_finite_importances_are_refused_naming_the_parameter():
    model = MLP()
    with torch.no_grad():
        model.net[2].weight[0, 0] = float("nan")
    with pytest.raises(HfEwcError, match=r"net\.\d\.(weight|bias).*non-finite"):
        collect_importance(model, vec_samples(4), show_progress=False)


def test_hooks_engine_falls_back_to_the_loop_when_per_sample_gradients_do_not_add_up(hf_logs):
    class InPlace(MLP):
        """Modifies a module output in place: the hooks engine cannot see through it; the check catches it."""

        def forward(self, pixel_values, labels=None):
            h = self.net[0](pixel_values)
            h.mul_(2.0)
            logits = self.net[4](self.net[3](self.net[2](self.net[1](h))))
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = nn.functional.cross_entropy(logits, labels)
            return out

    model, samples = InPlace(), vec_samples(8)
    expected = collect_importance(model, samples, per_sample="loop", show_progress=False)
    got = collect_importance(model, samples, per_sample="auto", batch_size=4, show_progress=False)
    assert_importances_close(got, expected)
    assert any("switching to the batch-size-1 loop" in r.getMessage() for r in hf_logs)


class _SequenceFirst(nn.Module):
    """Activations laid out [T, B, H] (nn.Transformer's batch_first=False): with T == B the leading dimension only
    looks like the batch."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, labels=None):
        x = self.emb(input_ids).transpose(0, 1)
        logits = self.head(torch.tanh(self.lin(x)).mean(0))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def test_first_batch_check_catches_a_leading_dimension_that_only_looks_like_the_batch(hf_logs):
    model = _SequenceFirst()
    samples = [{"input_ids": torch.randint(0, 20, (4,)), "labels": torch.tensor(i % 3)} for i in range(8)]
    expected = collect_importance(model, samples, batch_size=4, per_sample="loop", show_progress=False)
    got = collect_importance(model, samples, batch_size=4, show_progress=False)  # T = B = 4
    assert_importances_close(got, expected)
    assert any("differ from its gradient computed alone" in r.getMessage() for r in hf_logs)


class _LabelsRequired(MLP):
    def forward(self, pixel_values, labels):  # labels without a default: the collector must keep passing them
        return super().forward(pixel_values, labels)


@pytest.mark.parametrize("method", ["fisher", "mas"])
def test_models_whose_forward_requires_labels(method):
    model, samples = _LabelsRequired(), vec_samples(8)
    expected = collect_importance(model, samples, method, batch_size=4, per_sample="loop", show_progress=False)
    got = collect_importance(model, samples, method, batch_size=4, show_progress=False)
    assert_importances_close(got, expected)


def test_bfloat16_models_keep_the_hooks_engine(hf_logs):
    for factory in (tiny_llama, tiny_gpt2, tiny_bert_mlm):
        model = factory().to(torch.bfloat16)
        collect_importance(model, lm_samples(8), batch_size=4, show_progress=False)
    assert not [r.getMessage() for r in hf_logs if r.levelno >= 30]  # no fallback, no loss-convention warning


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_bert_mlm], ids=["gpt2_tied", "bert_mlm"])
def test_chunked_scratch_buffer_and_padding_rows(factory, monkeypatch):
    """Per-sample gradients written a few samples (or one) at a time into the reused scratch buffer, with padding
    tokens (embedding padding_idx rows) in the data."""
    from hf_ewc.importance import _per_sample

    model = factory()
    model.config.pad_token_id = 0
    samples = lm_samples(8, low=0, pad_last=2)
    expected = collect_importance(model, samples, batch_size=4, per_sample="loop", show_progress=False)
    for elements in (700, 1):
        monkeypatch.setattr(_per_sample, "SCRATCH_ELEMENTS", elements)
        got = collect_importance(model, samples, batch_size=4, per_sample="hooks", show_progress=False)
        assert_importances_close(got, expected)


def test_tuple_batches_are_refused_with_a_clear_error():
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.randn(4, 6), torch.randint(0, 4, (4,)))
    with pytest.raises(HfEwcError, match="A dataset item is a tuple; .* needs dicts"):
        collect_importance(MLP(), data)
    with pytest.raises(HfEwcError, match="A DataLoader batch is a list"):
        collect_importance(MLP(), DataLoader(data, batch_size=2))


def _docs() -> list[str]:
    with gzip.open(CORPORA / "python_docs.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _blocks_of_real_text(tokenizer, length: int, count: int) -> list[dict]:
    """``count`` consecutive blocks of ``length`` tokens from the start of the shipped Python-docs corpus."""
    ids = [t for text in _docs()[:40] for t in tokenizer(text)["input_ids"]][: length * count]
    blocks = torch.tensor(ids).reshape(count, length)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b} for b in blocks]


def test_sampled_fisher_of_a_language_model_does_not_shrink_with_the_block_length():
    """The same 2,048 tokens of real text as 64 blocks of 32 and as 16 blocks of 128: Ω̄ within 1.5× (with the mean
    over positions as a sample's log-likelihood it would be 4× smaller for the long blocks)."""
    tokenizer = train_tokenizer("causal_lm", iter(_docs()), 512)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(config)
    means = {}
    for length, count in ((32, 64), (128, 16)):
        blocks = _blocks_of_real_text(tokenizer, length, count)
        omega = collect_importance(model, blocks, "fisher", estimator="sampled", batch_size=8, show_progress=False)
        means[length] = sum(float(t.double().sum()) for t in omega.values()) / sum(t.numel() for t in omega.values())
    assert 1 / 1.5 < means[128] / means[32] < 1.5, means


def test_exact_fisher_and_mas_of_a_language_model_keep_their_scale_over_block_lengths():
    """Exact Fisher (small vocabulary, so that T·V backward passes stay cheap) and MAS, 4- vs 16-token blocks of the
    same token stream: Ω̄ within 1.5×."""
    model = GPT2LMHeadModel(GPT2Config(vocab_size=6, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    stream = torch.randint(0, 6, (256,), generator=torch.Generator().manual_seed(0))
    means = {}
    for method in ("exact", "mas"):
        for length in (4, 16):
            blocks = [
                {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b} for b in stream.view(-1, length)
            ]
            options = {"estimator": "exact", "max_backward_per_batch": 1000} if method == "exact" else {}
            omega = collect_importance(
                model, blocks, "fisher" if method == "exact" else "mas", batch_size=8, show_progress=False, **options
            )
            means[method, length] = sum(float(t.double().sum()) for t in omega.values()) / sum(
                t.numel() for t in omega.values()
            )
        assert 1 / 1.5 < means[method, 16] / means[method, 4] < 1.5, means
