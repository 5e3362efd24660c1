"""Models whose parameter redundancies gaugejax studies."""

from .._core.options import PulledBackNorm as PulledBackNorm, SolveOptions as SolveOptions
from .classifier import (
    ODEClassifier as ODEClassifier,
    adaptive as adaptive,
    fixed_steps as fixed_steps,
)
from .cnn import ConvNet as ConvNet, GraphConvNet as GraphConvNet
from .cubic import (
    AttentionNODE as AttentionNODE,
    CubicField as CubicField,
    attention_as_node as attention_as_node,
    integrated_cubic as integrated_cubic,
)
from .huggingface import from_huggingface as from_huggingface, to_huggingface as to_huggingface
from .linear import (
    AbstractLinearField as AbstractLinearField,
    AbstractTimeBasis as AbstractTimeBasis,
    BasisLinearField as BasisLinearField,
    FeedforwardNet as FeedforwardNet,
    FourierBasis as FourierBasis,
    FunctionLinearField as FunctionLinearField,
    GaugedLinearField as GaugedLinearField,
    GaugedWeight as GaugedWeight,
    LinearNet as LinearNet,
    LinearNODE as LinearNODE,
    PiecewiseLinearBasis as PiecewiseLinearBasis,
    random_linear_node as random_linear_node,
)
from .multihead import (
    MergedAttention as MergedAttention,
    MultiHeadAttention as MultiHeadAttention,
    SelfAttention as SelfAttention,
    attention as attention,
)
from .node import (
    AbstractNeuralODE as AbstractNeuralODE,
    MLPField as MLPField,
    NeuralODE as NeuralODE,
    first_order_response as first_order_response,
)
from .solved import AbstractSolvedModel as AbstractSolvedModel
from .spec import (
    AttentionSpec as AttentionSpec,
    BlockSpec as BlockSpec,
    spec_deviation as spec_deviation,
)
from .transformer import (
    BlockAttention as BlockAttention,
    BlockMLP as BlockMLP,
    Decoder as Decoder,
    TransformerBlock as TransformerBlock,
    apply_rope as apply_rope,
    fuse_layernorm as fuse_layernorm,
    rope_pairs as rope_pairs,
)
