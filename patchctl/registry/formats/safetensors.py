"""Reading and writing the safetensors file format, defensively and streaming.

Layout: 8 bytes little-endian header length N, N bytes of JSON, then the data
region; each tensor's ``data_offsets`` are ``[begin, end)`` within the data
region. We parse the header ourselves (not with ``safetensors``) so that every
check below happens before any allocation that the file could drive:

- N is capped (:data:`MAX_HEADER_BYTES`, the ``safetensors`` library's cap)
  and must fit inside the file;
- before the JSON is parsed, its structure is counted on the raw bytes: at
  most :data:`MAX_TENSORS` objects (``{``) and :data:`MAX_VALUES` commas, so a
  header of a million tiny entries (or of a shape with millions of dims) is
  refused in milliseconds instead of costing a gigabyte of Python objects
  (braces and commas inside strings count too: an over-estimate, never under);
- every dtype is known, every shape a list of non-negative ints;
- ``end - begin`` equals ``prod(shape) * itemsize``;
- extents lie inside the data region and do not overlap.

Tensors are read with positioned reads into fresh buffers (no mmap), so peak
memory is the tensor being read, not the file. Files we write are canonical:
keys sorted, compact JSON, header padded with spaces to 8 bytes, data in key
order, no ``__metadata__`` unless asked.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from patchctl.errors import InvalidCheckpoint

if TYPE_CHECKING:
    import torch

    from patchctl.patches.host import HostTensor

MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Entries (tensors) in one file: DeepSeek-V3, ~94,000 tensors, spreads them over 163 files.
MAX_TENSORS = 100_000
#: Commas in one header: a tensor entry has about 8 (dtype, shape dims, offsets).
MAX_VALUES = 4_000_000

# safetensors dtype code -> (our dtype name, itemsize)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
CODE_OF = {name: code for code, (name, _) in DTYPES.items()}
ITEMSIZE = {name: size for _, (name, size) in DTYPES.items()}
FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)  # type: ignore[no-any-return]


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in ITEMSIZE:
        raise InvalidCheckpoint(f"tensors of dtype {name} are not supported")
    return name


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # our dtype name, e.g. "float32"
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """One safetensors file, header parsed and checked; tensors read on demand."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise InvalidCheckpoint(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES:
                    raise InvalidCheckpoint(
                        f"{self.path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap"
                    )
                if 8 + n > size:
                    raise InvalidCheckpoint(
                        f"{self.path}: header length {n} runs past the end of the file ({size} bytes)"
                    )
                raw = f.read(n)
        except OSError as e:
            raise InvalidCheckpoint(f"{self.path}: cannot read: {e.strerror}") from None
        self.metadata, self.tensors = parse_header(raw, data_start=8 + n, file_size=size, where=str(self.path))

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def read_bytes(self, info: TensorInfo) -> bytearray:
        buf = bytearray(info.nbytes)
        with open(self.path, "rb") as f:
            f.seek(info.start)
            got = f.readinto(buf)
        if got != info.nbytes:
            raise InvalidCheckpoint(f"{self.path}: tensor {info.name!r} is truncated")
        return buf

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return bytes_to_tensor(self.read_bytes(info), info.dtype, info.shape)

    def read_host(self, name: str, lead: int = 0) -> HostTensor:
        """Tensor ``name`` as a :class:`~patchctl.patches.host.HostTensor` (no torch), in a buffer of the
        pool (:data:`~patchctl.patches.host.POOL`; ``release()`` gives it back) that starts at an address
        congruent to ``lead`` modulo the page size (the file offset it will be written at, if any)."""
        from patchctl.patches.host import POOL, HostTensor

        info = self.tensors[name]
        buf = POOL.take(info.nbytes, lead)  # reused: no fresh pages to fault in, no zero-fill first
        with open(self.path, "rb", buffering=0) as f:
            f.seek(info.start)
            got, view = 0, memoryview(buf)
            while got < info.nbytes and (n := f.readinto(view[got:])):
                got += n
        if got != info.nbytes:
            POOL.give(buf)
            raise InvalidCheckpoint(f"{self.path}: tensor {info.name!r} is truncated")
        return HostTensor(buf, info.dtype, info.shape, pooled=True)


