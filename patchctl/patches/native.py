"""Loads the optional C kernels (``patchctl/_kernels.c``) through ctypes.

``lib`` is the loaded library, or ``None`` when the extension was not built
(no C compiler at install time) or ``PATCHCTL_NATIVE=0`` is set; callers then
use their numpy path, which gives the same results. ctypes releases the GIL
around each call, so threads run the kernels in parallel.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

__all__ = ["lib", "available", "ptr"]

_ABI = 7

_i64 = ctypes.c_int64
_vp = ctypes.c_void_p


def _load() -> ctypes.CDLL | None:
    if os.environ.get("PATCHCTL_NATIVE", "1").strip().lower() in ("0", "no", "false", "off"):
        return None
    try:
        spec = importlib.util.find_spec("patchctl._kernels")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    try:
        so = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    so.pc_abi_version.restype = ctypes.c_int
    if so.pc_abi_version() != _ABI:
        return None
    so.pc_hist16.argtypes = [_vp, _i64, _vp]
    so.pc_hist16.restype = ctypes.c_int
    so.pc_count16.argtypes = [_vp, _i64, ctypes.c_uint16]
    so.pc_count16.restype = _i64
    so.pc_select16.argtypes = [_vp, _i64, ctypes.c_uint16, _i64, _vp, _vp, _i64]
    so.pc_select16.restype = _i64
    so.pc_gap_sums.argtypes = [_vp, _i64, _i64, _i64, ctypes.c_int, ctypes.c_int, _i64, _vp, _vp, ctypes.c_int]
    so.pc_gap_sums.restype = ctypes.c_int
    so.pc_rice_encode.argtypes = [_vp, _i64, _i64, ctypes.c_int, _vp, _i64, _vp, _i64, _vp]
    so.pc_rice_encode.restype = None
    so.pc_rice_decode.argtypes = [_vp, _i64, _i64, _vp, _i64, ctypes.c_int, _i64, _i64, _vp]
    so.pc_rice_decode.restype = None
    so.pc_add_cast.argtypes = [_vp, ctypes.c_int, _vp, ctypes.c_int, _vp, _i64]
    so.pc_add_cast.restype = ctypes.c_int
    so.pc_diff_pins.argtypes = [_vp, _vp, ctypes.c_int, _vp, ctypes.c_int, _i64, _i64, _vp, _vp]
    so.pc_diff_pins.restype = _i64
    so.pc_nonfinite.argtypes = [_vp, ctypes.c_int, _i64]
    so.pc_nonfinite.restype = ctypes.c_int
    so.pc_same.argtypes = [_vp, _vp, _i64]
    so.pc_same.restype = ctypes.c_int
    so.pc_weighted_sum.argtypes = [_vp, _vp, _vp, _vp, _vp, ctypes.c_float, ctypes.c_int, ctypes.c_float, ctypes.c_int,
                                   ctypes.c_float, ctypes.c_int, _vp, ctypes.c_int, _i64, _i64]
    so.pc_weighted_sum.restype = ctypes.c_int
    so.pc_ties.argtypes = [_vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, ctypes.c_float, ctypes.c_int, ctypes.c_float,
                           ctypes.c_float, ctypes.c_int, ctypes.c_float, ctypes.c_int, _vp, ctypes.c_int, _i64, _i64]
    so.pc_ties.restype = ctypes.c_int
    so.pc_dare_drops.argtypes = [ctypes.c_uint64, _i64, ctypes.c_float, _vp]
    so.pc_dare_drops.restype = None
    so.pc_l1_sums.argtypes = [_vp, _vp, ctypes.c_int, _vp, _i64, _i64, _vp]
    so.pc_l1_sums.restype = ctypes.c_int
    so.pc_sha256_pair.argtypes = [_vp, _i64, _vp, _i64, _vp]
    so.pc_sha256_pair.restype = ctypes.c_int
    so.pc_sha256_files.argtypes = [ctypes.c_int, _i64, ctypes.c_int, _i64, _vp, _i64]
    so.pc_sha256_files.restype = ctypes.c_int
    return so


lib = _load()


def available() -> bool:
    return lib is not None


def ptr(a) -> int:
    """The data address of a C-contiguous numpy array (0 for None)."""
    if a is None:
        return 0
    assert a.flags.c_contiguous
    return a.ctypes.data
