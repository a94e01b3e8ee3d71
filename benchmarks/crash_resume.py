"""Crash safety: kill `hf-ewc train` with SIGKILL at random moments, resume each time, compare with a clean run.

    python benchmarks/crash_resume.py            # 12 kills, ~6 min on 2 CPU cores; writes results/crash_resume.*
    python benchmarks/crash_resume.py --kills 3  # fewer (tests/test_crash.py runs 2)

The embedded default of `hf-ewc train`, made small (64 training blocks and 32 evaluation blocks per domain, one epoch
of pretraining, baseline off) so that a run takes seconds. First an uninterrupted run; then the same config in a new
directory, started and killed with SIGKILL after a random delay, then `--resume`d and killed again, until a
`--resume` finishes: a round, whose result is compared before the next round starts afresh. Each delay is drawn
uniformly from (0.5 s, the clean run's duration), so kills land in data loading, training, evaluation,
consolidation and saving alike; what was happening is read from the run directory at the moment of the kill (a
half-written `*.tmp*` folder means "saving"). Every round's finished run must give the clean run's evaluation matrix
and EWC state. Writes ``crash_resume.json`` and ``crash_resume.md`` into ``--out``.
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/domains.py

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from hf_ewc.pipeline import default_config_path
from hf_ewc.pipeline.config_io import read_yaml


def small_default(out: Path) -> dict:
    raw = read_yaml(default_config_path())
    raw.pop("baseline", None)
    for domain in raw["domains"]:
        domain.update(
            max_samples=64, max_eval_samples=32, data_files=str(default_config_path().parent / domain["data_files"])
        )
    raw["domains"][0]["training"] = {**raw["domains"][0].get("training", {}), "num_train_epochs": 1}
    raw.update(output_dir=str(out), save_steps=3, logging_steps=2, disable_tqdm=True)
    return raw


def write_config(raw: dict, path: Path) -> Path:
    path.write_text(json.dumps(raw), encoding="utf-8")  # JSON is YAML
    return path


def train(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hf_ewc", "train", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def phase_of(out: Path, log: str) -> str:
    """What the run was doing when it was killed, as its directory and printed log show it."""
    if any(".tmp" in p.name for p in out.rglob("*")):
        return "saving (a *.tmp* entry existed)"
    done = (
        json.loads((out / "progress.json").read_text()).get("completed", [])
        if (out / "progress.json").is_file()
        else []
    )
    lines = [line for line in log.splitlines() if line.startswith("[hf_ewc]")]
    if not lines:
        return "starting (loading data, tokenizer, model)"
    last = lines[-1]
    if "domain " in last and "/" in last:
        which = last.split("domain ")[1].split(":")[0]
        return f"domain {which} (training, evaluation or consolidation; {len(done)} done)"
    return f"after {len(done)} domain(s): {last[9:60]}"


def compare(clean: Path, resumed: Path) -> dict:
    a = json.loads((clean / "results.json").read_text())
    b = json.loads((resumed / "results.json").read_text())
    matrix_diff = max(
        float((torch.tensor(a["matrix"][k]) - torch.tensor(b["matrix"][k])).abs().max()) for k in a["matrix"]
    )
    sa, sb = (
        load_file(clean / "ewc_state" / "ewc_state.safetensors"),
        load_file(resumed / "ewc_state" / "ewc_state.safetensors"),
    )
    assert set(sa) == set(sb)
    state_diff = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    return {"matrix_max_abs_diff": matrix_diff, "state_max_abs_diff": state_diff}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12, help="SIGKILLs before the final --resume (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hf_ewc_crash_") as tmp:
        tmp = Path(tmp)
        clean_cfg = write_config(small_default(tmp / "clean"), tmp / "clean.yaml")
        t0 = time.perf_counter()
        child = train(clean_cfg)
        log, _ = child.communicate()
        assert child.returncode == 0, log[-3000:]
        clean_seconds = time.perf_counter() - t0
        crash_cfg = write_config(small_default(tmp / "crash"), tmp / "crash.yaml")
        kills, rounds = [], []
        # Rounds: kill, resume, kill … until a resume finishes, then compare with the clean run and start the next
        # round in a fresh directory; stop after the round in which the last kill landed.
        while len(kills) < args.kills or (tmp / "crash").exists():
            delay = rng.uniform(0.5, clean_seconds) if len(kills) < args.kills else None
            child = train(crash_cfg, *(["--resume"] if (tmp / "crash" / "run_config.json").exists() else []))
            try:
                log, _ = child.communicate(timeout=delay)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGKILL)
                log, _ = child.communicate()
                phase = phase_of(tmp / "crash", log)
                kills.append({"round": len(rounds) + 1, "after_s": round(delay, 2), "phase": phase})
                print(f"  kill {len(kills)} after {delay:.1f} s: {phase}", flush=True)
                continue
            if child.returncode != 0:
                raise AssertionError(f"hf-ewc train failed:\n{log[-3000:]}")
            round_kills = sum(k["round"] == len(rounds) + 1 for k in kills)
            diffs = compare(tmp / "clean", tmp / "crash")
            rounds.append({"kills": round_kills, **diffs})
            print(f"  round {len(rounds)} finished after {round_kills} kill(s): {diffs}", flush=True)
            shutil.rmtree(tmp / "crash")
        diffs = {key: max(r[key] for r in rounds) for key in ("matrix_max_abs_diff", "state_max_abs_diff")}
    report = {
        "command": " ".join(["python", "benchmarks/crash_resume.py", *argv]),
        "clean_run_seconds": clean_seconds,
        "kills": kills,
        "rounds": rounds,
        **diffs,
        "identical": diffs["matrix_max_abs_diff"] <= 1e-5 and diffs["state_max_abs_diff"] <= 1e-5,
        "wall_time_s": time.perf_counter() - start,
    }
    verdict = "identical" if report["identical"] else "DIFFERENT"
    lines = [
        "# Crash safety: SIGKILL at random moments, then --resume",
        "",
        f"Command: `{report['command']}` — wall time {report['wall_time_s']:.0f} s; clean run {clean_seconds:.0f} s.",
        "",
        (
            f"**{len(kills)} kills** in {len(rounds)} round(s), each resumed to the end: evaluation matrix max |Δ| "
            f"= {diffs['matrix_max_abs_diff']:.3g}, EWC state max |Δ| = {diffs['state_max_abs_diff']:.3g} against the "
            f"uninterrupted run — {verdict}."
        ),
        "",
        "| kill | round | after (s) | what the run was doing |",
        "|---|---|---|---|",
        *[f"| {i + 1} | {k['round']} | {k['after_s']} | {k['phase']} |" for i, k in enumerate(kills)],
        "",
    ]
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "crash_resume.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (args.out / "crash_resume.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
