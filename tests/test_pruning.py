"""The pruner: exact masks for every criterion and structure, physical removal equal to zeroing, export → reload
verified for BERT (MLM, classifier), GPT-2 and Llama, masks kept through training, bad arguments (hf_ewc/pruning/,
hf_ewc/sparsity.py). `hf-ewc prune` is tested in test_cli.py, the `prune:` block in test_pipeline.py."""

import copy
import json
from pathlib import Path

import pytest
import torch
from testing_utils import VOCAB, lm_samples, tiny_bert_classifier, tiny_bert_mlm, tiny_gpt2, tiny_llama
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hf_ewc import EWCState, collect_importance
from hf_ewc.pruning import (
    PruneReport,
    export_pruned,
    prune_model,
    select_targets,
)
from hf_ewc.utils import HfEwcError


def llama_mha() -> LlamaForCausalLM:
    return tiny_llama(num_attention_heads=4, num_key_value_heads=4)


BUILDERS = {
    "bert_mlm": (tiny_bert_mlm, AutoModelForMaskedLM),
    "bert_cls": (tiny_bert_classifier, AutoModelForSequenceClassification),
    "gpt2": (tiny_gpt2, AutoModelForCausalLM),
    "llama": (tiny_llama, AutoModelForCausalLM),
}
PROBE = {"input_ids": torch.tensor([[3, 7, 1, 9, 12, 5, 30, 2]]), "attention_mask": torch.ones(1, 8, dtype=torch.long)}


