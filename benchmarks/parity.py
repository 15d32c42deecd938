"""JAX against the PyTorch reference: the comparisons behind `vs_pytorch.py` and the parity test.

Relative L2 errors of the distillation outputs (loss, image gradient, lr
gradient) or of one expert epoch's parameter update over the same fixed
minibatches; `check_parity` scales the float32 tolerance to torch's own
float32 spread, and `float64_check` compares both sides in float64.
"""

import contextlib

import numpy as np

from benchmarks import runners
from benchmarks.bench_settings import Problem
from benchmarks.bench_settings import Setting

SPREAD_FACTOR = 3.0  # JAX may differ from torch by this many times torch's own float32 spread.
FLOAT64_RTOL = 1e-8  # Relative agreement required of the two sides in float64.
_SHORT_NAMES = {"loss": "loss", "image_grad": "img", "lr_grad": "lr", "update": "update"}


def relative(a: np.ndarray, b: np.ndarray) -> dict:
  """max |a - b| and ||a - b|| / ||b|| (b the reference value)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  norm = float(np.linalg.norm(b.ravel()))
  diff = float(np.linalg.norm((a - b).ravel()))
  return {
    "max_abs": float(np.max(np.abs(a - b))) if a.size else 0.0,
    "rel": diff / norm if norm else diff,
  }


def compare_distill(result: dict, reference: dict) -> dict:
  """Errors of the loss, image gradient and lr gradient of `result` against `reference`."""
  return {key: relative(result[key], reference[key]) for key in ("loss", "image_grad", "lr_grad")}


def compare_expert(end: np.ndarray, reference_end: np.ndarray, start: np.ndarray) -> dict:
  """Errors of one epoch's parameter update (end - start) against a reference update."""
  return {"update": relative(end - start, reference_end - start)}


def fixed_batches(setting: Setting, seed: int) -> np.ndarray:
  """A seeded minibatch order [steps, batch] of one epoch (remainder dropped)."""
  steps = setting.num_train // setting.batch_size
  order = np.random.default_rng(seed).permutation(setting.num_train)
  return order[: steps * setting.batch_size].reshape(steps, setting.batch_size)


def jax_expert_end(
  jax_runner: runners.JaxExpert, problem: Problem, batches: np.ndarray
) -> np.ndarray:
  """JAX end parameters after one epoch over `batches`, as a torch-order flat vector."""
  end = jax_runner.on_batches(problem.params, problem.images, problem.labels, batches)
  return runners.torch_flat(end, jax_runner.setting)


def torch_expert_end(torch_runner: runners.TorchExpert, batches: np.ndarray) -> np.ndarray:
  """torch end parameters after one epoch over `batches` (flat)."""
  torch_runner.reset()
  torch_batches = torch_runner.torch.from_numpy(batches).to(torch_runner.device)
  return torch_runner.run(torch_batches).cpu().numpy()


@contextlib.contextmanager
def exact_torch_convolutions(torch):
  """Turns off oneDNN convolutions (CPU: im2col + GEMM) and TF32 (GPU) inside the block."""
  saved = (
    torch.backends.mkldnn.enabled,
    torch.backends.cudnn.allow_tf32,
    torch.backends.cuda.matmul.allow_tf32,
  )
  torch.backends.mkldnn.enabled = False
  torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
  try:
    yield
  finally:
    (
      torch.backends.mkldnn.enabled,
      torch.backends.cudnn.allow_tf32,
      torch.backends.cuda.matmul.allow_tf32,
    ) = saved


def check_parity(
  setting: Setting,
  framework_runners: dict,
  outputs: dict,
  problem: Problem,
  seed: int,
  loss_rtol: float,
  grad_rtol: float,
) -> dict:
  """JAX against torch (as timed) in float32, with a tolerance scaled to float32 rounding.

  Some image gradients are ill-conditioned: on CIFAR shapes, float32 puts
  both frameworks a few 1e-3 (relative L2) away from a float64 evaluation.
  So torch is also run with its other float32 convolution path (oneDNN off
  on CPU, TF32 off on GPU); the gap between its two results is its float32
  spread, and JAX passes a quantity when its error against torch is within
  max(rtol, SPREAD_FACTOR * spread). `--float64_check` settles it exactly.
  `framework_runners` and `outputs` map "jax" and "torch" to a runner and
  to its first run's output.
  """
  jax_runner, torch_runner = framework_runners["jax"], framework_runners["torch"]
  torch = torch_runner.torch
  if setting.kind == "distill":
    torch_result = torch_runner.result(outputs["torch"])
    errors = compare_distill(jax_runner.result(outputs["jax"]), torch_result)
    with exact_torch_convolutions(torch):
      spread = compare_distill(torch_runner.result(torch_runner.run()), torch_result)
    errors["loss"]["jax"] = float(outputs["jax"][0])
    errors["loss"]["torch"] = float(torch_result["loss"])
  else:
    batches = fixed_batches(setting, seed)
    start = torch_runner.flat.cpu().numpy()
    torch_end = torch_expert_end(torch_runner, batches)
    errors = compare_expert(jax_expert_end(jax_runner, problem, batches), torch_end, start)
    with exact_torch_convolutions(torch):
      spread = compare_expert(torch_expert_end(torch_runner, batches), torch_end, start)
  tolerance = {
    key: max(loss_rtol if key == "loss" else grad_rtol, SPREAD_FACTOR * spread[key]["rel"])
    for key in errors
  }
  ok = all(errors[key]["rel"] <= tolerance[key] for key in errors)
  return {"ok": bool(ok), "errors": errors, "torch_spread": spread, "tolerance": tolerance}


def float64_check(setting: Setting, ends: dict, problem64: Problem) -> dict:
  """Both sides in float64 must agree; then each side's float32 error against float64.

  `ends` maps (framework, "float32" or "float64") to a runner's result
  (distill) or to its flat end parameters (expert); `problem64` is the
  float64 problem they started from.
  """
  if setting.kind == "distill":
    compare = compare_distill
  else:
    start = runners.torch_flat(problem64.params, setting)
    compare = lambda end, reference: compare_expert(end, reference, start)
  truth = ends[("jax", "float64")]
  agreement = compare(ends[("torch", "float64")], truth)
  return {
    "ok": all(error["rel"] <= FLOAT64_RTOL for error in agreement.values()),
    "float64_torch_vs_jax": agreement,
    "float32_error_jax": compare(ends[("jax", "float32")], truth),
    "float32_error_torch": compare(ends[("torch", "float32")], truth),
  }


def errors_text(errors: dict, spread: dict | None = None) -> str:
  """Relative errors per quantity, each with torch's own float32 spread in brackets."""
  parts = []
  for key, error in errors.items():
    part = f"{_SHORT_NAMES[key]} {error['rel']:.1e}"
    if spread is not None:
      part += f" ({spread[key]['rel']:.0e})"
    parts.append(part)
  return ", ".join(parts)


def parity_text(parity: dict | None) -> str:
  """One line summarising a `check_parity` result."""
  if not parity:
    return "-"
  return ("ok: " if parity["ok"] else "FAIL: ") + errors_text(
    parity["errors"], parity["torch_spread"]
  )
