"""`hf-ewc correlate`: how far importance methods agree on one model (Kutalev 2022; Benzing 2022).

Loads a model (a `save_pretrained` directory, an `hf-ewc train` run or a Hub id), measures every requested importance
on the same samples of ``--data`` (``magnitude`` is ``|θ|``; the SI family comes from the run's saved EWC state, which
holds it only when the run trained with that method: otherwise it is skipped with the reason), and writes
``correlations.json``, ``correlations.md`` and one heatmap per granularity (``correlations_global.png``,
``correlations_per_layer.png``) into ``--out``, which appears only when complete.
"""

import os
from typing import Any

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ..distributed import trainable_parameters
from ..importance import METHODS, SI_FAMILY, collect_importance, importance_correlations
from ..models import task_of_auto_class
from ..plots import plot_correlations
from ..state import EWCState, find_ewc_state
from ..utils import HfEwcError, atomic_directory, check_output_dir, error_line, versions, write_json_atomic
from .data import train_collator
from .prune import data_for_model, load_pretrained


COLLECTED = tuple(m for m in METHODS if m != "uniform")  # Ω = 1 correlates with nothing
CORRELATE_METHODS = (*COLLECTED, "magnitude", *SI_FAMILY)


def parse_methods(text: str | list[str]) -> list[str]:
    """``"fisher,mas,signal"`` → the list, each checked (unknown: the choices); at least two, no repeats."""
    methods = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in methods if m not in CORRELATE_METHODS]
    if unknown:
        raise HfEwcError(f"--methods: unknown method {unknown[0]!r}; choose from: {', '.join(CORRELATE_METHODS)}.")
    if len(set(methods)) != len(methods):
        raise HfEwcError(f"--methods names a method twice: {','.join(methods)}.")
    if len(methods) < 2:
        raise HfEwcError(f"--methods needs at least two methods to correlate; got {','.join(methods) or 'none'}.")
    return methods


def _from_state(model_dir: str, method: str, params: dict) -> tuple[dict | None, str | None]:
    """The SI-family importances of a run's EWC state (the normalized sum over the run's domains, not of ``--data``),
    or why there are none."""
    found = find_ewc_state(model_dir) if os.path.isdir(model_dir) else None
    if found is None:
        return None, f"{method} is accumulated during training and {model_dir!r} has no saved EWC state"
    state = EWCState.load(found)
    used = sorted({d.get("method") for d in state.domains})
    if used != [method]:
        return None, (
            f"{method} is accumulated during training and the EWC state in {found} holds {', '.join(map(str, used))} "
            f"importances (train with importance_method: {method} to compare it)"
        )
    mismatched = [n for n, p in params.items() if n not in state.importances
                  or tuple(state.importances[n].shape) != tuple(p.shape)]  # fmt: skip
    if mismatched:
        return None, (
            f"the EWC state in {found} does not cover the model's parameter {mismatched[0]!r} with its shape (a LoRA "
            "run's state covers its adapter, not the merged weights)"
        )
    return {n: state.importances[n] for n in params}, None


