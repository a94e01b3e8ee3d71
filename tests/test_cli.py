import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from testing_utils import MLP

from hf_ewc import EWCState
from hf_ewc.cli import build_parser, main


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


def test_module_entry_point_runs():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "hf_ewc", "--version"], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    )
    assert out.stdout.startswith("hf-ewc ")
