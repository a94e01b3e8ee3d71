"""Pruning benchmark: `hf_ewc.pruning.prune_model` by magnitude, Fisher, MAS, SI, signal and OBD, on CPU in minutes.

Run from the repository root (needs the ``bench`` extra: scikit-learn and matplotlib):

    python benchmarks/pruning.py            # full run: ~5 min on 2 CPU cores ((a) ½, (b) 2, (c) 3)
    python benchmarks/pruning.py --quick    # smoke test, ~25 s: writes pruning_quick.* instead

Three parts; no retraining after any pruning:

(a) The single-task experiment of Kutalev & Lapina (arXiv 2109.10021, section 4; methods.md §5) at digits scale:
    scikit-learn's 8×8 digits split 60/20/20 into train / validation / test (stratified, one fixed split), a
    64-100-100-10 leaky-ReLU MLP trained by `EWCTrainer` (Adam lr 1e-3, batch 32, 20 epochs, no clipping) with
    ``importance_method="si"``, so that `consolidate()` returns the SI path integral of the training run. The empirical
    Fisher, MAS and signal importances are collected on the *validation* split (the paper collected them on the test
    set on which it then measured the accuracy; here the test set only gives the accuracy). The three Linear weights
    are pruned (``include``; the biases stay, where the paper's "entire" ranking also ranked its 460 biases) by each
    criterion at sparsities 0, 0.01, …, 0.99, with one global ranking and per layer, and the test accuracy is read
    off each. 10 seeds (initialisation and batch order; the split is fixed), as the paper's 10 runs.
(b) The embedded default's causal LM (`hf_ewc/resources/default.yaml`: a 0.9 M-parameter Llama built from config,
    hidden 128, FFN 384, 2 layers, 4 heads / 2 key-value heads, 128-token blocks; its 4096-token BPE is trained here
    on the python_docs training texts) trained on python_docs with the default's first-stage settings (8 epochs, lr
    3e-3, batch 16, cosine) by `EWCTrainer` with SI. 128 training blocks are held out of the training for the Fisher /
    MAS / signal collection; the eval split (the default's 10 % of the texts) is only evaluated. Every criterion
    prunes a deep copy of the trained model (the default targets: the Linear weights inside the blocks; embeddings,
    norms and the tied LM head stay) globally to 30 / 50 / 70 %, per layer to 50 %, 2:4, and 30 % of the FFN neurons
    (``structure="ffn"``), and the eval loss is measured. 2 seeds, averaged. Target: at 50 % (global) the best
    importance criterion within +5 % of the dense eval loss and better than magnitude.
(c) Whole-FFN-neuron removal (``structure="ffn"``, 30 % of the neurons of every layer, removed from the shapes) on a
    larger Llama (hidden 256, FFN 1024, 4 layers, same tokenizer and blocks; 5.0 M parameters) trained the same way:
    parameters before / after, eval loss after pruning by each criterion, and the CPU latency of a forward pass
    (batch 8 × 128 tokens, eval mode, ``torch.inference_mode``, 2 threads), dense and pruned timed side by side (5
    warm-up pairs, then 30 pairs in alternating order; medians), for the full forward (logits at every position, as in
    training or scoring) and a prefill (``logits_to_keep=1``, as `generate` runs it). Target: pruned / dense ≤ 0.80.
    The same latency pair is also measured on an untrained "wide FFN" Llama with the proportions of today's small LLMs
    (Qwen2.5-0.5B: FFN 5.4× hidden, 7:1 grouped-query attention) scaled down to hidden 384, FFN 2048, 4 layers: with
    FFN 4× hidden the arithmetic alone keeps the ratio above 0.80.
    The magnitude-pruned model goes through `export_pruned`, which saves, reloads and verifies it.

Writes ``pruning.json`` (settings, every measurement, versions, wall time), ``pruning.md`` (tables) and
``pruning.png`` (accuracy vs sparsity for (a), eval loss vs sparsity for (b)) into ``--out`` (default
``benchmarks/results``); ``--quick`` writes ``pruning_quick.*`` instead, so that a smoke test never overwrites the
real results.
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# OpenMP threads spin while they wait; on a shared 2-core machine any other busy process then slows training 3-10×.
# Passive waiting costs ~10 % when the machine is idle. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import sklearn
import torch
import transformers
from permuted_digits import DigitsDataset, DigitsMLP  # the same MLP and dataset (this folder is on sys.path)
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from hf_ewc import EWCConfig, EWCTrainer
from hf_ewc.importance import collect_importance
from hf_ewc.pipeline import build_run_config, default_config_path, evaluate_model
from hf_ewc.pipeline.config_io import read_yaml
from hf_ewc.pipeline.data import load_raw_domain, tokenize_domain
from hf_ewc.pipeline.prepare import build_model, train_tokenizer
from hf_ewc.pruning import export_pruned, prune_model, select_targets
from hf_ewc.utils import versions


CRITERIA = ("magnitude", "fisher", "mas", "si", "signal", "obd")
IMPORTANCE_OF = {"fisher": "fisher", "mas": "mas", "si": "si", "signal": "signal", "obd": "fisher"}
COLLECTED = ("fisher", "mas", "signal")  # SI comes from training
METHODS = ("fisher", "mas", "si", "signal")
SCOPES = ("global", "per_layer")
COLORS = dict(zip(CRITERIA, ("black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))

# ---- (a) digits
DIGITS = {"split": "60/20/20", "data_seed": 0, "batch_size": 32, "epochs": 20, "learning_rate": 1e-3, "seeds": 10}
DIGITS_INCLUDE = [r"^layers\.\d+\.weight$"]  # the three Linear weights; biases stay
FINE_GRID = [round(0.01 * k, 2) for k in range(100)]  # 0 … 0.99
COARSE_GRID = [round(0.1 * k, 1) for k in range(10)] + [0.95, 0.97]  # --quick
REPORTED = (0.5, 0.8, 0.9, 0.95, 0.97)
LAYER_SHARE_AT = 0.8  # where the global ranking puts the zeros, shown at this sparsity
THRESHOLD = 0.90  # "sparsity at which the accuracy first drops below 0.90"
# methods.md §5: mean test accuracy of 10 runs, MNIST 784-300-150-10, importances on the test set ("entire" = global,
# biases ranked too; "by layer" = per layer).
PAPER = {
    "global": {
        0.5: {"magnitude": 0.978, "fisher": 0.974, "mas": 0.971, "si": 0.962, "signal": 0.976},
        0.8: {"magnitude": 0.959, "fisher": 0.737, "mas": 0.636, "si": 0.492, "signal": 0.955},
        0.9: {"magnitude": 0.857, "fisher": 0.288, "mas": 0.314, "si": 0.222, "signal": 0.896},
        0.95: {"magnitude": 0.613, "fisher": 0.181, "mas": 0.192, "si": 0.131, "signal": 0.699},
        0.97: {"magnitude": 0.383, "fisher": 0.165, "mas": 0.148, "si": 0.118, "signal": 0.457},
    },
    "per_layer": {
        0.8: {"magnitude": 0.921, "fisher": 0.404, "mas": 0.240, "si": 0.232, "signal": 0.859},
        0.9: {"magnitude": 0.677, "fisher": 0.214, "mas": 0.118, "si": 0.125, "signal": 0.625},
    },
    "first_below": {
        "global": {"magnitude": 0.878, "fisher": 0.719, "mas": 0.658, "si": 0.618, "signal": 0.898},
        "per_layer": {"magnitude": 0.820, "fisher": 0.496, "mas": 0.488, "si": 0.417, "signal": 0.746},
    },
}

# ---- (b) the default's causal LM
LM = {"epochs": 8, "learning_rate": 3e-3, "seeds": [42, 43], "held_out": 128, "importance_batch_size": 16,
      "eval_batch_size": 32}  # fmt: skip
LM_SETTINGS = (  # (label, scope, structure, sparsity)
    ("global 30 %", "global", "unstructured", 0.3),
    ("global 50 %", "global", "unstructured", 0.5),
    ("global 70 %", "global", "unstructured", 0.7),
    ("per layer 50 %", "per_layer", "unstructured", 0.5),
    ("2:4", None, "2:4", None),
    ("FFN neurons 30 %", None, "ffn", 0.3),
)
LM_TARGET = {"setting": "global 50 %", "max_loss_increase": 0.05}
GROUPS = {"attention": "self_attn", "mlp": "mlp"}  # weight groups of a Llama block, by a part of their names

# ---- (c) FFN removal on a larger Llama
FFN_MODEL = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 64}  # fmt: skip
FFN = {"sparsity": 0.3, "epochs": 8, "learning_rate": 3e-3, "seed": 42, "importance_max_samples": 64}
LATENCY = {"batch": 8, "tokens": 128, "threads": 2, "warmup": 5, "repeats": 30}
FFN_TARGET = 0.80
# The proportions of today's small LLMs (Qwen2.5-0.5B: hidden 896, FFN 4864 = 5.4×, 14 heads / 2 key-value heads),
# scaled down; latency only (untrained, pruned by magnitude: the shapes, not the values, set the time).
FFN_WIDE_MODEL = {"hidden_size": 384, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 6,
                  "num_key_value_heads": 2, "head_dim": 64}  # fmt: skip

QUICK = {
    "digits_seeds": 1,
    "digits_epochs": 3,
    "lm_seeds": [42],
    "lm_train_blocks": 96,
    "lm_epochs": 1,
    "lm_held_out": 16,
    "lm_eval_blocks": 16,
    "ffn_epochs": 1,
    "ffn_importance_max_samples": 8,
    "latency_warmup": 1,
    "latency_repeats": 4,
}


def log(message: str) -> None:
    print(message, flush=True)


def _quiet(**kwargs) -> dict:
    """Training arguments of every run here: no checkpoints, logs or progress bars."""
    return {"save_strategy": "no", "report_to": "none", "disable_tqdm": True, "log_level": "error",
            "logging_strategy": "no", **kwargs}  # fmt: skip


# ================================================================================================ (a) digits MLP
def digits_splits() -> dict[str, DigitsDataset]:
    """One stratified 60/20/20 train / validation / test split (fixed for every seed)."""
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    seed = DIGITS["data_seed"]
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=0.25, stratify=y_rest, random_state=seed
    )
    return {
        "train": DigitsDataset(x_train, y_train),
        "validation": DigitsDataset(x_val, y_val),
        "test": DigitsDataset(x_test, y_test),
    }


@torch.no_grad()
def accuracy(model: nn.Module, dataset: DigitsDataset) -> float:
    model.eval()
    predictions = model(dataset.pixels)["logits"].argmax(-1)
    return float((predictions == dataset.labels).float().mean())


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    value = torch.corrcoef(torch.stack([a.reshape(-1).double(), b.reshape(-1).double()]))[0, 1]
    return float(value) if torch.isfinite(value) else float("nan")


def digits_seed(seed: int, splits: dict, epochs: int, grid: list[float]) -> dict:
    """Train one MLP, collect the importances on the validation split, prune by every criterion × scope × sparsity."""
    start = time.perf_counter()
    transformers.set_seed(seed)
    model = DigitsMLP()
    with tempfile.TemporaryDirectory() as tmp:
        args = EWCConfig(
            tmp,
            **_quiet(
                ewc_mode="off",
                importance_method="si",
                optim="adamw_torch",
                weight_decay=0.0,
                learning_rate=DIGITS["learning_rate"],
                lr_scheduler_type="constant",
                max_grad_norm=0.0,
                per_device_train_batch_size=DIGITS["batch_size"],
                num_train_epochs=epochs,
                seed=seed,
                use_cpu=True,
            ),
        )
        trainer = EWCTrainer(model=model, args=args, train_dataset=splits["train"])
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
        state = trainer.consolidate(domain="digits")  # SI: the path integral of this training run
    train_seconds = time.perf_counter() - start
    t0 = time.perf_counter()
    importances = {"si": state.importances}
    for method in COLLECTED:
        kwargs = {"estimator": "empirical"} if method == "fisher" else {}
        importances[method] = collect_importance(
            model, splits["validation"], method, batch_size=64, show_progress=False, **kwargs
        )
    importance_seconds = time.perf_counter() - t0

    targets = select_targets(model, DIGITS_INCLUDE)
    size = sum(p.numel() for p in targets.values())
    correlations = {
        method: {name: _pearson(p.detach().abs(), importances[method][name]) for name, p in targets.items()}
        for method in METHODS
    }
    zero_share = {method: sum(int((importances[method][n] == 0).sum()) for n in targets) / size for method in METHODS}
    # signal = |w| × mean |input|: the mean |input| of each layer (what a global signal ranking compares across layers)
    input_activity = {
        n: float((importances["signal"][n] / p.detach().abs().clamp_min(1e-12)).mean()) for n, p in targets.items()
    }
    t0 = time.perf_counter()
    curves = []
    for scope in SCOPES:
        for criterion in CRITERIA:
            omega = importances[IMPORTANCE_OF[criterion]] if criterion != "magnitude" else None
            accs, realized, layer_share = [], [], {}
            for sparsity in grid:
                pruned = copy.deepcopy(model)
                report = prune_model(
                    pruned,
                    sparsity,
                    criterion=criterion,
                    importances=omega,
                    scope=scope,
                    include=DIGITS_INCLUDE,
                    show_progress=False,
                )
                accs.append(accuracy(pruned, splits["test"]))
                realized.append(report.global_sparsity)
                if sparsity in REPORTED:
                    layer_share[sparsity] = {n: v["sparsity"] for n, v in report.layers.items()}
            curves.append(
                {
                    "seed": seed,
                    "scope": scope,
                    "criterion": criterion,
                    "accuracy": accs,
                    # prune_model removes round(sparsity × 17,400) weights: the realized share is the grid's
                    "realized_sparsity_max_deviation": max(abs(r - g) for r, g in zip(realized, grid)),
                    "layer_sparsity": layer_share,
                }
            )
    return {
        "seed": seed,
        "test_accuracy": accuracy(model, splits["test"]),
        "validation_accuracy": accuracy(model, splits["validation"]),
        "train_accuracy": accuracy(model, splits["train"]),
        "targets": list(targets),
        # prune_model's default targets (block Linear weights: names with a numeric part) are the same three here
        "default_targets_equal": sorted(select_targets(model)) == sorted(targets),
        "pearson_abs_weight_vs_importance": correlations,
        "zero_importance_share": zero_share,
        "mean_abs_input": input_activity,
        "curves": curves,
        "seconds": {"train": train_seconds, "importances": importance_seconds, "pruning": time.perf_counter() - t0},
    }


def _first_below(grid: list[float], accs: list[float], threshold: float = THRESHOLD) -> float | None:
    return next((s for s, a in zip(grid, accs) if a < threshold), None)


def summarize_digits(seeds: list[dict], grid: list[float]) -> dict:
    mean, std, first_below, layer_share = {}, {}, {}, {}
    for scope in SCOPES:
        mean[scope], std[scope], first_below[scope], layer_share[scope] = {}, {}, {}, {}
        for criterion in CRITERIA:
            curves = [c for s in seeds for c in s["curves"] if (c["scope"], c["criterion"]) == (scope, criterion)]
            rows = np.array([c["accuracy"] for c in curves])
            mean[scope][criterion] = rows.mean(0).tolist()
            std[scope][criterion] = rows.std(0, ddof=1).tolist() if len(rows) > 1 else None
            first_below[scope][criterion] = {
                "mean_curve": _first_below(grid, mean[scope][criterion]),
                "per_seed": [_first_below(grid, r) for r in rows.tolist()],
            }
            if LAYER_SHARE_AT in grid:
                layers = curves[0]["layer_sparsity"][LAYER_SHARE_AT]
                layer_share[scope][criterion] = {
                    n: float(np.mean([c["layer_sparsity"][LAYER_SHARE_AT][n] for c in curves])) for n in layers
                }
    at = {scope: {s: {c: mean[scope][c][grid.index(s)] for c in CRITERIA} for s in REPORTED} for scope in SCOPES}
    names = seeds[0]["targets"]
    correlations = {
        m: {n: float(np.nanmean([s["pearson_abs_weight_vs_importance"][m][n] for s in seeds])) for n in names}
        for m in METHODS
    }
    return {
        "grid": grid,
        "mean": mean,
        "std": std,
        "at": at,
        "first_below": first_below,
        "layer_sparsity_at": {"sparsity": LAYER_SHARE_AT, "mean": layer_share},
        "dense_test_accuracy": float(np.mean([s["test_accuracy"] for s in seeds])),
        "pearson_abs_weight_vs_importance": correlations,
        "zero_importance_share": {m: float(np.mean([s["zero_importance_share"][m] for s in seeds])) for m in METHODS},
        "mean_abs_input": {n: float(np.mean([s["mean_abs_input"][n] for s in seeds])) for n in names},
        "checks": digits_checks(at, first_below),
    }


def digits_checks(at: dict, first_below: dict) -> list[dict]:
    """The paper's claims, each with the paper's numbers and the measured ones."""

    def fb(scope: str, criterion: str) -> float:
        value = first_below[scope][criterion]["mean_curve"]
        return 1.0 if value is None else value  # never below the threshold on the grid

    g = at["global"][0.9]
    high = (0.9, 0.95, 0.97)
    pairs = [(c, fb("global", c), fb("per_layer", c)) for c in CRITERIA]
    return [
        {
            "claim": "global, 90 % pruned: magnitude and signal far above Fisher, MAS and SI",
            "paper": "magnitude 0.857, signal 0.896 vs Fisher 0.288, MAS 0.314, SI 0.222",
            "measured": (
                f"magnitude {g['magnitude']:.3f}, signal {g['signal']:.3f} vs Fisher {g['fisher']:.3f}, MAS "
                f"{g['mas']:.3f}, SI {g['si']:.3f}"
            ),
            "holds": min(g["magnitude"], g["signal"]) > max(g["fisher"], g["mas"], g["si"]) + 0.1,
        },
        {
            "claim": "global, 90 / 95 / 97 % pruned: signal above magnitude",
            "paper": "0.896 / 0.699 / 0.457 vs 0.857 / 0.613 / 0.383",
            "measured": (
                " / ".join(f"{at['global'][s]['signal']:.3f}" for s in high)
                + " vs "
                + " / ".join(f"{at['global'][s]['magnitude']:.3f}" for s in high)
            ),
            "holds": all(at["global"][s]["signal"] > at["global"][s]["magnitude"] for s in high),
        },
        {
            "claim": "global beats per layer for every criterion (sparsity where the accuracy first < 0.90)",
            "paper": "magnitude 0.878 vs 0.820, Fisher 0.719 vs 0.496, MAS 0.658 vs 0.488, SI 0.618 vs 0.417, "
            "signal 0.898 vs 0.746",
            "measured": ", ".join(f"{c} {gl:.2f} vs {pl:.2f}" for c, gl, pl in pairs),
            "holds": all(gl >= pl for _, gl, pl in pairs),
        },
        {
            "claim": "per layer: magnitude beats signal (sparsity where the accuracy first < 0.90)",
            "paper": "0.820 vs 0.746",
            "measured": f"{fb('per_layer', 'magnitude'):.2f} vs {fb('per_layer', 'signal'):.2f}",
            "holds": fb("per_layer", "magnitude") > fb("per_layer", "signal"),
        },
    ]


def run_digits(quick: bool, seeds: int) -> dict:
    splits = digits_splits()
    grid = COARSE_GRID if quick else FINE_GRID
    epochs = QUICK["digits_epochs"] if quick else DIGITS["epochs"]
    runs = []
    for seed in range(seeds):
        run = digits_seed(seed, splits, epochs, grid)
        runs.append(run)
        sec = run["seconds"]
        log(
            f"(a) seed {seed}: test accuracy {run['test_accuracy']:.3f} (train {sec['train']:.1f} s, importances "
            f"{sec['importances']:.1f} s, {len(CRITERIA) * len(SCOPES) * len(grid)} prunings {sec['pruning']:.1f} s)"
        )
    settings = DIGITS | {"epochs": epochs, "seeds": list(range(seeds)), "grid": grid, "include": DIGITS_INCLUDE}
    settings |= {"sizes": {k: len(v) for k, v in splits.items()}, "threshold": THRESHOLD}
    return {"settings": settings, "summary": summarize_digits(runs, grid), "runs": runs}


# ================================================================================================ (b), (c) causal LMs
def lm_setup(quick: bool) -> dict:
    """The default's python_docs domain: texts, a BPE tokenizer trained on its training texts, 128-token blocks."""
    raw = read_yaml(default_config_path())
    raw["domains"] = raw["domains"][:1]
    run = build_run_config(raw, source=str(default_config_path()))
    spec = run.domains[0]
    texts = load_raw_domain(spec, 0, task=run.task, seed=run.seed, base_dirs=[Path(run.source).parent])
    tokenizer = train_tokenizer(run.task, iter(texts.train[spec.text_column]), run.model.tokenizer_vocab_size)
    data = tokenize_domain(texts, spec, 0, tokenizer, task=run.task, max_length=run.model.max_length, seed=run.seed)
    held_out = QUICK["lm_held_out"] if quick else LM["held_out"]
    parts = data.train.train_test_split(test_size=held_out, seed=run.seed, shuffle=True)
    train, held, evaluation = parts["train"], parts["test"], data.eval
    if quick:
        train = train.select(range(QUICK["lm_train_blocks"]))
        evaluation = evaluation.select(range(QUICK["lm_eval_blocks"]))
    sizes = {"train_blocks": len(train), "held_out_blocks": len(held), "eval_blocks": len(evaluation)}
    sizes |= {"train_texts": texts.stats["train_texts"], "eval_texts": texts.stats["eval_texts"]}
    return {"raw": raw, "run": run, "tokenizer": tokenizer, "train": train, "held": held, "eval": evaluation,
            "sizes": sizes}  # fmt: skip


