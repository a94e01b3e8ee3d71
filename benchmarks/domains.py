"""Domain-sequence benchmark: how much of naive fine-tuning's forgetting each method removes, and at what cost.

    python benchmarks/domains.py          # 8-9 min on 2 CPU cores; writes benchmarks/results/domains.{json,md,png}
    python benchmarks/domains.py --quick  # smoke test, under a minute: writes domains_quick.* instead

The setting is the embedded default of `hf-ewc train` (`hf_ewc/resources/default.yaml`): a small Llama built from
config with a BPE tokenizer trained on the shipped text, then python_docs (English prose, acting as pretraining) →
python_code → man_pages, evaluated on every domain after each one. Compared on it, each over a small λ grid of its
own (λ is not portable between importance methods: their scales differ by orders of magnitude):

- naive fine-tuning (``ewc_mode: off``);
- L2: stabilized penalty with ``importance_method: uniform`` (Ω = 1);
- stabilized EWC with the empirical Fisher (the default) and with MAS;
- proximal EWC with the empirical Fisher.

To fit the budget the first domain is trained once: the default's python_docs stage (its own epochs and learning
rate, ``ewc_mode: off``) runs into a temporary directory, and every method then runs the 3-domain sequence from that
model (``model.name_or_path``) with ``domains.0.training: {num_train_epochs: 0}``, so that python_docs is only
evaluated and consolidated with the method's own importances. The shortcut changes nothing: the stabilized Fisher
run at the default's λ reproduces the evaluation matrix of a plain `hf-ewc train` to the last digit.

With R[i][j] the eval loss on domain j after training domain i (T domains), per method and λ:

- forgetting F = mean over j < T−1 of (R[T−1][j] − R[j][j]) (= −BWT on the loss), and the share of naive's
  forgetting removed, 1 − F / F_naive;
- new-domain gain G = Σ_{j≥1} (R[j−1][j] − R[j][j]), and the share of naive's gain kept, G / G_naive;
- ACC (mean final loss), the final loss per domain, the trainer's last ``ewc/penalty_ratio`` and ``ewc/coef_max``
  per trained domain, and the wall time of the run.

Per method the best λ keeps ≥ 90 % of the gain and removes the most forgetting; the target is ≥ 60 % removed.
Writes ``domains.json`` (every run, settings, versions, timings), ``domains.md`` (tables) and ``domains.png`` (gain
kept against forgetting removed) into ``--out`` (default ``benchmarks/results``).
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# OpenMP threads spin while they wait; on a shared 2-core machine any other busy process then slows training 3-10×.
# Passive waiting costs ~10 % when the machine is idle. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import copy
import importlib.metadata
import io
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import datasets
import transformers

from hf_ewc.pipeline import Pipeline, build_run_config, default_config_path
from hf_ewc.pipeline.config_io import read_yaml
from hf_ewc.utils import versions


TARGETS = {"forgetting_removed": 0.6, "gain_kept": 0.9}
# name → (label, config changes, plot marker).
METHODS = {
    "naive": ("naive fine-tuning", {"ewc_mode": "off"}, "o"),
    "l2": ("L2 (stabilized, uniform Ω)", {"ewc_mode": "stabilized", "importance_method": "uniform"}, "s"),
    "ewc_fisher": ("stabilized EWC, Fisher", {"ewc_mode": "stabilized", "importance_method": "fisher"}, "^"),
    "ewc_mas": ("stabilized EWC, MAS", {"ewc_mode": "stabilized", "importance_method": "mas"}, "D"),
    "proximal_fisher": ("proximal EWC, Fisher", {"ewc_mode": "proximal", "importance_method": "fisher"}, "v"),
}
# One grid per method, around where its penalty starts to bite on this sequence (found by scans over 2–4 decades):
# below it a method is naive fine-tuning, above it the later domains barely move. The importance scales differ: MAS
# needs a λ ~10× smaller than the empirical Fisher, L2's Ω = 1 one ~10⁶× smaller, and the proximal pull (a plain
# η·λ·Ω shrink after every step, outside Adam's normalisation) one ~50× larger. The Fisher grid, which sets the
# default's ewc_lambda, is the finest.
LAMBDAS = {
    "naive": [0.0],
    "l2": [3e-3, 1e-2, 3e-2],
    "ewc_fisher": [1e3, 2e3, 5e3, 1e4],
    "ewc_mas": [50.0, 150.0, 500.0],
    "proximal_fisher": [1e5, 3e5, 1e6],
}
# --quick: a few training blocks per domain and one epoch of pretraining; the numbers mean nothing, the plumbing runs.
QUICK = {"max_samples": 48, "max_eval_samples": 32, "pretrain_epochs": 1}


def _silent_run(raw: dict) -> tuple[dict, float]:
    """One pipeline run of a config mapping; the Trainer's per-step log lines are swallowed (they go to stdout)."""
    run = build_run_config(raw, source=str(default_config_path()))  # data_files are relative to the default
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        results = Pipeline(run, print_fn=None).run_sequence()
    return results, time.perf_counter() - start


