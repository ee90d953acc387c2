"""The README's Python example runs as written (against small real models and a temp registry)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from patchctl import Registry

from .conftest import ROOT


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_api_example_runs(tmp_path, models):
    blocks = _python_blocks((ROOT / "README.md").read_text())
    assert blocks, "README has no python example"
    home = tmp_path / "home-registry"
    (tmp_path / "base").symlink_to(models.base)
    shutil.copytree(models.lora, tmp_path / "my-lora")
    with Registry(home) as reg:  # the example refers to a second patch pushed earlier
        reg.push(models.lora_rs, "chat:v2", base=models.base)
    code = "\n".join(blocks) + "\nprint('README example ok', type(model).__name__, type(mix).__name__)\n"
    env = {**os.environ, "PATCHCTL_HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "README example ok BertModel BertModel" in out.stdout
