"""SQuAD v1.1 and v2.0 for BERT: the official JSON, sliding-window features, span postprocessing and
the official metrics, as Google's run_squad.py and the SQuAD evaluation scripts define them.

    examples, dataset = load_squad("2.0", "dev")               # or data_dir="folder/with/the/json"
    features = make_features(examples, data.load_tokenizer(vocab))
    for batch in data.batches(features, 32): ...               # labels: [B, 2] start/end token
    preds, diffs = postprocess(examples, features, start_logits, end_logits, version="2.0")
    print(score("2.0", dataset, preds, diffs))                 # evaluate-v2.0.py's numbers

Where run_squad.py's behaviour lives here:
- read_squad_examples              -> read_squad (character spans kept: no whitespace word split)
- convert_examples_to_features     -> make_features; its window loop is doc_windows, its
  _check_is_max_context is max_context_owner, and _improve_answer_span is not needed: the tokenizer's
  character offsets give the tightest token span around the answer directly (token_span)
- write_predictions / get_final_text -> postprocess: the answer is cut from the original context by
  the offsets of its first and last token, never rebuilt from word pieces
The metrics mirror evaluate-v1.1.py (evaluate) and evaluate-v2.0.py (evaluate_v2) to the last digit.
"""
import bisect
import collections
import json
import os
import re
import string
import sys
import unicodedata
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer

from common import BadFile, MissingFile, Offline, cache_dir, check_access, download, one_level_down

# ----------------------------------------------------------------------------------------------
# The official files

SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"  # module-level: tests point it elsewhere
FILES = {"1.1": ("train-v1.1.json", "dev-v1.1.json"), "2.0": ("train-v2.0.json", "dev-v2.0.json")}


class Example(NamedTuple):
    id: str
    question: str
    context: str  # the paragraph, as in the file
    answers: list  # [(text, answer_start)], answer_start a character index into context; [] if none
    is_impossible: bool  # SQuAD 2.0 questions the paragraph cannot answer (always False in 1.1)


def squad_files(version):
    """(train file name, dev file name) of a SQuAD version, "1.1" or "2.0"."""
    if version not in FILES:
        raise ValueError(f"unknown SQuAD version {version!r}; one of {', '.join(FILES)}")
    return FILES[version]


def data_dir_help(version, data_dir=None):
    train, dev = squad_files(version)
    return (f"Pass --data-dir FOLDER: a folder holding the official SQuAD {version} files {train} and "
            f"{dev}, as downloaded from {SQUAD_URL}." + (one_level_down(data_dir, (train, dev)) if data_dir else ""))


def squad_path(version, split, data_dir=None):
    """Path of the "train" or "dev" file: in `data_dir` (checked), or downloaded into the cache once."""
    if split not in ("train", "dev"):
        raise ValueError(f"unknown SQuAD split {split!r}; train or dev")
    name = squad_files(version)[split == "dev"]
    if data_dir is not None:
        path = os.path.join(data_dir, name)
        if os.path.isfile(data_dir):  # one of the files itself, say: the folder is what is asked for
            raise BadFile(f"--data-dir {data_dir} is a file. " + data_dir_help(version))
        if not os.path.exists(path):
            check_access(data_dir)
            raise MissingFile(f"{path} not found. " + data_dir_help(version, data_dir))
        return path
    path = os.path.join(cache_dir(), "squad", name)
    if not os.path.exists(path):
        try:
            download(SQUAD_URL + name, path, what=f"SQuAD {name}")  # written whole, then renamed
        except ConnectionError as e:
            raise Offline(f"{e}\nOffline? " + data_dir_help(version)) from None
    return path


def load_squad(version, split, data_dir=None, max_examples=None):
    """(examples, dataset) of a split: see read_squad. A damaged file in the cache is deleted."""
    path = squad_path(version, split, data_dir)
    try:
        return read_squad(path, max_examples, train=split == "train")
    except BadFile as e:
        if data_dir is None:  # our own download, e.g. an error page saved as JSON: fetch it again next time
            os.remove(path)
            raise BadFile(f"{e}; it was deleted, run again to download it again. Or " + data_dir_help(version)) from None
        raise


