"""`hf-ewc train` end to end on tiny models (hf_ewc/pipeline/): every task type, resume after interruption, `--from`,
an existing run, metrics, the `prune:` block."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from testing_utils import AUTO, assert_same_state, make_config, run_cli, snapshot, write_yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_ewc import EWCState, HfEwcError
from hf_ewc.pipeline import Pipeline, build_run_config, config_differences
from hf_ewc.pipeline.data import DomainData
from hf_ewc.trainer import EWCTrainer
from hf_ewc.utils import LOCK_NAME, LOCK_OWNER_NAME


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
    assert "different config" in err and "ewc_lambda: 10.0 → 5.0" in err and "domains.1.max_samples: 24 → 3" in err
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


# ------------------------------------------------------------------------------------------------ bad input


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


# ------------------------------------------------------------------------------------------------ prune: block
@pytest.mark.parametrize("structure", ["unstructured", "ffn"])
def test_pipeline_prunes_after_a_domain_and_keeps_the_sparsity(tmp_path, structure):
    raw = make_config(tmp_path, num_train_epochs=2)
    raw["prune"] = {"after": "animals", "sparsity": 0.5, "criterion": "obd", "structure": structure}
    results = Pipeline(build_run_config(raw), print_fn=lambda *a: None).run_sequence()
    pruning = results["pruning"]
    assert pruning["after"] == "animals" and pruning["report"]["structure"] == structure
    assert results["matrix"]["loss"][0] != [pruning["row_before"][n]["loss"] for n in results["domains"]]
    run_dir = Path(raw["output_dir"])
    final = AutoModelForCausalLM.from_pretrained(run_dir)
    state = EWCState.load(run_dir / "ewc_state")
    assert state.validate(final) == []
    params = dict(final.named_parameters())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["sparsity_config"]["criterion"] == "obd"
    card = (run_dir / "README.md").read_text()
    assert "- pruned" in card and "Pruned after animals" in card
    if structure == "ffn":
        assert config["intermediate_size"] == 16 and params["model.layers.0.mlp.up_proj.weight"].shape == (16, 16)
    else:  # trained on "tools" after pruning, and still exactly as sparse
        for name, info in pruning["report"]["layers"].items():
            assert int((params[name] == 0).sum()) == info["zeros"], name
        assert results["matrix"]["loss"][1] != results["matrix"]["loss"][0]


def test_a_pruned_run_keeps_its_zeros_when_continued_with_from(tmp_path):
    first = make_config(tmp_path, num_train_epochs=1)
    first["prune"] = {"sparsity": 0.6}  # after the last domain, by magnitude
    Pipeline(build_run_config(first), print_fn=lambda *a: None).run_sequence()
    old_dir = Path(first["output_dir"])
    old = dict(AutoModelForCausalLM.from_pretrained(old_dir).named_parameters())
    second = make_config(tmp_path, domains=("colours",), num_train_epochs=2)
    second["output_dir"] = str(tmp_path / "run2")
    Pipeline(build_run_config(second), from_dir=str(old_dir), print_fn=lambda *a: None).run_sequence()
    new = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "run2").named_parameters())
    report = json.loads((old_dir / "results.json").read_text())["pruning"]["report"]
    for name in report["layers"]:
        assert torch.equal(new[name] == 0, old[name] == 0), name
        assert not torch.equal(new[name], old[name]), name


# ------------------------------------------------------------------------------------------------ baseline: naive
def test_baseline_naive_shares_the_first_domain_and_equals_a_naive_run(tmp_path, capsys):
    raw = make_config(tmp_path, learning_rate=1e-2, num_train_epochs=6, ewc_lambda=0.03)
    rc, out, err = run_cli(["train", str(write_yaml(tmp_path / "run.yaml", {**raw, "baseline": "naive"}))], capsys)
    assert rc == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    baseline = results["baseline"]
    naive = Pipeline(build_run_config({**raw, "ewc_mode": "off", "output_dir": str(tmp_path / "naive")}),
                     print_fn=None).run_sequence()  # fmt: skip
    assert baseline["matrix"] == naive["matrix"]["loss"]  # sharing the first domain changed nothing
    forgetting, gain = -naive["summary"]["bwt"], sum(naive["summary"]["learned"][1:])
    assert baseline["forgetting"] == pytest.approx(forgetting) and baseline["gain"] == pytest.approx(gain)
    ours = -results["summary"]["bwt"], sum(results["summary"]["learned"][1:])
    assert baseline["forgetting_removed"] == pytest.approx(1 - ours[0] / forgetting)
    assert baseline["gain_kept"] == pytest.approx(ours[1] / gain)
    assert f"EWC removed {baseline['forgetting_removed']:.0%} of its forgetting" in out
    assert "## Against naive fine-tuning" in (tmp_path / "run" / "results.md").read_text()
    assert "Against naive fine-tuning" in (tmp_path / "run" / "README.md").read_text()


def test_baseline_with_prune_or_from_is_refused(tmp_path):
    raw = {**make_config(tmp_path), "baseline": "naive", "prune": {"sparsity": 0.5}}
    with pytest.raises(HfEwcError, match="baseline: and prune: exclude each other"):
        build_run_config(raw)
    with pytest.raises(HfEwcError, match="Unknown baseline 'ewc'"):
        build_run_config({**make_config(tmp_path), "baseline": "ewc"})
    with pytest.raises(HfEwcError, match="--from and baseline: exclude each other"):
        Pipeline(build_run_config({**make_config(tmp_path), "baseline": "naive"}), from_dir=tmp_path, print_fn=None)


def test_wva_and_an_si_family_method_from_yaml_and_cli_overrides(tmp_path, capsys):
    """The new modes and methods are ordinary config keys: YAML, `--key value` on the CLI, the state's metadata and
    the model card all carry them."""
    raw = make_config(tmp_path, ewc_mode="wva", wva_attenuation="exponential", importance_method="sos")
    config = write_yaml(tmp_path / "run.yaml", raw)
    rc, _, err = run_cli(["train", str(config), "--sos_alpha", "1.0", "--wva_apply", "gradients"], capsys)
    assert rc == 0, err
    run_dir = Path(raw["output_dir"])
    state = EWCState.load(run_dir / "ewc_state")
    domain = state.domains[-1]
    assert domain["method"] == "sos" and domain["options"]["sos_alpha"] == 1.0
    assert domain["options"]["trained_with_mode"] == "wva" and domain["options"]["wva_apply"] == "gradients"
    card = (run_dir / "README.md").read_text()
    assert "weight-velocity attenuation (WVA, exponential a = exp(−λΩ) on the optimizer's gradients)" in card
    assert "importances: sos (α = 1)" in card
    last_log = json.loads((run_dir / "results.json").read_text())["domains_detail"][1]["train"]["last_log"]
    assert 0 <= last_log["ewc/attenuation_min"] <= last_log["ewc/attenuation_mean"] < 1


def test_si_family_without_training_steps_is_refused_before_anything_runs(tmp_path):
    raw = make_config(tmp_path, importance_method="siu", max_steps=0)
    with pytest.raises(HfEwcError, match=r"domains.0 \(animals\) has no training steps, but siu importances"):
        build_run_config(raw)
    assert not Path(raw["output_dir"]).exists()


def test_an_output_dir_holding_only_a_lock_being_taken_counts_as_empty(tmp_path):
    """Another rank may be writing the owner file (its atomic temporary) while this one checks output_dir."""
    raw = make_config(tmp_path)
    out = Path(raw["output_dir"])
    out.mkdir(parents=True)
    (out / LOCK_NAME).write_text("")
    (out / f".{LOCK_OWNER_NAME}.ab12cd34.tmp").write_text("{}")
    Pipeline(build_run_config(raw), print_fn=None).run_sequence(stop_after=0)
    assert (out / "progress.json").is_file()
    (out / "stray.txt").write_text("x")  # anything else still makes a non-run directory refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "stray.txt").write_text("x")
    with pytest.raises(HfEwcError, match="is not empty and holds no hf-ewc run"):
        Pipeline(build_run_config({**raw, "output_dir": str(other)}), print_fn=None).run_sequence()
