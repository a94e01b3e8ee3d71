"""Two real CPU processes (gloo) under `accelerate launch` against one process on the same samples.

- importances: sharded, reduced, counted exactly (uneven shards, no padded duplicates) — equal to 1 process;
- training with SI and the stabilized penalty: the same on both ranks, equal to 1 process at the same global batch;
  the penalty is neither multiplied nor divided by the world size;
- `hf-ewc train`: every file under output_dir is written by the main process only (rank 1 writes its own RNG state
  into checkpoints, as the Trainer does), and the results equal a 1-process run (EWC, and CLNP's allocation);
- `general_eval:` scored on the main process, received by every rank (equal to 1 process), its errors on every rank;
- FSDP2 (a model sharded at load time, DTensor parameters): `EWCTrainer` with the penalty or the proximal step on
  each process's slices equals 1 process and holds half the state per process; collection, consolidation, SI and the
  other modes are refused;
- a launch whose processes each believe they are alone is refused before anything is written.
"""

import json
from pathlib import Path

import pytest
import torch
from mp_worker import (
    BY_PROCESS,
    SHARDED_CASES,
    collect_all,
    collect_sharded,
    prepare_sft,
    train_sequence,
    train_sft,
    train_sharded,
    train_si_family,
)
from safetensors.torch import load_file
from testing_utils import (
    assert_tensors_close,
    failure,
    launch,
    lm_samples,
    make_config,
    run_cli,
    tiny_llama,
    write_yaml,
)

from hf_ewc import EWCState, collect_importance


pytestmark = pytest.mark.multiprocess
WORKER = Path(__file__).resolve().parent / "mp_worker.py"


def ranks(out: Path) -> list[tuple[dict[str, torch.Tensor], dict]]:
    return [(load_file(out / f"rank{r}.safetensors"), json.loads((out / f"rank{r}.json").read_text())) for r in (0, 1)]


def assert_close_to(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float) -> float:
    """``max|Δ| ≤ rel · max|want|`` per tensor (tensors that are 0 up to rounding, like BERT's key bias whose Fisher
    is exactly 0 in theory, compared absolutely); returns the largest relative difference seen."""
    return assert_tensors_close(got, want, atol=rel, relative_to="tensor")


def test_importances_of_two_processes_equal_one_process(tmp_path):
    done = launch(str(WORKER), "importances", str(tmp_path))
    assert done.returncode == 0, failure(done)
    (r0, info0), (r1, info1) = ranks(tmp_path)
    assert info0["world"] == info1["world"] == 2 and {info0["rank"], info1["rank"]} == {0, 1}
    # after the reduction both ranks hold the same importances, counted over every sample exactly once
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    counts = {k: v for k, v in info0.items() if k not in ("world", "rank")}
    assert counts == {**dict.fromkeys(counts, 13), "gpt2_loader_fisher": 11}
    one, one_counts = collect_all()
    assert one_counts == counts
    assert assert_close_to(r0, one, rel=1e-5) < 1e-5


def test_training_on_two_processes_equals_one_process_si_penalty_proximal(tmp_path):
    """2 ranks × batch 4 against 1 process × batch 8: the same samples in every optimizer step; stabilized penalty
    on the second domain, proximal step on the third, SI throughout."""
    done = launch(str(WORKER), "train", str(tmp_path), "4")
    assert done.returncode == 0, failure(done)
    (r0, logs0), (r1, logs1) = ranks(tmp_path)
    # DDP keeps the parameters identical, so SI's path integral is bit-identical on both ranks
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert all(logs0[d] == logs1[d] for d in ("a", "b", "c"))
    one, logs = train_sequence(str(tmp_path / "one"), 8)
    assert all(logs0[f"{d}/steps"] == logs[f"{d}/steps"] == 8 for d in ("a", "b", "c"))
    omegas = {k: v for k, v in one.items() if "/omega/" in k}
    assert sum(float(v.sum()) for v in omegas.values()) > 0
    assert_close_to({k: r0[k] for k in omegas}, omegas, rel=1e-3)
    params = {k: v for k, v in one.items() if k not in omegas}
    assert_close_to({k: r0[k] for k in params}, params, rel=1e-3)
    # the logged penalty of every step of the second domain: not scaled by the world size
    penalties = [log["ewc/penalty"] for log in logs0["b"]]
    assert max(penalties) > 0.1
    assert penalties == pytest.approx([log["ewc/penalty"] for log in logs["b"]], rel=1e-4, abs=1e-7)
    assert [log["loss"] for log in logs0["b"]] == pytest.approx([log["loss"] for log in logs["b"]], rel=1e-4)
    # the proximal domain (c): the pull happened on both ranks alike and as in one process (its logged quadratic)
    proximal = [log["ewc/penalty"] for log in logs0["c"]]
    assert max(proximal) > 0
    assert proximal == pytest.approx([log["ewc/penalty"] for log in logs["c"]], rel=1e-3, abs=1e-7)
    # the penalty gradient added to .grad on 2 ranks equals the penalty as a loss term through autograd in 1 process
    autograd, logs_autograd = train_sequence(str(tmp_path / "autograd"), 8, penalty_in_loss=True)
    assert_close_to({k: r0[k] for k in autograd}, autograd, rel=1e-3)
    assert penalties == pytest.approx([log["ewc/penalty"] for log in logs_autograd["b"]], rel=1e-3, abs=1e-7)


