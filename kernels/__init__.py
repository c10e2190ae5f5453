"""solopo_kernels: log-prob kernels for SoLoPO, independent of Megatron.

Installed as the package ``solopo_kernels`` (this directory is ``kernels/`` in the repository) so it
never clashes with the unrelated PyPI package ``kernels``.
"""

from .reference import token_logprobs_reference

# The Triton implementation arrives with the kernels issue; until then the reference is the kernel.
token_logprobs = token_logprobs_reference

__all__ = ["token_logprobs", "token_logprobs_reference"]
