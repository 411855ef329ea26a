"""moebert.py: importance (paper Eq. 4), experts (section 3.2), routing (3.4), the distillation loss
(3.3), the MoE layer under bf16 autocast, the experts' host-sized and grouped paths (experts.py;
CUDA-only checks where there is a device), the QA model's loss, importance and surgery, and saving
and loading."""
import contextlib
import json
import os
import re
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

import bert
import experts as experts_py  # the module (experts.py); `experts` names Experts objects in these tests
import moebert
from bench import naive_importance
from bert import BertConfig, BertForSequenceClassification
from common import BadFile
from moebert import MoEBertForQuestionAnswering, MoEConfig, importance_scores, moebert_from_dense

from helpers import (DEVICES, NEEDS_GROUPED_MM, ROOT, TINY, assert_close, assert_user_error, inputs, qa_batch, raised,
                     random_batch, relative_to_scale, tiny_model, tiny_qa)


# ----------------------------------------------------------------------------------------------
# moebert.py: importance (paper Eq. 4), against bench.naive_importance: the official algorithm,
# per example and per layer autograd.grad of W1 and W2


@pytest.mark.parametrize("num_labels", [3, 1])  # classification and regression
def test_importance_equals_naive_official_algorithm(num_labels):
    model = tiny_model(num_labels).double()
    batch = random_batch(num_labels=max(num_labels, 2))
    if num_labels == 1:
        batch["labels"] = torch.rand(5, dtype=torch.float64) * 5
    batches = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    model.train()
    fast = importance_scores(model, batches)
    assert model.training, "importance_scores must restore the training mode"
    model.eval()
    naive = naive_importance(model, batches[0]) + naive_importance(model, batches[1])
    assert fast.shape == (3, 37)
    rel = (fast - naive).abs().max() / naive.abs().max()
    assert rel <= 1e-5, f"relative max diff {rel:.3g}"
    print(f"importance vs naive: relative max diff {rel:.2e}")


# ----------------------------------------------------------------------------------------------
# moebert.py: experts (paper section 3.2)


def paper_rule(importance, N, expert_dim, shared):
    """The neuron sets of section 3.2, written out independently of expert_neurons()."""
    ranked = sorted(range(len(importance)), key=lambda j: -float(importance[j]))
    sets = []
    for e in range(N):
        own = [ranked[shared + e + k * N] for k in range(expert_dim - shared)]
        sets.append(set(ranked[:shared]) | set(own))
    return sets


def test_one_full_expert_reproduces_dense_logits():
    model = tiny_model().eval()
    imp = importance_scores(model, [random_batch()])
    for route in moebert.ROUTES:
        cfg = MoEConfig(num_experts=1, expert_dim=37, shared_dim=0, route=route)
        moe = moebert_from_dense(model, imp, cfg, token_counts=torch.ones(99)).eval()
        if route.startswith("gate"):  # one expert: probability 1, the gate changes nothing
            assert all(l.moe.gate.out_features == 1 for l in moe.bert.encoder.layer)
        batch = random_batch()
        args = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
        with torch.no_grad():
            assert_close(moe(*args).logits, model(*args).logits, 1e-6, f"one expert, {route}")


