"""Continual-learning metrics of an evaluation matrix, and their tables and plots.

``R[i, j]`` is the metric on domain ``j`` measured after training on domain ``i`` (rows follow the training sequence,
columns the evaluated domains, ``T`` domains); the optional ``initial[j]`` is measured before any training. Every
derived number works on the score ``s = R`` (accuracy-like, `higher_is_better=True`) or ``s = −R`` (loss-like), so it
reads "positive = better" in the metric's own units:

- ``acc`` = mean_j ``R[T−1, j]``, the average final metric (not sign-flipped);
- ``bwt`` = mean over ``j < T−1`` of ``s[T−1, j] − s[j, j]`` (Lopez-Paz & Ranzato 2017); negative = forgetting;
- ``fwt`` = mean over ``j ≥ 1`` of ``s[j−1, j] − s_initial[j]``;
- ``forgetting[j]`` = max over ``l ∈ [j, T−2]`` of ``s[l, j] − s[T−1, j]`` (Chaudhry et al. 2018); positive = worse;
- ``learned[j]`` = ``s[j, j] − s[j−1, j]`` (``s_initial[0]`` stands in for the row before the first).
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .utils import HfEwcError


__all__ = [
    "as_initial",
    "as_matrix",
    "continual_metrics",
    "domain_names",
    "format_matrix",
    "format_summary",
    "perplexity",
]

_NONE = "–"


def perplexity(loss: float) -> float:
    """``exp(loss)``, or ``inf`` where that overflows a float (a diverged run should not crash its report).

    Args:
        loss (`float`):
            A mean token-level cross-entropy in nats.

    Returns:
        `float`: The perplexity.
    """
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def _cell_name(i: int, j: int, domains: Sequence[str] | None) -> str:
    if domains is None:
        return f"(after {i}, on {j})"
    return f"(after {i} {domains[i]!r}, on {j} {domains[j]!r})"


def as_matrix(matrix: Any, domains: Sequence[str] | None = None) -> np.ndarray:
    try:
        array = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise HfEwcError(
            f"The evaluation matrix must be a square table of numbers (a list of equal-length rows or a 2-D array): "
            f"{err}."
        ) from err
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] < 1:
        raise HfEwcError(
            f"The evaluation matrix must be T×T with T ≥ 1 (row i: after training domain i, column j: evaluated on "
            f"domain j), got shape {array.shape}; pass one row per trained domain and one column per domain."
        )
    if domains is not None and len(domains) != array.shape[0]:
        raise HfEwcError(
            f"Got {len(domains)} domain names for a {array.shape[0]}×{array.shape[0]} matrix; pass one name per "
            f"row/column, in training order."
        )
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):
        i, j = (int(k) for k in bad[0])
        raise HfEwcError(
            f"Evaluation matrix cell {_cell_name(i, j, domains)} is {array[i, j]}; every cell must be a finite "
            f"number — re-run that evaluation (or, for perplexity, report the loss instead)."
        )
    return array


def as_initial(initial: Any, size: int) -> np.ndarray | None:
    if initial is None:
        return None
    try:
        row = np.asarray(initial, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise HfEwcError(f"`initial` must be a list of {size} numbers (one per domain): {err}.") from err
    if row.shape != (size,):
        raise HfEwcError(
            f"`initial` must hold one number per domain ({size}), got shape {row.shape}; pass the metric of the "
            f"untrained model on each domain, in training order."
        )
    bad = np.flatnonzero(~np.isfinite(row))
    if len(bad):
        raise HfEwcError(
            f"`initial` entry (initial, on {int(bad[0])}) is {row[bad[0]]}; every entry must be a finite number — "
            f"re-run that evaluation."
        )
    return row


def _float(value: Any) -> float:
    # `+ 0.0` turns the -0.0 that the loss sign flip produces into 0.0, which prints and serialises cleanly.
    return float(value) + 0.0


def continual_metrics(matrix: Any, *, higher_is_better: bool, initial: Any = None) -> dict[str, Any]:
    r"""ACC, backward/forward transfer, forgetting and per-domain gains of an evaluation matrix.

    Args:
        matrix (`list[list[float]]` or `np.ndarray`):
            The T×T matrix ``R``: ``R[i][j]`` is the metric on domain ``j`` after training on domain ``i``.
        higher_is_better (`bool`):
            `True` for accuracy-like metrics, `False` for loss or perplexity. Derived numbers are sign-flipped for the
            latter, so that positive always means better.
        initial (`list[float]` or `np.ndarray`, *optional*):
            The metric of the model before any training, one entry per domain. Needed for `fwt` and `learned[0]`.

    Returns:
        `dict`: Plain floats, lists and `None` (JSON-serialisable):

        - `acc` (`float`): mean of the last row, in the metric's units;
        - `bwt` (`float` or `None`): backward transfer, negative = forgetting; `None` when T == 1;
        - `fwt` (`float` or `None`): forward transfer; `None` without `initial` or when T == 1;
        - `forgetting` (`list`): per domain, the drop from its best score to its final one; the last is `None`;
        - `avg_forgetting` (`float` or `None`): mean of the non-`None` forgetting values; `None` when T == 1;
        - `learned` (`list`): per domain, the gain from training on it; the first is `None` without `initial`.

    Raises:
        `HfEwcError`: The matrix is not square, is empty, has a non-finite cell, or `initial` has the wrong length.
    """
    values = as_matrix(matrix)
    size = values.shape[0]
    start = as_initial(initial, size)
    sign = 1.0 if higher_is_better else -1.0
    score = sign * values
    start_score = None if start is None else sign * start
    last = size - 1

    bwt = None
    fwt = None
    if size > 1:
        bwt = _float(np.mean([score[last, j] - score[j, j] for j in range(last)]))
        if start_score is not None:
            fwt = _float(np.mean([score[j - 1, j] - start_score[j] for j in range(1, size)]))
    forgetting: list[float | None] = [_float(score[j:last, j].max() - score[last, j]) for j in range(last)] + [None]
    learned: list[float | None] = [_float(score[j, j] - score[j - 1, j]) for j in range(1, size)]
    learned.insert(0, None if start_score is None else _float(score[0, 0] - start_score[0]))
    return {
        "acc": _float(values[last].mean()),
        "bwt": bwt,
        "fwt": fwt,
        "forgetting": forgetting,
        "avg_forgetting": _float(np.mean(forgetting[:last])) if size > 1 else None,
        "learned": learned,
    }


def domain_names(domains: Sequence[str]) -> list[str]:
    # A bare string is iterable too, and would silently become one domain per character.
    if isinstance(domains, (str, bytes)) or not hasattr(domains, "__iter__"):
        raise HfEwcError(f"`domains` must be a list of domain names, got {type(domains).__name__}.")
    return [str(name) for name in domains]


def _check_digits(digits: int) -> None:
    if not isinstance(digits, int) or isinstance(digits, bool) or digits < 0:
        raise HfEwcError(f"`digits` must be an integer ≥ 0, got {digits!r}.")


def _table(rows: list[list[str]], *, markdown: bool, numeric_from: int = 1) -> str:
    """Render ``rows`` (the first is the header); columns from `numeric_from` on are right-aligned."""
    if markdown:
        # A bare `|` in a domain name would split the cell.
        rows = [[cell.replace("|", "\\|") for cell in row] for row in rows]
        rule = ["---" if k < numeric_from else "---:" for k in range(len(rows[0]))]
        return "\n".join("| " + " | ".join(row) + " |" for row in [rows[0], rule, *rows[1:]])
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) if k < numeric_from else cell.rjust(w) for k, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def format_matrix(
    matrix: Any,
    domains: Sequence[str],
    *,
    metric: str,
    initial: Any = None,
    markdown: bool = False,
    digits: int = 3,
) -> str:
    """The evaluation matrix as a table: rows "initial" (if given) and "after <domain>", one column per domain.

    Args:
        matrix (`list[list[float]]` or `np.ndarray`):
            The T×T matrix (row i: after training domain i; column j: evaluated on domain j).
        domains (`list[str]`):
            The T domain names, in training order.
        metric (`str`):
            The metric's name, shown in the header's corner.
        initial (`list[float]` or `np.ndarray`, *optional*):
            The metric before any training, shown as the first row.
        markdown (`bool`, *optional*, defaults to `False`):
            A GitHub Markdown table instead of aligned plain text.
        digits (`int`, *optional*, defaults to `3`):
            Decimal places.

    Returns:
        `str`: The table, without a trailing newline.
    """
    names = domain_names(domains)
    values = as_matrix(matrix, names)
    start = as_initial(initial, len(names))
    _check_digits(digits)
    rows = [[str(metric), *names]]
    if start is not None:
        rows.append(["initial", *(f"{v:.{digits}f}" for v in start)])
    rows.extend([f"after {name}", *(f"{v:.{digits}f}" for v in row)] for name, row in zip(names, values))
    return _table(rows, markdown=markdown)


def format_summary(
    metrics: Mapping[str, Any], domains: Sequence[str], *, metric: str, markdown: bool = False, digits: int = 3
) -> str:
    """ACC, BWT, FWT and average forgetting, then one line per domain with its forgetting and learned gain.

    Args:
        metrics (`dict`):
            The output of [`continual_metrics`].
        domains (`list[str]`):
            The T domain names, in training order.
        metric (`str`):
            The metric's name.
        markdown (`bool`, *optional*, defaults to `False`):
            GitHub Markdown tables instead of aligned plain text.
        digits (`int`, *optional*, defaults to `3`):
            Decimal places.

    Returns:
        `str`: The summary (`None` values shown as "–"), without a trailing newline.
    """
    names = domain_names(domains)
    _check_digits(digits)
    missing = [key for key in ("acc", "bwt", "fwt", "forgetting", "avg_forgetting", "learned") if key not in metrics]
    if missing:
        raise HfEwcError(f"`metrics` lacks {', '.join(missing)}; pass the dict returned by `continual_metrics`.")
    for key in ("forgetting", "learned"):
        if len(metrics[key]) != len(names):
            raise HfEwcError(
                f"`metrics[{key!r}]` has {len(metrics[key])} entries for {len(names)} domains; pass one domain name "
                f"per row of the matrix the metrics came from."
            )

    def show(value: float | None, signed: bool = False) -> str:
        if value is None:
            return _NONE
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"

    overall = [
        ["", "value"],
        [f"ACC (mean final {metric})", show(metrics["acc"])],
        ["BWT (backward transfer)", show(metrics["bwt"], signed=True)],
        ["FWT (forward transfer)", show(metrics["fwt"], signed=True)],
        ["avg forgetting", show(metrics["avg_forgetting"])],
    ]
    per_domain = [["domain", "forgetting", "learned"]]
    per_domain.extend(
        [name, show(f), show(g, signed=True)] for name, f, g in zip(names, metrics["forgetting"], metrics["learned"])
    )
    # For a loss the derived numbers are sign-flipped; say so, or a positive BWT reads as "loss went up".
    note = f"{metric}: BWT, FWT and learned are positive when better; forgetting is positive when worse."
    if markdown:
        return "\n\n".join([_table(overall, markdown=True), _table(per_domain, markdown=True), f"*{note}*"])
    return "\n".join([_table(overall, markdown=False), "", _table(per_domain, markdown=False), note])
