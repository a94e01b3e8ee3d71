"""Every script in examples/ runs in its --tiny (offline) mode, chained as a user would chain them: a sequence, its
continuation from the checkpoint it left, pruning it; LoRA; TRL's SFTTrainer; and the sequence on 2 processes, under
DDP and under FSDP2."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from testing_utils import failure, launch

from hf_ewc import EWCState


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def example(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(EXAMPLES / name), *args]
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_every_example_is_listed_and_opens_with_its_command():
    listed = (EXAMPLES / "README.md").read_text()
    for script in EXAMPLES.glob("*.py"):
        assert f"`{script.name}`" in listed, script.name
        doc = script.read_text().split('"""')[1]
        assert f"python examples/{script.name}" in doc and ("--tiny" in doc or "--run" in doc), script.name


def test_a_sequence_its_continuation_and_its_pruning(tmp_path):
    done = example("sequential_finetuning.py", "--tiny", cwd=tmp_path)
    assert "after man_pages: eval loss python_docs" in done.stdout
    state = EWCState.load(tmp_path / "sequential_ewc")
    assert [d["name"] for d in state.domains] == ["python_docs", "python_code", "man_pages"]

    done = example("continue_sequence.py", "--from", "sequential_ewc", "--tiny", cwd=tmp_path)
    assert "continuing after ['python_docs', 'python_code', 'man_pages']" in done.stdout
    assert [d["name"] for d in EWCState.load(tmp_path / "continued_ewc").domains][-1] == "man_pages_2"

    done = example("prune_and_push.py", "--run", "sequential_ewc", "--sparsity", "0.5", cwd=tmp_path)
    assert "exported to sequential_ewc-pruned-0.5" in done.stdout and "reloaded LlamaForCausalLM" in done.stdout
    assert (tmp_path / "sequential_ewc-pruned-0.5" / "pruning_report.json").is_file()


def test_lora_and_sft_examples(tmp_path):
    done = example("lora_sequence.py", "--tiny", cwd=tmp_path)
    assert "after man_pages" in done.stdout
    state = EWCState.load(tmp_path / "lora_ewc")
    assert state.importances and all("lora_" in name for name in state.importances)
    assert (tmp_path / "lora_ewc" / "adapter_config.json").is_file()
    pytest.importorskip("trl")
    done = example("sft_with_ewc.py", "--tiny", cwd=tmp_path)
    assert "after python_code: EWC state over ['python_docs', 'python_code']" in done.stdout


def test_unknown_flags_get_argparse_s_own_error(tmp_path):
    cmd = [sys.executable, str(EXAMPLES / "sequential_finetuning.py"), "--tiny", "--lamda", "1"]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "unrecognized arguments: --lamda 1" in done.stderr


@pytest.mark.multiprocess
def test_the_sequence_on_two_processes(tmp_path):
    done = launch(str(EXAMPLES / "sequential_finetuning.py"), "--tiny", cwd=tmp_path)
    assert done.returncode == 0, failure(done)
    assert done.stdout.count("after man_pages: eval loss") == 1  # printed by the main process only
    assert len(EWCState.load(tmp_path / "sequential_ewc").domains) == 3


@pytest.mark.multiprocess
def test_the_fsdp2_sequence_on_two_processes(tmp_path):
    """The model sharded by transformers as it loads; consolidation on the sharded model after each domain; each
    process holds half the EWC state; `save_model` writes one whole state that this (single) process loads."""
    done = launch(str(EXAMPLES / "fsdp2_sequence.py"), "--tiny", cwd=tmp_path)
    assert done.returncode == 0, failure(done)
    assert done.stdout.count("after man_pages: eval loss") == 1
    held = re.search(r"EWC state held per process: ([\d,]+) bytes \(sharded, 2 process\(es\)\)", done.stdout)
    assert held is not None, done.stdout
    state = EWCState.load(tmp_path / "fsdp2_ewc")
    assert [d["name"] for d in state.domains] == ["python_docs", "python_code", "man_pages"]
    assert state.nbytes == 2 * int(held.group(1).replace(",", ""))
    one = example("fsdp2_sequence.py", "--tiny", "--output_dir", "one", cwd=tmp_path)  # nothing to shard
    assert "(whole, 1 process(es))" in one.stdout and EWCState.load(tmp_path / "one").nbytes == state.nbytes