def test_independent_minibatch_gradient_on_two_processes_equals_one_process(tmp_path):
    """SIU and SOS(α=1): 2 ranks × batch 4 draw the same independent samples as 1 process × batch 8 (each rank its
    slice), and the gradient over them, normalised by the global token count and averaged, is the same."""
    done = launch(str(WORKER), "si_family", str(tmp_path), "4")
    assert done.returncode == 0, failure(done)
    (r0, _), (r1, _) = ranks(tmp_path)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    one, _ = train_si_family(str(tmp_path / "one"), 8)
    assert sum(float(v.sum()) for v in one.values()) > 0
    assert_close_to(r0, one, rel=1e-3)


def test_cli_on_two_processes_writes_once_and_equals_one_process(tmp_path, capsys):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    config = write_yaml(two / "run.yaml", make_config(two, per_device_train_batch_size=2, save_steps=3))
    done = launch(str(WORKER), "cli", str(two / "writes"), str(two / "run"), "--", "train", str(config))
    assert done.returncode == 0, failure(done)
    assert done.stdout.count("after tools, loss") == 1  # progress printed by the main process only

    writes = {r: json.loads((two / f"writes.{r}.json").read_text()) for r in (0, 1)}
    # rank 1 only saves its own RNG state into the Trainer's checkpoints (and makes sure the folder exists)
    assert writes[1], "the write log of rank 1 is empty: the tracing saw nothing"
    for event, path in writes[1]:
        assert (event == "os.mkdir" and Path(path).name.startswith("checkpoint-")) or (
            event == "torch.save" and Path(path).name == "rng_state_1.pth"
        ), (event, path)
    replaced = [path for event, path in writes[0] if event == "os.rename"]  # os.replace audits as os.rename
    assert replaced.count("results.json") == 1 and replaced.count("ewc_state/ewc_state.safetensors") == 1
    assert any(p.endswith("checkpoint-3/ewc_state.safetensors") for p in replaced)  # checkpoints carry the state

    rc, _, err = run_cli(["train", str(write_yaml(one / "run.yaml", make_config(one, per_device_train_batch_size=4)))],
                         capsys)  # fmt: skip
    assert rc == 0, err
    results = [json.loads((d / "run" / "results.json").read_text()) for d in (two, one)]
    assert [d["train"]["steps"] for d in results[0]["domains_detail"]] == [12, 12]
    assert [d["train"]["steps"] for d in results[1]["domains_detail"]] == [12, 12]
    for a, b in zip(results[0]["matrix"]["loss"], results[1]["matrix"]["loss"]):
        assert a == pytest.approx(b, rel=1e-4)
    states = [EWCState.load(d / "run") for d in (two, one)]
    assert states[0].domains[-1]["num_samples"] == states[1].domains[-1]["num_samples"] == 8
    assert_close_to(states[0].importances, states[1].importances, rel=1e-3)
    assert_close_to(states[0].anchors, states[1].anchors, rel=1e-3)


