"""GLUE data for BERT fine-tuning: WordPiece tokenizer, TSV readers, download, batches, metrics,
and the test-set prediction files the GLUE leaderboard takes (test_sets, write_predictions).

The nine GLUE tasks are read from the TSV files written by GLUE's official download script
(download_glue_data.py), one folder per task. Pass a folder with --data-dir, or let glue_dir()
download the task into the cache.

    tok = load_tokenizer("uncased_L-12_H-768_A-12/vocab.txt")
    train = encode(read_glue("rte", glue_dir("rte"), "train"), tok, max_seq_length=128)
    for batch in batches(train, 32, shuffle=True, seed=epoch): ...
"""
import csv
import itertools
import math
import os
import shutil
import sys
import zipfile
from typing import NamedTuple, Optional

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from common import (BadFile, MissingFile, Offline, cache_dir, check_access, download, name_file, one_level_down,
                    written_beside)

# ----------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(vocab_path, lowercase=True, num_embeddings=None):
    """BERT's WordPiece tokenizer from a vocab.txt (same ids as Hugging Face's BertTokenizerFast); with
    `num_embeddings`, a vocabulary whose ids run past the model's embedding table is refused."""
    if not os.path.isfile(vocab_path):  # checked here: the tokenizers library raises a bare Exception
        raise MissingFile(f"{vocab_path} not found; pass the vocab.txt of the BERT model you use")
    try:
        wordpiece = models.WordPiece.from_file(vocab_path, unk_token="[UNK]", max_input_chars_per_word=100)
    except Exception:  # the tokenizers library raises a bare Exception, e.g. for a file that is not UTF-8
        if bad := utf8_error(vocab_path, VOCAB_FIX):
            raise bad from None
        raise
    tok = Tokenizer(wordpiece)
    # Unicode cleanup, CJK characters split apart, and (uncased models only) lowercase + strip accents.
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # split on whitespace and punctuation
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if any(tok.token_to_id(s) is None for s in specials):
        raise BadFile(f"{vocab_path}: not a BERT vocabulary, it lacks one of {specials}; "
                      f"use the vocab.txt that came with the BERT model")
    if num_embeddings is not None:
        # A token's id is its line: a repeated line leaves the count below the ids, so the largest id is checked.
        top = max(tok.get_vocab().values())
        if top >= num_embeddings:
            raise BadFile(f"{vocab_path} has ids up to {top} (its lines), the model's embeddings {num_embeddings}: "
                          f"not the model's vocabulary; use the vocab.txt that came with it")
        if top + 1 < num_embeddings:  # BERT's releases fill their table exactly
            print(f"warning: {vocab_path} has {top + 1} lines, the model's embeddings {num_embeddings}: the other "
                  f"rows are never used (a vocabulary cut short? use the vocab.txt that came with the model)",
                  file=sys.stderr)
    tok.add_special_tokens(specials)  # a literal "[SEP]" in the text stays one token, as in HF
    # [CLS] a [SEP] b [SEP], with segment (token type) id 0 for sentence a and 1 for sentence b.
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[(s, tok.token_to_id(s)) for s in ("[CLS]", "[SEP]")])
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def is_uncased(vocab_path):
    """Whether a vocabulary is an uncased model's: those hold no capital letters (but [CLS] etc.)."""
    try:
        with open(vocab_path, encoding="utf-8") as f:
            return not any(w != w.lower() for w in f if not w.startswith("["))
    except UnicodeDecodeError:
        raise utf8_error(vocab_path, VOCAB_FIX) from None


VOCAB_FIX = "a BERT vocab.txt is UTF-8 text: use the vocab.txt that came with the BERT model"


