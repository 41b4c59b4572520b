#!/usr/bin/env bash
# How the H200 figures in BENCHMARKS.md were taken: each step is one command on the GPU machine (repo root, the
# CIFAR-10 train shards in datasets/cifar10, wheels of what the machine lacks in .whl/, results under $OUT).
#   bench/h200.sh setup       # wheels -> /tmp/site, `ddm` and `ddm-train` on PATH, shards -> /tmp/datasets
#   bench/h200.sh stage       # GPU resume tests, bench/stage_throughput.py, bench/data_throughput.py
#   bench/h200.sh ckpt      # DiT-XL/2's checkpoint size, stall, SIGTERM save and resume
#   bench/h200.sh mfu       # DiT-XL/2's model-only step: as trained, coordinate-descent tuning, residual stream bf16,
#                           # max-autotune (MFU_CONFIGS picks; TEXT=1: the text model instead); batch 256 on an H200,
#                           # 128 on an H100
#   bench/h200.sh stage-xl  # DiT-XL/2's expert stage as users run it, compile mode max-autotune-no-cudagraphs against
#                           # the default, each beside the model-only step and the bf16 peak of the same command
#   bench/h200.sh stage-text  # the text-to-image DiT-XL/2 stage on SD-VAE latents with CLIP-width captions (issue 10)
#   bench/h200.sh residual  # DiT-XL/2's training loss with the residual stream bf16 against fp32 (bench/residual_quality.py)
#   bench/h200.sh attn-mfu  # DiT-XL/2 (and with text, TEXT=1) under PyTorch's default attention kernel and cuDNN's;
#                           # batch 256 on an H200, 128 on an H100 (256 does not fit its 80 GB)
#   bench/h200.sh recheck     # DiT-S/2's stage rate, DiT-XL/2's checkpoint size/stall/resume, the data path
#   bench/h200.sh pipeline    # examples/cifar10-h200.yaml: ddm run, SIGTERM while the experts train, ddm run again
#   bench/h200.sh eval        # bench/eval_throughput.py on the pipeline's experts (FID-10k of 4 strategies)
#   bench/h200.sh latent-mfu  # DiT-XL/2 on 32x32x4 latents with cross-attention to 77 x 768 caption tokens
#   bench/h200.sh xattn       # bench/cross_attention.py (the masked cross-attention per kernel, one block with and
#                             # without it), then latent-mfu with every caption token real and with padded captions
#   bench/h200.sh encode      # the encode stage's SD-VAE (random weights) at 256 px: bench/encode_throughput.py
#   bench/h200.sh eval10k     # examples/cifar10-h200.yaml with FID-10k and nothing beside the evaluation, then
#                             # bench/eval_throughput.py --from-run on the stage ddm run ran (ideal vs measured);
#                             # resumable: run it again in the next call when a call's time runs out
#   bench/h200.sh text        # examples/cifar10-text-h200.yaml through ddm run: grids per prompt, FID-5k
#   bench/h200.sh text-grids  # a lease too short for Inception's two parts: the text DDM trains through ddm run
#                             # (stopped when its evaluation starts: no Inception, no FID), then ddm sample draws a
#                             # grid of all prompts for full and top1 at each guidance scale in CFG (default 2), with
#                             # the images for bench/prompt_adherence.py; one CFG keeps a call within its 8 files
#   bench/h200.sh small-batch # DiT-S/2's expert stage at batch 32 (BATCHES="32 64": both), compile mode default vs
#                             # reduce-overhead (CUDA graphs), beside the model-only step; the compile-mode GPU tests
#                             # first (~3 min)
#   bench/h200.sh study ARGS  # bench/paper_study.py ARGS in one device command: stopped at DEADLINE_S (500 s; its
#                             # stages checkpoint, exit 75), the same command goes on; work in /tmp/study; under $OUT
#                             # paper_study.md, paper_study.txt and study.tar.gz (results/ with paper_study_arms/*.json,
#                             # what --arms-from reads back here; grids/; logs; each committed strategy row)
# `bash bench/device_pack.sh` builds here what the calls carry (.device/whlnf, datasets/cifar10, .device/incxz{0,1}).
# What a call carries beside the repo must fit 64 MiB, so extras travel when a call has room: .device/diffusers
# (the diffusers wheel) and .device/minilm (all-MiniLM-L6-v2 with its weights stored as fp16, 45 MB instead of 91;
# turned back into fp32 here: the encoder then runs on weights rounded to fp16).
# The Inception weights (95.7 MB, over one call's transfer limit) travel in parts: .device/inc{0,1,2}/part, kept by
# whichever call carries them and joined into /tmp/inception.pth once all three are there (`bench/h200.sh inception`);
# or its xz in two parts, .device/incxz{0,1}/part (`xz -9`, split so the first fits beside .whl and the shards).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/trainer:$PWD/operator PATH=/tmp/bin:$PATH
export DDM_INCEPTION_WEIGHTS=/tmp/inception.pth
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

