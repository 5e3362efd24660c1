"""Specs: a user's own attention or transformer block, read as a gaugejax one.

A researcher's block is an equinox Module (or any PyTree of parameters) with its own names and
layouts. A spec says which parameter plays which role (query, key, value, output, their
biases; the norm gains; the MLP's gate, up and down projections), how its weights are laid out
and how its attention is computed (heads, key-value heads, RoPE pairing, causal mask). With it,
`extract` reads the user's parameters into a `BlockAttention` or `TransformerBlock` and `write`
puts a transformed one back, so every family acting on those (`gj.SpecGauge`) acts on the
user's block. Everything is checked before anything runs: every path resolves to an array,
shapes agree with the declared sizes, the RoPE pairing is a known one with an even head size;
`SpecGauge.from_model(..., probe=x)` also checks that the read block computes what the user's
block computes.

Paths are attribute and index chains from the model: `"attn.wq.weight"`, `"layers[0].weight"`.
Layouts: `"in_out"` for `x @ W` (`W` of shape `(d, heads * head_dim)`, flax's and jax's
convention), `"out_in"` for `W @ x` (`eqx.nn.Linear` and torch: `(heads * head_dim, d)`).
"""

import re
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .transformer import MLP_KINDS, NORMS, ROPE_PAIRINGS, BlockAttention, BlockMLP, TransformerBlock


LAYOUTS = ("in_out", "out_in")
_STEP = re.compile(r"\.?([A-Za-z_]\w*)|\[(\d+)\]")


def _steps(path: str) -> list[str | int]:
    if not isinstance(path, str) or not path:
        raise ValueError(f"a spec path must be a non-empty string; received {path!r}.")
    steps, pos = [], 0
    for m in _STEP.finditer(path):
        if m.start() != pos:
            break
        steps.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if pos != len(path):
        raise ValueError(
            f"spec path {path!r} must be attribute and index steps like 'attn.wq.weight' or "
            f"'layers[0].weight'."
        )
    return steps


def _get(model: Any, path: str, role: str) -> Array:
    node = model
    for step in _steps(path):
        try:
            node = node[step] if isinstance(step, int) else getattr(node, step)
        except (AttributeError, IndexError, KeyError, TypeError):
            raise ValueError(
                f"the spec's `{role}` = {path!r} does not resolve in the model "
                f"({type(model).__name__}): no {step!r}."
            ) from None
    if not eqx.is_inexact_array(node):
        raise ValueError(
            f"the spec's `{role}` = {path!r} must name a floating array; received "
            f"{type(node).__name__}."
        )
    return node


def _where(path: str):
    steps = _steps(path)

    def where(model):
        node = model
        for step in steps:
            node = node[step] if isinstance(step, int) else getattr(node, step)
        return node

    return where


def _check_shape(role: str, path: str, array: Array, expected: tuple[int, ...]) -> None:
    if tuple(array.shape) != expected:
        raise ValueError(
            f"the spec's `{role}` = {path!r} must have shape {expected}; received "
            f"{tuple(array.shape)}."
        )


