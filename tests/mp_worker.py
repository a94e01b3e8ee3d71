"""What the multi-process tests run, once in the test process and once per rank under `accelerate launch`.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/mp_worker.py importances OUT
    … mp_worker.py train OUT PER_DEVICE_BATCH_SIZE
    … mp_worker.py cli LOG_PREFIX ROOT -- train run.yaml     (hf-ewc's CLI, every write under ROOT logged per rank)

Each rank writes ``OUT/rank<i>.safetensors`` (and ``.json``), so a test can compare the ranks with each other and
with a 1-process run of the same function.
"""

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file
from torch.utils.data import DataLoader


sys.path.insert(0, str(Path(__file__).resolve().parent))

from testing_utils import cls_samples, lm_samples, tiny_bert_classifier, tiny_gpt2, tiny_llama
from transformers import default_data_collator

from hf_ewc import EWCConfig, EWCTrainer, KeepSparsityCallback, collect_importance
from hf_ewc.importance import CollectionSpec, collect


# ------------------------------------------------------------------------------------------------------- importances
# 13 samples over 2 ranks: 7 + 6, batches of 4 → uneven shards and a short last batch on each rank.
IMPORTANCE_CASES = {
    "gpt2_fisher_empirical": (tiny_gpt2, lambda: lm_samples(13, pad_last=3), "fisher", {"estimator": "empirical"}),
    "gpt2_fisher_exact": (
        tiny_gpt2,
        lambda: lm_samples(13),
        "fisher",
        {"estimator": "exact", "options": {"max_backward_per_batch": 1200}},
    ),
    "gpt2_mas": (tiny_gpt2, lambda: lm_samples(13, pad_last=3), "mas", {}),
    # sample i's labels are drawn with (seed, i), whichever process collects it
    "gpt2_fisher_sampled": (tiny_gpt2, lambda: lm_samples(13, pad_last=3), "fisher", {"estimator": "sampled"}),
    "bert_cls_fisher_empirical": (tiny_bert_classifier, lambda: cls_samples(13), "fisher", {}),
    "bert_cls_signal": (tiny_bert_classifier, lambda: cls_samples(13), "signal", {}),
    # a DataLoader: whole batches go round-robin to the ranks, max_samples cuts the 4th batch short (11 = 3+3+3+2)
    "gpt2_loader_fisher": (
        tiny_gpt2,
        lambda: DataLoader(lm_samples(13), batch_size=3, collate_fn=default_data_collator),
        "fisher",
        {"max_samples": 11},
    ),
}


def collect_all() -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    tensors, counts = {}, {}
    for case, (factory, data, method, spec) in IMPORTANCE_CASES.items():  # spec: CollectionSpec fields
        torch.manual_seed(0)
        model = factory()
        result = collect(model, data(), CollectionSpec(method, batch_size=4, show_progress=False, **spec))
        counts[case] = result.num_samples
        tensors.update({f"{case}/{name}": value for name, value in result.importances.items()})
    return tensors, counts


# ------------------------------------------------------------------------------------------------------- training
def train_sequence(
    out: str, per_device_batch_size: int, penalty_in_loss: bool = False
) -> tuple[dict[str, torch.Tensor], dict]:
    """Three domains with SI importances: the stabilized penalty on the second, the proximal step on the third. The
    parameters after each domain, SI's importances, the logged penalties and losses. ``penalty_in_loss``: the
    penalty as an autograd loss term (the DeepSpeed path) instead of its gradient added to ``.grad``."""
    torch.manual_seed(0)
    model = tiny_llama()
    domains = {"a": lm_samples(32, seed=1, high=20), "b": lm_samples(32, seed=2, low=20), "c": lm_samples(32, seed=3)}
    modes = {"a": "stabilized", "b": "stabilized", "c": "proximal"}
    tensors: dict[str, torch.Tensor] = {}
    logs: dict[str, list] = {}
    state = None
    for name, data in domains.items():
        args = EWCConfig(
            output_dir=os.path.join(out, name), per_device_train_batch_size=per_device_batch_size,
            num_train_epochs=2, learning_rate=0.02, optim="adamw_torch", lr_scheduler_type="constant",
            max_grad_norm=0.5, weight_decay=0.0, report_to="none", save_strategy="no", disable_tqdm=True,
            logging_steps=1, seed=0, use_cpu=True, importance_method="si", ewc_lambda=3.0, ewc_mode=modes[name],
        )  # fmt: skip
        trainer = EWCTrainer(model=model, args=args, train_dataset=data, ewc_state=state)
        trainer._penalty_in_loss = penalty_in_loss
        trainer.train()
        state = trainer.consolidate(domain=name)
        model = trainer._plain_model()
        tensors.update({f"{name}/param/{n}": p.detach().clone() for n, p in model.named_parameters()})
        tensors.update({f"{name}/omega/{n}": t.clone() for n, t in state.importances.items()})
        logs[name] = [
            {k: v for k, v in log.items() if k in ("loss", "ewc/penalty", "grad_norm")}
            for log in trainer.state.log_history
            if "loss" in log
        ]
        logs[f"{name}/steps"] = trainer.state.global_step
    return tensors, logs


