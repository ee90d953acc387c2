"""Task arithmetic, TIES and DARE merges on the C kernels without torch (host_stream, host_merge, methods).

Whole ``patchctl merge`` commands run as their own processes with the kernels and with
``PATCHCTL_NATIVE=0`` (the torch engine): the same patch digest, the same ``--apply`` shards, the
same warning and error lines, and torch never imported on the kernels' path. In process: the exact
top-k support, the sign-conflict counts, DARE's drop masks (torch's generator) and the argument checks
are those of the torch functions.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from patchctl.errors import InvalidArgument, PatchctlError
from patchctl.patches import diagnostics, host, host_merge, merge, methods, native
from patchctl.registry.ops.merging.plan import promote_dtypes

needs_native = pytest.mark.skipif(native.lib is None, reason="patchctl._kernels is not built here")

_RUN = """
import sys
from patchctl.cli.main import main
rc = main(sys.argv[1:])
print("TORCH-IMPORTED" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
sys.exit(rc)
"""

SHAPES = {"model.layers.0.mlp.weight": (64, 96), "model.layers.1.mlp.weight": (96, 64),
          "model.layers.1.self_attn.q_proj.weight": (64, 64), "model.norm.weight": (64,)}


def _run(args: list[object], native_on: bool) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATCHCTL_NATIVE="1" if native_on else "0", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", _RUN, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def _model(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def _setup(tmp: Path, dtype: torch.dtype, scramble_last: bool = False) -> tuple[Path, list[Path]]:
    """A base and three fine-tunes of it: deltas on a coarse grid (many ties in magnitude), some zero,
    both signs; the third changes one tensor only (the others give zero deltas in a merge);
    ``scramble_last``: the second's deltas need so many pins that push stores them in float32."""
    g = torch.Generator().manual_seed(11)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    base["model.layers.0.position_ids"] = torch.arange(8, dtype=torch.int64)  # not a float: copied as is
    fts = []
    for i in range(3):
        ft = dict(base)
        for k, s in SHAPES.items():
            if i == 2 and k != "model.layers.1.mlp.weight":
                continue
            step = torch.randint(-3, 4, s, generator=g).float() * 2.0**-6
            if scramble_last and i == 1:
                step = step + 0.37 * torch.randn(s, generator=g)
            ft[k] = (base[k].float() + step).to(dtype)
        fts.append(_model(tmp / f"ft{i}", ft))
    return _model(tmp / "base", base), fts


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _both_paths(tmp: Path, base: Path, fts: list[Path], merge_args: list[str], apply: bool = True) -> dict[bool, dict]:
    out: dict[bool, dict] = {}
    for native_on in (True, False):
        reg = tmp / f"reg-{native_on}"
        for i, ft in enumerate(fts):
            r = _run(["push", ft, f"p{i}:v1", "--base", base, "--registry", reg], True)
            assert r.returncode == 0, r.stderr
        model = tmp / f"out-{native_on}"
        extra = ["--apply", model, "--base", base] if apply else []
        r = _run(["merge", "p0:v1", "p1:v1", "p2:v1", *merge_args, "--as", "m:v1", "--no-validate",
                  "--registry", reg, "--json", *extra], native_on)
        out[native_on] = {"rc": r.returncode, "stderr": r.stderr, "stdout": r.stdout,
                          "shards": _shards(model) if apply and r.returncode == 0 else None}
    return out


@needs_native
@pytest.mark.parametrize("dtype,args,scramble", [
    (torch.bfloat16, [], False),
    (torch.bfloat16, ["--weights", "0.5,-0.3,0", "--lambda", "0.7"], False),
    (torch.float16, ["--method", "ties", "--density", "0.3", "--weights", "1,0.5,0.25"], False),
    (torch.bfloat16, ["--method", "ties", "--density", "0.2", "--lambda", "1.3", "--dtype", "float32"], False),
    (torch.float32, ["--method", "ties", "--weights", "0.6,0.3,0.3"], False),
    (torch.bfloat16, ["--weights", "0.5,0.3,0.2"], True),  # float32 and bfloat16 deltas: a float32 output
    (torch.bfloat16, ["--method", "dare_ties", "--density", "0.3", "--seed", "5"], False),
    (torch.float16, ["--method", "dare_linear", "--density", "0.5", "--weights", "0.5,-0.3,1", "--lambda", "1.2"],
     False),
    (torch.float32, ["--method", "dare_ties", "--density", "1", "--weights", "0.6,0,0.3"], False),
    (torch.bfloat16, ["--method", "dare_linear", "--density", "0.1", "--seed", "-3"], True),
    (torch.bfloat16, ["--method", "ties", "--density", "0.3", "--lines", "auto"], False),
    (torch.float16, ["--weights", "1,1,1", "--lines", "0.4", "--lines-beta", "0.8"], False),
    (torch.float32, ["--method", "dare_ties", "--density", "0.5", "--lines", "auto", "--dtype", "bfloat16"], False),
    (torch.bfloat16, ["--lines", "auto", "--weights", "0.5,0.3,0.2"], True),
], ids=["ta-bf16", "ta-weights-lambda", "ties-fp16", "ties-bf16-to-fp32", "ties-fp32", "ta-mixed-dtypes",
        "dare-ties-bf16", "dare-linear-fp16-negative", "dare-ties-fp32-density-1", "dare-linear-mixed-dtypes",
        "lines-auto-ties-bf16", "lines-alpha-beta-ta-fp16", "lines-auto-dare-fp32-to-bf16", "lines-auto-ta-mixed"])
def test_merge_without_torch_matches_the_torch_engine(tmp_path, dtype, args, scramble):
    base, fts = _setup(tmp_path, dtype, scramble)
    res = _both_paths(tmp_path, base, fts, args)
    for native_on, r in res.items():
        assert r["rc"] == 0, r["stderr"]
        assert ("NO-TORCH" in r["stderr"]) == native_on, r["stderr"]  # the kernels' path never imports torch
    fast, slow = json.loads(res[True]["stdout"]), json.loads(res[False]["stdout"])
    assert fast["digest"] == slow["digest"]
    assert res[True]["shards"] == res[False]["shards"]
    warn = [[x for x in r["stderr"].splitlines() if x.startswith("warning:")] for r in res.values()]
    assert warn[0] == warn[1]  # the sign-conflict warning of a task arithmetic merge, word for word
    if not any(a.endswith("ties") for a in args):  # independent random deltas disagree in sign on about half
        assert len(warn[0]) == 1 and "disagree in sign" in warn[0][0], res[True]["stderr"]
    if scramble:
        assert fast["kind"] == "diff"


@needs_native
def test_a_merge_that_overflows_is_refused_the_same_way_without_torch(tmp_path):
    base, fts = _setup(tmp_path, torch.float16)
    res = _both_paths(tmp_path, base, fts, ["--weights", "60000,60000,60000", "--lambda", "60000"], apply=False)
    lines = {}
    for native_on, r in res.items():
        assert r["rc"] != 0
        assert "Traceback" not in r["stderr"]
        assert ("NO-TORCH" in r["stderr"]) == native_on, r["stderr"]
        lines[native_on] = [x for x in r["stderr"].splitlines() if x.startswith("error:")]
        assert len(lines[native_on]) == 1 and "NaN or Inf" in lines[native_on][0]
    assert lines[True] == lines[False]
    for native_on in (True, False):  # nothing was tagged
        r = _run(["ls", "--registry", tmp_path / f"reg-{native_on}", "--json"], True)
        assert "m:v1" not in r.stdout and '"m"' not in r.stdout


@needs_native
@pytest.mark.parametrize("args", [
    ["--method", "ties", "--density", "0"],
    ["--method", "ties", "--density", "1.5"],
    ["--method", "ties", "--weights", "1,-1,1"],
    ["--lambda", "nan"],
    ["--method", "dare_ties", "--density", "-0.1"],
    ["--method", "dare_ties", "--weights", "1,0.5,-2"],
    ["--method", "dare_linear", "--density", "1.01"],
])
def test_bad_merge_arguments_get_the_same_one_line_error_without_torch(tmp_path, args):
    base, fts = _setup(tmp_path, torch.bfloat16)
    res = _both_paths(tmp_path, base, fts, args, apply=False)
    lines = {}
    for native_on, r in res.items():
        assert r["rc"] != 0 and "Traceback" not in r["stderr"]
        assert ("NO-TORCH" in r["stderr"]) == native_on, r["stderr"]  # refused before torch would be imported
        lines[native_on] = [x for x in r["stderr"].splitlines() if x.startswith("error:")]
        assert len(lines[native_on]) == 1
    assert lines[True] == lines[False]


@needs_native
def test_lines_auto_of_a_zero_merge_gets_the_same_one_line_error_without_torch(tmp_path):
    """LiNeS auto needs a merged task vector with a non-zero L1 norm: τ - τ is refused the same way on
    both paths (one error line, exit 1, nothing tagged), and the kernels' path still never imports torch."""
    base, fts = _setup(tmp_path, torch.bfloat16)
    lines = {}
    for native_on in (True, False):
        reg = tmp_path / f"reg-{native_on}"
        assert _run(["push", fts[0], "p0:v1", "--base", base, "--registry", reg], True).returncode == 0
        r = _run(["merge", "p0:v1", "p0:v1", "--weights", "1,-1", "--lines", "auto", "--as", "m:v1",
                  "--no-validate", "--registry", reg], native_on)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert ("NO-TORCH" in r.stderr) == native_on, r.stderr
        lines[native_on] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(lines[native_on]) == 1 and "L1 norm 0.0" in lines[native_on][0]
        assert "m:v1" not in _run(["ls", "--registry", reg], True).stdout
    assert lines[True] == lines[False]


# -- in process -------------------------------------------------------------------------------------------

def _grid(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-40, 41, (n,), generator=g).float() / 8).to(dtype)  # few magnitudes: many ties
    x[::13] = -0.0
    return x


