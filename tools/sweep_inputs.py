"""train.py against odd and wrong input, on tiny models and data: every run must either finish (exit 0) or
stop with one `error:` line (exit 2) that leaves the files it found as they were. A traceback, another exit
code, a refused run that changed a file, a file left in the working folder, or a `cross` case that finishes (a
wrong folder taken) is a finding.

    python tools/sweep_inputs.py                  # all parts, about 45 minutes on 2 cores; JSON in sweep.json
    python tools/sweep_inputs.py --parts damage   # one part: flags, eval-only, cross, tasks, env, damage, bert, perms

Parts: `flags`, MoE sizes, routes, students, lengths, batch sizes and schedules on five tasks (RTE, STS-B,
CoLA, SQuAD v1.1 and v2.0); `eval-only`, each finished run of `flags` again with --eval-only (GLUE: and
--predict); `cross`, one run's folders given to another (a teacher of another task, a MoEBERT for a BERT,
another task's data, a run's --out for another task or student, flags changed on a finished run);
`tasks`, all nine GLUE tasks, with --predict, the shallow student and bf16, then --eval-only --predict; `env`,
$MOEBERT_CACHE naming a file, a place no folder can be made, or nothing; `damage`, a finished RTE run (with
--predict) and a SQuAD one, each file in turn gone, empty, cut in half, garbage, a folder or (JSON) of another
shape, then the same command, --eval-only (and --predict): here a run that finishes must also report the
results of the undamaged run, to the last digit (a damaged file silently used is a finding); an RTE run stopped
by SIGTERM in distillation alike, then the same command (it must end as a run never stopped); each data file
of RTE and SQuAD v2.0 damaged alike, for a new run; `bert`, the models a run starts from (a Hugging Face
folder with safetensors or pytorch_model.bin, Google's release, a finished teacher for --teacher), each file
damaged alike, each config field off (a wrong size or type, an odd activation), the vocabulary's lines repeated;
`perms` (not in the default: run as root, with a Python the user nobody can run, after `bert` and `damage`), each
file and folder of those models (a teacher's too) and of the RTE and SQuAD v2.0 data unreadable in turn, the run as
nobody: each must stop with "error: cannot read", or finish where the file is not needed (a teacher's
metrics.json); then each folder and file of a finished RTE run and of one stopped in distillation left by another
user (root's, mode as written), the rest nobody's: the same command (and --eval-only --predict) must finish with
the scores of the run as it was, or stop with "cannot write" or "cannot read" (not "damaged", say).
"""
import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import (GOOGLE_TINY, TINY4, fixture_json, stop_midway, tiny_model, write_json,  # noqa: E402
                     write_rte_like)

VARIANTS = {  # name: flags added to a task's base command
    "default": [], "gate-token": ["--route", "gate-token"], "gate-sentence": ["--route", "gate-sentence"],
    "hash-balance": ["--route", "hash-balance"], "split-random": ["--split", "random"],
    "split-inverse": ["--split", "inverse"], "shallow-odd-depth": ["--student", "shallow"], "predict": ["--predict"],
    "bf16": ["--dtype", "bf16"], "one-expert-of-all": ["--num-experts", "1", "--expert-dim", "37", "--shared-dim", "37"],
    "none-shared": ["--shared-dim", "0"], "8-experts": ["--num-experts", "8"], "20-experts": ["--num-experts", "20"],
    "40-experts": ["--num-experts", "40"], "expert-over-ffn": ["--expert-dim", "40"],
    "shared-over-expert": ["--expert-dim", "11", "--shared-dim", "12"],
    "too-few-neurons": ["--num-experts", "4", "--expert-dim", "37", "--shared-dim", "0"],
    "lambda-0": ["--distill-lambda", "0"], "balance": ["--route", "gate-token", "--balance-weight", "0.1"],
    "length-8": ["--max-seq-length", "8"], "length-over-positions": ["--max-seq-length", "65"],
    "batch-1": ["--batch-size", "1", "--eval-batch-size", "1", "--distill-batch-size", "1", "--max-train-examples", "5"],
    "one-example": ["--max-train-examples", "1"], "save-every-step": ["--save-every", "1"],
    "warmup-all": ["--warmup", "1"], "warmup-none": ["--warmup", "0"], "expert-dropout": ["--expert-dropout", "0.5"],
    "half-epoch": ["--distill-epochs", "0.5"], "doc-stride-over": ["--doc-stride", "500"],
    "query-1": ["--max-query-length", "1"], "eval-batch-over": ["--eval-batch-size", "1000"],
}


