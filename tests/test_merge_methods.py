"""Merge methods: hand-computed cases, float64 references, DARE seeding, bad input, overrides."""

from __future__ import annotations

import ast
import hashlib
import inspect
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from patchctl.errors import InvalidArgument, ShapeMismatch
from patchctl.patches import host_merge, merge
from patchctl.patches.merge import METHODS, get_method, merge_tensor, resolve_params

# Two task vectors of 6 entries, weights 1 and 3. Every expected value below was
# worked out by hand from the definitions in merge.py's docstring.
A = [4.0, -2.0, 1.0, -3.0, 0.5, 2.0]
B = [-1.0, 3.0, 2.0, -2.0, 1.0, -0.5]
W = [1.0, 3.0]

# method -> (params, expected merged delta)
HAND_CASES: dict[str, tuple[dict[str, float], list[float]]] = {
    # (A + 3B) / 4 = [1, 7, 7, -9, 3.5, 0.5] / 4
    "linear": ({}, [0.25, 1.75, 1.75, -2.25, 0.875, 0.125]),
    # 0.5 * (A + 3B)
    "task_arithmetic": ({"lam": 0.5}, [0.5, 3.5, 3.5, -4.5, 1.75, 0.25]),
    # k = int(0.5*6) = 3, exactly 3 kept; rank = |x| descending, lowest index first among ties.
    # A by rank: 4@0, 3@3, 2@1, 2@5, 1@2, .5@4 -> the 2@5 tied with 2@1 loses: Â = [4, -2, 0, -3, 0, 0].
    # B by rank: 3@1, 2@2, 2@3, 1@0, ... -> B̂ = [0, 3, 2, -2, 0, 0].
    # 1·Â + 3·B̂ = [4, 7, 6, -9, 0, 0]: elected + + + - (+) (+).
    # agreeing mean: 4/1, 9/3, 6/3, (-3-6)/(1+3), none -> 0, none -> 0; × λ=2
    "ties": ({"density": 0.5, "lam": 2.0}, [8.0, 6.0, 4.0, -4.5, 0.0, 0.0]),
    # Â + 3B̂ as above
    "magnitude_prune": ({"density": 0.5}, [4.0, 7.0, 6.0, -9.0, 0.0, 0.0]),
    # top = int(0.2*6) = 1 dropped, keep = 3 next (ranks 2-4 in the order above).
    # A: drop 4@0; keep 3@3, 2@1, 2@5 -> [0, -2, 0, -3, 0, 2].
    # B: drop 3@1; keep 2@2, 2@3, 1@0 (1@4 ties with it and loses: higher index) ->
    #   [-1, 0, 2, -2, 0, 0]. A' + 3B' = [-3, -2, 6, -9, 0, 2].
    "breadcrumbs": ({"density": 0.5, "gamma": 0.2}, [-3.0, -2.0, 6.0, -9.0, 0.0, 2.0]),
    # DARE masks for seed 0, name "w", density 0.5 (pinned by
    # test_dare_mask_matches_documented_derivation): A keeps entries 2, 4, 5,
    # B keeps 1, 2, 3, 5; survivors ×2: Ã = [0, 0, 2, 0, 1, 4], B̃ = [0, 6, 4, -4, 0, -1].
    # Ã + 3B̃ = [0, 18, 14, -12, 1, 1]
    "dare_linear": ({"density": 0.5}, [0.0, 18.0, 14.0, -12.0, 1.0, 1.0]),
    # weighted: [0,0,2,0,1,4] and [0,18,12,-12,0,-3]; sum [0,18,14,-12,1,1] -> all + but entry 3.
    # entry 0 none agree -> 0; 18/3; (2+12)/4; -12/3; 1/1; 4/1 (B's -3 disagrees)
    "dare_ties": ({"density": 0.5}, [0.0, 6.0, 3.5, -4.0, 1.0, 4.0]),
}


def _run(method: str, deltas, weights, params=None, name: str = "w", seed: int = 0):
    return merge_tensor(method, deltas, weights, generator_seed=seed, name=name, params=params)


