"""The options of a merge, declared once: :class:`MergeSpec`, its checks and the recipe it records.

A :class:`MergeSpec` is what a merge is asked to do, apart from which
patches it reads and where it writes: the method (a row of
:data:`patchctl.patches.merge.METHODS`), one weight per input, the
method's parameters (``density``, ``lambda``, ``gamma``; ``lambda`` is
``lam`` inside) and per-tensor ``(regex, params)`` overrides, LiNeS, the
output kind (a diff, or a LoRA by ``cat`` or ``svd`` with ``rank``), the
output dtype, the device and DARE's seed. The CLI builds one from its
flags and a recipe file (:func:`read_recipe`), :meth:`Registry.merge` from
its keyword arguments, and a coefficient search makes its candidates from
one with :func:`dataclasses.replace`.

**Checks.** :meth:`MergeSpec.problems` lists everything wrong with the
options alone (an unknown method, parameter, dtype or device name; a
non-finite weight; a seed that is not an integer; a bad override; LiNeS
values; an ``as_lora``/``rank`` combination). :func:`~.plan.plan` calls it
once and adds what only the inputs can tell (their count against the
weights and the method, the per-tensor parameters, the dry run of the
method), so every problem is still reported in one message.

**LiNeS** (``lines="auto"`` or a number α, ``lines_beta`` β) scales each
merged tensor by :func:`~patchctl.patches.lines.lines_scale` after the
method; ``L`` is :func:`~patchctl.patches.lines.num_blocks` over the union of
the targets. β defaults to ``1 - α`` (the last block keeps its full merged
update). The recipe records the requested α, β, the α used and ``L``.

**Recipe.** :meth:`MergeSpec.recipe` gives the manifest's recipe: no paths,
times or device (the ref history message names the device); numbers as
floats; parameters under their shown names (``lambda``).

Importing this module does not import torch (the CLI builds a spec before
it knows it will merge anything).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchctl.errors import InvalidArgument, PatchctlError
from patchctl.patches.device import problem as device_problem
from patchctl.registry.formats.safetensors import FLOAT_DTYPES

LINEAR_METHODS = ("task_arithmetic", "linear")
AS_LORA = ("cat", "svd")
RECIPE_KEYS = ("inputs", "method", "weights", "params", "overrides", "lines", "lines_beta",
               "as_lora", "rank", "dtype", "seed")

Problem = tuple[type[PatchctlError], str]


def _param_key(key: str) -> str:
    return "lam" if key == "lambda" else key


def _shown_key(key: str) -> str:
    return "lambda" if key == "lam" else key


def _finite(value: Any, what: str, problems: list[Problem]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problems.append((InvalidArgument, f"{what} must be a finite number, got {value!r}"))
        return None
    return float(value)


@dataclass(frozen=True)
class MergeSpec:
    """Every option of a merge; see the module docstring. Checked by :meth:`problems` (at plan time)."""

    method: str = "task_arithmetic"
    weights: Sequence[float] | None = None  # one per input; None: 1 each
    params: Mapping[str, Any] | None = field(default_factory=dict)  # density, lambda (or lam), gamma
    overrides: Sequence[tuple[str, Mapping[str, Any]]] | None = ()  # (regex, params) per tensor, later rules win
    lines: str | float | None = None  # LiNeS: "auto" or alpha
    lines_beta: float | None = None
    as_lora: str | None = None  # None (a diff), "cat" or "svd"
    rank: int | None = None  # as_lora="svd"
    dtype: str | None = None  # None: float32 for LoRA inputs, else the inputs' common dtype
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    seed: int = 0  # DARE's drops

    def __post_init__(self) -> None:
        # copies, so that a spec does not change with the caller's lists and dicts
        if self.weights is not None and not isinstance(self.weights, (str, bytes)):
            object.__setattr__(self, "weights", tuple(self.weights))
        object.__setattr__(self, "params", dict(self.params) if isinstance(self.params, Mapping)
                           else {} if self.params is None else self.params)
        object.__setattr__(self, "overrides", () if self.overrides is None else tuple(self.overrides))

    # -- the checks about the options alone ----------------------------------------
    def method_row(self) -> Any:
        """The method's row of :data:`~patchctl.patches.merge.METHODS`, or None when it has none."""
        from patchctl.patches.methods import get_method

        try:
            return get_method(self.method)
        except InvalidArgument:
            return None

    def method_problems(self) -> list[Problem]:
        """Problems of the method, weights, seed, parameters and overrides (inputs aside)."""
        from patchctl.patches.methods import get_method

        out: list[Problem] = []
        row = None
        try:
            row = get_method(self.method)
        except InvalidArgument as e:
            out.append((InvalidArgument, str(e)))
        for k, w in enumerate([] if self.weights is None else list(self.weights)):
            _finite(w, f"weight {k + 1}", out)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            out.append((InvalidArgument, f"seed must be an integer, got {self.seed!r}"))
        if not isinstance(self.params, Mapping):
            out.append((InvalidArgument, f"params must be a mapping of parameter names to numbers, got {self.params!r}"))
        for pat, ps in self._override_pairs():
            if not isinstance(pat, str) or not isinstance(ps, Mapping):
                out.append((InvalidArgument, f"override ({pat!r}, {ps!r}): expected (REGEX, {{key: value}})"))
        if row is not None:
            known = ", ".join(_shown_key(k) for k in sorted(row.params)) or "none"
            for k in self._user_params():
                if k not in row.params:
                    out.append((InvalidArgument, f"merge method {self.method!r} has no parameter {_shown_key(k)!r} (its parameters: {known})"))
            for pat, ps in self.rules():
                for k in ps:
                    if k not in row.params:
                        out.append((InvalidArgument, f"override {pat!r} sets {_shown_key(k)!r}, which {self.method!r} does not have (its parameters: {known})"))
        return out

    def output_problems(self) -> list[Problem]:
        """Problems of LiNeS, the LoRA output, the dtype and the device name (inputs aside)."""
        out: list[Problem] = []
        if self.lines is not None and self.lines != "auto":
            try:
                _finite(float(self.lines), "LiNeS alpha", out)
            except (TypeError, ValueError):
                out.append((InvalidArgument, f"LiNeS alpha must be 'auto' or a number, got {self.lines!r}"))
        if self.lines_beta is not None:
            if self.lines is None:
                out.append((InvalidArgument, "lines_beta is set but lines is not; pass lines='auto' or an alpha too"))
            _finite(self.lines_beta, "LiNeS beta", out)
        if self.as_lora is not None and self.as_lora not in AS_LORA:
            out.append((InvalidArgument, f"unknown LoRA output {self.as_lora!r}: choose cat or svd"))
        if self.as_lora == "cat":
            if self.method not in LINEAR_METHODS:
                out.append((InvalidArgument, f"--as-lora cat is exact only for methods linear in their inputs ({', '.join(LINEAR_METHODS)}), "
                            f"not {self.method!r}; use --as-lora svd --rank R or a diff output"))
            if self.rank is not None:
                out.append((InvalidArgument, "--rank is for --as-lora svd; cat keeps the sum of the inputs' ranks"))
        if self.as_lora == "svd" and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            out.append((InvalidArgument, f"--as-lora svd needs --rank R, an integer >= 1 (got {self.rank!r})"))
        if self.as_lora is None and self.rank is not None:
            out.append((InvalidArgument, "--rank needs --as-lora svd"))
        if self.dtype is not None and self.dtype not in FLOAT_DTYPES:
            out.append((InvalidArgument, f"unknown dtype {self.dtype!r}: choose one of {', '.join(sorted(FLOAT_DTYPES))}"))
        if not isinstance(self.device, str) or device_problem(self.device):  # None is no merge device
            out.append((InvalidArgument, f"unknown device {self.device!r}: choose cpu, cuda, cuda:N or auto"))
        return out

    def problems(self) -> list[Problem]:
        """Everything wrong with the options alone (the plan adds what the inputs tell)."""
        return self.method_problems() + self.output_problems()

    # -- resolved values (meaningful once problems() is empty) ----------------------
    def _override_pairs(self) -> list[tuple[Any, Any]]:
        return [(o[0], o[1]) if isinstance(o, (tuple, list)) and len(o) == 2 else (o, None) for o in self.overrides]

    def _user_params(self) -> dict[str, Any]:
        ps = self.params if isinstance(self.params, Mapping) else {}
        return {_param_key(str(k)): v for k, v in ps.items()}

    def rules(self) -> list[tuple[str, dict[str, Any]]]:
        """The well-formed overrides, their keys as the methods spell them (``lam``)."""
        return [(pat, {_param_key(str(k)): v for k, v in ps.items()})
                for pat, ps in self._override_pairs() if isinstance(pat, str) and isinstance(ps, Mapping)]

    def method_params(self) -> dict[str, Any]:
        """The method's defaults overlaid with the user's parameters (key ``lam``); {} for an unknown method."""
        row = self.method_row()
        user = self._user_params()
        return {} if row is None else {k: user.get(k, v) for k, v in row.params.items()}

    def weights_for(self, n: int) -> list[Any]:
        """The weights as given, or 1 for each of ``n`` inputs."""
        return [1.0] * n if self.weights is None else list(self.weights)

    @property
    def lines_alpha(self) -> str | float | None:
        """LiNeS α as checked: ``"auto"``, a float or None."""
        return self.lines if self.lines is None or self.lines == "auto" else float(self.lines)

    @property
    def beta(self) -> float | None:
        """LiNeS β as checked: a float or None (then ``1 - α``)."""
        return None if self.lines_beta is None else float(self.lines_beta)

    # -- the record -----------------------------------------------------------------
    def recipe(self, *, weights: Sequence[float], dtype: str, num_blocks: int,
               alpha: float | None, beta: float) -> dict[str, Any]:
        """The manifest's recipe: these options with the values the merge resolved.

        ``weights`` one float per input, ``dtype`` the output dtype, LiNeS's
        ``num_blocks`` and the α and β used.
        """
        def shown(d: Mapping[str, Any]) -> dict[str, Any]:
            return {_shown_key(k): float(v) for k, v in d.items()}

        output: dict[str, Any] = {"kind": "diff"} if self.as_lora is None else {"kind": "lora", "as_lora": self.as_lora}
        if self.as_lora == "svd":
            output["rank"] = self.rank
        lines = None
        if self.lines is not None:
            lines = {"alpha": self.lines_alpha, "beta": beta, "resolved_alpha": alpha, "num_blocks": num_blocks}
        return {
            "op": "merge",
            "method": self.method,
            "weights": [float(w) for w in weights],
            "params": shown(self.method_params()),
            "overrides": [{"pattern": pat, "params": shown(ps)} for pat, ps in self.rules()],
            "lines": lines,
            "output": output,
            "dtype": dtype,
            "seed": self.seed,
        }


