"""The machinery every importance method shares.

- ``iterate_batches``: data (torch / 🤗 `datasets` Dataset or DataLoader) → batches, capped at ``max_samples``,
  sharded across processes without padding duplicates;
- ``collection_mode``: eval mode (no dropout), gradients enabled, the caller's train/eval flags and ``requires_grad``
  restored afterwards, the global RNG forked and seeded so a collection is reproducible and leaves no trace;
- ``build_targets``: logits and labels laid out per position, with the causal shift the model's own loss uses;
- ``reduce_across_processes``: one `accelerate.utils.reduce` of the sums and the sample count.

The per-sample gradient engines live in ``_per_sample.py``.
"""

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import reduce, send_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..utils import HfEwcError, logger


def _linear_types() -> tuple[type, ...]:
    """`nn.Linear` and GPT-2's `Conv1D` (``z = a·W + b`` with W stored [in, out])."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


LINEAR_TYPES = _linear_types()


@dataclass
class ImportanceResult:
    """Importances plus how they were obtained (what `EWCState` records)."""

    importances: dict[str, Tensor]
    num_samples: int
    method: str
    estimator: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------- data
def batch_size_of(batch: Mapping[str, Any]) -> int:
    for key in ("input_ids", "labels", "inputs_embeds", "pixel_values"):
        value = batch.get(key)
        if torch.is_tensor(value) and value.ndim > 0:
            return int(value.shape[0])
    for value in batch.values():
        if torch.is_tensor(value) and value.ndim > 0:
            return int(value.shape[0])
    raise HfEwcError("Cannot tell the batch size: the batch holds no tensor with a batch dimension.")


def slice_batch(batch: Mapping[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows ``start:stop`` of every tensor whose first dimension is the batch dimension."""
    size = batch_size_of(batch)
    return {
        k: v[start:stop] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == size else v for k, v in batch.items()
    }


