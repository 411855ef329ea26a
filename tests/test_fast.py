"""fast.py: the fast inference path equals the readable models per token, reads nothing back to the
host, and sorts once per forward (CPU here; CUDA and its graphs where there is a GPU)."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

import experts
import fast as fast_py
import moebert
from bench import jitter
from bert import BertForQuestionAnswering, BertForSequenceClassification
from fast import FastInference, Reads, bucket
from moebert import MoEConfig

from helpers import NEEDS_GROUPED_MM, assert_close, minilm_batch, tiny_model, tiny_qa

CFG = MoEConfig(num_experts=3, expert_dim=12, shared_dim=4)  # rows of 48 bytes in fp32: grouped matmuls take them


CFG16 = MoEConfig(num_experts=3, expert_dim=16, shared_dim=8)  # rows of 32 bytes in bf16: grouped on a GPU too


def moe_model(cls=BertForSequenceClassification, table=None, seed=0, cfg=CFG):
    """A tiny MoEBERT (hidden 32, FFN 37, 3 experts of 12) of either head, its biases and LayerNorms
    jittered; `table`: every layer's hash table."""
    dense = tiny_model(num_labels=3, seed=seed) if cls is BertForSequenceClassification else tiny_qa(seed)
    moe = jitter(moebert.moebert_from_dense(dense, torch.rand(3, 37), cfg).eval(), seed)
    if table is not None:
        for layer in moe.bert.encoder.layer:
            layer.moe.hash_table.copy_(table(layer.moe.hash_table))
    return moe


def padded_batch(B=4, T=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, T - 3 * b:] = 0  # rows of 13, 10, 7 and 4 real tokens
    return ids * mask, torch.randint(0, 2, (B, T), generator=g) * mask, mask


TABLES = {"hash-random": None, "one expert takes every token": lambda t: torch.zeros_like(t),
          "an idle expert": lambda t: t % 2}


def loop_grouped_mm(a, b, offs):  # [n, K], [N, K, M] -> [n, M]
    """The grouped matmul by its definition, in any dtype: rows offs[e-1]:offs[e] of a times b[e]."""
    ends = offs.tolist()
    return torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(zip([0] + ends[:-1], ends))])


def use_loop_grouped_mm(monkeypatch):
    """fast.py's grouped path on loop_grouped_mm, on any torch and device (fp64 included)."""
    monkeypatch.setattr(fast_py, "GROUPED_MM", loop_grouped_mm)
    monkeypatch.setattr(fast_py, "GROUPED_MM_CPU", True)


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForQuestionAnswering])
@pytest.mark.parametrize("path", ["every expert (fp64)", pytest.param("grouped (fp32)", marks=NEEDS_GROUPED_MM),
                                  "grouped, torch's matmul a loop (fp64)"])
def test_fast_path_equals_the_reference(table, cls, path, monkeypatch):
    """Per token (QA's logits are per token) and per example, against the model's own forward in fp64.
    torch's grouped matmul takes no fp64: a loop stands in for it to check the folded biases exactly."""
    model = moe_model(cls, TABLES[table])
    ids, types, mask = padded_batch()
    with torch.no_grad():
        ref = model.double()(ids, types, mask).logits
    dtype, grouped = (torch.float32, True) if "fp32" in path else (torch.float64, path.startswith("grouped"))
    if "loop" in path:
        use_loop_grouped_mm(monkeypatch)
    fast = FastInference(model, dtype=dtype, grouped=grouped)(ids, types, mask)
    real = (mask[..., None] == 1).expand_as(ref) if ref.dim() == 3 else torch.ones_like(ref, dtype=torch.bool)
    assert_close(fast[real].double(), ref[real], 1e-12 if dtype == torch.float64 else 2e-5, f"{path}, {table}")
    if ref.dim() == 3:
        assert (fast[~real] == ref[~real]).all()  # padding: PAD_LOGIT in both


def test_dense_bert_through_the_fast_path_is_its_forward():
    model = tiny_model(num_labels=3).eval()
    ids, types, mask = padded_batch()
    with torch.no_grad():
        ref = model.double()(ids, types, mask).logits
    assert_close(FastInference(model, dtype=torch.float64)(ids, types, mask), ref, 1e-12, "dense")


