"""gaugejax: gauge symmetries of neural networks and neural ODEs in JAX.

After Hashimoto, Hirono & Sannai, "Unification of Symmetries Inside Neural Networks:
Transformer, Feedforward and Neural ODE" (arXiv 2402.02362). x64 is never switched on here:
entry points and tests do that.
"""

from importlib.metadata import version as _version

from . import gauges as gauges, models as models
from ._analysis.blocks import sample_keys as sample_keys
from ._analysis.claims import (
    CLAIM_COLUMNS as CLAIM_COLUMNS,
    CLAIM_VERDICTS as CLAIM_VERDICTS,
    claim as claim,
    claim_above as claim_above,
    claim_below as claim_below,
    claim_slope as claim_slope,
    claims_table as claims_table,
    format_claim as format_claim,
    format_measured as format_measured,
    in_band as in_band,
    markdown_table as markdown_table,
    run_checks as run_checks,
    validate_checks as validate_checks,
)
from ._analysis.discovery import (
    SymmetryComparison as SymmetryComparison,
    SymmetryDimension as SymmetryDimension,
    compare_symmetries as compare_symmetries,
    gauge_generators as gauge_generators,
    module_function as module_function,
    symmetry_dimension as symmetry_dimension,
)
from ._analysis.figures import (
    PLOT_LOCK as PLOT_LOCK,
    histogram_figure as histogram_figure,
    log_histogram as log_histogram,
    loglog_figure as loglog_figure,
    pareto_front as pareto_front,
    plain_log_ticks as plain_log_ticks,
    planar_flow_figure as planar_flow_figure,
    pyplot as pyplot,
    small_multiples as small_multiples,
    small_multiples_figure as small_multiples_figure,
)
from ._analysis.sweep import (
    PRECISIONS as PRECISIONS,
    REDUCED_PRECISIONS as REDUCED_PRECISIONS,
    SweepLane as SweepLane,
    SweepResult as SweepResult,
    default_observable as default_observable,
    status_name as status_name,
    sweep as sweep,
    sweep_lane as sweep_lane,
)
from ._analysis.verdict import (
    VERDICTS as VERDICTS,
    Recheck as Recheck,
    Verdict as Verdict,
    judge as judge,
)
from ._core.calculus import (
    AbstractTimeFunction as AbstractTimeFunction,
    DeformedField as DeformedField,
    ReparametrizedField as ReparametrizedField,
    SpacetimePulledBackField as SpacetimePulledBackField,
    deform as deform,
    lie_bracket as lie_bracket,
    pullback as pullback,
    reparametrize as reparametrize,
    spacetime_pullback as spacetime_pullback,
    time_derivative as time_derivative,
)
from ._core.correspondence import (
    LiftedGauge as LiftedGauge,
    affine_propagator as affine_propagator,
    discretize as discretize,
    discretize_many as discretize_many,
    euler_discretize as euler_discretize,
    lift as lift,
    wilson_line as wilson_line,
    wilson_line_magnus as wilson_line_magnus,
)
from ._core.numerics import (
    expm as expm,
    gauss_legendre as gauss_legendre,
    loglog_slope as loglog_slope,
    quadrature as quadrature,
)
from ._core.shared_stage import SharedStageRK as SharedStageRK
from ._core.solve import (
    NOT_COUNTED as NOT_COUNTED,
    RK4 as RK4,
    DeformationSensitivityField as DeformationSensitivityField,
    SensitivityField as SensitivityField,
    SolveStats as SolveStats,
    SolveStatus as SolveStatus,
    count_evaluations as count_evaluations,
    evaluations_per_step as evaluations_per_step,
    result_name as result_name,
    solve as solve,
)
from ._fixing import gauge_search as gauge_search, orbits as orbits
from ._fixing.affine import (
    AffineGauged as AffineGauged,
    AffineGaugedField as AffineGaugedField,
    AffineStepReport as AffineStepReport,
    affine_gauge as affine_gauge,
    affine_step_report as affine_step_report,
)
from ._fixing.align import (
    AlignResult as AlignResult,
    align as align,
    parameter_distance as parameter_distance,
)
from ._fixing.balancing import BalanceResult as BalanceResult, balance as balance
from ._fixing.canonical import canonicalize as canonicalize
from ._fixing.few_step import (
    FewStepGauge as FewStepGauge,
    FixedStepErrorObjective as FixedStepErrorObjective,
    few_step_gauge as few_step_gauge,
    keeps_endpoint as keeps_endpoint,
)
from ._fixing.gauge_fixing import (
    TRAJECTORY_TERMS as TRAJECTORY_TERMS,
    LocalErrorSolver as LocalErrorSolver,
    canonical_gauge as canonical_gauge,
    gauge_fixing_penalty as gauge_fixing_penalty,
    integrate_regularizers as integrate_regularizers,
    linear_gauge_fixing_penalty as linear_gauge_fixing_penalty,
    rotation_covariant_penalty as rotation_covariant_penalty,
)
from ._fixing.gauge_search import (
    AbstractElementChart as AbstractElementChart,
    AdaptiveCostObjective as AdaptiveCostObjective,
    CheapestLane as CheapestLane,
    ComposedChart as ComposedChart,
    ElementCost as ElementCost,
    GaugeSearchResult as GaugeSearchResult,
    LipschitzChart as LipschitzChart,
    TrajectoryObjective as TrajectoryObjective,
    cheapest_lane as cheapest_lane,
    element_chart as element_chart,
    element_cost as element_cost,
    estimated_steps as estimated_steps,
    lane_element as lane_element,
    optimise_gauge as optimise_gauge,
)
from ._fixing.orbits import (
    canonical_distance as canonical_distance,
    function_spread as function_spread,
    gauge_response as gauge_response,
    gauge_sensitivity as gauge_sensitivity,
    linear_node_fingerprint as linear_node_fingerprint,
    parameter_spread as parameter_spread,
    ray_deviations as ray_deviations,
    seed_spread as seed_spread,
)
from ._fixing.teleport import (
    TELEPORT_OBJECTIVES as TELEPORT_OBJECTIVES,
    TeleportResult as TeleportResult,
    teleport as teleport,
    transport_adam_state as transport_adam_state,
)
from ._infra import io as io
from ._infra.config import (
    check_choices as check_choices,
    check_one_of as check_one_of,
    load_config as load_config,
    make_config as make_config,
)
from ._infra.data import (
    DATASETS as DATASETS,
    Dataset as Dataset,
    accuracy as accuracy,
    classification_loss as classification_loss,
    cross_entropy as cross_entropy,
    load_dataset as load_dataset,
)
from ._infra.devices import (
    configure_cpu_devices as configure_cpu_devices,
    default_chunk_size as default_chunk_size,
    fast_compile_xla_flags as fast_compile_xla_flags,
    free_memory_bytes as free_memory_bytes,
    intra_op_threads as intra_op_threads,
    pool_threads_for as pool_threads_for,
    supports_float64 as supports_float64,
    use_compilation_cache as use_compilation_cache,
    use_fast_compile as use_fast_compile,
    use_tracing_gc as use_tracing_gc,
)
from ._infra.io import RunLocked as RunLocked
from ._infra.measure import (
    TimedProgram as TimedProgram,
    deviation_summary as deviation_summary,
    matmul_ceiling as matmul_ceiling,
    median_time as median_time,
    peak_memory as peak_memory,
    peak_rss as peak_rss,
    program_flops as program_flops,
    time_program as time_program,
)
from ._infra.train import (
    StackedLoss as StackedLoss,
    TrainingDiverged as TrainingDiverged,
    TrainResult as TrainResult,
    optimizer as optimizer,
    read_checkpoint as read_checkpoint,
    stack_models as stack_models,
    train as train,
    trainable as trainable,
    unstack_model as unstack_model,
)
from .gauges import (
    AbstractFieldGauge as AbstractFieldGauge,
    AbstractGauge as AbstractGauge,
    AbstractParameterGauge as AbstractParameterGauge,
    AbstractPermutationGauge as AbstractPermutationGauge,
    AttentionGauge as AttentionGauge,
    AttentionNODEGauge as AttentionNODEGauge,
    BlockAttentionGauge as BlockAttentionGauge,
    ComposedElement as ComposedElement,
    ComposedGauge as ComposedGauge,
    DecoderGauge as DecoderGauge,
    DiscreteLinearGauge as DiscreteLinearGauge,
    HeadPermutationGauge as HeadPermutationGauge,
    LieDeformationGauge as LieDeformationGauge,
    LinearGauge as LinearGauge,
    RescalingGauge as RescalingGauge,
    SpatialDiffeoGauge as SpatialDiffeoGauge,
    SpecGauge as SpecGauge,
    TimeReparamGauge as TimeReparamGauge,
    TransformerBlockGauge as TransformerBlockGauge,
    UnitPermutationGauge as UnitPermutationGauge,
    attention_gauge as attention_gauge,
    discrete_gauge_transform as discrete_gauge_transform,
    layernorm_null_dimension as layernorm_null_dimension,
    linear_gauge_transform as linear_gauge_transform,
    rescaling_conserved_quantity as rescaling_conserved_quantity,
)
from .models import (
    AbstractLinearField as AbstractLinearField,
    AbstractNeuralODE as AbstractNeuralODE,
    AbstractSolvedModel as AbstractSolvedModel,
    AbstractTimeBasis as AbstractTimeBasis,
    AttentionNODE as AttentionNODE,
    AttentionSpec as AttentionSpec,
    BasisLinearField as BasisLinearField,
    BlockAttention as BlockAttention,
    BlockMLP as BlockMLP,
    BlockSpec as BlockSpec,
    ConvNet as ConvNet,
    CubicField as CubicField,
    Decoder as Decoder,
    FeedforwardNet as FeedforwardNet,
    FourierBasis as FourierBasis,
    FunctionLinearField as FunctionLinearField,
    GaugedLinearField as GaugedLinearField,
    GraphConvNet as GraphConvNet,
    LinearNet as LinearNet,
    LinearNODE as LinearNODE,
    MergedAttention as MergedAttention,
    MLPField as MLPField,
    MultiHeadAttention as MultiHeadAttention,
    NeuralODE as NeuralODE,
    ODEClassifier as ODEClassifier,
    PiecewiseLinearBasis as PiecewiseLinearBasis,
    PulledBackNorm as PulledBackNorm,
    SelfAttention as SelfAttention,
    SolveOptions as SolveOptions,
    TransformerBlock as TransformerBlock,
    adaptive as adaptive,
    apply_rope as apply_rope,
    attention as attention,
    attention_as_node as attention_as_node,
    first_order_response as first_order_response,
    fixed_steps as fixed_steps,
    from_huggingface as from_huggingface,
    fuse_layernorm as fuse_layernorm,
    integrated_cubic as integrated_cubic,
    random_linear_node as random_linear_node,
    spec_deviation as spec_deviation,
    to_huggingface as to_huggingface,
)


__version__ = _version("gaugejax")
