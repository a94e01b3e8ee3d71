"""Permuted-digits benchmark: (stabilized) EWC through `hf_ewc.EWCTrainer`, on CPU in a few minutes.

Run from the repository root (needs the ``bench`` extra: scikit-learn and matplotlib):

    python benchmarks/permuted_digits.py            # full run: ~5 min on 2 idle CPU cores, up to ~10 on a busy one
    python benchmarks/permuted_digits.py --quick    # smoke test, under a minute

A small-scale version of the permuted-MNIST experiment of Kutalev & Lapina (arXiv 2109.10021): scikit-learn's 8×8
digits, 5 tasks (the identity and 4 fixed pixel permutations) learned one after another by a 64-100-100-10 leaky-ReLU
MLP. Every task gets a new `EWCTrainer`, `trainer.consolidate()` measures the importances on the task just learned,
and the returned `EWCState` protects it during the next tasks. Two grids:

- A (Adam, lr 1e-3): mean test accuracy over the 5 tasks after the last one, for plain fine-tuning
  (``ewc_mode="off"``) and every ``ewc_mode`` ∈ {vanilla, stabilized, proximal} × ``importance_method`` ∈
  {fisher, mas, si, signal} over a λ grid and a few seeds, under two optimizer policies:

  - ``persistent``: one ``torch.optim.Adam`` per sequence, created with the model and handed to every task's trainer
    through ``optimizers=(optimizer, None)``, so that its moments and step count carry over from task to task. This is
    the setup of the paper's reference code and of the methods.md pilot, the one to compare with their numbers;
  - ``fresh``: every task's trainer builds its own AdamW with weight_decay=0 (= Adam), which is what chaining
    Hugging Face trainers gives by default;

- B (SGD, lr 0.05, a new trainer and so optimizer per task; SGD keeps no state): a λ sweep over 8 decades with the
  empirical Fisher, recording whether each mode stays finite. Vanilla EWC must blow up once η·λ·Ω_max passes 2;
  stabilized and proximal EWC must not.

Defaults: batch 32, 10 epochs per task, constant lr, no gradient clipping, importances on 300 training samples of the
task just learned, 3 seeds per grid-A cell (a fourth would push a busy machine past ten minutes) and 1 for grid B;
runs go to ``--workers`` processes (default 2).

Writes ``permuted_digits.json`` (settings, every run, versions, wall time), ``permuted_digits.md`` (tables) and
``permuted_digits.png`` (accuracy vs λ) into ``--out`` (default ``benchmarks/results``); ``--quick`` writes
``permuted_digits_quick.*`` instead, so that a smoke test never overwrites the real results.
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import gc
import importlib.metadata
import itertools
import json
import math
import multiprocessing
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import sklearn
import torch
import torch.nn.functional as F
import transformers
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import Dataset

from hf_ewc import EWCConfig, EWCTrainer
from hf_ewc.utils import versions


DATA_SEED = 0  # fixes the train/test split and the permutations: every run sees the same 5 tasks
NUM_TASKS = 5
TEST_SIZE = 0.3
MODES = ("vanilla", "stabilized", "proximal")
METHODS = ("fisher", "mas", "si", "signal")
TRAINING = {"batch_size": 32, "epochs": 10, "importance_max_samples": 300}
# Grid A's two optimizer policies: "persistent" keeps one Adam (moments and step count) for the whole sequence and
# hands it to every task's EWCTrainer, as the paper's reference code and the methods.md pilot do; "fresh" lets each
# task's EWCTrainer build its own AdamW (Adam, since every run sets weight_decay=0), as chaining Hugging Face trainers
# does by default.
POLICIES = ("persistent", "fresh")
ADAM = {"persistent": "torch.optim.Adam", "fresh": "adamw_torch", "learning_rate": 1e-3}
SGD = {"optim": "sgd", "learning_rate": 0.05}
# One λ means the same penalty for vanilla and stabilized (hf_ewc's convention), so they share a grid. The proximal
# pull bypasses Adam's normalisation (it is a plain η·λ·Ω step), so it needs a λ about 100× larger. The importance
# scales differ by orders of magnitude, hence one grid per method. Every grid brackets the optimum of a scan over two
# more decades (1-2 seeds, 4 where an optimum sat near an edge); the persistent optima of the Fisher and signal
# penalties sit lower than the fresh ones, and the proximal optima move with the policy too. Fresh proximal Fisher has
# a second, lower peak near λ = 3e4 (0.565 vs 0.577 at 300, 4 seeds), outside its grid.
ADAM_LAMBDAS = {
    "persistent": {
        "penalty": {
            "fisher": [10, 30, 100, 300],
            "mas": [1, 3, 10, 30],
            "si": [1, 3, 10, 30],
            "signal": [0.1, 0.3, 1, 3],
        },
        "proximal": {
            "fisher": [3e3, 1e4, 3e4, 1e5],
            "mas": [100, 300, 1e3, 3e3],
            "si": [100, 300, 1e3, 3e3],
            "signal": [30, 100, 300, 1e3],
        },
    },
    "fresh": {
        "penalty": {
            "fisher": [30, 100, 300, 1000],
            "mas": [1, 3, 10, 30],
            "si": [1, 3, 10, 30],
            "signal": [0.3, 1, 3, 10],
        },
        "proximal": {
            "fisher": [100, 300, 1e3, 3e3],
            "mas": [30, 100, 300, 1e3],
            "si": [100, 300, 1e3, 3e3],
            "signal": [10, 30, 100, 300],
        },
    },
}
SGD_LAMBDAS = [10.0**k for k in range(8)]
EXPLOSION_FACTOR = 1e3  # an SGD run "exploded" when its final training loss exceeds this × the naive run's
EXPECTED = {"naive": 0.54, "best_ewc": (0.69, 0.75), "vanilla_vs_stabilized_adam": 0.012}  # methods.md §3.4, §11

_tasks: list[tuple["DigitsDataset", "DigitsDataset"]] | None = None  # built once per worker process


class DigitsMLP(nn.Module):
    """64-100-100-10 leaky-ReLU MLP; a plain module whose forward takes ``labels`` and returns loss and logits."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, 100), nn.Linear(100, 100), nn.Linear(100, 10)])

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden = pixel_values
        for layer in self.layers[:-1]:
            hidden = F.leaky_relu(layer(hidden))
        logits = self.layers[-1](hidden)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class DigitsDataset(Dataset):
    def __init__(self, pixels: np.ndarray, labels: np.ndarray):
        self.pixels = torch.as_tensor(pixels, dtype=torch.float32)
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def make_tasks() -> list[tuple[DigitsDataset, DigitsDataset]]:
    """(train, test) per task: one stratified split of the digits, then the identity and fixed pixel permutations."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=TEST_SIZE, stratify=digits.target, random_state=DATA_SEED
    )
    rng = np.random.default_rng(DATA_SEED)
    permutations = [np.arange(64)] + [rng.permutation(64) for _ in range(NUM_TASKS - 1)]
    return [(DigitsDataset(x_train[:, p], y_train), DigitsDataset(x_test[:, p], y_test)) for p in permutations]


@dataclass(frozen=True)
class RunSpec:
    optimizer: str  # "persistent" (one optimizer for the whole sequence) or "fresh" (one per task): see POLICIES
    optim: str  # the optimizer: a `TrainingArguments.optim` name for "fresh" runs, "torch.optim.Adam" otherwise
    learning_rate: float
    mode: str
    method: str
    lam: float
    seed: int
    epochs: int
    grid: str = "A"
    # The reproduction keeps the papers' raw importance scale (its λ grids are the papers');
    # benchmarks/default_lambda.py runs these tasks with the default "mean" normalization.
    normalization: str = "none"


def _init_worker() -> None:
    global _tasks
    torch.set_num_threads(1)  # one thread per worker: the pool, not intra-op threading, uses the cores
    transformers.logging.set_verbosity_error()
    _tasks = make_tasks()
    # Every Trainer.train() runs a full gc.collect() (accelerate's free_memory); taking the objects of the imports out
    # of its reach makes each run about a third faster.
    gc.freeze()


@torch.no_grad()
def _accuracy(model: nn.Module, dataset: DigitsDataset) -> float:
    model.eval()
    predictions = model(dataset.pixels)["logits"].argmax(-1)
    return float((predictions == dataset.labels).float().mean())


def run_sequence(spec: RunSpec) -> dict:
    """Train the 5 tasks in order with one EWCTrainer each; return the accuracies and the training diagnostics."""
    start = time.perf_counter()
    transformers.set_seed(spec.seed)
    model = DigitsMLP()
    if spec.optimizer == "persistent":
        # The trainers use a given optimizer as is (its state included); the config's `optim` is then unused.
        optimizer, optim = torch.optim.Adam(model.parameters(), lr=spec.learning_rate), {}
    else:
        optimizer, optim = None, {"optim": spec.optim}
    state = None
    losses, coef_max, omega_max, mean_accuracy, matrix = [], [], 0.0, [], []
    diverged_in = None
    with tempfile.TemporaryDirectory() as output_dir:
        args = EWCConfig(
            output_dir=output_dir,
            ewc_mode=spec.mode,
            ewc_lambda=spec.lam,
            importance_method=spec.method,
            importance_normalization=spec.normalization,
            importance_max_samples=TRAINING["importance_max_samples"],
            **optim,
            learning_rate=spec.learning_rate,  # also η of the stabilized coefficient and of the proximal step
            weight_decay=0.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,  # no clipping: grid B must see the raw vanilla step
            per_device_train_batch_size=TRAINING["batch_size"],
            num_train_epochs=spec.epochs,
            seed=spec.seed,
            logging_strategy="epoch",
            logging_nan_inf_filter=False,  # the default filter would hide exactly the divergence grid B looks for
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            log_level="error",  # also hf_ewc's: its overshoot warning is grid B's expected outcome (see coef_max)
        )
        for k, (train, _) in enumerate(_tasks):
            trainer = EWCTrainer(
                model=model, args=args, train_dataset=train, ewc_state=state, optimizers=(optimizer, None)
            )
            trainer.remove_callback(transformers.PrinterCallback)
            trainer.train()
            logs = [entry for entry in trainer.state.log_history if "loss" in entry]
            losses.append(logs[-1]["loss"])
            coef_max += [entry["ewc/coef_max"] for entry in logs if "ewc/coef_max" in entry]
            matrix.append([_accuracy(model, test) for _, test in _tasks])  # every task, after task k
            mean_accuracy.append(float(np.mean(matrix[-1][: k + 1])))
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                # A diverged model has no meaningful importances (consolidate() rightly refuses NaN): stop here.
                diverged_in = k
                break
            if k < NUM_TASKS - 1:  # the last task's importances would protect nothing
                state = trainer.consolidate(domain=f"task{k}")
                omega_max = state.max_importance()
    accuracies = [_accuracy(model, test) for _, test in _tasks]
    return {
        **asdict(spec),
        "accuracy": float(np.mean(accuracies)),
        "task_accuracies": accuracies,
        "mean_accuracy_after_task": mean_accuracy,
        "matrix": matrix,
        "final_loss": losses[-1],
        "task_final_losses": losses,
        "coef_max": max(coef_max, default=None),
        "omega_max": omega_max,
        "eta_lambda_omega_max": spec.learning_rate * spec.lam * omega_max,
        "finite": diverged_in is None,
        "diverged_in_task": diverged_in,  # 0-based; the sequence stops there
        "seconds": time.perf_counter() - start,
    }


def build_specs(quick: bool, seeds: int, epochs: int) -> list[RunSpec]:
    def adam(policy, mode, method, lam, seed):
        return RunSpec(policy, ADAM[policy], ADAM["learning_rate"], mode, method, lam, seed, epochs, grid="A")

    def sgd(mode, lam):
        return RunSpec("fresh", SGD["optim"], SGD["learning_rate"], mode, "fisher", lam, 0, epochs, grid="B")

    def pick(lambdas):
        return lambdas[1:3] if quick else lambdas

    specs = []
    for policy in POLICIES:
        specs += [adam(policy, "off", "fisher", 0.0, seed) for seed in range(seeds)]
        for mode, method, seed in itertools.product(MODES, METHODS, range(seeds)):
            grid = ADAM_LAMBDAS[policy]["proximal" if mode == "proximal" else "penalty"][method]
            specs += [adam(policy, mode, method, float(lam), seed) for lam in pick(grid)]
    sgd_lambdas = SGD_LAMBDAS[::3] if quick else SGD_LAMBDAS
    specs.append(sgd("off", 0.0))
    specs += [sgd(mode, lam) for mode, lam in itertools.product(MODES, sgd_lambdas)]
    return specs


def _run_order(run: dict) -> tuple:
    """Grid, policy, mode (naive first), importance method, λ and seed: the order of the JSON and of every table."""
    mode = MODES.index(run["mode"]) if run["mode"] in MODES else -1
    return run["grid"], POLICIES.index(run["optimizer"]), mode, METHODS.index(run["method"]), run["lam"], run["seed"]


def _std(values: list[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def summarize(runs: list[dict]) -> dict:
    """Grid A per (policy, mode, method, λ) cell, with naive and best λ per (policy, mode, method); grid B per run
    with its explosion verdict.

    ``runs`` must be in `_run_order`, which the cells and rows inherit.
    """
    cells = {}
    for run in runs:
        if run["grid"] == "A":
            cells.setdefault((run["optimizer"], run["mode"], run["method"], run["lam"]), []).append(run["accuracy"])
    grid_a = [
        {"optimizer": policy, "mode": mode, "method": method, "lam": lam}
        | {"mean": float(np.mean(v)), "std": _std(v), "n": len(v)}
        for (policy, mode, method, lam), v in cells.items()
    ]
    best = {}
    for cell in grid_a:
        key = (cell["optimizer"], cell["mode"], cell["method"])
        if cell["mode"] != "off" and (key not in best or cell["mean"] > best[key]["mean"]):
            best[key] = cell
    by_cell = {(c["optimizer"], c["mode"], c["method"], c["lam"]): c["mean"] for c in grid_a}
    gaps = {policy: [] for policy in POLICIES}
    for (policy, mode, method, lam), mean in by_cell.items():
        stabilized = by_cell.get((policy, "stabilized", method, lam))
        if mode == "vanilla" and stabilized is not None:
            gaps[policy].append(abs(mean - stabilized))

    sgd_naive = next(r for r in runs if r["grid"] == "B" and r["mode"] == "off")
    threshold = EXPLOSION_FACTOR * sgd_naive["final_loss"]
    grid_b = []
    for run in sorted((r for r in runs if r["grid"] == "B" and r["mode"] != "off"), key=lambda r: r["lam"]):
        keys = ("mode", "lam", "accuracy", "final_loss", "coef_max", "eta_lambda_omega_max", "diverged_in_task")
        exploded = not (run["finite"] and math.isfinite(run["final_loss"]) and run["final_loss"] <= threshold)
        grid_b.append({key: run[key] for key in keys} | {"exploded": exploded})
    return {
        "grid_a": grid_a,
        "naive": {cell["optimizer"]: cell for cell in grid_a if cell["mode"] == "off"},
        "best": list(best.values()),  # grid_a's order: by policy, mode, then method
        "vanilla_vs_stabilized_max_gap": {policy: max(values, default=None) for policy, values in gaps.items()},
        "sgd_naive": {key: sgd_naive[key] for key in ("accuracy", "final_loss")},
        "explosion_threshold_loss": threshold,
        "grid_b": grid_b,
    }


def _accuracy_cell(cell: dict) -> str:
    spread = f" ± {cell['std']:.3f}" if cell["std"] is not None else ""
    return f"{cell['mean']:.3f}{spread} (n={cell['n']})"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _best_by_policy(summary: dict) -> dict[tuple[str, str, str], dict]:
    return {(c["optimizer"], c["mode"], c["method"]): c for c in summary["best"]}


def _adam_outcome(summary: dict, policy: str) -> str:
    """Naive, best EWC, best proximal and the vanilla/stabilized gap of one policy, as one clause."""
    cells = [c for c in summary["best"] if c["optimizer"] == policy]
    best = max(cells, key=lambda c: c["mean"])
    best_proximal = max((c for c in cells if c["mode"] == "proximal"), key=lambda c: c["mean"])
    return (
        f"naive {summary['naive'][policy]['mean']:.3f}; best EWC {best['mean']:.3f} ({best['mode']}/{best['method']}, "
        f"λ = {best['lam']:g}); best proximal {best_proximal['mean']:.3f} ({best_proximal['method']}, "
        f"λ = {best_proximal['lam']:g}); largest |vanilla − stabilized| gap at equal λ "
        f"{_number(summary['vanilla_vs_stabilized_max_gap'][policy])}"
    )


def expected_vs_got(summary: dict) -> str:
    """The "expected vs got" paragraph, written from the numbers so that it cannot disagree with the tables."""
    low, high = EXPECTED["best_ewc"]
    best = {policy: max(c["mean"] for c in summary["best"] if c["optimizer"] == policy) for policy in POLICIES}
    naive = {policy: summary["naive"][policy]["mean"] for policy in POLICIES}
    by_policy = _best_by_policy(summary)
    differences = [
        by_policy[("persistent", mode, method)]["mean"] - by_policy[("fresh", mode, method)]["mean"]
        for mode, method in itertools.product(MODES, METHODS)
    ]
    vanilla = [row for row in summary["grid_b"] if row["mode"] == "vanilla"]
    exploded = [row for row in vanilla if row["exploded"]]
    others_exploded = sum(row["exploded"] for row in summary["grid_b"] if row["mode"] != "vanilla")
    expected = (
        f"Expected (methods.md §11 pilot, one Adam kept across tasks as in the reference code): naive ≈ "
        f"{EXPECTED['naive']:.2f}, best EWC ≈ {low:.2f}–{high:.2f}, vanilla ≈ stabilized under Adam (within "
        f"±{EXPECTED['vanilla_vs_stabilized_adam']}); under SGD vanilla diverges once η·λ·Ω_max passes ~2 while "
        "stabilized and proximal stay finite."
    )
    persistent = (
        f"Got with one persistent Adam (the paper's setup): {_adam_outcome(summary, 'persistent')}; the best EWC is "
        f"{'inside' if low <= best['persistent'] <= high else 'outside'} the expected range."
    )
    fresh = (
        "Got with a fresh Adam per task (the usual Hugging Face setup, each `EWCTrainer` building its own): "
        f"{_adam_outcome(summary, 'fresh')}. Measured difference, persistent − fresh: naive "
        f"{naive['persistent'] - naive['fresh']:+.3f}, best EWC {best['persistent'] - best['fresh']:+.3f}, best λ per "
        f"mode × method {min(differences):+.3f} to {max(differences):+.3f}."
    )
    if exploded:
        lambdas = ", ".join(f"{row['lam']:g}" for row in exploded)
        finite = [row["eta_lambda_omega_max"] for row in vanilla if not row["exploded"]]
        others = f"{others_exploded} stabilized/proximal run(s) exploded too" if others_exploded else "none exploded"
        sgd = (
            f"Got under SGD: vanilla exploded at λ ∈ {{{lambdas}}} (η·λ·Ω_max ≥ "
            f"{_number(min(row['eta_lambda_omega_max'] for row in exploded))}; its finite runs had at most "
            f"{_number(max(finite, default=None))}); of the stabilized and proximal runs, {others}."
        )
    else:
        sgd = "Got under SGD: vanilla never exploded in the sweep (unexpected)."
    return f"{expected} {persistent} {fresh} {sgd}"


def write_markdown(report: dict, path: Path) -> None:
    settings, summary = report["settings"], report["summary"]
    training = settings["training"]
    setup = (
        f"Data: `sklearn.datasets.load_digits`, pixels / 16, stratified {1 - TEST_SIZE:.0%}/{TEST_SIZE:.0%} split "
        f"({settings['train_samples']} train / {settings['test_samples']} test), {NUM_TASKS} tasks = identity + "
        f"{NUM_TASKS - 1} pixel permutations (seed {DATA_SEED}). Model: MLP 64-100-100-10, leaky ReLU. Per task: a "
        f"new `EWCTrainer`, batch {training['batch_size']}, {training['epochs']} epochs, constant lr, no gradient "
        f"clipping, then `consolidate()` on {training['importance_max_samples']} training samples (SI: the training "
        "trajectory). Accuracy = mean test accuracy over all tasks after the last one. λ convention: penalty "
        "c·(θ−θ*)² with vanilla c = ½λΩ, stabilized c = ½λΩ/(1+ηλΩ), proximal θ ← θ* + (θ−θ*)/(1+ηλΩ)."
    )
    policies = (
        f"Optimizer policies of grid A (Adam, lr {ADAM['learning_rate']:g}, no weight decay): **persistent** — one "
        "`torch.optim.Adam` created with the model and handed to every task's trainer as "
        "`optimizers=(adam, None)`, so its moments and step count carry over from task to task (the paper's "
        "reference code and the methods.md pilot); **fresh** — every task's trainer builds its own "
        '(`optim="adamw_torch"`, weight_decay 0), the usual Hugging Face setup.'
    )
    command = (
        f"Command: `{report['command']}` — wall time {report['wall_time_s']:.0f} s with {settings['workers']} worker "
        f"process(es) on {report['machine']['cpu_count']} CPU core(s); {len(settings['seeds_grid_a'])} seed(s) per "
        "grid-A cell."
    )
    sgd_note = (
        f"Naive SGD: accuracy {summary['sgd_naive']['accuracy']:.3f}, final training loss "
        f"{summary['sgd_naive']['final_loss']:.3g}. A run *exploded* when its weights went non-finite (the sequence "
        f"then stops) or its final training loss (task loss + penalty, last epoch) exceeds {EXPLOSION_FACTOR:g}× the "
        f"naive one ({summary['explosion_threshold_loss']:.3g}). `coef_max` is the largest logged `ewc/coef_max` "
        "(η·2c; the pull w = ηλΩ/(1+ηλΩ) for proximal); η·λ·Ω_max uses the largest importance of the last "
        "consolidation."
    )
    by_policy = _best_by_policy(summary)
    naive = " | ".join(f"— | {_accuracy_cell(summary['naive'][policy])}" for policy in POLICIES)
    lines = [
        "# Permuted digits: EWC variants through `hf_ewc.EWCTrainer`",
        "",
        command,
        "",
        setup,
        "",
        f"## Grid A — Adam (lr {ADAM['learning_rate']:g}), seeds {settings['seeds_grid_a']}",
        "",
        policies,
        "",
        "### Best λ per mode × importance method",
        "",
        "| mode | importance | persistent: best λ | persistent: accuracy | fresh: best λ | fresh: accuracy |",
        "|---|---|---|---|---|---|",
        f"| off (naive fine-tuning) | — | {naive} |",
    ]
    for method, mode in itertools.product(METHODS, MODES):
        row = " | ".join(
            f"{c['lam']:g} | {_accuracy_cell(c)}" for c in (by_policy[(policy, mode, method)] for policy in POLICIES)
        )
        lines.append(f"| {mode} | {method} | {row} |")
    lines += [
        "",
        "### Every cell",
        "",
        "| optimizer | mode | importance | λ | accuracy (mean ± std) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['optimizer']} | {c['mode']} | {c['method'] if c['mode'] != 'off' else '—'} | {c['lam']:g} | "
        f"{_accuracy_cell(c)} |"
        for c in summary["grid_a"]
    ]
    lines += [
        "",
        f"## Grid B — SGD (lr {SGD['learning_rate']:g}), empirical Fisher, seed 0, a new trainer per task",
        "",
        sgd_note,
        "",
        "| λ | mode | outcome | final loss | max coef_max | η·λ·Ω_max | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["grid_b"]:
        if row["exploded"]:
            task = row["diverged_in_task"]
            outcome = "**exploded**" + (f" (non-finite in task {task + 1}/{NUM_TASKS})" if task is not None else "")
        else:
            outcome = "finite"
        lines.append(
            f"| {row['lam']:g} | {row['mode']} | {outcome} | {_number(row['final_loss'])} | "
            f"{_number(row['coef_max'])} | {_number(row['eta_lambda_omega_max'])} | {row['accuracy']:.3f} |"
        )
    lines += ["", "## Expected vs got", "", expected_vs_got(summary), ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot(summary: dict, path: Path) -> None:
    import matplotlib  # imported here so that the worker processes never load it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    styles = {"vanilla": "-", "stabilized": "--", "proximal": ":"}
    titles = {"persistent": "one Adam for all tasks (paper)", "fresh": "fresh Adam per task (HF default)"}
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    axes[1].sharex(axes[0])  # the policies' λ grids differ: common axes keep the two panels comparable
    axes[1].sharey(axes[0])
    for ax, policy in zip(axes, POLICIES):
        for mode, method in itertools.product(MODES, METHODS):
            cells = [
                c for c in summary["grid_a"] if c["optimizer"] == policy and (c["mode"], c["method"]) == (mode, method)
            ]
            ax.errorbar(
                [c["lam"] for c in cells],
                [c["mean"] for c in cells],
                yerr=[c["std"] or 0.0 for c in cells],
                color=colors[method],
                linestyle=styles[mode],
                marker="o",
                markersize=3,
                capsize=2,
                label=f"{mode} / {method}",
            )
        ax.axhline(summary["naive"][policy]["mean"], color="gray", linestyle="-.", label="naive fine-tuning")
        ax.set(
            xscale="log",
            xlabel="λ",
            ylabel="mean test accuracy, 5 tasks",
            title=f"Grid A: Adam lr {ADAM['learning_rate']:g}, {titles[policy]}",
        )
    axes[0].legend(fontsize=7, ncol=2)  # the same lines in both Adam panels

    right = axes[2]
    for mode in MODES:
        rows = [row for row in summary["grid_b"] if row["mode"] == mode]
        line = right.plot(
            [r["lam"] for r in rows], [r["accuracy"] for r in rows], styles[mode], marker="o", label=mode
        )
        exploded = [r for r in rows if r["exploded"]]
        right.scatter(
            [r["lam"] for r in exploded],
            [r["accuracy"] for r in exploded],
            marker="X",
            s=120,
            color=line[0].get_color(),
        )
    right.axhline(summary["sgd_naive"]["accuracy"], color="gray", linestyle="-.", label="naive fine-tuning")
    right.scatter([], [], marker="X", s=120, color="black", label="exploded (NaN or loss blow-up)")
    right.set(
        xscale="log",
        xlabel="λ",
        ylabel="mean test accuracy, 5 tasks",
        title=f"Grid B: SGD lr {SGD['learning_rate']:g}, empirical Fisher",
    )
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_safe(value):
    """Non-finite floats as strings ("nan", "inf"), so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 2 epochs, 1 seed, 2 λ per cell, 3 SGD λ (under a minute)"
    )
    parser.add_argument("--seeds", type=int, help="seeds per grid-A cell (default: 3, or 1 with --quick)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    parser.add_argument("--workers", type=int, default=2, help="parallel worker processes (default: 2)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    start = time.perf_counter()
    seeds = args.seeds or (1 if args.quick else 3)
    epochs = 2 if args.quick else TRAINING["epochs"]
    specs = build_specs(args.quick, seeds, epochs)
    print(f"{len(specs)} runs on {args.workers} worker(s)...", flush=True)
    # spawn: forking a process that has imported torch can deadlock its thread pools
    runs = []
    with multiprocessing.get_context("spawn").Pool(args.workers, initializer=_init_worker) as pool:
        for run in pool.imap_unordered(run_sequence, specs):
            runs.append(run)
            print(
                f"[{len(runs):3d}/{len(specs)}] {run['grid']} {run['optimizer']:10s} {run['mode']:10s} "
                f"{run['method']:6s} λ={run['lam']:<8g} seed={run['seed']} acc={run['accuracy']:.3f} "
                f"({run['seconds']:.1f} s)",
                flush=True,
            )
        # Let the workers exit on their own: the terminate() that ends the with-block leaks their semaphores.
        pool.close()
        pool.join()
    runs.sort(key=_run_order)
    train, test = make_tasks()[0]
    report = {
        "command": " ".join(["python", "benchmarks/permuted_digits.py", *argv]),
        "settings": {
            "quick": args.quick,
            "seeds_grid_a": list(range(seeds)),
            "seed_grid_b": 0,
            "workers": args.workers,
            "num_tasks": NUM_TASKS,
            "data_seed": DATA_SEED,
            "train_samples": len(train),
            "test_samples": len(test),
            "training": TRAINING | {"epochs": epochs, "lr_scheduler_type": "constant", "max_grad_norm": 0.0},
            "adam": ADAM | {"weight_decay": 0.0},
            "sgd": SGD,
            "adam_lambdas": ADAM_LAMBDAS,
            "sgd_lambdas": SGD_LAMBDAS,
            "explosion_factor": EXPLOSION_FACTOR,
            "expected": EXPECTED,
        },
        "versions": versions()
        | {
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
            "matplotlib": importlib.metadata.version("matplotlib"),
            "python": platform.python_version(),
        },
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "summary": summarize(runs),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "permuted_digits_quick" if args.quick else "permuted_digits"
    plot(report["summary"], args.out / f"{stem}.png")
    report["wall_time_s"] = time.perf_counter() - start
    write_markdown(report, args.out / f"{stem}.md")
    with open(args.out / f"{stem}.json", "w", encoding="utf-8") as f:
        json.dump(_json_safe(report), f, indent=2, allow_nan=False)
        f.write("\n")
    print(expected_vs_got(report["summary"]))
    print(f"Wall time {report['wall_time_s']:.0f} s; results in {args.out}/{stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
