"""The run directory of `hf-ewc train`: what lies where, whether a run may start, resume or overwrite, and atomic
stages. Only the main process writes; every process calls every method (the writing ones do nothing on the others,
and `start`, `save_base_model` and `last_complete_checkpoint` wait for all processes).

``output_dir`` while a run is in progress::

    run_config.json      the resolved config (what `--resume` compares against)
    progress.json        the initial evaluation row and every finished domain's row, written atomically
    stages/<i>-<name>/   the model, tokenizer and EWC state after the latest finished domain (`initial` before any)
    domains/<i>-<name>/  the Trainer's output for that domain (checkpoints while it trains, logs)
    base_model/          a `peft:` run's frozen base model (stages and the result hold adapters)

and once it is done: the final model and tokenizer at the top (``from_pretrained(output_dir)`` works), ``ewc_state/``,
``results.json``, ``results.md``, ``matrix.png``, ``trajectories.png`` and the model card ``README.md``.
"""

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers.trainer_utils import get_last_checkpoint

from ..state import STATE_DIR, STATE_WEIGHTS_NAME, EWCState
from ..utils import (
    HfEwcError,
    atomic_directory,
    atomic_path,
    hold_directory,
    is_hold_file,
    logger,
    write_json_atomic,
)
from .adapters import ADAPTER_CONFIG_NAME, BASE_MODEL_DIR


RUN_CONFIG_NAME = "run_config.json"
PROGRESS_NAME = "progress.json"
RESULTS_NAME = "results.json"
# Keys that may differ between a run and its `--resume` (they do not change what is computed).
RESUME_FREE_KEYS = ("output_dir", "report_to", "logging_steps", "disable_tqdm", "log_level", "run_name")
# What `hf-ewc train` (and `save_pretrained` of a model and tokenizer) writes at the top of output_dir.
RUN_ARTEFACTS = (
    RUN_CONFIG_NAME, PROGRESS_NAME, RESULTS_NAME, "results.md", "matrix.png", "trajectories.png", "README.md",
    STATE_DIR, "stages", "domains", "baseline", "config.json", "generation_config.json", "special_tokens_map.json",
    "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja", "added_tokens.json", BASE_MODEL_DIR,
    ADAPTER_CONFIG_NAME,
)  # fmt: skip


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
        if key.split(".")[-1] in RESUME_FREE_KEYS and "." not in key:
            continue
        missing = "(unset)"
        if a.get(key, missing) != b.get(key, missing):
            out.append(f"{key}: {a.get(key, missing)!r} → {b.get(key, missing)!r}")
    return out


