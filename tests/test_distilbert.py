"""fastencoder's DistilBERT against Hugging Face's (eager attention, same weights), built directly and
through `optimize`, padded and padding-free, on the PyTorch backend and on the Triton kernels
(interpreted on CPU). Tolerances are test_bert.py's (FP32_TOL: the same math in another order, a
few fp32 ulps; FP16_TOL for a model run in half precision).

The helpers here serve test_electra.py too: any family whose embeddings take no token types is
given none.
"""
import copy
import inspect

import pytest
import torch
import transformers
from helpers import assert_close
from test_bert import (
    BACKWARD_KERNELS,
    FORWARD_KERNELS,
    FP16_TOL,
    FP32_TOL,
    assert_same_grads,
    assert_same_outputs,
    assert_same_values,
    backend,  # noqa: F401 (fixture)
    check_gradient_checkpointing,
    randomize,
    twin_models,
)
from test_cuda_graphs import SimulatedGraph, as_if_capturing, eager_output

import fastencoder
from fastencoder import cuda_graphs, models
from fastencoder.models import distilbert, electra

PAD = 0  # pad_token_id of both families' configs


def distilbert_config(**overrides):
    settings = dict(
        vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=16, dropout=0.0,
        attention_dropout=0.0, qa_dropout=0.0, seq_classif_dropout=0.0, num_labels=2, pad_token_id=PAD,
        attn_implementation="eager",
    )
    settings.update(overrides)
    return transformers.DistilBertConfig(**settings)


DISTILBERT_TASKS = [
    (transformers.DistilBertModel, models.DistilBertModel),
    (transformers.DistilBertForMaskedLM, models.DistilBertForMaskedLM),
    (transformers.DistilBertForSequenceClassification, models.DistilBertForSequenceClassification),
    (transformers.DistilBertForTokenClassification, models.DistilBertForTokenClassification),
    (transformers.DistilBertForQuestionAnswering, models.DistilBertForQuestionAnswering),
    (transformers.DistilBertForMultipleChoice, models.DistilBertForMultipleChoice),
]

# each row's padding: full; right-padded; left-padded (Hugging Face's heads then read a padding
# position 0, so a padding-free model runs this batch padded)
RAGGED = ["1111111111", "1111110000", "0001111111"]
RIGHT_PADDED = ["1111111111", "1111110000", "1100000000"]


def uses_token_types(config):
    return hasattr(config, "type_vocab_size")


def batch_from_rows(config, rows, choices=None):
    """Random ids with the pad token at padding (and once among the real tokens, as text can hold
    it), the mask from the rows' strings ("1" real), token types where the family has them."""
    mask = torch.tensor([[int(c) for c in row] for row in rows])
    if choices is not None:
        mask = mask[:, None].expand(-1, choices, -1).contiguous()
    ids = torch.randint(1, config.vocab_size, mask.shape).masked_fill(mask == 0, PAD)
    ids[..., 0, 1] = PAD
    inputs = dict(input_ids=ids, attention_mask=mask)
    if uses_token_types(config):
        inputs["token_type_ids"] = torch.randint(0, config.type_vocab_size, mask.shape)
    return inputs


def labels_for(name, config, inputs):
    """Labels for a task model's loss by the name of its class; token labels ignore padding (its
    hidden states are zeros under unpadding), Hugging Face's ElectraForPreTraining ignores it itself."""
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    batch, seqlen = ids.shape[0], ids.shape[-1]
    on_real = lambda labels: labels.masked_fill(~real, -100)
    for suffix, labels in (
        ("PreTraining", lambda: dict(labels=torch.randint(0, 2, ids.shape))),
        ("MaskedLM", lambda: dict(labels=on_real(torch.where(torch.rand(ids.shape) < 0.4, ids, -100)))),
        ("SequenceClassification", lambda: dict(labels=torch.randint(0, config.num_labels, (batch,)))),
        ("TokenClassification", lambda: dict(labels=on_real(torch.randint(0, config.num_labels, ids.shape)))),
        ("QuestionAnswering", lambda: dict(start_positions=torch.randint(0, seqlen, (batch,)),
                                           end_positions=torch.randint(0, seqlen, (batch,)))),
        ("MultipleChoice", lambda: dict(labels=torch.randint(0, ids.shape[1], (batch,)))),
    ):
        if name.endswith(suffix):
            return labels()
    return {}