def utf8_error(path, fix):
    """A BadFile naming the line and the first byte where `path` is not UTF-8 text; None if it is UTF-8.

    Read line by line here because a decoding error in a text-mode read says where in its chunk the
    byte is, not on which line."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return BadFile(f"{path}, line {n}: not UTF-8 text (byte 0x{line[e.start]:02x} at byte "
                               f"{e.start + 1} of the line); {fix}")
    return None


# ----------------------------------------------------------------------------------------------
# The GLUE tasks


class Task(NamedTuple):
    folder: str  # folder name written by GLUE's download script
    labels: Optional[list]  # label strings as in the files; None for regression (STS-B)
    cols: tuple  # (text_a, text_b, label) column indices in train/dev; -1 is the last column
    test_cols: tuple  # (text_a, text_b) in test, which has no labels
    header: bool  # whether train/dev start with a header row (test files always do)
    metrics: tuple  # what compute_metrics reports; the first one selects checkpoints

    @property
    def metric(self):
        """The metric to select checkpoints by: CoLA mcc, MRPC f1, STS-B pearson, the others accuracy."""
        return self.metrics[0]


TASKS = {
    "cola": Task("CoLA", ["0", "1"], (3, None, 1), (1, None), False, ("mcc",)),
    "sst2": Task("SST-2", ["0", "1"], (0, None, 1), (1, None), True, ("accuracy",)),
    "mrpc": Task("MRPC", ["0", "1"], (3, 4, 0), (3, 4), True, ("f1", "accuracy")),
    # STS-B is selected on Pearson: GLUE lists it first, and on a 0..5 score it rewards getting the
    # values right, not only their order; the two correlations rarely disagree on the best checkpoint.
    "stsb": Task("STS-B", None, (7, 8, -1), (7, 8), True, ("pearson", "spearman")),
    "qqp": Task("QQP", ["0", "1"], (3, 4, 5), (1, 2), True, ("accuracy", "f1")),
    "mnli": Task("MNLI", ["contradiction", "entailment", "neutral"], (8, 9, -1), (8, 9), True, ("accuracy",)),
    "qnli": Task("QNLI", ["entailment", "not_entailment"], (1, 2, -1), (1, 2), True, ("accuracy",)),
    "rte": Task("RTE", ["entailment", "not_entailment"], (1, 2, -1), (1, 2), True, ("accuracy",)),
    "wnli": Task("WNLI", ["0", "1"], (1, 2, -1), (1, 2), True, ("accuracy",)),
}
# The header's names of the columns read (text_a, text_b, label), as in GLUE's files (CoLA's train and dev
# have no header): another task's file, given by mistake, is refused rather than read from wrong columns.
COLUMNS = {"cola": ("sentence", None, None), "sst2": ("sentence", None, "label"),
           "mrpc": ("#1 String", "#2 String", "Quality"), "stsb": ("sentence1", "sentence2", "score"),
           "qqp": ("question1", "question2", "is_duplicate"), "mnli": ("sentence1", "sentence2", "gold_label"),
           "qnli": ("question", "sentence", "label"), "rte": ("sentence1", "sentence2", "label"),
           "wnli": ("sentence1", "sentence2", "label")}


class Example(NamedTuple):
    text_a: str
    text_b: Optional[str]  # None for single-sentence tasks (CoLA, SST-2)
    label: object  # int index into TASKS[task].labels; float for STS-B; None in test splits


def split_file(task, split):
    """File name of a split: "train", "dev", "test"; MNLI also dev/test_matched, dev/test_mismatched."""
    if task == "mnli":  # MNLI has two dev and two test sets; "dev" and "test" mean the matched ones
        names = {"dev": "dev_matched", "test": "test_matched"}
        splits = ("train", "dev", "test", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched")
    else:
        names, splits = {}, ("train", "dev", "test")
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for {task}; one of {', '.join(splits)}")
    return names.get(split, split) + ".tsv"


def task_folder(task, data_dir):
    """`data_dir` may be the task's folder itself or a GLUE root holding it as <data_dir>/<Folder>."""
    if os.path.isfile(data_dir):  # e.g. GLUE's RTE.zip, which the README names: unzipped, it holds the folder
        raise BadFile(f"--data-dir {data_dir} is a file (a .zip? unzip it). " + data_dir_help(task))
    sub = os.path.join(data_dir, TASKS[task].folder)
    return sub if os.path.isdir(sub) else data_dir


