"""`hf-ewc prune`: load a saved model (a LoRA run is merged first), prune it, evaluate it before and after on given
data, export and verify — and the `prune:` block of `hf-ewc train`, which prunes inside a run by its own importances.
"""

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from ..clnp import CLNP, CLNP_STATE_NAME
from ..models import auto_class_for, check_max_length, max_positions, task_of_auto_class
from ..pruning import (
    IMPORTANCE_OF,
    PruneReport,
    accepts_head_count,
    check_prune_arguments,
    export_pruned,
    finish_report,
    model_logits,
    num_parameters,
    probe_inputs,
    prune_ffn,
    prune_heads,
    prune_model,
)
from ..state import EWCState, find_ewc_state
from ..utils import HfEwcError, check_finite_weights, check_output_dir, error_line, logger
from .adapters import base_model_of, hub_base_of, is_adapter_dir, load_adapter
from .data import load_raw_domain, tokenize_domain, train_collator
from .evaluation import evaluate_model
from .run_config import DomainSpec, PruneSpec
from .sources import check_model_source


def _check_repo_id(push_to_hub: str | None) -> None:
    if push_to_hub is not None and "/" not in push_to_hub:
        raise HfEwcError(f"--push-to-hub {push_to_hub!r}: give a repository id like 'user/model-pruned'.")


def prune_in_run(model, state: EWCState, spec: PruneSpec) -> PruneReport:
    """The `prune:` block: prune ``model`` by the just-consolidated ``state`` (or by magnitude), fit the state to the
    pruned model (anchors of pruned weights 0, removed rows cut) and record the sparsity in the model's config."""
    report = prune_model(
        model, spec.sparsity, criterion=spec.criterion,
        importances=state if spec.criterion != "magnitude" else None, scope=spec.scope, structure=spec.structure,
        include=spec.include, exclude=spec.exclude, show_progress=False,
    )  # fmt: skip
    report.apply_to_state(state)
    model.config.sparsity_config = report.sparsity_config()
    return report


