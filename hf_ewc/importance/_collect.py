"""The machinery every importance method shares.

- ``iterate_batches``: data (torch / 🤗 `datasets` Dataset or DataLoader) → batches on the model's device, capped at
  ``max_samples``, sharded across processes without padding duplicates;
- ``collection_mode``: eval mode (no dropout), gradients enabled, the caller's train/eval flags and ``requires_grad``
  restored afterwards, the global RNG forked and seeded so a collection is reproducible and leaves no trace;
- ``PerSampleGradients``: per-sample gradients of a per-sample objective, transformed (squared or absolute) and summed
  in float32. Two engines compute the same thing:

  * ``hooks`` — one batched forward and one backward to the *outputs* of the modules that own trainable parameters
    (``torch.autograd.grad`` w.r.t. those outputs, so no parameter gradient is ever formed); the per-sample parameter
    gradients are then contracted from the saved inputs and output-gradients: ``bmm(g_nᵀ, a_n)`` for `nn.Linear` and
    GPT-2's `Conv1D`, row scatters for `nn.Embedding`, closed forms for `nn.LayerNorm`, and ``vmap(vjp)`` for any other
    leaf module (RMSNorm, …). Parameters shared by several modules (tied embeddings) or modules called several times
    get their contributions summed before the square, as the definition requires.
  * ``loop`` — a batch-size-1 loop over the samples (the reference; also the fallback for models the hooks engine
    cannot see through, e.g. parameters owned by non-leaf modules).

  ``auto`` picks ``hooks`` when every trainable parameter sits in a leaf module, and checks on the first batch that the
  per-sample gradients add up to the batch gradient; if they do not (an in-place op on a module output, an exotic
  module) it warns and switches to ``loop``.
"""

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import reduce, send_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..utils import HfEwcError, logger


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
    indices = list(range(rank, total, world))
    subset = data.select(indices) if hasattr(data, "select") else Subset(data, indices)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=data_collator)

    # Lazy, so that the DataLoader iterator (which draws a base seed from the global RNG) is created inside the
    # collection's forked RNG, not here.
    def lazy() -> Iterator[dict[str, Any]]:
        yield from loader

    return lazy(), len(loader)


def _iterate_loader(loader: DataLoader, max_samples: int | None, world: int, rank: int) -> Iterator[dict[str, Any]]:
    seen = 0  # global count: every process walks the same loader, so all agree on it
    for index, batch in enumerate(loader):
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


