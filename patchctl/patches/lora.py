"""LoRA math in the PEFT convention, in float32.

A LoRA module has ``lora_A`` ``[r, in_features]`` and ``lora_B``
``[out_features, r]``; its weight delta is ``ΔW = (B @ A) · scaling`` with
``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), transposed when the
base layer stores ``[in, out]`` (``fan_in_fan_out``, GPT-2's ``Conv1D``).
Embedding LoRA stores ``lora_embedding_A`` ``[r, num_embeddings]`` and
``lora_embedding_B`` ``[dim, r]`` and its delta is ``(B @ A).T · scaling``
(``[num_embeddings, dim]``, like the embedding weight) — the same as peft's
``Embedding.get_delta_weight``. Conv LoRA (4-D factors) is not handled.

Everything here is pure tensor math: no files, no registry.

``rank_pattern``/``alpha_pattern`` keys are regexes (peft's semantics) read from
untrusted configs: :func:`pattern_matches` runs them in a linear-time engine
(RE2, the ``google-re2`` package) and falls back, for the few keys RE2 cannot
run or may read differently, to Python's ``re`` in a child process killed after
:data:`MATCH_SECONDS`. So peft's answer is kept for every key, and no key can
make a match take longer than that bound.
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from patchctl.errors import InvalidArgument, ShapeMismatch, UnsupportedPatch

try:  # google-re2: linear-time matching of untrusted pattern keys (pattern_matches)
    import re2 as _re2
except ImportError:  # pragma: no cover - a dependency; without it every key goes the bounded re way
    _re2 = None

__all__ = [
    "cat_lora",
    "dora_weight",
    "lora_delta",
    "lora_embedding_delta",
    "lora_scaling",
    "check_pattern_key",
    "pattern_matches",
    "pattern_value",
    "svd_lora",
]

T = TypeVar("T")


def _factors(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    if A.dim() != 2 or B.dim() != 2:
        if A.dim() == 4 or B.dim() == 4:
            raise UnsupportedPatch(
                f"conv LoRA (lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}) is not supported"
            )
        raise ShapeMismatch(
            f"LoRA factors must be 2-D, got lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}"
        )
    if A.shape[0] != B.shape[1]:
        raise ShapeMismatch(
            f"LoRA rank mismatch: lora_A {tuple(A.shape)} has r={A.shape[0]} but lora_B "
            f"{tuple(B.shape)} has r={B.shape[1]}"
        )
    return A.to(torch.float32), B.to(device=A.device, dtype=torch.float32)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (peft's ``scaling``)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise InvalidArgument(f"LoRA rank r must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidArgument(f"lora_alpha must be a finite number, got {alpha!r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(A: Tensor, B: Tensor, scaling: float, fan_in_fan_out: bool = False) -> Tensor:
    """``(B @ A) · scaling`` in float32, transposed first when ``fan_in_fan_out``.

    Bit-for-bit the float32 result of peft's ``Linear.get_delta_weight``.
    """
    A32, B32 = _factors(A, B)
    prod = B32 @ A32
    if fan_in_fan_out:
        prod = prod.T
    return prod * scaling


def lora_embedding_delta(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """Embedding LoRA: ``(B @ A).T · scaling``, shape ``[num_embeddings, dim]``.

    ``A`` is ``lora_embedding_A`` ``[r, num_embeddings]``, ``B`` is
    ``lora_embedding_B`` ``[dim, r]`` (peft's ``Embedding.get_delta_weight``).
    """
    return lora_delta(A, B, scaling, fan_in_fan_out=True)


def dora_weight(W: Tensor, delta: Tensor, magnitude: Tensor, fan_in_fan_out: bool = False) -> Tensor:
    """DoRA's merged weight ``m / ‖W + ΔW‖ · (W + ΔW)``, in float32, for a base weight ``W``.

    ``delta`` is the LoRA update in ``W``'s layout (:func:`lora_delta`, scaling applied);
    ``magnitude`` is ``lora_magnitude_vector`` (one entry per output feature). The norm is
    taken over the input features of each output feature: row-wise for ``[out, in]``, and
    column-wise when ``fan_in_fan_out`` (``W`` stored ``[in, out]``; also an embedding's
    ``[num_embeddings, dim]``, one entry per ``dim``). The operations are peft's
    (``DoraLinearVariant.merge_unsafe``, ``DoraLinearLayer.get_weight_norm``) in the same order,
    so with float32 inputs the result is peft's merge bit for bit. Returns float32 (float64
    when ``W`` is float64); the caller rounds it once to ``W``'s dtype.
    """
    acc = torch.float64 if W.dtype == torch.float64 else torch.float32
    W32 = W.to(acc)
    d = delta.to(device=W.device, dtype=acc)
    m = magnitude.to(device=W.device, dtype=acc).reshape(-1)
    out_features = W32.shape[1] if fan_in_fan_out else W32.shape[0]
    if W32.dim() != 2 or tuple(d.shape) != tuple(W32.shape) or m.numel() != out_features:
        raise ShapeMismatch(f"DoRA: weight {tuple(W.shape)}, update {tuple(delta.shape)} and magnitude "
                            f"{tuple(magnitude.shape)} do not fit (fan_in_fan_out={fan_in_fan_out})")
    Wt, dt = (W32.T, d.T) if fan_in_fan_out else (W32, d)
    norm = torch.linalg.norm(Wt + 1 * dt, dim=1).to(acc)
    factor = (m / norm).view(-1, 1)
    if fan_in_fan_out:
        factor = factor.T
    return factor * (W32 + d)


def pattern_value(module_name: str, pattern: Mapping[str, T], default: T) -> T:
    """The value of ``rank_pattern`` / ``alpha_pattern`` for ``module_name``, as peft does.

    Same semantics as peft's ``get_pattern_key`` (peft/utils/other.py): the
    keys are tried in dict order and the first key ``k`` for which
    ``re.match(rf"(.*\\.)?({k})$", module_name)`` matches wins — so a key
    matches the whole name or a dot-separated suffix of it, and is a regex.
    With no match, ``pattern.get(module_name, default)``. ``module_name`` is
    the module's name in the *base* model (e.g. ``model.layers.0.self_attn.q_proj``,
    no ``base_model.model.`` prefix).

    The keys come from untrusted configs, so matching is bounded (see
    :func:`pattern_matches`): a key that would backtrack for minutes in
    :mod:`re` answers in microseconds.
    """
    for key in pattern:
        if pattern_matches(key, module_name):
            return pattern[key]
    return pattern.get(module_name, default)


#: How long a pattern key the linear-time engine cannot run may take to match one name.
MATCH_SECONDS = 2.0

# runs one match of Python's re in a child process: the only way to stop a backtracking match
_CHILD = ("import json,re,sys;k,n=json.load(sys.stdin);"
          "sys.stdout.write('1' if re.match(r'(.*\\.)?('+k+')$',n) else '0')")


def check_pattern_key(key: object) -> str:
    """``key`` if it is a string that compiles as peft compiles it (``(.*\\.)?(KEY)$``); else InvalidArgument."""
    if not isinstance(key, str):
        raise InvalidArgument(f"rank/alpha pattern key {key!r:.100} is not a string")
    _compiled(key)
    return key


@functools.lru_cache(maxsize=4096)
def _compiled(key: str) -> Any:
    """The key as an RE2 regex, or None when only Python's :mod:`re` can run it (the key is checked)."""
    full = rf"(.*\.)?({key})$"
    try:
        re.compile(full)
    except (re.error, RecursionError, OverflowError) as exc:
        raise InvalidArgument(f"invalid rank/alpha pattern key {key!r:.100}: {exc}") from None
    # RE2 and re agree on ASCII text for every syntax both accept, except POSIX classes ("[[:alpha:]]"
    # is a class in RE2 and a literal set in re); RE2 refuses backreferences, lookarounds, \Z, (?x)...
    if _re2 is None or not key.isascii() or "[:" in key:
        return None
    opts = _re2.Options()
    opts.log_errors = False
    opts.never_capture = True
    try:
        return _re2.compile(full, opts)
    except _re2.error:
        return None


