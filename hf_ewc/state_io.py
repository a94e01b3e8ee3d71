"""The EWC state on disk: file names, format version, metadata keys, and reading and writing the files.

``EWCState.save(directory)`` writes, next to a model or inside a Trainer checkpoint:

- ``ewc_state.safetensors`` — tensors ``importance.<param name>`` and ``anchor.<param name>``; its header metadata
  carries the JSON metadata too, so the file alone is a complete, self-consistent state;
- ``ewc_state.json`` — the same metadata, indented with sorted keys, for people and tools.

Both are written atomically (temporary file + ``os.replace``): an interrupted save leaves the previous state intact.
Tensors go through safetensors only, never pickle. A state of FSDP2-sharded parameters (each process holds slices) is
written in the same format, one whole tensor at a time (see [`write_state_file`]), and read back at any world size.
"""

import json
import os
import struct
import uuid
from collections.abc import Callable
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
CONSOLIDATIONS = ("sum", "online")
NORMALIZATIONS = ("mean", "none")
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# the metadata a state file may carry, and what each value must be (None: absent from a state never consolidated)
METADATA_TYPES = {
    "anchors_from": (str, type(None)), "consolidation": (str, type(None)), "decay": (int, float, type(None)),
    "domains": (list,), "dtype": (str,), "format_version": (int,), "importance_normalization": (str, type(None)),
    "lambda_convention": (str,), "num_parameters": (int,), "num_tensors": (int,), "state_id": (str,),
    "versions": (dict,),
}  # fmt: skip
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


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def write_state_file(
    directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    *,
    whole: Callable[[torch.Tensor], torch.Tensor] | None = None,
    write: bool = True,
) -> None:
    """``ewc_state.safetensors`` (tensors, metadata in the header) and ``ewc_state.json`` in ``directory``, each
    written atomically and stamped with one fresh ``state_id`` (a mismatch later reveals an interrupted save).

    With ``whole`` (sharded tensors: it gathers one; every process calls this, in the same order, and only the one
    with ``write`` writes) the file is streamed: safetensors' header needs only names, dtypes and shapes, so it is
    written first and each tensor is gathered just before its bytes — no process holds more than one whole tensor
    besides its slices. The file is the one `save_file` would write, read back by `safe_open` at any world size. A
    write that fails still takes part in every remaining gather before it raises, so no process is left waiting."""
    directory = Path(directory)
    meta = {**meta, "state_id": uuid.uuid4().hex}
    save_tensors(directory / STATE_WEIGHTS_NAME, tensors, {"hf_ewc": json.dumps(meta, sort_keys=True)}, whole=whole,
                 write=write)  # fmt: skip
    if write:
        write_json_atomic(directory / STATE_CONFIG_NAME, meta)


def save_tensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    whole: Callable[[torch.Tensor], torch.Tensor] | None = None,
    write: bool = True,
) -> None:
    """One safetensors file, written atomically (its directory created): with `save_file`, or — with ``whole`` —
    streamed by [`write_safetensors_streamed`], every process taking part in every gather, in name order, even when
    its own write fails (it raises afterwards)."""
    if whole is None:
        if write:
            with atomic_path(path) as tmp:
                save_file(tensors, tmp, metadata=metadata)
        return
    gathered: set[str] = set()
    try:
        if write:
            with atomic_path(path) as tmp:
                write_safetensors_streamed(tmp, tensors, metadata, whole, gathered)
    finally:
        for name in sorted(tensors):
            if name not in gathered:
                whole(tensors[name])