def test_experts_hold_exactly_the_papers_neurons():
    model = tiny_model()  # jittered: no zero bias, so a bias sliced with the wrong neurons shows
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    imp = torch.rand(3, 37, generator=g)
    cfg = MoEConfig(num_experts=3, expert_dim=11, shared_dim=5, route="hash-random")
    moe = moebert_from_dense(model, imp, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the dense model was changed"
    assert not any(p.data_ptr() == q.data_ptr() for p in moe.parameters() for q in model.parameters())
    for l, (dense, layer) in enumerate(zip(model.bert.encoder.layer, moe.bert.encoder.layer)):
        ex = layer.moe.experts  # stacked, matrices stored [in, out]: the dense ones transposed
        for e, want in enumerate(paper_rule(imp[l], 3, 11, 5)):
            idx = layer.moe.neurons[e]
            assert set(idx.tolist()) == want, f"layer {l} expert {e}"
            assert torch.equal(ex.intermediate_weight[e], dense.intermediate.dense.weight[idx].T)
            assert torch.equal(ex.intermediate_bias[e], dense.intermediate.dense.bias[idx])
            assert torch.equal(ex.output_weight[e], dense.output.dense.weight[:, idx].T)
            assert torch.equal(ex.output_bias[e], dense.output.dense.bias)
            assert torch.equal(ex.LayerNorm_weight[e], dense.output.LayerNorm.weight)
            assert torch.equal(ex.LayerNorm_bias[e], dense.output.LayerNorm.bias)
    assert torch.equal(moe.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
    assert torch.equal(moe.classifier.weight, model.classifier.weight)


# Experts.forward has two paths: one padded batched matmul for few tokens, one matmul per expert
# otherwise. Thresholds 0 and infinity force each.
PATHS = {"per-expert": dict(PADDING=0.0), "batched": dict(PADDING=float("inf"), SMALL_BATCH=float("inf"))}


def take_path(monkeypatch, path):
    for name, value in PATHS[path].items():
        monkeypatch.setattr(experts_py, name, value)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("route", moebert.ROUTES)
def test_token_gets_dense_ffn_restricted_to_its_experts_neurons(route, path, monkeypatch):
    take_path(monkeypatch, path)
    model = tiny_model().eval()
    imp = torch.rand(3, 37, generator=torch.Generator().manual_seed(4))
    cfg = MoEConfig(num_experts=3, expert_dim=11, shared_dim=5, route=route)
    moe = moebert_from_dense(model, imp, cfg, token_counts=torch.arange(99.0)).eval()
    batch = random_batch()
    dense, layer = model.bert.encoder.layer[1], moe.bert.encoder.layer[1]
    x = torch.randn(5, 11, 32)
    with torch.no_grad():
        y = layer.moe(x, batch["input_ids"], batch["attention_mask"])
        if route.startswith("hash"):
            expert = layer.moe.hash_table[batch["input_ids"]]  # [B, T]
            prob = torch.ones(5, 11)
        else:
            if route == "gate-token":
                p = torch.softmax(x @ layer.moe.gate.weight.T, -1)  # [B, T, N]
            else:
                m = batch["attention_mask"][..., None].float()
                p = torch.softmax(((x * m).sum(1) / m.sum(1)) @ layer.moe.gate.weight.T, -1)[:, None].expand(5, 11, 3)
            prob, expert = p.max(-1)
        for b in range(5):
            for t in range(11):
                S = layer.moe.neurons[expert[b, t]]
                h = bert.ACT2FN["gelu"](x[b, t] @ dense.intermediate.dense.weight[S].T + dense.intermediate.dense.bias[S])
                out = h @ dense.output.dense.weight[:, S].T + dense.output.dense.bias + x[b, t]
                want = torch.nn.functional.layer_norm(out, (32,), dense.output.LayerNorm.weight,
                                                      dense.output.LayerNorm.bias, 1e-12) * prob[b, t]
                assert_close(y[b, t], want, 1e-5, f"token ({b},{t}) via expert {int(expert[b, t])}")


def test_batched_and_per_expert_paths_agree_with_gradients(monkeypatch):
    """Training mode (expert dropout 0, the same seed for the other dropouts): logits and the
    gradient of every expert parameter."""
    model = tiny_model()
    cfg = MoEConfig(num_experts=3, expert_dim=11, shared_dim=5, route="gate-token", expert_dropout=0.0)
    moe = moebert_from_dense(model, torch.rand(3, 37, generator=torch.Generator().manual_seed(5)), cfg).train()
    batch = random_batch()
    args = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    results = {}
    for path in PATHS:
        take_path(monkeypatch, path)
        torch.manual_seed(0)  # the same attention and hidden dropout masks for both
        moe.zero_grad()
        out = moe(*args)
        (out.logits.pow(2).sum() + out.balance_loss).backward()
        results[path] = out.logits.detach(), {n: p.grad.clone() for n, p in moe.named_parameters() if "experts" in n}
        monkeypatch.undo()
    (a, ga), (b, gb) = results.values()
    assert_close(a, b, 1e-5, "logits")
    for n in ga:
        assert_close(ga[n], gb[n], 1e-5, f"gradient of {n}")
    assert all(g.abs().sum() > 0 for g in ga.values()), "every expert parameter gets a gradient"


def test_invalid_moe_configs_are_refused():
    for kwargs, msg in [(dict(shared_dim=12, expert_dim=11), "shared_dim"),
                        (dict(expert_dim=38, shared_dim=0), "exceeds"),
                        (dict(num_experts=4, expert_dim=20, shared_dim=5), "too few neurons"),
                        (dict(num_experts=40, expert_dim=0, shared_dim=0), "expert_dim must be at least 1"),
                        (dict(route="hash"), "route")]:
        with pytest.raises(ValueError, match=msg):
            MoEConfig(**kwargs).check(37)
    with pytest.raises(ValueError, match="token_counts"):
        moebert_from_dense(tiny_model(), torch.rand(3, 37), MoEConfig(3, 11, 5, route="hash-balance"))


def test_splits_for_the_ablation():
    imp = torch.rand(37, generator=torch.Generator().manual_seed(5))
    inverse = moebert.expert_neurons(imp, MoEConfig(3, 11, 5, split="inverse"))
    assert set(inverse[0, :5].tolist()) == set(torch.argsort(imp)[:5].tolist())  # least important shared
    rnd = moebert.expert_neurons(imp, MoEConfig(3, 11, 5, split="random"), torch.Generator().manual_seed(0))
    assert rnd.shape == (3, 11) and len(set(rnd.flatten().tolist())) == 5 + 3 * 6  # distinct outside shared


# ----------------------------------------------------------------------------------------------
# moebert.py: routing (paper section 3.4)


@pytest.mark.parametrize("route", moebert.ROUTES)
def test_moebert_round_trips_through_state_dict(tmp_path, route):
    model = tiny_model()
    cfg = MoEConfig(num_experts=3, expert_dim=11, shared_dim=5, route=route, seed=7)
    moe = moebert_from_dense(model, torch.rand(3, 37), cfg, token_counts=torch.arange(99.0)).eval()
    moe.save_pretrained(tmp_path)
    again = moebert.MoEBertForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    if route.startswith("hash"):
        for a, b in zip(moe.bert.encoder.layer, again.bert.encoder.layer):
            assert torch.equal(a.moe.hash_table, b.moe.hash_table)
            assert a.moe.hash_table.unique().numel() == 3
    batch = random_batch()
    args = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    assert torch.equal(moe(*args).logits, again(*args).logits)


def test_hash_random_tables_differ_per_layer_and_follow_the_seed():
    model = tiny_model()
    make = lambda seed: moebert_from_dense(model, torch.rand(3, 37), MoEConfig(3, 11, 5, seed=seed))
    a, b, c = make(1), make(1), make(2)
    tables = [l.moe.hash_table for l in a.bert.encoder.layer]
    assert not torch.equal(tables[0], tables[1])
    assert all(torch.equal(x.moe.hash_table, y.moe.hash_table) for x, y in zip(a.bert.encoder.layer, b.bert.encoder.layer))
    assert not torch.equal(tables[0], c.bert.encoder.layer[0].moe.hash_table)


def test_hash_balance_loads_are_close_to_equal_on_real_token_counts():
    import json
    with open(os.path.join(ROOT, "fixtures", "rte_train_token_counts.json")) as f:
        sparse = json.load(f)  # {token id: count} over the real RTE training split, MiniLM vocab
    counts = torch.zeros(30522)
    for tok, n in sparse.items():
        counts[int(tok)] = n
    for N in (2, 4, 8):
        table = moebert.hash_balance_table(counts, N, torch.Generator().manual_seed(0))
        load = torch.zeros(N).index_add_(0, table, counts)
        random_load = torch.zeros(N).index_add_(0, moebert.hash_random_table(30522, N, torch.Generator()), counts)
        spread = (load.max() - load.min()) / load.mean()
        assert spread < 0.01, f"{N} experts: loads {load.tolist()}"
        assert spread < (random_load.max() - random_load.min()) / random_load.mean()


def test_gate_probabilities_and_balance_loss_by_hand():
    model = tiny_model()
    batch = random_batch()
    for route in ("gate-token", "gate-sentence"):
        moe = moebert_from_dense(model, torch.rand(3, 37), MoEConfig(3, 11, 5, route=route))
        ffn = moe.bert.encoder.layer[0].moe
        x = torch.randn(5, 11, 32)
        expert, prob = ffn.route_gate(x, batch["attention_mask"])
        mask = batch["attention_mask"].float()
        if route == "gate-token":
            probs = torch.softmax(x @ ffn.gate.weight.T, -1)  # [B, T, N]
            w = mask / mask.sum()  # real tokens, equally
            choice = probs.argmax(-1)
        else:
            mean = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            probs = torch.softmax(mean @ ffn.gate.weight.T, -1)  # [B, N]
            w = torch.full((5,), 1 / 5)  # sentences, equally
            choice = probs.argmax(-1)
        assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), 1e-6, "probabilities sum to 1")
        P = [(probs[..., e] * w).sum() for e in range(3)]
        f = [((choice == e).float() * w).sum() for e in range(3)]
        by_hand = 3 * sum(p * q for p, q in zip(P, f))
        assert_close(ffn.balance_loss, by_hand, 1e-6, f"{route} balance loss")
        out = moe(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        assert out.balance_loss.ndim == 0 and out.balance_loss.requires_grad


# ----------------------------------------------------------------------------------------------
# moebert.py: distillation loss (paper section 3.3)


def test_distillation_loss_zero_for_identical_outputs():
    model = tiny_model().eval()
    batch = random_batch()
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], output_hidden_states=True)
    assert moebert.distillation_loss(out, out, batch["attention_mask"]).abs().item() < 1e-7


