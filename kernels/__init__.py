"""fastencoder's fused Triton ops. Each public op is a torch.library custom op (traceable by
torch.compile) with a PyTorch reference beside it; the backend switch picks between them."""
# Run from a checkout (`python -m pytest`, a script in the repo root), this directory is also
# importable as a top-level package `kernels`, a name transformers imports to probe for the hub
# package of that name. Only as fastencoder.kernels may it define its ops: registering the same
# torch.library ops a second time corrupts torch's operator registry.
if __name__ == "fastencoder.kernels":
    from .attention import attention
    from .backend import get_backend, set_backend
    from .layer_norm import layer_norm
    from .linear import geglu_linear, linear
    from .padding import pad, unpad

    __all__ = ["attention", "geglu_linear", "get_backend", "layer_norm", "linear", "pad", "set_backend", "unpad"]
