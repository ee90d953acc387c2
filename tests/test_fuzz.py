"""Fuzzing the parsers of untrusted input, and `push` itself: only PatchctlError comes out, in bounded time,
and no header drives an allocation.

Targets (from `bench/reliability.py`, which runs >= 100,000 inputs): the
safetensors header parser (`SafetensorsFile` on files, then reading every
tensor it accepts), `manifest.parse`, `importers.read_peft_config` and the
sparse codec's `decode` (tests/test_codec.py already fuzzes it with random and
mutated bytes; here: hostile header fields and the memory bound). Each input
comes from hypothesis (random bytes, structured JSON, mutated valid inputs) or
from a seeded byte-level mutator; a crash is any exception that is not a
PatchctlError. `push` is fuzzed end to end with mutated diff files, fine-tune
folders and PEFT folders (`bench/reliability.py`'s `push_fuzz`): each input
answered within a time bound by a worker process, and a refused one leaving
the registry as it was.
"""

from __future__ import annotations

import hashlib
import json
import random
import resource
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchctl import Registry
from patchctl.errors import InvalidCheckpoint, InvalidPatch, PatchctlError
from patchctl.registry.formats.safetensors import SafetensorsFile
from patchctl.registry.ops.importing import check_peft_config
from patchctl.registry.store import manifest as manifest_mod

from ._integrity import assert_registry_clean
from .test_reliability import R

FUZZ = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])
SEEDS = R.seed_inputs()
STRATEGIES = R.hypothesis_strategies(st, SEEDS)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    return R.Targets(tmp_path_factory.mktemp("fuzz"))


def _only_patchctl_errors(fn, data: bytes) -> None:
    try:
        fn(data)
    except PatchctlError:
        pass


@FUZZ
@given(STRATEGIES["safetensors"])
def test_safetensors_parser_raises_only_patchctl_errors(targets, data):
    _only_patchctl_errors(targets.safetensors, data)


@FUZZ
@given(STRATEGIES["manifest"])
def test_manifest_parser_raises_only_patchctl_errors(data):
    _only_patchctl_errors(R.Targets.manifest, data)


@FUZZ
@given(STRATEGIES["peft"])
def test_peft_config_reader_raises_only_patchctl_errors(targets, data):
    _only_patchctl_errors(targets.peft, data)


@FUZZ
@given(st.integers(0, 2**32))
def test_codec_decode_of_hostile_header_fields_raises_only_invalid_patch(seed):
    try:
        R.Targets.codec(R.codec_structured(random.Random(seed)))
    except InvalidPatch:
        pass


def test_seeded_mutator_finds_no_crash(targets):
    """A quick run of the bench's mutator: 600 inputs per target, seeded."""
    stats = R.FuzzStats()
    rng = random.Random(1234)
    fns = {"safetensors": targets.safetensors, "manifest": R.Targets.manifest, "peft": targets.peft,
           "codec": R.Targets.codec}
    for target, fn in fns.items():
        pool = SEEDS[target]
        for i in range(600):
            if target in ("manifest", "peft") and i % 3 == 0:
                data = R.json_mutate(rng, rng.choice(pool))
            elif target == "safetensors" and i % 5 == 0:
                data = R.st_structured(rng)
            else:
                data = R.mutate(rng, rng.choice(pool), pool)
            stats.record(target, fn, data)
    assert stats.crashes == [], [(t, m, d[:80].hex()) for t, m, d in stats.crashes[:5]]
    assert sum(stats.tried.values()) == 2400


def test_atheris_finds_no_crash(tmp_path):
    """Coverage-guided: bench/fuzz_atheris.py (libFuzzer through atheris), 2,000 seeded inputs on each target,
    the four targets in parallel child processes (the long run: >= 100,000 each, bench/README.md)."""
    pytest.importorskip("atheris", reason="atheris is not installed (pip install 'patchctl[test]'; it has wheels "
                                          "for Linux x86-64, CPython 3.11-3.14 only)")
    out = tmp_path / "figures.json"
    p = subprocess.run([sys.executable, str(R.ROOT / "bench" / "fuzz_atheris.py"), "--jobs", "4", "--crashes",
                        str(tmp_path / "crashes"), "--json", str(out), "-runs=2000", "-seed=1"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    figures = {r["target"]: r for r in json.loads(out.read_text())}
    assert sorted(figures) == ["codec", "manifest", "peft", "safetensors"]
    for r in figures.values():
        assert (r["tried"], r["crashes"]) == (2000, 0), r
        assert r["parsed"] >= 1 and r["cov"] > 10, r  # the seeds parse, and the parser is instrumented
    assert not (tmp_path / "crashes").exists() or not any((tmp_path / "crashes").iterdir())


def test_seeds_are_valid_so_mutations_start_from_real_inputs(targets):
    for target, fn in {"safetensors": targets.safetensors, "manifest": R.Targets.manifest, "peft": targets.peft,
                       "codec": R.Targets.codec}.items():
        for data in SEEDS[target]:
            fn(data)  # no exception


# ---------------------------------------------------------------------------- memory


def test_headers_claiming_huge_tensors_fail_fast_with_little_memory(targets):
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m = R.memory_check(targets)
    assert m["problems"] == []
    assert m["peak_traced_bytes"] < 4 << 20, m  # tracemalloc: Python and numpy buffers
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 64 * 1024  # KiB: < 64 MiB of RSS growth


def test_a_2_to_the_60_element_tensor_is_refused_before_reading_anything(tmp_path):
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [2**60], "data_offsets": [0, 2**62]}}).encode()
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + bytes(16))
    with pytest.raises(InvalidCheckpoint, match="run past the data region"):
        SafetensorsFile(p)


