"""The ``hf-ewc`` command line.

    hf-ewc train                    # the embedded default: a tiny Llama over prose → code → man pages
    hf-ewc train CONFIG.yaml --ewc_lambda 0.1 --domains.1.max_samples 200    # a config, with overrides
    hf-ewc train CONFIG.yaml --resume         # continue an interrupted run (finished domains are kept)
    hf-ewc train NEXT.yaml --from RUN_DIR     # new domains on top of a finished run's model and EWC state
    hf-ewc train --fields                     # every key a config may set
    hf-ewc sweep [CONFIG] --lambdas 0.003,0.01,0.03 --methods fisher,mas   # forgetting removed vs gain kept; best.yaml
    hf-ewc env                      # versions of hf_ewc and its stack, the device and the accelerate setup
    hf-ewc state DIR                # what a saved EWC state holds (domains, methods, sizes, importance statistics)
    hf-ewc prune RUN_DIR --sparsity 0.5 --criterion obd --out pruned   # prune by the run's own Fisher; export
    hf-ewc prune MODEL_DIR --structure 2:4 --data text.jsonl --out pruned-24   # magnitude 2:4, eval before/after
    hf-ewc correlate RUN_DIR --data text.jsonl --methods fisher,mas,signal,magnitude --out corr   # agreement report
    python -m hf_ewc env            # the same through the module

Errors in the input print one line on stderr and exit with code 2.
"""

import argparse
import json
import platform
import shlex
import sys

import datasets
import torch
import transformers
from accelerate import PartialState

from ._version import __version__
from .config import FISHER_ESTIMATORS
from .pipeline import Pipeline, export_clnp_domain, load_run_config, prune_pretrained
from .pipeline.config_io import describe_type
from .pipeline.correlate import CORRELATE_METHODS, correlate_pretrained
from .pipeline.general_eval import GeneralEvalSpec
from .pipeline.run_config import PIPELINE_KEYS, DomainSpec, ModelSpec, PeftSpec, PruneSpec, training_fields
from .pipeline.sweep import MethodSpec, Sweep, parse_lambdas
from .pruning import CRITERIA, SCOPES, STRUCTURE_CHOICES
from .state import EWCState
from .utils import HfEwcError, ctrl_c_outside_finalizers, error_line, hold_output, versions


DEFAULT_LAMBDAS = "0.003,0.01,0.03,0.1"


