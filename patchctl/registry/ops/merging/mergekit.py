"""mergekit YAML ⇄ a patchctl merge: :func:`from_mergekit` reads a mergekit (0.1.5) configuration, :func:`to_mergekit` writes one.

``patchctl merge --recipe X.yaml`` takes a mergekit configuration when the
file has mergekit's keys (``merge_method``, ``models``, ``slices``);
``patchctl merge ... --emit-mergekit FILE`` writes the mergekit configuration
of the merge it runs. Only what means the same thing in both tools is
mapped; every other field is named in one line and refused (nothing is
imported or written then).

**Methods** (mergekit → patchctl; mergekit's defaults are made explicit):

- ``task_arithmetic`` → ``task_arithmetic``: ``λ · Σ wᵢτᵢ``. mergekit's
  ``normalize`` defaults to false; ``normalize: true`` (divide by ``Σ wᵢ``)
  is refused (use ``linear``). Bit-identical to mergekit in float32.
- ``ties`` → ``ties``: mergekit's ``density`` defaults to 1 (no trim), so
  ``density: 1.0`` is passed when the file has none; ``normalize`` must be
  true (its default: the disjoint mean). Both keep exactly ``k`` entries per
  tensor; the entries kept among those tied in magnitude at the cut-off can
  differ (mergekit's follow its sort, patchctl's the lowest index), and
  mergekit keeps ``max(1, int(density·n))`` where patchctl keeps
  ``int(density·n)`` (only tensors with ``density·n < 1`` differ).
- ``breadcrumbs`` → ``breadcrumbs`` (``density`` default 1, ``gamma`` 0.01,
  ``normalize`` must be false, its default).
- ``linear`` → ``linear`` (``normalize`` must be true, its default). mergekit
  averages the models, patchctl their deltas on their base: the same up to
  float rounding. ``base_model`` is refused (mergekit's ``linear`` would
  average it in as one more model), so its inputs are registry patches.
- ``dare_ties``, ``dare_linear``: refused. mergekit rescales DARE's
  survivors by an L1-norm ratio (``rescale: true``, its default) or not at
  all, patchctl by ``1/density``; mergekit's ``dare_ties`` sums the agreeing
  deltas, patchctl's takes their mean. Every other mergekit method has no
  patchctl counterpart. ``magnitude_prune`` (patchctl) is mergekit's
  ``breadcrumbs`` with ``gamma: 0``.

**Parameters.** ``weight`` (per model, required by mergekit) → the input's
weight; ``density`` and ``gamma`` (per model in mergekit, one value for all
inputs in patchctl: they must resolve the same for every model) → params;
``lambda`` → λ; ``normalize`` as above; ``int8_mask`` (only the dtype of
mergekit's sign mask) is accepted; ``rescale: true`` on a trimming method is
refused. A value may be a number or mergekit's ``filter`` rules
(``[{filter: mlp, value: 0.5}, {value: 0.3}]``): mergekit takes the first
rule whose filter is a *substring* of the tensor name (a missing filter or
``*`` matches every name), then the top-level ``parameters``, then its
default; this becomes patchctl's value plus overrides ``re.escape(filter)``
listed last-first (patchctl's later rules win). ``weight`` has no per-tensor
form in patchctl; gradients (lists of numbers interpolated over layers) are
refused, as are shared parameters set per model (mergekit ignores them).

**Models.** ``models[].model`` is a local folder (a full fine-tuned
checkpoint, imported on the fly against ``base_model``, which must then be
a folder: :func:`import_folders`) or a registry ``NAME:TAG`` / digest. A
model equal to ``base_model`` is skipped, as mergekit skips it. Relative
paths are relative to the working directory, as in mergekit. LoRA references
(``model+lora``), ``slices``, ``modules``, ``tokenizer``,
``tokenizer_source`` and ``chat_template`` are refused.

**dtype.** mergekit computes in ``dtype`` and writes ``out_dtype``
(default ``dtype``); patchctl computes in float32 and writes its ``dtype``,
so the output dtype is ``out_dtype`` or else ``dtype``. With a float32
``dtype`` the arithmetic is the same; with bfloat16 or float16 mergekit
rounds every intermediate and patchctl does not. :func:`to_mergekit`
therefore writes ``dtype: float32`` and the merge's output dtype as
``out_dtype``.

**Writing** (:func:`to_mergekit`): refused for DARE, LiNeS, a LoRA output
and overrides whose regex is not a literal (mergekit's filters are
substrings). The models are folders: a folder the recipe named, else the
patch applied to its base (:func:`write_mergekit` writes it beside the
YAML).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from patchctl.errors import InvalidArgument
from patchctl.registry.store.names import DIGEST_RE, parse_ref

if TYPE_CHECKING:
    from patchctl.registry.store.repository import Repository

#: A recipe file with any of these keys is a mergekit configuration.
DETECT_KEYS = ("merge_method", "models", "slices")
_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
_REFUSED_TOP = {
    "slices": "layer slices have no patchctl equivalent; list whole models under 'models'",
    "modules": "per-module merges have no patchctl equivalent; list whole models under 'models'",
    "tokenizer": "a patch holds no tokenizer; remove it",
    "tokenizer_source": "a patch holds no tokenizer; remove it",
    "chat_template": "a patch holds no chat template; remove it",
}
_SHARED = ("normalize", "lambda", "rescale", "int8_mask")  # mergekit reads these from the top level only
_MERGEKIT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class _Method:
    """How one mergekit method maps onto the patchctl method of the same name: ``normalize``, its parameters."""

    normalize: bool  # mergekit's default; the only value patchctl matches
    per_input: Mapping[str, float]  # per-model parameters besides weight -> mergekit's default
    shared: tuple[str, ...]  # top-level parameters it has
    trims: bool  # rescale: true would change it


_METHODS: Mapping[str, _Method] = {
    "task_arithmetic": _Method(False, {}, _SHARED, False),
    "ties": _Method(True, {"density": 1.0}, _SHARED, True),
    "breadcrumbs": _Method(False, {"density": 1.0, "gamma": 0.01}, _SHARED, True),
    "linear": _Method(True, {}, ("normalize",), False),
}
_DARE = ("mergekit rescales DARE's survivors by an L1-norm ratio (rescale: true) or not at all, patchctl by "
         "1/density, and the random drops differ; run patchctl merge --method {m} instead")
_REFUSED_METHODS = {"dare_ties": _DARE, "dare_linear": _DARE}

Chain = tuple[tuple[str | None, float], ...]  # (filter or None for every name, value), first match wins


class SpecLike(Protocol):
    """What this module reads of a :class:`~.spec.MergeSpec` (not imported here: ``spec`` imports this module)."""

    method: str
    lines: Any
    as_lora: Any

    def method_params(self) -> dict[str, Any]: ...
    def rules(self) -> list[tuple[str, dict[str, Any]]]: ...
    def weights_for(self, n: int) -> list[Any]: ...


class _Problems(list[str]):
    def field(self, name: str, why: str) -> None:
        self.append(f"mergekit field {name!r} is not supported: {why}")


def is_mergekit(doc: Any) -> bool:
    """Whether a parsed recipe file is a mergekit configuration (has one of :data:`DETECT_KEYS`)."""
    return isinstance(doc, Mapping) and any(k in doc for k in DETECT_KEYS)


# -- reading ------------------------------------------------------------------------------
def _number(value: Any, where: str, problems: _Problems) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problems.append(f"mergekit field {where!r} must be a finite number, got {value!r}")
        return None
    return float(value)


def _chain(setting: Any, where: str, problems: _Problems) -> Chain | None:
    """mergekit's rules for one parameter in one scope, first match first; None when malformed (a problem is added)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list):
        v = _number(setting, where, problems)
        return None if v is None else ((None, v),)
    if setting and all(not isinstance(e, Mapping) for e in setting):
        problems.field(where, "a gradient (a list of values interpolated over layers) has no patchctl equivalent; "
                              "give one number or filter rules")
        return None
    out: list[tuple[str | None, float]] = []
    for k, rule in enumerate(setting):
        at = f"{where}[{k}]"
        if not isinstance(rule, Mapping) or "value" not in rule or set(rule) - {"value", "filter"}:
            problems.append(f"mergekit field {at!r} must be {{filter: SUBSTRING, value: NUMBER}}, got {rule!r}")
            return None
        filt = rule.get("filter")
        if filt is not None and not isinstance(filt, str):
            problems.append(f"mergekit field {at + '.filter'!r} must be a string, got {filt!r}")
            return None
        if isinstance(rule["value"], (list, Mapping)):
            problems.field(at + ".value", "a gradient or nested rule has no patchctl equivalent; give one number")
            return None
        v = _number(rule["value"], at + ".value", problems)
        if v is None:
            return None
        # mergekit: a missing filter, '*' and '' (a substring of every name) match every tensor
        out.append((None if filt in (None, "*", "") else filt, v))
    return tuple(out)


