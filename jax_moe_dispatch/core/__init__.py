"""What every op shares: the differentiable transport and the local layout math.

:mod:`.transport` (the ``custom_vjp`` pair ``dispatch``/``combine`` over a
backend), :mod:`.routing` (checks of routing arguments, top-k to multi-hot),
:mod:`.permute` (the expert-major permutation) and :mod:`.fp8` (block
quantisation). Imports go one way: the ops and the dispatcher import this
package, and it imports :mod:`jax_moe_dispatch.backends`, never the reverse.
"""
