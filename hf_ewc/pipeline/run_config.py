"""The run configuration of `hf-ewc train`: YAML → [`RunConfig`], with command-line overrides, validated before
anything runs.

The YAML's top level holds the pipeline keys below plus any `EWCConfig` field (flat, as in TRL's configs):

    task: causal_lm
    model: {config: {model_type: llama, hidden_size: 128, ...}, tokenizer_vocab_size: 4096, max_length: 128}
    domains:
      - {name: prose, data_files: prose.jsonl.gz, eval_fraction: 0.1, training: {num_train_epochs: 4}}
      - {name: code, dataset: bigcode/the-stack-smol, dataset_config: python, text_column: content}
    output_dir: runs/demo
    general_eval: {tasks: [hf_ewc_prose_cloze], limit: 200}   # optional: lm-evaluation-harness scores
    learning_rate: 1.0e-3
    ewc_lambda: 1.0e5
"""

import copy
import difflib
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import torch
from transformers.integrations import get_available_reporting_integrations

from ..config import EWCConfig
from ..distributed import refuse_sharded_setup
from ..importance import SI_FAMILY
from ..models import TASKS
from ..pruning import IMPORTANCE_OF, check_prune_arguments
from ..utils import HfEwcError
from .adapters import check_peft_spec
from .config_io import apply_override, check_value, parse_overrides, read_yaml, unknown_key
from .general_eval import GeneralEvalSpec, check_general_eval_spec


# EWCConfig fields the pipeline sets itself, per domain.
_MANAGED_FIELDS = ("output_dir",)
# What `hf-ewc train` changes from the TrainingArguments defaults unless the config says otherwise.
_PIPELINE_TRAINING_DEFAULTS = {"report_to": "none", "save_strategy": "steps", "save_steps": 100, "save_total_limit": 1}


@dataclass
class ModelSpec:
    """The `model:` block: a pretrained model (`name_or_path`) or one built from a `config:` mapping."""

    name_or_path: str | None = None
    config: dict | None = None
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 4096
    max_length: int = 128
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class DomainSpec:
    """One entry of `domains:`: a dataset (Hub name, loader name or local files) and how to read it."""

    name: str
    dataset: str | None = None
    dataset_config: str | None = None
    data_files: str | list | dict | None = None
    split: str = "train"
    eval_split: str | None = None
    eval_fraction: float = 0.1
    text_column: str = "text"
    label_column: str = "label"
    max_samples: int | None = None
    max_eval_samples: int | None = 256
    metric: str | None = None
    training: dict = field(default_factory=dict)


@dataclass
class PruneSpec:
    """The optional `prune:` block: prune the model after a domain, keep the pruned weights at zero afterwards."""

    sparsity: float | None = None
    after: str | int | None = None  # a domain's name or index (default: the last domain)
    criterion: str = "magnitude"
    scope: str | None = None
    structure: str = "unstructured"
    include: list | None = None
    exclude: list | None = None


@dataclass
class PeftSpec:
    """The optional `peft:` block: train a LoRA adapter on a frozen base model; EWC protects the adapter."""

    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list | None = None  # None: PEFT's default for the model type; "all-linear" for every Linear
    modules_to_save: list | None = None  # None: PEFT's default (the classification head for sequence classification)
    bias: str = "none"


