r"""Weight-velocity attenuation (WVA; Kutalev 2020, Kutalev & Lapina 2022): slow down what earlier domains need.

No loss term and no anchor: every optimizer step of a protected parameter is scaled by its attenuation

- ``hyperbolic`` (default):  ``a = 1 / (1 + λ·Ω)``;
- ``exponential``:           ``a = exp(−λ·Ω)``

applied either to

- ``deltas`` (default): ``θ ← θ_prev + a ⊙ (θ − θ_prev)`` after each real optimizer step — the step the optimizer took,
  whatever it is (Adam's ``m/√v``, momentum, AdamW's decoupled weight decay, which is part of the step and so is
  attenuated too: a protected weight neither learns nor decays);
- ``gradients``: ``g ← a ⊙ g`` before the step (after gradient clipping). Identical to ``deltas`` for plain SGD, but
  Adam's ``m/√v`` divides a constant per-parameter factor out again once ``v`` has adapted, so it protects almost
  nothing there (the authors: 0.41 vs 0.84 mean accuracy after 10 permuted-MNIST tasks); decoupled weight decay is
  not attenuated either.

Ω is the EWC state's importance (any method); λ is `ewc_lambda`. A weight whose ``a`` is 0 (``exponential`` with a
huge λΩ) stops moving. Memory: ``deltas`` keeps two parameter-sized buffers (``1 − a`` and θ before the step),
``gradients`` one (``a``), each in the parameters' dtype — for bfloat16 parameters ``a`` and the interpolation are
rounded to bfloat16 (about 3 significant digits).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


__all__ = ["WVA_APPLY", "WVA_ATTENUATIONS", "Attenuation", "attenuation_factors"]

WVA_ATTENUATIONS = ("hyperbolic", "exponential")
WVA_APPLY = ("deltas", "gradients")


def attenuation_factors(importances: list[Tensor], ewc_lambda: float, kind: str = "hyperbolic") -> list[Tensor]:
    """``a = 1/(1 + λΩ)`` (``hyperbolic``) or ``exp(−λΩ)`` (``exponential``), in float32, one tensor per importance."""
    if not (ewc_lambda >= 0 and ewc_lambda != float("inf")):
        raise ValueError(f"ewc_lambda must be a finite number >= 0, got {ewc_lambda}.")
    if kind not in WVA_ATTENUATIONS:
        raise ValueError(f"Unknown wva_attenuation {kind!r}; choose one of: {', '.join(WVA_ATTENUATIONS)}.")
    scaled = torch._foreach_mul([t.float() for t in importances], ewc_lambda)
    if kind == "exponential":
        torch._foreach_neg_(scaled)
        torch._foreach_exp_(scaled)
        return list(scaled)
    torch._foreach_add_(scaled, 1.0)
    torch._foreach_reciprocal_(scaled)
    return list(scaled)


@dataclass
class Attenuation:
    """WVA for one training run: attenuations ``a`` on the parameters' devices, aligned with ``params``.

    Call [`Attenuation.before_step`] right before ``optimizer.step()`` and [`Attenuation.after_step`] right after a
    step that was taken (not one the fp16 scaler skipped).
    """

    names: list[str]
    params: list[Tensor]
    factors: list[Tensor]  # a, in the parameters' dtypes (for `gradients`; empty for `deltas`, which keeps 1 − a)
    apply: str
    attenuation: str
    ewc_lambda: float
    factor_min: float
    factor_mean: float
    _moved_share: list[Tensor] | None = field(default=None, repr=False)  # 1 − a, for `deltas`
    _previous: list[Tensor] | None = field(default=None, repr=False)  # θ before the step, for `deltas`

    @classmethod
    def build(
        cls,
        params: Mapping[str, Tensor],
        importances: Mapping[str, Tensor],
        *,
        ewc_lambda: float,
        attenuation: str = "hyperbolic",
        apply: str = "deltas",
    ) -> "Attenuation | None":
        """WVA over the parameters of ``params`` that ``importances`` covers (in ``params``' order); None when none."""
        if apply not in WVA_APPLY:
            raise ValueError(f"Unknown wva_apply {apply!r}; choose one of: {', '.join(WVA_APPLY)}.")
        names = [n for n in params if n in importances]
        if not names:
            return None
        plist = [params[n] for n in names]
        factors = attenuation_factors(
            [importances[n].to(p.device) for n, p in zip(names, plist)], ewc_lambda, attenuation
        )
        count = sum(a.numel() for a in factors)
        factor_mean = float(sum(a.sum(dtype=torch.float64) for a in factors)) / max(count, 1)
        factor_min = min(float(a.min()) for a in factors if a.numel()) if count else 1.0
        if apply == "gradients":
            return cls(names, plist, [a.to(p.dtype) for a, p in zip(factors, plist)], apply, attenuation, ewc_lambda,
                       factor_min, factor_mean)  # fmt: skip
        out = cls(names, plist, [], apply, attenuation, ewc_lambda, factor_min, factor_mean)
        out._moved_share = [torch.sub(1, a).to(p.dtype) for a, p in zip(factors, plist)]
        del factors
        out._previous = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in plist]
        return out

    @torch.no_grad()
    def before_step(self) -> None:
        """``deltas``: remember θ; ``gradients``: ``g ← a ⊙ g`` (parameters without a gradient are left alone)."""
        if self.apply == "deltas":
            torch._foreach_copy_(self._previous, [p.detach() for p in self.params])
            return
        pairs = [(p.grad, a) for p, a in zip(self.params, self.factors) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [a.to(g.dtype) for g, a in pairs])

    @torch.no_grad()
    def after_step(self) -> None:
        """``deltas``: ``θ ← θ_prev + a ⊙ (θ − θ_prev)``, i.e. ``θ ← θ + (1 − a) ⊙ (θ_prev − θ)``; ``gradients``:
        nothing."""
        if self.apply == "deltas":
            torch._foreach_lerp_([p.detach() for p in self.params], self._previous, self._moved_share)

    def metrics(self) -> dict[str, float]:
        """``ewc/attenuation_min`` and ``ewc/attenuation_mean`` (1: no protection; 0: frozen)."""
        return {"ewc/attenuation_min": self.factor_min, "ewc/attenuation_mean": self.factor_mean}
