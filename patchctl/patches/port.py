"""Porting a patch to another version of its base: the pure math.

A port re-anchors a patch made on base θ onto a new base θ′:
``θ′_ft = θ′ + λ·(θ_ft − θ)`` — the new patch's delta is ``λ·τ``, keyed by the
new base's tensor names (task arithmetic carried across versions; for LoRA,
PortLLM, arXiv:2410.10870, carries the A/B factors as they are). Nothing here
reads files; :mod:`patchctl.registry.ops.porting` drives it.

Three things can differ between the versions, and each is reconciled here:

- **tensor names** (:func:`match_names`): exact names first; then the user's
  ``OLD_REGEX=NEW`` rules (:func:`parse_map`), applied in order to the old
  name with :func:`re.sub`; then the built-in renames of :data:`BUILTIN_RULES`
  (known transformers renames: a ``bert.`` / ``roberta.`` / ``model.`` prefix
  present on one side only, old LayerNorm ``gamma``/``beta`` for
  ``weight``/``bias``), applied to *both* sides, a match being accepted only
  when it is unique. A new name claimed twice is matched to neither claimant.
- **vocabularies** (:func:`rows_by_token`, :func:`rows_by_prefix`): rows of
  embedding/LM-head deltas move by token string; a token new in the new base
  gets a zero delta; a token the new base dropped loses its row (reported).
  Without both tokenizers only the shared prefix of rows is kept, by index.
- **weights** (:func:`tensor_drift`, :func:`summarize`): how far the base
  moved under the patch, measured before anything is written.

Diagnostics, per tensor the patch changes (over the rows both versions share):

- *drift* ``‖θ′ − θ‖ / ‖θ‖`` (0 when the tensor did not move);
- *cosine* ``cos(θ′ − θ, δ)`` between the base's move and the patch's delta
  (undefined, ``None``, when either is zero);
- *mass* ``‖δ‖²``: the patch's squared L2 norm on the tensor, all rows.

and over the patch: the mass-weighted means of drift and cosine, the
*reconciled share* (mass on tensors matched by a rule or on rows that moved to
another index) and the *unmatched share* (mass on rows that have no place on
the new base: dropped tokens, rows past the new vocabulary).

Verdict: ``risky`` when any of these holds, ``likely`` otherwise.

- mass-weighted mean drift > :data:`MAX_DRIFT` (0.02). A port is a
  first-order bet: τ was learned at θ and is used at θ′, which holds while θ′
  stays about as close to θ as the patch itself moves the weights (the demo's
  MiniLM full fine-tunes: ‖τ‖/‖θ‖ = 0.0064–0.0067). Calibrated on MiniLM with
  ``bench/port.py``: the int8 release (drift 0.008–0.010) kept 101–108 % of
  every patch's gain; a release trained further on unrelated text (drift
  0.037–0.042) kept 52–55 % in three cases of four. 0.02 lies between the
  two, a factor 2 above the quantization case. It is a heuristic from one
  model family: weight drift says nothing of *where* the base moved, so
  treat ``likely`` as "worth validating", never as a guarantee.
- unmatched share > :data:`MAX_UNMATCHED` (0.05): more than 5 % of what the
  patch changed cannot be carried (rows of dropped tokens). A port is meant
  to carry the whole patch; a twentieth of its mass is the most we let pass
  without a flag (dropped tokens are usually rare ones, whose rows a
  fine-tune barely moves, so a real loss shows up as a large share).
- mass-weighted mean cosine > :data:`MAX_COSINE` (0.5): the new base already
  moved *along* the patch (e.g. it was trained on the same data), so adding
  τ again applies it twice; a λ below 1 is likely better. Unrelated changes
  (quantization noise, other training) are nearly orthogonal to τ in high
  dimension (|cos| < 0.01 in every ``bench/port.py`` case).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from patchctl.errors import InvalidArgument

__all__ = [
    "BUILTIN_RULES",
    "MAX_COSINE",
    "MAX_DRIFT",
    "MAX_UNMATCHED",
    "MapRule",
    "NameMatch",
    "RowMap",
    "Summary",
    "TensorDrift",
    "block_indices",
    "match_names",
    "move_rows",
    "parse_map",
    "port_delta",
    "rows_by_prefix",
    "rows_by_token",
    "scaled",
    "summarize",
    "tensor_drift",
]

MAX_DRIFT = 0.02
MAX_UNMATCHED = 0.05
MAX_COSINE = 0.5


# ------------------------------------------------------------------------ names
@dataclass(frozen=True)
class BuiltinRule:
    name: str
    pattern: re.Pattern[str]
    replacement: str
    why: str


#: Known renames between versions of transformers checkpoints, applied to both
#: sides to find a unique counterpart for a name with no exact match.
BUILTIN_RULES: tuple[BuiltinRule, ...] = (
    BuiltinRule("gamma", re.compile(r"\.gamma$"), ".weight",
                "old TF-style LayerNorm names (transformers renames gamma on load)"),
    BuiltinRule("beta", re.compile(r"\.beta$"), ".bias",
                "old TF-style LayerNorm names (transformers renames beta on load)"),
    BuiltinRule("bert.", re.compile(r"^bert\."), "", "BertModel vs BertFor* checkpoints"),
    BuiltinRule("roberta.", re.compile(r"^roberta\."), "", "RobertaModel vs RobertaFor* checkpoints"),
    BuiltinRule("model.", re.compile(r"^model\."), "", "LlamaModel-style vs *ForCausalLM checkpoints"),
)


@dataclass(frozen=True)
class MapRule:
    """A user rule ``OLD_REGEX=NEW``: ``re.sub(OLD_REGEX, NEW, old_name)``."""

    spec: str
    pattern: re.Pattern[str]
    replacement: str

    def apply(self, name: str) -> str:
        try:
            return self.pattern.sub(self.replacement, name)
        except (re.error, IndexError) as e:
            raise InvalidArgument(f"--map {self.spec!r}: invalid replacement {self.replacement!r}: {e}") from None


def parse_map(spec: str) -> MapRule:
    """Parse and check ``OLD_REGEX=NEW`` (split at the last ``=``; NEW may use ``\\1``)."""
    if not isinstance(spec, str) or "=" not in spec:
        raise InvalidArgument(f"--map {spec!r}: expected OLD_REGEX=NEW, e.g. '^bert\\.=' or 'ln_(\\d)=norm\\1'")
    old, _, new = spec.rpartition("=")
    if not old:
        raise InvalidArgument(f"--map {spec!r}: the regular expression before '=' is empty")
    try:
        pattern = re.compile(old)
    except re.error as e:
        raise InvalidArgument(f"--map {spec!r}: invalid regular expression {old!r}: {e}") from None
    try:  # an always-matching twin with the same groups, to check NEW's group references
        twin = re.compile(f"(?:{old})|")
    except re.error:  # e.g. global flags, which must come first: check at use instead
        twin = None
    match = twin.match("") if twin is not None else None
    if match is not None:
        try:
            match.expand(new)
        except (re.error, IndexError) as e:
            raise InvalidArgument(f"--map {spec!r}: invalid replacement {new!r}: {e}") from None
    return MapRule(spec, pattern, new)


def _canon(name: str) -> tuple[str, tuple[str, ...]]:
    fired = []
    for rule in BUILTIN_RULES:
        new = rule.pattern.sub(rule.replacement, name, count=1)
        if new != name:
            fired.append(rule.name)
            name = new
    return name, tuple(fired)


@dataclass
class NameMatch:
    """Old base name → new base name, and how each pair was found."""

    pairs: dict[str, str]
    how: dict[str, str]  # old name -> "same" | "map" | "rule:<names>"
    old_only: list[str]
    new_only: list[str]
    unused_maps: list[str] = field(default_factory=list)

    @property
    def renamed(self) -> dict[str, str]:
        return {o: n for o, n in self.pairs.items() if o != n}


def match_names(old: Iterable[str], new: Iterable[str], maps: Sequence[MapRule] = ()) -> NameMatch:
    """Match the tensor names of two bases (see the module docstring for the order)."""
    old_l, new_l = sorted(set(old)), sorted(set(new))
    new_set = set(new_l)
    used = [False] * len(maps)
    claims: dict[str, list[tuple[str, str]]] = {}  # new -> [(old, how)]
    pending: list[tuple[str, str]] = []
    for o in old_l:
        mapped = o
        for i, rule in enumerate(maps):
            after = rule.apply(mapped)
            if after != mapped:
                used[i] = True
                mapped = after
        if mapped in new_set:
            claims.setdefault(mapped, []).append((o, "same" if mapped == o else "map"))
        else:
            pending.append((o, mapped))
    canon_new: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for n in new_l:
        c, fired = _canon(n)
        canon_new.setdefault(c, []).append((n, fired))
    for o, mapped in pending:
        c, fired = _canon(mapped)
        cands = canon_new.get(c, [])
        if len(cands) == 1:
            n, fired_new = cands[0]
            rules = sorted(set(fired) | set(fired_new))
            claims.setdefault(n, []).append((o, ("map+" if mapped != o else "") + "rule:" + "+".join(rules)))
    pairs: dict[str, str] = {}
    how: dict[str, str] = {}
    for n, cl in claims.items():
        exact = [c for c in cl if c[1] == "same"]
        winner = exact if exact else cl
        if len(winner) == 1:
            pairs[winner[0][0]] = n
            how[winner[0][0]] = winner[0][1]
    taken = set(pairs.values())
    return NameMatch(
        pairs=dict(sorted(pairs.items())),
        how=how,
        old_only=[o for o in old_l if o not in pairs],
        new_only=[n for n in new_l if n not in taken],
        unused_maps=[r.spec for r, u in zip(maps, used, strict=True) if not u],
    )


_BLOCK = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")


def block_indices(names: Iterable[str]) -> set[int]:
    """Indices of the repeated blocks (``layer.<i>.``, ``layers.<i>.``, ``h.<i>.``, ``blocks.<i>.``)."""
    out = set()
    for n in names:
        m = _BLOCK.search(n)
        if m:
            out.add(int(m.group(1)))
    return out


# ---------------------------------------------------------------------- vocab
@dataclass(frozen=True)
class RowMap:
    """Where each row of a vocabulary tensor on the new base comes from.

    ``src[j]`` is the old row that new row ``j`` takes its delta from, or -1
    (a token the old base lacks: zero delta). ``dropped`` lists the old rows
    that have no place on the new base.
    """

    src: torch.Tensor  # int64 [new_rows]
    old_rows: int
    mode: str  # "tokens" | "prefix"
    dropped: tuple[int, ...]

    @property
    def new_rows(self) -> int:
        return int(self.src.numel())

    @property
    def identity(self) -> bool:
        n = self.new_rows
        return n == self.old_rows and bool(torch.equal(self.src, torch.arange(n)))

    @property
    def added(self) -> int:
        return int((self.src < 0).sum())

    @property
    def moved(self) -> int:
        keep = self.src >= 0
        return int((self.src[keep] != torch.arange(self.new_rows)[keep]).sum())


def rows_by_token(old_tokens: Sequence[str | None], new_tokens: Sequence[str | None]) -> RowMap:
    """Rows matched by token string; ``*_tokens[i]`` is row i's token (``None``: no token)."""
    where: dict[str, int] = {}
    for i, t in enumerate(old_tokens):
        if t is not None and t not in where:
            where[t] = i
    src = torch.tensor([where.get(t, -1) if t is not None else -1 for t in new_tokens], dtype=torch.int64)
    kept = set(src[src >= 0].tolist())
    dropped = tuple(i for i in range(len(old_tokens)) if i not in kept)
    return RowMap(src, len(old_tokens), "tokens", dropped)


