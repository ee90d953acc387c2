"""Where and how evaluations run: the device, the model loader, torch's threads.

One device is picked once per evaluation (``cuda`` when present, else ``cpu``) and
named in what is recorded. On CUDA forward passes run under bf16 autocast with the
weights in float32; on CPU everything is float32 and the thread count is set on
purpose (:data:`DEFAULT_CPU_THREADS`). Every forward pass runs under
``torch.inference_mode()`` with the model in eval mode, so there is no dropout and
the same model and rows give the same numbers.

Needs the ``runtime`` extra (transformers). Nothing here touches the network: the
model comes from a local Hugging Face folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from patchctl.errors import InvalidArgument, InvalidCheckpoint
from patchctl.patches.device import resolve

DEFAULT_CPU_THREADS = 1
"""Torch intra-op threads for evaluation on CPU. Measured on the 2-vCPU dev
machines (shared, busy), batch 64, threads 1 and 2 interleaved: one thread was
1.85x faster on MiniLM classification and 2.0x faster on SmolLM2-135M lm-loss."""

DEFAULT_BATCH_SIZE = 64
"""Rows (or sequences) per forward pass when the caller names no batch size."""

# Task type -> transformers auto class. Custom evaluators (``python:...``) get a
# causal LM unless the caller loads the model some other way.
_MODEL_CLASSES = {
    "classification": "AutoModel",
    "lm-loss": "AutoModelForCausalLM",
    "multiple-choice": "AutoModelForCausalLM",
    "exact-match": "AutoModelForCausalLM",
}


def pick_device(device: str | None) -> str:
    """The device to evaluate on (:func:`patchctl.patches.device.resolve`): ``None`` or ``auto``
    gives ``"cuda"`` if torch sees a GPU, else ``"cpu"``; ``"cpu"``, ``"cuda"`` and ``"cuda:N"``
    are checked and returned.

    Raises :class:`DeviceUnavailable` for CUDA on a machine without it and
    :class:`InvalidArgument` for any other name."""
    return resolve(device, remedy="--device cpu, or leave the device out to pick one")


def device_name(device: str) -> str:
    """What to record as the device: ``"cpu"`` or the GPU's name (``NVIDIA H100 ...``)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def is_cuda(device: str) -> bool:
    """True for ``"cuda"`` and ``"cuda:N"``."""
    return device.startswith("cuda")


def model_class_for(task_type: str) -> Any:
    """The transformers auto class that loads the model a task type needs:
    ``AutoModel`` (an encoder) for classification, ``AutoModelForCausalLM`` for
    lm-loss, multiple-choice, exact-match and custom ``python:`` evaluators."""
    import transformers

    if task_type.startswith("python:"):
        return transformers.AutoModelForCausalLM
    if task_type not in _MODEL_CLASSES:
        raise InvalidArgument(
            f"unknown task type {task_type!r}; use one of {sorted(_MODEL_CLASSES)} "
            "or 'python:module:function'"
        )
    return getattr(transformers, _MODEL_CLASSES[task_type])


def load_model(
    base_dir: str | os.PathLike[str],
    task_type: str,
    device: str,
    dtype: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from the local HF folder ``base_dir`` for a task type.

    The model is in eval mode on ``device``, its weights in ``dtype`` (float32 when
    None: on CUDA the evaluators add bf16 autocast themselves). Raises
    :class:`InvalidCheckpoint` if the folder has no config or tokenizer."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # patchctl draws its own progress; keep stderr to errors
    path = os.fspath(base_dir)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InvalidCheckpoint(f"{path!r} has no config.json; give a Hugging Face model folder")
    cls = model_class_for(task_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InvalidCheckpoint(f"cannot load a tokenizer from {path!r}: {e}") from e
    model = cls.from_pretrained(path, dtype=dtype or torch.float32)
    model.to(torch.device(device))
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op CPU thread count to ``n`` for the block, then restore it.

    ``None`` leaves it as it is."""
    old = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise InvalidArgument(f"thread count {n} is not valid; use 1 or more")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


@contextlib.contextmanager
def inference(device: str) -> Iterator[None]:
    """No autograd (``torch.inference_mode``) and, on CUDA, bf16 autocast."""
    with torch.inference_mode():
        if is_cuda(device):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield
