"""BERT in plain PyTorch: the config, the modules, a classification and a span (SQuAD) head.

Module names follow Google's checkpoint (and Hugging Face's port of it) one to one:
`bert.encoder.layer[i].attention.self.query`, `.intermediate.dense`, `.output.dense`, ...
so loading (weights.py) is an identity copy and MoEBERT's expert surgery (moebert.py) is a slice.
"""
import os
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights
from common import BadFile, atomic_write_json, save_safetensors


@dataclass
class BertConfig:
    vocab_size: int = 30522  # WordPiece vocabulary size
    hidden_size: int = 768  # width d of every token vector
    num_hidden_layers: int = 12  # transformer layers
    num_attention_heads: int = 12  # heads per layer; hidden_size must divide by it
    intermediate_size: int = 3072  # FFN width, 4d; MoEBERT splits these neurons into experts
    hidden_act: str = "gelu"  # "gelu" exact erf GELU, "gelu_new"/"gelu_tanh" tanh approximation
    hidden_dropout_prob: float = 0.1  # dropout on embeddings and sublayer outputs
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities
    max_position_embeddings: int = 512  # longest sequence the position table covers
    type_vocab_size: int = 2  # segment ids: sentence A = 0, sentence B = 1
    layer_norm_eps: float = 1e-12  # Google's TF LayerNorm epsilon
    initializer_range: float = 0.02  # std of the truncated-normal init in Google's code

    @classmethod
    def from_json(cls, path):
        """Read Google's bert_config.json or Hugging Face's config.json (extra keys are ignored)."""
        return cls.from_dict(weights.read_config(path), path)

    @classmethod
    def from_dict(cls, d, path):
        """The config in a config file's dict `d` (read from `path`, which errors name), checked."""
        cfg = cls(**weights.config_fields(cls, d, path))  # each field of its type, or a BadFile
        if cfg.num_attention_heads < 1 or cfg.hidden_size % cfg.num_attention_heads:
            raise BadFile(f"{path}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                          f"{cfg.num_attention_heads}; fix the config or use another model folder")
        # Checked here, not as a KeyError deep in the model: a non-BERT config names other activations.
        if cfg.hidden_act not in ACT2FN:
            raise BadFile(f"{path}: hidden_act {cfg.hidden_act!r} is not one of {', '.join(ACT2FN)}; "
                          f"this does not look like a BERT config, use a BERT model folder")
        if max(cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob) > 1:
            raise BadFile(f"{path}: a dropout probability above 1; fix the config or use another model folder")
        return cfg

    def to_dict(self):
        return asdict(self)


# Google's TensorFlow BERT used the tanh approximation of GELU (and called it "gelu"); Hugging Face
# names that "gelu_new" and uses "gelu" for the exact erf form. We follow Hugging Face's names.
ACT2FN = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# ----------------------------------------------------------------------------------------------
# The model


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        T = input_ids.size(1)
        positions = torch.arange(T, device=input_ids.device)  # [T], broadcast over the batch
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))  # [B, T, H]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x, attn_mask):
        B, T, H = x.shape
        # [B, T, H] -> [B, heads, T, H/heads]
        q, k, v = (lin(x).view(B, T, self.n_head, -1).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, H)


class BertOutput(nn.Module):
    """A projection back to H, dropout, residual and LayerNorm (post-LN, as in BERT): after the FFN's
    W2 [H, intermediate], and (as attention.output) after attention's output projection [H, H]."""
    def __init__(self, config, in_features=None):
        super().__init__()
        self.dense = nn.Linear(in_features or config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)  # the name `self` is Google's: attention/self/query
        self.output = BertOutput(config, config.hidden_size)  # projection, dropout, residual, LayerNorm

    def forward(self, x, attn_mask):
        return self.output(self.self(x, attn_mask), x)


class BertIntermediate(nn.Module):
    """First FFN matrix W1 [intermediate, H] and the activation."""
    def __init__(self, config, intermediate_size=None):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, intermediate_size or config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, attn_mask, input_ids, attention_mask):
        x = self.attention(x, attn_mask)
        return self.ffn(x, input_ids, attention_mask)

    def ffn(self, x, input_ids, attention_mask):
        # The feed-forward block. MoEBERT replaces exactly this with experts (moebert.py), whose
        # routers read the token ids and the padding mask; the dense block needs neither.
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    """tanh(W h_[CLS] + b): the sentence vector that the classifier reads."""
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))


class EncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, T, H]
    pooler_output: Optional[torch.Tensor]  # [B, H]; None without a pooler (question answering)
    hidden_states: Optional[tuple] = None  # embedding output + every layer's output, L+1 x [B, T, H]


class ClassifierOutput(NamedTuple):
    logits: torch.Tensor  # [B, num_labels]; question answering: [B, T, 2], start and end logit per token
    hidden_states: Optional[tuple] = None  # as in EncoderOutput, for layer-wise distillation
    balance_loss: Optional[torch.Tensor] = None  # MoEBERT's gate load-balance loss (moebert.py)


