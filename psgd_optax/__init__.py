"""psgd_optax: PSGD preconditioners on matrix Lie groups as optax transformations.

>>> import optax, psgd_optax as psgd
>>> tx = optax.chain(psgd.kron(), optax.scale(-1e-3))
"""

from psgd_optax import optimizers
from psgd_optax._src.curvature import CURVATURES
from psgd_optax._src.engine import PSGDState, preconditioner
from psgd_optax._src.groups.dense import dense, dense_group
from psgd_optax._src.groups.diag import diag, diag_group
from psgd_optax._src.groups.geometry import GEOMETRIES
from psgd_optax._src.groups.kron import KronGroup, KronState, factor_kinds, kron, kron_group
from psgd_optax._src.schedules import update_probability_schedule

__version__ = "0.1.0"

__all__ = [
    "CURVATURES",
    "GEOMETRIES",
    "KronGroup",
    "KronState",
    "PSGDState",
    "dense",
    "dense_group",
    "diag",
    "diag_group",
    "factor_kinds",
    "kron",
    "kron_group",
    "optimizers",
    "preconditioner",
    "update_probability_schedule",
]
