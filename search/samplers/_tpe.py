from collections.abc import Sequence

from optuna.samplers import TPESampler

from search.spec import SamplerSpec


def make_tpe(spec: SamplerSpec, seed: int, reference: Sequence[float] | None = None) -> TPESampler:
    return TPESampler(seed=seed, multivariate=True, n_startup_trials=spec.n_startup_trials)
