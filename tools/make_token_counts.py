"""Write fixtures/rte_train_token_counts.json: token frequencies of the real RTE training split.

The hash-balance test needs a real token-frequency table; a sparse {token id: count} of RTE's
2490 training pairs under the MiniLM (BERT uncased) vocabulary is small enough to commit.

    python tools/make_token_counts.py $GLUE/RTE ~/.cache/moebert/all-minilm-l6-v2/vocab.txt
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402

rte_dir, vocab = sys.argv[1], sys.argv[2]
features = data.encode(data.read_glue("rte", rte_dir, "train"), data.load_tokenizer(vocab), 512)
counts = data.token_counts(features, 30522)
sparse = {int(i): int(counts[i]) for i in counts.nonzero().flatten()}
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "rte_train_token_counts.json")
with open(out, "w") as f:
    json.dump(sparse, f, separators=(",", ":"))
print(f"{len(sparse)} distinct tokens, {sum(sparse.values())} in all -> {out}")
