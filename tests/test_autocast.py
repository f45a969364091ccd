"""Mixed precision: under torch.autocast the encoder computes in the autocast dtype (GEMMs and
attention in 16-bit, LayerNorm statistics in fp32), its fp32 weights cast where they are used and
never modified, gradients reaching them in fp32.

The error rule is FlashAttention's (and check_16_bit_against_transformers's): against an fp32
reference, fastencoder's error under autocast is at most twice Hugging Face's own under the same
autocast, plus 1e-4. On the CPU it runs fp16 autocast with the real kernels in the interpreter
(whose bf16 dot products are unreliable) and on the PyTorch path; on a GPU fp16 and bf16.
"""
import pytest
import torch
import transformers
from test_albert import albert_config
from test_bert import bert_config, ragged_batch, randomize

import fastencoder
from fastencoder import models

BACKENDS = ("torch", "triton")
# what the kernels get under fp16 autocast: every matmul-class launch sees 16-bit operands
SIXTEEN_BIT_KERNELS = {"_linear_kernel", "_attention_fwd_kernel", "_attention_bwd_dkdv_kernel",
                       "_attention_bwd_dq_kernel"}


@pytest.fixture(params=BACKENDS)
def backend(request):
    request.getfixturevalue(f"{request.param}_backend")
    return request.param


def errors_under_autocast(hf_class, our_class, config, device, dtype, batch=3, seqlen=10):
    """Relative error (norm) to Hugging Face in fp32 without autocast of Hugging Face and of
    fastencoder under autocast: outputs at real tokens and every parameter's gradient."""
    exact = randomize(hf_class(config)).to(device)
    theirs = hf_class(config).to(device)
    theirs.load_state_dict(exact.state_dict())
    ours = our_class(config).to(device)
    ours.load_state_dict(exact.state_dict())
    inputs = {name: value.to(device) for name, value in ragged_batch(config, batch, seqlen).items()}
    real = inputs["attention_mask"].bool()
    projection = torch.randn_like(exact(**inputs).last_hidden_state[real])
    found = {}
    for name, model in (("exact", exact), ("theirs", theirs), ("ours", ours)):
        with torch.autocast(device.type, dtype=dtype, enabled=name != "exact"):
            output = model.train()(**inputs).last_hidden_state[real].float()  # dropout 0: train mode for the backward
        (output * projection).sum().backward()
        gradients = torch.cat([param.grad.float().flatten() for _, param in sorted(model.named_parameters())
                               if not _.startswith("pooler")])  # the pooler is not in the loss
        found[name] = dict(output=output, gradients=gradients)
    return {what: {name: ((found[name][what] - reference).norm() / reference.norm()).item()
                   for name in ("theirs", "ours")}
            for what, reference in found["exact"].items()}


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_fp16_autocast_error_at_most_twice_hugging_faces(family, backend):
    config = bert_config() if family == "bert" else albert_config()
    classes = {"bert": (transformers.BertModel, models.BertModel),
               "albert": (transformers.AlbertModel, models.AlbertModel)}[family]
    errors = errors_under_autocast(*classes, config, torch.device("cpu"), torch.float16)
    for what, error in errors.items():
        assert error["theirs"] > 1e-5, f"{what}: autocast should change Hugging Face's results ({error})"
        assert error["ours"] <= 2 * error["theirs"] + 1e-4, (what, error)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_autocast_error_at_most_twice_hugging_faces(dtype, triton_backend):
    """Two BERT-base-sized layers under autocast on the GPU: see errors_under_autocast."""
    config = bert_config(vocab_size=1000, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                         max_position_embeddings=512, attn_implementation="sdpa")
    errors = errors_under_autocast(transformers.BertModel, models.BertModel, config, torch.device("cuda"), dtype,
                                   batch=8, seqlen=128)
    for what, error in errors.items():
        assert error["ours"] <= 2 * error["theirs"] + 1e-4, (what, error)


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


def test_outputs_take_hugging_faces_dtypes_under_autocast(torch_backend):
    """Hidden states in the weights' dtype (Hugging Face's LayerNorms give fp32 under autocast),
    the pooler output in the autocast dtype (a Linear and tanh)."""
    config = bert_config()
    reference, ours = (cls(config).eval() for cls in (transformers.BertModel, models.BertModel))
    inputs = ragged_batch(config)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(**inputs, output_hidden_states=True)
        actual = ours(**inputs, output_hidden_states=True)
    assert actual.last_hidden_state.dtype == expected.last_hidden_state.dtype == torch.float32
    assert actual.pooler_output.dtype == expected.pooler_output.dtype == torch.bfloat16
    assert [h.dtype for h in actual.hidden_states] == [h.dtype for h in expected.hidden_states]


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
