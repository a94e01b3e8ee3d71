"""Small shared helpers: version stamps, atomic file writes, the library logger."""

import contextlib
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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


def versions() -> dict[str, str]:
    """Versions of hf_ewc and the libraries whose behaviour the saved artefacts depend on."""
    import accelerate
    import safetensors
    import torch
    import transformers

    from . import __version__

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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically (``os.replace``).

    On failure the temporary file is removed and ``path`` is left exactly as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def sharded_setup(args: Any = None) -> str | None:
    """``"FSDP"`` or ``"DeepSpeed ZeRO-3"`` when the `accelerate launch` environment (or ``args``) shards the
    parameters across processes, else None — known before any Trainer or model is built."""
    from accelerate.utils import parse_flag_from_env
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if (args is not None and args.fsdp) or parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if is_deepspeed_zero3_enabled():
        return "DeepSpeed ZeRO-3"
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if stage is None and config_file and os.path.isfile(config_file):  # `deepspeed_config_file:` in the config
            with contextlib.suppress(OSError, ValueError), open(config_file, encoding="utf-8") as f:
                stage = (json.load(f).get("zero_optimization") or {}).get("stage")
        if str(stage) == "3":
            return "DeepSpeed ZeRO-3"
    return None


def refuse_sharded_launch(args: Any = None) -> None:
    """`hf-ewc train` under FSDP or ZeRO-3: one clear error before anything is built or written."""
    sharded = sharded_setup(args)
    if sharded is not None:
        raise HfEwcError(
            f"hf-ewc train under {sharded}: EWC over sharded parameters is not supported (importances, anchors and "
            "the penalty need whole parameters); launch with DDP (configs/accelerate/multi_gpu.yaml) or DeepSpeed "
            "ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml)."
        )
