"""What the tests share: tiny models built from config, tiny datasets, run configs over shipped-like text domains,
the CLI runner, file-tree snapshots and the one tensor-dict comparison. No downloads, milliseconds per step."""

import itertools
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_ewc import EWCState
from hf_ewc.cli import main


VOCAB = 40
SEQ = 8


def tiny_gpt2(dropout: float = 0.0) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def tiny_llama(num_attention_heads: int = 2, num_key_value_heads: int = 1) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _bert_config(**kwargs) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        **kwargs,
    )  # fmt: skip


def tiny_bert_mlm() -> BertForMaskedLM:
    return BertForMaskedLM(_bert_config())


def tiny_bert_classifier(num_labels: int = 3) -> BertForSequenceClassification:
    return BertForSequenceClassification(_bert_config(num_labels=num_labels))


class MLP(nn.Module):
    """A plain module with the HF calling convention: forward(pixel_values, labels) -> {"loss", "logits"}.

    Its forward takes no **kwargs, so the Trainer does not pass num_items_in_batch and divides the loss by the
    gradient-accumulation steps itself (the other branch of the GA logic from the HF models)."""

    def __init__(self, sizes=(6, 10, 10, 4)):
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.LeakyReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def lm_samples(n: int = 16, *, seed: int = 0, low: int = 1, high: int = VOCAB, pad_last: int = 0) -> list[dict]:
    """Token sequences with labels = input_ids (the model shifts them); the last ``pad_last`` positions of every
    other sample are padding (attention 0, label −100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (n, SEQ), generator=g)
    out = []
    for i in range(n):
        attention = torch.ones(SEQ, dtype=torch.long)
        labels = ids[i].clone()
        if pad_last and i % 2:
            attention[-pad_last:] = 0
            labels[-pad_last:] = -100
        out.append({"input_ids": ids[i], "attention_mask": attention, "labels": labels})
    return out


def cls_samples(n: int = 16, *, seed: int = 0, num_labels: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]


def vec_samples(n: int = 32, *, seed: int = 0, dim: int = 6, num_labels: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, num_labels, (n,), generator=g)
    return [{"pixel_values": x[i], "labels": y[i]} for i in range(n)]


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
        "ewc_lambda": 10.0,  # on mean-normalized importances (the default): 10× an L2 pull of the same mass
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


def assert_tensors_close(
    got: Mapping[str, torch.Tensor],
    want: Mapping[str, torch.Tensor],
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    relative_to: str | None = None,
) -> float:
    """The one comparison of name → tensor dicts: the same names, then `torch.testing.assert_close` per tensor.

    ``relative_to="tensor"`` / ``"all"`` scales ``atol`` by the largest |want| of the tensor / of all tensors, for
    tolerances relative to a tensor's magnitude (a tensor that is 0 in ``want`` must then be 0 up to 1e-20).
    Returns the largest ``max|got − want| / max|want|`` seen, for reporting."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    overall = max((float(v.abs().max()) for v in want.values() if v.numel()), default=0.0)
    worst = 0.0
    for name, value in want.items():
        scale = {"tensor": float(value.abs().max()) if value.numel() else 0.0, "all": overall, None: 1.0}[relative_to]
        tolerance = max(atol * scale, 1e-20) if relative_to else atol
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=tolerance, msg=lambda m, n=name: f"{n}: {m}")
        if scale >= 1e-20:  # a tensor that is 0 up to rounding has no relative difference
            worst = max(worst, float((got[name].float() - value.float()).abs().max()) / scale)
    return worst


def assert_same_state(a: EWCState, b: EWCState, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    assert_tensors_close(a.importances, b.importances, rtol=rtol, atol=atol)
    assert_tensors_close(a.anchors, b.anchors, rtol=rtol, atol=atol)
    assert [d["name"] for d in a.domains] == [d["name"] for d in b.domains]


def damaged_state(src: Path, dst: Path | None = None, edit_tensors=None, edit_meta=None) -> Path:
    """The EWC state saved in ``src``, its tensors and/or metadata edited as a damaged file would be: written to
    ``dst`` (a new directory) or, without one, over ``src``'s own file."""
    path = src / "ewc_state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        meta = json.loads(f.metadata()["hf_ewc"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if dst is not None:
        dst.mkdir()
    save_file(tensors, str((dst or src) / "ewc_state.safetensors"), metadata={"hf_ewc": json.dumps(meta)})
    return dst or src


# ------------------------------------------------------------------------------------------------ launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def failure(done: subprocess.CompletedProcess) -> str:
    """Every rank's own error lines (a rank's one-line CLI error is otherwise lost above the launcher's traceback),
    then the end of stderr."""
    errors = [line for line in done.stderr.splitlines() if "error:" in line or "Error:" in line]
    return "\n".join(errors[:20]) + "\n…\n" + done.stderr[-2000:]


def launch(*args: str, cpu: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 ARGS`` (a script path, or ``-m module``) on CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
