"""The per-sample gradients of one leaf module's parameters, from what its forward saw and the gradient of its output
(the hooks engine of `hf_ewc.importance._per_sample`).

One *contribution* is one use of a parameter in the forward pass: closed forms for `nn.Linear` and GPT-2's `Conv1D`
(``bmm(g_nᵀ, a_n)``), row scatters for `nn.Embedding`, closed forms for `nn.LayerNorm`, and ``vmap(vjp)`` of the
module's own forward for any other leaf module (RMSNorm, …). ``write(block, start, stop, first)`` writes (first) or
adds its per-sample gradients for samples [start, stop) into ``block`` of shape [stop - start, *parameter shape].
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from ..distributed import whole_tensor
from ..models import LINEAR_TYPES


class Unsupported(Exception):
    """Raised inside the hooks engine when a module's use cannot be decomposed per sample."""


@dataclass
class Record:
    module: nn.Module
    args: tuple
    kwargs: dict
    output: Tensor
    values: dict[str, Tensor] | None = None  # the module's parameters as the forward saw them (sharded models)


def _flat(x: Tensor, batch: int) -> Tensor:
    """``[B, ..., F]`` → ``[B, S, F]`` in float32 (``S = 1`` when there are no middle dimensions)."""
    if x.ndim < 2 or x.shape[0] != batch:
        raise Unsupported(f"activation of shape {tuple(x.shape)} has no leading batch dimension {batch}")
    return x.reshape(batch, -1, x.shape[-1]).float()


@dataclass
class _Outer:
    """``left_nᵀ · right_n`` per sample: a Linear weight (g, a) or a Conv1D weight (a, g)."""

    left: Tensor  # [B, S, rows]
    right: Tensor  # [B, S, cols]

    def write(self, block: Tensor, start: int, stop: int, first: bool) -> None:
        left = self.left[start:stop].transpose(1, 2)
        if first:
            torch.bmm(left, self.right[start:stop], out=block)
        else:
            block.baddbmm_(left, self.right[start:stop])


@dataclass
class _Dense:
    """Per-sample gradients already formed, [B, *shape] (biases, norms, generic leaf modules)."""

    values: Tensor

    def write(self, block: Tensor, start: int, stop: int, first: bool) -> None:
        if first:
            block.copy_(self.values[start:stop])
        else:
            block.add_(self.values[start:stop])


@dataclass
class Rows:
    """Sparse per-sample rows of an embedding gradient: ``keys = sample·V + row``, ``values`` [K, D]."""

    keys: Tensor
    values: Tensor
    num_rows: int

    def write(self, block: Tensor, start: int, stop: int, first: bool) -> None:
        if first:
            block.zero_()
        keep = (self.keys >= start * self.num_rows) & (self.keys < stop * self.num_rows)
        flat = block.view((stop - start) * self.num_rows, -1)
        flat.index_add_(0, self.keys[keep] - start * self.num_rows, self.values[keep])


@torch.no_grad()
def contributions(
    record: Record, grad_out: Tensor, batch: int, attrs: dict[str, str]
) -> dict[str, _Outer | _Dense | Rows]:
    """The per-sample gradients of a leaf module's parameters (``attrs``: attribute → parameter name) from its saved
    inputs and the gradient of its output: closed forms for Linear/Conv1D, embeddings and LayerNorm, `vmap` of the
    module's own `vjp` for anything else."""
    module = record.module
    x = record.args[0] if record.args else next((v for v in record.kwargs.values() if torch.is_tensor(v)), None)
    x = x.detach() if x is not None else None
    out: dict[str, _Outer | _Dense | Rows] = {}
    if isinstance(module, LINEAR_TYPES) and x is not None:
        a, g = _flat(x, batch), _flat(grad_out, batch)
        if "weight" in attrs:
            out[attrs["weight"]] = _Outer(g, a) if isinstance(module, nn.Linear) else _Outer(a, g)
        if "bias" in attrs:
            out[attrs["bias"]] = _Dense(g.sum(1))
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
        out[attrs["weight"]] = Rows(unique, values, module.num_embeddings)
    elif isinstance(module, nn.LayerNorm) and x is not None and set(attrs) <= {"weight", "bias"}:
        shape = tuple(module.normalized_shape)
        if x.shape[0] != batch:
            raise Unsupported(f"layer-norm input of shape {tuple(x.shape)} has no batch dimension {batch}")
        xhat = F.layer_norm(x.float(), shape, None, None, module.eps).reshape(batch, -1, *shape)
        g = grad_out.float().reshape(batch, -1, *shape)
        if "weight" in attrs:
            out[attrs["weight"]] = _Dense((g * xhat).sum(1))
        if "bias" in attrs:
            out[attrs["bias"]] = _Dense(g.sum(1))
    else:
        out.update({name: _Dense(t) for name, t in _vmapped_vjp(record, grad_out, batch, attrs).items()})
    return out


def _vmapped_vjp(record: Record, grad_out: Tensor, batch: int, attrs: dict[str, str]) -> dict[str, Tensor]:
    """Any other leaf module: ``vmap`` over samples of the ``vjp`` of the module's own forward."""
    module = record.module
    args = record.args
    batched = [torch.is_tensor(a) and a.ndim > 0 and a.shape[0] == batch for a in args]
    if not any(batched) or grad_out.shape[0] != batch:
        raise Unsupported(f"{type(module).__name__}: no batch dimension to split")
    params = record.values or {attr: getattr(module, attr).detach() for attr in attrs}

    def one(grad_n, *args_n):
        full = [a.unsqueeze(0) if b else a for a, b in zip(args_n, batched)]

        def f(p):
            return functional_call(module, p, tuple(full), record.kwargs)

        _, pullback = vjp(f, params)
        return pullback(grad_n.unsqueeze(0))[0]

    in_dims = (0, *[0 if b else None for b in batched])
    detached = [a.detach() if torch.is_tensor(a) else a for a in args]
    try:
        with hooks_off(module) if record.values else contextlib.nullcontext():
            grads = vmap(one, in_dims=in_dims)(grad_out, *detached)
    except Exception as err:  # vmap refuses many ops; the loop engine takes over
        raise Unsupported(f"{type(module).__name__} cannot be vmapped ({err})") from err
    return {attrs[attr]: g.float() for attr, g in grads.items()}


HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called")  # fmt: skip


@contextlib.contextmanager
def hooks_off(module: nn.Module) -> Iterator[None]:
    """The module's own forward hooks set aside: re-running an FSDP2 module's forward for its per-sample gradients
    must not all-gather, reshard or move its training state (the whole parameters are passed in)."""
    kept = {name: getattr(module, name) for name in HOOK_DICTS if hasattr(module, name)}
    try:
        for name, hooks in kept.items():
            setattr(module, name, type(hooks)())
        yield
    finally:
        for name, hooks in kept.items():
            setattr(module, name, hooks)


def snapshot(module: nn.Module, owners: dict[nn.Module, dict[str, str]], sharded: bool) -> dict[str, Tensor] | None:
    """Under FSDP2 a module's parameters are whole only during its forward (slices again, their storage freed, by the
    backward): the generic (vmapped) path keeps a copy of the ones it differentiates (``owners[module]``)."""
    if not sharded or isinstance(module, (*LINEAR_TYPES, nn.Embedding, nn.LayerNorm)):
        return None
    return {attr: whole_tensor(getattr(module, attr).detach()).clone() for attr in owners[module]}
