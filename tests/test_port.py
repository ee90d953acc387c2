"""Porting patches across base versions: names, vocabularies, drift, LoRA, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from patchctl import BaseMismatch, Registry
from patchctl.errors import InvalidArgument, ShapeMismatch
from patchctl.patches import port as pm
from patchctl.registry.formats.checkpoint import Checkpoint
from patchctl.registry.store.manifest import Manifest, TensorEntry

from .conftest import snapshot

EMB, HEAD, DENSE = "embeddings.word_embeddings.weight", "lm_head.weight", "encoder.layer.0.dense.weight"


# ------------------------------------------------------------------------ helpers
def write_base(folder: Path, tensors: dict[str, torch.Tensor], words: list[str] | None = None,
               vocab_size: int | None = None) -> Path:
    """A model folder: model.safetensors, config.json, and a word-level tokenizer.json."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    cfg = {"model_type": "toy"} | ({"vocab_size": vocab_size} if vocab_size else {})
    (folder / "config.json").write_text(json.dumps(cfg))
    if words is not None:
        from tokenizers import Tokenizer, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(folder / "tokenizer.json"))
    return folder


def toy(words: list[str], base_rows: dict[str, torch.Tensor] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Toy tensors; embedding/LM-head row of token w is base_rows[w] (fp32-exact small values)."""
    g = torch.Generator().manual_seed(seed)
    rows = base_rows or {}
    emb = torch.stack([rows.get(w, torch.randint(-8, 8, (4,), generator=g).float() / 8) for w in words])
    return {EMB: emb, HEAD: emb * 2, DENSE: torch.randint(-8, 8, (4, 4), generator=g).float() / 8}


def row_delta(words: list[str]) -> dict[str, torch.Tensor]:
    """A delta whose row for token w is (k+1)/4 with k = the token's index in V1 (distinct per token)."""
    v = torch.tensor([[(V1.index(w) + 1) / 4] * 4 for w in words])
    return {EMB: v, HEAD: -v, DENSE: torch.full((4, 4), 0.25)}


V1 = ["[UNK]", "apple", "banana", "cherry", "date", "elder"]
# reordered, "fig" and "grape" added, "elder" dropped
V2 = ["[UNK]", "cherry", "fig", "apple", "banana", "grape", "date"]


@pytest.fixture
def vocab_bases(tmp_path):
    b1 = toy(V1)
    rows = {w: b1[EMB][i] for i, w in enumerate(V1)}
    b2 = toy(V2, rows, seed=1)  # shared tokens keep their rows: no drift on the embedding
    d = row_delta(V1)
    ft = {k: b1[k] + d[k] for k in b1}
    return (write_base(tmp_path / "v1", b1, V1, len(V1)), write_base(tmp_path / "v2", b2, V2, len(V2)),
            write_base(tmp_path / "ft", ft, V1, len(V1)), d)


def deltas(reg: Registry, ref: str) -> dict[str, torch.Tensor]:
    view = reg.view(ref)
    return {c.target: view.value(c) for c in view.changes()}


# --------------------------------------------------------------- 1. vocabularies
def test_port_moves_every_delta_row_to_its_token(registry, vocab_bases):
    v1, v2, ft, d = vocab_bases
    registry.push(ft, "toy:v1", base=v1)
    rep = registry.port("toy:v1", v2, from_base=v1, as_ref="toy:v2")
    assert rep.vocab == "tokens" and rep.kind == "diff"
    assert rep.added_tokens == 2 and rep.dropped_tokens == ["elder"]
    got = deltas(registry, "toy:v2")
    for name, sign in ((EMB, 1), (HEAD, -1)):
        want = torch.stack([torch.full((4,), sign * (V1.index(w) + 1) / 4) if w in V1 else torch.zeros(4) for w in V2])
        assert torch.equal(got[name], want), name
    assert torch.equal(got[DENSE], d[DENSE])
    # the row of "elder" (index 5, value 6/4 in both vocab tensors) is the unmatched mass
    total = sum(float((t.double() ** 2).sum()) for t in d.values())
    assert rep.summary.unmatched_share == pytest.approx(2 * 4 * (6 / 4) ** 2 / total, rel=1e-12)
    assert rep.summary.reconciled_share > 0  # cherry, apple, banana, date moved


def test_rows_by_token_and_prefix_maps():
    rm = pm.rows_by_token(V1, V2)
    assert rm.src.tolist() == [0, 3, -1, 1, 2, -1, 4] and rm.dropped == (5,) and rm.added == 2
    assert pm.move_rows(torch.arange(6.0)[:, None], rm).flatten().tolist() == [0, 3, 0, 1, 2, 0, 4]
    pre = pm.rows_by_prefix(6, 4)
    assert pre.src.tolist() == [0, 1, 2, 3] and pre.dropped == (4, 5) and pre.mode == "prefix"
    assert pm.rows_by_token(V1, V1).identity


def test_port_without_tokenizers_keeps_the_shared_prefix_and_warns(registry, vocab_bases, tmp_path):
    v1, v2, ft, _ = vocab_bases
    registry.push(ft, "toy:v1", base=v1)
    (v2 / "tokenizer.json").unlink()
    rep = registry.port("toy:v1", v2, from_base=v1, as_ref="toy:pre")
    assert rep.vocab == "prefix" and any("kept by index" in w for w in rep.warnings)
    got = deltas(registry, "toy:pre")[EMB]
    want = torch.cat([torch.tensor([[(i + 1) / 4] * 4 for i in range(6)]), torch.zeros(1, 4)])
    assert torch.equal(got, want)


# -------------------------------------------------------------- 2. round trips
def test_port_there_and_back_gives_back_the_diff_exactly(registry, models):
    src = registry.push(models.finetune, "ft:v1", base=models.base)
    registry.port("ft:v1", models.other_base, from_base=models.base, as_ref="ft:v2")
    back = registry.port("ft:v2", models.base, from_base=models.other_base, as_ref="ft:back")
    a, b = registry.manifest(src), registry.manifest(back.digest)
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:  # λ = 1: the very same blobs, so the same bytes
        assert a.tensors[k].digest == b.tensors[k].digest, k
    assert not any(e.pins for e in b.tensors.values())


def test_port_round_trip_through_a_larger_vocabulary_is_exact(registry, tmp_path):
    words2 = ["fig", *reversed(V1), "grape"]  # every V1 token kept, reordered, two added
    b1 = toy(V1)
    b2 = toy(words2, {w: b1[EMB][i] * 1.5 for i, w in enumerate(V1)}, seed=1)
    d = row_delta(V1)
    v1 = write_base(tmp_path / "v1", b1, V1, len(V1))
    v2 = write_base(tmp_path / "v2", b2, words2, len(words2))
    ft = write_base(tmp_path / "ft", {k: b1[k] + d[k] for k in b1}, V1, len(V1))
    registry.push(ft, "toy:v1", base=v1)
    registry.port("toy:v1", v2, from_base=v1, as_ref="toy:v2")
    rep = registry.port("toy:v2", v1, from_base=v2, as_ref="toy:back")
    assert rep.dropped_tokens == ["fig", "grape"] and rep.summary.unmatched_share == 0.0  # zero rows
    got = deltas(registry, "toy:back")
    for k in d:
        assert torch.equal(got[k], d[k]), k


# ------------------------------------------------------------- 3. diagnostics
def test_tensor_drift_known_values():
    theta = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(8, 8)
    t = pm.tensor_drift("w", "w", theta, theta * 1.1, 0.5 * theta)
    assert t.drift == pytest.approx(0.1, rel=1e-12) and t.cosine == pytest.approx(1.0, rel=1e-12)
    ortho = torch.zeros(8, 8, dtype=torch.float64)
    ortho[0, 0], ortho[0, 1] = theta[0, 1], -theta[0, 0]  # ⟨θ, ortho⟩ = 0
    assert pm.tensor_drift("w", "w", theta, theta * 1.1, ortho).cosine == pytest.approx(0.0, abs=1e-15)
    assert pm.tensor_drift("w", "w", theta, theta, ortho).cosine is None  # the base did not move
    s = pm.summarize([pm.tensor_drift("a", "a", theta, theta * 1.1, theta),
                      pm.tensor_drift("b", "b", theta, theta * 1.3, 3 * theta)])
    assert s.mean_drift == pytest.approx((1 * 0.1 + 9 * 0.3) / 10, rel=1e-12)  # mass-weighted
    assert s.verdict == "risky" and len(s.reasons) == 2  # drift 0.28 > 0.1, cosine 1 > 0.5


def test_port_reports_drift_and_verdict_and_dry_run_writes_nothing(cli, reg_path, tmp_path):
    g = torch.Generator().manual_seed(0)
    theta = {"encoder.layer.0.w": torch.randn(16, 16, generator=g), "encoder.layer.0.b": torch.randn(16, generator=g)}
    v1 = write_base(tmp_path / "v1", theta)
    v2 = write_base(tmp_path / "v2", {k: v * 1.2 for k, v in theta.items()})  # drift 0.2, along θ
    ft = write_base(tmp_path / "ft", {k: v * 1.5 for k, v in theta.items()})  # δ = 0.5θ: cosine 1
    assert cli("push", ft, "toy:v1", "--base", v1).code == 0
    before = snapshot(reg_path)
    r = cli("port", "toy:v1", "--to", v2, "--from", v1, "--dry-run", "--json")
    assert r.code == 0, r.err
    assert snapshot(reg_path) == before
    rep = json.loads(r.out)
    s = rep["summary"]
    assert rep["dry_run"] and rep["digest"] is None and rep["ref"] == f"toy:v1-on-{rep['to_fingerprint'][7:15]}"
    assert s["mean_drift"] == pytest.approx(0.2, rel=1e-6) and s["mean_cosine"] == pytest.approx(1.0, rel=1e-6)
    assert s["verdict"] == "risky" and len(s["reasons"]) == 2
    assert {t["name"]: t["drift"] for t in rep["tensors"]} == pytest.approx(
        {"encoder.layer.0.w": 0.2, "encoder.layer.0.b": 0.2}, rel=1e-6)
    human = cli("port", "toy:v1", "--to", v2, "--from", v1, "--dry-run")
    assert human.code == 0 and "risky" in human.out and "nothing written" in human.out
    assert snapshot(reg_path) == before


def test_ported_patch_records_base_lineage_recipe_and_diagnostics(registry, models):
    src = registry.push(models.finetune, "ft:v1", base=models.base, metadata={"task": "t"})
    rep = registry.port("ft:v1", models.other_base, from_base=models.base, to_name="tiny/bert@v2",
                        lam=0.5, as_ref="ft:v2")
    m = registry.manifest("ft:v2")
    from patchctl.registry.formats.content import content_digest

    assert m.base == {"name": "tiny/bert", "revision": "v2",
                      "fingerprint": Checkpoint(models.other_base).fingerprint(),
                      "content": content_digest(Checkpoint(models.other_base))}
    assert m.parents == (src,)
    assert m.recipe == {"op": "port", "lambda": 0.5, "maps": [], "vocab": "prefix",
                        "from_fingerprint": Checkpoint(models.base).fingerprint(),
                        "to_fingerprint": Checkpoint(models.other_base).fingerprint()}
    assert m.metadata["task"] == "t" and m.metadata["port"]["verdict"] == rep.summary.verdict
    assert "ft:latest" not in {f"{r['name']}:{r['tag']}" for r in registry.ls() if r["digest"] == rep.digest}
    a, b = deltas(registry, "ft:v1"), deltas(registry, "ft:v2")
    for k in a:
        assert torch.equal(b[k], a[k] * 0.5), k  # a power of two: exact
    # and the port applies to the new base
    assert registry.apply("ft:v2", models.other_base, models.other_base.parent / "applied-v2").is_dir()
    # recipe re-run: the same digest
    again = registry.port("ft:v1", models.other_base, from_base=models.base, to_name="tiny/bert@v2",
                          lam=0.5, as_ref="ft:v2b")
    assert again.digest == rep.digest


# --------------------------------------------------------------------- LoRA, sparse
def test_lora_port_carries_factors_and_lambda_scales_lora_b(registry, models, tmp_path):
    registry.push(models.lora, "lo:v1", base=models.base)
    rep = registry.port("lo:v1", models.other_base, from_base=models.base, as_ref="lo:v2")
    src, out = registry.manifest("lo:v1"), registry.manifest("lo:v2")
    assert rep.kind == "lora" and out.kind == "lora" and out.params == src.params
    assert {k: e.digest for k, e in out.tensors.items()} == {k: e.digest for k, e in src.tensors.items()}
    registry.port("lo:v1", models.other_base, from_base=models.base, lam=2.0, as_ref="lo:x2")
    v1, v2 = registry.view("lo:v1"), registry.view("lo:x2")
    for k, e in v2.m.tensors.items():
        if "lora_B" in k:
            assert torch.equal(v2.tensor(k), v1.tensor(k) * 2), k
        else:
            assert e.digest == v1.m.tensors[k].digest, k
    assert registry.apply("lo:v2", models.other_base, tmp_path / "applied").is_dir()


def test_lora_with_modules_to_save_ports_as_a_diff_of_delta_w(registry, models, tmp_path):
    cfg = json.loads((models.lora / "adapter_config.json").read_text())
    ad = load_file(models.lora / "adapter_model.safetensors")
    key = "base_model.model.encoder.layer.0.output.dense.bias"
    base_bias = load_file(models.base / "model.safetensors")["encoder.layer.0.output.dense.bias"]
    ad[key] = base_bias + 0.25
    (tmp_path / "lora").mkdir()
    save_file(ad, str(tmp_path / "lora" / "adapter_model.safetensors"))
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(cfg))
    registry.push(tmp_path / "lora", "lo:mts", base=models.base)
    rep = registry.port("lo:mts", models.other_base, from_base=models.base, as_ref="lo:mts2")
    assert rep.kind == "diff"
    got = deltas(registry, "lo:mts2")
    want = deltas(registry, "lo:mts")
    assert torch.allclose(got["encoder.layer.0.output.dense.bias"], torch.full_like(base_bias, 0.25), atol=1e-6)
    q = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(got[q], want[q])


