"""CLNP (hf_ewc/clnp.py) on MLP chains: bit-identical old outputs, interference weights exactly 0, the margin rule,
L1 gradients against autograd, persistence and refusals."""

import copy
from types import SimpleNamespace

import pytest
import torch
from testing_utils import MLP, lm_samples, tiny_bert_mlm, tiny_gpt2, tiny_llama, vec_samples
from transformers import Trainer, TrainingArguments, default_data_collator

from hf_ewc import EWCConfig, EWCTrainer, HfEwcError
from hf_ewc.clnp import CLNP, CLNP_STATE_NAME


def _args(tmp_path, **kwargs):
    defaults = {
        "output_dir": str(tmp_path), "per_device_train_batch_size": 8, "num_train_epochs": 3, "learning_rate": 0.01,
        "optim": "adamw_torch", "weight_decay": 0.1, "lr_scheduler_type": "constant", "report_to": "none",
        "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, "seed": 0,
    }  # fmt: skip
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def _batches(samples, size=8):
    return [default_data_collator(samples[i : i + size]) for i in range(0, len(samples), size)]


def _train(clnp, samples, tmp_path, **kwargs):
    trainer = Trainer(model=clnp.model, args=_args(tmp_path, **kwargs), train_dataset=samples,
                      callbacks=[clnp.callback()])  # fmt: skip
    trainer.train()


@torch.no_grad()
def _logits(clnp, samples, domain):
    clnp.model.eval()
    with clnp.domain(domain):
        return clnp.model(pixel_values=torch.stack([s["pixel_values"] for s in samples]))["logits"].clone()


@pytest.mark.parametrize("head", ["per_domain", "shared"])
def test_old_domain_outputs_are_bit_identical_after_later_domains(tmp_path, head):
    model = MLP((6, 64, 64, 4))
    clnp = CLNP(model, margin=0.1, head=head)
    domains = {name: vec_samples(48, seed=i) for i, name in enumerate(("a", "b", "c"))}
    seen = {}
    for name, samples in domains.items():
        before = copy.deepcopy(model.state_dict())
        _train(clnp, samples, tmp_path / name)
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the domain did learn
        entry = clnp.consolidate(_batches(samples), domain=name)
        assert entry["loss_kept"] <= entry["loss_unpruned"] + 0.1 + 1e-12
        seen[name] = _logits(clnp, samples, name)
        for old, logits in seen.items():  # every earlier domain, after every later one
            assert torch.equal(_logits(clnp, domains[old], old), logits), old
    # without the domain id (all units on) the oldest domain's logits did change: that forgetting is not hidden
    with torch.no_grad():
        model.eval()
        shared = model(pixel_values=torch.stack([s["pixel_values"] for s in domains["a"]]))["logits"]
    assert not torch.equal(shared, seen["a"])
    counts = [entry["layers"] for entry in clnp.history]
    assert all(layer["active"] > 0 for layer in counts[0].values())
    assert [clnp.history[i]["domain"] for i in range(3)] == ["a", "b", "c"]


