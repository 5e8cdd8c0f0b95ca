"""Ready PSGD optimizers (preconditioner + momentum + weight decay + learning rate)."""

from psgd_optax._src.optimizers import dense, diag, kron

__all__ = ["dense", "diag", "kron"]
