"""EWC in TRL's `SFTTrainer` through `with_ewc` (hf_ewc/trainer.py): the penalty's gradient against a plain
`SFTTrainer` step, gradient-accumulation invariance, consolidation on SFT's own processed data, resume from a
checkpoint, and the refusals. Skipped without TRL (`pip install "hf-ewc[trl]"`)."""

import copy
import random

import datasets
import pytest
import torch
from testing_utils import WORDS
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ewc import EWCConfig, EWCState, EWCTrainer, HfEwcError, ewc_config_class, with_ewc
from hf_ewc.pipeline.prepare import train_tokenizer


trl = pytest.importorskip("trl")
EWCSFTTrainer = with_ewc(trl.SFTTrainer)
EWCSFTConfig = ewc_config_class(trl.SFTConfig)


@pytest.fixture(scope="module")
def data():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS["animals"]) for _ in range(rng.randint(6, 12))) for _ in range(16)]
    return datasets.Dataset.from_dict({"text": texts}), train_tokenizer("causal_lm", iter(texts), 96)


def tiny_llama(tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _args(tmp_path, **kwargs):
    settings = {
        "output_dir": str(tmp_path), "per_device_train_batch_size": 4, "max_steps": 2, "learning_rate": 0.05,
        "optim": "sgd", "weight_decay": 0.0, "max_grad_norm": 0.0, "lr_scheduler_type": "constant",
        "report_to": "none", "use_cpu": True, "save_strategy": "no", "max_length": 16, "disable_tqdm": True,
        "seed": 0, "logging_steps": 1, **kwargs,
    }  # fmt: skip
    return settings


def _state(data, tmp_path) -> tuple[torch.nn.Module, EWCState]:
    """A model trained on the data, its consolidated Fisher state, then moved off its anchors."""
    dataset, tokenizer = data
    torch.manual_seed(0)
    model = tiny_llama(tokenizer)
    trainer = EWCSFTTrainer(model=model, args=EWCSFTConfig(**_args(tmp_path / "first")), train_dataset=dataset,
                            processing_class=tokenizer)  # fmt: skip
    trainer.train()
    state = trainer.consolidate(domain="animals")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, state


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_penalty_gradient_joins_the_sft_step(data, tmp_path):
    """One SGD step: θ_plain − θ_ewc = η·λ·Ω·(θ − θ*) (vanilla: c = ½λΩ), the SFT loss's own gradient cancelling."""
    dataset, tokenizer = data
    model, state = _state(data, tmp_path)
    start = _params(model)
    lam, lr = 2.0, 0.05
    plain = trl.SFTTrainer(model=model, args=trl.SFTConfig(**_args(tmp_path / "plain", max_steps=1)),
                           train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    plain.train()
    after_plain = _params(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    args = EWCSFTConfig(**_args(tmp_path / "ewc", max_steps=1), ewc_mode="vanilla", ewc_lambda=lam)
    ewc = EWCSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, ewc_state=state)
    ewc.train()
    assert any("ewc/penalty" in log for log in ewc.state.log_history)
    for n, p in model.named_parameters():
        expected = lr * lam * state.importances[n] * (start[n] - state.anchors[n])
        torch.testing.assert_close(after_plain[n] - p.detach(), expected, rtol=1e-4, atol=1e-7)


def test_gradient_accumulation_gives_the_same_parameters(data, tmp_path):
    dataset, tokenizer = data
    model, state = _state(data, tmp_path)
    start = _params(model)
    results = []
    for batch, accumulation in ((4, 1), (2, 2)):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        args = EWCSFTConfig(**_args(tmp_path / f"ga{accumulation}", per_device_train_batch_size=batch,
                                    gradient_accumulation_steps=accumulation), ewc_lambda=5.0)  # fmt: skip
        EWCSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      ewc_state=state).train()  # fmt: skip
        results.append(_params(model))
    for n in start:
        assert not torch.equal(results[0][n], start[n]) or n.endswith("norm.weight")
        torch.testing.assert_close(results[1][n], results[0][n], rtol=1e-5, atol=1e-6)


def test_consolidate_reads_sfts_processed_data_like_ewc_trainer(data, tmp_path):
    dataset, tokenizer = data
    model, _ = _state(data, tmp_path)
    sft = EWCSFTTrainer(model=model, args=EWCSFTConfig(**_args(tmp_path / "a")), train_dataset=dataset,
                        processing_class=tokenizer)  # fmt: skip
    ours = sft.consolidate(domain="animals")
    reference = EWCTrainer(model=model, args=EWCConfig(**{k: v for k, v in _args(tmp_path / "b").items()
                                                            if k != "max_length"}),
                           train_dataset=sft.train_dataset, data_collator=sft.data_collator).consolidate()  # fmt: skip
    assert ours.importances.keys() == reference.importances.keys() == dict(model.named_parameters()).keys()
    for n, omega in ours.importances.items():
        assert torch.equal(omega, reference.importances[n])
    assert ours.domains[0]["num_samples"] == 16


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(data, tmp_path):
    dataset, tokenizer = data
    model, state = _state(data, tmp_path)
    start = _params(model)
    settings = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "ewc_lambda": 5.0}

    def trainer(out):
        args = EWCSFTConfig(**{**_args(tmp_path / out), **settings})
        return EWCSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             ewc_state=state)  # fmt: skip

    trainer("full").train()
    full = _params(model)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "ewc_state.safetensors").is_file()  # the state travels with SFT's checkpoints
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    resumed = trainer("resumed")
    resumed.ewc_state = None  # what the checkpoint brings back
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.ewc_state is not None and len(resumed.ewc_state.importances) == len(state.importances)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), full[n], rtol=1e-5, atol=1e-7)


