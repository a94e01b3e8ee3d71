"""Per-parameter importances: ``collect_importance(model, data, method=...)``.

| method        | what Ω is                                                | needs           | cost                 |
|---------------|----------------------------------------------------------|-----------------|----------------------|
| `fisher`      | diagonal Fisher: `empirical`/`sampled`/`exact`/`batched` | logits (labels) | ≈ 1 fwd+bwd a sample |
| `sqrt_fisher` | √ of the Fisher of the domain (Benzing's `rEWC`)         | logits          | as `fisher`          |
| `af`          | E_c p·|∇ log p| ("absolute Fisher", Benzing)             | logits          | 1 bwd per class      |
| `mas`         | mean abs. gradient of ‖probs‖² (or ‖logits‖²)            | logits          | ≈ 1 fwd+bwd a sample |
| `masx`        | MAS on the max probability (Benzing's `MASX`)            | logits          | ≈ 1 fwd+bwd a sample |
| `signal`      | |W| × mean |input| (total absolute signal)               | a forward pass  | ≈ 1 fwd a sample     |
| `uniform`     | Ω = 1 (the L2 baseline)                                  | nothing         | 0                    |
| SI family     | `si`, `siu`, `sib`, `sos`, `onaf`: from training steps   | training        | see `importance.si`  |
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..distributed import replicated_parameter, trainable_parameters
from ..utils import HfEwcError
from ._loop import ImportanceMethod, ImportanceResult, run_collection
from .correlation import importance_correlations
from .fisher import ESTIMATORS, AbsoluteFisher, Fisher, SqrtFisher
from .mas import MAS, MASX
from .si import SI_FAMILY, SI_STATE_NAME, SOS_BETA, IndependentBatches, SIAccumulator
from .signal import Signal
from .uniform import Uniform


__all__ = [
    "ESTIMATORS",
    "METHODS",
    "SI_FAMILY",
    "SI_STATE_NAME",
    "SOS_BETA",
    "CollectionSpec",
    "ImportanceMethod",
    "ImportanceResult",
    "IndependentBatches",
    "SIAccumulator",
    "collect",
    "collect_importance",
    "importance_correlations",
]

# name → method; the SI family is not here: it is accumulated by `EWCTrainer` on the training trajectory
# (`SIAccumulator`).
METHODS: dict[str, type[ImportanceMethod]] = {
    m.name: m for m in (Fisher, SqrtFisher, AbsoluteFisher, MAS, MASX, Signal, Uniform)
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
            `"fisher"`, `"sqrt_fisher"`, `"af"`, `"mas"`, `"masx"`, `"signal"` or `"uniform"` (see the module
            docstring). The SI family (`"si"`, `"siu"`, `"sib"`, `"sos"`, `"onaf"`) needs the training trajectory: use
            `EWCConfig(importance_method="si")`.
        estimator (`str`, *optional*, defaults to `"empirical"`):
            Fisher estimator of `fisher` and `sqrt_fisher`: `"empirical"`, `"sampled"`, `"exact"` or `"batched"` (see
            [`hf_ewc.importance.fisher`]). Ignored by the other methods.
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
        `dict[str, torch.Tensor]`: float32 importances keyed by parameter name, on the parameters' devices; for
        FSDP2-sharded parameters, DTensors laid out like them (this process's slices). (What the trainer records
        besides, sample count and resolved settings, comes from [`collect`].)

    Under `accelerate launch` with N processes, every process must call this with the same data: samples are split
    round-robin, summed with `accelerate.utils.reduce` and divided by the global count, so the result equals a
    1-process run on the same samples for the per-sample estimators (`empirical`, `sampled` — sample i's labels are
    drawn with (seed, i) —, `exact`, MAS, signal). `batched` depends on which samples share a minibatch, so it differs
    by sampling noise. On an FSDP2-sharded model (DTensor parameters, `fully_shard`) the same holds: per-sample terms
    are formed on each process before a reduce-scatter leaves it its slices (see `hf_ewc.importance._loop`); every
    process must call this, and the per-sample engine is the hooks one.
    """
    seed = method_options.pop("seed", 0)
    show_progress = method_options.pop("show_progress", True)
    spec = CollectionSpec(
        method, estimator, max_samples, batch_size, data_collator, seed, show_progress, method_options
    )
    return collect(model, data, spec).importances


@dataclass
class CollectionSpec:
    """What a collection is asked for besides the model and the data: the arguments of [`collect_importance`],
    validated once (unknown method, option or estimator: `HfEwcError` naming the choices)."""

    method: str = "fisher"
    estimator: str = "empirical"
    max_samples: int | None = None
    batch_size: int = 8
    data_collator: Callable | None = None
    seed: int | None = 0
    show_progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options (``output=`` for MAS, …)

    def __post_init__(self):
        if self.method in SI_FAMILY:
            raise HfEwcError(
                f"method {self.method!r} is accumulated during training, not collected afterwards: train with "
                f"EWCTrainer(args=EWCConfig(importance_method={self.method!r})) and call trainer.consolidate()."
            )
        if self.method not in METHODS:
            raise HfEwcError(
                f"Unknown importance method {self.method!r}; choose one of: {', '.join((*METHODS, *SI_FAMILY))}."
            )
        accepted = [o for o in METHODS[self.method].options if o != "estimator"]  # the estimator has its own field
        unknown = sorted(set(self.options) - set(accepted))
        if unknown:
            raise HfEwcError(
                f"Unknown option(s) {unknown} for method {self.method!r}; it accepts: {', '.join(accepted) or 'none'}."
            )
        if "estimator" in METHODS[self.method].options and self.estimator not in ESTIMATORS:
            raise HfEwcError(f"Unknown fisher estimator {self.estimator!r}; choose one of: {', '.join(ESTIMATORS)}.")


def collect(model: nn.Module, data: Any, spec: CollectionSpec) -> ImportanceResult:
    """Run the collection ``spec`` asks for: table lookup → the shared loop; the result says how it was obtained."""
    cls = METHODS[spec.method]
    params = trainable_parameters(model, sharded=True)
    if not params:
        raise HfEwcError("The model has no trainable parameters (requires_grad=True): nothing to measure.")
    replicated = replicated_parameter(params)
    if replicated is not None:  # its whole sums would be reduce-scattered into a layout it does not have
        raise HfEwcError(
            f"{replicated!r} is held whole (or replicated, HSDP) by several processes next to FSDP2-sharded "
            "parameters; collection on a sharded model needs every trainable parameter sharded (fully_shard with a "
            "1-D mesh) or frozen."
        )
    recorded = {**spec.options, "batch_size": spec.batch_size, "max_samples": spec.max_samples, "seed": spec.seed}
    estimator = spec.estimator if "estimator" in cls.options else None
    options = {**spec.options, **({"estimator": estimator} if estimator else {})}
    if not cls.needs_data:
        importances = cls(model, params, seed=spec.seed, **options).finalize({}, 0)
        return ImportanceResult(importances, 0, spec.method, None, recorded)
    importances, count, resolved = run_collection(
        cls, model, data, params, options=options, batch_size=spec.batch_size, data_collator=spec.data_collator,
        max_samples=spec.max_samples, seed=spec.seed, show_progress=spec.show_progress,
        label=f"importance: {spec.method}" + (f"/{estimator}" if estimator else ""),
    )  # fmt: skip
    return ImportanceResult(importances, count, spec.method, estimator, {**recorded, **resolved})
