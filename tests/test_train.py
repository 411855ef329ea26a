"""train.py end to end, on tiny models and generated tasks on CPU: the five stages, reruns and --eval-only, a
non-finite loss, user errors that exit 2, progress lines, --predict, the README's snippet, bf16, SQuAD and the
shallow student's pipelines, weight decay. Stops and resumes, checkpoints, torchrun: test_runtime.py."""
import json
import math
import os
import random
import re
import shutil
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

from helpers import (DEVICES, GOOGLE_TINY, ROOT, TINY, TINY4, TRAIN, WORDS, cut_in_half, deny, fixture_json,
                     read_log, readme_snippet, snapshot, tiny_model, tiny_task, write_json, write_rte_like)


# ----------------------------------------------------------------------------------------------
# train.py's weight decay


def test_weight_decay_spares_biases_and_layernorms_in_experts_too():
    """train.decays reads names; the reference counts matrix axes, less the experts' stack axis."""
    import train
    cfg = MoEConfig(num_experts=3, expert_dim=11, shared_dim=5, route="gate-token")
    moe = moebert_from_dense(tiny_model(), torch.rand(3, 37), cfg)
    for name, p in moe.named_parameters():
        assert train.decays(name) == (p.ndim - (".experts." in name) > 1), name


# ----------------------------------------------------------------------------------------------
# train.py: the whole pipeline, tiny, on CPU


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
    t0 = time.time()
    results = train.main(args)
    return dict(root=root, out=root / "out", args=args, results=results, seconds=time.time() - t0, train=train)


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


@pytest.mark.parametrize("change,top", [("50 lines more", 148), ("every line twice", 197)])
def test_a_vocabulary_larger_than_the_models_embeddings_is_refused(tiny_run, tmp_path, change, top):
    """A --bert folder whose vocab.txt is another model's: its ids would index past the embedding table. A
    repeated line counts once among the tokens but keeps its later line as its id (an IndexError mid-run once)."""
    train, args = tiny_run["train"], tiny_run["args"]
    shutil.copytree(tiny_run["root"] / "bert", tmp_path / "bert")
    vocab = tmp_path / "bert" / "vocab.txt"
    lines = vocab.read_text()
    vocab.write_text(lines + "".join(f"extra{i}\n" for i in range(50)) if change == "50 lines more" else lines * 2)
    with pytest.raises(common.UserError, match=f"vocab.txt has ids up to {top} .its lines., the model's embeddings 99"):
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
# A run at work: a non-finite loss, an error line, progress, --predict


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


@pytest.mark.parametrize("eval_only", [False, True])
@pytest.mark.parametrize("locked,gone", [("predictions/teacher", None), ("predictions", "predictions/teacher"),
                                         ("predictions", None)])
def test_predict_into_a_folder_of_another_user_is_refused_before_anything_is_written(never_stopped, tmp_path,
                                                                                   monkeypatch, eval_only, locked, gone):
    """A predictions folder this user cannot write in (left by a run as another user): refused at the start with
    "cannot write", not after results.json was rewritten; unless nothing goes into it (its subfolders are there,
    and this user's): then the run finishes. (Run as root: os.access is what says no.)"""
    import train
    out = tmp_path / "out"
    shutil.copytree(never_stopped["ref"], out)
    for who in ("teacher", "moebert"):
        (out / "predictions" / who).mkdir(parents=True, exist_ok=True)
    if gone:
        shutil.rmtree(out / gone)
    target = out / locked
    deny(monkeypatch, target, write_only=True)
    before = snapshot(out)
    args = never_stopped["args"] + ["--out", str(out), "--predict"] + (["--eval-only"] if eval_only else [])
    if locked == "predictions" and not gone:  # only its subfolders get files
        assert train.main(args)["moebert"] == never_stopped["results"]["moebert"]
        assert (out / "predictions" / "moebert" / "RTE.tsv").exists()
        return
    with pytest.raises(common.UserError, match=f"cannot write {re.escape(str(target))}: no permission"):
        train.main(args)
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
# Bad input to train.py: flags, settings, damaged stage files (the output folder: test_runtime.py). Each is an
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


