"""Symmetry teleportation (Zhao et al. 2022): move a model along its rescaling orbit, where the
function (hence the loss) is unchanged, to a point where the loss landscape is better for the
optimiser, e.g. where the gradient is larger, then continue training from there.

The orbit of `RescalingGauge` is parametrised by the log of the positive per-unit factors,
`u = log alpha` (one vector per hidden layer; `u = 0` is the input model). `teleport` runs
`num_steps` of gradient ascent with optax on an objective of the rescaled model:

- `"grad_norm"`: `log |grad_theta L|^2`, the log of the squared gradient norm of
  `loss_fn(model, batch)` with respect to every inexact array of the model (weights and
  biases). Its log makes the step independent of the gradient's overall scale.
- `"curvature"`: `g^T H g / g^T g`, the curvature of the loss along its gradient `g` (`H` the
  Hessian with respect to the parameters): the quantity that decides whether a gradient step of
  a given length overshoots. Ascended as it is (it has no fixed sign).

The step is bounded: each update of `u` is `learning_rate * d objective / du` clipped
elementwise to `[-max_log_step, max_log_step]` (`optax.clip`), so no factor changes by more
than `exp(max_log_step)` per step, whatever the size of the objective's gradient. This matters:
along a ReLU network's orbit the gradient norm is unbounded (scaling a unit's incoming weights
up scales the gradient of its outgoing weights up by the same factor), so unbounded ascent runs
off to infinity. A step whose objective or objective gradient is not finite is not taken (the
ascent stops at the last finite point). A teleport that raises the gradient norm also lengthens
the next step of a fixed-learning-rate optimiser: repeated large teleports can destabilise SGD
(`experiments/teleportation.py` bounds each teleport by `num_steps * max_log_step`).

Cost: every ascent step evaluates the loss gradient on `batch` and differentiates through it
(reverse over reverse: a Hessian-vector product), plus one such evaluation at the start;
`TeleportResult.num_objective_evaluations` counts them.

After a teleport, an optimiser's state holds statistics of gradients taken in the old
coordinates. `transport_adam_state` carries an Adam state through the move: for an action that
scales every parameter, `theta' = s * theta` (`gauge.parameter_scale`), gradients transform as
`grad' = grad / s`, so Adam's moments become `m / s` and `v / s^2`, exactly the moments of the
same gradient history seen in the new coordinates.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int, PyTree

from .._core._checks import check_value
from ..gauges.base import AbstractGauge, cast_element
from ..gauges.rescaling import RescalingElement, RescalingGauge, rescaling_conserved_quantity
from .balancing import orbit_gauge


TELEPORT_OBJECTIVES = ("grad_norm", "curvature", "adam_step")
ADAM_EPS = 1e-8  # optax.adam's default eps: the first step is -lr g / (|g| + eps)


class TeleportResult(eqx.Module):
    """The outcome of `teleport`.

    **Fields:**

    - `model`: the teleported model, `gauge.act(element, input model)` (the same function).
    - `element`: the gauge element (one positive vector per hidden layer) reached.
    - `loss_before`, `loss_after`: `loss_fn` on the batch at the input and teleported model
      (equal up to rounding: the function is unchanged).
    - `grad_norm_before`, `grad_norm_after`: `|grad_theta loss|` (not squared) at both.
    - `objective_history`: the objective at the start and after each ascent step, shape
      `(num_steps + 1,)` (a step that was not taken repeats the last value).
    - `charges_before`, `charges_after`: `rescaling_conserved_quantity` of both models (the
      Noether charges that gradient flow conserves and teleportation changes).
    - `num_accepted`: the ascent steps taken (all but those after a non-finite objective).
    - `num_objective_evaluations`: evaluations of the objective and its gradient
      (`num_steps + 1`; for `"grad_norm"` each is a loss gradient on the batch plus a backward
      pass through it, about a Hessian-vector product; the gradient norms before and after
      cost two more loss gradients).
    """

    model: Any
    element: RescalingElement
    loss_before: Float[Array, ""]
    loss_after: Float[Array, ""]
    grad_norm_before: Float[Array, ""]
    grad_norm_after: Float[Array, ""]
    objective_history: Float[Array, " steps_plus_one"]
    charges_before: tuple[Float[Array, " _width"], ...]
    charges_after: tuple[Float[Array, " _width"], ...]
    num_accepted: Int[Array, ""]
    num_objective_evaluations: int = eqx.field(static=True)

    @property
    def relative_loss_change(self) -> Float[Array, "*batch"]:
        """`|loss_after - loss_before| / |loss_before|` (rounding only, for a symmetry; one per
        lane of a vmapped result)."""
        return jnp.abs(self.loss_after - self.loss_before) / jnp.abs(self.loss_before)

    @property
    def grad_norm_ratio(self) -> Float[Array, "*batch"]:
        """`grad_norm_after / grad_norm_before`."""
        return self.grad_norm_after / self.grad_norm_before


def _leaves_sq(tree) -> Array:
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))


def _vdot(a, b) -> Array:
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _loss_and_grad(loss_fn, model, batch):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return jax.value_and_grad(lambda p: loss_fn(eqx.combine(p, static), batch))(params)


def _objective(loss_fn, objective: str, model, batch, adam_lr) -> Array:
    params, static = eqx.partition(model, eqx.is_inexact_array)
    loss = lambda p: loss_fn(eqx.combine(p, static), batch)  # noqa: E731
    if objective == "adam_step":  # the loss decrease of a fresh Adam's first step
        value, g = jax.value_and_grad(loss)(params)
        step = jax.tree.map(lambda p, gi: p - adam_lr * gi / (jnp.abs(gi) + ADAM_EPS), params, g)
        return jnp.log(value - loss(step))  # log: steps independent of the scale, as grad_norm
    grad_fn = jax.grad(loss)
    g = grad_fn(params)
    if objective == "grad_norm":
        return jnp.log(_leaves_sq(g))
    _, hg = jax.jvp(grad_fn, (params,), (g,))
    return _vdot(g, hg) / _leaves_sq(g)


def _all_finite(tree) -> Bool[Array, ""]:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@eqx.filter_jit
def _teleport(
    loss_fn, objective, maximize, gauge, model, batch, num_steps, lr, max_log_step, adam_lr
):
    dtype = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))[0].dtype
    u0 = jax.tree.map(jnp.zeros_like, cast_element(gauge.identity(), dtype))
    sign = -1.0 if maximize else 1.0  # optax minimises

    def f(u):
        moved = gauge.act(tuple(jnp.exp(x) for x in u), model)
        return sign * _objective(loss_fn, objective, moved, batch, adam_lr)

    optimizer = optax.chain(optax.sgd(lr), optax.clip(max_log_step))
    value_and_grad = jax.value_and_grad(f)

    def step(carry, _):
        u, state, value, grad, accepted, stopped = carry
        updates, new_state = optimizer.update(grad, state, u)
        new_u = optax.apply_updates(u, updates)
        new_value, new_grad = value_and_grad(new_u)
        ok = ~stopped & jnp.isfinite(new_value) & _all_finite(new_grad)
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        carry = (
            jax.tree.map(keep, new_u, u),
            jax.tree.map(keep, new_state, state),
            keep(new_value, value),
            jax.tree.map(keep, new_grad, grad),
            accepted + ok.astype(accepted.dtype),
            ~ok,
        )
        return carry, sign * carry[2]

    value0, grad0 = value_and_grad(u0)
    finite0 = jnp.isfinite(value0) & _all_finite(grad0)
    init = (u0, optimizer.init(u0), value0, grad0, jnp.zeros((), jnp.int32), ~finite0)
    (u, *_, accepted, _), history = jax.lax.scan(step, init, None, length=num_steps)
    element = tuple(jnp.exp(x) for x in u)
    moved = gauge.act(element, model)
    loss0, g0 = _loss_and_grad(loss_fn, model, batch)
    loss1, g1 = _loss_and_grad(loss_fn, moved, batch)
    return TeleportResult(
        model=moved,
        element=element,
        loss_before=loss0,
        loss_after=loss1,
        grad_norm_before=jnp.sqrt(_leaves_sq(g0)),
        grad_norm_after=jnp.sqrt(_leaves_sq(g1)),
        objective_history=jnp.concatenate([(sign * value0)[None], history]),
        charges_before=rescaling_conserved_quantity(model),
        charges_after=rescaling_conserved_quantity(moved),
        num_accepted=accepted,
        num_objective_evaluations=num_steps + 1,
    )


def _positive(name: str, value: Any, dtype) -> Array:
    """`value` as a scalar of `dtype`, > 0 and finite: a `ValueError` when it is concrete, a
    runtime error (`eqx.error_if`) when it is traced."""
    if isinstance(value, bool) or not (
        isinstance(value, int | float) or (eqx.is_array(value) and jnp.ndim(value) == 0)
    ):
        raise TypeError(f"`{name}` must be a real scalar; received {value!r}.")
    return check_value(
        jnp.asarray(value, dtype=dtype),
        lambda: ~(jnp.isfinite(jnp.asarray(value)) & (jnp.asarray(value) > 0)),
        f"`{name}` must be a finite number > 0.",
        received=lambda: f"Received {value!r}.",
    )


def teleport(
    model: Any,
    loss_fn: Any,
    batch: PyTree,
    *,
    gauge: RescalingGauge | None = None,
    num_steps: int = 10,
    learning_rate: float | Float[Array, ""] = 1.0,
    max_log_step: float | Float[Array, ""] = 0.1,
    objective: str = "grad_norm",
    maximize: bool = True,
    adam_learning_rate: float | Float[Array, ""] | None = None,
) -> TeleportResult:
    """Teleport `model` along its rescaling orbit to maximise (or minimise) `objective`,
    keeping its function; see the module docstring for the objectives and the bounded step.

    Runs under `jit` and `vmap` (e.g. `eqx.filter_vmap` over a stack of seeds); the ascent is
    one compiled `lax.scan`, shared by calls that differ only in the model's values, the batch,
    `learning_rate` or `max_log_step` (pass the same `loss_fn` object).

    **Arguments:**

    - `model`: a model `RescalingGauge` acts on as a symmetry, e.g.
      `eqx.nn.MLP(..., activation=jax.nn.relu)`.
    - `loss_fn`: `loss_fn(model, batch) -> scalar`, differentiable twice (three times for
      `"curvature"`); a top-level function or an `eqx.Module`, so that calls share a program.
    - `batch`: the data the objective is evaluated on (any PyTree `loss_fn` accepts).
    - `gauge`: the compensating `RescalingGauge` to move along (default
      `RescalingGauge.from_model(model)`).
    - `num_steps`: ascent steps (0 returns the input model with its measurements).
    - `learning_rate`: the step size on `log alpha` before clipping.
    - `max_log_step`: the largest change of any `log alpha` in one step.
    - `objective`: `"grad_norm"` (`log |grad L|^2`), `"curvature"` (`g^T H g / g^T g`) or
      `"adam_step"`: `L(theta) - L(theta - lr g / (|g| + eps))`, the loss decrease of the first
      step of an Adam started afresh (its bias-corrected moments are then `g` and `g^2`) with
      `adam_learning_rate` and optax's `eps`. Adam's step is blind to the gradient's scale, so
      a larger `|grad L|` buys it nothing; this objective asks what its next step gains.
    - `maximize`: ascend (True) or descend (False) the objective.
    - `adam_learning_rate`: the learning rate of the Adam that trains the model (required for
      `"adam_step"`, refused otherwise).

    **Returns:** a `TeleportResult`; `gauge.act(result.element, model)` is `result.model`.

    **Raises:** `TypeError` for a gauge that is not a `RescalingGauge`, a non-callable
    `loss_fn`, a `num_steps` that is not an int, or non-scalar step sizes; `ValueError` for the
    control family (`compensate=False`, which changes the function), a negative `num_steps`,
    an unknown `objective` (the valid ones are `TELEPORT_OBJECTIVES`), a `learning_rate` or
    `max_log_step` that is not finite and > 0 (at run time, through `eqx.error_if`, when it is
    traced), a `batch` with a non-finite entry (likewise), and as
    `RescalingGauge.check_model` for a model without the symmetry (e.g. a tanh MLP); all before
    anything is compiled.
    """
    gauge = orbit_gauge(model, gauge, "teleport", "moving along it is not a teleport")
    gauge.check_model(model)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable; received {type(loss_fn).__name__}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise TypeError(f"`num_steps` must be an int >= 0; received {num_steps!r}.")
    if num_steps < 0:
        raise ValueError(f"`num_steps` must be an int >= 0; received {num_steps!r}.")
    if objective not in TELEPORT_OBJECTIVES:
        raise ValueError(
            f"`objective` must be one of {list(TELEPORT_OBJECTIVES)}; received {objective!r}."
        )
    if not isinstance(maximize, bool):
        raise TypeError(f"`maximize` must be a bool; received {maximize!r}.")
    inexact = jax.tree.leaves(eqx.filter(batch, eqx.is_inexact_array))
    if inexact:  # a NaN example makes every objective NaN, and then every step's factors
        batch = check_value(
            batch,
            lambda: jnp.stack([~jnp.all(jnp.isfinite(x)) for x in inexact]),
            "`batch` must hold finite values only; it has a NaN or infinite entry.",
        )
    if (objective == "adam_step") != (adam_learning_rate is not None):
        raise ValueError(
            "`adam_learning_rate` is the step size of objective 'adam_step': required with "
            f"it, refused otherwise; received objective={objective!r}, "
            f"adam_learning_rate={adam_learning_rate!r}."
        )
    dtype = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))[0].dtype
    lr = _positive("learning_rate", learning_rate, dtype)
    clip = _positive("max_log_step", max_log_step, dtype)
    adam_lr = (
        None
        if adam_learning_rate is None
        else _positive("adam_learning_rate", adam_learning_rate, dtype)
    )
    return _teleport(
        loss_fn, objective, maximize, gauge, model, batch, num_steps, lr, clip, adam_lr
    )


def transport_adam_state(
    opt_state: PyTree, gauge: AbstractGauge, element: PyTree, model: Any
) -> PyTree:
    """Carry an optax Adam (or AdamW) state through the gauge move
    `model -> gauge.act(element, model)`, e.g. a teleport (`TeleportResult.element`).

    For a family whose element scales every parameter, `act(element, model) = s * model`
    (`gauge.parameter_scale`, e.g. `RescalingGauge`), the loss in the new coordinates is
    `L'(theta') = L(theta' / s)`, so every gradient transforms as `grad' = grad / s`. Adam's
    moments are exponential averages of the gradients and of their squares: those of the same
    gradient history seen in the new coordinates are `mu / s` and `nu / s^2`, which is what
    this returns (to rounding; `count`, hence the bias correction, and every other part of
    the state unchanged). Every `optax.ScaleByAdamState` inside `opt_state` (e.g. in an
    `optax.chain`) is transported. Adam's step `m / sqrt(v)` is blind to the scale, so in the
    old coordinates the carried state steps each parameter by `1 / s` of its old step: the
    move changes the optimiser's dynamics, the moments stay exact. Runs under `jit`/`vmap`.

    **Arguments:**

    - `opt_state`: the state of an optax Adam or AdamW (`optimizer.init` of
      `eqx.filter(model, eqx.is_inexact_array)`), any chain holding an `optax.ScaleByAdamState`.
    - `gauge`: the family of the move; its action must scale parameters elementwise
      (`parameter_scale` not None) and keep the function.
    - `element`: the element of `gauge` that moved the model.
    - `model`: the model before the move (the one `opt_state` was updated on).

    **Returns:** `opt_state` with every Adam state's `mu` and `nu` transported, the same
    structure and dtypes.

    **Raises:** `TypeError` for a `gauge` that is not a gauge family or an `opt_state` holding
    no `optax.ScaleByAdamState`; `ValueError` for a family whose action mixes parameters
    (`parameter_scale` None: rotations and permutations do not keep a diagonal second moment
    diagonal), the control of `RescalingGauge` (`compensate=False` changes the function), and
    moments whose structure or shapes differ from the model's inexact arrays; as
    `gauge.act` for a model or element the family refuses.
    """
    if not isinstance(gauge, AbstractGauge):
        raise TypeError(f"`gauge` must be a gauge family; received {type(gauge).__name__}.")
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    if not any(map(is_adam, jax.tree.leaves(opt_state, is_leaf=is_adam))):
        raise TypeError(
            "`opt_state` must be the state of an optax Adam or AdamW (holding an "
            f"`optax.ScaleByAdamState`); received a {type(opt_state).__name__} without one."
        )
    scale = gauge.parameter_scale(element, model)
    if scale is None:
        raise ValueError(
            f"`gauge` must scale each parameter (elementwise action, e.g. RescalingGauge); "
            f"received {type(gauge).__name__}, whose action mixes parameters: a diagonal "
            "second moment does not stay diagonal, so no Adam state can follow it."
        )
    want = (jax.tree.structure(scale), [jnp.shape(x) for x in jax.tree.leaves(scale)])

    def carry(state):
        for name in ("mu", "nu"):
            got = getattr(state, name)
            if (jax.tree.structure(got), [jnp.shape(x) for x in jax.tree.leaves(got)]) != want:
                raise ValueError(
                    f"`opt_state`'s Adam `{name}` must have the structure and shapes of "
                    f"`model`'s inexact arrays, {want[1]}; received a {type(got).__name__} of "
                    f"shapes {[jnp.shape(x) for x in jax.tree.leaves(got)]}."
                )
        mu = jax.tree.map(lambda m, s: m / s.astype(m.dtype), state.mu, scale)
        nu = jax.tree.map(lambda v, s: v / (s**2).astype(v.dtype), state.nu, scale)
        return state._replace(mu=mu, nu=nu)

    return jax.tree.map(lambda x: carry(x) if is_adam(x) else x, opt_state, is_leaf=is_adam)
