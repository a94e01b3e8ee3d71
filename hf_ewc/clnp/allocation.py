r"""CLNP — continual learning by neural pruning (Golkar, Kagan & Cho 2019).

The opposite road to EWC: every domain gets its own units (see [`hf_ewc.clnp.units`]): the output neurons of the
hidden Linears of an MLP chain (its last Linear is the head), or the FFN neurons and attention heads of a transformer's
blocks. After a domain is learned, [`CLNP.consolidate`]

1. measures each free unit's activity on the domain's data: the mean absolute value of its activation, read at the
   input of the module that consumes it (so after whatever activation the model applies);
2. chooses the largest threshold τ (relative to the layer's largest free-unit activity; the candidates are quantiles
   of those relative activities, see [`CLNP.thresholds`]) whose masked model keeps the domain's loss at most
   ``margin`` (in nats) above the unpruned one ("graceful forgetting"; an absolute margin, as a well-fitted domain's
   loss is near 0);
3. gives the units above τ to the domain and frees the others: their incoming weights are re-initialised (seeded),
   their biases and their outgoing weights set to 0 — so the model now computes exactly what the masked model did.

While a later domain trains ([`CLNP.callback`]), only free units learn: their incoming weights and biases, and the
weights that read them (for an MLP chain, a free unit also reads the old units: *reuse*). Parameters of no unit
(embeddings, norms, shared key/value projections, output biases, a transformer's LM head) train during the first
domain only. An MLP chain's head (the last Linear) is per domain by default (``head="per_domain"``,
task-incremental: each domain's head is stored when it is consolidated and swapped in by ``clnp.domain(d)``, so a new
domain trains the whole head and reads every old unit), or shared (``head="shared"``: only its columns of free units
learn, and its bias during the first domain).
Everything else is frozen: after every real optimizer step the frozen entries are restored from a snapshot taken at
the start of training, and their gradients are zeroed as they are formed (so neither gradient clipping nor Adam's
moments see them). In an MLP chain the weights from free units into units that already belong to a domain
(*interference* weights) were set to 0 when those units were freed and stay 0.

With the domain known at inference (task-incremental), ``with clnp.domain(name): model(x)`` switches off the units of
later domains and the free ones, and the outputs of every earlier domain are bit-identical to what they were right
after it was consolidated. Without the domain (all units on), later units add to the old domains' outputs: that
forgetting is measured, not zero.

Sparsity during training (``l1``, optional): ``l1_target="activations"`` adds ``l1·mean|h|`` over the free units'
activations to the loss (as a gradient hook, scaled by 1/gradient_accumulation_steps like the loss); ``"weights"``
adds ``l1·sign(W)`` to the gradient of the free units' incoming weights once per optimizer step.

Reconstructed, not read from the paper (methods.md §7): the activity measure (mean absolute activation), the
threshold's scale (relative to the layer's largest free activity, one τ for all layers), the margin on the loss
(nats), the re-initialisation of freed units, and for transformers the choice of units (FFN neurons and query heads;
everything else shared and frozen after the first domain).
"""

import contextlib
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

from ..utils import HfEwcError, atomic_path, logger
from .training import CLNPCallback
from .units import UnitGroup, expand, unit_groups


CLNP_STATE_NAME = "clnp_state.safetensors"
L1_TARGETS = ("activations", "weights")
HEADS = ("per_domain", "shared")


def _tap_hook(group: UnitGroup, factor: Tensor):
    """A forward pre-hook multiplying the tap's input features by ``factor`` (one value per unit)."""
    per_feature = group.features(factor)

    def pre_hook(module, args):
        x = args[0]
        return (x * per_feature.to(x.device, x.dtype), *args[1:])

    return pre_hook


