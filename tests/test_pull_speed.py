"""How a pull writes and how the server sends (issue #21): the fast paths keep every byte exact and durable.

- blobs of 1 MiB or more are written around the page cache (``O_DIRECT``) in whole blocks, the last one
  padded and cut back; a resumed part or a dropped connection that ends off a block boundary, a file
  system that refuses ``O_DIRECT`` and a write cut short all still give the exact bytes;
- parts are fsynced together once every download finished, each before its rename into ``objects/``;
- a blob body is received straight into the transfer's buffer (Content-Length or chunked);
- the server sends a small blob asked without ``Range`` whole, with the headers of a streamed one and
  without the two worker-thread trips that streaming it costs.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio.to_thread
import pytest
from starlette.testclient import TestClient

from patchctl import Registry
from patchctl.registry.remote import transfer
from patchctl.registry.remote.sources import HttpSource
from patchctl.server.app import create_app

from .test_remotes import StandIn
from .test_server import make_patch, serving

LARGE = (1 << 20) + 3 * 4096 + 1236  # over DIRECT_MIN, not a multiple of the block size (float32: of 4)


def _d(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("origin") / "reg"
    tensors = {"big.weight": os.urandom(LARGE), "small.weight": os.urandom(3000), "tiny.bias": os.urandom(64)}
    with Registry(root) as reg:
        digest = make_patch(reg, "m:v1", tensors)
    with serving(root) as url:
        yield {"root": root, "url": url, "digest": digest, "tensors": tensors}


def _direct_supported(folder: Path) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    os.unlink(folder / "probe")
    return True


def _writes(monkeypatch) -> list[tuple[int, int, bool]]:
    """Spy on every ``os.pwrite``: (offset, length, O_DIRECT on)."""
    seen: list[tuple[int, int, bool]] = []
    real = os.pwrite

    def spy(fd: int, data, offset: int) -> int:
        seen.append((offset, len(data), bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    return seen


def _check(reg: Registry, origin: dict, res: dict) -> None:
    assert res["digest"] == origin["digest"]
    for data in origin["tensors"].values():
        assert reg.store.read_blob(_d(data)) == data
    assert reg.fsck()["ok"]
    assert not list((reg.path / "tmp").glob("*.part"))


def test_a_large_blob_goes_out_in_whole_blocks_around_the_page_cache(origin, registry, monkeypatch):
    if not _direct_supported(registry.path / "tmp"):
        pytest.skip("this file system refuses O_DIRECT")
    writes = _writes(monkeypatch)
    res = registry.pull("m:v1", origin["url"])
    _check(registry, origin, res)
    direct = [w for w in writes if w[2]]
    assert sum(n for _, n, _ in direct) == LARGE + (-LARGE % 4096)  # the last block zero-padded, then cut
    assert all(off % 4096 == 0 and n % 4096 == 0 for off, n, _ in direct)
    assert len(direct) == len([w for w in writes if w[1] > 4096])  # the small blobs are plain writes


def test_an_unaligned_resume_and_a_dropped_connection_still_give_the_exact_bytes(origin, registry):
    big = origin["tensors"]["big.weight"]
    part = transfer.part_path(registry.store, _d(big))
    part.write_bytes(big[:300_003])  # what an interrupted pull left: ends inside a block
    with StandIn(origin["root"], "drop") as s:  # the first body is cut at half: inside a block too
        res = registry.pull("m:v1", s.url, workers=1)
    assert s.dropped and res["bytes_resumed"] == 300_003 and res["range_requests"] >= 2
    assert res["bytes_transferred"] == sum(len(b) for b in origin["tensors"].values()) - 300_003
    _check(registry, origin, res)


def test_a_file_system_that_refuses_o_direct_gets_plain_writes(origin, registry, monkeypatch):
    writes = _writes(monkeypatch)
    spy = os.pwrite

    def refuse(fd: int, data, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return spy(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse)
    res = registry.pull("m:v1", origin["url"])
    _check(registry, origin, res)
    assert writes and not any(d for _, _, d in writes)


def test_a_direct_write_cut_short_off_a_block_boundary_goes_on_with_plain_writes(origin, registry, monkeypatch):
    if not _direct_supported(registry.path / "tmp"):
        pytest.skip("this file system refuses O_DIRECT")
    real = os.pwrite
    cut = []

    def short(fd: int, data, offset: int) -> int:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if flags & os.O_DIRECT and not cut and len(data) > 8192:  # as RLIMIT_FSIZE can: 5000 bytes of it
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            try:
                cut.append(real(fd, data[:5000], offset))
            finally:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            return cut[0]
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", short)
    res = registry.pull("m:v1", origin["url"])
    assert cut == [5000]
    _check(registry, origin, res)


def test_every_part_is_fsynced_before_it_is_renamed_into_objects(origin, registry, monkeypatch):
    synced: set[tuple[int, int]] = set()
    renamed: list[tuple[str, bool]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        real_fsync(fd)
        synced.add((st.st_dev, st.st_ino))

    def replace(src, dst, **kw) -> None:
        if Path(src).name.startswith("pull-"):
            st = os.stat(src)
            renamed.append((Path(src).name, (st.st_dev, st.st_ino) in synced))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    res = registry.pull("m:v1", origin["url"])
    _check(registry, origin, res)
    assert len(renamed) == len(origin["tensors"]) and all(ok for _, ok in renamed), renamed


class _Chunked:
    """A stand-in that sends every blob body with ``Transfer-Encoding: chunked`` in pieces of 777 bytes."""

    def __init__(self, root: Path):
        from patchctl.registry.store.folder import Store

        store = Store.open(root, create=False)

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                body = store.blob_path(self.path.rsplit("/", 1)[1]).read_bytes()
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(body), 777):
                    piece = body[i:i + 777]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _read_all(src: HttpSource, digest: str, size: int, offset: int = 0) -> bytes:
    buf = memoryview(bytearray(size + 100))  # room for more than the blob: the source must stop at its end
    got = 0
    with src.blob("m", digest, offset) as (start, readinto):
        assert start == offset
        while n := readinto(buf[got:]):
            got += n
    return bytes(buf[:got])


@pytest.mark.parametrize("server", ["serve", "chunked"])
def test_a_blob_body_is_received_into_the_buffer_and_the_connection_kept(origin, server):
    chunked = _Chunked(origin["root"]) if server == "chunked" else None
    src = HttpSource(chunked.url if chunked else origin["url"], None, "test")
    try:
        for data in origin["tensors"].values():
            assert _read_all(src, _d(data), len(data)) == data
        big = origin["tensors"]["big.weight"]
        if chunked is None:
            assert _read_all(src, _d(big), len(big) - 5000, 5000) == big[5000:]  # Range
        assert len(src._conns) == 1  # one keep-alive connection for every request
    finally:
        src.close()
        if chunked is not None:
            chunked.close()


def test_a_small_blob_is_sent_whole_without_worker_thread_trips(origin, monkeypatch):
    trips = []
    real = anyio.to_thread.run_sync

    async def counted(func, *args, **kw):
        trips.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kw)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    client = TestClient(create_app(origin["root"]))
    small = origin["tensors"]["small.weight"]
    url = f"/v2/m/blobs/{_d(small)}"

    def get(path: str, **headers: str):
        trips.clear()
        r = client.get(path, headers=headers)
        return r, len(trips)

    whole, whole_trips = get(url)
    trips.clear()
    assert client.head(url).status_code == 200
    head_trips = len(trips)
    ranged, ranged_trips = get(url, Range="bytes=0-")  # streamed from the file
    assert whole.status_code == 200 and whole.content == small
    assert ranged.status_code == 206 and ranged.content == small
    assert whole_trips == head_trips < ranged_trips  # as many trips as a HEAD: no read, no close of the file
    big = origin["tensors"]["big.weight"]
    streamed, _ = get(f"/v2/m/blobs/{_d(big)}")  # over 1 MiB: streamed
    assert streamed.status_code == 200 and streamed.content == big
    keys = {"content-length", "content-type", "etag", "docker-content-digest", "cache-control",
            "accept-ranges", "last-modified"}
    assert keys <= set(whole.headers) and set(whole.headers) == set(streamed.headers)
    assert whole.headers["content-length"] == str(len(small))
    assert whole.headers["etag"] == f'"{_d(small)}"' == whole.headers["docker-content-digest"].join('""')
    head = client.head(url)
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(small))
