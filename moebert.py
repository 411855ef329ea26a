"""MoEBERT: importance scores, the FFN-to-experts split, routing, the MoE layer, distillation.

Zuo et al., "MoEBERT: from BERT to Mixture-of-Experts via Importance-Guided Adaptation", NAACL 2022.
The FFN of every BERT layer becomes N smaller experts that share its most important neurons; each
token goes to one expert, so a token costs about half the dense FFN while the model keeps all the
knowledge the important neurons hold. Distillation from the dense teacher recovers the rest.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bert import BertConfig, BertForQuestionAnswering, BertForSequenceClassification
from common import BadFile
from experts import Experts
from weights import check_finite, config_fields, find_config, misfit, read_checkpoint, read_config

ROUTES = ("hash-random", "hash-balance", "gate-token", "gate-sentence")
SPLITS = ("importance", "random", "inverse")


@dataclass
class MoEConfig:
    num_experts: int = 4  # N experts per layer
    expert_dim: int = 768  # FFN neurons per expert (BERT-base: 3072 / 4)
    shared_dim: int = 512  # the most important neurons, copied into every expert
    route: str = "hash-random"  # hash-random | hash-balance | gate-token | gate-sentence
    split: str = "importance"  # importance (the paper) | random | inverse (ablations)
    expert_dropout: float = 0.1  # dropout on each expert's output, before the residual
    balance_weight: float = 0.0  # weight of the gate load-balance loss (gate routes only)
    seed: int = 0  # seeds the hash tables and the random split

    def check(self, intermediate_size):
        """Clear errors for sizes that cannot form experts."""
        need = self.shared_dim + self.num_experts * (self.expert_dim - self.shared_dim)  # distinct neurons
        for wrong, why in (
                (self.route not in ROUTES, f"route {self.route!r} is not one of {', '.join(ROUTES)}"),
                (self.split not in SPLITS, f"split {self.split!r} is not one of {', '.join(SPLITS)}"),
                (self.num_experts < 1, f"num_experts must be at least 1, got {self.num_experts}"),
                (self.expert_dim < 1, f"expert_dim must be at least 1, got {self.expert_dim} (the default: neurons // N)"),
                (not 0 <= self.shared_dim <= self.expert_dim,
                 f"shared_dim {self.shared_dim} must be between 0 and expert_dim {self.expert_dim}"),
                (self.expert_dim > intermediate_size,
                 f"expert_dim {self.expert_dim} exceeds the FFN's {intermediate_size} neurons"),
                (need > intermediate_size,
                 f"too few neurons: {self.num_experts} experts of {self.expert_dim} with {self.shared_dim} shared "
                 f"need {need} distinct neurons, the FFN has {intermediate_size}; lower expert_dim or "
                 f"num_experts, or raise shared_dim")):
            if wrong:
                raise ValueError(why)
        return self

    @classmethod
    def scaled(cls, intermediate_size, num_experts=4, expert_dim=None, shared_dim=None, **rest):
        """The paper's sizes scaled to any FFN: expert_dim = I / N and shared_dim = 2/3 of it
        (768 and 512 for BERT-base); sizes given explicitly are kept."""
        expert_dim = intermediate_size // num_experts if expert_dim is None else expert_dim
        shared_dim = round(2 * expert_dim / 3) if shared_dim is None else shared_dim
        return cls(num_experts=num_experts, expert_dim=expert_dim, shared_dim=shared_dim, **rest)

    @classmethod
    def from_dict(cls, d, path):
        return cls(**config_fields(cls, d, path))


# ----------------------------------------------------------------------------------------------
# Importance scores (paper Eq. 4)


def importance_scores(model, batches):
    """I_j = sum over examples x of | w1_j . dL(x)/dw1_j + w2_j . dL(x)/dw2_j |   (paper Eq. 4)

    for every FFN neuron j of every layer; returns [num_layers, intermediate_size] (float64).
    w1_j is row j of W1 (intermediate.dense.weight), w2_j column j of W2 (output.dense.weight).

    The official code loops over examples and layers with autograd.grad. One forward and one
    backward per batch give the same numbers: with the FFN input x_t, the pre-activation
    z_t = W1 x_t + b1 and the activation a_t = act(z_t) at token t, and a loss summed over the
    batch, the gradients dz_t, da_t at each token come from its own example's loss alone, and
        w1_j . dL/dw1_j = w1_j . sum_t dz_tj x_t = sum_t dz_tj (z_tj - b1_j)
        w2_j . dL/dw2_j = sum_i W2_ij sum_t dy_ti a_tj = sum_t a_tj da_tj     (da = W2^T dy)
    so we sum these per token over each example's tokens, take |.|, and sum over examples.
    task_loss(reduction="sum") is such a sum of per-example losses for every head: cross-entropy,
    squared error, and question answering's (CE_start + CE_end) / 2.
    """
    was_training, needs_grad = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()  # the paper's scores are taken without dropout
    model.requires_grad_(True)  # a frozen teacher still needs the graph through its FFNs
    layers = model.bert.encoder.layer
    # Capture z (intermediate.dense's output) and a (after the activation) of every layer, in order.
    captured, hooks = [], []  # [z_0, a_0, z_1, a_1, ...], each [B, T, I]
    for layer in layers:
        hooks.append(layer.intermediate.dense.register_forward_hook(lambda m, i, z: captured.append(z)))
        hooks.append(layer.intermediate.register_forward_hook(lambda m, i, a: captured.append(a)))
    L, I = len(layers), model.config.intermediate_size
    scores = torch.zeros(L, I, dtype=torch.float64)
    try:
        for batch in batches:
            captured.clear()
            out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
            loss = task_loss(out.logits, batch["labels"], reduction="sum")  # sum: per-example grads
            grads = torch.autograd.grad(loss, captured)
            mask = batch["attention_mask"][..., None].to(captured[0].dtype)  # [B, T, 1]
            for l, layer in enumerate(layers):
                z, a = captured[2 * l], captured[2 * l + 1]  # [B, T, I]
                dz, da = grads[2 * l], grads[2 * l + 1]
                b1 = layer.intermediate.dense.bias
                per_token = dz * (z - b1) + a * da  # [B, T, I]
                per_example = (per_token * mask).sum(1)  # [B, I]
                scores[l] += per_example.abs().sum(0).detach().double().cpu()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        for p, g in zip(model.parameters(), needs_grad):
            p.requires_grad_(g)
    return scores


def task_loss(logits, labels, reduction="mean"):
    """Cross-entropy for classification; MSE for regression (one output, STS-B); for question
    answering (logits [B, T, 2], labels LongTensor [B, 2] of start and end positions)
    (CE_start + CE_end) / 2 per example, as Google's run_squad.py and the official MoEBERT, averaged
    over examples (or summed: reduction="sum"). Positions must be real tokens ([CLS] = 0 for "no answer")."""
    logits = upcast(logits)
    if logits.dim() == 3:
        # cross_entropy reads [B, T, 2] as T classes (dim 1) for each of 2 targets: start and end.
        per_example = F.cross_entropy(logits, labels, reduction="none").mean(-1)  # [B]
        return per_example.sum() if reduction == "sum" else per_example.mean()
    if logits.size(-1) == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction=reduction)
    return F.cross_entropy(logits, labels, reduction=reduction)


def upcast(x):
    """Losses in at least fp32: bf16/fp16 activations (autocast) are promoted, fp64 stays."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ----------------------------------------------------------------------------------------------
