"""common.py's user errors (common.UserError: train.py prints one line and exits 2) as every module
raises them: missing folders and files, offline, malformed rows, checkpoints that do not fit or are
damaged, broken zips; and the programming errors that stay plain builtin ones."""
import json
import os
import shutil

import pytest

import bert
import data
import squad
import weights
from bert import BertForSequenceClassification, BertModel
from common import BadFile, MissingFile, Offline, UserError

from helpers import GOOGLE_TINY, assert_user_error, closed_port_url, deny, raised, serve, tiny_model, write


# ----------------------------------------------------------------------------------------------
# Errors a user can fix (common.UserError: train.py prints one line and exits 2)


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


@pytest.mark.parametrize("edit,phrase", [
    ("[]", "config.json holds [], not an object of settings"),
    ("null", "config.json holds null, not an object of settings"),
    (b"\xff\xfe{", "config.json is not valid JSON ('utf-8' codec can't decode"),
    ({"hidden_size": "32"}, "hidden_size is '32', not a whole number >= 0"),
    ({"hidden_size": 32.0}, "hidden_size is 32.0, not a whole number >= 0"),
    ({"intermediate_size": -3}, "intermediate_size is -3, not a whole number >= 0"),
    ({"num_hidden_layers": True}, "num_hidden_layers is True, not a whole number >= 0"),
    ({"layer_norm_eps": float("nan")}, "layer_norm_eps is nan, not a number >= 0"),
    ({"hidden_act": 3}, "hidden_act is 3, not a string"),
    ({"num_attention_heads": 0}, "not divisible by num_attention_heads 0"),
    ({"attention_probs_dropout_prob": 1.5}, "a dropout probability above 1"),
])
def test_config_that_is_no_bert_config(tmp_path, edit, phrase):
    """A hand-edited or foreign config.json: a BadFile naming the file and the field, before any module is
    built (a size given as a string, or zero heads, would otherwise fail deep inside the model)."""
    tiny_model().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    if isinstance(edit, dict):
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **edit)))
    else:
        path.write_bytes(edit if isinstance(edit, bytes) else edit.encode())
    e = raised(BertForSequenceClassification.from_pretrained, str(tmp_path), num_labels=3)
    assert_user_error(e, BadFile, ValueError, str(path), phrase)


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


