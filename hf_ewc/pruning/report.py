"""PruneReport: what a pruning did, per tensor and in total — in memory (masks, slices) and as JSON (the report file,
the ``sparsity_config`` of ``config.json``)."""

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..state import EWCState
from ..utils import HfEwcError, versions


REPORT_NAME = "pruning_report.json"


@dataclass
class PruneReport:
    """What [`prune_model`] did. ``masks`` (keep = True) and ``slices`` stay in memory; the rest is JSON.

    ``layers[name]``: ``shape`` and ``original_shape``, ``zeros`` (exact zeros now) and ``sparsity`` =
    ``1 − nonzero / original size`` (zeroed and removed weights alike).
    """

    criterion: str
    scope: str
    structure: str
    target_sparsity: float
    removal: str  # "masked" (single weights / N:M zeroed), "physical" (structures removed), "zeroed" (structures)
    layers: dict[str, dict[str, Any]]
    global_sparsity: float  # 1 − nonzero / original size, over the targeted tensors
    zero_share: float  # share of exact zeros in the targeted tensors as they are now (compressed-tensors' meaning)
    num_parameters_before: int
    num_parameters_after: int
    importance_source: str | None = None
    structured: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    masks: dict[str, Tensor] = field(default_factory=dict, repr=False)
    slices: dict[str, tuple[int, Tensor]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "scope": self.scope,
            "structure": self.structure,
            "target_sparsity": self.target_sparsity,
            "removal": self.removal,
            "global_sparsity": self.global_sparsity,
            "zero_share": self.zero_share,
            "num_parameters_before": self.num_parameters_before,
            "num_parameters_after": self.num_parameters_after,
            "importance_source": self.importance_source,
            "structured": self.structured,
            "evaluation": self.evaluation,
            "layers": self.layers,
            "hf_ewc_version": versions().get("hf_ewc"),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruneReport":
        keys = set(cls.__dataclass_fields__) - {"masks", "slices"}
        return cls(**{k: data[k] for k in keys if k in data})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PruneReport":
        path = Path(directory) / REPORT_NAME
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise HfEwcError(f"Cannot read the pruning report {str(path)!r}: {err}.") from err

    def sparsity_config(self) -> dict[str, Any]:
        """The ``sparsity_config`` written into ``config.json`` (keys as in compressed-tensors, plus hf_ewc's)."""
        structure = self.structure if self.removal != "physical" else f"{self.structure} (removed)"
        return {
            "format": "dense",
            "sparsity_structure": structure,
            "global_sparsity": round(self.zero_share, 6),
            "pruned_share": round(self.global_sparsity, 6),
            "criterion": self.criterion,
            "scope": self.scope,
            "removal": self.removal,
            "per_layer_sparsity": {n: round(v["sparsity"], 6) for n, v in self.layers.items()},
            "library": f"hf_ewc {versions().get('hf_ewc')}",
        }

    def table(self, max_rows: int | None = None) -> str:
        """Markdown table: one row per pruned tensor."""
        lines = ["| parameter | shape | original | zeros | sparsity |", "|---|---|---|---|---|"]
        items = list(self.layers.items())
        shown = items if max_rows is None else items[:max_rows]
        for name, v in shown:
            shape = "×".join(map(str, v["shape"]))
            original = "×".join(map(str, v["original_shape"]))
            lines.append(f"| `{name}` | {shape} | {original} | {v['zeros']} | {v['sparsity']:.1%} |")
        if len(shown) < len(items):
            lines.append(f"| … {len(items) - len(shown)} more in pruning_report.json | | | | |")
        return "\n".join(lines)

    def summary(self) -> str:
        where = {"masked": "zeroed weights", "physical": "removed from the shapes", "zeroed": "zeroed structures"}
        text = (
            f"{self.structure} pruning by {self.criterion} ({self.scope}): {self.global_sparsity:.1%} of "
            f"{len(self.layers)} tensor(s) pruned ({where[self.removal]}); parameters "
            f"{self.num_parameters_before:,} → {self.num_parameters_after:,}"
        )
        return text

    @torch.no_grad()
    def apply_to_state(self, state: EWCState) -> EWCState:
        """Make an [`EWCState`] match the pruned model: removed rows/columns are cut from Ω and θ*, and the anchors of
        zeroed weights are set to 0 (so the penalty does not pull them back). Returns ``state`` (changed in place)."""
        for name, (dim, keep) in self.slices.items():
            if name in state.importances:
                state.importances[name] = state.importances[name].index_select(dim, keep.to("cpu")).contiguous()
                state.anchors[name] = state.anchors[name].index_select(dim, keep.to("cpu")).contiguous()
        for name, mask in self.masks.items():
            if name in state.anchors:
                state.anchors[name] = state.anchors[name] * mask.to(state.anchors[name].device)
        return state


def measure_sparsity(model: nn.Module, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"shape", "numel", "zeros"}}`` of the named parameters as they are now."""
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        p = params[name]
        out[name] = {"shape": list(p.shape), "numel": p.numel(), "zeros": int((p.detach() == 0).sum())}
    return out


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def finish_report(
    model: nn.Module,
    original_shapes: dict[str, list[int]],
    *,
    criterion: str,
    scope: str,
    structure: str,
    sparsity: float,
    removal: str,
    params_before: int,
    source: str | None,
    masks: dict[str, Tensor],
    slices: dict[str, tuple[int, Tensor]] | None = None,
    structured: dict | None = None,
) -> PruneReport:
    measured = measure_sparsity(model, original_shapes)
    layers = {}
    for name, m in measured.items():
        original = math.prod(original_shapes[name])
        nonzero = m["numel"] - m["zeros"]
        layers[name] = {
            "shape": m["shape"],
            "original_shape": original_shapes[name],
            "zeros": m["zeros"],
            "sparsity": 1.0 - nonzero / max(original, 1),
        }
    total_original = sum(math.prod(s) for s in original_shapes.values())
    total_nonzero = sum(m["numel"] - m["zeros"] for m in measured.values())
    total_now = sum(m["numel"] for m in measured.values())
    return PruneReport(
        criterion=criterion,
        scope=scope,
        structure=structure,
        target_sparsity=sparsity,
        removal=removal,
        layers=layers,
        global_sparsity=1.0 - total_nonzero / max(total_original, 1),
        zero_share=sum(m["zeros"] for m in measured.values()) / max(total_now, 1),
        num_parameters_before=params_before,
        num_parameters_after=num_parameters(model),
        importance_source=source,
        structured=structured,
        masks=masks,
        slices=slices or {},
    )
