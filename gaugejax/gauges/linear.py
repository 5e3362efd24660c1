"""Gauge transformations of linear neural ODEs (Eq. 24-25) and of discrete networks (Eq. 29, 33).

Functional core: `linear_gauge_transform` (Eq. 25, for callables of t; dG/dt, dc/dt by jvp) and
`discrete_gauge_transform` (Eq. 33). Families on top: `LinearGauge` (continuous, on a
`LinearNODE`), `DiscreteLinearGauge` (on a `LinearNet`). The positive per-unit rescaling
(Eq. 29) has its own module, `gaugejax.gauges.rescaling`.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._core.calculus import AbstractTimeFunction, time_derivative
from .._core.correspondence import check_discrete_gauge
from .._core.numerics import expm
from ..models import FeedforwardNet, LinearNODE
from ..models.linear import AbstractGaugeMatrix, GaugedLinearField
from .base import AbstractParameterGauge, model_error
from .features import check_boundary, check_positive
from .maps import AbstractMapGauge


def linear_gauge_transform(
    w: Callable, b: Callable, G: Callable, c: Callable
) -> tuple[Callable, Callable]:
    """Eq. 25: the parameters of the linear neural ODE for `y` with `x = G(t) y + c(t)`.

    **Arguments:** callables `w(t) -> (d, d)`, `b(t) -> (d,)`, `G(t) -> (d, d)` invertible,
    `c(t) -> (d,)`. With `G(0) = G(T) = 1`, `c(0) = c(T) = 0` the map x(0) -> x(T) is unchanged.

    **Returns:** `(w', b')`, callables of t (bound methods of a `GaugedLinearField`, PyTrees).

    **Raises:** `TypeError` if an argument is not callable.
    """
    for name, f in (("w", w), ("b", b), ("G", G), ("c", c)):
        if not callable(f):
            raise TypeError(f"`{name}` must be a callable of t; received {type(f).__name__}.")
    field = GaugedLinearField(w, b, G, c)
    return field.weight, field.bias


def discrete_gauge_transform(
    weights: Float[Array, "N d d"],
    biases: Float[Array, "N d"],
    Gs: Float[Array, "N1 d d"],
    cs: Float[Array, "N1 d"],
) -> tuple[Float[Array, "N d d"], Float[Array, "N d"]]:
    """Eq. 33: `w_n -> G_{n+1}^-1 w_n G_n`, `b_n -> G_{n+1}^-1 [b_n + w_n c_n - c_{n+1}]`.

    **Arguments:** `weights` (N, d, d), `biases` (N, d); `Gs` (N+1, d, d) invertible with
    `G_0 = G_N = 1`; `cs` (N+1, d) with `c_0 = c_N = 0`.

    **Raises:** `ValueError` for wrong shapes, wrong end values or a singular `G_n` (under
    `jit`, an `eqx.error_if` runtime error for the values).
    """
    if Gs.shape[0] != weights.shape[0] + 1 or Gs.shape[1:] != (weights.shape[1],) * 2:
        raise ValueError(
            f"`Gs` must have shape ({weights.shape[0] + 1}, {weights.shape[1]}, "
            f"{weights.shape[1]}) for {weights.shape[0]} layers; received {Gs.shape}."
        )
    Gs, cs = check_discrete_gauge(Gs, cs)
    return _discrete_transform(weights, biases, Gs, cs)


def _discrete_transform(weights, biases, Gs, cs):
    """Eq. 33, the one home of it (no checks)."""
    new_w = jnp.linalg.solve(Gs[1:], weights @ Gs[:-1])
    rhs = biases + jnp.einsum("nij,nj->ni", weights, cs[:-1]) - cs[1:]
    new_b = jnp.linalg.solve(Gs[1:], rhs[..., None])[..., 0]
    return new_w, new_b


# ---------------------------------------------------------------------------- continuous family


class AffineMap(eqx.Module):
    """`x = G(t) y + c(t)`, with `G` and `c` callables of t."""

    G: Callable
    c: Callable

    def __call__(self, t, y):
        return self.G(t) @ y + self.c(t)


class _ComposedG(AbstractTimeFunction):
    outer: AffineMap
    inner: AffineMap

    def __call__(self, t):
        return self.outer.G(t) @ self.inner.G(t)

    def value_and_derivative(self, t):
        # the product rule on the factors' own (closed-form where they have one) derivatives
        (Go, dGo), (Gi, dGi) = time_derivative(self.outer.G, t), time_derivative(self.inner.G, t)
        return Go @ Gi, dGo @ Gi + Go @ dGi


class _ComposedC(eqx.Module):
    outer: AffineMap
    inner: AffineMap

    def __call__(self, t):
        return self.outer.G(t) @ self.inner.c(t) + self.outer.c(t)


class _InverseG(AbstractTimeFunction):
    map_: AffineMap

    def __call__(self, t):
        return jnp.linalg.inv(self.map_.G(t))

    def value_and_derivative(self, t):
        # d(G^-1)/dt = -G^-1 (dG/dt) G^-1, from the map's own dG/dt
        G, dG = time_derivative(self.map_.G, t)
        Gi = jnp.linalg.inv(G)
        return Gi, -Gi @ dG @ Gi


class _InverseC(eqx.Module):
    map_: AffineMap

    def __call__(self, t):
        return -jnp.linalg.solve(self.map_.G(t), self.map_.c(t))


class ModeMatrix(AbstractGaugeMatrix):
    """`G(t) = expm(S(t))` or Cayley `(1 - S)^-1 (1 + S)`, `S(t) = sum_k sin(omega_k t) A_k`:
    the identity at t = 0 (and at t = T for vanishing boundaries).

    One mode (K = 1, `S = s(t) A`) has a closed-form derivative: `G` is a function of `A`, so
    it commutes with it and `dG/dt = s'(t) A G(t)` (one product, where a jvp through the
    exponential doubles its cost); Cayley's is `s'(t) (1 - S)^-1 A (1 + G)`. The one-mode
    exponential also gives `G^-1 = expm(-s A)` from the same powers (`frame`: Eq. 25's solve
    becomes a product). Several modes do not commute (`[S, dS/dt] != 0`): their `dG/dt` is a
    jvp (`AbstractTimeFunction`), their inverse a solve.
    """

    A: Float[Array, "K d d"]
    omega: Float[Array, " K"]
    cayley: bool = eqx.field(static=True)

    def __call__(self, t):
        S = jnp.tensordot(jnp.sin(self.omega * t), self.A, axes=1)
        if self.cayley:
            eye = jnp.eye(S.shape[0], dtype=S.dtype)
            return jnp.linalg.solve(eye - S, eye + S)
        return expm(S)

    def value_and_derivative(self, t):
        if self.A.shape[0] != 1:
            return super().value_and_derivative(t)
        A, omega = self.A[0], self.omega[0]
        s, ds = jnp.sin(omega * t), omega * jnp.cos(omega * t)
        if self.cayley:
            eye = jnp.eye(A.shape[0], dtype=A.dtype)
            G = jnp.linalg.solve(eye - s * A, eye + s * A)
            return G, ds * jnp.linalg.solve(eye - s * A, A @ (eye + G))
        G = expm(s * A)
        return G, ds * (A @ G)

    def frame(self, t):
        if self.A.shape[0] != 1 or self.cayley:
            return super().frame(t)
        A, omega = self.A[0], self.omega[0]
        s, ds = jnp.sin(omega * t), omega * jnp.cos(omega * t)
        G, G_inv = expm(s * A, inverse=True)
        return G, ds * (A @ G), G_inv


class ModeShift(eqx.Module):
    """`c(t) = sum_k sin(omega_k t) c_k`: zero at t = 0 (and at t = T for vanishing
    boundaries)."""

    cvec: Float[Array, "K d"]
    omega: Float[Array, " K"]

    def __call__(self, t):
        return jnp.tensordot(jnp.sin(self.omega * t), self.cvec, axes=1)


class AffineGenerator(eqx.Module):
    """`(t, y) -> (0, order * S(t) y + c(t))`, `S(t) = sum_k sin(omega_k t) A_k`, `c(t) =
    sum_k sin(omega_k t) c_k`: the spacetime generator of `x = G(t) y + c(t)` near the identity,
    `G = 1 + order * S + O(S^2)` (`order` 1 for expm, 2 for Cayley)."""

    A: Float[Array, "K d d"]
    cvec: Float[Array, "K d"]
    omega: Float[Array, " K"]
    order: float

    def __call__(self, t, y):
        modes = jnp.sin(self.omega * t)
        S = jnp.tensordot(modes, self.A, axes=1)
        c = jnp.tensordot(modes, self.cvec, axes=1)
        return jnp.zeros((), jnp.result_type(t)), self.order * (S @ y) + c


class LinearGaugeElement(eqx.Module):
    """A base element of `LinearGauge`: mode amplitudes `A` (K, d, d) and `c` (K, d)."""

    A: Float[Array, "K d d"]
    c: Float[Array, "K d"]


def _mode_frequencies(t1: float, num_modes: int, boundary: str) -> Float[Array, " K"]:
    """`k pi / T` (`"vanishing"`: G(T) = 1, c(T) = 0) or `(k - 1/2) pi / T` (`"free"`)."""
    k = jnp.arange(1.0, num_modes + 1.0) - (0.0 if boundary == "vanishing" else 0.5)
    return k * jnp.pi / t1


# Above this, x = G y + c shifts states by far more than their size: the transformed solve
# loses about log10(bias_scale) digits to cancellation, so a deviation says nothing.
MAX_BIAS_SCALE = 1e6


class LinearGauge(AbstractMapGauge):
    """Finite linear gauge transformations `x = G(t) y + c(t)` of a `LinearNODE` (Eq. 24-25).

    Base elements draw `A_k` (scaled so that `sum_k |A_k|_2 = rho * u`, u ~ U(1/4, 1)) and `c_k`;
    `G(t) = expm(S(t))` (`kind="expm"`, always invertible) or the Cayley transform
    (`kind="cayley"`, invertible because |S(t)|_2 <= rho < 1), `S(t) = sum_k sin(omega_k t) A_k`.
    With `boundary="vanishing"` (`omega_k = k pi / T`) `G(0) = G(T) = 1`, `c(0) = c(T) = 0` by
    construction; `"free"` (`(k - 1/2) pi / T`, the `control()`) leaves `G(T) != 1`.
    Compositions and inverses are exact affine maps. The action keeps the model linear: the new
    field is a `GaugedLinearField` (Eq. 25, one fused solve per evaluation).

    `group="SO"` restricts the family to rotations with `c = 0` (footnote 12's subgroup): the
    `A_k` are antisymmetric, so `S(t)` is and `G(t)` (expm or Cayley) is orthogonal with
    determinant 1 at every t; `"GL"` (default) draws general `A_k` and shifts `c`.

    **Arguments:** `dim` d, `t1` T, `num_modes` K, `rho` (> 0; < 1 for Cayley), `bias_scale`
    (in (0, 1e6]), `kind`, `boundary`, `group` (`"GL"` or `"SO"`).

    **Raises:** `ValueError` for out-of-range arguments.
    """

    dim: int = eqx.field(static=True)
    t1: float
    omega: Float[Array, " K"]
    rho: float
    bias_scale: float
    kind: str = eqx.field(static=True)
    group: str = eqx.field(static=True)
    acts_on = LinearNODE

    def __init__(
        self,
        dim: int,
        t1: float,
        *,
        num_modes: int = 2,
        rho: float = 0.5,
        bias_scale: float = 0.3,
        kind: str = "expm",
        boundary: str = "vanishing",
        group: str = "GL",
    ):
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"`dim` must be a positive int; received {dim!r}.")
        check_positive("t1", t1)
        if kind not in ("expm", "cayley"):
            raise ValueError(f"`kind` must be 'expm' or 'cayley'; received {kind!r}.")
        if group not in ("GL", "SO"):
            raise ValueError(f"`group` must be 'GL' or 'SO'; received {group!r}.")
        # rho bounds |S|_2 <= rho: keep it where expm's squarings stay few and its rounding small
        check_positive("rho", rho, below=1.0 if kind == "cayley" else 100.0)
        check_positive("bias_scale", bias_scale, below=MAX_BIAS_SCALE * (1 + 1e-12))
        if not isinstance(num_modes, int) or num_modes <= 0:
            raise ValueError(f"`num_modes` must be a positive int; received {num_modes!r}.")
        self.dim = dim
        self.t1 = float(t1)
        self.omega = _mode_frequencies(self.t1, num_modes, check_boundary(boundary))
        self.rho = float(rho)
        self.bias_scale = float(bias_scale)
        self.kind = kind
        self.group = group

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> "LinearGauge":
        """The family with the state dimension and end time of `model` (a `LinearNODE`);
        `**kwargs` are the other arguments (`num_modes`, `rho`, `bias_scale`, `kind`, ...).

        **Raises:** as `check_model`.
        """
        if not isinstance(model, LinearNODE):
            raise model_error(cls.__name__, "a gaugejax.LinearNODE", model)
        dim = int(jax.eval_shape(model.weight, float(model.t0)).shape[0])
        gauge = cls(dim, float(model.t1), **kwargs)
        gauge.check_model(model)
        return gauge

    def sample(self, key: PRNGKeyArray) -> LinearGaugeElement:
        ka, kc, kr = jax.random.split(key, 3)
        K, d = self.omega.shape[0], self.dim
        A = jax.random.normal(ka, (K, d, d))
        c = self.bias_scale * jax.random.normal(kc, (K, d))
        if self.group == "SO":  # antisymmetric S(t): G(t) in SO(d); no shift
            A, c = A - jnp.swapaxes(A, 1, 2), jnp.zeros_like(c)
        norms = jnp.linalg.norm(A, ord=2, axis=(1, 2))
        A = A * (self.rho * jax.random.uniform(kr, minval=0.25, maxval=1.0) / jnp.sum(norms))
        return LinearGaugeElement(A, c)

    def identity(self) -> LinearGaugeElement:
        K, d = self.omega.shape[0], self.dim
        return LinearGaugeElement(jnp.zeros((K, d, d)), jnp.zeros((K, d)))

    def base_map(self, g: LinearGaugeElement) -> AffineMap:
        G = ModeMatrix(g.A, self.omega, self.kind == "cayley")
        return AffineMap(G, ModeShift(g.c, self.omega))

    def compose_maps(self, outer: AffineMap, inner: AffineMap) -> AffineMap:
        return AffineMap(_ComposedG(outer, inner), _ComposedC(outer, inner))

    def invert_map(self, map_: AffineMap) -> AffineMap:
        return AffineMap(_InverseG(map_), _InverseC(map_))

    def pull(self, field, map_: AffineMap):
        return GaugedLinearField(field.weight, field.bias, map_.G, map_.c)

    def first_order_generator(self, direction: LinearGaugeElement) -> AffineGenerator:
        """`(0, k S(t) y + c(t))` of `direction`'s modes: from the identity (A = 0, c = 0) along
        `direction`, `expm(a S) = 1 + a S` (k = 1) and `(1 - a S)^-1 (1 + a S) = 1 + 2 a S`
        (Cayley, k = 2) to first order, and the pullback by `x = y + a eps_y` is
        `deform(F, (0, eps_y), a)`."""
        order = 2.0 if self.kind == "cayley" else 1.0
        return AffineGenerator(direction.A, direction.c, self.omega, order)

    def control(self) -> "LinearGauge":
        """The `boundary="free"` family (`G(T) != 1`, `c(T) != 0`): the output becomes
        `G(T)^-1 (x(T) - c(T))`. Only `omega` (an array) differs: the compiled program is shared."""
        free = _mode_frequencies(self.t1, self.omega.shape[0], "free")
        return eqx.tree_at(lambda g: g.omega, self, free)


# ---------------------------------------------------------------------------- discrete families


class DiscreteGaugeElement(eqx.Module):
    """`Gs` (N+1, d, d) and `cs` (N+1, d) with identity / zero ends."""

    Gs: Float[Array, "N1 d d"]
    cs: Float[Array, "N1 d"]


class DiscreteLinearGauge(AbstractParameterGauge):
    """Discrete linear gauges (Eq. 33) of a `LinearNet` with `num_layers` layers of width `dim`.

    Interior `G_n = expm(A_n)` (`|A_n|_2 = scale`, so det G_n > 0 and Thm 3.1 lifts them),
    `c_n ~ N(0, bias_scale^2)`; ends fixed to (1, 0). The family is a group in closed form:
    `compose` multiplies `G_n` and composes shifts, `inverse` inverts each node. The
    `control()` also moves the output end (`G_N != 1`, `c_N != 0`), which changes the output.

    **Arguments:** `dim`, `num_layers` N, `scale` (> 0), `bias_scale` (> 0).
    """

    dim: int = eqx.field(static=True)
    num_layers: int = eqx.field(static=True)
    scale: float
    bias_scale: float
    end_scale: Float[Array, ""]  # 0 for the symmetry; 1 moves the output end (the control)
    infinitesimal = False

    def __init__(self, dim: int, num_layers: int, *, scale: float = 0.5, bias_scale: float = 0.3):
        for name, value in (("dim", dim), ("num_layers", num_layers)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int; received {value!r}.")
        check_positive("scale", scale, below=100.0)
        check_positive("bias_scale", bias_scale, below=MAX_BIAS_SCALE * (1 + 1e-12))
        self.dim, self.num_layers = dim, num_layers
        self.scale, self.bias_scale = float(scale), float(bias_scale)
        self.end_scale = jnp.zeros(())

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> "DiscreteLinearGauge":
        """The family with the width and layer count of `model` (a `LinearNet`); `**kwargs`
        are `scale` and `bias_scale`.

        **Raises:** as `check_model`.
        """
        if not isinstance(model, FeedforwardNet):
            raise model_error(cls.__name__, "a LinearNet", model)
        gauge = cls(int(model.weights.shape[1]), int(model.num_layers), **kwargs)
        gauge.check_model(model)
        return gauge

    def check_model(self, model) -> None:
        if not isinstance(model, FeedforwardNet) or model.activation != "identity":
            raise model_error(
                self,
                "a LinearNet (gaugejax.FeedforwardNet with identity activation)",
                model,
                "Build it with gj.LinearNet(weights (N, d, d), biases (N, d)).",
            )
        if model.num_layers != self.num_layers or model.weights.shape[1] != self.dim:
            raise ValueError(
                f"DiscreteLinearGauge has {self.num_layers} layers of width {self.dim}; the model "
                f"has {model.num_layers} of width {model.weights.shape[1]}."
            )

    def sample(self, key: PRNGKeyArray) -> DiscreteGaugeElement:
        ka, kc = jax.random.split(key)
        N, d = self.num_layers, self.dim
        A = jax.random.normal(ka, (N, d, d))
        A = self.scale * A / jnp.linalg.norm(A, ord=2, axis=(1, 2), keepdims=True)
        A = A.at[-1].multiply(self.end_scale)  # the output end: identity unless the control
        eye = jnp.eye(d)[None]
        Gs = jnp.concatenate([eye, jax.vmap(jax.scipy.linalg.expm)(A)])
        c = self.bias_scale * jax.random.normal(kc, (N, d))
        cs = jnp.concatenate([jnp.zeros((1, d)), c.at[-1].multiply(self.end_scale)])
        return DiscreteGaugeElement(Gs, cs)

    def identity(self) -> DiscreteGaugeElement:
        N, d = self.num_layers, self.dim
        return DiscreteGaugeElement(jnp.tile(jnp.eye(d), (N + 1, 1, 1)), jnp.zeros((N + 1, d)))

    def inverse(self, g):
        Gi = jnp.linalg.inv(g.Gs)
        return DiscreteGaugeElement(Gi, -jnp.einsum("nij,nj->ni", Gi, g.cs))

    def compose(self, g1, g2):
        # x = G1 (G2 y + c2) + c1
        return DiscreteGaugeElement(g1.Gs @ g2.Gs, jnp.einsum("nij,nj->ni", g1.Gs, g2.cs) + g1.cs)

    def act(self, g, model: Any) -> FeedforwardNet:
        self.check_model(model)
        # sampled elements have the right ends by construction, but a user's may not: checked
        # (eagerly, or at run time under jit); the control moves the output end on purpose
        Gs, cs = check_discrete_gauge(g.Gs, g.cs, free_output_end=self.end_scale != 0)
        w, b = _discrete_transform(model.weights, model.biases, Gs, cs)
        return FeedforwardNet(w, b, model.activation)

    def control(self) -> "DiscreteLinearGauge":
        """The family that also moves the output end (`G_N != 1`): the output changes."""
        return eqx.tree_at(lambda g: g.end_scale, self, jnp.ones(()))
