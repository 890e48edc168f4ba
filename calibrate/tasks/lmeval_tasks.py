"""lm-eval's multiple-choice tasks as rows: contexts, choices, targets and few-shot exemplars made
by lm-eval's own task machinery (its ``TaskManager`` and task configs, user folders included).

A task is resolved from lm-eval's index alone (:func:`resolve_tasks`: names, groups and tags
expanded to leaf tasks, each checked to be multiple choice, and the reading chosen from the task
definitions), so a bad name fails before any data is read. :func:`lmeval_rows` then builds every
evaluated document's context with ``Task.fewshot_context`` under lm-eval's few-shot seed, in
document order, exactly the strings ``lm_eval --tasks`` scores.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrate.tasks.records import DatasetError, MCRecord, one_line

LMEVAL = "lmeval"  # the dataset config name whose rows come from lm-eval's tasks
LETTER_CHOICES = tuple("ABCDEFGHIJ")
INSTALL_HINT = "pip install 'calibrate[lmeval]' (lm-eval==0.4.13)"


@dataclass(frozen=True)
class TaskReading:
    """Leaf tasks to read and how: what lm-eval's task definitions say about scoring."""

    tasks: tuple[str, ...]  # leaf tasks, in the order named (groups and tags expanded)
    answer_format: str      # "letters": every task's choices are a fixed list A, B, ...; else "cloze"
    cloze_norm: str         # "char" (acc_norm) when every task reports acc_norm, else "none" (acc)


def _manager(include_path: str | None, defaults: bool) -> Any:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise DatasetError(f"dataset=lmeval needs lm-eval: {INSTALL_HINT}") from err
    return _cached_manager(include_path, defaults, TaskManager)


@functools.lru_cache(maxsize=4)
def _cached_manager(include_path: str | None, defaults: bool, factory: Any) -> Any:
    # Indexing lm-eval's ~15,000 task files takes seconds: once per process and folder.
    return factory(verbosity="ERROR", include_path=include_path, include_defaults=defaults)


def _check_include_path(include_path: str | None) -> str | None:
    if include_path is None:
        return None
    if not isinstance(include_path, str) or not include_path:
        raise DatasetError(f"dataset.include_path {include_path!r} is invalid; accepted: null or "
                           "a folder of lm-eval task YAML files")
    if not Path(include_path).is_dir():
        raise DatasetError(f"dataset.include_path {include_path!r} is not a folder; accepted: a "
                           "folder of lm-eval task YAML files")
    return str(Path(include_path).resolve())


def task_names(task: Any) -> tuple[str, ...]:
    """``dataset.task`` as a tuple of names: one name, a comma-separated list or a list."""
    if isinstance(task, str):
        names = [t.strip() for t in task.split(",")]
    elif isinstance(task, Sequence) and not isinstance(task, (bytes, bytearray)):
        names = list(task)
    else:
        names = []
    if not names or not all(isinstance(n, str) and n for n in names):
        raise DatasetError(f"dataset.task {task!r} is invalid; accepted: an lm-eval task, group "
                           "or tag name, or a list of them (as lm_eval --tasks takes)")
    return tuple(dict.fromkeys(names))


def _leaves(manager: Any, name: str, seen: tuple[str, ...] = ()) -> list[Any]:
    """The leaf task entries a task, group or tag name stands for (lm-eval's index)."""
    from lm_eval.tasks._index import Kind

    entry = manager._entry(name)
    if entry is None or name in seen:
        return []
    if entry.kind in (Kind.TASK, Kind.PY_TASK):
        return [entry]
    if entry.kind == Kind.TAG:
        members = [e.name for e in manager._index.values()
                   if name in e.tags and e.kind in (Kind.TASK, Kind.PY_TASK)]
    else:
        listed = entry.cfg.get("task", [])
        listed = [listed] if isinstance(listed, (str, dict)) else listed
        members = [m if isinstance(m, str) else m.get("task") for m in listed]
    return [leaf for m in members if isinstance(m, str)
            for leaf in _leaves(manager, m, seen + (name,))]


def _unknown(name: str, manager: Any) -> DatasetError:
    known = list(manager._index)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"; close: {', '.join(close)}" if close else ""
    return DatasetError(f"dataset.task {name!r} is not an lm-eval task, group or tag{hint} "
                        f"({len(known)} are indexed; list them with `lm_eval ls tasks`, or add "
                        "your own folder with dataset.include_path)")


def _check_leaf(entry: Any) -> None:
    cfg = entry.cfg
    kind = cfg.get("output_type", "generate_until")
    if kind != "multiple_choice":
        raise DatasetError(f"lm-eval task {entry.name!r} has output_type {kind!r}; accepted: "
                           "multiple_choice tasks (calibration is read over their choices)")
    if cfg.get("process_results") is not None:
        raise DatasetError(f"lm-eval task {entry.name!r} scores its documents with its own "
                           "process_results; accepted: tasks scored by the most likely choice "
                           "(acc, acc_norm)")
    delimiter = cfg.get("target_delimiter", " ")
    if delimiter != " ":
        raise DatasetError(f"lm-eval task {entry.name!r} joins context and choice with "
                           f"{delimiter!r}; accepted: tasks whose target_delimiter is ' '")


