"""Patches as OCI artifacts, against the real CNCF registry (Debian's ``docker-registry``, distribution 2.8).

The registry runs as ``docker-registry serve CONFIG`` on a free loopback port with
a temporary storage folder; a second one with htpasswd (bcrypt) auth covers Basic.
distribution 2.8's ``token`` auth needs an RSA-signed JWT issuer, so the Bearer
flow is tested against a small token server of the tests' own in front of a
reverse proxy to the real registry (:class:`BearerProxy`).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from patchctl.errors import InvalidArgument, InvalidPatch, InvalidReference, RemoteError
from patchctl.registry.remote import oci
from patchctl.registry.remote.auth import parse_challenge

BINARY = shutil.which("docker-registry")
needs_registry = pytest.mark.skipif(
    BINARY is None, reason="the CNCF registry is not installed: apt-get install docker-registry (scripts/setup.sh)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RegistryServer:
    host: str  # 127.0.0.1:PORT
    storage: Path
    proc: subprocess.Popen

    def url(self, path: str = "") -> str:
        return f"oci://{self.host}" + (f"/{path}" if path else "")

    def blob_files(self) -> set[str]:
        root = self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
        return {p.parent.name for p in root.glob("*/*/data")} if root.exists() else set()

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        h, p = self.host.split(":")
        conn = http.client.HTTPConnection(h, int(p), timeout=10)
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        conn.close()
        return out


def _start(tmp: Path, htpasswd: Path | None = None, addr: str = "127.0.0.1") -> RegistryServer:
    port = _free_port()
    storage = tmp / "storage"
    auth = ""
    if htpasswd is not None:
        auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {htpasswd}\n"
    cfg = tmp / "config.yml"
    cfg.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {addr}:{port}\n{auth}")
    with open(tmp / "registry.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([BINARY or "docker-registry", "serve", str(cfg)], stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(addr, port, timeout=1)
            conn.request("GET", "/v2/")
            if conn.getresponse().status in (200, 401):
                conn.close()
                return RegistryServer(f"{addr}:{port}", storage, proc)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"docker-registry did not start: {(tmp / 'registry.log').read_text()[-2000:]}")


def _stop(server: RegistryServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="module")
def oci_registry(tmp_path_factory):
    """A fresh anonymous ``docker-registry`` on a free loopback port, for this module."""
    if BINARY is None:
        pytest.skip("the CNCF registry is not installed: apt-get install docker-registry (scripts/setup.sh)")
    server = _start(tmp_path_factory.mktemp("oci-registry"))
    yield server
    _stop(server)


USER, PASSWORD = "alice", "s3cret-Pa55"


@pytest.fixture(scope="module")
def oci_basic(tmp_path_factory):
    """A ``docker-registry`` with htpasswd auth: ``alice`` / ``s3cret-Pa55`` (bcrypt, written here)."""
    if BINARY is None:
        pytest.skip("the CNCF registry is not installed: apt-get install docker-registry (scripts/setup.sh)")
    bcrypt = pytest.importorskip("bcrypt", reason="bcrypt (the test extra) writes the htpasswd file")
    tmp = tmp_path_factory.mktemp("oci-basic")
    (tmp / "htpasswd").write_bytes(USER.encode() + b":" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(5)) + b"\n")
    server = _start(tmp, tmp / "htpasswd")
    yield server
    _stop(server)


@pytest.fixture
def no_creds(monkeypatch, tmp_path):
    """No docker config nor env credentials leak in from the machine."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    monkeypatch.delenv("PATCHCTL_REGISTRY_USER", raising=False)
    monkeypatch.delenv("PATCHCTL_REGISTRY_PASSWORD", raising=False)


def _objects(reg_root: Path, digest: str) -> dict[str, bytes]:
    """The manifest and every blob of a patch, by digest."""
    from patchctl.registry.store import manifest as manifest_mod
    from patchctl.registry.store.folder import Store

    store = Store.open(reg_root, create=False)
    data = store.read_manifest_bytes(digest)
    out = {digest: data}
    for d in manifest_mod.parse(data).blob_digests():
        out[d] = store.blob_path(d).read_bytes()
    return out


# -- references and the mapping (no registry needed) ---------------------------------------------


def test_oci_url_parses_host_port_namespace_and_reference():
    r = oci.parse_oci("oci://Registry.example.com:5000/team/ml/lora:v1", reference=True)
    assert (r.scheme, r.host, r.path, r.tag, r.digest) == ("https", "registry.example.com:5000", "team/ml/lora", "v1", None)
    d = "sha256:" + "a" * 64
    r = oci.parse_oci(f"oci://localhost:5000/team/lora@{d}", reference=True)
    assert (r.scheme, r.path, r.digest) == ("http", "team/lora", d)  # loopback speaks plain HTTP
    assert oci.parse_oci("oci+http://build-box:5000/ns").scheme == "http"
    assert oci.parse_oci("oci://ghcr.io/acme").child("team/lora", tag="v2").path == "acme/team/lora"


@pytest.mark.parametrize("url", ["oci://", "oci://host/UPPER", "oci://user:pw@host/ns", "oci://host:99999/ns",
                                 "oci://host/ns/lora:bad tag", "oci://host/ns?x=1", "oci://host/a//b"])
