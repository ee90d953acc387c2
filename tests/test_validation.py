"""Validation of merges: eval suites in the registry, records, the gate — on the real MiniLM.

Two real (short) full fine-tunes of all-MiniLM-L6-v2 on the demo tasks, suites on
small slices of their validation/test splits.
"""

from __future__ import annotations

import json

import pytest

from patchctl import Registry
from patchctl.errors import BaseMismatch, InvalidArgument, InvalidPatch

from .conftest import snapshot

N_TEST = 90


def _suite_file(tmp_path, task_name):
    from patchctl.demo import tasks

    task = tasks.load_task(task_name)
    path = tmp_path / f"{task_name}.jsonl"
    with open(path, "w") as f:
        for split, n in (("validation", 30), ("test", N_TEST)):
            texts, labels = task.split(split)
            for t, y in list(zip(texts, labels, strict=True))[:n]:
                f.write(json.dumps({"text": t, "label": task.label_names[y], "split": split}) + "\n")
    return path, list(task.label_names), list(task.prompts)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two real 20-step full fine-tunes (cached across the module)."""
    from patchctl.demo import tasks

    root = tmp_path_factory.mktemp("ft")
    return {t: tasks.train_full(tasks.load_task(t).subset(160), root / t, steps=20) for t in ("wordnet", "fortunes")}


@pytest.fixture(scope="module")
def filled(tmp_path_factory, trained, minilm_dir):
    tmp = tmp_path_factory.mktemp("val")
    reg_path = tmp / "reg"
    with Registry(reg_path) as reg:
        for t in ("wordnet", "fortunes"):
            path, labels, prompts = _suite_file(tmp, t)
            reg.eval_push(path, f"evals/{t}:v1", task="classification", base=minilm_dir, labels=labels,
                          prompts=prompts, max_len=48)
            reg.push(trained[t], f"{t}:v1", base=minilm_dir, evals=[f"evals/{t}:v1"])
        path, labels, prompts = _suite_file(tmp, "verbs")  # the base's control suite (forgetting)
        reg.eval_push(path, "evals/verbs:v1", task="classification", base=minilm_dir, labels=labels,
                      prompts=prompts, max_len=48, control=True)
    return reg_path, tmp


def test_merge_validates_automatically_and_records_normalized_scores(filled):
    reg_path, _ = filled
    with Registry(reg_path) as reg:
        res = reg.merge(["wordnet:v1", "fortunes:v1"], "ta:v1", gate=0.5)
        v = res.validation
        assert v["verdict"] == "pass" and res.moved and reg.resolve("ta:v1") == res.digest
        targets = {r["suite"] for r in v["rows"] if r["role"] == "target"}
        assert targets == {reg.resolve("evals/wordnet:v1"), reg.resolve("evals/fortunes:v1")}
        control = [r for r in v["rows"] if r["role"] == "control"]
        assert [r["suite"] for r in control] == [reg.resolve("evals/verbs:v1")]
        assert control[0]["constituent"] is None  # the base alone is the reference
        for r in v["rows"]:
            assert r["normalized"] == pytest.approx(r["merged"] / r["alone"])
        shown = reg.show("ta:v1")["validations"]
        assert shown[-1]["verdict"] == "pass" and shown[-1]["device"] == "cpu"


def test_bad_merge_fails_the_gate_and_moves_no_tag(filled):
    reg_path, _ = filled
    with Registry(reg_path) as reg:
        res = reg.merge(["wordnet:v1", "fortunes:v1"], "bad:v1", params={"lambda": 5.0})
        assert res.validation["verdict"] == "fail" and not res.moved
        assert res.validation["min_normalized"] < 0.9
        assert reg.store.ref_target(__import__("patchctl.registry.store.names", fromlist=["x"]).parse_ref("bad:v1")) is None
        assert reg.show(res.digest)["validations"][-1]["verdict"] == "fail"  # kept, marked failed


def test_cli_merge_exit_code_on_failed_gate(filled, capsys):
    from patchctl.cli.main import main

    reg_path, _ = filled
    code = main(["merge", "wordnet:v1", "fortunes:v1", "--lambda", "5", "--as", "bad2:v1", "--registry", str(reg_path)])
    out = capsys.readouterr().out
    assert code == 3 and "verdict: fail" in out and "was not moved" in out


def test_same_validation_twice_gives_identical_numbers(filled):
    reg_path, _ = filled
    with Registry(reg_path) as reg:
        a = reg.validate(["wordnet:v1"])
        b = reg.validate(["wordnet:v1"])
        assert [r["metrics"] for r in a] == [r["metrics"] for r in b]
        assert a[0]["metrics"]["n"] == N_TEST and a[0]["device"] == "cpu"


def test_no_validate_records_unvalidated_and_moves_tag(filled):
    reg_path, _ = filled
    with Registry(reg_path) as reg:
        res = reg.merge(["wordnet:v1", "fortunes:v1"], "nv:v1", params={"lambda": 5.0}, validate=False)
        assert res.validation["verdict"] == "unvalidated" and res.moved


def test_records_survive_index_loss_and_gc(filled):
    reg_path, _ = filled
    with Registry(reg_path) as reg:
        before = reg.show("ta:v1")
    for p in reg_path.glob("index.sqlite*"):
        p.unlink()
    with Registry(reg_path) as reg:
        reg.gc(prune_history=True)
        after = reg.show("ta:v1")
        assert after["validations"] == before["validations"] and after["suites"] == before["suites"]
        assert reg.fsck()["ok"]


def test_malformed_jsonl_names_the_line(filled, minilm_dir):
    reg_path, tmp = filled
    bad = tmp / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 0\n')
    before = snapshot(reg_path)
    with Registry(reg_path) as reg, pytest.raises(InvalidPatch, match="line 2: invalid JSON"):
        reg.eval_push(bad, "evals/bad:v1", task="classification", base=minilm_dir, prompts=["x"])
    assert snapshot(reg_path) == before


def test_unknown_task_type(filled, minilm_dir):
    reg_path, tmp = filled
    with Registry(reg_path) as reg, pytest.raises(InvalidArgument, match="unknown task type 'regression'"):
        reg.eval_push(tmp / "wordnet.jsonl", "evals/x:v1", task="regression", base=minilm_dir)


def test_suite_for_another_base_is_refused(filled, models):
    reg_path, tmp = filled
    with Registry(reg_path) as reg:
        (tmp / "lm.jsonl").write_text('{"text": "hello"}\n')
        reg.eval_push(tmp / "lm.jsonl", "evals/tiny:v1", task="lm-loss", base=models.base)
        with pytest.raises(BaseMismatch, match="another base"):
            reg.eval_attach("wordnet:v1", "evals/tiny:v1")
        with pytest.raises(BaseMismatch, match="another base"):
            reg.validate(["wordnet:v1"], suites=["evals/tiny:v1"])


def test_custom_evaluator_that_fails_to_import(filled, minilm_dir):
    reg_path, tmp = filled
    (tmp / "c.jsonl").write_text('{"x": 1}\n')
    with Registry(reg_path) as reg:
        reg.eval_push(tmp / "c.jsonl", "evals/custom:v1", task="python:no_such_module_xyz:score", base=minilm_dir)
        n = len(reg.show("wordnet:v1")["validations"])
        with pytest.raises(InvalidArgument, match="no_such_module_xyz"):
            reg.validate(["wordnet:v1"], suites=["evals/custom:v1"])
        assert len(reg.show("wordnet:v1")["validations"]) == n  # no half-written record


def _registry_with_suites(path, trained, minilm_dir, tmp, test_offset):
    """A registry whose suites share the validation rows but take their test rows from ``test_offset``."""
    from patchctl.demo import tasks

    with Registry(path) as reg:
        for t in ("wordnet", "fortunes"):
            task = tasks.load_task(t)
            rows = []
            vt, vl = task.split("validation")
            rows += [{"text": x, "label": y, "split": "validation"} for x, y in list(zip(vt, vl, strict=True))[:30]]
            tt, tl = task.split("test")
            rows += [{"text": x, "label": y, "split": "test"} for x, y in list(zip(tt, tl, strict=True))[test_offset:test_offset + 40]]
            f = tmp / f"{t}-{test_offset}.jsonl"
            f.write_text("".join(json.dumps(r) + "\n" for r in rows))
            reg.eval_push(f, f"evals/{t}:v1", task="classification", base=minilm_dir, prompts=list(task.prompts),
                          max_len=48)
            reg.push(trained[t], f"{t}:v1", base=minilm_dir, evals=[f"evals/{t}:v1"])


def _smoothed_argmax(curve, grid):
    """The documented selection rule, written out again: 1-2-1 smoothing over evaluated grid neighbours."""
    pts = sorted((grid.index(p["value"]), p["value"], p["objective"]) for p in curve)
    best = None
    for i, (gi, v, o) in enumerate(pts):
        nb = [pts[j][2] for j in (i - 1, i + 1) if 0 <= j < len(pts)]
        sm = (2 * o + sum(nb)) / (2 + len(nb))
        if best is None or (sm, o, -gi) > best[0]:
            best = ((sm, o, -gi), v)
    return best[1]


def test_search_choice_ignores_the_test_split_and_is_deterministic(tmp_path, trained, minilm_dir):
    from patchctl.registry.ops.search import LAMBDA_GRID

    chosen = []
    for offset in (0, 100):
        reg_path = tmp_path / f"reg{offset}"
        _registry_with_suites(reg_path, trained, minilm_dir, tmp_path, offset)
        with Registry(reg_path) as reg:
            res = reg.merge(["wordnet:v1", "fortunes:v1"], "s:v1", search=True, budget=3, gate=0.0)
            sr = res.recipe["search"]
            assert sr["split"] == "validation" and sr["evaluations"] <= 3 and len(sr["curve"]) == sr["evaluations"]
            assert res.validation["search"] == sr
            assert sr["chosen"]["params"]["lambda"] == res.recipe["params"]["lambda"]
            assert sr["chosen"]["params"]["lambda"] == _smoothed_argmax(sr["curve"], LAMBDA_GRID)
            chosen.append((sr["curve"], res.recipe["params"], res.digest))
            again = reg.merge(["wordnet:v1", "fortunes:v1"], "s:v2", search=True, budget=3, gate=0.0)
            assert again.digest == res.digest  # same inputs and search -> same choice and digest
    # a different test split changes neither the curve nor the choice nor the digest
    assert chosen[0] == chosen[1]


# ----------------------------------------------------------- compress --search, port validation and --search
def test_compress_search_chooses_kappa_on_validation_only_and_is_deterministic(tmp_path, trained, minilm_dir):
    from patchctl.registry.ops.search import kappa_grid

    seen = []
    for offset in (0, 100):
        reg_path = tmp_path / f"reg{offset}"
        _registry_with_suites(reg_path, trained, minilm_dir, tmp_path, offset)
        with Registry(reg_path) as reg:
            res = reg.compress("wordnet:v1", "wordnet:c1", density=0.1, search=True, budget=3)
            sr = res.recipe["search"]
            assert sr["split"] == "validation" and 1 <= sr["evaluations"] <= 3
            assert all(p["value"] in kappa_grid(0.1) for p in sr["curve"])
            assert res.recipe["kappa"] == sr["chosen"]["kappa"] == _smoothed_argmax(sr["curve"], kappa_grid(0.1))
            # gain kept: (candidate - base) / (source - base), on the validation scores in the record
            (b,), (s,) = sr["base_scores"], sr["source_scores"]
            assert s > b  # this fine-tune gains on the validation rows
            for p in sr["curve"]:
                assert p["target_gain"][0] == pytest.approx((p["scores"][0] - b) / (s - b))
            v = res.validation  # the chosen patch measured on the test split
            assert v["split"] == "test"
            (direct,) = reg.validate([res.digest])  # the record's scores are real test scores
            assert v["rows"][0]["derived"] == direct["metrics"]["score"]
            assert v["rows"][0]["source"] == reg.validate(["wordnet:v1"])[0]["metrics"]["score"]
            assert v["search"] == sr  # the search is in the validation record too
            assert reg.records("wordnet:c1")["suites"] == [reg.resolve("evals/wordnet:v1")]  # inherited
            assert any(x.get("type") == "compress-validation" for x in reg.show("wordnet:c1")["validations"])
            again = reg.compress("wordnet:v1", "wordnet:c2", density=0.1, search=True, budget=3)
            assert again.digest == res.digest
            seen.append((sr["curve"], res.digest))
    assert seen[0] == seen[1]  # the test split changes neither the curve nor the choice nor the digest


def test_compress_search_bad_requests_write_nothing(tmp_path, trained, minilm_dir, models):
    reg_path = tmp_path / "reg"
    _registry_with_suites(reg_path, trained, minilm_dir, tmp_path, 0)
    with Registry(reg_path) as reg:
        reg.push(models.finetune, "nosuite:v1", base=models.base)
    before = snapshot(reg_path)
    with Registry(reg_path) as reg:
        with pytest.raises(InvalidArgument, match="--mode ternary --scale std"):
            reg.compress("wordnet:v1", "x:v1", density=0.1, mode="values", search=True)
        with pytest.raises(InvalidArgument, match="density must be in"):
            reg.compress("wordnet:v1", "x:v1", density=1.5, search=True)
        with pytest.raises(__import__("patchctl.errors", fromlist=["x"]).NotFound, match="eval suites"):
            reg.compress("nosuite:v1", "x:v1", density=0.1, search=True)
        with pytest.raises(InvalidArgument, match="--budget"):
            reg.compress("wordnet:v1", "x:v1", density=0.1, search=True, budget=0)
    assert snapshot(reg_path) == before


def _drifted_copy(src, dst, rel: float, seed: int):
    """A "version 2" of a base: every float tensor plus seeded noise of relative size ``rel``."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    sd = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in sorted(sd.items()):
        if t.is_floating_point() and t.numel() > 1:
            n = torch.randn(t.shape, generator=g)
            t = t + n * (rel * t.norm() / n.norm())
        out[k] = t.contiguous()
    save_file(out, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def minilm_v2(tmp_path_factory, minilm_dir):
    return _drifted_copy(minilm_dir, tmp_path_factory.mktemp("v2") / "minilm-v2", 0.01, 7)


def test_port_carries_suites_and_validates_on_the_new_base(tmp_path, trained, minilm_dir, minilm_v2):
    reg_path = tmp_path / "reg"
    _registry_with_suites(reg_path, trained, minilm_dir, tmp_path, 0)
    with Registry(reg_path) as reg:
        rep = reg.port("wordnet:v1", minilm_v2, as_ref="wordnet:v2")
        v = rep.validation
        assert v["type"] == "port-validation" and v["split"] == "test" and rep.moved
        (row,) = v["rows"]
        assert row["recovered"] == pytest.approx((row["new_ported"] - row["new_base"])
                                                 / (row["old_patched"] - row["old_base"]))
        assert row["old_patched"] > row["old_base"] and v["verdict"] == ("pass" if row["recovered"] >= 0.8 else "fail")
        (ported_suite,) = reg.records("wordnet:v2")["suites"]
        sm, om = reg.manifest(ported_suite), reg.manifest("evals/wordnet:v1")
        assert sm.fingerprint == reg.manifest("wordnet:v2").fingerprint != om.fingerprint
        assert sm.parents == (om_digest := reg.resolve("evals/wordnet:v1"),) and om_digest
        assert {k: e.digest for k, e in sm.tensors.items()} == {k: e.digest for k, e in om.tensors.items()}
        assert reg.show("wordnet:v2")["validations"][-1]["type"] == "port-validation"
        # an impossible gate: the port is kept but fails and moves no ref
        bad = reg.port("wordnet:v1", minilm_v2, as_ref="wordnet:v2-strict", gate=5.0)
        assert bad.validation["verdict"] == "fail" and not bad.moved and bad.digest == rep.digest
        with pytest.raises(__import__("patchctl.errors", fromlist=["x"]).NotFound):
            reg.resolve("wordnet:v2-strict")
        # --no-validate records "unvalidated" and moves the ref
        nv = reg.port("wordnet:v1", minilm_v2, as_ref="wordnet:v2-nv", validate=False)
        assert nv.validation["verdict"] == "unvalidated" and nv.moved


def test_cli_port_exit_code_on_failed_gate(tmp_path, trained, minilm_dir, minilm_v2, capsys):
    from patchctl.cli.main import main

    reg_path = tmp_path / "reg"
    _registry_with_suites(reg_path, trained, minilm_dir, tmp_path, 0)
    code = main(["port", "fortunes:v1", "--to", str(minilm_v2), "--as", "f:v2", "--gate", "5",
                 "--registry", str(reg_path)])
    out = capsys.readouterr().out
    assert code == 3 and "gain recovered" in out and "was not moved" in out
    kept = out.split("it is kept as ")[1].split()[0]
    assert main(["show", kept, "--registry", str(reg_path)]) in (0, None)
    assert "validated fail on the new base (gate 5" in capsys.readouterr().out
    assert main(["port", "fortunes:v1", "--to", str(minilm_v2), "--as", "f:nv", "--no-validate",
                 "--registry", str(reg_path)]) in (0, None)
    assert main(["show", "f:nv", "--registry", str(reg_path)]) in (0, None)
    assert "validated unvalidated on the new base (--no-validate)" in capsys.readouterr().out


def test_port_search_chooses_lambda_on_validation_and_is_deterministic(tmp_path, trained, minilm_dir, minilm_v2):
    from patchctl.registry.ops.search import PORT_LAMBDA_GRID

    seen = []
    for offset in (0, 100):
        reg_path = tmp_path / f"reg{offset}"
        _registry_with_suites(reg_path, trained, minilm_dir, tmp_path, offset)
        with Registry(reg_path) as reg:
            rep = reg.port("fortunes:v1", minilm_v2, as_ref="fortunes:v2", search=True, budget=2, gate=0.0)
            m = reg.manifest(rep.digest)
            sr = m.recipe["search"]
            assert sr["split"] == "validation" and sr["evaluations"] == 2 and rep.validation["search"] == sr
            assert m.recipe["lambda"] == sr["chosen"]["lambda"] in PORT_LAMBDA_GRID
            # recovered gain against the source on the OLD base
            (nb,), (s,), (sb,) = sr["base_scores"], sr["source_scores"], sr["source_base_scores"]
            for p in sr["curve"]:  # (a source without a gain on these 30 rows is compared by ratio)
                want = (p["scores"][0] - nb) / (s - sb) if s - sb > 1e-9 else p["scores"][0] / s
                assert p["target_gain"][0] == pytest.approx(want)
            again = reg.port("fortunes:v1", minilm_v2, as_ref="fortunes:v2b", search=True, budget=2, gate=0.0)
            assert again.digest == rep.digest
            seen.append((sr["curve"], rep.digest))
    assert seen[0] == seen[1]


def test_smoothed_selection_by_hand():
    from patchctl.registry.ops.search import choose, smoothed

    grid = (0.5, 1.0, 1.5, 2.0)
    pts = {0.5: 0.90, 1.0: 0.96, 1.5: 0.97, 2.0: 0.80}  # a lone high point beside a cliff loses to its neighbour
    sm = smoothed(grid, pts)
    assert sm == pytest.approx({0.5: (2 * 0.90 + 0.96) / 3, 1.0: (0.90 + 2 * 0.96 + 0.97) / 4,
                                1.5: (0.96 + 2 * 0.97 + 0.80) / 4, 2.0: (0.97 + 2 * 0.80) / 3})
    assert choose(grid, pts, sm) == 1.0
    # neighbours are the evaluated points in grid order (a bracketing search skips some)
    sparse = {2.0: 0.5, 0.5: 0.7}
    assert smoothed(grid, sparse) == pytest.approx({0.5: (1.4 + 0.5) / 3, 2.0: (1.0 + 0.7) / 3})
    assert choose(grid, {1.0: 0.9}, {1.0: 0.9}) == 1.0
