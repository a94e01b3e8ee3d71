r"""Diagonal Fisher information, with the estimator always named.

A *sample* is one row of the batch: a sequence for language models, an example for classifiers. Its objective is the
log-likelihood of its counted positions (labels ≠ −100, after the causal shift for causal LMs), **summed and weighted
by 1/√T_n**:

    ℓ_n(θ) = (1/√T_n) · Σ_{t ∈ T_n} log p_θ(y_{n,t} | x_n)

(a classifier has ``T_n = 1``). For labels drawn from the model the per-position gradients are independent with mean
0, so ``E[g_n²]`` is the **mean per-token Fisher**, whatever the sequence length (the mean over positions, 1/T_n,
would shrink it as 1/T: 4× smaller for 4× longer blocks). With the true labels (``empirical``) the cross terms
between positions do not vanish — a trained model's per-position gradients share the direction of the training
signal — so its Ω still grows with T. Measured on a small Llama trained on the shipped Python docs, Ω̄ of 128-token
blocks over that of 32-token blocks: 0.90 sampled, 1.78 empirical (0.23 and 0.44 with the mean over positions).
`importance_normalization="mean"` (the default) takes out whatever global scale remains.
Samples with no counted position are skipped and not counted. With ``g_n = ∇_θ ℓ_n`` the estimators are:

- ``empirical``: ``F = (1/N) Σ_n g_n²`` with the true labels y (Kutalev's `ewc-features`);
- ``sampled``:   the same with ``y_{n,t} ~ p_θ(· | x_n)`` drawn once per position (an unbiased one-draw estimate of
  ``exact``), sample n's draws seeded by (seed, n), so they do not depend on the batch or the number of processes;
- ``exact``:     ``F = (1/N) Σ_n E_{y ~ p_θ}[g_n²]``. Positions are conditionally independent given the inputs (teacher
  forcing), so ``E[g_n²] = (1/T_n) Σ_t Σ_c p(c | t) (∇ log p(c | t))²``: one backward per (position, class) pair.
  That is ``C`` backward passes per batch for a C-way classifier, but ``T·V`` for a language model — 8 000 backward
  passes per batch for a 64-token, 125-word vocabulary, 3.2 million for GPT-2. The collector refuses when a batch would
  need more than ``max_backward_per_batch`` (default 256) and suggests ``sampled``.
- ``batched``:   ``F = (1/M) Σ_b (∇ mean_{n∈b} ℓ_n)²`` over M minibatches: the squared minibatch gradient. Cheap (one
  backward per batch) but a different quantity: for a batch of B it is about ``1/B`` of the per-sample Fisher plus the
  squared mean gradient, so λ tuned for the other estimators does not carry over (van de Ven 2025).

Gradients are formed in float32 and accumulated in float32 whatever the model's dtype.
"""

from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import is_sharded
from ..models import model_shifts_labels
from ..utils import HfEwcError
from ._loop import ImportanceMethod
from ._per_sample import PerSampleGradients
from ._targets import MEAN_OVER_T, SUM_OVER_SQRT_T, Targets, build_targets, check_loss_convention


ESTIMATORS = ("empirical", "sampled", "exact", "batched")


def _sample_log_likelihood(targets: Targets, labels: Tensor) -> Tensor:
    logp = targets.log_probs().gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return targets.per_sample(logp)


def _draw_labels(targets: Targets, generator: torch.Generator, seed: int | None, ids: list[int] | None) -> Tensor:
    """One label per counted position from the model's distribution (0 where nothing counts).

    With a ``seed`` and the samples' global indices ``ids``, sample i's k counted positions take, in order, the k
    uniform numbers of a CPU generator seeded by (seed, i), turned into labels by the inverse of the distribution's
    cumulative sum (float64): the same labels whichever process, batch, padding or device the sample falls in.
    Otherwise (``seed=None``) the draws come from ``generator``, in batch order."""
    probs = torch.softmax(targets.logits.detach().float(), dim=-1)
    if seed is None or ids is None:
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    if len(ids) != probs.shape[0]:
        raise HfEwcError(f"{len(ids)} sample indices for a batch of {probs.shape[0]} samples (an hf_ewc bug).")
    labels = torch.zeros(probs.shape[:-1], dtype=torch.long, device=probs.device)
    for n, i in enumerate(ids):
        counted = targets.mask[n] > 0
        cdf = probs[n][counted].double().cumsum(-1)
        own = torch.Generator().manual_seed((seed * 1_000_003 + i) % 2**63)
        u = torch.rand(cdf.shape[0], 1, generator=own, dtype=torch.float64).to(cdf.device) * cdf[:, -1:]
        labels[n, counted] = (cdf < u).sum(-1).clamp(max=cdf.shape[-1] - 1)
    return labels


