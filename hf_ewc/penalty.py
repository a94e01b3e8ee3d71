"""Penalty maths of (stabilized) Elastic Weight Consolidation as pure tensor functions.

Every function works on aligned lists of tensors (one entry per parameter tensor) and uses the fused
``torch._foreach_*`` kernels, so the per-step cost is a handful of kernel launches whatever the number of parameter
tensors.

Conventions (one λ for every mode, see ``../shared/research/methods.md`` §3.4):

- penalty  ``P(θ) = Σ_i c_i · (θ_i − θ*_i)²``, gradient ``2·c_i·(θ_i − θ*_i)``;
- vanilla    ``c = ½·λ·Ω``                                 (Kirkpatrick et al. 2017, ``(λ/2)·F`` convention);
- stabilized ``c = ½·λ·Ω / (1 + η·λ·Ω)``                   (Kutalev & Lapina 2021); ``η·2c < 1`` for every Ω ≥ 0,
  so one SGD step of size η on the penalty alone moves a weight towards its anchor by a fraction ``η·2c`` of the
  distance and never past it;
- proximal   no loss term; after each optimizer step ``θ ← θ* + (θ − θ*) / (1 + η·λ·Ω)``, the exact implicit (backward
  Euler) step of the vanilla quadratic ``½·λ·Ω·(θ − θ*)²`` with step η.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


__all__ = [
    "Penalty",
    "ewc_penalty",
    "penalty_coefficients",
    "penalty_gradient_",
    "proximal_step_",
    "proximal_weights",
    "stabilized_coefficients",
    "vanilla_coefficients",
]


def _local(t: Tensor) -> Tensor:
    """A DTensor's local slice (``.to_local()``: a view), any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _check_lambda_lr(ewc_lambda: float, lr: float | None) -> None:
    if not ewc_lambda >= 0 or ewc_lambda == float("inf"):
        raise ValueError(f"ewc_lambda must be a finite number >= 0, got {ewc_lambda}.")
    if lr is not None and not (lr > 0 and lr != float("inf")):
        raise ValueError(f"The step size η (ewc_lr) must be a finite number > 0, got {lr}.")


def vanilla_coefficients(importances: Sequence[Tensor], ewc_lambda: float) -> list[Tensor]:
    r"""Vanilla EWC coefficients ``c = ½·λ·Ω``.

    Args:
        importances (`Sequence[torch.Tensor]`):
            Per-parameter importances Ω (≥ 0), one tensor per parameter tensor.
        ewc_lambda (`float`):
            Strength λ ≥ 0.

    Returns:
        `list[torch.Tensor]`: ``c_i = 0.5 * λ * Ω_i`` with the dtype and device of each importance.
    """
    _check_lambda_lr(ewc_lambda, None)
    return list(torch._foreach_mul(list(importances), 0.5 * ewc_lambda))


def stabilized_coefficients(importances: Sequence[Tensor], ewc_lambda: float, lr: float) -> list[Tensor]:
    r"""Stabilized EWC coefficients ``c = ½·λ·Ω / (1 + η·λ·Ω)`` (Kutalev & Lapina 2021).

    The penalty gradient ``2c·(θ − θ*) = λΩ/(1 + ηλΩ)·(θ − θ*)`` satisfies ``η·2c < 1`` for every Ω ≥ 0: an SGD step of
    size η on the penalty contracts ``θ − θ*`` by the factor ``1/(1 + ηλΩ)`` and can never overshoot the anchor,
    whereas vanilla EWC overshoots when ``ηλΩ > 1`` and diverges when ``ηλΩ > 2``.

    Args:
        importances (`Sequence[torch.Tensor]`):
            Per-parameter importances Ω (≥ 0).
        ewc_lambda (`float`):
            Strength λ ≥ 0.
        lr (`float`):
            The step size η > 0 the stabilizer assumes (the optimizer's learning rate by default).

    Returns:
        `list[torch.Tensor]`: the coefficients, same dtype and device as the importances.
    """
    _check_lambda_lr(ewc_lambda, lr)
    # Written as ½ / (η + 1/(λΩ)): no overflow for huge λΩ (→ ½/η), and Ω = 0 gives 1/0 = inf → c = 0.
    coefficients = torch._foreach_mul(list(importances), ewc_lambda)
    torch._foreach_reciprocal_(coefficients)
    torch._foreach_add_(coefficients, lr)
    torch._foreach_reciprocal_(coefficients)
    torch._foreach_mul_(coefficients, 0.5)
    return list(coefficients)


