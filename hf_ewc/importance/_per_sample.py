"""Per-sample gradients of a per-sample objective, transformed (squared or absolute) and summed in float32.

Two engines compute the same thing:

- ``hooks`` — one batched forward and one backward to the *outputs* of the leaf modules that own trainable parameters
  (``torch.autograd.grad`` w.r.t. those outputs, so no parameter gradient is ever formed). Each parameter's per-sample
  gradients are then contracted from the saved module inputs and output-gradients, a chunk of samples at a time, into
  one reused scratch buffer: ``bmm(g_nᵀ, a_n)`` for `nn.Linear` and GPT-2's `Conv1D`, row scatters for `nn.Embedding`,
  closed forms for `nn.LayerNorm`, and ``vmap(vjp)`` of the module's own forward for any other leaf module (RMSNorm,
  …). A parameter used by several modules (a tied embedding and LM head) or by a module called several times gets
  its contributions summed before the square, as the definition requires. The scratch buffer bounds the memory (about
  64 MB, or one sample's gradient of the largest layer) and spares the allocator: on CPU, fresh parameter-sized
  blocks cost more in page faults than the arithmetic.
- ``loop`` — a batch-size-1 loop over the samples: the reference, and the fallback for models the hooks cannot see
  through (parameters used directly by non-leaf modules, in-place ops on module outputs).

``auto`` takes ``hooks`` when every trainable parameter sits in a leaf module and checks on the first batch that the
per-sample gradients add up to the batch gradient; if they do not, it warns and switches to ``loop``.
"""

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import all_reduce_, is_sharded, local_tensor, reduce_scatter_like
from ..utils import HfEwcError, logger
from ._contributions import Record, Rows, Unsupported, contributions, snapshot
from ._loop import batch_size_of, slice_batch
from ._targets import outputs_logits


SCRATCH_ELEMENTS = 1 << 24  # 64 MB of float32


def accumulate(acc: Tensor, per_sample: Iterable[Tensor], transform: str) -> None:
    """``acc += Σ_n transform(g_n)``, one sample at a time: each slice streams once through memory into an
    accumulator that stays in cache (3–10× faster on CPU than squaring the whole block and reducing it). The slices
    are scratch and may be overwritten."""
    for g in per_sample:
        if transform == "square":
            acc.addcmul_(g, g)
        else:
            acc.add_(g.abs_())


def in_step(make_objectives: Callable, outputs: Any, inputs: dict[str, Any]) -> tuple[int, list[Tensor]]:
    """Sharded model: ``make_objectives``' result with as many backward passes as the process with the most (FSDP2
    all-gathers in each), the extra ones of objective 0 (the exact Fisher's count of (position, class) pairs depends
    on the samples). An error on any process (a batch over ``max_backward_per_batch``, say) is raised on all."""
    error, count, objectives = None, 0, []
    try:
        count, objectives = make_objectives(outputs, inputs)
        objectives = list(objectives)
    except HfEwcError as err:
        error = err
    most, failed = all_reduce_(torch.tensor([float(len(objectives)), float(error is not None)]), "max").tolist()
    if error is not None:
        raise error
    if failed:
        raise HfEwcError("Per-sample gradients failed on another process (its error, above, says why).")
    most = int(most)
    if most > len(objectives):
        logits = outputs_logits(outputs, "labels" in inputs).float()
        zero = logits.reshape(logits.shape[0], -1).sum(1) * 0.0
        objectives += [zero] * (most - len(objectives))
    return count, objectives


