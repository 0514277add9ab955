"""The command line: help everywhere, one-line errors, every shipped config parses."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from brainit_pl import __version__
from brainit_pl.cli import LIGHTNING_COMMANDS, PROJECT_COMMANDS, _job_parser, main

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*LIGHTNING_COMMANDS, *PROJECT_COMMANDS]:
        assert f"  {name}" in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_unknown_command_is_one_line(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'frobnicate'" in err


@pytest.mark.parametrize("name", sorted(PROJECT_COMMANDS))
def test_project_command_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"brainit-pl {name}" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(LIGHTNING_COMMANDS))
def test_lightning_command_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "--data.store" in capsys.readouterr().out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_parses(config, capsys):
    # --print_config validates the YAML against the typed constructors without instantiating anything.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path" in capsys.readouterr().out


def test_config_command_lists_shows_and_copies(tmp_path, capsys):
    assert main(["config", "list"]) == 0
    names = capsys.readouterr().out.split()
    assert "subj01" in names and "sim/bit_tiny" in names and len(names) == len(CONFIGS)
    assert main(["config", "show", "sim/bit_tiny"]) == 0
    assert capsys.readouterr().out == (ROOT / "configs" / "sim" / "bit_tiny.yaml").read_text()
    assert main(["config", "copy", "subj01", str(tmp_path)]) == 0
    assert (tmp_path / "subj01.yaml").read_text() == (ROOT / "configs" / "subj01.yaml").read_text()
    assert main(["config", "copy", "subj01", str(tmp_path)]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option",
    [["--config", "sim/bit_tiny"], ["--config=sim/bit_tiny.yaml"], ["-c", "configs/sim/bit_tiny.yaml"]],
)
def test_fit_config_takes_a_packaged_name(option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the checkout: configs/... is no path here
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *option, "--print_config"])
    assert exit_info.value.code == 0
    assert "BITModule" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "--config", "nonexistent.yaml"], "no such file, and no packaged config"),
        (["fit", "--config", "sim/bit_tiny", "--trainer.max_epochs", "abc"], "Given value: abc"),
        (["test", "--config", "sim/bit_tiny", "--trainer.bogus", "1"], "unrecognized arguments"),
        (["demo", "--seed", "abc"], "invalid int value"),
        (["prepare", "--out", "x"], "one of the arguments"),
        (["demo", "--config", "nonexistent.yaml"], "no such file"),
        (["demo", "--set", "sed=1"], "unknown option(s) sed"),
    ],
)
def test_bad_options_are_one_line(argv, message, stderr_lines):
    try:
        status = main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        status = exit_info.code
    assert status == 2
    lines = stderr_lines()
    assert len(lines) == 1 and message in lines[0], lines


def test_job_options_from_yaml_with_interpolation_and_dotlist(tmp_path, capsys):
    job = tmp_path / "prepare.yaml"
    job.write_text("nsd-root: /data/nsd\nout: ${nsd-root}/store\nsessions: 2\n")
    argv = ["prepare", "--config", str(job), "--set", "sessions=3", "subjects=[1,2]", "--print-config"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "out: /data/nsd/store" in printed and "sessions: 3" in printed and "- 2" in printed
    (tmp_path / "again.yaml").write_text(printed)  # --print-config's output is a --config file
    assert (
        main(["prepare", "--config", str(tmp_path / "again.yaml"), "--out", "elsewhere", "--print-config"])
        == 0
    )
    again = capsys.readouterr().out
    assert "out: elsewhere" in again and "sessions: 3" in again  # the command line wins


@pytest.mark.parametrize("name", sorted(PROJECT_COMMANDS))
def test_help_texts_state_defaults_one_way(name):
    module = importlib.import_module(PROJECT_COMMANDS[name][0])
    parser = _job_parser(name, module, "")
    for action in parser._actions:
        assert not re.search(r"\[[^\]]*\]\s*$", action.help or ""), f"{action.dest}: write (default: ...)"
    assert "(default: " in parser.format_help() or name == "config"


def test_project_help_imports_no_torch():
    """Every job's parser is built without torch or Lightning (`--help` in well under 2 s:
    benchmarks/cli_help.py)."""
    code = (
        "import importlib, sys\n"
        "from brainit_pl.cli import PROJECT_COMMANDS, _job_parser\n"
        "for name, (module, _) in PROJECT_COMMANDS.items():\n"
        "    _job_parser(name, importlib.import_module(module), '').format_help()\n"
        "print(sorted(m for m in ('torch', 'lightning', 'torchmetrics') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("tty", [True, False])
def test_lightning_progress_bar_only_on_a_terminal(tty, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    config = Path(__file__).parents[1] / "configs" / "sim" / "bit_semantic.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    assert f"enable_progress_bar: {str(tty).lower()}" in capsys.readouterr().out
