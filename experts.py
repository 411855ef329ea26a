"""The N experts of one MoEBERT layer (moebert.py, paper section 3.2) and how they run fast.

Every token goes through one expert. Looping over the experts is the plain way; small batches run
all experts in one padded batched matmul (CPU), and bf16 on a GPU runs one grouped matmul per
weight with no wait for the device. All three compute the same (tests/test_moebert.py).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from bert import ACT2FN

# Experts.forward runs all experts in one padded batched matmul up to SMALL_BATCH tokens per expert
# on average and PADDING times the rows (thresholds measured on CPU at BERT-base sizes: SPEED.md).
SMALL_BATCH, PADDING = 256, 1.3
# On these devices, in bf16, Experts.forward runs each weight as one grouped matmul over all experts
# instead: no padding, and no wait for the device (the others read the experts' sizes on the host,
# which on a GPU stalls the queue once a layer). torch's grouped matmul takes bf16; on CPU it loops.
GROUPED_DEVICES = ("cuda",)
GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)  # torch >= 2.8


def grouped_support(version):
    """Where torch `version`'s grouped matmul runs: (on the CPU?, the CUDA compute capability majors with a kernel
    of its own). None before 2.8; 2.8's runs on 9.0 alone (an error on other GPUs, NotImplementedError on the CPU);
    from 2.9 on anything: its own kernel on 9.x and 10.x (H100, H200, B200), elsewhere a loop over the experts,
    which on a GPU (A100, L4, RTX 50xx) reads the offsets back."""
    version = torch.torch_version.TorchVersion(version)
    return (True, (9, 10)) if version >= (2, 9) else (False, (9,)) if version >= (2, 8) else (False, ())


GROUPED_MM_CPU, GROUPED_CUDA_MAJORS = grouped_support(torch.__version__)


def grouped_on(device):
    """Whether torch's grouped matmul runs on `device` without waiting for it (in bf16)."""
    device = torch.device(device)
    if GROUPED_MM is None or device.type not in GROUPED_DEVICES or (device.type == "cpu" and not GROUPED_MM_CPU):
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] in GROUPED_CUDA_MAJORS