def train_si_family(out: str, per_device_batch_size: int) -> tuple[dict[str, torch.Tensor], dict]:
    """One domain each with SIU and SOS(α=1), whose independent minibatch gradient is normalised over the global token
    count and averaged across processes; uneven sequence lengths (padding) make the normalisation matter."""
    tensors: dict[str, torch.Tensor] = {}
    for method, extra in (("siu", {}), ("sos", {"sos_alpha": 1.0})):
        torch.manual_seed(0)
        model = tiny_llama()
        args = EWCConfig(
            output_dir=os.path.join(out, method), per_device_train_batch_size=per_device_batch_size,
            num_train_epochs=1, learning_rate=0.02, optim="adamw_torch", lr_scheduler_type="constant",
            max_grad_norm=0.0, weight_decay=0.0, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
            use_cpu=True, importance_method=method, **extra,
        )  # fmt: skip
        trainer = EWCTrainer(model=model, args=args, train_dataset=lm_samples(32, seed=1, pad_last=3))
        trainer.train()
        state = trainer.consolidate(domain=method)
        tensors.update({f"{method}/omega/{n}": t.clone() for n, t in state.importances.items()})
    return tensors, {}


# ------------------------------------------------------------------------------------------------------- writes
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def record_writes(root: str, log_path: str) -> None:
    """Log every file-system change under ``root`` this process makes (Python audit events), to ``log_path`` at
    exit. Rust writers (safetensors) are seen through the `os.replace`/`os.mkdir` around them."""
    import atexit

    root = os.path.realpath(root)
    events: list[tuple[str, str]] = []

    def under(path) -> str | None:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return None
        path = os.path.realpath(os.fsdecode(path))
        return path if path == root or path.startswith(root + os.sep) else None

    def hook(event: str, args: tuple) -> None:
        paths = []
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
            if writes:
                paths = [path]
        elif event in ("os.rename", "shutil.copyfile", "shutil.move", "torch.save", "safetensors.save_file"):
            paths = [args[1]]
        elif event in ("os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"):
            paths = [args[0]]
        for path in paths:
            hit = under(path)
            if hit is not None:
                events.append((event, os.path.relpath(hit, root)))

    def dump() -> None:
        with open(log_path, "w", encoding="utf-8") as f:
            json.dump(events, f)

    def traced(original, event):
        def wrapper(obj, path, *args, **kwargs):
            hook(event, (obj, path))
            return original(obj, path, *args, **kwargs)

        return wrapper

    # torch.save and safetensors write from C++/Rust, out of the audit hooks' sight: wrap them wherever imported.
    import safetensors.torch
    import transformers.modeling_utils
    import transformers.trainer  # noqa: F401

    import hf_ewc.cli  # noqa: F401

    for original, event in ((torch.save, "torch.save"), (safetensors.torch.save_file, "safetensors.save_file")):
        wrapper = traced(original, event)
        for module in list(sys.modules.values()):
            for attr, value in list(getattr(module, "__dict__", {}).items()):
                if value is original:
                    setattr(module, attr, wrapper)
    sys.addaudithook(hook)
    atexit.register(dump)


