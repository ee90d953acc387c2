"""The registry browser: HTML pages of ``patchctl serve`` and their JSON twins.

```
HTML                         JSON twin (the same document the page renders)
GET /                        GET /api/pages/index       ?base=&kind=&verdict=&q=&sort=&order=&page=&per_page=
GET /patches/<ref>           GET /api/pages/patches/<ref>       ref: NAME:TAG, NAME, sha256:DIGEST or a prefix
GET /validations/<ref>       GET /api/pages/validations/<ref>
GET /compare?a=<ref>&b=<ref> GET /api/pages/compare?a=&b=
GET /bases/<fingerprint>     GET /api/pages/bases/<fingerprint>
GET /static/...              browser.css, browser.js
```

Design choices:

- *One source of truth*: each page is ``template(data)`` where ``data`` is
  exactly what the JSON twin returns; charts are inline SVG made on the
  server (:mod:`patchctl.server.charts`) from the same numbers.
- *Escaping*: Jinja2 with autoescape on for every template; the SVG builders
  escape every label themselves. Names, tags, messages and metadata are user
  input and only ever reach the page as text.
- *Content-Security-Policy*: ``default-src 'none'``; scripts, styles and
  images only from this origin (``/static/``); no inline script or style.
  The pages read fine without JS; ``browser.js`` only adds client-side
  sorting of tables and a tensor filter box.
- *Scale*: the index answers from the SQLite index (one query, no manifest
  read); verdicts come from the records folder, cached per file stat; the
  dense fp16 size is computed for the shown page only. Per-tensor norms of a
  patch (immutable, by digest) are cached in memory.
- *Token*: the pages sit behind the same :class:`~patchctl.server.guard.Guard`
  as the API; a browser passes the token once as ``?token=`` and gets an
  HttpOnly, SameSite=Strict cookie (:mod:`patchctl.server.cookie`).
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from patchctl.errors import InvalidArgument, InvalidReference, NotFound, PatchctlError
from patchctl.registry.store import manifest as manifest_mod
from patchctl.registry.store import records
from patchctl.registry.store.names import DIGEST_RE, Ref, parse_ref
from patchctl.registry.store.views import PatchView
from patchctl.server import charts

if TYPE_CHECKING:
    from patchctl.registry.registry import Registry

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
SORT_KEYS = ("ref", "kind", "base", "stored", "created", "verdict", "tensors")
PER_PAGE_DEFAULT, PER_PAGE_MAX = 50, 500
VERDICTS = ("pass", "fail", "unvalidated", "scored", "none")
_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|block)\.(\d+)\.")
_STATUS = ((NotFound, 404), (InvalidReference, 400), (InvalidArgument, 400))


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt(x: Any) -> str:
    """A number as a page shows it (4 significant digits); anything else as text."""
    if isinstance(x, bool) or x is None:
        return "—" if x is None else str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.4g}"
    return str(x)


def when(t: str | None) -> str:
    """``2026-12-03T10:25:04.299266Z`` as ``2026-12-03 10:25:04Z`` (the full time is in the JSON)."""
    if not t:
        return ""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(?:\.\d+)?Z?", t)
    return f"{m.group(1)} {m.group(2)}Z" if m else t


def base_label(name: str | None, fingerprint: str | None) -> str:
    """A base's name as a column shows it: a local folder by its last part; else its fingerprint."""
    if name:
        return ("…/" + name.rstrip("/").rsplit("/", 1)[-1]) if name.startswith("/") else name
    return (fingerprint or "")[:19] + "…"


def ref_url(ref: str) -> str:
    """``/patches/<ref>``; refs hold only ``[a-z0-9._/-]``, ``:`` and hex, quoted anyway."""
    return "/patches/" + quote(ref, safe="/:")


def layer_of(key: str) -> str:
    """The layer a tensor belongs to (``layer.3``, as ``patchctl inspect`` names it), or ``other``."""
    m = _LAYER.search(key)
    return f"layer.{int(m.group(1))}" if m else "other"