class Experts(nn.Module):
    """The N experts of one layer (paper section 3.2), stacked on a leading axis. Expert e is a
    slice of the dense FFN (its neurons' W1 rows, b1 entries and W2 columns) with copies of W2's bias
    and the FFN LayerNorm: LayerNorm_e(x + W2_e act(W1_e x + b1_e) + b2_e), as BertIntermediate +
    BertOutput compute it.

    The matrices are stored [in, out], as Google's kernels are (nn.Linear stores [out, in]; why:
    SPEED.md). Names keep BERT's words, so the weight-decay rule reads them as it reads BERT's.
    """

    def __init__(self, config, cfg):
        super().__init__()
        N, H, E = cfg.num_experts, config.hidden_size, cfg.expert_dim
        std = config.initializer_range  # surgery overwrites all of these; this is BERT's init
        self.intermediate_weight = nn.Parameter(torch.randn(N, H, E) * std)  # W1 of each expert, [in, out]
        self.intermediate_bias = nn.Parameter(torch.zeros(N, E))
        self.output_weight = nn.Parameter(torch.randn(N, E, H) * std)  # W2, [in, out]
        self.output_bias = nn.Parameter(torch.zeros(N, H))
        self.LayerNorm_weight = nn.Parameter(torch.ones(N, H))  # one copy of the FFN LayerNorm each
        self.LayerNorm_bias = nn.Parameter(torch.zeros(N, H))
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(cfg.expert_dropout)
        self.eps = config.layer_norm_eps

    def weights(self, batched=False):
        """W1, b1, W2, b2 and the LayerNorm's weight and bias: stacked over the experts for the batched
        matmul (vectors [N, 1, D], to broadcast over the tokens), else one tuple per expert."""
        w = (self.intermediate_weight, self.intermediate_bias, self.output_weight, self.output_bias,
             self.LayerNorm_weight, self.LayerNorm_bias)
        if batched:
            return [p if p.dim() == 3 else p.unsqueeze(1) for p in w]
        return list(zip(*(p.unbind(0) for p in w)))

    def ffn(self, x, w1, b1, w2, b2, ln_w, ln_b):
        """One expert on its tokens x [n_e, H] (vectors [D]); or every expert at once on x [N, C, H],
        C tokens each (weights [N, ...], vectors [N, 1, D] to broadcast over the tokens)."""
        mm = torch.addmm if x.dim() == 2 else torch.baddbmm  # bias + x @ w, batched or not
        h = self.act(mm(b1, x, w1))  # [.., E]
        y = self.dropout(mm(b2, h, w2)) + x  # [.., H]
        if x.dim() == 2:  # one kernel, and on CPU twice as fast as a LayerNorm without weights
            return F.layer_norm(y, y.shape[-1:], ln_w, ln_b, self.eps)
        # layer_norm takes one weight for all rows: each expert's is applied after, broadcast (a
        # weight of ones, as on CPU layer_norm runs twice as fast with a weight as without)
        ones = y.new_ones(y.size(-1))
        return torch.addcmul(ln_b, F.layer_norm(y, y.shape[-1:], ones, eps=self.eps), ln_w)

    def grouped_dtype(self, x):
        """bf16 where the grouped path can run x (autocast's dtype, else x's), else None: grouped
        matmuls take bf16, with rows of a multiple of 16 bytes."""
        if not grouped_on(x.device):
            return None
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        H, E = self.intermediate_weight.shape[1:]
        return dtype if dtype == torch.bfloat16 and H % 8 == 0 and E % 8 == 0 else None

    def grouped(self, x, expert, dtype):  # [n, H], [n] -> [n, H]
        """Every expert at once, one grouped matmul per weight over the tokens sorted by expert:
        expert e multiplies rows offs[e-1]:offs[e]. All on the device, with no host sync."""
        order, e_sorted, offs = (t[0] for t in sort_by_expert(expert[None], len(self.intermediate_weight)))
        xs = x.index_select(0, order)  # [n, H]
        rows = lambda v: v.index_select(0, e_sorted)  # [N, D] -> [n, D]: each row its expert's vector
        h = self.act(GROUPED_MM(xs.to(dtype), self.intermediate_weight.to(dtype), offs=offs)
                     + rows(self.intermediate_bias))  # [n, E]
        y = self.dropout(GROUPED_MM(h.to(dtype), self.output_weight.to(dtype), offs=offs)
                         + rows(self.output_bias)) + xs  # [n, H]
        y = torch.addcmul(rows(self.LayerNorm_bias), F.layer_norm(y, y.shape[-1:], eps=self.eps),
                          rows(self.LayerNorm_weight))
        return torch.empty_like(x).index_copy_(0, order, y.to(x.dtype))

    def forward(self, x, expert):  # [n, H], [n] -> [n, H]
        """Each token through its own expert, with no loop over tokens: each expert gathers its own
        tokens and runs one matmul per weight over them. A running count of each expert's tokens gives
        the sizes and each token's row in the padded batch; the per-expert loop takes a sort."""
        dtype = self.grouped_dtype(x)
        if dtype is not None:
            return self.grouped(x, expert, dtype)
        n, N = len(x), len(self.intermediate_weight)
        seen = (expert[:, None] == torch.arange(N, device=x.device)).cumsum(0)  # [n, N] each expert's tokens so far
        sizes = seen[-1].tolist()  # tokens per expert: the layer's one wait for the device
        C = max(sizes)
        if n <= SMALL_BATCH * N and N * C <= PADDING * n:
            # All experts in one batched matmul, each padded to C rows (with token 0; the padding's
            # outputs are never read). On CPU N separate matmuls of 32-256 rows run 15-30% slower
            # per row than one batched; past ~256 rows the loop below is as fast, unpadded.
            rank = seen.gather(1, expert[:, None]).view(-1) - 1  # [n] place of each token in its expert
            where = torch.add(rank, expert, alpha=C)  # [n] each token's row of the padded [N*C]
            tokens = torch.arange(n, device=x.device)
            idx = where.new_zeros(N * C).index_copy_(0, where, tokens)  # [N*C] token of each row
            y = self.ffn(x.index_select(0, idx).view(N, C, -1), *self.weights(batched=True))  # [N, C, H]
            return y.view(N * C, -1).index_select(0, where).to(x.dtype)
        order = torch.argsort(expert)  # [n] token indices grouped by expert
        out = torch.empty_like(x)
        for idx, w in zip(order.split(sizes), self.weights()):
            if len(idx):
                out.index_copy_(0, idx, self.ffn(x.index_select(0, idx), *w).to(out.dtype))
        return out


def sort_by_expert(expert, N):  # [L, n] -> [L, n], [L, n], [L, N]
    """Each layer's tokens in the order of their experts (one sort for all L rows), the expert of each
    sorted row, and where each expert's rows end (int32, as grouped matmuls take them); no host sync."""
    order = torch.argsort(expert, dim=-1)  # [L, n]
    e_sorted = expert.gather(-1, order)
    counts = (expert[..., None] == torch.arange(N, device=expert.device)).sum(-2)  # [L, N]
    return order, e_sorted, counts.cumsum(-1).to(torch.int32)
