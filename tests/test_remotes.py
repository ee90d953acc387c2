"""Remotes: pull over HTTP from a real `patchctl serve` process, folder remotes, resume, corruption."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from patchctl import Registry
from patchctl.errors import (
    DigestMismatch,
    InvalidArgument,
    InvalidReference,
    NotFound,
    PatchctlError,
)
from patchctl.registry.remote import transfer as remotes
from patchctl.registry.store.names import Ref

from .conftest import snapshot
from .test_server import TOKEN, make_patch, serving


def _d(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> Iterator[dict]:
    """A registry with team/math:v1 (three tensors, one of 1 MiB) served by a real server process."""
    root = tmp_path_factory.mktemp("origin") / "reg"
    tensors = {"a.weight": os.urandom(1 << 20), "b.weight": os.urandom(64 * 1024), "c.bias": os.urandom(256)}
    with Registry(root) as reg:
        digest = make_patch(reg, "team/math:v1", tensors)
    tf = tmp_path_factory.mktemp("tok") / "token"
    tf.write_text(TOKEN)
    with serving(root) as url, serving(root, "--token-file", str(tf)) as token_url:
        yield {"root": root, "url": url, "token_url": token_url, "token_file": tf, "digest": digest, "tensors": tensors}


def _json(r) -> dict:
    assert r.code == 0, r.err
    return json.loads(r.out)


def test_pull_over_http_then_nothing_then_only_the_changed_tensor(cli, origin, reg_path):
    assert cli("remote", "add", "origin", origin["url"]).code == 0
    first = _json(cli("pull", "origin/team/math:v1", "--json"))
    total = sum(len(b) for b in origin["tensors"].values())
    assert first["digest"] == origin["digest"] and first["ref"] == "team/math:v1"
    assert (first["blobs"], first["blobs_fetched"], first["bytes_transferred"]) == (3, 3, total)
    with Registry(reg_path) as reg:
        assert reg.resolve("team/math:v1") == origin["digest"]
        data = reg.store.read_manifest_bytes(origin["digest"])  # verifies the hash on read
        assert _d(data) == origin["digest"]
        for name, blob in origin["tensors"].items():
            assert reg.store.read_blob(reg.manifest("team/math:v1").tensors[name].digest) == blob
        assert reg.fsck()["ok"]
    again = _json(cli("pull", "origin/team/math:v1", "--json"))
    assert (again["bytes_transferred"], again["blobs_fetched"], again["blobs_skipped"]) == (0, 0, 3)
    assert again["moved"] is False

    changed = dict(origin["tensors"], **{"b.weight": os.urandom(64 * 1024)})  # a new version, one tensor differs
    with Registry(origin["root"]) as reg:
        v2 = make_patch(reg, "team/math:v2", changed)
    second = _json(cli("pull", "team/math:v2", "--from", "origin", "--json"))
    assert second["digest"] == v2
    assert (second["blobs_fetched"], second["bytes_transferred"]) == (1, 64 * 1024)
    assert second["bytes_skipped"] == total - 64 * 1024
    with Registry(reg_path) as reg:
        assert reg.fsck()["ok"]
        assert {(r["name"], r["tag"]) for r in reg.ls()} == {("team/math", "v1"), ("team/math", "v2")}


def test_pull_resumes_a_partial_blob_with_range(origin, registry):
    blob = origin["tensors"]["a.weight"]
    part = remotes.part_path(registry.store, _d(blob))
    part.write_bytes(blob[:300_000])  # what an interrupted earlier pull left in tmp/
    res = registry.pull("team/math:v1", origin["url"])
    assert res["range_requests"] == 1 and res["bytes_resumed"] == 300_000
    assert res["bytes_transferred"] == sum(len(b) for b in origin["tensors"].values()) - 300_000
    assert registry.store.read_blob(_d(blob)) == blob and not part.exists()
    assert registry.fsck()["ok"]


def test_pull_restarts_a_partial_blob_that_is_not_a_prefix(origin, registry):
    blob = origin["tensors"]["a.weight"]
    remotes.part_path(registry.store, _d(blob)).write_bytes(b"\0" * 1000)  # junk: hashes wrong at the end
    with pytest.raises(DigestMismatch):
        registry.pull("team/math:v1", origin["url"])
    assert not (registry.path / "objects" / "sha256").exists() or not any((registry.path / "objects" / "sha256").iterdir())
    # a failed pull cleans every part file it used (issue: integrity): nothing waits in tmp/
    assert not list((registry.path / "tmp").glob("*.part"))
    res = registry.pull("team/math:v1", origin["url"])
    # so the bad part is fetched again whole, and the blobs that verified in the failed run too
    assert res["bytes_transferred"] == sum(len(b) for b in origin["tensors"].values())
    assert res["bytes_resumed"] == 0
    assert registry.fsck()["ok"]


def test_pull_with_a_token(origin, registry, tmp_path):
    with pytest.raises(PatchctlError, match="401"):
        registry.pull("team/math:v1", origin["token_url"])
    registry.add_remote("secure", origin["token_url"], token_file=origin["token_file"])
    assert registry.pull("secure/team/math:v1")["digest"] == origin["digest"]


@pytest.mark.parametrize(("content", "mode", "expected"), [
    (b"s3cret\n", 0o600, "s3cret"),
    (b" \t s3cret-token_+/=~!\r\n\n", 0o644, "s3cret-token_+/=~!"),  # surrounding whitespace stripped
    (b"s3cret", 0o664, "s3cret"),  # group-writable is fine (umask 002)
    (b"a" * 8192, 0o600, "a" * 8192),
    (b"", 0o600, InvalidArgument),
    (b" \n\n", 0o600, InvalidArgument),
    (b"two words", 0o600, InvalidArgument),  # the client used to send these; the server refused them
    (b"line1\nline2", 0o600, InvalidArgument),
    ("t\u00f6ken".encode(), 0o600, InvalidArgument),  # not ASCII: http.client sends Latin-1, the server compares UTF-8
    (b"\xef\xbb\xbftoken", 0o600, InvalidArgument),  # a UTF-8 byte-order mark
    (b"tok\x00en", 0o600, InvalidArgument),
    (b"a" * 8193, 0o600, InvalidArgument),
    (b"s3cret", 0o646, InvalidArgument),  # writable by anyone: refused
    (None, 0o600, NotFound),
])
def test_token_file_rule_is_shared_by_client_and_server(tmp_path, content, mode, expected):
    from patchctl.registry.remote import Remote, read_token
    from patchctl.server.app import read_token_file as server_reads

    tf = tmp_path / "token"
    if content is not None:
        tf.write_bytes(content)
        tf.chmod(mode)
    client = Remote("secure", "http://127.0.0.1:1", str(tf))
    if isinstance(expected, str):
        assert read_token(client) == server_reads(tf) == expected
    else:
        with pytest.raises(expected, match="token file"):
            read_token(client)
        with pytest.raises(expected, match="token file"):
            server_reads(tf)


def test_pull_errors_name_the_problem(origin, registry):
    with pytest.raises(InvalidReference, match="names no configured remote"):
        registry.pull("team/math:v1")
    with pytest.raises(NotFound, match="not on"):
        registry.pull("team/math:nope", origin["url"])
    with pytest.raises(NotFound, match="no remote named 'ghost'"):
        registry.pull("team/math:v1", "ghost")
    with pytest.raises(PatchctlError, match="cannot get"):
        registry.pull("team/math:v1", "http://127.0.0.1:9")  # nothing listens on the discard port


# -- a local stand-in server with faults ---------------------------------------------
class StandIn:
    """A tiny local stand-in for `patchctl serve` over a registry folder, with one injected fault:

    - ``corrupt``: every blob body has one byte flipped (same length);
    - ``drop``: the first blob response sends half its body and closes the connection;
    - ``bad-manifest-digest``: Docker-Content-Digest announces another digest.
    It records the Range header of every blob request.
    """

    def __init__(self, root: Path, fault: str):
        self.root, self.fault = root, fault
        self.ranges: list[str | None] = []
        self.dropped = 0  # bytes sent before the drop
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                outer.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        from patchctl.registry.store.folder import Store

        store = Store.open(self.root, create=False)
        m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", h.path)
        if m is None:
            h.send_error(404)
            return
        name, kind, ref = m.groups()
        if kind == "manifests":
            digest = store.ref_target(Ref(name, ref))
            body = store.read_manifest_bytes(digest)
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.send_header("Docker-Content-Digest", "sha256:" + "1" * 64 if self.fault == "bad-manifest-digest" else digest)
            h.end_headers()
            h.wfile.write(body)
            return
        data = store.blob_path(ref).read_bytes()
        rng = h.headers.get("Range")
        self.ranges.append(rng)
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        body = data[start:]
        if self.fault == "corrupt" and body:
            body = body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 0xFF]) + body[len(body) // 2 + 1:]
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if self.fault == "drop" and not self.dropped and len(body) > 1000:
            self.dropped = len(body) // 2
            h.wfile.write(body[:len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_pull_interrupted_mid_blob_resumes_with_range(origin, registry):
    with StandIn(origin["root"], "drop") as s:
        res = registry.pull("team/math:v1", s.url, workers=1)
    assert s.dropped and f"bytes={s.dropped}-" in s.ranges  # the retry asked for the rest only
    assert res["range_requests"] == 1 and res["digest"] == origin["digest"]
    assert res["bytes_transferred"] == sum(len(b) for b in origin["tensors"].values())  # nothing fetched twice
    assert registry.fsck()["ok"]


def test_pull_rejects_a_corrupt_blob_and_stores_nothing(origin, registry, reg_path):
    before = snapshot(reg_path)
    with StandIn(origin["root"], "corrupt") as s, pytest.raises(DigestMismatch, match="corrupt"):
        registry.pull("team/math:v1", s.url)
    after = snapshot(reg_path)
    assert {k: v for k, v in after.items() if not k.startswith("tmp/")} == before
    assert not [p for p in (reg_path / "tmp").iterdir() if p.stat().st_size]  # no verified-looking leftovers


def test_pull_rejects_a_manifest_whose_digest_does_not_match(origin, registry, reg_path):
    before = snapshot(reg_path)
    with StandIn(origin["root"], "bad-manifest-digest") as s, pytest.raises(DigestMismatch, match="announced"):
        registry.pull("team/math:v1", s.url)
    assert snapshot(reg_path) == before


# -- folder remotes ------------------------------------------------------------------
def test_publish_to_a_folder_and_pull_back(origin, tmp_path):
    with Registry(origin["root"]) as src:
        res = src.publish("team/math:v1", str(tmp_path / "mirror"))
    assert res["blobs_fetched"] == 3 and res["digest"] == origin["digest"]
    with Registry(tmp_path / "mirror") as mirror:
        assert mirror.resolve("team/math:v1") == origin["digest"] and mirror.fsck()["ok"]
    with Registry(tmp_path / "local") as local:
        local.add_remote("mirror", (tmp_path / "mirror").as_uri())
        got = local.pull("mirror/team/math:v1", progress=lambda done, total: None)
        assert got["bytes_transferred"] == sum(len(b) for b in origin["tensors"].values())
        assert local.fsck()["ok"]


def test_publish_to_http_is_refused(origin, registry):
    make_patch(registry, "x:v1", {"w": b"\0" * 8})
    with pytest.raises(InvalidArgument, match="read-only"):
        registry.publish("x:v1", origin["url"])
    with pytest.raises(NotFound):
        registry.publish("x:v9", "/tmp/never-created-by-patchctl-tests")


def test_push_cli_to_folder(cli, registry, tmp_path):
    make_patch(registry, "x:v1", {"w": b"\1" * 8})
    r = cli("push", "x:v1", "--to", tmp_path / "dest", "--json")
    if r.code == 2 and "--to" in r.err:
        pytest.skip("cli/patches.py push has no --to yet (owned elsewhere)")
    assert _json(r)["blobs_fetched"] == 1


# -- remote configuration ------------------------------------------------------------
def test_remote_add_ls_rm(cli, reg_path, tmp_path):
    assert cli("remote", "add", "web", "http://127.0.0.1:8080/").code == 0
    assert cli("remote", "add", "disk", tmp_path / "elsewhere").code == 0
    assert cli("remote", "add", "hub", "hf://acme/math-lora@main").code == 0
    rows = _json(cli("remote", "ls", "--json"))
    assert [(r["name"], r["kind"], r["url"]) for r in rows] == [
        ("disk", "folder", (tmp_path / "elsewhere").as_uri()),
        ("hub", "hf", "hf://acme/math-lora@main"),
        ("web", "http", "http://127.0.0.1:8080"),
    ]
    doc = json.loads((reg_path / "remotes.json").read_text())
    assert doc["version"] == 1 and set(doc["remotes"]) == {"disk", "hub", "web"}
    assert json.loads((reg_path / "config.json").read_text()) == {"format": "patchctl-registry", "version": 1}
    dup = cli("remote", "add", "web", "http://127.0.0.1:1")
    assert dup.code == 1 and "already exists" in dup.err
    assert cli("remote", "rm", "web").code == 0
    assert cli("remote", "rm", "web").code == 2
    assert [r["name"] for r in _json(cli("remote", "ls", "--json"))] == ["disk", "hub"]


@pytest.mark.parametrize("name,url,msg", [
    ("Bad", "http://x:1", "invalid remote name"),
    ("ok", "ftp://x", "unknown remote scheme"),
    ("ok", "http://user:pw@x:1", "no credentials"),
    ("ok", "http://x:99999", "invalid port"),
    ("ok", "hf://not-a-repo", "hf://ORG/REPO"),
    ("ok", "hf://a/../b", "hf://ORG/REPO"),
    ("ok", "file://host/x", "names a host"),
])
def test_remote_add_rejects_bad_input(registry, name, url, msg):
    with pytest.raises(InvalidArgument, match=re.escape(msg)):
        registry.add_remote(name, url)
    assert registry.remotes() == []


# -- hf:// ---------------------------------------------------------------------------
class HubStandIn:
    """A local stand-in for the Hub's HTTP side (no Hub server exists here).

    ``create_commit`` (patched onto ``HfApi``) writes the commit into a local Hugging Face
    cache laid out as huggingface_hub lays it out (``blobs/``, ``snapshots/<commit>/``,
    ``refs/<revision>``). Pulls then read it through the real ``snapshot_download`` with
    ``HF_HUB_OFFLINE=1`` (set by conftest), exactly as from a pre-populated cache.
    """

    def __init__(self, cache: Path):
        self.cache = cache
        self.operations: list[list[str]] = []

    def commit(self, repo_id: str, files: dict[str, bytes], revision: str = "main") -> str:
        storage = self.cache / ("models--" + repo_id.replace("/", "--"))
        ref = storage / "refs" / revision
        parent = ref.read_text() if ref.exists() else ""
        tree: dict[str, bytes] = {}
        if parent:
            snap = storage / "snapshots" / parent
            tree = {p.relative_to(snap).as_posix(): p.read_bytes() for p in snap.rglob("*") if p.is_file()}
        tree.update(files)
        commit = hashlib.sha1((parent + json.dumps(sorted((k, _d(v)) for k, v in tree.items()))).encode()).hexdigest()
        for path, data in tree.items():
            blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = storage / "snapshots" / commit / path
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
        return commit

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, **kw):
        from types import SimpleNamespace

        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
        self.operations.append(sorted(files))
        return SimpleNamespace(oid=self.commit(repo_id, files, revision or "main"))


@pytest.fixture
def hub(tmp_path, monkeypatch) -> HubStandIn:
    import huggingface_hub
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # the real offline code path, no network
    stand_in = HubStandIn(tmp_path / "hf-cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(stand_in.cache))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", stand_in.create_commit)
    return stand_in


def test_hub_push_then_pull_round_trips_the_digest(hub, registry, models, tmp_path):
    digest = registry.push(models.lora, "team/lora:v1")
    registry.add_remote("hub", "hf://acme/math-lora")
    res = registry.publish("team/lora:v1", "hub")
    blobs = registry.manifest(digest).blob_digests()
    assert res["digest"] == digest and res["peft"] is True
    assert hub.operations[-1] == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", f"patchctl/manifests/sha256/{digest[7:]}",
         "patchctl/refs/team/lora/@v1", *(f"patchctl/blobs/sha256/{d[7:]}" for d in blobs)])
    snap = hub.cache / "models--acme--math-lora" / "snapshots" / res["commit"]
    exported = registry.export(digest, tmp_path / "peft", "peft")
    assert (snap / "adapter_model.safetensors").read_bytes() == (exported / "adapter_model.safetensors").read_bytes()

    with Registry(tmp_path / "fresh") as fresh:
        fresh.add_remote("hub", "hf://acme/math-lora")
        got = fresh.pull("hub/team/lora:v1")
        assert (got["digest"], got["revision"], got["layout"]) == (digest, res["commit"], "patchctl")
        assert got["blobs_fetched"] == len(blobs) and fresh.fsck()["ok"]
        assert res["commit"] in fresh.log("team/lora:v1")["history"][-1]["message"]
        assert fresh.pull("hub/team/lora:v1")["bytes_transferred"] == 0
        # the PEFT files of the commit import to the same tensors
        peft_digest = fresh.push(snap, "from-peft:v1", base=models.base)  # the export names no local folder
        assert fresh.manifest(peft_digest).tensors == fresh.manifest(digest).tensors


def test_hub_pull_imports_a_peft_repo_and_pins_the_revision(hub, cli, models, registry):
    commit = hub.commit("acme/peft-only", {f: (models.lora / f).read_bytes() for f in
                                           ("adapter_config.json", "adapter_model.safetensors")})
    res = _json(cli("pull", "tiny:v1", "--from", "hf://acme/peft-only", "--json"))
    assert (res["layout"], res["revision"]) == ("peft", commit)
    info = registry.show("tiny:v1")
    assert info["metadata"] == {"source": "hf://acme/peft-only", "revision": commit}
    local = registry.push(models.lora, "local:v1")
    # the same tensors and kept files; the repo has no model card (README.md), the local folder has one
    local_entries = {k: e for k, e in registry.manifest(local).tensors.items() if k != "file:README.md"}
    assert local_entries == registry.manifest("tiny:v1").tensors


def test_hub_pull_of_an_uncached_repo_fails_offline(hub, registry):
    with pytest.raises(NotFound, match="not in the local Hugging Face cache"):
        registry.pull("x:v1", "hf://acme/absent")
    hub.commit("acme/empty", {"README.md": b"hello"})
    with pytest.raises(NotFound, match="neither"):
        registry.pull("x:v1", "hf://acme/empty")
    assert registry.ls() == []


def test_pull_needs_no_prefix_with_a_single_remote(origin, registry):
    registry.add_remote("only", origin["url"])
    assert registry.pull("team/math:v1")["digest"] == origin["digest"]
    registry.add_remote("other", origin["url"])
    with pytest.raises(InvalidReference, match="remotes: only, other"):
        registry.pull("team/math:v1")
    assert registry.pull("other/team/math:v1")["blobs_fetched"] == 0