def fixtures(w):
    """Tiny BERTs (3 and 4 layers, hidden 32, FFN 37, 64 positions), RTE-, STS-B- and CoLA-shaped tasks, the
    SQuAD fixture of the tests in both versions, and every GLUE task's format (tests/conftest.py)."""
    from conftest import glue
    import torch
    from bert import BertConfig, BertModel
    tiny_model(num_labels=2).bert.save_pretrained(w / "bert")
    torch.manual_seed(0)
    BertModel(BertConfig(**TINY4)).save_pretrained(w / "bert4")
    for b in ("bert", "bert4"):
        shutil.copy(os.path.join(GOOGLE_TINY, "vocab.txt"), w / b)
    write_rte_like(w / "RTE")
    for split in ("train", "dev", "test"):  # the RTE-shaped pairs as STS-B (scores) and CoLA (one sentence)
        rows = [line.rstrip("\n").split("\t") for line in open(w / "RTE" / f"{split}.tsv")][1:]
        score = lambda r: "" if split == "test" else "\t%.3f" % (5.0 if r[3] == "entailment" else 1.0)
        (w / "STS-B").mkdir(exist_ok=True)
        (w / "STS-B" / f"{split}.tsv").write_text(
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
            + ("" if split == "test" else "\tscore") + "\n"
            + "".join(f"{i}\tg\tf\ty\t{i}\tn\tn\t{r[1]}\t{r[2]}{score(r)}\n" for i, r in enumerate(rows)))
        (w / "CoLA").mkdir(exist_ok=True)
        (w / "CoLA" / f"{split}.tsv").write_text(
            "index\tsentence\n" + "".join(f"{i}\t{r[1]}\n" for i, r in enumerate(rows)) if split == "test"
            else "\n".join(f"x\t{int(r[3] == 'entailment')}\t\t{r[1]}" for r in rows))
    for version, folder in (("1.1", "SQ1"), ("2.0", "SQ2")):
        (w / folder).mkdir()
        for split in ("train", "dev"):
            write_json(w / folder / f"{split}-v{version}.json", fixture_json(version))
    fn = getattr(glue, "__wrapped__", None) or glue._get_wrapped_function()  # a pytest fixture, called plainly
    fn(w)
    shutil.copytree(w / "RTE", w / "RTE-notest")
    os.remove(w / "RTE-notest" / "test.tsv")
    (w / "afile").write_text("x")


def workspace(folder, prefix):
    """`folder` (else a new temporary one) with the fixtures, made if they are not there yet."""
    w = Path(folder or tempfile.mkdtemp(prefix=prefix)).resolve()
    if not (w / "bert").exists():
        w.mkdir(parents=True, exist_ok=True)
        fixtures(w)
    return w


def stop_in_distillation(cmd, out):
    """train.py with cmd into `out`, stopped by SIGTERM in distillation once it has saved its best model so far
    (after its first epoch) beside its checkpoint."""
    shutil.rmtree(out, ignore_errors=True)
    code, said = stop_midway([sys.executable, str(ROOT / "train.py"), *cmd, "--out", str(out)], out / "moebert",
                             signal.SIGTERM, wait_for=("checkpoint.safetensors", "model.safetensors"))
    if code != 128 + signal.SIGTERM:
        sys.exit(f"{out}: not stopped inside distillation:\n{said}")


