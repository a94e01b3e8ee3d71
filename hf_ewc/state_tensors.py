"""How the EWC state holds, checks and normalizes its tensors: whole on the CPU, or — for FSDP2-sharded parameters —
this process's slices as DTensors laid out like the parameters (see [`held`]); the checks of what it is given and
of the model it protects.
"""

from collections.abc import Mapping

import torch
from torch import nn

from .distributed import all_reduce_, as_shard_of, is_dtensor, local_tensor, shard_like
from .state_io import STATE_DTYPES
from .utils import HfEwcError


def storage_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in STATE_DTYPES.values():
            raise HfEwcError(f"Unsupported EWC state dtype {dtype}; choose one of: {', '.join(STATE_DTYPES)}.")
        return dtype
    if dtype not in STATE_DTYPES:
        raise HfEwcError(f"Unknown EWC state dtype {dtype!r}; choose one of: {', '.join(STATE_DTYPES)}.")
    return STATE_DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in STATE_DTYPES.items() if d == dtype)


def held(value: torch.Tensor, dtype: torch.dtype, *, copy: bool = True, like: torch.Tensor | None = None):
    """How the state holds Ω or θ* of one parameter: a whole tensor on the CPU; for an FSDP2-sharded parameter
    (``value`` a DTensor, or ``like`` one: a whole ``value`` is cut to its slice) this process's slice as a DTensor
    laid out like the parameter, on the slice's device."""
    if is_dtensor(like) and not is_dtensor(value):
        value = as_shard_of(shard_like(value.detach(), like), like)
    if is_dtensor(value):
        return as_shard_of(value.to_local().detach().to(dtype=dtype, copy=copy).contiguous(), value)
    return value.detach().to("cpu", dtype, copy=copy).contiguous()


def check_importances(importances: Mapping[str, torch.Tensor], *, what: str = "importance") -> None:
    """Refuse non-finite or negative importances, naming the first bad parameter (a sharded parameter's: in this
    process's slice)."""
    for name, value in importances.items():
        if not torch.is_tensor(value):
            raise HfEwcError(f"The {what} of {name!r} is a {type(value).__name__}, not a tensor.")
        value = local_tensor(value)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise HfEwcError(
                f"The {what} of parameter {name!r} has {bad} non-finite value(s) (NaN/Inf); recollect it in float32 "
                "(check the model's loss on that data) before consolidating."
            )
        if bool((value < 0).any()):
            raise HfEwcError(
                f"The {what} of parameter {name!r} has negative values (min {float(value.min()):.3g}); importances "
                "must be >= 0 for the penalty to pull towards the anchors."
            )


def check_pairs(importances: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor]) -> None:
    """Importances and anchors given to an `EWCState`: the same parameters, the same shapes, valid importances."""
    if set(importances) != set(anchors):
        only_imp = sorted(set(importances) - set(anchors))
        only_anc = sorted(set(anchors) - set(importances))
        raise HfEwcError(
            "importances and anchors must cover the same parameters; "
            f"only in importances: {only_imp[:3]}, only in anchors: {only_anc[:3]}."
        )
    for name, importance in importances.items():
        if importance.shape != anchors[name].shape:
            raise HfEwcError(
                f"Parameter {name!r}: importance shape {tuple(importance.shape)} differs from anchor shape "
                f"{tuple(anchors[name].shape)}."
            )
    check_importances(importances)


def normalize(importances: Mapping[str, torch.Tensor], kind: str, domain: str) -> tuple[Mapping, float | None]:
    """``Ω_t / mean(Ω_t)`` over all parameters (the sum in float64) for ``kind="mean"``, with the divisor."""
    if kind == "none":
        return importances, None
    total = torch.tensor(
        [sum(float(local_tensor(t).detach().sum(dtype=torch.float64)) for t in importances.values())],
        dtype=torch.float64,
    )
    if any(is_dtensor(t) for t in importances.values()):  # slices: the sum over every process
        all_reduce_(total, "sum")
    count = sum(t.numel() for t in importances.values())  # a DTensor's numel is the whole parameter's
    mean = float(total) / max(count, 1)
    if not mean > 0:
        raise HfEwcError(
            f"The importances of domain {domain!r} are all 0: there is nothing to normalize (Ω̄ = 0). Check that the "
            "model trained and that the method sees its parameters, or consolidate with importance_normalization="
            "'none'."
        )
    return {n: as_shard_of(local_tensor(t) / mean, t) for n, t in importances.items()}, mean