def logits(model, inputs=PROBE):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def zero_columns(model, names_and_cols):
    """Zero columns (dim 1 of a Linear weight / dim 0 of a Conv1D weight) in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, dim, index in names_and_cols:
            params[name].index_fill_(dim, torch.tensor(index), 0.0)


# ------------------------------------------------------------------------------------------------ exact masks
def test_global_unstructured_removes_exactly_the_smallest_magnitudes():
    model = tiny_llama()
    targets = select_targets(model)
    assert all(".layers." in n and n.endswith(".weight") for n in targets)
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in targets)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = prune_model(model, 0.6, show_progress=False)
    total = sum(p.numel() for p in targets.values())
    pruned = torch.cat([before[n][p == 0].abs() for n, p in targets.items()])
    kept = torch.cat([before[n][p != 0].abs() for n, p in targets.items()])
    assert pruned.numel() == round(0.6 * total)  # exact count, across tensors of different scales
    assert float(pruned.max()) <= float(kept.min())  # one global threshold
    assert report.global_sparsity == pytest.approx(round(0.6 * total) / total) and report.scope == "global"
    for name, p in model.named_parameters():  # everything else untouched, kept weights unchanged
        if name not in targets:
            assert torch.equal(p, before[name]), name
        else:
            assert torch.equal(p[p != 0], before[name][p != 0])
    per_tensor = {n: v["sparsity"] for n, v in report.layers.items()}
    assert len({round(v, 3) for v in per_tensor.values()}) > 1  # global: shares differ between tensors


def test_per_layer_scope_removes_the_same_share_from_every_tensor():
    model = tiny_gpt2()
    report = prune_model(model, 0.3, scope="per_layer", show_progress=False)
    params = dict(model.named_parameters())
    assert any("c_attn" in n for n in report.layers) and not any("wte" in n for n in report.layers)
    for name, info in report.layers.items():
        assert info["zeros"] == round(0.3 * params[name].numel()) == int((params[name] == 0).sum())


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_two_four_keeps_the_two_largest_of_every_four_inputs(build):
    model = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = prune_model(model, None, structure="2:4", show_progress=False)
    assert report.structure == "2:4" and report.target_sparsity == 0.5
    for name in report.layers:
        p, old = dict(model.named_parameters())[name], before[name]
        conv1d = "c_attn" in name or "c_fc" in name or "c_proj" in name
        w, o = (p.T, old.T) if conv1d else (p, old)  # rows = outputs, columns = inputs
        groups, old_groups = w.reshape(w.shape[0], -1, 4), o.reshape(o.shape[0], -1, 4).abs()
        assert torch.equal((groups == 0).sum(-1), torch.full(groups.shape[:2], 2))
        top2 = old_groups.topk(2, dim=-1).indices
        assert torch.equal(
            torch.sort(top2, -1).values, torch.sort((groups != 0).float().topk(2, -1).indices, -1).values
        )


def test_importance_criteria_rank_by_their_own_scores():
    model = tiny_llama()
    targets = select_targets(model)
    g = torch.Generator().manual_seed(1)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    theta = {n: p.detach().clone() for n, p in targets.items()}
    for criterion, score in (
        ("fisher", lambda n: fisher[n]),
        ("obd", lambda n: 0.5 * fisher[n] * theta[n] ** 2),
        ("magnitude", lambda n: theta[n].abs()),
    ):
        m = copy.deepcopy(model)
        prune_model(m, 0.5, criterion=criterion, importances=fisher if criterion != "magnitude" else None,
                    show_progress=False)  # fmt: skip
        params = dict(m.named_parameters())
        pruned = torch.cat([score(n)[params[n] == 0] for n in targets])
        kept = torch.cat([score(n)[params[n] != 0] for n in targets])
        assert float(pruned.max()) <= float(kept.min()), criterion
    masks = {}
    for criterion in ("fisher", "obd", "magnitude"):
        m = copy.deepcopy(model)
        prune_model(m, 0.5, criterion=criterion, importances=fisher, show_progress=False)
        masks[criterion] = torch.cat([(p != 0).flatten() for n, p in m.named_parameters() if n in targets])
    assert not torch.equal(masks["fisher"], masks["obd"]) and not torch.equal(masks["obd"], masks["magnitude"])


def test_importances_from_a_saved_state_are_used_without_recollecting(tmp_path, monkeypatch):
    model = tiny_llama()
    state = EWCState()
    state.consolidate(model, collect_importance(model, lm_samples(8), "fisher", show_progress=False), domain="a")
    state.save(tmp_path / "state")
    from hf_ewc.pruning import masks

    monkeypatch.setattr(masks, "collect_importance", lambda *a, **k: pytest.fail("recollected"))
    by_dir, by_state = copy.deepcopy(model), copy.deepcopy(model)
    report = prune_model(by_dir, 0.5, criterion="obd", importances=tmp_path / "state", show_progress=False)
    prune_model(by_state, 0.5, criterion="obd", importances=state.importances, show_progress=False)
    assert "1 domain" in report.importance_source
    for (n, a), (_, b) in zip(by_dir.named_parameters(), by_state.named_parameters()):
        assert torch.equal(a, b), n


def test_importances_collected_on_data_match_collect_importance():
    model = tiny_gpt2()
    data = lm_samples(8, seed=3)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    prune_model(a, 0.4, criterion="mas", data=data, collect_kwargs={"show_progress": False}, show_progress=False)
    mas = collect_importance(model, data, "mas", show_progress=False)
    prune_model(b, 0.4, criterion="mas", importances=mas, show_progress=False)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------------------------------------ structures
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert_mlm"])
def test_physical_ffn_removal_equals_zeroing_the_removed_neurons(name):
    build, _ = BUILDERS[name]
    model = build()
    reference = copy.deepcopy(model)
    report = prune_model(model, 0.25, structure="ffn", show_progress=False)
    assert report.removal == "physical" and report.num_parameters_after < report.num_parameters_before
    removed = report.structured["removed_indices"]
    width = report.structured["per_layer"]["width"]
    assert all(len(v) == round(0.25 * width) for v in removed.values())
    down = {"llama": "model.layers.{}.mlp.down_proj.weight", "gpt2": "transformer.h.{}.mlp.c_proj.weight",
            "bert_mlm": "bert.encoder.layer.{}.output.dense.weight"}[name]  # fmt: skip
    dim = 0 if name == "gpt2" else 1
    zero_columns(reference, [(down.format(i), dim, idx) for i, idx in removed.items()])
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    key = "n_inner" if name == "gpt2" else "intermediate_size"
    assert getattr(model.config, key) == width - round(0.25 * width)


@pytest.mark.parametrize("build", [tiny_llama, llama_mha], ids=["gqa", "mha"])
def test_physical_head_removal_equals_zeroing_the_heads_output(build):
    model = build()
    reference = copy.deepcopy(model)
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    head_dim = model.config.head_dim
    report = prune_model(model, 0.5, structure="heads", show_progress=False)
    assert report.removal == "physical"
    assert model.config.num_attention_heads == heads // 2 and model.config.head_dim == head_dim
    assert model.config.num_key_value_heads == (kv if kv < heads else heads // 2)
    cols = []
    for layer, dropped in report.structured["removed_heads"].items():
        assert len(dropped) == heads // 2
        index = [h * head_dim + d for h in dropped for d in range(head_dim)]
        cols.append((f"model.layers.{layer}.self_attn.o_proj.weight", 1, index))
    zero_columns(reference, cols)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_structures_with_the_lowest_summed_magnitude_go():
    """The score of an FFN neuron or a head is the sum of |θ| over its weights, computed here by hand."""
    model = tiny_llama()
    mlp = model.model.layers[1].mlp
    ffn = mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1) + mlp.down_proj.weight.abs().sum(0)
    report = prune_model(copy.deepcopy(model), 0.25, structure="ffn", show_progress=False)
    assert report.structured["removed_indices"]["1"] == sorted(ffn.argsort()[:8].tolist())

    gpt2 = tiny_gpt2()  # fused q/k/v in Conv1D [in, 3·hidden]: three slices per head, and the bias
    attn, d = gpt2.transformer.h[0].attn, 8
    w, b, o = attn.c_attn.weight.abs(), attn.c_attn.bias.abs(), attn.c_proj.weight.abs()
    heads = [sum(float(w[:, k * 16 + h * d : k * 16 + (h + 1) * d].sum() + b[k * 16 + h * d : k * 16 + (h + 1) * d]
                       .sum()) for k in range(3)) + float(o[h * d : (h + 1) * d].sum()) for h in range(2)]  # fmt: skip
    report = prune_model(gpt2, 0.5, structure="heads", show_progress=False)
    assert report.structured["removed_heads"]["0"] == [min(range(2), key=heads.__getitem__)]

    mha = llama_mha()  # 4 heads, each with its q/k/v rows and o columns
    attn, d = mha.model.layers[0].self_attn, 4
    rows = sum(getattr(attn, p).weight.abs().sum(1) for p in ("q_proj", "k_proj", "v_proj"))
    scores = rows.view(4, d).sum(1) + attn.o_proj.weight.abs().sum(0).view(4, d).sum(1)
    report = prune_model(mha, 0.5, structure="heads", show_progress=False)
    assert report.structured["removed_heads"]["0"] == sorted(scores.argsort()[:2].tolist())


@pytest.mark.parametrize("name", ["bert_mlm", "gpt2"])
def test_heads_are_zeroed_where_the_config_cannot_remove_them(name):
    build, _ = BUILDERS[name]
    model = build()
    reference = copy.deepcopy(model)
    report = prune_model(model, 0.5, structure="heads", show_progress=False)
    assert report.removal == "zeroed" and "cannot be removed" in report.structured["note"]
    assert report.num_parameters_after == report.num_parameters_before and report.masks
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    out = {"bert_mlm": ("bert.encoder.layer.{}.attention.output.dense.weight", 1),
           "gpt2": ("transformer.h.{}.attn.c_proj.weight", 0)}[name]  # fmt: skip
    cols = [(out[0].format(i), out[1], [h * head_dim + d for h in hs for d in range(head_dim)])
            for i, hs in report.structured["removed_heads"].items()]  # fmt: skip
    zero_columns(reference, cols)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)


def test_a_head_count_the_config_refuses_is_zeroed_and_exports(tmp_path):
    """3 of 4 heads do not divide hidden_size 16, which transformers' Llama config refuses on save: zeroed instead."""
    model = llama_mha()
    reference = copy.deepcopy(model)
    report = prune_model(model, 0.25, structure="heads", show_progress=False)
    assert report.removal == "zeroed" and "cannot hold 3 heads with hidden_size 16" in report.structured["note"]
    assert model.config.num_attention_heads == 4 and report.num_parameters_after == report.num_parameters_before
    cols = [(f"model.layers.{i}.self_attn.o_proj.weight", 1, [h * 4 + d for h in hs for d in range(4)])
            for i, hs in report.structured["removed_heads"].items()]  # fmt: skip
    assert all(len(hs) == 1 for hs in report.structured["removed_heads"].values())
    zero_columns(reference, cols)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    assert export_pruned(model, tmp_path / "out", report)["max_logit_difference"] == 0.0
    # Qwen3's config accepts 3 heads of head_dim 4 at hidden 16: there they leave the shapes
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, head_dim=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)  # fmt: skip
    qwen = Qwen3ForCausalLM(config)
    report = prune_model(qwen, 0.25, structure="heads", show_progress=False)
    assert report.removal == "physical" and qwen.config.num_attention_heads == 3
    assert export_pruned(qwen, tmp_path / "qwen", report)["max_logit_difference"] <= 1e-5


