"""Builds a public preconditioner factory (``psgd.kron``, ...) from a group's own options.

A family's signature is its group options followed by the engine's (read from
:func:`~psgd_optax._src.engine.preconditioner`), so ``inspect.signature``, ``help`` and
``optax.inject_hyperparams`` see every option while each is declared and documented once.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import optax

from psgd_optax._src import engine

_ENGINE_PARAMETERS = [p for name, p in inspect.signature(engine.preconditioner).parameters.items()
                      if name != "group_for_shape"]


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
    doc: the docstring; ``{group_args}`` and ``{engine_args}`` mark where the
      ``Args`` entries of the two kinds of options go.

  Returns:
    The factory.
  """
  signature = inspect.Signature(list(group_options) + _ENGINE_PARAMETERS,
                                return_annotation=optax.GradientTransformationExtraArgs)
  group_names = [p.name for p in group_options]

  def factory(**kwargs) -> optax.GradientTransformationExtraArgs:
    bound = signature.bind(**kwargs)  # a TypeError names any unknown option
    bound.apply_defaults()
    options = dict(bound.arguments)
    group = {key: options.pop(key) for key in group_names}
    check_group_options(**group)
    return engine.preconditioner(group_for_options(**group), **options)

  factory.__signature__ = signature
  factory.__name__ = factory.__qualname__ = name
  factory.__module__ = module
  factory.__doc__ = doc.replace("{engine_args}", engine.ENGINE_ARGS_DOC.rstrip("\n"))
  return factory


def keyword(name: str, default, annotation=inspect.Parameter.empty) -> inspect.Parameter:
  return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                           annotation=annotation)
