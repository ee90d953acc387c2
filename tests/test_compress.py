"""Spec of patchctl.patches.compress: ComPEFT top-k + ternary, values, DARE."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchctl.errors import InvalidArgument, InvalidPatch
from patchctl.patches.codec import decode, encode, to_dense
from patchctl.patches.compress import (
    entropy_bound_bits,
    global_threshold,
    relative_l2_error,
    sparsify,
)

# every test here runs on both the C kernels and the numpy path (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("kernels")


def stream(tensors: dict[str, torch.Tensor]):
    return lambda: iter(tensors.items())


def run(tensors, density, **kw):
    return dict(sparsify(stream(tensors), density, **kw))


def compeft(tensors: dict[str, torch.Tensor], density: float, kappa: float = 1.0):
    """ComPEFT's compress step, written as in its code: one kthvalue over the concatenation."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors.values()])
    n = flat.numel()
    k = n - int(n * density)
    threshold = flat.abs().kthvalue(k).values
    mask = flat.abs() >= threshold
    alpha = kappa * flat.std()
    out, start = {}, 0
    for name, t in tensors.items():
        out[name] = mask[start : start + t.numel()].reshape(t.shape)
        start += t.numel()
    return out, float(alpha), float(threshold)


# --------------------------------------------------------------------------- ComPEFT


def test_global_topk_and_std_alpha_match_compeft_by_hand():
    a = torch.tensor([[0.5, -2.0], [1.0, -1.0]])
    b = torch.tensor([3.0, -0.25, 1.0, 0.0])
    # n = 8, m = int(8 * 0.5) = 4: the 4th smallest |x| of 0 .25 .5 1 1 1 2 3 is 1.0;
    # every |x| >= 1 is kept (three ties at the threshold)
    assert global_threshold(stream({"a": a, "b": b}), 0.5) == 1.0
    out = run({"a": a, "b": b}, 0.5)
    assert out["a"].indices.tolist() == [1, 2, 3]
    assert out["a"].signs.tolist() == [True, False, True]
    assert out["b"].indices.tolist() == [0, 2]
    assert out["b"].signs.tolist() == [False, False]
    # sum = 2.25, sum of squares = 16.3125: unbiased var = (16.3125 - 2.25**2 / 8) / 7
    alpha = float(np.float32(math.sqrt((16.3125 - 2.25**2 / 8) / 7)))
    assert out["a"].scale == out["b"].scale == alpha
    assert alpha == pytest.approx(torch.cat([a.reshape(-1), b]).std().item(), rel=1e-7)
    assert torch.equal(to_dense(out["a"]), torch.tensor([[0.0, -alpha], [alpha, -alpha]]))
    assert torch.equal(to_dense(out["b"]), torch.tensor([alpha, 0.0, alpha, 0.0]))


def test_kappa_scales_alpha():
    t = {"x": torch.tensor([1.0, -3.0, 2.0, 0.5])}
    std = torch.tensor([1.0, -3.0, 2.0, 0.5], dtype=torch.float64).std().item()
    assert run(t, 0.5, kappa=2.5)["x"].scale == float(np.float32(2.5 * std))


@st.composite
def patches(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tensors = {}
    for i in range(draw(st.integers(1, 4))):
        shape = tuple(draw(st.lists(st.integers(0, 30), min_size=0, max_size=2)))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
        if draw(st.booleans()):  # few distinct values: many ties at the threshold
            x = rng.integers(-4, 5, size=shape) * 0.25
        else:
            x = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 2)
        tensors[f"t{i}"] = torch.tensor(x, dtype=torch.float32).to(dtype)
    return tensors


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patches(), st.floats(0.001, 0.999))
def test_global_topk_matches_compeft_on_random_patches(tensors, density):
    n = sum(t.numel() for t in tensors.values())
    if n < 2:
        return
    masks, alpha, threshold = compeft(tensors, density)
    assert global_threshold(stream(tensors), density) == threshold
    out = run(tensors, density)
    for name, t in tensors.items():
        kept = masks[name].reshape(-1) & (t.reshape(-1) != 0)  # zeros are never stored
        assert out[name].indices.tolist() == torch.nonzero(kept).flatten().tolist()
        assert out[name].signs.tolist() == (t.reshape(-1)[kept] < 0).tolist()
        assert out[name].scale == pytest.approx(alpha, rel=1e-6, abs=1e-30)


