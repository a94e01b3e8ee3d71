"""The domain sequence, written out once: train → evaluate on every domain → collect → consolidate → save.

Every step is restartable: a finished domain is never retrained, an interrupted one resumes from its last Trainer
checkpoint (EWC state and SI sums included), and a model for domain i is always read back from the stage saved after
domain i−1, so a resumed run computes exactly what an uninterrupted one computes. Where things lie in ``output_dir``
is [`RunDir`]'s business; what can fail on bad input happens in [`prepare`], before anything is written.
"""

import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from accelerate import PartialState

from .._version import __version__
from ..clnp import CLNP
from ..distributed import check_world_size
from ..sparsity import KeepSparsityCallback
from ..state import EWCState
from ..trainer import EWCTrainer
from ..utils import HfEwcError, logger
from .adapters import parameter_summary
from .data import DomainData, train_collator
from .evaluation import DomainEvaluator, primary_metric
from .general_eval import GeneralEvaluator
from .prepare import Prepared, load_domains, load_stage, prepare, save_base_and_wrap
from .prune import prune_in_run
from .results import collect_results, results_text, write_results
from .run_config import RunConfig, build_run_config
from .run_dir import PROGRESS_NAME, RESULTS_NAME, RUN_CONFIG_NAME, RunDir, config_differences


