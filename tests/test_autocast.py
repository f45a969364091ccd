"""Mixed precision: under torch.autocast the encoder computes as Hugging Face's does: GEMMs and
attention on 16-bit operands, LayerNorm in fp32, the residual stream in Hugging Face's dtype (fp32
for BERT, whose residual adds promote to fp32), its fp32 weights cast where they are used and never
modified, gradients reaching them in fp32.

The error rule is FlashAttention's: against Hugging Face's model in fp32, fastencoder's error under
autocast is at most twice Hugging Face's own under the same autocast, for the last hidden state
and for every parameter's gradient, over two seeds and two weight scales. On the CPU: bf16 and
fp16 on the PyTorch path, fp16 on the real kernels in the interpreter (whose bf16 dot products are
wrong); on a GPU fp16 and bf16 on the kernels.
"""
import pytest
import torch
import transformers
from test_albert import albert_config
from test_bert import bert_config, ragged_batch, randomize

import fastencoder
from fastencoder import models

# what the kernels get under fp16 autocast: every matmul-class launch sees 16-bit operands
SIXTEEN_BIT_KERNELS = {"_linear_kernel", "_attention_fwd_kernel", "_attention_bwd_dkdv_kernel",
                       "_attention_bwd_dq_kernel"}


SEEDS = (0, 1)
WEIGHT_SCALES = (0.08, 0.04)
FAMILIES = {"bert": (transformers.BertModel, models.BertModel),
            "albert": (transformers.AlbertModel, models.AlbertModel)}


def autocast_config(family, layers, **overrides):
    """Hidden 64 (two heads of 32), SDPA as Hugging Face runs by default."""
    sizes = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=layers,
                 max_position_embeddings=64, attn_implementation="sdpa")
    sizes.update(overrides)
    return bert_config(**sizes) if family == "bert" else albert_config(num_hidden_groups=1, inner_group_num=1, **sizes)


