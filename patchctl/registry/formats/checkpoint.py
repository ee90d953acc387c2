"""A model checkpoint on disk: one safetensors file, or shards plus an index.

Used for bases (fingerprint, apply, diff import) and full fine-tunes. All
tensor access goes through :class:`~._safetensors.SafetensorsFile`, one tensor
at a time, so memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from patchctl.errors import InvalidCheckpoint, NotFound, PickleRefused
from patchctl.registry.formats.safetensors import (
    SafetensorsFile,
    TensorInfo,
    dtype_name,
    tensor_to_bytes,
)

if TYPE_CHECKING:
    import torch

    from patchctl.patches.host import HostTensor

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FINGERPRINT_WINDOW = 4096
FINGERPRINT_VERSION = b"patchctl-fingerprint-v1\n"


def resolve_name(target: str, names: Collection[str]) -> str | None:
    """The one rule for finding base tensor ``target`` among ``names`` (a model's or a file's keys).

    1. ``target`` itself;
    2. else the one name that ends with ``.target`` (a file or model that adds a
       prefix, e.g. ``bert.``); when several do, the name is **ambiguous** and
       nothing is chosen (None), whatever a shorter spelling would find;
    3. else ``target`` without its leading components, shortest cut first (a
       PEFT key carries the wrapped model's prefix, the file may not).
    """
    if target in names:
        return target
    hits = [n for n in names if n.endswith("." + target)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        return None
    parts = target.split(".")
    for i in range(1, len(parts)):
        tail = ".".join(parts[i:])
        if tail in names:
            return tail
    return None


class Checkpoint:
    """Tensors of a model folder (or a single ``.safetensors`` file)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.exists():
            raise NotFound(f"model folder {str(self.path)!r} does not exist")
        self.files: list[SafetensorsFile] = []
        self.where: dict[str, SafetensorsFile] = {}
        if self.path.is_file():
            if self.path.suffix != ".safetensors":
                _refuse_pickle(self.path)
                raise InvalidCheckpoint(f"{self.path} is not a .safetensors file")
            self._add(SafetensorsFile(self.path))
            self.index_json: dict | None = None
            return
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                self.index_json = json.loads(index.read_text())
                weight_map = self.index_json["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise InvalidCheckpoint(f"{index}: not a valid safetensors index (needs a weight_map)") from None
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
                    raise InvalidCheckpoint(f"{index}: invalid shard file name {shard!r}")
                p = self.path / shard
                if not p.is_file():
                    raise InvalidCheckpoint(f"{index}: shard {shard} is missing")
                self._add(SafetensorsFile(p))
            missing = set(weight_map) - set(self.where)
            if missing:
                raise InvalidCheckpoint(f"{index}: tensors listed but absent from shards: {sorted(missing)[:5]}")
        else:
            self.index_json = None
            single = self.path / SINGLE_NAME
            candidates = [single] if single.is_file() else sorted(self.path.glob("*.safetensors"))
            if not candidates:
                pickles = [p for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
                if pickles:
                    _refuse_pickle(pickles[0])
                raise InvalidCheckpoint(f"{self.path}: no model.safetensors or {INDEX_NAME} in the folder")
            for p in candidates:
                self._add(SafetensorsFile(p))

    def _add(self, f: SafetensorsFile) -> None:
        for name in f.tensors:
            if name in self.where:
                raise InvalidCheckpoint(f"{self.path}: tensor {name!r} appears in two files")
            self.where[name] = f
        self.files.append(f)

    # -- access -------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.where)

    def info(self, name: str) -> TensorInfo:
        return self.where[name].tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, name: str) -> torch.Tensor:
        return self.where[name].read(name)

    def read_host(self, name: str, lead: int = 0) -> HostTensor:
        """Tensor ``name`` as raw bytes, dtype and shape (:class:`~patchctl.patches.host.HostTensor`)."""
        return self.where[name].read_host(name, lead)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.read(name)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for f in self.files for i in f)

    def resolve(self, module_key: str) -> str | None:
        """The checkpoint key for ``module_key`` (:func:`resolve_name`)."""
        return resolve_name(module_key, self.where)

    # -- identity -----------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 over names, dtypes, shapes and three 4 KiB windows of each tensor."""
        h = hashlib.sha256(FINGERPRINT_VERSION)
        for name in self.names():
            info = self.info(name)
            h.update(f"{name}\t{info.dtype}\t{list(info.shape)}\n".encode())
            with open(self.where[name].path, "rb") as f:
                for off, n in sample_windows(info.nbytes):
                    f.seek(info.start + off)
                    h.update(f.read(n))
        return "sha256:" + h.hexdigest()

    def config(self) -> dict:
        cfg = self.path / "config.json" if self.path.is_dir() else None
        if cfg and cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
                return data if isinstance(data, dict) else {}
            except ValueError:
                raise InvalidCheckpoint(f"{cfg}: not valid JSON") from None
        return {}


def sample_windows(nbytes: int) -> list[tuple[int, int]]:
    """(offset, length) windows sampled for a tensor of ``nbytes`` bytes."""
    w = FINGERPRINT_WINDOW
    if nbytes <= 3 * w:
        return [(0, nbytes)]
    mid = (nbytes // 2) - (nbytes // 2) % 8
    return [(0, w), (mid, w), (nbytes - w, w)]


def fingerprint_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """The fingerprint of in-memory tensors; equals :meth:`Checkpoint.fingerprint`."""

    h = hashlib.sha256(FINGERPRINT_VERSION)
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\t{dtype_name(t.dtype)}\t{list(t.shape)}\n".encode())
        data = tensor_to_bytes(t)
        for off, n in sample_windows(len(data)):
            h.update(data[off : off + n])
    return "sha256:" + h.hexdigest()


def _refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise PickleRefused(
            f"{path} is a pickle file; model folders are read only as safetensors (loading a pickle can "
            "run code): convert it to safetensors first"
        )
