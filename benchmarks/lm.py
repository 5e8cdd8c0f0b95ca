"""The language-model protocol: examples/gpt.py's byte GPT, every optimizer at its best rate.

    python benchmarks/lm.py                        # the full protocol (hours on 2 CPU cores)
    python benchmarks/lm.py --steps 300 --json lm.json
    python benchmarks/lm.py --timing-only          # compile, step time and memory only
    python benchmarks/lm.py --no-timing --runs-dir runs   # the runs, resumable; then
    python benchmarks/lm.py --runs-dir runs --plot lm.png   # adds the timing to the kept runs

1. Timing: each step's compile (``jit(...).lower(...).compile()``, the first step's compile
   time) in a fresh process, ``--compile-repeats`` times in interleaved rounds (the
   median); then, all optimizers in one process, rounds of
   ``--timing-steps`` steps run interleaved across the optimizers (so load on the machine
   hits all alike); the median round gives the step time. Peak memory is XLA's account of
   the compiled step (arguments + outputs + temporaries − aliased).
2. Sweep: every optimizer over its learning-rate grid (``--grid NAME=LR,LR,...`` replaces
   one), seed 0, warmup + cosine (examples/gpt.py's schedule).
3. Seeds: each optimizer's best rate again on the other ``--seeds``; any other rate whose
   runs on every seed are kept in ``--runs-dir`` also gets a row.

Prints, per optimizer: best peak rate, mean final validation loss over seeds, steps and
seconds (steps × the interleaved step time + compile) to reach AdamW's final validation
loss, the compile time and step time as ratios to AdamW's, and peak memory. ``kron`` is
``psgd.optimizers.kron`` at its default rate and is also swept; ``psgdax`` runs when that
package is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import gpt  # noqa: E402  (examples/gpt.py)

GRIDS = {  # AdamW first: the others are measured against it
    "adamw": [3e-4, 1e-3, 3e-3, 1e-2],
    "kron": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],  # 0.1: the best was 3e-2, the top of 4
    "kron_newton": [0.03, 0.1, 0.3, 1.0],
    "muon": [0.01, 0.02, 0.05, 0.1],
    "psgdax": [1e-3, 3e-3, 1e-2, 3e-2],
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--steps", type=int, default=2000, help="training steps per run")
  parser.add_argument("--batch", type=int, default=32, help="sequences per batch")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                      help="seeds at the best rate (the first also runs the sweep)")
  parser.add_argument("--optimizers", nargs="+", default=None,
                      help="subset of " + ", ".join(GRIDS))
  parser.add_argument("--grid", action="append", default=[],
                      help="NAME=LR,LR,... replaces an optimizer's learning-rate grid")
  parser.add_argument("--timing-steps", type=int, default=10, help="steps per timing round")
  parser.add_argument("--timing-rounds", type=int, default=5, help="timing rounds")
  parser.add_argument("--compile-repeats", type=int, default=3,
                      help="fresh-process compiles per optimizer, interleaved; the median "
                      "is reported")
  parser.add_argument("--compile-only", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--timing-only", action="store_true", help="skip sweep and seeds")
  parser.add_argument("--eval-every", type=int, default=50, help="steps between validations")
  parser.add_argument("--baseline", default=None,
                      help="another checkout: its kron joins the timing as kron_baseline")
  parser.add_argument("--no-timing", action="store_true",
                      help="skip the timing part (runs only; the seconds columns stay empty)")
  parser.add_argument("--runs-dir", default=None,
                      help="keep each training run's curves here and reuse them: the protocol "
                      "resumes across processes, and a later call adds the timing to them")
  parser.add_argument("--kept-only", action="store_true",
                      help="train nothing: the table from the runs kept in --runs-dir, an "
                      "optimizer whose sweep or seeds are not all there listed as incomplete")
  parser.add_argument("--json", default=None, help="write the results here")
  parser.add_argument("--plot", default=None,
                      help="save the table's rows' validation curves (mean over seeds) here")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  for entry in args.grid:
    name, _, rates = entry.partition("=")
    GRIDS[name] = [float(r) for r in rates.split(",")]
  return args


def available(names):
  try:
    import psgdax  # noqa: F401
  except ImportError:
    names = [n for n in names if n != "psgdax"]
  return names


BASELINE = None  # --baseline: another checkout's psgd_optax (benchmarks/_checkout.py)


PSGD = ("kron", "kron_newton", "psgdax", "kron_baseline")  # fit Q on some steps only


def other_optimizer(name, peak, steps, probability=None):
  """The optimizers examples/gpt.py does not know (psgdax's Kron, the baseline's kron), and
  the PSGD ones with a fixed update probability (``None``: their default schedule)."""
  forced = {} if probability is None else {"update_probability": probability}
  if name == "psgdax":
    import psgdax
    if probability is not None:
      forced = {"preconditioner_update_probability": probability}
    # A key of its own: psgdax's default is one module-level array, which a donated state
    # deletes after the first run.
    import jax
    return psgdax.kron(learning_rate=gpt.warmup_cosine(peak, steps), weight_decay=0.1,
                       key=jax.random.PRNGKey(42), **forced)
  if name == "kron_baseline":
    return BASELINE.optimizers.kron(learning_rate=gpt.warmup_cosine(peak, steps),
                                    weight_decay=0.1, **forced)
  if forced:
    return gpt.make_optimizer(name, peak, steps, **forced)
  return None


def update_probability(name):
  """The default update-probability schedule of a PSGD optimizer, as a function of step."""
  if name == "psgdax":
    import psgdax.psgd
    return psgdax.psgd.precond_update_prob_schedule()
  import psgd_optax as psgd
  return psgd.update_probability_schedule()


def expected_seconds(name, steps, timing):
  """Seconds for ``steps`` steps (fractional: the target is met between validations):
  compile, then for PSGD each step a fitting one with its schedule's probability."""
  import numpy as np
  if steps is None:
    return None
  if "skip" not in timing:
    return timing["compile"] + steps * timing["step"]
  count = int(np.ceil(steps))
  p = np.asarray(update_probability(name)(np.arange(count)), np.float64).reshape(count)
  p[0] = 1.0  # the first step always fits
  weights = np.minimum(1.0, steps - np.arange(count))  # the last step counts in part
  return timing["compile"] + float(np.sum(weights * (p * timing["step"]
                                                     + (1 - p) * timing["skip"])))


