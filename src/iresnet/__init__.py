"""iresnet: invertible residual networks and residual flows in PyTorch.

References:
    Behrmann et al., "Invertible Residual Networks", ICML 2019, https://arxiv.org/abs/1811.00995

    Chen et al., "Residual Flows for Invertible Generative Modeling", NeurIPS 2019,
    https://arxiv.org/abs/1906.02735
"""

try:
    from .core.activations import CLipSwish, LipSwish
    from .core.aol import AOL, aol
    from .core.certificates import circular_conv_bound, conv_gram_norm, lipschitz_bound, operator_norm_bound
    from .core.dense import DenseLayer
    from .core.implicit import ImplicitBlock
    from .core.inverse import InversionError, InversionReport, solve_fixed_point
    from .core.invertible import InvertibleLayer, sum_logdets
    from .core.jacobian import Linearization, linearize, register_linearization
    from .core.layers import ActNorm, InjectivePad, Squeeze, initialize_from_data
    from .core.lipschitz import SpectralNorm, converge_spectral_norms, spectral_norm
    from .core.logdet import Exact, LogDetEstimator, PowerSeries, Roulette
    from .core.monotone import MonotoneBlock
    from .core.residual import ResidualBlock
    from .flows.composition import Sequential
    from .flows.distributions import Flow, ModuleTransform, as_transform
    from .flows.multiscale import MultiScale
except KeyboardInterrupt:  # Ctrl-C while torch loads: the iresnet command's one line, not a traceback
    from .cli import interrupted_while_importing

    interrupted_while_importing()
    raise

__version__ = "0.1.0"

__all__ = [
    "AOL",
    "ActNorm",
    "CLipSwish",
    "DenseLayer",
    "Exact",
    "Flow",
    "ImplicitBlock",
    "InjectivePad",
    "InversionError",
    "InversionReport",
    "InvertibleLayer",
    "Linearization",
    "LipSwish",
    "LogDetEstimator",
    "MonotoneBlock",
    "ModuleTransform",
    "MultiScale",
    "PowerSeries",
    "ResidualBlock",
    "Roulette",
    "Sequential",
    "SpectralNorm",
    "Squeeze",
    "aol",
    "as_transform",
    "circular_conv_bound",
    "conv_gram_norm",
    "converge_spectral_norms",
    "initialize_from_data",
    "linearize",
    "lipschitz_bound",
    "operator_norm_bound",
    "register_linearization",
    "solve_fixed_point",
    "spectral_norm",
    "sum_logdets",
]