def correlate_pretrained(
    model_name_or_path: str,
    out_dir: str | os.PathLike,
    *,
    methods: str | list[str],
    data_files: list[str] | None = None,
    fisher_estimator: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    max_samples: int | None = 256,
    max_length: int | None = None,
    batch_size: int = 8,
    max_rank_samples: int = 200_000,
    overwrite: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    show_progress: bool = True,
    print_fn=print,
) -> dict[str, Any]:
    """Measure ``methods`` on one model and write the correlation report (see the module docstring); returns what
    ``correlations.json`` holds. ``fisher_estimator`` defaults to ``exact`` for classifiers and ``sampled`` for
    language models (whose exact Fisher needs T·V backward passes per batch)."""
    methods = parse_methods(methods)
    out = check_output_dir(out_dir, overwrite=overwrite)
    collected = [m for m in methods if m in COLLECTED]
    if collected and not data_files:
        raise HfEwcError(f"--data FILE… is needed to measure {', '.join(collected)}; only magnitude and the SI family "
                         "(from a run's state) need none.")  # fmt: skip
    model, auto_name = load_pretrained(model_name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    task = task_of_auto_class(auto_name)
    data = collator = None
    if collected:
        if task is None:
            raise HfEwcError(f"--data measures causal LM, masked LM or classification models, not {auto_name}.")
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                model_name_or_path, revision=revision, trust_remote_code=trust_remote_code
            )
        except Exception as err:
            raise HfEwcError(f"--data needs the model's tokenizer, which {model_name_or_path!r} lacks: {err}") from err
        data = data_for_model(model, tokenizer, task, data_files, text_column, label_column, max_samples, 1,
                              max_length, seed).train  # fmt: skip
        collator = train_collator(task, tokenizer)
    if fisher_estimator is None:
        fisher_estimator = "exact" if task == "sequence_classification" else "sampled"
    importances, skipped = {}, {}
    bar = tqdm(methods, desc="correlate", disable=not show_progress)
    for method in bar:
        bar.set_postfix_str(method)
        if method == "magnitude":
            importances[method] = {n: p.detach().abs().float() for n, p in trainable_parameters(model).items()}
        elif method in SI_FAMILY:
            found, reason = _from_state(model_name_or_path, method, trainable_parameters(model))
            if found is None:
                skipped[method] = reason
            else:
                importances[method] = found
        else:
            try:
                importances[method] = collect_importance(
                    model, data, method, estimator=fisher_estimator, max_samples=max_samples, batch_size=batch_size,
                    data_collator=collator, seed=seed, show_progress=False,
                )  # fmt: skip
            except HfEwcError as err:
                skipped[method] = error_line(err)
        if method in skipped:
            print_fn(f"[hf_ewc] {method}: skipped — {skipped[method]}")
    if len(importances) < 2:
        raise HfEwcError(
            f"fewer than two usable methods ({', '.join(importances) or 'none'}); skipped: "
            + "; ".join(f"{m}: {r}" for m, r in skipped.items())
        )
    result = importance_correlations(
        {m: {n: t.detach().float().cpu() for n, t in v.items()} for m, v in importances.items()},
        max_rank_samples=max_rank_samples, seed=seed,
    )  # fmt: skip
    report = {
        **result,
        "model": str(model_name_or_path),
        "data": [str(f) for f in data_files or []],
        "samples": len(data) if data is not None else 0,
        "fisher_estimator": fisher_estimator if {"fisher", "sqrt_fisher"} & set(importances) else None,
        "skipped": skipped,
        "versions": versions(),
    }
    with atomic_directory(out, replace=overwrite) as tmp:
        write_json_atomic(tmp / "correlations.json", report)
        (tmp / "correlations.md").write_text(correlations_markdown(report), encoding="utf-8")
        plot_correlations(result, tmp / "correlations_global.png", granularity="global")
        plot_correlations(result, tmp / "correlations_per_layer.png", granularity="per_layer")
    print_fn(correlations_table(report))
    print_fn(f"[hf_ewc] wrote correlations.json, correlations.md and two heatmaps to {out}")
    return report


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def correlations_table(report: dict) -> str:
    """The global table: one row per pair of methods, one column per coefficient."""
    lines = ["| pair | " + " | ".join(report["coefficients"]) + " |", "|---" * (1 + len(report["coefficients"])) + "|"]
    for pair, row in report["global"].items():
        lines.append(f"| {pair.replace('|', ' – ')} | " + " | ".join(_number(row[c]) for c in report["coefficients"]))
        lines[-1] += " |"
    return "\n".join(lines)


def correlations_markdown(report: dict) -> str:
    pairs = list(report["global"])
    per_layer = [
        "| parameter | " + " | ".join(p.replace("|", " – ") for p in pairs) + " |",
        "|---" * (1 + len(pairs)) + "|",
    ]
    for name, row in report["per_parameter"].items():
        cells = [f"{_number(row[p]['pearson'])} / {_number(row[p]['spearman'])}" for p in pairs]
        per_layer.append(f"| `{name}` | " + " | ".join(cells) + " |")
    skipped = "".join(f"- **{m}** skipped: {r}\n" for m, r in report["skipped"].items())
    estimator = f", Fisher estimator `{report['fisher_estimator']}`" if report["fisher_estimator"] else ""
    return (
        f"# Importance correlations\n\nModel `{report['model']}`; {report['samples']} samples of "
        f"{', '.join(report['data']) or '(no data)'}{estimator}; methods {', '.join(report['methods'])}. "
        "Pearson of the raw values, Spearman of the ranks (a seeded subsample above "
        f"{report['max_rank_samples']:,} values), Pearson of log(Ω + ε·mean Ω).\n\n{skipped}\n"
        f"## All parameters\n\n{correlations_table(report)}\n\n"
        "## Per parameter tensor (Pearson / Spearman)\n\n" + "\n".join(per_layer) + "\n"
    )
