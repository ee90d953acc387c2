"""The options of a compression, declared once: :class:`CompressSpec`, the calibrated κ and the
rule that says a compressed patch lost its update (:func:`lost_update`). Importing it does not import torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from patchctl.errors import InvalidArgument

MODES = ("ternary", "values", "dare")
KAPPA_RULE = 0.4  # κ·d of the best ternary scale on the MiniLM task vectors (bench/README: compression quality)
LOSSY_DIRECTION = 0.2  # below this cosine between the update and its compression, the update is lost
LOSSY_GAIN = 0.5  # a validated compression keeping less of the gain than this on some suite is lost
SCALES = ("std", "mean")
VALUES_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class CompressSpec:
    """Every option of a compression, as one value: built once at the edge (CLI, API), checked
    once (on construction, before any work), passed down and turned into the recipe.

    ``density`` is the fraction kept, in (0, 1]; it may be None when
    ``max_size`` (bytes) chooses it. ``mode``/``scale``/``per_tensor``/
    ``seed``/``values_dtype``: see the module docstring. ``kappa`` (ternary,
    ``scale="std"``): None means the calibrated ``KAPPA_RULE / density``
    (κ·d ≈ 0.4, which keeps ~99 % of the gain where κ = 1 keeps about half).
    ``lora_delta``: None (default) compresses a LoRA's ΔW; False its A/B
    factors (as ComPEFT does — it loses most of the update, see the module
    docstring); True insists on ΔW. ``search`` chooses κ on the validation
    split of the source's suites within ``budget`` candidates, evaluated on
    ``eval_device``. ``force`` tags the result even when it lost the update.
    """

    density: float | None = None
    mode: str = "ternary"
    scale: str = "std"
    kappa: float | None = None
    per_tensor: bool = False
    seed: int = 0
    values_dtype: str = "float16"
    lora_delta: bool | None = None
    max_size: int | None = None
    search: bool = False
    budget: int = 6
    eval_device: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgument(f"unknown mode {self.mode!r}: choose ternary, values or dare")
        if self.scale not in SCALES:
            raise InvalidArgument(f"unknown scale {self.scale!r}: choose std (κ·std, ComPEFT) or mean (mean |kept|)")
        if self.values_dtype not in VALUES_DTYPES:
            raise InvalidArgument(
                f"unknown values dtype {self.values_dtype!r}: choose float16, bfloat16 or float32")
        d = self.density
        if d is None:
            if self.max_size is None:
                raise InvalidArgument("give --density, or --max-size to choose it")
        elif isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise InvalidArgument(f"density must be in (0, 1], got {d!r}")
        k = self.kappa
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k)
                              or k <= 0):
            raise InvalidArgument(f"kappa must be a finite number > 0, got {k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidArgument(f"seed must be an integer, got {self.seed!r}")
        m = self.max_size
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m <= 0):
            raise InvalidArgument(f"--max-size must be a positive number of bytes, got {m!r}")
        if self.search:
            if self.mode != "ternary" or self.scale != "std":
                raise InvalidArgument("compress --search chooses κ, the scale of --mode ternary --scale std; "
                                      "drop --search or use those settings")
            if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
                raise InvalidArgument(f"--budget must be at least 1, got {self.budget}")

    @property
    def d(self) -> float:
        """The density as a float (set: chosen by ``max_size`` before any compression runs)."""
        if self.density is None:
            raise InvalidArgument("give --density, or --max-size to choose it")
        return float(self.density)

    @property
    def k(self) -> float:
        """κ: as given, else the calibrated ``KAPPA_RULE / density`` (3 significant digits)."""
        return float(self.kappa) if self.kappa is not None else auto_kappa(self.d)

    def recipe(self, target: str) -> dict[str, Any]:
        """The recorded recipe; settings the mode does not use are ``None`` (same bytes, same digest)."""
        ternary = self.mode == "ternary"
        return {
            "op": "compress",
            "density": self.d,
            "mode": self.mode,
            "scale": self.scale if ternary else None,
            "kappa": self.k if ternary and self.scale == "std" else None,
            "per_tensor": bool(self.per_tensor) if self.mode != "dare" else None,
            "seed": int(self.seed) if self.mode == "dare" else None,
            "target": target,
            "values_dtype": None if ternary else self.values_dtype,
        }


def auto_kappa(density: float) -> float:
    """The calibrated ternary scale for ``density``: ``KAPPA_RULE / density``, 3 significant digits."""
    return float(f"{KAPPA_RULE / density:.3g}")


def lost_update(report: dict[str, Any], validation: dict[str, Any] | None) -> str | None:
    """Why a compressed patch lost most of its update (None when it did not).

    With a validation (``compress --search``): some suite keeps less than
    ``LOSSY_GAIN`` of the source's gain. Otherwise the measured direction:
    the cosine between the update (a LoRA's ΔW) and its compression is under
    ``LOSSY_DIRECTION``.
    """
    rows = [r for r in (validation or {}).get("rows", []) if r.get("gain_kept") is not None]
    if rows:
        worst = min(rows, key=lambda r: r["gain_kept"])
        if worst["gain_kept"] < LOSSY_GAIN:
            return f"it keeps {worst['gain_kept']:.0%} of the gain on {worst['task']} ({validation['split']} split)"
        return None
    cos = report.get("direction_kept")
    if cos is not None and cos < LOSSY_DIRECTION:
        what = "ΔW = B·A·scaling" if report.get("delta_rel_error") is not None else "the update"
        return f"the compressed patch keeps a cosine of {cos:.2f} with {what}"
    return None