def on_real_positions(value, real):
    """A per-token field ([B, S, ...]; with choices [B, C, S, ...] or the encoder's [B·C, S, ...]) at
    the real positions only, zeros elsewhere; per-sequence fields as they are."""
    if isinstance(value, tuple):
        return tuple(on_real_positions(v, real) for v in value)
    for mask in (real, real.flatten(0, 1)):  # with choices, the encoder's outputs are [B·C, S, ...]
        if value is not None and value.dim() >= mask.dim() and value.shape[:mask.dim()] == mask.shape:
            return value * mask.reshape(mask.shape + (1,) * (value.dim() - mask.dim())).to(value.dtype)
    return value


def padding_free_outputs(output, real):
    return {key: on_real_positions(output[key], real) for key in output.keys()}


def projection_loss(fields, projections):
    """A random projection of every output tensor (the bare encoders have no loss)."""
    total = 0
    for key, value in fields.items():
        for i, tensor in enumerate(value if isinstance(value, tuple) else (value,)):
            if tensor is not None and tensor.is_floating_point() and tensor.dim():
                projection = projections.setdefault((key, i), torch.randn(tensor.shape))
                total = total + (tensor * projection).sum()
    return total


@pytest.fixture
def packed_runs(monkeypatch):
    """For each forward of the families' encoders: True where it ran padding-free."""
    runs = []
    for module in (distilbert, electra):
        gather = module.gather_tokens
        monkeypatch.setattr(module, "gather_tokens", lambda h, packing, gather=gather: runs.append(
            packing is not None) or gather(h, packing))
    return runs


def assert_grads_as_close_to_float64_as_hugging_faces(ours, reference, exact, what):
    """test_bert.assert_same_grads's tolerance (FP32_TOL of the largest gradient, rtol 1e-4), against
    float64; where Hugging Face's own fp32 gradients are further off than that (measured: up to
    1.3e-5 of the largest, through ELECTRA's token classifier), twice Hugging Face's distance."""
    exact_grads = {name: p.grad for name, p in exact.named_parameters()}
    assert all(p.grad is not None for p in ours.parameters()), f"{what}: every parameter should get a gradient"
    scale = max(grad.abs().max().item() for grad in exact_grads.values())
    their_distance = max((p.grad.double() - exact_grads[name]).abs().max().item() for name, p in
                         reference.named_parameters())
    atol = max(FP32_TOL * scale, 2 * their_distance)
    for name, param in ours.named_parameters():
        assert_close(param.grad, exact_grads[name], atol=atol, rtol=1e-4, what=f"{what}: grad of {name}")


