"""Every PEFT LoRA variant a user brings, made by ``peft`` itself in the test.

One tiny Llama (tied input/output embeddings, attention biases), trained for a
few real optimizer steps per adapter, and one adapter per PEFT option: plain,
DoRA, ``bias="all"``/``"lora_only"``, ``lora_bias``, ``trainable_token_indices``,
a LoRA on the (tied) input embeddings, and an adapter saved under a name other
than ``default`` (PEFT's subfolder layout). For each: ``push`` (warning once when
it changes tied embeddings), ``export`` byte-identical to PEFT's files and
loadable by ``PeftModel.from_pretrained`` with the same outputs, ``apply`` equal
to ``merge_and_unload`` (bit for bit in float32, within 1 ulp in bfloat16) and
``patchctl.load`` equal to it in memory. A tiny GPT-2 covers ``fan_in_fan_out``
(DoRA, ``lora_bias``, ``bias="all"`` on ``Conv1D``). DoRA and trainable tokens
merge, compress and inspect as the ΔW they make to the base. Options patchctl
cannot merge are refused in one line naming the option, registry unchanged.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import snapshot

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "v_proj"]
VARIANTS: dict[str, dict] = {
    "plain": {"target_modules": TARGETS},
    "dora": {"target_modules": [*TARGETS, "o_proj"], "use_dora": True},
    "dora_embed": {"target_modules": ["embed_tokens", "q_proj"], "use_dora": True},
    "bias_all": {"target_modules": TARGETS, "bias": "all"},
    "bias_lora_only": {"target_modules": TARGETS, "bias": "lora_only"},
    "lora_bias": {"target_modules": TARGETS, "lora_bias": True},
    "tokens": {"target_modules": TARGETS, "trainable_token_indices": [1, 5, 7]},
    "tokens_dict": {"target_modules": TARGETS, "trainable_token_indices": {"embed_tokens": [2, 3]}},
    "embed": {"target_modules": ["embed_tokens", "q_proj"]},
    "named": {"target_modules": TARGETS},  # saved as adapter "mine": PEFT's subfolder layout
}
#: the variants whose change reaches the tied input embeddings (push and apply warn once)
TIED = {"dora_embed", "tokens", "tokens_dict", "embed"}


def _llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, **kw)


def _train(model: torch.nn.Module, steps: int = 3, seed: int = 0) -> None:
    """A few real AdamW steps of next-token prediction on random tokens (moves every trainable tensor)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (4, 12), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@dataclass
class Zoo:
    base: Path  # float32, tied embeddings, attention biases
    base_bf16: Path  # the same weights in bfloat16
    nobias: Path  # no attention biases
    adapters: dict[str, Path]  # variant -> the folder to push (as PEFT wrote it)
    files: dict[str, Path]  # variant -> the folder holding PEFT's adapter files


def published(path: Path, config_dir: Path) -> bytes:
    """A file PEFT wrote as patchctl keeps it: the base's local path (``base_model_name_or_path``, in the
    config and the model card) replaced by the folder's name, so no patch names a path of the machine it
    was made on (issue #22); every other byte as PEFT wrote it."""
    hint = json.loads((config_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    data = path.read_bytes()
    if isinstance(hint, str) and hint.startswith("/"):
        assert Path(hint).name and Path(hint).name != hint
        data = data.replace(hint.encode(), Path(hint).name.encode())
    return data


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("peft_variants")
    torch.manual_seed(0)
    LlamaForCausalLM(_llama_config(tie_word_embeddings=True, attention_bias=True)).save_pretrained(root / "base")
    LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16).save_pretrained(root / "base_bf16")
    torch.manual_seed(1)
    LlamaForCausalLM(_llama_config(tie_word_embeddings=False)).save_pretrained(root / "nobias")
    adapters, files = {}, {}
    for k, (name, kw) in enumerate(VARIANTS.items()):
        torch.manual_seed(10 + k)
        model = LlamaForCausalLM.from_pretrained(root / "base")
        adapter = "mine" if name == "named" else "default"
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **kw), adapter_name=adapter)
        _train(pm, seed=k)
        pm.save_pretrained(root / name)
        adapters[name] = root / name
        files[name] = root / name / "mine" if name == "named" else root / name
    return Zoo(root / "base", root / "base_bf16", root / "nobias", adapters, files)


