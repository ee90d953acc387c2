"""Canonical bytes: same tensors and metadata → same bytes, in any order and any process."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import torch

from patchctl.registry.formats import canonical
from patchctl.registry.formats.safetensors import SafetensorsFile, write_file
from patchctl.registry.store.manifest import Manifest, TensorEntry, parse

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
FP = "sha256:" + "f" * 64

SCRIPT = textwrap.dedent(
    """
    import sys, json
    from patchctl.registry.store.manifest import Manifest, TensorEntry
    order = json.loads(sys.argv[1])
    ents = {"b.weight": TensorEntry(%r, "float32", (2, 3), "raw", 24),
            "a.weight": TensorEntry(%r, "bfloat16", (4,), "raw", 8)}
    params = {"r": 8, "lora_alpha": 16, "target_modules": ["q", "v"], "alpha_pattern": {}}
    if order == "reversed":
        ents = dict(reversed(list(ents.items())))
        params = dict(reversed(list(params.items())))
    m = Manifest("diff", {"revision": None, "name": "base", "fingerprint": %r}, ents, params,
                 metadata={"z": 1, "a": [1.5, "x"]})
    sys.stdout.write(m.to_bytes().hex() + " " + m.digest)
    """
) % (D1, D2, FP)

GOLDEN_MANIFEST = (
    '{"base":{"fingerprint":"sha256:' + "f" * 64 + '","name":"base","revision":null},"kind":"diff",'
    '"lineage":{"parents":[],"recipe":null},"metadata":{"a":[1.5,"x"],"z":1},'
    '"params":{"alpha_pattern":{},"lora_alpha":16,"r":8,"target_modules":["q","v"]},"schema":1,'
    '"tensors":{"a.weight":{"digest":"sha256:' + "2" * 64 + '","dtype":"bfloat16","encoding":"raw","shape":[4],"size":8},'
    '"b.weight":{"digest":"sha256:' + "1" * 64 + '","dtype":"float32","encoding":"raw","shape":[2,3],"size":24}}}'
)
GOLDEN_MANIFEST_DIGEST = "sha256:3c5e1ae22748a13bf453797929ec33d145b8cc7857392ac8f1a3ae57471b1722"


def _in_process(order: str) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(order)], capture_output=True, text=True, check=True)
    hexbytes, digest = out.stdout.split()
    return hexbytes, digest


def test_manifest_bytes_identical_across_processes_and_dict_orders():
    a = _in_process("forward")
    b = _in_process("reversed")
    assert a == b
    assert a[1] == "sha256:" + hashlib.sha256(bytes.fromhex(a[0])).hexdigest()


def test_manifest_golden_bytes():
    hexbytes, digest = _in_process("forward")
    assert bytes.fromhex(hexbytes).decode() == GOLDEN_MANIFEST
    assert digest == GOLDEN_MANIFEST_DIGEST


def test_manifest_parse_round_trips_to_same_bytes():
    m = Manifest("lora", {"name": "b", "revision": "r1", "fingerprint": FP},
                 {"x": TensorEntry(D1, "float16", (3, 2), "raw", 12)}, {"r": 4}, (D2,), {"op": "merge"}, {"k": "v"})
    assert parse(m.to_bytes()).to_bytes() == m.to_bytes()


def test_canonical_json_sorts_nested_keys_and_rejects_nan():
    assert canonical.dumps({"b": {"y": 1, "x": 2}, "a": [3, {"d": 1, "c": 2}]}) == b'{"a":[3,{"c":2,"d":1}],"b":{"x":2,"y":1}}'
    import pytest

    with pytest.raises(ValueError):
        canonical.dumps({"a": float("nan")})


def test_safetensors_writer_is_order_invariant_and_loadable(tmp_path):
    from safetensors.torch import load_file

    t = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(3, dtype=torch.bfloat16)}
    write_file(tmp_path / "1.safetensors", t, {"format": "pt"})
    write_file(tmp_path / "2.safetensors", dict(reversed(list(t.items()))), {"format": "pt"})
    b1, b2 = (tmp_path / "1.safetensors").read_bytes(), (tmp_path / "2.safetensors").read_bytes()
    assert b1 == b2
    assert hashlib.sha256(b1).hexdigest() == "ad905a9e21858b34ab0087cd63a4450cd460d82fd0e2066f99752e1af4451368"
    loaded = load_file(tmp_path / "1.safetensors")
    assert torch.equal(loaded["b"], t["b"]) and torch.equal(loaded["a"], t["a"])
    f = SafetensorsFile(tmp_path / "1.safetensors")
    assert f.metadata == {"format": "pt"} and torch.equal(f.read("b"), t["b"])
