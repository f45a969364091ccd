"""`fastencoder compare` end to end at smoke size: a couple of pretraining steps, then every output."""
import dataclasses
import json
import statistics

import pytest

from fastencoder import cli
from fastencoder.compare import experiment, seeds

PRETRAINING_FIELDS = {"objective", "steps", "loss", "mlm_accuracy", "pair_accuracy", "tokens_per_s",
                      "peak_memory_bytes", "mlm_unigram_baseline", "pair_baseline"}
METRICS = ("pretraining.mlm_accuracy", "pretraining.pair_accuracy", "classification.accuracy", "qa.exact_match",
           "qa.f1", "pretraining.tokens_per_s")


def assert_fraction(value):
    assert isinstance(value, float) and 0.0 <= value <= 1.0, value


def metric(entry, name):
    for key in name.split("."):
        entry = entry[key]
    return entry


def check_run(model, kind, objective, preset, steps):
    """One run's entry (or their mean), every field present and typed."""
    assert set(model) >= {"config", "parameters", "pretraining", "classification", "qa"}
    assert model["config"]["model_type"] == kind
    assert set(model["parameters"]) == {"total", "embeddings", "encoder"}
    assert all(isinstance(count, int) and count > 0 for count in model["parameters"].values())
    pretraining = model["pretraining"]
    assert set(pretraining) == PRETRAINING_FIELDS
    assert pretraining["objective"] == objective and pretraining["steps"] == steps
    assert len(pretraining["loss"]) == steps and all(isinstance(x, float) and x > 0 for x in pretraining["loss"])
    assert_fraction(pretraining["mlm_accuracy"])
    assert_fraction(pretraining["pair_accuracy"])
    assert isinstance(pretraining["tokens_per_s"], float) and pretraining["tokens_per_s"] > 0
    assert pretraining["peak_memory_bytes"] is None or isinstance(pretraining["peak_memory_bytes"], int)
    assert_fraction(pretraining["mlm_unigram_baseline"])
    assert_fraction(pretraining["pair_baseline"])
    assert set(model["classification"]) == {"accuracy", "majority_baseline", "steps"}
    assert set(model["qa"]) == {"exact_match", "f1", "trivial_baselines", "steps"}
    for value in (model["classification"]["accuracy"], model["classification"]["majority_baseline"],
                  model["qa"]["exact_match"], model["qa"]["f1"], *model["qa"]["trivial_baselines"].values()):
        assert_fraction(value)
    settings = experiment.PRESETS[preset]  # each task's fine-tuning steps: the preset's, scaled with --steps
    for task, preset_steps in (("classification", settings.fine_tune_steps), ("qa", settings.qa_fine_tune_steps)):
        assert model[task]["steps"] == max(1, round(preset_steps * steps / settings.steps))


def check_schema(result, preset, steps, seeds=1):
    """compare.json as the issue defines it: each model's entry has one run's fields, the mean over
    the seeds, with the runs themselves and the spread of each metric."""
    assert set(result) == {"environment", "preset", "seeds", "models"}
    assert result["preset"] == preset and len(result["seeds"]) == seeds
    assert {"device", "dtype", "torch", "transformers"} <= set(result["environment"])
    assert set(result["models"]) == {"bert", "albert"}
    for kind, objective in (("bert", "mlm+nsp"), ("albert", "mlm+sop")):
        model = result["models"][kind]
        assert set(model) == {"config", "parameters", "pretraining", "classification", "qa", "runs", "spread"}
        check_run(model, kind, objective, preset, steps)
        assert len(model["runs"]) == seeds
        for run in model["runs"]:
            assert set(run) == {"config", "parameters", "pretraining", "classification", "qa"}
            check_run(run, kind, objective, preset, steps)
        assert set(model["spread"]) == set(METRICS)
        for name in METRICS:
            values = [metric(run, name) for run in model["runs"]]
            assert metric(model, name) == pytest.approx(statistics.fmean(values))
            assert model["spread"][name] == (pytest.approx(statistics.stdev(values)) if seeds > 1 else None)
        assert model["pretraining"]["loss"] == pytest.approx(
            [statistics.fmean(step) for step in zip(*(run["pretraining"]["loss"] for run in model["runs"]))])
    bert, albert = result["models"]["bert"], result["models"]["albert"]
    assert albert["parameters"]["total"] < bert["parameters"]["total"]
    assert albert["parameters"]["embeddings"] < bert["parameters"]["embeddings"]


