"""Reliability: SIGKILL mid-command, concurrent writers, corrupted objects, server abuse, pickles.

Bounded versions of `bench/reliability.py` (which runs the long ones and
prints the figures); the scenarios themselves live there and are imported
here. Every server is a real `patchctl serve` process on 127.0.0.1.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from patchctl import Registry
from patchctl.errors import DigestMismatch, NotFound, PickleRefused
from patchctl.registry.store.names import Ref

from ._integrity import assert_registry_clean

ROOT = Path(__file__).resolve().parent.parent


def _load_bench():
    name = "patchctl_bench_reliability"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "reliability.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


R = _load_bench()


def _assert_survived(r: dict, kills: int) -> None:
    """Objects and refs sound after every kill, every re-run clean with nothing left in tmp/; every kill
    classified (before any write / mid-write / after the ref moved)."""
    t = r["total"]
    detail = json.dumps(r["ops"], indent=1, default=str)
    assert t.get("killed", 0) >= kills, detail
    assert sum(t.get(c, 0) for c in R.KILL_CLASSES) == t["killed"], detail
    assert t.get("tmp/ empty after the re-run", 0) == t["killed"], detail
    assert t.get("tmp/ empty after the kill", 0) == t["killed"], detail  # pull-*.part files are kept to resume
    assert t.get("corrupt objects", 0) == 0, detail
    assert t.get("lost refs", 0) == 0, detail
    assert t.get("incomplete refs", 0) == 0, detail
    assert t.get("ref at a wrong digest", 0) == 0, detail
    assert t.get("fsck: other problems", 0) == 0, detail  # only ever the index lagging behind the files
    assert t.get("re-run completes, fsck clean", 0) == t["killed"], detail
    assert r["ok"], detail


# ---------------------------------------------------------------------------- crash


def test_sigkill_mid_pull_from_a_folder_and_a_server(tmp_path):
    r = R.crash(tmp_path, kills=4, ops=["pull-folder", "pull-http"], mib=4, seed=1, verbose=False, calibrate=False)
    _assert_survived(r, 4)
    assert r["server_alive"]


def test_sigkill_mid_gc(tmp_path):
    r = R.crash(tmp_path, kills=2, ops=["gc"], mib=2, seed=2, verbose=False, calibrate=False)
    _assert_survived(r, 2)


def test_sigkill_mid_merge_and_compress(tmp_path):
    """`merge --no-validate` and (when the command exists) `compress`; push is killed in tests/test_crash.py."""
    r = R.crash(tmp_path, kills=2, ops=["merge", "compress"], mib=2, seed=3, verbose=False, calibrate=False)
    _assert_survived(r, 2)


def _garbage(reg: Registry, ref: str = "junk:v1") -> str:
    d = R.synth_patch(reg, ref, {"w": R.gaussian(7, 64).tobytes()})
    reg.rm(ref)
    return d


def test_rerun_of_gc_repairs_the_index_of_a_gc_killed_before_its_index_update(reg_path):
    with Registry(reg_path) as reg:
        R.synth_patch(reg, "keep:v1", {"w": R.gaussian(1, 64).tobytes()})
        d = _garbage(reg)
        reg.gc(prune_history=True)  # drops the ref log too, so the manifest is garbage
        d = _garbage(reg, "junk:v2")
        reg.store.remove("manifests", d)  # what a gc killed after its deletions and before the index leaves
        assert not reg.fsck()["ok"]
        reg.gc(prune_history=True)
        assert reg.fsck()["ok"]
    assert_registry_clean(reg_path)


def test_rerun_of_a_ref_move_repairs_the_index_of_a_command_killed_after_its_append(reg_path, tmp_path):
    with Registry(reg_path) as reg:
        d = R.synth_patch(reg, None, {"w": R.gaussian(2, 64).tobytes()})
        reg.store.move_ref(Ref("a", "v1"), d, "killed before the index")  # the file moved, the index did not
        assert not reg.fsck()["ok"]
        reg.tag(d, "a:v1")  # the re-run: nothing to move, but the index catches up
        assert reg.fsck()["ok"] and reg.ls()[0]["digest"] == d
    origin = tmp_path / "origin"
    with Registry(origin) as o:
        R.synth_patch(o, "b:v1", {"w": R.gaussian(3, 64).tobytes()})
    with Registry(reg_path) as reg:
        reg.pull("b:v1", str(origin))
        reg.index.conn.execute("DELETE FROM refs WHERE name = 'b'")  # a pull killed after its ref append
        assert not reg.fsck()["ok"]
        s = reg.pull("b:v1", str(origin))  # the re-run
        assert s["moved"] is False and reg.fsck()["ok"]


def test_fsck_is_clean_right_after_a_kill_between_a_file_and_its_index_update(reg_path):
    """A writer killed between its file write and its index update leaves an index-pending marker;
    the next open sees its owner is gone and rebuilds the index, so fsck is clean at once."""
    with Registry(reg_path) as reg:
        R.synth_patch(reg, "a:v1", {"w": R.gaussian(4, 64).tobytes()})
    code = (
        "import os, signal, sys\n"
        "from patchctl import Registry\n"
        "from patchctl.registry.store.manifest import Manifest\n"
        f"reg = Registry({str(reg_path)!r})\n"
        "m = reg.manifest('a:v1')\n"
        "m2 = Manifest(m.kind, m.base, m.tensors, metadata={'v': 2})\n"
        "with reg.index_pending():\n"
        "    reg.store.put_manifest(m2.to_bytes(), m2.blob_digests())\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # killed: file written, index not\n"
    )
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr
    assert list((reg_path / "tmp").glob("index-pending-*")), "the killed writer left its marker"
    with Registry(reg_path) as reg:
        assert reg.fsck()["ok"]
        assert not list((reg_path / "tmp").glob("index-pending-*"))
    assert_registry_clean(reg_path)


def test_a_ref_move_waits_for_gc_and_never_points_at_what_gc_deleted(reg_path):
    """The check-then-append of a ref move holds the registry lock shared, so gc cannot run in between."""
    with Registry(reg_path) as reg, Registry(reg_path) as other:
        d = R.synth_patch(reg, None, {"w": R.gaussian(5, 64).tobytes()})  # stored, not referenced yet
        got: dict = {}

        def tag() -> None:
            try:
                got["digest"] = other.tag(d, "late:v1")
            except NotFound as e:
                got["error"] = e

        with reg.store.exclusive():  # gc: scanned, found d unreferenced, about to delete it
            th = threading.Thread(target=tag)
            th.start()
            time.sleep(0.5)
            assert th.is_alive(), "the ref move must wait for gc"
            reg.store.remove("manifests", d)
            reg.index.remove_manifests([d])
        th.join(30)
        assert isinstance(got.get("error"), NotFound)  # refused cleanly, nothing points at a deleted manifest
        assert reg.store.ref_target(Ref("late", "v1")) is None
        assert reg.fsck()["ok"]
    assert_registry_clean(reg_path)


def test_merge_holds_the_writer_lock_until_its_ref_moves(reg_path, monkeypatch):
    """gc started between a merge's commit and its ref move waits, and then keeps the merged patch."""
    from patchctl.registry.store import records

    with Registry(reg_path) as reg:
        for k in ("a", "b"):
            R.synth_patch(reg, f"m/{k}:v1", {f"t{i}.weight": R.gaussian(ord(k) * 10 + i, 256).tobytes()
                                             for i in range(2)})
        real = records.add_validation
        gc_done: dict = {}

        def add_validation_then_gc(store, digest, record):
            out = real(store, digest, record)
            with open(reg_path / "locks" / "registry.lock", "a+b") as f:  # as gc would
                with pytest.raises(BlockingIOError):
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

            def gc() -> None:
                with Registry(reg_path) as g:
                    gc_done["res"] = g.gc(prune_history=True)

            gc_done["thread"] = threading.Thread(target=gc)
            gc_done["thread"].start()
            time.sleep(0.3)
            return out

        monkeypatch.setattr(records, "add_validation", add_validation_then_gc)
        res = reg.merge(["m/a:v1", "m/b:v1"], "m/merged:v1", validate=False)
        gc_done["thread"].join(60)
        assert res.moved and reg.resolve("m/merged:v1") == res.digest
        assert R.incomplete_refs(reg) == [] and reg.fsck()["ok"]
    assert_registry_clean(reg_path)


