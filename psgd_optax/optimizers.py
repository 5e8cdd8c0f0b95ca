"""Ready PSGD optimizers: a preconditioner + momentum + clipping + weight decay + step size."""

from psgd_optax._src.optimizers import dense, diag, kron, with_preconditioner

__all__ = ["dense", "diag", "kron", "with_preconditioner"]