@torch.no_grad()
def measure_activity(model: nn.Module, groups: list[UnitGroup], batches) -> list[Tensor]:
    """Mean |activation| of every unit of ``groups`` over ``batches`` and positions, read at each group's tap."""
    sums = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
    rows = [0] * len(groups)
    hooks = []
    for k, group in enumerate(groups):

        def pre_hook(module, args, k=k, group=group):
            x = args[0].detach().abs().double().reshape(-1, group.size, group.width).mean(-1)
            sums[k] += x.sum(0).cpu()
            rows[k] += x.shape[0]

        hooks.append(group.tap.register_forward_pre_hook(pre_hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return [s / max(n, 1) for s, n in zip(sums, rows)]


@torch.no_grad()
def masked_loss(model: nn.Module, groups: list[UnitGroup], batches, keep: list[Tensor] | None) -> float:
    """The mean loss over ``batches`` (per sample) with only the ``keep`` units of each group on."""
    hooks = []
    if keep is not None:
        for group, units in zip(groups, keep):
            hooks.append(group.tap.register_forward_pre_hook(_tap_hook(group, units.float())))
    total, n = 0.0, 0
    try:
        for batch in batches:
            out = model(**batch)
            loss = out["loss"] if isinstance(out, dict) else out.loss
            size = len(next(iter(batch.values())))
            total += float(loss) * size
            n += size
    finally:
        for h in hooks:
            h.remove()
    return total / max(n, 1)


def _check_capacity(clnp: "CLNP") -> None:
    """Refuse to train a new domain when no layer has a free unit left — or, in an MLP chain with a shared head, when
    its last hidden layer has none (nothing new would reach the head); name the full layers otherwise (the new domain
    reads their units but cannot add to them)."""
    names = clnp.names
    full = [n for n, o in zip(names, clnp.owners) if not bool((o < 0).any())]

    def describe(layers: list[str]) -> str:
        return ", ".join(f"{n!r} ({clnp.groups[names.index(n)].size} units)" for n in layers)

    advice = "raise clnp_margin or clnp_l1 so that domains keep fewer units, or widen the layers"
    blocked = clnp.kind == "mlp" and clnp.head == "shared" and names[-1] in full
    if blocked or len(full) == len(names):
        shown = full if len(full) == len(names) else [names[-1]]
        why = "" if len(full) == len(names) else " (the shared head reads only that layer's units)"
        raise HfEwcError(
            f"CLNP has no free unit left in {describe(shown)}, all owned by {len(clnp.domains)} domain(s){why}: "
            f"{advice}."
        )
    if full:
        logger.warning(f"CLNP: no free unit left in {describe(full)}; the next domain trains the other layers' "
                       f"({advice}).")  # fmt: skip


@dataclass
class CLNP:
    """Unit allocation: ``owners[g][u]`` is the index of the domain that owns unit u of group g, or -1 (free). See the
    module docstring."""

    model: nn.Module
    l1: float = 0.0
    l1_target: str = "activations"
    margin: float = 0.1
    threshold_steps: int = 32
    seed: int = 0
    head: str | None = None  # "per_domain" (MLP chains' default) or "shared" (transformers: the only choice)
    domains: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        self.configure()
        self.groups, self.head_name, self.kind = unit_groups(self.model)
        if self.head is None:
            self.head = "per_domain" if self.kind == "mlp" else "shared"
        if self.head not in HEADS:
            raise HfEwcError(f"Unknown CLNP head {self.head!r}; choose one of: {', '.join(HEADS)}.")
        if self.head == "per_domain" and self.head_name is None:
            raise HfEwcError(
                "A transformer's output head is shared by its domains (tied to the embeddings in most LMs): use "
                "head='shared'."
            )
        self.names = [g.name for g in self.groups]
        self.owners = [torch.full((g.size,), -1, dtype=torch.int32) for g in self.groups]
        self.heads: list[dict[str, Tensor]] = []  # per domain: the head's parameters when it was consolidated

    def configure(self, **settings: Any) -> "CLNP":
        """Set (and check) ``l1``, ``l1_target``, ``margin`` or ``seed`` — what a domain may change when it continues
        an allocation (the units, the head kind and the domains stay)."""
        for key, value in settings.items():
            if key not in ("l1", "l1_target", "margin", "seed"):
                raise HfEwcError(f"CLNP.configure takes l1, l1_target, margin or seed, not {key!r}.")
            setattr(self, key, value)
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise HfEwcError(f"clnp_margin must be a finite number >= 0, got {self.margin!r}.")
        if not (math.isfinite(self.l1) and self.l1 >= 0):
            raise HfEwcError(f"clnp_l1 must be a finite number >= 0, got {self.l1!r}.")
        if self.l1_target not in L1_TARGETS:
            raise HfEwcError(f"Unknown clnp_l1_target {self.l1_target!r}; choose one of: {', '.join(L1_TARGETS)}.")
        return self

    def _head_params(self) -> dict[str, nn.Parameter]:
        if self.head != "per_domain":
            return {}
        return {f"{self.head_name}.{n}": p for n, p in self.model.get_submodule(self.head_name).named_parameters()}

    # ------------------------------------------------------------------ masks
    def trainable_masks(self) -> dict[str, Tensor]:
        """``True`` where a parameter entry may change while the next domain trains: a producer entry iff its unit is
        free; else a consumer entry iff the unit it reads is free; else (a parameter of no unit) only before the first
        domain; a per-domain head always."""
        params = dict(self.model.named_parameters())
        masks = {n: torch.full(p.shape, not self.domains, dtype=torch.bool) for n, p in params.items()}
        decided = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in params.items()}
        for role in ("producer", "consumer"):
            for group, owners in zip(self.groups, self.owners):
                free = owners < 0
                for entry in group.slices:
                    if entry.role != role or entry.name not in params:
                        continue
                    shape = params[entry.name].shape
                    inside = expand(group.covered(entry, shape[entry.dim]), shape, entry.dim) & ~decided[entry.name]
                    value = expand(group.along(entry, free, shape[entry.dim], False), shape, entry.dim)
                    masks[entry.name] = torch.where(inside, value, masks[entry.name])
                    decided[entry.name] |= inside
        for name in self._head_params():
            masks[name] = torch.ones_like(masks[name])
        return masks

    def free_units(self) -> list[int]:
        return [int((o < 0).sum()) for o in self.owners]

    # ------------------------------------------------------------------ inference
    @contextlib.contextmanager
    def domain(self, name: str | int | None) -> Iterator[None]:
        """Switch off the units of later domains and the free ones (``None``: only the free ones) and, with per-domain
        heads, swap in the domain's head."""
        index = self.index(name) if name is not None else len(self.domains) - 1
        hooks, saved, head = [], None, self._head_params()
        if head and self.heads:
            saved = {n: p.detach().clone() for n, p in head.items()}
            with torch.no_grad():
                for n, p in head.items():
                    p.copy_(self.heads[index][n].to(p.device, p.dtype))
        for group, owners in zip(self.groups, self.owners):
            keep = ((owners >= 0) & (owners <= index)).float()
            if not bool(keep.all()):
                hooks.append(group.tap.register_forward_pre_hook(_tap_hook(group, keep)))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            if saved is not None:
                with torch.no_grad():
                    for n, p in head.items():
                        p.copy_(saved[n])

    def index(self, name: str | int) -> int:
        """The position of domain ``name`` (or of index ``name``) in the sequence."""
        if isinstance(name, int) and 0 <= name < len(self.domains):
            return name
        if name in self.domains:
            return self.domains.index(name)
        raise HfEwcError(f"CLNP has no domain {name!r}; it has: {', '.join(self.domains) or 'none yet'}.")

    def used_by(self, name: str | int) -> list[Tensor]:
        """Per group, the units domain ``name`` computes with: those of every domain up to it."""
        index = self.index(name)
        return [(o >= 0) & (o <= index) for o in self.owners]

    @torch.no_grad()
    def isolate(self, name: str | int) -> None:
        """Zero the incoming and outgoing entries of every unit domain ``name`` does not use (later domains' and free
        ones) and, with per-domain heads, put its head in place: the model then computes what ``domain(name)``
        does, with no hook (what a per-domain export saves)."""
        params = dict(self.model.named_parameters())
        for group, used in zip(self.groups, self.used_by(name)):
            for entry in (e for e in group.slices if e.name in params):
                p = params[entry.name]
                unused = expand(group.along(entry, ~used, p.shape[entry.dim], False), p.shape, entry.dim)
                p.masked_fill_(unused.to(p.device), 0)
        for n, p in self._head_params().items():
            p.copy_(self.heads[self.index(name)][n].to(p.device, p.dtype))

    # ------------------------------------------------------------------ consolidation
    def activity(self, batches) -> list[Tensor]:
        """Mean |activation| of every unit over ``batches`` (dicts of model inputs) and positions, read at the tap."""
        return measure_activity(self.model, self.groups, batches)

    def _loss(self, batches, keep: list[Tensor] | None) -> float:
        return masked_loss(self.model, self.groups, batches, keep)

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
        for k, group in enumerate(self.groups):
            layers[group.name] = {
                "active": int(new[k].sum()),
                "reused": self._reused(k, new[k]),
                "free": int(((self.owners[k] < 0) & ~new[k]).sum()),
                "total": group.size,
            }
        for k, units in enumerate(new):
            self.owners[k][units] = index
        self._free_the_rest(index)
        self.heads += (
            [{n: p.detach().clone().cpu() for n, p in self._head_params().items()}] if self._head_params() else []
        )
        self.domains.append(domain)
        entry = {"domain": domain, "threshold": chosen, "loss_unpruned": full, "loss_kept": loss,
                 "margin": self.margin, "l1": self.l1, "l1_target": self.l1_target, "layers": layers}  # fmt: skip
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

    def _reused(self, k: int, new: Tensor) -> int | None:
        """MLP chains: units of earlier domains in the previous layer that the domain's new units read (a nonzero
        weight). None for transformer blocks, whose units all read the shared residual stream."""
        if self.kind != "mlp" or k == 0:
            return None if self.kind != "mlp" else 0
        weight = self.model.get_submodule(self.groups[k].name).weight.detach()
        old = self.owners[k - 1] >= 0
        if not bool(new.any()) or not bool(old.any()):
            return 0
        return int((weight[new][:, old] != 0).any(0).sum())

    @torch.no_grad()
    def _free_the_rest(self, index: int) -> None:
        """Freed units: outgoing (consumer) entries 0 first, then incoming weights re-initialised (±1/√fan_in, seeded)
        and biases 0 — so a free unit reading a free unit starts random, an owned unit never reads a free one."""
        generator = torch.Generator().manual_seed(self.seed * 7919 + index)
        params = dict(self.model.named_parameters())
        for role in ("consumer", "producer"):
            for group, owners in zip(self.groups, self.owners):
                free = owners < 0
                if not bool(free.any()):
                    continue
                for entry in (e for e in group.slices if e.role == role and e.name in params):
                    p = params[entry.name]
                    inside = expand(group.along(entry, free, p.shape[entry.dim], False), p.shape, entry.dim)
                    if role == "consumer" or p.ndim == 1:
                        p.masked_fill_(inside.to(p.device), 0)
                        continue
                    bound = 1 / math.sqrt(entry.fan_in)  # nn.Linear's own initialisation range
                    fresh = torch.empty(p.shape).uniform_(-bound, bound, generator=generator)
                    p.copy_(torch.where(inside.to(p.device), fresh.to(p.device, p.dtype), p))

    # ------------------------------------------------------------------ training
    def callback(self, gradient_accumulation_steps: int = 1) -> CLNPCallback:
        """The `TrainerCallback` that trains the next domain on the free units only (any `transformers.Trainer`)."""
        return CLNPCallback(self, gradient_accumulation_steps)

    def check_capacity(self) -> None:
        """Refuse a new domain that could train nothing (see `_check_capacity`); warn about full layers."""
        _check_capacity(self)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> None:
        tensors = {f"owners.{name}": o.contiguous() for name, o in zip(self.names, self.owners)}
        tensors.update({f"head.{d}.{n}": t.contiguous() for d, head in enumerate(self.heads) for n, t in head.items()})
        meta = {
            "domains": self.domains, "history": self.history, "l1": self.l1, "l1_target": self.l1_target,
            "margin": self.margin, "layers": self.names, "head": self.head, "seed": self.seed,
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
        clnp = cls(model, l1=meta["l1"], l1_target=meta["l1_target"], margin=meta["margin"], head=meta["head"],
                   seed=meta.get("seed", 0))  # fmt: skip
        if meta["layers"] != clnp.names:
            raise HfEwcError(f"{path} allocates units of layers {meta['layers']}, but the model's are {clnp.names}.")
        for k, name in enumerate(clnp.names):
            got = owners.get(name)
            if got is None or got.shape != clnp.owners[k].shape or int(got.max()) >= len(meta["domains"]):
                raise HfEwcError(f"{path}: the unit owners of layer {name!r} do not fit the model or the domains.")
            clnp.owners[k] = got.to(torch.int32)
        clnp.domains, clnp.history = list(meta["domains"]), list(meta["history"])
        if clnp.head == "per_domain":
            shapes = {n: tuple(p.shape) for n, p in clnp._head_params().items()}
            for d in range(len(clnp.domains)):
                head = {n: tensors.get(f"head.{d}.{n}") for n in shapes}
                if any(t is None or tuple(t.shape) != shapes[n] for n, t in head.items()):
                    raise HfEwcError(f"{path}: the head of domain {clnp.domains[d]!r} is missing or does not fit.")
                clnp.heads.append(head)
        return clnp
