"""Configuration: one typed tree, composed once; the job spec, the command-line preflight, resume.

:mod:`.schema` assembles the typed root from every package's settings, :mod:`.compose` is the
one place the Hydra tree (``calibrate/conf``) is read, :mod:`.spec` decides a job from the typed
tree, :mod:`.preflight` checks a command line before any job starts, :mod:`.resume` reuses a
result folder only for the same config.
"""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the Hydra config tree
