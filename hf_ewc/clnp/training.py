"""`CLNPCallback`: what trains a domain on the free units of a `CLNP` allocation, in any `transformers.Trainer`."""

import torch
from torch import Tensor
from transformers import TrainerCallback

from .units import expand


class CLNPCallback(TrainerCallback):
    """Trains only the free units of a `CLNP` allocation (``clnp``; built by ``CLNP.callback()``): a snapshot on
    ``on_train_begin``, gradients of frozen entries zeroed as they are formed (L1 on weights added before each
    optimizer step), frozen entries restored after it, L1 on activations through gradient hooks."""

    def __init__(self, clnp, gradient_accumulation_steps: int = 1):
        self.clnp = clnp
        self.accumulation = gradient_accumulation_steps
        self._bound: list[tuple[Tensor, Tensor, Tensor]] = []  # (parameter, trainable mask, snapshot)
        self._hooks = []

    def on_train_begin(self, args, state, control, **kwargs):
        clnp = self.clnp
        clnp.check_capacity()
        self.accumulation = args.gradient_accumulation_steps
        params = dict(clnp.model.named_parameters())
        self._bound, self._l1_weights = [], []
        for name, mask in clnp.trainable_masks().items():
            p = params[name]
            if not p.requires_grad or bool(mask.all()):  # nothing frozen in it: no hook, no snapshot, no restore
                continue
            mask = mask.to(p.device)
            self._bound.append((p, mask, p.detach().clone()))
            # frozen entries get no gradient at all: not in the clipping norm, not in Adam's moments
            factor = mask.to(p.dtype)
            self._hooks.append(p.register_hook(lambda grad, f=factor: grad * f))
        for group, owners in zip(clnp.groups, clnp.owners):
            free = owners < 0
            for entry in group.slices:
                p = params.get(entry.name)
                if entry.role == "producer" and p is not None and p.ndim == 2 and p.requires_grad:
                    region = group.along(entry, free, p.shape[entry.dim], False)
                    self._l1_weights.append((p, expand(region, p.shape, entry.dim).to(p.device)))
            if clnp.l1 > 0 and clnp.l1_target == "activations":
                self._hooks.append(group.tap.register_forward_pre_hook(self._l1_hook(group.features(free.float()))))

    def _l1_hook(self, free: Tensor):
        l1 = self.clnp.l1

        def pre_hook(module, args):
            a = args[0]
            if not (module.training and a.requires_grad):
                return
            scale = l1 / (a.numel() / a.shape[-1]) / self.accumulation  # mean over samples (and positions)

            def add_l1(grad):
                return grad + scale * torch.sign(a.detach()) * free.to(grad.device, grad.dtype)

            a.register_hook(add_l1)

        return pre_hook

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """L1 on the free units' incoming weights, once per optimizer step (``l1_target="weights"``)."""
        if self.clnp.l1 > 0 and self.clnp.l1_target == "weights":
            for p, mask in self._l1_weights:
                if p.grad is not None:
                    p.grad.addcmul_(torch.sign(p.detach()), mask.to(p.dtype), value=self.clnp.l1)

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, **kwargs):
        """Frozen entries back to their values at the start of training (weight decay cannot move them either)."""
        for p, mask, snapshot in self._bound:
            p.copy_(torch.where(mask, p, snapshot))

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._hooks:
            h.remove()
        self._hooks = []