# ---------------------------------------------------------------------------- regressions (found by the fuzzer)


def _st_file(tmp_path, header: bytes, data: bytes = bytes(8)):
    p = tmp_path / "f.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return p


@pytest.mark.parametrize("header", [
    b'{"a":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}',  # unhashable dtype: was TypeError
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"1" * 5000 + b"]}}",  # int > 4300 digits: was ValueError
    b"[" * 100_000,  # deep nesting: was RecursionError
    b'{"a":{"dtype":"F32","shape":[9223372036854775808,0],"data_offsets":[0,0]}}',  # torch.empty overflow on read
    b'{"a":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904,0],"data_offsets":[0,0]}}',
])
def test_safetensors_regressions(tmp_path, header):
    with pytest.raises(InvalidCheckpoint):
        f = SafetensorsFile(_st_file(tmp_path, header))
        for name in f.tensors:
            f.read(name)


@pytest.mark.parametrize("data", [
    # found by atheris (-seed=3): shape (0, 17870283321406128128) decoded (no entries), then to_dense: TypeError
    bytes.fromhex("50435350010101000200000000000000" + "00" * 48 + "00000000000000f8"),
    struct.pack("<4sBBBBBBBBIQQQQQ", b"PCSP", 1, 1, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0) + struct.pack("<2Q", 0, 2**63),
])
def test_codec_regressions(data):
    with pytest.raises(InvalidPatch, match="dimension over 2"):
        R.Targets.codec(data)


def test_codec_sparse_tensor_refuses_a_dimension_over_2_to_the_62_even_with_no_entries():
    import numpy as np
    import torch

    from patchctl.patches.codec import SparseTensor

    with pytest.raises(InvalidPatch, match=r"ints in \[0, 2\*\*62\]"):
        SparseTensor((0, 2**64 - 1), torch.float32, np.zeros(0, dtype=np.int64), "ternary", signs=np.zeros(0, bool),
                     scale=1.0)


def test_safetensors_zero_size_tensor_with_large_dims_still_reads(tmp_path):
    f = SafetensorsFile(_st_file(tmp_path, b'{"a":{"dtype":"F32","shape":[0,1099511627776],"data_offsets":[0,0]}}'))
    assert tuple(f.read("a").shape) == (0, 2**40)


def _manifest_doc(**tensor) -> dict:
    t = {"digest": "sha256:" + "ab" * 32, "dtype": "float32", "shape": [2], "encoding": "raw", "size": 8, **tensor}
    return {"schema": 1, "kind": "diff", "base": {"fingerprint": "sha256:" + "0" * 64, "name": "b", "revision": None},
            "tensors": {"w": t}, "params": {}, "lineage": {"parents": [], "recipe": None}, "metadata": {}}


@pytest.mark.parametrize("data", [
    json.dumps(_manifest_doc(dtype=["float32"])).encode(),  # unhashable dtype: was TypeError
    json.dumps(_manifest_doc(dtype={})).encode(),
    json.dumps(_manifest_doc()).replace(" ", "").replace('"size":8', '"size":' + "9" * 5000).encode(),
    json.dumps({**_manifest_doc(), "metadata": {"x": float("nan")}}).encode(),  # to_bytes raised ValueError
    json.dumps({**_manifest_doc(), "params": {"alpha": float("inf")}}).encode(),
    json.dumps({**_manifest_doc(), "metadata": {"x": "\ud800"}}).encode(),  # lone surrogate: UnicodeEncodeError
])
def test_manifest_regressions(data):
    with pytest.raises(InvalidPatch):
        manifest_mod.parse(data)


@pytest.mark.parametrize("cfg", [
    {"peft_type": "LORA", "r": 4, "lora_alpha": float("nan")},
    {"peft_type": "LORA", "r": 4, "lora_alpha": float("inf")},
    {"peft_type": "LORA", "r": 4, "lora_alpha": 10**400},
    {"peft_type": "LORA", "r": 4, "rank_pattern": {"q": True}},
    {"peft_type": "LORA", "r": 4, "rank_pattern": {"q": -2}},
    {"peft_type": "LORA", "r": 4, "rank_pattern": {"q": 2.5}},
    {"peft_type": "LORA", "r": 4, "alpha_pattern": {"q": float("nan")}},
])
def test_peft_config_refuses_non_finite_numbers_and_bad_ranks(cfg):
    with pytest.raises(InvalidPatch):
        check_peft_config(cfg)