def _host(t: torch.Tensor) -> host.HostTensor:
    name = str(t.dtype).removeprefix("torch.")
    return host.HostTensor(t.contiguous().view(torch.uint8).numpy().copy(), name, tuple(t.shape))


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.95])
def test_support_is_the_stable_sort_top_k_and_diagnostics_agrees(dtype, density):
    x = _grid(dtype, 2 * host_merge._SCAN + 777, 3)  # crosses scan steps
    n = x.numel()
    k = math.ceil(density * n)
    order = torch.sort(x.float().abs(), descending=True, stable=True).indices[:k]  # lowest index first among ties
    want = torch.zeros(n, dtype=torch.bool)
    want[order] = True
    want &= x != 0
    got = host_merge.support(_host(x), density)
    assert np.array_equal(got, want.numpy())
    assert torch.equal(diagnostics.top_support(x, density), want)  # the torch function: the same mask


@needs_native
@pytest.mark.parametrize("da,db", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                   (torch.float32, torch.bfloat16)])
def test_sign_counts_are_pair_counts(da, db):
    a, b = _grid(da, 300_001, 4), _grid(db, 300_001, 5)
    a[5] = float("nan")  # NaN is never "> 0"
    want = diagnostics.pair_counts(a.float(), b.float(), 0.2)
    overlap, conflicts = host_merge.sign_counts(_host(a), _host(b), 0.2)
    assert (overlap, conflicts) == (int(want["overlap"]), int(want["conflicts"]))
    assert conflicts > 0 and overlap > conflicts


