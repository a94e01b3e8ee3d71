r"""`prune_model`: prune a model in place by a criterion and a structure, and say what was done.

    report = prune_model(model, 0.5, criterion="obd", importances="run_dir")    # Ω from a saved EWC state
    export_pruned(model, "pruned", report, tokenizer=tokenizer)                   # save, card, reload-verify

Importances come from an EWC state (an `hf-ewc train` run, a checkpoint, `EWCState.save`: nothing is recollected)
or are collected on given data (all but SI, which only training produces). Criteria are listed in
`hf_ewc.pruning.masks`.

Structures:

- ``unstructured`` — single weights; ``scope="global"`` ranks all targeted weights together (one threshold),
  ``scope="per_layer"`` removes the same share from every tensor;
- ``"N:M"`` (``"2:4"``, ``"4:8"`` …) — in every group of M consecutive weights along the input dimension, keep the N
  highest scores (sparsity ``1 − N/M``);
- ``ffn`` — whole FFN neurons (a row of the up/gate projections and the matching column of the down projection), the
  same number in every layer: removed physically and written into the config (``intermediate_size``, GPT-2's
  ``n_inner``…), so ``from_pretrained`` rebuilds the smaller shapes;
- ``heads`` — whole attention heads, the same number in every layer: removed physically when the config can say so
  (Llama-style models with an explicit ``head_dim``, when the config's class accepts the new count: Llama's wants one
  that divides hidden_size); otherwise (BERT, GPT-2: ``head_dim = hidden / heads``) their weights are zeroed and kept
  at zero. The report says which happened.

By default the weights of the Linear (and GPT-2 ``Conv1D``) layers inside the transformer blocks are pruned;
embeddings, norms, biases and output heads are not. ``include`` / ``exclude`` (regular expressions searched in
parameter names) change that.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .masks import (
    check_coverage,
    check_prune_arguments,
    resolve_importances,
    score,
    select_targets,
    unstructured_masks,
)
from .report import PruneReport, finish_report, num_parameters
from .structures import prune_ffn, prune_heads


STRUCTURED = {"ffn": prune_ffn, "heads": prune_heads}  # structure → surgery; the rest is unstructured or N:M


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
    omega, source = resolve_importances(importances, criterion, data=data, model=model, collect_kwargs=collect_kwargs)
    settings = {"criterion": criterion, "scope": scope, "sparsity": sparsity, "source": source}
    if kind in STRUCTURED:
        done = STRUCTURED[kind](model, sparsity, criterion, omega, show_progress)
        return finish_report(
            model, done.originals, structure=kind, removal=done.removal, params_before=done.params_before,
            masks=done.masks, slices=done.slices, structured=done.structured, **settings,
        )  # fmt: skip

    targets = select_targets(model, include, exclude)
    if omega is not None:
        check_coverage(omega, targets)
    originals = {n: list(p.shape) for n, p in targets.items()}
    before = num_parameters(model)
    bar = tqdm(targets.items(), total=len(targets), desc=f"scoring ({criterion})", disable=not show_progress)
    scores = {name: score(name, p, criterion, omega) for name, p in bar}
    masks = unstructured_masks(model, scores, nm=nm, scope=scope, sparsity=sparsity)
    with torch.no_grad():
        for name, p in targets.items():
            p.mul_(masks[name].to(device=p.device, dtype=p.dtype))
    return finish_report(
        model, originals, structure=kind if nm is None else f"{nm[0]}:{nm[1]}", removal="masked",
        params_before=before, masks=masks, **settings,
    )  # fmt: skip