def _letters(cfg: dict[str, Any]) -> bool:
    choices = cfg.get("doc_to_choice")
    return (isinstance(choices, list) and len(choices) >= 2
            and tuple(choices) == LETTER_CHOICES[:len(choices)])


def _metrics(cfg: dict[str, Any]) -> set[str]:
    return {m.get("metric") for m in cfg.get("metric_list") or [] if isinstance(m, dict)}


def resolve_tasks(task: Any, include_path: str | None = None) -> TaskReading:
    """The leaf tasks ``task`` names and how to read them, from lm-eval's index (no data read).

    A task whose every choice list is the fixed letters A, B, ... (MMLU's) is read as letters
    (the answer letter's token at the last position); any other as cloze, each choice a
    continuation of the context, normalised by its characters (lm-eval's acc_norm) when every
    task reports acc_norm. A name lm-eval does not index, a task that is not multiple choice or
    joins its choices other than with a space is refused here, naming it.
    """
    names = task_names(task)
    folder = _check_include_path(include_path)
    manager = _manager(folder, defaults=folder is None)
    if folder is not None and any(manager._entry(n) is None for n in names):
        manager = _manager(folder, defaults=True)  # names beyond the folder: lm-eval's own too
    leaves: list[Any] = []
    for name in names:
        found = _leaves(manager, name)
        if not found:
            raise _unknown(name, manager)
        leaves.extend(e for e in found if e.name not in {x.name for x in leaves})
    for entry in leaves:
        _check_leaf(entry)
    letters = all(_letters(e.cfg) for e in leaves)
    norm = "char" if not letters and all("acc_norm" in _metrics(e.cfg) for e in leaves) else "none"
    return TaskReading(tuple(e.name for e in leaves), "letters" if letters else "cloze", norm)


def _label(target: Any, choices: Sequence[str], where: str) -> int:
    if isinstance(target, bool) or isinstance(target, (list, tuple)):
        raise DatasetError(f"{where}: target {target!r} is not one choice; accepted: tasks with "
                           "one correct choice per document (an index or the choice's text)")
    if isinstance(target, str):
        if target in choices:
            return list(choices).index(target)
        if target.strip().isdigit():
            return int(target)
        raise DatasetError(f"{where}: target {target!r} is not one of the choices "
                           f"{one_line(list(choices), 120)}")
    return int(target)


def lmeval_rows(reading: TaskReading, include_path: str | None, num_fewshot: int | None,
                fewshot_seed: int) -> tuple[list[dict[str, Any]], str]:
    """Every evaluated document of the tasks as a row (context, choices, label, task, doc_id),
    in lm-eval's document order, and a name for messages. The contexts are lm-eval's own
    (``fewshot_context`` with the task's description and exemplars, its sampler seeded with
    ``fewshot_seed`` as ``lm_eval --fewshot_seed`` does); ``num_fewshot`` None: the task's own."""
    folder = _check_include_path(include_path)
    manager = _manager(folder, defaults=folder is None)
    if folder is not None and any(manager._entry(n) is None for n in reading.tasks):
        manager = _manager(folder, defaults=True)
    from lm_eval.tasks import get_task_dict

    try:
        tasks = get_task_dict(list(reading.tasks), manager)
    except Exception as err:  # lm-eval and datasets raise many kinds; one line names the cause
        raise DatasetError(f"lm-eval task(s) {', '.join(reading.tasks)} could not read their "
                           f"documents: {one_line(str(err), 200)}. Offline, a task must point at "
                           "local files (dataset_path: json, dataset_kwargs.data_files) or be in "
                           "the datasets cache") from err
    rows: list[dict[str, Any]] = []
    for name in reading.tasks:
        task = tasks[name]
        task.set_fewshot_seed(seed=fewshot_seed)
        shots = num_fewshot if num_fewshot is not None else (task.config.num_fewshot or 0)
        for doc_id, doc in enumerate(task.eval_docs):
            where = f"lm-eval task {name!r} document {doc_id}"
            if getattr(task, "multiple_input", False):
                raise DatasetError(f"lm-eval task {name!r} varies its context per choice "
                                   "(multiple_input, as winogrande); accepted: tasks with one "
                                   "context and several choices")
            choices = [str(c) for c in task.doc_to_choice(doc)]
            context = task.fewshot_context(doc, shots)
            rows.append({"context": context, "choices": choices,
                         "label": _label(task.doc_to_target(doc), choices, where),
                         "task": name, "doc_id": doc_id})
    return rows, f"lm-eval task(s) {', '.join(reading.tasks)}"


def normalize_lmeval(row: dict[str, Any]) -> MCRecord:
    """A row of :func:`lmeval_rows`: the whole context is the question, the task the subject."""
    return MCRecord(row["context"], tuple(row["choices"]), int(row["label"]), row["task"])
