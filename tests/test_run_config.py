"""The run configuration of `hf-ewc train` (hf_ewc/pipeline/run_config.py, config_io.py): shipped configs, YAML 1.2
values, overrides, and what is refused before anything runs."""

import json
from pathlib import Path

import pytest
import yaml
from testing_utils import make_config, run_cli, snapshot, write_yaml

from hf_ewc import HfEwcError
from hf_ewc.pipeline import build_run_config, load_run_config
from hf_ewc.pipeline.config_io import yaml_load


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


def test_missing_report_to_integration_is_named_before_anything_runs(tmp_path, capsys):
    from transformers.integrations import get_available_reporting_integrations

    if "tensorboard" in get_available_reporting_integrations():
        pytest.skip("tensorboard is installed here")
    config = write_yaml(tmp_path / "run.yaml", make_config(tmp_path))
    before = snapshot(tmp_path)
    rc, _, err = run_cli(["train", str(config), "--report_to", "tensorboard"], capsys)
    assert rc == 2 and "report_to 'tensorboard' is not installed" in err and "report_to: none" in err
    assert snapshot(tmp_path) == before


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


def test_an_fsdp2_launch_is_refused_by_hf_ewc_train_with_what_works(tmp_path, capsys, monkeypatch):
    config = write_yaml(tmp_path / "run.yaml", make_config(tmp_path))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")  # what `accelerate launch` sets for fsdp_version: 2
    before = snapshot(tmp_path)
    rc, _, err = run_cli(["train", str(config)], capsys)
    assert rc == 2 and "hf-ewc train: error: hf-ewc train does not run under FSDP2 yet" in err
    assert "EWCTrainer itself trains, consolidates and saves FSDP2-sharded models" in err
    assert len(err.strip().splitlines()) == 1
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


def test_yaml_keeps_n_m_as_a_string():
    assert yaml_load("structure: 2:4\nx: 1e-3\ny: off\nz: 12") == {"structure": "2:4", "x": 1e-3, "y": "off", "z": 12}


def test_prune_block_is_checked_before_anything_runs(tmp_path):
    raw = make_config(tmp_path)
    raw["prune"] = {"sparsity": 0.5, "criterion": "mas"}
    with pytest.raises(HfEwcError, match="prune.criterion 'mas' needs mas importances, but domains.0"):
        build_run_config(raw)
    raw["prune"] = {"sparsity": 0.5, "after": "birds"}
    with pytest.raises(HfEwcError, match="prune.after 'birds' is not a domain; choose one of: animals, tools"):
        build_run_config(raw)
    assert not Path(raw["output_dir"]).exists()
