"""Positive per-unit rescaling (Eq. 29-30, App. C) and its Noether charge.

Hidden unit j of layer l scales its incoming weights and bias by `alpha_j > 0` and its outgoing
weights by `1 / alpha_j`. The function is unchanged when every nonlinearity between layers is
positively homogeneous (`phi(a x) = a phi(x)` for a > 0: identity, ReLU, leaky ReLU, L_s
pooling) and no normalisation intervenes. Models: gaugejax's `FeedforwardNet`, `GraphConvNet`,
`ConvNet` (one factor per channel) and `eqx.nn.MLP`.

All of them are handled through one view, a *chain* of affine maps `W_0, ..., W_H` with biases
`b_0, ..., b_H` (None where absent): `W_l` has shape `(out, in, *trailing)` (trailing kernel
axes for a convolution) and `b_l` shape `(out, *trailing)`. Hidden layer l (l = 0..H-1) is the
output of `W_l`; a ConvNet's readout is viewed as `(out, channels, spatial)`, because it reads
channel-major flattened features.
"""

import functools
from collections.abc import Callable
from typing import Any, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .._core._checks import check_value, is_traced
from .._core._types import ScalarLike
from ..models import ConvNet, FeedforwardNet, GraphConvNet
from ..models.linear import ACTIVATIONS
from .base import AbstractParameterGauge, model_error


# one positive factor per hidden unit (channel) of every hidden layer; widths differ by layer,
# hence the unchecked dimension name
RescalingElement: TypeAlias = tuple[Float[Array, " _width"], ...]

_EXPECTED = "a FeedforwardNet, eqx.nn.MLP, GraphConvNet or ConvNet"
_HOW = (
    "The rescaling acts on chains of affine layers separated by positively homogeneous "
    "activations: build the model as an eqx.nn.MLP (e.g. activation=jax.nn.relu) or a "
    "gaugejax FeedforwardNet, GraphConvNet or ConvNet."
)

# the numerical test of positive homogeneity: phi(a x) against a phi(x) on a fixed grid
_GRID_POINTS = 64
_GRID_SCALES = (0.3, 2.5, 7.0)
# A positively homogeneous activation computed in floating point differs between phi(a x) and
# a phi(x) only by the rounding of a few operations (a x, a slope times x, a phi(x)): a few ulp
# of the values compared. 100 eps leaves room for compositions of such operations (e.g.
# `2 * relu(z) - 0.1 * relu(-z)`), while a non-homogeneous activation (tanh, GELU, softplus)
# deviates at O(1) relative on this grid: 10^13 (float64) or 10^5 (float32) times the bound.
_GRID_RTOL_EPS = 100


# ---------------------------------------------------------------------------- the chain view


def chain_kind(model: Any, family: Any) -> str:
    """The kind of a supported model (exact dispatch on its type), else `model_error`."""
    if isinstance(model, FeedforwardNet):
        return "feedforward"
    if isinstance(model, eqx.nn.MLP):
        return "mlp"
    if isinstance(model, GraphConvNet):
        return "graph"
    if isinstance(model, ConvNet):
        return "conv"
    raise model_error(family, _EXPECTED, model, how=_HOW)


def _mlp_linears(model: eqx.nn.MLP) -> list:
    """The `eqx.nn.Linear`s of an MLP in order; with `scan=True` the stacked hidden layers are
    unstacked into (weight, bias) pairs."""
    if not getattr(model, "scan", False):
        return [(lay.weight, lay.bias) for lay in model.layers]
    first, hidden, last = model.layers
    stacked = [
        (hidden.weight[i], None if hidden.bias is None else hidden.bias[i])
        for i in range(hidden.weight.shape[0])
    ]
    return [(first.weight, first.bias), *stacked, (last.weight, last.bias)]


