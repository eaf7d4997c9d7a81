"""Every runnable example in python/ runs to completion (so that they never rot)."""

import re
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


def readme_python_blocks() -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_python_blocks_run_as_pasted():
    """A user pastes a block of the README into a fresh interpreter: it must run (the Usage block
    once used tensors it never defined). Blocks that continue one another run in order, in one
    interpreter, as a user reading down the page would paste them."""
    # A block that says it runs in each process of a torchrun job is a fragment of such a program.
    blocks = [block for block in readme_python_blocks() if not block.startswith("# In each process of a torchrun")]
    assert len(blocks) >= 3
    script = "\n".join(f"print('-- block {i}')\n{block}" for i, block in enumerate(blocks))
    script = script.replace("help(", "(lambda obj: None)(")  # help() would wait for a pager
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
