"""How far importance methods agree: per-parameter and global Pearson and Spearman correlations (Kutalev 2022).

``importance_correlations({"fisher": Ω_F, "mas": Ω_MAS, "signal": Ω_S})`` compares every pair of methods on every
parameter tensor ("per layer") and on all parameters together ("global"), with three coefficients:

- ``pearson`` of the raw values;
- ``spearman``: Pearson of the ranks, ties ranked by their average (as ``scipy.stats.spearmanr``); a tensor larger
  than ``max_rank_samples`` is ranked on a seeded random subsample of its positions (the same positions for every
  method), so the cost stays bounded;
- ``pearson_log``: Pearson of ``log(Ω + ε)`` with ε = ``log_eps`` × the mean of that method's Ω over the tensor, so
  the many near-zero importances of a language model weigh as much as the few large ones, whatever each method's
  scale.

A coefficient is ``None`` where it is undefined (a tensor constant under one of the two methods).
"""

import itertools
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..utils import HfEwcError


COEFFICIENTS = ("pearson", "spearman", "pearson_log")


def _pearson(x: Tensor, y: Tensor) -> float | None:
    value = float(torch.corrcoef(torch.stack([x, y]))[0, 1])  # NaN where one side is constant
    return value if math.isfinite(value) else None


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1…n of ``x`` (float64), ties sharing the average of the ranks they span."""
    values, order = torch.sort(x)
    _, counts = torch.unique_consecutive(values, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2  # (first + last) / 2 with 1-based ranks
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(mean_rank, counts)
    return ranks


def correlation(x: Tensor, y: Tensor, *, log_eps: float = 1e-6) -> dict[str, float | None]:
    """The three coefficients between two flat importance vectors of equal length (see the module docstring)."""
    x, y = x.detach().reshape(-1).to(torch.float64), y.detach().reshape(-1).to(torch.float64)

    def log(v: Tensor) -> Tensor:
        return torch.log(v + log_eps * float(v.mean()) + torch.finfo(torch.float64).tiny)

    return {
        "pearson": _pearson(x, y),
        "spearman": _pearson(average_ranks(x), average_ranks(y)),
        "pearson_log": _pearson(log(x), log(y)),
    }


def _check(importances: Mapping[str, Mapping[str, Tensor]]) -> list[str]:
    methods = list(importances)
    if len(methods) < 2:
        raise HfEwcError(f"Correlations need importances of at least two methods; got {methods or 'none'}.")
    first, *others = methods
    names = list(importances[first])
    for method in others:
        missing = sorted(set(names) ^ set(importances[method]))
        if missing:
            raise HfEwcError(
                f"Importances of {first!r} and {method!r} cover different parameters (first: {missing[0]!r}); were "
                "they collected on the same model?"
            )
        for name in names:
            a, b = importances[first][name], importances[method][name]
            if tuple(a.shape) != tuple(b.shape):
                raise HfEwcError(
                    f"Parameter {name!r} has shape {tuple(a.shape)} under {first!r} but {tuple(b.shape)} under "
                    f"{method!r}; were they collected on the same model?"
                )
    for method in methods:
        for name, value in importances[method].items():
            if not bool(torch.isfinite(value).all()):
                raise HfEwcError(f"The {method!r} importance of {name!r} holds NaN/Inf; recollect it.")
    return names


def importance_correlations(
    importances: Mapping[str, Mapping[str, Tensor]],
    *,
    max_rank_samples: int = 200_000,
    log_eps: float = 1e-6,
    seed: int = 0,
) -> dict:
    """Pairwise correlations of importance methods, per parameter tensor and over all parameters.

    Args:
        importances (`Mapping[str, Mapping[str, Tensor]]`):
            ``{method: {parameter name: Ω}}``; every method must cover the same parameters with the same shapes.
        max_rank_samples (`int`, *optional*, defaults to 200000):
            Tensors (and the global concatenation) with more elements are compared on this many positions, drawn
            once with ``seed`` and shared by every method and coefficient.
        log_eps (`float`, *optional*, defaults to 1e-6):
            ε of ``pearson_log``, relative to each method's mean Ω over the compared values.
        seed (`int`, *optional*, defaults to 0):
            Seed of the subsample.

    Returns:
        ``{"methods": [...], "pairs": [[a, b], ...], "per_parameter": {name: {"a|b": {coefficient: value}}},
        "global": {"a|b": {...}}, "sampled": {name: n compared}}``.
    """
    names = _check(importances)
    if max_rank_samples < 2:
        raise HfEwcError(f"max_rank_samples must be >= 2, got {max_rank_samples}.")
    methods = list(importances)
    pairs = list(itertools.combinations(methods, 2))
    generator = torch.Generator().manual_seed(seed)

    def positions(n: int) -> Tensor | None:
        return None if n <= max_rank_samples else torch.randperm(n, generator=generator)[:max_rank_samples]

    def compare(flat: dict[str, Tensor]) -> tuple[dict, int]:
        n = next(iter(flat.values())).numel()
        keep = positions(n)
        chosen = {m: v if keep is None else v[keep] for m, v in flat.items()}
        return {f"{a}|{b}": correlation(chosen[a], chosen[b], log_eps=log_eps) for a, b in pairs}, (
            n if keep is None else len(keep)
        )

    per_parameter, sampled = {}, {}
    for name in names:
        per_parameter[name], sampled[name] = compare({m: importances[m][name].reshape(-1) for m in methods})
    everything = {m: torch.cat([importances[m][n].reshape(-1).to(torch.float64) for n in names]) for m in methods}
    global_, sampled["(global)"] = compare(everything)
    return {
        "methods": methods,
        "pairs": [list(p) for p in pairs],
        "per_parameter": per_parameter,
        "global": global_,
        "sampled": sampled,
        "coefficients": list(COEFFICIENTS),
        "log_eps": log_eps,
        "max_rank_samples": max_rank_samples,
        "seed": seed,
    }