@pytest.mark.parametrize("data", [
    b"\x80{}",  # not UTF-8: was AttributeError ('UnicodeDecodeError' object has no attribute 'msg'); atheris
    b'{"peft_type": "LORA", "r": ' + b"1" * 5000 + b"}",  # int > 4300 digits: the same AttributeError
    b"[" * 100_000,  # deep nesting: was RecursionError
])
def test_peft_config_reader_regressions(targets, data):
    with pytest.raises(InvalidPatch, match="adapter_config.json: malformed JSON"):
        targets.peft(data)


def test_peft_config_still_accepts_real_patterns():
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {"q": 4}, "alpha_pattern": {"v": 2.5}}
    assert check_peft_config(cfg) == cfg


def test_pull_of_a_manifest_with_nan_is_refused_and_stores_nothing(tmp_path):
    """A hostile remote manifest whose bytes hash right but hold NaN: was a ValueError after the manifest was
    stored (its index row could not be written); now refused by the parser before anything is written."""
    origin = tmp_path / "origin"
    with Registry(origin) as o:
        d = R.synth_patch(o, None, {"w": R.gaussian(1, 16).tobytes()})
        good = o.store.read_manifest_bytes(d)
        bad = good.replace(b'"metadata":{}', b'"metadata":{"x":NaN}')
        assert bad != good
        bad_digest = "sha256:" + hashlib.sha256(bad).hexdigest()
        p = o.store.manifest_path(bad_digest)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bad)
        from patchctl.registry.store.names import Ref

        o.store.move_ref(Ref("evil", "v1"), bad_digest, "planted")
    with Registry(tmp_path / "dst") as reg:
        with pytest.raises(InvalidPatch, match="canonical"):
            reg.pull("evil:v1", str(origin))
        assert reg.ls() == [] and not any(reg.store.iter_digests("manifests"))
    assert_registry_clean(tmp_path / "dst")


# ---------------------------------------------------------------------------- through `push`


def test_push_answers_every_mutated_input_in_time_and_a_refusal_changes_nothing(tmp_path):
    """240 inputs (60 per kind: diff file, fine-tune folder, adapter weights, adapter config), mutated from
    valid ones; each answered within 5 s (a worker process, killed past the bound); after each refusal the
    manifests, refs, records, index rows and tmp/ as before. Found: a non-string base_model_name_or_path
    (true, NaN, {}) was a TypeError."""
    r = R.push_fuzz(tmp_path, 240, seed=1, time_bound=5.0)
    detail = json.dumps({k: v for k, v in r.items()}, indent=1, default=str)
    t = r["total"]
    assert t["inputs"] == 240, detail
    assert t.get("over the time bound", 0) == 0 and t.get("crashes", 0) == 0, detail
    assert t.get("registry changed by a refused input", 0) == 0, detail
    for kind, row in r["by_kind"].items():  # the mutations reach both outcomes of every kind
        assert row["inputs"] == 60 and row.get("refused", 0) >= 10 and row.get("accepted", 0) >= 1, (kind, detail)
    assert r["slowest_s"] < 5.0 and r["ok"], detail
    assert_registry_clean(tmp_path / "reg")


def test_push_fuzz_enforces_its_time_bound(tmp_path):
    """The bound is real: with a zero bound no push is answered in time, and each counts (the worker is
    killed and restarted). (1 ms was flaky: a warm worker can refuse a malformed input within 1 ms.)"""
    r = R.push_fuzz(tmp_path, 2, seed=2, time_bound=0.0)
    assert r["total"].get("over the time bound", 0) == 2 and not r["ok"], r


@pytest.mark.parametrize("hint", [True, 1.5, {"a": {}}, ["org/model"]])
def test_a_non_string_base_model_name_or_path_is_refused_naming_the_field(hint):
    with pytest.raises(InvalidPatch, match="base_model_name_or_path must be a string"):
        check_peft_config({"peft_type": "LORA", "r": 4, "base_model_name_or_path": hint})


def test_peft_config_reader_refuses_nan_anywhere(targets):
    """NaN under a key nothing checks was stored in the manifest's params: a ValueError (a traceback) when the
    manifest was written, after its blobs (found by the push fuzzer)."""
    with pytest.raises(InvalidPatch, match="adapter_config.json: malformed JSON .*NaN is not JSON"):
        targets.peft(b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "notes": NaN}')


def test_a_base_hint_too_long_for_a_path_is_not_a_crash(tmp_path):
    """base_model_name_or_path of 5,000 characters: `Path.is_dir()` raised OSError (ENAMETOOLONG), a traceback
    with or without --base (found by the push fuzzer)."""
    seeds = R.push_seed_inputs(tmp_path)
    cfg = json.loads(seeds["adapter config"])
    cfg["base_model_name_or_path"] = "/x" + "[" * 5000
    src = R._lay_out(tmp_path / "in", "adapter config", json.dumps(cfg).encode(), seeds)
    with Registry(tmp_path / "reg") as reg:
        assert reg.push(src, "a:v1", base=seeds["base"]).startswith("sha256:")  # the explicit base wins
        with pytest.raises(PatchctlError, match="pass --base"):
            reg.push(src, "a:v2")
    assert_registry_clean(tmp_path / "reg")
