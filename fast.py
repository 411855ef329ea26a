"""Fast inference for MoEBERT (any route) and dense BERT, for GPUs: what the readable models compute
(moebert.py, experts.py, bert.py), arranged so the GPU never waits for the host.

- The model is cast once to one dtype (bf16 on a GPU): no autocast, no per-forward weight casts.
- Hash routing depends on the token ids alone, so every layer's experts are found once per forward,
  from the layers' tables stacked [layers, vocab], with one sort for all layers (experts.sort_by_expert).
  Gate routes depend on each layer's input: one sort a layer, and no load-balance loss (inference).
- Each expert weight is one grouped matmul where torch has one for the device, its bias folded into
  it (fold_biases); elsewhere every expert runs on every token and each token keeps its own (the
  dense FFN's cost, and still no host read).
- Nothing is read back to the host: the padding mask is always applied (the reference checks on the
  host whether anything is padded), sizes never leave the device.
- On CUDA, a CUDA graph per (batch, length) bucket replays the whole forward: inputs are padded up to
  the bucket, so a few graphs serve every batch.
"""
import collections
import copy

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bert import PAD_LOGIT
from experts import GROUPED_MM, GROUPED_MM_CPU, grouped_on, sort_by_expert


def bucket(n, sizes):
    """The smallest of `sizes` that holds n, else n rounded up to a multiple of the largest."""
    return next((s for s in sizes if s >= n), -(-n // sizes[-1]) * sizes[-1])


class FastInference:
    """model(input_ids, token_type_ids, attention_mask) -> logits, as the model's own forward in eval
    mode, for a BertForSequenceClassification or BertForQuestionAnswering, dense or MoEBERT (any route).

    dtype: the weights' and activations' dtype (the model is copied and cast once). grouped: run the
    experts with grouped matmuls (default: where torch has them for the device). graphs: replay CUDA
    graphs per (batch, length) bucket (default: on CUDA)."""
    BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)  # batch buckets of the CUDA graphs
    LENGTHS = (32, 64, 128, 256, 384, 512)  # sequence buckets

    def __init__(self, model, dtype=torch.bfloat16, grouped=None, graphs=None):
        self.model = copy.deepcopy(model).eval().to(dtype)
        self.device = next(self.model.parameters()).device
        self.layers = self.model.bert.encoder.layer
        self.moe = getattr(self.model, "moe_config", None)
        self.hash = self.moe is not None and self.moe.route.startswith("hash")
        if self.hash:  # [layers, vocab]: each token's expert in each layer
            self.tables = torch.stack([layer.moe.hash_table for layer in self.layers])
        self.grouped = self.can_group(dtype) if grouped is None else grouped
        if self.grouped and (GROUPED_MM is None or (self.device.type == "cpu" and not GROUPED_MM_CPU)):
            where = "" if GROUPED_MM is None else " on the CPU"
            raise ValueError(f"grouped=True: torch {torch.__version__} has no grouped matmul{where} (CUDA from 2.8, "
                             f"the CPU from 2.9); leave grouped to its default")
        if self.grouped:  # each layer's weights with their biases folded in, and its LayerNorms side by side
            self.folded = [fold_biases(layer.moe.experts) for layer in self.layers]
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.captured = {}  # (batch, length) -> (graph, static inputs, static output)

    def can_group(self, dtype):
        """Where torch's grouped matmul runs on the device itself: CUDA where experts.grouped_on says, in
        bf16 (elsewhere torch loops on the host), the CPU in fp32 (torch 2.9 on); rows of a multiple of 16 bytes."""
        if GROUPED_MM is None or self.moe is None:
            return False
        H, E = self.layers[0].moe.experts.intermediate_weight.shape[1:]
        if (H * dtype.itemsize) % 16 or (E * dtype.itemsize) % 16:
            return False
        if self.device.type == "cpu":
            return dtype == torch.float32 and GROUPED_MM_CPU
        return grouped_on(self.device) and dtype == torch.bfloat16

    @torch.inference_mode()
    def __call__(self, input_ids, token_type_ids, attention_mask):
        B, T = input_ids.shape
        longest = self.model.config.max_position_embeddings  # on CUDA, a longer input is a device-side assert
        if T > longest:
            raise ValueError(f"inputs of {T} tokens: the model's position table covers {longest}; truncate them")
        if not self.graphs:
            return self.forward(input_ids, token_type_ids, attention_mask)
        key = (bucket(B, self.BATCHES), min(bucket(T, self.LENGTHS), longest))
        if key not in self.captured:
            self.captured[key] = self.capture(*key)
        graph, inputs, out = self.captured[key]
        for static, x in zip(inputs, (input_ids, token_type_ids, attention_mask)):
            static.zero_()
            static[:B, :T] = x
        inputs[2][B:, 0] = 1  # padding rows attend to one token: no row of the softmax is all masked
        graph.replay()
        # A copy: the static output is overwritten by the bucket's next replay.
        return (out[:B, :T] if out.dim() == 3 else out[:B]).clone()

    def static_inputs(self, B, T):
        """The graph's input_ids, token_type_ids and attention_mask [B, T]: zeros, each row attending
        to its first token (an all-masked row would make its softmax NaN)."""
        inputs = [torch.zeros(B, T, dtype=torch.long, device=self.device) for _ in range(3)]
        inputs[2][:, 0] = 1
        return inputs

    def capture(self, B, T):
        """A CUDA graph of the forward at batch B and length T, on static input tensors."""
        inputs = self.static_inputs(B, T)
        stream = torch.cuda.Stream()  # warm-up off the default stream, as torch's graph capture wants
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.forward(*inputs)
        return graph, inputs, out

    def forward(self, input_ids, token_type_ids, attention_mask):
        bert = self.model.bert
        x = bert.embeddings(input_ids, token_type_ids)  # [B, T, H]
        B, T, H = x.shape
        # The mask is always applied: to know that nothing is padded would take a read back.
        attn_mask = attention_mask[:, None, None, :].bool()
        if self.hash:  # every layer's experts at once, and their one sort
            expert = self.tables[:, input_ids.reshape(-1)]  # [layers, B*T]
            route = sort_by_expert(expert, self.moe.num_experts) if self.grouped else None
        for l, layer in enumerate(self.layers):
            if self.moe is None:
                x = layer(x, attn_mask, input_ids, attention_mask)
                continue
            x = layer.attention(x, attn_mask)  # [B, T, H]
            row, prob = l, None  # this layer's row of `expert` and `route`
            if not self.hash:  # this layer's gate ([B*T] each) and its own sort
                e, prob = layer.moe.route_gate(x, attention_mask, balance=False)
                expert, row = e[None], 0
                route = sort_by_expert(expert, self.moe.num_experts) if self.grouped else None
            x, experts = x.view(B * T, H), layer.moe.experts
            if self.grouped:
                x = grouped_ffn(experts, x, *(t[row] for t in route), *self.folded[l])
            else:
                x = every_expert(experts, x, expert[row])
            x = (x if prob is None else x * prob[:, None]).view(B, T, H)
        if self.model.head == "qa":
            return self.model.qa_outputs(x).masked_fill(attention_mask[..., None] == 0, PAD_LOGIT)  # [B, T, 2]
        return self.model.classifier(bert.pooler(x))  # [B, num_labels]


# The grouped matmuls take no bias: each is folded in as one more input row, fed by an input of one
# (x gets PAD columns of ones; 8 keep bf16 rows a multiple of 16 bytes). b2 rides on a hidden unit
# fixed at act(ONE) = ONE (exact for every BERT activation), so no per-row bias is gathered or added.
PAD, ONE = 8, 32.0


def fold_biases(experts):
    """W1' [N, H+PAD, E+PAD]: W1 with b1 as row H, and ONE in row H of column E (that unit's input);
    W2' [N, E+PAD, H]: W2 with b2 / ONE as row E; each expert's LayerNorm weight and bias, [N, 2H]."""
    w1, b1, w2, b2, ln_w, ln_b = (p.detach() for p in experts.weights(batched=True))  # vectors [N, 1, D]
    N, H, E = w1.shape
    one = torch.tensor(ONE, dtype=w1.dtype)
    if not torch.equal(experts.act(one), one):
        raise ValueError(f"fold_biases needs act({ONE}) == {ONE}")
    W1 = w1.new_zeros(N, H + PAD, E + PAD)
    W1[:, :H, :E], W1[:, H:H + 1, :E], W1[:, H, E] = w1, b1, ONE
    W2 = w2.new_zeros(N, E + PAD, H)
    W2[:, :E], W2[:, E:E + 1] = w2, b2 / ONE
    return W1, W2, torch.cat([ln_w, ln_b], dim=2)[:, 0]


def grouped_ffn(experts, x, order, e_sorted, offs, W1, W2, ln):  # [n, H] -> [n, H]
    """Experts.grouped with the biases folded in (fold_biases), given the sort (sort_by_expert's row)."""
    H = x.size(1)
    xs = F.pad(x, (0, PAD), value=1.0).index_select(0, order)  # [n, H+PAD]: by expert, ones after
    h = experts.act(GROUPED_MM(xs, W1, offs=offs))  # [n, E+PAD]: x W1 + b1, and unit E at ONE
    y = GROUPED_MM(h, W2, offs=offs) + xs[:, :H]  # [n, H]: + b2, + the residual
    ln_w, ln_b = ln.index_select(0, e_sorted).chunk(2, dim=1)  # [n, H] each: each row its expert's
    y = torch.addcmul(ln_b, F.layer_norm(y, (H,), eps=experts.eps), ln_w)
    return torch.empty_like(x).index_copy_(0, order, y)


def every_expert(experts, x, expert):  # [n, H], [n] -> [n, H]
    """Every expert on every token (Experts.ffn, batched), each token keeping its own expert's output:
    the dense FFN's multiply-adds (N experts of I/N neurons), and no host sync where no grouped matmul is."""
    y = experts.ffn(x.expand(len(experts.intermediate_weight), *x.shape), *experts.weights(batched=True))  # [N, n, H]
    return y.gather(0, expert[None, :, None].expand(1, *x.shape))[0]


class Reads(TorchDispatchMode):
    """with Reads() as r: ... counts what reads a tensor back to the host (item, bool, nonzero, copies
    from a GPU to the CPU) in r.reads, and the sorts in r.sorts: what a forward here must not do, and do once.
    r.ops counts every op by name, r.writes those that write memory (on a GPU, each a kernel)."""

    def __init__(self):
        super().__init__()
        self.reads, self.sorts, self.ops, self.writes = [], 0, collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        to_host = (name == "_to_copy" and args[0].device.type == "cuda"  # x.cpu(), x.to("cpu")
                   and torch.device((kwargs or {}).get("device") or args[0].device).type == "cpu") or (
            name == "copy_" and args[0].device.type == "cpu" and args[1].device.type == "cuda")  # cpu_buffer.copy_(x)
        if name in ("_local_scalar_dense", "nonzero", "bincount", "_unique2") or to_host:
            self.reads.append(name)
        self.sorts += name in ("sort", "argsort")
        self.ops[name] += 1
        out = func(*args, **(kwargs or {}))
        # What writes memory (a new tensor, or in place; not a view, not an allocation alone): a kernel on a GPU.
        ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        if name not in ("empty", "empty_like", "empty_strided") and (name.endswith("_") or any(
                t.untyped_storage().data_ptr() not in ins for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))):
            self.writes[name] += 1
        return out
