"""push and apply without torch (patches/host.py on the C kernels): the same bits as the torch path.

Each kernel is compared with the torch function it stands in for (patches/apply.py) on every dtype
pair, over random bit patterns (overflow to infinity included) and hand-picked edge values: rounding
ties, subnormals, signed zeros, the largest finite values. Then whole pushes and applies of float32,
float16 and bfloat16 models run as their own processes, with the kernels and with ``PATCHCTL_NATIVE=0``
(the torch path): same patch digest, same output bytes, and torch never imported on the fast path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from patchctl.patches import apply, host, native

needs_native = pytest.mark.skipif(native.lib is None, reason="patchctl._kernels is not built here")
DTYPES = ("float32", "float16", "bfloat16")


def _edges(dtype: str) -> torch.Tensor:
    """Values where rounding is delicate, in ``dtype``."""
    td = getattr(torch, dtype)
    info = torch.finfo(td)
    vals = [0.0, -0.0, 1.0, -1.0, info.max, -info.max, info.tiny, -info.tiny, info.smallest_normal / 3,
            info.eps, 1 + info.eps, 0.5 + info.eps / 4, 65504.0 if dtype != "float16" else 65000.0, 3.0e-8, 1e-40]
    return torch.tensor(vals, dtype=torch.float32).to(td)


def _random(dtype: str, n: int, rng: np.random.Generator) -> torch.Tensor:
    """Random finite bit patterns of ``dtype``, plus the edge values (sums may still overflow to infinity).

    No NaN or infinity in: a NaN's payload is not specified (torch's own vector and scalar loops differ),
    and push refuses a non-finite delta before it is stored."""
    td = getattr(torch, dtype)
    if dtype == "float32":
        t = torch.from_numpy(rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.int32)).view(td)
    else:
        t = torch.from_numpy(rng.integers(0, 2**16, n, dtype=np.uint32).astype(np.uint16).view(np.int16)).view(td)
    t = t.clone()
    t[~torch.isfinite(t)] = 0.25
    e = _edges(dtype)
    return torch.cat([e, e.flip(0), t])


def _host(t: torch.Tensor) -> host.HostTensor:
    return host.HostTensor(bytearray(t.contiguous().view(torch.uint8).numpy().tobytes()),
                           str(t.dtype).removeprefix("torch."), tuple(t.shape))


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _torch_path(fn, *args, **kw):
    """``fn`` with the C kernels off (torch's own arithmetic: the reference)."""
    lib = native.lib
    native.lib = None
    try:
        return fn(*args, **kw)
    finally:
        native.lib = lib


@needs_native
@pytest.mark.parametrize("bd", DTYPES)
@pytest.mark.parametrize("dd", DTYPES)
def test_add_into_is_torchs_combine_bit_for_bit(bd, dd):
    rng = np.random.default_rng(zlib.crc32(f"{bd}{dd}".encode()))
    n = 200_003
    b, d = _random(bd, n, rng), _random(dd, n, rng)
    small = (b.float() + torch.randn(b.numel()) * 1e-3).to(getattr(torch, dd))  # realistic deltas too
    for delta in (d[: b.numel()], small):
        want = _torch_path(apply.combine, b, delta)
        assert _bytes(apply.combine(b, delta)) == _bytes(want)  # combine's own kernel path
        got = host.add_into(_host(b), _host(delta))
        assert bytes(got.buf) == _bytes(want), f"{bd} + {dd}"


@needs_native
@pytest.mark.parametrize("ind", DTYPES)
@pytest.mark.parametrize("od", DTYPES)
def test_diff_with_pins_is_torchs_bit_for_bit(ind, od):
    rng = np.random.default_rng(zlib.crc32(f"{ind}{od}".encode()))
    n = 150_001
    b = _random(ind, n, rng)
    a_far = _random(ind, n, rng)[: b.numel()]
    a_near = (b.float() * (1 + torch.randn(b.numel()) * 1e-2)).to(b.dtype)
    for far, a in ((True, a_far), (False, a_near)):
        a = torch.where(torch.isfinite(a.float() - b.float()), a, b)  # push refuses a non-finite delta
        d, idx, vals = apply.diff_with_pins(a, b, getattr(torch, od))
        hd, hidx, hvals = host.diff_with_pins(_host(a), _host(b), od)  # in place where od == ind
        assert bytes(hd.buf) == _bytes(d), f"delta {ind} -> {od}"
        np.testing.assert_array_equal(hidx, idx.numpy())
        assert hvals.tobytes() == _bytes(vals)
        assert idx.numel() > 0 or not far  # the far pairs do need pins
        if od in (ind, "float32"):  # push stores pins in the delta's dtype: the fine-tune's, or float32
            stored = host.convert(hvals, ind, od)
            assert stored.tobytes() == _bytes(vals.to(getattr(torch, od)))
            assert host.convert(stored, od, ind).tobytes() == _bytes(vals)  # apply narrows them back: exact


@needs_native
@pytest.mark.parametrize("dts", [("bfloat16",) * 3, ("float16", "bfloat16", "float32"), ("float32",) * 2,
                                 ("float64", "bfloat16")])
@pytest.mark.parametrize("ws,lam", [((0.5, 0.3, 0.2), 1.0), ((1.0, -0.7, 1e-3), 0.37), ((1.0, 1.0, 1.0), 1.0)])
@pytest.mark.parametrize("out_dtype", [None, "bfloat16", "float16", "float32"])
def test_task_arithmetic_kernel_is_the_torch_path_bit_for_bit(dts, ws, lam, out_dtype):
    from patchctl.patches import merge

    rng = np.random.default_rng(zlib.crc32(f"{dts}{ws}{lam}{out_dtype}".encode()))
    n = 100_003
    ds = [torch.from_numpy(rng.standard_normal(n) * 10.0 ** rng.integers(-8, 4, n)).to(getattr(torch, d))
          for d in dts]
    ds[0][:5] = torch.tensor([0.0, -0.0, -0.0, 1e30, -1e-40]).to(ds[0].dtype)  # signed zeros, overflow, tiny
    w = ws[: len(ds)]

    def run(fn=merge.task_arithmetic):
        out = None if out_dtype is None else torch.empty(n, dtype=getattr(torch, out_dtype))
        return fn(ds, w, generator_seed=0, name="t", lam=lam, out=out)

    got, want = run(), _torch_path(run)
    assert got.dtype == want.dtype and _bytes(got) == _bytes(want)
    flats = [d.to(torch.float32) if d.dtype == torch.float64 else d for d in ds]
    assert merge._fused_weighted_sum(flats, w, lam, ds[0].shape, None) is not None  # the kernel did run


@needs_native
@pytest.mark.parametrize("dts", [("bfloat16",) * 3, ("float16", "bfloat16", "float32"), ("float32",) * 2])
@pytest.mark.parametrize("ws,lam", [((0.5, 0.3, 0.2), 1.0), ((1.0, 0.0, 2.5), 0.37), ((1.0, 1.0, 1.0), 1.0)])
@pytest.mark.parametrize("density", [0.2, 1e-5, 1.0, 0.7])
@pytest.mark.parametrize("out_dtype", [None, "bfloat16", "float32"])
def test_ties_kernel_is_the_torch_path_bit_for_bit(dts, ws, lam, density, out_dtype):
    from patchctl.patches import merge

    rng = np.random.default_rng(zlib.crc32(f"{dts}{ws}{lam}{density}{out_dtype}".encode()))
    n = 50_021
    ds = []
    for q, d in enumerate(dts):
        x = rng.standard_normal(n) * 10.0 ** rng.integers(-6, 3, n)
        if q == 0:
            x = np.round(x * 4) / 4  # many equal magnitudes: ties at the top-k cut-off
        ds.append(torch.from_numpy(x).to(getattr(torch, d)))
    ds[-1][: n // 10] = 0  # entries where no input agrees
    w = ws[: len(ds)]

    def run():
        out = None if out_dtype is None else torch.empty(n, dtype=getattr(torch, out_dtype))
        return merge.ties(ds, w, generator_seed=0, name="t", density=density, lam=lam, out=out)

    got, want = run(), _torch_path(run)
    assert got.dtype == want.dtype and _bytes(got) == _bytes(want)
    tops = [merge._top(d, int(density * n)) for d in ds]
    assert merge._fused_ties(ds, w, tops, 0.2, lam, ds[0].shape, None) is not None  # the kernel did run


@needs_native
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_nan_input_gives_nan_where_the_torch_path_does(method):
    """A hostile patch's NaN reaches the merged tensor as on the torch path (then ``require_finite`` refuses
    it, naming the tensor); every other entry has the same bits."""
    from patchctl.patches import merge

    g = torch.Generator().manual_seed(3)
    ds = [(torch.randn(20_000, generator=g) * 0.01).to(torch.bfloat16) for _ in range(3)]
    ds[0][[0, 7, 19_999]] = float("nan")
    ds[1][[7, 500]] = float("nan")

    def run():
        return merge.merge_tensor(method, ds, [0.5, 0.3, 0.2], generator_seed=0, name="t",
                                  params={"density": 0.2} if method == "ties" else None)

    got, want = run(), _torch_path(run)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got).any()
    ok = ~torch.isnan(want)
    assert _bytes(got[ok]) == _bytes(want[ok])


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_finite_finds_every_nan_and_inf(dtype):
    td = getattr(torch, dtype)
    n = 3 * (1 << 14) + 5  # across the kernel's blocks
    for pos in (0, 1, (1 << 14) - 1, 1 << 14, n - 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = torch.randn(n).to(td)
            assert host.all_finite(_host(t))
            t[pos] = bad
            assert not host.all_finite(_host(t)), (dtype, pos, bad)
    big = torch.full((7,), torch.finfo(td).max, dtype=td)
    assert host.all_finite(_host(big)) == bool(torch.isfinite(big).all())


@needs_native
def test_same_bytes_and_pins_codec():
    a = _host(torch.arange(1000, dtype=torch.float32))
    b = _host(torch.arange(1000, dtype=torch.float32))
    assert host.same_bytes(a, b)
    b.buf[3999] ^= 1
    assert not host.same_bytes(a, b)
    idx, vals = torch.tensor([0, 5, 999]), torch.tensor([1.5, -0.0, 3.0], dtype=torch.bfloat16)
    blob = host.encode_pins(idx.numpy(), vals.view(torch.int16).numpy().view(np.uint16))
    assert blob == apply.encode_pins(idx, vals)
    hidx, hvals = host.decode_pins(blob, "bfloat16", 1000)
    tidx, tvals = apply.decode_pins(blob, torch.bfloat16, 1000)
    np.testing.assert_array_equal(hidx, tidx.numpy())
    assert hvals.tobytes() == _bytes(tvals)
    from patchctl.errors import InvalidPatch

    for bad in (blob[:-1], blob[:8] + b"\xff" + blob[9:], b"nope" + blob[4:]):
        with pytest.raises(InvalidPatch):
            host.decode_pins(bad, "bfloat16", 1000)
    with pytest.raises(InvalidPatch, match="outside"):
        host.decode_pins(blob, "bfloat16", 999)


# -- whole commands, each its own process ---------------------------------------------------------

_RUN = """
import sys
from patchctl.cli.main import main
rc = main(sys.argv[1:])
print("TORCH-IMPORTED" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
sys.exit(rc)
"""


def _run(args: list[str], native_on: bool) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATCHCTL_NATIVE="1" if native_on else "0", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", _RUN, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def _cast(src: Path, dst: Path, dtype: torch.dtype, scramble: bool = False) -> Path:
    """A copy of model folder ``src`` with its float tensors in ``dtype`` (``scramble``: each entry scaled
    by 1 + 3·N(0, 1), so that so many entries need pins that push stores float32 deltas instead)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    sd = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    out = {}
    for k, v in sd.items():
        v = v.to(dtype) if v.is_floating_point() else v
        if scramble and v.is_floating_point() and v.numel() > 1:  # ~23% of 16-bit entries need pins
            v = (v.float() * (1 + 3 * torch.randn(v.shape, generator=g))).to(dtype)
        out[k] = v.contiguous()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@needs_native
@pytest.mark.parametrize("dtype,scramble", [(torch.float32, False), (torch.float16, False),
                                            (torch.bfloat16, False), (torch.bfloat16, True)])
def test_push_and_apply_without_torch_match_the_torch_path(models, tmp_path, dtype, scramble):
    base = _cast(models.base, tmp_path / "base", dtype)
    ft = _cast(models.finetune, tmp_path / "ft", dtype, scramble)
    digests, outs = {}, {}
    for native_on in (True, False):
        reg = tmp_path / f"reg-{native_on}"
        r = _run(["push", ft, "p:v1", "--base", base, "--registry", reg, "--json"], native_on)
        assert r.returncode == 0, r.stderr
        assert ("NO-TORCH" in r.stderr) == native_on, r.stderr  # the kernels' path never imports torch
        digests[native_on] = json.loads(r.stdout)["digest"]
        out = tmp_path / f"out-{native_on}"
        r = _run(["apply", "p:v1", out, "--base", base, "--registry", reg], native_on)
        assert r.returncode == 0, r.stderr
        assert ("NO-TORCH" in r.stderr) == native_on, r.stderr
        outs[native_on] = _shards(out)
    assert digests[True] == digests[False]
    assert outs[True] == outs[False]
    want = {k: _bytes(v) for k, v in load_file(ft / "model.safetensors").items()}
    assert {k: _bytes(v) for k, v in load_file(tmp_path / "out-True" / "model.safetensors").items()} == want
    # and both are the fine-tune's tensors bit for bit (the file's header is apply's canonical one)
    if scramble:  # most entries needed pins: push kept float32 deltas instead, on both paths (same digest)
        from patchctl.registry.store.repository import Repository

        repo = Repository(tmp_path / "reg-True", create=False)
        try:
            m = repo.manifest(repo.resolve("p:v1"))
        finally:
            repo.close()
        assert "float32" in {e.dtype for e in m.tensors.values()}


@needs_native
def test_a_nan_in_the_fine_tune_is_refused_on_the_fast_path(models, tmp_path):
    base = _cast(models.base, tmp_path / "base", torch.bfloat16)
    ft = _cast(models.finetune, tmp_path / "ft", torch.bfloat16)
    sd = load_file(ft / "model.safetensors")
    name = sorted(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 100)[-1]
    sd[name].view(-1)[17] = float("nan")
    save_file(sd, ft / "model.safetensors", metadata={"format": "pt"})
    reg = tmp_path / "reg"
    r = _run(["push", ft, "p:v1", "--base", base, "--registry", reg], True)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and name in lines[0] and "NaN" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert "NO-TORCH" in r.stderr


def test_buffer_pool_reuses_aligns_and_keeps_the_larger_buffers():
    pool = host.BufferPool()
    a = pool.take(10_000, lead=123)
    assert a.size == 10_000 and a.ctypes.data % pool.PAGE == 123  # aligned as its bytes' place in a file
    base = a.base
    pool.give(a)
    b = pool.take(5_000, lead=0)
    assert b.base is base and b.ctypes.data % pool.PAGE == 0  # the same memory again: no fresh pages
    pool.give(b)
    pool.give(b)  # given twice: kept once
    assert sum(x is base for x in pool._free) == 1
    big = [pool.take((i + 2) << 20) for i in range(pool.KEEP + 1)]
    for x in big:
        pool.give(x)
    assert len(pool._free) == pool.KEEP
    assert all(x is not base for x in pool._free)  # the smallest was dropped for a larger one
    assert min(x.size for x in pool._free) >= 3 << 20
    t = host.HostTensor(pool.take(8), "float32", (2,), pooled=True)
    t.release()
    t.release()  # a second release gives nothing back twice
    assert not t.pooled