def copy_run(src, dst):
    """A copy of a run whose run.json names the copy as its --out, as a run there writes it; that record."""
    shutil.copytree(src, dst)
    record = json.loads((dst / "run.json").read_text())
    record["args"]["out"] = str(dst)
    (dst / "run.json").write_text(json.dumps(record, indent=2))
    return record


def base(w, task, data=None):
    folder = data or {"rte": "RTE", "stsb": "STS-B", "cola": "CoLA", "squad": "SQ1", "squad2": "SQ2"}[task]
    return ["--task", task, "--data-dir", str(w / folder), "--bert", str(w / "bert"), "--device", "cpu",
            "--epochs", "1", "--batch-size", "8", "--max-train-examples", "40", "--max-eval-examples", "20",
            "--log-every", "1000"] + (["--max-query-length", "16"] if task.startswith("squad") else [])


def files(folder):
    """Every file under folder -> its hash, but the lock and the log that every run touches."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).rglob("*")
            if p.is_file() and p.name not in ("run.lock", "log.jsonl")} if os.path.isdir(folder) else None


DAMAGES = {  # what is done to one file of a finished run
    "gone": lambda p: p.unlink(), "empty": lambda p: p.write_bytes(b""),
    "half": lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]),
    "garbage": lambda p: p.write_bytes(bytes(range(256)) * 8), "a folder": lambda p: (p.unlink(), p.mkdir()),
    "json of another shape": lambda p: p.write_text("[]" if p.read_text().lstrip().startswith("{") else "{}"),
}
GOOGLE_DATA = "bert_model.ckpt.data-00000-of-00001"  # the weights of Google's release, beside its .index


def scores(out):
    """The dev scores in a run's results.json (None if it has none)."""
    try:
        r = json.loads((Path(out) / "results.json").read_text())
        return {k: r[k] for k in ("teacher", "moebert", "shallow") if k in r}
    except (OSError, ValueError, TypeError, KeyError):
        return None