def chain_view(model: Any, kind: str) -> tuple[list, list]:
    """`(weights, biases)` of the chain view (see the module docstring)."""
    if kind == "feedforward":
        n = model.weights.shape[0]
        return [model.weights[i] for i in range(n)], [model.biases[i] for i in range(n)]
    if kind == "mlp":
        pairs = _mlp_linears(model)
        return [w for w, _ in pairs], [b for _, b in pairs]
    if kind == "graph":
        return [lay.weight for lay in model.layers], [lay.bias for lay in model.layers]
    convs, readout = model.convs, model.readout
    channels, out = convs[-1].weight.shape[0], readout.weight.shape[0]
    weights = [c.weight for c in convs] + [readout.weight.reshape(out, channels, -1)]
    return weights, [c.bias for c in convs] + [readout.bias]


def _none_leaf(x) -> bool:
    return x is None


def _rebuild(model: Any, kind: str, weights: list, biases: list) -> Any:
    """The model with the chain's weights and biases replaced (None biases stay None)."""
    if kind == "feedforward":
        return eqx.tree_at(
            lambda m: (m.weights, m.biases), model, (jnp.stack(weights), jnp.stack(biases))
        )
    if kind == "mlp" and getattr(model, "scan", False):
        hidden = model.layers[1]
        if len(weights) > 2:
            hw = jnp.stack(weights[1:-1])
            hb = None if hidden.bias is None else jnp.stack(biases[1:-1])
        else:  # depth 1 with scan: an empty stack of hidden layers
            hw, hb = hidden.weight, hidden.bias
        weights = [weights[0], hw, weights[-1]]
        biases = [biases[0], hb, biases[-1]]
    if kind in ("mlp", "graph"):
        return eqx.tree_at(
            lambda m: [lay.weight for lay in m.layers] + [lay.bias for lay in m.layers],
            model,
            list(weights) + list(biases),
            is_leaf=_none_leaf,
        )
    readout = weights[-1].reshape(model.readout.weight.shape)
    return eqx.tree_at(
        lambda m: [c.weight for c in m.convs] + [c.bias for c in m.convs] + [m.readout.weight],
        model,
        list(weights[:-1]) + list(biases[:-1]) + [readout],
        is_leaf=_none_leaf,
    )


def _hidden_widths(model: Any, kind: str) -> tuple[int, ...]:
    """The hidden widths, read from the shapes alone (no array operation runs)."""
    if kind == "feedforward":
        return (int(model.weights.shape[1]),) * (model.weights.shape[0] - 1)
    if kind == "mlp" and getattr(model, "scan", False):
        first, hidden, _ = model.layers
        return (int(first.weight.shape[0]),) + (int(hidden.weight.shape[1]),) * int(
            hidden.weight.shape[0]
        )
    if kind in ("mlp", "graph"):
        return tuple(int(lay.weight.shape[0]) for lay in model.layers[:-1])
    channels = model.convs[-1].weight.shape[0]
    flat = model.readout.weight.shape[1]
    if flat % channels:
        raise ValueError(
            f"the ConvNet readout has {flat} inputs, not a multiple of the last conv layer's "
            f"{channels} channels: its features are not channel-major flattened."
        )
    return tuple(int(c.weight.shape[0]) for c in model.convs)


def _rows(a: Array, x: Array) -> Array:
    """`a` broadcast along axis 0 of `x` (the output units of a layer)."""
    return a.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def _cols(a: Array, x: Array) -> Array:
    """`a` broadcast along axis 1 of `x` (the input units of a layer)."""
    return a.astype(x.dtype).reshape((1, -1) + (1,) * (x.ndim - 2))


def unit_norms(weights: list, biases: list) -> list[tuple[Array, Array]]:
    """Per hidden layer: `(|incoming|^2 + bias^2, |outgoing|^2)` of every unit."""
    norms = []
    for w, b, w_next in zip(weights[:-1], biases[:-1], weights[1:], strict=True):
        incoming = jnp.sum(w**2, axis=tuple(range(1, w.ndim)))
        if b is not None:
            incoming = incoming + jnp.sum(b**2, axis=tuple(range(1, b.ndim)))
        outgoing = jnp.sum(w_next**2, axis=(0, *range(2, w_next.ndim)))
        norms.append((incoming, outgoing))
    return norms


