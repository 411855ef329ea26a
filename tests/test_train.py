"""train.py end to end, on tiny models and generated tasks on CPU: the five stages, reruns and resumes
(killed, stopped by a signal, several processes under torchrun), user errors that exit 2, --predict,
the README's snippet, bf16, SQuAD and the shallow student's pipelines; and the pieces of train.py and
runtime.py that the pipeline leans on (weight decay, allocator settings, the process group)."""
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

import common
import data
import moebert
import runtime
import shallow
import squad
import tasks
from bert import BertConfig, BertForQuestionAnswering, BertForSequenceClassification, BertModel
from moebert import MoEConfig, moebert_from_dense

from helpers import (DEVICES, GOOGLE_TINY, ROOT, TINY, TINY4, assert_close, children, fixture_json, free_port,
                     readme_snippet, tiny_model, write_json)


# ----------------------------------------------------------------------------------------------
# train.py's weight decay and runtime.py's allocator settings


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
    assert runtime.keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


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


def test_eval_only_takes_the_recorded_settings(tiny_run, monkeypatch):
    """--eval-only with nothing but the task and the folder: the settings come from OUT/run.json (the
    data folder, the BERT, the lengths...), nothing is downloaded, and the results are the run's. A flag
    given again wins over the record."""
    train = tiny_run["train"]
    def no_download(*a, **k):
        raise AssertionError("--eval-only must not fetch a pretrained BERT")
    monkeypatch.setattr(train, "resolve_pretrained", no_download)
    monkeypatch.setattr(common, "download", no_download)
    base = ["--task", "rte", "--out", str(tiny_run["out"]), "--device", "cpu", "--eval-only"]
    only = train.main(base)
    assert only["moebert"] == tiny_run["results"]["moebert"] and only["teacher"] == tiny_run["results"]["teacher"]
    recorded = json.loads((tiny_run["out"] / "run.json").read_text())["args"]
    assert recorded["data_dir"] == tiny_run["args"][tiny_run["args"].index("--data-dir") + 1]
    assert recorded["recipe"] == "small" and recorded["lr"] == 2e-3  # the tiny BERT is narrow; --lr given
    fewer = train.main(base + ["--max-eval-examples", "8"])
    assert fewer["config"]["max_eval_examples"] == 8 and fewer["config"]["data_dir"] == recorded["data_dir"]
    # The training command again, its BERT by name where the record holds the folder: nothing is fetched.
    assert train.main(base + ["--bert", "all-minilm-l6-v2", "--recipe", "auto"])["moebert"] == only["moebert"]
    # No training split needed: it is neither read nor tokenized.
    dev_only = shutil.copytree(recorded["data_dir"], tiny_run["root"] / "RTE-dev-only")
    os.remove(dev_only / "train.tsv")
    assert train.main(base + ["--data-dir", str(dev_only)])["moebert"] == only["moebert"]


@pytest.mark.parametrize("key,value", [("max_seq_length", "x"), ("route", "nope"), ("lr", [1]), ("seed", -1)])
def test_eval_only_refuses_a_recorded_setting_its_flag_would_not_take(tiny_run, tmp_path, key, value):
    """run.json recording a value that its flag refuses: --eval-only names the file and the flag, as
    argparse would (not a TypeError deep in the run), and changes nothing; the flag given again wins."""
    train = tiny_run["train"]
    out = tmp_path / "out"
    shutil.copytree(tiny_run["out"], out)
    run = json.loads((out / "run.json").read_text())
    kept, run["args"][key] = run["args"][key], value
    write_json(out / "run.json", run)
    before, flag = snapshot(out), "--" + key.replace("_", "-")
    base = ["--task", "rte", "--out", str(out), "--device", "cpu", "--eval-only"]
    with pytest.raises(common.UserError, match=re.escape(f"run.json records {value!r} for {flag}, which it does not take")):
        train.main(base)
    assert snapshot(out) == before
    assert train.main(base + [flag, str(kept)])["moebert"] == tiny_run["results"]["moebert"]


@pytest.mark.parametrize("flag,value,phrase", [("--route", "gate-token", "with --route hash-random (run.json), not gate-token"),
                                             ("--seed", "3", "with --seed 0 (run.json), not 3"),
                                             ("--expert-dim", "12", "with --expert-dim 11 (run.json), not 12")])
def test_eval_only_refuses_a_flag_that_made_the_models(tiny_run, tmp_path, flag, value, phrase):
    """--eval-only evaluates the models OUT holds: a flag that made them, given with another value, is refused
    (it would change the record alone); given with its value it is taken, as an evaluation flag is, and
    run.json, the record of what trained the models, is not rewritten."""
    train = tiny_run["train"]
    out = tmp_path / "out"
    shutil.copytree(tiny_run["out"], out)
    base = ["--task", "rte", "--out", str(out), "--device", "cpu", "--eval-only"]
    before, record = snapshot(out), (out / "run.json").read_bytes()
    with pytest.raises(common.UserError, match=re.escape(phrase)):
        train.main(base + [flag, value])
    assert snapshot(out) == before
    same = str(json.loads(record)["args"][flag[2:].replace("-", "_")])
    assert train.main(base + [flag, same, "--max-eval-examples", "8"])["config"]["max_eval_examples"] == 8
    assert (out / "run.json").read_bytes() == record


