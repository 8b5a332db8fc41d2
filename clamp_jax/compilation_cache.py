"""jax's persistent compilation cache (`config.compilation_cache`): every XLA program a run
compiles is written to a folder, and a later run (a rerun, a resumed run, another seed) that
needs a program of the same shapes reads it instead of compiling. On a GPU, compiling is most of
the search's first pass (BENCHMARKS.md, issue 12)."""

import contextlib
import os

from absl import logging
import jax

HIT = "/jax/compilation_cache/cache_hits"
MISS = "/jax/compilation_cache/cache_misses"
SAVED = "/jax/compilation_cache/compile_time_saved_sec"


def check(path: str) -> None:
  """Raises ValueError naming config.compilation_cache when `path` cannot be a folder."""
  path = os.path.expanduser(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"config.compilation_cache={path!r} is a file, not a folder")


@contextlib.contextmanager
def compilation_cache(path: str):
  """Within the context, jax reads and writes its compiled programs in `path` ("": no cache),
  whatever their compile time; on leaving it, logs how many were read and written. Enter it
  before the process compiles anything: jax decides once, at its first compilation, whether it
  uses a cache."""
  if not path:
    yield
    return
  check(path)
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  counts = {HIT: 0, MISS: 0, SAVED: 0.0}

  def count(event, **_):
    if event in counts:
      counts[event] += 1

  def saved(event, seconds, **_):
    if event == SAVED:
      counts[SAVED] += seconds

  jax.monitoring.register_event_listener(count)
  jax.monitoring.register_event_duration_secs_listener(saved)
  try:
    yield
  finally:
    jax.monitoring.unregister_event_listener(count)
    jax.monitoring.unregister_event_duration_listener(saved)
    logging.info("compilation cache %s: %d programs read from it (%.0fs of compiling saved), "
                 "%d compiled and written", path, counts[HIT], counts[SAVED], counts[MISS])
