"""General-ability forgetting on the embedded default, measured with lm-evaluation-harness (`general_eval:`).

    python benchmarks/general_eval.py      # ~4 min on 2 CPU cores; writes benchmarks/results/general_eval.*

Runs `hf-ewc train` on the embedded default (a small Llama: python_docs → python_code → man_pages, stabilized EWC with
the default λ, and its `baseline: naive` twin sharing the first domain) with the two shipped harness tasks —
`hf_ewc_prose_cloze` and `hf_ewc_prose_ppl`, held-out Python-docs prose, the kind of text the first domain taught —
scored before the sequence and after every domain. Reports, side by side in one run, each score for EWC and for naive
fine-tuning, the forgetting after the first domain (positive = worse), the share of naive's general forgetting EWC
removed (where naive forgot), and what the evaluations cost.

Writes ``general_eval.json`` (the run's `general_eval` block and timings), ``general_eval.md`` and
``general_eval.png`` (each score along the sequence, naive dashed) into ``--out`` (default ``benchmarks/results``).
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/domains.py

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from hf_ewc.pipeline import build_run_config, default_config_path, run_pipeline
from hf_ewc.pipeline.config_io import read_yaml
from hf_ewc.utils import versions


TASKS = ["hf_ewc_prose_cloze", "hf_ewc_prose_ppl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = read_yaml(default_config_path())
    with tempfile.TemporaryDirectory(prefix="hf_ewc_general_") as tmp:
        raw.update(output_dir=str(Path(tmp) / "run"), disable_tqdm=True)
        raw["general_eval"] = {"tasks": TASKS, "batch_size": 32}
        started = time.perf_counter()
        results = run_pipeline(build_run_config(raw, source=str(default_config_path())), print_fn=None)
        seconds = time.perf_counter() - started
        baseline_seconds = json.loads((Path(tmp) / "run" / "baseline" / "results.json").read_text())
        shutil.copyfile(Path(tmp) / "run" / "general.png", out / "general_eval.png")
    general = results["general_eval"]
    naive = general["baseline"]
    removed = {
        c: 1 - general["forgetting_after_first"][c] / naive["forgetting_after_first"][c]
        for c in general["shown"]
        if naive["forgetting_after_first"][c] > 0
    }
    eval_seconds = general["seconds"] + baseline_seconds["general_eval"]["seconds"]
    report = {
        "general_eval": general,
        "domains_summary": {"ewc": results["summary"], "baseline": results["baseline"]},
        "general_forgetting_removed": removed,
        "seconds": {"whole_run_with_baseline": seconds, "general_eval_both_runs": eval_seconds},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": versions(),
    }
    (out / "general_eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    rows = [("| score | before | after the first domain | EWC at the end | naive at the end | forgetting EWC / naive "
            "(+ worse) | naive's removed |"), "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in general["shown"]:
        share = f"{removed[c]:.0%}" if c in removed else "— (naive did not forget)"
        rows.append(
            f"| {c} | {general['initial'][c]:.4g} | {general['rows'][0][c]:.4g} | {general['rows'][-1][c]:.4g} | "
            f"{naive['rows'][-1][c]:.4g} | {general['forgetting_after_first'][c]:+.4g} / "
            f"{naive['forgetting_after_first'][c]:+.4g} | {share} |"
        )
    text = [
        "# General-ability forgetting on the embedded default (lm-evaluation-harness)",
        "",
        (
            f"`python benchmarks/general_eval.py`: the embedded default with `general_eval: {{tasks: {TASKS}}}` "
            "(every document of both shipped tasks), stabilized EWC at the default λ against its `baseline: naive` "
            "twin, the first domain shared. Forgetting = the drop from after the first domain to the end, signed so "
            "that positive is worse."
        ),
        "",
        *rows,
        "",
        "Standard errors at the end (the harness's; none for perplexities): "
        + ", ".join(f"{c} ±{e:.2g}" for c, e in general["stderr"][-1].items() if e is not None)
        + ". A difference smaller than about two of them is noise: the cloze accuracies of a model this small stay "
        "near chance (0.25), and the perplexities carry the signal.",
        "",
        (
            f"On the sequence's own domains: {results['baseline']['forgetting_removed']:.0%} of naive's forgetting "
            f"removed, {results['baseline']['gain_kept']:.0%} of its gain kept."
        ),
        "",
        (
            f"Cost: {eval_seconds:.1f} s of harness evaluation (4 per run, both runs) in a {seconds:.0f} s run "
            f"({eval_seconds / seconds:.1%})."
        ),
        "",
        "![general ability along the sequence](general_eval.png)",
        "",
    ]
    (out / "general_eval.md").write_text("\n".join(text), encoding="utf-8")
    print("\n".join(text))


if __name__ == "__main__":
    main()
