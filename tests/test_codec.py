"""Spec of patchctl.patches.codec: canonical bytes for sparse ternary/values tensors."""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchctl.errors import DeviceUnavailable, InvalidPatch
from patchctl.patches.codec import SparseTensor, decode, encode, to_dense

# every test here runs on both the C kernels and the numpy path (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("kernels")

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def ternary(shape, indices, signs, scale, dtype=torch.float16):
    return SparseTensor(
        tuple(shape), dtype, np.asarray(indices, dtype=np.int64), "ternary",
        signs=np.asarray(signs, dtype=np.bool_), scale=scale,
    )


def values(shape, indices, vals, dtype=torch.float16, vdtype=torch.float16):
    return SparseTensor(
        tuple(shape), dtype, np.asarray(indices, dtype=np.int64), "values",
        values=torch.tensor(vals, dtype=torch.float64).to(vdtype),
    )


def assert_same(a: SparseTensor, b: SparseTensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype and a.mode == b.mode
    assert a.indices.dtype == b.indices.dtype == np.int64
    np.testing.assert_array_equal(a.indices, b.indices)
    if a.mode == "ternary":
        np.testing.assert_array_equal(a.signs, b.signs)
        assert a.scale == b.scale
    else:
        assert a.values.dtype == b.values.dtype
        assert torch.equal(a.values.view(INT_VIEW[a.values.dtype]), b.values.view(INT_VIEW[b.values.dtype]))


# --------------------------------------------------------------------------- strategies


@st.composite
def sparse_tensors(draw, max_numel: int = 3000):
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 40), min_size=ndim, max_size=ndim)))
    if math.prod(shape) > max_numel:
        shape = tuple(min(d, 14) for d in shape)
    numel = math.prod(shape)
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["empty", "one", "all", "density"]))
    if numel == 0 or kind == "empty":
        nnz = 0
    elif kind == "one":
        nnz = 1
    elif kind == "all":
        nnz = numel
    else:
        nnz = int(round(numel * draw(st.floats(0.0, 1.0))))
    indices = np.sort(rng.choice(numel, size=nnz, replace=False)).astype(np.int64)
    if draw(st.sampled_from(["ternary", "values"])) == "ternary":
        scale = draw(st.floats(0.0, 2.0**100, allow_nan=False, width=32))
        return ternary(shape, indices, rng.random(nnz) < 0.5, scale, dtype)
    vdtype = draw(st.sampled_from(DTYPES))
    # any finite bit pattern of the values dtype
    if vdtype == torch.float32:
        bits = rng.integers(-(2**31), 2**31, nnz, dtype=np.int64).astype(np.int32)
        bits[(bits & 0x7F800000) == 0x7F800000] = 0
        vals = torch.from_numpy(bits).view(torch.float32)
    else:
        bits = rng.integers(-(2**15), 2**15, nnz, dtype=np.int64).astype(np.int16)
        exp = 0x7C00 if vdtype == torch.float16 else 0x7F80
        bits[(bits & exp) == exp] = 0
        vals = torch.from_numpy(bits).view(vdtype)
    return SparseTensor(shape, dtype, indices, "values", values=vals)


# --------------------------------------------------------------------------- round trip


@FUZZ
@given(sparse_tensors())
def test_codec_round_trip_is_exact_and_canonical(sp):
    data = encode(sp)
    back = decode(data)
    assert_same(sp, back)
    assert encode(back) == data
    dense = to_dense(back)
    assert dense.shape == sp.shape and dense.dtype == sp.dtype
    assert torch.equal(dense, to_dense(sp))
    flat = dense.reshape(-1)
    mask = torch.zeros(sp.numel, dtype=torch.bool)
    mask[torch.from_numpy(sp.indices)] = True
    assert not flat[~mask].any()


def test_to_dense_places_alpha_sign_and_values():
    sp = ternary((2, 3), [1, 4, 5], [False, True, False], 0.25, torch.bfloat16)
    assert torch.equal(
        to_dense(sp), torch.tensor([[0, 0.25, 0], [0, -0.25, 0.25]], dtype=torch.bfloat16)
    )
    sv = values((4,), [0, 3], [1.5, -2.0], torch.float32, torch.float16)
    assert torch.equal(to_dense(sv), torch.tensor([1.5, 0, 0, -2.0]))


