"""LiNeS layer scaling: block parsing, scale values, the default alpha, streaming norms."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from patchctl.errors import InvalidArgument, ShapeMismatch
from patchctl.patches.lines import (
    apply_lines,
    block_index,
    default_alpha,
    l1_norms,
    lines_scale,
    num_blocks,
    single_patch_beta,
)
from patchctl.patches.merge import merge_tensor


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.10.mlp.w", 10),
        ("transformer.h.3.attn", 3),
        ("transformer.h.3.attn.c_attn.weight", 3),
        ("encoder.layer.0.attention", 0),
        ("blocks.2.x", 2),
        ("h.0.ln_1.weight", 0),
        ("model.layers.1.mlp.experts.7.w", 1),
        ("experts.1.w", None),
        ("model.mlp.experts.1.w", None),
        ("embed_tokens.weight", None),
        ("model.embed_tokens.weight", None),
        ("layers_x.1.w", None),
        ("mlp.layers_norm.3.w", None),
        ("model.hh.3.w", None),
        ("model.sublayers.3.w", None),
        ("model.layers.1a.w", None),
        ("model.layers.7", None),
        ("lm_head.weight", None),
        ("model.norm.weight", None),
    ],
)
def test_block_index_parses_anchored_components(name: str, expected: int | None) -> None:
    assert block_index(name) == expected


def test_num_blocks_is_max_index_plus_one() -> None:
    names = ["model.embed_tokens.weight", "model.layers.0.q", "model.layers.11.q", "model.layers.3.mlp.experts.40.w"]
    assert num_blocks(names) == 12
    assert num_blocks(["embed.weight", "experts.9.w"]) == 0
    assert num_blocks(iter(["h.4.w"])) == 5


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.embed_tokens.weight", 0.2),
        ("model.layers.0.q", 0.2),
        ("model.layers.1.q", 0.4),
        ("model.layers.2.q", 0.6),
        ("model.layers.4.mlp.experts.3.w", 1.0),
        ("lm_head.weight", 0.2),
    ],
)
def test_lines_scale_values_for_known_alpha_beta_and_blocks(name: str, expected: float) -> None:
    assert lines_scale(name, 5, 0.2, 0.8) == pytest.approx(expected, abs=1e-15)


def test_lines_scale_single_block_gets_alpha_plus_beta() -> None:
    assert lines_scale("blocks.0.w", 1, 0.25, 0.5) == 0.75
    assert lines_scale("embed.w", 1, 0.25, 0.5) == 0.25


def test_lines_scale_block_beyond_num_blocks_rejected() -> None:
    with pytest.raises(InvalidArgument, match=r"'model\.layers\.5\.q' is in block 5.*num_blocks=5"):
        lines_scale("model.layers.5.q", 5, 0.2, 0.8)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.5"])
def test_lines_scale_non_finite_alpha_rejected(bad) -> None:
    with pytest.raises(InvalidArgument, match="alpha"):
        lines_scale("h.0.w", 2, bad, 0.5)


def test_single_patch_beta_is_one_minus_alpha() -> None:
    alpha = 0.3
    beta = single_patch_beta(alpha)
    assert beta == 0.7
    assert lines_scale("h.9.w", 10, alpha, beta) == 1.0
    assert lines_scale("h.0.w", 10, alpha, beta) == 0.3


def test_default_alpha_hand_computed() -> None:
    # ‖Σ τ‖₁ = 6, ‖τ_merged‖₁ = 2, T = 2 -> (6/2)/2
    assert default_alpha(6.0, 2.0, 2) == 1.5
    sums = l1_norms([torch.tensor([1.0, -2.0]), torch.tensor([3.0, -1.0])], torch.tensor([2.0, 0.0]))
    assert sums == (7.0, 2.0)  # |1+3| + |-2-1|, |2| + |0|


def test_default_alpha_for_task_arithmetic_is_one_over_t() -> None:
    g = torch.Generator().manual_seed(0)
    model = {f"model.layers.{i}.w": [torch.randn(4, 5, generator=g) for _ in range(4)] for i in range(3)}
    model["model.embed.weight"] = [torch.randn(7, generator=g) for _ in range(4)]
    total_sum = total_merged = 0.0
    for name, deltas in model.items():  # first streaming pass
        merged = merge_tensor("task_arithmetic", deltas, [1.0] * 4, generator_seed=0, name=name)
        s, m = l1_norms(deltas, merged)
        total_sum, total_merged = total_sum + s, total_merged + m
    assert default_alpha(total_sum, total_merged, 4) == pytest.approx(0.25, rel=1e-6)


def test_default_alpha_undoes_lambda_for_shallow_layers() -> None:
    deltas = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])]
    merged = merge_tensor("task_arithmetic", deltas, [1.0, 1.0], generator_seed=0, name="x", params={"lam": 0.5})
    alpha = default_alpha(*l1_norms(deltas, merged), 2)
    assert_close(apply_lines(merged, "embed.w", 4, alpha, 0.3), (deltas[0] + deltas[1]) / 2)


def test_l1_norms_streamed_equal_whole_model() -> None:
    g = torch.Generator().manual_seed(1)
    parts = [[torch.randn(3, 4, generator=g) for _ in range(2)] for _ in range(3)]
    merged = [torch.randn(3, 4, generator=g) for _ in range(3)]
    streamed = [l1_norms(p, m) for p, m in zip(parts, merged, strict=True)]
    whole_sum = sum(float((p[0] + p[1]).abs().sum()) for p in parts)
    whole_merged = float(torch.cat([m.reshape(-1) for m in merged]).abs().sum())
    assert sum(s for s, _ in streamed) == pytest.approx(whole_sum, rel=1e-6)
    assert sum(m for _, m in streamed) == pytest.approx(whole_merged, rel=1e-6)


def test_default_alpha_zero_merged_norm_rejected() -> None:
    with pytest.raises(InvalidArgument, match="L1 norm 0.0"):
        default_alpha(3.0, 0.0, 2)
    with pytest.raises(InvalidArgument, match="num_tasks.*0"):
        default_alpha(3.0, 1.0, 0)


def test_l1_norms_shape_mismatch_rejected() -> None:
    with pytest.raises(ShapeMismatch, match=r"\(3,\).*\(2,\)"):
        l1_norms([torch.ones(3)], torch.ones(2))


def test_apply_lines_scales_in_float32() -> None:
    out = apply_lines(torch.tensor([2.0, -4.0], dtype=torch.bfloat16), "model.layers.1.q", 3, 0.5, 1.0)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([2.0, -4.0]), rtol=0, atol=0)
