"""Downstream tasks: sentence classification and extractive question answering (SQuAD format).

Built from the corpus by default, each from its own documents (training documents for the training
split, held-out documents for the evaluation split), and made so that no keyword lookup solves them:

- Word order (classification). A sentence of 8 to 40 words either as written (label 1) or with its
  words (punctuation attached) in reverse order (label 0), half each. Both labels hold exactly the
  same words, so any classifier of a bag of words, keyword lookup included, scores chance; the
  trivial baseline is the majority label of the evaluation split (about 50 %). Order is the only
  signal: where the sentence's words and its full stop stand, which word follows which.
- Backwards sentence (question answering). A passage of BACKWARDS_SENTENCES numbered sentences of
  4 to 14 words ("(1) ... (2) ... (3) ..."), one of them with its words in reverse order as in the
  word-order task. The question is always "Which sentence is written backwards?"; the answer is
  that sentence's text, between its number and the next. The question names nothing to look up and
  the reversed sentence holds the same words as it did before; the numbers mark where sentences
  start, so what is learned is which one reads backwards. Trivial baselines (the first, the last
  and the longest sentence) are reported next to the models. (Odd word out, one word replaced by
  another of the corpus, was not learned by the cpu preset's models in minutes: finding the word
  that does not fit takes a better language model.)

User tasks: `--classification FILE` (CSV with `text` and `label` columns, or JSON lines with those
keys) and `--qa FILE` (SQuAD-format JSON); a seeded random fifth of the examples (of the
paragraphs, for QA) is held out for evaluation.
"""
import collections
import csv
import json
import random
import re
import string
from pathlib import Path

import torch

WORD_ORDER_WORDS = (8, 40)
BACKWARDS_QUESTION = "Which sentence is written backwards?"
BACKWARDS_WORDS = (4, 14)
BACKWARDS_SENTENCES = 3
HELD_OUT = 0.2
MAX_ANSWER_TOKENS = 30


# ---- word order ----------------------------------------------------------------------------------

def word_order_examples(documents, count, seed=0):
    """Up to `count` (text, label) pairs from the sentences of `documents` (see the module docstring)."""
    rng = random.Random(seed)
    sentences = [s for document in documents for s in document
                 if WORD_ORDER_WORDS[0] <= len(s.split()) <= WORD_ORDER_WORDS[1]]
    rng.shuffle(sentences)
    examples = []
    for sentence in sentences[:count]:
        label = int(rng.random() < 0.5)
        examples.append((sentence if label else " ".join(reversed(sentence.split())), label))
    return examples


def majority_baseline(train_labels, eval_labels):
    """Accuracy on the evaluation split of always answering the training split's commonest label."""
    commonest = collections.Counter(train_labels).most_common(1)[0][0]
    return sum(label == commonest for label in eval_labels) / len(eval_labels)


# ---- backwards sentence --------------------------------------------------------------------------

def backwards_sentence_examples(documents, count, max_words, seed=0):
    """Up to `count` SQuAD-style questions ({id, context, question, answers, sentences}) from the
    sentences of `documents` (see the module docstring), passages of at most `max_words` words."""
    rng = random.Random(seed)
    pool = [s for document in documents for s in document
            if BACKWARDS_WORDS[0] <= len(s.split()) <= BACKWARDS_WORDS[1]]
    if len(pool) < BACKWARDS_SENTENCES:
        return []
    examples = []
    for attempt in range(20 * count):
        if len(examples) == count:
            break
        sentences = rng.sample(pool, BACKWARDS_SENTENCES)
        target = rng.randrange(BACKWARDS_SENTENCES)
        reversed_sentence = " ".join(reversed(sentences[target].split()))
        if sum(len(s.split()) for s in sentences) > max_words or reversed_sentence == sentences[target]:
            continue
        sentences[target] = reversed_sentence
        numbered = [f"({number}) {sentence}" for number, sentence in enumerate(sentences, 1)]
        answer_start = sum(len(part) + 1 for part in numbered[:target]) + len(f"({target + 1}) ")
        examples.append(dict(id=f"backwards-{attempt}", context=" ".join(numbered), question=BACKWARDS_QUESTION,
                             answers=[dict(text=reversed_sentence, answer_start=answer_start)],
                             sentences=sentences))
    return examples


def backwards_sentence_baselines(examples):
    """Exact match of three answers that need no model: the first, the last and the longest sentence."""
    picks = dict(first_sentence=lambda sentences: sentences[0], last_sentence=lambda sentences: sentences[-1],
                 longest_sentence=lambda sentences: max(sentences, key=len))
    return {name: sum(pick(e["sentences"]) == e["answers"][0]["text"] for e in examples) / len(examples)
            for name, pick in picks.items()}


# ---- user files ----------------------------------------------------------------------------------

def _held_out_split(items, seed):
    items = list(items)
    random.Random(seed).shuffle(items)
    cut = max(1, round(HELD_OUT * len(items)))
    if len(items) < 2:
        raise ValueError("a task file needs at least two examples (one to train on, one to evaluate)")
    return items[cut:], items[:cut]


