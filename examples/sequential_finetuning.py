"""Teach a causal LM several domains in turn with EWC, from Python (no YAML), and measure what it forgets.

    python examples/sequential_finetuning.py                       # SmolLM2-135M on three Hub datasets
    python examples/sequential_finetuning.py --tiny                # offline: a tiny Llama from config, shipped text
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/sequential_finetuning.py --tiny

After each domain: `trainer.consolidate()` measures the importances, and the next trainer gets the returned state.
The final model and its EWC state (`ewc_state.safetensors`) land in --output_dir: a "continual-ready" checkpoint that
`continue_sequence.py` (or `hf-ewc train --from`) continues.
"""

import argparse
from pathlib import Path

from datasets import load_dataset
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
HUB_DOMAINS = {  # name → load_dataset arguments and the text column
    "wiki": ({"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "train"}, "text"),
    "python": ({"path": "bigcode/the-stack-smol", "data_dir": "data/python", "split": "train"}, "content"),
    "math": ({"path": "openai/gsm8k", "name": "main", "split": "train"}, "question"),
}
CORPORA = default_config_path().parent / "corpora"  # shipped with hf-ewc: Python docs, Python code, man pages
TINY_DOMAINS = {name: ({"path": "json", "data_files": str(CORPORA / f"{name}.jsonl.gz"), "split": "train"}, "text")
                for name in ("python_docs", "python_code", "man_pages")}  # fmt: skip


def tiny_model_and_tokenizer(texts):
    tokenizer = train_tokenizer("causal_lm", iter(texts), vocab_size=1024)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return LlamaForCausalLM(config), tokenizer


def load_domains(tiny: bool, max_samples: int) -> dict:
    """``{domain: Dataset with a "text" column}``: the Hub datasets, or (tiny) the text shipped with hf-ewc."""
    raw = {}
    for name, (source, column) in (TINY_DOMAINS if tiny else HUB_DOMAINS).items():
        data = load_dataset(**source).shuffle(seed=0)
        data = data.select(range(min(max_samples, len(data)))).select_columns([column])
        raw[name] = data.rename_column(column, "text") if column != "text" else data
    return raw


def tokenized_splits(raw: dict, tokenizer, max_length: int) -> dict:
    """``{domain: {"train", "test"}}``: tokenized, examples of one token dropped, 10 % held out."""

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    splits = {}
    for name, data in raw.items():
        tokenized = data.map(tokenize, batched=True, remove_columns=data.column_names)
        splits[name] = tokenized.filter(lambda x: len(x["input_ids"]) > 1).train_test_split(test_size=0.1, seed=0)
    return splits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="offline: a tiny model from config and shipped text")
    parser.add_argument("--output_dir", default="sequential_ewc")
    parser.add_argument("--ewc_lambda", type=float, default=0.03, help="λ on mean-normalized importances")
    parser.add_argument("--max_samples", type=int, default=None, help="per domain (default: 2000, tiny: 96)")
    parser.add_argument("--max_length", type=int, default=None, help="tokens per example (default: 512, tiny: 64)")
    args = parser.parse_args()
    max_samples = args.max_samples or (96 if args.tiny else 2000)
    max_length = args.max_length or (64 if args.tiny else 512)

    raw = load_domains(args.tiny, max_samples)
    if args.tiny:
        model, tokenizer = tiny_model_and_tokenizer(t for data in raw.values() for t in data["text"])
    else:
        tokenizer = AutoTokenizer.from_pretrained(HUB_MODEL)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(HUB_MODEL)

    splits = tokenized_splits(raw, tokenizer, max_length)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    state, trainer = None, None
    for i, name in enumerate(splits):
        config = EWCConfig(
            output_dir=str(Path(args.output_dir) / name), num_train_epochs=1, per_device_train_batch_size=8,
            learning_rate=3e-3 if args.tiny else 2e-5, ewc_lambda=args.ewc_lambda, importance_max_samples=64,
            save_strategy="no", report_to="none", logging_steps=10, seed=0,
        )  # fmt: skip
        trainer = EWCTrainer(model=model, args=config, train_dataset=splits[name]["train"], data_collator=collator,
                             processing_class=tokenizer, ewc_state=state)  # fmt: skip
        trainer.train()
        state = trainer.consolidate(domain=name)
        losses = {d: trainer.evaluate(splits[d]["test"])["eval_loss"] for d in list(splits)[: i + 1]}
        if trainer.is_world_process_zero():
            print(f"after {name}: eval loss " + ", ".join(f"{d} {v:.3f}" for d, v in losses.items()), flush=True)
    trainer.save_model(args.output_dir)  # weights, tokenizer and ewc_state.safetensors: continual-ready
    if trainer.is_world_process_zero():
        print(f"model and EWC state in {args.output_dir}")


if __name__ == "__main__":
    main()
