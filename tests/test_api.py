"""The public API other code imports: names and signatures stay stable."""

import inspect

import hf_ewc
from hf_ewc import EWCConfig, EWCState, EWCTrainer, collect_importance


def test_public_names():
    assert {"EWCConfig", "EWCTrainer", "EWCState", "collect_importance"} <= set(hf_ewc.__all__)
    assert {"prune_model", "export_pruned", "KeepSparsityCallback", "PruneReport"} <= set(hf_ewc.__all__)


def test_pruning_signatures():
    params = inspect.signature(hf_ewc.prune_model).parameters
    assert list(params)[:2] == ["model", "sparsity"]
    keyword_only = {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert {"criterion": "magnitude", "importances": None, "structure": "unstructured", "include": None,
            "exclude": None}.items() <= keyword_only.items()  # fmt: skip
    assert "scope" in keyword_only
    params = inspect.signature(hf_ewc.export_pruned).parameters
    assert list(params)[:3] == ["model", "out_dir", "report"]
    assert {"tokenizer", "push_to_hub", "repo_id"} <= set(params)
    assert hf_ewc.__version__


def test_collect_importance_signature():
    params = inspect.signature(collect_importance).parameters
    assert list(params)[:3] == ["model", "data", "method"]
    assert params["method"].default == "fisher"
    keyword_only = {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword_only == {"estimator": "empirical", "max_samples": None, "batch_size": 8, "data_collator": None}
    assert params["method_options"].kind is inspect.Parameter.VAR_KEYWORD


def test_ewc_state_signatures():
    consolidate = inspect.signature(EWCState.consolidate).parameters
    assert list(consolidate)[:5] == ["self", "model", "importances", "mode", "decay"]
    assert consolidate["mode"].default == "sum" and consolidate["decay"].default == 1.0
    save = inspect.signature(EWCState.save).parameters
    assert list(save) == ["self", "save_directory", "write"] and save["write"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(EWCState.load).parameters) == ["directory", "model"]
    assert "model" in inspect.signature(EWCState.validate).parameters


def test_trainer_and_config_signatures():
    params = inspect.signature(EWCTrainer.__init__).parameters
    for name in ("model", "args", "train_dataset", "eval_dataset", "data_collator", "processing_class", "ewc_state"):
        assert name in params
    assert params["ewc_state"].default is None
    assert "dataset" in inspect.signature(EWCTrainer.consolidate).parameters
    fields = EWCConfig.__dataclass_fields__
    for name in (
        "ewc_lambda", "ewc_mode", "importance_method", "fisher_estimator", "importance_max_samples",
        "importance_batch_size", "consolidation", "ewc_decay", "ewc_lr",
    ):  # fmt: skip
        assert name in fields
