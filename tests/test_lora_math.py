"""LoRA math: deltas, scaling, patterns, rank concatenation, SVD re-factoring, and peft itself."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from patchctl.errors import InvalidArgument, ShapeMismatch, UnsupportedPatch
from patchctl.patches.lora import (
    cat_lora,
    lora_delta,
    lora_embedding_delta,
    lora_scaling,
    pattern_value,
    svd_lora,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_lora_scaling_plain_and_rslora() -> None:
    assert lora_scaling(8, 16) == 2.0
    assert lora_scaling(4, 8, use_rslora=True) == 4.0
    assert lora_scaling(3, 6.0, True) == 6.0 / math.sqrt(3)


@pytest.mark.parametrize("r", [0, -1, 2.0, True])
def test_lora_scaling_bad_rank_rejected(r) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(repr(r))):
        lora_scaling(r, 8)


def test_lora_delta_hand_computed() -> None:
    A = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # r=2, in=3
    B = torch.tensor([[1.0, 1.0], [2.0, 0.0]])  # out=2, r=2
    expected = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 4.0]]) * 0.5
    assert torch.equal(lora_delta(A, B, 0.5), expected)
    assert torch.equal(lora_delta(A, B, 0.5, fan_in_fan_out=True), expected.T)
    assert lora_delta(A.half(), B.bfloat16(), 0.5).dtype == torch.float32


def test_lora_embedding_delta_is_transposed() -> None:
    A = torch.randn(3, 10, generator=_gen(0))  # [r, num_embeddings]
    B = torch.randn(4, 3, generator=_gen(1))  # [dim, r]
    out = lora_embedding_delta(A, B, 2.0)
    assert out.shape == (10, 4)
    assert torch.equal(out, (B @ A).T * 2.0)


def test_lora_delta_rank_mismatch_and_conv_rejected() -> None:
    with pytest.raises(ShapeMismatch, match=r"r=3.*r=2"):
        lora_delta(torch.ones(3, 5), torch.ones(4, 2), 1.0)
    with pytest.raises(UnsupportedPatch, match="conv LoRA"):
        lora_delta(torch.ones(2, 3, 3, 3), torch.ones(4, 2, 1, 1), 1.0)


def test_lora_linear_sum_equals_sum_of_deltas_exactly() -> None:
    loras = [
        (torch.randn(r, 12, generator=_gen(i)), torch.randn(9, r, generator=_gen(10 + i)), s, w)
        for i, (r, s, w) in enumerate([(4, 2.0, 0.5), (8, 0.75, 1.25), (2, 4.0, -1.0)])
    ]
    by_hand = torch.zeros(9, 12)
    via = torch.zeros(9, 12)
    for A, B, s, w in loras:
        by_hand += w * ((B @ A) * s)
        via += w * lora_delta(A, B, s)
    assert torch.equal(by_hand, via)


def test_cat_lora_is_exact_on_representable_values() -> None:
    g = _gen(3)
    loras = [
        (torch.randint(-4, 5, (r, 7), generator=g).float(), torch.randint(-4, 5, (5, r), generator=g).float(), s, w)
        for r, s, w in [(2, 2.0, 0.5), (3, 0.25, -1.0), (1, 8.0, 1.5)]
    ]
    A_cat, B_cat = cat_lora(loras)
    assert A_cat.shape == (6, 7) and B_cat.shape == (5, 6)
    expected = sum(w * s * (B @ A) for A, B, s, w in loras)
    assert torch.equal(B_cat @ A_cat, expected)


def test_cat_lora_random_matches_weighted_sum() -> None:
    loras = [
        (torch.randn(4, 16, generator=_gen(i)), torch.randn(8, 4, generator=_gen(20 + i)), 0.7 + i, 0.3 * (i + 1))
        for i in range(3)
    ]
    A_cat, B_cat = cat_lora(loras)
    expected = sum(w * lora_delta(A, B, s) for A, B, s, w in loras)
    assert_close(B_cat @ A_cat, expected, rtol=1e-5, atol=1e-5)


def test_cat_lora_mismatched_features_rejected() -> None:
    with pytest.raises(ShapeMismatch, match=r"LoRA 1 maps 6 -> 5 features but LoRA 0 maps 7 -> 5"):
        cat_lora([(torch.ones(2, 7), torch.ones(5, 2), 1.0, 1.0), (torch.ones(2, 6), torch.ones(5, 2), 1.0, 1.0)])
    with pytest.raises(InvalidArgument, match="at least one"):
        cat_lora([])


def _low_rank_plus_noise(m: int, n: int, r: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    low = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
    eps = noise * torch.randn(m, n, generator=g)
    return low + eps, eps


def test_svd_lora_error_equals_singular_value_tail_and_bound() -> None:
    M, eps = _low_rank_plus_noise(64, 48, 4, 1e-2, 0)
    A, B, err = svd_lora(M, 4, method="exact")
    assert A.shape == (4, 48) and B.shape == (64, 4)
    s = np.linalg.svd(M.double().numpy(), compute_uv=False)
    tail = math.sqrt(float((s[4:] ** 2).sum()) / float((s**2).sum()))
    assert err == pytest.approx(tail, rel=1e-4)
    actual = float(torch.linalg.matrix_norm(M - B @ A) / torch.linalg.matrix_norm(M))
    assert err == pytest.approx(actual, rel=1e-3)
    # Eckart-Young: the best rank-4 error is at most that of the planted low-rank part
    assert err <= float(torch.linalg.matrix_norm(eps) / torch.linalg.matrix_norm(M))
    assert err < 0.01


def test_svd_lora_randomized_error_matches_residual() -> None:
    M, _ = _low_rank_plus_noise(160, 100, 6, 1e-2, 1)
    A, B, err = svd_lora(M, 6, method="randomized", seed=5)
    actual = float(torch.linalg.matrix_norm(M - B @ A) / torch.linalg.matrix_norm(M))
    assert err == pytest.approx(actual, rel=1e-4)
    _, _, exact = svd_lora(M, 6, method="exact")
    assert exact <= err <= exact * 1.01
    A2, B2, err2 = svd_lora(M, 6, method="randomized", seed=5)
    assert torch.equal(A, A2) and torch.equal(B, B2) and err == err2


def test_svd_lora_full_rank_is_exact_and_padded() -> None:
    M = torch.randn(5, 3, generator=_gen(2))
    A, B, err = svd_lora(M, 6)
    assert A.shape == (6, 3) and B.shape == (5, 6)
    assert err == 0.0
    assert_close(B @ A, M, rtol=1e-5, atol=1e-5)
    assert svd_lora(torch.zeros(4, 4), 2)[2] == 0.0


def test_svd_lora_bad_input_rejected() -> None:
    with pytest.raises(ShapeMismatch, match=r"\(2, 2, 2\)"):
        svd_lora(torch.ones(2, 2, 2), 1)
    with pytest.raises(InvalidArgument, match="rank.*0"):
        svd_lora(torch.ones(2, 2), 0)


# ---------------------------------------------------------------- peft itself

peft = pytest.importorskip("peft")


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.0.self_attn.q_proj",
        "model.layers.10.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "q_proj",
        "model.layers.0.self_attn.qq_proj",
    ],
)
def test_pattern_value_matches_peft_get_pattern_key(key: str) -> None:
    from peft.utils.other import get_pattern_key

    pattern = {"q_proj": 8, r"layers\.1\d\.self_attn\.q_proj": 16, "proj": 2, "mlp.down_proj": 32}
    assert pattern_value(key, pattern, 4) == pattern.get(get_pattern_key(pattern.keys(), key), 4)


def test_pattern_value_semantics() -> None:
    pattern = {"q_proj": 8, r"layers\.1\d\.self_attn\.q_proj": 16}
    assert pattern_value("model.layers.12.self_attn.q_proj", pattern, 4) == 8  # first key wins
    assert pattern_value("model.layers.12.self_attn.qq_proj", pattern, 4) == 4  # suffix is dot-separated
    assert pattern_value("model.layers.12.self_attn.q_proj", dict(reversed(pattern.items())), 4) == 16


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 5)
        self.v = nn.Linear(5, 6)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.layers = nn.ModuleList([_Block() for _ in range(2)])


class _TinyConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(9, 6)  # weight [in=6, out=9]


def _lora_modules(model):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)]


def _randomize(mod, g: torch.Generator) -> None:
    with torch.no_grad():
        for group in (mod.lora_A, mod.lora_B):
            for layer in group.values():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        for group in (mod.lora_embedding_A, mod.lora_embedding_B):
            for p in group.values():
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8},
        {
            "r": 4,
            "lora_alpha": 8,
            "use_rslora": True,
            "rank_pattern": {"q": 2, r"layers\.1\.v": 3},
            "alpha_pattern": {"layers.0.q": 5, "embed": 3},
        },
    ],
    ids=["plain", "rslora-patterns"],
)
def test_lora_delta_matches_peft_get_delta_weight(config: dict) -> None:
    torch.manual_seed(0)
    cfg = peft.LoraConfig(target_modules=["q", "v", "embed"], **config)
    model = peft.get_peft_model(_Tiny(), cfg)
    g = _gen(0)
    seen = set()
    for name, mod in _lora_modules(model):
        _randomize(mod, g)
        r = pattern_value(name, cfg.rank_pattern, cfg.r)
        scaling = lora_scaling(r, pattern_value(name, cfg.alpha_pattern, cfg.lora_alpha), cfg.use_rslora)
        assert mod.scaling["default"] == scaling and mod.r["default"] == r
        if name == "embed":
            A, B = mod.lora_embedding_A["default"], mod.lora_embedding_B["default"]
            ours = lora_embedding_delta(A, B, scaling)
            assert ours.shape == mod.get_base_layer().weight.shape
        else:
            A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            ours = lora_delta(A, B, scaling, fan_in_fan_out=False)
        assert A.shape[0] == r
        assert torch.equal(ours, mod.get_delta_weight("default")), name
        seen.add(name)
    assert seen == {"embed", "layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v"}


def test_lora_delta_fan_in_fan_out_matches_peft_conv1d() -> None:
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    model = peft.get_peft_model(_TinyConv1D(), cfg)
    [(name, mod)] = _lora_modules(model)
    _randomize(mod, _gen(1))
    ours = lora_delta(mod.lora_A["default"].weight, mod.lora_B["default"].weight, lora_scaling(4, 8), True)
    assert ours.shape == mod.get_base_layer().weight.shape == (6, 9)
    assert torch.equal(ours, mod.get_delta_weight("default"))


def test_lora_delta_matches_peft_in_bfloat16() -> None:
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q"])
    model = peft.get_peft_model(_Tiny().to(torch.bfloat16), cfg, autocast_adapter_dtype=False)
    for _, mod in _lora_modules(model):
        _randomize(mod, _gen(2))
        assert mod.lora_A["default"].weight.dtype == torch.bfloat16
        ours = lora_delta(mod.lora_A["default"].weight, mod.lora_B["default"].weight, 2.0)
        assert torch.equal(ours.to(torch.bfloat16), mod.get_delta_weight("default"))