def _peft(base: Path, adapter: Path, dtype=torch.float32):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    sub = {"subfolder": "mine", "adapter_name": "mine"} if (adapter / "mine").is_dir() else {}
    return PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=dtype), adapter, **sub).eval()


IDS = torch.tensor([[1, 5, 7, 9, 2, 33, 63, 0]])


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in units in the last place between two bfloat16 tensors."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


# -- every variant: push, export, PeftModel, apply, load --------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_variant_pushes_exports_identical_and_applies_as_peft_merges(variant, zoo, cli, registry, tmp_path):
    from transformers import LlamaForCausalLM

    import patchctl

    src, peft_files = zoo.adapters[variant], zoo.files[variant]
    r = cli("push", src, f"{variant.replace('_', '-')}:v1", "--base", zoo.base)
    assert r.code == 0, r.err
    warned = [line for line in r.err.splitlines() if line.startswith("warning:")]
    if variant in TIED:  # one line naming the tied tensors
        assert warned == ["warning: model.embed_tokens.weight is tied to lm_head.weight in this base "
                          "(tie_word_embeddings): the patch changes both, as PEFT's merge does"]
    else:
        assert warned == []
    ref = f"{variant.replace('_', '-')}:v1"

    # export: PEFT's own bytes, config, weights and model card
    out = tmp_path / "export"
    assert cli("export", ref, out, "--format", "peft").code == 0
    card = src / "README.md"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == published(peft_files / name, peft_files), name
    assert (out / "README.md").read_bytes() == published(card, peft_files)

    # the export loads in PEFT and gives the original adapter's outputs
    with torch.no_grad():
        want = _peft(zoo.base, src)(input_ids=IDS).logits
        got = _peft(zoo.base, out)(input_ids=IDS).logits
    assert torch.equal(got, want)

    # apply == merge_and_unload, bit for bit in float32 (weights and logits, tied head included)
    r = cli("apply", ref, tmp_path / "applied", "--base", zoo.base)
    assert r.code == 0, r.err
    assert sum(line.startswith("warning:") for line in r.err.splitlines()) == (variant in TIED)
    merged = _peft(zoo.base, src).merge_and_unload()
    applied = load_file(tmp_path / "applied" / "model.safetensors")
    base_sd = load_file(zoo.base / "model.safetensors")
    changed = [k for k in applied if not torch.equal(applied[k], base_sd[k])]
    assert changed, "the adapter changed nothing"
    ref_sd = merged.state_dict()
    for k, v in applied.items():
        assert torch.equal(v, ref_sd[k]), k
    model = LlamaForCausalLM.from_pretrained(tmp_path / "applied").eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, merged(input_ids=IDS).logits)

    # in memory: patchctl.load equals the same merge
    loaded = patchctl.load(zoo.base, ref, registry=registry, device="cpu")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_variant_apply_to_bf16_base_within_one_ulp_of_peft(variant, zoo, registry, tmp_path):
    """A bfloat16 base: PEFT merges the float32 adapter (autocast) and rounds once; so does apply."""
    from patchctl.errors import PatchctlWarning

    src = tmp_path / "adapter"  # the same adapter, its config naming the bfloat16 base
    shutil.copytree(zoo.adapters[variant], src)
    cfg_path = (src / "mine" if variant == "named" else src) / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "base_model_name_or_path": str(zoo.base_bf16)}))
    ref = f"{variant.replace('_', '-')}:bf16"
    with pytest.warns(PatchctlWarning, match="tied") if variant in TIED else contextlib.nullcontext():
        registry.push(src, ref)
        out = registry.apply(ref, zoo.base_bf16, tmp_path / "applied")
    merged = _peft(zoo.base_bf16, src, dtype=torch.bfloat16).merge_and_unload().state_dict()
    applied = load_file(out / "model.safetensors")
    worst = max(_ulps(v, merged[k]) for k, v in applied.items())
    print(f"{variant}: bf16 apply vs merge_and_unload: {worst} ulp at most")
    assert worst <= 1, f"{worst} ulp"
    assert any(not torch.equal(v, load_file(zoo.base_bf16 / "model.safetensors")[k]) for k, v in applied.items())


