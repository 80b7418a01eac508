"""``@tuned``: Triton's ``@triton.autotune`` with the winners kept across processes, per GPU (``tritonslide.tuning``).

Same arguments and launch syntax as ``triton.autotune`` (``kernel[grid](*args, **kwargs)``, ``grid`` a tuple or a
callable of the meta dict), same key (the ``key`` arguments' values plus every tensor argument's dtype), same prune
call (``early_config_prune(configs, positional_args_by_name, **keyword_args)``) and hooks (the config's
``pre_hook(nargs)`` and ``reset_to_zero`` before every trial and before the final launch, ``restore_value`` after every
trial). What differs is where a key's config comes from, in order:

1. this process's memory;
2. the user's cache file for this GPU, then the shipped file (``tritonslide/tuned/<gpu>.json``); an entry counts when
   its config is among the launch's pruned configs (a renamed or removed config is ignored);
3. mode ``off``: the first pruned config, without timing: config lists are ordered by preference (the heuristic);
   mode ``cached`` (default): time every pruned config now and write the winner to the user's cache file.

Mode ``full`` skips step 2 for keys not yet tuned in this process, so ``tritonslide autotune`` re-measures them. A
key with a single config after pruning (always the case in the interpreter, ``_common.autotune_configs``) launches it
without timing or writing. The default timer is ``triton.testing.do_bench`` (median ms); :func:`set_timer` replaces
it (tests rank configs deterministically with it).

The file entries are valid while the kernel's source hash is unchanged: its ``@triton.jit`` source, the sources of
the ``@triton.jit`` helpers it calls by name (recursively) and its config list. Code outside those (a launcher, a
prune function) is not hashed: ``tritonslide autotune --clear`` (or mode ``full``) re-measures after such edits.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import math
import re
import textwrap
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import triton
from triton.runtime.jit import JITFunction

from tritonslide import tuning

Timer = Callable[[str, triton.Config, Callable[[], Any]], float]
_timer: Timer | None = None


def set_timer(timer: Timer | None) -> None:
    """Replace the tuning timer: ``timer(kernel_name, config, launch) -> ms`` (it may call ``launch()``, which runs
    the config once with its hooks, or not); None restores ``triton.testing.do_bench``."""
    global _timer
    _timer = timer


@dataclass(frozen=True)
class _Choice:
    config: triton.Config
    how: str  # "tuned" | "single" | "file" | "heuristic"

    def valid(self) -> bool:
        """Whether the remembered choice still holds under the current mode: a file's choice is re-measured in
        ``full``, a heuristic one is re-decided as soon as the mode is no longer ``off``."""
        if self.how in ("tuned", "single"):
            return True
        mode = tuning.autotune_mode()
        return mode != "full" if self.how == "file" else mode == "off"


def _is_jit(obj: Any) -> bool:
    """A ``@triton.jit`` function: a JITFunction, or the interpreter's InterpretedFunction wrapping one."""
    return isinstance(obj, JITFunction) or (type(obj).__name__ == "InterpretedFunction" and hasattr(obj, "fn"))


def _jit_sources(fn: Any, seen: set[int]) -> list[str]:
    """The source of ``fn`` (decorators cut off) and, depth first, of every ``@triton.jit`` function it calls by a
    name of its module (the kernels' helpers: ``inside``, ``next_step``, ``load_index`` ...), each once."""
    base = _base_function(fn)
    src = textwrap.dedent(inspect.getsource(base))
    src = src[re.search(r"^def\s+\w+\s*\(", src, re.MULTILINE).start():]
    out = [src]
    for name in sorted(set(re.findall(r"\b([A-Za-z_]\w*)\s*\(", src))):
        obj = base.__globals__.get(name)
        if obj is not None and _is_jit(obj) and id(obj) not in seen:
            seen.add(id(obj))
            out += _jit_sources(obj, seen)
    return out


