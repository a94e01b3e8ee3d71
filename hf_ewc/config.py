"""EWCConfig: `transformers.TrainingArguments` plus the knobs of stabilized EWC and importance collection."""

import functools
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from transformers import TrainingArguments

from .state_io import CONSOLIDATIONS, NORMALIZATIONS, STATE_DTYPES
from .wva import WVA_APPLY, WVA_ATTENUATIONS


EWC_MODES = ("stabilized", "vanilla", "proximal", "wva", "clnp", "off")
IMPORTANCE_METHODS = (
    "fisher", "sqrt_fisher", "af", "mas", "masx", "si", "siu", "sib", "sos", "onaf", "signal", "uniform",
)  # fmt: skip
SIGNAL_BIAS_RULES = ("abs", "output", "activation")
FISHER_ESTIMATORS = ("empirical", "sampled", "exact", "batched")


@dataclass
class EWCConfig(TrainingArguments):
    r"""Training arguments for [`EWCTrainer`]: every `TrainingArguments` field plus the EWC fields below.

    The penalty on parameter θ with anchor θ* and importance Ω is ``c·(θ − θ*)²`` with

    - `ewc_mode="stabilized"` (default): ``c = ½·λ·Ω / (1 + η·λ·Ω)`` — never overshoots the anchor, at any λ;
    - `ewc_mode="vanilla"`: ``c = ½·λ·Ω`` (Kirkpatrick et al.);
    - `ewc_mode="proximal"`: no loss term; after every optimizer step ``θ ← θ* + (θ − θ*)/(1 + η·λ·Ω)``;
    - `ewc_mode="wva"`: no loss term and no anchor; every optimizer step of a parameter is attenuated by
      ``a = 1/(1 + λ·Ω)`` (or ``exp(−λ·Ω)``, `wva_attenuation`), on the step itself or on the gradient (`wva_apply`);
      see [`hf_ewc.wva`];
    - `ewc_mode="clnp"`: no penalty; each domain gets its own units (neurons, FFN neurons, attention heads) and later
      domains train only the free ones (see [`hf_ewc.clnp`]; `clnp_*` fields);
    - `ewc_mode="off"`: plain fine-tuning (importances are still collected on `consolidate()`, so the sequence can be
      continued with EWC later).

    λ is `ewc_lambda` and η is `ewc_lr` (defaults to `learning_rate`). With the default
    `importance_normalization="mean"` every domain's Ω has mean 1 over the protected parameters, so λ is the strength
    relative to an L2 pull of the same mass and carries over between models, sequence lengths, Fisher estimators and
    importance methods. With `"none"` it does not: raw scales differ by orders of magnitude (the `batched` Fisher is
    roughly `1/batch_size` of the per-sample ones).

    Args:
        ewc_lambda (`float`, *optional*, defaults to `0.03`):
            Penalty strength λ ≥ 0. The default was chosen by measurement (`benchmarks/default_lambda.py`: a causal
            LM, a masked LM, a classifier and permuted digits, each with the empirical and sampled Fisher, MAS and
            SI): with mean-normalized importances it removes ≥ 40 % of naive fine-tuning's forgetting while keeping
            ≥ 85 % of what the new domains teach in 9 of those 15 cells, and 13 of them have their own best λ within
            10× of it. Measure your own sequence's trade-off with `hf-ewc sweep`.
        ewc_mode (`str`, *optional*, defaults to `"stabilized"`):
            One of `"stabilized"`, `"vanilla"`, `"proximal"`, `"wva"`, `"clnp"`, `"off"`.
        ewc_lr (`float`, *optional*):
            The step size η of the stabilized coefficient and of the proximal step. Defaults to `learning_rate` (the
            peak of the schedule). η is fixed for a whole domain, so the coefficients are computed once: the proximal
            pull per optimizer step does not shrink with a decaying schedule, which makes it relatively stronger as
            the optimizer's own steps get smaller.
        importance_method (`str`, *optional*, defaults to `"fisher"`):
            Collected by `consolidate()`: `"fisher"`, `"sqrt_fisher"` (√ of the domain's Fisher), `"af"` (absolute
            Fisher), `"mas"`, `"masx"` (MAS on the max probability), `"signal"`, `"uniform"` (Ω = 1, i.e. an L2 pull
            towards the anchors). Accumulated during `train()`: `"si"`, `"siu"` (SI with an independent minibatch
            gradient), `"sib"` (SI's bias alone), `"sos"` (running RMS gradient), `"onaf"` (mean absolute gradient);
            see [`hf_ewc.importance.si`].
        fisher_estimator (`str`, *optional*, defaults to `"empirical"`):
            One of `"empirical"`, `"sampled"`, `"exact"`, `"batched"` (see [`collect_importance`]).
        importance_max_samples (`int`, *optional*, defaults to `512`):
            Samples drawn (seeded, without replacement) from the data for `consolidate()`; `None` uses all of it.
        importance_batch_size (`int`, *optional*, defaults to `8`):
            Batch size of importance collection.
        mas_output (`str`, *optional*, defaults to `"probs"`):
            MAS differentiates ``‖f(x)‖²`` of `"probs"` (softmax output, as Kutalev's code) or `"logits"`.
        si_damping (`float`, *optional*, defaults to `0.1`):
            ξ in SI's ``Ω = max(0, ω / (Δ² + ξ))``.
        sos_alpha (`float`, *optional*, defaults to `0.0`):
            α ∈ [0, 1] of `importance_method="sos"`: ``s ← β·s + (1 − β)·(α·u − g)²``; 0 is the RMS of the step's
            gradient, 1 a pure gradient-noise estimate (robust to large batches; needs an independent minibatch per
            step).
        signal_bias (`str`, *optional*, defaults to `"abs"`):
            How `importance_method="signal"` protects a bias: `"abs"` (``|b|``), `"output"` (mean ``|z|`` of the unit
            before its activation) or `"activation"` (Kutalev's rule: mean absolute output after the activation that
            consumes it, softmax for the output layer).
        si_gradient (`str`, *optional*, defaults to `"task"`):
            The gradient in SI's path integral ``ω = −Σ g·Δθ``: `"task"` (the task loss only, Zenke et al.) or
            `"regularized"` (task loss + EWC penalty, as the optimizer saw it).
        importance_normalization (`str`, *optional*, defaults to `"mean"`):
            `"mean"`: each domain's Ω is divided by its mean over all protected parameters (in float64) before it is
            folded into the state, so λ means "strength relative to an L2 penalty of the same mass" and carries over
            between models, sequence lengths, Fisher estimators and importance methods. `"none"`: the raw scale of the
            method, as the papers use it (λ then depends on all of those). A state holds one convention; continuing
            it with the other is refused.
        consolidation (`str`, *optional*, defaults to `"sum"`):
            `"sum"` (``Ω ← Ω + Ω_t``) or `"online"` (``Ω ← γ·Ω + Ω_t``).
        ewc_decay (`float`, *optional*, defaults to `1.0`):
            γ ∈ (0, 1] for `consolidation="online"`.
        ewc_state_dtype (`str`, *optional*, defaults to `"float32"`):
            Storage dtype of the EWC state (importances and anchors): `"float32"` or `"bfloat16"`.
        wva_attenuation (`str`, *optional*, defaults to `"hyperbolic"`):
            `ewc_mode="wva"`: `"hyperbolic"` (``a = 1/(1 + λΩ)``, more robust to λ) or `"exponential"`
            (``a = exp(−λΩ)``).
        clnp_l1 (`float`, *optional*, defaults to `0.03`):
            `ewc_mode="clnp"`: L1 sparsity strength on the free units while a domain trains.
        clnp_l1_target (`str`, *optional*, defaults to `"activations"`):
            `"activations"` (measured better on permuted digits) or `"weights"`.
        clnp_margin (`float`, *optional*, defaults to `0.3`):
            Nats of the domain's loss it may lose when its least active units are freed (graceful forgetting).
        clnp_head (`str`, *optional*, defaults to `"auto"`):
            `"per_domain"` (MLP chains' default: task-incremental), `"shared"` (transformers' only choice) or `"auto"`.
        wva_apply (`str`, *optional*, defaults to `"deltas"`):
            `ewc_mode="wva"`: attenuate the optimizer's step (`"deltas"`, works with any optimizer; AdamW's decoupled
            weight decay is part of the step and is attenuated too) or the gradient before the step (`"gradients"`,
            the same as `"deltas"` for plain SGD, nearly no protection under Adam).
    """

    ewc_lambda: float = field(
        default=0.03,
        metadata={"help": "Penalty strength λ >= 0 (penalty c·(θ−θ*)² with c = ½·λ·Ω, stabilized or not)."},
    )
    ewc_mode: Literal["stabilized", "vanilla", "proximal", "wva", "clnp", "off"] = field(
        default="stabilized",
        metadata={
            "help": "stabilized: c = ½λΩ/(1+ηλΩ) (never overshoots); vanilla: c = ½λΩ; proximal: implicit step "
            "θ ← θ* + (θ−θ*)/(1+ηλΩ) after each optimizer step; wva: attenuate every step by 1/(1+λΩ) (no anchor); "
            "clnp: units per domain, later domains train free units only; off: plain fine-tuning."
        },
    )
    ewc_lr: float | None = field(
        default=None,
        metadata={"help": "η of the stabilized coefficient and of the proximal step (default: learning_rate)."},
    )
    importance_method: Literal[
        "fisher", "sqrt_fisher", "af", "mas", "masx", "si", "siu", "sib", "sos", "onaf", "signal", "uniform"
    ] = field(
        default="fisher",
        metadata={
            "help": "How importances Ω are obtained: fisher, sqrt_fisher, af, mas, masx, signal, uniform (L2) after "
            "training; si, siu, sib, sos, onaf accumulated during training."
        },
    )
    fisher_estimator: Literal["empirical", "sampled", "exact", "batched"] = field(
        default="empirical",
        metadata={
            "help": "empirical (true labels), sampled (labels drawn from the model), exact (expectation over "
            "labels), batched (squared minibatch gradient; different scale)."
        },
    )
    importance_max_samples: int | None = field(
        default=512, metadata={"help": "Samples used by consolidate() (seeded random subset); None: all."}
    )
    importance_batch_size: int = field(default=8, metadata={"help": "Batch size of importance collection."})
    mas_output: Literal["probs", "logits"] = field(
        default="probs", metadata={"help": "MAS differentiates the squared L2 norm of probs or logits."}
    )
    si_damping: float = field(default=0.1, metadata={"help": "SI damping ξ in Ω = max(0, ω/(Δ²+ξ))."})
    sos_alpha: float = field(
        default=0.0, metadata={"help": "α ∈ [0, 1] of importance_method=sos: s ← β·s + (1−β)·(α·u − g)²."}
    )
    signal_bias: Literal["abs", "output", "activation"] = field(
        default="abs",
        metadata={"help": "signal importance of a bias: abs (|b|), output (mean |z|), activation (mean |act(z)|)."},
    )
    si_gradient: Literal["task", "regularized"] = field(
        default="task",
        metadata={"help": "Gradient in SI's path integral: task loss only, or task loss + EWC penalty."},
    )
    importance_normalization: Literal["mean", "none"] = field(
        default="mean",
        metadata={
            "help": "mean: each domain's Ω is divided by its mean over the protected parameters before it joins the "
            "state, so λ is the strength relative to an L2 penalty of the same mass, whatever the model, sequence "
            "length, estimator or method; none: the raw scale (as in the papers)."
        },
    )
    consolidation: Literal["sum", "online"] = field(
        default="sum", metadata={"help": "sum: Ω ← Ω + Ω_t; online: Ω ← γ·Ω + Ω_t (γ = ewc_decay)."}
    )
    ewc_decay: float = field(default=1.0, metadata={"help": "γ ∈ (0, 1] for consolidation=online."})
    ewc_state_dtype: Literal["float32", "bfloat16"] = field(
        default="float32", metadata={"help": "Storage dtype of importances and anchors."}
    )
    wva_attenuation: Literal["hyperbolic", "exponential"] = field(
        default="hyperbolic", metadata={"help": "ewc_mode=wva: a = 1/(1+λΩ) (hyperbolic) or exp(−λΩ) (exponential)."}
    )
    clnp_l1: float = field(default=0.03, metadata={"help": "ewc_mode=clnp: L1 strength on the free units."})
    clnp_l1_target: Literal["activations", "weights"] = field(
        default="activations", metadata={"help": "ewc_mode=clnp: L1 on the free units' activations or weights."}
    )
    clnp_margin: float = field(
        default=0.3, metadata={"help": "ewc_mode=clnp: nats of loss a domain may lose to the units it frees."}
    )
    clnp_head: Literal["auto", "per_domain", "shared"] = field(
        default="auto", metadata={"help": "ewc_mode=clnp: per-domain (task-incremental) or shared output head."}
    )
    wva_apply: Literal["deltas", "gradients"] = field(
        default="deltas",
        metadata={"help": "ewc_mode=wva: attenuate the optimizer's step (deltas; any optimizer) or the gradient."},
    )

    def __post_init__(self):
        self._check_training_values()
        super().__post_init__()
        for name, choices in (
            ("ewc_mode", EWC_MODES),
            ("importance_method", IMPORTANCE_METHODS),
            ("fisher_estimator", FISHER_ESTIMATORS),
            ("mas_output", get_args(self.__dataclass_fields__["mas_output"].type)),
            ("signal_bias", SIGNAL_BIAS_RULES),
            ("si_gradient", get_args(self.__dataclass_fields__["si_gradient"].type)),
            ("consolidation", CONSOLIDATIONS),
            ("importance_normalization", NORMALIZATIONS),
            ("ewc_state_dtype", STATE_DTYPES),
            ("wva_attenuation", WVA_ATTENUATIONS),
            ("wva_apply", WVA_APPLY),
            ("clnp_l1_target", get_args(self.__dataclass_fields__["clnp_l1_target"].type)),
            ("clnp_head", get_args(self.__dataclass_fields__["clnp_head"].type)),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"Unknown {name} {value!r}; choose one of: {', '.join(choices)}.")
        if not (isinstance(self.ewc_lambda, (int, float)) and math.isfinite(self.ewc_lambda) and self.ewc_lambda >= 0):
            raise ValueError(f"ewc_lambda must be a finite number >= 0, got {self.ewc_lambda!r}.")
        if self.ewc_lr is not None and not (math.isfinite(self.ewc_lr) and self.ewc_lr > 0):
            raise ValueError(
                f"ewc_lr must be a finite number > 0 (or unset to use learning_rate), got {self.ewc_lr!r}."
            )
        if self.ewc_mode in ("stabilized", "proximal") and self.ewc_lr is None and not self.learning_rate > 0:
            raise ValueError(
                f"ewc_mode={self.ewc_mode!r} needs a step size η > 0: set learning_rate > 0 or ewc_lr explicitly."
            )
        if self.ewc_mode in ("wva", "clnp") and self.ewc_lr is not None:
            raise ValueError(
                f"ewc_lr is the step size of the stabilized coefficient and of the proximal step; ewc_mode="
                f"{self.ewc_mode!r} has neither: remove ewc_lr or choose another ewc_mode."
            )
        for name in ("clnp_l1", "clnp_margin"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.importance_max_samples is not None and self.importance_max_samples < 1:
            raise ValueError(
                f"importance_max_samples must be >= 1 (or None for all samples), got {self.importance_max_samples}."
            )
        if self.importance_batch_size < 1:
            raise ValueError(f"importance_batch_size must be >= 1, got {self.importance_batch_size}.")
        if not (math.isfinite(self.si_damping) and self.si_damping > 0):
            raise ValueError(f"si_damping (ξ) must be a finite number > 0, got {self.si_damping!r}.")
        if not (isinstance(self.sos_alpha, (int, float)) and 0 <= self.sos_alpha <= 1):
            raise ValueError(f"sos_alpha must be in [0, 1], got {self.sos_alpha!r}.")
        if not (0 < self.ewc_decay <= 1):
            raise ValueError(f"ewc_decay must be in (0, 1], got {self.ewc_decay!r}.")
        if self.consolidation == "sum" and self.ewc_decay != 1.0:
            raise ValueError(
                f"ewc_decay={self.ewc_decay} only applies to consolidation='online'; set consolidation='online' or "
                "ewc_decay=1.0."
            )

    def _check_training_values(self) -> None:
        """Refuse the numeric `TrainingArguments` values the Trainer would misuse silently (a negative epoch count
        trains nothing and exits 0; a zero batch size fails deep inside a DataLoader)."""

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        checks = (
            ("num_train_epochs", number(self.num_train_epochs) and self.num_train_epochs >= 0, "a number >= 0"),
            ("max_steps", integer(self.max_steps) and self.max_steps >= -1, "an integer >= 0 (or -1: use epochs)"),
            ("per_device_train_batch_size", integer(self.per_device_train_batch_size)
             and self.per_device_train_batch_size >= 1, "an integer >= 1"),
            ("per_device_eval_batch_size", integer(self.per_device_eval_batch_size)
             and self.per_device_eval_batch_size >= 1, "an integer >= 1"),
            ("gradient_accumulation_steps", integer(self.gradient_accumulation_steps)
             and self.gradient_accumulation_steps >= 1, "an integer >= 1"),
            ("learning_rate", number(self.learning_rate) and self.learning_rate >= 0, "a finite number >= 0"),
            ("weight_decay", number(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            ("adam_beta1", number(self.adam_beta1) and 0 <= self.adam_beta1 < 1, "in [0, 1)"),
            ("adam_beta2", number(self.adam_beta2) and 0 <= self.adam_beta2 < 1, "in [0, 1)"),
            ("adam_epsilon", number(self.adam_epsilon) and self.adam_epsilon >= 0, "a finite number >= 0"),
            ("max_grad_norm", self.max_grad_norm is None or (number(self.max_grad_norm) and self.max_grad_norm >= 0),
             "a finite number >= 0 (0 or None: no clipping)"),
            ("warmup_steps", number(self.warmup_steps) and self.warmup_steps >= 0,
             "a number >= 0 (below 1: a share of the steps)"),
            ("logging_steps", number(self.logging_steps) and self.logging_steps > 0,
             "a number > 0 (below 1: a share of the steps)"),
            ("save_steps", number(self.save_steps) and self.save_steps > 0,
             "a number > 0 (below 1: a share of the steps)"),
            ("eval_steps", self.eval_steps is None or (number(self.eval_steps) and self.eval_steps > 0),
             "a number > 0 (below 1: a share of the steps), or None"),
            ("label_smoothing_factor", number(self.label_smoothing_factor) and 0 <= self.label_smoothing_factor < 1,
             "in [0, 1)"),
            ("dataloader_num_workers", integer(self.dataloader_num_workers) and self.dataloader_num_workers >= 0,
             "an integer >= 0"),
            ("seed", integer(self.seed) and 0 <= self.seed < 2**32, "an integer in [0, 2**32)"),
            ("save_total_limit", self.save_total_limit is None
             or (integer(self.save_total_limit) and self.save_total_limit >= 0),
             "an integer >= 0 (0: no limit), or None"),
        )  # fmt: skip
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}.")

    @property
    def ewc_step_size(self) -> float:
        """η used by the stabilized coefficient and the proximal step."""
        return float(self.ewc_lr) if self.ewc_lr is not None else float(self.learning_rate)


@functools.cache
def ewc_config_class(base: type[TrainingArguments]) -> type[EWCConfig]:
    """The arguments class with ``base``'s fields and the EWC fields: `EWCConfig` itself for `TrainingArguments`, or a
    dataclass deriving from both for another trainer's config (``ewc_config_class(trl.SFTConfig)`` for
    ``with_ewc(trl.SFTTrainer)``; `__post_init__` runs both classes' checks)."""
    if not (isinstance(base, type) and issubclass(base, TrainingArguments)):
        raise TypeError(f"ewc_config_class takes a TrainingArguments subclass, not {base!r}.")
    if issubclass(base, EWCConfig):
        return base
    if base is TrainingArguments:
        return EWCConfig
    doc = f"`{base.__name__}` plus the EWC fields of [`EWCConfig`] (made by `hf_ewc.ewc_config_class`)."

    def __reduce__(self):  # pickled as "the class for `base`", rebuilt by name in any process (training_args.bin)
        return _rebuild_config, (base, dict(self.__dict__))

    namespace = {"__doc__": doc, "__module__": __name__, "__reduce__": __reduce__}
    return dataclass(type(f"EWC{base.__name__}", (EWCConfig, base), namespace))


def _rebuild_config(base: type[TrainingArguments], fields: dict) -> EWCConfig:
    config = object.__new__(ewc_config_class(base))
    config.__dict__.update(fields)
    return config
