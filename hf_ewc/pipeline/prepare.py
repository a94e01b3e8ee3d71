"""Everything a run needs before its first step, and everything that can fail on bad input: the domains' data, the
tokenizer (loaded, or trained on the domains' text for a model built from config), the model (pretrained, built from
config, the stage a resumed run stopped at, or the run continued by `--from`), its EWC state, and a `peft:` run's
adapter. Nothing here writes to the run directory.
"""

import difflib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    set_seed,
)

from ..clnp import CLNP, CLNP_STATE_NAME
from ..models import auto_model_class, check_max_length, check_task
from ..state import STATE_DIR, STATE_WEIGHTS_NAME, EWCState, find_ewc_state
from ..utils import HfEwcError, check_finite_weights, error_line, logger
from .adapters import (
    BASE_MODEL_DIR,
    check_adapter_matches,
    check_wraps,
    hub_base_of,
    is_adapter_dir,
    load_adapter,
    wrap_model,
)
from .data import DomainData, RawDomain, label_names, load_raw_domain, tokenize_domain, training_texts
from .run_config import RunConfig
from .run_dir import RunDir
from .sources import check_model_source


@dataclass
class Prepared:
    """What `prepare` returns: the tokenizer, the tokenized domains, the label set (classification), the model the
    sequence starts from (None when resuming past the initial stage), the EWC state `--from` brings, and for a
    `peft:` run the base model to copy (`--from`) and the Hub id its adapters name as their base."""

    tokenizer: Any
    model: Any
    domains: list[DomainData]
    labels: list | None
    initial_state: EWCState | None
    base_source: Path | None = None
    hub_base: str | None = None


# ---------------------------------------------------------------------------------------------------- the start
def prepare(
    run: RunConfig, run_dir: RunDir, *, progress: dict | None, from_dir: str | None, base_dirs: list[Path]
) -> Prepared:
    """Data, tokenizer, model and state for ``run`` (resuming at ``progress``, continuing ``from_dir``)."""
    raws, labels = load_raw_domains(run, base_dirs)
    resumed_stage = None  # every stage holds the tokenizer: read it from the latest
    if progress and progress.get("initial") is not None:
        done = len(progress["completed"])
        resumed_stage = run_dir.stage(done - 1 if done else None)
    initial_state = None
    if from_dir is not None:
        initial_state = _from_state(from_dir)
        for i in range(len(run.domains)):  # before anything is written, not when the first domain consolidates
            initial_state.check_normalization(run.training_args(i, run.output_dir).importance_normalization)
        tokenizer = load_tokenizer(from_dir, revision=None, trust_remote_code=False, task=run.task)
    elif resumed_stage is not None:
        tokenizer = load_tokenizer(str(resumed_stage), revision=None, trust_remote_code=False, task=run.task)
    elif run.model.config is not None and run.model.tokenizer is None:
        tokenizer = train_tokenizer(run.task, training_texts(raws, run.domains), run.model.tokenizer_vocab_size)
    else:
        spec = run.model
        if spec.name_or_path is not None:  # (a model built from `config:` may still load a pretrained `tokenizer:`)
            check_model_source(spec.name_or_path, revision=spec.revision)  # before the tokenizer's own errors
        tokenizer = load_tokenizer(
            spec.tokenizer or spec.name_or_path,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            task=run.task,
        )
    domains = tokenize_all(run, raws, labels, tokenizer)
    prepared = Prepared(tokenizer, None, domains, labels, initial_state)
    if run.peft is not None or (from_dir is not None and is_adapter_dir(from_dir)):
        _prepare_peft(run, from_dir, prepared)
    if resumed_stage is None:
        if from_dir is not None:
            prepared.model = load_model(from_dir, run, labels, base_dir=prepared.base_source)
            if run.peft is not None:
                check_adapter_matches(prepared.model, run.peft, f"--from {from_dir}")
            initial_state.validate(prepared.model, strict=False)
            _from_units(run, from_dir, prepared)
        else:
            prepared.model = build_model(run, tokenizer, labels)
            if run.peft is not None:
                check_wraps(prepared.model, run.peft, run.task)
            args = run.training_args(0, run.output_dir)
            if args.ewc_mode == "clnp":  # a model CLNP finds no units in, or a head it cannot have: refused now
                CLNP(prepared.model, head=None if args.clnp_head == "auto" else args.clnp_head)
    return prepared