def test_oci_url_bad_reference_is_one_line(url):
    with pytest.raises((InvalidArgument, InvalidReference)) as e:
        oci.parse_oci(url, reference=True)
    assert "\n" not in str(e.value) and "pw" not in str(e.value).replace("oci://user:pw@", "")


def test_oci_manifest_is_deterministic_and_carries_the_patch(registry, models):
    from patchctl.registry.store import manifest as manifest_mod

    digest = registry.push(models.lora, "team/lora:v1")
    data = registry.store.read_manifest_bytes(digest)
    m = manifest_mod.parse(data)
    a = oci.to_oci("lora", m, data, digest)
    assert a == oci.to_oci("lora", manifest_mod.parse(bytes(data)), data, digest)  # same patch, same bytes
    doc = json.loads(a)
    assert doc["mediaType"] == oci.OCI_MANIFEST and doc["artifactType"] == oci.ARTIFACT_TYPE
    assert doc["config"] == {"mediaType": oci.CONFIG_MEDIA_TYPE, "digest": digest, "size": len(data)}
    assert [layer["annotations"][oci.A_TENSOR] for layer in doc["layers"]] == sorted(m.tensors)
    first = doc["layers"][0]
    t = m.tensors[first["annotations"][oci.A_TENSOR]]
    assert first["annotations"][oci.A_SHAPE] == json.dumps(list(t.shape), separators=(",", ":"))
    assert first["annotations"][oci.A_DTYPE] == t.dtype and first["digest"] == t.digest
    assert doc["annotations"][oci.A_KIND] == "lora" and doc["annotations"][oci.A_FINGERPRINT] == m.fingerprint
    assert "org.opencontainers.image.created" not in doc["annotations"]  # time lives in the ref history


def test_oci_manifest_over_the_caps_is_refused(monkeypatch):
    big = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": {}, "layers": [],
                      "x": "y" * oci.MAX_OCI_MANIFEST_BYTES}).encode()
    with pytest.raises(InvalidPatch, match="larger than the 4 MiB cap; refused before fetching any blob"):
        oci.parse_oci_manifest(big, None, "r")
    layer = {"mediaType": "x", "digest": "sha256:" + "0" * 64, "size": 1}
    many = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": layer,
                       "layers": [layer] * (oci.MAX_LAYERS + 1)}, separators=(",", ":")).encode()
    monkeypatch.setattr(oci, "MAX_OCI_MANIFEST_BYTES", 64 << 20)  # 100k layers do not fit in 4 MiB anyway
    with pytest.raises(InvalidPatch, match="100001 layers, over the 100000 cap"):
        oci.parse_oci_manifest(many, None, "r")


def test_www_authenticate_challenge_parses():
    assert parse_challenge('Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"') == (
        "bearer", {"realm": "https://auth.example/token", "service": "reg", "scope": "repository:a/b:pull,push"})
    assert parse_challenge('Basic realm="test"') == ("basic", {"realm": "test"})


# -- the real registry --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patches(tmp_path_factory, models):
    """One registry folder with a LoRA, a diff, a sparse (compressed) and a merged patch."""
    from patchctl import Registry

    work = tmp_path_factory.mktemp("oci-src")
    root = work / "reg"
    with Registry(root) as reg:
        reg.push(models.lora, "team/lora:v1")
        (work / "lm.jsonl").write_text('{"text": "hello world"}\n{"text": "a second row"}\n')
        reg.eval_push(work / "lm.jsonl", "evals/tiny:v1", task="lm-loss", base=models.base)
        reg.eval_attach("team/lora:v1", "evals/tiny:v1")
        reg.push(models.finetune, "team/diff:v1", base=models.base)
        reg.push(models.finetune2, "team/diff2:v1", base=models.base)
        reg.compress("team/diff:v1", "team/sparse:v1", density=0.1)
        reg.merge(["team/diff:v1", "team/diff2:v1"], "team/merged:v1", method="ties", params={"density": 0.5},
                  validate=False)
    return root


@needs_registry
@pytest.mark.parametrize("name", ["lora", "diff", "sparse", "merged"])
def test_oci_push_then_pull_is_byte_identical(oci_registry, patches, tmp_path, name, no_creds):
    from patchctl import Registry

    ns = f"rt-{name}"
    with Registry(patches) as src:
        pushed = src.publish(f"team/{name}:v1", oci_registry.url(ns))
        digest = src.resolve(f"team/{name}:v1")
        want = _objects(patches, digest)
        shown = src.show(f"team/{name}:v1")
    assert pushed["validations"] == len(shown["validations"]) and pushed["suites"] == len(shown["suites"])
    if name == "merged":
        assert pushed["validations"] >= 1  # the merge's (unvalidated) record travels as a referrer
    assert pushed["digest"] == digest and pushed["repository"] == f"{ns}/team/{name}"
    assert pushed["blobs_uploaded"] == len(want) and pushed["bytes_skipped"] == 0
    status, headers, body = oci_registry.get(f"/v2/{ns}/team/{name}/manifests/v1",
                                             {"Accept": oci.OCI_MANIFEST})
    assert status == 200 and headers["docker-content-digest"] == pushed["oci_digest"]
    assert json.loads(body)["config"]["digest"] == digest
    with Registry(tmp_path / "fresh") as fresh:
        fresh.add_remote("team", oci_registry.url(ns))
        got = fresh.pull(f"team/team/{name}:v1")
        assert got["digest"] == digest and got["layout"] == "patchctl"
        assert _objects(tmp_path / "fresh", digest) == want
        assert fresh.fsck()["problems"] == []
        got_shown = fresh.show(f"team/{name}:v1")
        assert got_shown["validations"] == shown["validations"] and got["validations"] == len(shown["validations"])
        assert got_shown["lineage"] == shown["lineage"]
        assert got_shown["suites"] == shown["suites"] and got["suites"] == len(shown["suites"])
        if name == "lora":  # the suite came along as a referrer, under its own ref, byte-identical
            assert shown["suites"] and fresh.resolve("evals/tiny:v1") == shown["suites"][0]
            assert _objects(tmp_path / "fresh", shown["suites"][0]) == _objects(patches, shown["suites"][0])
        again = fresh.pull(f"team/team/{name}:v1")
        assert again["blobs_fetched"] == 0 and again["validations"] == 0 and again["suites"] == 0  # all here


