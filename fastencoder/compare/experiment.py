"""The comparison: presets, the two models' configs, and the run from corpus to report."""
import collections
import copy
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import corpus, pretraining_data, tasks, training
from .seeds import summary

HELD_OUT_DOCUMENTS = 0.1
PRETRAINING_EVAL_PAIRS = 256
MIN_MAX_LENGTH = 32  # room for [CLS] A [SEP] B [SEP], and for a question with a passage


@dataclass(frozen=True)
class Preset:
    vocab_size: int
    max_length: int  # pretraining pairs; fine-tuning uses qa_max_length for QA, max_length otherwise
    qa_max_length: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    embedding_size: int  # ALBERT's factorised embeddings; BERT's are hidden_size wide
    dropout: float
    batch_size: int
    steps: int
    learning_rate: float
    classification_examples: int  # training examples; the evaluation split has a quarter as many
    qa_examples: int
    fine_tune_steps: int  # classification's
    qa_fine_tune_steps: int
    fine_tune_batch_size: int
    fine_tune_learning_rate: float
    warmup_share: float = 0.1

    def __post_init__(self):
        whole = {name: getattr(self, name) for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "embedding_size", "batch_size", "steps", "classification_examples", "qa_examples", "fine_tune_steps",
            "qa_fine_tune_steps", "fine_tune_batch_size")}
        problems = [f"{name} must be a positive integer, got {value!r}" for name, value in whole.items()
                    if not isinstance(value, int) or value < 1]
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                            f"({self.num_attention_heads})")
        if self.embedding_size > self.hidden_size:
            problems.append(f"embedding_size ({self.embedding_size}) must not exceed hidden_size ({self.hidden_size})")
        if self.max_length < MIN_MAX_LENGTH or self.qa_max_length < MIN_MAX_LENGTH:
            problems.append(f"max_length and qa_max_length must be at least {MIN_MAX_LENGTH}, got "
                            f"{self.max_length} and {self.qa_max_length}")
        problems += [f"{name} must be in [0, 1), got {getattr(self, name)!r}" for name in ("dropout", "warmup_share")
                     if not 0 <= getattr(self, name) < 1]
        problems += [f"{name} must be positive, got {getattr(self, name)!r}"
                     for name in ("learning_rate", "fine_tune_learning_rate") if not getattr(self, name) > 0]
        if problems:
            raise ValueError("invalid preset: " + "; ".join(problems))


PRESETS = {
    # a quick look on a CPU: 3 layers of width 128 (ALBERT's embeddings 64 wide, half the hidden size, so that
    # they are factorised at this width too)
    "tiny": Preset(vocab_size=2048, max_length=64, qa_max_length=96, hidden_size=128, num_hidden_layers=3,
                   num_attention_heads=2, intermediate_size=512, embedding_size=64, dropout=0.0, batch_size=16,
                   steps=200, learning_rate=1e-3, classification_examples=2000, qa_examples=2000,
                   fine_tune_steps=150, qa_fine_tune_steps=150, fine_tune_batch_size=16,
                   fine_tune_learning_rate=1e-3),
    # for a CPU in minutes: tiny's model with 20 times its pretraining (1,000 steps of 64 pairs; the
    # learning rate 2e-3, which this width takes without diverging); fine-tuning in steps of 32 at 1e-3,
    # 600 steps for classification and 2,500 for QA (ALBERT's QA exact match, seed 0: 29 % after 1,500
    # steps at 2e-3, 23 % at 1e-3, 64 % after 2,500 at 1e-3); QA passages of up to 40 words
    "cpu": Preset(vocab_size=2048, max_length=64, qa_max_length=80, hidden_size=128, num_hidden_layers=3,
                  num_attention_heads=2, intermediate_size=512, embedding_size=64, dropout=0.0, batch_size=64,
                  steps=1000, learning_rate=2e-3, classification_examples=4000, qa_examples=6000,
                  fine_tune_steps=600, qa_fine_tune_steps=2500, fine_tune_batch_size=32,
                  fine_tune_learning_rate=1e-3, warmup_share=0.05),
    "small": Preset(vocab_size=16384, max_length=128, qa_max_length=192, hidden_size=512, num_hidden_layers=8,
                    num_attention_heads=8, intermediate_size=2048, embedding_size=128, dropout=0.1, batch_size=64,
                    steps=5000, learning_rate=5e-4, classification_examples=8000, qa_examples=8000,
                    fine_tune_steps=1000, qa_fine_tune_steps=1000, fine_tune_batch_size=32,
                    fine_tune_learning_rate=1e-4),
    # BERT-base and ALBERT-base (Devlin et al. 2019, Lan et al. 2020), sequence length 128
    "base": Preset(vocab_size=30522, max_length=128, qa_max_length=256, hidden_size=768, num_hidden_layers=12,
                   num_attention_heads=12, intermediate_size=3072, embedding_size=128, dropout=0.1, batch_size=128,
                   steps=10000, learning_rate=1e-4, classification_examples=16000, qa_examples=16000,
                   fine_tune_steps=2000, qa_fine_tune_steps=2000, fine_tune_batch_size=32,
                   fine_tune_learning_rate=5e-5, warmup_share=0.01),
}

