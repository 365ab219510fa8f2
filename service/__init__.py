"""The service: HTTP API, database, leases, workers and the CLI; it joins ``search``, ``merging``
and ``evals`` and may import all three. Nothing imports ``service``."""