def is_run_artefact(name: str) -> bool:
    """Whether ``name`` at the top of output_dir is something a run writes (what `--overwrite` may remove)."""
    return (
        name in RUN_ARTEFACTS
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


def _remove_if_only_lock(path: Path) -> None:
    with contextlib.suppress(OSError):
        if all(is_hold_file(p.name) for p in path.iterdir()):
            shutil.rmtree(path)


class RunDir:
    """``output_dir`` of one run over ``domain_names``, written by the main process of ``accel``."""

    def __init__(self, path: str | Path, domain_names: list[str], accel: PartialState):
        self.path = Path(path)
        self.names = list(domain_names)
        self.accel = accel

    # ------------------------------------------------------------------------------------------------ layout
    def stage(self, index: int | None) -> Path:
        """The stage after domain ``index`` (``None``: before the first domain)."""
        return self.path / "stages" / ("initial" if index is None else f"{index}-{self.names[index]}")

    def domain(self, index: int) -> Path:
        return self.path / "domains" / f"{index}-{self.names[index]}"

    def read_json(self, name: str) -> dict | None:
        path = self.path / name
        if not path.is_file():
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    @staticmethod
    def state_in(directory: Path) -> EWCState | None:
        """The EWC state a stage (or run) keeps in ``ewc_state/``, if any."""
        state_dir = directory / STATE_DIR
        return EWCState.load(state_dir) if (state_dir / STATE_WEIGHTS_NAME).is_file() else None

    # ------------------------------------------------------------------------------------------------ start
    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """One run per directory: the main process holds ``output_dir``'s lock for the whole run (every process
        raises if another run holds it, or if the directory cannot be made). Directories created here and left
        holding nothing but the lock (the run stopped on bad input before writing anything) are removed again."""
        created = [p for p in (self.path, *self.path.absolute().parents) if not p.exists()]
        refusal = None
        with contextlib.ExitStack() as held:
            if self.accel.is_main_process:
                try:
                    self.path.mkdir(parents=True, exist_ok=True)
                    held.enter_context(hold_directory(self.path))
                except (HfEwcError, OSError) as err:  # every process learns it, none waits for the others forever
                    refusal = str(err) if isinstance(err, HfEwcError) else f"output_dir {str(self.path)!r}: {err}"
            if self.accel.num_processes > 1:
                refusal = broadcast_object_list([refusal])[0]
            if refusal is not None:
                raise HfEwcError(refusal)
            try:
                yield
            finally:
                held.close()  # released before an empty directory is removed (never another process's)
                if created and self.accel.is_main_process:
                    _remove_if_only_lock(self.path)
                    for parent in created[1:]:  # the parents it made, innermost first, while they are empty
                        with contextlib.suppress(OSError):
                            parent.rmdir()

    def check(self, record: dict, *, resume: bool | str, overwrite: bool, from_dir: str | None) -> dict | None:
        """Decide what to do with ``output_dir`` before anything is written: refuse, start afresh (None) or return
        the progress to resume. ``record`` is what this run writes to ``run_config.json``."""
        out = self.path
        if from_dir is not None and Path(from_dir).resolve().is_relative_to(out.resolve()):
            raise HfEwcError(f"--from {from_dir} lies inside output_dir {out}; write the new run elsewhere.")
        if out.exists() and not out.is_dir():
            raise HfEwcError(f"output_dir {str(out)!r} is a file; choose a directory.")
        if not out.exists():  # it will be created: its nearest existing ancestor must be a writable directory
            ancestor = next(p for p in out.absolute().parents if p.exists())
            if not ancestor.is_dir():
                raise HfEwcError(f"output_dir {str(out)!r} cannot be created: {str(ancestor)!r} is a file.")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise HfEwcError(
                    f"output_dir {str(out)!r} cannot be created: {str(ancestor)!r} is not writable; choose another."
                )
        # a stale lock of a killed process is no run, nor the owner file another rank is writing right now
        entries = sorted(p.name for p in out.iterdir() if not is_hold_file(p.name)) if out.is_dir() else []
        recorded = self.read_json(RUN_CONFIG_NAME) if entries else None
        if entries and recorded is None:
            raise HfEwcError(
                f"output_dir {str(out)!r} is not empty and holds no hf-ewc run ({', '.join(entries[:3])}"
                f"{', …' if len(entries) > 3 else ''}); choose a new or empty directory."
            )
        if recorded is None:
            if resume is True:  # a typo in output_dir must not cost a whole new run
                raise HfEwcError(f"--resume: there is no run in {str(out)!r} to continue; fix output_dir, or drop "
                                 "--resume to start a new run there.")  # fmt: skip
            return None
        if overwrite:
            unknown = [e for e in entries if not is_run_artefact(e)]
            if unknown:
                raise HfEwcError(
                    f"--overwrite: {out} also holds files hf-ewc did not write ({', '.join(unknown[:3])}); move them "
                    "or choose a new output_dir."
                )
            return None
        if not resume:
            raise HfEwcError(
                f"output_dir {str(out)!r} already holds a run; pass --resume to continue it or --overwrite to "
                "replace it."
            )
        differences = config_differences(recorded.get("config", {}), record["config"])
        if recorded.get("from") != record["from"]:
            differences.append(f"--from: {recorded.get('from')!r} → {record['from']!r}")
        if differences:
            shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
            raise HfEwcError(
                f"--resume: {out} holds a run of a different config ({shown}); use the same config, or a new "
                "output_dir."
            )
        return self.read_json(PROGRESS_NAME) or {"initial": None, "completed": []}

    def start(self, record: dict, *, fresh: bool, overwrite: bool) -> None:
        """Create ``output_dir`` once every process has read it: an `--overwrite` removes the old run's artefacts
        (checked in `check`), a fresh run records its config."""
        self.accel.wait_for_everyone()
        if self.accel.is_main_process:
            if overwrite and self.path.exists():
                for entry in self.path.iterdir():
                    if is_hold_file(entry.name):  # held by this process: keep it
                        continue
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
            if fresh:
                write_json_atomic(self.path / RUN_CONFIG_NAME, record)
        self.accel.wait_for_everyone()

    # ------------------------------------------------------------------------------------------------ writing
    def write_progress(self, progress: dict) -> None:
        if self.accel.is_main_process:
            write_json_atomic(self.path / PROGRESS_NAME, progress)

    def save_stage(self, index: int | None, model, tokenizer, state: EWCState | None, hub_base: str | None = None):
        """Model, tokenizer and EWC state after domain ``index``, as one atomic folder. A `peft:` run's adapter
        config names ``hub_base`` as its base (a Hub id, or None), never this run's local ``base_model/``."""
        if not self.accel.is_main_process:
            return
        for config in getattr(model, "peft_config", {}).values():
            config.base_model_name_or_path = hub_base
        with atomic_directory(self.stage(index)) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if state is not None and not state.is_empty:
                state.save(tmp / STATE_DIR)
                if state.units is not None:  # a CLNP run's unit allocation, beside the state it belongs to
                    state.units.save(tmp / STATE_DIR)

    def save_base_model(self, model=None, *, source: Path | None = None) -> None:
        """A `peft:` run's frozen base model, once, in ``base_model/``: ``model`` saved, or the folder ``source``
        copied (the base of the run continued by `--from`)."""
        if self.accel.is_main_process:
            with atomic_directory(self.path / BASE_MODEL_DIR) as tmp:
                if source is not None:
                    shutil.copytree(source, tmp, dirs_exist_ok=True)
                else:
                    model.save_pretrained(tmp)
        self.accel.wait_for_everyone()

    def publish(self, stage: Path) -> None:
        """Copy a stage (model, tokenizer, EWC state) to the top of ``output_dir``, file by file, atomically."""
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                with atomic_path(self.path / path.relative_to(stage)) as tmp:
                    shutil.copyfile(path, tmp)

    def last_complete_checkpoint(self, index: int) -> str | None:
        """The latest Trainer checkpoint of domain ``index`` that was fully written (``trainer_state.json`` is its
        last file); a checkpoint cut short by a kill is removed so that the Trainer neither resumes from nor rotates
        into it."""
        domain_dir = self.domain(index)
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

    def cleanup(self, done: int) -> None:
        """Drop what ``done`` finished domains no longer need: their checkpoints and every stage but the latest."""
        if not self.accel.is_main_process:
            return
        keep = self.stage(done - 1 if done else None).name
        stages = self.path / "stages"
        if stages.is_dir():
            for path in stages.iterdir():
                if path.name != keep:
                    shutil.rmtree(path, ignore_errors=True)
        for i in range(done):
            domain_dir = self.domain(i)
            if domain_dir.is_dir():
                for path in domain_dir.glob("checkpoint-*"):
                    shutil.rmtree(path, ignore_errors=True)
                if not any(domain_dir.iterdir()):
                    domain_dir.rmdir()
        domains = self.path / "domains"
        if domains.is_dir() and not any(domains.iterdir()):
            domains.rmdir()

    def seed_from(self, source: "RunDir", record: dict, done: int) -> None:
        """Start this run where ``source`` stands after its first ``done`` domains: their stage (and a `peft:` run's
        base model) and progress are copied, and ``record`` becomes this run's config — for runs whose first domains
        are the same whatever differs in ``record`` (a λ grid: no penalty before the first consolidation). The copy
        is then resumed as usual."""
        if self.accel.is_main_process:
            progress = source.read_json(PROGRESS_NAME)
            if progress is None or len(progress.get("completed", [])) < done:
                raise HfEwcError(f"{source.path} has not finished its first {done} domain(s); run it first.")
            for name in (f"stages/{source.stage(done - 1).name}", BASE_MODEL_DIR):
                if (source.path / name).is_dir():
                    with atomic_directory(self.path / name) as tmp:
                        shutil.copytree(source.path / name, tmp, dirs_exist_ok=True)
            progress = {"initial": progress["initial"], "completed": progress["completed"][:done], "finished": False}
            write_json_atomic(self.path / RUN_CONFIG_NAME, record)
            write_json_atomic(self.path / PROGRESS_NAME, progress)
        self.accel.wait_for_everyone()

    def remove_stages(self) -> None:
        if self.accel.is_main_process:
            shutil.rmtree(self.path / "stages", ignore_errors=True)