def read_squad(path, max_examples=None, train=False):
    """(examples, dataset) from an official SQuAD JSON file; the first `max_examples` questions only.

    dataset is the file's "data" list holding the same questions (articles and paragraphs left
    without any dropped), in the structure the official evaluation scripts read.
    train: the first answer is the label, so a question whose first answer is not the context's text
    at its answer_start is skipped, with one warning (its label would be a wrong span, or "no
    answer"). A dev file is read whole: the evaluation compares answer texts, never offsets.
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadFile(f"{path} is not valid JSON ({e}); use the official SQuAD file unchanged") from None

    def check(ok, what):
        if not ok:
            raise BadFile(f"{path}: {what}; not an official SQuAD file? Use it as downloaded from {SQUAD_URL}")

    check(isinstance(raw, dict) and isinstance(raw.get("data"), list), 'no "data" list at the top')
    examples, dataset, ids, mismatched = [], [], set(), []
    for a, article in enumerate(raw["data"]):
        check(isinstance(article, dict) and isinstance(article.get("paragraphs"), list),
              f'article {a} has no "paragraphs" list')
        paragraphs = []
        for p, paragraph in enumerate(article["paragraphs"]):
            where = f"article {a}, paragraph {p}"
            check(isinstance(paragraph, dict) and isinstance(paragraph.get("context"), str)
                  and isinstance(paragraph.get("qas"), list), f'{where} lacks a "context" string or a "qas" list')
            qas = []
            for qa in paragraph["qas"]:
                if max_examples is not None and len(examples) >= max_examples:
                    break
                check(isinstance(qa, dict) and isinstance(qa.get("id"), str) and isinstance(qa.get("question"), str)
                      and isinstance(qa.get("answers"), list), f'{where}: a question lacks "id", "question" or "answers"')
                check(qa["id"] not in ids, f'{where}: question id {qa["id"]} appears twice; the evaluation keys '
                                           f'the predictions by id, so each must be unique')
                ids.add(qa["id"])
                answers = []
                for ans in qa["answers"]:
                    check(isinstance(ans, dict) and isinstance(ans.get("text"), str)
                          and type(ans.get("answer_start")) is int,
                          f'question {qa["id"]}: an answer lacks a "text" string or an integer "answer_start"')
                    answers.append((ans["text"], ans["answer_start"]))
                impossible = qa.get("is_impossible", False)  # only in SQuAD 2.0 files
                check(isinstance(impossible, bool), f'question {qa["id"]}: "is_impossible" is not true/false')
                if train and answers and not impossible:
                    text, start = answers[0]
                    if not (start >= 0 and paragraph["context"].startswith(text, start)):
                        mismatched.append(f"question {qa['id']}, {text!r} at {start}")
                        continue
                examples.append(Example(qa["id"], qa["question"], paragraph["context"], answers, impossible))
                qas.append(qa)
            if qas:
                paragraphs.append({**paragraph, "qas": qas})
        if paragraphs:
            dataset.append({**article, "paragraphs": paragraphs})
    if mismatched:
        print(f"warning: {path}: skipped {len(mismatched)} questions whose answer is not in the context at its "
              f"answer_start (the first: {mismatched[0]}); answer_start counts the context's characters, from 0",
              file=sys.stderr)
    # Training on nothing, or scoring no question, would be no result.
    check(examples or max_examples == 0, "it holds no examples" + (" but those skipped" if mismatched else ""))
    return examples, dataset


# ----------------------------------------------------------------------------------------------
# Features: [CLS] question [SEP] context window [SEP], as run_squad.py's convert_examples_to_features


def doc_windows(n_tokens, max_tokens, doc_stride):
    """[(start, length)] of the context windows: run_squad's sliding window over n_tokens tokens.

    Each window holds up to max_tokens tokens; the next starts doc_stride tokens later (or right
    after this one, if the stride is longer), and the last one ends at the last token. An empty
    context still gets one (empty) window, so that every question has a prediction.
    """
    windows, start = [], 0
    while True:
        length = min(n_tokens - start, max_tokens)
        windows.append((start, length))
        if start + length >= n_tokens:
            return windows
        start += min(length, doc_stride)


def max_context_owner(windows, n_tokens):
    """[n_tokens] index of the window where each context token has the most context (run_squad's
    _check_is_max_context): the most tokens on its shorter side, + 0.01 * window length; the first
    window wins ties. Only there may an answer start, so overlapping windows don't compete twice."""
    starts = np.array([s for s, _ in windows])[:, None]  # [W, 1]
    lengths = np.array([n for _, n in windows])[:, None]  # [W, 1]
    pos = np.arange(n_tokens)[None, :]  # [1, N]
    left, right = pos - starts, starts + lengths - 1 - pos  # [W, N] tokens before / after it in the window
    score = np.minimum(left, right) + 0.01 * lengths  # [W, N], float64 like run_squad's Python floats
    score[(left < 0) | (right < 0)] = -np.inf  # the token is not in that window
    return score.argmax(0)  # [N]; argmax takes the first of equal scores, as run_squad's strict >


