"""Hugging Face's GPT-2 and LLaMA parameters in, and back out: `from_huggingface` builds a token
`Decoder` from a state dict (or a `.safetensors` file) and its config, `to_huggingface` writes
a `Decoder` back in the same naming, exactly.

Names are those of `GPT2LMHeadModel.state_dict()` and `LlamaForCausalLM.state_dict()`: the
body's under `transformer.` (GPT-2) or `model.` (LLaMA), the read-out `lm_head.weight`.
`from_huggingface` also takes the body's names without the prefix (as GPT-2's published
`.safetensors` file has them) and skips the buffers old checkpoints carry (GPT-2's causal
masks `h.{i}.attn.bias` / `attn.masked_bias`, LLaMA's `rotary_emb.inv_freq`);
`to_huggingface` always writes the prefixed names, which `load_state_dict` takes as they are.

The two layouts as a `Decoder` (`W_in` the token embedding, read by token ids):

- GPT-2: learned `positions` (`wpe`); LayerNorms with gain and bias; fused query-key-value
  `Conv1D` `c_attn` (d, 3d) split per head into `Wq`, `Wk`, `Wv` with all four attention
  biases; the `"gelu_tanh"` MLP (`gelu_new`; `activation_function="gelu"` gives the exact
  GELU); tied read-out `W_out = wte^T` (a copy: the two are separate leaves).
- LLaMA: RoPE with `rope="half"` (`rotate_half`'s pairs (j, j + k/2)), grouped-query heads,
  RMSNorms with gains, the SwiGLU MLP (`gate_proj` -> `W1`, `up_proj` -> `W3`, `down_proj` ->
  `W2`), no biases (`attention_bias=True` gives all four attention biases), an untied
  `lm_head` unless `tie_word_embeddings`.

Export after a gauge. A LLaMA-layout decoder moved by `DecoderGauge` (residual rotation, norm
gains, attention maps with RoPE, SwiGLU unit scales) stays in the layout. A GPT-2 decoder is
exported as it is, or in its fused form (`fuse_layernorm`: writes centred, norm biases folded
into the reads, RMSNorms): the stream is then mean-free, where Hugging Face's LayerNorm (gain
g, bias 0) equals the RMSNorm, and the read-out bias the final norm's bias left is written
back as `ln_f.bias` solving `beta W_out = b_out` (exact for a read-out of rank d). A residual
rotation Q keeps the stream mean-free only if it fixes the all-ones direction (`Q 1 = 1`);
after any other the stream has a mean that GPT-2's LayerNorm would subtract, and the export is
refused (no GPT-2 parameters reproduce it). The fused read-out no longer equals the embedding:
`lm_head.weight` is always written, and a model whose `lm_head.weight` differs from
`transformer.wte.weight` loads with `tie_word_embeddings=False`.
"""

import os
import re
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .transformer import Decoder


MODEL_TYPES = ("gpt2", "llama")
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
PREFIX = {"gpt2": "transformer.", "llama": "model."}
# buffers of older checkpoints, not parameters: skipped on import
BUFFERS = {
    "gpt2": re.compile(r"h\.\d+\.attn\.(bias|masked_bias)"),
    "llama": re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
}


def _positive(config: Mapping, name: str, default: Any = None) -> int:
    value = config.get(name)
    value = default if value is None else value  # HF writes None for "the default"
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config[{name!r}] must be a positive int; received {value!r}.")
    return value


def _option(
    config: Mapping, name: str, default: Any, allowed: tuple, why: str, where: str = "config"
) -> Any:
    value = config.get(name, default)
    if value not in allowed:
        raise ValueError(
            f"{where}[{name!r}] = {value!r} is not supported ({why}); expected one of {allowed}."
        )
    return value


