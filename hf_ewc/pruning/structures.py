"""Structured pruning: whole FFN neurons and attention heads, the same number in every block.

The architectures come from the layout tables of `hf_ewc.models` (``FFN_LAYOUTS``, ``ATTENTION_LAYOUTS``). A unit's
weights are listed as [`UnitSlice`]s; its score is the sum of its weights' scores. FFN neurons are removed from the
shapes and the config's width key updated, so ``from_pretrained`` rebuilds the smaller model; heads are removed when
the config can say so (an explicit ``head_dim`` and a head count its class accepts), zeroed and kept at zero
otherwise.
"""

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models import ATTENTION_LAYOUTS, FFN_LAYOUTS, attention_layout, ffn_layout, find_blocks, is_conv1d, neuron_dim
from ..utils import HfEwcError
from .masks import check_coverage, score
from .report import num_parameters


@dataclass
class UnitSlice:
    """One tensor of a unit-structured layer: along ``dim``, unit u owns ``o + u·size … o + (u + 1)·size − 1`` for
    every offset o (GPT-2's fused q/k/v has three)."""

    name: str
    module: nn.Module
    attr: str  # "weight" or "bias"
    dim: int
    offsets: tuple[int, ...] = (0,)

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    def indices(self, units: list[int], size: int) -> list[int]:
        """The indices along ``dim`` that ``units`` own."""
        return [o + u * size + d for o in self.offsets for u in units for d in range(size)]


@dataclass
class StructuredResult:
    """What [`prune_ffn`] / [`prune_heads`] did: the original shapes, the kept indices of removed rows/columns
    (``slices``: name → (dim, kept indices)), the masks of zeroed structures, and the report's ``structured`` entry."""

    originals: dict[str, list[int]]
    params_before: int
    removal: str  # "physical" or "zeroed"
    structured: dict[str, Any]
    slices: dict[str, tuple[int, Tensor]] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)


def _projection(prefix: str, module: nn.Module, role: str, *, bias: bool, offsets=(0,)) -> list[UnitSlice]:
    """The weight (and, with ``bias``, the bias) of a projection into the units (``role="in"``) or out of them."""
    out = [UnitSlice(f"{prefix}.weight", module, "weight", neuron_dim(module, role), offsets)]
    if bias and getattr(module, "bias", None) is not None:
        out.append(UnitSlice(f"{prefix}.bias", module, "bias", 0, offsets))
    return out


def _unit_scores(slices: list[UnitSlice], criterion: str, importances, units: int, size: int) -> Tensor:
    """Score of each of ``units`` structures: the sum of its weights' scores."""
    total = torch.zeros(units)
    for entry in slices:
        s = score(entry.name, entry.param, criterion, importances).movedim(entry.dim, 0)
        for o in entry.offsets:
            total += s[o : o + units * size].reshape(units, -1).sum(1)
    return total


def _resize(entry: UnitSlice, keep: Tensor) -> None:
    """Keep the ``keep`` indices of the tensor along its dim, updating the module's size attributes."""
    module, old = entry.module, entry.param
    new = nn.Parameter(
        old.detach().index_select(entry.dim, keep.to(old.device)).clone(), requires_grad=old.requires_grad
    )
    setattr(module, entry.attr, new)
    if entry.attr != "weight":
        return
    if is_conv1d(module):
        module.nx, module.nf = new.shape
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = new.shape


def _check(slices: list[UnitSlice], importances: Mapping[str, Tensor] | None) -> dict[str, list[int]]:
    if importances is not None:
        check_coverage(importances, {e.name: e.param for e in slices})
    return {e.name: list(e.param.shape) for e in slices}


@torch.no_grad()
def prune_ffn(model: nn.Module, sparsity: float, criterion: str, importances, show_progress: bool) -> StructuredResult:
    """Remove the same share of FFN neurons from every block (those with the lowest summed scores)."""
    prefix, blocks = find_blocks(model)
    layout = ffn_layout(blocks[0])
    if layout is None:
        known = "; ".join(f"{lay.family} ({', '.join(lay.inputs + lay.outputs)})" for lay in FFN_LAYOUTS)
        raise HfEwcError(
            f"structure 'ffn' does not know the FFN of {type(model).__name__}; it knows: {known}. Use unstructured "
            "or N:M pruning."
        )
    first = blocks[0].get_submodule(layout.inputs[0])
    width = first.nf if is_conv1d(first) else first.out_features
    removed = round(sparsity * width)
    if removed >= width:
        raise HfEwcError(f"sparsity {sparsity} would remove all {width} FFN neurons of a layer; choose less.")
    plan = []
    for i, block in enumerate(blocks):
        slices = [
            entry
            for role, paths in (("in", layout.inputs), ("out", layout.outputs))
            for path in paths
            for entry in _projection(f"{prefix}.{i}.{path}", block.get_submodule(path), role, bias=role == "in")
        ]
        plan.append(slices)
    originals = _check([e for slices in plan for e in slices], importances)
    result = StructuredResult(originals, num_parameters(model), "physical", {})
    kept_per_layer = []
    for slices in tqdm(plan, desc="scoring FFN neurons", disable=not show_progress):
        scores = _unit_scores(slices, criterion, importances, width, 1)
        keep = torch.sort(torch.argsort(scores, descending=True, stable=True)[: width - removed]).values
        kept_per_layer.append(keep.tolist())
        for entry in slices:
            _resize(entry, keep)
            result.slices[entry.name] = (entry.dim, keep)
    setattr(model.config, layout.width_key, width - removed)
    result.structured = {
        "unit": "ffn neuron",
        "config": {layout.width_key: [width, width - removed]},
        "per_layer": {"width": width, "removed": removed, "kept": width - removed},
        "removed_indices": {str(i): sorted(set(range(width)) - set(kept)) for i, kept in enumerate(kept_per_layer)},
    }
    return result


