"""Each streaming operation against its raw I/O floor, measured in the same run (issue #21).

    nice python bench/floor.py                         # 468.2M params, bf16; threads 1 and 2; every op
    nice python bench/floor.py --layers 2 --threads 2  # quick (99M params)
    nice python bench/floor.py --ops push,apply        # some ops only

Inputs come from ``bench/_synth.py`` under ``bench/_work/`` (reused when
present): a base and its ``dense``, ``sparse`` and ``lowrank`` fine-tunes, the
setup of ``bench/stream.py`` and ``bench/merge.py``. Once, untimed, the three
fine-tunes are pushed into a registry (``pushed``) that a ``patchctl serve``
on 127.0.0.1 serves for the pulls. Then, for each thread count (the child
runs pinned to that many cores with ``PATCHCTL_THREADS``), each operation runs
as its own process (wall time, and that process's peak RSS from
``os.wait4``):

- ``push``: ``patchctl push FT-dense d:v1 --base BASE`` into a fresh registry
  (the full fine-tune stored as a diff with its pins);
- ``apply``: ``patchctl apply d:v1 OUT --base BASE`` from that registry;
- ``ta``, ``ties``, ``dare``, ``lines``: ``patchctl merge`` of the three
  pushed fine-tunes (weights 0.5/0.3/0.2; ties and dare_ties at density 0.2;
  lines = ties + ``--lines auto``) ``--no-validate --apply OUT --base BASE``,
  each on a hard-linked clone of ``pushed``;
- ``pull``: ``patchctl pull d:v1 --from http://127.0.0.1:PORT`` into an empty
  registry.

Right after each operation, its floor: a process (no torch) that reads every
input byte the operation read (the safetensors files, the registry blobs of
the patches it used) and writes every output byte it wrote (one file per
output file, the same sizes), in 8 MiB chunks, each output file fsynced.
Each operation runs ``--runs`` times (default 2, fresh outputs each time)
and its floor ``--floor-runs`` times (default 3); the fastest of each counts
(the VM's write speed swings 2-5x from one run to the next). ``x best floor``
divides by the fastest floor of that operation over all thread counts (the
same bytes). Ratio = operation wall / floor wall. Both include process start
(python ~0.03 s; patchctl's modules load from bytecode compiled once at the
start, as an installed package's do, whatever ``PYTHONDONTWRITEBYTECODE``
says; push, apply, task arithmetic and TIES of these bf16 diffs never
import torch, see patches/host.py and registry/ops/merging/host_stream.py;
DARE and LiNeS do, listed as ``import``).

Outputs are checked in the same run: ``apply``'s model equals the fine-tune
bit for bit; each merge's patch digest and the sha256 of its ``--apply``
shards are the same at every thread count (and printed, to compare across
commits). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from merge import clone_registry, loadavg  # noqa: E402 - bench/ is not a package
from stream import VERIFY, machine, tail  # noqa: E402

from patchctl.registry.store.manifest import parse as parse_manifest  # noqa: E402 - no torch: keeps this process small
from patchctl.registry.store.repository import Repository  # noqa: E402
from patchctl.server.process import serving  # noqa: E402

KINDS = ("dense", "sparse", "lowrank")
WEIGHTS = "0.5,0.3,0.2"
MERGES = {
    "ta": [],
    "ties": ["--method", "ties", "--density", "0.2"],
    "dare": ["--method", "dare_ties", "--density", "0.2", "--seed", "0"],
    "lines": ["--method", "ties", "--density", "0.2", "--lines", "auto"],
}
ALL_OPS = ("push", "apply", *MERGES, "pull")

FLOOR = r"""
import json, os, sys, time
spec = json.load(open(sys.argv[1]))
CH = spec["chunk"]
buf = bytearray(CH)
mv = memoryview(buf)
t0 = time.perf_counter()
nin = 0
for p in spec["inputs"]:
    with open(p, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            nin += n
t1 = time.perf_counter()
os.makedirs(spec["dir"])
for i, size in enumerate(spec["outputs"]):
    fd = os.open(os.path.join(spec["dir"], str(i)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    left = size
    while left:
        left -= os.write(fd, mv[: min(left, CH)])
    os.fsync(fd)
    os.close(fd)
dfd = os.open(spec["dir"], os.O_RDONLY)
os.fsync(dfd)
os.close(dfd)
t2 = time.perf_counter()
print(json.dumps({"read_s": t1 - t0, "write_s": t2 - t1, "read_bytes": nin, "write_bytes": sum(spec["outputs"])}))
"""


CPU: dict[Path, float] = {}  # log -> CPU seconds (user + system) of the process that wrote it


def run(cmd: list[str], log: Path, cpus: int, env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """Run ``cmd`` pinned to the first ``cpus`` cores; (wall s, that process's peak RSS MiB, exit code).

    Its CPU seconds go to :data:`CPU` (under the log's path): on a shared machine, wall time includes
    waiting for cores that other jobs hold, CPU time does not.
    """
    full = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                PATCHCTL_THREADS=str(cpus), OMP_NUM_THREADS=str(cpus), **(env or {}))
    # modules load from their cached bytecode, as after a pip install (compiled once in main): a
    # PYTHONDONTWRITEBYTECODE in this shell would otherwise recompile ~100 modules in every command
    full.pop("PYTHONDONTWRITEBYTECODE", None)
    allowed = sorted(os.sched_getaffinity(0))[:cpus]
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full,
                             preexec_fn=lambda: os.sched_setaffinity(0, allowed))
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = rc = os.waitstatus_to_exitcode(status)
    CPU[log] = ru.ru_utime + ru.ru_stime
    return wall, ru.ru_maxrss / 1024, rc


def files_under(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def registry_files(reg: Path) -> dict[str, int]:
    """Blob and manifest files of a registry (what an operation reads or writes in it)."""
    out: dict[str, int] = {}
    for sub in ("objects", "manifests"):
        if (reg / sub).is_dir():
            out.update(files_under(reg / sub))
    return out


def patch_inputs(reg: Path, ref: str) -> list[str]:
    """The files an operation reads for one patch: its manifest and every blob it names."""
    repo = Repository(reg, create=False)
    try:
        digest = repo.resolve(ref)
        m = parse_manifest(repo.store.read_manifest_bytes(digest))
        return [str(repo.store.manifest_path(digest)), *(str(repo.store.blob_path(d)) for d in m.blob_digests())]
    finally:
        repo.close()


def digest_of(reg: Path, ref: str) -> str:
    repo = Repository(reg, create=False)
    try:
        return repo.resolve(ref)
    finally:
        repo.close()


def tensors_digest(reg: Path, ref: str) -> str:
    """sha256 over the manifest's (tensor name, blob digest, pins digest): the stored values alone, not
    the parents, recipe or base block (which change with the inputs' manifests and the format)."""
    repo = Repository(reg, create=False)
    try:
        m = parse_manifest(repo.store.read_manifest_bytes(repo.resolve(ref)))
    finally:
        repo.close()
    rows = sorted((k, e.digest, (e.pins or {}).get("digest", "")) for k, e in m.tensors.items())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def shard_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")):
        with open(p, "rb") as f:
            while b := f.read(8 << 20):
                h.update(b)
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="patchctl's streaming operations against the raw I/O floor.")
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (24 = 468.2M params; 2 = 99M)")
    ap.add_argument("--work", type=Path, default=HERE / "_work", help="scratch folder (default bench/_work)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread (= pinned core) counts")
    ap.add_argument("--ops", default=",".join(ALL_OPS), help=f"comma-separated, from {','.join(ALL_OPS)}")
    ap.add_argument("--patchctl", default=None,
                    help="the patchctl command to time (default: this Python's; another checkout's, to compare)")
    ap.add_argument("--floor-runs", type=int, default=3, help="floor runs per operation; the fastest counts")
    ap.add_argument("--runs", type=int, default=2,
                    help="runs of each operation (fresh outputs each time); the fastest counts, as for the floor")
    ap.add_argument("--chunk-mib", type=int, default=8, help="floor read/write chunk (MiB)")
    args = ap.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if set(ops) - set(ALL_OPS):
        ap.error(f"--ops: choose from {','.join(ALL_OPS)}")
    threads = [int(t) for t in args.threads.split(",")]
    if any(t < 1 for t in threads):
        ap.error("--threads: positive integers")

    py = sys.executable
    exe = Path(py).parent / "patchctl"
    patchctl = [str(exe)] if exe.is_file() else [py, "-m", "patchctl"]
    if args.patchctl:
        patchctl = args.patchctl.split()
    work = args.work.resolve()
    tag = f"llama-l{args.layers}"
    base = work / f"{tag}-base"
    fts = {k: work / f"{tag}-ft-{k}" for k in KINDS}
    run_dir = work / f"floor-{tag}{'-alt' if args.patchctl else ''}"  # another command: its own folder
    logs, pushed = run_dir / "logs", run_dir / "pushed"
    ncpu = len(os.sched_getaffinity(0))

    print(machine())
    print(f"command: {' '.join([Path(py).name, *sys.argv])}")
    print(f"load average at start: {loadavg()}  (uptime; shared VM: compare within this run)")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    subprocess.run([py, "-m", "compileall", "-q", str(HERE.parent / "patchctl")], check=False,
                   stdout=subprocess.DEVNULL)  # the bytecode an installed package has (see run())
    logs.mkdir(parents=True)
    synth = str(HERE / "_synth.py")
    need = ["dense"] + (["sparse", "lowrank"] if set(ops) & set(MERGES) else [])
    prep = [([py, synth, "base", str(base), "--layers", str(args.layers)], "synth-base")]
    prep += [([py, synth, "finetune", str(base), str(fts[k]), "--kind", k], f"synth-{k}") for k in need]
    for cmd, name in prep:
        _, _, rc = run(cmd, logs / f"{name}.log", ncpu)
        print(f"  {(logs / f'{name}.log').read_text().strip().splitlines()[-1]}")
        if rc:
            print(f"{name} failed (exit {rc}):\n{tail(logs / f'{name}.log')}")
            return 2
    base_files = [str(p) for p in sorted(base.glob("*.safetensors"))]
    ft_files = [str(p) for p in sorted(fts["dense"].glob("*.safetensors"))]
    model_mb = sum(os.path.getsize(p) for p in base_files) / 1e6

    for k in need:  # one-time, untimed: the registry the merges and the pull start from
        _, _, rc = run([*patchctl, "push", str(fts[k]), f"ft-{k}:v1", "--base", str(base), "--registry", str(pushed)],
                       logs / f"setup-push-{k}.log", ncpu)
        if rc:
            print(f"setup push {k} failed:\n{tail(logs / f'setup-push-{k}.log')}")
            return 2

    imp_wall, imp_rss, _ = run([py, "-c", "import torch, patchctl"], logs / "import.log", ncpu)
    rows: list[dict[str, object]] = []
    checks: dict[str, dict[int, str]] = {}
    ok = True

    def timed(cmd: list[str], log: Path, cpus: int, reset: Any) -> tuple[float, float, int]:
        """``cmd`` run ``--runs`` times, ``reset()`` before each (fresh outputs); the fastest run (a failed
        one wins: it is reported). Its log stays at ``log`` and its CPU seconds in :data:`CPU`."""
        best: tuple[float, float, int] | None = None
        for attempt in range(max(1, args.runs)):
            reset()
            one = log.with_name(f"{log.stem}-run{attempt}.log")
            got = run(cmd, one, cpus)
            if best is None or got[2] or (not best[2] and got[0] < best[0]):
                best = got
                shutil.copyfile(one, log)
                CPU[log] = CPU[one]
            if got[2]:
                break
        assert best is not None
        return best

    def floor(name: str, inputs: list[str], outputs: list[int], cpus: int) -> dict[str, float]:
        spec = {"inputs": inputs, "outputs": outputs, "dir": str(run_dir / "floor-out"), "chunk": args.chunk_mib << 20}
        spec_file = run_dir / "floor-spec.json"
        spec_file.write_text(json.dumps(spec))
        best: dict[str, float] = {}
        for attempt in range(args.floor_runs):  # the best of a few: the disk's write speed swings on this VM
            log = logs / f"floor-{name}-t{cpus}-{attempt}.log"
            wall, rss, rc = run([py, "-c", FLOOR, str(spec_file)], log, cpus)
            shutil.rmtree(run_dir / "floor-out", ignore_errors=True)
            if rc:
                raise SystemExit(f"floor of {name} failed:\n{tail(log)}")
            if not best or wall < best["wall"]:
                best = {"wall": wall, "rss": rss, "cpu": CPU[log], **json.loads(log.read_text().strip().splitlines()[-1])}
        return best

    def record(op: str, cpus: int, wall: float, rss: float, rc: int, log: Path, fl: dict[str, float], note: str) -> None:
        nonlocal ok
        if rc:
            ok = False
            note = f"exit {rc}; {note}"
            print(tail(log))
        rows.append({"op": op, "threads": cpus, "wall": wall, "rss": rss, "floor": fl["wall"], "ratio": wall / fl["wall"],
                     "cpu": CPU[log], "floor_cpu": fl["cpu"],
                     "in_mb": fl["read_bytes"] / 1e6, "out_mb": fl["write_bytes"] / 1e6, "note": note})
        print(f"  t{cpus} {op:<6} {wall:7.2f} s (CPU {CPU[log]:5.2f} s) {rss:6.0f} MiB | floor {fl['wall']:6.2f} s "
              f"(read {fl['read_bytes'] / 1e6:5.0f} MB {fl['read_s']:5.2f} s, write {fl['write_bytes'] / 1e6:5.0f} MB "
              f"{fl['write_s']:5.2f} s) | {wall / fl['wall']:5.2f}x  load {loadavg()}  {note}", flush=True)

    with serving(pushed, timeout=120, log=logs / "serve.log") as (url, _server):
        for cpus in threads:
            print(f"\nthreads {cpus} (pinned to {cpus} of {ncpu} cores, PATCHCTL_THREADS={cpus}):")
            reg, out = run_dir / f"reg-t{cpus}", run_dir / f"out-t{cpus}"
            if "push" in ops or "apply" in ops:
                log = logs / f"push-t{cpus}.log"
                wall, rss, rc = timed([*patchctl, "push", str(fts["dense"]), "d:v1", "--base", str(base),
                                       "--registry", str(reg)], log, cpus,
                                      lambda reg=reg: shutil.rmtree(reg, ignore_errors=True))
                if "push" in ops:
                    written = registry_files(reg)
                    fl = floor("push", ft_files + base_files, list(written.values()), cpus)
                    record("push", cpus, wall, rss, rc, log, fl, f"{len(written)} files written")
                checks.setdefault("push digest", {})[cpus] = digest_of(reg, "d:v1") if rc == 0 else "failed"
                checks.setdefault("push tensor blobs", {})[cpus] = tensors_digest(reg, "d:v1") if rc == 0 else "failed"
            if "apply" in ops:
                log = logs / f"apply-t{cpus}.log"
                wall, rss, rc = timed([*patchctl, "apply", "d:v1", str(out), "--base", str(base), "--registry",
                                       str(reg)], log, cpus, lambda out=out: shutil.rmtree(out, ignore_errors=True))
                fl = floor("apply", base_files + patch_inputs(reg, "d:v1"), list(files_under(out).values()), cpus)
                vlog = logs / f"verify-t{cpus}.log"
                _, _, vrc = run([py, "-c", VERIFY, str(fts["dense"]), str(out)], vlog, ncpu)
                verdict = vlog.read_text().strip().splitlines()[-1]
                ok &= vrc == 0
                record("apply", cpus, wall, rss, rc, log, fl, f"bit-exact vs fine-tune: {'PASS' if vrc == 0 else 'FAIL'} ({verdict})")
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(reg, ignore_errors=True)
            for op in (o for o in ops if o in MERGES):
                mreg, mout = run_dir / f"mreg-{op}-t{cpus}", run_dir / f"mout-{op}-t{cpus}"
                before = registry_files(pushed)

                def fresh(mreg: Path = mreg, mout: Path = mout) -> None:
                    shutil.rmtree(mreg, ignore_errors=True)
                    shutil.rmtree(mout, ignore_errors=True)
                    clone_registry(pushed, mreg)

                log = logs / f"{op}-t{cpus}.log"
                wall, rss, rc = timed([*patchctl, "merge", *(f"ft-{k}:v1" for k in KINDS), "--weights", WEIGHTS,
                                       *MERGES[op], "--as", f"m-{op}:v1", "--no-validate", "--apply", str(mout),
                                       "--base", str(base), "--registry", str(mreg)], log, cpus, fresh)
                before = {str(mreg / Path(p).relative_to(pushed)): n for p, n in before.items()}
                inputs = sorted({f for k in KINDS for f in patch_inputs(mreg, f"ft-{k}:v1")})
                after = registry_files(mreg)
                outputs = [s for p, s in after.items() if p not in before] + list(files_under(mout).values())
                fl = floor(op, base_files + inputs, outputs, cpus)
                note = ""
                if rc == 0:
                    d, s = digest_of(mreg, f"m-{op}:v1"), shard_digest(mout)
                    checks.setdefault(f"{op} digest", {})[cpus] = d
                    checks.setdefault(f"{op} tensor blobs", {})[cpus] = tensors_digest(mreg, f"m-{op}:v1")
                    checks.setdefault(f"{op} --apply shards sha256", {})[cpus] = s
                    note = f"{d[:19]}… shards {s}"
                record(op, cpus, wall, rss, rc, log, fl, note)
                shutil.rmtree(mreg, ignore_errors=True)
                shutil.rmtree(mout, ignore_errors=True)
            if "pull" in ops:
                preg = run_dir / f"preg-t{cpus}"
                log = logs / f"pull-t{cpus}.log"
                wall, rss, rc = timed([*patchctl, "pull", "ft-dense:v1", "--from", url, "--registry", str(preg)], log,
                                      cpus, lambda preg=preg: shutil.rmtree(preg, ignore_errors=True))
                inputs = patch_inputs(pushed, "ft-dense:v1")
                fl = floor("pull", inputs, [os.path.getsize(p) for p in inputs], cpus)
                got = digest_of(preg, "ft-dense:v1") if rc == 0 else "failed"
                same = got == digest_of(pushed, "ft-dense:v1")
                ok &= same
                record("pull", cpus, wall, rss, rc, log, fl, f"digest {'equal' if same else 'DIFFERS'}")
                shutil.rmtree(preg, ignore_errors=True)

    print(f"\nmodel: {tag}, {model_mb:.0f} MB of bf16 tensors per model; `python -c 'import torch, patchctl'` "
          f"{imp_wall:.2f} s (CPU {CPU[logs / 'import.log']:.2f} s), peak RSS {imp_rss:.0f} MiB; "
          f"load average at end: {loadavg()}")
    print(f"patchctl: {' '.join(patchctl)}")
    best = {}  # the same bytes at every thread count: the fastest floor of an op in this run
    for r in rows:
        best[r["op"]] = min(best.get(r["op"], r["floor"]), r["floor"])
    hdr = (f"{'op':<7}{'threads':>8}{'wall s':>9}{'floor s':>9}{'x floor':>9}{'x best floor':>14}{'peak RSS MiB':>14}"
           f"{'in MB':>8}{'out MB':>8}{'CPU s':>8}{'floor CPU s':>13}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['op']:<7}{r['threads']:>8}{r['wall']:>9.2f}{r['floor']:>9.2f}{r['ratio']:>8.2f}x"
              f"{r['wall'] / best[r['op']]:>13.2f}x{r['rss']:>14.0f}{r['in_mb']:>8.0f}{r['out_mb']:>8.0f}{r['cpu']:>8.2f}{r['floor_cpu']:>13.2f}")
    print(f"floor = read every input byte + write every output byte ({args.chunk_mib} MiB chunks, fsync per file), "
          f"its own process, fastest of {args.floor_runs}; best floor = the fastest at any thread count")
    print("\noutput checks:")
    for what, by in checks.items():
        vals = set(by.values())
        same = len(vals) == 1 and "failed" not in vals
        ok &= same
        print(f"  {what}: {'same at every thread count' if same else 'DIFFERS'}: {next(iter(vals)) if same else by}")
    print(f"logs: {logs}")
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
