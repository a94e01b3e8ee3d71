r"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017) and Benzing's (2022) relatives: importance from the training
trajectory itself.

Over the optimizer steps k of a domain (real steps only: never per gradient-accumulation micro-batch, never a step the
fp16 scaler skipped), with ``g_k`` the gradient the step was taken with and ``u_k`` the gradient at the same point on
an **independent** minibatch (drawn afresh, dropout off; see [`IndependentBatches`]):

| method | per-step accumulator                           | Ω at the end of the domain                       |
|--------|------------------------------------------------|--------------------------------------------------|
| `si`   | ``ω −= g_k ⊙ Δθ_k``                            | ``max(0, ω / (Δ² + ξ))``, ``Δ = θ_end − θ_start`` |
| `siu`  | ``ω −= u_k ⊙ Δθ_k`` (SI without its bias)      | same                                             |
| `sib`  | ``ω −= (g_k − u_k) ⊙ Δθ_k`` (the bias alone)   | same                                             |
| `sos`  | ``s ← β·s + (1 − β)·(α·u_k − g_k)²``, β = 0.999 | ``√(s / (1 − β^K))`` (no division by Δ²)         |
| `onaf` | ``s += |g_k|``                                 | ``s / K``                                        |

so ``ω_SI = ω_SIU + ω_SIB`` step by step. `sos` with α = 0 is the square root of Adam's second moment (Benzing's
`SOS`), with α = 1 a pure gradient-noise estimate that keeps working at large batch sizes; its EMA is bias-corrected
(``1 − β^K``) so that short domains are not scaled down (a global factor; Benzing's code has none). `siu`, `sib` and
`sos` with α > 0 cost one more forward and backward per optimizer step (on an effective batch as large as the step's).

``g_k`` is the gradient of the loss at the point the step was taken from, before clipping (the clipping factor is
undone) and either of the task loss alone (``gradient="task"``: the penalty gradient ``2c·(θ − θ*)`` is subtracted,
as Zenke's reference code and Benzing use) or of the regularized loss the optimizer saw (``gradient="regularized"``,
Kutalev's `ewc-features`). ``Δθ_k`` is the whole move of the step, proximal pull included. Negative ratios are clipped
to 0 (Benzing) so that the quadratic penalty stays convex and the stabilized coefficient finite.

The gradient is read from ``p.grad`` right after ``optimizer.step()`` (the Trainer zeroes it only later), which
assumes the optimizer does not rewrite gradients in place — true of the torch optimizers the Trainer builds.

On FSDP2-sharded parameters every buffer is this process's slice and every update is element-wise on the slices of
θ and of the reduce-scattered gradient: no communication, 1/N of the memory; the running sums of a checkpoint are
gathered one tensor at a time into the same file. `siu`, `sib` and `sos` (α > 0) need a second backward per step and
are not offered there.
"""

import os
from collections.abc import Mapping

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..distributed import as_shard_of, is_sharded, local_tensor, raise_together, shard_like, whole_tensor
from ..state_io import save_tensors
from ..utils import HfEwcError


SI_STATE_NAME = "ewc_si_running.safetensors"
SI_FAMILY = ("si", "siu", "sib", "sos", "onaf")
SOS_BETA = 0.999


class SIAccumulator:
    """Running path integral (or gradient statistic) of the SI family over a model's trainable parameters (float32
    buffers: ω, θ_start, θ_before-step, and the independent gradient where the method needs one)."""

    def __init__(
        self, params: dict[str, nn.Parameter], damping: float = 0.1, *, method: str = "si", sos_alpha: float = 0.0
    ):
        if not damping > 0:
            raise HfEwcError(f"SI damping ξ must be > 0, got {damping}.")
        if method not in SI_FAMILY:
            raise HfEwcError(f"Unknown SI-family method {method!r}; choose one of: {', '.join(SI_FAMILY)}.")
        if not 0 <= sos_alpha <= 1:
            raise HfEwcError(f"sos_alpha must be in [0, 1], got {sos_alpha}.")
        self.method = method
        self.sos_alpha = float(sos_alpha)
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        self.damping = float(damping)
        self.sharded = is_sharded(params)
        if self.sharded and self.needs_independent_gradient:
            raise HfEwcError(
                f"{method} needs an independent minibatch gradient at every step, which is not formed on "
                "FSDP2-sharded parameters; use si, onaf or sos with sos_alpha=0 there, or DDP."
            )
        self.start = [p.float().clone() for p in self._values()]
        self.omega = [torch.zeros_like(s) for s in self.start]
        self._before = [torch.zeros_like(s) for s in self.start]
        self._penalty: tuple[list[Tensor], list[Tensor]] | None = None
        self._kept: list[Tensor] | None = None
        self._independent: list[Tensor] | None = None
        self.steps = 0

    def _values(self) -> list[Tensor]:
        """θ as this process holds it (its slices of sharded parameters), detached."""
        return [local_tensor(p.detach()) for p in self.params]

    def _gradients(self) -> list[Tensor | None]:
        return [None if p.grad is None else local_tensor(p.grad.detach()) for p in self.params]

    @property
    def needs_independent_gradient(self) -> bool:
        """Whether each step needs ``u_k`` ([`SIAccumulator.set_independent_gradient`] before `after_step`)."""
        return self.method in ("siu", "sib") or (self.method == "sos" and self.sos_alpha > 0)

    def set_independent_gradient(self, grads: list[Tensor]) -> None:
        """``u_k`` for the step about to be recorded, aligned with the parameters (float32)."""
        self._independent = [g.float() for g in grads]

    def keep_step_gradient(self) -> None:
        """Copy ``p.grad`` in `before_step` and read that copy after the step: for when something rewrites the
        gradient between the two (WVA's gradient attenuation), so that SI still sees the gradient of the loss."""
        self._kept = [torch.zeros_like(s) for s in self.start]

    @torch.no_grad()
    def before_step(self) -> None:
        """Snapshot θ (and, after `keep_step_gradient`, the gradient) right before ``optimizer.step()``."""
        torch._foreach_copy_(self._before, self._values())
        if self._kept is not None:
            grads = [g if g is not None else torch.zeros_like(k) for g, k in zip(self._gradients(), self._kept)]
            torch._foreach_copy_(self._kept, grads)

    def subtract_penalty(
        self, anchors: Mapping[str, Tensor] | None, two_c: Mapping[str, Tensor] | None, *, regularized: bool = False
    ) -> None:
        """From now on read the task-only gradient of a penalized loss: ``2c·(θ_before − θ*)`` is subtracted for the
        parameters in ``anchors`` (nothing for the others). ``regularized=True``: keep the step's gradient as the
        optimizer saw it and add the same penalty gradient to the independent one instead, so that both are gradients
        of the same regularized loss. ``None``: no penalty."""
        if anchors is None:
            self._penalty = None
            return
        zeros = [torch.zeros_like(s) for s in self.start]
        self._penalty = (
            [anchors[n].float() if n in anchors else z for n, z in zip(self.names, zeros)],
            [two_c[n].float() if n in two_c else z for n, z in zip(self.names, zeros)],
            regularized,
        )

    @torch.no_grad()
    def after_step(self, *, grad_scale: float = 1.0) -> None:
        """Add ``−g·Δθ`` for the step just taken; ``grad_scale`` multiplies ``p.grad`` to undo gradient clipping
        (``1 / clip coefficient``)."""
        grads = (
            self._kept
            if self._kept is not None
            else [g.float() if g is not None else torch.zeros_like(b) for g, b in zip(self._gradients(), self._before)]
        )
        if grad_scale != 1.0:
            grads = torch._foreach_mul(grads, grad_scale)
        independent = self._independent
        if self._penalty is not None:
            anchors, two_c, regularized = self._penalty
            penalty = torch._foreach_sub(self._before, anchors)
            torch._foreach_mul_(penalty, two_c)
            if regularized:  # g carries the penalty's gradient: u must carry the same, or sib/sos would count it
                independent = torch._foreach_add(independent, penalty) if independent is not None else None
            else:
                grads = torch._foreach_sub(grads, penalty)
        self._independent = None
        if self.needs_independent_gradient and independent is None:
            raise HfEwcError(f"{self.method} needs the independent gradient of this step before after_step().")
        self.steps += 1
        if self.method == "onaf":
            torch._foreach_add_(self.omega, torch._foreach_abs(grads))
            return
        if self.method == "sos":
            noise = (
                torch._foreach_sub(torch._foreach_mul(independent, self.sos_alpha), grads)
                if self.sos_alpha > 0
                else grads
            )
            torch._foreach_mul_(self.omega, SOS_BETA)
            torch._foreach_addcmul_(self.omega, noise, noise, value=1 - SOS_BETA)
            return
        if self.method == "siu":
            grads = independent
        elif self.method == "sib":
            grads = torch._foreach_sub(grads, independent)
        torch._foreach_sub_(self._before, [p.float() for p in self._values()])  # θ_before − θ_after = −Δθ
        torch._foreach_addcmul_(self.omega, grads, self._before)

    @torch.no_grad()
    def importances(self) -> dict[str, Tensor]:
        """Ω of the trajectory so far (the module docstring's last column)."""
        out = {}
        steps = max(self.steps, 1)
        for name, p, value, start, omega in zip(self.names, self.params, self._values(), self.start, self.omega):
            if self.method == "onaf":
                out[name] = omega / steps
            elif self.method == "sos":
                out[name] = (omega / (1 - SOS_BETA**steps)).clamp(min=0).sqrt_()
            else:
                delta = value.float() - start
                out[name] = (omega / (delta.square() + self.damping)).clamp_(min=0)
            out[name] = as_shard_of(out[name], p)  # (a sharded parameter's: a DTensor laid out like it)
        return out

    # ------------------------------------------------------------------ checkpointing
    def save(self, directory: str | os.PathLike, *, write: bool = True) -> None:
        """The running sums into ``directory``; sharded parameters' slices are gathered one tensor at a time (every
        process calls this; the one with ``write`` writes)."""
        tensors = {f"omega.{n}": as_shard_of(t, p) for n, t, p in zip(self.names, self.omega, self.params)}
        tensors.update({f"start.{n}": as_shard_of(t, p) for n, t, p in zip(self.names, self.start, self.params)})
        metadata = {"steps": str(self.steps), "damping": repr(self.damping), "method": self.method}
        metadata["sos_alpha"] = repr(self.sos_alpha)
        path = os.path.join(directory, SI_STATE_NAME)
        if not self.sharded:
            save_tensors(path, tensors, metadata, write=write)
        else:  # every process returns once the file is in place, or raises with the writer
            raise_together(lambda: save_tensors(path, tensors, metadata, whole=whole_tensor, write=write))

    def load(self, directory: str | os.PathLike) -> bool:
        """Restore ω, θ_start and the step count from a checkpoint; ``False`` when it holds no SI state."""
        path = os.path.join(directory, SI_STATE_NAME)
        if not os.path.isfile(path):
            return False
        with safe_open(path, framework="pt", device="cpu") as f:
            saved = (f.metadata() or {}).get("method", "si")
            if saved != self.method:
                raise HfEwcError(
                    f"{path} holds running {saved} sums, but this run collects {self.method}; resume with "
                    f"importance_method={saved!r} or start the domain again."
                )
            alpha = float((f.metadata() or {}).get("sos_alpha", "0.0"))
            if self.method == "sos" and alpha != self.sos_alpha:
                raise HfEwcError(
                    f"{path} holds running sos sums with sos_alpha={alpha:g}, but this run uses sos_alpha="
                    f"{self.sos_alpha:g}; resume with sos_alpha={alpha:g} or start the domain again."
                )
            keys = set(f.keys())
            missing = [n for n in self.names if f"omega.{n}" not in keys or f"start.{n}" not in keys]
            if missing:
                raise HfEwcError(f"{path} has no SI state for parameter {missing[0]!r}; it belongs to another model.")
            for i, name in enumerate(self.names):
                omega, start = f.get_tensor(f"omega.{name}"), f.get_tensor(f"start.{name}")
                shape = tuple(self.params[i].shape)
                if tuple(omega.shape) != shape or tuple(start.shape) != shape:
                    raise HfEwcError(
                        f"{path} holds SI sums of shape {tuple(omega.shape)} for {name!r}, whose shape is {shape}; it "
                        "belongs to another model."
                    )
                self.omega[i].copy_(shard_like(omega, self.params[i]))  # (a sharded parameter's: this slice)
                self.start[i].copy_(shard_like(start, self.params[i]))
            self.steps = int((f.metadata() or {}).get("steps", 0))
        return True


class IndependentBatches:
    """The minibatches of ``u_k``: for optimizer step k, ``processes × accumulation × batch_size`` samples drawn with
    replacement from ``dataset`` by a generator seeded with ``(seed, k)`` — the same indices on every process, each
    process taking its own slice, split into ``accumulation`` micro-batches of ``batch_size``. The draw depends only on
    the seed, the step and the effective batch, so 1 process with 4 micro-batches of 2 and 2 processes with 1 of 4
    measure ``u_k`` on the same samples. Nothing iterates over the data a second time."""

    def __init__(
        self, dataset, collator, *, batch_size: int, accumulation: int, seed: int, process_index: int = 0,
        num_processes: int = 1,
    ):  # fmt: skip
        if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
            raise HfEwcError(
                "The SI-family methods siu, sib and sos (sos_alpha > 0) draw an independent minibatch at each step "
                "from the train dataset, which must be a non-empty map-style dataset (with a length)."
            )
        self.dataset, self.collator = dataset, collator
        self.batch_size, self.accumulation, self.seed = batch_size, accumulation, seed
        self.process_index, self.num_processes = process_index, num_processes

    def indices(self, step: int) -> list[list[int]]:
        """This process's micro-batches (dataset indices) for optimizer step ``step``."""
        per_process = self.batch_size * self.accumulation
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % 2**63)
        drawn = torch.randint(len(self.dataset), (per_process * self.num_processes,), generator=generator).tolist()
        mine = drawn[self.process_index * per_process : (self.process_index + 1) * per_process]
        return [mine[i : i + self.batch_size] for i in range(0, per_process, self.batch_size)]

    def batches(self, step: int) -> list[dict]:
        """The collated micro-batches of [`IndependentBatches.indices`]. Collated under a forked torch RNG seeded by
        ``(seed, step)``: a random collator (MLM masking) is reproducible and leaves the training's own RNG where it
        was, so an `siu` run follows the same trajectory as an `si` run."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + step + 1) % 2**63)
            return [self.collator([self.dataset[i] for i in chunk]) for chunk in self.indices(step)]
