"""solopo_megatron: short-to-long preference optimisation (SoLoPO) as a Megatron-Core plugin."""

from .logprobs import linear_token_logprobs, sequence_logprobs, token_logprobs
from .objectives import ROLES, SoLoPOConfig, required_roles, solopo_loss

__version__ = "0.1.0"

__all__ = [
    "ROLES",
    "SoLoPOConfig",
    "linear_token_logprobs",
    "required_roles",
    "sequence_logprobs",
    "solopo_loss",
    "token_logprobs",
]
