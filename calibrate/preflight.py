"""Check a command line before Hydra runs anything: every swept value composed and checked.

``python -m calibrate.run -m model=phi2,foo eta=0,x`` must end in one line and exit status 2
before the first job starts, not after the first job's probe. Each value of each swept override
is composed (the others at their first value) and its spec built
(:func:`calibrate.config.spec.build_spec`): Hydra's composition errors (unknown group option,
unknown key, bad override syntax), an unknown ``experiment=`` (which Hydra's optional default
would silently ignore), every value check, and the checks that need a model's shape (read from
its config, no weights) for every model of the sweep. A setting set away from its default that
the job's study does not read is announced (once). An experiment bundle never silently overrides
a group the user chose: where it changes that group's ``name`` the user's choice wins (an
override is appended), and any other key it sets in that group is announced. The output folder's
nearest existing parent must be writable before Hydra makes the folder.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from calibrate.config.compose import compose, group_options, implied_overrides
from calibrate.config.spec import JobSpec, build_spec, check_shape, flatten
from calibrate.errors import USER_ERRORS, ConfigError

PREFLIGHT_ERRORS = (*USER_ERRORS, HydraException, OmegaConfBaseException)

_PREFIX = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~", "CHANGE": ""}


def _options(group: str) -> list[str]:
    return group_options(group)


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
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(line), resolve=True)  # type: ignore[return-value]


def _composed(line: Sequence[str]) -> Any:
    """:func:`compose`; where a value has the wrong type (Hydra's "Error merging override x=v",
    caused by OmegaConf's check against the schema), the same error whose first line also says
    what the key's type accepts (OmegaConf's own first line)."""
    from omegaconf.errors import ValidationError

    try:
        return compose(line)
    except HydraException as err:
        cause = err.__cause__
        if not isinstance(cause, ValidationError):
            raise
        head = (str(err).strip().splitlines() or [type(err).__name__])[0]
        detail = (str(cause).strip().splitlines() or [""])[0]
        raise type(err)(f"{head}: {detail}" if detail else head) from cause


def _user_wins(line: list[str], composed: Mapping[str, Any], swept: set[str]) -> list[str]:
    """Overrides that restore a group's ``name`` the experiment changed, plus notices."""
    groups = {_key(o): o.split("=", 1)[1] for o in line
              if "=" in o and "." not in _key(o) and group_options(_key(o))
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


def check_model_shape(spec: JobSpec, seen: dict[str, Any]) -> None:
    """The checks that need the model's shape (layer ranges, null-space k), from its config. An
    offline copy not prepared yet is left to the job (which checks the same before any weight
    is read): preparing it is heavy work."""
    from calibrate.model.assets import prepared_model
    from calibrate.model.load import model_shape
    from calibrate.studies import get_study

    model = spec.model
    key = repr((model.path, model.offline, model.revision, spec.cache_dir))
    if key not in seen:
        source = model.path or prepared_model(model.name, model.offline, spec.cache_dir)
        seen[key] = None if source is None else model_shape(str(source), model)
    shape = seen[key]
    if shape is None:
        return
    check_shape(spec, shape.num_blocks, shape.hidden_size)
    get_study(spec.study).check_shape(spec, shape.num_blocks, shape.hidden_size)


def announce_unused(spec: JobSpec, line: Sequence[str]) -> None:
    """Say (once) which settings of the command line the job's study does not read."""
    from calibrate.studies import get_study
    from calibrate.studies.study import unused_settings

    keys = [_key(o) for o in line if "=" in o and not o.startswith("~")]
    unused = unused_settings(get_study(spec.study), keys)
    if unused:
        _notice(f"the {spec.study} study does not read {', '.join(unused)} (set on the "
                "command line; it is recorded, and changes nothing)")


def check_output_root(args: Any) -> None:
    """The nearest existing folder of the run (or sweep) folder must be writable."""
    import os

    key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    given = [o.split("=", 1)[1] for o in args.overrides if _key(o) == key and "=" in o]
    target = Path(given[-1] if given else ".").expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(target)!r}: {str(existing)!r} is not a writable folder; "
                          "accepted: an output folder whose parent can be written")


def preflight(argv: Sequence[str]) -> list[str]:
    """Check the command line; returns it, with the implied and the user-wins overrides.

    Raises a :class:`~calibrate.errors.UserError` (or a Hydra error) with a one-line message.
    """
    from hydra._internal.utils import get_args_parser
    from omegaconf import OmegaConf

    import calibrate.studies  # noqa: F401 - the studies' intervention options

    args = get_args_parser().parse_args(list(argv))
    if (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
            or args.config_path or args.config_name or args.config_dir):
        return list(argv)  # Hydra's own modes, or the user's own config tree
    check_output_root(args)
    added = [o for o in implied_overrides(args.overrides) if o not in args.overrides]
    lines = _variants(args.overrides, bool(args.multirun))
    swept = {_key(o) for line in lines[1:] for o in line if o not in lines[0]}
    shapes: dict[str, Any] = {}
    for line in lines:
        experiment = _check_experiment(line)
        cfg = _composed(line)
        spec = build_spec(cfg)
        check_model_shape(spec, shapes)
        announce_unused(spec, line)
        if experiment is not None:
            composed = OmegaConf.to_container(cfg, resolve=True)
            added += [o for o in _user_wins(line, composed, swept) if o not in added]
    return [*argv, *added]