@pytest.mark.parametrize("regression", [False, True])
def test_distillation_loss_equals_direct_computation(regression):
    g = torch.Generator().manual_seed(0)
    C = 1 if regression else 3
    hs = [torch.randn(4, 6, 8, generator=g) for _ in range(3)]
    ht = [torch.randn(4, 6, 8, generator=g) for _ in range(3)]
    s, t = torch.randn(4, C, generator=g), torch.randn(4, C, generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[2, 3:] = 0
    student, teacher = bert.ClassifierOutput(s, tuple(hs)), bert.ClassifierOutput(t, tuple(ht))
    if regression:
        pred = ((s - t) ** 2).mean()
    else:
        p, q = torch.softmax(t, -1), torch.softmax(s, -1)
        pred = 0.5 * ((p * (p / q).log()).sum() + (q * (q / p).log()).sum()) / 4
    # every position
    mse = sum(((a - b) ** 2).mean() for a, b in zip(hs, ht))
    assert_close(moebert.distillation_loss(student, teacher, regression=regression), mse + pred, 1e-6)
    # real tokens only
    real = mask.bool()
    mse = sum(((a[real] - b[real]) ** 2).mean() for a, b in zip(hs, ht))
    assert_close(moebert.distillation_loss(student, teacher, mask, regression=regression), mse + pred, 1e-6)


# ----------------------------------------------------------------------------------------------
# The MoE layer under bf16 autocast, against fp32 on CPU

# bf16 keeps 8 significant bits: unit roundoff u = 2^-8 = 3.9e-3 per rounding. Under autocast every
# matmul rounds its inputs and output to bf16; 3 layers forward and backward chain ~20 such roundings,
# which add up like a random walk (sqrt(20) u ~ 1.7e-2). Measured on CPU: logits at most 0.9% of their
# scale, expert and gate gradients at most 1.5% of theirs. We allow 5% (~13 u): room for CUDA's other
# kernels (SDPA, reduction orders), while a routing error moves logits by ~45% and gradients by ~97%
# (test_bf16_bound_would_see_a_routing_error).
BF16_REL = 5e-2


def moe_for_bf16(route):
    """A tiny MoEBERT (3 experts of 11 neurons, 5 shared) whose FFNs matter to the logits.

    With BERT's init (std 0.02) random FFN outputs are so small next to the residual that sending
    every token to the wrong expert moves the logits by 1%, about what bf16 rounding does; at std 0.1 it
    moves them by ~45%, so the logit comparison can see a routing error. Expert dropout is off and
    the model is in eval mode: dropout masks differ between CPU and CUDA generators."""
    torch.manual_seed(0)
    dense = BertForSequenceClassification(BertConfig(**TINY, initializer_range=0.1), 3)
    cfg = MoEConfig(num_experts=3, expert_dim=11, shared_dim=5, route=route, expert_dropout=0.0)
    importance = torch.rand(3, 37, generator=torch.Generator().manual_seed(4))
    moe = moebert_from_dense(dense, importance, cfg, token_counts=torch.arange(99.0))
    if route.startswith("gate"):
        # Gates as BERT initialises them (std 0.02): gate logits stay below ~0.4 (see force_gate_margins).
        with torch.no_grad():
            for layer in moe.bert.encoder.layer:
                layer.moe.gate.weight.normal_(0.0, 0.02)
    return moe.eval()


def force_gate_margins(moe, input_ids, margin=2.0):
    """Make every top-1 gate choice robust to bf16 rounding; returns the gate logits of each call.

    A top-1 choice flips when two gate probabilities are nearly tied, and one flip early on changes
    every later layer, so no per-token filter can save the comparison. Instead a forward hook adds
    `margin` (a constant, without gradient, the same in both runs) to one expert's gate logit: the
    expert (token id mod N) for gate-token, (sentence index mod N) for gate-sentence. With raw gate
    logits below ~0.4, the top-1 margin is at least ~1.2, hundreds of times the bf16 error of a gate
    logit (~2e-3), while the top probability stays near 0.8, so gradients still flow through the
    gate. Everything after the gate's linear map (softmax, top-1, balance loss, scaling) is the code
    under test, unchanged."""
    logits_seen = []

    def hook(gate, inputs, logits):
        N = logits.size(-1)
        if logits.dim() == 3:  # gate-token: [B, T, N]
            pick = input_ids % N
        else:  # gate-sentence: [B, N]
            pick = torch.arange(len(logits), device=logits.device) % N
        forced = logits + margin * F.one_hot(pick, N).to(logits.dtype)
        logits_seen.append(forced.detach().float().cpu())
        return forced

    for layer in moe.bert.encoder.layer:
        layer.moe.gate.register_forward_hook(hook)
    return logits_seen


def forward_backward(moe, batch, device, bf16):
    """Logits, CE loss (+ the gates' balance loss) and its backward, on `device`, in bf16 autocast or fp32."""
    moe.to(device)
    b = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        out = moe(b["input_ids"], b["token_type_ids"], b["attention_mask"])
        loss = moebert.task_loss(out.logits, b["labels"])
        if out.balance_loss is not None:
            loss = loss + out.balance_loss
    loss.backward()
    return out, loss


def moe_parameters(model):
    """Every expert parameter, and the gate's for gate routes: {name: parameter}."""
    return {n: p for n, p in model.named_parameters() if ".moe.experts." in n or ".moe.gate." in n}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("route", moebert.ROUTES)
def test_moe_under_bf16_autocast_matches_fp32(route, path, device, monkeypatch):
    take_path(monkeypatch, path)
    gate = route.startswith("gate")
    batch = random_batch()  # 5 x 11 tokens, padded: 55 tokens, about 18 per expert
    ref_model, model = moe_for_bf16(route), moe_for_bf16(route)
    if gate:
        ref_gates = force_gate_margins(ref_model, batch["input_ids"])
        gates = force_gate_margins(model, batch["input_ids"].to(device))
    ref, ref_loss = forward_backward(ref_model, batch, "cpu", bf16=False)
    out, loss = forward_backward(model, batch, device, bf16=True)

    # Autocast ran the classifier in bf16; the losses are fp32 (task_loss and the gates upcast).
    assert out.logits.dtype == torch.bfloat16 and out.logits.device.type == device
    assert torch.isfinite(out.logits).all() and loss.dtype == torch.float32 and torch.isfinite(loss)
    if gate:
        assert out.balance_loss.dtype == torch.float32
    # Parameters stay fp32 under autocast, and so do their gradients (what AdamW updates).
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name

    if gate:  # the forced margins held: both runs routed every token (or sentence) alike
        assert len(gates) == len(ref_gates) == 3
        for layer, (g, r) in enumerate(zip(gates, ref_gates)):
            top2 = r.topk(2, dim=-1).values
            assert (top2[..., 0] - top2[..., 1]).min() > 1.0, f"layer {layer}: gate margin too small"
            assert torch.equal(g.argmax(-1), r.argmax(-1)), f"layer {layer}: routing differs under bf16"

    # Within bf16 rounding of the fp32 reference, and not equal to it: bf16 really was used.
    err = relative_to_scale(out.logits.float(), ref.logits)
    assert 0 < err <= BF16_REL, f"logits: {err:.3g} of their scale"
    ref_params, params = moe_parameters(ref_model), moe_parameters(model)
    assert len(params) == 3 * (6 + gate)  # 6 stacked expert tensors (+ the gate) in each of 3 layers
    for name, p in params.items():
        err = relative_to_scale(p.grad, ref_params[name].grad)
        assert err <= BF16_REL, f"gradient of {name}: {err:.3g} of its scale"


def test_bf16_bound_would_see_a_routing_error():
    """BF16_REL has teeth: the same comparison in fp32, with every token sent to the next expert
    (a routing bug), fails it by far, in the logits and in every expert gradient."""
    batch = random_batch()
    ref_model, wrong_model = moe_for_bf16("hash-random"), moe_for_bf16("hash-random")
    for layer in wrong_model.bert.encoder.layer:
        layer.moe.hash_table.add_(1).remainder_(3)
    ref, _ = forward_backward(ref_model, batch, "cpu", bf16=False)
    wrong, _ = forward_backward(wrong_model, batch, "cpu", bf16=False)
    assert relative_to_scale(wrong.logits, ref.logits) > 4 * BF16_REL
    ref_params, wrong_params = moe_parameters(ref_model), moe_parameters(wrong_model)
    for name, p in wrong_params.items():
        assert relative_to_scale(p.grad, ref_params[name].grad) > 4 * BF16_REL, name


def experts_and_tokens(sizes, expert_dim):
    """Three experts (hidden 32) with weights that make each expert's output its own, and tokens
    sizes[e] of them for expert e, shuffled: experts, expert [n], x [n, H], g [n, H] (an upstream gradient)."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=3, expert_dim=expert_dim, shared_dim=5, expert_dropout=0.0)
    experts = experts_py.Experts(BertConfig(**TINY), cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    expert = torch.cat([torch.full((k,), e) for e, k in enumerate(sizes)])[torch.randperm(sum(sizes))]
    return experts, expert, torch.randn(len(expert), 32), torch.randn(len(expert), 32)


def each_token_through_its_expert(experts, expert, x, g):
    """The reference: one token at a time through its own expert alone, in fp64, and the gradients
    of (out * g).sum(). Returns out [n, H] and the fp64 leaves: x and the experts' tensors by name."""
    ref_experts = {n: p.detach().double().requires_grad_() for n, p in experts.named_parameters()}
    ref_x = x.double().requires_grad_()
    ref = []
    for t, e in enumerate(expert.tolist()):
        p = {n: v[e] for n, v in ref_experts.items()}
        h = F.gelu(ref_x[t] @ p["intermediate_weight"] + p["intermediate_bias"])
        y = h @ p["output_weight"] + p["output_bias"] + ref_x[t]
        ref.append(F.layer_norm(y, (32,), p["LayerNorm_weight"], p["LayerNorm_bias"], experts.eps))
    ref = torch.stack(ref)
    (ref * g.double()).sum().backward()
    return ref, ref_x, ref_experts


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sizes", [(19, 0, 10), (7, 11, 12), (0, 0, 6)])  # an idle expert; uneven; one takes all
def test_host_sized_paths_match_each_token_through_its_expert(sizes, path, monkeypatch):
    """The padded batched path and the per-expert loop, in fp64, against each token run alone
    through its own expert: outputs and the gradients of x and of all six expert tensors."""
    take_path(monkeypatch, path)
    experts, expert, x, g = experts_and_tokens(sizes, expert_dim=11)
    ref, ref_x, ref_experts = each_token_through_its_expert(experts, expert, x, g)
    experts.double()
    x = x.double().requires_grad_()
    out = experts(x, expert)
    (out * g.double()).sum().backward()
    assert_close(out, ref, 1e-12, f"{path} outputs")
    assert_close(x.grad, ref_x.grad, 1e-12, f"{path} gradient of x")
    for n, p in experts.named_parameters():
        assert_close(p.grad, ref_experts[n].grad, 1e-12, f"{path} gradient of {n}")
        for e, k in enumerate(sizes):
            if k == 0:  # an idle expert gets no gradient
                assert (p.grad[e] == 0).all(), n


@NEEDS_GROUPED_MM
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", [(19, 0, 10), (7, 11, 11)])  # tokens per expert: one expert idle; uneven
def test_grouped_experts_match_each_token_through_its_expert(sizes, device, monkeypatch):
    """The grouped path (CUDA's in bf16: one grouped matmul per weight, no host sync) under bf16
    autocast, against each token run alone through its own expert in fp64: the outputs and the
    gradients of x and of all six expert tensors within bf16 rounding. Sizes a multiple of 8."""
    grouped_mm, calls = experts_py.GROUPED_MM, []
    monkeypatch.setattr(experts_py, "GROUPED_DEVICES", ("cpu", "cuda"))  # on CPU it is not the default
    monkeypatch.setattr(experts_py, "GROUPED_MM", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    experts, expert, x, g = experts_and_tokens(sizes, expert_dim=40)
    ref, ref_x, ref_experts = each_token_through_its_expert(experts, expert, x, g)

    experts.to(device)
    x = x.to(device).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = experts(x, expert.to(device))
    (out * g.to(device)).sum().backward()
    assert len(calls) == 2 and out.dtype == torch.float32  # W1 and W2 grouped; x's dtype back
    err = relative_to_scale(out, ref)
    assert 0 < err <= BF16_REL, f"outputs: {err:.3g} of their scale"
    assert relative_to_scale(x.grad, ref_x.grad) <= BF16_REL
    for n, p in experts.named_parameters():
        err = relative_to_scale(p.grad, ref_experts[n].grad)
        assert err <= BF16_REL, f"gradient of {n}: {err:.3g} of its scale"
        if 0 in sizes:  # the idle expert gets no gradient
            assert (p.grad[sizes.index(0)] == 0).all(), n


@contextlib.contextmanager
def cuda_sync_debug(mode):
    """torch's CUDA sync debug mode for the duration, once the device has drained: "warn" warns at
    each wait for the device, "error" raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.skipif(torch.cuda.is_available() and not experts_py.grouped_on("cuda"),
                    reason="this GPU has no grouped kernel in torch: its grouped matmul reads the offsets back")
@pytest.mark.parametrize("route", moebert.ROUTES)
def test_moebert_forward_on_cuda_never_waits_for_the_device(route):
    """On CUDA in bf16 (the grouped path), a MoEBERT forward without an attention_mask reads nothing
    back to the host: torch's sync debug mode raises on any wait. So a CUDA graph can capture it."""
    torch.manual_seed(0)
    dense = BertForSequenceClassification(BertConfig(**TINY), 3)
    cfg = MoEConfig(num_experts=3, expert_dim=16, shared_dim=8, route=route)  # sizes a multiple of 8
    moe = moebert_from_dense(dense, torch.rand(3, 37), cfg, token_counts=torch.arange(99.0)).cuda().eval()
    ids = random_batch()["input_ids"].cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        moe(ids)  # warm-up: first calls may read device properties
        with cuda_sync_debug("error"):
            logits = moe(ids).logits
    assert torch.isfinite(logits).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("path", PATHS)
def test_host_sized_paths_on_cuda_wait_once_a_call(path, monkeypatch):
    """Outside the grouped path (here fp32), Experts.forward reads the experts' sizes back to the host
    once a call, its one wait for the device: no count or sort of its own reads anything back (as
    bincount on CUDA does its input's min and max). Sync debug mode warns at each wait."""
    take_path(monkeypatch, path)
    experts, expert, x, _ = experts_and_tokens((19, 17, 19), expert_dim=11)
    experts, expert, x = experts.cuda().eval(), expert.cuda(), x.cuda()
    with torch.no_grad():
        want = experts(x, expert)  # warm-up: first calls may read device properties
        with cuda_sync_debug("warn"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = experts(x, expert)
    waits = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(waits) == 1, waits
    assert torch.equal(got, want)


@NEEDS_GROUPED_MM
def test_grouped_path_only_where_it_can_run(monkeypatch):
    """Experts.grouped_dtype: bf16 (by autocast or by x's dtype) on a grouped device with sizes a
    multiple of 8; else the other paths, which keep fp32 exact."""
    small = experts_py.Experts(BertConfig(**TINY), MoEConfig(num_experts=3, expert_dim=11, shared_dim=5))
    big = experts_py.Experts(BertConfig(**TINY), MoEConfig(num_experts=3, expert_dim=40, shared_dim=16))
    x = torch.randn(4, 32)
    assert big.grouped_dtype(x) is None  # CPU is not a grouped device by default
    monkeypatch.setattr(experts_py, "GROUPED_DEVICES", ("cpu",))
    assert big.grouped_dtype(x) is None  # fp32
    assert big.grouped_dtype(x.bfloat16()) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert big.grouped_dtype(x) == torch.bfloat16 and small.grouped_dtype(x) is None  # 11 wide
    monkeypatch.setattr(experts_py, "GROUPED_MM_CPU", False)  # torch 2.8: its grouped matmul is CUDA's alone
    assert big.grouped_dtype(x.bfloat16()) is None


@NEEDS_GROUPED_MM
@pytest.mark.parametrize("capability, grouped", [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True),
                                                 ((12, 0), False)])
def test_grouped_path_only_on_gpus_with_torchs_grouped_kernel(capability, grouped, monkeypatch):
    """torch's grouped matmul has its own kernel (no host read) on compute capability 9.x and 10.x
    alone; elsewhere it loops over the groups on the host (torch's GroupedBlas.cpp), so on an A100 or
    an RTX 50xx the experts take their other paths (and fast.py its every-expert path: test_fast.py)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert experts_py.grouped_on(torch.device("cuda")) == grouped
    assert experts_py.grouped_on("cuda:0") == grouped
    assert not experts_py.grouped_on("cpu")  # the CPU is not a grouped device by default


@pytest.mark.parametrize("version, cpu, on_a_b200", [("2.8.0+cu128", False, False), ("2.9.1", True, True),
                                                   ("2.14.1+cpu", True, True)])
def test_grouped_path_by_torch_release(version, cpu, on_a_b200, monkeypatch):
    """torch 2.8's grouped matmul runs on compute capability 9.0 alone (its NotImplementedError on the CPU:
    tools/other_torch.sh 2.8.0); from 2.9 on the CPU too, and with its own kernel on 10.x as well."""
    cpu_ok, majors = experts_py.grouped_support(version)
    monkeypatch.setattr(experts_py, "GROUPED_MM", lambda *a, **k: None)  # any torch here: the decision alone
    monkeypatch.setattr(experts_py, "GROUPED_MM_CPU", cpu_ok)
    monkeypatch.setattr(experts_py, "GROUPED_CUDA_MAJORS", majors)
    monkeypatch.setattr(experts_py, "GROUPED_DEVICES", ("cpu", "cuda"))
    for capability, grouped in (((9, 0), True), ((10, 0), on_a_b200), ((8, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert experts_py.grouped_on("cuda") == grouped, capability
    assert experts_py.grouped_on("cpu") == cpu


# ----------------------------------------------------------------------------------------------
# moebert.py: the QA loss, importance, the surgery


def test_qa_loss_is_the_mean_of_start_and_end_cross_entropy_per_example():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 2, generator=g, dtype=torch.float64)
    labels = torch.tensor([[0, 0], [2, 5], [8, 8], [3, 4]])
    by_hand = []
    for b in range(4):
        logp = logits[b] - logits[b].exp().sum(0).log()  # [T, 2], log-softmax over positions
        by_hand.append(-(logp[labels[b, 0], 0] + logp[labels[b, 1], 1]) / 2)
    by_hand = torch.stack(by_hand)
    assert_close(moebert.task_loss(logits, labels), by_hand.mean(), 1e-12, "mean")
    # reduction="sum" is the sum of the per-example losses, as importance_scores needs
    assert_close(moebert.task_loss(logits, labels, reduction="sum"), by_hand.sum(), 1e-12, "sum")
    for b in range(4):
        assert_close(moebert.task_loss(logits[b:b + 1], labels[b:b + 1]), by_hand[b], 1e-12, f"example {b}")


def test_qa_importance_equals_naive_official_algorithm():
    model = tiny_qa().double()
    batch = qa_batch()
    batches = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    fast = importance_scores(model, batches)
    model.eval()
    naive = naive_importance(model, batches[0]) + naive_importance(model, batches[1])
    assert fast.shape == (3, 37) and naive.abs().max() > 0
    rel = (fast - naive).abs().max() / naive.abs().max()
    assert rel <= 1e-10, f"relative max diff {rel:.3g}"
    print(f"QA importance vs naive: relative max diff {rel:.2e}")


def test_one_full_expert_reproduces_dense_qa_logits():
    model = tiny_qa().double().eval()
    imp = importance_scores(model, [qa_batch()])
    batch = qa_batch()
    for route in moebert.ROUTES:
        cfg = MoEConfig(num_experts=1, expert_dim=37, shared_dim=0, route=route)
        moe = moebert_from_dense(model, imp, cfg, token_counts=torch.ones(99)).eval()
        assert type(moe) is MoEBertForQuestionAnswering and moe.qa_outputs.weight.dtype == torch.float64
        with torch.no_grad():
            a, b = moe(*inputs(batch)).logits, model(*inputs(batch)).logits
        assert_close(a, b, 1e-10, f"one expert, {route}")


def test_surgery_picks_the_moe_class_of_the_dense_model():
    imp = torch.rand(3, 37)
    cfg = MoEConfig(3, 11, 5)
    ffn = re.compile(r"\.layer\.\d+\.(intermediate|output)\.")  # the dense FFN's names (not attention.output)
    for dense, moe_class in ((tiny_model(num_labels=4), moebert.MoEBertForSequenceClassification),
                             (tiny_qa(), MoEBertForQuestionAnswering)):
        moe = moebert_from_dense(dense, imp, cfg)
        assert type(moe) is moe_class and moe.head == dense.head
        # The dense model's names, its FFNs replaced by .moe. ones: the head keeps its name and weights.
        assert {k for k in moe.state_dict() if ".moe." not in k} == {k for k in dense.state_dict() if not ffn.search(k)}
        head = getattr(moe, dense.head_module)
        assert torch.equal(head.weight, getattr(dense, dense.head_module).weight)
    assert moe.bert.encoder.layer[0].moe.experts.intermediate_weight.shape == (3, 32, 11)
    with pytest.raises(ValueError, match="no MoEBERT for BertModel"):
        moebert_from_dense(tiny_qa().bert, imp, cfg)


# ----------------------------------------------------------------------------------------------
# moebert.py: the QA distillation loss (paper section 3.3; the official MoEBertForQuestionAnswering)


def test_qa_distillation_loss_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    B, T, H = 4, 6, 8
    hs = [torch.randn(B, T, H, generator=g, dtype=torch.float64) for _ in range(3)]
    ht = [torch.randn(B, T, H, generator=g, dtype=torch.float64) for _ in range(3)]
    s, t = (torch.randn(B, T, 2, generator=g, dtype=torch.float64) for _ in range(2))  # logits [B, T, 2]

    # No padding: the official definition, symmetric_KL_loss(p, q) = 0.5 * sum (p - q)(log p - log q)
    # over the batch and positions, divided by the batch size; then 0.5 * (start + end).
    def official_sym_kl(p, q):
        return 0.5 * ((p - q) * (p.log() - q.log())).sum() / B
    ps, pt = torch.softmax(s, 1), torch.softmax(t, 1)  # over positions
    official = 0.5 * (official_sym_kl(ps[..., 0], pt[..., 0]) + official_sym_kl(ps[..., 1], pt[..., 1]))
    mse = sum(((a - b) ** 2).mean() for a, b in zip(hs, ht))
    student, teacher = bert.ClassifierOutput(s, tuple(hs)), bert.ClassifierOutput(t, tuple(ht))
    hidden, pred = moebert.distillation_terms(student, teacher)
    assert_close(pred, official, 1e-12, "prediction term, official definition")
    assert_close(moebert.distillation_loss(student, teacher), mse + official, 1e-12, "no padding")

    # Padding, as the model emits it (PAD_LOGIT): per example and per start/end, KLs over real positions only.
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 3:] = 0
    mask[0, 5:] = 0
    pad = ~mask.bool()
    s, t = s.masked_fill(pad[..., None], bert.PAD_LOGIT), t.masked_fill(pad[..., None], bert.PAD_LOGIT)
    direct = 0.0
    for b in range(B):
        n = int(mask[b].sum())
        for k in range(2):  # start, end
            p, q = torch.softmax(t[b, :n, k], 0), torch.softmax(s[b, :n, k], 0)
            direct += 0.5 * 0.5 * ((p * (p / q).log()).sum() + (q * (q / p).log()).sum()) / B
    real = mask.bool()
    mse = sum(((a[real] - b[real]) ** 2).mean() for a, b in zip(hs, ht))
    student, teacher = bert.ClassifierOutput(s, tuple(hs)), bert.ClassifierOutput(t, tuple(ht))
    assert_close(moebert.distillation_loss(student, teacher, mask), mse + direct, 1e-12, "padded")


# ----------------------------------------------------------------------------------------------
# moebert.py: saving and loading every head


@pytest.mark.parametrize("route", moebert.ROUTES)
def test_moebert_qa_round_trips_through_save_and_load(tmp_path, route):
    cfg = MoEConfig(num_experts=3, expert_dim=11, shared_dim=5, route=route, seed=7)
    moe = moebert_from_dense(tiny_qa(), torch.rand(3, 37), cfg, token_counts=torch.arange(99.0)).eval()
    moe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["head"] == "qa" and saved["moe"]["route"] == route
    batch = qa_batch()
    want = moe(*inputs(batch)).logits
    for again in (MoEBertForQuestionAnswering.from_pretrained(str(tmp_path)), moebert.load(str(tmp_path)),
                  moebert.MoEBert.from_pretrained(str(tmp_path))):
        assert type(again) is MoEBertForQuestionAnswering and again.moe_config == cfg
        again.eval()
        assert torch.equal(again(*inputs(batch)).logits, want)
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in moe.state_dict().items())
    with pytest.raises(BadFile, match="a qa head, not classification.*MoEBertForQuestionAnswering"):
        moebert.MoEBertForSequenceClassification.from_pretrained(str(tmp_path))


def test_classification_moebert_loads_as_before(tmp_path):
    """A saved MoEBERT classifier, with "head" in its config or without (saved before QA), loads by its
    class and by moebert.load; a QA class refuses it."""
    clf = moebert_from_dense(tiny_model(num_labels=3), torch.rand(3, 37), MoEConfig(3, 11, 5)).eval()
    clf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["head"] == "classification" and config["num_labels"] == 3
    batch = random_batch()
    want = clf(*inputs(batch)).logits
    for saved in (config, {k: v for k, v in config.items() if k != "head"}):
        (tmp_path / "config.json").write_text(json.dumps(saved))
        for load in (moebert.MoEBertForSequenceClassification.from_pretrained, moebert.load):
            again = load(str(tmp_path))
            assert type(again) is moebert.MoEBertForSequenceClassification and again.num_labels == 3
            assert torch.equal(again.eval()(*inputs(batch)).logits, want)
    with pytest.raises(BadFile, match="a classification head, not qa"):
        MoEBertForQuestionAnswering.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "head": "ner"}))
    with pytest.raises(BadFile, match="unknown head 'ner'"):
        moebert.load(str(tmp_path))


def test_saved_moebert_that_is_damaged_or_not_one_is_a_user_error(tmp_path):
    teacher = tiny_model(num_labels=2)
    moe = moebert_from_dense(teacher, torch.rand(3, 37), MoEConfig(num_experts=3, expert_dim=11, shared_dim=5))
    moe.save_pretrained(tmp_path / "moe")
    teacher.save_pretrained(tmp_path / "dense")
    assert_user_error(raised(moebert.MoEBertForSequenceClassification.from_pretrained, tmp_path / "dense"),
                      BadFile, ValueError, "not a saved MoEBERT")
    assert_user_error(raised(BertForSequenceClassification.from_pretrained, tmp_path / "moe", num_labels=2),
                      BadFile, ValueError, "moe holds a MoEBERT, not a dense BERT: load it with moebert.load")
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    for edit, phrase in (({"moe": []}, "not a saved MoEBERT"), ({"moe": dict(config["moe"], route="hash")},
                         "route 'hash' is not one of"), ({"moe": dict(config["moe"], expert_dim="11")},
                         "expert_dim is '11', not a whole number"), ({"num_labels": None}, "num_labels must be")):
        (tmp_path / "edited").mkdir(exist_ok=True)
        shutil.copy(tmp_path / "moe" / "model.safetensors", tmp_path / "edited")
        (tmp_path / "edited" / "config.json").write_text(json.dumps(dict(config, **edit)))
        assert_user_error(raised(moebert.load, tmp_path / "edited"), BadFile, ValueError, "edited/config.json", phrase)
    weights = tmp_path / "moe" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk
    assert_user_error(raised(moebert.MoEBertForSequenceClassification.from_pretrained, tmp_path / "moe"),
                      BadFile, ValueError, "model.safetensors is corrupt or incomplete")


# ----------------------------------------------------------------------------------------------
# moebert.py: the QA model's padding invariance, and bf16 autocast


@pytest.mark.parametrize("route", [None, "hash-random", "gate-token", "gate-sentence"])  # None: the dense model
def test_qa_logits_and_loss_do_not_depend_on_padding(route):
    """Each example alone (no padding) and inside the padded batch: the same start/end logits on its
    real tokens, the same QA loss, the same distillation term against the dense model."""
    dense = tiny_qa().double().eval()
    if route is None:
        model = dense
    else:
        model = moebert_from_dense(dense, torch.rand(3, 37), MoEConfig(3, 11, 5, route=route)).eval()
    batch = qa_batch()
    with torch.no_grad():
        out, t_out = model(*inputs(batch), output_hidden_states=True), dense(*inputs(batch), output_hidden_states=True)
        for b in range(5):
            n = int(batch["attention_mask"][b].sum())
            one = {k: (v[b:b + 1, :n] if v.dim() == 2 and k != "labels" else v[b:b + 1]) for k, v in batch.items()}
            assert one["attention_mask"].all()
            alone = model(*inputs(one), output_hidden_states=True)
            assert_close(alone.logits[0], out.logits[b, :n], 1e-10, f"example {b} logits")
            assert_close(moebert.task_loss(alone.logits, one["labels"]),
                         moebert.task_loss(out.logits[b:b + 1], batch["labels"][b:b + 1]), 1e-10, f"example {b} loss")
            t_alone = dense(*inputs(one), output_hidden_states=True)
            padded = moebert.distillation_terms(
                bert.ClassifierOutput(out.logits[b:b + 1], tuple(h[b:b + 1] for h in out.hidden_states)),
                bert.ClassifierOutput(t_out.logits[b:b + 1], tuple(h[b:b + 1] for h in t_out.hidden_states)),
                batch["attention_mask"][b:b + 1])
            for x, y in zip(moebert.distillation_terms(alone, t_alone, one["attention_mask"]), padded, strict=True):
                assert_close(x, y, 1e-10, f"example {b} distillation")


def test_qa_under_bf16_autocast():
    """Padding keeps a finite, far-below logit in bf16; the loss and the distillation term stay finite and
    near fp32's."""
    model = tiny_qa().eval()
    moe = moebert_from_dense(model, torch.rand(3, 37), MoEConfig(3, 11, 5, route="gate-token")).eval()
    batch = qa_batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        fp32 = [m(*inputs(batch), output_hidden_states=True) for m in (moe, model)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = [m(*inputs(batch), output_hidden_states=True) for m in (moe, model)]
    assert bf16[0].logits.dtype == torch.bfloat16 and (bf16[0].logits[~real] == -9984).all()
    for outs in (fp32, bf16):
        loss = moebert.task_loss(outs[0].logits, batch["labels"])
        hidden, pred = moebert.distillation_terms(*outs, batch["attention_mask"])
        assert all(torch.isfinite(x) for x in (loss, hidden, pred))
    want = moebert.task_loss(fp32[0].logits, batch["labels"])
    assert_close(moebert.task_loss(bf16[0].logits, batch["labels"]), want, 0.05 * want.abs().item(), "bf16 loss")


# ----------------------------------------------------------------------------------------------
# tools/expert_load.py: the share of the tokens each layer's experts take


@pytest.mark.parametrize("route", ["hash-random", "gate-token", "gate-sentence"])
def test_expert_load_counts_each_layers_own_routing(route):
    """Against the routes recomputed from the layers' inputs (the attention outputs of the encoder's
    hidden states), over the real tokens only."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("expert_load", os.path.join(ROOT, "tools", "expert_load.py"))
    expert_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(expert_load)
    moe = moebert_from_dense(tiny_model(), torch.rand(3, 37), MoEConfig(num_experts=3, expert_dim=12, shared_dim=4,
                                                                       route=route)).eval()
    if route.startswith("gate"):
        for layer in moe.bert.encoder.layer:  # gates that spread the tokens
            torch.nn.init.normal_(layer.moe.gate.weight, std=1.0)
    batch = random_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    shares = expert_load.expert_shares(moe, [batch, batch])
    with torch.no_grad():
        hidden = moe(ids, batch["token_type_ids"], mask, output_hidden_states=True).hidden_states
        for l, layer in enumerate(moe.bert.encoder.layer):
            if route == "hash-random":
                expert = layer.moe.hash_table[ids]
            else:
                x = layer.attention(hidden[l], mask[:, None, None, :].bool())
                expert = layer.moe.route_gate(x, mask)[0].view(ids.shape)
            want = torch.bincount(expert[mask == 1], minlength=3).double()
            assert_close(shares[l], want / want.sum(), 1e-6, f"layer {l}")
    assert (shares.sum(1) - 1).abs().max() < 1e-6 and (shares > 0).sum() > len(shares)  # not all on one expert
