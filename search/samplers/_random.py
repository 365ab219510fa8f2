from optuna.samplers import RandomSampler

from search.spec import SamplerSpec


def make_random(spec: SamplerSpec, seed: int) -> RandomSampler:
    return RandomSampler(seed=seed)