@pytest.mark.parametrize("grouped", [pytest.param(True, marks=NEEDS_GROUPED_MM), False])
def test_a_forward_reads_nothing_back_and_sorts_once(grouped, monkeypatch):
    """tolist() reads memory without a dispatched op, so it is counted by hand too."""
    model = moe_model()
    ids, types, mask = padded_batch()
    fast = FastInference(model, dtype=torch.float32, grouped=grouped)
    tolist = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolist.append(1) or real_tolist(t))
    with Reads() as r:
        fast(ids, types, mask)
    assert r.reads == [] and tolist == [], (r.reads, tolist)
    assert r.sorts == (1 if grouped else 0)  # one sort for the 3 layers
    if grouped:  # a layer gathers its tokens and its experts' LayerNorm rows (biases are folded), and scatters back
        assert (r.ops["index_select"], r.ops["index_copy_"], r.ops["_grouped_mm"]) == (6, 3, 6), r.ops
    with Reads() as r:  # dense BERT through the fast path: nothing read back either (its padding mask)
        FastInference(tiny_model(num_labels=3), dtype=torch.float32)(ids, types, mask)
    assert r.reads == [] and tolist == [], (r.reads, tolist)
    with Reads() as r:  # the readable model, for contrast: it reads the experts' sizes in every layer
        with torch.no_grad():
            model(ids, types, mask)
    assert len(r.reads) + len(tolist) >= 3


def test_grouped_where_torch_has_no_grouped_matmul_is_a_clear_error(monkeypatch):
    """Asked for where torch lacks it, not 'NoneType' object is not callable inside the first forward."""
    monkeypatch.setattr(fast_py, "GROUPED_MM", None)  # torch before 2.8
    with pytest.raises(ValueError, match=r"grouped=True: torch .* has no grouped matmul \(CUDA from 2.8, the CPU from"):
        FastInference(moe_model(), dtype=torch.float32, grouped=True)
    assert not FastInference(moe_model(), dtype=torch.float32).grouped  # the default: every expert
    # torch 2.8: a grouped matmul for CUDA alone (on the CPU, NotImplementedError inside the forward)
    monkeypatch.setattr(fast_py, "GROUPED_MM", loop_grouped_mm)
    monkeypatch.setattr(fast_py, "GROUPED_MM_CPU", False)
    with pytest.raises(ValueError, match=r"has no grouped matmul on the CPU \(CUDA from 2.8, the CPU from 2.9\)"):
        FastInference(moe_model(), dtype=torch.float32, grouped=True)
    assert not FastInference(moe_model(), dtype=torch.float32).grouped


def test_buckets():
    assert [bucket(n, FastInference.BATCHES) for n in (1, 3, 8, 100, 129, 300)] == [1, 4, 8, 128, 256, 384]
    assert [bucket(n, FastInference.LENGTHS) for n in (1, 33, 128, 600)] == [32, 64, 128, 1024]


def gated_model(cls, route, cfg=CFG):
    """A tiny MoEBERT with a gate route, its gates spreading the tokens over the experts."""
    dense = tiny_model(num_labels=3) if cls is BertForSequenceClassification else tiny_qa()
    moe = moebert.moebert_from_dense(dense, torch.rand(3, 37), dataclasses.replace(cfg, route=route)).eval()
    for layer in moe.bert.encoder.layer:
        torch.nn.init.normal_(layer.moe.gate.weight, std=1.0)
    return jitter(moe)


@pytest.mark.parametrize("route", ["gate-token", "gate-sentence"])
@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForQuestionAnswering])
@pytest.mark.parametrize("path", ["every expert (fp64)", pytest.param("grouped (fp32)", marks=NEEDS_GROUPED_MM)])
def test_gate_routes_through_the_fast_path(route, cls, path):
    """A gate per layer (each token's, or each sentence's from its real tokens), the output scaled by
    the gate's probability as the reference does; a sort a layer, nothing read back."""
    moe = gated_model(cls, route)
    ids, types, mask = padded_batch()
    with torch.no_grad():
        ref = moe.double()(ids, types, mask).logits
        experts = {tuple(layer.moe.route_gate(moe.bert.embeddings(ids, types), mask, balance=False)[0].tolist())
                   for layer in moe.bert.encoder.layer}
    assert any(len(set(e)) > 1 for e in experts)  # tokens do go to different experts
    dtype, grouped = (torch.float64, False) if path.startswith("every") else (torch.float32, True)
    fast = FastInference(moe, dtype=dtype, grouped=grouped)
    with Reads() as r:
        out = fast(ids, types, mask)
    assert r.reads == [] and r.sorts == (3 if grouped else 0), (r.reads, r.sorts)
    real = (mask[..., None] == 1).expand_as(ref) if ref.dim() == 3 else torch.ones_like(ref, dtype=torch.bool)
    assert_close(out[real].double(), ref[real], 1e-12 if dtype == torch.float64 else 2e-5, f"{path}, {route}")


