"""Small shared helpers: the library logger and error type, version stamps, atomic writes of files and folders, the
lock that keeps one process per output directory, and the check that a model's weights are finite."""

import contextlib
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import accelerate
import filelock
import safetensors
import torch
import transformers

from ._version import __version__


def _library_logger() -> logging.Logger:
    """The ``hf_ewc`` logger, set up as transformers sets up its own: a stderr handler, ``[hf_ewc]`` prefix, WARNING by
    default, no propagation. `EWCTrainer` sets its level from `log_level` (main process) or `log_level_replica`
    (the others) unless they are "passive"; set it directly with ``logging.getLogger("hf_ewc").setLevel(...)``."""
    library_logger = logging.getLogger("hf_ewc")
    if not library_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[hf_ewc] %(message)s"))
        library_logger.addHandler(handler)
        library_logger.setLevel(logging.WARNING)
        library_logger.propagate = False
    return library_logger


logger = _library_logger()


class HfEwcError(ValueError):
    """A user-facing error: the message names what is wrong and how to fix it (the CLI prints it on one line)."""


def error_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): what one-line errors quote."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def versions() -> dict[str, str]:
    """Versions of hf_ewc and the libraries whose behaviour the saved artefacts depend on."""
    stamp = {
        "hf_ewc": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
    }
    commit = _git_commit()
    if commit is not None:
        stamp["hf_ewc_git_commit"] = commit
    return stamp


def _git_commit() -> str | None:
    """The commit of a source checkout (dev installs), as PEFT stamps its configs; ``None`` for a wheel install."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _mode(base: int) -> int:
    """``base`` (0o666 for files, 0o777 for folders) under the process's umask: what ``open`` / ``mkdir`` would give,
    where ``mkstemp`` / ``mkdtemp`` give 0o600 / 0o700."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def _write_failed(path: Path, err: OSError) -> "HfEwcError":
    return HfEwcError(
        f"cannot write {str(path)!r}: {err.strerror or err} (errno {err.errno}); it keeps its previous content — "
        "free space or fix the permissions, then run again"
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically (``os.replace``).

    On failure the temporary file is removed and ``path`` is left exactly as it was; an `OSError` (a full disk, a
    lost permission) becomes an `HfEwcError` that names ``path`` and says so.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, _mode(0o666))
    except OSError as err:
        raise _write_failed(path, err) from err
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _write_failed(path, err) from err
        raise


def recover_replaced(path: str | os.PathLike) -> None:
    """Finish what a process killed between `atomic_directory`'s two renames left: ``.<name>.previous`` is put back
    where ``path`` is missing, and removed where the new ``path`` already took its place."""
    path = Path(path)
    previous = path.with_name(f".{path.name}.previous")
    if previous.exists():
        if path.exists():
            shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
        else:
            os.replace(previous, path)


def check_output_dir(out_dir: str | os.PathLike, *, overwrite: bool, source: str | os.PathLike | None = None) -> Path:
    """``out_dir`` as a `Path`, refused (one line) when it exists and ``overwrite`` is off, or when it is ``source``
    itself; an export interrupted while replacing it counts as the folder it was (`recover_replaced`)."""
    out = Path(out_dir)
    if out.name:
        recover_replaced(out)
    if out.exists() and not overwrite:
        raise HfEwcError(f"output directory {str(out)!r} already exists; choose another --out or pass --overwrite.")
    if source is not None and os.path.exists(source) and out.resolve() == Path(source).resolve():
        raise HfEwcError(f"--out is {str(source)!r} itself; write the result somewhere else.")
    return out


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a new, empty temporary folder next to ``path``; on success it takes the name ``path``.

    Whatever was at ``path`` is replaced (callers decide beforehand whether it may be): it is first renamed to
    ``.<name>.previous``, the new folder renamed into place, and only then the previous one removed. On failure the
    temporary folder is removed and ``path`` is left as it was (an `OSError` becomes an `HfEwcError` saying so). A
    process killed inside the block leaves a hidden ``.<name>.*.tmp`` folder (or ``.<name>.previous``), never a
    half-written ``path``; the next call for the same ``path`` clears them and puts a ``previous`` back if ``path``
    is missing (one writer per ``path`` is assumed). With ``replace=False`` a ``path`` that appeared while the block
    ran (another process writing the same output) is refused instead of replaced.
    """
    path = Path(path)
    previous = path.with_name(f".{path.name}.previous")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        recover_replaced(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, _mode(0o777))
    except OSError as err:
        raise _write_failed(path, err) from err
    try:
        yield tmp
        replaced = path.exists()
        if replaced and not replace:
            raise HfEwcError(
                f"{str(path)!r} appeared while this process was writing it (another run with the same output?); "
                "nothing was replaced: choose another output directory."
            )
        if replaced:
            os.replace(path, previous)
        try:
            os.replace(tmp, path)
        except OSError:
            if replaced:
                os.replace(previous, path)
            raise
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise _write_failed(path, err) from err
        raise
    if replaced:  # the new folder is in place: failing to remove the old one only leaves a hidden folder behind
        try:
            shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
        except OSError as err:
            logger.warning(f"{path} was written, but its previous version {previous} could not be removed: {err}")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """Refuse a model whose weights hold NaN/Inf (a damaged checkpoint, or a training run that diverged before it
    was saved), naming the first such tensor: training or pruning it would only spread the damage."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param.detach()).all()):
            bad = int((~torch.isfinite(param.detach())).sum())
            raise HfEwcError(
                f"{where}: weight {name!r} holds {bad} NaN/Inf value(s) of {param.numel()}; the checkpoint is damaged "
                "or the run that wrote it diverged. Load an earlier checkpoint, or retrain it."
            )


