"""The dense baseline of MoEBERT's cost, and what each model costs per token.

Paper section 4 compares MoEBERT with distilled dense students of the same cost per token (DistilBERT,
TinyBERT, MiniLM, ...: 6-layer students of BERT-base). Per token, MoEBERT-base runs 12 layers x (4 d^2
attention projections + 2 d^2 of one 768-neuron expert) = 72 d^2 weight multiply-adds: what a 6-layer
BERT-base runs (6 x (4 d^2 + 8 d^2)). The fair dense baseline is the teacher at half depth, trained by
the same distillation (train.py --student shallow).
"""
from dataclasses import replace

import torch

def shallow_layers(num_layers, every=2):
    """The teacher layers (0-based) a shallow student keeps: every-1, 2*every-1, ..., num_layers-1.

    Student layer i (1-based) is teacher layer every*i (1-based), so the last layer, which the head
    reads, is the teacher's last: BERT-base to 6 layers keeps 1, 3, 5, 7, 9, 11 (0-based). The
    initialisation takes one layer in two, as DistilBERT; the matching is BERT-PKD's PKD-Skip."""
    if every < 1 or num_layers % every:
        raise ValueError(f"a shallow student keeps one layer in {every}: the teacher's {num_layers} layers "
                         f"must be a multiple of {every}")
    return list(range(every - 1, num_layers, every))


def shallow_hidden_states(num_layers, every=2):
    """For each hidden state of the shallow student, the teacher's it is distilled from:
    [0, every, 2*every, ..., num_layers]. hidden_states[0] is the embedding output and
    hidden_states[l + 1] the output of layer l, so embeddings match embeddings and student
    hidden_states[i] matches teacher hidden_states[every * i]."""
    return [0] + [l + 1 for l in shallow_layers(num_layers, every)]


@torch.no_grad()
def shallow_from_dense(model, every=2):
    """A dense student of the teacher's class with one layer in `every` (shallow_layers) and the
    teacher's embeddings, pooler (if any) and head: num_hidden_layers / every layers, each a bitwise
    copy. model: the fine-tuned dense teacher (left untouched); returns a new model on its device,
    in its dtype."""
    config = model.config
    kept = shallow_layers(config.num_hidden_layers, every)
    p = next(model.parameters())
    head_args = (getattr(model, k) for k in model.head_args)  # num_labels for a classifier, none for QA
    student = type(model)(replace(config, num_hidden_layers=len(kept)), *head_args).to(p.device, p.dtype)
    # Every student tensor from the teacher's of the same name, but for encoder layer i: layer kept[i].
    dense_state = model.state_dict()
    state = {}
    for name in student.state_dict():
        parts = name.split(".")
        if name.startswith("bert.encoder.layer."):  # bert.encoder.layer.<i>.attention...
            parts[3] = str(kept[int(parts[3])])
        state[name] = dense_state[".".join(parts)]
    student.load_state_dict(state, strict=True)  # copies: the teacher's tensors stay its own
    return student


def macs_per_token(config, seq_len=0, moe=None):
    """Multiply-adds one token costs in the encoder: {"weights", "attention", "total"}, integers.

    weights: per layer the four attention projections (Q, K, V, output: 4 d^2) and the FFN (2 d I);
    MoEBERT (moe, a MoEConfig) runs one expert (2 d E) and, on gate routes, its gate (d N; counted per
    token for gate-sentence too, an upper bound). attention: per layer 2 T d, the token's query
    against T keys and its weighted sum of T values, at sequence length T = seq_len (0 leaves it out).
    Not counted: embeddings (lookups), biases, LayerNorm, GELU and softmax (O(d) or O(T) each), and
    the pooler and head, which are the same in the teacher and every student.
    """
    d, L = config.hidden_size, config.num_hidden_layers
    ffn = 2 * d * config.intermediate_size
    if moe is not None:  # one expert per token, plus the gate's scores where a gate routes
        ffn = 2 * d * moe.expert_dim + (d * moe.num_experts if moe.route.startswith("gate") else 0)
    weights = L * (4 * d * d + ffn)
    attention = L * 2 * seq_len * d
    return {"weights": weights, "attention": attention, "total": weights + attention}


def param_counts(model):
    """(total parameters, parameters one token uses): the MoE model runs 1 of N experts per token;
    embedding tables count fully in both, as BERT's parameter counts do."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for layer in model.bert.encoder.layer:
        if hasattr(layer, "moe"):
            experts = layer.moe.experts
            N = len(experts.intermediate_weight)
            idle += sum(p.numel() for p in experts.parameters()) // N * (N - 1)
    return total, total - idle