def _resolve(*chains: Chain | None, default: float | None) -> Chain:
    """mergekit's precedence: the first scope's rules, then the next..., then the default; cut at the first catch-all."""
    out: list[tuple[str | None, float]] = []
    for c in [*chains, None if default is None else ((None, default),)]:
        for f, v in c or ():
            out.append((f, v))
            if f is None:
                return tuple(out)
    return tuple(out)


def _to_overrides(key: str, chain: Chain) -> tuple[float | None, list[tuple[str, dict[str, float]]]]:
    """A resolved chain as (value for every other tensor, patchctl overrides): filters escaped, last rule first."""
    value = chain[-1][1] if chain and chain[-1][0] is None else None
    rules = [(re.escape(f), {key: v}) for f, v in reversed(chain) if f is not None]
    return value, rules


def _model_ref(value: Any, where: str, problems: _Problems) -> str | None:
    """A folder as an absolute path, or a registry NAME:TAG / digest as given."""
    if not isinstance(value, str) or not value:
        problems.field(where, f"expected a folder or NAME:TAG string, got {value!r}")
        return None
    p = Path(value).expanduser()
    if p.is_dir():
        return str(p.resolve())
    if "+" in value:
        problems.field(where, f"LoRA references ({value!r}: model+lora) are not supported; push the LoRA with "
                              "patchctl push and name it as NAME:TAG")
        return None
    if DIGEST_RE.fullmatch(value):
        return value
    try:
        parse_ref(value)
    except InvalidArgument:
        problems.append(f"mergekit field {where!r}: {value!r} is neither a folder nor a registry NAME:TAG")
        return None
    return value


