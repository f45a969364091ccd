"""What users combine with an optimised model: peft adapters (LoRA), forward hooks, dynamic
quantization, parametrised or custom modules, and Hugging Face's current forward arguments.

Every check compares with the untouched Hugging Face model doing the same (FP32_TOL, as in
test_bert.py: the same math in another order). Adapters' lora_B starts at zero in peft, which would
make a missing update invisible: the tests give every adapter weight random values first.
"""
import copy
import inspect

import pytest
import torch
import transformers
from helpers import assert_close
from test_albert import albert_config
from test_bert import FP32_TOL, assert_same_outputs, assert_same_values, bert_config, ragged_batch, randomize

import fastencoder
from fastencoder import models

BACKENDS = ("torch", "triton")


@pytest.fixture(params=BACKENDS)
def backend(request):
    request.getfixturevalue(f"{request.param}_backend")
    return request.param


def twins(hf_class=transformers.BertForSequenceClassification, config=None):
    """A random Hugging Face model and an optimised deep copy of it."""
    reference = randomize(hf_class(config or bert_config())).eval()
    return reference, fastencoder.optimize(copy.deepcopy(reference))


def lora_config(**overrides):
    peft = pytest.importorskip("peft", reason="peft is in the test extras")
    settings = dict(r=4, lora_alpha=8, lora_dropout=0.0, modules_to_save=[],
                    target_modules=["query", "key", "value", "dense"])
    settings.update(overrides)
    return peft.LoraConfig(**settings)


def randomize_adapters(*models_):
    """The same random values in every model's adapter weights."""
    generator = torch.Generator().manual_seed(1)
    values = {}
    for model in models_:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    if name not in values:
                        values[name] = torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5
                    param.copy_(values[name])


def lora_twins(order, **lora_options):
    """Hugging Face + peft, and the same with fastencoder: optimised before or after peft; and the
    Hugging Face model without adapters."""
    peft = pytest.importorskip("peft", reason="peft is in the test extras")
    reference, _ = twins()
    plain, ours = copy.deepcopy(reference), copy.deepcopy(reference)
    reference = peft.get_peft_model(reference, lora_config(**lora_options))
    if order == "optimize first":
        ours = peft.get_peft_model(fastencoder.optimize(ours), lora_config(**lora_options))
    else:
        ours = fastencoder.optimize(peft.get_peft_model(ours, lora_config(**lora_options)))
    randomize_adapters(reference, ours)
    return plain, reference, ours


@pytest.mark.parametrize("order", ["optimize first", "peft first"])
def test_lora_forward_and_gradients_match_hugging_face_with_peft(order, backend, kernel_launches):
    plain, reference, ours = lora_twins(order)
    assert isinstance(ours.get_base_model().bert, models.BertModel)
    inputs = ragged_batch(bert_config())
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        with ours.disable_adapter():
            base_only = ours(**inputs).logits
    expected = reference(**inputs, labels=labels)
    actual = ours(**inputs, labels=labels)
    assert (expected.logits - base_only).abs().max() > 1e-2, "the adapters should change the outputs"
    assert_same_outputs(actual, expected, what="LoRA forward")
    expected.loss.backward()
    actual.loss.backward()
    reference_params = dict(reference.named_parameters())
    # within 5e-5 of the largest adapter gradient: against float64, Hugging Face's own fp32 gradients
    # here are off by 2e-5 of it (fastencoder's kernels by 4e-6), more than FP32_TOL
    largest = max(p.grad.abs().max().item() for name, p in reference_params.items() if "lora_" in name)
    trainable = 0
    for name, param in ours.named_parameters():
        if "lora_" in name:
            trainable += 1
            assert_close(param.grad, reference_params[name].grad, atol=5e-5 * largest, rtol=FP32_TOL,
                         what=f"gradient of {name}")
        elif not name.startswith("base_model.model.classifier"):
            assert param.grad is None and not param.requires_grad, f"{name} is frozen under LoRA"
    # A and B on Q, K, V and every dense layer: the FFN's two, the attention output's, the pooler's
    assert trainable == sum("lora_" in name for name in reference_params) == 2 * (6 * 2 + 1)
    if backend == "triton":
        assert "_linear_kernel" in kernel_launches
    with torch.no_grad():
        assert_same_values(base_only, plain(**inputs).logits, FP32_TOL, "disable_adapter() gives the base model")


