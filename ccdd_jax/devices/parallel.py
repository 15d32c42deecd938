"""Independent programs run at once: expert groups, the two distillations.

On CPU, XLA keeps about one core busy per small program, so running
independent programs concurrently on a thread pool is what uses the other
cores (docs/performance.md, section 5). Concurrency never changes a result.
"""

from collections.abc import Callable
import concurrent.futures
import os
import threading

import jax


def resolve_concurrency(concurrency: int) -> int:
  """Programs run at once for a config's `concurrency` (0 = one per CPU core on CPU, else 1).

  Always 1 in a multi-process run: every process must launch the same
  programs in the same order, which threads would not keep.
  """
  if jax.process_count() > 1:
    return 1
  if concurrency:
    return concurrency
  return (os.cpu_count() or 1) if jax.default_backend() == "cpu" else 1


def run_concurrently(
  fn: Callable, inputs: list[tuple], workers: int, on_done: Callable[[int, int], None] | None = None
) -> list:
  """[fn(*args) for args in inputs], up to `workers` calls at once, results in order."""
  done = [0]
  lock = threading.Lock()

  def call(args):
    out = jax.block_until_ready(fn(*args))
    with lock:
      done[0] += 1
      if on_done is not None:
        on_done(done[0], len(inputs))
    return out

  workers = min(workers, len(inputs))
  if workers <= 1:
    return [call(args) for args in inputs]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(call, inputs))