class PerSampleGradients:
    """Accumulates ``Σ_n transform(∇_θ objective_n)`` in float32 for the trainable parameters of ``model``."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], transform: str, engine: str = "auto"):
        if transform not in ("square", "abs", "batch_square"):  # batch_square: (Σ_n g_n)², the batch's gradient
            raise ValueError(transform)
        if engine not in ("auto", "hooks", "loop"):
            raise HfEwcError(f"Unknown per_sample engine {engine!r}; choose one of: auto, hooks, loop.")
        self.model = model
        self.params = params
        self.transform = transform
        # float32 sums laid out as the parameters are held: this process's slice of a sharded one (already summed
        # over the processes: `backward` reduce-scatters each pass)
        self.sums = {n: torch.zeros_like(local_tensor(p), dtype=torch.float32) for n, p in params.items()}
        self.sharded = is_sharded(params)
        self.scale = 1.0  # 0 for a padding pass (`ImportanceMethod.pad`): gradients formed, nothing added
        self.rows = slice(None)  # the rows of the batch the objectives being made are of (the loop: one sample)
        self._name_of = {id(p): n for n, p in params.items()}
        self._owners: dict[nn.Module, dict[str, str]] = {}  # leaf module -> {attribute: parameter name}
        self._engine_requested = engine
        if self.sharded and engine == "loop":
            raise HfEwcError(
                "per_sample='loop' differentiates whole parameters; on FSDP2-sharded parameters only the hooks engine "
                "forms per-sample gradients (per_sample='auto' or 'hooks')."
            )
        reason = self._find_owners() if engine != "loop" else None
        if self.sharded and reason:
            raise HfEwcError(f"Per-sample gradients of this FSDP2-sharded model cannot be formed: {reason}.")
        if engine == "hooks" and reason:
            raise HfEwcError(f"per_sample='hooks' cannot be used with this model: {reason}. Use per_sample='loop'.")
        if engine == "auto" and reason:
            logger.info(f"Per-sample gradients: using the batch-size-1 loop ({reason}).")
        self.engine = "loop" if (engine == "loop" or reason) else "hooks"
        # The first-batch check compares with autograd's gradients of the parameters, which FSDP2 reduce-scatters
        # across processes: it runs where the parameters are whole (the hooks are the same code on both).
        self.verify_pending = engine == "auto" and self.engine == "hooks" and not self.sharded
        self._records: list[Record] = []
        self._recording = False
        self._batch = 1
        self._scratch: Tensor | None = None
        self._forward_drop: frozenset[str] = frozenset()

    def skip_model_loss(self) -> None:
        """Call the model without ``labels`` from now on: its own loss (a second log-softmax over the vocabulary for a
        language model) is not needed once the label layout has been checked. Kept where the forward requires them,
        and for encoder-decoder models, which build their decoder inputs from the labels."""
        config = getattr(self.model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            return
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        labels = inspect.signature(model.forward).parameters.get("labels")
        if labels is None or labels.default is not inspect.Parameter.empty:
            self._forward_drop = frozenset({"labels"})

    def _forward(self, inputs: dict[str, Any]) -> Any:
        return self.model(**{k: v for k, v in inputs.items() if k not in self._forward_drop})

    # ---------------------------------------------------------------- setup
    def _find_owners(self) -> str | None:
        """Register the leaf modules that own trainable parameters; return why the hooks engine cannot be used."""
        covered = set()
        for module in self.model.modules():
            if any(True for _ in module.children()):
                continue  # a non-leaf module's own parameters are either aliases of a leaf's (BERT's MLM bias) or not
            direct = {
                attr: self._name_of[id(p)]
                for attr, p in module.named_parameters(recurse=False)
                if id(p) in self._name_of
            }
            if not direct:
                continue
            if isinstance(module, nn.Embedding) and (module.scale_grad_by_freq or module.sparse):
                return f"{next(iter(direct.values()))!r} is an embedding with scale_grad_by_freq/sparse"
            self._owners[module] = direct
            covered.update(direct.values())
        uncovered = [n for n in self.params if n not in covered]
        if uncovered and (self._engine_requested == "hooks" or self.sharded):  # (sharded: no first-batch check)
            return f"parameter {uncovered[0]!r} is not owned by a leaf module"
        # With engine="auto" such parameters (unused, or used directly by a non-leaf module) are caught by the
        # first-batch check: their per-sample gradients would not add up to the batch gradient.
        return None

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record the inputs and outputs of every parameter-owning module during the forward pass."""
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
                self._records.append(
                    Record(module, args, kwargs, output, snapshot(module, self._owners, self.sharded))
                )
                return output
            self._records.append(Record(module, args, kwargs, output, snapshot(module, self._owners, self.sharded)))
            return None

        # Sharded: before FSDP2's own post-forward hook, which puts the slices back in place of the whole parameters
        handles = [m.register_forward_hook(hook, with_kwargs=True, prepend=self.sharded) for m in self._owners]
        self._recording = True
        try:
            yield
        finally:
            self._recording = False
            for h in handles:
                h.remove()

    # ---------------------------------------------------------------- accumulation
    @torch.no_grad()
    def _blocks(self, parts: list, batch: int, shape: torch.Size, device) -> Iterator[Tensor]:
        """The per-sample gradients of one parameter, summed over its uses, a chunk of samples at a time."""
        size = math.prod(shape)
        chunk = max(1, min(batch, SCRATCH_ELEMENTS // max(size, 1)))
        needed = chunk * size
        if self._scratch is None or self._scratch.numel() < needed or self._scratch.device != device:
            self._scratch = torch.empty(max(needed, SCRATCH_ELEMENTS), dtype=torch.float32, device=device)
        for start in range(0, batch, chunk):
            stop = min(batch, start + chunk)
            block = self._scratch[: (stop - start) * size].view(stop - start, *shape)
            for i, part in enumerate(parts):
                part.write(block, start, stop, first=i == 0)
            yield block

    def _per_parameter(self, objective: Tensor, retain_graph: bool) -> dict[str, list]:
        """Backward to the recorded outputs; every parameter's contributions for this batch."""
        batch = objective.shape[0]
        outputs = [r.output for r in self._records]
        grads = torch.autograd.grad(objective.sum(), outputs, retain_graph=retain_graph, allow_unused=True)
        parts: dict[str, list] = {}
        recording, self._recording = self._recording, False  # a vmapped recomputation must not record itself
        try:
            for record, grad in zip(self._records, grads):
                if grad is not None:
                    for name, part in contributions(record, grad, batch, self._owners[record.module]).items():
                        parts.setdefault(name, []).append(part)
        finally:
            self._recording = recording
        for uses in parts.values():  # sparse rows last: a dense first part overwrites instead of zeroing
            uses.sort(key=lambda part: isinstance(part, Rows))
        return parts

    def backward(self, objective: Tensor, *, retain_graph: bool = False) -> None:
        """Add ``Σ_n transform(∇ objective_n)`` for ``objective`` of shape ``[B]`` (one value per sample)."""
        batch = objective.shape[0]
        per_parameter = self._per_parameter(objective, retain_graph)
        # Sharded: each parameter's whole sum over this pass, in turn (every parameter, in one order on every process),
        # reduce-scattered into this process's slice: one parameter's whole size at a time, as FSDP's own gradients.
        for name in self.params if self.sharded else per_parameter:
            acc, param = self.sums[name], self.params[name]
            whole = torch.zeros(param.shape, dtype=torch.float32, device=acc.device) if self.sharded else acc
            if name in per_parameter:
                self._add(whole, per_parameter[name], batch)
            if self.sharded:
                acc += reduce_scatter_like(whole, param)

    def _add(self, acc: Tensor, parts: list, batch: int) -> None:
        """``acc += Σ_n transform(g_n)`` over the samples of one parameter's ``parts`` (its uses)."""
        if self.transform == "batch_square":
            total = sum(block.sum(0) for block in self._blocks(parts, batch, acc.shape, acc.device))
            acc.addcmul_(total, total)
        elif len(parts) == 1 and isinstance(parts[0], Rows):  # an untied embedding: stay sparse
            rows = parts[0]
            values = rows.values.square_() if self.transform == "square" else rows.values.abs_()
            acc.index_add_(0, rows.keys % rows.num_rows, values)
        else:
            for block in self._blocks(parts, batch, acc.shape, acc.device):
                accumulate(acc, block, self.transform)

    def verify(self, outputs: Any, inputs: dict[str, Any]) -> str | None:
        """First batch of ``auto``: are the hooks' per-sample gradients right? Returns why not, or ``None``.

        The check uses a label-free probe ``o_n = Σ logits_n ⊙ r`` (r fixed, random) so that it does not depend on
        the estimator: (1) the per-sample gradients must add up to the batch gradient — which catches uses the hooks
        do not see (an in-place op on a module output, a parameter used by a non-leaf module) — and (2) the first and
        last samples' gradients must equal those of a forward/backward of that sample alone — which catches
        activations whose leading dimension only looks like the batch (a sequence-first layout with T = B).
        """
        logits = outputs_logits(outputs, "labels" in inputs)
        batch = self._batch
        generator = torch.Generator(logits.device).manual_seed(0)
        probe = torch.randn(logits.shape, generator=generator, device=logits.device)
        objective = (logits.float() * probe).reshape(batch, -1).sum(1)
        names = list(self.params)
        tensors = [self.params[n] for n in names]
        checked = sorted({0, batch - 1})
        expected = {"batch": torch.autograd.grad(objective.sum(), tensors, retain_graph=True, allow_unused=True)}
        for n in checked:
            sample = slice_batch(inputs, n, n + 1)
            alone = (outputs_logits(self._forward(sample), "labels" in sample).float() * probe[n : n + 1]).sum()
            expected[n] = torch.autograd.grad(alone, tensors, allow_unused=True)
        got: dict = {key: {} for key in expected}
        for name, parts in self._per_parameter(objective, retain_graph=True).items():
            acc = self.sums[name]
            start = 0
            for block in self._blocks(parts, batch, acc.shape, acc.device):
                got["batch"][name] = got["batch"].get(name, 0) + block.sum(0)
                for n in checked:
                    if start <= n < start + len(block):
                        got[n][name] = block[n - start].clone()
                start += len(block)
        # A model prepared by accelerate for mixed precision runs its forward under autocast (its `_original_forward`
        # is kept): the rounding is that of bf16/fp16, whatever the parameters' dtype.
        autocast = getattr(self.model, "_original_forward", None) is not None
        for key, grads in expected.items():
            reference = {n: torch.zeros_like(self.sums[n]) if g is None else g.float() for n, g in zip(names, grads)}
            norms = {n: float(g.norm()) for n, g in reference.items()}
            largest = max(norms.values(), default=0.0)
            if not math.isfinite(largest):
                return None  # non-finite gradients: nothing to compare; the final check names the parameter
            for name in names:
                ref = reference[name]
                error = float((got[key].get(name, torch.zeros_like(ref)) - ref).norm())
                # Relative error of the whole tensor: a wrong attribution is off by O(1), rounding by a few ulps
                # (more in half precision). Gradients that are 0 in exact arithmetic (attention key biases) hold
                # rounding noise on both sides, hence the floor relative to the largest gradient.
                eps = torch.finfo(torch.bfloat16 if autocast else self.params[name].dtype).eps
                tol = max(1e-3, 4 * eps)
                if error > tol * norms[name] + 1e-2 * tol * largest:
                    what = (
                        "do not add up to the batch gradient"
                        if key == "batch"
                        else (f"of sample {key} differ from its gradient computed alone")
                    )
                    relative = error / max(norms[name], 1e-30)
                    return f"per-sample gradients {what} for {name!r} (relative error {relative:.2g})"
        return None

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
                    fix = "" if self.sharded else " Use per_sample='loop'."
                    raise HfEwcError(
                        f"The hooks engine cannot compute per-sample gradients for this model: {err}.{fix}"
                    ) from err
                logger.warning(f"Per-sample gradients: switching to the batch-size-1 loop ({err}).")
                self.engine = "loop"
            finally:
                self._records = []
        return self._run_loop(inputs, make_objectives)

    def _run_hooks(self, inputs, make_objectives) -> int:
        self._batch = batch_size_of(inputs)
        with self.capture():
            outputs = self._forward(inputs)
        if self.verify_pending:
            reason = self.verify(outputs, inputs)
            if reason is not None:
                raise Unsupported(reason)
            self.verify_pending = False
        if self.sharded:
            count, objectives = in_step(make_objectives, outputs, inputs)
        else:
            count, objectives = make_objectives(outputs, inputs)
        for objective in objectives:
            self.backward(objective if self.scale == 1.0 else objective * self.scale, retain_graph=True)
        return count if self.scale else 0

    def _run_loop(self, inputs, make_objectives) -> int:
        names = list(self.params)
        tensors = [self.params[n] for n in names]
        count = 0
        for n in range(batch_size_of(inputs)):
            sample = slice_batch(inputs, n, n + 1)
            outputs = self._forward(sample)
            self.rows = slice(n, n + 1)
            try:
                valid, objectives = make_objectives(outputs, sample)
            finally:
                self.rows = slice(None)
            count += valid
            for objective in objectives:
                grads = torch.autograd.grad(objective.sum(), tensors, retain_graph=True, allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is not None:
                        accumulate(self.sums[name], [grad.float()], self.transform)
        return count
