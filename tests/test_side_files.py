"""A full fine-tune's non-tensor changes: config.json (as a JSON Patch) and tokenizer files (as blobs).

The case from the issue: a classifier fine-tuned from a tiny BERT with renamed labels and an added
token. ``push`` → ``apply`` must give back the fine-tune's ``config.json`` and tokenizer, so a
``pipeline()`` says the fine-tune's labels (before, it said ``LABEL_0..2``: the base's files).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from patchctl.errors import BaseMismatch, InvalidArgument, InvalidPatch
from patchctl.registry.formats import sidefiles
from patchctl.registry.store import manifest as manifest_mod

from .conftest import snapshot
from .test_oci import no_creds, oci_registry  # noqa: F401 - fixtures: a local CNCF registry, no credentials

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
NEW_TOKEN = "<patchctl-new>"
TEXTS = ["a sweet baked food made of flour", "a tool for cutting wood", f"a {NEW_TOKEN} of forests"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A tiny BERT classifier base and its full fine-tune (labels renamed, a token added, trained 3 steps).

    The base's vocabulary has two spare rows (as models padded to a multiple of 64 have), so the
    added token fits in the embedding matrix and every tensor keeps its shape.
    """
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("classifier")
    cfg = BertConfig(vocab_size=tokenizer.vocab_size + 2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")

    tok = AutoTokenizer.from_pretrained(root / "base")
    assert tok.add_tokens([NEW_TOKEN]) == 1 and len(tok) <= cfg.vocab_size
    ft = BertForSequenceClassification.from_pretrained(root / "base")
    ft.config.id2label, ft.config.label2id = dict(LABELS), {v: k for k, v in LABELS.items()}
    torch.manual_seed(1)
    opt = torch.optim.AdamW(ft.parameters(), lr=1e-3)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    for _ in range(3):
        loss = ft(**batch, labels=torch.tensor([2, 0, 1])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    ft.save_pretrained(root / "finetune")
    tok.save_pretrained(root / "finetune")
    return {"base": root / "base", "finetune": root / "finetune"}


def _tokenizer_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if sidefiles.SIDE_FILE_RE.fullmatch(p.name)}


def _labels(folder: Path) -> list[str]:
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(folder), tokenizer=str(folder), device="cpu")
    return [r["label"] for r in clf(TEXTS)]


def test_classifier_round_trips_push_apply_with_its_config_and_tokenizer(classifier, cli, registry, tmp_path):
    base, ft = classifier["base"], classifier["finetune"]
    assert cli("push", ft, "clf:v1", "--base", base).code == 0
    r = cli("apply", "clf:v1", tmp_path / "out", "--base", base)
    assert r.code == 0, r.err
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text()) == json.loads((ft / "config.json").read_text())
    assert (out / "config.json").read_bytes() == (ft / "config.json").read_bytes()  # written as transformers does
    assert _tokenizer_files(out) == _tokenizer_files(ft) != _tokenizer_files(base)
    assert set(_labels(out)) <= set(LABELS.values())
    assert _labels(out) == _labels(ft)

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(out)(NEW_TOKEN, add_special_tokens=False)["input_ids"]
    assert ids == [len(AutoTokenizer.from_pretrained(base))]  # one token, the added one


def test_show_lists_the_side_files(classifier, cli, registry):
    registry.push(classifier["finetune"], "clf:v1", base=classifier["base"])
    info = registry.show("clf:v1")
    side = info["side_files"]
    ft_files, base_files = _tokenizer_files(classifier["finetune"]), _tokenizer_files(classifier["base"])
    changed = {n for n, data in ft_files.items() if base_files.get(n) != data}
    assert "tokenizer.json" in changed and set(side) == {"config.json", *changed}
    paths = {op["path"] for op in side["config.json"]["json_patch"]}
    assert {"/id2label/0", "/label2id/negative", "/label2id/LABEL_0"} <= paths
    r = cli("show", "clf:v1")
    assert r.code == 0, r.err
    lines = [x for x in r.out.splitlines() if x.startswith("file ")]
    assert len(lines) == len(side)
    assert any(x.startswith("file      config.json: ") and "replace /id2label/0" in x for x in lines)
    tj = side["tokenizer.json"]
    assert "file      tokenizer.json: the fine-tune's, " in r.out and tj["digest"][:19] in r.out
    assert json.loads(cli("show", "clf:v1", "--json").out)["side_files"] == side


