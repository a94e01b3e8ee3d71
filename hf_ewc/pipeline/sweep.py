"""`hf-ewc sweep`: how much of naive fine-tuning's forgetting each (method, λ) removes on the config's own sequence,
what share of naive's gain on the new domains it keeps, and the λ to use.

    hf-ewc sweep my_run.yaml --lambdas 1,10,100 --methods fisher,mas --min-gain-kept 0.9

Every cell trains the whole sequence, except the first domain: it carries no penalty (nothing is consolidated before
it), so it is trained once per method (its consolidation is the method's own) and every λ of the method — and naive
fine-tuning — continues from a copy of that run, resumed exactly as an interrupted run would be.

With the run's summary (signed so that positive is better for any metric), per cell:

- forgetting F = −BWT (the mean drop on the old domains between learning them and the end), the share of naive's
  forgetting removed ``1 − F / F_naive``;
- gain G = Σ over the later domains of "learned" (what training on a domain gained on it), the share of naive's gain
  kept ``G / G_naive``.

The rule: per method, the λ that removes the most forgetting among those that keep at least ``--min-gain-kept`` of
the gain; overall, the best of those. With ``--objective general`` (or ``--objective TASK/METRIC``, a column of the
config's `general_eval:` scores) the forgetting is that of general ability instead — the drop of that score from
after the first domain to the end, signed so that positive is worse — while the gain stays the new domains'.
``best.yaml`` is the config with it (data paths made absolute).

``output_dir`` of the config holds ``sweep_config.json`` (what ``--resume`` compares), ``first/<method>/`` and
``runs/<cell>/`` (each an `hf-ewc train` run; weights removed once it finished unless ``--keep-models``), ``logs/``
(the Trainer's log lines per run),
``sweep.json``, ``sweep.md``, ``frontier.png`` and ``best.yaml``.
"""

import contextlib
import copy
import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from accelerate import PartialState
from tqdm.auto import tqdm

from ..config import EWC_MODES, FISHER_ESTIMATORS, IMPORTANCE_METHODS
from ..plots import plot_frontier
from ..utils import LOCK_NAME, LOCK_OWNER_NAME, HfEwcError, atomic_path, write_json_atomic
from .data import resolve_data_files
from .general_eval import GeneralEvaluator
from .loop import Pipeline
from .results import forgetting_and_gain
from .run_config import build_run_config
from .run_dir import PROGRESS_NAME, is_run_artefact


SWEEP_CONFIG_NAME = "sweep_config.json"
SWEEP_ARTEFACTS = (SWEEP_CONFIG_NAME, "first", "runs", "logs", "sweep.json", "sweep.md", "frontier.png", "best.yaml")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class MethodSpec:
    """One ``--methods`` entry: ``[mode:]method[/estimator]`` (``fisher``, ``fisher/sampled``, ``proximal:mas``)."""

    method: str
    estimator: str | None = None
    mode: str | None = None

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        mode, _, rest = text.strip().rpartition(":")
        method, _, estimator = rest.partition("/")
        if mode and mode not in EWC_MODES[:-1]:
            raise HfEwcError(
                f"--methods {text!r}: unknown ewc_mode {mode!r}; choose one of {', '.join(EWC_MODES[:-1])}."
            )
        if method not in IMPORTANCE_METHODS:
            raise HfEwcError(
                f"--methods {text!r}: unknown method {method!r}; choose one of {', '.join(IMPORTANCE_METHODS)}."
            )
        if estimator and (method not in ("fisher", "sqrt_fisher") or estimator not in FISHER_ESTIMATORS):
            raise HfEwcError(
                f"--methods {text!r}: only fisher and sqrt_fisher take an estimator, one of "
                f"{', '.join(FISHER_ESTIMATORS)}."
            )
        return cls(method, estimator or None, mode or None)

    @property
    def label(self) -> str:
        return f"{self.mode + ':' if self.mode else ''}{self.method}{'/' + self.estimator if self.estimator else ''}"

    @property
    def slug(self) -> str:
        return self.label.replace(":", "-").replace("/", "-")

    def changes(self) -> dict[str, Any]:
        out: dict[str, Any] = {"importance_method": self.method}
        if self.estimator:
            out["fisher_estimator"] = self.estimator
        if self.mode:
            out["ewc_mode"] = self.mode
        return out


