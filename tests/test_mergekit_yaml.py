"""mergekit YAML in and out of ``patchctl merge`` (``--recipe X.yaml``, ``--emit-mergekit FILE``).

The equivalence tests run mergekit itself (``mergekit-yaml`` on PATH, else
``bench/_work/venv-mergekit/bin/mergekit-yaml``, which ``python bench/merge.py
--setup`` creates) on a tiny Llama made here and two fine-tunes of it, on the
CPU, offline, and compare every output tensor. mergekit 0.1.5 fails on BERT
models, hence the Llama. The models' values are multiples of powers of two,
so the deltas are exact and many of them tie in magnitude: TIES's top-k
cut-off then falls inside runs of tied entries, where mergekit keeps the ones
its sort puts first and patchctl the lowest indices.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from patchctl.errors import InvalidArgument
from patchctl.patches.merge import resolve_params
from patchctl.registry.ops.merging import MergeSpec
from patchctl.registry.ops.merging.mergekit import from_mergekit, to_mergekit

from .conftest import ROOT, snapshot


def _mergekit() -> str | None:
    exe = shutil.which("mergekit-yaml")
    venv = ROOT / "bench" / "_work" / "venv-mergekit" / "bin" / "mergekit-yaml"
    return exe or (str(venv) if venv.is_file() else None)


MERGEKIT = _mergekit()
needs_mergekit = pytest.mark.skipif(
    MERGEKIT is None, reason="mergekit-yaml is neither on PATH nor at bench/_work/venv-mergekit/bin "
                             "(python bench/merge.py --setup installs mergekit 0.1.5 there)")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama (2 layers, hidden 32) and two fine-tunes of it, float32, values on a power-of-two grid."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    root = tmp_path_factory.mktemp("llamas")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p * 1024) / 1024)  # base values k/1024: base + j/256 is exact in float32
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(root / "base")
    for i, name in enumerate(("ft1", "ft2")):
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(base[k] + torch.round(torch.randn(p.shape, generator=g) * 3) / 256)
        model.save_pretrained(root / name)
    return {"base": root / "base", "ft1": root / "ft1", "ft2": root / "ft2"}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _run_mergekit(config: Path, out: Path) -> dict[str, torch.Tensor]:
    assert MERGEKIT is not None
    r = subprocess.run([MERGEKIT, str(config), str(out), "--no-copy-tokenizer", "--quiet"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    return _weights(out)


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _ta_doc(llamas) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(llamas["base"]),
            "models": [{"model": str(llamas["ft1"]), "parameters": {"weight": 0.7}},
                       {"model": str(llamas["ft2"]), "parameters": {"weight": 0.3}}],
            "parameters": {"lambda": [{"filter": "mlp", "value": 0.5}, {"value": 0.8}]},
            "dtype": "float32"}


# -- equivalence with mergekit ------------------------------------------------------------
@needs_mergekit
def test_task_arithmetic_recipe_equals_mergekit_bit_for_bit(llamas, cli, tmp_path, reg_path):
    cfg = _write(tmp_path / "ta.yaml", _ta_doc(llamas))
    back = tmp_path / "back.yaml"
    r = cli("merge", "--recipe", cfg, "--as", "ta:v1", "--no-validate", "--apply", tmp_path / "pc", "--emit-mergekit", back)
    assert r.code == 0, r.err
    assert "mergekit/ft1" in cli("ls").out  # the folders were imported on the fly
    emitted = yaml.safe_load(back.read_text())  # the same merge, on the recipe's own folders
    assert emitted == {**_ta_doc(llamas), "base_model": str(llamas["base"].resolve()), "out_dtype": "float32",
                       "parameters": {"normalize": False, **_ta_doc(llamas)["parameters"]}}
    ours = _weights(tmp_path / "pc")
    theirs = _run_mergekit(cfg, tmp_path / "mk")
    assert sorted(ours) == sorted(theirs) and len(ours) == 21
    assert [k for k in ours if not (ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]))] == []
    base = _weights(llamas["base"])
    assert not torch.equal(ours["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def _cutoff_ties(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Entries tied in magnitude with the k-th largest, where the tie straddles the cut-off (else all False)."""
    a = delta.abs().reshape(-1)
    if k <= 0 or k >= a.numel():
        return torch.zeros(delta.shape, dtype=torch.bool)
    t = torch.sort(a, descending=True).values[k - 1]
    tied = a == t
    straddles = int((a > t).sum()) < k < int((a >= t).sum())
    return (tied if straddles and t > 0 else torch.zeros_like(tied)).reshape(delta.shape)


