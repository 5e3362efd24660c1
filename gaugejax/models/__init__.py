"""Models whose parameter redundancies gaugejax studies."""

from .cnn import ConvNet as ConvNet, GraphConvNet as GraphConvNet
from .linear import (
    AbstractLinearField as AbstractLinearField,
    AbstractTimeBasis as AbstractTimeBasis,
    BasisLinearField as BasisLinearField,
    FeedforwardNet as FeedforwardNet,
    FourierBasis as FourierBasis,
    FunctionLinearField as FunctionLinearField,
    LinearNet as LinearNet,
    LinearNODE as LinearNODE,
    PiecewiseLinearBasis as PiecewiseLinearBasis,
    random_linear_node as random_linear_node,
)
from .node import (
    AbstractNeuralODE as AbstractNeuralODE,
    MLPField as MLPField,
    NeuralODE as NeuralODE,
)
