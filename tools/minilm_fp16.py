"""Copy a BERT folder (config.json, vocab.txt, model.safetensors) with every float tensor cast to fp16.

    python tools/minilm_fp16.py ~/.cache/moebert/minilm gpu_carry/minilm             # 91 MB -> 45 MB
    python tools/minilm_fp16.py gpu_carry/minilm /tmp/cache/minilm --dtype fp32     # back to fp32

Why: a machine without internet can only be handed a few tens of MB, and MiniLM in fp32 is 91 MB.
The fp16 copy loads into our fp32 model as is (bert.load_weights upcasts, exactly); --dtype fp32
writes an fp32 folder from it again, for code that compares two loaders of the same file (the tests
hold ours and Hugging Face's reference BERT to 1e-5, which a loader keeping fp16 would not meet).
Integer tensors (e.g. position ids) are copied unchanged. The folder appears only once complete.
"""
import argparse
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FILES = ("config.json", "vocab.txt")  # copied byte for byte


def convert(src, dst, dtype=torch.float16):
    """Write dst/ from src/; returns {name: (old dtype, new dtype)} of the cast tensors."""
    for f in FILES + ("model.safetensors",):
        if not os.path.exists(os.path.join(src, f)):
            raise SystemExit(f"{src}: no {f}; pass a Hugging Face BERT folder (config.json, vocab.txt, model.safetensors)")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    # Only floating tensors change: ids and counts must stay integers.
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    partial = dst.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for f in FILES:
        shutil.copyfile(os.path.join(src, f), os.path.join(partial, f))
    # "format": "pt" is what Hugging Face's loader expects in the header of a PyTorch safetensors file.
    save_file({k: v.contiguous() for k, v in cast.items()}, os.path.join(partial, "model.safetensors"),
              metadata={"format": "pt"})
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(partial, dst)  # never leave a half-written folder under the real name
    return {k: (tensors[k].dtype, cast[k].dtype) for k in tensors if tensors[k].is_floating_point()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="folder with config.json, vocab.txt, model.safetensors")
    p.add_argument("dst", help="output folder (replaced if it exists)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="dtype of the float tensors")
    args = p.parse_args()
    changed = convert(os.path.expanduser(args.src), args.dst, DTYPES[args.dtype])
    size = os.path.getsize(os.path.join(args.dst, "model.safetensors"))
    print(f"{args.dst}: {len(changed)} float tensors as {args.dtype}, model.safetensors {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
