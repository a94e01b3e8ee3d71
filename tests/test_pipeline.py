"""`hf-ewc train` end to end on tiny models: every task type, resume after interruption, `--from`, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from hf_ewc import EWCState
from hf_ewc.cli import main
from hf_ewc.pipeline import Pipeline, build_run_config, config_differences, load_run_config
from hf_ewc.pipeline.data import DomainData
from hf_ewc.trainer import EWCTrainer


AUTO = {
    "causal_lm": AutoModelForCausalLM,
    "masked_lm": AutoModelForMaskedLM,
    "sequence_classification": AutoModelForSequenceClassification,
}
MODEL_CONFIGS = {
    "causal_lm": {
        "model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32,
    },
    "bert": {
        "model_type": "bert", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 32, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
}  # fmt: skip
WORDS = {
    "animals": [
        "cat",
        "dog",
        "horse",
        "cow",
        "sheep",
        "goat",
        "duck",
        "goose",
        "hen",
        "fox",
        "wolf",
        "bear",
        "deer",
        "mouse",
        "owl",
    ],
    "tools": [
        "hammer",
        "saw",
        "drill",
        "chisel",
        "wrench",
        "pliers",
        "level",
        "clamp",
        "file",
        "rasp",
        "plane",
        "awl",
        "vise",
        "anvil",
    ],
    "colours": [
        "red",
        "green",
        "blue",
        "cyan",
        "magenta",
        "yellow",
        "black",
        "white",
        "grey",
        "orange",
        "purple",
        "brown",
        "pink",
    ],
}


def write_domain(path: Path, words: list[str], n: int, seed: int) -> None:
    """``n`` records of 12–20 words; the label says whether the first word sorts before the last."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            text = [rng.choice(words) for _ in range(rng.randint(12, 20))]
            f.write(json.dumps({"text": " ".join(text), "label": int(text[0] < text[-1])}) + "\n")


def make_config(tmp_path: Path, task: str = "causal_lm", domains=("animals", "tools"), **training) -> dict:
    for i, name in enumerate(WORDS):
        if not (tmp_path / f"{name}.jsonl").exists():
            write_domain(tmp_path / f"{name}.jsonl", WORDS[name], 40, seed=i)
    model_config = MODEL_CONFIGS["causal_lm" if task == "causal_lm" else "bert"]
    raw = {
        "task": task,
        "model": {"config": dict(model_config), "tokenizer_vocab_size": 128, "max_length": 16},
        "domains": [
            {"name": d, "data_files": str(tmp_path / f"{d}.jsonl"), "max_samples": 24, "max_eval_samples": 8}
            for d in domains
        ],
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "num_train_epochs": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "ewc_lambda": 1e4,
        "importance_max_samples": 8,
        "importance_batch_size": 4,
        "save_steps": 3,
        "logging_steps": 2,
        "disable_tqdm": True,
        **training,
    }
    return raw


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_same_state(a: EWCState, b: EWCState, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    assert set(a.importances) == set(b.importances)
    for name in a.importances:
        torch.testing.assert_close(a.importances[name], b.importances[name], rtol=rtol, atol=atol)
        torch.testing.assert_close(a.anchors[name], b.anchors[name], rtol=rtol, atol=atol)
    assert [d["name"] for d in a.domains] == [d["name"] for d in b.domains]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("task", ["causal_lm", "masked_lm", "sequence_classification"])
def test_two_domains_end_to_end(tmp_path, task, capsys):
    raw = make_config(tmp_path, task)
    rc, out, err = run_cli(["train", str(write_yaml(tmp_path / "run.yaml", raw))], capsys)
    assert rc == 0, err
    run_dir = tmp_path / "run"
    artefacts = ["results.json", "results.md", "matrix.png", "trajectories.png", "README.md", "config.json",
                 "model.safetensors", "tokenizer.json", "ewc_state/ewc_state.safetensors"]  # fmt: skip
    for name in artefacts:
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "stages").exists() and not (run_dir / "domains").exists()
    results = json.loads((run_dir / "results.json").read_text())
    metric = "accuracy" if task == "sequence_classification" else "loss"
    assert results["metric"] == metric and results["domains"] == ["animals", "tools"]
    matrix = results["matrix"][metric]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert set(results["summary"]) >= {"acc", "bwt", "fwt", "forgetting", "avg_forgetting", "learned"}
    if task != "sequence_classification":
        # Training on a domain lowers its loss (the diagonal is below the untrained model's row).
        assert matrix[0][0] < results["initial"]["loss"][0] and matrix[1][1] < results["initial"]["loss"][1]
    # The saved model is the final one: reloaded, it reproduces the last row of the matrix.
    model = AUTO[task].from_pretrained(run_dir)
    run = build_run_config(raw)
    pipeline = Pipeline(run, print_fn=None)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    for j, data in enumerate(pipeline.load_domains(tokenizer)):
        assert isinstance(data, DomainData)
        cell = pipeline.evaluate(model, data, tokenizer)
        assert cell[metric] == pytest.approx(matrix[1][j], rel=1e-5, abs=1e-6)
    # The EWC state covers both domains and every trainable parameter of the saved model.
    state = EWCState.load(run_dir / "ewc_state")
    assert [d["name"] for d in state.domains] == ["animals", "tools"]
    assert state.validate(model) == []
    card = (run_dir / "README.md").read_text()
    assert "library_name: transformers" in card and "| after tools |" in card and "animals" in card
    assert "after tools" in out and "BWT" in out  # the matrix and the summary are printed
    rc, out, _ = run_cli(["state", str(run_dir)], capsys)  # `hf-ewc state` finds a run's ewc_state/
    assert rc == 0 and json.loads(out)["domains"] == ["animals", "tools"]


