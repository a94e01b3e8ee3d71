"""`hf-ewc sweep` (hf_ewc/pipeline/sweep.py) end to end on a tiny sequence: artefacts, the rule, `best.yaml` run as
written (and equal to its cell: sharing the first domain changes nothing), `--resume`, bad input."""

import json

import pytest
import yaml
from testing_utils import make_config, run_cli, snapshot, write_yaml

from hf_ewc.pipeline.sweep import MethodSpec, parse_lambdas
from hf_ewc.trainer import EWCTrainer
from hf_ewc.utils import HfEwcError


LAMBDAS = "0.003,0.03,0.3"


@pytest.fixture
def config(tmp_path):
    # a learning rate and epochs at which naive fine-tuning forgets the first domain
    raw = make_config(tmp_path, learning_rate=1e-2, num_train_epochs=6)
    raw["output_dir"] = str(tmp_path / "sweep")
    raw["baseline"] = "naive"  # the sweep runs its own naive cell; best.yaml keeps the config's baseline
    return write_yaml(tmp_path / "run.yaml", raw)


def test_sweep_chooses_by_the_rule_and_best_yaml_reproduces_its_cell(tmp_path, config, capsys, monkeypatch):
    rc, out, err = run_cli(["sweep", str(config), "--lambdas", LAMBDAS, "--methods", "fisher,mas"], capsys)
    assert rc == 0, err
    sweep = tmp_path / "sweep"
    for name in ("sweep.json", "sweep.md", "frontier.png", "best.yaml", "sweep_config.json"):
        assert (sweep / name).is_file(), name
    report = json.loads((sweep / "sweep.json").read_text())
    naive, cells = report["naive"], report["cells"]
    assert naive["forgetting"] > 0 and naive["gain"] > 0
    assert [(c["method"], c["lam"]) for c in cells] == [
        (m, lam) for m in ("fisher", "mas") for lam in (0.003, 0.03, 0.3)
    ]
    # the rule, recomputed here: per method, the most forgetting removed among the λ keeping ≥ 90 % of the gain
    expected = {}
    for method in ("fisher", "mas"):
        eligible = [c for c in cells if c["method"] == method and c["gain"] / naive["gain"] >= 0.9]
        top = max(eligible, key=lambda c: 1 - c["forgetting"] / naive["forgetting"], default=None)
        expected[method] = None if top is None else top["lam"]
    assert {m: (c or {}).get("lam") for m, c in report["choice"]["per_method"].items()} == expected
    best = report["choice"]["overall"]
    assert best is not None and expected[best["method"]] == best["lam"]
    assert f"chosen: {best['method']}, λ = {best['lam']:g}" in out
    # stronger λ: less forgetting and less gain, for each method
    for method in ("fisher", "mas"):
        own = [c for c in cells if c["method"] == method]
        assert own[0]["forgetting"] > own[-1]["forgetting"] and own[0]["gain"] > own[-1]["gain"]
    # best.yaml runs as written, from another directory, and reproduces its cell of the sweep exactly
    text = (sweep / "best.yaml").read_text()
    assert text.startswith(f"# hf-ewc train {sweep / 'best.yaml'}")
    monkeypatch.chdir(tmp_path.parent)
    rc, _, err = run_cli(["train", str(sweep / "best.yaml")], capsys)
    assert rc == 0, err
    again = json.loads((sweep / "best" / "results.json").read_text())
    cell = next(c for c in cells if (c["method"], c["lam"]) == (best["method"], best["lam"]))
    flat = [v for row in again["matrix"]["loss"] for v in row]
    assert flat == pytest.approx([v for row in cell["matrix"] for v in row], rel=1e-6)
    assert yaml.safe_load(text)["ewc_lambda"] == best["lam"]
    # ... and its baseline is the sweep's naive cell, measured again
    assert yaml.safe_load(text)["baseline"] == "naive"
    flat = [v for row in again["baseline"]["matrix"] for v in row]
    assert flat == pytest.approx([v for row in naive["matrix"] for v in row], rel=1e-6)
    assert again["baseline"]["forgetting"] == pytest.approx(naive["forgetting"], rel=1e-6)
    assert not (sweep / "runs" / "naive" / "baseline").exists()  # no cell ran a baseline of its own


def test_resume_reuses_the_finished_runs_and_refuses_other_arguments(tmp_path, config, capsys, monkeypatch):
    argv = ["sweep", str(config), "--lambdas", "0.003,0.3", "--methods", "fisher"]
    assert run_cli(argv, capsys)[0] == 0
    first = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    monkeypatch.setattr(EWCTrainer, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    rc, _, err = run_cli([*argv, "--resume"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["cells"] == first["cells"]
    before = snapshot(tmp_path)
    rc, _, err = run_cli([*argv, "--resume", "--ewc_decay", "0.5", "--consolidation", "online"], capsys)
    assert rc == 2 and "holds a sweep of another config" in err
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and "already holds a sweep; pass --resume" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--lambdas", ""], "'' is not a number"),
        (["--lambdas", "1,-2"], "'-2' must be a finite number > 0"),
        (["--lambdas", "one"], "'one' is not a number"),
        (["--min-gain-kept", "0"], "--min-gain-kept must be in (0, 1]"),
        (["--min-gain-kept", "1.5"], "--min-gain-kept must be in (0, 1]"),
        (["--methods", "fisher,ewc"], "unknown method 'ewc'"),
        (["--methods", "mas/exact"], "only fisher and sqrt_fisher take an estimator"),
        (["--domains.1.data_files", "x.jsonl"], "data file 'x.jsonl' not found"),
        (["--domains", "[{name: a, data_files: x.jsonl}]"], "baseline: needs at least two domains"),
        (["--domains", "[{name: a, data_files: x.jsonl}]", "--baseline", "null"], "A sweep needs a sequence of at"),
    ],
)
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, config, capsys, extra, message):
    before = snapshot(tmp_path)
    rc, _, err = run_cli(["sweep", str(config), *extra], capsys)
    assert rc == 2 and message in err, err
    assert err.startswith("hf-ewc sweep: error: ") and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_a_directory_holding_something_else_is_refused(tmp_path, config, capsys):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "notes.txt").write_text("mine")
    rc, _, err = run_cli(["sweep", str(config), "--overwrite"], capsys)
    assert rc == 2 and "holds files a sweep did not write (notes.txt)" in err
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["notes.txt"]


def test_argument_parsers():
    assert parse_lambdas("10, 1,1,0.1") == [0.1, 1.0, 10.0]
    spec = MethodSpec.parse("proximal:fisher/sampled")
    assert (spec.mode, spec.method, spec.estimator, spec.label) == ("proximal", "fisher", "sampled", spec.label)
    assert spec.changes() == {"importance_method": "fisher", "fisher_estimator": "sampled", "ewc_mode": "proximal"}
    with pytest.raises(HfEwcError, match="unknown ewc_mode 'off'"):
        MethodSpec.parse("off:fisher")
