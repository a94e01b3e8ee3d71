"""EWCConfig: `transformers.TrainingArguments` plus the knobs of stabilized EWC and importance collection."""

import copy
import difflib
import enum
import math
import os
import re
import types
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch
import yaml
from transformers import TrainingArguments

from .utils import HfEwcError, refuse_sharded_launch


EWC_MODES = ("stabilized", "vanilla", "proximal", "off")
IMPORTANCE_METHODS = ("fisher", "mas", "si", "signal", "uniform")
FISHER_ESTIMATORS = ("empirical", "sampled", "exact", "batched")
CONSOLIDATIONS = ("sum", "online")
STATE_DTYPES = ("float32", "bfloat16")


@dataclass
class EWCConfig(TrainingArguments):
    r"""Training arguments for [`EWCTrainer`]: every `TrainingArguments` field plus the EWC fields below.

    The penalty on parameter θ with anchor θ* and importance Ω is ``c·(θ − θ*)²`` with

    - `ewc_mode="stabilized"` (default): ``c = ½·λ·Ω / (1 + η·λ·Ω)`` — never overshoots the anchor, at any λ;
    - `ewc_mode="vanilla"`: ``c = ½·λ·Ω`` (Kirkpatrick et al.);
    - `ewc_mode="proximal"`: no loss term; after every optimizer step ``θ ← θ* + (θ − θ*)/(1 + η·λ·Ω)``;
    - `ewc_mode="off"`: plain fine-tuning (importances are still collected on `consolidate()`, so the sequence can be
      continued with EWC later).

    λ is `ewc_lambda` and η is `ewc_lr` (defaults to `learning_rate`). λ is not portable between importance methods
    or Fisher estimators: their scales differ by orders of magnitude (the `batched` Fisher is roughly `1/batch_size`
    of the per-sample ones).

    Args:
        ewc_lambda (`float`, *optional*, defaults to `100.0`):
            Penalty strength λ ≥ 0.
        ewc_mode (`str`, *optional*, defaults to `"stabilized"`):
            One of `"stabilized"`, `"vanilla"`, `"proximal"`, `"off"`.
        ewc_lr (`float`, *optional*):
            The step size η of the stabilized coefficient and of the proximal step. Defaults to `learning_rate` (the
            peak of the schedule). η is fixed for a whole domain, so the coefficients are computed once: the proximal
            pull per optimizer step does not shrink with a decaying schedule, which makes it relatively stronger as
            the optimizer's own steps get smaller.
        importance_method (`str`, *optional*, defaults to `"fisher"`):
            One of `"fisher"`, `"mas"`, `"si"`, `"signal"`, `"uniform"` (Ω = 1, i.e. an L2 pull towards the anchors).
            `"si"` is accumulated online during `train()`.
        fisher_estimator (`str`, *optional*, defaults to `"empirical"`):
            One of `"empirical"`, `"sampled"`, `"exact"`, `"batched"` (see [`collect_importance`]).
        importance_max_samples (`int`, *optional*, defaults to `512`):
            Samples drawn (seeded, without replacement) from the data for `consolidate()`; `None` uses all of it.
        importance_batch_size (`int`, *optional*, defaults to `8`):
            Batch size of importance collection.
        mas_output (`str`, *optional*, defaults to `"probs"`):
            MAS differentiates ``‖f(x)‖²`` of `"probs"` (softmax output, as Kutalev's code) or `"logits"`.
        si_damping (`float`, *optional*, defaults to `0.1`):
            ξ in SI's ``Ω = max(0, ω / (Δ² + ξ))``.
        si_gradient (`str`, *optional*, defaults to `"task"`):
            The gradient in SI's path integral ``ω = −Σ g·Δθ``: `"task"` (the task loss only, Zenke et al.) or
            `"regularized"` (task loss + EWC penalty, as the optimizer saw it).
        consolidation (`str`, *optional*, defaults to `"sum"`):
            `"sum"` (``Ω ← Ω + Ω_t``) or `"online"` (``Ω ← γ·Ω + Ω_t``).
        ewc_decay (`float`, *optional*, defaults to `1.0`):
            γ ∈ (0, 1] for `consolidation="online"`.
        ewc_state_dtype (`str`, *optional*, defaults to `"float32"`):
            Storage dtype of the EWC state (importances and anchors): `"float32"` or `"bfloat16"`.
    """

    ewc_lambda: float = field(
        default=100.0,
        metadata={"help": "Penalty strength λ >= 0 (penalty c·(θ−θ*)² with c = ½·λ·Ω, stabilized or not)."},
    )
    ewc_mode: Literal["stabilized", "vanilla", "proximal", "off"] = field(
        default="stabilized",
        metadata={
            "help": "stabilized: c = ½λΩ/(1+ηλΩ) (never overshoots); vanilla: c = ½λΩ; proximal: implicit step "
            "θ ← θ* + (θ−θ*)/(1+ηλΩ) after each optimizer step; off: plain fine-tuning."
        },
    )
    ewc_lr: float | None = field(
        default=None,
        metadata={"help": "η of the stabilized coefficient and of the proximal step (default: learning_rate)."},
    )
    importance_method: Literal["fisher", "mas", "si", "signal", "uniform"] = field(
        default="fisher",
        metadata={"help": "How importances Ω are obtained: fisher, mas, si (online), signal, uniform (L2)."},
    )
    fisher_estimator: Literal["empirical", "sampled", "exact", "batched"] = field(
        default="empirical",
        metadata={
            "help": "empirical (true labels), sampled (labels drawn from the model), exact (expectation over "
            "labels), batched (squared minibatch gradient; different scale)."
        },
    )
    importance_max_samples: int | None = field(
        default=512, metadata={"help": "Samples used by consolidate() (seeded random subset); None: all."}
    )
    importance_batch_size: int = field(default=8, metadata={"help": "Batch size of importance collection."})
    mas_output: Literal["probs", "logits"] = field(
        default="probs", metadata={"help": "MAS differentiates the squared L2 norm of probs or logits."}
    )
    si_damping: float = field(default=0.1, metadata={"help": "SI damping ξ in Ω = max(0, ω/(Δ²+ξ))."})
    si_gradient: Literal["task", "regularized"] = field(
        default="task",
        metadata={"help": "Gradient in SI's path integral: task loss only, or task loss + EWC penalty."},
    )
    consolidation: Literal["sum", "online"] = field(
        default="sum", metadata={"help": "sum: Ω ← Ω + Ω_t; online: Ω ← γ·Ω + Ω_t (γ = ewc_decay)."}
    )
    ewc_decay: float = field(default=1.0, metadata={"help": "γ ∈ (0, 1] for consolidation=online."})
    ewc_state_dtype: Literal["float32", "bfloat16"] = field(
        default="float32", metadata={"help": "Storage dtype of importances and anchors."}
    )

    def __post_init__(self):
        super().__post_init__()
        for name, choices in (
            ("ewc_mode", EWC_MODES),
            ("importance_method", IMPORTANCE_METHODS),
            ("fisher_estimator", FISHER_ESTIMATORS),
            ("mas_output", get_args(self.__dataclass_fields__["mas_output"].type)),
            ("si_gradient", get_args(self.__dataclass_fields__["si_gradient"].type)),
            ("consolidation", CONSOLIDATIONS),
            ("ewc_state_dtype", STATE_DTYPES),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"Unknown {name} {value!r}; choose one of: {', '.join(choices)}.")
        if not (isinstance(self.ewc_lambda, (int, float)) and math.isfinite(self.ewc_lambda) and self.ewc_lambda >= 0):
            raise ValueError(f"ewc_lambda must be a finite number >= 0, got {self.ewc_lambda!r}.")
        if self.ewc_lr is not None and not (math.isfinite(self.ewc_lr) and self.ewc_lr > 0):
            raise ValueError(
                f"ewc_lr must be a finite number > 0 (or unset to use learning_rate), got {self.ewc_lr!r}."
            )
        if self.ewc_mode in ("stabilized", "proximal") and self.ewc_lr is None and not self.learning_rate > 0:
            raise ValueError(
                f"ewc_mode={self.ewc_mode!r} needs a step size η > 0: set learning_rate > 0 or ewc_lr explicitly."
            )
        if self.importance_max_samples is not None and self.importance_max_samples < 1:
            raise ValueError(
                f"importance_max_samples must be >= 1 (or None for all samples), got {self.importance_max_samples}."
            )
        if self.importance_batch_size < 1:
            raise ValueError(f"importance_batch_size must be >= 1, got {self.importance_batch_size}.")
        if not (math.isfinite(self.si_damping) and self.si_damping > 0):
            raise ValueError(f"si_damping (ξ) must be a finite number > 0, got {self.si_damping!r}.")
        if not (0 < self.ewc_decay <= 1):
            raise ValueError(f"ewc_decay must be in (0, 1], got {self.ewc_decay!r}.")
        if self.consolidation == "sum" and self.ewc_decay != 1.0:
            raise ValueError(
                f"ewc_decay={self.ewc_decay} only applies to consolidation='online'; set consolidation='online' or "
                "ewc_decay=1.0."
            )

    @property
    def ewc_step_size(self) -> float:
        """η used by the stabilized coefficient and the proximal step."""
        return float(self.ewc_lr) if self.ewc_lr is not None else float(self.learning_rate)


