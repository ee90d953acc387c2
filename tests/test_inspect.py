"""Patch diagnostics (issue 18): known answers for the math, the inspect record, the CLI, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from patchctl import Registry
from patchctl.patches import diagnostics as dg
from patchctl.registry.store import records


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def _matrix(svals: list[float], n: int, seed: int = 0) -> torch.Tensor:
    u, v = _orthogonal(n, seed), _orthogonal(n, seed + 1)
    s = torch.zeros(n, dtype=torch.float64)
    s[: len(svals)] = torch.tensor(svals, dtype=torch.float64)
    return (u * s) @ v.T


# ------------------------------------------------------------------ spectrum: known rank and spectrum
@pytest.mark.parametrize("svd", ["exact", "lowrank"])
def test_spectrum_of_known_spectrum_is_exact(svd):
    d = _matrix([3.0, 2.0, 1.0], 64).to(torch.float32)
    got = dg.spectrum(d, 5, svd)
    p = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) / 6
    assert got["stable_rank"] == pytest.approx(14 / 9, rel=1e-5)
    assert got["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-5)
    assert got["top_sv"][:3] == pytest.approx([3.0, 2.0, 1.0], rel=1e-5)
    assert max(got["top_sv"][3:]) < 1e-3
    assert got["spectrum"] == ("svdvals" if svd == "exact" else "gram-eigvalsh")


@pytest.mark.parametrize("svd", ["exact", "lowrank"])
def test_rank_r_with_equal_singular_values_has_stable_and_effective_rank_r(svd):
    got = dg.spectrum(_matrix([2.0] * 7, 48, seed=3).to(torch.float32), 10, svd)
    assert got["stable_rank"] == pytest.approx(7.0, rel=1e-5)
    assert got["effective_rank"] == pytest.approx(7.0, rel=1e-4)


def test_zero_delta_has_rank_zero():
    got = dg.spectrum(torch.zeros(8, 5), 3, "exact")
    assert got["stable_rank"] == 0.0 and got["effective_rank"] == 0.0


def test_auto_svd_is_exact_for_small_and_lowrank_for_large():
    assert dg.svd_method((384, 1536)) == "exact"
    assert dg.svd_method((1024, 4096)) == "lowrank"
    assert dg.svd_method((1024, 4096), "exact") == "exact"


# ------------------------------------------------------------------ intruder dimensions
def _base_and_planted(n: int = 256, strength: float = 30.0):
    u, v = _orthogonal(n, 10), _orthogonal(n, 11)
    s = torch.logspace(0, -2, n, dtype=torch.float64) * 10
    w = (u * s) @ v.T
    g = torch.Generator().manual_seed(12)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x -= u[:, :10] @ (u[:, :10].T @ x)  # orthogonal to the base's top singular vectors
    x /= x.norm()
    y = torch.randn(n, generator=g, dtype=torch.float64)
    y /= y.norm()
    return w, u, v, strength * torch.outer(x, y)


@pytest.mark.parametrize("svd", ["exact", "lowrank"])
def test_planted_intruder_is_found(svd):
    w, _, _, delta = _base_and_planted()
    got = dg.intruders(w.float(), (w + delta).float(), 10, 0.5, svd)
    assert got["count"] == 1 and got["indices"] == [0]
    assert got["max_cos"][0] < 0.5 and min(got["max_cos"][1:]) > 0.9


@pytest.mark.parametrize("svd", ["exact", "lowrank"])
def test_update_inside_the_top_singular_subspace_has_no_intruders(svd):
    w, u, v, _ = _base_and_planted()
    delta = (u[:, :10] * torch.linspace(5, 1, 10, dtype=torch.float64)) @ v[:, :10].T
    got = dg.intruders(w.float(), (w + delta).float(), 10, 0.5, svd)
    assert got["count"] == 0 and got["indices"] == []
    assert min(got["max_cos"]) > 0.99


def test_tall_matrix_compares_the_smaller_side():
    w, _, _, delta = _base_and_planted(64)
    tall_w, tall_new = torch.cat([w, w]).float(), torch.cat([w + delta, w + delta]).float()  # 128 × 64
    got = dg.intruders(tall_w, tall_new, 10, 0.5, "exact")
    assert got["side"] == "right" and got["k"] == 10


def test_intruders_bad_parameters():
    m = torch.eye(4)
    with pytest.raises(dg.InvalidArgument, match="-k must be a positive integer"):
        dg.intruders(m, m, 0)
    with pytest.raises(dg.InvalidArgument, match=r"--eps must be in \(0, 1\]"):
        dg.intruders(m, m, 3, 1.5)


# ------------------------------------------------------------------ interference: planted sign conflict
@pytest.mark.parametrize("density", [1.0, 0.2, 0.05])
def test_planted_sign_conflict_fraction_is_measured_within_one_percent(density):
    g = torch.Generator().manual_seed(0)
    n, p = 200_000, 0.3
    a = torch.randn(n, generator=g)
    flip = torch.ones(n)
    flip[torch.randperm(n, generator=g)[: int(p * n)]] = -1
    b = (a * flip * (1 + 0.01 * torch.rand(n, generator=g))).reshape(400, 500)  # same support order, p flipped
    got = dg.pair_summary(dg.pair_counts(a.reshape(400, 500), b, density))
    assert abs(got["sign_conflict"] - p) < 0.01
    if density == 1.0:
        assert got["sign_conflict"] == pytest.approx(p, abs=1e-6)  # every entry is in both supports
    assert got["jaccard"] > 0.9


def test_cosine_and_jaccard_of_known_pairs():
    a = torch.tensor([[3.0, 0.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 2.0, 0.0, 1.0]])
    got = dg.pair_summary(dg.pair_counts(a, b, 0.5))
    assert got["cosine"] == 0.0 and got["jaccard"] == 0.0 and got["sign_conflict"] == 0.0
    same = dg.pair_summary(dg.pair_counts(a, -a, 0.5))
    assert same["cosine"] == -1.0 and same["jaccard"] == 1.0 and same["sign_conflict"] == 1.0
    half = dg.pair_summary(dg.pair_counts(a, None, 0.5))  # a tensor only A changes
    assert half["support_a"] == 2 and half["support_b"] == 0 and half["jaccard"] == 0.0


# ------------------------------------------------------------------ the inspect record
@pytest.fixture
def pushed(registry, models):
    registry.push(models.finetune, "ft:v1", base=models.base)
    registry.push(models.finetune2, "ft2:v1", base=models.base)
    registry.push(models.lora, "lora:v1", base=models.base)
    return registry


def test_inspect_diff_reports_tensors_layers_and_summary(pushed):
    doc = pushed.inspect("ft:v1")
    assert doc["cached"] is False and doc["kind"] == "diff"
    s = doc["summary"]
    assert s["tensors"] == len(doc["tensors"]) and s["matrices"] > 0 and 0 < s["density"] <= 1
    assert 0 < s["rel_norm"] < 1 and s["norm"] > 0
    assert {"layer.0", "layer.1", "other"} <= set(doc["layers"])
    q = next(t for n, t in doc["tensors"].items() if n.endswith("layer.0.attention.self.query.weight"))
    assert q["svd"] == "exact" and len(q["intruders"]["max_cos"]) == 10 and q["top_sv"] == sorted(q["top_sv"], reverse=True)
    assert sum(t["intruders"]["count"] for t in doc["tensors"].values() if "intruders" in t) == s["intruders"]
    assert sum(lay["tensors"] for lay in doc["layers"].values()) == s["tensors"]


def test_inspect_lora_delta_has_rank_at_most_r(pushed):
    doc = pushed.inspect("lora:v1", k=4)
    mats = [t for t in doc["tensors"].values() if "stable_rank" in t]
    assert len(mats) == 4  # query and value in two layers
    for t in mats:
        assert t["effective_rank"] <= 4 + 1e-6 and t["stable_rank"] <= 4 + 1e-6
        assert max(t["top_sv"][4:]) < 1e-4 * t["top_sv"][0]
        assert t["intruders"]["k"] == 4


def test_second_inspect_is_read_from_the_record(pushed):
    first = pushed.inspect("ft:v1")
    digest = pushed.resolve("ft:v1")
    again = pushed.inspect("ft:v1")
    assert again["cached"] is True and again["record"] == first["record"]
    assert [e["type"] for e in records.read(pushed.store, digest)].count("inspect") == 1
    assert {k: v for k, v in again.items() if k not in ("cached",)} == {k: v for k, v in first.items() if k != "cached"}
    other = pushed.inspect("ft:v1", k=3)  # other parameters: a second record
    assert other["cached"] is False and other["record"] != first["record"]
    assert [e["type"] for e in records.read(pushed.store, digest)].count("inspect") == 2
    assert pushed.inspection("ft:v1")["params"]["k"] == 3


def test_gc_keeps_the_records_of_kept_patches(pushed):
    first = pushed.inspect("lora:v1", k=4)
    pushed.gc(prune_history=True)
    assert pushed.store.has_blob(first["record"]) and pushed.inspect("lora:v1", k=4)["cached"] is True


def test_interference_of_two_diffs_and_a_lora(pushed):
    doc = pushed.interference(["ft:v1", "ft2:v1", "lora:v1"], density=0.2)
    assert [(p["a"], p["b"]) for p in doc["pairs"]] == [("ft:v1", "ft2:v1"), ("ft:v1", "lora:v1"), ("ft2:v1", "lora:v1")]
    for p in doc["pairs"]:
        assert -1 <= p["cosine"] <= 1 and 0 <= p["sign_conflict"] <= 1 and 0 <= p["jaccard"] <= 1
        assert p["layers"]
    again = pushed.interference(["ft:v1", "ft2:v1", "lora:v1"], density=0.2)
    assert again["cached"] is True


# ------------------------------------------------------------------ CLI
def test_cli_inspect_json_show_summary_and_pairs(cli, models):
    assert cli("push", models.finetune, "ft:v1", "--base", models.base).code == 0
    assert cli("push", models.finetune2, "ft2:v1", "--base", models.base).code == 0
    r = cli("inspect", "ft:v1", "--json", "-k", "5", "--eps", "0.4")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["params"]["k"] == 5 and doc["params"]["eps"] == 0.4
    human = cli("inspect", "ft:v1", "-k", "5", "--eps", "0.4", "--tensors")
    assert human.code == 0 and "cached record" in human.out and "layer.1" in human.out
    shown = cli("show", "ft:v1")
    assert "inspect   ‖Δ‖" in shown.out and "(k=5, ε=0.4)" in shown.out
    pairs = cli("inspect", "ft:v1", "ft2:v1", "--density", "0.1")
    assert pairs.code == 0 and "SIGN CONFLICT" in pairs.out
    assert json.loads(cli("inspect", "ft:v1", "ft2:v1", "--density", "0.1", "--json").out)["density"] == 0.1


def test_cli_inspect_without_a_known_base_says_which_base_to_give(cli, models, reg_path):
    assert cli("push", models.finetune, "ft:v1", "--base", models.base).code == 0
    (reg_path / "bases.json").unlink()
    with Registry(reg_path) as reg:
        fp = reg.manifest("ft:v1").fingerprint
        name = reg.manifest("ft:v1").base["name"]
    r = cli("inspect", "ft:v1")
    assert r.code == 2
    assert r.err.strip() == (f"error: the base of ft:v1, {name} ({fp[:19]}…), is not known locally; "
                             "give its folder with --base DIR")
    assert cli("inspect", "ft:v1", "--base", models.base, "--json").code == 0  # and then it is remembered
    assert cli("inspect", "ft:v1", "--json").code == 0


def test_cli_inspect_with_the_wrong_base_and_bad_flags(cli, models):
    assert cli("push", models.finetune, "ft:v1", "--base", models.base).code == 0
    r = cli("inspect", "ft:v1", "--base", models.other_base)
    assert r.code == 1 and "use the right base or `patchctl port` the patch" in r.err and len(r.err.strip().splitlines()) == 1
    assert cli("inspect", "ft:v1", "--eps", "0").err.strip() == "error: --eps must be in (0, 1], got 0.0"
    assert cli("inspect", "ft:v1", "-k", "0").err.strip() == "error: -k must be a positive integer, got 0"
    assert cli("inspect", "ft:v1", "ft:v1").err.strip() == "error: the same patch was given twice"
    assert cli("inspect", "ft:v1", "nope:v1").code == 2


def test_cli_localize_without_a_suite_says_how_to_attach_one(cli, models):
    assert cli("push", models.finetune, "ft:v1", "--base", models.base).code == 0
    r = cli("localize", "ft:v1")
    assert r.code == 2
    assert r.err.strip() == ("error: no eval suite is attached to ft:v1; attach one with "
                             "`patchctl eval attach ft:v1 SUITE` (or pass --suite SUITE)")


def test_help_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from patchctl.cli.main import main; main(['inspect', '--help']); main(['localize', '--help']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------ localize on a real MiniLM fine-tune
@pytest.fixture(scope="module")
def localized(tmp_path_factory, minilm_dir):
    from patchctl.demo import tasks

    root = tmp_path_factory.mktemp("loc")
    ft = tasks.train_full(tasks.load_task("wordnet").subset(160), root / "ft", steps=20)
    task = tasks.load_task("wordnet")
    rows = []
    for split, n in (("validation", 40), ("test", 60)):
        texts, labels = task.split(split)
        rows += [{"text": t, "label": task.label_names[y], "split": split}
                 for t, y in list(zip(texts, labels, strict=True))[:n]]
    path = root / "wordnet.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reg = Registry(root / "reg")
    reg.eval_push(path, "evals/wordnet:v1", task="classification", base=minilm_dir,
                  labels=list(task.label_names), prompts=list(task.prompts), max_len=48)
    reg.push(ft, "wordnet:v1", base=minilm_dir, evals=["evals/wordnet:v1"])
    from patchctl.registry.ops.inspecting import localize

    doc = localize(reg, "wordnet:v1", densities=(1e-3, 0.1, 1.0))
    yield reg, doc
    reg.close()


def test_localize_curve_and_chosen_density(localized):
    reg, doc = localized
    assert [p["density"] for p in doc["curve"]] == [1e-3, 0.1, 1.0]
    full = doc["curve"][-1]
    assert full["patch"] == reg.resolve("wordnet:v1") and full["nnz"] is None
    for p in doc["curve"][:-1]:
        assert p["nnz"] == pytest.approx(p["density"] * p["numel"], rel=0.01, abs=2)
    if full["validation"]["mean_gain_kept"] is not None:
        assert full["validation"]["mean_gain_kept"] == 1.0
        first = next(p for p in doc["curve"] if p["validation"]["mean_gain_kept"] >= 0.95)
        assert doc["chosen"]["density"] == first["density"]
        assert doc["chosen"]["test_gain_kept"] == first["test"]["mean_gain_kept"]
    from patchctl.registry.ops.inspecting import localize

    again = localize(reg, "wordnet:v1", densities=(1e-3, 0.1, 1.0))
    assert again["cached"] is True and again["curve"] == doc["curve"]


def test_cli_localize_prints_the_curve_from_the_record(localized, monkeypatch, capsys):
    from patchctl.cli.main import main
    from patchctl.registry.ops import inspecting

    reg, doc = localized
    monkeypatch.setattr(inspecting, "LOCALIZE_DENSITIES", (1e-3, 0.1, 1.0))
    capsys.readouterr()
    assert main(["localize", "wordnet:v1", "--json", "--registry", str(reg.path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cached"] is True and out["curve"] == doc["curve"]
    assert main(["localize", "wordnet:v1", "--registry", str(reg.path)]) == 0
    text = capsys.readouterr().out
    assert "VALIDATION GAIN KEPT" in text and "0.001" in text
    assert ("smallest density keeping ≥ 95% of the gain" in text) or ("no density keeps" in text)


def test_merge_warns_when_its_inputs_conflict_in_sign(registry, models, tmp_path, cli):
    from safetensors.torch import save_file

    from patchctl.registry.formats.checkpoint import Checkpoint

    ck = Checkpoint(models.base)
    name = next(n for n in ck.names() if n.endswith("layer.0.attention.self.query.weight"))
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(ck.info(name).shape, generator=g)
    for tag, t in (("a", tau), ("b", -tau), ("c", tau * 0.5 + 0.01 * torch.randn(tau.shape, generator=g))):
        save_file({name: t.contiguous()}, tmp_path / f"{tag}.safetensors")
        registry.push(tmp_path / f"{tag}.safetensors", f"sg:{tag}", base=models.base)
    res = registry.merge(["sg:a", "sg:b"], "sg:ta", validate=False)
    assert len(res.warnings) == 1 and "disagree in sign on 100%" in res.warnings[0] and "--method ties" in res.warnings[0]
    assert registry.merge(["sg:a", "sg:b"], "sg:ties", method="ties", params={"density": 0.2}, validate=False).warnings == []
    assert registry.merge(["sg:a", "sg:c"], "sg:ok", validate=False).warnings == []
    r = cli("merge", "sg:a", "sg:b", "--as", "sg:cli", "--no-validate")
    assert r.code == 0 and r.err.startswith("warning: sg:a and sg:b disagree in sign") and r.err.count("\n") == 1
