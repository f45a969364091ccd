"""Text for the comparison: documents split into sentences, and a WordPiece tokenizer trained on them.

The default corpus is the docstrings of Python's standard library, read from the installed source
files with `ast` (no module is imported, so nothing runs): real English prose, present on every
machine that has Python, without a download. Python is distributed under the PSF License Agreement
(https://docs.python.org/3/license.html), which permits copying and using its source, docstrings
included; the text is used as training data and not redistributed. Test suites (`test/`, `tests/`,
`idle_test/`) and installed packages (`site-packages`) are left out, and so is whatever in a
docstring is not prose: doctest sessions, indented blocks (code, option lists), tables.

User corpora are text files whose documents are separated by blank lines.
"""
import ast
import random
import re
import sysconfig
from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SKIPPED_DIRECTORIES = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

# a sentence ends at . ! or ? followed by white space and a capital letter, a digit or a quote
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
# a paragraph counts as prose when letters and spaces make up most of it
_MIN_PROSE_SHARE = 0.85


def split_sentences(text):
    """The sentences of a paragraph, white space collapsed."""
    text = " ".join(text.split())
    return [sentence for sentence in _SENTENCE_END.split(text) if sentence]


def prose_paragraphs(docstring):
    """The paragraphs of a docstring that read as prose."""
    for paragraph in re.split(r"\n\s*\n", docstring):
        lines = [line for line in paragraph.splitlines() if line.strip()]
        if not lines or any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):
            continue
        flat = " ".join(line.strip() for line in lines)
        if sum(ch.isalpha() or ch == " " for ch in flat) >= _MIN_PROSE_SHARE * len(flat):
            yield flat


def stdlib_files(seed=0):
    """The standard library's source files, in an order shuffled by `seed` (so that a corpus cut
    short samples every part of the library)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in root.rglob("*.py")
                   if not SKIPPED_DIRECTORIES.intersection(path.relative_to(root).parts))
    random.Random(seed).shuffle(files)
    return files


def docstrings(path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return  # a few files are templates or written for another Python version
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text:
                yield text


def stdlib_documents(max_chars=None, seed=0):
    """Documents (lists of sentences) from the standard library's docstrings: one docstring, one
    document. With `max_chars`, files are read until the documents hold that much text."""
    documents, total = [], 0
    for path in stdlib_files(seed):
        for text in docstrings(path):
            sentences = [s for paragraph in prose_paragraphs(text) for s in split_sentences(paragraph)]
            if sentences:
                documents.append(sentences)
                total += sum(map(len, sentences))
        if max_chars is not None and total >= max_chars:
            break
    return documents


def file_documents(paths):
    """Documents from text files: blank lines separate documents."""
    documents = []
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        for block in re.split(r"\n\s*\n", text):
            sentences = split_sentences(block)
            if sentences:
                documents.append(sentences)
    if not documents:
        raise ValueError(f"no text found in {', '.join(map(str, paths))}")
    return documents


def split_documents(documents, held_out, seed=0):
    """(training documents, held-out documents): a seeded random `held_out` share of the documents
    is kept away from pretraining and fine-tuning, for evaluation."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(held_out * len(documents)))
    return [documents[i] for i in sorted(order[cut:])], [documents[i] for i in sorted(order[:cut])]


def train_tokenizer(documents, vocab_size):
    """A lower-casing WordPiece tokenizer (BERT's normaliser and pre-tokeniser) trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    tokenizer.train_from_iterator((sentence for document in documents for sentence in document), trainer)
    return tokenizer


def load_tokenizer(directory):
    """A tokenizer saved as DIR/tokenizer.json (this package or Hugging Face's save_pretrained) or a
    BERT vocabulary DIR/vocab.txt; it must know every special token."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    elif (directory / "vocab.txt").is_file():
        tokenizer = BertWordPieceTokenizer(str(directory / "vocab.txt"), lowercase=True)
    else:
        raise FileNotFoundError(f"{directory} holds neither tokenizer.json nor vocab.txt")
    missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
    if missing:
        raise ValueError(f"the tokenizer in {directory} lacks the special tokens {missing}")
    return tokenizer