def chain_squares(weights: list, biases: list) -> tuple[list, list]:
    """The inputs of `balance_factors`: per layer `W_l**2` summed over trailing axes, `(out,
    in)`, and `b_l**2` summed likewise, `(out,)` (zeros without a bias)."""
    dtype = weights[0].dtype
    squares = [jnp.sum(w**2, axis=tuple(range(2, w.ndim))).astype(dtype) for w in weights]
    bias_squares = [
        jnp.zeros(w.shape[0], dtype)
        if b is None
        else jnp.sum(b**2, axis=tuple(range(1, b.ndim))).astype(dtype)
        for w, b in zip(weights, biases, strict=True)
    ]
    return squares, bias_squares


@functools.partial(jax.jit, static_argnames="max_iterations")
def balance_factors(squares: list, bias_squares: list, tol, max_iterations: int):
    """Gauss-Seidel sweeps of the closed-form ENorm update on the squared factors `s_l` (the
    engine of `gj.balance` and of `RescalingGauge.canonical_element`; see `gj.balance`).

    `squares[l]` is `W_l**2` summed over trailing axes, `(out, in)`; `bias_squares[l]` is
    `b_l**2` summed likewise, `(out,)` (zeros without a bias). Returns `(s, sweeps, change)`.
    """
    num_hidden = len(squares) - 1
    dtype = squares[0].dtype

    def sweep(state):
        i, s, _ = state
        s = list(s)
        change = jnp.zeros((), dtype)
        for n in range(num_hidden):
            s_in = jnp.ones(squares[n].shape[1], dtype) if n == 0 else s[n - 1]
            s_out = jnp.ones(squares[n + 1].shape[0], dtype) if n == num_hidden - 1 else s[n + 1]
            q = squares[n] @ (1.0 / s_in) + bias_squares[n]  # incoming at s_n = 1
            p = s_out @ squares[n + 1]  # outgoing at s_n = 1
            # units with zero incoming or outgoing weights have no minimum on the orbit (the
            # norm decreases forever as alpha -> inf or 0): their factor stays at 1
            live = (q > 0) & (p > 0)
            new = jnp.where(live, jnp.sqrt(p / jnp.where(live, q, 1.0)), s[n])
            # relative change of alpha = sqrt(s)
            change = jnp.maximum(change, jnp.max(jnp.abs(jnp.sqrt(new / s[n]) - 1.0)))
            s[n] = new
        return i + 1, tuple(s), change

    def cond(state):
        i, _, change = state
        return (i < max_iterations) & ~(change < tol)

    s0 = tuple(jnp.ones(w.shape[0], dtype) for w in squares[:-1])
    init = (jnp.zeros((), jnp.int32), s0, jnp.full((), jnp.inf, dtype))
    return jax.lax.while_loop(cond, sweep, init)


# ---------------------------------------------------------------------------- homogeneity


def _activation_name(activation: Any) -> str:
    if isinstance(activation, eqx.Module):
        return type(activation).__name__
    return getattr(activation, "__name__", None) or repr(activation)


def _homogeneity_defect(evaluate: Callable[[Array], Array], dtype) -> Bool[Array, ""]:
    """True where `evaluate(a x) != a evaluate(x)` beyond rounding on the fixed grid (see
    `_GRID_RTOL_EPS`). Concrete unless the activation holds traced arrays."""
    with jax.ensure_compile_time_eval():
        x = jnp.linspace(-3.0, 3.0, _GRID_POINTS, dtype=dtype)
        base = evaluate(x)
        eps = jnp.finfo(dtype).eps
        defect = jnp.zeros((), dtype=bool)
        for a in _GRID_SCALES:
            lhs, rhs = evaluate(a * x), a * base
            err = jnp.max(jnp.abs(lhs - rhs))
            scale = jnp.max(jnp.abs(lhs)) + jnp.max(jnp.abs(rhs))
            # `~(err <= ...)` so that a NaN counts as a defect
            defect = defect | ~(err <= _GRID_RTOL_EPS * eps * scale)
        return defect


