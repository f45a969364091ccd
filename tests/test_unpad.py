"""Padding-free execution: the gather / scatter kernels (kernels/padding.py) and the models' `unpad`
option, against the padded path and Hugging Face.

Tolerances are test_bert.py's: FP32_TOL = 1e-5 of the magnitude. The padding-free path computes the
same math as the padded one on the same rows (the gather and scatter copy values exactly; the
attention sees the same keys, now bounded by cu_seqlens instead of masked), so the only differences
are the reduction orders test_bert.py's tolerance was measured for (a few fp32 ulps).
"""
import copy
import warnings

import pytest
import torch
import transformers
from helpers import assert_close

import fastencoder
from fastencoder import models
from fastencoder.kernels import padding
from fastencoder.models import layers, packing
from fastencoder.models.inputs import HF_PACKS_SEQUENCES_BY_POSITION
from test_albert import albert_config
from test_bert import FP32_TOL, assert_same_grads, bert_config, twin_models

PADDING_KERNELS = {"_unpad_kernel", "_pad_kernel"}
PACKED_ATTENTION_KERNELS = {"_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"}


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    request.getfixturevalue(f"{request.param}_backend")
    return request.param


@pytest.fixture
def plans(monkeypatch):
    """The layout each forward ran on: a PackedTokens (padding-free) or None (padded)."""
    seen = []
    plan = layers.plan_unpadding

    def recording_plan(*args):
        packing, maybe_padded = plan(*args)
        seen.append(packing)
        return packing, maybe_padded

    monkeypatch.setattr(layers, "plan_unpadding", recording_plan)
    return seen


def mask_from_rows(rows):
    """attention_mask from strings: 1 = real token, 0 = padding."""
    return torch.tensor([[int(c) for c in row] for row in rows])


# ---------------------------------------------------------------- the kernels


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # copies: no tl.dot
def test_kernels_match_reference(device, triton_backend, poisoned_allocations, kernel_launches, index_dtype, dtype):
    """3 x 13 positions (39: three 16-row blocks, the last partial) of 300 features (two 256-wide
    column blocks): a full row, an empty row, holes. Values are copied exactly, padding is zeros,
    and each op's gradient is the other op."""
    mask = torch.rand(3, 13, device=device) < 0.6
    mask[0] = True
    mask[1] = False
    indices = mask.flatten().nonzero()[:, 0].to(index_dtype)
    hidden = torch.randn(3, 13, 300, device=device, dtype=dtype, requires_grad=True)
    rows = padding.unpad(hidden, indices)
    torch.testing.assert_close(rows, padding.unpad_reference(hidden, indices), rtol=0, atol=0)
    padded = padding.pad(rows, indices, 3, 13)
    torch.testing.assert_close(padded, torch.where(mask[..., None], hidden, 0.0), rtol=0, atol=0)
    grad = torch.randn_like(padded)
    padded.backward(grad)
    torch.testing.assert_close(hidden.grad, torch.where(mask[..., None], grad, 0.0), rtol=0, atol=0)
    assert kernel_launches.count("_unpad_kernel") == 2 and kernel_launches.count("_pad_kernel") == 2


def test_feature_dims_and_empty_inputs(device, triton_backend, poisoned_allocations):
    hidden = torch.randn(2, 5, 3, 4, device=device)
    indices = torch.tensor([0, 4, 6, 9], device=device)
    rows = padding.unpad(hidden, indices)
    assert rows.shape == (4, 3, 4)
    torch.testing.assert_close(padding.pad(rows, indices, 2, 5), padding.pad_reference(rows, indices, 2, 5))
    none = indices[:0]
    assert padding.unpad(hidden, none).shape == (0, 3, 4)
    assert torch.equal(padding.pad(rows[:0], none, 2, 5), torch.zeros(2, 5, 3, 4, device=device))


