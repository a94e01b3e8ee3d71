"""Per-parameter importances: ``collect_importance(model, data, method=...)``.

| method    | what Ω is                                                  | needs           | cost                   |
|-----------|------------------------------------------------------------|-----------------|------------------------|
| `fisher`  | diagonal Fisher: `empirical`/`sampled`/`exact`/`batched`   | logits (labels) | ≈ 1 fwd+bwd per sample |
| `mas`     | mean abs. gradient of ‖probs‖² (or ‖logits‖²)              | logits          | ≈ 1 fwd+bwd per sample |
| `signal`  | |W| × mean |input| (total absolute signal)                 | a forward pass  | ≈ 1 fwd per sample     |
| `uniform` | Ω = 1 (the L2 baseline)                                    | nothing         | 0                      |
| `si`      | SI path integral, accumulated by `EWCTrainer` in training  | training        | ≈ 3 P-sized ops a step |
"""

from collections.abc import Callable
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..state import check_importances, trainable_parameters
from ..utils import HfEwcError
from . import fisher, mas, signal
from ._collect import (
    ImportanceResult,
    check_world_size,
    collection_mode,
    iterate_batches,
    model_shifts_labels,
    reduce_across_processes,
)
from .si import SIAccumulator


__all__ = ["METHODS", "ImportanceResult", "SIAccumulator", "collect", "collect_importance"]

METHODS: dict[str, tuple[str, ...]] = {
    "fisher": fisher.OPTIONS,
    "mas": mas.OPTIONS,
    "signal": signal.OPTIONS,
    "uniform": (),
}


def collect_importance(
    model: nn.Module,
    data: Any,
    method: str = "fisher",
    *,
    estimator: str = "empirical",
    max_samples: int | None = None,
    batch_size: int = 8,
    data_collator: Callable | None = None,
    **method_options: Any,
) -> dict[str, Tensor]:
    r"""Per-parameter importances Ω of ``model`` on ``data``.

    Args:
        model (`torch.nn.Module`):
            A 🤗 transformers model or any module whose forward takes the batch's keys (``labels`` included) and
            returns ``logits`` (and ``loss`` when given labels). Only parameters with ``requires_grad`` get an
            importance.
        data (`torch.utils.data.Dataset`, `datasets.Dataset` or `torch.utils.data.DataLoader`):
            Samples to measure on. A Dataset is batched in order with ``data_collator``
            (`transformers.default_data_collator` by default); a 🤗 Dataset loses the columns the forward does not
            take.
        method (`str`, *optional*, defaults to `"fisher"`):
            `"fisher"`, `"mas"`, `"signal"` or `"uniform"` (see the module docstring). `"si"` needs the training
            trajectory: use `EWCConfig(importance_method="si")`.
        estimator (`str`, *optional*, defaults to `"empirical"`):
            Fisher estimator: `"empirical"`, `"sampled"`, `"exact"` or `"batched"` (see [`hf_ewc.importance.fisher`]).
            Ignored by the other methods.
        max_samples (`int`, *optional*):
            Use the first ``max_samples`` samples only.
        batch_size (`int`, *optional*, defaults to `8`):
            Batch size when ``data`` is a Dataset. Per-sample methods hold ``batch_size`` per-sample gradients of the
            largest layer at once.
        data_collator (`Callable`, *optional*):
            Collator when ``data`` is a Dataset.
        method_options:
            `seed` (default 0: the collection runs under a forked, seeded RNG — label draws and random collators are
            reproducible and the caller's RNG is untouched); `show_progress` (default `True`); `fisher`: `shift_labels`
            (default: auto-detected as the model's loss does), `per_sample` (`"auto"` | `"hooks"` | `"loop"`),
            `max_backward_per_batch` (`exact` only, default 256); `mas`: `output` (`"probs"` | `"logits"`),
            `shift_labels`, `per_sample`; `signal`: `bias` (`"abs"` | `"output"`).

    Returns:
        `dict[str, torch.Tensor]`: float32 importances keyed by parameter name, on the parameters' devices.

    Under `accelerate launch` with N processes, every process must call this with the same data: samples are split
    round-robin, summed with `accelerate.utils.reduce` and divided by the global count, so the result equals a
    1-process run on the same samples for the per-sample estimators (`empirical`, `exact`, MAS, signal). `batched`
    depends on which samples share a minibatch and `sampled` on the label draws, so those two differ by sampling
    noise.
    """
    return collect(
        model,
        data,
        method,
        estimator=estimator,
        max_samples=max_samples,
        batch_size=batch_size,
        data_collator=data_collator,
        **method_options,
    ).importances


