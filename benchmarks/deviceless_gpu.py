"""XLA:GPU compiled for an H100 on a machine without one: the commands a step launches, and
compile time vs depth.

    python -m venv /tmp/cuda && . /tmp/cuda/bin/activate    # 5.6 GB, apart from the dev venv
    pip install -e . "jax[cuda12]==0.10.2" psgdax==0.1.1
    python benchmarks/deviceless_gpu.py               # MLP and transformer, p = 0.1
    python benchmarks/deviceless_gpu.py --donate
    python benchmarks/deviceless_gpu.py --xla-flags=--xla_gpu_enable_command_buffer=-CONDITIONAL
    python benchmarks/deviceless_gpu.py --compile-blocks 4 32

No GPU is used. The CUDA plugin compiles for the H100 described below (CUDA 12.8 driver and
runtime, so conditionals can be recorded into command buffers), and XLA's dump of the thunk
sequence after its thunk passes shows what a launch of the step runs. XLA:GPU records runs
of kernels into command buffers (CUDA graphs) and replays them; a ``lax.cond`` becomes a
conditional node inside a command buffer when conditionals are among the command types
(they are by default) and every command in every branch can be recorded (a loop cannot
unless ``WHILE`` is enabled too); otherwise the host reads the predicate and launches the
taken branch. Before a launch, the recorded commands that use a buffer which has moved since
the last launch (a new params or state buffer, when they are not donated) are updated, in
the branches a step does not take as well.

For the step of ``scale.py --versus psgdax`` (same models, optimizers and settings), one row
per optimizer, for a step that does not fit the preconditioner:

- ``buffers``: command buffers launched (a loop's body counts once);
- ``recorded``: commands in those buffers (the most that an update before the launch can touch);
- ``untaken``: of those, commands in branches of recorded conditionals that such a step
  does not take (the larger branch: the fit);
- ``host conds`` and ``host loops``: conditionals and loops run from the host (each
  iteration or branch reads a predicate back to the host first).

``--compile-blocks`` instead runs ``scale.py``'s compile-time table (the residual MLP of N
identical blocks, and Adam for the model's own share) through the XLA:GPU
pipeline. Without a device there is no autotuning, so each compile is a little shorter
than on a GPU machine; the growth with depth is what it measures.

The thunk dump's text is XLA's debugging output, not an API; the parser below fits the
plugin of jax 0.10.2 and raises if it finds no thunks.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import sys
import tempfile

H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  driver_version: "12.8.0" runtime_version: "12.8.0" compile_time_toolkit_version: "12.8.0"
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

THUNK = re.compile(r"^( *)\d+: (k\w+)")
LABEL = re.compile(r"^ *(\w+):\s*$")  # "true_branch:", "body:", ... (their indent is not reliable)


@dataclasses.dataclass
class Thunk:
  kind: str
  label: str = ""  # the branch or loop part of its parent that it belongs to
  children: list = dataclasses.field(default_factory=list)

  def parts(self):
    grouped = {}
    for child in self.children:
      grouped.setdefault(child.label, []).append(child)
    return list(grouped.values())


def parse_thunks(text):
  """The top-level thunks of a ``*.thunk_sequence_after_thunk_passes.txt`` dump, nested."""
  top, stack, pending = [], [], None
  for line in text.splitlines():
    if match := LABEL.match(line):
      pending = match.group(1)  # for the parent of the next thunk
      continue
    match = THUNK.match(line)
    if not match:
      continue
    indent = len(match.group(1))
    while stack and stack[-1][0] >= indent:
      stack.pop()
    siblings = stack[-1][1].children if stack else top
    # Without a label of its own, a thunk is in the same part as the sibling before it.
    label = pending if pending is not None else (siblings[-1].label if siblings else "")
    pending = None
    thunk = Thunk(match.group(2), label if stack else "")
    siblings.append(thunk)
    stack.append((indent, thunk))
  if not top:
    raise ValueError("no thunks found in the dump: its format is not the one this parser reads")
  return top


def commands(thunks):
  """Every leaf command under ``thunks``, all branches included."""
  return sum(commands(t.children) if t.children else 1 for t in thunks)


@dataclasses.dataclass
class Launch:
  buffers: int = 0
  recorded: int = 0
  untaken: int = 0
  host_conds: int = 0
  host_loops: int = 0


def non_fitting_launch(thunks, launch=None, recorded=False):
  """What a step that does not fit runs: in a conditional the smaller branch is taken."""
  launch = launch or Launch()
  for thunk in thunks:
    if thunk.kind == "kCommandBuffer" and not recorded:
      launch.buffers += 1
      launch.recorded += commands(thunk.children)
      non_fitting_launch(thunk.children, launch, recorded=True)
    elif thunk.kind == "kConditional":
      branches = sorted(thunk.parts(), key=commands)
      if recorded:
        launch.untaken += sum(commands(branch) for branch in branches[1:])
      else:
        launch.host_conds += 1
      non_fitting_launch(branches[0], launch, recorded)
    elif thunk.kind == "kWhile":
      if not recorded:
        launch.host_loops += 1
      for part in thunk.parts():
        non_fitting_launch(part, launch, recorded)
    elif thunk.children:
      non_fitting_launch(thunk.children, launch, recorded)
  return launch


def commands_table(models, probability, donate, dump_dir, place, device):
  """Prints what a non-fitting launch of each optimizer's step runs, per model."""
  import jax  # pylint: disable=import-outside-toplevel
  import scale  # pylint: disable=import-outside-toplevel
  import step_time  # pylint: disable=import-outside-toplevel

  print(f"{device}; update probability {probability}; a step that does not fit"
        + ("; params and state donated" if donate else ""))
  print(f"{'model':<12}{'optimizer':>16}{'buffers':>9}{'recorded':>10}{'untaken':>9}"
        f"{'host conds':>12}{'host loops':>12}")
  builders = {"mlp": step_time.mlp_model, "transformer": step_time.transformer_model}
  for model in models:
    params, loss_fn = builders[model](jax.random.key(0))
    rows = {}
    for name, tx in scale.matched_optimizers(probability).items():
      seen = set(glob.glob(f"{dump_dir}/*.thunk_sequence_after_thunk_passes.txt"))
      step = step_time.optimizer_step(tx, loss_fn, False, donate)
      step.lower(*place((params, jax.eval_shape(tx.init, params)))).compile()
      (dump,) = set(glob.glob(f"{dump_dir}/*.thunk_sequence_after_thunk_passes.txt")) - seen
      with open(dump, encoding="utf-8") as file:
        rows[name] = launch = non_fitting_launch(parse_thunks(file.read()))
      print(f"{model:<12}{name:>16}{launch.buffers:>9}{launch.recorded:>10}"
            f"{launch.untaken:>9}{launch.host_conds:>12}{launch.host_loops:>12}", flush=True)
    theirs = rows["psgdax"]
    for name, ours in rows.items():
      if name != "psgdax":
        print(f"{'':<12}{'ratio':>16}{'':>9}"
              f"{ours.recorded / theirs.recorded:>9.2f}×")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=["mlp", "transformer"],
                      choices=["mlp", "transformer"])
  parser.add_argument("--probability", type=float, default=0.1)
  parser.add_argument("--donate", action="store_true",
                      help="jit the steps with their params and state donated")
  parser.add_argument("--xla-flags", default="", help="more XLA flags for the compiles")
  parser.add_argument("--compile-blocks", type=int, nargs="+", default=None,
                      help="instead, time scale.py's compiles for these numbers of blocks")
  parser.add_argument("--rounds", type=int, default=3,
                      help="compiles per configuration, the fastest kept (--compile-blocks)")
  args = parser.parse_args()

  dump_dir = tempfile.mkdtemp(prefix="deviceless_gpu_")
  dump = ([] if args.compile_blocks else  # the compile times are taken without a dump
          [f"--xla_dump_to={dump_dir}", "--xla_dump_hlo_module_re=jit_step"])
  # Before jax is imported: compile for CUDA from a CPU-only process.
  os.environ |= {"CUDA_VISIBLE_DEVICES": "-1", "JAX_PLATFORMS": "cpu",
                 "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
                 "XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                     args.xla_flags, *dump]))}
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import scale  # pylint: disable=import-outside-toplevel

  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=H100,
                                            topology="1x1x1")
  except (NotImplementedError, RuntimeError) as error:
    raise SystemExit(f"no CUDA compiler: pip install \"jax[cuda12]=={jax.__version__}\" "
                     f"({error})") from error
  mesh = topologies.make_mesh(topology, (1,), ("device",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  place = lambda tree: jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), tree)
  device = (f"device: {topology.devices[0].device_kind}, compiled without a GPU (CUDA 12.8);"
            f" jax {jax.__version__}" + (f"; {args.xla_flags}" if args.xla_flags else ""))
  if args.compile_blocks:
    scale.compile_table(args.compile_blocks, 64, "kron", args.rounds,
                        device + "; no autotuning", place=place)
  else:
    commands_table(args.models, args.probability, args.donate, dump_dir, place, device)


if __name__ == "__main__":
  main()