def penalty_coefficients(
    importances: Sequence[Tensor], ewc_lambda: float, *, mode: str = "stabilized", lr: float | None = None
) -> list[Tensor]:
    """Coefficients for ``mode`` ∈ {``"stabilized"``, ``"vanilla"``}; ``lr`` (η) is required for ``"stabilized"``."""
    if mode == "vanilla":
        return vanilla_coefficients(importances, ewc_lambda)
    if mode == "stabilized":
        if lr is None:
            raise ValueError("Stabilized coefficients need the step size η: pass lr=<learning rate>.")
        return stabilized_coefficients(importances, ewc_lambda, lr)
    raise ValueError(f"Unknown penalty mode {mode!r}; choose one of: stabilized, vanilla.")


class _QuadraticPenalty(torch.autograd.Function):
    """``Σ_i ‖√c_i ⊙ (θ_i − θ*_i)‖²`` with a hand-written backward ``2·√c_i ⊙ (√c_i ⊙ (θ_i − θ*_i))``.

    The hand-written backward keeps a step at a handful of fused foreach kernels (autograd through the same ops would
    save several temporaries) and avoids the undefined derivative of a norm at 0, which is exactly where every
    parameter sits right after consolidation. With a ``workspace`` nothing parameter-sized is allocated: the forward
    writes ``√c ⊙ (θ − θ*)`` into it and the backward turns it into the gradient in place. That allows one backward
    per forward (a second one raises) and is meant for ``loss.backward()``, where autograd copies or adds the
    gradient into ``.grad`` because the caller still references the workspace.
    """

    @staticmethod
    def forward(ctx, sqrt_coefficients: list[Tensor], anchors: list[Tensor], workspace, *params: Tensor) -> Tensor:
        if workspace is None:
            scaled_diff = torch._foreach_sub(list(params), anchors)
        else:
            scaled_diff = workspace
            torch._foreach_copy_(scaled_diff, list(params))
            torch._foreach_sub_(scaled_diff, anchors)
        torch._foreach_mul_(scaled_diff, sqrt_coefficients)
        norms = torch._foreach_norm(scaled_diff)
        ctx.scaled_diff = scaled_diff
        ctx.sqrt_coefficients = sqrt_coefficients
        ctx.in_place = workspace is not None
        ctx.consumed = False
        device = norms[0].device
        # A model split across devices (device_map) has its norms on several devices: gather the scalars on one.
        stacked = torch.stack([n if n.device == device else n.to(device) for n in norms])
        return stacked.to(torch.promote_types(stacked.dtype, torch.float32)).square().sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        if ctx.in_place:
            if ctx.consumed:
                raise RuntimeError(
                    "ewc_penalty with a workspace supports one backward per call; call it again (or drop the "
                    "workspace) to differentiate it twice."
                )
            ctx.consumed = True
            grads = ctx.scaled_diff
            torch._foreach_mul_(grads, ctx.sqrt_coefficients)
        else:
            grads = torch._foreach_mul(ctx.scaled_diff, ctx.sqrt_coefficients)
        devices = {g.device for g in grads}
        scale = grad_output * 2 if devices == {grad_output.device} else float(grad_output) * 2
        torch._foreach_mul_(grads, scale)
        return (None, None, None, *grads)


