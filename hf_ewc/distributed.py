"""What the process layout allows: which parameters are sharded, whether the launcher and accelerate agree on the world
size, and the one refusal for setups that split parameters across processes (FSDP, DeepSpeed ZeRO-3).

Every importance method, the state and the trainer get their parameters from [`trainable_parameters`], so a sharded
parameter is refused in one place whatever path reaches it; [`sharded_setup`] answers the same question from the
launch environment before any model exists.
"""

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import transformers.integrations.deepspeed as hf_deepspeed
from accelerate.utils import parse_flag_from_env
from torch import nn

from .utils import HfEwcError


try:  # public since torch 2.4
    from torch.distributed.tensor import DTensor, Partial, distribute_tensor
except ImportError:  # pragma: no cover - torch 2.3, or a build without torch.distributed
    try:
        from torch.distributed._tensor import DTensor, Partial, distribute_tensor
    except ImportError:
        DTensor, Partial, distribute_tensor = (), None, None  # isinstance(x, ()) is always False
try:  # public since torch 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - torch 2.4/2.5 keep it here; 2.3 has none (nothing to reshard)
    try:
        from torch.distributed._composable.fsdp import FSDPModule
    except ImportError:
        FSDPModule = None


def sharding_refusal(what: str) -> HfEwcError:
    """The error for sharded parameters; ``what`` names the setup ("FSDP") or the parameter ("'w' is a … shard")."""
    return HfEwcError(
        f"EWC over sharded parameters ({what}) is not supported: importances, anchors and the penalty need whole "
        "parameters. Use one process, DDP (`accelerate launch --multi_gpu`, configs/accelerate/multi_gpu.yaml) or "
        "DeepSpeed ZeRO-1/2 (configs/accelerate/deepspeed_zero2.yaml); FSDP2 (DTensor parameters: fully_shard, "
        "a model sharded at load time, accelerate's FSDP2 plugin) is the sharded engine EWCTrainer collects, "
        "trains and consolidates on, shard by shard; see the README's support matrix."
    )


def sharding_of(p: torch.Tensor) -> str | None:
    """``"FSDP2 (DTensor)"``, ``"FSDP"``, ``"DeepSpeed ZeRO-3"`` for a parameter split across processes, else None."""
    if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):  # DeepSpeed's partitioned parameters
        return "DeepSpeed ZeRO-3"
    if isinstance(p, DTensor):
        return "FSDP2 (DTensor)"
    if type(p).__name__ == "FlatParameter" or getattr(p, "_fsdp_flattened", False):
        return "FSDP"
    return None


