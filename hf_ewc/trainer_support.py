"""What `EWCTrainer` builds from its `EWCConfig`: the importance collection of `consolidate()`, SI's accumulator and
its independent minibatches, WVA's attenuation, and the refusals of what it cannot do. Functions of the arguments (and
of a `transformers.Trainer`'s public API), so that the trainer itself keeps only the hooks into the training loop.
"""

import os
import typing
from collections.abc import Callable
from typing import Any

import datasets
import torch
from accelerate.utils import reduce
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from transformers import Trainer, TrainingArguments
from transformers.training_args import trainer_log_levels

from .clnp import CLNP, CLNP_STATE_NAME
from .config import EWCConfig, ewc_config_class
from .distributed import replicated_parameter, sharded_setup, sharding_refusal, trainable_parameters
from .importance import (
    SI_FAMILY,
    SI_STATE_NAME,
    SOS_BETA,
    CollectionSpec,
    ImportanceResult,
    IndependentBatches,
    SIAccumulator,
    collect,
)
from .state import STATE_WEIGHTS_NAME, EWCState
from .utils import HfEwcError, logger
from .wva import Attenuation


def subsample(dataset, n: int | None, seed: int):
    """At most ``n`` samples of ``dataset``, a random subset seeded with ``seed`` in dataset order (a DataLoader, or
    a dataset of unknown length, as is: the collector caps those)."""
    if isinstance(dataset, DataLoader) or n is None or not hasattr(dataset, "__len__") or len(dataset) <= n:
        return dataset
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()
    return dataset.select(indices) if hasattr(dataset, "select") else Subset(dataset, indices)


def sync_log_level(args: TrainingArguments) -> None:
    """`log_level` (main process) / `log_level_replica` (others) set the hf_ewc logger too, unless "passive"."""
    level = trainer_log_levels[args.log_level if args.should_log else args.log_level_replica]
    if level != -1:
        logger.setLevel(level)


def refuse_unsupported(args: EWCConfig, *, fsdp: bool, deepspeed: bool, fsdp2: bool = False) -> None:
    """Name what is not supported instead of silently doing nothing (see the README's support matrix). ``fsdp``: the
    trainer runs FSDP; ``fsdp2``: it is FSDP2 (the accelerator's own answer, over the launch environment's)."""
    sharded = None if fsdp2 else "FSDP" if fsdp else sharded_setup(args)
    if sharded is not None and sharded != "FSDP2":  # FSDP2: shard by shard (refuse_sharded_training names the rest)
        raise sharding_refusal(sharded)
    if deepspeed and (args.ewc_mode in ("proximal", "wva") or args.importance_method in SI_FAMILY):
        # DeepSpeed steps fp32 master weights and keeps gradients in its own buffers: a proximal pull or an attenuated
        # step on the module's parameters would be overwritten, and SI would read no gradient.
        raise HfEwcError(
            "ewc_mode='proximal' or 'wva' and the SI family (si, siu, sib, sos, onaf) are not supported under "
            "DeepSpeed yet; use ewc_mode='stabilized' or 'vanilla' with importances collected after training "
            "(fisher, mas, …)."
        )


def refuse_sharded_training(trainer) -> None:
    """On FSDP2-sharded parameters only the penalty (stabilized, vanilla) and the proximal step work shard by shard so
    far: name anything else the trainer was asked to do before its first step."""
    args: EWCConfig = trainer.args
    asked = [
        f"ewc_mode={args.ewc_mode!r}" if args.ewc_mode in ("wva", "clnp") else None,
        f"importance_method={args.importance_method!r} (an independent minibatch gradient at every step)"
        if args.importance_method in ("siu", "sib") or (args.importance_method == "sos" and args.sos_alpha > 0)
        else None,
        "the penalty as a loss term (DeepSpeed)" if trainer._penalty_in_loss else None,
    ]  # fmt: skip
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = trainable_parameters(model, sharded=True)
    si = getattr(trainer, "_si", None)
    if si is not None and (
        len(si.params) != len(params) or any(p is not q for p, q in zip(si.params, params.values()))
    ):
        raise HfEwcError(
            "SI's running sums are bound to other parameters than the sharded ones training now (restored from a "
            "checkpoint before FSDP2 sharded the model, or parameters frozen since); resuming SI under FSDP2 is not "
            "supported yet: restart the domain, or use DDP."
        )
    replicated = replicated_parameter(params)
    if replicated is not None:
        raise HfEwcError(
            f"{replicated!r} is held whole (or replicated, HSDP) by several processes next to FSDP2-sharded "
            "parameters: the penalty's global values would count it once per process. Shard every trainable "
            "parameter on one mesh dimension (DistributedConfig(fsdp_size=N), no dp_replicate_size), or use DDP."
        )
    asked = [a for a in asked if a is not None]
    if asked:
        raise HfEwcError(
            f"{asked[0]} is not supported on FSDP2-sharded parameters yet: there, EWC runs the stabilized or vanilla "
            "penalty and the proximal step shard by shard, with the collected importances (fisher, sqrt_fisher, af, "
            "mas, masx, signal, uniform) or si, onaf and sos (sos_alpha=0); use one of those, or DDP."
        )