def model_args(args):
  """examples/gpt.py's settings for this protocol (its default model)."""
  return gpt.parse_args(["--steps", str(args.steps), "--batch", str(args.batch),
                         "--eval-every", str(args.eval_every)]
                        + (["--no-progress"] if args.no_progress else []))


def make_run(config, name, peak, seed, data, probability=None):
  return gpt.Run(config, name, peak, seed, *data,
                 tx=other_optimizer(name, peak, config.steps, probability))


def timing_rate(name):
  """The peak rate an optimizer is timed at: the middle of its grid."""
  return GRIDS[name][len(GRIDS[name]) // 2]


def timing(config, names, data, args):
  """name → {compile, step, memory[, skip]}: each optimizer's default step compiled
  ``--compile-repeats`` times, each in a fresh process as a user's first step is, in
  interleaved rounds (the median), then steps timed in interleaved rounds. A PSGD
  optimizer's ``step`` is a step that fits ``Q`` (update probability 1) and ``skip`` one
  that does not (0)."""
  import numpy as np
  runs = {name: make_run(config, name, timing_rate(name), 0, data) for name in names}
  compiles = {name: [] for name in names}
  for _ in range(args.compile_repeats):
    for name in names:
      compiles[name].append(fresh_compile_seconds(name, args))
  timed = {}
  for name in names:
    if name in PSGD:
      rate = timing_rate(name)
      timed[name] = make_run(config, name, rate, 0, data, probability=1.0)
      timed[name + " skip"] = make_run(config, name, rate, 0, data, probability=0.0)
    else:
      timed[name] = runs[name]
  for run in timed.values():
    run.train_steps(2)  # warm caches (and the always-fitting first step), outside the rounds
  rounds = {key: [] for key in timed}
  for _ in range(args.timing_rounds):
    for key, run in timed.items():
      rounds[key].append(run.train_steps(args.timing_steps)[1] / args.timing_steps)
  results = {}
  for name, run in runs.items():
    memory = run.step.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    results[name] = {"compile": float(np.median(compiles[name])),
                     "step": float(np.median(rounds[name])), "memory_mb": peak / 2**20}
    if name in PSGD:
      results[name]["skip"] = float(np.median(rounds[name + " skip"]))
  return results


def fresh_compile_seconds(name, args):
  """The first step's compile time of ``name`` in a new Python process (in a long-lived
  process that has compiled other steps, compiles measured 10–30 % apart run to run)."""
  import subprocess
  command = [sys.executable, os.path.abspath(__file__), "--compile-only", name,
             "--batch", str(args.batch), "--steps", str(args.steps)]
  if args.baseline:
    command += ["--baseline", args.baseline]
  done = subprocess.run(command, capture_output=True, text=True, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])["compile"]


def compile_once(config, name, data):
  """``--compile-only``: one compile, after a trivial one (XLA's one-time start-up)."""
  import jax
  import jax.numpy as jnp
  jax.jit(lambda x: x + 1).lower(jnp.ones(2)).compile()
  run = make_run(config, name, timing_rate(name), 0, data)
  print(json.dumps({"compile": run.compile_seconds}))


