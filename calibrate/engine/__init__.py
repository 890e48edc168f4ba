"""The engine: hooks, the logit lens, the probe, cloze scoring, steering passes, the result cache."""
