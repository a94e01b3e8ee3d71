import json
import math

import numpy as np
import pytest

from hf_ewc.metrics import (
    continual_metrics,
    format_matrix,
    format_summary,
    perplexity,
)
from hf_ewc.plots import _heatmap_size, _trajectories_size, plot_frontier, plot_matrix, plot_trajectories
from hf_ewc.utils import HfEwcError


ACC = [[0.9, 0.1, 0.2], [0.7, 0.8, 0.3], [0.6, 0.5, 0.85]]
ACC_INITIAL = [0.1, 0.15, 0.25]
# Domain 0's loss first improves after domain 1 (0.9 < 1.0) and only then rises, so its forgetting is measured from
# the best row (after 1), not from the diagonal.
LOSS = [[1.0, 3.0, 4.0], [0.9, 0.8, 3.5], [1.4, 1.1, 0.6]]
LOSS_INITIAL = [3.2, 3.4, 4.2]
DOMAINS = ["news", "code", "law"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_plain(value):
    """Plain Python numbers/lists/None all the way down, so `json.dumps` and equality checks behave."""
    if isinstance(value, dict):
        for item in value.values():
            _assert_plain(item)
    elif isinstance(value, list):
        for item in value:
            _assert_plain(item)
    else:
        assert value is None or type(value) is float, type(value)


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(20.0)) == pytest.approx(20.0)
    assert perplexity(1e6) == float("inf")


def test_accuracy_matrix_by_hand():
    out = continual_metrics(ACC, higher_is_better=True, initial=ACC_INITIAL)
    _assert_plain(out)
    json.dumps(out)
    # acc = (0.6 + 0.5 + 0.85) / 3 = 0.65
    assert out["acc"] == pytest.approx(0.65)
    # bwt = mean(R[2,0] − R[0,0], R[2,1] − R[1,1]) = mean(0.6 − 0.9, 0.5 − 0.8) = −0.3
    assert out["bwt"] == pytest.approx(-0.3)
    # fwt = mean(R[0,1] − init[1], R[1,2] − init[2]) = mean(0.1 − 0.15, 0.3 − 0.25) = 0.0
    assert out["fwt"] == pytest.approx(0.0, abs=1e-12)
    # forgetting[0] = max(0.9, 0.7) − 0.6 = 0.3; forgetting[1] = 0.8 − 0.5 = 0.3; the last domain has none
    assert out["forgetting"][:2] == pytest.approx([0.3, 0.3])
    assert out["forgetting"][2] is None
    assert out["avg_forgetting"] == pytest.approx(0.3)
    # learned = [0.9 − init[0], 0.8 − R[0,1], 0.85 − R[1,2]] = [0.8, 0.7, 0.55]
    assert out["learned"] == pytest.approx([0.8, 0.7, 0.55])


def test_loss_matrix_by_hand_sign_conventions():
    out = continual_metrics(LOSS, higher_is_better=False, initial=LOSS_INITIAL)
    _assert_plain(out)
    # acc is the mean final loss, not sign-flipped: (1.4 + 1.1 + 0.6) / 3
    assert out["acc"] == pytest.approx(3.1 / 3)
    # score s = −loss. bwt = mean(L[0,0] − L[2,0], L[1,1] − L[2,1]) = mean(1.0 − 1.4, 0.8 − 1.1) = −0.35:
    # the old domains' losses rose, which reads as negative transfer
    assert out["bwt"] == pytest.approx(-0.35)
    # fwt = mean(init[1] − L[0,1], init[2] − L[1,2]) = mean(3.4 − 3.0, 4.2 − 3.5) = 0.55 (losses fell before training)
    assert out["fwt"] == pytest.approx(0.55)
    # forgetting[0] = max(−1.0, −0.9) − (−1.4) = 0.5 (from the best row, after domain 1, not the diagonal's 0.4);
    # forgetting[1] = −0.8 − (−1.1) = 0.3; both positive because the old-domain loss rose
    assert out["forgetting"][:2] == pytest.approx([0.5, 0.3])
    assert out["forgetting"][2] is None
    assert out["avg_forgetting"] == pytest.approx(0.4)
    # learned = [init[0] − L[0,0], L[0,1] − L[1,1], L[1,2] − L[2,2]] = [2.2, 2.2, 2.9]: losses fell, so positive
    assert out["learned"] == pytest.approx([2.2, 2.2, 2.9])


