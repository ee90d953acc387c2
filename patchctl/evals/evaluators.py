"""One small function per evaluation task type, listed in :data:`EVALUATORS`.

Every evaluator has the signature
``(model, tokenizer, rows, params, device, batch_size) -> metrics`` and returns a
dict with ``"score"`` (higher is better; what a merge gate compares) and ``"n"``
(rows evaluated), plus the metrics of its type. ``rows`` is a list of dicts whose
keys each evaluator documents; ``params`` are the suite's parameters.

Determinism: rows are tokenized once, put in batches sorted by length (longest
first, ties by row index), and each row's result is stored under its own index;
totals are then summed in row order in float64. The model must be in eval mode
(:func:`evaluate` sees to it), so the same model and rows give identical numbers
on CPU. Forward passes run under :func:`patchctl.evals.runtime.inference`
(no autograd; bf16 autocast on CUDA).

Custom evaluators are named ``python:module:function`` and called as
``function(model, tokenizer, rows, params, device) -> dict`` with a ``"score"``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from patchctl.errors import InvalidArgument, PatchctlError
from patchctl.evals import runtime

Rows = list[dict[str, Any]]
Metrics = dict[str, Any]
Evaluator = Callable[[Any, Any, Rows, dict[str, Any], str, int], Metrics]

# Most logits elements (batch x length x vocab) one forward pass of a causal LM may
# produce: 2**27 float32 values is 512 MiB per copy. Long or many rows are split
# into smaller batches to stay under it.
_LOGIT_BUDGET = 2**27


# ----------------------------------------------------------------------- helpers


def _check_rows(rows: Rows, keys: Sequence[str], task_type: str) -> None:
    if not isinstance(rows, list) or not rows:
        raise InvalidArgument(f"{task_type}: no rows to evaluate; give a non-empty list")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InvalidArgument(f"{task_type}: row {i} is {type(row).__name__}, not an object")
        missing = [k for k in keys if k not in row]
        if missing:
            raise InvalidArgument(
                f"{task_type}: row {i} lacks {', '.join(map(repr, missing))}; "
                f"each row needs {', '.join(map(repr, keys))}"
            )


def _batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Row indices in batches sorted by length, longest first (ties: lower index
    first), of at most ``batch_size`` rows and at most ``max_tokens`` padded tokens
    (a single longer row still gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            padded = (len(batch) + 1) * lengths[batch[0]]
            if len(batch) < batch_size and (max_tokens is None or padded <= max_tokens):
                batch.append(i)
                continue
        batches.append([i])
    return batches


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` on ``device``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: Any) -> int:
    """Any valid id works for padding (masked out); prefer the tokenizer's own."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _ids(tokenizer: Any, texts: Sequence[str], special: bool = True, max_len: int | None = None) -> list[list[int]]:
    enc = tokenizer(
        list(texts),
        add_special_tokens=special,
        truncation=max_len is not None,
        max_length=max_len,
    )
    return [list(x) for x in enc["input_ids"]]


def _vocab_size(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _accuracy_metrics(correct: Sequence[bool], predictions: list[Any], params: dict[str, Any]) -> Metrics:
    acc = sum(map(int, correct)) / len(correct)
    metrics: Metrics = {"score": acc, "accuracy": acc, "n": len(correct)}
    if params.get("return_predictions"):
        metrics["predictions"] = predictions
    return metrics


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


# ------------------------------------------------------------------- evaluators


def embed(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_len: int = 128,
    pooling: str = "mean",
    normalize: bool = True,
    device: str = "cpu",
    batch_size: int = 64,
) -> torch.Tensor:
    """Sentence embeddings ``[len(texts), hidden]`` (float32, on CPU) from an encoder.

    ``pooling`` is ``"mean"`` over the attention mask (sentence-transformers style)
    or ``"cls"`` (the first token); ``normalize`` L2-normalizes each row. Texts are
    cut to ``max_len`` tokens and batched by length; row ``i`` is ``texts[i]``'s."""
    if pooling not in ("mean", "cls"):
        raise InvalidArgument(f"pooling {pooling!r} is not supported; use 'mean' or 'cls'")
    enc = _ids(tokenizer, [str(t) for t in texts], max_len=max_len)
    pad = _pad_id(tokenizer)
    rows: list[torch.Tensor | None] = [None] * len(enc)
    with runtime.inference(device):
        for batch in _batches([len(s) for s in enc], batch_size):
            ids, mask = _pad([enc[i] for i in batch], pad, device)
            out = model(input_ids=ids, attention_mask=mask)
            hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).float()
            if pooling == "mean":
                m = mask.unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            else:
                emb = hidden[:, 0]
            if normalize:
                emb = F.normalize(emb, p=2, dim=-1)
            for b, i in enumerate(batch):
                rows[i] = emb[b].cpu()
    if not enc:
        return torch.empty(0, int(model.config.hidden_size))
    return torch.stack([r for r in rows if r is not None])