def token_span(starts, ends, char_start, char_end):
    """(first, last) token overlapping the characters [char_start, char_end), or None if none does.

    The tightest token span around the answer: what run_squad gets from whitespace words plus
    _improve_answer_span. starts/ends are the tokens' character offsets, both increasing.
    """
    first = bisect.bisect_right(ends, char_start)  # first token ending after the answer starts
    last = bisect.bisect_left(starts, char_end) - 1  # last token starting before the answer ends
    return (first, last) if first <= last else None


def make_features(examples, tokenizer, max_seq_length=384, doc_stride=128, max_query_length=64):
    """One feature per context window of each example, in example order; dicts of:

    input_ids, token_type_ids: [CLS] question [SEP] window [SEP], type 0 up to the first [SEP], 1 after.
    label: (start, end) token of the first gold answer in this window, (0, 0) ([CLS]) when the window
        does not hold all of it or the question has no answer (SQuAD 2.0), as run_squad trains.
    example_index: position of the example in `examples`.
    offsets: per token, (start, end) characters of the context, None for question and special tokens.
    max_context: per token, whether this window is the token's max-context window (False off context).
    """
    tok = tokenizer
    if tok.truncation is not None or tok.padding is not None:  # the windows do the cutting
        tok = Tokenizer.from_str(tokenizer.to_str())  # a copy, so the caller's tokenizer keeps its settings
        tok.no_truncation()
        tok.no_padding()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    # A paragraph has ~5 questions: tokenize each distinct context once, all of them in one parallel call.
    contexts = list(dict.fromkeys(e.context for e in examples))
    context_index = {c: i for i, c in enumerate(contexts)}
    encoded = [(enc.ids, enc.offsets) for enc in tok.encode_batch(contexts, add_special_tokens=False)]
    bounds = {}  # context index -> (token starts, token ends), made when an answer needs them
    questions = tok.encode_batch([e.question for e in examples], add_special_tokens=False)
    features = []
    for i, (e, q) in enumerate(zip(examples, questions)):
        c = context_index[e.context]
        ids, offsets = encoded[c]
        head = [cls_id] + q.ids[:max_query_length] + [sep_id]  # run_squad cuts the question's word pieces
        room = max_seq_length - len(head) - 1  # context tokens that fit beside the question and the last [SEP]
        if room < 1:
            raise ValueError(f"max_seq_length {max_seq_length} leaves no room for the context beside a "
                             f"question of up to {max_query_length} tokens")
        windows = doc_windows(len(ids), room, doc_stride)
        owner = max_context_owner(windows, len(ids)) if len(windows) > 1 else None
        answer = None  # (first, last) context token of the first gold answer
        if e.answers and not e.is_impossible:
            if c not in bounds:
                bounds[c] = ([s for s, _ in offsets], [t for _, t in offsets])
            text, start = e.answers[0]
            answer = token_span(*bounds[c], start, start + len(text))
        c0 = len(head)  # where the context starts in every window
        for w, (s, n) in enumerate(windows):
            label = (0, 0)
            if answer is not None and s <= answer[0] and answer[1] < s + n:
                label = (answer[0] - s + c0, answer[1] - s + c0)
            in_max = [True] * n if owner is None else (owner[s:s + n] == w).tolist()
            features.append({
                "input_ids": head + ids[s:s + n] + [sep_id],
                "token_type_ids": [0] * c0 + [1] * (n + 1),
                "label": label,
                "example_index": i,
                "offsets": [None] * c0 + offsets[s:s + n] + [None],  # shares the context's tuples
                "max_context": [False] * c0 + in_max + [False],
            })
    return features


# ----------------------------------------------------------------------------------------------
# Postprocessing: logits -> answer text, as run_squad.py's write_predictions


