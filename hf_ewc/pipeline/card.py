"""Model cards (`huggingface_hub.ModelCard`) for what `hf-ewc train` leaves behind."""

import os
from pathlib import Path

from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
from huggingface_hub import ModelCard, ModelCardData

from .._version import __version__
from ..models import auto_model_class, pipeline_tag
from ..utils import atomic_path
from .run_config import RunConfig


_LOADERS = set(_PACKAGED_DATASETS_MODULES)  # datasets' own builders (json, csv, text, …): not Hub datasets
DEFINITIONS = (
    "R[i][j] is the metric on domain j after training on domain i; b[j] is the metric of the model before the "
    "sequence. **ACC** = mean_j R[T][j] (final metric, all domains). **BWT** = mean_{j<T} (R[T][j] − R[j][j]) and "
    "**FWT** = mean_{j>1} (R[j−1][j] − b[j]), both signed so that positive is better (for a loss: lower). "
    "**Forgetting** of domain j = best R[l][j] over l ∈ [j, T−1] minus R[T][j], positive when the final model is "
    "worse. **Learned** = the gain on domain j from training on it."
)


def _method(training: dict) -> str:
    mode = training.get("ewc_mode", "stabilized")
    if mode == "off":
        return "plain fine-tuning (ewc_mode: off; importances still collected so the sequence can be continued)"
    if mode == "clnp":
        return (
            f"CLNP, continual learning by neural pruning (L1 {training.get('clnp_l1', 0.03):g} on the free units' "
            f"{training.get('clnp_l1_target', 'activations')}, margin {training.get('clnp_margin', 0.3):g} nats): "
            "each domain owns FFN neurons and attention heads, later domains train only free ones, embeddings, norms "
            "and the head are frozen after the first domain. The allocation is `ewc_state/clnp_state.safetensors`; "
            "evaluate a domain under its units with `CLNP.load(model, 'ewc_state').domain(name)`, or export it alone "
            "with `hf-ewc prune . --clnp-domain NAME --out DIR`"
        )
    method = training.get("importance_method", "fisher")
    if method in ("fisher", "sqrt_fisher"):
        method += f" ({training.get('fisher_estimator', 'empirical')} estimator)"
    elif method == "sos":
        method += f" (α = {training.get('sos_alpha', 0.0):g})"
    elif method == "signal":
        method += f" (bias rule: {training.get('signal_bias', 'abs')})"
    lam = training.get("ewc_lambda", 0.03)
    consolidation = training.get("consolidation", "sum")
    if mode == "wva":
        attenuation = training.get("wva_attenuation", "hyperbolic")
        formula = "1/(1 + λΩ)" if attenuation == "hyperbolic" else "exp(−λΩ)"
        return (
            f"weight-velocity attenuation (WVA, {attenuation} a = {formula} on the optimizer's "
            f"{training.get('wva_apply', 'deltas')}), λ = {lam:g}, importances: {method}, consolidation: "
            f"{consolidation}"
        )
    return f"{mode} EWC, λ = {lam:g}, importances: {method}, consolidation: {consolidation}"


def _protected(state: dict, parameters: dict | None) -> str:
    """Which parameters the EWC state protects, in words."""
    count = state.get("num_parameters")
    if not count:
        return "none (no EWC state)"
    tensors = state.get("num_tensors")
    where = f"{count:,} in {tensors} tensors" if tensors else f"{count:,}"
    lora = (parameters or {}).get("peft")
    if not lora:
        return f"{where}: every trainable parameter (full fine-tuning)"
    targets = lora["target_modules"]
    targets = ", ".join(targets) if isinstance(targets, list) else targets
    saved = f" and the fully trained {', '.join(lora['modules_to_save'])}" if lora["modules_to_save"] else ""
    frozen = parameters["total_parameters"] - parameters["trainable_parameters"]
    return (
        f"{where}: the LoRA adapter (r = {lora['r']}, α = {lora['alpha']:g}, on {targets}){saved}. The base model's "
        f"{frozen:,} parameters are frozen (in `base_model/`) and need no protection"
    )