def ewc_penalty(
    params: Sequence[Tensor],
    anchors: Sequence[Tensor],
    coefficients: Sequence[Tensor] | None = None,
    *,
    sqrt_coefficients: Sequence[Tensor] | None = None,
    workspace: Sequence[Tensor] | None = None,
) -> Tensor:
    r"""The EWC penalty ``P = Σ_i Σ_j c_ij · (θ_ij − θ*_ij)²``, differentiable with respect to ``params``.

    Args:
        params (`Sequence[torch.Tensor]`):
            Current parameters θ.
        anchors (`Sequence[torch.Tensor]`):
            Anchors θ* (same shapes, devices and dtypes as ``params``).
        coefficients (`Sequence[torch.Tensor]`, *optional*):
            Coefficients c ≥ 0 (see [`vanilla_coefficients`], [`stabilized_coefficients`]).
        sqrt_coefficients (`Sequence[torch.Tensor]`, *optional*):
            ``√c`` precomputed, for callers that evaluate the penalty every step (saves one kernel per call).
        workspace (`Sequence[torch.Tensor]`, *optional*):
            Buffers shaped like ``params``, overwritten by every call and by its backward, so that nothing
            parameter-sized is allocated per step. One backward per call, through ``loss.backward()``:
            ``torch.autograd.grad`` would hand back the workspace buffers themselves, which the next call overwrites.

    Returns:
        `torch.Tensor`: a 0-d tensor, float32 (float64 for float64 parameters); its gradient is ``2·c·(θ − θ*)``.
    """
    if (coefficients is None) == (sqrt_coefficients is None):
        raise ValueError("Pass exactly one of coefficients= or sqrt_coefficients=.")
    params, anchors = list(params), list(anchors)
    if sqrt_coefficients is None:
        sqrt_coefficients = torch._foreach_sqrt(list(coefficients))
    sqrt_coefficients = list(sqrt_coefficients)
    if not (len(params) == len(anchors) == len(sqrt_coefficients)):
        raise ValueError(
            f"params, anchors and coefficients must have one entry per parameter tensor; got {len(params)}, "
            f"{len(anchors)} and {len(sqrt_coefficients)}."
        )
    if workspace is not None and len(workspace) != len(params):
        raise ValueError(f"workspace must have one buffer per parameter tensor; got {len(workspace)}.")
    if not params:
        return torch.zeros((), dtype=torch.float32)
    return _QuadraticPenalty.apply(sqrt_coefficients, anchors, None if workspace is None else list(workspace), *params)


def proximal_weights(importances: Sequence[Tensor], ewc_lambda: float, lr: float) -> list[Tensor]:
    r"""Interpolation weights ``w = η·λ·Ω / (1 + η·λ·Ω)`` of the proximal step (see [`proximal_step_`])."""
    _check_lambda_lr(ewc_lambda, lr)
    # 1 / (1 + 1/(ηλΩ)): overflow-safe like the stabilized coefficient (ηλΩ → inf gives w = 1, Ω = 0 gives w = 0).
    weights = torch._foreach_mul(list(importances), ewc_lambda * lr)
    torch._foreach_reciprocal_(weights)
    torch._foreach_add_(weights, 1.0)
    torch._foreach_reciprocal_(weights)
    return list(weights)


@torch.no_grad()
def proximal_step_(params: Sequence[Tensor], anchors: Sequence[Tensor], weights: Sequence[Tensor]) -> None:
    r"""In place: ``θ ← θ* + (θ − θ*) / (1 + η·λ·Ω)``, written as ``θ ← θ + w·(θ* − θ)`` with ``w`` from
    [`proximal_weights`].

    This is the exact minimiser of ``‖θ − θ̃‖²/(2η) + ½·λ·Ω·(θ − θ*)²`` around the optimizer's result θ̃: the implicit
    step of the quadratic penalty. It runs after the optimizer, so gradient clipping and Adam's normalisation never
    touch it, and it contracts towards the anchor at any λ.
    """
    torch._foreach_lerp_(list(params), list(anchors), list(weights))


@torch.no_grad()
def penalty_gradient_(
    params: Sequence[Tensor],
    anchors: Sequence[Tensor],
    two_coefficients: Sequence[Tensor],
    workspace: Sequence[Tensor],
    *,
    scale: float = 1.0,
    grads: Sequence[Tensor] | None = None,
) -> None:
    r"""In place: ``θ.grad += scale · 2c ⊙ (θ − θ*)`` — the penalty's gradient, added without autograd.

    ``workspace`` (buffers shaped like ``params``) receives ``θ − θ*``. A parameter without ``.grad`` gets one. The
    difference is formed first, so a weight right at its anchor gets exactly 0 (``2c·θ − 2c·θ*`` would not).

    On the CPU it runs one tensor at a time (``θ − θ*`` still in cache when the gradient reads it): about 7
    parameter-sized memory passes, against about 17 for the autograd path's forward and backward. On CUDA it runs as
    three ``torch._foreach_*`` kernels over all tensors (9 passes, few launches). ``grads``: where the gradient goes
    when it is not ``params``' own ``.grad`` (the local slices of sharded parameters' gradients).
    """
    if grads is None:
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    if not params:
        return
    if params[0].device.type == "cuda":
        diffs = list(workspace)
        torch._foreach_copy_(diffs, list(params))
        torch._foreach_sub_(diffs, list(anchors))
        torch._foreach_addcmul_(grads, diffs, list(two_coefficients), value=scale)
        return
    for p, anchor, c, w, g in zip(params, anchors, two_coefficients, workspace, grads):
        torch.sub(p, anchor, out=w)
        g.addcmul_(w, c, value=scale)


