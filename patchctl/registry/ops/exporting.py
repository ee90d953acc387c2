"""Exporters: a stored patch → a PEFT folder, a diff safetensors file, or a full model.

Every exporter writes into a temporary sibling and renames it into place at
the end, so a failure leaves nothing half-written at the destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from patchctl.errors import InvalidArgument, InvalidPatch
from patchctl.registry.formats.checkpoint import INDEX_NAME, PICKLE_SUFFIXES, Checkpoint
from patchctl.registry.formats.safetensors import StreamingWriter
from patchctl.registry.store.views import PatchView, check_against_base

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
    if view.m.kind != "lora":
        raise InvalidArgument(f"only LoRA patches export as PEFT folders; this one is a {view.m.kind} (use --format diff)")
    with staged(out) as tmp:
        tmp.mkdir()
        (tmp / "adapter_config.json").write_text(json.dumps(view.m.params, indent=2, sort_keys=True) + "\n")
        names = sorted(view.m.tensors)
        entries = [(n, view.m.tensors[n].dtype, view.m.tensors[n].shape) for n in names]
        with open(tmp / "adapter_model.safetensors", "wb") as f:
            w = StreamingWriter(f, entries, {"format": "pt"})
            for n in w.order:
                w.write(n, view.tensor(n))
            w.close()
    return out


def export_diff(view: PatchView, out: Path, dtype: str | None = None) -> Path:
    """Dense deltas keyed by base tensor name (LoRA: ΔW in float32 unless ``dtype``)."""
    import torch

    changes = view.changes()
    if any(c.op != "add" for c in changes):
        raise InvalidPatch("this LoRA adapter replaces whole tensors (modules_to_save); export it as --format peft")

    def out_dtype(c: object) -> str:
        if dtype:
            return dtype
        return "float32" if view.m.kind == "lora" else view.m.tensors[c.sources[0]].dtype  # type: ignore[attr-defined]

    specs = {c.target: (c, out_dtype(c)) for c in changes}
    with staged(out) as tmp:
        with open(tmp, "wb") as f:
            w = StreamingWriter(f, [(n, d, view.shape_of(c)) for n, (c, d) in specs.items()])
            for n in w.order:
                c, d = specs[n]
                w.write(n, view.value(c).to(getattr(torch, d)))
            w.close()
    return out


def apply_to_base(view: PatchView, base: Checkpoint, out: Path, progress: Progress = None) -> Path:
    """Write base + patch as a full HF checkpoint folder, shard layout kept, streaming."""
    from patchctl.patches.apply import apply_pins, combine

    if not base.path.is_dir():
        raise InvalidArgument("apply needs a base model folder")
    resolved = check_against_base(view, base)
    by_key = {key: c for c in view.changes() if (key := resolved[c.target])}
    total = base.total_bytes
    done = 0
    with staged(out) as tmp:
        copy_side_files(base, tmp)
        for sf in base.files:
            entries = [(i.name, i.dtype, i.shape) for i in sf]
            with open(tmp / sf.path.name, "wb") as f:
                w = StreamingWriter(f, entries, sf.metadata or None)
                for name in w.order:
                    info = sf.tensors[name]
                    t = sf.read(name)
                    c = by_key.get(info.name)
                    if c is not None:
                        v = view.value(c)
                        t = combine(t, v) if c.op == "add" else v.to(t.dtype)
                        pins = view.pins(c.sources[0]) if c.op == "add" else None
                        if pins is not None:
                            t = apply_pins(t, *pins)
                    w.write(info.name, t)
                    done += info.nbytes
                    if progress:
                        progress(done, total)
                w.close()
                f.flush()
                os.fsync(f.fileno())
    return out


def copy_side_files(base: Checkpoint, folder: Path) -> None:
    """Make ``folder`` with the base folder's config, tokenizer, ... (not weights, not pickles) and index."""
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
