"""The fast paths of push and apply (issue #21) give the bytes of the plain arithmetic, at any thread count.

The reference in each test is the arithmetic written out in float32 (``docs/design.md``: ``out =
(base.f32 + delta.f32).to(base.dtype)``, delta ``(ft.f32 - base.f32).to(dtype)``, pins where that
misses the fine-tune), not the code under test.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from patchctl import Registry
from patchctl.errors import InvalidPatch
from patchctl.patches import _workers
from patchctl.patches.apply import all_finite, combine, diff_with_pins, same_bytes

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _specials(dtype: torch.dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    vals = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), fi.max, -fi.max, fi.tiny, fi.tiny / 4,
            -fi.tiny / 3, fi.eps, 1.0, -1.0, 0.75, -1e-4]
    return torch.tensor(vals, dtype=torch.float32).to(dtype)


def _pair(dtype: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fine-tune, base): small random changes, zero crossings, huge changes and every special value."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    ft = (base.float() + 0.01 * torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.8)).to(dtype)
    ft[::97] = -base[::97]
    ft[5::101] = base[5::101] * 1000
    sp = _specials(dtype)
    idx = torch.randint(0, sp.numel(), (2, n // 7), generator=g)
    ft[::7][: n // 7], base[3::7][: n // 7] = sp[idx[0]], sp[idx[1]]
    return ft, base


def _reference(ft: torch.Tensor, base: torch.Tensor, dtype: torch.dtype):
    d = (ft.float() - base.float()).to(dtype)
    got = (base.float() + d.float()).to(base.dtype)
    iv = {2: torch.int16, 4: torch.int32}[ft.element_size()]
    idx = torch.nonzero(got.view(iv) != ft.view(iv)).reshape(-1)
    return d, idx, ft[idx]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_diff_with_pins_matches_the_float32_arithmetic_bit_for_bit(monkeypatch, dtype, out_dtype, threads):
    monkeypatch.setenv("PATCHCTL_THREADS", threads)
    for n, seed in ((7, 0), (70_001, 1), (1_300_003, 2)):  # one chunk; several; several per thread
        ft, base = _pair(dtype, n, seed)
        d, idx, vals = diff_with_pins(ft, base, out_dtype)
        rd, ridx, rvals = _reference(ft, base, out_dtype)
        assert d.dtype == out_dtype and torch.equal(_bits(d), _bits(rd)), (n, "delta")
        assert torch.equal(idx, ridx) and torch.equal(_bits(vals), _bits(rvals)), (n, "pins")
        out = combine(base, d)
        out.view(-1)[idx] = vals
        assert torch.equal(_bits(out), _bits(ft)), (n, "base + delta + pins is the fine-tune")


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_equals_the_float32_sum_rounded_once(dtype):
    ft, base = _pair(dtype, 600_011, 3)
    delta = ft  # any values of the base's dtype, specials included
    want = (base.float() + delta.float()).to(dtype)
    assert torch.equal(_bits(combine(base, delta)), _bits(want))
    out = torch.empty_like(base)
    assert combine(base, delta, out=out) is out and torch.equal(_bits(out), _bits(want))


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_all_finite_finds_nan_and_inf_anywhere(dtype):
    for n in (1, 33, 300_001):
        t = torch.randn(n).to(dtype)
        assert all_finite(t)
        for pos in {0, n // 2, n - 1}:
            for bad in (float("nan"), float("inf"), -float("inf")):
                u = t.clone()
                u[pos] = bad
                assert not all_finite(u), (n, pos, bad)


def test_same_bytes_compares_bits_not_values():
    a = torch.randn(1001).to(torch.bfloat16)  # 2002 bytes: compared as int16
    assert same_bytes(a, a.clone())
    b = a.clone()
    b[500] = -b[500] if b[500] != 0 else 1.0
    assert not same_bytes(a, b)
    z, nz = torch.zeros(8), torch.zeros(8)
    nz[3] = -0.0
    assert not same_bytes(z, nz)  # equal values, different bits
    nan = torch.full((4,), float("nan"))
    assert same_bytes(nan, nan.clone())  # equal bits, unequal values
    odd = torch.arange(7, dtype=torch.uint8)
    assert same_bytes(odd, odd.clone()) and not same_bytes(odd, odd + 1)


def test_run_ranges_from_several_threads_with_different_part_counts(monkeypatch):
    """The streams split kernels from several threads at once (the merge on one, base + merged on the
    model writer), each into its own number of parts: the shared pool must never be shut down under one
    of them ("cannot schedule new futures after shutdown" with 8 threads, before), and every range runs."""
    monkeypatch.setenv("PATCHCTL_THREADS", "8")
    errors: list[str] = []
    covered: list[int] = []

    def caller(min_per: int) -> None:
        try:
            for _ in range(800):
                got = _workers.run_ranges(lambda lo, hi: hi - lo, 8 << 20, 1, min_per)
                covered.append(sum(got))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=caller, args=(m,)) for m in (1 << 20, 3 << 20, 4 << 20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert covered == [8 << 20] * 2400


def test_workers_follows_patchctl_threads_then_the_usable_cores(monkeypatch):
    monkeypatch.setenv("PATCHCTL_THREADS", "3")
    assert _workers.workers() == 3
    monkeypatch.setenv("PATCHCTL_THREADS", "zero")
    assert _workers.workers() == len(os.sched_getaffinity(0))
    monkeypatch.delenv("PATCHCTL_THREADS")
    assert _workers.workers() == len(os.sched_getaffinity(0))


def test_behind_keeps_order_and_raises_a_failed_call():
    seen: list[int] = []

    def write(i: int) -> None:
        if i == 5:
            raise OSError("disk full")
        seen.append(i)

    with pytest.raises(OSError, match="disk full"), _workers.Behind(write, depth=2) as put:
        for i in range(10):
            put(i)
    assert seen == [0, 1, 2, 3, 4]  # in order; nothing after the failure ran past the queue depth
    done: list[int] = []
    with _workers.Behind(done.append) as put:
        for i in range(50):
            put(i)
    assert done == list(range(50))


def _model(folder, tensors: dict[str, torch.Tensor]):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    save_file(tensors, folder / "model.safetensors")
    return folder


def _toy(tmp_path):
    g = torch.Generator().manual_seed(4)
    base = {f"layer.{i}.weight": torch.randn(300, 1100, generator=g).to(torch.bfloat16) for i in range(3)}
    base["norm.weight"] = torch.ones(1100, dtype=torch.bfloat16)
    ft = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()}
    ft["norm.weight"] = base["norm.weight"].clone()  # unchanged: left out of the diff
    return _model(tmp_path / "base", base), _model(tmp_path / "ft", ft)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_push_then_apply_is_bit_exact_and_the_same_patch_at_any_thread_count(tmp_path, monkeypatch, threads):
    monkeypatch.setenv("PATCHCTL_THREADS", threads)
    base, ft = _toy(tmp_path)
    with Registry(tmp_path / "reg") as reg:
        digest = reg.push(ft, "toy:v1", base=base)
        m = reg.manifest("toy:v1")
        assert sorted(m.tensors) == ["layer.0.weight", "layer.1.weight", "layer.2.weight"]
        out = reg.apply("toy:v1", base, tmp_path / "out")
    want, got = load_file(ft / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(_bits(want[k]), _bits(got[k])) for k in want)
    monkeypatch.setenv("PATCHCTL_THREADS", "1" if threads == "2" else "2")
    with Registry(tmp_path / "other") as reg2:
        assert reg2.push(ft, "toy:v1", base=base) == digest


def test_a_failed_blob_write_on_the_writer_thread_fails_the_push_and_tags_nothing(tmp_path, monkeypatch):
    base, ft = _toy(tmp_path)
    from patchctl.registry.store.repository import Repository

    real = Repository.put_tensor
    calls = []

    def flaky(self, t, pins=None):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, t, pins)

    monkeypatch.setattr(Repository, "put_tensor", flaky)
    with Registry(tmp_path / "reg") as reg:
        with pytest.raises(OSError, match="No space left"):
            reg.push(ft, "toy:v1", base=base)
        assert reg.index.refs() == []
        assert not [p for p in (tmp_path / "reg" / "tmp").iterdir() if p.name.startswith("blob-")]


def test_push_refuses_a_fine_tune_whose_delta_overflows(tmp_path):
    g = torch.Generator().manual_seed(5)
    b = torch.randn(64, 64, generator=g)
    f = b.clone()
    f[3, 4], b[3, 4] = torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max  # the difference is inf
    base, ft = _model(tmp_path / "base", {"w": b}), _model(tmp_path / "ft", {"w": f})
    with Registry(tmp_path / "reg") as reg, pytest.raises(InvalidPatch, match="'w' contains NaN or Inf"):
        reg.push(ft, "toy:v1", base=base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ties_top_k_is_the_sorted_top_k_on_the_c_and_numpy_paths(kernels, dtype):
    from patchctl.patches.merge import _count_nonzero, top_k_mask

    g = torch.Generator().manual_seed(6)
    # many ties at the threshold (values on a coarse grid), zeros, -0.0 and both signs
    x = (torch.randint(-40, 41, (1_200_001,), generator=g).float() / 8).to(dtype)  # two 1M-entry scan steps
    x[::11] = -0.0
    assert _count_nonzero(x) == int(torch.count_nonzero(x))
    for k in (1, 300_001, int(torch.count_nonzero(x)) - 1):
        mask = top_k_mask(x, k)
        # reference: |x| descending, lowest flat index first among ties (a stable sort)
        order = torch.sort(x.float().abs(), descending=True, stable=True).indices[:k]
        want = torch.zeros(x.numel(), dtype=torch.bool)
        want[order] = True
        assert torch.equal(mask, want), k
