"""Former home of the dispatcher, kept while imports move: see :mod:`jax_moe_dispatch.token_dispatcher`."""

from jax_moe_dispatch.token_dispatcher import (DispatchState, MoEFlexTokenDispatcher,
                                               apply_capacity, permuted_rows)

__all__ = ["DispatchState", "MoEFlexTokenDispatcher", "apply_capacity", "permuted_rows"]