def build_lm(setup: dict, seed: int, config_changes: dict | None = None):
    raw = copy.deepcopy(setup["raw"])
    raw["model"]["config"].update(config_changes or {})
    raw["seed"] = seed
    return build_model(build_run_config(raw, source=str(default_config_path())), setup["tokenizer"])


def train_lm(setup: dict, model, *, seed: int, epochs: float, learning_rate: float) -> tuple:
    """The default's training settings (batch 16, cosine, warmup 10) with SI; returns the EWC state, seconds, loss,
    steps."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        changes = _quiet(
            ewc_mode="off", importance_method="si", num_train_epochs=epochs, learning_rate=learning_rate, seed=seed
        )
        trainer = EWCTrainer(
            model=model, args=setup["run"].training_args(0, tmp, **changes), train_dataset=setup["train"]
        )
        trainer.remove_callback(transformers.PrinterCallback)
        output = trainer.train()
        state = trainer.consolidate(domain="python_docs")
    return state, time.perf_counter() - start, output.metrics.get("train_loss"), trainer.state.global_step


def lm_importances(setup: dict, model, state, max_samples: int | None) -> tuple[dict, float]:
    start = time.perf_counter()
    out = {"si": state}  # an EWCState: prune_model checks that it holds SI importances
    for method in COLLECTED:
        kwargs = {"estimator": "empirical"} if method == "fisher" else {}
        out[method] = collect_importance(
            model,
            setup["held"],
            method,
            batch_size=LM["importance_batch_size"],
            max_samples=max_samples,
            show_progress=False,
            **kwargs,
        )
    return out, time.perf_counter() - start


def _omega(importances: dict, criterion: str):
    return None if criterion == "magnitude" else importances[IMPORTANCE_OF[criterion]]


def eval_loss(setup: dict, model) -> float:
    result = evaluate_model(model, setup["eval"], "causal_lm", setup["tokenizer"], batch_size=LM["eval_batch_size"])
    return result["loss"]


def _mean_or_none(values: list) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def _group_sparsity(report) -> dict:
    """Share of the attention and of the MLP projection weights pruned (from the report's per-tensor rows)."""
    out = {}
    for group, key in GROUPS.items():
        rows = [v for n, v in report.layers.items() if key in n]
        total = sum(math.prod(v["original_shape"]) for v in rows)
        out[group] = 1 - sum(math.prod(v["shape"]) - v["zeros"] for v in rows) / total if total else None
    return out


def lm_seed(setup: dict, seed: int, quick: bool) -> dict:
    """Train the default's model once, collect the importances, prune copies of it by every criterion × setting."""
    transformers.set_seed(seed)
    model = build_lm(setup, seed)
    epochs = QUICK["lm_epochs"] if quick else LM["epochs"]
    state, train_seconds, train_loss, steps = train_lm(
        setup, model, seed=seed, epochs=epochs, learning_rate=LM["learning_rate"]
    )
    dense = eval_loss(setup, model)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for p in select_targets(zeroed).values():
            p.zero_()
    zeroed_loss = eval_loss(setup, zeroed)  # what the pruned part is worth: every targeted weight at 0
    log(
        f"(b) seed {seed}: {steps} steps in {train_seconds:.0f} s (train loss {train_loss:.3f}); eval loss dense "
        f"{dense:.4f}, with every block Linear weight zeroed {zeroed_loss:.4f}"
    )
    importances, importance_seconds = lm_importances(setup, model, state, None)
    t0 = time.perf_counter()
    cells = []
    for criterion in CRITERIA:
        for label, scope, structure, sparsity in LM_SETTINGS:
            pruned = copy.deepcopy(model)
            report = prune_model(
                pruned,
                sparsity,
                criterion=criterion,
                importances=_omega(importances, criterion),
                scope=scope,
                structure=structure,
                show_progress=False,
            )
            loss = eval_loss(setup, pruned)
            cells.append(
                {
                    "criterion": criterion,
                    "setting": label,
                    "scope": report.scope,
                    "structure": report.structure,
                    "sparsity": report.global_sparsity,
                    "loss": loss,
                    "relative_increase": loss / dense - 1.0,
                    "group_sparsity": _group_sparsity(report),
                    "importance_source": report.importance_source,
                    "per_tensor_sparsity": {n: v["sparsity"] for n, v in report.layers.items()},
                }
            )
        shown = ", ".join(f"{c['setting']} {c['loss']:.3f}" for c in cells if c["criterion"] == criterion)
        log(f"(b) seed {seed} {criterion:9s}: {shown}")
    targeted = select_targets(model)
    return {
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "targeted_parameters": sum(p.numel() for p in targeted.values()),
        "targeted_tensors": len(targeted),
        "train": {"seconds": train_seconds, "steps": steps, "train_loss": train_loss, "epochs": epochs},
        "importance_seconds": importance_seconds,
        "pruning_seconds": time.perf_counter() - t0,
        "dense_loss": dense,
        "zeroed_loss": zeroed_loss,
        "cells": cells,
        "target": lm_target({c["criterion"]: c["loss"] for c in cells if c["setting"] == LM_TARGET["setting"]}, dense),
    }


def lm_target(at: dict[str, float], dense: float) -> dict:
    """The target at 50 % (global): the best importance criterion within +5 % of dense and better than magnitude."""
    best = min((c for c in CRITERIA if c != "magnitude"), key=lambda c: at[c])
    within = at[best] <= dense * (1 + LM_TARGET["max_loss_increase"])
    better = at[best] < at["magnitude"]
    return {
        "setting": LM_TARGET["setting"],
        "best_importance_criterion": best,
        "best_loss": at[best],
        "best_relative_increase": at[best] / dense - 1.0,
        "magnitude_loss": at["magnitude"],
        "magnitude_relative_increase": at["magnitude"] / dense - 1.0,
        "best_overall": min(at, key=at.get),
        "within_5_percent": within,
        "better_than_magnitude": better,
        "met": within and better,
    }


def run_lm(setup: dict, quick: bool) -> dict:
    seeds = QUICK["lm_seeds"] if quick else LM["seeds"]
    runs = [lm_seed(setup, seed, quick) for seed in seeds]
    dense = float(np.mean([r["dense_loss"] for r in runs]))
    mean = {}
    for criterion in CRITERIA:
        for label, *_ in LM_SETTINGS:
            cells = [c for r in runs for c in r["cells"] if (c["criterion"], c["setting"]) == (criterion, label)]
            mean[(criterion, label)] = {
                "criterion": criterion,
                "setting": label,
                "sparsity": float(np.mean([c["sparsity"] for c in cells])),
                "loss": float(np.mean([c["loss"] for c in cells])),
                "loss_per_seed": [c["loss"] for c in cells],
                "relative_increase": float(np.mean([c["relative_increase"] for c in cells])),
                "group_sparsity": {g: _mean_or_none([c["group_sparsity"][g] for c in cells]) for g in GROUPS},
            }
    at = {c: mean[(c, LM_TARGET["setting"])]["loss"] for c in CRITERIA}
    first = runs[0]
    return {
        "settings": LM | {"seeds": seeds, "epochs": first["train"]["epochs"], "model": setup["raw"]["model"],
                          "sizes": setup["sizes"], "settings_measured": LM_SETTINGS, "target": LM_TARGET},
        "parameters": first["parameters"],
        "targeted_parameters": first["targeted_parameters"],
        "targeted_tensors": first["targeted_tensors"],
        "dense_loss": dense,
        "zeroed_loss": float(np.mean([r["zeroed_loss"] for r in runs])),
        "mean": list(mean.values()),
        "target": lm_target(at, dense) | {"met_per_seed": [r["target"]["met"] for r in runs]},
        "runs": runs,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ (c)
def _linear_macs_per_token(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


@torch.inference_mode()
def side_by_side(dense, pruned, inputs: dict, warmup: int, repeats: int, **kwargs) -> dict:
    """Median forward time of both models, timed in alternating pairs (which one goes first flips every pair)."""
    dense.eval()
    pruned.eval()

    def once(model) -> float:
        start = time.perf_counter()
        model(**inputs, **kwargs)
        return time.perf_counter() - start

    for _ in range(warmup):
        once(dense)
        once(pruned)
    d, p = [], []
    for i in range(repeats):
        if i % 2:
            p.append(once(pruned))
            d.append(once(dense))
        else:
            d.append(once(dense))
            p.append(once(pruned))
    dm, pm = statistics.median(d), statistics.median(p)
    return {
        "dense_ms": 1e3 * dm,
        "pruned_ms": 1e3 * pm,
        "ratio": pm / dm,
        "median_pair_ratio": statistics.median(b / a for a, b in zip(d, p)),
        "dense_all_ms": [1e3 * t for t in d],
        "pruned_all_ms": [1e3 * t for t in p],
    }


def run_ffn(setup: dict, quick: bool) -> dict:
    seed = FFN["seed"]
    transformers.set_seed(seed)
    model = build_lm(setup, seed, FFN_MODEL)
    epochs = QUICK["ffn_epochs"] if quick else FFN["epochs"]
    state, train_seconds, train_loss, steps = train_lm(
        setup, model, seed=seed, epochs=epochs, learning_rate=FFN["learning_rate"]
    )
    dense = eval_loss(setup, model)
    no_ffn = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in no_ffn.named_parameters():
            if ".mlp." in name:
                p.zero_()
    no_ffn_loss = eval_loss(setup, no_ffn)  # what the FFN is worth: all of it removed
    log(
        f"(c) {steps} steps in {train_seconds:.0f} s (train loss {train_loss:.3f}); eval loss dense {dense:.4f}, "
        f"with the whole FFN zeroed {no_ffn_loss:.4f}"
    )
    max_samples = QUICK["ffn_importance_max_samples"] if quick else FFN["importance_max_samples"]
    importances, importance_seconds = lm_importances(setup, model, state, max_samples)
    cells, pruned_models = [], {}
    for criterion in CRITERIA:
        pruned = copy.deepcopy(model)
        report = prune_model(
            pruned,
            FFN["sparsity"],
            criterion=criterion,
            importances=_omega(importances, criterion),
            structure="ffn",
            show_progress=False,
        )
        loss = eval_loss(setup, pruned)
        pruned_models[criterion] = (pruned, report)
        cells.append(
            {
                "criterion": criterion,
                "loss": loss,
                "relative_increase": loss / dense - 1.0,
                "parameters_before": report.num_parameters_before,
                "parameters_after": report.num_parameters_after,
                "intermediate_size": pruned.config.intermediate_size,
                "removal": report.removal,
                "structured": {k: v for k, v in report.structured.items() if k != "removed_indices"},
            }
        )
        log(f"(c) FFN {FFN['sparsity']:.0%} by {criterion:9s}: eval loss {loss:.4f} ({loss / dense - 1:+.1%})")

    pruned, report = pruned_models["magnitude"]  # every criterion gives the same shapes: one latency measurement
    with tempfile.TemporaryDirectory() as tmp:
        verification = export_pruned(pruned, Path(tmp) / "pruned", report, tokenizer=setup["tokenizer"])
    log(
        f"(c) export_pruned: reloaded and verified ({verification['tensors_compared']} tensors, max logit difference "
        f"{verification['max_logit_difference']:.1e})"
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(LATENCY["threads"])
    try:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(2, model.config.vocab_size, (LATENCY["batch"], LATENCY["tokens"]), generator=generator)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        warmup = QUICK["latency_warmup"] if quick else LATENCY["warmup"]
        repeats = QUICK["latency_repeats"] if quick else LATENCY["repeats"]
        latency = {
            "full": side_by_side(model, pruned, inputs, warmup, repeats),
            "prefill": side_by_side(model, pruned, inputs, warmup, repeats, logits_to_keep=1),
        }
        wide = build_lm(setup, seed, FFN_WIDE_MODEL)
        wide_pruned = copy.deepcopy(wide)
        wide_report = prune_model(wide_pruned, FFN["sparsity"], structure="ffn", show_progress=False)
        latency_wide = {
            "full": side_by_side(wide, wide_pruned, inputs, warmup, repeats),
            "prefill": side_by_side(wide, wide_pruned, inputs, warmup, repeats, logits_to_keep=1),
        }
        wide_macs = {"dense": _linear_macs_per_token(wide), "pruned": _linear_macs_per_token(wide_pruned)}
    finally:
        torch.set_num_threads(threads)
    for key, value in latency_wide.items():
        log(f"(c) wide-FFN model latency, {key}: ratio {value['ratio']:.3f}")
    for key, value in latency.items():
        log(
            f"(c) latency, {key} forward: dense {value['dense_ms']:.1f} ms, pruned {value['pruned_ms']:.1f} ms, "
            f"ratio {value['ratio']:.3f}"
        )
    config = model.config
    attention = 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * LATENCY["tokens"]
    macs = {"dense": _linear_macs_per_token(model) + attention, "pruned": _linear_macs_per_token(pruned) + attention}
    ffn_macs = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".mlp." in n)
    head_macs = model.lm_head.weight.numel()
    settings = FFN | {"epochs": epochs, "importance_max_samples": max_samples, "model": FFN_MODEL}
    settings |= {"latency": LATENCY | {"warmup": warmup, "repeats": repeats}, "target": FFN_TARGET}
    return {
        "settings": settings,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train": {"seconds": train_seconds, "steps": steps, "train_loss": train_loss},
        "importance_seconds": importance_seconds,
        "dense_loss": dense,
        "no_ffn_loss": no_ffn_loss,
        "cells": cells,
        "export_verification": verification,
        "latency": latency,
        "macs_per_token": macs
        | {
            "ratio": macs["pruned"] / macs["dense"],
            "ffn_share_dense": ffn_macs / macs["dense"],
            "lm_head_share_dense": head_macs / macs["dense"],
            "note": "Linear weights (LM head included) + attention scores over the full sequence; norms, RoPE, "
            "activations and softmax left out",
        },
        "target_met": latency["full"]["ratio"] <= FFN_TARGET,
        "target_met_prefill": latency["prefill"]["ratio"] <= FFN_TARGET,
        "wide": {
            "model": FFN_WIDE_MODEL,
            "parameters_before": wide_report.num_parameters_before,
            "parameters_after": wide_report.num_parameters_after,
            "intermediate_size_after": wide_pruned.config.intermediate_size,
            "linear_macs_ratio": wide_macs["pruned"] / wide_macs["dense"],
            "latency": latency_wide,
            "target_met": latency_wide["full"]["ratio"] <= FFN_TARGET,
            "target_met_prefill": latency_wide["prefill"]["ratio"] <= FFN_TARGET,
        },
    }


# ================================================================================================ report
def _pct(value: float) -> str:
    return f"{100 * value:+.1f} %"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _met(flag: bool) -> str:
    return "**met**" if flag else "not met"


def digits_markdown(part: dict) -> list[str]:
    settings, summary = part["settings"], part["summary"]
    sizes = settings["sizes"]
    accs = [r["test_accuracy"] for r in part["runs"]]
    grid = summary["grid"]
    setup = (
        f"scikit-learn digits, stratified split {sizes['train']} train / {sizes['validation']} validation / "
        f"{sizes['test']} test; MLP 64-100-100-10 (leaky ReLU) trained by `EWCTrainer` (Adam lr "
        f"{settings['learning_rate']:g}, batch {settings['batch_size']}, {settings['epochs']} epochs; SI importances "
        "from that training run); empirical Fisher, MAS and signal collected on the validation split; the three "
        "Linear weights pruned (biases kept); accuracy on the test split. "
        f"{len(accs)} seed(s); dense test accuracy {np.mean(accs):.3f} (seeds {min(accs):.3f}–{max(accs):.3f}). "
        "Cells: mean test accuracy over the seeds; in parentheses the paper's (MNIST 784-300-150-10, 10 runs, "
        "importances and accuracy both on the test set)."
    )
    lines = [
        "## (a) Digits MLP: accuracy after pruning, no retraining (methods.md §5)",
        "",
        setup,
        "",
        "| scope | pruned | " + " | ".join(CRITERIA) + " |",
        "|---|---|" + "---|" * len(CRITERIA),
    ]
    for scope in SCOPES:
        for s, row in summary["at"][scope].items():
            paper = PAPER[scope].get(s, {})
            cells = [f"{row[c]:.3f}" + (f" ({paper[c]:.3f})" if c in paper else "") for c in CRITERIA]
            lines.append(f"| {scope} | {round(100 * s)} % | " + " | ".join(cells) + " |")
    for scope in SCOPES:
        cells = []
        for c in CRITERIA:
            value = summary["first_below"][scope][c]["mean_curve"]
            paper = PAPER["first_below"][scope].get(c)
            text = f"> {grid[-1]:g}" if value is None else f"{value:.2f}"
            cells.append(text + (f" ({paper:.3f})" if paper is not None else ""))
        lines.append(f"| {scope} | **first < {THRESHOLD:.2f}** | " + " | ".join(cells) + " |")
    spread = [v for scope in SCOPES for c in CRITERIA for v in (summary["std"][scope][c] or [])]
    spread_text = (
        f"The largest standard deviation over seeds of any point of the curves: {max(spread):.3f}; every seed's "
        "curve is in the JSON."
        if spread
        else "One seed: no spread."
    )
    lines += [
        "",
        (
            f"*first < {THRESHOLD:.2f}*: the smallest sparsity of the grid ({grid[0]:g} … {grid[-1]:g}, step "
            f"{grid[1] - grid[0]:.2g}) at which the mean accuracy drops below {THRESHOLD:.2f}. {spread_text}"
        ),
        "",
        "### The paper's claims",
        "",
        "| claim | paper | measured | |",
        "|---|---|---|---|",
    ]
    for check in summary["checks"]:
        verdict = "reproduced" if check["holds"] else "**not reproduced**"
        lines.append(f"| {check['claim']} | {check['paper']} | {check['measured']} | {verdict} |")
    corr = summary["pearson_abs_weight_vs_importance"]
    names = list(next(iter(corr.values())))
    layer_share = summary["layer_sparsity_at"]
    lines += [
        "",
        "### Why",
        "",
        (
            "Per-layer Pearson correlation of |w| with each importance (mean over seeds; methods.md pilot: signal "
            "0.63/0.72/0.88, Fisher 0.05/−0.09/−0.20), and the share of the pruned weights whose importance is "
            "exactly 0 (they go first, ties in storage order):"
        ),
        "",
        "| importance | " + " | ".join(f"`{n}`" for n in names) + " | Ω = 0 |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for method, row in corr.items():
        zero = summary["zero_importance_share"][method]
        lines.append(f"| {method} | " + " | ".join(f"{row[n]:+.2f}" for n in names) + f" | {zero:.1%} |")
    if layer_share["mean"].get("global"):
        lines += [
            "",
            (
                f"Where the global ranking puts the zeros at {layer_share['sparsity']:.0%} sparsity (share of each "
                "layer pruned, mean over seeds):"
            ),
            "",
            "| criterion | " + " | ".join(f"`{n}`" for n in names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for criterion, row in layer_share["mean"]["global"].items():
            lines.append(f"| {criterion} | " + " | ".join(f"{row[n]:.0%}" for n in names) + " |")
        activity = " / ".join(f"{summary['mean_abs_input'][n]:.2f}" for n in names)
        lines += [
            "",
            (
                f"Signal is |w| × the mean |input| of the weight's input, and that mean is {activity} for the three "
                "layers (pixels / 16 into the first): one global signal ranking compares layers on different scales "
                "and so prunes the layers with the quietest inputs first, whatever their weights. Fisher, MAS and SI "
                "hardly correlate with |w| (table above) and empty the middle layer first."
            ),
        ]
    return lines


def lm_markdown(part: dict) -> list[str]:
    settings, target = part["settings"], part["target"]
    sizes = settings["sizes"]
    dense = part["dense_loss"]
    labels = [s[0] for s in LM_SETTINGS]
    runs = part["runs"]
    steps = runs[0]["train"]["steps"]
    dense_per_seed = ", ".join(f"{r['dense_loss']:.4f}" for r in runs)
    setup = (
        f"Llama built from the embedded default's config ({part['parameters']:,} parameters; pruned: the "
        f"{part['targeted_tensors']} Linear weights inside the blocks, {part['targeted_parameters']:,} parameters), "
        f"trained on python_docs ({sizes['train_blocks']} blocks of 128 tokens, {settings['epochs']} epochs = "
        f"{steps} steps, lr {settings['learning_rate']:g}; SI from that training run); empirical Fisher, MAS and "
        f"signal on {sizes['held_out_blocks']} training blocks held out of the training; eval loss on "
        f"{sizes['eval_blocks']} eval blocks. Seeds {', '.join(str(s) for s in settings['seeds'])}: dense eval loss "
        f"**{dense:.4f}** (per seed {dense_per_seed}); with every targeted "
        f"weight zeroed {part['zeroed_loss']:.4f}. Cells: mean eval loss (mean change vs dense); the FFN column "
        "removes 30 % of every layer's FFN neurons (MLP weights only, removed from the shapes)."
    )
    lines = [
        "## (b) The default's causal LM: eval loss after pruning, no retraining",
        "",
        setup,
        "",
        "| criterion | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    cells = {(c["criterion"], c["setting"]): c for c in part["mean"]}
    for criterion in CRITERIA:
        row = [cells[(criterion, label)] for label in labels]
        lines.append(
            f"| {criterion} | " + " | ".join(f"{c['loss']:.3f} ({_pct(c['relative_increase'])})" for c in row) + " |"
        )
    half = {c: cells[(c, LM_TARGET["setting"])] for c in CRITERIA}
    where = "; ".join(
        f"{c} {_share(half[c]['group_sparsity']['attention'])} / {_share(half[c]['group_sparsity']['mlp'])}"
        for c in CRITERIA
    )
    per_seed = ", ".join("met" if m else "not met" for m in target["met_per_seed"])
    verdict = (
        f"Target (at {target['setting']}: the best importance criterion within "
        f"+{LM_TARGET['max_loss_increase']:.0%} of the dense loss and better than magnitude): "
        f"{_met(target['met'])} on the means (per seed: {per_seed}). Best importance criterion "
        f"{target['best_importance_criterion']}: {target['best_loss']:.4f} ({_pct(target['best_relative_increase'])}; "
        f"within +5 %: {'yes' if target['within_5_percent'] else 'no'}); magnitude {target['magnitude_loss']:.4f} "
        f"({_pct(target['magnitude_relative_increase'])}); better than magnitude: "
        f"{'yes' if target['better_than_magnitude'] else 'no'}."
    )
    lines += [
        "",
        f"Where the global 50 % ranking puts the zeros (share of attention / MLP weights pruned): {where}.",
        "",
        verdict,
    ]
    return lines


def ffn_markdown(part: dict) -> list[str]:
    settings, latency, macs = part["settings"], part["latency"], part["macs_per_token"]
    model, lat = settings["model"], settings["latency"]
    first = part["cells"][0]
    verification = part["export_verification"]
    setup = (
        f"Llama hidden {model['hidden_size']}, FFN {model['intermediate_size']}, {model['num_hidden_layers']} "
        f"layers, {model['num_attention_heads']} heads / {model['num_key_value_heads']} key-value heads, the "
        f"tokenizer and blocks of (b), trained the same way ({settings['epochs']} epochs = {part['train']['steps']} "
        f"steps, lr {settings['learning_rate']:g}, seed {settings['seed']}); importances on "
        f"{settings['importance_max_samples']} held-out blocks. Parameters {first['parameters_before']:,} → "
        f"{first['parameters_after']:,} ({first['parameters_after'] / first['parameters_before'] - 1:+.1%}); "
        f"`intermediate_size` {model['intermediate_size']} → {first['intermediate_size']}, removed from the shapes "
        f"and the config. Dense eval loss {part['dense_loss']:.4f} (the small model's recipe, not tuned for this "
        f"one); with the whole FFN zeroed {part['no_ffn_loss']:.4f} "
        f"({_pct(part['no_ffn_loss'] / part['dense_loss'] - 1)})."
    )
    lines = [
        f"## (c) Structured FFN removal: {settings['sparsity']:.0%} of the neurons of every layer",
        "",
        setup,
        "",
        "| criterion | eval loss after | change |",
        "|---|---|---|",
    ]
    lines += [f"| {c['criterion']} | {c['loss']:.4f} | {_pct(c['relative_increase'])} |" for c in part["cells"]]
    lines += [
        "",
        (
            f"CPU latency of one forward pass, batch {lat['batch']} × {lat['tokens']} tokens, {lat['threads']} "
            f"threads, eval mode, `torch.inference_mode`; {lat['warmup']} warm-up pairs, then {lat['repeats']} "
            "dense/pruned pairs in alternating order; medians:"
        ),
        "",
        f"| model | forward | dense (ms) | pruned (ms) | pruned / dense | pair ratios (median) | ≤ {FFN_TARGET:.2f} |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"full": "full (logits at every position)", "prefill": "prefill (`logits_to_keep=1`)"}
    wide = part.get("wide")
    ratio = model["intermediate_size"] / model["hidden_size"]
    label = f"trained, FFN {model['intermediate_size']} = {ratio:.1f}× hidden"
    models = [(label, latency, part["target_met"], part["target_met_prefill"])]
    if wide:
        w = wide["model"]
        label = (
            f"wide FFN {w['intermediate_size']} = {w['intermediate_size'] / w['hidden_size']:.1f}× hidden (untrained)"
        )
        models.append((label, wide["latency"], wide["target_met"], wide["target_met_prefill"]))
    for label, lat_by_mode, met_full, met_prefill in models:
        for key, value in lat_by_mode.items():
            met = met_full if key == "full" else met_prefill
            lines.append(
                f"| {label} | {names[key]} | {value['dense_ms']:.1f} | {value['pruned_ms']:.1f} | "
                f"{value['ratio']:.3f} | {value['median_pair_ratio']:.3f} | {_met(met)} |"
            )
    lines += [
        "",
        (
            f"Arithmetic bound: the FFN holds {macs['ffn_share_dense']:.0%} of the multiply-adds per token of the "
            f"full forward and the tied LM head ({model['hidden_size']} × vocabulary) "
            f"{macs['lm_head_share_dense']:.0%}, so removing {settings['sparsity']:.0%} of the FFN leaves "
            f"{macs['ratio']:.3f} of the multiply-adds: a full forward at ≤ {FFN_TARGET:.2f}× needs a model whose "
            "FFN holds more than "
            f"{(1 - FFN_TARGET) / settings['sparsity']:.0%} of the compute."
        ),
    ]
    if wide:
        w = wide["model"]
        lines += [
            "",
            (
                "The wide-FFN rows have the proportions of today's small LLMs (Qwen2.5-0.5B: hidden 896, FFN 4864, "
                f"14 / 2 heads), scaled down: hidden {w['hidden_size']}, FFN {w['intermediate_size']}, "
                f"{w['num_hidden_layers']} layers, {w['num_attention_heads']} / {w['num_key_value_heads']} heads; "
                f"parameters {wide['parameters_before']:,} → {wide['parameters_after']:,}, Linear multiply-adds "
                f"× {wide['linear_macs_ratio']:.3f}. Untrained and pruned by magnitude: the latency depends on the "
                "shapes only."
            ),
        ]
    lines += [
        "",
        (
            f"`export_pruned` (the magnitude-pruned model): saved, reloaded with `{verification['auto_class']}` and "
            f"verified ({verification['tensors_compared']} tensors equal, max logit difference "
            f"{verification['max_logit_difference']:.1e})."
        ),
    ]
    return lines


def write_markdown(report: dict, path: Path) -> None:
    seconds = report["seconds"]
    lines = [
        "# Pruning by importance: `hf_ewc.pruning.prune_model`",
        "",
        (
            f"Command: `{report['command']}` — wall time {report['wall_time_s']:.0f} s on "
            f"{report['machine']['cpu_count']} CPU core(s) ((a) {seconds['a']:.0f} s, (b) {seconds['b']:.0f} s, (c) "
            f"{seconds['c']:.0f} s)."
        ),
        "",
        *digits_markdown(report["digits"]),
        "",
        *lm_markdown(report["lm"]),
        "",
        *ffn_markdown(report["ffn"]),
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["digits"]["summary"]
    grid = summary["grid"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    for ax, scope in zip(axes, SCOPES):
        for criterion in CRITERIA:
            mean = np.array(summary["mean"][scope][criterion])
            ax.plot(grid, mean, color=COLORS[criterion], label=criterion)
            std = summary["std"][scope][criterion]
            if std is not None:
                ax.fill_between(grid, mean - np.array(std), mean + np.array(std), color=COLORS[criterion], alpha=0.15)
            paper = [(s, row[criterion]) for s, row in PAPER[scope].items() if criterion in row]
            if paper:
                ax.scatter(*zip(*paper), color=COLORS[criterion], marker="x", s=30)
        ax.axhline(THRESHOLD, color="gray", linestyle=":", linewidth=1)
        ax.scatter([], [], color="gray", marker="x", label="paper (MNIST, test-set importances)")
        ax.set(
            xlabel="share of the MLP's weights pruned",
            ylabel="test accuracy",
            ylim=(0, 1.0),
            title=f"(a) digits MLP, {scope.replace('_', ' ')} ranking, no retraining",
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")

    ax = axes[2]
    lm = report["lm"]
    dense = lm["dense_loss"]
    for i, criterion in enumerate(CRITERIA):
        cells = [c for c in lm["mean"] if c["criterion"] == criterion and c["setting"].startswith("global")]
        ax.plot(
            [0.0] + [c["sparsity"] for c in cells],
            [dense] + [c["loss"] for c in cells],
            marker="o",
            color=COLORS[criterion],
            label=f"{criterion} (global)",
        )
        nm = next(c for c in lm["mean"] if c["criterion"] == criterion and c["setting"] == "2:4")
        ax.scatter([0.5 + 0.01 * (i - 2.5)], [nm["loss"]], marker="s", color=COLORS[criterion])
    ax.scatter([], [], marker="s", color="gray", label="2:4 (50 %)")
    ax.axhline(dense * (1 + LM_TARGET["max_loss_increase"]), color="gray", linestyle=":", label="dense + 5 %")
    ax.set(
        xlabel="share of the block Linear weights pruned",
        ylabel="eval loss (nats / token)",
        title="(b) the default's causal LM on python_docs, no retraining",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_safe(value):
    """Strict JSON: non-finite floats as strings ("nan", "inf"), dict keys as strings; floats to 6 significant digits
    (the curves of (a) hold thousands of them)."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(key): _json_safe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny training, coarse grid, 1 seed")
    parser.add_argument("--seeds", type=int, help="seeds of part (a) (default: 10, or 1 with --quick)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    start = time.perf_counter()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    seeds = args.seeds or (QUICK["digits_seeds"] if args.quick else DIGITS["seeds"])
    seconds = {}

    t0 = time.perf_counter()
    digits = run_digits(args.quick, seeds)
    seconds["a"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    setup = lm_setup(args.quick)
    lm = run_lm(setup, args.quick)
    seconds["b"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ffn = run_ffn(setup, args.quick)
    seconds["c"] = time.perf_counter() - t0

    report = {
        "command": " ".join(["python", "benchmarks/pruning.py", *argv]),
        "settings": {"quick": args.quick, "criteria": CRITERIA, "quick_settings": QUICK if args.quick else None},
        "versions": versions()
        | {
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
            "datasets": datasets.__version__,
            "matplotlib": importlib.metadata.version("matplotlib"),
            "python": platform.python_version(),
        },
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()},
        "seconds": seconds,
        "digits": digits,
        "lm": lm,
        "ffn": ffn,
        "paper": PAPER,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "pruning_quick" if args.quick else "pruning"
    plot(report, args.out / f"{stem}.png")
    report["wall_time_s"] = time.perf_counter() - start
    write_markdown(report, args.out / f"{stem}.md")
    with open(args.out / f"{stem}.json", "w", encoding="utf-8") as f:
        json.dump(_json_safe(report), f, indent=2, allow_nan=False)
        f.write("\n")
    print()
    print((args.out / f"{stem}.md").read_text(encoding="utf-8").split("\n", 4)[4])
    print(f"Wall time {report['wall_time_s']:.0f} s; results in {args.out}/{stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
