"""Opt-in CUDA graphs for inference (`model.cuda_graphs = True`, or `optimize(model, cuda_graphs=True)`).

At small batches a BERT forward is a hundred short kernel launches, and launch overhead dominates.
A graph is captured once per (batch size, sequence-length bucket) and replayed: inputs are copied
into static buffers padded to the bucket (padding masked out, so a new length inside a bucket
reuses the graph), every graph shares one memory pool, and outputs are copied out of the static
ones. Anything a graph cannot serve — training or autograd, CPU tensors, lengths beyond the largest
bucket, options other than input_ids / attention_mask / token_type_ids — runs eagerly, and
`fallback_reason` says why.

A graph reads the weights from where they were at capture, and every value derived from them (the
concatenated Q/K/V weight) is recomputed inside it, so writes into the weights' memory (`.data`
writes included) show in the next replay. When a parameter or buffer changes in place through
autograd's view (load_state_dict, an optimiser step), moves (.to(), .half()) or is replaced by
another object, every graph is dropped and captured anew. Graphs are kept per autocast dtype too,
and are captured with autocast's cache of cast weights off: that cache lives until the caller's
autocast region ends, and a graph reading a cast copy from it would read freed memory later.
"""
import contextlib
from typing import NamedTuple

import torch

SEQLEN_BUCKETS = (32, 64, 128, 256, 384, 512)


class _Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    output: object  # the model's output, whose tensors live in the graph's memory


class GraphRunner:
    def __init__(self, max_positions, buckets=SEQLEN_BUCKETS):
        # positions up to the bucket are embedded, so no bucket may exceed max_position_embeddings
        self.buckets = tuple(sorted({min(bucket, max_positions) for bucket in buckets}))
        self.graphs = {}
        self.pool = None
        self.memory_bytes = 0  # device memory the captured graphs hold
        self.fallback_reason = None  # why the last call ran eagerly, or None
        self.capturing = False
        self.weights_stamp = None  # the model's parameters and buffers, as the graphs read them

    def bucket(self, seqlen):
        return next((bucket for bucket in self.buckets if bucket >= seqlen), None)

    def why_not(self, model, input_ids, attention_mask, others):
        """Why this call cannot replay a graph, or None when it can."""
        if model.training or torch.is_grad_enabled():
            return "CUDA graphs serve inference only: call the model in eval mode under torch.no_grad or inference_mode"
        if input_ids is None:
            return "only input_ids, attention_mask and token_type_ids are captured; other arguments run eagerly"
        if others.pop("return_dict", None) is False:
            return "return_dict=False runs eagerly"
        if any(value is not None and value is not False for value in others.values()):
            return "only input_ids, attention_mask and token_type_ids are captured; other arguments run eagerly"
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            return "only a 2-D padding mask is captured"
        if self.bucket(input_ids.shape[1]) is None:
            return f"sequence length {input_ids.shape[1]} is beyond the largest bucket ({self.buckets[-1]})"
        if not can_capture(input_ids.device):
            return "CUDA graphs need input_ids on a CUDA device"
        return None

    def run(self, model, input_ids, attention_mask, token_type_ids, others):
        """The model's output from a replayed graph, or None (with `fallback_reason` set) to run eagerly."""
        if self.capturing:
            return None
        self.fallback_reason = self.why_not(model, input_ids, attention_mask, others)
        if self.fallback_reason is not None:
            return None
        batch, seqlen = input_ids.shape
        model.check_ids(input_ids, token_type_ids)  # the graph skips data-dependent checks
        stamp = _stamp([*model.parameters(), *model.buffers()])
        if self.graphs and stamp != self.weights_stamp:
            self.reset()  # the weights changed since the graphs were captured
        self.weights_stamp = stamp
        device = input_ids.device
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        key = (batch, self.bucket(seqlen), device, autocast)
        if key not in self.graphs:
            self.graphs[key] = self._capture(model, batch, key[1], device)
        graph = self.graphs[key]
        graph.input_ids.zero_()[:, :seqlen].copy_(input_ids)
        graph.attention_mask.zero_()[:, :seqlen].copy_(1 if attention_mask is None else attention_mask)
        graph.token_type_ids.zero_()[:, :seqlen].copy_(0 if token_type_ids is None else token_type_ids)
        graph.graph.replay()
        output = graph.output
        # every field the family's output has (BERT's pooler_output; DistilBERT and ELECTRA have none)
        fields = {name: value.clone() for name, value in output.items() if name != "last_hidden_state"}
        fields["last_hidden_state"] = output.last_hidden_state[:, :seqlen].clone()
        return type(output)(**fields)

    def reset(self):
        """Drop every graph and the memory they hold."""
        self.graphs, self.pool, self.memory_bytes = {}, None, 0

    def _capture(self, model, batch, bucket, device):
        # normal tensors even under inference_mode, so that later no_grad calls may refill them
        with torch.inference_mode(False):
            inputs = {name: torch.zeros((batch, bucket), dtype=torch.long, device=device)
                      for name in ("input_ids", "attention_mask", "token_type_ids")}
        inputs["attention_mask"][:, 0] = 1
        # the warm-up must run what the capture runs: the padded path (unpadding is data dependent)
        unpad, model.unpad = model.unpad, False
        self.capturing = True

        def forward():
            with _autocast_without_cache(device.type):
                return model(**inputs, return_dict=True)

        try:
            graph, output, reserved = capture(forward, device, self.pool)
        finally:
            self.capturing = False
            model.unpad = unpad
        self.pool = graph.pool()
        self.memory_bytes += reserved
        return _Graph(graph, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"], output)


def _autocast_without_cache(device_type):
    """The caller's autocast (if on) with its cache of cast weights off, else nothing."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


def can_capture(device):
    return device.type == "cuda"


def capture(forward, device, pool):
    """Warm forward() up on a side stream (autotuning and lazy initialisation must not be
    captured), then capture it into a CUDA graph sharing `pool`. Returns the graph, the output
    (whose tensors live in the graph's memory) and the device memory the capture reserved."""
    with torch.cuda.device(device):  # the capture records the current device's stream
        return _capture_on_current_device(forward, device, pool)


def _capture_on_current_device(forward, device, pool):
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward()
    torch.cuda.current_stream(device).wait_stream(stream)
    # the capture empties the cache first: so does the measurement, to count only the graph
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = forward()
    return graph, output, torch.cuda.memory_reserved(device) - before


def _stamp(tensors):
    """Which tensors, where each one's storage is and how often it was changed in place (inference
    tensors keep no count)."""
    return [(id(t), t.data_ptr(), None if t.is_inference() else t._version) for t in tensors]
