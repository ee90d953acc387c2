"""The C kernels' SHA-256 (two streams interleaved on SHA-NI) against hashlib, and the verifier that uses it."""

from __future__ import annotations

import ctypes
import hashlib
import os

import pytest

from patchctl.patches import native

lib = native.lib
needs_sha = pytest.mark.skipif(
    lib is None or lib.pc_sha256_pair(b"", 0, None, 0, ctypes.create_string_buffer(64)) != 0,
    reason="the C kernels are not built here, or this CPU has no SHA-NI")

EDGES = [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 191, 192, 1000, 4096, 65_599]


def _pair(a: bytes | bytearray, b: bytes | bytearray | None, off: int = 0) -> tuple[bytes, bytes]:
    out = ctypes.create_string_buffer(64)
    pa = ctypes.addressof((ctypes.c_char * len(a)).from_buffer(a)) + off if isinstance(a, bytearray) else a
    assert lib.pc_sha256_pair(pa, len(a) - off, b, len(b) if b is not None else 0, out) == 0
    return out.raw[:32], out.raw[32:]


@needs_sha
@pytest.mark.parametrize("n", EDGES)
def test_pair_equals_hashlib_on_every_length_around_the_block_edges(n):
    a = os.urandom(n)
    for m in EDGES:
        b = os.urandom(m)
        da, db = _pair(a, b)
        assert (da.hex(), db.hex()) == (hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()), (n, m)
    assert _pair(a, None)[0] == hashlib.sha256(a).digest()


@needs_sha
def test_pair_on_unaligned_buffers_and_a_long_common_run():
    a = bytearray(os.urandom(3 << 20))
    b = os.urandom((3 << 20) - 7)
    for off in (1, 3, 8, 13):
        da, db = _pair(a, b, off)
        assert da == hashlib.sha256(a[off:]).digest() and db == hashlib.sha256(b).digest()
    assert _pair(b"abc", None)[0].hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@needs_sha
def test_files_equal_hashlib_and_a_bad_descriptor_is_reported_not_crashed(tmp_path):
    sizes = [0, 1, 64, 100_003, 2_000_000]
    fds = []
    try:
        for i, n in enumerate(sizes):
            p = tmp_path / f"f{i}"
            p.write_bytes(os.urandom(n))
            fds.append((os.open(p, os.O_RDONLY), n, hashlib.sha256(p.read_bytes()).digest()))
        out = ctypes.create_string_buffer(64)
        for chunk in (0, 64, 4096, 100_000, 1 << 22):  # 0: the default; 100_000 is cut to a multiple of 64
            for fd, n, want in fds:
                for fd2, m, want2 in fds:
                    assert lib.pc_sha256_files(fd, n, fd2, m, out, chunk) == 0
                    assert (out.raw[:32], out.raw[32:]) == (want, want2), (n, m, chunk)
                assert lib.pc_sha256_files(fd, n, -1, 0, out, chunk) == 0 and out.raw[:32] == want
        r, w = os.pipe()  # a pipe has no positions to read at
        try:
            assert lib.pc_sha256_files(r, 10, fds[4][0], fds[4][1], out, 0) == -2
        finally:
            os.close(r), os.close(w)
        assert lib.pc_sha256_files(fds[3][0], fds[3][1] + 1, -1, 0, out, 0) == -2  # the file ends before n bytes
    finally:
        for fd, _, _ in fds:
            os.close(fd)


@pytest.mark.parametrize("kernels", [True, False], ids=["pairs", "hashlib"])
@pytest.mark.parametrize("threads", [1, 3])
def test_sha256_files_equals_hashlib_across_chunk_and_block_edges(tmp_path, monkeypatch, kernels, threads):
    from patchctl.registry.store import hashing

    if kernels and not hashing.pairs_available():
        pytest.skip("the C kernels are not built here, or this CPU has no SHA-NI")
    if not kernels:
        monkeypatch.setattr(native, "lib", None)
    monkeypatch.setattr(hashing, "CHUNK", 4096)  # many chunks per file, cheaply
    sizes = [0, 1, 55, 56, 63, 64, 65, 4095, 4096, 4097, 8192 + 56, 3 * 4096 + 63, 100_003, 100_003, 7]
    paths, want = [], []
    for i, n in enumerate(sizes):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(n))
        paths.append(p)
        want.append("sha256:" + hashlib.sha256(p.read_bytes()).hexdigest())
    assert hashing.sha256_files(paths, threads=threads) == want
    assert hashing.sha256_files([], threads=threads) == []
    with pytest.raises(FileNotFoundError):
        hashing.sha256_files([*paths[:3], tmp_path / "gone"], threads=threads)
