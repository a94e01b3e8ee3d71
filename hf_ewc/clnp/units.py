"""The units CLNP allocates, and which entries of which parameters belong to them.

A [`UnitGroup`] is one layer's units: the output neurons of a hidden `nn.Linear` in an MLP chain, the FFN neurons of a
transformer block, or its attention heads. Its *producer* slices are the units' incoming weights (and biases), its
*consumer* slices the weights that read the units; its *tap* is the module whose input holds the units' activations
(``width`` features per unit: 1 for a neuron, ``head_dim`` for a head), where activity is measured and units are
switched off. Layouts come from `hf_ewc.models` (the pruner's FFN and attention tables).
"""

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..models import attention_layout, ffn_layout, find_blocks, is_conv1d, neuron_dim
from ..utils import HfEwcError


@dataclass
class UnitSlice:
    """Along ``dim`` of parameter ``name``, unit u owns ``o + u·width … o + (u + 1)·width − 1`` for every offset o."""

    name: str
    dim: int
    role: str  # "producer" (the units' incoming weights and biases) or "consumer" (weights that read the units)
    offsets: tuple[int, ...] = (0,)
    fan_in: int = 1  # of a producer weight: its re-initialisation range is ±1/√fan_in, as nn.Linear's


@dataclass
class UnitGroup:
    name: str
    size: int
    width: int
    tap: nn.Module
    slices: list[UnitSlice] = field(default_factory=list)

    def features(self, units: Tensor) -> Tensor:
        """``units`` (``size`` values) repeated per feature: what the tap's input holds."""
        return units.repeat_interleave(self.width)

    def along(self, entry: UnitSlice, units: Tensor, length: int, fill) -> Tensor:
        """A vector of ``length`` (the parameter's size along the slice's dim) holding ``fill`` outside the units'
        entries and the per-unit ``units`` values (expanded per feature) inside them."""
        out = torch.full((length,), fill, dtype=units.dtype)
        per_feature = self.features(units)
        for o in entry.offsets:
            out[o : o + len(per_feature)] = per_feature
        return out

    def covered(self, entry: UnitSlice, length: int) -> Tensor:
        return self.along(entry, torch.ones(self.size, dtype=torch.bool), length, False)


def expand(vector: Tensor, shape: torch.Size, dim: int) -> Tensor:
    """``vector`` (indexed along ``dim``) broadcast to ``shape``."""
    view = [1] * len(shape)
    view[dim] = -1
    return vector.view(view).expand(shape)


def _projection(name: str, module: nn.Module, role: str, *, offsets=(0,), bias: bool = True) -> list[UnitSlice]:
    weight = module.weight
    fan_in = weight.shape[0] if is_conv1d(module) else weight.shape[1]
    out = [UnitSlice(f"{name}.weight", neuron_dim(module, "in" if role == "producer" else "out"), role, offsets,
                     fan_in)]  # fmt: skip
    if role == "producer" and bias and getattr(module, "bias", None) is not None:
        out.append(UnitSlice(f"{name}.bias", 0, role, offsets))
    return out


def mlp_groups(model: nn.Module) -> tuple[list[UnitGroup], str]:
    """Every hidden Linear of a chain (each one's input size the previous one's output size); the last is the head."""
    chain = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(chain) < 2:
        raise HfEwcError(f"CLNP needs hidden units and a head; {type(model).__name__} has {len(chain)} nn.Linear.")
    for (prev_name, prev), (name, layer) in itertools.pairwise(chain):
        if layer.in_features != prev.out_features:
            raise HfEwcError(
                "CLNP allocates the units of transformer blocks (FFN neurons, attention heads) or of MLP-style "
                f"chains of nn.Linear; in {type(model).__name__}, {name!r} takes {layer.in_features} inputs but "
                f"{prev_name!r} gives {prev.out_features}."
            )
    groups = []
    for (name, layer), (next_name, nxt) in itertools.pairwise(chain):
        slices = _projection(name, layer, "producer") + _projection(next_name, nxt, "consumer")
        groups.append(UnitGroup(name, layer.out_features, 1, nxt, slices))
    return groups, chain[-1][0]


def transformer_groups(model: nn.Module) -> list[UnitGroup]:
    """FFN neurons and attention heads of every block (the pruner's layouts). Key/value projections shared between
    query heads (grouped-query attention) belong to no head: they are shared parameters, like norms and embeddings."""
    prefix, blocks = find_blocks(model)
    groups = []
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for i, block in enumerate(blocks):
        base = f"{prefix}.{i}"
        ffn = ffn_layout(block)
        if ffn is not None:
            first = block.get_submodule(ffn.inputs[0])
            width = first.nf if is_conv1d(first) else first.out_features
            slices = [s for path in ffn.inputs for s in _projection(f"{base}.{path}", block.get_submodule(path),
                                                                     "producer")]  # fmt: skip
            slices += [s for path in ffn.outputs for s in _projection(f"{base}.{path}", block.get_submodule(path),
                                                                      "consumer")]  # fmt: skip
            tap = block.get_submodule(ffn.outputs[0])
            groups.append(UnitGroup(f"{base}.{ffn.outputs[0].rsplit('.', 1)[0]}", width, 1, tap, slices))
        layout = attention_layout(block)
        if layout is not None and heads:
            attn = layout.find(block)
            out = attn.get_submodule(layout.output)
            hidden = out.nx if is_conv1d(out) else out.in_features
            head_dim = hidden // heads
            at = f"{base}.{layout.path}"
            if layout.fused:  # GPT-2: q, k and v side by side in one projection
                slices = _projection(f"{at}.{layout.query[0]}", attn.get_submodule(layout.query[0]), "producer",
                                     offsets=(0, hidden, 2 * hidden))  # fmt: skip
            else:
                own = layout.query + (layout.key_value if kv_heads == heads else ())
                slices = [s for p in own for s in _projection(f"{at}.{p}", attn.get_submodule(p), "producer")]
            slices += _projection(f"{at}.{layout.output}", out, "consumer")
            groups.append(UnitGroup(f"{at}.heads", heads, head_dim, out, slices))
    if not groups:
        raise HfEwcError(f"CLNP found no FFN or attention layout it knows in {type(model).__name__}'s blocks.")
    return groups


def unit_groups(model: nn.Module) -> tuple[list[UnitGroup], str | None, str]:
    """``(groups, head module name or None, kind)``: a transformer's blocks (kind ``"transformer"``; its output head
    is a shared parameter), else an MLP chain (kind ``"mlp"``; its last Linear is the head)."""
    try:
        _, blocks = find_blocks(model)
    except HfEwcError:
        blocks = None
    if blocks is not None and (ffn_layout(blocks[0]) is not None or attention_layout(blocks[0]) is not None):
        return transformer_groups(model), None, "transformer"
    groups, head = mlp_groups(model)
    return groups, head, "mlp"