def _grid_dtype(activation: Any):
    leaves = [x for x in jax.tree.leaves(activation) if eqx.is_inexact_array(x)]
    if leaves:  # a learnable activation: its own dtype (strict promotion refuses mixing)
        return leaves[0].dtype
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _fixed_activation_defect(activation: Callable, dtype) -> Bool[Array, ""]:
    """`_homogeneity_defect` of an activation that holds no arrays, computed once per
    activation and dtype in this process (eagerly, `jax.vmap` of a jitted activation such as
    `jax.nn.relu` builds a new program on every call: measured ~10 compilations a check)."""
    try:
        return jnp.asarray(_cached_defect(activation, jnp.dtype(dtype)))
    except TypeError:  # an unhashable activation: checked afresh
        return _homogeneity_defect(jax.vmap(activation), dtype)


@functools.lru_cache(maxsize=64)
def _cached_defect(activation: Callable, dtype) -> bool:
    return bool(_homogeneity_defect(jax.vmap(activation), dtype))


def _activation_defect(model: Any, kind: str) -> tuple[str, Bool[Array, ""]] | None:
    """`(name, defect)` for the activation between the layers, None where it is ReLU by
    construction (GraphConvNet, ConvNet)."""
    if kind == "feedforward":
        phi = ACTIVATIONS[model.activation]
        dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        return model.activation, _fixed_activation_defect(phi, dtype)
    if kind != "mlp":
        return None
    # `final_activation` is applied after the last layer, whose outputs the gauge does not
    # rescale: it may be anything (e.g. a sigmoid) and is not checked.
    activation = model.activation
    if not any(eqx.is_array(x) for x in jax.tree.leaves(activation)):
        return _activation_name(activation), _fixed_activation_defect(
            activation, _grid_dtype(activation)
        )
    # a learnable activation (e.g. eqx.nn.PReLU): eqx.nn.MLP keeps one copy per layer and
    # hidden unit, its arrays stacked along (depth, width); check every copy

    def evaluate(y):
        per_unit = eqx.filter_vmap(eqx.filter_vmap(lambda phi: jax.vmap(phi)(y)))
        return per_unit(activation)

    return _activation_name(activation), _homogeneity_defect(evaluate, _grid_dtype(activation))


def _not_homogeneous(name: str) -> str:
    return (
        f"activation {name!r} is not positively homogeneous (phi(a x) = a phi(x) for a > 0 "
        "fails numerically on a grid of x in [-3, 3]): the rescaling is no symmetry of this "
        "model. Pass require_symmetry=False to measure how badly it breaks."
    )


# ---------------------------------------------------------------------------- the family