@needs_mergekit
def test_ties_recipe_equals_mergekit_except_at_cutoff_ties(llamas, cli, tmp_path, capsys):
    doc = {"merge_method": "ties", "base_model": str(llamas["base"]),
           "models": [{"model": str(llamas["ft1"]), "parameters": {"weight": 0.6}},
                      {"model": str(llamas["ft2"]), "parameters": {"weight": 0.4}}],
           "parameters": {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}]},
           "dtype": "float32"}
    cfg = _write(tmp_path / "ties.yaml", doc)
    r = cli("merge", "--recipe", cfg, "--as", "ties:v1", "--no-validate", "--apply", tmp_path / "pc")
    assert r.code == 0, r.err
    ours, theirs = _weights(tmp_path / "pc"), _run_mergekit(cfg, tmp_path / "mk")
    base, fts = _weights(llamas["base"]), [_weights(llamas["ft1"]), _weights(llamas["ft2"])]
    assert sorted(ours) == sorted(theirs)
    differ = tied = outside = 0
    for name, b in base.items():
        density = 0.3 if "mlp" in name else 0.5
        k = int(density * b.numel())
        assert k >= 1  # mergekit keeps max(1, k): the same here
        ties_here = torch.zeros(b.shape, dtype=torch.bool)
        for ft in fts:
            ties_here |= _cutoff_ties(ft[name] - b, k)
        d = ours[name] != theirs[name]
        differ += int(d.sum())
        tied += int(ties_here.sum())
        outside += int((d & ~ties_here).sum())
    total = sum(b.numel() for b in base.values())
    with capsys.disabled():
        print(f"\nTIES vs mergekit: {differ} of {total} entries differ, all among the {tied} entries tied in "
              f"magnitude at an input's top-k cut-off; {outside} elsewhere")
    assert outside == 0
    assert tied > 0 and differ > 0  # the grid's ties are real, and mergekit breaks them differently
    assert differ <= tied


@needs_mergekit
def test_emitted_mergekit_yaml_runs_in_mergekit_and_gives_the_same_weights(llamas, cli, tmp_path):
    for k in ("ft1", "ft2"):
        assert cli("push", llamas[k], f"{k}:v1", "--base", llamas["base"]).code == 0
    out = tmp_path / "emit" / "merge.yaml"
    r = cli("merge", "ft1:v1", "ft2:v1", "--weights", "0.7,0.3", "--lambda", "0.8", "--override", r"mlp\.up:lambda=0.5",
            "--as", "ta:v1", "--no-validate", "--emit-mergekit", out)  # the base: the one push remembered
    assert r.code == 0, r.err
    assert cli("apply", "ta:v1", tmp_path / "pc", "--base", llamas["base"]).code == 0
    doc = yaml.safe_load(out.read_text())
    models = [m["model"] for m in doc["models"]]
    assert doc == {"merge_method": "task_arithmetic", "base_model": str(llamas["base"].resolve()),
                   "models": [{"model": models[0], "parameters": {"weight": 0.7}},
                              {"model": models[1], "parameters": {"weight": 0.3}}],
                   "parameters": {"normalize": False,
                                  "lambda": [{"filter": "mlp.up", "value": 0.5}, {"value": 0.8}]},
                   "dtype": "float32", "out_dtype": "float32"}
    assert all(Path(m).parent == out.parent / "merge.models" for m in models)  # the patches applied to the base
    ours, theirs = _weights(tmp_path / "pc"), _run_mergekit(out, tmp_path / "mk")
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


