"""SIGKILL during push: no visible partial object, fsck clean, re-push succeeds."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from patchctl import Registry


@pytest.fixture(scope="module")
def big_finetune(tmp_path_factory, minilm_dir):
    """all-MiniLM-L6-v2 with every tensor moved: a 90 MB push, long enough to kill mid-write."""
    d = tmp_path_factory.mktemp("bigft") / "ft"
    shutil.copytree(minilm_dir, d, ignore=shutil.ignore_patterns("*.safetensors", "*.onnx", "*.bin"))
    sd = load_file(minilm_dir / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if v.is_floating_point():
            sd[k] = v + 1e-3 * torch.randn(v.shape, generator=g)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _push_cmd(src, base, reg, ref):
    return [sys.executable, "-m", "patchctl", "push", str(src), ref, "--base", str(base), "--registry", str(reg)]


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_mid_push_leaves_registry_consistent(tmp_path, big_finetune, minilm_dir, seed):
    reg = tmp_path / "reg"
    rng = random.Random(seed)
    Registry(reg).close()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(_push_cmd(big_finetune, minilm_dir, reg, "ft:v1"), env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait until the import has started writing, then kill at a random moment
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None and not any((reg / "tmp").iterdir()) \
            and not any((reg / "objects" / "sha256").iterdir()):
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.8))
    p.send_signal(signal.SIGKILL)
    p.wait()
    with Registry(reg) as r:
        res = r.fsck()
        assert res["ok"], res["problems"]
        # every object that is visible is complete (its name is its hash: fsck checked that)
        for ref in r.store.iter_refs():
            m = r.manifest(str(ref))
            assert all(r.store.has_blob(d) for d in m.blob_digests())
    done = subprocess.run(_push_cmd(big_finetune, minilm_dir, reg, "ft:v1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Registry(reg) as r:
        assert r.fsck()["ok"]
        floats = [k for k, v in load_file(big_finetune / "model.safetensors").items() if v.is_floating_point()]
        assert sorted(r.manifest("ft:v1").tensors) == sorted(floats)