def from_mergekit(doc: Mapping[str, Any], where: str = "recipe") -> dict[str, Any]:
    """A mergekit configuration as :func:`~.spec.read_recipe`'s options, plus ``base_model`` (a folder or None).

    ``inputs`` are registry refs or absolute folder paths (to import with
    :func:`import_folders`). Everything that cannot be honoured is collected
    and raised in one :class:`InvalidArgument` line naming each field.
    """
    problems = _Problems()
    for k in doc:
        if k in _REFUSED_TOP:
            problems.field(str(k), _REFUSED_TOP[k])
        elif k not in _TOP_KEYS:
            problems.field(str(k), f"not a mergekit 0.1.5 field patchctl reads (it reads {', '.join(_TOP_KEYS)})")
    name = doc.get("merge_method")
    method = _METHODS.get(name) if isinstance(name, str) else None
    if name is None:
        problems.append("mergekit field 'merge_method' is missing")
    elif name in _REFUSED_METHODS:
        problems.field("merge_method", f"{name}: " + _REFUSED_METHODS[name].format(m=name))
    elif method is None:
        problems.field("merge_method", f"{name!r} has no patchctl equivalent (supported: {', '.join(_METHODS)})")

    base: str | None = None
    if doc.get("base_model") is not None:
        b = doc["base_model"]
        if name == "linear":
            problems.field("base_model", "mergekit's linear averages base_model in as one more model; patchctl's "
                                         "linear averages the inputs' deltas on their base; remove it")
        elif not isinstance(b, str) or not Path(b).expanduser().is_dir():
            problems.field("base_model", f"{b!r} is not a local folder (patchctl imports fine-tunes against a base folder)")
        else:
            base = str(Path(b).expanduser().resolve())

    top = doc.get("parameters")
    if top is None:
        top = {}
    if not isinstance(top, Mapping):
        problems.append(f"mergekit field 'parameters' must be a mapping, got {top!r}")
        top = {}
    models = doc.get("models")
    if "models" in doc and (not isinstance(models, list) or not models):
        problems.append(f"mergekit field 'models' must be a non-empty list, got {models!r}")
        models = []
    elif "models" not in doc and "slices" not in doc:
        problems.append("mergekit field 'models' is missing")
    models = models or []

    if method is None:  # nothing more can be read meaningfully
        raise InvalidArgument(f"{where}: " + "; ".join(problems))

    per_input_keys = ("weight", *method.per_input)
    for k in top:
        if k not in per_input_keys and k not in method.shared:
            problems.field(f"parameters.{k}", f"{name} has no such parameter in patchctl "
                                              f"(supported: {', '.join((*per_input_keys, *method.shared))})")
    # shared parameters: top level only, plain values
    shared: dict[str, Any] = {}
    for k in ("normalize", "rescale", "int8_mask"):
        if k in top and k in method.shared:
            if not isinstance(top[k], bool):
                problems.field(f"parameters.{k}", f"expected true or false (filters or gradients are not supported), got {top[k]!r}")
            else:
                shared[k] = top[k]
    if shared.get("normalize", method.normalize) != method.normalize:
        alt = {"task_arithmetic": "; use merge_method: linear for a weighted average"}.get(name, "")
        problems.field("parameters.normalize", f"patchctl's {name} is normalize: {str(method.normalize).lower()} "
                                               f"(mergekit's default){alt}")
    if method.trims and shared.get("rescale"):
        problems.field("parameters.rescale", f"patchctl's {name} does not rescale the trimmed deltas; remove it")

    # the models
    inputs: list[str] = []
    entries: list[tuple[int, Mapping[str, Any]]] = []
    for i, m in enumerate(models):
        at = f"models[{i}]"
        if not isinstance(m, Mapping) or "model" not in m:
            problems.append(f"mergekit field {at!r} must be {{model: ..., parameters: {{...}}}}, got {m!r}")
            continue
        for k in m:
            if k not in ("model", "parameters"):
                problems.field(f"{at}.{k}", "unknown to mergekit 0.1.5 models entries (model, parameters)")
        ref = _model_ref(m["model"], f"{at}.model", problems)
        if ref is None:
            continue
        if base is not None and ref == base:
            continue  # mergekit skips the base among the models (its per-model parameters are for non-base models)
        ps = m.get("parameters") or {}
        if not isinstance(ps, Mapping):
            problems.append(f"mergekit field {at + '.parameters'!r} must be a mapping, got {ps!r}")
            continue
        for k in ps:
            if k in method.shared:
                problems.field(f"{at}.parameters.{k}", f"mergekit reads {k} from the top-level parameters only "
                                                       "(it ignores it here); move it there")
            elif k not in per_input_keys:
                problems.field(f"{at}.parameters.{k}", f"{name} has no such parameter in patchctl "
                                                       f"(supported: {', '.join(per_input_keys)})")
        inputs.append(ref)
        entries.append((i, ps))
    if any(r.startswith(os.sep) for r in inputs) and base is None:
        if name == "linear":
            problems.field("models[].model", "linear's models must be registry NAME:TAG (importing a folder needs "
                                             "base_model, which linear cannot have); push them first")
        elif "base_model" not in doc:
            problems.field("base_model", "missing: importing model folders needs the base folder they were "
                                         "fine-tuned from")

    # weights: one number per model
    weights: list[float] = []
    top_w = _chain(top["weight"], "parameters.weight", problems) if "weight" in top else None
    for i, ps in entries:
        own = _chain(ps["weight"], f"models[{i}].parameters.weight", problems) if "weight" in ps else None
        c = _resolve(own, top_w, default=None)
        if any(f is not None for f, _ in c):
            problems.field(f"models[{i}].parameters.weight", "per-tensor weight filters have no patchctl "
                                                            "equivalent (a patchctl weight is per input)")
        elif not c:
            problems.append(f"mergekit field 'models[{i}].parameters.weight' is missing (mergekit requires a weight per model)")
        else:
            weights.append(c[0][1])

    # density, gamma: one chain for every model
    params: dict[str, float] = {}
    overrides: list[tuple[str, dict[str, float]]] = []
    for key, default in method.per_input.items():
        top_c = _chain(top[key], f"parameters.{key}", problems) if key in top else None
        chains = {}
        for i, ps in entries:
            own = _chain(ps[key], f"models[{i}].parameters.{key}", problems) if key in ps else None
            chains[i] = _resolve(own, top_c, default=default)
        distinct = set(chains.values())
        if len(distinct) > 1:
            problems.field(f"models[].parameters.{key}", f"it differs between models; patchctl uses one {key} for "
                                                        "all inputs (per-tensor filters are fine)")
        elif distinct:
            value, rules = _to_overrides(key, distinct.pop())
            params[key] = default if value is None else value
            overrides += rules
    if "lambda" in method.shared:
        lam_c = _resolve(_chain(top["lambda"], "parameters.lambda", problems) if "lambda" in top else None, default=1.0)
        value, rules = _to_overrides("lambda", lam_c)
        params["lambda"] = 1.0 if value is None else value
        overrides += rules

    dtype = None
    for k in ("out_dtype", "dtype"):
        d = doc.get(k)
        if d is not None and d not in _MERGEKIT_DTYPES:
            problems.field(k, f"{d!r}: choose one of {', '.join(_MERGEKIT_DTYPES)}")
        elif d is not None and dtype is None:
            dtype = d
    if problems:
        raise InvalidArgument(f"{where}: " + "; ".join(problems))
    out: dict[str, Any] = {"inputs": inputs, "method": name, "weights": weights, "params": params,
                           "overrides": overrides, "base_model": base}
    if dtype is not None:
        out["dtype"] = dtype
    return out


