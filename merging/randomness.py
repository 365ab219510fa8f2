"""Which merge methods draw random numbers: their merge depends on the seed, the others' does not.

Kept apart from ``merging.methods`` (and torch) so that the search side can read it; a test
checks it against every registered method's ``uses_rng``.
"""

SEEDED_METHODS: frozenset[str] = frozenset({"dare_ties", "dare_linear", "della", "della_linear", "arcee_fusion"})
