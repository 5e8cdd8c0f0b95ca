"""Shared test fixtures: matrices with known spectra and fit-error measures."""

import numpy as np


def random_symmetric(n, eigenvalues, rng):
  basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return (basis * np.asarray(eigenvalues, float)) @ basis.T


def random_spd(n, cond, rng):
  return random_symmetric(n, np.geomspace(1.0, cond, n), rng)


def matrix_abs(h):
  w, v = np.linalg.eigh(h)
  return (v * np.abs(w)) @ v.T


def matrix_sqrt(h):
  w, v = np.linalg.eigh(h)
  return (v * np.sqrt(w)) @ v.T


def fit_error(p, target_inverse):
  """‖P T − I‖_F / √n: how far P is from T⁻¹."""
  n = p.shape[0]
  return float(np.linalg.norm(np.asarray(p, np.float64) @ target_inverse - np.eye(n)) / np.sqrt(n))