def rows_by_prefix(old_rows: int, new_rows: int) -> RowMap:
    """Rows matched by index over the shared prefix (no tokenizers to go by)."""
    n = min(old_rows, new_rows)
    src = torch.cat([torch.arange(n), torch.full((new_rows - n,), -1)]).to(torch.int64)
    return RowMap(src, old_rows, "prefix", tuple(range(n, old_rows)))


def move_rows(t: torch.Tensor, rows: RowMap) -> torch.Tensor:
    """``t``'s rows placed as ``rows`` says; rows with no source are zero (exact: no arithmetic)."""
    if t.shape[0] != rows.old_rows:
        raise InvalidArgument(f"a tensor with {t.shape[0]} rows does not fit a row map of {rows.old_rows}")
    out = t.new_zeros((rows.new_rows, *t.shape[1:]))
    keep = rows.src >= 0
    out[keep] = t[rows.src[keep].to(t.device)]
    return out


def scaled(t: torch.Tensor, lam: float) -> torch.Tensor:
    """``λ·t`` in float32 (float64 for float64), back in ``t``'s dtype; ``t`` itself when λ = 1."""
    if lam == 1.0:
        return t
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return (t.to(acc) * lam).to(t.dtype)


def port_delta(delta: torch.Tensor, lam: float = 1.0, rows: RowMap | None = None) -> torch.Tensor:
    """The delta on the new base: rows moved by token (if ``rows``), then scaled by λ.

    With λ = 1 and no row map this is ``delta`` itself, so porting there and back
    gives back the same tensors bit for bit.
    """
    out = delta if rows is None or rows.identity else move_rows(delta, rows)
    return scaled(out, lam)


