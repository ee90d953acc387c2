"""``patchctl serve`` as a child process: for tests, benchmarks and the demo.

:func:`serving` starts ``python -m patchctl serve`` on a free loopback port,
waits until ``/api/health`` answers, yields ``(url, process)`` and stops the
server when the block ends (terminate, then kill after 10 s). Tests of the
server's limits lower its descriptor limit (``nofile``), set its environment
(``env``: ``PATCHCTL_SERVE_*``) and read its log afterwards (``log``).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(port: int) -> bool:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            c.request("GET", "/api/health")
            return c.getresponse().status == 200
        finally:
            c.close()
    except OSError:
        return False


@contextlib.contextmanager
def serving(
    registry: str | os.PathLike[str] | None,
    *extra: str,
    timeout: float = 60,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    nofile: int | None = None,
    log: str | os.PathLike[str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Serve ``registry`` (None: the default one) until the block ends; ``(base URL, process)``.

    ``extra`` are more ``serve`` options (``--token-file F``, ...); ``env`` is
    added to this process's environment; ``nofile`` sets the child's descriptor
    limit (soft and hard); ``log`` is a file that receives the server's stderr
    (else a pipe, read only when it fails to start). Raises
    :class:`RuntimeError` with the server's stderr when it exits or does not
    answer within ``timeout`` seconds.
    """
    port = free_port()
    argv = [sys.executable, "-m", "patchctl", "serve", "--port", str(port), *map(str, extra)]
    if registry is not None:
        argv += ["--registry", str(registry)]
    limit = None if nofile is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
    err_file = open(log, "wb") if log is not None else None  # noqa: SIM115 - closed in finally
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err_file or subprocess.PIPE,
                         env={**os.environ, **env} if env else None, preexec_fn=limit)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(port):
            if p.poll() is not None or time.monotonic() > deadline:
                if p.poll() is None:
                    p.kill()
                raw = p.stderr.read() if p.stderr else Path(log).read_bytes() if log is not None else b""
                err = raw.decode(errors="replace")
                raise RuntimeError(f"patchctl serve did not start: {err.strip()[-2000:]}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", p
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stderr:
            p.stderr.close()
        if err_file is not None:
            err_file.close()
