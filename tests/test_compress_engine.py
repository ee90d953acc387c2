"""The compression engine: Registry.compress and `patchctl compress` on real diffs and PEFT adapters.

Expected values come straight from the stored source patch and
:func:`patchctl.patches.compress.sparsify` (the pure math, tested on its own in
test_compress.py), or from the adapter's factors with their PEFT scalings.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from patchctl import Registry
from patchctl.errors import InvalidArgument, InvalidPatch, NotFound, UnsupportedPatch
from patchctl.patches import codec
from patchctl.patches.compress import entropy_bound_bits, relative_l2_error, sparsify
from patchctl.registry.formats.checkpoint import Checkpoint
from patchctl.registry.store.manifest import Manifest
from patchctl.registry.store.names import parse_ref

from .conftest import snapshot

KEY0 = "encoder.layer.0.attention.self.key.weight"
QUERY0 = "encoder.layer.0.attention.self.query.weight"
LORA_TARGETS = [f"encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")]
# models.lora_rs: rsLoRA alpha/sqrt(r); alpha_pattern {"value": 3}; rank_pattern gives layer.1 value r = 2
RS_SCALINGS = {LORA_TARGETS[0]: 8 / math.sqrt(4), LORA_TARGETS[1]: 3 / math.sqrt(4),
               LORA_TARGETS[2]: 8 / math.sqrt(4), LORA_TARGETS[3]: 3 / math.sqrt(2)}
EXTRA = "base_model.model.pooler.dense.modules_to_save.default.weight"


@pytest.fixture(scope="module")
def shared(models, tmp_path_factory):
    """Diffs and LoRAs of the small real models, plus patches with NaN, Inf, a huge value, a replacement."""
    root = tmp_path_factory.mktemp("compress")
    with Registry(root / "reg") as reg:
        reg.push(models.finetune, "ft:v1", base=models.base)
        reg.push(models.finetune2, "ft2:v1", base=models.base)
        reg.push(models.lora, "lora:v1", base=models.base)
        reg.push(models.lora_rs, "lorars:v1", base=models.base)
        for tag, bad in (("nan", math.nan), ("inf", -math.inf), ("huge", 1e5)):
            q = torch.full((32, 32), 0.01)
            q[3, 4] = bad
            f = root / f"{tag}.safetensors"  # KEY0 sorts first and is fine: the bad tensor comes second
            save_file({KEY0: torch.full((32, 32), 0.02), QUERY0: q}, f)
            if math.isfinite(bad):
                reg.push(f, f"{tag}:v1", base=models.base)
            else:  # push refuses non-finite values now: store it as a patch from before that rule would be
                good = reg.manifest("ft:v1")
                with reg.store.writing():
                    tensors = {KEY0: reg.put_tensor(torch.full((32, 32), 0.02)), QUERY0: reg.put_tensor(q)}
                    reg.commit(Manifest("diff", good.base, tensors, {}), f"{tag}:v1")
        lora = reg.manifest("lora:v1")
        with reg.store.writing():  # a LoRA that also replaces a tensor (modules_to_save)
            tensors = {**lora.tensors, EXTRA: reg.put_tensor(torch.ones(32, 32))}
            reg.commit(Manifest("lora", lora.base, tensors, lora.params), "saved:v1")
        yield reg


def stored(reg: Registry, ref: str) -> dict[str, torch.Tensor]:
    """The patch's stored tensors (not the adapter files a PEFT push keeps under ``file:``)."""
    v = reg.view(ref)
    return {k: v.tensor(k) for k in sorted(v.m.tensors) if not k.startswith("file:")}


def deltas_of(reg: Registry, ref: str) -> dict[str, torch.Tensor]:
    v = reg.view(ref)
    return {c.target: v.value(c) for c in v.changes()}


def expected_sparse(tensors: dict[str, torch.Tensor], density: float, **kw) -> dict[str, codec.SparseTensor]:
    return dict(sparsify(lambda: iter(sorted(tensors.items())), density, **kw))


