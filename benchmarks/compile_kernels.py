"""Where a step's compile time goes: its XLA kernels counted by the source line that made them.

    python benchmarks/compile_kernels.py                    # kron and AdamW on examples/gpt.py
    python benchmarks/compile_kernels.py --optimizers kron --top 40

XLA:CPU's compile time follows the number of kernels it generates code for (on the example
GPT about 7 ms each on 2 cores), so counting them by origin says what to cut. The compiled
step's HLO text carries, per instruction, a stack frame id; its ``FileNames``,
``FunctionNames``, ``FileLocations`` and ``StackFrames`` tables map that to a Python call
stack. Each kernel (every instruction of a non-fused computation but parameters, constants,
tuples, bitcasts and copies) is attributed to its innermost psgd_optax or optax frame, else
to its innermost frame; instructions with no frame (XLA:CPU's halves of a split reduction,
``reduce-window``) count as ``(no frame)``. ``fit`` is the part inside the fit's
``lax.cond`` branch. Prints, per optimizer: the total, the fit's share and the top origins.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

_SKIPPED = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--optimizers", nargs="+", default=["kron", "adamw"],
                      help="examples/gpt.py's optimizer names")
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


def main(argv=None):
  args = parse_args(argv)
  import gpt
  config = gpt.parse_args(["--batch", str(args.batch), "--no-progress", "--no-plot"])
  data = gpt.split_text(gpt.load_text())
  for name in args.optimizers:
    run = gpt.Run(config, name, gpt.LEARNING_RATES[name], 0, *data)
    origins, per_computation, entry = kernel_origins(run.step.as_text())
    # The fit's branch: the largest computation other than the entry.
    branches = [c for c in per_computation if c != entry]
    fit = max(branches, key=per_computation.get) if branches else None
    total = sum(per_computation.values())
    print(f"\n{name}: {total} kernels, compile {run.compile_seconds:.2f} s"
          + (f"; the fit's branch {per_computation[fit]}" if fit and name != "adamw" else ""))
    for where, count in origins.most_common(args.top):
      print(f"  {count:5d}  {where}")


if __name__ == "__main__":
  main()
