"""Benchmarks of ccdd_jax, and its comparison with the PyTorch reference computation of MTT.

Scripts (run from the repository root, `python benchmarks/<name>.py --help`):
`vs_pytorch.py` (JAX against PyTorch: time, memory, parity), `inner_loop.py`
(convolution form x scan unroll), `memory.py` (XLA's memory plan per remat
policy), `experts_parallel.py` (vmapped and concurrent experts).

The modules behind `vs_pytorch.py`, each importable as `from benchmarks import ...`:
- `bench_settings`: the named settings and the problem (parameters, data) of each.
- `torch_mtt`: the MTT reference computation in PyTorch.
- `runners`: the JAX and PyTorch computations of one setting, ready to time.
- `parity`: JAX against PyTorch: the comparisons, fixed batches and tolerances.
- `memory_probe`: peak-memory readings and a child process watched for memory and time.
- `workers`: what one worker process measures (timing, float64 check, peak memory).
"""