def check_family_parity(reference, ours, config, rows, unpad, backend, kernel_launches, packed_runs):  # noqa: F811
    """Ours (unpad as given) against Hugging Face on a batch with the given padding: every output
    field (with labels and hidden states) and every parameter's gradient. Where the batch runs
    padding-free, per-token fields are compared at the real positions (padding holds zeros there),
    and the loss, which QA's spans would take over padding too, is left out; otherwise everything is
    compared, then the attention probabilities. Gradients are measured against float64."""
    name = type(reference).__name__
    ours.unpad = unpad
    inputs = batch_from_rows(config, rows, choices=2 if name.endswith("MultipleChoice") else None)
    real = inputs["attention_mask"].bool()
    labels = labels_for(name, config, inputs)
    padding_free = unpad is True and all(row[0] == "1" for row in rows)
    if padding_free and name.endswith("QuestionAnswering"):
        labels = {}
    exact = copy.deepcopy(reference).double()
    projections, outputs = {}, {}
    for key, model in (("ours", ours), ("reference", reference), ("exact", exact)):
        model.train()  # dropout is 0: train mode only makes sure nothing depends on it
        output = model(**inputs, **labels, output_hidden_states=True)
        fields = padding_free_outputs(output, real) if padding_free else {k: output[k] for k in output.keys()}
        outputs[key] = fields
        (fields["loss"] if "loss" in fields else projection_loss(fields, projections)).backward()
    what = f"{name} ({backend}, unpad={unpad})"
    assert outputs["ours"].keys() == outputs["reference"].keys(), what
    for key, value in outputs["reference"].items():
        assert_same_values(outputs["ours"][key], value, FP32_TOL, f"{what} {key}")
    assert_grads_as_close_to_float64_as_hugging_faces(ours, reference, exact, what)
    assert packed_runs[0] is padding_free, f"{what}: ran padding-free {packed_runs[0]}, expected {padding_free}"
    if backend == "triton":
        assert FORWARD_KERNELS | BACKWARD_KERNELS <= set(kernel_launches)
        assert ("_unpad_kernel" in kernel_launches) is padding_free
    if not padding_free:
        with torch.no_grad():
            with_attentions = [model.eval()(**inputs, **labels, output_attentions=True) for model in (ours, reference)]
        assert_same_outputs(*with_attentions, what=f"{what} with output_attentions")


@pytest.mark.parametrize("rows, unpad", [(RAGGED, False), (RAGGED, True), (RIGHT_PADDED, True)],
                         ids=["padded", "left-padded, unpad=True", "padding-free"])
@pytest.mark.parametrize("hf_class, our_class", DISTILBERT_TASKS, ids=[ours.__name__ for _, ours in DISTILBERT_TASKS])
def test_matches_transformers(hf_class, our_class, rows, unpad, backend, kernel_launches, packed_runs):  # noqa: F811
    config = distilbert_config()
    reference, ours = twin_models(hf_class, our_class, config)
    check_family_parity(reference, ours, config, rows, unpad, backend, kernel_launches, packed_runs)


@pytest.mark.parametrize("rows, unpad", [(RAGGED, "auto"), (RIGHT_PADDED, True)], ids=["auto", "padding-free"])
@pytest.mark.parametrize("hf_class", [hf for hf, _ in DISTILBERT_TASKS], ids=lambda c: c.__name__)
def test_optimized_model_matches_untouched_copy(hf_class, rows, unpad, backend, kernel_launches,  # noqa: F811
                                                packed_runs):
    config = distilbert_config()
    reference = randomize(hf_class(config))
    model = copy.deepcopy(reference)
    parameters_before = {name: id(p) for name, p in model.named_parameters()}
    optimized = fastencoder.optimize(model)
    encoder = optimized if hf_class is transformers.DistilBertModel else optimized.distilbert
    assert type(encoder) is models.DistilBertModel
    assert {name: id(p) for name, p in optimized.named_parameters()} == parameters_before
    check_family_parity(reference, optimized, config, rows, unpad, backend, kernel_launches, packed_runs)
    restored = fastencoder.restore(optimized)
    encoder = restored if hf_class is transformers.DistilBertModel else restored.distilbert
    assert type(encoder) is transformers.DistilBertModel


def test_task_models_keep_transformers_heads_and_ties():
    for hf_class, our_class in DISTILBERT_TASKS[1:]:
        model = our_class(distilbert_config())
        assert isinstance(model, hf_class) and type(model.distilbert) is models.DistilBertModel
        assert model.state_dict().keys() == hf_class(distilbert_config()).state_dict().keys()
    model = models.DistilBertForMaskedLM(distilbert_config())
    assert model.vocab_projector.weight is model.distilbert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("activation, fused", [("gelu", "gelu"), ("relu", "relu")])