def test_sparse_patch_ports_as_a_dense_diff(registry, models):
    import numpy as np

    from patchctl.patches import codec

    name = "encoder.layer.0.attention.self.query.weight"
    shape = Checkpoint(models.base).info(name).shape
    sp = codec.SparseTensor(shape, torch.float32, np.array([0, 5, 77], dtype=np.int64), "values",
                            values=torch.tensor([0.5, -0.25, 1.0]))
    data = codec.encode(sp)
    with registry.store.writing():
        e = TensorEntry(registry.store.put_blob(data), "float32", tuple(shape), "sparse-v1", len(data))
        m = Manifest("sparse", {"name": "b", "revision": None, "fingerprint": Checkpoint(models.base).fingerprint()},
                     {name: e}, {"density": 3 / math.prod(shape)})
        registry.commit(m, "sp:v1")
    rep = registry.port("sp:v1", models.other_base, from_base=models.base, as_ref="sp:v2")
    out = registry.manifest("sp:v2")
    assert rep.kind == "diff" and out.tensors[name].encoding == "raw" and out.params == {}
    assert torch.equal(deltas(registry, "sp:v2")[name], codec.to_dense(sp))


# ----------------------------------------------------------------------- names
def _renamed_copy(src: Path, dst: Path, rename) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    sd = load_file(src / "model.safetensors")
    save_file({rename(k): v for k, v in sd.items()}, str(dst / "model.safetensors"))
    return dst