@pytest.mark.parametrize("call, error, match", [
    (lambda h, i: padding.unpad(h.long(), i), TypeError, "float16, bfloat16 or float32"),
    (lambda h, i: padding.unpad(h, i.float()), TypeError, "int32 or int64"),
    (lambda h, i: padding.unpad(h, i[None]), ValueError, "1-D"),
    (lambda h, i: padding.unpad(h, i.flip(0)), ValueError, "not strictly increasing"),
    (lambda h, i: padding.unpad(h, i + 8), ValueError, r"\[0, 10\)"),
    (lambda h, i: padding.pad(h[0], i, 2, 5), ValueError, "rows has 5 rows but indices lists 3"),
    (lambda h, i: padding.pad(h[0, :3], i, 2, -1), ValueError, "seqlen"),
])
def test_bad_inputs_are_refused(triton_backend, kernel_launches, call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 5, 4), torch.tensor([1, 3, 7]))
    assert kernel_launches == []


@pytest.mark.parametrize("inference", [False, True], ids=["normal tensor", "inference tensor"])
def test_indices_changed_in_place_are_checked_again(triton_backend, kernel_launches, inference):
    """indices are read back once and remembered while unchanged; an in-place change is seen."""
    hidden = torch.randn(2, 5, 4)
    with torch.inference_mode(inference):
        indices = torch.tensor([1, 3, 7])
        padding.unpad(hidden, indices)
        launches = len(kernel_launches)
        indices[2] = 10
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            padding.unpad(hidden, indices)
    assert len(kernel_launches) == launches


