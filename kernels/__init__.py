"""fastencoder's fused Triton ops. Each public op is a torch.library custom op (traceable by
torch.compile) with a PyTorch reference beside it; the backend switch picks between them."""
# Run from a checkout (`python -m pytest`, a script in the repo root), this directory is also
# importable as a top-level package `kernels`, the name of an installed package that transformers
# imports (a dependency of transformers >= 5.25). Only as fastencoder.kernels may it define its ops:
# registering the same torch.library ops a second time corrupts torch's operator registry. As
# `kernels` it hands the import over to the installed package of that name, found on the rest of
# sys.path, or stays an empty package where none is installed.
if __name__ == "fastencoder.kernels":
    from .attention import attention
    from .backend import get_backend, set_backend
    from .layer_norm import layer_norm
    from .linear import geglu_linear, linear
    from .padding import pad, unpad

    __all__ = ["attention", "geglu_linear", "get_backend", "layer_norm", "linear", "pad", "set_backend", "unpad"]
elif __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _checkout])
    if _spec is not None:
        # the import statement returns what sys.modules holds once this module has run
        sys.modules["kernels"] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules["kernels"])
