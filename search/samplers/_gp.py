from collections.abc import Sequence

from optuna.samplers import GPSampler

from search.spec import SamplerSpec


def make_gp(spec: SamplerSpec, seed: int, reference: Sequence[float] | None = None) -> GPSampler:
    """Optuna's Gaussian-process sampler (logEHVI for several objectives), as a baseline."""
    return GPSampler(seed=seed, n_startup_trials=spec.n_startup_trials, warn_independent_sampling=False)
