"""Exporters: a stored patch → a PEFT folder, a diff safetensors file, or a full model.

Every exporter writes into a temporary sibling and renames it into place at
the end, so a failure leaves nothing half-written at the destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from patchctl.errors import InvalidArgument, InvalidPatch, PatchctlWarning
from patchctl.patches import host
from patchctl.patches.host import HostTensor
from patchctl.registry.formats.checkpoint import INDEX_NAME, PICKLE_SUFFIXES, Checkpoint
from patchctl.registry.formats.safetensors import (
    DTYPES,
    ITEMSIZE,
    StreamingWriter,
    dtype_name,
    tensor_to_bytes,
)
from patchctl.registry.formats.sidefiles import CONFIG, dump_config, json_patch, read_config
from patchctl.registry.store.folder import direct_file
from patchctl.registry.store.views import (
    FILE_PREFIX,
    HEADER_SUFFIX,
    PatchView,
    check_against_base,
    tied_changes,
)

Progress = Callable[[int, int], None] | None


@contextlib.contextmanager
def staged(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``out`` renamed onto ``out`` when the block succeeds."""
    out = out.resolve()
    if out.exists() and not overwrite:
        raise InvalidArgument(f"{out} already exists; choose another path or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.patchctl-tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def export_peft(view: PatchView, out: Path) -> Path:
    """A PEFT folder: ``adapter_config.json``, ``adapter_model.safetensors`` and, when the patch kept one,
    the model card ``README.md``.

    A patch pushed from a PEFT folder exports byte for byte what PEFT wrote: the config bytes as read
    (when they still parse to the patch's params) and the safetensors header as read (when it still
    lists exactly the patch's tensors, back to back). Otherwise the config is written as sorted JSON
    and the safetensors file in the canonical layout.
    """
    if view.m.kind != "lora":
        raise InvalidArgument(f"only LoRA patches export as PEFT folders; this one is a {view.m.kind} (use --format diff)")
    files = {k.removeprefix(FILE_PREFIX): e for k, e in view.m.tensors.items() if k.startswith(FILE_PREFIX)}

    def file_bytes(name: str) -> bytes | None:
        e = files.get(name)
        return None if e is None or e.encoding != "raw" else view.store.read_blob(e.digest)

    names = sorted(k for k in view.m.tensors if not k.startswith(FILE_PREFIX))
    with staged(out) as tmp:
        tmp.mkdir()
        config = file_bytes("adapter_config.json")
        if config is None or _json_or_none(config) != view.m.params:
            config = (json.dumps(view.m.params, indent=2, sort_keys=True) + "\n").encode()
        (tmp / "adapter_config.json").write_bytes(config)
        card = file_bytes("README.md")
        if card is not None:
            (tmp / "README.md").write_bytes(card)
        header = file_bytes("adapter_model.safetensors" + HEADER_SUFFIX)
        order = _header_order(header, view, names) if header is not None else None
        with open(tmp / "adapter_model.safetensors", "wb") as f:
            if order is not None and header is not None:
                f.write(header)
                for n in order:
                    e = view.m.tensors[n]
                    f.write(view.store.read_blob(e.digest) if e.encoding == "raw" else tensor_to_bytes(view.tensor(n)))
            else:
                entries = [(n, view.m.tensors[n].dtype, view.m.tensors[n].shape) for n in names]
                w = StreamingWriter(f, entries, {"format": "pt"})
                for n in w.order:
                    w.write(n, view.tensor(n))
                w.close()
    return out


def _json_or_none(data: bytes) -> object:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _header_order(header: bytes, view: PatchView, names: list[str]) -> list[str] | None:
    """The data order of a kept safetensors header, when it lists exactly the patch's tensors (names,
    dtypes, shapes) back to back from offset 0; else None (the header no longer describes the patch)."""
    try:
        n = int.from_bytes(header[:8], "little")
        doc = json.loads(header[8:8 + n])
    except ValueError:
        return None
    if len(header) != 8 + n or not isinstance(doc, dict):
        return None
    doc.pop("__metadata__", None)
    if sorted(doc) != names:
        return None
    spans = []
    for name, d in doc.items():
        e = view.m.tensors[name]
        if not isinstance(d, dict) or DTYPES.get(d.get("dtype"), ("",))[0] != e.dtype \
                or d.get("shape") != list(e.shape) or not isinstance(d.get("data_offsets"), list) \
                or len(d["data_offsets"]) != 2 or not all(isinstance(x, int) for x in d["data_offsets"]):
            return None
        spans.append((d["data_offsets"], name))
    spans.sort()
    end = 0
    for (lo, hi), name in spans:
        if lo != end or hi - lo != view.m.tensors[name].numel * ITEMSIZE[view.m.tensors[name].dtype]:
            return None
        end = hi
    return [name for _, name in spans]


def export_diff(view: PatchView, out: Path, dtype: str | None = None, exact: bool = False) -> Path:
    """Dense deltas keyed by base tensor name (LoRA: ΔW in float32 unless ``dtype``).

    The file's ``__metadata__`` (:func:`diff_metadata`) names the patch's kind and base, says how base
    and delta combine, and carries the patch's side files. ``exact``: each tensor with exactness pins
    also gets ``NAME::pin_index`` (int64 flat positions) and ``NAME::pin_values`` (the fine-tune's
    values there), so base + delta, then the pins, equals the fine-tune bit for bit — as ``apply``
    computes it. The delta must then keep every bit: ``dtype`` the stored dtype or a wider float.
    """
    import torch

    changes = view.changes()
    if any(c.op in ("dora", "rows") for c in changes):
        what = "DoRA (use_dora)" if any(c.op == "dora" for c in changes) else "trainable_token_indices"
        raise InvalidPatch(f"this LoRA adapter uses {what}, whose change is computed from the base weights, so it "
                           "has no ΔW file without them; export it as --format peft, or `patchctl apply` it")
    if any(c.op != "add" for c in changes):
        raise InvalidPatch("this LoRA adapter replaces whole tensors (modules_to_save); export it as --format peft")

    def out_dtype(c: object) -> str:
        if dtype:
            return dtype
        return "float32" if view.m.kind == "lora" else view.m.tensors[c.sources[0]].dtype  # type: ignore[attr-defined]

    specs = {c.target: (c, out_dtype(c)) for c in changes}
    pins = {}
    for n, (c, d) in specs.items() if exact else ():
        p = view.pins(c.sources[0]) if len(c.sources) == 1 else None
        if p is None:
            continue
        stored = view.m.tensors[c.sources[0]].dtype
        if d != stored and ITEMSIZE[d] <= ITEMSIZE[stored]:
            raise InvalidArgument(f"--exact with --dtype {d}: the stored {stored} delta of {n!r} does not fit in "
                                  f"{d} bit for bit; drop --dtype or choose float32")
        pins[n] = p
    entries = [(n, d, view.shape_of(c)) for n, (c, d) in specs.items()]
    for n, (idx, vals) in pins.items():
        if n + PIN_INDEX in specs or n + PIN_VALUES in specs:
            raise InvalidPatch(f"tensor {n + PIN_INDEX!r} clashes with the pins of {n!r}; export without --exact")
        entries += [(n + PIN_INDEX, "int64", tuple(idx.shape)), (n + PIN_VALUES, dtype_name(vals.dtype), tuple(vals.shape))]
    with staged(out) as tmp:
        with open(tmp, "wb") as f:
            w = StreamingWriter(f, entries, diff_metadata(view, exact))
            for n in w.order:
                if n.endswith((PIN_INDEX, PIN_VALUES)) and n not in specs:
                    idx, vals = pins[n.rsplit("::", 1)[0]]
                    w.write(n, idx.to(torch.int64) if n.endswith(PIN_INDEX) else vals)
                    continue
                c, d = specs[n]
                w.write(n, view.value(c).to(getattr(torch, d)))
            w.close()
    return out


#: Suffixes of the pin tensors an ``--exact`` diff export adds (``::`` is in no PyTorch state-dict key).
PIN_INDEX, PIN_VALUES = "::pin_index", "::pin_values"
#: How a diff file's tensors combine with the base: ``patchctl.combine`` in its ``__metadata__``.
COMBINE = ("for each tensor NAME: out = (base.float() + delta.float()).to(base.dtype) (float64 for a float64 base); "
           "then, where NAME::pin_index exists, out.view(-1)[NAME::pin_index] = NAME::pin_values")
#: The cap on side files carried in an exported diff's ``__metadata__`` (base64 makes them 4/3 larger).
MAX_EMBEDDED_SIDE_FILES = 48 << 20


def diff_metadata(view: PatchView, exact: bool) -> dict[str, str]:
    """An exported diff file's ``__metadata__`` (string values, as safetensors requires).

    ``format``: ``pt``; ``patchctl.kind``; ``patchctl.base`` (``NAME[@REVISION]``) and
    ``patchctl.base_fingerprint``; ``patchctl.combine`` (:data:`COMBINE`); ``patchctl.exact``
    (``true`` when the pin tensors are in the file); ``patchctl.side_files`` when the patch has side
    files: JSON ``{name: {"json_patch": [...]} | {"base64": ...} | {"removed": true}}``.
    """
    import base64

    b = view.m.base
    meta = {"format": "pt", "patchctl.kind": view.m.kind,
            "patchctl.base": str(b.get("name", "")) + (f"@{b['revision']}" if b.get("revision") else ""),
            "patchctl.base_fingerprint": str(b["fingerprint"]), "patchctl.combine": COMBINE,
            "patchctl.exact": "true" if exact else "false"}
    side: dict[str, dict[str, object]] = {}
    total = 0
    for name, f in sorted(view.m.side_files.items()):
        if "digest" in f:
            total += int(f["size"])
            if total > MAX_EMBEDDED_SIDE_FILES:
                raise InvalidArgument(f"the patch's side files are over {MAX_EMBEDDED_SIDE_FILES >> 20} MiB, too "
                                      "many for a safetensors header; `patchctl apply` writes them as files")
            side[name] = {"base64": base64.b64encode(view.store.read_blob(f["digest"])).decode()}
        else:
            side[name] = dict(f)
    if side:
        meta["patchctl.side_files"] = json.dumps(side, sort_keys=True, separators=(",", ":"))
    return meta


def apply_to_base(view: PatchView, base: Checkpoint, out: Path, progress: Progress = None) -> Path:
    """Write base + patch as a full HF checkpoint folder, shard layout kept, streaming."""
    from patchctl.patches._workers import Behind, prefetched

    if not base.path.is_dir():
        raise InvalidArgument("apply needs a base model folder")
    resolved = check_against_base(view, base)
    for line in tied_changes(view, base):
        warnings.warn(line, PatchctlWarning, stacklevel=2)
    by_key = {key: c for c in view.changes() if (key := resolved[c.target])}
    fast = _host_apply(view, base, by_key)
    if not fast:
        from patchctl.patches.apply import apply_pins, combine
    total = base.total_bytes
    done = 0
    with staged(out) as tmp:
        copy_side_files(base, tmp, view)
        for sf in base.files:
            entries = [(i.name, i.dtype, i.shape) for i in sf]
            with direct_file(tmp / sf.path.name) as f:  # around the page cache: the kernel copies nothing
                w = StreamingWriter(f, entries, sf.metadata or None)

                def load(name: str, sf: Any = sf, w: Any = w) -> tuple[Any, Any, Any]:
                    """On a reader thread (reads and blob hashes release the GIL): base tensor, delta, pins."""
                    c = by_key.get(sf.tensors[name].name)
                    if fast:  # read into a pooled buffer aligned as its bytes' place in the output file
                        t = sf.read_host(name, lead=w.offsets[name])
                        return t, *(_host_delta(view, c) if c is not None else (None, None))
                    if c is None or view.m.kind == "lora":
                        return sf.read(name), None, None
                    v = view.value(c)
                    return sf.read(name), v, view.pins(c.sources[0]) if c.op == "add" else None

                def put(name: str, t: Any, w: Any = w) -> None:
                    w.write(name, t)
                    if fast:
                        t.release()  # its pooled buffer takes the next tensor read

                with Behind(put) as write:  # tensor i is written while tensor i + 1 is read and summed
                    for name, (t, v, pins) in prefetched(load, w.order, ahead=2):  # two readers: read, hash
                        info = sf.tensors[name]
                        c = by_key.get(info.name)
                        if c is not None and fast:  # the same sum on the C kernels, no torch
                            t = host.add_into(t, v)
                            v.release()
                            if pins is not None:
                                host.apply_pins(t, *pins)
                        elif c is not None and view.m.kind == "lora":  # every op, each as peft merges it
                            t = view.new_value(c, t)
                        elif c is not None:
                            t = combine(t, v) if c.op == "add" else v.to(t.dtype)
                            if pins is not None:
                                t = apply_pins(t, *pins)
                        del v, pins
                        write(info.name, t)
                        done += info.nbytes
                        if progress:
                            progress(done, total)
                w.close()
                f.flush()
                os.fsync(f.fileno())
    return out


def _host_apply(view: PatchView, base: Checkpoint, by_key: dict[str, Any]) -> bool:
    """Whether apply can run on :mod:`patchctl.patches.host` (no torch): a diff of stored raw deltas,
    every dtype float32/float16/bfloat16, the C kernels built. Else the torch path (same values)."""
    if view.m.kind == "lora" or view.m.params.get("source_kind") == "lora":
        return False
    dtypes = {base.info(k).dtype for k in by_key}  # tensors the patch does not change are copied as bytes
    for c in by_key.values():
        e = view.m.tensors[c.sources[0]]
        if c.op != "add" or e.encoding != "raw":
            return False
        dtypes.add(e.dtype)
    return host.usable(*dtypes)


def _host_delta(view: PatchView, c: Any) -> tuple[HostTensor, Any]:
    """A change's stored delta and its pins ``(positions, values, dtype)`` (None without), as host arrays."""
    e = view.m.tensors[c.sources[0]]
    data = view.store.read_blob_pooled(e.digest)  # released by the caller once added
    if len(data) != e.size:
        host.POOL.give(data)
        raise InvalidPatch(f"blob {e.digest} has {len(data)} bytes, expected {e.size}")
    delta = HostTensor(data, e.dtype, e.shape, pooled=True)
    if not e.pins:
        return delta, None
    return delta, (*host.decode_pins(view.store.read_blob(e.pins["digest"]), e.dtype, e.numel), e.dtype)


def copy_side_files(base: Checkpoint, folder: Path, view: PatchView | None = None) -> None:
    """Make ``folder`` with the base folder's config, tokenizer, ... (not weights, not pickles) and index.

    With ``view``, the patch's side files then turn them into the fine-tune's: ``config.json`` patched
    (its JSON Patch on the base's, written as transformers writes it), tokenizer and generation files
    written or removed.
    """
    folder.mkdir()
    for item in base.path.iterdir():
        if item.suffix == ".safetensors" or item.name == INDEX_NAME or item.suffix in PICKLE_SUFFIXES:
            continue
        if item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, folder / item.name)
        else:
            shutil.copy2(item, folder / item.name)
    if base.index_json is not None:
        (folder / INDEX_NAME).write_text(json.dumps(base.index_json, indent=2) + "\n")
    for name, f in sorted(view.m.side_files.items()) if view is not None else ():
        path = folder / name  # one path component, a config/tokenizer/generation file name (manifest.parse)
        if name == CONFIG:
            cfg = json_patch(read_config(folder) or {}, f["json_patch"], f"config.json of {base.path}")
            path.write_text(dump_config(cfg))
        elif f.get("removed"):
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(view.store.read_blob(f["digest"]))
