"""data.py: the tokenizer against Hugging Face's, truncation, the GLUE readers (the `glue` fixture of
conftest.py) and the files they refuse, metrics against scikit-learn and scipy, GLUE downloads,
batches, token counts, and the leaderboard's prediction files."""
import gzip
import os
import random
import shutil
import tempfile
import warnings
import zipfile

import numpy as np
import pytest
import torch

import conftest
import data
from common import BadFile, MissingFile

from helpers import assert_user_error, closed_port_url, raised, serve, train_refuses, write


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



@pytest.mark.parametrize("lines,embeddings,said", [(7, 7, None), (7, 9, "has 7 lines, the model's embeddings 9"),
                                                   (14, 9, "has ids up to 13 (its lines), the model's embeddings 9")])
def test_a_vocabulary_is_checked_against_the_embedding_table(tmp_path, capsys, lines, embeddings, said):
    """Ids past the table are refused (an IndexError mid-run); a table with rows no line reaches, as left by a
    vocab.txt cut short, is a warning (BERT's releases fill their tables exactly); an exact fit says nothing."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]
    (tmp_path / "vocab.txt").write_text("\n".join((words * 2)[:lines]) + "\n")
    if lines > embeddings:
        e = raised(data.load_tokenizer, str(tmp_path / "vocab.txt"), num_embeddings=embeddings)
        assert_user_error(e, BadFile, ValueError, said)
        return
    data.load_tokenizer(str(tmp_path / "vocab.txt"), num_embeddings=embeddings)
    err = capsys.readouterr().err
    assert (said in err and err.startswith("warning: ")) if said else err == ""

def test_is_uncased(minilm, tmp_path):
    assert data.is_uncased(os.path.join(minilm, "vocab.txt"))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nthe\nThe\n##s\n")
    assert not data.is_uncased(str(tmp_path / "vocab.txt"))


# ----------------------------------------------------------------------------------------------
# Readers, on tiny copies of every task's format (the glue fixture)


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
    for score in ("nan", "inf"):  # float() takes them; training would stop on a "diverging" loss
        write(glue / "STS-B/dev.tsv", sts.replace("\tn/a", "\t" + score))
        with pytest.raises(ValueError, match=rf"STS-B/dev\.tsv, line 2: score '{score}' is not a number"):
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
# Bad files: each a BadFile (a UserError: train.py prints one line, exits 2) naming the file, the line
# where there is one, and what to do; nothing read, nothing printed.

# Who reads each file: read_glue its split, test_sets the test splits and MNLI's diagnostic set.
READERS = {"CoLA/train.tsv": lambda g: data.read_glue("cola", g, "train"),  # no header, no final newline
           "QQP/train.tsv": lambda g: data.read_glue("qqp", g, "train"),  # a broken row, skipped
           "RTE/train.tsv": lambda g: data.read_glue("rte", g, "train"),
           "RTE/dev.tsv": lambda g: data.read_glue("rte", g, "dev"),
           "RTE/test.tsv": lambda g: data.test_sets("rte", g),
           "MNLI/dev_mismatched.tsv": lambda g: data.read_glue("mnli", g, "dev_mismatched"),
           "diagnostic/diagnostic.tsv": lambda g: data.test_sets("mnli", g)}


@pytest.mark.parametrize("name", READERS)
def test_glue_files_not_utf8(glue, name, capsys):
    write(glue / "diagnostic/diagnostic.tsv", "index\tsentence1\tsentence2\n0\tA.\tB.\n1\tC.\tD.\n")
    path = glue / name
    lines = path.read_bytes().split(b"\n")
    lines[1:-1] *= 1000  # the bad byte far past the first chunk a text-mode read decodes, yet found on its line
    lines[-2] = lines[-2].replace(b"\t", b"\tcaf\xe9 au lait ", 1)  # Latin-1, in the last row
    path.write_bytes(b"\n".join(lines))
    e = raised(READERS[name], glue)
    assert_user_error(e, BadFile, ValueError, f"{os.path.join(*name.split('/'))}, line {len(lines) - 1}: not UTF-8 "
                      "text (byte 0xe9 at byte", "re-download the file, or re-encode it as UTF-8")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("garbage, phrase", [
    (gzip.compress(b"index\tsentence1\tsentence2\tlabel\n" * 99), "line 1: not UTF-8 text (byte 0x8b at byte 2"),
    (b"\xff\xfei\x00n\x00d\x00e\x00x\x00", "line 1: not UTF-8 text (byte 0xff at byte 1"),  # UTF-16
    (b"<!DOCTYPE html>\n<html><body>Sign in to the network</body></html>\n", "line 1: 1 fields, too few"),
    (b"\x00" * 300, "line 1: "),  # 1 field, too few (before Python 3.11: csv refuses the NUL byte)
])
def test_glue_files_that_are_no_tsv_text(glue, garbage, phrase):
    (glue / "RTE/train.tsv").write_bytes(garbage)
    e = raised(data.read_glue, "rte", glue, "train")
    assert_user_error(e, BadFile, ValueError, os.path.join("RTE", "train.tsv") + ", " + phrase)


def test_glue_field_over_the_csv_limit(glue):
    """A 10 MB field (csv's limit is 131072 characters) is a damaged file: refused with its line, no _csv.Error."""
    write(glue / "RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"
                                  f"1\t{'x' * 10_000_000}\tb\tentailment\n2\ta\tb\tentailment\n")
    e = raised(data.read_glue, "rte", glue, "train")
    assert_user_error(e, BadFile, ValueError, os.path.join("RTE", "train.tsv") + ", line 3: not a GLUE row (field "
                      "larger than field limit (131072))", "fix the row")


@pytest.mark.parametrize("name, text", [
    ("RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n"),  # the header alone
    ("RTE/train.tsv", ""),  # 0 bytes
    ("CoLA/train.tsv", "\n\n"),  # no header in CoLA: blank lines only
    ("RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n\n\n"),
    ("RTE/test.tsv", "index\tsentence1\tsentence2\n"),
    ("MNLI/dev_mismatched.tsv", conftest.MNLI_HEAD + "\tlabel1\tgold_label\n"),
    ("diagnostic/diagnostic.tsv", "index\tsentence1\tsentence2\n"),
    ("QQP/train.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t2\t3\tHow?\n4\t5\n"),  # broken rows only
])
def test_glue_files_without_examples(glue, name, text, capsys):
    write(glue / name, text)
    e = raised(READERS[name], glue)
    assert_user_error(e, BadFile, ValueError, os.path.join(*name.split("/")), "holds no examples",
                      "download_glue_data.py")
    qqp = name.startswith("QQP")  # its broken rows are skipped, and counted: no examples left
    assert capsys.readouterr().err == (f"warning: {glue / name}: skipped 2 rows with a wrong number of fields\n"
                                       if qqp else "")
    assert ("only broken rows" in str(e)) == qqp


def test_glue_trailing_blank_lines_are_no_rows(glue, capsys):
    for task, split in (("rte", "train"), ("rte", "dev"), ("rte", "test"), ("cola", "train"), ("mnli", "dev_matched")):
        path = glue / data.TASKS[task].folder / data.split_file(task, split)
        expected = data.read_glue(task, glue, split)
        for end in ("\n\n", "\n\n\n", "\r\n\r\n"):
            write(path, path.read_text(encoding="utf-8").rstrip("\r\n").replace("\n", "\r\n" if "\r" in end else "\n")
                  + end)
            assert data.read_glue(task, glue, split) == expected, (task, split, end)
    write(glue / "diagnostic/diagnostic.tsv", "index\tsentence1\tsentence2\n0\tA.\tB.\n\n\n")
    assert data.test_sets("mnli", glue)["AX.tsv"] == [data.Example("A.", "B.", None)]
    assert capsys.readouterr().err == ""
    # A blank line between rows is still a row of 0 fields: an error, or in QQP a broken row skipped.
    write(glue / "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n\n1\tc\td\tentailment\n")
    assert_user_error(raised(data.read_glue, "rte", glue, "dev"), BadFile, ValueError,
                      os.path.join("RTE", "dev.tsv") + ", line 3: 0 tab-separated fields, expected 4")
    qqp = (glue / "QQP/dev.tsv").read_text()
    write(glue / "QQP/dev.tsv", qqp + "\n" + qqp.split("\n", 1)[1] + "\n\n")
    assert len(data.read_glue("qqp", glue, "dev")) == 2 and "skipped 1 rows" in capsys.readouterr().err


@pytest.mark.parametrize("read", [data.load_tokenizer, data.is_uncased])
def test_vocab_not_utf8(tmp_path, read):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"word{i}" for i in range(3000)]
    path = tmp_path / "vocab.txt"
    words[2500] = "caf\xe9"  # line 2501, in Latin-1
    path.write_bytes("\n".join(words).encode("latin-1"))
    e = raised(read, str(path))
    assert_user_error(e, BadFile, ValueError, f"{path}, line 2501: not UTF-8 text (byte 0xe9 at byte 4",
                      "a BERT vocab.txt is UTF-8", "use the vocab.txt that came with the BERT model")
    path.write_bytes("\n".join(words).encode("utf-16"))  # as Windows' Notepad saves "Unicode"
    e = raised(read, str(path))
    assert_user_error(e, BadFile, ValueError, f"{path}, line 1: not UTF-8 text (byte 0xff at byte 1")


