"""The EWC state on disk: file names, format version, metadata keys, and reading and writing the files.

``EWCState.save(directory)`` writes, next to a model or inside a Trainer checkpoint:

- ``ewc_state.safetensors`` — tensors ``importance.<param name>`` and ``anchor.<param name>``; its header metadata
  carries the JSON metadata too, so the file alone is a complete, self-consistent state;
- ``ewc_state.json`` — the same metadata, indented with sorted keys, for people and tools.

Both are written atomically (temporary file + ``os.replace``): an interrupted save leaves the previous state intact.
Tensors go through safetensors only, never pickle.
"""

import json
import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .utils import HfEwcError, atomic_path, logger, write_json_atomic


STATE_WEIGHTS_NAME = "ewc_state.safetensors"
STATE_CONFIG_NAME = "ewc_state.json"
STATE_DIR = "ewc_state"  # where a finished `hf-ewc train` run (and a pipeline stage) keeps its state
FORMAT_VERSION = 1
LAMBDA_CONVENTION = (
    "penalty = sum(c * (theta - theta_star)**2); vanilla c = lambda*Omega/2; "
    "stabilized c = lambda*Omega/(2*(1 + eta*lambda*Omega)); proximal theta <- theta_star + (theta - theta_star)/"
    "(1 + eta*lambda*Omega)"
)
KNOWN_METADATA = {
    "anchors_from", "consolidation", "decay", "domains", "dtype", "format_version", "importance_normalization",
    "lambda_convention", "num_parameters", "num_tensors", "state_id", "versions",
}  # fmt: skip


def find_ewc_state(directory: str | os.PathLike) -> Path | None:
    """The directory holding the EWC state of ``directory``: ``DIR/ewc_state/`` (a finished run) or ``DIR`` itself
    (a checkpoint, `EWCState.save`); None when neither has one."""
    directory = Path(directory)
    for candidate in (directory / STATE_DIR, directory):
        if (candidate / STATE_WEIGHTS_NAME).is_file():
            return candidate
    return None


def write_state_file(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """``ewc_state.safetensors`` (tensors, metadata in the header) and ``ewc_state.json`` in ``directory``, each
    written atomically and stamped with one fresh ``state_id`` (a mismatch later reveals an interrupted save)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "state_id": uuid.uuid4().hex}
    with atomic_path(directory / STATE_WEIGHTS_NAME) as tmp:
        save_file(tensors, tmp, metadata={"hf_ewc": json.dumps(meta, sort_keys=True)})
    write_json_atomic(directory / STATE_CONFIG_NAME, meta)


def state_file_of(directory: str | os.PathLike) -> tuple[Path, Path]:
    """``(ewc_state.safetensors, its ewc_state.json)`` of a state directory, a run (its ``ewc_state/``), a checkpoint
    or the safetensors file itself; refuses a place without one."""
    directory = Path(directory)
    if directory.is_dir():
        directory = find_ewc_state(directory) or directory
    path = directory / STATE_WEIGHTS_NAME if directory.is_dir() or not directory.suffix else directory
    if not path.is_file():
        raise HfEwcError(
            f"No EWC state at {str(directory)!r}: expected {STATE_WEIGHTS_NAME} (written by EWCState.save or by "
            "EWCTrainer checkpoints)."
        )
    return path, directory / STATE_CONFIG_NAME if path.parent == directory else path.with_suffix(".json")


def read_state_file(path: Path) -> tuple[dict, dict, dict]:
    """Importances, anchors and metadata of an ``ewc_state.safetensors`` (safetensors only: never pickle)."""
    importances, anchors = {}, {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                kind, _, name = key.partition(".")
                if kind == "importance":
                    importances[name] = f.get_tensor(key)
                elif kind == "anchor":
                    anchors[name] = f.get_tensor(key)
                else:
                    logger.warning(f"Ignoring unknown tensor {key!r} in {path}.")
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise HfEwcError(f"Cannot read the EWC state {str(path)!r}: {err}.") from err
    if "hf_ewc" not in header:
        raise HfEwcError(f"{str(path)!r} is a safetensors file without hf_ewc metadata; it is not an EWC state.")
    try:
        meta = json.loads(header["hf_ewc"])
    except json.JSONDecodeError as err:
        raise HfEwcError(f"{str(path)!r} has corrupt hf_ewc metadata ({err}); re-save the state.") from err
    version = meta.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise HfEwcError(
            f"{str(path)!r} was written with EWC state format {version}; this hf_ewc reads up to {FORMAT_VERSION}. "
            "Upgrade hf_ewc."
        )
    unknown = sorted(set(meta) - KNOWN_METADATA)
    if unknown:
        logger.warning(f"Ignoring unknown EWC state metadata keys {unknown} (written by a newer hf_ewc?).")
    return importances, anchors, meta


def check_side_file(side: Path, path: Path, meta: dict) -> None:
    """``ewc_state.json`` must describe the same save as the tensors' header (else: an interrupted save)."""
    if not side.is_file():
        return
    try:
        side_id = json.loads(side.read_text(encoding="utf-8")).get("state_id")
    except (OSError, json.JSONDecodeError):
        side_id = None
    if side_id != meta.get("state_id"):
        logger.warning(
            f"{side} does not match {path.name} (an interrupted save?); using the metadata inside {path.name}."
        )
