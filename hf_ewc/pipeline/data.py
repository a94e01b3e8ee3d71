"""Domain datasets for `hf-ewc train`: loading (Hub or local files), splitting, tokenizing, collators.

Causal and masked LM domains are tokenized, concatenated and cut into blocks of `model.max_length` tokens (as in
transformers' `run_clm.py` / `run_mlm.py`); classification domains are truncated to `max_length`. Masked-LM
evaluation sets are masked once, with a fixed seed, so every cell of the evaluation matrix sees the same masks.
"""

import bz2
import csv
import gzip
import json
import lzma
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset
from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding, default_data_collator

from ..utils import HfEwcError, error_line
from .run_config import DomainSpec


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


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _files_of(data_files: Any) -> list[str]:
    if isinstance(data_files, dict):
        return [f for files in data_files.values() for f in _files_of(files)]
    return [data_files] if isinstance(data_files, str) else list(data_files)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def diagnose_data_file(path: str, loader: str) -> str | None:
    """What is wrong with a local data file that `datasets` failed to read, in words a user can act on: the file is
    empty, or the line that is not JSON / does not have the header's number of CSV fields. None when it cannot tell
    (then the loader's own message is the best there is)."""
    suffix = Path(path).suffix.lower()
    if not os.path.isfile(path) or loader not in ("json", "csv", "text") or suffix in (".zst", ".lz4", ".parquet"):
        return None  # binary formats, and compressions only `datasets` knows how to read: its own message stands
    opener = _OPENERS.get(suffix, open)
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        return f"data file {path!r} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8"
    except (OSError, EOFError, lzma.LZMAError) as err:
        return f"data file {path!r} cannot be read ({error_line(err)}); is it truncated or mislabelled?"
    if not text.strip():
        return f"data file {path!r} is empty; give it at least one row"
    if loader == "json":
        try:
            json.loads(text)  # one JSON document (a list of rows, or {"data": [...]}): the loader's other format
            return None
        except json.JSONDecodeError as err:
            first = text.lstrip()[:1]
            first_line = next(line for line in text.splitlines() if line.strip())
            if first in "[{" and not _parses(first_line):  # a (pretty-printed) document, not JSON lines
                return f"data file {path!r} line {err.lineno} is not valid JSON ({err.msg}, column {err.colno})"
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    return f"data file {path!r} line {number} is not valid JSON ({err.msg}, column {err.colno})"
    if loader == "csv":
        reader = csv.reader(text.splitlines(keepends=True), strict=True)
        try:
            header = next(reader)
            for row in reader:
                if row and len(row) != len(header):
                    return (
                        f"data file {path!r} line {reader.line_num} has {len(row)} CSV field(s), its header has "
                        f"{len(header)} (an unquoted comma, or a quote left open?)"
                    )
        except csv.Error as err:
            return f"data file {path!r} line {reader.line_num} is not valid CSV ({err})"
    return None


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
        if data_files is not None:
            loader = domain.dataset or _loader_for(data_files, where)
            for path in _files_of(data_files[split] if isinstance(data_files, dict) else data_files):
                fault = diagnose_data_file(path, loader)
                if fault:
                    raise HfEwcError(f"{where}: {fault}.") from None
        what = f"dataset {domain.dataset!r}" if data_files is None else "data_files"
        raise HfEwcError(f"{where}: cannot load {what} (split {split!r}): {error_line(err)}") from None


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


def training_texts(raws: list[RawDomain], domains: list[DomainSpec]) -> Iterator[str]:
    """Every training text of the domains, in order (what a tokenizer trained from scratch learns from)."""
    for raw, spec in zip(raws, domains):
        for batch in raw.train.iter(batch_size=1000):
            yield from batch[spec.text_column]


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
