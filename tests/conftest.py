"""The suite's default config is the random test model (tests/random.yaml), not the shipped world model: most
tests exercise the pipeline, and its random weights are built in code in milliseconds. Tests of the world model
name config `tiny`; child processes get `--config clirun.RANDOM` explicitly."""

import pytest

import pfgen.config
from clirun import RANDOM


@pytest.fixture(autouse=True, scope="session")
def random_default_config():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pfgen.config, "DEFAULT_CONFIG", RANDOM)
        yield