# -- the mapping, without mergekit ----------------------------------------------------------
def test_mergekit_recipe_maps_filters_first_match_first(llamas):
    doc = {"merge_method": "ties", "base_model": str(llamas["base"]),
           "models": [{"model": str(llamas["ft1"]), "parameters": {"weight": 1,
                       "density": [{"filter": "mlp", "value": 0.3}, {"filter": "up_proj", "value": 0.9}]}},
                      {"model": "ft2:v1", "parameters": {"weight": 0.5,
                       "density": [{"filter": "mlp", "value": 0.3}, {"filter": "up_proj", "value": 0.9}]}}],
           "parameters": {"density": 0.6, "lambda": 1.5, "int8_mask": True}}
    opts = from_mergekit(doc)
    assert opts == {"inputs": [str(llamas["ft1"].resolve()), "ft2:v1"], "method": "ties", "weights": [1.0, 0.5],
                    "params": {"density": 0.6, "lambda": 1.5},
                    "overrides": [("up_proj", {"density": 0.9}), ("mlp", {"density": 0.3})],
                    "base_model": str(llamas["base"].resolve())}
    spec = MergeSpec(method="ties", params=opts["params"], overrides=opts["overrides"])
    got = {n: resolve_params(n, spec.method_params(), spec.rules())["density"]
           for n in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.up_proj.x", "model.norm.weight")}
    # mergekit: the first rule whose filter is a substring wins, then the top-level value
    assert got == {"model.layers.0.mlp.up_proj.weight": 0.3, "model.layers.0.self_attn.up_proj.x": 0.9,
                   "model.norm.weight": 0.6}


def test_mergekit_defaults_are_made_explicit():
    ties = from_mergekit({"merge_method": "ties", "models": [{"model": "a:v1", "parameters": {"weight": 1}},
                                                             {"model": "b:v1", "parameters": {"weight": 1}}]})
    assert ties["params"] == {"density": 1.0, "lambda": 1.0}  # mergekit's density default is 1, patchctl's 0.2
    bc = from_mergekit({"merge_method": "breadcrumbs", "models": [{"model": "a:v1"}], "parameters": {"weight": 2},
                        "out_dtype": "bfloat16", "dtype": "float32"})
    assert (bc["weights"], bc["params"], bc["dtype"]) == ([2.0], {"density": 1.0, "gamma": 0.01, "lambda": 1.0}, "bfloat16")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "magnitude_prune", "linear"])
def test_emitted_yaml_reads_back_as_the_same_merge(method):
    spec = MergeSpec(method=method, weights=[0.25, 0.75], params={"density": 0.4} if method not in (
        "task_arithmetic", "linear") else {}, overrides=[] if method == "linear" else [
        (r"layers\.1\.", {"lambda": 0.5}), ("mlp", {"lambda": 2.0})])
    doc = to_mergekit(spec, ["a:v1", "b:v1"], base=None, dtype="bfloat16")
    back = from_mergekit(doc)
    again = MergeSpec(method=back["method"], weights=back["weights"], params=back["params"], overrides=back["overrides"])
    names = ["model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"]
    want_method = "breadcrumbs" if method == "magnitude_prune" else method
    assert back["method"] == want_method and back["weights"] == [0.25, 0.75] and back["dtype"] == "bfloat16"
    for n in names:
        got = resolve_params(n, again.method_params(), again.rules())
        want = resolve_params(n, spec.method_params(), spec.rules())
        if method == "magnitude_prune":
            want["gamma"] = 0.0
        assert got == want, n


# -- refusals ---------------------------------------------------------------------------------
def _two(llamas, **params) -> list[dict]:
    return [{"model": str(llamas["ft1"]), "parameters": {"weight": 0.5, **params}},
            {"model": str(llamas["ft2"]), "parameters": {"weight": 0.5}}]


