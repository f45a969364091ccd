"""How the fused layers compute with Hugging Face's submodules (the projections and LayerNorms).

Nothing is copied out of a module: every call reads the module that holds the weights, so no
change to them (an optimiser step, a `.data` write, `load_state_dict`, `.to()`, a replaced
parameter) can leave a stale copy behind. Each module runs in one of three ways, decided at
every call from a few attribute reads:
  * fused: an exact `nn.Linear` / `nn.LayerNorm` without hooks runs in fastencoder's op, with the
    activation and residual add fused;
  * fused + low-rank update: a peft LoRA layer over such a Linear runs its base projection in
    the op (Q, K and V still one GEMM) and adds each active adapter's update
    lora_B(lora_A(dropout(x))) · scaling on top, as peft does;
  * called: anything else (a module with forward hooks or pre-hooks, a parametrised, quantised or
    custom module, a module whose weight is a tensor subclass such as torchao's quantised ones, a
    LoRA variant such as DoRA) is called as Hugging Face calls it, so it computes what it would
    there; only that op is unfused.

Under torch.autocast each op computes as autocast runs Hugging Face's module: a projection
casts its input and weights to the autocast dtype (a differentiable cast: gradients reach the fp32
weights in fp32, which are never modified) and returns 16-bit; LayerNorm(x + residual) adds the
16-bit branch output to the fp32 residual stream and normalises in fp32 with the fp32 weights,
returning fp32. Without autocast every op computes in the dtype of its input activations.
"""
import sys

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from fastencoder.kernels import backend, geglu_linear, layer_norm, linear
from fastencoder.kernels.layer_norm import layer_norm_torch
from fastencoder.kernels.linear import TORCH_ACTIVATIONS, geglu_linear_torch, linear_torch


def _hf_output_capture(hook):
    # transformers records hidden states and attentions with forward hooks of this name, inert
    # outside its own models' forward
    return getattr(hook, "__name__", None) == "output_capturing_hook"


def has_hooks(module):
    """True when calling `module` would run forward hooks or pre-hooks (its own or global ones)."""
    return bool(
        module._forward_pre_hooks or module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
        or module._forward_hooks and not all(map(_hf_output_capture, module._forward_hooks.values()))
    )


# the types of a parameter slot that fastencoder's ops may read: a tensor subclass (torchao's
# quantised weights, a DTensor ...) computes through its own dispatch, which only its module's
# forward runs
_PLAIN_PARAMETER_TYPES = frozenset({torch.Tensor, nn.Parameter, type(None)})


def is_plain(tensor):
    """True for a plain tensor or parameter (or None), which fastencoder's ops may read directly."""
    return type(tensor) in _PLAIN_PARAMETER_TYPES


def _fusable(module, module_type):
    # an instance's own forward (accelerate's device hooks replace it) must run: the module is called
    return (type(module) is module_type and not has_hooks(module) and "forward" not in module.__dict__
            and _PLAIN_PARAMETER_TYPES.issuperset(map(type, module._parameters.values())))


# torch.ao's dynamically quantised modules scale each input by the range of the whole tensor
_PER_TENSOR_DYNAMIC_MODULES = ("torch.ao.nn.quantized.dynamic.", "torch.ao.nn.intrinsic.quantized.dynamic.")


def mixes_rows(modules):
    """True when one of `modules` (its own computation, not its submodules') makes a token's output
    depend on the other tokens it is called with, so that calling it on the real tokens only gives
    other results than on the padded batch: torch.ao's dynamically quantised modules, and a torchao
    weight that quantises its activations dynamically with one scale per tensor. Row-wise modules
    (Linear, LoRA, weight-only or per-token activation quantisation) do not."""
    # one loop over all of them: it runs on every padding-free call
    for module in modules:
        if type(module).__module__.startswith(_PER_TENSOR_DYNAMIC_MODULES):
            return True
        for weight in module._parameters.values():
            if type(weight) not in _PLAIN_PARAMETER_TYPES and _per_tensor_dynamic_activations(weight):
                return True
    return False


