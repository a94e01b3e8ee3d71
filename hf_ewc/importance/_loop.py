"""The one loop every collected importance method runs, and the contract a method fulfils.

A method is a class (see [`ImportanceMethod`]) built on the model's trainable parameters; the loop

1. turns the data (torch / 🤗 `datasets` Dataset or DataLoader) into this process's batches — samples capped at
   ``max_samples`` and split round-robin across processes, without padding duplicates;
2. runs in ``collection_mode``: eval mode (no dropout), gradients on, the global RNG forked and seeded so a collection
   is reproducible and leaves no trace, every train flag and ``requires_grad`` restored afterwards;
3. feeds each batch to ``method.accumulate`` (float32 sums and a count of samples);
4. reduces the sums and the count across processes with one `accelerate.utils.reduce`;
5. calls ``method.finalize(sums, count)`` on the global sums (a mean, for most methods), and refuses non-finite or
   negative results.

On an FSDP2-sharded model (DTensor parameters) the per-sample engine forms, after each backward pass, each parameter's
whole sum of this process's per-sample terms in turn (the square or absolute value of a gradient is taken before any
exchange: squaring an averaged gradient would give (mean g)², not mean g²) and reduce-scatters it into the
parameter's layout, so each process holds its slices and one parameter's whole size at a time; ``finalize`` works on
the slices and the importances come back as DTensors laid out like their parameters. A method whose sums are not
parameter-shaped (signal's per-feature sums) is all-reduced in step 4 as before.

Reducing before finalizing lets a method reduce small per-feature sums (signal) instead of parameter-sized results and
divide by the global count.
"""

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import datasets
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env, reduce, send_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm.auto import tqdm
from transformers import default_data_collator

from ..distributed import (
    all_reduce_,
    as_shard_of,
    check_world_size,
    is_sharded,
    raise_together,
)
from ..state import check_importances
from ..utils import HfEwcError


class ImportanceMethod:
    """The contract of a collected importance method (Fisher, MAS, signal, uniform …).

    The loop builds it inside the collection mode with the model, its trainable parameters, the collection ``seed``
    and the method's own options (the names in ``options``), then calls `accumulate` once per batch, reduces
    ``self.sums`` and the returned counts across processes, and calls `finalize` once on the reduced sums. `close`
    runs in any case (remove hooks there).

    Class attributes: ``name`` (the registry key), ``options`` (keyword options it takes), ``categorical`` (its
    batches need class labels: floating-point labels are refused), ``needs_data`` (False: `finalize` alone gives Ω).
    ``self.recorded`` holds settings the method resolved itself (recorded in the EWC state's metadata);
    ``self.sample_ids`` the global indices of the current batch's samples (the same on any number of processes:
    per-sample random draws seeded by them do not depend on which process sees the sample).
    """

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()
    categorical: ClassVar[bool] = True
    needs_data: ClassVar[bool] = True

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], *, seed: int | None = 0):
        self.model = model
        self.params = params
        self.seed = seed
        self.sums: dict[str, Tensor] = {}
        self.recorded: dict[str, Any] = {}
        self.sample_ids: list[int] | None = None

    def accumulate(self, inputs: dict[str, Any]) -> int:
        """Add one batch (already on the model's device) to ``self.sums``; return how many samples it counted."""
        raise NotImplementedError

    def finalize(self, sums: dict[str, Tensor], count: int) -> dict[str, Tensor]:
        """Ω from the sums over all processes: by default their mean over the ``count`` samples."""
        return {n: s / count for n, s in sums.items()}

    def close(self) -> None:
        """Release what the method attached to the model (hooks)."""

    def pad(self, inputs: dict[str, Any]) -> None:
        """Sharded models: run ``inputs``' passes (so this process joins every collective of FSDP2's forward and
        backward) with the terms weighted 0 and nothing counted. Methods on the per-sample engine get it for free."""
        engine = getattr(self, "engine", None)
        if engine is None:
            raise HfEwcError(f"The {self.name} method cannot run on FSDP2-sharded parameters.")
        engine.scale = 0.0
        try:
            self.accumulate(inputs)
        finally:
            engine.scale = 1.0


