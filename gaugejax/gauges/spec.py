"""Families on a user's own block, and on one transformer block alone.

- `TransformerBlockGauge`: the gauges of one RMSNorm `TransformerBlock` on its own: its
  attention's family (`BlockAttentionGauge`), SwiGLU's per-unit scales and the norm gains traded
  against the reads they feed. It is `DecoderGauge`'s per-block part, acting through a one-block
  decoder with identity read-in and read-out and a gain-free final norm; the residual rotation
  stays the identity (it moves a block's input and output, so it is a symmetry of a whole
  decoder only). A LayerNorm block is refused: its exact form (`fuse_layernorm`) centres the
  block's writes, which changes a block read on its own.
- `SpecGauge(spec, family)`: any family acting on the `BlockAttention` or `TransformerBlock`
  that an `AttentionSpec` or `BlockSpec` reads from a user's block, acting on the user's block
  (read, transformed, written back in the user's names and layout).
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray, PyTree

from ..models.spec import AttentionSpec, BlockSpec, spec_deviation
from ..models.transformer import Decoder, TransformerBlock
from .base import AbstractGauge, AbstractParameterGauge, model_error
from .block_attention import BlockAttentionGauge
from .decoder import DecoderElement, DecoderGauge


def _container(block: TransformerBlock) -> Decoder:
    """A one-block decoder around `block`: identity read-in and read-out, gain-free final norm."""
    H, d, k = block.attn.Wq.shape
    mlp = block.mlp
    decoder = Decoder(d, d, d, 1, H, k, mlp.W1.shape[1], key=jax.random.key(0), mlp=mlp.kind,
                      dtype=block.attn.Wq.dtype, num_kv_heads=block.attn.num_kv_heads,
                      value_dim=block.attn.Wv.shape[2], rope=block.attn.rope)  # fmt: skip
    eye = jnp.eye(d, dtype=block.attn.Wq.dtype)
    norm = eqx.nn.RMSNorm(d, use_weight=False, dtype=block.attn.Wq.dtype)
    return eqx.tree_at(
        lambda m: (m.W_in, m.W_out, m.blocks, m.norm), decoder, (eye, eye, (block,), norm)
    )


class TransformerBlockGauge(AbstractParameterGauge):
    """The gauges of one RMSNorm `TransformerBlock` (module docstring). Build it with
    `TransformerBlockGauge.from_model(block)`; its elements are `DecoderElement`s whose
    rotation is the identity.

    **Fields:** `decoder`: the `DecoderGauge` of the one-block container.
    """

    decoder: DecoderGauge
    infinitesimal = False

    @classmethod
    def from_model(cls, block: TransformerBlock, **kwargs: Any) -> "TransformerBlockGauge":
        """The family with `block`'s sizes and its attention family.

        **Raises:** as `check_model`.
        """
        cls._check_block(block)
        return cls(DecoderGauge.from_model(_container(block), **kwargs))

    @staticmethod
    def _check_block(block: Any) -> None:
        if not isinstance(block, TransformerBlock):
            raise model_error("TransformerBlockGauge", "a TransformerBlock", block)
        if not isinstance(block.norm1, eqx.nn.RMSNorm):
            raise ValueError(
                "TransformerBlockGauge acts on an RMSNorm block; received a LayerNorm block (its "
                "exact form centres the block's writes: use DecoderGauge on the whole decoder)."
            )

    def check_model(self, model: Any) -> None:
        self._check_block(model)
        self.decoder.check_model(_container(model))

    def _element(self, g: DecoderElement) -> DecoderElement:
        eye = jnp.eye(self.decoder.dim, dtype=g.rotation.dtype)
        return eqx.tree_at(lambda e: e.rotation, g, eye)

    def identity(self) -> DecoderElement:
        return self.decoder.identity()

    def sample(self, key: PRNGKeyArray) -> DecoderElement:
        return self._element(self.decoder.sample(key))

    def inverse(self, g: DecoderElement) -> DecoderElement:
        return self._element(self.decoder.inverse(g))

    def compose(self, g1: DecoderElement, g2: DecoderElement) -> DecoderElement:
        return self._element(self.decoder.compose(g1, g2))

    def control(self) -> "TransformerBlockGauge":
        """The attention families' controls (the residual map, `DecoderGauge`'s control, is
        fixed here)."""
        attention = tuple(a.control() for a in self.decoder.attention)
        return TransformerBlockGauge(dataclasses.replace(self.decoder, attention=attention))

    def act(self, g: DecoderElement, model: TransformerBlock) -> TransformerBlock:
        self.check_model(model)
        moved = self.decoder.act(self._element(g), _container(model))
        return moved.blocks[0]


# the full family of what each spec reads, when `SpecGauge.from_model` is given none
_FAMILIES = {AttentionSpec: BlockAttentionGauge, BlockSpec: TransformerBlockGauge}


class SpecGauge(AbstractParameterGauge):
    """A family acting on a user's own block through a spec (module docstring). Build it with
    `SpecGauge.from_model(model, spec)`.

    **Fields:** `spec` (an `AttentionSpec` or `BlockSpec`), `family` (acting on what the spec
    reads: a `BlockAttention` or a `TransformerBlock`).
    """

    spec: AttentionSpec | BlockSpec
    family: AbstractGauge

    @property
    def infinitesimal(self) -> bool:  # the family's, whatever it is
        return self.family.infinitesimal

    @property
    def rescales_parameters(self) -> bool:
        return self.family.rescales_parameters

    @classmethod
    def from_model(
        cls,
        model: Any,
        spec: AttentionSpec | BlockSpec,
        family: AbstractGauge | None = None,
        *,
        probe: Any = None,
        rtol: float = 1e-10,
    ) -> "SpecGauge":
        """The family on `model` read through `spec`.

        **Arguments:**

        - `model`: the user's block; `spec`: an `AttentionSpec` (the model is an attention)
          or a `BlockSpec` (a pre-norm transformer block).
        - `family`: a family acting on what the spec reads (default: its full continuous
          group, `BlockAttentionGauge` or `TransformerBlockGauge`, from the model's sizes).
        - `probe`: one input `(n, d)`: when given, the block read through the spec must
          compute the user's output on it to `rtol` (relative; float32 models need ~1e-5).

        **Raises:** `ValueError` naming the first spec path that does not resolve or has the
        wrong shape, a wrong RoPE pairing and the like (before anything runs), or, with a
        `probe`, a read block that computes something else (with its deviation);
        `TypeError` for a spec of another type.
        """
        if type(spec) not in _FAMILIES:
            raise TypeError(
                f"`spec` must be a gj.AttentionSpec or gj.BlockSpec; received "
                f"{type(spec).__name__}."
            )
        read = spec.extract(model)
        if probe is not None:
            deviation = spec_deviation(model, spec, probe)
            if not deviation <= rtol:
                raise ValueError(
                    f"the spec does not describe the model: on the probe, the block it reads "
                    f"computes {deviation:.2e} (relative) away from the model's output (expected "
                    f"<= {rtol:g}); check `layout`, `rope` (its pairing), the head counts, "
                    "`causal` and the norm."
                )
        if family is None:
            family = _FAMILIES[type(spec)].from_model(read)
        family.check_model(read)
        return cls(spec, family)

    def check_model(self, model: Any) -> None:
        """**Raises:** `TypeError` for a model the spec does not read (saying why), or whose
        read block the family does not act on."""
        try:
            read = self.spec.extract(model)
        except ValueError as e:
            raise model_error(self, f"a model its {type(self.spec).__name__} reads", model,
                              f"({e})") from None  # fmt: skip
        self.family.check_model(read)

    def identity(self) -> PyTree:
        return self.family.identity()

    def sample(self, key: PRNGKeyArray) -> PyTree:
        return self.family.sample(key)

    def inverse(self, g: PyTree) -> PyTree:
        return self.family.inverse(g)

    def compose(self, g1: PyTree, g2: PyTree) -> PyTree:
        return self.family.compose(g1, g2)

    def control(self) -> "SpecGauge | None":
        control = self.family.control()
        return None if control is None else SpecGauge(self.spec, control)

    def act(self, g: PyTree, model: Any) -> Any:
        self.check_model(model)
        return self.spec.write(model, self.family.act(g, self.spec.extract(model)))