REFUSALS = {
    "slices": (lambda L: {"merge_method": "ties", "slices": [{"sources": []}]}, "'slices'"),
    "dare_ties": (lambda L: {"merge_method": "dare_ties", "base_model": str(L["base"]), "models": _two(L)},
                  "'merge_method'"),
    "della": (lambda L: {"merge_method": "della", "base_model": str(L["base"]), "models": _two(L)}, "'merge_method'"),
    "tokenizer_source": (lambda L: {"merge_method": "task_arithmetic", "base_model": str(L["base"]),
                                    "models": _two(L), "tokenizer_source": "base"}, "'tokenizer_source'"),
    "gradient": (lambda L: {"merge_method": "task_arithmetic", "base_model": str(L["base"]),
                            "models": _two(L), "parameters": {"lambda": [0.5, 1.0]}}, "'parameters.lambda'"),
    "ties unnormalized": (lambda L: {"merge_method": "ties", "base_model": str(L["base"]), "models": _two(L),
                                     "parameters": {"normalize": False}}, "'parameters.normalize'"),
    "ta normalized": (lambda L: {"merge_method": "task_arithmetic", "base_model": str(L["base"]), "models": _two(L),
                                 "parameters": {"normalize": True}}, "'parameters.normalize'"),
    "per-model lambda": (lambda L: {"merge_method": "task_arithmetic", "base_model": str(L["base"]),
                                    "models": _two(L, **{"lambda": 2.0})}, "'models[0].parameters.lambda'"),
    "rescale": (lambda L: {"merge_method": "ties", "base_model": str(L["base"]), "models": _two(L),
                           "parameters": {"rescale": True}}, "'parameters.rescale'"),
    "densities differ": (lambda L: {"merge_method": "ties", "base_model": str(L["base"]),
                                    "models": _two(L, density=0.3)}, "'models[].parameters.density'"),
    "weight filter": (lambda L: {"merge_method": "task_arithmetic", "base_model": str(L["base"]),
                                 "models": [{"model": str(L["ft1"]), "parameters": {
                                     "weight": [{"filter": "mlp", "value": 1}, {"value": 0.5}]}}]},
                      "'models[0].parameters.weight'"),
    "missing weight": (lambda L: {"merge_method": "task_arithmetic", "base_model": str(L["base"]),
                                  "models": [{"model": str(L["ft1"])}]}, "'models[0].parameters.weight'"),
    "unknown parameter": (lambda L: {"merge_method": "task_arithmetic", "base_model": str(L["base"]),
                                     "models": _two(L, epsilon=0.1)}, "'models[0].parameters.epsilon'"),
    "lora reference": (lambda L: {"merge_method": "task_arithmetic", "base_model": str(L["base"]),
                                  "models": [{"model": "org/model+org/lora", "parameters": {"weight": 1}}]},
                       "'models[0].model'"),
    "no base for folders": (lambda L: {"merge_method": "task_arithmetic", "models": _two(L)}, "'base_model'"),
    "linear with base": (lambda L: {"merge_method": "linear", "base_model": str(L["base"]), "models": _two(L)},
                         "'base_model'"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_mergekit_recipe_refusals_name_the_field_and_change_nothing(case, llamas, cli, tmp_path, reg_path):
    assert cli("push", llamas["ft1"], "keep:v1", "--base", llamas["base"]).code == 0
    before = snapshot(reg_path)
    make, field = REFUSALS[case]
    cfg = _write(tmp_path / "x.yaml", make(llamas))
    r = cli("merge", "--recipe", cfg, "--as", "m:v1", "--no-validate")
    assert r.code != 0
    line = r.err.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert f"mergekit field {field}" in line, line
    assert snapshot(reg_path) == before


@pytest.mark.parametrize(("params", "named"), [
    ({"weight": -0.5}, "weights >= 0"),  # the method's own check, before any folder is imported
    ({"weight": 0.5, "density": 1.5}, "density"),
])
def test_mergekit_recipe_bad_values_fail_before_any_import(params, named, llamas, cli, tmp_path, reg_path):
    assert cli("push", llamas["ft1"], "keep:v1", "--base", llamas["base"]).code == 0
    before = snapshot(reg_path)
    doc = {"merge_method": "ties", "base_model": str(llamas["base"]),
           "models": [{"model": str(llamas["ft1"]), "parameters": params},
                      {"model": str(llamas["ft2"]), "parameters": {"weight": 0.5, **{
                          k: v for k, v in params.items() if k != "weight"}}}]}
    r = cli("merge", "--recipe", _write(tmp_path / "x.yaml", doc), "--as", "m:v1", "--no-validate")
    line = r.err.strip()
    assert r.code != 0 and "\n" not in line and named in line, line
    assert snapshot(reg_path) == before


@pytest.mark.parametrize(("flags", "named"), [
    (["--method", "dare_ties", "--density", "0.5"], "method 'dare_ties'"),
    (["--lines", "auto"], "LiNeS"),
    (["--override", "layers.0:lambda=2"], "override 'layers.0'"),
])
def test_emit_mergekit_refusals_name_the_option_and_change_nothing(flags, named, llamas, cli, tmp_path, reg_path):
    for k in ("ft1", "ft2"):
        assert cli("push", llamas[k], f"{k}:v1", "--base", llamas["base"]).code == 0
    before = snapshot(reg_path)
    out = tmp_path / "x.yaml"
    r = cli("merge", "ft1:v1", "ft2:v1", *flags, "--as", "m:v1", "--no-validate", "--emit-mergekit", out)
    assert r.code != 0
    line = r.err.strip()
    assert "\n" not in line and "--emit-mergekit" in line and named in line, line
    assert snapshot(reg_path) == before and not out.exists()


def test_from_mergekit_names_every_unsupported_field_at_once(llamas):
    with pytest.raises(InvalidArgument) as e:
        from_mergekit({"merge_method": "ties", "base_model": str(llamas["base"]), "models": _two(llamas),
                       "chat_template": "x", "parameters": {"rescale": True, "normalize": False}})
    msg = str(e.value)
    assert re.findall(r"mergekit field '([^']+)'", msg) == ["chat_template", "parameters.normalize", "parameters.rescale"]
