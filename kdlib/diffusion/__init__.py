"""kdlib.diffusion: parameterisations (VP, EDM, flow matching, TrigFlow) and their conversions,
teacher samplers (Euler, Heun, DDIM/SDE, DPM-Solver++(2M)), classifier-free guidance, and the
consistency parameterisation with few-step consistency sampling. Domain-agnostic: states are
[B, ...] of any trailing shape."""

from kdlib.diffusion.consistency import ConsistencyModel, consistency_sample
from kdlib.diffusion.param import Parameterisation, convert_prediction, convert_state, get_parameterisation
from kdlib.diffusion.samplers import sample

__all__ = ["ConsistencyModel", "Parameterisation", "consistency_sample", "convert_prediction", "convert_state",
           "get_parameterisation", "sample"]
