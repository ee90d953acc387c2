"""Integrity of the registry folder: self-checking ref and record logs, the index as a checked cache,
and a store that never follows symlinks (issue: integrity everywhere).

Each test plants damage in a real registry folder the way a flipped bit or a hostile local user would,
then drives the library (and the CLI for the one-line errors)."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from patchctl.errors import LogDamaged, RegistryError
from patchctl.registry.store import logfile, records
from patchctl.registry.store.names import parse_ref


def _flip(path, line_no: int, col: int = 40) -> None:
    """Flip one bit of line ``line_no`` (1-based) of a log file."""
    raw = bytearray(path.read_bytes())
    starts = [0] + [i + 1 for i, b in enumerate(raw) if b == ord("\n")]
    pos = starts[line_no - 1] + col
    raw[pos] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.fixture
def three_versions(registry, models):
    """x:latest moved three times (v1, v2 = another diff, v3 = a LoRA): its log has three lines."""
    d1 = registry.push(models.finetune, "x:v1", base=models.base)
    d2 = registry.push(models.finetune2, "x:v2", base=models.base)
    d3 = registry.push(models.lora, "x:v3", base=models.base)
    return registry, (d1, d2, d3)


@pytest.mark.parametrize("line", [2, 3])
def test_a_flipped_bit_in_a_ref_log_is_damage_not_a_rollback(three_versions, line, cli):
    reg, (d1, d2, d3) = three_versions
    log = reg.store.ref_path(parse_ref("x:latest"))
    assert len(log.read_bytes().splitlines()) == 3
    _flip(log, line)
    # before: the unparsable line was skipped and x:latest answered an older digest
    with pytest.raises(LogDamaged) as e:
        reg.resolve("x:latest")
    assert e.value.path == "refs/x/@latest" and e.value.line == line
    r = cli("show", "x:latest")
    assert r.code != 0 and r.err.count("\n") == 1 and "refs/x/@latest line" in r.err and "fsck" in r.err
    res = reg.fsck()
    assert not res["ok"] and res["damaged_logs"] == ["refs/x/@latest"]
    assert any(p.startswith(f"refs/x/@latest line {line}") for p in res["problems"])
    # gc refuses: the damaged line's target would be collected
    before = sorted(p.name for p in (reg.path / "manifests").rglob("*") if p.is_file())
    with pytest.raises(LogDamaged, match="gc refuses to run while a log is damaged"):
        reg.gc(prune_history=True)
    assert sorted(p.name for p in (reg.path / "manifests").rglob("*") if p.is_file()) == before


def test_fsck_repair_logs_restores_the_damaged_line_from_the_index(three_versions):
    reg, (d1, d2, d3) = three_versions
    log = reg.store.ref_path(parse_ref("x:latest"))
    want = reg.log("x:latest")
    _flip(log, 2)
    res = reg.fsck(repair_logs=True)
    assert res["logs_repaired"] == ["refs/x/@latest"] and res["ok"], res["problems"]
    assert reg.resolve("x:latest") == d3 and reg.log("x:latest") == want
    assert reg.gc()["manifests"] == 0  # nothing was lost


def test_a_damaged_log_the_index_cannot_vouch_for_is_reported_not_dropped(three_versions):
    reg, _ = three_versions
    log = reg.store.ref_path(parse_ref("x:latest"))
    _flip(log, 3)
    reg.index.rebuild([], [])  # the index's copy is gone too
    res = reg.fsck(repair_logs=True)
    assert res["logs_unrepaired"] == ["refs/x/@latest"] and not res["ok"]
    assert len(log.read_bytes().splitlines()) == 3  # the file is left as it is, never cut down
    assert reg.gc(force=True)["dry_run"] is False  # --force still collects, leaving the damaged log out


def test_removing_a_whole_line_breaks_the_chain(three_versions):
    reg, _ = three_versions
    log = reg.store.ref_path(parse_ref("x:latest"))
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(lines[0] + lines[2])  # the middle move dropped: v3 would still show, history lies
    with pytest.raises(LogDamaged) as e:
        reg.log("x:latest")
    assert e.value.line == 2


def test_a_flipped_bit_in_a_record_log_is_damage_and_gc_keeps_the_records(registry, models):
    d = registry.push(models.finetune, "r:v1", base=models.base)
    rec = records.add_validation(registry.store, d, {"type": "note", "verdict": "info"})
    path = records.subject_path(registry.store, d)
    _flip(path, 1, col=20)
    with pytest.raises(LogDamaged):
        registry.records("r:v1")
    assert not registry.fsck()["ok"]
    with pytest.raises(LogDamaged):
        registry.gc()
    assert registry.store.has_blob(rec)  # the validation record's blob is still there


def test_a_torn_last_line_is_ignored_and_cut_before_the_next_append(registry, models):
    registry.push(models.finetune, "t:v1", base=models.base)
    log = registry.store.ref_path(parse_ref("t:v1"))
    good = log.read_bytes()
    log.write_bytes(good + b'{"message": "torn in mid-app')  # a crash in mid-append
    assert registry.log("t:v1")["history"][-1]["seq"] == 1
    registry.rm("t:v1")
    raw = log.read_bytes()
    assert raw.startswith(good) and b"torn" not in raw and len(raw.splitlines()) == 2
    assert registry.fsck()["ok"]


def test_lines_from_before_checksums_are_read_and_covered_by_the_next_one(tmp_path):
    p = tmp_path / "log"
    legacy = json.dumps({"seq": 1, "new": "a"}, sort_keys=True).encode() + b"\n"
    p.write_bytes(legacy)
    assert logfile.read(p) == [{"new": "a", "seq": 1}]
    logfile.append(p, {"seq": 2, "new": "b"})
    assert logfile.read(p) == [{"new": "a", "seq": 1}, {"new": "b", "seq": 2}]
    _flip(p, 1, col=5)  # the old line altered: the chained line after it no longer matches
    with pytest.raises(LogDamaged) as e:
        logfile.read(p)
    assert e.value.line in (1, 2)
    q = tmp_path / "log2"
    logfile.append(q, {"seq": 1})
    q.write_bytes(q.read_bytes() + legacy)  # an older patchctl appended after checked lines: read as it is
    assert logfile.read(q) == [{"seq": 1}, {"new": "a", "seq": 1}]
    logfile.append(q, {"seq": 3})  # ... and covered by the next checked line
    _flip(q, 2, col=9)  # "a" -> "`": still valid JSON, a different entry
    with pytest.raises(LogDamaged) as e:
        logfile.read(q)
    assert e.value.line == 3


def test_an_altered_index_row_is_found_and_rebuilt_from_the_files(registry, models, cli):
    d = registry.push(models.finetune, "i:v1", base=models.base)
    con = sqlite3.connect(registry.path / "index.sqlite")
    con.execute("UPDATE manifests SET kind = 'lora', base_name = 'evil' WHERE digest = ?", [d])
    con.commit()
    con.close()
    assert registry.ls()[0]["kind"] == "lora"  # the cache was altered
    res = registry.fsck()
    assert not res["ok"] and any("manifest row" in p and "rebuilt" in p for p in res["problems"])
    assert registry.ls()[0]["kind"] == "diff" and registry.ls()[0]["base_name"] != "evil"
    assert registry.fsck()["ok"]


def test_the_store_never_follows_a_planted_symlink(registry, models, tmp_path):
    d = registry.push(models.finetune, "s:v1", base=models.base)
    m = registry.manifest(d)
    blob = next(iter(m.blob_digests()))
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "precious"
    victim.write_text("not yours")
    # a blob file replaced by a link to a file outside the registry
    path = registry.store.blob_path(blob)
    path.unlink()
    os.symlink(victim, path)
    with pytest.raises(RegistryError, match="not a regular file"):
        registry.store.read_blob(blob)
    # a whole shard folder replaced by a link to a folder outside: gc must not delete through it
    shard = registry.path / "objects" / "sha256" / "ee"
    os.symlink(outside, shard)
    (outside / ("e" * 62)).write_text("x")
    registry.gc(prune_history=True)
    assert victim.read_text() == "not yours" and (outside / ("e" * 62)).exists()
    res = registry.fsck()
    assert not res["ok"] and any("objects/sha256/ee: a symlink" in p for p in res["problems"])
    with pytest.raises(RegistryError, match="is a symlink"):
        registry.store.blob_path("sha256:ee" + "e" * 62)


def test_a_log_cut_back_by_whole_lines_is_reported_and_restored_from_the_index(three_versions):
    reg, (d1, d2, d3) = three_versions
    log = reg.store.ref_path(parse_ref("x:latest"))
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:2]))  # a valid, older log: x:latest would answer v2
    res = reg.fsck()
    assert not res["ok"] and res["damaged_logs"] == ["refs/x/@latest"]
    assert any("cut back" in p for p in res["problems"])
    assert reg.fsck(repair_logs=True)["logs_repaired"] == ["refs/x/@latest"]
    assert reg.resolve("x:latest") == d3 and reg.fsck()["ok"]


def test_cli_fsck_gc_and_repair_on_a_damaged_log(three_versions, cli):
    reg, (_, _, d3) = three_versions
    _flip(reg.store.ref_path(parse_ref("x:latest")), 2)
    r = cli("fsck")
    assert r.code == 1 and "problem refs/x/@latest line 2" in r.out and "ok" not in r.out.split()
    r = cli("gc")
    assert r.code != 0 and r.err.count("\n") == 1 and "gc refuses to run while a log is damaged" in r.err
    r = cli("fsck", "--repair-logs")
    assert r.code == 0 and "logs restored: 1" in r.out and r.out.rstrip().endswith("ok")
    assert reg.resolve("x:latest") == d3


def test_gc_deletes_part_files_of_a_killed_pull_whatever_their_age(registry, models):
    from patchctl.registry.remote import transfer

    registry.push(models.finetune, "p:v1", base=models.base)
    part = transfer.part_path(registry.store, "sha256:" + "ab" * 32)
    part.write_bytes(b"half a blob")  # a pull killed a moment ago: a fresh file, not an hour old
    res = registry.gc()
    assert res["parts"] == 1 and not part.exists() and registry.fsck()["ok"]