def test_activations_and_sinusoidal_positions_match_transformers(activation, fused, torch_backend):
    """`activation` maps to the fused linear's; the sinusoidal table is Hugging Face's (its init)."""
    config = distilbert_config(activation=activation, sinusoidal_pos_embds=True)
    ours = models.DistilBertModel(config)
    assert ours.transformer.layer[0].ffn.activation == fused
    hf = transformers.DistilBertModel(config)
    table = ours.embeddings.position_embeddings.weight
    torch.testing.assert_close(table, hf.embeddings.position_embeddings.weight, rtol=0, atol=0)
    assert torch.equal(table[0, 1::2], torch.ones(16)) and table[3, 0].item() == pytest.approx(0.14112, abs=1e-5)
    reference, ours = (model.eval() for model in twin_models(transformers.DistilBertModel, models.DistilBertModel,
                                                              config))
    inputs = batch_from_rows(config, RAGGED)
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), reference(**inputs), what=activation)


def test_alternative_inputs_match_transformers(backend):  # noqa: F811
    """inputs_embeds instead of input_ids, explicit position_ids, no mask; return_dict=False tuples;
    token_type_ids, which DistilBERT has not, ignored as Hugging Face ignores them."""
    config = distilbert_config()
    reference, ours = (model.eval() for model in twin_models(transformers.DistilBertModel, models.DistilBertModel,
                                                              config))
    ids = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        for kwargs in (dict(input_ids=ids), dict(inputs_embeds=torch.randn(2, 7, 32)),
                       dict(input_ids=ids, position_ids=torch.randint(0, 16, (2, 7))),
                       dict(input_ids=ids, token_type_ids=torch.ones(2, 7, dtype=torch.long))):
            assert_same_outputs(ours(**kwargs), reference(**kwargs), what=str(list(kwargs)))
        expected = reference(ids, output_hidden_states=True, output_attentions=True, return_dict=False)
        actual = ours(ids, output_hidden_states=True, output_attentions=True, return_dict=False)
        assert_same_values(actual, expected, FP32_TOL, "tuple")


def test_attention_masks_3d_and_4d_match_transformers(backend):  # noqa: F811
    config = distilbert_config()
    reference, ours = (model.eval() for model in twin_models(transformers.DistilBertModel, models.DistilBertModel,
                                                              config))
    input_ids = torch.randint(0, config.vocab_size, (2, 9))
    keep = (torch.rand(2, 9, 9) < 0.6) | torch.eye(9, dtype=torch.bool)
    additive = torch.zeros(2, 1, 9, 9).masked_fill(~keep[:, None], torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=additive)
        for mask in (keep, keep[:, None], additive):
            assert_same_outputs(ours(input_ids, attention_mask=mask), expected, what=f"mask {tuple(mask.shape)}")