# Experts from the FFN (paper section 3.2)


def expert_neurons(importance, cfg, generator=None):
    """Which FFN neurons each expert keeps: LongTensor [num_experts, expert_dim].

    Rank neurons by importance. The top shared_dim are in every expert; the rest are dealt
    round-robin, so expert e gets ranks s+e, s+e+N, s+e+2N, ... and keeps its first expert_dim
    neurons overall. `split` replaces the ranking for the paper's ablation: random or inverse.
    """
    I = importance.numel()
    if cfg.split == "importance":
        rank = torch.sort(importance, descending=True, stable=True).indices
    elif cfg.split == "inverse":
        rank = torch.sort(importance, descending=False, stable=True).indices
    else:
        rank = torch.randperm(I, generator=generator)
    s, N, own = cfg.shared_dim, cfg.num_experts, cfg.expert_dim - cfg.shared_dim
    shared, rest = rank[:s], rank[s:]
    return torch.stack([torch.cat([shared, rest[e::N][:own]]) for e in range(N)])


class MoEFFN(nn.Module):
    """The MoE replacement of one layer's FFN: a router and N experts, top-1 (paper section 3.4)."""

    def __init__(self, config, cfg):
        super().__init__()
        self.cfg = cfg
        self.experts = Experts(config, cfg)  # experts.py: each expert's W1, b1, W2, b2, LayerNorm, stacked
        if cfg.route.startswith("hash"):
            # token id -> expert; a buffer, so the table is saved and restored with the model.
            self.register_buffer("hash_table", torch.zeros(config.vocab_size, dtype=torch.long))
        else:
            self.gate = nn.Linear(config.hidden_size, cfg.num_experts, bias=False)
        # What the split was made from, kept for inspection: importance [I], neurons [N, expert_dim].
        self.register_buffer("importance", torch.zeros(config.intermediate_size))
        self.register_buffer("neurons", torch.zeros(cfg.num_experts, cfg.expert_dim, dtype=torch.long))
        self.balance_loss = None  # set by each forward of a gate route

    def forward(self, x, input_ids, attention_mask):
        B, T, H = x.shape
        x = x.reshape(B * T, H)
        if self.cfg.route.startswith("hash"):
            expert = self.hash_table[input_ids].reshape(-1)  # [B*T]
            return self.experts(x, expert).view(B, T, H)
        expert, prob = self.route_gate(x.view(B, T, H), attention_mask)  # [B*T], [B*T]
        return (self.experts(x, expert) * prob[:, None]).view(B, T, H)

    def route_gate(self, x, attention_mask, balance=True):
        """Gate routes (paper section 3.4): softmax over a linear gate, top-1, and (balance) the switch
        load-balance loss N * sum_e P_e f_e (P_e mean gate probability, f_e fraction routed to e)."""
        B, T, H = x.shape
        if self.cfg.route == "gate-sentence":
            # One expert per sentence, chosen from the mean of its real (unpadded) tokens.
            m = attention_mask.to(x.dtype)  # [B, T]
            mean = torch.einsum("bt,bth->bh", m, x) / m.sum(1, keepdim=True)  # [B, H], no [B, T, H] copy
            probs = F.softmax(upcast(self.gate(mean)), dim=-1)  # [B, N]
            weight = torch.ones(B, device=x.device, dtype=probs.dtype)  # each sentence counts once
        else:
            probs = F.softmax(upcast(self.gate(x)), dim=-1).view(B * T, -1)  # [B*T, N]
            weight = attention_mask.reshape(-1).to(probs.dtype)  # padding takes no part in the balance
        prob, expert = probs.max(-1)
        if balance:
            self.balance_loss = load_balance_loss(probs, expert, weight)
        if self.cfg.route == "gate-sentence":  # broadcast the sentence's choice to its tokens
            expert, prob = expert[:, None].expand(B, T).reshape(-1), prob[:, None].expand(B, T).reshape(-1)
        return expert, prob.to(x.dtype)


