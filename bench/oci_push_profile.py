"""Where the time of an OCI push goes: patchctl's CPU against the registry server's (issue #21).

    nice .venv/bin/python bench/floor.py --ops push,pull --threads 2    # makes bench/_work/floor-llama-l24/pushed
    nice .venv/bin/python bench/oci_push_profile.py [--runs 2]

Publishes ``ft-dense:v1`` of floor.py's ``pushed`` registry (the 468M-parameter
bf16 diff, 390 blobs, 952 MB) with ``patchctl push --to oci://...`` to a
Debian ``docker-registry`` (distribution 2.8, started by ``bench/oci.py``'s
``start_registry``) on 127.0.0.1, each run into a fresh registry (every blob
uploaded). Prints the wall time, the patchctl process's CPU seconds (from
``os.wait4``) and the registry server's (from ``/proc``): both run on the same
cores, so their sum over the core count bounds the wall time from below. The
floor of the same bytes (read 952 MB + write 952 MB, fsynced) is floor.py's
``pull`` floor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from oci import start_registry  # noqa: E402 - bench/ is not a package


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--registry", type=Path, default=HERE / "_work" / "floor-llama-l24" / "pushed")
    args = ap.parse_args()
    exe = Path(sys.executable).parent / "patchctl"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # bytecode, as installed
    for run in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="oci-push-", dir=HERE / "_work"))
        proc, host = start_registry(work)
        try:
            c0 = cpu_s(proc.pid)
            t0 = time.perf_counter()
            p = subprocess.Popen([str(exe), "push", "ft-dense:v1", "--to", f"oci://{host}/bench/p:v1",
                                  "--registry", str(args.registry)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env=env)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            server = cpu_s(proc.pid) - c0
            out = p.stdout.read().decode().strip().splitlines() if p.stdout else []
            rc = os.waitstatus_to_exitcode(status)
            print(f"run {run}: wall {wall:.2f} s; patchctl CPU {ru.ru_utime + ru.ru_stime:.2f} s "
                  f"({ru.ru_utime:.2f} user + {ru.ru_stime:.2f} sys); docker-registry CPU {server:.2f} s; "
                  f"exit {rc}: {out[-1][:100] if out else ''}")
            if rc:
                return rc
        finally:
            proc.kill()
            proc.wait()
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