class PreTrained(nn.Module):
    """Initialisation and loading shared by the encoder and the models with a head."""
    head = None  # the kind of head, written to config.json so a saved model says what it is
    head_module = None  # the head's submodule: freshly initialised when a pretrained encoder lacks it
    head_args = ()  # constructor arguments of the head, saved in config.json to rebuild it

    def init_weights(self):
        # Google's init: N(0, 0.02) for matrices and embeddings, zero biases, identity LayerNorm.
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)

    @classmethod
    def from_pretrained(cls, path_or_name, **kwargs):
        """Load a Google release folder, a Hugging Face folder, or a release name (downloaded)."""
        folder = weights.resolve_pretrained(path_or_name)
        path = weights.find_config(folder)
        if "moe" in (d := weights.read_config(path)):  # experts, not FFNs: every FFN weight would be "missing"
            raise BadFile(f"{folder} holds a MoEBERT, not a dense BERT: load it with moebert.load, or pass a dense "
                          f"BERT folder")
        model = cls(BertConfig.from_dict(d, path), **kwargs)
        weights.load_weights(model, weights.read_checkpoint(folder), source=folder)
        return model

    def save_pretrained(self, folder, extra_config=None):
        """Write config.json and model.safetensors (Hugging Face's layout, loadable by from_pretrained)."""
        os.makedirs(folder, exist_ok=True)
        # What the head is and its arguments, so a saved model can be rebuilt (the encoder has none).
        head = {} if self.head is None else {"head": self.head, **{k: getattr(self, k) for k in self.head_args}}
        config = {**self.config.to_dict(), **head, **(extra_config or {})}
        atomic_write_json(os.path.join(folder, "config.json"), config)
        save_safetensors(self.state_dict(), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


class BertModel(PreTrained):
    def __init__(self, config, add_pooling_layer=True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        # Question answering reads every token, not the pooled [CLS]: without a pooler it has no
        # parameters that never get a gradient (which DDP refuses) and Hugging Face's state dict.
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, output_hidden_states=False):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)  # [B, T, H]
        # Which keys each query may attend to, [B, 1, 1, T]: not the padding. A boolean mask keeps
        # the dtype out of it (fp32 and bf16 autocast alike); no mask at all when nothing is padded,
        # which lets SDPA take its fastest path (length-grouped batches often have no padding).
        # Given no attention_mask, nothing is padded: known without reading the mask back, which on a
        # GPU waits for the device (and which a CUDA graph cannot capture).
        if attention_mask is None:
            attention_mask, attn_mask = torch.ones_like(input_ids), None
        else:
            attn_mask = None if bool(attention_mask.all()) else attention_mask[:, None, None, :].bool()
        hidden_states = [x]
        for layer in self.encoder.layer:
            x = layer(x, attn_mask, input_ids, attention_mask)
            hidden_states.append(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        return EncoderOutput(x, pooled, tuple(hidden_states) if output_hidden_states else None)


class BertForSequenceClassification(PreTrained):
    """BERT + dropout + a linear head on the pooled [CLS] vector; num_labels == 1 means regression."""
    head, head_module, head_args = "classification", "classifier", ("num_labels",)

    def __init__(self, config, num_labels=2):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.init_weights()

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, output_hidden_states=False):
        out = self.bert(input_ids, token_type_ids, attention_mask, output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output))  # [B, num_labels]
        return ClassifierOutput(logits, out.hidden_states, None)


# The logit of padding positions in question answering. Every softmax over the sequence (the loss, the
# distillation KL) then gives padding probability exp(-10000) = 0, so results do not depend on how much
# a batch is padded (batches are padded to their longest example). Finite in bf16 (as -9984), unlike the
# dtype's minimum its log-probability stays finite, so the KL's 0 * log(0 / 0) terms are 0, not NaN.
PAD_LOGIT = -10000.0


class BertForQuestionAnswering(PreTrained):
    """BERT + a linear layer on every token's final hidden state: a start and an end logit per token
    (extractive QA, SQuAD; as Google's run_squad.py and Hugging Face: no pooler, no dropout on the head).
    `logits` is [B, T, 2]: start logits in [..., 0], end logits in [..., 1]; padding gets PAD_LOGIT."""
    head, head_module = "qa", "qa_outputs"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, output_hidden_states=False):
        out = self.bert(input_ids, token_type_ids, attention_mask, output_hidden_states)
        logits = self.qa_outputs(out.last_hidden_state)  # [B, T, 2]
        if attention_mask is not None:  # padding is never an answer (see PAD_LOGIT)
            logits = logits.masked_fill(attention_mask[..., None] == 0, PAD_LOGIT)
        return ClassifierOutput(logits, out.hidden_states, None)


