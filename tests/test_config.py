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
        (
            {"ewc_mode": "fancy"},
            "Unknown ewc_mode 'fancy'; choose one of: stabilized, vanilla, proximal, wva, clnp, off",
        ),
        (
            {"importance_method": "ewc"},
            "choose one of: fisher, sqrt_fisher, af, mas, masx, si, siu, sib, sos, onaf, signal, uniform",
        ),
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
        # the Trainer's own numeric values it would misuse silently (TrainingArguments accepts every one of these)
        ({"num_train_epochs": -1}, r"num_train_epochs must be a number >= 0, got -1\."),
        ({"num_train_epochs": float("inf")}, "num_train_epochs must be a number >= 0"),
        ({"max_steps": -5}, r"max_steps must be an integer >= 0 \(or -1: use epochs\)"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be an integer >= 1, got 0"),
        ({"per_device_eval_batch_size": -1}, "per_device_eval_batch_size must be an integer >= 1"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer >= 1"),
        ({"learning_rate": -1e-3}, "learning_rate must be a finite number >= 0"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number >= 0, got nan"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
        ({"adam_beta1": 1.5}, r"adam_beta1 must be in \[0, 1\)"),
        ({"adam_beta2": 1.0}, r"adam_beta2 must be in \[0, 1\)"),
        ({"adam_epsilon": -1.0}, "adam_epsilon must be a finite number >= 0"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be a finite number >= 0"),
        ({"warmup_steps": float("nan")}, "warmup_steps must be a number >= 0"),
        ({"logging_steps": -1}, "logging_steps must be a number > 0"),
        ({"save_steps": -1}, "save_steps must be a number > 0"),
        ({"eval_steps": -2}, "eval_steps must be a number > 0"),
        ({"label_smoothing_factor": 2.0}, r"label_smoothing_factor must be in \[0, 1\)"),
        ({"dataloader_num_workers": -1}, "dataloader_num_workers must be an integer >= 0"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*32\)"),
        ({"save_total_limit": -1}, r"save_total_limit must be an integer >= 0 \(0: no limit\), or None"),
    ],
)
def test_invalid_values_name_the_choices(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **kwargs)


def test_valid_edge_values_of_the_training_values_are_kept(tmp_path):
    for kwargs in ({"num_train_epochs": 0}, {"max_steps": 10}, {"warmup_steps": 0.1}, {"logging_steps": 0.5},
                   {"max_grad_norm": 0.0}, {"seed": 2**32 - 1}, {"save_total_limit": 1}):  # fmt: skip
        args = _config(tmp_path, **kwargs)
        ((name, value),) = kwargs.items()
        assert getattr(args, name) == value


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