@pytest.mark.parametrize("head", ["per_domain", "shared"])
def test_interference_weights_stay_exactly_zero_and_old_units_frozen(tmp_path, head):
    model = MLP((6, 24, 24, 4))
    clnp = CLNP(model, margin=0.05, head=head)
    _train(clnp, vec_samples(48, seed=0), tmp_path / "a")
    clnp.consolidate(_batches(vec_samples(48, seed=0)), domain="a")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    owners_before = [o.clone() for o in clnp.owners]
    _train(clnp, vec_samples(48, seed=1), tmp_path / "b")
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # a unit of domain a never reads a unit that was free when a was consolidated (now b's or still free)
    old_rows, free_inputs = owners_before[1] >= 0, owners_before[0] < 0
    assert bool(old_rows.any()) and bool(free_inputs.any())
    assert bool((layers[1].weight[old_rows][:, free_inputs] == 0).all())
    assert not bool((layers[1].weight[~old_rows][:, free_inputs] == 0).all())  # b's units did learn from them
    names = {0: "net.0", 1: "net.2", 2: "net.4"}
    for k in (0, 1):
        old = owners_before[k] >= 0
        assert torch.equal(
            dict(model.named_parameters())[f"{names[k]}.weight"][old], frozen[f"{names[k]}.weight"][old]
        )
        assert torch.equal(dict(model.named_parameters())[f"{names[k]}.bias"][old], frozen[f"{names[k]}.bias"][old])
    free = owners_before[1] < 0
    assert not torch.equal(model.net[4].weight[:, free], frozen["net.4.weight"][:, free])  # free columns learned
    if head == "shared":  # the old columns and the bias of a shared head are frozen
        assert torch.equal(model.net[4].bias, frozen["net.4.bias"])
        assert torch.equal(model.net[4].weight[:, ~free], frozen["net.4.weight"][:, ~free])
    else:  # b trained the whole head; a's own head was stored when a was consolidated
        assert not torch.equal(model.net[4].bias, frozen["net.4.bias"])
        assert torch.equal(clnp.heads[0]["net.4.weight"], frozen["net.4.weight"])
        assert torch.equal(clnp.heads[0]["net.4.bias"], frozen["net.4.bias"])


def test_the_threshold_is_the_largest_within_the_margin(tmp_path):
    model = MLP((6, 32, 4))
    samples = vec_samples(64, seed=3)
    _train(CLNP(model), samples, tmp_path)
    batches = _batches(samples)
    for margin in (0.0, 0.05, 0.5):
        clnp, fresh = CLNP(copy.deepcopy(model), margin=margin), CLNP(copy.deepcopy(model), margin=margin)
        activity = fresh.activity(batches)
        full = fresh._loss(batches, None)
        entry = clnp.consolidate(batches, domain="a")
        tau = entry["threshold"]
        assert entry["loss_kept"] == pytest.approx(fresh._loss(batches, fresh._keep(activity, tau)))
        assert entry["loss_kept"] <= full + margin + 1e-9
        candidates = fresh.thresholds(activity)
        above = [t for t in candidates if t > tau]
        if above:  # the next candidate up breaks the margin
            assert fresh._loss(batches, fresh._keep(activity, min(above))) > full + margin
        assert int((clnp.owners[0] == 0).sum()) == int(fresh._keep(activity, tau)[0].sum())
    assert CLNP(copy.deepcopy(model), margin=1e9).consolidate(batches, domain="a")["layers"]["net.0"]["active"] == 0


def test_freed_units_compute_nothing_until_trained(tmp_path):
    """After consolidation the model equals its masked self: freed units are re-initialised with zero bias and zero
    outgoing weights."""
    model = MLP((6, 24, 24, 4))
    samples = vec_samples(48)
    clnp = CLNP(model, margin=0.1)
    _train(clnp, samples, tmp_path)
    clnp.consolidate(_batches(samples), domain="a")
    x = torch.stack([s["pixel_values"] for s in samples])
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x)["logits"], _logits(clnp, samples, "a"))


@pytest.mark.parametrize("target", ["activations", "weights"])
def test_l1_gradients_match_autograd(tmp_path, target):
    model = MLP((6, 12, 12, 4))
    samples = vec_samples(8)
    clnp = CLNP(model, l1=0.3, l1_target=target)
    clnp.owners[0][:4] = 0  # pretend a domain owns 4 units of the first layer
    clnp.domains.append("a")
    reference = copy.deepcopy(model)
    callback = clnp.callback()
    callback.on_train_begin(SimpleNamespace(gradient_accumulation_steps=1), None, None)
    batch = default_data_collator(samples)
    model.train()
    model(**batch)["loss"].backward()
    callback.on_pre_optimizer_step(None, None, None)
    # the reference: task loss + l1·(mean over samples of Σ_free |a|) or + l1·Σ_free-rows |W|, by autograd
    acts = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, a: acts.append(a[0])) for m in (reference.net[2], reference.net[4])
    ]
    loss = reference(**batch)["loss"]
    for h in hooks:
        h.remove()
    free = [(o < 0).float() for o in clnp.owners]
    if target == "activations":
        loss = loss + 0.3 * sum((a.abs() * f).sum(-1).mean() for a, f in zip(acts, free))
    else:
        loss = loss + 0.3 * sum((layer.weight.abs() * f.unsqueeze(1)).sum() for layer, f in
                                zip((reference.net[0], reference.net[2]), free))  # fmt: skip
    loss.backward()
    masks = clnp.trainable_masks()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad * masks[name], rtol=1e-5, atol=1e-7, msg=name)
    callback.on_train_end(None, None, None)