@dataclass
class RunConfig:
    """A resolved `hf-ewc train` configuration (see `load_run_config`)."""

    task: str
    model: ModelSpec
    domains: list[DomainSpec]
    output_dir: str
    seed: int
    training: dict  # EWCConfig fields, validated
    source: str | None = None  # the YAML file it came from (None: built in Python)
    raw: dict = field(default_factory=dict)  # the merged mapping before defaults: what resume compares
    prune: PruneSpec | None = None
    peft: PeftSpec | None = None
    baseline: str | None = None  # "naive": naive fine-tuning runs alongside, sharing the first domain
    general_eval: GeneralEvalSpec | None = None  # lm-evaluation-harness tasks before the first domain and after each

    @property
    def prune_after(self) -> int | None:
        """Index of the domain after which the `prune:` block prunes (None without one)."""
        if self.prune is None:
            return None
        after = self.prune.after
        if after is None:
            return len(self.domains) - 1
        if isinstance(after, int):
            return after
        return [d.name for d in self.domains].index(after)

    def baseline_config(self) -> dict:
        """The config mapping of the `baseline: naive` run: this one without EWC (importances unused, so uniform),
        in ``output_dir/baseline``."""
        raw = copy.deepcopy(self.raw)
        raw.pop("baseline", None)
        raw.update(ewc_mode="off", importance_method="uniform", output_dir=str(Path(self.output_dir) / "baseline"))
        for domain in raw["domains"]:
            if domain.get("training"):
                domain["training"].update({k: v for k, v in raw.items() if k in ("ewc_mode", "importance_method")})
        return raw

    def training_args(self, domain_index: int, output_dir: str, **extra: Any) -> EWCConfig:
        """The `EWCConfig` of one domain: run-wide fields, then the domain's own `training:` overrides."""
        fields = {**_PIPELINE_TRAINING_DEFAULTS, **self.training, **self.domains[domain_index].training, **extra}
        fields["seed"] = fields.get("seed", self.seed)
        fields.setdefault("dataloader_pin_memory", torch.cuda.is_available())  # silences torch's CPU warning
        return _build_ewc_config(fields, output_dir, where=f"domains.{domain_index}.training")

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "model": asdict(self.model),
            "domains": [asdict(d) for d in self.domains],
            "output_dir": self.output_dir,
            "seed": self.seed,
            **({"prune": asdict(self.prune)} if self.prune is not None else {}),
            **({"peft": asdict(self.peft)} if self.peft is not None else {}),
            **({"baseline": self.baseline} if self.baseline is not None else {}),
            **({"general_eval": asdict(self.general_eval)} if self.general_eval is not None else {}),
            **self.training,
        }


def training_fields() -> dict[str, Any]:
    """Every `EWCConfig` field a config may set (name → type), without the ones the pipeline manages."""
    hints = get_type_hints(EWCConfig)
    return {f.name: hints[f.name] for f in fields(EWCConfig) if f.init and f.name not in _MANAGED_FIELDS}


def _build_ewc_config(values: dict, output_dir: str, *, where: str = "") -> EWCConfig:
    """An `EWCConfig` from config values; ``where`` ("domains.1.training") prefixes the errors of nested blocks."""
    valid = training_fields()
    prefix = f"{where}." if where else ""
    checked = {}
    for key, value in values.items():
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise HfEwcError(
                f"Unknown key {prefix + key!r}; {hint}any EWCConfig field is valid here (list them: hf-ewc train "
                "--fields)."
            )
        checked[key] = check_value(prefix, key, value, valid[key])
    try:
        return EWCConfig(output_dir=output_dir, **checked)
    except (ValueError, TypeError) as err:
        raise HfEwcError(f"{prefix}{err}" if where else str(err)) from None


def _spec(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise HfEwcError(f"{where} must be a mapping, got {type(raw).__name__}; see configs/ for examples.")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in hints:
            raise unknown_key(f"{where}.", str(key), names)
        values[key] = check_value(f"{where}.", key, value, hints[key])
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in missing if name not in values]
    if missing:
        raise HfEwcError(f"{where} needs {', '.join(missing)}; add it to the config.")
    return cls(**values)


PIPELINE_KEYS = ("task", "model", "domains", "output_dir", "seed", "prune", "peft", "baseline", "general_eval")
BASELINES = ("naive",)


def default_config_path() -> Path:
    """The embedded default run (a tiny Llama over Python prose → Python code → man pages)."""
    return Path(__file__).resolve().parent.parent / "resources" / "default.yaml"


