"""torch.compile(model, fullgraph=True) over fastencoder's models: the fused ops are custom ops
that Dynamo keeps whole, and nothing else in the forward breaks the graph (data-dependent checks
and unpadding step aside while tracing). "aot_eager" traces forward and backward exactly as
Inductor would receive them, without generating code, so on CPU the kernels still run interpreted.

Tolerance: test_bert.py's FP32_TOL, the same math in the same order as the eager model.
"""
import pytest
import torch
import transformers

from fastencoder import models
from test_albert import albert_config
from test_bert import FORWARD_KERNELS, BACKWARD_KERNELS, FP32_TOL, assert_same_grads, assert_same_outputs, \
    bert_config, ragged_batch, twin_models

MODELS = {
    "bert": (transformers.BertForSequenceClassification, models.BertForSequenceClassification, bert_config),
    "albert": (transformers.AlbertForSequenceClassification, models.AlbertForSequenceClassification, albert_config),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", MODELS)
def test_fullgraph_compile_matches_transformers(name, backend, request, kernel_launches):
    request.getfixturevalue(f"{backend}_backend")
    hf_class, our_class, make_config = MODELS[name]
    config = make_config()
    reference, ours = twin_models(hf_class, our_class, config)
    ours.unpad = True  # asked for, but T is data dependent: the compiled graph runs the padded path
    inputs = ragged_batch(config)
    labels = torch.randint(0, config.num_labels, (inputs["input_ids"].shape[0],))
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    outputs = {}
    for key, model in (("ours", compiled), ("reference", reference)):
        outputs[key] = model.train()(**inputs, labels=labels)
        outputs[key].loss.backward()
    assert_same_outputs(outputs["ours"], outputs["reference"], what=f"compiled {name} ({backend})")
    assert_same_grads(ours, reference)
    with torch.no_grad():
        assert_same_outputs(compiled.eval()(**inputs), reference.eval()(**inputs), tol=FP32_TOL,
                            what=f"compiled {name} ({backend}), eval")
    if backend == "triton":
        assert FORWARD_KERNELS | BACKWARD_KERNELS <= set(kernel_launches)
        assert not {"_unpad_kernel", "_pad_kernel"} & set(kernel_launches)
