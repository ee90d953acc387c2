"""Canonical JSON: the one serialization of manifests and records.

UTF-8, keys sorted at every level, no insignificant whitespace, no NaN or
Infinity, floats in Python's shortest round-trip form. The same value always
gives the same bytes, in any process and whatever the dict order.
"""

from __future__ import annotations

import json
from typing import Any


def dumps(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
