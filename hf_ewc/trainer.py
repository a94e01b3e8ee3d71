"""EWCTrainer: a `transformers.Trainer` that keeps what earlier domains taught the model.

The penalty enters in `compute_loss`; everything that must happen around the optimizer step (the proximal pull, WVA's
attenuation, SI's path integral and its independent gradient) runs in a callback on `on_pre_optimizer_step` /
`on_optimizer_step`, the only events at which the Trainer still holds the step's gradients.
"""

import functools
import inspect
import math
import os
from typing import Any

from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .config import EWCConfig
from .distributed import all_reduce_, check_world_size, is_sharded, local_tensor, trainable_parameters
from .importance import SI_FAMILY, IndependentBatches, SIAccumulator
from .monitor import PenaltyMonitor
from .penalty import Penalty
from .sparsity import KeepSparsityCallback
from .state import EWCState
from .trainer_support import (
    as_ewc_config,
    build_wva,
    checkpoint_state,
    clnp_for,
    clnp_result,
    collect_for,
    host_config_class,
    independent_batches,
    independent_gradient,
    new_si,
    refuse_sharded_training,
    refuse_unsupported,
    si_result,
    sync_log_level,
    trained_with,
)
from .utils import HfEwcError, logger
from .wva import Attenuation


class _EWCCallback(TrainerCallback):
    """Hooks `EWCTrainer` into the optimizer step (see the module docstring)."""

    def __init__(self, trainer: "EWCTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._setup_ewc()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        si = self.trainer._si
        if si is not None:
            si.before_step()  # θ before the step, for SI's Δθ
            if si.needs_independent_gradient:  # u_k at θ before the step, on a freshly drawn minibatch
                trainer = self.trainer
                batches = trainer._independent.batches(state.global_step)
                model = trainer._plain_model()
                si.set_independent_gradient(
                    independent_gradient(trainer, model, si.params, batches, trainer._loss_scaled_for_ga)
                )
        if self.trainer._wva is not None:
            self.trainer._wva.before_step()  # θ before the step (deltas) or g ← a ⊙ g (gradients, after clipping)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._monitor.domain_finished(self.trainer._penalty)


class EWCMixin:
    r"""(Stabilized) Elastic Weight Consolidation for any `transformers.Trainer` subclass: the penalty, the proximal
    step, WVA, the SI family and CLNP's units, `consolidate`, and the EWC state in every checkpoint.

    [`EWCTrainer`] is ``EWCMixin`` over `Trainer`; [`with_ewc`] puts it over another trainer
    (``with_ewc(SFTTrainer)``). The mixin comes first among the bases, the host's ``args`` must be an [`EWCConfig`]
    (``ewc_config_class``) and the host's ``__init__`` is followed by ``self._init_ewc(ewc_state)``; it works on what
    every `Trainer` has: the
    penalty's gradient is added to ``.grad`` after the backward of an optimizer step's last micro-batch (not through
    the host's loss), and the rest runs in a callback around the optimizer step.
    """

    def _init_ewc(self, ewc_state: EWCState | str | os.PathLike | None) -> None:
        """What `EWCTrainer.__init__` does after `Trainer.__init__` (``ewc_state`` as there)."""
        sync_log_level(self.args)
        check_world_size(self.accelerator.state)
        # before training starts, not at its first step
        fsdp2 = self.is_fsdp_enabled and getattr(self.accelerator, "is_fsdp2", False)
        refuse_unsupported(self.args, fsdp=self.is_fsdp_enabled, deepspeed=self.is_deepspeed_enabled, fsdp2=fsdp2)
        source = str(ewc_state) if isinstance(ewc_state, (str, os.PathLike)) else None
        if source is not None:
            ewc_state = EWCState.load(source, self.model)  # (FSDP2-sharded: this process's slices only)
        self.ewc_state: EWCState | None = ewc_state
        if ewc_state is not None:  # before training, not when consolidating after it
            ewc_state.check_normalization(self.args.importance_normalization)
        if ewc_state is not None and self.model is not None:
            uncovered = ewc_state.validate(self._plain_model(), strict=False)
            if uncovered and not ewc_state.is_empty:
                logger.info(f"{len(uncovered)} trainable parameter(s) are not in the EWC state and train unprotected.")
        self._penalty: Penalty | None = None
        self._si: SIAccumulator | None = None
        self._wva: Attenuation | None = None
        self._independent: IndependentBatches | None = None
        self._penalty_in_loss = self.is_deepspeed_enabled  # DeepSpeed keeps gradients in its own buffers
        self._penalty_joined = False  # set where the penalty meets this optimizer step's gradients
        self._clip_coef = 1.0
        self._told_no_state = False
        self._warned_overshoot = False
        self._monitor = PenaltyMonitor(self.args.ewc_mode)
        self.add_callback(_EWCCallback(self))
        self.clnp, self._clnp_callback = clnp_for(self, ewc_state, source)
        if fsdp2 or (self.model is not None and is_sharded(trainable_parameters(self._plain_model(), sharded=True))):
            refuse_sharded_training(self)  # FSDP2 known now (sharded at load time, or accelerate's plugin)

    # ------------------------------------------------------------------ setup
    def _plain_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _sparsity_callbacks(self) -> list[KeepSparsityCallback]:
        return [c for c in self.callback_handler.callbacks if isinstance(c, KeepSparsityCallback)]

    def _setup_ewc(self) -> None:
        """Build the device-side penalty and start SI (called on `on_train_begin`, after any resume)."""
        for callback in self._sparsity_callbacks():
            callback.managed = True  # applied in _after_optimizer_step, not again by its own hook
        args: EWCConfig = self.args
        self._penalty = self._wva = None
        model = self._plain_model()
        params = trainable_parameters(model, sharded=True)
        sharded = is_sharded(params)
        if sharded:
            refuse_sharded_training(self)
        if args.importance_method in SI_FAMILY and self._si is None:
            self._si = new_si(model, args)
        if self._si is not None and self._si.needs_independent_gradient:
            self._independent = independent_batches(self)
        if self._si is not None:
            self._si.subtract_penalty(None, None)  # set again below if this run has a penalty to subtract
        state = self.ewc_state
        if args.ewc_mode in ("off", "clnp"):  # CLNP protects by its units (its callback), not by a penalty
            return
        if state is None or state.is_empty:
            if not self._told_no_state:
                logger.info(
                    "EWC penalty is 0: no domain has been consolidated yet. Call trainer.consolidate() after training "
                    "on a domain and pass the returned state to the next trainer."
                )
                self._told_no_state = True
            return
        state.validate(model, strict=False)
        if args.ewc_mode == "wva":
            self._wva = build_wva(params, state, args, self._si)
            return
        if sharded:  # this process keeps its slices only: 2·P/N numbers
            state.shard_like(model)
        anchors = {n: local_tensor(t) for n, t in state.anchors.items()}
        importances = {n: local_tensor(t) for n, t in state.importances.items()}
        penalty = Penalty.build(
            params, anchors, importances, mode=args.ewc_mode, ewc_lambda=args.ewc_lambda, lr=args.ewc_step_size,
            all_reduce=all_reduce_ if sharded else None,
        )  # fmt: skip
        if penalty is None:
            logger.warning("None of the parameters protected by the EWC state is trainable now: penalty is 0.")
            return
        if args.ewc_mode == "vanilla" and penalty.overshoot > 1 and not self._warned_overshoot:
            logger.warning(
                f"Vanilla EWC with η·λ·Ω_max = {penalty.overshoot:.3g} > 1: an SGD step on the penalty overshoots the "
                "anchor (and diverges above 2). Use ewc_mode='stabilized' (same λ) to keep every step bounded."
            )
            self._warned_overshoot = True
        self._penalty = penalty
        si = self._si
        if si is not None and penalty.penalized and (args.si_gradient == "task" or si.needs_independent_gradient):
            regularized = args.si_gradient == "regularized"
            si.subtract_penalty(dict(zip(penalty.names, penalty.anchors)), penalty.two_c(), regularized=regularized)

    # ------------------------------------------------------------------ the loss
    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Mirror of `Trainer.training_step`: is the loss used as is (True) or divided by the accumulation steps?"""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ):
        """Task loss (as `Trainer` computes it); the penalty joins it only where its gradient cannot be added to
        ``.grad`` directly (DeepSpeed keeps gradients in its own buffers). There it is divided by the accumulation
        steps exactly when `training_step` will not divide the loss itself, and added after the Trainer's own
        multiplication by the world size, so that its gradient is ``2c·(θ − θ*)`` per optimizer step."""
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not (self._penalty_in_loss and self._penalty is not None and self._penalty.penalized and model.training):
            return result  # outputs only when asked: some hosts (TRL's) pay an extra forward for them
        loss, outputs = result if return_outputs else (result, None)
        penalty = self._penalty.loss()
        if self._loss_scaled_for_ga(num_items_in_batch):
            penalty = penalty / getattr(self, "current_gradient_accumulation_steps", 1)
        loss = loss + penalty.to(loss.device)
        self._penalty_joined = True
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict[str, Tensor | Any], num_items_in_batch=None) -> Tensor:
        """`Trainer.training_step`; after the backward of an optimizer step's last micro-batch (gradients complete and
        reduced across processes, not yet clipped) the penalty's gradient ``2c·(θ − θ*)`` is added to ``.grad`` once,
        times the fp16 loss scale while gradients carry it. So it does not depend on gradient accumulation,
        `num_items_in_batch` or the number of processes, and costs no autograd graph."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        penalty = self._penalty
        if penalty is not None and penalty.penalized and not self._penalty_in_loss and self.accelerator.sync_gradients:
            scaler = getattr(self.accelerator, "scaler", None)
            penalty.add_gradient_(scale=float(scaler.get_scale()) if scaler is not None else 1.0)
            self._penalty_joined = True
        return loss

    # ------------------------------------------------------------------ around the optimizer step
    def _clip_grad_norm(self, model):
        norm = super()._clip_grad_norm(model)
        if self._si is not None and norm is not None:
            value = float(norm)
            self._clip_coef = min(1.0, self.args.max_grad_norm / (value + 1e-6)) if math.isfinite(value) else 1.0
        return norm

    def _after_optimizer_step(self) -> None:
        penalty = self._penalty
        if penalty is not None and penalty.penalized and not self._penalty_joined:
            raise HfEwcError(
                f"{type(self).__name__} stepped its optimizer without Trainer.training_step (or, under DeepSpeed, "
                "compute_loss): its loss path cannot carry the EWC penalty; with_ewc needs a trainer whose updates "
                "go through them (every TRL trainer's do)."
            )
        self._penalty_joined = False
        skipped = bool(getattr(self.accelerator, "optimizer_step_was_skipped", False))
        if not skipped:
            if penalty is not None and not penalty.penalized:
                penalty.proximal_step_()
            if self._wva is not None:
                self._wva.after_step()
            # Pruned weights go back to zero before SI reads the update (the callback's own hook comes later).
            for callback in self._sparsity_callbacks():
                callback.apply(self.model)
            if self._si is not None:
                self._si.after_step(grad_scale=1.0 / self._clip_coef)
        self._clip_coef = 1.0

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log` plus the ``ewc/*`` metrics of the active penalty, measured at the logging step: the logged
        ``loss`` is the task loss (the Trainer's mean over the logging window) plus that penalty."""
        if self._penalty is not None and "loss" in logs:
            logs.update(self._monitor.metrics(self._penalty, logs["loss"], in_loss=self._penalty_in_loss))
        if self._wva is not None and "loss" in logs:
            logs.update(self._wva.metrics())
        super().log(logs, start_time)

    # ------------------------------------------------------------------ consolidation
    def consolidate(self, dataset=None, *, domain: str | None = None) -> EWCState:
        """Measure importances on the domain just learned, fold them into the EWC state and move the anchors.

        Args:
            dataset (`Dataset`, `datasets.Dataset` or `DataLoader`, *optional*):
                Data of the domain just trained on. Defaults to the trainer's `train_dataset`; at most
                `importance_max_samples` samples are used (a random subset seeded with `args.seed`). Ignored by SI,
                which uses the training trajectory.
            domain (`str`, *optional*):
                Name recorded in the state's metadata.

        Returns:
            [`EWCState`]: the trainer's state updated in place (a new one if it had none), also stored on
            ``trainer.ewc_state``; a state shared between trainers is updated for all of them, so copy it first
            (``copy.deepcopy``) to branch a sequence. Under several processes every process must call this (the
            collection is reduced across them).
        """
        args: EWCConfig = self.args
        model = self._plain_model()
        if self.clnp is not None:  # units per domain (uniform importances keep the state continuable by EWC)
            result = clnp_result(self, self.clnp, dataset if dataset is not None else self.train_dataset, domain)
        elif args.importance_method in SI_FAMILY:
            result = si_result(args, self._si)
        else:
            data = dataset if dataset is not None else self.train_dataset
            result = collect_for(args, model, data, self.data_collator)
        state = self.ewc_state if self.ewc_state is not None else EWCState(dtype=args.ewc_state_dtype)
        state.consolidate(
            model,
            result.importances,
            mode=args.consolidation,
            decay=args.ewc_decay,
            domain=domain,
            method=result.method,
            estimator=result.estimator,
            num_samples=result.num_samples,
            options={**result.options, **trained_with(args)},
            normalization=args.importance_normalization,
        )
        self.ewc_state = state
        state.units = self.clnp
        self._penalty = self._wva = None
        self._si = None
        return state

    # ------------------------------------------------------------------ checkpoints
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus the EWC state (and SI's running sums while a domain is in progress)."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state, si, write = self.ewc_state, self._si, self.args.should_save  # (sharded: all join the gathers)
        if state is not None and not state.is_empty and (write or state.is_sharded):
            state.save(output_dir, write=write)
        if si is not None and si.steps > 0 and (write or si.sharded):
            si.save(output_dir, write=write)
        if self.args.should_save and self.clnp is not None and self.clnp.domains:
            self.clnp.save(output_dir)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; when resuming, the EWC state (and SI's running sums) come back from the checkpoint."""
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool) and checkpoint:
            checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise HfEwcError(f"No checkpoint to resume from in {self.args.output_dir!r}.")
        if isinstance(checkpoint, (str, os.PathLike)):
            self._load_ewc_checkpoint(str(checkpoint))
        return super().train(
            resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )

    def _load_ewc_checkpoint(self, checkpoint: str) -> None:
        self.ewc_state, self._si, clnp = checkpoint_state(checkpoint, self._plain_model(), self.args, self.ewc_state)
        if clnp is not None:
            self.clnp = self._clnp_callback.clnp = clnp


class EWCTrainer(EWCMixin, Trainer):
    r"""`transformers.Trainer` with (stabilized) Elastic Weight Consolidation.

    Train on a domain, call [`EWCTrainer.consolidate`] to measure importances and move the anchors, then train the same
    model on the next domain with the returned [`EWCState`]: the loss gains ``Σ c·(θ − θ*)²`` (see [`EWCConfig`]).

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, model_init, compute_loss_func,
        compute_metrics, callbacks, optimizers, optimizer_cls_and_kwargs, preprocess_logits_for_metrics:
            As for `transformers.Trainer`; a plain `TrainingArguments` becomes an [`EWCConfig`] (default EWC settings).
        ewc_state ([`EWCState`] or `str`, *optional*):
            What earlier domains left behind (or a directory holding ``ewc_state.safetensors``). Without it, or before
            the first consolidation, the penalty is 0.

    Guarantees:
        - the penalty's gradient per optimizer step does not depend on `gradient_accumulation_steps`,
          `num_items_in_batch` or the number of processes (it is never multiplied by the world size);
        - `ewc_mode="proximal"` adds no loss term and pulls every weight towards its anchor after each real optimizer
          step, untouched by clipping and Adam;
        - `ewc_mode="wva"` adds no loss term and attenuates each real optimizer step (or its gradient) by ``a(λΩ)``;
        - the SI family (`si`, `siu`, `sib`, `sos`, `onaf`) accumulates on real optimizer steps only;
        - `save_model` (and so every ``checkpoint-*``) writes the EWC state next to the weights, and
          `train(resume_from_checkpoint=...)` restores it (with SI's running sums).

    Logged with the loss: ``ewc/penalty``, ``ewc/task_loss``, ``ewc/penalty_ratio`` (penalty / task loss) and
    ``ewc/coef_max`` (``max η·2c``: < 1 for stabilized, > 1 means vanilla EWC overshoots the anchor under SGD).

    Example:

    ```python
    >>> trainer = EWCTrainer(model=model, args=EWCConfig("out", ewc_lambda=50), train_dataset=wiki)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> state = trainer.consolidate(domain="wiki")  # doctest: +SKIP
    >>> trainer = EWCTrainer(model=model, args=..., train_dataset=code, ewc_state=state)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        ewc_state: EWCState | str | os.PathLike | None = None,
    ):
        super().__init__(
            model=model,
            args=as_ewc_config(args),
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self._init_ewc(ewc_state)


@functools.cache
def with_ewc(trainer_class: type) -> type:
    """``trainer_class`` (a `transformers.Trainer` subclass, e.g. ``trl.SFTTrainer``) with everything [`EWCTrainer`]
    does: the class ``EWC<Name>(EWCMixin, trainer_class)``, whose ``__init__`` takes the host's arguments plus
    ``ewc_state``. Its ``args`` become an instance of ``ewc_config_class(<the host's config class>)`` (pass one to set
    the EWC fields: ``ewc_config_class(SFTConfig)(output_dir=..., ewc_lambda=...)``); the host's config class is read
    from the annotation of its ``args`` parameter.

        EWCSFTTrainer = with_ewc(SFTTrainer)
        trainer = EWCSFTTrainer(model=model, args=ewc_config_class(SFTConfig)("out", ewc_lambda=0.1),
                                train_dataset=data, processing_class=tokenizer, ewc_state=state)
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise HfEwcError(
            f"with_ewc takes a transformers.Trainer subclass (such as trl.SFTTrainer), not {trainer_class!r}."
        )
    if issubclass(trainer_class, EWCMixin):
        return trainer_class
    signature = inspect.signature(trainer_class.__init__)
    if "args" not in signature.parameters:
        raise HfEwcError(f"{trainer_class.__name__}.__init__ takes no `args`: with_ewc cannot give it an EWCConfig.")
    base = host_config_class(trainer_class)

    def __init__(self, *args, ewc_state: EWCState | str | os.PathLike | None = None, **kwargs):
        bound = signature.bind_partial(self, *args, **kwargs)
        bound.arguments["args"] = as_ewc_config(bound.arguments.get("args"), base)
        super(cls, self).__init__(*bound.args[1:], **bound.kwargs)
        self._init_ewc(ewc_state)

    doc = f"`{trainer_class.__name__}` with EWC (`hf_ewc.with_ewc`): its arguments plus ``ewc_state``."
    cls = type(f"EWC{trainer_class.__name__}", (EWCMixin, trainer_class), {"__init__": __init__, "__doc__": doc})
    return cls