# ---------------------------------------------------------------------------------------------------------------------
# The run configuration of `hf-ewc train`: YAML → RunConfig, with command-line overrides.
#
# The YAML's top level holds the pipeline keys below plus any `EWCConfig` field (flat, as in TRL's configs):
#
#     task: causal_lm
#     model: {config: {model_type: llama, hidden_size: 128, ...}, tokenizer_vocab_size: 4096, max_length: 128}
#     domains:
#       - {name: prose, data_files: prose.jsonl.gz, eval_fraction: 0.1, training: {num_train_epochs: 4}}
#       - {name: code, dataset: bigcode/the-stack-smol, dataset_config: python, text_column: content}
#     output_dir: runs/demo
#     learning_rate: 1.0e-3
#     ewc_lambda: 1.0e5
# ---------------------------------------------------------------------------------------------------------------------

TASKS = ("causal_lm", "masked_lm", "sequence_classification")
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


_MODEL_HELP = {
    "name_or_path": "Hub id or local directory of a pretrained model (or use `config`)",
    "config": "mapping with `model_type` and config fields: a model built from scratch, with a tokenizer trained on "
    "the domains' training text",
    "tokenizer": "tokenizer to load (default: name_or_path)",
    "tokenizer_vocab_size": "vocabulary size of a tokenizer trained from scratch",
    "max_length": "tokens per training example (LM blocks; classification truncation)",
    "revision": "model revision on the Hub",
    "trust_remote_code": "allow custom modelling code from the Hub (only when you trust it)",
}


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
            **self.training,
        }