def collect_for(args: EWCConfig, model: nn.Module, data, data_collator) -> ImportanceResult:
    """Importances for `consolidate`: ``args``' method and settings, at most `importance_max_samples` samples."""
    if data is None and args.importance_method != "uniform":
        raise HfEwcError(
            "No data to measure importances on: pass trainer.consolidate(dataset=...) or give the trainer a "
            "train_dataset."
        )
    spec = CollectionSpec(
        args.importance_method,
        estimator=args.fisher_estimator,
        max_samples=args.importance_max_samples if isinstance(data, DataLoader) else None,
        batch_size=args.importance_batch_size,
        data_collator=data_collator,
        seed=args.seed,
        show_progress=not args.disable_tqdm,
        options=method_options(args),
    )
    return collect(model, subsample(data, args.importance_max_samples, args.seed) if data is not None else None, spec)


def method_options(args: EWCConfig) -> dict[str, Any]:
    """The collector options `EWCConfig` sets for its importance method."""
    if args.importance_method in ("mas", "masx"):
        return {"output": args.mas_output}
    if args.importance_method == "signal":
        return {"bias": args.signal_bias}
    return {}


def as_ewc_config(args: TrainingArguments | None, base: type[TrainingArguments] = TrainingArguments) -> EWCConfig:
    """``args`` as an instance of ``ewc_config_class(base)`` (an `EWCConfig` for plain `TrainingArguments`; for
    another trainer's config, both): kept when it is one, else its fields are carried over and the EWC fields take
    their defaults."""
    config_class = ewc_config_class(base)
    if args is None:
        return config_class(output_dir="trainer_output")
    if isinstance(args, config_class):
        return args
    known = {name for name, f in config_class.__dataclass_fields__.items() if f.init}
    fields = {k: v for k, v in args.to_dict().items() if k in known}
    # to_dict() masks every field named *_token (hub_token, and TRL's eos_token / pad_token): take them as they are
    fields.update({k: getattr(args, k) for k in fields if k.endswith("_token")})
    return config_class(**fields)


def host_config_class(trainer_class: type[Trainer]) -> type[TrainingArguments]:
    """The arguments class a `Trainer` subclass takes: the most derived `TrainingArguments` subclass named by the
    annotation of its ``args`` parameter (`TrainingArguments` when there is none)."""
    try:
        hint = typing.get_type_hints(trainer_class.__init__).get("args")
    except Exception:  # noqa: BLE001 - an annotation that cannot be resolved names no config class
        hint = None
    candidates = [t for t in (typing.get_args(hint) or (hint,)) if isinstance(t, type)]
    candidates = [t for t in candidates if issubclass(t, TrainingArguments)]
    return max(candidates, key=lambda t: len(t.__mro__), default=TrainingArguments)


def new_si(model: nn.Module, args: EWCConfig) -> SIAccumulator:
    return SIAccumulator(
        trainable_parameters(model, sharded=True),
        damping=args.si_damping,
        method=args.importance_method,
        sos_alpha=args.sos_alpha,
    )


def si_from_checkpoint(checkpoint: str, model: nn.Module, args: EWCConfig) -> SIAccumulator | None:
    """SI's running sums saved in a Trainer checkpoint (None when not training with SI or none were saved)."""
    if args.importance_method not in SI_FAMILY or not os.path.isfile(os.path.join(checkpoint, SI_STATE_NAME)):
        return None
    si = new_si(model, args)
    si.load(checkpoint)
    return si