def test_clnp_run_on_two_processes_equals_one_process(tmp_path, capsys):
    """`ewc_mode: clnp` under DDP: the masked gradients, the consolidation (every rank on the same samples) and the
    evaluation under each domain's units give the 1-process run's allocation and matrix."""
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    clnp = {"ewc_mode": "clnp", "clnp_margin": 0.02, "clnp_l1": 0.01, "num_train_epochs": 3, "learning_rate": 1e-2}
    configs = {}
    for where, batch in ((two, 2), (one, 4)):
        raw = make_config(where, per_device_train_batch_size=batch, **clnp)
        raw["model"]["config"].update(num_attention_heads=4, num_key_value_heads=2)
        configs[where] = write_yaml(where / "run.yaml", raw)
    done = launch(str(WORKER), "cli", str(two / "writes"), str(two / "run"), "--", "train", str(configs[two]))
    assert done.returncode == 0, failure(done)
    rc, _, err = run_cli(["train", str(configs[one])], capsys)
    assert rc == 0, err
    results = [json.loads((d / "run" / "results.json").read_text()) for d in (two, one)]
    for a, b in zip(results[0]["matrix"]["loss"], results[1]["matrix"]["loss"]):
        assert a == pytest.approx(b, rel=1e-4)
    assert results[0]["matrix"]["loss"][1][0] == results[0]["matrix"]["loss"][0][0]  # old domain unchanged on 2
    layers = [[(c["active"], c["free"]) for c in u["layers"].values()] for r in results for u in r["clnp"]["units"]]
    assert layers[:2] == layers[2:] and any(a > 0 for a, _ in layers[0])
    owners = [load_file(d / "run" / "ewc_state" / "clnp_state.safetensors") for d in (two, one)]
    assert owners[0].keys() == owners[1].keys() and all(torch.equal(owners[0][k], owners[1][k]) for k in owners[0])


def test_fsdp2_refusals_name_what_does_not_work_shard_by_shard(tmp_path):
    """`fully_shard` on 2 CPU processes: code that needs whole parameters names the sharded one instead of pairing
    slices with whole names; the batch-size-1 loop engine, the SI variants with an independent gradient and a plain
    parameter next to the sharded ones are refused with what works instead."""
    done = launch(str(WORKER), "fsdp", str(tmp_path))
    assert done.returncode == 0, failure(done)
    (_, info0), (_, info1) = ranks(tmp_path)
    assert info0["together"] == "a NaN in rank 0's slice" and "failed on another process" in info1["together"]
    for _, info in ranks(tmp_path):
        assert "EWC over sharded parameters ('model.embed_tokens.weight' is a FSDP2 (DTensor) shard)" in info[
            "whole_parameters"]  # fmt: skip
        assert "per_sample='loop' differentiates whole parameters" in info["loop"]
        assert "siu needs an independent minibatch gradient" in info["siu"] and "DDP" in info["siu"]
        assert "'extra' is held whole (or replicated, HSDP) by several processes" in info["plain"]


def test_fsdp2_collection_equals_one_process_and_states_cross_world_sizes(tmp_path):
    """Every importance method on a tiny Llama and a tiny GPT-2 sharded with `fully_shard` over 2 gloo processes
    (sizes that do not split evenly): per-sample terms squared (or |·|) before the reduce-scatter, so the importances
    equal one process on the same samples (≤ 1e-5), the sampled Fisher included (sample i's labels drawn with
    (seed, i)); the batched Fisher, which depends on which samples share a minibatch, equals DDP's on the same 2
    processes. Rank 1 has a batch fewer and pads a pass to stay in step with FSDP's collectives. A state consolidated
    on the sharded model holds about 2·P/N per process (as DTensors), saves (gathered, streamed) to the file one
    process writes, and a 1-process state loads onto the sharded model as slices and consolidates a second domain
    as one process does."""
    two = tmp_path / "two"
    two.mkdir()
    one, info_one = collect_sharded(str(tmp_path), str(tmp_path / "whole_state"))
    done = launch(str(WORKER), "sharded_collect", str(two), str(tmp_path / "whole_state"))
    assert done.returncode == 0, failure(done)
    for tensors, info in ranks(two):
        for case in SHARDED_CASES:
            reference = tensors if case in BY_PROCESS else one
            want = {k.split("/", 2)[2]: v for k, v in reference.items() if k.startswith(f"whole/{case}/")}
            got = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"sharded/{case}/")}
            assert got.keys() == want.keys() and want, case
            assert_close_to(got, want, rel=1e-5)
            assert info[f"sharded/{case}"] == [info_one[f"whole/{case}"][0], "DTensor"], case
        assert info["state_sharded"] and info["loaded_sharded"] and not info_one["state_sharded"]
        assert info["state_bytes"] == info["loaded_bytes"] < 0.6 * info_one["state_bytes"]  # 2·P/N (+ uneven slices)
    assert sum(info["state_bytes"] for _, info in ranks(two)) == info_one["state_bytes"]  # the slices partition it
    assert any(float(t.abs().max()) > 0 for k, t in one.items() if k.startswith("whole/fisher_empirical/"))
    for saved, reference in (
        (two / "state", tmp_path / "whole_state"),
        (two / "state2", tmp_path / "whole_state" / "two"),
    ):
        got, want = EWCState.load(saved), EWCState.load(reference)
        assert [d["name"] for d in got.domains] == [d["name"] for d in want.domains] and got.nbytes == want.nbytes
        assert_close_to(got.importances, want.importances, rel=1e-5)
        assert all(torch.equal(got.anchors[n], want.anchors[n]) for n in want.anchors)


