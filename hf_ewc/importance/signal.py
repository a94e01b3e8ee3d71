r"""Total absolute signal (Kutalev 2020, arXiv 2005.07107): how much signal flows through each connection.

Gradient-free and label-free: one forward pass per batch, no backward. For a linear map ``z = W·a + b`` and samples
n = 1..N, with ``⟨·⟩_n`` the mean over the sample's attended positions (the attention mask; a classifier's pooled
input has one position):

- weight ``W_ij``:  ``Ω_ij = |W_ij| · (1/N) Σ_n ⟨|a_j|⟩_n``  — the mean absolute signal through connection j → i;
- bias ``b_i``:     ``Ω_i = |b_i|`` with ``bias="abs"`` (the same rule with a constant input of 1, our default); the
  mean absolute pre-activation output ``(1/N) Σ_n ⟨|z_i|⟩_n`` with ``bias="output"``; or Kutalev's own rule with
  ``bias="activation"``: the mean absolute **post-activation** output ``(1/N) Σ_n ⟨|h(z)_i|⟩_n``, where h is the
  activation module that consumes the Linear's output (``nn.ReLU``, GELU, any module of ``torch.nn`` activations or
  ``transformers.activations``), the softmax when the output is the model's logits, and the identity otherwise
  (attention projections feed the residual stream directly).

The rule extends to the other parameter-holding layers of a transformer:

- ``nn.Embedding`` (a linear map of a one-hot input): ``Ω_vd = |E_vd| · (1/N) Σ_n (share of sample n's tokens that
  are v)``;
- normalisation layers ``y = γ ⊙ x̂ + β`` (``nn.LayerNorm``, RMSNorm-style modules with a 1-D ``weight``):
  ``Ω_γ = (1/N) Σ_n ⟨|y − β|⟩_n`` (= ``|γ|·⟨|x̂|⟩``) and ``Ω_β = |β|``.

A parameter used in several places (a tied embedding / LM head) sums the signal of every use. Trainable parameters of
any other module get Ω = 0 and are named in a warning. GPT-2's ``Conv1D`` (``z = a·W + b``, W stored [in, out]) is
handled as a Linear.
"""

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import local_tensor, shard_like
from ..models import LINEAR_TYPES
from ..utils import HfEwcError, logger
from ._loop import ImportanceMethod, batch_size_of


BIAS_RULES = ("abs", "output", "activation")
ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ in ACTIVATION_MODULES and not any(True for _ in module.parameters(recurse=False))


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm):
        return True
    own = dict(module.named_parameters(recurse=False))
    return (
        "norm" in type(module).__name__.lower()
        and "weight" in own
        and own["weight"].ndim == 1
        and set(own) <= {"weight", "bias"}
        and not any(True for _ in module.children())
    )


def _per_sample_mean_abs(x: Tensor, batch: int, mask: Tensor | None) -> Tensor:
    """``[B, ..., F]`` → ``[B, F]``: mean of |x| over the middle positions, attended positions only."""
    if x.ndim > 0 and x.shape[0] == 1 and batch > 1:  # shared across the batch (e.g. position embeddings)
        x = x.expand(batch, *x.shape[1:])
    if x.shape[0] != batch:
        raise HfEwcError(
            f"signal importance: an activation of shape {tuple(x.shape)} has no leading batch dimension {batch}."
        )
    x = x.detach().float().abs()
    if x.ndim == 2:
        return x
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        m = mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)
    return x.reshape(batch, -1, x.shape[-1]).mean(1)


