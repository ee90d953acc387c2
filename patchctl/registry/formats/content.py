"""The exact identity of a base: a sha256 of every tensor's bytes, cached by file.

The fingerprint (:meth:`Checkpoint.fingerprint`) samples three 4 KiB windows
per tensor: cheap, and enough to tell bases apart by names, dtypes and shapes,
but blind to an edited row in the middle of an embedding. The **content
digest** hashes every byte once:

    content = sha256( for each tensor, sorted by name:  "name\\tdtype\\t[shape]\\tsha256(bytes)\\n" )

It is computed once per safetensors file and cached by ``(path, size, mtime,
inode)`` in ``<registry>/cache/base-content.json`` (a cache: deleting it only
costs one re-read), so later checks are one ``stat`` per shard. The cache also
keeps each content digest's per-tensor hashes (the last :data:`KEEP_CONTENTS`),
which is how a mismatch names the tensors that differ. Shards are hashed on
``os.cpu_count()`` threads (``hashlib`` releases the GIL).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from patchctl.registry.formats.checkpoint import Checkpoint

CACHE_NAME = "base-content.json"
CACHE_VERSION = 1
KEEP_CONTENTS = 64
CHUNK = 8 << 20
_lock = threading.Lock()


def _stat_key(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _hash_range(path: Path, start: int, n: int) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(min(CHUNK, max(n, 1)))
        view = memoryview(buf)
        done = 0
        while done < n:
            k = os.preadv(fd, [view[: min(len(buf), n - done)]], start + done)
            if k <= 0:
                raise OSError(f"{path}: file ended while hashing")
            h.update(view[:k])
            done += k
    finally:
        os.close(fd)
    return h.hexdigest()


def _load(cache: Path | None) -> dict[str, Any]:
    if cache is None:
        return {"version": CACHE_VERSION, "files": {}, "contents": {}}
    try:
        doc = json.loads(cache.read_text())
        if isinstance(doc, dict) and doc.get("version") == CACHE_VERSION and isinstance(doc.get("files"), dict) \
                and isinstance(doc.get("contents"), dict):
            return doc
    except (OSError, ValueError):
        pass
    return {"version": CACHE_VERSION, "files": {}, "contents": {}}


def _save(cache: Path, doc: dict[str, Any]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(doc, sort_keys=True))
    os.replace(tmp, cache)


def _cache_file(cache_dir: Path | None) -> Path | None:
    """The cache file, or None when there is no cache (or its folder is a planted symlink)."""
    if cache_dir is None or cache_dir.is_symlink() or (cache_dir / CACHE_NAME).is_symlink():
        return None
    return cache_dir / CACHE_NAME


def tensor_hashes(ckpt: Checkpoint, cache_dir: Path | None = None) -> dict[str, str]:
    """``{tensor name: sha256 hex of its bytes}`` for every tensor of ``ckpt`` (cached per file)."""
    return _tensor_hashes(ckpt, _cache_file(cache_dir))[0]


def _tensor_hashes(ckpt: Checkpoint, cache: Path | None) -> tuple[dict[str, str], dict[str, Any]]:
    """:func:`tensor_hashes`, and the cache document it read (or wrote)."""
    with _lock:
        doc = _load(cache)
    out: dict[str, str] = {}
    todo: list[tuple[str, Any, list[int]]] = []
    for f in ckpt.files:
        path = Path(f.path).resolve()
        key = _stat_key(path)
        hit = doc["files"].get(str(path))
        if isinstance(hit, dict) and hit.get("stat") == key and isinstance(hit.get("tensors"), dict) \
                and set(hit["tensors"]) == set(f.tensors):
            out.update(hit["tensors"])
        else:
            todo.append((str(path), f, key))
    if todo:
        jobs = [(p, name, Path(f.path), info.start, info.nbytes) for p, f, _ in todo
                for name, info in sorted(f.tensors.items())]
        workers = max(1, min(os.cpu_count() or 1, 8, len(jobs)))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="patchctl-hash") as pool:
            got = list(pool.map(lambda j: _hash_range(j[2], j[3], j[4]), jobs))
        fresh: dict[str, dict[str, str]] = {}
        for (p, name, *_), hx in zip(jobs, got, strict=True):
            fresh.setdefault(p, {})[name] = hx
            out[name] = hx
        with _lock:
            doc = _load(cache)
            for p, _, key in todo:
                doc["files"][p] = {"stat": key, "tensors": fresh.get(p, {})}
            if cache is not None:
                _save(cache, doc)
    return out, doc


def content_digest(ckpt: Checkpoint, cache_dir: Path | None = None) -> str:
    """The content digest of ``ckpt`` (module docstring); remembers its per-tensor hashes in the cache."""
    cache = _cache_file(cache_dir)
    hashes, seen = _tensor_hashes(ckpt, cache)
    h = hashlib.sha256(b"patchctl-content-v1\n")
    for name in ckpt.names():
        info = ckpt.info(name)
        h.update(f"{name}\t{info.dtype}\t{list(info.shape)}\t{hashes[name]}\n".encode())
    digest = "sha256:" + h.hexdigest()
    if cache is not None and digest not in seen["contents"]:  # the usual case, known already: no second read
        with _lock:
            doc = _load(cache)
            if digest not in doc["contents"]:
                doc["contents"][digest] = hashes
                while len(doc["contents"]) > KEEP_CONTENTS:
                    doc["contents"].pop(next(iter(doc["contents"])))
                _save(cache, doc)
    return digest


def differing(expected: str, ckpt: Checkpoint, cache_dir: Path | None) -> list[str] | None:
    """The tensors of ``ckpt`` whose bytes differ from content digest ``expected``'s (None: not known here)."""
    doc = _load(_cache_file(cache_dir))
    want = doc["contents"].get(expected)
    if not isinstance(want, dict):
        return None
    have = tensor_hashes(ckpt, cache_dir)
    return sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))


__all__ = ["content_digest", "differing", "tensor_hashes"]