def test_float32_entries_sharing_a_histogram_bin_are_refined_exactly():
    # 1 + i * 2**-23 all share one 2**13-wide bin of the float32 bit patterns
    x = (1.0 + torch.arange(3000, dtype=torch.float64) * 2.0**-23).float()
    y = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float16)  # fp16 entries in the same bin
    tensors = {"x": x[torch.randperm(3000, generator=torch.Generator().manual_seed(0))], "y": y}
    for density in (0.001, 0.3, 0.9, 0.9995):
        masks, _, threshold = compeft(tensors, density)
        assert global_threshold(stream(tensors), density) == threshold
        out = run(tensors, density, mode="values", values_dtype=torch.float32)
        assert out["x"].indices.tolist() == torch.nonzero(masks["x"]).flatten().tolist()
        assert out["y"].indices.tolist() == torch.nonzero(masks["y"]).flatten().tolist()


def test_large_tensors_split_over_threads_give_the_same_result_as_one_thread():
    g = torch.Generator().manual_seed(5)
    tensors = {
        "h": torch.randn(2_500_000, generator=g).half(),  # over 2**21 entries: threaded path
        "b": (torch.randn(2_200_000, generator=g) * 2).bfloat16(),
        "f": torch.randn(2_300, generator=g),
    }
    masks, alpha, threshold = compeft(tensors, 0.02)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert global_threshold(stream(tensors), 0.02) == threshold
            results.append(run(tensors, 0.02))
    finally:
        torch.set_num_threads(before)
    for name, t in tensors.items():
        expect = torch.nonzero(masks[name].reshape(-1)).flatten().numpy()
        for out in results:
            assert np.array_equal(out[name].indices, expect)
            assert np.array_equal(out[name].signs, (t.reshape(-1)[expect] < 0).numpy())
            assert out[name].scale == pytest.approx(alpha, rel=1e-6)


# --------------------------------------------------------------------------- modes and options


def test_per_tensor_topk_keeps_a_share_of_each_tensor_while_global_prefers_the_larger():
    g = torch.Generator().manual_seed(0)
    tensors = {"big": 10 * torch.randn(1000, generator=g), "small": torch.randn(1000, generator=g)}
    glob = run(tensors, 0.1)
    per = run(tensors, 0.1, per_tensor=True)
    # global: int(2000 * 0.1) + 1 = 201 largest |x| overall, all from the 10x larger tensor
    assert (glob["big"].nnz, glob["small"].nnz) == (201, 0)
    # per tensor: int(1000 * 0.1) + 1 = 101 of each
    assert (per["big"].nnz, per["small"].nnz) == (101, 101)
    assert glob["big"].scale == glob["small"].scale
    for name, t in tensors.items():
        assert per[name].scale == float(np.float32(t.double().std().item()))


def test_values_mode_keeps_the_values_in_the_requested_dtype():
    x = torch.tensor([0.1, -5.0, 2.0, -0.3, 7.25, 0.0])
    out = run({"x": x}, 0.5, mode="values")
    # n = 6, m = 3: the 3rd smallest |x| is 0.3, so the m + 1 = 4 entries >= 0.3 are kept
    assert out["x"].indices.tolist() == [1, 2, 3, 4]
    assert out["x"].values.dtype == torch.float16
    assert torch.equal(out["x"].values, x[[1, 2, 3, 4]].half())
    bf = run({"x": x}, 0.5, mode="values", values_dtype=torch.bfloat16)["x"]
    assert torch.equal(bf.values, x[[1, 2, 3, 4]].bfloat16())
    assert to_dense(bf).dtype == torch.float32