def read_glue(task, data_dir, split):
    """The examples of one split, from the TSV files of GLUE's download script (data_dir None: glue_dir)."""
    t = TASKS[task]
    folder = glue_dir(task) if data_dir is None else task_folder(task, data_dir)
    path = os.path.join(folder, split_file(task, split))
    if not os.path.exists(path):
        check_access(folder)
        raise MissingFile(f"{path} not found. " + data_dir_help(task, data_dir))
    test = split.startswith("test")
    a, b, y = (*t.test_cols, None) if test else t.cols
    examples, skipped = [], 0
    rows = tsv_rows(path)
    first = next(rows, None)  # (line number, fields)
    if first is None:
        raise BadFile(f"{path} is empty: it holds no examples; {COMPLETE_HELP}")
    width = len(first[1])  # every row must have as many fields as the header (or CoLA's first row)
    if width <= max(abs(c) for c in (a, b, y) if c is not None):
        raise BadFile(f"{path}, line 1: {width} fields, too few for a {t.folder} {split} file; {FORMAT_HELP}")
    wrong = [(first[1][c], name) for c, name in zip((a, b, y), COLUMNS[task])
             if (test or t.header) and c is not None and name and first[1][c].strip() != name]
    if wrong:
        raise BadFile(f"{path}, line 1: the header has {', '.join(repr(w) for w, _ in wrong)} where {t.folder}'s "
                      f"{split} file has {', '.join(repr(n) for _, n in wrong)}: another task's file? "
                      + data_dir_help(task))
    for line, row in rows if test or t.header else itertools.chain([first], rows):
        where = f"{path}, line {line}"
        if len(row) != width:
            if task == "qqp":  # some QQP releases hold broken rows; GLUE's baselines skip them
                skipped += 1
                continue
            raise BadFile(f"{where}: {len(row)} tab-separated fields, expected {width}; {FORMAT_HELP}")
        examples.append(Example(row[a], None if b is None else row[b],
                                None if test else parse_label(t, row[y], where)))
    if skipped:
        print(f"warning: {path}: skipped {skipped} rows with a wrong number of fields", file=sys.stderr)
    if not examples:  # training on nothing, or metrics and predictions of nothing, would be no result
        raise BadFile(f"{path} holds no examples{', only broken rows' if skipped else ''}; {COMPLETE_HELP}")
    return examples


def tsv_rows(path):
    """(line number, fields) of each row of a GLUE TSV file; blank lines at its end are no rows.

    utf-8-sig drops MRPC's byte order mark; QUOTE_NONE because GLUE text has unbalanced quotes.
    """
    blank = []  # line numbers of blank lines, held back until a row follows (then they are rows of 0 fields)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for row in rows:
                if not row:
                    blank.append(rows.line_num)
                    continue
                yield from ((n, []) for n in blank)
                blank = []
                yield rows.line_num, row
    except UnicodeDecodeError:
        raise utf8_error(path, "re-download the file, or re-encode it as UTF-8") from None
    except csv.Error as e:
        # csv refuses a field over 131072 characters (and, before Python 3.11, a NUL byte). The limit
        # stays: GLUE's longest sentences have a few thousand, so a longer field is a damaged file.
        raise BadFile(f"{path}, line {rows.line_num}: not a GLUE row ({e}); {FORMAT_HELP}") from None


def parse_label(t, s, where):
    if t.labels is None:  # STS-B: a similarity score from 0 to 5
        try:
            score = float(s)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):  # "nan" parses, and would stop training as a diverging loss
            raise BadFile(f"{where}: score {s!r} is not a number; {FORMAT_HELP}")
        return score
    if s not in t.labels:
        raise BadFile(f"{where}: unknown label {s!r}, expected one of {t.labels}; {FORMAT_HELP}")
    return t.labels.index(s)


# What to do about a malformed row: the files must be GLUE's own, unedited.
FORMAT_HELP = ("fix the row, or use the file as GLUE's download_glue_data.py wrote it "
               "(tab-separated, no quoting)")
COMPLETE_HELP = "use the complete file, as GLUE's download_glue_data.py writes it"


