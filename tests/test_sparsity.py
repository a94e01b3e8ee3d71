"""KeepSparsityCallback (hf_ewc/sparsity.py): pruned weights stay exactly zero through training with Trainer and
EWCTrainer, masks read back from an exported sparsity_config, and what happens without it."""

import pytest
import torch
from testing_utils import lm_samples, tiny_bert_mlm, tiny_llama
from transformers import AutoModelForMaskedLM, Trainer, TrainingArguments

from hf_ewc import (
    EWCConfig,
    EWCState,
    EWCTrainer,
    HfEwcError,
    KeepSparsityCallback,
    collect_importance,
    export_pruned,
    prune_model,
)


def _train(trainer_cls, model, tmp_path, callbacks, **ewc):
    args = {"output_dir": str(tmp_path / "t"), "per_device_train_batch_size": 4, "num_train_epochs": 3,
            "learning_rate": 5e-2, "report_to": "none", "save_strategy": "no", "disable_tqdm": True,
            "use_cpu": True}  # fmt: skip
    if trainer_cls is EWCTrainer:
        trainer = EWCTrainer(model=model, args=EWCConfig(**args, **ewc.pop("config", {})), callbacks=callbacks,
                             train_dataset=lm_samples(16, seed=5), **ewc)  # fmt: skip
    else:
        trainer = Trainer(model=model, args=TrainingArguments(**args), callbacks=callbacks,
                          train_dataset=lm_samples(16, seed=5))  # fmt: skip
    trainer.train()
    return trainer


@pytest.mark.parametrize("setup", ["trainer", "stabilized", "proximal_si"])
def test_pruned_weights_stay_zero_through_training(tmp_path, setup):
    model = tiny_llama()
    # An EWC state anchored at the unpruned weights: its penalty (and the proximal step) pull pruned weights back
    # towards non-zero anchors, the strongest test of the order of operations.
    state = EWCState()
    state.consolidate(model, collect_importance(model, lm_samples(8), "fisher", show_progress=False), domain="a")
    report = prune_model(model, 0.5, show_progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_importances = {n: t.clone() for n, t in state.importances.items()}
    callback = KeepSparsityCallback(report.masks)
    applied = []
    real_apply = callback.apply
    callback.apply = lambda m, **kw: (applied.append(1), real_apply(m, **kw))[1]
    if setup == "trainer":
        trainer = _train(Trainer, model, tmp_path, [callback])
    elif setup == "stabilized":
        trainer = _train(EWCTrainer, model, tmp_path, [callback], ewc_state=state, config={"ewc_lambda": 1e4})
    else:
        config = {"ewc_lambda": 1e4, "ewc_mode": "proximal", "importance_method": "si"}
        trainer = _train(EWCTrainer, model, tmp_path, [callback], ewc_state=state, config=config)
    params = dict(model.named_parameters())
    for name, mask in report.masks.items():
        assert torch.equal(params[name] == 0, ~mask), name  # no regrowth, and the kept weights are not stuck at 0
        assert not torch.equal(params[name], before[name]), name  # they trained
    assert len(applied) == 1 + trainer.state.global_step  # at train begin, then once per optimizer step
    if setup == "proximal_si":  # SI saw no movement of the pruned weights: their path integral is exactly 0
        new_state = trainer.consolidate(domain="b")  # Ω = Ω_fisher + Ω_si
        for name, mask in report.masks.items():
            si = new_state.importances[name] - old_importances[name]
            assert float(si[~mask].abs().max()) == 0.0 and float(si[mask].abs().max()) > 0.0


def test_from_zeros_reads_the_exported_sparsity_config(tmp_path):
    model = tiny_bert_mlm()
    report = prune_model(model, 0.5, structure="heads", show_progress=False)  # zeroes biases too
    export_pruned(model, tmp_path / "out", report)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "out")
    callback = KeepSparsityCallback.from_zeros(reloaded)
    assert set(callback.masks) == set(report.layers) and any(n.endswith(".bias") for n in callback.masks)
    for name, mask in report.masks.items():  # every weight the pruner removed is held at zero
        assert bool((~callback.masks[name])[~mask].all()), name


def test_without_the_callback_pruned_weights_regrow(tmp_path):
    model = tiny_llama()
    report = prune_model(model, 0.5, show_progress=False)
    _train(Trainer, model, tmp_path, [])
    name = next(iter(report.masks))
    assert int((dict(model.named_parameters())[name] == 0).sum()) < int((~report.masks[name]).sum())


def test_from_zeros_without_any_target_says_what_to_pass():
    with pytest.raises(HfEwcError, match=r"has no sparsity_config and no default targets .* pass names="):
        KeepSparsityCallback.from_zeros(torch.nn.Linear(4, 2))  # no transformer blocks, no sparsity_config
