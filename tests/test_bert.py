"""bert.py: our BERT against Hugging Face's (a tiny random one, Google's tiny release and the real
MiniLM), the classification and QA heads, the activations, saving and loading."""
import json

import pytest
import torch
from safetensors import safe_open

import bert
import moebert
from bert import BertForQuestionAnswering, BertForSequenceClassification, BertModel
from moebert import MoEConfig, moebert_from_dense
from helpers import (GOOGLE_TINY, TINY, assert_close, inputs, minilm_batch, qa_batch, random_batch, tiny_model,
                     tiny_qa)


# ----------------------------------------------------------------------------------------------
# bert.py: equivalence with transformers.BertModel


def hf_reference(folder):
    transformers = pytest.importorskip("transformers")
    # fp32 whatever the file holds (transformers 5 keeps an fp16 file's dtype)
    return transformers.BertModel.from_pretrained(folder, attn_implementation="eager", torch_dtype=torch.float32).eval()


def compare_with_hf(ours, ref, batch):
    with torch.no_grad():
        a = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], output_hidden_states=True)
        b = ref(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                attention_mask=batch["attention_mask"], output_hidden_states=True)
    real = batch["attention_mask"].bool()  # padding positions are never read, so not compared
    worst = max(assert_close(x[real], y[real], 1e-5, f"hidden state {i}")
                for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states, strict=True)))
    assert_close(a.last_hidden_state[real], b.last_hidden_state[real], 1e-5, "last hidden state")
    return max(worst, assert_close(a.pooler_output, b.pooler_output, 1e-5, "pooled output"))


def test_tiny_bert_equals_huggingface(tmp_path):
    model = tiny_model()
    model.bert.save_pretrained(tmp_path)  # HF layout: config.json + model.safetensors
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # as HF writes it: transformers 4.46 needs it
        assert f.metadata() == {"format": "pt"}
    ours = BertModel.from_pretrained(str(tmp_path)).eval()
    worst = compare_with_hf(ours, hf_reference(str(tmp_path)), random_batch())
    print(f"tiny BERT vs transformers: max abs diff {worst:.2e}")


def test_minilm_equals_huggingface(minilm):
    folder = minilm
    batch = minilm_batch(folder, [
        ("The cat sat on the mat.", "A cat is sitting on a mat."),
        ("Café owners in Zürich raised prices by 3.5% last year.", "Prices went up."),
        ("He said no.", "Nobody said anything at all about the weather in the mountains that day.")])
    worst = compare_with_hf(BertModel.from_pretrained(folder).eval(), hf_reference(folder), batch)
    print(f"MiniLM vs transformers: max abs diff {worst:.2e}")


def test_google_release_folder_equals_huggingface_on_same_weights(tmp_path):
    ours = BertModel.from_pretrained(GOOGLE_TINY).eval()
    ours.save_pretrained(tmp_path)  # the same weights in HF format, for the reference to read
    compare_with_hf(ours, hf_reference(str(tmp_path)), random_batch())


# ----------------------------------------------------------------------------------------------
# bert.py: the classifier's shapes, the activations, saving and loading


def test_classifier_shapes_and_regression_head():
    model = tiny_model(num_labels=1).eval()
    batch = random_batch()
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], output_hidden_states=True)
    assert out.logits.shape == (5, 1)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    assert all(h.shape == (5, 11, 32) for h in out.hidden_states)
    assert out[0] is out.logits  # logits first, as the tuple says


def test_gelu_variants_differ_as_documented():
    x = torch.linspace(-4, 4, 101)
    erf = 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))
    tanh = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))
    assert_close(bert.ACT2FN["gelu"](x), erf, 1e-6, "exact gelu")
    assert_close(bert.ACT2FN["gelu_new"](x), tanh, 1e-6, "tanh gelu")


def test_saved_classifier_round_trip(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path)
    again = BertForSequenceClassification.from_pretrained(str(tmp_path), num_labels=3).eval()
    batch = random_batch()
    args = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    assert torch.equal(model(*args).logits, again(*args).logits)