def test_builtin_rules_match_a_bert_prefix_and_layernorm_gamma_beta(registry, models, tmp_path):
    def rename(k: str) -> str:
        return "bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")

    v2 = _renamed_copy(models.other_base, tmp_path / "v2", rename)
    registry.push(models.finetune, "ft:v1", base=models.base)
    rep = registry.port("ft:v1", v2, from_base=models.base, as_ref="ft:v2")
    assert rep.summary.reconciled_share == pytest.approx(1.0)
    out = registry.manifest("ft:v2")
    assert set(out.tensors) == {rename(k) for k in registry.manifest("ft:v1").tensors}
    assert rep.renamed["encoder.layer.0.output.LayerNorm.weight"] == "bert.encoder.layer.0.output.LayerNorm.gamma"
    lo = registry.push(models.lora, "lo:v1", base=models.base)
    assert lo
    rl = registry.port("lo:v1", v2, from_base=models.base, as_ref="lo:v2")
    assert rl.kind == "lora"
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in registry.manifest("lo:v2").tensors


def test_map_rules_rename_what_the_builtin_rules_cannot(registry, models, tmp_path):
    v2 = _renamed_copy(models.other_base, tmp_path / "v2", lambda k: k.replace("attention.self.query", "attn.q_proj"))
    registry.push(models.finetune, "ft:v1", base=models.base)
    with pytest.raises(ShapeMismatch) as e:
        registry.port("ft:v1", v2, from_base=models.base, as_ref="ft:v2")
    assert "encoder.layer.0.attention.self.query.weight: no counterpart" in str(e.value)
    assert "--map OLD_REGEX=NEW" in str(e.value)
    rep = registry.port("ft:v1", v2, from_base=models.base, maps=[r"attention\.self\.query=attn.q_proj"],
                        as_ref="ft:v2")
    assert rep.renamed["encoder.layer.1.attention.self.query.bias"] == "encoder.layer.1.attn.q_proj.bias"
    assert registry.manifest("ft:v2").recipe["maps"] == [r"attention\.self\.query=attn.q_proj"]


