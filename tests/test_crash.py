"""Crash safety end to end: `benchmarks/crash_resume.py` kills `hf-ewc train` with SIGKILL at random moments and
resumes it; the finished run must equal an uninterrupted one (the committed run of the script makes 12 kills)."""

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "crash_resume.py"), "--kills", "2", "--seed", "1", "--out",
         str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "crash_resume.json").read_text())
    assert len(report["kills"]) == 2 and sum(r["kills"] for r in report["rounds"]) == 2
    assert report["matrix_max_abs_diff"] <= 1e-5 and report["state_max_abs_diff"] <= 1e-5, report