def load_pretrained(name: str, *, revision: str | None, trust_remote_code: bool):
    """A model by Hub id or directory; an adapter directory (a LoRA `hf-ewc train` run) is merged into its base
    model (`merge_and_unload`), so that what is pruned and exported is one plain model."""
    if os.path.isdir(name) and is_adapter_dir(name):
        base, auto_name = load_pretrained(base_model_of(name), revision=revision, trust_remote_code=trust_remote_code)
        merged = load_adapter(base, name, trainable=False).merge_and_unload()
        check_finite_weights(merged, f"the model merged from the adapter in {name!r}")
        return merged.requires_grad_(True), auto_name  # a plain model again: every weight counts

    check_model_source(name, revision=revision, key="model")
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:  # OSError, ValueError, JSON errors: all mean "this is not a loadable model"
        raise HfEwcError(
            f"cannot load a model from {name!r}: {error_line(err)}. Give a directory written by "
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
        raise HfEwcError(f"cannot load the model weights from {name!r}: {error_line(err)}") from err
    check_finite_weights(model, f"model {name!r}")
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
    out = check_output_dir(out_dir, overwrite=overwrite, source=model_name_or_path)
    _check_repo_id(push_to_hub)
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
    model, auto_name = load_pretrained(model_name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
    except Exception as err:  # a model saved without its tokenizer can still be pruned without data
        if data_files:
            raise HfEwcError(f"--data needs the model's tokenizer, which {model_name_or_path!r} lacks: {err}") from err
        logger.warning(f"No tokenizer in {model_name_or_path!r}; exporting the model without one.")
    data = None
    task = task_of_auto_class(auto_name)
    if data_files:
        if task is None:
            raise HfEwcError(f"--data evaluates causal LM, masked LM or classification models, not {auto_name}.")
        data = data_for_model(model, tokenizer, task, data_files, text_column, label_column, max_samples,
                           max_eval_samples, max_length, seed)  # fmt: skip
    before = None
    if data is not None:
        before = evaluate_model(model, data.eval, task, tokenizer, batch_size=batch_size)
    collect_kwargs = None
    if data is not None:
        collect_kwargs = {"max_samples": max_samples, "batch_size": batch_size,
                          "data_collator": train_collator(task, tokenizer)}  # fmt: skip
    report = prune_model(
        model, sparsity, criterion=criterion, importances=importances, scope=scope, structure=structure,
        include=include, exclude=exclude, data=data.train if data is not None and importances is None else None,
        collect_kwargs=collect_kwargs,
    )  # fmt: skip
    if data is not None:
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


def data_for_model(model, tokenizer, task, data_files, text_column, label_column, max_samples, max_eval_samples,
                max_length, seed):  # fmt: skip
    spec = DomainSpec(
        name="data", data_files=list(data_files), text_column=text_column, label_column=label_column,
        max_samples=max_samples, max_eval_samples=max_eval_samples,
    )  # fmt: skip
    config = model.config
    if max_length is None:
        max_length = min(128, max_positions(config) or 128)
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


def export_clnp_domain(
    run_dir: str | os.PathLike,
    domain: str,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    print_fn=print,
) -> tuple[PruneReport, dict[str, Any]]:
    """`hf-ewc prune RUN --clnp-domain NAME`: the model of one domain of an `ewc_mode: clnp` run as a standard Hub
    checkpoint. The units domain NAME does not use (later domains' and free ones) are zeroed, then removed by the
    pruner's FFN-neuron and attention-head surgery down to the largest count any block keeps (a config has one width
    for all blocks; the few extra units of narrower blocks stay, zeroed). Before anything is written, its logits on a
    probe input must equal the run's model evaluated under the domain's units (``CLNP.domain``); the export is then
    reload-verified like any pruned model."""
    run = str(run_dir)
    out = check_output_dir(out_dir, overwrite=overwrite, source=run)
    _check_repo_id(push_to_hub)
    state_dir = find_ewc_state(run) if os.path.isdir(run) else None
    if state_dir is None or not (state_dir / CLNP_STATE_NAME).is_file():
        raise HfEwcError(
            f"{run} holds no CLNP allocation ({CLNP_STATE_NAME} beside its EWC state): --clnp-domain exports a domain "
            "of an `ewc_mode: clnp` run (its output_dir)."
        )
    if is_adapter_dir(run):
        raise HfEwcError(f"{run} is a LoRA run; CLNP allocates a full model's units, so it has no domain to export.")
    model, _ = load_pretrained(run, revision=None, trust_remote_code=False)
    clnp = CLNP.load(model, state_dir)
    index = clnp.index(domain)  # an unknown name is refused here, listing the run's domains
    if clnp.kind != "transformer":
        raise HfEwcError(f"--clnp-domain exports transformer models; {type(model).__name__} is an MLP chain.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(run)
    except Exception:  # noqa: BLE001 - a model saved without its tokenizer is exported without one
        tokenizer = None
    probe = probe_inputs(model)
    with clnp.domain(index):
        expected = model_logits(model, probe)
    clnp.isolate(index)
    used = dict(zip(clnp.names, clnp.used_by(index)))
    params_before = num_parameters(model)
    done = []
    ffn = [u for n, u in used.items() if not n.endswith(".heads")]
    if ffn:
        width = len(ffn[0])
        keep = max(1, max(int(u.sum()) for u in ffn))
        done.append(prune_ffn(model, 1 - keep / width, "magnitude", None, False))
    heads = [u for n, u in used.items() if n.endswith(".heads")]
    if heads:
        total = len(heads[0])
        kv = getattr(model.config, "num_key_value_heads", None) or total
        size = total // kv if kv < total else total  # the pruner removes as many query heads from every kv group
        groups = total // size
        keep = max(1, max(int(u[g * size : (g + 1) * size].sum()) for u in heads for g in range(groups)))
        # the smallest count the config's class accepts (Llama's wants one that divides hidden_size)
        keep = next((k for k in range(keep, size + 1) if accepts_head_count(model.config, k * groups, kv if
                     groups > 1 else k)), None)  # fmt: skip
        if keep is None:
            raise HfEwcError(f"{type(model.config).__name__} accepts no head count for the export of {domain!r}.")
        done.append(prune_heads(model, 1 - keep / size, "magnitude", None, False))
    got = model_logits(model, probe)
    diff = float((expected - got).abs().max()) if expected.shape == got.shape else math.inf
    if not diff <= 1e-5 * max(1.0, float(expected.abs().max())):
        raise HfEwcError(f"the export of {domain!r} does not compute what the run does under its units (logits differ "
                         f"by {diff:.3g}); nothing was written.")  # fmt: skip
    report = finish_report(
        model, {k: v for d in done for k, v in d.originals.items()}, criterion=f"clnp units of {domain}",
        scope="per_layer", structure="clnp", sparsity=0.0,
        removal="physical" if all(d.removal == "physical" for d in done) else "zeroed", params_before=params_before,
        source=str(state_dir / CLNP_STATE_NAME), masks={k: v for d in done for k, v in d.masks.items()},
        slices={k: v for d in done for k, v in d.slices.items()},
        structured={
            "unit": "unit used by domain", "domain": domain, "domains_in_run": clnp.domains,
            "per_layer": {n: f"{int(u.sum())} of {len(u)}" for n, u in used.items()},
            "note": f"The units of domain {domain} and of the domains before it; the others were zeroed, then removed "
            "down to the widest block (a config has one FFN width and one head count for all blocks).",
            "surgery": [d.structured for d in done], "max_logit_difference_vs_masked_run": diff,
        },
    )  # fmt: skip
    verification = export_pruned(
        model, out, report, tokenizer=tokenizer, push_to_hub=push_to_hub is not None, repo_id=push_to_hub,
        overwrite=overwrite, base_model=None,
    )  # fmt: skip
    print_fn(
        f"[hf_ewc] domain {domain} ({index + 1} of {len(clnp.domains)})"
        + f"\nlogits equal the run's under the domain's units (max difference {diff:.1e})\n"
        + format_report(report, verification, out)
    )
    return report, verification