def test_traceable_by_torch_compile(device, triton_backend):
    indices = torch.tensor([0, 2, 3, 5], device=device)
    hidden = torch.randn(2, 3, 8, device=device)
    round_trip = torch.compile(lambda h, i: padding.pad(padding.unpad(h, i) * 2, i, 2, 3), fullgraph=True,
                               backend="aot_eager")
    expected = padding.pad_reference(padding.unpad_reference(hidden, indices) * 2, indices, 2, 3)
    torch.testing.assert_close(round_trip(hidden, indices), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- the models

CASES = {
    "right padding": ["11111111", "11111000", "11000000"],
    "left padding": ["11111111", "00011111", "00000011"],
    "one-token sequences": ["10000000", "11111111", "00000001"],
    "no padding": ["11111111", "11111111"],
    "batch of one": ["11111000"],
}


def first_real_pooler(model, last_hidden_state, attention_mask):
    """Hugging Face's pooler applied to each row's first real token: the rule under unpadding (the
    same as Hugging Face's position 0 unless a row is left-padded)."""
    first = attention_mask.argmax(1)
    rows = last_hidden_state[torch.arange(len(first)), first]
    return torch.tanh(model.pooler.dense(rows))


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_padding_free_matches_padded_path_and_transformers(case, backend, kernel_launches, plans):
    """last_hidden_state on real positions (zeros at padding), the pooler output and every
    parameter's gradient: padding-free (unpad=True) = padded path = Hugging Face."""
    config = bert_config(max_position_embeddings=8)
    reference, ours = twin_models(transformers.BertModel, models.BertModel, config)
    _, padded = twin_models(transformers.BertModel, models.BertModel, config)
    padded.load_state_dict(ours.state_dict())
    padded.unpad, ours.unpad = False, True
    attention_mask = mask_from_rows(CASES[case])
    real = attention_mask.bool()[..., None]
    inputs = dict(input_ids=torch.randint(0, config.vocab_size, attention_mask.shape), attention_mask=attention_mask,
                  token_type_ids=torch.randint(0, 2, attention_mask.shape))
    projection = torch.randn(*attention_mask.shape, config.hidden_size)
    pooled_projection = torch.randn(attention_mask.shape[0], config.hidden_size)
    results = {}
    for name, model in (("ours", ours), ("padded", padded), ("reference", reference)):
        output = model.train()(**inputs)
        last = output.last_hidden_state
        pooled = first_real_pooler(model, last, attention_mask) if name != "ours" else output.pooler_output
        ((last * real * projection).sum() + (pooled * pooled_projection).sum()).backward()
        results[name] = (last.detach(), pooled.detach())
    assert plans[0] is not None and plans[1] is None, "ours ran padding-free, the other padded"
    last, pooled = results["ours"]
    assert torch.equal(last * ~real, torch.zeros_like(last)), "padded positions are zeros"
    for other in ("padded", "reference"):
        scale = max(1.0, results[other][0].abs().max().item())
        assert_close(last * real, results[other][0] * real, atol=FP32_TOL * scale, rtol=FP32_TOL,
                     what=f"{case}: last_hidden_state vs {other}")
        assert_close(pooled, results[other][1], atol=FP32_TOL, rtol=FP32_TOL, what=f"{case}: pooler vs {other}")
        assert_same_grads(ours, reference if other == "reference" else padded)
    if attention_mask[:, 0].all():  # the first real token is position 0: Hugging Face's own pooler output
        with torch.no_grad():
            hf_pooled = reference(**inputs).pooler_output
        assert_close(pooled, hf_pooled, atol=FP32_TOL, rtol=FP32_TOL, what="Hugging Face's pooler_output")
    if backend == "triton":
        assert PADDING_KERNELS | PACKED_ATTENTION_KERNELS <= set(kernel_launches)


def test_albert_padding_free_matches_transformers(backend, kernel_launches, plans):
    """ALBERT gathers before embedding_hidden_mapping_in; shared layers run on the packed rows."""
    config = albert_config()
    reference, ours = (model.eval() for model in twin_models(transformers.AlbertModel, models.AlbertModel, config))
    ours.unpad = True
    attention_mask = mask_from_rows(["1111111111", "1111100000", "1110000000"])
    inputs = dict(input_ids=torch.randint(0, config.vocab_size, attention_mask.shape), attention_mask=attention_mask)
    with torch.no_grad():
        actual, expected = ours(**inputs), reference(**inputs)
    assert plans[0] is not None
    real = attention_mask.bool()[..., None]
    assert_close(actual.last_hidden_state * real, expected.last_hidden_state * real,
                 atol=FP32_TOL * expected.last_hidden_state.abs().max().item(), rtol=FP32_TOL, what="ALBERT")
    assert_close(actual.pooler_output, expected.pooler_output, atol=FP32_TOL, rtol=FP32_TOL, what="ALBERT pooler")
    if backend == "triton":
        assert {"_unpad_kernel", "_pad_kernel", "_attention_fwd_kernel"} <= set(kernel_launches)


def test_hidden_states_are_scattered_back(torch_backend, plans):
    config = bert_config(max_position_embeddings=8)
    reference, ours = (model.eval() for model in twin_models(transformers.BertModel, models.BertModel, config))
    ours.unpad = True
    attention_mask = mask_from_rows(["11111111", "11110000"])
    input_ids = torch.randint(0, config.vocab_size, attention_mask.shape)
    with torch.no_grad():
        actual = ours(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        expected = reference(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    assert plans[0] is not None and len(actual) == len(expected) == config.num_hidden_layers + 1
    real = attention_mask.bool()[..., None]
    for i, (mine, theirs) in enumerate(zip(actual, expected)):
        assert mine.shape == theirs.shape and torch.equal(mine * ~real, torch.zeros_like(mine))
        assert_close(mine * real, theirs * real, atol=FP32_TOL * theirs.abs().max().item(), rtol=FP32_TOL,
                     what=f"hidden state {i}")


@pytest.mark.parametrize("unpad, rows, output_attentions, packed", [
    ("auto", ["1111111111111111", "1111111111111110"], False, False),  # 3% padding: below the threshold
    ("auto", ["1111111111111111", "1111111100000000"], False, True),  # 25%
    ("auto", ["1111111111111111", "0000000011111111"], False, False),  # 25%, left padding: HF's pooler
    ("auto", ["1111111111111111", "1111111111111111"], False, False),  # no padding
    (True, ["1111111111111111", "1111111111111111"], False, True),
    (True, ["1111111111111111", "0000000011111111"], False, True),
    (True, ["1111111111111111", "1111111100000000"], True, False),  # output_attentions: unfused padded path
    (False, ["1111111111111111", "1111111100000000"], False, False),
])
def test_path_choice(unpad, rows, output_attentions, packed, torch_backend, plans):
    assert packing.AUTO_UNPAD_MIN_PADDING == 0.10
    config = bert_config()
    model = models.BertModel(config, unpad=unpad).eval()
    attention_mask = mask_from_rows(rows)
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, attention_mask.shape), attention_mask=attention_mask,
              output_attentions=output_attentions)
    assert (plans[0] is not None) == packed


@pytest.mark.parametrize("unpad, expected_reads", [(True, 2), (False, 1)])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_device_to_host_reads_do_not_grow_with_depth(mode, unpad, expected_reads, triton_backend, monkeypatch):
    """Each read back waits for the GPU. A padding-free forward reads back the id ranges (input and
    token type ids together) and the plan's sizes, which bring back what the ops' checks need of
    cu_seqlens and the indices: nothing per layer; the padded path only the id ranges."""
    reads = []
    for method in ("tolist", "item"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, original=original: reads.append(1) or original(self))
    attention_mask = mask_from_rows(["11111111", "11110000"])
    counts = []
    for depth in (1, 3):
        model = models.BertModel(bert_config(num_hidden_layers=depth), unpad=unpad).eval()
        with mode():
            model(torch.randint(0, 50, attention_mask.shape), attention_mask=attention_mask,
                  token_type_ids=torch.randint(0, 2, attention_mask.shape))
        counts.append(len(reads))
        reads.clear()
    assert counts == [expected_reads] * 2


@pytest.mark.gpu
def test_gpu_synchronizations_do_not_grow_with_depth(triton_backend):
    """The same count from CUDA's own sync detector, which also sees syncs inside torch ops
    (nonzero_static sizes the indices from the plan's one read back instead of syncing)."""
    attention_mask = mask_from_rows(["11111111", "11110000"]).cuda()
    input_ids = torch.randint(0, 50, attention_mask.shape, device="cuda")
    counts = []
    for depth in (1, 3):
        model = models.BertModel(bert_config(num_hidden_layers=depth), unpad=True).cuda().eval()
        with torch.inference_mode():
            model(input_ids, attention_mask=attention_mask)  # first launches compile and autotune
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    model(input_ids, attention_mask=attention_mask)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(warning.message) for warning in caught))
    assert counts == [2, 2], [str(warning.message) for warning in caught]


