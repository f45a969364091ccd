"""Quantised models: torchao's `quantize_` (int8 dynamic activations + int8 weights, int8 weight-only)
and torch.ao's deprecated `quantize_dynamic`, applied before or after `optimize`, against the same
quantisation applied to the untouched Hugging Face model.

A quantised weight is a tensor subclass: its module is called (its own forward dispatches to it),
never concatenated or handed to a kernel. Dynamic quantisation with one scale per tensor makes a
token's output depend on the other tokens of the call, so under unpad="auto" such a model runs
padded (Hugging Face's result), while unpad=True runs on the real tokens only.

Tolerances: weight-only quantisation dequantises the weight and runs the same GEMM, so outputs agree
to fp32 rounding (FP32_TOL, as in test_bert.py). Quantising activations rounds them to 8 bits, so an
fp32 rounding difference upstream (fastencoder sums and fuses in another order) can move an
activation across a rounding boundary: one int8 step, amplified by the layers after it. There the
rule is the project's error rule applied to rounding: at most twice what Hugging Face's own quantised
model moves when its embeddings are perturbed at fp32 rounding level (measured in the test; without
such a crossing that is zero and the check is FP32_TOL's).

int4 weight-only (Int4WeightOnlyConfig) has no CPU implementation in torchao 0.18: every packing
format needs CUDA (or an XPU / NPU), so it is not tested here.
"""
import copy

import pytest
import torch
import transformers
from test_albert import albert_config
from test_bert import FP32_TOL, assert_same_outputs, bert_config, randomize

import fastencoder
from fastencoder.models import submodules

torchao_quantization = pytest.importorskip("torchao.quantization", reason="torchao is in the test extras")

BACKENDS = ("torch", "triton")
FAMILIES = {
    "bert": (transformers.BertForSequenceClassification, bert_config, "bert"),
    "albert": (transformers.AlbertForSequenceClassification, albert_config, "albert"),
}
# set_inductor_config=False: otherwise quantize_ turns on process-wide inductor options (coordinate
# descent tuning ...) that would slow every later torch.compile test
TORCHAO_CONFIGS = {
    "int8 dynamic, per token": lambda: torchao_quantization.Int8DynamicActivationInt8WeightConfig(
        set_inductor_config=False),
    "int8 dynamic, per tensor": lambda: torchao_quantization.Int8DynamicActivationInt8WeightConfig(
        granularity=torchao_quantization.PerTensor(), set_inductor_config=False),
    "int8 weight-only": lambda: torchao_quantization.Int8WeightOnlyConfig(set_inductor_config=False),
}


@pytest.fixture(params=BACKENDS)
def backend(request):
    request.getfixturevalue(f"{request.param}_backend")
    return request.param


def right_padded_batch(config, batch=3, seqlen=10):
    """Random tokens; sequence 0 full, 1 and 2 right-padded: 40 % padding, so unpad="auto" runs
    padding-free unless the model says otherwise."""
    attention_mask = torch.ones((batch, seqlen), dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, 3:] = 0
    return dict(
        input_ids=torch.randint(0, config.vocab_size, (batch, seqlen)),
        attention_mask=attention_mask,
        token_type_ids=torch.randint(0, config.type_vocab_size, (batch, seqlen)),
    )


def left_padded_batch(config):
    inputs = right_padded_batch(config)
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)
    return inputs


def quantized_twins(family, quantize, order):
    """A random Hugging Face classifier quantised, and a copy of it quantised and optimised in `order`."""
    hf_class, config, _ = FAMILIES[family]
    reference = randomize(hf_class(config())).eval()
    ours = copy.deepcopy(reference)
    reference = quantize(reference)
    ours = fastencoder.optimize(quantize(ours)) if order == "quantize first" else quantize(fastencoder.optimize(ours))
    return reference, ours


def torchao_quantize(config):
    def quantize(model):
        torchao_quantization.quantize_(model, config)
        return model
    return quantize


def torch_ao_quantize(model):
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def runs_padding_free(model, base_prefix, inputs):
    """Whether the optimised encoder ran on the real tokens only: its padded positions are then zeros."""
    with torch.no_grad():
        hidden = getattr(model, base_prefix)(**inputs).last_hidden_state
    padding = inputs["attention_mask"] == 0
    return bool((hidden[padding] == 0).all())


def rounding_sensitivity(reference, base_prefix, inputs, seeds=(1, 2)):
    """The most the reference's logits move when its embeddings are perturbed by fp32 rounding
    (a relative 2^-23)."""
    embeddings = getattr(reference, base_prefix).embeddings
    moved = 0.0
    with torch.no_grad():
        logits = reference(**inputs).logits
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            perturb = lambda module, args, output: output * (
                1 + 2.0 ** -23 * torch.randn(output.shape, generator=generator).sign())
            handle = embeddings.register_forward_hook(perturb)
            try:
                moved = max(moved, (reference(**inputs).logits - logits).abs().max().item())
            finally:
                handle.remove()
    return moved


