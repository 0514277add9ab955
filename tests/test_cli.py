"""The command line: help everywhere, one-line errors, every shipped config parses."""

from pathlib import Path

import pytest

from brainit_pl import __version__
from brainit_pl.cli import LIGHTNING_COMMANDS, PROJECT_COMMANDS, main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


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


@pytest.mark.parametrize("tty", [True, False])
def test_lightning_progress_bar_only_on_a_terminal(tty, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    config = Path(__file__).parents[1] / "configs" / "sim" / "bit_semantic.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    assert f"enable_progress_bar: {str(tty).lower()}" in capsys.readouterr().out