def run_path(config, name, peak, seed, args):
  """Where ``cached_run`` keeps a run (``None`` without ``--runs-dir``)."""
  if not args.runs_dir:
    return None
  return os.path.join(args.runs_dir, f"{name}_lr{peak:g}_seed{seed}_steps{config.steps}"
                      f"_batch{config.batch}_eval{config.eval_every}.json")


def cached_run(config, name, peak, seed, data, args):
  """``gpt.train_run``, kept in ``--runs-dir`` (one JSON per run, with the commit it ran
  on) so that a protocol of many CPU-hours can resume where a process stopped."""
  path = run_path(config, name, peak, seed, args)
  if path is not None:
    os.makedirs(args.runs_dir, exist_ok=True)
  kept = path is not None and os.path.exists(path)
  if not kept and args.kept_only:
    return None
  if kept:
    with open(path) as f:
      result = json.load(f)
  else:
    result = gpt.train_run(config, name, peak, seed, data, make_run)
    if path:
      result["commit"] = current_commit()
      with open(path + ".partial", "w") as f:
        json.dump(result, f)
      os.replace(path + ".partial", path)
  print(f"  {name:<12} lr {peak:<8.3g} seed {seed}: final valid {result['valid'][-1]:.4f}"
        + (f" (kept, commit {result.get('commit', '?')})" if kept else ""), flush=True)
  return result


def current_commit():
  import subprocess
  done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.abspath(__file__)))
  return done.stdout.strip() or "?"


def sweep_and_seeds(config, names, data, args):
  """Each optimizer in turn: its grid on the first seed, then the other seeds at its best
  rate (kron also at its default rate, where that is not the best), and at any other rate
  of its grid whose seeds are all kept in ``--runs-dir`` (a rate run on every seed by hand,
  such as a safer one beside a best rate that diverged on a seed). With ``--kept-only``
  an optimizer whose sweep misses a run has no ``best``, and a missing seed no curve.
  Returns ``(curves, finals, best, rows)``, ``rows`` the ``(name, rate)`` pairs the seeds
  ran at, each optimizer's best first."""
  curves, finals, best, rows = {}, {}, {}, []
  for name in names:
    for peak in GRIDS[name]:
      result = cached_run(config, name, peak, args.seeds[0], data, args)
      if result is not None:
        finals[(name, peak)] = result["valid"][-1]
        curves[(name, peak, args.seeds[0])] = result
    if any((name, peak) not in finals for peak in GRIDS[name]):
      continue
    best[name] = min(GRIDS[name], key=lambda p, n=name: finals[(n, p)])
    others = {peak for peak in GRIDS[name] if all(
        (path := run_path(config, name, peak, seed, args)) and os.path.exists(path)
        for seed in args.seeds)}
    if name == "kron":
      others.add(gpt.default_kron_rate())
    rates = [best[name]] + sorted(others - {best[name]})
    for peak in rates:
      for seed in args.seeds:
        if (name, peak, seed) not in curves:
          result = cached_run(config, name, peak, seed, data, args)
          if result is not None:
            curves[(name, peak, seed)] = result
    rows += [(name, peak) for peak in rates]
  return curves, finals, best, rows


def main(argv=None):
  args = parse_args(argv)
  global BASELINE
  if args.baseline:
    from _checkout import load_baseline
    BASELINE = load_baseline(args.baseline)
    GRIDS["kron_baseline"] = GRIDS["kron"]
  import jax
  names = available(args.optimizers or list(GRIDS))
  if args.baseline and "kron_baseline" not in names:
    names.append("kron_baseline")
  config = model_args(args)
  data = gpt.split_text(gpt.load_text())
  if args.compile_only:
    return compile_once(config, args.compile_only, data)
  print(f"byte GPT {config.layers}x{config.width}, context {config.context}, batch "
        f"{args.batch}, {args.steps} steps; {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs", flush=True)
  times = {} if args.no_timing else timing(config, names, data, args)
  names = [name for name in names if name != "kron_baseline"]  # timing only
  if times:
    print_timing(times)
  report = {"args": vars(args), "timing": times}
  if not args.timing_only:
    report.update(protocol(config, names, data, times, args))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)


def print_timing(times):
  base = times.get("adamw", next(iter(times.values())))
  print(f"\n{'optimizer':<14}{'compile s':>10}{'ratio':>7}{'step ms':>9}{'ratio':>7}"
        f"{'no-fit ms':>11}{'ratio':>7}{'memory MB':>11}")
  for name, t in times.items():
    skip = (f"{1e3 * t['skip']:>11.1f}{t['skip'] / base['step']:>7.2f}" if "skip" in t
            else f"{'-':>11}{'-':>7}")
    print(f"{name:<14}{t['compile']:>10.2f}{t['compile'] / base['compile']:>7.2f}"
          f"{1e3 * t['step']:>9.1f}{t['step'] / base['step']:>7.2f}{skip}"
          f"{t['memory_mb']:>11.1f}")


