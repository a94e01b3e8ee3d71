r"""Importance-based pruning: masks from any importance, structured removal, and the callback that keeps them.

    report = prune_model(model, 0.5, criterion="obd", importances="run_dir")    # Ω from a saved EWC state
    export_pruned(model, "pruned", report, tokenizer=tokenizer)                   # save, card, reload-verify

Criteria (a score per weight; the lowest scores go first):

| criterion   | score                                                                 | needs                     |
|-------------|-----------------------------------------------------------------------|---------------------------|
| `magnitude` | ``|θ|``                                                               | nothing                   |
| `fisher`    | ``F`` (the diagonal Fisher)                                           | Fisher importances        |
| `mas`       | MAS importance                                                        | MAS importances           |
| `si`        | SI path integral                                                      | a state trained with SI   |
| `signal`    | total absolute signal ``|θ|·⟨|input|⟩``                                | signal importances        |
| `obd`       | ``½·F·θ²``: Optimal Brain Damage (LeCun 1990), F as Hessian diagonal  | Fisher importances        |

Importances come from an EWC state (an `hf-ewc train` run, a checkpoint, `EWCState.save`: nothing is recollected)
or are collected on given data (all but SI, which only training produces).

Structures:

- ``unstructured`` — single weights; ``scope="global"`` ranks all targeted weights together (one threshold),
  ``scope="per_layer"`` removes the same share from every tensor;
- ``"N:M"`` (``"2:4"``, ``"4:8"`` …) — in every group of M consecutive weights along the input dimension, keep the N
  highest scores (sparsity ``1 − N/M``);
- ``ffn`` — whole FFN neurons (a row of the up/gate projections and the matching column of the down projection), the
  same number in every layer: removed physically and written into the config (``intermediate_size``, GPT-2's
  ``n_inner``…), so ``from_pretrained`` rebuilds the smaller shapes;
- ``heads`` — whole attention heads, the same number in every layer: removed physically when the config can say so
  (Llama-style models with an explicit ``head_dim``); otherwise (BERT, GPT-2: ``head_dim = hidden / heads``) their
  weights are zeroed and kept at zero. The report says which happened.

A structure's score is the sum of its weights' scores.

By default the weights of the Linear (and GPT-2 ``Conv1D``) layers inside the transformer blocks are pruned;
embeddings, norms, biases and output heads are not. ``include`` / ``exclude`` (regular expressions searched in
parameter names) change that.
"""

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .adapters import base_model_of, hub_base_of, is_adapter_dir, load_adapter
from .importance._collect import LINEAR_TYPES
from .state import EWCState, find_ewc_state
from .utils import HfEwcError, logger, versions, write_json_atomic


__all__ = [
    "CRITERIA",
    "REPORT_NAME",
    "SCOPES",
    "KeepSparsityCallback",
    "PruneReport",
    "export_pruned",
    "measure_sparsity",
    "prune_model",
    "verify_export",
]

CRITERIA = ("magnitude", "fisher", "mas", "si", "signal", "obd")
IMPORTANCE_OF = {"fisher": "fisher", "mas": "mas", "si": "si", "signal": "signal", "obd": "fisher"}
SCOPES = ("global", "per_layer")
NAMED_STRUCTURES = ("unstructured", "ffn", "heads")
STRUCTURE_CHOICES = "unstructured, N:M (e.g. 2:4), ffn, heads"
REPORT_NAME = "pruning_report.json"

