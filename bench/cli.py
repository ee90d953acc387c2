"""CLI start-up: cold CPU and wall time of the everyday commands against ``python -c pass``.

    python bench/cli.py                 # demo-sized registry (24 refs) and 10,000 patch versions
    python bench/cli.py --runs 21 --versions 10000

Each measured command is a fresh process (``python -m patchctl …``, stdout to a
pipe that is drained), run alternately with ``python -c pass`` so that both see
the same machine load: a *pair*. CPU is user + system time of the child from
``os.wait4``. The table gives medians over the pairs of the command, the
baseline and their paired difference (the cost patchctl adds), and the goal
(issue #22: ≤ 0.15 s CPU over ``python -c pass`` on a demo-sized registry, ≤ 0.2 s
with 10,000 patch versions).

Registries are generated fast under ``bench/_work/cli/`` (reused when complete):
tiny one-tensor diff manifests committed through :class:`Repository` (so the
files, ref logs and index are the real thing), with ``os.fsync`` stubbed out
while generating (the registry is a throwaway; fsync is not what is measured).
The small registry mimics the demo's: 12 patches × 2 tags. The large one has
10,000 manifests, each under its own ``NAME:TAG`` (100 names × 100 tags), so
``ls`` prints 10,000 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work" / "cli"


def make_registry(path: Path, names: int, tags: int) -> Path:
    """A registry of ``names × tags`` refs, each on its own tiny manifest (reused if complete)."""
    done = path / "_bench_complete.json"
    spec = {"names": names, "tags": tags}
    if done.is_file() and json.loads(done.read_text()) == spec:
        return path
    import shutil

    import numpy as np

    from patchctl.registry.store.manifest import Manifest, TensorEntry
    from patchctl.registry.store.repository import Repository

    shutil.rmtree(path, ignore_errors=True)
    real_fsync, os.fsync = os.fsync, lambda fd: None  # generating a throwaway registry
    try:
        with Repository(path) as repo:
            data = np.arange(16, dtype=np.float32).tobytes()
            entry = TensorEntry(repo.store.put_blob(data), "float32", (4, 4), "raw", len(data))
            base = {"name": "demo-base", "revision": None, "fingerprint": "sha256:" + "0" * 64}
            for i in range(names):
                for j in range(tags):
                    m = Manifest("diff", base, {f"encoder.layer.{j % 6}.attention.self.query.weight": entry},
                                 metadata={"task": f"task-{i}", "version": j})
                    repo.commit(m, f"team/task-{i:03d}:v{j}", message=f"version {j}", move_latest=False)
    finally:
        os.fsync = real_fsync
    done.write_text(json.dumps(spec))
    return path


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(CPU s, wall s) of one child, from ``os.wait4`` (so only this child is counted)."""
    t = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=[
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
    ])
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} exited {os.waitstatus_to_exitcode(status)}")
    return ru.ru_utime + ru.ru_stime, wall


def measure(args: list[str], registry: Path, runs: int) -> dict[str, float]:
    """Medians over ``runs`` pairs; ``{a|b}`` in an argument alternates between a and b from run to run
    (so that ``tag`` really moves the ref each time)."""
    env = {**os.environ, "PATCHCTL_HOME": str(registry)}
    env.pop("COLUMNS", None)

    def command(k: int) -> list[str]:
        pick = [re.sub(r"\{(.*?)\|(.*?)\}", lambda m: m.group(1 + k % 2), a) for a in args]
        return [sys.executable, "-m", "patchctl", *pick]

    base = [sys.executable, "-c", "pass"]
    run_once(command(1), env)  # page cache, .pyc files
    pairs = []
    for k in range(runs):
        cmd = command(k)
        a, b = (cmd, base) if k % 2 == 0 else (base, cmd)
        ra, rb = run_once(a, env), run_once(b, env)
        pairs.append((ra, rb) if a is cmd else (rb, ra))
    med = statistics.median
    return {
        "cpu": med(c[0] for c, _ in pairs), "wall": med(c[1] for c, _ in pairs),
        "base_cpu": med(b[0] for _, b in pairs), "base_wall": med(b[1] for _, b in pairs),
        "d_cpu": med(c[0] - b[0] for c, b in pairs), "d_wall": med(c[1] - b[1] for c, b in pairs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15, help="pairs per command (default 15)")
    ap.add_argument("--versions", type=int, default=10_000, help="patch versions in the large registry")
    a = ap.parse_args()

    t = time.perf_counter()
    small = make_registry(WORK / "demo", 12, 2)
    tags = 100 if a.versions >= 100 else a.versions
    large = make_registry(WORK / f"v{a.versions}", max(a.versions // tags, 1), tags)
    print(f"registries ready in {time.perf_counter() - t:.1f} s ({small}, {large})", file=sys.stderr)

    from patchctl.registry.store.repository import Repository

    with Repository(large, create=False) as repo:
        prefix = repo.resolve("team/task-042:v17")[: len("sha256:") + 12]  # as `ls` shows it
    cases = [
        ("demo (24 refs)", small, ["ls"], 0.15),
        ("demo (24 refs)", small, ["show", "team/task-003:v1"], 0.15),
        ("demo (24 refs)", small, ["log", "team/task-003:v1"], 0.15),
        ("demo (24 refs)", small, ["ls", "--json"], 0.15),
        ("demo (24 refs)", small, ["remote", "ls"], 0.15),
        ("demo (24 refs)", small, ["tag", "team/task-000:v{0|1}", "scratch:t"], 0.15),
        (f"{a.versions:,} versions", large, ["ls"], 0.2),
        (f"{a.versions:,} versions", large, ["show", "team/task-042:v17"], 0.2),
        (f"{a.versions:,} versions", large, ["show", prefix], 0.2),
        (f"{a.versions:,} versions", large, ["log", "team/task-042:v17"], 0.2),
        (f"{a.versions:,} versions", large, ["ls", "--json"], 0.2),
    ]
    print(f"median of {a.runs} pairs; CPU = user + sys of the child (os.wait4); Δ = command − `python -c pass`, paired")
    print()
    print("| registry | command | CPU s | wall s | `python -c pass` CPU s | Δ CPU s | Δ wall s | goal Δ CPU | |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    ok = True
    for label, reg, args, goal in cases:
        r = measure(args, reg, a.runs)
        verdict = "PASS" if r["d_cpu"] <= goal else "FAIL"
        ok &= verdict == "PASS"
        shown = " ".join(args).replace("{0|1}", "0 / v1")
        print(f"| {label} | `patchctl {shown}` | {r['cpu']:.3f} | {r['wall']:.3f} | {r['base_cpu']:.3f} | "
              f"{r['d_cpu']:.3f} | {r['d_wall']:.3f} | ≤ {goal} | {verdict} |", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