def test_scalar_empty_and_full_tensors_round_trip():
    cases = [
        ternary((), [0], [True], 1.0),
        ternary((), [], [], 1.0),
        ternary((0,), [], [], 0.0),
        ternary((3, 0, 2), [], [], 2.0),
        values((5,), [0, 1, 2, 3, 4], [1, 2, 3, 4, 5], torch.float32, torch.float32),
    ]
    for sp in cases:
        back = decode(encode(sp))
        assert_same(sp, back)
    assert torch.equal(to_dense(cases[0]), torch.tensor(-1.0, dtype=torch.float16))
    assert encode(cases[4])[9] == 3  # nnz == numel: position coding "all", no position bytes


def test_scale_is_rounded_to_float32_on_construction():
    sp = ternary((2,), [0], [False], 0.1)
    assert sp.scale == float(np.float32(0.1))
    assert ternary((1,), [0], [False], -0.0).scale == 0.0
    assert math.copysign(1.0, ternary((1,), [0], [False], -0.0).scale) == 1.0


def test_encode_is_pinned_by_a_golden_digest():
    # gaps 0,4,0,4 -> Rice k = 0: unary 1 00001 1 00001 -> 0x86 0x10; signs 0101 -> 0x50
    sp = ternary((3, 4), [0, 5, 6, 11], [False, True, False, True], 0.5)
    data = encode(sp)
    assert data.hex() == (
        "50435350" "01" "01" "02" "00" "02" "01" "00" "00" "0000003f"
        "0400000000000000" "0200000000000000" "0000000000000000"
        "0100000000000000" "0000000000000000"
        "0300000000000000" "0400000000000000"
        "8610" "50"
    )
    assert hashlib.sha256(data).hexdigest() == "ee4e87e07913f271ad51b7880362c2cda1add8a9f72fcb163faf5a0e159d8068"
    sv = values((2, 3), [1, 4], [1.5, -3.0], torch.bfloat16, torch.bfloat16)
    assert hashlib.sha256(encode(sv)).hexdigest() == (
        "a48335bf250a5d58563839a8dec50c7eb00e296a5e369e1acab3c5ad7a94cd5c"
    )


def test_encode_gives_equal_bytes_for_equal_inputs():
    rng = np.random.default_rng(7)
    idx = np.sort(rng.choice(10_000, 700, replace=False))
    signs = rng.random(700) < 0.5
    a = ternary((100, 100), idx.copy(), signs.copy(), 0.125)
    b = ternary((100, 100), list(idx), list(signs), 0.125)
    assert encode(a) == encode(b)


def test_encode_picks_zstd_positions_for_a_periodic_support():
    sp = ternary((100_000,), np.arange(3, 100_000, 7), np.zeros(14_286, bool), 1.0)
    data = encode(sp)
    assert data[9] == 2 and data[10] == 4  # zstd of 4-byte shuffled gaps
    assert len(data) < 14_286 * 4 // 8  # far below Rice's 4 bits per gap
    assert_same(sp, decode(data))


def test_encode_picks_zstd_values_when_smaller():
    sv = values((50_000,), np.arange(0, 50_000, 2), np.full(25_000, 0.5), torch.float16)
    data = encode(sv)
    assert data[11] == 1
    assert_same(sv, decode(data))


def test_rice_stays_within_3_percent_of_the_entropy_bound():
    rng = np.random.default_rng(0)
    n, d = 1_000_000, 0.05
    idx = np.flatnonzero(rng.random(n) < d)
    sp = ternary((n,), idx, rng.random(len(idx)) < 0.5, 1.0)
    data = encode(sp)
    assert data[9] == 1
    h = -d * math.log2(d) - (1 - d) * math.log2(1 - d) + d
    assert len(data) * 8 / n <= 1.03 * h


def reference_rice(idx: np.ndarray) -> tuple[int, bytes, bytes]:
    """Position coding 1 as the module docstring states it, written plainly: (k, P1, P2)."""
    g = np.diff(idx, prepend=-1) - 1
    costs = [int(np.sum(g >> k)) + len(g) * (k + 1) for k in range(63)]
    k = costs.index(min(costs))  # first minimum: ties go to the smaller k
    ends = np.cumsum((g >> k) + 1) - 1
    bits = np.zeros(int(ends[-1]) + 1, dtype=np.uint8)
    bits[ends] = 1
    planes = [np.packbits((g >> j) & 1).tobytes() for j in range(k - 1, -1, -1)]
    return k, np.packbits(bits).tobytes(), b"".join(planes)