def test_auto_threshold_decides_which_kernels_run(triton_backend, kernel_launches):
    config = bert_config()
    model = models.BertModel(config, unpad="auto").eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        model(input_ids, attention_mask=mask_from_rows(["1" * 16, "1" * 15 + "0"]))
        assert not PADDING_KERNELS & set(kernel_launches), "3% padding: the padded path"
        model(input_ids, attention_mask=mask_from_rows(["1" * 16, "1" * 8 + "0" * 8]))
        assert PADDING_KERNELS <= set(kernel_launches), "25% padding: padding-free"


def test_packed_documents_do_not_attend_to_each_other(torch_backend, plans):
    """Hugging Face's packed convention (position_ids restarting at 0, no attention_mask): each
    document gives what it gives alone, on either path (the padded one masks across documents)."""
    config = bert_config()
    model = models.BertModel(config).eval()  # unpad=False: the padded path with a per-document mask
    lengths = ((3, 5, 2), (10,))
    input_ids = torch.randint(0, config.vocab_size, (2, 10))
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    with torch.no_grad():
        for unpad, output_attentions, packed in (("auto", False, True), (True, False, True), (False, False, False),
                                                 (True, True, False)):
            model.unpad = unpad
            plans.clear()
            output = model(input_ids, position_ids=position_ids, output_attentions=output_attentions)
            assert (plans[0] is not None) == packed
            for b, row in enumerate(lengths):
                start = 0
                for n in row:
                    alone = model(input_ids[b:b + 1, start:start + n]).last_hidden_state[0]
                    assert_close(output.last_hidden_state[b, start:start + n], alone, atol=FP32_TOL, rtol=FP32_TOL,
                                 what=f"unpad={unpad} output_attentions={output_attentions} document at {b}:{start}")
                    start += n


