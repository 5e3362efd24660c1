"""Gauge families: one class per family, all `AbstractGauge`s."""

from .attention import (
    AttentionGauge as AttentionGauge,
    AttentionGaugeElement as AttentionGaugeElement,
    attention_gauge as attention_gauge,
)
from .attention_node import (
    AttentionNODEGauge as AttentionNODEGauge,
    AttentionNODEGaugeElement as AttentionNODEGaugeElement,
)
from .base import (
    AbstractGauge as AbstractGauge,
    AbstractParameterGauge as AbstractParameterGauge,
    model_error as model_error,
)
from .block_attention import (
    BlockAttentionElement as BlockAttentionElement,
    BlockAttentionGauge as BlockAttentionGauge,
)
from .composed import ComposedElement as ComposedElement, ComposedGauge as ComposedGauge
from .decoder import (
    DecoderElement as DecoderElement,
    DecoderGauge as DecoderGauge,
    layernorm_null_dimension as layernorm_null_dimension,
)
from .diffeo import FeatureShift as FeatureShift, SpatialDiffeoGauge as SpatialDiffeoGauge
from .features import RandomFeatures as RandomFeatures
from .lie import (
    FeatureGenerator as FeatureGenerator,
    LieDeformationGauge as LieDeformationGauge,
    LieGenerator as LieGenerator,
)
from .linear import (
    AffineMap as AffineMap,
    DiscreteGaugeElement as DiscreteGaugeElement,
    DiscreteLinearGauge as DiscreteLinearGauge,
    LinearGauge as LinearGauge,
    LinearGaugeElement as LinearGaugeElement,
    discrete_gauge_transform as discrete_gauge_transform,
    linear_gauge_transform as linear_gauge_transform,
)
from .maps import (
    AbstractFieldGauge as AbstractFieldGauge,
    AbstractMapGauge as AbstractMapGauge,
    Compose as Compose,
    FieldTangent as FieldTangent,
    Inverse as Inverse,
)
from .permutation import (
    AbstractPermutationGauge as AbstractPermutationGauge,
    HeadPermutation as HeadPermutation,
    HeadPermutationGauge as HeadPermutationGauge,
    UnitPermutationGauge as UnitPermutationGauge,
)
from .reparam import SineReparam as SineReparam, TimeReparamGauge as TimeReparamGauge
from .rescaling import (
    RescalingGauge as RescalingGauge,
    rescaling_conserved_quantity as rescaling_conserved_quantity,
)
from .spec import SpecGauge as SpecGauge, TransformerBlockGauge as TransformerBlockGauge
