"""The CLI: every command has help, the main flows work, output is parseable under --json."""

from __future__ import annotations

import json

import pytest

from patchctl.cli.main import app

from .conftest import run_cli_process


def test_every_command_has_help(cli):
    import typer.main

    group = typer.main.get_command(app)
    names = sorted(group.commands)  # type: ignore[attr-defined]
    assert {"init", "push", "ls", "show", "log", "tag", "rm", "gc", "fsck", "export", "apply"} <= set(names)
    for name in names:
        r = cli(name, "--help", registry=False)
        assert r.code == 0, name
        assert "Usage" in r.out and len(group.commands[name].help or "") > 10, name  # type: ignore[attr-defined]


def test_cli_push_ls_show_log_json(cli, models):
    r = cli("push", models.finetune, "ft:v1", "--base", models.base, "-m", "first", "--meta", "task=wordnet", "--json")
    assert r.code == 0, r.err
    digest = json.loads(r.out)["digest"]
    rows = json.loads(cli("ls", "--json").out)
    assert {(x["name"], x["tag"], x["digest"]) for x in rows} == {("ft", "v1", digest), ("ft", "latest", digest)}
    info = json.loads(cli("show", "ft:v1", "--json").out)
    assert info["digest"] == digest and info["metadata"] == {"task": "wordnet"} and info["kind"] == "diff"
    log = json.loads(cli("log", "ft:v1", "--json").out)
    assert [h["message"] for h in log["history"]] == ["first"]
    human = cli("show", "ft:v1")
    assert digest in human.out and "diff" in human.out
    assert "ft:v1" in cli("ls").out


def test_cli_tag_rm_export_apply_gc_fsck(cli, models, tmp_path):
    assert cli("push", models.lora, "lora:v1", "--base", models.base).code == 0
    assert cli("tag", "lora:v1", "lora:prod").code == 0
    assert cli("export", "lora:prod", tmp_path / "peft").code == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert cli("apply", "lora:prod", tmp_path / "full", "--base", models.base).code == 0
    assert (tmp_path / "full" / "model.safetensors").is_file()
    assert cli("rm", "lora:prod").code == 0
    assert cli("show", "lora:prod").code != 0
    assert cli("gc", "--dry-run", "--json").code == 0
    r = cli("fsck", "--json")
    assert r.code == 0 and json.loads(r.out)["ok"]


def test_cli_process_user_error_is_one_line_and_nonzero(tmp_path):
    p = run_cli_process("show", "nope:v1", "--registry", tmp_path / "reg")
    assert p.returncode == 2
    assert p.stderr.strip() == "error: no patch named nope:v1; `patchctl ls` lists them"
    assert "Traceback" not in p.stderr


def test_metadata_commands_do_not_import_torch(tmp_path):
    code = (
        "import sys; from patchctl.cli.main import main; "
        f"main(['ls', '--registry', {str(tmp_path / 'r')!r}]); "
        "main(['init', '--registry', " + repr(str(tmp_path / 'r')) + "]); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("args", [["push", "--help"], ["ls", "--help"]])
def test_help_mentions_registry_option(cli, args):
    assert "--registry" in cli(*args, registry=False).out