@needs_registry
def test_oci_push_is_deterministic_and_dedups_an_unchanged_patch(oci_registry, patches, no_creds):
    from patchctl import Registry

    with Registry(patches) as src:
        one = src.publish("team/lora:v1", oci_registry.url("det/lora:a"))
        before = oci_registry.blob_files()
        two = src.publish("team/lora:v1", oci_registry.url("det/lora:b"))
    assert one["oci_digest"] == two["oci_digest"]
    assert two["blobs_uploaded"] == 0 and two["bytes_sent"] == 0 and two["blobs_skipped"] == two["blobs"]
    assert oci_registry.blob_files() == before


@needs_registry
def test_oci_push_of_v2_uploads_only_the_changed_blob(oci_registry, patches, models, tmp_path, no_creds):
    from safetensors.torch import load_file, save_file

    from patchctl import Registry

    ft = tmp_path / "ft-v2"
    shutil.copytree(models.finetune, ft)
    sd = load_file(ft / "model.safetensors")
    key = next(k for k in sorted(sd) if k.endswith("attention.self.query.weight"))
    sd[key] = sd[key] + 0.01
    save_file(sd, ft / "model.safetensors", metadata={"format": "pt"})
    with Registry(patches) as src:
        src.publish("team/diff:v1", oci_registry.url("dedup"))
        src.push(ft, "team/diff:v2", base=models.base)
        before = oci_registry.blob_files()
        res = src.publish("team/diff:v2", oci_registry.url("dedup"))
        m1, m2 = src.manifest("team/diff:v1"), src.manifest("team/diff:v2")
    changed_tensors = [n for n, t in m2.tensors.items() if m1.tensors[n] != t]
    assert changed_tensors == [key]
    changed = {d for d, _ in m2.tensors[key].blobs()} - {d for d, _ in m1.tensors[key].blobs()}
    new = oci_registry.blob_files() - before
    assert new == {d[7:] for d in changed} | {res["digest"][7:], res["oci_digest"][7:]}, (new, changed, res)
    # the changed tensor (its blob and exact-value pins) and the new patchctl manifest (the config)
    assert res["blobs_uploaded"] == len(changed) + 1
    config_size = res["bytes_uploaded"] - sum(s for d, s in m2.tensors[key].blobs() if d in changed)
    assert res["bytes_sent"] == res["bytes_uploaded"] and config_size == len(m2.to_bytes())


@needs_registry
def test_oci_push_to_a_second_repository_mounts_instead_of_uploading(oci_registry, patches, no_creds):
    from patchctl import Registry

    with Registry(patches) as src:
        src.publish("team/sparse:v1", oci_registry.url("mount-a"))
        res = src.publish("team/sparse:v1", oci_registry.url("mount-b"))
    assert res["blobs_mounted"] == res["blobs"] and res["bytes_sent"] == 0 and res["blobs_uploaded"] == 0
    status, _, _ = oci_registry.get("/v2/mount-b/team/sparse/manifests/v1", {"Accept": oci.OCI_MANIFEST})
    assert status == 200


