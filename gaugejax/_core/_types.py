"""jaxtyping aliases shared across gaugejax."""

from collections.abc import Callable
from typing import Any, TypeAlias

from jaxtyping import Array, ArrayLike, Float, PyTree, Shaped


Scalar: TypeAlias = Float[Array, ""]
ScalarLike: TypeAlias = float | Float[ArrayLike, ""]
State: TypeAlias = PyTree[Shaped[Array, "..."]]
Args: TypeAlias = Any
# A vector field in diffrax's convention: `field(t, y, args) -> dy/dt` with dy/dt shaped as y.
VectorField: TypeAlias = Callable[[ScalarLike, State, Args], State]
# A spacetime generator: `eps(t, y) -> (eps0, eps_y)`, eps0 a scalar and eps_y shaped as y.
SpacetimeGenerator: TypeAlias = Callable[[ScalarLike, State], tuple[ScalarLike, State]]
