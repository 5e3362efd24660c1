"""The linearisation of a neural ODE whose field is affine in the state: `w(t) = D_y F(t, 0)`,
`b(t) = F(t, 0)`, and a deterministic check that the field really is affine. Used by the linear
gauge-fixing penalties and the orbit geometry of linear neural ODEs."""

import types
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._core._checks import check_value, is_traced
from .linear import AbstractLinearField
from .node import AbstractNeuralODE, MLPField


class DerivedLinearField(AbstractLinearField):
    """`w(t) = D_y F(t, 0)` (forward-mode Jacobian) and `b(t) = F(t, 0)` of a field `F` that is
    affine in the state. A Module, not a closure: solves built on it share compiled programs."""

    field: Callable
    args: Any
    dim: int = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    def _origin(self):
        return jnp.zeros(self.dim, dtype=self.dtype)

    def weight(self, t):
        return jax.jacfwd(lambda y: self.field(t, y, self.args))(self._origin())

    def bias(self, t):
        return self.field(t, self._origin(), self.args)

    def __call__(self, t, x, args=None):
        return self.field(t, x, self.args)


# states of size 0.1 to 10 at which affinity is checked (fixed: the check is deterministic)
CHECK_SCALES = (0.1, 1.0, 1.0, 10.0)


def infer_dim(field) -> int | None:
    """The state dimension a field declares, if any: an `AbstractLinearField`'s bias size, an
    `MLPField`'s output size, or an int attribute `dim` / `out_size`."""
    if isinstance(field, AbstractLinearField):
        return jax.eval_shape(field.bias, 0.0).shape[0]
    if isinstance(field, MLPField):
        return field.mlp.out_size
    for name in ("dim", "out_size"):
        value = getattr(field, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def float_dtype(tree) -> np.dtype:
    """The dtype of the first floating array in `tree`, else JAX's default float dtype."""
    for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return np.dtype(leaf.dtype)
    return np.dtype(jnp.zeros(()).dtype)


def affine_tolerance(dtype) -> float:
    """`sqrt(eps)` of `dtype` (1.5e-8 in float64, 3.5e-4 in float32): the largest relative
    residual `|F(t, y) - F(t, 0) - w(t) y|` accepted as roundoff of an affine field."""
    return float(np.sqrt(np.finfo(dtype).eps))


def linear_field(
    model: AbstractNeuralODE, *, dim: int | None = None, dtype=None
) -> tuple[AbstractLinearField, Float[Array, ""] | None]:
    """`(field, residual)`: the field of `model` as an `AbstractLinearField` and, for a field that
    is not one already, the largest relative affinity residual
    `|F(t, y) - F(t, 0) - w(t) y| / (|F(t, y)| + |F(t, 0)| + |w(t)|_F |y|)` over a few fixed
    pseudo-random `(t, y)` in `[t0, t1] x R^d` (states of size 0.1 to 10), with `w`, `b` derived
    by `DerivedLinearField`. `residual` is None for an `AbstractLinearField` (affine by
    construction) and a traced scalar when the field's arrays are traced.

    **Raises:** `TypeError` if `model` is not a neural ODE; `ValueError` if the state dimension
    can be neither inferred nor taken from `dim`, or the field does not map a `(dim,)` state to a
    `(dim,)` velocity.
    """
    if not isinstance(model, AbstractNeuralODE):
        raise TypeError(
            f"`model` must be a neural ODE (an AbstractNeuralODE); received {type(model).__name__}."
        )
    field = model.field
    if isinstance(field, AbstractLinearField):
        return field, None
    if dim is None:
        dim = infer_dim(field)
        if dim is None:
            raise ValueError(
                f"cannot infer the state dimension of the field {describe_field(field)} "
                "(it is neither an AbstractLinearField nor has an int `dim`): pass `dim=`."
            )
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise ValueError(f"`dim` must be a positive int; received {dim!r}.")
    dtype = float_dtype((field, model.args)) if dtype is None else np.dtype(dtype)
    derived = DerivedLinearField(field, model.args, dim, dtype)
    try:
        shape = jax.eval_shape(derived.bias, jnp.zeros((), dtype)).shape
    except Exception as e:  # the user's field rejected the state: say which state was tried
        raise ValueError(
            f"calling the field {describe_field(field)} on a state of shape ({dim},) failed "
            f"({type(e).__name__}: {e}); pass the right `dim=`."
        ) from e
    if shape != (dim,):
        raise ValueError(
            f"the field {describe_field(field)} maps a ({dim},) state to shape {shape}; a linear "
            f"field needs a velocity of shape ({dim},) (pass the right `dim=`)."
        )
    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.uniform(size=len(CHECK_SCALES)), dtype=dtype)
    ys = jnp.asarray(
        np.asarray(CHECK_SCALES)[:, None] * rng.standard_normal((len(CHECK_SCALES), dim)),
        dtype=dtype,
    )

    def one(s, y):
        t = model.t0 + (model.t1 - model.t0) * s
        f0 = derived.bias(t)
        w = derived.weight(t)
        fy = field(t, y, model.args)
        scale = jnp.linalg.norm(fy) + jnp.linalg.norm(f0) + jnp.linalg.norm(w) * jnp.linalg.norm(y)
        tiny = jnp.finfo(scale.dtype).tiny
        return jnp.linalg.norm(fy - f0 - w @ y) / jnp.maximum(scale, tiny)

    # eager where the field's arrays are concrete, even inside a trace: the check then raises
    # on the host; with traced arrays it stays traced and callers use `eqx.error_if`
    with jax.ensure_compile_time_eval():
        residual = jnp.max(jnp.stack([one(s, y) for s, y in zip(u, ys, strict=True)]))
    return derived, residual


def check_affine(
    linear: AbstractLinearField,
    residual: Float[Array, ""] | None,
    message: Callable[[str], str],
    error: type[Exception],
) -> Callable:
    """Check `residual <= affine_tolerance` of the derived field's dtype (NaN fails). A
    concrete residual is checked now, on the host, raising `error(message(measured))`; the
    identity is returned. A traced one cannot be: the returned function attaches the check to
    a result by `eqx.error_if`, which raises when the compiled program runs."""
    if residual is None:
        return lambda out: out
    tol = affine_tolerance(linear.dtype)

    def failed():
        return ~(residual <= tol)

    if is_traced(residual):  # checked on the result, when the program runs
        text = message(f"above the tolerance {tol:.2g}")
        return lambda out: check_value(out, failed, text)
    text = message(f"{float(residual):.2g}, above the tolerance {tol:.2g}")
    check_value(None, failed, text, error=error)
    return lambda out: out


def describe_field(field) -> str:
    """A field's name for messages: its type, or the name of a plain function."""
    if isinstance(field, types.FunctionType):
        return f"{field.__qualname__} (a function)"
    return type(field).__name__


def not_affine(measured: str) -> str:
    return (
        "not affine in the state y: the relative residual |F(t, y) - F(t, 0) - D_yF(t, 0) y| at "
        f"a few random (t, y) is {measured}"
    )
