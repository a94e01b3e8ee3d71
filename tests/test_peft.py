"""`peft:` (LoRA) runs: EWC protects the adapter only, the state survives adapter save/load, `--from` continues a LoRA
sequence, `hf-ewc prune` merges the adapter and exports one plain model, bad blocks fail before anything is written."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from testing_utils import AUTO, make_config, run_cli, snapshot, write_yaml
from transformers import AutoTokenizer

from hf_ewc import EWCState
from hf_ewc.pipeline import Pipeline, build_run_config


LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def load_run(run_dir, task):
    base = AUTO[task].from_pretrained(run_dir / "base_model")
    return PeftModel.from_pretrained(base, str(run_dir), is_trainable=True)


@pytest.mark.parametrize("task", ["causal_lm", "masked_lm", "sequence_classification"])
def test_lora_run_protects_the_adapter_only_and_the_state_survives_save_load(tmp_path, task, capsys):
    peft = {**LORA, "target_modules": ["q_proj", "v_proj", "down_proj"]} if task == "causal_lm" else LORA
    raw = make_config(tmp_path, task, peft=peft)
    rc, _, err = run_cli(["train", str(write_yaml(tmp_path / "run.yaml", raw))], capsys)
    assert rc == 0, err
    run_dir = tmp_path / "run"
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "base_model" / "config.json").is_file()
    assert not (run_dir / "model.safetensors").exists()  # the adapter, not a full copy of the model

    model = load_run(run_dir, task)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = EWCState.load(run_dir)
    # importances and anchors: exactly the trainable parameters, under the names the reloaded adapter gives them
    assert set(state.importances) == set(state.anchors) == set(trainable)
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    if task == "sequence_classification":
        assert any(".modules_to_save." in n for n in trainable)  # the new head trains, and is protected
    assert state.validate(model) == []
    for name, p in trainable.items():  # anchors = the adapter after the last domain, bit for bit
        assert torch.equal(state.anchors[name], p.detach()), name
    assert sum(float(t.sum()) for t in state.importances.values()) > 0
    # the base model is frozen: the adapter file holds no base weight, the base is in base_model/ only
    saved = load_file(run_dir / "adapter_model.safetensors")
    assert saved and all("lora_" in k or "modules_to_save" in k or "classifier" in k for k in saved)

    results = json.loads((run_dir / "results.json").read_text())
    parameters = results["parameters"]
    assert parameters["trainable_parameters"] == state.num_parameters < parameters["total_parameters"] // 4
    assert parameters["peft"]["r"] == 4 and parameters["peft"]["alpha"] == 8
    # the reloaded adapter reproduces the last row of the matrix
    metric = results["metric"]
    pipeline = Pipeline(build_run_config(raw), print_fn=None)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    for j, data in enumerate(pipeline.load_domains(tokenizer)):
        cell = pipeline.evaluate(model, data, tokenizer)
        assert cell[metric] == pytest.approx(results["matrix"][metric][1][j], rel=1e-5, abs=1e-6)
    card = (run_dir / "README.md").read_text()
    assert "library_name: peft" in card and "the LoRA adapter (r = 4, α = 8" in card
    assert f"{parameters['total_parameters'] - parameters['trainable_parameters']:,} parameters are frozen" in card
    assert "PeftModel.from_pretrained" in card


def test_lora_run_continues_with_from(tmp_path, capsys):
    first = make_config(tmp_path, peft=LORA)
    assert run_cli(["train", str(write_yaml(tmp_path / "a.yaml", first))], capsys)[0] == 0
    old = EWCState.load(tmp_path / "run")
    second = make_config(tmp_path, domains=("colours",), peft=LORA, output_dir=str(tmp_path / "next"))
    rc, _, err = run_cli(["train", str(write_yaml(tmp_path / "b.yaml", second)), "--from", str(tmp_path / "run")],
                         capsys)  # fmt: skip
    assert rc == 0, err
    new = EWCState.load(tmp_path / "next")
    assert [d["name"] for d in new.domains] == ["animals", "tools", "colours"]
    assert set(new.importances) == set(old.importances)
    results = json.loads((tmp_path / "next" / "results.json").read_text())
    assert results["domains_detail"][0]["train"]["last_log"]["ewc/penalty"] > 0  # the old domains are protected
    model = load_run(tmp_path / "next", "causal_lm")
    assert new.validate(model) == []

    # a different LoRA shape, a full run continued with LoRA, a LoRA run continued without: refused, nothing written
    # an adapter folder without its base model (copied without base_model/)
    (tmp_path / "bare").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "run" / name, tmp_path / "bare" / name)
    shutil.copytree(tmp_path / "run" / "ewc_state", tmp_path / "bare" / "ewc_state")
    colours = {"domains": ("colours",)}
    cases = {
        "r8": (make_config(tmp_path, **colours, peft={**LORA, "r": 8}), "run", "r: 4 there, 8 in the config"),
        "dropout": (make_config(tmp_path, **colours, peft={**LORA, "dropout": 0.3}), "run",
                    "dropout: 0.0 there, 0.3 in the config"),
        "nolora": (make_config(tmp_path, **colours), "run", "continue it with the same peft: block"),
        "from_bare": (make_config(tmp_path, **colours, peft=LORA), "bare", "the adapter's base model is missing"),
    }  # fmt: skip
    for name, (raw, source, message) in cases.items():
        raw["output_dir"] = str(tmp_path / name)
        config = write_yaml(tmp_path / f"{name}.yaml", raw)
        before = snapshot(tmp_path)
        rc, _, err = run_cli(["train", str(config), "--from", str(tmp_path / source)], capsys)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert snapshot(tmp_path) == before

    full = make_config(tmp_path, domains=("animals",), output_dir=str(tmp_path / "full"))
    assert run_cli(["train", str(write_yaml(tmp_path / "full.yaml", full))], capsys)[0] == 0
    raw = make_config(tmp_path, domains=("colours",), peft=LORA, output_dir=str(tmp_path / "mixed"))
    rc, _, err = run_cli(["train", str(write_yaml(tmp_path / "mixed.yaml", raw)), "--from", str(tmp_path / "full")],
                         capsys)  # fmt: skip
    assert rc == 2 and "full fine-tuning run" in err and not (tmp_path / "mixed").exists()


def test_all_linear_lora_run_continues_with_from(tmp_path, capsys):
    """PEFT saves "all-linear" expanded to every module path; the block still matches its own adapter."""
    lora = {**LORA, "target_modules": "all-linear"}
    first = make_config(tmp_path, domains=("animals",), peft=lora, num_train_epochs=1)
    assert run_cli(["train", str(write_yaml(tmp_path / "a.yaml", first))], capsys)[0] == 0
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(saved, list) and len(saved) > 1  # expanded by PEFT
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["parameters"]["peft"]["target_modules"] == sorted({t.rsplit(".", 1)[-1] for t in saved})
    second = make_config(tmp_path, domains=("tools",), peft=lora, num_train_epochs=1, output_dir=str(tmp_path / "b"))
    rc, _, err = run_cli(["train", str(write_yaml(tmp_path / "b.yaml", second)), "--from", str(tmp_path / "run")],
                         capsys)  # fmt: skip
    assert rc == 0, err


def test_lora_run_merged_then_pruned_and_exported(tmp_path, capsys):
    raw = make_config(tmp_path, peft=LORA)
    assert run_cli(["train", str(write_yaml(tmp_path / "run.yaml", raw))], capsys)[0] == 0
    run_dir = tmp_path / "run"
    merged = load_run(run_dir, "causal_lm").merge_and_unload()
    lora_delta = max(
        float((p - q).detach().abs().max())
        for (n, p), (_, q) in zip(merged.named_parameters(),
                                  AUTO["causal_lm"].from_pretrained(run_dir / "base_model").named_parameters())
    )  # fmt: skip
    assert lora_delta > 0  # merging changes the base weights: what is pruned is base + adapter

    rc, out, err = run_cli(["prune", str(run_dir), "--sparsity", "0.5", "--out", str(tmp_path / "pruned")], capsys)
    assert rc == 0, err
    pruned = AUTO["causal_lm"].from_pretrained(tmp_path / "pruned")
    merged_params = dict(merged.named_parameters())
    report = json.loads((tmp_path / "pruned" / "pruning_report.json").read_text())
    pruned_names = set(report["layers"])
    assert pruned_names and set(dict(pruned.named_parameters())) == set(merged_params)
    zeros = total = 0
    for name, p in pruned.named_parameters():
        kept = p != 0
        assert torch.equal(p[kept], merged_params[name].detach()[kept]), name  # every weight left is the merged one
        if name in pruned_names:
            zeros, total = zeros + int((~kept).sum()), total + p.numel()
    assert zeros == total // 2  # global 50 % of the targets
    # importance criteria: the run's state covers the adapter only, so they need --data
    rc, _, err = run_cli(["prune", str(run_dir), "--sparsity", "0.5", "--criterion", "obd", "--out",
                          str(tmp_path / "obd")], capsys)  # fmt: skip
    assert rc == 2 and "LoRA run" in err and "--data" in err and not (tmp_path / "obd").exists()
    rc, out, err = run_cli(["prune", str(run_dir), "--sparsity", "0.5", "--criterion", "obd", "--data",
                            str(tmp_path / "animals.jsonl"), "--out", str(tmp_path / "obd")], capsys)  # fmt: skip
    assert rc == 0, err
    assert "measured on --data" in out and (tmp_path / "obd" / "model.safetensors").is_file()
    # a broken adapter folder: one line, nothing written
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text('{"r": 4')
    rc, _, err = run_cli(["prune", str(tmp_path / "broken"), "--sparsity", "0.5", "--out", str(tmp_path / "pb")],
                         capsys)  # fmt: skip
    assert rc == 2 and "Cannot read the adapter config" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "pb").exists()


@pytest.mark.parametrize(
    "peft,message",
    [
        ({"method": "ia3"}, "peft.method 'ia3' is not supported"),
        ({"r": 0}, "peft.r must be >= 1"),
        ({"dropout": 1.0}, "peft.dropout must be in [0, 1)"),
        ({"rank": 4}, "Unknown key 'peft.rank'"),
        ({"target_modules": ["no_such_module"]}, "Set peft.target_modules to module names of this model"),
        ({"modules_to_save": ["no_such_head"]}, "peft.modules_to_save: no_such_head is not a module of this model"),
    ],
)
def test_bad_peft_block_fails_before_anything_is_written(tmp_path, capsys, peft, message):
    raw = make_config(tmp_path, peft=peft)
    config = write_yaml(tmp_path / "run.yaml", raw)
    before = snapshot(tmp_path)
    rc, _, err = run_cli(["train", str(config)], capsys)
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_peft_and_prune_blocks_exclude_each_other(tmp_path, capsys):
    raw = make_config(tmp_path, peft=LORA, prune={"sparsity": 0.5})
    rc, _, err = run_cli(["train", str(write_yaml(tmp_path / "run.yaml", raw))], capsys)
    assert rc == 2 and "prune: and peft: exclude each other" in err and "hf-ewc prune" in err
