"""psgd_optax: PSGD preconditioners on matrix Lie groups as optax transformations.

>>> import optax, psgd_optax as psgd
>>> tx = optax.chain(psgd.kron(), optax.scale(-1e-3))
"""

from psgd_optax import optimizers
from psgd_optax._src.affine_pairs import AffinePairsState, affine_pairs
from psgd_optax._src.curvature import CURVATURES, DAMPING_TYPES, SecantMemory
from psgd_optax._src.engine import preconditioner
from psgd_optax._src.state import PSGDState
from psgd_optax._src.families import butterfly, dense, diag, kron, lra, scan, scaw, splu, xmat
from psgd_optax._src.fop import (HypergradientState, fop, per_parameter_hypergradient,
                                 scalar_hypergradient)
from psgd_optax._src.groups.affine import affine_group
from psgd_optax._src.groups.geometry import GEOMETRIES
from psgd_optax._src.groups.flat import dense_group, diag_group
from psgd_optax._src.groups.kron import (KronGroup, KronState, TriangularKronState,
                                         factor_kinds, kron_group)
from psgd_optax._src.groups.lra import LRAGroup, LRAState, lra_group
from psgd_optax._src.groups.splu import SPLUGroup, SPLUState, splu_group
from psgd_optax._src.groups.xmat import (ButterflyState, InvolutionGroup, XState,
                                         butterfly_group, xmat_group)
from psgd_optax._src.options import EngineOptions
from psgd_optax._src.snr import SNRState, snr, snr_ratio
from psgd_optax._src.stacks import preconditioner_per_leaf, scale_set_per_leaf
from psgd_optax._src.schedules import (bernoulli_schedule, log10_skip_schedule,
                                       periodic_schedule, update_probability_schedule)
from psgd_optax._src.version import __version__

__all__ = [
    "AffinePairsState",
    "ButterflyState",
    "CURVATURES",
    "DAMPING_TYPES",
    "EngineOptions",
    "GEOMETRIES",
    "HypergradientState",
    "InvolutionGroup",
    "KronGroup",
    "KronState",
    "LRAGroup",
    "LRAState",
    "PSGDState",
    "SNRState",
    "SPLUGroup",
    "SPLUState",
    "SecantMemory",
    "TriangularKronState",
    "XState",
    "affine_group",
    "affine_pairs",
    "bernoulli_schedule",
    "butterfly",
    "butterfly_group",
    "dense",
    "dense_group",
    "diag",
    "diag_group",
    "factor_kinds",
    "fop",
    "kron",
    "kron_group",
    "log10_skip_schedule",
    "lra",
    "lra_group",
    "optimizers",
    "per_parameter_hypergradient",
    "periodic_schedule",
    "preconditioner",
    "preconditioner_per_leaf",
    "scalar_hypergradient",
    "scale_set_per_leaf",
    "scan",
    "scaw",
    "snr",
    "snr_ratio",
    "splu",
    "splu_group",
    "update_probability_schedule",
    "xmat",
    "xmat_group",
]
