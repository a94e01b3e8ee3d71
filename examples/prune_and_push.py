"""Prune a model by the importances its own sequence measured, export it in Hub format, reload it, and push it.

    python examples/prune_and_push.py --run sequential_ewc --sparsity 0.5 --push-to-hub you/model-pruned-50
    python examples/prune_and_push.py --run sequential_ewc --sparsity 0.5      # local export only (no --push-to-hub)

--run is a directory with a model and its EWC state (`sequential_finetuning.py`'s output, a checkpoint, or an
`hf-ewc train` run). OBD scores ½·Ω·θ² rank the weights; the export carries `sparsity_config` in config.json and a
pruning report, and is reloaded and compared (tensors, zero pattern, logits) before it gets its name.
"""

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_ewc import EWCState, export_pruned, prune_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="model + EWC state")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--criterion", default="obd", help="obd, fisher, mas, si, signal or magnitude")
    parser.add_argument("--out", default=None, help="default: RUN-pruned-<sparsity>")
    parser.add_argument("--push-to-hub", dest="repo", default=None, help="a Hub repository id, e.g. you/model-pruned")
    args = parser.parse_args()
    out = args.out or f"{args.run.rstrip('/')}-pruned-{args.sparsity:g}"

    model = AutoModelForCausalLM.from_pretrained(args.run)
    tokenizer = AutoTokenizer.from_pretrained(args.run)
    state = EWCState.load(args.run)
    report = prune_model(model, args.sparsity, criterion=args.criterion, importances=state, show_progress=False)
    print(report.summary())
    verification = export_pruned(model, out, report, tokenizer=tokenizer, push_to_hub=args.repo is not None,
                                 repo_id=args.repo)  # fmt: skip
    print(f"exported to {out}: reloaded, max logit difference {verification['max_logit_difference']:.1e}")
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # a standard Hub checkpoint: any transformers user loads it
    zeros = sum(int((p == 0).sum()) for p in reloaded.parameters())
    print(f"reloaded {type(reloaded).__name__} with {zeros:,} zeros; sparsity_config: "
          f"{reloaded.config.sparsity_config['sparsity_structure']}")  # fmt: skip
    if args.repo:
        print(f"pushed to https://huggingface.co/{args.repo}")


if __name__ == "__main__":
    main()
