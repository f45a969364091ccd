"""Convergence, not just parity: a tiny BERT (MLM+NSP) and a tiny ALBERT (MLM+SOP) pretrained for
STEPS steps twice from the same initialisation and batches, once as fastencoder's models on the
Triton kernels (in the interpreter on a CPU) and once as the untouched Hugging Face models, through
`fastencoder compare`'s own data, optimiser and training step, dropout off.

Deterministic, and a tolerance from what fp32 training can promise. The two runs compute the same
fp32 math in a different order (fused kernels, tiled reductions), a few ulps apart per op; Adam's
steps, about the learning rate in size whatever the gradient's, carry such differences along (and,
on a gradient near zero, can turn one into a step of the learning rate). How far that takes two
loss curves over STEPS steps is measured on Hugging Face against itself with one reduction order
changed (every batch's rows reversed: the same losses and gradients, summed in another order):
1.0e-7 (BERT) and 2.1e-7 (ALBERT) at most, relative; fastencoder against Hugging Face: 1.9e-7 for
both. RTOL = 1e-5 at every step leaves a fiftyfold margin and still fails any real difference (a
missing residual, a wrong activation or mask moves the loss by percents at once).

The runs use one CPU thread (`one_thread`; the seeds are fixed): with several, a reduction's order
depends on how the work is split among the threads, which the math libraries may decide at run time
(two threads give other gaps here, 2.0e-7 and 2.2e-7; once, on a loaded machine and with the
per-tensor AdamW of then, ALBERT's curves came 1.1e-5 apart). On one thread every run gives the same
curves.
"""
import pytest
import torch
import transformers

import fastencoder
from fastencoder.compare import corpus, pretraining_data, training

STEPS = 24
RTOL = 1e-5
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


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pretraining_losses(model, batches):
    model.train()
    optimizer, schedule = training.optimizer_and_schedule(model, LEARNING_RATE, STEPS, warmup_share=0.1)
    return [training.train_step(model, dict(batch), optimizer, schedule).item() for batch in batches]


@pytest.mark.parametrize("kind", MODELS)
def test_pretraining_converges_like_hugging_face(kind, corpus_data, one_thread, triton_backend, kernel_launches):
    hf_class, fused_class, objective, unpad = MODELS[kind]
    vocabulary, documents = corpus_data
    pairs = pretraining_data.make_pairs(documents, MAX_LENGTH, objective, seed=0)
    batches = list(pretraining_data.pretraining_batches(pairs, vocabulary, objective, batch_size=BATCH, steps=STEPS))

    config = tiny_config(kind, vocabulary.size)
    torch.manual_seed(0)
    reference = hf_class(config)
    fused = fused_class(config, unpad=unpad)
    fused.load_state_dict(reference.state_dict())

    expected = pretraining_losses(reference, batches)
    assert not kernel_launches
    got = pretraining_losses(fused, batches)
    kernels = {"_linear_kernel", "_attention_fwd_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel",
               "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel"} | ({"_unpad_kernel", "_pad_kernel"} if unpad else set())
    assert kernels <= set(kernel_launches), f"kernels that did not run: {kernels - set(kernel_launches)}"

    gap = ((torch.tensor(got) - torch.tensor(expected)).abs() / torch.tensor(expected)).max().item()
    assert gap <= RTOL, f"{kind}: loss curves differ by {gap:.1e} (relative)\nfastencoder {got}\nHF {expected}"
    # a few MLM tokens per batch make single losses noisy: compare the first and last thirds
    third = STEPS // 3
    for losses in (expected, got):
        first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
        assert last < first - 0.3, f"{kind}: loss did not fall ({first:.3f} → {last:.3f}): {losses}"