@needs_registry
def test_oci_large_blob_goes_in_resumable_chunks(oci_registry, patches, tmp_path, monkeypatch, no_creds):
    from patchctl import Registry
    from patchctl.errors import PatchctlError
    from patchctl.registry.remote import oci_http, oci_push

    monkeypatch.setattr(oci_push, "CHUNKED_FROM", 1024)
    monkeypatch.setattr(oci_push, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(oci_http, "BACKOFF", 0.0)
    monkeypatch.setattr(oci_push, "known_repos", lambda root: {})  # no mount: every blob is sent
    real = oci_http.OciClient.patch_chunk
    calls = {"n": 0}

    def flaky(self, location, f, offset, length, counter):
        calls["n"] += 1
        if calls["n"] > 6:  # the connection "drops" for good after six chunks
            raise RemoteError("connection reset")
        return real(self, location, f, offset, length, counter)

    monkeypatch.setattr(oci_http.OciClient, "patch_chunk", flaky)
    with Registry(patches) as src, pytest.raises(PatchctlError, match="run the push again to resume"):
        src.publish("team/diff:v1", oci_registry.url("chunked"))
    assert oci_registry.get("/v2/chunked/team/diff/manifests/v1", {"Accept": oci.OCI_MANIFEST})[0] == 404
    monkeypatch.setattr(oci_http.OciClient, "patch_chunk", real)
    with Registry(patches) as src:
        res = src.publish("team/diff:v1", oci_registry.url("chunked"))
        digest = res["digest"]
    assert res["requests"]["PATCH"] > res["blobs"] // 2
    assert res["bytes_sent"] < res["bytes_uploaded"]  # resumed: the six chunks were not sent again
    assert not list((patches / "tmp").glob("oci-upload-*"))
    with Registry(tmp_path / "fresh") as fresh:
        fresh.pull(oci_registry.url("chunked/team/diff:v1"))
        assert fresh.resolve("diff:v1") == digest
        assert _objects(tmp_path / "fresh", digest) == _objects(patches, digest)


@needs_registry
def test_oci_pull_by_url_and_cli(oci_registry, patches, cli, reg_path, no_creds):
    with __import__("patchctl").Registry(patches) as src:
        digest = src.resolve("team/merged:v1")
    r = cli("push", "team/merged:v1", "--to", oci_registry.url("cli/merged:v7"), "--json", "--registry", str(patches),
            registry=False)
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["repository"] == "cli/merged" and out["tag"] == "v7" and out["digest"] == digest
    r = cli("pull", oci_registry.url("cli/merged:v7"), "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["digest"] == digest
    r = cli("show", "merged:v7", "--json")
    assert r.code == 0 and json.loads(r.out)["digest"] == digest


@needs_registry
def test_oci_unknown_tag_and_non_patch_artifact_are_one_line(oci_registry, patches, cli, tmp_path, no_creds):
    r = cli("pull", oci_registry.url("nothing/here:v1"))
    assert r.code != 0 and len(r.err.strip().splitlines()) == 1 and "not on" in r.err
    import oras.client

    client = oras.client.OrasClient(hostname=oci_registry.host, insecure=True)
    work = tmp_path / "oras-notes"
    work.mkdir()
    (work / "notes.txt").write_text("hello")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        client.push(target=f"{oci_registry.host}/misc/notes:v1", files=["notes.txt"], disable_path_validation=True)
    finally:
        os.chdir(cwd)
    r = cli("pull", oci_registry.url("misc/notes:v1"))
    assert r.code != 0 and len(r.err.strip().splitlines()) == 1
    assert "neither a patchctl patch nor a PEFT adapter" in r.err and "notes.txt" in r.err


@needs_registry
def test_oras_pulls_what_patchctl_pushed(oci_registry, patches, tmp_path, no_creds):
    import oras.client

    from patchctl import Registry

    with Registry(patches) as src:
        src.publish("team/lora:v1", oci_registry.url("oras/lora:v1"))
        m = src.manifest("team/lora:v1")
    client = oras.client.OrasClient(hostname=oci_registry.host, insecure=True)
    files = client.pull(target=f"{oci_registry.host}/oras/lora:v1", outdir=str(tmp_path / "out"))
    got = {Path(f).name: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}
    assert got == {name: t.digest[7:] for name, t in m.tensors.items()}


@needs_registry
def test_patchctl_pulls_a_peft_folder_oras_pushed(oci_registry, models, tmp_path, no_creds):
    import oras.client
    import torch
    from peft import PeftModel
    from transformers import BertModel

    from patchctl import Registry

    client = oras.client.OrasClient(hostname=oci_registry.host, insecure=True)
    cwd = os.getcwd()
    os.chdir(models.lora)
    try:
        client.push(target=f"{oci_registry.host}/peft/adapter:v1",
                    files=["adapter_config.json", "adapter_model.safetensors"], disable_path_validation=True)
    finally:
        os.chdir(cwd)
    with Registry(tmp_path / "fresh") as fresh:
        res = fresh.pull(oci_registry.url("peft/adapter:v1"))
        assert res["layout"] == "peft"
        shown = fresh.show("adapter:v1")
        assert shown["kind"] == "lora"
        assert shown["metadata"]["source"] == oci_registry.url("peft/adapter:v1")
        assert shown["metadata"]["oci_digest"] == res["oci_digest"]
        fresh.export("adapter:v1", tmp_path / "exported")
    x = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    outs = []
    for folder in (models.lora, tmp_path / "exported"):
        pm = PeftModel.from_pretrained(BertModel.from_pretrained(models.base), folder).eval()
        with torch.no_grad():
            outs.append(pm(input_ids=x).last_hidden_state)
    assert torch.equal(outs[0], outs[1])


# -- auth ------------------------------------------------------------------------------------------


@needs_registry
def test_oci_basic_auth_login_push_and_pull(oci_basic, patches, tmp_path, cli, reg_path, monkeypatch, no_creds):
    from patchctl import Registry

    with Registry(patches) as src:
        digest = src.resolve("team/lora:v1")
        with pytest.raises(RemoteError, match="401 unauthorized.*patchctl login"):
            src.publish("team/lora:v1", oci_basic.url("auth"))
    monkeypatch.setattr("sys.stdin", io.StringIO("wrong\n"))
    r = cli("login", oci_basic.host, "-u", USER, "--password-stdin")
    assert r.code != 0 and len(r.err.strip().splitlines()) == 1 and "401" in r.err and "wrong" not in r.err.replace("wrong user", "")
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    r = cli("login", oci_basic.host, "-u", USER, "--password-stdin")
    assert r.code == 0, r.err
    assert PASSWORD not in r.out + r.err
    cred = reg_path / "credentials.json"
    assert cred.stat().st_mode & 0o777 == 0o600
    assert cli("push", "team/lora:v1", "--to", oci_basic.url("auth/lora:v1"), "--registry", str(patches),
               registry=False).code != 0  # the login is kept per registry folder
    monkeypatch.setenv("PATCHCTL_REGISTRY_USER", USER)
    monkeypatch.setenv("PATCHCTL_REGISTRY_PASSWORD", PASSWORD)
    with Registry(patches) as src:
        src.publish("team/lora:v1", oci_basic.url("auth"))
    monkeypatch.delenv("PATCHCTL_REGISTRY_USER")
    monkeypatch.delenv("PATCHCTL_REGISTRY_PASSWORD")
    r = cli("pull", oci_basic.url("auth/team/lora:v1"), "--json")  # with the stored login
    assert r.code == 0, r.err
    assert json.loads(r.out)["digest"] == digest
    r = cli("remote", "add", "secure", oci_basic.url("auth"))
    assert r.code == 0
    r = cli("remote", "ls", "--json")
    assert PASSWORD not in r.out and USER not in r.out
    assert [(x["name"], x["kind"], x["url"]) for x in json.loads(r.out)] == [("secure", "oci", oci_basic.url("auth"))]
    r = cli("remote", "add", "bad", "oci://host/ns:tag")
    assert r.code != 0 and len(r.err.strip().splitlines()) == 1


@needs_registry
def test_oci_docker_config_auths_are_used(oci_basic, patches, tmp_path, monkeypatch, no_creds):
    from patchctl import Registry

    cfg = Path(os.environ["DOCKER_CONFIG"])
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "config.json").write_text(json.dumps(
        {"auths": {oci_basic.host: {"auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}}}))
    with Registry(patches) as src:
        res = src.publish("team/diff:v1", oci_basic.url("docker-cfg"))
    assert res["blobs"] > 0


class BearerProxy:
    """A token server and a registry front that demands its tokens, in front of the real registry.

    distribution's own ``token`` auth needs an RSA-signed JWT issuer and a
    certificate bundle; this stand-in issues opaque tokens for
    ``alice``/``s3cret-Pa55`` and checks them, then forwards to the registry.
    """

    def __init__(self, upstream: str, auth: bool = True, fault: str | None = None):
        self.upstream, self.auth, self.fault = upstream, auth, fault
        self.tokens: dict[str, str] = {}
        self.scopes: list[str] = []
        self.blob_gets = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _send(self, status, headers, body=b""):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.path.startswith("/token"):
                    auth = self.headers.get("Authorization", "")
                    if auth != "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode():
                        return self._send(401, {})
                    from urllib.parse import parse_qs, urlsplit

                    scopes = parse_qs(urlsplit(self.path).query).get("scope", [])
                    tok = os.urandom(8).hex()
                    outer.tokens[tok] = " ".join(scopes)
                    outer.scopes += scopes
                    return self._send(200, {"Content-Type": "application/json"}, json.dumps({"token": tok}).encode())
                auth = self.headers.get("Authorization", "")
                if outer.auth and (not auth.startswith("Bearer ") or auth[7:] not in outer.tokens):
                    port = self.server.server_address[1]
                    ch = f'Bearer realm="http://127.0.0.1:{port}/token",service="test"'
                    return self._send(401, {"WWW-Authenticate": ch, "Content-Type": "application/json"},
                                      b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}')
                if "/forbidden/" in self.path:
                    return self._send(403, {"Content-Type": "application/json"},
                                      b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}')
                if outer.fault == "huge" and self.command == "GET" and "/manifests/" in self.path:
                    return self._send(200, {"Content-Type": oci.OCI_MANIFEST}, b" " * (5 << 20))
                is_blob_get = self.command == "GET" and "/blobs/sha256:" in self.path
                if is_blob_get:
                    outer.blob_gets += 1
                    if outer.fault == "500":
                        return self._send(500, {"Content-Type": "application/json"},
                                          b'{"errors":[{"code":"UNKNOWN","message":"storage backend down"}]}')
                h, p = outer.upstream.split(":")
                conn = http.client.HTTPConnection(h, int(p), timeout=30)
                try:
                    self._forward(conn, body)
                finally:
                    conn.close()

            def _forward(self, conn, body):
                fwd = {k: v for k, v in self.headers.items() if k.lower() not in ("authorization", "host")}
                conn.request(self.command, self.path, body=body or None, headers=fwd)
                r = conn.getresponse()
                data = r.read()
                hdrs = {k: v for k, v in r.getheaders() if k.lower() not in ("content-length", "transfer-encoding",
                                                                              "connection")}
                if "Location" in hdrs and hdrs["Location"].startswith(f"http://{outer.upstream}"):
                    hdrs["Location"] = hdrs["Location"].replace(outer.upstream, f"127.0.0.1:{self.server.server_address[1]}")
                if outer.fault == "corrupt" and self.command == "GET" and "/blobs/sha256:" in self.path and len(data) > 64:
                    data = data[:32] + bytes([data[32] ^ 1]) + data[33:]  # one bit flipped
                if outer.fault == "drop" and self.command == "GET" and "/blobs/sha256:" in self.path and len(data) > 64:
                    self.send_response(r.status)
                    for k, v in hdrs.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])  # then the connection drops
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command == "HEAD":
                    self.send_response(r.status)
                    for k, v in hdrs.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", r.getheader("Content-Length") or "0")
                    self.end_headers()
                else:
                    self._send(r.status, hdrs, data)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that hung up: not the test's business
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@needs_registry
def test_oci_bearer_token_flow(oci_registry, patches, tmp_path, monkeypatch, no_creds):
    from patchctl import Registry

    proxy = BearerProxy(oci_registry.host)
    try:
        with Registry(patches) as src:
            with pytest.raises(RemoteError, match="401 unauthorized"):
                src.publish("team/lora:v1", f"oci://{proxy.host}/bearer")
            monkeypatch.setenv("PATCHCTL_REGISTRY_USER", USER)
            monkeypatch.setenv("PATCHCTL_REGISTRY_PASSWORD", PASSWORD)
            res = src.publish("team/lora:v1", f"oci://{proxy.host}/bearer")
            digest = src.resolve("team/lora:v1")
        assert "repository:bearer/team/lora:pull,push" in proxy.scopes
        with Registry(tmp_path / "fresh") as fresh:
            got = fresh.pull(f"oci://{proxy.host}/bearer/team/lora:v1")
        assert got["digest"] == digest == res["digest"]
    finally:
        proxy.close()


# -- patchctl serve for OCI clients ----------------------------------------------------------------


@pytest.fixture(scope="module")
def served(patches):
    from patchctl.server import process as server_process

    with server_process.serving(patches, timeout=60) as (url, _):
        yield url.removeprefix("http://").rstrip("/")


def test_oras_and_patchctl_pull_from_patchctl_serve(served, patches, tmp_path, no_creds):
    import oras.client

    from patchctl import Registry

    with Registry(patches) as src:
        m = src.manifest("team/lora:v1")
        digest = src.resolve("team/lora:v1")
        want = oci.to_oci("lora", m, src.store.read_manifest_bytes(digest), digest)
    client = oras.client.OrasClient(hostname=served, insecure=True)
    files = client.pull(target=f"{served}/team/lora:v1", outdir=str(tmp_path / "out"))
    got = {Path(f).name: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}
    assert got == {name: t.digest[7:] for name, t in m.tensors.items()}
    h, p = served.split(":")
    conn = http.client.HTTPConnection(h, int(p), timeout=10)
    conn.request("GET", "/v2/team/lora/manifests/v1", headers={"Accept": oci.OCI_MANIFEST})
    r = conn.getresponse()
    body = r.read()
    assert body == want and r.getheader("Content-Type") == oci.OCI_MANIFEST
    oci_digest = "sha256:" + hashlib.sha256(want).hexdigest()
    assert r.getheader("Docker-Content-Digest") == oci_digest
    conn.request("GET", f"/v2/team/lora/manifests/{oci_digest}", headers={"Accept": oci.OCI_MANIFEST})
    r = conn.getresponse()
    assert r.status == 200 and r.read() == want
    conn.request("GET", "/v2/team/lora/manifests/v1")  # no Accept: the patchctl manifest, as before
    r = conn.getresponse()
    assert r.read() == Registry(patches).store.read_manifest_bytes(digest)
    conn.request("GET", "/v2/team/lora/manifests/nope", headers={"Accept": oci.OCI_MANIFEST})
    r = conn.getresponse()
    assert r.status == 404 and json.loads(r.read())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    conn.close()
    with Registry(tmp_path / "fresh") as fresh:
        res = fresh.pull(f"oci://{served}/team/lora:v1")
        assert res["digest"] == digest and res["oci_digest"] == oci_digest
        assert _objects(tmp_path / "fresh", digest) == _objects(patches, digest)
        with Registry(patches) as src:  # its eval suite came as a referrer too, under its own ref
            suites = src.show("team/lora:v1")["suites"]
        assert suites and res["suites"] == len(suites) and fresh.show("lora:v1")["suites"] == suites
        assert fresh.resolve("evals/tiny:v1") == suites[0]
        assert _objects(tmp_path / "fresh", suites[0]) == _objects(patches, suites[0])
        with Registry(patches) as src:
            shown = src.show("team/merged:v1")
        assert shown["validations"]
        res = fresh.pull(f"oci://{served}/team/merged:v1")  # its validation records through the referrers API
        assert res["validations"] == len(shown["validations"])
        assert fresh.show("merged:v1")["validations"] == shown["validations"]


@needs_registry
def test_oci_403_is_one_line_naming_the_user(oci_registry, patches, monkeypatch, cli, no_creds):
    proxy = BearerProxy(oci_registry.host)
    try:
        monkeypatch.setenv("PATCHCTL_REGISTRY_USER", USER)
        monkeypatch.setenv("PATCHCTL_REGISTRY_PASSWORD", PASSWORD)
        r = cli("push", "team/lora:v1", "--to", f"oci://{proxy.host}/forbidden", "--registry", str(patches),
                registry=False)
        assert r.code != 0 and len(r.err.strip().splitlines()) == 1
        assert "403 denied" in r.err and "'alice' has no permission" in r.err and PASSWORD not in r.err
    finally:
        proxy.close()


@pytest.mark.parametrize("url", ["oci://127.0.0.1:5000/Team/Lora:v1", "oci://127.0.0.1:5000/team/lora@sha256:abc",
                                 "oci://u:p@127.0.0.1:5000/team/lora:v1"])
def test_oci_pull_bad_reference_is_one_line(cli, url, no_creds):
    r = cli("pull", url)
    assert r.code != 0 and len(r.err.strip().splitlines()) == 1 and "oci://HOST" in r.err


@needs_registry
@pytest.mark.parametrize("fault", ["corrupt", "500", "drop"])
def test_oci_pull_faults_store_nothing(oci_registry, patches, tmp_path, monkeypatch, fault, no_creds):
    from patchctl import Registry
    from patchctl.errors import PatchctlError
    from patchctl.registry.remote import oci_http

    monkeypatch.setattr(oci_http, "BACKOFF", 0.0)
    with Registry(patches) as src:
        src.publish("team/diff:v1", oci_registry.url("faults"))
        digest = src.resolve("team/diff:v1")
    proxy = BearerProxy(oci_registry.host, auth=False, fault=fault)
    try:
        with Registry(tmp_path / "fresh") as fresh:
            with pytest.raises(PatchctlError) as e:
                fresh.pull(f"oci://{proxy.host}/faults/team/diff:v1")
            assert "\n" not in str(e.value)
            if fault == "corrupt":
                assert "does not hash" in str(e.value) or "corrupt" in str(e.value)
            if fault == "500":
                assert "500" in str(e.value) and proxy.blob_gets >= 3  # retried with backoff
            assert fresh.ls() == [] and not (tmp_path / "fresh" / "objects" / "sha256").exists() or \
                not any((tmp_path / "fresh" / "objects" / "sha256").rglob("*"))
            proxy.fault = None  # the registry recovers: the same pull completes, resuming what verified
            got = fresh.pull(f"oci://{proxy.host}/faults/team/diff:v1")
            assert got["digest"] == digest and fresh.fsck()["problems"] == []
    finally:
        proxy.close()


# -- kill -9 in the middle ---------------------------------------------------------------------------

KILLS = int(os.environ.get("PATCHCTL_OCI_KILLS", "4"))  # the issue's 20: PATCHCTL_OCI_KILLS=20


@pytest.fixture(scope="module")
def big_patch(tmp_path_factory):
    """A registry folder with a 5-tensor float32 diff of 48 MiB of random bytes (pushes take a while)."""
    from patchctl import Registry
    from patchctl.registry.store.manifest import Manifest, TensorEntry

    root = tmp_path_factory.mktemp("oci-big") / "reg"
    with Registry(root) as reg:
        entries = {}
        for i, mib in enumerate((20, 16, 8, 3, 1)):
            data = os.urandom(mib << 20)
            entries[f"t{i}.weight"] = TensorEntry(reg.store.put_blob(data), "float32", (len(data) // 4,), "raw",
                                                  len(data))
        m = Manifest("diff", {"fingerprint": "sha256:" + "0" * 64, "name": "b", "revision": None}, entries)
        digest = reg.commit(m, "big/diff:v1", move_latest=False)
    return root, digest


def _patchctl(*args: str) -> subprocess.Popen:
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PATCHCTL_REGISTRY_USER", "PATCHCTL_REGISTRY_PASSWORD")}
    return subprocess.Popen([sys.executable, "-m", "patchctl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)


@needs_registry
def test_oci_kill_9_mid_push_and_mid_pull_then_retry_completes(oci_registry, big_patch, tmp_path, no_creds):
    import random

    from patchctl import Registry

    root, digest = big_patch
    rng = random.Random(16)
    for i in range(KILLS):
        repo = oci_registry.url(f"kill/p{i}:v1")
        p = _patchctl("push", "big/diff:v1", "--to", repo, "--json", "--registry", str(root))
        time.sleep(rng.uniform(0.05, 1.2))
        p.kill()
        p.communicate()
        status = oci_registry.get(f"/v2/kill/p{i}/manifests/v1", {"Accept": oci.OCI_MANIFEST})[0]
        if p.returncode == 0:
            assert status == 200
        p = _patchctl("push", "big/diff:v1", "--to", repo, "--json", "--registry", str(root))
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert json.loads(out)["digest"] == digest
    dst = tmp_path / "dst"
    for _ in range(KILLS):
        p = _patchctl("pull", oci_registry.url("kill/p0:v1"), "--registry", str(dst))
        time.sleep(rng.uniform(0.05, 1.0))
        p.kill()
        p.communicate()
        with Registry(dst) as reg:
            assert reg.fsck()["problems"] == []
            assert [r["digest"] for r in reg.ls()] in ([], [digest])  # nothing partial under refs
        p = _patchctl("pull", oci_registry.url("kill/p0:v1"), "--registry", str(dst), "--json")
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        with Registry(dst) as reg:
            assert reg.resolve("p0:v1") == digest and reg.fsck()["problems"] == []
            reg.rm("p0:v1")
            reg.gc(prune_history=True)


@needs_registry
def test_oci_manifest_over_4_mib_on_the_wire_is_refused_before_any_blob(oci_registry, tmp_path, cli, no_creds):
    proxy = BearerProxy(oci_registry.host, auth=False, fault="huge")
    try:
        r = cli("pull", f"oci://{proxy.host}/any/thing:v1")
        assert r.code != 0 and len(r.err.strip().splitlines()) == 1
        assert "larger than the 4 MiB cap; refused before fetching any blob" in r.err and proxy.blob_gets == 0
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def plain_http_registry(tmp_path_factory):
    """A ``docker-registry`` without TLS on 127.0.0.2: an address patchctl does not count as loopback
    (only localhost, 127.0.0.1 and ::1 are), so it stands for a plain-HTTP registry on the network."""
    if BINARY is None:
        pytest.skip("the CNCF registry is not installed: apt-get install docker-registry (scripts/setup.sh)")
    server = _start(tmp_path_factory.mktemp("oci-plain"), addr="127.0.0.2")
    yield server
    _stop(server)


@pytest.mark.parametrize(("url", "insecure", "stored", "ok"), [
    ("oci://ghcr.io/team", False, False, True),
    ("oci://ghcr.io/team", True, False, False),  # --insecure never turns TLS checks off
    ("oci+http://10.1.2.3:5000/team", False, False, False),  # plain HTTP needs consent
    ("oci+http://10.1.2.3:5000/team", True, False, True),
    ("oci+http://10.1.2.3:5000/team", False, True, True),  # a remote added with --insecure
    ("oci://127.0.0.1:5000/team", False, False, True),
    ("oci://localhost:5000/team", True, False, True),
    ("http://10.1.2.3:8080", True, False, False),
    ("/some/folder", True, False, False),
])
def test_insecure_only_for_explicit_http_or_loopback(url, insecure, stored, ok):
    from patchctl.errors import InvalidArgument
    from patchctl.registry.remote.oci import check_transport

    if ok:
        check_transport(url, insecure, stored=stored)
    else:
        with pytest.raises(InvalidArgument, match="insecure"):
            check_transport(url, insecure, stored=stored)


@needs_registry
def test_plain_http_registry_needs_insecure(plain_http_registry, patches, cli, reg_path, no_creds):
    with __import__("patchctl").Registry(patches) as src:
        digest = src.resolve("team/merged:v1")
    host = plain_http_registry.host
    # oci:// verifies TLS: against a registry without TLS it fails in one line, and sends no blob
    r = cli("push", "team/merged:v1", "--to", f"oci://{host}/plain/merged:v1", "--registry", str(patches),
            registry=False)
    assert r.code != 0 and len(r.err.strip().splitlines()) == 1, r.err
    assert "TLS failed" in r.err and "oci+http://" in r.err and "--insecure" in r.err
    # the explicit oci+http:// still needs --insecure; refused before any request
    r = cli("push", "team/merged:v1", "--to", f"oci+http://{host}/plain/merged:v1", "--registry", str(patches),
            registry=False)
    assert r.code != 0 and len(r.err.strip().splitlines()) == 1 and "--insecure" in r.err, r.err
    assert plain_http_registry.blob_files() == set()
    r = cli("push", "team/merged:v1", "--to", f"oci+http://{host}/plain/merged:v1", "--insecure", "--json",
            "--registry", str(patches), registry=False)
    assert r.code == 0, r.err
    assert json.loads(r.out)["digest"] == digest and plain_http_registry.blob_files()
    r = cli("pull", f"oci+http://{host}/plain/merged:v1")
    assert r.code != 0 and "--insecure" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli("remote", "add", "plain", f"oci+http://{host}/plain")
    assert r.code != 0 and "--insecure" in r.err
    assert cli("remote", "ls", "--json").out.strip() in ("[]", "")
    r = cli("remote", "add", "plain", f"oci+http://{host}/plain", "--insecure")
    assert r.code == 0, r.err
    r = cli("pull", "plain/merged:v1", "--json")  # the consent was given when the remote was added
    assert r.code == 0, r.err
    assert json.loads(r.out)["digest"] == digest
    r = cli("pull", "merged:v1", "--from", f"oci://{host}/plain", "--insecure")
    assert r.code != 0 and "only for an explicit oci+http://" in r.err


@needs_registry
def test_oci_pull_honours_the_pull_limits(oci_registry, patches, cli, reg_path, no_creds):
    from patchctl import Registry

    with Registry(patches) as src:
        src.publish("team/diff:v1", oci_registry.url("limits"))
    url = oci_registry.url("limits/team/diff:v1")
    for flag, value, said in (("--max-blob-bytes", "1000", "--max-blob-bytes"),
                              ("--max-blobs", "1", "--max-blobs"),
                              ("--max-manifest-bytes", "100", "--max-manifest-bytes")):
        r = cli("pull", url, flag, value)
        assert r.code != 0 and len(r.err.strip().splitlines()) == 1 and said in r.err, (flag, r.err)
        assert not list((reg_path / "tmp").iterdir())
        assert cli("ls", "--json").out.strip() in ("[]", "")
    r = cli("pull", url, "--json")
    assert r.code == 0, r.err