@dataclass
class Penalty:
    r"""The penalty of one training run: anchors and coefficients on the parameters' devices, aligned with ``params``.

    Built once per `train()` by [`Penalty.build`] from name-keyed anchors θ* and importances Ω; then every step costs
    the fused kernels of [`ewc_penalty`] (into a reused ``workspace``) or of [`proximal_step_`].

    - ``mode="stabilized"`` / ``"vanilla"``: ``two_coefficients`` = 2c; [`Penalty.add_gradient_`] adds the penalty's
      gradient once per optimizer step, [`Penalty.value`] measures it (for logs), [`Penalty.loss`] is the same as a
      differentiable loss term (for engines that keep gradients to themselves, such as DeepSpeed);
    - ``mode="proximal"``: ``proximal_weights`` = ηλΩ/(1 + ηλΩ); [`Penalty.proximal_step_`] runs after each step.

    ``coef_max`` is ``max η·2c`` (penalized) or the largest proximal weight: the share of the distance to the anchor
    one step removes (< 1 for stabilized and proximal; > 1 means vanilla EWC overshoots the anchor under SGD).
    ``overshoot`` is ``η·λ·max Ω``.

    Sharded parameters (FSDP2's DTensors): ``anchors`` and ``importances`` are this process's slices (2·P/N floats per
    process), every update runs on the parameters' and gradients' local slices (``.to_local()``), and
    ``all_reduce(tensor, "sum" | "max")`` makes the reported values (``value``, ``coef_max``, …) global.
    """

    names: list[str]
    params: list[Tensor]
    anchors: list[Tensor]
    importances: list[Tensor]  # Ω as given (not copied): for the monitoring value of the proximal mode
    ewc_lambda: float
    coef_max: float
    overshoot: float
    omega_mean: float  # mean Ω over the protected parameters: λ·Ω̄ says how strong the penalty is on average
    two_coefficients: list[Tensor] | None = None
    proximal_weights: list[Tensor] | None = None
    workspace: list[Tensor] | None = None
    _sqrt_coefficients: list[Tensor] | None = field(default=None, repr=False)  # √c, built by the first `loss()`
    all_reduce: Callable[[Tensor, str], Tensor] | None = None  # set for sharded parameters: global values

    @classmethod
    def build(
        cls,
        params: Mapping[str, Tensor],
        anchors: Mapping[str, Tensor],
        importances: Mapping[str, Tensor],
        *,
        mode: str,
        ewc_lambda: float,
        lr: float,
        all_reduce: Callable[[Tensor, str], Tensor] | None = None,
    ) -> "Penalty | None":
        """The penalty over the parameters of ``params`` that ``anchors`` covers (in ``params``' order); None when it
        covers none. Anchors take each parameter's device and dtype; coefficients are computed in float32. For
        sharded parameters, ``anchors`` and ``importances`` hold this process's slices and ``all_reduce`` is given
        (see the class)."""
        names = [n for n in params if n in anchors]
        if not names:
            return None
        plist = [params[n] for n in names]
        local = [_local(p) for p in plist]
        anchor_list = [anchors[n].to(p.device, p.dtype) for n, p in zip(names, local)]
        omega = [importances[n].to(p.device, torch.float32) for n, p in zip(names, local)]
        largest = max((float(t.max()) for t in omega if t.numel()), default=0.0)
        stats = torch.tensor([largest], dtype=torch.float64, device=local[0].device)
        sums = torch.tensor(
            [float(sum(t.sum(dtype=torch.float64) for t in omega)), float(sum(t.numel() for t in omega))],
            dtype=torch.float64, device=local[0].device,
        )  # fmt: skip
        if all_reduce is not None:
            all_reduce(stats, "max"), all_reduce(sums, "sum")
        overshoot = lr * ewc_lambda * float(stats[0])
        omega_mean = float(sums[0]) / max(float(sums[1]), 1.0)
        # Ω as given (not copied); for sharded parameters the slices, kept by the proximal mode only (its monitoring)
        kept = [importances[n] for n in names] if all_reduce is None else omega if mode == "proximal" else []
        penalty = cls(names, plist, anchor_list, kept, ewc_lambda, 0.0, overshoot, omega_mean, all_reduce=all_reduce)
        if mode == "proximal":
            weights = proximal_weights(omega, ewc_lambda, lr)
            penalty.coef_max = penalty._global_max(weights)
            penalty.proximal_weights = [w.to(p.dtype) for w, p in zip(weights, plist)]
        else:
            coefficients = penalty_coefficients(omega, ewc_lambda, mode=mode, lr=lr)
            penalty.coef_max = 2 * lr * penalty._global_max(coefficients)
            penalty.two_coefficients = [c.mul_(2).to(p.dtype) for c, p in zip(coefficients, plist)]
            penalty.workspace = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in local]
        return penalty

    def _global_max(self, tensors: list[Tensor]) -> float:
        value = max((float(t.max()) for t in tensors if t.numel()), default=0.0)
        if self.all_reduce is None:
            return value
        device = self.anchors[0].device  # (NCCL reduces CUDA tensors only)
        return float(self.all_reduce(torch.tensor([value], dtype=torch.float64, device=device), "max")[0])

    def _global_sum(self, value: Tensor) -> float:
        return float(self.all_reduce(value, "sum") if self.all_reduce is not None else value)

    def _locals(self) -> list[Tensor]:
        """The parameters as plain tensors: this process's slices of sharded ones (views: updates reach them)."""
        return [_local(p) for p in self.params] if self.all_reduce is not None else self.params

    @property
    def penalized(self) -> bool:
        """True for a penalty term (stabilized, vanilla), False for the proximal step."""
        return self.two_coefficients is not None

    @torch.no_grad()
    def add_gradient_(self, scale: float = 1.0) -> None:
        """``θ.grad += scale · 2c ⊙ (θ − θ*)`` (``scale``: a loss scaler's current scale, when gradients carry it);
        on a sharded parameter, into the local slice of its (already reduce-scattered) gradient."""
        grads = None
        if self.all_reduce is not None:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [_local(p.grad) for p in self.params]
        params = self._locals()
        penalty_gradient_(params, self.anchors, self.two_coefficients, self.workspace, scale=scale, grads=grads)

    @torch.no_grad()
    def value(self) -> float:
        """``Σ c·(θ − θ*)²`` now, as a float (computed in the workspace; for logs; over every shard)."""
        total = torch.zeros((), dtype=torch.float64, device=self.anchors[0].device)
        for p, anchor, c, w in zip(self._locals(), self.anchors, self.two_coefficients, self.workspace):
            torch.sub(p, anchor, out=w)
            total += torch.dot(w.mul_(w).reshape(-1).float(), c.reshape(-1).float()).double()
        return 0.5 * self._global_sum(total)

    def loss(self) -> Tensor:
        """``Σ c·(θ − θ*)²`` as a differentiable loss term (autograd computes the same gradient as
        `add_gradient_`, in about 2.4× the memory traffic). ``√c`` is computed on the first call only."""
        if self._sqrt_coefficients is None:
            self._sqrt_coefficients = [torch.sqrt(c / 2) for c in self.two_coefficients]
        return ewc_penalty(self.params, self.anchors, sqrt_coefficients=self._sqrt_coefficients)

    @torch.no_grad()
    def proximal_step_(self) -> None:
        """``θ ← θ* + (θ − θ*)/(1 + η·λ·Ω)`` in place (on the local slices of sharded parameters)."""
        proximal_step_(self._locals(), self.anchors, self.proximal_weights)

    def two_c(self) -> dict[str, Tensor]:
        """``2c`` per parameter name (the penalty gradient is ``2c·(θ − θ*)``), for penalized modes."""
        return dict(zip(self.names, self.two_coefficients))

    @torch.no_grad()
    def quadratic_value(self) -> float:
        """``Σ ½·λ·Ω·(θ − θ*)²`` on the CPU: the quadratic the proximal step minimises, for monitoring only."""
        total = torch.zeros((), dtype=torch.float64)
        for p, anchor, omega in zip(self._locals(), self.anchors, self.importances):
            diff = (p.detach() - anchor).float().cpu()
            total += (omega.float().cpu() * diff.square()).sum().double()
        return 0.5 * self.ewc_lambda * self._global_sum(total.to(self.anchors[0].device))