@pytest.mark.parametrize("order", ["quantize first", "optimize first"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", TORCHAO_CONFIGS)
def test_torchao_quantization_matches_quantized_hugging_face(scheme, family, order, backend):
    """Before quantised weights were called, the kernels' path concatenated the Q/K/V weights with
    `aten.cat`, which torchao's Int8Tensor does not implement."""
    reference, ours = quantized_twins(family, torchao_quantize(TORCHAO_CONFIGS[scheme]()), order)
    _, config, base_prefix = FAMILIES[family]
    assert isinstance(getattr(ours, base_prefix), (fastencoder.models.BertModel, fastencoder.models.AlbertModel))
    for inputs in (right_padded_batch(config()), left_padded_batch(config())):
        tolerance = FP32_TOL
        if "dynamic" in scheme:
            with torch.no_grad():
                magnitude = reference(**inputs).logits.abs().max().item()
            tolerance += 2 * rounding_sensitivity(reference, base_prefix, inputs) / magnitude
        with torch.no_grad():
            assert_same_outputs(ours(**inputs), reference(**inputs), tol=tolerance, what=f"{scheme}, {order}")


def test_quantized_weights_are_called_not_fused(triton_backend):
    """A torchao weight is a tensor subclass: its module is called, never concatenated with the
    others or handed to a kernel, also where only some of Q/K/V are quantised."""
    reference, ours = quantized_twins("bert", lambda model: model, "quantize first")
    key_only = lambda module, name: name.endswith("attention.self.key")
    for model in (reference, ours):
        torchao_quantization.quantize_(model, TORCHAO_CONFIGS["int8 weight-only"](), filter_fn=key_only)
    attention = ours.bert.encoder.layer[0].attention.self
    assert not submodules._fusable(attention.key, torch.nn.Linear)
    assert submodules._fusable(attention.query, torch.nn.Linear)
    inputs = right_padded_batch(bert_config())
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), reference(**inputs), what="key quantised")


def test_quantized_token_type_table_without_token_type_ids(backend):
    """Without token_type_ids every token has type 0: a quantised type table is looked up through
    its module (its weight cannot be indexed as a plain tensor), as Hugging Face does."""
    reference, ours = quantized_twins("bert", lambda model: model, "quantize first")
    type_table = lambda module, name: name.endswith("embeddings.token_type_embeddings")
    for model in (reference, ours):
        torchao_quantization.quantize_(model, TORCHAO_CONFIGS["int8 weight-only"](), filter_fn=type_table)
    assert not submodules.is_plain(ours.bert.embeddings.token_type_embeddings.weight)
    inputs = right_padded_batch(bert_config())
    del inputs["token_type_ids"]
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), reference(**inputs), what="type table quantised")


def test_which_modules_mix_rows():
    """Precisely the dynamic per-tensor activation quantisations; row-wise modules keep the
    padding-free path."""
    def quantized_linear(quantize):
        return quantize(torch.nn.Sequential(torch.nn.Linear(32, 16)))[0]

    assert submodules.mixes_rows([quantized_linear(torch_ao_quantize)])
    assert submodules.mixes_rows([quantized_linear(torchao_quantize(TORCHAO_CONFIGS["int8 dynamic, per tensor"]()))])
    for scheme in ("int8 dynamic, per token", "int8 weight-only"):
        assert not submodules.mixes_rows([quantized_linear(torchao_quantize(TORCHAO_CONFIGS[scheme]()))]), scheme
    assert not submodules.mixes_rows([torch.nn.Linear(32, 16), torch.nn.LayerNorm(32)])


@pytest.mark.parametrize("order", ["quantize first", "optimize first"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_quantization_runs_padded_under_auto(family, order, torch_backend):
    """torch.ao's dynamically quantised Linear scales each input by its whole tensor's range: on
    the real tokens only it computes other values than on Hugging Face's padded batch (3e-2 on these
    logits). Under unpad="auto" the model runs padded and matches Hugging Face."""
    reference, ours = quantized_twins(family, torch_ao_quantize, order)
    _, config, base_prefix = FAMILIES[family]
    inputs = right_padded_batch(config())
    assert getattr(ours, base_prefix).unpad == "auto"
    assert not runs_padding_free(ours, base_prefix, inputs)
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), reference(**inputs), what="torch.ao dynamic, unpad='auto'")


def test_dynamic_quantization_with_unpad_true_runs_padding_free(torch_backend):
    """unpad=True is honoured: the quantised model runs on the real tokens only, whose per-tensor
    activation ranges differ from the padded batch's, so its results differ from Hugging Face's (as
    the README says)."""
    reference, ours = quantized_twins("bert", torch_ao_quantize, "quantize first")
    ours.bert.unpad = True
    inputs = right_padded_batch(bert_config())
    assert runs_padding_free(ours, "bert", inputs)
    with torch.no_grad():
        difference = (ours(**inputs).logits - reference(**inputs).logits).abs().max().item()
    assert difference > 10 * FP32_TOL


def test_per_tensor_torchao_runs_padded_and_per_token_padding_free(torch_backend):
    """torchao's per-tensor dynamic activations mix rows (the model runs padded under "auto"); its
    default per-token ones do not (padding-free kept)."""
    for scheme, padding_free in (("int8 dynamic, per tensor", False), ("int8 dynamic, per token", True)):
        _, ours = quantized_twins("bert", torchao_quantize(TORCHAO_CONFIGS[scheme]()), "optimize first")
        assert runs_padding_free(ours, "bert", right_padded_batch(bert_config())) is padding_free, scheme
