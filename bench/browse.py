"""Registry browser benchmark: server time of the index and patch pages at scale.

    python bench/browse.py                      # 10,000 patch versions, a 1,000-tensor patch, 20 requests each
    python bench/browse.py --versions 2000 --requests 5     # quick run

Builds (once per ``--work`` folder; reused when complete) a registry with
``--versions`` patch versions — ``--versions / 10`` names × 10 tags, tiny
two-tensor ``diff`` manifests committed through the real
:meth:`Registry.commit` (so the refs, their logs and the SQLite index are
what a user's registry holds), one in ten with a validation record — and one
``diff`` patch of ``--tensors`` tensors (64×64 float32) spread over 100 layers.

Then starts a real ``python -m patchctl serve`` and GETs each page
``--requests`` times after one untimed warm-up request (which fills the
per-digest caches: verdicts, norms), reporting the median and worst
``Server-Timing: total`` (time inside the handler: query, data, template)
and the client's wall time (adds HTTP and the loopback). The cold first
request is reported too. Goal: index (paginated) and patch page ≤ 300 ms
server time. Exit status 0 when both medians meet it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from patchctl import Registry  # noqa: E402
from patchctl.registry.store import records  # noqa: E402
from patchctl.registry.store.manifest import Manifest, TensorEntry  # noqa: E402
from patchctl.server.process import serving  # noqa: E402

ZERO = "sha256:" + "0" * 64
BIG = "bench/big:v1"
GOAL_MS = 300.0


def build(root: Path, versions: int, tensors: int) -> dict[str, float]:
    marker = root / "_bench_browse.json"
    want = {"versions": versions, "tensors": tensors}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return {"build_s": 0.0}
    import numpy as np

    t0 = time.perf_counter()
    base = {"fingerprint": ZERO, "name": "bench-base", "revision": None}
    with Registry(root) as reg:
        rng = np.random.default_rng(0)
        small = rng.standard_normal(64).astype("float32").tobytes()
        blob = reg.store.put_blob(small)
        entry = TensorEntry(blob, "float32", (8, 8), "raw", len(small))
        names = max(1, versions // 10)
        for i in range(versions):
            name, tag = f"team{i % 7}/adapter-{i % names:05d}", f"v{i // names}"
            m = Manifest("diff", base, {"model.layers.0.self_attn.q_proj.weight": entry,
                                        "model.layers.1.self_attn.q_proj.weight": entry},
                         metadata={"i": i, "task": f"task-{i % 13}"})
            d = reg.commit(m, f"{name}:{tag}", message=f"version {i}", move_latest=False)
            if i % 10 == 0:
                records.add_validation(reg.store, d, {"type": "merge-validation", "verdict": "pass" if i % 20 else "fail",
                                                      "rows": [], "gate": 0.9})
        big = {}
        for j in range(tensors):
            data = rng.standard_normal(64 * 64).astype("float32").tobytes()
            big[f"model.layers.{j % 100}.mlp.part{j // 100}.weight"] = TensorEntry(
                reg.store.put_blob(data), "float32", (64, 64), "raw", len(data))
        reg.commit(Manifest("diff", base, big, metadata={"bench": "1000 tensors"}), BIG, message="big patch",
                   move_latest=False)
    marker.write_text(json.dumps(want))
    return {"build_s": time.perf_counter() - t0}


def _server_ms(r: httpx.Response) -> float:
    m = re.search(r"total;dur=([0-9.]+)", r.headers.get("server-timing", ""))
    if r.status_code != 200 or not m:
        raise SystemExit(f"{r.request.url}: HTTP {r.status_code} {r.text[:300]}")
    return float(m.group(1))


def measure(url: str, path: str, n: int) -> dict[str, float]:
    with httpx.Client(base_url=url, timeout=120) as c:
        t0 = time.perf_counter()
        first = c.get(path)
        cold_wall = (time.perf_counter() - t0) * 1000
        cold = _server_ms(first)
        server, wall = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.get(path)
            wall.append((time.perf_counter() - t0) * 1000)
            server.append(_server_ms(r))
    return {"cold_server_ms": cold, "cold_wall_ms": cold_wall, "server_ms": statistics.median(server),
            "server_max_ms": max(server), "wall_ms": statistics.median(wall), "bytes": len(first.content)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", type=int, default=10_000)
    ap.add_argument("--tensors", type=int, default=1_000)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--work", type=Path, default=None, help="registry folder to build or reuse (default: a temp dir)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="browse-bench-"))
    root = work / "reg"
    built = build(root, args.versions, args.tensors)
    print(f"registry {root}: {args.versions} versions + {BIG} ({args.tensors} tensors); "
          f"build {built['build_s']:.1f} s; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    pages = [
        ("index, page 1 (50 rows)", "/"),
        ("index, page 100", "/?page=100"),
        ("index, text filter", "/?q=adapter-0004"),
        ("index, sorted by verdict", "/?sort=verdict&order=desc"),
        ("index JSON twin", "/api/pages/index"),
        (f"patch page, {args.tensors} tensors", "/patches/" + BIG),
        ("patch JSON twin", "/api/pages/patches/" + BIG),
        ("patch page, small", "/patches/team0/adapter-00000:v0"),
    ]
    ok = True
    with serving(root, timeout=120) as (url, _):
        print(f"{'page':34} {'cold ms':>8} {'server ms':>10} {'max ms':>8} {'wall ms':>8} {'KiB':>7}")
        for label, path in pages:
            r = measure(url, path, args.requests)
            print(f"{label:34} {r['cold_server_ms']:8.1f} {r['server_ms']:10.1f} {r['server_max_ms']:8.1f} "
                  f"{r['wall_ms']:8.1f} {r['bytes'] / 1024:7.1f}")
            if path in ("/", "/patches/" + BIG):
                ok &= r["server_ms"] <= GOAL_MS
    print(f"goal: index page 1 and the {args.tensors}-tensor patch page <= {GOAL_MS:.0f} ms server time (median): "
          + ("met" if ok else "NOT met"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
