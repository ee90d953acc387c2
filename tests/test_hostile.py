"""Hostile peers and untrusted input (issue #23): each test is one finding, and must fail on the old code.

A hostile remote is played by a real HTTP server process written here (stdlib
``http.server``, :data:`SERVER`): the remote URL's first path component picks
its behaviour (``http://127.0.0.1:PORT/<mode>``). Every failing pull must end
in one line (a :class:`PatchctlError`), in bounded time, with the registry
unchanged, ``fsck`` clean and nothing left in ``tmp/``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchctl import Registry
from patchctl.errors import (
    DigestMismatch,
    InvalidCheckpoint,
    InvalidPatch,
    PatchctlError,
    RemoteError,
)
from patchctl.registry.remote import transfer
from patchctl.registry.remote.limits import LimitExceeded, PullLimits, StorageError, TransferTimeout

from .conftest import snapshot

BLOB = os.urandom(256 * 1024)
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()

SERVER = r'''
import hashlib, json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BLOB = open(sys.argv[1], "rb").read()
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
ZERO = "sha256:" + "0" * 64
stats = {"blob_requests": 0, "blob_bytes": 0}
lock = threading.Lock()

def manifest(tensors):
    return json.dumps({"schema": 1, "kind": "diff", "base": {"fingerprint": ZERO, "name": "tiny", "revision": None},
                       "tensors": tensors, "params": {}, "lineage": {"parents": [], "recipe": None},
                       "metadata": {}}, sort_keys=True, separators=(",", ":")).encode()

NORMAL = manifest({"w": {"digest": BLOB_DIGEST, "dtype": "float32", "shape": [len(BLOB) // 4],
                         "encoding": "raw", "size": len(BLOB)}})
HUGE_DIGEST = "sha256:" + "ab" * 32
# 8 TiB declared: over the default 64 GiB cap, and over any test machine's free space
HUGE = manifest({"w": {"digest": HUGE_DIGEST, "dtype": "float64", "shape": [2**40 - 1], "encoding": "raw",
                       "size": (2**40 - 1) * 8}})
_many = None

def many():  # ~63 MB, 420,000 distinct blobs of 4 bytes
    global _many
    if _many is None:
        parts = []
        for i in range(420_000):
            d = hashlib.sha256(i.to_bytes(4, "little")).hexdigest()
            parts.append('"t%06d":{"digest":"sha256:%s","dtype":"float32","encoding":"raw","shape":[1],"size":4}' % (i, d))
        head = manifest({})
        _many = head.replace(b'"tensors":{}', b'"tensors":{' + ",".join(parts).encode() + b"}")
    return _many

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        path = self.path
        if path == "/stats":
            return self.send(200, json.dumps(stats).encode())
        mode, _, rest = path[1:].partition("/")
        if "/manifests/" in rest:
            if mode == "slow-headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(1000):
                    self.wfile.write(b"X")
                    self.wfile.flush()
                    time.sleep(1)
                return
            body = HUGE if mode == "huge" else many() if mode.startswith("many") else NORMAL
            if mode == "many-noclen":  # no Content-Length: the body ends when the connection closes
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                for i in range(0, len(body), 1 << 20):
                    self.wfile.write(body[i:i + (1 << 20)])
                return
            return self.send(200, body)
        with lock:
            stats["blob_requests"] += 1
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
        body = BLOB[start:]
        if mode == "err500":
            return self.send(500, b'{"errors":[{"code":"BOOM","message":"internal error"}]}')
        if mode == "huge":  # it would send 800 MB of zeros, if asked
            body = b"\0" * (800 << 20)
        if mode == "wrong":
            body = bytes(len(body))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(BLOB) - 1, len(BLOB)))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "drip":  # one byte every two seconds
            for b in body:
                self.wfile.write(bytes([b]))
                self.wfile.flush()
                with lock:
                    stats["blob_bytes"] += 1
                time.sleep(2)
            return
        if mode == "drop":  # half the body, then hang up (every time)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)
        with lock:
            stats["blob_bytes"] += len(body)

    def send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
httpd.daemon_threads = True
print(httpd.server_address[1], flush=True)
httpd.serve_forever()
'''


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Iterator[str]:
    """The hostile server process; its base URL (append ``/<mode>``)."""
    d = tmp_path_factory.mktemp("hostile")
    (d / "server.py").write_text(SERVER)
    (d / "blob").write_bytes(BLOB)
    p = subprocess.Popen([sys.executable, str(d / "server.py"), str(d / "blob")], stdout=subprocess.PIPE, text=True)
    try:
        port = int(p.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def _stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/stats", timeout=10) as r:
        return json.loads(r.read())


def _refused(registry: Registry, url: str, exc: type[BaseException], match: str, bound: float,
             **limits: float) -> PatchctlError:
    """Pull ``x:v1`` from ``url``: it must raise ``exc`` (one line) within ``bound`` seconds and change nothing."""
    before = snapshot(registry.path)
    t0 = time.monotonic()
    with pytest.raises(exc, match=match) as ei:
        registry.pull("x:v1", url, limits=PullLimits(**limits) if limits else None)
    took = time.monotonic() - t0
    assert took < bound, f"took {took:.1f} s"
    assert "\n" not in str(ei.value)
    assert list((registry.path / "tmp").iterdir()) == []  # no .part or stray file
    assert snapshot(registry.path) == before
    assert registry.fsck()["ok"]
    return ei.value


# -- a hostile remote ------------------------------------------------------------------------------
def test_pull_refuses_a_blob_declared_over_the_cap_before_fetching_it(registry, hostile):
    before = _stats(hostile)["blob_requests"]
    _refused(registry, hostile + "/huge", LimitExceeded, "declared 8796093022200 bytes, over the cap", 30)
    assert _stats(hostile)["blob_requests"] == before  # not one byte of the 800 MB was asked for


def test_pull_refuses_a_blob_that_does_not_fit_in_free_space(registry, hostile):
    if shutil.disk_usage(registry.path / "tmp").free > 2**43:
        pytest.skip("more than 8 TiB free")
    before = _stats(hostile)["blob_requests"]
    _refused(registry, hostile + "/huge", StorageError, "are free", 30, max_blob_bytes=2**44)
    assert _stats(hostile)["blob_requests"] == before


@pytest.mark.parametrize("mode", ["many", "many-noclen"])
def test_pull_refuses_a_63_mb_manifest_before_any_blob(registry, hostile, mode):
    before = _stats(hostile)["blob_requests"]
    _refused(registry, f"{hostile}/{mode}", LimitExceeded, "larger than the cap of 4194304 bytes", 60)
    assert _stats(hostile)["blob_requests"] == before


def test_pull_refuses_420k_blobs_even_with_the_manifest_cap_raised(registry, hostile):
    before = _stats(hostile)["blob_requests"]
    _refused(registry, hostile + "/many", LimitExceeded, "more than 100000 blobs", 60,
             max_manifest_bytes=64 << 20)
    assert _stats(hostile)["blob_requests"] == before


def test_pull_of_a_drip_fails_at_the_minimum_rate(registry, hostile):
    err = _refused(registry, hostile + "/drip", TransferTimeout, "under the minimum of 1024 B/s", 30,
                   rate_window=3.0)
    assert "sent" in str(err)


def test_pull_of_a_drip_fails_at_the_deadline(registry, hostile):
    _refused(registry, hostile + "/drip", TransferTimeout, "within its 3 s deadline", 30, deadline=3.0,
             min_rate=0.0)


def test_pull_of_headers_sent_a_byte_a_second_fails_at_the_deadline(registry, hostile):
    _refused(registry, hostile + "/slow-headers", TransferTimeout, "deadline", 30, deadline=3.0, min_rate=0.0)


def test_pull_does_not_hold_the_registry_lock_while_downloading(registry, hostile):
    """`gc` (the exclusive lock) must not wait behind a slow download."""
    done = threading.Event()
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            with Registry(registry.path) as reg:
                reg.pull("x:v1", hostile + "/drip", limits=PullLimits(deadline=8.0, min_rate=0.0))
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)
        finally:
            done.set()

    before = _stats(hostile)["blob_bytes"]
    t = threading.Thread(target=pull)
    t.start()
    deadline = time.monotonic() + 20
    while _stats(hostile)["blob_bytes"] == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not done.is_set()  # the download is under way
    t0 = time.monotonic()
    with registry.store.exclusive():
        waited = time.monotonic() - t0
    t.join(30)
    assert waited < 2.0, f"gc's lock waited {waited:.1f} s behind the pull"
    assert len(errors) == 1 and isinstance(errors[0], TransferTimeout)
    assert list((registry.path / "tmp").iterdir()) == []


def test_pull_answered_500_is_one_line(registry, hostile):
    _refused(registry, hostile + "/err500", RemoteError, r"answered 500 .*BOOM", 30)


def test_pull_of_a_connection_dropped_every_time_gives_up_and_cleans(registry, hostile):
    _refused(registry, hostile + "/drop", RemoteError, "3 attempts", 30)


def test_pull_of_wrong_bytes_stores_nothing_and_leaves_no_part(registry, hostile):
    _refused(registry, hostile + "/wrong", DigestMismatch, "corrupt", 30)


def test_pull_from_a_good_remote_still_works(registry, hostile):
    res = registry.pull("x:v1", hostile + "/ok")
    assert res["bytes_transferred"] == len(BLOB)
    assert registry.store.read_blob(BLOB_DIGEST) == BLOB
    assert list((registry.path / "tmp").iterdir()) == [] and registry.fsck()["ok"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_pull_that_the_disk_refuses_is_one_line(registry, hostile, monkeypatch, code):
    real = os.fsync

    def refuse(fd: int) -> None:
        if "/tmp/pull-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", refuse)
    err = _refused(registry, hostile + "/ok", StorageError, errno.errorcode[code], 30)
    assert "nothing was stored" in str(err)


def test_pull_past_the_file_size_limit_is_one_line_not_a_traceback(reg_path, hostile):
    """EFBIG for real: the CLI in a process whose RLIMIT_FSIZE is smaller than the blob."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, 128 * 1024))\n"
        "from patchctl.cli.main import main\n"
        "sys.argv = ['patchctl', 'pull', 'x:v1', '--from', sys.argv[2], '--registry', sys.argv[1]]\n"
        "sys.exit(main())\n"
    )
    with Registry(reg_path):
        pass
    p = subprocess.run([sys.executable, "-c", code, str(reg_path), hostile + "/ok"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "EFBIG" in p.stderr, p.stderr
    assert len([ln for ln in p.stderr.splitlines() if ln.strip()]) == 1, p.stderr
    assert list((reg_path / "tmp").iterdir()) == []


def test_gc_helper_cleans_parts_of_killed_pulls_but_not_of_running_ones(registry):
    part = transfer.part_path(registry.store, BLOB_DIGEST)
    part.write_bytes(BLOB[:1000])  # what a killed pull left
    with transfer._pulling(registry.store):  # a pull is running
        assert transfer.clean_parts(registry.store) == 0 and part.exists()
    assert transfer.clean_parts(registry.store) == 1 and not part.exists()


def test_pull_limits_are_checked(registry):
    with pytest.raises(PatchctlError, match="deadline must be a positive"):
        registry.pull("x:v1", "http://127.0.0.1:1", limits=PullLimits(deadline=-1))


def test_pull_cli_has_the_cap_flags(cli, hostile):
    r = cli("pull", "x:v1", "--from", hostile + "/huge", "--max-blob-bytes", "1000")
    assert r.code != 0 and "over the cap of 1000" in r.err and "Traceback" not in r.err


# -- untrusted adapter configs ---------------------------------------------------------------------
def test_a_catastrophic_pattern_key_returns_promptly():
    """peft's `(.*\\.)?(KEY)$` with KEY `(a+)+$` on a 30-character name backtracks for minutes in `re`."""
    code = ("from patchctl.patches.lora import pattern_value\n"
            "print(pattern_value('model.' + 'a' * 30 + '!', {'(a+)+$': 8, 'model.*!': 2}, 4))\n")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "2" and time.monotonic() - t0 < 30


def test_a_catastrophic_key_re2_cannot_run_fails_in_bounded_time():
    from patchctl.errors import InvalidArgument
    from patchctl.patches.lora import MATCH_SECONDS, pattern_value

    t0 = time.monotonic()
    with pytest.raises(InvalidArgument, match="backtracks catastrophically"):
        pattern_value("a" * 30 + "!", {r"(a+)+(?=!)\1$": 8}, 4)
    assert time.monotonic() - t0 < MATCH_SECONDS + 10


@pytest.mark.parametrize("key", [
    "q_proj", "self_attn.q_proj", r"layers\.\d+\.self_attn\.(q|v)_proj", "layers.1.*", "(q|k)_proj",
    "^model.layers.0.self_attn.q_proj", "proj", r"\w+_proj", "layers.[0-9]+.mlp.down_proj", "Q_PROJ", "(?i:Q_PROJ)",
    r"(?<=attn\.)q_proj", r"(q)_proj(?!x)", r"(?P<m>q)_(?P=m)?proj", r"[[:alpha:]]_proj", "q_proj|v_proj",
    "(?x: q _ proj)", r"q_proj\Z", "layers.0", "", r"\d\.self_attn\.q_proj",
])
@pytest.mark.parametrize("name", [
    "model.layers.0.self_attn.q_proj", "model.layers.12.self_attn.v_proj", "model.layers.1.mlp.down_proj",
    "q_proj", "model.layers.0.self_attn.xq_proj", "模型.q_proj", "model.layers.٣.self_attn.q_proj",
])
def test_pattern_matching_keeps_peft_semantics(key, name):
    import warnings

    from patchctl.patches.lora import pattern_matches

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "[[:" is a FutureWarning in re
        expected = re.match(rf"(.*\.)?({key})$", name) is not None
        assert pattern_matches(key, name) is expected


def _peft_folder(path: Path, config: dict, tensors: dict[str, bytes] | None = None) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    tensors = tensors or {
        "base_model.model.layer.lora_A.weight": np.zeros((2, 4), np.float32).tobytes(),
        "base_model.model.layer.lora_B.weight": np.zeros((4, 2), np.float32).tobytes(),
    }
    save_file({k: np.frombuffer(v, np.float32).reshape((2, 4) if "lora_A" in k else (4, 2))
               for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    return path


@pytest.mark.parametrize(("field", "config"), [
    ("lora_alpha", {"lora_alpha": 1e300}),
    ("lora_alpha", {"lora_alpha": -1e300}),
    ("alpha_pattern", {"alpha_pattern": {"layer": 1e300}}),
])
def test_absurd_lora_alpha_is_refused_naming_the_field(registry, tmp_path, field, config):
    folder = _peft_folder(tmp_path / "adapter", {"peft_type": "LORA", "r": 2, **config})
    with pytest.raises(InvalidPatch, match=field) as ei:
        registry.push(folder, "x:v1")
    assert "\n" not in str(ei.value)


def test_invalid_pattern_key_is_refused_at_import(registry, tmp_path):
    folder = _peft_folder(tmp_path / "adapter", {"peft_type": "LORA", "r": 2, "rank_pattern": {"(": 4}})
    with pytest.raises(InvalidPatch, match="rank_pattern"):
        registry.push(folder, "x:v1")


def test_a_2000_character_tensor_name_is_refused_before_any_blob_is_written(registry, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    long = "w" * 2000
    (tmp_path / "base").mkdir()
    save_file({long: np.zeros(4, np.float32)}, str(tmp_path / "base" / "model.safetensors"))
    save_file({long: np.ones(4, np.float32)}, str(tmp_path / "diff.safetensors"))
    before = snapshot(registry.path)
    with pytest.raises(InvalidPatch, match="2000 characters") as ei:
        registry.push(tmp_path / "diff.safetensors", "x:v1", base=tmp_path / "base")
    assert "\n" not in str(ei.value)
    assert snapshot(registry.path) == before  # no blob written
    assert list((registry.path / "tmp").iterdir()) == []


def test_a_safetensors_header_of_1_2m_entries_is_refused_fast_and_small(tmp_path):
    entry = b'"t%07d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    body = b"{" + b",".join(entry % i for i in range(1_200_000)) + b"}"
    body += b" " * (-len(body) % 8)
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    assert len(body) > 60_000_000
    code = ("import re, sys\n"
            "from patchctl.errors import InvalidCheckpoint\n"
            "from patchctl.registry.formats.safetensors import SafetensorsFile\n"
            "try:\n    SafetensorsFile(sys.argv[1]); print('accepted')\n"
            "except InvalidCheckpoint as e:\n    print(e)\n"
            # VmHWM: this process's peak (ru_maxrss would carry the forking parent's peak over exec)
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    msg, rss_kib = p.stdout.strip().splitlines()
    assert "over the caps of 100000 tensors" in msg
    assert int(rss_kib) < 400 * 1024, f"peak RSS {int(rss_kib) // 1024} MiB"
    assert took < 20, f"took {took:.1f} s"
    with pytest.raises(InvalidCheckpoint, match="100000 tensors"):
        from patchctl.registry.formats.safetensors import SafetensorsFile

        SafetensorsFile(path)



def test_pull_refuses_a_lora_manifest_with_an_absurd_alpha(registry, tmp_path):
    """A peer's LoRA params are checked like an adapter config: lora_alpha 1e300 would export infinities."""
    from patchctl.registry.store.manifest import Manifest, TensorEntry

    with Registry(tmp_path / "origin") as origin:
        a = origin.store.put_blob(bytes(8 * 4))
        b = origin.store.put_blob(bytes(4 * 4 + 4 * 4))
        m = Manifest("lora", {"fingerprint": "sha256:" + "0" * 64, "name": "tiny", "revision": None},
                     {"base_model.model.layer.lora_A.weight": TensorEntry(a, "float32", (2, 4), "raw", 32),
                      "base_model.model.layer.lora_B.weight": TensorEntry(b, "float32", (4, 2), "raw", 32)},
                     {"peft_type": "LORA", "r": 2, "lora_alpha": 1e300})
        origin.commit(m, "x:v1", move_latest=False)
    _refused(registry, str(tmp_path / "origin"), InvalidPatch, "lora_alpha must be a finite number", 30)