@functools.lru_cache(maxsize=65536)
def pattern_matches(key: str, module_name: str) -> bool:
    """Whether peft's ``re.match(rf"(.*\\.)?({key})$", module_name)`` matches — in bounded time.

    Two engines, one answer:

    - **RE2** (``google-re2``, linear time in the name's length) for every key it accepts, when
      key and name are ASCII and the name has no newline (where RE2 and ``re`` could differ:
      Unicode classes, ``$`` before a final newline, POSIX classes — those go the other way);
    - otherwise Python's ``re`` itself — peft's engine, so peft's answer — in a child process
      that is killed after :data:`MATCH_SECONDS`: a key that backtracks catastrophically *and*
      needs ``re`` (a backreference, a lookaround) is refused with a one-line error instead of
      hanging. These keys are rare; each (key, name) answer is cached.
    """
    rx = _compiled(check_pattern_key(key))
    if rx is not None and module_name.isascii() and "\n" not in module_name:
        return rx.match(module_name) is not None
    try:
        out = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD], input=json.dumps([key, module_name]),
                             capture_output=True, text=True, timeout=MATCH_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise InvalidArgument(
            f"rank/alpha pattern key {key!r:.100} took over {MATCH_SECONDS:g} s to match module "
            f"{module_name!r:.100} (a regex that backtracks catastrophically): rewrite the key") from None
    if out.returncode != 0 or out.stdout not in ("0", "1"):
        raise InvalidArgument(f"rank/alpha pattern key {key!r:.100} could not be matched against "
                              f"{module_name!r:.100}: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout == "1"


def cat_lora(factors: Sequence[tuple[Tensor, Tensor, float, float]]) -> tuple[Tensor, Tensor]:
    """Exact linear merge of LoRAs by rank concatenation.

    ``factors`` is a list of ``(A, B, scaling, weight)``. Returns float32
    ``(A_cat, B_cat)`` with ``A_cat = [A₁; A₂; …]`` (``[Σr, in]``) and
    ``B_cat = [w₁s₁B₁, w₂s₂B₂, …]`` (``[out, Σr]``), so that
    ``B_cat @ A_cat == Σ wᵢ·sᵢ·Bᵢ@Aᵢ`` and the merged adapter uses scaling 1
    (e.g. ``r = lora_alpha = Σr``). The coefficient goes into B.
    """
    if len(factors) == 0:
        raise InvalidArgument("cat_lora needs at least one LoRA")
    As: list[Tensor] = []
    Bs: list[Tensor] = []
    for i, (A, B, scaling, weight) in enumerate(factors):
        A32, B32 = _factors(A, B)
        if As and (A32.shape[1] != As[0].shape[1] or B32.shape[0] != Bs[0].shape[0]):
            raise ShapeMismatch(
                f"LoRA {i} maps {A32.shape[1]} -> {B32.shape[0]} features but LoRA 0 maps "
                f"{As[0].shape[1]} -> {Bs[0].shape[0]}"
            )
        coef = float(weight) * float(scaling)
        if not math.isfinite(coef):
            raise InvalidArgument(f"LoRA {i}: weight·scaling must be finite, got {coef!r}")
        device = As[0].device if As else A32.device
        As.append(A32.to(device))
        Bs.append(B32.to(device) * coef)
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)


