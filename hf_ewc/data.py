"""Domain datasets for `hf-ewc train`: loading (Hub or local files), splitting, tokenizing, and the model to train.

Causal and masked LM domains are tokenized, concatenated and cut into blocks of `model.max_length` tokens (as in
transformers' `run_clm.py` / `run_mlm.py`); classification domains are truncated to `max_length`. Masked-LM
evaluation sets are masked once, with a fixed seed, so every cell of the evaluation matrix sees the same masks.
"""

import difflib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    default_data_collator,
    set_seed,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from .config import DomainSpec, RunConfig
from .utils import HfEwcError


AUTO_MODELS = {
    "causal_lm": AutoModelForCausalLM,
    "masked_lm": AutoModelForMaskedLM,
    "sequence_classification": AutoModelForSequenceClassification,
}
_TASK_MAPPINGS = {
    "causal_lm": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "masked_lm": MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    "sequence_classification": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
}
_LOADERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
MLM_PROBABILITY = 0.15


@dataclass
class RawDomain:
    """A domain's texts (and labels) before tokenization."""

    name: str
    train: Dataset
    eval: Dataset
    stats: dict = field(default_factory=dict)


@dataclass
class DomainData:
    """A tokenized domain: what the trainer, the evaluation and the importance collection read."""

    name: str
    train: Dataset
    eval: Dataset
    stats: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ raw loading
def _resolve(path: str, base_dirs: list[Path], where: str) -> str:
    if any(ch in path for ch in "*?[") or "://" in path:  # globs and remote URLs go to datasets as they are
        return path
    candidates = [Path(path)] if os.path.isabs(path) else [b / path for b in base_dirs]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    tried = ", ".join(str(c) for c in candidates)
    raise HfEwcError(f"{where}: data file {path!r} not found (looked at {tried}); fix the path.")


def resolve_data_files(data_files: Any, base_dirs: list[Path], where: str) -> Any:
    """Relative paths are looked up in the working directory, then next to the config file."""
    if isinstance(data_files, str):
        return _resolve(data_files, base_dirs, where)
    if isinstance(data_files, list):
        return [_resolve(str(p), base_dirs, where) for p in data_files]
    if isinstance(data_files, dict):
        return {split: resolve_data_files(files, base_dirs, where) for split, files in data_files.items()}
    raise HfEwcError(f"{where}: data_files must be a path, a list of paths or a mapping split → paths.")


def _loader_for(data_files: Any, where: str) -> str:
    first = data_files
    while isinstance(first, (list, dict)):
        first = next(iter(first.values())) if isinstance(first, dict) else first[0]
    name = Path(str(first)).name.lower()
    for ext in _COMPRESSIONS:
        name = name.removesuffix(ext)
    loader = _LOADERS.get(Path(name).suffix)
    if loader is None:
        raise HfEwcError(
            f"{where}: cannot tell the format of {first!r} from its extension; set `dataset` to one of "
            f"{', '.join(sorted(set(_LOADERS.values())))}."
        )
    return loader


def _load_split(domain: DomainSpec, split: str, data_files: Any, where: str) -> Dataset:
    try:
        if data_files is not None:
            loader = domain.dataset or _loader_for(data_files, where)
            if not isinstance(data_files, dict):
                data_files = {"train": data_files}
            if split not in data_files:
                raise HfEwcError(
                    f"{where}: split {split!r} is not among data_files' splits ({', '.join(data_files)}); set "
                    "`split`/`eval_split` to one of them."
                )
            return load_dataset(loader, domain.dataset_config, data_files=data_files, split=split)
        return load_dataset(domain.dataset, domain.dataset_config, split=split)
    except HfEwcError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types (FileNotFound, DatasetNotFound, Connection…)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        what = f"dataset {domain.dataset!r}" if data_files is None else "data_files"
        raise HfEwcError(f"{where}: cannot load {what} (split {split!r}): {message}") from None


