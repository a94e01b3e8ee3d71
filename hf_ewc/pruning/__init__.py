"""Importance-based pruning: masks from any importance, structured removal, verified Hub-format export.

    report = prune_model(model, 0.5, criterion="obd", importances="run_dir")    # Ω from a saved EWC state
    export_pruned(model, "pruned", report, tokenizer=tokenizer)                   # save, card, reload-verify

- `masks.py`: criteria and scores, targets, global / per-layer / N:M masks, argument checks;
- `structures.py`: FFN-neuron and attention-head surgery on the layout tables of `hf_ewc.models`;
- `report.py`: [`PruneReport`] (JSON report, ``sparsity_config``, fitting an EWC state to the pruned model);
- `export.py`: [`export_pruned`] — save, reload-verify, model card, push;
- `prune.py`: [`prune_model`], the entry point.

Keeping pruned weights at zero while training on is [`hf_ewc.sparsity.KeepSparsityCallback`] (re-exported here).
"""

from ..sparsity import KeepSparsityCallback
from .export import export_pruned, model_logits, probe_inputs, verify_export
from .masks import CRITERIA, IMPORTANCE_OF, SCOPES, STRUCTURE_CHOICES, check_prune_arguments, select_targets
from .prune import prune_model
from .report import REPORT_NAME, PruneReport, finish_report, measure_sparsity, num_parameters
from .structures import accepts_head_count, prune_ffn, prune_heads


__all__ = [
    "CRITERIA",
    "IMPORTANCE_OF",
    "REPORT_NAME",
    "SCOPES",
    "STRUCTURE_CHOICES",
    "KeepSparsityCallback",
    "PruneReport",
    "accepts_head_count",
    "check_prune_arguments",
    "export_pruned",
    "finish_report",
    "measure_sparsity",
    "model_logits",
    "num_parameters",
    "probe_inputs",
    "prune_ffn",
    "prune_heads",
    "prune_model",
    "select_targets",
    "verify_export",
]