def _forward_arg_names(model: nn.Module) -> set[str] | None:
    """Named arguments of the model's forward (of the base model for PEFT models), as `Trainer` reads them to drop
    unused dataset columns; ``None`` when there is no forward to inspect."""
    import inspect

    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    forward = getattr(model, "forward", None)
    if forward is None:
        return None
    params = inspect.signature(forward).parameters.values()
    named = {p.name for p in params if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
    return named | {"labels", "label", "label_ids"}


def _drop_unused_columns(data, model: nn.Module):
    """For a 🤗 `datasets.Dataset`, keep only the columns the model's forward accepts (what `Trainer` does)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return data
    if not isinstance(data, datasets.Dataset):
        return data
    accepted = _forward_arg_names(model)
    if accepted is None:
        return data
    drop = [c for c in data.column_names if c not in accepted]
    if drop and len(drop) == len(data.column_names):
        raise HfEwcError(
            f"None of the dataset's columns {data.column_names} is an argument of the model's forward; tokenize the "
            "data first (input_ids, attention_mask, labels)."
        )
    return data.remove_columns(drop) if drop else data


def iterate_batches(
    data: Dataset | DataLoader | Any,
    model: nn.Module,
    *,
    batch_size: int,
    data_collator: Callable | None,
    max_samples: int | None,
    state: PartialState,
) -> tuple[Iterator[dict[str, Any]], int | None]:
    """Batches for this process: samples ``[0, min(len, max_samples))`` split round-robin across processes (sample
    ``i`` goes to rank ``i % world``), so every sample is seen exactly once; no padding duplicates.

    Returns the iterator and the number of batches it will yield (``None`` when unknown).
    """
    if max_samples is not None and max_samples < 1:
        raise HfEwcError(f"max_samples must be >= 1 (or None for all samples), got {max_samples}.")
    if batch_size < 1:
        raise HfEwcError(f"batch_size must be >= 1, got {batch_size}.")
    world, rank = state.num_processes, state.process_index
    if isinstance(data, DataLoader):
        return _iterate_loader(data, max_samples, world, rank), None
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        raise HfEwcError(
            f"Unsupported data of type {type(data).__name__}: pass a map-style Dataset (torch or 🤗 datasets) or a "
            "DataLoader."
        )
    if data_collator is None:
        from transformers import default_data_collator

        data_collator = default_data_collator
    data = _drop_unused_columns(data, model)
    total = len(data) if max_samples is None else min(len(data), max_samples)
    if total == 0:
        raise HfEwcError("The data for importance collection is empty.")
    _require_mapping(data[0], "A dataset item")
    indices = list(range(rank, total, world))
    subset = data.select(indices) if hasattr(data, "select") else Subset(data, indices)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=data_collator)

    # Lazy, so that the DataLoader iterator (which draws a base seed from the global RNG) is created inside the
    # collection's forked RNG, not here.
    def lazy() -> Iterator[dict[str, Any]]:
        yield from loader

    return lazy(), len(loader)


def _require_mapping(item: Any, what: str) -> None:
    if not isinstance(item, Mapping):
        raise HfEwcError(
            f"{what} is a {type(item).__name__}; importance collection needs dicts keyed by the model's forward "
            "arguments (input_ids, attention_mask, labels, …), as 🤗 datasets and data collators produce."
        )


def _iterate_loader(loader: DataLoader, max_samples: int | None, world: int, rank: int) -> Iterator[dict[str, Any]]:
    seen = 0  # global count: every process walks the same loader, so all agree on it
    for index, batch in enumerate(loader):
        _require_mapping(batch, "A DataLoader batch")
        size = batch_size_of(batch)
        if max_samples is not None and seen + size > max_samples:
            batch, size = slice_batch(batch, 0, max_samples - seen), max_samples - seen
        seen += size
        if index % world == rank and size > 0:
            yield batch
        if max_samples is not None and seen >= max_samples:
            return


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def prepare_inputs(
    batch: Mapping[str, Any], model: nn.Module, device: torch.device, *, categorical: bool = False
) -> dict[str, Any]:
    inputs = send_to_device(dict(batch), device)
    if "label" in inputs and "labels" not in inputs:
        inputs["labels"] = inputs.pop("label")
    if "label_ids" in inputs and "labels" not in inputs:
        inputs["labels"] = inputs.pop("label_ids")
    labels = inputs.get("labels")
    if categorical and torch.is_tensor(labels) and labels.is_floating_point():
        raise HfEwcError(
            "The labels are floating point (a regression or multi-label head); Fisher and MAS here need a "
            "categorical output (cross-entropy over the logits)."
        )
    accepted = _forward_arg_names(model)
    if accepted is not None and "use_cache" in accepted:
        inputs.setdefault("use_cache", False)
    return inputs


def check_world_size(state) -> None:
    """Refuse the silent misconfiguration where the launcher started N processes that each believe they are alone
    (on CPU, `accelerate launch --multi_gpu` without ACCELERATE_USE_CPU): each would train, collect and write alone."""
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if env_world > 1 and state.num_processes == 1:
        raise HfEwcError(
            f"WORLD_SIZE={env_world} but accelerate sees a single process, so every process would train, collect and "
            "write alone. On CPU set ACCELERATE_USE_CPU=1 (or `use_cpu: true` in the hf-ewc config) with "
            "`accelerate launch --multi_gpu --num_processes N`; on GPUs check that CUDA is visible to every process."
        )


@contextlib.contextmanager
def collection_mode(model: nn.Module, seed: int | None) -> Iterator[None]:
    """Eval mode and gradients on; restores each module's training flag and each parameter's ``requires_grad``."""
    training = {m: m.training for m in model.modules()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    devices = [model_device(model)] if model_device(model).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            if seed is not None:
                torch.manual_seed(seed)
            model.eval()
            yield
    finally:
        for module, flag in training.items():
            module.training = flag
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)


def reduce_across_processes(sums: dict[str, Tensor], count: int, state: PartialState) -> tuple[dict[str, Tensor], int]:
    if state.num_processes == 1:
        return sums, count
    device = next(iter(sums.values())).device if sums else torch.device("cpu")
    if state.distributed_type.name == "NO":  # pragma: no cover - guarded by check_world_size
        return sums, count
    reduced = reduce({"sums": sums, "count": torch.tensor(float(count), device=device)}, reduction="sum")
    return reduced["sums"], round(float(reduced["count"]))


# ------------------------------------------------------------------------------------------------- outputs & targets
def outputs_logits(outputs: Any, labels_given: bool) -> Tensor:
    if isinstance(outputs, Mapping) or hasattr(outputs, "logits"):
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else outputs.logits
    elif isinstance(outputs, (tuple, list)):
        logits = outputs[1] if labels_given and len(outputs) > 1 else outputs[0]
    else:
        logits = outputs if torch.is_tensor(outputs) else None
    if not torch.is_tensor(logits):
        raise HfEwcError(
            "The model's output has no logits; importance methods need a model that returns logits (and, for "
            "the empirical Fisher, takes labels)."
        )
    return logits


def outputs_loss(outputs: Any) -> Tensor | None:
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    if hasattr(outputs, "loss"):
        return outputs.loss
    if isinstance(outputs, (tuple, list)) and outputs and torch.is_tensor(outputs[0]) and outputs[0].ndim == 0:
        return outputs[0]
    return None


def model_shifts_labels(model: nn.Module) -> bool:
    """Whether the model's own loss shifts labels (position t predicts token t+1): 🤗 causal LMs do.

    A model counts as causal when its class is one of transformers' causal-LM classes or its `loss_type` maps to the
    causal-LM loss; encoder-decoders never shift (their decoder inputs are shifted instead)."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        return False
    if type(inner).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return True
    return LOSS_MAPPING.get(getattr(inner, "loss_type", None)) is ForCausalLMLoss


@dataclass
class Targets:
    """Logits and targets laid out as ``[B, T, V]`` / ``[B, T]`` with a ``[B, T]`` mask of positions that count.

    A sequence-classification batch has ``T = 1``. For causal LMs the positions are already shifted (position t
    predicts token t+1), exactly as the model's loss does.
    """

    logits: Tensor  # [B, T, V]
    labels: Tensor | None  # [B, T] (−100 replaced by 0 where masked)
    mask: Tensor  # [B, T] float
    tokens: Tensor  # [B] number of counted positions
    valid: Tensor  # [B] bool: samples with at least one counted position

    _log_probs: Tensor | None = None

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    def log_probs(self) -> Tensor:
        """``log_softmax`` of the logits in float32, computed once (it is the largest tensor of a language model)."""
        if self._log_probs is None:
            self._log_probs = torch.log_softmax(self.logits.float(), dim=-1)
        return self._log_probs

    def per_sample_mean(self, per_position: Tensor) -> Tensor:
        """``Σ_t mask·x / T_n`` for each sample (0 for samples without positions)."""
        return (per_position * self.mask).sum(1) / self.tokens.clamp(min=1)


def build_targets(
    outputs: Any, inputs: Mapping[str, Any], *, shift_labels: bool, need_labels: bool, method: str
) -> Targets:
    labels = inputs.get("labels")
    logits = outputs_logits(outputs, labels is not None)
    if labels is None and need_labels:
        raise HfEwcError(
            f"{method} needs labels in the data (a 'labels' column or key); for unlabeled data use "
            "fisher_estimator='sampled' or method='mas'."
        )
    if labels is not None and labels.is_floating_point():
        raise HfEwcError(
            "The labels are floating point (a regression or multi-label head); Fisher and MAS here need a "
            "categorical output (cross-entropy over the logits)."
        )
    if logits.ndim == 2:  # sequence classification [B, C]
        logits = logits.unsqueeze(1)
        labels = labels.reshape(-1, 1) if labels is not None else None
        attention = None
    elif logits.ndim == 3:  # token logits [B, T, V]
        attention = inputs.get("attention_mask")
        if labels is not None and labels.shape != logits.shape[:2]:
            raise HfEwcError(
                f"Token logits have shape {tuple(logits.shape)} but labels {tuple(labels.shape)}; expected labels "
                "[batch, sequence]."
            )
        if shift_labels:
            logits = logits[:, :-1]
            labels = labels[:, 1:] if labels is not None else None
            attention = attention[:, 1:] if attention is not None else None
    else:
        raise HfEwcError(
            f"Unsupported logits shape {tuple(logits.shape)}: expected [batch, classes] or [batch, T, V]."
        )
    if labels is not None:
        mask = labels.ne(-100)
        labels = labels.masked_fill(~mask, 0)
    elif attention is not None and attention.ndim == 2:
        mask = attention.bool()
    else:
        mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    maskf = mask.to(torch.float32)
    tokens = maskf.sum(1)
    return Targets(logits=logits, labels=labels, mask=maskf, tokens=tokens, valid=tokens > 0)


def _mean_nll(logits: Tensor, labels: Tensor) -> float | None:
    mask = labels.ne(-100)
    if not bool(mask.any()):
        return None
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return float(nll[mask].mean())


def check_loss_convention(outputs: Any, inputs: Mapping[str, Any], targets: Targets, *, shift_labels: bool) -> None:
    """On the first batch: the model's own loss must equal the mean token cross-entropy the collector computes, or the
    collector misreads the label layout (typically a causal LM whose labels are shifted another way)."""
    model_loss = outputs_loss(outputs)
    if model_loss is None or targets.labels is None or targets.mask.sum() == 0:
        return
    theirs = float(model_loss.detach().float())
    if not math.isfinite(theirs):
        return  # a broken model: the importances will be non-finite and refused with the parameter's name
    nll = -targets.log_probs().detach().gather(-1, targets.labels.unsqueeze(-1)).squeeze(-1)
    ours = float((nll * targets.mask).sum() / targets.mask.sum())

    # Half-precision models compute their loss in half precision: allow for its rounding.
    tolerance = max(2e-3, 4 * torch.finfo(targets.logits.dtype).eps)

    def close(value: float | None) -> bool:
        return value is not None and abs(value - theirs) <= tolerance * max(1.0, abs(theirs))

    if close(ours):
        return
    message = (
        f"The model's loss ({theirs:.5f}) differs from the mean token cross-entropy the importance collector computes "
        f"({ours:.5f}) with shift_labels={shift_labels}"
    )
    logits, labels = outputs_logits(outputs, True).detach(), inputs["labels"]
    if logits.ndim == 3:
        other = _mean_nll(logits, labels) if shift_labels else _mean_nll(logits[:, :-1], labels[:, 1:])
        if close(other):
            raise HfEwcError(
                message + f"; the model aligns labels the other way: pass shift_labels={not shift_labels}."
            )
    logger.warning(message + ": the model uses a custom loss; importances follow plain cross-entropy.")