def load_classification(path, seed=0):
    """(train, eval) lists of (text, label index) and the label names, from a CSV file with `text`
    and `label` columns or a JSON-lines file with those keys."""
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as file:
        if path.suffix.lower() in (".jsonl", ".json"):
            rows = [json.loads(line) for line in file if line.strip()]
        else:
            rows = list(csv.DictReader(file))
    for number, row in enumerate(rows, 1):
        if "text" not in row or "label" not in row:
            raise ValueError(f"{path}: example {number} lacks a 'text' or 'label' field")
    names = sorted({str(row["label"]) for row in rows})
    if len(names) < 2:
        raise ValueError(f"{path}: classification needs at least two labels, found {names}")
    examples = [(str(row["text"]), names.index(str(row["label"]))) for row in rows]
    train, evaluation = _held_out_split(examples, seed)
    return train, evaluation, names


def load_squad(path, seed=0):
    """(train, eval) lists of questions from a SQuAD-format JSON file, split by paragraph."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    paragraphs = [paragraph for article in data["data"] for paragraph in article["paragraphs"]]
    train, evaluation = _held_out_split(range(len(paragraphs)), seed)

    def questions(indices):
        out = []
        for i in indices:
            paragraph = paragraphs[i]
            for qa in paragraph["qas"]:
                if qa.get("is_impossible") or not qa["answers"]:
                    continue  # SQuAD 2.0's unanswerable questions: extractive spans only here
                out.append(dict(id=str(qa["id"]), context=paragraph["context"], question=qa["question"],
                                answers=qa["answers"]))
        return out

    return questions(train), questions(evaluation)


def as_squad(examples, title):
    """Questions in SQuAD's JSON layout (one paragraph per question)."""
    return {"version": "fastencoder-compare", "data": [{"title": title, "paragraphs": [
        {"context": e["context"], "qas": [{"id": e["id"], "question": e["question"], "answers": e["answers"]}]}
        for e in examples]}]}


# ---- features ------------------------------------------------------------------------------------

def classification_features(tokenizer, examples, vocabulary, max_length):
    """Padded tensors for a list of (text, label): input_ids, attention_mask, labels."""
    encodings = tokenizer.encode_batch([text for text, _ in examples], add_special_tokens=False)
    rows = [[vocabulary.cls, *e.ids[:max_length - 2], vocabulary.sep] for e in encodings]
    input_ids, attention_mask = _pad(rows, vocabulary.pad)
    return dict(input_ids=input_ids, attention_mask=attention_mask,
                labels=torch.tensor([label for _, label in examples]))


def _pad(rows, pad_id):
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
    return input_ids, attention_mask


def qa_features(tokenizer, examples, vocabulary, max_length, training):
    """[CLS] question [SEP] context [SEP], the context cut to fit. Returns (tensors, offsets): the
    tensors hold input_ids, token_type_ids, attention_mask and, for training, start_positions and
    end_positions (questions whose answer falls outside the kept context are dropped);
    offsets[i][t] is token t's (start, end) in example i's context, or None outside the context."""
    questions = tokenizer.encode_batch([e["question"] for e in examples], add_special_tokens=False)
    contexts = tokenizer.encode_batch([e["context"] for e in examples], add_special_tokens=False)
    rows, token_types, offsets, starts, ends = [], [], [], [], []
    for example, question, context in zip(examples, questions, contexts):
        question_ids = question.ids[:max_length // 2]
        room = max_length - len(question_ids) - 3
        context_ids, context_offsets = context.ids[:room], context.offsets[:room]
        first = len(question_ids) + 2  # the context's first token
        if training:
            answer = example["answers"][0]
            answer_start = answer["answer_start"]
            answer_end = answer_start + len(answer["text"])
            inside = [t for t, (s, e) in enumerate(context_offsets) if s < answer_end and e > answer_start]
            if not inside or context_offsets[-1][1] < answer_end:
                continue
            starts.append(first + inside[0])
            ends.append(first + inside[-1])
        rows.append([vocabulary.cls, *question_ids, vocabulary.sep, *context_ids, vocabulary.sep])
        token_types.append([0] * first + [1] * (len(context_ids) + 1))
        offsets.append([None] * first + list(context_offsets) + [None])
    input_ids, attention_mask = _pad(rows, vocabulary.pad)
    token_type_ids, _ = _pad(token_types, 0)
    tensors = dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
    if training:
        tensors.update(start_positions=torch.tensor(starts), end_positions=torch.tensor(ends))
    return tensors, offsets


def best_span(start_logits, end_logits, offsets):
    """The context span (start token, end token) with the highest start + end logit, at most
    MAX_ANSWER_TOKENS long."""
    inside = torch.tensor([o is not None for o in offsets] + [False] * (len(start_logits) - len(offsets)))
    scores = start_logits[:, None] + end_logits[None, :]
    length = torch.arange(len(start_logits))
    valid = (length[None, :] >= length[:, None]) & (length[None, :] - length[:, None] < MAX_ANSWER_TOKENS)
    valid &= inside[:, None] & inside[None, :]
    best = int(scores.masked_fill(~valid, float("-inf")).flatten().argmax())
    return divmod(best, len(end_logits))


# ---- SQuAD metrics -------------------------------------------------------------------------------

def normalize_answer(text):
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answer_f1(prediction, truth):
    predicted, true = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((collections.Counter(predicted) & collections.Counter(true)).values())
    if not predicted or not true:
        return float(predicted == true)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(true)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions, examples):
    """(exact match, F1), each the mean over questions of the best over their gold answers."""
    exact = f1 = 0.0
    for prediction, example in zip(predictions, examples):
        truths = [answer["text"] for answer in example["answers"]]
        exact += max(float(normalize_answer(prediction) == normalize_answer(t)) for t in truths)
        f1 += max(answer_f1(prediction, t) for t in truths)
    return exact / len(examples), f1 / len(examples)