def run(name, args, expect=None, env=None, same_as=None, user=(), says=None):
    """train.py with args (and `env`; as another user with `user`, setpriv's command) in an empty working
    folder; a finding: a traceback, an exit code but 0 and 2 (or not `expect`), a refusal that changed a file in
    the --out it found, a file left in the working folder, with `same_as` (the scores of the run undamaged) a run
    that finishes with other scores, and with `says` a refusal without those words."""
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    before = files(out) if out else None
    cwd = tempfile.mkdtemp(prefix="cwd-")  # every path given is absolute: nothing may land in the working folder
    os.chmod(cwd, 0o777 if user else 0o700)
    p = subprocess.run([*user, sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                       cwd=cwd, timeout=1800, env=dict(os.environ, **(env or {})))
    changed = p.returncode == 2 and out is not None and files(out) != before  # a refusal must change nothing
    stray = os.listdir(cwd)
    shutil.rmtree(cwd)
    other = same_as is not None and p.returncode == 0 and scores(out) != same_as  # a damaged file silently used
    finding = ("Traceback" in p.stderr or p.returncode not in ((0, 2) if expect is None else (expect,)) or changed
               or bool(stray) or other or (says is not None and p.returncode == 2 and says not in p.stderr))
    last = (p.stderr.strip().splitlines() or [""])[-1]
    return dict(name=name, args=args, rc=p.returncode, finding=finding, changed=changed, stray=stray, other=other,
                said=last[:500])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="flags,eval-only,cross,tasks,env,damage,bert", help="comma-separated parts to run")
    p.add_argument("--work", help="folder for the fixtures and the runs (default: a new temporary one)")
    p.add_argument("--out", default="sweep.json", help="the results, JSON")
    a = p.parse_args()
    w = workspace(a.work, "sweep-")
    o, results = w / "outs", []

    def batch(cases, what, workers=2):
        with ThreadPoolExecutor(workers) as ex:
            for r in ex.map(lambda c: run(*c), cases):
                results.append(dict(r, part=what))
                print(f"{what:9} {r['name']:40} exit {r['rc']}{'  FINDING' if r['finding'] else ''}  {r['said'][:150]}",
                      flush=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)

    parts = a.parts.split(",")
    tasks = ("rte", "stsb", "cola", "squad", "squad2")
    if "flags" in parts or "eval-only" in parts:
        batch([(f"{t}-{v}", base(w, t) + extra + ["--out", str(o / f"{t}-{v}")]) for t in tasks
               for v, extra in VARIANTS.items() if not (o / f"{t}-{v}" / "results.json").exists()], "flags")
    if "eval-only" in parts:
        done = [(f"{t}-{v}", base(w, t) + extra + ["--out", str(o / f"{t}-{v}")]) for t in tasks
                for v, extra in VARIANTS.items() if (o / f"{t}-{v}" / "results.json").exists()]
        batch([(n, c + ["--eval-only"]) for n, c in done]
              + [(n + " predict", c + ["--eval-only", "--predict"]) for n, c in done if "squad" not in n], "eval-only")
    if "cross" in parts:
        for t in ("rte", "stsb", "squad"):  # the runs the cases lean on
            if not (o / f"{t}-default" / "results.json").exists():
                batch([(f"{t}-default", base(w, t) + ["--out", str(o / f"{t}-default")])], "flags")
        rte, sts, sq, r = base(w, "rte"), base(w, "stsb"), base(w, "squad"), o / "rte-default"
        x = w / "cross"
        x.mkdir(exist_ok=True)
        shutil.make_archive(str(x / "RTE"), "zip", w, "RTE")  # GLUE's RTE.zip, as downloaded
        cases = {
            "rerun, another route": rte + ["--out", str(r), "--route", "gate-token"],
            "rerun, another seed": rte + ["--out", str(r), "--seed", "3"],
            "rerun, another task": sts + ["--out", str(r)],
            "rerun, another student": rte + ["--out", str(r), "--student", "shallow"],
            "eval-only, another route": ["--task", "rte", "--out", str(r), "--eval-only", "--route", "gate-token"],
            "eval-only, another student": ["--task", "rte", "--out", str(r), "--eval-only", "--student", "shallow"],
            "eval-only, another task": ["--task", "stsb", "--out", str(r), "--eval-only"],
            "eval-only, nothing there": rte + ["--out", str(x / "nothing"), "--eval-only"],
            "teacher of rte for stsb": sts + ["--teacher", str(r / "teacher"), "--out", str(x / "1")],
            "teacher of rte for cola": base(w, "cola") + ["--teacher", str(r / "teacher"), "--out", str(x / "2")],
            "teacher of squad for rte": rte + ["--teacher", str(o / "squad-default" / "teacher"), "--out", str(x / "3")],
            "teacher of rte for squad": sq + ["--teacher", str(r / "teacher"), "--out", str(x / "4")],
            "a moebert for the teacher": rte + ["--teacher", str(r / "moebert"), "--out", str(x / "5")],
            "a run's out for the teacher": rte + ["--teacher", str(r), "--out", str(x / "6")],
            "a moebert for the bert": rte + ["--bert", str(r / "moebert"), "--out", str(x / "7")],
            "a data folder for the bert": rte + ["--bert", str(w / "RTE"), "--out", str(x / "8")],
            "a file for the bert": rte + ["--bert", str(w / "afile"), "--out", str(x / "9")],
            "the GLUE folder for the data": base(w, "rte", "glue") + ["--out", str(x / "10")],
            "stsb data for rte": base(w, "rte", "STS-B") + ["--out", str(x / "11")],
            "cola data for sst2": base(w, "sst2", "CoLA") + ["--out", str(x / "12")],
            "rte data for qnli": base(w, "qnli", "RTE") + ["--out", str(x / "13")],
            "rte data for wnli": base(w, "wnli", "RTE") + ["--out", str(x / "14")],
            "rte data for mnli": base(w, "mnli", "RTE") + ["--out", str(x / "15")],
            "squad 1.1 data for 2.0": base(w, "squad2", "SQ1") + ["--out", str(x / "16")],
            "a file for the out": rte + ["--out", str(w / "afile")],
            "predict without a test split": base(w, "rte", "RTE-notest") + ["--predict", "--out", str(x / "17")],
            "a device this machine lacks": rte + ["--device", "cuda", "--out", str(x / "18")],
            "the task's zip for the data": base(w, "rte", x / "RTE.zip") + ["--out", str(x / "19")],
            "a squad file for the data": base(w, "squad", w / "SQ1" / "train-v1.1.json") + ["--out", str(x / "20")],
        }
        # Each is refused but the GLUE root for --data-dir: one that finishes would give a meaningless result.
        batch([(n, c, 0 if n == "the GLUE folder for the data" else 2) for n, c in cases.items()], "cross", workers=1)
    if "tasks" in parts:
        extras = {"": [], "predict": ["--predict"], "shallow": ["--student", "shallow", "--bert", str(w / "bert4")],
                  "bf16 predict": ["--dtype", "bf16", "--predict"]}
        glue_tasks = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
        cases = [(f"{t} {k}".strip(), base(w, "rte", "glue")[2:] + e + ["--task", t, "--out", str(o / f"all-{t}-{k}")])
                 for t in glue_tasks for k, e in extras.items()]
        batch(cases, "tasks")
        batch([(n, ["--task", c[c.index("--task") + 1], "--out", c[c.index("--out") + 1], "--eval-only", "--predict"])
               for n, c in cases], "tasks")
    if "env" in parts:  # the download cache: a file, a place no folder can be made, set but empty
        name = ["--bert", "all-minilm-l6-v2"]  # a release name: resolved through the cache
        batch([(f"MOEBERT_CACHE={c!r}", base(w, "rte") + name + ["--out", str(w / "env" / str(i))], rc, {"MOEBERT_CACHE": c})
               for i, (c, rc) in enumerate(((str(w / "afile"), 2), (str(w / "afile" / "sub"), 2), ("", 0)))],
              "env", workers=1)
    if "damage" in parts:  # each file of a run damaged in turn, each case on its own copy of the run
        cases, sources = [], []  # sources: (name, the run, the commands after the damage, the scores to end with)
        for t, extra in (("rte", ["--predict"]), ("squad", [])):
            ref, cmd = o / f"{t}-damage", base(w, t)
            if not (ref / "results.json").exists():
                batch([(f"{t}-damage", cmd + extra + ["--out", str(ref)])], "damage")
            sources.append((t, ref, [("rerun", cmd + extra), ("eval-only", cmd + ["--eval-only"])]
                            + ([("eval-only predict", cmd + ["--eval-only"] + extra)] if extra else []), scores(ref)))
        # A run stopped by SIGTERM in distillation, then the same command: it must end as a run never stopped.
        cmd, ref, stopped = base(w, "rte") + ["--epochs", "3", "--save-every", "1"], o / "rte-ref", o / "rte-stopped"
        if not (ref / "results.json").exists():
            batch([("rte-ref", cmd + ["--out", str(ref)])], "damage")
        if not (stopped / "moebert.partial").exists():
            stop_in_distillation(cmd, stopped)
        sources.append(("rte stopped", stopped, [("rerun", cmd)], scores(ref)))
        for t, ref, hows, want in sources:
            for f in sorted(q.relative_to(ref) for q in ref.rglob("*") if q.is_file()):  # run.lock too
                for d, harm in DAMAGES.items():
                    if d == "json of another shape" and f.suffix != ".json":
                        continue
                    copy = w / "damaged" / f"{t}-{len(cases)}"
                    shutil.rmtree(copy, ignore_errors=True)
                    record = copy_run(ref, copy)
                    harm(copy / f)
                    for how, args in hows:
                        c = w / "damaged" / f"{t}-{len(cases)}"
                        if not c.exists():
                            shutil.copytree(copy, c)
                            if (c / "run.json").is_file() and f != Path("run.json"):
                                record["args"]["out"] = str(c)
                                (c / "run.json").write_text(json.dumps(record, indent=2))
                        cases.append((f"{t} {f} {d}, {how}", args + ["--out", str(c)], None, None, want))
        # The data too, each file of RTE (with test.tsv) and SQuAD v2.0 in turn, for a new run: one with less
        # data may finish, with other scores.
        for t, folder, extra in (("rte", "RTE", ["--predict"]), ("squad2", "SQ2", [])):
            for f in sorted(os.listdir(w / folder)):
                for d, harm in DAMAGES.items():
                    if d == "json of another shape" and not f.endswith(".json"):
                        continue
                    copy = w / "damaged" / f"{t}-data-{len(cases)}"
                    shutil.rmtree(copy, ignore_errors=True)
                    shutil.copytree(w / folder, copy / "data")
                    harm(copy / "data" / f)
                    cases.append((f"{t} data {f} {d}", base(w, t, copy / "data") + extra + ["--out", str(copy / "out")]))
        batch(cases, "damage")
    if "bert" in parts:  # the models a run starts from (--bert, --teacher): each file damaged, each config field off
        if not (w / "bert-bin").exists():  # Hugging Face's older format: a torch.save'd state dict
            import torch
            from safetensors.torch import load_file
            shutil.copytree(w / "bert", w / "bert-bin")
            torch.save(load_file(w / "bert-bin" / "model.safetensors"), w / "bert-bin" / "pytorch_model.bin")
            os.remove(w / "bert-bin" / "model.safetensors")
        teacher = o / "rte-default" / "teacher"
        if not (teacher / "model.safetensors").exists():
            batch([("rte-default", base(w, "rte") + ["--out", str(o / "rte-default")])], "flags")
        edits = {f"{f} {d}": (f, harm) for f in ("config.json", "vocab.txt", "model.safetensors", "pytorch_model.bin",
                                                 "bert_config.json", "bert_model.ckpt.index", GOOGLE_DATA)
                 for d, harm in DAMAGES.items() if d != "json of another shape" or f.endswith(".json")}
        for field, value in (("hidden_size", 30), ("hidden_size", "32"), ("hidden_size", None), ("num_attention_heads", 0),
                             ("num_hidden_layers", 0), ("num_hidden_layers", 1.5), ("intermediate_size", 0),
                             ("vocab_size", 50), ("vocab_size", 200), ("max_position_embeddings", 4), ("type_vocab_size", 0),
                             ("hidden_act", "tanh"), ("layer_norm_eps", -1), ("hidden_dropout_prob", 2.0), ("extra", 1)):
            edits[f"config {field}={value!r}"] = ("CONFIG", lambda q, k=field, v=value: q.write_text(
                json.dumps({**json.loads(q.read_text()), k: v})))
        edits["vocab.txt every line twice"] = ("vocab.txt", lambda q: q.write_text(q.read_text() * 2))
        edits["vocab.txt without [UNK]"] = ("vocab.txt", lambda q: q.write_text(q.read_text().replace("[UNK]", "[X]")))
        cases = []
        for label, src, flag in (("hf", w / "bert", "--bert"), ("hf-bin", w / "bert-bin", "--bert"),
                                 ("google", Path(GOOGLE_TINY), "--bert"), ("teacher", teacher, "--teacher")):
            for name, (f, harm) in edits.items():
                f = f if f != "CONFIG" else "bert_config.json" if label == "google" else "config.json"
                if (src / f).exists():
                    copy = w / "bert-damaged" / f"{label}-{len(cases)}"
                    shutil.rmtree(copy, ignore_errors=True)
                    shutil.copytree(src, copy / "model")
                    harm(copy / "model" / f)
                    cases.append((f"{label} {name}", base(w, "rte") + [flag, str(copy / "model"), "--out", str(copy / "out")]))
        batch(cases, "bert")
    if "perms" in parts:  # as the user nobody (the sweep runs as root): each input unreadable in turn
        import pwd
        nobody = pwd.getpwnam("nobody")
        user = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
        if os.geteuid() != 0 or subprocess.run([*user, sys.executable, "-c", "import torch"]).returncode:
            sys.exit("--parts perms: run as root, with a Python that the user nobody can run")
        subprocess.run(["chmod", "a+rX", str(w), str(o)], check=True)  # the fixtures' folder: nobody passes through
        if not ((w / "bert-bin").exists() and (o / "rte-default" / "teacher").exists()):
            sys.exit("--parts perms: run --parts bert first (its Hugging Face folder with pytorch_model.bin, a teacher)")
        sources = {"hf": (w / "bert", "--bert"), "hf-bin": (w / "bert-bin", "--bert"),
                   "google": (Path(GOOGLE_TINY), "--bert"), "rte": (w / "RTE", "--data-dir"),
                   "squad2": (w / "SQ2", "--data-dir"), "teacher": (o / "rte-default" / "teacher", "--teacher")}
        cases = []
        for label, (src, flag) in sources.items():
            for f in [None] + sorted(q.name for q in src.iterdir() if q.name != "reference.npz"):  # None: the folder
                copy = w / "perms" / f"{label}-{len(cases)}"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(src, copy / "in")
                subprocess.run(["chmod", "-R", "a+rX", str(copy)], check=True)
                os.chmod(copy, 0o1777)  # where the run's --out goes
                os.chmod(copy / "in" / f if f else copy / "in", 0o600 if f else 0o700)
                task = "squad2" if label == "squad2" else "rte"
                args = base(w, task) + (["--predict"] if task == "rte" else [])
                args += [flag, str(copy / "in")]  # a flag given twice: argparse takes the last
                cases.append((f"{label} {f or 'folder'} unreadable", args + ["--out", str(copy / "out")], None,
                              {"MOEBERT_CACHE": str(copy / "cache")}, None, user, "error: cannot read"))
        # A run's own folders and files left by another user (a run started as root in a container, say), each in
        # turn, the rest this user's: the same command must finish with the scores of the run as it was, or stop
        # with "cannot write" or "cannot read". (A file is written beside, then renamed: the folder's mode counts.)
        if not ((o / "rte-damage" / "results.json").exists() and (o / "rte-stopped" / "moebert.partial").exists()):
            sys.exit("--parts perms: run --parts damage first (a finished RTE run, and one stopped in distillation)")
        rte, rte_stopped = base(w, "rte"), base(w, "rte") + ["--epochs", "3", "--save-every", "1"]
        for label, src, commands, want in (
                ("finished", o / "rte-damage", [rte + ["--predict"], rte + ["--eval-only", "--predict"]],
                 scores(o / "rte-damage")), ("stopped", o / "rte-stopped", [rte_stopped], scores(o / "rte-ref"))):
            for f in [None] + sorted(q.relative_to(src) for q in src.rglob("*")):  # run.lock too
                for args in commands:
                    copy = w / "perms" / f"{label}-{len(cases)}"
                    shutil.rmtree(copy, ignore_errors=True)
                    copy_run(src, copy / "out")
                    subprocess.run(["chown", "-R", f"{nobody.pw_uid}:{nobody.pw_gid}", str(copy)], check=True)
                    os.chown(copy / "out" / f if f else copy / "out", 0, 0)  # root's again, in the mode it was written
                    how = "eval-only" if "--eval-only" in args else "rerun"
                    cases.append((f"{label} run, {f or 'its --out'} another user's, {how}", args + ["--out", str(copy / "out")],
                                  None, {"MOEBERT_CACHE": str(copy / "cache")}, want, user, ": cannot "))
        batch(cases, "perms")
    bad = [r for r in results if r["finding"]]
    print(f"{len(results)} runs: {sum(r['rc'] == 0 for r in results)} finished, {sum(r['rc'] == 2 for r in results)} "
          f"refused with an error line, {len(bad)} findings; results in {a.out}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
