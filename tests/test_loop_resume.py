"""Each rank's numpy RNG across a resume: rank 0 saves the state, every rank continues its own draws."""

import numpy as np
import pytest

from dilm_ray.config import GeneratorConfig, PretrainConfig
from dilm_ray.data import BUILTIN_TASKS
from dilm_ray.models.generator import build_generator
from dilm_ray.train.loop import set_up_loop
from dilm_ray.train.runtime import Runtime
from dilm_ray.train.state import TrainState

SEED = 7


def _draws(tiny_lm_dir, rank: int, world_size: int, state: TrainState | None) -> np.ndarray:
    """The first draws of the RNG ``set_up_loop`` gives rank ``rank`` (the stage-1 rng seed: seed + rank)."""
    gen = build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=12), BUILTIN_TASKS["sst2"])
    setup = set_up_loop(
        gen, GeneratorConfig(max_length=12), PretrainConfig(steps=4), Runtime(rank=rank, world_size=world_size), state,
        seed=SEED, rng_seed=SEED + rank, label_tokens=True,
    )
    return setup.rng.integers(0, 2**31, size=8)


def _first_draws(rng_state: dict) -> np.ndarray:
    """The first draws of a numpy RNG at ``rng_state``, as ``_draws`` takes them."""
    rng = np.random.default_rng()
    rng.bit_generator.state = rng_state
    return rng.integers(0, 2**31, size=8)


def _after(seed: int, draws: int) -> dict:
    rng = np.random.default_rng(seed)
    rng.integers(0, 2**31, size=draws)
    return rng.bit_generator.state


def _checkpoint(world_size: int) -> TrainState:
    """A state as rank 0 saves it after some steps: its own RNG, and every rank's in ``rank_rngs``."""
    rngs = [_after(SEED + r, 5 + r) for r in range(world_size)]
    return TrainState(step=2, rng=rngs[0], extra={"rank_rngs": rngs})


def test_a_fresh_rank_draws_from_its_offset_seed(tiny_lm_dir):
    assert np.array_equal(_draws(tiny_lm_dir, 1, 2, None), np.random.default_rng(SEED + 1).integers(0, 2**31, size=8))


@pytest.mark.parametrize("rank", [0, 1])
def test_a_resumed_rank_continues_its_own_draws_not_rank_0s(tiny_lm_dir, rank):
    state = _checkpoint(2)
    got = _draws(tiny_lm_dir, rank, 2, state)
    assert np.array_equal(got, _first_draws(state.extra["rank_rngs"][rank]))
    if rank == 1:  # before rank_rngs, rank 1 repeated rank 0's draws after every resume
        assert not np.array_equal(got, _first_draws(state.rng))


def test_resumed_with_another_worker_count_the_ranks_draw_apart(tiny_lm_dir):
    state = _checkpoint(2)
    draws = [_draws(tiny_lm_dir, r, 3, state) for r in range(3)]
    saved = [_first_draws(s) for s in state.extra["rank_rngs"]]
    for i, d in enumerate(draws):
        assert all(not np.array_equal(d, other) for other in draws[i + 1:] + saved)


def test_a_state_without_rank_rngs_keeps_rank_0s_draws(tiny_lm_dir):
    """Checkpoints saved before ``rank_rngs`` (single-worker runs): rank 0 goes on as before."""
    rank0 = _draws(tiny_lm_dir, 0, 1, TrainState(step=2, rng=_after(SEED, 5)))
    assert np.array_equal(rank0, _first_draws(_after(SEED, 5)))
    assert not np.array_equal(_draws(tiny_lm_dir, 1, 2, TrainState(step=2, rng=_after(SEED, 5))), rank0)
