#!/usr/bin/env bash
# Build a side environment with the stack the GPU machines in reach carry: Python 3.12, torch 2.11.0,
# Triton 3.6.0 (docs/install.md). Everything comes from PyPI; about 5 GB, mostly the CUDA libraries that
# torch's CUDA wheel loads at import even on a machine without a GPU.
#
#   tools/side_env.sh [ENV_DIR]        (default /work/side312; PYTHON312 names the interpreter)
#   cd <repo> && PYTHONPATH=$PWD ENV_DIR/bin/python -m pytest tests/test_imports.py ...
#
# NumPy stays below 2.4: Triton 3.6's interpreter fails with 2.4 (triton-lang/triton#9171).
set -euo pipefail
env_dir=${1:-/work/side312}
python=${PYTHON312:-python3.12}
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version'
"$python" -m venv "$env_dir"
pip=("$env_dir/bin/pip" install -q)
"${pip[@]}" --no-deps torch==2.11.0 triton==3.6.0
# what torch 2.11's metadata pins for Linux (torch does not import without them)
"${pip[@]}" "cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.2" \
  "cuda-bindings>=13.0.3,<14" nvidia-cudnn-cu13==9.19.0.56 nvidia-cusparselt-cu13==0.8.0 \
  nvidia-nccl-cu13==2.28.9 nvidia-nvshmem-cu13==3.4.5
"${pip[@]}" filelock "typing-extensions>=4.10" "sympy>=1.13.3" "networkx>=2.5.1" jinja2 "fsspec>=0.8.5" \
  "setuptools>=64,<82" wheel ninja "numpy<2.4" pillow tqdm pytest scipy
"$env_dir/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