# ------------------------------------------------------------------------------------------------ resume
def _uninterrupted(tmp_path: Path, raw: dict) -> tuple[dict, EWCState]:
    raw = {**raw, "output_dir": str(tmp_path / "reference")}
    results = Pipeline(build_run_config(raw), print_fn=None).run_sequence()
    return results, EWCState.load(tmp_path / "reference" / "ewc_state")


def _matrices_close(a: dict, b: dict) -> None:
    for key in a["matrix"]:
        torch.testing.assert_close(
            torch.tensor(a["matrix"][key]), torch.tensor(b["matrix"][key]), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(
    "method,lora", [("fisher", False), ("si", False), ("si", True)], ids=["fisher", "si", "si-lora"]
)
def test_resume_after_interrupted_consolidation_matches_uninterrupted(tmp_path, monkeypatch, method, lora):
    peft = {"peft": {"r": 4, "alpha": 8}} if lora else {}
    raw = make_config(tmp_path, domains=("animals", "tools", "colours"), importance_method=method, **peft)
    reference, ref_state = _uninterrupted(tmp_path, raw)

    original = EWCTrainer.consolidate
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(kwargs.get("domain"))
        if kwargs.get("domain") == "tools":
            raise KeyboardInterrupt  # the process dies after training domain 1, before its stage is saved
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EWCTrainer, "consolidate", failing)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(build_run_config(raw), print_fn=None).run_sequence()
    monkeypatch.setattr(EWCTrainer, "consolidate", original)
    run_dir = tmp_path / "run"
    progress = json.loads((run_dir / "progress.json").read_text())
    assert [c["domain"] for c in progress["completed"]] == ["animals"]
    assert list((run_dir / "domains" / "1-tools").glob("checkpoint-*"))  # the Trainer's checkpoint survived
    # A checkpoint cut short by a kill while saving (no trainer_state.json yet) must not be resumed from.
    partial = run_dir / "domains" / "1-tools" / "checkpoint-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")

    trained = []
    original_train = EWCTrainer.train

    def counting_train(self, *args, **kwargs):
        trained.append(Path(self.args.output_dir).name)
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(EWCTrainer, "train", counting_train)
    results = Pipeline(build_run_config(raw), resume=True, print_fn=None).run_sequence()
    # Domain 0 was not retrained; domain 1 resumed from its last checkpoint (its training had finished).
    assert trained == ["1-tools", "2-colours"]
    detail = results["domains_detail"]
    assert detail[0]["train"]["resumed_from"] is None
    assert detail[1]["train"]["resumed_from"] not in (None, "checkpoint-999")
    _matrices_close(results, reference)
    assert_same_state(EWCState.load(run_dir / "ewc_state"), ref_state)