def test_named_adapter_found_from_its_parent_folder(zoo, registry):
    """PEFT saves an adapter named other than ``default`` in a subfolder; the parent folder is enough."""
    assert not (zoo.adapters["named"] / "adapter_config.json").exists()
    digest = registry.push(zoo.adapters["named"], "named:v2", base=zoo.base)
    m = registry.manifest(digest)
    assert "file:README.md" in m.tensors
    assert json.loads(bytes(registry.view("named:v2").tensor("file:adapter_config.json").numpy()))["r"] == 4


def test_two_named_adapters_in_one_folder_ask_which(zoo, tmp_path, cli, reg_path):
    both = tmp_path / "both"
    shutil.copytree(zoo.adapters["named"], both)
    shutil.copytree(zoo.adapters["named"] / "mine", both / "other")
    r = cli("push", both, "x:v1", "--base", zoo.base)
    assert r.code != 0 and len(r.err.strip().splitlines()) == 1
    assert "2 PEFT adapters (mine, other)" in r.err and str(both / "mine") in r.err


def test_dora_is_refused_where_a_delta_is_needed(zoo, registry, tmp_path):
    """DoRA's update depends on the base weight: a ΔW file needs the base, and says so naming DoRA."""
    from patchctl.errors import InvalidPatch, UnsupportedPatch

    registry.push(zoo.adapters["dora"], "dora:v9", base=zoo.base)
    with pytest.raises(InvalidPatch, match=r"uses DoRA \(use_dora\)"):
        registry.export("dora:v9", tmp_path / "d.safetensors", format="diff")
    registry.push(zoo.adapters["plain"], "plain:v9", base=zoo.base)
    import patchctl

    with pytest.raises(UnsupportedPatch, match=r"uses DoRA \(use_dora\)"):
        patchctl.load(zoo.base, ["dora:v9", "plain:v9"], registry=registry, device="cpu")


def test_changed_export_falls_back_to_canonical_files(zoo, registry, tmp_path):
    """Kept bytes are written only while they still describe the patch (a renamed tensor: they do not)."""
    from patchctl.registry.ops.exporting import export_peft
    from patchctl.registry.store.manifest import Manifest
    from patchctl.registry.store.views import PatchView

    d = registry.push(zoo.adapters["plain"], "plain:v8", base=zoo.base)
    m = registry.manifest(d)
    params = {**m.params, "lora_alpha": 16}
    m2 = Manifest(m.kind, m.base, m.tensors, params, m.parents, m.recipe, m.metadata)
    out = export_peft(PatchView(registry.store, m2), tmp_path / "changed")
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 16
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (zoo.adapters["plain"] / "adapter_model.safetensors").read_bytes()


