"""What ``patchctl serve`` spends to send blob bodies: its CPU seconds per GB, against another tree's (issue #21).

    nice python bench/serve_send.py                                # this checkout's server vs itself (sanity)
    nice python bench/serve_send.py --baseline /tmp/old62          # vs another tree (git archive REV patchctl)
    nice python bench/serve_send.py --tree /tmp/zc --baseline /tmp/old62   # two other trees

A registry with ``--blobs`` random blobs of ``--blob-mib`` MiB each (made once under
``bench/_work/serve-send``) is served by each tree's ``python -m patchctl serve`` on 127.0.0.1,
one after the other; a client (this process: ``http.client`` on one connection, ``readinto`` a reused
buffer, no hashing) GETs every blob ``--rounds`` times. Reported per server: wall seconds, the server
process's CPU seconds (user + system, from ``/proc/PID/stat`` before and after), and its CPU per GB
sent; then the ratio of this tree to the baseline. The bodies are checked (sha256 of the first round).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_registry(folder: Path, blobs: int, mib: int) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from patchctl.registry.store.repository import Repository

    marker = folder / f"made-{blobs}x{mib}"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        with Repository(folder / "reg") as reg:
            digests = [reg.store.put_blob(os.urandom(mib << 20)) for _ in range(blobs)]
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text("\n".join(digests))
    return marker.read_text().split()


def serve(tree: Path, registry: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = log.with_suffix(".port")
    env = dict(os.environ, PYTHONPATH=str(tree))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "patchctl", "serve", "--port", str(port), "--registry", str(registry)],
                         cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/v2/")
            if c.getresponse().status == 200:
                c.close()
                port_file.write_text(str(port))
                return p, port
        except OSError:
            time.sleep(0.1)
    p.kill()
    raise SystemExit(f"server of {tree} did not start: {log.read_text()[-2000:]}")


def run(tree: Path, registry: Path, digests: list[str], rounds: int, log: Path) -> dict[str, float]:
    p, port = serve(tree, registry, log)
    buf = memoryview(bytearray(4 << 20))
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        sent = 0
        cpu0, t0 = cpu_seconds(p.pid), time.perf_counter()
        for r in range(rounds):
            for d in digests:
                c.request("GET", f"/v2/bench/blobs/{d}")
                resp = c.getresponse()
                if resp.status != 200:
                    raise SystemExit(f"{tree}: GET {d} -> {resp.status}")
                h = hashlib.sha256() if r == 0 else None
                while True:
                    n = resp.readinto(buf)
                    if not n:
                        break
                    sent += n
                    if h is not None:
                        h.update(buf[:n])
                if h is not None and "sha256:" + h.hexdigest() != d:
                    raise SystemExit(f"{tree}: the body of {d} is wrong")
        wall, cpu = time.perf_counter() - t0, cpu_seconds(p.pid) - cpu0
        c.close()
    finally:
        p.terminate()
        p.wait(10)
    return {"wall": wall, "cpu": cpu, "gb": sent / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=ROOT, help="the tree measured (default: this checkout)")
    ap.add_argument("--baseline", type=Path, default=ROOT, help="the other tree (a folder holding patchctl/)")
    ap.add_argument("--blobs", type=int, default=4)
    ap.add_argument("--blob-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="GETs of every blob (the first round checks bodies)")
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "serve-send")
    a = ap.parse_args()
    digests = make_registry(a.work, a.blobs, a.blob_mib)
    rows = {}
    for name, tree in (("this tree", a.tree.resolve()), ("baseline", a.baseline.resolve())):
        rows[name] = run(tree, a.work / "reg", digests, a.rounds, a.work / f"serve-{name.replace(' ', '-')}.log")
        r = rows[name]
        print(f"{name:<10} {tree}: {r['gb']:.2f} GB in {r['wall']:.2f} s ({r['gb'] / r['wall']:.2f} GB/s), "
              f"server CPU {r['cpu']:.2f} s = {r['cpu'] / r['gb']:.3f} s/GB", flush=True)
    new, old = rows["this tree"], rows["baseline"]
    print(f"this tree / baseline: wall {new['wall'] / old['wall']:.2f}x, server CPU {new['cpu'] / old['cpu']:.2f}x")


if __name__ == "__main__":
    main()