def independent_batches(trainer: Trainer) -> IndependentBatches:
    """The independent minibatches of `siu`, `sib` and `sos` (α > 0), drawn from the trainer's train dataset."""
    dataset, collator = trainer.train_dataset, trainer.data_collator
    if isinstance(dataset, datasets.Dataset):  # what the Trainer's own loader does with the columns the model lacks
        dataset = trainer._remove_unused_columns(dataset, description="independent minibatches")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="independent minibatches")
    args, accelerator = trainer.args, trainer.accelerator
    return IndependentBatches(
        dataset, collator, batch_size=args.per_device_train_batch_size,
        accumulation=args.gradient_accumulation_steps, seed=args.seed, process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
    )  # fmt: skip


def independent_gradient(
    trainer: Trainer, model: nn.Module, params: list[Tensor], batches: list[dict], loss_scaled_for_ga: Callable
) -> list[Tensor]:
    """``u_k``: the task-loss gradient at the current θ on step k's independent minibatches, dropout off, normalised
    as the Trainer normalises a step's loss (over the global item count, or the mean per micro-batch divided by the
    accumulation steps) and averaged across processes, as DDP averages the step's gradient. `torch.autograd.grad`
    leaves ``.grad`` (the step's own gradient) untouched and fires no DDP hook. Under fp16 the loss is multiplied by
    the scaler's current scale before the backward (and the gradient divided by it after), as for the step itself, so
    small gradients do not underflow. Dropout is off (Benzing): with dropout the step's gradient ``g_k`` also differs
    from ``u_k`` by the dropout noise, which `sib` and `sos` (α = 1) then count too."""
    batches, num_items = trainer.get_batch_samples(iter(batches), len(batches), trainer.args.device)
    scaler = getattr(trainer.accelerator, "scaler", None)
    scale = float(scaler.get_scale()) if scaler is not None else 1.0
    was_training = model.training
    model.eval()
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    try:
        for inputs in batches:
            inputs = trainer._prepare_inputs(inputs)
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items)
            if not loss_scaled_for_ga(num_items):
                loss = loss / len(batches)
            grads = torch.autograd.grad(loss * scale, params, allow_unused=True)
            torch._foreach_add_(
                total, [g.float() if g is not None else torch.zeros_like(t) for g, t in zip(grads, total)]
            )
    finally:
        model.train(was_training)
    if scale != 1.0:
        torch._foreach_div_(total, scale)
    return reduce(total, "mean") if trainer.accelerator.num_processes > 1 else total


def build_wva(
    params: dict[str, nn.Parameter], state: EWCState, args: EWCConfig, si: SIAccumulator | None
) -> Attenuation | None:
    """WVA for a training run (None when the state protects no trainable parameter), with the warning it needs; under
    gradient attenuation SI is told to undo it when it reads ``.grad`` (its path integral uses the task gradient)."""
    wva = Attenuation.build(
        params, state.importances, ewc_lambda=args.ewc_lambda, attenuation=args.wva_attenuation, apply=args.wva_apply
    )
    if wva is None:
        logger.warning("None of the parameters protected by the EWC state is trainable now: WVA attenuates nothing.")
        return None
    if args.wva_apply == "gradients":
        if args.weight_decay > 0:
            logger.warning(
                "wva_apply='gradients' does not attenuate AdamW's decoupled weight decay: protected weights still "
                "decay. Use wva_apply='deltas' (the decay is part of the attenuated step) or weight_decay=0."
            )
        if si is not None:
            si.keep_step_gradient()  # SI reads the gradient of the loss, not the attenuated one
    return wva


def si_result(args: EWCConfig, si: SIAccumulator | None) -> ImportanceResult:
    """The SI family's importances of the trajectory so far, with what the state records about them."""
    if si is None or si.steps == 0:
        raise HfEwcError(
            f"{args.importance_method} importances come from training steps: call trainer.train() before "
            "consolidate()."
        )
    options = {"damping": args.si_damping, "gradient": args.si_gradient, "count_unit": "optimizer_steps"}
    if args.importance_method == "sos":
        options.update(sos_alpha=args.sos_alpha, sos_beta=SOS_BETA)
    return ImportanceResult(si.importances(), si.steps, args.importance_method, None, options)


def trained_with(args: EWCConfig) -> dict[str, Any]:
    """How the domain being consolidated was protected while it trained (recorded with its importances)."""
    out: dict[str, Any] = {"trained_with_mode": args.ewc_mode}
    if args.ewc_mode == "wva":
        out.update(wva_attenuation=args.wva_attenuation, wva_apply=args.wva_apply)
    return out


