"""`ewc_mode: clnp` through `hf-ewc train` (hf_ewc/pipeline/): old domains bit-identical under their units in the
matrix, the allocation through stages, `--resume` and `--from`, the diagnostics, the per-domain export
(`hf-ewc prune RUN --clnp-domain NAME`) and the refusals."""

import json
import shutil

import pytest
import torch
from testing_utils import make_config, run_cli, snapshot, write_domain, write_yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_ewc import HfEwcError
from hf_ewc.clnp import CLNP, CLNP_STATE_NAME, CLNPCallback
from hf_ewc.pipeline import Pipeline, build_run_config
from hf_ewc.pipeline.data import eval_collator


DOMAINS = ("animals", "tools", "colours")


def _config(tmp_path, domains=DOMAINS, **training) -> dict:
    settings = {"clnp_margin": 0.02, "clnp_l1": 0.01, "num_train_epochs": 3, "learning_rate": 1e-2, "seed": 5,
                **training}  # fmt: skip
    raw = make_config(tmp_path, domains=domains, ewc_mode="clnp", **settings)
    raw["model"]["config"].update(num_attention_heads=4, num_key_value_heads=2)  # 2 query heads per key/value head
    if len(domains) == 3:  # a domain's own CLNP settings hold for it
        raw["domains"][2]["training"] = {"clnp_margin": 0.03}
    return raw


@pytest.fixture(scope="module")
def clnp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clnp")
    raw = _config(tmp)
    results = Pipeline(build_run_config(raw), print_fn=None).run_sequence()
    return tmp, raw, results


def _loaded(run_dir):
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    return model, CLNP.load(model, run_dir / "ewc_state")


def _domains(raw, run_dir):
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    pipeline = Pipeline(build_run_config(raw), print_fn=None)
    return pipeline, {d.name: d for d in pipeline.load_domains(tokenizer)}, tokenizer


def test_old_domains_are_bit_identical_in_the_matrix_and_after_reloading(clnp_run):
    tmp, raw, results = clnp_run
    run_dir = tmp / "run"
    for key, matrix in results["matrix"].items():
        for j in range(len(DOMAINS)):  # from the row that learned domain j on, its cells never change
            assert all(matrix[i][j] == matrix[j][j] for i in range(j, len(DOMAINS))), (key, j)
    assert results["summary"]["bwt"] == 0.0
    # what the run left behind computes the same, each domain under its own units
    model, clnp = _loaded(run_dir)
    assert clnp.domains == list(DOMAINS) and clnp.head == "shared"
    pipeline, data, tokenizer = _domains(raw, run_dir)
    for j, name in enumerate(DOMAINS):
        with clnp.domain(name):
            assert pipeline.evaluate(model, data[name], tokenizer)["loss"] == results["matrix"]["loss"][-1][j]
    # without the domain id (every unit on) the first domain is not protected, and that is reported
    without = results["clnp"]["matrix_without_domain_id"]["loss"]
    assert without[0] == [None, None, None] and without[-1][2] is None
    plain = pipeline.evaluate(model, data["animals"], tokenizer)["loss"]
    assert plain == pytest.approx(without[-1][0], rel=1e-6)
    drop = results["clnp"]["drop_without_domain_id"]
    assert drop["animals"] == pytest.approx(plain - results["matrix"]["loss"][-1][0], rel=1e-6)  # positive: worse