# ------------------------------------------------------------------------------------------------ export + reload
CASES = [
    ("unstructured", {"scope": "global"}),
    ("unstructured", {"scope": "per_layer"}),
    ("2:4", {}),
    ("ffn", {}),
    ("heads", {}),
]


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("structure,kwargs", CASES, ids=[f"{s}-{k.get('scope', '')}" for s, k in CASES])
def test_export_reloads_with_the_same_zeros_sparsity_and_logits(tmp_path, name, structure, kwargs):
    build, auto = BUILDERS[name]
    model = build()
    original_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    sparsity = None if structure == "2:4" else 0.5
    report = prune_model(model, sparsity, structure=structure, show_progress=False, **kwargs)
    verification = export_pruned(model, tmp_path / "out", report)
    assert verification["auto_class"] == auto.__name__
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors", "pruning_report.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    reloaded = auto.from_pretrained(out)
    ours, theirs = dict(model.named_parameters()), dict(reloaded.named_parameters())
    for n, p in ours.items():
        assert torch.equal(p == 0, theirs[n] == 0) and torch.equal(p, theirs[n]), n
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-6)
    config = json.loads((out / "config.json").read_text())
    sc = config["sparsity_config"]
    assert sc["format"] == "dense" and sc["criterion"] == "magnitude"
    zeros = sum(int((theirs[n] == 0).sum()) for n in report.layers)
    numel = sum(theirs[n].numel() for n in report.layers)
    assert sc["global_sparsity"] == pytest.approx(zeros / numel, abs=1e-6)
    assert set(sc["per_layer_sparsity"]) == set(report.layers)
    saved = json.loads((out / "pruning_report.json").read_text())
    assert saved["verification"]["max_logit_difference"] <= 1e-5
    assert PruneReport.load(out).layers == report.layers
    if structure == "ffn":  # smaller shapes, rebuilt from the saved config
        key = "n_inner" if name == "gpt2" else "intermediate_size"
        per_layer = report.structured["per_layer"]
        assert config[key] == per_layer["kept"] == per_layer["width"] // 2 and sc["removal"] == "physical"
        assert sc["pruned_share"] >= 0.5
        shrunk = [n for n in theirs if tuple(theirs[n].shape) != original_shapes[n]]
        assert shrunk and all(theirs[n].numel() < torch.Size(original_shapes[n]).numel() for n in shrunk)
    elif structure == "heads":  # half the heads; BERT's zero-initialised biases add exact zeros of their own
        assert sc["pruned_share"] >= 0.5
        if name == "llama":
            assert config["num_attention_heads"] == 1 and reloaded.num_parameters() < report.num_parameters_before
    else:
        assert sc["global_sparsity"] == pytest.approx(0.5, abs=0.02)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "hf-ewc" in card
    assert f"{auto.__name__}.from_pretrained" in card and "| parameter | shape |" in card