def base_config(quick: bool) -> dict:
    """The embedded default as a mapping, with progress bars off (and tiny domains for --quick)."""
    raw = read_yaml(default_config_path())
    raw["disable_tqdm"] = True
    if quick:
        for domain in raw["domains"]:
            domain.update(max_samples=QUICK["max_samples"], max_eval_samples=QUICK["max_eval_samples"])
        first = raw["domains"][0]
        first["training"] = {**first.get("training", {}), "num_train_epochs": QUICK["pretrain_epochs"]}
    return raw


def pretrain(base: dict, out: Path) -> tuple[dict, float]:
    """The default's first stage alone: python_docs with its own training settings, no EWC.

    The later domains stay in the config with no training steps, so that the BPE tokenizer is trained on the same
    text as the default's (all three domains) and the pretrained model shares its vocabulary.
    """
    raw = copy.deepcopy(base)
    # Every run measures its own importances on python_docs: the ones consolidated here are never used, and uniform
    # ones cost no gradient pass.
    raw.update(output_dir=str(out), ewc_mode="off", importance_method="uniform")
    for domain in raw["domains"][1:]:
        domain["training"] = {"num_train_epochs": 0}
    return _silent_run(raw)


def sequence_config(base: dict, pretrained: Path, changes: dict, lam: float, out: Path) -> dict:
    raw = copy.deepcopy(base)
    raw["model"] = {"name_or_path": str(pretrained), "max_length": base["model"]["max_length"]}
    raw["domains"][0]["training"] = {"num_train_epochs": 0}  # already learned: evaluate and consolidate only
    raw.update(changes, ewc_lambda=lam, output_dir=str(out))
    return raw


def scores(matrix: list[list[float]]) -> dict:
    """Forgetting F, new-domain gain G, ACC and the final losses of a T×T loss matrix."""
    last = len(matrix) - 1
    forgetting = [matrix[last][j] - matrix[j][j] for j in range(last)]
    gains = [matrix[j - 1][j] - matrix[j][j] for j in range(1, last + 1)]
    return {
        "forgetting": sum(forgetting) / len(forgetting),
        "forgetting_per_domain": forgetting,
        "gain": sum(gains),
        "gain_per_domain": gains,
        "acc": sum(matrix[last]) / len(matrix[last]),
        "final": matrix[last],
    }


def run_one(base: dict, pretrained: Path, work: Path, method: str, lam: float) -> dict:
    label, changes, _ = METHODS[method]
    out = work / f"{method}-{lam:g}"
    results, seconds = _silent_run(sequence_config(base, pretrained, changes, lam, out))
    shutil.rmtree(out, ignore_errors=True)  # the models are not needed, and 13 of them would fill a small disk
    logs = [d["train"]["last_log"] for d in results["domains_detail"]]
    state = results["ewc_state"] or {}
    return {
        "method": method,
        "label": label,
        "changes": changes,
        "lam": lam,
        "matrix": results["matrix"]["loss"],
        **scores(results["matrix"]["loss"]),
        # The trainer's last logged values per trained domain: how much the penalty weighs at the end of training
        # (for proximal EWC the "penalty" is the vanilla-EWC value of the current drift, reported, not optimized).
        "penalty_ratio": [log.get("ewc/penalty_ratio") for log in logs[1:]],
        "coef_max": [log.get("ewc/coef_max") for log in logs[1:]],
        "importance_max": state.get("importance/max"),
        "importance_mean": state.get("importance/mean"),
        "steps": [d["train"]["steps"] for d in results["domains_detail"]],
        "pipeline_timings": results["timings"],
        "seconds": seconds,
    }


