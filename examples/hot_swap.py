"""Load a base once, then swap patches in and out of it in place.

    python examples/hot_swap.py

``patchctl.apply(model, patches)`` changes the weights in place and returns a
handle; ``handle.switch(other)`` moves to another patch set (or a merge of
several) without reloading the base; leaving the ``with`` block (or
``handle.remove()``) puts the original weights back bit for bit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from _setup import accuracy, make_registry

import patchctl


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        reg, base = make_registry(Path(tmp), names=("wordnet", "fortunes"))
        model = patchctl.load(base, device="cpu")  # the base alone, loaded once
        before = {k: v.clone() for k, v in model.state_dict().items()}

        def report(label: str) -> None:
            print(f"{label:<28} wordnet {accuracy(model, 'wordnet'):.3f}  fortunes {accuracy(model, 'fortunes'):.3f}")

        report("base")
        with patchctl.apply(model, ["wordnet:v1"], registry=reg) as h:
            report("base + wordnet:v1")
            h.switch(["fortunes:v1"])
            report("base + fortunes:v1")
            h.switch(["wordnet:v1", "fortunes:v1"], method="task_arithmetic")
            report("base + both (task arithmetic)")
            print(f"{len(h.touched)} tensors patched, originals kept on the CPU")
        restored = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        print(f"base restored bit for bit: {restored}")
        reg.close()
        if not restored:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
