"""Measuring models and runs: exact-match and loss evaluation (:mod:`~dam.evaluation.evaluate`), kinship
between fine-tunes (:mod:`~dam.evaluation.kinship`), the analysis of a run's coefficients
(:mod:`~dam.evaluation.analysis`)."""