def test_diagnostics_in_results_markdown_card_and_plot(clnp_run):
    tmp, _, results = clnp_run
    run_dir = tmp / "run"
    units = results["clnp"]["units"]
    assert [u["domain"] for u in units] == list(DOMAINS)
    _, clnp = _loaded(run_dir)
    for k, layer in enumerate(clnp.names):
        cells = [u["layers"][layer] for u in units]
        total = cells[0]["total"]
        # every unit is owned by one domain or free; what a domain took is what the saved owners say
        assert [c["active"] for c in cells] == [int((clnp.owners[k] == d).sum()) for d in range(len(DOMAINS))]
        for i, c in enumerate(cells):
            assert sum(x["active"] for x in cells[: i + 1]) + c["free"] == total
        assert cells[-1]["free"] == int((clnp.owners[k] < 0).sum())
    assert [u["margin"] for u in units] == [0.02, 0.02, 0.03] and clnp.seed == 5  # each domain's own settings
    for u in units:  # the margin: the units kept lose at most clnp_margin nats on the domain just learned
        assert u["loss_kept"] <= u["loss_unpruned"] + u["margin"] + 1e-9
    markdown = (run_dir / "results.md").read_text()
    assert "CLNP units" in markdown and "Without a domain id" in markdown
    first = units[0]["layers"][clnp.names[0]]
    assert f"| {clnp.names[0]} | {first['total']} | +{first['active']} · {first['free']} |" in markdown
    card = (run_dir / "README.md").read_text()
    assert "CLNP, continual learning by neural pruning" in card and "CLNP units" in card
    assert (run_dir / "units.png").stat().st_size > 5000
    assert (run_dir / "ewc_state" / CLNP_STATE_NAME).is_file()


def test_resume_between_domains_gives_the_same_run(clnp_run, tmp_path):
    _, raw, results = clnp_run
    raw = {**_config(tmp_path), "output_dir": str(tmp_path / "resumed")}
    progress = Pipeline(build_run_config(raw), print_fn=None).run_sequence(stop_after=0)
    assert len(progress["completed"]) == 1
    stage = next((tmp_path / "resumed" / "stages").iterdir())
    assert (stage / "ewc_state" / CLNP_STATE_NAME).is_file()  # the allocation travels with the stage
    resumed = Pipeline(build_run_config(raw), resume=True, print_fn=None).run_sequence()
    assert resumed["matrix"] == results["matrix"] and resumed["clnp"] == results["clnp"]


def test_from_continues_the_allocation_and_keeps_old_domains(clnp_run, capsys):
    tmp, raw, _ = clnp_run
    write_domain(tmp / "fruit.jsonl", ["apple", "pear", "plum", "fig", "lime", "kiwi", "melon", "grape"], 40, seed=7)
    follow = _config(tmp, domains=("fruit",))
    follow["output_dir"] = str(tmp / "next")
    rc, _, err = run_cli(["train", str(write_yaml(tmp / "next.yaml", follow)), "--from", str(tmp / "run")], capsys)
    assert rc == 0, err
    old_model, old = _loaded(tmp / "run")
    new_model, new = _loaded(tmp / "next")
    assert new.domains == [*DOMAINS, "fruit"]
    for before, after in zip(old.owners, new.owners):
        assert torch.equal(after[before >= 0], before[before >= 0])  # units of the old domains stay theirs
        assert set(after[before < 0].tolist()) <= {-1, 3}  # only "fruit" took units, and only free ones
    assert any(bool((after == 3).any()) for after in new.owners)
    pipeline, data, tokenizer = _domains(raw, tmp / "run")
    for name in DOMAINS:
        with old.domain(name), new.domain(name):
            assert pipeline.evaluate(new_model, data[name], tokenizer) == pipeline.evaluate(old_model, data[name],
                                                                                             tokenizer)  # fmt: skip
    # the same name twice, and a run without an allocation, are refused before anything is written
    again = write_yaml(tmp / "again.yaml", {**_config(tmp, domains=("tools",)), "output_dir": str(tmp / "again")})
    before = snapshot(tmp)
    rc, _, err = run_cli(["train", str(again), "--from", str(tmp / "run")], capsys)
    assert rc == 2 and "already owns units for domain(s) tools" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp) == before