def classification(
    model: Any, tokenizer: Any, rows: Rows, params: dict[str, Any], device: str, batch_size: int
) -> Metrics:
    """Text classification with a fixed head: ``argmax(embed(text) @ head.T)``.

    Rows: ``{"text": str, "label": int}``. Params: ``head`` (float ``[C, H]``,
    required), ``max_len`` (tokens, default 128), ``pooling`` (``"mean"`` over the
    attention mask, default, or ``"cls"``), ``normalize`` (L2-normalize the
    embedding, default True), ``return_predictions``; others are ignored. Metrics:
    ``accuracy`` (= ``score``), ``n``, and ``predictions`` (label per row) when asked."""
    _check_rows(rows, ("text", "label"), "classification")
    head = params.get("head")
    if head is None:
        raise InvalidArgument("classification: params lack 'head' (a float [classes, hidden] tensor)")
    head = torch.as_tensor(head, dtype=torch.float32).cpu()
    if head.ndim != 2 or head.shape[0] < 1:
        raise InvalidArgument(f"classification: head has shape {list(head.shape)}; need [classes, hidden]")
    num_classes = head.shape[0]
    labels = []
    for i, row in enumerate(rows):
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
            raise InvalidArgument(
                f"classification: row {i} has label {label!r}; need an int in [0, {num_classes})"
            )
        labels.append(label)
    try:
        emb = embed(
            model,
            tokenizer,
            [str(r["text"]) for r in rows],
            max_len=int(params.get("max_len", 128)),
            pooling=params.get("pooling", "mean"),
            normalize=bool(params.get("normalize", True)),
            device=device,
            batch_size=batch_size,
        )
    except InvalidArgument as e:
        raise InvalidArgument(f"classification: {e}") from e
    if emb.shape[-1] != head.shape[1]:
        raise InvalidArgument(
            f"classification: head has width {head.shape[1]} but the model's "
            f"embeddings have {emb.shape[-1]}; use a head made for this base"
        )
    preds = [int(p) for p in (emb @ head.T).argmax(-1).tolist()]
    return _accuracy_metrics([p == y for p, y in zip(preds, labels, strict=True)], preds, params)