LOCK_NAME = ".hf_ewc.lock"  # held (flock) while a process works in a directory; released by the OS if it dies
LOCK_OWNER_NAME = ".hf_ewc.owner.json"  # who holds it: pid, host, command, start time (removed on release)


def is_hold_file(name: str) -> bool:
    """The lock and owner files `hold_directory` keeps in a directory — an owner file still being written (its atomic
    temporary ``.<owner name>.<random>.tmp``) included, which another process may see for a moment."""
    return name in (LOCK_NAME, LOCK_OWNER_NAME) or (name.startswith(f".{LOCK_OWNER_NAME}.") and name.endswith(".tmp"))


@contextlib.contextmanager
def _hold(lock_path: Path, owner_path: Path, shown: str, what: str, *, remove: bool) -> Iterator[None]:
    lock = filelock.FileLock(lock_path, timeout=0)  # timeout=0: refuse at once (filelock >= 3.12)
    try:
        lock.acquire()
    except filelock.Timeout:
        try:
            owner = json.loads(owner_path.read_text(encoding="utf-8"))
            who = f"pid {owner['pid']} on {owner['host']}, `{owner['command']}`, since {owner['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "owner unknown"
        raise HfEwcError(
            f"{what} {shown!r} is in use by another hf-ewc process ({who}); wait for it to finish, or choose another "
            f"{what}."
        ) from None
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200],
                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        write_json_atomic(owner_path, owner)
        yield
    finally:
        with contextlib.suppress(OSError):
            owner_path.unlink()
        if remove:  # unlinked while still held, so no other process can be holding the file that is removed
            with contextlib.suppress(OSError):
                lock_path.unlink()
        lock.release()


def hold_directory(directory: str | os.PathLike, what: str = "output_dir") -> contextlib.AbstractContextManager:
    """Hold ``directory`` (which must exist) for this process, or refuse at once, naming the process that holds it.

    The lock is a `filelock.FileLock` (an OS file lock), so a process killed with SIGKILL leaves no stale lock that
    could block a `--resume`: only its empty ``.hf_ewc.lock`` file remains."""
    directory = Path(directory)
    return _hold(directory / LOCK_NAME, directory / LOCK_OWNER_NAME, str(directory), what, remove=False)


def hold_output(path: str | os.PathLike, what: str = "--out") -> contextlib.AbstractContextManager:
    """The same for an output that does not exist yet (an export): the lock lies next to it, as
    ``.<name>.hf_ewc.lock``, and is removed when released. Nothing is held when its parent does not exist yet (nothing
    is created before the inputs are checked)."""
    path = Path(path).absolute()
    if not path.name or not path.parent.is_dir():  # "/" (refused later as existing), or nothing to lock next to
        return contextlib.nullcontext()
    lock_path = path.with_name(f".{path.name}{LOCK_NAME}")
    return _hold(lock_path, path.with_name(f".{path.name}{LOCK_OWNER_NAME}"), str(path), what, remove=True)


@contextlib.contextmanager
def ctrl_c_outside_finalizers(delay: float = 0.05) -> Iterator[None]:
    """Ctrl-C raises `KeyboardInterrupt` as usual, except inside an object finalizer (``__del__``), where Python would
    print it and carry on ("Exception ignored in …"; 🤗 datasets' ``Dataset.__del__`` runs at every garbage collection,
    which the Trainer triggers between phases): there the signal is sent again ``delay`` seconds later, so it lands
    once the finalizer is done. Main thread only; a SIGINT the caller ignores stays ignored."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return

    def handler(signum, frame):
        while frame is not None:
            if frame.f_code.co_name == "__del__":
                threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()
                return
            frame = frame.f_back
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
