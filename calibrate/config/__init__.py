"""Configuration: the typed job spec, checks, the command-line preflight, resume by identity."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the Hydra config tree
