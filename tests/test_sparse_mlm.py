"""The sparse masked-LM head (`sparse_prediction=True`) against the dense one, on random configs of
BERT and ALBERT: same loss, same gradients, the dense logits' labelled rows.

Tolerance, fp32: both models run the same encoder on the same inputs; only the head's GEMMs (on the
labelled rows instead of all of them) and the loss's reductions change their order of summation
(the dense head adds the unlabelled rows' exact zeros to the decoder's gradients, in other blocks),
a few fp32 ulps, which the encoder's backward carries to every gradient (the random weights, of
order 1, amplify them somewhat). Measured over 6 seeds of each model: losses at most 3e-7 apart
(relative), gradients at most 1.1e-6 of the largest gradient. TOL = 1e-5 leaves a ninefold margin and
fails any real difference (a position scored against another's label, or one left out, moves the
loss and the gradients by percents).
"""
import pytest
import torch
import transformers
from test_bert import assert_same_values, randomize

import fastencoder

TOL = 1e-5
BATCH, SEQLEN = 4, 12
SEEDS = range(3)


def random_config(kind, generator):
    """A small config whose sizes are drawn from `generator`."""
    pick = lambda *choices: choices[torch.randint(len(choices), (1,), generator=generator).item()]
    heads = pick(1, 2, 4)
    common = dict(vocab_size=pick(37, 64, 101), hidden_size=heads * pick(8, 16), num_attention_heads=heads,
                  num_hidden_layers=pick(1, 2), intermediate_size=pick(32, 64), max_position_embeddings=SEQLEN,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    if kind == "bert":
        return transformers.BertConfig(hidden_act=pick("gelu", "relu"), **common)
    return transformers.AlbertConfig(hidden_act=pick("gelu_new", "gelu"), embedding_size=pick(8, 16),
                                     classifier_dropout_prob=0.0, **common)


MODELS = {  # (class, the pair label's name or None)
    "BertForPreTraining": (fastencoder.BertForPreTraining, "next_sentence_label"),
    "BertForMaskedLM": (fastencoder.BertForMaskedLM, None),
    "AlbertForPreTraining": (fastencoder.AlbertForPreTraining, "sentence_order_label"),
    "AlbertForMaskedLM": (fastencoder.AlbertForMaskedLM, None),
}


def mlm_logits(output):
    return output.prediction_logits if "prediction_logits" in output else output.logits


def twins(name, seed):
    """The dense model (random weights), the sparse one with the same weights, and a batch."""
    model_class, pair_label = MODELS[name]
    generator = torch.Generator().manual_seed(seed)
    config = random_config("bert" if name.startswith("Bert") else "albert", generator)
    torch.manual_seed(seed)
    dense = randomize(model_class(config))
    sparse = model_class(config, sparse_prediction=True)
    sparse.load_state_dict(dense.state_dict())
    lengths = torch.randint(2, SEQLEN + 1, (BATCH,), generator=generator)
    attention_mask = (torch.arange(SEQLEN)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(config.vocab_size, (BATCH, SEQLEN), generator=generator)
    chosen = (torch.rand(BATCH, SEQLEN, generator=generator) < 0.3) & attention_mask.bool()
    chosen[0] = False  # a row without a label
    chosen[1, 0] = True
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids.masked_fill(~chosen, -100))
    if pair_label:
        batch[pair_label] = torch.randint(2, (BATCH,), generator=generator)
    return dense, sparse, batch


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", MODELS)
def test_sparse_head_gives_the_dense_loss_and_gradients(name, seed, torch_backend):
    dense, sparse, batch = twins(name, seed)
    dense_output, sparse_output = dense(**batch), sparse(**batch)
    dense_output.loss.backward()
    sparse_output.loss.backward()

    labelled = batch["labels"] != -100
    dense_logits, sparse_logits = mlm_logits(dense_output), mlm_logits(sparse_output)
    assert sparse_logits.shape == (int(labelled.sum()), dense.config.vocab_size)
    assert_same_values(sparse_logits, dense_logits[labelled], TOL, f"{name}: logits of the labelled positions")
    assert_same_values(sparse_output.loss, dense_output.loss, TOL, f"{name}: loss")
    grads = dict(dense.named_parameters())
    scale = max(param.grad.abs().max().item() for param in grads.values() if param.grad is not None)
    for param_name, param in sparse.named_parameters():
        expected = grads[param_name].grad
        if expected is None:  # (a head the loss does not reach: none here but checked)
            assert param.grad is None, param_name
            continue
        torch.testing.assert_close(param.grad, expected, atol=TOL * scale, rtol=TOL, msg=lambda m: f"{param_name}: {m}")


@pytest.mark.parametrize("name", MODELS)
def test_sparse_option_is_off_by_default_and_needs_labels(name, torch_backend):
    dense, sparse, batch = twins(name, seed=0)
    assert dense.sparse_prediction is False
    labels = batch.pop("labels")
    batch.pop("next_sentence_label", None), batch.pop("sentence_order_label", None)
    with torch.no_grad():
        # without labels there is nothing to narrow to: the dense logits of every position
        dense_logits, sparse_logits = mlm_logits(dense(**batch)), mlm_logits(sparse(**batch))
        assert_same_values(sparse_logits, dense_logits, TOL, f"{name}: logits without labels")
        assert mlm_logits(dense(**batch, labels=labels)).shape == (BATCH, SEQLEN, dense.config.vocab_size)
    with pytest.raises(ValueError, match="sparse_prediction must be True or False"):
        MODELS[name][0](dense.config, sparse_prediction="yes")


def test_labels_given_positionally_and_tuples(torch_backend):
    dense, sparse, batch = twins("BertForPreTraining", seed=1)
    positional = (batch["input_ids"], batch["attention_mask"], None, None, None, batch["labels"],
                  batch["next_sentence_label"])
    with torch.no_grad():
        loss, logits, _ = sparse(*positional, return_dict=False)
        assert logits.shape[0] == int((batch["labels"] != -100).sum())
        assert_same_values(loss, dense(**batch).loss, TOL, "loss, labels given positionally")
    assert not sparse.cls.predictions._forward_pre_hooks, "the narrowing hook outlives the call"


def test_from_pretrained_takes_the_option(tmp_path, torch_backend):
    dense, _, batch = twins("AlbertForMaskedLM", seed=2)
    dense.save_pretrained(tmp_path)
    loaded = fastencoder.AlbertForMaskedLM.from_pretrained(tmp_path, sparse_prediction=True)
    with torch.no_grad():
        assert loaded(**batch).logits.shape[0] == int((batch["labels"] != -100).sum())
