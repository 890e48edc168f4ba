"""Where the model comes from: a local folder, the prepared offline copy, or a hub id (in the local
Hugging Face cache, or on a hub that answers). :func:`resolve_source` names it and
:func:`check_source` says how transformers may load it, or why it cannot, in one line.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from calibrate.io.paths import FOLDER, MISSING, REGULAR, entry_kind
from calibrate.model.assets import prepare_model
from calibrate.model.config import ModelConfig, ModelConfigError

HUB_PROBE_TIMEOUT_S = 3.0
_HUB_VERDICT: dict[str, bool] = {}  # endpoint -> reachable, probed once per process
_TRUE = {"1", "on", "yes", "true"}
LOG = logging.getLogger("calibrate")


def local_dir(source: str) -> Path | None:
    """``source`` as a folder when it is one."""
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def resolve_source(cfg: ModelConfig, cache_dir: str | Path | None = None) -> str:
    """The folder (absolute) or hub id to load: ``path`` if set, else the prepared offline copy."""
    config = cfg
    if config.path:
        source = config.path
        kind = entry_kind(Path(source).expanduser())
        if kind not in (FOLDER, MISSING):  # stat alone: a FIFO is never opened
            raise ModelConfigError(f"model.path={source!r} is {kind}, not a folder; accepted: a "
                                   "local model folder, or a hub id owner/name")
    elif config.offline:
        source = str(prepare_model(config.name, config.offline, cache_dir))
    else:
        raise ModelConfigError(f"model {config.name!r} has neither model.path nor an offline copy")
    local = local_dir(source)
    if local is None:
        return source
    check_folder_files(local)
    return os.path.abspath(local)


def check_folder_files(folder: Path) -> None:
    """One error line naming the first entry of a model folder that transformers might open but
    that is not a regular file or folder (a FIFO, a socket, a broken link): it would hang or
    fail deep inside transformers. Hidden entries (``.complete``, ``.cache``) are not read."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if not e.name.startswith("."))
    for name in names:
        kind = entry_kind(folder / name)
        if kind not in (FOLDER, REGULAR):
            raise ModelConfigError(f"model folder {str(folder)!r}: {name!r} is {kind}; "
                                   "accepted: a folder of regular files (replace or remove it)")


# ---------------------------------------------------------------- remote code

_REMOTE_NOTED: set[tuple[str, str | None]] = set()  # (source, revision) already warned about


def _auto_map(path: Path) -> list[str]:
    """The ``auto_map`` entries of a config JSON file as ``Class -> module.Class`` strings."""
    if entry_kind(path) != REGULAR:
        return []
    try:
        auto_map = json.loads(path.read_text()).get("auto_map") or {}
        items = list(auto_map.items())
    except (OSError, ValueError, AttributeError):
        return [f"(unreadable {path.name})"]
    entries = []
    for auto, target in items:
        targets = target if isinstance(target, list) else [target]
        entries.append(f"{auto} -> {' / '.join(str(t) for t in targets if t)}")
    return entries


def remote_code_files(folder: Path) -> list[str]:
    """What ``trust_remote_code`` may run from ``folder``: the ``auto_map`` entries of its
    config.json and tokenizer_config.json, and its .py files."""
    found = [f"{name} auto_map {entry}" for name in ("config.json", "tokenizer_config.json")
             for entry in _auto_map(folder / name)]
    found += sorted(p.name for p in folder.glob("*.py") if entry_kind(p) == REGULAR)
    return found


def _snapshot(source: str, revision: str | None) -> Path | None:
    """The local folder of ``source``, or its cached hub snapshot; None when neither exists."""
    local = local_dir(source)
    if local is not None:
        return local
    try:
        cached = cached_config(source, revision)
    except ValueError:
        return None
    return Path(cached).parent if cached else None


def remote_code_notice(source: str, revision: str | None = None) -> str:
    """The one line naming the code ``trust_remote_code`` lets transformers run for ``source``."""
    head = f"model.trust_remote_code=true: transformers may run code shipped with {source!r}"
    folder = _snapshot(source, revision)
    if folder is None:
        return (f"{head}; its files are not local, so it will download and run whatever its "
                "config's auto_map names")
    where = "" if str(folder) == source else f" (cached in {str(folder)!r})"
    files = remote_code_files(folder)
    if not files:
        return (f"{head}{where}; none found (no auto_map entry, no .py file): transformers' own "
                "classes are used")
    return f"{head}{where}: {'; '.join(files)}"


