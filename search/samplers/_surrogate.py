"""A small Gaussian-process surrogate that ranks candidate configurations by how much they could
add to the Pareto front (the hypervolume improvement of their optimistic prediction).

NSGA-II uses it to screen its children: it breeds several per trial and keeps the most promising
one, so a generation's evaluations go to children the model expects to matter. Optuna's own GP
lives in a private module, hence these forty lines of numpy: one RBF GP per objective on the
unit-cube parameters, its length scale picked by marginal likelihood from a short grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from search.pareto import hypervolume_improvement, pareto_front
from search.samplers._common import min_max_scale, rbf

_LENGTHSCALES = (0.1, 0.2, 0.4, 0.8)
_NOISE = 1e-3


class GaussianProcess:
    """Zero-mean GP on standardised targets; ``predict`` gives mean and standard deviation."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = x
        self.mu, self.sigma = float(y.mean()), float(y.std()) or 1.0
        z = (y - self.mu) / self.sigma
        scale = np.sqrt(x.shape[1])
        best = None
        for ls in _LENGTHSCALES:
            gram = rbf(x, x, ls * scale) + _NOISE * np.eye(len(x))
            chol = np.linalg.cholesky(gram)
            alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, z))
            evidence = -0.5 * z @ alpha - np.log(np.diag(chol)).sum()
            if best is None or evidence > best[0]:
                best = (evidence, ls * scale, chol, alpha)
        _, self.lengthscale, self.chol, self.alpha = best

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cross = rbf(x, self.x, self.lengthscale)
        mean = cross @ self.alpha
        v = np.linalg.solve(self.chol, cross.T)
        var = np.clip(1.0 - (v * v).sum(0), 1e-12, None)
        return self.mu + self.sigma * mean, self.sigma * np.sqrt(var)


def rank_by_improvement(observed_x: np.ndarray, observed_y: np.ndarray, candidates: np.ndarray,
                        beta: float = 1.0) -> np.ndarray:
    """Indices of ``candidates`` best first, by the hypervolume their optimistic prediction
    (mean + ``beta`` sd, every objective maximised) adds to the observed front."""
    models = [GaussianProcess(observed_x, observed_y[:, m]) for m in range(observed_y.shape[1])]
    means, sds = zip(*(g.predict(candidates) for g in models), strict=True)
    optimistic = np.stack(means, 1) + beta * np.stack(sds, 1)
    span = observed_y.max(0) - observed_y.min(0)
    span = np.where(span > 0, span, 1.0)
    reference = observed_y.min(0) - 0.1 * span
    directions = ["maximize"] * observed_y.shape[1]
    front: Sequence[Sequence[float]] = [tuple(observed_y[i]) for i in pareto_front(observed_y.tolist(), directions)]
    gains = np.array([hypervolume_improvement(front, tuple(u), tuple(reference), directions) for u in optimistic])
    # all-dominated candidates tie at zero gain: prefer the one predicted closest to the front
    tiebreak = min_max_scale(optimistic, like=observed_y).sum(1)
    return np.lexsort((-tiebreak, -gains))