def load_balance_loss(probs, expert, weight):
    """Switch Transformer's N * sum_e P_e * f_e over the routed items (tokens or sentences)."""
    N = probs.size(-1)
    w = weight / weight.sum()
    P = (probs * w[:, None]).sum(0)  # [N] mean gate probability of each expert
    f = (F.one_hot(expert, N).to(probs.dtype) * w[:, None]).sum(0)  # [N] fraction routed to each
    return N * (P * f).sum()


# ----------------------------------------------------------------------------------------------
# Routing tables for the hash routes (paper section 3.4)


def hash_random_table(vocab_size, num_experts, generator):
    """hash-random: each token id goes to a fixed random expert (the paper's main results)."""
    return torch.randint(num_experts, (vocab_size,), generator=generator)


def hash_balance_table(token_counts, num_experts, generator):
    """hash-balance: greedy balanced buckets by training-set token frequency.

    Tokens from most to least frequent each join the expert with the fewest tokens so far, so
    every expert receives about the same number of training tokens. Tokens never seen in
    training get a random expert (all joining the least loaded one would overload it at test time).
    """
    table = hash_random_table(len(token_counts), num_experts, generator)
    load = [0] * num_experts
    counts = token_counts.tolist()
    for tok in torch.argsort(token_counts, descending=True, stable=True).tolist():
        if counts[tok] <= 0:
            break  # the rest were never seen: they keep their random expert
        e = min(range(num_experts), key=load.__getitem__)
        table[tok] = e
        load[e] += counts[tok]
    return table


