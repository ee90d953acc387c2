"""What a new user meets in the first hour (issue #22): readable tables, instant everyday
commands, one-line errors, export to a file, empty tags refused."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from patchctl.errors import InvalidReference
from patchctl.registry.store.names import parse_ref

from .conftest import run_cli_process

LONG = "team-research/multilingual-sentence-encoder-adapters/wordnet-hypernymy"
TAGS = ["v1", "v2-with-a-rather-long-release-candidate-tag", "latest"]


@pytest.fixture
def filled(cli, models):
    """A registry with long names and tags (a LoRA and a diff)."""
    assert cli("push", models.lora, f"{LONG}:v1", "--base", models.base).code == 0
    assert cli("tag", f"{LONG}:v1", f"{LONG}:{TAGS[1]}").code == 0
    r = cli("push", models.finetune, "ft:v1", "--base", models.base, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)["digest"]


# -- tables never cut names ------------------------------------------------------------


def test_ls_at_80_columns_in_a_pipe_shows_every_full_name_tag(filled, reg_path):
    p = run_cli_process("ls", "--registry", reg_path, env={"COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    for tag in TAGS:
        assert f"{LONG}:{tag}" in p.stdout.splitlines()
    assert "ft:v1" in p.stdout
    assert all(len(line) <= 80 for line in p.stdout.splitlines() if LONG not in line)
    assert re.search(r"\bsha256:[0-9a-f]{12}\b", p.stdout)


def test_ls_at_80_columns_drops_columns_before_cutting_names(cli, filled, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = cli("ls").out
    assert "UPDATED" not in out.splitlines()[0]  # dropped first
    for tag in TAGS:
        assert f"{LONG}:{tag}" in out
    wide = cli("ls", "--wide").out
    assert "UPDATED" in wide.splitlines()[0] and filled in wide  # --wide: every column, full digests


def test_ls_in_a_pipe_without_columns_keeps_every_column(filled, reg_path):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    p = subprocess.run([sys.executable, "-m", "patchctl", "ls", "--registry", str(reg_path)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.stdout.splitlines()[0].split() == ["NAME:TAG", "DIGEST", "KIND", "BASE", "PARAMS", "SIZE", "UPDATED"]


def test_show_tensors_at_80_columns_keeps_full_tensor_names(cli, filled, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    r = cli("show", f"{LONG}:v1", "--tensors", "--json")
    names = json.loads(r.out)["tensors"]
    out = cli("show", f"{LONG}:v1", "--tensors").out
    for name in names:
        assert name in out.split(), name


def test_push_output_is_not_cut_or_wrapped(models, reg_path):
    p = run_cli_process("push", models.lora, f"{LONG}:{TAGS[1]}", "--base", models.base, "--registry", reg_path,
                        env={"COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"pushed {LONG}:{TAGS[1]} sha256:") and len(p.stdout.splitlines()) == 1


def test_push_prints_the_ref_it_stored(cli, models):
    assert cli("push", models.lora, "math", "--base", models.base).out.startswith("pushed math:latest sha256:")


# -- digests: a fixed 12-hex prefix that every ref-taking command accepts --------------------


def test_ls_digest_prefix_is_accepted_by_show_tag_and_export(cli, filled, tmp_path):
    row = [ln for ln in cli("ls").out.splitlines() if ln.startswith("ft:v1")][0]
    prefix = re.search(r"sha256:[0-9a-f]+", row).group(0)
    assert len(prefix) == len("sha256:") + 12 and filled.startswith(prefix)
    assert json.loads(cli("show", prefix, "--json").out)["digest"] == filled
    assert filled in cli("show", prefix).out
    assert cli("tag", prefix, "ft:short").out == f"ft:short -> {filled}\n"
    assert cli("export", prefix, tmp_path / "d.safetensors").code == 0
    assert json.loads(cli("show", filled[:11], "--json").out)["digest"] == filled  # 4 hex digits suffice


def test_bad_digest_prefix_is_one_line(cli, filled):
    r = cli("show", "sha256:ab")
    assert r.code != 0 and r.err == "error: invalid digest 'sha256:ab'\n"
    r = cli("show", "sha256:" + "f" * 12)
    assert r.code != 0 and r.err.count("\n") == 1 and "no patch matches" in r.err


# -- the fast path: same output as the typer commands, no heavy imports ------------------------------


def _commands(long_digest: str) -> list[list[str]]:
    return [["ls"], ["ls", "--json"], ["ls", "--wide"], ["show", "ft:v1"], ["show", "ft:v1", "--json"],
            ["show", f"{LONG}:v1", "--tensors"], ["show", long_digest[:19], "--wide"], ["log", "ft:v1"],
            ["log", f"{LONG}:v1", "--json"], ["remote", "ls"], ["remote", "ls", "--json"], ["show", "nope:v1"],
            ["log", "ft:"]]


def test_fast_path_prints_exactly_what_typer_prints(cli, filled, monkeypatch):
    import patchctl.cli.main as cli_main

    monkeypatch.setenv("COLUMNS", "80")
    assert cli("remote", "add", "origin", "http://127.0.0.1:9/").code == 0
    for args in _commands(filled):
        fast = cli(*args)
        with monkeypatch.context() as m:
            m.setattr(cli_main, "_fast", lambda _args: None)
            slow = cli(*args)
        assert (fast.code, fast.out, fast.err) == (slow.code, slow.out, slow.err), args
    outs = []
    for typer_path in (False, True):
        with monkeypatch.context() as m:
            if typer_path:
                m.setattr(cli_main, "_fast", lambda _args: None)
            outs.append([cli("tag", "ft:v1", "ft:a", "-m", "x"), cli("rm", "ft:a")])
    assert [(r.code, r.out) for r in outs[0]] == [(r.code, r.out) for r in outs[1]]
    assert outs[0][0].out == f"ft:a -> {filled}\n" and outs[0][1].out == f"removed ft:a (was {filled})\n"
    assert [h["message"] for h in json.loads(cli("log", "ft:a", "--json").out)["history"]] == ["x", "rm", "x", "rm"]


@pytest.mark.parametrize("args", [["ls", "--help"], ["ls", "--bogus"], ["show"], ["tag", "a:b"], ["rm", "--", "x"],
                                  ["remote", "ls", "extra"]])
def test_fast_path_leaves_anything_else_to_typer(args):
    from patchctl.cli.main import parse_fast

    assert parse_fast(args) is None


def test_everyday_commands_import_neither_typer_nor_rich_nor_torch(filled, reg_path):
    reg = str(reg_path)
    code = (
        "import sys; from patchctl.cli.main import main\n"
        "for a in (['ls'], ['show', 'ft:v1', '--tensors'], ['log', 'ft:v1'], ['remote', 'ls'], ['ls', '--json']):\n"
        f"    assert main(a + ['--registry', {reg!r}]) == 0, a\n"
        "heavy = [m for m in ('typer', 'pydantic', 'rich', 'torch', 'sqlite_utils') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "for a in (['tag', 'ft:v1', 'ft:b'], ['rm', 'ft:b']):\n"
        f"    assert main(a + ['--registry', {reg!r}]) == 0, a\n"
        "heavy = [m for m in ('typer', 'pydantic', 'rich', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_help_works_without_torch():
    code = ("import sys; from patchctl.cli.main import main; rc = main(['--help']); "
            "assert rc == 0 and 'torch' not in sys.modules, (rc, 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "push" in p.stdout and "ls" in p.stdout


# -- one-line errors ---------------------------------------------------------------------------


def test_serve_port_out_of_range_is_one_line(tmp_path):
    p = run_cli_process("serve", "--port", "99999", "--registry", tmp_path / "reg")
    assert p.returncode == 1
    assert p.stderr == "error: port 99999 is out of range: use 1-65535 (0 picks a free one)\n"


def test_serve_on_a_busy_port_is_one_line_and_says_nothing_of_serving(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        p = run_cli_process("serve", "--port", port, "--registry", tmp_path / "reg", timeout=60)
    assert p.returncode == 1 and "serving" not in p.stderr
    assert p.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and p.stderr.count("\n") == 1
    assert p.stderr.rstrip().endswith("pick another --port (0 picks a free one)")


@pytest.mark.parametrize("argv, method", [(["ls"], "ls"), (["push", "x", "y:z"], "push")])  # fast path, typer path
def test_ctrl_c_prints_interrupted_and_exits_130(tmp_path, argv, method):
    code = (
        "import sys, time; from patchctl.registry.registry import Registry\n"
        f"def slow(self, *a, **k):\n    print('ready', flush=True); time.sleep(60)\n"
        f"Registry.{method} = slow\n"
        "from patchctl.cli.main import main\n"
        f"sys.exit(main({argv!r} + ['--registry', {str(tmp_path / 'reg')!r}]))\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as p:
        try:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
            time.sleep(0.2)
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=60)
        finally:
            p.kill()
    assert p.returncode == 130 and err.strip() == "interrupted"


def test_ls_into_a_closed_pipe_exits_quietly(filled, reg_path):
    with subprocess.Popen([sys.executable, "-m", "patchctl", "ls", "--registry", str(reg_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        assert p.stdout is not None and p.stderr is not None
        p.stdout.close()  # the reader is gone before anything is written (`patchctl ls | true`)
        err = p.stderr.read()
    assert p.returncode == 1 and err == b""


def test_empty_tag_is_refused_at_parse_time():
    with pytest.raises(InvalidReference, match=r"^empty tag in 'name:': write NAME:TAG, or NAME alone for NAME:latest$"):
        parse_ref("name:")
    assert str(parse_ref("name")) == "name:latest"


def test_push_with_empty_tag_is_one_line_and_stores_nothing(cli, models):
    r = cli("push", models.lora, "name:", "--base", models.base)
    assert r.code != 0 and r.err == "error: empty tag in 'name:': write NAME:TAG, or NAME alone for NAME:latest\n"
    assert json.loads(cli("ls", "--json").out) == []


# -- export of a LoRA to a .safetensors path -------------------------------------------------------


def test_export_lora_to_safetensors_path_writes_the_dense_delta(cli, models, tmp_path):
    from safetensors.torch import load_file

    assert cli("push", models.lora, "lora:v1", "--base", models.base).code == 0
    out = tmp_path / "x.safetensors"
    r = cli("export", "lora:v1", out)
    assert r.code == 0, r.err
    assert out.is_file()
    tensors = load_file(out)
    assert tensors and not any("lora_" in k for k in tensors)
    assert all(t.dtype.is_floating_point and t.dim() == 2 for t in tensors.values())
    assert cli("export", "lora:v1", tmp_path / "peft").code == 0 and (tmp_path / "peft").is_dir()


def test_export_peft_to_safetensors_path_refuses_naming_format_diff(cli, models, tmp_path):
    assert cli("push", models.lora, "lora:v1", "--base", models.base).code == 0
    r = cli("export", "lora:v1", tmp_path / "x.safetensors", "--format", "peft")
    assert r.code != 0 and r.err.count("\n") == 1 and "--format diff" in r.err
    assert not (tmp_path / "x.safetensors").exists()


def test_the_base_block_names_no_local_folder_and_non_finite_values_are_refused(registry, models, tmp_path):
    import json as _json
    import shutil

    import torch
    from safetensors.torch import save_file

    from patchctl.errors import InvalidPatch
    from patchctl.registry.store.names import parse_ref

    # a PEFT adapter whose config names the trainer's absolute base folder (as PEFT writes it)
    ada = tmp_path / "ada"
    shutil.copytree(models.lora, ada)
    cfg = _json.loads((ada / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(models.base.resolve())
    (ada / "adapter_config.json").write_text(_json.dumps(cfg))
    d = registry.push(ada, "abs:v1", base=models.base)
    m = registry.manifest(d)
    # the manifest's base block names no folder (the adapter's own config, kept for a byte-exact
    # PEFT export, still holds what PEFT wrote there: a known gap)
    assert str(models.base.resolve()) not in _json.dumps(m.base) and m.base["name"] == models.base.name
    # pushed from another folder, the same adapter is the same patch
    ada2 = tmp_path / "elsewhere" / "ada"
    shutil.copytree(ada, ada2)
    assert registry.push(ada2, "abs:v2", base=models.base) == d
    # NaN and Inf are refused with the tensor named, and no tag moves
    from patchctl.registry.formats.checkpoint import Checkpoint

    ck = Checkpoint(models.base)
    name = next(n for n in ck.names() if n.endswith("layer.0.attention.self.query.weight"))
    for bad in (float("nan"), float("inf")):
        t = torch.zeros(ck.info(name).shape)
        t[1, 2] = bad
        save_file({name: t}, tmp_path / "bad.safetensors")
        with pytest.raises(InvalidPatch, match=f"tensor '{name}' contains NaN or Inf"):
            registry.push(tmp_path / "bad.safetensors", "bad:v1", base=models.base)
        assert registry.store.ref_target(parse_ref("bad:v1")) is None
