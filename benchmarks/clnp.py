"""CLNP on permuted digits, task-incremental: CLNP vs stabilized EWC vs naive fine-tuning.

    python benchmarks/clnp.py            # ≈ 3 min on 2 CPU cores
    python benchmarks/clnp.py --quick    # smoke test (writes clnp_quick.*)
    python benchmarks/clnp.py --lm       # the default LM sequence: CLNP vs EWC vs naive, ≈ 6 min (writes clnp_lm.*)

The permuted-digits sequence of ``permuted_digits.py`` (5 tasks, MLP 64-100-100-10 leaky ReLU, a fresh Adam per task,
10 epochs). CLNP (`hf_ewc.clnp`) trains each task on the free units only and, after it, keeps the units above the
largest activity threshold within ``margin`` of the task's loss (measured on a 10 % validation split of its training
data); at test time task t runs with its mask (``clnp.domain(t)``: units of later tasks and free units off). Naive and
EWC use the one shared network. Reported: the accuracy on every task after the last, whether every old task's test
logits stayed bit-identical from the moment it was consolidated to the end, and the free units per layer after each
task. The paper leaves open whether its L1 acts on activations or on weights: both are run (and none).

``--lm`` runs `hf-ewc train`'s embedded default sequence (python_docs → python_code → man_pages, a 2-block Llama built
from config) three ways through the pipeline: stabilized EWC as shipped (its `baseline: naive` run gives naive
fine-tuning), and ``ewc_mode: clnp`` with L1 on activations and on weights. Reported: every run's loss matrix, whether
the old domains' losses stayed exactly the same under their units, the gain on each new domain ("learned"), the
forgetting without a domain id, and the units left free per layer.
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import json
import multiprocessing
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import permuted_digits
import torch
import transformers
from permuted_digits import NUM_TASKS, TRAINING, DigitsMLP, _json_safe
from torch.utils.data import Subset

from hf_ewc import EWCConfig, EWCTrainer, HfEwcError
from hf_ewc.clnp import CLNP
from hf_ewc.pipeline import build_run_config, default_config_path, run_pipeline
from hf_ewc.pipeline.config_io import read_yaml
from hf_ewc.plots import plot_units
from hf_ewc.utils import versions


MARGINS = [0.3, 0.6]  # nats of validation loss a task may lose to free units (scanned from 0.05 to 1 before)
L1 = [(0.0, "activations"), (0.01, "activations"), (0.03, "activations"), (0.003, "weights")]
EWC_LAMBDAS = [0.03, 0.1, 0.3, 1.0]


@torch.no_grad()
def _logits(model, dataset) -> torch.Tensor:
    model.eval()
    return model(dataset.pixels)["logits"]


def run(spec: dict) -> dict:
    start = time.perf_counter()
    transformers.set_seed(spec["seed"])
    model = DigitsMLP()
    clnp = (
        CLNP(model, l1=spec["l1"], l1_target=spec["l1_target"], margin=spec["margin"], seed=spec["seed"])
        if spec["method"] == "clnp" else None
    )  # fmt: skip
    state, logits_at_consolidation, free, failed = None, {}, [], None
    with tempfile.TemporaryDirectory() as out:
        args = EWCConfig(
            output_dir=out, ewc_mode="stabilized" if spec["method"] == "ewc" else "off", ewc_lambda=spec["lam"],
            importance_max_samples=TRAINING["importance_max_samples"], optim="adamw_torch", learning_rate=1e-3,
            weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0, per_device_train_batch_size=32,
            num_train_epochs=spec["epochs"], seed=spec["seed"], logging_strategy="no", save_strategy="no",
            report_to="none", use_cpu=True, disable_tqdm=True, log_level="error",
        )  # fmt: skip
        for t, (train, test) in enumerate(permuted_digits._tasks):
            split = int(len(train) * 0.9)
            fit, held = Subset(train, range(split)), Subset(train, range(split, len(train)))
            callbacks = [clnp.callback()] if clnp is not None else None
            trainer = EWCTrainer(model=model, args=args, train_dataset=fit, ewc_state=state, callbacks=callbacks)
            trainer.remove_callback(transformers.PrinterCallback)
            try:
                trainer.train()
            except HfEwcError as err:  # CLNP out of capacity
                failed = f"task {t}: {err}"
                break
            if clnp is not None:
                pixels = torch.stack([held[i]["pixel_values"] for i in range(len(held))])
                labels = torch.stack([held[i]["labels"] for i in range(len(held))])
                batches = [{"pixel_values": pixels[i : i + 64], "labels": labels[i : i + 64]}
                           for i in range(0, len(labels), 64)]  # fmt: skip
                clnp.consolidate(batches, domain=f"task{t}")
                free.append(clnp.free_units())
                with clnp.domain(t):
                    logits_at_consolidation[t] = _logits(model, test).clone()
            elif t < NUM_TASKS - 1:
                state = trainer.consolidate(dataset=fit, domain=f"task{t}")
    accuracies, identical = [], []
    for t, (_, test) in enumerate(permuted_digits._tasks):
        if failed is not None:
            accuracies.append(float("nan"))
            continue
        context = clnp.domain(t) if clnp is not None else torch.no_grad()
        with context:
            logits = _logits(model, test)
        accuracies.append(float((logits.argmax(-1) == test.labels).float().mean()))
        if clnp is not None:
            identical.append(bool(torch.equal(logits, logits_at_consolidation[t])))
    return {**spec, "accuracies": accuracies, "accuracy": float(np.mean(accuracies)), "identical": identical,
            "free_units": free, "failed": failed, "seconds": time.perf_counter() - start}  # fmt: skip


LM_RUNS = {  # name → changes to the embedded default
    "ewc": {},
    "clnp_activations": {"ewc_mode": "clnp", "baseline": None, "clnp_l1_target": "activations", "clnp_l1": 0.03},
    "clnp_weights": {"ewc_mode": "clnp", "baseline": None, "clnp_l1_target": "weights", "clnp_l1": 0.003},
}


def lm(args, argv: list[str]) -> None:
    start = time.perf_counter()
    raw = read_yaml(default_config_path())
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, changes in LM_RUNS.items():
            t0 = time.perf_counter()
            config = {k: v for k, v in {**raw, **changes, "output_dir": f"{tmp}/{name}"}.items() if v is not None}
            results = run_pipeline(build_run_config(config, source=str(default_config_path())), print_fn=None)
            runs[name] = {"results": results, "seconds": time.perf_counter() - t0}
            print(f"{name}: {results['matrix']['loss']} ({runs[name]['seconds']:.0f} s)", flush=True)
    names = runs["ewc"]["results"]["domains"]
    naive = runs["ewc"]["results"]["baseline"]["matrix"]
    rows = {"naive": naive, **{n: r["results"]["matrix"]["loss"] for n, r in runs.items()}}
    initial = runs["ewc"]["results"]["initial"]["loss"]
    lines = [
        "# CLNP on the default LM sequence (`python benchmarks/clnp.py --lm`)",
        "",
        f"`hf-ewc train`'s embedded default ({' → '.join(names)}), eval loss (nats/token) after each domain; "
        "CLNP evaluates each domain under its own units (task-incremental). Initial: "
        + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, initial))
        + ".",
        "",
        "| run | " + " | ".join(f"after {n}" for n in names) + " | final mean | old losses unchanged | time |",
        "|---|" + "---|" * len(names) + "---:|---|---:|",
    ]
    summary = {}
    for run, matrix in rows.items():
        unchanged = all(matrix[i][j] == matrix[j][j] for j in range(len(names)) for i in range(j, len(names)))
        learned = [initial[0] - matrix[0][0]] + [matrix[i - 1][i] - matrix[i][i] for i in range(1, len(names))]
        summary[run] = {"matrix": matrix, "final_mean": float(np.mean(matrix[-1])), "unchanged": unchanged,
                        "learned": learned}  # fmt: skip
        cells = " | ".join(" / ".join(f"{v:.3f}" for v in row) for row in matrix)
        seconds = f"{runs[run]['seconds']:.0f} s" if run in runs else "(in ewc's)"
        lines.append(f"| {run} | {cells} | {np.mean(matrix[-1]):.3f} | {'yes' if unchanged else 'no'} | {seconds} |")
    lines += ["", "Gain on each new domain from training on it (loss before − after; higher is better):", "",
              "| run | " + " | ".join(names[1:]) + " |", "|---|" + "---:|" * (len(names) - 1)]  # fmt: skip
    for run, s in summary.items():
        lines.append(f"| {run} | " + " | ".join(f"{v:.3f}" for v in s["learned"][1:]) + " |")
    for run in ("clnp_activations", "clnp_weights"):
        clnp = runs[run]["results"]["clnp"]
        last = clnp["units"][-1]["layers"]
        summary[run]["units"] = clnp["units"]
        summary[run]["drop_without_domain_id"] = clnp["drop_without_domain_id"]
        lines += [
            "",
            f"**{run}** — units after the last domain (free of total): "
            + ", ".join(f"{n.removeprefix('model.')} {c['free']}/{c['total']}" for n, c in last.items())
            + "; units taken per domain: "
            + "; ".join(
                f"{u['domain']} " + "/".join(str(c["active"]) for c in u["layers"].values()) for u in clnp["units"]
            )
            + ". Without a domain id, the old domains' loss is worse by "
            + ", ".join(f"{n} {v:+.3f}" for n, v in clnp["drop_without_domain_id"].items())
            + ".",
        ]
    markdown = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    best = min(("clnp_activations", "clnp_weights"), key=lambda r: summary[r]["final_mean"])
    plot_units(summary[best]["units"], args.out / "clnp_lm.png",
               title=f"CLNP on the default LM sequence ({best}): units per layer after each domain")  # fmt: skip
    (args.out / "clnp_lm.md").write_text(markdown, encoding="utf-8")
    report = {"command": " ".join(["python", "benchmarks/clnp.py", *argv]), "versions": versions()
              | {"python": platform.python_version()}, "wall_time_s": time.perf_counter() - start,
              "domains": names, "initial": initial, "summary": summary,
              "configs": {n: {**raw, **c} for n, c in LM_RUNS.items()}}  # fmt: skip
    with open(args.out / "clnp_lm.json", "w", encoding="utf-8") as f:
        json.dump(_json_safe(report), f, indent=2, allow_nan=False)
        f.write("\n")
    print(markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 epochs, 1 seed, one CLNP setting")
    parser.add_argument("--lm", action="store_true", help="the default LM sequence instead of permuted digits")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--workers", type=int, default=2)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.lm:
        return lm(args, argv)
    start = time.perf_counter()
    seeds = range(1 if args.quick else 3)
    epochs = 2 if args.quick else TRAINING["epochs"]
    base = {"epochs": epochs, "lam": 0.0, "margin": None, "l1": 0.0, "l1_target": None}
    specs = [{**base, "method": "naive", "seed": s} for s in seeds]
    specs += [{**base, "method": "ewc", "lam": lam, "seed": s} for lam in EWC_LAMBDAS for s in seeds]
    for margin in MARGINS[1:2] if args.quick else MARGINS:
        for l1, target in L1:
            specs += [{**base, "method": "clnp", "margin": margin, "l1": l1, "l1_target": target, "seed": s}
                      for s in seeds]  # fmt: skip
    print(f"{len(specs)} runs on {args.workers} worker(s)...", flush=True)
    runs = []  # each worker builds permuted_digits._tasks once (its _init_worker)
    with multiprocessing.get_context("spawn").Pool(
        args.workers, initializer=permuted_digits._init_worker
    ) as pool:  # sets its _tasks
        for r in pool.imap_unordered(run, specs):
            runs.append(r)
            print(f"[{len(runs)}/{len(specs)}] {r['method']} λ={r['lam']} margin={r['margin']} l1={r['l1']} "
                  f"{r['l1_target']} seed={r['seed']} acc={r['accuracy']:.3f} identical={r['identical']} "
                  f"({r['seconds']:.1f} s){' ' + r['failed'] if r['failed'] else ''}", flush=True)  # fmt: skip
        pool.close()
        pool.join()
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault((r["method"], r["lam"], r["margin"], r["l1"], r["l1_target"]), []).append(r)
    header = (
        "| method | setting | mean accuracy after 5 tasks | accuracy per task (mean) | old outputs bit-identical "
        "| free units per layer after each task (seed 0) |"
    )
    rows = [header, "|---|---|---|---|---|---|"]
    summary = []
    for key, group in sorted(cells.items(), key=lambda kv: str(kv[0])):
        method, lam, margin, l1, target = key
        acc = [g["accuracy"] for g in group]
        finished_runs = [g["accuracies"] for g in group if not g["failed"]]
        per_task = np.mean(finished_runs, axis=0) if finished_runs else [float("nan")] * NUM_TASKS
        setting = {"naive": "—", "ewc": f"λ = {lam:g}"}.get(method) or f"margin {margin:g}, L1 {l1:g} on {target}"
        finished = [g for g in group if not g["failed"]]
        identical = "—" if method != "clnp" or not finished else ("yes" if all(all(g["identical"]) for g in finished)
                                                                  else "NO")  # fmt: skip
        seed0 = next((g for g in group if g["seed"] == 0), group[0])
        free = " → ".join("/".join(map(str, f)) for f in seed0["free_units"]) if method == "clnp" else "—"
        failed = sum(1 for g in group if g["failed"])
        mean = float(np.nanmean(acc)) if failed < len(group) else float("nan")
        note = f" ({failed} of {len(group)} ran out of units)" if failed else ""
        rows.append(f"| {method} | {setting} | {mean:.3f}{note} | {' / '.join(f'{x:.2f}' for x in per_task)} | "
                    f"{identical} | {free} |")  # fmt: skip
        summary.append({"method": method, "setting": setting, "accuracy": mean, "per_task": list(per_task),
                        "identical": identical, "failed": failed,
                        "free_units_seed0": seed0["free_units"]})  # fmt: skip
    best = {m: max((s for s in summary if s["method"] == m and s["accuracy"] == s["accuracy"]),
                   key=lambda s: s["accuracy"], default=None) for m in ("naive", "ewc", "clnp")}  # fmt: skip
    lines = [
        "# CLNP on permuted digits (`python benchmarks/clnp.py`)",
        "",
        (
            f"5 tasks, task-incremental for CLNP (task t evaluated with its mask), {len(seeds)} seed(s), {epochs} "
            "epochs per task, a fresh Adam (lr 1e-3) per task; CLNP thresholds on a 10 % validation split of each "
            "task's data."
        ),
        "",
        *rows,
        "",
        "Best of each: " + "; ".join(f"{m} {b['accuracy']:.3f} ({b['setting']})" for m, b in best.items() if b) + ".",
    ]
    markdown = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "clnp_quick" if args.quick else "clnp"
    from matplotlib.figure import Figure  # heavy: only here

    fig = Figure(figsize=(7, 3.8), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    clnp_best = best["clnp"]
    if clnp_best is not None:
        free = np.array(clnp_best["free_units_seed0"])
        for layer in range(free.shape[1]):
            used = 100 - free[:, layer]
            ax.bar(np.arange(len(used)) + 0.4 * layer, used, 0.4, label=f"hidden layer {layer + 1}: units in use")
        ax.set_xticks(np.arange(len(free)) + 0.2, [f"after task {t + 1}" for t in range(len(free))])
        ax.set_ylabel("units owned by a task (of 100)")
        ax.set_title(f"CLNP allocation ({clnp_best['setting']}, seed 0)")
        ax.legend(fontsize=8)
    fig.savefig(args.out / f"{stem}.png")
    (args.out / f"{stem}.md").write_text(markdown, encoding="utf-8")
    report = {"command": " ".join(["python", "benchmarks/clnp.py", *argv]), "versions": versions()
              | {"python": platform.python_version()}, "wall_time_s": time.perf_counter() - start,
              "summary": summary, "runs": runs}  # fmt: skip
    with open(args.out / f"{stem}.json", "w", encoding="utf-8") as f:
        json.dump(_json_safe(report), f, indent=2, allow_nan=False)
        f.write("\n")
    print(markdown)


if __name__ == "__main__":
    main()
