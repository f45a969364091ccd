"""The GEMM table of `fastencoder bench`: every GEMM of a BERT-base and a ModernBERT-base layer, at
M = 4096 and 16384 tokens, by each candidate kernels/gemm_choice.py chooses between, beside cuBLAS
without any epilogue:

  fastencoder classic   the pointer-based Triton kernel, epilogue fused
  fastencoder hopper    the tensor-descriptor, persistent kernel (sm_90 only), epilogue fused
  cuBLAS + epilogue     torch.mm / addmm, then the epilogue as one elementwise pass
  fastencoder           what the ops run: the candidate the first call timed fastest (its row
                        names the winner and every candidate's time at that first call)
  cuBLAS plain          torch.mm alone, the GEMM without its epilogue: the ratio's denominator

Each candidate is called directly on the operands the ops give it, so every row times one GEMM
(the forward; for the FFN's first GEMM also the dx and dW products of its backward), on one set of
operands for every variant alike (they stay in L2 where they fit). Rates count 2·M·N·K FLOP
(N = 2·I for GeGLU). Every variant's output is first checked against cuBLAS + the epilogue
computed by torch.
"""
import torch
import torch.nn.functional as F

from fastencoder.kernels import backend, gemm_choice, linear_cublas, linear_hopper, linear_kernel
from fastencoder.kernels._launch import on_device_of
from fastencoder.kernels.linear import TORCH_ACTIVATIONS

from . import roofline
from .timing import time_calls

# (name, in features, out features, epilogue): the forward GEMMs of one layer; "geglu": out is I
# and the GEMM computes 2·I columns. ModernBERT's linear layers have no bias.
LAYERS = {
    "bert-base": [("qkv", 768, 2304, "bias"), ("attention out", 768, 768, "bias+residual"),
                  ("ffn in", 768, 3072, "bias+gelu"), ("ffn out", 3072, 768, "bias+residual")],
    "modernbert-base": [("Wqkv", 768, 2304, ""), ("attention Wo", 768, 768, "residual"),
                        ("Wi", 768, 1152, "geglu"), ("mlp Wo", 1152, 768, "residual")],
}
# the smoke preset's layers: the same epilogues at toy sizes (interpreted kernels on a CPU)
SMOKE_LAYERS = {
    "bert-base": [("qkv", 64, 192, "bias"), ("attention out", 64, 64, "bias+residual"),
                  ("ffn in", 64, 128, "bias+gelu"), ("ffn out", 128, 64, "bias+residual")],
    "modernbert-base": [("Wi", 64, 64, "geglu")],
}
FULL = dict(layers=LAYERS, tokens=[4096, 16384], dtypes=[torch.float16, torch.bfloat16])
QUICK = dict(layers=LAYERS, tokens=[4096], dtypes=[torch.float16])
SMOKE = dict(layers=SMOKE_LAYERS, tokens=[64], dtypes=[torch.float32])
PLAIN = "cuBLAS plain"


def _gemms(in_features, out_features, epilogue, m, dtype, device):
    """[(product, {operands and epilogue of `matmul`}, cuBLAS plain's operands, reference fn)] for
    one layer: its forward, and for an activation's layer (the FFN's first GEMM) dx and dW too."""
    glu = epilogue == "geglu"
    columns = 2 * out_features if glu else out_features
    x = torch.randn(m, in_features, device=device, dtype=dtype)
    weight = torch.randn(columns, in_features, device=device, dtype=dtype) / in_features**0.5
    bias = torch.randn(columns, device=device, dtype=dtype) if "bias" in epilogue else None
    residual = torch.randn(m, out_features, device=device, dtype=dtype) if "residual" in epilogue else None
    activation = 1 if ("gelu" in epilogue or glu) else 0
    out = torch.empty(m, out_features, device=device, dtype=dtype)
    forward = dict(a=x, b=weight.t(), out=out, bias=bias, activation=activation, residual=residual, glu=glu)

    def reference():
        h = F.linear(x, weight, bias).float()
        if glu:
            u, gate = h.chunk(2, -1)
            return TORCH_ACTIVATIONS["gelu"](u) * gate
        h = TORCH_ACTIVATIONS["gelu" if activation else None](h)
        return h if residual is None else h + residual

    gemms = [("forward", forward, (x, weight.t()), reference)]
    if activation and not glu:  # the backward of the FFN's first GEMM: dh = dy·act'(h), dx, dW + db
        dy, act_grad = (torch.randn(m, columns, device=device, dtype=dtype) for _ in range(2))
        dh = (dy.float() * act_grad.float()).to(dtype)
        dx = torch.empty(m, in_features, device=device, dtype=dtype)
        row_sum = torch.empty(columns, device=device, dtype=torch.float32)
        gemms.append(("dx", dict(a=dy, b=weight, out=dx, scale_a=act_grad, store_a=torch.empty_like(dh)),
                      (dh, weight), lambda: dh @ weight))
        gemms.append(("dW", dict(a=dh.t(), b=x, out=torch.empty_like(weight), row_sum=row_sum), (dh.t(), x),
                      lambda: dh.t() @ x))
    return gemms