# -- refusals: one line naming the PEFT option, non-zero exit, registry unchanged --------------------
def _refusal_adapters(zoo: Zoo, root: Path) -> dict[str, tuple[Path, Path, str]]:
    """name -> (adapter folder made by peft, base, the option the message must name)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    made = {}
    cases = {
        "modules_to_save_tied": (zoo.base, {"target_modules": TARGETS, "modules_to_save": ["lm_head"]},
                                 'modules_to_save=["lm_head"]'),
        "modules_to_save_embed_tied": (zoo.base, {"target_modules": TARGETS, "modules_to_save": ["embed_tokens"]},
                                       'modules_to_save=["embed_tokens"]'),
        "ensure_weight_tying": (zoo.base, {"target_modules": ["embed_tokens", "q_proj"], "ensure_weight_tying": True},
                                "ensure_weight_tying=True"),
        "lora_bias_no_bias": (zoo.nobias, {"target_modules": TARGETS, "lora_bias": True}, "lora_bias=True"),
        "layer_replication": (zoo.nobias, {"target_modules": TARGETS, "layer_replication": [[0, 1], [0, 1]]},
                              "layer_replication="),
        "pissa": (zoo.nobias, {"target_modules": TARGETS, "init_lora_weights": "pissa"},
                  "init_lora_weights='pissa'"),
    }
    for name, (base, kw, option) in cases.items():
        torch.manual_seed(3)
        pm = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, **kw))
        pm.save_pretrained(root / name)
        made[name] = (root / name, base, option)
    return made


def test_unsupported_peft_options_refused_in_one_line_naming_the_option(zoo, cli, reg_path, tmp_path):
    cases = _refusal_adapters(zoo, tmp_path)
    assert cli("push", zoo.adapters["plain"], "ok:v1", "--base", zoo.base).code == 0
    before = snapshot(reg_path)
    for name, (src, base, option) in cases.items():
        r = cli("push", src, f"{name.replace('_', '-')}:v1", "--base", base)
        lines = r.err.strip().splitlines()
        assert r.code != 0, name
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, r.err)
        assert option in lines[0], (name, lines[0])
        assert "not in the base" not in lines[0], (name, lines[0])
        assert snapshot(reg_path) == before, name


# -- DoRA and trainable tokens as ΔW: merge and compress --------------------------------------------
def _applied_delta(registry, ref: str, base: Path, out: Path) -> dict[str, torch.Tensor]:
    """ΔW = apply's output − the base, float32, for the tensors the patch changes."""
    got = load_file(registry.apply(ref, base, out) / "model.safetensors")
    b = load_file(base / "model.safetensors")
    return {k: v.float() - b[k].float() for k, v in got.items() if not torch.equal(v, b[k])}


@pytest.mark.parametrize("variant", ["dora", "tokens"])
def test_dora_and_tokens_merge_as_their_delta_against_the_base(variant, zoo, registry, tmp_path):
    """``merge`` takes a DoRA / trainable-tokens adapter as ΔW = W' − W (W' as PEFT merges it)."""
    from patchctl.errors import PatchctlWarning

    with pytest.warns(PatchctlWarning, match="tied") if variant in TIED else contextlib.nullcontext():
        registry.push(zoo.adapters[variant], "v:1", base=zoo.base)
        want = _applied_delta(registry, "v:1", zoo.base, tmp_path / "a")
    registry.push(zoo.adapters["plain"], "p:1", base=zoo.base)
    plain = _applied_delta(registry, "p:1", zoo.base, tmp_path / "b")
    with pytest.warns(PatchctlWarning, match="tied to lm_head") if variant in TIED else contextlib.nullcontext():
        res = registry.merge(["v:1", "p:1"], "m:1", method="task_arithmetic", weights=[0.5, 1.0], validate=False)
    d = load_file(registry.export("m:1", tmp_path / "m.safetensors", format="diff"))
    assert set(d) == set(want) | set(plain)
    for k, v in d.items():
        expect = 0.5 * want.get(k, torch.zeros_like(v)) + plain.get(k, torch.zeros_like(v))
        torch.testing.assert_close(v.float(), expect, rtol=0, atol=2e-6, msg=k)
    assert res.manifest.kind == "diff"


