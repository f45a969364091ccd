"""Training and evaluation loops, the same for both models: AdamW with linear warm-up and linear
decay, gradients clipped to norm 1 (as BERT), fp32 weights."""
import sys
import time

import torch

from .tasks import best_span, squad_scores

WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0


def progress(iterable, total, description):
    """A progress bar (tqdm, from the bench extra) or, without tqdm, a line every tenth of the way."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _ProgressLines(iterable, total, description)
    return tqdm(iterable, total=total, desc=description, leave=True, dynamic_ncols=True)


class _ProgressLines:
    def __init__(self, iterable, total, description):
        self.iterable, self.total, self.description = iterable, total, description

    def __iter__(self):
        marks = {max(1, round(self.total * tenth / 10)) for tenth in range(1, 11)}
        for done, item in enumerate(self.iterable, 1):
            yield item
            if done in marks:
                print(f"{self.description}: {done}/{self.total}", file=sys.stderr, flush=True)

    def set_postfix(self, **_):
        pass


def optimizer_and_schedule(model, learning_rate, steps, warmup_share):
    """AdamW (no weight decay on biases and LayerNorm weights) and its learning-rate schedule."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    # fused: one op over all parameters instead of a dozen per tensor (on the CPU and GPUs alike)
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=WEIGHT_DECAY),
                                   dict(params=no_decay, weight_decay=0.0)], lr=learning_rate, eps=1e-6, fused=True)
    warmup = max(1, round(warmup_share * steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def on_device(batch, device):
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def train_step(model, batch, optimizer, schedule):
    """One optimiser step on `batch` (the model's keyword arguments, labels included); returns the loss."""
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pretrain(model, batches, steps, learning_rate, warmup_share, device, description):
    """Pretrain on `batches`; returns the loss of every step, the real (non-padding) tokens per second
    of the model's steps (forward, backward, optimiser; the data preparation not counted) and the
    peak memory allocated on a CUDA device (None elsewhere)."""
    model.train()
    optimizer, schedule = optimizer_and_schedule(model, learning_rate, steps, warmup_share)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, tokens, seconds = [], 0, 0.0
    bar = progress(batches, steps, description)
    for batch in bar:
        batch = on_device(batch, device)
        _synchronize(device)
        start = time.perf_counter()
        loss = train_step(model, batch, optimizer, schedule).item()  # .item() waits for the step
        seconds += time.perf_counter() - start
        tokens += int(batch["attention_mask"].sum())
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return dict(loss=losses, tokens_per_s=tokens / seconds, peak_memory_bytes=peak)


@torch.no_grad()
def evaluate_pretraining(model, batches, pair_label, device):
    """(MLM accuracy over the masked tokens, accuracy of the NSP / SOP prediction). With the labels
    given, a sparse_prediction model scores the masked positions only."""
    model.eval()
    mlm_right = mlm_total = pair_right = pair_total = 0
    for batch in batches:
        batch = on_device(batch, device)
        labels, pairs = batch["labels"], batch.pop(pair_label)
        prediction_logits, pair_logits = model(**batch).to_tuple()[:2]  # (no loss without the pair labels)
        chosen = labels != -100
        predicted = prediction_logits.argmax(-1)
        if not getattr(model, "sparse_prediction", False):  # dense logits: every position scored
            predicted = predicted[chosen]
        mlm_right += int((predicted == labels[chosen]).sum())
        mlm_total += int(chosen.sum())
        pair_right += int((pair_logits.argmax(-1) == pairs).sum())
        pair_total += len(pairs)
    return mlm_right / mlm_total, pair_right / pair_total


def _trimmed(tensors, rows):
    """The rows of a feature dict, cut to the longest of them."""
    picked = {name: value[rows] for name, value in tensors.items()}
    length = int(picked["attention_mask"].sum(1).max())
    return {name: value[:, :length] if value.dim() == 2 else value for name, value in picked.items()}


def feature_batches(tensors, batch_size, steps=None, seed=0):
    """Batches of a feature dict: `steps` shuffled ones, epoch after epoch, or with steps=None each
    row once, in order."""
    rows = len(tensors["input_ids"])
    if steps is None:
        for start in range(0, rows, batch_size):
            yield _trimmed(tensors, torch.arange(start, min(rows, start + batch_size)))
        return
    generator = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        order = torch.randperm(rows, generator=generator)
        for start in range(0, max(1, rows - batch_size + 1), batch_size):
            if step == steps:
                return
            yield _trimmed(tensors, order[start:start + batch_size])
            step += 1


def fine_tune(model, tensors, steps, batch_size, learning_rate, warmup_share, device, description, seed=0):
    """`steps` optimiser steps on shuffled batches of a task's features (labels included)."""
    model.train()
    optimizer, schedule = optimizer_and_schedule(model, learning_rate, steps, warmup_share)
    bar = progress(feature_batches(tensors, batch_size, steps, seed), steps, description)
    for batch in bar:
        loss = train_step(model, on_device(batch, device), optimizer, schedule)
        bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def classification_accuracy(model, tensors, batch_size, device):
    model.eval()
    right = 0
    for batch in feature_batches(tensors, batch_size):
        batch = on_device(batch, device)
        labels = batch.pop("labels")
        right += int((model(**batch).logits.argmax(-1) == labels).sum())
    return right / len(tensors["labels"])


@torch.no_grad()
def qa_predictions(model, tensors, offsets, examples, batch_size, device):
    """The predicted answer text of every question."""
    model.eval()
    predictions = []
    for batch in feature_batches(tensors, batch_size):
        output = model(**on_device(batch, device))
        for start_logits, end_logits in zip(output.start_logits.float().cpu(), output.end_logits.float().cpu()):
            example = examples[len(predictions)]
            token_offsets = offsets[len(predictions)]
            start, end = best_span(start_logits, end_logits, token_offsets)
            predictions.append(example["context"][token_offsets[start][0]:token_offsets[end][1]])
    return predictions


def qa_scores(model, tensors, offsets, examples, batch_size, device):
    return squad_scores(qa_predictions(model, tensors, offsets, examples, batch_size, device), examples)