# -------------------------------------------------------------------- diagnostics
@dataclass(frozen=True)
class TensorDrift:
    """Diagnostics of one tensor the patch changes (float64 sums)."""

    name: str  # new base name
    source: str  # old base name
    mass: float  # ‖δ‖² over all the patch's rows
    base_sq: float  # ‖θ‖² over the shared rows
    drift_sq: float  # ‖θ′ − θ‖² over the shared rows
    dot: float  # ⟨θ′ − θ, δ⟩ over the shared rows
    delta_sq: float  # ‖δ‖² over the shared rows
    reconciled_mass: float
    unmatched_mass: float

    @property
    def drift(self) -> float | None:
        if self.base_sq > 0:
            return math.sqrt(self.drift_sq / self.base_sq)
        return 0.0 if self.drift_sq == 0 else None

    @property
    def cosine(self) -> float | None:
        if self.drift_sq > 0 and self.delta_sq > 0:
            return self.dot / math.sqrt(self.drift_sq * self.delta_sq)
        return None

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "source": self.source, "mass": self.mass, "drift": self.drift,
                "cosine": self.cosine, "reconciled_mass": self.reconciled_mass,
                "unmatched_mass": self.unmatched_mass}


def tensor_drift(
    name: str,
    source: str,
    old: torch.Tensor,
    new: torch.Tensor,
    delta: torch.Tensor,
    rows: RowMap | None = None,
    renamed: bool = False,
) -> TensorDrift:
    """Drift of ``old`` → ``new`` against the patch's ``delta`` (on ``old``'s rows)."""
    d = delta.to(torch.float64)
    o = old.to(torch.float64)
    n = new.to(torch.float64)
    mass = float((d * d).sum())
    moved = unmatched = 0.0
    if rows is not None and not rows.identity:
        keep = rows.src >= 0
        src = rows.src[keep]
        if rows.dropped:
            dr = d[list(rows.dropped)]
            unmatched = float((dr * dr).sum())
        moving = src[src != torch.arange(rows.new_rows)[keep]]
        if moving.numel():
            dm = d[moving]
            moved = float((dm * dm).sum())
        o, n, d = o[src], n[keep], d[src]
    if o.shape != n.shape:
        raise InvalidArgument(f"{source} -> {name}: shapes {tuple(o.shape)} and {tuple(n.shape)} do not line up")
    diff = n - o
    return TensorDrift(
        name=name,
        source=source,
        mass=mass,
        base_sq=float((o * o).sum()),
        drift_sq=float((diff * diff).sum()),
        dot=float((diff * d).sum()),
        delta_sq=float((d * d).sum()),
        reconciled_mass=(mass - unmatched) if renamed else moved,
        unmatched_mass=unmatched,
    )