def _per_tensor_dynamic_activations(weight):
    # torchao's quantised weights say how they quantise their activations in `act_quant_kwargs`
    # (None: weight-only); a static scale (`act_quant_scale`) does not depend on the input
    granularity = getattr(getattr(weight, "act_quant_kwargs", None), "granularity", None)
    torchao_granularity = sys.modules.get("torchao.quantization.granularity")
    return (torchao_granularity is not None and isinstance(granularity, torchao_granularity.PerTensor)
            and getattr(weight, "act_quant_scale", None) is None)


def _peft_lora_linear():
    """peft's LoRA Linear class when peft is in use (it is never imported here), else None."""
    lora_layer = sys.modules.get("peft.tuners.lora.layer")
    return getattr(lora_layer, "Linear", None)


def _lora(module):
    """(base Linear, adapters) for a peft LoRA Linear that the fused path computes exactly as peft
    would, adapters being (lora_A, lora_B, dropout, scaling) for each active one; else None."""
    lora_linear = _peft_lora_linear()
    if lora_linear is None or type(module) is not lora_linear or has_hooks(module):
        return None
    base = module.base_layer
    variants = getattr(module, "lora_variant", None)  # DoRA and other variants are called
    if not _fusable(base, nn.Linear) or variants is None or (module.merged and module.disable_adapters):
        return None  # (peft unmerges inside the forward of a disabled merged layer)
    if module.merged or module.disable_adapters:
        return base, []
    names = [name for name in module.active_adapters if name in module.lora_A]
    if any(name in variants for name in names):
        return None
    return base, [(module.lora_A[n], module.lora_B[n], module.lora_dropout[n], module.scaling[n]) for n in names]


def _add_low_rank(result, x, adapters):
    for lora_A, lora_B, dropout, scaling in adapters:
        result = result + _as(lora_B(lora_A(dropout(_as(x, lora_A.weight.dtype)))) * scaling, result.dtype)
    return result


def _as(tensor, dtype):
    # `.to` even to the same dtype is a dispatcher call: skipped in the common case
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


