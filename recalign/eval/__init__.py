"""Evaluation: metric functions, full and sampled ranking, beyond-accuracy measures, reports."""
