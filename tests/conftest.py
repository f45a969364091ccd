"""Test harness: on a machine without CUDA the Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before any module defining `@triton.jit` kernels is imported, which
is why it happens here, at the top of conftest, before fastencoder is imported.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import fastencoder  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; runs on a GPU machine (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where kernel tests run: the GPU when there is one, else the CPU through the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def triton_backend():
    """Run the test with backend "triton", restoring the previous backend afterwards."""
    previous = fastencoder.get_backend()
    fastencoder.set_backend("triton")
    yield
    fastencoder.set_backend(previous)


@pytest.fixture
def torch_backend():
    previous = fastencoder.get_backend()
    fastencoder.set_backend("torch")
    yield
    fastencoder.set_backend(previous)


@pytest.fixture
def kernel_launches(monkeypatch):
    """Names of the Triton kernels launched during the test: proof that the kernels, not a
    PyTorch fallback, did the work."""
    launched = []
    if HAS_CUDA:
        from triton.runtime.jit import JITFunction as launcher
    else:
        from triton.runtime.interpreter import InterpretedFunction as launcher
    original = launcher.run

    def counting_run(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(launcher, "run", counting_run)
    return launched


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every tensor the ops allocate with torch.empty / empty_like / new_empty starts as NaN (or
    -1 for integers): an output element a kernel forgets to write cannot pass as a result."""

    def poison(tensor):
        return tensor.fill_(float("nan") if tensor.is_floating_point() else -1)

    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _original=original, **k: poison(_original(*a, **k)))
