"""What the gradient-based methods differentiate: the model's logits and labels laid out per position.

- ``build_targets``: logits and labels as ``[B, T, V]`` / ``[B, T]`` with the mask of positions that count and the
  causal shift the model's own loss uses;
- ``check_loss_convention``: on the first batch, the model's own loss must equal the mean token cross-entropy built
  here, or the label layout is misread.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..utils import HfEwcError, logger


# How a sample's objective is formed from its positions, recorded with Fisher and MAS importances (Fisher states
# written before 0.2 used the mean over positions and carry no such entry).
SUM_OVER_SQRT_T = "sum over positions / sqrt(positions)"
MEAN_OVER_T = "mean over positions"


def outputs_logits(outputs: Any, labels_given: bool) -> Tensor:
    if isinstance(outputs, Mapping) or hasattr(outputs, "logits"):
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else outputs.logits
    elif isinstance(outputs, (tuple, list)):
        logits = outputs[1] if labels_given and len(outputs) > 1 else outputs[0]
    else:
        logits = outputs if torch.is_tensor(outputs) else None
    if not torch.is_tensor(logits):
        raise HfEwcError(
            "The model's output has no logits; importance methods need a model that returns logits (and, for "
            "the empirical Fisher, takes labels)."
        )
    return logits


def outputs_loss(outputs: Any) -> Tensor | None:
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    if hasattr(outputs, "loss"):
        return outputs.loss
    if isinstance(outputs, (tuple, list)) and outputs and torch.is_tensor(outputs[0]) and outputs[0].ndim == 0:
        return outputs[0]
    return None


@dataclass
class Targets:
    """Logits and targets laid out as ``[B, T, V]`` / ``[B, T]`` with a ``[B, T]`` mask of positions that count.

    A sequence-classification batch has ``T = 1``. For causal LMs the positions are already shifted (position t
    predicts token t+1), exactly as the model's loss does.
    """

    logits: Tensor  # [B, T, V]
    labels: Tensor | None  # [B, T] (−100 replaced by 0 where masked)
    mask: Tensor  # [B, T] float
    tokens: Tensor  # [B] number of counted positions T_n
    valid: Tensor  # [B] bool: samples with at least one counted position

    _log_probs: Tensor | None = None

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    def log_probs(self) -> Tensor:
        """``log_softmax`` of the logits in float32, computed once (it is the largest tensor of a language model)."""
        if self._log_probs is None:
            self._log_probs = torch.log_softmax(self.logits.float(), dim=-1)
        return self._log_probs

    def per_sample(self, per_position: Tensor, weighting: str = SUM_OVER_SQRT_T) -> Tensor:
        """A sample's objective from per-position values: ``Σ_t mask·x / √T_n`` (`SUM_OVER_SQRT_T`) or
        ``Σ_t mask·x / T_n`` (`MEAN_OVER_T`); 0 for samples without positions. A classifier (T = 1) is unaffected.

        The Fisher uses the first: for labels drawn from the model the per-position gradients ``g_t`` have mean 0
        given the inputs and are independent across positions, so ``E[(Σ_t g_t/√T)²] = (1/T)·Σ_t E[g_t²]`` — the mean
        per-token Fisher, whatever T (the mean over positions would give 1/T of it). MAS uses the second: its
        per-position gradients do not have mean 0, ``|Σ_t ∇‖f_t‖²|`` grows about as T, and the mean keeps it level."""
        scale = self.tokens.clamp(min=1)
        return (per_position * self.mask).sum(1) / (scale.sqrt() if weighting == SUM_OVER_SQRT_T else scale)


def build_targets(
    outputs: Any, inputs: Mapping[str, Any], *, shift_labels: bool, need_labels: bool, method: str
) -> Targets:
    labels = inputs.get("labels")
    logits = outputs_logits(outputs, labels is not None)
    if labels is None and need_labels:
        raise HfEwcError(
            f"{method} needs labels in the data (a 'labels' column or key); for unlabeled data use "
            "fisher_estimator='sampled' or method='mas'."
        )
    if labels is not None and labels.is_floating_point():
        raise HfEwcError(
            "The labels are floating point (a regression or multi-label head); Fisher and MAS here need a "
            "categorical output (cross-entropy over the logits)."
        )
    if logits.ndim == 2:  # sequence classification [B, C]
        logits = logits.unsqueeze(1)
        labels = labels.reshape(-1, 1) if labels is not None else None
        attention = None
    elif logits.ndim == 3:  # token logits [B, T, V]
        attention = inputs.get("attention_mask")
        if labels is not None and labels.shape != logits.shape[:2]:
            raise HfEwcError(
                f"Token logits have shape {tuple(logits.shape)} but labels {tuple(labels.shape)}; expected labels "
                "[batch, sequence]."
            )
        if shift_labels:
            logits = logits[:, :-1]
            labels = labels[:, 1:] if labels is not None else None
            attention = attention[:, 1:] if attention is not None else None
    else:
        raise HfEwcError(
            f"Unsupported logits shape {tuple(logits.shape)}: expected [batch, classes] or [batch, T, V]."
        )
    if labels is not None:
        mask = labels.ne(-100)
        labels = labels.masked_fill(~mask, 0)
    elif attention is not None and attention.ndim == 2:
        mask = attention.bool()
    else:
        mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    maskf = mask.to(torch.float32)
    tokens = maskf.sum(1)
    return Targets(logits=logits, labels=labels, mask=maskf, tokens=tokens, valid=tokens > 0)


def _mean_nll(logits: Tensor, labels: Tensor) -> float | None:
    mask = labels.ne(-100)
    if not bool(mask.any()):
        return None
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return float(nll[mask].mean())


def check_loss_convention(outputs: Any, inputs: Mapping[str, Any], targets: Targets, *, shift_labels: bool) -> None:
    """On the first batch: the model's own loss must equal the mean token cross-entropy the collector computes, or the
    collector misreads the label layout (typically a causal LM whose labels are shifted another way)."""
    model_loss = outputs_loss(outputs)
    if model_loss is None or targets.labels is None or targets.mask.sum() == 0:
        return
    theirs = float(model_loss.detach().float())
    if not math.isfinite(theirs):
        return  # a broken model: the importances will be non-finite and refused with the parameter's name
    nll = -targets.log_probs().detach().gather(-1, targets.labels.unsqueeze(-1)).squeeze(-1)
    ours = float((nll * targets.mask).sum() / targets.mask.sum())

    # Half-precision models compute their loss in half precision: allow for its rounding.
    tolerance = max(2e-3, 4 * torch.finfo(targets.logits.dtype).eps)

    def close(value: float | None) -> bool:
        return value is not None and abs(value - theirs) <= tolerance * max(1.0, abs(theirs))

    if close(ours):
        return
    message = (
        f"The model's loss ({theirs:.5f}) differs from the mean token cross-entropy the importance collector computes "
        f"({ours:.5f}) with shift_labels={shift_labels}"
    )
    logits, labels = outputs_logits(outputs, True).detach(), inputs["labels"]
    if logits.ndim == 3:
        other = _mean_nll(logits, labels) if shift_labels else _mean_nll(logits[:, :-1], labels[:, 1:])
        if close(other):
            raise HfEwcError(
                message + f"; the model aligns labels the other way: pass shift_labels={not shift_labels}."
            )
    logger.warning(message + ": the model uses a custom loss; importances follow plain cross-entropy.")
