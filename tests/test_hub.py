"""Pulls from the Hugging Face Hub the way people use it: PEFT repos, subfolders, bases, pickles.

No Hub server exists here and nothing touches the network (HF_HUB_OFFLINE=1, set by conftest):
each repo is written into a local Hugging Face cache by huggingface_hub's own cache functions —
the ones ``hf_hub_download`` calls after a download (``repo_folder_name``, ``_get_pointer_path``,
``_create_symlink``, ``_cache_commit_hash_for_specific_revision``) — so the cache has the layout
``models--ORG--NAME/{blobs,snapshots/REV,refs/main}`` that ``snapshot_download`` reads offline,
and ``scan_cache_dir`` checks it. Every case runs through the CLI, with and without ``--json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from patchctl.errors import InvalidArgument
from patchctl.registry.formats.checkpoint import Checkpoint

from .conftest import run_cli_process

PEFT = ("adapter_config.json", "adapter_model.safetensors")


def hub_commit(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "main") -> str:
    """Put one commit of ``repo_id`` into the HF cache ``cache``, as ``hf_hub_download`` lays it out; its hash."""
    from huggingface_hub.file_download import (
        _cache_commit_hash_for_specific_revision,
        _create_symlink,
        _get_pointer_path,
        repo_folder_name,
    )

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    listing = json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))
    commit = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
    for path, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()  # an LFS file's etag is its sha256
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = _get_pointer_path(str(storage), commit, path)
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        _create_symlink(str(blob), pointer, new_blob=True)
    _cache_commit_hash_for_specific_revision(str(storage), revision, commit)
    return commit


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # the real offline code path, no network
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _peft_files(folder: Path, prefix: str = "", **config: object) -> dict[str, bytes]:
    """The adapter folder's files as a repo holds them (the config with ``config`` changes)."""
    files = {prefix + p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    if config:
        cfg = json.loads(files[prefix + PEFT[0]])
        files[prefix + PEFT[0]] = json.dumps({**cfg, **config}).encode()
    return files


def _weights(m) -> dict:
    """The manifest's tensor entries, without the adapter's files kept beside them (``file:...``)."""
    return {k: v for k, v in m.tensors.items() if not k.startswith("file:")}


def _pull(cli, *args: str, json_out: bool) -> dict | str:
    r = cli("pull", *args, *(["--json"] if json_out else []))
    assert r.code == 0, r.err
    assert "Traceback" not in r.out + r.err
    return json.loads(r.out) if json_out else r.out


def _one_line_error(r) -> str:
    assert r.code != 0 and r.out == ""
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, r.err
    return r.err


def test_hub_cache_is_the_layout_huggingface_hub_reads(hf_cache, models):
    from huggingface_hub import scan_cache_dir, snapshot_download

    commit = hub_commit(hf_cache, "acme/peft", _peft_files(models.lora))
    (repo,) = scan_cache_dir(hf_cache).repos
    assert (repo.repo_id, repo.repo_type, [r.commit_hash for r in repo.revisions]) == ("acme/peft", "model", [commit])
    assert (hf_cache / "models--acme--peft" / "refs" / "main").read_text() == commit
    snap = Path(snapshot_download("acme/peft"))
    assert snap.name == commit and sorted(p.name for p in snap.iterdir()) == sorted(p.name for p in models.lora.iterdir())
    assert (snap / PEFT[1]).is_symlink() and (snap / PEFT[1]).read_bytes() == (models.lora / PEFT[1]).read_bytes()


@pytest.mark.parametrize("json_out", [False, True])
def test_pull_of_a_peft_repo_imports_it_and_reports(hf_cache, cli, registry, models, json_out):
    commit = hub_commit(hf_cache, "acme/peft", _peft_files(models.lora))
    out = _pull(cli, "tiny:v1", "--from", "hf://acme/peft", json_out=json_out)
    digest = registry.resolve("tiny:v1")
    if json_out:
        assert (out["layout"], out["revision"], out["digest"]) == ("peft", commit, digest)
        assert out["files"][:2] == list(PEFT) and out["tensors"] == len(registry.manifest(digest).tensors)
    else:
        assert out.startswith(f"imported tiny:v1 {digest} from hf://acme/peft@{commit}: PEFT adapter")
    assert registry.show("tiny:v1")["metadata"] == {"source": "hf://acme/peft", "revision": commit}
    assert registry.manifest(digest).tensors == registry.manifest(registry.push(models.lora, "local:v1")).tensors


@pytest.mark.parametrize("json_out", [False, True])
@pytest.mark.parametrize("how", ["option", "url"])
def test_pull_finds_an_adapter_in_a_repo_subfolder(hf_cache, cli, registry, models, how, json_out):
    files = {**_peft_files(models.lora, "adapters/math/"), **_peft_files(models.lora_rs, "adapters/rs/"),
             "README.md": b"two adapters"}
    commit = hub_commit(hf_cache, "acme/many", files)
    args = (["--from", "hf://acme/many", "--subfolder", "adapters/rs"] if how == "option"
            else ["--from", "hf://acme/many/adapters/rs"])
    out = _pull(cli, "rs:v1", *args, json_out=json_out)
    assert registry.show("rs:v1")["metadata"] == {"source": "hf://acme/many/adapters/rs", "revision": commit}
    assert registry.manifest("rs:v1").params["use_rslora"] is True  # the rs adapter, not the other one
    if json_out:
        assert (out["subfolder"], out["source_ref"]) == ("adapters/rs", f"hf://acme/many/adapters/rs@{commit}")
    else:
        assert f" from hf://acme/many/adapters/rs@{commit}: PEFT adapter" in out
    assert registry.manifest("rs:v1").tensors == registry.manifest(registry.push(models.lora_rs, "local:v1")).tensors


def test_pull_of_a_repo_with_the_adapter_in_a_folder_says_how_to_reach_it(hf_cache, cli, registry, models):
    hub_commit(hf_cache, "acme/many", _peft_files(models.lora, "adapters/math/"))
    err = _one_line_error(cli("pull", "x:v1", "--from", "hf://acme/many"))
    assert "--subfolder FOLDER" in err and "hf://ORG/REPO/FOLDER" in err
    err = _one_line_error(cli("pull", "x:v1", "--from", "hf://acme/many", "--subfolder", "adapters/nope"))
    assert "adapters/nope/adapter_config.json" in err
    assert registry.ls() == []


@pytest.mark.parametrize("bad", ["../etc", "a/../../b", "/", "a//b", "a b"])
def test_pull_refuses_a_subfolder_outside_the_repo(hf_cache, cli, registry, bad):
    err = _one_line_error(cli("pull", "x:v1", "--from", "hf://acme/peft", "--subfolder", bad))
    assert f"invalid subfolder {bad!r}" in err
    with pytest.raises(InvalidArgument, match=r"hf://ORG/REPO\[/FOLDER\]"):
        registry.pull("x:v1", f"hf://acme/peft/{bad}")


def test_hub_options_are_refused_for_other_remotes(cli, registry, tmp_path):
    err = _one_line_error(cli("pull", "x:v1", "--from", str(tmp_path / "folder"), "--trust-pickle"))
    assert "apply to pulls from hf:// remotes" in err


@pytest.mark.parametrize("json_out", [False, True])
def test_pull_takes_the_base_the_adapter_does_not_name_locally(hf_cache, cli, registry, models, json_out):
    hub_commit(hf_cache, "acme/peft", _peft_files(models.lora, base_model_name_or_path="acme/tiny-bert"))
    err = _one_line_error(cli("pull", "x:v1", "--from", "hf://acme/peft"))
    assert "'acme/tiny-bert' is not a local folder nor in the local Hugging Face cache; pass --base" in err
    assert registry.ls() == []
    out = _pull(cli, "x:v1", "--from", "hf://acme/peft", "--base", models.base, json_out=json_out)
    m = registry.manifest("x:v1")
    assert m.fingerprint == Checkpoint(models.base).fingerprint()
    assert m.base["name"] == "acme/tiny-bert"  # the adapter's own name for its base
    assert (out["base"] if json_out else out.rsplit("base ", 1)[1].strip()) == "acme/tiny-bert"


def test_pull_takes_a_base_from_the_hf_cache_by_id(hf_cache, cli, registry, models):
    base_commit = hub_commit(hf_cache, "acme/tiny-bert",
                             {p.name: p.read_bytes() for p in models.base.iterdir() if p.is_file()})
    hub_commit(hf_cache, "acme/peft", _peft_files(models.lora, base_model_name_or_path="acme/tiny-bert"))
    out = _pull(cli, "x:v1", "--from", "hf://acme/peft", "--base", f"acme/tiny-bert@{base_commit}", json_out=True)
    m = registry.manifest(out["digest"])
    assert (m.base["name"], m.base["revision"]) == ("acme/tiny-bert", base_commit)
    assert m.fingerprint == Checkpoint(models.base).fingerprint()


@pytest.mark.parametrize("json_out", [False, True])
def test_pull_of_a_pickle_only_adapter_needs_trust_pickle(hf_cache, cli, registry, models, tmp_path, json_out):
    from safetensors.torch import load_file

    buf = tmp_path / "adapter_model.bin"
    torch.save(load_file(models.lora / PEFT[1]), buf)
    cfg = (models.lora / PEFT[0]).read_bytes()
    hub_commit(hf_cache, "acme/old", {"sub/" + PEFT[0]: cfg, "sub/adapter_model.bin": buf.read_bytes()})
    err = _one_line_error(cli("pull", "x:v1", "--from", "hf://acme/old/sub"))
    assert "sub/adapter_model.bin" in err and "Pass --trust-pickle" in err
    assert registry.ls() == []
    out = _pull(cli, "x:v1", "--from", "hf://acme/old/sub", "--trust-pickle", json_out=json_out)
    if json_out:
        assert out["files"] == [PEFT[0], "adapter_model.bin"]
    assert _weights(registry.manifest("x:v1")) == _weights(registry.manifest(registry.push(models.lora, "local:v1")))


@pytest.mark.parametrize("json_out", [False, True])
def test_push_and_pull_the_patchctl_layout_in_a_subfolder(hf_cache, cli, registry, models, tmp_path, monkeypatch,
                                                          json_out):
    import huggingface_hub

    def create_commit(api, repo_id, operations, *, commit_message, revision=None, **kw):
        from types import SimpleNamespace

        files = {op.path_in_repo: op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes)
                 else Path(op.path_or_fileobj).read_bytes() for op in operations}
        return SimpleNamespace(oid=hub_commit(hf_cache, repo_id, files, revision or "main"))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    digest = registry.push(models.lora, "team/lora:v1")
    res = registry.publish("team/lora:v1", "hf://acme/shared/teams/math")
    assert "teams/math/patchctl/refs/team/lora/@v1" in res["files"] and "teams/math/adapter_config.json" in res["files"]
    fresh = tmp_path / "fresh"
    args = ["pull", "team/lora:v1", "--from", "hf://acme/shared", "--subfolder", "teams/math",
            "--registry", str(fresh), *(["--json"] if json_out else [])]
    got = cli(*args, registry=False)
    assert got.code == 0, got.err
    blobs = len(registry.manifest(digest).blob_digests())
    if json_out:
        out = json.loads(got.out)
        assert (out["digest"], out["layout"], out["subfolder"], out["revision"]) == (
            digest, "patchctl", "teams/math", res["commit"])
    else:
        assert got.out.startswith(f"pulled team/lora:v1 {digest} from hf://acme/shared: {blobs} blobs fetched")


def test_pull_without_json_in_a_real_process_prints_one_line(hf_cache, models, tmp_path):
    commit = hub_commit(hf_cache, "acme/peft", _peft_files(models.lora))
    env = {"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "PATCHCTL_HOME": str(tmp_path / "reg")}
    p = run_cli_process("pull", "tiny:v1", "--from", "hf://acme/peft", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("imported tiny:v1 sha256:") and f"hf://acme/peft@{commit}" in p.stdout
    assert "Traceback" not in p.stderr
    p = run_cli_process("pull", "tiny:v2", "--from", "hf://acme/absent", env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "not in the local Hugging Face cache" in p.stderr
