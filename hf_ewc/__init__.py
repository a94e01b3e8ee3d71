"""hf_ewc — stabilized Elastic Weight Consolidation for 🤗 transformers.

Public API: [`EWCConfig`], [`EWCTrainer`], [`EWCState`], [`collect_importance`], the pruner ([`prune_model`],
[`export_pruned`], [`KeepSparsityCallback`], [`PruneReport`]) and the penalty maths in `hf_ewc.penalty`.
"""

from ._version import __version__
from .config import EWCConfig
from .importance import collect_importance
from .pruning import PruneReport, export_pruned, prune_model
from .sparsity import KeepSparsityCallback
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