def _randomized_svd(
    M: Tensor, k: int, oversample: int, niter: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Halko et al. range finder with power iterations; returns (U, S, Vh) of rank ≤ k+oversample."""
    m, n = M.shape
    q = min(k + oversample, m, n)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=torch.float32).to(M.device)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    U_small, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ U_small, S, Vh


def svd_lora(
    delta: Tensor,
    rank: int,
    *,
    method: Literal["auto", "exact", "randomized"] = "auto",
    oversample: int = 16,
    niter: int = 4,
    seed: int = 0,
) -> tuple[Tensor, Tensor, float]:
    """Re-factor a 2-D ``delta`` ``[out, in]`` as a rank-``rank`` LoRA.

    Returns float32 ``(A [rank, in], B [out, rank], rel_error)`` with
    ``B @ A`` the best rank-``rank`` approximation found (scaling 1; the
    singular values are split as ``sqrt(S)`` into both factors) and
    ``rel_error = ‖delta − B@A‖_F / ‖delta‖_F`` (0 for a zero delta),
    with the exact SVD computed in float64 from the singular values:
    ``sqrt(Σ_{i>rank} sᵢ²) / sqrt(Σ sᵢ²)``. When ``rank`` exceeds ``min(out, in)`` the factors
    are padded with zero rows/columns, so the shapes always have ``rank``.

    ``method``: ``exact`` uses ``torch.linalg.svd``; ``randomized`` a seeded
    randomized SVD (``oversample``, ``niter`` power iterations, ``seed``;
    deterministic) whose error is that of the factors returned, measured from
    the residual ``delta − B@A`` (``‖delta‖² − Σ_{i≤rank} sᵢ²`` is equal in
    exact arithmetic but cancels badly in float32 when the error is small);
    ``auto`` picks randomized when ``min(out, in) > 2048`` and
    ``rank + oversample ≤ min(out, in) / 4``.
    """
    if delta.dim() != 2:
        raise ShapeMismatch(f"svd_lora needs a 2-D delta, got shape {tuple(delta.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidArgument(f"rank must be an integer >= 1, got {rank!r}")
    if method not in ("auto", "exact", "randomized"):
        raise InvalidArgument(f"svd method must be auto, exact or randomized, got {method!r}")
    M = delta.to(torch.float32)
    m, n = M.shape
    small = min(m, n)
    k = min(rank, small)
    if method == "auto":
        method = "randomized" if small > 2048 and rank + oversample <= small // 4 else "exact"
    if method == "randomized":
        U, S, Vh = _randomized_svd(M, k, oversample, niter, seed)
    else:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:k].sqrt()
    B = U[:, :k] * root
    A = root[:, None] * Vh[:k]
    if method == "randomized":
        # ‖M‖² − Σ_{i≤k} sᵢ² cancels badly when the error is small: use the residual.
        total_sq = float((M * M).sum(dtype=torch.float64))
        R = M - B @ A
        tail_sq = float((R * R).sum(dtype=torch.float64))
    else:
        S64 = S.to(torch.float64)
        total_sq = float(S64.square().sum())
        tail_sq = float(S64[k:].square().sum())
    rel_error = math.sqrt(tail_sq / total_sq) if total_sq > 0 else 0.0
    if k < rank:
        A = torch.cat([A, A.new_zeros(rank - k, n)], dim=0)
        B = torch.cat([B, B.new_zeros(m, rank - k)], dim=1)
    return A.contiguous(), B.contiguous(), rel_error
