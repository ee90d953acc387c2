"""Porting a stored patch to another version of its base (``patchctl port``).

The math (name and vocabulary reconciliation, drift, the verdict) is in
:mod:`patchctl.patches.port`; this module reads the two bases and the patch,
decides how to carry each tensor, and writes the new patch.

Steps, in order; nothing is written before step 6:

1. The new base (``to``) must differ from the patch's (same fingerprint: an
   explicit :class:`InvalidArgument`, nothing written). The old base is
   ``from_base`` (its fingerprint must be the patch's: :class:`BaseMismatch`),
   else the folder this registry last saw that fingerprint in
   (:meth:`Registry.base_path`), else the patch's recorded base name when it
   is a local folder or in the local Hugging Face cache — with that
   fingerprint.
2. Names: every old base tensor is matched to a new one (exact, ``--map``
   rules, built-in renames). Bases whose repeated blocks differ (layer counts)
   are incompatible (:class:`ShapeMismatch` listing the unmatched tensors), and
   so is a patch tensor with no counterpart or a different shape.
3. Vocabularies: the bases' tokenizers (``tokenizer.json`` through the
   ``tokenizers`` library, else BERT's ``vocab.txt``) give each row of a
   vocabulary tensor — first dimension equal to the vocabulary size
   (``config.json``'s ``vocab_size``, else the tokenizer's) on both sides — its
   token. Rows move by token (``vocab: tokens``), or stay (``same``: identical
   tokenizers); without both tokenizers the shared prefix of rows is kept by
   index, with a warning (``prefix``).
4. Route. A ``diff`` or ``sparse`` patch becomes a ``diff`` (sparse decoded
   through :class:`PatchView`). A ``lora`` patch stays ``lora`` — A/B carried
   as they are, under the new module names, ``params`` unchanged — when every
   module's weight keeps its shape and rows (PortLLM); **λ ≠ 1 scales
   ``lora_B``** (so ``ΔW`` scales by λ and the adapter config stays the same).
   Otherwise (a vocabulary change under an embedding LoRA, or
   ``modules_to_save`` tensors, which replace values) it becomes a ``diff`` of
   ``ΔW`` in float32, a replaced value becoming ``value − θ``.
5. Diagnostics (:func:`patchctl.patches.port.summarize`) over every tensor
   the patch changes. ``dry_run`` stops here.
6. Write: blobs, manifest, ref. A tensor carried unchanged (λ = 1, no row
   moves) keeps its blob, so a port there and back gives the same tensors bit
   for bit; pins are dropped (they belong to the exact old base). The
   manifest records the new base, ``parents = [source digest]``, the recipe
   ``{"op": "port", "lambda", "maps", "from_fingerprint", "to_fingerprint",
   "vocab"}`` (no paths) and ``metadata.port`` (the summary, rounded to 4
   significant digits). The ref defaults to ``NAME:TAG-on-<8 hex of the new
   fingerprint>``; ``NAME:latest`` is never moved (the port targets another
   base).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from patchctl.errors import (
    BaseMismatch,
    InvalidArgument,
    InvalidCheckpoint,
    PatchctlError,
    ShapeMismatch,
)
from patchctl.patches.finite import require_finite
from patchctl.registry.formats.bases import base_doc, locate
from patchctl.registry.formats.checkpoint import Checkpoint
from patchctl.registry.formats.content import content_digest
from patchctl.registry.store.manifest import Manifest, TensorEntry
from patchctl.registry.store.names import is_digest, parse_ref
from patchctl.registry.store.views import (
    FILE_PREFIX,
    PEFT_PREFIX,
    Change,
    PatchView,
    check_against_base,
    lora_modules,
)

if TYPE_CHECKING:
    import torch

    from patchctl.patches.port import RowMap, Summary, TensorDrift
    from patchctl.registry.store.repository import Repository

Progress = Callable[[int, int], None] | None
SHOW = 8  # names listed in an error message


@dataclass
class PortReport:
    """What a port found and did (``digest`` is None for a dry run)."""

    source: str
    source_kind: str
    kind: str  # kind of the ported patch
    route: str  # "lora" (factors carried) or "delta"
    from_fingerprint: str
    to_fingerprint: str
    to_base: dict[str, Any]
    lam: float
    maps: list[str]
    vocab: str
    summary: Summary
    tensors: list[TensorDrift]
    renamed: dict[str, str]  # old -> new, tensors the patch changes
    old_only: list[str]  # base tensors with no counterpart (not touched by the patch)
    new_only: list[str]
    added_tokens: int = 0
    dropped_tokens: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    digest: str | None = None
    ref: str | None = None
    from_path: str | None = None  # the old base folder used (not in the manifest)
    validation: dict[str, Any] | None = None  # port validation on the new base (Registry.port)
    moved: bool = False  # whether ``ref`` was moved to ``digest``
    held: str | None = None  # why ``ref`` was not moved (the gate failed; --force moves it anyway)
    search: dict[str, Any] | None = None  # the λ search record (also in the recipe)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source, "source_kind": self.source_kind, "kind": self.kind, "route": self.route,
            "from_fingerprint": self.from_fingerprint, "to_fingerprint": self.to_fingerprint,
            "to_base": self.to_base, "lambda": self.lam, "maps": self.maps, "vocab": self.vocab,
            "summary": self.summary.to_json(digits=6), "tensors": [t.to_json() for t in self.tensors],
            "renamed": self.renamed, "old_only": self.old_only, "new_only": self.new_only,
            "added_tokens": self.added_tokens, "dropped_tokens": self.dropped_tokens,
            "warnings": self.warnings, "dry_run": self.dry_run, "digest": self.digest, "ref": self.ref,
            "validation": self.validation, "moved": self.moved, "recipe_search": self.search,
        }


@dataclass
class _Item:
    change: Change
    old_key: str
    new_key: str
    rows: RowMap | None


@dataclass(frozen=True)
class PortSpec:
    """Every option of a port, as one value, checked on construction (before any work).

    ``lam``: the ported delta is ``lam·τ``; ``maps``: ``OLD_REGEX=NEW`` renames;
    ``from_base``: the patch's own base (default: where the registry saw it);
    ``to_name``: the new base recorded as ``NAME@REVISION``; ``gate``: the least
    share of its gain the port must recover on every suite to move its tag;
    ``validate``; ``search`` chooses ``lam`` on the validation split within
    ``budget`` ports, evaluated on ``eval_device``.
    """

    lam: float = 1.0
    maps: tuple[str, ...] = ()
    from_base: str | os.PathLike[str] | None = None
    to_name: str | None = None
    gate: float = 0.8
    validate: bool = True
    search: bool = False
    budget: int = 6
    eval_device: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        lam, gate = self.lam, self.gate
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise InvalidArgument(f"--lambda must be a finite number, got {lam!r}")
        if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not math.isfinite(gate):
            raise InvalidArgument(f"--gate must be a finite number, got {gate!r}")
        if self.search and (isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1):
            raise InvalidArgument(f"--budget must be at least 1, got {self.budget}")
        object.__setattr__(self, "maps", tuple(self.maps))


def port(
    reg: Repository,
    ref: str,
    to: str | os.PathLike[str],
    spec: PortSpec,
    *,
    as_ref: str | None = None,
    dry_run: bool = False,
    message: str = "",
    progress: Progress = None,
    move_ref: bool = True,
    search: dict[str, Any] | None = None,
) -> PortReport:
    """See the module docstring. ``move_ref=False`` stores the ported patch without moving a ref
    (``report.ref`` is still the name it would get); ``search`` is kept in the recipe."""
    from patchctl.patches import port as pm

    lam, maps, from_base, to_name = float(spec.lam), spec.maps, spec.from_base, spec.to_name
    rules = [pm.parse_map(s) for s in maps]
    digest = reg.resolve(ref)
    out_ref = _target_ref(ref, as_ref)
    view = reg.view(digest)
    m = view.m
    new = Checkpoint(to)
    to_fp = new.fingerprint()
    if to_fp == m.fingerprint:
        raise InvalidArgument(
            f"nothing to port: {ref} already targets {new.path} (fingerprint {to_fp[:19]}…); apply it there directly"
        )
    out_ref = out_ref or default_ref(ref, to_fp)
    old = _old_base(reg, m, from_base)
    resolved = check_against_base(view, old)

    # -- names and architecture --------------------------------------------------
    match = pm.match_names(old.names(), new.names(), rules)
    warnings = [f"--map {s!r} matched no tensor name" for s in match.unused_maps]
    bo, bn = pm.block_indices(old.names()), pm.block_indices(new.names())
    if bo != bn:
        raise ShapeMismatch(
            f"incompatible bases: the patch's base has {len(bo)} blocks, {new.path} has {len(bn)}; "
            f"unmatched tensors: {_listing(match.old_only, match.new_only)}"
        )

    # -- vocabularies ----------------------------------------------------------------
    vo, vn = _vocab(old, warnings), _vocab(new, warnings)
    size_o, size_n = _vocab_size(old, vo), _vocab_size(new, vn)
    vocab_mode = ("same" if vo == vn else "tokens") if vo is not None and vn is not None else "prefix"
    row_maps: dict[tuple[int, int], RowMap] = {}

    def rows_for(o_shape: tuple[int, ...], n_shape: tuple[int, ...]) -> RowMap | None:
        if not (o_shape and n_shape and o_shape[0] == size_o and n_shape[0] == size_n and o_shape[1:] == n_shape[1:]):
            return None
        key = (o_shape[0], n_shape[0])
        if key not in row_maps:
            if vo is not None and vn is not None:
                row_maps[key] = pm.rows_by_token(_fit(vo, key[0]), _fit(vn, key[1]))
            else:
                row_maps[key] = pm.rows_by_prefix(*key)
        return row_maps[key]

    items: list[_Item] = []
    problems: list[str] = []
    for c in view.changes():
        old_key = resolved[c.target]
        new_key = match.pairs.get(old_key)
        if new_key is None:
            problems.append(f"{old_key}: no counterpart")
            continue
        o_shape, n_shape = old.info(old_key).shape, new.info(new_key).shape
        rows = rows_for(o_shape, n_shape)
        if rows is None and o_shape != n_shape:
            problems.append(f"{old_key}: shape {list(o_shape)} -> {list(n_shape)}")
            continue
        items.append(_Item(c, old_key, new_key, rows))
    if problems:
        more = f" (and {len(problems) - SHOW} more)" if len(problems) > SHOW else ""
        raise ShapeMismatch(
            f"the patch does not fit {new.path}: {'; '.join(problems[:SHOW])}{more}; "
            f"unmatched tensors: {_listing(match.old_only, match.new_only)}; map renamed ones with --map OLD_REGEX=NEW"
        )
    moving = [it for it in items if it.rows is not None and not it.rows.identity]
    if moving and vocab_mode == "prefix":
        warnings.append(
            "no tokenizer on both bases: rows of " + ", ".join(it.old_key for it in moving[:3])
            + " kept by index over the shared prefix; give both base folders their tokenizer files"
        )
    added, dropped = 0, []
    if vo is not None and vn is not None and vocab_mode == "tokens":
        known_o, known_n = {t for t in vo if t is not None}, {t for t in vn if t is not None}
        added = len(known_n - known_o)
        dropped = [t for t in vo if t is not None and t not in known_n]
    lora_route = m.kind == "lora" and all(
        it.change.op == "add" and (it.rows is None or it.rows.identity) and it.new_key.endswith(".weight")
        for it in items)

    # -- diagnostics (before anything is written) --------------------------------------
    total = 2 * len(items) if not dry_run else len(items)
    drifts: list[TensorDrift] = []
    for i, it in enumerate(items):
        delta = _delta(view, it, old)
        drifts.append(pm.tensor_drift(it.new_key, it.old_key, old.read(it.old_key), new.read(it.new_key), delta,
                                      it.rows, renamed=it.old_key != it.new_key))
        if progress:
            progress(i + 1, total)
    summary = pm.summarize(drifts)
    report = PortReport(
        source=digest, source_kind=m.kind, kind="lora" if lora_route else "diff",
        route="lora" if lora_route else "delta", from_fingerprint=m.fingerprint, to_fingerprint=to_fp,
        to_base=base_doc(new, to_name, None), lam=lam, maps=list(maps), vocab=vocab_mode, summary=summary,
        tensors=drifts, renamed={it.old_key: it.new_key for it in items if it.old_key != it.new_key},
        old_only=match.old_only, new_only=match.new_only, added_tokens=added, dropped_tokens=dropped,
        warnings=warnings, dry_run=dry_run, ref=out_ref, from_path=str(old.path),
    )
    if dry_run:
        return report

    # -- write: blobs, manifest, ref -----------------------------------------------------
    recipe = {"op": "port", "lambda": lam, "maps": list(maps), "from_fingerprint": m.fingerprint,
              "to_fingerprint": to_fp, "vocab": vocab_mode, **({"search": search} if search is not None else {})}
    metadata = {**m.metadata, "port": {**summary.to_json(), "source_kind": m.kind,
                                       "renamed": len(report.renamed), "added_tokens": added,
                                       "dropped_tokens": len(dropped)}}
    with reg.store.writing():
        if lora_route:
            tensors = _write_lora(reg, view, items, new, lam)
            params = _lora_params(m.params, view, items)
        else:
            tensors = {}
            for i, it in enumerate(items):
                tensors[it.new_key] = _write_delta(reg, view, it, old, lam)
                if progress:
                    progress(len(items) + i + 1, total)
            params = dict(m.params) if m.kind == "diff" else {}
        to_base = {**report.to_base, "content": content_digest(new, reg.path / "cache")}  # the exact check's
        out = Manifest(kind=report.kind, base=to_base, tensors=dict(sorted(tensors.items())), params=params, parents=(digest,), recipe=recipe, metadata=metadata)
        report.digest = reg.commit(out, out_ref if move_ref else None, message or f"port {ref} to {to_fp[:19]}",
                                   move_latest=False)
        report.moved = move_ref
        report.search = search
    reg.remember_base(to_fp, new.path)  # so that a port onward or back finds it without --from
    return report


# ---------------------------------------------------------------------------- helpers
def _target_ref(ref: str, as_ref: str | None) -> str | None:
    """``as_ref`` checked, or None: the default (:func:`default_ref`) needs the new fingerprint."""
    if as_ref is not None:
        return str(parse_ref(as_ref))
    if is_digest(ref) or ref.startswith("sha256:"):
        raise InvalidArgument(f"porting {ref} needs a name for the result: --as NAME:TAG")
    return None


def _listing(old_only: list[str], new_only: list[str]) -> str:
    def part(label: str, names: list[str]) -> str:
        more = f" (+{len(names) - SHOW} more)" if len(names) > SHOW else ""
        return f"{label} {names[:SHOW]}{more}"

    return f"{part('only in the patch base:', old_only)}, {part('only in the new base:', new_only)}"


def _old_base(reg: Repository, m: Manifest, from_base: str | os.PathLike[str] | None) -> Checkpoint:
    if from_base is not None:
        old = Checkpoint(from_base)
        fp = old.fingerprint()
        if fp != m.fingerprint:
            raise BaseMismatch(
                f"--from {old.path} has fingerprint {fp[:19]}…, but the patch was made on "
                f"{m.base.get('name') or '?'} ({m.fingerprint[:19]}…); pass the patch's own base"
            )
        reg.check_content(m, old)
        return old
    seen = reg.base_path(m.fingerprint)  # where this registry last saw that base (push)
    candidates = [lambda: Checkpoint(seen)] if seen is not None else []
    if m.base.get("name"):
        candidates.append(lambda: Checkpoint(locate(m.base["name"])))
    for make in candidates:
        try:
            old = make()
        except PatchctlError:
            continue
        if old.fingerprint() == m.fingerprint:
            return old
    raise InvalidArgument(
        f"porting needs the patch's own base to measure drift: pass --from BASE_DIR "
        f"(the base {m.base.get('name') or '?'} with fingerprint {m.fingerprint[:19]}…)"
    )


def _vocab(ck: Checkpoint, warnings: list[str]) -> list[str | None] | None:
    """Row i's token string for every id of the base's tokenizer, or None when it has none."""
    folder = ck.path if ck.path.is_dir() else ck.path.parent
    tj, vt = folder / "tokenizer.json", folder / "vocab.txt"
    vocab: dict[str, int]
    if tj.is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            warnings.append(f"{tj}: the `tokenizers` package is not installed; cannot read it")
            return None
        try:
            vocab = Tokenizer.from_file(str(tj)).get_vocab(with_added_tokens=True)
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad tokenizer file
            raise InvalidCheckpoint(f"{tj}: cannot read the tokenizer: {str(e).splitlines()[0]}") from None
    elif vt.is_file():
        lines = vt.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        vocab = {}
        for i, t in enumerate(lines):
            vocab.setdefault(t, i)
    else:
        return None
    if not vocab:
        return None
    out: list[str | None] = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        if i >= 0:
            out[i] = t
    return out


def _vocab_size(ck: Checkpoint, vocab: list[str | None] | None) -> int | None:
    v = ck.config().get("vocab_size")
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    return len(vocab) if vocab is not None else None


def _fit(tokens: list[str | None], rows: int) -> list[str | None]:
    return (tokens + [None] * rows)[:rows]


def _delta(view: PatchView, it: _Item, old: Checkpoint) -> torch.Tensor:
    """The change as a delta on the old base (a replaced value becomes ``value − θ``; DoRA and trainable
    tokens their ``W' − W``)."""
    if it.change.op in ("dora", "rows"):
        return view.delta(it.change, old.read(it.old_key))
    v = view.value(it.change)
    if it.change.op == "replace":
        import torch

        from patchctl.patches.apply import subtract

        return subtract(v, old.read(it.old_key)).to(torch.float32)
    return v


def _write_delta(reg: Repository, view: PatchView, it: _Item, old: Checkpoint, lam: float) -> TensorEntry:
    from patchctl.patches.port import port_delta

    c = it.change
    carried = lam == 1.0 and (it.rows is None or it.rows.identity)
    if carried and view.m.kind == "diff" and c.op == "add":
        e = view.m.tensors[c.sources[0]]
        if e.encoding == "raw":  # the same bytes: keep the blob (pins belong to the old base)
            require_finite(view.tensor(c.sources[0]), it.new_key, "the port")  # a peer's patch may not be
            return TensorEntry(e.digest, e.dtype, e.shape, e.encoding, e.size, None)
    return reg.put_tensor(require_finite(port_delta(_delta(view, it, old), lam, it.rows).contiguous(), it.new_key,
                                         "the port"))


def _write_lora(reg: Repository, view: PatchView, items: list[_Item], new: Checkpoint, lam: float) -> dict[str, TensorEntry]:
    """A/B under the new module names; λ scales lora_B; every new key resolves on ``new``."""
    from patchctl.patches.port import scaled

    mods, _ = lora_modules(view.m)
    by_a = {mod.a: mod for mod in mods.values()}
    out: dict[str, TensorEntry] = {}
    for it in items:
        mod = by_a[it.change.sources[0]]
        wk = mod.weight_key
        new_wk = wk[: len(wk) - len(it.old_key)] + it.new_key if wk.endswith(it.old_key) else it.new_key
        new_module = new_wk[: -len(".weight")]
        for key, is_b in ((mod.a, False), (mod.b, True)):
            prefix = PEFT_PREFIX if key.startswith(PEFT_PREFIX + mod.module) else ""
            new_key = prefix + new_module + key[len(prefix) + len(mod.module):]
            e = view.m.tensors[key]
            if (is_b and lam != 1.0) or e.encoding != "raw":
                out[new_key] = reg.put_tensor(require_finite(scaled(view.tensor(key), lam if is_b else 1.0).contiguous(),
                                                             new_key, "the port"))
            else:
                out[new_key] = TensorEntry(e.digest, e.dtype, e.shape, e.encoding, e.size, None)
    probe = Manifest("lora", {"fingerprint": "sha256:" + "0" * 64, "name": ""}, out, view.m.params)
    check_against_base(PatchView(reg.store, probe), new)
    out.update({k: e for k, e in view.m.tensors.items() if k.startswith(FILE_PREFIX)})  # the adapter's kept files
    return out


def _lora_params(params: dict[str, Any], view: PatchView, items: list[_Item]) -> dict[str, Any]:
    """The adapter config, with ``target_modules`` rewritten when modules were renamed.

    A list becomes the sorted last components of the new module names (PEFT
    matches list entries as name suffixes); a regex string becomes an exact
    alternation of the new module paths (PEFT full-matches it).
    """
    import re


    renamed = [it for it in items if it.old_key != it.new_key]
    tm = params.get("target_modules")
    if not renamed or tm is None:
        return dict(params)
    mods, _ = lora_modules(view.m)
    by_a = {mod.a: mod for mod in mods.values()}
    modules = set()
    for it in items:
        mod = by_a[it.change.sources[0]]
        wk = mod.weight_key
        new_wk = wk[: len(wk) - len(it.old_key)] + it.new_key if wk.endswith(it.old_key) else it.new_key
        modules.add(new_wk[: -len(".weight")])
    if isinstance(tm, str):
        new_tm: Any = "(" + "|".join(re.escape(x) for x in sorted(modules)) + ")"
    else:
        new_tm = sorted({x.rsplit(".", 1)[-1] for x in modules})
    return {**params, "target_modules": new_tm}


def port_suites(reg: Repository, suites: Sequence[str], new: Checkpoint, to_base: dict[str, Any]) -> list[str]:
    """Copies of eval suites for the new base: the same rows and class head (the head is part of the task).

    Each copy is a ``suite`` manifest with ``to_base`` as its base, the
    original as its parent and the same blobs, so porting a suite twice gives
    the same digest. A head whose width is not the new base's hidden size is
    refused (:class:`ShapeMismatch`).
    """
    hidden = new.config().get("hidden_size")
    out = []
    for sd in suites:
        sm = reg.manifest(sd)
        head = sm.tensors.get("head")
        if head is not None and isinstance(hidden, int) and head.shape[-1] != hidden:
            raise ShapeMismatch(f"suite {sd[:19]}…: class head is {list(head.shape)}, the new base's hidden "
                                f"size is {hidden}; push a suite for the new base (`patchctl eval push`)")
        copy = Manifest(kind="suite", base=dict(to_base), tensors=dict(sm.tensors), params=dict(sm.params),
                        parents=(sd,), recipe={"op": "port-suite", "head": "carried"}, metadata={})
        out.append(reg.commit(copy, None))
    return out


def default_ref(ref: str, to_fingerprint: str) -> str:
    """``NAME:TAG-on-<8 hex>`` for a port of ``NAME:TAG`` to the base with that fingerprint."""
    r = parse_ref(ref)
    return str(parse_ref(f"{r.name}:{r.tag}-on-{to_fingerprint[7:15]}"))


__all__ = ["PortSpec", "PortReport", "default_ref", "port", "port_suites"]
