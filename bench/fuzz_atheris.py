"""Coverage-guided fuzzing (atheris, i.e. libFuzzer) of the parsers of untrusted input.

    python bench/fuzz_atheris.py -runs=100000                    # every target in turn, 100,000 inputs each
    python bench/fuzz_atheris.py --target codec -max_total_time=300
    python bench/fuzz_atheris.py --target manifest,peft -runs=5000 --crashes /tmp/crashes --json out.json
    python bench/fuzz_atheris.py -runs=2000 -seed=1 --jobs 4         # what tests/test_fuzz.py runs

Targets — the same entry points as the hypothesis and mutator fuzzing of
``bench/reliability.py`` (its ``Targets``) and ``tests/test_fuzz.py``:

- ``safetensors``: the input is written as a file, opened with
  ``SafetensorsFile`` and every tensor it accepts is read;
- ``manifest``: ``manifest.parse`` (and what parses must round-trip through
  ``to_bytes``, the canonical JSON of ``canonical.py``);
- ``peft``: ``importers.read_peft_config`` on a folder whose
  ``adapter_config.json`` is the input;
- ``codec``: ``codec.decode`` of a sparse blob (then ``encode`` and
  ``to_dense`` of what decodes).

Each target runs in its own child process (``--child``), with the
``patchctl`` modules instrumented for coverage, a corpus seeded with the valid
inputs ``reliability.seed_inputs()`` builds with the code itself
(``header_bytes``, ``Manifest.to_bytes``, ``codec.encode``), and a libFuzzer
dictionary of the keys and strings found in those seeds. The safetensors
target has a structure-aware mutator: most mutations edit the JSON header or
the data region and then re-write the 8-byte length prefix, so the fuzzer gets
past the length check.

A crash is any exception that is not a ``PatchctlError``: the input is saved
to ``CRASHES/<target>-<sha1>`` (its traceback beside it, ``.txt``) and the
fuzzing goes on. The child's address space is capped (``--max-alloc-mb``
above what it holds after its imports), so an allocation sized by an
unchecked header fails as a ``MemoryError``, which is a crash too; libFuzzer's
own ``-rss_limit_mb`` and ``-timeout`` (10 s per input here) stop the child,
also a crash, with libFuzzer's artifact in ``CRASHES``. Arguments starting
with ``-`` and containing ``=`` are passed to libFuzzer (``-runs=N``,
``-max_total_time=S``, ``-seed=N``, ...). Exit status 0 when no target
crashed. Everything is local: no network.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = ("safetensors", "manifest", "peft", "codec")
STATS = "ATHERIS-STATS "
# the parsers the targets reach, imported under instrumentation (with every patchctl module they import)
PARSERS = ("patchctl.registry.formats.safetensors", "patchctl.registry.store.manifest", "patchctl.registry.formats.canonical",
           "patchctl.registry.ops.importing", "patchctl.patches.codec")


# ---------------------------------------------------------------------------- the child: one target under libFuzzer


def _dict_entries(seeds: list[bytes]) -> list[bytes]:
    """libFuzzer dictionary tokens: JSON punctuation and every key and string of the JSON seeds."""
    out = {b'"', b"{", b"}", b"[", b"]", b":", b",", b"null", b"true", b"false", b"-1", b"0", b"1e309", b"NaN",
           b"Infinity", b"18446744073709551615", b"9223372036854775808", b"PCSP"}

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                out.add(json.dumps(k).encode())
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str):
            out.add(json.dumps(x).encode())

    for s in seeds:
        try:
            walk(json.loads(s))
        except ValueError:
            if len(s) > 8 and s[8:9] == b"{":  # a safetensors file: its JSON header
                n = int.from_bytes(s[:8], "little")
                walk(json.loads(s[8:8 + n]))
    return sorted(e for e in out if len(e) <= 64)


def _dict_line(token: bytes) -> str:
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\x{b:02x}" for b in token) + '"'


def _safetensors_mutator(atheris: Any) -> Any:
    """Mutate the header or the data region of a safetensors file, then (mostly) fix its length prefix."""
    import random

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
        if 0 <= n <= len(data) - 8 and rng.random() < 0.85:
            header, body = data[8:8 + n], data[8 + n:]
            room = max(max_size - 8, 2)
            if rng.random() < 0.8:
                header = atheris.Mutate(header, max(room - len(body), len(header) + 64, 2))
            else:
                body = atheris.Mutate(body, max(room - len(header), 1))
            prefix = len(header) if rng.random() < 0.95 else rng.choice((0, len(header) + 1, 2**63, 100 << 20))
            return (prefix.to_bytes(8, "little") + header + body)[:max_size]
        return atheris.Mutate(data, max_size)

    return mutate


def child(target: str, crashes: Path, corpus: Path, scratch: Path, max_alloc_mb: int, fuzzer_args: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["patchctl"]):
        import importlib

        for m in PARSERS:
            importlib.import_module(m)
    sys.path.insert(0, str(HERE))
    import reliability

    from patchctl.errors import PatchctlError

    fn = getattr(reliability.Targets(scratch), target)
    seeds = reliability.seed_inputs()[target]
    corpus.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        (corpus / f"seed-{hashlib.sha1(s).hexdigest()}").write_bytes(s)
    dict_path = scratch / f"{target}.dict"
    dict_path.write_text("\n".join(_dict_line(t) for t in _dict_entries(seeds)) + "\n")
    crashes.mkdir(parents=True, exist_ok=True)
    stats = {"target": target, "tried": 0, "parsed": 0, "crashes": 0, "kinds": {}}

    def one(data: bytes) -> None:
        stats["tried"] += 1
        try:
            fn(data)
            stats["parsed"] += 1
        except PatchctlError:
            pass
        except Exception as e:  # noqa: BLE001 - a crash: saved, counted, and the fuzzing goes on
            import traceback

            stats["crashes"] += 1
            kind = f"{type(e).__name__} at {traceback.extract_tb(e.__traceback__)[-1].name}"
            stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
            name = crashes / f"{target}-{hashlib.sha1(data).hexdigest()}"
            if not name.exists():
                name.write_bytes(data)
                name.with_suffix(".txt").write_text("".join(traceback.format_exception(e)))

    _on_exit(lambda: sys.stderr.write(STATS + json.dumps(stats) + "\n"))
    if max_alloc_mb > 0:  # an allocation sized by an unchecked header must fail here, not succeed lazily
        import resource

        vm = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (max_alloc_mb << 20), resource.RLIM_INFINITY))
    argv = [sys.argv[0], f"-dict={dict_path}", f"-artifact_prefix={crashes}/{target}-", "-timeout=10",
            "-rss_limit_mb=4096", "-print_final_stats=1", *fuzzer_args, str(corpus)]
    mutator = _safetensors_mutator(atheris) if target == "safetensors" else None
    atheris.Setup(argv, one, custom_mutator=mutator)
    atheris.Fuzz()  # libFuzzer exits the process when done


def _on_exit(fn: Any) -> None:
    """Run ``fn`` when libFuzzer calls exit() (Python's atexit does not run then): glibc's __cxa_atexit."""
    import ctypes

    cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: fn())
    _on_exit.keep = cb  # type: ignore[attr-defined]  # the callback must outlive this frame
    ctypes.CDLL(None).__cxa_atexit(cb, None, None)


# ---------------------------------------------------------------------------- the parent: run and report


def run_target(target: str, crashes: Path, corpus: Path | None, fuzzer_args: list[str], max_alloc_mb: int,
               timeout: float | None = None, verbose: bool = True) -> dict[str, Any]:
    """Fuzz one target in a child process; its figures (inputs tried, parsed, crashes, coverage)."""
    with tempfile.TemporaryDirectory(prefix=f"patchctl-atheris-{target}-") as tmp:
        cdir = corpus if corpus is not None else Path(tmp) / "corpus"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", target, "--crashes", str(crashes),
               "--corpus", str(cdir), "--scratch", str(Path(tmp) / "scratch"), "--max-alloc-mb", str(max_alloc_mb),
               *fuzzer_args]
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                               env={**os.environ, "PYTHONHASHSEED": "0"})
            out, rc = p.stderr + p.stdout, p.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = ((e.stderr or b"") + (e.stdout or b"")).decode(errors="replace"), None
        secs = time.monotonic() - t0
    stats_line = [ln for ln in out.splitlines() if ln.startswith(STATS)]
    st = json.loads(stats_line[-1][len(STATS):]) if stats_line else {}
    runs = re.findall(r"stat::number_of_executed_units: (\d+)", out) or re.findall(r"^#(\d+)\s", out, re.M)
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", out)
    died = rc != 0 or not stats_line
    res = {
        "target": target,
        "tried": st.get("tried", int(runs[-1]) if runs else 0),
        "parsed": st.get("parsed"),
        "crashes": st.get("crashes", 0) + (1 if died else 0),
        "crash_kinds": st.get("kinds", {}) | ({f"child died (exit {rc})": 1} if died else {}),
        "cov": int(cov[-1][0]) if cov else None,
        "features": int(cov[-1][1]) if cov else None,
        "corpus": int(cov[-1][2]) if cov else None,
        "seconds": round(secs, 1),
    }
    if died:
        res["tail"] = out[-3000:]
    if verbose:
        print(f"  {target}: {res['tried']} inputs, {res['parsed']} parsed, {res['crashes']} crashes, "
              f"cov {res['cov']} ft {res['features']} corpus {res['corpus']}, {secs:.0f} s", flush=True)
        if died:
            print(res["tail"], flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fuzzer_args = [a for a in argv if a.startswith("-") and not a.startswith("--") and "=" in a]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="libFuzzer flags (-runs=N, -max_total_time=S, -seed=N, ...) pass through.")
    ap.add_argument("--target", default="all", help=f"comma-separated, from {', '.join(TARGETS)} (default all)")
    ap.add_argument("--crashes", type=Path, default=None,
                    help="folder for crashing inputs (default: a new folder under bench/_work/)")
    ap.add_argument("--corpus", type=Path, default=None, help="keep the corpus here (default: a temporary folder)")
    ap.add_argument("--max-alloc-mb", type=int, default=1024,
                    help="address space a child may add after its imports (0: no cap)")
    ap.add_argument("--timeout", type=float, default=None, help="wall-clock limit per target, seconds")
    ap.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once, each in its own process")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args([x for x in argv if x not in fuzzer_args])
    if a.child:
        assert a.crashes and a.corpus and a.scratch  # set by the parent
        child(a.child, a.crashes, a.corpus, a.scratch, a.max_alloc_mb, fuzzer_args)
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install 'patchctl[test]' (Linux x86-64, CPython 3.11-3.14)")
        return 2
    targets = TARGETS if a.target == "all" else tuple(a.target.split(","))
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        ap.error(f"unknown target {bad[0]!r}; choose from {', '.join(TARGETS)}")
    crashes = a.crashes or ROOT / "bench" / "_work" / f"atheris-crashes-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"# bench/fuzz_atheris.py {' '.join(fuzzer_args)} — crashes go to {crashes}", flush=True)
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:  # threads that each wait on a child process
        results = list(pool.map(lambda t: run_target(t, crashes, a.corpus / t if a.corpus else None, fuzzer_args,
                                                     a.max_alloc_mb, a.timeout), targets))
    print("\n| target | inputs tried | parsed | crashes | coverage (cov / ft) | corpus | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['target']} | {r['tried']} | {r['parsed']} | {r['crashes']} | {r['cov']} / {r['features']} | "
              f"{r['corpus']} | {r['seconds']:.0f} |")
    total, ncrash = sum(r["tried"] for r in results), sum(r["crashes"] for r in results)
    print(f"| **total** | **{total}** | | **{ncrash}** | | | |")
    for r in results:
        for k, n in r["crash_kinds"].items():
            print(f"    {r['target']}: {n} x {k}")
    if ncrash:
        print(f"crashing inputs: {crashes}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0 if ncrash == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