def recipe_label(recipe: dict[str, Any] | None) -> str:
    """A short edge label: the op and its coefficients."""
    if not recipe:
        return ""
    op = recipe.get("op", "?")
    if op == "merge":
        params = ", ".join(f"{k}={fmt(v)}" for k, v in sorted((recipe.get("params") or {}).items()))
        w = recipe.get("weights")
        return f"merge {recipe.get('method', '')}" + (f" {params}" if params else "") + (f" w={w}" if w else "")
    if op == "compress":
        out = f"compress {recipe.get('mode', '')} d={fmt(recipe.get('density'))}"
        return out + (f" κ={fmt(recipe['kappa'])}" if recipe.get("kappa") is not None else "")
    if op == "port":
        return (f"port λ={fmt(recipe.get('lambda'))} {str(recipe.get('from_fingerprint', ''))[7:15]}→"
                f"{str(recipe.get('to_fingerprint', ''))[7:15]}")
    if op == "import":
        return f"import {recipe.get('format', '')}"
    return str(op)


def recipe_command(recipe: dict[str, Any] | None, parents: list[str], ref: str) -> str | None:
    """The CLI command that re-runs a recipe (best effort; the recipe JSON is shown next to it)."""
    if not recipe:
        return None
    op = recipe.get("op")
    if op == "merge":
        args = ["patchctl merge", *parents, f"--method {recipe.get('method')}"]
        for k, v in sorted((recipe.get("params") or {}).items()):
            args.append(f"--{'lambda' if k == 'lambda' else k.replace('_', '-')} {v}")
        if recipe.get("weights"):
            args.append("--weights " + ",".join(str(w) for w in recipe["weights"]))
        return " ".join(args + [f"--as {ref}"])
    if op == "compress":
        args = ["patchctl compress", *parents, f"--density {recipe.get('density')}", f"--mode {recipe.get('mode')}"]
        if recipe.get("scale"):
            args.append(f"--scale {recipe['scale']}")
        if recipe.get("kappa") is not None:
            args.append(f"--kappa {recipe['kappa']}")
        if recipe.get("per_tensor"):
            args.append("--per-tensor")
        return " ".join(args + [f"--as {ref}"])
    if op == "port":
        args = ["patchctl port", *parents, "--to NEW_BASE_DIR", f"--lambda {recipe.get('lambda')}"]
        args += [f"--map '{m}'" for m in recipe.get("maps") or []]
        return " ".join(args + [f"--as {ref}"])
    return None


def verdict_of(recs: list[dict[str, Any]]) -> str:
    """The last gating verdict (pass/fail/unvalidated); ``scored`` with only scores; ``none``."""
    gating = [r.get("verdict") for r in recs if r.get("verdict") in ("pass", "fail", "unvalidated")]
    if gating:
        return str(gating[-1])
    return "scored" if recs else "none"


class _Lru:
    """A small thread-safe LRU map (immutable values by digest)."""

    def __init__(self, size: int):
        self.size, self._d, self._lock = size, OrderedDict[Any, Any](), threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: Any, value: Any) -> Any:
        with self._lock:
            self._d[key] = value
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return value