def _call(module, x):
    """module(x) in the dtype of the module's parameters, the result back in x's dtype."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), x.dtype)
    return _as(module(_as(x, dtype)), x.dtype)


def autocast_input(x):
    """x as autocast casts a Linear's input where it is on for x's device (to its 16-bit dtype), else x."""
    device_type = x.device.type
    return _as(x, torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else x


# devices whose autocast runs layer_norm in fp32 (its inputs cast up, an fp32 output); elsewhere
# (the CPU) LayerNorm keeps its input's dtype under autocast
_FP32_LAYER_NORM_UNDER_AUTOCAST = frozenset({"cuda"})


def project(module, x, activation=None, residual=None):
    """act(module(x)) + residual, computed as described in the module docstring."""
    x = autocast_input(x)  # made explicit: autocast does not reach the Triton ops
    if _fusable(module, nn.Linear):
        # off the kernels, straight to the op's PyTorch path: per-op host time is what small batches
        # wait for, and nn.Linear's own checks apply there
        fused = linear if backend.use_triton(x.device, x.dtype) else linear_torch
        return fused(x, _as(module.weight, x.dtype), _as(module.bias, x.dtype), activation, residual)
    lora = _lora(module)
    if lora is not None and not lora[1]:  # adapters merged or disabled: the base layer alone
        return project(lora[0], x, activation, residual)
    if lora is None:
        h = _call(module, x)
    else:
        base, adapters = lora
        h = _add_low_rank(linear(x, _as(base.weight, x.dtype), _as(base.bias, x.dtype)), x, adapters)
    h = TORCH_ACTIVATIONS[activation](h)
    return h if residual is None else h + residual


def project_geglu(module, x, activation):
    """act(h[..., :I]) · h[..., I:] for h = module(x) of 2·I features (ModernBERT's `Wi` and its GeGLU),
    computed as described in the module docstring: a plain Linear in the GeGLU op, anything else
    called (or its LoRA update added) and then gated in PyTorch, as Hugging Face's MLP gates it."""
    x = autocast_input(x)
    if _fusable(module, nn.Linear):
        fused = geglu_linear if backend.use_triton(x.device, x.dtype) else geglu_linear_torch
        return fused(x, _as(module.weight, x.dtype), _as(module.bias, x.dtype), activation)
    lora = _lora(module)
    if lora is not None and not lora[1]:  # adapters merged or disabled: the base layer alone
        return project_geglu(lora[0], x, activation)
    h, gate = project(module, x).chunk(2, -1)
    return TORCH_ACTIVATIONS[activation](h) * gate


def project_qkv(query, key, value, x):
    """(q, k, v): the three projections of x. With the Triton kernels, when each is a plain Linear
    (plain weights: a tensor subclass is never concatenated) or a LoRA layer over one, their (base)
    weights are concatenated at every call and run as one GEMM, low-rank updates added to its
    slices; otherwise each runs as `project` runs it (three GEMMs cost what one does in PyTorch's
    CPU and pre-Ampere paths, and skip the concatenation)."""
    modules = (query, key, value)
    if backend.use_triton(x.device, x.dtype):
        parts = [(m, []) if _fusable(m, nn.Linear) else _lora(m) for m in modules]
        if all(part is not None and part[0].bias is not None for part in parts):
            weight = _as(torch.cat([base.weight for base, _ in parts]), x.dtype)
            bias = _as(torch.cat([base.bias for base, _ in parts]), x.dtype)
            fused = linear(x, weight, bias).split([base.out_features for base, _ in parts], -1)
            return tuple(_add_low_rank(h, x, adapters) for h, (_, adapters) in zip(fused, parts))
    return tuple(project(m, x) for m in modules)


def add_norm(norm, x, residual=None):
    """norm(x + residual), or norm(x) without a residual, the add fused into fastencoder's LayerNorm
    for a plain nn.LayerNorm (with or without a bias); the result in the dtype Hugging Face's gives:
    that of x + residual (fp32 for the fp32 residual stream under autocast), fp32 wherever autocast
    runs LayerNorm in fp32."""
    device_type = x.device.type
    if device_type in _FP32_LAYER_NORM_UNDER_AUTOCAST and torch.is_autocast_enabled(device_type):
        if residual is None:
            x = _as(x, torch.float32)
        else:
            residual = _as(residual, torch.float32)
    if _fusable(norm, nn.LayerNorm) and norm.weight is not None:
        # the weights as they are: the op computes in fp32 from any mix of dtypes
        fused = layer_norm if backend.use_triton(x.device) else layer_norm_torch
        return fused(x, norm.weight, norm.bias, norm.eps, residual)
    return _call(norm, x if residual is None else x + residual)


def dropout(module, x):
    """module(x), skipped where it is the identity: a plain nn.Dropout in eval mode without hooks."""
    return x if not module.training and _fusable(module, nn.Dropout) else module(x)


def _identity(drop):
    """Whether `drop` (None, an nn.Dropout or an nn.Identity) is the identity on this call and
    calling it would run no hook."""
    if drop is None:
        return True
    if type(drop) is nn.Identity:
        return not has_hooks(drop)
    return _fusable(drop, nn.Dropout) and (not drop.training or drop.p == 0)


def add_projection(linear, x, residual, drop=None):
    """residual + drop(linear(x)), the add fused into the GEMM where the dropout (an nn.Dropout, the
    nn.Identity Hugging Face puts in its place, or None) is the identity on this call and the
    residual has the GEMM's dtype (not under autocast, where the residual stream is fp32 and the
    product 16-bit)."""
    if _identity(drop) and not torch.is_autocast_enabled(x.device.type):
        return project(linear, x, residual=residual)
    projected = project(linear, x)
    return residual + (projected if drop is None else dropout(drop, projected))


def project_add_norm(norm, linear, x, residual, drop=None):
    """norm(drop(linear(x)) + residual), how a post-LN layer closes each sub-layer. On the kernels the
    LayerNorm adds the residual; elsewhere the GEMM does (`add_projection`: on the CPU in oneDNN's
    post-op), one pass over the rows fewer than an add before the norm."""
    if backend.use_triton(x.device):
        projected = project(linear, x)
        return add_norm(norm, projected if drop is None else dropout(drop, projected), residual)
    return add_norm(norm, add_projection(linear, x, residual, drop))


def refuse_hooks(module, name, supported):
    """Hooks on a module the fused layer never calls would silently not fire: refuse them."""
    if has_hooks(module):
        raise NotImplementedError(
            f"{name} ({type(module).__name__}) has forward hooks or pre-hooks, but fastencoder computes it "
            f"fused and never calls it, so they would not fire. Hooks are supported on {supported}; "
            "or restore() the Hugging Face model"
        )
