"""bench.py: the official importance algorithm as it is written (against importance_scores), the
profile's accounting, the unrouted experts it times, and its flags' checks."""
import argparse

import pytest
import torch

import bench
from bert import BertConfig
from moebert import MoEConfig, importance_scores, moebert_from_dense

from helpers import TINY, assert_close, random_batch, tiny_model


# ----------------------------------------------------------------------------------------------
# bench.py: the official importance algorithm as it is written, and the profile's accounting

@pytest.mark.parametrize("num_labels", [3, 1])  # classification and regression
def test_official_importance_as_written_equals_ours(num_labels):
    """bench.official_importance (one batched forward, per example and layer a grad for W1 and one
    for W2) gives importance_scores' numbers, in float64 to 1e-10; on a slice too (its timing scales one)."""
    model = tiny_model(num_labels).double()
    batch = random_batch(num_labels=max(num_labels, 2))  # padded rows: the mask must not matter
    if num_labels == 1:
        batch["labels"] = torch.rand(5, dtype=torch.float64) * 5
    model.train()
    official = bench.official_importance(model, batch)
    assert model.training, "official_importance must restore the training mode"
    ours = importance_scores(model, [batch])
    assert official.shape == (3, 37) and official.abs().min() > 0
    rel = (official - ours).abs().max() / ours.abs().max()
    assert rel <= 1e-10, f"relative max diff {rel:.3g}"
    first = {k: v[:2] for k, v in batch.items()}
    two = bench.official_importance(model, batch, examples=2)
    rel2 = (two - importance_scores(model, [first])).abs().max() / ours.abs().max()
    assert rel2 <= 1e-10, f"first 2 examples: relative max diff {rel2:.3g}"
    assert bench.official_importance(model, batch, examples=0).abs().max() == 0
    print(f"official importance vs ours: relative max diff {rel:.2e} (first 2 examples {rel2:.2e})")


def test_profile_groups_add_up_to_the_wall_time():
    cfg = BertConfig(**{**TINY, "intermediate_size": 40, "vocab_size": 1100})  # 4 experts of 10; bench ids start at 999
    args = argparse.Namespace(profile_route="hash-random", profile_batch=[2], profile_iters=2, profile_top=5,
                              repeats=1, min_seconds=0, student_layers=1, seq_len=16)
    (row,) = bench.profile(args, cfg, torch.device("cpu"), bench.nullcontext)
    groups = {g["group"]: g for g in row["groups"]}
    for who in ("moebert", "quarter_ffn"):
        total = sum(g[f"{who}_ms"] for g in row["groups"])
        assert abs(total - row["profiled_ms"][who]) < 1e-2, (who, total, row["profiled_ms"][who])
    # Counts, not times (the machine's noise): one labelled tolist per MoE layer (both models also
    # have attention_mask.all()'s item); a running count of each expert's tokens (cumsum) per MoE layer.
    tolist = groups["tolist (sync)"]
    assert tolist["moebert_calls"] - tolist["quarter_ffn_calls"] == cfg.num_hidden_layers
    assert groups["argsort/bincount/cumsum"]["moebert_calls"] > groups["argsort/bincount/cumsum"]["quarter_ffn_calls"]
    assert len(row["top_ops"]) == 5


@pytest.mark.parametrize("n", [12, 14, 801])  # one batched matmul; n % N != 0; over SMALL_BATCH * N
def test_unrouted_experts_are_the_experts_on_equal_runs_of_tokens(n):
    """bench.UnroutedExperts (the routing taken out, to time the matmuls alone) computes what
    Experts computes when the tokens go to the experts in order, in N runs as equal as can be."""
    cfg = MoEConfig(num_experts=3, expert_dim=11, shared_dim=5)
    moe = moebert_from_dense(tiny_model(), torch.rand(3, 37, generator=torch.Generator().manual_seed(6)), cfg)
    ex = moe.bert.encoder.layer[1].moe.experts.eval()
    x = torch.randn(n, 32)
    in_order = torch.cat([torch.full((len(run),), e) for e, run in enumerate(torch.arange(n).chunk(3))])
    with torch.no_grad():
        want = ex(x, in_order)
        ex.__class__ = bench.UnroutedExperts
        got = ex(x, in_order[torch.randperm(n)])  # the routing it is given is ignored
    assert_close(got, want, 1e-5, f"{n} tokens")


@pytest.mark.parametrize("argv, says", [
    (["--batch-sizes", "8", "0"], "--batch-sizes: '0' is not a whole number of at least 1"),
    (["--seq-len", "600"], "--seq-len 600: BERT has 512 positions"),
    (["--min-seconds", "-1"], "--min-seconds: '-1' is not a number above 0"),
    (["--threads", "0"], "--threads: '0' is not a whole number of at least 1"),
    (["--quick", "--student-layers", "5"], "--student-layers 5: the model has 4 layers"),
    (["--out", "no/such/folder/bench.json"], "its folder does not exist"),
    (["--out", "."], "--out . is a folder; pass a file path, e.g. ./bench.json"),
])
def test_bad_flags_are_one_error_line_before_any_work(argv, says, monkeypatch, capsys, tmp_path):
    """Each is refused by argparse (exit 2, one 'error:' line) before a model is built or a file written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["bench.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_cuda_graphs_of_the_readable_moebert_need_the_grouped_kernel(monkeypatch, capsys):
    """On a GPU without torch's grouped kernel (an A100, say: capability 8.0) the readable MoEBERT
    reads its experts' sizes back, which no CUDA graph can capture: one error line, before any work."""
    monkeypatch.setattr(bench, "check_device", lambda name: None)  # a CUDA machine, as far as bench knows
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr("sys.argv", ["bench.py", "--device", "cuda", "--cuda-graphs"])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "capability 8.0" in err and "add --fast" in err, err
