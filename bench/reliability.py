"""Reliability and security: crash, concurrency, corruption, fuzzing and server abuse, with figures.

    python bench/reliability.py                  # the full run (about 10-15 min on 2 busy cores)
    python bench/reliability.py --quick          # a scaled-down run (about 2 min)
    python bench/reliability.py --only crash,fuzz --kills 20 --fuzz 20000

Sections (each prints the command it measures and its figures; exit status 0
when every goal is met):

1. **crash** — ``patchctl push``, ``pull`` (from a folder remote and from a
   ``patchctl serve`` process), ``merge --no-validate``, ``compress`` (when
   ``patchctl compress --help`` works) and ``gc --prune-history`` run as
   subprocesses and are SIGKILLed at a random moment (a quarter uniform over
   the whole run, the rest uniform over the part of the run that writes,
   both measured on an uninterrupted calibration run). After every kill:
   ``Registry.fsck()`` must be clean, no object corrupt, every ref must point
   at a complete patch (manifest parses, every blob present with its hash),
   every ref that existed before must be unchanged; then the interrupted
   command is run again and must finish with the digest of the calibration run,
   fsck clean and nothing left in ``tmp/``. Each kill is classified from what it
   left (:func:`classify_kill`): *before any write* (no file changed), *mid-write*
   (a file under objects/, manifests/, refs/, records/ or tmp/ changed, no target
   ref moved), *after the ref moved* (a target ref's log grew).
   Goal: 100 kills survived, 0 corrupt objects, 0 lost refs.
   **1b. paused** (:func:`crash_paused`) — the same commands (push, pull from a
   folder, merge, compress) SIGKILLed exactly where the store's test hook
   (``PATCHCTL_TEST_PAUSE_AT``, ``pause_point`` in patchctl/registry/store/folder.py,
   inert unless set) stopped them: a blob or manifest half-written in ``tmp/``;
   objects stored and the ref about to move; the ref's log line appended and the
   index not updated. The classification must agree with the point.
2. **concurrency** — W worker processes × N mixed operations (push, tag, rm,
   gc with and without ``prune_history``, pull from a folder remote, merge) on
   one registry through the Python API. Each worker writes only its own refs
   (``w<i>/...``) and logs what each should resolve to at the end (or that it
   was removed); pulls write shared refs whose digest is known. At the end
   every expected ref must resolve to that digest and a complete patch,
   every removed ref must be gone, and fsck (objects, refs, index against the
   files) must be clean. Goal: 8 × 50, 0 lost.
   **2b. same-ref** (:func:`same_ref`) — W processes push different patches to the
   *same* ``name:tag`` at once (and once with one writer stalled by the test hook
   between its log append and its index update): every push has its entry in the
   tag's and ``latest``'s logs, chains intact, the index agrees with the logs.
3. **corruption** — one bit flipped in random blobs and manifests of a
   registry of synthetic patches: ``fsck`` must report exactly those
   (``corrupt_blobs`` / ``corrupt_manifests``), reading each must raise
   ``DigestMismatch``, and a pull from the damaged registry must store nothing
   of a patch that has a damaged object. Then ``patchctl fsck --repair URL``
   against a ``patchctl serve`` of a clean copy must bring every damaged
   object back (verified; the bad copies moved aside into ``tmp/``) and leave
   fsck clean. Goal: 100 % detected, 100 % repaired.
   **3b. flips** (:func:`flips`) — one bit flipped in objects, manifests, ref logs,
   record logs and ``index.sqlite`` (and, targeted, a log's final newline and the
   index's stored digests): each must be detected by fsck naming the file (or the
   index), or provably change nothing; 0 undetected, 0 tracebacks.
4. **fuzz** — the safetensors header parser (``SafetensorsFile`` on files,
   then reading every tensor it accepts), the manifest parser
   (``manifest.parse``), the PEFT config reader (``read_peft_config``) and
   the sparse codec (``codec.decode``): hypothesis strategies (random,
   structured, mutated valid inputs) plus a seeded byte-level mutator. A
   crash is any exception that is not a ``PatchctlError``. Hostile headers
   that claim huge tensors are also run under ``tracemalloc`` (peak must stay
   small). Goal: >= 100,000 inputs, 0 crashes.
   **4b. push-fuzz** (:func:`push_fuzz`) — mutated diff files, fine-tune folders and
   PEFT folders through ``Registry.push`` in a worker process: each answered within
   5 s, a refusal leaving the registry as it was.
5. **server** — abusive requests to a real ``patchctl serve`` on 127.0.0.1:
   traversal, malformed digests, inverted / huge / many Ranges, oversized and
   malformed requests, and slow clients sending their headers byte by byte;
   each must get its 4xx (or, for what uvicorn refuses before routing, a 400
   or a closed connection), and a normal request must be answered during and
   after. Goal: every abusive request refused, the server still serving.
   Then (:func:`connection_abuse`) slowloris clients sending a header byte a
   second, and 1,100 idle sockets against a server limited to 1,024
   descriptors: every slow client closed by the server's header timeout,
   every normal GET answered meanwhile, no traceback in the server's log.

All traffic goes to 127.0.0.1 only. ``tests/test_reliability.py`` and
``tests/test_fuzz.py`` run bounded versions of the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PY = sys.executable
FAKE_FP = "sha256:" + "0" * 64
MiB = 1 << 20


def log(msg: str = "") -> None:
    print(msg, flush=True)


def cli(*args: Any) -> list[str]:
    return [PY, "-m", "patchctl", *map(str, args)]


def run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def cmd_str(args: list[str]) -> str:
    out = ["patchctl" if a == "patchctl" else a for a in args]
    if out[:3] == [PY, "-m", "patchctl"]:
        out = ["patchctl", *out[3:]]
    return " ".join(out)


# ---------------------------------------------------------------------------- synthetic data


def gaussian(rng_seed: int, n: int, scale: float = 1.0):
    import numpy as np

    return (np.random.default_rng(rng_seed).standard_normal(n, dtype=np.float32) * np.float32(scale))


def synth_patch(reg: Any, ref: str | None, tensors: dict[str, bytes], fingerprint: str = FAKE_FP,
                base_name: str = "synthetic-base", metadata: dict | None = None, move_latest: bool = False) -> str:
    """Store a float32 ``diff`` patch whose tensors have exactly these bytes (1-D); its digest."""
    from patchctl.registry.store.manifest import Manifest, TensorEntry

    entries = {}
    for name, data in tensors.items():
        entries[name] = TensorEntry(reg.store.put_blob(data), "float32", (len(data) // 4,), "raw", len(data))
    m = Manifest("diff", {"fingerprint": fingerprint, "name": base_name, "revision": None}, entries,
                 metadata=metadata or {})
    return reg.commit(m, ref, move_latest=move_latest)


def write_model(folder: Path, tensors: dict[str, Any]) -> Path:
    """A model folder: ``model.safetensors`` (numpy arrays) and a small ``config.json``."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "reliability-base"}))
    return folder


def make_base_and_finetune(work: Path, n_tensors: int, numel: int, seed: int = 0) -> tuple[Path, Path]:
    base = {f"layers.{i}.weight": gaussian(seed + i, numel, 0.02) for i in range(n_tensors)}
    ft = {k: v + gaussian(seed + 1000 + i, numel, 0.002) for i, (k, v) in enumerate(base.items())}
    return write_model(work / "base", base), write_model(work / "ft", ft)


def write_diff_file(path: Path, base: Path, seed: int, scale: float = 1e-3) -> Path:
    """A diff safetensors file for ``base``: every base tensor, Gaussian values."""
    from safetensors.numpy import save_file

    from patchctl.registry.formats.safetensors import SafetensorsFile

    f = SafetensorsFile(base / "model.safetensors")
    tensors = {n: gaussian(seed * 7919 + i, int(info.numel), scale).reshape(info.shape)
               for i, (n, info) in enumerate(sorted(f.tensors.items()))}
    save_file(tensors, str(path))
    return path


# ---------------------------------------------------------------------------- registry checks


def file_state(reg: Path) -> dict[str, int]:
    """Every file that carries state (objects, manifests, refs, records, tmp) with its size."""
    out = {}
    for sub in ("objects", "manifests", "refs", "records", "tmp"):
        base = reg / sub
        if base.is_dir():
            for p in base.rglob("*"):
                with contextlib.suppress(OSError):
                    if p.is_file():
                        out[p.relative_to(reg).as_posix()] = p.stat().st_size
    return out


def refs_of(reg_path: Path) -> dict[str, str]:
    from patchctl.registry.store.folder import Store

    store = Store.open(reg_path, create=False)
    out = {}
    for r in store.iter_refs():
        t = store.ref_target(r)
        if t is not None:
            out[str(r)] = t
    return out


def incomplete_refs(reg: Any) -> list[str]:
    """Refs whose manifest is missing, does not parse or verify, or lacks a blob."""
    from patchctl.errors import PatchctlError
    from patchctl.registry.store import manifest as manifest_mod

    bad = []
    for r in reg.store.iter_refs():
        t = reg.store.ref_target(r)
        if t is None:
            continue
        try:
            m = manifest_mod.parse(reg.store.read_manifest_bytes(t))
        except PatchctlError:
            bad.append(str(r))
            continue
        if not all(reg.store.has_blob(d) for d in m.blob_digests()):
            bad.append(str(r))
    return bad


@dataclass
class Check:
    fsck_ok: bool
    index_only: bool  # every fsck problem is an index/files difference (fixed by --rebuild-index)
    problems: list[str]
    corrupt: int
    incomplete: list[str]
    lost: list[str]


def check_registry(reg_path: Path, must_keep: dict[str, str]) -> Check:
    from patchctl import Registry

    with Registry(reg_path, create=False) as reg:
        res = reg.fsck()
        inc = incomplete_refs(reg)
        lost = [r for r, d in must_keep.items() if reg.store.ref_target(_ref(r)) != d]
    probs = res["problems"]
    return Check(res["ok"], bool(probs) and all(p.startswith("index:") for p in probs), probs,
                 len(res["corrupt_blobs"]) + len(res["corrupt_manifests"]), inc, lost)


def _ref(s: str) -> Any:
    from patchctl.registry.store.names import parse_ref

    return parse_ref(s)


# ---------------------------------------------------------------------------- a server process


def serving(registry: Path, *extra: str) -> contextlib.AbstractContextManager[tuple[str, subprocess.Popen]]:
    """``python -m patchctl serve`` on a free loopback port until the block ends: (url, process)."""
    from patchctl.server.process import serving as serve

    return serve(registry, *extra, timeout=60, cwd=ROOT)


# ============================================================================ 1. crash


@dataclass
class CrashOp:
    """One killable command and how to reset the registry after it."""

    name: str
    args: list[str]
    target: list[str]  # refs the command moves
    reset: Callable[[Path], None]
    expected: str | None = None  # digest of an uninterrupted run (None: gc)
    api: Callable[[Any], Any] | None = None  # the same command through the Python API (a fast re-run)
    wall: float = 0.0  # seconds, uninterrupted
    first_write: float = 0.0  # seconds until the registry first changes
    stats: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def _drop_refs(refs: list[str], prune: bool = True) -> Callable[[Path], None]:
    def reset(reg_path: Path) -> None:
        from patchctl import Registry

        with Registry(reg_path, create=False) as reg:
            for r in refs:
                if reg.store.ref_target(_ref(r)) is not None:
                    reg.rm(r)
            reg.gc(prune_history=prune)
            for p in (reg_path / "tmp").iterdir():  # part files of killed pulls: start the next round cold
                if p.is_file():
                    p.unlink()
    return reset


def _dir_mtimes(reg: Path) -> tuple:
    """A cheap signature of the registry's files, to see when a command starts writing."""
    sig = []
    for sub in ("tmp", "objects/sha256", "manifests/sha256", "refs"):
        with contextlib.suppress(OSError):
            sig.append(os.stat(reg / sub).st_mtime_ns)
    with contextlib.suppress(OSError):
        for d in os.scandir(reg / "manifests" / "sha256"):
            sig.append(d.stat().st_mtime_ns)
    return tuple(sig)


def raw_ref_logs(reg_path: Path, refs: list[str]) -> dict[str, tuple[int, str | None]]:
    """Per ref: (entries in its log, its target), read straight from the files; opening a
    Registry would clean what a killed writer left in ``tmp/``, which is evidence here."""
    from patchctl.registry.store import logfile

    out = {}
    for r in refs:
        ref = _ref(r)
        entries = logfile.read(reg_path / "refs" / ref.name / f"@{ref.tag}")
        out[r] = (len(entries), entries[-1]["new"] if entries else None)
    return out


KILL_CLASSES = ("before any write", "mid-write", "after the ref moved")


def classify_kill(reg_path: Path, files_before: dict[str, int], refs_before: dict[str, tuple[int, str | None]],
                  targets: list[str]) -> str:
    """Where a kill landed, from what it left: a target ref's log grew (after the ref moved); else some file
    under objects/, manifests/, refs/, records/ or tmp/ changed (mid-write); else nothing (before any write)."""
    if targets and raw_ref_logs(reg_path, targets) != refs_before:
        return "after the ref moved"
    return "mid-write" if file_state(reg_path) != files_before else "before any write"


