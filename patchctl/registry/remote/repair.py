"""``fsck --repair``'s fetch: good copies of corrupt or missing objects from a remote.

The facade passes :func:`repair` to :func:`patchctl.registry.store.maintenance.fsck`
(the store does not import the remote layer). Each object travels the same
verified path as a pull (:func:`~patchctl.registry.remote.transfer.download`).
"""

from __future__ import annotations

import os
import time

from patchctl.errors import NotFound, PatchctlError
from patchctl.registry.remote.config import resolve_remote
from patchctl.registry.remote.sources import FolderSource, open_source
from patchctl.registry.remote.transfer import Counter, commit_blob, download
from patchctl.registry.store.folder import BlobWriter
from patchctl.registry.store.names import Ref
from patchctl.registry.store.repository import Progress, Repository


def repair(reg: Repository, remote_spec: str, blobs: list[str], manifests: list[str],
           sizes: dict[str, int], progress: Progress = None) -> dict[str, list[str]]:
    """Replace corrupt objects with verified copies from a registry-folder or HTTP remote.

    Each corrupt file is first moved aside into ``tmp/`` (never deleted); the good
    copy is hashed while it is fetched and renamed into place only when it matches
    its digest. An object the remote lacks (or sends wrong) is put back as it was
    and reported in ``failed``.
    """
    store = reg.store
    src = open_source(resolve_remote(store, remote_spec))
    counter = Counter(sum(sizes.get(d, 0) for d in blobs), progress)
    repaired: list[str] = []
    failed: list[str] = []
    try:
        for kind, digest in [("objects", d) for d in blobs] + [("manifests", d) for d in manifests]:
            path = store.blob_path(digest) if kind == "objects" else store.manifest_path(digest)
            # a name of its own: an earlier bad copy of the same object is never overwritten
            aside = store.root / "tmp" / f"corrupt-{kind}-{digest[7:]}-{os.getpid()}-{time.time_ns()}"
            present = path.exists()  # a missing object has nothing to move aside
            if present:
                os.replace(path, aside)
            try:
                if kind == "objects":
                    if digest not in sizes:
                        raise NotFound(f"no manifest gives the size of blob {digest}")
                    part = download(src, store, "repair", digest, sizes[digest], counter)
                    if part is not None:
                        commit_blob(store, part, digest)
                else:
                    data = (src.store.read_manifest_bytes(digest) if isinstance(src, FolderSource)
                            else src.manifest(Ref("repair", digest)))
                    with BlobWriter(store, "manifests") as w:
                        w.write(data)
                        w.commit(expected=digest)
                repaired.append(digest)
            except BaseException as e:  # put our copy back, whatever stopped the fetch
                if present and not path.exists():
                    os.replace(aside, path)
                if not isinstance(e, PatchctlError):
                    raise
                failed.append(digest)
    finally:
        src.close()
    return {"repaired": repaired, "failed": failed}


__all__ = ["repair"]
