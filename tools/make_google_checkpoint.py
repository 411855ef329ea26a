"""Write a tiny random BERT checkpoint exactly the way Google's original BERT code did.

The fixture it produces (fixtures/google_tiny/) lets the project test its
TensorFlow-free checkpoint reader against files written by *real* TensorFlow,
using the variable names of google-research/bert (modeling.py, run_pretraining.py,
optimization.py). TensorFlow is NOT a project dependency; run this in a
throwaway virtual environment:

    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu numpy && /tmp/tfvenv/bin/python tools/make_google_checkpoint.py

Output, like a Google release folder (minus the .meta graph file):
    bert_config.json, vocab.txt,
    bert_model.ckpt.index, bert_model.ckpt.data-00000-of-00001   (TF "V2" checkpoint)
    reference.npz   the same tensors, keyed by TF name, in numpy's own format
"""
import json
import os

import numpy as np

CONFIG = {  # Google's bert_config.json keys, tiny sizes
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "type_vocab_size": 2,
    "vocab_size": 99,
}
SPECIAL = ["[PAD]"] + [f"[unused{i}]" for i in range(5)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = """. , ! ? ' - a an the of and to in is was it that for on with as he she they we you i
his her their be are were by at from this but not or have had has one two new first time year
people world good great day man dog cat run play read learn model expert mix un
##s ##ed ##ing ##ly ##er ##est ##ion ##al ##y ##e ##t ##n ##a ##o ##r ##i ##able ##ness ##ment
##ful ##less ##ize ##ist ##ity""".split()
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "google_tiny")


def make_tensors(seed=1234):
    """name -> numpy array, Google's names and shapes; kernels are [in, out] as in TF."""
    rng = np.random.default_rng(seed)
    h, ff, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    t = {}

    def dense(name, n_in, n_out):  # weights ~ N(0, 0.02); biases nonzero so a mix-up shows
        t[name + "/kernel"] = rng.normal(0, 0.02, (n_in, n_out)).astype(np.float32)
        t[name + "/bias"] = rng.normal(0, 0.1, (n_out,)).astype(np.float32)

    def layer_norm(name):  # gamma near 1, beta near 0, but not exactly
        t[name + "/gamma"] = (1 + rng.normal(0, 0.1, (h,))).astype(np.float32)
        t[name + "/beta"] = rng.normal(0, 0.1, (h,)).astype(np.float32)

    t["bert/embeddings/word_embeddings"] = rng.normal(0, 0.02, (v, h)).astype(np.float32)
    t["bert/embeddings/token_type_embeddings"] = rng.normal(0, 0.02, (CONFIG["type_vocab_size"], h)).astype(np.float32)
    t["bert/embeddings/position_embeddings"] = rng.normal(0, 0.02, (CONFIG["max_position_embeddings"], h)).astype(np.float32)
    layer_norm("bert/embeddings/LayerNorm")
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"bert/encoder/layer_{i}"
        for name in ("query", "key", "value"):
            dense(f"{p}/attention/self/{name}", h, h)
        dense(f"{p}/attention/output/dense", h, h)
        layer_norm(f"{p}/attention/output/LayerNorm")
        dense(f"{p}/intermediate/dense", h, ff)
        dense(f"{p}/output/dense", ff, h)
        layer_norm(f"{p}/output/LayerNorm")
    dense("bert/pooler/dense", h, h)
    # pre-training heads (run_pretraining.py); the MLM decoder reuses word_embeddings
    dense("cls/predictions/transform/dense", h, h)
    layer_norm("cls/predictions/transform/LayerNorm")
    t["cls/predictions/output_bias"] = rng.normal(0, 0.1, (v,)).astype(np.float32)
    t["cls/seq_relationship/output_weights"] = rng.normal(0, 0.02, (2, h)).astype(np.float32)
    t["cls/seq_relationship/output_bias"] = rng.normal(0, 0.1, (2,)).astype(np.float32)
    t["global_step"] = np.array(12345, dtype=np.int64)
    # Adam slots as written by optimization.py's AdamWeightDecayOptimizer
    for name in ("bert/pooler/dense/kernel", "bert/pooler/dense/bias"):
        t[name + "/adam_m"] = rng.normal(0, 1e-3, t[name].shape).astype(np.float32)
        t[name + "/adam_v"] = np.square(rng.normal(0, 1e-3, t[name].shape)).astype(np.float32)
    return t


def main():
    import tensorflow as tf  # only here: the project itself never imports TensorFlow

    tf.compat.v1.disable_eager_execution()  # the graph-mode Saver of TF 1.x, as Google used
    os.makedirs(OUT, exist_ok=True)
    vocab = SPECIAL + WORDS
    assert len(vocab) == CONFIG["vocab_size"] and len(set(vocab)) == len(vocab), len(vocab)
    tensors = make_tensors()
    # name -> variable dict: the Saver then stores exactly these names (no object-graph suffixes)
    variables = {name: tf.compat.v1.Variable(value, name=name.replace("/", "__"))
                 for name, value in tensors.items()}
    saver = tf.compat.v1.train.Saver(var_list=variables, write_version=tf.compat.v1.train.SaverDef.V2)
    with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        saver.save(sess, os.path.join(OUT, "bert_model.ckpt"), write_meta_graph=False, write_state=False)
    with open(os.path.join(OUT, "bert_config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(OUT, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    np.savez(os.path.join(OUT, "reference.npz"), **tensors)  # plain arrays only: loadable without pickle
    # check the round trip with TensorFlow's own reader before anyone relies on the files
    reader = tf.train.load_checkpoint(os.path.join(OUT, "bert_model.ckpt"))
    assert sorted(reader.get_variable_to_shape_map()) == sorted(tensors)
    for name, value in tensors.items():
        assert np.array_equal(reader.get_tensor(name), value), name
    print(f"wrote {len(tensors)} tensors with TensorFlow {tf.__version__} to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