def test_table_every_method_has_a_hand_computed_case() -> None:
    assert set(HAND_CASES) == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_matches_hand_computed_result(method: str) -> None:
    params, expected = HAND_CASES[method]
    a, b = torch.tensor(A), torch.tensor(B)
    out = _run(method, [a, b], W, params)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor(expected), rtol=0, atol=0)
    assert a.tolist() == A and b.tolist() == B  # inputs untouched
    assert out.data_ptr() not in (a.data_ptr(), b.data_ptr())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_upcasts_half_inputs_and_keeps_shape(method: str) -> None:
    params, expected = HAND_CASES[method]
    deltas = [torch.tensor(A).reshape(2, 3).to(torch.bfloat16), torch.tensor(B).reshape(2, 3).half()]
    out = _run(method, deltas, W, params)
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    assert_close(out.reshape(-1), torch.tensor(expected), rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_table_defaults_match_function_signature(method: str) -> None:
    row = METHODS[method]
    assert set(merge.FUNCTIONS) == set(METHODS)
    sig = inspect.signature(merge.FUNCTIONS[method])
    kw = {
        n: p.default
        for n, p in sig.parameters.items()
        if p.kind is p.KEYWORD_ONLY and n not in ("generator_seed", "name", "out")
    }
    assert kw == dict(row.params)
    assert sig.parameters["out"].default is None
    assert list(sig.parameters)[:4] == ["deltas", "weights", "generator_seed", "name"]
    assert row.name == method
    assert re.fullmatch(r"https://arxiv\.org/abs/\d{4}\.\d{5}", row.paper)


def test_table_needs_two_inputs_flags() -> None:
    assert {n for n, m in METHODS.items() if m.needs_two_inputs} == {"linear", "ties", "dare_ties"}


def test_ties_zero_total_mass_elects_positive() -> None:
    out = _run("ties", [torch.tensor([1.0, -2.0]), torch.tensor([-1.0, 2.0])], [1.0, 1.0], {"density": 1.0})
    assert_close(out, torch.tensor([1.0, 2.0]), rtol=0, atol=0)


def test_ties_keeps_exactly_k_without_ties() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    out = _run("magnitude_prune", [x], [1.0], {"density": 0.25})
    assert int((out != 0).sum()) == 250
    assert out.abs()[out != 0].min() >= x.abs().kthvalue(751).values


def _oracle_top_k(x: torch.Tensor, k: int) -> set[int]:
    """The k flat indices ranked first by |x| descending, then lowest index (a full sort)."""
    mags = x.reshape(-1).float().abs().double().numpy()
    order = np.lexsort((np.arange(mags.size), -mags))  # last key is primary
    return set(order[:k].tolist())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_top_k_keeps_exactly_k_with_ties_broken_by_lowest_flat_index(dtype) -> None:
    x = torch.tensor([[1.0, -1.0, 1.0, 2.0, -1.0], [1.0, 1.0, -2.0, 1.0, 1.0]], dtype=dtype)
    # k = 5: the two 2s, then the first three of the eight tied 1s in flat order (0, 1, 2)
    kept = merge.top_k_mask(x, 5)
    assert kept.reshape(-1).nonzero().reshape(-1).tolist() == [0, 1, 2, 3, 7]
    out = _run("magnitude_prune", [x], [1.0], {"density": 0.5})
    assert out.reshape(-1).tolist() == [1.0, -1.0, 1.0, 2.0, 0.0, 0.0, 0.0, -2.0, 0.0, 0.0]
    ties_out = _run("ties", [x, torch.zeros_like(x)], [1.0, 1.0], {"density": 0.5})
    assert torch.equal(ties_out, out)


def test_top_k_many_ties_like_bf16_deltas_keeps_exactly_k() -> None:
    # bf16 fine-tune deltas are mostly ±1 ulp: a few magnitudes shared by millions of entries
    g = torch.Generator().manual_seed(3)
    n = 3 * host_merge._SCAN + 12_345  # the tie scan crosses chunk boundaries
    x = (torch.randint(-2, 3, (n,), generator=g).float() * 2.0**-10).to(torch.bfloat16)
    for density in (0.2, 0.5, 0.75):  # 80 % of the entries are non-zero
        k = int(density * n)
        mask = merge.top_k_mask(x, k)
        assert int(mask.sum()) == k
        ranked = x.abs().float()
        t = ranked[mask].min()
        assert bool((ranked[~mask] <= t).all()) and bool((ranked[mask] >= t).all())
        tied = (ranked == t).nonzero().reshape(-1)
        kept_tied = mask[tied]
        first_dropped = int(kept_tied.logical_not().nonzero()[0])  # lowest indices win
        assert bool(kept_tied[:first_dropped].all()) and not bool(kept_tied[first_dropped:].any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_matches_a_full_sort_and_ignores_thread_count(dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # few distinct magnitudes (ties), some signs, some zeros; float32 ties inside one high-bits bin
    x = (torch.randint(-40, 41, (257, 301), generator=g).float() * (1 + 2.0**-20)).to(dtype)
    threads = torch.get_num_threads()
    for k in (1, 1000, 30_000, x.numel() - 1):
        expected = _oracle_top_k(x, k)
        if int((x != 0).sum()) <= k:  # fewer non-zeros than k: every entry "kept", values unchanged
            continue
        try:
            torch.set_num_threads(1)
            one = merge.top_k_mask(x, k)
        finally:
            torch.set_num_threads(threads)
        assert set(one.reshape(-1).nonzero().reshape(-1).tolist()) == expected
        assert torch.equal(merge.top_k_mask(x, k), one)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "breadcrumbs", "task_arithmetic"])
def test_merge_on_cuda_matches_cpu_bit_for_bit(method: str) -> None:
    g = torch.Generator().manual_seed(5)
    deltas = [(torch.randint(-3, 4, (300, 70), generator=g).float() * 2.0**-9).to(torch.bfloat16) for _ in range(3)]
    cpu = _run(method, deltas, [0.5, 0.3, 0.2], None)
    gpu = _run(method, [d.cuda() for d in deltas], [0.5, 0.3, 0.2], None)
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merge_result_does_not_depend_on_the_chunk_size(method: str, monkeypatch) -> None:
    g = torch.Generator().manual_seed(9)
    deltas = [(torch.randn(37, 29, generator=g) * 0.01).to(torch.bfloat16) for _ in range(3)]
    params = {"density": 0.3} if "density" in METHODS[method].params else None
    whole = _run(method, deltas, [0.5, 0.3, 0.2], params)
    monkeypatch.setattr(merge, "_CHUNK", 7)
    monkeypatch.setattr(host_merge, "_SCAN", 11)
    chunked = _run(method, deltas, [0.5, 0.3, 0.2], params)
    assert torch.equal(whole.view(torch.int32), chunked.view(torch.int32))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merge_writes_into_out_when_given(method: str) -> None:
    params, expected = HAND_CASES[method]
    out = torch.full((6,), 99.0)
    got = merge_tensor(method, [torch.tensor(A), torch.tensor(B)], W, generator_seed=0, name="w", params=params, out=out)
    assert got is out and out.tolist() == expected
    with pytest.raises(InvalidArgument, match=r"out must be a contiguous float32, bfloat16 or float16 tensor of shape \(6,\)"):
        merge_tensor(method, [torch.tensor(A), torch.tensor(B)], W, generator_seed=0, name="w", params=params,
                     out=torch.empty(6, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_two_byte_out_gets_the_float32_result_rounded_chunk_by_chunk(method: str, dtype: torch.dtype,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(5)
    deltas = [(torch.randn(37, 29, generator=g) * 1e-2).to(torch.bfloat16) for _ in range(3)]
    params = {"density": 0.4} if "density" in METHODS[method].params else {}
    whole = merge_tensor(method, deltas, [0.5, 0.3, 0.2], generator_seed=1, name="w", params=params)
    monkeypatch.setattr(merge, "_CHUNK", 64)  # many chunks, the last one partial
    out = torch.full((37, 29), 7.0, dtype=dtype)
    got = merge_tensor(method, deltas, [0.5, 0.3, 0.2], generator_seed=1, name="w", params=params, out=out)
    assert got is out
    assert torch.equal(out.view(torch.int16), whole.to(dtype).view(torch.int16))


def test_weighted_sum_is_a_multiply_then_an_add_in_float32() -> None:
    # 1/3·x + 1/3·y, each product rounded to float32, then the sum rounded
    x, y = torch.tensor([1.1, -7.3, 3e-3]), torch.tensor([2.9, 5.5, 1e-8])
    third = 1 / 3
    expected = (x * third) + (y * third)
    assert torch.equal(_run("task_arithmetic", [x, y], [third, third]), expected)


def test_breadcrumbs_small_tensor_with_zero_outliers_keeps_density() -> None:
    # gamma·n < 1: nothing dropped at the top (mergekit would zero the tensor here)
    out = _run("breadcrumbs", [torch.tensor([1.0, -2.0, 3.0, -4.0])], [1.0], {"density": 0.5})
    assert_close(out, torch.tensor([0.0, 0.0, 3.0, -4.0]), rtol=0, atol=0)


def test_density_below_one_entry_zeroes_tensor() -> None:
    out = _run("magnitude_prune", [torch.tensor([1.0, 2.0, 3.0])], [1.0], {"density": 0.2})
    assert_close(out, torch.zeros(3), rtol=0, atol=0)


# ---------------------------------------------------------------- float64 references


def _ref_task_arithmetic(deltas: list[np.ndarray], weights: list[float], lam: float) -> np.ndarray:
    out = np.zeros_like(deltas[0])
    for d, w in zip(deltas, weights, strict=True):
        for j in range(d.size):
            out.flat[j] += w * d.flat[j]
    return lam * out


def _ref_ties(deltas: list[np.ndarray], weights: list[float], density: float, lam: float) -> np.ndarray:
    n = deltas[0].size
    k = int(density * n)
    trimmed = []
    for d in deltas:  # exactly k: |v| descending, then lowest flat index
        ranked = sorted(range(n), key=lambda j: (-abs(d.flat[j]), j))
        kept = set(ranked[:k])
        trimmed.append([v if j in kept else 0.0 for j, v in enumerate(d.flat)])
    out = np.zeros(n)
    for j in range(n):
        mass = sum(w * t[j] for w, t in zip(weights, trimmed, strict=True))
        sign = 1.0 if mass >= 0 else -1.0
        num = den = 0.0
        for w, t in zip(weights, trimmed, strict=True):
            if w * t[j] * sign > 0:
                num += w * t[j]
                den += w
        out[j] = num / den if den > 0 else 0.0
    return lam * out.reshape(deltas[0].shape)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_task_arithmetic_matches_float64_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(9, 17, generator=g) for _ in range(3)]
    weights = [0.7, -0.4, 1.3]
    out = _run("task_arithmetic", deltas, weights, {"lam": 0.8})
    ref = _ref_task_arithmetic([d.double().numpy() for d in deltas], weights, 0.8)
    assert_close(out.double(), torch.from_numpy(ref), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("density", [0.1, 0.37, 1.0])
def test_ties_matches_float64_reference(seed: int, density: float) -> None:
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(11, 13, generator=g) for _ in range(4)]
    weights = [1.0, 0.5, 2.0, 0.25]
    out = _run("ties", deltas, weights, {"density": density, "lam": 1.5})
    ref = _ref_ties([d.double().numpy() for d in deltas], weights, density, 1.5)
    assert_close(out.double(), torch.from_numpy(ref), rtol=2e-6, atol=2e-6)


# ---------------------------------------------------------------- DARE seeding


def _independent_dare_mask(seed: int, name: str, index: int, shape, density: float) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand(shape, generator=g) < density


def test_dare_mask_matches_documented_derivation() -> None:
    x = torch.randn(40, 30)
    for index in (0, 3):
        out = _run("dare_linear", [x] * (index + 1), [0.0] * index + [1.0], {"density": 0.3}, name="m.q", seed=7)
        mask = _independent_dare_mask(7, "m.q", index, x.shape, 0.3)
        assert torch.equal(out != 0, mask)
        assert_close(out[mask], x[mask] / 0.3, rtol=0, atol=0)
    masks = [_independent_dare_mask(0, "w", i, (6,), 0.5) for i in range(2)]
    assert masks[0].tolist() == [False, False, True, False, True, True]
    assert masks[1].tolist() == [False, True, True, True, False, True]


def test_dare_is_deterministic_and_keyed_by_name_seed_and_index() -> None:
    x = torch.ones(5000)
    a = _run("dare_linear", [x], [1.0], {"density": 0.5}, name="a", seed=1)
    assert torch.equal(a, _run("dare_linear", [x], [1.0], {"density": 0.5}, name="a", seed=1))
    assert not torch.equal(a, _run("dare_linear", [x], [1.0], {"density": 0.5}, name="b", seed=1))
    assert not torch.equal(a, _run("dare_linear", [x], [1.0], {"density": 0.5}, name="a", seed=2))
    two = _run("dare_linear", [x, x], [1.0, 0.0], {"density": 0.5}, name="a", seed=1)
    second = _run("dare_linear", [x, x], [0.0, 1.0], {"density": 0.5}, name="a", seed=1)
    assert torch.equal(two, a) and not torch.equal(second, a)


def test_dare_keeps_density_fraction_and_preserves_mean() -> None:
    out = _run("dare_linear", [torch.ones(200_000)], [1.0], {"density": 0.3}, seed=3)
    assert abs(float((out != 0).float().mean()) - 0.3) < 0.005
    assert abs(float(out.mean()) - 1.0) < 0.02


def test_dare_seed_is_stable_sha256() -> None:
    digest = hashlib.sha256(b"5\0x.y\x002").digest()
    assert merge.dare_seed(5, "x.y", 2) == int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------- bad input


def test_merge_unknown_method_names_it() -> None:
    with pytest.raises(InvalidArgument, match="'tie'.*ties"):
        get_method("tie")
    with pytest.raises(InvalidArgument, match="'tie'"):
        _run("tie", [torch.ones(2), torch.ones(2)], W)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merge_weights_length_mismatch_rejected(method: str) -> None:
    with pytest.raises(InvalidArgument, match="3 weights for 2 inputs"):
        _run(method, [torch.ones(2), torch.ones(2)], [1.0, 1.0, 1.0])


@pytest.mark.parametrize("method", sorted(n for n, m in METHODS.items() if "density" in m.params))
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan])
def test_merge_density_out_of_range_rejected(method: str, density: float) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(repr(density))):
        _run(method, [torch.ones(4), torch.ones(4)], W, {"density": density})


