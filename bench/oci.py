"""OCI push and pull: patchctl vs oras-py (and curl for pulls) against a real registry on loopback.

One synthetic bf16 diff shaped like a Llama (bench/_synth.py's ``llama_spec``;
the default 468M parameters, ~936 MB; the bytes are random, so nothing
compresses), one Debian ``docker-registry`` (distribution 2.8) on 127.0.0.1
with a fresh storage folder. Measured, each into an empty repository:

- push: ``patchctl push --to`` (``Registry.publish``) vs ``oras push`` of the
  same blob files (oras-py ``OrasClient.push``);
- pull: ``patchctl pull`` into an empty registry folder vs ``oras pull`` vs
  ``curl`` fetching every blob (4 in parallel, like both others' defaults);
- re-push after one changed tensor (an MLP weight of a middle layer): bytes
  sent vs that tensor's size (the rest is the new patchctl manifest, the config).

    python bench/oci.py                    # the 468M-parameter run (needs ~5 GB under --work)
    python bench/oci.py --layers 4 --hidden 512 --intermediate 2048 --vocab 8000   # a quick one

Prints one JSON document (figures, ratios, machine); bench/README.md keeps them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _synth import llama_spec  # noqa: E402

from patchctl import Registry  # noqa: E402
from patchctl.registry.store.manifest import Manifest, TensorEntry  # noqa: E402

ZERO = "sha256:" + "0" * 64
MB = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_registry(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("docker-registry")
    if binary is None:
        sys.exit("bench/oci.py needs Debian's docker-registry: apt-get install docker-registry")
    port = free_port()
    cfg = work / "registry.yml"
    cfg.write_text("version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                   f"storage:\n  filesystem:\n    rootdirectory: {work / 'storage'}\n  delete:\n    enabled: true\n"
                   f"http:\n  addr: 127.0.0.1:{port}\n")
    with open(work / "registry.log", "wb") as log:
        proc = subprocess.Popen([binary, "serve", str(cfg)], stdout=log, stderr=log)
    for _ in range(400):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/v2/")
            if c.getresponse().status == 200:
                c.close()
                return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("docker-registry did not start")


def make_diff(reg: Registry, ref: str, spec: list[tuple[str, tuple[int, ...]]], seed: int,
              change: str | None = None) -> Manifest:
    """A bf16 diff of random bytes, one blob per tensor (``change``: that tensor gets other bytes)."""
    import numpy as np

    entries = {}
    for i, (name, shape) in enumerate(spec):
        n = 2 * int(np.prod(shape))
        data = np.random.default_rng([seed, i, 1 if name == change else 0]).bytes(n)
        entries[name] = TensorEntry(reg.store.put_blob(data), "bfloat16", tuple(shape), "raw", n)
    m = Manifest("diff", {"fingerprint": ZERO, "name": "bench-llama", "revision": None}, entries, metadata={})
    reg.commit(m, ref, move_latest=False)
    return m


def timed(fn):  # noqa: ANN001, ANN201
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    a = ap.parse_args(argv)
    import oras.client

    spec = llama_spec(layers=a.layers, hidden=a.hidden, intermediate=a.intermediate, vocab=a.vocab)
    work = Path(tempfile.mkdtemp(prefix="oci-bench-", dir=a.work))
    proc, host = start_registry(work)
    os.environ["DOCKER_CONFIG"] = str(work / "docker")  # anonymous, whatever the machine has
    try:
        src = Registry(work / "src")
        m = make_diff(src, "bench/diff:v1", spec, seed=1)
        total = m.stored_bytes
        params = m.num_params

        t_push, pushed = timed(lambda: src.publish("bench/diff:v1", f"oci://{host}/pc"))
        files = [str(src.store.blob_path(t.digest)) for t in m.tensors.values()]
        client = oras.client.OrasClient(hostname=host, insecure=True)
        os.chdir(work)
        t_oras_push, _ = timed(lambda: client.push(target=f"{host}/oras/diff:v1", files=files,
                                                   disable_path_validation=True))

        dst = Registry(work / "dst")
        t_pull, pulled = timed(lambda: dst.pull(f"oci://{host}/pc/bench/diff:v1", workers=a.workers))
        t_oras_pull, _ = timed(lambda: client.pull(target=f"{host}/oras/diff:v1", outdir=str(work / "oras-out")))

        curl = shutil.which("curl")
        t_curl = None
        if curl:
            (work / "curl-out").mkdir()

            def one(d: str) -> None:
                subprocess.run([curl, "-sf", "-o", str(work / "curl-out" / d[7:]),
                                f"http://{host}/v2/pc/bench/diff/blobs/{d}"], check=True)

            def all_blobs() -> None:
                with ThreadPoolExecutor(a.workers) as pool:
                    list(pool.map(one, m.blob_digests()))

            t_curl, _ = timed(all_blobs)

        mlp = [n for n, _ in spec if n.endswith("mlp.up_proj.weight")]
        changed = mlp[len(mlp) // 2]  # one MLP weight of a middle layer
        make_diff(src, "bench/diff:v2", spec, seed=1, change=changed)
        t_repush, repushed = timed(lambda: src.publish("bench/diff:v2", f"oci://{host}/pc"))
        changed_size = src.manifest("bench/diff:v2").tensors[changed].size
        out = {
            "params": params, "bytes": total, "tensors": len(spec), "workers": a.workers,
            "push_s": round(t_push, 3), "oras_push_s": round(t_oras_push, 3),
            "push_vs_oras": round(t_push / t_oras_push, 3),
            "pull_s": round(t_pull, 3), "oras_pull_s": round(t_oras_pull, 3),
            "pull_vs_oras": round(t_pull / t_oras_pull, 3),
            "curl_pull_s": round(t_curl, 3) if t_curl else None,
            "pull_speed_vs_curl": round(t_curl / t_pull, 3) if t_curl else None,
            "push_MBps": round(total / MB / t_push, 1), "pull_MBps": round(total / MB / t_pull, 1),
            "repush_s": round(t_repush, 3), "repush_bytes_sent": repushed["bytes_sent"],
            "changed_tensor_bytes": changed_size,
            "repush_sent_over_tensor": round(repushed["bytes_sent"] / changed_size, 4),
            "repush_blobs_uploaded": repushed["blobs_uploaded"],  # the tensor and the new patchctl manifest
            "push_uploaded": pushed["blobs_uploaded"], "pull_fetched": pulled["blobs_fetched"],
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        }
        print(json.dumps(out, indent=2))
        return 0
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
