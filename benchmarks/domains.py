"""Domain-sequence benchmark: how much of naive fine-tuning's forgetting each method removes, and at what cost.

    python benchmarks/domains.py          # ~15 min on 2 CPU cores; writes benchmarks/results/domains.{json,md,png}
    python benchmarks/domains.py --quick  # smoke test, about a minute: writes domains_quick.* instead

A thin caller of `hf-ewc sweep` (`hf_ewc.pipeline.sweep.Sweep`) on the embedded default of `hf-ewc train`: a small
Llama built from config with a BPE tokenizer trained on the shipped text, python_docs (English prose, acting as
pretraining) → python_code → man_pages, evaluated on every domain after each one. Compared over one λ grid, 0.003–3
— with mean-normalized importances (`importance_normalization: mean`, the default) one scale serves every penalty;
proximal EWC's useful λ lies about two decades higher, so the grid spans both:

- naive fine-tuning (``ewc_mode: off``);
- L2: stabilized penalty with ``importance_method: uniform`` (Ω = 1);
- stabilized EWC with the empirical Fisher (the default) and with MAS;
- proximal EWC with the empirical Fisher.

The first domain is trained once per method and every λ continues from it (the sweep's sharing, exact: naive's matrix
is the one a plain `hf-ewc train --ewc_mode off` gives). Per cell: the share of naive's forgetting removed
(forgetting = −BWT) and of its gain on the new domains kept; per method the best λ keeps ≥ 90 % of the gain and
removes the most forgetting; the target is ≥ 60 % removed. Writes the sweep's report as ``domains.json``,
``domains.md`` and the frontier as ``domains.png`` into ``--out`` (default ``benchmarks/results``).
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# OpenMP threads spin while they wait; on a shared 2-core machine any other busy process then slows training 3-10×.
# Passive waiting costs ~10 % when the machine is idle. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import datasets
import transformers

from hf_ewc.pipeline import default_config_path
from hf_ewc.pipeline.config_io import read_yaml
from hf_ewc.pipeline.sweep import MethodSpec, Sweep
from hf_ewc.utils import versions


TARGETS = {"forgetting_removed": 0.6, "gain_kept": 0.9}
METHODS = ["uniform", "fisher", "mas", "proximal:fisher"]
# One grid for every method. Proximal EWC's pull bypasses Adam's normalisation (a plain η·λ·Ω step per optimizer
# step), so its useful λ sits about two decades above the penalties' (as on permuted digits): the grid spans both.
LAMBDAS = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
# --quick: a few training blocks per domain and one epoch of pretraining; the numbers mean nothing, the plumbing runs.
QUICK = {"max_samples": 48, "max_eval_samples": 32, "pretrain_epochs": 1, "lambdas": [0.01], "methods": ["fisher"]}


def base_config(quick: bool) -> dict:
    """The embedded default as a mapping (and tiny domains for --quick)."""
    raw = read_yaml(default_config_path())
    raw.pop("baseline", None)  # the sweep runs naive fine-tuning itself
    if quick:
        for domain in raw["domains"]:
            domain.update(max_samples=QUICK["max_samples"], max_eval_samples=QUICK["max_eval_samples"])
        first = raw["domains"][0]
        first["training"] = {**first.get("training", {}), "num_train_epochs": QUICK["pretrain_epochs"]}
    return raw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny domains, one λ, one method")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    start = time.perf_counter()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    raw = base_config(args.quick)
    methods = [MethodSpec.parse(m) for m in (QUICK["methods"] if args.quick else METHODS)]
    lambdas = QUICK["lambdas"] if args.quick else LAMBDAS
    stem = "domains_quick" if args.quick else "domains"
    with tempfile.TemporaryDirectory(prefix="hf_ewc_domains_") as tmp:
        raw["output_dir"] = str(Path(tmp) / "sweep")
        sweep = Sweep(raw, source=str(default_config_path()), lambdas=lambdas, methods=methods,
                      min_gain_kept=TARGETS["gain_kept"])  # fmt: skip
        report = sweep.run()
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sweep.out / "frontier.png", args.out / f"{stem}.png")
        markdown = (sweep.out / "sweep.md").read_text(encoding="utf-8")
    best = {m: c for m, c in report["choice"]["per_method"].items()}
    met = [m for m, c in best.items() if c and c["forgetting_removed"] >= TARGETS["forgetting_removed"]]
    report.update(
        command=" ".join(["python", "benchmarks/domains.py", *argv]),
        targets=TARGETS,
        target_met_by=met,
        versions=versions() | {"datasets": datasets.__version__},
        wall_time_s=time.perf_counter() - start,
    )
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    header = (
        f"Command: `{report['command']}` — wall time {report['wall_time_s']:.0f} s on {os.cpu_count()} CPU core(s), "
        "through `hf-ewc sweep` on the embedded default (methods: " + ", ".join(m.label for m in methods) + "). "
        f"Target: ≥ {TARGETS['forgetting_removed']:.0%} of naive's forgetting removed at ≥ "
        f"{TARGETS['gain_kept']:.0%} of its gain kept — met by: {', '.join(met) or 'no method'}.\n\n"
    )
    title, _, body = markdown.partition("\n\n")
    (args.out / f"{stem}.md").write_text(f"{title}\n\n{header}{body}", encoding="utf-8")
    print(f"{title}\n\n{header}{body}")
    print(f"Wall time {report['wall_time_s']:.0f} s; results in {args.out}/{stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
