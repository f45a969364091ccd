"""Pretraining data as BERT and ALBERT define it.

Sentence pairs (Devlin et al. 2019, Google's create_pretraining_data.py): a document's sentences
are gathered into a chunk up to the target length (the maximum length, or with probability 0.1 a
shorter random one), the chunk is cut after a random sentence into segment A and segment B, and the
pair is truncated longest-first (one token at a time from the end of the longer segment) to fit
[CLS] A [SEP] B [SEP] in the maximum length.

- NSP (BERT): half the pairs keep the true B (label 0), half take as B the text from a random
  sentence of a random other document on, filling the rest of the target length (label 1).
- SOP (ALBERT, Lan et al. 2020): half the pairs keep A then B (label 0), half swap them (label 1).

Labels follow Hugging Face's `next_sentence_label` / `sentence_order_label`. Chunks of a single
sentence are skipped, so that every pair has a true second segment and the labels are balanced.
The chunks are cut with their own random stream, so NSP and SOP data are built from the same
segments A.

MLM: in each sequence 15 % of the tokens (rounded, at least one; never [CLS], [SEP] or padding)
are chosen; of those 80 % become [MASK], 10 % a random token of the vocabulary (special tokens
excluded) and 10 % stay as they are. Labels are the original tokens at the chosen positions and
-100 elsewhere. Masks are drawn when a batch is made, from a generator seeded by the epoch: every
epoch sees new masks.
"""
import random
from dataclasses import dataclass

import torch

MLM_PROBABILITY = 0.15
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # the remaining 10 % stay unchanged
SHORT_SEQUENCE_PROBABILITY = 0.1
IGNORE_INDEX = -100
LENGTH_POOL = 32  # batches whose pairs are grouped by length (pretraining_batches)
OBJECTIVES = {"mlm+nsp": "next_sentence_label", "mlm+sop": "sentence_order_label"}


@dataclass(frozen=True)
class Vocabulary:
    size: int
    pad: int
    cls: int
    sep: int
    mask: int
    special: tuple  # every special token's id

    @classmethod
    def of(cls, tokenizer):
        from .corpus import SPECIAL_TOKENS

        ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
        return cls(tokenizer.get_vocab_size(), ids["[PAD]"], ids["[CLS]"], ids["[SEP]"], ids["[MASK]"],
                   tuple(sorted(ids.values())))

    def ordinary_ids(self):
        """The ids a random replacement may take: every id but the special tokens'."""
        keep = torch.ones(self.size, dtype=torch.bool)
        keep[list(self.special)] = False
        return keep.nonzero()[:, 0]


@dataclass(frozen=True)
class Pair:
    a: list
    b: list
    label: int  # 0: B is A's true continuation, in order; 1: random B (NSP) or swapped (SOP)


def tokenize_documents(tokenizer, documents):
    """Documents of sentences → documents of sentences of token ids (no special tokens); empty
    sentences dropped."""
    flat = [sentence for document in documents for sentence in document]
    encoded = iter(tokenizer.encode_batch(flat, add_special_tokens=False))
    tokenized = [[next(encoded).ids for _ in document] for document in documents]
    return [[ids for ids in document if ids] for document in tokenized]


def truncate_longest_first(a, b, max_tokens):
    a, b = list(a), list(b)
    while len(a) + len(b) > max_tokens:
        (a if len(a) > len(b) else b).pop()
    return a, b


def _random_segment(documents, exclude, length, rng):
    """`length` tokens from a random sentence on of a random document other than `exclude`."""
    index = rng.randrange(len(documents) - 1)
    document = documents[index + (index >= exclude)]
    tokens = []
    for sentence in document[rng.randrange(len(document)):]:
        tokens += sentence
        if len(tokens) >= length:
            break
    return tokens[:length]


