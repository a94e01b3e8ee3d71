"""The `general_eval:` block: general ability scored with lm-evaluation-harness before the first domain and after each
one — rows in results.json/results.md/card/plot, exact against an independent computation, invisible to training,
kept through resume, usable as the sweep's objective, and refused cleanly on bad input."""

import gzip
import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from testing_utils import make_config, run_cli, write_yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_ewc.pipeline import Pipeline, build_run_config, run_pipeline
from hf_ewc.pipeline.general_eval import SHIPPED_TASKS, GeneralEvaluator
from hf_ewc.pipeline.prepare import train_tokenizer
from hf_ewc.pipeline.sweep import MethodSpec, Sweep
from hf_ewc.utils import HfEwcError


pytest.importorskip("lm_eval")

CLOZE = "hf_ewc_prose_cloze"
LOCAL = "tiny_animals"
LOCAL_YAML = """task: tiny_animals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def local_task(tmp_path: Path) -> Path:
    """A harness task of our own, as a user writes one: a YAML and local data in a folder of its own."""
    folder = tmp_path / "my_tasks"
    folder.mkdir(exist_ok=True)
    texts = ["the cat saw the dog", "a horse and a cow", "the owl and the fox", "sheep goat duck hen"]
    data = folder / "animals.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    (folder / "tiny_animals.yaml").write_text(LOCAL_YAML.format(data=data), encoding="utf-8")
    return folder


def config(tmp_path: Path, **general) -> dict:
    raw = make_config(tmp_path)
    raw["model"]["config"]["max_position_embeddings"] = 512  # the shipped prose is longer than 32 tiny tokens
    raw["general_eval"] = {"tasks": [CLOZE, LOCAL], "limit": 8, "batch_size": 4,
                          "include_path": str(tmp_path / "my_tasks")}  # fmt: skip
    raw["general_eval"].update(general)
    local_task(tmp_path)
    return raw


def bits_per_byte(model, tokenizer, texts: list[str]) -> float:
    """The harness's rolling log-likelihood, written out: every token of each text from the BOS token on, summed and
    divided by the texts' UTF-8 bytes."""
    total, size = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = [tokenizer.bos_token_id, *tokenizer.encode(text)]
            logits = model(torch.tensor([ids])).logits.float()
            logp = torch.log_softmax(logits[0, :-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
            total += float(logp.sum())
            size += len(text.encode("utf-8"))
    return -total / size / math.log(2)


def cloze_scores(model, tokenizer, limit: int) -> tuple[float, float]:
    """The harness's multiple-choice accuracy and length-normalised accuracy on the first ``limit`` test items of the
    shipped cloze task, written out: log-likelihood of " " + each ending after the context (the ending's tokens are
    those the context's tokens leave of the whole), the argmax against the label."""
    with gzip.open(SHIPPED_TASKS / "prose_cloze.jsonl.gz", "rt", encoding="utf-8") as f:
        items = [r for r in map(json.loads, f) if r["split"] == "test"][:limit]
    right = right_norm = 0
    with torch.no_grad():
        for item in items:
            context = tokenizer.encode(item["context"])
            scores = []
            for choice in item["choices"]:
                ending = tokenizer.encode(item["context"] + " " + choice)[len(context) :]
                ids = context + ending
                logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
                scores.append(float(logp[len(context) - 1 :].gather(1, torch.tensor(ending)[:, None]).sum()))
            lengths = [len((" " + c).encode("utf-8")) for c in item["choices"]]
            right += int(max(range(4), key=lambda k: scores[k]) == item["label"])
            right_norm += int(max(range(4), key=lambda k: scores[k] / lengths[k]) == item["label"])
    return right / len(items), right_norm / len(items)


def test_rows_before_and_after_each_domain_in_results_markdown_card_and_plot(tmp_path):
    raw = config(tmp_path, include_path="my_tasks")  # relative: to the config's folder
    raw["baseline"] = "naive"
    source = write_yaml(tmp_path / "run.yaml", raw)
    results = run_pipeline(build_run_config(raw, source=str(source)), print_fn=None)
    general = results["general_eval"]
    out = Path(raw["output_dir"])
    assert general["labels"] == ["before", "after animals", "after tools"]
    assert len(general["rows"]) == len(raw["domains"])
    assert {f"{CLOZE}/acc", f"{CLOZE}/acc_norm", f"{LOCAL}/bits_per_byte"} <= set(general["columns"])
    assert general["higher_is_better"][f"{CLOZE}/acc"] and not general["higher_is_better"][f"{LOCAL}/bits_per_byte"]
    assert general["samples"] == {CLOZE: 8, LOCAL: 4}
    for row in [general["initial"], *general["rows"]]:
        assert 0 <= row[f"{CLOZE}/acc"] <= 1 and row[f"{LOCAL}/bits_per_byte"] > 0
    bpb = [r[f"{LOCAL}/bits_per_byte"] for r in [general["initial"], *general["rows"]]]
    assert len(set(bpb)) == 3  # every row scores the model as it stands then
    column = f"{LOCAL}/bits_per_byte"  # lower is better: forgetting = final − after the first domain
    assert general["forgetting_after_first"][column] == pytest.approx(bpb[2] - bpb[1])
    assert general["change"][column] == pytest.approx(bpb[2] - bpb[0])
    # the last row is the saved model's, computed independently
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    texts = [json.loads(line)["text"] for line in (tmp_path / "my_tasks" / "animals.jsonl").read_text().splitlines()]
    assert bpb[2] == pytest.approx(bits_per_byte(model, tokenizer, texts), rel=1e-5)
    acc, acc_norm = cloze_scores(model, tokenizer, 8)
    assert general["rows"][-1][f"{CLOZE}/acc"] == acc and general["rows"][-1][f"{CLOZE}/acc_norm"] == acc_norm
    # naive fine-tuning's rows alongside (its first row is the shared first domain's)
    assert general["baseline"]["rows"][0] == pytest.approx(general["rows"][0])
    assert set(general["baseline"]["forgetting_after_first"]) == set(general["columns"])
    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert "General ability (lm-evaluation-harness)" in markdown and "| after tools | " in markdown
    assert f"{LOCAL}/bits_per_byte" in (out / "README.md").read_text(encoding="utf-8")
    assert (out / "general.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["general_eval"]["rows"] == general["rows"]


def test_training_is_the_same_with_and_without_it_and_resume_keeps_the_rows(tmp_path):
    """lm-eval seeds the global random generators: they are restored, so the block changes no trained weight; a run
    stopped after its first domain and resumed gives the uninterrupted run's rows."""
    with_block = config(tmp_path, tasks=[LOCAL, CLOZE])  # not in alphabetical order
    with_block["importance_method"] = "fisher"
    with_block["fisher_estimator"] = "sampled"  # draws labels from the torch generator
    without = {k: v for k, v in with_block.items() if k != "general_eval"}
    without["output_dir"] = str(tmp_path / "plain")
    a = run_pipeline(build_run_config(with_block), print_fn=None)
    b = run_pipeline(build_run_config(without), print_fn=None)
    assert a["matrix"] == b["matrix"]
    resumed = dict(with_block, output_dir=str(tmp_path / "resumed"))
    Pipeline(build_run_config(resumed), print_fn=None).run_sequence(stop_after=0)
    c = Pipeline(build_run_config(resumed), resume=True, print_fn=None).run_sequence()
    assert a["general_eval"]["columns"][0] == f"{LOCAL}/bits_per_byte"  # the order of `tasks`
    for name in ("columns", "shown", "initial", "rows", "change", "forgetting_after_first", "labels"):
        assert c["general_eval"][name] == a["general_eval"][name], name
    tables = [(Path(r["config"]["output_dir"]) / "results.md").read_text() for r in (a, c)]
    assert tables[0] == tables[1] and tables[0].index(LOCAL) < tables[0].index(CLOZE)  # the same tables, in order


def test_evaluation_leaves_the_random_generators_as_it_found_them(tmp_path):
    """lm-eval seeds Python's, NumPy's and torch's generators: an evaluation between two draws changes neither."""
    raw = config(tmp_path, tasks=[LOCAL])
    run = build_run_config(raw)
    evaluator = GeneralEvaluator(run.general_eval, [tmp_path])
    tokenizer = train_tokenizer("causal_lm", iter(["the cat saw the dog"] * 4), 64)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw["model"]["config"], vocab_size=len(tokenizer)))
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    scores = evaluator.evaluate(model, tokenizer)
    assert scores["columns"] == [f"{LOCAL}/bits_per_byte"] and model.training  # the mode is restored too
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_sweep_minimises_general_forgetting(tmp_path):
    raw = config(tmp_path, tasks=[LOCAL], include_path="my_tasks")  # relative to the config
    raw["output_dir"] = str(tmp_path / "sweep")
    source = str(write_yaml(tmp_path / "run.yaml", raw))
    sweep = Sweep(raw, source=source, lambdas=[1.0], methods=[MethodSpec("fisher")], min_gain_kept=0.01,
                  objective="general", print_fn=lambda *a: None)  # fmt: skip
    report = sweep.run()
    for cell in [report["naive"], *report["cells"]]:
        results = json.loads((Path(cell["run"]) / "results.json").read_text())
        assert cell["forgetting"] == results["general_eval"]["forgetting_after_first"][f"{LOCAL}/bits_per_byte"]
        assert cell["forgetting_domains"] == -results["summary"]["bwt"]
    assert "general ability's tiny_animals/bits_per_byte" in (tmp_path / "sweep" / "sweep.md").read_text()
    if report["choice"]["overall"] is None:  # naive lost no general ability on this tiny sequence: write it anyway
        sweep._write_best({"method": "fisher", "lam": 1.0})
    best = yaml.safe_load((tmp_path / "sweep" / "best.yaml").read_text())  # runs from anywhere
    assert best["general_eval"]["include_path"] == [str((tmp_path / "my_tasks").resolve())]
    wrong = dict(raw, output_dir=str(tmp_path / "wrong"))  # a metric the task does not have: refused before a cell
    with pytest.raises(HfEwcError, match="not a general_eval score of this config; choose one of: tiny_animals/bits"):
        Sweep(wrong, source=source, lambdas=[1.0], methods=[MethodSpec("fisher")], min_gain_kept=0.5,
              objective=f"{LOCAL}/acc", print_fn=lambda *a: None).run()  # fmt: skip
    assert not (tmp_path / "wrong" / "sweep_config.json").exists() and not (tmp_path / "wrong" / "runs").exists()
    with pytest.raises(HfEwcError, match="no general_eval block"):
        Sweep({k: v for k, v in raw.items() if k != "general_eval"}, source=None, lambdas=[1.0],
              methods=[MethodSpec("fisher")], min_gain_kept=0.5, objective="general")  # fmt: skip
    with pytest.raises(HfEwcError, match="give domains, general, or a general_eval score as TASK/METRIC"):
        Sweep(raw, source=source, lambdas=[1.0], methods=[MethodSpec("fisher")], min_gain_kept=0.5,
              objective="acc")  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tasks": ["no_such_task_x"]}, "unknown task 'no_such_task_x'; looked in lm-eval's built-in tasks, hf_ewc's"),
        ({"tasks": ["hf_ewc_prose_clozee"]}, "did you mean hf_ewc_prose_cloze"),
        ({"include_path": "nowhere"}, "general_eval.include_path 'nowhere' is not a folder"),
        ({"limit": 0}, "general_eval.limit must be > 0"),
        ({"num_fewshot": -1}, "general_eval.num_fewshot must be >= 0"),
        ({"tasks": []}, "general_eval.tasks must be a non-empty list"),
        ({"max_length": 1}, "general_eval.max_length must be >= 2"),
        ({"batch_size": 0}, "general_eval.batch_size must be >= 1"),
    ],
)
def test_bad_blocks_are_refused_before_anything_is_written(tmp_path, capsys, change, message):
    raw = config(tmp_path, **change)
    path = write_yaml(tmp_path / "run.yaml", raw)
    rc, _, err = run_cli(["train", str(path)], capsys)
    assert rc == 2 and message in err and "Traceback" not in err
    assert not Path(raw["output_dir"]).exists()