def _from_state(from_dir: str) -> EWCState:
    """The EWC state of the run `--from` continues (a finished run's output_dir, or a saved model with a state)."""
    if not ((Path(from_dir) / "config.json").is_file() or is_adapter_dir(from_dir)):
        raise HfEwcError(f"--from {from_dir}: no model there (config.json missing); give a finished run's output_dir.")
    state_dir = find_ewc_state(from_dir)
    if state_dir is None:
        raise HfEwcError(
            f"--from {from_dir}: no EWC state there (ewc_state/{STATE_WEIGHTS_NAME}); give the output_dir of a "
            "finished hf-ewc run or a directory saved with EWCState.save()."
        )
    return EWCState.load(state_dir)


def _from_units(run: RunConfig, from_dir: str, prepared: Prepared) -> None:
    """A CLNP run continues the unit allocation of the run it starts from (``clnp_state.safetensors`` beside its EWC
    state), which must have one."""
    mode = run.training_args(0, run.output_dir).ewc_mode
    state_dir = find_ewc_state(from_dir)
    has_units = (Path(state_dir) / CLNP_STATE_NAME).is_file()
    if mode == "clnp" and not has_units:
        raise HfEwcError(
            f"--from {from_dir}: ewc_mode: clnp continues a CLNP run's unit allocation, but that run has none "
            f"({CLNP_STATE_NAME} missing beside its EWC state); continue it with another ewc_mode, or start the "
            "CLNP sequence from its first domain."
        )
    if has_units and mode != "clnp":
        logger.warning(
            f"--from {from_dir} allocated its units with CLNP; this run (ewc_mode: {mode}) trains every unit and "
            "does not keep that allocation."
        )
    if mode == "clnp":
        clnp = attach_units(prepared.initial_state, prepared.model, state_dir).units
        taken = [d.name for d in run.domains if d.name in clnp.domains]
        if taken:
            raise HfEwcError(
                f"--from {from_dir} already owns units for domain(s) {', '.join(taken)}; give the new domains other "
                "names (CLNP keeps one allocation per name)."
            )
        clnp.check_capacity()


def attach_units(state: EWCState | None, model, state_dir: str | os.PathLike | None) -> EWCState | None:
    """``state`` with the CLNP allocation saved in ``state_dir`` (if any) bound to ``model`` as ``state.units``."""
    if state is not None and state_dir is not None and (Path(state_dir) / CLNP_STATE_NAME).is_file():
        state.units = CLNP.load(model, state_dir)
    return state


def _prepare_peft(run: RunConfig, from_dir: str | None, prepared: Prepared) -> None:
    """A `peft:` run (or `--from` a LoRA run): the two must agree; find the base model and the Hub id to record."""
    if from_dir is not None and is_adapter_dir(from_dir) != (run.peft is not None):
        raise HfEwcError(
            f"--from {from_dir} is a "
            + (
                "LoRA run: continue it with the same peft: block in the config."
                if run.peft is None
                else "full fine-tuning run whose EWC state protects weights LoRA would freeze: drop the peft: "
                "block, or start the LoRA sequence from its model with `model.name_or_path`."
            )
        )
    name = run.model.name_or_path  # what the adapters' configs name as their base (a local path never leaves here)
    prepared.hub_base = hub_base_of(from_dir) if from_dir else (name if name and not os.path.exists(name) else None)
    if from_dir is not None:
        prepared.base_source = Path(from_dir) / BASE_MODEL_DIR
        if not (prepared.base_source / "config.json").is_file():
            raise HfEwcError(
                f"--from {from_dir}: the adapter's base model is missing ({BASE_MODEL_DIR}/config.json); give the "
                "output_dir of a finished LoRA run of hf-ewc, which keeps its base model there."
            )


def load_raw_domains(run: RunConfig, base_dirs: list[Path]) -> tuple[list[RawDomain], list | None]:
    """Every domain's texts (and labels) before tokenization, and the label set of a classification run."""
    raws = [
        load_raw_domain(d, i, task=run.task, seed=run.seed, base_dirs=base_dirs) for i, d in enumerate(run.domains)
    ]
    return raws, label_names(raws, run.domains) if run.task == "sequence_classification" else None


def load_domains(run: RunConfig, tokenizer, base_dirs: list[Path]) -> list[DomainData]:
    """``run``'s domains loaded (relative paths against ``base_dirs``) and tokenized with ``tokenizer`` as the run
    does."""
    raws, labels = load_raw_domains(run, base_dirs)
    return tokenize_all(run, raws, labels, tokenizer)


def tokenize_all(run: RunConfig, raws, labels: list | None, tokenizer) -> list[DomainData]:
    """Every domain of ``run`` tokenized with ``tokenizer`` exactly as the run does (train and evaluation splits)."""
    label2id = {v: i for i, v in enumerate(labels)} if labels is not None else None
    return [
        tokenize_domain(
            raw, d, i, tokenizer, task=run.task, max_length=run.model.max_length, seed=run.seed, label2id=label2id
        )
        for i, (raw, d) in enumerate(zip(raws, run.domains))
    ]


