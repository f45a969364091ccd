"""fastencoder's fused Triton ops. Each public op is a torch.library custom op (traceable by
torch.compile) with a PyTorch reference beside it; the backend switch picks between them."""
from .backend import get_backend, set_backend
from .layer_norm import layer_norm
from .linear import linear

__all__ = ["get_backend", "layer_norm", "linear", "set_backend"]
