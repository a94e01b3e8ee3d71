"""What EWC costs: training-step overhead (P1) and per-sample Fisher cost (P2), measured side by side in one run.

    python benchmarks/overhead.py          # ~4 min on 2 CPU cores; writes benchmarks/results/overhead.{json,md}
    python benchmarks/overhead.py --quick  # smaller model, fewer repeats: a smoke test (< 1 min, *_quick.* files)

Model: a Llama-style causal LM built from config (hidden 256, 4 layers, vocabulary 8000, tied embeddings: 6.2 M
parameters), sequences of 128 tokens, AdamW.

- **P1** — median optimizer-step time of `EWCTrainer` with the penalty active on every parameter, divided by the
  same for a plain `transformers.Trainer` on the same model, data and optimizer, at batch 16 and at batch 1; for the
  default `stabilized` mode and for `proximal`. Plain and EWC runs alternate in rounds; the ratio compares the
  medians of all their steps, and each round's ratio is kept to show the spread. Targets ≤ 1.02 at batch 16, ≤ 1.05
  at batch 1. Alongside: the penalty alone, timed alone (its gradient added to `.grad`, as EWCTrainer does, and the
  autograd loss term it replaced), which is what the ratio measures under the noise.
- **P2** — exact per-sample empirical Fisher over 16 samples (`collect_importance`, hooks engine, one batch of 16)
  divided by one forward+backward of the same batch (target ≤ 2.0), and the speed-up of the hooks engine over the
  batch-size-1 loop (`per_sample="loop"`) on the same samples (target ≥ 3×). Medians over alternating repeats after
  one warm-up call of each.

The machine is shared and wall-clock swings, so only ratios measured in the same run are reported.
"""

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_ewc import EWCConfig, EWCState, EWCTrainer, collect_importance
from hf_ewc.penalty import Penalty
from hf_ewc.utils import versions


TARGETS = {"p1_ratio": {16: 1.02, 1: 1.05}, "p2_over_forward_backward": 2.0, "p2_speedup_over_loop": 3.0}


def build_model(quick: bool) -> LlamaForCausalLM:
    hidden, layers, vocab = (128, 2, 4000) if quick else (256, 4, 8000)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def samples(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    ids = torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step: forward, backward, penalty, clipping, optimizer, callbacks."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def step_times(model, data, batch: int, steps: int, mode: str | None, state: EWCState | None) -> list[float]:
    """Step times of a plain Trainer (``mode=None``) or of an EWCTrainer in ``mode``, warm-up steps dropped."""
    common = {
        "output_dir": "/tmp/hf_ewc_overhead", "per_device_train_batch_size": batch, "max_steps": steps,
        "learning_rate": 1e-4, "lr_scheduler_type": "constant", "report_to": "none", "use_cpu": True,
        "save_strategy": "no", "disable_tqdm": True, "logging_steps": 10_000, "seed": 0,
    }  # fmt: skip
    timer = StepTimer()
    model = copy.deepcopy(model)
    if mode is None:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, callbacks=[timer])
    else:
        args = EWCConfig(**common, ewc_mode=mode, ewc_lambda=1e3)
        trainer = EWCTrainer(model=model, args=args, train_dataset=data, callbacks=[timer], ewc_state=state)
    trainer.train()
    return timer.times[2:]  # the first steps pay for allocations and thread-pool warm-up


def p1(model, state, data, batch: int, steps: int, rounds: int, mode: str) -> dict:
    """Plain and EWC runs alternate; the ratio compares the medians of all their steps, pooled over rounds."""
    plain, ewc, per_round = [], [], []
    for _ in range(rounds):
        p, e = step_times(model, data, batch, steps, None, None), step_times(model, data, batch, steps, mode, state)
        plain += p
        ewc += e
        per_round.append(statistics.median(e) / statistics.median(p))
    return {
        "mode": mode,
        "batch": batch,
        "plain_step_s": statistics.median(plain),
        "ewc_step_s": statistics.median(ewc),
        "ratio": statistics.median(ewc) / statistics.median(plain),
        "ratio_per_round": per_round,
    }