def test_a_fine_tune_without_side_changes_has_no_side_files_field(classifier, registry, tmp_path):
    ft = shutil.copytree(classifier["finetune"], tmp_path / "ft")
    for name in [*_tokenizer_files(ft), "config.json"]:
        (ft / name).unlink()
    for p in classifier["base"].iterdir():
        if p.suffix != ".safetensors":
            shutil.copy(p, ft / p.name)
    digest = registry.push(ft, "plain:v1", base=classifier["base"])
    m = registry.manifest(digest)
    assert m.side_files == {} and b"side_files" not in registry.store.read_manifest_bytes(digest)
    assert m.blob_digests() == sorted({d for t in m.tensors.values() for d, _ in t.blobs()})


def test_a_removed_tokenizer_file_is_removed_on_apply(classifier, registry, tmp_path):
    base = shutil.copytree(classifier["base"], tmp_path / "base")
    (base / "added_tokens.json").write_text('{"<old>": 30522}\n')
    digest = registry.push(classifier["finetune"], "clf:v1", base=base)
    assert registry.manifest(digest).side_files["added_tokens.json"] == {"removed": True}
    out = registry.apply("clf:v1", base, tmp_path / "out")
    assert not (out / "added_tokens.json").exists() and (base / "added_tokens.json").exists()


def test_a_fine_tune_that_saved_no_tokenizer_keeps_the_bases(classifier, registry, tmp_path):
    ft = shutil.copytree(classifier["finetune"], tmp_path / "ft")
    for name in _tokenizer_files(ft):
        (ft / name).unlink()
    digest = registry.push(ft, "clf:v1", base=classifier["base"])
    assert list(registry.manifest(digest).side_files) == ["config.json"]
    out = registry.apply("clf:v1", classifier["base"], tmp_path / "out")
    assert _tokenizer_files(out) == _tokenizer_files(classifier["base"])
    assert json.loads((out / "config.json").read_text())["id2label"] == {str(k): v for k, v in LABELS.items()}