# -- 1. diffs -------------------------------------------------------------------------
def test_compress_diff_is_sparsify_of_the_stored_delta_with_lineage_recipe_and_report(shared):
    res = shared.compress("ft:v1", density=0.2, kappa=2.0)
    m, src = res.manifest, shared.manifest("ft:v1")
    assert res.ref == "ft:v1-d0.2" and shared.resolve("ft:v1-d0.2") == res.digest == m.digest
    assert m.kind == "sparse" and m.parents == (shared.resolve("ft:v1"),) and m.base == src.base
    assert m.params == {"density": 0.2, "mode": "ternary", "source_kind": "diff"}
    assert res.recipe == {"op": "compress", "density": 0.2, "mode": "ternary", "scale": "std", "kappa": 2.0,
                          "per_tensor": False, "seed": None, "target": "delta", "values_dtype": None}
    tau = stored(shared, "ft:v1")
    want = expected_sparse(tau, 0.2, kappa=2.0)
    assert sorted(m.tensors) == sorted(tau)
    for name, e in m.tensors.items():
        data = codec.encode(want[name])
        assert (e.encoding, e.dtype, e.shape, e.size) == ("sparse-v1", src.tensors[name].dtype, tuple(tau[name].shape), len(data))
        assert shared.store.read_blob(e.digest) == data, name
        assert e.pins is None  # pins belong to the exact diff
    rep = res.report
    numel = sum(t.numel() for t in tau.values())
    nnz = sum(sp.nnz for sp in want.values())
    assert (rep["numel"], rep["nnz"], rep["stored_bytes"], rep["dense_fp16_bytes"]) == (numel, nnz, m.stored_bytes, 2 * numel)
    assert abs(rep["kept"] - 0.2) < 0.01
    assert rep["ratio_fp16"] == pytest.approx(2 * numel / m.stored_bytes, rel=1e-5)
    assert rep["bits_per_param"] == pytest.approx(8 * m.stored_bytes / numel, rel=1e-5)
    bound = sum(sp.numel * entropy_bound_bits(sp.nnz / sp.numel) for sp in want.values()) / numel
    assert rep["bound_bits_per_param"] == pytest.approx(bound, rel=1e-5)
    for name, sp in want.items():
        assert rep["tensors"][name]["nnz"] == sp.nnz
        assert rep["tensors"][name]["rel_error"] == pytest.approx(relative_l2_error(tau[name], sp), rel=1e-5)
    total = math.sqrt(sum(relative_l2_error(tau[n], sp) ** 2 * float(tau[n].double().square().sum()) for n, sp in want.items())
                      / sum(float(t.double().square().sum()) for t in tau.values()))
    assert rep["rel_error"] == pytest.approx(total, rel=1e-5) and 0 < rep["rel_error"] < 1.5
    assert rep["uncompressed"] == [] and "delta_rel_error" not in rep


@pytest.mark.parametrize(("kw", "tag"), [({"mode": "values"}, "ft:v1-d0.3-values"), ({"mode": "dare", "seed": 7}, "ft:v1-d0.3-dare"),
                                         ({"scale": "mean", "per_tensor": True}, "ft:v1-d0.3")])
def test_compress_modes_match_sparsify(shared, kw, tag):
    res = shared.compress("ft:v1", density=0.3, **kw)
    assert res.ref == tag
    want = expected_sparse(stored(shared, "ft:v1"), 0.3, **kw)
    got = stored(shared, res.digest)
    for name, sp in want.items():
        assert torch.equal(got[name], codec.to_dense(sp)), name