def clnp_for(trainer: Trainer, state: EWCState | None, source: str | None) -> tuple[CLNP | None, Any]:
    """``(allocation, its callback)`` of a CLNP run (``(None, None)`` otherwise), the callback added to ``trainer``.
    The allocation continues the one the state carries (``state.units``, set by the previous trainer's
    `consolidate`), or the one saved in the directory the state came from, or starts anew."""
    args = trainer.args
    if args.ewc_mode != "clnp":
        return None, None
    model = trainer.accelerator.unwrap_model(trainer.model)
    if state is not None and isinstance(getattr(state, "units", None), CLNP):
        clnp = state.units
    elif source is not None and os.path.isfile(os.path.join(source, CLNP_STATE_NAME)):
        clnp = CLNP.load(model, source)
    elif state is not None and not state.is_empty:
        raise HfEwcError(
            "ewc_mode='clnp' continues a state without a unit allocation (no clnp_state.safetensors beside it): its "
            "domains own no units. Start the CLNP sequence from its first domain."
        )
    else:
        head = None if args.clnp_head == "auto" else args.clnp_head
        clnp = CLNP(model, l1=args.clnp_l1, l1_target=args.clnp_l1_target, margin=args.clnp_margin, head=head,
                    seed=args.seed)  # fmt: skip
    if args.clnp_head not in ("auto", clnp.head):
        raise HfEwcError(f"clnp_head={args.clnp_head!r}, but the allocation this trainer continues has {clnp.head!r} "
                         "heads: a sequence keeps one kind; leave clnp_head at 'auto'.")  # fmt: skip
    # this domain's own settings (a YAML may change them per domain); the units, head kind and domains carry on
    clnp.configure(l1=args.clnp_l1, l1_target=args.clnp_l1_target, margin=args.clnp_margin, seed=args.seed)
    callback = clnp.callback()
    trainer.add_callback(callback)
    return clnp, callback


def clnp_result(trainer: Trainer, clnp: CLNP, data, domain: str | None) -> ImportanceResult:
    """CLNP's consolidation of the domain just trained, as the importances the EWC state records: uniform (Ω = 1, so
    the state stays continuable by EWC), with the allocation's per-layer diagnostics in the options."""
    units = clnp.consolidate(clnp_batches(trainer, data), domain=domain or f"domain{len(clnp.domains)}")
    model = trainer.accelerator.unwrap_model(trainer.model)
    ones = {n: torch.ones_like(p, dtype=torch.float32) for n, p in trainable_parameters(model).items()}
    return ImportanceResult(ones, 0, "uniform", None, {"clnp": units})


def clnp_batches(trainer: Trainer, data) -> list[dict]:
    """The consolidation batches of CLNP: at most `importance_max_samples` samples of ``data`` (seeded), collated in
    batches of `importance_batch_size`, on the model's device."""
    args = trainer.args
    data = subsample(data, args.importance_max_samples, args.seed)
    collator = trainer.data_collator
    if isinstance(data, datasets.Dataset):
        data = trainer._remove_unused_columns(data, description="CLNP consolidation")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="CLNP consolidation")
    size = args.importance_batch_size
    if data is None:
        raise HfEwcError("CLNP consolidation needs the domain's data: pass trainer.consolidate(dataset=...).")
    samples = [data[i] for i in range(len(data))]
    return [trainer._prepare_inputs(collator(samples[i : i + size])) for i in range(0, len(samples), size)]


def checkpoint_state(checkpoint: str, model: nn.Module, args: EWCConfig, state: EWCState | None):
    """``(EWC state, SI accumulator, CLNP allocation or None)`` to resume from ``checkpoint``."""
    if os.path.isfile(os.path.join(checkpoint, STATE_WEIGHTS_NAME)):
        loaded = EWCState.load(checkpoint, model)
        loaded.validate(model, strict=False)  # a state that does not fit is refused, not kept
        state = loaded
    elif state is not None and not state.is_empty:
        logger.warning(f"{checkpoint} holds no EWC state; keeping the state given to the trainer.")
    clnp = None
    if args.ewc_mode == "clnp" and os.path.isfile(os.path.join(checkpoint, CLNP_STATE_NAME)):
        clnp = CLNP.load(model, checkpoint)
        if state is not None:
            state.units = clnp
    return state, si_from_checkpoint(checkpoint, model, args), clnp
