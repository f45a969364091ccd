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
from fastencoder.kernels._launch import launch_device  # noqa: E402
from fastencoder.kernels.backend import TRITON_AVAILABLE  # noqa: E402


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
def triton_backend(device):
    """Run the test with backend "triton", restoring the previous backend afterwards. On a GPU
    machine, what the test creates without naming a device (tensors, models) is created on the GPU:
    the kernels run compiled there, and outside the interpreter the backend refuses CPU tensors."""
    previous = fastencoder.get_backend()
    fastencoder.set_backend("triton")
    if device.type == "cpu":  # the default already; a default-device context would slow every op
        yield
    else:
        previous_device = torch.get_default_device()
        torch.set_default_device(device)
        yield
        torch.set_default_device(previous_device)
    fastencoder.set_backend(previous)


@pytest.fixture
def torch_backend():
    previous = fastencoder.get_backend()
    fastencoder.set_backend("torch")
    yield
    fastencoder.set_backend(previous)


def _launcher():
    """The class whose `run` launches a Triton kernel: compiled on a GPU, interpreted on the CPU."""
    if HAS_CUDA:
        from triton.runtime.jit import JITFunction
        return JITFunction
    from triton.runtime.interpreter import InterpretedFunction
    return InterpretedFunction


def check_launch_device(name, args, kwargs):
    """A launch runs inside kernels/_launch.py's guard, on the device of all of its tensors, which
    is the current CUDA device (whose current stream Triton launches on)."""
    device = launch_device()
    assert device is not None, f"{name} was launched outside kernels/_launch.py's on_device_of"
    devices = {value.device for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)}
    assert devices == {device}, f"{name} launched for {device} with tensors on {devices}"
    if device.type == "cuda":
        assert torch.cuda.current_device() == device.index, f"{name}: current device is not {device}"


@pytest.fixture(autouse=True)
def _every_launch_runs_on_its_tensors_device(monkeypatch):
    """Throughout the suite, a kernel launched anywhere but on its tensors' device fails the test."""
    if not TRITON_AVAILABLE:
        return
    launcher = _launcher()
    original = launcher.run

    def checked_run(self, *args, **kwargs):
        check_launch_device(self.fn.__name__, args, kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(launcher, "run", checked_run)


@pytest.fixture
def kernel_launches(monkeypatch):
    """Names of the Triton kernels launched during the test, once per launch the ops make (not per
    run of the autotuner's benchmark): proof that the kernels, not a PyTorch fallback, did the work."""
    from triton.runtime.autotuner import Autotuner

    launched = []
    tuning = []  # inside Autotuner.run, whose one launch is counted there
    launcher = _launcher()
    original_run, original_tuned_run = launcher.run, Autotuner.run

    def counting_run(self, *args, **kwargs):
        if not tuning:
            launched.append(self.fn.__name__)
        return original_run(self, *args, **kwargs)

    def counting_tuned_run(self, *args, **kwargs):
        launched.append(self.base_fn.__name__)
        tuning.append(True)
        try:
            return original_tuned_run(self, *args, **kwargs)
        finally:
            tuning.pop()

    monkeypatch.setattr(launcher, "run", counting_run)
    monkeypatch.setattr(Autotuner, "run", counting_tuned_run)
    return launched


@pytest.fixture
def launch_arguments(monkeypatch):
    """(kernel name, {argument name: value}) of every kernel launched during the test (those the
    autotuner adds while benchmarking included)."""
    launched = []
    launcher = _launcher()
    original = launcher.run

    def recording_run(self, *args, **kwargs):
        launched.append((self.fn.__name__, {**dict(zip(self.arg_names, args)), **kwargs}))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(launcher, "run", recording_run)
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


@pytest.fixture
def fresh_dynamo():
    """Compiled code of other tests' models dropped before and after: the models share the layer's
    code, and each model compiled adds to Dynamo's per-code recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