# -- 2. LoRA ---------------------------------------------------------------------------
def test_compress_lora_factors_keeps_peft_keys_and_reads_as_a_lora(shared):
    res = shared.compress("lorars:v1", "lorars:sparse", density=0.5, mode="values", values_dtype="float32",
                          per_tensor=True, lora_delta=False)
    m, src = res.manifest, shared.manifest("lorars:v1")
    # every tensor, compressed; the adapter's kept files (file:adapter_config.json, ...) describe the source, not this
    assert sorted(m.tensors) == sorted(k for k in src.tensors if not k.startswith("file:"))
    assert all(e.encoding == "sparse-v1" for e in m.tensors.values())
    assert m.params == {**src.params, "source_kind": "lora"}
    assert res.recipe["target"] == "factors" and res.recipe["per_tensor"] is True
    factors = stored(shared, "lorars:v1")
    want = expected_sparse(factors, 0.5, mode="values", values_dtype=torch.float32, per_tensor=True)
    dec = {k: codec.to_dense(sp) for k, sp in want.items()}
    got = deltas_of(shared, "lorars:sparse")
    assert sorted(got) == LORA_TARGETS
    for t in LORA_TARGETS:
        mod = "base_model.model." + t.removesuffix(".weight")
        expected = (dec[mod + ".lora_B.weight"] @ dec[mod + ".lora_A.weight"]) * RS_SCALINGS[t]
        torch.testing.assert_close(got[t], expected, rtol=1e-6, atol=1e-8)
    rep = res.report
    assert sorted(rep["delta_rel_errors"]) == LORA_TARGETS and 0 < rep["delta_rel_error"] < 1
    src_d = deltas_of(shared, "lorars:v1")
    t = LORA_TARGETS[3]
    assert rep["delta_rel_errors"][t] == pytest.approx(
        float((got[t] - src_d[t]).norm() / src_d[t].norm()), rel=1e-4)


def test_compress_lora_delta_is_a_sparse_diff_of_the_product(shared):
    res = shared.compress("lora:v1", "lora:dw", density=0.3, lora_delta=True, mode="values", values_dtype="float32")
    m = res.manifest
    assert sorted(m.tensors) == LORA_TARGETS and m.params["source_kind"] == "diff"
    assert res.recipe["target"] == "delta" and all(e.dtype == "float32" for e in m.tensors.values())
    want = expected_sparse(deltas_of(shared, "lora:v1"), 0.3, mode="values", values_dtype=torch.float32)
    got = deltas_of(shared, "lora:dw")
    for t, sp in want.items():
        assert torch.equal(got[t], codec.to_dense(sp)), t


def test_compress_lora_keeps_replaced_tensors_as_stored(shared):
    res = shared.compress("saved:v1", "saved:sp", density=0.5, lora_delta=False, force=True)
    src = shared.manifest("saved:v1")
    assert res.manifest.tensors[EXTRA] == src.tensors[EXTRA] and res.report["uncompressed"] == [EXTRA]
    ops = {c.target: c.op for c in shared.view("saved:sp").changes()}
    assert ops["pooler.dense.weight"] == "replace" and all(ops[t] == "add" for t in LORA_TARGETS)


# -- 3. every other command takes a sparse patch ------------------------------------------
@pytest.mark.parametrize("source", ["ft:v1", "lorars:v1"])
def test_apply_of_a_compressed_patch_is_base_plus_decoded_delta(shared, models, tmp_path, source):
    res = shared.compress(source, "applied:sp", density=0.3, kappa=3.0)
    base, view = Checkpoint(models.base), shared.view(res.digest)
    deltas = {base.resolve(c.target): view.value(c) for c in view.changes()}
    shared.apply(res.digest, models.base, tmp_path / "out")
    out = Checkpoint(tmp_path / "out")
    assert sorted(out.names()) == sorted(base.names())
    for name in base.names():
        b = base.read(name)
        expected = (b.float() + deltas[name].float()).to(b.dtype) if name in deltas else b
        assert torch.equal(out.read(name), expected), name


def test_export_of_a_compressed_patch_as_diff(shared, tmp_path):
    diff = shared.compress("ft:v1", "exp:diff", density=0.3)
    assert shared.export("exp:diff", tmp_path / "d.safetensors") == tmp_path / "d.safetensors"
    got, want = load_file(tmp_path / "d.safetensors"), deltas_of(shared, "exp:diff")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert got[QUERY0].dtype == torch.float32 and diff.manifest.tensors[QUERY0].dtype == "float32"
    shared.compress("lora:v1", "exp:lora", density=0.3)  # sparse factors export as their ΔW
    shared.export("exp:lora", tmp_path / "l.safetensors")
    got, want = load_file(tmp_path / "l.safetensors"), deltas_of(shared, "exp:lora")
    assert sorted(got) == LORA_TARGETS and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(InvalidArgument, match=r"only LoRA patches export as PEFT folders; this one is a sparse \(use --format diff\)"):
        shared.export("exp:lora", tmp_path / "peft", format="peft")


