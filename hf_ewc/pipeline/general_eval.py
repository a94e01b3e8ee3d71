"""The optional `general_eval:` block: general ability measured with lm-evaluation-harness before the first domain and
after each one, so a run reports the forgetting LLM users care about (the benchmarks a model was good at before), not
only its own domains'.

    general_eval:
      tasks: [hf_ewc_prose_cloze, hf_ewc_prose_ppl]   # harness task or group names
      limit: 200              # documents per task (a fraction if < 1); null: all
      num_fewshot: 0          # null: each task's own default
      batch_size: 16
      include_path: my_tasks  # folders of task YAMLs, relative to the config (the shipped tasks are always found)

The in-memory model is scored with ``HFLM(pretrained=model)`` on the main process (every process holds the whole model
under DDP) and the scores are broadcast; the global random states are restored afterwards, so a run with the block
trains exactly as one without it. Offline, local task YAMLs with local data work (two ship with hf_ewc, see
``hf_ewc/resources/lm_eval``); online, any harness task by name. lm-eval is the optional ``lm-eval`` extra.
"""

import contextlib
import copy
import difflib
import functools
import importlib.util
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from ..utils import HfEwcError, error_line


SHIPPED_TASKS = Path(__file__).resolve().parent.parent / "resources" / "lm_eval"
INSTALL = "pip install 'hf-ewc[lm-eval]'"


@dataclass
class GeneralEvalSpec:
    """The `general_eval:` block (see the module docstring)."""

    tasks: list = field(default_factory=list)
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    include_path: str | list | None = None
    max_length: int | None = None  # None: the model's own (max_position_embeddings)


def check_general_eval_spec(spec: GeneralEvalSpec, task: str) -> None:
    """What can be checked without loading anything: the task kind, the values, and that lm-eval is installed."""
    if task != "causal_lm":
        raise HfEwcError(
            f"general_eval: lm-evaluation-harness scores causal language models, and this run's task is {task}; "
            "drop the general_eval block."
        )
    if not spec.tasks or not all(isinstance(t, str) and t for t in spec.tasks):
        raise HfEwcError(
            "general_eval.tasks must be a non-empty list of harness task names, e.g. [hf_ewc_prose_cloze]."
        )
    if spec.limit is not None and not (math.isfinite(spec.limit) and spec.limit > 0):
        raise HfEwcError(f"general_eval.limit must be > 0 (documents per task, or a fraction < 1), got {spec.limit}.")
    if spec.limit is not None and spec.limit >= 1 and spec.limit != int(spec.limit):
        raise HfEwcError(f"general_eval.limit {spec.limit} must be a whole number of documents or a fraction < 1.")
    if spec.num_fewshot is not None and spec.num_fewshot < 0:
        raise HfEwcError(f"general_eval.num_fewshot must be >= 0, got {spec.num_fewshot}.")
    if spec.batch_size < 1:
        raise HfEwcError(f"general_eval.batch_size must be >= 1, got {spec.batch_size}.")
    if spec.max_length is not None and spec.max_length < 2:
        raise HfEwcError(f"general_eval.max_length must be >= 2, got {spec.max_length}.")
    if importlib.util.find_spec("lm_eval") is None:
        raise HfEwcError(f"general_eval needs lm-evaluation-harness, which is not installed; run: {INSTALL}")


@functools.lru_cache(maxsize=4)
def _task_manager(include_paths: tuple[str, ...]):
    """lm-eval's task index (built-in tasks plus ``include_paths``): indexing takes seconds, so it is built once."""
    from lm_eval.tasks import TaskManager  # optional dependency (the lm-eval extra)

    return TaskManager(include_path=list(include_paths))


@contextlib.contextmanager
def _quiet_and_seeded():
    """lm-eval seeds the global random generators and logs at length: both are put back as they were."""
    python, numpy = random.getstate(), np.random.get_state()
    loggers = {name: logging.getLogger(name).level for name in ("lm_eval", "lm-eval")}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:  # the CPU generator and every visible CUDA device's
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)


def column_name(task: str, metric_key: str) -> str:
    """``("hf_ewc_prose_cloze", "acc,none")`` → ``"hf_ewc_prose_cloze/acc"``; another filter in brackets."""
    metric, _, filtering = metric_key.partition(",")
    return f"{task}/{metric}" + (f"[{filtering}]" if filtering and filtering != "none" else "")


