"""The README's quick start is what CI runs, and its bundled names exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ")]


def test_readme_has_exactly_two_quick_start_commands():
    install, test = quick_start_commands()
    assert "pip install torch==2.13.0" in install and "pfgen generate" in install
    assert "pip install torch==2.13.0" in test and '".[test]"' in test and "pytest" in test
    assert install.index("torch==2.13.0") < install.index("pip install .")


def test_ci_runs_the_readme_test_command():
    _, test = quick_start_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci


def test_bundled_configs_named_in_readme_exist():
    readme = (ROOT / "README.md").read_text()
    names = re.search(r"a bundled config \(([^)]*)\)", readme).group(1)
    for name in re.findall(r"`([a-z-]+)`", names):
        assert (ROOT / "configs" / f"{name}.yaml").exists(), name
