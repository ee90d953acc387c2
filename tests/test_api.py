"""The Python API: patchctl.load (compose in memory) and patchctl.apply (patch in place, remove, switch)."""

from __future__ import annotations

import doctest
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import patchctl
from patchctl import BaseMismatch, DigestMismatch, Registry
from patchctl.errors import (
    DeviceUnavailable,
    InvalidArgument,
    NotFound,
    ShapeMismatch,
    UnsupportedPatch,
)
from patchctl.patches.apply import apply_pins, combine
from patchctl.patches.merge import METHODS, merge_tensor
from patchctl.registry.ops import compose

QUERY = "encoder.layer.0.attention.self.query.weight"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model: torch.nn.Module, want: dict[str, torch.Tensor], keys=None) -> None:
    got = model.state_dict()
    for k in keys if keys is not None else want:
        assert torch.equal(_bits(got[k]), _bits(want[k])), k


@pytest.fixture(scope="module")
def reg(tmp_path_factory, models):
    """lora:v1, lora-rs:v1 (rsLoRA with patterns), diff:v1, diff2:v1 for the tiny base; other:v1 for another base."""
    r = Registry(tmp_path_factory.mktemp("api") / "reg")
    r.push(models.lora, "lora:v1", base=models.base)
    r.push(models.lora_rs, "lora-rs:v1", base=models.base)
    r.push(models.finetune, "diff:v1", base=models.base)
    r.push(models.finetune2, "diff2:v1", base=models.base)
    r.push(models.finetune, "other:v1", base=models.other_base)
    yield r
    r.close()


# -- load ------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["lora", "lora_rs"])
def test_load_lora_equals_peft_merge_and_unload_bit_exactly(reg, models, which):
    from peft import PeftModel
    from transformers import BertModel

    got = patchctl.load(models.base, [f"{which.replace('_', '-')}:v1"], registry=reg, device="cpu")
    want = PeftModel.from_pretrained(BertModel.from_pretrained(models.base), getattr(models, which)).merge_and_unload()
    ws = want.state_dict()
    assert set(got.state_dict()) == set(ws)
    _assert_same(got, ws)  # every parameter and buffer: same bits (both compute (B @ A) * s, then add in fp32)
    assert not torch.equal(got.state_dict()[QUERY], load_file(models.base / "model.safetensors")[QUERY])


def test_load_diff_equals_registry_apply_and_the_finetune_bit_exactly(reg, models, tmp_path):
    model = patchctl.load(models.base, ["diff:v1"], registry=reg, device="cpu")
    applied = load_file(reg.apply("diff:v1", models.base, tmp_path / "out") / "model.safetensors")
    finetune = load_file(models.finetune / "model.safetensors")
    sd = model.state_dict()
    for k in sd:
        assert torch.equal(_bits(sd[k]), _bits(applied[k])), k
        assert torch.equal(_bits(sd[k]), _bits(finetune[k])), k


@pytest.mark.parametrize("method", sorted(METHODS))
def test_load_merges_on_the_fly_as_the_method_says(reg, models, method):
    """Per tensor: merge the deltas (zero where a patch leaves the tensor alone), add as `apply` does."""
    params = {"density": 0.5} if "density" in METHODS[method].params else {}
    model = patchctl.load(models.base, ["lora:v1", "diff:v1"], method=method, weights=[0.7, 0.6],
                          registry=reg, device="cpu", seed=3, **params)
    base = load_file(models.base / "model.safetensors")
    views = [reg.view("lora:v1"), reg.view("diff:v1")]
    deltas = [{c.target: v.value(c) for c in v.changes()} for v in views]
    sd = model.state_dict()
    for k in sd:
        if not any(k in d for d in deltas):
            assert torch.equal(_bits(sd[k]), _bits(base[k])), k
            continue
        ins = [d.get(k, torch.zeros(base[k].shape)) for d in deltas]
        merged = merge_tensor(method, ins, [0.7, 0.6], generator_seed=3, name=k, params=params)
        assert torch.equal(_bits(sd[k]), _bits(combine(base[k], merged))), k