inception() {  # the parts wait in /tmp/inception-parts; the file appears only whole (a part is no Inception)
  mkdir -p /tmp/inception-parts
  for p in 0 1 2; do [ -f .device/inc$p/part ] && cp .device/inc$p/part /tmp/inception-parts/$p; done
  for p in 0 1; do [ -f .device/incxz$p/part ] && cp .device/incxz$p/part /tmp/inception-parts/xz$p; done
  if [ ! -f /tmp/inception.pth ] && [ -f /tmp/inception-parts/0 ] && [ -f /tmp/inception-parts/1 ] && [ -f /tmp/inception-parts/2 ]; then
    cat /tmp/inception-parts/0 /tmp/inception-parts/1 /tmp/inception-parts/2 > /tmp/inception.pth.tmp && mv /tmp/inception.pth.tmp /tmp/inception.pth
  fi
  # or two parts of its xz (79.6 MB: with the wheels and the shards in the first call, two calls instead of three)
  if [ ! -f /tmp/inception.pth ] && [ -f /tmp/inception-parts/xz0 ] && [ -f /tmp/inception-parts/xz1 ]; then
    cat /tmp/inception-parts/xz0 /tmp/inception-parts/xz1 | python3 -c 'import lzma, sys; sys.stdout.buffer.write(lzma.decompress(sys.stdin.buffer.read()))' \
      > /tmp/inception.pth.tmp && mv /tmp/inception.pth.tmp /tmp/inception.pth
  fi
  ls -l /tmp/inception-parts /tmp/inception.pth 2>&1 | tail -n 5
}

