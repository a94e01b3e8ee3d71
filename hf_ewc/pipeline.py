"""The domain sequence, written out once: train → evaluate on every domain → collect → consolidate → save.

``output_dir`` while a run is in progress::

    run_config.json      the resolved config (what `--resume` compares against)
    progress.json        the initial evaluation row and every finished domain's row, written atomically
    stages/<i>-<name>/   the model, tokenizer and EWC state after the latest finished domain (`initial` before any)
    domains/<i>-<name>/  the Trainer's output for that domain (checkpoints while it trains, logs)

and once it is done: the final model and tokenizer at the top (``from_pretrained(output_dir)`` works), ``ewc_state/``,
``results.json``, ``results.md``, ``matrix.png``, ``trajectories.png`` and the model card ``README.md``.

Every step is restartable: a finished domain is never retrained, an interrupted one resumes from its last Trainer
checkpoint (EWC state and SI sums included), and a model for domain i is always read back from the stage saved after
domain i−1, so a resumed run computes exactly what an uninterrupted one computes.
"""

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from torch.utils.data import DataLoader
from transformers.trainer_utils import get_last_checkpoint

from . import __version__
from .adapters import (
    BASE_MODEL_DIR,
    check_adapter_matches,
    check_wraps,
    hub_base_of,
    is_adapter_dir,
    parameter_summary,
    wrap_model,
)
from .config import RunConfig
from .data import (
    AUTO_MODELS,
    DomainData,
    _check_task,
    _texts,
    build_model,
    check_max_length,
    eval_collator,
    label_names,
    load_raw_domain,
    load_tokenizer,
    tokenize_domain,
    train_collator,
    train_tokenizer,
)
from .importance._collect import check_world_size
from .metrics import continual_metrics, format_matrix, format_summary, perplexity, plot_matrix, plot_trajectories
from .state import STATE_DIR, STATE_WEIGHTS_NAME, EWCState, find_ewc_state
from .trainer import EWCTrainer
from .utils import HfEwcError, atomic_path, logger, versions, write_json_atomic


RUN_CONFIG_NAME = "run_config.json"
PROGRESS_NAME = "progress.json"
RESULTS_NAME = "results.json"
# Keys that may differ between a run and its `--resume` (they do not change what is computed).
_RESUME_FREE_KEYS = ("output_dir", "report_to", "logging_steps", "disable_tqdm", "log_level", "run_name")


@dataclass
class _Prepared:
    tokenizer: Any
    model: Any  # the initial model (None when resuming past the initial stage)
    domains: list[DomainData]
    labels: list | None
    initial_state: EWCState | None
    base_source: Path | None = None  # a `peft:` run: the base model to copy to output_dir/base_model (else: save it)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        out = {}
        for i, value in enumerate(obj):
            out.update(_flatten(value, f"{prefix}{i}."))
        out[f"{prefix}len"] = len(obj)
        return out
    return {prefix.rstrip("."): obj}


