"""The README's first example runs as written: the docs stay true."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_first_python_example_runs(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    text = (ROOT / "README.md").read_text()
    start = text.index("```python") + len("```python")
    code = text[start: text.index("```", start)]
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("CNNC_CACHE_DIR", os.environ.get("CNNC_CACHE_DIR", str(ROOT / ".cache")))
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own documentation
    printed = capsys.readouterr().out
    assert "conv2d_sigmoid_avgpool2d_0" in printed
    assert "(4, 10)" in printed
