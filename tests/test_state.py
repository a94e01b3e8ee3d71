import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file
from testing_utils import MLP, damaged_state, run_cli, snapshot, tiny_bert_classifier, tiny_gpt2

from hf_ewc import EWCState, HfEwcError, collect_importance
from hf_ewc.state import STATE_CONFIG_NAME, STATE_WEIGHTS_NAME
from hf_ewc.state_io import write_safetensors_streamed


def _ones_like(model, value=1.0):
    return {n: torch.full_like(p, value) for n, p in model.named_parameters() if p.requires_grad}


def _perturb(model, scale=0.1):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def test_consolidate_sum_adds_importances_and_moves_anchors():
    model = MLP()
    state = EWCState()
    assert state.is_empty and state.max_importance() == 0.0
    raw = {"method": "fisher", "estimator": "empirical", "num_samples": 5, "normalization": "none"}
    state.consolidate(model, _ones_like(model, 2.0), domain="a", **raw)
    first_anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.equal(state.anchors[n], first_anchor[n]) for n in first_anchor)
    _perturb(model)
    state.consolidate(model, _ones_like(model, 3.0), domain="b", **raw)
    assert all(bool((v == 5.0).all()) for v in state.importances.values())
    assert all(torch.equal(state.anchors[n], p.detach()) for n, p in model.named_parameters())
    assert [d["name"] for d in state.domains] == ["a", "b"] and state.num_consolidations == 2


def test_consolidate_online_decays():
    model = MLP()
    state = EWCState()
    state.consolidate(model, _ones_like(model, 2.0), mode="online", decay=0.5, normalization="none")
    state.consolidate(model, _ones_like(model, 3.0), mode="online", decay=0.5, normalization="none")
    assert all(torch.allclose(v, torch.full_like(v, 0.5 * 2.0 + 3.0)) for v in state.importances.values())
    assert state.consolidation == "online" and state.decay == 0.5


def test_memory_stays_two_p_whatever_the_number_of_domains():
    model = MLP()
    p = sum(t.numel() for t in model.parameters())
    state = EWCState()
    sizes = []
    for _ in range(5):
        state.consolidate(model, _ones_like(model))
        sizes.append(state.nbytes)
        _perturb(model)
    assert sizes == [2 * p * 4] * 5
    half = EWCState(dtype="bfloat16").consolidate(model, _ones_like(model))
    assert half.nbytes == 2 * p * 2


def test_save_load_validate_round_trip(tmp_path):
    model = tiny_gpt2()
    importances = collect_importance(model, _lm(), show_progress=False)
    state = EWCState().consolidate(model, importances, domain="prose", method="fisher", estimator="empirical")
    state.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [STATE_CONFIG_NAME, STATE_WEIGHTS_NAME]  # no temporary files left
    loaded = EWCState.load(tmp_path)
    assert loaded.validate(model) == []
    assert set(loaded.importances) == set(importances)
    for name in importances:
        assert torch.equal(loaded.importances[name], state.importances[name])
        assert torch.equal(loaded.anchors[name], state.anchors[name])
    assert loaded.domains == state.domains and loaded.consolidation == "sum"
    meta = json.loads((tmp_path / STATE_CONFIG_NAME).read_text())
    assert list(meta) == sorted(meta)
    assert meta["domains"][0]["method"] == "fisher" and meta["domains"][0]["estimator"] == "empirical"
    assert "lambda" in meta["lambda_convention"] and meta["versions"]["hf_ewc"]
    assert meta["num_parameters"] == sum(p.numel() for p in model.parameters())


def _lm():
    from testing_utils import lm_samples

    return lm_samples(4)