def _dry_run(spec: Any, n: int) -> list[str]:
    """The method's own checks (input count, weights, each parameter set) on a 2-entry tensor; [] when it runs."""
    import torch

    from patchctl.patches.merge import merge_tensor

    params = spec.method_params()
    for prm in [params, *({**params, **ps} for _, ps in spec.rules())]:
        try:
            merge_tensor(spec.method, [torch.zeros(2)] * n, spec.weights_for(n), generator_seed=0, name="-", params=prm)
        except InvalidArgument as e:
            return [str(e)]
    return []


def import_folders(repo: Repository, inputs: Sequence[str], base: str | os.PathLike[str] | None,
                   *, spec: Any = None, message: str = "") -> list[str]:
    """Push every folder among ``inputs`` (absolute paths, from :func:`from_mergekit`) against ``base``; return digests.

    A folder is imported as ``mergekit/<folder name>`` (its tag ``latest``);
    a registry ref is kept as given. ``spec``'s own problems (and a weight
    count that is not one per input) are raised first, before anything is
    imported.
    """
    from patchctl.registry.ops.importing import push

    if spec is not None:  # a MergeSpec
        bad: list[str] = [m for _, m in spec.problems()]
        if spec.weights is not None and len(spec.weights) != len(inputs):
            bad.append(f"{len(spec.weights)} weights for {len(inputs)} inputs; give one weight per input")
        if not bad:
            bad = _dry_run(spec, len(inputs))
        if bad:
            raise InvalidArgument("cannot merge: " + "; ".join(bad))
    out = []
    for ref in inputs:
        if not ref.startswith(os.sep):
            out.append(ref)
            continue
        if base is None:
            raise InvalidArgument(f"importing {ref} needs base_model (the folder it was fine-tuned from)")
        name = re.sub(r"[^a-z0-9]+", "-", Path(ref).name.lower()).strip("-") or "model"
        out.append(push(repo, ref, f"mergekit/{name}", base=base,
                        message=message or f"imported from {ref} by merge --recipe"))
    return out


