"""Samplers by name. Each module builds one Optuna sampler from a SamplerSpec."""

from collections.abc import Callable, Sequence

from optuna.samplers import BaseSampler

from search.samplers._cmaes import make_cmaes
from search.samplers._gp import make_gp
from search.samplers._mmmo_bo import MMMOBOSampler, make_mmmo_bo
from search.samplers._nsga2 import make_nsga2
from search.samplers._random import make_random
from search.samplers._tpe import make_tpe
from search.spec import SamplerSpec

SAMPLERS: dict[str, Callable[[SamplerSpec, int, Sequence[float] | None], BaseSampler]] = {
    "nsga2": make_nsga2,
    "mmmo-bo": make_mmmo_bo,
    "random": make_random,
    "tpe": make_tpe,
    "gp": make_gp,
    "cmaes": make_cmaes,
}


def make_sampler(spec: SamplerSpec, seed: int, reference: Sequence[float] | None = None) -> BaseSampler:
    """``reference``: the study's hypervolume reference point, for samplers that aim at it."""
    return SAMPLERS[spec.name](spec, seed, reference)


__all__ = ["SAMPLERS", "MMMOBOSampler", "make_sampler"]