@pytest.mark.parametrize("method", sorted(n for n, m in METHODS.items() if m.needs_two_inputs))
def test_merge_single_input_rejected_where_two_needed(method: str) -> None:
    with pytest.raises(InvalidArgument, match=f"'{method}' needs at least 2 inputs, got 1"):
        _run(method, [torch.ones(4)], [1.0])


@pytest.mark.parametrize("method", sorted(n for n, m in METHODS.items() if not m.needs_two_inputs))
def test_merge_single_input_allowed_where_not_needed(method: str) -> None:
    assert _run(method, [torch.ones(4)], [1.0], {"density": 1.0} if "density" in METHODS[method].params else None).shape == (4,)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merge_shape_mismatch_names_shapes(method: str) -> None:
    with pytest.raises(ShapeMismatch, match=r"'blk\.w'.*input 1 has shape \(3, 2\).*\(2, 3\)"):
        _run(method, [torch.ones(2, 3), torch.ones(3, 2)], W, name="blk.w")


def test_merge_unknown_parameter_names_it() -> None:
    with pytest.raises(InvalidArgument, match="'densty'.*'ties'.*density, lam"):
        _run("ties", [torch.ones(2), torch.ones(2)], W, {"densty": 0.5})


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_merge_negative_weight_rejected_for_sign_election(method: str) -> None:
    with pytest.raises(InvalidArgument, match=r"-0\.5 for input 1"):
        _run(method, [torch.ones(2), torch.ones(2)], [1.0, -0.5], {"density": 1.0})