def _usage(out_dir: Path, auto_class: str, lora: bool) -> str:
    if not lora:
        return f"""```python
from transformers import {auto_class}, AutoTokenizer

model = {auto_class}.from_pretrained("{out_dir}")
tokenizer = AutoTokenizer.from_pretrained("{out_dir}")
```"""
    return f"""The adapter is at the top of this folder, the frozen base model in `base_model/`:

```python
from peft import PeftModel
from transformers import {auto_class}, AutoTokenizer

base = {auto_class}.from_pretrained("{out_dir}/base_model")
model = PeftModel.from_pretrained(base, "{out_dir}")
tokenizer = AutoTokenizer.from_pretrained("{out_dir}")
merged = model.merge_and_unload()  # one plain model (what `hf-ewc prune {out_dir}` starts from)
```"""


def write_model_card(
    out_dir: str | os.PathLike,
    *,
    run: RunConfig,
    results: dict,
    markdown_tables: str,
    from_dir: str | None = None,
) -> ModelCard:
    """Write ``README.md`` in ``out_dir``: domains, method, the evaluation tables, and how to continue the sequence."""
    out_dir = Path(out_dir)
    hub_datasets = sorted(
        {d.dataset for d in run.domains if d.dataset and d.dataset not in _LOADERS and not os.path.exists(d.dataset)}
    )
    name = run.model.name_or_path
    base_model = name if name and not os.path.exists(name) else None
    auto_class = auto_model_class(run.task).__name__
    data = ModelCardData(
        library_name="transformers",
        base_model=base_model,
        datasets=hub_datasets or None,
        pipeline_tag=pipeline_tag(run.task),
        tags=["hf-ewc", "continual-learning", "elastic-weight-consolidation", "domain-adaptation"],
    )
    state = results.get("ewc_state") or {}
    protected = _protected(state, results.get("parameters"))
    if results.get("clnp"):
        protected = (
            "the units each domain owns (FFN neurons, attention heads; see *CLNP units* below) and, after the first "
            "domain, every parameter of no unit; the EWC state beside them holds uniform importances, so the sequence "
            "can also be continued with EWC"
        )
    lora = (results.get("parameters") or {}).get("peft")
    if lora:
        data.library_name = "peft"
        data.tags = [*data.tags, "lora"]
    detail = {d["name"]: d for d in results["domains_detail"]}
    rows = [
        "| # | domain | data | training examples | evaluation examples | steps |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for i, d in enumerate(run.domains):
        source = d.dataset if d.dataset and d.dataset not in _LOADERS else "local files"
        if d.dataset_config:
            source += f" ({d.dataset_config})"
        stats = detail.get(d.name, {}).get("train", {})
        examples = stats.get("examples", {})
        rows.append(
            f"| {i} | {d.name} | {source} | {examples.get('train_examples', '–')} | "
            f"{examples.get('eval_examples', '–')} | {stats.get('steps', '–')} |"
        )
    pruning = results.get("pruning")
    pruned = ""
    if pruning:
        rep = pruning["report"]
        pruned = (
            f"\n- Pruned after {pruning['after']}: {rep['structure']} by {rep['criterion']} ({rep['scope']}), "
            f"{rep['global_sparsity']:.1%} of {len(rep['layers'])} tensors ({rep['removal']}); later domains trained "
            "with the pruned weights held at zero. `config.json` carries the `sparsity_config`, `results.json` the "
            "report and the evaluation just before pruning (`pruning.row_before`)."
        )
        data.tags = [*data.tags, "pruned", "sparse"]
    start = (
        f"the continual-ready checkpoint `{from_dir}` (its EWC state protected the earlier domains)"
        if from_dir
        else (f"`{run.model.name_or_path}`" if run.model.name_or_path else "a model built from its config")
    )
    body = f"""
# {out_dir.resolve().name}

A {run.task.replace("_", " ")} model adapted to {len(run.domains)} domain(s) in sequence with
`hf-ewc` {__version__}, starting from {start}.

## Domains, in training order

{chr(10).join(rows)}

## Method

- {_method(run.training)}
- Protected parameters: {protected}; the importances and anchors are in `ewc_state/` (safetensors).
- Learning rate {run.training.get("learning_rate", 5e-5):g}, seed {run.seed}; the full configuration is in
  `results.json` (`config`).{pruned}

## Evaluation

{markdown_tables}

{DEFINITIONS}

## Use it, or continue the sequence

{_usage(out_dir, auto_class, bool(lora))}

To teach it further domains without forgetting these (no old data needed):

```bash
hf-ewc train next_domains.yaml --from {out_dir}
```
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    with atomic_path(out_dir / "README.md") as tmp:
        card.save(tmp)
    return card
