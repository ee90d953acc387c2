"""Load a base model with a LoRA from the registry, in memory, and compare with peft.

    python examples/load_and_compare.py

``patchctl.load(base, ["wordnet:v1"])`` checks the patch's base fingerprint,
loads the base with transformers and adds the LoRA's ``B @ A * scaling`` to
each target weight in place. The result is compared, tensor by tensor, with
what peft's ``merge_and_unload`` makes of the same adapter.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from _setup import accuracy, make_registry

import patchctl


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        reg, base = make_registry(Path(tmp))
        print("registry:", ", ".join(f"{r['name']}:{r['tag']} ({r['kind']}, {r['params']} params)" for r in reg.ls()))

        model = patchctl.load(base, ["wordnet:v1"], registry=reg, device="cpu")

        from peft import PeftModel
        from transformers import AutoModel

        peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), Path(tmp) / "wordnet")
        want = peft_model.merge_and_unload().state_dict()
        got = model.state_dict()
        same = sum(torch.equal(got[k], want[k]) for k in want)
        print(f"patchctl.load vs peft merge_and_unload: {same} of {len(want)} tensors bit-identical")

        print(f"wordnet accuracy: base {accuracy(patchctl.load(base, device='cpu'), 'wordnet'):.3f}, "
              f"base + wordnet:v1 {accuracy(model, 'wordnet'):.3f}")
        if same != len(want):
            raise SystemExit("mismatch")
        reg.close()


if __name__ == "__main__":
    main()