class Pipeline:
    """Run a `RunConfig` end to end (see [`RunDir`] for what lands in ``output_dir``).

    Args:
        run ([`RunConfig`]): the configuration (`hf_ewc.pipeline.load_run_config`).
        resume (`bool` or `"auto"`): `True` continues the run in ``output_dir`` (it must exist and come from the same
            config); `"auto"` continues it if there is one and starts one otherwise.
        overwrite (`bool`): replace a finished or interrupted run in ``output_dir``.
        from_dir (`str`, *optional*): start from a previous run's final model and EWC state (a continual-ready
            checkpoint): the new domains are protected against forgetting the old ones, without the old data.
        print_fn: where progress tables go (``print`` by default; ``None`` for silence).
    """

    def __init__(
        self,
        run: RunConfig,
        *,
        resume: bool | Literal["auto"] = False,
        overwrite: bool = False,
        from_dir: str | os.PathLike | None = None,
        print_fn=print,
    ):
        if resume and overwrite:
            raise HfEwcError("--resume and --overwrite exclude each other: keep the run, or replace it.")
        if from_dir is not None and run.baseline is not None:
            raise HfEwcError(
                "--from and baseline: exclude each other (the continued run's first domain carries a penalty, so a "
                "baseline cannot share it); drop baseline: for this run."
            )
        self.run = run
        self.resume = resume
        self.overwrite = overwrite
        self.from_dir = str(Path(from_dir).resolve()) if from_dir is not None else None
        self.out = Path(run.output_dir)
        # The first domain's EWCConfig sets up the process group exactly as its Trainer will (`use_cpu`,
        # ACCELERATE_USE_CPU, the launcher's environment); `PartialState` then shares that state. (A sharded launch
        # was refused when the config was validated, before anything is written.)
        eval_batch_size = run.training_args(0, str(self.out)).per_device_eval_batch_size
        self.accel = PartialState()
        check_world_size(self.accel)
        quiet = print_fn is None or not self.accel.is_main_process  # progress tables once, not once per process
        self.print = (lambda *a, **k: None) if quiet else print_fn
        self.base_dirs = [Path.cwd()] + ([Path(run.source).resolve().parent] if run.source else [])
        self.run_dir = RunDir(self.out, [d.name for d in run.domains], self.accel)
        self.evaluator = DomainEvaluator(run, self.base_dirs, eval_batch_size)
        self.general = GeneralEvaluator(run.general_eval, self.base_dirs) if run.general_eval is not None else None
        self.metric = self.primary_metric[0]
        # CLNP's first domain trains with its L1 and frees units: the naive baseline cannot share it
        self.clnp = run.training_args(0, str(self.out)).ewc_mode == "clnp"

    def load_domains(self, tokenizer) -> list[DomainData]:
        """The run's domains, tokenized with ``tokenizer`` exactly as the run does (train and evaluation splits)."""
        return load_domains(self.run, tokenizer, self.base_dirs)

    def evaluate(self, model, data: DomainData, tokenizer) -> dict[str, float]:
        """Token-weighted loss (and perplexity) for LMs, accuracy and loss for classification, on ``data.eval``."""
        return self.evaluator.evaluate(model, data, tokenizer)

    @property
    def primary_metric(self) -> tuple[str, bool]:
        """The matrix's metric and whether higher is better (accuracy for classification, eval loss for LMs)."""
        return primary_metric(self.run.task)

    def record(self) -> dict:
        """What this run writes to ``run_config.json`` (and what `--resume` compares)."""
        return {"config": self.run.to_dict(), "from": self.from_dir, "hf_ewc": __version__}

    def can_resume(self) -> bool:
        """Whether ``output_dir`` holds a run of this very config, which `--resume` would continue."""
        recorded = self.run_dir.read_json(RUN_CONFIG_NAME) if (self.out / RUN_CONFIG_NAME).is_file() else None
        return (
            recorded is not None
            and recorded.get("from") == self.from_dir
            and not config_differences(recorded.get("config", {}), self.record()["config"])
        )

    def _show_row(self, when: str, row: dict, general: dict | None = None) -> None:
        shown = ", ".join(f"{n} {row[n][self.metric]:.3f}" for n in self.run_dir.names)
        self.print(f"[hf_ewc] {when}, {self.metric}: {shown}")
        if general is not None:
            scores = ", ".join(f"{c} {v:.4g}" for c, v in general["scores"].items())
            self.print(f"[hf_ewc] {when}, general_eval: {scores}")

    def _general_eval(self, model, tokenizer) -> dict | None:
        """The `general_eval:` scores of ``model`` (None without the block)."""
        return self.general.evaluate(model, tokenizer) if self.general is not None else None

    # ---------------------------------------------------------------------------------------------- the sequence
    def run_sequence(self, *, stop_after: int | None = None) -> dict:
        """Run (or resume) the whole sequence; returns the results written to ``results.json``.

        With ``stop_after=k`` it stops once domain k is done (trained, evaluated, consolidated, its stage saved) and
        returns the run's progress instead: the run directory stays resumable (what `hf-ewc sweep` shares)."""
        # validated before anything is written, then again under the directory's lock (another run may have
        # started in between)
        self.run_dir.check(self.record(), resume=self.resume, overwrite=self.overwrite, from_dir=self.from_dir)
        with self.run_dir.hold():
            return self._run_sequence(stop_after)

    def _run_sequence(self, stop_after: int | None) -> dict:
        run, run_dir = self.run, self.run_dir
        progress = run_dir.check(self.record(), resume=self.resume, overwrite=self.overwrite, from_dir=self.from_dir)
        if progress is not None and progress.get("finished"):
            results = run_dir.read_json(RESULTS_NAME)
            if results is not None and results.get("summary") is not None:
                self.print(f"[hf_ewc] {self.out} holds a finished run of this config; nothing to do.\n")
                self.print(results_text(results))
                return results
            progress["finished"] = False  # interrupted while finishing: finish again (the stage is still there)
        started = time.perf_counter()
        # The main process first: it fills the datasets cache (and writes nothing else here), the others then read it
        # instead of building the same cache files at the same moment.
        with self.accel.main_process_first():
            prepared = prepare(run, run_dir, progress=progress, from_dir=self.from_dir, base_dirs=self.base_dirs)
            if self.general is not None:
                self.general.check()  # unknown tasks, data that does not load: refused before anything is written
        # the scores before the sequence, also before anything is written: a model the tasks do not fit is refused
        general = self._general_eval(prepared.model, prepared.tokenizer) if prepared.model is not None else None
        run_dir.start(self.record(), fresh=progress is None, overwrite=self.overwrite)
        if progress is None:
            progress = {"initial": None, "completed": [], "finished": False}

        if progress.get("initial") is None:
            if run.peft is not None:
                save_base_and_wrap(run, run_dir, prepared)
            t0 = time.perf_counter()
            row = self.evaluator.row(prepared.model, prepared.domains, prepared.tokenizer)
            progress["initial"] = {"row": row, "eval_seconds": time.perf_counter() - t0}
            self._save_stage(None, prepared.model, prepared, prepared.initial_state)
            if general is not None:
                progress["initial"]["general"] = general
            run_dir.write_progress(progress)
            self.accel.wait_for_everyone()
        self._show_row("before training", progress["initial"]["row"], progress["initial"].get("general"))
        prepared.model = None

        for i, spec in enumerate(run.domains):
            if stop_after is not None and i > stop_after:
                return progress
            if i == 1 and run.baseline is not None and not self.clnp:
                self._seed_baseline()
            if i < len(progress["completed"]):
                continue
            run_dir.cleanup(len(progress["completed"]))
            self.print(f"\n[hf_ewc] domain {i + 1}/{len(run.domains)}: {spec.name}")
            entry = self._run_domain(i, prepared)
            progress["completed"].append(entry)
            run_dir.write_progress(progress)
            self.accel.wait_for_everyone()
            run_dir.cleanup(len(progress["completed"]))
            self._show_row(f"after {spec.name}", entry["row"], entry.get("general"))

        run_dir.cleanup(len(progress["completed"]))  # also when a kill came between a progress update and cleanup
        return self._finish(progress, time.perf_counter() - started)

    def _run_domain(self, index: int, prepared: Prepared) -> dict:
        run, spec, data = self.run, self.run.domains[index], prepared.domains[index]
        model, state = load_stage(run, self.run_dir, index - 1 if index else None, prepared)
        args = run.training_args(index, str(self.run_dir.domain(index)))
        sparsity = KeepSparsityCallback.from_sparsity_config(model)  # a pruned model keeps its zeros
        trainer = EWCTrainer(
            model=model,
            args=args,
            data_collator=train_collator(run.task, prepared.tokenizer),
            train_dataset=data.train,
            processing_class=prepared.tokenizer,
            ewc_state=state,
            callbacks=[sparsity] if sparsity is not None else [],
        )
        checkpoint = self.run_dir.last_complete_checkpoint(index)
        if checkpoint is not None:
            logger.info(f"Resuming {spec.name} from {checkpoint}.")
        t0 = time.perf_counter()
        # `num_train_epochs: 0` (or `max_steps: 0`) on a domain: the model already knows it (say, the pretraining
        # corpus of a pretrained model); evaluate and consolidate only, so later domains protect it.
        skip = args.max_steps == 0 or (args.max_steps < 0 and args.num_train_epochs == 0)
        train_output = None if skip else trainer.train(resume_from_checkpoint=checkpoint)
        t1 = time.perf_counter()
        model = trainer.accelerator.unwrap_model(trainer.model)
        units = None
        if trainer.clnp is None:
            row = self.evaluator.row(model, prepared.domains, prepared.tokenizer)
            t2 = time.perf_counter()
            state = trainer.consolidate(data.train, domain=spec.name)
            timings = {"eval_seconds": t2 - t1, "importance_seconds": time.perf_counter() - t2}
        else:  # CLNP frees the units the domain does not need: evaluation comes after it, under each domain's units
            state = trainer.consolidate(data.train, domain=spec.name)
            t2 = time.perf_counter()
            row, units = self._clnp_evaluation(trainer.clnp, model, prepared)
            timings = {"eval_seconds": time.perf_counter() - t2, "importance_seconds": t2 - t1}
        pruning = None
        if run.prune is not None and index == run.prune_after:
            report = prune_in_run(model, state, run.prune)
            pruning, row = (
                {"report": report.to_dict(), "row_before": row},
                self.evaluator.row(model, prepared.domains, prepared.tokenizer),
            )
            self.print(f"[hf_ewc] pruned: {report.summary()}")
        general = self._general_eval(model, prepared.tokenizer)  # with every unit on, for CLNP
        self._save_stage(index, model, prepared, state)
        self.accel.wait_for_everyone()
        train_logs = [log for log in trainer.state.log_history if "loss" in log or "ewc/penalty" in log]
        metrics = train_output.metrics if train_output else {}
        return {
            "parameters": parameter_summary(model),
            **({"pruning": pruning} if pruning is not None else {}),
            **({"clnp": units} if units is not None else {}),
            **({"general": general} if general is not None else {}),
            "domain": spec.name,
            "row": row,
            "train": {
                "steps": trainer.state.global_step,
                "resumed_from": Path(checkpoint).name if checkpoint else None,
                "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                "last_log": train_logs[-1] if train_logs else {},
                "examples": data.stats,
            },
            "timings": {"train_seconds": t1 - t0, **timings},
        }

    def _clnp_evaluation(self, clnp: CLNP, model, prepared: Prepared) -> tuple[dict, dict]:
        """CLNP's row, task-incremental: every domain learned so far under its own units (``clnp.domain``), the
        others as the model stands; and the old domains' row without a domain id (every unit on), whose drop is the
        forgetting CLNP does not remove."""
        row, without = {}, {}
        for data in prepared.domains:
            if data.name in clnp.domains:
                with clnp.domain(data.name):
                    row[data.name] = self.evaluate(model, data, prepared.tokenizer)
                if data.name != clnp.domains[-1]:
                    without[data.name] = self.evaluate(model, data, prepared.tokenizer)
            else:
                row[data.name] = self.evaluate(model, data, prepared.tokenizer)
        return row, {"units": clnp.history[-1], "row_without_domain_id": without, "history": list(clnp.history)}

    # ---------------------------------------------------------------------------------------------- stages
    def _save_stage(self, index: int | None, model, prepared: Prepared, state: EWCState | None) -> None:
        self.run_dir.save_stage(index, model, prepared.tokenizer, state, hub_base=prepared.hub_base)

    def _baseline(self) -> "Pipeline":
        """The `baseline: naive` run: this sequence without EWC, in ``output_dir/baseline``."""
        config = build_run_config(self.run.baseline_config(), source=self.run.source)
        return Pipeline(config, resume="auto", print_fn=None)

    def _seed_baseline(self) -> None:
        """Start the baseline from this run's first domain (no penalty there, so the two are the same), before its
        stage is dropped; a baseline already started resumes on its own."""
        baseline = self._baseline()
        if not (baseline.out / PROGRESS_NAME).is_file():
            if self.accel.is_main_process:
                shutil.rmtree(baseline.out, ignore_errors=True)
                baseline.out.mkdir(parents=True)
            baseline.run_dir.seed_from(self.run_dir, baseline.record(), 1)

    def _finish(self, progress: dict, seconds: float) -> dict:
        last_stage = self.run_dir.stage(len(self.run.domains) - 1)
        state = self.run_dir.state_in(last_stage)
        baseline = None
        if self.run.baseline is not None:
            self.print("\n[hf_ewc] baseline: the same sequence with naive fine-tuning (ewc_mode: off)")
            pipeline = self._baseline()
            baseline = (pipeline.run_sequence(), str(pipeline.out))
        results = collect_results(
            self.run, progress, state=state, from_dir=self.from_dir, seconds=seconds, baseline=baseline
        )
        if self.accel.is_main_process:
            if not progress.get("finished"):
                self.run_dir.publish(last_stage)
            write_results(self.out, self.run, results, from_dir=self.from_dir)
            progress["finished"] = True
            self.run_dir.write_progress(progress)
            self.run_dir.remove_stages()
        self.accel.wait_for_everyone()
        self.print("\n" + results_text(results))
        self.print(f"\n[hf_ewc] results, model, EWC state and model card in {self.out}")
        return results


def run_pipeline(run: RunConfig, **kwargs: Any) -> dict:
    """`Pipeline(run, **kwargs).run_sequence()`."""
    return Pipeline(run, **kwargs).run_sequence()