def test_positive_reads_signs_zeros_infinities_and_nan_from_the_bits():
    x = torch.tensor([1.0, -1.0, 0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = x.to(dtype)
        assert host_merge.positive(_host(t)).tolist() == (t > 0).tolist()


@pytest.mark.parametrize("method,params,ws", [
    ("ties", {"density": 0.0}, [1.0, 1.0]),
    ("ties", {"density": 2}, [1.0, 1.0]),
    ("ties", {"density": "x"}, [1.0, 1.0]),
    ("ties", {"lam": float("inf")}, [1.0, 1.0]),
    ("ties", {}, [1.0, -0.5]),
    ("ties", {"gamma": 0.1}, [1.0, 1.0]),
    ("ties", {}, [1.0]),
    ("task_arithmetic", {"lam": True}, [1.0, 1.0]),
    ("task_arithmetic", {"density": 0.5}, [1.0]),
    ("task_arithmetic", {}, [float("nan")]),
    ("dare_ties", {"density": 0.0}, [1.0, 1.0]),
    ("dare_ties", {"lam": float("nan")}, [1.0, 1.0]),
    ("dare_ties", {}, [1.0, -1.0]),
    ("dare_ties", {}, [1.0]),
    ("dare_linear", {"density": 1.5}, [1.0, -1.0]),
    ("dare_linear", {"gamma": 0.5}, [1.0]),
    ("dare_linear", {}, [1.0, "2"]),
    ("ties", {"density": 0.5, "lam": 2.0}, [0.0, 3.0]),  # valid: no error on either side
    ("dare_linear", {"density": 0.5}, [-1.0, 3.0]),  # valid
])
def test_check_call_raises_what_the_method_raises(method, params, ws):
    def err(fn):
        try:
            fn()
        except PatchctlError as e:
            return type(e), str(e)
        return None

    torch_side = err(lambda: merge.merge_tensor(method, [torch.zeros(2)] * len(ws), ws, generator_seed=0,
                                                name="-", params=params))
    host_side = err(lambda: methods.check_call(method, len(ws), ws, params))
    assert host_side == torch_side
    if (method, params) not in (("ties", {"density": 0.5, "lam": 2.0}), ("dare_linear", {"density": 0.5})):
        assert host_side is not None and host_side[0] is InvalidArgument


@needs_native
@pytest.mark.parametrize("seed", [0, 1, 5489, 2**32 + 9, 2**63 - 1, methods.dare_seed(0, "model.embed", 2)])
def test_dare_drops_are_torchs_generator_bit_for_bit(seed):
    """``pc_dare_drops`` replays torch's CPU generator (MT19937, its float32 draw, the comparison in float32)."""
    for n in (1, 7, 8, 623, 624, 625, 1249, 20_011):
        for density in (0.1, 0.2, 1 / 3, 0.5, 0.9, 0.9999999):
            g = torch.Generator().manual_seed(seed)
            want = (torch.rand(n, generator=g, dtype=torch.float32) >= density).numpy()
            drops = host_merge.Drops(n, density, [seed])
            try:
                bits = np.unpackbits(drops.masks[0], bitorder="little")
                assert np.array_equal(bits[:n].astype(bool), want), (seed, n, density)
                assert not bits[n:].any()  # pad bits clear
            finally:
                drops.release()
    assert host_merge.Drops(10, 1.0, [seed]).masks == [None]  # density 1 drops nothing: no mask


@needs_native
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 3, (torch.float16,) * 3, (torch.float32,) * 3,
                                    (torch.bfloat16, torch.float32, torch.float16)])
