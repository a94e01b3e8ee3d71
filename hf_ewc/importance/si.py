r"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017): importance from the training trajectory itself.

Over the optimizer steps k of a domain (real steps only: never per gradient-accumulation micro-batch, never a step the
fp16 scaler skipped):

    ω = −Σ_k g_k ⊙ Δθ_k,        Ω = max(0, ω / (Δ² + ξ)),   Δ = θ_end − θ_start

``g_k`` is the gradient of the loss at the point the step was taken from, before clipping (the clipping factor is
undone) and either of the task loss alone (``gradient="task"``: the penalty gradient ``2c·(θ − θ*)`` is subtracted,
as Zenke's reference code and Benzing use) or of the regularized loss the optimizer saw (``gradient="regularized"``,
Kutalev's `ewc-features`). ``Δθ_k`` is the whole move of the step, proximal pull included. Negative ratios are clipped
to 0 (Benzing) so that the quadratic penalty stays convex and the stabilized coefficient finite.

The gradient is read from ``p.grad`` right after ``optimizer.step()`` (the Trainer zeroes it only later), which
assumes the optimizer does not rewrite gradients in place — true of the torch optimizers the Trainer builds.
"""

import os
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..utils import HfEwcError, atomic_path


SI_STATE_NAME = "ewc_si_running.safetensors"


class SIAccumulator:
    """Running SI path integral over a model's trainable parameters (float32 buffers: ω, θ_start, θ_before-step)."""

    def __init__(self, params: dict[str, nn.Parameter], damping: float = 0.1):
        if not damping > 0:
            raise HfEwcError(f"SI damping ξ must be > 0, got {damping}.")
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        self.damping = float(damping)
        self.start = [p.detach().float().clone() for p in self.params]
        self.omega = [torch.zeros_like(s) for s in self.start]
        self._before = [torch.zeros_like(s) for s in self.start]
        self._penalty: tuple[list[Tensor], list[Tensor]] | None = None
        self.steps = 0

    @torch.no_grad()
    def before_step(self) -> None:
        """Snapshot θ right before ``optimizer.step()``."""
        torch._foreach_copy_(self._before, [p.detach() for p in self.params])

    def subtract_penalty(self, anchors: Mapping[str, Tensor] | None, two_c: Mapping[str, Tensor] | None) -> None:
        """From now on read the task-only gradient of a penalized loss: ``2c·(θ_before − θ*)`` is subtracted for the
        parameters in ``anchors`` (nothing for the others). ``None``: use the gradient as the optimizer saw it."""
        if anchors is None:
            self._penalty = None
            return
        zeros = [torch.zeros_like(p) for p in self.params]
        self._penalty = (
            [anchors[n].float() if n in anchors else z for n, z in zip(self.names, zeros)],
            [two_c[n].float() if n in two_c else z for n, z in zip(self.names, zeros)],
        )

    @torch.no_grad()
    def after_step(self, *, grad_scale: float = 1.0) -> None:
        """Add ``−g·Δθ`` for the step just taken; ``grad_scale`` multiplies ``p.grad`` to undo gradient clipping
        (``1 / clip coefficient``)."""
        grads = [
            p.grad.detach().float() if p.grad is not None else torch.zeros_like(b)
            for p, b in zip(self.params, self._before)
        ]
        if grad_scale != 1.0:
            grads = torch._foreach_mul(grads, grad_scale)
        if self._penalty is not None:
            anchors, two_c = self._penalty
            penalty = torch._foreach_sub(self._before, anchors)
            torch._foreach_mul_(penalty, two_c)
            grads = torch._foreach_sub(grads, penalty)
        torch._foreach_sub_(self._before, [p.detach().float() for p in self.params])  # θ_before − θ_after = −Δθ
        torch._foreach_addcmul_(self.omega, grads, self._before)
        self.steps += 1

    @torch.no_grad()
    def importances(self) -> dict[str, Tensor]:
        """``Ω = max(0, ω / ((θ − θ_start)² + ξ))`` for the trajectory so far."""
        out = {}
        for name, p, start, omega in zip(self.names, self.params, self.start, self.omega):
            delta = p.detach().float() - start
            out[name] = (omega / (delta.square() + self.damping)).clamp_(min=0)
        return out

    # ------------------------------------------------------------------ checkpointing
    def save(self, directory: str | os.PathLike) -> None:
        tensors = {f"omega.{n}": t for n, t in zip(self.names, self.omega)}
        tensors.update({f"start.{n}": t for n, t in zip(self.names, self.start)})
        with atomic_path(os.path.join(directory, SI_STATE_NAME)) as tmp:
            save_file(tensors, tmp, metadata={"steps": str(self.steps), "damping": repr(self.damping)})

    def load(self, directory: str | os.PathLike) -> bool:
        """Restore ω, θ_start and the step count from a checkpoint; ``False`` when it holds no SI state."""
        path = os.path.join(directory, SI_STATE_NAME)
        if not os.path.isfile(path):
            return False
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            missing = [n for n in self.names if f"omega.{n}" not in keys or f"start.{n}" not in keys]
            if missing:
                raise HfEwcError(f"{path} has no SI state for parameter {missing[0]!r}; it belongs to another model.")
            for i, name in enumerate(self.names):
                omega, start = f.get_tensor(f"omega.{name}"), f.get_tensor(f"start.{name}")
                if omega.shape != self.omega[i].shape or start.shape != self.start[i].shape:
                    raise HfEwcError(
                        f"{path} holds SI sums of shape {tuple(omega.shape)} for {name!r}, whose shape is "
                        f"{tuple(self.omega[i].shape)}; it belongs to another model."
                    )
                self.omega[i].copy_(omega)
                self.start[i].copy_(start)
            self.steps = int((f.metadata() or {}).get("steps", 0))
        return True
