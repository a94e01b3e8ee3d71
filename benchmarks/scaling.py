"""Data-parallel and FSDP2-sharded importance collection (P4) and the size of the EWC state (P3, and per process).

    python benchmarks/scaling.py          # ~3 min on 2 CPU cores; writes benchmarks/results/scaling.{json,md}
    python benchmarks/scaling.py --quick  # fewer samples and repeats: a smoke test (*_quick.* files)

Model: the embedded default's architecture (Llama-style, hidden 128, 2 layers, vocabulary 4096, tied embeddings:
0.9 M parameters), sequences of 128 tokens, empirical Fisher with per-sample gradients (hooks engine), batches of 8.

- **P4** — the same samples collected by 2 processes (`accelerate launch --multi_gpu --num_processes 2`, gloo, one
  thread each) and by 1 process with 2 threads, alternately, each in a fresh interpreter. Throughput ratio =
  (samples / s with 2 processes) / (samples / s with 1 process), from the medians of the repeats; the clock starts
  after a barrier, once the model and data are built, and stops after the cross-process reduction. Target ≥ 0.9.
  Max relative difference of the importances = max over tensors of max|Ω₂ − Ω₁| / max|Ω₁|. Target ≤ 1e-5.
  The same on 2 processes with the model sharded by FSDP2 (`fully_shard` per decoder layer and the root, DTensor
  parameters): per-sample squares formed on each process, reduce-scattered into the parameters' slices. Reported:
  its throughput against DDP's, the difference from 1 process, and the EWC state each process holds after
  consolidating (bytes of its Ω and θ* slices; 2·P·4 for 1 process and DDP).
- **P3** — EWC state after 1…5 consolidated domains (Fisher on 16 samples each, weights moved between domains):
  tensor bytes (importances + anchors) and the size of `ewc_state.safetensors`, float32 and bfloat16 storage.
  Target: tensor bytes constant at 2·P·4 (2·P·2 in bfloat16); the file adds only its JSON header.

Timings are only compared within one run: the machine is shared and wall-clock swings.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ewc import EWCState, collect_importance
from hf_ewc.distributed import whole_tensor
from hf_ewc.state import STATE_WEIGHTS_NAME
from hf_ewc.utils import versions


TARGETS = {"p4_throughput_ratio": 0.9, "p4_max_relative_difference": 1e-5}
LENGTH = 128


def build_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=LENGTH, tie_word_embeddings=True, bos_token_id=0,
        eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def samples(n: int, seed: int = 0) -> list[dict]:
    ids = torch.randint(1, 4096, (n, LENGTH), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]


# ------------------------------------------------------------------------------------------------------------- P4
def worker(out: Path, n: int, shard: bool) -> None:
    """One collection, in this process (or in each process of a launch; ``shard``: FSDP2); rank 0 writes Ω and the
    seconds, every process the bytes of the EWC state it holds after consolidating."""
    from accelerate import PartialState
    from torch.distributed.fsdp import fully_shard

    state = PartialState(cpu=True)
    model, data = build_model(), samples(n)
    if shard:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    collect_importance(model, data[: 2 * state.num_processes], batch_size=1, show_progress=False)  # warm-up
    state.wait_for_everyone()
    start = time.perf_counter()
    importances = collect_importance(model, data, batch_size=8, show_progress=False)
    seconds = time.perf_counter() - start
    held = EWCState().consolidate(model, importances).nbytes
    (out / f"state_bytes_rank{state.process_index}.json").write_text(json.dumps(held))
    importances = {name: whole_tensor(value) for name, value in importances.items()}  # (gathered: FSDP2)
    if state.is_main_process:
        save_file(importances, out / "importances.safetensors")
        info = {"seconds": seconds, "processes": state.num_processes, "threads": torch.get_num_threads()}
        (out / "timing.json").write_text(json.dumps(info))


def run_worker(processes: int, n: int, out: Path, shard: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update({"OMP_NUM_THREADS": str(2 // processes), "OMP_WAIT_POLICY": "PASSIVE", "ACCELERATE_USE_CPU": "1"})
    script = [
        str(Path(__file__).resolve()),
        "--worker",
        str(out),
        "--samples",
        str(n),
        *(["--shard"] if shard else []),
    ]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script,
        ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    info = json.loads((out / "timing.json").read_text())
    info["state_bytes"] = [json.loads((out / f"state_bytes_rank{r}.json").read_text()) for r in range(processes)]
    return info


def worst_difference(one: dict, two: dict) -> tuple[float, str | None]:
    worst, where = 0.0, None
    for name, value in one.items():
        scale = float(value.abs().max())
        if scale > 0:
            diff = float((two[name] - value).abs().max()) / scale
            worst, where = max((worst, where), (diff, name))
    return worst, where


SETUPS = {1: (1, False), 2: (2, False), "fsdp2": (2, True)}  # key: (processes, sharded)


def p4(n: int, repeats: int, tmp: Path) -> dict:
    times: dict = {key: [] for key in SETUPS}
    threads, held = {}, {}
    for r in range(repeats):
        for key in list(SETUPS) if r % 2 == 0 else list(SETUPS)[::-1]:
            processes, shard = SETUPS[key]
            info = run_worker(processes, n, tmp / f"p{key}", shard)
            times[key].append(info["seconds"])
            threads[key], held[key] = info["threads"], info["state_bytes"]
            print(f"P4 repeat {r + 1}/{repeats}: {key} ({processes} process(es)) {info['seconds']:.2f} s", flush=True)
    one, two, sharded = (load_file(tmp / f"p{key}" / "importances.safetensors") for key in SETUPS)
    worst, where = worst_difference(one, two)
    worst_sharded, where_sharded = worst_difference(one, sharded)
    median = {key: statistics.median(t) for key, t in times.items()}
    return {
        "samples": n,
        "seconds": times,
        "median_seconds": median,
        "samples_per_second": {key: n / s for key, s in median.items()},
        "threads_per_process": threads,
        "throughput_ratio": median[1] / median[2],
        "round_ratios": [a / b for a, b in zip(times[1], times[2])],
        "max_relative_difference": worst,
        "worst_tensor": where,
        "fsdp2_vs_ddp_throughput_ratio": median[2] / median["fsdp2"],
        "fsdp2_round_ratios": [a / b for a, b in zip(times[2], times["fsdp2"])],
        "fsdp2_max_relative_difference": worst_sharded,
        "fsdp2_worst_tensor": where_sharded,
        "state_bytes_per_process": held,
    }


# ------------------------------------------------------------------------------------------------------------- P3
def p3(domains: int, tmp: Path) -> dict:
    model = build_model()
    num_parameters = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    out: dict = {"parameters": num_parameters}
    for dtype, width in (("float32", 4), ("bfloat16", 2)):
        torch.manual_seed(1)
        work = build_model()
        state = EWCState(dtype=dtype)
        rows = []
        for d in range(domains):
            importances = collect_importance(work, samples(16, seed=10 + d), show_progress=False)
            state.consolidate(work, importances, domain=f"domain_{d}")
            with torch.no_grad():  # "training" on the next domain moves the weights
                for p in work.parameters():
                    p.add_(1e-3 * torch.randn_like(p))
            state.save(tmp / dtype)
            tensor_bytes = sum(t.numel() * t.element_size() for t in [*state.importances.values(),
                                                                       *state.anchors.values()])  # fmt: skip
            rows.append(
                {
                    "domains": d + 1,
                    "tensor_bytes": tensor_bytes,
                    "file_bytes": (tmp / dtype / STATE_WEIGHTS_NAME).stat().st_size,
                }
            )
        expected = 2 * num_parameters * width
        out[dtype] = {
            "expected_tensor_bytes": expected,
            "rows": rows,
            "constant": len({r["tensor_bytes"] for r in rows}) == 1 and rows[0]["tensor_bytes"] == expected,
        }
    return out


def markdown(result: dict) -> str:
    four, three = result["P4"], result["P3"]
    held = four["state_bytes_per_process"]
    lines = [
        f"# Scaling: data-parallel collection and state size ({'quick' if result['quick'] else 'full'} run)",
        "",
        f"Command: `{result['command']}`; model {three['parameters']:,} parameters, sequences of {LENGTH} tokens.",
        "",
        "## P4: 2 processes vs 1 process with 2 threads (empirical Fisher, the same samples)",
        "",
        "| | 1 process × 2 threads | 2 processes × 1 thread |",
        "|---|---:|---:|",
        (
            f"| median seconds ({four['samples']} samples) | {four['median_seconds'][1]:.2f} | "
            f"{four['median_seconds'][2]:.2f} |"
        ),
        f"| samples / s | {four['samples_per_second'][1]:.1f} | {four['samples_per_second'][2]:.1f} |",
        "",
        (
            f"- throughput ratio (2 processes / 1 process): **{four['throughput_ratio']:.3f}** (target ≥ "
            f"{TARGETS['p4_throughput_ratio']}); per round: {', '.join(f'{r:.2f}' for r in four['round_ratios'])}"
        ),
        (
            f"- max relative difference of the importances: **{four['max_relative_difference']:.2e}** (target ≤ "
            f"{TARGETS['p4_max_relative_difference']:.0e}; worst tensor `{four['worst_tensor']}`)"
        ),
        "",
        "FSDP2 (2 processes × 1 thread, `fully_shard` per decoder layer and the root) against DDP, the same samples:",
        "",
        "| | DDP, 2 processes | FSDP2, 2 processes |",
        "|---|---:|---:|",
        f"| median seconds | {four['median_seconds'][2]:.2f} | {four['median_seconds']['fsdp2']:.2f} |",
        f"| samples / s | {four['samples_per_second'][2]:.1f} | {four['samples_per_second']['fsdp2']:.1f} |",
        "| EWC state bytes per process (Ω + θ*) | "
        + " | ".join(", ".join(f"{b:,}" for b in held[key]) for key in (2, "fsdp2"))
        + " |",
        "",
        (
            f"- FSDP2 / DDP throughput: **{four['fsdp2_vs_ddp_throughput_ratio']:.3f}**; per round: "
            f"{', '.join(f'{r:.2f}' for r in four['fsdp2_round_ratios'])}"
        ),
        (
            f"- FSDP2 vs 1 process, max relative difference of the importances: "
            f"**{four['fsdp2_max_relative_difference']:.2e}** (worst tensor `{four['fsdp2_worst_tensor']}`); state "
            f"per process {held['fsdp2'][0] / held[1][0]:.3f} of one process's"
        ),
        "",
        "## P3: EWC state size after each domain",
        "",
        "| domains | float32 tensor bytes | float32 file bytes | bfloat16 tensor bytes | bfloat16 file bytes |",
        "|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(three["float32"]["rows"], three["bfloat16"]["rows"]):
        lines.append(
            f"| {a['domains']} | {a['tensor_bytes']:,} | {a['file_bytes']:,} | {b['tensor_bytes']:,} | "
            f"{b['file_bytes']:,} |"
        )
    lines += [
        "",
        (
            f"- expected 2·P·4 = {three['float32']['expected_tensor_bytes']:,} bytes (float32), 2·P·2 = "
            f"{three['bfloat16']['expected_tensor_bytes']:,} (bfloat16); constant and equal: float32 "
            f"{three['float32']['constant']}, bfloat16 {three['bfloat16']['constant']}. The file adds the safetensors "
            "header (tensor names and the per-domain metadata)."
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and repeats (smoke test)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--shard", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.samples, args.shard)
        return
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        n, repeats = (32, 2) if args.quick else (256, 5)
        result = {
            "command": "python benchmarks/scaling.py" + (" --quick" if args.quick else ""),
            "quick": args.quick,
            "P4": p4(n, repeats, Path(tmp)),
            "P3": p3(5, Path(tmp)),
            "targets": TARGETS,
            "versions": versions(),
        }
    result["wall_time_s"] = time.time() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "scaling_quick" if args.quick else "scaling"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