# ----------------------------------------------------------------------------------------------
# The model and the surgery


class MoEBertLayer(nn.Module):
    """A BERT layer whose FFN is a MoEFFN; attention is unchanged."""

    def __init__(self, attention, moe):
        super().__init__()
        self.attention = attention
        self.moe = moe

    def forward(self, x, attn_mask, input_ids, attention_mask):
        return self.moe(self.attention(x, attn_mask), input_ids, attention_mask)


class MoEBert:
    """MoEBERT (paper section 3) with any head: a mixin listed before the dense class, whose every FFN
    it replaces by a MoEFFN; embeddings, attention and head are the dense class's, as are forward's
    inputs and outputs, plus the gates' load-balance loss (summed over layers) in `balance_loss`."""

    def __init__(self, config, moe_config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)  # the dense model with its head's arguments (num_labels)
        self.moe_config = moe_config.check(config.intermediate_size)
        self.bert.encoder.layer = nn.ModuleList(
            MoEBertLayer(layer.attention, MoEFFN(config, moe_config)) for layer in self.bert.encoder.layer)
        self.init_weights()

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, output_hidden_states=False):
        out = super().forward(input_ids, token_type_ids, attention_mask, output_hidden_states)
        if not self.moe_config.route.startswith("gate"):
            return out
        return out._replace(balance_loss=sum(layer.moe.balance_loss for layer in self.bert.encoder.layer))

    def save_pretrained(self, folder, extra_config=None):
        # config.json: BERT's config, the head ("head" and its arguments) and the MoE config ("moe").
        super().save_pretrained(folder, {"moe": asdict(self.moe_config), **(extra_config or {})})

    @classmethod
    def from_pretrained(cls, folder):
        """Reload a saved MoEBERT (config.json with a "moe" entry, model.safetensors), strictly.
        MoEBert.from_pretrained (or load) builds the head that config.json names; a concrete class
        refuses a folder with another head."""
        path = find_config(folder)
        d = read_config(path)  # a damaged file is a BadFile that names it
        config = BertConfig.from_dict(d, path)
        if not isinstance(d.get("moe"), dict):
            raise BadFile(f"{folder}/config.json has no 'moe' entry: this is not a saved MoEBERT; pass the "
                          f"moebert folder of a finished run (OUT/moebert)")
        head = d.get("head", "classification")  # saved before question answering: a classifier
        if head not in MOE_BY_HEAD:
            raise BadFile(f"{folder}/config.json: unknown head {head!r}; expected one of {', '.join(MOE_BY_HEAD)}")
        if cls is MoEBert:
            cls = MOE_BY_HEAD[head]
        elif head != cls.head:
            raise BadFile(f"{folder} holds a MoEBERT with a {head} head, not {cls.head}; load it with "
                          f"{MOE_BY_HEAD[head].__name__}.from_pretrained or moebert.load")
        moe, args = MoEConfig.from_dict(d["moe"], path), [d.get(k) for k in cls.head_args]  # num_labels
        try:  # sizes that cannot form experts, an unknown route
            moe.check(config.intermediate_size)
        except ValueError as e:
            raise BadFile(f"{path}: {e}; restore it or pass the moebert folder of a finished run") from None
        if not all(isinstance(a, int) and a >= 1 for a in args):
            raise BadFile(f"{path}: num_labels must be a whole number of at least 1; restore it")
        model, tensors = cls(config, moe, *args), read_checkpoint(folder)
        problems = misfit(model.state_dict(), tensors)
        if problems:
            raise BadFile(f"{folder}: the weights do not fit its config.json:\n{problems}\nRestore the folder, or "
                          f"pass the moebert folder of a finished run")
        check_finite(tensors, folder)
        for name, table in tensors.items():  # an expert past the last would fail deep in a forward
            if name.endswith("hash_table") and not ((table >= 0) & (table < moe.num_experts)).all():
                raise BadFile(f"{folder}: {name} sends tokens to experts outside 0 .. {moe.num_experts - 1}; "
                              f"restore the folder, or pass the moebert folder of a finished run")
        model.load_state_dict(tensors, strict=True)
        return model