OBJECTIVES = {"bert": "mlm+nsp", "albert": "mlm+sop"}
NAMES = {"bert": "BERT", "albert": "ALBERT"}


def model_configs(preset, vocabulary):
    """BERT and ALBERT of the same width, depth and heads; ALBERT with factorised embeddings and one
    set of layer parameters shared by every layer; each with its paper's activation."""
    import transformers

    common = dict(
        vocab_size=vocabulary.size, hidden_size=preset.hidden_size, num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads, intermediate_size=preset.intermediate_size,
        hidden_dropout_prob=preset.dropout, attention_probs_dropout_prob=preset.dropout,
        max_position_embeddings=max(preset.max_length, preset.qa_max_length), type_vocab_size=2,
        pad_token_id=vocabulary.pad,
    )
    return dict(
        bert=transformers.BertConfig(hidden_act="gelu", **common),
        albert=transformers.AlbertConfig(hidden_act="gelu_new", embedding_size=preset.embedding_size,
                                         num_hidden_groups=1, inner_group_num=1,
                                         classifier_dropout_prob=preset.dropout, bos_token_id=vocabulary.cls,
                                         eos_token_id=vocabulary.sep, **common),
    )


def model_classes(kind):
    import fastencoder

    prefix = NAMES[kind].capitalize()
    return {task: getattr(fastencoder, f"{prefix}For{task}")
            for task in ("PreTraining", "SequenceClassification", "QuestionAnswering")}


def parameter_counts(model):
    """Parameters of the whole model (tied weights once), of its embeddings and of its encoder."""
    count = lambda module: sum(p.numel() for p in module.parameters())
    base = model.base_model
    return dict(total=count(model), embeddings=count(base.embeddings), encoder=count(base.encoder))


def transfer_encoder(pretrained, task_model):
    """Copy the pretrained encoder into a task model (whose QA variant has no pooler)."""
    missing, unexpected = task_model.base_model.load_state_dict(pretrained.base_model.state_dict(), strict=False)
    if missing or any(not key.startswith("pooler") for key in unexpected):
        raise RuntimeError(f"encoder weights do not match: missing {missing}, unexpected {unexpected}")


def environment(device, dtype, unpad):
    import tokenizers
    import transformers

    import fastencoder
    from fastencoder.kernels.backend import use_triton

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return dict(
        device=name, device_type=device.type, dtype=str(dtype).removeprefix("torch."),
        ops="Triton kernels" if use_triton(device) else "PyTorch reference ops", unpad=unpad,
        fastencoder=fastencoder.__version__, torch=torch.__version__, transformers=transformers.__version__,
        tokenizers=tokenizers.__version__, triton=triton_version, python=platform.python_version(),
    )


class Phases:
    """Wall time of each phase of the run."""

    def __init__(self):
        self.seconds = {}
        self.start = time.perf_counter()

    def done(self, name):
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self.start, 1)  # summed over seeds
        self.start = now


