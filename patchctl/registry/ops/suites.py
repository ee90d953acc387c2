"""Eval suites: labelled data stored in the registry like patches.

A suite is a manifest of kind ``suite``: its ``base`` is the base model it is
for, its tensor table holds the data (``data``: the rows as canonical JSON
lines, a ``uint8`` blob) and, for classification, the class head (``head``:
float32 ``[C, H]``), and its ``params`` say how to evaluate it::

    {"task": "classification" | "lm-loss" | "multiple-choice" | "exact-match"
             | "python:module:function",
     "labels": [...], "rows": N, "splits": {"test": n, "validation": m},
     "max_len": 128, "batch_size": 64}

Row formats (JSONL, one object a line; ``split`` is optional, default ``test``):

- classification: ``{"text": str, "label": int | str}`` (a string label must be
  one of ``--labels``)
- lm-loss: ``{"text": str}``
- multiple-choice: ``{"prompt": str, "choices": [str, ...], "answer": int}``
- exact-match: ``{"prompt": str, "answer": str}``
- python:module:function: any object; the function gets the rows as they are.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchctl.errors import InvalidArgument, InvalidPatch
from patchctl.registry.formats import canonical
from patchctl.registry.formats.bases import base_doc
from patchctl.registry.formats.checkpoint import Checkpoint
from patchctl.registry.formats.safetensors import SafetensorsFile, bytes_to_tensor
from patchctl.registry.store.manifest import Manifest, TensorEntry
from patchctl.registry.store.names import parse_ref

if TYPE_CHECKING:
    import torch

    from patchctl.registry.store.repository import Repository

TASK_TYPES = ("classification", "lm-loss", "multiple-choice", "exact-match")
SPLITS = ("train", "validation", "test")
MAX_ROWS = 1_000_000


def check_task_type(task: str) -> str:
    if task in TASK_TYPES:
        return task
    if task.startswith("python:"):
        parts = task.split(":")
        if len(parts) == 3 and all(p and p.replace(".", "").replace("_", "").isalnum() for p in parts[1:]):
            return task
    raise InvalidArgument(
        f"unknown task type {task!r}: choose one of {', '.join(TASK_TYPES)}, or python:module:function"
    )


def parse_rows(data: bytes, task: str, labels: list[str] | None = None, where: str = "suite") -> list[dict[str, Any]]:
    """Parse and check JSONL rows for ``task``; an error names the line."""
    rows: list[dict[str, Any]] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPatch(f"{where}: not UTF-8 text") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidPatch(f"{where}: line {lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InvalidPatch(f"{where}: line {lineno}: expected a JSON object")
        _check_row(row, task, labels, f"{where}: line {lineno}")
        rows.append(row)
        if len(rows) > MAX_ROWS:
            raise InvalidPatch(f"{where}: more than {MAX_ROWS} rows")
    if not rows:
        raise InvalidPatch(f"{where}: no rows")
    return rows


def _str(row: dict[str, Any], key: str, where: str) -> None:
    if not isinstance(row.get(key), str):
        raise InvalidPatch(f"{where}: {key!r} must be a string")


def _check_row(row: dict[str, Any], task: str, labels: list[str] | None, where: str) -> None:
    split = row.get("split", "test")
    if split not in SPLITS:
        raise InvalidPatch(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    if task == "classification":
        _str(row, "text", where)
        lab = row.get("label")
        if isinstance(lab, str):
            if not labels or lab not in labels:
                raise InvalidPatch(f"{where}: label {lab!r} is not one of the suite's labels")
        elif not isinstance(lab, int) or isinstance(lab, bool) or lab < 0 or (labels and lab >= len(labels)):
            raise InvalidPatch(f"{where}: label must be a class index or name, got {lab!r}")
    elif task == "lm-loss":
        _str(row, "text", where)
    elif task == "multiple-choice":
        _str(row, "prompt", where)
        ch = row.get("choices")
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
            raise InvalidPatch(f"{where}: 'choices' must be a list of at least two strings")
        a = row.get("answer")
        if not isinstance(a, int) or isinstance(a, bool) or not 0 <= a < len(ch):
            raise InvalidPatch(f"{where}: 'answer' must index 'choices', got {a!r}")
    elif task == "exact-match":
        _str(row, "prompt", where)
        _str(row, "answer", where)


@dataclass
class Suite:
    digest: str
    manifest: Manifest
    rows: list[dict[str, Any]]
    head: torch.Tensor | None

    @property
    def task(self) -> str:
        return str(self.manifest.params["task"])

    @property
    def params(self) -> dict[str, Any]:
        return self.manifest.params

    def split(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("split", "test") == name]


def push_suite(
    reg: Repository,
    path: str | os.PathLike[str],
    ref: str,
    *,
    task: str,
    base: str | os.PathLike[str],
    labels: list[str] | None = None,
    prompts: list[str] | None = None,
    head: str | os.PathLike[str] | None = None,
    max_len: int = 128,
    message: str = "",
) -> str:
    """Store a JSONL eval suite for ``base``; classification needs ``head`` or ``prompts``."""

    parse_ref(ref)
    task = check_task_type(task)
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read {p}: {e.strerror}") from None
    rows = parse_rows(data, task, labels, where=str(p))
    if labels is None and task == "classification":
        n = max(int(r["label"]) for r in rows) + 1
        labels = [str(i) for i in range(n)]
    if task == "classification":
        assert labels is not None
        rows = [{**r, "label": labels.index(r["label"]) if isinstance(r["label"], str) else r["label"]} for r in rows]
        if prompts is not None and len(prompts) != len(labels):
            raise InvalidArgument(f"{len(prompts)} prompts for {len(labels)} labels")
        if head is None and prompts is None:
            raise InvalidArgument("a classification suite needs its head: --head FILE.safetensors or --prompts FILE.json")
    ckpt = Checkpoint(base)
    head_t = None
    if task == "classification":
        head_t = _load_head(head, len(labels or [])) if head is not None else _prompt_head(ckpt, prompts or [], max_len)
    blob = b"".join(canonical.dumps(r) + b"\n" for r in rows)
    splits: dict[str, int] = {}
    for r in rows:
        splits[r.get("split", "test")] = splits.get(r.get("split", "test"), 0) + 1
    with reg.store.writing():
        digest = reg.store.put_blob(blob)
        tensors = {"data": TensorEntry(digest, "uint8", (len(blob),), "raw", len(blob))}
        if head_t is not None:
            tensors["head"] = reg.put_tensor(head_t)
        params: dict[str, Any] = {"task": task, "rows": len(rows), "splits": splits, "max_len": max_len}
        if labels is not None:
            params["labels"] = labels
        if prompts is not None:
            params["prompts"] = prompts
        m = Manifest("suite", base_doc(ckpt, None, None), tensors, params, (), {"op": "eval-push"}, {})
        return reg.commit(m, ref, message or f"eval push {p.name}")


def _load_head(path: str | os.PathLike[str], n_labels: int) -> torch.Tensor:

    f = SafetensorsFile(path)
    if "head" not in f.tensors:
        raise InvalidArgument(f"{path}: no tensor named 'head'")
    t = f.read("head").float()
    if t.ndim != 2 or t.shape[0] != n_labels:
        raise InvalidArgument(f"{path}: head must be [{n_labels}, hidden], got {list(t.shape)}")
    return t


def _prompt_head(ckpt: Any, prompts: list[str], max_len: int) -> torch.Tensor:
    """20 × the normalized mean-pooled embedding of each class prompt, from the base."""
    from patchctl.evals import runtime
    from patchctl.evals.evaluators import embed

    model, tok = runtime.load_model(ckpt.path, "classification", "cpu")
    return 20.0 * embed(model, tok, prompts, max_len=max_len, device="cpu")


def load_suite(reg: Repository, ref: str) -> Suite:

    digest = reg.resolve(ref)
    m = reg.manifest(digest)
    if m.kind != "suite":
        raise InvalidArgument(f"{ref} is a {m.kind} patch, not an eval suite")
    data = reg.store.read_blob(m.tensors["data"].digest)
    rows = parse_rows(bytes(data), m.params["task"], None, where=f"suite {ref}") if m.params["task"] != "classification" \
        else [json.loads(line) for line in bytes(data).decode().splitlines() if line]
    head = None
    if "head" in m.tensors:
        e = m.tensors["head"]
        head = bytes_to_tensor(reg.store.read_blob(e.digest), e.dtype, e.shape)
    return Suite(digest, m, rows, head)
