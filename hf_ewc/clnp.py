r"""CLNP — continual learning by neural pruning (Golkar, Kagan & Cho 2019), for MLP-style chains of `nn.Linear`.

The opposite road to EWC: every domain gets its own neurons. A *unit* is an output neuron of a hidden `nn.Linear`
(the last Linear of the chain is the shared head). After a domain is learned, [`CLNP.consolidate`]

1. measures each free unit's activity on the domain's data: the mean absolute value of its activation, read at the
   input of the next Linear (so after whatever activation the model applies);
2. chooses the largest threshold τ (relative to the layer's largest free-unit activity; the candidates are quantiles
   of those relative activities, see [`CLNP.thresholds`]) whose masked model keeps the domain's loss at most
   ``margin`` (in nats) above the unpruned one ("graceful forgetting"; an absolute margin, as a well-fitted domain's
   loss is near 0);
3. gives the units above τ to the domain and frees the others: their incoming weights are re-initialised (seeded),
   their biases and their outgoing weights set to 0 — so the model now computes exactly what the masked model did.

While a later domain trains ([`CLNP.callback`]), only free units learn: the rows (and biases) of free units; the head
(the last Linear) is per domain by default (``head="per_domain"``, task-incremental: each domain's head is stored when
it is consolidated and swapped in by ``clnp.domain(d)``, so a new domain trains the whole head and reads every old
unit), or shared (``head="shared"``: only its columns of free units learn, and its bias during the first domain).
Everything else is frozen: after every real optimizer step the frozen entries are restored from a snapshot taken at
the start of training, and their gradients are zeroed as they are formed (so neither gradient clipping nor Adam's
moments see them). The weights from free units into units that
already belong to a domain (*interference* weights) were set to 0 when those units were freed and stay 0; the weights
from old units into free ones are trainable (*reuse*, forward transfer).

With the domain known at inference (task-incremental), ``with clnp.domain(name): model(x)`` switches off the units of
later domains and the free ones, and the outputs of every earlier domain are bit-identical to what they were right
after it was consolidated (for activations with ``act(0) = 0``: ReLU, leaky ReLU, GELU, SiLU, tanh). Without the
domain (one shared head, all units on), later units add to the old domains' logits: that forgetting is measured, not
zero.

Sparsity during training (``l1``, optional): ``l1_target="activations"`` adds ``l1·mean|h|`` over the free units'
activations to the loss (as a gradient hook, scaled by 1/gradient_accumulation_steps like the loss); ``"weights"``
adds ``l1·sign(W)`` to the gradient of the free units' incoming weights once per optimizer step.

Reconstructed, not read from the paper (methods.md §7): the activity measure (mean absolute activation), the
threshold's scale (relative to the layer's largest free activity, one τ for all layers), the margin on the loss
(nats), and the re-initialisation of freed units. Transformer FFN neurons and attention heads are not built yet.
"""

import contextlib
import itertools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import TrainerCallback

from .utils import HfEwcError, atomic_path


CLNP_STATE_NAME = "clnp_state.safetensors"
L1_TARGETS = ("activations", "weights")


