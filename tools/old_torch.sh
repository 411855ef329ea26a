#!/usr/bin/env bash
# The test suite on an older torch than CI's, in a virtual environment of its own:
#   bash tools/old_torch.sh 2.1.2      (any release requirements.txt admits; default 2.1.2, the oldest)
# PyPI's Linux wheels of these releases are CUDA builds (about 5 GB with their libraries); they run on the CPU.
# transformers 4.46 and numpy 1.x are the newest the tests' references take on torch 2.1. Tests of what torch added
# later skip, saying so (the grouped matmul: 2.8). VENV: where the environment goes (default /tmp/venv-torch-VERSION);
# PYTHON: the interpreter it is made with (default python3; e.g. a Python 3.10, the oldest pyproject.toml admits).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-2.1.2}
venv=${VENV:-/tmp/venv-torch-$version}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/pip" install -q "torch==$version" "numpy<2" "transformers<4.47" tokenizers safetensors pytest scikit-learn scipy
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/python" -c "import sys, torch; print('Python', sys.version.split()[0], 'torch', torch.__version__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider -rs
