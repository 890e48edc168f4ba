"""Check a command line before Hydra runs anything: every swept value composed and checked.

``python -m calibrate.run -m model=phi2,foo eta=0,x`` must end in one line and exit status 2
before the first job starts, not after the first job's probe. Each value of each swept override
is composed (the others at their first value) and its spec built (:func:`calibrate.config.spec.build_spec`):
Hydra's composition errors (unknown group option, unknown key, bad override syntax), an
unknown ``experiment=`` (which Hydra's optional default would silently ignore) and every
cheap value check surface here. An experiment bundle never silently overrides a group the user
chose: where it changes that group's ``name`` the user's choice wins (an override is appended),
and any other key it sets in that group is announced.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from calibrate.config.spec import CONF_DIR, build_spec, flatten
from calibrate.config.validate import ConfigError
from calibrate.errors import USER_ERRORS

PREFLIGHT_ERRORS = (*USER_ERRORS, HydraException, OmegaConfBaseException)

_PREFIX = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~", "CHANGE": ""}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def _variants(overrides: Sequence[str], multirun: bool) -> list[list[str]]:
    """The base line (each sweep at its first value) and one line per other swept value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    plain: list[str] = []
    sweeps: list[tuple[int, list[str]]] = []
    for i, override in enumerate(parsed):
        if not override.is_sweep_override():
            plain.append(override.input_line)
            continue
        if not multirun:
            raise ConfigError(f"{override.input_line} is a sweep; add -m (multirun) to run "
                              "every value, or give one value")
        try:
            values = list(override.sweep_string_iterator())
        except Exception:  # noqa: BLE001 - interval sweeps have no finite list: Hydra checks them
            plain.append(override.input_line)
            continue
        head = f"{_PREFIX.get(override.type.name, '')}{override.get_key_element()}="
        plain.append(head + values[0])
        sweeps.append((i, [head + v for v in values]))
    lines = [plain]
    for position, values in sweeps:  # `plain` holds one entry per override, in order
        for value in values[1:]:
            line = list(plain)
            line[position] = value
            lines.append(line)
    return lines


def _key(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~")


def _check_experiment(line: Sequence[str]) -> str | None:
    chosen = [o.split("=", 1)[1] for o in line if _key(o) == "experiment" and "=" in o]
    if not chosen:
        return None
    name = chosen[-1]
    if name not in _options("experiment"):
        raise ConfigError(f"experiment={name!r} does not exist; accepted: "
                          f"{', '.join(_options('experiment'))}")
    return name


def _compose(line: Sequence[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(line))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _user_wins(line: list[str], composed: Mapping[str, Any], swept: set[str]) -> list[str]:
    """Overrides that restore a group's ``name`` the experiment changed, plus notices."""
    groups = {_key(o): o.split("=", 1)[1] for o in line
              if "=" in o and "." not in _key(o) and (Path(CONF_DIR) / _key(o)).is_dir()
              and _key(o) not in ("experiment", "hydra", *swept)}
    if not groups:
        return []
    without = _compose([o for o in line if _key(o) != "experiment"])
    explicit = {_key(o) for o in line}
    added = []
    for group in groups:
        mine, theirs = flatten(without.get(group) or {}), flatten(composed.get(group) or {})
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) == theirs.get(key) or f"{group}.{key}" in explicit:
                continue
            if key == "name":
                added.append(f"{group}.name={mine.get(key)}")
                _notice(f"the experiment sets {group}.name={theirs.get(key)!r}; your "
                        f"{group}={groups[group]} wins")
            else:
                _notice(f"the experiment sets {group}.{key}={theirs.get(key)!r} on your "
                        f"{group}={groups[group]} (override {group}.{key}=... to change it)")
    return added


_SAID: set[str] = set()


def _notice(message: str) -> None:
    if message not in _SAID:  # each swept variant composes again: say it once
        _SAID.add(message)
        print(f"[calibrate] {message}", file=sys.stderr)


def preflight(argv: Sequence[str]) -> list[str]:
    """Check the command line; returns it, with any user-wins overrides appended.

    Raises :class:`ConfigError` (or a dataset/Hydra error) with a one-line message.
    """
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(list(argv))
    if (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
            or args.config_path or args.config_name or args.config_dir):
        return list(argv)  # Hydra's own modes, or the user's own config tree
    added: list[str] = []
    lines = _variants(args.overrides, bool(args.multirun))
    swept = {_key(o) for line in lines[1:] for o in line if o not in lines[0]}
    for line in lines:
        experiment = _check_experiment(line)
        composed = _compose(line)
        build_spec({k: v for k, v in composed.items() if k != "hydra"})
        if experiment is not None:
            added += [o for o in _user_wins(line, composed, swept) if o not in added]
    return [*argv, *added]
