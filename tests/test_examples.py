"""Every runnable example in python/ runs to completion (so that they never rot)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "python").glob("*.py"))


def test_there_are_examples():
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path):
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600,
                            cwd=path.parent.parent)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