def test_a_model_too_short_for_the_tasks_is_refused_before_anything_is_written(tmp_path, capsys):
    raw = config(tmp_path, tasks=[CLOZE])
    raw["model"]["config"]["max_position_embeddings"] = 16
    rc, _, err = run_cli(["train", str(write_yaml(tmp_path / "run.yaml", raw))], capsys)
    assert rc == 2 and "general_eval: lm-eval could not score the model" in err and "max_position_embeddings" in err
    assert not Path(raw["output_dir"]).exists()


def test_refused_without_lm_eval_with_the_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(HfEwcError, match=r"not installed; run: pip install 'hf-ewc\[lm-eval\]'"):
        build_run_config(config(tmp_path))


def test_refused_for_models_the_harness_does_not_score(tmp_path):
    raw = make_config(tmp_path, task="sequence_classification")
    raw["general_eval"] = {"tasks": [CLOZE]}
    with pytest.raises(HfEwcError, match="scores causal language models, and this run's task is sequence_class"):
        build_run_config(raw)


def test_the_shipped_tasks_are_held_out_from_the_training_corpora():
    """The prose the tasks score is from Python-docs pages the python_docs corpus did not draw from."""
    corpora = SHIPPED_TASKS.parent / "corpora"
    with gzip.open(corpora / "python_docs.jsonl.gz", "rt", encoding="utf-8") as f:
        used = {json.loads(line)["source"] for line in f}
    records = {}
    for name, size in (("prose_cloze.jsonl.gz", 240), ("prose_paragraphs.jsonl.gz", 120)):
        with gzip.open(SHIPPED_TASKS / name, "rt", encoding="utf-8") as f:
            records[name] = [json.loads(line) for line in f]
        assert len(records[name]) == size and not {r["source"] for r in records[name]} & used
    cloze = records["prose_cloze.jsonl.gz"]
    assert all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in cloze)
    assert {r["label"] for r in cloze} == {0, 1, 2, 3}


def test_fields_lists_the_block(capsys):
    rc, out, _ = run_cli(["train", "--fields"], capsys)
    assert rc == 0
    assert "general_eval (optional, lm-evaluation-harness): tasks, limit, num_fewshot, batch_size, include_path" in out