def summarize(runs: list[dict]) -> dict:
    """Shares of naive's forgetting removed and gain kept per run (in place), then the best λ per method."""
    naive = next(r for r in runs if r["method"] == "naive")
    for run in runs:
        run["forgetting_removed"] = 1.0 - run["forgetting"] / naive["forgetting"]
        run["gain_kept"] = run["gain"] / naive["gain"]
    best = {}
    for method in METHODS:
        if method == "naive":
            continue
        cells = [r for r in runs if r["method"] == method]
        eligible = [r for r in cells if r["gain_kept"] >= TARGETS["gain_kept"]]
        choice = max(eligible, key=lambda r: r["forgetting_removed"]) if eligible else None
        best[method] = {
            "lam": choice["lam"] if choice else None,
            "forgetting_removed": choice["forgetting_removed"] if choice else None,
            "gain_kept": choice["gain_kept"] if choice else None,
            "acc": choice["acc"] if choice else None,
            "target_met": bool(choice and choice["forgetting_removed"] >= TARGETS["forgetting_removed"]),
        }
    return {
        "naive": {key: naive[key] for key in ("forgetting", "gain", "acc", "final")},
        "best": best,
        "target_met_by": [m for m, b in best.items() if b["target_met"]],
    }


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{round(100 * value)} %"  # round(): no "-0 %"


def _points(value: float) -> str:
    """A margin in percentage points: "+1.3 points"."""
    return f"{100 * value:+.1f} points"


def _list(values: list, fmt: str = ".3f") -> str:
    return " / ".join("—" if v is None else format(v, fmt) for v in values)


def _verdict(report: dict) -> str:
    """The outcome in one paragraph, written from the numbers so that it cannot disagree with the tables."""
    summary, names = report["summary"], report["settings"]["domains"]
    naive = summary["naive"]
    per_domain = _list(next(r for r in report["runs"] if r["method"] == "naive")["forgetting_per_domain"])
    opening = (
        f"Naive fine-tuning raises the old domains' loss by {naive['forgetting']:.3f} nats on average ({per_domain} "
        f"on {', '.join(names[:-1])}) while gaining {naive['gain']:.3f} nats on the new ones."
    )
    parts = [opening]
    for method, best in summary["best"].items():
        label = METHODS[method][0]
        if best["lam"] is None:
            top = max((r for r in report["runs"] if r["method"] == method), key=lambda r: r["gain_kept"])
            parts.append(
                f"{label}: no λ of the grid keeps ≥ {_pct(TARGETS['gain_kept'])} of the gain (the weakest, "
                f"λ = {top['lam']:g}, keeps {_pct(top['gain_kept'])} and removes {_pct(top['forgetting_removed'])})."
            )
        else:
            met = "target met" if best["target_met"] else "target not met"
            parts.append(
                f"{label}: best λ = {best['lam']:g} removes {_pct(best['forgetting_removed'])} of the forgetting and "
                f"keeps {_pct(best['gain_kept'])} of the gain ({met})."
            )
    met_by = [
        f"{METHODS[m][0]} (by {_points(summary['best'][m]['forgetting_removed'] - TARGETS['forgetting_removed'])} "
        f"removed and {_points(summary['best'][m]['gain_kept'] - TARGETS['gain_kept'])} kept)"
        for m in summary["target_met_by"]
    ]
    target = f"Target (≥ {_pct(TARGETS['forgetting_removed'])} removed, ≥ {_pct(TARGETS['gain_kept'])} kept): "
    parts.append(target + (f"met by {', '.join(met_by)}." if met_by else "not met by any method."))
    parts.append("One seed per run: margins of a few points are within what another seed could move.")
    return " ".join(parts)


