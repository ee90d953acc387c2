"""`assert_registry_clean`: the check every failure test ends with.

A registry is clean when `fsck` finds nothing — every object's hash, every
manifest's blobs, every ref log and record log line (their chains), every ref
pointing at a complete patch, the index against the files and SQLite's own
check of it — *and* nothing is left in `tmp/`: a killed or refused command
may leave nothing behind (a part file, a half-written blob, a marker). Its
result is asserted field by field, not only `ok`, so that a check fsck
stops making cannot pass silently.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def assert_registry_clean(reg: Any, *, allow_tmp: tuple[str, ...] = ()) -> dict[str, Any]:
    """Assert that the registry at ``reg`` (a path or an open Registry) is clean; fsck's result.

    ``allow_tmp``: name prefixes a test expects in ``tmp/`` (e.g. ``corrupt-`` copies that
    `fsck --repair` moved aside); anything else there fails the test.
    """
    from patchctl import Registry
    from patchctl.registry.store import manifest as manifest_mod

    path = Path(reg.path if hasattr(reg, "path") else reg)
    with Registry(path, create=False) as r:
        res = r.fsck()
        incomplete = []
        for ref in r.store.iter_refs():
            target = r.store.ref_target(ref)  # raises LogDamaged on a damaged log
            if target is None:
                continue
            m = manifest_mod.parse(r.store.read_manifest_bytes(target))  # verified on read
            if not all(r.store.has_blob(d) for d in m.blob_digests()):
                incomplete.append(str(ref))
    assert res["problems"] == [], res["problems"]
    assert res["corrupt_blobs"] == [] and res["corrupt_manifests"] == [], res
    assert res["damaged_logs"] == [], res["damaged_logs"]
    assert res["index_mismatches"] == [] and res["rebuilt"] is None, res["index_mismatches"]
    assert res["ok"] is True, res
    assert incomplete == [], f"refs pointing at incomplete patches: {incomplete}"
    left = sorted(n for n in os.listdir(path / "tmp") if not (allow_tmp and n.startswith(allow_tmp)))
    assert left == [], f"left in {path / 'tmp'}: {left}"
    return res