# (projections whose outputs are the FFN neurons, projections that read them, config key of the FFN width)
_FFN_LAYOUTS: tuple[tuple[tuple[str, ...], tuple[str, ...], str], ...] = (
    (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",), "intermediate_size"),  # Llama, Mistral, Qwen2, Gemma
    (("intermediate.dense",), ("output.dense",), "intermediate_size"),  # BERT, RoBERTa, ELECTRA
    (("mlp.c_fc",), ("mlp.c_proj",), "n_inner"),  # GPT-2 (Conv1D)
    (("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",), "intermediate_size"),  # GPT-NeoX
    (("fc1",), ("fc2",), "ffn_dim"),  # OPT
)
_FFN_NAMES = "Llama-style mlp.{gate,up,down}_proj, BERT-style intermediate/output.dense, GPT-2, GPT-NeoX, OPT"


# ------------------------------------------------------------------------------------------------ targets and scores
def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _in_block(module_name: str) -> bool:
    """True inside a ModuleList of blocks (``model.layers.3.mlp.up_proj``, ``transformer.h.0.attn.c_attn``)."""
    return any(part.isdigit() for part in module_name.split("."))


def select_targets(
    model: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
) -> dict[str, nn.Parameter]:
    """The parameters to prune: by default the ``weight`` of every Linear / ``Conv1D`` inside the transformer blocks;
    with ``include``, every parameter whose name matches one of the regular expressions; minus ``exclude``."""
    include, exclude = list(include or []), list(exclude or [])
    for pattern in include + exclude:
        try:
            re.compile(pattern)
        except re.error as err:
            raise HfEwcError(f"Invalid include/exclude pattern {pattern!r}: {err}.") from err
    if include:
        targets = {
            n: p
            for n, p in model.named_parameters()
            if p.is_floating_point() and any(re.search(pat, n) for pat in include)
        }
    else:
        targets = {}
        for module_name, module in model.named_modules():
            if isinstance(module, LINEAR_TYPES) and _in_block(module_name):
                weight = getattr(module, "weight", None)
                if isinstance(weight, nn.Parameter):
                    targets[f"{module_name}.weight"] = weight
        names = {id(p): n for n, p in model.named_parameters()}  # tied parameters: the name named_parameters uses
        targets = {names[id(p)]: p for p in targets.values() if id(p) in names}
    targets = {n: p for n, p in targets.items() if not any(re.search(pat, n) for pat in exclude)}
    if not targets:
        what = f"include={include}, exclude={exclude}" if include or exclude else "the default (block Linear weights)"
        raise HfEwcError(f"No parameter to prune with {what}; check the patterns against model.named_parameters().")
    return targets


def _resolve_importances(
    importances: Any, criterion: str, *, data: Any = None, model: nn.Module | None = None, collect_kwargs=None
) -> tuple[Mapping[str, Tensor] | None, str | None]:
    """``(importances, source)`` for ``criterion`` from a dict, an [`EWCState`], a directory, or data to collect on."""
    if criterion == "magnitude":
        return None, None
    needed = IMPORTANCE_OF[criterion]
    if importances is None and data is not None:
        if needed == "si":
            raise HfEwcError(
                "criterion 'si' needs the importances of an EWC state trained with importance_method='si' "
                "(SI is accumulated during training and cannot be collected on data); pass importances=DIR."
            )
        from .importance import collect_importance

        return collect_importance(model, data, needed, **(collect_kwargs or {})), f"collected on data ({needed})"
    if importances is None:
        raise HfEwcError(
            f"criterion {criterion!r} needs {needed} importances: pass importances= an EWC state directory (an hf-ewc "
            "train run, a checkpoint or EWCState.save) or a dict, or data= to collect them on (CLI: --importances DIR "
            "or --data FILE); or use criterion='magnitude'."
        )
    source = None
    if isinstance(importances, (str, os.PathLike)):
        source = str(importances)
        importances = EWCState.load(importances)
    if isinstance(importances, EWCState):
        methods = sorted({str(d.get("method")) for d in importances.domains if d.get("method")})
        if methods and methods != [needed]:
            raise HfEwcError(
                f"criterion {criterion!r} needs {needed} importances, but the EWC state {source or ''} holds "
                f"{', '.join(methods)} importances; use criterion={methods[0]!r} or a state collected with {needed}."
            )
        source = source or "EWCState"
        return importances.importances, f"{source} ({needed}, {importances.num_consolidations} domain(s))"
    if isinstance(importances, Mapping):
        return importances, "dict"
    raise HfEwcError(
        f"importances must be an EWCState, a directory or a dict of tensors, not {type(importances).__name__}."
    )


def _check_coverage(importances: Mapping[str, Tensor], params: Mapping[str, nn.Parameter]) -> None:
    missing = [n for n in params if n not in importances]
    for name, p in params.items():
        if name in importances and tuple(importances[name].shape) != tuple(p.shape):
            raise HfEwcError(
                f"The importances are from another model: parameter {name!r} has shape "
                f"{tuple(importances[name].shape)} in the importances and {tuple(p.shape)} in the model."
            )
    if missing and len(missing) == len(params):
        raise HfEwcError(
            f"The importances are from another model: parameter {missing[0]!r} is not in them (they name e.g. "
            f"{next(iter(importances), 'nothing')!r})."
        )
    if missing:
        shown = ", ".join(missing[:5]) + (f" … ({len(missing)} in all)" if len(missing) > 5 else "")
        raise HfEwcError(
            f"The importances do not cover {len(missing)} parameter(s) to prune: {shown}. Collect them on the whole "
            "model, or leave those parameters out with exclude=."
        )


@torch.no_grad()
def _score(name: str, param: Tensor, criterion: str, importances: Mapping[str, Tensor] | None) -> Tensor:
    """float32 score per element of ``param`` (on the CPU: scores of all targets are ranked together)."""
    theta = param.detach().float().cpu()
    if criterion == "magnitude":
        return theta.abs()
    omega = importances[name].detach().float().cpu()
    if criterion == "obd":
        return 0.5 * omega * theta.square()
    return omega


# ------------------------------------------------------------------------------------------------ masks
def _smallest_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean keep-mask of ``scores`` (any shape) removing exactly the ``k`` smallest; ties go in storage order."""
    flat = scores.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k <= 0:
        return keep.view(scores.shape)
    if k >= flat.numel():
        return torch.zeros_like(keep).view(scores.shape)
    threshold = flat.kthvalue(k).values
    below = flat < threshold
    keep &= ~below
    at = (flat == threshold).nonzero().squeeze(1)
    keep[at[: k - int(below.sum())]] = False
    return keep.view(scores.shape)


def _nm_mask(scores: Tensor, n: int, m: int, input_dim: int, name: str) -> Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive weights along ``input_dim``."""
    s = scores.movedim(input_dim, -1)
    if s.shape[-1] % m:
        raise HfEwcError(
            f"{n}:{m} sparsity needs the input dimension to be divisible by {m}, but {name!r} has {s.shape[-1]} "
            f"inputs (shape {tuple(scores.shape)}); exclude it (exclude=[{re.escape(name)!r}]) or choose another M."
        )
    groups = s.reshape(*s.shape[:-1], s.shape[-1] // m, m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return keep.reshape(s.shape).movedim(-1, input_dim)


def _input_dim(model: nn.Module, name: str, param: Tensor) -> int:
    """The dimension of ``param`` that meets the layer's input (Linear: 1; GPT-2 Conv1D stores [in, out]: 0)."""
    module_name = name.rpartition(".")[0]
    module = model.get_submodule(module_name) if module_name else model
    return 0 if _is_conv1d(module) else param.ndim - 1


def _parse_structure(structure: str) -> tuple[str, tuple[int, int] | None]:
    value = str(structure).strip().lower()
    if value in NAMED_STRUCTURES:
        return value, None
    if value == "n:m":
        return "2:4", (2, 4)
    match = re.fullmatch(r"(\d+):(\d+)", value)
    if match:
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise HfEwcError(f"structure {structure!r}: N:M needs 0 < N < M (e.g. 2:4).")
        return f"{n}:{m}", (n, m)
    raise HfEwcError(f"Unknown structure {structure!r}; choose one of: {STRUCTURE_CHOICES}.")


# ------------------------------------------------------------------------------------------------ the report
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


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _finish_report(
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
        num_parameters_after=_num_parameters(model),
        importance_source=source,
        structured=structured,
        masks=masks,
        slices=slices or {},
    )


# ------------------------------------------------------------------------------------------------ structures
def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (the longest ModuleList of modules with parameters)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        blocks = (
            isinstance(module, nn.ModuleList)
            and len(module)
            and all(next(m.parameters(), None) is not None for m in module)
        )
        if blocks and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise HfEwcError(f"{type(model).__name__} has no list of transformer blocks; structured pruning needs one.")
    return best


def _submodule(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _neuron_dim(module: nn.Module, role: str) -> int:
    """The weight dimension indexing the FFN neurons: the outputs of an ``in`` projection, the inputs of an ``out``."""
    if _is_conv1d(module):  # weight [in, out]
        return 1 if role == "in" else 0
    return 0 if role == "in" else 1


def _resize(module: nn.Module, name: str, param_name: str, dim: int, keep: Tensor) -> None:
    """Keep the ``keep`` indices of ``module.<param_name>`` along ``dim``, updating the module's size attributes."""
    old = getattr(module, param_name)
    new = nn.Parameter(old.detach().index_select(dim, keep.to(old.device)).clone(), requires_grad=old.requires_grad)
    setattr(module, param_name, new)
    if param_name != "weight":
        return
    if _is_conv1d(module):
        module.nx, module.nf = new.shape
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = new.shape


def _unit_scores(entries, criterion, importances, units: int, size: int) -> Tensor:
    """Score of each of ``units`` structures (FFN neurons, heads): the sum of its weights' scores. ``entries`` =
    ``[(name, param, dim, offsets)]``: along ``dim``, unit u owns ``o + u·size … o + (u + 1)·size − 1`` for every
    offset o (GPT-2's fused q/k/v has three)."""
    total = torch.zeros(units)
    for name, param, dim, offsets in entries:
        s = _score(name, param, criterion, importances).movedim(dim, 0)
        for o in offsets:
            total += s[o : o + units * size].reshape(units, -1).sum(1)
    return total


@torch.no_grad()
def _prune_ffn(model, sparsity, criterion, importances, show_progress):
    prefix, blocks = _blocks(model)
    layout = next(
        (lay for lay in _FFN_LAYOUTS if all(_submodule(blocks[0], p) is not None for p in lay[0] + lay[1])), None
    )
    if layout is None:
        raise HfEwcError(
            f"structure 'ffn' does not know the FFN of {type(model).__name__}; it knows: {_FFN_NAMES}. Use "
            "unstructured or N:M pruning."
        )
    ins, outs, key = layout
    config = model.config
    width = getattr(_submodule(blocks[0], ins[0]), "nf", None) or _submodule(blocks[0], ins[0]).out_features
    removed = round(sparsity * width)
    if removed >= width:
        raise HfEwcError(f"sparsity {sparsity} would remove all {width} FFN neurons of a layer; choose less.")
    plan = []
    for i, block in enumerate(blocks):
        entries = []
        for role, paths in (("in", ins), ("out", outs)):
            for path in paths:
                module = block.get_submodule(path)
                dim = _neuron_dim(module, role)
                entries.append((f"{prefix}.{i}.{path}.weight", module.weight, dim, [0]))
                if role == "in" and getattr(module, "bias", None) is not None:
                    entries.append((f"{prefix}.{i}.{path}.bias", module.bias, 0, [0]))
        plan.append((i, block, entries))
    if importances is not None:
        _check_coverage(importances, {n: p for _, _, es in plan for n, p, _, _ in es})
    originals = {n: list(p.shape) for _, _, es in plan for n, p, _, _ in es}
    params_before = _num_parameters(model)
    slices: dict[str, tuple[int, Tensor]] = {}
    kept_per_layer = []
    for i, block, entries in tqdm(plan, desc="scoring FFN neurons", disable=not show_progress):
        scores = _unit_scores(entries, criterion, importances, width, 1)
        keep = torch.sort(torch.argsort(scores, descending=True, stable=True)[: width - removed]).values
        kept_per_layer.append(keep.tolist())
        for name, _, dim, _ in entries:
            module_path, _, pname = name[len(f"{prefix}.{i}.") :].rpartition(".")
            _resize(block.get_submodule(module_path), name, pname, dim, keep)
            slices[name] = (dim, keep)
    setattr(config, key, width - removed)
    structured = {
        "unit": "ffn neuron",
        "config": {key: [width, width - removed]},
        "per_layer": {"width": width, "removed": removed, "kept": width - removed},
        "removed_indices": {str(i): sorted(set(range(width)) - set(kept)) for i, kept in enumerate(kept_per_layer)},
    }
    return originals, params_before, slices, structured


def _attention_layout(block: nn.Module) -> tuple[str, dict[str, Any]] | None:
    attn = _submodule(block, "self_attn")
    if attn is not None and all(_submodule(attn, p) is not None for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "llama", {"attn": attn, "path": "self_attn"}
    attn = _submodule(block, "attention")
    if attn is not None and all(_submodule(attn, p) is not None for p in ("self.query", "self.key", "output.dense")):
        return "bert", {"attn": attn, "path": "attention"}
    attn = _submodule(block, "attn")
    if attn is not None and _submodule(attn, "c_attn") is not None and _submodule(attn, "c_proj") is not None:
        return "gpt2", {"attn": attn, "path": "attn"}
    return None


@torch.no_grad()
def _prune_heads(model, sparsity, criterion, importances, show_progress):
    prefix, blocks = _blocks(model)
    found = _attention_layout(blocks[0])
    if found is None:
        raise HfEwcError(
            f"structure 'heads' does not know the attention of {type(model).__name__}; it knows Llama-style "
            "self_attn.{q,k,v,o}_proj, BERT-style attention.self.{query,key,value}, GPT-2 attn.c_attn."
        )
    kind, _ = found
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    physical = kind == "llama" and getattr(config, "head_dim", None) is not None
    head_dim = config.head_dim if physical else config.hidden_size // heads
    groups = heads // kv_heads
    if groups > 1:  # grouped-query attention: the same number of query heads leaves every key/value group
        per_group = round(sparsity * groups)
        removed = per_group * kv_heads
        if per_group >= groups:
            raise HfEwcError(f"sparsity {sparsity} would remove every query head of a key/value group; choose less.")
    else:
        removed = round(sparsity * heads)
        if removed >= heads:
            raise HfEwcError(f"sparsity {sparsity} would remove all {heads} heads of a layer; choose less.")
    plan = []
    for i, block in enumerate(blocks):
        kind_i, info = _attention_layout(block)
        base = f"{prefix}.{i}.{info['path']}"
        attn = info["attn"]
        # (name, param, dim, offsets): head h owns o + h·head_dim … along dim, for each offset o
        entries = []
        if kind_i == "llama":
            qkv = [("q_proj", True)] + [(p, groups == 1) for p in ("k_proj", "v_proj")]
            for proj, per_head in qkv:
                if per_head:
                    module = attn.get_submodule(proj)
                    entries.append((f"{base}.{proj}.weight", module.weight, 0, [0]))
                    if module.bias is not None:
                        entries.append((f"{base}.{proj}.bias", module.bias, 0, [0]))
            entries.append((f"{base}.o_proj.weight", attn.o_proj.weight, 1, [0]))
        elif kind_i == "bert":
            for proj in ("self.query", "self.key", "self.value"):
                module = attn.get_submodule(proj)
                entries.append((f"{base}.{proj}.weight", module.weight, 0, [0]))
                if module.bias is not None:
                    entries.append((f"{base}.{proj}.bias", module.bias, 0, [0]))
            entries.append((f"{base}.output.dense.weight", attn.output.dense.weight, 1, [0]))
        else:  # GPT-2: c_attn [in, 3·hidden] holds q, k, v side by side; c_proj [hidden, out] reads the heads
            hidden = config.hidden_size
            entries.append((f"{base}.c_attn.weight", attn.c_attn.weight, 1, [0, hidden, 2 * hidden]))
            entries.append((f"{base}.c_attn.bias", attn.c_attn.bias, 0, [0, hidden, 2 * hidden]))
            entries.append((f"{base}.c_proj.weight", attn.c_proj.weight, 0, [0]))
        plan.append((i, block, attn, entries))
    if importances is not None:
        _check_coverage(importances, {n: p for *_, es in plan for n, p, _, _ in es})
    originals = {n: list(p.shape) for *_, es in plan for n, p, _, _ in es}
    params_before = _num_parameters(model)

    def indices(head: int, offsets: list[int]) -> list[int]:
        return [o + head * head_dim + d for o in offsets for d in range(head_dim)]

    masks: dict[str, Tensor] = {}
    slices: dict[str, tuple[int, Tensor]] = {}
    removed_heads: dict[str, list[int]] = {}
    for i, block, attn, entries in tqdm(plan, desc="scoring heads", disable=not show_progress):
        scores = _unit_scores(entries, criterion, importances, heads, head_dim)
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
        for name, param, dim, offsets in entries:
            if physical:
                keep = torch.tensor([j for h in keep_heads for j in indices(h, offsets)], dtype=torch.long)
                module_path, _, pname = name[len(f"{prefix}.{i}.") :].rpartition(".")
                _resize(block.get_submodule(module_path), name, pname, dim, keep)
                slices[name] = (dim, keep)
            else:
                mask = torch.ones(param.shape[dim], dtype=torch.bool)
                mask[[j for h in drop for j in indices(h, offsets)]] = False
                shape = [1] * param.ndim
                shape[dim] = -1
                full = mask.view(shape).expand(param.shape).clone()
                param.mul_(full.to(param.device))
                masks[name] = full
        if physical:  # read by the attention's repeat_kv; the config is updated below
            attn.num_key_value_groups = groups - per_group if groups > 1 else 1
    if physical:
        new_heads = heads - removed
        config.num_attention_heads = new_heads
        config.num_key_value_heads = kv_heads if groups > 1 else new_heads
        config.head_dim = head_dim
    structured = {
        "unit": "attention head",
        "per_layer": {"heads": heads, "removed": removed, "kept": heads - removed, "key_value_heads": kv_heads},
        "removed_heads": removed_heads,
        "config": {"num_attention_heads": [heads, heads - removed]} if physical else None,
        "note": None
        if physical
        else f"{type(model.config).__name__} derives head_dim from hidden_size / num_attention_heads, so heads "
        "cannot be removed from the shapes: their query/key/value rows and output columns are zeroed.",
    }
    return originals, params_before, slices, masks, structured, physical


# ------------------------------------------------------------------------------------------------ entry point
def check_prune_arguments(
    sparsity: Any, criterion: str, structure: str, scope: str | None, include=None, exclude=None
) -> tuple[str, tuple[int, int] | None, float, str]:
    """Validate the pruning settings; returns ``(structure kind, (N, M) or None, sparsity, scope)``."""
    if criterion not in CRITERIA:
        raise HfEwcError(f"Unknown criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}.")
    kind, nm = _parse_structure(structure)
    if nm is not None:
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is not None and not math.isclose(float(sparsity), implied, abs_tol=1e-9):
            raise HfEwcError(
                f"structure {kind} has sparsity {implied:g} (1 − N/M); got sparsity={sparsity}. Leave sparsity out "
                "or pass it."
            )
        sparsity = implied
    if sparsity is None or isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise HfEwcError(f"sparsity must be a number in [0, 1), got {sparsity!r}.")
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0 or math.isnan(sparsity):
        raise HfEwcError(f"sparsity must be in [0, 1) (the share of weights to remove), got {sparsity}.")
    if scope is not None and scope not in SCOPES:
        raise HfEwcError(f"Unknown scope {scope!r}; choose one of: {', '.join(SCOPES)}.")
    if kind in ("ffn", "heads") and scope == "global":
        raise HfEwcError(
            f"structure {kind!r} removes the same number from every layer (the config holds one size for all layers); "
            "use scope='per_layer' (or leave scope out)."
        )
    if kind in ("ffn", "heads") and (include or exclude):
        raise HfEwcError(f"include/exclude select tensors for unstructured and N:M pruning, not for {kind!r}.")
    return kind, nm, sparsity, scope or ("global" if kind == "unstructured" else "per_layer")


def prune_model(
    model: nn.Module,
    sparsity: float | None,
    *,
    criterion: str = "magnitude",
    importances: Any = None,
    scope: str | None = None,
    structure: str = "unstructured",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    data: Any = None,
    collect_kwargs: Mapping[str, Any] | None = None,
    show_progress: bool = True,
) -> PruneReport:
    r"""Prune ``model`` in place by ``criterion`` and return a [`PruneReport`].

    Args:
        model (`torch.nn.Module`):
            A 🤗 transformers model (any module for unstructured and N:M pruning).
        sparsity (`float`):
            Share to remove, in [0, 1): of the targeted weights (unstructured), of each layer's FFN neurons (`ffn`) or
            attention heads (`heads`, rounded to whole heads; per key/value group for grouped-query attention).
            Ignored (may be `None`) for N:M, whose sparsity is ``1 − N/M``.
        criterion (`str`, *optional*, defaults to `"magnitude"`):
            One of `magnitude`, `fisher`, `mas`, `si`, `signal`, `obd` (see the module docstring).
        importances ([`EWCState`], `str`, `os.PathLike` or `dict[str, torch.Tensor]`, *optional*):
            The importances for every criterion but `magnitude`: an EWC state, a directory holding one (an `hf-ewc
            train` run, a checkpoint, `EWCState.save`), or a dict keyed by parameter name. Not recollected.
        scope (`str`, *optional*):
            `"global"` (one ranking across all targeted tensors; the default for unstructured) or `"per_layer"` (the
            same share from every tensor; always the case for N:M, `ffn` and `heads`).
        structure (`str`, *optional*, defaults to `"unstructured"`):
            `"unstructured"`, `"N:M"` such as `"2:4"`, `"ffn"` or `"heads"`.
        include, exclude (`list[str]`, *optional*):
            Regular expressions searched in parameter names: which parameters to prune (unstructured and N:M).
        data (*optional*):
            Samples to collect the importances on when ``importances`` is not given (as for [`collect_importance`]);
            ``collect_kwargs`` are passed to it.
        show_progress (`bool`, *optional*, defaults to `True`):
            Progress bars while scoring.
    """
    kind, nm, sparsity, scope = check_prune_arguments(sparsity, criterion, structure, scope, include, exclude)
    omega, source = _resolve_importances(importances, criterion, data=data, model=model, collect_kwargs=collect_kwargs)

    if kind == "ffn":
        originals, before, slices, structured = _prune_ffn(model, sparsity, criterion, omega, show_progress)
        return _finish_report(
            model, originals, criterion=criterion, scope=scope, structure=kind, sparsity=sparsity,
            removal="physical", params_before=before, source=source, masks={}, slices=slices, structured=structured,
        )  # fmt: skip
    if kind == "heads":
        originals, before, slices, masks, structured, physical = _prune_heads(
            model, sparsity, criterion, omega, show_progress
        )
        return _finish_report(
            model, originals, criterion=criterion, scope=scope, structure=kind, sparsity=sparsity,
            removal="physical" if physical else "zeroed", params_before=before, source=source, masks=masks,
            slices=slices, structured=structured,
        )  # fmt: skip

    targets = select_targets(model, include, exclude)
    if omega is not None:
        _check_coverage(omega, targets)
    originals = {n: list(p.shape) for n, p in targets.items()}
    before = _num_parameters(model)
    bar = tqdm(total=len(targets), desc=f"scoring ({criterion})", disable=not show_progress)
    scores = {}
    for name, p in targets.items():
        scores[name] = _score(name, p, criterion, omega)
        bar.update()
    bar.close()
    if nm is not None:
        masks = {n: _nm_mask(s, *nm, _input_dim(model, n, s), n) for n, s in scores.items()}
    elif scope == "global":
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        keep = _smallest_mask(flat, round(sparsity * flat.numel()))
        del flat
        masks, offset = {}, 0
        for name, s in scores.items():
            masks[name] = keep[offset : offset + s.numel()].view(s.shape)
            offset += s.numel()
    else:
        masks = {n: _smallest_mask(s, round(sparsity * s.numel())) for n, s in scores.items()}
    with torch.no_grad():
        for name, p in targets.items():
            p.mul_(masks[name].to(device=p.device, dtype=p.dtype))
    return _finish_report(
        model, originals, criterion=criterion, scope=scope, structure=kind if nm is None else f"{nm[0]}:{nm[1]}",
        sparsity=sparsity, removal="masked", params_before=before, source=source, masks=masks,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ keeping the masks
class KeepSparsityCallback(TrainerCallback):
    """Keep pruned weights at exactly zero while training on: after every optimizer step, ``θ ← θ ⊙ mask``.

    Works with `transformers.Trainer` and [`EWCTrainer`] (which applies the masks right after its proximal step and
    before SI reads the update, so pruned weights neither regrow nor count in SI's path integral).

    Args:
        masks (`dict[str, torch.Tensor]`):
            Boolean keep-masks by parameter name (``PruneReport.masks``), or build them with
            [`KeepSparsityCallback.from_zeros`] from a reloaded pruned model.
    """

    def __init__(self, masks: Mapping[str, Tensor]):
        if not masks:
            raise HfEwcError("KeepSparsityCallback needs at least one mask (a pruned model has them in report.masks).")
        self.masks = {n: m.bool() for n, m in masks.items()}
        self._bound: list[tuple[Tensor, Tensor]] | None = None  # (parameter, pruned = ~mask on its device)
        self._model_id: int | None = None
        self.managed = False  # set by EWCTrainer for a training run: it applies the masks at the right point itself

    @classmethod
    def from_zeros(cls, model: nn.Module, names: Iterable[str] | None = None) -> "KeepSparsityCallback":
        """Masks = ``θ != 0`` for those of ``names`` that hold zeros (default: the tensors the ``sparsity_config`` of
        the model's config lists, as written by [`export_pruned`], else the default targets)."""
        params = dict(model.named_parameters())
        if names is None:
            sparsity = getattr(getattr(model, "config", None), "sparsity_config", None)
            listed = sparsity.get("per_layer_sparsity") if isinstance(sparsity, dict) else None
            names = list(listed) if listed else list(select_targets(model))
        names = list(names)
        unknown = [n for n in names if n not in params]
        if unknown:
            raise HfEwcError(f"KeepSparsityCallback: {unknown[0]!r} is not a parameter of {type(model).__name__}.")
        # A tensor without zeros has nothing to keep: no mask, no work at every optimizer step.
        return cls({n: params[n].detach() != 0 for n in names if bool((params[n] == 0).any())})

    @classmethod
    def from_report(cls, model: nn.Module, report: PruneReport) -> "KeepSparsityCallback | None":
        """The callback for a model pruned by ``report`` (None when nothing is held at zero: physical removal)."""
        if report.masks:
            return cls(report.masks)
        zeroed = [n for n, v in report.layers.items() if v["zeros"]]
        return cls.from_zeros(model, zeroed) if zeroed else None

    def _bind(self, model: nn.Module) -> list[tuple[Tensor, Tensor]]:
        if self._bound is None or self._model_id != id(model):
            params = dict(model.named_parameters())
            plain = getattr(model, "module", None)  # DDP / accelerate wrappers
            if plain is not None and not set(self.masks) <= set(params):
                params = dict(plain.named_parameters())
            missing = [n for n in self.masks if n not in params]
            if missing:
                raise HfEwcError(f"KeepSparsityCallback: the model has no parameter {missing[0]!r} to keep sparse.")
            bound = []
            for name, mask in self.masks.items():
                p = params[name]
                if tuple(mask.shape) != tuple(p.shape):
                    raise HfEwcError(
                        f"KeepSparsityCallback: mask of {name!r} has shape {tuple(mask.shape)}, the parameter "
                        f"{tuple(p.shape)}."
                    )
                bound.append((p, ~mask.to(p.device)))
            self._bound, self._model_id = bound, id(model)
        return self._bound

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned weights of ``model`` now."""
        for p, pruned in self._bind(model):
            p.masked_fill_(pruned, 0)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.apply(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None and not self.managed:
            self.apply(model)

    def on_train_end(self, args, state, control, **kwargs):
        self.managed = False


# ------------------------------------------------------------------------------------------------ export
_AUTO_CLASSES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    ("MODEL_MAPPING_NAMES", "AutoModel"),
)
TASK_OF_AUTO_CLASS = {
    "AutoModelForCausalLM": "causal_lm",
    "AutoModelForMaskedLM": "masked_lm",
    "AutoModelForSequenceClassification": "sequence_classification",
}


def auto_class_for(class_name: str):
    """The transformers Auto class whose mapping holds ``class_name`` (e.g. ``LlamaForCausalLM``), or None."""
    import transformers
    from transformers.models.auto import modeling_auto

    for mapping_name, auto_name in _AUTO_CLASSES:
        if class_name in getattr(modeling_auto, mapping_name, {}).values():
            return getattr(transformers, auto_name)
    return None


def _auto_class(model: nn.Module):
    """The Auto class that rebuilds ``model``'s class from its config (the class itself when no mapping holds it)."""
    return auto_class_for(type(model).__name__) or type(model)


def _probe_inputs(model: nn.Module) -> dict[str, Tensor]:
    """A fixed input for the logits check: token ids 1..16 (within the vocabulary), one sequence."""
    config = model.config
    vocab = getattr(config, "vocab_size", 32) or 32
    length = min(16, getattr(config, "max_position_embeddings", 16) or 16)
    ids = (torch.arange(length) % max(vocab - 1, 1) + 1).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = model(**{k: v.to(device) for k, v in inputs.items()})
    finally:
        model.train(was_training)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.detach().float().cpu()


def verify_export(model: nn.Module, directory: str | os.PathLike, report: PruneReport) -> dict[str, Any]:
    """Reload ``directory`` with the matching Auto class and compare it with the in-memory ``model``: every tensor
    equal (shapes, values, so the zero pattern), the measured sparsity equal to the report's, and the logits on a fixed
    input. Raises [`HfEwcError`] on any mismatch; returns what was checked."""
    auto = _auto_class(model)
    try:
        reloaded = auto.from_pretrained(str(directory), dtype=next(model.parameters()).dtype)
    except Exception as err:  # any loading failure means the export is unusable
        where = f"{auto.__name__}.from_pretrained({str(directory)!r})"
        raise HfEwcError(f"reload verification failed: {where}: {err}") from err
    reloaded.to(next(model.parameters()).device)  # same device, same kernels: the logits must match exactly
    ours = dict(model.named_parameters())
    theirs = dict(reloaded.named_parameters())
    if set(ours) != set(theirs):
        extra = sorted(set(ours) ^ set(theirs))
        raise HfEwcError(f"reload verification failed: parameter names differ (first: {extra[0]!r}).")
    for name, p in ours.items():
        q = theirs[name]
        if tuple(p.shape) != tuple(q.shape):
            raise HfEwcError(
                f"reload verification failed: {name!r} reloads with shape {tuple(q.shape)}, not {tuple(p.shape)}."
            )
        if not torch.equal((p.detach().cpu() == 0), (q.detach().cpu() == 0)):
            raise HfEwcError(f"reload verification failed: the zero pattern of {name!r} changed on reload.")
        if not torch.equal(p.detach().cpu(), q.detach().cpu()):
            raise HfEwcError(f"reload verification failed: the values of {name!r} changed on reload.")
    measured = measure_sparsity(reloaded, report.layers)
    for name, m in measured.items():
        if m["zeros"] != report.layers[name]["zeros"] or m["shape"] != report.layers[name]["shape"]:
            raise HfEwcError(
                f"reload verification failed: {name!r} has {m['zeros']} zeros / shape {m['shape']} after reload, the "
                f"report says {report.layers[name]['zeros']} / {report.layers[name]['shape']}."
            )
    inputs = _probe_inputs(model)
    expected, got = _logits(model, inputs), _logits(reloaded, inputs)
    diff = float((expected - got).abs().max()) if expected.shape == got.shape else math.inf
    if not diff <= 1e-5 * max(1.0, float(expected.abs().max())):
        raise HfEwcError(f"reload verification failed: logits on the probe input differ by {diff:.3g}.")
    return {
        "auto_class": auto.__name__,
        "tensors_compared": len(ours),
        "zeros": sum(m["zeros"] for m in measured.values()),
        "max_logit_difference": diff,
        "probe_shape": list(inputs["input_ids"].shape),
    }


def _base_model_name(model: nn.Module) -> str | None:
    """The Hub id the model was loaded from (a local path is not a base model the Hub can link)."""
    name = getattr(model.config, "_name_or_path", None)
    return name if name and not os.path.exists(name) else None


def _pruned_card(model, report: PruneReport, verification: dict, *, base_model: str | None, auto_name: str):
    from huggingface_hub import ModelCard, ModelCardData

    pipeline_tag = {
        "AutoModelForCausalLM": "text-generation",
        "AutoModelForMaskedLM": "fill-mask",
        "AutoModelForSequenceClassification": "text-classification",
    }.get(auto_name)
    tags = ["hf-ewc", "pruned", "sparse", f"sparsity-{round(100 * report.global_sparsity)}", report.structure]
    data = ModelCardData(library_name="transformers", base_model=base_model, pipeline_tag=pipeline_tag, tags=tags)
    what = {
        "masked": "pruned weights are stored as exact zeros (dense safetensors)",
        "zeroed": "pruned heads are stored as exact zeros (the config cannot express fewer heads)",
        "physical": "pruned structures are removed: the shapes are smaller and `config.json` describes them",
    }[report.removal]
    evaluation = ""
    if report.evaluation:
        rows = ["| metric | before | after |", "|---|---|---|"]
        before, after = report.evaluation.get("before", {}), report.evaluation.get("after", {})
        for key in before:
            if isinstance(before[key], (int, float)) and isinstance(after.get(key), (int, float)):
                rows.append(f"| {key} | {before[key]:.4f} | {after[key]:.4f} |")
        evaluation = (
            f"\n## Evaluation\n\nOn {report.evaluation.get('data', 'the given data')} "
            f"({report.evaluation.get('examples', '?')} examples):\n\n" + "\n".join(rows) + "\n"
        )
    structured = ""
    if report.structured:
        per = report.structured.get("per_layer", {})
        structured = f"\nStructured: {report.structured['unit']}s, per layer {per}.\n"
        if report.structured.get("note"):
            structured += f"{report.structured['note']}\n"
    source = f" Importances: {report.importance_source}." if report.importance_source else ""
    keep = (
        "The removed structures are gone from the shapes: fine-tune it like any model."
        if report.removal == "physical"
        else "To fine-tune further without regrowing the pruned weights, pass "
        "`hf_ewc.KeepSparsityCallback.from_zeros(model)` to the Trainer (`hf-ewc train` does it by itself: the "
        "config's `sparsity_config` names the pruned tensors)."
    )
    content = f"""---
{data.to_yaml()}
---

# Pruned {type(model).__name__}{f" (from `{base_model}`)" if base_model else ""}

Pruned with [hf-ewc](https://github.com/hf-ewc/hf-ewc) `prune_model`: **{report.structure}** pruning by
**{report.criterion}** ({report.scope}), {report.global_sparsity:.1%} of the targeted weights pruned; {what}.{source}
Parameters: {report.num_parameters_before:,} → {report.num_parameters_after:,}.
{structured}
`config.json` carries a `sparsity_config` (`format: dense`, `sparsity_structure`, `global_sparsity`, per-layer
sparsity) and `pruning_report.json` the full report. The export was reloaded with `{auto_name}.from_pretrained` and
checked: every tensor equal, {verification["zeros"]:,} zeros where expected, logits on a fixed input within
{verification["max_logit_difference"]:.1e}.
{evaluation}
## How to load

```python
from transformers import {auto_name}

model = {auto_name}.from_pretrained("PATH_OR_REPO")
```

{keep}

## Per-layer sparsity

{report.table(max_rows=200)}
"""
    return ModelCard(content)


def export_pruned(
    model: nn.Module,
    out_dir: str | os.PathLike,
    report: PruneReport,
    *,
    tokenizer: Any = None,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    overwrite: bool = False,
    base_model: str | None = None,
) -> dict[str, Any]:
    """Save a pruned model in Hub format and verify it by reloading.

    Writes ``save_pretrained`` safetensors (with ``sparsity_config`` in ``config.json``), the tokenizer,
    ``pruning_report.json`` and ``README.md`` (a `huggingface_hub.ModelCard`) into a temporary folder next to
    ``out_dir``, reloads it with the matching Auto class and checks it against ``model`` ([`verify_export`]); only a
    verified folder becomes ``out_dir``. With ``push_to_hub``, the verified folder is uploaded to ``repo_id``.

    Returns the verification summary.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise HfEwcError(f"{str(out)!r} already exists; choose another output directory or pass overwrite=True.")
    if out.exists() and not out.is_dir():
        raise HfEwcError(f"{str(out)!r} exists and is not a directory.")
    if push_to_hub and not repo_id:
        raise HfEwcError("push_to_hub needs repo_id (e.g. 'user/model-pruned-50').")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    config = model.config
    had = hasattr(config, "sparsity_config")
    previous = getattr(config, "sparsity_config", None)
    try:
        config.sparsity_config = report.sparsity_config()
        try:
            model.save_pretrained(str(tmp))
        finally:
            if had:
                config.sparsity_config = previous
            else:
                delattr(config, "sparsity_config")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        verification = verify_export(model, tmp, report)
        written = json.loads((tmp / "config.json").read_text(encoding="utf-8")).get("sparsity_config")
        if written != json.loads(json.dumps(report.sparsity_config())):
            raise HfEwcError("reload verification failed: config.json does not carry the sparsity_config written.")
        report_dict = report.to_dict()
        report_dict["verification"] = verification
        write_json_atomic(tmp / REPORT_NAME, report_dict)
        auto_name = verification["auto_class"]
        base = base_model if base_model is not None else _base_model_name(model)
        _pruned_card(model, report, verification, base_model=base, auto_name=auto_name).save(str(tmp / "README.md"))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"Exported and verified the pruned model in {out}.")
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo_id, commit_message=f"hf_ewc: {report.summary()}")
        verification["pushed_to"] = repo_id
    return verification


# ------------------------------------------------------------------------------------------------ from a directory
def _load_pretrained(name: str, *, revision: str | None, trust_remote_code: bool):
    """A model by Hub id or directory; an adapter directory (a LoRA `hf-ewc train` run) is merged into its base
    model (`merge_and_unload`), so that what is pruned and exported is one plain model."""
    from transformers import AutoConfig

    if os.path.isdir(name) and is_adapter_dir(name):
        base, auto_name = _load_pretrained(base_model_of(name), revision=revision, trust_remote_code=trust_remote_code)
        merged = load_adapter(base, name, trainable=False).merge_and_unload()
        return merged.requires_grad_(True), auto_name  # a plain model again: every weight counts

    looks_local = os.path.isabs(name) or name.startswith(".") or name.count("/") > 1 or os.sep in name.rstrip("/")
    if not os.path.exists(name) and looks_local:
        raise HfEwcError(f"model directory {name!r} does not exist; give a directory written by save_pretrained.")
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:  # OSError, ValueError, JSON errors: all mean "this is not a loadable model"
        raise HfEwcError(
            f"cannot load a model from {name!r}: {str(err).splitlines()[0]}. Give a directory written by "
            "save_pretrained (config.json + weights) or a Hub id."
        ) from err
    architectures = getattr(config, "architectures", None) or []
    auto = next((a for a in map(auto_class_for, architectures) if a is not None), None)
    if auto is None:
        raise HfEwcError(
            f"{name!r}: config.json names no architecture transformers knows ({architectures or 'none'}); save the "
            "model with save_pretrained from a task class (e.g. LlamaForCausalLM)."
        )
    try:
        model = auto.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:  # missing or corrupt weights
        raise HfEwcError(f"cannot load the model weights from {name!r}: {str(err).splitlines()[0]}") from err
    return model, auto.__name__


def prune_pretrained(
    model_name_or_path: str,
    out_dir: str | os.PathLike,
    *,
    sparsity: float | None,
    criterion: str = "magnitude",
    importances: Any = None,
    data_files: list[str] | None = None,
    text_column: str = "text",
    label_column: str = "label",
    max_samples: int | None = 256,
    max_eval_samples: int | None = 256,
    max_length: int | None = None,
    batch_size: int = 8,
    scope: str | None = None,
    structure: str = "unstructured",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    print_fn=print,
) -> tuple[PruneReport, dict[str, Any]]:
    """`hf-ewc prune`: load a saved model, prune it, evaluate before/after on ``data_files`` (if given), export and
    verify. Every input is checked before anything is written; ``out_dir`` appears only once verified.

    Importances come from ``importances`` (an EWC state directory), else from the model directory's own EWC state
    (an `hf-ewc train` run keeps one in ``ewc_state/``), else are collected on ``data_files``.
    """
    _, _, sparsity, scope = check_prune_arguments(sparsity, criterion, structure, scope, include, exclude)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise HfEwcError(f"output directory {str(out)!r} already exists; choose another --out or pass --overwrite.")
    if os.path.exists(model_name_or_path) and out.resolve() == Path(model_name_or_path).resolve():
        raise HfEwcError("--out is the model directory itself; export the pruned model somewhere else.")
    if push_to_hub is not None and "/" not in push_to_hub:
        raise HfEwcError(f"--push-to-hub {push_to_hub!r}: give a repository id like 'user/model-pruned'.")
    if importances is not None and not isinstance(importances, (EWCState, Mapping)):
        if not os.path.exists(importances):
            raise HfEwcError(f"importances directory {str(importances)!r} does not exist.")
        importances = EWCState.load(importances)
    adapter = os.path.isdir(model_name_or_path) and is_adapter_dir(model_name_or_path)
    if criterion != "magnitude" and importances is None and os.path.isdir(model_name_or_path):
        found = find_ewc_state(model_name_or_path)
        if found is not None and adapter:
            if not data_files:
                raise HfEwcError(
                    f"{model_name_or_path} is a LoRA run: its EWC state covers the adapter, not the merged weights "
                    f"that are pruned; pass --data FILE to measure {IMPORTANCE_OF[criterion]} importances on the "
                    "merged model, or use --criterion magnitude."
                )
            print_fn("[hf_ewc] importances: measured on --data (the run's EWC state covers the LoRA adapter only)")
        elif found is not None:
            print_fn(f"[hf_ewc] importances: the EWC state in {found}")
            importances = EWCState.load(found)
    model, auto_name = _load_pretrained(model_name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            model_name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
    except Exception as err:  # a model saved without its tokenizer can still be pruned without data
        if data_files:
            raise HfEwcError(f"--data needs the model's tokenizer, which {model_name_or_path!r} lacks: {err}") from err
        logger.warning(f"No tokenizer in {model_name_or_path!r}; exporting the model without one.")
    data = None
    task = TASK_OF_AUTO_CLASS.get(auto_name)
    if data_files:
        if task is None:
            raise HfEwcError(f"--data evaluates causal LM, masked LM or classification models, not {auto_name}.")
        data = _prune_data(model, tokenizer, task, data_files, text_column, label_column, max_samples,
                           max_eval_samples, max_length, seed)  # fmt: skip
    before = None
    if data is not None:
        from .pipeline import evaluate_model

        before = evaluate_model(model, data.eval, task, tokenizer, batch_size=batch_size)
    collect_kwargs = None
    if data is not None:
        from .data import train_collator

        collect_kwargs = {"max_samples": max_samples, "batch_size": batch_size,
                          "data_collator": train_collator(task, tokenizer)}  # fmt: skip
    report = prune_model(
        model, sparsity, criterion=criterion, importances=importances, scope=scope, structure=structure,
        include=include, exclude=exclude, data=data.train if data is not None and importances is None else None,
        collect_kwargs=collect_kwargs,
    )  # fmt: skip
    if data is not None:
        from .pipeline import evaluate_model

        after = evaluate_model(model, data.eval, task, tokenizer, batch_size=batch_size)
        report.evaluation = {
            "data": ", ".join(map(str, data_files)),
            "examples": len(data.eval),
            "before": before,
            "after": after,
        }
    base = hub_base_of(model_name_or_path) if adapter else model_name_or_path
    base = base if base is not None and not os.path.exists(base) else None
    verification = export_pruned(
        model, out, report, tokenizer=tokenizer, push_to_hub=push_to_hub is not None, repo_id=push_to_hub,
        overwrite=overwrite, base_model=base,
    )  # fmt: skip
    print_fn(format_report(report, verification, out))
    return report, verification


def _prune_data(model, tokenizer, task, data_files, text_column, label_column, max_samples, max_eval_samples,
                max_length, seed):  # fmt: skip
    from .config import DomainSpec
    from .data import check_max_length, load_raw_domain, tokenize_domain

    spec = DomainSpec(
        name="data", data_files=list(data_files), text_column=text_column, label_column=label_column,
        max_samples=max_samples, max_eval_samples=max_eval_samples,
    )  # fmt: skip
    config = model.config
    if max_length is None:
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 128
        max_length = min(128, limit - (2 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0))
    check_max_length(config, max_length, "--data")
    raw = load_raw_domain(spec, 0, task=task, seed=seed, base_dirs=[Path.cwd()])
    label2id = None
    if task == "sequence_classification":
        label2id = {**{i: i for i in range(config.num_labels)}, **dict(config.label2id or {})}
    return tokenize_domain(raw, spec, 0, tokenizer, task=task, max_length=max_length, seed=seed, label2id=label2id)


def format_report(report: PruneReport, verification: dict[str, Any], out: str | os.PathLike) -> str:
    """The summary `hf-ewc prune` prints: per-layer table, totals, evaluation, verification."""
    lines = [report.table(max_rows=40), "", report.summary()]
    if report.structured:
        lines.append(f"structured: {report.structured['unit']}s per layer {report.structured['per_layer']}")
        if report.structured.get("note"):
            lines.append(report.structured["note"])
    if report.evaluation:
        before, after = report.evaluation["before"], report.evaluation["after"]
        shown = ", ".join(
            f"{k} {before[k]:.4f} → {after[k]:.4f}" for k in before if isinstance(before[k], (int, float))
        )
        lines.append(f"evaluation ({report.evaluation['examples']} examples): {shown}")
    lines.append(
        f"verified by {verification['auto_class']}.from_pretrained: {verification['tensors_compared']} tensors equal, "
        f"{verification['zeros']:,} zeros, max logit difference {verification['max_logit_difference']:.1e}"
    )
    lines.append(
        f"saved to {out}" + (f" and pushed to {verification['pushed_to']}" if "pushed_to" in verification else "")
    )
    return "\n".join(lines)