def stand_in_capture(self, B, T):
    """FastInference.capture without CUDA: a "graph" whose replay runs the forward on the static
    inputs into the static output."""
    inputs = self.static_inputs(B, T)
    out = self.forward(*inputs)
    return SimpleNamespace(replay=lambda: out.copy_(self.forward(*inputs))), inputs, out


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForQuestionAnswering])
@pytest.mark.parametrize("grouped", [True, False])
def test_buckets_pad_and_slice_as_eager_on_the_cpu(cls, grouped, monkeypatch):
    """The graphed call's own work, without CUDA (stand_in_capture): batches padded into their bucket
    (rows of zeros attending to one token, columns masked), the static output sliced back, a bucket
    captured once."""
    monkeypatch.setattr(FastInference, "capture", stand_in_capture)
    if grouped:
        use_loop_grouped_mm(monkeypatch)  # fp64: torch's takes none
    model = moe_model(cls)
    graphed = FastInference(model, dtype=torch.float64, grouped=grouped, graphs=True)
    eager = FastInference(model, dtype=torch.float64, grouped=grouped, graphs=False)
    results = []
    for seed, (B, T) in enumerate([(4, 13), (3, 9), (1, 32), (4, 13), (5, 33)]):
        ids, types, mask = padded_batch(B, T, seed=seed)
        a, b = graphed(ids, types, mask), eager(ids, types, mask)
        assert a.shape == b.shape == ((B, T, 2) if cls is BertForQuestionAnswering else (B, 3))
        assert_close(a, b, 1e-12, f"bucketed vs eager, batch {B}, length {T}")
        results.append((a, b))
    for a, b in results:  # what a call returned is the caller's: a later replay of its bucket leaves it be
        assert_close(a, b, 1e-12, "an earlier result, after later calls")
    assert sorted(graphed.captured) == [(1, 32), (4, 32), (8, 64)]
    assert all(torch.isfinite(out).all() for _, _, out in graphed.captured.values())  # padding rows too


def test_buckets_stop_at_the_position_table(monkeypatch):
    """A length bucket never outgrows the model's positions (48 here: 33 tokens take 48, not 64), and
    a longer input is a clear error, not an index out of range (on CUDA, a device-side assert)."""
    monkeypatch.setattr(FastInference, "capture", stand_in_capture)
    config = dataclasses.replace(tiny_model().config, max_position_embeddings=48)
    fast = FastInference(BertForSequenceClassification(config, 3), dtype=torch.float64, graphs=True)
    batch = padded_batch(2, 33)
    assert_close(fast(*batch), fast.forward(*batch), 1e-12, "bucket (2, 48)")
    assert list(fast.captured) == [(2, 48)]
    for graphs in (True, False):
        with pytest.raises(ValueError, match="inputs of 49 tokens: the model's position table covers 48"):
            FastInference(fast.model, dtype=torch.float64, graphs=graphs)(*padded_batch(2, 49))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForQuestionAnswering])
@pytest.mark.parametrize("width", [12, 16])  # experts of 12 run every expert in bf16; of 16, grouped where it can
def test_cuda_graph_replays_new_inputs_as_eager(cls, width):
    """bf16 on the GPU: the graph of a bucket, replayed on inputs it was not captured with (and of
    another size in the same bucket), against the same fast path run eagerly."""
    model = moe_model(cls, cfg=CFG if width == 12 else CFG16).cuda()
    graphed = FastInference(model, graphs=True)
    eager = FastInference(model, graphs=False)
    assert graphed.grouped == eager.grouped == (width == 16 and experts.grouped_on("cuda"))
    for seed, (B, T) in enumerate([(4, 13), (3, 9), (4, 13)]):
        ids, types, mask = (t.cuda() for t in padded_batch(B, T, seed=seed))
        a, b = graphed(ids, types, mask).float(), eager(ids, types, mask).float()
        assert a.shape == b.shape
        assert_close(a, b, 1e-2, f"graph vs eager, batch {B}, length {T}")
    assert len(graphed.captured) == 1  # (4, 13) and (3, 9) share the bucket (4, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("route", ["gate-token", "gate-sentence"])
