"""shallow.py: --student shallow, the dense student of MoEBERT's cost per token (the paper's Table 1
comparison): the surgery, the layer map, its distillation, save and load; and the cost accounting,
parameters and multiply-adds per token. Its pipelines are in test_train.py."""
import json
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import moebert
import shallow
from bert import BertConfig, BertForQuestionAnswering, BertForSequenceClassification
from moebert import MoEConfig

from helpers import TINY, TINY4, assert_close, random_batch


# ----------------------------------------------------------------------------------------------
# --student shallow: the dense student of MoEBERT's cost per token (the paper's Table 1 comparison)

HEADS = [(BertForSequenceClassification, {"num_labels": 3}), (BertForQuestionAnswering, {})]


def tiny_teacher(cls=BertForSequenceClassification, seed=0, **head):
    torch.manual_seed(seed)
    return cls(BertConfig(**TINY4), **head).eval()


def run(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], output_hidden_states=True)


# ----------------------------------------------------------------------------------------------
# The surgery, the layer map, save and load


def test_shallow_layers_are_every_other_ending_with_the_last():
    assert shallow.shallow_layers(12) == [1, 3, 5, 7, 9, 11]  # BERT-base to 6 layers, 0-based
    assert shallow.shallow_hidden_states(12) == [0, 2, 4, 6, 8, 10, 12]  # embeddings to embeddings
    assert shallow.shallow_layers(12, every=3) == [2, 5, 8, 11]
    assert shallow.shallow_layers(4, every=1) == [0, 1, 2, 3]  # every=1: the teacher itself
    with pytest.raises(ValueError, match="multiple of 2"):
        shallow.shallow_layers(3)


@pytest.mark.parametrize("cls,head", HEADS)
def test_shallow_student_is_the_teachers_layers_bitwise(cls, head):
    teacher = tiny_teacher(cls, **head)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = shallow.shallow_from_dense(teacher)
    assert type(student) is cls and student.config == replace(teacher.config, num_hidden_layers=2)
    assert [getattr(student, k) for k in cls.head_args] == [getattr(teacher, k) for k in cls.head_args]
    # Every student tensor is the teacher's of the same name, encoder layer i being teacher layer 2i + 1.
    kept = {}
    for name, v in student.state_dict().items():
        source = re.sub(r"^bert\.encoder\.layer\.(\d+)\.", lambda m: f"bert.encoder.layer.{2 * int(m[1]) + 1}.", name)
        assert torch.equal(v, before[source]), f"{name} is not the teacher's {source}"
        kept[source] = name
    # ... and every teacher tensor is there but those of the dropped layers 0 and 2 (embeddings, pooler, head).
    assert set(before) - set(kept) == {k for k in before if re.match(r"bert\.encoder\.layer\.[02]\.", k)}
    assert ("bert.pooler.dense.weight" in kept) == (cls is BertForSequenceClassification)
    # The forward is the teacher's embeddings, then its layers 1 and 3.
    batch = random_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        x = teacher.bert.embeddings(ids, batch["token_type_ids"])
        for l in (1, 3):
            x = teacher.bert.encoder.layer[l](x, mask[:, None, None, :].bool(), ids, mask)
    assert torch.equal(run(student.eval(), batch).hidden_states[-1], x)  # eval: no dropout
    # Copies: training the student leaves the teacher as it was.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_shallow_student_of_an_odd_depth_is_refused():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="3 layers must be a multiple of 2"):
        shallow.shallow_from_dense(BertForSequenceClassification(BertConfig(**TINY), 2))