def test_loss_is_negated_accuracy():
    as_loss = continual_metrics(np.array(LOSS), higher_is_better=False, initial=np.array(LOSS_INITIAL))
    as_score = continual_metrics(-np.array(LOSS), higher_is_better=True, initial=-np.array(LOSS_INITIAL))
    assert as_loss["acc"] == pytest.approx(-as_score["acc"])
    for key in ("bwt", "fwt", "avg_forgetting"):
        assert as_loss[key] == pytest.approx(as_score[key])
    assert as_loss["forgetting"][:2] == pytest.approx(as_score["forgetting"][:2])
    assert as_loss["learned"] == pytest.approx(as_score["learned"])


def test_forgetting_negative_when_final_model_is_best():
    out = continual_metrics([[0.5, 0.0], [0.7, 0.9]], higher_is_better=True)
    # 0.5 − 0.7: the second domain helped the first
    assert out["forgetting"] == [pytest.approx(-0.2), None]
    assert out["bwt"] == pytest.approx(0.2)
    assert out["fwt"] is None
    assert out["learned"] == [None, pytest.approx(0.9)]


def test_single_domain():
    out = continual_metrics([[0.7]], higher_is_better=True)
    assert out == {
        "acc": pytest.approx(0.7),
        "bwt": None,
        "fwt": None,
        "forgetting": [None],
        "avg_forgetting": None,
        "learned": [None],
    }
    out = continual_metrics(np.array([[2.0]]), higher_is_better=False, initial=[5.0])
    assert out["acc"] == 2.0
    assert out["fwt"] is None
    assert out["learned"] == [3.0]


@pytest.mark.parametrize(
    ("matrix", "match"),
    [
        ([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], r"T×T"),
        ([], r"T×T"),
        ([[]], r"T×T"),
        ([1.0, 2.0], r"T×T"),
        (np.zeros((2, 2, 2)), r"T×T"),
        ([[1.0, 2.0], [3.0]], r"square table"),
        ([["a", "b"], ["c", "d"]], r"square table"),
        ([[0.1, 0.2, 0.3], [0.4, 0.5, float("nan")], [0.7, 0.8, 0.9]], r"\(after 1, on 2\) is nan"),
        ([[0.1, float("inf")], [0.3, 0.4]], r"\(after 0, on 1\) is inf"),
    ],
)
def test_bad_matrix(matrix, match):
    with pytest.raises(HfEwcError, match=match):
        continual_metrics(matrix, higher_is_better=True)


def test_bad_initial():
    with pytest.raises(HfEwcError, match=r"one number per domain \(3\)"):
        continual_metrics(ACC, higher_is_better=True, initial=[0.1, 0.2])
    with pytest.raises(HfEwcError, match=r"\(initial, on 1\) is nan"):
        continual_metrics(ACC, higher_is_better=True, initial=[0.1, float("nan"), 0.2])


def test_format_matrix_plain_is_aligned():
    text = format_matrix(ACC, DOMAINS, metric="accuracy", initial=ACC_INITIAL)
    lines = text.splitlines()
    assert [line.split()[0] for line in lines] == ["accuracy", "initial", "after", "after", "after"]
    assert lines[2].split() == ["after", "news", "0.900", "0.100", "0.200"]
    assert len({len(line) for line in lines}) == 1
    assert not text.endswith("\n")


def test_format_matrix_markdown_shape():
    text = format_matrix(LOSS, DOMAINS, metric="loss", markdown=True, digits=2)
    lines = text.splitlines()
    assert len(lines) == 2 + 3  # header, rule, one row per domain
    assert all(line.startswith("| ") and line.endswith(" |") and line.count("|") == 3 + 2 for line in lines)
    assert lines[1] == "| --- | ---: | ---: | ---: |"
    assert lines[4] == "| after law | 1.40 | 1.10 | 0.60 |"
    with_initial = format_matrix(LOSS, ["a|b", "c", "d"], metric="loss", initial=LOSS_INITIAL, markdown=True)
    lines = with_initial.splitlines()
    assert len(lines) == 2 + 1 + 3
    assert lines[2].startswith("| initial | 3.200 |")
    assert "after a\\|b" in lines[3]