def test_apply_refuses_a_config_patch_that_does_not_fit_the_base(classifier, registry, tmp_path):
    registry.push(classifier["finetune"], "clf:v1", base=classifier["base"])
    base = shutil.copytree(classifier["base"], tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    del cfg["id2label"]
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BaseMismatch, match=r"replace /id2label/0 does not fit this base's config.json"):
        registry.apply("clf:v1", base, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_side_files_travel_with_a_pull_and_survive_gc(classifier, registry, tmp_path):
    from patchctl import Registry

    digest = registry.push(classifier["finetune"], "clf:v1", base=classifier["base"])
    side_blobs = {f["digest"] for f in registry.manifest(digest).side_files.values() if "digest" in f}
    assert side_blobs and side_blobs <= set(registry.manifest(digest).blob_digests())
    registry.gc()
    assert all(registry.store.has_blob(d) for d in side_blobs)
    with Registry(tmp_path / "fresh") as fresh:
        res = fresh.pull("clf:v1", str(registry.path))
        assert res["digest"] == digest and fresh.fsck()["ok"]
        assert all(fresh.store.has_blob(d) for d in side_blobs)
        out = fresh.apply("clf:v1", classifier["base"], tmp_path / "out")
    assert _tokenizer_files(out) == _tokenizer_files(classifier["finetune"])


def test_side_files_travel_through_an_oci_registry(classifier, registry, tmp_path, oci_registry, no_creds):  # noqa: F811
    from patchctl import Registry
    from patchctl.registry.remote import oci

    digest = registry.push(classifier["finetune"], "clf:v1", base=classifier["base"])
    pushed = registry.publish("clf:v1", oci_registry.url("side"))
    status, _, body = oci_registry.get("/v2/side/clf/manifests/v1", {"Accept": oci.OCI_MANIFEST})
    layers = {la["annotations"]["org.opencontainers.image.title"]: la for la in json.loads(body)["layers"]}
    assert status == 200 and pushed["digest"] == digest
    assert layers["side_files/tokenizer.json"]["mediaType"] == oci.SIDE_FILE_MEDIA_TYPE
    with Registry(tmp_path / "fresh") as fresh:
        assert fresh.pull("oci://" + oci_registry.host + "/side/clf:v1")["digest"] == digest
        out = fresh.apply("clf:v1", classifier["base"], tmp_path / "out")
    assert _tokenizer_files(out) == _tokenizer_files(classifier["finetune"])


def test_export_diff_carries_metadata_side_files_and_with_exact_is_bit_exact(classifier, cli, registry, tmp_path):
    from safetensors import safe_open

    base, ft = classifier["base"], classifier["finetune"]
    digest = registry.push(ft, "clf:v1", base=base)
    m = registry.manifest(digest)
    pinned = [n for n, t in m.tensors.items() if t.pins]
    assert pinned, "the fine-tune should need exactness pins somewhere (fp32 rounding of base + delta)"
    fb, ff = safe_open(base / "model.safetensors", "pt"), safe_open(ft / "model.safetensors", "pt")

    def exact_tensors(path: Path) -> tuple[int, dict[str, str]]:
        with safe_open(path, "pt") as f:
            keys = [k for k in f.keys() if "::" not in k]
            same = 0
            for k in keys:
                b = fb.get_tensor(k)
                out = (b.float() + f.get_tensor(k).float()).to(b.dtype)
                if k + "::pin_index" in f.keys():
                    out.view(-1)[f.get_tensor(k + "::pin_index")] = f.get_tensor(k + "::pin_values")
                same += torch.equal(out.view(-1).view(torch.int32), ff.get_tensor(k).view(-1).view(torch.int32))
            return same, f.metadata()

    assert cli("export", "clf:v1", tmp_path / "plain.safetensors").code == 0
    same, meta = exact_tensors(tmp_path / "plain.safetensors")
    assert same == len(m.tensors) - len(pinned) and meta["patchctl.exact"] == "false"

    r = cli("export", "clf:v1", tmp_path / "exact.safetensors", "--exact")
    assert r.code == 0, r.err
    same, meta = exact_tensors(tmp_path / "exact.safetensors")
    assert same == len(m.tensors)  # every tensor bit for bit
    assert meta["format"] == "pt" and meta["patchctl.kind"] == "diff" and meta["patchctl.exact"] == "true"
    assert meta["patchctl.base_fingerprint"] == m.fingerprint and "pin_index" in meta["patchctl.combine"]
    side = json.loads(meta["patchctl.side_files"])
    assert side["config.json"] == m.side_files["config.json"]
    for name, data in _tokenizer_files(ft).items():
        if name in side:
            assert base64.b64decode(side[name]["base64"]) == data

    r = cli("export", "clf:v1", tmp_path / "half.safetensors", "--exact", "--dtype", "float16")
    assert r.code != 0 and "--exact with --dtype float16" in r.err and not (tmp_path / "half.safetensors").exists()


def test_an_exact_export_pushed_again_is_the_same_patch(classifier, cli, registry, tmp_path):
    base, ft = classifier["base"], classifier["finetune"]
    m = registry.manifest(registry.push(ft, "clf:v1", base=base))
    assert cli("export", "clf:v1", tmp_path / "d.safetensors", "--exact").code == 0
    r = cli("push", tmp_path / "d.safetensors", "again:v1", "--base", base)
    assert r.code == 0, r.err
    again = registry.manifest("again:v1")
    assert again.tensors == m.tensors and again.side_files == m.side_files  # same blobs, pins included
    out = registry.apply("again:v1", base, tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == registry.apply("clf:v1", base, tmp_path / "o2").joinpath(
        "model.safetensors").read_bytes()
    assert _tokenizer_files(out) == _tokenizer_files(ft)


@pytest.mark.parametrize("extra,msg", [
    ({"w::pin_index": torch.zeros(1, dtype=torch.int64)}, "'w::pin_index' has no 'w' or no 'w::pin_values'"),
    ({"w::pin_index": torch.tensor([99]), "w::pin_values": torch.zeros(1)}, "positions inside the tensor"),
])
def test_a_diff_file_with_bad_pins_is_refused(classifier, registry, tmp_path, extra, msg):
    from safetensors.torch import save_file

    from patchctl.registry.formats.checkpoint import Checkpoint
    from patchctl.registry.ops.importing import import_diff_file

    name = "bert.pooler.dense.bias"
    sd = {name: torch.zeros(32), **{k.replace("w", name, 1): v for k, v in extra.items()}}
    save_file(sd, tmp_path / "d.safetensors")
    with pytest.raises(InvalidPatch, match=re.escape(msg.replace("'w", f"'{name}"))):
        list(import_diff_file(tmp_path / "d.safetensors", Checkpoint(classifier["base"])).tensors)


# -- the JSON Patch and the manifest records ----------------------------------------------------
def test_json_diff_then_patch_gives_the_target_and_tells_types_apart():
    a = {"id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "eps": 1e-12, "n": 1, "flag": True, "gone": [1],
         "nested": {"x": {"y": 1}}, "a/b~c": 0}
    b = {"id2label": {"0": "neg", "1": "LABEL_1"}, "eps": 1e-12, "n": 1.0, "flag": 1, "new": None,
         "nested": {"x": {"y": 1, "z": [1, 2]}}, "a/b~c": 1}
    ops = sidefiles.json_diff(a, b)
    assert ops == [
        {"op": "replace", "path": "/a~1b~0c", "value": 1},
        {"op": "replace", "path": "/flag", "value": 1},
        {"op": "remove", "path": "/gone"},
        {"op": "replace", "path": "/id2label/0", "value": "neg"},
        {"op": "replace", "path": "/n", "value": 1.0},
        {"op": "add", "path": "/nested/x/z", "value": [1, 2]},
        {"op": "add", "path": "/new", "value": None},
    ]
    got = sidefiles.json_patch(a, ops, "test")
    assert sidefiles.same(got, b) and json.dumps(got, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert sidefiles.json_diff(b, b) == []


def test_manifest_without_side_files_keeps_its_bytes():
    m = manifest_mod.Manifest("diff", {"name": "b", "revision": None, "fingerprint": "sha256:" + "a" * 64}, {})
    assert b"side_files" not in m.to_bytes()
    side = {"config.json": {"json_patch": [{"op": "remove", "path": "/x"}]}, "vocab.txt": {"removed": True},
            "tokenizer.json": {"digest": "sha256:" + "b" * 64, "size": 3}}
    m2 = manifest_mod.Manifest("diff", m.base, {}, side_files=side)
    again = manifest_mod.parse(m2.to_bytes())
    assert again.side_files == side and again.to_bytes() == m2.to_bytes() and again.digest != m.digest
    assert again.blob_digests() == ["sha256:" + "b" * 64] and again.stored_bytes == 3


@pytest.mark.parametrize("side,msg", [
    ({"../config.json": {"removed": True}}, "is not a config, tokenizer or generation file name"),
    ({"model.safetensors": {"digest": "sha256:" + "b" * 64, "size": 3}}, "is not a config, tokenizer"),
    ({"sub/tokenizer.json": {"removed": True}}, "is not a config, tokenizer"),
    ({"config.json": {"digest": "sha256:" + "b" * 64, "size": 3}}, "config.json must be a json_patch"),
    ({"config.json": {"json_patch": [{"op": "move", "path": "/a", "from": "/b"}]}}, "bad JSON Patch op"),
    ({"config.json": {"json_patch": [{"op": "add", "path": "/a"}]}}, "bad JSON Patch op"),
    ({"tokenizer.json": {"removed": False}}, "removed must be true"),
    ({"tokenizer.json": {"digest": "sha256:xyz", "size": 3}}, "expected {digest, size}"),
    ({"tokenizer.json": {"digest": "sha256:" + "b" * 64, "size": -1}}, "expected {digest, size}"),
    ({}, "side_files must be a non-empty object"),
])
def test_manifest_parse_refuses_bad_side_files(side, msg):
    doc = manifest_mod.Manifest("diff", {"name": "b", "revision": None, "fingerprint": "sha256:" + "a" * 64},
                                {}).to_json()
    doc["side_files"] = side
    with pytest.raises(InvalidPatch, match=f"invalid manifest: .*{msg.replace('{', '.').replace('}', '.')}"):
        manifest_mod.parse(json.dumps(doc).encode())


def test_a_config_with_nan_is_refused_before_anything_is_stored(classifier, registry, tmp_path):
    ft = shutil.copytree(classifier["finetune"], tmp_path / "ft")
    (ft / "config.json").write_text((ft / "config.json").read_text().replace('"hidden_dropout_prob": 0.1',
                                                                             '"hidden_dropout_prob": NaN'))
    before = snapshot(registry.path)
    with pytest.raises(InvalidPatch, match="config.json: not a JSON object .*NaN is not JSON"):
        registry.push(ft, "bad:v1", base=classifier["base"])
    assert snapshot(registry.path) == before


def test_export_refuses_exact_narrowing_via_the_api(classifier, registry, tmp_path):
    registry.push(classifier["finetune"], "clf:v1", base=classifier["base"])
    with pytest.raises(InvalidArgument, match="does not fit in bfloat16 bit for bit"):
        registry.export("clf:v1", tmp_path / "x.safetensors", dtype="bfloat16", exact=True)
