"""`fastencoder compare`: BERT against ALBERT, pretrained (MLM+NSP / MLM+SOP) and fine-tuned
(sentence classification, extractive QA) on the same data and budget, on fastencoder's models.

corpus.py reads the text and trains the tokenizer, pretraining_data.py makes the sentence pairs and
masks, tasks.py builds the downstream tasks and their metrics, training.py holds the loops,
experiment.py the presets and the run, report.py the outputs.
"""
from .experiment import PRESETS, run

__all__ = ["PRESETS", "run"]
