"""The scripts in examples/ run as they are and print what they promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT

EXAMPLES = {
    "load_and_compare.py": r"patchctl.load vs peft merge_and_unload: (\d+) of \1 tensors bit-identical",
    "hot_swap.py": r"base restored bit for bit: True",
}


def test_every_example_is_tested():
    assert sorted(p.name for p in (ROOT / "examples").glob("[!_]*.py")) == sorted(EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize(("script", "line"), sorted(EXAMPLES.items()))
def test_example_runs_and_prints_its_result(script, line):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert re.search(line, p.stdout), p.stdout