def test_train_refuses_a_glue_file_not_utf8(tmp_path, glue):
    (glue / "RTE/train.tsv").write_bytes((glue / "RTE/train.tsv").read_bytes().replace(b"egg", b"\xe9gg"))
    err = train_refuses(tmp_path, "--task", "rte", "--data-dir", str(glue / "RTE"))
    assert "train.tsv, line 2: not UTF-8 text" in err


@pytest.mark.parametrize("task, folder, split, where, what", [
    ("sst2", "CoLA", "train", "line 1", "the header has 'gj04', '1' where SST-2's train file has 'sentence', 'label'"),
    ("qnli", "RTE", "dev", "line 1", "the header has 'sentence1', 'sentence2' where QNLI's dev file has 'question', 'sentence'"),
    ("rte", "QNLI", "test", "line 1", "the header has 'question', 'sentence' where RTE's test file has 'sentence1', 'sentence2'"),
    ("rte", "WNLI", "train", "line 2", "unknown label '1'"),  # the same header: the labels tell them apart
])
def test_another_tasks_file_is_refused_not_misread(glue, task, folder, split, where, what):
    """A task's folder given for another task whose files have as many columns: the header (or the labels)
    tell them apart, where the rows would have read as examples, from the wrong columns."""
    e = raised(data.read_glue, task, glue / folder, split)
    assert_user_error(e, BadFile, ValueError, f"{folder}/{split}.tsv, {where}: {what}")


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


@pytest.mark.parametrize("read", [lambda d: data.read_glue("rte", d, "train"), lambda d: data.glue_dir("rte", d),
                                  lambda d: data.test_sets("rte", d)])
def test_a_zip_for_the_data_folder_says_to_unzip_it(glue, tmp_path, read):
    """GLUE's RTE.zip, which the README names, given as it is: it was "RTE.zip/train.tsv not found"."""
    shutil.make_archive(str(tmp_path / "RTE"), "zip", glue, "RTE")
    e = raised(read, str(tmp_path / "RTE.zip"))
    assert_user_error(e, BadFile, ValueError, "RTE.zip is a file (a .zip? unzip it). Pass --data-dir FOLDER")


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
