"""How the public ops call their implementations: through the torch.library custom op where the
call is traced (torch.compile, export, fake or functional tensors), directly everywhere else.

The dispatcher's round trip into a Python custom op costs 10-30 µs of host time per call, 60-80 µs
when its registered autograd runs (measured on a CPU, torch 2.13), while a kernel of a small batch
runs for a few µs: eagerly, that overhead would be the latency. The direct call runs the same
implementation and, when gradients are needed, the same backward and setup_context as the custom
op registers, in a torch.autograd.Function (about 10 µs).
"""
import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(args):
    # under a dispatch mode (make_fx, FlopCounterMode, fake tensors), with tensor subclasses (fake,
    # functional, user-defined) and under torch.func transforms (vmap, grad) the call must be seen
    # as the op: they trace or handle it
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()) and all(
        type(arg) in _PLAIN and not torch._C._functorch.is_functorch_wrapped_tensor(arg)
        for arg in args if isinstance(arg, torch.Tensor))


def _needs_grad(args):
    return torch.is_grad_enabled() and any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args)


def direct_when_eager(op, implementation, backward=None, setup_context=None):
    """A function with `op`'s positional arguments that calls `op` when traced, `implementation`
    (the function `op` was made from) otherwise; `backward` and `setup_context` as given to
    `op.register_autograd`, for an op that has them. An op without them (the backward ops) is
    called as the op when gradients of it are asked for (a double backward): the op then says it has
    no derivative, where the implementation would silently give outputs without one."""
    if backward is None:
        return lambda *args: op(*args) if _needs_grad(args) or not _eager(args) else implementation(*args)

    function = type(f"{implementation.__name__}_function", (torch.autograd.Function,), dict(
        forward=staticmethod(implementation), setup_context=staticmethod(setup_context),
        backward=staticmethod(backward),
    ))

    def call(*args):
        if not _eager(args):
            return op(*args)
        return function.apply(*args) if _needs_grad(args) else implementation(*args)

    return call