def _sizes(config: Mapping) -> dict:
    """The model's sizes and options from an HF config dict, every unsupported option refused."""
    if not isinstance(config, Mapping):
        raise TypeError(f"`config` must be a dict (HF's `config.to_dict()`); received {config!r}.")
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"config['model_type'] must be one of {MODEL_TYPES}; received {kind!r}.")
    if kind == "gpt2":
        d, H = _positive(config, "n_embd"), _positive(config, "n_head")
        if d % H:
            raise ValueError(
                f"config['n_embd'] ({d}) must be divisible by config['n_head'] ({H}): GPT-2's "
                "heads split the width."
            )
        act = _option(config, "activation_function", "gelu_new", tuple(GPT2_ACTIVATIONS), "")
        _option(config, "scale_attn_weights", True, (True,), "scores are scaled by 1/sqrt(k)")
        _option(config, "scale_attn_by_inverse_layer_idx", False, (False,), "no layer scaling")
        _option(config, "add_cross_attention", False, (False,), "a decoder only")
        inner = config.get("n_inner")
        return dict(
            kind=kind,
            dim=d,
            heads=H,
            kv_heads=H,
            head_dim=d // H,
            layers=_positive(config, "n_layer"),
            vocab=_positive(config, "vocab_size"),
            positions=_positive(config, "n_positions"),
            hidden=4 * d if inner is None else _positive(config, "n_inner"),
            eps=float(config.get("layer_norm_epsilon", 1e-5)),
            mlp=GPT2_ACTIVATIONS[act],
            tied=bool(config.get("tie_word_embeddings", True)),
            attention_bias=True,
        )
    d, H = _positive(config, "hidden_size"), _positive(config, "num_attention_heads")
    G = _positive(config, "num_key_value_heads", H)
    if H % G:
        raise ValueError(
            f"config['num_attention_heads'] ({H}) must be a multiple of "
            f"config['num_key_value_heads'] ({G}): each key-value head serves as many query heads."
        )
    if config.get("head_dim") is None and d % H:
        raise ValueError(
            f"config['hidden_size'] ({d}) must be divisible by config['num_attention_heads'] "
            f"({H}) when config has no 'head_dim'."
        )
    k = d // H if config.get("head_dim") is None else _positive(config, "head_dim")
    if k % 2:
        raise ValueError(f"RoPE rotates pairs: the head dimension must be even; received {k}.")
    _option(config, "hidden_act", "silu", ("silu",), "the SwiGLU MLP gates with SiLU")
    _option(config, "mlp_bias", False, (False,), "gaugejax's SwiGLU MLP has no biases")
    _option(config, "rope_scaling", None, (None,), "plain RoPE only")
    rope = config.get("rope_parameters") or {}
    _option(rope, "rope_type", "default", ("default",), "plain RoPE", "config['rope_parameters']")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return dict(
        kind=kind,
        dim=d,
        heads=H,
        kv_heads=G,
        head_dim=k,
        layers=_positive(config, "num_hidden_layers"),
        vocab=_positive(config, "vocab_size"),
        positions=None,
        hidden=_positive(config, "intermediate_size"),
        eps=float(config.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        tied=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)),
        rope_theta=float(theta),
    )


