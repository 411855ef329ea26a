"""Each task as train.py runs it: its training features, its dev evaluation (GLUE's metrics, or
SQuAD's official ones on the postprocessed answers), GLUE's test-set predictions, and the check
that a --teacher folder fits the task."""
import os
import time
from contextlib import nullcontext

import torch

import data
import runtime
import squad
from bert import BertForQuestionAnswering, BertForSequenceClassification
from common import UserError, check_access, denied
from fast import FastInference
from runtime import autocast, progress, to_device
from weights import find_vocab, read_config

SQUAD = {"squad": "1.1", "squad2": "2.0"}  # --task -> SQuAD version


def teacher_class(task):
    """The teacher's class and its arguments: a classifier (num_labels outputs; 1 is STS-B's
    regression) or SQuAD's span head."""
    if task in SQUAD:
        return BertForQuestionAnswering, {}
    labels = data.TASKS[task].labels
    return BertForSequenceClassification, {"num_labels": 1 if labels is None else len(labels)}


def load(args, tokenizer, device):
    """(training features, dev(model) -> (metrics, {file name: JSON to keep beside the model}), the
    metric that picks the best epoch, the number of dev examples, {leaderboard file: test features})."""
    t0 = time.time()
    loaded = (squad_data if args.task in SQUAD else glue_data)(args, tokenizer, device)
    if runtime.MASTER:
        unit = "windows" if args.task in SQUAD else "examples"
        train = "" if args.eval_only else f"{len(loaded[0])} training {unit} and "
        print(f"data: {train}{loaded[3]} dev examples, tokenized in {time.time() - t0:.1f}s")
    return loaded


def check_lengths(args, positions):
    """--max-seq-length between the shortest a task can use and the model's position table; SQuAD's
    windows need room for the question ([CLS] question [SEP] context [SEP])."""
    shortest = args.max_query_length + 4 if args.task in SQUAD else 5  # [CLS] a [SEP] b [SEP]: a token each
    if not shortest <= args.max_seq_length <= positions:
        raise UserError(f"--max-seq-length {args.max_seq_length} must be between {shortest}" + (
            f" (--max-query-length {args.max_query_length} + 3 special tokens + 1 of context)" if args.task in SQUAD
            else "") + f" and {positions}, the longest sequence the model's position table covers")


def check_prediction_paths(out, models, names):
    """Where --predict will write (OUT/predictions/MODEL/NAME): a file where one of its folders goes, a folder
    where one of its files goes, or a folder this user cannot write in, stops the run now, not after training."""
    for who in models:
        where = os.path.join(out, "predictions", who)
        wanted = [(os.path.dirname(where), True), (where, True)] + [(os.path.join(where, n), False) for n in names]
        for path, is_folder in wanted:
            if os.path.exists(path) and os.path.isdir(path) != is_folder:
                raise UserError(f"{path} is a {'file' if is_folder else 'folder'}, where --predict writes a "
                                f"{'folder' if is_folder else 'file'}: move it away, or use another --out")
        folder = where if os.path.isdir(where) else os.path.dirname(where)  # what gets the files, or makes their folder
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):  # another user's
            raise denied(folder)  # train.py says what to do


def glue_data(args, tokenizer, device):
    folder = data.glue_dir(args.task, args.data_dir, train=not args.eval_only)
    encode = lambda examples, n=None: data.encode(examples[:n], tokenizer, args.max_seq_length)
    if runtime.MASTER:
        print(f"data: reading and tokenizing {data.TASKS[args.task].folder} from {folder}", flush=True)
    # --eval-only trains nothing: its training split is neither read nor needed (MNLI's holds 393k pairs).
    train_features = [] if args.eval_only else encode(data.read_glue(args.task, folder, "train"),
                                                      args.max_train_examples)
    dev_sets = {"": encode(data.read_glue(args.task, folder, "dev"), args.max_eval_examples)}
    if args.task == "mnli":
        dev_sets["_mm"] = encode(data.read_glue(args.task, folder, "dev_mismatched"), args.max_eval_examples)
    # Read now, so a missing test file stops the run before training, not after it.
    test_sets = {name: encode(examples) for name, examples in data.test_sets(args.task, folder).items()} \
        if args.predict else {}
    if args.predict:
        check_prediction_paths(args.out, ("teacher", args.student), test_sets)
    dev = lambda model: (evaluate(model, dev_sets, args, device), {})
    return train_features, dev, data.TASKS[args.task].metric, len(dev_sets[""]), test_sets


def squad_data(args, tokenizer, device):
    """Features are context windows (squad.make_features); F1 picks the best epoch; no test sets."""
    version = SQUAD[args.task]
    if runtime.MASTER:
        print(f"data: reading and tokenizing SQuAD {version}", flush=True)
    featurize = lambda examples: squad.make_features(examples, tokenizer, args.max_seq_length, args.doc_stride,
                                                     args.max_query_length)
    train_examples = [] if args.eval_only else squad.load_squad(version, "train", args.data_dir,
                                                                 args.max_train_examples)[0]
    examples, dataset = squad.load_squad(version, "dev", args.data_dir, args.max_eval_examples)
    features = featurize(examples)
    dev = lambda model: squad_dev(model, examples, features, dataset, args, device)
    return featurize(train_examples), dev, "f1", len(examples), {}


