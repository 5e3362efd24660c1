"""Infinitesimal Lie deformations `F -> F + s L_eps F` with random spacetime generators."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._core.calculus import deform
from ..models import AbstractNeuralODE
from ..models.node import check_observation_times
from .diffeo import check_trajectory_boundary
from .features import (
    ObservationEnvelope,
    RandomFeatures,
    check_positive,
    mode_frequencies,
    observation_envelope,
    time_modes,
)
from .maps import AbstractFieldGauge


class LieGenerator(eqx.Module):
    """Amplitudes of a generator: `eps_y = sum_k m_k(t) Wy[k] phi(y)`,
    `eps0 = sum_k m_k(t) a0[k] . phi(y)`, with `m_k` the temporal modes and `phi` the features."""

    Wy: Float[Array, "K d m"]
    a0: Float[Array, "K m"]


class FeatureGenerator(eqx.Module):
    """A spacetime generator `(t, y) -> (eps0, eps_y)` built from a `LieGenerator`; the
    temporal modes times q(t), the `ObservationEnvelope` (1 without one)."""

    features: RandomFeatures
    amplitudes: LieGenerator
    omega: Float[Array, " K"]
    phase: Float[Array, " K"]
    envelope: ObservationEnvelope | None = None

    def __call__(self, t, y):
        m = time_modes(t, self.omega, self.phase)
        if self.envelope is not None:  # None: the x(T) families, their arithmetic unchanged
            m = m * self.envelope(t)
        phi = self.features(y)
        eps_y = jnp.einsum("k,kdm,m->d", m, self.amplitudes.Wy, phi)
        eps0 = jnp.einsum("k,km,m->", m, self.amplitudes.a0, phi)
        return eps0, eps_y


class LieDeformationGauge(AbstractFieldGauge):
    """Infinitesimal spacetime diffeomorphisms of a `NeuralODE` (Eq. 7-9, Thm 2.1).

    An element is a `LieGenerator` g; `act(g, model)` replaces the field by
    `deform(F, eps_g, 1)`, so `act(s g, model)` is the deformation at scale s. The family is a
    vector space (the Lie algebra): `compose` adds, `inverse` negates; both are exact to first
    order, which is all an infinitesimal family means. With `boundary="vanishing"` every
    generator vanishes at t = 0 and t = T (a gauge symmetry); with `"free"` it does not.

    **Observable preserved** (to first order, Thm 2.1): x(T) (`boundary="vanishing"`); with
    `observation_times` `(t_1, ..., t_n)` the saved trajectory of a model observing at those
    times: the modes `sin(k pi t/T)` times `q = prod_i (t - t_i)` normalised to `max |q| = 1`
    on [0, T], so every generator vanishes at 0, T and each t_i (Thm 2.1 generalised: the
    response at t_i is `DPhi_{t_i}(z) v(0, z) - v(t_i, Phi_{t_i}(z))`). `control()`: the
    `"free"` family, or with observation times the boundary-only one (`q = 1`), which keeps
    x(T) and moves the interior saved states.

    **Arguments:**

    - `dim`: state dimension; `t1`: final time T; `key`: draws the random features.
    - `num_modes` (K), `num_features` (m): size of the generator basis.
    - `time_component`: include eps0 (a time reparametrisation part) or keep eps spatial.
    - `amplitude`: standard deviation scale of sampled amplitudes.
    - `boundary`: `"vanishing"` or `"free"`.
    - `observation_times`: the model's (default None: x(T)).

    **Raises:** `ValueError` for a bad value (naming it), as `check_observation_times`, or
    `observation_times` with `boundary="free"`.
    """

    features: RandomFeatures
    t1: float
    omega: Float[Array, " K"]
    phase: Float[Array, " K"]
    envelope: ObservationEnvelope | None
    observation_times: tuple[float, ...] | None
    time_component: bool = eqx.field(static=True)
    amplitude: float
    infinitesimal = True
    acts_on = AbstractNeuralODE

    def __init__(
        self,
        dim: int,
        t1: float,
        *,
        key: PRNGKeyArray,
        num_modes: int = 2,
        num_features: int = 8,
        time_component: bool = True,
        amplitude: float = 0.1,
        boundary: str = "vanishing",
        observation_times: Any = None,  # a sequence of floats, or None
    ):
        check_positive("t1", t1)
        check_positive("amplitude", amplitude)
        if not isinstance(num_modes, int) or num_modes <= 0:
            raise ValueError(f"`num_modes` must be a positive int; received {num_modes!r}.")
        check_trajectory_boundary(boundary, observation_times)
        self.features = RandomFeatures(dim, num_features, key=key)
        self.t1 = float(t1)
        self.omega, self.phase = mode_frequencies(self.t1, num_modes, boundary)
        self.envelope = observation_envelope(self.t1, observation_times)
        self.observation_times = check_observation_times(observation_times, 0.0, self.t1)
        self.time_component = bool(time_component)
        self.amplitude = float(amplitude)

    @property
    def num_modes(self) -> int:
        return self.omega.shape[0]

    def generator(self, g: LieGenerator) -> FeatureGenerator:
        """The spacetime generator `(t, y) -> (eps0, eps_y)` of element g."""
        return FeatureGenerator(self.features, g, self.omega, self.phase, self.envelope)

    def first_order_generator(self, direction: LieGenerator) -> FeatureGenerator:
        """`generator(direction)`: `act(g)` is `deform(F, generator(g), 1)` and the generator
        is linear in g, so along `direction` from the identity (zero) the field moves as
        `deform(F, generator(direction), a)`."""
        return self.generator(direction)

    def sample(self, key: PRNGKeyArray) -> LieGenerator:
        m, d = self.features.U.shape
        ky, k0 = jax.random.split(key)
        scale = self.amplitude / jnp.sqrt(m)
        Wy = scale * jax.random.normal(ky, (self.num_modes, d, m))
        a0 = scale * jax.random.normal(k0, (self.num_modes, m))
        if not self.time_component:
            a0 = jnp.zeros_like(a0)
        return LieGenerator(Wy, a0)

    def identity(self) -> LieGenerator:
        m, d = self.features.U.shape
        return LieGenerator(jnp.zeros((self.num_modes, d, m)), jnp.zeros((self.num_modes, m)))

    def inverse(self, g: LieGenerator) -> LieGenerator:
        return jax.tree.map(jnp.negative, g)

    def compose(self, g1: LieGenerator, g2: LieGenerator) -> LieGenerator:
        return jax.tree.map(jnp.add, g1, g2)

    def act(self, g: LieGenerator, model: Any) -> AbstractNeuralODE:
        self.check_model(model)
        return model.with_field(deform(model.field, self.generator(g), 1.0))

    def control(self) -> "LieDeformationGauge":
        """The `boundary="free"` family (`cos(k pi t/T)` modes, not vanishing at 0 and T): its
        first-order response does not vanish; with observation times the boundary-only family
        (vanishing at 0 and T only), whose response at the interior times does not. Only
        arrays differ, so a sweep of it reuses the compiled program."""
        if self.envelope is not None:
            return eqx.tree_at(lambda g: g.envelope, self, self.envelope.boundary_only())
        omega, phase = mode_frequencies(self.t1, self.num_modes, "free")
        return eqx.tree_at(lambda g: (g.omega, g.phase), self, (omega, phase))
