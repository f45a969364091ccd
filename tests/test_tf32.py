"""Whether fp32 dot products use TF32 follows torch's settings through either of its APIs: the legacy
flag (torch.backends.cuda.matmul.allow_tf32) and the fp32_precision settings (torch >= 2.9;
`TrainingArguments(tf32=True)` sets the global one), whose mix makes the legacy flag raise when read."""
import pytest
import torch

from fastencoder.kernels import attention, backend, linear
from fastencoder.kernels.attention import attention_reference
from fastencoder.kernels.linear import linear_reference
from test_backend import simulated_gpu  # noqa: F401 (a fixture)

matmul = torch.backends.cuda.matmul
_precision = torch._C._get_fp32_precision_getter


@pytest.fixture
def torch_precision_settings():
    """Restores torch's fp32 precision settings (global, CUDA, cuBLAS matmul) whatever the test set.
    The getters report a value inherited from the level above: a level equal to its parent is
    restored as "none" (inheriting), which reads the same."""
    saved = [_precision(*level) for level in (("generic", "all"), ("cuda", "all"), ("cuda", "matmul"))]
    yield
    torch.backends.fp32_precision = saved[0]
    torch.backends.cudnn.fp32_precision = "none" if saved[1] == saved[0] else saved[1]
    matmul.fp32_precision = "none" if saved[2] == saved[1] else saved[2]


def _set(**settings):
    for name, value in settings.items():
        if name == "legacy":
            matmul.allow_tf32 = value
        elif name == "generic":
            torch.backends.fp32_precision = value
        else:
            matmul.fp32_precision = value


SETTINGS = {  # how TF32 is set → whether fp32 matmuls may use it
    "legacy allow_tf32 True": (dict(legacy=True), True),
    "legacy allow_tf32 False": (dict(legacy=False), False),
    "global tf32": (dict(matmul="none", generic="tf32"), True),
    "global ieee": (dict(matmul="none", generic="ieee"), False),
    "per-backend tf32": (dict(generic="none", matmul="tf32"), True),
    "per-backend ieee over global tf32": (dict(generic="tf32", matmul="ieee"), False),
    "per-backend tf32 over global ieee": (dict(generic="ieee", matmul="tf32"), True),
    "none anywhere": (dict(generic="none", matmul="none"), False),
}


@pytest.mark.parametrize("case", ["global tf32", "per-backend ieee over global tf32", "none anywhere",
                                  "legacy allow_tf32 True"])
def test_fp32_kernels_run_with_the_setting(case, torch_precision_settings, device, triton_backend,
                                           launch_arguments):
    """linear and attention on fp32 inputs (which raised under the global setting) launch their
    kernels with TF32 exactly where torch allows it, and match the float64 references (the
    interpreter computes TF32 dots in fp32; fp32 tolerances, as in test_linear / test_attention)."""
    settings, expected = SETTINGS[case]
    _set(**settings)
    x, weight, bias = torch.randn(19, 40), torch.randn(24, 40) / 40**0.5, torch.randn(24)
    torch.testing.assert_close(linear(x, weight, bias, "gelu").double(),
                               linear_reference(x.double(), weight.double(), bias.double(), "gelu"),
                               atol=2e-5, rtol=2e-5)
    q, k, v = torch.randn(3, 2, 17, 2, 16).unbind(0)
    mask = torch.arange(17) < torch.tensor([17, 9])[:, None]
    out = attention(q, k, v, key_padding_mask=mask)
    expected_out = attention_reference(q.double(), k.double(), v.double(), key_padding_mask=mask)
    torch.testing.assert_close(out.double(), expected_out, atol=1e-4, rtol=1e-4)
    flags = {name: arguments["ALLOW_TF32"] for name, arguments in launch_arguments}
    assert flags == {"_linear_kernel": expected, "_attention_fwd_kernel": expected}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_allows_tf32_reads_whichever_api_was_used(case, torch_precision_settings, simulated_gpu):  # noqa: F811
    settings, expected = SETTINGS[case]
    _set(**settings)
    assert backend.allows_tf32() is expected
    gpu = torch.device("cuda", 0)
    assert backend.use_triton(gpu, torch.float32) is expected  # "auto": fp32 kernels only with TF32
    assert backend.use_triton(gpu, torch.float16)
