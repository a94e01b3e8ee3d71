"""LoRA over a sequence of domains with EWC: the base model stays frozen, the adapter learns each domain in turn, and
EWC protects the adapter weights the earlier domains needed.

    python examples/lora_sequence.py                # SmolLM2-135M with a rank-16 adapter on two Hub datasets
    python examples/lora_sequence.py --tiny         # offline: a tiny Llama from config, shipped text

The EWC state covers the adapter's parameters only (the trainable ones); `save_model` writes the adapter and
`ewc_state.safetensors` side by side.
"""

import argparse

from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_ewc import EWCConfig, EWCTrainer
from hf_ewc.pipeline import default_config_path, train_tokenizer


HUB_MODEL = "HuggingFaceTB/SmolLM2-135M"
HUB_DOMAINS = {
    "wiki": ({"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "train"}, "text"),
    "math": ({"path": "openai/gsm8k", "name": "main", "split": "train"}, "question"),
}
CORPORA = default_config_path().parent / "corpora"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="offline: a tiny model from config and shipped text")
    parser.add_argument("--output_dir", default="lora_ewc")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--ewc_lambda", type=float, default=0.03)
    parser.add_argument("--max_samples", type=int, default=None, help="per domain (default: 2000, tiny: 96)")
    args = parser.parse_args()
    max_samples = args.max_samples or (96 if args.tiny else 2000)

    if args.tiny:
        sources = {n: ({"path": "json", "data_files": str(CORPORA / f"{n}.jsonl.gz"), "split": "train"}, "text")
                   for n in ("python_docs", "man_pages")}  # fmt: skip
    else:
        sources = HUB_DOMAINS
    raw = {}
    for name, (source, column) in sources.items():
        data = load_dataset(**source).shuffle(seed=0)
        data = data.select(range(min(max_samples, len(data)))).select_columns([column])
        raw[name] = data.rename_column(column, "text") if column != "text" else data
    if args.tiny:
        tokenizer = train_tokenizer("causal_lm", (t for d in raw.values() for t in d["text"]), vocab_size=1024)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        base = LlamaForCausalLM(config)
    else:
        tokenizer = AutoTokenizer.from_pretrained(HUB_MODEL)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(HUB_MODEL)
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.print_trainable_parameters()

    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    state = None
    for name, data in raw.items():
        tokenized = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64 if args.tiny else 512),
                             batched=True, remove_columns=data.column_names)  # fmt: skip
        config = EWCConfig(
            output_dir=f"{args.output_dir}/{name}", num_train_epochs=1, per_device_train_batch_size=8,
            learning_rate=1e-2 if args.tiny else 2e-4, ewc_lambda=args.ewc_lambda, importance_max_samples=64,
            save_strategy="no", report_to="none", logging_steps=10, seed=0,
        )  # fmt: skip
        trainer = EWCTrainer(model=model, args=config, train_dataset=tokenized, data_collator=collator,
                             processing_class=tokenizer, ewc_state=state)  # fmt: skip
        trainer.train()
        state = trainer.consolidate(domain=name)
        print(f"after {name}: EWC state over {len(state.importances)} adapter tensors, domains "
              f"{[d['name'] for d in state.domains]}", flush=True)  # fmt: skip
    trainer.save_model(args.output_dir)  # the adapter and ewc_state.safetensors
    print(f"adapter and EWC state in {args.output_dir}")


if __name__ == "__main__":
    main()