class Browser:
    """The documents behind the pages, from one registry (a :class:`Registry` per thread)."""

    def __init__(self, registry: Callable[[], Registry]):
        self.registry = registry
        self._stats = _Lru(256)  # manifest digest -> per-tensor and per-change statistics
        self._dense = _Lru(65536)  # manifest digest -> dense fp16 bytes
        self._base_norms = _Lru(65536)  # (fingerprint, key) -> ‖W_base‖
        self._checkpoints = _Lru(8)  # fingerprint -> Checkpoint (or False: no folder known)
        self._verdicts: dict[str, tuple[tuple[int, int], list[dict[str, Any]]]] = {}
        self._verdict_files: dict[str, tuple[tuple[int, int], str, str]] = {}  # records file -> (stat, digest, verdict)
        self._rows: tuple[Any, list[dict[str, Any]]] | None = None
        self._lock = threading.Lock()

    # -- validation records ------------------------------------------------------------
    def validations_of(self, subject: str) -> list[dict[str, Any]]:
        """Validation records of ``subject`` (a digest or ``base:<fp>``), cached per file stat."""
        reg = self.registry()
        path = records.subject_path(reg.store, subject)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return []
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._verdicts.get(subject)
        if hit is not None and hit[0] == key:
            return hit[1]
        recs = [{"record": k, **v} for k, v in records.validations(reg.store, subject)]
        with self._lock:
            if len(self._verdicts) > 200_000:
                self._verdicts.clear()
            self._verdicts[subject] = (key, recs)
        return recs

    def _verdicts_now(self) -> dict[str, str]:
        """digest -> verdict for every patch that has a records file: one directory scan, and only
        the files whose stat changed since the last call are read again."""
        folder = self.registry().store.root / "records"
        out: dict[str, str] = {}
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return out
        for e in entries:
            n = e.name
            if not n.endswith(".jsonl") or n.startswith("base-"):
                continue
            st = e.stat()
            key = (st.st_mtime_ns, st.st_size)
            hit = self._verdict_files.get(n)
            if hit is not None and hit[0] == key:
                out[hit[1]] = hit[2]
                continue
            digest = "sha256:" + n[:-6]
            if DIGEST_RE.fullmatch(digest):
                v = verdict_of(self.validations_of(digest))
                self._verdict_files[n] = (key, digest, v)
                out[digest] = v
        return out

    def _ref_rows(self) -> list[dict[str, Any]]:
        """The index's ref rows (:meth:`Index.browse_refs`), re-queried only when the SQLite files changed."""
        reg = self.registry()
        path = str(reg.index.path)
        key = tuple(_stat_key(path + suffix) for suffix in ("", "-wal"))
        with self._lock:
            hit = self._rows
        if hit is not None and hit[0] == key:
            return hit[1]
        rows = reg.index.browse_refs()
        for r in rows:
            r["ref"] = f"{r['name']}:{r['tag']}"
        with self._lock:
            self._rows = (key, rows)
        return rows

    # -- sizes and statistics -------------------------------------------------------------
    def _manifest(self, digest: str) -> manifest_mod.Manifest:
        return self.registry().manifest(digest)

    def dense_fp16_bytes(self, digest: str) -> int | None:
        """Bytes of the patch as dense fp16 deltas (a LoRA as its ΔW = B·A per module)."""
        hit = self._dense.get(digest)
        if hit is not None:
            return int(hit)
        reg = self.registry()
        raw = reg.index.manifest_json(digest)
        if raw is None:
            return None
        m = manifest_mod.parse(raw.encode())
        view = PatchView(reg.store, m)
        total = sum(math.prod(view.shape_of(c)) for c in view.changes()) * 2
        return int(self._dense.put(digest, total))

    def _checkpoint(self, fp: str) -> Any:
        """The base folder this registry remembers for ``fp`` (headers read once), or None."""
        hit = self._checkpoints.get(fp)
        if hit is not None:
            return hit or None
        from patchctl.registry.formats.checkpoint import Checkpoint

        path = self.registry().base_path(fp)
        try:
            ck = Checkpoint(path) if path is not None else False
        except (OSError, PatchctlError, ValueError):
            ck = False
        return self._checkpoints.put(fp, ck) or None

    def _base_norm(self, fp: str, target: str) -> float | None:
        key = (fp, target)
        hit = self._base_norms.get(key)
        if hit is not None:
            return float(hit) if hit >= 0 else None
        value = -1.0
        ck = self._checkpoint(fp)
        if ck is not None:
            try:
                k = ck.resolve(target)
                if k is not None:
                    value = float(ck.read(k).double().norm())
            except (OSError, PatchctlError, ValueError):
                value = -1.0
        self._base_norms.put(key, value)
        return value if value >= 0 else None

    def stats(self, digest: str) -> dict[str, Any]:
        """Per stored tensor: ‖t‖ and density; per change (a LoRA module's ΔW): ‖Δ‖, numel, nnz."""
        hit = self._stats.get(digest)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        reg = self.registry()
        m = self._manifest(digest)
        view = PatchView(reg.store, m)
        tensors: dict[str, dict[str, float]] = {}
        for key, e in m.tensors.items():
            t = view.tensor(key).double()
            numel = max(e.numel, 1)
            tensors[key] = {"norm": float(t.norm()), "density": float(t.count_nonzero()) / numel}
        changes = []
        for c in view.changes():
            if c.op == "add" and c.sources == (c.target,):  # a diff's tensor is its delta
                e = m.tensors[c.target]
                st = tensors[c.target]
                changes.append({"target": c.target, "norm": st["norm"], "numel": e.numel,
                                "nnz": round(st["density"] * e.numel)})
                continue
            if c.op in ("dora", "rows"):  # DoRA, trainable tokens: ΔW = new − W_base needs the base
                ck = self._checkpoint(m.fingerprint)
                key = ck.resolve(c.target) if ck is not None else None
                if key is None:
                    continue
                d = view.delta(c, ck.read(key)).double()
                changes.append({"target": c.target, "norm": float(d.norm()), "numel": d.numel(),
                                "nnz": int(d.count_nonzero())})
                continue
            d = view.value(c).double()  # a LoRA module's ΔW = B·A·scaling, or a replaced tensor's new value
            if c.op == "replace":
                ck = self._checkpoint(m.fingerprint)
                key = ck.resolve(c.target) if ck is not None else None
                if key is None:
                    continue  # Δ = new − W_base needs the base
                d = d - ck.read(key).double()
            changes.append({"target": c.target, "norm": float(d.norm()), "numel": d.numel(),
                            "nnz": int(d.count_nonzero())})
        return self._stats.put(digest, {"tensors": tensors, "changes": changes})  # type: ignore[no-any-return]

    # -- documents ---------------------------------------------------------------------
    def index(self, params: dict[str, str]) -> dict[str, Any]:
        verdicts = self._verdicts_now()
        rows = [{**r, "verdict": verdicts.get(r["digest"], "none")} for r in self._ref_rows()]
        facets = {
            "bases": sorted({(r["base_fingerprint"] or "", r["base_name"] or "") for r in rows}),
            "kinds": sorted({r["kind"] or "" for r in rows} - {""}),
            "verdicts": [v for v in VERDICTS if any(r["verdict"] == v for r in rows)],
        }
        base, kind, verdict = params.get("base", ""), params.get("kind", ""), params.get("verdict", "")
        text = params.get("q", "").strip().lower()
        show_suites = params.get("suites", "") == "1"
        if not show_suites and not kind:
            rows = [r for r in rows if r["kind"] != "suite"]
        if base:
            rows = [r for r in rows if base in (r["base_fingerprint"], r["base_name"])
                    or (base.startswith("sha256:") and (r["base_fingerprint"] or "").startswith(base))]
        if kind:
            rows = [r for r in rows if r["kind"] == kind]
        if verdict:
            rows = [r for r in rows if r["verdict"] == verdict]
        if text:
            rows = [r for r in rows if text in r["ref"].lower() or text in (r["base_name"] or "").lower()
                    or text in r["digest"]]
        sort = params.get("sort", "ref")
        if sort not in SORT_KEYS:
            raise InvalidArgument(f"sort must be one of {', '.join(SORT_KEYS)}, got {sort[:40]!r}")
        order = params.get("order", "desc" if sort in ("created", "stored") else "asc")
        if order not in ("asc", "desc"):
            raise InvalidArgument(f"order must be asc or desc, got {order[:40]!r}")
        keyf: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ref": lambda r: (r["name"], r["tag"]),
            "kind": lambda r: (r["kind"] or "", r["name"], r["tag"]),
            "base": lambda r: (r["base_name"] or "", r["name"], r["tag"]),
            "stored": lambda r: (r["stored_bytes"] or 0, r["name"], r["tag"]),
            "created": lambda r: (r["created"] or "", r["name"], r["tag"]),
            "verdict": lambda r: (VERDICTS.index(r["verdict"]), r["name"], r["tag"]),
            "tensors": lambda r: (r["tensors"] or 0, r["name"], r["tag"]),
        }
        rows.sort(key=keyf[sort], reverse=order == "desc")
        per_page = _int(params.get("per_page"), PER_PAGE_DEFAULT, "per_page", 1, PER_PAGE_MAX)
        pages = max(1, math.ceil(len(rows) / per_page))
        page = _int(params.get("page"), 1, "page", 1, 10**9)
        shown = rows[(page - 1) * per_page: page * per_page]
        for r in shown:
            r["dense_fp16_bytes"] = self.dense_fp16_bytes(r["digest"]) if r["kind"] != "suite" else None
        query = {k: v for k, v in params.items() if k in ("base", "kind", "verdict", "q", "sort", "order",
                                                           "per_page", "suites") and v}
        return {"patches": shown, "total": len(rows), "page": page, "pages": pages, "per_page": per_page,
                "sort": sort, "order": order, "filters": {"base": base, "kind": kind, "verdict": verdict,
                                                           "q": params.get("q", "")},
                "facets": {"bases": [{"fingerprint": f, "name": n} for f, n in facets["bases"]],
                           "kinds": facets["kinds"], "verdicts": facets["verdicts"]},
                "query": query}

    def _node(self, digest: str) -> dict[str, Any]:
        reg = self.registry()
        refs = reg.index.tags_of(digest)
        row = reg.index.manifest_row(digest)
        best = _best_ref(refs)
        return {"digest": digest, "refs": refs, "kind": row["kind"] if row else None,
                "label": best or digest[:19] + "…", "href": ref_url(best or digest),
                "missing": row is None}

    def patch(self, ref: str) -> dict[str, Any]:
        reg = self.registry()
        digest = reg.resolve(ref)
        m = self._manifest(digest)
        refs = reg.index.tags_of(digest)
        named = _as_ref(ref)
        shown_ref = str(named) if named is not None else (_best_ref(refs) or digest)
        history: list[dict[str, Any]] = []
        message = None
        if named is not None:
            history = reg.index.history(named)
            message = reg.index.ref_message(named.name, named.tag, digest)
        elif refs:
            r0 = parse_ref(_best_ref(refs) or refs[0])
            history = reg.index.history(r0)
            message = reg.index.ref_message(r0.name, r0.tag, digest)
        stats = self.stats(digest)
        tensors = []
        for key, e in sorted(m.tensors.items()):
            s = stats["tensors"][key]
            tensors.append({"name": key, "shape": list(e.shape), "dtype": e.dtype, "encoding": e.encoding,
                            "bytes": e.size, "norm": s["norm"], "density": s["density"]})
        fp = m.fingerprint
        base_known = reg.base_path(fp) is not None
        layers: dict[str, dict[str, float]] = {}
        for c in stats["changes"]:
            lay = layers.setdefault(layer_of(c["target"]), {"delta_sq": 0.0, "base_sq": 0.0, "numel": 0, "nnz": 0,
                                                            "base_missing": 0})
            lay["delta_sq"] += c["norm"] ** 2
            lay["numel"] += c["numel"]
            lay["nnz"] += c["nnz"]
            if base_known:
                bn = self._base_norm(fp, c["target"])
                if bn is None:
                    lay["base_missing"] += 1
                else:
                    lay["base_sq"] += bn ** 2
        per_layer = []
        for name in sorted(layers, key=_layer_sort):
            lay = layers[name]
            d = math.sqrt(lay["delta_sq"])
            rel = d / math.sqrt(lay["base_sq"]) if base_known and lay["base_sq"] > 0 and not lay["base_missing"] else None
            per_layer.append({"layer": name, "delta_norm": d, "relative": rel,
                              "density": lay["nnz"] / lay["numel"] if lay["numel"] else None})
        use_rel = base_known and per_layer and all(p["relative"] is not None for p in per_layer)
        parents = [self._node(p) for p in m.parents]
        this_label = recipe_label(m.recipe)
        for p in parents:
            p["edge"] = this_label
        children = []
        for row in reg.index.children_of(digest):
            node = self._node(row["digest"])
            node["edge"] = recipe_label((json.loads(row["json"]).get("lineage") or {}).get("recipe"))
            node["recipe"] = (json.loads(row["json"]).get("lineage") or {}).get("recipe")
            children.append(node)
        recs = self.validations_of(digest)
        doc = m.to_json()
        return {
            "ref": shown_ref, "digest": digest, "refs": refs, "kind": m.kind, "message": message,
            "metadata": m.metadata, "params": m.params,
            "base": {**m.base, "fingerprint": fp, "known_locally": base_known},
            "stored_bytes": m.stored_bytes, "num_params": m.num_params,
            "dense_fp16_bytes": self.dense_fp16_bytes(digest),
            "tensors": tensors,
            "per_layer": per_layer, "per_layer_metric": "relative" if use_rel else "delta_norm",
            "lineage": {"parents": parents, "children": children, "recipe": m.recipe},
            "recipe": {"json": m.recipe, "command": recipe_command(m.recipe, [p["label"] for p in parents], shown_ref)},
            "history": history,
            "verdict": verdict_of(recs), "validations": len(recs),
            "diagnostics": _diagnostics(reg.inspection(digest)),
            "port_diagnostics": m.metadata.get("port"),
            "schema": doc.get("schema"),
        }

    def _suite_label(self, digest: str | None) -> str:
        if not digest:
            return "—"
        return _best_ref(self.registry().index.tags_of(digest)) or digest[:19] + "…"

    def _base_score(self, fp: str, suite: str, split: str) -> float | None:
        for r in reversed(self.validations_of("base:" + fp)):
            if r.get("suite") == suite and r.get("split") == split and "metrics" in r:
                return float(r["metrics"]["score"])
        return None

    def validations(self, ref: str) -> dict[str, Any]:
        reg = self.registry()
        digest = reg.resolve(ref)
        m = self._manifest(digest)
        fp = m.fingerprint
        recs = self.validations_of(digest)
        out: list[dict[str, Any]] = []
        scores = []
        for rec in recs:
            typ = rec.get("type")
            if typ == "merge-validation":
                rows = []
                for r in rec.get("rows", []):
                    rows.append({**r, "suite_label": self._suite_label(r.get("suite")),
                                 "constituent_label": self._suite_label(r.get("constituent")) if r.get("constituent")
                                 else "base", "base": self._base_score(fp, r.get("suite", ""), rec.get("split", "test"))})
                groups = [(f"{r['suite_label']} ({r['role']})", [("base", r["base"]), ("alone", r["alone"]),
                                                                   ("merged", r["merged"])]) for r in rows]
                out.append({"type": typ, "record": rec["record"], "verdict": rec.get("verdict"), "gate": rec.get("gate"),
                            "split": rec.get("split"), "device": rec.get("device"), "rows": rows,
                            "min_normalized": rec.get("min_normalized"),
                            "chart": {"series": ["base", "alone", "merged"], "groups": groups},
                            "search": _curves(rec.get("search"))})
            elif typ == "port-validation":
                rows = [{**r, "suite_label": self._suite_label(r.get("suite"))} for r in rec.get("rows", [])]
                series = ["old_base", "old_patched", "new_base", "new_ported"]
                out.append({"type": typ, "record": rec["record"], "verdict": rec.get("verdict"), "gate": rec.get("gate"),
                            "split": rec.get("split"), "device": rec.get("device"), "rows": rows,
                            "min_recovered": rec.get("min_recovered"),
                            "chart": {"series": series, "groups": [(r["suite_label"], [(s, r.get(s)) for s in series])
                                                                   for r in rows]},
                            "search": _curves(rec.get("search"))})
            elif typ and typ.endswith("-validation"):
                rows = [{**r, "suite_label": self._suite_label(r.get("suite"))} for r in rec.get("rows", [])]
                series = ["base", "source", "derived"]
                out.append({"type": typ, "record": rec["record"], "verdict": rec.get("verdict"),
                            "split": rec.get("split"), "device": rec.get("device"), "rows": rows,
                            "chart": {"series": series, "groups": [(r["suite_label"], [(s, r.get(s)) for s in series])
                                                                   for r in rows]},
                            "search": _curves(rec.get("search"))})
            elif "metrics" in rec:
                scores.append({"record": rec["record"], "suite": rec.get("suite"),
                               "suite_label": self._suite_label(rec.get("suite")), "split": rec.get("split"),
                               "device": rec.get("device"), "score": rec["metrics"].get("score"),
                               "base": self._base_score(fp, rec.get("suite", ""), rec.get("split", "test"))})
        if not any(o.get("search") for o in out) and isinstance(m.recipe, dict) and m.recipe.get("search"):
            out.append({"type": "search", "record": None, "search": _curves(m.recipe["search"]), "rows": []})
        refs = reg.index.tags_of(digest)
        named = _as_ref(ref)
        return {"ref": str(named) if named else (_best_ref(refs) or digest), "digest": digest, "kind": m.kind,
                "base": {**m.base, "fingerprint": fp}, "verdict": verdict_of(recs),
                "suites": [{"suite": s, "label": self._suite_label(s)} for s in records.suites(reg.store, digest)],
                "records": out, "scores": scores}

    def compare(self, a: str, b: str) -> dict[str, Any]:
        reg = self.registry()
        da, db = reg.resolve(a), reg.resolve(b)
        ma, mb = self._manifest(da), self._manifest(db)
        if ma.fingerprint != mb.fingerprint:
            raise InvalidArgument(f"{a} and {b} are for different bases ({ma.fingerprint[:19]}… and "
                                  f"{mb.fingerprint[:19]}…); compare two patches of one base")
        va, vb = PatchView(reg.store, ma), PatchView(reg.store, mb)
        ca = {c.target: c for c in va.changes()}
        cb = {c.target: c for c in vb.changes()}
        rows = []
        for t in sorted(set(ca) & set(cb)):
            x, y = va.value(ca[t]).double().flatten(), vb.value(cb[t]).double().flatten()
            if x.shape != y.shape:
                rows.append({"tensor": t, "shape_a": list(va.shape_of(ca[t])), "shape_b": list(vb.shape_of(cb[t])),
                             "relative_change": None, "cosine": None, "norm_a": float(x.norm()),
                             "norm_b": float(y.norm())})
                continue
            na, nb = float(x.norm()), float(y.norm())
            rel = float((y - x).norm()) / na if na > 0 else None
            cos = float(x @ y) / (na * nb) if na > 0 and nb > 0 else None
            rows.append({"tensor": t, "shape_a": list(va.shape_of(ca[t])), "shape_b": list(vb.shape_of(cb[t])),
                         "relative_change": rel, "cosine": cos, "norm_a": na, "norm_b": nb})
        return {"a": {"ref": a, "digest": da, "kind": ma.kind, "href": ref_url(a)},
                "b": {"ref": b, "digest": db, "kind": mb.kind, "href": ref_url(b)},
                "base": {**ma.base, "fingerprint": ma.fingerprint}, "tensors": rows,
                "only_in_a": sorted(set(ca) - set(cb)), "only_in_b": sorted(set(cb) - set(ca))}

    def base(self, fingerprint: str) -> dict[str, Any]:
        if not DIGEST_RE.fullmatch(fingerprint):
            raise InvalidReference(f"{fingerprint[:80]!r} is not a base fingerprint (sha256: and 64 hex digits)")
        reg = self.registry()
        verdicts = self._verdicts_now()
        rows = [{**r, "verdict": verdicts.get(r["digest"], "none")} for r in self._ref_rows()
                if r["base_fingerprint"] == fingerprint]
        if not rows:
            raise NotFound(f"no patch for base {fingerprint} in this registry")
        control = records.suites(reg.store, "base:" + fingerprint, "control")
        return {"fingerprint": fingerprint, "names": sorted({r["base_name"] or "" for r in rows} - {""}),
                "known_locally": reg.base_path(fingerprint) is not None,
                "patches": [r for r in rows if r["kind"] != "suite"],
                "suites": [r for r in rows if r["kind"] == "suite"],
                "control_suites": [{"suite": s, "label": self._suite_label(s)} for s in control]}


