"""Pretraining data of `fastencoder compare`: masking statistics, sentence pairs and their labels.

Statistical checks use bounds of 5 standard deviations of the binomial count: a correct
implementation fails one with probability below 1e-6, a wrong share (say 70 % [MASK] instead of
80 %) fails it for certain at these sample sizes.
"""
import math

import pytest
import torch

from fastencoder.compare import corpus, pretraining_data
from fastencoder.compare.pretraining_data import Pair, Vocabulary

VOCABULARY = Vocabulary(size=1000, pad=0, cls=2, sep=3, mask=4, special=(0, 1, 2, 3, 4))


def assert_binomial_share(successes, trials, probability, what):
    sigma = math.sqrt(trials * probability * (1 - probability))
    assert abs(successes - trials * probability) <= 5 * sigma, (
        f"{what}: {successes}/{trials} = {successes / trials:.4f}, expected {probability}")


def random_batch(rows=700, seqlen=64, seed=0):
    """[CLS] tokens [SEP] tokens [SEP] padding, of random lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCABULARY.size, (rows, seqlen), generator=generator)
    lengths = torch.randint(8, seqlen + 1, (rows,), generator=generator)
    for row, length in enumerate(lengths.tolist()):
        ids[row, 0] = VOCABULARY.cls
        ids[row, length // 2] = ids[row, length - 1] = VOCABULARY.sep
        ids[row, length:] = VOCABULARY.pad
    return ids


def test_masking_statistics():
    ids = random_batch()
    masked, labels = pretraining_data.mask_tokens(ids, VOCABULARY, torch.Generator().manual_seed(1))
    special = (ids == VOCABULARY.pad) | (ids == VOCABULARY.cls) | (ids == VOCABULARY.sep)
    chosen = labels != -100

    # 15 % of each sequence's ordinary tokens, rounded, and never a special token or padding
    eligible = (~special).sum(1)
    assert torch.equal(chosen.sum(1), (eligible * 0.15).round().clamp(min=1).long())
    assert not (chosen & special).any()
    # labels hold the original tokens; positions not chosen are left alone
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])

    # of the chosen: 80 % [MASK], 10 % a random ordinary token, 10 % unchanged. A random token equals
    # the original with probability 1 / 995, which moves the visible shares by at most 1e-4.
    trials = int(chosen.sum())
    became_mask = int((masked[chosen] == VOCABULARY.mask).sum())
    unchanged = int((masked[chosen] == ids[chosen]).sum())
    replaced = trials - became_mask - unchanged
    assert trials > 2500
    assert_binomial_share(became_mask, trials, 0.8, "[MASK]")
    assert_binomial_share(replaced, trials, 0.1, "random token")
    assert_binomial_share(unchanged, trials, 0.1, "unchanged")
    random_tokens = masked[chosen & (masked != VOCABULARY.mask) & (masked != ids)]
    assert ((random_tokens >= 5) & (random_tokens < VOCABULARY.size)).all(), "a special token drawn at random"
    # and the random tokens cover the vocabulary (not one fixed id)
    assert len(random_tokens.unique()) > 0.8 * len(random_tokens)


def test_short_sequences_still_get_one_prediction():
    ids = torch.tensor([[VOCABULARY.cls, 7, VOCABULARY.sep, 8, VOCABULARY.sep, VOCABULARY.pad]])
    _, labels = pretraining_data.mask_tokens(ids, VOCABULARY, torch.Generator().manual_seed(0))
    assert (labels != -100).sum() == 1


def test_masks_are_drawn_anew_each_epoch():
    pair = Pair(a=list(range(10, 40)), b=list(range(40, 70)), label=0)
    batches = list(pretraining_data.pretraining_batches([pair], VOCABULARY, "mlm+nsp", batch_size=1, steps=4))
    masks = [batch["labels"] != -100 for batch in batches]
    assert len(batches) == 4  # one pair, one batch per epoch
    assert all(not torch.equal(masks[0], other) for other in masks[1:])
    for batch in batches:
        chosen = batch["labels"] != -100
        original = torch.tensor([[2, *range(10, 40), 3, *range(40, 70), 3]])
        assert torch.equal(batch["labels"][chosen], original[chosen])
    # and the same seed draws the same masks
    again = list(pretraining_data.pretraining_batches([pair], VOCABULARY, "mlm+nsp", batch_size=1, steps=4))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_batches_group_pairs_of_similar_length():
    """An epoch takes every pair at most once, full batches only, and grouping by length leaves
    little padding where random batches of these lengths (uniform in 3 to 61) pad a third of the
    positions."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 30, (1000, 2), generator=generator).tolist()
    pairs = [Pair(a=[7] * a, b=[8] * b, label=index % 2) for index, (a, b) in enumerate(lengths)]
    batch_size = 8
    epoch = list(pretraining_data.pretraining_batches(pairs, VOCABULARY, "mlm+sop", batch_size,
                                                      steps=1000 // batch_size))
    assert all(len(batch["input_ids"]) == batch_size for batch in epoch)
    real = sum(int(batch["attention_mask"].sum()) for batch in epoch)
    padded = sum(batch["attention_mask"].numel() for batch in epoch)
    assert real == sum(a + b + 3 for a, b in lengths), "one epoch: every pair once"
    assert 1 - real / padded < 0.05, f"padding {1 - real / padded:.0%}"
    # the order within an epoch is not the order of length
    longest = [int(batch["attention_mask"].sum(1).max()) for batch in epoch]
    assert longest != sorted(longest)


def numbered_documents(count=400, seed=0):
    """Documents of 2 to 6 sentences of 1 to 5 tokens; token ids number the corpus' tokens in reading
    order, so that each id says where it comes from."""
    generator = torch.Generator().manual_seed(seed)
    documents, next_id = [], 5
    for _ in range(count):
        document = []
        for _ in range(int(torch.randint(2, 7, (), generator=generator))):
            length = int(torch.randint(1, 6, (), generator=generator))
            document.append(list(range(next_id, next_id + length)))
            next_id += length
        documents.append(document)
    return documents


def flat(document):
    return [token for sentence in document for token in sentence]


def sentence_starts(documents):
    return {sentence[0] for document in documents for sentence in document}


def test_nsp_pairs_and_labels():
    documents = numbered_documents()
    document_of = {token: index for index, document in enumerate(documents) for token in flat(document)}
    starts = sentence_starts(documents)
    # long enough that no document is cut into chunks or truncated: each document gives one pair
    pairs = pretraining_data.make_pairs(documents, max_length=64, objective="mlm+nsp", seed=0)
    assert len(pairs) == len(documents)
    assert_binomial_share(sum(p.label for p in pairs), len(pairs), 0.5, "random next segments")
    for pair, document in zip(pairs, documents):
        assert pair.a and pair.b and pair.b[0] in starts
        assert pair.a == flat(document)[:len(pair.a)]  # A: the document's first sentences
        if pair.label == 0:
            assert pair.a + pair.b == flat(document)  # B: the rest of it, its true continuation
        else:
            source = document_of[pair.b[0]]
            assert source != document_of[pair.a[0]]
            # a run of consecutive sentences of the other document
            assert pair.b == flat(documents[source])[flat(documents[source]).index(pair.b[0]):][:len(pair.b)]


def test_sop_pairs_and_labels():
    documents = numbered_documents()
    pairs = pretraining_data.make_pairs(documents, max_length=64, objective="mlm+sop", seed=0)
    nsp_pairs = pretraining_data.make_pairs(documents, max_length=64, objective="mlm+nsp", seed=0)
    starts = sentence_starts(documents)
    assert len(pairs) == len(documents)
    assert_binomial_share(sum(p.label for p in pairs), len(pairs), 0.5, "swapped pairs")
    for pair, nsp_pair, document in zip(pairs, nsp_pairs, documents):
        assert pair.a[0] in starts and pair.b[0] in starts
        in_order = (pair.a, pair.b) if pair.label == 0 else (pair.b, pair.a)
        assert in_order[0] + in_order[1] == flat(document)  # two consecutive segments, maybe swapped
        assert in_order[0] == nsp_pair.a  # cut where the NSP data cuts: the same segments A


def test_pairs_fit_the_maximum_length_and_are_truncated_longest_first():
    assert pretraining_data.truncate_longest_first([1] * 10, [2] * 3, 8) == ([1] * 5, [2] * 3)
    assert pretraining_data.truncate_longest_first([1, 2, 3, 4], [5, 6, 7, 8], 5) == ([1, 2, 3], [5, 6])
    documents = numbered_documents()
    for objective in ("mlm+nsp", "mlm+sop"):
        pairs = pretraining_data.make_pairs(documents, max_length=12, objective=objective, seed=0)
        lengths = [len(p.a) + len(p.b) + 3 for p in pairs]
        assert max(lengths) == 12 and all(p.a and p.b for p in pairs)
        # most pairs are filled to the maximum length (targets are shorter for 10 % of the chunks)
        assert sum(length >= 10 for length in lengths) > 0.5 * len(pairs)


def test_collated_pairs():
    pairs = [Pair([10, 11], [12], 0), Pair([20], [21, 22, 23], 1)]
    inputs, labels = pretraining_data.collate_pairs(pairs, VOCABULARY)
    assert inputs["input_ids"].tolist() == [[2, 10, 11, 3, 12, 3, 0], [2, 20, 3, 21, 22, 23, 3]]
    assert inputs["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0], [1] * 7]
    assert labels.tolist() == [0, 1]
    batch = pretraining_data.pretraining_batch(pairs, VOCABULARY, "mlm+sop", torch.Generator().manual_seed(0))
    assert batch["sentence_order_label"].tolist() == [0, 1] and "next_sentence_label" not in batch


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="objective"):
        pretraining_data.make_pairs(numbered_documents(3), 32, "mlm", seed=0)
    with pytest.raises(ValueError, match="two documents"):
        pretraining_data.make_pairs(numbered_documents(1), 32, "mlm+nsp", seed=0)
    with pytest.raises(ValueError, match="no sentence pairs"):
        next(pretraining_data.pretraining_batches([], VOCABULARY, "mlm+nsp", 8, 1))


def test_tokenizer_and_corpus():
    documents = [corpus.split_sentences("Return the value. It may be None.\nOr raise an error!"),
                 corpus.split_sentences("Open the file. Read it.")]
    assert documents[0] == ["Return the value.", "It may be None.", "Or raise an error!"]
    tokenizer = corpus.train_tokenizer(documents * 20, vocab_size=200)
    vocabulary = Vocabulary.of(tokenizer)
    assert [vocabulary.pad, vocabulary.cls, vocabulary.sep, vocabulary.mask] == [0, 2, 3, 4]
    assert tokenizer.encode("Return the VALUE.", add_special_tokens=False).tokens == ["return", "the", "value", "."]
    assert 4 not in vocabulary.ordinary_ids().tolist() and len(vocabulary.ordinary_ids()) == vocabulary.size - 5


def test_stdlib_docstrings_are_prose():
    docstring = ("Summary line.\n\nA paragraph of prose that goes on.\n\n>>> code()\n1\n\n"
                 "    indented block\n\n|--|--|\n|  |  |")
    assert list(corpus.prose_paragraphs(docstring)) == ["Summary line.", "A paragraph of prose that goes on."]
    documents = corpus.stdlib_documents(max_chars=20_000)
    assert sum(map(len, documents)) > 50
    assert all(sentence.strip() == sentence and sentence for document in documents for sentence in document)
