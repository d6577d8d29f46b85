"""The pfgen command line run in-process, as the tests run it."""

from pathlib import Path

import pytest

from pfgen.cli import main

RANDOM = Path(__file__).with_name("random.yaml")  # the random-weight test model's config (see conftest.py)


def run_cli(args, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `pfgen ARGS`."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err