def test_lora_dropout_draws_what_peft_draws(torch_backend):
    """Dropout on the adapter path, in training: the same masks as peft's (the same draws in the
    same order), so the outputs are equal for the same seed."""
    _, reference, ours = lora_twins("optimize first", lora_dropout=0.3)
    inputs = ragged_batch(bert_config())
    outputs = []
    for model in (reference, ours):
        torch.manual_seed(7)
        outputs.append(model.train()(**inputs).logits)
    assert_same_values(outputs[1], outputs[0], FP32_TOL, "LoRA dropout in training")
    torch.manual_seed(8)
    assert (ours(**inputs).logits - outputs[1]).abs().max() > 1e-3, "another seed draws other masks"


def test_lora_merge_unmerge_and_several_adapters(backend):
    _, reference, ours = lora_twins("optimize first")
    inputs = ragged_batch(bert_config())
    for model in (reference, ours):
        model.add_adapter("second", lora_config(target_modules=["query", "value"]))
    randomize_adapters(reference, ours)
    with torch.no_grad():
        for adapter in ("second", "default"):
            reference.set_adapter(adapter), ours.set_adapter(adapter)
            assert_same_outputs(ours(**inputs), reference(**inputs), what=f"adapter {adapter}")
        unmerged = ours(**inputs).logits
        ours.merge_adapter()
        assert_same_values(ours(**inputs).logits, unmerged, FP32_TOL, "merged")
        ours.unmerge_adapter()
        assert_same_values(ours(**inputs).logits, unmerged, FP32_TOL, "unmerged again")
        merged = ours.merge_and_unload()
        assert isinstance(merged.bert, models.BertModel)
        assert type(merged.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
        assert_same_values(merged(**inputs).logits, unmerged, FP32_TOL, "merge_and_unload")


def test_lora_adapter_saved_and_loaded_onto_an_optimised_model(tmp_path, torch_backend):
    _, reference, _ = lora_twins("optimize first")
    import peft
    reference.save_pretrained(tmp_path)
    base = fastencoder.optimize(copy.deepcopy(reference.get_base_model()))
    loaded = peft.PeftModel.from_pretrained(fastencoder.optimize(
        transformers.BertForSequenceClassification(bert_config())), tmp_path)
    loaded.get_base_model().load_state_dict(base.state_dict(), strict=False)  # the same base weights
    inputs = ragged_batch(bert_config())
    with torch.no_grad():
        assert_same_outputs(loaded.eval()(**inputs), reference(**inputs), what="PeftModel.from_pretrained")


HOOKED = ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.output",
          "bert.encoder.layer.1.attention.output.LayerNorm", "bert.encoder.layer.0.intermediate",
          "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output", "bert.embeddings.LayerNorm"]


@pytest.mark.parametrize("when", ["before optimize", "after optimize"])
def test_forward_hooks_fire_with_hugging_faces_tensors(when, backend):
    reference, _ = twins()
    ours = copy.deepcopy(reference)
    seen = {"reference": {}, "ours": {}}

    def recorder(model_name, module_name):
        def hook(module, args, output):
            seen[model_name][module_name] = ([a for a in args if isinstance(a, torch.Tensor)], output)
        return hook

    def pre_hook(module, args):
        return (args[0] * 2, *args[1:])  # a pre-hook that changes the input must take effect

    if when == "after optimize":
        fastencoder.optimize(ours)
    for model_name, model in (("reference", reference), ("ours", ours)):
        for name in HOOKED:
            model.get_submodule(name).register_forward_hook(recorder(model_name, name))
        model.get_submodule("bert.encoder.layer.1.intermediate.dense").register_forward_pre_hook(pre_hook)
    fastencoder.optimize(ours)
    inputs = ragged_batch(bert_config())
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), reference(**inputs), what="with hooks")
    assert seen["ours"].keys() == set(HOOKED)
    for name in HOOKED:
        (their_args, their_output), (our_args, our_output) = seen["reference"][name], seen["ours"][name]
        assert len(our_args) == len(their_args), name
        for mine, theirs in zip(our_args + [our_output], their_args + [their_output]):
            assert_same_values(mine, theirs, FP32_TOL, name)


def test_hooks_on_modules_the_layer_never_calls_are_refused(torch_backend):
    _, ours = twins()
    ours.bert.encoder.layer[0].attention.self.register_forward_hook(lambda *args: None)
    with pytest.raises(NotImplementedError, match=r"(?i)attention\.self .*hooks are supported on"):
        ours(**ragged_batch(bert_config()))