def test_fused_dare_is_the_chunked_torch_path(monkeypatch, method, dtypes):
    """merge_tensor's DARE on the C kernels (masks and fused pass) gives the bits of its torch path (torch's
    generator, the chunked masked_fill/div/weigh/sum), for output dtypes float32, bfloat16 and float16."""
    g = torch.Generator().manual_seed(3)
    cases = [([0.5, 0.3, 0.2], {"density": 0.2}), ([1.0, 1.0, 1.0], {"density": 0.1, "lam": 1.3}),
             ([0.0, 1.0, 2.0], {"density": 0.73, "lam": 0.5}), ([0.5, 0.3, 0.2], {"density": 1.0})]
    if method == "dare_linear":
        cases.append(([1.0, -0.5, 0.3], {"density": 0.4}))
    real_drops = merge._dare_drops
    for shape in ((257, 129), (3, 5, 7)):
        for ws, prm in cases:
            ds = [(torch.randn(shape, generator=g) * 0.01).to(d) for d in dtypes]
            ds[0].view(-1)[:5] = 0
            for odt in (None, torch.bfloat16, torch.float16):
                got = []
                for lib in (native.lib, None):
                    monkeypatch.setattr(native, "lib", lib)
                    calls: list[int] = []
                    monkeypatch.setattr(merge, "_dare_drops",
                                        lambda *a, calls=calls: calls.append(1) or real_drops(*a))
                    out = None if odt is None else torch.empty(shape, dtype=odt)
                    r = merge.merge_tensor(method, ds, ws, generator_seed=11, name="layers.3.w", params=prm,
                                           out=out)
                    assert bool(calls) == (lib is None)  # the kernels never ask torch for the masks
                    got.append(r.contiguous().view(torch.uint8))
                assert torch.equal(got[0], got[1]), (shape, ws, prm, odt)