def parse_lambdas(text: str) -> list[float]:
    """``"0.1,1,10"`` → ``[0.1, 1.0, 10.0]`` (sorted, unique); refuses empty, negative or non-numeric values."""
    values = []
    for item in str(text).split(","):
        try:
            value = float(item)
        except ValueError:
            raise HfEwcError(f"--lambdas: {item.strip()!r} is not a number; give values like 0.1,1,10.") from None
        if not (math.isfinite(value) and value > 0):
            raise HfEwcError(
                f"--lambdas: {item.strip()!r} must be a finite number > 0 (naive fine-tuning is run anyway)."
            )
        values.append(value)
    if not values:
        raise HfEwcError("--lambdas is empty; give values like 0.1,1,10.")
    return sorted(set(values))


def choose(cells: list[dict], naive: dict, min_gain_kept: float) -> dict:
    """Shares of naive's forgetting removed and gain kept per cell (in place); the best λ per method and overall. Where
    naive fine-tuning did not forget (F ≤ 0) or gained nothing (G ≤ 0) the shares are undefined (None) and no λ is
    chosen: there is nothing for EWC to trade."""
    forgot, gained = naive["forgetting"], naive["gain"]
    defined = forgot > 0 and gained > 0
    for cell in cells:
        cell["forgetting_removed"] = 1.0 - cell["forgetting"] / forgot if defined else None
        cell["gain_kept"] = cell["gain"] / gained if defined else None
    best, overall = {}, None
    for label in dict.fromkeys(c["method"] for c in cells):
        eligible = [c for c in cells if c["method"] == label and defined and c["gain_kept"] >= min_gain_kept]
        choice = max(eligible, key=lambda c: c["forgetting_removed"]) if eligible else None
        best[label] = None if choice is None else {k: choice[k] for k in ("lam", "forgetting_removed", "gain_kept")}
        if choice is not None and (overall is None or choice["forgetting_removed"] > overall["forgetting_removed"]):
            overall = {"method": label, **best[label]}
    return {"per_method": best, "overall": overall}


