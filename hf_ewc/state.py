"""EWCState: what a model must remember of the domains it has learned — importances Ω, anchors θ*, and metadata.

One anchor (the weights after the latest consolidated domain) and one importance tensor per parameter, so the state
costs ``2·P`` numbers whatever the number of domains (Huszár 2018; the structure every seed implementation uses).

On disk it is two files (see `hf_ewc.state_io`): ``ewc_state.safetensors`` and ``ewc_state.json``.

On an FSDP2-sharded model (DTensor parameters) each process holds its slices only: Ω and θ* of a sharded parameter are
DTensors laid out like it, so the state costs ``2·P/N`` numbers per process. `save` gathers one tensor at a time into
the same one-file format; `load(directory, model)` keeps only this process's slices, at whatever world size.
"""

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .distributed import (
    as_shard_of,
    is_dtensor,
    is_main_process,
    is_sharded,
    local_tensor,
    raise_together,
    replicated_parameter,
    trainable_parameters,
    whole_tensor,
)
from .state_io import (
    CONSOLIDATIONS,
    FORMAT_VERSION,
    LAMBDA_CONVENTION,
    NORMALIZATIONS,
    STATE_CONFIG_NAME,
    STATE_DIR,
    STATE_WEIGHTS_NAME,
    check_loaded_state,
    check_side_file,
    find_ewc_state,
    read_state_file,
    state_file_of,
    write_state_file,
)
from .state_tensors import (
    check_covers,
    check_fits,
    check_importances,
    check_pairs,
    dtype_name,
    held,
    importance_stats,
    normalize,
    slicer,
    storage_dtype,
)
from .utils import HfEwcError, logger, versions


__all__ = ["STATE_CONFIG_NAME", "STATE_DIR", "STATE_WEIGHTS_NAME", "EWCState", "check_importances", "find_ewc_state"]


