"""The one device grammar of patchctl: ``cpu``, ``cuda``, ``cuda:N`` and ``auto``.

:func:`problem` checks the spelling alone (no torch: the CLI checks flags
before anything heavy is imported); :func:`resolve` also checks that the
device is present. ``None`` and ``auto`` pick ``cuda`` when torch sees a GPU,
else ``cpu``. Merging, composing in memory and evaluating all go through
here, so they accept and refuse the same names with the same messages; only
the remedy named in the message differs (``--device cpu`` on the CLI,
``device='cpu'`` in the Python API).
"""

from __future__ import annotations

import re

from patchctl.errors import DeviceUnavailable, InvalidArgument

NAME_RE = re.compile(r"cpu|auto|cuda(?::(\d+))?")


def problem(device: object) -> str | None:
    """Why ``device`` is not a device name (None when it is one, or None itself)."""
    if device is None or (isinstance(device, str) and NAME_RE.fullmatch(device)):
        return None
    return f"unknown device {device!r}: choose cpu, cuda, cuda:N or auto"


def resolve(device: object, *, remedy: str = "--device cpu") -> str:
    """The device to run on, as a string torch takes; present, or :class:`DeviceUnavailable`.

    ``device`` may also be a ``torch.device``. ``remedy`` is what the message tells
    the user to ask for instead of an absent GPU.
    """
    if device is not None and not isinstance(device, str):
        device = str(device)  # a torch.device
    why = problem(device)
    if why is not None:
        raise InvalidArgument(why)
    if device == "cpu":
        return "cpu"
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {device!r} was asked for but no CUDA device is present; use {remedy}")
    index = device.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise DeviceUnavailable(
            f"device {device!r} was asked for but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


__all__ = ["NAME_RE", "problem", "resolve"]
