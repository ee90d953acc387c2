"""Bad input: one clear line on stderr, a non-zero exit, and the registry unchanged."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from .conftest import snapshot


@pytest.fixture
def seeded(cli, models, reg_path):
    """A registry holding one patch, and its state before the bad command."""
    assert cli("push", models.finetune, "ft:v1", "--base", models.base).code == 0
    return snapshot(reg_path)


def _adapter(models, tmp_path, edit):
    d = tmp_path / "adapter"
    shutil.copytree(models.lora, d)
    edit(d)
    return d


def _expect_error(cli, reg_path, before, args, pattern, code=1):
    r = cli(*args)
    assert r.code == code, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert pattern in lines[0], lines[0]
    assert snapshot(reg_path) == before
    return lines[0]


def test_malformed_adapter_config(cli, models, tmp_path, seeded, reg_path):
    d = _adapter(models, tmp_path, lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,'))
    _expect_error(cli, reg_path, seeded, ["push", d, "bad:v1", "--base", models.base], "adapter_config.json: malformed JSON")


def test_adapter_config_with_bad_rank(cli, models, tmp_path, seeded, reg_path):
    def edit(d):
        c = json.loads((d / "adapter_config.json").read_text())
        c["r"] = "eight"
        (d / "adapter_config.json").write_text(json.dumps(c))

    _expect_error(cli, reg_path, seeded, ["push", _adapter(models, tmp_path, edit), "bad:v1", "--base", models.base],
                  "r must be a positive integer, got 'eight'")


@pytest.mark.parametrize(("ptype", "extra", "message"), [
    ("IA3", {}, "unsupported peft_type 'IA3'"),
    ("LORA", {"use_dora": True}, "use_dora=true but LoRA module 'encoder.layer.0.attention.self.query' has no "
                                 "lora_magnitude_vector; the config and the weights disagree"),
])
def test_unknown_peft_type_and_dora(cli, models, tmp_path, seeded, reg_path, ptype, extra, message):
    def edit(d):
        c = json.loads((d / "adapter_config.json").read_text())
        c.update({"peft_type": ptype, **extra})
        (d / "adapter_config.json").write_text(json.dumps(c))

    _expect_error(cli, reg_path, seeded, ["push", _adapter(models, tmp_path, edit), "bad:v1", "--base", models.base], message)


def _raw_safetensors(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_safetensors_header_length_past_end_of_file(cli, models, tmp_path, seeded, reg_path):
    p = tmp_path / "d.safetensors"
    p.write_bytes(struct.pack("<Q", 10_000) + b'{"a":1}')
    _expect_error(cli, reg_path, seeded, ["push", p, "bad:v1", "--base", models.base],
                  "header length 10000 runs past the end of the file")


def test_safetensors_overlapping_offsets(cli, models, tmp_path, seeded, reg_path):
    hdr = {"pooler.dense.bias": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]},
           "embeddings.LayerNorm.bias": {"dtype": "F32", "shape": [32], "data_offsets": [64, 192]}}
    p = _raw_safetensors(tmp_path / "d.safetensors", hdr, bytes(192))
    _expect_error(cli, reg_path, seeded, ["push", p, "bad:v1", "--base", models.base], "overlap")


def test_safetensors_offsets_disagree_with_shape(cli, models, tmp_path, seeded, reg_path):
    hdr = {"pooler.dense.bias": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 128]}}
    p = _raw_safetensors(tmp_path / "d.safetensors", hdr, bytes(128))
    _expect_error(cli, reg_path, seeded, ["push", p, "bad:v1", "--base", models.base], "spans 128 bytes")


def test_diff_tensor_shape_does_not_match_base(cli, models, tmp_path, seeded, reg_path):
    p = tmp_path / "d.safetensors"
    save_file({"pooler.dense.weight": torch.zeros(31, 32)}, p)
    _expect_error(cli, reg_path, seeded, ["push", p, "bad:v1", "--base", models.base],
                  "pooler.dense.weight: shape [31, 32] vs base [32, 32]")


def test_lora_shape_does_not_match_base(cli, models, tmp_path, seeded, reg_path):
    from safetensors.torch import load_file

    def edit(d):
        sd = load_file(d / "adapter_model.safetensors")
        k = next(k for k in sd if "lora_A" in k)
        sd[k] = torch.zeros(sd[k].shape[0], 17)
        save_file(sd, d / "adapter_model.safetensors")

    _expect_error(cli, reg_path, seeded, ["push", _adapter(models, tmp_path, edit), "bad:v1", "--base", models.base],
                  "patch does not fit the base")


def test_finetune_with_other_architecture(cli, models, tmp_path, seeded, reg_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "other")
    _expect_error(cli, reg_path, seeded, ["push", tmp_path / "other", "bad:v1", "--base", models.base],
                  "does not match the base")


@pytest.mark.parametrize("ref", ["Bad:v1", "a b:v1", "ok:bad tag", "_x:v1", "ok:" + "t" * 200, "x//y:v1"])
def test_invalid_name_or_tag(cli, models, seeded, reg_path, ref):
    _expect_error(cli, reg_path, seeded, ["push", models.finetune, ref, "--base", models.base], "invalid")


def test_missing_base_folder(cli, models, tmp_path, seeded, reg_path):
    _expect_error(cli, reg_path, seeded, ["push", models.finetune, "ft:v2", "--base", tmp_path / "nowhere"],
                  "does not exist", code=2)


def test_missing_source(cli, models, tmp_path, seeded, reg_path):
    _expect_error(cli, reg_path, seeded, ["push", tmp_path / "nothing", "ft:v2", "--base", models.base],
                  "does not exist", code=2)


def test_finetune_without_base(cli, models, seeded, reg_path):
    _expect_error(cli, reg_path, seeded, ["push", models.finetune, "ft:v2"], "needs the base it was fine-tuned from")


def test_pickle_refused_without_trust(cli, models, tmp_path, seeded, reg_path):
    p = tmp_path / "delta.bin"
    torch.save({"pooler.dense.bias": torch.ones(32)}, p)
    _expect_error(cli, reg_path, seeded, ["push", p, "pk:v1", "--base", models.base], "pickle file")


def test_pickle_with_trust_uses_weights_only(cli, models, tmp_path, reg_path, seeded):
    p = tmp_path / "delta.bin"
    torch.save({"pooler.dense.bias": torch.ones(32)}, p)
    assert cli("push", p, "pk:v1", "--base", models.base, "--trust-pickle").code == 0

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.bin")
    r = cli("push", tmp_path / "evil.bin", "pk:v2", "--base", models.base, "--trust-pickle")
    assert r.code != 0 and "weights_only" in r.err and "pwned" not in r.out


def test_apply_to_wrong_base_writes_nothing(cli, models, tmp_path, seeded, reg_path):
    _expect_error(cli, reg_path, seeded, ["apply", "ft:v1", tmp_path / "out", "--base", models.other_base],
                  "fingerprint")
    assert not (tmp_path / "out").exists()


def test_apply_to_existing_output_refuses(cli, models, tmp_path, seeded, reg_path):
    (tmp_path / "out").mkdir()
    _expect_error(cli, reg_path, seeded, ["apply", "ft:v1", tmp_path / "out", "--base", models.base], "already exists")


def test_registry_path_that_is_not_a_registry(cli, models, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    r = cli("ls", "--registry", tmp_path / "junk", registry=False)
    assert r.code == 1 and "is not a patchctl registry" in r.err


def test_usage_error_is_one_line(cli):
    r = cli("push", registry=False)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "Missing argument" in r.err