def test_with_ewc_refuses_what_is_not_a_trainer_and_converts_sft_configs(data, tmp_path):
    for bad in (int, torch.nn.Module, "SFTTrainer"):
        with pytest.raises(HfEwcError, match="with_ewc takes a transformers.Trainer subclass"):
            with_ewc(bad)
    assert with_ewc(EWCTrainer) is EWCTrainer and with_ewc(trl.SFTTrainer) is EWCSFTTrainer
    dataset, tokenizer = data
    plain = trl.SFTConfig(**_args(tmp_path, max_length=12))  # EWC fields take their defaults
    trainer = EWCSFTTrainer(tiny_llama(tokenizer), plain, train_dataset=dataset, processing_class=tokenizer)
    assert isinstance(trainer.args, EWCSFTConfig) and isinstance(trainer.args, trl.SFTConfig)
    assert trainer.args.max_length == 12 and trainer.args.ewc_mode == "stabilized"
    with pytest.raises(ValueError, match="ewc_lambda must be a finite number >= 0"):
        EWCSFTConfig(**_args(tmp_path), ewc_lambda=-1.0)


# ---------------------------------------------------------------------------------------------------------- DPO
def _preferences(data) -> datasets.Dataset:
    """Prompt, chosen and rejected continuations made of the animal words (DPO's standard format)."""
    rng = random.Random(1)
    words = WORDS["animals"]

    def phrase(size: int) -> str:
        return " ".join(rng.choice(words) for _ in range(size))

    rows = [{"prompt": phrase(4), "chosen": phrase(3), "rejected": phrase(3)} for _ in range(8)]
    return datasets.Dataset.from_list(rows)


def test_the_penalty_gradient_joins_the_dpo_step_and_accumulation_does_not_change_it(data, tmp_path):
    """DPOTrainer (a reference model, a loss that is a mean over preference pairs): one SGD step of the EWC trainer
    differs from the plain one by exactly η·λ·Ω·(θ − θ*); with 2 micro-batches of 2 it ends where 1 batch of 4 does."""
    _, tokenizer = data
    preferences = _preferences(data)
    EWCDPOTrainer, EWCDPOConfig = with_ewc(trl.DPOTrainer), ewc_config_class(trl.DPOConfig)
    model, state = _state(data, tmp_path)
    start = _params(model)
    reference = copy.deepcopy(model).eval()  # DPO's frozen reference (built from a Hub id when not given)
    lam, lr = 2.0, 0.05

    def restart():
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])

    def dpo_args(out, **kwargs):
        return {**_args(tmp_path / out, max_steps=1, max_length=24), **kwargs}

    plain = trl.DPOTrainer(model=model, ref_model=reference, args=trl.DPOConfig(**dpo_args("plain")),
                           train_dataset=preferences, processing_class=tokenizer)  # fmt: skip
    plain.train()
    after_plain = _params(model)
    results = []
    for batch, accumulation in ((4, 1), (2, 2)):
        restart()
        settings = dpo_args(f"ewc{accumulation}", per_device_train_batch_size=batch,
                            gradient_accumulation_steps=accumulation)  # fmt: skip
        args = EWCDPOConfig(**settings, ewc_mode="vanilla", ewc_lambda=lam)
        trainer = EWCDPOTrainer(model=model, ref_model=reference, args=args, train_dataset=preferences,
                                processing_class=tokenizer, ewc_state=state)  # fmt: skip
        trainer.train()
        assert any("ewc/penalty" in log for log in trainer.state.log_history)
        results.append(_params(model))
    largest = 0.0
    for n in start:
        expected = lr * lam * state.importances[n] * (start[n] - state.anchors[n])
        largest = max(largest, float(expected.abs().max()))
        torch.testing.assert_close(after_plain[n] - results[0][n], expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(results[1][n], results[0][n], rtol=1e-5, atol=1e-6)
    assert largest > 1e-2  # the penalty moved the weights far more than the tolerance