# -- writing ------------------------------------------------------------------------------
_TO_MERGEKIT = {"task_arithmetic": "task_arithmetic", "ties": "ties", "breadcrumbs": "breadcrumbs",
                "magnitude_prune": "breadcrumbs", "linear": "linear"}
_NORMALIZE = {"task_arithmetic": False, "ties": True, "breadcrumbs": False, "linear": True}


def _literal(pattern: str) -> str | None:
    """The substring a regex matches, when it is a plain literal (metacharacters escaped); else None."""
    out, k = [], 0
    while k < len(pattern):
        c = pattern[k]
        if c == "\\":
            if k + 1 == len(pattern) or pattern[k + 1].isalnum():  # \d, \b, ...: a class or an anchor
                return None
            out.append(pattern[k + 1])
            k += 2
            continue
        if c in ".^$*+?{}[]|()":
            return None
        out.append(c)
        k += 1
    return "".join(out) or None


def emit_problems(spec: SpecLike) -> list[str]:
    """Why ``spec`` has no mergekit equivalent (empty when it has one)."""
    out: list[str] = []
    if spec.method in _REFUSED_METHODS:
        out.append(f"--emit-mergekit: method {spec.method!r} has no mergekit equivalent: "
                   + _REFUSED_METHODS[spec.method].format(m=spec.method).split("; run")[0])
    elif spec.method not in _TO_MERGEKIT:
        out.append(f"--emit-mergekit: method {spec.method!r} has no mergekit equivalent")
    if spec.lines is not None:
        out.append("--emit-mergekit: LiNeS (--lines) has no mergekit equivalent; drop --lines")
    if spec.as_lora is not None:
        out.append("--emit-mergekit: a LoRA output (--as-lora) has no mergekit equivalent; drop --as-lora")
    for pat, _ps in spec.rules():
        if _literal(pat) is None:
            out.append(f"--emit-mergekit: override {pat!r} is a regex, mergekit's filters are substrings; "
                       "write it as a literal with metacharacters escaped (e.g. 'layers\\.0\\.')")
    return out