def data_dir_help(task, data_dir=None):
    files = ", ".join(split_file(task, s) for s in ("train", "dev", "test"))
    folder = TASKS[task].folder
    return (f"Pass --data-dir FOLDER: a folder holding the {folder} files ({files}) as written by "
            f"GLUE's download_glue_data.py, or the GLUE folder that holds {folder}/."
            + (one_level_down(data_dir, (folder, split_file(task, "train"))) if data_dir else ""))


# ----------------------------------------------------------------------------------------------
# Test-set predictions in the files the GLUE leaderboard (gluebenchmark.com) takes


def test_sets(task, data_dir):
    """{leaderboard file name: examples} of a task's unlabeled test split(s) (data_dir None: glue_dir).

    The file names are the leaderboard's: CoLA.tsv, SST-2.tsv, ..., the task folder's name. MNLI
    gives MNLI-m.tsv and MNLI-mm.tsv, and AX.tsv when GLUE's diagnostic set is there: the
    leaderboard scores it with the MNLI model's predictions.
    """
    folder = glue_dir(task) if data_dir is None else task_folder(task, data_dir)
    if task == "mnli":
        names = {"MNLI-m.tsv": "test_matched", "MNLI-mm.tsv": "test_mismatched"}
    else:
        names = {TASKS[task].folder + ".tsv": "test"}
    sets = {}
    for name, split in names.items():
        path = os.path.join(folder, split_file(task, split))
        if not os.path.exists(path):  # checked here so the message can say why the file is needed
            raise MissingFile(f"{path} not found: --predict needs the unlabeled test split, as GLUE's "
                              f"download_glue_data.py writes it. " + data_dir_help(task))
        sets[name] = read_glue(task, folder, split)
    if task == "mnli":
        # GLUE's script saves the diagnostic set as <GLUE root>/diagnostic/diagnostic.tsv; a copy
        # beside MNLI's own files is accepted too. No diagnostic file: no AX.tsv, and no error.
        for path in (os.path.join(folder, "diagnostic.tsv"),
                     os.path.join(folder, os.pardir, "diagnostic", "diagnostic.tsv")):
            if os.path.exists(path):
                sets["AX.tsv"] = read_diagnostic(path)
                break
    return sets


test_sets.__test__ = False  # not a pytest test, should a test module import it by name


def read_diagnostic(path):
    """GLUE's diagnostic set (AX): a header row, then index, sentence1, sentence2; no labels."""
    examples = []
    rows = tsv_rows(path)  # as read_glue's: quotes are text
    if next(rows, (1, []))[1] != ["index", "sentence1", "sentence2"]:
        raise BadFile(f"{path}, line 1: expected the header index, sentence1, sentence2 of GLUE's "
                      f"diagnostic.tsv; download it again with download_glue_data.py --tasks diagnostic")
    for line, row in rows:
        if len(row) != 3:
            raise BadFile(f"{path}, line {line}: {len(row)} tab-separated fields, expected 3; {FORMAT_HELP}")
        examples.append(Example(row[1], row[2], None))
    if not examples:
        raise BadFile(f"{path} holds no examples; download it again with download_glue_data.py --tasks diagnostic")
    return examples


