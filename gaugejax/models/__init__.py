"""Models whose parameter redundancies gaugejax studies."""

from .node import MLPField as MLPField, NeuralODE as NeuralODE
