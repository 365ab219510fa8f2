from optuna.samplers import NSGAIISampler

from search.spec import SamplerSpec


def make_nsga2(spec: SamplerSpec, seed: int) -> NSGAIISampler:
    # Optuna 5 defaults multi-objective studies to TPE: NSGA-II must be asked for.
    return NSGAIISampler(population_size=spec.population_size, crossover_prob=spec.crossover_prob,
                         mutation_prob=spec.mutation_prob, seed=seed)