def to_mergekit(spec: SpecLike, models: Sequence[str], *, base: str | None, dtype: str) -> dict[str, Any]:
    """The mergekit configuration of ``spec`` on full-model folders ``models`` (one per input) and ``base``.

    ``dtype`` is the merge's output dtype (mergekit's ``out_dtype``); the
    computation is float32 (``dtype: float32``), as patchctl's.
    """
    problems = emit_problems(spec)
    if problems:
        raise InvalidArgument("; ".join(problems))
    mk = _TO_MERGEKIT[spec.method]
    ps = spec.method_params()
    if spec.method == "magnitude_prune":
        ps = {**ps, "gamma": 0.0}
    weights = spec.weights_for(len(models))
    per_input = [k for k in ("density", "gamma") if k in ps]
    rules: dict[str, list[tuple[str, float]]] = {}
    for pat, rp in spec.rules():
        for k, v in rp.items():
            rules.setdefault(k, []).append((_literal(pat) or "", float(v)))

    def setting(key: str, value: float) -> Any:
        # patchctl: later rules win; mergekit: the first matching rule wins
        rs = rules.get("lam" if key == "lambda" else key, [])
        if not rs:
            return float(value)
        return [{"filter": f, "value": v} for f, v in reversed(rs)] + [{"value": float(value)}]

    entries = []
    for m, w in zip(models, weights, strict=True):
        p: dict[str, Any] = {"weight": float(w)}
        for k in per_input:
            p[k] = setting(k, ps[k])
        entries.append({"model": str(m), "parameters": p})
    doc: dict[str, Any] = {"merge_method": mk}
    if mk != "linear" and base is not None:
        doc["base_model"] = str(base)
    doc["models"] = entries
    top: dict[str, Any] = {"normalize": _NORMALIZE[mk]}
    if "lam" in ps:
        top["lambda"] = setting("lambda", ps["lam"])
    doc["parameters"] = top
    doc["dtype"] = "float32"
    doc["out_dtype"] = dtype
    return doc


def dump(doc: Mapping[str, Any]) -> str:
    """A mergekit configuration as YAML text (keys in the order given)."""
    import yaml

    return yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=False)


def _lam(ps: Mapping[str, Any]) -> dict[str, Any]:
    return {("lam" if k == "lambda" else k): v for k, v in ps.items()}