def collect(
    model: nn.Module,
    data: Any,
    method: str = "fisher",
    *,
    estimator: str = "empirical",
    max_samples: int | None = None,
    batch_size: int = 8,
    data_collator: Callable | None = None,
    seed: int | None = 0,
    show_progress: bool = True,
    **options: Any,
) -> ImportanceResult:
    """[`collect_importance`] returning an [`ImportanceResult`] (importances + sample count + settings)."""
    if method == "si":
        raise HfEwcError(
            "method 'si' is accumulated during training, not collected afterwards: train with "
            "EWCTrainer(args=EWCConfig(importance_method='si')) and call trainer.consolidate()."
        )
    if method not in METHODS:
        raise HfEwcError(f"Unknown importance method {method!r}; choose one of: {', '.join(METHODS)}, si.")
    unknown = sorted(set(options) - set(METHODS[method]))
    if unknown:
        accepted = ", ".join(METHODS[method]) or "none"
        raise HfEwcError(f"Unknown option(s) {unknown} for method {method!r}; it accepts: {accepted}.")
    if method == "fisher" and estimator not in fisher.ESTIMATORS:
        raise HfEwcError(f"Unknown fisher estimator {estimator!r}; choose one of: {', '.join(fisher.ESTIMATORS)}.")
    params = trainable_parameters(model)
    if not params:
        raise HfEwcError("The model has no trainable parameters (requires_grad=True): nothing to measure.")
    recorded = dict(options)
    recorded.update({"batch_size": batch_size, "max_samples": max_samples, "seed": seed})

    if method == "uniform":
        importances = {n: torch.ones(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
        return ImportanceResult(importances, 0, method, None, recorded)

    # Without an Accelerator around, PartialState reads no ACCELERATE_USE_CPU: pass it, or a CPU launch of N processes
    # would not initialise the process group.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_world_size(state)
    batches, num_batches = iterate_batches(
        data, model, batch_size=batch_size, data_collator=data_collator, max_samples=max_samples, state=state
    )
    label = f"importance: {method}" + (f"/{estimator}" if method == "fisher" else "")
    batches = tqdm(batches, total=num_batches, desc=label, disable=not (show_progress and state.is_main_process))
    if method in ("fisher", "mas") and options.get("shift_labels") is None:
        options["shift_labels"] = model_shifts_labels(model)
        recorded["shift_labels"] = options["shift_labels"]

    plan = None
    with collection_mode(model, seed):
        if method == "fisher":
            sums, count = fisher.accumulate(model, batches, params, estimator=estimator, seed=seed, **options)
        elif method == "mas":
            sums, count = mas.accumulate(model, batches, params, **options)
        else:
            sums, count, plan = signal.accumulate(model, batches, params, **options)
    sums, count = reduce_across_processes(sums, count, state)
    if count == 0:
        raise HfEwcError(
            "No sample counted: every sample had all its labels masked (-100). Check the data collator and the labels."
        )
    if method == "signal":
        importances = signal.finalize(sums, count, plan, params)
    else:
        importances = {n: s / count for n, s in sums.items()}
    check_importances(importances)
    if method == "fisher":
        recorded["count_unit"] = "minibatches" if estimator == "batched" else "samples"
    return ImportanceResult(importances, count, method, estimator if method == "fisher" else None, recorded)