# ---------------------------------------------------------------------------- concurrency


def test_concurrent_workers_lose_no_ref_or_blob(tmp_path):
    r = R.concurrency(tmp_path, workers=4, ops=10, seed=7, timeout=300, verbose=False)
    detail = json.dumps({k: v for k, v in r.items() if k != "worker_errors"}, default=str) + "".join(r["worker_errors"])
    assert r["completed"] == 40, detail
    assert not r["lost_refs"] and not r["removed_but_present"] and not r["incomplete_refs"], detail
    assert r["fsck_ok"], detail
    assert r["ok"], detail


# ---------------------------------------------------------------------------- corruption


def test_flipped_bits_are_reported_exactly_and_refused_on_read_and_pull(tmp_path):
    r = R.corruption(tmp_path, n_blobs=12, n_manifests=4, seed=5, http=True)
    assert (r["detected_blobs"], r["detected_manifests"], r["false_positives"]) == (12, 4, 0), r
    assert r["reads_raising_digest_mismatch"] == 16, r
    assert r["refused_damaged"] == 2 * r["damaged_patches"] and r["pulled_sound"] == 2 * r["sound_patches"], r
    assert r["pull_mistakes"] == 0, r
    rp = r["repair"]  # `patchctl fsck --repair URL` from a `patchctl serve` of a clean copy
    assert (rp["repaired"], rp["unrepaired"], rp["moved_aside"], rp["exit"]) == (16, 0, 16, 0), rp
    assert rp["fsck_clean_after"] and r["ok"], r


