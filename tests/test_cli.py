"""The `hf-ewc` command line: help, env, state, and for `train` and `prune` the contract on bad input — one line on
stderr naming the cause and the fix, exit code 2, nothing written."""

import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from testing_utils import MLP, damaged_state, make_config, run_cli, snapshot, tiny_gpt2, write_yaml
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_ewc import EWCState, prune_model
from hf_ewc.cli import build_parser, main
from hf_ewc.pipeline import Pipeline, build_run_config
from hf_ewc.pipeline.prepare import train_tokenizer
from hf_ewc.utils import ctrl_c_outside_finalizers, hold_directory, hold_output


ROOT = Path(__file__).resolve().parent.parent


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return list(action.choices)


@pytest.mark.parametrize("command", [None, *_subcommands()])
def test_help_exits_zero(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: hf-ewc" in capsys.readouterr().out


def test_env_prints_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^hf_ewc\s+\d", out, re.MULTILINE) and re.search(r"^transformers\s+5\.", out, re.MULTILINE)


def test_state_summary_and_bad_directory(tmp_path, capsys):
    model = MLP()
    EWCState().consolidate(
        model, {n: p.detach().abs() for n, p in model.named_parameters()}, domain="a", method="signal"
    ).save(tmp_path)
    assert main(["state", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["domains"] == ["a"] and summary["methods"] == ["signal"]
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert summary["bytes"] == 2 * 4 * summary["parameters"]
    assert main(["state", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-ewc state: error: No EWC state at")
    damaged_state(tmp_path, edit_tensors=lambda t: t["anchor.net.0.weight"].view(-1)[:1].fill_(math.inf))  # refused
    assert main(["state", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert not captured.out and len(err) == 1
    assert "is damaged: the anchor of 'net.0.weight' holds 1 NaN/Inf value(s)" in err[0]


def test_module_entry_point_runs():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "hf_ewc", "--version"], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    )
    assert out.stdout.startswith("hf-ewc ")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--ewc_lamda", "5"], "Unknown key 'ewc_lamda'; did you mean 'ewc_lambda'?"),
        (["--domains.0.max_sample", "5"], "Unknown key 'domains.0.max_sample'; did you mean 'max_samples'?"),
        (["--model.hidden_size", "5"], "valid keys: name_or_path, config, tokenizer"),
        (["--domains.7.max_samples", "5"], "is not an index of a list of 2 item(s); use 0…1"),
        (["--ewc_lambda", "lots"], "ewc_lambda must be float, got 'lots'"),
        (["--num_train_epochs", "[1]"], "num_train_epochs must be float"),
        (
            ["--ewc_mode", "strong"],
            "ewc_mode must be one of 'stabilized', 'vanilla', 'proximal', 'wva', 'clnp', 'off', got 'strong'",
        ),
        (["--ewc_lambda", "-1"], "ewc_lambda must be a finite number >= 0, got -1.0"),
        (["--task", "translation"], "Unknown task 'translation'; choose one of: causal_lm, masked_lm"),
        (["--ewc_lambda"], "has no value"),
        (["--domains.0.training.learning_rat", "1"], "Unknown key 'domains.0.training.learning_rat'; did you mean"),
    ],
)
def test_bad_overrides_are_named(tmp_path, capsys, overrides, message):
    config = write_yaml(tmp_path / "run.yaml", make_config(tmp_path))
    before = snapshot(tmp_path)
    rc, _, err = run_cli(["train", str(config), *overrides], capsys)
    assert rc == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def _bad_inputs(tmp_path: Path) -> dict:
    base = make_config(tmp_path)
    (tmp_path / "broken.yaml").write_text("task: causal_lm\ndomains:\n  - name: a\n   data_files: x\n")
    (tmp_path / "duplicate.yaml").write_text("seed: 1\nseed: 2\n")
    (tmp_path / "empty.jsonl").write_text('{"text": "   "}\n{"text": ""}\n')
    (tmp_path / "one_class.jsonl").write_text(
        "".join(json.dumps({"text": f"w{i} x y", "label": 1}) + "\n" for i in range(9))
    )
    cls = make_config(tmp_path, "sequence_classification")
    (tmp_path / "zero.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"text": "a b"}\n{"text": "c d"\n{"text": "e"}\n')
    (tmp_path / "broken.csv").write_text('text,label\n"a b",1\nc d,2,3\n')
    (tmp_path / "not_a_model").mkdir(exist_ok=True)
    (tmp_path / "not_a_model" / "notes.txt").write_text("hello")

    def variant(raw, **changes):
        raw = json.loads(json.dumps(raw))
        for key, value in changes.items():
            node = raw
            *parents, last = key.split("__")
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            node[last] = value
        return raw

    return {
        "malformed YAML": (tmp_path / "broken.yaml", "line 4"),
        "missing file": (variant(base, domains__1__data_files="nope.jsonl"), "data file 'nope.jsonl' not found"),
        "missing column": (
            variant(base, domains__0__text_column="body"),
            "column 'body' not found (columns: text, label)",
        ),
        "empty domain": (
            variant(base, domains__1__data_files=str(tmp_path / "empty.jsonl")),
            "0 non-empty text(s) in 2 row(s)",
        ),
        "no label column": (variant(cls, domains__0__label_column="stars"), "column 'stars' not found"),
        "one class": (variant(cls, domains__1__data_files=str(tmp_path / "one_class.jsonl")), "has one class (1)"),
        "task the model cannot do": (variant(base, task="masked_lm"), "model type 'llama' cannot do task 'masked_lm'"),
        "unknown key": (variant(base, learning_rat=1.0), "did you mean 'learning_rate'"),
        "typo in model.config": (variant(base, model__config__hiden_size=8), "'model.config.hiden_size'"),
        "blocks longer than the model": (variant(base, model__max_length=64), "exceeds the model's 32 positions"),
        "SI without training": (
            variant(base, importance_method="si", domains__0__training={"num_train_epochs": 0}),
            "has no training steps, but si importances come from training",
        ),
        "eval_fraction too large": (
            variant(base, domains__0__eval_fraction=0.999),
            "eval_fraction=0.999 cannot split",
        ),
        "duplicate key": (tmp_path / "duplicate.yaml", "duplicate key 'seed' (line 2)"),
        "empty data file": (
            variant(base, domains__1__data_files=str(tmp_path / "zero.jsonl")),
            "zero.jsonl' is empty",
        ),
        "malformed JSON line": (
            variant(base, domains__0__data_files=str(tmp_path / "broken.jsonl")),
            "broken.jsonl' line 2 is not valid JSON (Expecting ',' delimiter, column 15)",
        ),
        "malformed CSV line": (
            variant(cls, domains__0__data_files=str(tmp_path / "broken.csv")),
            "broken.csv' line 3 has 3 CSV field(s), its header has 2",
        ),
        "missing model directory": (
            variant(base, model={"name_or_path": "./no_such_model", "max_length": 16}),
            "model.name_or_path './no_such_model': no such directory",
        ),
        "directory that is not a model": (
            variant(base, model={"name_or_path": str(tmp_path / "not_a_model"), "max_length": 16}),
            "is a directory but not a saved model (no config.json)",
        ),
        "Hub id not cached offline": (
            variant(base, model={"name_or_path": "no-such-user/no-such-model", "max_length": 16}),
            "is a Hub id that is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids",
        ),
        "negative epochs": (variant(base, num_train_epochs=-1), "num_train_epochs must be a number >= 0, got -1"),
        "negative epochs of one domain": (
            variant(base, domains__1__training={"num_train_epochs": -2}),
            "domains.1.training.num_train_epochs must be a number >= 0, got -2",
        ),
        "zero batch size": (variant(base, per_device_train_batch_size=0), "per_device_train_batch_size must be"),
        "negative learning rate": (variant(base, learning_rate=-0.1), "learning_rate must be a finite number >= 0"),
        "negative warmup": (variant(base, warmup_steps=-3), "warmup_steps"),
    }


@pytest.mark.parametrize(
    "case",
    ["malformed YAML", "missing file", "missing column", "empty domain", "no label column", "one class",
     "task the model cannot do", "unknown key", "typo in model.config", "blocks longer than the model",
     "SI without training", "eval_fraction too large", "duplicate key", "empty data file", "malformed JSON line",
     "malformed CSV line", "missing model directory", "directory that is not a model", "Hub id not cached offline",
     "negative epochs",
     "negative epochs of one domain", "zero batch size", "negative learning rate", "negative warmup"],
)  # fmt: skip
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys, case):
    config, message = _bad_inputs(tmp_path)[case]
    if isinstance(config, dict):
        config = write_yaml(tmp_path / "bad.yaml", config)
    before = snapshot(tmp_path)
    rc, _, err = run_cli(["train", str(config)], capsys)
    assert rc == 2
    assert message in err, err
    assert err.startswith("hf-ewc train: error: ") and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "run").exists()


GREEK = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny Llama with a trained BPE tokenizer, saved with save_pretrained, and a text file to evaluate on."""
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(GREEK) for _ in range(40)) for _ in range(60)]
    with open(root / "text.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    tokenizer = train_tokenizer("causal_lm", iter(texts), 300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


def test_cli_prunes_evaluates_exports_and_verifies(saved_model, tmp_path, capsys):
    root = saved_model
    argv = ["prune", str(root / "model"), "--sparsity", "0.5", "--criterion", "obd", "--data",
            str(root / "text.jsonl"), "--max-length", "32", "--out", str(tmp_path / "p")]  # fmt: skip
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "| parameter | shape |" in out and "evaluation (" in out and "verified by AutoModelForCausalLM" in out
    report = json.loads((tmp_path / "p" / "pruning_report.json").read_text())
    assert report["criterion"] == "obd" and report["importance_source"] == "collected on data (fisher)"
    assert set(report["evaluation"]["before"]) >= {"loss", "perplexity"}
    assert report["evaluation"]["after"]["loss"] != report["evaluation"]["before"]["loss"]
    card = (tmp_path / "p" / "README.md").read_text()
    assert "## Evaluation" in card and "| loss |" in card
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    zeros = sum(int((p == 0).sum()) for n, p in reloaded.named_parameters() if n in report["layers"])
    assert zeros == sum(v["zeros"] for v in report["layers"].values()) > 0


def test_cli_uses_the_runs_own_ewc_state(tmp_path, capsys):
    raw = make_config(tmp_path, num_train_epochs=1)
    Pipeline(build_run_config(raw), print_fn=lambda *a: None).run_sequence()
    run_dir = Path(raw["output_dir"])
    rc, out, err = run_cli(["prune", str(run_dir), "--sparsity", "0.4", "--criterion", "fisher", "--out",
                            str(tmp_path / "p")], capsys)  # fmt: skip
    assert rc == 0, err
    assert f"importances: the EWC state in {run_dir / 'ewc_state'}" in out
    expected = AutoModelForCausalLM.from_pretrained(run_dir)
    prune_model(expected, 0.4, criterion="fisher", importances=EWCState.load(run_dir / "ewc_state"),
                show_progress=False)  # fmt: skip
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    for (n, p), (_, q) in zip(expected.named_parameters(), got.named_parameters()):
        assert torch.equal(p, q), n


def _cli_bad_inputs(root: Path, tmp: Path) -> dict:
    (tmp / "exists").mkdir(exist_ok=True)
    (tmp / "notamodel").mkdir(exist_ok=True)
    (tmp / "notamodel" / "notes.txt").write_text("hello")
    other = EWCState()
    gpt2 = tiny_gpt2()
    other.consolidate(gpt2, {n: torch.ones_like(p) for n, p in gpt2.named_parameters()}, domain="x")
    other.save(tmp / "other_state")
    model, out = str(root / "model"), str(tmp / "out")
    own = AutoModelForCausalLM.from_pretrained(model)
    EWCState().consolidate(own, {n: torch.ones_like(p) for n, p in own.named_parameters()}, domain="x").save(
        tmp / "nan_state"
    )

    def nan_in_an_importance(tensors):
        tensors[min(k for k in tensors if k.startswith("importance."))].view(-1)[0] = math.nan

    damaged_state(tmp / "nan_state", edit_tensors=nan_in_an_importance)
    return {
        "damaged importances": (
            [
                model,
                "--sparsity",
                "0.5",
                "--criterion",
                "fisher",
                "--importances",
                str(tmp / "nan_state"),
                "--out",
                out,
            ],
            "is damaged: the importance of",
        ),
        "missing model": ([str(tmp / "nope"), "--sparsity", "0.5", "--out", out], "nope': no such directory; fix"),
        "not a model": ([str(tmp / "notamodel"), "--sparsity", "0.5", "--out", out], "is a directory but not a saved"),
        "existing out": ([model, "--sparsity", "0.5", "--out", str(tmp / "exists")], "already exists"),
        "sparsity": ([model, "--sparsity", "1.5", "--out", out], r"sparsity must be in [0, 1)"),
        "criterion": ([model, "--sparsity", "0.5", "--criterion", "taylor", "--out", out], "choose one of: magnitude"),
        "structure": ([model, "--sparsity", "0.5", "--structure", "rows", "--out", out], "Unknown structure 'rows'"),
        "no importances": (
            [model, "--sparsity", "0.5", "--criterion", "obd", "--out", out],
            "needs fisher importances",
        ),
        "foreign importances": (
            [
                model,
                "--sparsity",
                "0.5",
                "--criterion",
                "fisher",
                "--importances",
                str(tmp / "other_state"),
                "--out",
                out,
            ],
            "from another model: parameter 'model.layers.0.self_attn.q_proj.weight'",
        ),
        "n:m": ([model, "--structure", "3:5", "--out", out], "needs the input dimension to be divisible by 5"),
        "missing importances dir": (
            [model, "--sparsity", "0.5", "--criterion", "mas", "--importances", str(tmp / "nodir"), "--out", out],
            "importances directory",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["missing model", "not a model", "existing out", "sparsity", "criterion", "structure", "no importances",
     "foreign importances", "n:m", "missing importances dir", "damaged importances"],
)  # fmt: skip
def test_cli_bad_input_gives_one_line_exit_2_and_writes_nothing(saved_model, tmp_path, capsys, case):
    argv, message = _cli_bad_inputs(saved_model, tmp_path)[case]
    before, before_model = snapshot(tmp_path), snapshot(saved_model)
    rc, _out, err = run_cli(["prune", *argv], capsys)
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("hf-ewc prune: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert snapshot(tmp_path) == before and snapshot(saved_model) == before_model


def test_a_model_with_nan_weights_is_refused_before_training_or_pruning(saved_model, tmp_path, capsys):
    poisoned = tmp_path / "nan_model"
    shutil.copytree(saved_model / "model", poisoned)
    weights = load_file(poisoned / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, :2] = torch.tensor([math.nan, math.inf])
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
    raw = make_config(tmp_path)
    raw["model"] = {"name_or_path": str(poisoned), "max_length": 32}
    config = write_yaml(tmp_path / "run.yaml", raw)
    expected = "weight 'model.layers.1.mlp.up_proj.weight' holds 2 NaN/Inf value(s)"
    before = snapshot(tmp_path)
    for command in (
        ["train", str(config)],
        ["prune", str(poisoned), "--sparsity", "0.5", "--out", str(tmp_path / "p")],
    ):
        rc, _out, err = run_cli(command, capsys)
        lines = [line for line in err.strip().splitlines() if line.startswith(f"hf-ewc {command[0]}: error:")]
        assert rc == 2 and len(lines) == 1 and expected in lines[0] and str(poisoned) in lines[0], err
        assert "Traceback" not in err
        assert snapshot(tmp_path) == before


def test_output_dir_that_cannot_be_created_and_resume_without_a_run(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("not a directory")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: let the permission check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    base = make_config(tmp_path)
    cases = [
        (variant_of(base, output_dir=str(tmp_path / "afile" / "run")), [], "afile' is a file"),
        (variant_of(base, output_dir=str(tmp_path / "afile")), [], "is a file; choose a directory"),
        (variant_of(base, output_dir=str(tmp_path / "nowhere")), ["--resume"], "--resume: there is no run in"),
        (variant_of(base, output_dir=str(locked / "run")), [], "locked' is not writable; choose another"),
    ]
    for i, (raw, extra, message) in enumerate(cases):
        config = write_yaml(tmp_path / f"c{i}.yaml", raw)
        before = snapshot(tmp_path)
        rc, _out, err = run_cli(["train", str(config), *extra], capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and message in lines[0], err
        assert "drop --resume" in lines[0] or not extra
        assert snapshot(tmp_path) == before
    locked.chmod(0o700)


def variant_of(raw: dict, **changes) -> dict:
    return {**json.loads(json.dumps(raw)), **changes}


def test_one_run_per_output_dir_and_a_killed_holder_does_not_block_resume(tmp_path, capsys):
    raw = make_config(tmp_path, num_train_epochs=1)
    config = write_yaml(tmp_path / "run.yaml", raw)
    out = Path(raw["output_dir"])
    out.mkdir()
    with hold_directory(out):  # another run is working in output_dir (here: this process, through its own lock)
        before = snapshot(tmp_path)
        for extra in ([], ["--overwrite"]):  # (--resume: below, on a real run)
            rc, _out, err = run_cli(["train", str(config), *extra], capsys)
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1, err
            assert f"is in use by another hf-ewc process (pid {os.getpid()} on " in lines[0], err
            assert snapshot(tmp_path) == before
    assert sorted(p.name for p in out.iterdir()) == [".hf_ewc.lock"]  # released; the owner record is gone

    rc, _out, err = run_cli(["train", str(config)], capsys)
    assert rc == 0, err
    # A holder killed with SIGKILL (no chance to release) leaves its lock file, and it blocks nothing.
    code = (
        "import sys, time\nfrom hf_ewc.utils import hold_directory\nwith hold_directory(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    rc, _out, err = run_cli(["train", str(config), "--resume"], capsys)
    assert rc == 2 and f"(pid {holder.pid} on " in err, err
    holder.kill()
    holder.wait()
    assert (out / ".hf_ewc.lock").exists()
    rc, out_text, err = run_cli(["train", str(config), "--resume"], capsys)
    assert rc == 0 and "holds a finished run of this config; nothing to do" in out_text, err


def test_ctrl_c_says_how_to_continue_and_resume_gives_the_uninterrupted_result(tmp_path, capsys):
    raw = make_config(tmp_path, domains=("animals", "tools", "colours"), num_train_epochs=1)
    raw["domains"][1]["training"] = {"num_train_epochs": 10}  # long enough for the interrupt to land inside it
    config = write_yaml(tmp_path / "run.yaml", raw)
    reference = Pipeline(build_run_config({**raw, "output_dir": str(tmp_path / "ref")}), print_fn=None).run_sequence()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # As in a terminal: a runner that started the tests in the background has SIGINT ignored, and an ignored signal is
    # inherited by children; a handled one is not, so handle it while the child starts.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        child = subprocess.Popen([sys.executable, "-m", "hf_ewc", "train", str(config)], env=env, cwd=tmp_path,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    progress = Path(raw["output_dir"]) / "progress.json"
    while child.poll() is None:  # Ctrl-C once the first domain is done: during the second one
        if progress.is_file() and json.loads(progress.read_text() or "{}").get("completed"):
            child.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"hf-ewc train: interrupted; {raw['output_dir']} keeps the finished domains and the last checkpoint. "
        f"Continue with: hf-ewc train {config} --resume"
    )
    rc, _out, err = run_cli(["train", str(config), "--resume"], capsys)
    assert rc == 0, err
    resumed = json.loads((Path(raw["output_dir"]) / "results.json").read_text())
    for key in reference["matrix"]:
        torch.testing.assert_close(torch.tensor(resumed["matrix"][key]), torch.tensor(reference["matrix"][key]),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_disk_full_while_saving_a_stage_loses_nothing_and_resume_finishes(tmp_path, capsys, monkeypatch):
    raw = make_config(tmp_path, num_train_epochs=1)
    config = write_yaml(tmp_path / "run.yaml", raw)
    out = Path(raw["output_dir"])
    real_replace = os.replace

    def disk_full_for_the_second_stage(src, dst):
        if Path(dst).name == "1-tools":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full_for_the_second_stage)
    rc, _out, err = run_cli(["train", str(config)], capsys)
    monkeypatch.undo()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "1-tools': No space left on device (errno 28); it keeps its previous content" in lines[0]
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["0-animals"]  # the first domain's stage, whole
    assert not list(out.rglob("*.tmp"))
    rc, _out, err = run_cli(["train", str(config), "--resume"], capsys)
    assert rc == 0, err
    reference = Pipeline(build_run_config({**raw, "output_dir": str(tmp_path / "ref")}), print_fn=None).run_sequence()
    resumed = json.loads((out / "results.json").read_text())
    for key in reference["matrix"]:
        torch.testing.assert_close(torch.tensor(resumed["matrix"][key]), torch.tensor(reference["matrix"][key]),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_a_second_prune_to_the_same_out_is_refused_at_once_naming_the_first(saved_model, tmp_path, capsys):
    out = tmp_path / "pruned"
    with hold_output(out):  # another `hf-ewc prune --out pruned` is running
        assert sorted(p.name for p in tmp_path.iterdir()) == [".pruned.hf_ewc.lock", ".pruned.hf_ewc.owner.json"]
        before = snapshot(tmp_path)
        rc, _out, err = run_cli(["prune", str(saved_model / "model"), "--sparsity", "0.5", "--out", str(out)], capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, err
        assert f"--out '{out}' is in use by another hf-ewc process (pid {os.getpid()} on " in lines[0]
        assert snapshot(tmp_path) == before
    assert not list(tmp_path.iterdir())  # the lock next to an export is removed once released
    rc, _out, err = run_cli(["prune", str(saved_model / "model"), "--sparsity", "0.5", "--out", str(out)], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_ctrl_c_before_the_run_starts_suggests_the_same_command_not_resume(tmp_path, capsys, monkeypatch):
    raw = make_config(tmp_path)
    config = write_yaml(tmp_path / "run.yaml", raw)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hf_ewc.pipeline.loop.prepare", interrupted)  # Ctrl-C while the data loads
    before = snapshot(tmp_path)
    rc, _out, err = run_cli(["train", str(config), "--seed", "3"], capsys)
    assert rc == 130
    assert err.strip().splitlines()[-1] == (
        "hf-ewc train: interrupted; the run had not started (nothing of it was written). Start again with: "
        f"hf-ewc train {config} --seed 3"
    )
    assert snapshot(tmp_path) == before and not Path(raw["output_dir"]).exists()


def test_a_model_built_from_config_may_take_a_saved_tokenizer(saved_model, tmp_path, capsys):
    raw = make_config(tmp_path)
    raw["model"]["tokenizer"] = str(saved_model / "model")  # `config:` and `tokenizer:`, no `name_or_path`
    rc, _out, err = run_cli(["train", str(write_yaml(tmp_path / "run.yaml", raw))], capsys)
    assert rc == 0, err
    assert (Path(raw["output_dir"]) / "results.json").is_file()


def test_prune_after_an_interrupted_overwrite_sees_the_previous_export_at_once(saved_model, tmp_path, capsys):
    (tmp_path / ".pruned.previous").mkdir()  # `prune --overwrite` killed between its two renames
    (tmp_path / ".pruned.previous" / "config.json").write_text("{}")
    rc, _out, err = run_cli(["prune", str(saved_model / "model"), "--sparsity", "0.5", "--out",
                             str(tmp_path / "pruned")], capsys)  # fmt: skip
    assert rc == 2 and "pruned' already exists; choose another --out or pass --overwrite" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # the previous export, back in place


def test_cli_correlate_writes_the_report_and_skips_what_it_cannot_measure(saved_model, tmp_path, capsys):
    root = saved_model
    argv = ["correlate", str(root / "model"), "--data", str(root / "text.jsonl"), "--max-length", "32",
            "--methods", "fisher,sqrt_fisher,mas,signal,magnitude,si", "--out", str(tmp_path / "c")]  # fmt: skip
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "si: skipped — si is accumulated during training" in out and "| fisher – mas |" in out
    report = json.loads((tmp_path / "c" / "correlations.json").read_text())
    assert report["methods"] == ["fisher", "sqrt_fisher", "mas", "signal", "magnitude"]
    assert report["fisher_estimator"] == "sampled" and set(report["skipped"]) == {"si"}
    assert len(report["global"]) == 10 and len(report["per_parameter"]) == len(
        list(AutoModelForCausalLM.from_pretrained(root / "model").parameters())
    )
    # the root is monotone and the label draws are seeded: fisher and sqrt_fisher rank every weight alike
    assert report["global"]["fisher|sqrt_fisher"]["spearman"] == pytest.approx(1.0, abs=1e-9)
    assert report["global"]["fisher|sqrt_fisher"]["pearson"] < 1.0
    for name in ("correlations.md", "correlations_global.png", "correlations_per_layer.png"):
        assert (tmp_path / "c" / name).stat().st_size > 0
    assert "## Per parameter tensor" in (tmp_path / "c" / "correlations.md").read_text()


def test_cli_correlate_reads_si_from_a_run_trained_with_it(tmp_path, capsys):
    raw = make_config(tmp_path, num_train_epochs=1, importance_method="si")
    Pipeline(build_run_config(raw), print_fn=lambda *a: None).run_sequence()
    run_dir = Path(raw["output_dir"])
    rc, _, err = run_cli(
        ["correlate", str(run_dir), "--methods", "si,magnitude", "--out", str(tmp_path / "c")], capsys
    )
    assert rc == 0, err
    report = json.loads((tmp_path / "c" / "correlations.json").read_text())
    assert report["methods"] == ["si", "magnitude"] and report["samples"] == 0
    si = EWCState.load(run_dir / "ewc_state").importances
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    x = torch.cat([si[n].reshape(-1) for n, _ in model.named_parameters()]).double()
    y = torch.cat([p.detach().abs().reshape(-1) for _, p in model.named_parameters()]).double()
    assert report["global"]["si|magnitude"]["pearson"] == pytest.approx(
        float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "fisher"], "--methods needs at least two methods to correlate; got fisher"),
        (["--methods", "fisher,fishr"], "--methods: unknown method 'fishr'; choose from: fisher, sqrt_fisher"),
        (["--methods", "si,magnitude"], "fewer than two usable methods (magnitude); skipped: si: si is accumulated"),
        (["--methods", "mas,magnitude", "--no-data"], "--data FILE… is needed to measure mas"),
    ],
)
def test_cli_correlate_bad_input_is_one_line(saved_model, tmp_path, capsys, extra, message):
    root = saved_model
    data = [] if "--no-data" in extra else ["--data", str(root / "text.jsonl"), "--max-length", "32"]
    extra = [e for e in extra if e != "--no-data"]
    rc, _, err = run_cli(["correlate", str(root / "model"), *data, *extra, "--out", str(tmp_path / "c")], capsys)
    errors = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and len(errors) == 1 and errors[0].startswith("hf-ewc correlate: error: ") and message in errors[0]
    assert not (tmp_path / "c").exists()


def test_a_ctrl_c_inside_a_finalizer_is_not_lost():
    """Python prints and drops an exception raised in ``__del__``; the CLI's handler sends the signal again instead."""

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is handled here, inside the finalizer

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a runner may start us with SIGINT ignored
    try:
        with pytest.raises(KeyboardInterrupt), ctrl_c_outside_finalizers(delay=0.01):
            obj = Finalized()
            del obj
            time.sleep(2)  # the signal sent again lands here
    finally:
        signal.signal(signal.SIGINT, previous)
