"""KeepSparsityCallback: pruned weights stay exactly zero while a model trains on.

It needs only boolean masks (or a model whose zeros are the masks), so the trainer can use it without knowing the
pruner that made them.
"""

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from .distributed import local_tensor, reshard, shard_like
from .models import default_targets
from .utils import HfEwcError


class KeepSparsityCallback(TrainerCallback):
    """Keep pruned weights at exactly zero while training on: after every optimizer step, ``θ ← θ ⊙ mask``.

    Works with `transformers.Trainer` and [`EWCTrainer`] (which applies the masks right after its proximal step and
    before SI reads the update, so pruned weights neither regrow nor count in SI's path integral).

    Args:
        masks (`dict[str, torch.Tensor]`):
            Boolean keep-masks by parameter name (``PruneReport.masks``), or build them with
            [`KeepSparsityCallback.from_zeros`] from a reloaded pruned model.
    """

    def __init__(self, masks: Mapping[str, Tensor]):
        if not masks:
            raise HfEwcError("KeepSparsityCallback needs at least one mask (a pruned model has them in report.masks).")
        self.masks = {n: m.bool() for n, m in masks.items()}
        self._bound: list[tuple[Tensor, Tensor]] | None = None  # (parameter, pruned = ~mask on its device)
        self._model_id: int | None = None
        self.managed = False  # set by EWCTrainer for a training run: it applies the masks at the right point itself

    @classmethod
    def from_zeros(cls, model: nn.Module, names: Iterable[str] | None = None) -> "KeepSparsityCallback":
        """Masks = ``θ != 0`` for those of ``names`` that hold zeros (default: the tensors the ``sparsity_config`` of
        the model's config lists, as written by [`export_pruned`], else the default targets)."""
        params = dict(model.named_parameters())
        if names is None:
            sparsity = getattr(getattr(model, "config", None), "sparsity_config", None)
            listed = sparsity.get("per_layer_sparsity") if isinstance(sparsity, dict) else None
            names = list(listed) if listed else list(default_targets(model))
            if not names:
                raise HfEwcError(
                    f"KeepSparsityCallback.from_zeros: {type(model).__name__} has no sparsity_config and no default "
                    "targets (Linear weights inside transformer blocks); pass names=[...] of the pruned parameters."
                )
        names = list(names)
        unknown = [n for n in names if n not in params]
        if unknown:
            raise HfEwcError(f"KeepSparsityCallback: {unknown[0]!r} is not a parameter of {type(model).__name__}.")
        # A tensor without zeros has nothing to keep: no mask, no work at every optimizer step.
        return cls({n: params[n].detach() != 0 for n in names if bool((params[n] == 0).any())})

    @classmethod
    def from_sparsity_config(cls, model: nn.Module) -> "KeepSparsityCallback | None":
        """The callback for a model whose config carries a ``sparsity_config`` (from [`export_pruned`], `hf-ewc prune`
        or a `prune:` block) and still holds zeros in the tensors it lists; None when there is nothing to keep
        (no such config, or structures removed from the shapes)."""
        sparsity = getattr(getattr(model, "config", None), "sparsity_config", None)
        if not isinstance(sparsity, dict) or sparsity.get("removal") == "physical":
            return None
        params = dict(model.named_parameters())
        if not any(bool((params[n] == 0).any()) for n in sparsity.get("per_layer_sparsity", {}) if n in params):
            return None
        return cls.from_zeros(model)  # reads the same sparsity_config

    @classmethod
    def from_report(cls, model: nn.Module, report) -> "KeepSparsityCallback | None":
        """The callback for a model pruned by ``report`` (a [`PruneReport`]; None when nothing is held at zero:
        physical removal)."""
        if report.masks:
            return cls(report.masks)
        zeroed = [n for n, v in report.layers.items() if v["zeros"]]
        return cls.from_zeros(model, zeroed) if zeroed else None

    def _bind(self, model: nn.Module) -> list[tuple[Tensor, Tensor]]:
        if self._bound is None or self._model_id != id(model):
            reshard(model)  # (FSDP2: slices, not whole parameters an evaluation's forward may have left)
            params = dict(model.named_parameters())
            plain = getattr(model, "module", None)  # DDP / accelerate wrappers
            if plain is not None and not set(self.masks) <= set(params):
                params = dict(plain.named_parameters())
            missing = [n for n in self.masks if n not in params]
            if missing:
                raise HfEwcError(f"KeepSparsityCallback: the model has no parameter {missing[0]!r} to keep sparse.")
            bound = []
            for name, mask in self.masks.items():
                p = params[name]
                if tuple(mask.shape) != tuple(p.shape):
                    raise HfEwcError(
                        f"KeepSparsityCallback: mask of {name!r} has shape {tuple(mask.shape)}, the parameter "
                        f"{tuple(p.shape)}."
                    )
                # (an FSDP2-sharded parameter: this process's slice of the mask, applied to its slice)
                bound.append((p, shard_like(~mask.to(local_tensor(p).device), p)))
            self._bound, self._model_id = bound, id(model)
        return self._bound

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned weights of ``model`` now."""
        for p, pruned in self._bind(model):
            local_tensor(p).masked_fill_(pruned, 0)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.apply(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None and not self.managed:
            self.apply(model)

    def on_train_end(self, args, state, control, **kwargs):
        self.managed = False