@torch.inference_mode()
def logits_of(model, features, args, device, what):
    """The model's logits for each feature, in order, as float32 numpy arrays: [num_labels], or for
    SQuAD [length, 2] (start, end) over the feature's own tokens, without the batch's padding."""
    model.eval()
    # On CUDA in bf16, fast.py's path: the weights cast once, nothing read back, CUDA graphs replayed.
    if device.type == "cuda" and args.dtype == "bf16":
        run, ctx = FastInference(model), nullcontext()
    else:
        run, ctx = (lambda *inputs: model(*inputs).logits), autocast(device, args.dtype)
    out = [None] * len(features)
    for batch in progress(data.batches(features, args.eval_batch_size, sort_by_length=True), len(features), what):
        b = to_device(batch, device)
        with ctx:
            logits = run(b["input_ids"], b["token_type_ids"], b["attention_mask"]).float().cpu()
        for i, row in zip(batch["index"].tolist(), logits.numpy()):
            out[i] = row[:len(features[i]["input_ids"])] if row.ndim == 2 else row
    return out


def predict(model, features, args, device, what="evaluation"):
    """Predictions in the order of `features`: label indices, or scores for regression."""
    return [float(l[0]) if len(l) == 1 else int(l.argmax()) for l in logits_of(model, features, args, device, what)]


def evaluate(model, dev_sets, args, device):
    """GLUE metrics on every dev set; MNLI's mismatched ones get the suffix _mm."""
    metrics = {}
    for suffix, features in dev_sets.items():
        preds = predict(model, features, args, device, f"evaluation on dev{suffix}")
        m = data.compute_metrics(args.task, preds, [f["label"] for f in features])
        metrics.update({k + suffix: v for k, v in m.items()})
    return metrics


def squad_dev(model, examples, features, dataset, args, device):
    """SQuAD dev metrics (the official scripts'), and the files to keep beside the model: the
    predictions {question id: answer, "" for none}, and for v2.0 each question's null score minus its
    best span's (null_odds.json, the official v2.0 script's --na-prob-file)."""
    logits = logits_of(model, features, args, device, "evaluation on dev")
    version = SQUAD[args.task]
    preds, diffs = squad.postprocess(examples, features, [l[:, 0] for l in logits], [l[:, 1] for l in logits],
                                     version)
    metrics = squad.score(version, dataset, preds, diffs)
    return metrics, {"predictions.json": preds, **({"null_odds.json": diffs} if diffs is not None else {})}


def check_teacher(path, task, num_labels):
    """A --teacher must be a fine-tuned model for this task (its labels, or SQuAD's span head when
    num_labels is None) with its vocabulary."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        check_access(path)
        raise UserError(f"--teacher {path}: no config.json; pass a fine-tuned teacher folder, e.g. out/{task}/teacher")
    cfg = read_config(cfg_path)
    if "moe" in cfg:
        raise UserError(f"--teacher {path} is a MoEBERT (config.json has a 'moe' entry), not a dense teacher; "
                        f"pass the teacher folder of a run, e.g. out/{task}/teacher")
    if num_labels is None and cfg.get("head") != "qa":
        raise UserError(f"--teacher {path} is not a question-answering model (config.json's head: "
                        f"{cfg.get('head', 'classification')!r}); {task} needs one, e.g. out/{task}/teacher")
    if num_labels is not None:  # a classifier of the task's labels
        if cfg.get("head") == "qa":
            raise UserError(f"--teacher {path} is a question-answering model; {task} needs a classifier, e.g. "
                            f"out/{task}/teacher")
        if "num_labels" not in cfg:
            raise UserError(f"--teacher {path}: config.json names no num_labels, so it is no fine-tuned classifier (a "
                            f"pretrained BERT goes to --bert); pass a teacher fine-tuned for {task}, e.g. "
                            f"out/{task}/teacher")
        if cfg["num_labels"] != num_labels:
            raise UserError(f"--teacher {path} has {cfg['num_labels']!r} labels; {task} needs {num_labels}")
    made = os.path.join(path, "settings.json")  # what train.py records beside a teacher it fine-tuned
    trained_on = runtime.read_json(made).get("task") if os.path.exists(made) else task
    if trained_on != task:  # the same labels, another task: no error would follow, only a meaningless score
        raise UserError(f"--teacher {path} was fine-tuned on {trained_on} (its settings.json), not {task}: pass a "
                        f"teacher of {task}, e.g. out/{task}/teacher, or leave out --teacher to fine-tune one")
    vocab = find_vocab(path)
    try:
        with open(vocab, encoding="utf-8") as f:
            n = sum(1 for _ in f)
    except UnicodeDecodeError:
        raise data.utf8_error(vocab, data.VOCAB_FIX) from None
    if n != cfg.get("vocab_size"):
        raise UserError(f"--teacher {path}: vocab.txt has {n} tokens but the model has {cfg.get('vocab_size')}")


def print_results(results, student, scale):
    """The dev metrics of both models as a table (GLUE's fractions x 100; SQuAD's are percentages
    already, as the official scripts print them; counts left out), parameters and multiply-adds."""
    names = [n for n in sorted(results["teacher"]) if not n.endswith("total")]
    print(f"\n{results['task']} dev       " + "  ".join(f"{n:>10}" for n in names))
    for who in ("teacher", student):
        print(f"{who:<15}" + "  ".join(f"{scale * results[who][n]:10.2f}" for n in names))
    params, macs = results["params"], results["macs_per_token"]
    print(f"parameters: teacher {params['teacher'] / 1e6:.1f}M, {student} {params[student + '_total'] / 1e6:.1f}M "
          f"total, {params[student + '_active_per_token'] / 1e6:.1f}M active per token; multiply-adds per token, "
          f"weights + attention at {macs['seq_len']} tokens: " + ", ".join(
              f"{who} {macs[who]['weights'] / 1e6:.1f}M + {macs[who]['attention'] / 1e6:.1f}M" for who in ("teacher", student)))