class AttentionSpec(eqx.Module):
    """Where a user's attention keeps its parameters, and how it attends.

    **Arguments:**

    - `query`, `key`, `value`, `output`: paths of the four projection weights (module
      docstring); `query_bias`, `key_bias`, `value_bias`, `output_bias`: paths or None.
    - `num_heads` H; `num_kv_heads` G (default H: grouped-query attention when smaller).
    - `layout`: `"in_out"` or `"out_in"` (module docstring), the same for all four weights.
    - `rope`: None, `"half"` (`rotate_half`: entry i pairs with i + k/2, LLaMA) or
      `"interleaved"` (2i with 2i + 1); `rope_base` (default 10000).
    - `causal`: a causal mask (default False). Scores are scaled by `1/sqrt(head_dim)`.

    **Raises:** `ValueError` for an unknown layout or RoPE pairing, or sizes that are not
    positive ints with G dividing H.
    """

    query: str
    key: str
    value: str
    output: str
    num_heads: int
    num_kv_heads: int | None = None
    query_bias: str | None = None
    key_bias: str | None = None
    value_bias: str | None = None
    output_bias: str | None = None
    layout: str = "in_out"
    rope: str | None = None
    rope_base: float = 10000.0
    causal: bool = False

    def __check_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"`layout` must be one of {LAYOUTS}; received {self.layout!r}.")
        if self.rope not in ROPE_PAIRINGS:
            raise ValueError(f"`rope` must be one of {ROPE_PAIRINGS}; received {self.rope!r}.")
        G = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        for name, value in (("num_heads", self.num_heads), ("num_kv_heads", G)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int; received {value!r}.")
        if self.num_heads % G:
            raise ValueError(
                f"`num_heads` ({self.num_heads}) must be a multiple of `num_kv_heads` ({G})."
            )
        for path in self._paths().values():
            _steps(path)

    def _paths(self) -> dict[str, str]:
        names = ("query", "key", "value", "output", "query_bias", "key_bias", "value_bias",
                 "output_bias")  # fmt: skip
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def _matrix(self, model, role: str) -> Array:
        W = _get(model, getattr(self, role), role)
        if W.ndim != 2:
            raise ValueError(
                f"the spec's `{role}` = {getattr(self, role)!r} must be a matrix; received "
                f"shape {tuple(W.shape)}."
            )
        return W if self.layout == "in_out" else W.T  # (in, out) either way

    def sizes(self, model: Any) -> tuple[int, int, int, int, int]:
        """`(d, H, G, head_dim, value_dim)` read from the model's weights, checked.

        **Raises:** `ValueError` naming the first parameter whose path does not resolve or
        whose shape disagrees with the others or with the declared head counts.
        """
        H = self.num_heads
        G = H if self.num_kv_heads is None else self.num_kv_heads
        Wq = self._matrix(model, "query")
        d, hk = Wq.shape
        if hk % H:
            raise ValueError(
                f"the spec's `query` = {self.query!r} has {hk} output features, not a multiple "
                f"of num_heads = {H}."
            )
        k = hk // H
        Wv = self._matrix(model, "value")
        if Wv.shape[1] % G:
            raise ValueError(
                f"the spec's `value` = {self.value!r} has {Wv.shape[1]} output features, not a "
                f"multiple of num_kv_heads = {G}."
            )
        v = Wv.shape[1] // G
        expected = {"key": (d, G * k), "value": (d, G * v), "output": (H * v, d)}
        for role, shape in expected.items():
            W = self._matrix(model, role)
            _check_shape(role, getattr(self, role), W if self.layout == "in_out" else W.T,
                         shape if self.layout == "in_out" else shape[::-1])  # fmt: skip
        biases = {"query_bias": H * k, "key_bias": G * k, "value_bias": G * v, "output_bias": d}
        for role, size in biases.items():
            if getattr(self, role) is not None:
                _check_shape(role, getattr(self, role), _get(model, getattr(self, role), role),
                             (size,))  # fmt: skip
        if self.rope is not None and k % 2:
            raise ValueError(
                f"`rope={self.rope!r}` rotates pairs of query/key entries: the head size must "
                f"be even; the spec's `query` = {self.query!r} gives head_dim {k}."
            )
        return d, H, G, k, v

    def extract(self, model: Any) -> BlockAttention:
        """The user's attention as a `BlockAttention` (the same parameters, reshaped)."""
        d, H, G, k, v = self.sizes(model)

        def heads(role, n, size):  # (d, n * size) -> (n, d, size)
            return self._matrix(model, role).reshape(d, n, size).transpose(1, 0, 2)

        def bias(role, shape):
            path = getattr(self, role)
            return None if path is None else _get(model, path, role).reshape(shape)

        dtype = _get(model, self.query, "query").dtype
        template = BlockAttention(d, H, k, key=jax.random.key(0), num_kv_heads=G, value_dim=v,
                                  rope=self.rope, rope_base=self.rope_base, causal=self.causal,
                                  dtype=dtype)  # fmt: skip
        Wo = self._matrix(model, "output").reshape(H, v, d)
        return eqx.tree_at(
            lambda a: (a.Wq, a.Wk, a.Wv, a.Wo, a.bq, a.bk, a.bv, a.bo),
            template,
            (heads("query", H, k), heads("key", G, k), heads("value", G, v), Wo,
             bias("query_bias", (H, k)), bias("key_bias", (G, k)), bias("value_bias", (G, v)),
             bias("output_bias", (d,))),
            is_leaf=lambda x: x is None,
        )  # fmt: skip

    def write(self, model: Any, attention: BlockAttention) -> Any:
        """`model` with the parameters of `attention` put back in the user's layout."""
        H, d, k = attention.Wq.shape
        G, _, v = attention.Wv.shape

        def flat(W):  # (n, d, size) -> the user's layout of (d, n * size)
            W = W.transpose(1, 0, 2).reshape(d, -1)
            return W if self.layout == "in_out" else W.T

        Wo = attention.Wo.reshape(H * v, d)
        values = {
            "query": flat(attention.Wq),
            "key": flat(attention.Wk),
            "value": flat(attention.Wv),
            "output": Wo if self.layout == "in_out" else Wo.T,
            "query_bias": None if attention.bq is None else attention.bq.reshape(-1),
            "key_bias": None if attention.bk is None else attention.bk.reshape(-1),
            "value_bias": None if attention.bv is None else attention.bv.reshape(-1),
            "output_bias": attention.bo,
        }
        return _put(model, {self._paths()[r]: values[r] for r in self._paths()})


def _put(model: Any, values: dict[str, Array]) -> Any:
    paths = list(values)
    return eqx.tree_at(lambda m: [_where(p)(m) for p in paths], model, [values[p] for p in paths])


class BlockSpec(eqx.Module):
    """Where a user's pre-norm transformer block (`x + attn(norm1(x))`, then `+ mlp(norm2(x))`)
    keeps its parameters.

    **Arguments:**

    - `attention`: an `AttentionSpec` (paths from the block).
    - `norm`: `"rms"` or `"layer"`; `norm1_gain`, `norm2_gain`: paths of the gains (None: no
      gain); `eps` (default 1e-5) of both norms.
    - `mlp`: `"swiglu"` (`(silu(x W_gate) * (x W_up)) W_down`), `"gelu"` or `"gelu_tanh"`
      (`gelu(x W_up + b_up) W_down + b_down`); `mlp_gate`, `mlp_up`, `mlp_down` (paths, in
      `attention.layout`), `mlp_up_bias`, `mlp_down_bias` (GELU MLPs).

    **Raises:** `ValueError` for an unknown norm or MLP kind, a SwiGLU MLP without a gate or a
    GELU one with one, or a GELU MLP without its biases.
    """

    attention: AttentionSpec
    mlp_up: str
    mlp_down: str
    mlp_gate: str | None = None
    mlp_up_bias: str | None = None
    mlp_down_bias: str | None = None
    mlp: str = "swiglu"
    norm: str = "rms"
    norm1_gain: str | None = None
    norm2_gain: str | None = None
    eps: float = 1e-5

    def __check_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"`norm` must be one of {NORMS}; received {self.norm!r}.")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"`mlp` must be one of {MLP_KINDS}; received {self.mlp!r}.")
        gated = self.mlp == "swiglu"
        if gated != (self.mlp_gate is not None):
            raise ValueError(
                f"`mlp_gate` is the SwiGLU gate: needed for mlp='swiglu', refused otherwise; "
                f"received mlp={self.mlp!r}, mlp_gate={self.mlp_gate!r}."
            )
        if not gated and None in (self.mlp_up_bias, self.mlp_down_bias):
            raise ValueError(
                f"a GELU MLP has both biases (`mlp_up_bias`, `mlp_down_bias`); received "
                f"{self.mlp_up_bias!r}, {self.mlp_down_bias!r}."
            )

    def _mlp_paths(self) -> dict[str, str]:
        names = ("mlp_gate", "mlp_up", "mlp_down", "mlp_up_bias", "mlp_down_bias",
                 "norm1_gain", "norm2_gain")  # fmt: skip
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def _matrix(self, model, role: str) -> Array:
        W = _get(model, getattr(self, role), role)
        return W if self.attention.layout == "in_out" else W.T

    def extract(self, model: Any) -> TransformerBlock:
        """The user's block as a `TransformerBlock`.

        **Raises:** `ValueError` naming the first parameter that does not resolve or whose
        shape disagrees with the attention's model size.
        """
        attn = self.attention.extract(model)
        H, d, k = attn.Wq.shape
        up = self._matrix(model, "mlp_up")
        if up.ndim != 2 or up.shape[0] != d:
            raise ValueError(
                f"the spec's `mlp_up` = {self.mlp_up!r} must map the model size {d} (in the "
                f"{self.attention.layout!r} layout); received shape {tuple(up.shape)}."
            )
        f = up.shape[1]
        _check_shape("mlp_down", self.mlp_down, self._matrix(model, "mlp_down"), (f, d))
        if self.mlp_gate is not None:
            _check_shape("mlp_gate", self.mlp_gate, self._matrix(model, "mlp_gate"), (d, f))
        for role, size in (("mlp_up_bias", f), ("mlp_down_bias", d), ("norm1_gain", d),
                           ("norm2_gain", d)):  # fmt: skip
            if getattr(self, role) is not None:
                _check_shape(role, getattr(self, role), _get(model, getattr(self, role), role),
                             (size,))  # fmt: skip
        template = TransformerBlock(
            d, H, k, f, key=jax.random.key(0), norm=self.norm, mlp=self.mlp, dtype=attn.Wq.dtype,
            norm_gain=self.norm1_gain is not None, num_kv_heads=attn.num_kv_heads,
            value_dim=attn.Wv.shape[2], rope=attn.rope, rope_base=attn.rope_base,
            causal=attn.causal,
        )  # fmt: skip
        if (self.norm1_gain is None) != (self.norm2_gain is None):
            raise ValueError(
                "`norm1_gain` and `norm2_gain` must both be paths or both None; received "
                f"{self.norm1_gain!r}, {self.norm2_gain!r}."
            )
        make = eqx.nn.RMSNorm if self.norm == "rms" else eqx.nn.LayerNorm

        def norm(role):
            n = make(d, eps=self.eps, use_weight=getattr(self, role) is not None, use_bias=False,
                     dtype=attn.Wq.dtype)  # fmt: skip
            path = getattr(self, role)
            return (
                n if path is None else eqx.tree_at(lambda x: x.weight, n, _get(model, path, role))
            )

        if self.mlp == "swiglu":
            W1, W3, b1, b2 = self._matrix(model, "mlp_gate"), up, None, None
        else:
            W1, W3 = up, None
            b1 = _get(model, self.mlp_up_bias, "mlp_up_bias")
            b2 = _get(model, self.mlp_down_bias, "mlp_down_bias")
        mlp = eqx.tree_at(
            lambda m: (m.W1, m.W2, m.W3, m.b1, m.b2),
            BlockMLP(d, f, self.mlp, key=jax.random.key(0), dtype=attn.Wq.dtype),
            (W1, self._matrix(model, "mlp_down"), W3, b1, b2),
            is_leaf=lambda x: x is None,
        )
        return eqx.tree_at(
            lambda b: (b.norm1, b.attn, b.norm2, b.mlp),
            template,
            (norm("norm1_gain"), attn, norm("norm2_gain"), mlp),
        )

    def write(self, model: Any, block: TransformerBlock) -> Any:
        """`model` with the parameters of `block` put back in the user's layout."""
        model = self.attention.write(model, block.attn)

        def laid(W):
            return W if self.attention.layout == "in_out" else W.T

        mlp = block.mlp
        values = {
            "mlp_gate": None if mlp.W3 is None else laid(mlp.W1),
            "mlp_up": laid(mlp.W1 if mlp.W3 is None else mlp.W3),
            "mlp_down": laid(mlp.W2),
            "mlp_up_bias": mlp.b1,
            "mlp_down_bias": mlp.b2,
            "norm1_gain": block.norm1.weight,
            "norm2_gain": block.norm2.weight,
        }
        paths = self._mlp_paths()
        return _put(model, {paths[r]: values[r] for r in paths})


def spec_deviation(model: Any, spec: AttentionSpec | BlockSpec, probe: Any) -> float:
    """`max |extract(model)(probe) - model(probe)| / max |model(probe)|`: whether the spec reads
    the user's block as it computes (a wrong RoPE pairing, layout or head count shows here).

    **Arguments:** `model`, `spec`, `probe`: one input sequence `(n, d)`.
    """
    ours = np.asarray(spec.extract(model)(jnp.asarray(probe)))
    theirs = np.asarray(model(jnp.asarray(probe)))
    if ours.shape != theirs.shape:
        raise ValueError(
            f"the block read through the spec returns shape {ours.shape}; the model returns "
            f"{theirs.shape} for the probe."
        )
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), np.finfo(float).tiny))