def trainable_parameters(model: nn.Module, *, sharded: bool = False) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` for the parameters with ``requires_grad``, named as ``model.named_parameters()`` names
    them (tied parameters appear once, under their first name). A sharded parameter is refused, naming it: each
    process would hold a slice, and the state would pair slices with whole names — except, with ``sharded=True``,
    FSDP2's DTensors, for the code that works on them shard by shard (collection, the state, the penalty, the
    proximal step, SI, the sparsity masks); FSDP2 modules holding whole parameters after a forward without backward
    are first resharded (see [`reshard`]), so call it between steps."""
    if sharded:
        reshard(model)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for name, p in params.items():
        kind = sharding_of(p)
        if kind is not None and not (sharded and isinstance(p, DTensor)):
            raise sharding_refusal(f"{name!r} is a {kind} shard")
    return params


def reshard(model: nn.Module) -> None:
    """Put the slices of every FSDP2 module of ``model`` back in place of whole parameters left after a forward
    without backward (FSDP2 keeps the root's, say, after an evaluation), so the parameters are DTensors again; a no-op
    for other models. Call it between steps only."""
    for module in model.modules():
        if FSDPModule is not None and isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(params: dict[str, torch.Tensor]) -> bool:
    """Whether any of ``params`` is an FSDP2 DTensor (this process holds a slice of it)."""
    return any(isinstance(p, DTensor) for p in params.values())


def replicated_parameter(params: dict[str, torch.Tensor]) -> str | None:
    """When some of ``params`` are DTensors: the name of one that several processes hold the same slice of (HSDP's
    ``Replicate`` placement) or of a plain parameter next to them (every process holds it whole), else None — the
    penalty's global values would count those once per process."""
    if not is_sharded(params):
        return None
    return next((n for n, p in params.items() if not isinstance(p, DTensor) or not all(
        s.is_shard() for s in p.placements)), None)  # fmt: skip


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's slice of the whole tensor ``full``, laid out as the DTensor parameter ``like`` is (uneven and
    empty slices included), as a plain tensor on ``like``'s device; no communication: every process holds ``full``.
    ``full`` itself when ``like`` is not a DTensor."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a sharded parameter, or an importance or anchor laid out like one)."""
    return isinstance(t, DTensor)


def is_main_process() -> bool:
    """Rank 0 of the default group, or no group at all."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's slices gathered from every process (a collective: every process calls it, in
    the same order); ``t`` itself otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def raise_together(check: Callable[[], None]) -> None:
    """Run ``check`` on every process; when it raises `HfEwcError` on any of them, raise on all — a process that
    went on alone would wait forever in the next collective. A check of slices finds a fault on one process only."""
    error = None
    try:
        check()
    except HfEwcError as err:
        error = err
    failed = all_reduce_(torch.tensor([float(error is not None)]), "max")
    if error is not None:
        raise error
    if float(failed) > 0:
        raise HfEwcError("A check failed on another process (its error, above, names the fault); nothing was changed.")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's slice of a DTensor (a plain tensor); ``t`` itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def as_shard_of(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local`` (this process's slice, laid out as ``like``'s) as a DTensor with ``like``'s mesh, placements and
    global shape — what an importance or anchor of a sharded parameter is; ``local`` itself when ``like`` is plain."""
    if not isinstance(like, DTensor):
        return local
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def reduce_scatter_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The sum over every process of the whole tensor ``full`` (each process holds its own), as this process's slice
    in ``like``'s layout: one reduce-scatter (``Partial`` → ``like``'s placements). ``full`` itself when ``like`` is
    plain."""
    if not isinstance(like, DTensor):
        return full
    mesh = like.device_mesh
    partial = DTensor.from_local(full.to(like.device), mesh, [Partial()] * mesh.ndim, run_check=False)
    return partial.redistribute(mesh, like.placements).to_local()


def all_reduce_(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """In place over every process of the default group: ``op`` "sum" or "max" (through the device the backend
    reduces on: a CPU tensor, say of CPU-offloaded slices, goes through CUDA under NCCL)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        moved = tensor.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        tensor.copy_(moved)
    return tensor


def sharded_setup(args: Any = None) -> str | None:
    """``"FSDP2"``, ``"FSDP"`` (version 1) or ``"DeepSpeed ZeRO-3"`` when the `accelerate launch` environment (or
    ``args``) shards the parameters across processes, else None — known before any Trainer or model is built."""
    if args is not None and args.fsdp:
        config = args.fsdp_config if isinstance(args.fsdp_config, dict) else {}
        return "FSDP2" if str(config.get("version", 2)) == "2" else "FSDP"
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return "FSDP2" if os.environ.get("FSDP_VERSION", "1") == "2" else "FSDP"
    if hf_deepspeed.is_deepspeed_zero3_enabled():
        return "DeepSpeed ZeRO-3"
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if stage is None and config_file and os.path.isfile(config_file):  # `deepspeed_config_file:` in the config
            with contextlib.suppress(OSError, ValueError), open(config_file, encoding="utf-8") as f:
                stage = (json.load(f).get("zero_optimization") or {}).get("stage")
        if str(stage) == "3":
            return "DeepSpeed ZeRO-3"
    return None


def refuse_sharded_setup(args: Any = None) -> None:
    """`hf-ewc train`'s refusal of a launch environment (or ``args``) that shards parameters: its evaluation, pruning
    and model-saving steps are not built for sharded models."""
    sharded = sharded_setup(args)
    if sharded == "FSDP2":
        raise HfEwcError(
            "hf-ewc train does not run under FSDP2 yet: its evaluation, pruning and model-saving steps are not built "
            "for sharded models. Run the sequence on one process or with DDP (configs/accelerate/multi_gpu.yaml); "
            "EWCTrainer itself trains, consolidates and saves FSDP2-sharded models (README: FSDP2)."
        )
    if sharded is not None:
        raise sharding_refusal(sharded)


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