class MoEBertForSequenceClassification(MoEBert, BertForSequenceClassification):
    """BertForSequenceClassification with every FFN replaced by experts: (config, moe_config, num_labels)."""


class MoEBertForQuestionAnswering(MoEBert, BertForQuestionAnswering):
    """BertForQuestionAnswering with every FFN replaced by experts: (config, moe_config)."""


MOE_CLASSES = {BertForSequenceClassification: MoEBertForSequenceClassification,
               BertForQuestionAnswering: MoEBertForQuestionAnswering}  # dense class -> its MoEBERT
MOE_BY_HEAD = {moe.head: moe for moe in MOE_CLASSES.values()}  # config.json's "head" -> class


def load(folder):
    """Reload a saved MoEBERT with whichever head its config.json names."""
    return MoEBert.from_pretrained(folder)


@torch.no_grad()
def moebert_from_dense(model, importance, cfg, token_counts=None):
    """Turn a fine-tuned dense BERT (any class in MOE_CLASSES) into MoEBERT (paper section 3.2).

    model: the dense teacher (left untouched); importance: [num_layers, intermediate_size] from
    importance_scores; cfg: MoEConfig; token_counts: [vocab] training-set token frequencies,
    needed by hash-balance. Returns the matching MoE class (MoEBertForSequenceClassification for
    BertForSequenceClassification, ...) on the teacher's device, in its dtype.
    """
    config = model.config
    cfg.check(config.intermediate_size)
    if cfg.route == "hash-balance" and token_counts is None:
        raise ValueError("route hash-balance needs token_counts: token frequencies of the training split")
    if type(model) not in MOE_CLASSES:
        raise ValueError(f"no MoEBERT for {type(model).__name__}; the dense model must be one of "
                         f"{', '.join(c.__name__ for c in MOE_CLASSES)}")
    p = next(model.parameters())
    moe_class = MOE_CLASSES[type(model)]
    moe = moe_class(config, cfg, *(getattr(model, k) for k in moe_class.head_args)).to(p.device, p.dtype)
    # Everything but the FFNs is an identity copy: embeddings, attention, pooler (if any), head.
    dense_state = model.state_dict()
    moe_state = moe.state_dict()
    for k in moe_state:
        if k in dense_state:
            moe_state[k].copy_(dense_state[k])
    g = torch.Generator().manual_seed(cfg.seed)
    for dense_layer, layer, imp in zip(model.bert.encoder.layer, moe.bert.encoder.layer, importance):
        ffn = layer.moe
        ffn.importance.copy_(imp)
        ffn.neurons.copy_(expert_neurons(imp.float(), cfg, g))
        # Expert e holds the neurons ffn.neurons[e]: W1 rows, b1 entries, W2 columns; one slice fills all.
        ex, inter, output = ffn.experts, dense_layer.intermediate.dense, dense_layer.output
        idx = ffn.neurons.to(inter.weight.device)  # [N, E]
        ex.intermediate_weight.copy_(inter.weight[idx].mT)  # [N, E, H] -> [N, H, E]
        ex.intermediate_bias.copy_(inter.bias[idx])  # [N, E]
        ex.output_weight.copy_(output.dense.weight[:, idx].permute(1, 2, 0))  # [H, N, E] -> [N, E, H]
        ex.output_bias.copy_(output.dense.bias)  # broadcast: every expert copies b2 and the LayerNorm
        ex.LayerNorm_weight.copy_(output.LayerNorm.weight)
        ex.LayerNorm_bias.copy_(output.LayerNorm.bias)
        if cfg.route == "hash-random":
            ffn.hash_table.copy_(hash_random_table(config.vocab_size, cfg.num_experts, g))
        elif cfg.route == "hash-balance":
            ffn.hash_table.copy_(hash_balance_table(token_counts, cfg.num_experts, g))
    return moe


