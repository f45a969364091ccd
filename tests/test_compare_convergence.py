"""Convergence, not just parity: a tiny BERT (MLM+NSP) and a tiny ALBERT (MLM+SOP) pretrained for
STEPS steps through `fastencoder compare`'s own data, optimiser and training step, dropout off,
once as the untouched Hugging Face models and once as fastencoder's models on the Triton kernels
(in the interpreter on a CPU), from the same initialisation and batches.

Two comparisons, because two free-running fp32 trainings are chaotic. Each step's loss and
gradients are a few ulps apart (the same math in another order: fused kernels, tiled reductions),
and Adam's steps, about the learning rate in size whatever the gradient's, carry such differences
along and can turn one on a gradient near zero into a step of the learning rate. Hugging Face
against itself with one reduction order changed (every batch's rows reversed) ends 1e-7 to 2e-7
apart over these steps on one machine; fastencoder against Hugging Face came 1.0e-5 apart on
another CPU with other math-library kernels. No per-step bound on free-running curves is both
tight and safe, so:

1. Along Hugging Face's trajectory, tightly: at every step fastencoder's model gets Hugging Face's
   weights of that step and must give its loss (relative RTOL_LOSS) and its clipped gradients
   (every tensor within RTOL_GRAD of the gradients' total norm). Same weights, same batch: only
   rounding separates them, a few ulps (measured, one and two threads: at most 1.8e-7 on the loss,
   2.3e-7 on the gradients), so the bounds leave a tenfold margin and more, and still catch the
   smallest real difference tried: BERT with "gelu_new" for "gelu" moves the loss by 8.8e-6 and the
   gradients by 1.6e-4. A missing residual, a wrong mask or an untied weight moves them by percents.
2. Free-running, loosely: fastencoder trained on its own learns as Hugging Face does, every step's
   loss within RTOL_CURVE of Hugging Face's (a hundred times the largest gap seen) and the loss
   falling. This is what catches a parameter the optimiser would not train (other parameter groups,
   a weight copied rather than shared).
"""
import pytest
import torch
import transformers

import fastencoder
from fastencoder.compare import corpus, pretraining_data, training

STEPS = 24
RTOL_LOSS = 2e-6
RTOL_GRAD = 1e-5
RTOL_CURVE = 1e-3
MAX_LENGTH = 16
BATCH = 2
LEARNING_RATE = 1e-2


def tiny_config(kind, vocab_size):
    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=MAX_LENGTH, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, attn_implementation="eager")
    if kind == "bert":
        return transformers.BertConfig(hidden_act="gelu", **common)
    return transformers.AlbertConfig(hidden_act="gelu_new", embedding_size=16, classifier_dropout_prob=0.0,
                                     **common)


MODELS = {  # (Hugging Face class, fastencoder class, objective, unpad: both layouts are exercised)
    "bert": (transformers.BertForPreTraining, fastencoder.BertForPreTraining, "mlm+nsp", True),
    "albert": (transformers.AlbertForPreTraining, fastencoder.AlbertForPreTraining, "mlm+sop", False),
}


@pytest.fixture(scope="module")
def corpus_data():
    documents = corpus.stdlib_documents(max_chars=30_000)
    tokenizer = corpus.train_tokenizer(documents, vocab_size=120)
    return pretraining_data.Vocabulary.of(tokenizer), pretraining_data.tokenize_documents(tokenizer, documents)


def pretraining_losses(model, batches, before_step=None):
    """Train `model` on `batches` with compare's step; `before_step()` runs at every step just before
    the optimiser applies the clipped gradients."""
    model.train()
    optimizer, schedule = training.optimizer_and_schedule(model, LEARNING_RATE, STEPS, warmup_share=0.1)
    if before_step is not None:
        optimizer.register_step_pre_hook(lambda *_: before_step())
    return [training.train_step(model, dict(batch), optimizer, schedule).item() for batch in batches]


def weights(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def clipped_loss_and_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), training.MAX_GRAD_NORM)
    return loss.item(), gradients(model)


@pytest.mark.parametrize("kind", MODELS)
def test_pretraining_converges_like_hugging_face(kind, corpus_data, triton_backend, kernel_launches):
    hf_class, fused_class, objective, unpad = MODELS[kind]
    vocabulary, documents = corpus_data
    pairs = pretraining_data.make_pairs(documents, MAX_LENGTH, objective, seed=0)
    batches = list(pretraining_data.pretraining_batches(pairs, vocabulary, objective, batch_size=BATCH, steps=STEPS))

    config = tiny_config(kind, vocabulary.size)
    torch.manual_seed(0)
    reference = hf_class(config)
    initial = weights(reference)
    fused = fused_class(config, unpad=unpad)

    # 1. along Hugging Face's trajectory: each step's weights, gradients and loss
    trajectory = []
    expected = pretraining_losses(reference, batches,
                                  before_step=lambda: trajectory.append((weights(reference), gradients(reference))))
    assert not kernel_launches
    for step, (batch, loss, (step_weights, step_gradients)) in enumerate(zip(batches, expected, trajectory)):
        fused.load_state_dict(step_weights)
        got_loss, got_gradients = clipped_loss_and_gradients(fused, dict(batch))
        assert abs(got_loss - loss) <= RTOL_LOSS * loss, f"{kind} step {step}: loss {got_loss} against {loss}"
        assert got_gradients.keys() == step_gradients.keys(), f"{kind}: other parameters have gradients"
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in step_gradients.values()])).item()
        worst = max(step_gradients, key=lambda name: (got_gradients[name] - step_gradients[name]).norm())
        gap = (got_gradients[worst] - step_gradients[worst]).norm().item()
        assert gap <= RTOL_GRAD * total, f"{kind} step {step}: {worst}'s gradient {gap:.1e} off (total norm {total:.2e})"
    kernels = {"_linear_kernel", "_attention_fwd_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel",
               "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel"} | ({"_unpad_kernel", "_pad_kernel"} if unpad else set())
    assert kernels <= set(kernel_launches), f"kernels that did not run: {kernels - set(kernel_launches)}"

    # 2. free-running: fastencoder trained on its own from the same start
    fused.load_state_dict(initial)
    fused.zero_grad(set_to_none=True)
    got = pretraining_losses(fused, batches)
    gap = ((torch.tensor(got) - torch.tensor(expected)).abs() / torch.tensor(expected)).max().item()
    assert gap <= RTOL_CURVE, f"{kind}: loss curves differ by {gap:.1e} (relative)\nfastencoder {got}\nHF {expected}"
    # a few MLM tokens per batch make single losses noisy: compare the first and last thirds
    third = STEPS // 3
    for losses in (expected, got):
        first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
        assert last < first - 0.3, f"{kind}: loss did not fall ({first:.3f} → {last:.3f}): {losses}"
