"""The persistent per-GPU autotune cache: which launch config won for each (kernel, shape key) on this GPU.

The Triton kernels pick a config (tile sizes, warps, stages) per shape key with ``tritonslide.kernels._autotune.tuned``.
Timing every config of a key costs seconds, and Triton's own autotuner forgets the winners at process exit (its
``cache_results`` refuses configs with a ``pre_hook`` and keys on the architecture, not the GPU). The winners are kept
here instead, one JSON file per GPU model and compute capability, as FlagGems keeps its tuning (``utils/libentry.py``):

- the user's cache, ``cache_dir() / autotune-<gpu>-sm<MM>.json`` (written after every key tuned), over
- the shipped defaults, package data ``tritonslide/tuned/<gpu>.json`` (same format; a user entry wins).

File format (``"format": 1``)::

    {"format": 1, "gpu": name, "capability": [M, m], "triton": version,
     "kernels": {kernel_name: {"source": source_hash,
                               "entries": {key: {"kwargs": {...}, "num_warps": w, "num_stages": s, "ms": best,
                                                 "timings_ms": {label: ms}, "tuned_at": iso time,
                                                 "errors": {label: message}  # only when a config failed}}}}}

A file that does not parse, or was written with another format, Triton version or GPU, is ignored (one warning per
file and process); so are the entries of a kernel whose source hash changed (one warning per kernel and file). An
entry whose config is no longer in the kernel's (pruned) config list is ignored by the decorator.

Modes (``TRITONSLIDE_AUTOTUNE``, or :func:`override_mode`): ``cached`` (default: use the files, tune what they lack),
``full`` (re-measure every key not yet tuned in this process, then write), ``off`` (use the files, never time: a key
they lack gets the first config of its pruned list, the lists being ordered by preference).

Pure Python and torch: this module never imports Triton (the CLI reads and clears caches where Triton is missing).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import os
import sys
import tempfile
import threading
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch

from tritonslide._dispatch import gpu_slug

FORMAT = 1
MODES = ("full", "cached", "off")
MODE_ENV = "TRITONSLIDE_AUTOTUNE"
DIR_ENV = "TRITONSLIDE_CACHE_DIR"
INTERPRETER = "triton-interpreter"
# shipped defaults (package data, "tuned/*.json" in pyproject.toml); a module attribute so tests can point it elsewhere
SHIPPED_DIR = Path(__file__).resolve().parent / "tuned"
_USER_GLOB = "autotune-*.json"

__all__ = [
    "FORMAT", "MODES", "autotune_mode", "cache_dir", "cache_files", "clear", "config_label", "describe",
    "gpu_identity", "gpu_slug", "lookup", "override_mode", "record", "reset_stats", "shipped_path", "stats",
    "triton_version", "user_cache_path",
]

# One lock for every shared structure below: files are read and written rarely (once per key and process), so
# contention is irrelevant, and an RLock lets record() call the readers.
_lock = threading.RLock()
_override: list[str] = []
_warned: set[tuple[str, str]] = set()
# path -> ((inode, mtime_ns, size), raw JSON or None, why it is unusable or None): a file is parsed once per change
_parsed: dict[str, tuple[tuple[int, int, int], Any, str | None]] = {}
_STAT_NAMES = ("tuned", "cache_hits", "heuristic", "single")
_stats = dict.fromkeys(_STAT_NAMES, 0)


# ---------------------------------------------------------------------------------------------------- settings
def cache_dir() -> Path:
    """``$TRITONSLIDE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/tritonslide``, else ``~/.cache/tritonslide``."""
    explicit = os.environ.get(DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "tritonslide"
    return Path.home() / ".cache" / "tritonslide"


def autotune_mode() -> str:
    """``full``, ``cached`` (default) or ``off``: the innermost :func:`override_mode`, else ``$TRITONSLIDE_AUTOTUNE``.

    Raises ValueError for any other value of the variable (a typo must not silently tune, or not tune)."""
    if _override:
        return _override[-1]
    value = os.environ.get(MODE_ENV)
    if value is None or not value.strip():
        return "cached"
    mode = value.strip().lower()
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: expected one of {', '.join(MODES)}")
    return mode


@contextlib.contextmanager
def override_mode(mode: str) -> Iterator[None]:
    """Force the autotune ``mode`` inside the block, whatever ``$TRITONSLIDE_AUTOTUNE`` says (``tritonslide
    autotune`` forces ``full`` so that it re-measures keys the files already hold)."""
    if mode not in MODES:
        raise ValueError(f"override_mode: expected one of {', '.join(MODES)}, got {mode!r}")
    with _lock:
        _override.append(mode)
    try:
        yield
    finally:
        with _lock:
            _override.pop()


# ---------------------------------------------------------------------------------------------------- identity
def gpu_identity(device: torch.device | str | int | None = None) -> dict[str, Any]:
    """``{"name": torch.cuda.get_device_name, "capability": [major, minor]}`` of ``device`` (default: the current
    CUDA device); ``{"name": "triton-interpreter", "capability": [0, 0]}`` for a CPU device or without CUDA (the
    kernels then run in Triton's interpreter)."""
    if device is not None and not isinstance(device, torch.device):
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device is None:
        if not torch.cuda.is_available():
            return {"name": INTERPRETER, "capability": [0, 0]}
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return {"name": INTERPRETER, "capability": [0, 0]}
    name, capability = _cuda_identity(device.index if device.index is not None else torch.cuda.current_device())
    return {"name": name, "capability": list(capability)}


@lru_cache(maxsize=None)
def _cuda_identity(index: int) -> tuple[str, tuple[int, int]]:
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


def triton_version() -> str:
    """The installed Triton's version, read without importing it ("none" where it is missing)."""
    module = sys.modules.get("triton")
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def user_cache_path(identity: dict[str, Any]) -> Path:
    major, minor = identity["capability"]
    return cache_dir() / f"autotune-{gpu_slug(identity['name'])}-sm{major}{minor}.json"


def shipped_path(identity: dict[str, Any]) -> Path:
    return SHIPPED_DIR / f"{gpu_slug(identity['name'])}.json"


def config_label(config: Any) -> str:
    """``BLOCK_M=64,BLOCK_N=32,warps=4,stages=3``: a config (``triton.Config`` or a file entry) as one string."""
    if isinstance(config, dict):
        kwargs, warps, stages = config["kwargs"], config["num_warps"], config["num_stages"]
    else:
        kwargs, warps, stages = config.kwargs, config.num_warps, config.num_stages
    return ",".join([f"{k}={v}" for k, v in kwargs.items()] + [f"warps={warps}", f"stages={stages}"])


# ---------------------------------------------------------------------------------------------------- statistics
def stats() -> dict[str, int]:
    """Keys resolved in this process, by how: ``tuned`` (timed), ``cache_hits`` (served from a file), ``heuristic``
    (mode ``off``: the first pruned config), ``single`` (one config after pruning: nothing to choose)."""
    with _lock:
        return dict(_stats)


def reset_stats() -> None:
    with _lock:
        for name in _STAT_NAMES:
            _stats[name] = 0


def count(name: str) -> None:
    with _lock:
        _stats[name] += 1


# ---------------------------------------------------------------------------------------------------- reading
def _warn_once(path: Path, tag: str, message: str) -> None:
    with _lock:
        if (str(path), tag) in _warned:
            return
        _warned.add((str(path), tag))
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _read(path: Path) -> tuple[Any, str | None]:
    """(the file's JSON, None) or (None, why it cannot be read); None, None when the file does not exist. Parsed
    once per change of the file (inode, mtime and size)."""
    try:
        st = path.stat()
    except OSError:
        return None, None
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    with _lock:
        hit = _parsed.get(str(path))
        if hit is not None and hit[0] == stamp:
            return hit[1], hit[2]
    try:
        data, why = json.loads(path.read_text(encoding="utf-8")), None
        if not isinstance(data, dict) or not isinstance(data.get("kernels", {}), dict):
            data, why = None, "not an autotune cache (no 'kernels' table)"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        data, why = None, f"unreadable ({type(exc).__name__}: {exc})"
    with _lock:
        _parsed[str(path)] = (stamp, data, why)
    return data, why


def _mismatch(data: dict, identity: dict[str, Any], triton: str) -> str | None:
    """Why a parsed file cannot serve this GPU and Triton, or None when it can."""
    if data.get("format") != FORMAT:
        return f"format {data.get('format')!r}, this tritonslide reads format {FORMAT}"
    if data.get("triton") != triton:
        return f"written with Triton {data.get('triton')}, this is Triton {triton}"
    if data.get("gpu") != identity["name"] or list(data.get("capability") or []) != list(identity["capability"]):
        return f"written for {data.get('gpu')} sm_{_sm(data.get('capability'))}, this is {identity['name']} " \
               f"sm_{_sm(identity['capability'])}"
    return None


def _sm(capability: Any) -> str:
    try:
        major, minor = capability
        return f"{major}{minor}"
    except (TypeError, ValueError):
        return "?"


def _usable(path: Path, identity: dict[str, Any], triton: str) -> dict | None:
    """The file's data when it exists and serves this GPU and Triton; else None (warned once per file)."""
    data, why = _read(path)
    if data is not None:
        why = _mismatch(data, identity, triton)
    if why is not None:
        _warn_once(path, why, f"tritonslide autotune cache {path} ignored: {why}")
        return None
    return data


def lookup(identity: dict[str, Any], kernel: str, source: str, key: str, triton: str | None = None) -> list[dict]:
    """The entries for ``key`` of ``kernel`` (whose current source hash is ``source``), best first: the user's cache
    file, then the shipped file. Stale files and kernels are skipped with one warning each."""
    triton = triton or triton_version()
    found = []
    for path in (user_cache_path(identity), shipped_path(identity)):
        data = _usable(path, identity, triton)
        if data is None:
            continue
        table = data["kernels"].get(kernel)
        if not isinstance(table, dict):
            continue
        if table.get("source") != source:
            why = f"entries of {kernel} ignored (tuned for source {table.get('source')}, the kernel is now {source})"
            _warn_once(path, f"source:{kernel}", f"tritonslide autotune cache {path}: {why}")
            continue
        entry = (table.get("entries") or {}).get(key)
        if isinstance(entry, dict):
            found.append(entry)
    return found


# ---------------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An advisory lock around one read-merge-write, so that concurrent processes tuning different keys do not drop
    each other's entries (the os.replace alone keeps the file whole, not the entries). Best effort: no fcntl
    (Windows) or a file system without locks (some NFS mounts) just runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        handle = open(path.with_name(path.name + ".lock"), "a")
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield  # closing the handle releases the lock


def record(identity: dict[str, Any], kernel: str, source: str, key: str, entry: dict,
           triton: str | None = None) -> bool:
    """Add ``entry`` for ``key`` of ``kernel`` to the user's cache file: read, merge, write to a temporary file in the
    same folder, ``os.replace`` (atomic: a reader sees the old file or the new one, never half of one). A stale or
    corrupt file is replaced; another kernel's entries are kept. Returns False (after one warning per folder) when
    the folder cannot be written: the caller keeps the winner in memory."""
    triton = triton or triton_version()
    path = user_cache_path(identity)
    with _lock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(path):
                data = copy.deepcopy(_read(path)[0])  # the parsed copy is shared with lookups: merge into another
                if data is None or _mismatch(data, identity, triton) is not None:
                    data = {"format": FORMAT, "gpu": identity["name"], "capability": list(identity["capability"]),
                            "triton": triton, "kernels": {}}
                table = data["kernels"].get(kernel)
                if not isinstance(table, dict) or table.get("source") != source \
                        or not isinstance(table.get("entries"), dict):
                    table = data["kernels"][kernel] = {"source": source, "entries": {}}
                table["entries"][key] = entry
                _write_atomic(path, data)
        except OSError as exc:
            _warn_once(path.parent, "write", f"tritonslide autotune cache folder {path.parent} is not writable "
                                             f"({exc}): tuned configs are kept in memory for this process only")
            return False
    return True


def _write_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1, sort_keys=True)
            out.write("\n")
        os.replace(tmp, path)
        st = path.stat()
        with _lock:  # what was just written is what the next lookup reads, without parsing it again
            _parsed[str(path)] = ((st.st_ino, st.st_mtime_ns, st.st_size), data, None)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------------- listing