@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.5}), ("dare_linear", {"density": 0.7})])
def test_load_with_a_merge_equals_registry_merge_then_apply(reg, models, tmp_path, method, params):
    ref = f"merged-{method.replace('_', '-')}:v1"
    reg.merge(["lora:v1", "diff:v1", "diff2:v1"], ref, method=method, weights=[0.5, 0.3, 0.2], params=params,
              seed=7, validate=False)
    applied = load_file(reg.apply(ref, models.base, tmp_path / "out") / "model.safetensors")
    model = patchctl.load(models.base, ["lora:v1", "diff:v1", "diff2:v1"], method=method, weights=[0.5, 0.3, 0.2],
                          seed=7, registry=reg, device="cpu", **params)
    _assert_same(model, applied, list(model.state_dict()))


def test_load_several_patches_default_to_their_sum(reg, models):
    model = patchctl.load(models.base, ["lora:v1", "diff:v1"], registry=reg, device="cpu")
    base = load_file(models.base / "model.safetensors")
    d_lora = reg.view("lora:v1").value(next(c for c in reg.view("lora:v1").changes() if c.target == QUERY))
    d_diff = reg.view("diff:v1").value(next(c for c in reg.view("diff:v1").changes() if c.target == QUERY))
    assert torch.equal(model.state_dict()[QUERY], combine(base[QUERY], d_lora.float() + d_diff.float()))


def test_load_in_another_dtype_equals_the_applied_folder_loaded_in_that_dtype(reg, models, tmp_path):
    from transformers import BertModel

    out = reg.apply("diff:v1", models.base, tmp_path / "out")
    want = BertModel.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    got = patchctl.load(models.base, ["diff:v1"], registry=reg, device="cpu", dtype="bfloat16")
    assert next(got.parameters()).dtype == torch.bfloat16
    _assert_same(got, want)


