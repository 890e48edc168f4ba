"""Outputs: result files, tracking, plots, sweep summaries, comparisons across sweeps."""