@needs_native
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_kernels_split_anywhere_give_the_same_bits(monkeypatch, method):
    """Ranges that start inside a byte of the drop mask (the entry-by-entry path) and whole blocks (the
    expanded-mask path) make the same output."""
    n = 5_003
    g = torch.Generator().manual_seed(5)
    ds = [_host((torch.randn(n, generator=g) * 0.01).to(torch.bfloat16)) for _ in range(3)]
    outs = []
    for cuts in ([0, n], [0, 13, 1_001, 4_097, n]):
        monkeypatch.setattr(host_merge, "_split", lambda fn, total, cuts=cuts: [
            fn(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
        out = host.HostTensor(np.zeros(n * 4, np.uint8), "float32", (n,))
        host_merge.merge(method, ds, [0.5, 0.3, 0.2], {"density": 0.3, "lam": 1.0}, out, seed=1, name="w")
        outs.append(out.buf.copy())
    assert np.array_equal(outs[0], outs[1])
    assert np.count_nonzero(outs[0].view(np.float32)) > n // 4  # something was kept and merged


@needs_native
@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 3, (torch.float32, torch.float16, torch.bfloat16)])
def test_l1_norms_on_the_kernels_agree_with_torch_at_any_thread_count(monkeypatch, dtypes):
    """LiNeS's L1 sums by pc_l1_sums: torch's values (float64, to 1e-12), and the very same bits whatever
    the split between threads (fixed blocks, added exactly)."""
    from patchctl.patches import lines

    g = torch.Generator().manual_seed(9)
    n = (1 << 18) * 3 + 12_345  # several kernel ranges, a short last block
    ds = [(torch.randn(n, generator=g) * 10.0 ** -i).to(d) for i, d in enumerate(dtypes)]
    merged = torch.randn(n, generator=g)
    got = lines.l1_norms(ds, merged)
    monkeypatch.setattr(native, "lib", None)
    want = lines.l1_norms(ds, merged)
    monkeypatch.undo()
    assert got == pytest.approx(want, rel=1e-12)
    for threads in ("1", "3", "4"):
        monkeypatch.setenv("PATCHCTL_THREADS", threads)
        assert lines.l1_norms(ds, merged) == got


@needs_native
@pytest.mark.parametrize("method,params", [("task_arithmetic", {"lam": 0.7}), ("ties", {"density": 0.3}),
                                           ("dare_ties", {"density": 0.4}), ("dare_linear", {"density": 0.5})])
@pytest.mark.parametrize("odt", [torch.float32, torch.float16, torch.bfloat16])
def test_lines_scale_in_the_kernel_is_torchs_mul_then_copy(method, params, odt):
    """The kernels' ``post`` (LiNeS's scale, fused into the merge's last step) gives the bits of the torch
    engine's ``merged.mul_(scale)`` on the float32 result, then ``stored.copy_(merged)``; +0 · (-s) is -0."""
    g = torch.Generator().manual_seed(2)
    n = 3_001
    ds = [(torch.randint(-3, 4, (n,), generator=g).float() * 2.0**-6).to(torch.bfloat16) for _ in range(3)]
    ws = [0.5, 0.3, 0.2]
    for scale in (0.37, 1.0, -2.5, 1e-3):
        merged = merge.merge_tensor(method, ds, ws, generator_seed=4, name="layers.1.w", params=params)
        want = torch.empty(n, dtype=odt).copy_(merged.mul_(scale))
        out = host.HostTensor(np.zeros(n * want.element_size(), np.uint8), str(odt)[6:], (n,))
        host_merge.merge(method, [_host(d) for d in ds], ws, {"lam": 1.0, **params}, out, seed=4, name="layers.1.w",
                         post=scale)
        assert np.array_equal(out.buf, want.view(torch.uint8).numpy()), (scale, odt)
        if scale < 0:  # the merge's +0 entries times a negative scale: -0, which the kernel must keep
            signed_zero = (want == 0) & (want.view(torch.int16 if want.element_size() == 2 else torch.int32) < 0)
            assert signed_zero.any()


def test_promote_dtypes_is_torchs_promotion():
    names = ["float16", "bfloat16", "float32", "float64"]
    for mask in range(1, 16):
        picked = {n for i, n in enumerate(names) if mask >> i & 1}
        want = None
        for n in picked:
            d = getattr(torch, n)
            want = d if want is None else torch.promote_types(want, d)
        assert promote_dtypes(picked | {"int64", "bool"}) == str(want).removeprefix("torch.")
    assert promote_dtypes({"int64"}) == "float32"
    assert promote_dtypes({"float8_e4m3fn", "int8"}) == "float8_e4m3fn"  # torch decides (float8)


@needs_native
@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("ties", {"density": 0.3}),
                                           ("dare_ties", {"density": 0.3})])