def _check_columns(ds: Dataset, domain: DomainSpec, where: str, task: str) -> None:
    needed = [domain.text_column] + ([domain.label_column] if task == "sequence_classification" else [])
    for column in needed:
        if column not in ds.column_names:
            key = "text_column" if column == domain.text_column else "label_column"
            raise HfEwcError(
                f"{where}: column {column!r} not found (columns: {', '.join(ds.column_names)}); set `{key}`."
            )


def load_raw_domain(domain: DomainSpec, index: int, *, task: str, seed: int, base_dirs: list[Path]) -> RawDomain:
    """Load a domain's train and eval splits, keep non-empty texts, apply `eval_fraction`."""
    where = f"domains.{index} ({domain.name})"
    data_files = resolve_data_files(domain.data_files, base_dirs, where) if domain.data_files is not None else None
    train = _load_split(domain, domain.split, data_files, where)
    _check_columns(train, domain, where, task)
    if domain.eval_split is not None:
        evaluation = _load_split(domain, domain.eval_split, data_files, where)
        _check_columns(evaluation, domain, where, task)
    else:
        evaluation = None
    keep = [domain.text_column] + ([domain.label_column] if task == "sequence_classification" else [])
    column = domain.text_column

    def _clean(ds: Dataset) -> Dataset:
        ds = ds.select_columns(keep)
        return ds.filter(lambda batch: [isinstance(t, str) and bool(t.strip()) for t in batch[column]], batched=True)

    rows = len(train)
    train = _clean(train)
    if evaluation is None:
        if len(train) < 2:
            raise HfEwcError(
                f"{where}: {len(train)} non-empty text(s) in {rows} row(s); a domain needs data to train and evaluate "
                "on (check text_column and the files)."
            )
        try:
            split = train.train_test_split(test_size=domain.eval_fraction, seed=seed, shuffle=True)
        except ValueError as err:
            raise HfEwcError(
                f"{where}: eval_fraction={domain.eval_fraction} cannot split {len(train)} text(s) ({err}); give a "
                "fraction that leaves texts on both sides, or an eval_split."
            ) from None
        train, evaluation = split["train"], split["test"]
    else:
        evaluation = _clean(evaluation)
    for part, ds in (("training", train), ("evaluation", evaluation)):
        if len(ds) == 0:
            raise HfEwcError(
                f"{where}: the {part} split is empty after dropping empty texts ({rows} row(s) read); check "
                "text_column, the split names and the files."
            )
    stats = {"train_texts": len(train), "eval_texts": len(evaluation)}
    return RawDomain(domain.name, train, evaluation, stats)


# ------------------------------------------------------------------------------------------------------ labels
def label_names(raws: list[RawDomain], domains: list[DomainSpec]) -> list:
    """The label set shared by every classification domain (sorted), with a check that each domain has ≥ 2 classes."""
    labels: set = set()
    for i, (raw, spec) in enumerate(zip(raws, domains)):
        values = set(raw.train[spec.label_column])
        if None in values:
            raise HfEwcError(f"domains.{i} ({spec.name}): label column {spec.label_column!r} has empty values.")
        if len(values) < 2:
            raise HfEwcError(
                f"domains.{i} ({spec.name}): label column {spec.label_column!r} has one class ({next(iter(values))!r})"
                " in the training split; a classification domain needs at least two."
            )
        labels |= values
    kinds = {type(v) for v in labels}
    if len(kinds) > 1:
        raise HfEwcError(f"Labels mix types ({', '.join(sorted(k.__name__ for k in kinds))}); use one type.")
    return sorted(labels)


# ------------------------------------------------------------------------------------------------------ tokenizer
def _texts(raws: list[RawDomain], domains: list[DomainSpec]) -> Iterator[str]:
    for raw, spec in zip(raws, domains):
        for batch in raw.train.iter(batch_size=1000):
            yield from batch[spec.text_column]