def penalty_times(model, state: EWCState, repeats: int) -> dict[str, float]:
    """Median time of one step's stabilized penalty over every parameter, timed alone: its gradient added to ``.grad``
    directly (what EWCTrainer does) and the same as a loss term through autograd (its DeepSpeed path, and what it did
    before)."""
    params = dict(model.named_parameters())
    penalty = Penalty.build(params, state.anchors, state.importances, mode="stabilized", ewc_lambda=1e3, lr=1e-4)
    for p in params.values():
        p.grad = torch.zeros_like(p)

    def direct():
        penalty.add_gradient_()

    def autograd():
        penalty.loss().backward()

    times = {"direct": [], "autograd": []}
    for _ in range(repeats + 2):  # alternating, the first two of each dropped
        for name, step in (("direct", direct), ("autograd", autograd)):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return {name: statistics.median(t[2:]) for name, t in times.items()}


def forward_backward_time(model, data) -> float:
    batch = transformers.default_data_collator(data)
    start = time.perf_counter()
    model(**batch).loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def fisher_time(model, data, engine: str) -> float:
    start = time.perf_counter()
    collect_importance(model, data, "fisher", batch_size=len(data), per_sample=engine, show_progress=False)
    return time.perf_counter() - start


def p2(model, data, repeats: int) -> dict:
    model.eval()  # importance collection runs in eval mode; the forward+backward reference does the same
    forward_backward_time(model, data), fisher_time(model, data, "hooks"), fisher_time(model, data, "loop")  # warm-up
    times = {"forward_backward": [], "hooks": [], "loop": []}
    for _ in range(repeats):
        times["forward_backward"].append(forward_backward_time(model, data))
        times["hooks"].append(fisher_time(model, data, "hooks"))
        times["loop"].append(fisher_time(model, data, "loop"))
    fb, hooks, loop = (statistics.median(times[k]) for k in ("forward_backward", "hooks", "loop"))
    return {
        "samples": len(data),
        "forward_backward_s": fb,
        "fisher_hooks_s": hooks,
        "fisher_loop_s": loop,
        "fisher_over_forward_backward": hooks / fb,
        "speedup_over_loop": loop / hooks,
        "loop_over_forward_backward": loop / fb,
        "times": times,
    }