def note_remote_code(source: str, revision: str | None = None) -> None:
    """Warn once per process and source, before transformers is first asked to load it, which
    code ``trust_remote_code`` will run (:func:`remote_code_notice`)."""
    if (source, revision) not in _REMOTE_NOTED:
        _REMOTE_NOTED.add((source, revision))
        LOG.warning(remote_code_notice(source, revision))


# ---------------------------------------------------------------- the hub

def hub_endpoint() -> str:
    """The Hugging Face endpoint (``HF_ENDPOINT``, read now)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read now."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _probe_hub(endpoint: str, timeout: float) -> bool:
    """One HEAD request to ``endpoint``: any HTTP answer is reachable. Bounded by ``timeout`` even
    when name resolution hangs (it runs in a daemon thread)."""
    answer: list[bool] = []

    def attempt() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
            answer.append(True)
        except urllib.error.HTTPError:  # the server answered
            answer.append(True)
        except urllib.error.URLError as err:  # a TLS failure still means something answered
            answer.append(isinstance(err.reason, ssl.SSLError))
        except Exception:  # noqa: BLE001 - DNS, refused, timeout: unreachable
            answer.append(False)

    thread = threading.Thread(target=attempt, name="calibrate-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answer and answer[0])


def hub_reachable() -> bool:
    """Whether the hub endpoint answers; probed once per process and endpoint."""
    endpoint = hub_endpoint()
    if endpoint not in _HUB_VERDICT:
        _HUB_VERDICT[endpoint] = _probe_hub(endpoint, HUB_PROBE_TIMEOUT_S)
    return _HUB_VERDICT[endpoint]


def _looks_like_path(source: str) -> bool:
    return (source.startswith(("/", "./", "../", "~", ".\\")) or "\\" in source
            or source.count("/") > 1 or Path(source).exists())


def cached_config(source: str, revision: str | None) -> str | None:
    """The cached config.json of hub id ``source``, or None (raises on an invalid hub id)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json", revision=revision)
    return cached if isinstance(cached, str) else None


def check_source(source: str, cfg: ModelConfig) -> dict[str, Any]:
    """Where ``source`` loads from, as keyword arguments for transformers' ``from_pretrained``.

    A local folder loads as is; a hub id in the local Hugging Face cache loads from there
    (``local_files_only`` when offline or the hub is unreachable); an uncached hub id needs the
    hub, probed once per process (never when ``HF_HUB_OFFLINE`` is set). Otherwise one error line.
    """
    config = cfg
    revision = config.revision
    if config.trust_remote_code:
        note_remote_code(source, revision)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": config.trust_remote_code}
    if local_dir(source) is not None:
        return kwargs
    if _looks_like_path(source):
        what = "a file, not a folder" if Path(source).expanduser().exists() else "no such folder"
        raise ModelConfigError(f"model {source!r} cannot be loaded ({what}); accepted: a local "
                               "model folder, or a hub id that is cached or reachable")
    try:
        cached = cached_config(source, revision)
    except ValueError as err:  # HFValidationError: not a hub id either
        raise ModelConfigError(f"model {source!r} cannot be loaded (neither a folder nor a valid hub "
                               "id); accepted: a local model folder, or a hub id owner/name") from err
    if cached is not None:
        if hub_offline() or not hub_reachable():
            kwargs["local_files_only"] = True
        return kwargs
    if hub_offline():
        why = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        why = (f"the hub ({hub_endpoint()}) is unreachable (one probe, {HUB_PROBE_TIMEOUT_S:g} s "
               "timeout)")
    else:
        return kwargs
    from huggingface_hub import constants

    at = f"@{revision}" if revision else ""
    raise ModelConfigError(
        f"model {source!r}{at} is neither a local folder nor in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and {why}; accepted: model.path=<a local model folder>, or "
        f"download it on a machine with network (`hf download {source}` into the HF cache, "
        "HF_HOME/HF_HUB_CACHE) and run with HF_HUB_OFFLINE=1")
