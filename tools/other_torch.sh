#!/usr/bin/env bash
# The test suite on another torch or Python than CI's, in a virtual environment of its own:
#   bash tools/other_torch.sh 2.1.2                     (default 2.1.2, the oldest requirements.txt admits)
#   PYTHON=~/.pyenv/versions/3.13.0/bin/python bash tools/other_torch.sh 2.14.1
# PyPI's Linux wheels are CUDA builds (about 5 GB with their libraries); they run on the CPU. Before torch 2.6 the
# references are pinned to the newest that take torch 2.1 (transformers 4.46, numpy 1.x: transformers 5 wants
# torch 2.6); from 2.6 they are requirements-dev.txt's, unpinned, as CI installs them. Tests of what torch
# added later skip, saying so (the grouped matmul on the CPU: 2.9). VENV: where the environment goes (default /tmp/venv-torch-VERSION-pyX.Y);
# PYTHON: the interpreter it is made with (default python3; pyproject.toml admits 3.10 up).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-2.1.2}
python=${PYTHON:-python3}
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv=${VENV:-/tmp/venv-torch-$version-py$pyver}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
IFS=. read -r major minor _ <<< "$version"
if (( major == 2 && minor < 6 )); then
  refs=("numpy<2" "transformers<4.47" tokenizers safetensors pytest scikit-learn scipy)
else
  refs=(-r requirements-dev.txt)  # its `-e .` installs the package too
fi
"$venv/bin/pip" install -q "torch==$version" "${refs[@]}"
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/python" -c "import sys, torch, transformers; print('Python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider -rs