# ----------------------------------------------------------------------------------------------
# bert.py: the QA head against transformers.BertForQuestionAnswering


def hf_qa(folder):
    transformers = pytest.importorskip("transformers")
    ref, info = transformers.BertForQuestionAnswering.from_pretrained(
        folder, attn_implementation="eager", torch_dtype=torch.float32, output_loading_info=True)
    return ref.eval(), info


def compare_qa_with_hf(ours, ref, batch):
    """Start and end logits and every hidden state, on real tokens; padding gets PAD_LOGIT in ours."""
    with torch.no_grad():
        a = ours(*inputs(batch), output_hidden_states=True)
        b = ref(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                attention_mask=batch["attention_mask"], output_hidden_states=True)
    real = batch["attention_mask"].bool()
    assert a.logits.shape == (*real.shape, 2)
    worst = max(assert_close(a.logits[..., 0][real], b.start_logits[real], 1e-5, "start logits"),
                assert_close(a.logits[..., 1][real], b.end_logits[real], 1e-5, "end logits"))
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states, strict=True)):
        worst = max(worst, assert_close(x[real], y[real], 1e-5, f"hidden state {i}"))
    assert (a.logits[~real] == bert.PAD_LOGIT).all()
    return worst


def test_tiny_qa_equals_huggingface_both_ways(tmp_path):
    ours = tiny_qa().eval()
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours/config.json").read_text())["head"] == "qa"
    ref, info = hf_qa(str(tmp_path / "ours"))
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info  # same names
    batch = qa_batch()
    worst = compare_qa_with_hf(ours, ref, batch)
    print(f"tiny QA vs transformers: max abs diff {worst:.2e}")
    # And back: Hugging Face's QA checkpoint (no pooler) loads into ours, every weight in place.
    ref.save_pretrained(tmp_path / "hf")
    again = BertForQuestionAnswering.from_pretrained(str(tmp_path / "hf"))
    assert ours.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


def test_minilm_qa_equals_huggingface(minilm):
    """The real MiniLM, padded batch; MiniLM has no QA head: a fresh random one, copied into both."""
    torch.manual_seed(0)
    ours = BertForQuestionAnswering.from_pretrained(minilm).eval()
    ref, info = hf_qa(minilm)
    assert sorted(info["missing_keys"]) == ["qa_outputs.bias", "qa_outputs.weight"]
    ref.qa_outputs.load_state_dict(ours.qa_outputs.state_dict())
    batch = minilm_batch(minilm, [
        ("Where did the cat sit?", "The cat sat on the mat in the kitchen."),
        ("Who raised prices?", "Café owners in Zürich raised prices by 3.5% last year."),
        ("What did he say?", "He said no.")])
    worst = compare_qa_with_hf(ours, ref, batch)
    print(f"MiniLM QA vs transformers: max abs diff {worst:.2e}")


def test_qa_model_has_no_pooler_and_every_parameter_gets_a_gradient():
    """DDP (train.py) runs without find_unused_parameters: a pooler the QA head never reads would stall it."""
    for model in (tiny_qa(), moebert_from_dense(tiny_qa(), torch.rand(3, 37), MoEConfig(3, 11, 5))):
        assert model.bert.pooler is None and not any("pooler" in k for k in model.state_dict())
        batch = qa_batch()
        moebert.task_loss(model(*inputs(batch)).logits, batch["labels"]).backward()
        no_grad = [n for n, p in model.named_parameters() if p.grad is None]
        assert not no_grad, no_grad


def test_saved_qa_teacher_round_trip(tmp_path):
    model = tiny_qa().eval()
    model.save_pretrained(tmp_path)
    again = BertForQuestionAnswering.from_pretrained(str(tmp_path)).eval()
    batch = qa_batch()
    assert torch.equal(model(*inputs(batch)).logits, again(*inputs(batch)).logits)