def test_storage_dtype_round_trip(tmp_path):
    model = MLP()
    state = EWCState(dtype="bfloat16").consolidate(model, _ones_like(model, 0.25))
    state.save(tmp_path)
    loaded = EWCState.load(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for v in loaded.anchors.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_streamed_writer_of_sharded_states_writes_the_file_safetensors_writes(tmp_path, dtype):
    """A sharded state is written header first, then one gathered tensor at a time: byte for byte what
    `safetensors.torch.save_file` writes for the same whole tensors (0-d and empty tensors included)."""
    g = torch.Generator().manual_seed(0)
    tensors = {"anchor.b.w": torch.randn(3, 4, generator=g), "importance.a": torch.rand(5, generator=g),
               "anchor.a": torch.tensor(2.5), "importance.b.w": torch.zeros(0, 4)}  # fmt: skip
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    metadata = {"hf_ewc": json.dumps({"format_version": 1})}
    gathered = []
    save_file(tensors, tmp_path / "reference.safetensors", metadata=metadata)
    write_safetensors_streamed(
        str(tmp_path / "streamed.safetensors"), tensors, metadata, lambda t: gathered.append(t) or t
    )
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert len(gathered) == len(tensors)  # each tensor made whole once, one at a time


def test_validate_names_missing_extra_and_mismatched_parameters():
    model = MLP()
    state = EWCState().consolidate(model, _ones_like(model))
    other = MLP(sizes=(6, 12, 10, 4))
    with pytest.raises(HfEwcError, match=r"'net\.0\.weight' has shape \(10, 6\) but the model's has \(12, 6\)"):
        state.validate(other)
    bert = tiny_bert_classifier()
    with pytest.raises(HfEwcError, match=r"protects 'net\.0\.weight', which the model does not have"):
        state.validate(bert)
    partial = EWCState(
        {"net.0.weight": state.importances["net.0.weight"]}, {"net.0.weight": state.anchors["net.0.weight"]}
    )
    with pytest.raises(HfEwcError, match=r"trainable parameter 'net\.0\.bias' is not in the EWC state"):
        partial.validate(model)
    assert "net.0.bias" in partial.validate(model, strict=False)


def test_consolidate_refuses_bad_importances():
    model = MLP()
    bad = _ones_like(model)
    bad["net.2.weight"][1, 1] = float("nan")
    with pytest.raises(HfEwcError, match=r"'net\.2\.weight' has 1 non-finite"):
        EWCState().consolidate(model, bad)
    negative = _ones_like(model, -1.0)
    with pytest.raises(HfEwcError, match="negative"):
        EWCState().consolidate(model, negative)
    missing = _ones_like(model)
    del missing["net.4.bias"]
    with pytest.raises(HfEwcError, match=r"No importance given for trainable parameter 'net\.4\.bias'"):
        EWCState().consolidate(model, missing)
    extra = {**_ones_like(model), "head.weight": torch.ones(2)}
    with pytest.raises(HfEwcError, match="'head.weight', which is not a trainable parameter"):
        EWCState().consolidate(model, extra)
    shaped = {**_ones_like(model), "net.0.bias": torch.ones(3)}
    with pytest.raises(HfEwcError, match=r"'net\.0\.bias' has shape \(3,\)"):
        EWCState().consolidate(model, shaped)
    with pytest.raises(HfEwcError, match="choose one of: sum, online"):
        EWCState().consolidate(model, _ones_like(model), mode="average")
    with pytest.raises(HfEwcError, match="only applies to mode='online'"):
        EWCState().consolidate(model, _ones_like(model), decay=0.5)


def test_interrupted_save_keeps_the_previous_state(tmp_path, monkeypatch):
    model = MLP()
    state = EWCState().consolidate(model, _ones_like(model, 1.0), domain="a")
    state.save(tmp_path)
    before = (tmp_path / STATE_WEIGHTS_NAME).read_bytes()
    state.consolidate(model, _ones_like(model, 1.0), domain="b")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hf_ewc.state_io.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        state.save(tmp_path)
    assert (tmp_path / STATE_WEIGHTS_NAME).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [STATE_CONFIG_NAME, STATE_WEIGHTS_NAME]
    assert [d["name"] for d in EWCState.load(tmp_path).domains] == ["a"]


def test_stale_json_is_reported_and_the_safetensors_metadata_wins(tmp_path, hf_logs):
    model = MLP()
    EWCState().consolidate(model, _ones_like(model), domain="a").save(tmp_path)
    meta = json.loads((tmp_path / STATE_CONFIG_NAME).read_text())
    meta["state_id"] = "0" * 32
    meta["domains"][0]["name"] = "tampered"
    (tmp_path / STATE_CONFIG_NAME).write_text(json.dumps(meta))
    loaded = EWCState.load(tmp_path)
    assert loaded.domains[0]["name"] == "a"
    assert any("does not match" in r.getMessage() for r in hf_logs)


def test_load_errors(tmp_path):
    with pytest.raises(HfEwcError, match="No EWC state at"):
        EWCState.load(tmp_path)
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(tmp_path / STATE_WEIGHTS_NAME))
    with pytest.raises(HfEwcError, match="without hf_ewc metadata"):
        EWCState.load(tmp_path)
    (tmp_path / STATE_WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(HfEwcError, match="Cannot read the EWC state"):
        EWCState.load(tmp_path)


def test_state_copies_what_it_is_given():
    model = MLP()
    params = dict(model.named_parameters())
    importances = _ones_like(model)
    state = EWCState(importances, {n: p.detach() for n, p in params.items()})
    with torch.no_grad():
        params["net.0.weight"].add_(1.0)  # training moves the weights...
    importances["net.0.weight"].mul_(100)  # ...and the caller reuses its tensors
    assert not torch.equal(state.anchors["net.0.weight"], params["net.0.weight"].detach())
    assert bool((state.importances["net.0.weight"] == 1).all())
    consolidated = EWCState().consolidate(model, importances, normalization="none")
    importances["net.2.weight"].mul_(7)
    assert bool((consolidated.importances["net.2.weight"] == 1).all())


def test_float16_storage_is_refused():
    with pytest.raises(HfEwcError, match="choose one of: float32, bfloat16"):
        EWCState(dtype="float16")


def test_corrupt_metadata_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"importance.x": torch.ones(2), "anchor.x": torch.ones(2)}, str(tmp_path / STATE_WEIGHTS_NAME),
              metadata={"hf_ewc": "{not json"})  # fmt: skip
    with pytest.raises(HfEwcError, match="corrupt hf_ewc metadata"):
        EWCState.load(tmp_path)
    for meta in ('["a list"]', '{"format_version": "1"}'):  # JSON, but not the metadata of a state
        save_file({"importance.x": torch.ones(2), "anchor.x": torch.ones(2)}, str(tmp_path / STATE_WEIGHTS_NAME),
                  metadata={"hf_ewc": meta})  # fmt: skip
        with pytest.raises(HfEwcError, match="corrupt hf_ewc metadata .not a mapping with an integer format_version"):
            EWCState.load(tmp_path)