def source_hash(fn: Any, configs: list[triton.Config]) -> str:
    """First 16 hex digits of sha256(the kernel's source, the sources of the ``@triton.jit`` helpers it calls, its
    config list): the file entries' validity stamp, so that editing a helper re-tunes the kernels that use it."""
    src = "\n".join(_jit_sources(fn, {id(fn)}))
    listing = repr([(sorted(c.kwargs.items()), c.num_warps, c.num_stages) for c in configs])
    return hashlib.sha256((src + listing).encode("utf-8")).hexdigest()[:16]


def _base_function(fn: Any) -> Callable:
    while not inspect.isfunction(fn):
        fn = fn.fn
    return fn


class TunedKernel:
    """A ``@triton.jit`` kernel launched with a per-key config from memory, the cache files or timing (module doc).

    Attributes read by bench/aot.py and the benchmarks: ``fn`` (the JITFunction), ``configs``,
    ``early_config_prune``, ``key``, ``name`` (``"<module>.<function>"``) and ``best_config`` (the last launch's)."""

    def __init__(self, fn: Any, configs: list[triton.Config], key: list[str], prune_configs_by: dict | None = None,
                 reset_to_zero: list[str] | None = None, restore_value: list[str] | None = None,
                 buckets: list[str] | None = None):
        self.fn = fn
        self.configs = list(configs) or [triton.Config({}, num_warps=4, num_stages=3)]
        self.key = list(key)
        self.buckets = frozenset(buckets or ())
        self.arg_names = list(fn.arg_names)
        self.reset_to_zero = list(reset_to_zero or [])
        self.restore_value = list(restore_value or [])
        prune_configs_by = dict(prune_configs_by or {})
        self.early_config_prune = prune_configs_by.pop("early_config_prune", None)
        if prune_configs_by:  # perf_model / top_k: never used here, and silently ignoring them would mislead
            raise ValueError(f"tuned: prune_configs_by supports only early_config_prune, got "
                             f"{sorted(prune_configs_by)}")
        base = _base_function(fn)
        self.name = f"{base.__module__.rsplit('.', 1)[-1]}.{base.__name__}"
        # a typo in a name list would drop that argument from the key (tuned once, never again) or leave a buffer
        # unzeroed: refuse it at import time, as Triton 3.9's autotuner does
        for what, names in (("key", self.key), ("reset_to_zero", self.reset_to_zero),
                            ("restore_value", self.restore_value), ("buckets", sorted(self.buckets))):
            unknown = [n for n in names if n not in self.arg_names]
            if unknown:
                raise ValueError(f"tuned({self.name}): {what} names {unknown} that are not kernel arguments "
                                 f"({', '.join(self.arg_names)})")
        self.source_hash = source_hash(fn, self.configs)
        self._interpreted = not isinstance(fn, JITFunction)
        self._memory: dict[tuple, _Choice] = {}
        self._lock = threading.Lock()
        self.best_config: triton.Config | None = None
        self.errors: dict[str, dict[str, str]] = {}  # key -> {config label: error} of configs that failed tuning

    def __repr__(self) -> str:
        return f"TunedKernel({self.name}, {len(self.configs)} configs, key={self.key})"

    def forget(self) -> None:
        """Drop the choices remembered in this process (the next launch of each key reads the files again)."""
        with self._lock:
            self._memory.clear()
        self.best_config = None

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)

    # ------------------------------------------------------------------------------------------------ launch
    def run(self, *args: Any, grid: Any, warmup: bool = False, **kwargs: Any) -> Any:
        if warmup:
            return self.warmup(*args, grid=grid, **kwargs)
        nargs = dict(zip(self.arg_names, args))
        key = self._key(args, nargs, kwargs)
        choice = self._memory.get(key)
        if choice is None or not choice.valid():
            choice = self._resolve(key, args, nargs, kwargs, grid)
        config = choice.config
        self.best_config = config
        meta = config.all_kwargs()
        if config.pre_hook is not None or self.reset_to_zero:
            # every launch, not only the trials: the dW kernel and the histogram accumulate with atomics
            self._prepare(config, {**nargs, **kwargs, **meta})
        return self.fn.run(*args, grid=grid, warmup=False, **kwargs, **meta)

    def warmup(self, *args: Any, grid: Any, **kwargs: Any) -> list:
        """Compile every pruned config for these arguments, as Triton's ``Autotuner.warmup``."""
        nargs = dict(zip(self.arg_names, args))
        return [self.fn.warmup(*args, grid=grid, **kwargs, **c.all_kwargs()) for c in self._prune(nargs, kwargs)]

    def _key(self, args: tuple, nargs: dict, kwargs: dict) -> tuple:
        every = {**nargs, **kwargs}
        values = [self._value(name, every) for name in self.key]
        # every tensor argument's dtype, as Triton's autotuner keys on them (fp16 and fp32 want other tiles)
        values += [str(every[name].dtype) for name in self.arg_names if hasattr(every.get(name), "dtype")]
        # and, in memory only, the device: a process driving two GPU models keeps a winner per GPU (the files are
        # per GPU already)
        values.append(next((a.device for a in args if hasattr(a, "data_ptr")), None))
        return tuple(values)

    def _key_string(self, nargs: dict, kwargs: dict) -> str:
        """The file key: ``M=128,PRECISION=ieee;x_ptr=float16,...``: names kept, so a file stays readable."""
        every = {**nargs, **kwargs}
        named = ",".join(f"{name}={self._value(name, every)}" for name in self.key)
        dtypes = ",".join(f"{name}={str(every[name].dtype).replace('torch.', '')}" for name in self.arg_names
                          if hasattr(every.get(name), "dtype"))
        return f"{named};{dtypes}"

    def _value(self, name: str, every: dict) -> Any:
        """A key argument's value; a ``buckets`` one rounded up to a power of two, so that the active-set sizes of
        ALSH / MILF layers, which change from batch to batch, share one tuned entry per octave instead of tuning
        every new count (the prunes clamp tiles to the next power of two of these extents: one bucket, one list)."""
        value = every.get(name)
        if name in self.buckets and isinstance(value, int) and value > 1:
            return 1 << (value - 1).bit_length()
        return value

    def _prune(self, nargs: dict, kwargs: dict) -> list[triton.Config]:
        configs = self.configs
        if self.early_config_prune is not None:
            configs = self.early_config_prune(self.configs, nargs, **kwargs)
            if not configs:
                raise ValueError(f"{self.name}: early_config_prune returned no config")
        return list(configs)

    def _prepare(self, config: triton.Config, full_nargs: dict) -> None:
        if config.pre_hook is not None:
            config.pre_hook(full_nargs)
        for name in self.reset_to_zero:
            if full_nargs.get(name) is not None:
                full_nargs[name].zero_()

    def _remember(self, key: tuple, choice: _Choice) -> _Choice:
        with self._lock:
            self._memory[key] = choice
        return choice

    # ------------------------------------------------------------------------------------------------ choice
    def _resolve(self, key: tuple, args: tuple, nargs: dict, kwargs: dict, grid: Any) -> _Choice:
        pruned = self._prune(nargs, kwargs)
        clash = kwargs.keys() & set().union(*(c.kwargs.keys() for c in pruned))
        if clash:
            raise ValueError(f"{self.name}: {sorted(clash)} passed at launch and set by the tuned configs")
        if len(pruned) == 1:
            tuning.count("single")
            return self._remember(key, _Choice(pruned[0], "single"))
        mode = tuning.autotune_mode()
        key_string = self._key_string(nargs, kwargs)
        identity = tuning.gpu_identity(key[-1])
        version = triton.__version__
        if mode != "full":
            for entry in tuning.lookup(identity, self.name, self.source_hash, key_string, version):
                config = _match(entry, pruned)
                if config is not None:
                    tuning.count("cache_hits")
                    return self._remember(key, _Choice(config, "file"))
        if mode == "off":
            tuning.count("heuristic")
            return self._remember(key, _Choice(pruned[0], "heuristic"))
        config, entry = self._tune(pruned, args, nargs, kwargs, grid, key_string)
        tuning.count("tuned")
        choice = self._remember(key, _Choice(config, "tuned"))
        tuning.record(identity, self.name, self.source_hash, key_string, entry, version)
        return choice

    def _tune(self, pruned: list[triton.Config], args: tuple, nargs: dict, kwargs: dict, grid: Any,
              key_string: str) -> tuple[triton.Config, dict]:
        every = {**nargs, **kwargs}
        saved = {n: every[n].clone() for n in self.restore_value if every.get(n) is not None}
        timer = _timer or self._default_timer
        timings: dict[str, float] = {}
        errors: dict[str, str] = {}
        best, last_error = None, None
        for config in pruned:
            label = tuning.config_label(config)
            meta = config.all_kwargs()

            def launch(config=config, meta=meta):
                self._prepare(config, {**every, **meta})
                try:
                    self.fn.run(*args, grid=grid, warmup=False, **kwargs, **meta)
                finally:
                    for name, value in saved.items():
                        every[name].copy_(value)

            try:
                ms = float(timer(self.name, config, launch))
                if not math.isfinite(ms):
                    raise RuntimeError(f"the timer returned {ms} ms")
            except Exception as exc:  # out of resources, a compile error: skip the config, keep its error
                errors[label], last_error = f"{type(exc).__name__}: {exc}", exc
                continue
            timings[label] = ms
            if best is None or ms < timings[tuning.config_label(best)]:  # ties keep the earlier (preferred) config
                best = config
        if errors:
            self.errors[key_string] = errors
        if best is None:
            message = f"{self.name}: all {len(pruned)} configs failed while tuning key {key_string}"
            if hasattr(last_error, "add_note"):  # Python 3.11+: the original error (type kept), the kernel named
                last_error.add_note(message)
                raise last_error
            raise RuntimeError(message) from last_error
        entry = {"kwargs": dict(best.kwargs), "num_warps": best.num_warps, "num_stages": best.num_stages,
                 "ms": timings[tuning.config_label(best)], "timings_ms": timings,
                 "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if errors:
            entry["errors"] = errors
        return best, entry

    def _default_timer(self, name: str, config: triton.Config, launch: Callable[[], Any]) -> float:
        if self._interpreted:
            # the interpreter has no device timer (do_bench needs CUDA events): the median of 3 wall-clock runs after
            # a first one, only meaningful for ranking configs in tests of this module
            launch()
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                launch()
                runs.append((time.perf_counter() - start) * 1e3)
            return sorted(runs)[1]
        from triton.testing import do_bench  # (import triton does not import triton.testing)

        return do_bench(launch, return_mode="median")


def _match(entry: dict, pruned: list[triton.Config]) -> triton.Config | None:
    """The pruned config a file entry names (its pre_hook comes with it), or None."""
    try:
        kwargs, warps, stages = entry["kwargs"], entry["num_warps"], entry["num_stages"]
    except (KeyError, TypeError):
        return None
    for config in pruned:
        if config.kwargs == kwargs and config.num_warps == warps and config.num_stages == stages:
            return config
    return None


def tuned(configs: list[triton.Config], key: list[str], prune_configs_by: dict | None = None,
          reset_to_zero: list[str] | None = None, restore_value: list[str] | None = None,
          buckets: list[str] | None = None) -> Callable[[Any], TunedKernel]:
    """Decorator over ``@triton.jit``: ``triton.autotune``'s arguments, the winners kept per GPU (module doc).

    ``configs`` are ordered by preference: mode ``off`` launches the first one left after pruning. ``buckets``:
    key arguments (a subset of ``key``) whose values are rounded up to a power of two in the key."""

    def decorator(fn: Any) -> TunedKernel:
        return TunedKernel(fn, configs, key, prune_configs_by, reset_to_zero, restore_value, buckets)

    return decorator