def test_dora_compresses_its_delta(zoo, registry, tmp_path):
    registry.push(zoo.adapters["dora"], "dora:c", base=zoo.base)
    want = _applied_delta(registry, "dora:c", zoo.base, tmp_path / "a")
    res = registry.compress("dora:c", "dora:c-d1", density=1.0, mode="values", values_dtype="float32")
    got = load_file(registry.export(res.digest, tmp_path / "c.safetensors", format="diff"))
    assert set(got) == set(want)
    for k, v in got.items():
        torch.testing.assert_close(v.float(), want[k], rtol=0, atol=2e-6, msg=k)


def test_dora_factor_compression_and_cat_merge_refused_naming_dora(zoo, registry):
    from patchctl.errors import InvalidArgument, UnsupportedPatch

    registry.push(zoo.adapters["dora"], "dora:f", base=zoo.base)
    with pytest.raises(UnsupportedPatch, match=r"lora_magnitude_vector, use_dora"):
        registry.compress("dora:f", "dora:f-d", density=0.5, lora_delta=False)
    with pytest.raises(InvalidArgument, match=r"uses DoRA \(use_dora\)"):
        registry.merge(["dora:f"], "m:2", as_lora="cat", validate=False)


# -- fan_in_fan_out (GPT-2's Conv1D stores weights [in, out]) ------------------------------------------
GPT2_VARIANTS = {
    "dora": {"use_dora": True},
    "lora_bias": {"lora_bias": True},
    "bias_all": {"bias": "all"},
}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        root / "base")
    out = {"base": root / "base"}
    for k, (name, kw) in enumerate(GPT2_VARIANTS.items()):
        torch.manual_seed(20 + k)
        pm = get_peft_model(GPT2LMHeadModel.from_pretrained(root / "base"),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                       **kw))
        _train(pm, seed=k)
        pm.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("variant", list(GPT2_VARIANTS))
def test_fan_in_fan_out_variant_applies_as_peft_merges(variant, gpt2, registry, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    src = gpt2[variant]
    registry.push(src, "g:1", base=gpt2["base"])
    out = registry.export("g:1", tmp_path / "exported")
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (out / name).read_bytes() == published(src / name, src), name
    applied = load_file(registry.apply("g:1", gpt2["base"], tmp_path / "applied") / "model.safetensors")
    merged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2["base"]), src).merge_and_unload()
    ref_sd = merged.state_dict()
    base_sd = load_file(gpt2["base"] / "model.safetensors")
    assert any(not torch.equal(v, base_sd[k]) for k, v in applied.items())
    for k, v in applied.items():
        assert torch.equal(v, ref_sd[k]), k


def test_cli_merge_of_tied_embeddings_warns_in_one_line(zoo, cli):
    assert cli("push", zoo.adapters["embed"], "emb:v1", "--base", zoo.base).code == 0
    assert cli("push", zoo.adapters["plain"], "pl:v1", "--base", zoo.base).code == 0
    r = cli("merge", "emb:v1", "pl:v1", "--as", "mix:v1", "--no-validate")
    assert r.code == 0, r.err
    assert [line for line in r.err.splitlines() if line.startswith("warning:") and "tied" in line] == [
        "warning: model.embed_tokens.weight is tied to lm_head.weight in this base (tie_word_embeddings): "
        "the patch changes both, as PEFT's merge does"]


def test_inspect_measures_dora_and_tokens_by_their_delta(zoo, registry, tmp_path):
    """Diagnostics see a DoRA / trainable-tokens change as the ΔW it makes to the base."""
    from patchctl.errors import PatchctlWarning

    for variant in ("dora", "tokens"):
        with pytest.warns(PatchctlWarning, match="tied") if variant in TIED else contextlib.nullcontext():
            registry.push(zoo.adapters[variant], f"{variant}:i", base=zoo.base)
            want = _applied_delta(registry, f"{variant}:i", zoo.base, tmp_path / variant)
        doc = registry.inspect(f"{variant}:i")
        assert sorted(doc["tensors"]) == sorted(want)
        for k, d in want.items():
            assert doc["tensors"][k]["norm"] == pytest.approx(float(d.double().norm()), rel=1e-4), k
