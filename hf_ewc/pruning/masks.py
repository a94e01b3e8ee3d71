"""Which weights a pruning removes: targets, criteria (a score per weight), and masks (global / per layer / N:M).

| criterion   | score                                                                 | needs                     |
|-------------|-----------------------------------------------------------------------|---------------------------|
| `magnitude` | ``|θ|``                                                               | nothing                   |
| `fisher`    | ``F`` (the diagonal Fisher)                                           | Fisher importances        |
| `mas`       | MAS importance                                                        | MAS importances           |
| `si`        | SI path integral                                                      | a state trained with SI   |
| `signal`    | total absolute signal ``|θ|·⟨|input|⟩``                                | signal importances        |
| `obd`       | ``½·F·θ²``: Optimal Brain Damage (LeCun 1990), F as Hessian diagonal  | Fisher importances        |

The lowest scores go first; a structure's score is the sum of its weights' scores.
"""

import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..importance import collect_importance
from ..models import default_targets, is_conv1d
from ..state import EWCState
from ..utils import HfEwcError


CRITERIA = ("magnitude", "fisher", "mas", "si", "signal", "obd")
IMPORTANCE_OF = {"fisher": "fisher", "mas": "mas", "si": "si", "signal": "signal", "obd": "fisher"}
SCOPES = ("global", "per_layer")
NAMED_STRUCTURES = ("unstructured", "ffn", "heads")
STRUCTURE_CHOICES = "unstructured, N:M (e.g. 2:4), ffn, heads"


def select_targets(
    model: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
) -> dict[str, nn.Parameter]:
    """The parameters to prune: by default the ``weight`` of every Linear / ``Conv1D`` inside the transformer blocks;
    with ``include``, every parameter whose name matches one of the regular expressions; minus ``exclude``."""
    include, exclude = list(include or []), list(exclude or [])
    for pattern in include + exclude:
        try:
            re.compile(pattern)
        except re.error as err:
            raise HfEwcError(f"Invalid include/exclude pattern {pattern!r}: {err}.") from err
    if include:
        targets = {
            n: p
            for n, p in model.named_parameters()
            if p.is_floating_point() and any(re.search(pat, n) for pat in include)
        }
    else:
        targets = default_targets(model)
    targets = {n: p for n, p in targets.items() if not any(re.search(pat, n) for pat in exclude)}
    if not targets:
        what = f"include={include}, exclude={exclude}" if include or exclude else "the default (block Linear weights)"
        raise HfEwcError(f"No parameter to prune with {what}; check the patterns against model.named_parameters().")
    return targets


def resolve_importances(
    importances: Any, criterion: str, *, data: Any = None, model: nn.Module | None = None, collect_kwargs=None
) -> tuple[Mapping[str, Tensor] | None, str | None]:
    """``(importances, source)`` for ``criterion`` from a dict, an [`EWCState`], a directory, or data to collect on."""
    if criterion == "magnitude":
        return None, None
    needed = IMPORTANCE_OF[criterion]
    if importances is None and data is not None:
        if needed == "si":
            raise HfEwcError(
                "criterion 'si' needs the importances of an EWC state trained with importance_method='si' "
                "(SI is accumulated during training and cannot be collected on data); pass importances=DIR."
            )
        return collect_importance(model, data, needed, **(collect_kwargs or {})), f"collected on data ({needed})"
    if importances is None:
        raise HfEwcError(
            f"criterion {criterion!r} needs {needed} importances: pass importances= an EWC state directory (an hf-ewc "
            "train run, a checkpoint or EWCState.save) or a dict, or data= to collect them on (CLI: --importances DIR "
            "or --data FILE); or use criterion='magnitude'."
        )
    source = None
    if isinstance(importances, (str, os.PathLike)):
        source = str(importances)
        importances = EWCState.load(importances)
    if isinstance(importances, EWCState):
        methods = sorted({str(d.get("method")) for d in importances.domains if d.get("method")})
        if methods and methods != [needed]:
            raise HfEwcError(
                f"criterion {criterion!r} needs {needed} importances, but the EWC state {source or ''} holds "
                f"{', '.join(methods)} importances; use criterion={methods[0]!r} or a state collected with {needed}."
            )
        source = source or "EWCState"
        return importances.importances, f"{source} ({needed}, {importances.num_consolidations} domain(s))"
    if isinstance(importances, Mapping):
        return importances, "dict"
    raise HfEwcError(
        f"importances must be an EWCState, a directory or a dict of tensors, not {type(importances).__name__}."
    )


def check_coverage(importances: Mapping[str, Tensor], params: Mapping[str, nn.Parameter]) -> None:
    missing = [n for n in params if n not in importances]
    for name, p in params.items():
        if name in importances and tuple(importances[name].shape) != tuple(p.shape):
            raise HfEwcError(
                f"The importances are from another model: parameter {name!r} has shape "
                f"{tuple(importances[name].shape)} in the importances and {tuple(p.shape)} in the model."
            )
    if missing and len(missing) == len(params):
        raise HfEwcError(
            f"The importances are from another model: parameter {missing[0]!r} is not in them (they name e.g. "
            f"{next(iter(importances), 'nothing')!r})."
        )
    if missing:
        shown = ", ".join(missing[:5]) + (f" … ({len(missing)} in all)" if len(missing) > 5 else "")
        raise HfEwcError(
            f"The importances do not cover {len(missing)} parameter(s) to prune: {shown}. Collect them on the whole "
            "model, or leave those parameters out with exclude=."
        )