def test_renamed_lora_modules_rewrite_target_modules(registry, models, tmp_path):
    v2 = _renamed_copy(models.other_base, tmp_path / "v2", lambda k: k.replace("attention.self.query", "attn.q_proj"))
    registry.push(models.lora, "lo:v1", base=models.base)
    assert sorted(registry.manifest("lo:v1").params["target_modules"]) == ["query", "value"]
    rep = registry.port("lo:v1", v2, from_base=models.base, maps=[r"attention\.self\.query=attn.q_proj"],
                        as_ref="lo:v2")
    out = registry.manifest("lo:v2")
    assert rep.kind == "lora" and sorted(out.params["target_modules"]) == ["q_proj", "value"]
    assert "base_model.model.encoder.layer.1.attn.q_proj.lora_B.weight" in out.tensors
    assert {k: v for k, v in out.params.items() if k != "target_modules"} == \
        {k: v for k, v in registry.manifest("lo:v1").params.items() if k != "target_modules"}
    # a regex target_modules (PEFT full-matches it) becomes an exact alternation of the new module paths
    cfg = json.loads((models.lora / "adapter_config.json").read_text())
    rx = tmp_path / "lora-rx"
    shutil.copytree(models.lora, rx)
    (rx / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": r".*\.(query|value)"}))
    registry.push(rx, "rx:v1", base=models.base)
    registry.port("rx:v1", v2, from_base=models.base, maps=[r"attention\.self\.query=attn.q_proj"], as_ref="rx:v2")
    tm = registry.manifest("rx:v2").params["target_modules"]
    import re

    assert re.fullmatch(tm, "encoder.layer.0.attn.q_proj") and re.fullmatch(tm, "encoder.layer.1.attention.self.value")
    assert not re.fullmatch(tm, "encoder.layer.0.attention.self.query")
    # without renames the config is carried unchanged
    registry.port("lo:v1", models.other_base, from_base=models.base, as_ref="lo:same")
    assert registry.manifest("lo:same").params == registry.manifest("lo:v1").params


def test_match_names_refuses_ambiguous_claims():
    nm = pm.match_names(["bert.x.weight", "x.weight"], ["x.weight", "model.y"])
    assert nm.pairs == {"x.weight": "x.weight"} and nm.old_only == ["bert.x.weight"] and nm.new_only == ["model.y"]


# ------------------------------------------------------------------ 4. bad input
def test_incompatible_layer_counts_is_a_clear_error_listing_tensors(registry, models, tmp_path, reg_path):
    one = tmp_path / "one-layer"
    shutil.copytree(models.other_base, one, ignore=shutil.ignore_patterns("*.safetensors"))
    sd = load_file(models.other_base / "model.safetensors")
    save_file({k: v for k, v in sd.items() if ".layer.1." not in k}, str(one / "model.safetensors"))
    registry.push(models.finetune, "ft:v1", base=models.base)
    before = snapshot(reg_path)
    with pytest.raises(ShapeMismatch) as e:
        registry.port("ft:v1", one, from_base=models.base)
    msg = str(e.value)
    assert msg.startswith("incompatible bases: the patch's base has 2 blocks, ")
    assert "has 1; unmatched tensors: only in the patch base: ['encoder.layer.1." in msg
    assert "only in the new base: []" in msg
    assert snapshot(reg_path) == before


@pytest.mark.parametrize(("spec", "message"), [
    ("no-equals-sign", "--map 'no-equals-sign': expected OLD_REGEX=NEW"),
    ("=x", "--map '=x': the regular expression before '=' is empty"),
    ("([=x", "--map '([=x': invalid regular expression '([': "),
    (r"^bert\.(x)=\2", r"--map '^bert\\.(x)=\\2': invalid replacement '\\2': invalid group reference 2"),
])
def test_bad_map_rules_are_clear_errors(spec, message):
    with pytest.raises(InvalidArgument) as e:
        pm.parse_map(spec)
    assert str(e.value).startswith(message)


def test_bad_map_on_the_cli_is_one_line_and_writes_nothing(cli, models, reg_path):
    assert cli("push", models.finetune, "ft:v1", "--base", models.base).code == 0
    before = snapshot(reg_path)
    r = cli("port", "ft:v1", "--to", models.other_base, "--from", models.base, "--map", "([=x")
    assert r.code == 1 and r.err.startswith("error: --map '([=x': invalid regular expression") and r.err.count("\n") == 1
    assert snapshot(reg_path) == before


def test_porting_to_the_same_base_says_so_and_writes_nothing(registry, models, reg_path, cli):
    registry.push(models.finetune, "ft:v1", base=models.base)
    before = snapshot(reg_path)
    fp = Checkpoint(models.base).fingerprint()
    with pytest.raises(InvalidArgument) as e:
        registry.port("ft:v1", models.base)
    assert str(e.value) == (f"nothing to port: ft:v1 already targets {models.base} (fingerprint {fp[:19]}…); "
                            "apply it there directly")
    r = cli("port", "ft:v1", "--to", models.base)
    assert r.code == 1 and r.err == f"error: {e.value}\n"
    assert snapshot(reg_path) == before


def test_wrong_or_missing_old_base_is_refused(registry, models, tmp_path):
    registry.push(models.finetune, "ft:v1", base=models.base)
    with pytest.raises(BaseMismatch, match=r"^--from .* has fingerprint sha256:"):
        registry.port("ft:v1", models.finetune, from_base=models.other_base)
    with pytest.raises(InvalidArgument, match=r"needs a name for the result: --as NAME:TAG"):
        registry.port(registry.resolve("ft:v1"), models.other_base, from_base=models.base)
    with pytest.raises(InvalidArgument, match="--lambda must be a finite number"):
        registry.port("ft:v1", models.other_base, from_base=models.base, lam=float("nan"))


def test_old_base_is_found_where_the_registry_saw_it_else_asked_for(registry, models, reg_path):
    registry.push(models.finetune, "ft:v1", base=models.base)
    rep = registry.port("ft:v1", models.other_base, dry_run=True)  # no --from: push remembered the base
    assert rep.from_fingerprint == Checkpoint(models.base).fingerprint()
    (reg_path / "bases.json").unlink()
    with pytest.raises(InvalidArgument, match=r"^porting needs the patch's own base to measure drift: pass --from"):
        registry.port("ft:v1", models.other_base)