def test_mean_normalization_divides_each_domain_by_its_mean_and_records_it():
    model = MLP()
    params = dict(model.named_parameters())
    count = sum(p.numel() for p in params.values())
    first = {
        n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) for i, (n, p) in enumerate(params.items())
    }
    mean = sum(float(t.double().sum()) for t in first.values()) / count
    state = EWCState().consolidate(model, first, domain="a")  # the default
    for n, t in first.items():
        torch.testing.assert_close(state.importances[n], t / mean)
    assert state.domains[0]["normalization"] == "mean"
    assert state.domains[0]["normalization_divisor"] == pytest.approx(mean, rel=1e-12)
    assert sum(float(t.double().sum()) for t in state.importances.values()) / count == pytest.approx(1.0, rel=1e-6)
    # a second domain 1000× larger in raw scale enters with the same weight: Ω = Ω_1/mean_1 + Ω_2/mean_2
    second = {n: 1000 * t.flip(0) for n, t in first.items()}
    state.consolidate(model, second, domain="b")
    for n, t in first.items():
        torch.testing.assert_close(state.importances[n], t / mean + t.flip(0) / mean, rtol=1e-5, atol=1e-6)
    assert state.domains[1]["normalization_divisor"] == pytest.approx(1000 * mean, rel=1e-6)
    assert state.metadata["importance_normalization"] == "mean"


def test_normalization_conventions_are_not_mixed_and_old_states_say_theirs(tmp_path):
    model = MLP()
    state = EWCState().consolidate(model, _ones_like(model), domain="a")
    with pytest.raises(HfEwcError, match=r"holds importances with importance_normalization='mean'.*continue it with"):
        state.consolidate(model, _ones_like(model), domain="b", normalization="none")
    assert len(state.domains) == 1  # refused before anything changed
    # a state written before the normalization existed: raw importances, and it says so
    raw = EWCState().consolidate(model, _ones_like(model, 5.0), domain="old", normalization="none")
    raw.save(tmp_path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / STATE_WEIGHTS_NAME), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = json.loads(f.metadata()["hf_ewc"])
    del header["importance_normalization"]
    for domain in header["domains"]:
        del domain["normalization"], domain["normalization_divisor"]
    save_file(tensors, str(tmp_path / STATE_WEIGHTS_NAME), metadata={"hf_ewc": json.dumps(header)})
    (tmp_path / STATE_CONFIG_NAME).unlink()
    old = EWCState.load(tmp_path)
    assert old.normalization == "none" and old.metadata["importance_normalization"] == "none"
    with pytest.raises(HfEwcError, match="continue it with importance_normalization='none', or start a new state"):
        old.consolidate(model, _ones_like(model), domain="new")
    old.consolidate(model, _ones_like(model, 2.0), domain="new", normalization="none")
    assert all(bool((t == 7.0).all()) for t in old.importances.values())


