"""The tables of hf_ewc/models.py (task ↔ Auto class, FFN and attention layouts, default targets) and the helpers of
hf_ewc/utils.py and hf_ewc/distributed.py that the layers below everything share."""

import errno
import os
from pathlib import Path

import pytest
import torch
from testing_utils import MLP, tiny_bert_classifier, tiny_bert_mlm, tiny_gpt2, tiny_llama
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    LlamaConfig,
)

from hf_ewc import HfEwcError
from hf_ewc.distributed import sharding_refusal, trainable_parameters
from hf_ewc.models import (
    TASKS,
    attention_layout,
    auto_class_for,
    auto_model_class,
    check_max_length,
    check_task,
    default_targets,
    ffn_layout,
    find_blocks,
    is_conv1d,
    model_shifts_labels,
    neuron_dim,
    pipeline_tag,
    task_of_auto_class,
)
from hf_ewc.utils import atomic_directory, error_line, recover_replaced, write_json_atomic


def test_task_table_round_trips():
    assert TASKS == ("causal_lm", "masked_lm", "sequence_classification")
    expected = {
        "causal_lm": (AutoModelForCausalLM, "text-generation"),
        "masked_lm": (AutoModelForMaskedLM, "fill-mask"),
        "sequence_classification": (AutoModelForSequenceClassification, "text-classification"),
    }
    for task, (auto, tag) in expected.items():
        assert auto_model_class(task) is auto
        assert task_of_auto_class(auto.__name__) == task
        assert pipeline_tag(task) == pipeline_tag(auto.__name__) == tag
    assert auto_class_for("LlamaForCausalLM") is AutoModelForCausalLM
    assert auto_class_for("BertForSequenceClassification") is AutoModelForSequenceClassification
    assert auto_class_for("BertModel") is AutoModel and task_of_auto_class("AutoModel") is None
    assert auto_class_for("NoSuchModel") is None


def test_check_task_says_what_the_model_can_do():
    check_task("masked_lm", BertConfig(), "m")
    with pytest.raises(
        HfEwcError, match="model type 'llama' cannot do task 'masked_lm'; this model can do: causal_lm"
    ):
        check_task("masked_lm", LlamaConfig(), "m")
    check_max_length(LlamaConfig(max_position_embeddings=32), 32, "m")
    with pytest.raises(HfEwcError, match="m: model.max_length=33 exceeds the model's 32 positions"):
        check_max_length(LlamaConfig(max_position_embeddings=32), 33, "m")


def test_causal_models_shift_their_labels():
    assert model_shifts_labels(tiny_llama()) and model_shifts_labels(tiny_gpt2())
    assert not model_shifts_labels(tiny_bert_mlm()) and not model_shifts_labels(tiny_bert_classifier())


@pytest.mark.parametrize(
    "build,blocks,ffn,attention",
    [
        (tiny_llama, "model.layers", ("mlp.gate_proj", "mlp.up_proj"), "self_attn"),
        (tiny_bert_mlm, "bert.encoder.layer", ("intermediate.dense",), "attention"),
        (tiny_gpt2, "transformer.h", ("mlp.c_fc",), "attn"),
    ],
)
def test_layout_tables_find_blocks_ffn_and_heads(build, blocks, ffn, attention):
    model = build()
    prefix, found = find_blocks(model)
    assert prefix == blocks and len(found) == 2
    assert ffn_layout(found[0]).inputs == ffn
    assert attention_layout(found[0]).path == attention
    targets = default_targets(model)
    assert targets and all(n.startswith(blocks) and n.endswith(".weight") for n in targets)
    assert all(p.ndim == 2 for p in targets.values())
    assert ffn_layout(MLP()) is None and attention_layout(MLP()) is None
    with pytest.raises(HfEwcError, match="has no list of transformer blocks"):
        find_blocks(MLP())


def test_a_remote_code_copy_of_conv1d_counts_as_conv1d():
    class Conv1D(torch.nn.Module):  # what a model with its own modelling code ships: same name, weight [in, out]
        def __init__(self):
            super().__init__()
            self.nf, self.weight = 3, torch.nn.Parameter(torch.zeros(2, 3))

    assert is_conv1d(Conv1D()) and neuron_dim(Conv1D(), "in") == 1 and neuron_dim(Conv1D(), "out") == 0
    assert not is_conv1d(torch.nn.Linear(2, 3)) and neuron_dim(torch.nn.Linear(2, 3), "in") == 0


