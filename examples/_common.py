"""Pieces shared by the examples: the loop over seeds, the curve plot."""

from __future__ import annotations

import numpy as np


def compare_over_seeds(optimizers, seeds, load_data, train, names=None):
  """name → list over seeds of ``train(name, tx, load_data(seed), seed)``, for the optimizers
  whose short name (the part after ``psgd.``) is in ``names`` (all by default)."""
  chosen = {name: tx for name, tx in optimizers.items()
            if names is None or name.split(".")[-1] in names}
  results = {}
  for seed in seeds:
    data = load_data(seed)
    for name, tx in chosen.items():
      results.setdefault(name, []).append(train(name, tx, data, seed))
  return results


def save_curves(curves, path, *, xlabel, ylabel, title, window=1, steps=None):
  """Plot name → curve on a log scale (a ``window``-step running mean) and save a PNG.

  ``steps`` (name → x values) places curves recorded every few steps."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for name, curve in curves.items():
    smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
    x = np.arange(len(smooth)) if steps is None else steps[name][window - 1:]
    ax.semilogy(x, smooth, label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"saved {path}")