@pytest.mark.parametrize("width", [12, 16])  # every expert; grouped where it can
def test_cuda_graph_of_a_gate_route_replays_as_eager(route, width):
    """A gate route's graph (a gate and a sort in every layer) on new inputs of its bucket's own size:
    the same kernels as eager, so no bf16 rounding can move a token to another expert."""
    model = gated_model(BertForSequenceClassification, route, CFG if width == 12 else CFG16).cuda()
    graphed, eager = FastInference(model, graphs=True), FastInference(model, graphs=False)
    for seed in range(3):
        ids, types, mask = (t.cuda() for t in padded_batch(4, 32, seed=seed))
        assert_close(graphed(ids, types, mask).float(), eager(ids, types, mask).float(), 1e-2, f"{route}, seed {seed}")


@NEEDS_GROUPED_MM
@pytest.mark.parametrize("capability, grouped", [((8, 0), False), ((9, 0), True), ((10, 0), True), ((12, 0), False)])
def test_grouped_only_on_gpus_with_torchs_grouped_kernel(capability, grouped, monkeypatch):
    """On CUDA the fast path groups in bf16 where experts.grouped_on says (capability 9.x and 10.x),
    else it runs every expert: torch's grouped matmul would read its offsets back there. Nothing runs
    on a GPU here: the decision alone, with the capability and the model's device stood in."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    fast = FastInference(moe_model(cfg=CFG16), dtype=torch.bfloat16, graphs=False)
    assert not fast.grouped  # on the CPU, bf16: no
    fast.device = torch.device("cuda")
    assert fast.can_group(torch.bfloat16) == grouped and not fast.can_group(torch.float32)


def test_reads_counts_what_writes_memory():
    """Reads.writes, the CPU's stand-in for a GPU's kernel count: a new tensor or an in-place op
    counts, a view or a bare allocation does not."""
    x = torch.ones(4, 6)
    with Reads() as r:
        y = x.view(6, 4).t()  # views
        z = torch.empty(3)  # an allocation alone
        w = x + 1  # a kernel
        w.add_(x)  # in place: a kernel
        w.index_select(0, torch.tensor([1, 0]))  # a kernel
    assert dict(r.writes) == {"add": 1, "add_": 1, "index_select": 1}, dict(r.writes)
    assert y.shape == (4, 6) and z.shape == (3,)


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForQuestionAnswering])
def test_fast_path_on_real_minilm_weights(minilm, cls, monkeypatch):
    """Real weights (MiniLM: 6 layers, 384 wide, real biases and LayerNorms) on real padded text, dense and
    MoEBERT (4 experts of 384, 256 shared: the project's MiniLM default), against their own forward in
    fp64: every expert in fp64, grouped in fp64 (a loop for torch's grouped matmul) and in fp32."""
    torch.manual_seed(0)
    dense = (cls.from_pretrained(minilm, num_labels=3) if cls is BertForSequenceClassification
             else cls.from_pretrained(minilm)).eval()
    moe = moebert.moebert_from_dense(dense, torch.rand(6, 1536), MoEConfig.scaled(1536)).eval()
    batch = minilm_batch(minilm, [("The cat sat on the mat.", "A cat is sitting on a mat."),
                                  ("He said no.", "Nobody said anything about the weather in the mountains.")])
    ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    real = mask.bool() if cls is BertForQuestionAnswering else torch.ones(2, dtype=torch.bool)
    for name, model in (("dense", dense), ("MoEBERT", moe)):
        with torch.no_grad():
            ref = model.double()(ids, types, mask).logits[real]
        runs = [("fp64", torch.float64, False, 1e-10)]
        if name == "MoEBERT":
            runs += [("grouped, fp64", torch.float64, True, 1e-10)]
            runs += [("grouped, fp32", torch.float32, True, 1e-4)] if experts.GROUPED_MM_CPU else []
        for what, dtype, grouped, atol in runs:
            with monkeypatch.context() as m:
                if grouped and dtype == torch.float64:
                    use_loop_grouped_mm(m)
                got = FastInference(model, dtype=dtype, grouped=grouped)(ids, types, mask)[real]
            assert_close(got.double(), ref, atol, f"{name}, {what}")