def test_trainable_parameters_and_the_sharding_refusal():
    model = MLP()
    model.net[0].weight.requires_grad_(False)
    assert list(trainable_parameters(model)) == [
        "net.0.bias",
        "net.2.weight",
        "net.2.bias",
        "net.4.weight",
        "net.4.bias",
    ]
    model.net[2].weight.ds_id = 3  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    with pytest.raises(HfEwcError, match=r"sharded parameters \('net.2.weight' is a DeepSpeed ZeRO-3 shard\)"):
        trainable_parameters(model)
    assert "configs/accelerate/multi_gpu.yaml" in str(sharding_refusal("FSDP"))


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "stage"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("killed while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]  # no temporary folder left
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]
    (tmp_path / "plain").mkdir()  # the folder (and a file written atomically) get the modes mkdir/open would give
    assert target.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    write_json_atomic(tmp_path / "a.json", {})
    (tmp_path / "b.json").write_text("{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777
    (tmp_path / ".stage.left-by-a-kill.tmp").mkdir()  # a copy interrupted by kill -9 is removed by the next write
    with atomic_directory(target) as tmp:
        (tmp / "again.txt").write_text("again")
    assert not (tmp_path / ".stage.left-by-a-kill.tmp").exists()


def test_error_line_is_the_first_line_or_the_type():
    assert error_line(ValueError("first\nsecond")) == "first"
    assert error_line(KeyError()) == "KeyError"


def test_a_write_failure_keeps_the_previous_folder_and_file_and_says_so(tmp_path, monkeypatch):
    target = tmp_path / "stage"
    target.mkdir()
    (target / "old.txt").write_text("old")
    full = OSError(errno.ENOSPC, "No space left on device")

    def disk_full(*args, **kwargs):
        raise full

    with pytest.raises(HfEwcError, match=r"cannot write '.*stage': No space left on device \(errno 28\); it keeps its "
                       "previous content"), atomic_directory(target) as tmp:  # fmt: skip
        (tmp / "new.txt").write_text("half")
        disk_full()
    real_replace = os.replace
    calls = []

    def rename_fails_once_the_old_folder_is_moved(src, dst):
        calls.append(Path(dst).name)
        if Path(src).name.endswith(".tmp"):  # the new folder into place: refused
            raise full
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", rename_fails_once_the_old_folder_is_moved)
    with pytest.raises(HfEwcError, match="keeps its previous content"), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert calls == [".stage.previous", "stage", "stage"]  # moved aside, refused, moved back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]
    assert (target / "old.txt").read_text() == "old" and not (target / "new.txt").exists()

    monkeypatch.setattr("hf_ewc.utils.json.dump", disk_full)
    with pytest.raises(HfEwcError, match=r"cannot write '.*a\.json': No space left"):
        write_json_atomic(tmp_path / "a.json", {"new": 1})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]

    # A kill between the two renames leaves `.stage.previous` and no `stage`: the next write puts it back first.
    os.replace(target, tmp_path / ".stage.previous")
    with pytest.raises(RuntimeError), atomic_directory(target):
        assert (target / "old.txt").read_text() == "old"
        raise RuntimeError("the write that follows fails too")
    assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_an_output_that_appears_while_writing_is_not_replaced_when_replace_is_off(tmp_path):
    target = tmp_path / "pruned"
    with pytest.raises(HfEwcError, match="appeared while this process was writing it"), \
            atomic_directory(target, replace=False) as tmp:  # fmt: skip
        (tmp / "mine.txt").write_text("mine")
        target.mkdir()  # another `hf-ewc prune --out pruned` published first
        (target / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_an_export_interrupted_while_replacing_counts_as_the_previous_export(tmp_path):
    out = tmp_path / "pruned"
    (tmp_path / ".pruned.previous").mkdir()  # killed between the renames of `prune --overwrite`: old export aside
    (tmp_path / ".pruned.previous" / "config.json").write_text("{}")
    recover_replaced(out)
    assert (out / "config.json").is_file() and not (tmp_path / ".pruned.previous").exists()
    (tmp_path / ".pruned.previous").mkdir()  # killed after the new folder took the name: the old one just goes
    recover_replaced(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]