@pytest.mark.parametrize("change,diff", [(["--seed", "3"], "seed: 0 there, 3 now"),
                                         (["--route", "gate-token"], "moe.route: 'hash-random' there, 'gate-token' now)"),
                                         (["--distill-lr", "1e-3"], "lr: 0.0002 there, 0.001 now")])
def test_a_rerun_with_other_settings_is_refused_before_it_writes(tiny_run, tmp_path, change, diff):
    """Settings other than a finished stage's are refused at set-up, before run.json is written: it still
    records what made the models (a later --eval-only reads it), and every other file is as it was."""
    train = tiny_run["train"]
    out = tmp_path / "out"
    shutil.copytree(tiny_run["out"], out)
    before, record = snapshot(out), (out / "run.json").read_bytes()
    with pytest.raises(common.UserError, match=re.escape(f"was made with other settings ({diff}")):
        train.main(tiny_run["args"] + ["--out", str(out)] + change)
    assert snapshot(out) == before and (out / "run.json").read_bytes() == record


def test_recipe_follows_the_width_of_the_model():
    """--recipe auto: BERT's teacher recipe from BERT-base's width up, the small one below; a flag given wins."""
    import train
    def settled(argv, hidden):
        args, _ = train.get_args(argv)
        train.settle(args, hidden)
        return args.recipe, args.lr, args.teacher_epochs, args.batch_size
    assert settled(["--task", "rte"], 768) == ("bert", 2e-5, 3.0, 32)
    assert settled(["--task", "rte"], 1024) == ("bert", 2e-5, 3.0, 32)
    assert settled(["--task", "rte"], 384) == ("small", 1e-4, 5.0, 32)
    assert settled(["--task", "squad"], 768) == ("bert", 3e-5, 2.0, 12)
    assert settled(["--task", "rte", "--recipe", "bert"], 384) == ("bert", 2e-5, 3.0, 32)
    assert settled(["--task", "rte", "--lr", "3e-5", "--epochs", "2"], 384) == ("small", 3e-5, 2.0, 32)
    assert settled(["--task", "mrpc", "--teacher-epochs", "4"], 384)[2] == 4.0


def test_dtype_follows_the_device(monkeypatch):
    """--dtype's default: bf16 on GPUs with bf16 tensor cores (compute capability 8 and up), fp32 on older
    GPUs and the CPU; a --dtype given wins. The GPU's capability is torch's answer, faked here."""
    import train
    def settled(argv, device, capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
        args, _ = train.get_args(["--task", "rte"] + argv)
        args.device = device  # after get_args, which would refuse a GPU this machine has not
        train.settle(args, 384)
        return args.dtype
    assert [settled([], "cuda", c) for c in ((7, 0), (7, 5), (8, 0), (8, 9), (9, 0), (10, 0))] == \
        ["fp32", "fp32", "bf16", "bf16", "bf16", "bf16"]
    assert settled([], "cuda:1", (8, 6)) == "bf16" and settled([], "cpu", (9, 0)) == "fp32"
    assert settled(["--dtype", "bf16"], "cuda", (7, 5)) == "bf16" and settled(["--dtype", "fp32"], "cuda", (9, 0)) == "fp32"
    assert settled(["--dtype", "bf16"], "cpu", None) == "bf16"


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
    with pytest.raises(common.UserError, match="moebert is a MoEBERT .* not a dense teacher; pass the teacher folder"):
        run(tiny_run["out"] / "moebert")  # a run's student, passed for its teacher
    with pytest.raises(common.UserError, match="config.json names no num_labels, so it is no fine-tuned classifier"):
        run(tiny_run["root"] / "bert")  # the pretrained BERT, passed for a teacher
    qa = tmp_path / "teacher_qa"
    BertForQuestionAnswering(BertConfig(**TINY)).save_pretrained(qa)
    shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), qa)
    with pytest.raises(common.UserError, match="teacher_qa is a question-answering model; rte needs a classifier"):
        run(qa)
    (short / "vocab.txt").write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(common.UserError, match=r"vocab.txt, line 2: not UTF-8 text \(byte 0xff"):
        run(short)
    wnli = shutil.copytree(tiny_run["out"] / "teacher", tmp_path / "teacher_wnli")  # two labels, as RTE's
    write_json(wnli / "settings.json", dict(json.loads((wnli / "settings.json").read_text()), task="wnli"))
    with pytest.raises(common.UserError, match="teacher_wnli was fine-tuned on wnli .its settings.json., not rte"):
        run(wnli)
    assert not (tmp_path / "o").exists()