def parse_header(
    raw: bytes, *, data_start: int, file_size: int, where: str
) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    objects, values = raw.count(b"{"), raw.count(b",")
    if objects > MAX_TENSORS + 2 or values > MAX_VALUES:  # + the header and __metadata__ objects
        raise InvalidCheckpoint(
            f"{where}: header of {len(raw)} bytes holds up to {objects} entries and {values} values, over the "
            f"caps of {MAX_TENSORS} tensors and {MAX_VALUES} values a file; split it into shards"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: also an int of 4300+ digits
        raise InvalidCheckpoint(f"{where}: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise InvalidCheckpoint(f"{where}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidCheckpoint(f"{where}: __metadata__ must map strings to strings")
    data_size = file_size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise InvalidCheckpoint(f"{where}: entry {name!r} is not an object")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(code, str) or code not in DTYPES:
            raise InvalidCheckpoint(f"{where}: tensor {name!r} has unknown dtype {code!r}")
        # the size bound is torch's: it refuses a shape whose nonzero dims overflow int64, even with a 0 dim
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ) or math.prod(max(d, 1) for d in shape) * DTYPES[code][1] >= 2**63:
            raise InvalidCheckpoint(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise InvalidCheckpoint(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        dname, itemsize = DTYPES[code]
        if not 0 <= begin <= end <= data_size:
            raise InvalidCheckpoint(
                f"{where}: tensor {name!r} offsets [{begin}, {end}) run past the data region ({data_size} bytes)"
            )
        if end - begin != math.prod(shape) * itemsize:
            raise InvalidCheckpoint(
                f"{where}: tensor {name!r} spans {end - begin} bytes but shape {shape} of {code} needs "
                f"{math.prod(shape) * itemsize}"
            )
        infos[name] = TensorInfo(name, dname, tuple(shape), data_start + begin, data_start + end)
    spans = sorted((i.start, i.end, i.name) for i in infos.values() if i.end > i.start)
    for (_, e1, n1), (s2, _, n2) in zip(spans, spans[1:], strict=False):
        if s2 < e1:
            raise InvalidCheckpoint(f"{where}: tensors {n1!r} and {n2!r} overlap")
    return meta, infos


def bytes_to_tensor(buf: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    td = torch_dtype(dtype)
    if len(buf) == 0:
        return torch.empty(shape, dtype=td)
    if not isinstance(buf, bytearray):
        buf = bytearray(buf)
    return torch.frombuffer(buf, dtype=td).reshape(shape)


def tensor_to_bytes(t: torch.Tensor | HostTensor) -> memoryview:
    """The little-endian C-order bytes of a CPU tensor (what safetensors stores), without a copy."""
    from patchctl.patches.host import HostTensor

    if isinstance(t, HostTensor):
        return memoryview(t.buf)
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def data_order(entries: Iterable[tuple[str, str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """Data-region order: larger itemsize first (keeps every tensor aligned), then name."""
    return sorted(entries, key=lambda e: (-ITEMSIZE[e[1]], e[0]))


def header_bytes(entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Canonical header for ``(name, dtype, shape)`` entries, data in :func:`data_order`."""
    header: dict[str, Any] = {}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in data_order(entries):
        n = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": CODE_OF[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[name] = (pos, pos + n)
        pos += n
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class StreamingWriter:
    """Writes a safetensors file whose header is known up front, tensor by tensor.

    Tensors must be written in :attr:`order` (the data region's order, see
    :func:`data_order`); each is checked against its declared dtype and shape.
    """

    def __init__(self, f: IO[bytes], entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None):
        self.f = f
        ents = data_order(entries)
        self.order = [e[0] for e in ents]
        self._order = self.order
        self._spec = {e[0]: (e[1], tuple(e[2])) for e in ents}
        head, spans = header_bytes(ents, metadata)
        #: where each tensor's bytes start in the file (for buffers aligned to it: direct I/O without a copy)
        self.offsets = {name: len(head) + start for name, (start, _) in spans.items()}
        f.write(head)
        self._next = 0

    def _spec_of(self, name: str) -> tuple[str, tuple[int, ...]]:
        """The declared dtype and shape of ``name``, which must be the next tensor in :attr:`order`."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else None
            raise ValueError(f"tensor {name!r} written out of order (expected {expected!r})")
        return self._spec[name]

    def write(self, name: str, t: torch.Tensor | HostTensor) -> None:
        dtype, shape = self._spec_of(name)
        if (t.dtype if isinstance(t.dtype, str) else dtype_name(t.dtype)) != dtype or tuple(t.shape) != shape:
            raise ValueError(f"tensor {name!r} is {t.dtype}{tuple(t.shape)}, declared {dtype}{shape}")
        self.f.write(tensor_to_bytes(t))
        self._next += 1

    def write_parts(self, name: str, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        """Tensor ``name``'s bytes given in consecutive parts (a tensor made chunk by chunk, never whole in
        memory); in :attr:`order` as :meth:`write`, and exactly its declared size."""
        dtype, shape = self._spec_of(name)
        want, got = math.prod(shape) * ITEMSIZE[dtype], 0
        for part in parts:
            got += len(memoryview(part).cast("B"))
            if got > want:
                raise ValueError(f"tensor {name!r}: more than its {want} bytes")
            self.f.write(part)
        if got != want:
            raise ValueError(f"tensor {name!r}: {got} of its {want} bytes")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"only {self._next} of {len(self._order)} tensors were written")


def write_file(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` canonically to ``path`` (atomically: temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            w = StreamingWriter(
                f, [(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()], metadata
            )
            for name in w.order:
                w.write(name, tensors[name])
            w.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