def test_fsck_names_each_corrupt_object_and_reads_raise_digest_mismatch(reg_path):
    with Registry(reg_path) as reg:
        d = R.synth_patch(reg, "a:v1", {"w": R.gaussian(9, 256).tobytes(), "v": R.gaussian(10, 64).tobytes()})
        m = reg.manifest(d)
        blob = m.tensors["w"].digest
        p = reg.store.blob_path(blob)
        data = bytearray(p.read_bytes())
        data[100] ^= 0x10
        p.write_bytes(bytes(data))
        res = reg.fsck()
        assert res["corrupt_blobs"] == [blob] and res["corrupt_manifests"] == [] and not res["ok"]
        with pytest.raises(DigestMismatch):
            reg.store.read_blob(blob)
        mp = reg.store.manifest_path(d)
        mp.write_bytes(mp.read_bytes().replace(b'"diff"', b'"lora"'))
        res = reg.fsck()
        assert res["corrupt_manifests"] == [d]
        assert any("ref a:v1" in p and "corrupt" in p for p in res["problems"])
        with pytest.raises(DigestMismatch):
            reg.manifest("a:v1")


def test_a_damaged_index_is_set_aside_and_rebuilt(reg_path):
    with Registry(reg_path) as reg:
        d = R.synth_patch(reg, "a:v1", {"w": R.gaussian(11, 64).tobytes()})
    for p in reg_path.glob("index.sqlite-*"):
        p.unlink()
    (reg_path / "index.sqlite").write_bytes(os.urandom(8192))  # "file is not a database"
    with Registry(reg_path) as reg:
        assert [(r["name"], r["digest"]) for r in reg.ls()] == [("a", d)]
        assert reg.fsck()["ok"]
    assert any(p.name.startswith("index.sqlite.damaged-") for p in (reg_path / "tmp").iterdir())
    assert_registry_clean(reg_path, allow_tmp=("index.sqlite",))  # the damaged copy is kept, nothing else


def test_concurrent_writers_of_the_same_ref_lose_no_update(tmp_path):
    """4 processes push 4 different patches each to the same name:tag at once: both logs (the tag's and
    `latest`'s) hold all 16 moves in one chain, seq 1..16, each entry's old the previous new; `latest` ends
    where the tag ends; the index (what `ls` answers) agrees with each log's last entry before any fsck;
    fsck clean, tmp/ empty."""
    r = R.same_ref(tmp_path, workers=4, pushes=4, seed=3)
    detail = json.dumps(r, indent=1, default=str)
    assert r["succeeded"] == 16 and not r["failed"] and not r["worker_errors"], detail
    assert r["latest_equals_tag"], detail
    for row in r["refs"].values():
        assert row["lost_updates"] == [] and row["entries"] == 16, detail
        assert row["chain_intact"] and row["seq_1_to_n"] and row["old_is_previous_new"], detail
        assert row["index_agrees"], detail
    assert r["ok"], detail
    assert_registry_clean(tmp_path / "reg")