def postprocess(examples, features, start_logits, end_logits, version="1.1", n_best_size=20,
                max_answer_length=30, null_threshold=0.0):
    """(predictions {id: text}, score_diffs {id: float} or None for 1.1) from per-feature logits.

    start_logits, end_logits: one array per feature (or a [N, T] array), at least as long as the
    feature; positions past its end (batch padding) are ignored. For each example, over all its
    windows: the n_best_size highest start and end logits of a window make the candidates; a span
    counts if both ends are context tokens, start <= end, it is at most max_answer_length tokens
    and its start token is in its max-context window. The best span (start + end logit) wins.
    SQuAD 2.0: the null score is min over windows of start + end logit at [CLS]; the prediction is
    "" when null score - best span score > null_threshold. score_diffs holds those differences,
    to tune the threshold (pass them as evaluate_v2's na_probs: best_f1_thresh is the best one).
    An example without any valid span gets "" (run_squad would write "empty", or fail on 2.0).
    """
    squad_files(version)  # a known version, or ValueError
    squad2 = version == "2.0"
    by_example = [[] for _ in examples]
    for i, f in enumerate(features):
        by_example[f["example_index"]].append(i)
    predictions, score_diffs = {}, {} if squad2 else None
    for e, feature_ids in zip(examples, by_example):
        best, best_score, null_score = None, -np.inf, np.inf
        for i in feature_ids:
            f = features[i]
            T = len(f["input_ids"])
            start = np.asarray(start_logits[i], dtype=np.float64)[:T]  # [T], float64 as run_squad's floats
            end = np.asarray(end_logits[i], dtype=np.float64)[:T]  # [T]
            null_score = min(null_score, start[0] + end[0])
            c0, c1 = f["token_type_ids"].index(1), T - 1  # context tokens: c0 .. c1 - 1 (the last is [SEP])
            # The n best of each, stable like run_squad's sort: equal logits keep position order.
            starts = np.argsort(-start, kind="stable")[:n_best_size]
            ends = np.argsort(-end, kind="stable")[:n_best_size]
            starts = np.array([s for s in starts if c0 <= s < c1 and f["max_context"][s]], dtype=np.int64)
            ends = ends[(ends >= c0) & (ends < c1)]
            if not len(starts) or not len(ends):
                continue
            S, E = starts[:, None], ends[None, :]  # [s, 1], [1, e]
            scores = np.where((E >= S) & (E - S < max_answer_length), start[S] + end[E], -np.inf)  # [s, e]
            k = scores.argmax()  # first of equal scores in run_squad's order: start-major, then end
            if scores.flat[k] > best_score:  # strict: an earlier window keeps a tie, as run_squad's stable sort
                best_score = scores.flat[k]
                s, t = starts[k // len(ends)], ends[k % len(ends)]
                best = (f["offsets"][s][0], f["offsets"][t][1], start[s], end[t])
        text = "" if best is None else e.context[best[0]:with_marks(e.context, best[1])]
        if squad2:
            # run_squad's order of operations (null - start - end), so diffs match it to the bit
            diff = float("inf") if best is None else float(null_score - best[2] - best[3])
            score_diffs[e.id] = diff
            text = "" if diff > null_threshold else text
        predictions[e.id] = text
    return predictions, score_diffs


def with_marks(text, end):
    """`end` moved past the combining marks that follow it (an uncased vocabulary strips accents, so a
    word's last token ends before them): a mark belongs to the letter before it."""
    while end < len(text) and unicodedata.combining(text[end]):
        end += 1
    return end


# ----------------------------------------------------------------------------------------------
# The official metrics. Same arithmetic, types and summation order as evaluate-v1.1.py and
# evaluate-v2.0.py (ints where they have ints: Python's sum() adds ints and floats differently),
# so the numbers agree to the last digit.

PUNCTUATION = set(string.punctuation)  # ASCII only, as the official scripts
ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s):
    """Lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", s).split())


def exact_score(prediction, gold):
    """1 if the two normalise to the same string, else 0."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction, gold, version="1.1"):
    """Bag-of-words F1 of the normalised words. When either has no word: 0, except in 2.0, where
    both empty agree (1): that is how a correct "no answer" scores."""
    pred, true = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version == "2.0" and (not pred or not true):
        return int(pred == true)
    same = sum((collections.Counter(pred) & collections.Counter(true)).values())
    if same == 0:
        return 0
    precision, recall = same / len(pred), same / len(true)
    return (2 * precision * recall) / (precision + recall)


def questions(dataset):
    """The question dicts of a dataset ("data" list of the JSON file), in file order."""
    return [qa for article in dataset for p in article["paragraphs"] for qa in p["qas"]]


