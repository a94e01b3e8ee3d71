"""What a finished run reports: the evaluation matrices and the continual-learning summary (``results.json``,
``results.md``), the heatmap and trajectory plots, the model card, and the text printed at the end."""

import math
from pathlib import Path

from ..metrics import continual_metrics, format_matrix, format_summary
from ..plots import plot_general, plot_matrix, plot_trajectories, plot_units
from ..state import EWCState
from ..utils import HfEwcError, atomic_path, logger, versions, write_json_atomic
from .card import write_model_card
from .evaluation import primary_metric
from .general_eval import general_markdown, general_results
from .run_config import RunConfig
from .run_dir import RESULTS_NAME


def forgetting_and_gain(results: dict) -> dict[str, float]:
    """Forgetting F (= −BWT: the mean loss of what the old domains had reached) and gain G (the later domains'
    "learned", summed) of a finished run, signed so that a larger F is worse and a larger G better for any metric."""
    summary = results["summary"]
    if summary is None:  # a diverged run: no summary
        return {"forgetting": math.inf, "gain": -math.inf, "acc": math.nan}
    return {"forgetting": -summary["bwt"], "gain": sum(summary["learned"][1:]), "acc": summary["acc"]}


def compare_with(results: dict, baseline: dict, directory: str) -> dict:
    """How the run compares with its naive fine-tuning baseline: the share of the baseline's forgetting it removed
    and of its gain it kept (None where the baseline did not forget or gain)."""
    ours, theirs = forgetting_and_gain(results), forgetting_and_gain(baseline)
    defined = theirs["forgetting"] > 0 and theirs["gain"] > 0 and math.isfinite(ours["forgetting"])
    shared = "trained from its own first domain" if results.get("clnp") else "the first domain shared"
    return {
        "method": f"naive fine-tuning (ewc_mode: off), the same run otherwise, {shared}",
        "run": directory,
        "matrix": baseline["matrix"][baseline["metric"]],
        "forgetting": theirs["forgetting"],
        "gain": theirs["gain"],
        "acc": theirs["acc"],
        "forgetting_removed": 1.0 - ours["forgetting"] / theirs["forgetting"] if defined else None,
        "gain_kept": ours["gain"] / theirs["gain"] if defined else None,
    }


def collect_results(
    run: RunConfig,
    progress: dict,
    *,
    state: EWCState | None,
    from_dir: str | None,
    seconds: float,
    baseline: tuple[dict, str] | None = None,
) -> dict:
    """The content of ``results.json`` from the run's progress (every row measured) and its final EWC state."""
    names = [d.name for d in run.domains]
    metric, higher = primary_metric(run.task)
    completed = progress["completed"]
    matrices = {
        key: [[c["row"][n][key] for n in names] for c in completed]
        for key in completed[0]["row"][names[0]]
        if key != "extra"
    }
    extra = {n: [c["row"][n].get("extra", {}) for c in completed] for n in names if "extra" in completed[0]["row"][n]}
    initial = {key: [progress["initial"]["row"][n][key] for n in names] for key in matrices}
    if all(math.isfinite(v) for row in [*matrices[metric], initial[metric]] for v in row):
        summary = continual_metrics(matrices[metric], higher_is_better=higher, initial=initial[metric])
    else:  # a diverged run still gets its results written, so it can be inspected
        logger.warning(f"Some {metric} values are not finite (the training diverged); no summary or plots.")
        summary = None
    results = {
        "task": run.task,
        "domains": names,
        "metric": metric,
        "higher_is_better": higher,
        "matrix": matrices,
        "initial": initial,
        "summary": summary,
        "extra_metrics": extra,
        "domains_detail": [{"name": c["domain"], "train": c["train"], "timings": c["timings"]} for c in completed],
        "ewc_state": (state.metadata | state.summary()) if state is not None else None,
        "parameters": completed[-1].get("parameters"),
        "pruning": next(({"after": c["domain"], **c["pruning"]} for c in completed if "pruning" in c), None),
        "config": run.to_dict(),
        "from": from_dir,
        "versions": versions(),
        "timings": {
            "total_seconds_this_invocation": seconds,
            "initial_eval_seconds": progress["initial"]["eval_seconds"],
            "train_seconds": sum(c["timings"]["train_seconds"] for c in completed),
            "eval_seconds": sum(c["timings"]["eval_seconds"] for c in completed),
            "importance_seconds": sum(c["timings"]["importance_seconds"] for c in completed),
        },
    }
    if any("clnp" in c for c in completed):
        results["clnp"] = clnp_results(completed, names, metric, higher)
    if baseline is not None:
        results["baseline"] = compare_with(results, *baseline)
    general = general_results(progress, names, baseline[0].get("general_eval") if baseline is not None else None)
    if general is not None:
        results["general_eval"] = general
    return results