@dataclass
class ImportanceResult:
    """Importances plus how they were obtained (what [`EWCState.consolidate`] records)."""

    importances: dict[str, Tensor]
    num_samples: int
    method: str
    estimator: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def run_collection(
    method: type[ImportanceMethod],
    model: nn.Module,
    data: Any,
    params: dict[str, nn.Parameter],
    *,
    options: dict[str, Any],
    batch_size: int,
    data_collator: Callable | None,
    max_samples: int | None,
    seed: int | None,
    show_progress: bool,
    label: str,
) -> tuple[dict[str, Tensor], int, dict[str, Any]]:
    """Steps 1–5 of the module docstring; returns ``(importances, global count, the method's recorded settings)``."""
    # Without an Accelerator around, PartialState reads no ACCELERATE_USE_CPU: pass it, or a CPU launch of N processes
    # would not initialise the process group.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_world_size(state)
    batches, num_batches = iterate_batches(
        data, model, batch_size=batch_size, data_collator=data_collator, max_samples=max_samples, state=state
    )
    batches = tqdm(batches, total=num_batches, desc=label, disable=not (show_progress and state.is_main_process))
    device = next(iter(params.values())).device
    count = 0
    with collection_mode(model, seed):
        collector = method(model, params, seed=seed, **options)
        try:
            if is_sharded(params):
                count = accumulate_in_step(collector, batches, model, device)
            else:
                for batch, collector.sample_ids in batches:
                    inputs = prepare_inputs(batch, model, device, categorical=collector.categorical)
                    count += collector.accumulate(inputs)
        finally:
            collector.close()
    if is_sharded(params):  # (the per-sample engine's sums are slices already summed over the processes)
        engine = getattr(collector, "engine", None)
        sums, count = reduce_to_shards(collector.sums, count, done=set(engine.sums) if engine else set())
    else:
        sums, count = reduce_across_processes(collector.sums, count, state)
    if count == 0:
        raise HfEwcError(
            "No sample counted: every sample had all its labels masked (-100). Check the data collator and the labels."
        )
    importances = collector.finalize(sums, count)
    if not is_sharded(params):
        check_importances(importances)
        return importances, count, collector.recorded
    raise_together(lambda: check_importances(importances))  # each process checks its slices
    return {n: as_shard_of(t, params[n]) for n, t in importances.items()}, count, collector.recorded


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


def forward_arg_names(model: nn.Module) -> set[str] | None:
    """Named arguments of the model's forward (of the base model for PEFT models), as `Trainer` reads them to drop
    unused dataset columns; ``None`` when there is no forward to inspect."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    forward = getattr(model, "forward", None)
    if forward is None:
        return None
    params = inspect.signature(forward).parameters.values()
    named = {p.name for p in params if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
    return named | {"labels", "label", "label_ids"}


def drop_unused_columns(data, model: nn.Module):
    """For a 🤗 `datasets.Dataset`, keep only the columns the model's forward accepts (what `Trainer` does)."""
    if not isinstance(data, datasets.Dataset):
        return data
    accepted = forward_arg_names(model)
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
) -> tuple[Iterator[tuple[dict[str, Any], list[int]]], int | None]:
    """Batches for this process: samples ``[0, min(len, max_samples))`` split round-robin across processes (sample
    ``i`` goes to rank ``i % world``), so every sample is seen exactly once; no padding duplicates.

    Returns an iterator of ``(batch, global indices of its samples)`` and the number of batches it will yield
    (``None`` when unknown).
    """
    if max_samples is not None and max_samples < 1:
        raise HfEwcError(f"max_samples must be >= 1 (or None for all samples), got {max_samples}.")
    if batch_size < 1:
        raise HfEwcError(f"batch_size must be >= 1, got {batch_size}.")
    world, rank = state.num_processes, state.process_index
    if isinstance(data, DataLoader):
        return iterate_loader(data, max_samples, world, rank), None
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        raise HfEwcError(
            f"Unsupported data of type {type(data).__name__}: pass a map-style Dataset (torch or 🤗 datasets) or a "
            "DataLoader."
        )
    if data_collator is None:
        data_collator = default_data_collator
    data = drop_unused_columns(data, model)
    total = len(data) if max_samples is None else min(len(data), max_samples)
    if total == 0:
        raise HfEwcError("The data for importance collection is empty.")
    require_mapping(data[0], "A dataset item")
    indices = list(range(rank, total, world))
    subset = data.select(indices) if hasattr(data, "select") else Subset(data, indices)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=data_collator)

    # Lazy, so that the DataLoader iterator (which draws a base seed from the global RNG) is created inside the
    # collection's forked RNG, not here.
    def lazy() -> Iterator[tuple[dict[str, Any], list[int]]]:
        for k, batch in enumerate(loader):
            yield batch, indices[k * batch_size : (k + 1) * batch_size]

    return lazy(), len(loader)