def _calibrate(op: CrashOp, reg_path: Path) -> None:
    sig0 = _dir_mtimes(reg_path)
    t0 = time.monotonic()
    p = subprocess.Popen(op.args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    while p.poll() is None:
        if first is None and _dir_mtimes(reg_path) != sig0:
            first = time.monotonic() - t0
        time.sleep(0.005)
    op.wall = time.monotonic() - t0
    err = p.stderr.read().decode() if p.stderr else ""
    if p.stderr:
        p.stderr.close()
    if p.returncode != 0:
        raise RuntimeError(f"calibration run of {cmd_str(op.args)} failed: {err}")
    op.first_write = first if first is not None else 0.0
    if op.target:
        op.expected = refs_of(reg_path).get(op.target[0])


def _kill_once(op: CrashOp, reg_path: Path, rng: random.Random, est: float) -> tuple[str, float]:
    """Start the command, SIGKILL it after a random delay; ('killed'|'finished', delay)."""
    lo = 0.0 if rng.random() < 0.25 else min(op.first_write, 0.9 * est)
    delay = rng.uniform(lo, est)
    p = subprocess.Popen(op.args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    if p.poll() is not None:
        return "finished", delay
    p.send_signal(signal.SIGKILL)
    p.wait()
    return "killed", delay


# kills per command in a full run: more where a kill is cheap (no torch import, short commands)
KILL_WEIGHTS = {"push": 10, "pull-folder": 26, "pull-http": 26, "merge": 10, "compress": 8, "gc": 20}


def split_kills(kills: int, ops: list[str]) -> dict[str, int]:
    """``kills`` shared by ``ops`` in proportion to :data:`KILL_WEIGHTS` (largest remainders), at least 1 each."""
    w = {o: KILL_WEIGHTS.get(o, 10) for o in ops}
    exact = {o: kills * w[o] / sum(w.values()) for o in ops}
    per = {o: max(1, int(exact[o])) for o in ops}
    for o in sorted(ops, key=lambda o: exact[o] - int(exact[o]), reverse=True):
        if sum(per.values()) >= kills:
            break
        per[o] += 1
    return per


# a first kill delay when there is no calibration run (tests): the re-runs then time the command
WALL_GUESS = {"push": 4.0, "pull-folder": 0.8, "pull-http": 1.0, "merge": 3.5, "compress": 4.0, "gc": 2.0}


def crash(work: Path, kills: int, ops: list[str] | None = None, seed: int = 0, mib: float = 16.0,
          verbose: bool = True, calibrate: bool = True) -> dict[str, Any]:
    """SIGKILL each command ``kills / len(ops)`` times at random moments; see the module docstring.

    ``calibrate=False`` (tests) skips the uninterrupted first run: the first kill aims at
    :data:`WALL_GUESS`, the later ones at the re-runs' time, and the expected digest is the
    first re-run's (so the determinism check against an uninterrupted run is the bench's only)."""
    rng = random.Random(seed)
    ops = list(ops or ["push", "pull-folder", "pull-http", "merge", "compress", "gc"])
    with contextlib.ExitStack() as stack:
        table, reg_path, server, skipped = _crash_setup(stack, work, ops, seed, mib, rng)
        per = split_kills(kills, ops)
        for name in ops:
            op = table[name]
            if name == "gc":
                op.reset(reg_path)  # makes the garbage
            if calibrate:
                _calibrate(op, reg_path)
                op.reset(reg_path)
            else:
                op.wall, op.first_write = WALL_GUESS[name], 0.6 * WALL_GUESS[name]
                if name == "gc":
                    op.first_write = 0.25 * op.wall
            est = op.wall
            if verbose:
                log(f"  {name}: uninterrupted {op.wall:.2f} s (first write at {op.first_write:.2f} s); "
                    f"{per[name]} kills")
            attempts = 0
            while op.stats["killed"] < per[name] and attempts < 4 * per[name] + 4:
                attempts += 1
                keep = refs_of(reg_path)
                for t in op.target:
                    keep.pop(t, None)
                before, logs_before = file_state(reg_path), raw_ref_logs(reg_path, op.target)
                what, delay = _kill_once(op, reg_path, rng, est)
                if what == "finished":  # slower calibration than this run: aim earlier next time
                    op.stats["finished before the kill"] += 1
                    est = max(0.05, 0.7 * est)
                    op.reset(reg_path)
                    continue
                op.stats["killed"] += 1
                op.stats[classify_kill(reg_path, before, logs_before, op.target)] += 1
                t_rerun = time.monotonic()
                _after_kill(op, reg_path, keep, f"kill at {delay:.2f} s", rerun=lambda op=op: run(op.args, timeout=600))
                t_rerun = time.monotonic() - t_rerun
                op.reset(reg_path)
                if not calibrate and name != "gc":
                    est = t_rerun  # the re-run did the whole work: the best estimate of the next run
                elif name != "gc":
                    est = max(est, 0.5 * op.wall)
        out = {"ops": {}, "skipped": skipped, "server_alive": server is None or server.poll() is None}
        for name in ops:
            op = table[name]
            out["ops"][name] = {"command": cmd_str(op.args).replace(str(work) + "/", ""), "wall": op.wall,
                                "first_write": op.first_write, **dict(op.stats), "failures": op.failures[:10]}
    return _crash_totals(out, kills)


def _crash_totals(out: dict[str, Any], kills: int) -> dict[str, Any]:
    tot = Counter()
    for v in out["ops"].values():
        for k in ("killed", *KILL_CLASSES, "corrupt objects", "lost refs", "incomplete refs",
                  "fsck clean after the kill", "tmp/ empty after the kill", "re-run completes, fsck clean",
                  "tmp/ empty after the re-run", "re-run failed", "fsck: index only", "fsck: other problems",
                  "ref at a wrong digest"):
            tot[k] += v.get(k, 0)
    out["total"] = dict(tot)
    # sound: objects and refs intact after every kill (the index, a cache, may lag: counted apart)
    out["ok"] = (tot["killed"] >= kills and tot["corrupt objects"] == 0 and tot["lost refs"] == 0
                 and tot["incomplete refs"] == 0 and tot["fsck: other problems"] == 0
                 and tot["re-run completes, fsck clean"] == tot["killed"] and tot["ref at a wrong digest"] == 0
                 and tot["tmp/ empty after the re-run"] == tot["killed"])
    out["fsck_clean_after_every_kill"] = tot["fsck clean after the kill"] == tot["killed"]
    return out


def _after_kill(op: CrashOp, reg_path: Path, keep: dict[str, str], when: str,
                rerun: Callable[[], subprocess.CompletedProcess[str]]) -> None:
    """The checks after one kill, counted in ``op.stats``: fsck (objects, refs, logs, index, ``tmp/`` once
    opened), no lost or incomplete ref, no target ref at a digest other than the uninterrupted run's; then
    the re-run must finish with that digest, fsck clean and ``tmp/`` empty."""
    from patchctl import Registry

    c = check_registry(reg_path, keep)
    op.stats["corrupt objects"] += c.corrupt
    op.stats["lost refs"] += len(c.lost)
    op.stats["incomplete refs"] += len(c.incomplete)
    # a killed pull keeps its verified part files for the next pull to resume; nothing else may stay
    left = [p.name for p in (reg_path / "tmp").iterdir() if not p.name.startswith("pull-")]
    op.stats["tmp/ empty after the kill" if not left else "tmp/ not empty after the kill"] += 1
    if left:
        op.failures.append(f"after {when}: left in tmp/: {left[:3]}")
    with Registry(reg_path, create=False) as reg:
        partial = {t: reg.store.ref_target(_ref(t)) for t in op.target}
    if c.fsck_ok:
        op.stats["fsck clean after the kill"] += 1
    else:
        op.stats["fsck: index only" if c.index_only else "fsck: other problems"] += 1
        op.failures.append(f"after {when}: {c.problems[:3]}")
    rr = rerun()
    if rr.returncode != 0:
        op.stats["re-run failed"] += 1
        op.failures.append(f"re-run after {when}: {rr.stderr.strip()[:300]}")
    c2 = check_registry(reg_path, keep)
    with Registry(reg_path, create=False) as reg:
        got = {t: reg.store.ref_target(_ref(t)) for t in op.target}
        if op.expected is None and op.target and rr.returncode == 0:
            op.expected = got[op.target[0]]  # no calibration run: the first re-run's digest
        if any(v not in (None, op.expected) for v in partial.values()):
            op.stats["ref at a wrong digest"] += 1
            op.failures.append(f"after {when}: {partial} (expected {op.expected})")
        ok = rr.returncode == 0 and c2.fsck_ok and not c2.lost and not c2.incomplete \
            and all(v == op.expected for v in got.values())
        if op.name == "gc":
            ok = ok and not any(r.name.startswith("junk/") for r in reg.store.iter_refs()
                                if reg.store.ref_log(r) and reg.store.ref_target(r) is not None) \
                and sum(1 for _ in reg.store.iter_digests("manifests")) == 5
        if not c2.fsck_ok:
            op.failures.append(f"after the re-run: {c2.problems[:3]}")
            reg.fsck(rebuild_index=True)  # so the next round starts clean
    left = sorted(p.name for p in (reg_path / "tmp").iterdir())
    op.stats["tmp/ empty after the re-run"] += not left
    if left:
        op.failures.append(f"after the re-run ({when}): left in tmp/: {left[:3]}")
    op.stats["re-run completes, fsck clean" if ok else "re-run left problems"] += 1
    op.stats["lost refs"] += len(c2.lost)


def _api_rerun(op: CrashOp, reg_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``op.api`` in this process (what a re-run of the command does, without its start-up)."""
    from patchctl import Registry
    from patchctl.errors import PatchctlError

    try:
        with Registry(reg_path, create=False) as reg:
            op.api(reg)
    except PatchctlError as e:
        return subprocess.CompletedProcess(op.args, 1, "", f"{type(e).__name__}: {e}")
    return subprocess.CompletedProcess(op.args, 0, "", "")


def _crash_setup(stack: contextlib.ExitStack, work: Path, ops: list[str], seed: int, mib: float,
                 rng: random.Random) -> tuple[dict[str, CrashOp], Path, Any, dict[str, str]]:
    """The registry, origin, inputs and :class:`CrashOp` table the crash sections kill commands in."""
    from patchctl import Registry

    work.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    if "compress" in ops:
        h = run(cli("compress", "--help"), timeout=120)
        if h.returncode != 0:
            ops.remove("compress")
            skipped["compress"] = f"`patchctl compress --help` exits {h.returncode}: {(h.stderr or h.stdout).strip()[:120]}"
    numel = max(1024, int(mib * MiB / 4 / 8))  # 8 tensors of float32
    reg_path = work / "reg"
    origin = work / "origin"
    with Registry(origin) as o:  # the remote: one patch of 8 blobs
        synth_patch(o, "src/big:v1", {f"t{i}.weight": gaussian(100 + i, numel).tobytes() for i in range(8)})
    base, ft = make_base_and_finetune(work, 8, numel, seed=seed)
    with Registry(reg_path) as reg:
        # inputs of merge and compress, and bystanders that no command may touch
        synth_patch(reg, "m/a:v1", {f"t{i}.weight": gaussian(200 + i, numel, 1e-2).tobytes() for i in range(8)})
        synth_patch(reg, "m/b:v1", {f"t{i}.weight": gaussian(300 + i, numel, 1e-2).tobytes() for i in range(8)})
        for k in range(3):
            synth_patch(reg, f"keep/p{k}:v1", {"x.weight": gaussian(400 + k, 4096).tobytes(),
                                               "shared.weight": gaussian(1, 4096).tobytes()})
    n_garbage = max(20, int(mib * 8))

    def make_garbage(path: Path) -> None:
        with Registry(path, create=False) as reg:
            g = rng.randrange(1 << 30)
            for k in range(n_garbage):
                ref = f"junk/g{k}:v1"
                synth_patch(reg, ref, {**{f"b{j}": gaussian(g + 31 * k + j, 256).tobytes() for j in range(8)},
                                       "shared.weight": gaussian(1, 4096).tobytes()})
                reg.rm(ref)

    url, server = stack.enter_context(serving(origin)) if "pull-http" in ops else ("http://unused", None)
    table = {
        "push": CrashOp("push", cli("push", ft, "p/ft:v1", "--base", base, "--registry", reg_path),
                        ["p/ft:v1", "p/ft:latest"], _drop_refs(["p/ft:v1", "p/ft:latest"]),
                        api=lambda reg: reg.push(ft, "p/ft:v1", base=base)),
        "pull-folder": CrashOp("pull-folder", cli("pull", "src/big:v1", "--from", origin, "--registry", reg_path),
                               ["src/big:v1"], _drop_refs(["src/big:v1"]),
                               api=lambda reg: reg.pull("src/big:v1", str(origin))),
        "pull-http": CrashOp("pull-http", cli("pull", "src/big:v1", "--from", url, "--registry", reg_path),
                             ["src/big:v1"], _drop_refs(["src/big:v1"]),
                             api=lambda reg: reg.pull("src/big:v1", url)),
        "merge": CrashOp("merge", cli("merge", "m/a:v1", "m/b:v1", "--as", "m/merged:v1", "--no-validate",
                                      "--registry", reg_path),
                         ["m/merged:v1", "m/merged:latest"], _drop_refs(["m/merged:v1", "m/merged:latest"]),
                         api=lambda reg: reg.merge(["m/a:v1", "m/b:v1"], "m/merged:v1", validate=False)),
        "compress": CrashOp("compress", cli("compress", "m/a:v1", "--density", "0.1", "--as", "m/comp:v1",
                                            "--registry", reg_path),
                            ["m/comp:v1", "m/comp:latest"], _drop_refs(["m/comp:v1", "m/comp:latest"]),
                            api=lambda reg: reg.compress("m/a:v1", "m/comp:v1", density=0.1)),
        "gc": CrashOp("gc", cli("gc", "--prune-history", "--registry", reg_path), [], make_garbage,
                      api=lambda reg: reg.gc(prune_history=True)),
    }
    return table, reg_path, server, skipped


def crash_paused(work: Path, kills: int, ops: list[str] | None = None, seed: int = 0, mib: float = 1.0,
                 points: tuple[str, ...] = ("write", "write", "ref", "moved"), verbose: bool = True,
                 cli_rerun: bool = False) -> dict[str, Any]:
    """SIGKILL each command ``kills`` times exactly where the store's test hook paused it.

    ``PATCHCTL_TEST_PAUSE_AT=<point>:<n>`` (``pause_point`` in patchctl/registry/store/folder.py) makes
    the command stop the n-th time it reaches ``point`` — ``write`` (a blob or manifest half-written in
    ``tmp/``), ``ref`` (objects stored, a ref about to move), ``moved`` (a ref's log line appended, the index
    not updated) — and tell us its pid; n is drawn at random below the number of times the point is reached.
    Each kill is then classified from what it left (:func:`classify_kill`, the same as for the random kills),
    which must agree with the point. After each: :func:`_after_kill`'s checks; the re-run goes through the
    Python API (``cli_rerun``: the CLI). Kills per command, per class, and the checks' counts."""
    rng = random.Random(seed)
    ops = list(ops or ["push", "pull-folder", "merge", "compress"])
    expect = {"write": "mid-write", "ref": "mid-write", "moved": "after the ref moved"}
    pause_file = work / "paused.pid"
    with contextlib.ExitStack() as stack:
        table, reg_path, server, skipped = _crash_setup(stack, work, ops, seed, mib, rng)
        for name in ops:
            op = table[name]
            t0 = time.monotonic()
            _api_rerun(op, reg_path)  # the uninterrupted run: its digest is what every re-run must give
            op.wall = time.monotonic() - t0
            op.expected = refs_of(reg_path).get(op.target[0])
            op.reset(reg_path)
            # n is drawn in 1..high; "ref" only at the first move (after it, a target ref has moved)
            high = {"write": 12, "ref": 1, "moved": 1}  # a command's refs move together: "moved" once
            attempts = 0
            while op.stats["killed"] < kills and attempts < 3 * kills + 6:
                point = points[op.stats["killed"] % len(points)]  # a pause not reached does not skip a point
                attempts += 1
                n = rng.randint(1, high[point])
                keep = refs_of(reg_path)
                for t in op.target:
                    keep.pop(t, None)
                before, logs_before = file_state(reg_path), raw_ref_logs(reg_path, op.target)
                pause_file.unlink(missing_ok=True)
                env = {**os.environ, "PATCHCTL_TEST_PAUSE_AT": f"{point}:{n}", "PATCHCTL_TEST_PAUSE_FILE": str(pause_file)}
                p = subprocess.Popen(op.args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                deadline = time.monotonic() + 120
                while p.poll() is None and not pause_file.exists() and time.monotonic() < deadline:
                    time.sleep(0.005)
                if not pause_file.exists():  # the point was reached fewer than n times: draw lower next time
                    p.kill()
                    _, err = p.communicate()
                    op.stats["finished before the pause"] += 1
                    if p.returncode not in (0, -signal.SIGKILL):
                        op.failures.append(f"{point}:{n}: exit {p.returncode}: {err.decode()[-300:]}")
                    high[point] = max(1, n - 1)
                    op.reset(reg_path)
                    continue
                tmp_blobs = [q.name for q in (reg_path / "tmp").glob("blob-*")]
                p.kill()
                p.communicate()
                op.stats["killed"] += 1
                got = classify_kill(reg_path, before, logs_before, op.target)
                op.stats[got] += 1
                op.stats[f"at {point}"] += 1
                if got != expect[point] or (point == "write" and not tmp_blobs):
                    op.stats["class disagrees with the point"] += 1
                    op.failures.append(f"{point}:{n} classified {got!r}; tmp/ blobs at the kill: {tmp_blobs}")
                op.stats["a half-written blob in tmp/ at the kill"] += bool(tmp_blobs)
                rerun = (lambda op=op: run(op.args)) if cli_rerun else (lambda op=op: _api_rerun(op, reg_path))
                _after_kill(op, reg_path, keep, f"kill at {point}:{n}", rerun)
                op.reset(reg_path)
            if verbose:
                log(f"  {name}: {dict(op.stats)}")
        out = {"ops": {}, "skipped": skipped, "server_alive": server is None or server.poll() is None}
        for name in ops:
            op = table[name]
            out["ops"][name] = {"command": cmd_str(op.args).replace(str(work) + "/", ""), "wall": op.wall,
                                **dict(op.stats), "failures": op.failures[:10]}
    out = _crash_totals(out, kills * len(ops))
    out["ok"] = out["ok"] and not any(v.get("class disagrees with the point") for v in out["ops"].values())
    return out


# ============================================================================ 2. concurrency

OP_WEIGHTS = {"push": 25, "tag": 20, "rm": 10, "gc": 10, "pull": 15, "merge": 20}


def concurrency(work: Path, workers: int, ops: int, seed: int = 0, n_origin: int = 6, numel: int = 4096,
                timeout: float = 900, verbose: bool = True) -> dict[str, Any]:
    """``workers`` processes × ``ops`` mixed operations on one registry; see the module docstring."""
    from patchctl import Registry

    work.mkdir(parents=True, exist_ok=True)
    reg_path, origin = work / "reg", work / "origin"
    base = write_model(work / "base", {f"layers.{i}.weight": gaussian(i, numel, 0.02).reshape(64, -1)
                                       for i in range(4)})
    origin_refs = {}
    with Registry(origin) as o:
        for k in range(n_origin):
            origin_refs[f"o/p{k}:v1"] = synth_patch(
                o, f"o/p{k}:v1", {"a.weight": gaussian(500 + k, 65536).tobytes(),
                                  "b.weight": gaussian(600 + k % 2, 65536).tobytes(),  # shared between patches
                                  "c.bias": gaussian(700 + k, 64).tobytes()})
    with Registry(reg_path) as reg:
        reg.push(write_diff_file(work / "shared-a.safetensors", base, seed=10**6), "shared/a:v1", base=base)
    cfg = {"registry": str(reg_path), "origin": str(origin), "base": str(base), "ops": ops, "work": str(work),
           "origin_refs": origin_refs}
    t0 = time.monotonic()
    procs = []
    for w in range(workers):
        args = {**cfg, "wid": w, "seed": seed * 1000 + w, "log": str(work / f"worker-{w}.json")}
        procs.append(subprocess.Popen([PY, str(Path(__file__).resolve()), "--worker", json.dumps(args)], cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            errs.append(err.decode()[-2000:])
    wall = time.monotonic() - t0
    done: Counter = Counter()
    failed: Counter = Counter()
    fail_msgs: list[str] = []
    expected: dict[str, str | None] = {}
    for w in range(workers):
        path = work / f"worker-{w}.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        for rec in doc["ops"]:
            if rec["ok"]:
                done[rec["op"]] += 1
            else:
                failed[f"{rec['op']}: {rec['error'].split(':')[0]}"] += 1
                fail_msgs.append(f"w{w} {rec['op']}: {rec['error'][:200]}")
        expected.update(doc["expected"])
    lost, wrong_gone, incomplete = [], [], []
    with Registry(reg_path, create=False) as reg:
        fs = reg.fsck()
        for r, d in sorted(expected.items()):
            got = reg.store.ref_target(_ref(r))
            if d is None and got is not None:
                wrong_gone.append(r)
            elif d is not None and got != d:
                lost.append(f"{r}: expected {d[:15]}, got {got and got[:15]}")
        incomplete = incomplete_refs(reg)
        index_refs = reg.index.all_refs()
        n_refs = len(index_refs)
    out = {
        "workers": workers, "ops_per_worker": ops, "wall": wall, "completed": sum(done.values()),
        "by_op": dict(done), "failed": dict(failed), "failure_examples": fail_msgs[:8],
        "expected_refs": sum(1 for d in expected.values() if d is not None),
        "removed_refs": sum(1 for d in expected.values() if d is None), "lost_refs": lost,
        "removed_but_present": wrong_gone, "incomplete_refs": incomplete, "fsck_ok": fs["ok"],
        "fsck_problems": fs["problems"][:5], "blobs": fs["blobs"], "manifests": fs["manifests"],
        "refs": n_refs, "worker_errors": errs,
    }
    out["ok"] = (out["completed"] == workers * ops and not lost and not wrong_gone and not incomplete
                 and fs["ok"] and not errs)
    return out


SAME_REF = "shared/model:prod"


def same_ref(work: Path, workers: int = 4, pushes: int = 5, seed: int = 0, numel: int = 2048,
             timeout: float = 600, stall: bool = False) -> dict[str, Any]:
    """``workers`` processes push ``pushes`` different patches each to the **same** ``name:tag`` at once.

    ``stall``: worker 0 is held by the store's test hook (``PATCHCTL_TEST_PAUSE_AT=moved:1``) right after
    its first ref append, with the locks released and its index update still to come, until every other
    worker has finished: the interleaving in which a slow writer records its move in the index last.

    Afterwards, read straight from the ref logs: every successful push has its own entry in the tag's log
    and in ``name:latest``'s (no lost update), each log's chain checks, its seqs run 1..n and each entry's
    ``old`` is the entry before's ``new``; ``latest`` ends where the tag ends; the index (what ``ls``
    answers) agrees with each log's last entry before any fsck; then fsck is clean and ``tmp/`` empty."""
    from patchctl import Registry
    from patchctl.errors import LogDamaged

    work.mkdir(parents=True, exist_ok=True)
    reg_path = work / "reg"
    base = write_model(work / "base", {f"layers.{i}.weight": gaussian(seed + i, numel, 0.02) for i in range(2)})
    Registry(reg_path).close()
    go, go_others, paused = work / "go", work / "go-others", work / "paused.pid"
    procs = []
    for w in range(workers):
        n = 1 if stall and w == 0 else pushes  # the stalled writer's one move is then the index's last word
        cfg = {"registry": str(reg_path), "base": str(base), "work": str(work), "wid": w, "pushes": n,
               "seed": seed, "go": str(go if w == 0 or not stall else go_others), "ref": SAME_REF,
               "log": str(work / f"same-{w}.json")}
        env = dict(os.environ)
        if stall and w == 0:
            env.update(PATCHCTL_TEST_PAUSE_AT="moved:1", PATCHCTL_TEST_PAUSE_FILE=str(paused))
        procs.append(subprocess.Popen([PY, str(Path(__file__).resolve()), "--same-ref-worker", json.dumps(cfg)],
                                      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sum((work / f"ready-{w}").exists() for w in range(workers)) < workers \
            and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    go.touch()  # all at once: every worker has imported patchctl and written its inputs
    out_stall = None
    if stall:  # worker 0 first, until it stops at the hook; then the others
        while time.monotonic() < deadline and not paused.exists() and procs[0].poll() is None:
            time.sleep(0.005)
        out_stall = paused.exists()
        go_others.touch()
        for p in procs[1:]:  # the others finish while worker 0 waits between its log append and its index update
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        paused.unlink(missing_ok=True)
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            errs.append(err.decode()[-1500:])
    pushed: list[str] = []
    failed: list[str] = []
    for w in range(workers):
        f = work / f"same-{w}.json"
        if f.is_file():
            doc = json.loads(f.read_text())
            pushed += doc["digests"]
            failed += doc["errors"]
    name, tag = SAME_REF.split(":")
    out: dict[str, Any] = {"workers": workers, "pushes_each": pushes, "succeeded": len(pushed), "failed": failed[:5],
                           "worker_errors": errs, "refs": {}, "stalled": out_stall}
    with Registry(reg_path, create=False) as reg:
        index_refs = reg.index.all_refs()  # before fsck (which would rebuild a wrong index)
        for r in (SAME_REF, f"{name}:latest"):
            ref = _ref(r)
            row: dict[str, Any] = {}
            try:
                log_ = reg.store.ref_log(ref)
                row["chain_intact"] = True
            except LogDamaged as e:
                log_, row["chain_intact"] = [], False
                row["damage"] = str(e)
            news = [e.new for e in log_]
            row["entries"] = len(log_)
            row["lost_updates"] = sorted(set(pushed) - set(news))
            row["seq_1_to_n"] = [e.seq for e in log_] == list(range(1, len(log_) + 1))
            row["old_is_previous_new"] = all(log_[i].old == (log_[i - 1].new if i else None) for i in range(len(log_)))
            row["index_agrees"] = index_refs.get((ref.name, ref.tag)) == (log_[-1].new if log_ else None)
            row["target"] = log_[-1].new if log_ else None
            out["refs"][r] = row
        out["latest_equals_tag"] = out["refs"][SAME_REF]["target"] == out["refs"][f"{name}:latest"]["target"]
        fs = reg.fsck()
        out["fsck_ok"], out["fsck_problems"] = fs["ok"], fs["problems"][:5]
    out["tmp_left"] = sorted(p.name for p in (reg_path / "tmp").iterdir())
    expected = (workers - 1) * pushes + 1 if stall else workers * pushes
    out["ok"] = (not errs and not failed and len(pushed) == expected and out["fsck_ok"] and stall == bool(out_stall)
                 and out["latest_equals_tag"]
                 and not out["tmp_left"] and all(
                     r["chain_intact"] and not r["lost_updates"] and r["entries"] == len(pushed) and r["seq_1_to_n"]
                     and r["old_is_previous_new"] and r["index_agrees"] for r in out["refs"].values()))
    return out


def same_ref_worker(cfg: dict[str, Any]) -> None:
    """One same-ref writer: its diff files first, then, once ``go`` exists, its pushes (digests logged)."""
    from patchctl import Registry
    from patchctl.errors import PatchctlError

    wid, work = cfg["wid"], Path(cfg["work"])
    srcs = [write_diff_file(work / f"same-w{wid}-{j}.safetensors", Path(cfg["base"]),
                            seed=cfg["seed"] * 10**6 + wid * 1000 + j) for j in range(cfg["pushes"])]
    with Registry(cfg["registry"], create=False):
        pass  # the first open of a registry (index schema) before the race
    (work / f"ready-{wid}").touch()
    while not Path(cfg["go"]).exists():
        time.sleep(0.002)
    digests, errors = [], []
    for src in srcs:
        try:
            with Registry(cfg["registry"], create=False) as reg:
                digests.append(reg.push(src, cfg["ref"], base=cfg["base"]))
        except PatchctlError as e:
            errors.append(f"{type(e).__name__}: {e}")
    Path(cfg["log"]).write_text(json.dumps({"digests": digests, "errors": errors}))


def worker_main(cfg: dict[str, Any]) -> None:
    """One concurrency worker: ``ops`` random operations, then its log (ops done, expected refs)."""
    from patchctl import Registry
    from patchctl.errors import PatchctlError

    rng = random.Random(cfg["seed"])
    wid = cfg["wid"]
    expected: dict[str, str | None] = {}
    mine: list[str] = []  # my refs that resolve now
    pushed: list[str] = []  # my pushed refs that resolve now (merge inputs)
    records = []
    tmp = Path(cfg["work"]) / f"w{wid}"
    tmp.mkdir(exist_ok=True)
    names, weights = zip(*OP_WEIGHTS.items(), strict=True)
    for j in range(cfg["ops"]):
        op = rng.choices(names, weights)[0]
        if op in ("tag", "rm") and not mine or op == "merge" and not pushed:
            op = "push"
        t0 = time.monotonic()
        try:
            with Registry(cfg["registry"], create=False) as reg:
                if op == "push":
                    src = write_diff_file(tmp / f"d{j}.safetensors", Path(cfg["base"]), seed=wid * 100000 + j)
                    ref = f"w{wid}/p{j}:v1"
                    d = reg.push(src, ref, base=cfg["base"])
                    src.unlink()
                    for r in (ref, f"w{wid}/p{j}:latest"):
                        expected[r] = d
                        mine.append(r)
                    pushed.append(ref)
                elif op == "tag":
                    src = rng.choice(mine)
                    dst = f"w{wid}/alias:a{rng.randrange(3)}"
                    expected[dst] = reg.tag(src, dst)
                    if dst not in mine:
                        mine.append(dst)
                elif op == "rm":
                    r = rng.choice(mine)
                    reg.rm(r)
                    expected[r] = None
                    mine.remove(r)
                    if r in pushed:
                        pushed.remove(r)
                elif op == "gc":
                    reg.gc(prune_history=rng.random() < 0.5)
                elif op == "pull":
                    r = rng.choice(sorted(cfg["origin_refs"]))
                    s = reg.pull(r, cfg["origin"])
                    if s["digest"] != cfg["origin_refs"][r]:
                        raise AssertionError(f"pulled {r} as {s['digest']}")
                    expected[r] = s["digest"]
                elif op == "merge":
                    b = rng.choice(pushed)
                    ref = f"w{wid}/m{j}:v1"
                    res = reg.merge(["shared/a:v1", b], ref, validate=False)
                    for r in (ref, f"w{wid}/m{j}:latest"):
                        expected[r] = res.digest
                        mine.append(r)
            records.append({"op": op, "ok": True, "secs": time.monotonic() - t0})
        except (PatchctlError, Exception) as e:  # noqa: BLE001 - logged and counted by the parent
            records.append({"op": op, "ok": False, "secs": time.monotonic() - t0,
                            "error": f"{type(e).__name__}: {e}".replace("\n", " ")[:500],
                            "trace": traceback.format_exc()[-1500:]})
    Path(cfg["log"]).write_text(json.dumps({"wid": wid, "ops": records, "expected": expected}))


# ============================================================================ 3. corruption


def corruption(work: Path, n_blobs: int, n_manifests: int, seed: int = 0, http: bool = True,
               repair: bool = True) -> dict[str, Any]:
    """Flip one bit in ``n_blobs`` blobs and ``n_manifests`` manifests; what fsck, reads and pulls see, and
    (``repair``) what ``patchctl fsck --repair URL`` brings back from a ``patchctl serve`` of a clean copy."""
    import shutil

    from patchctl import Registry
    from patchctl.errors import DigestMismatch, PatchctlError

    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    n_patches = max(2 * n_manifests, n_blobs) + 4  # 4 blobs each: some patches stay sound
    patches: dict[str, str] = {}
    with Registry(src) as reg:
        for k in range(n_patches):
            ref = f"c/p{k}:v1"
            patches[ref] = synth_patch(reg, ref, {f"t{j}.weight": gaussian(seed * 10**6 + 10 * k + j, 16 + 97 * j).tobytes()
                                                  for j in range(4)})
    if repair:
        shutil.copytree(src, work / "mirror")  # the remote that holds good copies
    with Registry(src) as reg:
        blobs = sorted(d for d in reg.store.iter_digests("objects") if reg.store.blob_path(d).stat().st_size)
        manifests = sorted(reg.store.iter_digests("manifests"))
        bad_b = rng.sample(blobs, min(n_blobs, len(blobs)))
        bad_m = rng.sample(manifests, min(n_manifests, len(manifests)))
        for d in bad_b + bad_m:
            p = reg.store.blob_path(d) if d in bad_b else reg.store.manifest_path(d)
            data = bytearray(p.read_bytes())
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            os.chmod(p, 0o644)
            p.write_bytes(bytes(data))
        res = reg.fsck()
        got_b, got_m = set(res["corrupt_blobs"]), set(res["corrupt_manifests"])
        read_raises = 0
        for d in bad_b:
            try:
                reg.store.read_blob(d)
            except DigestMismatch:
                read_raises += 1
        for d in bad_m:
            try:
                reg.manifest(d)
            except DigestMismatch:
                read_raises += 1
        damaged = {}
        for ref, d in patches.items():
            m_bad = d in bad_m
            b_bad = False if m_bad else bool(set(reg.manifest(d).blob_digests()) & set(bad_b))
            damaged[ref] = m_bad or b_bad
    # pulls from the damaged registry: a damaged patch stores nothing, a sound one pulls
    pulled_ok = refused = wrong = 0
    errors: Counter = Counter()

    def pull_all(dst: Path, remote: str) -> None:
        nonlocal pulled_ok, refused, wrong
        with Registry(dst) as reg:
            for ref, is_bad in damaged.items():
                try:
                    s = reg.pull(ref, remote)
                    ok = not is_bad and s["digest"] == patches[ref]
                    pulled_ok += ok
                    wrong += not ok
                except PatchctlError as e:
                    errors[type(e).__name__] += 1
                    refused += is_bad
                    wrong += not is_bad
                    if reg.store.ref_target(_ref(ref)) is not None:
                        wrong += 1
            wrong += 0 if reg.fsck()["ok"] else 1

    pull_all(work / "dst-folder", str(src))
    if http:
        with serving(src) as (url, _):
            pull_all(work / "dst-http", url)
    out = {
        "flipped_blobs": len(bad_b), "flipped_manifests": len(bad_m),
        "detected_blobs": len(got_b & set(bad_b)), "detected_manifests": len(got_m & set(bad_m)),
        "false_positives": len(got_b - set(bad_b)) + len(got_m - set(bad_m)),
        "reads_raising_digest_mismatch": read_raises,
        "damaged_patches": sum(damaged.values()), "sound_patches": sum(not v for v in damaged.values()),
        "pulls": 2 if http else 1, "pulled_sound": pulled_ok, "refused_damaged": refused,
        "pull_mistakes": wrong, "pull_errors": dict(errors),
    }
    n = len(bad_b) + len(bad_m)
    out["detected_pct"] = 100.0 * (out["detected_blobs"] + out["detected_manifests"]) / max(1, n)
    out["ok"] = (out["detected_pct"] == 100.0 and out["false_positives"] == 0 and read_raises == n
                 and wrong == 0)
    if repair:
        with serving(work / "mirror") as (url, _):
            args = cli("fsck", "--repair", url, "--registry", src, "--json")
            t0 = time.monotonic()
            p = run(args)
        res = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
        aside = [q for q in (src / "tmp").iterdir() if q.name.startswith("corrupt-")]
        out["repair"] = {
            "command": cmd_str(args).replace(str(src), "reg"), "exit": p.returncode, "seconds": time.monotonic() - t0,
            "repaired": len(set(res.get("repaired", [])) & set(bad_b + bad_m)),
            "unrepaired": len(res.get("unrepaired", [])), "fsck_clean_after": bool(res.get("ok")),
            "moved_aside": len(aside), "error": p.stderr[-300:] if p.returncode else "",
        }
        out["ok"] &= (out["repair"]["repaired"] == n and p.returncode == 0 and res.get("ok") is True
                      and len(aside) == n)
    return out


FLIP_CLASSES = ("objects", "manifests", "refs", "records", "index")


def _flip_registry(path: Path, seed: int) -> dict[str, Any]:
    """A registry with every kind of file: patches, refs moved several times, validation records of patches
    and of a base; what its refs resolve to and what ``ls`` says (the truth a flipped bit must not change)."""
    from patchctl import Registry
    from patchctl.registry.store import records

    with Registry(path) as reg:
        for k in range(4):
            d1 = synth_patch(reg, f"f/p{k}:v1", {f"t{j}.weight": gaussian(seed * 1000 + 10 * k + j, 64 + 32 * j).tobytes()
                                                 for j in range(3)}, move_latest=True)
            synth_patch(reg, f"f/p{k}:v2", {"t0.weight": gaussian(seed * 1000 + 10 * k + 7, 96).tobytes()},
                        move_latest=True)
            reg.tag(f"f/p{k}:v1", f"f/p{k}:stable")
            records.add_validation(reg.store, d1, {"suite": "s", "score": 0.5 + k / 10, "n": 20})
            records.add_validation(reg.store, d1, {"suite": "s", "score": 0.6 + k / 10, "n": 20})
        records.add_validation(reg.store, "base:" + FAKE_FP, {"suite": "s", "score": 0.25, "n": 20})
        truth = {str(r): reg.store.ref_target(r) for r in reg.store.iter_refs()}
        return {"refs": truth, "ls": _ls_key(reg)}


def _ls_key(reg: Any) -> list[tuple[Any, ...]]:
    return sorted((r["name"], r["tag"], r["digest"], r.get("kind"), r.get("tensors")) for r in reg.ls())


def _flip_targets(path: Path, cls: str) -> list[Path]:
    if cls == "index":
        return [path / "index.sqlite"]
    sub = {"objects": "objects", "manifests": "manifests", "refs": "refs", "records": "records"}[cls]
    return sorted(q for q in (path / sub).rglob("*") if q.is_file() and q.stat().st_size)


def _index_used_offsets(data: bytes, values: list[str]) -> list[int]:
    """Offsets of bytes of the index that hold a value the files also hold (a digest, a name, a tag)."""
    out = []
    for v in values:
        b = v.encode()
        i = data.find(b)
        while i >= 0:
            out.extend(range(i, i + len(b)))
            i = data.find(b, i + 1)
    return out


def flip_one(pristine: Path, case: Path, cls: str, rng: random.Random, truth: dict[str, Any],
             where: str = "uniform") -> dict[str, Any]:
    """Copy ``pristine`` to ``case``, flip one bit of one file of class ``cls``, and see who notices.

    ``where``: ``uniform`` (any byte of the file), ``last-newline`` (a log's final newline: the torn-line
    case), ``row`` (index only: a byte of a stored digest, name or tag). Outcome: ``detected`` (fsck
    reports it, naming the file or the index), ``read refused`` (counted alongside: a read of what the
    byte belongs to raises, naming it), ``no effect`` (the bytes changed carry nothing: every answer and
    the index's contents as before), ``undetected`` (an answer changed and nothing said so), ``crash``
    (not a PatchctlError)."""
    import shutil
    import sqlite3

    from patchctl import Registry
    from patchctl.errors import DigestMismatch, LogDamaged, PatchctlError
    from patchctl.registry.store import records

    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(pristine, case)
    target = rng.choice(_flip_targets(case, cls))
    data = bytearray(target.read_bytes())
    if where == "last-newline":
        pos = len(data) - 1
    elif where == "row":
        vals = [d[7:] for d in truth["refs"].values() if d] + [r.split(":")[0] for r in truth["refs"]]
        pos = rng.choice(_index_used_offsets(bytes(data), vals))
    else:
        pos = rng.randrange(len(data))
    bit = rng.randrange(8)
    data[pos] ^= 1 << bit
    os.chmod(target, 0o644)
    target.write_bytes(bytes(data))
    rel = target.relative_to(case).as_posix()
    out: dict[str, Any] = {"class": cls, "file": rel, "offset": pos, "bit": bit, "where": where}
    logical_before = None
    if cls == "index":
        with contextlib.suppress(sqlite3.DatabaseError):
            logical_before = _index_dump(pristine / "index.sqlite")
    try:
        with Registry(case, create=False) as reg:
            set_aside = any(q.name.startswith("index.sqlite.damaged-") for q in (case / "tmp").iterdir())
            # what a reader sees before any fsck
            read_refused = False
            answers_right = True
            if cls in ("objects", "manifests"):
                d = "sha256:" + target.parent.name + target.name
                try:
                    reg.store.read_blob(d) if cls == "objects" else reg.manifest(d)
                except DigestMismatch as e:
                    read_refused = d in str(e)
            elif cls == "refs":
                name = target.parent.relative_to(case / "refs").as_posix()
                ref = f"{name}:{target.name[1:]}"
                try:
                    answers_right = reg.resolve(ref) == truth["refs"][ref]
                except LogDamaged as e:
                    read_refused = e.path == rel
            elif cls == "records":
                stem = target.stem
                subject = "base:sha256:" + stem[5:] if stem.startswith("base-") else "sha256:" + stem
                try:
                    records.read(reg.store, subject)
                except LogDamaged as e:
                    read_refused = e.path == rel
            else:
                try:
                    answers_right = _ls_key(reg) == truth["ls"]
                except PatchctlError as e:  # `ls` refused in one line: the damaged index is named
                    out["ls_error"] = f"{type(e).__name__}: {e}"
                    read_refused = "index.sqlite" in str(e)
            res = reg.fsck()
            named = {
                "objects": lambda: "sha256:" + target.parent.name + target.name in res["corrupt_blobs"],
                "manifests": lambda: "sha256:" + target.parent.name + target.name in res["corrupt_manifests"],
                "refs": lambda: rel in res["damaged_logs"],
                "records": lambda: rel in res["damaged_logs"],
                "index": lambda: set_aside or any(p.startswith("index:") for p in res["problems"]),
            }[cls]()
            detected = (not res["ok"] and named) or (cls == "index" and set_aside)
            after = reg.fsck() if cls == "index" else None  # the index is rebuilt by the first fsck
            if cls == "index":
                out["clean_after_rebuild"] = bool(after and after["ok"]) and _ls_key(reg) == truth["ls"]
            logical_after = None
            if cls == "index" and not detected:
                with contextlib.suppress(sqlite3.DatabaseError):
                    logical_after = _index_dump(case / "index.sqlite")
        out["read_refused"] = read_refused
        out["answers_right_before_fsck"] = answers_right
        if detected:
            out["outcome"] = "detected"
        elif cls == "index" and answers_right and logical_before is not None and logical_after == logical_before:
            out["outcome"] = "no effect"
        elif cls != "index" and answers_right and _same_entries(pristine, case, rel, cls):
            out["outcome"] = "no effect"
        else:
            out["outcome"] = "undetected"
    except PatchctlError as e:  # a one-line refusal naming the damage counts as detection
        out["outcome"] = "detected" if rel.split("/")[0] in str(e) or "index" in str(e) else "undetected"
        out["error"] = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - a crash: reported
        out["outcome"] = "crash"
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def _index_dump(path: Path) -> list[str]:
    import sqlite3

    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return sorted(con.iterdump())
    finally:
        con.close()


def _same_entries(pristine: Path, case: Path, rel: str, cls: str) -> bool:
    """The flipped log still reads as the same entries (e.g. a bit of the word ``chain`` of its last line)."""
    from patchctl.errors import LogDamaged
    from patchctl.registry.store import logfile

    if cls not in ("refs", "records"):
        return False
    try:
        a, b = logfile.read(pristine / rel), logfile.read(case / rel)
    except LogDamaged:
        return False
    strip = lambda es: [{k: v for k, v in e.items() if k in ("seq", "old", "new", "message", "user", "time",  # noqa: E731
                                                            "type", "record", "suite", "role")} for e in es]
    return strip(a) == strip(b)


def flips(work: Path, per_class: int, seed: int = 0, targeted: int = 0) -> dict[str, Any]:
    """One bit flipped in ``per_class`` random files of each class (objects, manifests, ref logs, record logs,
    the SQLite index), each in a fresh copy of one registry; per class: outcomes (see :func:`flip_one`) and
    the detection rate. ``targeted``: as many more flips of a log's final newline (refs, records) and of the
    index's stored digests and names (``row``)."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    pristine = work / "pristine"
    truth = _flip_registry(pristine, seed)
    results: list[dict[str, Any]] = []
    plan = [(c, "uniform") for c in FLIP_CLASSES for _ in range(per_class)]
    plan += [(c, "last-newline") for c in ("refs", "records") for _ in range(targeted)]
    plan += [("index", "row") for _ in range(targeted)]
    for i, (cls, where) in enumerate(plan):
        results.append(flip_one(pristine, work / f"case-{i % 2}", cls, rng, truth, where))
    table: dict[str, dict[str, Any]] = {}
    for r in results:
        key = r["class"] if r["where"] == "uniform" else f"{r['class']} ({r['where']})"
        row = table.setdefault(key, {"flips": 0, "detected": 0, "read refused": 0, "no effect": 0,
                                     "undetected": 0, "crash": 0, "wrong answers before fsck": 0, "examples": []})
        row["flips"] += 1
        row[r["outcome"]] += 1
        row["read refused"] += bool(r.get("read_refused"))
        row["wrong answers before fsck"] += not r.get("answers_right_before_fsck", True)
        if "clean_after_rebuild" in r:
            row["clean after fsck rebuilt it"] = row.get("clean after fsck rebuilt it", 0) + r["clean_after_rebuild"]
        if r["outcome"] in ("undetected", "crash") and len(row["examples"]) < 5:
            row["examples"].append(r)
    for row in table.values():
        effective = row["flips"] - row["no effect"]
        row["detected_pct"] = 100.0 * row["detected"] / max(1, effective)
    ok = all(row["undetected"] == 0 and row["crash"] == 0 for row in table.values())
    return {"classes": table, "ok": ok, "flips": len(results)}


# ============================================================================ 4. fuzz


@dataclass
class FuzzStats:
    tried: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)
    crashes: list[tuple[str, str, bytes]] = field(default_factory=list)
    crashed: Counter = field(default_factory=Counter)

    def record(self, target: str, fn: Callable[[bytes], Any], data: bytes) -> None:
        from patchctl.errors import PatchctlError

        self.tried[target] += 1
        try:
            fn(data)
            self.accepted[target] += 1
        except PatchctlError:
            pass
        except Exception as e:  # noqa: BLE001 - a crash: counted, the first few kept
            self.crashed[target] += 1
            if len(self.crashes) < 50:
                self.crashes.append((target, f"{type(e).__name__}: {str(e)[:200]}", data[:400]))


class Targets:
    """The fuzzed entry points, each ``bytes -> anything`` (raises PatchctlError on bad input).

    Shared by tests/test_fuzz.py (hypothesis and the seeded mutator) and bench/fuzz_atheris.py (atheris).
    """

    def __init__(self, scratch: Path):
        self.path = scratch / "fuzz.safetensors"
        self.adapter = scratch / "adapter"  # a PEFT folder: adapter_config.json is the input
        self.adapter.mkdir(parents=True, exist_ok=True)

    def safetensors(self, data: bytes) -> None:
        from patchctl.registry.formats.safetensors import SafetensorsFile

        self.path.write_bytes(data)
        f = SafetensorsFile(self.path)
        for name, info in f.tensors.items():  # what the parser accepts must also read
            if info.nbytes <= 1 << 20:
                t = f.read(name)
                assert tuple(t.shape) == info.shape

    @staticmethod
    def manifest(data: bytes) -> None:
        from patchctl.registry.store import manifest

        m = manifest.parse(data)
        assert manifest.parse(m.to_bytes()).to_bytes() == m.to_bytes()  # what parses, round-trips

    def peft(self, data: bytes) -> None:
        from patchctl.registry.ops.importing import ADAPTER_CONFIG, read_peft_config

        (self.adapter / ADAPTER_CONFIG).write_bytes(data)
        read_peft_config(self.adapter)  # the file reader itself: its JSON errors too, not only the checker

    @staticmethod
    def codec(data: bytes) -> None:
        from patchctl.patches.codec import decode, encode, to_dense

        sp = decode(data)
        encode(sp)
        if sp.numel <= 1 << 20:
            to_dense(sp)


def seed_inputs() -> dict[str, list[bytes]]:
    """Valid inputs of every target, to mutate."""
    import numpy as np
    import torch

    from patchctl.patches.codec import SparseTensor, encode
    from patchctl.registry.formats.safetensors import header_bytes
    from patchctl.registry.store.manifest import Manifest, TensorEntry

    st_seeds = []
    for entries, meta in [([("a", "float32", (2, 3)), ("b", "float16", (4,)), ("c", "int8", (0,))], None),
                          ([("x.weight", "bfloat16", (3, 2))], {"format": "pt"}),
                          ([("e", "float64", ())], None)]:
        head, offs = header_bytes(entries, meta)
        size = max((e for _, e in offs.values()), default=0)
        st_seeds.append(head + bytes(range(256)) * (size // 256) + bytes(size % 256))
    d = "sha256:" + "ab" * 32
    mans = [
        Manifest("diff", {"fingerprint": FAKE_FP, "name": "base", "revision": None},
                 {"w": TensorEntry(d, "float32", (2, 3), "raw", 24),
                  "v": TensorEntry(d, "bfloat16", (5,), "sparse-v1", 77, {"digest": d, "count": 2, "size": 40})},
                 {"dtype": "auto"}, (FAKE_FP,), {"op": "merge", "weights": [1.0, 0.5]}, {"task": "math", "n": [1, 2]}),
        Manifest("lora", {"fingerprint": d, "name": "m", "revision": "abc"},
                 {"base_model.model.q.lora_A.weight": TensorEntry(d, "float16", (4, 8), "raw", 64)},
                 {"peft_type": "LORA", "r": 4, "lora_alpha": 8}),
    ]
    peft = [{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
             "rank_pattern": {"q": 4}, "alpha_pattern": {"v": 2.5}, "use_rslora": False, "fan_in_fan_out": False,
             "base_model_name_or_path": "org/model", "bias": "none", "task_type": "CAUSAL_LM"},
            {"peft_type": "LORA", "r": 1, "target_modules": "all-linear"}]
    rng = np.random.default_rng(0)
    sp = [
        SparseTensor((40, 50), torch.float32, np.sort(rng.choice(2000, 150, replace=False)).astype(np.int64),
                     "ternary", signs=rng.random(150) < 0.5, scale=0.75),
        SparseTensor((2000,), torch.bfloat16, np.sort(rng.choice(2000, 150, replace=False)).astype(np.int64),
                     "values", values=torch.randn(150, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)),
        SparseTensor((50_000,), torch.float16, np.arange(0, 50_000, 2, dtype=np.int64), "values",
                     values=torch.full((25_000,), 0.5)),
        SparseTensor((7,), torch.float32, np.arange(7, dtype=np.int64), "ternary", signs=np.ones(7, bool), scale=2.0),
        SparseTensor((3, 0), torch.float32, np.zeros(0, dtype=np.int64), "ternary", signs=np.zeros(0, bool), scale=0.0),
    ]
    return {"safetensors": st_seeds, "manifest": [m.to_bytes() for m in mans],
            "peft": [json.dumps(c).encode() for c in peft], "codec": [encode(s) for s in sp]}


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One to four byte-level edits: bit flips, byte sets, interesting ints, inserts, deletes, splices."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 4))):
        how = rng.randrange(9)
        pos = rng.randrange(len(buf) + 1)
        if how == 0 and buf:
            buf[pos % len(buf)] ^= 1 << rng.randrange(8)
        elif how == 1 and buf:
            buf[pos % len(buf)] = rng.randrange(256)
        elif how == 2 and len(buf) >= 8:  # an "interesting" little-endian integer
            v = rng.choice([0, 1, 0x7F, 0xFF, 0xFFFF, 2**31 - 1, 2**32 - 1, 2**40, 2**60, 2**62, 2**63 - 1, 2**64 - 1])
            w = rng.choice((1, 2, 4, 8))
            p = min(pos, len(buf) - w)
            buf[p:p + w] = (v & ((1 << (8 * w)) - 1)).to_bytes(w, "little")
        elif how == 3:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 1, 2, 8))))
        elif how == 4 and buf:
            del buf[pos % len(buf): pos % len(buf) + rng.choice((1, 1, 4, 16))]
        elif how == 5:
            del buf[pos:]
        elif how == 6:  # JSON-ish tokens where they hurt
            tok = rng.choice([b"[", b"{", b"]", b"}", b",", b":", b'"', b"null", b"true", b"-1", b"1e309", b"NaN",
                              b"Infinity", b"[]", b"{}", b"9" * 30, b"9" * 5000, b"[" * 5000, b"\\u0000", b"\xff"])
            buf[pos:pos] = tok
        elif how == 7 and pool:  # splice another seed in
            other = rng.choice(pool)
            a = rng.randrange(len(other) + 1)
            buf[pos:] = other[a:]
        elif how == 8 and buf:  # duplicate a chunk
            a = rng.randrange(len(buf))
            buf[pos:pos] = buf[a:a + rng.randrange(1, 64)]
    return bytes(buf)


def json_mutate(rng: random.Random, data: bytes) -> bytes:
    """Replace one value inside a JSON document by a hostile one (types, huge ints, deep nesting...)."""
    doc = json.loads(data)
    hostile = [None, True, False, 0, -1, 1.5, float("nan"), float("inf"), 2**63, 2**64 + 1, -(2**63) - 1, 10**40,
               "", "x" * 2000, "\u0000", "sha256:" + "0" * 64, "sha256:" + "G" * 64, [], {}, [[]], [1, -1],
               [2**62, 2**62], [2**40 - 1] * 8, [0, 2**63], {"a": {}}, ["a"], "F32", "float32", "LORA", "raw",
               "sparse-v1", "../../etc/passwd", 123456789]
    paths: list[list[Any]] = []

    def walk(x: Any, path: list[Any]) -> None:
        paths.append(path)
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, [*path, k])
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, [*path, i])

    walk(doc, [])
    for _ in range(rng.choice((1, 1, 2, 3))):
        path = rng.choice(paths)
        new = copy.deepcopy(rng.choice(hostile))  # never the same object twice (a cycle)
        if not path:
            doc = new
            break
        parent = doc
        try:
            for k in path[:-1]:
                parent = parent[k]
            if rng.random() < 0.15 and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif rng.random() < 0.1 and isinstance(parent, dict):
                parent[rng.choice(["__metadata__", "extra", "", "\x7f"])] = new
            else:
                parent[path[-1]] = new
        except (KeyError, IndexError, TypeError):
            continue
    return json.dumps(doc, allow_nan=True).encode()


def st_structured(rng: random.Random) -> bytes:
    """A safetensors file with a well-formed length prefix and a header of hostile entries."""
    header: dict[str, Any] = {}
    size = rng.choice((0, 8, 64, 4096))
    for i in range(rng.randrange(0, 4)):
        shape = rng.choice([[], [0], [2, 2], [2**30, 2**30], [2**62, 4], [0, 2**63], [2**64], [-1], [1.5], [True],
                            [2**31, 0, 2**40], [rng.randrange(0, 70)], "3", None])
        begin = rng.choice([0, 8, size, 2**63, -8, 2**64])
        end = rng.choice([0, 8, 16, size, size + 1, 2**63, 2**64 + 8])
        header[f"t{i}"] = {"dtype": rng.choice(["F32", "BF16", "U8", "F8_E4M3", "X", 1, None, ["F32"]]),
                           "shape": shape, "data_offsets": rng.choice([[begin, end], [begin], "0,1", [begin, end, 0]])}
    if rng.random() < 0.3:
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"a": 1}, [], "x", None])
    raw = json.dumps(header).encode()
    n = len(raw) if rng.random() < 0.9 else rng.choice([0, 2**63, 100 * MiB + 1, len(raw) + 1])
    return struct.pack("<Q", n) + raw + bytes(size)


def codec_structured(rng: random.Random) -> bytes:
    """A sparse blob header with plausible-or-hostile fields, and sections of random lengths."""
    ndim = rng.choice((0, 1, 2, 3, 64, 65))
    shape = [rng.choice((0, 1, 7, 1000, 2**20, 2**31, 2**40, 2**62, 2**64 - 1)) for _ in range(min(ndim, 6))]
    shape += [1] * (ndim - len(shape))
    nnz = rng.choice((0, 1, 7, 150, 2**20, 2**40, 2**62, 2**64 - 1))
    lens = [rng.choice((0, 1, 8, 19, 2**20, 2**63)) for _ in range(4)]
    body = b"".join(os.urandom(min(x, 64)) for x in lens)
    header = struct.pack("<4sBBBBBBBBIQQQQQ", b"PCSP", 1, rng.choice((1, 2, 3)), rng.choice((0, 1, 2, 3, 4)),
                         rng.choice((0, 1, 2, 3, 4)), ndim & 0xFF, rng.choice((0, 1, 2, 3, 4)),
                         rng.choice((0, 1, 4, 8, 62, 63)), rng.choice((0, 1, 2)),
                         rng.choice((0, 0x3F400000, 0x7F800000, 0xFFFFFFFF)), nnz, *[min(x, 2**64 - 1) for x in lens])
    return header + struct.pack(f"<{ndim}Q", *shape) + body


def huge_claims() -> list[tuple[str, bytes]]:
    """Small inputs whose headers claim enormous tensors: each must be refused without allocating them."""
    d = "sha256:" + "ab" * 32
    out = []
    for shape in ([2**30, 2**30], [2**60], [2**40, 2**40, 2**40], [2**63, 1]):
        hdr = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * 2**60]}}).encode()
        out.append(("safetensors", struct.pack("<Q", len(hdr)) + hdr + bytes(8)))
    out.append(("safetensors", struct.pack("<Q", 100 * MiB) + b"{}"))  # header length past the end of the file
    out.append(("safetensors", struct.pack("<Q", 2**63) + b"{}"))
    for shape in ([2**39, 2**39], [2**39] * 8):
        doc = {"schema": 1, "kind": "diff", "base": {"fingerprint": FAKE_FP, "name": "b", "revision": None},
               "tensors": {"w": {"digest": d, "dtype": "float64", "shape": shape, "encoding": "sparse-v1",
                                 "size": 2**62}}, "params": {}, "lineage": {"parents": [], "recipe": None},
               "metadata": {}}
        out.append(("manifest", json.dumps(doc).encode()))
    hp = struct.Struct("<4sBBBBBBBBIQQQQQ")
    out.append(("codec", hp.pack(b"PCSP", 1, 2, 2, 2, 1, 3, 0, 1, 0, 2**40, 0, 0, 0, 10) + struct.pack("<Q", 2**40)
                + bytes(10)))
    out.append(("codec", hp.pack(b"PCSP", 1, 1, 1, 0, 2, 3, 0, 0, 0x3F800000, 2**60, 0, 0, 2**57, 0)
                + struct.pack("<2Q", 2**30, 2**30)))
    out.append(("codec", hp.pack(b"PCSP", 1, 1, 1, 0, 1, 1, 62, 0, 0x3F800000, 2**61, 1, 2**63, 2**58, 0)
                + struct.pack("<Q", 2**62) + b"\x01"))
    out.append(("codec", hp.pack(b"PCSP", 1, 2, 1, 1, 1, 2, 8, 0, 0, 2**50, 9, 0, 0, 2**52) + struct.pack("<Q", 2**62)
                + bytes(9)))
    out.append(("peft", json.dumps({"peft_type": "LORA", "r": 2**62, "lora_alpha": 1e308,
                                    "rank_pattern": {"x": 2**62}}).encode()))
    return out


def memory_check(targets: Targets) -> dict[str, Any]:
    """Peak traced allocation while refusing each huge claim (tracemalloc sees Python and numpy buffers)."""
    import tracemalloc

    from patchctl.errors import PatchctlError

    fns = {"safetensors": targets.safetensors, "manifest": targets.manifest, "peft": targets.peft,
           "codec": targets.codec}
    worst = 0
    crashes = []
    for target, data in huge_claims():
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            fns[target](data)
        except PatchctlError:
            pass
        except Exception as e:  # noqa: BLE001
            crashes.append(f"{target}: {type(e).__name__}: {e}")
        secs = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        worst = max(worst, peak)
        if secs > 1.0:
            crashes.append(f"{target}: took {secs:.1f} s")
    return {"inputs": len(huge_claims()), "peak_traced_bytes": worst, "problems": crashes}


def fuzz(work: Path, total: int, seed: int = 0, hypothesis_share: float = 0.2) -> dict[str, Any]:
    """``total`` inputs over the four targets: hypothesis strategies, then the mutator; counts and crashes."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as hst

    targets = Targets(work)
    fns = {"safetensors": targets.safetensors, "manifest": targets.manifest, "peft": targets.peft,
           "codec": targets.codec}
    seeds = seed_inputs()
    stats = FuzzStats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    per = total // len(fns)
    n_hyp = int(per * hypothesis_share)
    # hypothesis: random bytes, structured JSON, and mutated seeds, per target
    strat = hypothesis_strategies(hst, seeds)
    def runner(target: str, s: Any) -> Callable[[], None]:
        @settings(max_examples=n_hyp, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(s)
        def one(data: bytes) -> None:
            stats.record(target, fns[target], data)

        return one

    for target, s in strat.items():
        if n_hyp:
            runner(target, s)()
    t_hyp = time.monotonic() - t0
    # the mutator: mutate seeds (and the occasional JSON-aware edit, or a structured header)
    rng = random.Random(seed)
    for target, fn in fns.items():
        pool = seeds[target]
        while stats.tried[target] < per:
            r = rng.random()
            if target in ("manifest", "peft") and r < 0.35:
                data = json_mutate(rng, rng.choice(pool))
            elif target == "safetensors" and r < 0.2:
                data = st_structured(rng)
            elif target == "codec" and r < 0.2:
                data = codec_structured(rng)
            else:
                data = mutate(rng, rng.choice(pool), pool)
            stats.record(target, fn, data)
    mem = memory_check(targets)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"tried": dict(stats.tried), "total": sum(stats.tried.values()), "accepted": dict(stats.accepted),
           "crashes": sum(stats.crashed.values()), "crashes_by_target": dict(stats.crashed), "crash_examples": [(t, m, d[:120].hex()) for t, m, d in stats.crashes[:10]],
           "crash_kinds": sorted({f"{t}: {m.split(':')[0]}" for t, m, _ in stats.crashes}),
           "seconds": time.monotonic() - t0, "hypothesis_seconds": t_hyp, "hypothesis_per_target": n_hyp,
           "max_rss_growth_mib": (rss1 - rss0) / 1024, "memory": mem}
    out["ok"] = out["crashes"] == 0 and not mem["problems"] and mem["peak_traced_bytes"] < 16 * MiB \
        and out["total"] >= total
    return out


# ---------------------------------------------------------------------------- fuzzing through `push`

PUSH_KINDS = ("diff file", "fine-tune folder", "adapter weights", "adapter config")


def push_seed_inputs(work: Path) -> dict[str, Any]:
    """A base and a valid input of every kind ``push`` takes, as bytes to mutate: a diff safetensors file, a
    fine-tuned model folder's ``model.safetensors``, a PEFT folder's ``adapter_model.safetensors`` and its
    ``adapter_config.json``."""
    import numpy as np
    from safetensors.numpy import save

    tensors = {"layers.0.q.weight": gaussian(1, 64, 0.02).reshape(8, 8),
               "layers.0.v.weight": gaussian(2, 64, 0.02).reshape(8, 8), "layers.0.norm.bias": gaussian(3, 8)}
    base = write_model(work / "base", tensors)
    diff = save({k: gaussian(10 + i, v.size, 1e-3).reshape(v.shape) for i, (k, v) in enumerate(tensors.items())})
    ft = save({k: v + gaussian(20 + i, v.size, 1e-3).reshape(v.shape) for i, (k, v) in enumerate(tensors.items())},
              metadata={"format": "pt"})
    lora = {}
    for i, m in enumerate(("q", "v")):
        lora[f"base_model.model.layers.0.{m}.lora_A.weight"] = gaussian(30 + i, 16, 0.1).reshape(2, 8)
        lora[f"base_model.model.layers.0.{m}.lora_B.weight"] = np.ascontiguousarray(
            gaussian(40 + i, 16, 0.1).reshape(8, 2))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q", "v"],
           "base_model_name_or_path": str(base), "task_type": "FEATURE_EXTRACTION"}
    return {"base": base, "diff file": diff, "fine-tune folder": ft,
            "adapter weights": save(lora), "adapter config": json.dumps(cfg).encode()}


def _push_input(rng: random.Random, kind: str, seeds: dict[str, Any]) -> bytes:
    seed = seeds[kind]
    if kind == "adapter config":
        return json_mutate(rng, seed) if rng.random() < 0.6 else mutate(rng, seed, [seed])
    return st_structured(rng) if rng.random() < 0.1 else mutate(rng, seed, [seeds[k] for k in PUSH_KINDS[:3]])


def _lay_out(folder: Path, kind: str, data: bytes, seeds: dict[str, Any]) -> Path:
    """The input of kind ``kind`` with ``data`` in place of its mutated file, where ``push`` will read it."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if kind == "diff file":
        (folder / "diff.safetensors").write_bytes(data)
        return folder / "diff.safetensors"
    if kind == "fine-tune folder":
        (folder / "model.safetensors").write_bytes(data)
        (folder / "config.json").write_text(json.dumps({"_name_or_path": "fuzzed-finetune"}))
        return folder
    (folder / "adapter_model.safetensors").write_bytes(data if kind == "adapter weights" else seeds["adapter weights"])
    (folder / "adapter_config.json").write_bytes(data if kind == "adapter config" else seeds["adapter config"])
    return folder


def push_fuzz(work: Path, total: int, seed: int = 0, time_bound: float = 5.0) -> dict[str, Any]:
    """``total`` mutated inputs (see :data:`PUSH_KINDS`) pushed, one at a time, by a worker process
    (``Registry.push``, the base given); each must be answered — a digest or a PatchctlError — within
    ``time_bound`` seconds, else it counts as a hang and the worker is killed and restarted. After every
    refused input the registry's state (manifests, refs, records, the index's rows, ``tmp/``) must be what
    it was before; new blobs that nothing refers to are counted apart (a tensor refused after others were
    stored: only ``gc`` deletes). A crash is any other exception (the worker reports its traceback)."""
    import select

    from patchctl import Registry

    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    seeds = push_seed_inputs(work)
    reg_path = work / "reg"
    Registry(reg_path).close()
    stats: dict[str, Counter] = {k: Counter() for k in PUSH_KINDS}
    problems: list[dict[str, Any]] = []
    slowest = 0.0
    worker: subprocess.Popen | None = None

    warm = {"registry": str(reg_path), "warm_registry": str(work / "warm-reg"), "base": str(seeds["base"]),
            "warm_src": str(_lay_out(work / "warm", "diff file", seeds["diff file"], seeds))}

    def start() -> subprocess.Popen:
        w = subprocess.Popen([PY, str(Path(__file__).resolve()), "--push-fuzz-worker", json.dumps(warm)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             bufsize=1)
        ready = w.stdout.readline()  # the worker's imports are not the inputs' time
        if ready.strip() != "@@ready":
            raise RuntimeError(f"push fuzz worker did not start: {ready!r}")
        return w

    def answer(w: subprocess.Popen, deadline: float) -> dict[str, Any] | None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([w.stdout], [], [], left)[0]:
                return None
            line = w.stdout.readline()
            if not line:
                w.communicate()
                return {"crash": f"the worker died (exit {w.returncode})"}
            if line.startswith("@@"):
                return json.loads(line[2:])

    t0 = time.monotonic()
    state = _reg_state(reg_path)
    for i in range(total):
        kind = PUSH_KINDS[i % len(PUSH_KINDS)]
        data = _push_input(rng, kind, seeds)
        src = _lay_out(work / "input", kind, data, seeds)
        if worker is None or worker.poll() is not None:
            worker = start()
        started = time.monotonic()
        worker.stdin.write(json.dumps({"src": str(src), "ref": f"fz/i{i}:v1", "base": str(seeds["base"])}) + "\n")
        worker.stdin.flush()
        got = answer(worker, started + time_bound)
        secs = time.monotonic() - started
        slowest = max(slowest, secs)
        st = stats[kind]
        st["inputs"] += 1
        if got is None:
            st["over the time bound"] += 1
            worker.kill()
            worker.communicate()  # reaps it and closes its pipes
            worker = None
            problems.append({"kind": kind, "why": f"no answer in {time_bound} s", "input": data[:300].hex()})
            state = _reg_state(reg_path)  # whatever the killed push left is the next baseline
            continue
        if "crash" in got:
            st["crashes"] += 1
            problems.append({"kind": kind, "why": got["crash"][-800:], "input": data[:300].hex()})
        elif "digest" in got:
            st["accepted"] += 1
            state = _reg_state(reg_path)
            continue
        else:
            st["refused"] += 1
            st[f"refused: {got['error']}"] += 1
        now = _reg_state(reg_path)
        if now != state:
            changed = sorted(k for k in set(now) | set(state) if now.get(k) != state.get(k))
            # a push refused at a later tensor (NaN) keeps the blobs it stored: only gc deletes (design.md)
            visible = [k for k in changed if not (k.startswith("objects/") and k not in state)]
            if visible:
                st["registry changed by a refused input"] += 1
                problems.append({"kind": kind, "why": f"changed: {visible[:4]}", "answer": got,
                                 "input": data[:300].hex()})
            else:
                st["refused, leaving blobs nothing refers to (gc collects them)"] += 1
            state = now
    if worker is not None:
        worker.communicate(timeout=60)  # closes its stdin: the worker's loop ends
    with Registry(reg_path, create=False) as reg:
        fs = reg.fsck()
    left = sorted(q.name for q in (reg_path / "tmp").iterdir())
    tot = Counter()
    for c in stats.values():
        tot.update(c)
    out = {"inputs": total, "by_kind": {k: dict(v) for k, v in stats.items()}, "total": dict(tot),
           "slowest_s": round(slowest, 3), "time_bound_s": time_bound, "seconds": round(time.monotonic() - t0, 1),
           "problems": problems[:10], "fsck_ok": fs["ok"], "fsck_problems": fs["problems"][:5], "tmp_left": left}
    out["ok"] = (not tot["over the time bound"] and not tot["crashes"] and not tot["registry changed by a refused input"]
                 and fs["ok"] and not left and tot["inputs"] == total)
    return out


def _reg_state(reg_path: Path) -> dict[str, str]:
    """Digest of every file that carries state, and of the index's rows (a refused push changes none)."""
    import hashlib
    import sqlite3

    out = {}
    for sub in ("objects", "manifests", "refs", "records", "tmp"):
        for q in sorted((reg_path / sub).rglob("*")):
            if q.is_file():
                out[q.relative_to(reg_path).as_posix()] = hashlib.sha256(q.read_bytes()).hexdigest()
    con = sqlite3.connect(f"file:{reg_path / 'index.sqlite'}?mode=ro", uri=True)
    try:
        out["index rows"] = hashlib.sha256("\n".join(sorted(con.iterdump())).encode()).hexdigest()  # any row order
    finally:
        con.close()
    return out


def push_fuzz_worker(cfg: dict[str, str]) -> None:
    """Push each input named on stdin; answer ``@@{"digest"}``, ``@@{"error"}`` or ``@@{"crash"}`` on stdout.

    First one valid push into a scratch registry, so that no input's time includes the lazy imports."""
    import io

    from patchctl import Registry
    from patchctl.errors import PatchctlError

    reg_path = cfg["registry"]
    with Registry(cfg["warm_registry"]) as warm:
        warm.push(cfg["warm_src"], "warm:v1", base=cfg["base"])
    real_stdout = sys.stdout
    print("@@ready", file=real_stdout, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout = io.StringIO()  # whatever a push prints is not an answer
        try:
            with Registry(reg_path, create=False) as reg:
                ans = {"digest": reg.push(job["src"], job["ref"], base=job["base"])}
        except PatchctlError as e:
            ans = {"error": type(e).__name__, "message": str(e)[:300]}
        except Exception:  # noqa: BLE001 - a crash: reported to the parent
            ans = {"crash": traceback.format_exc()}
        finally:
            sys.stdout = real_stdout
        print("@@" + json.dumps(ans), file=real_stdout, flush=True)


def hypothesis_strategies(hst: Any, seeds: dict[str, list[bytes]]) -> dict[str, Any]:
    """Per target: random bytes | structured JSON | mutated valid seeds (hypothesis-driven edits)."""
    json_leaf = hst.one_of(hst.none(), hst.booleans(), hst.integers(-(2**70), 2**70), hst.floats(allow_nan=True),
                           hst.text(max_size=20), hst.sampled_from(["F32", "BF16", "float32", "raw", "sparse-v1",
                                                                     "LORA", "sha256:" + "0" * 64, "diff", "lora"]))
    json_val = hst.recursive(json_leaf, lambda c: hst.lists(c, max_size=4) | hst.dictionaries(
        hst.sampled_from(["schema", "kind", "base", "tensors", "digest", "dtype", "shape", "encoding", "size",
                          "pins", "params", "lineage", "parents", "recipe", "metadata", "fingerprint", "name",
                          "revision", "data_offsets", "__metadata__", "peft_type", "r", "lora_alpha",
                          "rank_pattern", "alpha_pattern", "target_modules", "use_dora", "use_rslora",
                          "fan_in_fan_out", "w", "x"]) | hst.text(max_size=8), c, max_size=5), max_leaves=25)

    def mutated(pool: list[bytes]) -> Any:
        return hst.builds(lambda d, s: mutate(random.Random(s), d, pool), hst.sampled_from(pool),
                          hst.integers(0, 2**32))

    def json_mutated(pool: list[bytes]) -> Any:
        return hst.builds(lambda d, s: json_mutate(random.Random(s), d), hst.sampled_from(pool),
                          hst.integers(0, 2**32))

    as_json = json_val.map(lambda v: json.dumps(v, allow_nan=True).encode())
    st_struct = hst.integers(0, 2**32).map(lambda s: st_structured(random.Random(s)))
    st_json = as_json.map(lambda raw: struct.pack("<Q", len(raw)) + raw + bytes(16))
    codec_struct = hst.integers(0, 2**32).map(lambda s: codec_structured(random.Random(s)))
    return {
        "safetensors": hst.one_of(hst.binary(max_size=300), st_json, st_struct, mutated(seeds["safetensors"])),
        "manifest": hst.one_of(hst.binary(max_size=200), as_json, mutated(seeds["manifest"]),
                               json_mutated(seeds["manifest"])),
        "peft": hst.one_of(hst.binary(max_size=100), as_json, mutated(seeds["peft"]), json_mutated(seeds["peft"])),
        "codec": hst.one_of(hst.binary(max_size=200), hst.binary(max_size=200).map(lambda b: b"PCSP\x01" + b),
                            codec_struct, mutated(seeds["codec"])),
    }


# ============================================================================ 5. server abuse


def raw_exchange(url: str, payload: bytes, timeout: float = 10.0, read_limit: int = 64 * MiB) -> tuple[int | None, bytes]:
    """Send raw bytes; (status or None when the server closed without answering, the whole response).

    The socket is not half-closed (Starlette drops a streamed response when the client's side is closed):
    reading stops at EOF, or 0.5 s after the last byte (a server keeping the connection open)."""
    host, port = url.removeprefix("http://").split(":")
    chunks = []
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(payload)
        except OSError:  # the server closed while we were still sending (oversized request)
            pass
        total = 0
        try:
            while total < read_limit:
                b = s.recv(1 << 16)
                if not b:
                    break
                chunks.append(b)
                total += len(b)
                s.settimeout(0.5)
        except OSError:
            pass
    data = b"".join(chunks)
    if not data.startswith(b"HTTP/"):
        return None, data
    try:
        return int(data.split(b" ", 2)[1]), data
    except (IndexError, ValueError):
        return None, data


def get(path: str, headers: dict[str, str] | None = None, method: str = "GET") -> bytes:
    hs = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{hs}\r\n".encode("latin-1")


@dataclass
class Abuse:
    category: str
    name: str
    payload: bytes
    accept: tuple[int, ...]  # acceptable statuses; None in accept_close means a closed connection is fine too
    accept_close: bool = False
    max_body: int | None = None  # for Range abuse: the response may not be much larger than the blob
    note: str = ""  # set when the request is tolerated (served normally, harmlessly): what uvicorn/Starlette do


# traversal paths tests/test_server.py already sends (the bench sends them too; the tests only the others)
TRAVERSAL_IN_TEST_SERVER = [
    "/v2/../config.json", "/v2/team/../../config.json/manifests/v1", "/v2/%2e%2e/%2e%2e/config.json/tags/list",
    "/v2/team%2fmath/manifests/v1", "/v2/team/math/blobs/..%2F..%2Fconfig.json", "/v2/team/math/blobs/%2E%2E%2fconfig.json",
    "/api/patches/..%2f..%2fconfig.json/x", "/v2/team/math/manifests/..", "/v2/team/math/blobs/sha256:..%5c..%5cconfig.json",
    "/v2/team/math/blobs/sha256%3a..%2f..%2fconfig.json", "/v2/team/./math/manifests/v1", "/v2/team/math/manifests/v1%00"]


def abuse_cases(blob: str, blob_size: int, manifest_ref: str = "team/math/manifests/v1") -> list[Abuse]:
    cases = []
    trav = TRAVERSAL_IN_TEST_SERVER + [
        "/../../etc/passwd", "//etc/passwd", "/v2/..;/config.json", "/v2/%252e%252e/config.json/tags/list",
        "/v2/team\\..\\config.json", "/v2/team/math/blobs/" + blob + "/../../../config.json",
        "/v2/..%c0%af../config.json/tags/list", "/v2/%2e/manifests/v1",
        "/v2/team/math/manifests/%2e%2e%2f%2e%2e%2fconfig.json", "/objects/", "/config.json", "/index.sqlite",
        "/v2/team/math/blobs/../../index.sqlite", "/refs/team/math/@v1", "/v2/" + "../" * 50 + "etc/passwd",
        "/v2/team/math/tags/list/../../../../config.json",
        "/v2/team/math/blobs/" + blob + "%2f..", "/v2/team/math/manifests/v1/..%2f..%2f..%2fconfig.json"]
    for p in trav:
        cases.append(Abuse("traversal", p, get(p), (400, 404)))
    digests = ["sha256:" + "A" * 64, "sha256:" + "0" * 63, "sha256:" + "0" * 65, "sha512:" + "0" * 128,
               "sha256:" + "g" * 64, "sha256:", "sha256", "0" * 64, "sha256:" + "0" * 64 + "%00",
               "sha256:%30" + "0" * 63, "sha256:" + "0" * 63 + "%E2%80%8B", "md5:" + "0" * 32, "sha256::" + "0" * 64,
               "sha256:" + "0" * 10000, "SHA256:" + "0" * 64, "sha256:-" + "0" * 63, "%73ha256:" + "0" * 64,
               "sha256:" + "0" * 64 + ";x", "sha256:" + "0" * 64 + "/x"]
    for d in digests:
        cases.append(Abuse("malformed digest", d[:40], get("/v2/team/math/blobs/" + d), (400, 404)))
        cases.append(Abuse("malformed digest", "manifest " + d[:32], get("/v2/team/math/manifests/" + d), (400, 404)))
    path = "/v2/team/math/blobs/" + blob
    ranges = {"inverted": "bytes=5-1", "inverted suffix": "bytes=10-2,3-1", "past the end": f"bytes={blob_size}-",
              "huge start": "bytes=99999999999999999999999999-",
              "negative": "bytes=-5-10", "no unit": "0-10", "other unit": "items=0-1", "empty": "bytes=",
              "garbage": "bytes=a-b", "only comma": "bytes=,", "minus zero": "bytes=-0", "space": "bytes = 0 - 1 - 2",
              "overflow end": "bytes=18446744073709551616-18446744073709551617"}
    for name, r in ranges.items():
        cases.append(Abuse("range", name, get(path, {"Range": r}), (400, 416)))
    # valid (RFC 9110) but abusive Ranges: answered, but never amplified (the answer stays about the blob's size)
    for name, r in {"overlapping x500": "bytes=" + ",".join(["0-"] * 500),
                    "1-byte ranges x1000": "bytes=" + ",".join(f"{i % blob_size}-{i % blob_size}" for i in range(1000)),
                    "1-byte ranges x3000": "bytes=" + ",".join(f"{i}-{i}" for i in range(3000)),
                    "huge end (clamped)": "bytes=0-99999999999999999999999999",
                    "huge suffix (whole blob)": "bytes=-99999999999999999999999999"}.items():
        cases.append(Abuse("range", name, get(path, {"Range": r}), (200, 206, 400, 416),
                           max_body=2 * blob_size + 64 * 1024, note="valid Range: served without amplification"))
    big = "a" * (1 << 20)
    cases += [
        Abuse("oversized", "1 MiB header value", get("/v2/", {"X-Big": big}), (400, 413, 431), True),
        Abuse("oversized", "128 KiB header value", get("/v2/", {"X-Big": big[:131072]}), (400, 413, 431), True),
        Abuse("oversized", "20,000 headers", get("/v2/", {f"X-H{i}": "v" for i in range(20000)}), (400, 413, 431), True),
        Abuse("oversized", "64 KiB header value", get("/v2/", {"X-Big": big[:65536]}), (200, 400, 413, 431), True,
              note="h11 limits only an *incomplete* header block (16 KiB); one that arrives whole in one read "
                   "(here up to ~100 KiB) is parsed and served"),
        Abuse("oversized", "10,000 headers", get("/v2/", {f"X-H{i}": "v" for i in range(10000)}), (200, 400, 413, 431),
              True, note="as above: ~100 KiB in one read is served"),
        Abuse("oversized", "1 MiB URL", get("/v2/" + big + "/tags/list"), (400, 404, 414, 431), True),
        Abuse("oversized", "64 KiB name", get("/v2/" + "a/" * 32768 + "manifests/v1"), (400, 404, 414, 431), True),
        Abuse("oversized", "1 MiB Authorization", get("/v2/", {"Authorization": "Bearer " + big}), (400, 401, 431), True),
        Abuse("oversized", "POST with a 16 MiB body", b"POST /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
              b"Content-Length: 16777216\r\n\r\n" + bytes(1 << 24), (405, 413), True),
    ]
    malformed = {
        "garbage line": b"\x00\x01\x02 garbage \xff\r\n\r\n",
        "no version": b"GET /v2/\r\n\r\n",
        "HTTP/9.9": b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n",
        "header without colon": b"GET /v2/ HTTP/1.1\r\nHost x\r\n\r\n",
        "NUL in header": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        "space before colon": b"GET /v2/ HTTP/1.1\r\nHost : x\r\n\r\n",
        "negative Content-Length": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        "two Content-Lengths": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        "CL + TE (smuggling)": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"0\r\n\r\nGET /config.json HTTP/1.1\r\nHost: x\r\n\r\n",
        "bad chunk size": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "no Host": b"GET /v2/ HTTP/1.1\r\nConnection: close\r\n\r\n",
        "two Hosts": b"GET /v2/ HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        "absolute-form ../": b"GET http://127.0.0.1/v2/../config.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "CONNECT": b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "TRACE": b"TRACE /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "long method": b"G" * 5000 + b" /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "obs-fold": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
        "bare LF, junk": b"GET /v2/ HTTP/1.1\nHost: x\n\x7f\n\n",
        "Upgrade: websocket": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        "h2c preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    }
    tolerated = {"HTTP/9.9": "h11 reads any HTTP/<digit>.<digit> as HTTP/1.1",
                 "obs-fold": "h11 unfolds obsolete line folding (RFC 9112 allows it)",
                 "Upgrade: websocket": "serve runs uvicorn with ws=\"none\": the upgrade is ignored and the GET served",
                 "CL + TE (smuggling)": "h11 obeys Transfer-Encoding over Content-Length (RFC 9112); the "
                                        "pipelined GET /config.json that follows is answered 404"}
    for name, payload in malformed.items():
        accept = (400, 404, 405, 426) if name not in ("TRACE", "CONNECT") else (400, 405)
        note = tolerated.get(name, "")
        cases.append(Abuse("malformed request", name, payload, accept + ((200,) if note else ()), True, note=note))
    return cases


def slow_clients(url: str, n: int, seconds: float, probe: Callable[[], float]) -> dict[str, Any]:
    """``n`` sockets send a request's headers byte by byte over ``seconds``; meanwhile ``probe`` times normal GETs."""
    host, port = url.removeprefix("http://").split(":")
    req = get("/v2/", {"X-Pad": "p" * 40})
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=30)
        socks.append(s)
    step = seconds / len(req)
    lat: list[float] = []
    errors = 0
    stop = threading.Event()

    def probing() -> None:
        nonlocal errors
        while not stop.is_set():
            try:
                lat.append(probe())
            except Exception:  # noqa: BLE001 - counted
                errors += 1
            time.sleep(0.1)

    th = threading.Thread(target=probing, daemon=True)
    th.start()
    t_end = time.monotonic() + seconds
    sent_err = 0
    for i in range(len(req)):
        for s in socks:
            try:
                s.send(req[i:i + 1])
            except OSError:
                sent_err += 1
        time.sleep(max(0.0, min(step, t_end - time.monotonic())))
    answered = 0
    for s in socks:
        try:
            s.settimeout(10)
            if s.recv(12).startswith(b"HTTP/1.1 200"):
                answered += 1
        except OSError:
            pass
        s.close()
    stop.set()
    th.join()
    return {"clients": n, "seconds": seconds, "slow_answered_200": answered, "send_errors": sent_err,
            "probe_requests": len(lat), "probe_errors": errors,
            "probe_max_ms": round(1000 * max(lat), 1) if lat else None,
            "probe_median_ms": round(1000 * sorted(lat)[len(lat) // 2], 1) if lat else None}


def server_abuse(work: Path, slow: int = 50, slow_seconds: float = 3.0, repeat: int = 1) -> dict[str, Any]:
    """Abusive requests at a real ``patchctl serve``; see the module docstring."""
    import hashlib
    import http.client

    from patchctl import Registry

    work.mkdir(parents=True, exist_ok=True)
    root = work / "served"
    data = os.urandom(4096 * 4)
    with Registry(root) as reg:
        digest = synth_patch(reg, "team/math:v1", {"layer.0.weight": data})
        manifest = reg.store.read_manifest_bytes(digest)
    blob = "sha256:" + hashlib.sha256(data).hexdigest()
    secret = (root / "config.json").read_bytes()
    results: Counter = Counter()
    bad: list[str] = []
    statuses: dict[str, Counter] = {}
    tolerated: dict[str, str] = {}
    with serving(root) as (url, proc):
        host, port = url.removeprefix("http://").split(":")

        def normal() -> float:
            t0 = time.perf_counter()
            c = http.client.HTTPConnection(host, int(port), timeout=10)
            try:
                c.request("GET", "/v2/team/math/manifests/v1")
                r = c.getresponse()
                body = r.read()
                if r.status != 200 or body != manifest:
                    raise AssertionError(f"normal request answered {r.status}")
            finally:
                c.close()
            return time.perf_counter() - t0

        cases = abuse_cases(blob, len(data))
        for _ in range(repeat):
            for c in cases:
                status, resp = raw_exchange(url, c.payload)
                key = f"{c.category}"
                statuses.setdefault(c.category, Counter())[status if status is not None else "closed"] += 1
                ok = (status in c.accept) or (status is None and c.accept_close)
                if c.max_body is not None and len(resp) > c.max_body:
                    ok = False
                if secret in resp or b"patchctl-registry" in resp:
                    ok = False
                results[key + (" ok" if ok else " FAILED")] += 1
                if ok and (status is None or status >= 400):
                    results["refused"] += 1
                elif ok:
                    results["tolerated"] += 1
                    tolerated.setdefault(f"{c.category} / {c.name}: {status}", c.note)
                if not ok:
                    bad.append(f"{c.category} / {c.name}: {status} ({len(resp)} bytes)")
                # the server answers a normal request after every abusive one
                try:
                    normal()
                    results["normal after abuse ok"] += 1
                except Exception as e:  # noqa: BLE001
                    results["normal after abuse FAILED"] += 1
                    bad.append(f"normal request after {c.name}: {e}")
        slow_res = slow_clients(url, slow, slow_seconds, normal)
        after = normal()
        alive = proc.poll() is None
    n_abusive = len(cases) * repeat
    refused = sum(v for k, v in results.items() if k.endswith(" ok") and not k.startswith("normal"))
    out = {"abusive_requests": n_abusive, "answered_as_expected": refused, "refused_4xx_or_closed": results["refused"],
           "tolerated": tolerated, "n_tolerated": results["tolerated"], "by_category": dict(statuses),
           "failures": bad[:20], "normal_after_each": results["normal after abuse ok"], "slow": slow_res,
           "normal_after_all_ms": round(1000 * after, 1), "server_alive": alive}
    out["ok"] = (refused == n_abusive and results["normal after abuse ok"] == n_abusive and alive
                 and slow_res["probe_errors"] == 0 and slow_res["probe_requests"] > 0)
    return out


def connection_abuse(work: Path, slowloris: int = 50, idle: int = 1100, nofile: int = 1024, hold: float = 15.0,
                     cwd: Path | None = None) -> dict[str, Any]:
    """Slowloris and descriptor exhaustion against a real ``patchctl serve`` whose descriptor limit is ``nofile``.

    Slowloris: ``slowloris`` sockets send a request line, then one header byte a second, forever; each must
    be closed by the server (its header timeout), while normal GETs keep being answered. Idle flood: ``idle``
    sockets connect and send nothing for ``hold`` seconds (more than the descriptor limit when ``idle >
    nofile``); normal GETs must be answered throughout, and the server's log may not fill with tracebacks.
    ``cwd`` runs another checkout's ``patchctl`` (to measure the code before a change).
    """
    import http.client
    import select

    from patchctl import Registry
    from patchctl.server.process import serving as serve

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = idle + slowloris + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    work.mkdir(parents=True, exist_ok=True)
    root = work / "conn-served"
    if not root.exists():
        with Registry(root) as reg:
            synth_patch(reg, "team/math:v1", {"layer.0.weight": os.urandom(4096)})
    log_path = work / "conn-serve.log"
    out: dict[str, Any] = {"nofile": nofile}
    with serve(root, timeout=60, cwd=cwd, nofile=nofile, log=log_path) as (url, proc):
        host, port = url.removeprefix("http://").split(":")

        def probe() -> float | None:
            t0 = time.perf_counter()
            try:
                c = http.client.HTTPConnection(host, int(port), timeout=10)
                try:
                    c.request("GET", "/v2/")
                    ok = c.getresponse().status == 200
                finally:
                    c.close()
            except OSError:
                return None
            return time.perf_counter() - t0 if ok else None

        def closed(s: socket.socket) -> bool:
            poll = select.poll()  # not select(): these descriptors may be past 1024
            poll.register(s, select.POLLIN)
            if not poll.poll(0):
                return False
            try:
                return s.recv(4096) == b""
            except OSError:
                return True

        def lat(xs: list[float | None]) -> dict[str, Any]:
            done = sorted(x for x in xs if x is not None)
            return {"probes": len(xs), "answered": len(done),
                    "median_ms": round(1000 * done[len(done) // 2], 1) if done else None,
                    "max_ms": round(1000 * done[-1], 1) if done else None}

        # slowloris: a byte a second after the request line, until the server closes each socket
        socks = [socket.create_connection((host, int(port)), timeout=10) for _ in range(slowloris)]
        start = time.monotonic()
        for s in socks:
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        closed_at: dict[int, float] = {}
        probes: list[float | None] = []
        while len(closed_at) < len(socks) and time.monotonic() - start < 60:
            for i, s in enumerate(socks):
                if i in closed_at:
                    continue
                try:
                    s.send(b"X")
                except OSError:
                    closed_at[i] = time.monotonic() - start
                    continue
                if closed(s):
                    closed_at[i] = time.monotonic() - start
            probes.append(probe())
            time.sleep(1.0)
        for s in socks:
            s.close()
        times = sorted(closed_at.values())
        out["slowloris"] = {"clients": slowloris, "closed_by_server": len(closed_at),
                            "median_s_to_close": round(times[len(times) // 2], 1) if times else None,
                            "max_s_to_close": round(times[-1], 1) if times else None, **lat(probes)}
        # idle flood: sockets that never send a byte, beyond the descriptor limit
        flood = []
        for _ in range(idle):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((host, int(port)))
            flood.append(s)
        start = time.monotonic()
        probes = []
        while time.monotonic() - start < hold:
            probes.append(probe())
            time.sleep(0.5)
        dropped = sum(closed(s) for s in flood)
        for s in flood:
            s.close()
        after = probe()
        out["idle_flood"] = {"idle_sockets": idle, "seconds": hold, "closed_by_server": dropped, **lat(probes),
                             "answered_after": after is not None}
        out["server_alive"] = proc.poll() is None
    text = log_path.read_text(errors="replace")
    out["log_lines"] = len(text.splitlines())
    out["log_tracebacks"] = text.count("Traceback")
    out["log_sample"] = [ln[:200] for ln in text.splitlines() if not ln.startswith("serving ")][:3]
    fl, sl = out["idle_flood"], out["slowloris"]
    out["ok"] = (sl["closed_by_server"] == slowloris and sl["answered"] == sl["probes"] and fl["answered"] == fl["probes"]
                 and fl["answered_after"] and out["log_tracebacks"] == 0 and out["server_alive"])
    return out


# ============================================================================ hostile remote

HOSTILE_SERVER = r'''
import hashlib, json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ZERO = "sha256:" + "0" * 64
BLOB = bytes(range(256)) * 1024  # 256 KiB
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
TINY = {}  # digest -> 4 bytes, for "tiny"

def manifest(entries):
    head = json.dumps({"schema": 1, "kind": "diff", "base": {"fingerprint": ZERO, "name": "tiny", "revision": None},
                       "tensors": {}, "params": {}, "lineage": {"parents": [], "recipe": None}, "metadata": {}},
                      sort_keys=True, separators=(",", ":")).encode()
    return head.replace(b'"tensors":{}', b'"tensors":{' + ",".join(entries).encode() + b"}")

def entry(name, digest, n):
    return '"%s":{"digest":"%s","dtype":"float32","encoding":"raw","shape":[%d],"size":%d}' % (name, digest, n // 4, n)

def blobs(n):  # n distinct 4-byte blobs
    out = []
    for i in range(n):
        b = i.to_bytes(4, "little")
        d = "sha256:" + hashlib.sha256(b).hexdigest()
        TINY[d] = b
        out.append(entry("t%06d" % i, d, 4))
    return out

NORMAL = manifest([entry("w", BLOB_DIGEST, len(BLOB))])
HUGE = manifest([entry("w", "sha256:" + "ab" * 32, 1 << 40)])  # declared 1 TiB
MANY = manifest(blobs(420_000))  # ~63 MB
TINY100K = manifest(blobs(100_000)[:100_000])

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        mode, _, rest = self.path[1:].partition("/")
        if "/manifests/" in rest:
            return self.send({"huge": HUGE, "many": MANY, "tiny": TINY100K}.get(mode, NORMAL))
        digest = rest.rsplit("/", 1)[-1]
        if mode == "tiny":
            return self.send(TINY.get(digest, b""))
        rng = self.headers.get("Range")
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        body = BLOB[start:]
        if mode == "err500":
            return self.send(b'{"errors":[{"code":"BOOM","message":"internal error"}]}', 500)
        if mode == "huge":  # 800 MB of zeros, then the connection ends
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            chunk = bytes(1 << 20)
            try:
                for _ in range(800):
                    self.wfile.write(chunk)
            except OSError:
                pass
            self.close_connection = True
            return
        if mode == "wrong":
            body = bytes(len(body))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(BLOB) - 1, len(BLOB)))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if mode == "drip":
                for b in body:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(2)
                return
            if mode == "drop":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)
        except OSError:
            pass

    def send(self, body, status=200):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
httpd.daemon_threads = True
print(httpd.server_address[1], flush=True)
httpd.serve_forever()
'''

#: (mode, what the remote does, wall-clock cap in seconds for the pull process)
HOSTILE_SCENARIOS = [
    ("huge", "declares a 1 TiB blob, then sends 800 MB of zeros", 300),
    ("many", "a 63 MB manifest of 420,000 blobs", 180),
    ("tiny", "100,000 tiny (4-byte) valid blobs", 120),
    ("drip", "sends a blob one byte every 2 s", 150),
    ("err500", "answers 500 to every blob", 60),
    ("drop", "hangs up half-way through every blob", 60),
    ("wrong", "sends wrong bytes of the right length", 60),
]


def _tree_bytes(p: Path) -> tuple[int, int]:
    n = size = 0
    for dirpath, _, files in os.walk(p):
        for f in files:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(dirpath, f)).st_size
                n += 1
    return n, size


def hostile_remote(work: Path, client_tree: Path | None = None,
                   only: list[str] | None = None) -> dict[str, Any]:
    """``patchctl pull`` (default flags) from a hostile HTTP remote, one scenario at a time.

    Per scenario: the exit status and last stderr line, the wall time (the process is killed at the
    scenario's cap), the pull process's peak RSS (``VmHWM``, polled), the peak bytes in the
    registry's ``tmp/`` (polled every 50 ms), the files left in ``tmp/`` and ``objects/``, and how long
    ``gc``'s exclusive lock waited while the pull ran. ``client_tree``: run the client from another
    checkout (``git archive HEAD patchctl | tar -x -C DIR`` for the code before a change).
    """
    if client_tree is not None and not (client_tree / "patchctl" / "__init__.py").is_file():
        raise SystemExit(f"--client-tree {client_tree}: no patchctl package there")
    work.mkdir(parents=True, exist_ok=True)
    (work / "server.py").write_text(HOSTILE_SERVER)
    srv = subprocess.Popen([PY, str(work / "server.py")], stdout=subprocess.PIPE, text=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(client_tree or ROOT)
    out: dict[str, Any] = {"client": str(client_tree or ROOT), "scenarios": {}}
    try:
        port = int(srv.stdout.readline())  # type: ignore[union-attr]
        for mode, what, cap in HOSTILE_SCENARIOS:
            if only and mode not in only:
                continue
            reg = work / f"reg-{mode}"
            subprocess.run([PY, "-m", "patchctl", "init", "--registry", str(reg)], env=env, capture_output=True,
                           timeout=120, cwd=work)  # cwd: `-m` puts it first on sys.path, before PYTHONPATH
            (reg / "tmp").mkdir(parents=True, exist_ok=True)
            args = [PY, "-m", "patchctl", "pull", "x:v1", "--from", f"http://127.0.0.1:{port}/{mode}",
                    "--registry", str(reg)]
            t0 = time.monotonic()
            p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=work)
            peak_tmp = hwm = 0
            lock_wait: float | str | None = None
            killed = False
            status_code, ru = 0, None
            while True:
                pid, status_code, ru = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                peak_tmp = max(peak_tmp, _tree_bytes(reg / "tmp")[1])
                with contextlib.suppress(OSError, ValueError, IndexError):  # IndexError: a zombie
                    status = Path(f"/proc/{p.pid}/status").read_text()
                    hwm = max(hwm, int(status.split("VmHWM:")[1].split()[0]) * 1024)
                elapsed = time.monotonic() - t0
                if lock_wait is None and elapsed > 5 and mode == "drip":
                    got = _exclusive_wait(reg, timeout=10.0)
                    lock_wait = got if got is not None else "> 10 (not granted)"
                if elapsed > cap:
                    p.kill()
                    killed = True
                    _, status_code, ru = os.wait4(p.pid, 0)
                    break
                time.sleep(0.05)
            p.returncode = os.waitstatus_to_exitcode(status_code)  # reaped here (wait4: its rusage)
            wall = time.monotonic() - t0
            err = p.stderr.read() if p.stderr else ""  # type: ignore[union-attr]
            if p.stderr:
                p.stderr.close()
            lines = [ln for ln in err.splitlines() if ln.strip()]
            tmp_n, tmp_b = _tree_bytes(reg / "tmp")
            obj_n, _ = _tree_bytes(reg / "objects")
            out["scenarios"][mode] = {
                "remote": what, "command": cmd_str(args[2:]).replace(str(reg), "REG"),
                "exit": None if killed else p.returncode,
                "killed_at_cap": killed, "seconds": round(wall, 1),
                # VmHWM as polled: ru_maxrss would carry this (forking) process's peak over the exec
                "peak_rss_mib": round((hwm or ru.ru_maxrss * 1024) / MiB),
                "peak_tmp_mib": round(peak_tmp / MiB, 1), "tmp_left_files": tmp_n, "tmp_left_mib": round(tmp_b / MiB, 1),
                "objects_left": obj_n, "stderr_lines": len(lines), "traceback": "Traceback" in err,
                "message": (lines[-1] if lines else "")[:200], "gc_lock_wait_s": lock_wait,
            }
            log(f"    {mode}: {out['scenarios'][mode]}")
    finally:
        srv.kill()
        srv.wait()
        if srv.stdout:
            srv.stdout.close()
    return out


def _exclusive_wait(reg: Path, timeout: float) -> float | None:
    """Seconds until ``gc``'s exclusive registry lock was granted (None: not within ``timeout``)."""
    import fcntl

    with open(reg / "locks" / "registry.lock", "a+b") as f:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                time.sleep(0.05)
                continue
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return round(time.monotonic() - t0, 2)
    return None


# ============================================================================ report


def _crash_table(r: dict[str, Any]) -> None:
    log("\n| command | kills | before any write | mid-write | after the ref moved | fsck clean after the kill | "
        "tmp/ empty after the kill | corrupt objects | lost refs | incomplete refs | re-run ok, fsck clean | "
        "tmp/ empty after the re-run |")
    log("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    keys = ("killed", *KILL_CLASSES, "fsck clean after the kill", "tmp/ empty after the kill", "corrupt objects",
            "lost refs", "incomplete refs", "re-run completes, fsck clean", "tmp/ empty after the re-run")
    for v in r["ops"].values():
        log(f"| `{v['command']}` | " + " | ".join(str(v.get(k, 0)) for k in keys) + " |")
    log("| **total** | " + " | ".join(f"**{r['total'].get(k, 0)}**" for k in keys) + " |")


def machine() -> str:
    try:
        import torch

        tv = torch.__version__
    except ImportError:
        tv = "-"
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPU, Python {platform.python_version()}, torch {tv}, {platform.system()} "
            f"{platform.release()}; load average {load[0]:.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a scaled-down run (~2 min)")
    ap.add_argument("--only", default="crash,paused,concurrency,same-ref,corruption,flips,fuzz,push-fuzz,server,hostile")
    ap.add_argument("--client-tree", type=Path, default=None,
                    help="hostile: run the pulling client from this checkout (e.g. the code before a change)")
    ap.add_argument("--hostile", default=None, help="hostile: scenarios to run, comma-separated (default all)")
    ap.add_argument("--kills", type=int, default=None, help="SIGKILLs in total (default 100; quick 12)")
    ap.add_argument("--paused-kills", type=int, default=None,
                    help="SIGKILLs per command at the store's write points (default 12; quick 4)")
    ap.add_argument("--flips", type=int, default=None, help="bit flips per file class (default 100; quick 20)")
    ap.add_argument("--push-fuzz", type=int, default=None, help="mutated inputs pushed (default 2000; quick 240)")
    ap.add_argument("--crash-ops", default=None,
                    help="commands to kill, comma-separated (default push,pull-folder,pull-http,merge,compress,gc)")
    ap.add_argument("--mib", type=float, default=None, help="size of each killed transfer, MiB (default 8)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--ops", type=int, default=None)
    ap.add_argument("--corrupt", type=int, default=None, help="objects to corrupt (default 100: 80 blobs, 20 manifests)")
    ap.add_argument("--fuzz", type=int, default=None, help="fuzz inputs in total (default 100000)")
    ap.add_argument("--slow", type=int, default=50, help="slow clients")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--same-ref-worker", help=argparse.SUPPRESS)
    ap.add_argument("--push-fuzz-worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker_main(json.loads(a.worker))
        return 0
    if a.push_fuzz_worker:
        push_fuzz_worker(json.loads(a.push_fuzz_worker))
        return 0
    if a.same_ref_worker:
        same_ref_worker(json.loads(a.same_ref_worker))
        return 0
    q = a.quick
    kills = a.kills if a.kills is not None else (12 if q else 100)
    mib = a.mib if a.mib is not None else (4.0 if q else 8.0)
    workers = a.workers or (4 if q else 8)
    ops = a.ops or (10 if q else 50)
    ncorrupt = a.corrupt if a.corrupt is not None else (20 if q else 100)
    paused = a.paused_kills if a.paused_kills is not None else (4 if q else 12)
    nflips = a.flips if a.flips is not None else (20 if q else 100)
    npush = a.push_fuzz if a.push_fuzz is not None else (240 if q else 2000)
    nfuzz = a.fuzz if a.fuzz is not None else (8000 if q else 100_000)
    only = set(a.only.split(","))
    log(f"# bench/reliability.py — {machine()}")
    figures: dict[str, Any] = {}
    ok = True
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="patchctl-reliability-") as tmp:
        work = Path(tmp)
        if "crash" in only:
            log(f"\n## 1. crash: {kills} SIGKILLs at random moments ({mib:g} MiB per transfer)")
            t0 = time.monotonic()
            r = crash(work / "crash", kills, ops=a.crash_ops.split(",") if a.crash_ops else None, seed=a.seed, mib=mib)
            figures["crash"] = r
            _crash_table(r)
            for name, why in r["skipped"].items():
                log(f"\nskipped {name}: {why}")
            for name, v in r["ops"].items():
                extra = {k: v[k] for k in ("finished before the kill", "fsck: index only", "fsck: other problems",
                                           "incomplete refs", "ref at a wrong digest", "re-run failed") if v.get(k)}
                if extra or v["failures"]:
                    log(f"\n{name}: {extra}")
                    for f in v["failures"][:4]:
                        log(f"    {f}")
            if not r["fsck_clean_after_every_kill"]:
                log(f"\n{r['total'].get('fsck: index only', 0)} kills landed between a file write and its index update: "
                    "objects and refs were sound, fsck reported `index: ... differ from the files` until the "
                    "command was re-run (or `fsck --rebuild-index`).")
            log(f"\ncrash: {'PASS' if r['ok'] else 'FAIL'} (goal: {kills} kills survived, 0 corrupt, 0 lost) "
                f"in {time.monotonic() - t0:.0f} s")
            ok &= r["ok"]
        if "paused" in only:
            log(f"\n## 1b. crash inside a write: {paused} SIGKILLs per command where the store's test hook stopped it "
                "(PATCHCTL_TEST_PAUSE_AT: a blob or manifest half-written in tmp/; objects stored, the ref not moved; "
                "the ref's log line appended, the index not updated); re-run through the Python API")
            t0 = time.monotonic()
            r = crash_paused(work / "crash-paused", paused, seed=a.seed, mib=min(mib, 1.0), verbose=False)
            figures["crash_paused"] = r
            _crash_table(r)
            for name, v in r["ops"].items():
                pts = {k: v[k] for k in ("at write", "at ref", "at moved", "a half-written blob in tmp/ at the kill",
                                         "finished before the pause", "class disagrees with the point") if v.get(k)}
                log(f"    {name}: {pts}")
                for f in v["failures"][:4]:
                    log(f"        {f}")
            log(f"\ncrash inside a write: {'PASS' if r['ok'] else 'FAIL'} in {time.monotonic() - t0:.0f} s")
            ok &= r["ok"]
        if "concurrency" in only:
            log(f"\n## 2. concurrency: {workers} processes x {ops} operations on one registry")
            log(f"    (worker: python bench/reliability.py --worker ...; ops weighted {OP_WEIGHTS})")
            r = concurrency(work / "conc", workers, ops, seed=a.seed)
            figures["concurrency"] = r
            log("\n| workers x ops | completed | failed | wall s | expected refs | removed refs | lost refs "
                "| removed yet present | incomplete refs | fsck |")
            log("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
            log(f"| {workers} x {ops} | {r['completed']} | {sum(r['failed'].values())} | {r['wall']:.0f} | "
                f"{r['expected_refs']} | {r['removed_refs']} | {len(r['lost_refs'])} | {len(r['removed_but_present'])} "
                f"| {len(r['incomplete_refs'])} | {'clean' if r['fsck_ok'] else r['fsck_problems']} |")
            log(f"\ncompleted by op: {r['by_op']}; registry at the end: {r['refs']} refs, {r['manifests']} manifests, "
                f"{r['blobs']} blobs")
            if r["failed"]:
                log(f"failed: {r['failed']}")
                for m in r["failure_examples"][:5]:
                    log(f"    {m}")
            for m in r["lost_refs"][:5]:
                log(f"    lost: {m}")
            for e in r["worker_errors"][:2]:
                log(f"    worker crashed: {e[-500:]}")
            log(f"\nconcurrency: {'PASS' if r['ok'] else 'FAIL'} (goal: {workers * ops} completed, 0 lost)")
            ok &= r["ok"]
        if "same-ref" in only:
            for stall in (False, True):
                w_, n_ = (workers, 5) if not stall else (3, 3)
                log(f"\n## 2b. {w_} processes push different patches to the same ref `{SAME_REF}`"
                    + (" (one writer stalled by the test hook between its log append and its index update until the "
                       "others finish: its index write comes last)" if stall else f", {n_} each, all at once"))
                r = same_ref(work / f"same-{stall}", workers=w_, pushes=n_, seed=a.seed, stall=stall)
                figures[f"same_ref{'_stalled' if stall else ''}"] = r
                log("\n| ref | pushes succeeded | log entries | lost updates | chain intact | seq 1..n, old = previous new "
                    "| index (`ls`) = log's last entry |")
                log("|---|---:|---:|---:|---|---|---|")
                for ref, row in r["refs"].items():
                    log(f"| `{ref}` | {r['succeeded']} | {row['entries']} | {len(row['lost_updates'])} | "
                        f"{row['chain_intact']} | {row['seq_1_to_n'] and row['old_is_previous_new']} | "
                        f"{row['index_agrees']} |")
                log(f"\nfsck clean: {r['fsck_ok']} {r['fsck_problems']}; tmp/ left: {r['tmp_left']}; `latest` = the "
                    f"tag's target: {r['latest_equals_tag']}; failed pushes {r['failed']} {r['worker_errors'][:1]}")
                log(f"same ref{' (stalled writer)' if stall else ''}: {'PASS' if r['ok'] else 'FAIL'}")
                ok &= r["ok"]
        if "corruption" in only:
            nb, nm = ncorrupt - ncorrupt // 5, ncorrupt // 5
            log(f"\n## 3. corruption: one bit flipped in {nb} blobs and {nm} manifests")
            r = corruption(work / "corrupt", nb, nm, seed=a.seed)
            figures["corruption"] = r
            log("\n| flipped blobs | detected | flipped manifests | detected | false positives | reads raising "
                "DigestMismatch | pulls of damaged patches refused | sound patches pulled | pull mistakes |")
            log("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            log(f"| {r['flipped_blobs']} | {r['detected_blobs']} | {r['flipped_manifests']} | {r['detected_manifests']} "
                f"| {r['false_positives']} | {r['reads_raising_digest_mismatch']} | "
                f"{r['refused_damaged']}/{r['damaged_patches'] * r['pulls']} | "
                f"{r['pulled_sound']}/{r['sound_patches'] * r['pulls']} | {r['pull_mistakes']} |")
            log(f"\n(`patchctl fsck`; pulls from the damaged registry as a folder remote and over `patchctl serve`; "
                f"errors {r['pull_errors']}.)")
            rp = r["repair"]
            log(f"`{rp['command']}` (a `patchctl serve` of a clean copy): repaired {rp['repaired']}/{nb + nm}, "
                f"{rp['unrepaired']} unrepaired, {rp['moved_aside']} bad copies moved aside, fsck clean after: "
                f"{rp['fsck_clean_after']}, exit {rp['exit']}, {rp['seconds']:.1f} s {rp['error']}")
            log(f"corruption: {'PASS' if r['ok'] else 'FAIL'} ({r['detected_pct']:.0f} % detected; goal 100 %)")
            ok &= r["ok"]
        if "flips" in only:
            log(f"\n## 3b. one bit flipped per file class: {nflips} random flips each in objects, manifests, ref logs, "
                f"record logs and index.sqlite (a fresh copy of one registry each time), plus {nflips // 4} of a log's "
                "final newline and of the index's stored digests and names")
            r = flips(work / "flips", nflips, seed=a.seed, targeted=nflips // 4)
            figures["flips"] = r
            log("\n| file class | flips | detected by fsck, naming it | read refused, naming it | no effect | "
                "undetected | tracebacks | wrong answers before fsck | detection rate (flips with an effect) |")
            log("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for cls, row in r["classes"].items():
                log(f"| {cls} | {row['flips']} | {row['detected']} | {row['read refused']} | {row['no effect']} | "
                    f"{row['undetected']} | {row['crash']} | {row['wrong answers before fsck']} | "
                    f"{row['detected_pct']:.0f} % |")
            for cls, row in r["classes"].items():
                for e in row["examples"][:3]:
                    log(f"    {cls}: {e}")
            log(f"flips: {'PASS' if r['ok'] else 'FAIL'} (goal: 0 undetected, 0 tracebacks)")
            ok &= r["ok"]
        if "fuzz" in only:
            log(f"\n## 4. fuzz: {nfuzz} inputs over 4 parsers (hypothesis, then a seeded mutator)")
            r = fuzz(work / "fuzz", nfuzz, seed=a.seed)
            figures["fuzz"] = r
            log("\n| target | inputs | accepted | crashes |")
            log("|---|---:|---:|---:|")
            names = {"safetensors": "`SafetensorsFile` (+ read every tensor)", "manifest": "`manifest.parse`",
                     "peft": "`importers.read_peft_config`", "codec": "`codec.decode` (+ encode, to_dense)"}
            for t, n in r["tried"].items():
                log(f"| {names[t]} | {n} | {r['accepted'].get(t, 0)} | {r['crashes_by_target'].get(t, 0)} |")
            log(f"| **total** | **{r['total']}** | | **{r['crashes']}** |")
            m = r["memory"]
            log(f"\n{r['hypothesis_per_target']} inputs per target from hypothesis ({r['hypothesis_seconds']:.0f} s), "
                f"the rest from the mutator; {r['seconds']:.0f} s in all. Huge-claim headers: {m['inputs']} inputs, "
                f"peak traced allocation {m['peak_traced_bytes'] / 1024:.0f} KiB; max RSS growth over the whole "
                f"run {r['max_rss_growth_mib']:.0f} MiB.")
            for k in r["crash_kinds"]:
                log(f"    crash kind: {k}")
            for t, msg, hx in r["crash_examples"][:6]:
                log(f"    {t}: {msg} <- {hx[:80]}")
            for p in m["problems"]:
                log(f"    memory/time: {p}")
            log(f"fuzz: {'PASS' if r['ok'] else 'FAIL'} (goal: >= {nfuzz} inputs, 0 crashes)")
            ok &= r["ok"]
        if "push-fuzz" in only:
            log(f"\n## 4b. fuzz through `push`: {npush} mutated inputs (diff file, fine-tune folder, adapter weights, "
                "adapter config), each answered within 5 s by a worker process")
            r = push_fuzz(work / "push-fuzz", npush, seed=a.seed)
            figures["push_fuzz"] = r
            log("\n| input | pushed | accepted | refused (PatchctlError) | of which left unreferenced blobs | "
                "over 5 s | crashes | refusals that changed the registry |")
            log("|---|---:|---:|---:|---:|---:|---:|---:|")
            for kind, row in [*r["by_kind"].items(), ("**total**", r["total"])]:
                log(f"| {kind} | {row.get('inputs', 0)} | {row.get('accepted', 0)} | {row.get('refused', 0)} | "
                    f"{row.get('refused, leaving blobs nothing refers to (gc collects them)', 0)} | "
                    f"{row.get('over the time bound', 0)} | {row.get('crashes', 0)} | "
                    f"{row.get('registry changed by a refused input', 0)} |")
            refusals = {k[len("refused: "):]: v for k, v in r["total"].items() if k.startswith("refused: ")}
            log(f"\nrefused as: {refusals}; slowest answer {r['slowest_s']} s; {r['seconds']} s in all; fsck clean "
                f"{r['fsck_ok']}; tmp/ left {r['tmp_left']}")
            for pr in r["problems"][:5]:
                log(f"    {pr['kind']}: {pr['why'][-300:]}")
            log(f"push fuzz: {'PASS' if r['ok'] else 'FAIL'} (goal: every input answered in time, 0 crashes, "
                "0 refusals that change the registry)")
            ok &= r["ok"]
        if "server" in only:
            log(f"\n## 5. server abuse: `patchctl serve` on 127.0.0.1, {a.slow} slow clients")
            r = server_abuse(work / "server", slow=a.slow, slow_seconds=3.0 if q else 5.0)
            figures["server"] = r
            log("\n| category | requests | answers |")
            log("|---|---:|---|")
            for cat, cnt in r["by_category"].items():
                log(f"| {cat} | {sum(cnt.values())} | {', '.join(f'{k}: {v}' for k, v in sorted(cnt.items(), key=str))} |")
            s = r["slow"]
            log(f"| slow clients (headers byte by byte over {s['seconds']:g} s) | {s['clients']} | "
                f"{s['slow_answered_200']} answered 200 once complete |")
            log(f"\nanswered as expected: {r['answered_as_expected']}/{r['abusive_requests']} "
                f"({r['refused_4xx_or_closed']} refused with a 4xx or a closed connection, {r['n_tolerated']} tolerated "
                f"and served harmlessly, listed below); a normal GET answered "
                f"after each: {r['normal_after_each']}/{r['abusive_requests']}; during the slow clients: "
                f"{s['probe_requests']} normal GETs, {s['probe_errors']} errors, median {s['probe_median_ms']} ms, "
                f"max {s['probe_max_ms']} ms; after all: {r['normal_after_all_ms']} ms; server alive: "
                f"{r['server_alive']}")
            for k, note in r["tolerated"].items():
                log(f"    tolerated: {k} — {note}")
            for f in r["failures"][:10]:
                log(f"    FAILED: {f}")
            c = connection_abuse(work / "server", slowloris=a.slow, hold=5.0 if q else 15.0)
            figures["server"]["connections"] = c
            sl, fl = c["slowloris"], c["idle_flood"]
            log(f"\nslowloris ({sl['clients']} clients, a header byte a second): {sl['closed_by_server']} closed by the "
                f"server, after {sl['median_s_to_close']} s (median), {sl['max_s_to_close']} s (max); normal GETs "
                f"meanwhile {sl['answered']}/{sl['probes']} answered, max {sl['max_ms']} ms")
            log(f"idle flood ({fl['idle_sockets']} idle sockets for {fl['seconds']:g} s, descriptor limit "
                f"{c['nofile']}): normal GETs {fl['answered']}/{fl['probes']} answered, median {fl['median_ms']} ms, "
                f"max {fl['max_ms']} ms; {fl['closed_by_server']} idle sockets closed by the server; log: "
                f"{c['log_lines']} lines, {c['log_tracebacks']} tracebacks")
            for line in c["log_sample"]:
                log(f"    log: {line}")
            r["ok"] = r["ok"] and c["ok"]
            log(f"server: {'PASS' if r['ok'] else 'FAIL'}")
            ok &= r["ok"]
        if "hostile" in only:
            log("\n## 6. hostile remote: `patchctl pull` (default flags) from a hostile HTTP server on 127.0.0.1")
            r = hostile_remote(work / "hostile", a.client_tree, a.hostile.split(",") if a.hostile else None)
            figures["hostile"] = r
            log("\n| remote | exit | seconds | peak RSS MiB | peak tmp/ MiB | tmp/ left (files, MiB) | objects left "
                "| gc lock wait s | stderr |")
            log("|---|---:|---:|---:|---:|---|---:|---:|---|")
            good = True
            for v in r["scenarios"].values():
                log(f"| {v['remote']} | {'killed at cap' if v['killed_at_cap'] else v['exit']} | {v['seconds']} | "
                    f"{v['peak_rss_mib']} | {v['peak_tmp_mib']} | {v['tmp_left_files']}, {v['tmp_left_mib']} | "
                    f"{v['objects_left']} | {v['gc_lock_wait_s'] if v['gc_lock_wait_s'] is not None else '-'} | "
                    f"{'traceback' if v['traceback'] else repr(v['message'][:90])} |")
                good &= (not v["killed_at_cap"] and v["exit"] != 0 and not v["traceback"] and v["stderr_lines"] == 1
                         and v["tmp_left_files"] == 0 and v["objects_left"] == 0 and v["peak_rss_mib"] < 500
                         and v["peak_tmp_mib"] < 64)
            r["ok"] = good
            log(f"hostile: {'PASS' if good else 'FAIL'} (goal: each pull refused in one line, within its cap, "
                "RSS < 500 MiB, < 64 MiB in tmp/, nothing left)")
            ok &= good
    log(f"\n{'ALL PASS' if ok else 'SOME GOALS MISSED'} in {time.monotonic() - t_all:.0f} s")
    if a.json:
        a.json.write_text(json.dumps(figures, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
