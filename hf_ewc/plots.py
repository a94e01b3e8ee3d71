"""Figures of a continual-learning run, drawn without pyplot (no global backend, nothing left open): the evaluation
matrix as a heatmap, each domain's metric along the sequence, and the frontier of a λ sweep."""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .metrics import as_initial, as_matrix, domain_names
from .utils import atomic_path


__all__ = ["plot_correlations", "plot_frontier", "plot_general", "plot_matrix", "plot_trajectories", "plot_units"]

_DPI = 110


def _pyplot_free_figure(figsize: tuple[float, float]):
    """A `Figure` on its own Agg canvas: no pyplot, no global backend, nothing to leak when it goes out of scope."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy (~0.5 s): only when a plot is drawn
        from matplotlib.figure import Figure  # heavy, as above
    except ImportError as err:
        raise ImportError("Plotting needs matplotlib (a dependency of hf-ewc): `pip install matplotlib`.") from err
    figure = Figure(figsize=figsize, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        # The temp file ends in ".tmp", so the format cannot come from the name.
        figure.savefig(tmp, format="png", dpi=_DPI)


def _heatmap_size(size: int) -> tuple[float, float]:
    cell = min(0.9, max(0.45, 8.0 / size))
    return (2.6 + cell * size, 1.9 + cell * size)


def _trajectories_size(points: int) -> tuple[float, float]:
    return (max(5.5, 3.0 + 0.8 * points), 4.0)


def _cell_format(values: np.ndarray) -> str:
    """One decimal count for the whole heatmap, so that cells of a column line up and compare at a glance."""
    largest = float(np.abs(values).max())
    return ".0f" if largest >= 100 else ".1f" if largest >= 10 else ".2f"


def _line_colours(count: int) -> list:
    from matplotlib import colormaps  # heavy (~0.5 s): only when a plot is drawn

    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(k % palette.N) for k in range(count)]


def _tick_rotation(labels: Sequence[str]) -> int:
    return 30 if len(labels) > 4 or max(len(label) for label in labels) > 8 else 0


def plot_matrix(
    matrix: Any,
    domains: Sequence[str],
    path: str | os.PathLike,
    *,
    metric: str,
    higher_is_better: bool,
    title: str | None = None,
) -> None:
    """Write the evaluation matrix as an annotated PNG heatmap; better cells get the same colour for any metric.

    Args:
        matrix (`list[list[float]]` or `np.ndarray`):
            The T×T matrix (row i: after training domain i; column j: evaluated on domain j).
        domains (`list[str]`):
            The T domain names, in training order.
        path (`str` or `os.PathLike`):
            The PNG to write (atomically: a failed plot leaves an existing file untouched).
        metric (`str`):
            The metric's name, on the colour bar.
        higher_is_better (`bool`):
            `True` for accuracy-like metrics, `False` for loss or perplexity (the colour map is reversed).
        title (`str`, *optional*):
            Defaults to "<metric> after each domain".
    """
    names = domain_names(domains)
    values = as_matrix(matrix, names)
    size = len(names)
    figure = _pyplot_free_figure(_heatmap_size(size))
    ax = figure.add_subplot()
    cmap = "viridis" if higher_is_better else "viridis_r"
    image = ax.imshow(values, cmap=cmap, aspect="equal")
    figure.colorbar(image, ax=ax, label=f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    fontsize = max(6.0, min(10.0, 80.0 / size))
    cell_format = _cell_format(values)
    for (i, j), value in np.ndenumerate(values):
        red, green, blue, _ = image.cmap(image.norm(value))
        # Dark text on the bright end of viridis, light text on the dark end.
        colour = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
        weight = "bold" if i == j else "normal"
        text = format(value, cell_format)
        ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=fontsize, fontweight=weight)
    rotation = _tick_rotation(names)
    ax.set_xticks(range(size), names, rotation=rotation, ha="right" if rotation else "center", rotation_mode="anchor")
    ax.set_yticks(range(size), names)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training on")
    ax.set_title(title if title is not None else f"{metric} after each domain")
    _save(figure, path)


def plot_trajectories(
    matrix: Any,
    domains: Sequence[str],
    path: str | os.PathLike,
    *,
    metric: str,
    initial: Any = None,
    title: str | None = None,
    baseline: Any = None,
) -> None:
    """Write a PNG with one line per domain: its metric after each step of the sequence, a star where it was trained
    (and, with ``baseline``, the same for naive fine-tuning as a dashed line of the same colour).

    Args:
        matrix (`list[list[float]]` or `np.ndarray`):
            The T×T matrix (row i: after training domain i; column j: evaluated on domain j).
        domains (`list[str]`):
            The T domain names, in training order.
        path (`str` or `os.PathLike`):
            The PNG to write (atomically: a failed plot leaves an existing file untouched).
        metric (`str`):
            The metric's name, on the y axis.
        initial (`list[float]` or `np.ndarray`, *optional*):
            The metric before any training, plotted as the first point of every line.
        title (`str`, *optional*):
            Defaults to "<metric> of each domain along the sequence".
        baseline (`list[list[float]]` or `np.ndarray`, *optional*):
            The T×T matrix of a baseline run of the same sequence (naive fine-tuning), drawn dashed.
    """
    names = domain_names(domains)
    values = as_matrix(matrix, names)
    start = as_initial(initial, len(names))
    if start is not None:
        values = np.vstack([start, values])
    offset = 0 if start is None else 1
    labels = (["initial"] if start is not None else []) + [f"after {name}" for name in names]
    figure = _pyplot_free_figure(_trajectories_size(len(labels)))
    ax = figure.add_subplot()
    steps = np.arange(len(labels))
    # tab10 repeats its colours from the 11th line on.
    ax.set_prop_cycle(color=_line_colours(len(names)))
    other = as_matrix(baseline, names) if baseline is not None else None
    if other is not None and start is not None:
        other = np.vstack([start, other])
    for j, name in enumerate(names):
        (line,) = ax.plot(steps, values[:, j], marker="o", markersize=4, label=name)
        if other is not None:
            ax.plot(steps, other[:, j], linestyle="--", color=line.get_color(), alpha=0.7)
        ax.plot(
            j + offset,
            values[j + offset, j],
            marker="*",
            markersize=14,
            color=line.get_color(),
            markeredgecolor="black",
            linestyle="none",
        )
    # A proxy artist, so the legend explains the stars once rather than once per domain.
    ax.plot([], [], marker="*", markersize=12, color="grey", markeredgecolor="black", ls="none", label="trained")
    if other is not None:
        ax.plot([], [], linestyle="--", color="grey", label="naive fine-tuning")
    rotation = _tick_rotation(labels)
    ax.set_xticks(steps, labels, rotation=rotation, ha="right" if rotation else "center", rotation_mode="anchor")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(title if title is not None else f"{metric} of each domain along the sequence")
    figure.legend(loc="outside right upper", fontsize="small")
    _save(figure, path)


def plot_general(
    rows: Sequence[dict],
    path: str | os.PathLike,
    *,
    columns: Sequence[str],
    labels: Sequence[str],
    baseline: Sequence[dict] | None = None,
    title: str | None = None,
) -> None:
    """Write a PNG with one panel per general-ability score (an lm-eval task's metric): its value before the sequence
    and after each domain, with naive fine-tuning's dashed where ``baseline`` gives its rows (same ``labels``)."""
    count = len(columns)
    across = min(count, 3)
    down = -(-count // across)
    figure = _pyplot_free_figure((max(4.5, 2.0 + 0.7 * len(labels)) * across, 3.2 * down))
    steps = np.arange(len(labels))
    rotation = _tick_rotation(labels)
    for k, column in enumerate(columns):
        ax = figure.add_subplot(down, across, k + 1)
        values = np.array([row.get(column, np.nan) for row in rows], dtype=float)
        if np.nanmin(values) > 0 and np.nanmax(values) > 20 * np.nanmin(values):
            ax.set_yscale("log")  # a perplexity from a random model down to a trained one
        ax.plot(steps, values, marker="o", markersize=4, label="this run")
        if baseline is not None:
            other = [row.get(column, np.nan) for row in baseline]
            ax.plot(steps[: len(other)], other, linestyle="--", color="grey", label="naive fine-tuning")
        ax.set_xticks(steps, labels, rotation=rotation, ha="right" if rotation else "center", rotation_mode="anchor")
        ax.set_title(column, fontsize="medium")
        ax.grid(alpha=0.3)
        if k == 0 and baseline is not None:
            ax.legend(fontsize="small")
    figure.suptitle(title if title is not None else "general ability along the sequence")
    _save(figure, path)


def plot_frontier(
    curves: dict[str, list[tuple[float, float, float]]],
    path: str | os.PathLike,
    *,
    min_gain_kept: float,
    best: tuple[str, float] | None = None,
    title: str | None = None,
) -> None:
    """Write a λ sweep's frontier as a PNG: per method, the share of naive fine-tuning's gain kept (x) against the
    share of its forgetting removed (y), one point per λ, with the region that keeps at least ``min_gain_kept``
    shaded.

    Args:
        curves (`dict[str, list[tuple[float, float, float]]]`):
            Method label → ``(λ, gain kept, forgetting removed)`` per λ.
        path (`str` or `os.PathLike`):
            The PNG to write (atomically).
        min_gain_kept (`float`):
            The rule's floor on the gain kept, in (0, 1].
        best (`tuple[str, float]`, *optional*):
            ``(method label, λ)`` of the chosen cell, circled.
        title (`str`, *optional*):
            The figure's title.
    """
    points = [(x, y) for cells in curves.values() for _, x, y in cells if np.isfinite(x) and np.isfinite(y)]
    xs, ys = [x for x, _ in points] + [min_gain_kept, 1.0], [y for _, y in points] + [0.0, 1.0]
    left, right = min(xs) - 0.05, max(xs) + 0.05
    bottom, top = min(ys) - 0.05, max(ys) + 0.05
    figure = _pyplot_free_figure((7.5, 5.5))
    ax = figure.add_subplot()
    ax.axvspan(min_gain_kept, right, color="tab:green", alpha=0.12, label=f"keeps ≥ {min_gain_kept:.0%} of the gain")
    ax.set_prop_cycle(color=_line_colours(max(len(curves), 1)))
    for label, cells in curves.items():
        cells = sorted(cells)
        (line,) = ax.plot([x for _, x, _ in cells], [y for _, _, y in cells], marker="o", linestyle=":", label=label)
        for lam, x, y in cells:
            ax.annotate(f"λ={lam:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7,
                        color=line.get_color())  # fmt: skip
            if best == (label, lam):  # an explicit colour: the ring does not take the next curve's colour
                ax.plot(x, y, marker="o", markersize=16, markerfacecolor="none", color="black", ls="none")
    ax.plot([1.0], [0.0], marker="s", color="grey", ls="none", label="naive fine-tuning")
    ax.set(xlim=(left, right), ylim=(bottom, top), title=title or "forgetting removed vs gain kept, per λ")
    ax.set_xlabel("share of naive fine-tuning's gain on the new domains kept")
    ax.set_ylabel("share of naive fine-tuning's forgetting removed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")
    _save(figure, path)


def plot_correlations(result: dict, path: str | os.PathLike, *, granularity: str) -> None:
    """Heatmaps of an `importance_correlations` result: ``granularity="global"`` draws one method × method matrix per
    coefficient; ``"per_layer"`` draws parameter tensors × method pairs, one panel per coefficient (blank cells: the
    coefficient is undefined there)."""
    methods, coefficients = result["methods"], result["coefficients"]
    pairs = [f"{a}|{b}" for a, b in result["pairs"]]
    if granularity == "global":
        size = len(methods)
        width, height = _heatmap_size(size)
        figure = _pyplot_free_figure((width * len(coefficients) * 0.85, height))
        axes = figure.subplots(1, len(coefficients))
        for ax, coefficient in zip(np.atleast_1d(axes), coefficients):
            values = np.eye(size)
            for key, row in result["global"].items():
                a, b = key.split("|")
                value = row[coefficient]
                values[methods.index(a), methods.index(b)] = values[methods.index(b), methods.index(a)] = (
                    np.nan if value is None else value
                )
            image = ax.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1)
            for (i, j), value in np.ndenumerate(values):
                ax.text(j, i, "" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7)
            rotation = _tick_rotation(methods)
            ax.set_xticks(range(size), methods, rotation=rotation, ha="right" if rotation else "center")
            ax.set_yticks(range(size), methods)
            ax.set_title(coefficient)
        figure.colorbar(image, ax=axes, label="correlation over all parameters")
    elif granularity == "per_layer":
        names = list(result["per_parameter"])
        figure = _pyplot_free_figure((2.5 + 1.2 * len(pairs) * len(coefficients), 1.5 + 0.18 * len(names)))
        axes = figure.subplots(1, len(coefficients), sharey=True)
        for ax, coefficient in zip(np.atleast_1d(axes), coefficients):
            values = np.array(
                [
                    [np.nan if (v := result["per_parameter"][n][p][coefficient]) is None else v for p in pairs]
                    for n in names
                ]
            )
            image = ax.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
            ax.set_xticks(range(len(pairs)), pairs, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=6)
            ax.set_title(coefficient)
        figure.colorbar(image, ax=axes, label="correlation per parameter tensor")
    else:
        raise ValueError(f"Unknown granularity {granularity!r}; choose one of: global, per_layer.")
    _save(figure, path)


def plot_units(history: Sequence[dict], path: str | os.PathLike, *, title: str | None = None) -> None:
    """Write a CLNP allocation over a sequence as a PNG: per layer, one stacked bar after each domain — the share of
    the layer's units owned by each domain so far, and the share still free.

    Args:
        history (`Sequence[dict]`):
            One entry per consolidated domain, as ``CLNP.history`` holds them: ``domain`` and ``layers`` (layer name →
            ``active``, ``free``, ``total``).
        path (`str` or `os.PathLike`):
            The PNG to write (atomically).
        title (`str`, *optional*):
            The figure's title.
    """
    layers = list(history[0]["layers"])
    steps, domains = len(history), [h["domain"] for h in history]
    width = 0.8 / steps
    figure = _pyplot_free_figure((max(6.0, 1.2 + 0.22 * steps * len(layers) + 0.4 * len(layers)), 4.5))
    ax = figure.add_subplot()
    colours = _line_colours(steps)
    x = np.arange(len(layers))
    for s in range(steps):
        bottom = np.zeros(len(layers))
        for k in range(s + 1):  # the units a domain took stay its own: they are frozen afterwards
            share = np.array([history[k]["layers"][n]["active"] / history[k]["layers"][n]["total"] for n in layers])
            ax.bar(x + (s - (steps - 1) / 2) * width, share, width * 0.92, bottom=bottom, color=colours[k],
                   label=domains[k] if s == steps - 1 else None)  # fmt: skip
            bottom += share
        free = np.array([history[s]["layers"][n]["free"] / history[s]["layers"][n]["total"] for n in layers])
        ax.bar(x + (s - (steps - 1) / 2) * width, free, width * 0.92, bottom=bottom, color="lightgrey",
               label="free" if s == steps - 1 else None)  # fmt: skip
    ax.set_xticks(x, [n.removeprefix("model.").removeprefix("layers.") for n in layers])
    ax.tick_params(axis="x", labelrotation=_tick_rotation(layers), labelsize="small")
    ax.set(ylim=(0, 1), ylabel="share of the layer's units", title=title or "units per layer after each domain")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(figure, path)
