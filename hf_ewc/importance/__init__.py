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

from torch import nn

from ..distributed import trainable_parameters
from ..utils import HfEwcError
from ._loop import ImportanceMethod, ImportanceResult, run_collection
from .fisher import ESTIMATORS, Fisher
from .mas import MAS
from .si import SI_STATE_NAME, SIAccumulator
from .signal import Signal
from .uniform import Uniform


__all__ = [
    "ESTIMATORS",
    "METHODS",
    "SI_STATE_NAME",
    "ImportanceMethod",
    "ImportanceResult",
    "SIAccumulator",
    "collect_importance",
]

# name → method; `si` is not here: it is accumulated by `EWCTrainer` on the training trajectory (`SIAccumulator`).
METHODS: dict[str, type[ImportanceMethod]] = {m.name: m for m in (Fisher, MAS, Signal, Uniform)}


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
) -> ImportanceResult:
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
        [`ImportanceResult`]: a ``dict`` of float32 importances keyed by parameter name, on the parameters' devices,
        which also says how they were obtained (``num_samples``, ``method``, ``estimator``, ``options``).

    Under `accelerate launch` with N processes, every process must call this with the same data: samples are split
    round-robin, summed with `accelerate.utils.reduce` and divided by the global count, so the result equals a
    1-process run on the same samples for the per-sample estimators (`empirical`, `exact`, MAS, signal). `batched`
    depends on which samples share a minibatch and `sampled` on the label draws, so those two differ by sampling
    noise.
    """
    if method == "si":
        raise HfEwcError(
            "method 'si' is accumulated during training, not collected afterwards: train with "
            "EWCTrainer(args=EWCConfig(importance_method='si')) and call trainer.consolidate()."
        )
    if method not in METHODS:
        raise HfEwcError(f"Unknown importance method {method!r}; choose one of: {', '.join(METHODS)}, si.")
    cls = METHODS[method]
    seed = method_options.pop("seed", 0)
    show_progress = method_options.pop("show_progress", True)
    accepted = [o for o in cls.options if o != "estimator"]  # the estimator has its own argument
    unknown = sorted(set(method_options) - set(accepted))
    if unknown:
        raise HfEwcError(
            f"Unknown option(s) {unknown} for method {method!r}; it accepts: {', '.join(accepted) or 'none'}."
        )
    if method == "fisher" and estimator not in ESTIMATORS:
        raise HfEwcError(f"Unknown fisher estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}.")
    params = trainable_parameters(model)
    if not params:
        raise HfEwcError("The model has no trainable parameters (requires_grad=True): nothing to measure.")
    recorded = {**method_options, "batch_size": batch_size, "max_samples": max_samples, "seed": seed}
    fisher_estimator = estimator if "estimator" in cls.options else None
    options = {**method_options, **({"estimator": estimator} if fisher_estimator else {})}
    if not cls.needs_data:
        return ImportanceResult(cls(model, params, seed=seed, **options).finalize({}, 0), 0, method, None, recorded)
    label = f"importance: {method}" + (f"/{estimator}" if fisher_estimator else "")
    importances, count, resolved = run_collection(
        cls, model, data, params, options=options, batch_size=batch_size, data_collator=data_collator,
        max_samples=max_samples, seed=seed, show_progress=show_progress, label=label,
    )  # fmt: skip
    return ImportanceResult(importances, count, method, fisher_estimator, {**recorded, **resolved})