def write_predictions(task, preds, path):
    """Write predictions as the GLUE leaderboard takes them: a header `index<TAB>prediction`, then one
    row per test example in file order, index 0..n-1 (as Hugging Face's run_glue.py writes them).

    preds: label indices (or logits [N, C]) in the order of the examples; STS-B: scores. A label
    is written as its string in the train files (TASKS[task].labels), a score with 3 decimals.
    """
    labels = TASKS[task].labels
    preds = np.asarray(preds)
    if labels is None:
        rows = [f"{p:.3f}" for p in preds.reshape(-1).astype(np.float64)]
    else:
        if preds.ndim == 2:
            preds = preds.argmax(-1)  # logits -> predicted class
        rows = [labels[int(p)] for p in preds]
    path = os.fspath(path)  # a str or a pathlib.Path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Written whole, then renamed: an interrupted run leaves no half file.
    with written_beside(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("index\tprediction\n")
        f.writelines(f"{i}\t{r}\n" for i, r in enumerate(rows))


# ----------------------------------------------------------------------------------------------
# Download, with the URLs of GLUE's download_glue_data.py (module-level so tests can point them elsewhere)

GLUE_URLS = {
    "cola": "https://dl.fbaipublicfiles.com/glue/data/CoLA.zip",
    "sst2": "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip",
    "qqp": "https://dl.fbaipublicfiles.com/glue/data/QQP-clean.zip",
    "stsb": "https://dl.fbaipublicfiles.com/glue/data/STS-B.zip",
    "mnli": "https://dl.fbaipublicfiles.com/glue/data/MNLI.zip",
    "qnli": "https://dl.fbaipublicfiles.com/glue/data/QNLIv2.zip",
    "rte": "https://dl.fbaipublicfiles.com/glue/data/RTE.zip",
    "wnli": "https://dl.fbaipublicfiles.com/glue/data/WNLI.zip",
}
# GLUE cannot host MRPC: the script takes SentEval's copy and splits off dev by GLUE's id list.
MRPC_URLS = {
    "msr_paraphrase_train.txt": "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt",
    "msr_paraphrase_test.txt": "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_test.txt",
    "dev_ids.tsv": "https://dl.fbaipublicfiles.com/glue/data/mrpc_dev_ids.tsv",
}


def glue_dir(task, data_dir=None, train=True):
    """The folder with a task's TSV files: `data_dir` checked (its training split only if `train`), or the
    cache, downloaded on first use."""
    needed = [split_file(task, s) for s in (("train", "dev_matched", "dev_mismatched") if task == "mnli"
                                             else ("train", "dev")) if train or s != "train"]
    if data_dir is not None:
        folder = task_folder(task, data_dir)
        for name in needed:
            if not os.path.exists(os.path.join(folder, name)):
                check_access(folder)
                raise MissingFile(f"{os.path.join(folder, name)} not found. " + data_dir_help(task, data_dir))
        return folder
    folder = os.path.join(cache_dir(), "glue", TASKS[task].folder)
    if all(os.path.exists(os.path.join(folder, name)) for name in needed):
        return folder
    tmp = folder + ".partial"  # built here, renamed when complete: never a half-made task folder
    try:
        if task == "mrpc":
            for name, url in MRPC_URLS.items():
                if not os.path.exists(os.path.join(tmp, name)):  # download() writes whole files only
                    download(url, os.path.join(tmp, name), what=f"MRPC {name}")
            format_mrpc(tmp)
            done = tmp
        else:
            zip_path = folder + ".zip"
            download(GLUE_URLS[task], zip_path, what=f"GLUE {TASKS[task].folder}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                with zipfile.ZipFile(zip_path) as z:
                    z.extractall(tmp)  # extractall keeps every member inside tmp
            except zipfile.BadZipFile as e:  # a damaged download, or an HTML error page saved as .zip
                raise BadFile(f"{GLUE_URLS[task]} gave no valid zip ({e}); it was deleted, run again to "
                              f"re-download it. Or " + data_dir_help(task)) from None
            except OSError as e:  # a full disk: what was written goes, and the error names the folder
                shutil.rmtree(tmp, ignore_errors=True)
                name_file(e, tmp)
                raise
            finally:
                os.remove(zip_path)  # extracted, or broken (then the next run downloads it again)
            # The zips hold one folder (RTE/, QNLI/ for QNLIv2.zip, ...): that one becomes the task's.
            done = next((d for d, _, files in os.walk(tmp) if needed[0] in files), None)
            if done is None:
                raise BadFile(f"{GLUE_URLS[task]}: the zip holds no {needed[0]}. " + data_dir_help(task))
    except ConnectionError as e:
        raise Offline(f"{e}\nOffline? " + data_dir_help(task)) from None
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(done, folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def format_mrpc(folder):
    """Write train.tsv, dev.tsv, test.tsv from SentEval's MRPC files as GLUE's script does."""
    with open(os.path.join(folder, "dev_ids.tsv"), encoding="utf-8") as f:
        dev_ids = {tuple(line.strip().split("\t")) for line in f}
    # Plain utf-8 on purpose: the header line keeps its byte order mark, as in GLUE's own files.
    with open(os.path.join(folder, "msr_paraphrase_train.txt"), encoding="utf-8") as src, \
            open(os.path.join(folder, "train.tsv"), "w", encoding="utf-8") as train, \
            open(os.path.join(folder, "dev.tsv"), "w", encoding="utf-8") as dev:
        header = src.readline()
        train.write(header)
        dev.write(header)
        for line in src:
            row = line.strip().split("\t")  # Quality, #1 ID, #2 ID, #1 String, #2 String
            (dev if tuple(row[1:3]) in dev_ids else train).write("\t".join(row) + "\n")
    with open(os.path.join(folder, "msr_paraphrase_test.txt"), encoding="utf-8") as src, \
            open(os.path.join(folder, "test.tsv"), "w", encoding="utf-8") as test:
        src.readline()
        test.write("index\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
        for i, line in enumerate(src):  # the test labels are replaced by a running index
            test.write("\t".join([str(i)] + line.strip().split("\t")[1:]) + "\n")


# ----------------------------------------------------------------------------------------------
# Features and batches


def truncate_pair(na, nb, room):
    """Longest first: how many tokens sentences a and b (na, nb long) keep when room tokens are left.

    Only the longer is cut while the shorter fits in half the room; else each keeps half the room
    and an odd token goes to the longer one, to b on a tie. The tokenizers library's rule since
    0.23.3 (0.23.2 gave the odd token to b always; Google's BERT gives it to a, which at length 128
    changes no example of RTE, MRPC or STS-B): written out so features do not depend on the version.
    """
    if na + nb <= room:
        return na, nb
    half = room // 2
    if min(na, nb) <= half:
        return (na, room - na) if na < nb else (room - nb, nb)
    return (half, room - half) if nb >= na else (room - half, half)


def encode(examples, tokenizer, max_seq_length=128):
    """Examples -> [{"input_ids", "token_type_ids", "label"}], pairs truncated longest-first like BERT."""
    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy, so the caller's tokenizer keeps its settings
    tok.no_truncation()  # truncate_pair does the cutting
    tok.no_padding()  # batches() pads each batch only to its own longest sequence
    encodings = tok.encode_batch([e.text_a if e.text_b is None else (e.text_a, e.text_b) for e in examples])
    features = []
    for enc, e in zip(encodings, examples):
        ids, types = enc.ids, enc.type_ids  # [CLS] a [SEP] or [CLS] a [SEP] b [SEP], whole
        if len(ids) > max_seq_length:  # cut the sentences' ends, keep [CLS] and [SEP]
            cls, sep = ids[0], ids[-1]
            if e.text_b is None:
                ids, types = ids[:max_seq_length - 1] + [sep], types[:max_seq_length]
            else:
                na = types.count(0) - 2
                a, b = ids[1:1 + na], ids[2 + na:-1]
                ka, kb = truncate_pair(len(a), len(b), max_seq_length - 3)
                ids = [cls] + a[:ka] + [sep] + b[:kb] + [sep]
                types = [0] * (ka + 2) + [1] * (kb + 1)
        features.append({"input_ids": ids, "token_type_ids": types, "label": e.label})
    return features


def batches(features, batch_size, shuffle=False, seed=0, sort_by_length=False, group_by_length=False):
    """Yield dicts of LongTensors input_ids, token_type_ids, attention_mask [B, T], labels [B], index [B].

    Each batch is padded with 0 to its longest sequence. `index` holds the positions of the batch's
    examples in `features`, so predictions can go back in order: preds[batch["index"]] = p.
    shuffle: a new order from `seed` (pass seed + epoch). sort_by_length: longest first, which
    minimises padding for evaluation. group_by_length (with shuffle): batches of similar lengths in
    random order, so training pads far less (RTE: 70 tokens on average, ~200 in a random batch of 32).
    labels is a FloatTensor for regression, absent without labels.
    """
    if shuffle and sort_by_length:
        raise ValueError("shuffle and sort_by_length exclude each other")
    n = len(features)
    lengths = np.array([len(f["input_ids"]) for f in features])
    order = np.arange(n)
    if shuffle:
        rng = np.random.default_rng(seed)
        order = rng.permutation(n)
        if group_by_length:  # sort within random windows of 50 batches, then shuffle the batches
            w = 50 * batch_size
            order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in np.split(order, range(w, n, w))])
            chunks = np.split(order, range(batch_size, n, batch_size))
            order = np.concatenate([chunks[i] for i in rng.permutation(len(chunks))])
    elif sort_by_length:
        order = np.argsort(-lengths, kind="stable")  # ties keep their order, so it is reproducible
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        rows = [features[i] for i in idx]
        T = max(len(f["input_ids"]) for f in rows)
        input_ids = torch.zeros(len(rows), T, dtype=torch.long)  # [B, T], 0 is [PAD]
        token_type_ids = torch.zeros(len(rows), T, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros(len(rows), T, dtype=torch.long)  # [B, T], 1 on real tokens
        for i, f in enumerate(rows):
            L = len(f["input_ids"])
            input_ids[i, :L] = torch.tensor(f["input_ids"])
            token_type_ids[i, :L] = torch.tensor(f["token_type_ids"])
            attention_mask[i, :L] = 1
        batch = {"input_ids": input_ids, "token_type_ids": token_type_ids,
                 "attention_mask": attention_mask, "index": torch.from_numpy(idx)}
        if rows[0]["label"] is not None:
            regression = isinstance(rows[0]["label"], float)
            batch["labels"] = torch.tensor([f["label"] for f in rows],
                                           dtype=torch.float if regression else torch.long)  # [B]
        yield batch


def token_counts(features, vocab_size):
    """How often each token id occurs in the features ([CLS] and [SEP] included, padding not): [vocab_size].

    MoEBERT's hash-balance routing spreads tokens over experts by these training-set frequencies.
    """
    ids = np.fromiter(itertools.chain.from_iterable(f["input_ids"] for f in features), dtype=np.int64)
    counts = torch.from_numpy(np.bincount(ids, minlength=vocab_size))  # [vocab_size], int64
    if len(counts) > vocab_size:
        raise ValueError(f"token id {len(counts) - 1} is outside the vocabulary of {vocab_size}")
    return counts


# ----------------------------------------------------------------------------------------------
# Metrics, in plain numpy


def compute_metrics(task, preds, labels):
    """{metric: float} for a task; preds are label indices (or logits [N, C]), floats for STS-B."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if task == "stsb":
        preds, labels = preds.reshape(-1).astype(np.float64), labels.astype(np.float64)
        return {"pearson": pearson(preds, labels), "spearman": pearson(rankdata(preds), rankdata(labels))}
    if preds.ndim == 2:
        preds = preds.argmax(-1)  # logits -> predicted class
    preds, labels = preds.astype(np.int64), labels.astype(np.int64)
    out = {"accuracy": float((preds == labels).mean())}
    if task == "cola":
        out["mcc"] = matthews_corrcoef(preds, labels)
    if task in ("mrpc", "qqp"):
        tp = np.sum((preds == 1) & (labels == 1))
        wrong = np.sum(preds != labels)  # false positives + false negatives
        out["f1"] = float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0
    return {k: out[k] for k in TASKS[task].metrics}


def matthews_corrcoef(preds, labels):
    """Matthews correlation from the confusion matrix (the multiclass form, as scikit-learn)."""
    k = int(max(preds.max(), labels.max())) + 1
    C = np.zeros((k, k), dtype=np.float64)  # C[true, predicted]
    np.add.at(C, (labels, preds), 1)
    t, p, c, s = C.sum(1), C.sum(0), np.trace(C), C.sum()
    denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denom) if denom > 0 else 0.0  # constant predictions: 0


def pearson(x, y):
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denom) if denom > 0 else 0.0  # a constant input has no correlation


def rankdata(x):
    """Ranks 1..n, ties given their average rank (scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]  # where a run of equal values starts
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = avg[np.cumsum(new) - 1]
    return ranks