def test_apply_made_in_parts_is_the_torch_engines_model(tmp_path, monkeypatch, method, params):
    from patchctl import Registry
    from patchctl.registry.ops.merging import host_stream

    base, fts = _setup(tmp_path, torch.float16)
    monkeypatch.setattr(host_stream, "_PART", 3 * 4096)  # every tensor in several parts, the last one short
    used = []
    real = host_stream.usable
    digests, models = [], []
    for engine in ("kernels", "torch"):
        def usable(p, kernels=engine == "kernels"):
            used.append(real(p))
            return used[-1] and kernels

        monkeypatch.setattr(host_stream, "usable", usable)
        with Registry(tmp_path / f"reg-{engine}") as reg:
            for i, ft in enumerate(fts):
                reg.push(ft, f"p{i}:v1", base=base)
            res = reg.merge(["p0:v1", "p1:v1", "p2:v1"], "m:v1", method=method, weights=[0.5, 0.3, 0.2],
                            params=params, apply_to=tmp_path / f"out-{engine}", base=base, validate=False)
        digests.append(res.digest)
        models.append(_shards(tmp_path / f"out-{engine}"))
    assert used == [True, True]  # both merges could run on the kernels; the second was sent to torch
    assert digests[0] == digests[1] and models[0] == models[1]


def test_write_parts_refuses_a_wrong_size_or_order(tmp_path):
    import io

    from patchctl.registry.formats.safetensors import StreamingWriter

    entries = [("a", "float32", (4,)), ("b", "float16", (3,))]
    w = StreamingWriter(io.BytesIO(), entries)
    with pytest.raises(ValueError, match="out of order"):
        w.write_parts("b", [b"\0" * 6])
    with pytest.raises(ValueError, match="more than its 16 bytes"):
        w.write_parts("a", [b"\0" * 8, b"\0" * 12])
    w = StreamingWriter(io.BytesIO(), entries)
    with pytest.raises(ValueError, match="8 of its 16 bytes"):
        w.write_parts("a", [b"\0" * 8])
    f = io.BytesIO()
    w = StreamingWriter(f, entries)
    w.write_parts("a", [b"\1" * 8, b"\2" * 8])
    w.write_parts("b", [memoryview(b"\3" * 6)])
    w.close()
    assert f.getvalue().endswith(b"\1" * 8 + b"\2" * 8 + b"\3" * 6)


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("kernels", [False, True], ids=["hashlib", "kernels"])
def test_the_verifier_program_names_the_first_bad_blob_in_input_order(tmp_path, threads, kernels):
    import hashlib

    from patchctl.registry.ops.merging.verify import VERIFIER_MAIN

    if kernels and native.lib is None:
        pytest.skip("patchctl._kernels is not built here")
    extra = [native.lib._name] if kernels else []  # its pc_sha256_files hashes the files two at a time

    lines = []
    for i in range(6):
        data = bytes([i]) * (100_000 + i)
        p = tmp_path / f"b{i}"
        p.write_bytes(data)
        lines.append(f"sha256:{hashlib.sha256(data).hexdigest()} {len(data)} {p}")

    def verdict(ls: list[str]) -> str:
        r = subprocess.run([sys.executable, "-I", "-S", str(VERIFIER_MAIN), threads, *extra],
                           input="".join(x + "\n" for x in ls),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    assert verdict(lines) == "ok"
    good = [(tmp_path / f"b{i}").read_bytes() for i in (0, 5)]
    (tmp_path / "b0").write_bytes(b"\x09" * 100_000)
    (tmp_path / "b5").write_bytes(b"\x09" * 100_005)
    assert verdict(lines) == f"corrupt {lines[0].split()[0]}"  # the largest is hashed first; the first line is named
    (tmp_path / "b0").write_bytes(good[0])
    (tmp_path / "b5").write_bytes(good[1])
    (tmp_path / "b2").write_bytes(b"\2" * 100_001 + b"\3")  # same size, other bytes
    (tmp_path / "b4").unlink()
    assert verdict(lines) == f"corrupt {lines[2].split()[0]}"  # b2 comes before the missing b4
    assert verdict(lines[3:]) == f"missing {lines[4].split()[0]}"
    (tmp_path / "b5").write_bytes(b"\5")
    assert verdict([lines[5], *lines[:2]]) == f"size {lines[5].split()[0]}"