POSITION_FAMILIES = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
                     "electra": transformers.ElectraConfig, "albert": transformers.AlbertConfig}


@pytest.mark.parametrize("family", POSITION_FAMILIES)
def test_position_ids_that_jump_mean_what_hugging_face_makes_of_them(torch_backend, family):
    """Without an attention_mask, position ids that jump (a step other than +1) outside the
    restart-at-0 convention: from transformers 5.25 BERT, the RoBERTa family and ELECTRA read them
    as packed sequences attending only among themselves (before, and for ALBERT, they are only
    positions). Every unpad setting gives the installed Hugging Face's outputs."""
    config = POSITION_FAMILIES[family](vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=37, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0, embedding_size=16)
    torch.manual_seed(0)
    reference = transformers.AutoModel.from_config(config).eval()
    ours = fastencoder.optimize(copy.deepcopy(reference))
    input_ids = torch.randint(3, config.vocab_size, (2, 10))
    position_ids = torch.tensor([[2, 3, 4, 9, 10, 11, 5, 6, 7, 8], list(range(5, 15))])
    with torch.no_grad():
        expected = reference(input_ids, position_ids=position_ids).last_hidden_state
        as_positions = reference(input_ids, position_ids=position_ids,
                                 attention_mask=torch.ones_like(input_ids)).last_hidden_state
        packs = HF_PACKS_SEQUENCES_BY_POSITION and family != "albert"
        assert torch.equal(expected, as_positions) != packs  # the jumps split row 0 exactly when HF packs
        for unpad in ("auto", True, False):
            fastencoder.optimize(ours, unpad=unpad)
            assert_close(ours(input_ids, position_ids=position_ids).last_hidden_state, expected,
                         atol=FP32_TOL, rtol=FP32_TOL, what=f"{family} unpad={unpad}")


def test_optimize_with_unpad_gives_transformers_outputs(backend, kernel_launches):
    config = bert_config()
    attention_mask = mask_from_rows(["1111111111", "1111110000", "1100000000"])
    inputs = dict(input_ids=torch.randint(0, config.vocab_size, attention_mask.shape), attention_mask=attention_mask)
    real = attention_mask.bool()
    for hf_class in (transformers.BertForTokenClassification, transformers.BertForSequenceClassification):
        untouched = hf_class(config).eval()
        model = fastencoder.optimize(hf_class(config), unpad=True).eval()
        model.load_state_dict(untouched.state_dict())
        assert model.bert.unpad is True
        with torch.no_grad():
            actual, expected = model(**inputs).logits, untouched(**inputs).logits
        if actual.dim() == 3:
            actual, expected = actual[real], expected[real]
        assert_close(actual, expected, atol=FP32_TOL, rtol=FP32_TOL, what=hf_class.__name__)
    if backend == "triton":
        assert PADDING_KERNELS <= set(kernel_launches)


def test_unpad_option_survives_from_pretrained_and_is_checked(tmp_path):
    config = bert_config()
    models.BertForMaskedLM(config).save_pretrained(tmp_path)
    assert models.BertForMaskedLM.from_pretrained(tmp_path, unpad=True).unpad is True
    assert models.BertModel.from_pretrained(tmp_path, unpad=False).unpad is False
    assert models.AlbertModel(albert_config(), unpad=True).unpad is True
    model = models.BertForSequenceClassification(config)
    assert model.unpad == "auto", "the default: padding-free where enough of the batch is padding"
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="unpad must be"):
            model.unpad = bad
        with pytest.raises(ValueError, match="unpad must be"):
            fastencoder.optimize(transformers.BertModel(config), unpad=bad if bad is not None else 0)