def test_shallow_distillation_matches_teacher_states_0_2_4():
    """The loss with layers=[0, 2, 4] is, term by term, MSE(student hidden_states[i], teacher's [2i])
    over real tokens, summed, plus the official symmetric KL."""
    teacher = tiny_teacher(num_labels=3)
    student = shallow.shallow_from_dense(teacher).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # away from the copy, so no term is 0 by construction
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = random_batch()
    s, t = run(student, batch), run(teacher, batch)
    layers = shallow.shallow_hidden_states(4)
    assert layers == [0, 2, 4] and len(s.hidden_states) == 3 and len(t.hidden_states) == 5
    hidden, pred = moebert.distillation_terms(s, t, batch["attention_mask"], layers=layers)
    m = batch["attention_mask"][..., None].double()  # real tokens only
    direct = sum(((s.hidden_states[i].double() - t.hidden_states[2 * i].double()) ** 2 * m).sum() / (m.sum() * 32)
                 for i in range(3))
    assert_close(hidden, direct, 1e-6, "hidden MSEs")
    # The official symmetric_KL_loss: 0.5 * sum (p - q)(log p - log q), per example, averaged.
    p, q = F.softmax(t.logits.double(), -1), F.softmax(s.logits.double(), -1)
    kl = 0.5 * ((p - q) * (p.log() - q.log())).sum(-1).mean()
    assert_close(pred, kl, 1e-6, "symmetric KL")
    assert_close(moebert.distillation_loss(s, t, batch["attention_mask"], layers=layers), direct + kl, 1e-6, "loss")
    # Another map gives another loss; a map of the wrong length, or none (one to one), fails loudly.
    other, _ = moebert.distillation_terms(s, t, batch["attention_mask"], layers=[0, 1, 2])
    assert abs(other.item() - hidden.item()) > 1e-4
    for wrong in ([0, 2], None):
        with pytest.raises(ValueError):
            moebert.distillation_terms(s, t, batch["attention_mask"], layers=wrong)


@pytest.mark.parametrize("cls,head", HEADS)
def test_shallow_student_round_trips_through_save_and_load(tmp_path, cls, head):
    student = shallow.shallow_from_dense(tiny_teacher(cls, **head)).eval()
    student.save_pretrained(tmp_path / "shallow")
    saved = json.loads((tmp_path / "shallow" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and saved["head"] == cls.head
    back = cls.from_pretrained(tmp_path / "shallow", **head).eval()  # the dense class, its own config
    assert back.config == student.config
    a, b = back.state_dict(), student.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    batch = random_batch()
    assert torch.equal(run(back, batch).logits, run(student, batch).logits)


# ----------------------------------------------------------------------------------------------
# Cost accounting: parameters, and multiply-adds per token


def test_param_counts_of_moebert_base():
    """4 experts x 768 with 512 shared: a token uses half the FFN."""
    cfg = BertConfig()
    moe = moebert.MoEBertForSequenceClassification(cfg, MoEConfig(), 2)
    total, active = shallow.param_counts(moe)
    dense_total = sum(p.numel() for p in BertForSequenceClassification(cfg, 2).parameters())
    ffn = lambda d: 2 * 768 * d + d + 768 + 2 * 768  # W1, b1, W2, b2, LayerNorm
    assert total == dense_total + 12 * (4 * ffn(768) - ffn(3072))
    assert active == dense_total + 12 * (ffn(768) - ffn(3072))


def test_moebert_base_costs_what_a_6_layer_bert_does():
    """The paper's claim in multiply-adds: per token, MoEBERT-base's weights cost 12 x (4 + 2) d^2 =
    72 d^2, a 6-layer BERT-base's 6 x (4 + 8) d^2 = 72 d^2, the teacher 144 d^2."""
    base = BertConfig()
    assert (base.num_hidden_layers, base.hidden_size, base.intermediate_size) == (12, 768, 3072)
    moe = MoEConfig()
    assert (moe.num_experts, moe.expert_dim) == (4, 768)
    d2 = 768 ** 2
    six = replace(base, num_hidden_layers=len(shallow.shallow_layers(12)))
    assert shallow.macs_per_token(base, moe=moe)["weights"] == shallow.macs_per_token(six)["weights"] == 72 * d2
    assert shallow.macs_per_token(base)["weights"] == 144 * d2
    assert shallow.macs_per_token(base) == {"weights": 144 * d2, "attention": 0, "total": 144 * d2}
    # Attention's scores and values, 2 T d per layer: MoEBERT's 12 layers pay it twice as often.
    with_t = shallow.macs_per_token(base, 128, moe)
    assert with_t["attention"] == 12 * 2 * 128 * 768 == 2 * shallow.macs_per_token(six, 128)["attention"]
    assert with_t["total"] == 72 * d2 + with_t["attention"]
    # A gate route adds its d x N scores per layer.
    assert shallow.macs_per_token(base, moe=replace(moe, route="gate-token"))["weights"] == 72 * d2 + 12 * 768 * 4
