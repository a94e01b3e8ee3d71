"""Continue a finished sequence on a new domain from a continual-ready checkpoint (model + EWC state), without the
old domains' data.

    python examples/continue_sequence.py --from sequential_ewc --dataset openai/gsm8k --config main --column question
    python examples/continue_sequence.py --from sequential_ewc --tiny       # offline: the shipped man pages

--from is any directory holding a model and its EWC state: `EWCTrainer.save_model` output (what
`sequential_finetuning.py` writes), a Trainer checkpoint, or a finished `hf-ewc train` run (its `ewc_state/`).
"""

import argparse

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

from hf_ewc import EWCConfig, EWCState, EWCTrainer
from hf_ewc.pipeline import default_config_path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="model + EWC state to continue")
    parser.add_argument("--tiny", action="store_true", help="offline: a shipped corpus as the new domain")
    parser.add_argument("--dataset", default="openai/gsm8k", help="Hub dataset of the new domain")
    parser.add_argument("--config", default="main", help="its configuration name")
    parser.add_argument("--column", default="question", help="its text column")
    parser.add_argument("--name", default=None, help="the new domain's name (default: the dataset's)")
    parser.add_argument("--output_dir", default="continued_ewc")
    parser.add_argument("--max_samples", type=int, default=None, help="default: 2000, tiny: 96")
    args = parser.parse_args()

    if args.tiny:
        corpus = default_config_path().parent / "corpora" / "man_pages.jsonl.gz"
        data, column, name = load_dataset("json", data_files=str(corpus), split="train"), "text", "man_pages_2"
    else:
        data = load_dataset(args.dataset, args.config, split="train")
        column, name = args.column, args.name or args.dataset.rsplit("/", 1)[-1]
    data = data.shuffle(seed=0).select(range(min(args.max_samples or (96 if args.tiny else 2000), len(data))))

    tokenizer = AutoTokenizer.from_pretrained(args.source)
    model = AutoModelForCausalLM.from_pretrained(args.source)
    state = EWCState.load(args.source)  # the importances and anchors of every earlier domain
    print(f"continuing after {[d['name'] for d in state.domains]} with {name}")

    def tokenize(batch):
        return tokenizer(batch[column], truncation=True, max_length=64 if args.tiny else 512)

    tokenized = data.map(tokenize, batched=True, remove_columns=data.column_names)
    tokenized = tokenized.filter(lambda x: len(x["input_ids"]) > 1)
    config = EWCConfig(
        output_dir=args.output_dir, num_train_epochs=1, per_device_train_batch_size=8,
        learning_rate=3e-3 if args.tiny else 2e-5, ewc_lambda=0.03, importance_max_samples=64, save_strategy="no",
        report_to="none", logging_steps=10, seed=0,
    )  # fmt: skip
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = EWCTrainer(model=model, args=config, train_dataset=tokenized, processing_class=tokenizer,
                         data_collator=collator, ewc_state=state)  # fmt: skip
    trainer.train()
    state = trainer.consolidate(domain=name)
    trainer.save_model(args.output_dir)
    print(f"{args.output_dir}: the model and an EWC state over {[d['name'] for d in state.domains]}")


if __name__ == "__main__":
    main()