def require_mapping(item: Any, what: str) -> None:
    if not isinstance(item, Mapping):
        raise HfEwcError(
            f"{what} is a {type(item).__name__}; importance collection needs dicts keyed by the model's forward "
            "arguments (input_ids, attention_mask, labels, …), as 🤗 datasets and data collators produce."
        )


def iterate_loader(
    loader: DataLoader, max_samples: int | None, world: int, rank: int
) -> Iterator[tuple[dict[str, Any], list[int]]]:
    seen = 0  # global count: every process walks the same loader, so all agree on it
    for index, batch in enumerate(loader):
        require_mapping(batch, "A DataLoader batch")
        size = batch_size_of(batch)
        if max_samples is not None and seen + size > max_samples:
            batch, size = slice_batch(batch, 0, max_samples - seen), max_samples - seen
        seen += size
        if index % world == rank and size > 0:
            yield batch, list(range(seen - size, seen))
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
    accepted = forward_arg_names(model)
    if accepted is not None and "use_cache" in accepted:
        inputs.setdefault("use_cache", False)
    return inputs


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


def accumulate_in_step(collector: ImportanceMethod, batches: Iterator, model: nn.Module, device) -> int:
    """Sharded model: FSDP2 all-gathers parameters in every forward and backward, so every process must run as many
    passes as the others; a process out of batches repeats its last one, weighted 0 and not counted."""
    count, last = 0, None
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        some, missing = all_reduce_(torch.tensor([float(batch is not None), float(batch is None)]), "max").tolist()
        if last is None and missing:  # (first step) every process needs one batch to repeat
            raise HfEwcError(
                "A process got no sample to collect on: a sharded model needs at least one batch per process "
                "(more samples than processes, or a DataLoader with at least as many batches)."
            )
        if not some:
            return count
        if batch is None:
            collector.pad(last)
        else:
            batch, collector.sample_ids = batch
            last = prepare_inputs(batch, model, device, categorical=collector.categorical)
            count += collector.accumulate(last)


def reduce_to_shards(sums: dict[str, Tensor], count: int, done: set[str]) -> tuple[dict[str, Tensor], int]:
    """Sharded model: the sums in ``done`` are kept (the per-sample engine's slices, summed over the processes
    after every pass), any other (signal's per-feature sums) all-reduced; the count summed."""
    reduced = {name: s if name in done else all_reduce_(s, "sum") for name, s in sums.items()}
    return reduced, round(float(all_reduce_(torch.tensor([float(count)], dtype=torch.float64), "sum")))


def reduce_across_processes(sums: dict[str, Tensor], count: int, state: PartialState) -> tuple[dict[str, Tensor], int]:
    if state.num_processes == 1:
        return sums, count
    device = next(iter(sums.values())).device if sums else torch.device("cpu")
    if state.distributed_type.name == "NO":  # pragma: no cover - guarded by check_world_size
        return sums, count
    reduced = reduce({"sums": sums, "count": torch.tensor(float(count), device=device)}, reduction="sum")
    return reduced["sums"], round(float(reduced["count"]))