def make_pairs(documents, max_length, objective, seed=0):
    """Sentence pairs from tokenized documents (see the module docstring)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    if objective == "mlm+nsp" and len(documents) < 2:
        raise ValueError("next-sentence prediction needs at least two documents")
    max_tokens = max_length - 3  # [CLS] A [SEP] B [SEP]
    if max_tokens < 2:
        raise ValueError(f"max_length must be at least 5, got {max_length}")
    chunk_rng, pair_rng = random.Random(seed), random.Random(seed + 1)
    pairs = []
    for index, document in enumerate(documents):
        target = max_tokens
        chunk = []
        for position, sentence in enumerate(document):
            chunk.append(sentence)
            if position < len(document) - 1 and sum(map(len, chunk)) < target:
                continue
            if len(chunk) >= 2:
                cut = chunk_rng.randint(1, len(chunk) - 1)
                a = [token for sentence in chunk[:cut] for token in sentence]
                b = [token for sentence in chunk[cut:] for token in sentence]
                label = int(pair_rng.random() < 0.5)
                if label and objective == "mlm+nsp":
                    b = _random_segment(documents, index, max(1, target - len(a)), pair_rng)
                elif label:
                    a, b = b, a
                pairs.append(Pair(*truncate_longest_first(a, b, max_tokens), label))
            chunk = []
            target = max_tokens
            if chunk_rng.random() < SHORT_SEQUENCE_PROBABILITY:
                target = chunk_rng.randint(2, max_tokens)
    return pairs


def collate_pairs(pairs, vocabulary):
    """[CLS] A [SEP] B [SEP], right-padded to the longest pair: input_ids, token_type_ids,
    attention_mask and the pair labels."""
    length = max(len(p.a) + len(p.b) + 3 for p in pairs)
    input_ids = torch.full((len(pairs), length), vocabulary.pad, dtype=torch.long)
    token_type_ids = torch.zeros_like(input_ids)
    attention_mask = torch.zeros_like(input_ids)
    for row, pair in enumerate(pairs):
        ids = [vocabulary.cls, *pair.a, vocabulary.sep, *pair.b, vocabulary.sep]
        input_ids[row, :len(ids)] = torch.tensor(ids)
        token_type_ids[row, len(pair.a) + 2:len(ids)] = 1
        attention_mask[row, :len(ids)] = 1
    labels = torch.tensor([pair.label for pair in pairs])
    return dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask), labels


def mask_tokens(input_ids, vocabulary, generator):
    """(masked input_ids, MLM labels) for a batch (see the module docstring)."""
    eligible = torch.ones_like(input_ids, dtype=torch.bool)
    for special in vocabulary.special:
        eligible &= input_ids != special
    to_predict = (eligible.sum(1) * MLM_PROBABILITY).round().clamp(min=1).minimum(eligible.sum(1))
    # a uniformly random subset of `to_predict` eligible positions per row: the lowest random scores
    scores = torch.rand(input_ids.shape, generator=generator).masked_fill(~eligible, 2.0)
    ranks = scores.argsort(1).argsort(1)
    chosen = ranks < to_predict[:, None]
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    action = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.masked_fill(chosen & (action < MASK_SHARE), vocabulary.mask)
    replace = chosen & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE)
    ordinary = vocabulary.ordinary_ids()
    random_ids = ordinary[torch.randint(len(ordinary), input_ids.shape, generator=generator)]
    return torch.where(replace, random_ids, masked), labels


def pretraining_batch(pairs, vocabulary, objective, generator):
    """The keyword arguments of BertForPreTraining / AlbertForPreTraining for `pairs`."""
    inputs, pair_labels = collate_pairs(pairs, vocabulary)
    inputs["input_ids"], inputs["labels"] = mask_tokens(inputs["input_ids"], vocabulary, generator)
    inputs[OBJECTIVES[objective]] = pair_labels
    return inputs


def pretraining_batches(pairs, vocabulary, objective, batch_size, steps, seed=0):
    """`steps` batches, epoch after epoch: each epoch shuffles the pairs and draws new masks. Pairs of
    similar length share a batch, to spare the padding (a quarter of the positions on the standard
    library's short documents): the shuffled pairs are taken LENGTH_POOL batches at a time, sorted by
    length within those, cut into batches again and these shuffled (Hugging Face Trainer's
    group_by_length)."""
    if not pairs:
        raise ValueError("no sentence pairs: the corpus needs documents of at least two sentences")
    length = lambda index: len(pairs[index].a) + len(pairs[index].b)
    step, epoch = 0, 0
    while True:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(pairs), generator=generator).tolist()
        # full batches only (a corpus smaller than one batch makes one batch of it all)
        used = len(order) - len(order) % batch_size if len(order) >= batch_size else len(order)
        pool_size = LENGTH_POOL * batch_size
        for pool_start in range(0, used, pool_size):
            pool = sorted(order[pool_start:min(used, pool_start + pool_size)], key=length)
            batches = [pool[start:start + batch_size] for start in range(0, len(pool), batch_size)]
            for index in torch.randperm(len(batches), generator=generator).tolist():
                if step == steps:
                    return
                yield pretraining_batch([pairs[i] for i in batches[index]], vocabulary, objective, generator)
                step += 1
        epoch += 1