def scaled_weights(model, scale, seed):
    """Every weight and bias N(0, scale) (no bias is zero), LayerNorm weights 1 + N(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            norm_weight = name.endswith(("LayerNorm.weight", "layer_norm.weight"))
            param.copy_(1 + 0.1 * noise if norm_weight else scale * noise)
    return model


def relative_error(actual, expected):
    return ((actual.float() - expected).norm() / expected.norm()).item()


def compared_gradients(exact_grads):
    """Every parameter but the key biases, whose gradient is zero in exact arithmetic (softmax does
    not change when each query's scores shift by one constant): fp32's is rounding noise there."""
    return {name: grad for name, grad in exact_grads.items() if not name.endswith("key.bias")}


def run_under_autocast(hf_class, our_class, config, device, dtype, scale, seed, seqlen):
    """Hugging Face's model in fp32 without autocast (the reference), Hugging Face's and
    fastencoder's under autocast, on one full row and one padded to half its length, in train mode
    (dropout 0) for the backward of loss = <last hidden state at real positions, P> + <pooler output, Q>
    (P, Q fixed random). Returns {model: (output, {parameter name: gradient})}."""
    exact = scaled_weights(hf_class(config), scale, seed).to(device)
    theirs = hf_class(config).to(device)
    theirs.load_state_dict(exact.state_dict())
    ours = our_class(config).to(device)
    ours.load_state_dict(exact.state_dict())
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (2, seqlen), generator=generator).to(device)
    attention_mask = torch.ones(2, seqlen, dtype=torch.long, device=device)
    attention_mask[1, seqlen // 2:] = 0
    real = attention_mask.bool()
    weights = (torch.randn(int(real.sum()), config.hidden_size, generator=generator).to(device),
               torch.randn(2, config.hidden_size, generator=generator).to(device))
    found = {}
    for name, model in (("exact", exact), ("theirs", theirs), ("ours", ours)):
        with torch.autocast(device.type, dtype=dtype, enabled=name != "exact"):
            output = model.train()(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        loss = (output.last_hidden_state[real].float() * weights[0]).sum() + (
            output.pooler_output.float() * weights[1]).sum()
        loss.backward()
        found[name] = (output, {param_name: param.grad for param_name, param in model.named_parameters()})
    return found, real


def assert_within_twice_hugging_faces_error(found, real):
    """Against fp32 Hugging Face: max error of last_hidden_state at real positions, and per parameter
    the relative error of its gradient (|g - g_fp32| / |g_fp32|, Frobenius norms: a max over a
    gradient is set by a few 16-bit roundings of the same size in both models, whose ratio is
    chance), fastencoder's at most twice Hugging Face's under the same autocast. Every output and
    gradient in Hugging Face's dtype."""
    (exact, exact_grads), (theirs, their_grads), (ours, our_grads) = found["exact"], found["theirs"], found["ours"]
    reference = exact.last_hidden_state[real]
    their_error = (theirs.last_hidden_state[real].float() - reference).abs().max().item()
    our_error = (ours.last_hidden_state[real].float() - reference).abs().max().item()
    assert their_error > 0, "autocast should change Hugging Face's output"
    assert our_error <= 2 * their_error, f"last_hidden_state: ours {our_error:.3g}, Hugging Face's {their_error:.3g}"
    assert ours.last_hidden_state.dtype == theirs.last_hidden_state.dtype
    assert ours.pooler_output.dtype == theirs.pooler_output.dtype
    assert [h.dtype for h in ours.hidden_states] == [h.dtype for h in theirs.hidden_states]
    assert our_grads.keys() == their_grads.keys()
    for name in exact_grads:
        assert our_grads[name].dtype == their_grads[name].dtype == torch.float32, name
    worse = {}
    for name, expected in compared_gradients(exact_grads).items():
        errors = relative_error(their_grads[name], expected), relative_error(our_grads[name], expected)
        if errors[1] > 2 * errors[0]:
            worse[name] = errors
    assert not worse, f"gradients' relative error (Hugging Face's, ours): {worse}"


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_on_the_torch_path_within_twice_hugging_faces_error(dtype, family, seed, scale, torch_backend):
    """Three layers on the PyTorch path (the interpreter's bf16 dot products are wrong: bf16 on
    the kernels is the gpu-marked test)."""
    found, real = run_under_autocast(*FAMILIES[family], autocast_config(family, layers=3), torch.device("cpu"),
                                     dtype, scale, seed, seqlen=12)
    assert_within_twice_hugging_faces_error(found, real)


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_autocast_on_the_kernels_within_twice_hugging_faces_error(family, seed, scale, triton_backend):
    """Two layers on the kernels in the interpreter; 20 tokens cross the attention's 16-row block."""
    found, real = run_under_autocast(*FAMILIES[family], autocast_config(family, layers=2), torch.device("cpu"),
                                     torch.float16, scale, seed, seqlen=20)
    assert_within_twice_hugging_faces_error(found, real)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", WEIGHT_SCALES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_autocast_on_the_kernels_within_twice_hugging_faces_error(dtype, family, seed, scale, triton_backend):
    """Two BERT-base-sized layers (hidden 768, 12 heads) on the kernels on the GPU, 200 tokens."""
    config = autocast_config(family, layers=2, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                             vocab_size=1000, max_position_embeddings=512)
    found, real = run_under_autocast(*FAMILIES[family], config, torch.device("cuda"), dtype, scale, seed,
                                     seqlen=200)
    assert_within_twice_hugging_faces_error(found, real)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_model_under_autocast_matches_eager(family, triton_backend):
    """torch.compile(fullgraph) under fp16 autocast: the LayerNorm op's fake functions give the
    mixed dtypes (16-bit branch, fp32 stream) their promoted output and each input's gradient dtype,
    and the compiled model computes what the eager one does (same ops, same roundings: 1e-5)."""
    config = autocast_config(family, layers=2)
    eager = scaled_weights(FAMILIES[family][1](config, unpad=False), 0.08, seed=0).train()
    compiled_model = FAMILIES[family][1](config, unpad=False).train()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    inputs = ragged_batch(config)
    results = []
    for model, parameters in ((eager, eager), (compiled, compiled_model)):
        with torch.autocast("cpu", dtype=torch.float16):
            output = model(**inputs)
        (output.last_hidden_state.float().sum() + output.pooler_output.float().sum()).backward()
        results.append((output, {name: param.grad for name, param in parameters.named_parameters()}))
    (expected, expected_grads), (actual, actual_grads) = results
    for field in ("last_hidden_state", "pooler_output"):
        assert actual[field].dtype == expected[field].dtype, field
        torch.testing.assert_close(actual[field], expected[field], atol=1e-5, rtol=1e-5, msg=field)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_autocast_launches_16_bit_kernels_and_leaves_weights_alone(triton_backend, monkeypatch):
    """Forward and backward under fp16 autocast: every matmul-class kernel gets fp16 operands, the
    weights stay fp32 and unchanged, and their gradients are fp32."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    original = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        launches.append((self.fn.__name__, args[0].dtype))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    config = bert_config()
    model = randomize(models.BertForSequenceClassification(config)).train()
    weights = {name: param.detach().clone() for name, param in model.named_parameters()}
    inputs = ragged_batch(config)
    with torch.autocast("cpu", dtype=torch.float16):
        output = model(**inputs, labels=torch.tensor([0, 1, 1]))
    assert output.logits.dtype == torch.float16  # Hugging Face's head, under the same autocast
    output.loss.backward()
    launched = {name for name, _ in launches}
    assert SIXTEEN_BIT_KERNELS <= launched, launched
    wrong = {(name, dtype) for name, dtype in launches if name in SIXTEEN_BIT_KERNELS and dtype != torch.float16}
    assert not wrong, wrong
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param.detach(), weights[name]), name
        assert param.grad is not None and param.grad.dtype == torch.float32, name


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_take_hugging_faces_dtypes_under_autocast(family, unpad, torch_backend):
    """On the padded and the padding-free path, every output in Hugging Face's dtype: BERT's hidden
    states fp32 (its residual adds promote to fp32), ALBERT's in its mapping's 16-bit dtype on the
    CPU (there LayerNorm keeps its input's dtype under autocast), pooler outputs 16-bit (a Linear
    and tanh); with values within twice Hugging Face's error."""
    config = autocast_config(family, layers=2)
    exact = scaled_weights(FAMILIES[family][0](config), 0.08, seed=0).eval()
    theirs, ours = FAMILIES[family][0](config).eval(), FAMILIES[family][1](config, unpad=unpad).eval()
    theirs.load_state_dict(exact.state_dict())
    ours.load_state_dict(exact.state_dict())
    inputs = ragged_batch(config)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = exact(**inputs, output_hidden_states=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = theirs(**inputs, output_hidden_states=True)
            actual = ours(**inputs, output_hidden_states=True)
    stream = torch.float32 if family == "bert" else torch.bfloat16
    assert actual.last_hidden_state.dtype == expected.last_hidden_state.dtype == stream
    assert actual.pooler_output.dtype == expected.pooler_output.dtype == torch.bfloat16
    assert [h.dtype for h in actual.hidden_states] == [h.dtype for h in expected.hidden_states]
    for ours_h, theirs_h, exact_h in zip(actual.hidden_states, expected.hidden_states, reference.hidden_states):
        their_error = (theirs_h[real].float() - exact_h[real]).abs().max()
        # + 1e-6: fp32 roundings (BERT's embeddings, untouched by autocast, are summed in another order)
        assert (ours_h[real].float() - exact_h[real]).abs().max() <= 2 * their_error + 1e-6


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_probabilities_take_hugging_faces_dtype_under_autocast(family, padded, torch_backend):
    """output_attentions under bf16 autocast on the CPU: Hugging Face's probabilities are fp32 when
    its fp32 padding mask promotes the 16-bit scores, 16-bit without padding (the mask is dropped);
    fastencoder's in the same dtype, their error within twice Hugging Face's (+ 1e-3: a probability
    rounded to bf16 from fp32 scores, where Hugging Face's come from scores that are exact)."""
    config = autocast_config(family, layers=2, attn_implementation="eager")
    exact = scaled_weights(FAMILIES[family][0](config), 0.08, seed=0).eval()
    theirs, ours = FAMILIES[family][0](config).eval(), FAMILIES[family][1](config).eval()
    theirs.load_state_dict(exact.state_dict())
    ours.load_state_dict(exact.state_dict())
    inputs = ragged_batch(config)
    if not padded:
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    with torch.no_grad():
        reference = exact(**inputs, output_attentions=True).attentions
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = theirs(**inputs, output_attentions=True).attentions
            actual = ours(**inputs, output_attentions=True).attentions
    assert [a.dtype for a in actual] == [a.dtype for a in expected] == 2 * [torch.float32 if padded else torch.bfloat16]
    for ours_a, theirs_a, exact_a in zip(actual, expected, reference):
        their_error = (theirs_a.float() - exact_a).abs().max()
        assert (ours_a.float() - exact_a).abs().max() <= 2 * their_error + 1e-3


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gradient_checkpointing_enable's new name
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_under_autocast_recomputes_the_same_layers(family, torch_backend):
    """The recomputation in the backward runs under the forward's autocast: the same dtypes and
    roundings, so outputs and gradients equal those without checkpointing exactly."""
    config = autocast_config(family, layers=2)
    plain = scaled_weights(FAMILIES[family][1](config), 0.08, seed=0).train()
    checkpointed = FAMILIES[family][1](config).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.gradient_checkpointing_enable()
    inputs = ragged_batch(config)
    results = []
    for model in (plain, checkpointed):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(**inputs).last_hidden_state
        (output.float() * torch.linspace(-1, 1, output.shape[-1])).sum().backward()
        results.append((output, {name: param.grad for name, param in model.named_parameters()}))
    (output, grads), (checkpointed_output, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed_output, output, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_autocast_grad_scaler_training_loop(family, tmp_path, torch_backend):
    """The plain recipe: fp16 autocast + GradScaler + AdamW on fp32 weights. The loss is finite and
    falls, every trainable parameter gets a gradient, a checkpoint saves and reloads."""
    config = bert_config(vocab_size=40) if family == "bert" else albert_config(vocab_size=40)
    model_class = models.BertForSequenceClassification if family == "bert" else models.AlbertForSequenceClassification
    model = model_class(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    inputs = ragged_batch(config, batch=8)
    labels = (inputs["input_ids"][:, 0] % 2).long()  # learnable from the first token
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**inputs, labels=labels).loss
        scaler.scale(loss).backward()
        if not losses:
            missing = [name for name, param in model.named_parameters() if param.grad is None]
            assert not missing, missing
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.5 * losses[0], losses
    model.save_pretrained(tmp_path)
    reloaded = model_class.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model.eval()(**inputs).logits)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_trainer_mixed_precision(precision, tmp_path, triton_backend):
    """Hugging Face Trainer with fp16=True (GradScaler) or bf16=True on an optimised model."""
    config = bert_config(vocab_size=40)
    model = fastencoder.optimize(transformers.BertForSequenceClassification(config))
    inputs = ragged_batch(config, batch=16)
    labels = (inputs["input_ids"][:, 0] % 2).long()
    dataset = [dict(input_ids=inputs["input_ids"][i], attention_mask=inputs["attention_mask"][i], labels=labels[i])
               for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=15,
                                          learning_rate=3e-3, report_to=[], save_strategy="no", logging_steps=1,
                                          **{precision: True})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.5 * losses[0], losses
    assert all(param.dtype == torch.float32 for param in model.parameters())
    trainer.save_model(tmp_path / "final")
    reloaded = fastencoder.BertForSequenceClassification.from_pretrained(tmp_path / "final").cuda().eval()
    batch = {name: value.cuda() for name, value in inputs.items()}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model.eval()(**batch).logits)
