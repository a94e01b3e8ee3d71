"""Export a pruned model in Hub format and prove it: ``save_pretrained`` + ``sparsity_config`` + report + model card,
reloaded with the matching Auto class and compared before the folder gets its name; then, if asked, ``push_to_hub``.
"""

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub import ModelCard, ModelCardData
from torch import Tensor, nn

from ..models import auto_class_for, pipeline_tag
from ..utils import HfEwcError, atomic_directory, logger, write_json_atomic
from .report import REPORT_NAME, PruneReport, measure_sparsity


def _auto_class(model: nn.Module):
    """The Auto class that rebuilds ``model``'s class from its config (the class itself when no mapping holds it)."""
    return auto_class_for(type(model).__name__) or type(model)


def probe_inputs(model: nn.Module) -> dict[str, Tensor]:
    """A fixed input for the logits check: token ids 1..16 (within the vocabulary), one sequence."""
    config = model.config
    vocab = getattr(config, "vocab_size", 32) or 32
    length = min(16, getattr(config, "max_position_embeddings", 16) or 16)
    ids = (torch.arange(length) % max(vocab - 1, 1) + 1).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def model_logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
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
    inputs = probe_inputs(model)
    expected, got = model_logits(model, inputs), model_logits(reloaded, inputs)
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
    tags = ["hf-ewc", "pruned", "sparse", f"sparsity-{round(100 * report.global_sparsity)}", report.structure]
    data = ModelCardData(
        library_name="transformers", base_model=base_model, pipeline_tag=pipeline_tag(auto_name), tags=tags
    )
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

Pruned with `hf-ewc` `prune_model`: **{report.structure}** pruning by
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
    with atomic_directory(out, replace=overwrite) as tmp:
        with _sparsity_config(model.config, report.sparsity_config()):
            model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        verification = verify_export(model, tmp, report)
        written = json.loads((tmp / "config.json").read_text(encoding="utf-8")).get("sparsity_config")
        if written != json.loads(json.dumps(report.sparsity_config())):
            raise HfEwcError("reload verification failed: config.json does not carry the sparsity_config written.")
        write_json_atomic(tmp / REPORT_NAME, {**report.to_dict(), "verification": verification})
        base = base_model if base_model is not None else _base_model_name(model)
        card = _pruned_card(model, report, verification, base_model=base, auto_name=verification["auto_class"])
        card.save(str(tmp / "README.md"))
    logger.info(f"Exported and verified the pruned model in {out}.")
    if push_to_hub:
        api = huggingface_hub.HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo_id, commit_message=f"hf_ewc: {report.summary()}")
        verification["pushed_to"] = repo_id
    return verification


@contextlib.contextmanager
def _sparsity_config(config, value: dict[str, Any]):
    """``config.sparsity_config = value`` while saving; the in-memory model keeps what it had."""
    had, previous = hasattr(config, "sparsity_config"), getattr(config, "sparsity_config", None)
    config.sparsity_config = value
    try:
        yield
    finally:
        if had:
            config.sparsity_config = previous
        else:
            delattr(config, "sparsity_config")