@torch.no_grad()
def score(name: str, param: Tensor, criterion: str, importances: Mapping[str, Tensor] | None) -> Tensor:
    """float32 score per element of ``param`` (on the CPU: scores of all targets are ranked together)."""
    theta = param.detach().float().cpu()
    if criterion == "magnitude":
        return theta.abs()
    omega = importances[name].detach().float().cpu()
    if criterion == "obd":
        return 0.5 * omega * theta.square()
    return omega


# ------------------------------------------------------------------------------------------------ masks
def smallest_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean keep-mask of ``scores`` (any shape) removing exactly the ``k`` smallest; ties go in storage order."""
    flat = scores.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k <= 0:
        return keep.view(scores.shape)
    if k >= flat.numel():
        return torch.zeros_like(keep).view(scores.shape)
    threshold = flat.kthvalue(k).values
    below = flat < threshold
    keep &= ~below
    at = (flat == threshold).nonzero().squeeze(1)
    keep[at[: k - int(below.sum())]] = False
    return keep.view(scores.shape)


def nm_mask(scores: Tensor, n: int, m: int, input_dim: int, name: str) -> Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive weights along ``input_dim``."""
    s = scores.movedim(input_dim, -1)
    if s.shape[-1] % m:
        raise HfEwcError(
            f"{n}:{m} sparsity needs the input dimension to be divisible by {m}, but {name!r} has {s.shape[-1]} "
            f"inputs (shape {tuple(scores.shape)}); exclude it (exclude=[{re.escape(name)!r}]) or choose another M."
        )
    groups = s.reshape(*s.shape[:-1], s.shape[-1] // m, m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return keep.reshape(s.shape).movedim(-1, input_dim)


def unstructured_masks(
    model: nn.Module, scores: dict[str, Tensor], *, nm: tuple[int, int] | None, scope: str, sparsity: float
) -> dict[str, Tensor]:
    """Keep-masks from per-weight ``scores``: N:M groups, one global threshold, or the same share per tensor."""
    if nm is not None:
        return {n: nm_mask(s, *nm, input_dim(model, n, s), n) for n, s in scores.items()}
    if scope == "per_layer":
        return {n: smallest_mask(s, round(sparsity * s.numel())) for n, s in scores.items()}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = smallest_mask(flat, round(sparsity * flat.numel()))
    del flat
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = keep[offset : offset + s.numel()].view(s.shape)
        offset += s.numel()
    return masks


def input_dim(model: nn.Module, name: str, param: Tensor) -> int:
    """The dimension of ``param`` that meets the layer's input (Linear: 1; GPT-2 Conv1D stores [in, out]: 0)."""
    module_name = name.rpartition(".")[0]
    module = model.get_submodule(module_name) if module_name else model
    return 0 if is_conv1d(module) else param.ndim - 1


def parse_structure(structure: str) -> tuple[str, tuple[int, int] | None]:
    value = str(structure).strip().lower()
    if value in NAMED_STRUCTURES:
        return value, None
    if value == "n:m":
        return "2:4", (2, 4)
    match = re.fullmatch(r"(\d+):(\d+)", value)
    if match:
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise HfEwcError(f"structure {structure!r}: N:M needs 0 < N < M (e.g. 2:4).")
        return f"{n}:{m}", (n, m)
    raise HfEwcError(f"Unknown structure {structure!r}; choose one of: {STRUCTURE_CHOICES}.")


def check_prune_arguments(
    sparsity: Any, criterion: str, structure: str, scope: str | None, include=None, exclude=None
) -> tuple[str, tuple[int, int] | None, float, str]:
    """Validate the pruning settings; returns ``(structure kind, (N, M) or None, sparsity, scope)``."""
    if criterion not in CRITERIA:
        raise HfEwcError(f"Unknown criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}.")
    kind, nm = parse_structure(structure)
    if nm is not None:
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is not None and not math.isclose(float(sparsity), implied, abs_tol=1e-9):
            raise HfEwcError(
                f"structure {kind} has sparsity {implied:g} (1 − N/M); got sparsity={sparsity}. Leave sparsity out "
                "or pass it."
            )
        sparsity = implied
    if sparsity is None or isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise HfEwcError(f"sparsity must be a number in [0, 1), got {sparsity!r}.")
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0 or math.isnan(sparsity):
        raise HfEwcError(f"sparsity must be in [0, 1) (the share of weights to remove), got {sparsity}.")
    if scope is not None and scope not in SCOPES:
        raise HfEwcError(f"Unknown scope {scope!r}; choose one of: {', '.join(SCOPES)}.")
    if kind in ("ffn", "heads") and scope == "global":
        raise HfEwcError(
            f"structure {kind!r} removes the same number from every layer (the config holds one size for all layers); "
            "use scope='per_layer' (or leave scope out)."
        )
    if kind in ("ffn", "heads") and (include or exclude):
        raise HfEwcError(f"include/exclude select tensors for unstructured and N:M pruning, not for {kind!r}.")
    return kind, nm, sparsity, scope or ("global" if kind == "unstructured" else "per_layer")