def test_a_writer_recording_its_move_in_the_index_last_does_not_roll_the_index_back(tmp_path):
    """The writer stalled between its log append and its index update (the test hook) while 2 others push
    3 patches each to the same ref: its late index write was the index's last word, so `ls` answered its
    older digest while the log said another (lost in the index until `fsck` rebuilt it); now the index
    follows the highest seq. And its `latest` move, made after the others', left `latest` at its patch and
    the tag at another's; now a tag and its `latest` move under one hold of the log lock."""
    r = R.same_ref(tmp_path / "stall", workers=3, pushes=3, seed=4, stall=True)
    detail = json.dumps(r, indent=1, default=str)
    assert r["stalled"] is True and r["succeeded"] == 7, detail
    assert r["latest_equals_tag"], detail
    for row in r["refs"].values():
        assert row["lost_updates"] == [] and row["entries"] == 7 and row["chain_intact"], detail
        assert row["index_agrees"], detail
    assert r["ok"], detail
    assert_registry_clean(tmp_path / "stall" / "reg")


# ---------------------------------------------------------------------------- bit flips in every file class


def test_a_flipped_bit_in_any_file_class_is_detected_and_named(tmp_path):
    """One bit flipped in objects, manifests, ref logs, record logs and the SQLite index (12 random flips
    each, in a fresh copy of a registry every time), plus 4 flips of a log's final newline (was a silent
    rollback: the whole last line read as a torn write and dropped) and 4 of the index's stored digests
    and names: each detected by fsck naming the file (or the index), or provably without effect; none
    undetected, none a traceback."""
    r = R.flips(tmp_path, per_class=12, seed=4, targeted=4)
    detail = json.dumps(r, indent=1, default=str)
    rows = r["classes"]
    assert set(rows) == {*R.FLIP_CLASSES, "refs (last-newline)", "records (last-newline)", "index (row)"}, detail
    for row in rows.values():
        assert row["undetected"] == 0 and row["crash"] == 0, detail
        assert row["detected"] + row["no effect"] == row["flips"], detail
    for cls in ("objects", "manifests"):  # named by their hash: every flip, and every read refuses it
        assert rows[cls]["detected"] == rows[cls]["read refused"] == 12, detail
    for cls in ("refs", "records", "refs (last-newline)", "records (last-newline)"):
        assert rows[cls]["read refused"] == rows[cls]["detected"], detail  # the read names the damaged line
    for cls in ("refs (last-newline)", "records (last-newline)", "index (row)"):
        assert rows[cls]["detected"] == 4, detail
    assert rows["index"]["clean after fsck rebuilt it"] == 12 and rows["index (row)"]["clean after fsck rebuilt it"] == 4
    assert r["ok"], detail


def _page_of(reg_path: Path, table: str) -> tuple[int, int]:
    """(offset, size) of the root page of ``table`` in index.sqlite."""
    import sqlite3

    con = sqlite3.connect(reg_path / "index.sqlite")
    try:
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", [table]).fetchone()[0]
        size = con.execute("PRAGMA page_size").fetchone()[0]
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    return (root - 1) * size, size


@pytest.mark.parametrize("damage", ["page header", "high bit of a stored digest"])
def test_a_damaged_index_page_is_one_line_for_ls_and_fsck_rebuilds_it(reg_path, cli, damage):
    """Was a traceback (`sqlite3.DatabaseError: database disk image is malformed`, or `OperationalError:
    Could not decode to UTF-8`) from `ls`, and from `fsck` itself."""
    with Registry(reg_path) as reg:
        d = R.synth_patch(reg, "a:v1", {"w": R.gaussian(12, 64).tobytes()})
    off, size = _page_of(reg_path, "refs")
    p = reg_path / "index.sqlite"
    data = bytearray(p.read_bytes())
    if damage == "page header":
        data[off] = 0xFF  # not a b-tree page type
    else:
        i = data.index(d[7:].encode(), off, off + size)
        data[i + 5] ^= 0x80
    p.write_bytes(bytes(data))
    r = cli("ls")
    assert r.code != 0 and r.err.count("\n") == 1 and "index.sqlite" in r.err and "fsck" in r.err, r.err
    r = cli("fsck")
    assert r.code != 0 and "Traceback" not in r.err, r.out + r.err
    assert "index.sqlite is damaged" in r.out, r.out
    assert cli("ls").code == 0
    with Registry(reg_path) as reg:
        assert [(x["name"], x["digest"]) for x in reg.ls()] == [("a", d)]
    assert_registry_clean(reg_path, allow_tmp=("index.sqlite.damaged-", "index.sqlite-wal.damaged-",
                                               "index.sqlite-shm.damaged-"))
    assert any(q.name.startswith("index.sqlite.damaged-") for q in (reg_path / "tmp").iterdir())