def test_all_zero_importances_cannot_be_normalized():
    model = MLP()
    with pytest.raises(HfEwcError, match=r"importances of domain 'quiet' are all 0: there is nothing to normalize"):
        EWCState().consolidate(model, _ones_like(model, 0.0), domain="quiet")
    assert EWCState().consolidate(model, _ones_like(model, 0.0), normalization="none").max_importance() == 0.0


def _set(tensors, key, index, value):
    tensors[key][index] = value


DAMAGES = {
    "NaN importance": (lambda t: _set(t, "importance.net.0.weight", (0, 0), float("nan")), None,
                       r"the importance of 'net.0.weight' holds 1 NaN/Inf value\(s\)"),
    "Inf anchor": (lambda t: _set(t, "anchor.net.2.bias", 0, float("inf")), None,
                   r"the anchor of 'net.2.bias' holds 1 NaN/Inf value\(s\)"),
    "negative importance": (lambda t: _set(t, "importance.net.0.bias", 1, -0.5), None,
                            r"the importance of 'net.0.bias' holds negative values \(min -0.5\)"),
    "anchor missing": (lambda t: t.pop("anchor.net.0.bias"), None, "'net.0.bias' has an importance but no anchor"),
    "shapes differ": (lambda t: t.__setitem__("anchor.net.0.bias", torch.zeros(3)), None,
                      r"'net.0.bias': importance shape \(\d+,\), anchor shape \(3,\)"),
    "mixed dtypes": (lambda t: t.__setitem__("anchor.net.0.bias", t["anchor.net.0.bias"].bfloat16()), None,
                     "torch.bfloat16, torch.float32; a state holds float32 or bfloat16, one dtype"),
    "integer tensors": (lambda t: t.update({k: v.long() for k, v in t.items()}), None, "its tensors are torch.int64"),
    "tensor count": (None, lambda m: m.update(num_tensors=3), "metadata 'num_tensors' says 3, the file holds 6"),
    "parameter count": (None, lambda m: m.update(num_parameters=7), "metadata 'num_parameters' says 7"),
    "count of the wrong type": (None, lambda m: m.update(num_tensors="4"), r"metadata 'num_tensors' is '4' \(str\)"),
    "a bool for a count": (None, lambda m: m.update(num_tensors=True), "metadata 'num_tensors' is True"),
    "domains not a list": (None, lambda m: m.update(domains="a"), r"'domains' is 'a' \(str\), expected list"),
    "domain without name": (None, lambda m: m["domains"][0].pop("name"), r"metadata domains\[0\] is not a mapping"),
    "unknown normalization": (None, lambda m: m.update(importance_normalization="max"),
                              "metadata 'importance_normalization' is 'max', not one of mean, none"),
    "unknown consolidation": (None, lambda m: m.update(consolidation="avg"), "'consolidation' is 'avg'"),
    "decay out of range": (None, lambda m: m.update(decay=2.0), r"metadata 'decay' is 2.0, not in \(0, 1\]"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_state_is_refused_when_loaded_naming_the_file_and_the_fault(tmp_path, case):
    model = MLP()
    EWCState().consolidate(model, _ones_like(model), domain="a").save(tmp_path / "good")
    EWCState.load(tmp_path / "good")  # the undamaged copy loads
    edit_tensors, edit_meta, message = DAMAGES[case]
    bad = damaged_state(tmp_path / "good", tmp_path / "bad", edit_tensors, edit_meta)
    with pytest.raises(HfEwcError) as err:
        EWCState.load(bad)
    text = str(err.value)
    assert text.startswith(f"The EWC state {str(bad / STATE_WEIGHTS_NAME)!r} is damaged: "), text
    assert re.search(message, text), text
    assert "\n" not in text


@pytest.mark.parametrize("case", list(DAMAGES))
def test_hf_ewc_state_on_a_damaged_state_gives_one_line_exit_2_and_changes_nothing(tmp_path, capsys, case):
    model = MLP()
    EWCState().consolidate(model, _ones_like(model), domain="a").save(tmp_path / "good")
    edit_tensors, edit_meta, message = DAMAGES[case]
    bad = damaged_state(tmp_path / "good", tmp_path / "bad", edit_tensors, edit_meta)
    before = snapshot(tmp_path)
    rc, out, err = run_cli(["state", str(bad)], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and not out and len(lines) == 1, err
    assert lines[0].startswith("hf-ewc state: error: The EWC state ") and re.search(message, lines[0]), lines[0]
    assert snapshot(tmp_path) == before
