"""The seed papers' other claims, reproduced through hf_ewc's own machinery (issue 14): one sub-command per claim.

Run from the repository root (needs the ``bench`` extra: scikit-learn and matplotlib):

    python benchmarks/seed_methods.py correlations   # (d) importance methods agree? digits MLP and the default LM
    python benchmarks/seed_methods.py wva            # (e) WVA: deltas vs gradients under Adam, hyperbolic vs exp
    python benchmarks/seed_methods.py si_bias        # (f) SI relies on its bias: SIB ≥ SI > SIU; SOS(α=1) at batch 256
    python benchmarks/seed_methods.py signal_bias    # Kutalev's post-activation rule for biases vs |b|
    python benchmarks/seed_methods.py wva --quick    # any of them as a smoke test (writes *_quick.* files)

Every sequence is the permuted-digits task of ``permuted_digits.py`` (scikit-learn's 8×8 digits, 5 tasks = identity +
4 fixed pixel permutations, MLP 64-100-100-10 leaky ReLU, 10 epochs per task, importances on 300 training samples of
the task just learned) trained through `EWCTrainer`, with the library's default mean-normalized importances, so the λ
values here are hf_ewc's (relative to an L2 pull of the same mass), not the papers' raw ones. Each sub-command writes
``seed_methods_<name>.json`` (settings, every run, versions), ``.md`` (tables, claim by claim) and ``.png`` into
``--out`` (default ``benchmarks/results``).

- ``correlations``: after training the first task (Adam, with SI accumulated), the per-layer Pearson and Spearman
  correlations between Fisher (exact), √Fisher (exact), absolute Fisher, MAS, MASX, SI, signal (both bias rules) and
  |w| (3 seeds, weights of each layer); then the same on the default LM (`hf-ewc train`'s embedded config, its first
  domain only, trained with importance_method: si) through `hf-ewc correlate`.
- ``wva``: a fresh Adam per task (what chaining Hugging Face trainers gives): WVA on deltas vs on gradients,
  hyperbolic vs exponential, signal importances, over a λ grid, against naive fine-tuning and stabilized EWC; the best
  λ after 2, 3, 4 and 5 tasks; plain SGD, where deltas and gradients must coincide.
- ``si_bias``: a fresh Adam per task (Benzing resets it), stabilized EWC with SI, SIU, SIB and SOS(α=0) at batch 32,
  and SI vs SOS(α=1) at batch 256 (learning rate scaled ×8, as Benzing scales it with the batch).
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import itertools
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
import yaml
from permuted_digits import NUM_TASKS, TRAINING, DigitsMLP, _accuracy, _json_safe, make_tasks

from hf_ewc import EWCConfig, EWCTrainer, collect_importance
from hf_ewc.cli import main as hf_ewc_main
from hf_ewc.importance import importance_correlations
from hf_ewc.utils import versions


ROOT = Path(__file__).resolve().parent.parent


def _args(output_dir: str, spec: dict) -> EWCConfig:
    optimizer = (
        {"optim": "sgd", "learning_rate": 0.05}
        if spec.get("optimizer") == "sgd"
        else {"optim": "adamw_torch", "learning_rate": spec.get("lr", 1e-3)}
    )
    extra = {k: spec[k] for k in ("wva_apply", "wva_attenuation", "sos_alpha", "signal_bias") if k in spec}
    return EWCConfig(
        output_dir=output_dir,
        ewc_mode=spec["mode"],
        ewc_lambda=spec["lam"],
        importance_method=spec["method"],
        importance_max_samples=TRAINING["importance_max_samples"],
        **optimizer,
        **extra,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        per_device_train_batch_size=spec.get("batch", 32),
        num_train_epochs=spec["epochs"],
        seed=spec["seed"],
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        log_level="error",
    )


def run_sequence(spec: dict) -> dict:
    """The 5 tasks in order with one EWCTrainer each (a fresh optimizer per task); the accuracy matrix."""
    start = time.perf_counter()
    transformers.set_seed(spec["seed"])
    model = DigitsMLP()
    state, matrix = None, []
    with tempfile.TemporaryDirectory() as output_dir:
        args = _args(output_dir, spec)
        for k, (train, _) in enumerate(permuted_digits._tasks):
            trainer = EWCTrainer(model=model, args=args, train_dataset=train, ewc_state=state)
            trainer.remove_callback(transformers.PrinterCallback)
            trainer.train()
            matrix.append([_accuracy(model, test) for _, test in permuted_digits._tasks])
            if k < NUM_TASKS - 1:
                state = trainer.consolidate(domain=f"task{k}")
    after = [float(np.mean(matrix[k][: k + 1])) for k in range(NUM_TASKS)]
    return {
        **spec,
        "accuracy": after[-1],
        "mean_accuracy_after_task": after,
        "matrix": matrix,
        "seconds": time.perf_counter() - start,
    }


RESULT_KEYS = ("accuracy", "mean_accuracy_after_task", "matrix", "seconds")


def _spec_key(run_or_spec: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in run_or_spec.items() if k not in RESULT_KEYS))


def run_pool(specs: list[dict], workers: int, reuse: Path | None = None) -> list[dict]:
    """Run ``specs`` on ``workers`` processes; with ``reuse`` (a JSON this script wrote) only those it lacks."""
    done: list[dict] = []
    if reuse is not None:
        wanted = {_spec_key(spec) for spec in specs}
        old = json.loads(reuse.read_text(encoding="utf-8"))["runs"]
        done = [r for r in old if _spec_key(r) in wanted]
        have = {_spec_key(r) for r in done}
        specs = [spec for spec in specs if _spec_key(spec) not in have]
    if not specs:
        return done
    print(f"{len(specs)} runs on {workers} worker(s)...", flush=True)
    runs = []
    with multiprocessing.get_context("spawn").Pool(
        workers, initializer=permuted_digits._init_worker
    ) as pool:  # sets its _tasks
        for run in pool.imap_unordered(run_sequence, specs):
            runs.append(run)
            label = " ".join(
                f"{k}={run[k]}"
                for k in (
                    "mode",
                    "method",
                    "lam",
                    "batch",
                    "wva_apply",
                    "wva_attenuation",
                    "sos_alpha",
                    "signal_bias",
                    "optimizer",
                    "seed",
                )
                if k in run
            )
            print(
                f"[{len(runs):3d}/{len(specs)}] {label} acc={run['accuracy']:.3f} ({run['seconds']:.1f} s)", flush=True
            )
        pool.close()
        pool.join()
    return done + runs


def cells(runs: list[dict], keys: tuple[str, ...]) -> dict[tuple, dict]:
    """Mean and spread over seeds of the final accuracy (and of the accuracy after each task), per ``keys``."""
    grouped: dict[tuple, list[dict]] = {}
    for run in runs:
        grouped.setdefault(tuple(run.get(k) for k in keys), []).append(run)
    out = {}
    for key, group in grouped.items():
        acc = [r["accuracy"] for r in group]
        after = np.mean([r["mean_accuracy_after_task"] for r in group], axis=0)
        out[key] = {
            "mean": float(np.mean(acc)),
            "std": float(np.std(acc, ddof=1)) if len(acc) > 1 else None,
            "seeds": len(acc),
            "after_task": [float(a) for a in after],
        }
    return out


def write(report: dict, out: Path, stem: str, markdown: str, plot, rerender: Path | None = None) -> None:
    if rerender is not None:  # the runs were made earlier: keep their command's wall time next to this one's
        old = json.loads(rerender.read_text(encoding="utf-8"))
        report["wall_time_s"] += old.get("wall_time_s", 0.0)
        report["reused_runs_from"] = old.get("command")
    out.mkdir(parents=True, exist_ok=True)
    plot(out / f"{stem}.png")
    (out / f"{stem}.md").write_text(markdown, encoding="utf-8")
    with open(out / f"{stem}.json", "w", encoding="utf-8") as f:
        json.dump(_json_safe(report), f, indent=2, allow_nan=False)
        f.write("\n")
    print(markdown)
    print(f"results in {out}/{stem}.{{json,md,png}}")


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=110, layout="constrained")


def _meta(argv: list[str], settings: dict, start: float) -> dict:
    return {
        "command": " ".join(["python", "benchmarks/seed_methods.py", *argv]),
        "settings": settings,
        "versions": versions() | {"python": platform.python_version()},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "wall_time_s": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------------------------------- (e) WVA
WVA_LAMBDAS = [0.3, 1, 3, 10, 30, 100, 300, 1000]
EWC_LAMBDAS = [0.01, 0.03, 0.1, 0.3, 1, 3, 10]


def wva(args, argv) -> None:
    start = time.perf_counter()
    seeds = range(1 if args.quick else 3)
    epochs = 2 if args.quick else TRAINING["epochs"]
    lambdas = WVA_LAMBDAS[2:5] if args.quick else WVA_LAMBDAS
    base = {"epochs": epochs, "optimizer": "adam"}
    specs = [{**base, "mode": "off", "method": "uniform", "lam": 0.0, "seed": s} for s in seeds]
    specs += [
        {**base, "mode": "stabilized", "method": "signal", "lam": float(lam), "seed": s}
        for lam in (EWC_LAMBDAS[1:3] if args.quick else EWC_LAMBDAS)
        for s in seeds
    ]
    for apply, attenuation, lam, s in itertools.product(
        ("deltas", "gradients"), ("hyperbolic", "exponential"), lambdas, seeds
    ):
        specs.append(
            {
                **base,
                "mode": "wva",
                "method": "signal",
                "lam": float(lam),
                "seed": s,
                "wva_apply": apply,
                "wva_attenuation": attenuation,
            }
        )
    sgd = {
        "epochs": epochs,
        "optimizer": "sgd",
        "mode": "wva",
        "method": "signal",
        "seed": 0,
        "wva_attenuation": "hyperbolic",
    }
    specs += [{**sgd, "lam": lam, "wva_apply": apply} for lam in (1.0, 10.0) for apply in ("deltas", "gradients")]
    runs = run_pool(specs, args.workers, args.reuse)
    adam = [r for r in runs if r["optimizer"] == "adam"]
    table = cells(adam, ("mode", "wva_apply", "wva_attenuation", "lam"))
    naive = table[("off", None, None, 0.0)]
    curves = {
        (a, t): {lam: table[("wva", a, t, float(lam))] for lam in lambdas}
        for a in ("deltas", "gradients")
        for t in ("hyperbolic", "exponential")
    }
    ewc = {k[3]: v for k, v in table.items() if k[0] == "stabilized"}

    def best(curve):
        lam = max(curve, key=lambda x: curve[x]["mean"])
        return lam, curve[lam]["mean"]

    def robustness(curve):
        """The λ range (factor) within 0.01 of the best, and the mean drop at the grid neighbours of the best."""
        lams = sorted(curve)
        lam, top = best(curve)
        near = [x for x in lams if curve[x]["mean"] >= top - 0.01]
        i = lams.index(lam)
        neighbours = [curve[lams[j]]["mean"] for j in (i - 1, i + 1) if 0 <= j < len(lams)]
        return max(near) / min(near), top - float(np.mean(neighbours))

    best_by_tasks = {}
    for key, curve in curves.items():
        best_by_tasks["/".join(key)] = [
            max(curve, key=lambda x: curve[x]["after_task"][t]) for t in range(1, NUM_TASKS)
        ]  # best λ judged after 2, 3, 4, 5 tasks
    stable = all(
        max(v) / min(v) <= 3.2 for k, v in best_by_tasks.items() if k.startswith("deltas")
    )  # the grid's step is ×3 to ×3.33
    sgd_runs = {(r["lam"], r["wva_apply"]): r["accuracy"] for r in runs if r["optimizer"] == "sgd"}
    sgd_gap = max(abs(sgd_runs[(lam, "deltas")] - sgd_runs[(lam, "gradients")]) for lam in (1.0, 10.0))
    summary = {
        "naive": naive["mean"],
        "stabilized_ewc_signal_best": dict(zip(("lam", "accuracy"), best(ewc))),
        "wva_best": {"/".join(k): dict(zip(("lam", "accuracy"), best(c))) for k, c in curves.items()},
        "wva_robustness": {
            "/".join(k): dict(zip(("factor_within_0.01", "drop_at_neighbours"), robustness(c)))
            for k, c in curves.items()
        },
        "best_lambda_after_tasks_2_to_5": best_by_tasks,
        "sgd_deltas_vs_gradients_max_accuracy_gap": sgd_gap,
        "sgd": {f"{k[1]} λ={k[0]:g}": v for k, v in sgd_runs.items()},
    }
    rows = [
        "| WVA on | attenuation | best λ | accuracy after 5 tasks | λ range within 0.01 | drop at neighbours |",
        "|---|---|---|---|---|---|",
    ]
    for key in curves:
        name = "/".join(key)
        b, r = summary["wva_best"][name], summary["wva_robustness"][name]
        rows.append(
            f"| {key[0]} | {key[1]} | {b['lam']:g} | {b['accuracy']:.3f} | ×{r['factor_within_0.01']:.3g} | "
            f"{r['drop_at_neighbours']:.3f} |"
        )
    deltas, grads = summary["wva_best"]["deltas/hyperbolic"], summary["wva_best"]["gradients/hyperbolic"]
    hyp, exp_ = summary["wva_robustness"]["deltas/hyperbolic"], summary["wva_robustness"]["deltas/exponential"]
    e = summary["stabilized_ewc_signal_best"]
    expgrad = summary["wva_best"]["gradients/exponential"]
    claims = [
        f"- **WVA works on deltas under Adam, not on gradients** (authors: 0.84 vs 0.41 after 10 MNIST tasks): deltas "
        f"{deltas['accuracy']:.3f}, gradients {grads['accuracy']:.3f}, naive {naive['mean']:.3f} → "
        + (
            "reproduced"
            if deltas["accuracy"] > naive["mean"] + 0.03 and grads["accuracy"] < deltas["accuracy"] - 0.03
            else "not reproduced"
        )
        + ".",
        f"- **Hyperbolic is more robust to λ than exponential** (authors: λ range within 0.01 of the best ×1.76 vs "
        f"×1.64 under Adam): on deltas ×{hyp['factor_within_0.01']:.3g} vs ×{exp_['factor_within_0.01']:.3g}; mean "
        f"drop at the neighbouring grid λ (×3) {hyp['drop_at_neighbours']:.3f} vs {exp_['drop_at_neighbours']:.3f} → "
        + {2: "reproduced", 1: "partly reproduced (one of the two measures)", 0: "not reproduced"}[
            int(hyp["drop_at_neighbours"] < exp_["drop_at_neighbours"])
            + int(hyp["factor_within_0.01"] > exp_["factor_within_0.01"])
        ]
        + ".",
        "- **The best λ hardly moves with the number of tasks**: best λ judged after 2, 3, 4, 5 tasks — "
        + "; ".join(f"{k}: {', '.join(f'{x:g}' for x in v)}" for k, v in best_by_tasks.items() if "deltas" in k)
        + " → "
        + (
            "reproduced (within one grid step, ×3)"
            if stable
            else "not reproduced: it drifts by more than one grid step"
        )
        + ".",
        (
            f"- Under Adam, gradient attenuation with the *exponential* rule does protect (best "
            f"{expgrad['accuracy']:.3f} at λ = {expgrad['lam']:g}). Our reading, not measured separately: exp(−λΩ) "
            "gets so small for the important weights that a·g falls near Adam's ε, where m/(√v + ε) no longer "
            "restores the step — a freeze rather than an attenuation; the hyperbolic a ≥ 1/(1 + λΩ) stays far from "
            "it and protects nothing on gradients."
        ),
        f"- Plain SGD: deltas and gradients give the same accuracy (largest gap {sgd_gap:.1e}).",
        (
            f"- Stabilized EWC with the same signal importances: best {e['accuracy']:.3f} at λ = {e['lam']:g} (WVA "
            "has no restoring force; the authors find EWC better for full retention)."
        ),
    ]
    markdown = (
        "# WVA on permuted digits (`python benchmarks/seed_methods.py wva`)\n\n"
        f"5 tasks, a fresh Adam (lr 1e-3) per task, signal importances (mean-normalized), {len(seeds)} seed(s) per "
        f"cell, {epochs} epochs per task. Mean test accuracy over the 5 tasks after the last one; naive "
        f"{naive['mean']:.3f}.\n\n" + "\n".join(rows) + "\n\n## Claims\n\n" + "\n".join(claims) + "\n"
    )

    def plot(path):
        fig = _figure((7, 4.2))
        ax = fig.add_subplot()
        for (apply, attenuation), curve in curves.items():
            lams = sorted(curve)
            ax.plot(
                lams,
                [curve[x]["mean"] for x in lams],
                marker="o",
                linestyle="-" if apply == "deltas" else "--",
                label=f"WVA {apply}, {attenuation}",
            )
        lams = sorted(ewc)
        ax.plot(lams, [ewc[x]["mean"] for x in lams], marker="s", color="black", label="stabilized EWC (signal)")
        ax.axhline(naive["mean"], color="grey", linestyle=":", label="naive")
        ax.set_xscale("log")
        ax.set_xlabel("λ (mean-normalized importances)")
        ax.set_ylabel("mean accuracy after 5 tasks")
        ax.set_title("WVA under Adam (a fresh optimizer per task)")
        ax.legend(fontsize=7)
        fig.savefig(path)

    report = _meta(
        argv,
        {
            "seeds": list(seeds),
            "epochs": epochs,
            "lambdas": lambdas,
            "ewc_lambdas": EWC_LAMBDAS,
            "adam_lr": 1e-3,
            "sgd_lr": 0.05,
            "importance": "signal",
        },
        start,
    )
    report |= {"summary": summary, "runs": runs}
    write(report, args.out, "seed_methods_wva" + ("_quick" if args.quick else ""), markdown, plot, args.reuse)


# ---------------------------------------------------------------------------------------------------- (f) SI bias
SI_LAMBDAS = [0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10]


def si_bias(args, argv) -> None:
    start = time.perf_counter()
    seeds = range(1 if args.quick else 3)
    epochs = 2 if args.quick else TRAINING["epochs"]
    lambdas = SI_LAMBDAS[1:3] if args.quick else SI_LAMBDAS
    small = {"epochs": epochs, "optimizer": "adam", "batch": 32, "lr": 1e-3}
    large = {"epochs": epochs, "optimizer": "adam", "batch": 256, "lr": 8e-3}
    specs = [{**b, "mode": "off", "method": "uniform", "lam": 0.0, "seed": s} for b in (small, large) for s in seeds]
    grid = [(small, m, a) for m, a in (("si", None), ("siu", None), ("sib", None), ("sos", 0.0))]
    grid += [(large, m, a) for m, a in (("si", None), ("sos", 1.0))]
    for base, method, alpha in grid:
        extra = {"sos_alpha": alpha} if alpha is not None else {}
        specs += [{**base, "mode": "stabilized", "method": method, "lam": float(lam), "seed": s, **extra}
                  for lam in lambdas for s in seeds]  # fmt: skip
    runs = run_pool(specs, args.workers, args.reuse)
    table = cells(runs, ("batch", "method", "sos_alpha", "lam"))

    def best(batch, method, alpha=None):
        curve = {k[3]: v for k, v in table.items() if k[:3] == (batch, method, alpha)}
        lam = max(curve, key=lambda x: curve[x]["mean"])
        return {"lam": lam, "accuracy": curve[lam]["mean"], "std": curve[lam]["std"], "curve": curve}

    results = {
        "naive@32": table[(32, "uniform", None, 0.0)]["mean"],
        "naive@256": table[(256, "uniform", None, 0.0)]["mean"],
        "si@32": best(32, "si"),
        "siu@32": best(32, "siu"),
        "sib@32": best(32, "sib"),
        "sos0@32": best(32, "sos", 0.0),
        "si@256": best(256, "si"),
        "sos1@256": best(256, "sos", 1.0),
    }
    si, siu, sib = results["si@32"]["accuracy"], results["siu@32"]["accuracy"], results["sib@32"]["accuracy"]
    si256, sos256 = results["si@256"]["accuracy"], results["sos1@256"]["accuracy"]
    rows = ["| batch | method | best λ | accuracy after 5 tasks (± std over seeds) |", "|---|---|---|---|"]
    for key, value in results.items():
        if isinstance(value, dict):
            std = f" ± {value['std']:.3f}" if value["std"] is not None else ""
            rows.append(
                f"| {key.split('@')[1]} | {key.split('@')[0]} | {value['lam']:g} | {value['accuracy']:.3f}{std} |"
            )
        else:
            rows.append(f"| {key.split('@')[1]} | naive | — | {value:.3f} |")
    claims = [
        f'- **SIB ≥ SI > SIU** (Benzing: "SI relies on its bias"): SIB {sib:.3f}, SI {si:.3f}, SIU {siu:.3f} → '
        + ("reproduced" if sib >= si - 0.005 and si > siu else "not reproduced")
        + ".",
        f"- **SOS(α=1) keeps SI-level accuracy at a large batch where SI degrades**: SI {si:.3f} at batch 32 → "
        f"{si256:.3f} at batch 256; SOS(α=1) {sos256:.3f} at batch 256 → "
        + ("reproduced" if si256 < si and sos256 >= si256 else "not reproduced")
        + ".",
        f"- SOS(α=0) (√ of Adam's second moment) at batch 32: {results['sos0@32']['accuracy']:.3f}.",
    ]
    markdown = (
        "# SI's bias on permuted digits (`python benchmarks/seed_methods.py si_bias`)\n\n"
        f"5 tasks, a fresh Adam per task (lr 1e-3 at batch 32, 8e-3 at batch 256), stabilized EWC, mean-normalized "
        f"importances, λ ∈ {lambdas}, {len(seeds)} seed(s), {epochs} epochs per task. `siu`, `sib` and `sos` with "
        "α > 0 take one extra forward and backward per optimizer step on an independently drawn minibatch.\n\n"
        + "\n".join(rows)
        + "\n\n## Claims\n\n"
        + "\n".join(claims)
        + "\n"
    )

    def plot(path):
        fig = _figure((7, 4))
        ax = fig.add_subplot()
        keys = [k for k, v in results.items() if isinstance(v, dict)]
        ax.bar(range(len(keys)), [results[k]["accuracy"] for k in keys], color="tab:blue")
        for x, key in enumerate(keys):
            naive = results["naive@" + key.split("@")[1]]
            ax.hlines(naive, x - 0.4, x + 0.4, color="grey", linestyle=":")
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right")
        ax.set_ylim(min(results["naive@32"], results["naive@256"]) - 0.05, None)
        ax.set_ylabel("best mean accuracy after 5 tasks (dotted: naive)")
        ax.set_title("SI family on permuted digits")
        fig.savefig(path)

    report = _meta(
        argv, {"seeds": list(seeds), "epochs": epochs, "lambdas": lambdas, "small": small, "large": large}, start
    )
    report |= {
        "summary": {
            k: ({kk: vv for kk, vv in v.items() if kk != "curve"} if isinstance(v, dict) else v)
            for k, v in results.items()
        },
        "runs": runs,
    }
    write(report, args.out, "seed_methods_si_bias" + ("_quick" if args.quick else ""), markdown, plot, args.reuse)


# ---------------------------------------------------------------------------------------------------- (d) correlations
PAIRS = [
    ("mas", "sqrt_fisher"),
    ("si", "sqrt_fisher"),
    ("mas", "fisher"),
    ("si", "fisher"),
    ("mas", "si"),
    ("af", "sqrt_fisher"),
    ("masx", "mas"),
    ("fisher", "signal"),
    ("mas", "signal"),
    ("signal", "magnitude"),
    ("signal_activation", "magnitude"),
    ("fisher", "magnitude"),
]


def _value(result: dict, where: dict, a: str, b: str, coefficient: str):
    key = f"{a}|{b}" if f"{a}|{b}" in where else f"{b}|{a}"
    return where[key][coefficient]


def digits_correlations(seed: int, epochs: int) -> dict:
    tasks = make_tasks()
    train = tasks[0][0]
    transformers.set_seed(seed)
    model = DigitsMLP()
    with tempfile.TemporaryDirectory() as out:
        spec = {"mode": "off", "method": "si", "lam": 0.0, "seed": seed, "epochs": epochs}
        trainer = EWCTrainer(model=model, args=_args(out, spec), train_dataset=train)
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
        si = trainer._si.importances()
    subset = torch.utils.data.Subset(train, list(range(len(train) - 300, len(train))))
    importances = {"si": si, "magnitude": {n: p.detach().abs() for n, p in model.named_parameters()}}
    for name, method, options in (
        ("fisher", "fisher", {"estimator": "exact"}),
        ("sqrt_fisher", "sqrt_fisher", {"estimator": "exact"}),
        ("af", "af", {}),
        ("mas", "mas", {}),
        ("masx", "masx", {}),
        ("signal", "signal", {}),
        ("signal_activation", "signal", {"bias": "activation"}),
    ):
        importances[name] = collect_importance(model, subset, method, show_progress=False, batch_size=32, **options)
    weights = [n for n in si if n.endswith("weight")]
    result = importance_correlations({m: {n: v[n] for n in weights} for m, v in importances.items()}, seed=seed)
    return {"weights": weights, "result": result}


def lm_correlations(quick: bool) -> dict:
    default = yaml.safe_load((ROOT / "hf_ewc/resources/default.yaml").read_text())
    corpus = ROOT / "hf_ewc/resources" / default["domains"][0]["data_files"]
    with tempfile.TemporaryDirectory() as tmp:
        first = {**default["domains"][0], "data_files": str(corpus)}
        if quick:
            first["training"] = {**first.get("training", {}), "num_train_epochs": 1}
            first["max_samples"] = 200
        raw = {
            **default,
            "domains": [first],
            "output_dir": f"{tmp}/run",
            "importance_method": "si",
            "disable_tqdm": True,
        }
        raw.pop("baseline", None)
        (Path(tmp) / "run.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
        if hf_ewc_main(["train", f"{tmp}/run.yaml"]) != 0:
            raise SystemExit("hf-ewc train failed")
        argv = [
            "correlate",
            f"{tmp}/run",
            "--data",
            str(corpus),
            "--methods",
            "fisher,sqrt_fisher,mas,masx,signal,magnitude,si",
            "--max-samples",
            "64" if quick else "128",
            "--max-length",
            "128",
            "--out",
            f"{tmp}/corr",
        ]
        if hf_ewc_main(argv) != 0:
            raise SystemExit("hf-ewc correlate failed")
        return json.loads((Path(tmp) / "corr" / "correlations.json").read_text())


def correlations(args, argv) -> None:
    start = time.perf_counter()
    seeds = range(1 if args.quick else 3)
    epochs = 2 if args.quick else TRAINING["epochs"]
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    digits = [digits_correlations(s, epochs) for s in seeds]
    weights = digits[0]["weights"]
    table = {}
    for a, b in PAIRS:
        for coefficient in ("pearson", "spearman"):
            per_layer = np.array(
                [
                    [
                        (
                            v
                            if (v := _value(d["result"], d["result"]["per_parameter"][w], a, b, coefficient))
                            is not None
                            else np.nan
                        )
                        for w in weights
                    ]
                    for d in digits
                ]
            )
            table[(a, b, coefficient)] = [float(x) for x in np.nanmean(per_layer, axis=0)]
    lm = lm_correlations(args.quick)
    lm_global = {
        f"{a}|{b}": {c: _value(lm, lm["global"], a, b, c) for c in ("pearson", "spearman", "pearson_log")}
        for a, b in PAIRS
        if a in lm["methods"] and b in lm["methods"]
    }
    lm_layers = {}
    for a, b in PAIRS:
        if a in lm["methods"] and b in lm["methods"]:
            values = [_value(lm, lm["per_parameter"][n], a, b, "spearman") for n in lm["per_parameter"]]
            values = [v for v in values if v is not None]
            lm_layers[f"{a}|{b}"] = {
                "median": float(np.median(values)),
                "min": float(min(values)),
                "max": float(max(values)),
            }
    rows = [
        "| pair | "
        + " | ".join(f"Pearson L{i + 1}" for i in range(len(weights)))
        + " | "
        + " | ".join(f"Spearman L{i + 1}" for i in range(len(weights)))
        + " |",
        "|---" * (1 + 2 * len(weights)) + "|",
    ]
    for a, b in PAIRS:
        rows.append(
            f"| {a} – {b} | "
            + " | ".join(f"{x:+.2f}" for x in table[(a, b, "pearson")])
            + " | "
            + " | ".join(f"{x:+.2f}" for x in table[(a, b, "spearman")])
            + " |"
        )
    lm_rows = [
        "| pair | Pearson | Spearman | Pearson of log | Spearman per tensor: median (min … max) |",
        "|---|---|---|---|---|",
    ]
    for pair, row in lm_global.items():
        layer = lm_layers[pair]
        lm_rows.append(
            f"| {pair.replace('|', ' – ')} | "
            + " | ".join("—" if row[c] is None else f"{row[c]:+.2f}" for c in ("pearson", "spearman", "pearson_log"))
            + f" | {layer['median']:+.2f} ({layer['min']:+.2f} … {layer['max']:+.2f}) |"
        )

    def mean_of(a, b, coefficient="pearson"):
        return float(np.mean(table[(a, b, coefficient)]))

    sqrt_better = mean_of("mas", "sqrt_fisher") > mean_of("mas", "fisher") and mean_of("si", "sqrt_fisher") > mean_of(
        "si", "fisher"
    )
    agree = [mean_of("mas", "sqrt_fisher"), mean_of("si", "sqrt_fisher"), mean_of("mas", "si")]
    last_signal = [table[("fisher", "signal", "pearson")][-1], table[("mas", "signal", "pearson")][-1]]
    first_signal = [table[("fisher", "signal", "pearson")][0], table[("mas", "signal", "pearson")][0]]
    claims = [
        f"- **Gradient-based importances agree, with √F rather than F** (Benzing; pilot ρ ≈ 0.85–0.95): mean Pearson "
        f"over the layers MAS–√F {agree[0]:.2f}, SI–√F {agree[1]:.2f}, MAS–SI {agree[2]:.2f}; MAS–F "
        f"{mean_of('mas', 'fisher'):.2f}, SI–F {mean_of('si', 'fisher'):.2f} → "
        + (
            "reproduced"
            if sqrt_better and min(agree) >= 0.7
            else "partly reproduced"
            if sqrt_better
            else "not reproduced"
        )
        + ".",
        f"- **Signal agrees with |w|, and with the gradient-based methods only in early layers** (pilot: "
        f"signal–|w| 0.63/0.72/0.88; Fisher–signal 0.42/0.31/−0.06): signal–|w| "
        f"{'/'.join(f'{x:.2f}' for x in table[('signal', 'magnitude', 'pearson')])}; Fisher–signal "
        f"{'/'.join(f'{x:.2f}' for x in table[('fisher', 'signal', 'pearson')])}; MAS–signal "
        f"{'/'.join(f'{x:.2f}' for x in table[('mas', 'signal', 'pearson')])} → "
        + (
            "reproduced"
            if max(last_signal) < min(first_signal) and min(table[("signal", "magnitude", "pearson")]) > 0.5
            else "not reproduced"
        )
        + ".",
        (
            f"- On the default LM (first domain, {lm['samples']} blocks): MAS–√F Spearman "
            f"{lm_global.get('mas|sqrt_fisher', {}).get('spearman', float('nan')):+.2f}, SI–√F "
            f"{lm_global.get('si|sqrt_fisher', {}).get('spearman', float('nan')):+.2f}, signal–|w| "
            f"{lm_global.get('signal|magnitude', {}).get('spearman', float('nan')):+.2f}, Fisher–signal "
            f"{lm_global.get('fisher|signal', {}).get('spearman', float('nan')):+.2f} (all parameters; table below)."
        ),
    ]
    markdown = (
        "# Importance correlations (`python benchmarks/seed_methods.py correlations`)\n\n"
        f"## Digits MLP 64-100-100-10, after the first task ({len(seeds)} seed(s), mean)\n\n"
        "Adam lr 1e-3, batch 32, "
        f"{epochs} epochs; importances on 300 training samples (Fisher and √Fisher exact, as Benzing); SI accumulated "
        "during training; weights of layers L1, L2, L3 (the output layer).\n\n"
        + "\n".join(rows)
        + "\n\n## The default LM (`hf-ewc correlate` on the embedded config's first domain, trained with SI)\n\n"
        f"Fisher estimator `{lm['fisher_estimator']}`; all {len(lm['per_parameter'])} parameter tensors.\n\n"
        + "\n".join(lm_rows)
        + "\n\n## Claims\n\n"
        + "\n".join(claims)
        + "\n"
    )

    def plot(path):
        fig = _figure((9, 4.2))
        axes = fig.subplots(1, 2, sharey=True)
        width = 0.8 / len(weights)
        for ax, coefficient in zip(axes, ("pearson", "spearman")):
            for i in range(len(weights)):
                ax.bar(
                    np.arange(len(PAIRS)) + i * width,
                    [table[(a, b, coefficient)][i] for a, b in PAIRS],
                    width,
                    label=f"L{i + 1}",
                )
            ax.set_xticks(
                np.arange(len(PAIRS)) + width, [f"{a}–{b}" for a, b in PAIRS], rotation=60, ha="right", fontsize=7
            )
            ax.axhline(0, color="black", linewidth=0.5)
            ax.set_title(f"digits MLP: {coefficient} per layer")
        axes[0].legend(fontsize=7)
        fig.savefig(path)

    report = _meta(argv, {"seeds": list(seeds), "epochs": epochs, "pairs": PAIRS}, start)
    report |= {
        "digits": {
            "weights": weights,
            "per_layer": {f"{a}|{b}|{c}": v for (a, b, c), v in table.items()},
            "runs": [d["result"] for d in digits],
        },
        "lm": {"global": lm_global, "per_tensor_spearman": lm_layers, "report": lm},
    }
    write(report, args.out, "seed_methods_correlations" + ("_quick" if args.quick else ""), markdown, plot, args.reuse)


# ---------------------------------------------------------------------------------------------------- signal bias rule
def signal_bias(args, argv) -> None:
    """Kutalev's post-activation rule for biases against |b|: stabilized EWC with signal importances."""
    start = time.perf_counter()
    seeds = range(1 if args.quick else 3)
    epochs = 2 if args.quick else TRAINING["epochs"]
    lambdas = EWC_LAMBDAS[1:3] if args.quick else EWC_LAMBDAS
    base = {"epochs": epochs, "optimizer": "adam", "mode": "stabilized", "method": "signal"}
    specs = [{**base, "mode": "off", "method": "uniform", "lam": 0.0, "seed": s} for s in seeds]
    specs += [
        {**base, "lam": float(lam), "seed": s, "signal_bias": rule}
        for rule in ("abs", "activation")
        for lam in lambdas
        for s in seeds
    ]
    runs = run_pool(specs, args.workers, args.reuse)
    table = cells(runs, ("signal_bias", "lam"))
    naive = table[(None, 0.0)]["mean"]
    rows = [
        "| bias rule | " + " | ".join(f"λ = {lam:g}" for lam in lambdas) + " | best |",
        "|---" * (2 + len(lambdas)) + "|",
    ]
    best = {}
    for rule in ("abs", "activation"):
        values = [table[(rule, float(lam))]["mean"] for lam in lambdas]
        best[rule] = max(values)
        rows.append(f"| `{rule}` | " + " | ".join(f"{v:.3f}" for v in values) + f" | {best[rule]:.3f} |")
    verdict = (
        "`activation` is better by more than 0.01: make it the default"
        if best["activation"] > best["abs"] + 0.01
        else "no difference beyond 0.01 between the rules: `abs` stays the default (cheaper, no activation to find)"
        if abs(best["activation"] - best["abs"]) <= 0.01
        else "`abs` is better by more than 0.01: it stays the default"
    )
    markdown = (
        "# Signal importance: the bias rule (`python benchmarks/seed_methods.py signal_bias`)\n\n"
        f"5 permuted-digits tasks, a fresh Adam per task, stabilized EWC with signal importances (mean-normalized), "
        f"{len(seeds)} seed(s), {epochs} epochs per task; mean accuracy after the last task (naive {naive:.3f}). "
        "`abs`: Ω_b = |b|; `activation`: Kutalev's rule, the unit's mean absolute post-activation output (softmax "
        "at the output layer).\n\n" + "\n".join(rows) + f"\n\n**Verdict**: {verdict}.\n"
    )

    def plot(path):
        fig = _figure((5.5, 3.8))
        ax = fig.add_subplot()
        for rule in ("abs", "activation"):
            ax.plot(lambdas, [table[(rule, float(lam))]["mean"] for lam in lambdas], marker="o", label=f"bias: {rule}")
        ax.axhline(naive, color="grey", linestyle=":", label="naive")
        ax.set_xscale("log")
        ax.set_xlabel("λ")
        ax.set_ylabel("mean accuracy after 5 tasks")
        ax.legend(fontsize=8)
        fig.savefig(path)

    report = _meta(argv, {"seeds": list(seeds), "epochs": epochs, "lambdas": lambdas}, start)
    report |= {"summary": {"naive": naive, "best": best, "verdict": verdict}, "runs": runs}
    write(report, args.out, "seed_methods_signal_bias" + ("_quick" if args.quick else ""), markdown, plot, args.reuse)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("claim", choices=("correlations", "wva", "si_bias", "signal_bias"))
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 epochs, 1 seed, a shorter λ grid")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    parser.add_argument("--workers", type=int, default=2, help="parallel worker processes (default: 2)")
    parser.add_argument(
        "--reuse",
        type=Path,
        metavar="JSON",
        help="reuse the runs a JSON it wrote already holds; run only the others (wva, si_bias, signal_bias)",
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    {"correlations": correlations, "wva": wva, "si_bias": si_bias, "signal_bias": signal_bias}[args.claim](args, argv)


if __name__ == "__main__":
    main()