@dataclass(frozen=True)
class Recorded:
    """A merge's recorded recipe (:meth:`~.spec.MergeSpec.recipe`, after any search) read as a :class:`SpecLike`."""

    recipe: Mapping[str, Any]

    @property
    def method(self) -> str:
        return str(self.recipe["method"])

    @property
    def lines(self) -> Any:
        return self.recipe.get("lines")

    @property
    def as_lora(self) -> Any:
        return (self.recipe.get("output") or {}).get("as_lora")

    def method_params(self) -> dict[str, Any]:
        return _lam(self.recipe.get("params") or {})

    def rules(self) -> list[tuple[str, dict[str, Any]]]:
        return [(o["pattern"], _lam(o["params"])) for o in self.recipe.get("overrides") or ()]

    def weights_for(self, n: int) -> list[Any]:
        return list(self.recipe["weights"])


def _model_dir(repo: Repository, out: Path, k: int, ref: str) -> Path:
    return out.parent / f"{out.stem}.models" / f"{k}-{repo.resolve(ref).removeprefix('sha256:')[:12]}"


def emit_base(repo: Repository, path: str | os.PathLike[str], inputs: Sequence[str], *,
              folders: Sequence[str | None] | None = None, base: str | os.PathLike[str] | None = None) -> Path:
    """Check, before a merge, that :func:`write_mergekit` can write ``path``; return the base folder it will name.

    ``base``, else the folder this registry remembers for the inputs' base
    (``patchctl push --base``); the model folders it would write must not exist.
    """
    out = Path(path)
    if base is None:
        refs = [r for k, r in enumerate(inputs) if folders is None or folders[k] is None]
        known = repo.base_path(repo.view(refs[0]).m.fingerprint) if refs else None
        if known is None:
            raise InvalidArgument("--emit-mergekit needs the base model folder (mergekit merges full models): "
                                  "pass --base BASE")
        base = known
    for k, ref in enumerate(inputs):
        if folders is None or folders[k] is None:
            dst = _model_dir(repo, out, k, ref)
            if dst.exists():
                raise InvalidArgument(f"--emit-mergekit: {dst} exists; remove it or choose another FILE")
    return Path(base)


def write_mergekit(repo: Repository, path: str | os.PathLike[str], inputs: Sequence[str],
                   recipe: Mapping[str, Any], *, base: str | os.PathLike[str],
                   folders: Sequence[str | None] | None = None) -> Path:
    """Write the mergekit YAML of the merge of ``inputs`` that ``recipe`` records to ``path``; return it.

    ``base`` is the base model folder (:func:`emit_base`); ``folders[i]`` is
    input ``i``'s full-model folder when there is one (a folder a mergekit
    recipe named); any other input is applied to the base into
    ``<path without suffix>.models/<k>-<digest prefix>/``.
    """
    from patchctl.registry.formats.checkpoint import Checkpoint
    from patchctl.registry.ops.exporting import apply_to_base

    out = Path(path)
    spec = Recorded(recipe)
    problems = emit_problems(spec)
    if problems:
        raise InvalidArgument("; ".join(problems))
    ckpt = Checkpoint(base)
    models: list[str] = []
    for k, ref in enumerate(inputs):
        f = folders[k] if folders is not None else None
        if f is not None:
            models.append(str(f))
            continue
        dst = _model_dir(repo, out, k, ref)
        if dst.exists():
            raise InvalidArgument(f"--emit-mergekit: {dst} exists; remove it or choose another FILE")
        view = repo.view(ref)
        repo.check_base(view.m, ckpt)
        dst.parent.mkdir(parents=True, exist_ok=True)
        apply_to_base(view, ckpt, dst)
        models.append(str(dst.resolve()))
    doc = to_mergekit(spec, models, base=str(Path(base).resolve()), dtype=str(recipe["dtype"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(dump(doc))
    os.replace(tmp, out)
    return out


__all__ = ["DETECT_KEYS", "Recorded", "SpecLike", "dump", "emit_base", "emit_problems", "from_mergekit",
           "import_folders", "is_mergekit", "to_mergekit", "write_mergekit"]