def test_linear_zero_weight_sum_rejected() -> None:
    with pytest.raises(InvalidArgument, match="non-zero sum"):
        _run("linear", [torch.ones(2), torch.ones(2)], [1.0, -1.0])


@pytest.mark.parametrize("value", [math.inf, "1", True])
def test_merge_non_finite_or_non_number_weight_rejected(value) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(repr(value))):
        _run("task_arithmetic", [torch.ones(2)], [value])


@pytest.mark.parametrize("gamma", [-0.1, 1.0])
def test_breadcrumbs_gamma_out_of_range_rejected(gamma: float) -> None:
    with pytest.raises(InvalidArgument, match=f"gamma.*{gamma!r}"):
        _run("breadcrumbs", [torch.ones(4)], [1.0], {"gamma": gamma})


def test_merge_integer_tensor_rejected() -> None:
    with pytest.raises(InvalidArgument, match="int64"):
        _run("task_arithmetic", [torch.ones(2, dtype=torch.int64)], [1.0])


# ---------------------------------------------------------------- overrides


BASE = {"density": 0.2, "lam": 1.0}


def test_resolve_params_no_match_returns_base_copy() -> None:
    out = resolve_params("model.embed_tokens.weight", BASE, [(r"\.mlp\.", {"density": 0.5})])
    assert out == BASE and out is not BASE