def save_plot(per_row, times, target, path):
  """Validation loss (mean over seeds) against steps and, where timed, against the seconds
  the steps take at the interleaved step times (``expected_seconds``, compile included)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for key, runs in per_row.items():
    name = key.split("@")[0]
    steps = np.asarray(runs[0]["steps"], np.float64)
    valid = np.mean([run["valid"] for run in runs], axis=0)
    axes[0].plot(steps[1:], valid[1:], label=key)
    if name in times:
      seconds = [expected_seconds(name, s, times[name]) for s in steps[1:]]
      axes[1].plot(seconds, valid[1:], label=key)
  for ax in axes:
    ax.axhline(target, color="gray", linestyle=":", linewidth=1)
  axes[0].set_xlabel("step")
  axes[1].set_xlabel("seconds at the measured step times (compile included)")
  axes[0].set_ylabel("validation loss (nats/byte)")
  # From just below the lowest curve to 2.5: the early steps, and a diverged seed's mean,
  # would squash the rest.
  lowest = min(float(np.min(np.mean([run["valid"] for run in runs], axis=0)))
               for runs in per_row.values())
  axes[0].set_ylim(lowest - 0.05, 2.5)
  axes[0].legend(fontsize=8)
  fig.suptitle("byte-level GPT: the table's rows (name@peak rate), mean of seeds "
               "(dotted: AdamW's final)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"saved {path}")


def protocol(config, names, data, times, args):
  """Sweep and seeds, then the table: each optimizer at its best rate (and kron at its
  default rate), mean over seeds, against AdamW's final validation loss."""
  curves, finals, best, rows = sweep_and_seeds(config, names, data, args)
  complete = lambda row: all((*row, seed) in curves for seed in args.seeds)
  missing = [f"{name}@{peak:g}" for name, peak in rows if not complete((name, peak))]
  missing += [f"{name} (sweep)" for name in names if name not in best]
  rows = [row for row in rows if complete(row)]
  if ("adamw", best.get("adamw")) not in rows:
    raise SystemExit("AdamW's runs are incomplete: its final loss is every row's target")
  per_row = {f"{name}@{peak:g}": [curves[(name, peak, s)] for s in args.seeds]
             for name, peak in rows}
  target = gpt.summarize({"adamw": per_row[f"adamw@{best['adamw']:g}"]}, 0.0)["adamw"][0]
  summary = gpt.summarize(per_row, target)
  print(f"\nsweep (seed {args.seeds[0]}, final valid; - not run yet):")
  for name in names:
    print(f"  {name:<12}" + "  ".join(
        f"{p:g}: " + (f"{finals[(name, p)]:.4f}" if (name, p) in finals else "-")
        for p in GRIDS[name]))
  if missing:
    print(f"not in the table (runs missing from {args.runs_dir}): {', '.join(missing)}")
  print(f"\nmean of seeds {args.seeds}; target {target:.4f} (AdamW's final at its best rate)")
  print(f"{'optimizer':<15}{'lr':>7}{'final':>9}{'steps to':>10}{'vs AdamW':>10}"
        f"{'s to':>8}{'vs AdamW':>10}  final of each seed")
  report, adamw_steps, adamw_seconds = {}, None, None
  ratio = lambda x, y: "-" if x is None or not y else f"{x / y:.2f}"
  for name, peak in rows:
    key = f"{name}@{peak:g}"
    final, steps, _, _ = summary[key]
    seconds = expected_seconds(name, steps, times[name]) if name in times else None
    if name == "adamw":
      adamw_steps, adamw_seconds = steps, seconds
    label = name + (" (default)" if name == "kron" and peak == gpt.default_kron_rate() else "")
    each = [run["valid"][-1] for run in per_row[key]]
    print(f"{label:<15}{peak:>7.3g}{final:>9.4g}{gpt.cell(steps, 10, '.0f')}"
          f"{ratio(steps, adamw_steps):>10}{gpt.cell(seconds, 8, '.0f')}"
          f"{ratio(seconds, adamw_seconds):>10}  " + " ".join(f"{v:.4g}" for v in each))
    report[key] = {"lr": peak, "best": peak == best[name], "final": final,
                   "finals": each,
                   "steps_to_target": steps, "seconds_to_target": seconds}
  if args.plot:
    save_plot(per_row, times, target, args.plot)
  return {"rows": report, "target": target,
          "sweep": {f"{n}@{p:g}": v for (n, p), v in finals.items()}}


if __name__ == "__main__":
  main()