def test_save_load_round_trip_and_refusals(tmp_path):
    model = MLP((6, 24, 24, 4))
    samples = vec_samples(48)
    clnp = CLNP(model, margin=0.05)
    _train(clnp, samples, tmp_path / "t")
    clnp.consolidate(_batches(samples), domain="a")
    clnp.save(tmp_path / "s")
    loaded = CLNP.load(model, tmp_path / "s")
    assert loaded.domains == ["a"] and all(torch.equal(a, b) for a, b in zip(loaded.owners, clnp.owners))
    assert _logits(loaded, samples, "a").equal(_logits(clnp, samples, "a"))
    with pytest.raises(HfEwcError, match="allocates units of layers"):
        CLNP.load(MLP((6, 24, 4)), tmp_path / "s")
    with pytest.raises(HfEwcError, match="CLNP has no domain 'b'; it has: a"), loaded.domain("b"):
        pass
    with pytest.raises(HfEwcError, match="already has a domain named 'a'"):
        loaded.consolidate(_batches(samples), domain="a")
    for owners in loaded.owners:
        owners.fill_(0)
    with pytest.raises(HfEwcError, match=r"no free unit left in 'net.0' \(24 units"):
        loaded.callback().on_train_begin(SimpleNamespace(gradient_accumulation_steps=1), None, None)
    # a shared head reads only the last hidden layer: full, nothing new would reach the output
    shared = CLNP(MLP((6, 24, 24, 4)), head="shared")
    shared.owners[-1].fill_(0)
    shared.domains = ["a"]
    with pytest.raises(HfEwcError, match=r"left in 'net.2' \(24 units\), .*the shared head reads only"):
        shared.check_capacity()
    shared.head = "per_domain"  # a per-domain head reads the old units: the domain can still train
    shared.check_capacity()
    with pytest.raises(HfEwcError, match="clnp_margin must be a finite number >= 0, got -0.1"):
        CLNP(model, margin=-0.1)
    with pytest.raises(HfEwcError, match="Unknown clnp_l1_target 'bias'"):
        CLNP(model, l1_target="bias")
    with pytest.raises(HfEwcError, match="or of MLP-style chains of nn.Linear; in Sequential, '1' takes 4 inputs"):
        CLNP(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(4, 2)))


@pytest.mark.parametrize("factory", [tiny_llama, tiny_bert_mlm, tiny_gpt2], ids=["llama", "bert", "gpt2"])
def test_transformer_units_keep_old_domains_bit_identical(tmp_path, factory):
    """FFN neurons and attention heads as units; embeddings, norms, shared key/value projections and the LM head train
    during the first domain only."""
    model = factory()
    clnp = CLNP(model, margin=0.5)
    assert clnp.head == "shared" and {g.width for g in clnp.groups} > {1}  # FFN neurons and heads
    domains = {"a": lm_samples(16, seed=1, high=20), "b": lm_samples(16, seed=2, low=20)}
    seen, shared = {}, None
    for name, samples in domains.items():
        _train(clnp, samples, tmp_path / name, per_device_train_batch_size=4)
        clnp.consolidate(_batches(samples, 4), domain=name)
        batch = default_data_collator(samples)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad(), clnp.domain(name):
            model.eval()
            seen[name] = (inputs, model(**inputs).logits.clone())
        if shared is None:
            units = {e.name for g in clnp.groups for e in g.slices}
            shared = {n: p.detach().clone() for n, p in model.named_parameters() if n not in units}
    with torch.no_grad(), clnp.domain("a"):
        assert torch.equal(model(**seen["a"][0]).logits, seen["a"][1])
    with torch.no_grad():  # all units on: b's units change a's outputs (the forgetting without a domain id)
        assert not torch.equal(model(**seen["a"][0]).logits, seen["a"][1])
    assert all(torch.equal(p, shared[n]) for n, p in model.named_parameters() if n in shared)
    assert clnp.history[1]["layers"] and all(v["reused"] is None for v in clnp.history[1]["layers"].values())


