"""hf_ewc — stabilized Elastic Weight Consolidation for 🤗 transformers.

Public API: [`EWCConfig`], [`EWCTrainer`], [`EWCState`], [`collect_importance`], the pruner ([`prune_model`],
[`export_pruned`], [`KeepSparsityCallback`], [`PruneReport`]) and the penalty maths in `hf_ewc.penalty`.
"""

__version__ = "0.1.0"

from .config import EWCConfig
from .importance import collect_importance
from .pruning import KeepSparsityCallback, PruneReport, export_pruned, prune_model
from .state import EWCState
from .trainer import EWCTrainer
from .utils import HfEwcError


__all__ = [
    "EWCConfig",
    "EWCState",
    "EWCTrainer",
    "HfEwcError",
    "KeepSparsityCallback",
    "PruneReport",
    "__version__",
    "collect_importance",
    "export_pruned",
    "prune_model",
]
