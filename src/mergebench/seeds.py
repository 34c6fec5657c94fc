"""Seed arithmetic shared by components that draw their own randomness from the run's seed."""

from __future__ import annotations

import numpy as np


def mix_seeds(*seeds: int) -> int:
    """One well-mixed seed from several (the run's seed, a component's own), without Python's salted hash()."""
    return int(np.random.SeedSequence(list(seeds)).generate_state(1)[0])
