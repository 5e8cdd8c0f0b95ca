"""Builds public factories (``psgd.kron``, ``psgd.optimizers.kron``, ...) with merged signatures.

A family's signature is its group options followed by the engine's (read from
:func:`~psgd_optax._src.engine.preconditioner`); a ready optimizer's is its own options
followed by its preconditioner family's.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import optax

from psgd_optax._src import engine
from psgd_optax._src.validation import check_number

_ENGINE_PARAMETERS = [p for name, p in inspect.signature(engine.preconditioner).parameters.items()
                      if name != "group_for_shape"]


def merged_signature_factory(name, module, own_parameters, other_parameters, build, doc):
  """A factory whose signature is ``own_parameters`` followed by ``other_parameters``.

  The factory binds its arguments against that signature (a ``TypeError`` names any
  unknown option), fills in defaults, and returns ``build(own, others)`` with the two
  groups of options as dicts. Both the preconditioner families and the ready optimizers
  are made this way, so ``inspect.signature``, ``help`` and ``optax.inject_hyperparams``
  see every option while each is declared and documented once.
  """
  signature = inspect.Signature(list(own_parameters) + list(other_parameters),
                                return_annotation=optax.GradientTransformationExtraArgs)
  own_names = [p.name for p in own_parameters]

  def factory(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    others = dict(bound.arguments)
    own = {key: others.pop(key) for key in own_names}
    return build(own, others)

  factory.__signature__ = signature
  factory.__name__ = factory.__qualname__ = name
  factory.__module__ = module
  factory.__doc__ = doc
  return factory


def preconditioner_family(
    name: str,
    module: str,
    group_options: Sequence[inspect.Parameter],
    group_for_options: Callable[..., engine.GroupForShape],
    check_group_options: Callable[..., None],
    doc: str,
):
  """A factory ``name(*, <group options>, <engine options>)``.

  Args:
    name: the factory's name.
    module: the module it is documented in.
    group_options: keyword-only parameters of the group (with defaults).
    group_for_options: maps the group options to a ``group_for_shape`` callable.
    check_group_options: raises ``ValueError`` for invalid group options.
    doc: the docstring; ``{engine_args}`` marks where the engine options' ``Args``
      entries go.

  Returns:
    The factory.
  """

  def build(group, engine_options):
    check_group_options(**group)
    return engine.preconditioner(group_for_options(**group), **engine_options)

  return merged_signature_factory(
      name, module, group_options, _ENGINE_PARAMETERS, build,
      doc.replace("{engine_args}", engine.ENGINE_ARGS_DOC.rstrip("\n")))


def keyword(name: str, default, annotation=inspect.Parameter.empty) -> inspect.Parameter:
  return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                           annotation=annotation)


# The option every group family shares: its signature entry, Args entry and check.
LIPSCHITZ_DECAY_OPTION = keyword("lipschitz_decay", 0.9, float)
LIPSCHITZ_DECAY_DOC = (
    "    lipschitz_decay: decay of the Lipschitz estimates that normalize fit steps.")


def check_lipschitz_decay(lipschitz_decay) -> None:
  check_number("lipschitz_decay", lipschitz_decay, low=0.0, high=1.0, high_open=True)
