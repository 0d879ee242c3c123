"""pflow: probability-flow ODE solvers for DDPM-style diffusion models.

A DDIM step with eta = 0 is one Euler step of ``d xbar / d sigma = eps(xbar, sigma)``;
pflow integrates that ODE with the solver of your choice and counts what it cost.
"""

from .errors import MaxNFEExceeded, NonFiniteError
from .families import DenoiserModel, VelocityModel
from .grids import get_sigmas, validate_sigmas
from .guidance import Guided, guide
from .inversion import decode, encode
from .likelihood import LikelihoodResult, bits_per_dim, log_likelihood
from .model import EpsModel, ODEModel
from .noise import keyed_randn, noise_keys
from .reference import reference
from .schedule import ContinuousVPSchedule, FlowSchedule, NoiseSchedule, Schedule, SigmaRange
from .solve import SolveResult, sample
from .solvers import available_solvers

__all__ = [
    "ContinuousVPSchedule",
    "DenoiserModel",
    "EpsModel",
    "FlowSchedule",
    "Guided",
    "LikelihoodResult",
    "MaxNFEExceeded",
    "NoiseSchedule",
    "NonFiniteError",
    "ODEModel",
    "Schedule",
    "SigmaRange",
    "SolveResult",
    "VelocityModel",
    "available_solvers",
    "bits_per_dim",
    "decode",
    "encode",
    "get_sigmas",
    "guide",
    "keyed_randn",
    "log_likelihood",
    "noise_keys",
    "reference",
    "sample",
    "validate_sigmas",
]

__version__ = "0.1.0"
