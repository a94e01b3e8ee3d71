"""Teach a causal LM several domains in turn with EWC under FSDP2: weights, importances and anchors all sharded.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/fsdp2_sequence.py --tiny  # 2 CPUs
    torchrun --nproc_per_node 8 examples/fsdp2_sequence.py          # 8 GPUs, SmolLM2-135M (not run here: no GPU)
    python examples/fsdp2_sequence.py --tiny                        # 1 process: nothing to shard

transformers shards the model as it loads it (`from_pretrained(...,
distributed_config=DistributedConfig(fsdp_size=N))`, every parameter a DTensor). After each domain
`trainer.consolidate()` collects the importances on the sharded model (per-sample squares before the reduce-scatter)
and each process keeps its slices of Ω and θ* (2·P/N numbers); the next trainer trains with the stabilized penalty
on those slices. `save_model` gathers the state into one ordinary `ewc_state.safetensors`, which any world size (one
process, DDP, FSDP2 on N processes) loads.
"""

import argparse
import os
from pathlib import Path

from accelerate import PartialState
from sequential_finetuning import (  # (this folder)
    HUB_MODEL,
    load_domains,
    tiny_model_and_tokenizer,
    tokenized_splits,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling
from transformers.distributed import DistributedConfig

from hf_ewc import EWCConfig, EWCTrainer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="offline: a tiny model from config and shipped text")
    parser.add_argument("--output_dir", default="fsdp2_ewc")
    parser.add_argument("--ewc_lambda", type=float, default=0.03, help="λ on mean-normalized importances")
    parser.add_argument("--max_samples", type=int, default=None, help="per domain (default: 2000, tiny: 64)")
    parser.add_argument("--max_length", type=int, default=None, help="tokens per example (default: 512, tiny: 64)")
    args = parser.parse_args()
    max_samples = args.max_samples or (64 if args.tiny else 2000)
    max_length = args.max_length or (64 if args.tiny else 512)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    state = PartialState(cpu=args.tiny)  # the process group (gloo on CPU)

    raw = load_domains(args.tiny, max_samples)
    source = HUB_MODEL
    if args.tiny:  # a tiny Llama from config, saved once so that every process loads it sharded
        source = str(Path(args.output_dir) / "start")
        if state.is_main_process:
            model, tokenizer = tiny_model_and_tokenizer(t for data in raw.values() for t in data["text"])
            model.save_pretrained(source)
            tokenizer.save_pretrained(source)
        state.wait_for_everyone()
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    sharding = {"distributed_config": DistributedConfig(fsdp_size=world)} if world > 1 else {}
    model = AutoModelForCausalLM.from_pretrained(source, **sharding)

    splits = tokenized_splits(raw, tokenizer, max_length)  # the domains and splits of sequential_finetuning.py
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    ewc_state, trainer = None, None
    for i, name in enumerate(splits):
        config = EWCConfig(
            output_dir=str(Path(args.output_dir) / name), num_train_epochs=1, per_device_train_batch_size=8,
            learning_rate=3e-3 if args.tiny else 2e-5, ewc_lambda=args.ewc_lambda, importance_max_samples=32,
            save_strategy="no", save_only_model=True, report_to="none", logging_steps=10, seed=0, use_cpu=args.tiny,
        )  # fmt: skip
        trainer = EWCTrainer(model=model, args=config, train_dataset=splits[name]["train"], data_collator=collator,
                             processing_class=tokenizer, ewc_state=ewc_state)  # fmt: skip
        trainer.train()
        ewc_state = trainer.consolidate(domain=name)  # on the sharded model: each process keeps its slices
        losses = {d: trainer.evaluate(splits[d]["test"])["eval_loss"] for d in list(splits)[: i + 1]}
        if trainer.is_world_process_zero():
            print(f"after {name}: eval loss " + ", ".join(f"{d} {v:.3f}" for d, v in losses.items()), flush=True)
    held = ewc_state.nbytes  # this process's slices
    trainer.save_model(args.output_dir)  # every process joins the gathers; rank 0 writes one ewc_state.safetensors
    if trainer.is_world_process_zero():
        print(f"EWC state held per process: {held:,} bytes ({'sharded' if ewc_state.is_sharded else 'whole'}, "
              f"{world} process(es)); model and EWC state in {args.output_dir}")  # fmt: skip


if __name__ == "__main__":
    main()