def test_resume_after_kill_9_matches_uninterrupted(tmp_path):
    raw = make_config(tmp_path, num_train_epochs=6, save_steps=2)
    reference, ref_state = _uninterrupted(tmp_path, raw)
    config = write_yaml(tmp_path / "run.yaml", raw)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "hf_ewc", "train", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = tmp_path / "run" / "domains" / "1-tools"
    deadline = time.monotonic() + 300
    try:
        # Kill -9 in the middle of domain 1's training, as soon as it has written a checkpoint.
        while not list(target.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (tmp_path / "run" / "results.json").exists()
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["domains_detail"][1]["train"]["resumed_from"] is not None
    _matrices_close(results, reference)
    assert_same_state(EWCState.load(tmp_path / "run" / "ewc_state"), ref_state)


def test_resume_refuses_a_different_config(tmp_path, capsys):
    raw = make_config(tmp_path, num_train_epochs=1)
    config = write_yaml(tmp_path / "run.yaml", raw)
    assert run_cli(["train", str(config)], capsys)[0] == 0
    before = snapshot(tmp_path)
    rc, _, err = run_cli(
        ["train", str(config), "--resume", "--ewc_lambda", "5", "--domains.1.max_samples", "3"], capsys
    )
    assert rc == 2
    assert "different config" in err and "ewc_lambda: 10000.0 → 5.0" in err and "domains.1.max_samples: 24 → 3" in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before
    # The same config resumes a finished run as a no-op.
    rc, out, _ = run_cli(["train", str(config), "--resume"], capsys)
    assert rc == 0 and "nothing to do" in out
    assert snapshot(tmp_path) == before


def test_config_differences_lists_changed_keys():
    old = {"ewc_lambda": 1.0, "domains": [{"name": "a", "max_samples": 3}], "report_to": "none"}
    new = {"ewc_lambda": 2.0, "domains": [{"name": "a", "max_samples": 4}, {"name": "b"}], "report_to": "tensorboard"}
    diff = config_differences(old, new)
    assert "ewc_lambda: 1.0 → 2.0" in diff
    assert "domains.0.max_samples: 3 → 4" in diff
    assert "domains.len: 1 → 2" in diff
    assert not any(d.startswith("report_to") for d in diff)  # logging does not change what is computed


# ------------------------------------------------------------------------------------------------ --from
def test_from_continues_with_the_old_importances(tmp_path, capsys):
    first = make_config(tmp_path, num_train_epochs=1)
    assert run_cli(["train", str(write_yaml(tmp_path / "first.yaml", first))], capsys)[0] == 0
    old = EWCState.load(tmp_path / "run" / "ewc_state")

    second = make_config(tmp_path, domains=("colours",), num_train_epochs=1)
    second["output_dir"] = str(tmp_path / "next")
    rc, _, err = run_cli(
        ["train", str(write_yaml(tmp_path / "next.yaml", second)), "--from", str(tmp_path / "run")], capsys
    )
    assert rc == 0, err
    results = json.loads((tmp_path / "next" / "results.json").read_text())
    # The penalty protected the old domains from the first step of the new one.
    last_log = results["domains_detail"][0]["train"]["last_log"]
    assert last_log["ewc/penalty"] > 0
    new = EWCState.load(tmp_path / "next" / "ewc_state")
    assert [d["name"] for d in new.domains] == ["animals", "tools", "colours"]
    for name, omega in old.importances.items():
        assert torch.all(new.importances[name] >= omega)  # summed: Ω_old + Ω_colours
        assert torch.any(new.importances[name] > omega)
    assert "continual-ready checkpoint" in (tmp_path / "next" / "README.md").read_text()
    # The sequence started from the first run's model and tokenizer: its "initial" row is that model's evaluation.
    pipeline = Pipeline(build_run_config(second), print_fn=None)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    (colours,) = pipeline.load_domains(tokenizer)
    cell = pipeline.evaluate(AutoModelForCausalLM.from_pretrained(tmp_path / "run"), colours, tokenizer)
    assert results["initial"]["loss"] == [pytest.approx(cell["loss"], rel=1e-6)]


# ------------------------------------------------------------------------------------------------ config parsing
def test_every_shipped_config_parses():
    root = Path(__file__).resolve().parents[1]
    paths = sorted((root / "configs").glob("*.yaml"))
    assert paths, "configs/ holds no YAML"
    for path in [None, *paths]:
        run = load_run_config(path)
        assert run.domains
        if path is not None:
            first = path.read_text().splitlines()[0]
            assert first.startswith("# hf-ewc train ") and path.name in first, path


def test_overrides_reach_the_config(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", make_config(tmp_path))
    run = load_run_config(
        config,
        ["--ewc_lambda", "50", "--domains.1.max_samples=200", "--model.config.hidden_size", "32",
         "--report_to", "none", "--ewc_mode", "proximal", "--domains.0.training", "{num_train_epochs: 5}"],
    )  # fmt: skip
    assert run.training["ewc_lambda"] == 50.0 and isinstance(run.training["ewc_lambda"], float)
    assert run.domains[1].max_samples == 200
    assert run.model.config["hidden_size"] == 32
    assert run.training_args(0, "x").num_train_epochs == 5 and run.training_args(1, "x").num_train_epochs == 2
    assert run.training_args(1, "x").ewc_mode == "proximal"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--ewc_lamda", "5"], "Unknown key 'ewc_lamda'; did you mean 'ewc_lambda'?"),
        (["--domains.0.max_sample", "5"], "Unknown key 'domains.0.max_sample'; did you mean 'max_samples'?"),
        (["--model.hidden_size", "5"], "valid keys: name_or_path, config, tokenizer"),
        (["--domains.7.max_samples", "5"], "is not an index of a list of 2 item(s); use 0…1"),
        (["--ewc_lambda", "lots"], "ewc_lambda must be float, got 'lots'"),
        (["--num_train_epochs", "[1]"], "num_train_epochs must be float"),
        (["--ewc_mode", "strong"], "ewc_mode must be one of 'stabilized', 'vanilla', 'proximal', 'off', got 'strong'"),
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


# ------------------------------------------------------------------------------------------------ bad input
def _bad_inputs(tmp_path: Path) -> dict:
    base = make_config(tmp_path)
    (tmp_path / "broken.yaml").write_text("task: causal_lm\ndomains:\n  - name: a\n   data_files: x\n")
    (tmp_path / "duplicate.yaml").write_text("seed: 1\nseed: 2\n")
    (tmp_path / "empty.jsonl").write_text('{"text": "   "}\n{"text": ""}\n')
    (tmp_path / "one_class.jsonl").write_text(
        "".join(json.dumps({"text": f"w{i} x y", "label": 1}) + "\n" for i in range(9))
    )
    cls = make_config(tmp_path, "sequence_classification")

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
            "SI importances come from training",
        ),
        "eval_fraction too large": (
            variant(base, domains__0__eval_fraction=0.999),
            "eval_fraction=0.999 cannot split",
        ),
        "duplicate key": (tmp_path / "duplicate.yaml", "duplicate key 'seed' (line 2)"),
    }