def accepts_head_count(config, heads: int, kv_heads: int) -> bool:
    """Whether ``config``'s class accepts ``heads`` query and ``kv_heads`` key/value heads (Llama's, for one, wants
    a count that divides hidden_size; Qwen3's does not care)."""
    trial = copy.deepcopy(config)
    trial.num_attention_heads, trial.num_key_value_heads = heads, kv_heads
    validate = getattr(trial, "validate", None)
    try:
        if validate is not None:
            validate()
    except Exception:  # noqa: BLE001 - each config class raises its own kind of validation error
        return False
    return True


@torch.no_grad()
def prune_heads(
    model: nn.Module, sparsity: float, criterion: str, importances, show_progress: bool
) -> StructuredResult:
    """Remove (or zero) the same share of attention heads from every block; under grouped-query attention the same
    number of query heads leaves every key/value group."""
    prefix, blocks = find_blocks(model)
    layout = attention_layout(blocks[0])
    if layout is None:
        known = ", ".join(lay.family for lay in ATTENTION_LAYOUTS)
        raise HfEwcError(f"structure 'heads' does not know the attention of {type(model).__name__}; it knows {known}.")
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    groups = heads // kv_heads
    per_group = 0
    if groups > 1:
        per_group = round(sparsity * groups)
        removed = per_group * kv_heads
        if per_group >= groups:
            raise HfEwcError(f"sparsity {sparsity} would remove every query head of a key/value group; choose less.")
    else:
        removed = round(sparsity * heads)
        if removed >= heads:
            raise HfEwcError(f"sparsity {sparsity} would remove all {heads} heads of a layer; choose less.")
    # some configs refuse a head count that does not divide hidden_size (transformers 5 validates on save): zero then
    physical = layout.removable and getattr(config, "head_dim", None) is not None
    physical = physical and accepts_head_count(config, heads - removed, kv_heads if groups > 1 else heads - removed)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    plan = []
    for i, block in enumerate(blocks):
        attn = layout.find(block)
        base = f"{prefix}.{i}.{layout.path}"
        offsets = (0, config.hidden_size, 2 * config.hidden_size) if layout.fused else (0,)
        per_head = layout.query + (layout.key_value if groups == 1 else ())  # shared key/value heads stay whole
        slices = [
            entry
            for path in per_head
            for entry in _projection(f"{base}.{path}", attn.get_submodule(path), "in", bias=True, offsets=offsets)
        ]
        slices += _projection(f"{base}.{layout.output}", attn.get_submodule(layout.output), "out", bias=False)
        plan.append((attn, slices))
    originals = _check([e for _, slices in plan for e in slices], importances)
    result = StructuredResult(originals, num_parameters(model), "physical" if physical else "zeroed", {})
    removed_heads: dict[str, list[int]] = {}
    for i, (attn, slices) in enumerate(tqdm(plan, desc="scoring heads", disable=not show_progress)):
        scores = _unit_scores(slices, criterion, importances, heads, head_dim)
        if groups > 1:  # rank query heads inside each key/value group
            drop = []
            for g in range(kv_heads):
                members = torch.arange(g * groups, (g + 1) * groups)
                order = torch.argsort(scores[members], stable=True)
                drop += members[order[:per_group]].tolist()
        else:
            drop = torch.argsort(scores, stable=True)[:removed].tolist()
        drop = sorted(drop)
        removed_heads[str(i)] = drop
        keep_heads = [h for h in range(heads) if h not in drop]
        for entry in slices:
            if physical:
                keep = torch.tensor(entry.indices(keep_heads, head_dim), dtype=torch.long)
                _resize(entry, keep)
                result.slices[entry.name] = (entry.dim, keep)
            else:
                param = entry.param
                mask = torch.ones(param.shape[entry.dim], dtype=torch.bool)
                mask[entry.indices(drop, head_dim)] = False
                shape = [1] * param.ndim
                shape[entry.dim] = -1
                full = mask.view(shape).expand(param.shape).clone()
                param.mul_(full.to(param.device))
                result.masks[entry.name] = full
        if physical:  # read by the attention's repeat_kv; the config is updated below
            attn.num_key_value_groups = groups - per_group if groups > 1 else 1
    if physical:
        config.num_attention_heads = heads - removed
        config.num_key_value_heads = kv_heads if groups > 1 else heads - removed
        config.head_dim = head_dim
    result.structured = {
        "unit": "attention head",
        "per_layer": {"heads": heads, "removed": removed, "kept": heads - removed, "key_value_heads": kv_heads},
        "removed_heads": removed_heads,
        "config": {"num_attention_heads": [heads, heads - removed]} if physical else None,
        "note": None
        if physical
        else f"{type(config).__name__} cannot hold {heads - removed} heads with hidden_size {config.hidden_size} "
        "(it derives head_dim from hidden_size / num_attention_heads, or refuses that count), so heads cannot be "
        "removed from the shapes: their query/key/value rows and output columns are zeroed.",
    }
    return result