class EWCState:
    r"""Importances Ω, anchors θ* and metadata of a model that has been consolidated on one or more domains.

    Args:
        importances (`dict[str, torch.Tensor]`, *optional*):
            Ω per parameter name. Usually built through [`EWCState.consolidate`].
        anchors (`dict[str, torch.Tensor]`, *optional*):
            θ* per parameter name (the weights after the latest consolidated domain).
        metadata (`dict`, *optional*):
            Metadata as written by [`EWCState.save`].
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"float32"`):
            Storage dtype of Ω and θ*: `"float32"` or `"bfloat16"`. bfloat16 halves the memory and the file and keeps
            float32's range (a language model's Fisher values reach 1e-12); the anchors are then rounded, so
            ``θ − θ*`` is not exactly 0 right after consolidation (about 3 significant digits). float16 is not
            offered: its range would flush small importances to 0 and overflow large ones.

    Example:

    ```python
    >>> from hf_ewc import EWCState, collect_importance
    >>> state = EWCState()
    >>> state.consolidate(model, collect_importance(model, dataset), domain="wiki")  # doctest: +SKIP
    >>> state.save("out/ewc_state")  # doctest: +SKIP
    >>> EWCState.load("out/ewc_state").validate(model)  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        importances: Mapping[str, torch.Tensor] | None = None,
        anchors: Mapping[str, torch.Tensor] | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        dtype: str | torch.dtype = "float32",
    ):
        self.dtype = storage_dtype(dtype)
        self._set_tensors(dict(importances or {}), dict(anchors or {}), copy=True)
        meta = dict(metadata or {})
        self.domains: list[dict[str, Any]] = list(meta.get("domains", []))
        self.consolidation: str | None = meta.get("consolidation")
        self.decay: float | None = meta.get("decay")
        # "mean" or "none" (raw); states saved before hf_ewc 0.2 carry no key and hold raw importances
        self.normalization: str | None = meta.get("importance_normalization", "none" if self.domains else None)
        # a CLNP unit allocation (`EWCTrainer` with ewc_mode="clnp" sets it); saved beside the state by the trainer
        self.units: Any = None

    def _set_tensors(self, importances: dict, anchors: dict, *, copy: bool, checked: bool = False) -> None:
        if not checked:  # (a loaded state was checked, more thoroughly, by `check_loaded_state`)
            check_pairs(importances, anchors)
        # Copies, unless the tensors were just read from disk: an anchor must not share storage with a live
        # parameter, nor Ω with the caller's tensor.
        self.importances: dict[str, torch.Tensor] = {k: held(v, self.dtype, copy=copy) for k, v in importances.items()}
        self.anchors: dict[str, torch.Tensor] = {k: held(v, self.dtype, copy=copy) for k, v in anchors.items()}

    # ------------------------------------------------------------------ properties
    @property
    def is_empty(self) -> bool:
        """``True`` until a domain has been consolidated."""
        return not self.importances

    @property
    def num_consolidations(self) -> int:
        return len(self.domains)

    @property
    def num_parameters(self) -> int:
        """Number of protected scalar parameters P (the state holds 2·P numbers)."""
        return sum(t.numel() for t in self.importances.values())

    @property
    def nbytes(self) -> int:
        """Bytes this process holds for importances and anchors (its slices, for sharded parameters)."""
        held = (local_tensor(t) for t in (*self.importances.values(), *self.anchors.values()))
        return sum(t.numel() * t.element_size() for t in held)

    @property
    def is_sharded(self) -> bool:
        """Whether this process holds slices (of FSDP2-sharded parameters) rather than whole tensors."""
        return any(is_dtensor(t) for t in self.importances.values())

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "anchors_from": self.domains[-1]["name"] if self.domains else None,
            "consolidation": self.consolidation,
            "decay": self.decay,
            "importance_normalization": self.normalization,
            "domains": self.domains,
            "dtype": dtype_name(self.dtype),
            "format_version": FORMAT_VERSION,
            "lambda_convention": LAMBDA_CONVENTION,
            "num_parameters": self.num_parameters,
            "num_tensors": len(self.importances),
            "versions": versions(),
        }

    def __repr__(self) -> str:
        names = [d.get("name") for d in self.domains]
        return (
            f"EWCState(domains={names}, tensors={len(self.importances)}, parameters={self.num_parameters}, "
            f"dtype={dtype_name(self.dtype)})"
        )

    # ------------------------------------------------------------------ consolidation
    @torch.no_grad()
    def consolidate(
        self,
        model: nn.Module,
        importances: Mapping[str, torch.Tensor],
        mode: str = "sum",
        decay: float = 1.0,
        *,
        domain: str | None = None,
        method: str | None = None,
        estimator: str | None = None,
        num_samples: int | None = None,
        options: Mapping[str, Any] | None = None,
        normalization: str = "mean",
    ) -> "EWCState":
        r"""Fold the importances of a newly learned domain into the state and move the anchors to the current weights.

        - ``mode="sum"``:    ``Ω ← Ω + Ω_t`` (the seed papers' choice; Huszár's corrected recursion);
        - ``mode="online"``: ``Ω ← γ·Ω + Ω_t`` with ``γ = decay`` ∈ (0, 1] (Schwarz et al. 2018);
        - in both modes ``θ* ← θ`` (the model's current trainable parameters);
        - with ``normalization="mean"`` (the default) ``Ω_t`` is first divided by its mean over all the parameters it
          covers (computed in float64; the divisor is recorded), so every domain enters with mean importance 1 and λ
          means the same whatever the method's scale. ``"none"`` keeps the raw scale. A state holds one convention.

        Args:
            model (`torch.nn.Module`):
                The model after training on the domain; its trainable parameters become the anchors.
            importances (`dict[str, torch.Tensor]`):
                Ω_t for exactly the model's trainable parameters (as returned by [`collect_importance`]).
            mode (`str`, *optional*, defaults to `"sum"`):
                `"sum"` or `"online"`.
            decay (`float`, *optional*, defaults to `1.0`):
                γ for `mode="online"`; must be 1.0 for `mode="sum"`.
            domain (`str`, *optional*):
                Name of the domain, recorded in the metadata (defaults to ``"domain_<k>"``).
            method, estimator, num_samples, options:
                How Ω_t was obtained, recorded in the metadata.
            normalization (`str`, *optional*, defaults to `"mean"`):
                `"mean"` or `"none"` (see above).

        Returns:
            `EWCState`: ``self``.
        """
        if mode not in CONSOLIDATIONS:
            raise HfEwcError(f"Unknown consolidation mode {mode!r}; choose one of: sum, online.")
        if not (isinstance(decay, (int, float)) and 0 < decay <= 1):
            raise HfEwcError(f"decay must be in (0, 1], got {decay!r}.")
        if mode == "sum" and decay != 1.0:
            raise HfEwcError(f"decay={decay} only applies to mode='online'; use mode='online' or decay=1.0.")
        params = trainable_parameters(model, sharded=True)
        if not params:
            raise HfEwcError("The model has no trainable parameters (requires_grad=True) to protect.")
        sharded = is_sharded(params)
        if sharded and replicated_parameter(params) is not None:
            raise HfEwcError(
                f"{replicated_parameter(params)!r} is held whole (or replicated, HSDP) by several processes next to "
                "FSDP2-sharded parameters; consolidating a sharded model needs every trainable parameter sharded "
                "(fully_shard with a 1-D mesh) or frozen."
            )
        check_covers(importances, params)
        if sharded:  # each process checks its slices; every process stops if one finds a fault
            raise_together(lambda: check_importances(importances))
        else:
            check_importances(importances)
        self.check_normalization(normalization)
        domain_name = domain if domain is not None else f"domain_{len(self.domains)}"
        # float32, each laid out as its parameter is (a whole Ω_t is cut to this process's slice of a sharded one)
        importances = {n: held(importances[n], torch.float32, copy=False, like=p) for n, p in params.items()}
        importances, divisor = normalize(importances, normalization, domain_name)
        if self.domains:
            previous = self.domains[-1]
            if normalization == "none" and (previous.get("method"), previous.get("estimator")) != (method, estimator):
                logger.warning(
                    f"Consolidating {method}/{estimator} importances onto a state built from "
                    f"{previous.get('method')}/{previous.get('estimator')}: their scales differ, so one λ does not "
                    "weigh the domains equally. Use one importance method per sequence unless this is intended."
                )
            if self.consolidation is not None and self.consolidation != mode:
                logger.warning(f"Consolidation mode changes from {self.consolidation!r} to {mode!r}.")
        gamma = float(decay) if mode == "online" else 1.0
        for name, p in params.items():
            # (a whole state loaded earlier is cut to this process's slice of a sharded parameter)
            new = local_tensor(importances[name]).clone()
            old = self.importances.get(name)
            if old is not None:
                new = new + gamma * local_tensor(held(old, torch.float32, copy=False, like=p))
            self.importances[name] = held(as_shard_of(new, p), self.dtype, copy=False)
            self.anchors[name] = held(p, self.dtype)
        kept = [n for n in self.importances if n not in params]
        if kept:
            # Parameters protected by earlier domains that are frozen now keep their anchors; their importance decays.
            for name in kept:
                self.importances[name] = (self.importances[name].float() * gamma).to(self.dtype)
            logger.info(f"{len(kept)} protected parameter(s) are not trainable now and keep their old anchors.")
        self.consolidation = mode
        self.decay = gamma
        self.normalization = normalization
        entry = {"name": domain_name, "method": method, "estimator": estimator, "num_samples": num_samples}
        entry.update(options=dict(options or {}), normalization=normalization, normalization_divisor=divisor)
        self.domains.append(entry)
        return self

    def check_normalization(self, normalization: str) -> None:
        """Refuse to continue a state with the other importance convention (one λ could not weigh both)."""
        if normalization not in NORMALIZATIONS:
            raise HfEwcError(
                f"Unknown importance_normalization {normalization!r}; choose one of: {', '.join(NORMALIZATIONS)}."
            )
        if self.normalization is not None and self.normalization != normalization:
            raise HfEwcError(
                f"The EWC state holds importances with importance_normalization={self.normalization!r} (domains "
                f"{', '.join(d.get('name', '?') for d in self.domains)}); continue it with importance_normalization="
                f"{self.normalization!r}, or start a new state."
            )

    # ------------------------------------------------------------------ checks
    def validate(self, model: nn.Module, *, strict: bool = True) -> list[str]:
        """Check that the state fits ``model``.

        Raises `HfEwcError` naming the first parameter that is protected by the state but missing from the model or
        differently shaped. Trainable parameters of the model that the state does not cover (e.g. a new head) raise
        too when ``strict``; otherwise they are returned (they train unprotected).

        Returns:
            `list[str]`: names of the model's trainable parameters the state does not cover.
        """
        return check_fits(self.anchors, model, strict=strict, empty=self.is_empty)

    # ------------------------------------------------------------------ persistence
    def save(self, save_directory: str | os.PathLike, *, write: bool | None = None) -> None:
        """Write ``ewc_state.safetensors`` and ``ewc_state.json`` into ``save_directory`` (created if needed),
        each atomically.

        ``write=False``: this process does not write (another one does). A sharded state (see
        [`EWCState.is_sharded`]) is gathered one tensor at a time into the same whole-tensor file: every process must
        call this, the one with ``write`` (default: rank 0) writes, and all return once the file is in place (or all
        raise, when the write failed)."""
        tensors = {f"importance.{k}": v.contiguous() for k, v in self.importances.items()}
        tensors.update({f"anchor.{k}": v.contiguous() for k, v in self.anchors.items()})
        if not self.is_sharded:
            if write is not False:
                write_state_file(save_directory, tensors, self.metadata)
            return
        write = is_main_process() if write is None else write
        meta = self.metadata
        raise_together(lambda: write_state_file(save_directory, tensors, meta, whole=whole_tensor, write=write))

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module | None = None) -> "EWCState":
        """Load a state written by [`EWCState.save`] (tensors through safetensors, never pickle) from its directory, a
        checkpoint, or a finished `hf-ewc train` run (its ``ewc_state/``).

        With ``model`` whose trainable parameters are FSDP2-sharded, each process keeps only its slices of those
        parameters' tensors (read one whole tensor at a time), whatever the world size that saved the state; every
        process must call it."""
        path, side = state_file_of(directory)
        params = trainable_parameters(model, sharded=True) if model is not None else {}
        sharded = is_sharded(params)
        importances, anchors, meta = read_state_file(path, slicer(params) if sharded else None)
        check_side_file(side, path, meta)
        if sharded:  # a fault may sit in one process's slices only
            raise_together(lambda: check_loaded_state(importances, anchors, meta, path))
        else:
            check_loaded_state(importances, anchors, meta, path)  # a damaged file never reaches training or pruning
        dtype = next(iter(importances.values())).dtype if importances else storage_dtype(meta.get("dtype", "float32"))
        state = cls(metadata=meta, dtype=dtype)
        state._set_tensors(importances, anchors, copy=False, checked=True)
        return state

    def shard_like(self, model: nn.Module) -> "EWCState":
        """Keep only this process's slices of the whole tensors that protect ``model``'s FSDP2-sharded parameters
        (2·P/N numbers per process instead of 2·P); in place, no communication. Returns ``self``."""
        for name, p in trainable_parameters(model, sharded=True).items():
            if is_dtensor(p) and name in self.anchors and tuple(self.anchors[name].shape) == tuple(p.shape):
                self.importances[name] = held(self.importances[name], self.dtype, copy=False, like=p)
                self.anchors[name] = held(self.anchors[name], self.dtype, copy=False, like=p)
        return self

    # ------------------------------------------------------------------ helpers
    def max_importance(self) -> float:
        """max Ω over all parameters (0.0 for an empty state); of a sharded state: a collective, every process calls
        it."""
        return importance_stats(self.importances)[0] if not self.is_empty else 0.0

    def summary(self) -> dict[str, float]:
        """A few numbers about Ω, for logs: mean, max and the share of exact zeros (of a sharded state: a collective,
        every process calls it)."""
        if self.is_empty:
            return {}
        largest, mean, zeros = importance_stats(self.importances)
        out = {"importance/mean": mean, "importance/max": largest, "importance/zero_share": zeros}
        return {k: v for k, v in out.items() if math.isfinite(v)}