def test_merge_takes_sparse_inputs_as_their_dense_decoding(shared):
    shared.compress("ft:v1", "m:sp", density=0.3, mode="values", values_dtype="float32")
    dense, tau2 = deltas_of(shared, "m:sp"), deltas_of(shared, "ft2:v1")
    res = shared.merge(["m:sp", "ft2:v1"], weights=[1.0, 0.5])
    got = deltas_of(shared, res.digest)
    assert sorted(got) == sorted(tau2)
    for name, d in got.items():
        expected = dense[name] + 0.5 * tau2[name] if name in dense else 0.5 * tau2[name]
        assert torch.equal(d, expected), name
    shared.compress("lora:v1", "m:lora", density=0.5)  # sparse LoRA factors merge as their ΔW
    lora_d = deltas_of(shared, "m:lora")
    got = deltas_of(shared, shared.merge(["m:lora", "ft2:v1"]).digest)
    for t in LORA_TARGETS:
        torch.testing.assert_close(got[t], lora_d[t] + tau2[t], rtol=1e-6, atol=1e-8)


# -- 4. CLI: compress and show ---------------------------------------------------------
def test_cli_compress_gives_the_library_digest_and_show_reports_it(shared, cli):
    lib = shared.compress("ft:v1", "lib:v1", density=0.2, kappa=2.0)
    r = cli("compress", "ft:v1", "--density", "0.2", "--kappa", "2", "--json", "-R", shared.path, registry=False)
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["digest"] == lib.digest and doc["ref"] == "ft:v1-d0.2" and doc["kind"] == "sparse"
    assert doc["recipe"] == lib.recipe and doc["parents"] == [shared.resolve("ft:v1")]
    assert doc["report"]["bits_per_param"] == lib.report["bits_per_param"]
    human = cli("compress", "ft:v1", "--density", "0.2", "--kappa", "2", "--as", "cli:h", "-R", shared.path, registry=False)
    assert human.code == 0 and lib.digest in human.out and '"op": "compress"' in human.out
    rep = lib.report
    show = cli("show", "cli:h", "--tensors", "-R", shared.path, registry=False)
    assert show.code == 0, show.err
    assert f"compress  ternary, density 0.2: kept {rep['nnz']:,} of {rep['numel']:,}" in show.out
    assert f"{rep['ratio_fp16']:.1f}× smaller; {rep['bits_per_param']:.4f} bits/param" in show.out
    assert f"random-support bound {rep['bound_bits_per_param']:.4f}" in show.out
    assert f"relative L2 error {rep['rel_error']:.4f}" in show.out
    assert "REL.ERR" in show.out and "metadata" not in show.out
    js = json.loads(cli("show", "cli:h", "--json", "-R", shared.path, registry=False).out)
    assert js["metadata"]["compression"] == rep and js["lineage"]["recipe"] == lib.recipe
    lora = cli("compress", "lora:v1", "--density", "0.5", "--factors", "--force", "-R", shared.path, registry=False)
    assert lora.code == 0 and "on ΔW" in lora.out


def test_cli_warns_when_compressed_lora_factors_lose_most_of_the_update(shared, cli):
    # a global threshold over A and B keeps (almost) only A: ΔW is mostly lost -> the hint, and no tag moves
    latest = shared.resolve("lora:latest")
    lost = cli("compress", "lora:v1", "--density", "0.1", "--factors", "--as", "warn:f", "-R", shared.path,
               registry=False)
    assert lost.code == 3, lost.err
    digest = lost.out.split("(not tagged) ")[1].split()[0]
    rep = shared.manifest(digest).metadata["compression"]
    assert rep["delta_rel_error"] >= 0.5 and rep["direction_kept"] < 0.2
    assert f"warning: the sparse A/B factors lose most of the update (ΔW error {rep['delta_rel_error']:.2f})" in lost.out
    assert "not tagged:" in lost.err and "--force" in lost.err and lost.err.count("\n") == 1
    assert shared.store.ref_target(parse_ref("warn:f")) is None and shared.resolve("lora:latest") == latest
    assert "without --factors" in cli("show", digest, "-R", shared.path, registry=False).out
    forced = cli("compress", "lora:v1", "--density", "0.1", "--factors", "--force", "--as", "warn:f", "-R",
                 shared.path, registry=False)
    assert forced.code == 0 and shared.resolve("warn:f") == digest
    kept = cli("compress", "lora:v1", "--density", "0.9", "--mode", "values", "--per-tensor", "--factors",
               "--as", "warn:v", "-R", shared.path, registry=False)
    assert kept.code == 0 and shared.manifest("warn:v").metadata["compression"]["delta_rel_error"] < 0.5
    assert "warning" not in kept.out