def check_covers(importances: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter]) -> None:
    """Importances to consolidate must cover exactly the trainable parameters, shape for shape."""
    missing = [n for n in params if n not in importances]
    extra = [n for n in importances if n not in params]
    if missing:
        raise HfEwcError(
            f"No importance given for trainable parameter {missing[0]!r} ({len(missing)} missing); collect the "
            "importances on this model with collect_importance(model, ...)."
        )
    if extra:
        raise HfEwcError(
            f"Importance given for {extra[0]!r}, which is not a trainable parameter of the model ({len(extra)} "
            "such); were the importances collected on another model or with other parameters frozen?"
        )
    for name, p in params.items():
        if tuple(importances[name].shape) != tuple(p.shape):
            raise HfEwcError(
                f"Importance of {name!r} has shape {tuple(importances[name].shape)}, the parameter has "
                f"{tuple(p.shape)}."
            )


def check_fits(anchors: Mapping[str, torch.Tensor], model: nn.Module, *, strict: bool, empty: bool) -> list[str]:
    """[`EWCState.validate`]: the state's parameters (``anchors``) against ``model``'s; the uncovered trainable
    ones."""

    model_params = dict(model.named_parameters())
    missing = [n for n in anchors if n not in model_params]
    if missing:
        hint = ""
        if any(n.startswith("base_model.model.") for n in model_params) != any(
            n.startswith("base_model.model.") for n in anchors
        ):
            hint = " (one of the two is a PEFT-wrapped model and the other is not)"
        raise HfEwcError(
            f"The EWC state protects {missing[0]!r}, which the model does not have ({len(missing)} such "
            f"parameter(s)){hint}; load the state that was saved with this model."
        )
    for name, anchor in anchors.items():
        if tuple(anchor.shape) != tuple(model_params[name].shape):
            raise HfEwcError(
                f"The EWC state's {name!r} has shape {tuple(anchor.shape)} but the model's has "
                f"{tuple(model_params[name].shape)}; the state belongs to another model."
            )
    uncovered = [n for n, p in model_params.items() if p.requires_grad and n not in anchors]
    if uncovered and strict and not empty:
        raise HfEwcError(
            f"The model's trainable parameter {uncovered[0]!r} is not in the EWC state ({len(uncovered)} such); "
            "freeze it, or validate with strict=False to train it unprotected."
        )
    return uncovered


def slicer(params: Mapping[str, torch.Tensor]):
    """For `read_state_file`: a tensor read whole becomes this process's slice of the sharded parameter of that name
    (a DTensor laid out like it); other tensors are kept as read (a shape that differs is named by `check_fits`)."""

    def place(name: str, tensor: torch.Tensor) -> torch.Tensor:
        like = params.get(name)
        if not is_dtensor(like) or tuple(tensor.shape) != tuple(like.shape):
            return tensor
        return as_shard_of(shard_like(tensor, like), like)

    return place


def importance_stats(importances: Mapping[str, torch.Tensor]) -> tuple[float, float, float]:
    """``(max, mean, share of exact zeros)`` of Ω over every parameter (slices reduced over the processes)."""
    local = [local_tensor(t) for t in importances.values()]
    largest = torch.tensor([max((float(t.max()) for t in local if t.numel()), default=0.0)], dtype=torch.float64)
    sums = torch.tensor(
        [sum(float(t.float().sum()) for t in local), sum(int((t == 0).sum()) for t in local)], dtype=torch.float64
    )
    if any(is_dtensor(t) for t in importances.values()):
        all_reduce_(largest, "max")
        all_reduce_(sums, "sum")
    total = max(sum(t.numel() for t in importances.values()), 1)  # (a DTensor's numel is the whole parameter's)
    return float(largest), float(sums[0]) / total, float(sums[1]) / total
