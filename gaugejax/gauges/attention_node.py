"""The gauge family of attention as an integrated neural ODE (Eq. 39-42).

An `AttentionNODE` (n tokens, linear part `w(t)`, instantaneous cubic nonlinearity at `t0`) has
two redundancies that leave its input-output map intact: a spatial diffeomorphism `x = G(t) y`
with `G(0) = G(T) = 1` (`w -> G^-1 w G - G^-1 dG/dt`, and at t0 `lambda -> G^-1 lambda G`,
`lambda~ -> G^T lambda~ G`; `AttentionNODE.diffeomorphism`), and the rescaling of the
decomposition (40), `lambda -> lambda / alpha`, `lambda~ -> alpha lambda~`
(`AttentionNODE.rescale`). Through Eq. 41 they induce the attention gauge with
`A = G(t0)^-T`, `B = G(t0)` (`A B^T = 1`) and the alpha part. This module makes the pair one
family, so a sweep checks it like any other.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ..models.cubic import AttentionNODE
from .base import AbstractParameterGauge, model_error
from .linear import LinearGauge, LinearGaugeElement


class AttentionNODEGaugeElement(eqx.Module):
    """`G`: an element of the underlying `LinearGauge` (its shift is unused: zero for sampled
    elements), or a composition/inverse of such; `alpha` (> 0): the decomposition scale."""

    G: PyTree
    alpha: Float[Array, ""]


class AttentionNODEGauge(AbstractParameterGauge):
    """Diffeomorphisms `x = G(t) y` (`G(t) = expm(sum_k sin(k pi t / T) A_k)`, so `G(0) = G(T)
    = 1`) and decomposition rescalings `alpha` of an `AttentionNODE` (see the module
    docstring). Elements compose as `G = G1 G2` (g1 then g2), `alpha = alpha1 alpha2`.

    **Arguments:**

    - `dim`: the token dimension d; `t1`: the model's end time T (models start at 0).
    - `num_modes`, `rho`: as for `LinearGauge` (the modes of `log G(t)` and their size).
    - `log_scale`: standard deviation of `log alpha` in `sample` (0 keeps alpha = 1).

    The `control()` is the boundary-free family (`G(T) != 1`): the output changes.

    **Raises:** `ValueError` for out-of-range arguments.
    """

    linear: LinearGauge
    log_scale: float
    infinitesimal = False

    def __init__(
        self,
        dim: int,
        t1: float,
        *,
        num_modes: int = 2,
        rho: float = 0.5,
        log_scale: float = 0.5,
    ):
        # the maps of G(t); its shift c(t) is not part of this family (sampled as zero)
        self.linear = LinearGauge(dim, t1, num_modes=num_modes, rho=rho)
        if not (isinstance(log_scale, (int, float)) and 0 <= log_scale < 10):
            raise ValueError(f"`log_scale` must be a number in [0, 10); received {log_scale!r}.")
        self.log_scale = float(log_scale)

    def check_model(self, model: Any) -> None:
        """Raise unless `model` is an `AttentionNODE` of dimension `dim` on [0, t1].

        **Raises:** `TypeError` for another model; `ValueError` for another dimension or end
        time.
        """
        if not isinstance(model, AttentionNODE):
            raise model_error(
                self,
                "an AttentionNODE",
                model,
                "Build it with gj.attention_as_node(Wq, Wk, Wv) (Eq. 39-42).",
            )
        d = self.linear.dim
        if model.lam.shape != (d, d):
            raise ValueError(
                f"AttentionNODEGauge has dim {d}; the AttentionNODE has token dimension "
                f"{model.lam.shape[0]}."
            )
        if float(model.t1) != self.linear.t1:
            raise ValueError(
                f"AttentionNODEGauge is defined on [0, {self.linear.t1}] (G(0) = G(T) = 1 "
                f"there); the model ends at t1 = {float(model.t1)}. Build the gauge with "
                f"t1={float(model.t1)}."
            )

    def sample(self, key: PRNGKeyArray) -> AttentionNODEGaugeElement:
        """A random element: `A_k` as `LinearGauge.sample`, no shift, `alpha = exp(s z)`."""
        kg, ka = jax.random.split(key)
        base = self.linear.sample(kg)
        G = LinearGaugeElement(base.A, jnp.zeros_like(base.c))
        return AttentionNODEGaugeElement(G, jnp.exp(self.log_scale * jax.random.normal(ka)))

    def identity(self) -> AttentionNODEGaugeElement:
        return AttentionNODEGaugeElement(self.linear.identity(), jnp.ones(()))

    def inverse(self, g: AttentionNODEGaugeElement) -> AttentionNODEGaugeElement:
        return AttentionNODEGaugeElement(self.linear.inverse(g.G), 1.0 / g.alpha)

    def compose(
        self, g1: AttentionNODEGaugeElement, g2: AttentionNODEGaugeElement
    ) -> AttentionNODEGaugeElement:
        return AttentionNODEGaugeElement(self.linear.compose(g1.G, g2.G), g1.alpha * g2.alpha)

    def act(self, g: AttentionNODEGaugeElement, model: Any) -> AttentionNODE:
        """`model.diffeomorphism(G).rescale(alpha)` (the equations live on `AttentionNODE`)."""
        self.check_model(model)
        return model.diffeomorphism(self.linear.to_map(g.G).G).rescale(g.alpha)

    def control(self) -> "AttentionNODEGauge":
        """The family with `G(T) != 1` (boundary-free modes): not a symmetry."""
        return eqx.tree_at(lambda g: g.linear, self, self.linear.control())