def cache_files() -> list[Path]:
    """The user's autotune files that exist (every GPU)."""
    folder = cache_dir()
    return sorted(folder.glob(_USER_GLOB)) if folder.is_dir() else []


def _shipped_files() -> list[Path]:
    return sorted(SHIPPED_DIR.glob("*.json")) if SHIPPED_DIR.is_dir() else []


def describe() -> str:
    """Every autotune file, the user's and the shipped ones, for any GPU: its GPU, Triton version, per kernel the
    number of entries, then the entries ``key -> config (ms)``."""
    lines = [f"user cache folder: {cache_dir()}"]
    files = [("user", p) for p in cache_files()] + [("shipped", p) for p in _shipped_files()]
    if not files:
        lines.append("no autotune files")
    for kind, path in files:
        data, why = _read(path)
        if data is None:
            lines.append(f"{kind} {path}: {why or 'missing'}")
            continue
        lines.append(f"{kind} {path}: {data.get('gpu')} sm_{_sm(data.get('capability'))}, "
                     f"Triton {data.get('triton')}, format {data.get('format')}")
        for kernel, table in sorted(data.get("kernels", {}).items()):
            if not isinstance(table, dict):
                table = {}
            entries, source = table.get("entries") or {}, table.get("source")
            lines.append(f"  {kernel} (source {source}): {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
            for key, entry in sorted(entries.items()):
                try:
                    lines.append(f"    {key} -> {config_label(entry)} ({float(entry.get('ms', 'nan')):.4g} ms)")
                except (KeyError, TypeError, ValueError, AttributeError):
                    lines.append(f"    {key} -> malformed entry")
    return "\n".join(lines)


def clear() -> list[Path]:
    """Remove the user's autotune files (every GPU) and return them; shipped files are never touched."""
    removed = []
    with _lock:
        for path in cache_files():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
            with contextlib.suppress(OSError):
                path.with_name(path.name + ".lock").unlink()
            _parsed.pop(str(path), None)
    return removed