def test_a_vocabulary_larger_than_the_models_embeddings_is_refused(tiny_run, tmp_path):
    """A --bert folder whose vocab.txt is another model's: its ids would index past the embedding table."""
    train, args = tiny_run["train"], tiny_run["args"]
    shutil.copytree(tiny_run["root"] / "bert", tmp_path / "bert")
    with open(tmp_path / "bert" / "vocab.txt", "a") as f:
        f.write("".join(f"extra{i}\n" for i in range(50)))
    with pytest.raises(common.UserError, match="vocab.txt has 149 tokens, the model's embeddings 99"):
        train.main(args + ["--bert", str(tmp_path / "bert"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("device,phrase", [
    ("tpu", r"--device 'tpu' is not a device; use cpu, cuda or cuda:N"),
    ("mps", r"--device mps: this code runs on cpu or cuda"),
    ("cuda:99", r"--device cuda:99: " + (r"this machine has \d GPU" if torch.cuda.is_available() else r".*; use --device cpu"))])
def test_a_device_this_machine_lacks_is_refused_before_any_work(tmp_path, device, phrase):
    import train
    with pytest.raises(common.UserError, match=phrase):
        train.main(["--task", "rte", "--device", device, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


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


@pytest.fixture(scope="module")
def never_stopped(tmp_path_factory):
    """The reference: a tiny run that nothing interrupts."""
    import train
    root = tmp_path_factory.mktemp("resume")
    args = tiny_task(root)
    results = train.main(args + ["--out", str(root / "ref")])
    return dict(root=root, args=args, results=results, ref=root / "ref")


def stop_midway(cmd, stage_dir, sig, timeout=120, env=None, every=False):
    """Start `cmd`, wait for the stage's first checkpoint, send `sig` (with every, to its child processes too,
    as a job scheduler does to a job's every process); (return code, output)."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    ckpt = stage_dir.parent / (stage_dir.name + ".partial") / "checkpoint.safetensors"
    t0 = time.time()
    while not ckpt.exists():
        assert p.poll() is None, f"ended before its first checkpoint:\n{p.communicate()[0]}"
        assert time.time() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.001)
    for pid in [p.pid] + (children(p.pid) if every else []):
        os.kill(pid, sig)
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
def test_stopped_run_resumes_bitwise(never_stopped, tmp_path, stage, sig, capsys):
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
    capsys.readouterr()
    results = train.main(args)
    said = capsys.readouterr().out
    assert "resumed" in (out / "log.jsonl").read_text()
    assert "continues from its checkpoint" in said and "initialised fresh" not in said, said  # nothing alarming
    for s in ("teacher", "moebert"):
        assert_same_weights(out / s / "model.safetensors", never_stopped["ref"] / s / "model.safetensors")
        assert json.loads((out / s / "metrics.json").read_text()) == json.loads(
            (never_stopped["ref"] / s / "metrics.json").read_text())
    assert results["teacher"] == never_stopped["results"]["teacher"]
    assert results["moebert"] == never_stopped["results"]["moebert"]
    assert not (out / stage / "checkpoint.safetensors").exists()  # a finished stage keeps its best model only


def test_a_signal_and_its_copy_stop_once_a_later_one_at_once(monkeypatch):
    """runtime.deferred_signals: SIGTERM twice in a moment (Slurm's to every process, and torchrun's copy) asks
    for one stop at the step's end; a second signal later than COPY_S stops at once; the old handlers come back."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with runtime.deferred_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handlers run in between
        assert stop == [signal.SIGTERM]
        monkeypatch.setattr(runtime, "COPY_S", 0.0)  # what comes next is later than the copies' moment
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert {s: signal.getsignal(s) for s in before} == before


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


@pytest.mark.parametrize("damage", ["model cut in half", "config gone"])
def test_a_damaged_best_model_beside_a_checkpoint_is_refused_before_training_goes_on(never_stopped, tmp_path, damage):
    """A stage stopped after its first epoch keeps its best model so far beside its checkpoint; the stage
    publishes it unless a later epoch beats it. Damaged, it is refused at the resume, before any step and
    with the checkpoint kept (it was published, and the checkpoint removed, then the report failed on it)."""
    import train
    out = tmp_path / "out"
    args = never_stopped["args"] + ["--out", str(out)]
    partial = out / "moebert.partial"

    def best_saved():  # a checkpoint that records a best model: its header, read through one open file, as the
        try:  # run renames the next checkpoint over it (safe_open opens the path twice: header and tensors)
            with open(partial / "checkpoint.safetensors", "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except FileNotFoundError:
            return False
        return json.loads(header["__metadata__"]["state"])["best"] is not None
    p = subprocess.Popen([sys.executable, TRAIN, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not best_saved():
        assert p.poll() is None, "the run ended before distillation's first epoch"
        time.sleep(0.001)
    p.kill()
    p.wait()
    assert not (out / "moebert").exists(), "distillation finished before the kill"
    if damage == "model cut in half":
        cut_in_half(partial / "model.safetensors")
    else:
        os.remove(partial / "config.json")
    before = snapshot(out)
    with pytest.raises(common.UserError, match="moebert.partial holds the best model of this stage so far"):
        train.main(args)
    assert snapshot(out) == before


def test_non_finite_loss_stops_with_a_clear_error(never_stopped, tmp_path):
    """A learning rate that diverges: exit 2 at the first non-finite loss, one error line, the last
    checkpoint and the finished teacher untouched."""
    out = tmp_path / "out"
    teacher = never_stopped["ref"] / "teacher"
    before = {f: (teacher / f).read_bytes() for f in os.listdir(teacher)}
    cmd = [sys.executable, TRAIN, *never_stopped["args"], "--out", str(out), "--teacher", str(teacher),
           "--distill-lr", "1e30", "--save-every", "1"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
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
    """What a user can fix: `error: ...` and exit 2, no traceback, and no out/rte left behind."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    p = subprocess.run([sys.executable, TRAIN, "--task", "rte", "--bert", str(tmp_path), "--data-dir",
                        str(tmp_path / "nowhere")], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    assert os.listdir(cwd) == []


def test_a_failed_start_leaves_nothing_behind(never_stopped, tmp_path):
    """A run that fails before any stage has finished or checkpointed removes the --out it made (here:
    the teacher stage had begun, its settings written, when the BERT turned out not to fit its config);
    an --out that was there before keeps everything it held."""
    import train
    bad = tmp_path / "bert"
    shutil.copytree(never_stopped["root"] / "bert", bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(config, intermediate_size=38)))
    args = never_stopped["args"] + ["--bert", str(bad)]
    with pytest.raises(common.UserError, match="does not fit the model"):
        train.main(args + ["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(common.UserError, match="does not fit the model"):
        train.main(args + ["--out", str(tmp_path / "kept")])
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"


def test_each_stage_says_its_steps_and_progress_comes_with_the_runs_eta(tmp_path, capsys, monkeypatch):
    """A line at each training stage's start (epochs, steps, batch, lr); between the logged steps a
    progress line every runtime.PROGRESS_EVERY seconds (0 here: every step), with the stage's and the
    whole run's time left; the log records both ETAs, the run's never below the stage's; the later
    stages' work that the run's ETA adds."""
    import train
    monkeypatch.setattr(runtime, "PROGRESS_EVERY", 0.0)
    args = tiny_task(tmp_path) + ["--out", str(tmp_path / "out"), "--epochs", "2"]
    args[args.index("--log-every") + 1] = "5"
    train.main(args)
    said = capsys.readouterr().out
    assert "teacher: 2 epochs of 12 steps (24 steps at batch 8, lr 0.002), dev after each epoch" in said
    assert "distill: 2 epochs of 6 steps (12 steps at batch 16, lr 0.0002), dev after each epoch" in said
    lines = re.findall(r"teacher: step (\d+)/24, loss [\d.]+, [\d.]+ examples/s, stage (\d+)s left, run ~(\d+) min left", said)
    assert [int(l[0]) for l in lines] == [s for s in range(1, 24) if s % 5], said  # the others (and the last) are logged
    assert re.search(r"distill: step 1/12, loss .* run ~\d+ min left", said)
    records = [r for r in read_log(tmp_path / "out") if "eta_s" in r]
    assert {r["stage"] for r in records} == {"teacher", "distill"}
    assert all(r["run_eta_s"] >= r["eta_s"] for r in records)
    assert records[-1]["stage"] == "distill" and records[-1]["eta_s"] == 0
    # The work the run's ETA counts, in teacher training examples: 96 training and 32 dev examples;
    # with --force every stage is still to run, once finished only the evaluation.
    def plan(extra):
        argv = args + extra
        parsed, given = train.get_args(argv)
        return train.later_work(train.setup(parsed, given, torch.device("cpu")))
    assert plan(["--force"]) == pytest.approx({"teacher": 2 * 96 + 2 * 32 / 3, "importance": 0.3 * 96,
                                               "distill": 2 * 96 + 2 * 32 / 3, "eval": 2 * 32 / 3})
    assert plan([]) == {"teacher": 0, "importance": 0, "distill": 0, "eval": 2 * 32 / 3}


def test_modules_import_from_any_directory(tmp_path):
    """pip install -e . (requirements-dev.txt does it) makes the README's snippet work outside the repository."""
    modules = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and f != "bench.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", f"import {', '.join(modules)}; print(moebert.__file__)"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert os.path.dirname(p.stdout.strip()) == ROOT


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
    p = subprocess.run(TORCHRUN + [*args, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
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


@pytest.mark.parametrize("eval_only", [False, True])
@pytest.mark.parametrize("blocked,phrase", [
    ("predictions/moebert/RTE.tsv", "predictions/moebert/RTE.tsv is a folder, where --predict writes a file"),
    ("predictions/teacher/RTE.tsv", "predictions/teacher/RTE.tsv is a folder, where --predict writes a file"),
    ("predictions/teacher", "predictions/teacher is a file, where --predict writes a folder"),
    ("predictions", "predictions is a file, where --predict writes a folder"),
])
def test_predict_into_something_in_the_way_is_refused_before_anything_is_written(never_stopped, tmp_path, blocked,
                                                                                  phrase, eval_only):
    """A folder where a prediction file goes, or a file where their folder goes: refused at the start, so
    results.json is not rewritten first (nor a stage trained, on a new run) and nothing is left beside."""
    import train
    out = tmp_path / "out"
    shutil.copytree(never_stopped["ref"], out)
    shutil.rmtree(out / "predictions", ignore_errors=True)
    path = out / blocked
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if blocked.endswith(".tsv") else path.write_text("mine")
    before = snapshot(out)
    with pytest.raises(common.UserError, match=re.escape(phrase)):
        train.main(never_stopped["args"] + ["--out", str(out), "--predict"] + (["--eval-only"] if eval_only else []))
    assert snapshot(out) == before


# ----------------------------------------------------------------------------------------------
# The README snippet: load a finished MoEBERT and classify a sentence pair

def test_readme_snippet_classifies_with_a_saved_moebert(tmp_path, capsys):
    torch.manual_seed(0)
    teacher = tiny_model(num_labels=2)
    moe = moebert.moebert_from_dense(teacher, torch.rand(3, 37), moebert.MoEConfig(num_experts=3, expert_dim=11,
                                                                                     shared_dim=5)).eval()
    folder = tmp_path / "rte" / "moebert"
    moe.save_pretrained(folder)
    shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), folder / "vocab.txt")  # as train.py does
    code = readme_snippet("out/rte/moebert", folder)

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
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out == first + "\n"
    # The same head negated picks the other label: the printed label does come from the saved model.
    with torch.no_grad():
        moe.classifier.weight.neg_()
        moe.classifier.bias.neg_()
    moe.save_pretrained(folder)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed == expected() + "\n" and expected() != first


# ----------------------------------------------------------------------------------------------
# train.py end to end with --dtype bf16


def is_finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


@pytest.mark.parametrize("device", DEVICES)
def test_pipeline_in_bf16(tmp_path, device):
    """The tiny pipeline of tiny_run (above) in bf16 autocast: all five stages, finite losses
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
# train.py --task squad|squad2 (the SQuAD fixture of helpers.fixture_json)


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
    # --eval-only reads no training file: the same results with the dev file alone.
    os.remove(root / "SQuAD" / train_name)
    again = train.main(["--task", task, "--out", str(out), "--device", "cpu", "--eval-only"])
    assert (again["teacher"], again["moebert"]) == (results["teacher"], results["moebert"])
    # A classifier is not a SQuAD teacher, and SQuAD has no public test set for --predict.
    classifier = root / "classifier"
    tiny_model(num_labels=2).save_pretrained(classifier)
    shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), classifier)
    with pytest.raises(common.UserError, match="not a question-answering model"):
        tasks.check_teacher(str(classifier), task, None)
    with pytest.raises(common.UserError, match="--predict writes GLUE"):
        train.main(["--task", task, "--predict", "--out", str(root / "p")])


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
    # --eval-only with the same teacher spelled another way: taken; another teacher: refused.
    again = ["--task", moved[moved.index("--task") + 1], "--out", str(moe_out), "--device", "cpu", "--eval-only"]
    assert train.main(again + ["--teacher", os.path.relpath(out / "teacher")])["teacher"] == results["teacher"]
    with pytest.raises(common.UserError, match="as they were trained, with --teacher"):
        train.main(again + ["--teacher", str(moe_out / "moebert")])
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


# ----------------------------------------------------------------------------------------------
# torchrun: two processes stopped and resumed; the process group's end (runtime.py)


@pytest.mark.parametrize("every", [False, True], ids=["to torchrun", "to every process"])
def test_two_processes_stopped_and_resumed_bitwise(tmp_path, every):
    """torchrun with 2 gloo processes, dropout on: SIGTERM inside distillation, to torchrun, which passes it on,
    or to every process, as Slurm at a time limit or preemption (each worker then gets it twice, from there and
    from torchrun: still one stop, not the second signal's stop at once); both processes stop at the same step
    and the master writes every process's RNG state. Then the same command again: bitwise the weights of a
    2-process run never stopped."""
    args = tiny_task(tmp_path) + ["--epochs", "6"]
    run_torchrun(args, tmp_path / "ref")
    code, text = stop_midway(TORCHRUN + [*args, "--out", str(tmp_path / "out")], tmp_path / "out" / "moebert",
                             signal.SIGTERM, env=torchrun_env(), every=every)
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
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    before, during, after = json.loads(p.stdout.splitlines()[-1])
    assert len(during) > len(before), (before, during)  # the group's threads ran
    assert after == before, f"threads left running after destroy_process_group: {after} (before init: {before})"


# ----------------------------------------------------------------------------------------------
# Bad input to train.py: flags, the output folder, damaged stage files, two runs at once. Each is an
# `error:` (argparse's, or a UserError that __main__ prints as one line, exit 2) before any damage.

BAD_FLAGS = [("--batch-size", "0"), ("--distill-batch-size", "-4"), ("--eval-batch-size", "0"), ("--save-every", "0"),
             ("--log-every", "0"), ("--epochs", "0"), ("--teacher-epochs", "-1"), ("--distill-epochs", "inf"),
             ("--lr", "0"), ("--lr", "nan"), ("--distill-lr", "-0.00001"), ("--lr", "fast"), ("--warmup", "-0.1"),
             ("--warmup", "1.5"), ("--distill-lambda", "-1"), ("--seed", "-1"), ("--seed", str(2**32)),
             ("--seed", "1.5"), ("--max-seq-length", "0"), ("--doc-stride", "0"), ("--max-query-length", "0"),
             ("--num-experts", "0"), ("--expert-dim", "0"), ("--shared-dim", "-1"), ("--expert-dropout", "1"),
             ("--expert-dropout", "-0.5"), ("--max-train-examples", "0"), ("--max-eval-examples", "0"),
             ("--weight-decay", "-0.01"), ("--distill-weight-decay", "nan"), ("--balance-weight", "-1")]


@pytest.mark.parametrize("flag,value", BAD_FLAGS)
def test_bad_flags_stop_before_any_work(flag, value, capsys, tmp_path):
    import train
    with pytest.raises(SystemExit) as e:
        train.main(["--task", "rte", "--out", str(tmp_path / "out"), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: argument {flag}: {value!r} is not " in err, err
    assert not (tmp_path / "out").exists()


def test_bad_flag_in_a_real_process_is_one_error_line(tmp_path):
    p = subprocess.run([sys.executable, TRAIN, "--task", "squad", "--doc-stride", "0"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "train.py: error: argument --doc-stride: '0' is not a whole number of at least 1" \
        in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra,phrase", [
    (["--max-seq-length", "65"], "--max-seq-length 65 must be between 5 and 64, the longest sequence the model's "
                                 "position table covers"),
    (["--max-seq-length", "4"], "--max-seq-length 4 must be between 5 and 64"),
    (["--expert-dim", "38"], "expert_dim 38 exceeds the FFN's 37 neurons"),
    (["--expert-dim", "11", "--shared-dim", "12"], "shared_dim 12 must be between 0 and expert_dim 11"),
    (["--num-experts", "9", "--expert-dim", "11", "--shared-dim", "5"], "too few neurons"),
    (["--num-experts", "40"], "expert_dim must be at least 1, got 0"),  # the default, 37 // 40: experts of nothing
])
def test_settings_that_do_not_fit_the_model_stop_before_stage_1(never_stopped, tmp_path, extra, phrase):
    import train
    args = [a for a in never_stopped["args"]]
    for flag in ("--expert-dim", "--shared-dim", "--num-experts"):  # tiny_task's MoE sizes out of the way
        i = args.index(flag)
        del args[i:i + 2]
    with pytest.raises(common.UserError, match=re.escape(phrase)):
        train.main(args + extra + ["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_squad_length_must_leave_room_for_the_context(tmp_path):
    import train
    args, _ = train.get_args(["--task", "squad", "--max-seq-length", "60", "--max-query-length", "64"])
    train.settle(args, 384, 512)
    with pytest.raises(common.UserError, match=r"--max-seq-length 60 must be between 68 \(--max-query-length 64"):
        tasks.check_lengths(args, 512)


def edit_tensors(path, fn):
    """Rewrite a safetensors file with each tensor t named k replaced by fn(k, t)."""
    safetensors.torch.save_file({k: fn(k, t) for k, t in load_file(path).items()}, path)


def snapshot(folder):
    """Every file under folder -> its bytes, but for what each run writes: the lock, the log, and
    run.json, the record of the last command (a damaged one stops the run before it is written)."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files if f not in ("run.lock", "log.jsonl", "run.json")}


@pytest.mark.parametrize("damage,phrase", [
    (lambda o: os.remove(o / "teacher" / "settings.json"), "teacher holds a stage's work but no settings.json"),
    (lambda o: (o / "teacher" / "settings.json").write_text("{\"task\": "), "teacher/settings.json is damaged"),
    (lambda o: (o / "moebert" / "settings.json").write_bytes(b"\xff\xfe"), "moebert/settings.json is damaged"),
    (lambda o: (o / "run.json").write_text("[1, 2"), "run.json is damaged"),
    (lambda o: (o / "results.json").write_text(""), "results.json is damaged"),
    (lambda o: (o / "teacher" / "config.json").write_text("{"), "teacher/config.json is not valid JSON"),
    (lambda o: (o / "moebert" / "config.json").write_text("{"), "moebert/config.json is not valid JSON"),
    (lambda o: (o / "importance" / "importance.safetensors").write_bytes(b"\x00" * 9),
     "importance.safetensors is missing or damaged"),
    (lambda o: os.remove(o / "importance" / "importance.safetensors"), "importance.safetensors is missing or damaged"),
    (lambda o: (o / "teacher" / "model.safetensors").write_bytes(b"cut"), "teacher/model.safetensors is corrupt"),
    (lambda o: shutil.rmtree(o / "teacher"), "importance was built from"),
    (lambda o: shutil.rmtree(o / "importance"), "moebert was built from"),
    # Valid JSON, safetensors of the wrong content, files where folders go: each named, no traceback.
    (lambda o: (o / "teacher" / "settings.json").write_text("[1]"), "teacher/settings.json is damaged (it holds no JSON"),
    (lambda o: (o / "results.json").write_text("[]"), "results.json is damaged (it holds no JSON object)"),
    (lambda o: (o / "run.json").write_text('{"task": "rte", "args": []}'), "run.json is damaged (no task, or args"),
    (lambda o: edit_tensors(o / "importance" / "importance.safetensors", lambda k, t: t[:, :3].contiguous()),
     "importance.safetensors holds scores of shape (3, 3), the teacher has (3, 37)"),
    (lambda o: edit_tensors(o / "importance" / "importance.safetensors", lambda k, t: t * float("nan")),
     "importance.safetensors holds non-finite scores"),
    (lambda o: edit_tensors(o / "moebert" / "model.safetensors", lambda k, t: t + 3 if k.endswith("hash_table") else t),
     "moebert: bert.encoder.layer.0.moe.hash_table sends tokens to experts outside 0 .. 2"),
    (lambda o: edit_tensors(o / "moebert" / "model.safetensors", lambda k, t: t[:1] if k == "classifier.weight" else t),
     "the weights do not fit its config.json:\n  wrong shape (1): classifier.weight: checkpoint (1, 32) vs model (2, 32)"),
    (lambda o: edit_tensors(o / "teacher" / "model.safetensors", lambda k, t: t / 0 if k == "classifier.bias" else t),
     "teacher holds NaN or infinite values in classifier.bias: the file is damaged"),
    (lambda o: edit_tensors(o / "moebert" / "model.safetensors", lambda k, t: t * float("nan") if "value" in k else t),
     "moebert holds NaN or infinite values in bert.encoder.layer.0.attention.self.value.bias, "
     "bert.encoder.layer.0.attention.self.value.weight, bert.encoder.layer.1.attention.self.value.bias and 3 more"),
    (lambda o: (shutil.rmtree(o / "moebert"), (o / "moebert").write_text("x")), "moebert is a file, where this run keeps"),
    (lambda o: (o / "moebert.partial").write_text("x"), "moebert.partial is a file, where this run keeps"),
    # A folder where a file goes, and a vocabulary copy cut short or edited (it would load, into other ids).
    (lambda o: (os.remove(o / "results.json"), (o / "results.json").mkdir()), "results.json is a folder, where this run"),
    (lambda o: (os.remove(o / "log.jsonl"), (o / "log.jsonl").mkdir()), "log.jsonl is a folder, where this run"),
    (lambda o: (os.remove(o / "teacher" / "config.json"), (o / "teacher" / "config.json").mkdir()),
     "teacher/config.json is a folder, where this run"),
    (lambda o: (os.remove(o / "moebert" / "model.safetensors"), (o / "moebert" / "model.safetensors").mkdir()),
     "moebert/model.safetensors is corrupt or incomplete"),
    (lambda o: cut_in_half(o / "teacher" / "vocab.txt"), "moebert/vocab.txt differ, where one was copied from the other"),
    (lambda o: (o / "moebert" / "vocab.txt").write_text((o / "moebert" / "vocab.txt").read_text().replace("the", "a")),
     "moebert/vocab.txt differ, where one was copied from the other"),
])
def test_damaged_or_missing_stage_files_are_named_and_nothing_is_redone(never_stopped, tmp_path, damage, phrase):
    """A finished run with one file damaged or gone: the same command stops with an error that names
    it, and every other file stays as it was (no stage silently redone over the ones built from it)."""
    import train
    out = tmp_path / "out"
    shutil.copytree(never_stopped["ref"], out)
    damage(out)
    before = snapshot(out)
    with pytest.raises(common.UserError, match=re.escape(phrase)):
        train.main(never_stopped["args"] + ["--out", str(out)])
    assert snapshot(out) == before


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_eval_only_refuses_a_damaged_vocabulary_and_takes_a_missing_copy(never_stopped, tmp_path):
    """--eval-only tokenizes with the teacher's vocab.txt: cut short, it still loads and would score other
    ids, so it is refused against the MoEBERT's copy. A MoEBERT saved without a copy (runs before the
    copy was kept) is evaluated as before: the same scores as the finished run's."""
    import train
    out = tmp_path / "out"
    shutil.copytree(never_stopped["ref"], out)
    cut_in_half(out / "teacher" / "vocab.txt")
    before = snapshot(out)
    with pytest.raises(common.UserError, match=re.escape(f"{out}/teacher/vocab.txt and {out}/moebert/vocab.txt differ")):
        train.main(never_stopped["args"] + ["--out", str(out), "--eval-only"])
    assert snapshot(out) == before
    shutil.copy(never_stopped["ref"] / "teacher" / "vocab.txt", out / "teacher")
    os.remove(out / "moebert" / "vocab.txt")
    results = train.main(never_stopped["args"] + ["--out", str(out), "--eval-only"])
    assert {k: results[k] for k in ("teacher", "moebert")} == \
        {k: never_stopped["results"][k] for k in ("teacher", "moebert")}


def test_force_names_a_file_where_a_stage_folder_goes_before_redoing_anything(never_stopped, tmp_path):
    """--force redoes every stage, and the last step of each is a rename onto its folder: a file there
    is named at the start, not after the stages before it were redone."""
    import train
    out = tmp_path / "out"
    shutil.copytree(never_stopped["ref"], out)
    shutil.rmtree(out / "moebert")
    (out / "moebert").write_text("mine")
    before = snapshot(out)
    with pytest.raises(common.UserError, match="moebert is a file, where this run keeps a stage's folder"):
        train.main(never_stopped["args"] + ["--out", str(out), "--force"])
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_out_folder_that_cannot_be_written(tmp_path, where, monkeypatch):
    import train
    (tmp_path / "file").write_text("mine")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "out", "read-only": tmp_path / "ro"}[where]
    if where == "read-only":  # as root every permission bit is ignored: what a read-only folder answers
        (tmp_path / "ro").mkdir()
        monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(tmp_path / "ro")))
    phrase = "cannot write in" if where == "read-only" else "is a file, not a folder"
    with pytest.raises(common.UserError, match=phrase):
        train.main(["--task", "rte", "--out", str(out), "--device", "cpu"])
    assert (tmp_path / "file").read_text() == "mine"


def test_a_full_disk_keeps_the_last_checkpoint_and_says_the_command_resumes(never_stopped, tmp_path, monkeypatch):
    """A full disk as safetensors meets it: the file comes out short, and nothing is raised. The short
    checkpoint is caught before it replaces the last one; the run stops with an error that says what
    was kept; with space again the same command resumes and ends as a run never stopped."""
    import train
    out, save_file, kept = tmp_path / "out", safetensors.torch.save_file, []

    def disk_fills(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        if path.endswith("checkpoint.safetensors.partial") and os.path.exists(path[:-len(".partial")]):
            kept.append(open(path[:-len(".partial")], "rb").read())  # the last checkpoint, whole
            os.truncate(path, os.path.getsize(path) // 2)
    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills)
    with pytest.raises(common.UserError, match="cannot write .*checkpoint.safetensors: the disk is full; the finished "
                                               "stages and the last checkpoint are kept") as e:
        train.main(never_stopped["args"] + ["--out", str(out)])
    assert "free some space, then run the same command again" in str(e.value)
    assert (out / "teacher.partial" / "checkpoint.safetensors").read_bytes() == kept[0]
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    results = train.main(never_stopped["args"] + ["--out", str(out)])
    assert_same_weights(out / "teacher" / "model.safetensors", never_stopped["ref"] / "teacher" / "model.safetensors")
    assert results["moebert"] == never_stopped["results"]["moebert"]


def test_a_second_run_into_the_same_out_refuses_at_once(never_stopped, tmp_path):
    """A run holds OUT/run.lock while it lasts; the second stops with an error at once. The lock is the
    kernel's (flock): a run killed with SIGKILL leaves none behind."""
    import train
    out = tmp_path / "out"
    shutil.copytree(never_stopped["ref"], out)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, runtime; runtime.claim(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(600)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    before = snapshot(out)
    t0 = time.time()
    with pytest.raises(common.UserError, match="another run is writing into"):
        train.main(never_stopped["args"] + ["--out", str(out)])
    assert time.time() - t0 < 5 and snapshot(out) == before
    holder.kill()
    holder.wait()
    results = train.main(never_stopped["args"] + ["--out", str(out)])  # the killed holder left no lock
    assert results["moebert"] == never_stopped["results"]["moebert"]


def test_a_kill_while_a_stage_is_published_loses_none_of_its_work(never_stopped, tmp_path, monkeypatch, capsys):
    """Killed at the rename that publishes the teacher (the last checkpoint still beside its best
    model): the same command finishes the stage from that checkpoint, training nothing again."""
    import train
    out = tmp_path / "out"
    replace = os.replace

    def killed_at_publish(src, dst):
        if str(src).endswith("teacher.partial"):
            raise KeyboardInterrupt  # what a kill at this moment leaves on disk
        return replace(src, dst)
    monkeypatch.setattr(os, "replace", killed_at_publish)
    with pytest.raises(KeyboardInterrupt):
        train.main(never_stopped["args"] + ["--out", str(out)])
    monkeypatch.setattr(os, "replace", replace)
    assert (out / "teacher.partial" / "checkpoint.safetensors").exists() and not (out / "teacher").exists()
    steps = len([r for r in read_log(out) if r.get("stage") == "teacher" and "loss" in r])
    capsys.readouterr()
    results = train.main(never_stopped["args"] + ["--out", str(out)])
    assert "teacher.partial" not in os.listdir(out) and "continues from its checkpoint" in capsys.readouterr().out
    assert len([r for r in read_log(out) if r.get("stage") == "teacher" and "loss" in r]) == steps  # none again
    assert_same_weights(out / "teacher" / "model.safetensors", never_stopped["ref"] / "teacher" / "model.safetensors")
    assert not (out / "teacher" / "checkpoint.safetensors").exists()
    assert results["moebert"] == never_stopped["results"]["moebert"]
