"""Training after `fastencoder.optimize`: Hugging Face Trainer and DistributedDataParallel.

Dropout is off so that the optimized and untouched models follow the same trajectory; the same
math in another order drifts by a few fp32 ulps per step, far inside the 1e-4 relative tolerance
on the first steps' losses.
"""
import copy
import datetime
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import transformers

import fastencoder
from fastencoder import models
from test_albert import albert_config
from test_bert import bert_config

CONFIGS = {"bert": (bert_config, transformers.BertForSequenceClassification),
           "albert": (albert_config, transformers.AlbertForSequenceClassification)}


def classification_data(config, count=64, seqlen=12, seed=0):
    """A learnable task: the label says whether token 7 occurs in the (ragged) sequence."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(3, seqlen + 1, (), generator=generator))
        ids = torch.randint(8, config.vocab_size, (seqlen,), generator=generator)
        label = int(torch.rand((), generator=generator) < 0.5)
        if label:
            ids[int(torch.randint(0, length, (), generator=generator))] = 7
        mask = (torch.arange(seqlen) < length).long()
        rows.append(dict(input_ids=ids * mask, attention_mask=mask, labels=torch.tensor(label)))
    return rows


def train_losses(model, data, output_dir, steps=40):
    arguments = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=8, max_steps=steps, learning_rate=2e-3,
        logging_steps=1, report_to=[], seed=0, use_cpu=True, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=data)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("kind", CONFIGS)
def test_trainer_fine_tuning_follows_the_untouched_model(kind, tmp_path, torch_backend):
    make_config, task_class = CONFIGS[kind]
    config = make_config()
    torch.manual_seed(0)
    untouched = task_class(config)
    optimized = fastencoder.optimize(copy.deepcopy(untouched))
    assert type(getattr(optimized, optimized.base_model_prefix)) in (models.BertModel, models.AlbertModel)
    data = classification_data(config)
    expected = train_losses(untouched, data, tmp_path / "untouched")
    got = train_losses(optimized, data, tmp_path / "optimized")
    assert len(got) == len(expected) == 40
    torch.testing.assert_close(torch.tensor(got[:5]), torch.tensor(expected[:5]), rtol=1e-4, atol=1e-5)
    assert sum(got[-5:]) < 0.8 * sum(got[:5]), f"loss did not fall: {got}"


def _ddp_worker(rank, world_size, work_dir):
    fastencoder.set_backend("torch")
    dist.init_process_group("gloo", init_method=f"file://{work_dir}/init", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    inputs = torch.load(os.path.join(work_dir, "inputs.pt"), weights_only=True)
    model = fastencoder.optimize(transformers.BertForSequenceClassification(bert_config()))
    model.load_state_dict(inputs["state"])
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = inputs["batch"]["input_ids"].shape[0] // world_size
    shard = {key: value[rank * half:(rank + 1) * half] for key, value in inputs["batch"].items()}
    ddp(**shard).loss.backward()
    if rank == 0:
        torch.save({name: p.grad for name, p in model.named_parameters()}, os.path.join(work_dir, "grads.pt"))
    dist.barrier()
    # Leave at once: tearing down DDP's reducer joins gloo's worker thread while holding the GIL that
    # thread may need to free its last work item (seen: a deadlock at exit, 1 run in 3).
    os._exit(0)


def test_ddp_step_matches_one_process_on_the_full_batch(tmp_path, torch_backend):
    config = bert_config()
    torch.manual_seed(0)
    model = fastencoder.optimize(transformers.BertForSequenceClassification(config))
    rows = classification_data(config, count=8)
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    model(**batch).loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters()}

    torch.save(dict(state=model.state_dict(), batch=batch), tmp_path / "inputs.pt")
    # two ranks spawned from a fresh interpreter, with a deadline: whatever state earlier tests left
    # in this process cannot reach them, and a stuck collective fails the test instead of hanging it
    launch = (f"import torch.multiprocessing as mp, test_training\n"
              f"mp.spawn(test_training._ddp_worker, args=(2, {str(tmp_path)!r}), nprocs=2, join=True)")
    subprocess.run([sys.executable, "-c", launch], cwd=os.path.dirname(__file__), check=True, timeout=300)
    got = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert got.keys() == expected.keys()
    for name in expected:
        # DDP averages the two half-batch gradients: the full batch's mean loss gradient
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
