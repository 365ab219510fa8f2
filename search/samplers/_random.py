from collections.abc import Sequence

from optuna.samplers import RandomSampler

from search.spec import SamplerSpec


def make_random(spec: SamplerSpec, seed: int, reference: Sequence[float] | None = None) -> RandomSampler:
    return RandomSampler(seed=seed)
