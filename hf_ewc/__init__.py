"""hf_ewc — stabilized Elastic Weight Consolidation for 🤗 transformers.

Public API: [`EWCConfig`], [`EWCTrainer`], [`EWCState`], [`collect_importance`], and the penalty maths in
`hf_ewc.penalty`.
"""

__version__ = "0.1.0"

from .config import EWCConfig
from .importance import collect_importance
from .state import EWCState
from .trainer import EWCTrainer
from .utils import HfEwcError


__all__ = ["EWCConfig", "EWCState", "EWCTrainer", "HfEwcError", "__version__", "collect_importance"]