# ----------------------------------------------------------------------------------------------- FSDP2 collection
# 13 samples in batches of 3: 3 batches on rank 0 (7 samples), 2 on rank 1 (6) — rank 1 pads a pass to keep in step.
SHARDED_CASES = {  # case: (model, method, estimator, options)
    "fisher_empirical": ("llama", "fisher", "empirical", {}),
    "fisher_exact": ("llama", "fisher", "exact", {"max_backward_per_batch": 400}),
    "fisher_sampled": ("llama", "fisher", "sampled", {}),
    "fisher_batched": ("llama", "fisher", "batched", {}),
    "sqrt_fisher": ("llama", "sqrt_fisher", "empirical", {}),
    "af": ("llama", "af", "empirical", {"max_backward_per_batch": 400}),
    "mas": ("llama", "mas", "empirical", {}),
    "masx": ("llama", "masx", "empirical", {}),
    "signal": ("llama", "signal", "empirical", {}),
    "signal_activation": ("llama", "signal", "empirical", {"bias": "activation"}),
    "uniform": ("llama", "uniform", "empirical", {}),
    "gpt2_fisher_empirical": ("gpt2", "fisher", "empirical", {}),
    "gpt2_signal_output": ("gpt2", "signal", "empirical", {"bias": "output"}),
}
# which samples share a minibatch changes the batched Fisher: compared with DDP on the same processes
BY_PROCESS = ("fisher_batched",)


def model_on_processes(shard: bool, kind: str = "llama"):
    """A tiny Llama (RMSNorm through `vmap`) or GPT-2 (Conv1D, LayerNorm, tied embedding and head) whose sizes do
    not split evenly over 2 processes (vocabulary 41; Llama's FFN 33; GPT-2's width 15), whole or sharded with
    `fully_shard` (per decoder block, then the root)."""
    from torch.distributed.fsdp import fully_shard
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=41, hidden_size=16, intermediate_size=33, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        ))  # fmt: skip
        blocks = model.model.layers
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=41, n_embd=15, n_layer=2, n_head=3, n_positions=32,
                                           bos_token_id=0, eos_token_id=0))  # fmt: skip
        blocks = model.transformer.h
    if shard:
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
    return model


def collect_sharded(out: str, whole_state: str) -> tuple[dict[str, torch.Tensor], dict]:
    """On 2 processes: every case of SHARDED_CASES on the FSDP2-sharded Llama (``sharded/…``, gathered) and the
    BY_PROCESS ones on the whole model (``whole/…``, DDP's path); a state consolidated on the sharded model saved
    to OUT/state (streamed), and the 1-process state in ``whole_state`` loaded onto the sharded model (this process's
    slices), consolidated with a second domain and saved to OUT/state2. On 1 process: every case whole, the state of
    one domain saved to ``whole_state`` and of two to ``whole_state``/two."""
    from hf_ewc import EWCState
    from hf_ewc.distributed import whole_tensor

    shard = PartialState(cpu=True).num_processes > 1
    tensors, info = {}, {}
    runs = [(True, list(SHARDED_CASES)), (False, list(BY_PROCESS))] if shard else [(False, list(SHARDED_CASES))]
    for sharded, cases in runs:
        for case in cases:
            kind, method, estimator, options = SHARDED_CASES[case]
            model = model_on_processes(sharded, kind)
            spec = CollectionSpec(method, estimator, batch_size=3, show_progress=False, options=options)
            result = collect(model, lm_samples(13, pad_last=3), spec)
            prefix = f"{'sharded' if sharded else 'whole'}/{case}"
            tensors.update({f"{prefix}/{n}": whole_tensor(t) for n, t in result.importances.items()})
            info[prefix] = [result.num_samples, type(next(iter(result.importances.values()))).__name__]
    model = model_on_processes(shard)
    first = collect(model, lm_samples(13, pad_last=3), CollectionSpec("fisher", batch_size=3, show_progress=False))
    state = EWCState().consolidate(model, first.importances, domain="a")
    info["state_bytes"], info["state_sharded"] = state.nbytes, state.is_sharded
    state.save(os.path.join(out, "state") if shard else whole_state)
    loaded = EWCState.load(whole_state, model)
    info["loaded_bytes"], info["loaded_sharded"] = loaded.nbytes, loaded.is_sharded
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)  # "trained" on domain b
    second = collect(model, lm_samples(9, seed=3), CollectionSpec("mas", batch_size=4, show_progress=False))
    loaded.consolidate(model, second.importances, domain="b")
    loaded.save(os.path.join(out, "state2") if shard else os.path.join(whole_state, "two"))
    return tensors, info


