"""The step rule of the chunk loop (pfgen/sampling.py) against an fp64 oracle, with a model whose velocity is a
known function: `solver: ode` is Euler on the flow and draws no noise; `renoise` re-noises with fresh noise."""

from dataclasses import replace

import pytest
import torch

from pfgen.config import SamplingConfig, load_config, validate
from pfgen.errors import PfgenError
from pfgen.sampling import ChunkLoop, make_schedule


class Field:
    """A stand-in transformer: v(x, t) = sin(x) * (t / 1000) + 0.1, no cache."""

    def __call__(self, hidden_states, timestep, encoder_hidden_states, return_dict):
        return (torch.sin(hidden_states) * (timestep[0] / 1000) + 0.1,)


class Noise:
    def __init__(self, draws: list | None = None):
        self.draws = draws

    def renoise(self, frames):
        if self.draws is None:
            raise AssertionError("the ode solver drew noise")
        self.draws.append(torch.randn(1, 2, frames, 4, 6, generator=torch.Generator().manual_seed(len(self.draws))))
        return self.draws[-1]


def test_ode_solver_is_euler_on_the_flow():
    cfg = SamplingConfig(timesteps=(1000.0, 800.0, 600.0, 400.0, 200.0), shift=3.0, solver="ode")
    schedule = make_schedule(cfg.timesteps, cfg.shift, cfg.warp)
    x = torch.randn(1, 2, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    out = ChunkLoop(Field(), None, cfg).denoise(x.clone(), schedule, None, Noise())
    oracle = x.double()
    for i, (t, sigma) in enumerate(zip(schedule.timesteps, schedule.sigmas)):
        v = torch.sin(oracle) * (t / 1000) + 0.1
        if i + 1 == len(schedule.sigmas):
            oracle = oracle - sigma * v  # the last x0
        else:
            oracle = oracle - (sigma - schedule.sigmas[i + 1]) * v
    torch.testing.assert_close(out.double(), oracle, atol=1e-5, rtol=0)


def test_renoise_solver_draws_fresh_noise_each_step():
    cfg = SamplingConfig(solver="renoise")
    schedule = make_schedule(cfg.timesteps, cfg.shift, cfg.warp)
    x = torch.randn(1, 2, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    draws = []
    out = ChunkLoop(Field(), None, cfg).denoise(x.clone(), schedule, None, Noise(draws))
    oracle = x.double()
    for i, (t, sigma) in enumerate(zip(schedule.timesteps, schedule.sigmas)):
        x0 = oracle - sigma * (torch.sin(oracle) * (t / 1000) + 0.1)
        if i + 1 == len(schedule.sigmas):
            oracle = x0
        else:
            nxt = schedule.sigmas[i + 1]
            oracle = (1 - nxt) * x0 + nxt * draws[i]
    assert len(draws) == len(schedule.sigmas) - 1
    torch.testing.assert_close(out.double(), oracle, atol=1e-5, rtol=0)


def test_an_unknown_solver_is_refused():
    cfg = load_config(None)
    with pytest.raises(PfgenError, match="sampling.solver.*'euler' is unknown.*renoise, ode"):
        validate(replace(cfg, sampling=replace(cfg.sampling, solver="euler")))