# ---------------------------------------------------------------------------- server abuse


@pytest.fixture(scope="module")
def abused(tmp_path_factory):
    root = tmp_path_factory.mktemp("abused") / "reg"
    data = os.urandom(4096 * 4)
    with Registry(root) as reg:
        digest = R.synth_patch(reg, "team/math:v1", {"layer.0.weight": data})
        manifest = reg.store.read_manifest_bytes(digest)
    with R.serving(root) as (url, proc):
        yield {"url": url, "proc": proc, "blob": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data),
               "manifest": manifest, "secret": (root / "config.json").read_bytes()}


def _normal(abused) -> float:
    import http.client

    host, port = abused["url"].removeprefix("http://").split(":")
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request("GET", "/v2/team/math/manifests/v1")
        r = c.getresponse()
        assert r.status == 200 and r.read() == abused["manifest"]
    finally:
        c.close()
    return time.perf_counter() - t0


def test_abusive_requests_are_refused_and_the_server_keeps_serving(abused):
    """Traversal variants tests/test_server.py does not send, malformed digests, Ranges, oversized and malformed
    requests: each refused with a 4xx (or a closed connection where uvicorn refuses before routing), or, where
    marked, served harmlessly; never the registry's files; a normal request answered after each."""
    cases = [c for c in R.abuse_cases(abused["blob"], abused["size"])
             if not (c.category == "traversal" and c.name in R.TRAVERSAL_IN_TEST_SERVER)]
    assert len(cases) > 80
    bad = []
    for c in cases:
        status, resp = R.raw_exchange(abused["url"], c.payload)
        ok = status in c.accept or (status is None and c.accept_close)
        if status is not None and 200 <= status < 300 and not c.note:
            ok = False  # only requests documented as tolerated may succeed
        if c.max_body is not None and len(resp) > c.max_body:
            ok = False  # a Range must never amplify the response
        if abused["secret"] in resp or b"patchctl-registry" in resp:
            ok = False
        if not ok:
            bad.append(f"{c.category} / {c.name[:60]}: {status}, {len(resp)} bytes")
        _normal(abused)
    assert not bad, bad
    assert abused["proc"].poll() is None


def test_uvicorn_refuses_an_oversized_header_block_with_400_and_a_close(abused):
    """Documented behaviour (uvicorn 0.x on h11): a header block still incomplete past h11's 16 KiB limit, or
    too large to parse in one read (>= 128 KiB here), gets `400 Invalid HTTP request received.` and a close."""
    status, resp = R.raw_exchange(abused["url"], R.get("/v2/", {"X-Big": "a" * (1 << 20)}))
    assert status == 400 and b"Invalid HTTP request" in resp
    _normal(abused)


def test_fifty_slow_clients_do_not_stop_normal_requests(abused):
    r = R.slow_clients(abused["url"], n=50, seconds=3.0, probe=lambda: _normal(abused))
    assert r["probe_errors"] == 0 and r["probe_requests"] >= 10, r
    assert r["probe_max_ms"] < 2000, r
    assert r["slow_answered_200"] == 50, r  # each slow client is answered once its headers are complete
    assert abused["proc"].poll() is None


# ---------------------------------------------------------------------------- pickles


@pytest.fixture
def pickle_inputs(tmp_path):
    base = R.write_model(tmp_path / "base", {"layers.0.q.weight": R.gaussian(0, 64).reshape(8, 8)})
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                         "target_modules": ["q"], "base_model_name_or_path": str(base)}))
    torch.save({"base_model.model.layers.0.q.lora_A.weight": torch.randn(2, 8),
                "base_model.model.layers.0.q.lora_B.weight": torch.randn(8, 2)}, ad / "adapter_model.bin")
    pt = tmp_path / "delta.pt"
    torch.save({"layers.0.q.weight": torch.randn(8, 8)}, pt)
    ft = tmp_path / "ft"
    ft.mkdir()
    torch.save({"layers.0.q.weight": torch.randn(8, 8)}, ft / "pytorch_model.bin")
    return {"base": base, "adapter": ad, "pt": pt, "ft": ft}