@pytest.mark.parametrize(
    "case",
    ["malformed YAML", "missing file", "missing column", "empty domain", "no label column", "one class",
     "task the model cannot do", "unknown key", "typo in model.config", "blocks longer than the model",
     "SI without training", "eval_fraction too large", "duplicate key"],
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


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    raw = make_config(tmp_path, num_train_epochs=1)
    config = write_yaml(tmp_path / "run.yaml", raw)
    assert run_cli(["train", str(config)], capsys)[0] == 0
    before = snapshot(tmp_path)
    rc, _, err = run_cli(["train", str(config)], capsys)
    assert rc == 2 and "already holds a run; pass --resume to continue it or --overwrite to replace it" in err
    assert snapshot(tmp_path) == before
    # A non-empty directory that is not a run is never touched, even with --overwrite.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for flags in ([], ["--overwrite"]):
        rc, _, err = run_cli(["train", str(config), "--output_dir", str(other), *flags], capsys)
        assert rc == 2 and "holds no hf-ewc run" in err
    assert (other / "notes.txt").read_text() == "keep me" and len(list(other.iterdir())) == 1
    # --overwrite replaces a run.
    rc, _, err = run_cli(["train", str(config), "--overwrite", "--ewc_mode", "off"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["ewc_mode"] == "off"


def test_from_without_ewc_state_is_refused(tmp_path, capsys):
    raw = make_config(tmp_path)
    config = write_yaml(tmp_path / "run.yaml", raw)
    model_dir = tmp_path / "plain_model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    for target, message in ((model_dir, "no EWC state there"), (tmp_path / "missing", "no model there")):
        rc, _, err = run_cli(["train", str(config), "--from", str(target)], capsys)
        assert rc == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ extras
METRIC_SCRIPT = """
import datasets
import evaluate


class ExactShare(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="share of predictions equal to their reference",
            citation="",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        return {"share": sum(p == r for p, r in zip(predictions, references)) / len(references)}
"""


def test_domain_metric_from_a_local_evaluate_module(tmp_path, hf_logs):
    pytest.importorskip("evaluate")
    (tmp_path / "exact_share").mkdir()
    (tmp_path / "exact_share" / "exact_share.py").write_text(METRIC_SCRIPT)
    raw = make_config(tmp_path, "sequence_classification", num_train_epochs=1)
    raw["domains"][0]["metric"] = str(tmp_path / "exact_share")
    raw["domains"][1]["metric"] = "no-such-metric-offline"
    results = Pipeline(build_run_config(raw), print_fn=None).run_sequence()
    key = f"{tmp_path / 'exact_share'}:share"
    shares = [cell[key] for cell in results["extra_metrics"]["animals"]]
    # The module sees argmax predictions against the labels: its share is exactly the built-in accuracy.
    assert shares == pytest.approx([row[0] for row in results["matrix"]["accuracy"]])
    assert "tools" not in results["extra_metrics"]  # could not be loaded: skipped, with one warning
    assert any("no-such-metric-offline" in r.getMessage() and "could not be loaded" in r.getMessage() for r in hf_logs)


def test_missing_report_to_integration_is_named_before_anything_runs(tmp_path, capsys):
    from transformers.integrations import get_available_reporting_integrations

    if "tensorboard" in get_available_reporting_integrations():
        pytest.skip("tensorboard is installed here")
    config = write_yaml(tmp_path / "run.yaml", make_config(tmp_path))
    before = snapshot(tmp_path)
    rc, _, err = run_cli(["train", str(config), "--report_to", "tensorboard"], capsys)
    assert rc == 2 and "report_to 'tensorboard' is not installed" in err and "report_to: none" in err
    assert snapshot(tmp_path) == before


def test_embedded_default_runs_from_any_directory(tmp_path):
    """`hf-ewc train` with no config uses the packaged default (shrunk here with overrides to run in seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    shrink = ["--output_dir", "out", "--model.config.hidden_size", "32", "--model.config.intermediate_size", "64",
              "--model.tokenizer_vocab_size", "512", "--num_train_epochs", "1", "--importance_max_samples", "8",
              "--disable_tqdm", "true"]  # fmt: skip
    for i in range(3):
        shrink += [f"--domains.{i}.max_samples", "16", f"--domains.{i}.max_eval_samples", "8"]
    done = subprocess.run(
        [sys.executable, "-m", "hf_ewc", "train", *shrink],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["domains"] == ["python_docs", "python_code", "man_pages"]
    assert results["config"]["model"]["config"]["model_type"] == "llama"
    assert "after man_pages" in done.stdout and "BWT" in done.stdout
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize(
    "env,kind",
    [
        ({"ACCELERATE_USE_FSDP": "true"}, "FSDP"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed ZeRO-3"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, "DeepSpeed ZeRO-3"),
    ],
    ids=["fsdp", "zero3-stage", "zero3-config-file"],
)
def test_sharded_launch_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, env, kind):
    """What `accelerate launch` with an FSDP or ZeRO-3 config sets in the environment (a `deepspeed_config_file:`
    sets only the file's path)."""
    config = write_yaml(tmp_path / "run.yaml", make_config(tmp_path))
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": "auto"}))
    for key, value in env.items():
        monkeypatch.setenv(key, str(tmp_path / value) if value.endswith(".json") else value)
    before = snapshot(tmp_path)
    rc, _, err = run_cli(["train", str(config)], capsys)
    assert rc == 2 and f"hf-ewc train: error: EWC over sharded parameters ({kind}) is not supported" in err, err
    assert "configs/accelerate/multi_gpu.yaml" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_accelerate_configs_open_with_their_command():
    root = Path(__file__).resolve().parents[1]
    expected = {"cpu_2proc": "MULTI_GPU", "multi_gpu": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}
    for name, distributed_type in expected.items():
        path = root / "configs" / "accelerate" / f"{name}.yaml"
        first = path.read_text().splitlines()[0]
        command = f"accelerate launch --config_file configs/accelerate/{name}.yaml -m hf_ewc train configs/"
        assert first.startswith("# ") and command in first, first
        assert (root / first.split()[-1]).is_file(), first  # the hf-ewc config it runs exists
        config = yaml.safe_load(path.read_text())
        assert config["distributed_type"] == distributed_type and config["num_processes"] == 2
    assert yaml.safe_load((root / "configs/accelerate/cpu_2proc.yaml").read_text())["use_cpu"] is True
    assert (
        yaml.safe_load((root / "configs/accelerate/deepspeed_zero2.yaml").read_text())["deepspeed_config"][
            "zero_stage"
        ]
        == 2
    )