def _token_logprobs(
    model: Any,
    seqs: list[list[int]],
    starts: list[int],
    pad: int,
    device: str,
    batch_size: int,
) -> tuple[list[float], list[int]]:
    """For each sequence, the float64 sum of ``log p(token | earlier tokens)`` over
    its tokens at positions ``start..end`` (``start >= 1``), and how many there are."""
    sums = [0.0] * len(seqs)
    counts = [max(0, len(s) - st) for s, st in zip(seqs, starts, strict=True)]
    max_tokens = max(1, _LOGIT_BUDGET // _vocab_size(model))
    for batch in _batches([len(s) for s in seqs], batch_size, max_tokens):
        ids, mask = _pad([seqs[i] for i in batch], pad, device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for b, i in enumerate(batch):
            st, end = starts[i], len(seqs[i])
            if end <= st:
                continue
            lp = F.log_softmax(logits[b, st - 1 : end - 1].float(), dim=-1)
            tok = lp.gather(-1, ids[b, st:end].unsqueeze(-1)).squeeze(-1)
            sums[i] = float(tok.double().sum())
    return sums, counts


def lm_loss(
    model: Any, tokenizer: Any, rows: Rows, params: dict[str, Any], device: str, batch_size: int
) -> Metrics:
    """Mean token cross-entropy of a causal LM on texts.

    Rows: ``{"text": str}``, tokenized with the tokenizer's special tokens and cut
    to ``params["max_len"]`` tokens (default 1024). Every token after the first of
    each row is predicted; ``loss`` is the sum of all token losses divided by the
    number of predicted tokens over all rows (a token-weighted mean, as if the rows
    were one corpus -- NOT the mean of per-row means, which would over-weight short
    rows). Metrics: ``loss``, ``perplexity`` = exp(loss), ``score`` = exp(-loss)
    (the geometric-mean probability of a token, in (0, 1]), ``tokens``, ``n``."""
    _check_rows(rows, ("text",), "lm-loss")
    max_len = int(params.get("max_len", 1024))
    if max_len < 2:
        raise InvalidArgument(f"lm-loss: max_len {max_len} is too small; need 2 or more tokens")
    seqs = _ids(tokenizer, [str(r["text"]) for r in rows], max_len=max_len)
    with runtime.inference(device):
        sums, counts = _token_logprobs(model, seqs, [1] * len(seqs), _pad_id(tokenizer), device, batch_size)
    tokens = sum(counts)
    if tokens == 0:
        raise InvalidArgument("lm-loss: the rows have no token to predict; each text needs 2+ tokens")
    loss = -math.fsum(sums) / tokens
    return {
        "score": math.exp(-loss),
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "tokens": tokens,
        "n": len(rows),
    }


def multiple_choice(
    model: Any, tokenizer: Any, rows: Rows, params: dict[str, Any], device: str, batch_size: int
) -> Metrics:
    """Pick the choice with the highest log-likelihood given the prompt.

    Rows: ``{"prompt": str, "choices": [str, ...], "answer": int}``. The prompt is
    tokenized with special tokens, each choice without, and appended as is -- so put
    the separating space in the choice (``" Paris"``). A choice's score is the
    float64 sum of its tokens' log-probabilities; ties go to the lower index.
    Metrics: ``accuracy`` (= ``score``), ``n``, ``predictions`` when asked."""
    _check_rows(rows, ("prompt", "choices", "answer"), "multiple-choice")
    seqs: list[list[int]] = []
    starts: list[int] = []
    owner: list[tuple[int, int]] = []
    for i, row in enumerate(rows):
        choices, answer = row["choices"], row["answer"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise InvalidArgument(f"multiple-choice: row {i} needs a list of 2 or more choices")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise InvalidArgument(
                f"multiple-choice: row {i} has answer {answer!r}; need an int in [0, {len(choices)})"
            )
        prompt = _ids(tokenizer, [str(row["prompt"])])[0]
        if not prompt:
            raise InvalidArgument(f"multiple-choice: the prompt of row {i} has no tokens")
        for j, cont in enumerate(_ids(tokenizer, [str(c) for c in choices], special=False)):
            if not cont:
                raise InvalidArgument(f"multiple-choice: choice {j} of row {i} has no tokens")
            seqs.append(prompt + cont)
            starts.append(len(prompt))
            owner.append((i, j))
    with runtime.inference(device):
        sums, _ = _token_logprobs(model, seqs, starts, _pad_id(tokenizer), device, batch_size)
    scores: list[list[float]] = [[] for _ in rows]
    for (i, _j), s in zip(owner, sums, strict=True):
        scores[i].append(s)
    preds = [s.index(max(s)) for s in scores]  # the first of equal maxima
    return _accuracy_metrics([p == r["answer"] for p, r in zip(preds, rows, strict=True)], preds, params)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(x) for x in (eos if isinstance(eos, list | tuple) else [eos])}


def exact_match(
    model: Any, tokenizer: Any, rows: Rows, params: dict[str, Any], device: str, batch_size: int
) -> Metrics:
    """Greedy generation compared with the answer, both stripped of outer whitespace.

    Rows: ``{"prompt": str, "answer": str}``. Params: ``max_new_tokens`` (default:
    the answer's token count + 4, per row), ``stop`` (strings; the prediction is
    cut before the first of them that occurs, e.g. ``["\\n"]``; default none),
    ``return_predictions``. Rows are batched
    only with rows whose prompt has the same token count, so no padding enters and
    each output is the one a one-row ``generate`` gives. Generation stops at the
    model's end-of-sequence token, which is not part of the prediction.
    Metrics: ``accuracy`` (= ``score``), ``n``, ``predictions`` (strings) when asked."""
    _check_rows(rows, ("prompt", "answer"), "exact-match")
    prompts = _ids(tokenizer, [str(r["prompt"]) for r in rows])
    fixed = params.get("max_new_tokens")
    if fixed is not None and int(fixed) < 1:
        raise InvalidArgument(f"exact-match: max_new_tokens {fixed!r} is not valid; use 1 or more")
    answers = _ids(tokenizer, [str(r["answer"]) for r in rows], special=False)
    budget = [int(fixed) if fixed is not None else len(a) + 4 for a in answers]
    for i, p in enumerate(prompts):
        if not p:
            raise InvalidArgument(f"exact-match: the prompt of row {i} has no tokens")
    stop = params.get("stop") or []
    if isinstance(stop, str) or not all(isinstance(x, str) and x for x in stop):
        raise InvalidArgument(f"exact-match: stop {stop!r} is not valid; give a list of non-empty strings")
    eos = _eos_ids(model, tokenizer)
    pad = _pad_id(tokenizer)
    by_length: dict[int, list[int]] = {}
    for i in sorted(range(len(rows)), key=lambda i: (-len(prompts[i]), i)):
        by_length.setdefault(len(prompts[i]), []).append(i)
    outputs = [""] * len(rows)
    with runtime.inference(device):
        for group in by_length.values():
            for k in range(0, len(group), batch_size):
                batch = group[k : k + batch_size]
                ids = torch.tensor([prompts[i] for i in batch], dtype=torch.long, device=device)
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=max(budget[i] for i in batch),
                    pad_token_id=pad,
                )
                for b, i in enumerate(batch):
                    new = gen[b, ids.shape[1] :].tolist()[: budget[i]]
                    cut = next((t for t, tok in enumerate(new) if tok in eos), len(new))
                    text = tokenizer.decode(new[:cut], skip_special_tokens=True)
                    outputs[i] = min((text.split(x, 1)[0] for x in stop), key=len, default=text)
    correct = [o.strip() == str(r["answer"]).strip() for o, r in zip(outputs, rows, strict=True)]
    return _accuracy_metrics(correct, outputs, params)


def _parse_spec(spec: str) -> tuple[str, str]:
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "python" or not parts[1] or not parts[2]:
        raise InvalidArgument(
            f"custom evaluator {spec!r} is not valid; write it as 'python:module:function'"
        )
    return parts[1], parts[2]


def custom(
    spec: str,
    model: Any,
    tokenizer: Any,
    rows: Rows,
    params: dict[str, Any],
    device: str,
    batch_size: int | None = None,
) -> Metrics:
    """Run the evaluator ``spec`` = ``python:module:function``.

    Imports ``module`` and calls ``function(model, tokenizer, rows, params, device)``
    inside :func:`runtime.inference`; it must return a dict with a finite number
    under ``"score"`` (``"n"`` defaults to ``len(rows)``). A spec that does not
    parse, a module that fails to import, a missing function, an exception inside
    it or a result without a score all raise :class:`InvalidArgument` with a
    one-line message naming the spec. ``batch_size`` is not passed on."""
    module_name, fn_name = _parse_spec(spec)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # anything the module's import runs can fail
        raise InvalidArgument(
            f"custom evaluator {spec!r}: cannot import {module_name!r} ({_one_line(e)}); "
            "make the module importable (installed, or on PYTHONPATH)"
        ) from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise InvalidArgument(f"custom evaluator {spec!r}: module {module_name!r} has no function {fn_name!r}")
    try:
        with runtime.inference(device):
            result = fn(model, tokenizer, rows, params, device)
    except PatchctlError:
        raise
    except Exception as e:
        raise InvalidArgument(f"custom evaluator {spec!r} failed: {_one_line(e)}") from e
    score = result.get("score") if isinstance(result, dict) else None
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise InvalidArgument(
            f"custom evaluator {spec!r} returned {type(result).__name__} without a finite "
            "number under 'score'; return a dict like {'score': 0.9}"
        )
    return {"n": len(rows), **result, "score": float(score)}


EVALUATORS: dict[str, Evaluator] = {
    "classification": classification,
    "lm-loss": lm_loss,
    "multiple-choice": multiple_choice,
    "exact-match": exact_match,
}
"""Built-in task types and their evaluators; ``python:module:function`` is custom."""


def evaluate(
    task_type: str,
    model: Any,
    tokenizer: Any,
    rows: Rows,
    params: dict[str, Any] | None,
    device: str,
    batch_size: int | None = None,
    num_threads: int | None = None,
) -> Metrics:
    """Evaluate ``model`` on ``rows`` as ``task_type`` and return its metrics.

    ``task_type`` is a key of :data:`EVALUATORS` or ``python:module:function``.
    Puts the model in eval mode (and restores its mode after); ``batch_size``
    defaults to :data:`runtime.DEFAULT_BATCH_SIZE`. On CPU torch's thread count is
    ``num_threads`` (default :data:`runtime.DEFAULT_CPU_THREADS`) for the call.
    Raises :class:`InvalidArgument` for an unknown type or bad rows/params."""
    if task_type.startswith("python:"):
        fn: Callable[..., Metrics] | None = None
    elif task_type in EVALUATORS:
        fn = EVALUATORS[task_type]
    else:
        raise InvalidArgument(
            f"unknown task type {task_type!r}; use one of {sorted(EVALUATORS)} "
            "or 'python:module:function'"
        )
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"{task_type}: params must be an object, not {type(params).__name__}")
    batch_size = runtime.DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgument(f"batch size {batch_size!r} is not valid; use 1 or more")
    if not runtime.is_cuda(device) and num_threads is None:
        num_threads = runtime.DEFAULT_CPU_THREADS
    was_training = model.training
    model.eval()
    try:
        with runtime.threads(None if runtime.is_cuda(device) else num_threads):
            if fn is None:
                return custom(task_type, model, tokenizer, rows, params, device, batch_size)
            return fn(model, tokenizer, rows, params, device, batch_size)
    finally:
        model.train(was_training)