def test_compress_of_a_lora_goes_through_its_delta_by_default_and_keeps_its_direction(shared):
    res = shared.compress("lora:v1", "dflt:dw", density=0.1)
    assert res.recipe["target"] == "delta" and res.recipe["kappa"] == 4.0  # κ = 0.4 / d
    assert res.held is None and res.ref == "dflt:dw" and res.report["direction_kept"] >= 0.5
    factors = shared.compress("lora:v1", "dflt:f", density=0.1, lora_delta=False)
    assert factors.held and factors.ref is None and factors.report["direction_kept"] < 0.2


# -- 5. determinism --------------------------------------------------------------------
def test_compress_is_deterministic_in_process_and_across_processes(shared):
    code = ("from patchctl import Registry; "
            f"r = Registry({str(shared.path)!r}); "
            "print(r.compress('ft:v1', 'det:p', density=0.25, mode='dare', seed=3).digest, "
            "r.compress('lorars:v1', 'det:q', density=0.25, kappa=3.0).digest)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a = shared.compress("ft:v1", "det:a", density=0.25, mode="dare", seed=3).digest
    assert shared.compress("ft:v1", "det:b", density=0.25, mode="dare", seed=3).digest == a
    assert shared.compress("ft:v1", "det:c", density=0.25, mode="dare", seed=4).digest != a
    b = shared.compress("lorars:v1", "det:d", density=0.25, kappa=3.0).digest
    assert shared.compress("lorars:v1", "det:e", density=0.25, kappa=3.0).digest == b
    # settings a mode does not use are not recorded: the same bytes, the same digest
    t = shared.compress("ft:v1", "det:f", density=0.25, scale="mean", kappa=5.0, seed=1)
    assert shared.compress("ft:v1", "det:g", density=0.25, scale="mean", seed=2).digest == t.digest
    assert t.recipe["kappa"] is None and t.recipe["seed"] is None
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.split() == [a, b]


# -- 6. bad inputs: one clear line, nothing written ---------------------------------------
BAD = [
    ("density zero", "ft:v1", {"density": 0.0}, ["--density", "0"], InvalidArgument, "density must be in (0, 1], got 0.0"),
    ("density above one", "ft:v1", {"density": 1.5}, ["--density", "1.5"], InvalidArgument, "density must be in (0, 1], got 1.5"),
    ("density negative", "ft:v1", {"density": -0.1}, ["--density", "-0.1"], InvalidArgument, "density must be in (0, 1], got -0.1"),
    ("nan", "nan:v1", {"density": 0.1}, ["--density", "0.1"], InvalidPatch,
     f"tensor '{QUERY0}' contains NaN or Inf; a patch must be finite"),
    ("nan per tensor", "nan:v1", {"density": 0.1, "per_tensor": True}, ["--density", "0.1", "--per-tensor"], InvalidPatch,
     f"tensor '{QUERY0}' contains NaN or Inf"),
    ("inf dare", "inf:v1", {"density": 0.1, "mode": "dare"}, ["--density", "0.1", "--mode", "dare"], InvalidPatch,
     f"tensor '{QUERY0}' contains NaN or Inf"),
    ("inf values", "inf:v1", {"density": 0.1, "mode": "values"}, ["--density", "0.1", "--mode", "values"], InvalidPatch,
     f"tensor '{QUERY0}' contains NaN or Inf"),
    ("fp16 overflow", "huge:v1", {"density": 0.5, "mode": "values"}, ["--density", "0.5", "--mode", "values"],
     InvalidArgument, f"tensor '{QUERY0}' has values that overflow float16; keep bfloat16 values (--values-dtype bfloat16)"),
    ("already sparse", "sp:v1", {"density": 0.1}, ["--density", "0.1"], UnsupportedPatch,
     "sp:v1 is already a sparse patch (ternary, density 0.5); compressing it again compounds the error: "
     "compress its source ft:v1 instead"),
    ("lora-delta of a diff", "ft:v1", {"density": 0.1, "lora_delta": True}, ["--density", "0.1", "--lora-delta"],
     InvalidArgument, "--lora-delta compresses a LoRA's ΔW, but ft:v1 is a diff patch; drop --lora-delta"),
    ("lora-delta of a replacement", "saved:v1", {"density": 0.1, "lora_delta": True}, ["--density", "0.1", "--lora-delta"],
     UnsupportedPatch, "saved:v1 replaces whole tensors (pooler.dense.weight); a replacement is not a delta"),
    ("default of a replacement", "saved:v1", {"density": 0.1}, ["--density", "0.1"],
     UnsupportedPatch, "a replacement is not a delta: compress its A/B factors with --factors"),
    ("mode", "ft:v1", {"density": 0.1, "mode": "binary"}, ["--density", "0.1", "--mode", "binary"], InvalidArgument,
     "unknown mode 'binary': choose ternary, values or dare"),
    ("kappa", "ft:v1", {"density": 0.1, "kappa": 0.0}, ["--density", "0.1", "--kappa", "0"], InvalidArgument,
     "kappa must be a finite number > 0, got 0.0"),
    ("values dtype", "ft:v1", {"density": 0.1, "values_dtype": "int8"}, ["--density", "0.1", "--values-dtype", "int8"],
     InvalidArgument, "unknown values dtype 'int8': choose float16, bfloat16 or float32"),
    ("missing", "nope:v1", {"density": 0.1}, ["--density", "0.1"], NotFound, "no patch named nope:v1"),
    ("digest without --as", "DIGEST", {"density": 0.1}, ["--density", "0.1"], InvalidArgument,
     "is a digest; name the compressed patch with --as NAME:TAG"),
]


@pytest.mark.parametrize(("ref", "kwargs", "flags", "exc", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_compress_is_one_clear_error_and_writes_nothing(shared, cli, ref, kwargs, flags, exc, message):
    if shared.store.ref_target(parse_ref("sp:v1")) is None:  # the already sparse patch
        shared.compress("ft:v1", "sp:v1", density=0.5, force=True)
    ref = shared.resolve("ft:v1") if ref == "DIGEST" else ref
    before = snapshot(shared.path)
    with pytest.raises(exc) as info:
        shared.compress(ref, **kwargs)
    assert message in str(info.value)
    r = cli("compress", ref, *flags, "-R", shared.path, registry=False)
    assert r.code != 0 and r.out == ""
    assert r.err.startswith("error: ") and r.err.count("\n") == 1 and message in r.err, r.err
    assert snapshot(shared.path) == before


def test_max_size_picks_the_largest_density_that_fits(registry, models, cli):
    from patchctl.registry.ops.compressing import CompressSpec, stored_size

    registry.push(models.finetune, "ft:v1", base=models.base)
    full = stored_size(registry, "ft:v1", CompressSpec(density=0.05))
    res = registry.compress("ft:v1", "ft:small", max_size=full)
    d = res.recipe["density"]
    size = res.recipe["search"]["size"]
    assert res.report["stored_bytes"] == size["stored_bytes"] <= full
    assert d >= 0.0499  # 0.05 itself fits: the search lands on it (3 significant digits) or a hair under
    step = 10 ** (math.floor(math.log10(d)) - 2)
    assert stored_size(registry, "ft:v1", CompressSpec(density=round(d + step, 6))) > full or d + step > 1
    r = cli("compress", "ft:v1", "--max-size", "12 parsecs", "--as", "ft:bad")
    assert r.code != 0 and r.err.count("\n") == 1 and "cannot read size" in r.err
    r = cli("compress", "ft:v1", "--max-size", "10", "--as", "ft:bad")
    assert r.code != 0 and "no density fits" in r.err
    r = cli("compress", "ft:v1", "--as", "ft:bad")
    assert r.code != 0 and "--density" in r.err
