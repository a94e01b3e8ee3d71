import dataclasses

import pytest
from testing_utils import MLP
from transformers import HfArgumentParser, TrainingArguments

from hf_ewc import EWCConfig, EWCTrainer


def _config(tmp_path, **kwargs):
    return EWCConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


def test_defaults(tmp_path):
    args = _config(tmp_path, learning_rate=0.01)
    assert args.ewc_mode == "stabilized"
    assert args.importance_method == "fisher" and args.fisher_estimator == "empirical"
    assert args.ewc_step_size == 0.01  # η defaults to the learning rate
    assert _config(tmp_path, ewc_lr=0.5).ewc_step_size == 0.5


def test_every_ewc_field_has_help():
    own = [f for f in dataclasses.fields(EWCConfig) if f.name not in TrainingArguments.__dataclass_fields__]
    assert len(own) >= 13
    assert all(f.metadata.get("help") for f in own)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ewc_mode": "fancy"}, "Unknown ewc_mode 'fancy'; choose one of: stabilized, vanilla, proximal, off"),
        ({"importance_method": "ewc"}, "choose one of: fisher, mas, si, signal, uniform"),
        ({"fisher_estimator": "true"}, "choose one of: empirical, sampled, exact, batched"),
        ({"consolidation": "mean"}, "choose one of: sum, online"),
        ({"mas_output": "softmax"}, "choose one of: probs, logits"),
        ({"si_gradient": "both"}, "choose one of: task, regularized"),
        ({"ewc_state_dtype": "float16"}, "choose one of: float32, bfloat16"),
        ({"ewc_lambda": -1.0}, "ewc_lambda must be a finite number >= 0"),
        ({"ewc_lambda": float("nan")}, "ewc_lambda must be a finite number >= 0"),
        ({"ewc_lr": 0.0}, "ewc_lr must be a finite number > 0"),
        ({"importance_max_samples": 0}, "importance_max_samples must be >= 1"),
        ({"importance_batch_size": 0}, "importance_batch_size must be >= 1"),
        ({"si_damping": 0.0}, "si_damping"),
        ({"ewc_decay": 1.5, "consolidation": "online"}, r"ewc_decay must be in \(0, 1\]"),
        ({"ewc_decay": 0.5}, "only applies to consolidation='online'"),
    ],
)
def test_invalid_values_name_the_choices(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **kwargs)


def test_hf_argument_parser_parses_and_validates(tmp_path):
    parser = HfArgumentParser(EWCConfig)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--ewc_lambda", "50", "--ewc_mode", "proximal", "--importance_method", "mas"]
    )
    assert args.ewc_lambda == 50.0 and args.ewc_mode == "proximal" and args.importance_method == "mas"
    with pytest.raises(SystemExit):  # argparse choices from the Literal types
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--ewc_mode", "fancy"])


def test_trainer_upgrades_plain_training_arguments(tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path), learning_rate=0.123, report_to="none", use_cpu=True)
    trainer = EWCTrainer(model=MLP(), args=plain)
    assert isinstance(trainer.args, EWCConfig)
    assert trainer.args.learning_rate == 0.123 and trainer.args.ewc_mode == "stabilized"