def _diagnostics(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    """The stored ``patchctl inspect`` result, without its per-tensor rows (the page shows layers)."""
    if not doc:
        return None
    return {"summary": doc.get("summary"), "layers": doc.get("layers") or {}, "svd": doc.get("svd"),
            "device": doc.get("device"), "version": doc.get("version")}


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _best_ref(refs: list[str]) -> str | None:
    """The ref to name a version by: its first tag other than ``latest`` (which moves), else any."""
    return next((r for r in refs if not r.endswith(":latest")), refs[0] if refs else None)


def _layer_sort(name: str) -> tuple[int, int]:
    return (1, 0) if name == "other" else (0, int(name.split(".")[1]))


def _as_ref(ref: str) -> Ref | None:
    """``name:tag`` (or ``name``) as a :class:`Ref`; None for a digest or digest prefix."""
    return None if ref.startswith("sha256:") else parse_ref(ref)


def _int(raw: str | None, default: int, what: str, lo: int, hi: int) -> int:
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or len(raw) > 9 or not lo <= int(raw) <= hi:
        raise InvalidArgument(f"{what} must be an integer in [{lo}, {hi}], got {raw[:20]!r}")
    return int(raw)


def _curves(search: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A coefficient search as curves: per coefficient, (value, validation objective) and the chosen value."""
    if not search or not isinstance(search.get("curve"), list):
        return []
    chosen = search.get("chosen") or {}
    by: dict[str, list[tuple[float, float]]] = {}
    for p in search["curve"]:
        coef = p.get("coefficient") or next((k for k in chosen if k not in ("params", "lines_beta")), "value")
        if "value" in p and "objective" in p:
            by.setdefault(str(coef), []).append((float(p["value"]), float(p["objective"])))
    out = []
    for coef, pts in by.items():
        if coef == "lines_beta":
            pick = chosen.get("lines_beta")
        else:
            pick = (chosen.get("params") or {}).get(coef, chosen.get(coef))
        out.append({"coefficient": coef, "points": [{"value": x, "objective": y} for x, y in pts],
                    "chosen": float(pick) if isinstance(pick, (int, float)) else None,
                    "objective": search.get("objective"), "split": search.get("split")})
    return out


# ---------------------------------------------------------------------------- HTTP layer
def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(bytes=human_bytes, num=fmt, ref_url=ref_url, when=when, base_label=base_label, short=lambda d: (d or "")[:19] + "…",
                       tojson_pretty=lambda x: json.dumps(x, indent=2, sort_keys=True, ensure_ascii=False, default=str))
    env.globals.update(charts=charts, urlencode=urlencode, sort_keys=SORT_KEYS)
    return env


class _Json(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(_nan_to_none(content), sort_keys=True, separators=(",", ":"), default=str).encode()


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


class _Pages:
    """The route handlers: each page calls one :class:`Browser` method and renders or returns it."""

    def __init__(self, browser: Browser):
        self.b = browser
        self.templates = Jinja2Templates(env=_env())

    def _html(self, request: Request, template: str, make: Callable[[], dict[str, Any]], **extra: Any) -> Response:
        t0 = time.perf_counter()
        try:
            data = make()
            status = 200
        except PatchctlError as e:
            status = next((s for cls, s in _STATUS if isinstance(e, cls)), 500)
            data, template = {"error": str(e).splitlines()[0] if str(e) else type(e).__name__, "status": status}, \
                "error.html"
        ms = (time.perf_counter() - t0) * 1000
        twin = "/api/pages" + ("/index" if request.url.path == "/" else request.url.path)
        if request.url.query:
            twin += "?" + request.url.query
        r = self.templates.TemplateResponse(request, template, {"d": data, "json_url": twin, **extra},
                                            status_code=status)
        total = (time.perf_counter() - t0) * 1000
        r.headers.update(SECURITY_HEADERS)
        r.headers["Server-Timing"] = f"data;dur={ms:.1f}, total;dur={total:.1f}"
        return r

    @staticmethod
    def _json(make: Callable[[], dict[str, Any]]) -> Response:
        t0 = time.perf_counter()
        data = make()  # a PatchctlError goes to the app's JSON error boundary
        r = _Json(data)
        r.headers.update({k: v for k, v in SECURITY_HEADERS.items() if k != "X-Frame-Options"})
        r.headers["Server-Timing"] = f"total;dur={(time.perf_counter() - t0) * 1000:.1f}"
        return r

    @staticmethod
    def _params(request: Request) -> dict[str, str]:
        return {k: v for k, v in request.query_params.items()}

    def index(self, request: Request) -> Response:
        return self._html(request, "index.html", lambda: self.b.index(self._params(request)))

    def index_json(self, request: Request) -> Response:
        return self._json(lambda: self.b.index(self._params(request)))

    def patch(self, request: Request) -> Response:
        return self._html(request, "patch.html", lambda: self.b.patch(request.path_params["ref"]))

    def patch_json(self, request: Request) -> Response:
        return self._json(lambda: self.b.patch(request.path_params["ref"]))

    def validations(self, request: Request) -> Response:
        return self._html(request, "validations.html", lambda: self.b.validations(request.path_params["ref"]))

    def validations_json(self, request: Request) -> Response:
        return self._json(lambda: self.b.validations(request.path_params["ref"]))

    def _compare(self, request: Request) -> dict[str, Any]:
        a, b = request.query_params.get("a", ""), request.query_params.get("b", "")
        if not a or not b:
            raise InvalidArgument("compare needs two patches: ?a=NAME:TAG&b=NAME:TAG")
        return self.b.compare(a, b)

    def compare(self, request: Request) -> Response:
        return self._html(request, "compare.html", lambda: self._compare(request))

    def compare_json(self, request: Request) -> Response:
        return self._json(lambda: self._compare(request))

    def base(self, request: Request) -> Response:
        return self._html(request, "base.html", lambda: self.b.base(request.path_params["fingerprint"]))

    def base_json(self, request: Request) -> Response:
        return self._json(lambda: self.b.base(request.path_params["fingerprint"]))


def routes(registry: Callable[[], Registry]) -> list[BaseRoute]:
    """The browser's routes over ``registry()`` (a per-thread :class:`Registry`), to mount in the app."""
    p = _Pages(Browser(registry))
    return [
        Route("/", p.index),
        Route("/api/pages/index", p.index_json),
        Route("/patches/{ref:path}", p.patch),
        Route("/api/pages/patches/{ref:path}", p.patch_json),
        Route("/validations/{ref:path}", p.validations),
        Route("/api/pages/validations/{ref:path}", p.validations_json),
        Route("/compare", p.compare),
        Route("/api/pages/compare", p.compare_json),
        Route("/bases/{fingerprint}", p.base),
        Route("/api/pages/bases/{fingerprint}", p.base_json),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]


__all__ = ["CSP", "Browser", "recipe_command", "recipe_label", "routes"]
