"""The short coverage-guided campaign (``make fuzz-ci``: atheris over the session, SASL and the
wire encoder, fuzz/) runs in CI and must find nothing."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_fuzz_ci_campaign_finds_no_crash(tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        if os.environ.get("CI"):
            pytest.fail("atheris is not installed (requirements-dev.txt)")
        pytest.skip("atheris is not installed")
    run = subprocess.run(
        ["make", "-s", "fuzz-ci", f"PYTHON={sys.executable}", f"FUZZ_DIR={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert not list((tmp_path / "artifacts").iterdir()), output[-4000:]
    runs = {name: int(n) for name, n in
            re.findall(r"== fuzz/fuzz_(\w+)\.py for.*?Done (\d+) runs", output, re.S)}
    assert set(runs) == {"session", "sasl", "wire", "proxy"}, output[-4000:]
    assert all(n >= 500 for n in runs.values()), runs  # the harnesses really ran
    assert (tmp_path / "session" / "corpus").is_dir()
