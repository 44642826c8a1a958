import re
import subprocess
import sys

import pytest

from glade.cli import COMMANDS, main

# The commands' modules and what only they pull in; `glade --help` must not wait for them.
HEAVY_MODULES = [
    "glade.generate", "glade.inspection", "glade.params_command", "glade.conversion", "glade.training.hub",
    "glade.training.tokenizer", "glade.training.pretrain", "matplotlib", "datasets",
]


@pytest.mark.slow
def test_help_lists_every_command_without_importing_their_modules():
    code = (
        "import sys; from glade.cli import build_parser; build_parser().format_help(); "
        f"print([name for name in {HEAVY_MODULES!r} if name in sys.modules])"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"

    result = subprocess.run([sys.executable, "-m", "glade.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"^    (\S+)", result.stdout, re.MULTILINE))  # wrapped help lines are indented more
    assert listed == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_gets_its_arguments_when_it_runs(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith(f"usage: glade {command}") and usage.count("\n") > 4


def test_an_unknown_command_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generat", "hi"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'generat'" in capsys.readouterr().err