def test_launch_where_every_process_thinks_it_is_alone_is_refused(tmp_path):
    """On CPU without ACCELERATE_USE_CPU each process reports 1 process: stop before writing, with the fix."""
    config = write_yaml(tmp_path / "run.yaml", make_config(tmp_path))
    done = launch("-m", "hf_ewc", "train", str(config), cpu=False, cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("hf-ewc train: error: WORLD_SIZE=2 but accelerate sees a single process") == 2
    assert "ACCELERATE_USE_CPU=1" in done.stderr
    assert not (tmp_path / "run").exists()


def test_general_eval_on_two_processes_equals_one_process_and_errors_stop_every_rank(tmp_path, capsys):
    """The main process scores the model and every rank gets the scores (the rows equal a 1-process run's); when the
    harness cannot score it, every rank stops with the one-line error instead of waiting for the scores."""
    pytest.importorskip("lm_eval")
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    configs = {}
    for where, batch in ((two, 2), (one, 4)):
        raw = make_config(where, per_device_train_batch_size=batch)
        raw["model"]["config"]["max_position_embeddings"] = 512
        raw["general_eval"] = {"tasks": ["hf_ewc_prose_ppl"], "limit": 4}
        configs[where] = write_yaml(where / "run.yaml", raw)
    done = launch("-m", "hf_ewc", "train", str(configs[two]), cwd=two)
    assert done.returncode == 0, failure(done)
    assert done.stdout.count("after tools, general_eval: hf_ewc_prose_ppl/word_perplexity") == 1
    rc, _, err = run_cli(["train", str(configs[one])], capsys)
    assert rc == 0, err
    general = [json.loads((d / "run" / "results.json").read_text())["general_eval"] for d in (two, one)]
    assert general[0]["columns"] == general[1]["columns"]
    for a, b in zip([general[0]["initial"], *general[0]["rows"]], [general[1]["initial"], *general[1]["rows"]]):
        assert a == pytest.approx(b, rel=1e-4)

    short = make_config(tmp_path, output_dir=str(tmp_path / "short"))
    short["general_eval"] = {"tasks": ["hf_ewc_prose_cloze"], "limit": 4}  # 32 positions: the sentences do not fit
    done = launch("-m", "hf_ewc", "train", str(write_yaml(tmp_path / "short.yaml", short)), cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("hf-ewc train: error: general_eval: lm-eval could not score the model") == 2
    assert not (tmp_path / "short").exists()


@pytest.fixture(scope="module")
def sharded_start(tmp_path_factory):
    """A tiny Llama saved to disk, moved off the anchors of an EWC state collected on it by one process."""
    root = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    model = tiny_llama()
    importances = collect_importance(model, lm_samples(8), show_progress=False)
    EWCState().consolidate(model, importances, domain="a", normalization="none").save(root / "state")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "start")
    return root


@pytest.mark.parametrize(
    ("route", "mode", "batch"),
    [("load", "stabilized", "2"), ("load", "stabilized", "1x2"), ("load", "proximal", "2"),
     ("load", "stabilized+si+clip", "2"), ("load", "stabilized+fisher+sparse", "2"),
     ("accelerate", "vanilla+mas", "2")],
)  # fmt: skip
def test_fsdp2_training_and_consolidation_equal_one_process_and_hold_half_the_state(
    tmp_path, sharded_start, route, mode, batch
):
    """EWCTrainer on FSDP2 (DTensor parameters) on 2 gloo processes — a model sharded at load time by transformers
    (`DistributedConfig`), or by accelerate's FSDP2 plugin (told it may run on CPU, which accelerate itself allows
    on GPUs only): the penalty's gradient (or the proximal step) works on each process's slices, and 4 SGD steps end
    where one process ends with the same global batch; the logged penalty is the global one; each process holds half
    of the anchors and coefficients. ``1x2``: batches of 1 with 2 accumulation steps (FSDP's gradient sync deferred
    to the last micro-batch, the penalty added once). Then `trainer.consolidate()` on the sharded model — Fisher or
    MAS collected shard by shard, or SI's path integral accumulated on the slices of θ and of the reduce-scattered
    gradient — gives one process's Ω and θ* with half the state per process, and `save_model` writes the one file
    (gathered) that one process writes. ``sparse``: a pruned model's masks hold on each process's slices; ``clip``:
    gradient clipping (the norm over every process's slices, the penalty's gradient included, SI undoing it)."""
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    common = [str(sharded_start / "start"), str(sharded_start / "state")]
    done = launch(str(WORKER), "sharded", str(two), *common, batch, mode, "4", route)
    assert done.returncode == 0, failure(done)
    whole, info_one = train_sharded(str(one), *common, "4", mode, 4)
    for tensors, info in ranks(two):
        assert info["sharded"] == "DTensor" and info["fsdp_enabled"] == (route == "accelerate")
        assert_close_to(tensors, whole, rel=1e-5)
        assert info["bytes"] * 2 == info_one["bytes"]  # 2·P/N: each rank holds its slices only
        if mode != "proximal":
            assert info["penalties"] == pytest.approx(info_one["penalties"], rel=1e-5) and info["penalties"][0] > 0
        assert info["state_bytes"] * 2 == info_one["state_bytes"] and info["num_samples"] == info_one["num_samples"]
        if "clip" in mode:  # the norm of the whole gradient, over both processes' slices, and it did clip
            assert info["grad_norms"] == pytest.approx(info_one["grad_norms"], rel=1e-5)
            assert min(info["grad_norms"]) > 0.05
    assert any(k.startswith("importance/") for k in whole) and any(k.startswith("anchor/") for k in whole)
    if "sparse" in mode:
        weight = whole["param/model.layers.1.mlp.down_proj.weight"].flatten()
        assert bool((weight[::3] == 0).all()) and bool((weight[1::3] != 0).all())
    saved, want = EWCState.load(two / "final"), EWCState.load(one / "final")
    assert [d["name"] for d in saved.domains] == ["a", "b"] and saved.domains[-1]["method"] == want.domains[-1][
        "method"
    ]
    assert_close_to(saved.importances, want.importances, rel=1e-5)
    assert_close_to(saved.anchors, want.anchors, rel=1e-5)
    start = load_file(sharded_start / "start" / "model.safetensors")
    assert any(not torch.equal(whole[f"param/{n}"], t) for n, t in start.items())  # it did train
    plain, _ = train_sharded(str(tmp_path / "off"), *common, "4", "off", 4)  # and the penalty did change it
    assert max(float((whole[n] - plain[n]).abs().max() / plain[n].abs().max()) for n in plain) > 1e-3


@pytest.mark.parametrize(
    ("mode", "route", "message"),
    [("wva", "load", "ewc_mode='wva' is not supported on FSDP2-sharded parameters yet"),
     ("stabilized", "mixed", "'extra' is held whole (or replicated, HSDP) by several processes next to")],
)  # fmt: skip
def test_fsdp2_training_refuses_what_does_not_work_shard_by_shard(tmp_path, sharded_start, mode, route, message):
    done = launch(str(WORKER), "sharded", str(tmp_path), str(sharded_start / "start"), str(sharded_start / "state"),
                  "2", mode, "1", route)  # fmt: skip
    assert done.returncode != 0
    assert message in done.stderr


def test_trl_sft_with_ewc_on_two_processes_equals_one_process(tmp_path):
    """`with_ewc(SFTTrainer)` under DDP (2 gloo processes, batches of 2) ends where one process ends with batches of
    4: the penalty is neither multiplied nor divided by the world size in TRL's loss path (its `num_items_in_batch`
    scaling included), and the logged penalty is the same."""
    pytest.importorskip("trl")
    root = tmp_path / "start"
    prepare_sft(str(root))
    done = launch(str(WORKER), "sft", str(tmp_path), str(root), "2")
    assert done.returncode == 0, failure(done)
    whole, info_one = train_sft(str(tmp_path / "one"), str(root), 4)
    for tensors, info in ranks(tmp_path):
        assert_close_to(tensors, whole, rel=1e-5)
        assert info["penalties"] == pytest.approx(info_one["penalties"], rel=1e-5) and info["penalties"][0] > 0
