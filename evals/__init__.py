"""Scoring merged models: objectives, lm-eval tasks, perplexity and calibration texts, the demo zoo.
Never imports ``merging`` (nor ``service``): the two meet only in ``service``, which imports both."""