def _spy_torch_load(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def test_pickles_are_refused_without_trust_pickle_whatever_their_shape(reg_path, pickle_inputs, monkeypatch):
    """A PEFT folder holding adapter_model.bin and a .pt diff (tests/test_bad_input.py covers a .bin diff)."""
    calls = _spy_torch_load(monkeypatch)
    with Registry(reg_path) as reg:
        with pytest.raises(PickleRefused, match="--trust-pickle"):
            reg.push(pickle_inputs["adapter"], "ad:v1")
        with pytest.raises(PickleRefused):
            reg.push(pickle_inputs["pt"], "pt:v1", base=pickle_inputs["base"])
        with pytest.raises(PickleRefused):  # a fine-tune folder of pickles: refused, with or without trust
            reg.push(pickle_inputs["ft"], "ft:v1", base=pickle_inputs["base"], trust_pickle=True)
        assert reg.ls() == [] and not any(reg.store.iter_digests("objects"))
    assert calls == []  # torch.load never ran
    assert_registry_clean(reg_path)


def test_trust_pickle_loads_with_weights_only(reg_path, pickle_inputs, monkeypatch):
    calls = _spy_torch_load(monkeypatch)
    with Registry(reg_path) as reg:
        reg.push(pickle_inputs["adapter"], "ad:v1", trust_pickle=True)
        reg.push(pickle_inputs["pt"], "pt:v1", base=pickle_inputs["base"], trust_pickle=True)
        assert {r["name"] for r in reg.ls()} == {"ad", "pt"}
    assert len(calls) == 2 and all(c.get("weights_only") is True for c in calls)


def test_fsck_repair_fetches_good_copies_from_a_remote(tmp_path, models):
    """Corrupt a blob and a manifest; `fsck --repair ORIGIN` replaces them with verified copies."""
    from patchctl.cli.main import main

    origin, local = tmp_path / "origin", tmp_path / "local"
    with Registry(origin) as o:
        digest = o.push(models.finetune, "ft:v1", base=models.base)
    with Registry(local) as reg:
        reg.pull("ft:v1", str(origin))
        blob = sorted(reg.manifest("ft:v1").blob_digests())[0]
        for path in (reg.store.blob_path(blob), reg.store.manifest_path(digest)):
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
        bad = reg.fsck()
        assert bad["corrupt_blobs"] == [blob] and bad["corrupt_manifests"] == [digest]
    assert main(["fsck", "--repair", str(origin), "--registry", str(local)]) == 0
    with Registry(local) as reg:
        res = reg.fsck()
        assert res["ok"], res["problems"]
        assert reg.store.read_blob(blob) and reg.manifest("ft:v1").to_bytes()
    # a remote that lacks the object: reported, and the corrupt copy is left where fsck finds it
    with Registry(local) as reg:
        path = reg.store.blob_path(blob)
        data = bytearray(path.read_bytes())
        data[0] ^= 0x01
        path.write_bytes(bytes(data))
        empty = tmp_path / "empty"
        Registry(empty).close()
        res = reg.fsck(repair=str(empty))
        assert res["unrepaired"] == [blob] and res["corrupt_blobs"] == [blob] and not res["ok"]


def _flip(path: Path, at: int = -1) -> bytes:
    """Flip one bit of a file in place (the middle byte unless told); its new bytes."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at < 0 else at] ^= 0x04
    path.write_bytes(bytes(data))
    return bytes(data)


def test_fsck_repair_from_a_live_server(tmp_path, reg_path, cli):
    """`patchctl fsck --repair http://127.0.0.1:PORT` against a real `patchctl serve`: corrupt and missing
    objects replaced by verified copies, bad copies moved aside (not deleted), an object the server lacks
    reported with a non-zero exit, and a server that sends wrong bytes for a digest refused."""
    import shutil

    origin = tmp_path / "origin"
    with Registry(origin) as o:
        for ref, seed in (("a:v1", 1), ("b:v1", 2)):
            R.synth_patch(o, ref, {"w": R.gaussian(seed, 4096).tobytes(), "v": R.gaussian(seed + 10, 512).tobytes()})
    with R.serving(origin) as (url, proc):
        assert cli("pull", "a:v1", "--from", url).code == 0 and cli("pull", "b:v1", "--from", url).code == 0
        with Registry(reg_path) as reg:
            R.synth_patch(reg, "local:v1", {"y": R.gaussian(3, 256).tobytes()})  # never published
            a, b, local = (reg.manifest(r) for r in ("a:v1", "b:v1", "local:v1"))
            a_digest, b_digest = reg.resolve("a:v1"), reg.resolve("b:v1")
            good = {d: reg.store.read_blob(d) for d in {*a.blob_digests(), *b.blob_digests()}}
            good[a_digest] = reg.store.read_manifest_bytes(a_digest)
            wa, wb, y = a.tensors["w"].digest, b.tensors["w"].digest, local.tensors["y"].digest
            bad = {wa: _flip(reg.store.blob_path(wa)), y: _flip(reg.store.blob_path(y)),
                   a_digest: _flip(reg.store.manifest_path(a_digest))}
            reg.store.blob_path(wb).unlink()  # a missing blob
            before = reg.fsck()
            assert (sorted(before["corrupt_blobs"]), before["corrupt_manifests"]) == (sorted([wa, y]), [a_digest])
            assert any(f"blob {wb} is missing" in p for p in before["problems"])

        r = cli("fsck", "--repair", url, "--json")
        assert r.code == 1, r.out + r.err  # the local-only blob cannot be repaired
        res = json.loads(r.out)
        assert sorted(res["repaired"]) == sorted([wa, wb, a_digest]) and res["unrepaired"] == [y], res
        assert (res["corrupt_blobs"], res["corrupt_manifests"]) == ([y], []), res
        with Registry(reg_path) as reg:
            for d in (wa, wb):  # verified on read, and the bytes the server holds
                assert reg.store.read_blob(d) == good[d]
            assert reg.store.read_manifest_bytes(a_digest) == good[a_digest]
            assert reg.manifest("a:v1").to_bytes() == good[a_digest]
            assert reg.store.blob_path(y).read_bytes() == bad[y]  # left where fsck finds it
        aside = {p.name: p.read_bytes() for p in (reg_path / "tmp").iterdir() if p.name.startswith("corrupt-")}
        assert sorted(aside.values()) == sorted([bad[wa], bad[a_digest]]), sorted(aside)  # moved aside, not deleted
        assert all(y[7:] not in name for name in aside)

    # a server that sends wrong bytes for a digest (its own copy of w is damaged; the manifest it refuses)
    liar = tmp_path / "liar"
    shutil.copytree(origin, liar)
    with Registry(liar) as lr:
        _flip(lr.store.blob_path(wa), at=0)
        _flip(lr.store.manifest_path(b_digest))
    with Registry(reg_path) as reg:
        bad2 = {wa: _flip(reg.store.blob_path(wa), at=100), b_digest: _flip(reg.store.manifest_path(b_digest))}
    with R.serving(liar) as (url, proc):
        r = cli("fsck", "--repair", url)
        assert proc.poll() is None
    assert r.code == 1 and "repaired 0 objects" in r.out and "3 could not be repaired" in r.out, r.out + r.err
    with Registry(reg_path) as reg:
        assert reg.store.blob_path(wa).read_bytes() == bad2[wa]  # nothing renamed into place: our copy is back
        assert reg.store.manifest_path(b_digest).read_bytes() == bad2[b_digest]
        res = reg.fsck()
        assert (sorted(res["corrupt_blobs"]), res["corrupt_manifests"]) == (sorted([wa, y]), [b_digest]), res
    tmp = {p.name: p.read_bytes() for p in (reg_path / "tmp").iterdir()}
    assert sorted(v for k, v in tmp.items() if k.startswith("corrupt-")) == sorted(aside.values()), sorted(tmp)
    parts = {k: v for k, v in tmp.items() if k.startswith("pull-")}  # no part file of the wrong bytes
    assert wa[7:] not in "".join(parts) and not any(parts.values()), sorted(parts)
