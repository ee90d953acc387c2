"""SIGKILL inside a write: no visible partial object, fsck clean, nothing left in tmp/, the re-run completes.

Two ways of killing. `test_sigkill_inside_a_write_*` stops the command exactly
where it writes, with the store's test hook (`PATCHCTL_TEST_PAUSE_AT`, see
`pause_point` in patchctl/registry/store/folder.py: inert unless set): a blob
or manifest half-written in `tmp/`, objects stored with the ref not yet moved,
or the ref's log line appended with the index not yet updated. Every kill is
then classified from what it left (before any write / mid-write / after the
ref moved, `bench/reliability.py`'s `classify_kill`), which must agree with
where it was stopped, and each command must have a stated minimum of kills
genuinely inside a write. `test_sigkill_at_a_random_moment_of_a_90_mb_push`
kills a real-size push at a random moment after its first write.
"""

from __future__ import annotations

import json
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

from ._integrity import assert_registry_clean
from .test_reliability import R

KILLS = 4  # per command, stopped in turn at: write, write, ref, moved
MIN_MID_WRITE = 3  # kills genuinely inside a write (a blob in tmp/, or objects stored and the ref not moved)
MIN_HALF_WRITTEN = 2  # of which a blob or manifest was half-written in tmp/ at the kill


@pytest.mark.parametrize("op", ["push", "merge", "compress", "pull-folder"])
def test_sigkill_inside_a_write_leaves_the_registry_clean_and_the_rerun_completes(tmp_path, op):
    r = R.crash_paused(tmp_path, kills=KILLS, ops=[op], mib=0.25, seed=11, verbose=False)
    assert r["skipped"] == {}, r["skipped"]
    v = r["ops"][op]
    detail = json.dumps(v, indent=1, default=str)
    assert v["killed"] == KILLS, detail
    assert v.get("mid-write", 0) >= MIN_MID_WRITE, detail
    assert v.get("after the ref moved", 0) >= 1, detail
    assert v.get("before any write", 0) == 0, detail  # every kill was stopped at a write
    assert v.get("a half-written blob in tmp/ at the kill", 0) >= MIN_HALF_WRITTEN, detail
    assert v.get("class disagrees with the point", 0) == 0, detail
    for k in ("fsck clean after the kill", "tmp/ empty after the kill", "re-run completes, fsck clean",
              "tmp/ empty after the re-run"):
        assert v.get(k, 0) == KILLS, (k, detail)
    for k in ("corrupt objects", "lost refs", "incomplete refs", "ref at a wrong digest", "re-run failed",
              "fsck: index only", "fsck: other problems"):
        assert v.get(k, 0) == 0, (k, detail)
    assert r["ok"], detail
    assert_registry_clean(tmp_path / "reg")


def test_a_killed_writers_half_written_blob_is_removed_on_the_next_open(reg_path, tmp_path):
    """tmp/blob-<pid>-* of a SIGKILLed writer was left for ever (only `gc` removed it, an hour later)."""
    with Registry(reg_path) as reg:
        R.synth_patch(reg, "a:v1", {"w": R.gaussian(1, 64).tobytes()})
    flag = tmp_path / "paused"
    code = (f"from patchctl import Registry\nreg = Registry({str(reg_path)!r})\n"
            "reg.store.put_blob(bytes(range(256)) * 64)\n")
    env = {**os.environ, "PATCHCTL_TEST_PAUSE_AT": "write:1", "PATCHCTL_TEST_PAUSE_FILE": str(flag)}
    p = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 60
    while not flag.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    left = list((reg_path / "tmp").glob(f"blob-{p.pid}-*"))
    with Registry(reg_path):  # another process's open while the writer runs: its file is left alone
        assert [q for q in left if q.exists()] == left and len(left) == 1
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert left[0].exists()
    assert_registry_clean(reg_path)  # the open removed it: its lock is free and its pid gone


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


def _wait_for_writes(p: subprocess.Popen, reg) -> None:
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None and not any((reg / "tmp").iterdir()) \
            and not any((reg / "objects" / "sha256").iterdir()):
        time.sleep(0.01)


@pytest.fixture(scope="module")
def push_write_seconds(tmp_path_factory, big_finetune, minilm_dir) -> float:
    """How long an uninterrupted push of the 90 MB fine-tune writes here (first file → exit): the random
    kills land inside that window, whatever the machine's speed."""
    reg = tmp_path_factory.mktemp("calibrate") / "reg"
    Registry(reg).close()
    p = subprocess.Popen(_push_cmd(big_finetune, minilm_dir, reg, "ft:v1"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    _wait_for_writes(p, reg)
    t0 = time.monotonic()
    assert p.wait(300) == 0
    return time.monotonic() - t0


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_a_random_moment_of_a_90_mb_push(tmp_path, big_finetune, minilm_dir, push_write_seconds, seed):
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    window = 0.7 * push_write_seconds
    for attempt in range(5):
        reg = tmp_path / f"reg{attempt}"
        Registry(reg).close()
        before, logs_before = R.file_state(reg), R.raw_ref_logs(reg, ["ft:v1", "ft:latest"])
        p = subprocess.Popen(_push_cmd(big_finetune, minilm_dir, reg, "ft:v1"), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until the import has started writing, then kill at a random moment of its writes (the first
        # 70 % of an uninterrupted push's write time here: a push of 90 MB now writes in a fraction of a
        # second, and one run's window varies with the machine's load: a push that finished before the
        # kill is run again with a shorter window, on a fresh registry)
        _wait_for_writes(p, reg)
        time.sleep(rng.uniform(0.0, window))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if p.returncode == -signal.SIGKILL:
            break
        window /= 2
    assert p.returncode == -signal.SIGKILL, "the push finished before the kill, 5 times"
    # it had started writing, so the kill landed inside the write or after the ref moved
    assert R.classify_kill(reg, before, logs_before, ["ft:v1", "ft:latest"]) in ("mid-write", "after the ref moved")
    assert_registry_clean(reg)  # the killed writer's tmp/ file removed on open; every visible object complete
    done = subprocess.run(_push_cmd(big_finetune, minilm_dir, reg, "ft:v1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_registry_clean(reg)
    with Registry(reg) as r:
        floats = [k for k, v in load_file(big_finetune / "model.safetensors").items() if v.is_floating_point()]
        assert sorted(r.manifest("ft:v1").tensors) == sorted(floats)