@pytest.fixture
def three_threads():
    """Three worker threads, so that large tensors are cut into three ranges."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def large_supports():
    rng = np.random.default_rng(11)
    yield "d=0.2", 6_000_000, np.flatnonzero(rng.random(6_000_000) < 0.2)
    yield "d=0.7 (k=0)", 2_000_000, np.flatnonzero(rng.random(2_000_000) < 0.7)
    # two empty stretches of 10**6: chunks whose unary codes are much longer than the others
    part = np.flatnonzero(rng.random(8_000_000) < 0.05)
    idx = np.concatenate([part, part + 9_000_000, part + 18_000_000])
    yield "long gaps", 27_000_000, idx


@pytest.mark.parametrize("name,numel,idx", list(large_supports()), ids=lambda v: v if isinstance(v, str) else "")
def test_large_tensors_code_to_the_reference_rice_bytes_across_chunks_and_threads(three_threads, name, numel, idx):
    rng = np.random.default_rng(12)
    signs = rng.random(len(idx)) < 0.5
    sp = ternary((numel,), idx, signs, 0.5)
    data = encode(sp)
    k, p1, p2 = reference_rice(idx)
    head = 56 + 8
    l1, l2, ls = struct.unpack_from("<QQQ", data, 24)
    assert (data[9], data[10]) == (1, k)
    assert data[head : head + l1] == p1
    assert data[head + l1 : head + l1 + l2] == p2
    assert data[head + l1 + l2 : head + l1 + l2 + ls] == np.packbits(signs).tobytes()
    back = decode(data)
    assert_same(sp, back)
    dense = torch.zeros(numel, dtype=torch.float16)
    dense[torch.from_numpy(idx)] = torch.where(torch.from_numpy(signs), -0.5, 0.5).half()
    assert torch.equal(to_dense(back), dense)


def test_encode_rejects_indices_out_of_order_in_any_chunk(three_threads):
    idx = np.arange(0, 4_000_000, 3)
    for bad in (len(idx) - 1, len(idx) // 2, 70_000):  # last chunk, a thread's first chunk, inside one
        wrong = idx.copy()
        wrong[bad] = wrong[bad - 1]
        with pytest.raises(InvalidPatch, match="strictly increasing"):
            encode(ternary((4_000_000,), wrong, np.zeros(len(idx), bool), 1.0))
    wrong = idx.copy()
    wrong[5] = -(2**62)  # a huge step down then back up: no overflow may hide it
    with pytest.raises(InvalidPatch, match="strictly increasing"):
        encode(ternary((4_000_000,), wrong, np.zeros(len(idx), bool), 1.0))


# --------------------------------------------------------------------------- bad input


def valid_encodings():
    rng = np.random.default_rng(3)
    idx = np.sort(rng.choice(2000, 150, replace=False))
    return [
        encode(ternary((40, 50), idx, rng.random(150) < 0.5, 0.75)),
        encode(values((2000,), idx, rng.standard_normal(150), torch.bfloat16, torch.bfloat16)),
        encode(ternary((100_000,), np.arange(3, 100_000, 7), np.zeros(14_286, bool), 1.0)),
        encode(values((50_000,), np.arange(0, 50_000, 2), np.full(25_000, 0.5))),
        encode(ternary((7,), np.arange(7), np.ones(7, bool), 2.0)),
    ]


VALID = valid_encodings()


def test_decode_rejects_every_truncation():
    for data in VALID[:2] + VALID[4:]:
        for cut in range(len(data)):
            with pytest.raises(InvalidPatch):
                decode(data[:cut])


def test_decode_rejects_trailing_bytes_bad_magic_and_version():
    data = VALID[0]
    with pytest.raises(InvalidPatch, match="section lengths"):
        decode(data + b"\0")
    with pytest.raises(InvalidPatch, match="PCSP"):
        decode(b"XCSP" + data[4:])
    with pytest.raises(InvalidPatch, match="version 2"):
        decode(data[:4] + b"\x02" + data[5:])
    with pytest.raises(InvalidPatch):
        decode("not bytes")  # type: ignore[arg-type]


def test_decode_rejects_nonzero_padding_and_nnz_over_numel():
    sp = ternary((3, 4), [0, 5, 6, 11], [False, True, False, True], 0.5)
    data = bytearray(encode(sp))
    data[-1] |= 0x01  # a padding bit of the signs section
    with pytest.raises(InvalidPatch, match="padding"):
        decode(bytes(data))
    data = bytearray(encode(sp))
    data[16:24] = struct.pack("<Q", 13)
    with pytest.raises(InvalidPatch, match="nnz"):
        decode(bytes(data))


def test_decode_rejects_a_huge_claimed_size_without_allocating_it():
    # header: values mode, "all" positions, nnz = numel = 2**40, zstd values of 10 bytes
    header = struct.pack(
        "<4sBBBBBBBBIQQQQQ", b"PCSP", 1, 2, 2, 2, 1, 3, 0, 1, 0, 2**40, 0, 0, 0, 10
    )
    with pytest.raises(InvalidPatch, match="cannot hold"):
        decode(header + struct.pack("<Q", 2**40) + b"\0" * 10)


@FUZZ
@given(st.binary(max_size=200))
def test_decode_of_random_bytes_raises_only_invalid_patch(data):
    for blob in (data, b"PCSP\x01" + data):
        try:
            decode(blob)
        except InvalidPatch:
            pass


@FUZZ
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=4),
    st.sampled_from(["flip", "set", "insert", "delete"]),
)
def test_decode_of_mutated_encodings_raises_only_invalid_patch(data, edits, how):
    buf = bytearray(data)
    for pos, byte in edits:
        pos %= len(buf) + (how == "insert")
        if how == "flip":
            buf[pos % len(buf)] ^= 1 << (byte % 8)
        elif how == "set":
            buf[pos % len(buf)] = byte
        elif how == "insert":
            buf.insert(pos, byte)
        elif len(buf) > 1:
            del buf[pos % len(buf)]
    try:
        sp = decode(bytes(buf))
    except InvalidPatch:
        return
    # whatever decodes is a valid sparse tensor that encodes again
    assert isinstance(encode(sp), bytes)
    if sp.numel <= 10**6:
        assert to_dense(sp).shape == sp.shape


def test_sparse_tensor_rejects_inconsistent_fields():
    with pytest.raises(InvalidPatch, match="strictly increasing"):
        encode(ternary((5,), [2, 1], [False, False], 1.0))
    with pytest.raises(InvalidPatch, match="strictly increasing"):
        encode(ternary((5,), [1, 5], [False, False], 1.0))
    with pytest.raises(InvalidPatch, match="signs"):
        ternary((5,), [1, 2], [False], 1.0)
    with pytest.raises(InvalidPatch, match="scale"):
        ternary((5,), [1], [False], math.nan)
    with pytest.raises(InvalidPatch, match="scale"):
        ternary((5,), [1], [False], -1.0)
    with pytest.raises(InvalidPatch, match="dtype"):
        ternary((5,), [1], [False], 1.0, torch.float64)
    with pytest.raises(InvalidPatch, match="mode"):
        SparseTensor((5,), torch.float16, np.zeros(0, np.int64), "binary")
    with pytest.raises(InvalidPatch, match="values"):
        values((5,), [1], [1.0], torch.float16, torch.float64)


# --------------------------------------------------------------------------- devices


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_dense_builds_the_tensor_on_the_gpu():
    rng = np.random.default_rng(1)
    idx = np.sort(rng.choice(10_000, 900, replace=False))
    for sp in (
        ternary((100, 100), idx, rng.random(900) < 0.5, 0.3, torch.bfloat16),
        values((100, 100), idx, rng.standard_normal(900), torch.float32, torch.float16),
    ):
        sp = decode(encode(sp))
        gpu = to_dense(sp, device="cuda")
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.cpu(), to_dense(sp))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_to_dense_on_a_missing_gpu_raises_device_unavailable():
    with pytest.raises(DeviceUnavailable, match="cuda"):
        to_dense(ternary((2,), [0], [False], 1.0), device="cuda")