def test_training_step_matches_transformers(torch_backend):
    """One SGD step on the MLM loss with dropout off: same loss, gradients, and loss after the step."""
    config = distilbert_config()
    reference, ours = twin_models(transformers.DistilBertForMaskedLM, models.DistilBertForMaskedLM, config)
    inputs = batch_from_rows(config, RAGGED)
    labels = labels_for("MaskedLM", config, inputs)
    losses = {}
    for name, model in (("ours", ours), ("reference", reference)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = model(**inputs, **labels).loss
        loss.backward()
        optimizer.step()
        losses[name] = (loss.detach(), model(**inputs, **labels).loss.detach())
    assert_same_values(losses["ours"], losses["reference"], FP32_TOL, "losses before and after the step")
    assert losses["ours"][1] < losses["ours"][0]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5.2x renames it activation_checkpointing_enable
def test_gradient_checkpointing_recomputes(backend, monkeypatch):  # noqa: F811
    config = distilbert_config(dropout=0.1, attention_dropout=0.1)
    model = models.DistilBertForSequenceClassification(config)
    inputs = batch_from_rows(config, RAGGED)
    check_gradient_checkpointing(model, inputs, labels_for("SequenceClassification", config, inputs),
                                 config.n_layers, monkeypatch)


def test_dropout_only_in_training(torch_backend):
    config = distilbert_config(dropout=0.2, attention_dropout=0.2)
    reference, ours = twin_models(transformers.DistilBertModel, models.DistilBertModel, config)
    inputs = batch_from_rows(config, RAGGED)
    with torch.no_grad():
        first, second = (ours.train()(**inputs).last_hidden_state for _ in range(2))
        assert not torch.allclose(first, second), "dropout should draw new masks each call"
        assert_same_outputs(ours.eval()(**inputs), reference.eval()(**inputs), what="eval mode")


def test_half_precision(backend):  # noqa: F811
    config = distilbert_config()
    reference, ours = twin_models(transformers.DistilBertModel, models.DistilBertModel, config)
    ours.half().eval()
    inputs = batch_from_rows(config, RAGGED)
    with torch.no_grad():
        actual = ours(**inputs).last_hidden_state
        expected = reference.eval()(**inputs).last_hidden_state
    assert actual.dtype == torch.float16
    assert_same_values(actual.float(), expected, FP16_TOL, "fp16 last_hidden_state")


def test_save_and_load_round_trip(tmp_path, torch_backend):
    config = distilbert_config()
    model = models.DistilBertForMaskedLM(config).eval()
    inputs = batch_from_rows(config, RAGGED)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = models.DistilBertForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.vocab_projector.weight is loaded.distilbert.embeddings.word_embeddings.weight
    hf_loaded = transformers.DistilBertForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
        assert_close(hf_loaded(**inputs).logits, expected, atol=FP32_TOL, rtol=FP32_TOL, what="HF loading ours")
    encoder = models.DistilBertModel.from_pretrained(tmp_path, unpad=True).eval()
    assert encoder.unpad is True
    with torch.no_grad():
        torch.testing.assert_close(encoder(**inputs).last_hidden_state, loaded.distilbert(**inputs).last_hidden_state,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("overrides, match", [
    (dict(activation="silu"), "activation"),
    (dict(dim=30, n_heads=4), "n_heads"),
])
def test_unsupported_configs_are_refused(overrides, match):
    with pytest.raises((NotImplementedError, ValueError), match=match):
        models.DistilBertForSequenceClassification(distilbert_config(**overrides))
    model = transformers.DistilBertForSequenceClassification(distilbert_config())
    for name, value in overrides.items():
        setattr(model.config, name, value)  # as a checkpoint with that setting would load
    with pytest.raises((NotImplementedError, ValueError), match=match):
        fastencoder.optimize(model)
    assert type(model.distilbert) is transformers.DistilBertModel  # nothing was changed


def bad_inputs(config, embedding_size):
    ids = torch.randint(0, config.vocab_size, (2, 6))
    out_of_vocabulary = ids.clone()
    out_of_vocabulary[0, 2] = config.vocab_size
    return [
        (dict(input_ids=out_of_vocabulary), ValueError, f"vocab_size={config.vocab_size}"),
        (dict(input_ids=ids - 1 - ids.max()), ValueError, f"vocab_size={config.vocab_size}"),
        (dict(input_ids=ids, attention_mask=torch.ones(2, 5)), ValueError, r"\(2, 6\)"),
        (dict(input_ids=ids, attention_mask=torch.ones(3, 6)), ValueError, r"\(2, 6\)"),
        (dict(input_ids=torch.randint(0, 50, (2, 17))), ValueError, "max_position_embeddings=16"),
        (dict(input_ids=ids, position_ids=torch.full((2, 6), 16)), ValueError, "max_position_embeddings=16"),
        (dict(inputs_embeds=torch.randn(2, 6, embedding_size + 1)), ValueError,
         rf"inputs_embeds must be \[batch, sequence, {embedding_size}\]"),
        (dict(input_ids=ids, inputs_embeds=torch.randn(2, 6, embedding_size)), ValueError, "exactly one"),
        (dict(input_ids=ids.float()), TypeError, "integer"),
        (dict(input_ids=ids, head_mask=torch.ones(2, 2)), ValueError, "head_mask"),
    ]


def test_bad_inputs_are_refused_before_any_kernel(triton_backend, kernel_launches):
    config = distilbert_config()
    model = models.DistilBertForSequenceClassification(config)
    for kwargs, error, match in bad_inputs(config, config.dim):
        with pytest.raises(error, match=match):
            model(**kwargs)
    assert kernel_launches == []


def check_forward_arguments(ours, theirs, config):
    """Our forward takes every argument of the installed transformers' forward: the inputs
    positionally in the same order, the output flags by name."""
    mine, hf = inspect.signature(ours.forward).parameters, inspect.signature(theirs.forward).parameters
    positional = lambda params: [name for name, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional(mine)[:len(positional(hf))] == positional(hf)
    model = ours(config).eval()
    every_argument = {name: None for name in positional(hf) if name != "self"}
    with torch.no_grad():
        output = model(**dict(every_argument, input_ids=torch.randint(0, config.vocab_size, (2, 5))),
                       output_attentions=False, output_hidden_states=False, return_dict=True)
    assert output.last_hidden_state.shape == (2, 5, config.hidden_size)


def check_hidden_states_selected_by_index(hf_class, our_class, config):
    """output_hidden_states as layer indices: the same entries as Hugging Face's, the others None."""
    try:
        from transformers.utils.output_capturing import selected_hidden_states  # noqa: F401
    except ImportError:
        pytest.skip("transformers before 5.2x selects no hidden states by index")
    reference, ours = (model.eval() for model in twin_models(hf_class, our_class, config))
    inputs = batch_from_rows(config, RAGGED)
    with torch.no_grad():
        for selection in ([0, -1], 1):
            expected = reference(**inputs, output_hidden_states=selection)
            actual = ours(**inputs, output_hidden_states=selection)
            assert [h is None for h in actual.hidden_states] == [h is None for h in expected.hidden_states]
            assert_same_outputs(actual, expected, what=f"output_hidden_states={selection}")


def test_hidden_states_selected_by_index(torch_backend):
    check_hidden_states_selected_by_index(transformers.DistilBertModel, models.DistilBertModel, distilbert_config())


def test_forward_takes_hugging_faces_arguments(torch_backend):
    check_forward_arguments(models.DistilBertModel, transformers.DistilBertModel, distilbert_config())


def check_peft_lora(hf_class, config, target_modules):
    """LoRA adapters (random, not peft's zero lora_B) on an optimised model and on Hugging Face's:
    the same outputs and loss, and the adapters' gradients."""
    peft = pytest.importorskip("peft", reason="peft is in the test extras")
    reference = randomize(hf_class(config))
    ours = fastencoder.optimize(copy.deepcopy(reference))
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules)
    reference, ours = (peft.get_peft_model(model, peft.LoraConfig(**lora)) for model in (reference, ours))
    generator = torch.Generator().manual_seed(1)
    values = {}
    with torch.no_grad():
        for model in (reference, ours):
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(values.setdefault(name, torch.randn(param.shape, generator=generator) / 4))
    encoder = getattr(ours.get_base_model(), ours.get_base_model().base_model_prefix)
    assert type(encoder).__module__.startswith("fastencoder")
    inputs = batch_from_rows(config, RAGGED)
    labels = labels_for(hf_class.__name__, config, inputs)
    expected, actual = reference(**inputs, **labels), ours(**inputs, **labels)
    assert_same_outputs(actual, expected, what="LoRA forward")
    expected.loss.backward(), actual.loss.backward()
    reference_grads = {name: p.grad for name, p in reference.named_parameters() if "lora_" in name}
    largest = max(grad.abs().max().item() for grad in reference_grads.values())
    for name, param in ours.named_parameters():
        if "lora_" in name:
            # test_works_with.py's bound: Hugging Face's own fp32 adapter gradients are off by 2e-5
            assert_close(param.grad, reference_grads[name], atol=5e-5 * largest, rtol=FP32_TOL, what=name)


def test_peft_lora_matches_hugging_face_with_peft(backend):  # noqa: F811
    check_peft_lora(transformers.DistilBertForSequenceClassification, distilbert_config(),
                    ["q_lin", "k_lin", "v_lin", "out_lin", "lin1"])


def test_hooks_fire_with_hugging_faces_tensors_and_quantized_modules_are_called(torch_backend):
    config = distilbert_config()
    reference = randomize(transformers.DistilBertModel(config)).eval()
    ours = fastencoder.optimize(copy.deepcopy(reference)).eval()
    inputs = batch_from_rows(config, RIGHT_PADDED)
    seen = {}

    def recorder(name):
        def hook(module, args, output):
            seen[name] = (args[0].clone(), output.clone())
        return hook

    for name, model in (("reference", reference), ("ours", ours)):
        model.transformer.layer[1].ffn.register_forward_hook(recorder(name))
    ours.unpad = True  # hooks inside the encoder run it padded, with Hugging Face's shapes
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), reference(**inputs), what="with a hook")
    assert_same_values(seen["ours"], seen["reference"], FP32_TOL, "the hook's input and output")
    with pytest.raises(NotImplementedError, match="attention"):
        ours.transformer.layer[0].attention.register_forward_hook(lambda *args: None)
        ours(**inputs)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(reference), {torch.nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        expected = quantized(**inputs).last_hidden_state
        actual = fastencoder.optimize(quantized)(**inputs).last_hidden_state
    assert_same_values(actual, expected, FP32_TOL, "dynamically quantised Linears are called")


def check_fullgraph_compile(hf_class, our_class, config):
    """torch.compile(fullgraph=True, backend="aot_eager"), as test_compile.py: training outputs,
    gradients and eval outputs equal Hugging Face's."""
    reference, ours = twin_models(hf_class, our_class, config)
    ours.unpad = True  # asked for, but T is data dependent: the compiled graph runs the padded path
    inputs = batch_from_rows(config, RAGGED)
    labels = labels_for(hf_class.__name__, config, inputs)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    outputs = {}
    for key, model in (("ours", compiled), ("reference", reference)):
        outputs[key] = model.train()(**inputs, **labels)
        outputs[key].loss.backward()
    assert_same_outputs(outputs["ours"], outputs["reference"], what="compiled")
    assert_same_grads(ours, reference)
    with torch.no_grad():
        assert_same_outputs(compiled.eval()(**inputs), reference.eval()(**inputs), what="compiled, eval")


@pytest.mark.usefixtures("fresh_dynamo")
def test_fullgraph_compile_matches_transformers(backend):  # noqa: F811
    check_fullgraph_compile(transformers.DistilBertForSequenceClassification,
                            models.DistilBertForSequenceClassification, distilbert_config())


def check_fp16_autocast_error(hf_class, our_class, config):
    """test_autocast's rule on the CPU, fp16 autocast: against Hugging Face in fp32 without autocast,
    our error (outputs at real tokens, every parameter's gradient; norms) under autocast is at most
    twice Hugging Face's own under the same autocast, plus 1e-4."""
    exact = randomize(hf_class(config))
    theirs, ours = hf_class(config), our_class(config)
    theirs.load_state_dict(exact.state_dict()), ours.load_state_dict(exact.state_dict())
    inputs = batch_from_rows(config, RAGGED)
    real = inputs["attention_mask"].bool()
    projection = torch.randn_like(exact(**inputs).last_hidden_state[real])
    found = {}
    for name, model in (("exact", exact), ("theirs", theirs), ("ours", ours)):
        with torch.autocast("cpu", dtype=torch.float16, enabled=name != "exact"):
            output = model.train()(**inputs).last_hidden_state[real].float()
        (output * projection).sum().backward()
        # a pooler, which the loss does not reach, has no gradients (in either model)
        gradients = torch.cat([param.grad.float().flatten() for _, param in sorted(model.named_parameters())
                               if param.grad is not None])
        found[name] = dict(output=output, gradients=gradients)
    for what, reference in found["exact"].items():
        error = {name: ((found[name][what] - reference).norm() / reference.norm()).item()
                 for name in ("theirs", "ours")}
        assert error["theirs"] > 1e-5, f"{what}: autocast should change Hugging Face's results ({error})"
        assert error["ours"] <= 2 * error["theirs"] + 1e-4, (what, error)


def test_fp16_autocast_error_at_most_twice_hugging_faces(backend):  # noqa: F811
    check_fp16_autocast_error(transformers.DistilBertModel, models.DistilBertModel, distilbert_config())


class SimulatedFieldsGraph(SimulatedGraph):
    """test_cuda_graphs' simulated graph for any output class (every field rewritten on replay)."""

    def replay(self):
        with as_if_capturing(self.monkeypatch), torch.inference_mode():
            fresh = self.forward()
            for key in self.output.keys():
                self.output[key].copy_(fresh[key])


@pytest.fixture
def simulated_captures(monkeypatch):
    graphs = []

    def simulated_capture(forward, device, pool):
        forward()  # the warm-up, which runs outside the capture
        graphs.append(SimulatedFieldsGraph(forward, pool, monkeypatch))
        return graphs[-1], graphs[-1].output, 1000

    monkeypatch.setattr(cuda_graphs, "capture", simulated_capture)
    monkeypatch.setattr(cuda_graphs, "can_capture", lambda device: True)
    return graphs


def check_simulated_cuda_graph_replay(model, config):
    """A replayed (simulated) graph gives the eager output on the real positions, in the family's
    output class."""
    model.eval().cuda_graphs = True
    inputs = batch_from_rows(config, RIGHT_PADDED)
    with torch.inference_mode():
        replayed = model(**inputs)
        assert model.cuda_graph_runner.fallback_reason is None and len(model.cuda_graph_runner.graphs) == 1
        eager = eager_output(model, inputs)
    assert type(replayed) is type(eager) and replayed.keys() == eager.keys()
    real = inputs["attention_mask"].bool()
    assert_same_values(replayed.last_hidden_state[real], eager.last_hidden_state[real], FP32_TOL, "replayed")


def test_simulated_cuda_graph_replay_matches_eager(torch_backend, simulated_captures):
    config = distilbert_config()
    check_simulated_cuda_graph_replay(models.DistilBertModel(config), config)


def check_16_bit_last_hidden_state(hf_class, our_class, config, dtype, unpad):
    """test_bert.check_16_bit_against_transformers for families without a pooler: on the GPU, on a
    ragged batch, the distance of last_hidden_state (real positions) and of the parameter gradients
    to Hugging Face in fp32 is at most twice Hugging Face's own in the same 16-bit dtype, plus 1e-4."""
    exact = randomize(hf_class(config)).cuda()
    theirs = hf_class(config).cuda()
    theirs.load_state_dict(exact.state_dict())
    ours = our_class(config, unpad=unpad).cuda()
    ours.load_state_dict(exact.state_dict())
    theirs.to(dtype), ours.to(dtype)
    rows = ["1" * 128] + ["1" * n + "0" * (128 - n) for n in (100, 77, 64, 33, 17, 5, 1)]
    inputs = {name: value.cuda() for name, value in batch_from_rows(config, rows).items()}
    real = inputs["attention_mask"].bool()
    projection = torch.randn_like(exact(**inputs).last_hidden_state[real])
    found = {}
    for name, model in (("exact", exact), ("theirs", theirs), ("ours", ours)):
        last = model.train()(**inputs).last_hidden_state[real].float()  # dropout 0: train mode for the backward
        (last * projection).sum().backward()
        # a pooler, which the loss does not reach, has no gradients (in either model)
        gradients = torch.cat([param.grad.float().flatten() for _, param in sorted(model.named_parameters())
                               if param.grad is not None])
        found[name] = dict(last_hidden_state=last, gradients=gradients)
    for what, reference in found["exact"].items():
        error = {name: (found[name][what] - reference).norm() / reference.norm() for name in ("theirs", "ours")}
        assert error["ours"] <= 2 * error["theirs"] + 1e-4, (what, error)


@pytest.mark.gpu
@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_16_bit_error_at_most_twice_hugging_faces(dtype, unpad, triton_backend):
    """Two DistilBERT-base-sized layers: see check_16_bit_last_hidden_state."""
    config = distilbert_config(vocab_size=1000, dim=768, n_heads=12, hidden_dim=3072, max_position_embeddings=512,
                               attn_implementation="sdpa")
    check_16_bit_last_hidden_state(transformers.DistilBertModel, models.DistilBertModel, config, dtype, unpad)