class GeneralEvaluator:
    """Scores a model on the `general_eval:` tasks (see the module docstring).

    Args:
        spec ([`GeneralEvalSpec`]): the block.
        base_dirs (`list[Path]`): where relative ``include_path`` folders are looked for (the working directory, the
            config's folder).
    """

    def __init__(self, spec: GeneralEvalSpec, base_dirs: list[Path]):
        self.spec = spec
        paths = [spec.include_path] if isinstance(spec.include_path, str) else list(spec.include_path or [])
        self.include_paths = [str(SHIPPED_TASKS)]
        for path in paths:
            found = next((b / path for b in base_dirs if (b / path).is_dir()), None)
            if found is None:
                where = ", ".join(str(b) for b in base_dirs)
                raise HfEwcError(f"general_eval.include_path {path!r} is not a folder (looked in {where}).")
            self.include_paths.append(str(found.resolve()))

    @property
    def manager(self):
        return _task_manager(tuple(self.include_paths))

    def check(self) -> None:
        """Every task exists and its data loads (before anything is written): an unknown name is refused with where
        it was looked for."""
        manager = self.manager
        for name in self.spec.tasks:
            if name not in manager.all_tasks:
                close = difflib.get_close_matches(name, manager.all_tasks, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                extra = ", ".join(self.include_paths[1:]) or "no general_eval.include_path"
                raise HfEwcError(
                    f"general_eval.tasks: unknown task {name!r}; looked in lm-eval's built-in tasks, hf_ewc's "
                    f"shipped tasks ({SHIPPED_TASKS}) and {extra}{hint}; add the folder of its YAML to "
                    "general_eval.include_path."
                )
        try:
            with _quiet_and_seeded():
                manager.load(list(self.spec.tasks))
        except Exception as err:  # noqa: BLE001 - offline Hub, a broken YAML, missing data: one line, nothing written
            raise HfEwcError(
                f"general_eval: the tasks {', '.join(self.spec.tasks)} could not be loaded ({error_line(err)}); a "
                "Hub task needs the network (or its dataset in the cache), a local one its data files."
            ) from None

    def evaluate(self, model, tokenizer) -> dict:
        """``{"columns": [...], "shown": [...], "scores": {column: value}, "stderr": {...}, "higher_is_better":
        {...}, "samples": {task: n}, "seconds": s}``, computed on the main process and the same on every process
        (an error there is raised on every process). ``columns`` follow ``tasks``' order (a group's members after
        it); ``shown`` are those of the names asked for (a tag's members, which have none of their own)."""
        state = PartialState()
        result: list = [None]
        if state.is_main_process:
            try:
                result[0] = self._evaluate(model, tokenizer)
            except HfEwcError as err:
                result[0] = {"error": str(err)}
        if state.num_processes > 1:
            broadcast_object_list(result)
        if "error" in result[0]:
            raise HfEwcError(result[0]["error"])
        return result[0]

    def _evaluate(self, model, tokenizer) -> dict:
        from lm_eval import simple_evaluate  # optional dependency (the lm-eval extra)
        from lm_eval.models.huggingface import HFLM  # optional dependency (the lm-eval extra)

        t0 = time.perf_counter()
        was_training = model.training
        limit = int(self.spec.limit) if self.spec.limit is not None and self.spec.limit >= 1 else self.spec.limit
        try:
            with _quiet_and_seeded():
                # a copy: the harness may give the tokenizer a padding token, which must not reach the saved run
                lm = HFLM(
                    pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=self.spec.batch_size,
                    max_length=self.spec.max_length,
                )  # fmt: skip
                out = simple_evaluate(
                    model=lm, tasks=list(self.spec.tasks), num_fewshot=self.spec.num_fewshot, limit=limit,
                    task_manager=self.manager, log_samples=False, bootstrap_iters=1000, verbosity="ERROR",
                )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - the harness's asserts and errors: one line, with the likely cause
            if isinstance(err, AssertionError):
                hint = (
                    "a prompt or continuation longer than the model's context (max_position_embeddings, or "
                    "general_eval.max_length) fails this way"
                )
            elif isinstance(err, MemoryError) or "out of memory" in str(err).lower():
                hint = "lower general_eval.batch_size"
            else:
                hint = "see the harness's message"
            raise HfEwcError(
                f"general_eval: lm-eval could not score the model on {', '.join(self.spec.tasks)} "
                f"({error_line(err)}); {hint}."
            ) from None
        finally:
            model.train(was_training)
        scores, stderr, higher = {}, {}, {}
        members = out.get("group_subtasks", {})
        order = {}  # each result's place: the task asked for, then its group's members, then a tag's
        for k, name in enumerate(self.spec.tasks):
            order.setdefault(name, (k, 0))
            for member in members.get(name, []):
                order.setdefault(member, (k, 1))
        results = sorted(out["results"].items(), key=lambda item: order.get(item[0], (len(self.spec.tasks), 2)))
        for task, metrics in results:
            for key, value in metrics.items():
                metric = key.partition(",")[0]
                if metric.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if metric in ("sample_len", "sample_count"):
                    continue
                column = column_name(task, key)
                scores[column] = float(value)
                err = metrics.get(f"{metric}_stderr,{key.partition(',')[2]}")
                stderr[column] = float(err) if isinstance(err, (int, float)) else None
                higher[column] = bool(out.get("higher_is_better", {}).get(task, {}).get(metric, True))
        asked = [c for c in scores if c.split("/", 1)[0] in self.spec.tasks]
        tags = any(name not in out["results"] for name in self.spec.tasks)  # a tag has no result of its own
        shown = [c for c in scores if c in asked or (tags and order.get(c.split("/", 1)[0], (0, 2))[1] == 2)]
        return {
            "columns": list(scores),
            "shown": shown or list(scores),
            "scores": scores,
            "stderr": stderr,
            "higher_is_better": higher,
            "samples": {t: n.get("effective") for t, n in out.get("n-samples", {}).items()},
            "seconds": time.perf_counter() - t0,
        }


# -------------------------------------------------------------------------------------------------- results
def general_results(progress: dict, names: list[str], baseline: dict | None = None) -> dict | None:
    """The ``general_eval`` block of ``results.json``: the scores before the sequence (``initial``) and after each
    domain (``rows``, one per domain, like the matrix's), their change over the whole sequence, and the forgetting
    after the first domain per score (the drop from the row after the first domain to the last row, signed so that
    positive is worse for any metric: what a penalty consolidated after the first domain can protect). With the
    ``baseline`` run's own block, its rows and forgetting sit alongside."""
    initial = progress["initial"].get("general")
    if initial is None:
        return None
    rows = [c["general"] for c in progress["completed"]]
    columns = initial["columns"]  # (progress.json sorts the keys of `scores`: the order is kept here)
    higher = initial["higher_is_better"]
    first, final = rows[0]["scores"], rows[-1]["scores"]
    result = {
        "columns": columns,
        "shown": initial["shown"],
        "higher_is_better": higher,
        "labels": ["before", *(f"after {n}" for n in names)],
        "initial": initial["scores"],
        "rows": [r["scores"] for r in rows],
        "stderr": [initial["stderr"], *(r["stderr"] for r in rows)],
        "samples": initial["samples"],
        "change": {c: final[c] - initial["scores"][c] for c in columns},
        "forgetting_after_first": {c: (1 if higher[c] else -1) * (first[c] - final[c]) for c in columns},
        "seconds": initial["seconds"] + sum(r["seconds"] for r in rows),
    }
    if baseline is not None:
        result["baseline"] = {k: baseline[k] for k in ("rows", "change", "forgetting_after_first")}
    return result


def general_markdown(general: dict, h: str) -> list[str]:
    """The scores table (before the sequence, after each domain) and the forgetting line, as Markdown."""
    columns = general["shown"]  # a group's members stay in results.json
    samples = general["samples"]
    tasks = [t for t in dict.fromkeys(c.split("/", 1)[0] for c in general["columns"]) if t in samples]
    parts = [
        f"{h} General ability (lm-evaluation-harness)",
        "",
        f"Documents per task (the first of each): {', '.join(f'{t} {samples[t]}' for t in tasks)}. "
        + ", ".join(f"{c} {'↑' if general['higher_is_better'][c] else '↓'}" for c in columns)
        + " (↑ higher is better); ± the harness's standard error where it gives one.",
        "",
        "| | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label, row, err in zip(general["labels"], [general["initial"], *general["rows"]], general["stderr"]):
        cells = [f"{row[c]:.4g}" + (f" ± {err[c]:.2g}" if err.get(c) is not None else "") for c in columns]
        parts.append(f"| {label} | " + " | ".join(cells) + " |")
    forgetting, baseline = general["forgetting_after_first"], general.get("baseline")
    parts.append(
        "| forgetting after the first domain (+ worse) | "
        + " | ".join(
            f"{forgetting[c]:+.4g}" + (f" (naive {baseline['forgetting_after_first'][c]:+.4g})" if baseline else "")
            for c in columns
        )
        + " |"
    )
    return [*parts, ""]