class Sweep:
    """Runs the cells of a λ sweep over the run config mapping ``raw`` (see the module docstring)."""

    def __init__(
        self,
        raw: dict,
        *,
        source: str | None,
        lambdas: list[float],
        methods: list[MethodSpec],
        min_gain_kept: float,
        resume: bool = False,
        overwrite: bool = False,
        keep_models: bool = False,
        objective: str = "domains",
        print_fn=print,
    ):
        if not 0 < min_gain_kept <= 1:
            raise HfEwcError(f"--min-gain-kept must be in (0, 1] (a share of naive's gain), got {min_gain_kept}.")
        if resume and overwrite:
            raise HfEwcError("--resume and --overwrite exclude each other: keep the sweep, or replace it.")
        self.raw, self.source = copy.deepcopy(raw), source
        self.objective = _check_objective(objective, self.raw.get("general_eval"))
        # every cell is compared with the sweep's own naive run; `best.yaml` keeps the config's choice
        self.baseline = self.raw.pop("baseline", None)
        # under `accelerate launch` every process runs every cell; the sweep's own files are the main process's
        self.accel = PartialState()
        self.lambdas, self.methods, self.min_gain_kept = lambdas, methods, min_gain_kept
        self.resume, self.overwrite, self.keep_models, self.print = resume, overwrite, keep_models, print_fn
        self.out = Path(self.raw["output_dir"])
        self.raw["disable_tqdm"] = True
        self.record = {"config": self.raw, "lambdas": lambdas, "methods": [m.label for m in methods]}
        if objective != "domains":
            self.record["objective"] = objective
        self.runs = [(m, self._cell_config(m, lam, self.out / "runs" / f"{m.slug}-lambda-{lam:g}")) for m in methods
                     for lam in lambdas]  # fmt: skip
        naive = self._cell_config(MethodSpec("uniform"), lambdas[0], self.out / "runs" / "naive")
        naive["ewc_mode"] = "off"  # importances of the later domains are never used: uniform ones cost nothing
        self.naive = naive
        for config in [naive, *(c for _, c in self.runs)]:  # every cell's config is valid before anything runs
            built = build_run_config(config, source=source)
            if built.training_args(0, built.output_dir).ewc_mode == "clnp":
                raise HfEwcError(
                    "hf-ewc sweep searches λ, which ewc_mode: clnp does not have (its knobs are clnp_margin and "
                    "clnp_l1); compare CLNP with naive fine-tuning by `baseline: naive` in hf-ewc train."
                )
        if len(build_run_config(naive, source=source).domains) < 2:
            raise HfEwcError("A sweep needs a sequence of at least two domains (forgetting is measured on the first).")

    def _cell_config(self, method: MethodSpec, lam: float, out: Path) -> dict:
        raw = copy.deepcopy(self.raw)
        raw.update(method.changes(), ewc_lambda=lam, output_dir=str(out))
        return raw

    # ------------------------------------------------------------------------------------------------ the run
    def _check_output_dir(self) -> None:
        entries = sorted(p.name for p in self.out.iterdir()) if self.out.is_dir() else []
        if self.out.exists() and not self.out.is_dir():
            raise HfEwcError(f"output_dir {str(self.out)!r} is a file; choose a directory for the sweep.")
        foreign = [e for e in entries if e not in SWEEP_ARTEFACTS and e not in (LOCK_NAME, LOCK_OWNER_NAME)]
        if foreign:
            raise HfEwcError(
                f"output_dir {str(self.out)!r} holds files a sweep did not write ({', '.join(foreign[:3])}); choose a "
                "new or empty directory (--output_dir DIR)."
            )
        if not entries:
            return
        if self.overwrite:
            if self.accel.is_main_process:
                for entry in entries:
                    path = self.out / entry
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            self.accel.wait_for_everyone()
            return
        if not self.resume:
            raise HfEwcError(
                f"output_dir {str(self.out)!r} already holds a sweep; pass --resume to reuse its finished runs or "
                "--overwrite to replace it."
            )
        recorded = _read_json(self.out / SWEEP_CONFIG_NAME)
        if recorded is not None and recorded != json.loads(json.dumps(self.record)):
            raise HfEwcError(
                f"--resume: {self.out} holds a sweep of another config, λ grid, method list or --objective; use the "
                "same arguments, or a new output_dir."
            )

    def run(self) -> dict:
        self._check_output_dir()
        firsts = {m: self._first(m) for m in self.methods}  # bad data fails here, before anything is written
        if self.objective != "domains":  # the scores are known now: a column the config does not measure is refused
            general = next(iter(firsts.values())).run_dir.read_json(PROGRESS_NAME)["initial"]["general"]
            self.column = general["shown"][0] if self.objective == "general" else self.objective
            if self.column not in general["columns"]:
                raise HfEwcError(
                    f"--objective {self.objective!r} is not a general_eval score of this config; choose one of: "
                    f"{', '.join(general['columns'])}."
                )
        main = self.accel.is_main_process
        if main:
            write_json_atomic(self.out / SWEEP_CONFIG_NAME, self.record)
        cells = []
        bar = tqdm(total=1 + len(self.runs), desc="sweep", unit="run", disable=not main)
        naive = self._cell(self.naive, firsts[self.methods[0]], "naive", None)
        bar.update()
        for method, config in self.runs:
            cells.append(self._cell(config, firsts[method], method.label, config["ewc_lambda"]))
            cell = cells[-1]
            if main:
                bar.write(f"{method.label:>18}  λ={cell['lam']:<8g} F={cell['forgetting']:.4g}  G={cell['gain']:.4g}")
            bar.update()
        bar.close()
        choice = choose(cells, naive, self.min_gain_kept)
        report = {"naive": naive, "cells": cells, "choice": choice, **self.record, "min_gain_kept": self.min_gain_kept}
        if main:
            self._report(report)
        self.accel.wait_for_everyone()
        return report

    def _report(self, report: dict) -> None:
        cells, naive, choice = report["cells"], report["naive"], report["choice"]
        write_json_atomic(self.out / "sweep.json", report)
        self._write_markdown(report)
        curves: dict[str, list] = {}
        for cell in cells:
            if cell["gain_kept"] is not None:
                curves.setdefault(cell["method"], []).append(
                    (cell["lam"], cell["gain_kept"], cell["forgetting_removed"])
                )
        best = choice["overall"]
        plot_frontier(
            curves, self.out / "frontier.png", min_gain_kept=self.min_gain_kept, title=" → ".join(naive["domains"]),
            best=(best["method"], best["lam"]) if best else None,
        )  # fmt: skip
        if best is not None:
            self._write_best(best)
        if not self.keep_models:  # every cell has finished: the first-domain runs are not needed any more
            _drop_weights(self.out / "first")
        self.print(self._summary(report))

    def _first(self, method: MethodSpec) -> Pipeline:
        """The first domain with ``method``'s consolidation, run once and stopped there (resumable)."""
        config = self._cell_config(method, self.lambdas[0], self.out / "first" / method.slug)
        pipeline = Pipeline(build_run_config(config, source=self.source), resume="auto", print_fn=None)
        with _quiet(self._log(f"first-{method.slug}")):
            pipeline.run_sequence(stop_after=0)
        return pipeline

    def _cell(self, config: dict, first: Pipeline, label: str, lam: float | None) -> dict:
        pipeline = Pipeline(build_run_config(config, source=self.source), resume="auto", print_fn=None)
        if not (pipeline.out / PROGRESS_NAME).is_file():  # new (or its seeding was interrupted): start from the copy
            self.accel.wait_for_everyone()  # every process has looked before the main one rewrites it
            if self.accel.is_main_process:
                shutil.rmtree(pipeline.out, ignore_errors=True)
                pipeline.out.mkdir(parents=True)
            pipeline.run_dir.seed_from(first.run_dir, pipeline.record(), 1)
        with _quiet(self._log(pipeline.out.name)):
            results = pipeline.run_sequence()
        if not self.keep_models and self.accel.is_main_process:
            _drop_weights(pipeline.out)
        metric = results["metric"]
        cell = {
            "method": label, "lam": lam, "run": str(pipeline.out), "domains": results["domains"], "metric": metric,
            "matrix": results["matrix"][metric], "initial": results["initial"][metric], **forgetting_and_gain(results),
            "last_logs": [d["train"]["last_log"] for d in results["domains_detail"]],
        }  # fmt: skip
        if self.objective != "domains":  # general ability's forgetting; the domains' stays alongside
            general = results["general_eval"]
            cell.update(
                objective=self.column, forgetting_domains=cell["forgetting"],
                forgetting=general["forgetting_after_first"][self.column], general_rows=general["rows"],
            )  # fmt: skip
        return cell

    def _log(self, name: str) -> Path:
        rank = self.accel.process_index
        return self.out / "logs" / (f"{name}.log" if rank == 0 else f"{name}.rank{rank}.log")

    # ------------------------------------------------------------------------------------------------ reports
    def _write_best(self, best: dict) -> None:
        method = next(m for m in self.methods if m.label == best["method"])
        raw = self._cell_config(method, best["lam"], self.out / "best")
        base_dirs = [Path.cwd()] + ([Path(self.source).resolve().parent] if self.source else [])
        for i, domain in enumerate(raw["domains"]):
            if domain.get("data_files") is not None:  # absolute: best.yaml runs from anywhere
                domain["data_files"] = resolve_data_files(domain["data_files"], base_dirs, f"domains.{i}")
        general = raw.get("general_eval")
        if isinstance(general, dict) and general.get("include_path"):  # task folders as the runs found them
            spec = build_run_config(raw, source=self.source).general_eval
            raw["general_eval"] = {**general, "include_path": GeneralEvaluator(spec, base_dirs).include_paths[1:]}
        raw.pop("disable_tqdm", None)
        if self.baseline is not None:
            raw["baseline"] = self.baseline
        path = self.out / "best.yaml"
        text = f"# hf-ewc train {path}\n# λ chosen by hf-ewc sweep (sweep.md): {best['method']}, λ = {best['lam']:g}\n"
        with atomic_path(path) as tmp:
            Path(tmp).write_text(text + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")

    def _summary(self, report: dict) -> str:
        naive, best = report["naive"], report["choice"]["overall"]
        lines = [f"naive fine-tuning: forgetting {naive['forgetting']:.4g}, gain {naive['gain']:.4g}"]
        for label, choice in report["choice"]["per_method"].items():
            lines.append(
                f"{label}: no λ keeps ≥ {self.min_gain_kept:.0%} of the gain" if choice is None else
                f"{label}: λ = {choice['lam']:g} removes {choice['forgetting_removed']:.0%} of the forgetting, keeps "
                f"{choice['gain_kept']:.0%} of the gain"
            )  # fmt: skip
        if not (naive["forgetting"] > 0 and naive["gain"] > 0):
            lines.append("naive fine-tuning did not forget (or gained nothing): there is nothing for EWC to trade")
        elif best is None:
            lines.append(f"no cell keeps ≥ {self.min_gain_kept:.0%} of naive's gain: try smaller λ")
        else:
            lines.append(f"chosen: {best['method']}, λ = {best['lam']:g} → {self.out / 'best.yaml'}")
        return "\n".join(lines)

    def _write_markdown(self, report: dict) -> None:
        naive, names = report["naive"], report["naive"]["domains"]
        per_method = report["choice"]["per_method"]
        forgetting = (
            "Forgetting F = −BWT"
            if "objective" not in naive
            else f"Forgetting F = the drop of general ability's {naive['objective']} after the first domain"
        )
        rule = (
            f"Metric: {naive['metric']}. {forgetting}, gain G = Σ of the later domains' learned; removed = "
            f"1 − F/F_naive, kept = G/G_naive. Rule: per method, the most forgetting removed among the λ that keep ≥ "
            f"{self.min_gain_kept:.0%} of the gain."
        )
        naive_line = (
            f"Naive fine-tuning: F = {naive['forgetting']:.4g}, G = {naive['gain']:.4g}, ACC = {naive['acc']:.4g}."
        )
        lines = [f"# hf-ewc sweep: {' → '.join(names)}", "", rule, "", naive_line, ""]
        lines += ["| method | λ | F | removed | G | kept | ACC | |", "|---|---|---|---|---|---|---|---|"]
        for cell in report["cells"]:
            chosen = per_method.get(cell["method"]) or {}
            mark = "★" if chosen.get("lam") == cell["lam"] else ""
            removed, kept = _pct(cell["forgetting_removed"]), _pct(cell["gain_kept"])
            lines.append(
                f"| {cell['method']} | {cell['lam']:g} | {cell['forgetting']:.4g} | {removed} | {cell['gain']:.4g} | "
                f"{kept} | {cell['acc']:.4g} | {mark} |"
            )
        lines += ["", "★ the method's best λ by the rule.", "", "```", self._summary(report), "```", ""]
        with atomic_path(self.out / "sweep.md") as tmp:
            Path(tmp).write_text("\n".join(lines), encoding="utf-8")


def _check_objective(objective: str, general_eval: Any) -> str:
    """``domains``, ``general`` (the first general_eval score) or ``TASK/METRIC`` of a task the config evaluates."""
    if objective == "domains":
        return objective
    if not general_eval:
        raise HfEwcError(
            f"--objective {objective}: the config has no general_eval block to measure general ability with; add one "
            "(README: General-ability forgetting) or use --objective domains."
        )
    if objective != "general" and "/" not in objective:
        raise HfEwcError(
            f"--objective {objective!r}: give domains, general, or a general_eval score as TASK/METRIC (e.g. "
            "hf_ewc_prose_cloze/acc; a run's results.md lists them)."
        )
    return objective


def _pct(share: float | None) -> str:
    return "—" if share is None else f"{share:.0%}"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


@contextlib.contextmanager
def _quiet(log: Path):
    """The Trainer's per-step log lines go to ``log``, not to the terminal (written once the run has started: a run
    refused on bad input leaves no log behind)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        if buffer.getvalue():
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a", encoding="utf-8") as f:
                f.write(buffer.getvalue())


def _drop_weights(run: Path) -> None:
    """A finished cell keeps its results, plots, card and logs; its weights (and EWC state) go."""
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES and is_run_artefact(path.relative_to(run).parts[0]):
            path.unlink()  # results.json stays: it is what --resume reuses