def test_load_resolves_a_model_id_in_the_local_hf_cache(reg, models, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--acme--tiny-bert" / "snapshots" / rev
    shutil.copytree(models.base, snap)
    (tmp_path / "hub" / "models--acme--tiny-bert" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-bert" / "refs" / "main").write_text(rev)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = patchctl.load("acme/tiny-bert", ["diff:v1"], registry=reg, device="cpu")
    _assert_same(model, load_file(models.finetune / "model.safetensors"), [QUERY])
    with pytest.raises(NotFound, match="neither a model folder nor a model in the local Hugging Face cache"):
        patchctl.load("acme/not-downloaded", ["diff:v1"], registry=reg, device="cpu")


def test_load_with_a_head_class_resolves_prefixed_names(reg, models):
    model = patchctl.load(models.base, ["diff:v1"], registry=reg, device="cpu",
                          model_cls="BertForSequenceClassification")
    assert torch.equal(model.state_dict()["bert." + QUERY], load_file(models.finetune / "model.safetensors")[QUERY])


def test_load_accepts_registry_as_a_path_and_refuses_a_missing_one(reg, models, tmp_path):
    model = patchctl.load(models.base, "diff:v1", registry=reg.path, device="cpu")
    _assert_same(model, load_file(models.finetune / "model.safetensors"), [QUERY])
    with pytest.raises(NotFound, match="no registry at"):
        patchctl.load(models.base, "diff:v1", registry=tmp_path / "nope", device="cpu")
    assert not (tmp_path / "nope").exists()


# -- apply / remove / switch ------------------------------------------------------------------------
def test_apply_remove_restores_bit_exact_weights_and_touches_only_patched_tensors(reg, models):
    model = patchctl.load(models.base, device="cpu")
    before = _snapshot(model)
    lora_model = patchctl.load(models.base, ["lora:v1"], registry=reg, device="cpu")
    h = patchctl.apply(model, ["lora:v1"], registry=reg)
    assert set(h.touched) == {c.target for c in reg.view("lora:v1").changes()}
    _assert_same(model, lora_model.state_dict())  # in place == loaded with the patch
    h.remove()
    _assert_same(model, before)
    assert not h.active
    h.remove()  # a second remove is a no-op


def test_apply_to_a_bf16_model_adds_in_fp32_and_restores_exactly(reg, models):
    model = patchctl.load(models.base, device="cpu", dtype=torch.bfloat16)
    before = _snapshot(model)
    view = reg.view("diff:v1")
    with patchctl.apply(model, ["diff:v1"], registry=reg):  # the check compares the base cast to bf16
        for c in view.changes():
            want = combine(before[c.target], view.value(c))
            pins = view.pins(c.target)  # the fine-tune's exact values where base + delta misses them
            want = apply_pins(want, *pins) if pins is not None else want
            assert torch.equal(_bits(model.state_dict()[c.target]), _bits(want)), c.target
    _assert_same(model, before)


def test_apply_as_context_manager_and_switch_without_reloading(reg, models):
    model = patchctl.load(models.base, device="cpu")
    before = _snapshot(model)
    want_diff = load_file(models.finetune / "model.safetensors")
    want_mix = patchctl.load(models.base, ["diff:v1", "diff2:v1"], method="linear", registry=reg, device="cpu")
    with patchctl.apply(model, ["lora:v1"], registry=reg) as h:
        assert not torch.equal(model.state_dict()[QUERY], before[QUERY])
        assert h.switch(["diff:v1"]) is h and h.refs == ("diff:v1",)
        _assert_same(model, want_diff, [k for k in want_diff if k in before])
        h.switch(["diff:v1", "diff2:v1"], method="linear")
        _assert_same(model, want_mix.state_dict())
        with pytest.raises(BaseMismatch):  # a bad set is refused before anything changes
            h.switch(["other:v1"])
        _assert_same(model, want_mix.state_dict())
        assert h.refs == ("diff:v1", "diff2:v1")
    _assert_same(model, before)
    # a fresh set after the handle is gone works too
    with patchctl.apply(model, "lora-rs:v1", registry=reg):
        pass
    _assert_same(model, before)


def test_apply_refuses_a_second_handle_and_a_model_loaded_with_patches(reg, models):
    model = patchctl.load(models.base, device="cpu")
    with patchctl.apply(model, ["lora:v1"], registry=reg):
        with pytest.raises(InvalidArgument, match=r"already carries patches \['lora:v1'\].*switch"):
            patchctl.apply(model, ["diff:v1"], registry=reg)
    baked = patchctl.load(models.base, ["lora:v1"], registry=reg, device="cpu")
    with pytest.raises(InvalidArgument, match="merged in for good"):
        patchctl.apply(baked, ["diff:v1"], registry=reg)


def test_apply_to_a_transformers_model_finds_its_base_and_detects_a_patched_one(reg, models):
    from transformers import BertModel

    model = BertModel.from_pretrained(models.base)  # not loaded by patchctl: base found from name_or_path
    before = _snapshot(model)
    with patchctl.apply(model, ["diff:v1"], registry=reg):
        pass
    _assert_same(model, before)
    with torch.no_grad():
        model.get_parameter(QUERY)[0, 0] += 1.0  # as if someone had patched it
    changed = _snapshot(model)
    with pytest.raises(BaseMismatch, match=r"1 of \d+ tensors differ .*already patched"):
        patchctl.apply(model, ["diff:v1"], registry=reg)
    _assert_same(model, changed)


def test_apply_without_a_known_base_needs_base_or_no_fingerprint_check(reg, models):
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig.from_pretrained(models.base))  # random weights, no origin
    before = _snapshot(model)
    with pytest.raises(InvalidArgument, match="cannot tell which base.*base=.*fingerprint_check=False"):
        patchctl.apply(model, ["diff:v1"], registry=reg)
    with pytest.raises(BaseMismatch, match="not those of base"):
        patchctl.apply(model, ["diff:v1"], registry=reg, base=models.base)
    _assert_same(model, before)
    with patchctl.apply(model, ["diff:v1"], registry=reg, fingerprint_check=False) as h:
        assert QUERY in h.touched
    _assert_same(model, before)


def test_apply_a_failure_midway_restores_what_it_changed(models, tmp_path):
    r = Registry(tmp_path / "reg")
    r.push(models.finetune, "diff:v1", base=models.base)
    m = r.manifest("diff:v1")
    last = sorted(m.tensors)[-1]  # applied last: every other tensor has changed by then
    blob = r.store.blob_path(m.tensors[last].digest)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[0] ^= 0xFF
    blob.write_bytes(bytes(data))
    model = patchctl.load(models.base, device="cpu")
    before = _snapshot(model)
    with pytest.raises(DigestMismatch):
        patchctl.apply(model, ["diff:v1"], registry=r)
    _assert_same(model, before)
    r.close()


@pytest.fixture(scope="module")
def minilm(tmp_path_factory, minilm_dir, tokenizer):
    """The real all-MiniLM-L6-v2 and a registry with a LoRA of it (peft, 2 steps) and a diff of it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("minilm")
    torch.manual_seed(0)
    pm = get_peft_model(AutoModel.from_pretrained(minilm_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(["a dog barks at night", "bread is baked from flour"], padding=True, return_tensors="pt")
    for _ in range(2):
        loss = pm(**batch).last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.save_pretrained(root / "lora")
    sd = load_file(minilm_dir / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for k in (QUERY, "encoder.layer.5.output.dense.weight", "embeddings.LayerNorm.bias"):
        sd[k] = sd[k] + 0.01 * torch.randn(sd[k].shape, generator=g)
    bias = sd["embeddings.LayerNorm.bias"]
    bias[bias.abs().argmax()] *= -1e-6  # crosses zero, dwarfed by its change: base + delta cannot hit it (a pin)
    shutil.copytree(minilm_dir, root / "ft", ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(sd, root / "ft" / "model.safetensors", metadata={"format": "pt"})
    r = Registry(root / "reg")
    r.push(root / "lora", "mini-lora:v1", base=minilm_dir)
    r.push(root / "ft", "mini-diff:v1", base=minilm_dir)
    yield r, sd
    r.close()


def test_apply_then_remove_restores_the_real_minilm_bit_exactly(minilm, minilm_dir):
    from transformers import AutoModel

    r, finetuned = minilm
    model = AutoModel.from_pretrained(minilm_dir)  # plain transformers: its base is found from name_or_path
    before = _snapshot(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # position_ids is not in the state_dict
    with patchctl.apply(model, ["mini-lora:v1"], registry=r) as h:
        assert len(h.touched) == 12 and not torch.equal(model.state_dict()[QUERY], before[QUERY])
        h.switch(["mini-diff:v1"])
        assert set(h.touched) == {QUERY, "encoder.layer.5.output.dense.weight", "embeddings.LayerNorm.bias"}
        _assert_same(model, finetuned, list(before))  # the diff gives back the fine-tune exactly (pins)
        assert r.manifest("mini-diff:v1").tensors["embeddings.LayerNorm.bias"].pins
        h.switch(["mini-lora:v1", "mini-diff:v1"], method="task_arithmetic", lam=0.5)
    _assert_same(model, before)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


# -- bad input ------------------------------------------------------------------------------------
def test_a_patch_for_another_base_fails_before_any_weight_changes(reg, models, monkeypatch):
    model = patchctl.load(models.base, device="cpu")
    before = _snapshot(model)
    with pytest.raises(BaseMismatch, match=r"different bases: lora:v1 is for .*; other:v1 is for other_base"):
        patchctl.apply(model, ["lora:v1", "other:v1"], registry=reg)
    with pytest.raises(BaseMismatch, match=r"other:v1 was made for base other_base .* fingerprint .*patchctl port"):
        patchctl.apply(model, ["other:v1"], registry=reg)
    _assert_same(model, before)

    import transformers

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded when the base does not match")

    monkeypatch.setattr(transformers.BertModel, "from_pretrained", no_load)
    with pytest.raises(BaseMismatch, match="other:v1 was made for base"):
        patchctl.load(models.base, ["other:v1"], registry=reg, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_a_clear_error_before_anything_changes(reg, models):
    with pytest.raises(DeviceUnavailable, match="'cuda' was asked for but no CUDA device is present; use device='cpu'"):
        patchctl.load(models.base, ["diff:v1"], registry=reg, device="cuda")
    model = patchctl.load(models.base, device="cpu")
    before = _snapshot(model)
    with pytest.raises(DeviceUnavailable, match="cuda:1"):
        patchctl.apply(model, ["diff:v1"], registry=reg, device="cuda:1")
    _assert_same(model, before)
    with pytest.raises(InvalidArgument, match="unknown device 'gpu0'"):
        patchctl.load(models.base, registry=reg, device="gpu0")
    assert compose.resolve_device(None) == torch.device("cpu")  # device=None: cuda when present, else cpu


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"method": "nope"}, InvalidArgument, "unknown merge method 'nope'; choose one of: linear"),
        ({"weights": [1.0]}, InvalidArgument, r"1 weight\(s\) for 2 patch\(es\)"),
        ({"method": "ties", "density": 2.0}, InvalidArgument, r"density must be in \(0, 1\]"),
        ({"method": "linear", "gamma": 0.1}, InvalidArgument, "unknown parameter 'gamma' for merge method 'linear'"),
        ({"weights": [1.0, float("nan")]}, InvalidArgument, "weight 2 must be a finite number"),
    ],
)
def test_bad_merge_settings_are_refused_before_anything_changes(reg, models, kwargs, error, message):
    model = patchctl.load(models.base, device="cpu")
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        patchctl.apply(model, ["lora:v1", "diff:v1"], registry=reg, **kwargs)
    _assert_same(model, before)


def test_a_patch_that_does_not_fit_the_model_is_a_shape_mismatch(reg, models):
    from transformers import BertConfig, BertModel

    cfg = BertConfig.from_pretrained(models.base)
    cfg.intermediate_size = 48
    model = BertModel(cfg)
    before = _snapshot(model)
    with pytest.raises(ShapeMismatch, match=r"diff:v1: encoder.layer.0.intermediate.dense.bias has shape \[64\]"):
        patchctl.apply(model, ["diff:v1"], registry=reg, fingerprint_check=False)
    _assert_same(model, before)


def test_merging_a_lora_that_replaces_tensors_is_unsupported(models, tmp_path):
    import json

    src = tmp_path / "lora-save"
    shutil.copytree(models.lora, src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["pooler"]
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(src / "adapter_model.safetensors")
    sd["base_model.model.pooler.dense.weight"] = torch.zeros(32, 32)  # as peft 0.21 saves modules_to_save
    save_file(sd, src / "adapter_model.safetensors", metadata={"format": "pt"})
    with Registry(tmp_path / "reg") as r:
        r.push(src, "save:v1", base=models.base)
        r.push(models.finetune, "diff:v1", base=models.base)
        alone = patchctl.load(models.base, ["save:v1"], registry=r, device="cpu")
        assert torch.equal(alone.state_dict()["pooler.dense.weight"], torch.zeros(32, 32))
        with pytest.raises(UnsupportedPatch, match="save:v1 replaces whole tensors"):
            patchctl.load(models.base, ["save:v1", "diff:v1"], registry=r, device="cpu")


# -- the package surface --------------------------------------------------------------------------
def test_importing_patchctl_does_not_import_torch_or_transformers():
    code = ("import sys, patchctl; assert 'load' in patchctl.__all__ and 'apply' in patchctl.__all__; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    assert patchctl.load is compose.load and patchctl.apply is compose.apply
    from patchctl import apply, load  # noqa: F401 - the lazy names import like any other


@pytest.mark.parametrize("fn", [compose.load, compose.apply])
def test_docstring_examples_run(reg, models, fn):
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    (test,) = finder.find(fn, globs={"base": models.base, "reg": reg})
    assert test.examples, f"{fn.__name__} has no examples"
    result = runner.run(test)
    assert result.failed == 0, f"{fn.__name__}: {result.failed} of {result.attempted} examples failed"