def test_resolve_params_later_rule_wins() -> None:
    rules = [(r"\.mlp\.", {"density": 0.3, "lam": 0.5}), (r"layers\.1\.", {"density": 0.6})]
    assert resolve_params("model.layers.1.mlp.w", BASE, rules) == {"density": 0.6, "lam": 0.5}
    assert resolve_params("model.layers.1.mlp.w", BASE, rules[::-1]) == {"density": 0.3, "lam": 0.5}
    assert resolve_params("model.layers.2.mlp.w", BASE, rules) == {"density": 0.3, "lam": 0.5}


def test_resolve_params_uses_search_not_fullmatch() -> None:
    assert resolve_params("model.layers.1.mlp.w", BASE, [("mlp", {"lam": 2.0})])["lam"] == 2.0
    assert resolve_params("model.layers.1.mlp.w", BASE, [("^mlp", {"lam": 2.0})])["lam"] == 1.0
    compiled = re.compile(r"w$")
    assert resolve_params("model.layers.1.mlp.w", BASE, [(compiled, {"lam": 3.0})])["lam"] == 3.0


def test_resolve_params_unknown_key_rejected_even_without_match() -> None:
    with pytest.raises(InvalidArgument, match="'desnity'"):
        resolve_params("model.embed.w", BASE, [("nomatch", {"desnity": 0.5})])


def test_resolve_params_invalid_regex_rejected() -> None:
    with pytest.raises(InvalidArgument, match=re.escape("'layers.(1'")):
        resolve_params("model.layers.1.w", BASE, [("layers.(1", {"lam": 2.0})])


# ---------------------------------------------------------------- purity


def test_patches_modules_do_not_import_registry_or_io() -> None:
    root = Path(merge.__file__).parent
    for fname in ("merge.py", "lines.py", "lora.py"):
        tree = ast.parse((root / fname).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith(("patchctl.registry", "safetensors"))
            elif isinstance(node, ast.Import):
                assert all(not a.name.startswith(("patchctl.registry", "os", "safetensors")) for a in node.names)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "open", fname
