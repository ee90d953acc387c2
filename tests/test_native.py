"""The C kernels (patchctl/_kernels.c): built where a compiler exists, same results as numpy.

tests/test_codec.py and tests/test_compress.py run every test on both paths
(the ``kernels`` fixture); here each kernel is checked against numpy directly,
and whole patches are compressed on both paths and compared byte for byte.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchctl.errors import InvalidArgument, InvalidPatch
from patchctl.patches import codec, native
from patchctl.patches.compress import sparsify

needs_native = pytest.mark.skipif(native.lib is None, reason="patchctl._kernels is not built here")


def test_kernels_are_built_where_a_c_compiler_exists():
    if os.environ.get("PATCHCTL_NATIVE", "1") in ("0", "no", "false", "off"):
        pytest.skip("PATCHCTL_NATIVE=0 turns the kernels off")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the optional extension is skipped at install time")
    assert native.available(), "pip install -e . should have built patchctl._kernels (setup.py)"


def test_patchctl_native_0_turns_the_kernels_off_in_a_new_process():
    code = "from patchctl.patches import native; print(native.available())"
    env = dict(os.environ, PATCHCTL_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def bits16(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint16)


@needs_native
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1000, 100_003])
def test_hist16_counts_every_raw_16_bit_pattern(n):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 65536, n, dtype=np.uint16)
    x[: n // 3] = 7  # long runs of one value: the sub-histograms must add up
    h = np.full(65536, 5, dtype=np.int64)  # it adds to what is there
    assert native.lib.pc_hist16(native.ptr(x), n, native.ptr(h)) == 0
    np.testing.assert_array_equal(h, np.bincount(x, minlength=65536) + 5)


@needs_native
@pytest.mark.parametrize("u", [1, 2, 0x3C00, 0x7BFF, 0x7C00, 0x7FFF, 0x8000])
def test_count16_and_select16_keep_exactly_abs_bits_at_or_above_u(u):
    rng = np.random.default_rng(u)
    n = 64 * 50 + 37  # full 64-entry blocks and a tail
    x = rng.integers(0, 65536, n, dtype=np.uint16)
    x[::5] = u | 0x8000  # ties at the threshold, negative
    x[1::7] = u - 1 if u else 0
    keep = np.flatnonzero((x & 0x7FFF) >= u)
    assert native.lib.pc_count16(native.ptr(x), n, u) == len(keep)
    idx = np.full(len(keep), -1, dtype=np.int64)
    signs = np.zeros(len(keep), dtype=np.uint8)
    got = native.lib.pc_select16(native.ptr(x), n, u, 1000, native.ptr(idx), native.ptr(signs), len(keep))
    assert got == len(keep)
    np.testing.assert_array_equal(idx, keep + 1000)
    np.testing.assert_array_equal(signs, x[keep] >> 15)
    if len(keep):  # a stale count (the tensor changed): -1, and nothing written past cap
        short = np.full(len(keep), -1, dtype=np.int64)
        got = native.lib.pc_select16(native.ptr(x), n, u, 0, native.ptr(short), 0, len(keep) - 1)
        assert got == -1
        assert short[-1] == -1


@needs_native
def test_gap_sums_rice_encode_and_decode_match_the_numpy_coder():
    rng = np.random.default_rng(5)
    numel = 300_000
    for d in (0.0005, 0.01, 0.2, 0.9):
        idx = np.flatnonzero(rng.random(numel) < d)
        sp = codec.SparseTensor((numel,), torch.float16, idx, "ternary", signs=rng.random(len(idx)) < 0.5, scale=1.0)
        with_c = codec.encode(sp)
        lib, native.lib = native.lib, None
        try:
            with_numpy = codec.encode(sp)
        finally:
            native.lib = lib
        assert with_c == with_numpy
        back = codec.decode(with_c)  # the C decoder
        np.testing.assert_array_equal(back.indices, idx)
        np.testing.assert_array_equal(back.signs, sp.signs)
        if d <= 0.2:  # Rice positions (d = 0.9 may go to zstd); k > 8 at d = 0.0005: multi-byte remainders
            assert with_c[9] == codec.POS_RICE and (d != 0.0005 or with_c[10] > 8)


@needs_native
@pytest.mark.parametrize("bad", ["negative", "equal", "too_large", "first_too_large"])
def test_gap_sums_rejects_bad_indices(bad):
    idx = np.arange(10, 200_000, 3, dtype=np.int64)
    if bad == "negative":
        idx[70_000 // 3] = -5
    elif bad == "equal":
        idx[-1] = idx[-2]
    elif bad == "too_large":
        idx[-1] = 10**12
    else:
        idx[0] = 10**12
    sp = codec.SparseTensor((200_000,), torch.float16, idx, "ternary", signs=np.zeros(len(idx), bool), scale=1.0)
    with pytest.raises(InvalidPatch, match="strictly increasing"):
        codec.encode(sp)


def both_paths(tensors, density, **kw):
    out = []
    for use in ("native", "numpy"):
        lib = native.lib
        if use == "numpy":
            native.lib = None
        try:
            out.append([(name, codec.encode(sp)) for name, sp in sparsify(lambda: iter(tensors.items()), density, **kw)])
        finally:
            native.lib = lib
    return out


@needs_native
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    density=st.sampled_from([0.001, 0.05, 0.1, 0.2, 0.5, 1.0]),
    zeros=st.floats(0, 0.9),
    scale=st.sampled_from([1e-4, 1.0, 300.0]),
    kw=st.sampled_from([{}, {"mode": "values"}, {"per_tensor": True}, {"scale": "mean"}, {"kappa": 2.5}]),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_patch_compresses_to_the_same_bytes_on_both_paths(sizes, dtype, density, zeros, scale, kw, seed):
    rng = np.random.default_rng(seed)
    tensors = {}
    for i, n in enumerate(sizes):
        x = rng.standard_normal(n) * scale
        x[rng.random(n) < zeros] = 0.0
        x[rng.random(n) < 0.1] = scale  # ties
        tensors[f"t{i}"] = torch.from_numpy(x).to(dtype)
    a, b = both_paths(tensors, density, **kw)
    assert a == b


@needs_native
def test_large_tensors_over_three_threads_give_the_same_bytes_on_both_paths():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        g = torch.Generator().manual_seed(3)
        tensors = {
            "a": torch.randn(5_000_000, generator=g).half(),
            "b": (torch.randn(3_000_001, generator=g) * 0.01).bfloat16(),
        }
        for d in (0.01, 0.2):
            a, b = both_paths(tensors, d)
            assert a == b
    finally:
        torch.set_num_threads(before)


@needs_native
def test_a_tensor_changing_between_count_and_select_is_invalid_argument():
    # the selection's per-part counts come from the first read; a tensor whose values
    # change after it must be caught by the kernel's bound, not overrun the output
    t = torch.randn(3_000_000, generator=torch.Generator().manual_seed(1)).half()
    calls = {"n": 0}

    def stream():
        calls["n"] += 1
        yield "t", (t if calls["n"] == 1 else t * 4)

    with pytest.raises(InvalidArgument, match="changed"):
        list(sparsify(stream, 0.1))