def training_fields() -> dict[str, Any]:
    """Every `EWCConfig` field a config may set (name → type), without the ones the pipeline manages."""
    hints = get_type_hints(EWCConfig)
    return {f.name: hints[f.name] for f in fields(EWCConfig) if f.init and f.name not in _MANAGED_FIELDS}


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_NOT_THIS_TYPE = object()


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` (as YAML parsed it) converted to annotation ``tp``, or `_NOT_THIS_TYPE`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arm in get_args(tp):
            out = _coerce(value, arm)
            if out is not _NOT_THIS_TYPE:
                return out
        return _NOT_THIS_TYPE
    if tp is type(None):
        return None if value is None else _NOT_THIS_TYPE
    if origin is Literal:
        return value if value in get_args(tp) else _NOT_THIS_TYPE
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = {m.value for m in tp}
        return value if value in values or isinstance(value, tp) else _NOT_THIS_TYPE
    if tp is bool:
        return value if isinstance(value, bool) else _NOT_THIS_TYPE
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NOT_THIS_TYPE
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return _NOT_THIS_TYPE
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _NOT_THIS_TYPE
    if tp is str:
        return value if isinstance(value, str) else _NOT_THIS_TYPE
    if origin is list or tp is list:
        if isinstance(value, str):  # `report_to: none`, `--report_to tensorboard`
            value = [value]
        if not isinstance(value, list):
            return _NOT_THIS_TYPE
        (item,) = get_args(tp) or (Any,)
        out = [_coerce(v, item) for v in value]
        return _NOT_THIS_TYPE if any(v is _NOT_THIS_TYPE for v in out) else out
    if origin is dict or tp is dict:
        return value if isinstance(value, dict) else _NOT_THIS_TYPE
    return value


def _check_value(where: str, key: str, value: Any, tp: Any) -> Any:
    out = _coerce(value, tp)
    if out is _NOT_THIS_TYPE:
        raise HfEwcError(f"{where}{key} must be {_describe(tp)}, got {value!r}; fix the value in the config.")
    return out


def _unknown_key(where: str, key: str, valid: list[str], *, more: str = "", candidates=None) -> HfEwcError:
    close = difflib.get_close_matches(key, list(candidates or valid), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return HfEwcError(f"Unknown key {where + key!r}; {hint}valid keys: {', '.join(valid)}{more}.")


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
        checked[key] = _check_value(prefix, key, value, valid[key])
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
            raise _unknown_key(f"{where}.", str(key), names)
        values[key] = _check_value(f"{where}.", key, value, hints[key])
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in missing if name not in values]
    if missing:
        raise HfEwcError(f"{where} needs {', '.join(missing)}; add it to the config.")
    return cls(**values)


PIPELINE_KEYS = ("task", "model", "domains", "output_dir", "seed", "prune", "peft")


class _YAMLLoader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (`ewc_mode: off` stays the string "off"), and there are no
    base-60 numbers (`structure: 2:4` stays the string "2:4", not 124)."""


_YAML12_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_YAML12_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_YAML12_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_YAMLLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _regexp, _first in (
    ("tag:yaml.org,2002:bool", _YAML12_BOOL, "tTfF"),
    ("tag:yaml.org,2002:int", _YAML12_INT, "-+0123456789"),
    ("tag:yaml.org,2002:float", _YAML12_FLOAT, "-+0123456789."),
):
    _YAMLLoader.add_implicit_resolver(_tag, _regexp, list(_first))


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1}); keep one", mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_YAMLLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)


def parse_overrides(tokens: list[str]) -> list[tuple[str, Any]]:
    """``["--ewc_lambda", "50", "--domains.1.max_samples=200"]`` → ``[("ewc_lambda", 50), ("domains.1.max_samples",
    200)]``. Values are parsed as YAML (``null``, ``true``, ``1e-3``, ``[a, b]``, ``{k: v}``)."""
    out = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise HfEwcError(
                f"Unexpected argument {token!r}: overrides look like `--key value` or `--key=value` "
                "(e.g. `--ewc_lambda 50 --domains.1.max_samples 200`)."
            )
        key, sep, text = token[2:].partition("=")
        if not sep:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise HfEwcError(f"Override --{key} has no value; write `--{key} VALUE`.")
            text = tokens[i + 1]
            i += 1
        i += 1
        try:
            value = _yaml_load(text) if text.strip() else text
        except yaml.YAMLError:
            value = text
        out.append((key, value))
    return out


def _apply_override(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        path = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise HfEwcError(
                    f"Override --{key}: {path!r} is not an index of a list of {len(node)} item(s); "
                    f"use 0…{len(node) - 1}."
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise HfEwcError(f"Override --{key}: {'.'.join(parts[:depth])!r} is a value, not a mapping or a list.")


def read_yaml(path: str | os.PathLike) -> dict:
    """A config file as a mapping; malformed YAML becomes an `HfEwcError` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise HfEwcError(f"Config file {str(path)!r} not found; give the path of a YAML file (see configs/).")
    try:
        raw = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise HfEwcError(f"Malformed YAML in {path}:{line} {problem}; fix the syntax there.") from None
    except UnicodeDecodeError as err:
        raise HfEwcError(f"Config file {path} is not UTF-8 text ({err.reason}); save it as UTF-8.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise HfEwcError(f"Config file {path} must hold a mapping at the top level, got {type(raw).__name__}.")
    return raw


def default_config_path() -> Path:
    """The embedded default run (a tiny Llama over Python prose → Python code → man pages)."""
    return Path(__file__).parent / "resources" / "default.yaml"


def load_run_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config (the embedded default when ``path`` is None) and apply command-line ``overrides``."""
    path = Path(path) if path is not None else default_config_path()
    raw = read_yaml(path)
    for key, value in parse_overrides(list(overrides or [])):
        _apply_override(raw, key, value)
    return build_run_config(raw, source=str(path))


def _check_report_to(report_to: list[str] | None) -> None:
    """`report_to: tensorboard` without tensorboard installed would fail after the run has started: say it now."""
    from transformers.integrations import get_available_reporting_integrations

    available = get_available_reporting_integrations()
    missing = [r for r in report_to or [] if r not in ("none", "all") and r not in available]
    if missing:
        raise HfEwcError(
            f"report_to {missing[0]!r} is not installed (available here: {', '.join(available) or 'none'}); install "
            f"it (e.g. `pip install {missing[0]}`) or set report_to: none."
        )


def build_run_config(raw: dict, *, source: str | None = None) -> RunConfig:
    """Validate a merged config mapping (YAML + overrides) into a `RunConfig`."""
    refuse_sharded_launch()  # before any EWCConfig: under ZeRO-3 building one needs deepspeed
    raw = copy.deepcopy(raw)
    valid_training = training_fields()
    for key in raw:
        if key not in PIPELINE_KEYS and key not in valid_training:
            raise _unknown_key(
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
    seed = _check_value("", "seed", raw.get("seed", 42), int)
    training = {k: _check_value("", k, v, valid_training[k]) for k, v in raw.items() if k not in PIPELINE_KEYS}
    args = _build_ewc_config({**_PIPELINE_TRAINING_DEFAULTS, **training}, output_dir)
    _check_report_to(args.report_to)
    prune = _prune_spec(raw["prune"], domains) if raw.get("prune") is not None else None
    peft = _peft_spec(raw["peft"]) if raw.get("peft") is not None else None
    if peft is not None and prune is not None:
        raise HfEwcError(
            "prune: and peft: exclude each other (pruning an adapter prunes nothing of the model); after the run, "
            "prune the merged model with `hf-ewc prune OUTPUT_DIR`."
        )
    config = RunConfig(
        task, model, domains, output_dir, seed, training, source=source, raw=raw, prune=prune, peft=peft
    )
    for i, domain in enumerate(domains):  # every domain's EWCConfig is valid before anything runs
        domain_args = config.training_args(i, output_dir)
        _check_report_to(domain_args.report_to)
        refuse_sharded_launch(domain_args)  # `fsdp:` in the config
        if domain_args.importance_method == "si" and (
            domain_args.max_steps == 0 or (domain_args.max_steps < 0 and domain_args.num_train_epochs == 0)
        ):
            raise HfEwcError(
                f"domains.{i} ({domain.name}) has no training steps, but SI importances come from training; use "
                "fisher, mas, signal or uniform, or train on the domain."
            )
    if prune is not None:
        _check_prune_importances(config)
    return config


def _prune_spec(raw: Any, domains: list[DomainSpec]) -> PruneSpec:
    from .pruning import check_prune_arguments

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


def _peft_spec(raw: Any) -> PeftSpec:
    from .adapters import check_peft_spec

    spec = _spec(PeftSpec, raw, "peft")
    check_peft_spec(spec)
    return spec


def _check_prune_importances(config: RunConfig) -> None:
    """The `prune:` criterion reads the run's own EWC state: every domain up to `after` must collect its kind."""
    from .pruning import IMPORTANCE_OF

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