def config_differences(old: dict, new: dict) -> list[str]:
    """``["ewc_lambda: 100 → 50", ...]``: what differs between two run configs (keys free to change excluded)."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[-1] in _RESUME_FREE_KEYS and "." not in key:
            continue
        missing = "(unset)"
        if a.get(key, missing) != b.get(key, missing):
            out.append(f"{key}: {a.get(key, missing)!r} → {b.get(key, missing)!r}")
    return out


class Pipeline:
    """Run a `RunConfig` end to end (see the module docstring for what lands in ``output_dir``).

    Args:
        run ([`RunConfig`]): the configuration (`hf_ewc.config.load_run_config`).
        resume (`bool`): continue the run already in ``output_dir`` (it must come from the same config).
        overwrite (`bool`): replace a finished or interrupted run in ``output_dir``.
        from_dir (`str`, *optional*): start from a previous run's final model and EWC state (a continual-ready
            checkpoint): the new domains are protected against forgetting the old ones, without the old data.
        print_fn: where progress tables go (``print`` by default; ``None`` for silence).
    """

    def __init__(
        self,
        run: RunConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        from_dir: str | os.PathLike | None = None,
        print_fn=print,
    ):
        if resume and overwrite:
            raise HfEwcError("--resume and --overwrite exclude each other: keep the run, or replace it.")
        self.run = run
        self.resume = resume
        self.overwrite = overwrite
        self.from_dir = str(Path(from_dir).resolve()) if from_dir is not None else None
        self.out = Path(run.output_dir)
        # The first domain's EWCConfig sets up the process group exactly as its Trainer will (`use_cpu`,
        # ACCELERATE_USE_CPU, the launcher's environment); `PartialState` then shares that state. (A sharded launch
        # was refused when the config was validated, before anything is written.)
        self._eval_batch_size = run.training_args(0, str(self.out)).per_device_eval_batch_size
        self.accel = PartialState()
        check_world_size(self.accel)
        quiet = print_fn is None or not self.accel.is_main_process  # progress tables once, not once per process
        self.print = (lambda *a, **k: None) if quiet else print_fn
        self._metrics: dict[str, Any] = {}
        self._hub_base: str | None = None
        self.base_dirs = [Path.cwd()] + ([Path(run.source).resolve().parent] if run.source else [])

    # ---------------------------------------------------------------------------------------------- bookkeeping
    def _record(self) -> dict:
        return {"config": self.run.to_dict(), "from": self.from_dir, "hf_ewc": __version__}

    def _read_json(self, name: str) -> dict | None:
        path = self.out / name
        if not path.is_file():
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def _check_output_dir(self) -> dict | None:
        """Decide what to do with ``output_dir`` before anything is written; returns the progress to resume."""
        out = self.out
        if self.from_dir is not None and Path(self.from_dir).resolve().is_relative_to(out.resolve()):
            raise HfEwcError(f"--from {self.from_dir} lies inside output_dir {out}; write the new run elsewhere.")
        if out.exists() and not out.is_dir():
            raise HfEwcError(f"output_dir {str(out)!r} is a file; choose a directory.")
        entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        recorded = self._read_json(RUN_CONFIG_NAME) if entries else None
        if entries and recorded is None:
            raise HfEwcError(
                f"output_dir {str(out)!r} is not empty and holds no hf-ewc run ({', '.join(entries[:3])}"
                f"{', …' if len(entries) > 3 else ''}); choose a new or empty directory."
            )
        if recorded is None:
            if self.resume:
                logger.info(f"--resume: no run in {out} yet; starting one.")
            return None
        if self.overwrite:
            unknown = [e for e in entries if not _is_run_artefact(e)]
            if unknown:
                raise HfEwcError(
                    f"--overwrite: {out} also holds files hf-ewc did not write ({', '.join(unknown[:3])}); move them "
                    "or choose a new output_dir."
                )
            return None
        if not self.resume:
            raise HfEwcError(
                f"output_dir {str(out)!r} already holds a run; pass --resume to continue it or --overwrite to "
                "replace it."
            )
        mine = self._record()
        differences = config_differences(recorded.get("config", {}), mine["config"])
        if recorded.get("from") != mine["from"]:
            differences.append(f"--from: {recorded.get('from')!r} → {mine['from']!r}")
        if differences:
            shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
            raise HfEwcError(
                f"--resume: {out} holds a run of a different config ({shown}); use the same config, or a new "
                "output_dir."
            )
        return self._read_json(PROGRESS_NAME) or {"initial": None, "completed": []}

    def _stage_dir(self, index: int | None) -> Path:
        return self.out / "stages" / ("initial" if index is None else f"{index}-{self.run.domains[index].name}")

    def _domain_dir(self, index: int) -> Path:
        return self.out / "domains" / f"{index}-{self.run.domains[index].name}"

    def _write_progress(self, progress: dict) -> None:
        if self.accel.is_main_process:
            write_json_atomic(self.out / PROGRESS_NAME, progress)

    # ---------------------------------------------------------------------------------------------- preparation
    def _raw_domains(self):
        run = self.run
        raws = [
            load_raw_domain(d, i, task=run.task, seed=run.seed, base_dirs=self.base_dirs)
            for i, d in enumerate(run.domains)
        ]
        labels = label_names(raws, run.domains) if run.task == "sequence_classification" else None
        return raws, labels

    def _tokenize(self, raws, labels, tokenizer) -> list[DomainData]:
        run = self.run
        label2id = {v: i for i, v in enumerate(labels)} if labels is not None else None
        return [
            tokenize_domain(
                raw, d, i, tokenizer, task=run.task, max_length=run.model.max_length, seed=run.seed, label2id=label2id
            )
            for i, (raw, d) in enumerate(zip(raws, run.domains))
        ]

    def load_domains(self, tokenizer) -> list[DomainData]:
        """The run's domains, tokenized with ``tokenizer`` exactly as the run does (train and evaluation splits)."""
        raws, labels = self._raw_domains()
        return self._tokenize(raws, labels, tokenizer)

    def _prepare(self, progress: dict | None) -> _Prepared:
        """Everything that can fail on bad input, done before anything is written."""
        run = self.run
        raws, labels = self._raw_domains()
        initial_state = None
        resumed_stage = None  # every stage holds the tokenizer: read it from the latest
        if progress and progress.get("initial") is not None:
            done = len(progress["completed"])
            resumed_stage = self._stage_dir(done - 1 if done else None)
        model = None
        if self.from_dir is not None:
            state_dir = find_ewc_state(self.from_dir)
            if not ((Path(self.from_dir) / "config.json").is_file() or is_adapter_dir(self.from_dir)):
                raise HfEwcError(
                    f"--from {self.from_dir}: no model there (config.json missing); give a finished run's output_dir."
                )
            if state_dir is None:
                raise HfEwcError(
                    f"--from {self.from_dir}: no EWC state there (ewc_state/{STATE_WEIGHTS_NAME}); give the "
                    "output_dir of a finished hf-ewc run or a directory saved with EWCState.save()."
                )
            initial_state = EWCState.load(state_dir)
            tokenizer = load_tokenizer(self.from_dir, revision=None, trust_remote_code=False, task=run.task)
        elif resumed_stage is not None:
            tokenizer = load_tokenizer(str(resumed_stage), revision=None, trust_remote_code=False, task=run.task)
        elif run.model.config is not None and run.model.tokenizer is None:
            tokenizer = train_tokenizer(run.task, _texts(raws, run.domains), run.model.tokenizer_vocab_size)
        else:
            spec = run.model
            tokenizer = load_tokenizer(
                spec.tokenizer or spec.name_or_path,
                revision=spec.revision,
                trust_remote_code=spec.trust_remote_code,
                task=run.task,
            )
        domains = self._tokenize(raws, labels, tokenizer)
        base_source = None
        if self.from_dir is not None and is_adapter_dir(self.from_dir) != (run.peft is not None):
            raise HfEwcError(
                f"--from {self.from_dir} is a "
                + (
                    "LoRA run: continue it with the same peft: block in the config."
                    if run.peft is None
                    else "full fine-tuning run whose EWC state protects weights LoRA would freeze: drop the peft: "
                    "block, or start the LoRA sequence from its model with `model.name_or_path`."
                )
            )
        if run.peft is not None:  # what the adapters' configs name as their base (a local path never leaves here)
            name = run.model.name_or_path
            self._hub_base = (
                hub_base_of(self.from_dir) if self.from_dir else (name if name and not os.path.exists(name) else None)
            )
        if self.from_dir is not None and run.peft is not None:
            base_source = Path(self.from_dir) / BASE_MODEL_DIR
            if not (base_source / "config.json").is_file():
                raise HfEwcError(
                    f"--from {self.from_dir}: the adapter's base model is missing ({BASE_MODEL_DIR}/config.json); "
                    "give the output_dir of a finished LoRA run of hf-ewc, which keeps its base model there."
                )
        if resumed_stage is None:
            if self.from_dir is not None:
                model = self._load_model(self.from_dir, labels, base_dir=base_source)
                if run.peft is not None:
                    check_adapter_matches(model, run.peft, f"--from {self.from_dir}")
                initial_state.validate(model, strict=False)
            else:
                model = build_model(run, tokenizer, labels)
                if run.peft is not None:
                    check_wraps(model, run.peft, run.task)
        return _Prepared(tokenizer, model, domains, labels, initial_state, base_source)

    def _load_model(self, directory: str | os.PathLike, labels: list | None = None, base_dir: Path | None = None):
        """The model saved in ``directory``; an adapter (a `peft:` run's stage or output) is loaded trainable onto the
        frozen base model in ``base_dir`` (this run's ``base_model/`` for stages, the old run's for ``--from``)."""
        if is_adapter_dir(directory):
            from .adapters import load_adapter

            base_dir = base_dir if base_dir is not None else self.out / BASE_MODEL_DIR
            return load_adapter(self._load_model(base_dir, labels), directory, trainable=True)
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(directory)
        except (OSError, ValueError) as err:
            raise HfEwcError(f"Cannot read the model config in {directory}: {str(err).splitlines()[0]}") from None
        _check_task(self.run.task, config, f"model in {directory}")
        check_max_length(config, self.run.model.max_length, f"model in {directory}")
        if labels is not None:
            expected = {str(v): i for i, v in enumerate(labels)}
            if dict(getattr(config, "label2id", {}) or {}) != expected:
                raise HfEwcError(
                    f"The model in {directory} has labels {dict(config.label2id)} but the domains have {expected}; "
                    "continue with domains that use the same labels."
                )
        try:
            return AUTO_MODELS[self.run.task].from_pretrained(directory)
        except (OSError, ValueError, RuntimeError) as err:
            raise HfEwcError(f"Cannot load the model in {directory}: {str(err).splitlines()[0]}") from None

    # ---------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model, data: DomainData, tokenizer) -> dict[str, float]:
        """Token-weighted loss (and perplexity) for LMs, accuracy and loss for classification, on ``data.eval``."""
        spec = next(d for d in self.run.domains if d.name == data.name)
        module = self._metric_module(spec.metric) if spec.metric else None
        return evaluate_model(
            model, data.eval, self.run.task, tokenizer, batch_size=self._eval_batch_size, metric=(spec.metric, module)
        )

    def _metric_module(self, name: str):
        """An `evaluate` metric by local path or Hub name, or None (with one warning) when it cannot be loaded."""
        if name not in self._metrics:
            module = None
            path = next((b / name for b in self.base_dirs if (b / name).exists()), None)
            try:
                import evaluate

                module = evaluate.load(str(path) if path is not None else name)
            except Exception as err:  # noqa: BLE001 - missing package, offline Hub, broken script: all mean "skip it"
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                logger.warning(f"Metric {name!r} could not be loaded ({reason}); using the built-in metrics only.")
            self._metrics[name] = module
        return self._metrics[name]

    def _row(self, model, prepared: _Prepared) -> dict[str, dict[str, float]]:
        return {d.name: self.evaluate(model, d, prepared.tokenizer) for d in prepared.domains}

    @property
    def primary_metric(self) -> tuple[str, bool]:
        return ("accuracy", True) if self.run.task == "sequence_classification" else ("loss", False)

    # ---------------------------------------------------------------------------------------------- stages
    def _save_stage(self, index: int | None, model, tokenizer, state: EWCState | None) -> None:
        if not self.accel.is_main_process:
            return
        final = self._stage_dir(index)
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for config in getattr(model, "peft_config", {}).values():  # else PEFT records this run's base_model/ path
            config.base_model_name_or_path = self._hub_base
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if state is not None and not state.is_empty:
            state.save(tmp / STATE_DIR)
        shutil.rmtree(final, ignore_errors=True)  # left by an attempt interrupted before progress.json said so
        os.replace(tmp, final)

    def _save_base_model(self, prepared: _Prepared) -> None:
        """A `peft:` run keeps its frozen base model once, in ``output_dir/base_model``; stages hold adapters only.
        The model is wrapped after the base is saved (LoRA's initialisation seeded, the same on every process)."""
        from transformers import set_seed

        if self.accel.is_main_process:
            final = self.out / BASE_MODEL_DIR
            tmp = final.with_name(f".{final.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if prepared.base_source is not None:
                shutil.copytree(prepared.base_source, tmp)
            else:
                prepared.model.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.accel.wait_for_everyone()
        if prepared.base_source is None:
            set_seed(self.run.seed)
            prepared.model = wrap_model(prepared.model, self.run.peft, self.run.task)

    def _load_stage(self, index: int | None, prepared: _Prepared) -> tuple[Any, EWCState | None]:
        stage = self._stage_dir(index)
        model = self._load_model(stage, prepared.labels)
        state_dir = stage / STATE_DIR
        state = EWCState.load(state_dir) if (state_dir / STATE_WEIGHTS_NAME).is_file() else None
        if state is None and prepared.initial_state is not None:
            state = prepared.initial_state
        return model, state

    def _cleanup(self, progress: dict) -> None:
        """Drop what finished domains no longer need: their checkpoints and every stage but the latest."""
        if not self.accel.is_main_process:
            return
        done = len(progress["completed"])
        keep = self._stage_dir(done - 1 if done else None).name
        stages = self.out / "stages"
        if stages.is_dir():
            for path in stages.iterdir():
                if path.name != keep:
                    shutil.rmtree(path, ignore_errors=True)
        for i in range(done):
            domain_dir = self._domain_dir(i)
            if domain_dir.is_dir():
                for path in domain_dir.glob("checkpoint-*"):
                    shutil.rmtree(path, ignore_errors=True)
                if not any(domain_dir.iterdir()):
                    domain_dir.rmdir()
        domains = self.out / "domains"
        if domains.is_dir() and not any(domains.iterdir()):
            domains.rmdir()

    # ---------------------------------------------------------------------------------------------- the loop
    def run_sequence(self) -> dict:
        """Run (or resume) the whole sequence; returns the results written to ``results.json``."""
        run = self.run
        progress = self._check_output_dir()
        if progress is not None and progress.get("finished"):
            results = self._read_json(RESULTS_NAME)
            if results is not None and results.get("summary") is not None:
                names, metric = results["domains"], results["metric"]
                self.print(f"[hf_ewc] {self.out} holds a finished run of this config; nothing to do.\n")
                matrix, initial = results["matrix"][metric], results["initial"][metric]
                self.print(format_matrix(matrix, names, metric=metric, initial=initial))
                self.print("\n" + format_summary(results["summary"], names, metric=metric))
                return results
            progress["finished"] = False  # interrupted while finishing: finish again (the stage is still there)
        started = time.perf_counter()
        prepared = self._prepare(progress)
        self.accel.wait_for_everyone()  # every process has read output_dir before the main one writes to it
        if self.accel.is_main_process:
            if self.overwrite and self.out.exists():
                for entry in self.out.iterdir():  # only what a run writes (checked in _check_output_dir)
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            self.out.mkdir(parents=True, exist_ok=True)
            if progress is None:
                write_json_atomic(self.out / RUN_CONFIG_NAME, self._record())
        self.accel.wait_for_everyone()
        if progress is None:
            progress = {"initial": None, "completed": [], "finished": False}
        names = [d.name for d in run.domains]
        metric, _ = self.primary_metric

        if progress.get("initial") is None:
            if run.peft is not None:
                self._save_base_model(prepared)
            t0 = time.perf_counter()
            row = self._row(prepared.model, prepared)
            self._save_stage(None, prepared.model, prepared.tokenizer, prepared.initial_state)
            progress["initial"] = {"row": row, "eval_seconds": time.perf_counter() - t0}
            self._write_progress(progress)
            self.accel.wait_for_everyone()
        initial_row = _metric_row(progress["initial"]["row"], names, metric)
        shown = ", ".join(f"{n} {v:.3f}" for n, v in zip(names, initial_row))
        self.print(f"[hf_ewc] before training, {metric}: {shown}")
        prepared.model = None

        for i, spec in enumerate(run.domains):
            if i < len(progress["completed"]):
                continue
            self._cleanup(progress)
            self.print(f"\n[hf_ewc] domain {i + 1}/{len(run.domains)}: {spec.name}")
            entry = self._run_domain(i, prepared, progress)
            progress["completed"].append(entry)
            self._write_progress(progress)
            self.accel.wait_for_everyone()
            self._cleanup(progress)
            shown = ", ".join(f"{n} {v:.3f}" for n, v in zip(names, _metric_row(entry["row"], names, metric)))
            self.print(f"[hf_ewc] after {spec.name}, {metric}: {shown}")

        self._cleanup(progress)  # also when a kill came between the last progress update and its cleanup
        results = self._finish(progress, prepared, time.perf_counter() - started)
        return results

    def _run_domain(self, index: int, prepared: _Prepared, progress: dict) -> dict:
        run, spec, data = self.run, self.run.domains[index], prepared.domains[index]
        model, state = self._load_stage(index - 1 if index else None, prepared)
        domain_dir = self._domain_dir(index)
        args = run.training_args(index, str(domain_dir))
        trainer = EWCTrainer(
            model=model,
            args=args,
            data_collator=train_collator(run.task, prepared.tokenizer),
            train_dataset=data.train,
            processing_class=prepared.tokenizer,
            ewc_state=state,
            callbacks=_sparsity_callbacks(model),
        )
        checkpoint = self._last_complete_checkpoint(domain_dir)
        if checkpoint is not None:
            logger.info(f"Resuming {spec.name} from {checkpoint}.")
        t0 = time.perf_counter()
        # `num_train_epochs: 0` (or `max_steps: 0`) on a domain: the model already knows it (say, the pretraining
        # corpus of a pretrained model); evaluate and consolidate only, so later domains protect it.
        skip = args.max_steps == 0 or (args.max_steps < 0 and args.num_train_epochs == 0)
        if skip and args.importance_method == "si":
            raise HfEwcError(
                f"domains.{index} ({spec.name}) has no training steps, but SI importances come from training; use "
                "fisher, mas, signal or uniform, or train on the domain."
            )
        train_output = None if skip else trainer.train(resume_from_checkpoint=checkpoint)
        t1 = time.perf_counter()
        row = self._row(trainer.model, prepared)
        t2 = time.perf_counter()
        state = trainer.consolidate(data.train, domain=spec.name)
        t3 = time.perf_counter()
        pruning = None
        if run.prune is not None and index == run.prune_after:
            pruning, row = self._prune(trainer._plain_model(), state, row, prepared)
        self._save_stage(index, trainer._plain_model(), prepared.tokenizer, state)
        self.accel.wait_for_everyone()
        train_logs = [log for log in trainer.state.log_history if "loss" in log or "ewc/penalty" in log]
        return {
            "parameters": parameter_summary(trainer._plain_model()),
            **({"pruning": pruning} if pruning is not None else {}),
            "domain": spec.name,
            "row": row,
            "train": {
                "steps": trainer.state.global_step,
                "resumed_from": Path(checkpoint).name if checkpoint else None,
                "metrics": {
                    k: v
                    for k, v in (train_output.metrics if train_output else {}).items()
                    if isinstance(v, (int, float))
                },
                "last_log": train_logs[-1] if train_logs else {},
                "examples": data.stats,
            },
            "timings": {"train_seconds": t1 - t0, "eval_seconds": t2 - t1, "importance_seconds": t3 - t2},
        }

    def _prune(self, model, state: EWCState, row: dict, prepared: _Prepared) -> tuple[dict, dict]:
        """The `prune:` block: prune by the just-consolidated state, fit the state to the pruned model (anchors of
        pruned weights 0, removed rows cut), record the sparsity in the config, evaluate again."""
        from .pruning import prune_model

        spec = self.run.prune
        report = prune_model(
            model, spec.sparsity, criterion=spec.criterion,
            importances=state if spec.criterion != "magnitude" else None, scope=spec.scope, structure=spec.structure,
            include=spec.include, exclude=spec.exclude, show_progress=False,
        )  # fmt: skip
        report.apply_to_state(state)
        model.config.sparsity_config = report.sparsity_config()
        after = self._row(model, prepared)
        self.print(f"[hf_ewc] pruned: {report.summary()}")
        return {"report": report.to_dict(), "row_before": row}, after

    def _last_complete_checkpoint(self, domain_dir: Path) -> str | None:
        """The latest Trainer checkpoint that was fully written (``trainer_state.json`` is its last file); a
        checkpoint cut short by a kill is removed so that the Trainer neither resumes from nor rotates into it."""
        if not domain_dir.is_dir():
            return None
        while (checkpoint := get_last_checkpoint(str(domain_dir))) is not None:
            if _readable_json(Path(checkpoint) / "trainer_state.json"):
                return checkpoint
            logger.warning(f"{checkpoint} was not fully written (interrupted while saving); removing it.")
            if self.accel.is_main_process:
                shutil.rmtree(checkpoint)
            self.accel.wait_for_everyone()
        return None

    # ---------------------------------------------------------------------------------------------- the end
    def _finish(self, progress: dict, prepared: _Prepared, seconds: float) -> dict:
        from .card import write_model_card

        run = self.run
        names = [d.name for d in run.domains]
        metric, higher = self.primary_metric
        matrices = {
            key: [[c["row"][n][key] for n in names] for c in progress["completed"]]
            for key in progress["completed"][0]["row"][names[0]]
            if key != "extra"
        }
        extra = {
            n: [c["row"][n].get("extra", {}) for c in progress["completed"]]
            for n in names
            if "extra" in progress["completed"][0]["row"][n]
        }
        initial = {key: [progress["initial"]["row"][n][key] for n in names] for key in matrices}
        finite = all(math.isfinite(v) for row in [*matrices[metric], initial[metric]] for v in row)
        if finite:
            summary = continual_metrics(matrices[metric], higher_is_better=higher, initial=initial[metric])
        else:  # a diverged run still gets its results written, so it can be inspected
            logger.warning(f"Some {metric} values are not finite (the training diverged); no summary or plots.")
            summary = None
        last_stage = self._stage_dir(len(names) - 1)
        state_dir = last_stage / STATE_DIR
        state = EWCState.load(state_dir) if (state_dir / STATE_WEIGHTS_NAME).is_file() else None
        results = {
            "task": run.task,
            "domains": names,
            "metric": metric,
            "higher_is_better": higher,
            "matrix": matrices,
            "initial": initial,
            "summary": summary,
            "extra_metrics": extra,
            "domains_detail": [
                {"name": c["domain"], "train": c["train"], "timings": c["timings"]} for c in progress["completed"]
            ],
            "ewc_state": (state.metadata | state.summary()) if state is not None else None,
            "parameters": progress["completed"][-1].get("parameters"),
            "pruning": next(
                ({"after": c["domain"], **c["pruning"]} for c in progress["completed"] if "pruning" in c), None
            ),
            "config": self.run.to_dict(),
            "from": self.from_dir,
            "versions": versions(),
            "timings": {
                "total_seconds_this_invocation": seconds,
                "initial_eval_seconds": progress["initial"]["eval_seconds"],
                "train_seconds": sum(c["timings"]["train_seconds"] for c in progress["completed"]),
                "eval_seconds": sum(c["timings"]["eval_seconds"] for c in progress["completed"]),
                "importance_seconds": sum(c["timings"]["importance_seconds"] for c in progress["completed"]),
            },
        }
        if finite:
            table = format_matrix(matrices[metric], names, metric=metric, initial=initial[metric])
            text_summary = format_summary(summary, names, metric=metric)
        else:
            table = "\n".join(f"after {n}: {row}" for n, row in zip(names, matrices[metric]))
            text_summary = "(no summary: non-finite values)"
        if self.accel.is_main_process:
            if not progress.get("finished"):
                self._publish_stage(last_stage)
            write_json_atomic(self.out / RESULTS_NAME, results)
            markdown = _results_markdown(results, names, metric)
            with atomic_path(self.out / "results.md") as tmp:
                Path(tmp).write_text(f"# hf-ewc results: {' → '.join(names)}\n\n{markdown}", encoding="utf-8")
            if finite:
                plot_matrix(
                    matrices[metric], names, self.out / "matrix.png", metric=metric, higher_is_better=higher,
                    title=f"{metric} after each domain",
                )  # fmt: skip
                plot_trajectories(
                    matrices[metric], names, self.out / "trajectories.png", metric=metric, initial=initial[metric],
                    title=f"{metric} of each domain over the sequence",
                )  # fmt: skip
            tables = _results_markdown(results, names, metric, level=3)
            write_model_card(self.out, run=run, results=results, markdown_tables=tables, from_dir=self.from_dir)
            progress["finished"] = True
            self._write_progress(progress)
            shutil.rmtree(self.out / "stages", ignore_errors=True)
        self.accel.wait_for_everyone()
        self.print("\n" + table + "\n\n" + text_summary)
        self.print(f"\n[hf_ewc] results, model, EWC state and model card in {self.out}")
        return results

    def _publish_stage(self, stage: Path) -> None:
        """Copy the last stage (model, tokenizer, EWC state) to the top of ``output_dir``, file by file, atomically."""
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                target = self.out / path.relative_to(stage)
                with atomic_path(target) as tmp:
                    shutil.copyfile(path, tmp)


_RUN_ARTEFACTS = (
    "run_config.json", "progress.json", "results.json", "results.md", "matrix.png", "trajectories.png", "README.md",
    "ewc_state", "stages", "domains", "config.json", "generation_config.json", "special_tokens_map.json",
    "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja", "added_tokens.json", BASE_MODEL_DIR,
    "adapter_config.json",
)  # fmt: skip


def _sparsity_callbacks(model) -> list:
    """A pruned model (its config carries `sparsity_config`, from a `prune:` block or `hf-ewc prune`) keeps its
    zeroed weights at zero while it trains on; physically removed structures need nothing."""
    from .pruning import KeepSparsityCallback

    sparsity = getattr(model.config, "sparsity_config", None)
    if not isinstance(sparsity, dict) or sparsity.get("removal") == "physical":
        return []
    params = dict(model.named_parameters())
    if not any(bool((params[n] == 0).any()) for n in sparsity.get("per_layer_sparsity", {}) if n in params):
        return []
    return [KeepSparsityCallback.from_zeros(model)]  # reads the same sparsity_config


def _is_run_artefact(name: str) -> bool:
    """What `hf-ewc train` (and `save_pretrained` of a model and tokenizer) writes at the top of output_dir."""
    return (
        name in _RUN_ARTEFACTS
        or name.startswith(("model", "tokenizer", ".", "pytorch_model", "runs"))
        or name.endswith((".safetensors", ".tmp"))
    )


def _readable_json(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def _metric_row(row: dict, names: list[str], metric: str) -> list[float]:
    return [row[n][metric] for n in names]


def _results_markdown(results: dict, names: list[str], metric: str, level: int = 2) -> str:
    """The matrices (primary metric first) and the summary as Markdown, headings at ``level``."""
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
    return "\n".join(parts)


@torch.no_grad()
def evaluate_model(
    model, dataset, task: str, tokenizer, *, batch_size: int = 8, metric: tuple[str, Any] | None = None
) -> dict[str, Any]:
    """Token-weighted cross-entropy (and perplexity) for language models, accuracy and loss for classification.

    ``dataset`` is tokenized as by [`tokenize_domain`] (its eval part: masked LM inputs masked once); ``metric`` is an
    optional ``(name, evaluate module)`` computed on the labelled positions.
    """
    name, module = metric if metric is not None else (None, None)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=eval_collator(task, tokenizer))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions: list[int] = []
    references: list[int] = []
    total, count, correct = 0.0, 0, 0
    try:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            if task == "causal_lm":
                logits, labels = logits[:, :-1], labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((labels != -100).sum())
            if task == "sequence_classification":
                correct += int((logits.argmax(-1) == labels).sum())
            if module is not None:  # labelled positions only (tokens for LMs, one per example otherwise)
                keep = labels != -100
                predictions += logits.argmax(-1)[keep].tolist()
                references += labels[keep].tolist()
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    if task == "sequence_classification":
        cell = {"accuracy": correct / max(count, 1), "loss": loss}
    else:
        cell = {"loss": loss, "perplexity": perplexity(loss)}
    if module is not None:
        values = module.compute(predictions=predictions, references=references) or {}
        cell["extra"] = {f"{name}:{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))}
    return cell


def run_pipeline(run: RunConfig, **kwargs: Any) -> dict:
    """`Pipeline(run, **kwargs).run_sequence()`."""
    return Pipeline(run, **kwargs).run_sequence()
