"""The merge methods' table, parameters and argument checks, without torch.

:mod:`patchctl.patches.merge` holds the methods themselves (torch); this
module holds what a merge plan asks before any tensor is read: which methods
exist (:data:`METHODS`), their defaults, per-tensor overrides
(:func:`resolve_params`) and the checks each method makes of its weights and
parameters (:func:`check_call`, the same messages in the same order). A merge
that runs on the C kernels (:mod:`patchctl.patches.host_merge`) plans and
runs without importing torch (issue #21: the import costs 1.2-2 s of every
command on a small VM). :mod:`patchctl.patches.merge` re-exports all of it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from patchctl.errors import InvalidArgument

__all__ = ["METHODS", "MergeMethod", "check_call", "dare_seed", "get_method", "resolve_params"]


def number(value: Any, what: str) -> float:
    """``value`` as a finite float, or InvalidArgument naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{what} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise InvalidArgument(f"{what} must be finite, got {value!r}")
    return out


def density(value: Any) -> float:
    d = number(value, "density")
    if not 0.0 < d <= 1.0:
        raise InvalidArgument(f"density must be in (0, 1], got {value!r}")
    return d


def nonnegative(weights: Sequence[float], method: str) -> None:
    for i, w in enumerate(weights):
        if w < 0:
            raise InvalidArgument(
                f"{method} needs weights >= 0, got {w!r} for input {i}; "
                "subtract a task vector with task_arithmetic instead"
            )


def weights_of(weights: Sequence[float], count: int, name: str) -> list[float]:
    """The weights of ``count`` inputs of tensor ``name`` as finite floats (the methods' first check)."""
    if count == 0:
        raise InvalidArgument(f"tensor {name!r}: no inputs to merge")
    if len(weights) != count:
        raise InvalidArgument(
            f"tensor {name!r}: {len(weights)} weights for {count} inputs; "
            "give exactly one weight per input"
        )
    return [number(w, f"weight of input {i}") for i, w in enumerate(weights)]


@dataclass(frozen=True)
class MergeMethod:
    """One row of :data:`METHODS`; :data:`patchctl.patches.merge.FUNCTIONS` holds its function."""

    name: str
    params: Mapping[str, float]  # parameter name -> default (same as the function's)
    needs_two_inputs: bool
    paper: str  # reference URL

    def resolve(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults overlaid with ``params``; an unknown name is InvalidArgument."""
        out: dict[str, Any] = dict(self.params)
        for key, value in (params or {}).items():
            if key not in self.params:
                known = ", ".join(sorted(self.params)) or "none"
                raise InvalidArgument(
                    f"unknown parameter {key!r} for merge method {self.name!r}; known: {known}"
                )
            out[key] = value
        return out

    def check_inputs(self, count: int) -> None:
        """InvalidArgument unless ``count`` inputs are enough for this method."""
        least = 2 if self.needs_two_inputs else 1
        if count < least:
            raise InvalidArgument(
                f"merge method {self.name!r} needs at least {least} inputs, got {count}"
            )


METHODS: Mapping[str, MergeMethod] = MappingProxyType(
    {
        m.name: m
        for m in (
            MergeMethod("linear", {}, True, "https://arxiv.org/abs/2203.05482"),
            MergeMethod("task_arithmetic", {"lam": 1.0}, False, "https://arxiv.org/abs/2212.04089"),
            MergeMethod("ties", {"density": 0.2, "lam": 1.0}, True, "https://arxiv.org/abs/2306.01708"),
            MergeMethod("dare_linear", {"density": 0.1, "lam": 1.0}, False, "https://arxiv.org/abs/2311.03099"),
            MergeMethod("dare_ties", {"density": 0.1, "lam": 1.0}, True, "https://arxiv.org/abs/2311.03099"),
            MergeMethod("magnitude_prune", {"density": 0.2, "lam": 1.0}, False, "https://arxiv.org/abs/2306.01708"),
            MergeMethod("breadcrumbs", {"density": 0.1, "gamma": 0.01, "lam": 1.0}, False,
                        "https://arxiv.org/abs/2312.06795"),
        )
    }
)

#: The methods whose checks :func:`check_call` makes without torch (and that the C kernels run).
HOST_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


def dare_seed(generator_seed: int, name: str, index: int) -> int:
    """The DARE generator seed for input ``index`` of tensor ``name``.

    The first 8 bytes (little-endian) of
    ``sha256(f"{generator_seed}\\0{name}\\0{index}")`` with the top bit cleared.
    Stable across processes and Python versions (unlike ``hash()``).
    """
    if isinstance(generator_seed, bool) or not isinstance(generator_seed, int):
        raise InvalidArgument(f"generator_seed must be an integer, got {generator_seed!r}")
    digest = hashlib.sha256(f"{generator_seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def get_method(method: str) -> MergeMethod:
    """The row of :data:`METHODS` named ``method``, or InvalidArgument listing them."""
    try:
        return METHODS[method]
    except (KeyError, TypeError):
        raise InvalidArgument(
            f"unknown merge method {method!r}; choose one of: {', '.join(METHODS)}"
        ) from None


def check_call(method: str, count: int, weights: Sequence[float], params: Mapping[str, Any] | None,
               name: str = "-") -> dict[str, Any]:
    """What :func:`~patchctl.patches.merge.merge_tensor` checks before it reads a value, for a method of
    :data:`HOST_METHODS`: the same errors in the same order. The resolved parameters."""
    if method not in HOST_METHODS:
        raise ValueError(f"check_call: {method!r} is checked by a dry run of the method itself")
    row = get_method(method)
    row.check_inputs(count)
    prm = row.resolve(params)
    ws = weights_of(weights, count, name)
    if "density" in prm:
        density(prm["density"])
    number(prm["lam"], "lam")
    if method in ("ties", "dare_ties"):
        nonnegative(ws, method)
    return prm


def resolve_params(
    name: str,
    base_params: Mapping[str, Any],
    overrides: Sequence[tuple[str | re.Pattern[str], Mapping[str, Any]]],
) -> dict[str, Any]:
    """The parameters for tensor ``name``: ``base_params`` with matching overrides applied.

    Each override is ``(regex, params)``. A rule matches when
    ``re.search(regex, name)`` finds a match anywhere in the name (anchor with
    ``^``/``$`` or ``\\b`` as needed; ``re.fullmatch`` is not used). Every
    matching rule applies, in list order, so **later rules win** for a key
    they both set; keys a rule does not set are left as they are. A key that
    is not in ``base_params`` (a typo) or an invalid regex is InvalidArgument,
    checked for every rule, whether or not it matches ``name``.
    """
    out = dict(base_params)
    for i, (pattern, params) in enumerate(overrides):
        try:
            rx = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise InvalidArgument(f"override {i}: invalid regex {pattern!r}: {exc}") from None
        for key in params:
            if key not in base_params:
                known = ", ".join(sorted(base_params)) or "none"
                raise InvalidArgument(
                    f"override {i} ({rx.pattern!r}) sets unknown parameter {key!r}; known: {known}"
                )
        if rx.search(name) is not None:
            out.update(params)
    return out