def test_mean_scale_is_the_mean_magnitude_of_each_tensors_kept_entries():
    tensors = {"a": torch.tensor([4.0, -2.0, 0.5, 0.25]), "b": torch.tensor([-1.0, 0.125, 3.0, 0.0])}
    out = run(tensors, 0.5, scale="mean")
    # threshold: n = 8, m = 4, 4th smallest |x| = 0.5 -> a keeps 4, 2, .5; b keeps 1, 3
    assert out["a"].scale == float(np.float32((4.0 + 2.0 + 0.5) / 3))
    assert out["b"].scale == 2.0


def test_density_one_keeps_every_nonzero_entry_and_zeros_are_never_stored():
    x = torch.tensor([[0.0, 1.5], [-2.0, 0.0]], dtype=torch.bfloat16)
    assert global_threshold(stream({"x": x}), 1.0) == 0.0
    for mode in ("ternary", "values", "dare"):
        assert run({"x": x}, 1.0, mode=mode)["x"].indices.tolist() == [1, 2]
    dense = to_dense(run({"x": x}, 1.0, mode="values", values_dtype=torch.bfloat16)["x"])
    assert torch.equal(dense, x)


def test_empty_scalar_and_single_entry_patches():
    tensors = {"e": torch.zeros(0, 3), "s": torch.tensor(-2.5), "v": torch.tensor([0.5, 1.0])}
    out = run(tensors, 0.5)
    assert out["e"].shape == (0, 3) and out["e"].nnz == 0
    assert out["s"].shape == () and out["s"].indices.tolist() == [0]
    assert decode(encode(out["s"])).signs.tolist() == [True]
    assert global_threshold(stream({"e": torch.zeros(0)}), 0.5) == math.inf
    assert run({"e": torch.zeros(0)}, 0.5)["e"].nnz == 0
    # one entry has no unbiased std: alpha falls back to mean |x_kept|
    assert run({"s": torch.tensor([-2.5])}, 1.0)["s"].scale == 2.5


def test_dare_drops_with_probability_p_and_rescales_survivors_by_one_over_one_minus_p():
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(1))
    sp = run({"w": x}, 0.3, mode="dare", values_dtype=torch.float32)["w"]
    idx = torch.from_numpy(sp.indices)
    assert torch.equal(sp.values, x[idx] * (1.0 / 0.3))
    sigma = math.sqrt(20_000 * 0.3 * 0.7)
    assert abs(sp.nnz - 6000) < 4 * sigma


def test_dare_mask_is_torch_rand_under_a_sha256_seed_of_seed_and_name():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    sp = run({"layer.0.w": x}, 0.2, mode="dare", seed=42)["layer.0.w"]
    s = int.from_bytes(hashlib.sha256(b"42:layer.0.w").digest()[:8], "little") & (2**63 - 1)
    keep = torch.rand(5000, generator=torch.Generator().manual_seed(s)) < 0.2
    assert sp.indices.tolist() == torch.nonzero(keep).flatten().tolist()


def test_dare_is_deterministic_per_seed_and_name_and_independent_of_other_tensors():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(3))
    first = run({"a": x}, 0.5, mode="dare", seed=7)["a"].indices
    assert np.array_equal(first, run({"z": x.clone(), "a": x}, 0.5, mode="dare", seed=7)["a"].indices)
    assert not np.array_equal(first, run({"a": x}, 0.5, mode="dare", seed=8)["a"].indices)
    assert not np.array_equal(first, run({"b": x}, 0.5, mode="dare", seed=7)["b"].indices)


def test_ternary_fp16_patch_codes_within_3_percent_of_the_entropy_bound():
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(4)).half()
    sp = run({"x": x}, 0.05)["x"]
    assert len(encode(sp)) * 8 / x.numel() <= 1.03 * entropy_bound_bits(0.05)