# ---------------------------------------------------------------------------------------------- through EWCTrainer
def _ewc_args(tmp_path, **kwargs):
    defaults = {
        "output_dir": str(tmp_path), "ewc_mode": "clnp", "clnp_margin": 0.1, "clnp_l1": 0.0,
        "per_device_train_batch_size": 8, "num_train_epochs": 3, "learning_rate": 0.01, "optim": "adamw_torch",
        "lr_scheduler_type": "constant", "report_to": "none", "use_cpu": True, "save_strategy": "no",
        "disable_tqdm": True, "seed": 0, "importance_max_samples": 40,
    }  # fmt: skip
    return EWCConfig(**{**defaults, **kwargs})


def test_ewc_trainer_with_ewc_mode_clnp_carries_the_allocation_from_domain_to_domain(tmp_path):
    model = MLP((6, 64, 64, 4))
    a, b = vec_samples(48, seed=0), vec_samples(48, seed=1)
    trainer = EWCTrainer(model=model, args=_ewc_args(tmp_path / "a"), train_dataset=a)
    trainer.train()
    state = trainer.consolidate(domain="a")
    assert state.units is trainer.clnp and trainer.clnp.domains == ["a"]
    assert state.domains[0]["method"] == "uniform" and "net.0" in state.domains[0]["options"]["clnp"]["layers"]
    before = _logits(trainer.clnp, a, "a")
    trainer.save_model(str(tmp_path / "after_a"))
    assert (tmp_path / "after_a" / CLNP_STATE_NAME).is_file()
    second = EWCTrainer(model=model, args=_ewc_args(tmp_path / "b"), train_dataset=b, ewc_state=state)
    assert second.clnp is trainer.clnp
    second.train()
    second.consolidate(domain="b")
    assert torch.equal(_logits(second.clnp, a, "a"), before)
    # a new process continues from the saved directory: the allocation comes back with the state
    reloaded = EWCTrainer(model=copy.deepcopy(model), args=_ewc_args(tmp_path / "c"), train_dataset=b,
                          ewc_state=str(tmp_path / "after_a"))  # fmt: skip
    assert reloaded.clnp.domains == ["a"] and torch.equal(
        reloaded.clnp.owners[0], CLNP.load(model, tmp_path / "after_a").owners[0]
    )


def test_ewc_mode_clnp_checkpoints_and_refusals(tmp_path):
    model = MLP((6, 64, 64, 4))
    a = vec_samples(48)
    trainer = EWCTrainer(model=model, args=_ewc_args(tmp_path / "a"), train_dataset=a)
    trainer.train()
    state = trainer.consolidate(domain="a")
    args = _ewc_args(tmp_path / "b", save_strategy="steps", save_steps=2, max_steps=4)
    EWCTrainer(model=model, args=args, train_dataset=vec_samples(48, seed=1), ewc_state=state).train()
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert (checkpoint / CLNP_STATE_NAME).is_file()
    resumed = EWCTrainer(model=MLP((6, 64, 64, 4)), args=args, train_dataset=vec_samples(48, seed=1))
    resumed._load_ewc_checkpoint(str(checkpoint))
    assert resumed.clnp.domains == ["a"] and resumed._clnp_callback.clnp is resumed.clnp
    plain = copy.deepcopy(state)
    plain.units = None
    with pytest.raises(HfEwcError, match="continues a state without a unit allocation"):
        EWCTrainer(model=model, args=_ewc_args(tmp_path / "c"), train_dataset=a, ewc_state=plain)
    with pytest.raises(ValueError, match="clnp_margin must be a finite number >= 0"):
        _ewc_args(tmp_path, clnp_margin=-1.0)