def test_download_cache_that_cannot_be_a_folder(tmp_path, monkeypatch):
    """$MOEBERT_CACHE naming a file, or a place no folder can be made, is named with what to do (it was a
    NotADirectoryError deep in a download); set but empty, it is unset (it put the cache in the working folder)."""
    import common
    write(tmp_path / "afile", "x")
    for where, why in ((tmp_path / "afile", "it is a file"), (tmp_path / "afile" / "sub", "Not a directory")):
        monkeypatch.setenv("MOEBERT_CACHE", str(where))
        e = raised(weights.resolve_pretrained, "all-minilm-l6-v2")
        assert_user_error(e, UserError, Exception, f"the download cache {where} ($MOEBERT_CACHE, else ~/.cache/moebert) "
                          f"cannot be a folder ({why}): set MOEBERT_CACHE to a folder you can write to")
    monkeypatch.setenv("MOEBERT_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert common.cache_dir() == str(tmp_path / "home" / ".cache" / "moebert") and os.path.isdir(common.cache_dir())


def test_programming_errors_stay_plain():
    # Wrong arguments from code, not from the user: a traceback is what helps there.
    e = raised(data.split_file, "rte", "dev_matched")
    assert type(e) is ValueError
    e = raised(lambda: next(data.batches([], 1, shuffle=True, sort_by_length=True)))
    assert type(e) is ValueError


@pytest.mark.parametrize("write", ["json", "safetensors", "predictions"])
def test_a_write_that_fails_leaves_the_file_as_it_was_and_nothing_beside(tmp_path, write):
    """Each of the three writers goes through written_beside: a failed rename (a folder where the file goes)
    or a failure while writing leaves the target as it was and no .partial file."""
    import torch
    from common import atomic_write_json, save_safetensors, written_beside
    writers = {"json": lambda p: atomic_write_json(str(p), {"a": 1}),
               "safetensors": lambda p: save_safetensors({"w": torch.ones(2)}, str(p)),
               "predictions": lambda p: data.write_predictions("rte", [0, 1], p)}
    target = tmp_path / "in_the_way"
    target.mkdir()
    (target / "mine").write_text("kept")
    with pytest.raises(IsADirectoryError):
        writers[write](target)
    assert os.listdir(tmp_path) == ["in_the_way"] and (target / "mine").read_text() == "kept"
    done = tmp_path / "done"
    writers[write](done)  # and where nothing is in the way, the file is there, whole, alone
    assert sorted(os.listdir(tmp_path)) == ["done", "in_the_way"] and done.stat().st_size > 0
    with pytest.raises(ZeroDivisionError):
        with written_beside(tmp_path / "x") as tmp:
            open(tmp, "w").write("half")
            1 / 0
    assert sorted(os.listdir(tmp_path)) == ["done", "in_the_way"]
    # The file written beside blocked by a folder, or no folder to write in: the OSError, never the writer's own
    # error (safetensors raised its SafetensorError, a traceback, as train.py does not read it as a disk error).
    (tmp_path / "blocked.partial").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        writers[write](tmp_path / "blocked")
    assert e.value.filename == str(tmp_path / "blocked.partial")
    if write != "predictions":  # which makes its folder
        with pytest.raises(FileNotFoundError):
            writers[write](tmp_path / "gone" / "file")


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_get_the_mode_of_any_new_file(tmp_path, umask):
    """A model.safetensors (a checkpoint, importance) gets the mode a plain open() gives a new file, as its
    config.json does: safetensors made it 0600, so another user who could read a run's config could not
    read its weights (a team's shared disk)."""
    import torch
    from common import atomic_write_json, save_safetensors
    old = os.umask(umask)
    try:
        open(tmp_path / "plain", "w").close()  # the reference: what Python's open() makes under this umask
        save_safetensors({"w": torch.ones(3)}, str(tmp_path / "model.safetensors"))
        atomic_write_json(str(tmp_path / "config.json"), {"a": 1})
    finally:
        os.umask(old)
    mode = lambda name: oct((tmp_path / name).stat().st_mode & 0o777)
    assert mode("plain") == oct(0o666 & ~umask)
    assert mode("model.safetensors") == mode("config.json") == mode("plain")


@pytest.mark.parametrize("what", ["bert", "glue", "squad"])
def test_an_unzipped_downloads_outer_folder_names_the_folder_inside(tmp_path, what):
    """Unzipped, Google's release, GLUE's data and a SQuAD folder of one's own often sit one level below the
    folder given: the error names the subfolder that holds what was looked for (and no hint where none does)."""
    outer = tmp_path / "download"
    (outer / "notes").mkdir(parents=True)  # a subfolder holding none of it is not named
    if what == "bert":
        shutil.copytree(GOOGLE_TINY, outer / "uncased_L-12_H-768_A-12")
        read, said = lambda d: weights.find_config(d), "uncased_L-12_H-768_A-12 holds bert_config.json: pass that"
    elif what == "glue":
        write(outer / "glue_data" / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n")
        read, said = lambda d: data.read_glue("rte", d, "train"), "glue_data holds RTE: pass that folder?"
    else:
        write(outer / "squad" / "train-v2.0.json", "{}")
        read, said = lambda d: squad.squad_path("2.0", "train", d), "squad holds train-v2.0.json: pass that folder?"
    e = raised(read, str(outer))
    assert_user_error(e, MissingFile, FileNotFoundError, f"{outer}{os.sep}{said}")
    assert "notes" not in str(e)
    e = raised(read, str(outer / "notes"))
    assert isinstance(e, MissingFile) and "pass that folder?" not in str(e)


@pytest.mark.parametrize("what", ["bert folder", "model.safetensors", "glue folder", "squad folder", "teacher folder"])
def test_what_this_user_cannot_read_is_said_so(tmp_path, monkeypatch, what):
    """Run as another user, an unreadable model.safetensors was "corrupt or incomplete (No such file ...)", an
    unreadable config.json or vocab.txt "cannot write ...: make it writable", an unreadable folder "not found".
    Now each is the PermissionError that train.py turns into "cannot read X: no permission". (The tests run as
    root, who reads everything: os.access is what says no here.)"""
    from runtime import disk_error
    from tasks import check_teacher
    tiny_model().bert.save_pretrained(tmp_path / "bert")
    write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n")
    write(tmp_path / "SQ" / "train-v2.0.json", "{}")
    target, read = {
        "bert folder": (tmp_path / "bert", lambda: weights.find_config(str(tmp_path / "bert"))),
        "model.safetensors": (tmp_path / "bert" / "model.safetensors",
                              lambda: weights.read_checkpoint(str(tmp_path / "bert"))),
        "glue folder": (tmp_path / "RTE", lambda: data.read_glue("rte", str(tmp_path / "RTE"), "train")),
        "squad folder": (tmp_path / "SQ", lambda: squad.squad_path("2.0", "train", str(tmp_path / "SQ"))),
        "teacher folder": (tmp_path / "bert", lambda: check_teacher(str(tmp_path / "bert"), "rte", 2)),
    }[what]
    deny(monkeypatch, target)
    if target.is_dir():  # a folder that cannot be listed: what is in it looks gone
        monkeypatch.setattr(os.path, "exists", lambda p: not os.fspath(p).startswith(str(target) + os.sep))
    e = raised(read)
    assert isinstance(e, PermissionError) and e.filename == str(target), repr(e)
    assert disk_error(e) == (f"cannot read {target}: no permission; give this user access to it, then run the "
                             f"same command again")


def test_a_write_without_permission_says_what_was_kept(tmp_path):
    """A file this user can read but not write (or a folder it cannot write in): the write message."""
    from runtime import disk_error
    e = PermissionError(13, "Permission denied", str(tmp_path / "results.json"))
    assert disk_error(e).startswith(f"cannot write {tmp_path / 'results.json'}: no permission; the finished stages "
                                    f"and the last checkpoint are kept (files are written beside, then renamed). "
                                    f"Make it writable, or use another --out, then run the same command again")


def test_a_full_disk_names_the_file_it_stopped_and_leaves_whole_log_lines(tmp_path, monkeypatch):
    """A full disk met by a plain write (a JSON file, a line of the log) raises an OSError that names no file:
    the error said "cannot write a file". written_beside names its file; the log names itself, and a line the
    disk took only part of is taken back, so that log.jsonl keeps one whole JSON record a line.
    (tools/disk_full.py meets a real full disk at every moment of a run.)"""
    import errno
    import json
    import runtime
    from common import written_beside
    with pytest.raises(OSError) as e:
        with written_beside(tmp_path / "results.json") as tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as f.write or f.close raise it
    assert e.value.filename == tmp and runtime.disk_error(e.value).startswith(f"cannot write {tmp}: the disk is full")

    class FullDisk:  # the log's file on a disk that takes 10 more bytes
        def __init__(self, f):
            self.f, self.room = f, 10

        def write(self, b):
            n = self.f.write(b[:self.room])
            self.room -= n
            if not n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return n

        def __getattr__(self, name):  # seek, truncate
            return getattr(self.f, name)
    path = tmp_path / "log.jsonl"
    log = runtime.Log(str(path))
    log({"stage": "teacher", "step": 1})
    log.file = FullDisk(log.file)
    for _ in range(2):  # a part of the line written, then none
        with pytest.raises(OSError) as e:
            log({"stage": "teacher", "step": 2, "loss": 0.5})
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
        assert [json.loads(line) for line in path.read_text().splitlines()] == [{"stage": "teacher", "step": 1}]


def test_a_full_download_cache_names_the_file_and_keeps_nothing_half_written(tmp_path, monkeypatch, glue):
    """A download cache on a full disk (a 40 MB tmpfs as $MOEBERT_CACHE, for real: all-minilm-l6-v2 stopped with
    "cannot write a file" and kept the disk full). A download said "could not download ...: [Errno 28] No space
    left on device; check the network"; an unpacked zip left what it had written. Now each stops with the disk's
    error naming the file or folder (train.py prints runtime.disk_error of it) and leaves nothing of it but the
    release's zip; with room again the same call completes."""
    import errno
    import io
    import zipfile
    import common
    from runtime import disk_error

    def full(*args):  # a write on a full disk: its error names no file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class FullFile(io.BytesIO):
        write = full

    def extract_one_then_full(self, path):
        self.extract(self.infolist()[0], path)
        full()

    def copy_some_then_full(src, dst):
        dst.write(src.read(10))
        full()
    site, cache = tmp_path / "site", tmp_path / "cache"
    site.mkdir()
    with zipfile.ZipFile(site / "RTE.zip", "w") as z:  # GLUE's layout
        for name in ("train.tsv", "dev.tsv", "test.tsv"):
            z.write(glue / "RTE" / name, f"RTE/{name}")
    with zipfile.ZipFile(site / "tiny.zip", "w") as z:  # Google's
        for name in os.listdir(GOOGLE_TINY):
            z.write(os.path.join(GOOGLE_TINY, name), f"tiny/{name}")
    monkeypatch.setenv("MOEBERT_CACHE", str(cache))
    with serve(site) as url:
        monkeypatch.setitem(data.GLUE_URLS, "rte", url + "/RTE.zip")
        monkeypatch.setitem(weights.RELEASES, "bert-tiny-test", (url + "/tiny.zip", True))
        with monkeypatch.context() as m:
            m.setattr(common, "open", lambda *args: FullFile(), raising=False)
            e = raised(data.glue_dir, "rte")
        partial = str(cache / "glue" / "RTE.zip.partial")
        assert type(e) is OSError and e.filename == partial, repr(e)
        assert disk_error(e).startswith(f"cannot write {partial}: the disk is full; ")
        with monkeypatch.context() as m:
            m.setattr(zipfile.ZipFile, "extractall", extract_one_then_full)
            e = raised(data.glue_dir, "rte")
        assert e.errno == errno.ENOSPC and e.filename == str(cache / "glue" / "RTE.partial")
        shutil.copy(site / "tiny.zip", cache / "bert-tiny-test.zip")  # downloaded (the server copies with shutil too)
        with monkeypatch.context() as m:
            m.setattr(shutil, "copyfileobj", copy_some_then_full)
            e = raised(weights.resolve_pretrained, "bert-tiny-test")
        assert e.errno == errno.ENOSPC and e.filename.startswith(str(cache / "bert-tiny-test.partial" / ""))
        assert sorted(os.listdir(cache)) == ["bert-tiny-test.zip", "glue"] and os.listdir(cache / "glue") == []
        assert sorted(os.listdir(data.glue_dir("rte"))) == ["dev.tsv", "test.tsv", "train.tsv"]
        folder = weights.resolve_pretrained("bert-tiny-test")
    assert sorted(os.listdir(folder)) == sorted(os.listdir(GOOGLE_TINY))


def test_a_download_cache_without_permission_says_to_set_moebert_cache(tmp_path, monkeypatch):
    """A cache this user cannot write (another user's, on a shared machine): it said "use another --out", which
    does not move the cache."""
    from runtime import disk_error
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    e = PermissionError(13, "Permission denied", str(tmp_path / "cache" / "all-minilm-l6-v2.partial"))
    assert disk_error(e).endswith("Make it writable, or set MOEBERT_CACHE to a folder you can write to (the download "
                                  "cache), then run the same command again to go on")
    e = PermissionError(13, "Permission denied", str(tmp_path / "cache-of-mine" / "x"))  # beside the cache: --out
    assert "use another --out" in disk_error(e)