def _env(args: argparse.Namespace) -> int:
    info = dict(versions())
    info["python"] = platform.python_version()
    info["platform"] = platform.platform()
    info["torch_threads"] = str(torch.get_num_threads())
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    state = PartialState()
    info["accelerate"] = f"{state.distributed_type.value}, {state.num_processes} process(es), device {state.device}"
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _state(args: argparse.Namespace) -> int:
    state = EWCState.load(args.directory)  # a run's ewc_state/, a checkpoint or an EWCState.save() directory
    summary = {
        "domains": [d.get("name") for d in state.domains],
        "methods": [
            f"{d.get('method')}" + (f"/{d['estimator']}" if d.get("estimator") else "") for d in state.domains
        ],
        "consolidation": state.consolidation,
        "importance_normalization": state.normalization,
        "decay": state.decay,
        "dtype": str(state.dtype).replace("torch.", ""),
        "tensors": len(state.importances),
        "parameters": state.num_parameters,
        "bytes": state.nbytes,
        **state.summary(),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.fields:
        print("top level: " + ", ".join(PIPELINE_KEYS))
        print("model: " + ", ".join(ModelSpec.__dataclass_fields__))
        print("prune (optional): " + ", ".join(PruneSpec.__dataclass_fields__))
        print("peft (optional, LoRA): " + ", ".join(PeftSpec.__dataclass_fields__))
        print("general_eval (optional, lm-evaluation-harness): " + ", ".join(GeneralEvalSpec.__dataclass_fields__))
        print("domains[i]: " + ", ".join(DomainSpec.__dataclass_fields__))
        print("EWCConfig / TrainingArguments fields (top level, or per domain under `training:`):")
        for name, tp in sorted(training_fields().items()):
            print(f"  {name}: {describe_type(tp)}")
        return 0
    run = load_run_config(args.config, args.overrides)
    # The Trainer's own progress bar stays (disable_tqdm); the per-file bars of datasets and of model saving go.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()

    pipeline = Pipeline(run, resume=args.resume, overwrite=args.overwrite, from_dir=args.from_dir)
    try:
        with ctrl_c_outside_finalizers():  # a Ctrl-C landing in a finalizer is not lost
            pipeline.run_sequence()
    except KeyboardInterrupt:  # every write is atomic, so wherever Ctrl-C lands the run directory is resumable
        print(f"\nhf-ewc train: interrupted; {_how_to_continue(args, pipeline)}", file=sys.stderr)
        return 130
    return 0


def _how_to_continue(args: argparse.Namespace, pipeline: Pipeline | None) -> str:
    """The command that continues an interrupted `train`: `--resume` where output_dir holds this config's run (it
    stopped after writing its config), else the same command again (it stopped before writing anything)."""
    command = ["hf-ewc", "train", *([args.config] if args.config else []), *args.overrides]
    command += ["--from", args.from_dir] if args.from_dir else []
    if pipeline is not None and pipeline.can_resume():
        return (f"{pipeline.out} keeps the finished domains and the last checkpoint. Continue with: "
                f"{shlex.join([*command, '--resume'])}")  # fmt: skip
    again = [*command, *(["--overwrite"] if args.overwrite else [])]
    return f"the run had not started (nothing of it was written). Start again with: {shlex.join(again)}"


def _sweep(args: argparse.Namespace) -> int:
    run = load_run_config(args.config, args.overrides)
    lambdas = parse_lambdas(args.lambdas)
    if args.methods:
        methods = [MethodSpec.parse(m) for m in args.methods.split(",") if m.strip()]
    else:  # the config's own method, estimator and mode
        training = run.training_args(0, run.output_dir)
        estimator = training.fisher_estimator if training.importance_method == "fisher" else None
        methods = [MethodSpec(training.importance_method, estimator, training.ewc_mode)]
    if not methods:
        raise HfEwcError("--methods is empty; give importance methods like fisher,mas (or leave it out).")
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    sweep = Sweep(
        run.raw, source=run.source, lambdas=lambdas, methods=methods, min_gain_kept=args.min_gain_kept,
        resume=args.resume, overwrite=args.overwrite, keep_models=args.keep_models, objective=args.objective,
    )  # fmt: skip
    sweep.run()
    return 0


def _prune(args: argparse.Namespace) -> int:
    transformers.utils.logging.disable_progress_bar()  # loading/saving bars; the scoring bar stays
    with hold_output(args.out):  # a second `hf-ewc prune --out` to the same place is refused at once
        _run_prune(args)
    return 0


def _correlate(args: argparse.Namespace) -> int:
    transformers.utils.logging.disable_progress_bar()
    with hold_output(args.out):
        correlate_pretrained(
            args.model, args.out, methods=args.methods, data_files=args.data, fisher_estimator=args.fisher_estimator,
            text_column=args.text_column, label_column=args.label_column, max_samples=args.max_samples,
            max_length=args.max_length, batch_size=args.batch_size, overwrite=args.overwrite, revision=args.revision,
            trust_remote_code=args.trust_remote_code, seed=args.seed,
        )  # fmt: skip
    return 0


def _run_prune(args: argparse.Namespace) -> None:
    if args.clnp_domain is not None:
        chosen = {
            "--sparsity": args.sparsity is not None, "--criterion": args.criterion != "magnitude",
            "--importances": args.importances is not None, "--data": args.data is not None,
            "--scope": args.scope is not None, "--structure": args.structure != "unstructured",
            "--include": args.include is not None, "--exclude": args.exclude is not None,
            "--revision": args.revision is not None, "--trust-remote-code": args.trust_remote_code,
            "--text-column": args.text_column != "text", "--label-column": args.label_column != "label",
            "--max-samples": args.max_samples != 256, "--max-length": args.max_length is not None,
            "--batch-size": args.batch_size != 8, "--seed": args.seed != 0,
        }  # fmt: skip
        given = [flag for flag, on in chosen.items() if on]
        if given:
            raise HfEwcError(
                f"--clnp-domain takes the units its domain uses from the run's allocation; drop {', '.join(given)}."
            )
        export_clnp_domain(args.model, args.clnp_domain, args.out, overwrite=args.overwrite,
                           push_to_hub=args.push_to_hub)  # fmt: skip
        return
    prune_pretrained(
        args.model,
        args.out,
        sparsity=args.sparsity,
        criterion=args.criterion,
        importances=args.importances,
        data_files=args.data,
        text_column=args.text_column,
        label_column=args.label_column,
        max_samples=args.max_samples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        scope=args.scope,
        structure=args.structure,
        include=args.include,
        exclude=args.exclude,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        seed=args.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-ewc",
        description="Stabilized Elastic Weight Consolidation for Hugging Face transformers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--version", action="version", version=f"hf-ewc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="Adapt a model to a sequence of domains (no CONFIG: the embedded default demo).",
        description="Train on each domain of CONFIG in turn, evaluate on every domain, consolidate, save. Any "
        "config key can be overridden: --KEY VALUE or --KEY=VALUE, dotted for nested keys "
        "(--domains.1.max_samples 200, --model.config.hidden_size 64); values are parsed as YAML.",
        allow_abbrev=False,
    )
    train.add_argument("config", nargs="?", help="YAML run config (default: the embedded demo).")
    train.add_argument("--resume", action="store_true", help="Continue the run in output_dir (same config).")
    train.add_argument("--overwrite", action="store_true", help="Replace a run already in output_dir.")
    train.add_argument(
        "--from", dest="from_dir", metavar="DIR", help="Start from a finished run's model and EWC state."
    )
    train.add_argument("--fields", action="store_true", help="List every key a config may set, then exit.")
    train.set_defaults(func=_train)
    sweep = sub.add_parser(
        "sweep",
        help="Run naive fine-tuning and each (method, λ) over CONFIG's sequence; choose λ (writes best.yaml).",
        description="Train CONFIG's sequence with naive fine-tuning and with every (method, λ), sharing the first "
        "domain's training; measure the share of naive's forgetting each removes and of its gain each keeps; "
        "choose the λ that removes the most while keeping --min-gain-kept. Writes sweep.json, sweep.md, frontier.png "
        "and best.yaml into the config's output_dir. Config keys can be overridden as for train.",
        allow_abbrev=False,
    )
    sweep.add_argument("config", nargs="?", help="YAML run config (default: the embedded demo).")
    sweep.add_argument(
        "--lambdas", default=DEFAULT_LAMBDAS, help=f"Comma-separated λ values (default {DEFAULT_LAMBDAS})."
    )
    sweep.add_argument("--methods", help="Comma-separated [mode:]method[/estimator] (default: the config's own).")
    sweep.add_argument("--min-gain-kept", type=float, default=0.9, help="Share of naive's gain to keep (default 0.9).")
    sweep.add_argument("--resume", action="store_true", help="Reuse the finished runs of the sweep in output_dir.")
    sweep.add_argument("--overwrite", action="store_true", help="Replace a sweep already in output_dir.")
    sweep.add_argument("--keep-models", action="store_true", help="Keep every run's weights (default: results only).")
    sweep.add_argument(
        "--objective", default="domains",
        help="Whose forgetting to minimise: domains (default: the sequence's own), general (the first general_eval "
        "score) or TASK/METRIC (a general_eval score, e.g. hf_ewc_prose_cloze/acc).",
    )  # fmt: skip
    sweep.set_defaults(func=_sweep)
    env = sub.add_parser("env", help="Print versions, device and accelerate setup (paste it into bug reports).")
    env.set_defaults(func=_env)
    state = sub.add_parser("state", help="Summarise a saved EWC state (a directory with ewc_state.safetensors).")
    state.add_argument(
        "directory", help="Directory written by EWCState.save, a checkpoint, a saved model or an hf-ewc train run."
    )
    state.set_defaults(func=_state)
    _add_prune_parser(sub)
    _add_correlate_parser(sub)
    return parser


def _add_correlate_parser(sub) -> None:
    corr = sub.add_parser(
        "correlate",
        help="How far importance methods agree on a model: per-layer and global Pearson / Spearman.",
        description="Measure --methods on MODEL (a save_pretrained directory, an hf-ewc train run, or a Hub id) on "
        "the same samples of --data and write correlations.json, correlations.md and a heatmap per granularity to "
        "--out. magnitude is |θ|; the SI family (si, siu, sib, sos, onaf) is read from the run's EWC state, or "
        "skipped with the reason.",
        allow_abbrev=False,
    )
    corr.add_argument("model", metavar="MODEL_OR_RUN", help="Model directory, hf-ewc train run, or Hub id.")
    corr.add_argument(
        "--methods", required=True, help=f"Comma-separated, at least two of: {','.join(CORRELATE_METHODS)}."
    )
    corr.add_argument("--data", nargs="+", metavar="FILE", help="Text/JSON/CSV/Parquet files to measure on.")
    corr.add_argument("--out", required=True, metavar="DIR", help="Output directory (must not exist).")
    corr.add_argument("--fisher-estimator", choices=FISHER_ESTIMATORS, help="default: exact for "
                      "classifiers, sampled for language models).")  # fmt: skip
    corr.add_argument("--text-column", default="text", help="Text column of --data (default: text).")
    corr.add_argument("--label-column", default="label", help="Label column of --data for classifiers.")
    corr.add_argument("--max-samples", type=int, default=256, help="Samples of --data (default 256).")
    corr.add_argument("--max-length", type=int, help="Tokens per example (default: min(128, positions)).")
    corr.add_argument("--batch-size", type=int, default=8, help="Batch size of collection (default 8).")
    corr.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    corr.add_argument("--revision", help="Model revision on the Hub.")
    corr.add_argument("--trust-remote-code", action="store_true", help="Allow the model's custom code (Hub).")
    corr.add_argument("--seed", type=int, default=0, help="Seed of the data split, the collection and the subsample.")
    corr.set_defaults(func=_correlate)


def _add_prune_parser(sub) -> None:
    prune = sub.add_parser(
        "prune",
        help="Prune a saved model by magnitude or by its importances; export it in Hub format, verified by reloading.",
        description="Prune MODEL (a save_pretrained directory, an hf-ewc train run, or a Hub id), write the pruned "
        "model (safetensors, sparsity_config in config.json, pruning_report.json, model card) to --out, reload it and "
        "check tensors, zero pattern and logits. Criteria other than magnitude use importances: --importances DIR, "
        "else MODEL's own EWC state (an hf-ewc train run has one), else collected on --data.",
        allow_abbrev=False,
    )
    prune.add_argument("model", metavar="MODEL", help="Model directory (save_pretrained / hf-ewc train) or Hub id.")
    prune.add_argument("--out", required=True, metavar="DIR", help="Output directory (must not exist).")
    prune.add_argument("--sparsity", type=float, help="Share to remove, in [0, 1) (implied by N:M structures).")
    prune.add_argument("--criterion", default="magnitude", help=f"One of: {', '.join(CRITERIA)}.")
    prune.add_argument(
        "--importances", metavar="DIR", help="EWC state directory (run dir, checkpoint, EWCState.save)."
    )
    prune.add_argument("--data", nargs="+", metavar="FILE", help="Text/JSON/CSV/Parquet files: eval before/after, "
                       "and importances when none are saved.")  # fmt: skip
    prune.add_argument("--text-column", default="text", help="Text column of --data (default: text).")
    prune.add_argument("--label-column", default="label", help="Label column of --data for classifiers.")
    prune.add_argument("--max-samples", type=int, default=256, help="Samples of --data to collect on (default 256).")
    prune.add_argument("--max-length", type=int, help="Tokens per example of --data (default: min(128, positions)).")
    prune.add_argument("--batch-size", type=int, default=8, help="Batch size for collection and evaluation.")
    prune.add_argument("--scope", help=f"{' or '.join(SCOPES)} (default: global for unstructured, else per_layer).")
    prune.add_argument("--structure", default="unstructured", help=f"One of: {STRUCTURE_CHOICES}.")
    prune.add_argument("--include", nargs="+", metavar="REGEX", help="Prune the parameters whose names match.")
    prune.add_argument("--exclude", nargs="+", metavar="REGEX", help="Leave the parameters whose names match.")
    prune.add_argument("--clnp-domain", metavar="NAME", help="Of an ewc_mode: clnp run: export domain NAME alone (the "
                       "units of later domains removed), logits checked against the run's.")  # fmt: skip
    prune.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    prune.add_argument("--push-to-hub", metavar="REPO", help="Upload the verified folder to this Hub repository.")
    prune.add_argument("--revision", help="Model revision on the Hub.")
    prune.add_argument("--trust-remote-code", action="store_true", help="Allow the model's custom code (Hub).")
    prune.add_argument("--seed", type=int, default=0, help="Seed for data splits and collection.")
    prune.set_defaults(func=_prune)


OWN_FLAGS = {  # a command's own flags (and whether they take a value); every other --key is a config override
    "train": {"--resume": False, "--overwrite": False, "--fields": False, "--from": True},
    "sweep": {"--resume": False, "--overwrite": False, "--keep-models": False, "--lambdas": True, "--methods": True,
              "--min-gain-kept": True, "--objective": True},
}  # fmt: skip


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate a command's own flags and CONFIG from `--key value` overrides (argparse cannot tell them apart:
    in `--disable_tqdm true` it would take `true` for CONFIG)."""
    own_flags = {**OWN_FLAGS[argv[0]], "-h": False, "--help": False}
    own, overrides = argv[:1], []
    i = 1
    while i < len(argv):
        token = argv[i]
        flag = token.partition("=")[0]
        if flag in own_flags:
            own.append(token)
            if own_flags[flag] and "=" not in token and i + 1 < len(argv):
                own.append(argv[i + 1])
                i += 1
        elif token.startswith("--"):
            overrides.append(token)
            if "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(argv[i + 1])
                i += 1
        else:
            own.append(token)
        i += 1
    return own, overrides


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if argv and argv[0] in OWN_FLAGS:
        argv, overrides = _split_overrides(argv)
    args = parser.parse_args(argv)
    if getattr(args, "command", None) in OWN_FLAGS:
        args.overrides = overrides
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except HfEwcError as err:
        print(f"hf-ewc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk or a lost mount where a library (the Trainer's checkpoints) writes on its own
        hint = (
            "; what was finished is kept: fix it, then --resume continues a run that had started"
            if (args.command == "train")
            else ""
        )
        print(f"hf-ewc {args.command}: error: {error_line(err)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