def _expected(s: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's name (prefixed) -> (shape, the shape in the config's words)."""
    d, H, G, k, f, V = s["dim"], s["heads"], s["kv_heads"], s["head_dim"], s["hidden"], s["vocab"]
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    if s["kind"] == "gpt2":
        t = "transformer."
        out[t + "wte.weight"] = (V, d), "(vocab_size, n_embd)"
        out[t + "wpe.weight"] = (s["positions"], d), "(n_positions, n_embd)"
        vec = (d,), "(n_embd,)"
        for i in range(s["layers"]):
            h = f"{t}h.{i}."
            for ln in ("ln_1", "ln_2"):
                out[h + ln + ".weight"] = out[h + ln + ".bias"] = vec
            out[h + "attn.c_attn.weight"] = (d, 3 * d), "(n_embd, 3 * n_embd)"
            out[h + "attn.c_attn.bias"] = (3 * d,), "(3 * n_embd,)"
            out[h + "attn.c_proj.weight"] = (d, d), "(n_embd, n_embd)"
            out[h + "attn.c_proj.bias"] = vec
            out[h + "mlp.c_fc.weight"] = (d, f), "(n_embd, n_inner)"
            out[h + "mlp.c_fc.bias"] = (f,), "(n_inner,)"
            out[h + "mlp.c_proj.weight"] = (f, d), "(n_inner, n_embd)"
            out[h + "mlp.c_proj.bias"] = vec
        out[t + "ln_f.weight"] = out[t + "ln_f.bias"] = vec
        out["lm_head.weight"] = (V, d), "(vocab_size, n_embd)"
        return out
    t = "model."
    out[t + "embed_tokens.weight"] = (V, d), "(vocab_size, hidden_size)"
    vec = (d,), "(hidden_size,)"
    q, kv = "num_attention_heads * head_dim", "num_key_value_heads * head_dim"
    for i in range(s["layers"]):
        h = f"{t}layers.{i}."
        a = h + "self_attn."
        out[a + "q_proj.weight"] = (H * k, d), f"({q}, hidden_size)"
        out[a + "k_proj.weight"] = (G * k, d), f"({kv}, hidden_size)"
        out[a + "v_proj.weight"] = (G * k, d), f"({kv}, hidden_size)"
        out[a + "o_proj.weight"] = (d, H * k), f"(hidden_size, {q})"
        if s["attention_bias"]:
            out[a + "q_proj.bias"] = (H * k,), f"({q},)"
            out[a + "k_proj.bias"] = out[a + "v_proj.bias"] = (G * k,), f"({kv},)"
            out[a + "o_proj.bias"] = vec
        out[h + "mlp.gate_proj.weight"] = (f, d), "(intermediate_size, hidden_size)"
        out[h + "mlp.up_proj.weight"] = (f, d), "(intermediate_size, hidden_size)"
        out[h + "mlp.down_proj.weight"] = (d, f), "(hidden_size, intermediate_size)"
        out[h + "input_layernorm.weight"] = out[h + "post_attention_layernorm.weight"] = vec
    out[t + "norm.weight"] = vec
    out["lm_head.weight"] = (V, d), "(vocab_size, hidden_size)"
    return out


def _read(weights: Any) -> dict[str, np.ndarray]:
    if isinstance(weights, str | os.PathLike):
        from safetensors.numpy import load_file  # only where a file is read

        return load_file(os.fspath(weights))
    if not isinstance(weights, Mapping):
        raise TypeError(
            "`weights` must be a dict of arrays in Hugging Face naming or a path to a "
            f".safetensors file; received {type(weights).__name__}."
        )
    return {name: np.asarray(w) for name, w in weights.items()}


def _checked(weights: Any, s: dict) -> dict[str, np.ndarray]:
    """The prefixed tensors, or one `ValueError` naming every missing, extra, duplicated or
    mis-shaped one."""
    kind, prefix = s["kind"], PREFIX[s["kind"]]
    expected = _expected(s)
    tensors: dict[str, np.ndarray] = {}
    problems = []
    for name, w in _read(weights).items():
        body = name.removeprefix(prefix)
        if BUFFERS[kind].fullmatch(body):
            continue
        full = name if name == "lm_head.weight" or name.startswith(prefix) else prefix + name
        if full in tensors:
            problems.append(f"{name!r} given twice (with and without the prefix {prefix!r})")
        tensors[full] = w
    if s["tied"] and "lm_head.weight" not in tensors:
        expected.pop("lm_head.weight")
    missing = [n for n in expected if n not in tensors]
    extra = [n for n in tensors if n not in expected]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra)}")
    for name, (shape, words) in expected.items():
        if name in tensors and tensors[name].shape != shape:
            problems.append(
                f"{name}: expected shape {shape} {words}, received {tensors[name].shape}"
            )
    dtypes = {w.dtype for w in tensors.values()}
    if len(dtypes) > 1 or not all(np.issubdtype(t, np.floating) for t in dtypes):
        problems.append(
            f"expected one floating dtype for all tensors; received {sorted(map(str, dtypes))}"
        )
    if problems:
        raise ValueError(f"from_huggingface ({kind}): " + "; ".join(problems) + ".")
    if s["tied"]:
        lm = tensors.get("lm_head.weight")
        embed = tensors[prefix + ("wte.weight" if kind == "gpt2" else "embed_tokens.weight")]
        if lm is not None and not np.array_equal(lm, embed):
            raise ValueError(
                "from_huggingface: config['tie_word_embeddings'] is True but lm_head.weight "
                "differs from the token embedding; pass tie_word_embeddings=False to keep both."
            )
        tensors["lm_head.weight"] = embed
    return tensors


def from_huggingface(weights: Any, config: Mapping) -> Decoder:
    """A token `Decoder` (ids `(n,)` -> logits `(n, vocab)`) from Hugging Face GPT-2 or LLaMA
    parameters (module docstring).

    **Arguments:** `weights`: a dict of arrays (numpy, torch's `.numpy()`, jax) in
    `GPT2LMHeadModel` / `LlamaForCausalLM` state-dict naming, the body's prefix
    (`transformer.` / `model.`) optional, `lm_head.weight` optional when the embeddings are
    tied; or a path to a `.safetensors` file (read with `safetensors.numpy`, no torch). The
    dtype is kept (float64 needs `jax_enable_x64`). `config`: the HF config as a dict
    (`config.to_dict()`), with `model_type` `"gpt2"` or `"llama"`.

    **Returns:** a `Decoder` with causal attention whose logits equal Hugging Face's (to
    rounding).

    **Raises:** `TypeError` for a config or weights of the wrong type; `ValueError`, before
    anything is traced, for an unknown `model_type`, sizes the config gets wrong (heads not
    dividing the width, key-value heads not dividing the heads), unsupported options
    (GPT-2: an `activation_function` other than `gelu_new`, `gelu_pytorch_tanh` or `gelu`,
    `scale_attn_weights=False`, `scale_attn_by_inverse_layer_idx`, cross attention; LLaMA: a
    `hidden_act` other than `silu`, `mlp_bias`, `rope_scaling` or a non-default `rope_type`,
    an odd head dimension), or weights with missing, unexpected or mis-shaped tensors (each
    named, with expected and received shapes), mixed or non-floating dtypes, or an
    `lm_head.weight` that differs from the tied embedding.
    """
    s = _sizes(config)
    w = _checked(weights, s)
    d, H, G, k, L = s["dim"], s["heads"], s["kv_heads"], s["head_dim"], s["layers"]
    dtype = w["lm_head.weight"].dtype
    gpt2 = s["kind"] == "gpt2"
    norm = "layer" if gpt2 else "rms"
    attention = dict(num_kv_heads=G, biases=("q", "k", "v", "o") if s["attention_bias"] else ())
    if not gpt2:
        attention.update(rope="half", rope_base=s["rope_theta"])
    # the structure only (no random arrays): every leaf is replaced below
    skeleton = eqx.filter_eval_shape(
        lambda: Decoder(
            s["vocab"],
            s["vocab"],
            d,
            L,
            H,
            k,
            s["hidden"],
            key=jax.random.key(0),
            norm=norm,
            norm_gain=True,
            norm_bias=gpt2,
            dtype=dtype,
            mlp=s["mlp"],
            **attention,
        )  # fmt: skip
    )
    a = jnp.asarray

    def normed(weight, bias=None):  # the config's eps (static: set by the constructor)
        make = eqx.nn.LayerNorm if gpt2 else eqx.nn.RMSNorm
        n = make(d, eps=s["eps"], use_bias=gpt2, dtype=dtype)
        n = eqx.tree_at(lambda n: n.weight, n, a(weight))
        return n if bias is None else eqx.tree_at(lambda n: n.bias, n, a(bias))

    def heads(W, n):  # (d, n k) columns per head -> (n, d, k)
        return a(W.reshape(d, n, k).transpose(1, 0, 2))

    blocks = []
    for i, b in enumerate(skeleton.blocks):
        if gpt2:
            p = f"transformer.h.{i}."
            Wqkv, bqkv = np.split(w[p + "attn.c_attn.weight"], 3, 1), w[p + "attn.c_attn.bias"]
            bq, bk, bv = (a(x.reshape(H, k)) for x in np.split(bqkv, 3))
            attn = (heads(Wqkv[0], H), heads(Wqkv[1], H), heads(Wqkv[2], H),
                    a(w[p + "attn.c_proj.weight"].reshape(H, k, d)), bq, bk, bv,
                    a(w[p + "attn.c_proj.bias"]))  # fmt: skip
            mlp = (a(w[p + "mlp.c_fc.weight"]), a(w[p + "mlp.c_proj.weight"]), None,
                   a(w[p + "mlp.c_fc.bias"]), a(w[p + "mlp.c_proj.bias"]))  # fmt: skip
            n1 = normed(w[p + "ln_1.weight"], w[p + "ln_1.bias"])
            n2 = normed(w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        else:
            p = f"model.layers.{i}."
            q = p + "self_attn."

            def bias(name, n, q=q):
                return a(w[q + name].reshape(n, -1)) if s["attention_bias"] else None

            attn = (heads(w[q + "q_proj.weight"].T, H), heads(w[q + "k_proj.weight"].T, G),
                    heads(w[q + "v_proj.weight"].T, G),
                    a(w[q + "o_proj.weight"].T.reshape(H, k, d)), bias("q_proj.bias", H),
                    bias("k_proj.bias", G), bias("v_proj.bias", G),
                    a(w[q + "o_proj.bias"]) if s["attention_bias"] else None)  # fmt: skip
            mlp = (a(w[p + "mlp.gate_proj.weight"].T), a(w[p + "mlp.down_proj.weight"].T),
                   a(w[p + "mlp.up_proj.weight"].T), None, None)  # fmt: skip
            n1 = normed(w[p + "input_layernorm.weight"])
            n2 = normed(w[p + "post_attention_layernorm.weight"])
        b = eqx.tree_at(
            lambda b: (b.attn.Wq, b.attn.Wk, b.attn.Wv, b.attn.Wo, b.attn.bq, b.attn.bk,
                       b.attn.bv, b.attn.bo),
            b, attn, is_leaf=lambda x: x is None,
        )  # fmt: skip
        b = eqx.tree_at(
            lambda b: (b.mlp.W1, b.mlp.W2, b.mlp.W3, b.mlp.b1, b.mlp.b2),
            b, mlp, is_leaf=lambda x: x is None,
        )  # fmt: skip
        blocks.append(eqx.tree_at(lambda b: (b.norm1, b.norm2), b, (n1, n2)))
    t = PREFIX[s["kind"]]
    if gpt2:
        embed, positions = w[t + "wte.weight"], a(w[t + "wpe.weight"])
        final = normed(w[t + "ln_f.weight"], w[t + "ln_f.bias"])
    else:
        embed, positions = w[t + "embed_tokens.weight"], None
        final = normed(w[t + "norm.weight"])
    return eqx.tree_at(
        lambda m: (m.W_in, m.positions, m.blocks, m.norm, m.W_out),
        skeleton,
        (a(embed), positions, tuple(blocks), final, a(w["lm_head.weight"].T)),
        is_leaf=lambda x: x is None,
    )


def _layout(model: Decoder) -> str:
    """`"gpt2"` or `"llama"`: which layout `model`'s structure is, or a `ValueError` naming
    what fits neither."""
    if not isinstance(model, Decoder):
        raise TypeError(f"`model` must be a gaugejax Decoder; received {type(model).__name__}.")
    if model.W_in.shape[0] != model.W_out.shape[1]:
        raise ValueError(
            "to_huggingface: the token embedding `W_in` and the read-out `W_out` must share "
            f"the vocabulary; received {model.W_in.shape[0]} and {model.W_out.shape[1]} tokens."
        )
    attn = [b.attn for b in model.blocks]
    mlps = {b.mlp.kind for b in model.blocks}
    ropes = {a.rope for a in attn}
    common = [a for a in attn if not (a.causal and a.activation == "softmax")]
    if common:
        raise ValueError("to_huggingface: every attention must be causal softmax attention.")
    if model.positions is not None and mlps <= {"gelu", "gelu_tanh"} and ropes == {None}:
        if len(mlps) > 1 or any(a.num_kv_heads != a.num_heads for a in attn):
            raise ValueError("to_huggingface (gpt2): one GELU kind and no grouped-query heads.")
        if any(a.Wq.shape[2] * a.num_heads != a.Wq.shape[1] for a in attn) or any(
            a.Wv.shape[2] != a.Wq.shape[2] for a in attn
        ):
            raise ValueError(
                "to_huggingface (gpt2): heads must split the width (num_heads * head_dim = d, "
                "value_dim = head_dim)."
            )
        return "gpt2"
    if model.positions is None and mlps == {"swiglu"} and ropes == {"half"}:
        if any(a.Wv.shape[2] != a.Wq.shape[2] for a in attn):
            raise ValueError("to_huggingface (llama): value_dim must equal head_dim.")
        return "llama"
    raise ValueError(
        "to_huggingface: `model` fits neither layout; GPT-2 has learned positions, a GELU MLP "
        "and no RoPE, LLaMA RoPE with rope='half', SwiGLU and no learned positions; received "
        f"positions={model.positions is not None}, mlp={sorted(mlps)}, "
        f"rope={sorted(map(str, ropes))}."
    )


def _mean_free(model: Decoder) -> None:
    """Raise unless every write into the stream is mean-free (GPT-2's LayerNorm then equals
    the RMSNorm the fused model has)."""
    writes = {"W_in": model.W_in, "positions": model.positions}
    for i, b in enumerate(model.blocks):
        p = f"blocks[{i}]."
        writes.update({p + "attn.Wo": b.attn.Wo, p + "attn.bo": b.attn.bo,
                       p + "mlp.W2": b.mlp.W2, p + "mlp.b2": b.mlp.b2})  # fmt: skip
    tol = float(np.sqrt(np.finfo(model.W_in.dtype).eps))
    for name, W in writes.items():
        if W is None:
            continue
        W = np.asarray(W)
        mean = float(np.max(np.abs(W.mean(-1)))) / max(float(np.max(np.abs(W))), 1e-300)
        if mean > tol:
            raise ValueError(
                f"to_huggingface (gpt2): `model.{name}` writes a mean into the residual stream "
                f"(relative {mean:.1e} > {tol:.1e}), which GPT-2's LayerNorm would subtract and "
                "the model's RMSNorms keep. Export the unfused model, or its fused form moved "
                "only by residual rotations fixing the all-ones vector (Q 1 = 1)."
            )


def _bias(norm, W_out, b_out, dtype) -> np.ndarray:
    """The final norm's bias with the read-out bias moved back into it: `beta W_out = b_out`
    solved (least squares, checked exact: Hugging Face's read-out has no bias)."""
    d = W_out.shape[0]
    beta = np.zeros((d,), dtype) if norm.bias is None else np.asarray(norm.bias)
    if b_out is None:
        return beta
    W, b = np.asarray(W_out, np.float64), np.asarray(b_out, np.float64)
    extra = np.linalg.lstsq(W.T, b, rcond=None)[0]
    residual = np.max(np.abs(extra @ W - b)) / max(np.max(np.abs(b)), 1e-300)
    if residual > np.sqrt(np.finfo(dtype).eps):
        raise ValueError(
            "to_huggingface: the read-out bias `b_out` is not `beta W_out` for any final-norm "
            f"bias beta (relative residual {residual:.1e}); Hugging Face's lm_head has no bias."
        )
    return (beta + extra).astype(dtype)


def _norm(norm, dtype) -> tuple[np.ndarray, np.ndarray | None]:
    (d,) = norm.shape
    gain = np.ones((d,), dtype) if norm.weight is None else np.asarray(norm.weight)
    return gain, None if norm.bias is None else np.asarray(norm.bias)


def to_huggingface(model: Decoder) -> dict[str, np.ndarray]:
    """`model`'s parameters in Hugging Face naming: the inverse of `from_huggingface`, and the
    export of a gauge-moved model (module docstring).

    **Arguments:** `model`: a token `Decoder` in GPT-2 layout (learned positions, a GELU MLP,
    no RoPE; LayerNorms, or the RMSNorms of its fused form on a mean-free stream) or LLaMA
    layout (RoPE `"half"`, SwiGLU, RMSNorms, no learned positions).

    **Returns:** a dict of numpy arrays in `GPT2LMHeadModel` / `LlamaForCausalLM`
    state-dict naming (prefixed), ready for `load_state_dict`; a norm without a gain or a
    missing GPT-2 attention bias is written as ones or zeros. `lm_head.weight` is always
    written; it equals the embedding exactly when the model is tied.

    **Raises:** `TypeError` for anything but a `Decoder`; `ValueError` for a model fitting
    neither layout, non-causal or non-softmax attention, a GPT-2 model mixing GELUs, with
    grouped-query heads or heads not splitting the width, a fused GPT-2 model whose stream is
    not mean-free (a residual rotation not fixing the all-ones vector), a LLaMA model with
    LayerNorms, norm biases or a read-out bias, or a read-out bias no final-norm bias makes.
    """
    kind = _layout(model)
    dtype = model.W_in.dtype
    out: dict[str, np.ndarray] = {}
    np_ = np.asarray

    def flat(W):  # (n, d, k) per head -> (d, n k)
        n, d, k = W.shape
        return np_(W).transpose(1, 0, 2).reshape(d, n * k)

    def zeros_or(b, shape):
        return np.zeros(shape, dtype) if b is None else np_(b).reshape(shape)

    if kind == "gpt2":
        layer = [isinstance(n, eqx.nn.LayerNorm) for n in _norms(model)]
        if not all(layer):
            if any(layer):
                raise ValueError("to_huggingface (gpt2): `model` mixes LayerNorm and RMSNorm.")
            if any(n.bias is not None for n in _norms(model)):
                raise ValueError(
                    "to_huggingface (gpt2): an RMSNorm with a bias; fuse_layernorm folds it."
                )
            _mean_free(model)
        t = "transformer."
        out[t + "wte.weight"] = np_(model.W_in)
        out[t + "wpe.weight"] = np_(model.positions)
        for i, b in enumerate(model.blocks):
            p, a, m = f"{t}h.{i}.", b.attn, b.mlp
            for name, n in (("ln_1", b.norm1), ("ln_2", b.norm2)):
                gain, bias = _norm(n, dtype)
                out[p + name + ".weight"] = gain
                out[p + name + ".bias"] = zeros_or(bias, gain.shape)
            H, d, k = a.Wq.shape
            out[p + "attn.c_attn.weight"] = np.concatenate([flat(a.Wq), flat(a.Wk), flat(a.Wv)], 1)
            out[p + "attn.c_attn.bias"] = np.concatenate(
                [zeros_or(x, (H * k,)) for x in (a.bq, a.bk, a.bv)]
            )
            out[p + "attn.c_proj.weight"] = np_(a.Wo).reshape(H * k, d)
            out[p + "attn.c_proj.bias"] = zeros_or(a.bo, (d,))
            out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = np_(m.W1), np_(m.b1)
            out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = np_(m.W2), np_(m.b2)
        out[t + "ln_f.weight"] = _norm(model.norm, dtype)[0]
        out[t + "ln_f.bias"] = _bias(model.norm, model.W_out, model.b_out, dtype)
        out["lm_head.weight"] = np_(model.W_out).T
        return out
    norms = _norms(model)
    if not all(isinstance(n, eqx.nn.RMSNorm) and n.bias is None for n in norms):
        raise ValueError(
            "to_huggingface (llama): every norm must be an RMSNorm without a bias (LLaMA's); "
            "fuse_layernorm folds norm biases."
        )
    if model.b_out is not None:
        raise ValueError("to_huggingface (llama): a read-out bias `b_out`; LLaMA has none.")
    t = "model."
    out[t + "embed_tokens.weight"] = np_(model.W_in)
    for i, b in enumerate(model.blocks):
        p, a, m = f"{t}layers.{i}.", b.attn, b.mlp
        q = p + "self_attn."
        out[q + "q_proj.weight"] = flat(a.Wq).T
        out[q + "k_proj.weight"] = flat(a.Wk).T
        out[q + "v_proj.weight"] = flat(a.Wv).T
        H, v, d = a.Wo.shape
        out[q + "o_proj.weight"] = np_(a.Wo).reshape(H * v, d).T
        if any(x is not None for x in (a.bq, a.bk, a.bv, a.bo)):  # attention_bias=True
            for name, x, n in (("q", a.bq, H), ("k", a.bk, a.num_kv_heads),
                               ("v", a.bv, a.num_kv_heads)):  # fmt: skip
                out[q + name + "_proj.bias"] = zeros_or(x, (n * a.Wq.shape[2],))
            out[q + "o_proj.bias"] = zeros_or(a.bo, (d,))
        out[p + "mlp.gate_proj.weight"] = np_(m.W1).T
        out[p + "mlp.up_proj.weight"] = np_(m.W3).T
        out[p + "mlp.down_proj.weight"] = np_(m.W2).T
        out[p + "input_layernorm.weight"] = _norm(b.norm1, dtype)[0]
        out[p + "post_attention_layernorm.weight"] = _norm(b.norm2, dtype)[0]
    out[t + "norm.weight"] = _norm(model.norm, dtype)[0]
    out["lm_head.weight"] = np_(model.W_out).T
    return out


def _norms(model: Decoder) -> list:
    return [model.norm] + [n for b in model.blocks for n in (b.norm1, b.norm2)]