def write_markdown(report: dict, path: Path) -> None:
    settings, summary, pre = report["settings"], report["summary"], report["pretrain"]
    names, naive = settings["domains"], summary["naive"]
    command = (
        f"Command: `{report['command']}` — wall time {report['wall_time_s']:.0f} s on "
        f"{report['machine']['cpu_count']} CPU core(s) ({len(report['runs'])} sequence runs after one pretraining "
        f"run of {pre['seconds']:.0f} s)."
    )
    setting = (
        f"Setting: the embedded default of `hf-ewc train` ({' → '.join(names)}; a {settings['parameters']:,}-"
        f"parameter Llama built from config, {settings['max_length']}-token blocks). python_docs is trained once "
        f"({settings['pretrain_training']}, no EWC; eval loss after it: {_list(pre['row'])} on {', '.join(names)}); "
        "every run starts from that model, only evaluates and consolidates python_docs, then trains the later "
        f"domains with the default's settings ({settings['sequence_training']}). R[i][j] = eval loss on domain j "
        "after domain i. Forgetting F = mean over old domains j of R[T−1][j] − R[j][j]; gain G = Σ_{j≥1} "
        "R[j−1][j] − R[j][j]; *removed* = 1 − F/F_naive, *kept* = G/G_naive; ACC = mean final loss (lower is "
        "better). Penalty ratio and coef_max: the trainer's last logged `ewc/penalty_ratio` and `ewc/coef_max` on "
        f"{' / '.join(names[1:])} (proximal: the vanilla-EWC value of the drift, not a loss term)."
    )
    rule = (
        f"Best λ: the most forgetting removed among the λ that keep ≥ {_pct(TARGETS['gain_kept'])} of the gain. "
        f"Target: ≥ {_pct(TARGETS['forgetting_removed'])} removed at ≥ {_pct(TARGETS['gain_kept'])} kept."
    )
    naive_row = (
        f"| naive fine-tuning | — | 0 % (F = {naive['forgetting']:.3f}) | 100 % (G = {naive['gain']:.3f}) | "
        f"{naive['acc']:.3f} | — |"
    )
    lines = [
        "# Domain sequence: naive fine-tuning vs L2, stabilized EWC (Fisher, MAS) and proximal EWC",
        "",
        command,
        "",
        setting,
        "",
        "## Best λ per method",
        "",
        rule,
        "",
        "| method | best λ | forgetting removed | gain kept | ACC | target |",
        "|---|---|---|---|---|---|",
        naive_row,
    ]
    for method, best in summary["best"].items():
        lam = f"none keeps ≥ {_pct(TARGETS['gain_kept'])}" if best["lam"] is None else f"{best['lam']:g}"
        acc = "—" if best["acc"] is None else f"{best['acc']:.3f}"
        lines.append(
            f"| {METHODS[method][0]} | {lam} | {_pct(best['forgetting_removed'])} | {_pct(best['gain_kept'])} | "
            f"{acc} | {'**met**' if best['target_met'] else 'not met'} |"
        )
    finals = " / ".join(names)
    header = f"| method | λ | F | removed | G | kept | ACC | final loss {finals} | penalty ratio | coef_max | s |"
    lines += ["", "## Every run", "", header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        best = summary["best"].get(run["method"], {})
        mark = " ★" if best.get("lam") == run["lam"] else ""
        lines.append(
            f"| {run['label']} | {run['lam']:g}{mark} | {run['forgetting']:.3f} | {_pct(run['forgetting_removed'])} "
            f"| {run['gain']:.3f} | {_pct(run['gain_kept'])} | {run['acc']:.3f} | {_list(run['final'])} | "
            f"{_list(run['penalty_ratio'], '.3g')} | {_list(run['coef_max'], '.3g')} | {run['seconds']:.0f} |"
        )
    lines += ["", "★ best λ of the method.", "", "## Outcome", "", _verdict(report), ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(8, 6))
    # Zoomed on the runs (with the target's corner and naive's point in view), not on the whole unit square.
    xs = [r["gain_kept"] for r in runs] + [TARGETS["gain_kept"], 1.0]
    ys = [r["forgetting_removed"] for r in runs] + [TARGETS["forgetting_removed"], 0.0]
    left, right = min(xs) - 0.05, max(xs) + 0.05
    bottom, top = min(ys) - 0.05, max(ys) + 0.1
    ax.add_patch(
        plt.Rectangle(
            (TARGETS["gain_kept"], TARGETS["forgetting_removed"]),
            right - TARGETS["gain_kept"],
            top - TARGETS["forgetting_removed"],
            color="tab:green",
            alpha=0.12,
            label=f"target: ≥ {_pct(TARGETS['gain_kept'])} kept, ≥ {_pct(TARGETS['forgetting_removed'])} removed",
        )
    )
    # Label offsets alternate between methods, so that neighbouring points of two methods keep legible labels.
    offsets = {"l2": (6, -12), "ewc_fisher": (-6, 6), "ewc_mas": (6, 6), "proximal_fisher": (6, -12)}
    for method, (label, _, marker) in METHODS.items():
        cells = sorted((r for r in runs if r["method"] == method), key=lambda r: r["lam"])
        x, y = [r["gain_kept"] for r in cells], [r["forgetting_removed"] for r in cells]
        (line,) = ax.plot(x, y, marker=marker, linestyle=":", markersize=8, label=label)
        dx, dy = offsets.get(method, (6, 6))
        for r in cells if method != "naive" else []:
            ax.annotate(
                f"λ={r['lam']:g}", (r["gain_kept"], r["forgetting_removed"]), textcoords="offset points",
                xytext=(dx, dy), ha="left" if dx > 0 else "right", fontsize=7, color=line.get_color(),
            )  # fmt: skip
    ax.set(
        xlim=(left, right),
        ylim=(bottom, top),
        xlabel="share of naive's new-domain gain kept",
        ylabel="share of naive's forgetting removed",
        title=" → ".join(report["settings"]["domains"]) + ": forgetting removed vs gain kept",
    )
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny domains, one λ per method")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    start = time.perf_counter()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    base = base_config(args.quick)
    # --quick: the middle λ of each grid
    specs = [(m, lam) for m in METHODS for lam in ([LAMBDAS[m][len(LAMBDAS[m]) // 2]] if args.quick else LAMBDAS[m])]
    runs = []
    with tempfile.TemporaryDirectory(prefix="hf_ewc_domains_") as tmp:
        work = Path(tmp)
        pretrained = work / "pretrained"
        pre_results, pre_seconds = pretrain(base, pretrained)
        names = pre_results["domains"]
        row = pre_results["matrix"]["loss"][0]
        print(f"pretrained on {names[0]} in {pre_seconds:.0f} s; loss {_list(row)} on {', '.join(names)}", flush=True)
        print(f"{len(specs)} sequence runs...", flush=True)
        for method, lam in specs:
            run = run_one(base, pretrained, work, method, lam)
            runs.append(run)
            print(
                f"[{len(runs):2d}/{len(specs)}] {method:15s} λ={lam:<7g} F={run['forgetting']:.3f} "
                f"G={run['gain']:.3f} ACC={run['acc']:.3f} ({run['seconds']:.0f} s)",
                flush=True,
            )
        parameters = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(pretrained).parameters())
    # validated: YAML reads "2.0e3" as a string, the config turns it into a float
    default = build_run_config(read_yaml(default_config_path()), source=str(default_config_path()))
    keys = ("num_train_epochs", "learning_rate", "per_device_train_batch_size")
    sequence_training = {k: default.training[k] for k in keys if k in default.training}
    report = {
        "command": " ".join(["python", "benchmarks/domains.py", *argv]),
        "settings": {
            "quick": args.quick,
            "domains": names,
            "parameters": parameters,
            "max_length": base["model"]["max_length"],
            "default_config": default.to_dict(),
            "pretrain_training": ", ".join(f"{k} {v}" for k, v in base["domains"][0].get("training", {}).items()),
            "sequence_training": ", ".join(f"{k} {v}" for k, v in sequence_training.items()),
            "methods": {m: {"label": label, "changes": changes} for m, (label, changes, _) in METHODS.items()},
            "lambdas": LAMBDAS,
            "targets": TARGETS,
            "quick_settings": QUICK if args.quick else None,
        },
        "versions": versions()
        | {
            "datasets": datasets.__version__,
            "matplotlib": importlib.metadata.version("matplotlib"),
            "python": platform.python_version(),
        },
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "pretrain": {"row": row, "seconds": pre_seconds, "timings": pre_results["timings"]},
        "runs": runs,
    }
    report["summary"] = summarize(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "domains_quick" if args.quick else "domains"
    plot(report, args.out / f"{stem}.png")
    report["wall_time_s"] = time.perf_counter() - start
    write_markdown(report, args.out / f"{stem}.md")
    with open(args.out / f"{stem}.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, allow_nan=False)
        f.write("\n")
    print()
    print((args.out / f"{stem}.md").read_text(encoding="utf-8").split("## Best λ per method", 1)[1].strip())
    print(f"\nWall time {report['wall_time_s']:.0f} s; results in {args.out}/{stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