class RescalingGauge(AbstractParameterGauge):
    """Positive per-unit rescaling (Eq. 29-30, App. C): hidden unit (or channel) j of layer l
    scales its incoming weights and bias by `alpha_j` and its outgoing weights by `1/alpha_j`.

    Acts on a `FeedforwardNet` (hidden layers n = 1..N-1, all of width d), an `eqx.nn.MLP`
    (hidden layers `layers[:-1]`; with or without biases, `scan=True` too) and a `GraphConvNet`
    (hidden layers), and a `ConvNet` (one factor per channel of every conv layer, shared over
    space as in Eq. 52; the readout absorbs the last). An element is a tuple of positive
    vectors `alpha = exp(log_scale * z)`, `z ~ N(0, 1)`, one per hidden layer.

    The function is invariant only when every nonlinearity between layers is positively
    homogeneous (checked numerically for FeedforwardNet and eqx.nn.MLP; ReLU and L_s pooling
    by construction for the CNN and GNN) and no normalisation layer intervenes: other models
    raise unless `require_symmetry=False`, which exists to measure how badly the symmetry
    breaks (tanh, GELU, instance normalisation).

    **Arguments:**

    - `widths`: the hidden widths (channels for a ConvNet), in order; `from_model` reads them.
    - `log_scale`: standard deviation of `log alpha` in `sample`.
    - `require_symmetry`: refuse models without the symmetry (default True).
    - `compensate`: divide the outgoing weights by alpha (default True). False is the negative
      control (`control()`): only the incoming weights and biases are scaled, which changes
      the function.

    **Raises:** `ValueError` for empty or non-positive widths, or a `log_scale` that is not
    finite.
    """

    widths: tuple[int, ...] = eqx.field(static=True)
    log_scale: ScalarLike
    require_symmetry: bool = eqx.field(static=True, default=True)
    compensate: bool = eqx.field(static=True, default=True)
    infinitesimal = False

    def __init__(
        self,
        widths: tuple[int, ...] | list[int],
        log_scale: ScalarLike = 0.5,
        *,
        require_symmetry: bool = True,
        compensate: bool = True,
    ):
        widths = tuple(widths)
        if not widths or not all(int(w) == w and w > 0 for w in widths):
            raise ValueError(f"`widths` must be a non-empty tuple of ints > 0; received {widths}.")
        self.widths = tuple(int(w) for w in widths)
        # a NaN or infinite scale would make every sample NaN (or overflow exp) in the sweep
        self.log_scale = check_value(
            float(log_scale) if isinstance(log_scale, int | float) else log_scale,
            lambda: ~jnp.isfinite(log_scale),
            "`log_scale` must be a finite number;",
            received=lambda: f"received {log_scale!r}.",
        )
        self.require_symmetry = bool(require_symmetry)
        self.compensate = bool(compensate)

    @classmethod
    def from_model(
        cls, model: Any, log_scale: ScalarLike = 0.5, *, require_symmetry: bool = True
    ) -> "RescalingGauge":
        """The gauge whose widths are the hidden widths of `model`.

        **Arguments:**

        - `model`: a `FeedforwardNet`, `eqx.nn.MLP`, `GraphConvNet` or `ConvNet`.
        - `log_scale`, `require_symmetry`: as for the class.

        **Returns:** a `RescalingGauge` that acts on `model` (`check_model` has passed).

        **Raises:** as `check_model`.
        """
        kind = chain_kind(model, cls.__name__)
        hidden = _hidden_widths(model, kind)
        if not hidden:
            raise ValueError(_no_hidden(model))
        gauge = cls(hidden, log_scale, require_symmetry=require_symmetry)
        gauge.check_model(model)
        return gauge

    # ------------------------------------------------------------ the group

    def sample(self, key: PRNGKeyArray) -> RescalingElement:
        """A random element: `exp(log_scale * z)` per hidden unit, `z ~ N(0, 1)`."""
        keys = jax.random.split(key, len(self.widths))
        return tuple(
            jnp.exp(self.log_scale * jax.random.normal(k, (w,)))
            for k, w in zip(keys, self.widths, strict=True)
        )

    def identity(self) -> RescalingElement:
        """All factors 1."""
        return tuple(jnp.ones((w,)) for w in self.widths)

    def inverse(self, g: RescalingElement) -> RescalingElement:
        """The reciprocal factors."""
        return tuple(1.0 / a for a in g)

    def compose(self, g1: RescalingElement, g2: RescalingElement) -> RescalingElement:
        """`g1` then `g2`: the products of the factors (the group is abelian)."""
        return tuple(a * b for a, b in zip(g1, g2, strict=True))

    def control(self) -> "RescalingGauge":
        """The same family with `compensate=False`: the incoming weights and biases are scaled
        but the outgoing weights are not divided, which changes the function (the negative
        control). `require_symmetry` is unchanged."""
        return RescalingGauge(
            self.widths, self.log_scale, require_symmetry=self.require_symmetry, compensate=False
        )

    # ------------------------------------------------------------ the action

    def _validate(self, model: Any) -> tuple[str, tuple[str, Array] | None]:
        """`check_model`, returning the model's kind and, where the activation holds traced
        arrays (a learnable activation under a transformation), the traced homogeneity defect
        that `act` turns into a runtime error."""
        kind = chain_kind(model, self)
        hidden = _hidden_widths(model, kind)
        if not hidden:
            raise ValueError(_no_hidden(model))
        if hidden != self.widths:
            raise ValueError(
                f"RescalingGauge `widths` {self.widths} do not match the hidden widths {hidden} "
                f"of the {type(model).__name__}; use RescalingGauge.from_model(model)."
            )
        if not self.require_symmetry:
            return kind, None
        if kind == "conv" and model.norm is not None:
            raise ValueError(
                f"a ConvNet with norm={model.norm!r} has no rescaling symmetry: the "
                "normalisation removes each channel's scale (App. C). Pass "
                "require_symmetry=False to measure how badly it breaks."
            )
        found = _activation_defect(model, kind)
        if found is None:
            return kind, None
        name, defect = found
        if is_traced(defect):  # a learnable activation's traced arrays: checked in `act`
            return kind, (name, defect)
        check_value(None, defect, _not_homogeneous(name))
        return kind, None

    def check_model(self, model: Any) -> None:
        """Raise unless this family acts on `model` as a symmetry; nothing is traced.

        **Arguments:**

        - `model`: the model.

        **Raises:**

        - `TypeError` unless `model` is a `FeedforwardNet`, `eqx.nn.MLP`, `GraphConvNet` or
          `ConvNet`.
        - `ValueError` when the model has no hidden layer or its hidden widths differ from
          `widths`; with `require_symmetry`, also when the activation between the layers fails
          the numerical test of positive homogeneity (`phi(a x) == a phi(x)` up to rounding
          on 64 points of [-3, 3] and a in {0.3, 2.5, 7}) or a ConvNet normalises its
          channels. A learnable activation whose arrays are traced (e.g. under `jit`) is
          tested when `act` runs instead, as a runtime error.
        """
        self._validate(model)

    def act(self, g: RescalingElement, model: Any) -> Any:
        """The rescaled model: `W_l -> diag(alpha_l) W_l`, `b_l -> alpha_l b_l` and (with
        `compensate`) `W_{l+1} -> W_{l+1} diag(alpha_l)^-1` for every hidden layer l.

        **Arguments:**

        - `g`: one vector of factors per hidden layer, `g[l]` of shape `(widths[l],)`,
          all > 0 (cast to the dtype of the weights they multiply).
        - `model`: a model `check_model` accepts.

        **Returns:** the model with rescaled weights and biases (None biases stay None).

        **Raises:** as `check_model`; `ValueError` for the wrong number or shapes of factor
        vectors, or a factor <= 0 seen eagerly; under `jit`/`vmap` a non-positive or
        non-finite factor raises at run time (`eqx.error_if`).
        """
        kind, traced_defect = self._validate(model)
        if len(g) != len(self.widths):
            raise ValueError(
                f"`g` must hold {len(self.widths)} factor vectors (one per hidden layer); "
                f"received {len(g)}."
            )
        for n, (a, w) in enumerate(zip(g, self.widths, strict=True)):
            if jnp.shape(a) != (w,):
                raise ValueError(f"`g[{n}]` must have shape ({w},); received {jnp.shape(a)}.")
        g = tuple(
            check_value(
                a,
                lambda a=a: ~((a > 0) & jnp.isfinite(a)),
                f"rescaling factors must be > 0 (and finite); `g[{n}]` has a value <= 0 or not "
                "finite.",
            )
            for n, a in enumerate(g)
        )
        if traced_defect is not None:
            name, defect = traced_defect
            g = check_value(g, defect, _not_homogeneous(name))
        weights, biases = chain_view(model, kind)
        for n, a in enumerate(g):
            weights[n] = weights[n] * _rows(a, weights[n])
            if biases[n] is not None:
                biases[n] = biases[n] * _rows(a, biases[n])
            if self.compensate:
                weights[n + 1] = weights[n + 1] / _cols(a, weights[n + 1])
        return _rebuild(model, kind, weights, biases)

    def parameter_scale(self, g: RescalingElement, model: Any) -> Any:
        """The factor `act(g, model)` multiplies each parameter by: `alpha_l` on the rows of
        `W_l` and on `b_l`, `1 / alpha_l` on the columns of `W_{l+1}` (with `compensate`), 1
        on every other inexact array. `act` is linear and diagonal in the parameters, so the
        factors are its derivative along all-ones: `act(g, model) = s * model`, up to rounding.

        **Arguments:** as `act`.

        **Returns:** a PyTree shaped like `eqx.filter(model, eqx.is_inexact_array)`.

        **Raises:** `ValueError` for the control (`compensate=False`): it changes the
        function, so there are no new coordinates of the same loss to carry statistics to; as
        `act`.
        """
        if not self.compensate:
            raise ValueError(
                "`gauge` must keep the function: the control of RescalingGauge "
                "(compensate=False) changes it, so there are no new coordinates of the same "
                "loss to carry moments to."
            )
        params, static = eqx.partition(model, eqx.is_inexact_array)
        move = lambda p: eqx.filter(self.act(g, eqx.combine(p, static)), eqx.is_inexact_array)  # noqa: E731
        return jax.jvp(move, (params,), (jax.tree.map(jnp.ones_like, params),))[1]

    def canonical_element(self, model: Any) -> RescalingElement:
        """The element taking `model` to its balanced point, the minimum-norm point of its
        orbit (the engine of `gj.balance`, iterated to `100 eps` of the dtype, at most 10^4
        sweeps): every rescaled copy of `model` balances to the same model, since the norm is
        strictly convex in `log alpha` wherever every unit has nonzero incoming and outgoing
        weights. A unit whose incoming weights and bias, or outgoing weights, are all zero
        keeps factor 1 (no minimum on its orbit): that direction stays unfixed.

        **Returns:** one positive factor vector per hidden layer.

        **Raises:** as `check_model`; `ValueError` for the control (`compensate=False` has no
        orbit).
        """
        if not self.compensate:
            raise ValueError(
                "the control of RescalingGauge (compensate=False) changes the function: it has "
                "no orbit and no canonical form."
            )
        kind, _ = self._validate(model)
        weights, biases = chain_view(model, kind)
        squares, bias_squares = chain_squares(weights, biases)
        tol = 100 * float(jnp.finfo(squares[0].dtype).eps)
        _, s, _ = balance_factors(squares, bias_squares, tol, 10_000)
        return tuple(jnp.sqrt(x) for x in s)


