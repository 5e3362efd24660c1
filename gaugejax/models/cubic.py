"""The cubic neural ODE (Eq. 38) and self-attention as an integrated neural ODE (Eq. 39-42)."""

import math
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._core.correspondence import propagate, wilson_line
from .._core.options import TOLERANCE_FACTOR
from .._core.solve import solve
from .linear import GaugedWeight
from .solved import AbstractSolvedModel, tangent_by_jvp


class CubicField(eqx.Module):
    """`dx/dt = w(t) x + scale * lambda(t)[x, x, x]` (Eq. 38), `lambda(t)` of shape (d, d, d, d)."""

    w: Callable
    lam: Callable
    scale: float | Array = 1.0

    def __call__(self, t, x, args=None):
        cubic = jnp.einsum("ijkl,j,k,l->i", self.lam(t), x, x, x)
        return self.w(t) @ x + self.scale * cubic


class _CubicSource(eqx.Module):
    """`lambda(t)[W, W, W]`: the source of the cubic coefficient's propagator."""

    lam: Callable

    def __call__(self, t, W):
        return jnp.einsum("ijkl,ja,kb,lc->iabc", self.lam(t), W, W, W)


class _JumpField(eqx.Module):
    """`dX_I/dtau = scale * sum_J (x_I^T lambda~ x_J) lambda x_J` (a Module, so calls with
    equal shapes share one compiled solve)."""

    lam: Float[Array, "d d"]
    lam_tilde: Float[Array, "d d"]
    scale: float | Array

    def __call__(self, tau, X, args):
        scores = X @ self.lam_tilde @ X.T  # (x_I^T lambda~ x_J)
        return self.scale * scores @ (X @ self.lam.T)


def integrated_cubic(
    w: Callable, lam: Callable, t1: float, *, rtol: float = 1e-10, atol: float = 1e-10
) -> tuple[Float[Array, "d d"], Float[Array, "d d d d"]]:
    """`(W_{T:0}, Lambda)` of the leading-order solution `x(T) = W x0 + Lambda[x0, x0, x0]`
    (Eq. 39 before `W = 1`): one solve of `W' = w W`,
    `Lambda' = w Lambda + lambda(t)[W, W, W]` from `(1, 0)`, which is the variation-of-constants
    integral printed below Eq. 38 (`propagate` with the cubic source)."""
    out = jax.eval_shape(w, 0.0)
    d = out.shape[0]
    zero = jnp.zeros((d, d, d, d), dtype=out.dtype)
    return propagate(w, t1, 0.0, source=_CubicSource(lam), v0=zero, rtol=rtol, atol=atol)