def test_format_matrix_bad_input():
    with pytest.raises(HfEwcError, match="2 domain names for a 3×3"):
        format_matrix(ACC, ["a", "b"], metric="accuracy")
    with pytest.raises(HfEwcError, match=r"after 2 'law', on 0 'news'\) is nan"):
        format_matrix([[1, 2, 3], [4, 5, 6], [float("nan"), 8, 9]], DOMAINS, metric="loss")
    with pytest.raises(HfEwcError, match="digits"):
        format_matrix(ACC, DOMAINS, metric="accuracy", digits=-1)


def test_format_summary():
    out = continual_metrics(ACC, higher_is_better=True)
    text = format_summary(out, DOMAINS, metric="accuracy")
    lines = text.splitlines()
    assert lines[1].split() == ["ACC", "(mean", "final", "accuracy)", "0.650"]
    assert lines[2].split() == ["BWT", "(backward", "transfer)", "-0.300"]
    assert lines[3].split() == ["FWT", "(forward", "transfer)", "–"]
    assert lines[4].split() == ["avg", "forgetting", "0.300"]
    assert len({len(line) for line in lines[:5]}) == 1
    law = next(line for line in text.splitlines() if line.startswith("law"))
    assert law.split() == ["law", "–", "+0.550"]
    news = next(line for line in text.splitlines() if line.startswith("news"))
    assert news.split() == ["news", "0.300", "–"]

    md = format_summary(out, DOMAINS, metric="accuracy", markdown=True)
    tables = [block.splitlines() for block in md.split("\n\n") if block.startswith("|")]
    assert [len(t) for t in tables] == [2 + 4, 2 + 3]
    assert all(line.count("|") == 3 for line in tables[0])
    assert all(line.count("|") == 4 for line in tables[1])
    with pytest.raises(HfEwcError, match="2 domains"):
        format_summary(out, ["a", "b"], metric="accuracy")
    with pytest.raises(HfEwcError, match="lacks bwt"):
        format_summary({k: v for k, v in out.items() if k != "bwt"}, DOMAINS, metric="accuracy")


def _read_png(path, expected_size):
    image = pytest.importorskip("matplotlib.image")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    pixels = image.imread(path)
    width, height = expected_size
    # Constrained layout keeps the canvas at figsize × dpi (no tight bbox cropping), so the aspect is known.
    assert pixels.shape[:2] == (round(height * 110), round(width * 110))
    assert pixels.shape[2] in (3, 4)
    # Something was drawn: not a blank canvas.
    assert pixels[..., :3].std() > 0.05
    return pixels


def test_plot_matrix(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plots" / "loss.png"
    plot_matrix(LOSS, DOMAINS, path, metric="loss", higher_is_better=False)
    _read_png(path, _heatmap_size(3))
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]

    big = tmp_path / "acc.png"
    names = [f"domain number {k}" for k in range(12)]
    plot_matrix(np.random.default_rng(0).random((12, 12)), names, big, metric="accuracy", higher_is_better=True)
    pixels = _read_png(big, _heatmap_size(12))
    assert pixels.shape[1] > 110 * _heatmap_size(3)[0]
    assert 0.8 < pixels.shape[1] / pixels.shape[0] < 1.6


def test_plot_failure_leaves_no_file(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "acc.png"
    path.write_bytes(b"old")
    with pytest.raises(HfEwcError):
        plot_matrix([[0.1, float("nan")], [0.3, 0.4]], ["a", "b"], path, metric="accuracy", higher_is_better=True)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["acc.png"]


def test_plot_trajectories(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "trajectories.png"
    plot_trajectories(ACC, DOMAINS, path, metric="accuracy", initial=ACC_INITIAL, title="three domains")
    pixels = _read_png(path, _trajectories_size(4))
    assert pixels.shape[1] > pixels.shape[0]
    plot_trajectories(LOSS, DOMAINS, path, metric="loss")
    _read_png(path, _trajectories_size(3))
    assert [p.name for p in tmp_path.iterdir()] == ["trajectories.png"]


def test_plot_frontier(tmp_path):
    path = tmp_path / "frontier.png"
    curves = {"fisher": [(1.0, 0.95, 0.3), (10.0, 0.8, 0.6)], "mas": [(1.0, 0.97, 0.2), (10.0, 0.9, 0.5)]}
    plot_frontier(curves, path, min_gain_kept=0.9, best=("mas", 10.0), title="sweep")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    plot_frontier({}, tmp_path / "empty.png", min_gain_kept=0.9)  # naive did not forget: no point to draw
    assert (tmp_path / "empty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