def load_run_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config (the embedded default when ``path`` is None) and apply command-line ``overrides``."""
    path = Path(path) if path is not None else default_config_path()
    raw = read_yaml(path)
    for key, value in parse_overrides(list(overrides or [])):
        apply_override(raw, key, value)
    return build_run_config(raw, source=str(path))


def _check_report_to(report_to: list[str] | None) -> None:
    """`report_to: tensorboard` without tensorboard installed would fail after the run has started: say it now."""
    available = get_available_reporting_integrations()
    missing = [r for r in report_to or [] if r not in ("none", "all") and r not in available]
    if missing:
        raise HfEwcError(
            f"report_to {missing[0]!r} is not installed (available here: {', '.join(available) or 'none'}); install "
            f"it (e.g. `pip install {missing[0]}`) or set report_to: none."
        )


def build_run_config(raw: dict, *, source: str | None = None) -> RunConfig:
    """Validate a merged config mapping (YAML + overrides) into a `RunConfig`."""
    refuse_sharded_setup()  # before any EWCConfig: under ZeRO-3 building one needs deepspeed
    raw = copy.deepcopy(raw)
    valid_training = training_fields()
    for key in raw:
        if key not in PIPELINE_KEYS and key not in valid_training:
            raise unknown_key(
                "",
                str(key),
                list(PIPELINE_KEYS),
                more=" and any EWCConfig field (list them: hf-ewc train --fields)",
                candidates=[*PIPELINE_KEYS, *valid_training],
            )
    task = raw.get("task", "causal_lm")
    if task not in TASKS:
        raise HfEwcError(f"Unknown task {task!r}; choose one of: {', '.join(TASKS)}.")
    model = _spec(ModelSpec, raw.get("model") or {}, "model")
    if (model.name_or_path is None) == (model.config is None):
        raise HfEwcError("model needs exactly one of `name_or_path` (a pretrained model) or `config` (built from it).")
    if model.config is not None and "model_type" not in model.config:
        raise HfEwcError("model.config needs a `model_type` (e.g. llama, gpt2, bert); add it to the config block.")
    if model.max_length < 2:
        raise HfEwcError(f"model.max_length must be >= 2, got {model.max_length}.")
    domains_raw = raw.get("domains")
    if not isinstance(domains_raw, list) or not domains_raw:
        raise HfEwcError("domains must be a non-empty list of domains (each with a `name` and a dataset).")
    domains = [_spec(DomainSpec, d, f"domains.{i}") for i, d in enumerate(domains_raw)]
    seen: set[str] = set()
    for i, d in enumerate(domains):
        if not d.name or not all(c.isalnum() or c in "-_." for c in d.name):
            raise HfEwcError(f"domains.{i}.name {d.name!r} must be non-empty and use only letters, digits, - _ .")
        if d.name in seen:
            raise HfEwcError(f"domains.{i}.name {d.name!r} is used twice; domain names must be unique.")
        seen.add(d.name)
        if d.dataset is None and d.data_files is None:
            raise HfEwcError(f"domains.{i} ({d.name}) needs `dataset` (a Hub name or loader) or `data_files`.")
        if d.eval_split is None and not 0 < d.eval_fraction < 1:
            raise HfEwcError(f"domains.{i}.eval_fraction must be in (0, 1), got {d.eval_fraction}.")
        for key in ("max_samples", "max_eval_samples"):
            if getattr(d, key) is not None and getattr(d, key) < 1:
                raise HfEwcError(f"domains.{i}.{key} must be >= 1 (or null for all), got {getattr(d, key)}.")
    output_dir = raw.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir:
        raise HfEwcError("output_dir is required (a directory for the run); add `output_dir: runs/NAME`.")
    seed = check_value("", "seed", raw.get("seed", 42), int)
    training = {k: check_value("", k, v, valid_training[k]) for k, v in raw.items() if k not in PIPELINE_KEYS}
    args = _build_ewc_config({**_PIPELINE_TRAINING_DEFAULTS, **training}, output_dir)
    _check_report_to(args.report_to)
    prune = _prune_spec(raw["prune"], domains) if raw.get("prune") is not None else None
    peft = _peft_spec(raw["peft"]) if raw.get("peft") is not None else None
    if peft is not None and prune is not None:
        raise HfEwcError(
            "prune: and peft: exclude each other (pruning an adapter prunes nothing of the model); after the run, "
            "prune the merged model with `hf-ewc prune OUTPUT_DIR`."
        )
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in BASELINES:
        raise HfEwcError(f"Unknown baseline {baseline!r}; choose one of: {', '.join(BASELINES)} (or leave it out).")
    if baseline is not None and prune is not None:
        raise HfEwcError(
            "baseline: and prune: exclude each other (the two runs would differ by the pruning too); drop one."
        )
    if baseline is not None and len(domains) < 2:
        raise HfEwcError("baseline: needs at least two domains (it measures forgetting of the first ones).")
    general = _general_eval_spec(raw["general_eval"], task) if raw.get("general_eval") is not None else None
    config = RunConfig(
        task, model, domains, output_dir, seed, training, source=source, raw=raw, prune=prune, peft=peft,
        baseline=baseline, general_eval=general,
    )  # fmt: skip
    for i, domain in enumerate(domains):  # every domain's EWCConfig is valid before anything runs
        domain_args = config.training_args(i, output_dir)
        _check_report_to(domain_args.report_to)
        refuse_sharded_setup(domain_args)  # `fsdp:` in the config
        if domain_args.importance_method in SI_FAMILY and (
            domain_args.max_steps == 0 or (domain_args.max_steps < 0 and domain_args.num_train_epochs == 0)
        ):
            raise HfEwcError(
                f"domains.{i} ({domain.name}) has no training steps, but {domain_args.importance_method} importances "
                "come from training; use fisher, mas, signal or uniform, or train on the domain."
            )
    _check_clnp(config)
    if prune is not None:
        _check_prune_importances(config)
    return config


def _check_clnp(config: RunConfig) -> None:
    """`ewc_mode: clnp` allocates the model's own units to every domain: all domains or none, and nothing that would
    change the units behind the allocation's back."""
    modes = [config.training_args(i, config.output_dir).ewc_mode for i in range(len(config.domains))]
    if "clnp" not in modes:
        return
    other = next((i for i, m in enumerate(modes) if m != "clnp"), None)
    if other is not None:
        raise HfEwcError(
            f"domains.{other} ({config.domains[other].name}) uses ewc_mode: {modes[other]}, the others clnp: CLNP "
            "owns units for every domain of a sequence, so set ewc_mode: clnp for all of them (or for none)."
        )
    if config.peft is not None:
        raise HfEwcError(
            "ewc_mode: clnp and peft: exclude each other (CLNP allocates the model's own FFN neurons and attention "
            "heads; a LoRA adapter has none); drop peft: or choose another ewc_mode."
        )
    if config.prune is not None:
        raise HfEwcError(
            "ewc_mode: clnp and prune: exclude each other (pruning would remove units that domains own); after the "
            "run, export one domain's units with `hf-ewc prune OUTPUT_DIR --clnp-domain NAME --out DIR`."
        )