def test_relative_l2_error_is_the_norm_of_the_dropped_part_over_the_norm():
    dense = torch.tensor([3.0, 4.0])
    sp = run({"x": dense}, 0.4, mode="values", values_dtype=torch.float32)["x"]
    assert sp.indices.tolist() == [1]  # m = int(0.8) = 0: only the maximum is kept
    assert relative_l2_error(dense, sp) == pytest.approx(0.6, rel=1e-15)
    assert relative_l2_error(torch.zeros(2), run({"x": torch.zeros(2)}, 0.5)["x"]) == 0.0
    with pytest.raises(InvalidArgument, match="shape"):
        relative_l2_error(torch.zeros(3), sp)


def test_entropy_bound_is_binary_entropy_plus_density():
    bounds = {0.01: 0.0908, 0.05: 0.3364, 0.1: 0.5690, 0.2: 0.9219}
    for d, bits in bounds.items():
        assert round(entropy_bound_bits(d), 4) == bits
    assert entropy_bound_bits(0.5) == 1.5
    assert (entropy_bound_bits(0.0), entropy_bound_bits(1.0)) == (0.0, 1.0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.0001, 2, math.nan, math.inf, "0.5", True, None])
def test_density_outside_zero_one_is_invalid_argument(density):
    t = stream({"x": torch.ones(4)})
    with pytest.raises(InvalidArgument, match="density"):
        sparsify(t, density)
    with pytest.raises(InvalidArgument, match="density"):
        global_threshold(t, density)


@pytest.mark.parametrize(
    "kw",
    [
        {"mode": "topk"},
        {"scale": "max"},
        {"kappa": 0.0},
        {"kappa": math.nan},
        {"values_dtype": torch.float64},
        {"seed": 1.5},
    ],
)
def test_bad_options_are_invalid_argument(kw):
    with pytest.raises(InvalidArgument):
        sparsify(stream({"x": torch.ones(4)}), 0.5, **kw)


def test_a_stream_must_be_a_callable():
    with pytest.raises(InvalidArgument, match="callable"):
        sparsify({"x": torch.ones(4)}, 0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "kw", [{}, {"per_tensor": True}, {"mode": "values"}, {"mode": "dare"}, {"scale": "mean"}]
)
def test_nan_or_inf_is_invalid_patch_naming_the_tensor(dtype, bad, kw):
    x = torch.ones(10, dtype=dtype)
    x[3] = bad
    tensors = {"ok": torch.ones(3), "layers.1.mlp": x}
    with pytest.raises(InvalidPatch, match=r"'layers\.1\.mlp' contains NaN or Inf"):
        run(tensors, 0.5, **kw)
    with pytest.raises(InvalidPatch, match=r"'layers\.1\.mlp'"):
        global_threshold(stream(tensors), 0.5)


def test_unsupported_dtype_is_invalid_patch_naming_the_tensor():
    with pytest.raises(InvalidPatch, match=r"'w'.*float64"):
        run({"w": torch.ones(3, dtype=torch.float64)}, 0.5)
    with pytest.raises(InvalidPatch, match=r"'w'.*not a torch.Tensor"):
        run({"w": [1.0, 2.0]}, 0.5)


def test_values_that_overflow_float16_are_invalid_argument():
    with pytest.raises(InvalidArgument, match="overflow"):
        run({"w": torch.tensor([1e6, 1.0])}, 0.5, mode="values")


def test_a_stream_that_changes_between_passes_is_invalid_argument():
    calls = []

    def changing():
        calls.append(1)
        return iter([("x", torch.ones(4) * len(calls)), ("y", torch.ones(len(calls)))])

    with pytest.raises(InvalidArgument, match="repeatable"):
        list(sparsify(changing, 0.5))


def test_a_large_tensor_whose_values_change_between_passes_is_invalid_argument():
    # over 2**21 entries on two threads: the selection takes each part's count from the
    # first pass's histograms, and must notice that the second pass does not match them
    g = torch.Generator().manual_seed(9)
    first = torch.randn(2_500_000, generator=g).half()
    calls = []

    def changing():
        calls.append(1)
        return iter([("x", first if len(calls) == 1 else first.flip(0) * 2)])

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(InvalidArgument, match="changed while it was being compressed"):
            list(sparsify(changing, 0.1))
    finally:
        torch.set_num_threads(before)
