"""Stand-ins for `triton` and `triton.language` where triton is not installed (it ships for Linux
only): just enough for the kernel modules to be defined. The backend switch never selects the
kernels there, so every op runs its PyTorch reference and nothing here is ever launched."""
from types import SimpleNamespace


def _decorator(fn=None, **_options):
    return fn if fn is not None else (lambda function: function)


class _Config:
    def __init__(self, kwargs, num_warps=4, num_stages=2, **_options):
        self.kwargs, self.num_warps, self.num_stages = kwargs, num_warps, num_stages


triton = SimpleNamespace(
    jit=_decorator,
    autotune=lambda configs, key, **_options: _decorator,
    Config=_Config,
)
tl = SimpleNamespace(constexpr=object)  # kernels use it only in annotations