def test_export_of_one_domain_is_smaller_and_computes_its_masked_logits(clnp_run, capsys):
    tmp, raw, _ = clnp_run
    model, clnp = _loaded(tmp / "run")
    _, data, tokenizer = _domains(raw, tmp / "run")
    for name in ("animals", "colours"):
        out = tmp / f"export-{name}"
        rc, stdout, err = run_cli(["prune", str(tmp / "run"), "--clnp-domain", name, "--out", str(out)], capsys)
        assert rc == 0, err
        assert "logits equal the run's under the domain's units" in stdout
        exported = AutoModelForCausalLM.from_pretrained(out)
        used = dict(zip(clnp.names, clnp.used_by(name)))
        ffn = max(int(u.sum()) for n, u in used.items() if not n.endswith(".heads"))
        assert exported.config.intermediate_size == max(ffn, 1) < model.config.intermediate_size
        heads = [u for n, u in used.items() if n.endswith(".heads")]
        per_group = max(1, max(int(u[g * 2 : g * 2 + 2].sum()) for u in heads for g in range(2)))
        assert exported.config.num_attention_heads == 2 * per_group
        assert exported.num_parameters() < model.num_parameters()
        batch = eval_collator("causal_lm", tokenizer)([data[name].eval[i] for i in range(len(data[name].eval))])
        batch.pop("labels")
        with torch.no_grad(), clnp.domain(name):
            expected = model.eval()(**batch).logits
        torch.testing.assert_close(exported.eval()(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        report = json.loads((out / "pruning_report.json").read_text())
        assert report["structured"]["domain"] == name and report["verification"]["max_logit_difference"] == 0.0
    # bad input: one line, exit code 2, nothing written
    before = snapshot(tmp)
    cases = [
        (["--clnp-domain", "fish"], "CLNP has no domain 'fish'; it has: animals, tools, colours"),
        (["--clnp-domain", "tools", "--sparsity", "0.5"], "--clnp-domain takes the units its domain uses"),
    ]
    for extra, message in cases:
        rc, _, err = run_cli(["prune", str(tmp / "run"), *extra, "--out", str(tmp / "bad")], capsys)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = run_cli(["prune", str(tmp / "run"), "--clnp-domain", "tools", "--out", str(tmp / "run"),
                          "--overwrite"], capsys)  # fmt: skip
    assert rc == 2 and "itself; write the result somewhere else" in err
    plain = tmp / "plain"
    plain.mkdir()
    rc, _, err = run_cli(["prune", str(plain), "--clnp-domain", "tools", "--out", str(tmp / "bad")], capsys)
    assert rc == 2 and "holds no CLNP allocation" in err
    shutil.rmtree(plain)
    assert snapshot(tmp) == before


def test_refusals_before_anything_runs(tmp_path, capsys):
    raw = _config(tmp_path)
    mixed = _config(tmp_path)
    mixed["domains"][1]["training"] = {"ewc_mode": "stabilized"}
    cases = [
        (mixed, "domains.1 (tools) uses ewc_mode: stabilized, the others clnp"),
        ({**raw, "peft": {"r": 2}}, "ewc_mode: clnp and peft: exclude each other"),
        ({**raw, "prune": {"sparsity": 0.5}}, "ewc_mode: clnp and prune: exclude each other"),
        ({**raw, "clnp_margin": -0.1}, "clnp_margin must be a finite number >= 0"),
    ]
    for config, message in cases:
        with pytest.raises(HfEwcError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_run_config(config)
    rc, _, err = run_cli(["sweep", str(write_yaml(tmp_path / "sweep.yaml", raw)), "--lambdas", "1,10"], capsys)
    assert rc == 2 and "ewc_mode: clnp does not have" in err
    head = write_yaml(tmp_path / "head.yaml", {**raw, "clnp_head": "per_domain"})
    before = snapshot(tmp_path)
    rc, _, err = run_cli(["train", str(head)], capsys)  # found once the model is built, before anything is written
    assert rc == 2 and "A transformer's output head is shared by its domains" in err
    assert snapshot(tmp_path) == before
    # --from a run that allocated no units
    plain = make_config(tmp_path, domains=("animals",), num_train_epochs=1, output_dir=str(tmp_path / "ewc"))
    assert run_cli(["train", str(write_yaml(tmp_path / "ewc.yaml", plain))], capsys)[0] == 0
    follow = {**_config(tmp_path, domains=("tools",)), "output_dir": str(tmp_path / "next")}
    follow = write_yaml(tmp_path / "n.yaml", follow)
    before = snapshot(tmp_path)
    rc, _, err = run_cli(["train", str(follow), "--from", str(tmp_path / "ewc")], capsys)
    assert rc == 2 and "continues a CLNP run's unit allocation, but that run has none" in err
    assert snapshot(tmp_path) == before


def test_the_naive_baseline_trains_its_own_first_domain(tmp_path):
    raw = {**_config(tmp_path, domains=("animals", "tools"), num_train_epochs=1), "baseline": "naive"}
    results = Pipeline(build_run_config(raw), print_fn=None).run_sequence()
    baseline = json.loads((tmp_path / "run" / "baseline" / "results.json").read_text())
    assert baseline["config"]["ewc_mode"] == "off" and "clnp" not in baseline
    # CLNP's first domain trains with its L1 and frees units afterwards: naive fine-tuning cannot share it
    assert baseline["matrix"]["loss"][0] != results["matrix"]["loss"][0]
    assert results["baseline"]["matrix"] == baseline["matrix"]["loss"]
    markdown = (tmp_path / "run" / "results.md").read_text()
    assert "CLNP (each domain evaluated under its own units: the domain known) removed" in markdown or (
        "nothing for CLNP to remove" in markdown
    )


def test_export_with_one_key_value_head_per_query_head(tmp_path, capsys):
    raw = _config(tmp_path, domains=("animals", "tools"))
    raw["model"]["config"].update(num_key_value_heads=4)  # multi-head attention: heads leave one by one
    results = Pipeline(build_run_config(raw), print_fn=None).run_sequence()
    _, clnp = _loaded(tmp_path / "run")
    rc, _, err = run_cli(["prune", str(tmp_path / "run"), "--clnp-domain", "animals", "--out", str(tmp_path / "a")],
                         capsys)  # fmt: skip
    assert rc == 0, err
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    heads = int(clnp.used_by("animals")[clnp.names.index("model.layers.0.self_attn.heads")].sum())
    kept = next(k for k in range(max(heads, 1), 5) if 16 % k == 0)  # a head count the config accepts (hidden 16)
    assert exported.config.num_attention_heads == exported.config.num_key_value_heads == kept
    pipeline, data, tokenizer = _domains(raw, tmp_path / "run")
    got = pipeline.evaluate(exported, data["animals"], tokenizer)["loss"]
    assert got == pytest.approx(results["matrix"]["loss"][-1][0], rel=1e-5)


def test_resume_inside_a_domain_gives_the_same_run(clnp_run, tmp_path, monkeypatch):
    _, _, results = clnp_run
    raw = {**_config(tmp_path), "output_dir": str(tmp_path / "cut")}

    def interrupt(self, args, state, control, **kwargs):
        if self.clnp.domains == ["animals"] and state.global_step == 7:
            raise KeyboardInterrupt  # a kill in the middle of the second domain (checkpoint-6 is on disk)

    monkeypatch.setattr(CLNPCallback, "on_step_end", interrupt, raising=False)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(build_run_config(raw), print_fn=None).run_sequence()
    checkpoint = tmp_path / "cut" / "domains" / "1-tools" / "checkpoint-6"
    assert (checkpoint / CLNP_STATE_NAME).is_file()  # the allocation of the domains before is in the checkpoint
    monkeypatch.undo()
    resumed = Pipeline(build_run_config(raw), resume=True, print_fn=None).run_sequence()
    assert resumed["domains_detail"][1]["train"]["resumed_from"] == "checkpoint-6"
    for a, b in zip(resumed["matrix"]["loss"], results["matrix"]["loss"]):
        assert a == pytest.approx(b, rel=1e-5)
    assert resumed["clnp"]["units"] == results["clnp"]["units"]
