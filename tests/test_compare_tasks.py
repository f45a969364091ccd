"""Downstream tasks of `fastencoder compare`: how they are built, their features and their metrics."""
import collections
import json

import pytest
import torch

from fastencoder.compare import corpus, pretraining_data, tasks

SENTENCES = [
    "Return the number of items in the mapping, or raise an error.",
    "The parser reads one token at a time and checks it against the grammar.",
    "Errors are reported with the line number where they were found.",
    "Each call opens the file again and reads it from the start.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return corpus.train_tokenizer([SENTENCES] * 10, vocab_size=300)


def test_word_order_examples_hold_the_same_words_in_another_order():
    documents = [[f"{sentence[:-1]} number {i}." for sentence in SENTENCES] for i in range(100)]
    originals = {sentence for document in documents for sentence in document}
    examples = tasks.word_order_examples(documents, count=300, seed=0)
    assert len(examples) == 300
    labels = collections.Counter(label for _, label in examples)
    assert 100 < labels[0] < 200  # about half each (binomial, 300 draws: 5 sigma is 43)
    for text, label in examples:
        if label:
            assert text in originals
        else:
            original = " ".join(reversed(text.split()))
            assert original in originals and text != original
            assert collections.Counter(text.split()) == collections.Counter(original.split())


def test_backwards_sentence_examples():
    documents = [[sentence] for sentence in SENTENCES] + [["One two three four.", "Five six seven eight nine."]]
    examples = tasks.backwards_sentence_examples(documents, count=50, max_words=40, seed=0)
    assert len(examples) == 50
    pool = [s for document in documents for s in document if 4 <= len(s.split()) <= 14]
    for example in examples:
        answer = example["answers"][0]
        start, text = answer["answer_start"], answer["text"]
        context = example["context"]
        assert example["question"] == tasks.BACKWARDS_QUESTION
        assert context[start:start + len(text)] == text
        sentences = example["sentences"]
        assert context == " ".join(f"({n}) {s}" for n, s in enumerate(sentences, 1))
        assert sum(len(s.split()) for s in sentences) <= 40
        # one sentence of the pool reversed word by word, the others as written, all distinct
        original = " ".join(reversed(text.split()))
        assert [s == text for s in sentences].count(True) == 1 and original in pool and original != text
        assert all(s in pool for s in sentences if s != text) and len(set(sentences)) == len(sentences)
    baselines = tasks.backwards_sentence_baselines(examples)
    assert set(baselines) == {"first_sentence", "last_sentence", "longest_sentence"}
    assert all(0 < v < 1 for v in baselines.values())
    assert abs(baselines["first_sentence"] + baselines["last_sentence"] - 2 / 3) < 0.3  # the reversed one's place: uniform


def test_classification_features(tokenizer):
    vocabulary = pretraining_data.Vocabulary.of(tokenizer)
    features = tasks.classification_features(tokenizer, [(SENTENCES[0], 1), ("Return it.", 0)], vocabulary, 8)
    assert features["input_ids"].shape == (2, 8) and features["labels"].tolist() == [1, 0]
    assert features["input_ids"][0, 0] == vocabulary.cls and features["input_ids"][0, -1] == vocabulary.sep
    assert features["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # [CLS] return it . [SEP]


def test_qa_features_locate_the_answer_and_best_span_reads_it_back(tokenizer):
    vocabulary = pretraining_data.Vocabulary.of(tokenizer)
    context = " ".join(SENTENCES)
    examples = [dict(id=str(i), context=context, question="What is checked?",
                     answers=[dict(text=text, answer_start=context.index(text))])
                for i, text in enumerate(["the grammar", "line number", "items"])]
    features, offsets = tasks.qa_features(tokenizer, examples, vocabulary, max_length=64, training=True)
    for row, example in enumerate(examples):
        start, end = int(features["start_positions"][row]), int(features["end_positions"][row])
        assert features["token_type_ids"][row, start] == 1
        assert context[offsets[row][start][0]:offsets[row][end][1]] == example["answers"][0]["text"]
        # logits that peak at the answer give the answer back
        length = features["input_ids"].shape[1]
        start_logits, end_logits = torch.zeros(length), torch.zeros(length)
        start_logits[start] = end_logits[end] = 5.0
        assert tasks.best_span(start_logits, end_logits, offsets[row]) == (start, end)
    # a question whose answer is cut off with the context is left out of training
    short, _ = tasks.qa_features(tokenizer, examples, vocabulary, max_length=16, training=True)
    assert len(short["input_ids"]) == 1  # only "items", near the start, still fits


def test_best_span_stays_inside_the_context():
    offsets = [None, None, (0, 3), (4, 8), None]
    start_logits = torch.tensor([9.0, 9.0, 1.0, 0.0, 9.0])
    end_logits = torch.tensor([9.0, 9.0, 0.0, 2.0, 9.0])
    assert tasks.best_span(start_logits, end_logits, offsets) == (2, 3)


def test_squad_metrics():
    example = dict(answers=[dict(text="the grammar", answer_start=0), dict(text="grammar rules", answer_start=0)])
    assert tasks.normalize_answer("The  Grammar!") == "grammar"
    assert tasks.squad_scores(["Grammar"], [example]) == (1.0, 1.0)
    exact, f1 = tasks.squad_scores(["grammar checks"], [example])
    # best over the gold answers: against "grammar", precision 1/2 and recall 1
    assert exact == 0.0 and f1 == pytest.approx(2 * 0.5 * 1 / (0.5 + 1))
    assert tasks.squad_scores(["parser"], [example]) == (0.0, 0.0)


def test_majority_baseline():
    assert tasks.majority_baseline([1, 1, 0], [1, 0, 0, 0]) == 0.25


def test_user_task_files(tmp_path):
    rows = [{"text": f"sentence {i}", "label": "even" if i % 2 == 0 else "odd"} for i in range(10)]
    (tmp_path / "labels.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (tmp_path / "labels.csv").write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in rows))
    for name in ("labels.jsonl", "labels.csv"):
        train, evaluation, names = tasks.load_classification(tmp_path / name)
        assert names == ["even", "odd"] and len(train) == 8 and len(evaluation) == 2
        assert sorted(train + evaluation) == sorted((r["text"], names.index(r["label"])) for r in rows)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "no label"}))
    with pytest.raises(ValueError, match="lacks"):
        tasks.load_classification(tmp_path / "bad.jsonl")

    paragraphs = [{"context": f"context {i}", "qas": [{"id": f"{i}-{j}", "question": "q?", "answers": [
        {"text": "context", "answer_start": 0}]} for j in range(2)]} for i in range(5)]
    (tmp_path / "qa.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}))
    train, evaluation = tasks.load_squad(tmp_path / "qa.json")
    assert len(train) == 8 and len(evaluation) == 2
    assert {q["context"] for q in train}.isdisjoint({q["context"] for q in evaluation})  # split by paragraph
