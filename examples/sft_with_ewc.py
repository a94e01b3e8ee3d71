"""TRL's SFTTrainer with EWC: supervised fine-tuning on one domain after another without forgetting the first.

    pip install "hf-ewc[trl]"
    python examples/sft_with_ewc.py                 # SmolLM2-135M-Instruct: conversations, then summaries
    python examples/sft_with_ewc.py --tiny          # offline: a tiny Llama from config, shipped text

`with_ewc(SFTTrainer)` is SFTTrainer with everything EWCTrainer does (penalty, consolidate, EWC state in every
checkpoint); `ewc_config_class(SFTConfig)` is SFTConfig with the EWC fields.
"""

import argparse

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from hf_ewc import ewc_config_class, with_ewc
from hf_ewc.pipeline import default_config_path, train_tokenizer


HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_DOMAINS = {  # TRL's own datasets: conversations ("messages"), then prompt/completion summaries
    "chat": {"path": "trl-lib/Capybara", "split": "train"},
    "summaries": {"path": "trl-lib/tldr", "split": "train"},
}
CORPORA = default_config_path().parent / "corpora"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="offline: a tiny model from config and shipped text")
    parser.add_argument("--output_dir", default="sft_ewc")
    parser.add_argument("--ewc_lambda", type=float, default=0.03)
    parser.add_argument("--max_samples", type=int, default=None, help="per domain (default: 1000, tiny: 64)")
    args = parser.parse_args()
    max_samples = args.max_samples or (64 if args.tiny else 1000)

    if args.tiny:
        sources = {n: {"path": "json", "data_files": str(CORPORA / f"{n}.jsonl.gz"), "split": "train"}
                   for n in ("python_docs", "python_code")}  # fmt: skip
    else:
        sources = HUB_DOMAINS
    domains = {n: load_dataset(**s).shuffle(seed=0) for n, s in sources.items()}
    domains = {n: d.select(range(min(max_samples, len(d)))) for n, d in domains.items()}
    if args.tiny:
        tokenizer = train_tokenizer("causal_lm", (t for d in domains.values() for t in d["text"]), vocab_size=1024)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        tokenizer = AutoTokenizer.from_pretrained(HUB_MODEL)
        model = AutoModelForCausalLM.from_pretrained(HUB_MODEL)

    EWCSFTTrainer, EWCSFTConfig = with_ewc(SFTTrainer), ewc_config_class(SFTConfig)
    state = None
    for name, data in domains.items():
        config = EWCSFTConfig(
            output_dir=f"{args.output_dir}/{name}", num_train_epochs=1, per_device_train_batch_size=8,
            learning_rate=3e-3 if args.tiny else 2e-5, max_length=64 if args.tiny else 1024,
            ewc_lambda=args.ewc_lambda, importance_max_samples=64, save_strategy="no", report_to="none",
            logging_steps=10, seed=0,
        )  # fmt: skip
        trainer = EWCSFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                ewc_state=state)  # fmt: skip
        trainer.train()
        state = trainer.consolidate(domain=name)  # on SFT's own processed dataset and collator
        print(f"after {name}: EWC state over {[d['name'] for d in state.domains]}", flush=True)
    trainer.save_model(args.output_dir)
    print(f"model and EWC state in {args.output_dir}")


if __name__ == "__main__":
    main()