def clnp_results(completed: list[dict], names: list[str], metric: str, higher: bool) -> dict:
    """A CLNP run's units after each domain (per layer: active, reused, free) and what the old domains lose without
    a domain id: the rows measured with every unit on, and at the end the drop of each old domain (positive = worse,
    for any metric) against its own units."""
    without = [c["clnp"]["row_without_domain_id"] for c in completed]
    matrix = {
        key: [[w[n][key] if n in w else None for n in names] for w in without]
        for key in next((cell for w in without for cell in w.values()), {})
        if key != "extra"
    }
    last, final = completed[-1]["row"], without[-1]
    sign = 1.0 if higher else -1.0
    drop = {n: sign * (last[n][metric] - final[n][metric]) for n in names if n in final}
    return {
        "evaluation": "task-incremental: each domain's row under its own units (the domain is known at inference)",
        "units": [c["clnp"]["units"] for c in completed],
        # with --from, the allocation also holds the domains of the runs before: the table and plot show them all
        "history": completed[-1]["clnp"].get("history", [c["clnp"]["units"] for c in completed]),
        "matrix_without_domain_id": matrix,
        "drop_without_domain_id": drop,
        "mean_drop_without_domain_id": sum(drop.values()) / len(drop) if drop else None,
    }


def clnp_markdown(clnp: dict, names: list[str], metric: str, h: str) -> list[str]:
    """The units table (per layer, after each domain: ``+active (reused) · free``) and the rows without a domain id."""
    history = clnp["history"]
    done = [u["domain"] for u in history]
    parts = [
        f"{h} CLNP units",
        "",
        (
            "Per layer, after each domain: `+units the domain took (units of earlier domains its new units read) · "
            "free units left`. Old domains are evaluated under their own units (task-incremental: the domain is "
            "known)."
        ),
        "",
        "| layer | units | " + " | ".join(f"after {d}" for d in done) + " |",
        "|---|---:|" + "---:|" * len(done),
    ]
    for layer, first in history[0]["layers"].items():
        cells = []
        for u in history:
            cell = u["layers"][layer]
            reused = f" ({cell['reused']})" if cell.get("reused") is not None else ""
            cells.append(f"+{cell['active']}{reused} · {cell['free']}")
        parts.append(f"| {layer} | {first['total']} | " + " | ".join(cells) + " |")
    parts.append(
        "| threshold τ (loss kept / unpruned) | | "
        + " | ".join(f"{u['threshold']:.3g} ({u['loss_kept']:.3f} / {u['loss_unpruned']:.3f})" for u in history)
        + " |"
    )
    parts.append("")
    drop = clnp["drop_without_domain_id"]
    if drop:
        rows = clnp["matrix_without_domain_id"][metric]
        parts += [f"{h} Without a domain id (every unit on)", "", "| after | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]  # fmt: skip
        for d, row in zip([u["domain"] for u in clnp["units"]], rows):
            parts.append(f"| {d} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in row) + " |")
        worst = max(drop, key=drop.get)
        parts += [
            "",
            (
                f"At the end, without the domain id the old domains' {metric} is worse by "
                f"{clnp['mean_drop_without_domain_id']:+.4g} on average (most on {worst}: {drop[worst]:+.4g}) than "
                "under their own units: the forgetting CLNP removes only when the domain is known."
            ),
            "",
        ]
    return parts


def write_results(out: Path, run: RunConfig, results: dict, *, from_dir: str | None) -> None:
    """``results.json``, ``results.md``, the plots (finite matrices only) and the model card ``README.md``."""
    names, metric = results["domains"], results["metric"]
    matrix, initial = results["matrix"][metric], results["initial"][metric]
    write_json_atomic(out / RESULTS_NAME, results)
    with atomic_path(out / "results.md") as tmp:
        Path(tmp).write_text(f"# hf-ewc results: {' → '.join(names)}\n\n{results_markdown(results)}", encoding="utf-8")
    if results["summary"] is not None:
        plot_matrix(
            matrix, names, out / "matrix.png", metric=metric, higher_is_better=results["higher_is_better"],
            title=f"{metric} after each domain",
        )  # fmt: skip
        baseline = results.get("baseline")
        plot_trajectories(
            matrix, names, out / "trajectories.png", metric=metric, initial=initial,
            title=f"{metric} of each domain over the sequence", baseline=baseline["matrix"] if baseline else None,
        )  # fmt: skip
    if results.get("clnp"):
        plot_units(results["clnp"]["history"], out / "units.png", title="CLNP: units per layer after each domain")
    general = results.get("general_eval")
    if general is not None:
        rows = [general["initial"], *general["rows"]]
        finite = [c for c in general["shown"] if all(math.isfinite(r[c]) for r in rows)]
        if finite:
            baseline = general.get("baseline")
            plot_general(
                rows, out / "general.png", columns=finite, labels=general["labels"],
                baseline=[general["initial"], *baseline["rows"]] if baseline else None,
                title="general ability (lm-evaluation-harness) along the sequence",
            )  # fmt: skip
    tables = results_markdown(results, level=3)
    write_model_card(out, run=run, results=results, markdown_tables=tables, from_dir=from_dir)


def results_text(results: dict) -> str:
    """The matrix of the primary metric and the summary, as printed at the end of a run."""
    names, metric = results["domains"], results["metric"]
    matrix = results["matrix"][metric]
    if results["summary"] is None:
        table = "\n".join(f"after {n}: {row}" for n, row in zip(names, matrix))
        return table + "\n\n(no summary: non-finite values)"
    table = format_matrix(matrix, names, metric=metric, initial=results["initial"][metric])
    text = table + "\n\n" + format_summary(results["summary"], names, metric=metric)
    if results.get("clnp"):
        text += "\n\n" + "\n".join(clnp_markdown(results["clnp"], names, metric, "##"))
    if results.get("general_eval"):
        text += "\n\n" + "\n".join(general_markdown(results["general_eval"], "##")).rstrip()
    if results.get("baseline"):
        text += "\n\n" + baseline_text(results["baseline"], _method_name(results))
    return text


def baseline_text(baseline: dict, method: str = "EWC") -> str:
    """What EWC bought against naive fine-tuning, in one sentence."""
    if baseline["forgetting_removed"] is None:
        return (
            f"Naive fine-tuning (same run, ewc_mode: off) did not forget (forgetting {baseline['forgetting']:.4g}) or "
            f"gained nothing: there was nothing for {method} to remove."
        )
    if method == "CLNP":
        method = "CLNP (each domain evaluated under its own units: the domain known)"
    return (
        f"Against naive fine-tuning (same run, ewc_mode: off; forgetting {baseline['forgetting']:.4g}, gain "
        f"{baseline['gain']:.4g}): {method} removed {baseline['forgetting_removed']:.0%} of its forgetting and kept "
        f"{baseline['gain_kept']:.0%} of its gain on the new domains."
    )


def results_markdown(results: dict, level: int = 2) -> str:
    """The matrices (primary metric first) and the summary as Markdown, headings at ``level``."""
    names, metric = results["domains"], results["metric"]
    h = "#" * level
    parts = []
    for key, matrix in sorted(results["matrix"].items(), key=lambda kv: kv[0] != metric):
        try:
            table = format_matrix(matrix, names, metric=key, initial=results["initial"][key], markdown=True)
        except HfEwcError:  # non-finite cells (a diverged run): show them raw
            table = "\n".join(f"- after {n}: {row}" for n, row in zip(names, matrix))
        parts += [f"{h} {key}", "", table, ""]
    if results["summary"] is None:
        return "\n".join([*parts, "No summary: the matrix has non-finite values (the training diverged).", ""])
    parts += [f"{h} Summary", "", format_summary(results["summary"], names, metric=metric, markdown=True), ""]
    if results.get("clnp"):
        parts += clnp_markdown(results["clnp"], names, metric, h)
    if results.get("general_eval"):
        parts += general_markdown(results["general_eval"], h)
    if results.get("baseline"):
        parts += [f"{h} Against naive fine-tuning", "", baseline_text(results["baseline"], _method_name(results)), ""]
    return "\n".join(parts)


def _method_name(results: dict) -> str:
    return "CLNP" if results.get("clnp") else "EWC"
