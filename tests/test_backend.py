"""The backend switch: one place decides between the Triton kernels and the PyTorch reference."""
import importlib.metadata
import os
import subprocess
import sys

import pytest
import torch

import fastencoder
from fastencoder.kernels import backend, layer_norm


def test_set_backend_validates_and_round_trips(monkeypatch):
    previous = fastencoder.get_backend()
    try:
        for name in ("torch", "triton", "auto"):
            fastencoder.set_backend(name)
            assert fastencoder.get_backend() == name
        with pytest.raises(ValueError, match="unknown fastencoder backend 'cuda'"):
            fastencoder.set_backend("cuda")
    finally:
        fastencoder.set_backend(previous)


@pytest.mark.parametrize("value, expected", [("torch", "torch"), ("fast", "unknown fastencoder backend 'fast'")])
def test_environment_variable_is_the_default(value, expected):
    """FASTENCODER_BACKEND as set when fastencoder is imported (read once: every op asks)."""
    code = (
        "import fastencoder\n"
        "try:\n    print(fastencoder.get_backend())\n"
        "except ValueError as error:\n    print(error)\n"
    )
    env = dict(os.environ, FASTENCODER_BACKEND=value)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert expected in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without CUDA")
def test_auto_on_cpu_runs_the_reference(monkeypatch, kernel_launches):
    monkeypatch.setattr(backend, "_backend", "auto")
    assert not backend.use_triton(torch.device("cpu"))
    layer_norm(torch.randn(3, 8), torch.ones(8), torch.zeros(8), 1e-12)
    assert kernel_launches == []


def test_triton_on_cpu_without_interpreter_names_both_ways_out():
    # a fresh interpreter: TRITON_INTERPRET must be unset when the kernel modules are imported
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTENCODER_BACKEND"] = "triton"
    code = (
        "import torch; from fastencoder.kernels import layer_norm\n"
        "try:\n    layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8), 1e-12)\n"
        "except RuntimeError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "TRITON_INTERPRET=1" in result.stdout and "set_backend('torch')" in result.stdout


def test_package_imports_without_a_gpu():
    result = subprocess.run(
        [sys.executable, "-c", "import fastencoder, fastencoder.kernels; print(fastencoder.get_backend())"],
        capture_output=True, text=True, check=True,
    )
    assert result.stdout.strip() in backend.BACKENDS


def test_checkout_kernels_directory_imported_as_top_level_package_hands_over(triton_backend):
    # transformers (>= 5.25 depends on it) imports the installed package named `kernels`; from a
    # checkout that name finds our kernels/ directory first, which must then register nothing (a
    # second registration of the same torch.library ops corrupts torch's operator registry) and
    # hand the import over to the installed package, or stay empty where there is none
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        f"import sys; sys.path.insert(0, {root!r}); import kernels\n"
        "import transformers.activations\n"
        "import torch; from fastencoder.kernels import layer_norm\n"
        "x = torch.randn(3, 8)\n"
        "y = layer_norm(x, torch.ones(8), torch.zeros(8), 1e-12)\n"
        "print(kernels.__file__, hasattr(kernels, 'attention'),\n"
        "      torch.allclose(y, torch.nn.functional.layer_norm(x, (8,), eps=1e-12), atol=1e-5))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path, has_ops, layer_norm_works = result.stdout.split()
    assert has_ops == "False" and layer_norm_works == "True"
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:  # nothing to hand over to: our empty package
        assert os.path.dirname(path) == os.path.join(root, "kernels"), path
    else:
        assert not path.startswith(os.path.join(root, "kernels")), path


def test_models_without_transformers_say_which_extra_to_install():
    code = (
        "import sys; sys.modules['transformers'] = None  # as if not installed\n"
        "import fastencoder, fastencoder.kernels\n"
        "try:\n    fastencoder.BertModel\nexcept ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'fastencoder[hf]'" in result.stdout


def test_without_triton_the_package_imports_and_runs_the_references():
    code = (
        "import sys; sys.modules['triton'] = None  # as on a platform triton does not ship for\n"
        "import torch, fastencoder\n"
        "from fastencoder.kernels import attention, backend, layer_norm, linear\n"
        "x = torch.randn(2, 5, 8)\n"
        "y = layer_norm(linear(x, torch.randn(8, 8), None, 'gelu'), torch.ones(8), torch.zeros(8), 1e-12)\n"
        "q = torch.randn(2, 5, 2, 4)\n"
        "print(backend.TRITON_AVAILABLE, tuple(y.shape), tuple(attention(q, q, q).shape))\n"
        "fastencoder.set_backend('triton')\n"
        "try:\n    layer_norm(x, torch.ones(8), torch.zeros(8), 1e-12)\n"
        "except RuntimeError as error:\n    print(error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == "False (2, 5, 8) (2, 5, 2, 4)"
    assert "needs the triton package" in lines[1]


@pytest.fixture
def simulated_gpu(monkeypatch):
    """The switch as it decides on a machine with compiled kernels and a CUDA device 0 of the
    compute capability the test sets (the decision itself needs no GPU); counts capability reads."""
    monkeypatch.setattr(backend, "_backend", "auto")
    monkeypatch.setattr(backend, "TRITON_AVAILABLE", True)
    monkeypatch.setattr(backend, "INTERPRET", False)
    monkeypatch.setattr(backend, "_capability_8", {})
    reads = []
    state = dict(capability=(8, 0))

    def capability(index):
        reads.append(index)
        return state["capability"]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    return state, reads


@pytest.fixture
def allow_tf32():
    """Sets torch.backends.cuda.matmul.allow_tf32 for the test (a flag; no GPU needed)."""
    previous = torch.backends.cuda.matmul.allow_tf32

    def set_flag(value):
        torch.backends.cuda.matmul.allow_tf32 = value

    yield set_flag
    torch.backends.cuda.matmul.allow_tf32 = previous


def test_auto_rules_on_sm80_and_newer(simulated_gpu, allow_tf32):
    """16-bit: the kernels. fp32: the kernels only with TF32 allowed, else the PyTorch path for the
    ops with dot products; the memory-bound ops (no matmul dtype) keep their kernels."""
    _, reads = simulated_gpu
    gpu = torch.device("cuda", 0)
    allow_tf32(False)
    assert backend.use_triton(gpu, torch.float16) and backend.use_triton(gpu, torch.bfloat16)
    assert not backend.use_triton(gpu, torch.float32)
    assert backend.use_triton(gpu)
    allow_tf32(True)
    assert backend.use_triton(gpu, torch.float32)
    assert not backend.use_triton(torch.device("cpu"), torch.float16)
    assert reads == [0], "the capability is read once per device, not once per op"


def test_auto_runs_the_pytorch_path_on_older_gpus(simulated_gpu):
    state, _ = simulated_gpu
    state["capability"] = (7, 5)  # T4
    gpu = torch.device("cuda", 0)
    assert not any(backend.use_triton(gpu, dtype) for dtype in (torch.float16, torch.float32, None))
    backend.set_backend("triton")  # asked for explicitly, the kernels refuse the device
    with pytest.raises(RuntimeError, match="compute capability 8.0 or newer"):
        backend.use_triton(gpu, torch.float16)
