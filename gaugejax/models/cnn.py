"""Convolutional and graph-convolutional networks with the rescaling symmetry of App. C."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


NORMS = (None, "instance")


def lp_pool(x: Float[Array, "C H W"], s: float, size: int) -> Float[Array, "C h w"]:
    """L_s pooling (Eq. 51) over non-overlapping `size x size` windows of non-negative inputs:
    `(mean x^s)^(1/s)`; s = 1 is average pooling, s = inf max pooling. Positively homogeneous."""
    window, strides = (1, size, size), (1, size, size)
    if math.isinf(s):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, "VALID")
    total = jax.lax.reduce_window(x**s, 0.0, jax.lax.add, window, strides, "VALID")
    return (total / size**2) ** (1.0 / s)


def instance_norm(x: Float[Array, "C H W"], eps: float = 1e-5) -> Float[Array, "C H W"]:
    """Per-channel standardisation over space: removes each channel's scale."""
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.var(x, axis=(1, 2), keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)


class ConvNet(eqx.Module):
    """`x -> conv -> ReLU -> [L_s pool] -> [norm] -> ... -> flatten -> linear readout` (App. C).

    **Arguments:**

    - `in_channels`, `channels` (per conv layer), `image_size` (square inputs), `out_size`.
    - `kernel_size`: odd, with 'SAME' padding.
    - `pool`: L_s exponent s for a 2x2 pooling after every conv layer (1, 2, `float("inf")`),
      or None for no pooling.
    - `norm`: None or `"instance"` (per-channel normalisation after every conv layer; it breaks
      the rescaling symmetry, App. C).
    - `key`.
    """

    convs: tuple[eqx.nn.Conv2d, ...]
    readout: eqx.nn.Linear
    pool: float | None = eqx.field(static=True)
    norm: str | None = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...],
        image_size: int,
        out_size: int,
        *,
        key: PRNGKeyArray,
        kernel_size: int = 3,
        pool: float | None = 1.0,
        norm: str | None = None,
    ):
        if norm not in NORMS:
            raise ValueError(f"`norm` must be one of {NORMS}; received {norm!r}.")
        if pool is not None and not (math.isinf(pool) or pool >= 1):
            raise ValueError(f"`pool` must be None, >= 1 or inf; received {pool!r}.")
        if kernel_size % 2 != 1:
            raise ValueError(f"`kernel_size` must be odd; received {kernel_size}.")
        keys = jax.random.split(key, len(channels) + 1)
        sizes = (in_channels, *channels)
        self.convs = tuple(
            eqx.nn.Conv2d(a, b, kernel_size, padding="SAME", key=k)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys[:-1], strict=True)
        )
        side = image_size
        if pool is not None:
            side = image_size // 2 ** len(channels)
            if side < 1:
                raise ValueError(
                    f"`image_size` {image_size} is too small for {len(channels)} poolings."
                )
        self.readout = eqx.nn.Linear(channels[-1] * side * side, out_size, key=keys[-1])
        self.pool, self.norm = pool, norm

    def __call__(self, x: Float[Array, "C H W"]) -> Float[Array, " out"]:
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
            if self.pool is not None:
                x = lp_pool(x, self.pool, 2)
            if self.norm == "instance":
                x = instance_norm(x)
        return self.readout(jnp.ravel(x))


class GraphConvNet(eqx.Module):
    """Graph convolutions `H_{l+1} = phi(A_hat H_l W_l^T + b_l)` with a fixed normalised
    adjacency `A_hat = D^-1/2 (A + 1) D^-1/2`, ReLU between layers, none after the last.

    **Arguments:** `adjacency` (n, n) symmetric 0/1; `sizes` (in, hidden..., out); `key`.
    """

    layers: tuple[eqx.nn.Linear, ...]
    a_hat: Float[Array, "n n"]

    def __init__(
        self, adjacency: Float[Array, "n n"], sizes: tuple[int, ...], *, key: PRNGKeyArray
    ):
        adjacency = jnp.asarray(adjacency)
        if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
            raise ValueError(f"`adjacency` must be square (n, n); received {adjacency.shape}.")
        a = adjacency + jnp.eye(adjacency.shape[0], dtype=adjacency.dtype)
        d = 1.0 / jnp.sqrt(a.sum(axis=1))
        self.a_hat = d[:, None] * a * d[None, :]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            eqx.nn.Linear(i, o, key=k) for i, o, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        )

    @property
    def activation(self):
        return jax.nn.relu

    def __call__(self, h: Float[Array, "n f"]) -> Float[Array, "n out"]:
        for i, layer in enumerate(self.layers):
            h = self.a_hat @ (h @ layer.weight.T) + layer.bias
            if i < len(self.layers) - 1:
                h = jax.nn.relu(h)
        return h