def prepare_data(preset, corpus_paths, tokenizer_dir, classification_file, qa_file, seed, out):
    """Corpus, tokenizer, pretraining pairs and task features, shared by both models."""
    documents = corpus.file_documents(corpus_paths) if corpus_paths else corpus.stdlib_documents()
    train_documents, held_out_documents = corpus.split_documents(documents, HELD_OUT_DOCUMENTS, seed)
    if tokenizer_dir:
        tokenizer = corpus.load_tokenizer(tokenizer_dir)
    else:
        tokenizer = corpus.train_tokenizer(train_documents, preset.vocab_size)
        (out / "tokenizer").mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(out / "tokenizer" / "tokenizer.json"))
    vocabulary = pretraining_data.Vocabulary.of(tokenizer)
    train_ids = pretraining_data.tokenize_documents(tokenizer, train_documents)
    held_out_ids = pretraining_data.tokenize_documents(tokenizer, held_out_documents)
    # the unigram baseline of masked-LM accuracy: the training documents' commonest token, everywhere
    tokens = collections.Counter(token for document in train_ids for sentence in document for token in sentence)
    commonest = tokens.most_common(1)[0][0]
    data = dict(tokenizer=tokenizer, vocabulary=vocabulary, pairs={}, eval_pairs={}, seed=seed, commonest=commonest,
                corpus=dict(source=", ".join(map(str, corpus_paths)) if corpus_paths else
                            "Python standard library docstrings (PSF License)",
                            documents=len(documents), held_out_documents=len(held_out_documents),
                            tokens=sum(len(s) for d in train_ids + held_out_ids for s in d),
                            vocab_size=vocabulary.size))
    for objective in OBJECTIVES.values():
        data["pairs"][objective] = pretraining_data.make_pairs(train_ids, preset.max_length, objective, seed)
        data["eval_pairs"][objective] = pretraining_data.make_pairs(
            held_out_ids, preset.max_length, objective, seed)[:PRETRAINING_EVAL_PAIRS]
    data["corpus"]["pairs"] = len(data["pairs"]["mlm+nsp"])

    eval_count = max(1, preset.classification_examples // 4)
    if classification_file:
        train, evaluation, names = tasks.load_classification(classification_file, seed)
        data["classification"] = dict(name=Path(classification_file).name, labels=names)
    else:
        train = tasks.word_order_examples(train_documents, preset.classification_examples, seed)
        evaluation = tasks.word_order_examples(held_out_documents, eval_count, seed)
        if not train or not evaluation:
            raise ValueError("the corpus is too small to build the classification task from it; "
                             "give one with --classification")
        data["classification"] = dict(name="word order (built from the corpus)", labels=["reversed", "as written"])
    data["classification"].update(
        train=tasks.classification_features(tokenizer, train, vocabulary, preset.max_length),
        eval=tasks.classification_features(tokenizer, evaluation, vocabulary, preset.max_length),
        majority_baseline=tasks.majority_baseline([label for _, label in train], [label for _, label in evaluation]),
        sizes=(len(train), len(evaluation)), examples=evaluation[:3],
    )

    if qa_file:
        train, evaluation = tasks.load_squad(qa_file, seed)
        data["qa"] = dict(name=Path(qa_file).name, baselines={})
    else:
        passage_words = preset.qa_max_length // 2
        train = tasks.backwards_sentence_examples(train_documents, preset.qa_examples, passage_words, seed)
        evaluation = tasks.backwards_sentence_examples(held_out_documents, max(1, preset.qa_examples // 4),
                                                       passage_words, seed)
        if not train or not evaluation:
            raise ValueError("the corpus is too small to build the question-answering task from it; "
                             "give one with --qa")
        data["qa"] = dict(name="backwards sentence (built from the corpus)",
                          baselines=tasks.backwards_sentence_baselines(evaluation))
    train_tensors, _ = tasks.qa_features(tokenizer, train, vocabulary, preset.qa_max_length, training=True)
    eval_tensors, eval_offsets = tasks.qa_features(tokenizer, evaluation, vocabulary, preset.qa_max_length,
                                                   training=False)
    data["qa"].update(train=train_tensors, eval=eval_tensors, eval_offsets=eval_offsets, eval_examples=evaluation,
                      sizes=(len(train_tensors["input_ids"]), len(evaluation)), examples=evaluation[:3])
    return data


def run_model(kind, config, preset, data, steps, seed, device, unpad, phases):
    """Pretrain one model, evaluate it, fine-tune it on both tasks; its part of compare.json."""
    classes = model_classes(kind)
    objective = OBJECTIVES[kind]
    pair_label = pretraining_data.OBJECTIVES[objective]
    name = NAMES[kind]
    torch.manual_seed(seed)
    # the masked-LM head scores the masked positions only (15 %); scoring all took a quarter of BERT's step
    model = classes["PreTraining"](config, unpad=unpad, sparse_prediction=True).to(device)
    batches = pretraining_data.pretraining_batches(data["pairs"][objective], data["vocabulary"], objective,
                                                   preset.batch_size, steps, seed)
    pretraining = training.pretrain(model, batches, steps, preset.learning_rate, preset.warmup_share, device,
                                    f"{name} pretraining ({objective.upper()})")
    # the held-out pairs once each, masked once, the same masks for every seed of the run
    generator = torch.Generator().manual_seed(data["seed"] + 1)
    eval_pairs = data["eval_pairs"][objective]
    eval_batches = [pretraining_data.pretraining_batch(eval_pairs[i:i + preset.batch_size], data["vocabulary"],
                                                       objective, generator)
                    for i in range(0, len(eval_pairs), preset.batch_size)]
    mlm_accuracy, pair_accuracy = training.evaluate_pretraining(model, eval_batches, pair_label, device)
    masked = torch.cat([batch["labels"][batch["labels"] != -100] for batch in eval_batches])
    mlm_unigram_baseline = (masked == data["commonest"]).double().mean().item()
    pair_baseline = tasks.majority_baseline([pair.label for pair in data["pairs"][objective]],
                                            [pair.label for pair in eval_pairs])
    phases.done(f"{kind} pretraining")

    scaled = lambda preset_steps: max(1, round(preset_steps * steps / preset.steps))  # with --steps
    classification_steps, qa_steps = scaled(preset.fine_tune_steps), scaled(preset.qa_fine_tune_steps)
    classification = data["classification"]
    classifier_config = copy.deepcopy(config)
    classifier_config.num_labels = len(classification["labels"])
    classifier = classes["SequenceClassification"](classifier_config, unpad=unpad).to(device)
    transfer_encoder(model, classifier)
    training.fine_tune(classifier, classification["train"], classification_steps, preset.fine_tune_batch_size,
                       preset.fine_tune_learning_rate, preset.warmup_share, device,
                       f"{name} classification", seed)
    accuracy = training.classification_accuracy(classifier, classification["eval"], preset.fine_tune_batch_size, device)
    phases.done(f"{kind} classification")

    qa = data["qa"]
    reader = classes["QuestionAnswering"](config, unpad=unpad).to(device)
    transfer_encoder(model, reader)
    training.fine_tune(reader, qa["train"], qa_steps, preset.fine_tune_batch_size,
                       preset.fine_tune_learning_rate, preset.warmup_share, device, f"{name} question answering",
                       seed)
    exact_match, f1 = training.qa_scores(reader, qa["eval"], qa["eval_offsets"], qa["eval_examples"],
                                         preset.fine_tune_batch_size, device)
    phases.done(f"{kind} question answering")
    return dict(
        config=config.to_diff_dict() | dict(model_type=config.model_type),
        parameters=parameter_counts(model),
        pretraining=dict(objective=objective, steps=steps, loss=pretraining["loss"], mlm_accuracy=mlm_accuracy,
                         pair_accuracy=pair_accuracy, tokens_per_s=pretraining["tokens_per_s"],
                         peak_memory_bytes=pretraining["peak_memory_bytes"],
                         mlm_unigram_baseline=mlm_unigram_baseline, pair_baseline=pair_baseline),
        classification=dict(accuracy=accuracy, majority_baseline=classification["majority_baseline"],
                            steps=classification_steps),
        qa=dict(exact_match=exact_match, f1=f1, trivial_baselines=qa["baselines"], steps=qa_steps),
    )


def run(preset="tiny", corpus_paths=(), classification_file=None, qa_file=None, tokenizer_dir=None, steps=None,
        seed=0, seeds=1, out=Path("compare")):
    """Run the comparison and write compare.json, compare.md and the plots into `out`; returns the
    compare.json dict. Each model runs `seeds` times (seeds seed, seed + 1, ...: initialisation and
    data order; the data itself comes from `seed`), its entry the mean and spread of the runs."""
    from . import report

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    settings = PRESETS[preset]
    steps = settings.steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from fastencoder.kernels.backend import use_triton

    # Padding-free execution pays with the Triton kernels; on the PyTorch path the packed attention
    # runs one sequence at a time, so the padded path is kept there.
    unpad = "auto" if use_triton(device) else False
    phases = Phases()
    data = prepare_data(settings, list(corpus_paths), tokenizer_dir, classification_file, qa_file, seed, out)
    phases.done("data")
    configs = model_configs(settings, data["vocabulary"])
    result = dict(environment=environment(device, torch.float32, unpad), preset=preset,
                  seeds=list(range(seed, seed + seeds)), models={})
    for kind in ("bert", "albert"):
        runs = [run_model(kind, configs[kind], settings, data, steps, run_seed, device, unpad, phases)
                for run_seed in result["seeds"]]
        result["models"][kind] = summary(runs)
    report.write(result, data, settings, phases.seconds, out)
    return result