def test_a_replaced_attention_module_is_refused(torch_backend):
    """The attention itself is computed fused from its projections: a custom module in place of
    attention.self would be ignored, so it is refused, naming it."""
    _, ours = twins()

    class MyAttention(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states, None

    ours.bert.encoder.layer[1].attention.self = MyAttention()
    with pytest.raises(NotImplementedError, match="attention.self was replaced by a MyAttention"):
        ours(**ragged_batch(bert_config()))


def test_hooks_run_the_padded_path(torch_backend):
    """Under unpadding the layers see packed [tokens, hidden] rows: with hooks anywhere the model runs
    padded, so that they see Hugging Face's [batch, sequence, hidden]."""
    reference, ours = twins(transformers.BertModel)
    ours.unpad = True
    shapes = []
    ours.encoder.layer[0].output.dense.register_forward_hook(lambda module, args, output: shapes.append(output.shape))
    inputs = ragged_batch(bert_config())
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), reference(**inputs), what="hooked, unpad=True")
    assert shapes == [(3, 10, 32)]


@pytest.mark.parametrize("order", ["quantize first", "optimize first"])
def test_dynamic_quantization_matches_quantized_hugging_face(order, torch_backend):
    reference, _ = twins()
    ours = copy.deepcopy(reference)
    quantize = lambda model: torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    reference = quantize(reference)
    ours = fastencoder.optimize(quantize(ours)) if order == "quantize first" else quantize(fastencoder.optimize(ours))
    assert isinstance(ours.bert, models.BertModel)
    inputs = ragged_batch(bert_config())
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), reference(**inputs), what="quantized")


def test_parametrized_and_custom_modules_are_called(torch_backend):
    """A parametrised weight (here: weight normalisation), a module of another type and a module
    whose forward was replaced on the instance are computed by calling them, never read as plain
    weights."""
    reference, ours = twins()

    class Doubled(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return 2 * self.linear(x)

    for model in (reference, ours):
        layer = model.bert.encoder.layer[0]
        torch.nn.utils.parametrizations.weight_norm(layer.intermediate.dense)
        layer.attention.self.value = Doubled(layer.attention.self.value)
        key = layer.attention.self.key
        key.forward = lambda x, key=key: torch.nn.functional.linear(x, key.weight) - 1  # as accelerate's hooks do
    inputs = ragged_batch(bert_config())
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), reference(**inputs), what="parametrised and custom modules")


HEADS = [transformers.BertModel, transformers.BertForPreTraining, transformers.BertForMaskedLM,
         transformers.BertForSequenceClassification, transformers.BertForTokenClassification,
         transformers.BertForQuestionAnswering, transformers.AlbertModel, transformers.AlbertForPreTraining,
         transformers.AlbertForSequenceClassification, transformers.AlbertForQuestionAnswering]


def transformers_selects_hidden_states():
    try:
        from transformers.utils.output_capturing import selected_hidden_states  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not transformers_selects_hidden_states(),
                    reason="transformers before 5.2x selects no hidden states by index")
@pytest.mark.parametrize("selection", [[0, 2, -1], 1, [-2]], ids=str)
@pytest.mark.parametrize("hf_class", HEADS, ids=lambda c: c.__name__)
def test_hidden_states_selected_by_index(hf_class, selection, torch_backend):
    config = albert_config() if hf_class.__name__.startswith("Albert") else bert_config()
    reference, ours = twins(hf_class, config)
    inputs = ragged_batch(config)
    with torch.no_grad():
        expected = reference(**inputs, output_hidden_states=selection)
        actual = ours(**inputs, output_hidden_states=selection)
    assert [h is None for h in actual.hidden_states] == [h is None for h in expected.hidden_states]
    assert_same_outputs(actual, expected, what=f"output_hidden_states={selection}")


@pytest.mark.parametrize("ours, theirs", [(models.BertModel, transformers.BertModel),
                                          (models.AlbertModel, transformers.AlbertModel)])
def test_forward_takes_hugging_faces_arguments(ours, theirs):
    """Our forward takes every argument of the installed transformers' forward: the encoder's inputs
    positionally in the same order, every other one by name (decoder-only ones are then refused
    when given), and the output flags transformers takes as keyword arguments."""
    mine, hf = inspect.signature(ours.forward).parameters, inspect.signature(theirs.forward).parameters
    positional = lambda params: [name for name, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    inputs = positional(hf)[:positional(hf).index("inputs_embeds") + 1]
    assert positional(mine)[:len(inputs)] == inputs
    config = albert_config() if ours is models.AlbertModel else bert_config()
    model = ours(config).eval()
    every_argument = {name: None for name in positional(hf) if name != "self"}
    with torch.no_grad():
        model(**dict(every_argument, input_ids=torch.randint(0, config.vocab_size, (2, 5))),
              output_attentions=False, output_hidden_states=False, return_dict=True)