def markdown(r: dict) -> str:
    model = r["model"]
    lines = [
        (
            f"# Overhead: {model['parameters'] / 1e6:.1f} M-parameter Llama, {model['sequence_length']} tokens, "
            f"{r['torch_threads']} CPU threads"
        ),
        "",
        (
            f"Command: `{r['command']}`. Ratios of medians measured side by side in one run; wall time "
            f"{r['wall_time_s']:.0f} s. The stabilized penalty alone, per optimizer step over all parameters: "
            f"{r['penalty_s']['direct'] * 1e3:.1f} ms for its gradient added to `.grad` (EWCTrainer), "
            f"{r['penalty_s']['autograd'] * 1e3:.1f} ms as a loss term through autograd (the DeepSpeed path)."
        ),
        "",
        "| measure | value | target | |",
        "|---|---|---|---|",
    ]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    for p in r["P1"]:
        spread = f"{min(p['ratio_per_round']):.2f}–{max(p['ratio_per_round']):.2f}"
        target = TARGETS["p1_ratio"][p["batch"]]
        lines.append(
            f"| P1: EWCTrainer (`{p['mode']}`) / Trainer step time, batch {p['batch']} "
            f"({p['plain_step_s'] * 1e3:.0f} ms → {p['ewc_step_s'] * 1e3:.0f} ms; rounds {spread}) | "
            f"{p['ratio']:.3f} | ≤ {target} | {verdict(p['ratio'] <= target)} |"
        )
    p2 = r["P2"]
    lines += [
        (
            f"| P2: per-sample Fisher of 16 samples / one forward+backward of the batch "
            f"({p2['fisher_hooks_s'] * 1e3:.0f} ms / {p2['forward_backward_s'] * 1e3:.0f} ms) | "
            f"{p2['fisher_over_forward_backward']:.2f} | ≤ {TARGETS['p2_over_forward_backward']} | "
            f"{verdict(p2['fisher_over_forward_backward'] <= TARGETS['p2_over_forward_backward'])} |"
        ),
        (
            f"| P2: speed-up of the hooks engine over the batch-size-1 loop ({p2['fisher_loop_s'] * 1e3:.0f} ms) | "
            f"{p2['speedup_over_loop']:.2f}× | ≥ {TARGETS['p2_speedup_over_loop']:g}× | "
            f"{verdict(p2['speedup_over_loop'] >= TARGETS['p2_speedup_over_loop'])} |"
        ),
        "",
        "What bounds the numbers:",
        "",
        (
            "- P1: the penalty costs a fixed number of elementwise passes over every protected parameter per "
            "optimizer step, whatever the batch: about 7 parameter-sized reads and writes for `stabilized` "
            "(θ − θ* into a workspace, then `grad += 2c·(θ − θ*)`, one tensor at a time so the difference is still "
            "in cache; through autograd it was about 17), 4 for the single `lerp` of `proximal` — an AdamW update "
            "itself makes about 10. The penalty alone takes "
            f"{r['penalty_s']['direct'] * 1e3:.1f} ms here, i.e. "
            + ", ".join(
                f"{r['penalty_s']['direct'] / p['plain_step_s']:.1%} of a plain batch-{p['batch']} step"
                for p in r["P1"]
                if p["mode"] == "stabilized"
            )
            + ". Memory bandwidth, not arithmetic, sets it: a fused kernel (one read of θ, θ*, 2c and the gradient, "
            "one write) would need 5 passes, the floor for a penalty that reads its anchors every step. Run-to-run "
            "noise on this shared machine (the spread of the rounds) is of the size of the batch-16 overhead."
        ),
        (
            "- P2: any exact per-sample method costs at least one forward and one backward. On this CPU the "
            f"batch-size-1 loop already runs at {p2['loop_over_forward_backward']:.2f}× a batched forward+backward "
            f"({model['sequence_length']} tokens per sample keep the matrix units busy), so no engine can be 3× "
            "faster than it here; the "
            "hooks engine pays the forward, a backward without weight gradients and one `bmm` per weight for the "
            "per-sample gradients. Its advantage grows where the loop is overhead-bound (short sequences, small "
            f"models, GPUs): with {r['P2_short_sequences']['sequence_length']}-token samples the same model gives "
            f"{r['P2_short_sequences']['fisher_over_forward_backward']:.2f}× a forward+backward and a "
            f"{r['P2_short_sequences']['speedup_over_loop']:.2f}× speed-up over the loop."
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats (smoke test)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    started = time.time()

    model = build_model(args.quick)
    length, vocab = (64 if args.quick else 128), model.config.vocab_size
    state = EWCState().consolidate(model, collect_importance(model, samples(8, length, vocab, 1), show_progress=False))
    with torch.no_grad():  # off the anchors, so that the penalty and its gradient are not trivially zero
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))

    steps, rounds, repeats = (6, 2, 2) if args.quick else (16, 5, 5)
    p1_results = [
        p1(model, state, samples(batch * steps, length, vocab), batch, steps, rounds, mode)
        for mode in ("stabilized", "proximal")
        for batch in (16, 1)
    ]
    p2_result = p2(model, samples(16, length, vocab, seed=2), repeats)
    p2_short = p2(model, samples(16, length // 4, vocab, seed=2), repeats)  # where the loop is overhead-bound
    penalty_s = penalty_times(model, state, repeats=20)

    result = {
        "command": "python benchmarks/overhead.py" + (" --quick" if args.quick else ""),
        "model": {
            "type": "LlamaForCausalLM",
            "parameters": sum(p.numel() for p in model.parameters()),
            "sequence_length": length,
            "config": model.config.to_diff_dict(),
        },
        "torch_threads": torch.get_num_threads(),
        "P1": p1_results,
        "P2": p2_result,
        "P2_short_sequences": {"sequence_length": length // 4, **p2_short},
        "penalty_s": penalty_s,
        "targets": TARGETS,
        "wall_time_s": time.time() - started,
        "versions": versions(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "overhead_quick" if args.quick else "overhead"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