@dataclass(frozen=True)
class Summary:
    verdict: str  # "likely" | "risky"
    reasons: tuple[str, ...]
    mass: float
    mean_drift: float  # mass-weighted
    mean_cosine: float  # mass-weighted, over tensors where it is defined
    base_drift: float  # ‖Θ′ − Θ‖ / ‖Θ‖ over the tensors the patch changes
    reconciled_share: float
    unmatched_share: float

    def to_json(self, digits: int = 4) -> dict[str, object]:
        """Rounded to ``digits`` significant digits (it goes into a manifest)."""
        def r(x: float) -> float:
            return float(f"{x:.{digits}g}")

        return {"verdict": self.verdict, "reasons": list(self.reasons), "mean_drift": r(self.mean_drift),
                "mean_cosine": r(self.mean_cosine), "base_drift": r(self.base_drift),
                "reconciled_share": r(self.reconciled_share), "unmatched_share": r(self.unmatched_share)}


def summarize(items: Sequence[TensorDrift]) -> Summary:
    """Patch-level figures and the verdict (thresholds in the module docstring)."""
    mass = sum(t.mass for t in items)
    dm = sum(t.mass for t in items if t.drift is not None)
    cm = sum(t.mass for t in items if t.cosine is not None)
    mean_drift = sum(t.mass * t.drift for t in items if t.drift is not None) / dm if dm > 0 else 0.0  # type: ignore[operator]
    mean_cos = sum(t.mass * t.cosine for t in items if t.cosine is not None) / cm if cm > 0 else 0.0  # type: ignore[operator]
    base_sq = sum(t.base_sq for t in items)
    base_drift = math.sqrt(sum(t.drift_sq for t in items) / base_sq) if base_sq > 0 else 0.0
    rec = sum(t.reconciled_mass for t in items) / mass if mass > 0 else 0.0
    unm = sum(t.unmatched_mass for t in items) / mass if mass > 0 else 0.0
    reasons = []
    if mean_drift > MAX_DRIFT:
        reasons.append(f"mean drift {mean_drift:.3g} > {MAX_DRIFT}: the base moved far more than the patch")
    if unm > MAX_UNMATCHED:
        reasons.append(f"{unm:.1%} of the patch's mass has no place on the new base (> {MAX_UNMATCHED:.0%})")
    if mean_cos > MAX_COSINE:
        reasons.append(f"mean cosine {mean_cos:.3g} > {MAX_COSINE}: the new base already moved along the "
                       "patch; consider --lambda below 1")
    return Summary("risky" if reasons else "likely", tuple(reasons), mass, mean_drift, mean_cos, base_drift, rec, unm)
