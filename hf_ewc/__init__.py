"""hf_ewc — stabilized Elastic Weight Consolidation for 🤗 transformers.

Public API: [`EWCConfig`], [`EWCTrainer`] (and [`EWCMixin`] / [`with_ewc`] for other `Trainer` subclasses such as
TRL's), [`EWCState`], [`collect_importance`], the pruner ([`prune_model`],
[`export_pruned`], [`KeepSparsityCallback`], [`PruneReport`]) and the penalty maths in `hf_ewc.penalty`.
"""

from ._version import __version__
from .config import EWCConfig, ewc_config_class
from .importance import collect_importance
from .pruning import PruneReport, export_pruned, prune_model
from .sparsity import KeepSparsityCallback
from .state import EWCState
from .trainer import EWCMixin, EWCTrainer, with_ewc
from .utils import HfEwcError


__all__ = [
    "EWCConfig",
    "EWCMixin",
    "EWCState",
    "EWCTrainer",
    "HfEwcError",
    "KeepSparsityCallback",
    "PruneReport",
    "__version__",
    "collect_importance",
    "ewc_config_class",
    "export_pruned",
    "prune_model",
    "with_ewc",
]