def test_export_refuses_an_existing_directory_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    model = tiny_llama()
    report = prune_model(model, 0.5, show_progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(HfEwcError, match="already exists"):
        export_pruned(model, tmp_path / "taken", report)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    from hf_ewc.pruning import export

    real = export.verify_export

    def corrupt(model_, directory, report_):  # a checkpoint whose weights changed on disk must fail loudly
        from safetensors.torch import load_file, save_file

        weights = load_file(Path(directory) / "model.safetensors")
        weights["model.layers.0.mlp.up_proj.weight"][0, 0] = 12.5
        save_file(weights, Path(directory) / "model.safetensors", metadata={"format": "pt"})
        return real(model_, directory, report_)

    monkeypatch.setattr(export, "verify_export", corrupt)
    with pytest.raises(HfEwcError, match="reload verification failed: .*up_proj"):
        export_pruned(model, tmp_path / "new", report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_push_to_hub_uploads_the_verified_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok=False):
            calls.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = tiny_gpt2()
    report = prune_model(model, 0.5, show_progress=False)
    result = export_pruned(model, tmp_path / "out", report, push_to_hub=True, repo_id="me/tiny-pruned")
    assert calls[0] == ("create", "me/tiny-pruned") and calls[1][1] == "me/tiny-pruned"
    assert "pruning_report.json" in calls[1][2] and result["pushed_to"] == "me/tiny-pruned"


def test_apply_to_state_zeroes_anchors_and_cuts_removed_rows():
    model = tiny_llama()
    state = EWCState()
    state.consolidate(model, collect_importance(model, lm_samples(8), "fisher", show_progress=False), domain="a")
    masked = copy.deepcopy(model)
    report = prune_model(masked, 0.5, criterion="fisher", importances=state, show_progress=False)
    s1 = report.apply_to_state(copy.deepcopy(state))
    for name, mask in report.masks.items():
        assert bool((s1.anchors[name][~mask] == 0).all())
        assert torch.equal(s1.anchors[name][mask], state.anchors[name][mask])
    shrunk = copy.deepcopy(model)
    report = prune_model(shrunk, 0.5, structure="ffn", criterion="obd", importances=state, show_progress=False)
    s2 = report.apply_to_state(copy.deepcopy(state))
    assert s2.validate(shrunk) == []  # shapes fit the smaller model
    params = dict(shrunk.named_parameters())
    for name in report.slices:
        assert torch.equal(s2.anchors[name], params[name].detach())  # the anchors are the kept weights


# ------------------------------------------------------------------------------------------------ bad input (API)
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
        (
            {"criterion": "taylor"},
            "Unknown criterion 'taylor'; choose one of: magnitude, fisher, mas, si, signal, obd",
        ),
        ({"structure": "blocks"}, "Unknown structure 'blocks'; choose one of: unstructured, N:M"),
        ({"criterion": "obd"}, "criterion 'obd' needs fisher importances"),
        ({"criterion": "si", "data": lm_samples(4)}, "SI is accumulated during training"),
        ({"structure": "2:4", "sparsity": 0.3}, "structure 2:4 has sparsity 0.5"),
        ({"structure": "ffn", "scope": "global"}, "use scope='per_layer'"),
        ({"scope": "layer"}, "Unknown scope 'layer'; choose one of: global, per_layer"),
        ({"include": ["nothing_matches"]}, "No parameter to prune"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = {"sparsity": 0.5, **kwargs}
    with pytest.raises(HfEwcError, match=message):
        prune_model(model, kwargs.pop("sparsity"), show_progress=False, **kwargs)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_missing_or_foreign_importances_are_named():
    model = tiny_llama()
    fisher = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    partial = {k: v for k, v in fisher.items() if "layers.1.mlp" not in k}
    with pytest.raises(HfEwcError, match=r"do not cover 3 parameter\(s\) to prune: model\.layers\.1\.mlp\.gate_proj"):
        prune_model(model, 0.5, criterion="fisher", importances=partial, show_progress=False)
    other = {n: torch.ones_like(p) for n, p in tiny_gpt2().named_parameters()}
    with pytest.raises(HfEwcError, match="from another model: parameter 'model.layers.0.self_attn.q_proj.weight'"):
        prune_model(model, 0.5, criterion="fisher", importances=other, show_progress=False)
    bigger = dict(fisher, **{"model.layers.0.mlp.up_proj.weight": torch.ones(64, 16)})
    with pytest.raises(HfEwcError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(64, 16\)"):
        prune_model(model, 0.5, criterion="fisher", importances=bigger, show_progress=False)
    state = EWCState()
    mas = collect_importance(model, lm_samples(4), "mas", show_progress=False)
    state.consolidate(model, mas, domain="a", method="mas")
    with pytest.raises(HfEwcError, match="needs fisher importances, but the EWC state .* holds mas"):
        prune_model(model, 0.5, criterion="obd", importances=state, show_progress=False)


def test_n_m_on_a_dimension_not_divisible_by_m_is_named():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=18, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=32)  # fmt: skip
    model = LlamaForCausalLM(config)
    with pytest.raises(HfEwcError, match=r"2:4 sparsity needs the input dimension to be divisible by 4, but "
                                         r"'model.layers.0.self_attn.q_proj.weight' has 18 inputs"):  # fmt: skip
        prune_model(model, None, structure="2:4", show_progress=False)