def write_safetensors_streamed(
    path: str,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    whole: Callable[[torch.Tensor], torch.Tensor],
    gathered: set[str] | None = None,
) -> None:
    """safetensors' layout: the header's length (8 bytes, little-endian), the JSON header padded with spaces to a
    multiple of 8, then every tensor's bytes (C order, little-endian) in the order of their offsets (by name).
    ``whole`` makes each tensor whole just before its bytes are written; ``gathered`` collects the names done."""
    names = sorted(tensors)
    entries: dict = {"__metadata__": metadata}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        entries[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            data = whole(tensors[name])
            if gathered is not None:
                gathered.add(name)
            data = data.detach().to("cpu").contiguous().reshape(-1)
            f.write(memoryview(data.view(torch.uint8).numpy()))  # (no second copy of the bytes)


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


def read_state_file(
    path: Path, place: Callable[[str, torch.Tensor], torch.Tensor] | None = None
) -> tuple[dict, dict, dict]:
    """Importances, anchors and metadata of an ``ewc_state.safetensors`` (safetensors only: never pickle).
    ``place(name, tensor)``, applied to each tensor as it is read, may keep only a slice of it (a sharded parameter's),
    so that one whole tensor at a time is held."""
    importances, anchors = {}, {}
    place = place or (lambda name, tensor: tensor)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                kind, _, name = key.partition(".")
                if kind == "importance":
                    importances[name] = place(name, f.get_tensor(key))
                elif kind == "anchor":
                    anchors[name] = place(name, f.get_tensor(key))
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
    if not isinstance(meta, dict) or not isinstance(meta.get("format_version", 0), int):
        raise HfEwcError(f"{str(path)!r} has corrupt hf_ewc metadata (not a mapping with an integer format_version); "
                         "re-save the state.")  # fmt: skip
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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def check_loaded_state(importances: dict, anchors: dict, meta: dict, path: Path) -> None:
    """Refuse a state file whose contents cannot be used as they are, naming the file and the first fault: mixed or
    unsupported dtypes, NaN/Inf anywhere, negative importances, importances without anchors (or the reverse), shapes
    that differ, metadata of the wrong type or an unknown choice, counts that do not match the tensors."""

    def fail(fault: str) -> None:
        raise HfEwcError(
            f"The EWC state {str(path)!r} is damaged: {fault}. Re-save it from the run that wrote it, or consolidate "
            "the domains again."
        )

    for key, types in METADATA_TYPES.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            expected = " or ".join(t.__name__ for t in types)
            fail(f"metadata {key!r} is {value!r} ({type(value).__name__}), expected {expected}")
    for i, domain in enumerate(meta.get("domains", [])):
        if not (isinstance(domain, dict) and isinstance(domain.get("name"), str)):
            fail(f"metadata domains[{i}] is not a mapping with a name")
    for key, choices in (("consolidation", CONSOLIDATIONS), ("importance_normalization", NORMALIZATIONS),
                         ("dtype", tuple(STATE_DTYPES))):  # fmt: skip
        if meta.get(key) is not None and meta[key] not in choices:
            fail(f"metadata {key!r} is {meta[key]!r}, not one of {', '.join(choices)}")
    if meta.get("decay") is not None and not 0 < meta["decay"] <= 1:
        fail(f"metadata 'decay' is {meta['decay']!r}, not in (0, 1]")
    if set(importances) != set(anchors):
        name = min(set(importances) ^ set(anchors))
        fail(f"{name!r} has an {'importance' if name in importances else 'anchor'} but no "
             f"{'anchor' if name in importances else 'importance'}")  # fmt: skip
    dtypes = {t.dtype for t in (*importances.values(), *anchors.values())}
    if len(dtypes) > 1 or not dtypes <= set(STATE_DTYPES.values()):
        fail(f"its tensors are {', '.join(sorted(map(str, dtypes)))}; a state holds float32 or bfloat16, one dtype")
    for name, importance in importances.items():
        anchor = anchors[name]
        if importance.shape != anchor.shape:
            fail(f"{name!r}: importance shape {tuple(importance.shape)}, anchor shape {tuple(anchor.shape)}")
        importance, anchor = _local(importance), _local(anchor)  # a sharded parameter's: this process's slice
        for kind, t in (("importance", importance), ("anchor", anchor)):
            if not bool(torch.isfinite(t).all()):
                fail(f"the {kind} of {name!r} holds {int((~torch.isfinite(t)).sum())} NaN/Inf value(s)")
        if bool((importance < 0).any()):
            fail(f"the importance of {name!r} holds negative values (min {float(importance.min()):.3g})")
    counts = {"num_tensors": len(importances), "num_parameters": sum(t.numel() for t in importances.values())}
    for key, actual in counts.items():
        if key in meta and meta[key] != actual:
            fail(f"metadata {key!r} says {meta[key]}, the file holds {actual}")