class AttentionNODE(AbstractSolvedModel):
    """A neural ODE over n tokens with a linear part `w(t)` and an instantaneous cubic
    nonlinearity at `t0` (Eq. 40, 42): `lambda^{iI}_{jJ kK lL}(t) = delta(t - t0) lambda^i_j
    lambda~_{kl} delta^I_K delta_{JL}`, scaled by `scale`.

    The delta is taken in its exact narrow-width limit: at `t0` the tokens flow for unit time
    along `dX_I/dtau = scale * sum_J (x_I^T lambda~ x_J) lambda x_J` (a diffrax solve); the
    linear parts are Wilson lines. With `W_{T:0} = 1`, the output is
    `x + attention(x, Wq, Wk, Wv, identity) + O(scale^2)` for the weights of Eq. 41 (`weights`).
    Every solve (the Wilson lines and the jump) runs at rtol = atol = `tolerance`: a sweep's
    re-solve divides it by `TOLERANCE_FACTOR`.
    """

    w: Callable
    lam: Float[Array, "d d"]
    lam_tilde: Float[Array, "d d"]
    t0: float
    t1: float
    scale: float | Array = 1.0
    tolerance: float | Array = 1e-11

    def _wilson(self, t_end, t_start):
        return wilson_line(self.w, t_end, t_start, rtol=self.tolerance, atol=self.tolerance)

    def _jump(self, X):
        field = _JumpField(self.lam, self.lam_tilde, jnp.asarray(self.scale, X.dtype))
        controller = diffrax.PIDController(rtol=self.tolerance, atol=self.tolerance)
        return solve(field, X, t0=0.0, t1=1.0, stepsize_controller=controller)[0]

    def __call__(self, x: Float[Array, "n d"]) -> Float[Array, "n d"]:
        before = self._wilson(self.t0, 0.0)
        after = self._wilson(self.t1, self.t0)
        return self._jump(x @ before.T) @ after.T

    # what a sweep asks (AbstractSolvedModel), answered from the one tolerance

    def observe(self, inputs: Float[Array, "batch n d"]) -> tuple[Float[Array, "batch n d"], None]:
        """`(vmap(self)(inputs), None)`: its solves report no statistics."""
        return jax.vmap(self)(inputs), None

    def observe_tangent(self, moved, p, dp, inputs, generator=None):
        """A jvp through `observe` along `a -> moved(a)` (no vector field of its own: a
        `generator` is ignored)."""
        del generator
        return tangent_by_jvp(lambda model, x: model.observe(x), moved, p, dp, inputs)

    def for_sweep(self, dtype, *, differentiated: bool) -> "AttentionNODE":
        """The tolerance as an array of `dtype` (traced, so the tightened model shares the
        compiled programs)."""
        del differentiated  # its solves are differentiated as they are
        return eqx.tree_at(lambda m: m.tolerance, self, jnp.asarray(self.tolerance, dtype))

    def tightened(self, dtype) -> tuple["AttentionNODE", str]:
        """The tolerance divided by `TOLERANCE_FACTOR`, at least 4 eps of `dtype`."""
        tol = jnp.maximum(self.tolerance / TOLERANCE_FACTOR, 4 * float(jnp.finfo(dtype).eps))
        return eqx.tree_at(lambda m: m.tolerance, self, tol), f"at tolerance {float(tol):.1e}"

    def requested_accuracy(self, scale: float) -> float:
        """The tolerance: every solve asks rtol = atol = `tolerance`, read as relative."""
        del scale
        return float(self.tolerance)

    def expected_shrink(self) -> float:
        """`inf`: its solves are under error control (see `requested_accuracy`)."""
        return math.inf

    def weights(self) -> tuple[Float[Array, "d d"], Float[Array, "d d"], Float[Array, "d d"]]:
        """Eq. 41: `Wq = W_{t0:0}^T`, `Wk = (lambda~ W_{t0:0})^T`,
        `Wv = (W_{0:t0} lambda W_{t0:0})^T`."""
        P = self._wilson(self.t0, 0.0)
        P_back = self._wilson(0.0, self.t0)
        return P.T, (self.lam_tilde @ P).T, (P_back @ self.lam @ P).T

    def diffeomorphism(self, G: Callable) -> "AttentionNODE":
        """The same neural ODE in coordinates `x = G(t) y` (a spatial diffeomorphism; `G(0) =
        G(T) = 1` keeps the input-output map): `w -> G^-1 w G - G^-1 dG/dt` (Eq. 25) and, at
        t0, `lambda -> G^-1 lambda G`, `lambda~ -> G^T lambda~ G`. Its Eq. 41 weights are the
        attention gauge of the old ones with `alpha = 1`, `A = G(t0)^-T`, `B = G(t0)`."""
        Gt0 = G(jnp.asarray(self.t0))
        return AttentionNODE(
            GaugedWeight(self.w, G),
            jnp.linalg.solve(Gt0, self.lam @ Gt0),
            Gt0.T @ self.lam_tilde @ Gt0,
            self.t0,
            self.t1,
            self.scale,
            self.tolerance,
        )

    def rescale(self, alpha) -> "AttentionNODE":
        """The redundancy of the decomposition (40): `lambda -> lambda / alpha`,
        `lambda~ -> alpha lambda~` (the alpha part of the attention gauge)."""
        return eqx.tree_at(
            lambda m: (m.lam, m.lam_tilde), self, (self.lam / alpha, alpha * self.lam_tilde)
        )


class _Zero(eqx.Module):
    dim: int = eqx.field(static=True)

    def __call__(self, t):
        return jnp.zeros((self.dim, self.dim))


def attention_as_node(
    Wq: Float[Array, "d d"],
    Wk: Float[Array, "d d"],
    Wv: Float[Array, "d d"],
    *,
    t1: float = 1.0,
    t0: float | None = None,
    scale: float = 1.0,
) -> AttentionNODE:
    """The neural ODE whose integrated solution is `x + scale * attention(x, Wq, Wk, Wv,
    identity) + O(scale^2)` (Eq. 39-42): `w = 0` (so `W_{T:0} = 1`), `lambda~ = Wq Wk^T`,
    `lambda = Wv^T`, nonlinearity at `t0` (default T/2). Its Eq. 41 weights are
    `(1, Wk Wq^T, Wv)`, the attention gauge image of `(Wq, Wk, Wv)` with `A = Wq^-1` when Wq is
    invertible: attention itself depends on Wq and Wk only through `Wq Wk^T`.
    """
    d = Wq.shape[0]
    if Wq.shape != (d, d) or Wk.shape != (d, d) or Wv.shape != (d, d):
        raise ValueError(
            f"`Wq`, `Wk`, `Wv` must be square (d, d) with d = {d}; received {Wq.shape}, "
            f"{Wk.shape}, {Wv.shape}."
        )
    t0 = 0.5 * t1 if t0 is None else t0
    if not 0.0 < t0 < t1:
        raise ValueError(f"`t0` must lie in (0, t1 = {t1}); received {t0}.")
    return AttentionNODE(_Zero(d), Wv.T, Wq @ Wk.T, float(t0), float(t1), scale)
