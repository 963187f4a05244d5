"""Shared test set-up: Hypothesis profiles and small helpers.

Profiles are chosen with the HYPOTHESIS_PROFILE environment variable:
  ci        (default) few examples, no deadline: the whole suite fits in `make test`'s budget.
  thorough  many examples, for a deep local run:  HYPOTHESIS_PROFILE=thorough make test
  exercises, exercises-quick, exercises-small: `make check` and tests/test_exercises.py (below)
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
# make check NAME=... (tests/exercise_check.py): ci's examples, and no example database, so a
# learner's failing examples are never replayed against minitrain (and every check is repeatable).
settings.register_profile("exercises", settings.get_profile("ci"), database=None)
# tests/test_exercises.py: a few examples, no shrinking (the stub fails at once anyway); and a few
# examples WITH shrinking, to show a buggy file's minimal counterexample.
settings.register_profile("exercises-quick", settings.get_profile("exercises"), max_examples=3,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.register_profile("exercises-small", settings.get_profile("exercises"), max_examples=6)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Two cores are shared by the test process and the processes it spawns: one thread each keeps
# timings of the suite predictable and avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory):
    """A small token file (200 kB of the default corpus) shared by the trainer tests."""
    from minitrain.data import default_corpus, pretokenize

    path = tmp_path_factory.mktemp("data") / "data.bin"
    pretokenize(default_corpus(max_bytes=200_000), path)
    return str(path)