def evaluate(dataset, predictions):
    """SQuAD 1.1 metrics as evaluate-v1.1.py: {"exact_match", "f1"} in percent, each the best over
    the gold answers, averaged over all questions (a missing prediction scores 0, with a warning)."""
    exact = f1 = total = 0
    for qa in questions(dataset):
        total += 1
        if qa["id"] not in predictions:
            print(f"Unanswered question {qa['id']} will receive score 0.", file=sys.stderr)
            continue
        pred, golds = predictions[qa["id"]], [a["text"] for a in qa["answers"]]
        exact += max(exact_score(pred, g) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


def evaluate_v2(dataset, predictions, na_probs=None, na_prob_thresh=1.0):
    """SQuAD 2.0 metrics as evaluate-v2.0.py: exact, f1, total, then the same for the HasAns and NoAns
    questions, in percent. Gold answers that normalise to nothing are dropped, and a question left
    with none has the one answer "". A question whose na_probs value is > na_prob_thresh counts as
    answered "no answer". With na_probs: best_exact, best_f1 and the thresholds that reach them.
    """
    has_answer = {qa["id"]: bool(qa["answers"]) for qa in questions(dataset)}
    missing = [q for q in has_answer if q not in predictions]
    if missing:  # the official script fails on these (KeyError): say which
        raise ValueError(f"no prediction for {len(missing)} of {len(has_answer)} questions, e.g. {missing[0]}")
    probs = {k: 0.0 for k in predictions} if na_probs is None else na_probs
    missing = [q for q in has_answer if q not in probs]
    if missing:
        raise ValueError(f"na_probs lacks {len(missing)} of {len(has_answer)} questions, e.g. {missing[0]}")
    exact_raw, f1_raw = {}, {}
    for qa in questions(dataset):
        golds = [a["text"] for a in qa["answers"] if normalize_answer(a["text"])] or [""]
        pred = predictions[qa["id"]]
        exact_raw[qa["id"]] = max(exact_score(pred, g) for g in golds)
        f1_raw[qa["id"]] = max(f1_score(pred, g, "2.0") for g in golds)

    def no_answer_if_sure(raw):  # what a "no answer" prediction scores: 1 exactly when there is none
        return {q: float(not has_answer[q]) if probs[q] > na_prob_thresh else s for q, s in raw.items()}

    exact, f1 = no_answer_if_sure(exact_raw), no_answer_if_sure(f1_raw)
    out = {}
    for prefix, ids in (("", list(exact)), ("HasAns_", [q for q, h in has_answer.items() if h]),
                        ("NoAns_", [q for q, h in has_answer.items() if not h])):
        if ids:
            out[prefix + "exact"] = 100.0 * sum(exact[q] for q in ids) / len(ids)
            out[prefix + "f1"] = 100.0 * sum(f1[q] for q in ids) / len(ids)
            out[prefix + "total"] = len(ids)
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = best_threshold(predictions, exact_raw, probs, has_answer)
        out["best_f1"], out["best_f1_thresh"] = best_threshold(predictions, f1_raw, probs, has_answer)
    return out


def best_threshold(predictions, scores, na_probs, has_answer):
    """(best score in percent, na_probs threshold reaching it), as evaluate-v2.0.py's find_best_thresh:
    start with every question answered "no answer", then answer them in order of increasing na_probs."""
    score = best = sum(1 for h in has_answer.values() if not h)  # all "no answer": the NoAns questions right
    thresh = 0.0
    for q in sorted(na_probs, key=lambda k: na_probs[k]):
        if q not in scores:
            continue
        score += scores[q] if has_answer[q] else (-1 if predictions[q] else 0)  # answering a NoAns loses it
        if score > best:
            best, thresh = score, na_probs[q]
    return 100.0 * best / len(scores), thresh


def score(version, dataset, predictions, score_diffs=None, threshold=0.0):
    """The official metrics of a version from postprocess's outputs (both versions have "f1").
    2.0: score_diffs serve as na_probs with the threshold postprocess used, so the counts agree with
    the predictions, and best_f1_thresh says which threshold would have done best."""
    squad_files(version)  # a known version, or ValueError
    if version == "1.1":
        return evaluate(dataset, predictions)
    return evaluate_v2(dataset, predictions, score_diffs, threshold if score_diffs is not None else 1.0)