def _no_hidden(model: Any) -> str:
    return (
        f"the {type(model).__name__} has no hidden layer (a single affine map): there is "
        "nothing to rescale."
    )


def rescaling_conserved_quantity(model: Any) -> tuple[Float[Array, " _width"], ...]:
    """The Noether charge of the rescaling symmetry, per hidden unit (or channel) j of every
    hidden layer l: `|W_l[j]|^2 + b_l[j]^2 - |W_{l+1}[:, j]|^2` (incoming weights and bias
    minus outgoing weights; the bias term is 0 without a bias). For a ConvNet the incoming
    weights are channel j's filter over all input channels and kernel positions and the
    outgoing ones the next conv layer's weights from channel j (the readout columns of channel
    j for the last conv layer).

    Conserved by the gradient flow of any loss of a model with the symmetry (the loss is
    invariant, so its gradient is orthogonal to the orbit, `sum_j` of these tangents);
    drifts at O(learning rate) under gradient descent and decays under weight decay.

    **Arguments:**

    - `model`: a `FeedforwardNet`, `eqx.nn.MLP`, `GraphConvNet` or `ConvNet`.

    **Returns:** one array of shape `(width,)` per hidden layer. For a `FeedforwardNet`,
    `jnp.stack` of it is the `(N-1, d)` array of the earlier `orbits` function.

    **Raises:** `TypeError` for another model.
    """
    kind = chain_kind(model, "rescaling_conserved_quantity")
    _hidden_widths(model, kind)  # validates a ConvNet's readout
    weights, biases = chain_view(model, kind)
    return tuple(incoming - outgoing for incoming, outgoing in unit_norms(weights, biases))