# ----------------------------------------------------------------------------------------------
# Distillation loss (paper section 3.3)


def distillation_loss(student, teacher, attention_mask=None, regression=False, layers=None):
    """L_distill = sum over the embedding output and every layer output of MSE(student, teacher)
                   + 0.5 * (KL(p_t || p_s) + KL(p_s || p_t))       (MSE of the logits for regression)

    p_t, p_s: the teacher's and the student's softmax over the labels, each KL averaged over examples
    (the official symmetric_KL_loss(p, q) = 0.5 * sum (p - q)(log p - log q), divided by the batch size;
    no temperature). Question answering (logits [B, T, 2]) uses the mean of that term over the start
    and the end distributions (softmaxes over the sequence), as the official MoEBertForQuestionAnswering:
    0.5 * (symmetric KL of the starts + symmetric KL of the ends); its padding logits (bert.PAD_LOGIT)
    give padding probability 0, where the official code, which does not mask them, lets padding in.

    student, teacher: ClassifierOutput with hidden_states. With attention_mask [B, T], the MSE
    averages over real tokens only, so padding, whose states nothing reads, adds nothing.
    layers: for each student hidden state, the index of the teacher's it matches (a shallow student:
    shallow_hidden_states); None, the default, matches them one to one (MoEBERT has the teacher's depth).
    """
    hidden, prediction = distillation_terms(student, teacher, attention_mask, regression, layers)
    return hidden + prediction


def distillation_terms(student, teacher, attention_mask=None, regression=False, layers=None):
    """The two terms of distillation_loss apart: the hidden-state MSEs (a mean over tokens) and the
    prediction term (a mean over examples), which several processes weight differently (train.shard)."""
    targets = teacher.hidden_states if layers is None else [teacher.hidden_states[i] for i in layers]
    hidden = 0.0
    for hs, ht in zip(student.hidden_states, targets, strict=True):  # strict: a map of the wrong length fails
        diff = (upcast(hs) - upcast(ht)).pow(2)  # [B, T, H]
        if attention_mask is None:
            hidden = hidden + diff.mean()
        else:
            m = attention_mask[..., None].to(diff.dtype)
            hidden = hidden + (diff * m).sum() / (m.sum() * diff.size(-1))
    s, t = upcast(student.logits), upcast(teacher.logits)
    if regression:
        return hidden, F.mse_loss(s, t)
    if s.dim() == 3:
        # Question answering: a start and an end distribution over the T positions per example,
        # [B, T, 2] -> [2B, T]; the batchmean over 2B rows is then 0.5 * (start term + end term).
        s, t = s.mT.flatten(0, 1), t.mT.flatten(0, 1)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    # F.kl_div(input=log q, target=log p) is KL(p || q), averaged over the batch.
    kl_ts = F.kl_div(ls, lt, reduction="batchmean", log_target=True)
    kl_st = F.kl_div(lt, ls, reduction="batchmean", log_target=True)
    return hidden, 0.5 * (kl_ts + kl_st)