# -- parsing helpers shared by the CLI and recipe files --------------------------------
def parse_weights(text: str) -> list[float]:
    """``"0.5,0.5"`` → ``[0.5, 0.5]``."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise InvalidArgument(f"weights {text!r}: expected comma-separated numbers, e.g. 0.5,0.5") from None


def parse_override(text: str) -> tuple[str, dict[str, float]]:
    """``"REGEX:key=val,key=val"`` → ``(REGEX, {key: val})`` (split at the last ``:``)."""
    pattern, sep, body = text.rpartition(":")
    if not sep or not pattern or not body:
        raise InvalidArgument(f"override {text!r}: expected REGEX:key=value[,key=value...]")
    params: dict[str, float] = {}
    for kv in body.split(","):
        k, eq, v = kv.partition("=")
        try:
            params[k.strip()] = float(v)
        except ValueError:
            raise InvalidArgument(f"override {text!r}: {kv!r} is not key=number") from None
        if not eq or not k.strip():
            raise InvalidArgument(f"override {text!r}: {kv!r} is not key=number")
    return pattern, params


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A recipe file (YAML or JSON) as keyword arguments of :meth:`Registry.merge`.

    Keys: ``inputs`` (list of refs), ``method``, ``weights`` (list or
    ``"0.5,0.5"``), ``params`` (``density``, ``lambda``, ``gamma``),
    ``overrides`` (list of ``"REGEX:key=val,..."`` or ``{pattern, params}``),
    ``lines`` (``auto`` or α), ``lines_beta``, ``as_lora``, ``rank``,
    ``dtype``, ``seed``. Values are checked by the merge itself. Every key
    but ``inputs`` is a field of :class:`MergeSpec`.

    A file with mergekit's keys (``merge_method``, ``models``, ``slices``) is
    a mergekit configuration, read by
    :func:`~patchctl.registry.ops.merging.mergekit.from_mergekit`: the same
    keys plus ``base_model`` (a folder or None), and ``inputs`` may hold
    absolute folder paths (to import with ``mergekit.import_folders``).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InvalidArgument(f"recipe {str(p)!r}: cannot read it: {e.strerror}") from None
    try:
        import yaml

        doc = yaml.safe_load(text)
    except ImportError:  # pragma: no cover - pyyaml missing: JSON recipes still work
        try:
            doc = json.loads(text)
        except ValueError:
            raise InvalidArgument(f"recipe {str(p)!r}: YAML needs pyyaml (pip install pyyaml); or write it as JSON") from None
    except Exception as e:  # noqa: BLE001 - any YAML syntax error is bad input
        raise InvalidArgument(f"recipe {str(p)!r}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"recipe {str(p)!r}: expected a mapping with keys {', '.join(RECIPE_KEYS)}")
    if any(k in doc for k in ("merge_method", "models", "slices")):  # a mergekit configuration
        from patchctl.registry.ops.merging.mergekit import from_mergekit

        return from_mergekit(doc, f"recipe {str(p)!r}")
    unknown = sorted(set(doc) - set(RECIPE_KEYS))
    if unknown:
        raise InvalidArgument(f"recipe {str(p)!r}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(RECIPE_KEYS)}")
    out = dict(doc)
    if isinstance(out.get("inputs"), str):
        out["inputs"] = [out["inputs"]]
    if isinstance(out.get("weights"), str):
        out["weights"] = parse_weights(out["weights"])
    if out.get("overrides") is not None:
        if not isinstance(out["overrides"], list):
            raise InvalidArgument(f"recipe {str(p)!r}: overrides must be a list")
        rules = []
        for o in out["overrides"]:
            if isinstance(o, str):
                rules.append(parse_override(o))
            elif isinstance(o, dict) and set(o) == {"pattern", "params"} and isinstance(o["params"], dict):
                rules.append((o["pattern"], o["params"]))
            else:
                raise InvalidArgument(f"recipe {str(p)!r}: override {o!r}: expected 'REGEX:key=val' or {{pattern, params}}")
        out["overrides"] = rules
    return out


__all__ = ["AS_LORA", "LINEAR_METHODS", "RECIPE_KEYS", "MergeSpec", "parse_override", "parse_weights", "read_recipe"]
