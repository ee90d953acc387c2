"""The merge engine: Registry.merge and `patchctl merge` on real diffs and PEFT adapters.

Expected values are computed here straight from the model folders and adapter
files (not through the registry), in float32/float64.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from patchctl import Registry
from patchctl.errors import (
    BaseMismatch,
    DeviceUnavailable,
    InvalidArgument,
    NotFound,
    ShapeMismatch,
    UnsupportedPatch,
)
from patchctl.registry.formats.checkpoint import Checkpoint
from patchctl.registry.store.manifest import Manifest

from .conftest import snapshot

QUERY0 = "encoder.layer.0.attention.self.query.weight"
LORA_TARGETS = [f"encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")]


@pytest.fixture(scope="module")
def shared(models, tmp_path_factory):
    """A registry with two fine-tune diffs, two PEFT LoRAs, a patch for another base, and two bad patches."""
    root = tmp_path_factory.mktemp("merge")
    with Registry(root / "reg") as reg:
        reg.push(models.finetune, "ft:v1", base=models.base)
        reg.push(models.finetune2, "ft2:v1", base=models.base)
        reg.push(models.lora, "lora:v1", base=models.base)
        reg.push(models.lora_rs, "lorars:v1", base=models.base)
        other = root / "other.safetensors"
        save_file({QUERY0: torch.full((32, 32), 0.01)}, other)
        reg.push(other, "other:v1", base=models.other_base)
        ft = reg.manifest("ft:v1")
        with reg.store.writing():  # not pushable: a diff whose shape does not fit, a LoRA with modules_to_save
            bad = {QUERY0: reg.put_tensor(torch.ones(16, 32))}
            reg.commit(Manifest("diff", ft.base, bad), "badshape:v1")
            lora = reg.manifest("lora:v1")
            extra = "base_model.model.pooler.dense.modules_to_save.default.weight"
            tensors = {**lora.tensors, extra: reg.put_tensor(torch.zeros(32, 32))}
            reg.commit(Manifest("lora", lora.base, tensors, lora.params), "saved:v1")
        yield reg


def deltas_of(reg: Registry, ref: str) -> dict[str, torch.Tensor]:
    v = reg.view(ref)
    return {c.target: v.value(c) for c in v.changes()}


def lora_deltas(folder: Path, scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """ΔW = B @ A · scaling from a PEFT folder, keyed by base tensor name."""
    sd = load_file(folder / "adapter_model.safetensors")
    out = {}
    for t in LORA_TARGETS:
        mod = "base_model.model." + t.removesuffix(".weight")
        out[t] = (sd[mod + ".lora_B.weight"].float() @ sd[mod + ".lora_A.weight"].float()) * scalings[t]
    return out


def lora_expected(models) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    plain = lora_deltas(models.lora, dict.fromkeys(LORA_TARGETS, 8 / 4))
    # rsLoRA alpha/sqrt(r); alpha_pattern {"value": 3}; rank_pattern gives layer.1 value r=2
    rs = {LORA_TARGETS[0]: 8 / math.sqrt(4), LORA_TARGETS[1]: 3 / math.sqrt(4),
          LORA_TARGETS[2]: 8 / math.sqrt(4), LORA_TARGETS[3]: 3 / math.sqrt(2)}
    return plain, lora_deltas(models.lora_rs, rs)


# -- 1. task arithmetic ---------------------------------------------------------------
def test_task_arithmetic_equals_base_plus_weighted_task_vectors(shared, models, tmp_path):
    res = shared.merge(["ft:v1", "ft2:v1"], "ta:v1", weights=[0.7, 0.3], params={"lambda": 0.8},
                       apply_to=tmp_path / "full", base=models.base)
    assert res.manifest.kind == "diff" and res.manifest.parents == (shared.resolve("ft:v1"), shared.resolve("ft2:v1"))
    assert res.recipe == {"op": "merge", "method": "task_arithmetic", "weights": [0.7, 0.3],
                          "params": {"lambda": 0.8}, "overrides": [], "lines": None,
                          "output": {"kind": "diff"}, "dtype": "float32", "seed": 0}
    base, ft, ft2 = Checkpoint(models.base), Checkpoint(models.finetune), Checkpoint(models.finetune2)
    out, merged = Checkpoint(tmp_path / "full"), deltas_of(shared, "ta:v1")
    for name in base.names():
        b = base.read(name).double()
        tau = 0.7 * (ft.read(name).double() - b) + 0.3 * (ft2.read(name).double() - b)
        torch.testing.assert_close(out.read(name).double(), b + 0.8 * tau, rtol=0, atol=1e-6)
        if name in merged:
            torch.testing.assert_close(merged[name].double(), 0.8 * tau, rtol=1e-6, atol=1e-8)
        else:  # changed by neither fine-tune: not in the diffs, not in the merge
            assert not tau.any(), name


def test_cli_merge_gives_the_library_digest_and_log_shows_lineage(shared, cli):
    lib = shared.merge(["ft:v1", "ft2:v1"], "ta:v1", weights=[0.7, 0.3], params={"lambda": 0.8})
    r = cli("merge", "ft:v1", "ft2:v1", "--weights", "0.7,0.3", "--lambda", "0.8", "--as", "ta:cli", "--json",
            "-R", shared.path, registry=False)
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["digest"] == lib.digest and doc["recipe"] == lib.recipe and doc["kind"] == "diff"
    human = cli("merge", "ft:v1", "ft2:v1", "--weights", "0.7,0.3", "--lambda", "0.8", "--as", "ta:cli2",
                "-R", shared.path, registry=False)
    assert human.code == 0 and lib.digest in human.out and '"method": "task_arithmetic"' in human.out
    log = cli("log", "ta:cli", "-R", shared.path, registry=False)
    assert log.code == 0 and "merge task_arithmetic" in log.out
    assert "ft:v1" in log.out and "ft2:v1" in log.out and "import" in log.out


def test_cli_recipe_file_with_flags_overriding_it(shared, cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("inputs: [ft:v1, ft2:v1]\nmethod: ties\nweights: [1, 1]\n"
                      "params: {density: 0.5, lambda: 1.0}\n"
                      "overrides: ['layer\\.1\\.:density=1.0']\nseed: 4\n")
    r = cli("merge", "--recipe", recipe, "--weights", "0.6,0.4", "--as", "rec:v1", "--json",
            "-R", shared.path, registry=False)
    assert r.code == 0, r.err
    lib = shared.merge(["ft:v1", "ft2:v1"], method="ties", weights=[0.6, 0.4], params={"density": 0.5},
                       overrides=[(r"layer\.1\.", {"density": 1.0})], seed=4)
    assert json.loads(r.out)["digest"] == lib.digest
    assert lib.recipe["overrides"] == [{"pattern": r"layer\.1\.", "params": {"density": 1.0}}]


def test_override_sets_lambda_per_tensor(shared):
    plain = deltas_of(shared, shared.merge(["ft:v1", "ft2:v1"]).digest)
    res = shared.merge(["ft:v1", "ft2:v1"], overrides=[(r"^embeddings\.", {"lambda": 0.0})])
    got = deltas_of(shared, res.digest)
    for name, d in got.items():
        assert torch.equal(d, torch.zeros_like(d) if name.startswith("embeddings.") else plain[name]), name


# -- 2. LoRA inputs -------------------------------------------------------------------
def test_lora_merge_is_exactly_the_weighted_sum_of_scaled_products(shared, models):
    plain, rs = lora_expected(models)
    res = shared.merge(["lora:v1", "lorars:v1"], "lm:v1", weights=[0.5, 2.0])
    got = deltas_of(shared, "lm:v1")
    assert res.manifest.kind == "diff" and sorted(got) == LORA_TARGETS
    for t in LORA_TARGETS:
        assert got[t].dtype == torch.float32
        assert torch.equal(got[t], 0.5 * plain[t] + 2.0 * rs[t]), t


def test_lora_cat_exports_as_peft_and_matches_the_diff_merge(shared, models, tmp_path):
    from peft import PeftModel
    from transformers import BertModel

    diff = deltas_of(shared, shared.merge(["lora:v1", "lorars:v1"], weights=[0.5, 2.0]).digest)
    res = shared.merge(["lora:v1", "lorars:v1"], "lc:v1", weights=[0.5, 2.0], as_lora="cat")
    p = res.manifest.params
    assert (p["peft_type"], p["r"], p["lora_alpha"], p["use_rslora"], p["fan_in_fan_out"]) == ("LORA", 8, 8, False, False)
    assert p["rank_pattern"] == p["alpha_pattern"] == {r"encoder\.layer\.1\.attention\.self\.value": 6}
    assert sorted(p["target_modules"]) == [t.removesuffix(".weight") for t in LORA_TARGETS]
    shared.export("lc:v1", tmp_path / "peft", "peft")
    base = BertModel.from_pretrained(models.base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, tmp_path / "peft").merge_and_unload().state_dict()
    for name, value in merged.items():
        expected = before[name] + diff[name] if name in diff else before[name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def test_lora_svd_reports_its_error(shared, models):
    exact = deltas_of(shared, shared.merge(["lora:v1", "lorars:v1"]).digest)
    full = shared.merge(["lora:v1", "lorars:v1"], "ls:v32", as_lora="svd", rank=32)
    assert full.rel_error is not None and full.rel_error < 1e-6
    assert full.manifest.metadata["svd"]["rel_error"] == full.rel_error
    for t, d in deltas_of(shared, "ls:v32").items():
        torch.testing.assert_close(d, exact[t], rtol=1e-4, atol=1e-6)
    low = shared.merge(["lora:v1", "lorars:v1"], "ls:v2", as_lora="svd", rank=2)
    approx = deltas_of(shared, "ls:v2")
    tail = sum(float((exact[t].double() - approx[t].double()).square().sum()) for t in exact)
    total = sum(float(exact[t].double().square().sum()) for t in exact)
    assert 0.01 < low.rel_error < 1
    assert low.rel_error == pytest.approx(math.sqrt(tail / total), rel=1e-3)
    assert set(low.tensor_errors) == set(LORA_TARGETS) and low.manifest.params["r"] == 2


# -- 3. determinism -------------------------------------------------------------------
def test_merge_is_deterministic_in_process_and_across_processes(shared):
    code = ("from patchctl import Registry; "
            f"r = Registry({str(shared.path)!r}); "
            "print(r.merge(['ft:v1', 'ft2:v1'], method='dare_ties', params={'density': 0.5}, seed=3).digest)")
    # started first so that its imports overlap the merges below (a concurrent writer is fine)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kw = {"method": "dare_ties", "params": {"density": 0.5}, "seed": 3}
    a = shared.merge(["ft:v1", "ft2:v1"], "dt:a", **kw).digest
    assert shared.merge(["ft:v1", "ft2:v1"], "dt:b", **kw).digest == a
    assert shared.merge(["ft:v1", "ft2:v1"], **{**kw, "seed": 4}).digest != a
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == a


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_apply_in_one_pass_equals_the_stored_patch_applied_later(shared, models, tmp_path, method):
    kw = {"method": method, "weights": [0.7, 0.3], "lines": 0.5}
    fused = shared.merge(["ft:v1", "ft2:v1"], "fused:v1", apply_to=tmp_path / "fused", base=models.base, **kw)
    alone = shared.merge(["ft:v1", "ft2:v1"], "alone:v1", **kw)
    assert fused.digest == alone.digest and fused.applied == tmp_path / "fused"
    later = shared.apply(fused.digest, models.base, tmp_path / "later")
    names = sorted(p.name for p in (tmp_path / "fused").iterdir())
    assert names == sorted(p.name for p in later.iterdir()) and any(n.endswith(".safetensors") for n in names)
    for n in names:
        assert (tmp_path / "fused" / n).read_bytes() == (later / n).read_bytes(), n


def test_apply_without_direct_io_writes_the_same_model_and_patch(shared, models, tmp_path, monkeypatch):
    kw = {"weights": [0.7, 0.3]}
    direct = shared.merge(["ft:v1", "ft2:v1"], apply_to=tmp_path / "direct", base=models.base, **kw)
    _refuse_direct_io(monkeypatch)
    plain = shared.merge(["ft:v1", "ft2:v1"], apply_to=tmp_path / "plain", base=models.base, **kw)
    assert plain.digest == direct.digest
    for p in (tmp_path / "direct").iterdir():
        assert (tmp_path / "plain" / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.parametrize("verifier", ["process", "thread"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_corrupt_input_blob_stops_the_merge_with_no_model_and_no_ref(models, tmp_path, monkeypatch, damage, verifier):
    from patchctl.errors import DigestMismatch, InvalidPatch

    if verifier == "thread":  # no interpreter to start the verifier's process with: a thread checks instead
        monkeypatch.setattr(sys, "executable", "")

    with Registry(tmp_path / "reg") as reg:
        reg.push(models.finetune, "ft:v1", base=models.base)
        reg.push(models.finetune2, "ft2:v1", base=models.base)
        entry = max(reg.manifest("ft2:v1").tensors.values(), key=lambda e: e.size)
        path = reg.store.blob_path(entry.digest)
        path.chmod(0o644)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data) if damage == "flip" else bytes(data[:-2]))
        if damage == "remove":
            path.unlink()
        error, match = {"flip": (DigestMismatch, f"object {entry.digest} is corrupt"),
                        "truncate": (InvalidPatch, f"blob {entry.digest} does not have the {entry.size} bytes"),
                        "remove": (NotFound, f"object {entry.digest} is not in the registry")}[damage]
        with pytest.raises(error, match=match):
            reg.merge(["ft:v1", "ft2:v1"], "m:v1", apply_to=tmp_path / "out", base=models.base)
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if "patchctl-tmp" in p.name]
        with pytest.raises(NotFound):
            reg.resolve("m:v1")


def _refuse_direct_io(monkeypatch) -> None:
    """Make every DirectFile fall back to plain writes, as on a filesystem without O_DIRECT."""
    import fcntl

    real = fcntl.fcntl

    def fake(fd, cmd, *args):
        if cmd == fcntl.F_SETFL:
            raise OSError(22, "Invalid argument")
        return real(fd, cmd, *args)

    monkeypatch.setattr(fcntl, "fcntl", fake)


@pytest.mark.parametrize("direct", [True, False])
def test_direct_file_writes_exactly_the_bytes_given_whatever_their_alignment(tmp_path, monkeypatch, direct):
    from patchctl.registry.ops.merging.stream import Buffers
    from patchctl.registry.store.folder import DirectFile

    if not direct:
        _refuse_direct_io(monkeypatch)
    monkeypatch.setattr(DirectFile, "_free", [])
    monkeypatch.setattr(DirectFile, "CHUNK", 1 << 16)  # several staging buffers' worth below
    g = torch.Generator().manual_seed(3)
    bufs = Buffers()
    pieces: list[bytes] = []
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    f = DirectFile(fd)
    assert f.fileno() == fd and not f.closed

    def write(data) -> None:
        pieces.append(bytes(data))
        f.write(data)

    staged = [0]
    stage = DirectFile._stage
    monkeypatch.setattr(DirectFile, "_stage", lambda self, src: (staged.__setitem__(0, staged[0] + len(src)),
                                                                 stage(self, src))[1])
    write(b"h" * 100)  # a header: staged
    for aligned, n in [(True, 40_000), (False, 3), (True, 70_001), (True, 0), (False, 1 << 17), (True, 1 << 17)]:
        size = sum(map(len, pieces))
        # aligned: the address is congruent to the file offset (written straight from memory); else off by 2
        t = bufs.get(f"b{n}", torch.uint8, (n,), lead=size if aligned else size + 2)
        t.copy_(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8))
        write(memoryview(t.numpy()))
    write(bytearray(b"tail"))
    f.close()
    assert f.closed
    total = sum(map(len, pieces))
    assert (tmp_path / "f").stat().st_size == total
    if direct and f.direct:
        assert staged[0] < total - 200_000  # the aligned tensors did not go through the staging buffer
    else:
        assert staged[0] == 0 and not f.direct
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_combine_in_chunks_into_out_equals_the_whole_tensor_sum(dtype, monkeypatch):
    from patchctl.patches import apply

    g = torch.Generator().manual_seed(2)
    base = torch.randn(53, 31, generator=g).to(dtype)
    delta = (torch.randn(53, 31, generator=g) * 1e-3).to(torch.bfloat16)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = (base.to(acc) + delta.to(acc)).to(dtype)
    monkeypatch.setattr(apply, "_CHUNK", 64)
    out = torch.empty_like(base)
    assert apply.combine(base, delta, out=out) is out
    assert torch.equal(out.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8))
    assert torch.equal(apply.combine(base, delta), expected)


# -- 4. LiNeS -------------------------------------------------------------------------
def test_lines_auto_scales_embeddings_and_first_layer_by_alpha_last_by_alpha_plus_beta(shared):
    plain = deltas_of(shared, shared.merge(["ft:v1", "ft2:v1"]).digest)
    res = shared.merge(["ft:v1", "ft2:v1"], "lines:v1", lines="auto", lines_beta=0.25)
    lines = res.recipe["lines"]
    # task arithmetic with λ = 1 and unit weights: the merged vector is Στᵢ, so α = 1/T
    assert lines == {"alpha": "auto", "beta": 0.25, "resolved_alpha": pytest.approx(0.5, rel=1e-12), "num_blocks": 2}
    alpha = lines["resolved_alpha"]
    got = deltas_of(shared, "lines:v1")
    assert sorted(got) == sorted(plain)
    for name, d in got.items():
        scale = alpha + 0.25 if name.startswith("encoder.layer.1.") else alpha  # embeddings and layer 0: α
        assert torch.equal(d, plain[name] * scale), name


def test_lines_fixed_alpha_defaults_beta_to_one_minus_alpha(shared):
    plain = deltas_of(shared, shared.merge(["ft:v1", "ft2:v1"]).digest)
    res = shared.merge(["ft:v1", "ft2:v1"], lines=0.25)
    assert res.recipe["lines"] == {"alpha": 0.25, "beta": 0.75, "resolved_alpha": 0.25, "num_blocks": 2}
    got = deltas_of(shared, res.digest)
    assert torch.equal(got["encoder.layer.1.output.dense.weight"], plain["encoder.layer.1.output.dense.weight"])
    assert torch.equal(got["embeddings.LayerNorm.weight"], plain["embeddings.LayerNorm.weight"] * 0.25)


# -- 5. mixed inputs ------------------------------------------------------------------
def test_lora_and_diff_merge_missing_targets_count_as_zero(shared, models):
    plain, _ = lora_expected(models)
    tau = deltas_of(shared, "ft:v1")
    res = shared.merge(["lora:v1", "ft:v1"], "mix:v1", weights=[1.0, 0.5])
    got = deltas_of(shared, "mix:v1")
    assert res.manifest.kind == "diff" and sorted(got) == sorted(tau)
    for name, d in got.items():
        expected = plain[name] + 0.5 * tau[name] if name in plain else 0.5 * tau[name]
        torch.testing.assert_close(d, expected, rtol=1e-6, atol=1e-7)


def test_mixed_svd_leaves_out_1d_tensors_and_counts_them_in_the_error(shared):
    res = shared.merge(["lora:v1", "ft:v1"], as_lora="svd", rank=32)
    svd = res.manifest.metadata["svd"]
    assert "embeddings.LayerNorm.bias" in svd["dropped"] and svd["tensor_rel_errors"]["embeddings.LayerNorm.bias"] == 1.0
    assert "base_model.model.embeddings.word_embeddings.lora_embedding_A" in res.manifest.tensors
    assert 0 < res.rel_error < 1


def test_sparse_input_merges_as_its_dense_decoding(shared):
    from patchctl.patches import codec
    from patchctl.patches.compress import sparsify
    from patchctl.registry.store.manifest import TensorEntry

    tau = deltas_of(shared, "ft:v1")
    names = [n for n in sorted(tau) if n.startswith("encoder.layer.1.attention.")]
    ft = shared.manifest("ft:v1")
    with shared.store.writing():
        entries = {}
        for name, sp in sparsify(lambda: ((n, tau[n]) for n in names), 0.3, mode="values", values_dtype=torch.float32):
            data = codec.encode(sp)
            entries[name] = TensorEntry(shared.store.put_blob(data), "float32", tuple(tau[name].shape), "sparse-v1", len(data))
        shared.commit(Manifest("sparse", ft.base, entries), "sp:v1")
    dense = deltas_of(shared, "sp:v1")
    res = shared.merge(["sp:v1", "ft2:v1"], weights=[1.0, 0.5])
    got, tau2 = deltas_of(shared, res.digest), deltas_of(shared, "ft2:v1")
    assert res.recipe["dtype"] == "float32" and sorted(got) == sorted(tau2)
    for name, d in got.items():
        expected = dense[name] + 0.5 * tau2[name] if name in dense else 0.5 * tau2[name]
        assert torch.equal(d, expected), name


# -- 6. bad inputs: one clear line, nothing written -------------------------------------
BAD = [
    ("different bases", ["ft:v1", "other:v1"], {}, [], BaseMismatch, "other:v1 is for base 'other_base'"),
    ("shapes", ["ft:v1", "badshape:v1"], {}, [], ShapeMismatch,
     f"shapes differ: {QUERY0}: [32, 32] in ft:v1 vs [16, 32] in badshape:v1"),
    ("unknown method", ["ft:v1", "ft2:v1"], {"method": "soup"}, ["--method", "soup"], InvalidArgument,
     "unknown merge method 'soup'; choose one of: linear, task_arithmetic"),
    ("weights count", ["ft:v1", "ft2:v1"], {"weights": [1.0, 1.0, 1.0]}, ["--weights", "1,1,1"], InvalidArgument,
     "3 weight(s) for 2 patch(es); give one weight per patch"),
    ("density", ["ft:v1", "ft2:v1"], {"method": "ties", "params": {"density": 1.5}},
     ["--method", "ties", "--density", "1.5"], InvalidArgument, "density must be in (0, 1], got 1.5"),
    ("one patch", ["ft:v1"], {"method": "ties"}, ["--method", "ties"], InvalidArgument,
     "merge method 'ties' needs at least 2 inputs, got 1"),
    ("cat non-linear", ["lora:v1", "lorars:v1"], {"method": "ties", "as_lora": "cat"},
     ["--method", "ties", "--as-lora", "cat"], InvalidArgument,
     "--as-lora cat is exact only for methods linear in their inputs (task_arithmetic, linear), not 'ties'"),
    ("cuda absent", ["ft:v1", "ft2:v1"], {"device": "cuda"}, ["--device", "cuda"], DeviceUnavailable,
     "device 'cuda' was asked for but no CUDA device is present; use --device cpu"),
    ("replace", ["lora:v1", "saved:v1"], {}, [], UnsupportedPatch, "saved:v1 replaces whole tensors (pooler.dense.weight"),
    ("all at once", ["ft:v1", "ft2:v1"], {"weights": [1.0], "dtype": "float7", "as_lora": "svd"},
     ["--weights", "1", "--dtype", "float7", "--as-lora", "svd"], InvalidArgument, "cannot merge (3 problems): "),
]


@pytest.mark.parametrize(("inputs", "kwargs", "flags", "exc", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_merge_is_one_clear_error_and_writes_nothing(shared, cli, monkeypatch, inputs, kwargs, flags, exc, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = snapshot(shared.path)
    with pytest.raises(exc) as info:
        shared.merge(inputs, "bad:v1", **kwargs)
    assert message in str(info.value)
    r = cli("merge", *inputs, *flags, "--as", "bad:v1", "-R", shared.path, registry=False)
    assert r.code != 0 and r.out == ""
    assert r.err.startswith("error: cannot merge") and message in r.err and r.err.count("\n") == 1, r.err
    assert snapshot(shared.path) == before


# -- on a GPU (issue #21): `pytest -m cuda` runs these where CUDA is present -----------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", [{}, {"method": "ties", "params": {"density": 0.3}}])
def test_merge_on_cuda_stores_the_cpu_merge_and_writes_the_same_model(shared, models, tmp_path, method):
    from patchctl.patches.device import resolve

    assert resolve("auto") == "cuda"  # `--device auto` takes the GPU when one is present
    digests, shards = {}, {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        res = shared.merge(["ft:v1", "ft2:v1"], f"gpu-{device}:v1", weights=[0.5, 0.5], device=device,
                           apply_to=out, base=models.base, validate=False, **method)
        assert res.device.startswith(device)
        digests[device] = res.digest
        shards[device] = {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}
    assert digests["cpu"] == digests["cuda"]  # the device is not in the recipe: the same patch
    assert shards["cpu"] == shards["cuda"]
