"""The registry foundation: push, dedup, refs and history, export, apply, index rebuild, gc."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from patchctl import BaseMismatch, Registry
from patchctl.registry.formats.checkpoint import Checkpoint, fingerprint_tensors
from patchctl.registry.formats.safetensors import SafetensorsFile


def _files(path):
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def test_push_finetune_then_apply_reproduces_weights_exactly_fp32(registry, models, tmp_path):
    digest = registry.push(models.finetune, "ft:v1", base=models.base)
    assert registry.resolve("ft:v1") == digest == registry.resolve("ft:latest")
    out = registry.apply("ft:v1", models.base, tmp_path / "out")
    want = load_file(models.finetune / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k].view(torch.uint8), got[k].view(torch.uint8)), k
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_apply_reproduces_low_precision_finetune_bit_exactly(registry, models, tmp_path, dtype):
    base = {k: v.to(dtype) for k, v in load_file(models.base / "model.safetensors").items()}
    ft = {k: v.to(dtype) for k, v in load_file(models.finetune / "model.safetensors").items()}
    # a weight that crosses zero, and one whose change dwarfs it: plain base+diff cannot give these back
    name = "encoder.layer.0.attention.self.query.weight"
    base[name][0, 0], ft[name][0, 0] = 0.75, -0.0001
    base[name][0, 1], ft[name][0, 1] = 1e-4, 3.0
    for d, sd in (("b", base), ("f", ft)):
        shutil.copytree(models.base, tmp_path / d, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(sd, tmp_path / d / "model.safetensors")
    registry.push(tmp_path / "f", "ft:lp", base=tmp_path / "b")
    m = registry.manifest("ft:lp")
    assert m.tensors[name].dtype == str(dtype).removeprefix("torch.")
    assert m.tensors[name].pins and m.tensors[name].pins["count"] >= 1
    got = load_file(registry.apply("ft:lp", tmp_path / "b", tmp_path / "out") / "model.safetensors")
    for k in ft:
        assert torch.equal(ft[k].view(torch.int16), got[k].view(torch.int16)), k


def test_push_leaves_out_tensors_equal_to_the_base(registry, models, tmp_path):
    sd = load_file(models.base / "model.safetensors")
    changed = {"pooler.dense.weight", "encoder.layer.0.output.dense.bias"}
    for k in changed:
        sd[k] = sd[k] + 0.5
    shutil.copytree(models.base, tmp_path / "ft", ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(sd, tmp_path / "ft" / "model.safetensors")
    registry.push(tmp_path / "ft", "ft:v1", base=models.base)
    assert set(registry.manifest("ft:v1").tensors) == changed


def test_dedup_second_version_stores_only_new_tensors(registry, models, tmp_path):
    registry.push(models.finetune, "ft:v1", base=models.base)
    blobs_before = set(registry.store.iter_digests("objects"))
    # v2: the same fine-tune with N tensors changed further
    sd = load_file(models.finetune / "model.safetensors")
    changed = ["encoder.layer.1.output.dense.weight", "pooler.dense.bias", "encoder.layer.0.intermediate.dense.bias"]
    for k in changed:
        sd[k] = sd[k] + 0.01
    shutil.copytree(models.finetune, tmp_path / "v2", ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(sd, tmp_path / "v2" / "model.safetensors")
    registry.push(tmp_path / "v2", "ft:v2", base=models.base)
    m1, m2 = registry.manifest("ft:v1"), registry.manifest("ft:v2")
    shared = sum(1 for k, e in m2.tensors.items() if k in m1.tensors and m1.tensors[k].digest == e.digest)
    new_blobs = set(registry.store.iter_digests("objects")) - blobs_before
    new_tensor_blobs = new_blobs & {e.digest for e in m2.tensors.values()}
    new_pin_blobs = new_blobs & {e.pins["digest"] for e in m2.tensors.values() if e.pins}
    assert len(m2.tensors) - shared == len(changed)
    assert len(new_tensor_blobs) == len(m2.tensors) - shared
    assert new_blobs == new_tensor_blobs | new_pin_blobs


def test_peft_round_trip_is_bit_identical_and_loads_in_peft(registry, models, tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import BertModel

    registry.push(models.lora, "lora:v1")  # base found through base_model_name_or_path
    out = registry.export("lora:v1", tmp_path / "exported")
    orig, back = load_file(models.lora / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert set(orig) == set(back)
    for k in orig:
        assert orig[k].dtype == back[k].dtype and torch.equal(orig[k], back[k])
    want = json.loads((models.lora / "adapter_config.json").read_text())
    # the trainer's local path is published as the folder's name only (no patch names a path of the machine)
    want["base_model_name_or_path"] = Path(want["base_model_name_or_path"]).name
    assert json.loads((out / "adapter_config.json").read_text()) == want
    assert str(models.base) not in registry.store.read_manifest_bytes(registry.resolve("lora:v1")).decode()
    batch = tokenizer(["a small dog", "a city by the sea"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = PeftModel.from_pretrained(BertModel.from_pretrained(models.base), models.lora).eval()(**batch).last_hidden_state
        b = PeftModel.from_pretrained(BertModel.from_pretrained(models.base), out).eval()(**batch).last_hidden_state
    assert torch.equal(a, b)


@pytest.mark.parametrize("which", ["lora", "lora_rs"])
def test_apply_lora_equals_peft_merge_and_unload(registry, models, tmp_path, which):
    from peft import PeftModel
    from transformers import BertModel

    src = getattr(models, which)
    registry.push(src, f"{which.replace('_', '-')}:v1", base=models.base)
    out = registry.apply(f"{which.replace('_', '-')}:v1", models.base, tmp_path / "out")
    merged = PeftModel.from_pretrained(BertModel.from_pretrained(models.base), src).merge_and_unload()
    got = load_file(out / "model.safetensors")
    for k, v in merged.state_dict().items():
        if k in got:
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(got["encoder.layer.1.attention.self.value.weight"],
                           load_file(models.base / "model.safetensors")["encoder.layer.1.attention.self.value.weight"])


def test_apply_to_another_base_fails_and_writes_nothing(registry, models, tmp_path):
    registry.push(models.finetune, "ft:v1", base=models.base)
    with pytest.raises(BaseMismatch, match="fingerprint"):
        registry.apply("ft:v1", models.other_base, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "patchctl-tmp" in p.name]


def test_fingerprint_from_folder_equals_fingerprint_of_loaded_tensors(models):
    ck = Checkpoint(models.base)
    assert ck.fingerprint() == fingerprint_tensors(load_file(models.base / "model.safetensors"))
    assert ck.fingerprint() != Checkpoint(models.other_base).fingerprint()


def test_fingerprint_changes_when_a_sampled_byte_changes(models, tmp_path):
    sd = load_file(models.base / "model.safetensors")
    fp = fingerprint_tensors(sd)
    sd["pooler.dense.bias"][0] += 1.0  # first window of a small tensor
    assert fingerprint_tensors(sd) != fp


def test_export_diff_then_push_as_diff_file_gives_same_tensors(registry, models, tmp_path):
    registry.push(models.finetune, "ft:v1", base=models.base)
    path = registry.export("ft:v1", tmp_path / "d.safetensors")
    registry.push(path, "ftdiff:v1", base=models.base)
    a, b = registry.manifest("ft:v1"), registry.manifest("ftdiff:v1")
    assert {k: e.digest for k, e in a.tensors.items()} == {k: e.digest for k, e in b.tensors.items()}


def test_export_lora_as_diff_is_the_delta(registry, models, tmp_path):
    from peft import PeftModel
    from transformers import BertModel

    registry.push(models.lora, "lora:v1", base=models.base)
    d = load_file(registry.export("lora:v1", tmp_path / "d.safetensors", format="diff"))
    merged = PeftModel.from_pretrained(BertModel.from_pretrained(models.base), models.lora).merge_and_unload().state_dict()
    base = load_file(models.base / "model.safetensors")
    k = "encoder.layer.0.attention.self.query.weight"
    assert set(d) == {f"encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")}
    torch.testing.assert_close(base[k] + d[k], merged[k], rtol=0, atol=1e-6)


def test_refs_history_tag_rm_and_latest(registry, models):
    d1 = registry.push(models.finetune, "ft:v1", base=models.base, message="one")
    d2 = registry.push(models.finetune2, "ft:v2", base=models.base, message="two")
    assert registry.resolve("ft:latest") == d2
    registry.tag("ft:v1", "ft:stable")
    assert registry.resolve("ft:stable") == d1
    registry.rm("ft:v2")
    with pytest.raises(Exception, match="no patch named ft:v2"):
        registry.resolve("ft:v2")
    hist = registry.log("ft:latest")["history"]
    assert [(h["old"], h["new"]) for h in hist] == [(None, d1), (d1, d2)]
    assert [h["message"] for h in registry.log("ft:v2")["history"]] == ["two", "rm"]
    assert registry.resolve(d1[:20]) == d1


def test_push_same_content_twice_gives_same_digest_and_no_new_history(registry, models):
    d1 = registry.push(models.finetune, "ft:v1", base=models.base)
    d2 = registry.push(models.finetune, "ft:v1", base=models.base)
    assert d1 == d2
    assert len(registry.log("ft:v1")["history"]) == 1


def test_index_loss_rebuild_restores_refs_history_and_metadata(reg_path, models):
    with Registry(reg_path) as reg:
        reg.push(models.finetune, "ft:v1", base=models.base, metadata={"task": "wordnet"}, message="m1")
        reg.push(models.lora, "lora:v1", base=models.base)
        reg.tag("ft:v1", "ft:prod")
        reg.rm("lora:latest")
        before = (reg.ls(), reg.log("ft:v1"), reg.log("lora:latest"), reg.show("ft:v1"))
    for p in reg_path.glob("index.sqlite*"):
        p.unlink()
    with Registry(reg_path) as reg:  # opening without an index rebuilds it
        assert (reg.ls(), reg.log("ft:v1"), reg.log("lora:latest"), reg.show("ft:v1")) == before
        for p in reg_path.glob("index.sqlite*"):
            p.unlink()
    with Registry(reg_path) as reg:
        reg.index.rebuild([], [])  # an empty index: fsck notices, --rebuild-index repairs
        assert not reg.fsck()["ok"]
        res = reg.fsck(rebuild_index=True)
        # refs: ft:v1 ft:latest ft:prod lora:v1 (lora:latest was removed: 2 history entries)
        assert res["rebuilt"] == {"manifests": 2, "refs": 4, "history": 6}
        assert (reg.ls(), reg.log("ft:v1"), reg.log("lora:latest"), reg.show("ft:v1")) == before
        assert reg.show("ft:v1")["metadata"] == {"task": "wordnet"}
        assert reg.fsck()["ok"]


def test_gc_keeps_history_reachable_and_prunes_when_asked(registry, models):
    d1 = registry.push(models.finetune, "ft:v1", base=models.base)
    registry.push(models.finetune2, "other:v1", base=models.base)
    registry.rm("ft:v1")
    registry.rm("ft:latest")
    assert registry.gc()["manifests"] == 0  # history still reaches ft:v1
    dry = registry.gc(dry_run=True, prune_history=True)
    assert dry["manifests"] == 1 and registry.store.has_manifest(d1)
    res = registry.gc(prune_history=True)
    assert res["manifests"] == 1 and not registry.store.has_manifest(d1)
    shared = set(registry.manifest("other:v1").blob_digests())
    assert all(registry.store.has_blob(b) for b in shared)
    assert registry.fsck()["ok"]


def test_fsck_reports_exactly_the_corrupted_objects(registry, models):
    registry.push(models.finetune, "ft:v1", base=models.base)
    blobs = sorted(registry.store.iter_digests("objects"))
    victim = registry.store.blob_path(blobs[1])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.chmod(0o644)
    victim.write_bytes(bytes(data))
    res = registry.fsck()
    assert res["corrupt_blobs"] == [blobs[1]] and not res["ok"]
    from patchctl import DigestMismatch

    with pytest.raises(DigestMismatch):
        registry.store.read_blob(blobs[1])


def test_registry_refuses_unknown_config_version(tmp_path):
    from patchctl.errors import RegistryError

    Registry(tmp_path / "r").close()
    (tmp_path / "r" / "config.json").write_text(json.dumps({"format": "patchctl-registry", "version": 99}))
    with pytest.raises(RegistryError, match="version 99"):
        Registry(tmp_path / "r")


def test_safetensors_reader_reads_what_safetensors_wrote(models):
    f = SafetensorsFile(models.base / "model.safetensors")
    ref = load_file(models.base / "model.safetensors")
    assert set(f.tensors) == set(ref)
    for k in ref:
        assert torch.equal(f.read(k), ref[k])