def _candidates(product, call, on_hopper):
    a, b, out = call["a"], call["b"], call["out"]
    epilogue = {name: value for name, value in call.items() if name not in ("a", "b", "out")}
    variants = {
        "fastencoder": lambda: linear_kernel.matmul(product, a, b, out, **epilogue),
        "fastencoder classic": lambda: linear_kernel._kernel_matmul(a, b, out, **epilogue),
        "cuBLAS + epilogue": lambda: linear_cublas.cublas_matmul(a, b, out, **epilogue),
    }
    if on_hopper and linear_hopper.eligible(a, b, out, **epilogue):
        variants["fastencoder hopper"] = lambda: linear_hopper.hopper_matmul(a, b, out, **epilogue)

    def on_the_operands_device(run):  # as the ops launch (kernels/_launch.py)
        def launch():
            with on_device_of(a):
                run()
        return launch

    return {name: on_the_operands_device(run) for name, run in variants.items()}, out, epilogue


def gemm_cases(settings, dtype, ceilings, row, failed, check_output, mismatch):
    """Rows of the GEMM table for one dtype (`row`, `failed`, `check_output` and `mismatch`: the
    sweep's row builders, output check and its exception)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_hopper = device.type == "cuda" and linear_hopper.runs_on(torch.empty(0, device=device))
    for model, layers in settings["layers"].items():
        for name, in_features, out_features, epilogue in layers:
            for m in settings["tokens"]:
                gemms = _gemms(in_features, out_features, epilogue, m, dtype, device)
                for product, call, plain_operands, reference in gemms:
                    k = call["a"].shape[1]
                    n = call["b"].shape[1]
                    case = f"gemm {model} {name} ({epilogue or 'plain'}) {product} M{m} N{n} K{k} {dtype_name(dtype)}"
                    flops = roofline.linear_flops(call["a"].shape[0], n, k)
                    variants, out, arguments = _candidates(product, call, on_hopper)
                    plain = lambda _, operands=plain_operands: torch.mm(*operands)
                    yield row("kernel", case, PLAIN, time_calls(plain, [None]), flops, ceilings=ceilings)
                    expected = reference()
                    for variant, run in variants.items():
                        try:
                            run()
                            check_output(out, expected, dtype, "cuBLAS + the epilogue in torch")
                            extra = {}
                            if variant == "fastencoder" and device.type == "cuda":
                                key = linear_kernel._choice_key(product, call["a"], call["b"], arguments)
                                choice = gemm_choice.choices().get(key)
                                if choice is not None:
                                    extra = dict(choice=choice.winner, choice_times_ms=choice.times_ms)
                            yield row("kernel", case, variant, time_calls(lambda _, run=run: run(), [None]), flops,
                                      ceilings=ceilings, **extra)
                        except mismatch as error:
                            yield failed("kernel", case, variant, error)


def dtype_name(dtype):
    return str(dtype).split(".")[-1]


def runs_here():
    """The GEMM table needs the kernels: compiled on a GPU, or interpreted (the smoke preset's tests)."""
    return torch.cuda.is_available() or backend.INTERPRET


def format_table(rows):
    """Per GEMM: each candidate's TFLOP/s and its ratio to cuBLAS plain, and what the choice kept."""
    order = ["fastencoder classic", "fastencoder hopper", "cuBLAS + epilogue", "fastencoder", PLAIN]
    by_case = {}
    for r in rows:
        if r["case"].startswith("gemm "):
            by_case.setdefault(r["case"], {})[r["variant"]] = r
    if not by_case:
        return ""
    lines = ["GEMMs: TFLOP/s (ratio to cuBLAS plain); 'fastencoder' runs what the choice kept",
             f"{'case':<78}" + "".join(f"{name:>26}" for name in order) + "  choice"]
    for case, variants in by_case.items():
        plain = variants.get(PLAIN, {}).get("TFLOPs")
        cells = []
        for name in order:
            found = variants.get(name)
            if found is None:
                cells.append(f"{'-':>26}")
            elif "error" in found:
                cells.append(f"{'FAILED':>26}")
            else:
                ratio = f" ({found['TFLOPs'] / plain:.2f}x)" if plain else ""
                cells.append(f"{found['TFLOPs']:7.1f}{ratio:>9}".rjust(26))
        choice = variants.get("fastencoder", {})
        chosen = (f"  {choice['choice']} (" + ", ".join(f"{k} {v:.3f} ms" for k, v in choice["choice_times_ms"].items())
                  + ")") if "choice" in choice else ""
        lines.append(f"{case:<78}" + "".join(cells) + chosen)
    return "\n".join(lines)
