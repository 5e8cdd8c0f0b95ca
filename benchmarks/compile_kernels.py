"""Where a step's compile time goes: its XLA kernels counted by the source line that made them.

    python benchmarks/compile_kernels.py                    # sgd (the model), AdamW and kron
    python benchmarks/compile_kernels.py --optimizers kron --top 40

XLA:CPU's compile time follows the number of distinct kernels it generates code for (on the
example GPT about 13 ms each on 2 cores; it reuses one kernel for identical computations, and
its log says which), so counting them by origin says what to cut. The compiled
step's HLO text carries, per instruction, a stack frame id; its ``FileNames``,
``FunctionNames``, ``FileLocations`` and ``StackFrames`` tables map that to a Python call
stack. Each kernel (every instruction of a non-fused computation but parameters, constants,
tuples, bitcasts and copies) is attributed to its innermost psgd_optax or optax frame, else
to its innermost frame; instructions with no frame (XLA:CPU's halves of a split reduction,
``reduce-window``) count as ``(no frame)``. ``fit`` is the part inside the fit's
``lax.cond`` branch. Prints, per optimizer: the compile's phases (tracing, lowering to
StableHLO, XLA; each in a fresh process, ``--repeats`` times in interleaved rounds, the
median), the kernels (total, distinct, the fit's share) and the top origins. ``sgd``
(``optax.sgd``) is the model's own compile: an optimizer's cost is what it adds to it.
``kron_nofit`` is kron's step with the fit's ``lax.cond`` reduced to the branch that keeps
``Q`` (a patch in its own process, not an option): the difference to ``kron`` is the fit's.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

# XLA's own log of the step's compile (which kernels it reuses), read from the child's stderr.
_XLA_LOG = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0",
                TF_CPP_VMODULE="cpu_compiler=1,thunk_emitter=1")
_SKIPPED = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw", "kron"],
                      help="examples/gpt.py's optimizer names, sgd (the model alone), or "
                      "kron_nofit (kron's step without its fit)")
  parser.add_argument("--repeats", type=int, default=3,
                      help="fresh-process compiles per optimizer, in interleaved rounds")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, default=32, help="sequences per batch")
  parser.add_argument("--top", type=int, default=20, help="origins listed per optimizer")
  return parser.parse_args(argv)


def _table(text, first, following):
  start = text.index("\n" + first + "\n") + len(first) + 2
  return text[start:text.index("\n" + following + "\n", start)]


def kernel_origins(hlo_text: str):
  """``(Counter of origin → kernels, kernels per computation, the entry computation)`` of a
  compiled HLO text."""
  files = dict(re.findall(r'^(\d+) "(.*)"$', _table(hlo_text, "FileNames", "FunctionNames"),
                          re.M))
  functions = dict(re.findall(r'^(\d+) "(.*)"$',
                              _table(hlo_text, "FunctionNames", "FileLocations"), re.M))
  locations = {key: (file, function) for key, file, function in re.findall(
      r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+)",
      _table(hlo_text, "FileLocations", "StackFrames"), re.M)}
  frames = dict((key, (location, parent)) for key, location, parent in re.findall(
      r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)",
      hlo_text[hlo_text.index("\nStackFrames\n"):], re.M))

  def origin(frame):
    stack, seen = [], set()
    while frame in frames and frame not in seen:
      seen.add(frame)
      location, parent = frames[frame]
      file, function = locations[location]
      stack.append((files[file], functions[function]))
      frame = parent
    for file, function in stack:
      if "psgd_optax" in file or "/optax/" in file:
        return f"{os.path.basename(file)}:{function}"
    return f"{os.path.basename(stack[0][0])}:{stack[0][1]}" if stack else "(no frame)"

  origins, per_computation = collections.Counter(), collections.Counter()
  computation = entry = None
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY )?%(\S+) .*\{$", line)
    if header:
      computation = header.group(2)
      entry = computation if header.group(1) else entry
      continue
    if computation is None or "fused" in computation or computation.startswith("wrapped_"):
      continue
    instruction = re.match(r"\s+%\S+ = \S+ (\w[\w-]*)\(", line)
    if not instruction or instruction.group(1) in _SKIPPED:
      continue
    frame = re.search(r"stack_frame_id=(\d+)", line)
    origins[origin(frame.group(1)) if frame else "(no frame)"] += 1
    per_computation[computation] += 1
  return origins, per_computation, entry


def measure_one(name, args):
  """``--one NAME``: in this fresh process, the step's compile phases and kernel counts (and
  the origins), as one JSON line."""
  import json
  import time
  import jax
  import jax.numpy as jnp
  import optax
  import gpt
  if name == "kron_nofit":
    # kron's step as if it never fitted Q: the fit's lax.cond keeps only its other branch
    # (this process only). kron's compile less this one is what the fit costs.
    jax.lax.cond = lambda pred, fit, keep, *operands: keep(*operands)
    name = "kron"
  jax.jit(lambda x: x + 1).lower(jnp.ones(2)).compile()  # XLA's one-time start-up
  config = gpt.parse_args(["--batch", str(args.batch), "--no-progress", "--no-plot"])
  data = gpt.split_text(gpt.load_text())
  run = gpt.Run(config, name, 0.1 if name == "sgd" else gpt.LEARNING_RATES[name], 0, *data,
                tx=optax.sgd(0.1) if name == "sgd" else None, compile_first=False)
  start = time.perf_counter()
  traced = run.jitted.trace(*run.first_args)
  traced_at = time.perf_counter()
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  text = lowered.compile().as_text()
  done = time.perf_counter()
  origins, per_computation, entry = kernel_origins(text)
  # The fit's branch: the largest computation other than the entry.
  branches = [c for c in per_computation if c != entry]
  print(json.dumps({
      "phases": [traced_at - start, lowered_at - traced_at, done - lowered_at],
      "kernels": sum(per_computation.values()),
      "fit": per_computation[max(branches, key=per_computation.get)] if branches else 0,
      "origins": origins.most_common(args.top)}))


def main(argv=None):
  args = parse_args(argv)
  if args.one:
    return measure_one(args.one, args)
  import json
  import subprocess
  import numpy as np
  results = {name: [] for name in args.optimizers}
  for _ in range(args.repeats):  # interleaved rounds: load on the machine hits all alike
    for name in args.optimizers:
      done = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name,
                             "--batch", str(args.batch), "--top", str(args.top)],
                            capture_output=True, text=True, check=True, env=_XLA_LOG)
      result = json.loads(done.stdout.strip().splitlines()[-1])
      # XLA:CPU logs each kernel it reuses for an identical one instead of generating code.
      step_log = done.stderr[done.stderr.rfind("Compiling: jit_step"):]
      result["distinct"] = result["kernels"] - step_log.count("Reusing kernel")
      results[name].append(result)
  print(f"byte GPT of examples/gpt.py, batch {args.batch}; each step's first compile in a "
        f"fresh process, median of {args.repeats} (s); kernels: what XLA:CPU runs, distinct: "
        "after it reuses one kernel for identical ones")
  print(f"{'optimizer':<12}{'trace':>7}{'lower':>7}{'XLA':>7}{'total':>7}{'vs adamw':>9}"
        f"{'over sgd':>9}{'kernels':>9}{'distinct':>9}{'in fit':>8}")
  medians = {name: np.median([r["phases"] for r in runs], axis=0)
             for name, runs in results.items()}
  model = medians["sgd"].sum() if "sgd" in medians else None
  adamw = medians["adamw"].sum() if "adamw" in medians else None
  for name, runs in results.items():
    trace, lower, xla = medians[name]
    total = trace + lower + xla
    over = "" if model is None else f"{total - model:.2f}"
    ratio = "" if adamw is None else f"{total / adamw:.2f}"
    last = runs[-1]
    print(f"{name:<12}{trace:>7.2f}{lower:>7.2f}{xla:>7.2f}{total:>7.2f}{ratio:>9}"
          f"{over:>9}{last['kernels']:>9}{last['distinct']:>9}{last['fit'] or '':>8}")
  for name, runs in results.items():
    print(f"\n{name}: kernels by origin")
    for where, count in runs[-1]["origins"]:
      print(f"  {count:5d}  {where}")


if __name__ == "__main__":
  main()