def test_compare_smoke_on_the_default_corpus_with_two_seeds(tmp_path, capsys):
    assert cli.main(["compare", "--preset", "tiny", "--steps", "2", "--seeds", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    check_schema(result, "tiny", steps=2, seeds=2)
    bert = result["models"]["bert"]
    assert bert["runs"][0]["pretraining"]["loss"] != bert["runs"][1]["pretraining"]["loss"], "seeds differ"
    assert set(bert["qa"]["trivial_baselines"]) == {"first_sentence", "last_sentence", "longest_sentence"}
    table = (tmp_path / "compare.md").read_text()
    assert "| parameters: total |" in table and "majority baseline" in table and "unigram baseline" in table
    assert " ± " in table
    labels = tuple(f"- {label}: " for label in seeds.METRICS.values())
    verdicts = [line for line in table.splitlines() if line.startswith(labels)]
    assert len(verdicts) == len(METRICS), table
    assert all(line.endswith(("a difference", "no difference shown", "no difference")) for line in verdicts)
    terminal = capsys.readouterr().out
    assert "| parameters: total |" in terminal and verdicts[0] in terminal  # the table, on the terminal too
    pytest.importorskip("matplotlib")
    for plot in ("pretraining_loss.png", "metrics.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG")


def test_compare_on_user_files(tmp_path):
    sentences = ["The parser reads one token at a time.", "Each token is checked against the grammar.",
                 "Errors are reported with their line number.", "The result is a syntax tree."]
    documents = [" ".join(sentences[i:] + sentences[:i]) for i in range(4)] * 5
    (tmp_path / "corpus.txt").write_text("\n\n".join(documents))
    (tmp_path / "labels.jsonl").write_text("\n".join(
        json.dumps({"text": sentence, "label": "long" if len(sentence) > 40 else "short"})
        for sentence in sentences * 5))
    context = " ".join(sentences)
    start = context.index("grammar")
    squad = {"data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": [{"id": str(i), "question": "What is each token checked against?",
                                      "answers": [{"text": "grammar", "answer_start": start}]}]}
        for i in range(10)]}]}
    (tmp_path / "qa.json").write_text(json.dumps(squad))
    out = tmp_path / "out"
    assert cli.main(["compare", "--corpus", str(tmp_path / "corpus.txt"), "--classification",
                     str(tmp_path / "labels.jsonl"), "--qa", str(tmp_path / "qa.json"), "--steps", "1",
                     "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    check_schema(result, "tiny", steps=1)
    assert result["models"]["albert"]["qa"]["trivial_baselines"] == {}  # none for a user's questions
    assert "one seed, no spread" in (out / "compare.md").read_text()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    # the saved tokenizer can be reused
    assert cli.main(["compare", "--corpus", str(tmp_path / "corpus.txt"), "--tokenizer", str(out / "tokenizer"),
                     "--classification", str(tmp_path / "labels.jsonl"), "--qa", str(tmp_path / "qa.json"),
                     "--steps", "1", "--out", str(tmp_path / "again")]) == 0
    assert not (tmp_path / "again" / "tokenizer").exists()
    with pytest.raises(ValueError, match="seeds must be at least 1"):
        cli.main(["compare", "--corpus", str(tmp_path / "corpus.txt"), "--seeds", "0", "--out", str(tmp_path / "x")])
    # a corpus of sentences longer than the backwards-sentence task takes: a clear error, not a crash
    long = "The parser reads one token at a time and checks each of them against the grammar it was given."
    (tmp_path / "long.txt").write_text("\n\n".join([f"{long} {long}"] * 20))
    with pytest.raises(ValueError, match="too small to build the question-answering task"):
        cli.main(["compare", "--corpus", str(tmp_path / "long.txt"), "--steps", "1", "--out", str(tmp_path / "x")])


def test_compare_cpu_preset_is_offered_and_valid(monkeypatch):
    """The cpu preset (its training takes minutes: only its wiring and settings are checked here)."""
    from fastencoder import compare
    from fastencoder.compare import experiment

    calls = []
    monkeypatch.setattr(compare, "run", lambda **arguments: calls.append(arguments))
    assert cli.main(["compare", "--preset", "cpu", "--seeds", "3"]) == 0
    assert calls[0]["preset"] == "cpu" and calls[0]["seeds"] == 3
    cpu, tiny = compare.PRESETS["cpu"], compare.PRESETS["tiny"]
    assert cpu.steps * cpu.batch_size > tiny.steps * tiny.batch_size  # more pretraining than the quick look
    assert cpu.embedding_size < cpu.hidden_size  # ALBERT's embeddings factorised
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        dataclasses.replace(cpu, num_attention_heads=3)
    with pytest.raises(ValueError, match="steps must be a positive integer.*warmup_share must be in"):
        dataclasses.replace(cpu, steps=0, warmup_share=1.0)
    with pytest.raises(ValueError, match="preset must be one of"):
        experiment.run(preset="gpu")