def _exact_objectives(targets: Targets):
    """One objective per (position, class): ``Σ_n (mask_{n,t}/√T_n)·√p_{n,t,c}·log p_{n,t,c}``, whose squared
    per-sample gradient is ``p·(∇ log p)²/T_n``."""
    logp = targets.log_probs()
    weight = (targets.mask / targets.tokens.clamp(min=1).sqrt().unsqueeze(1)).unsqueeze(
        -1
    ) * logp.detach().exp().sqrt()
    positions = [t for t in range(logp.shape[1]) if bool(targets.mask[:, t].any())]
    for t in positions:
        for c in range(logp.shape[-1]):
            yield weight[:, t, c] * logp[:, t, c]


class Fisher(ImportanceMethod):
    """Sums of squared gradients; the count is of samples (of minibatches for ``batched``)."""

    name = "fisher"
    options = ("estimator", "shift_labels", "per_sample", "max_backward_per_batch")

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        *,
        seed: int | None = 0,
        estimator: str = "empirical",
        shift_labels: bool | None = None,
        per_sample: str = "auto",
        max_backward_per_batch: int = 256,
    ):
        super().__init__(model, params, seed=seed)
        if estimator not in ESTIMATORS:
            raise HfEwcError(f"Unknown fisher estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}.")
        self.estimator = estimator
        self.shift_labels = model_shifts_labels(model) if shift_labels is None else shift_labels
        self.max_backward_per_batch = max_backward_per_batch
        self.recorded = {
            "shift_labels": self.shift_labels,
            "count_unit": "minibatches" if estimator == "batched" else "samples",
            "sample_objective": SUM_OVER_SQRT_T,
        }
        self.method = f"fisher_estimator={estimator!r}"
        # Label draws get their own generator: reproducible from `seed` alone, whatever else consumes the global RNG.
        self.generator = torch.Generator(next(iter(params.values())).device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.first = True
        if estimator == "batched" and not is_sharded(params):
            self.engine = None
            self.sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
        else:
            # sharded parameters: the minibatch gradient of each process's own batch, from the hooks, squared
            transform = "batch_square" if estimator == "batched" else "square"
            self.engine = PerSampleGradients(model, params, transform, per_sample)
            self.sums = self.engine.sums

    def _targets(self, outputs: Any, inputs: dict[str, Any]) -> Targets:
        need_labels = self.estimator in ("empirical", "batched")  # sampled and exact draw or sum over labels
        targets = build_targets(
            outputs, inputs, shift_labels=self.shift_labels, need_labels=need_labels, method=self.method
        )
        if self.first:
            check_loss_convention(outputs, inputs, targets, shift_labels=self.shift_labels)
            self.first = False
            if self.engine is not None:
                self.engine.skip_model_loss()
        return targets

    def accumulate(self, inputs: dict[str, Any]) -> int:
        if self.engine is not None:
            return self.engine.run(inputs, self._objectives)
        targets = self._targets(self.model(**inputs), inputs)
        if targets.num_valid == 0:
            return 0
        mean_ll = _sample_log_likelihood(targets, targets.labels)[targets.valid].mean()
        names = list(self.params)
        grads = torch.autograd.grad(mean_ll, [self.params[n] for n in names], allow_unused=True)
        for name, grad in zip(names, grads):
            if grad is not None:
                self.sums[name] += grad.float().square()
        return 1

    def _objectives(self, outputs: Any, inputs: dict[str, Any]):
        targets = self._targets(outputs, inputs)
        if self.estimator == "batched":  # (sharded parameters) one "sample": the mean over the batch's valid samples
            ll = _sample_log_likelihood(targets, targets.labels)
            return int(targets.num_valid > 0), [ll.where(targets.valid, 0) / max(targets.num_valid, 1)]
        if self.estimator == "empirical":
            return targets.num_valid, [_sample_log_likelihood(targets, targets.labels)]
        if self.estimator == "sampled":
            ids = None if self.sample_ids is None else self.sample_ids[self.engine.rows]
            labels = _draw_labels(targets, self.generator, self.seed, ids)
            return targets.num_valid, [_sample_log_likelihood(targets, labels)]
        positions = int(targets.mask.any(0).sum())
        needed = positions * targets.logits.shape[-1]
        if needed > self.max_backward_per_batch:
            raise HfEwcError(
                f"The exact Fisher needs {positions} positions × {targets.logits.shape[-1]} classes = {needed} "
                f"backward passes for this batch (limit max_backward_per_batch={self.max_backward_per_batch}); use "
                "fisher_estimator='sampled' (an unbiased one-draw estimate of the same quantity) or raise the limit."
            )
        return targets.num_valid, _exact_objectives(targets)


class SqrtFisher(Fisher):
    """``Ω = √F`` (Benzing's `rEWC`): the square root of the Fisher of this domain, taken per domain before the state
    sums the domains. Benzing uses the ``exact`` Fisher (SI and MAS approximate its square root); on a language model
    ``exact`` needs T·V backward passes per batch and ``sampled`` is its unbiased one-draw estimate (the root of an
    unbiased estimate is biased low where few samples are taken)."""

    name = "sqrt_fisher"

    def finalize(self, sums: dict[str, Tensor], count: int) -> dict[str, Tensor]:
        return {n: (s / count).sqrt_() for n, s in sums.items()}


def _absolute_objectives(targets: Targets):
    """One objective per (position, class): ``Σ_n (mask_{n,t}/T_n)·p_{n,t,c}·log p_{n,t,c}``, whose absolute per-sample
    gradient is ``p·|∇ log p|/T_n``."""
    logp = targets.log_probs()
    weight = (targets.mask / targets.tokens.clamp(min=1).unsqueeze(1)).unsqueeze(-1) * logp.detach().exp()
    positions = [t for t in range(logp.shape[1]) if bool(targets.mask[:, t].any())]
    for t in positions:
        for c in range(logp.shape[-1]):
            yield weight[:, t, c] * logp[:, t, c]


class AbsoluteFisher(ImportanceMethod):
    r"""Benzing's "absolute Fisher" `AF`: ``Ω = (1/N) Σ_n (1/T_n) Σ_t Σ_c p(c | x_n, t) · |∇_θ log p(c | x_n, t)|``,
    the exact Fisher's expectation over the model's labels with ``|g|`` in place of ``g²`` (a classifier has
    ``T_n = 1``). Like the exact Fisher it needs one backward per (position, class) pair and refuses batches that need
    more than ``max_backward_per_batch``."""

    name = "af"
    options = ("shift_labels", "per_sample", "max_backward_per_batch")

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        *,
        seed: int | None = 0,
        shift_labels: bool | None = None,
        per_sample: str = "auto",
        max_backward_per_batch: int = 256,
    ):
        super().__init__(model, params, seed=seed)
        self.shift_labels = model_shifts_labels(model) if shift_labels is None else shift_labels
        self.max_backward_per_batch = max_backward_per_batch
        self.recorded = {"shift_labels": self.shift_labels, "sample_objective": MEAN_OVER_T}
        self.engine = PerSampleGradients(model, params, "abs", per_sample)
        self.engine.skip_model_loss()
        self.sums = self.engine.sums

    def accumulate(self, inputs: dict[str, Any]) -> int:
        return self.engine.run(inputs, self._objectives)

    def _objectives(self, outputs: Any, inputs: dict[str, Any]):
        targets = build_targets(outputs, inputs, shift_labels=self.shift_labels, need_labels=False, method="af")
        positions = int(targets.mask.any(0).sum())
        needed = positions * targets.logits.shape[-1]
        if needed > self.max_backward_per_batch:
            raise HfEwcError(
                f"The absolute Fisher (af) needs {positions} positions × {targets.logits.shape[-1]} classes = "
                f"{needed} "
                f"backward passes for this batch (limit max_backward_per_batch={self.max_backward_per_batch}); raise "
                "the limit, use shorter samples, or use fisher/mas."
            )
        return targets.num_valid, _absolute_objectives(targets)