def linear_chain(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The model's `nn.Linear` modules in registration order, checked to form a chain (each one's input size is the
    previous one's output size); the last is the head."""
    chain = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(chain) < 2:
        raise HfEwcError(
            f"CLNP needs at least two nn.Linear layers (hidden units and a head); {type(model).__name__} has "
            f"{len(chain)}."
        )
    for (prev_name, prev), (name, layer) in itertools.pairwise(chain):
        if layer.in_features != prev.out_features:
            raise HfEwcError(
                f"CLNP allocates units of MLP-style chains of nn.Linear: {name!r} takes {layer.in_features} inputs "
                f"but {prev_name!r} gives {prev.out_features}. Transformer FFN neurons and heads are not built yet."
            )
    return chain


@dataclass
class CLNP:
    """Unit allocation over a chain of Linears: ``owners[k][i]`` is the index of the domain that owns unit i of hidden
    layer k, or -1 (free). See the module docstring."""

    model: nn.Module
    l1: float = 0.0
    l1_target: str = "activations"
    margin: float = 0.01
    threshold_steps: int = 32
    seed: int = 0
    head: str = "per_domain"
    domains: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise HfEwcError(f"clnp_margin must be a finite number >= 0, got {self.margin!r}.")
        if not (math.isfinite(self.l1) and self.l1 >= 0):
            raise HfEwcError(f"clnp_l1 must be a finite number >= 0, got {self.l1!r}.")
        if self.head not in ("per_domain", "shared"):
            raise HfEwcError(f"Unknown CLNP head {self.head!r}; choose one of: per_domain, shared.")
        if self.l1_target not in L1_TARGETS:
            raise HfEwcError(f"Unknown clnp_l1_target {self.l1_target!r}; choose one of: {', '.join(L1_TARGETS)}.")
        self.chain = linear_chain(self.model)
        self.names = [n for n, _ in self.chain]
        self.owners = [torch.full((m.out_features,), -1, dtype=torch.int32) for _, m in self.chain[:-1]]
        self.heads: list[dict[str, Tensor]] = []  # per domain: the head's parameters when it was consolidated

    # ------------------------------------------------------------------ masks
    def _param_names(self, k: int) -> tuple[str, str | None]:
        prefix = f"{self.names[k]}." if self.names[k] else ""
        return prefix + "weight", (prefix + "bias" if self.chain[k][1].bias is not None else None)

    def trainable_masks(self) -> dict[str, Tensor]:
        """``True`` where a parameter entry may change while the next domain trains (see the module docstring)."""
        masks = {}
        for k, (_, layer) in enumerate(self.chain):
            weight, bias = self._param_names(k)
            if k < len(self.owners):  # a hidden layer: the rows of its free units
                free = self.owners[k] < 0
                masks[weight] = free.unsqueeze(1).expand_as(layer.weight).clone()
                if bias is not None:
                    masks[bias] = free.clone()
            elif self.head == "per_domain":  # each domain trains (and keeps) its own head
                masks[weight] = torch.ones_like(layer.weight, dtype=torch.bool)
                if bias is not None:
                    masks[bias] = torch.ones_like(layer.bias, dtype=torch.bool)
            else:  # a shared head: the columns of the last hidden layer's free units; its bias before any domain
                free = self.owners[k - 1] < 0
                masks[weight] = free.unsqueeze(0).expand_as(layer.weight).clone()
                if bias is not None:
                    masks[bias] = torch.full_like(layer.bias, not self.domains, dtype=torch.bool)
        return masks

    def free_units(self) -> list[int]:
        return [int((o < 0).sum()) for o in self.owners]

    # ------------------------------------------------------------------ inference
    @contextlib.contextmanager
    def domain(self, name: str | int | None) -> Iterator[None]:
        """Switch off the units of later domains and the free ones (``None``: only the free ones)."""
        index = self._index(name) if name is not None else len(self.domains) - 1
        hooks = []
        head = self.chain[-1][1]
        saved = None
        if self.head == "per_domain" and self.heads:
            saved = {n: p.detach().clone() for n, p in head.named_parameters()}
            with torch.no_grad():
                for n, p in head.named_parameters():
                    p.copy_(self.heads[index][n].to(p.device, p.dtype))
        for k, (_, layer) in enumerate(self.chain[:-1]):
            off = (self.owners[k] < 0) | (self.owners[k] > index)
            if bool(off.any()):
                keep = (~off).to(layer.weight.dtype)

                def hook(module, args, output, keep=keep):
                    return output * keep.to(output.device)

                hooks.append(layer.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            if saved is not None:
                with torch.no_grad():
                    for n, p in head.named_parameters():
                        p.copy_(saved[n])

    def _index(self, name: str | int) -> int:
        if isinstance(name, int) and 0 <= name < len(self.domains):
            return name
        if name in self.domains:
            return self.domains.index(name)
        raise HfEwcError(f"CLNP has no domain {name!r}; it has: {', '.join(self.domains) or 'none yet'}.")

    # ------------------------------------------------------------------ consolidation
    @torch.no_grad()
    def activity(self, batches) -> list[Tensor]:
        """Mean |activation| of every unit of every hidden layer over ``batches`` (dicts of model inputs), read at the
        input of the next Linear."""
        sums = [torch.zeros(len(o), dtype=torch.float64) for o in self.owners]
        count = [0]
        hooks = []
        for k, (_, layer) in enumerate(self.chain[1:]):

            def pre_hook(module, args, k=k):
                a = args[0].detach().abs().double().reshape(-1, args[0].shape[-1])
                sums[k] += a.sum(0).cpu()
                if k == 0:
                    count[0] += a.shape[0]

            hooks.append(layer.register_forward_pre_hook(pre_hook))
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches:
                self.model(**batch)
        finally:
            self.model.train(was_training)
            for h in hooks:
                h.remove()
        return [s / max(count[0], 1) for s in sums]

    @torch.no_grad()
    def _loss(self, batches, keep: list[Tensor] | None) -> float:
        hooks = []
        if keep is not None:
            for k, (_, layer) in enumerate(self.chain[:-1]):
                factor = keep[k].to(layer.weight.dtype)
                hooks.append(layer.register_forward_hook(lambda m, a, o, f=factor: o * f.to(o.device)))
        total, n = 0.0, 0
        try:
            for batch in batches:
                out = self.model(**batch)
                loss = out["loss"] if isinstance(out, dict) else out.loss
                total += float(loss) * len(next(iter(batch.values())))
                n += len(next(iter(batch.values())))
        finally:
            for h in hooks:
                h.remove()
        return total / max(n, 1)

    @torch.no_grad()
    def consolidate(self, batches, *, domain: str) -> dict[str, Any]:
        """Allocate units to ``domain`` (just trained) on ``batches`` (a list of input dicts with labels, also used to
        measure the loss) and free the rest; returns the per-layer diagnostics (also appended to ``history``)."""
        if domain in self.domains:
            raise HfEwcError(f"CLNP already has a domain named {domain!r}; give each domain its own name.")
        batches = list(batches)
        if not batches:
            raise HfEwcError("CLNP consolidation needs data of the domain just learned (no batches given).")
        index = len(self.domains)
        activity = self.activity(batches)
        was_training = self.model.training
        self.model.eval()
        try:
            old = [o >= 0 for o in self.owners]
            full = self._loss(batches, [o | (self.owners[k] < 0) for k, o in enumerate(old)])
            chosen, loss = 0.0, full
            candidates = self.thresholds(activity)
            for i, tau in enumerate(candidates):
                value = self._loss(batches, self._keep(activity, tau))
                if value <= full + self.margin or i == len(candidates) - 1:
                    chosen, loss = tau, value
                    break
        finally:
            self.model.train(was_training)
        keep = self._keep(activity, chosen)
        new = [keep[k] & (o < 0) for k, o in enumerate(self.owners)]
        layers = {}
        for k, (name, _) in enumerate(self.chain[:-1]):
            layers[name] = {
                "active": int(new[k].sum()),
                "reused": self._reused(k, new[k]) if k > 0 else 0,
                "free": int(((self.owners[k] < 0) & ~new[k]).sum()),
                "total": len(self.owners[k]),
            }
        for k, units in enumerate(new):
            self.owners[k][units] = index
        self._free_the_rest(index)
        self.heads.append({n: p.detach().clone().cpu() for n, p in self.chain[-1][1].named_parameters()})
        self.domains.append(domain)
        entry = {"domain": domain, "threshold": chosen, "loss_unpruned": full, "loss_kept": loss, "layers": layers}
        self.history.append(entry)
        return entry

    def thresholds(self, activity: list[Tensor]) -> list[float]:
        """Candidate thresholds, largest first: the quantiles ``q = 1, 1 − 1/steps, …, 0`` of the free units'
        activities relative to their layer's largest (pooled over layers), then 0 — so the grid follows the
        distribution, and the last candidate only switches off units whose activity is exactly 0."""
        pool = []
        for k, act in enumerate(activity):
            free = self.owners[k] < 0
            top = float(act[free].max()) if bool(free.any()) else 0.0
            if top > 0:
                pool.append((act[free] / top).double())
        if not pool:
            return [0.0]
        values = torch.cat(pool)
        grid = torch.linspace(1, 0, self.threshold_steps + 1, dtype=torch.float64)
        taus = sorted({float(torch.quantile(values, q)) for q in grid} | {0.0}, reverse=True)
        return taus

    def _keep(self, activity: list[Tensor], tau: float) -> list[Tensor]:
        """Units that stay on at relative threshold τ: every owned unit, and free units above τ·max free activity."""
        keep = []
        for k, act in enumerate(activity):
            free = self.owners[k] < 0
            top = float(act[free].max()) if bool(free.any()) else 0.0
            keep.append(~free | (act > tau * top) if top > 0 else ~free)
        return keep

    def _reused(self, k: int, new: Tensor) -> int:
        """Units of earlier domains in layer k−1 that the domain's new units of layer k read (a nonzero weight)."""
        weight = self.chain[k][1].weight.detach()
        old = self.owners[k - 1] >= 0
        if not bool(new.any()) or not bool(old.any()):
            return 0
        return int((weight[new][:, old] != 0).any(0).sum())

    def _free_the_rest(self, index: int) -> None:
        generator = torch.Generator().manual_seed(self.seed * 7919 + index)
        for k, (_, layer) in enumerate(self.chain[:-1]):
            free = self.owners[k] < 0
            if not bool(free.any()):
                continue
            fresh = torch.empty(int(free.sum()), layer.in_features)
            bound = 1 / math.sqrt(layer.in_features)  # nn.Linear's own default initialisation range
            fresh.uniform_(-bound, bound, generator=generator)
            layer.weight[free] = fresh.to(layer.weight.device, layer.weight.dtype)
            if layer.bias is not None:
                layer.bias[free] = 0
            nxt = self.chain[k + 1][1]
            nxt.weight[:, free] = 0  # no free unit feeds anything: interference weights into owned units are 0

    # ------------------------------------------------------------------ training
    def callback(self, gradient_accumulation_steps: int = 1) -> "CLNPCallback":
        """The `TrainerCallback` that trains the next domain on the free units only (any `transformers.Trainer`)."""
        return CLNPCallback(self, gradient_accumulation_steps)

    def check_capacity(self) -> None:
        """Refuse to train a new domain on a layer with no free unit left."""
        for k, name in enumerate(self.names[:-1]):
            if not bool((self.owners[k] < 0).any()):
                raise HfEwcError(
                    f"CLNP has no free unit left in layer {name!r} ({len(self.owners[k])} units, all owned by "
                    f"{len(self.domains)} domain(s)): raise clnp_margin or clnp_l1 so that domains keep fewer units, "
                    "or widen the layer."
                )

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> None:
        tensors = {f"owners.{name}": o.contiguous() for name, o in zip(self.names, self.owners)}
        tensors.update({f"head.{d}.{n}": t.contiguous() for d, head in enumerate(self.heads) for n, t in head.items()})
        meta = {
            "domains": self.domains, "history": self.history, "l1": self.l1, "l1_target": self.l1_target,
            "margin": self.margin, "layers": self.names, "head": self.head,
        }  # fmt: skip

        os.makedirs(directory, exist_ok=True)
        with atomic_path(os.path.join(directory, CLNP_STATE_NAME)) as tmp:
            save_file(tensors, tmp, metadata={"hf_ewc_clnp": json.dumps(meta)})

    @classmethod
    def load(cls, model: nn.Module, directory: str | os.PathLike) -> "CLNP":
        """The allocation saved by [`CLNP.save`], checked against ``model`` (layer names and sizes)."""
        path = os.path.join(directory, CLNP_STATE_NAME)
        if not os.path.isfile(path):
            raise HfEwcError(f"No CLNP state in {str(directory)!r} (expected {CLNP_STATE_NAME}).")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = json.loads((f.metadata() or {})["hf_ewc_clnp"])
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        except Exception as err:  # corrupt file or header
            raise HfEwcError(f"Cannot read the CLNP state {path!r}: {err}.") from err
        owners = {k.partition(".")[2]: v for k, v in tensors.items() if k.startswith("owners.")}
        clnp = cls(model, l1=meta["l1"], l1_target=meta["l1_target"], margin=meta["margin"], head=meta["head"])
        if meta["layers"] != clnp.names:
            raise HfEwcError(f"{path} allocates units of layers {meta['layers']}, but the model's are {clnp.names}.")
        for k, name in enumerate(clnp.names[:-1]):
            got = owners.get(name)
            if got is None or got.shape != clnp.owners[k].shape or int(got.max()) >= len(meta["domains"]):
                raise HfEwcError(f"{path}: the unit owners of layer {name!r} do not fit the model or the domains.")
            clnp.owners[k] = got.to(torch.int32)
        clnp.domains, clnp.history = list(meta["domains"]), list(meta["history"])
        if clnp.head == "per_domain":
            shapes = {n: tuple(p.shape) for n, p in clnp.chain[-1][1].named_parameters()}
            for d in range(len(clnp.domains)):
                head = {n: tensors.get(f"head.{d}.{n}") for n in shapes}
                if any(t is None or tuple(t.shape) != shapes[n] for n, t in head.items()):
                    raise HfEwcError(f"{path}: the head of domain {clnp.domains[d]!r} is missing or does not fit.")
                clnp.heads.append(head)
        return clnp


class CLNPCallback(TrainerCallback):
    """Trains only the free units of a [`CLNP`] allocation (see the module docstring): snapshot on ``on_train_begin``,
    gradients of frozen entries zeroed (and L1 on weights added) before each optimizer step, frozen entries restored
    after it, L1 on activations through gradient hooks."""

    def __init__(self, clnp: CLNP, gradient_accumulation_steps: int = 1):
        self.clnp = clnp
        self.accumulation = gradient_accumulation_steps
        self._bound: list[tuple[Tensor, Tensor, Tensor]] = []  # (parameter, trainable mask, snapshot)
        self._hooks = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.clnp.check_capacity()
        self.accumulation = args.gradient_accumulation_steps
        params = dict(self.clnp.model.named_parameters())
        head = self.clnp._param_names(len(self.clnp.chain) - 1)[0]
        self._bound, self._l1_weights = [], []
        for name, mask in self.clnp.trainable_masks().items():
            p = params[name]
            mask = mask.to(p.device)
            self._bound.append((p, mask, p.detach().clone()))
            # frozen entries get no gradient at all: not in the clipping norm, not in Adam's moments
            self._hooks.append(p.register_hook(lambda grad, m=mask: grad * m.to(grad.dtype)))
            if p.ndim == 2 and name != head:
                self._l1_weights.append((p, mask))
        if self.clnp.l1 > 0 and self.clnp.l1_target == "activations":
            for k, (_, layer) in enumerate(self.clnp.chain[1:]):
                free = (self.clnp.owners[k] < 0).float()
                self._hooks.append(layer.register_forward_pre_hook(self._l1_hook(free)))

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
