"""README's quick start runs as written, and says what it prints."""

import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def _python_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.DOTALL)


def test_quick_start_runs_as_written_and_ewc_forgets_less(tmp_path):
    code = _python_blocks("Quick start")[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = dict(re.findall(r"ewc_mode=(\w+): loss on the old domain [\d.]+ -> ([\d.]+)", out.stdout))
    assert set(found) == {"off", "stabilized"}, out.stdout
    assert float(found["stabilized"]) < float(found["off"]) - 0.5  # EWC keeps the old domain
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for mode, after in found.items():  # the figures README quotes are the ones the code prints
        assert f"ewc_mode={mode}: loss on the old domain 0.74 -> {after}" in readme
    assert (tmp_path / "quickstart" / "final" / "ewc_state.safetensors").is_file()
    assert "EWCState(domains=['old', 'new']" in out.stdout
