"""`patchctl serve`: a real server process on 127.0.0.1, its OCI-style reads, headers and guards."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchctl import Registry
from patchctl.registry.store.manifest import Manifest, TensorEntry
from patchctl.server import process as server_process
from patchctl.server.process import free_port

ZERO = "sha256:" + "0" * 64
TOKEN = "s3cret-token-for-tests"


def make_patch(reg: Registry, ref: str, tensors: dict[str, bytes], metadata: dict | None = None) -> str:
    """Store a float32 diff patch whose tensors have exactly these bytes; its digest."""
    entries = {}
    for name, data in tensors.items():
        entries[name] = TensorEntry(reg.store.put_blob(data), "float32", (len(data) // 4,), "raw", len(data))
    m = Manifest("diff", {"fingerprint": ZERO, "name": "tiny-base", "revision": None}, entries,
                 metadata=metadata or {})
    return reg.commit(m, ref, move_latest=False)


@contextlib.contextmanager
def serving(registry: Path, *extra: str) -> Iterator[str]:
    """A real `python -m patchctl serve` on a free loopback port until the block ends; its base URL."""
    with server_process.serving(registry, *extra, timeout=30) as (url, _):
        yield url


def raw_request(url: str, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """Send ``path`` byte for byte (httpx would normalize dot segments)."""
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            c.putheader(k, v)
        c.endheaders()
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("served") / "reg"
    blobs = {"layer.0.weight": os.urandom(4096 * 4), "layer.1.weight": os.urandom(333 * 4), "empty": b""}
    with Registry(root) as reg:
        digest = make_patch(reg, "team/math:v1", blobs, {"task": "math"})
        reg.tag("team/math:v1", "team/math:latest")
        manifest = reg.store.read_manifest_bytes(digest)
    with serving(root) as url:
        yield {"url": url, "root": root, "digest": digest, "manifest": manifest, "blobs": blobs}


@pytest.fixture(scope="module")
def served_with_token(tmp_path_factory, served) -> Iterator[str]:
    tf = tmp_path_factory.mktemp("tok") / "token"
    tf.write_text(TOKEN + "\n")
    with serving(served["root"], "--token-file", str(tf)) as url:
        yield url


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_server_v2_root_catalog_and_tags(served):
    r = httpx.get(served["url"] + "/v2/")
    assert r.status_code == 200 and r.json() == {}
    assert r.headers["docker-distribution-api-version"] == "registry/2.0"
    assert httpx.get(served["url"] + "/v2/_catalog").json() == {"repositories": ["team/math"]}
    r = httpx.get(served["url"] + "/v2/team/math/tags/list")
    assert r.json() == {"name": "team/math", "tags": ["latest", "v1"]}
    r = httpx.get(served["url"] + "/v2/team/math/tags/list?n=1")
    assert r.json()["tags"] == ["latest"] and r.headers["link"] == '</v2/team/math/tags/list?n=1&last=latest>; rel="next"'
    assert httpx.get(served["url"] + "/v2/team/math/tags/list?n=1&last=latest").json()["tags"] == ["v1"]


def test_server_manifest_get_and_head_headers(served):
    url = served["url"] + "/v2/team/math/manifests/v1"
    r = httpx.get(url)
    assert r.status_code == 200
    assert r.content == served["manifest"]
    assert r.headers["content-type"] == "application/vnd.patchctl.manifest.v1+json"
    assert r.headers["docker-content-digest"] == served["digest"] == _digest(r.content)
    assert r.headers["etag"] == f'"{served["digest"]}"'
    assert r.headers["cache-control"] == "no-cache"  # a tag moves
    h = httpx.head(url)
    assert h.status_code == 200 and h.content == b""
    assert h.headers["content-length"] == str(len(served["manifest"]))
    assert h.headers["docker-content-digest"] == served["digest"]
    by_digest = httpx.get(served["url"] + "/v2/team/math/manifests/" + served["digest"])
    assert by_digest.content == served["manifest"]
    assert by_digest.headers["cache-control"] == "public, max-age=31536000, immutable"
    nm = httpx.get(url, headers={"If-None-Match": f'"{served["digest"]}"'})
    assert nm.status_code == 304 and nm.content == b""


def test_server_blob_headers_range_and_etag(served):
    data = served["blobs"]["layer.0.weight"]
    d = _digest(data)
    url = f"{served['url']}/v2/team/math/blobs/{d}"
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-length"] == str(len(data))
    assert r.headers["etag"] == f'"{d}"' and r.headers["docker-content-digest"] == d
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert r.headers["accept-ranges"] == "bytes" and r.headers["content-type"] == "application/octet-stream"
    h = httpx.head(url)
    assert h.status_code == 200 and h.content == b"" and h.headers["content-length"] == str(len(data))
    part = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(data)}"
    tail = httpx.get(url, headers={"Range": "bytes=100-"})
    assert tail.status_code == 206 and tail.content == data[100:]
    suffix = httpx.get(url, headers={"Range": "bytes=-7"})
    assert suffix.status_code == 206 and suffix.content == data[-7:]
    bad = httpx.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(data)}"
    assert bad.json()["errors"][0]["code"] == "RANGE_INVALID"
    assert httpx.get(url, headers={"Range": "pages=1-2"}).status_code == 400
    assert httpx.get(url, headers={"If-None-Match": f'"{d}"'}).status_code == 304
    stale = httpx.get(url, headers={"Range": "bytes=0-3", "If-Range": '"sha256:other"'})
    assert stale.status_code == 200 and stale.content == data  # If-Range mismatch: the whole blob
    empty = httpx.get(f"{served['url']}/v2/team/math/blobs/{_digest(b'')}")
    assert empty.status_code == 200 and empty.content == b""


def test_server_errors_are_oci_json(served):
    u = served["url"]
    cases = [
        ("/v2/team/math/manifests/v9", 404, "MANIFEST_UNKNOWN"),
        ("/v2/nobody/tags/list", 404, "NAME_UNKNOWN"),
        ("/v2/team/math/blobs/" + ZERO, 404, "BLOB_UNKNOWN"),
        ("/v2/team/math/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/Team/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/team/math/manifests/-bad", 400, "TAG_INVALID"),
        ("/api/patches/team/math/v9", 404, "NOT_FOUND"),
        ("/nowhere", 404, "NOT_FOUND"),
    ]
    for path, status, code in cases:
        r = httpx.get(u + path)
        assert (r.status_code, r.json()["errors"][0]["code"]) == (status, code), path
        assert r.headers["content-type"] == "application/json"


def test_server_json_api(served):
    u = served["url"]
    assert httpx.get(u + "/api/health").json()["status"] == "ok"
    rows = httpx.get(u + "/api/patches").json()["patches"]
    assert {(r["name"], r["tag"], r["digest"]) for r in rows} == {
        ("team/math", "v1", served["digest"]), ("team/math", "latest", served["digest"])}
    doc = httpx.get(u + "/api/patches/team/math/v1").json()
    assert doc["digest"] == served["digest"] and doc["metadata"] == {"task": "math"}
    assert doc["ref"] == "team/math:v1" and doc["lineage_tree"]["digest"] == served["digest"]
    assert [h["new"] for h in doc["history"]] == [served["digest"]]


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/v2/", "/v2/team/math/manifests/v1", "/v2/team/math/blobs/uploads/", "/api/patches", "/x"])
def test_server_write_methods_answer_405(served, method, path):
    status, headers, body = raw_request(served["url"], method, path)
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


@pytest.mark.parametrize("path", [
    "/v2/../config.json",
    "/v2/team/../../config.json/manifests/v1",
    "/v2/%2e%2e/%2e%2e/config.json/tags/list",
    "/v2/team%2fmath/manifests/v1",
    "/v2/team/math/blobs/..%2F..%2Fconfig.json",
    "/v2/team/math/blobs/%2E%2E%2fconfig.json",
    "/api/patches/..%2f..%2fconfig.json/x",
    "/v2/team/math/manifests/..",
    "/v2/team/math/blobs/sha256:..%5c..%5cconfig.json",
    "/v2/team/math/blobs/sha256%3a..%2f..%2fconfig.json",
    "/v2/team/./math/manifests/v1",
    "/v2/team/math/manifests/v1%00",
])
def test_server_traversal_is_rejected(served, path):
    status, _, body = raw_request(served["url"], "GET", path)
    assert status in (400, 404)
    assert b"patchctl-registry" not in body  # never the registry's config.json (or any file outside objects)
    assert json.loads(body)["errors"][0]["code"] in ("NAME_INVALID", "NOT_FOUND", "DIGEST_INVALID", "TAG_INVALID")


def test_server_token_required_and_compared(served_with_token, served):
    u = served_with_token
    path = "/v2/team/math/manifests/v1"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer"}):
        r = httpx.get(u + path, headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert httpx.head(u + path).status_code == 401
    ok = httpx.get(u + path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.content == served["manifest"]
    assert httpx.get(u + "/api/health").status_code == 200  # probes need no secret
    assert httpx.post(u + path).status_code == 405


def test_serve_refuses_a_missing_registry(tmp_path):
    from .conftest import run_cli_process

    r = run_cli_process("serve", "--registry", tmp_path / "nope", "--port", str(free_port()), timeout=60)
    assert r.returncode == 2 and "no registry at" in r.stderr


_SEGMENTS = st.one_of(
    st.sampled_from(["v2", "api", "patches", "team", "math", "manifests", "blobs", "tags", "list", "_catalog",
                     "health", "v1", "latest", "..", ".", "%2e%2e", "%2f", "%2F", "%00", "%5c", "%3a", "sha256:",
                     "sha256:" + "0" * 64, "", "%ff", "%", "~", "a" * 300, "@v1", ";", "%252e"]),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters="?#"), max_size=12),
)
_HEADER_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    method=st.sampled_from(["GET", "HEAD", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"]),
    segments=st.lists(_SEGMENTS, max_size=7),
    query=st.sampled_from(["", "?n=1", "?n=-1", "?n=abc", "?last=zzz", "?n=99999999999999999999", "?last=%00"]),
    headers=st.dictionaries(
        st.sampled_from(["Range", "If-None-Match", "If-Range", "Authorization", "Accept", "X-Junk"]),
        st.one_of(_HEADER_VALUES, st.sampled_from(["bytes=0-0", "bytes=5-1", "bytes=-0", "bytes=0-,1-", "bytes=" + "1," * 200,
                                                   "bytes=99999999999999999999-", "*", 'W/"x"'])),
        max_size=3),
)
def test_server_never_answers_5xx(served, method, segments, query, headers):
    path = "/" + "/".join(segments) + query
    try:
        status, _, _ = raw_request(served["url"], method, path, headers)
    except http.client.InvalidURL:
        return  # the client refused to send it
    assert status < 500, (method, path, headers)
