"""Property tests of the config loader and the override parser: whatever YAML text or override list a user gives,
the result is a valid run config or one `HfEwcError` — never another exception (a traceback)."""

import pytest


hypothesis = pytest.importorskip("hypothesis")
import yaml  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from testing_utils import make_config  # noqa: E402

from hf_ewc import HfEwcError  # noqa: E402
from hf_ewc.pipeline import load_run_config  # noqa: E402


KEYS = [
    "task", "model", "domains", "output_dir", "seed", "num_train_epochs", "learning_rate", "ewc_lambda", "ewc_mode",
    "importance_method", "fisher_estimator", "per_device_train_batch_size", "max_steps", "warmup_steps", "peft",
    "baseline", "consolidation", "ewc_decay", "importance_max_samples", "report_to", "lr_scheduler_type",
    "model.config.hidden_size", "model.max_length", "model.name_or_path", "domains.0.data_files",
    "domains.0.eval_fraction", "domains.1.training", "domains.0.max_samples", "domains.5.name", "no_such_key",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["causal_lm", "fisher", "stabilized", "online", "naive", "1e-3", "-1"]),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _loads_or_refuses(path, overrides=(), *, must_load: bool = False) -> None:
    try:
        load_run_config(path, list(overrides))
    except HfEwcError as err:
        assert not must_load, f"the unchanged config was refused: {err}"  # a loader refusing everything fails here
        assert str(err).strip() and "\n" not in str(err).strip(), repr(err)


@FUZZ
@given(text=st.text(max_size=200))
def test_any_yaml_text_loads_or_gives_the_library_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    _loads_or_refuses(path)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4))
def test_any_yaml_mapping_near_a_valid_config_loads_or_gives_the_library_error(tmp_path, changes):
    raw = make_config(tmp_path)
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[last] = value
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    _loads_or_refuses(path, must_load=not changes)


@FUZZ
@given(tokens=st.lists(st.one_of(st.sampled_from([f"--{k}" for k in KEYS]), st.text(max_size=15)), max_size=6))
def test_any_override_list_loads_or_gives_the_library_error(tmp_path, tokens):
    path = tmp_path / "base.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(make_config(tmp_path)), encoding="utf-8")
    _loads_or_refuses(path, tokens, must_load=not tokens)


def test_the_unfuzzed_inputs_load(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(make_config(tmp_path)), encoding="utf-8")
    assert len(load_run_config(path, []).domains) == 2
    assert load_run_config(path, ["--ewc_lambda", "0.1"]).raw["ewc_lambda"] == 0.1