def sharded_refusals() -> dict[str, str]:
    """FSDP2 (`fully_shard`, DTensor parameters) on the gloo group: what is refused, and what each refusal says."""
    from hf_ewc import EWCState, HfEwcError
    from hf_ewc.distributed import raise_together, trainable_parameters
    from hf_ewc.importance import SIAccumulator

    PartialState(cpu=True)  # the process group
    model = model_on_processes(True)

    def fails_on_rank_0():
        if PartialState().process_index == 0:
            raise HfEwcError("a NaN in rank 0's slice")

    def with_plain_parameter():
        model.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))  # every process holds it whole
        return EWCState().consolidate(model, {})

    attempts = {
        "whole_parameters": lambda: trainable_parameters(model),  # what the code that needs whole ones asks for
        "loop": lambda: collect_importance(model, lm_samples(4), per_sample="loop", show_progress=False),
        "siu": lambda: SIAccumulator(trainable_parameters(model, sharded=True), method="siu"),
        "together": lambda: raise_together(fails_on_rank_0),  # rank 1 must not go on alone
        "plain": with_plain_parameter,
    }
    out = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = "no error"
        except HfEwcError as err:
            out[name] = str(err)
    return out


def train_sharded(out: str, start: str, state_dir: str, batch: str, mode: str, steps: int, route: str = "load"):
    """`EWCTrainer` from the model saved in ``start`` with the EWC state in ``state_dir``: on 2 processes the model
    is sharded at load time by transformers (FSDP2, `DistributedConfig(fsdp_size=2)`: DTensor parameters), on 1 it is
    loaded whole. ``batch``: the batch per device, or ``"BxG"`` with G accumulation steps; ``mode``: the ewc_mode, or
    ``"MODE+METHOD"`` with an importance method (default fisher). The whole parameters after ``steps`` steps
    (gathered), the logged penalties, each process's penalty tensors (bytes of anchors and coefficients or weights it
    holds); then `trainer.consolidate()` (the method's importances, on the sharded model) and `save_model` into
    OUT/final (the state gathered into one file) — the state's tensors (gathered) and bytes per process."""
    from transformers import AutoModelForCausalLM

    from hf_ewc.distributed import whole_tensor

    sharded = int(os.environ.get("WORLD_SIZE", "1")) > 1
    extra = {}
    if sharded and route == "accelerate":  # accelerate's FSDP2 plugin (what `accelerate launch --use_fsdp` sets up)
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        # accelerate enables FSDP for GPU setups only: on CPU the shared state is told so by hand (test only)
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        Accelerator(cpu=True, fsdp_plugin=plugin)
        for shared in (PartialState._shared_state, AcceleratorState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
        extra["accelerator_config"] = {"use_configured_state": True}
        model = AutoModelForCausalLM.from_pretrained(start)
    elif sharded:
        from transformers.distributed import DistributedConfig

        model = AutoModelForCausalLM.from_pretrained(start, distributed_config=DistributedConfig(fsdp_size=2))
        if route == "mixed":  # a plain trainable parameter next to the sharded ones: every process holds it whole
            model.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    else:
        model = AutoModelForCausalLM.from_pretrained(start)
    mode, method, *more = f"{mode}+".split("+")
    callbacks = []
    if "sparse" in more:  # a pruned model: every third weight of the decoder's Linear layers held at zero
        masks = {n: torch.arange(p.numel()).reshape(p.shape) % 3 != 0 for n, p in model.named_parameters()
                 if ".layers." in n and n.endswith("proj.weight")}  # fmt: skip
        callbacks.append(KeepSparsityCallback(masks))
    per_device, _, accumulation = str(batch).partition("x")
    accumulation = int(accumulation or 1)
    args = EWCConfig(
        output_dir=out, per_device_train_batch_size=int(per_device), gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
        max_grad_norm=0.05 if "clip" in more else 0.0,
        weight_decay=0.0, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
        use_cpu=True, ewc_mode=mode, ewc_lambda=20.0, importance_normalization="none",
        importance_method=method or "fisher", importance_batch_size=3, **extra,
    )  # fmt: skip
    trainer = EWCTrainer(
        model=model, args=args, train_dataset=lm_samples(16, seed=4), ewc_state=state_dir, callbacks=callbacks
    )
    trainer.train()
    penalty = trainer._penalty
    held = [*penalty.anchors, *(penalty.two_coefficients or penalty.proximal_weights)] if penalty else []
    tensors = {}
    for name, p in trainer._plain_model().named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        tensors[f"param/{name}"] = full.detach().clone()
    logs = [log.get("ewc/penalty") for log in trainer.state.log_history if "loss" in log]
    state = trainer.consolidate(domain="b")
    trainer.save_model(os.path.join(out, "final"))
    for name in state.importances:
        tensors[f"importance/{name}"] = whole_tensor(state.importances[name]).clone()
        tensors[f"anchor/{name}"] = whole_tensor(state.anchors[name]).clone()
    return tensors, {
        "penalties": logs,
        "grad_norms": [float(log["grad_norm"]) for log in trainer.state.log_history if "grad_norm" in log],
        "state_bytes": state.nbytes,
        "num_samples": state.domains[-1]["num_samples"],
        "bytes": sum(t.numel() * t.element_size() for t in held),
        "sharded": type(next(iter(trainer._plain_model().parameters()))).__name__,
        "fsdp_enabled": trainer.is_fsdp_enabled,
    }


def _sft_data():
    import random

    import datasets
    from testing_utils import WORDS

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS["animals"]) for _ in range(rng.randint(6, 12))) for _ in range(16)]
    return datasets.Dataset.from_dict({"text": texts}), texts