class Signal(ImportanceMethod):
    """Forward hooks sum the mean absolute signals per feature (``self.sums``, keyed by module); `finalize` turns
    them into Ω by the rules above (``plan`` lists ``(rule, parameter name, sums key)``)."""

    name = "signal"
    options = ("bias",)
    categorical = False

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], *, seed: int | None = 0, bias: str = "abs"):
        super().__init__(model, params, seed=seed)
        if bias not in BIAS_RULES:
            raise HfEwcError(f"Unknown signal bias rule {bias!r}; choose one of: {', '.join(BIAS_RULES)}.")
        self.bias = bias
        self.plan: list[tuple[str, str, str]] = []
        self.hooks = []
        self.context: dict[str, Any] = {}
        # bias="activation": per batch, sums key → [weak reference to the output z, per-sample mean |h(z)|], one
        # per call of the Linear (a module called several times in a forward counts every call, as its weights do)
        self.pending: dict[str, list[list]] = {}
        self.device = next(iter(params.values())).device
        name_of = {id(p): n for n, p in params.items()}
        covered: set[str] = set()
        for index, module in enumerate(model.modules()):
            own = {attr: name_of[id(p)] for attr, p in module.named_parameters(recurse=False) if id(p) in name_of}
            if own and self._watch(module, str(index), own):
                covered.update(own.values())
        if bias == "activation":
            for module in model.modules():
                if _is_activation(module):
                    self.hooks.append(module.register_forward_hook(self._activation_hook))
        uncovered = [n for n in params if n not in covered]
        if uncovered:
            logger.warning(
                f"signal importance has no rule for {len(uncovered)} trainable parameter(s) (e.g. {uncovered[0]!r}); "
                "they get importance 0 and are not protected. Freeze them or use another method to protect them."
            )

    def _zeros(self, size: int) -> Tensor:
        return torch.zeros(size, dtype=torch.float32, device=self.device)

    def _watch(self, module: nn.Module, key: str, own: dict[str, str]) -> bool:
        """Register the rule of ``module`` (its parameters ``own``: attribute → name); False when it has none."""
        sums, plan, context, bias = self.sums, self.plan, self.context, self.bias
        if isinstance(module, LINEAR_TYPES):
            kind = "linear" if isinstance(module, nn.Linear) else "conv1d"
            fan_in, fan_out = (module.weight.shape[1], module.weight.shape[0])
            if kind == "conv1d":
                fan_in, fan_out = fan_out, fan_in
            sums[key + ".in"], sums[key + ".out"] = self._zeros(fan_in), self._zeros(fan_out)
            if "weight" in own:
                plan.append((kind, own["weight"], key + ".in"))
            if "bias" in own:
                plan.append(("bias_" + bias, own["bias"], key + ".out"))

            pending = self.pending

            def hook(mod, args, output):
                batch = context["batch"]
                sums[key + ".in"] += _per_sample_mean_abs(args[0], batch, context["mask"]).sum(0)
                if bias == "output" and "bias" in dict(mod.named_parameters(recurse=False)):
                    sums[key + ".out"] += _per_sample_mean_abs(output, batch, context["mask"]).sum(0)
                elif bias == "activation" and "bias" in dict(mod.named_parameters(recurse=False)):
                    stat = _per_sample_mean_abs(output, batch, context["mask"])
                    pending.setdefault(key + ".out", []).append([weakref.ref(output), stat])

        elif isinstance(module, nn.Embedding):
            plan.append(("embedding", own["weight"], key + ".rows"))
            sums[key + ".rows"] = self._zeros(module.num_embeddings)

            def hook(mod, args, output):
                batch = context["batch"]
                ids = args[0]
                if ids.shape[0] == 1 and batch > 1:  # position ids shared across the batch
                    ids = ids.expand(batch, *ids.shape[1:])
                ids = ids.reshape(batch, -1)
                mask = context["mask"]
                weight = (
                    mask.float()
                    if mask is not None and tuple(mask.shape) == tuple(ids.shape)
                    else torch.ones_like(ids, dtype=torch.float32)
                )
                weight = weight / weight.sum(1, keepdim=True).clamp(min=1)
                rows = torch.zeros(mod.num_embeddings, dtype=torch.float32, device=ids.device)
                rows.index_add_(0, ids.reshape(-1), weight.reshape(-1))
                sums[key + ".rows"] += rows

        elif _is_norm(module):
            sums[key + ".out"] = self._zeros(module.weight.shape[0])
            if "weight" in own:
                plan.append(("norm_weight", own["weight"], key + ".out"))
            if "bias" in own:
                plan.append(("bias_abs", own["bias"], key + ".out"))

            def hook(mod, args, output):
                y = output.detach().float()
                b = getattr(mod, "bias", None)
                if b is not None:
                    y = y - b.detach().float()
                sums[key + ".out"] += _per_sample_mean_abs(y, context["batch"], context["mask"]).sum(0)

        else:
            return False
        self.hooks.append(module.register_forward_hook(hook))
        return True

    def _activation_hook(self, module, args, output):
        """A Linear's output z goes straight into an activation: its bias is protected by ``|h(z)|`` instead."""
        if not args or not torch.is_tensor(args[0]):
            return
        for calls in self.pending.values():
            for call in calls:
                if call[0]() is args[0]:
                    call[1] = _per_sample_mean_abs(output, self.context["batch"], self.context["mask"])

    @torch.no_grad()
    def accumulate(self, inputs: dict[str, Any]) -> int:
        self.context["batch"] = batch_size_of(inputs)
        mask = inputs.get("attention_mask")
        self.context["mask"] = mask if torch.is_tensor(mask) and mask.ndim == 2 else None
        self.pending.clear()
        outputs = self.model(**inputs)
        logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", outputs)
        for key, calls in self.pending.items():
            for ref, per_sample in calls:
                if logits is not None and ref() is logits:  # the output layer: Kutalev uses its softmax output
                    probs = logits.float().softmax(-1)
                    per_sample = _per_sample_mean_abs(probs, self.context["batch"], self.context["mask"])
                self.sums[key] += per_sample.sum(0)
        self.pending.clear()
        return self.context["batch"]

    def pad(self, inputs: dict[str, Any]) -> None:
        """A forward that adds nothing (sharded models keep every process in step): the per-feature sums are small,
        so they are put back as they were."""
        kept = {key: value.clone() for key, value in self.sums.items()}
        self.accumulate(inputs)
        for key, value in kept.items():
            self.sums[key].copy_(value)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def finalize(self, sums: dict[str, Tensor], count: int) -> dict[str, Tensor]:
        # A sharded parameter's Ω is formed on this process's slice: the per-feature means, broadcast to the whole
        # parameter's shape (a view), are cut to the slice's layout.
        out = {n: torch.zeros_like(local_tensor(p), dtype=torch.float32) for n, p in self.params.items()}
        for rule, name, key in self.plan:
            param = self.params[name]
            weight = local_tensor(param).detach().float()
            mean = sums[key] / max(count, 1)
            if rule == "linear":
                out[name] += weight.abs() * shard_like(mean.unsqueeze(0).expand(param.shape), param)
            elif rule in ("conv1d", "embedding"):
                out[name] += weight.abs() * shard_like(mean.unsqueeze(1).expand(param.shape), param)
            elif rule in ("norm_weight", "bias_output", "bias_activation"):
                out[name] += shard_like(mean, param)
            elif rule == "bias_abs":
                out[name] += weight.abs()
        return out
