"""fastencoder: fused Triton kernels for BERT and ALBERT encoders."""
from .kernels import get_backend, set_backend

__all__ = ["get_backend", "set_backend"]
__version__ = "0.1.0"