extras() {
  if [ -d .device/diffusers ]; then
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .device/diffusers/*.whl
  fi
  if [ -f .device/minilm/model.fp16.safetensors ] && [ ! -f /tmp/models/all-MiniLM-L6-v2/model.safetensors ]; then
    mkdir -p /tmp/models/all-MiniLM-L6-v2 && cp -r .device/minilm/. /tmp/models/all-MiniLM-L6-v2/
    python3 - <<'PY'
from safetensors.torch import load_file, save_file
d = "/tmp/models/all-MiniLM-L6-v2/"
sd = load_file(d + "model.fp16.safetensors")
save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, d + "model.safetensors")
PY
    rm /tmp/models/all-MiniLM-L6-v2/model.fp16.safetensors
  fi
}

case "${1:-}" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    mkdir -p /tmp/bin
    printf '#!/bin/sh\nexec python3 -m ddm_trainer.cli "$@"\n' > /tmp/bin/ddm-train
    printf '#!/bin/sh\nexec python3 -m ddm_operator.cli "$@"\n' > /tmp/bin/ddm
    chmod +x /tmp/bin/*
    rm -rf /tmp/datasets && mkdir -p /tmp/datasets && cp -r datasets/cifar10 /tmp/datasets/
    # the efficientnet_lite0 encoder's weights (bench/device_pack.sh), for the study's -lite0 arms
    [ -f .device/lite0/lite0-fp16.pt ] && cp .device/lite0/lite0-fp16.pt /tmp/lite0-fp16.pt
    inception
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    ;;
  inception) inception ;;
  stage)
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/unit/trainer/test_resume_devices.py 2>&1 | tail -5 | tee "$OUT/resume_tests.txt"
    timeout 380 python3 bench/stage_throughput.py --data "/tmp/datasets/cifar10/cifar10-train-*.tar.gz" \
      --steps 300,200,80 --model-steps 15 --ckpt-every 20 --work /tmp/stage-bench 2>&1 | tee "$OUT/stage_throughput.txt"
    timeout 75 python3 bench/data_throughput.py --data /tmp/datasets/cifar10 --workers 0,4,8 --epochs 2 2>&1 \
      | tee "$OUT/data_throughput.txt"
    cp bench/results/stage_throughput.json bench/results/data_throughput.json "$OUT/" 2>/dev/null
    ;;
  recheck)  # after a change to the training loop or the data path: DiT-S/2 again, DiT-XL/2's checkpoints, the data path
    D="/tmp/datasets/cifar10/cifar10-train-*.tar.gz"
    timeout 150 python3 bench/stage_throughput.py --data "$D" --presets DiT-S/2 --steps 300 --model-steps 15 \
      --checkpoint-preset '' --work /tmp/stage-bench-s 2>&1 | tee "$OUT/stage_throughput_s2.txt"
    # 120 steps, periodic checkpoints at 50 and 100, SIGTERM at step 80, then the resume
    bash "$0" ckpt
    timeout 90 python3 bench/data_throughput.py --data /tmp/datasets/cifar10 --workers 0,4,8 --epochs 3 2>&1 \
      | tee "$OUT/data_throughput.txt"
    cp bench/results/stage_throughput.json bench/results/data_throughput.json "$OUT/" 2>/dev/null
    ;;
  ckpt)  # DiT-XL/2's checkpoints: 120 steps, periodic checkpoints at 50 and 100, SIGTERM at step 80, then the resume
    # (batch 128 on an H100: 256 runs out of its 80 GB; XL_BATCH=256 on an H200)
    timeout 300 python3 bench/stage_throughput.py --data "/tmp/datasets/cifar10/cifar10-train-*.tar.gz" \
      --presets DiT-XL/2 --batch "${XL_BATCH:-128}" --steps 120 --ckpt-every 50 --checkpoint-only \
      --work /tmp/stage-bench-ckpt 2>&1 | tee "$OUT/stage_throughput_ckpt.txt"
    cp bench/results/stage_throughput.json "$OUT/" 2>/dev/null
    ;;
  mfu)  # DiT-XL/2 model-only step, the trainer's setting against two candidates for fewer bytes a step: the
        # residual stream in bf16 (autocast keeps it fp32: the pointwise kernels read and write it in fp32, and each
        # block saves its fp32 input, 302 of the 2,930 MB it saves at batch 256: bench/saved_activations.py), and
        # max-autotune's Triton GEMMs with the bias/GELU pointwise work fused into them. TEXT=1: the text model instead (each run takes up to ~4 min: one model a call).
        # Batch 256 on an H200, 128 on an H100. (Whole-model compile measured the same as regional: not repeated.)
    B=128; nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && B=256
    variants=(""); [ -n "${TEXT:-}" ] && variants=("--channels 4 --text-dim 768 --text-tokens 77 --text-mask captions")
    for v in "${variants[@]}"; do
      # MFU_CONFIGS: the settings to run, '|' between them (coordinate-descent: inductor's tuning of its own
      # pointwise and norm kernels, the memory-bound part of the step, at a fraction of max-autotune's compile)
      IFS='|' read -ra configs <<< "${MFU_CONFIGS:-regional|regional --coordinate-descent|regional --residual bf16|regional --compile-mode max-autotune-no-cudagraphs}"
      for c in "${configs[@]}"; do
        timeout 280 python3 bench/expert_throughput.py --presets DiT-XL/2 --batch "${XL_BATCH:-$B}" --steps 15 \
          --compile $c $v --out "$OUT/mfu-$(echo "$c$v" | tr -c 'a-z0-9' _ | cut -c1-60).json" 2>&1 | tail -4 \
          | tee -a "$OUT/mfu.txt"
      done
    done
    ;;
  stage-xl)  # DiT-XL/2 through `ddm-train expert` (bench/stage_throughput.py: the stage, the model-only step and the
             # bf16 matmul peak in one command) in each compile mode of MODES (default: max-autotune-no-cudagraphs,
             # then default); batch 256 on an H200, 128 on an H100. max-autotune's autotuning of XL/2's GEMMs ran past
             # 230 s before its model-only step's first timed step on an H100 (2026-12-07): give it a call of its own,
             # MODES=max-autotune-no-cudagraphs STAGE_XL_S=560 (its autotune cache in /tmp serves the stage's compile).
             # STAGE_XL_ARGS: more settings of both, e.g. "--residual bf16 --coordinate-descent".
    B=128; nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && B=256
    for m in ${MODES:-max-autotune-no-cudagraphs default}; do
      timeout "${STAGE_XL_S:-300}" python3 bench/stage_throughput.py --data "/tmp/datasets/cifar10/cifar10-train-*.tar.gz" \
        --presets DiT-XL/2 --batch $B --steps 120 --model-steps 15 --checkpoint-preset '' --compile-mode $m ${STAGE_XL_ARGS:-} \
        --work /tmp/stage-xl-$m --results-dir "$OUT" 2>&1 | tail -6 | tee -a "$OUT/stage_xl.txt"
    done
    ;;
  stage-text)  # issue 10: the text-to-image DiT-XL/2 expert stage on 32x32x4 latents as users run it
               # (bench/stage_throughput.py --latent-text: the cluster stage encodes 8,192 images at 256 px with
               # the SD VAE's architecture and their captions with a 768-d CLIP text tower, 77 tokens, random
               # weights; the stage beside the model-only step of the same shapes). STAGE_XL_ARGS as for stage-xl.
    extras
    B=128; nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && B=256
    timeout "${STAGE_TEXT_S:-420}" python3 bench/stage_throughput.py --data "/tmp/datasets/cifar10/cifar10-train-*.tar.gz" \
      --latent-text --presets DiT-XL/2 --batch $B --steps 120 --model-steps 15 --checkpoint-preset '' ${STAGE_XL_ARGS:-} \
      --work /tmp/stage-text --results-dir "$OUT" 2>&1 | tail -8 | tee -a "$OUT/stage_text.txt"
    ;;
  residual)  # bench/residual_quality.py: DiT-XL/2's training loss, residual stream bf16 against fp32, through
             # `ddm-train expert` from the same seed and data order (batch 256 on an H200, 128 on an H100)
    B=128; nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && B=256
    timeout "${RESIDUAL_S:-400}" python3 bench/residual_quality.py --data /tmp/datasets/cifar10 --preset DiT-XL/2 \
      --steps "${RESIDUAL_STEPS:-300}" --batch $B --lr 1e-4 --work /tmp/residual --results-dir "$OUT" 2>&1 | tail -5 \
      | tee "$OUT/residual_quality.txt"
    ;;
  attn-mfu)
    B=128; nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && B=256
    variants=(""); [ -n "${TEXT:-}" ] && variants+=("--channels 4 --text-dim 768 --text-tokens 77 --text-mask captions")
    for v in "${variants[@]}"; do
      for k in default cudnn; do
        timeout 200 python3 bench/expert_throughput.py --presets DiT-XL/2 --batch $B --steps 15 --sdpa $k $v \
          --out "$OUT/attn-mfu.json" 2>&1 | tail -3 | tee -a "$OUT/attn-mfu.txt"
      done
    done
    ;;
  pipeline)
    inception
    rm -rf /tmp/cifar10-run; [ -e datasets ] || ln -s /tmp/datasets datasets
    start=$(date +%s)
    # the first invocation is stopped by SIGTERM while the experts train, as a preemption would
    timeout -s TERM "${STOP_AFTER:-90}" ddm run examples/cifar10-h200.yaml --run-dir /tmp/cifar10-run 2>&1 | tee "$OUT/pipeline-1.txt"
    echo "first invocation exited $? after $(( $(date +%s) - start )) s"
    ddm run examples/cifar10-h200.yaml --run-dir /tmp/cifar10-run 2>&1 | tee "$OUT/pipeline-2.txt"
    echo "second invocation exited $?; both took $(( $(date +%s) - start )) s" | tee -a "$OUT/pipeline-2.txt"
    grep -h '"event": "resumed"' /tmp/cifar10-run/logs/expert-*.progress.jsonl | tee "$OUT/resumed.txt"
    cp /tmp/cifar10-run/evaluation/results.md "$OUT/" 2>/dev/null
    ddm status /tmp/cifar10-run 2>&1 | tee "$OUT/status.txt"
    (cd /tmp/cifar10-run/logs && tar czf "$OUT/logs.tgz" .)
    ;;
  eval)
    inception
    timeout 560 python3 bench/eval_throughput.py --run /tmp/cifar10-run --data "/tmp/datasets/cifar10/cifar10-train-*.tar.gz" 2>&1 \
      | tee "$OUT/eval_throughput.txt"
    cp bench/results/eval_throughput.json "$OUT/" 2>/dev/null
    ;;
  extras) extras ;;
  latent-mfu)  # TEXT_MASK=captions: 5..77 real tokens per caption, the rest padding (full: all 77 real)
    timeout 300 python3 bench/expert_throughput.py --presets DiT-XL/2 --batch "${XL_BATCH:-128}" --channels 4 \
      --text-dim 768 --text-tokens 77 --text-mask "${TEXT_MASK:-full}" --out "$OUT/expert_throughput_latent.json" \
      2>&1 | tail -4 | tee -a "$OUT/latent_mfu.txt"
    ;;
  xattn)
    timeout 200 python3 bench/cross_attention.py --out "$OUT/cross_attention.json" 2>&1 | tee "$OUT/cross_attention.txt"
    TEXT_MASK=full bash "$0" latent-mfu
    TEXT_MASK=captions bash "$0" latent-mfu
    ;;
  encode)
    extras
    timeout 200 python3 bench/encode_throughput.py --batch 64 --iters 10 2>&1 | tee "$OUT/encode_throughput.txt"
    cp bench/results/encode_throughput.json "$OUT/" 2>/dev/null
    ;;
  eval10k)
    # resumable: without the Inception weights yet, the experts and router train and the evaluation stops at once
    # (missing artifact); the same step once they are there runs the evaluation alone
    inception
    [ -e datasets ] || ln -s /tmp/datasets datasets
    # the example's experts and router; FID-10k; no distillation, so nothing shares the GPU with the evaluation
    python3 - <<'PY'
import yaml
s = yaml.safe_load(open("examples/cifar10-h200.yaml"))
s["spec"]["evaluation"]["numSamples"] = 10000
s["spec"]["distillation"]["enabled"] = False
s["spec"]["storage"]["uri"] = "/tmp/cifar10-10k"
yaml.safe_dump(s, open("/tmp/cifar10-10k.yaml", "w"))
PY
    start=$(date +%s)
    timeout -k 45 "${RUN_TIMEOUT:-480}" ddm run /tmp/cifar10-10k.yaml --run-dir /tmp/cifar10-10k 2>&1 | tee "$OUT/eval10k-run.txt"
    echo "ddm run exited $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/eval10k-run.txt"
    cp /tmp/cifar10-10k/evaluation/results.md /tmp/cifar10-10k/evaluation/results.json "$OUT/" 2>/dev/null || exit 0
    timeout 100 python3 bench/eval_throughput.py --from-run --run /tmp/cifar10-10k 2>&1 | tee "$OUT/eval_throughput.txt"
    cp bench/results/eval_throughput.json "$OUT/" 2>/dev/null
    ;;
  text)
    extras; inception
    rm -rf /tmp/text-run; [ -e datasets ] || ln -s /tmp/datasets datasets; [ -e models ] || ln -s /tmp/models models
    start=$(date +%s)
    SPEC=examples/cifar10-text-h200.yaml
    if [ -n "${TEXT_N:-}" ]; then  # a shorter evaluation when the lease is short (FID-N_TEXT instead of FID-5k)
      TEXT_N=$TEXT_N python3 -c 'import os, yaml; s = yaml.safe_load(open("'$SPEC'")); s["spec"]["evaluation"]["numSamples"] = int(os.environ["TEXT_N"]); yaml.safe_dump(s, open("/tmp/text.yaml", "w"))'
      SPEC=/tmp/text.yaml
    fi
    timeout -k 45 "${RUN_TIMEOUT:-540}" ddm run $SPEC --run-dir /tmp/text-run 2>&1 | tee "$OUT/text-run.txt"
    echo "ddm run exited $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/text-run.txt"
    mkdir -p "$OUT/text" && cd /tmp/text-run && find . \( -name '*.png' -o -name 'results.md' -o -name 'results.json' \
      -o -name '*.progress.jsonl' -o -name 'report*' \) -size -2M -exec cp --parents {} "$OUT/text/" \;
    ;;
  text-grids)
    extras
    # RESUME=1 (a chained call on the warm machine): ddm run goes on with the run the last call stopped
    [ -n "${RESUME:-}" ] || rm -rf /tmp/text-run
    [ -e datasets ] || ln -s /tmp/datasets datasets; [ -e models ] || ln -s /tmp/models models
    SPEC=examples/cifar10-text-h200.yaml
    if [ -n "${EXPERT_STEPS:-}" ]; then  # a shorter lease: fewer expert and router steps (the store: --run-dir)
      EXPERT_STEPS=$EXPERT_STEPS python3 -c 'import os, yaml; s = yaml.safe_load(open("'$SPEC'")); n = int(os.environ["EXPERT_STEPS"]); s["spec"]["experts"]["steps"] = n; s["spec"]["router"]["steps"] = min(n, s["spec"]["router"]["steps"]); yaml.safe_dump(s, open("/tmp/text.yaml", "w"))'
      SPEC=/tmp/text.yaml
    fi
    start=$(date +%s)
    ddm run $SPEC --run-dir /tmp/text-run > "$OUT/text-run.txt" 2>&1 &
    pid=$!
    until grep -q 'launched evaluate' "$OUT/text-run.txt" || ! kill -0 $pid 2>/dev/null \
        || [ $(( $(date +%s) - start )) -gt "${TRAIN_LIMIT:-330}" ]; do sleep 3; done
    kill -TERM $pid; wait $pid
    echo "ddm run stopped after $(( $(date +%s) - start )) s" | tee -a "$OUT/text-run.txt"
    # ddm sample reads the run where ddm run --run-dir put it (not the spec's storage.uri); per-prompt grids stay
    # in /tmp (a call brings back 8 files): per scale the two grids of all prompts and their samples.npz, and the
    # stages' progress logs
    mkdir -p "$OUT/text" /tmp/text-grids
    prompts=(); for c in airplane automobile bird cat deer dog frog horse ship truck; do prompts+=(--prompt "a photo of a $c"); done
    for cfg in ${CFG:-2}; do  # CFG="2 4": a grid per strategy and guidance scale
      for strategy in full top1; do
        timeout 150 ddm sample /tmp/text-run --strategy $strategy -n 16 --cfg-scale "$cfg" \
          "${prompts[@]}" -o "/tmp/text-grids/$strategy-cfg$cfg.png" 2>&1 | grep -v Warning | tail -3
        cp "/tmp/text-grids/$strategy-cfg$cfg.png" "$OUT/text/"
        # the images with their prompts, for bench/prompt_adherence.py --samples (160 x 32 x 32 x 3: ~0.5 MB)
        latest=$(ls -td /tmp/text-run/samples/cli-$strategy-n16-* 2>/dev/null | head -1)
        [ -n "$latest" ] && cp "$latest/samples.npz" "$OUT/text/$strategy-cfg$cfg.npz"
      done
    done
    echo "grids done after $(( $(date +%s) - start )) s"; ls -l "$OUT/text"
    # how many samples follow their prompt, by a CIFAR-10 classifier trained here; it needs the test shard, which
    # travels apart (.device/cifar10test, 3.6 MB: with the wheels, the train shards and MiniLM the first call is full)
    [ -d .device/cifar10test ] && cp .device/cifar10test/*.tar.gz /tmp/datasets/cifar10/
    if ls /tmp/datasets/cifar10/cifar10-test-*.tar.gz > /dev/null 2>&1 && ls "$OUT"/text/*.npz > /dev/null 2>&1; then
      args=(); for f in "$OUT"/text/*.npz; do args+=(--samples "$(basename "$f" .npz)-${EXPERT_STEPS:-spec}steps=$f"); done
      timeout 180 python3 bench/prompt_adherence.py --data /tmp/datasets/cifar10 "${args[@]}" \
        --label "text CIFAR-10 DDM (bench/h200.sh text-grids)" --out "$OUT/prompt_adherence.json" 2>&1 \
        | grep -v Warning | tail -4 | tee -a "$OUT/text-run.txt"
    fi
    cp /tmp/text-run/logs/router.progress.jsonl /tmp/text-run/logs/expert-000.progress.jsonl "$OUT/text/" 2>/dev/null
    ;;
  small-batch)  # DiT-S/2's expert stage at small batches, as compiled by default and with CUDA graphs
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/trainer/test_compile_modes.py 2>&1 | tail -3 \
      | tee "$OUT/compile_modes_tests.txt"
    for b in ${BATCHES:-32}; do for mode in default reduce-overhead; do
      set -- "$b" "$mode"
      timeout 150 python3 bench/stage_throughput.py --data "/tmp/datasets/cifar10/cifar10-train-*.tar.gz" \
        --presets DiT-S/2 --batch "$1" --steps 800 --log-every 50 --model-steps 200 --checkpoint-preset '' \
        --compile-mode "$2" --work "/tmp/small-batch-$1-$2" --results-dir "$OUT/small-batch" 2>&1 | tail -4
    done; done | tee "$OUT/small_batch.txt"
    ;;
  study)
    shift
    inception
    timeout 590 python3 bench/paper_study.py --data "/tmp/datasets/cifar10/cifar10-train-*.tar.gz" --work /tmp/study \
      --ddm ddm --results-dir /tmp/study/results --grids /tmp/study/grids --links bench/results/paper_study \
      --md "$OUT/paper_study.md" --deadline-s "${DEADLINE_S:-500}" "$@" 2>&1 | tee -a "$OUT/paper_study.txt"
    echo "paper_study exited ${PIPESTATUS[0]}" | tee -a "$OUT/paper_study.txt"
    # everything else in one archive (a call brings back at most 8 files): the tables and arms (results/), the grids
    # and fid_vs_steps.png (grids/), the logs independence is read from, and each strategy's row as the evaluation
    # committed it (store/evaluation/strategies/: kept when a lease ends before the arm's table is whole)
    (cd /tmp/study && tar czf "$OUT/study.tar.gz" results grids */run/logs/*.progress.jsonl */run/logs/*.log \
      $(find . -path '*/evaluation/strategies/*' \( -name '*.json' -o -name '*.png' \) 2>/dev/null) 2>/dev/null)
    find /tmp/study -path '*/evaluation/strategies/*' -name '*.json' -exec grep -ho '"strategy": *"[^"]*"\|"fid": *[0-9.]*' {} + 2>/dev/null \
      | tee -a "$OUT/paper_study.txt"
    ;;
  *) echo "usage: bench/h200.sh setup|inception|extras|stage|recheck|ckpt|mfu|stage-text|residual|attn-mfu|pipeline|eval|latent-mfu|xattn|encode|eval10k|text|text-grids|small-batch|study" >&2; exit 2 ;;
esac