def check_world_size(state: PartialState) -> None:
    """Refuse the silent misconfiguration where the launcher started N processes that each believe they are alone."""
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if env_world > 1 and state.num_processes == 1:
        raise HfEwcError(
            f"WORLD_SIZE={env_world} but accelerate sees a single process, so each process would collect alone. On "
            "CPU launch with `accelerate launch --multi_gpu --num_processes N` and ACCELERATE_USE_CPU=1 (or "
            "torchrun)."
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

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    def log_probs(self) -> Tensor:
        return torch.log_softmax(self.logits.float(), dim=-1)

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


def check_loss_convention(outputs: Any, inputs: Mapping[str, Any], *, shift_labels: bool) -> None:
    """On the first batch: the model's own loss must equal the mean token cross-entropy the collector computes, or the
    collector misreads the label layout (typically a causal LM whose labels are shifted another way)."""
    labels = inputs.get("labels")
    model_loss = outputs_loss(outputs)
    if model_loss is None or labels is None:
        return
    logits = outputs_logits(outputs, True).detach()
    theirs = float(model_loss.detach().float())
    if not math.isfinite(theirs):
        return  # a broken model: the importances will be non-finite and refused with the parameter's name

    def nll(shift: bool) -> float | None:
        if logits.ndim == 2:
            return _mean_nll(logits, labels.reshape(-1))
        if shift:
            return _mean_nll(logits[:, :-1], labels[:, 1:])
        return _mean_nll(logits, labels)

    def close(value: float | None) -> bool:
        return value is not None and abs(value - theirs) <= 2e-3 * max(1.0, abs(theirs))

    ours = nll(shift_labels)
    if ours is None or close(ours):
        return
    message = (
        f"The model's loss ({theirs:.5f}) differs from the mean token cross-entropy the importance collector computes "
        f"({ours:.5f}) with shift_labels={shift_labels}"
    )
    if logits.ndim == 3 and close(nll(not shift_labels)):
        raise HfEwcError(message + f"; the model aligns labels the other way: pass shift_labels={not shift_labels}.")
    logger.warning(message + ": the model uses a custom loss; importances follow plain cross-entropy.")


# ------------------------------------------------------------------------------------------ per-sample gradient engine
class Unsupported(Exception):
    """Raised inside the hooks engine when a module's use cannot be decomposed per sample."""


@dataclass
class _Rows:
    """Sparse per-sample rows of an embedding gradient: ``keys = sample·V + row``, ``values`` [K, D]."""

    keys: Tensor
    values: Tensor
    num_rows: int


@dataclass
class _Record:
    module: nn.Module
    args: tuple
    kwargs: dict
    output: Tensor


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return ()
    return (Conv1D,)


def _flat(x: Tensor, batch: int) -> Tensor:
    """``[B, ..., F]`` → ``[B, S, F]`` in float32 (``S = 1`` when there are no middle dimensions)."""
    if x.ndim < 2 or x.shape[0] != batch:
        raise Unsupported(f"activation of shape {tuple(x.shape)} has no leading batch dimension {batch}")
    return x.reshape(batch, -1, x.shape[-1]).float()


class PerSampleGradients:
    """Accumulates ``Σ_n transform(∇_θ objective_n)`` in float32 for the trainable parameters of ``model``."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], transform: str, engine: str = "auto"):
        if transform not in ("square", "abs"):
            raise ValueError(transform)
        if engine not in ("auto", "hooks", "loop"):
            raise HfEwcError(f"Unknown per_sample engine {engine!r}; choose one of: auto, hooks, loop.")
        self.model = model
        self.params = params
        self.transform = transform
        self.sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
        self._name_of = {id(p): n for n, p in params.items()}
        self._owners: dict[nn.Module, dict[str, str]] = {}  # leaf module -> {attribute: parameter name}
        self._engine_requested = engine
        reason = self._find_owners() if engine != "loop" else None
        if engine == "hooks" and reason:
            raise HfEwcError(f"per_sample='hooks' cannot be used with this model: {reason}. Use per_sample='loop'.")
        if engine == "auto" and reason:
            logger.info(f"Per-sample gradients: using the batch-size-1 loop ({reason}).")
        self.engine = "loop" if (engine == "loop" or reason) else "hooks"
        self.verify_pending = engine == "auto" and self.engine == "hooks"
        self._records: list[_Record] = []
        self._recording = False
        self._handles: list = []
        self._batch = 1

    # ---------------------------------------------------------------- setup
    def _find_owners(self) -> str | None:
        """Register the leaf modules that own trainable parameters; return why the hooks engine cannot be used."""
        covered = set()
        for module in self.model.modules():
            if any(True for _ in module.children()):
                continue  # a non-leaf module's own parameters are either aliases of a leaf's (BERT's MLM bias) or not
            direct = [
                (attr, self._name_of[id(p)])
                for attr, p in module.named_parameters(recurse=False)
                if id(p) in self._name_of
            ]
            if not direct:
                continue
            if isinstance(module, nn.Embedding) and (module.scale_grad_by_freq or module.sparse):
                return f"{direct[0][1]!r} is an embedding with scale_grad_by_freq/sparse"
            self._owners[module] = dict(direct)
            covered.update(name for _, name in direct)
        uncovered = [n for n in self.params if n not in covered]
        if uncovered and self._engine_requested == "hooks":
            return f"parameter {uncovered[0]!r} is not owned by a leaf module"
        # With engine="auto" such parameters (unused, or used directly by a non-leaf module) are caught by the
        # first-batch check: their per-sample gradients would not add up to the batch gradient.
        return None

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record the inputs and outputs of every parameter-owning module during the forward pass."""
        if self.engine != "hooks":
            yield
            return
        self._records = []

        def hook(module, args, kwargs, output):
            if not self._recording:
                return None
            if not torch.is_tensor(output):
                raise Unsupported(f"{type(module).__name__} returns {type(output).__name__}, not a tensor")
            if not output.requires_grad:
                return None
            batch = self._batch
            if output.ndim > 0 and output.shape[0] == 1 and batch > 1:
                # Shared across the batch and broadcast later (GPT-2/BERT position embeddings of position_ids [1, T]):
                # hand the rest of the model an explicit per-sample copy so its gradient stays per sample.
                output = output.expand(batch, *output.shape[1:])
                args = tuple(
                    a.expand(batch, *a.shape[1:]) if torch.is_tensor(a) and a.ndim > 0 and a.shape[0] == 1 else a
                    for a in args
                )
                self._records.append(_Record(module, args, kwargs, output))
                return output
            self._records.append(_Record(module, args, kwargs, output))
            return None

        self._handles = [m.register_forward_hook(hook, with_kwargs=True) for m in self._owners]
        self._recording = True
        try:
            yield
        finally:
            self._recording = False
            for h in self._handles:
                h.remove()
            self._handles = []

    def clear(self) -> None:
        self._records = []

    # ---------------------------------------------------------------- per-module rules
    def _contributions(self, record: _Record, grad_out: Tensor, batch: int) -> dict[str, Tensor | _Rows]:
        module = record.module
        x = record.args[0] if record.args else next((v for v in record.kwargs.values() if torch.is_tensor(v)), None)
        attrs = self._owners[module]
        out: dict[str, Tensor | _Rows] = {}
        if isinstance(module, nn.Linear) and x is not None:
            a, g = _flat(x, batch), _flat(grad_out, batch)
            if "weight" in attrs:
                out[attrs["weight"]] = torch.bmm(g.transpose(1, 2), a)
            if "bias" in attrs:
                out[attrs["bias"]] = g.sum(1)
        elif isinstance(module, _conv1d_type()) and x is not None:
            a, g = _flat(x, batch), _flat(grad_out, batch)
            if "weight" in attrs:
                out[attrs["weight"]] = torch.bmm(a.transpose(1, 2), g)
            if "bias" in attrs:
                out[attrs["bias"]] = g.sum(1)
        elif isinstance(module, nn.Embedding) and x is not None:
            if x.shape[0] != batch:
                raise Unsupported(f"embedding input of shape {tuple(x.shape)} has no batch dimension {batch}")
            ids = x.reshape(batch, -1)
            g = grad_out.reshape(batch, ids.shape[1], -1).float()
            keep = ids.ne(module.padding_idx) if module.padding_idx is not None else torch.ones_like(ids, dtype=bool)
            sample = torch.arange(batch, device=ids.device).unsqueeze(1).expand_as(ids)
            keys = (sample * module.num_embeddings + ids)[keep]
            unique, inverse = torch.unique(keys, return_inverse=True)
            values = torch.zeros(unique.numel(), g.shape[-1], dtype=torch.float32, device=g.device)
            values.index_add_(0, inverse, g[keep])
            out[attrs["weight"]] = _Rows(unique, values, module.num_embeddings)
        elif isinstance(module, nn.LayerNorm) and x is not None and set(attrs) <= {"weight", "bias"}:
            shape = tuple(module.normalized_shape)
            if x.shape[0] != batch:
                raise Unsupported(f"layer-norm input of shape {tuple(x.shape)} has no batch dimension {batch}")
            xhat = F.layer_norm(x.float(), shape, None, None, module.eps).reshape(batch, -1, *shape)
            g = grad_out.float().reshape(batch, -1, *shape)
            if "weight" in attrs:
                out[attrs["weight"]] = (g * xhat).sum(1)
            if "bias" in attrs:
                out[attrs["bias"]] = g.sum(1)
        else:
            out.update(self._generic(record, grad_out, batch, attrs))
        return out

    def _generic(self, record: _Record, grad_out: Tensor, batch: int, attrs: dict[str, str]) -> dict[str, Tensor]:
        """Any other leaf module: ``vmap`` over samples of the ``vjp`` of the module's own forward."""
        from torch.func import functional_call, vjp, vmap

        module = record.module
        args = record.args
        batched = [torch.is_tensor(a) and a.ndim > 0 and a.shape[0] == batch for a in args]
        if not any(batched) or grad_out.shape[0] != batch:
            raise Unsupported(f"{type(module).__name__}: no batch dimension to split")
        params = {attr: getattr(module, attr).detach() for attr in attrs}

        def one(grad_n, *args_n):
            full = [a.unsqueeze(0) if b else a for a, b in zip(args_n, batched)]

            def f(p):
                return functional_call(module, p, tuple(full), record.kwargs)

            _, pullback = vjp(f, params)
            return pullback(grad_n.unsqueeze(0))[0]

        in_dims = (0, *[0 if b else None for b in batched])
        detached = [a.detach() if torch.is_tensor(a) else a for a in args]
        self._recording = False
        try:
            grads = vmap(one, in_dims=in_dims)(grad_out, *detached)
        except Exception as err:  # vmap refuses many ops; the loop engine takes over
            raise Unsupported(f"{type(module).__name__} cannot be vmapped ({err})") from err
        finally:
            self._recording = True
        return {attrs[attr]: g.float() for attr, g in grads.items()}

    # ---------------------------------------------------------------- accumulation
    def _finish(self, name: str, parts: list[Tensor | _Rows], batch: int) -> None:
        acc = self.sums[name]
        if len(parts) == 1 and isinstance(parts[0], _Rows):
            rows = parts[0]
            values = rows.values.square() if self.transform == "square" else rows.values.abs()
            acc.index_add_(0, rows.keys % rows.num_rows, values)
            return
        dense = None
        for part in parts:
            if isinstance(part, _Rows):
                continue
            dense = part if dense is None else dense + part
        if dense is None:
            dense = torch.zeros(batch, *acc.shape, dtype=torch.float32, device=acc.device)
        for part in parts:
            if isinstance(part, _Rows):
                dense = dense.reshape(batch * part.num_rows, -1).index_add(0, part.keys, part.values)
        dense = dense.reshape(batch, *acc.shape)
        acc += dense.square().sum(0) if self.transform == "square" else dense.abs().sum(0)

    def backward(self, objective: Tensor, *, retain_graph: bool = False) -> None:
        """Add ``Σ_n transform(∇ objective_n)`` for ``objective`` of shape ``[B]`` (one value per sample)."""
        batch = objective.shape[0]
        records = self._records
        outputs = [r.output for r in records]
        grads = torch.autograd.grad(objective.sum(), outputs, retain_graph=retain_graph, allow_unused=True)
        expected: dict[str, int] = {}
        for r in records:
            for name in self._owners[r.module].values():
                expected[name] = expected.get(name, 0) + 1
        parts: dict[str, list] = {}
        for record, grad in zip(records, grads):
            contributions = self._contributions(record, grad, batch) if grad is not None else {}
            for name in self._owners[record.module].values():
                if name in contributions:
                    parts.setdefault(name, []).append(contributions[name])
                expected[name] -= 1
                if expected[name] == 0 and name in parts:
                    self._finish(name, parts.pop(name), batch)

    def verify(self, objective: Tensor) -> bool:
        """First batch of ``auto``: do the per-sample gradients add up to the batch gradient? (Runs before
        `backward`, keeps the graph.)"""
        batch = objective.shape[0]
        names = list(self.params)
        reference = torch.autograd.grad(
            objective.sum(), [self.params[n] for n in names], retain_graph=True, allow_unused=True
        )
        reference = dict(zip(names, reference))
        outputs = [r.output for r in self._records]
        grads = torch.autograd.grad(objective.sum(), outputs, retain_graph=True, allow_unused=True)
        totals: dict[str, Tensor] = {}
        for record, grad in zip(self._records, grads):
            if grad is None:
                continue
            for name, part in self._contributions(record, grad, batch).items():
                if isinstance(part, _Rows):
                    total = torch.zeros_like(self.sums[name])
                    total.index_add_(0, part.keys % part.num_rows, part.values)
                else:
                    total = part.sum(0)
                totals[name] = totals.get(name, 0) + total
        reference = {n: torch.zeros_like(self.sums[n]) if g is None else g.float() for n, g in reference.items()}
        # Absolute tolerance from the largest gradient anywhere: some gradients are exactly 0 in exact arithmetic
        # (attention key biases) and both sides then hold rounding noise.
        scale = max((float(g.abs().max()) for g in reference.values() if g.numel()), default=0.0)
        if not math.isfinite(scale):
            return True  # non-finite gradients: nothing to compare; the final check names the parameter
        for name in names:
            ref = reference[name]
            got = totals.get(name, torch.zeros_like(ref))
            if not torch.allclose(got, ref, rtol=1e-3, atol=1e-5 * scale + 1e-12):
                logger.warning(
                    f"Per-sample gradients from hooks do not add up to the batch gradient for {name!r} (max abs diff "
                    f"{float((got - ref).abs().max()):.3g}); switching to the batch-size-1 loop."
                )
                return False
        return True

    # ---------------------------------------------------------------- one batch
    def run(self, inputs: dict[str, Any], make_objectives: Callable[[Any, dict[str, Any]], tuple[int, Any]]) -> int:
        """Forward ``inputs``, build the per-sample objectives and accumulate their transformed gradients.

        ``make_objectives(outputs, inputs)`` returns ``(number of samples that count, iterable of [B] objectives)``.
        Returns the number of samples that count.
        """
        if self.engine == "hooks":
            try:
                return self._run_hooks(inputs, make_objectives)
            except Unsupported as err:
                if not self.verify_pending:  # only the first, checked batch may still fall back
                    raise HfEwcError(
                        f"The hooks engine cannot compute per-sample gradients for this model: {err}. Use "
                        "per_sample='loop'."
                    ) from err
                logger.warning(f"Per-sample gradients: switching to the batch-size-1 loop ({err}).")
                self.engine = "loop"
            finally:
                self.clear()
        return self._run_loop(inputs, make_objectives)

    def _run_hooks(self, inputs, make_objectives) -> int:
        self._batch = batch_size_of(inputs)
        with self.capture():
            outputs = self.model(**inputs)
        count, objectives = make_objectives(outputs, inputs)
        for objective in objectives:
            if self.verify_pending:
                if not self.verify(objective):
                    raise Unsupported("per-sample gradients do not add up to the batch gradient")
                self.verify_pending = False
            self.backward(objective, retain_graph=True)
        return count

    def _run_loop(self, inputs, make_objectives) -> int:
        names = list(self.params)
        tensors = [self.params[n] for n in names]
        count = 0
        for n in range(batch_size_of(inputs)):
            sample = slice_batch(inputs, n, n + 1)
            outputs = self.model(**sample)
            valid, objectives = make_objectives(outputs, sample)
            count += valid
            for objective in objectives:
                grads = torch.autograd.grad(objective.sum(), tensors, retain_graph=True, allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is not None:
                        grad = grad.float()
                        self.sums[name] += grad.square() if self.transform == "square" else grad.abs()
        return count
