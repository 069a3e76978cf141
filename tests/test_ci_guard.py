"""The guard .ci/run relies on: with EDGE_VOICE_NO_SKIPS=1 a skip off the allow-list fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _pytest(tmp_path: Path, body: str, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text("import pytest\n\n\n" + body, encoding="utf-8")
    environ = {k: v for k, v in os.environ.items() if k != "EDGE_VOICE_NO_SKIPS"}
    environ.update(PYTHONPATH=str(HERE), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "test_sample.py"], cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120)


def test_an_unexpected_skip_fails_only_when_every_test_must_run(tmp_path: Path) -> None:
    body = "def test_a():\n    pytest.skip('no reason to be here')\n\n\ndef test_b():\n    assert True\n"
    assert _pytest(tmp_path, body).returncode == 0
    strict = _pytest(tmp_path, body, EDGE_VOICE_NO_SKIPS="1")
    assert strict.returncode == 1
    assert "test_sample.py::test_a: Skipped: no reason to be here" in strict.stdout


def test_the_allow_list_names_tests_that_exist_with_reasons() -> None:
    from conftest import _allowed_skips

    for test_id in _allowed_skips():
        path, _, name = test_id.partition("::")
        assert (HERE.parent / path).is_file(), test_id
        assert f"def {name}(" in (HERE.parent / path).read_text(encoding="utf-8"), test_id