# ------------------------------------------------------------------------------------------------------ tokenizers
def train_tokenizer(task: str, texts: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer trained from scratch: byte-level BPE for causal LMs, WordPiece with [CLS]/[SEP]/[MASK] otherwise."""
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
        raise HfEwcError(f"Cannot load the tokenizer {name!r}: {error_line(err)}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style tokenizers ship without one
    if task == "masked_lm" and tokenizer.mask_token is None:
        raise HfEwcError(f"Tokenizer {name!r} has no mask token: it cannot be used for task 'masked_lm'.")
    return tokenizer


# ------------------------------------------------------------------------------------------------------ models
def _check_config_keys(model_type: str, values: dict) -> None:
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
            raise HfEwcError(f"model.config: {error_line(err)}") from None
        if getattr(config, "vocab_size", len(tokenizer)) < len(tokenizer):
            raise HfEwcError(
                f"model.config.vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)."
            )
        check_task(task, config, "model.config")
        check_max_length(config, spec.max_length, "model.config")
        set_seed(run.seed)
        try:
            return auto_model_class(task).from_config(config)
        except (ValueError, TypeError, AttributeError, RuntimeError) as err:
            raise HfEwcError(f"model.config cannot build a model: {error_line(err)}") from None
    kwargs = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(spec.name_or_path, **kwargs)
    except Exception as err:  # noqa: BLE001 - any loading failure becomes one clear line
        raise HfEwcError(f"Cannot load the model config {spec.name_or_path!r}: {error_line(err)}") from None
    check_task(task, config, f"model {spec.name_or_path!r}")
    check_max_length(config, spec.max_length, f"model {spec.name_or_path!r}")
    set_seed(run.seed)
    try:
        model = auto_model_class(task).from_pretrained(spec.name_or_path, **kwargs, **extra)
    except Exception as err:  # noqa: BLE001 - any loading failure becomes one clear line
        raise HfEwcError(f"Cannot load the model {spec.name_or_path!r}: {error_line(err)}") from None
    check_finite_weights(model, f"model {spec.name_or_path!r}")
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_model(directory: str | os.PathLike, run: RunConfig, labels: list | None = None, base_dir: Path | None = None):
    """The model saved in ``directory`` (a stage, or the run `--from` continues). An adapter (a `peft:` run's stage
    or output) is loaded trainable onto the frozen base model in ``base_dir`` (this run's ``base_model/`` for a
    stage, the continued run's for `--from`)."""
    if is_adapter_dir(directory):
        if base_dir is None:
            raise HfEwcError(f"{directory} holds a LoRA adapter; its base model directory is needed to load it.")
        return load_adapter(load_model(base_dir, run, labels), directory, trainable=True)
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise HfEwcError(f"Cannot read the model config in {directory}: {error_line(err)}") from None
    check_task(run.task, config, f"model in {directory}")
    check_max_length(config, run.model.max_length, f"model in {directory}")
    if labels is not None:
        expected = {str(v): i for i, v in enumerate(labels)}
        if dict(getattr(config, "label2id", {}) or {}) != expected:
            raise HfEwcError(
                f"The model in {directory} has labels {dict(config.label2id)} but the domains have {expected}; "
                "continue with domains that use the same labels."
            )
    try:
        model = auto_model_class(run.task).from_pretrained(directory)
    except (OSError, ValueError, RuntimeError) as err:
        raise HfEwcError(f"Cannot load the model in {directory}: {error_line(err)}") from None
    check_finite_weights(model, f"the model in {directory}")
    return model


# ------------------------------------------------------------------------------------------------------ stages
def load_stage(run: RunConfig, run_dir: RunDir, index: int | None, prepared: Prepared) -> tuple[Any, EWCState | None]:
    """The model and EWC state saved after domain ``index`` (a `peft:` run's adapter onto its ``base_model/``); the
    state `--from` brought when no domain has been consolidated yet."""
    stage = run_dir.stage(index)
    model = load_model(stage, run, prepared.labels, base_dir=run_dir.path / BASE_MODEL_DIR)
    state = attach_units(run_dir.state_in(stage), model, stage / STATE_DIR)
    return model, state if state is not None else prepared.initial_state


def save_base_and_wrap(run: RunConfig, run_dir: RunDir, prepared: Prepared) -> None:
    """A `peft:` run keeps its frozen base model once, in ``output_dir/base_model``; stages hold adapters only. The
    model is wrapped after the base is saved (LoRA's initialisation seeded, the same on every process)."""
    run_dir.save_base_model(prepared.model, source=prepared.base_source)
    if prepared.base_source is None:
        set_seed(run.seed)
        prepared.model = wrap_model(prepared.model, run.peft, run.task)