def train_tokenizer(task: str, texts: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer trained from scratch: byte-level BPE for causal LMs, WordPiece with [CLS]/[SEP]/[MASK] otherwise."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if task == "causal_lm":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
        )
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def load_tokenizer(name: str, *, revision: str | None, trust_remote_code: bool, task: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - any loading failure becomes one clear line
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HfEwcError(f"Cannot load the tokenizer {name!r}: {message}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style tokenizers ship without one
    if task == "masked_lm" and tokenizer.mask_token is None:
        raise HfEwcError(f"Tokenizer {name!r} has no mask token: it cannot be used for task 'masked_lm'.")
    return tokenizer


# ------------------------------------------------------------------------------------------------------ tokenization
def _group(token_lists: list[list[int]], block: int) -> list[list[int]]:
    flat = [t for tokens in token_lists for t in tokens]
    return [flat[i : i + block] for i in range(0, len(flat) - block + 1, block)]


def _lm_blocks(ds: Dataset, column: str, tokenizer, *, block: int, causal: bool) -> Dataset:
    eos = [tokenizer.eos_token_id] if causal and tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        ids = tokenizer(batch[column], add_special_tokens=False)["input_ids"]
        blocks = _group([x + eos for x in ids], block)
        return {"input_ids": blocks, "labels": blocks} if causal else {"input_ids": blocks}  # the model shifts them

    return ds.map(tokenize, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="Tokenizing")


def tokenize_domain(
    raw: RawDomain, spec: DomainSpec, index: int, tokenizer, *, task: str, max_length: int, seed: int, label2id=None
) -> DomainData:
    """Tokenize a domain for ``task``; `max_samples`/`max_eval_samples` are counted in examples (LM blocks)."""
    where = f"domains.{index} ({spec.name})"
    if task == "sequence_classification":

        def tokenize(batch):
            enc = tokenizer(batch[spec.text_column], truncation=True, max_length=max_length)
            labels = batch[spec.label_column]
            unknown = [v for v in labels if v not in label2id]
            if unknown:
                raise HfEwcError(f"{where}: label {unknown[0]!r} does not occur in any training split.")
            return {**enc, "labels": [label2id[v] for v in labels]}

        parts = [d.map(tokenize, batched=True, remove_columns=d.column_names) for d in (raw.train, raw.eval)]
    else:
        parts = [
            _lm_blocks(d, spec.text_column, tokenizer, block=max_length, causal=task == "causal_lm")
            for d in (raw.train, raw.eval)
        ]
    train, evaluation = parts
    for part, ds in (("training", train), ("evaluation", evaluation)):
        if len(ds) == 0:
            raise HfEwcError(
                f"{where}: no {part} example of {max_length} tokens could be made from the "
                f"{raw.stats.get('train_texts' if part == 'training' else 'eval_texts')} text(s); give more text or a "
                "smaller model.max_length."
            )
    if spec.max_samples is not None and len(train) > spec.max_samples:
        train = train.shuffle(seed=seed).select(range(spec.max_samples))
    if spec.max_eval_samples is not None and len(evaluation) > spec.max_eval_samples:
        evaluation = evaluation.shuffle(seed=seed).select(range(spec.max_eval_samples))
    if task == "masked_lm":
        evaluation = mask_once(evaluation, tokenizer, seed=seed + index)
    stats = {**raw.stats, "train_examples": len(train), "eval_examples": len(evaluation)}
    if task != "sequence_classification":
        stats["train_tokens"] = len(train) * max_length
    return DomainData(spec.name, train, evaluation, stats)


def mask_once(ds: Dataset, tokenizer, *, seed: int) -> Dataset:
    """Apply BERT masking once with a fixed seed: the same masked evaluation set for every cell of the matrix."""
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=MLM_PROBABILITY, seed=seed)
    batch = collator([{"input_ids": ids} for ids in ds["input_ids"]])
    return Dataset.from_dict({"input_ids": batch["input_ids"].tolist(), "labels": batch["labels"].tolist()})


def train_collator(task: str, tokenizer):
    """The collator used for training (and importance collection); evaluation sets need no randomness."""
    if task == "masked_lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=MLM_PROBABILITY)
    if task == "sequence_classification":
        return DataCollatorWithPadding(tokenizer)
    return default_data_collator


def eval_collator(task: str, tokenizer):
    return DataCollatorWithPadding(tokenizer) if task == "sequence_classification" else default_data_collator


# ------------------------------------------------------------------------------------------------------ the model
def _check_task(task: str, config, where: str) -> None:
    if getattr(config, "auto_map", None):  # custom code: its own Auto mapping decides
        return
    if config.model_type not in _TASK_MAPPINGS[task]:
        able = [t for t, mapping in _TASK_MAPPINGS.items() if config.model_type in mapping]
        hint = f"this model can do: {', '.join(able)}" if able else "choose another model"
        raise HfEwcError(f"{where}: model type {config.model_type!r} cannot do task {task!r}; {hint}.")


def check_max_length(config, max_length: int, where: str) -> None:
    """Blocks longer than the model's position table would fail inside the first forward, after the run started."""
    limit = next(
        (getattr(config, k) for k in ("max_position_embeddings", "n_positions") if getattr(config, k, None)), None
    )
    offset = 2 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0  # their padding offset
    if limit is not None and max_length > limit - offset:
        raise HfEwcError(
            f"{where}: model.max_length={max_length} exceeds the model's {limit - offset} positions; lower "
            "model.max_length (or raise max_position_embeddings for a model built from config)."
        )


def _check_config_keys(model_type: str, values: dict) -> None:
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise HfEwcError(f"model.config: unknown model_type {model_type!r}; {hint}use a transformers model type.")
    config_class = CONFIG_MAPPING[model_type]
    known = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
    known |= set(inspect.signature(config_class.__init__).parameters)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise HfEwcError(
                f"Unknown key 'model.config.{key}' for model_type {model_type!r}; {hint}use a field of "
                f"{config_class.__name__}."
            )


def build_model(run: RunConfig, tokenizer, labels: list | None = None):
    """The model the sequence starts from: pretrained (`model.name_or_path`) or built from `model.config`."""
    spec, task = run.model, run.task
    extra: dict[str, Any] = {}
    if labels is not None:
        extra = {
            "num_labels": len(labels),
            "id2label": {i: str(v) for i, v in enumerate(labels)},
            "label2id": {str(v): i for i, v in enumerate(labels)},
        }
    if spec.config is not None:
        values = dict(spec.config)
        model_type = values.pop("model_type")
        _check_config_keys(model_type, values)
        values.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            token_id = getattr(tokenizer, key, None)
            if token_id is None and key != "pad_token_id":
                token_id = tokenizer.cls_token_id if key == "bos_token_id" else tokenizer.sep_token_id
            values.setdefault(key, token_id)
        try:
            config = AutoConfig.for_model(model_type, **values, **extra)
        except (ValueError, TypeError) as err:
            raise HfEwcError(f"model.config: {str(err).splitlines()[0]}") from None
        if getattr(config, "vocab_size", len(tokenizer)) < len(tokenizer):
            raise HfEwcError(
                f"model.config.vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)."
            )
        _check_task(task, config, "model.config")
        check_max_length(config, spec.max_length, "model.config")
        set_seed(run.seed)
        try:
            return AUTO_MODELS[task].from_config(config)
        except (ValueError, TypeError, AttributeError, RuntimeError) as err:
            raise HfEwcError(f"model.config cannot build a model: {str(err).splitlines()[0]}") from None
    kwargs = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(spec.name_or_path, **kwargs)
    except Exception as err:  # noqa: BLE001 - any loading failure becomes one clear line
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HfEwcError(f"Cannot load the model config {spec.name_or_path!r}: {message}") from None
    _check_task(task, config, f"model {spec.name_or_path!r}")
    check_max_length(config, spec.max_length, f"model {spec.name_or_path!r}")
    set_seed(run.seed)
    try:
        model = AUTO_MODELS[task].from_pretrained(spec.name_or_path, **kwargs, **extra)
    except Exception as err:  # noqa: BLE001 - any loading failure becomes one clear line
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HfEwcError(f"Cannot load the model {spec.name_or_path!r}: {message}") from None
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model