def _sft_args(out: str, per_device_batch_size: int, **kwargs):
    import trl

    from hf_ewc import ewc_config_class

    return ewc_config_class(trl.SFTConfig)(
        output_dir=out, per_device_train_batch_size=per_device_batch_size, max_steps=2, learning_rate=0.05,
        optim="sgd", weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", report_to="none",
        use_cpu=True, save_strategy="no", max_length=16, disable_tqdm=True, seed=0, logging_steps=1, **kwargs,
    )  # fmt: skip


def prepare_sft(root: str) -> None:
    """One process: a tiny Llama trained with TRL's SFTTrainer on the animal texts, its consolidated Fisher state,
    then moved off its anchors; model, tokenizer and state saved in ``root``."""
    import trl
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_ewc import with_ewc
    from hf_ewc.pipeline import train_tokenizer

    dataset, texts = _sft_data()
    tokenizer = train_tokenizer("causal_lm", iter(texts), 96)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    trainer = with_ewc(trl.SFTTrainer)(model=model, args=_sft_args(os.path.join(root, "first"), 4),
                                       train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    state = trainer.consolidate(domain="animals")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root), tokenizer.save_pretrained(root), state.save(root)


def train_sft(out: str, root: str, per_device_batch_size: int) -> tuple[dict[str, torch.Tensor], dict]:
    """TRL's SFTTrainer with EWC (`with_ewc`) from ``root`` (see `prepare_sft`): 2 steps with the penalty."""
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ewc import with_ewc

    dataset, _ = _sft_data()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(root), AutoTokenizer.from_pretrained(root)
    trainer = with_ewc(trl.SFTTrainer)(model=model, args=_sft_args(out, per_device_batch_size, ewc_lambda=5.0),
                                       train_dataset=dataset, processing_class=tokenizer, ewc_state=root)  # fmt: skip
    trainer.train()
    tensors = {n: p.detach().clone() for n, p in trainer._plain_model().named_parameters()}
    return tensors, {"penalties": [log["ewc/penalty"] for log in trainer.state.log_history if "ewc/penalty" in log]}


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command == "cli":
        log_prefix, root, _, *cli_argv = rest
        rank = int(os.environ.get("RANK", "0"))
        record_writes(root, f"{log_prefix}.{rank}.json")
        from hf_ewc.cli import main as cli_main

        return cli_main(cli_argv)
    out = rest[0]
    if command == "importances":
        tensors, info = collect_all()
    elif command == "sharded_collect":
        tensors, info = collect_sharded(out, rest[1])
    elif command == "fsdp":
        tensors, info = {"none": torch.zeros(1)}, sharded_refusals()
    elif command == "train":
        tensors, info = train_sequence(out, int(rest[1]))
    elif command == "sharded":
        tensors, info = train_sharded(out, rest[1], rest[2], rest[3], rest[4], int(rest[5]), *rest[6:])
    elif command == "sft":
        tensors, info = train_sft(out, rest[1], int(rest[2]))
    elif command == "si_family":
        tensors, info = train_si_family(out, int(rest[1]))
    else:
        raise SystemExit(f"unknown command {command!r}")
    state = PartialState()
    info = {"world": state.num_processes, "rank": state.process_index, **info}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(out, f"rank{state.process_index}.safetensors"))
    with open(os.path.join(out, f"rank{state.process_index}.json"), "w", encoding="utf-8") as f:
        json.dump(info, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