def _prune_spec(raw: Any, domains: list[DomainSpec]) -> PruneSpec:
    spec = _spec(PruneSpec, raw, "prune")
    names = [d.name for d in domains]
    if isinstance(spec.after, int) and not 0 <= spec.after < len(domains):
        raise HfEwcError(f"prune.after {spec.after} is not a domain index; use 0…{len(domains) - 1} or a name.")
    if isinstance(spec.after, str) and spec.after not in names:
        raise HfEwcError(f"prune.after {spec.after!r} is not a domain; choose one of: {', '.join(names)}.")
    try:
        check_prune_arguments(spec.sparsity, spec.criterion, spec.structure, spec.scope, spec.include, spec.exclude)
    except HfEwcError as err:
        raise HfEwcError(f"prune: {err}") from None
    return spec


def _general_eval_spec(raw: Any, task: str) -> GeneralEvalSpec:
    if isinstance(raw, dict) and isinstance(raw.get("tasks"), str):
        raw = {**raw, "tasks": [raw["tasks"]]}  # `tasks: name` for one task
    spec = _spec(GeneralEvalSpec, raw, "general_eval")
    check_general_eval_spec(spec, task)
    return spec


def _peft_spec(raw: Any) -> PeftSpec:
    spec = _spec(PeftSpec, raw, "peft")
    check_peft_spec(spec)
    return spec


def _check_prune_importances(config: RunConfig) -> None:
    """The `prune:` criterion reads the run's own EWC state: every domain up to `after` must collect its kind."""
    criterion = config.prune.criterion
    if criterion == "magnitude":
        return
    needed = IMPORTANCE_OF[criterion]
    for i in range(config.prune_after + 1):
        method = config.training_args(i, config.output_dir).importance_method
        if method != needed:
            raise HfEwcError(
                f"prune.criterion {criterion!r} needs {needed} importances, but domains.{i} "
                f"({config.domains[i].name}) collects {method}; set importance_method: {needed} or use "
                "criterion: magnitude."
            )
