#!/usr/bin/env bash
# The GPU benchmark job: run from the repository root on the GPU machine, with .whl/ carried along
# (diffusers, diffsynth and the pure-Python packages they need that the machine lacks) and $OUT set.
# Everything it learns goes to $OUT: bench_gpu.json, RESULTS_gpu.md, gpu_*.json, log.txt. Each command has its
# own time limit; one device call may take 10 minutes, so the job comes in parts, each under that:
#   PART=1  the GPU checks (pytest -m gpu; CUDA graphs' on their own) and the mid-size side by side, eager,
#           compiled and as CUDA graphs (10 minutes at most)
#   PART=2  real size (60 blocks, 20.4B) eager: whole-block and selective checkpointing, every 2nd block
#           checkpointed, block swap, inference (also with a short negative prompt, separate and batched CFG;
#           about 8 minutes)
#   PART=3  the mid-size checkpointing modes alternated (eager, compiled), then real size compiled
#           (--compile): the same training and inference steps, also without checkpointing and with cuDNN's
#           attention (about 9 minutes)
#   PART=key  what a session with one device call should measure first (9-10 minutes: the last runs may be cut
#           when a call reaches its limit, and $OUT keeps what finished): the GPU checks, the mid-size side by
#           side in train-bf16, train-bf16-compile, train-bf16-cudagraphs, infer-bf16, infer-bf16-cudagraphs
#           and infer-bf16-batchcfg, the real-size compiled step without checkpointing (the MFU target) with
#           plain kernels and as CUDA graphs (--compile-mode reduce-overhead), the compiled selective-
#           checkpointing step with cuDNN's attention, block swap, and the inference step with a short negative
#           prompt, separate and batched
#   PART=4  real-size inference with every block streamed from pinned host memory (what --offload sequential
#           does to the DiT: block swap with no block resident), separate and batched CFG, and with 22 blocks
#           resident (generate --block-swap 22), and fp8 weights resident and streamed (about 8 minutes)
# PART=all (the default) runs parts 1-4 one after the other.
set -x
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/diffusmith-bench}
mkdir -p "$OUT"
LOG=$OUT/log.txt
PART=${PART:-all}
part() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; free -g; nproc;
  python3 -c "import importlib.metadata as m; print({p: m.version(p) for p in ('torch', 'diffusers', 'diffsynth', 'transformers', 'peft', 'einops')})"; } 2>&1 | tee -a "$LOG"

if [ "$PART" = key ]; then
# the GPU checks, then those of CUDA graphs on their own (they compile with inductor: a minute or more), so that
# a slow compile cannot cut the others short
timeout 80 python3 -m pytest -q -m gpu -k "not cuda_graph" tests/test_gpu.py tests/test_memory.py \
  tests/test_checkpoint.py tests/test_lora_layer.py -p no:cacheprovider 2>&1 | tee -a "$LOG"
timeout 150 python3 -m pytest -q -m gpu -k cuda_graph tests/test_gpu.py -p no:cacheprovider 2>&1 | tee -a "$LOG"
timeout 200 python3 benchmarks/run.py --device cuda --runs 10 --warmup 3 \
  --modes train-bf16 train-bf16-compile train-bf16-cudagraphs infer-bf16 infer-bf16-cudagraphs infer-bf16-batchcfg \
  --json "$OUT/bench_gpu.json" --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
# the MFU target: compiled without checkpointing (the least recomputation; about 105 GB of a 141 GB card:
# 61 GB of saved activations counted on the meta device), with plain kernels and replayed as CUDA graphs
# (--profile: the top ops of two more steps go to the log, for the next round of speed work)
timeout 100 python3 benchmarks/gpu.py --compile --no-gc --warmup 3 --profile 25 \
  --json "$OUT/gpu_real_nogc_compile.json" --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
timeout 100 python3 benchmarks/gpu.py --compile-mode reduce-overhead --no-gc --warmup 3 \
  --json "$OUT/gpu_real_nogc_cudagraphs.json" --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
# selective checkpointing compiled with cuDNN's attention first (torch's default kernel: PART=3)
timeout 110 python3 benchmarks/gpu.py --compile --gc-mode selective --attention-backend cudnn --warmup 3 \
  --json "$OUT/gpu_real_sgc_compile_cudnn.json" --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
timeout 100 python3 benchmarks/gpu.py --block-swap 22 --json "$OUT/gpu_swap.json" --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
for batch in "" --batch-cfg; do
  timeout 50 python3 benchmarks/gpu.py --infer --negative-len 64 $batch --json "$OUT/gpu_infer_neg64$batch.json" \
    --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
done
fi

if part 1; then
# the checks that need a GPU (real device placement, bf16 on CUDA, block swap, CUDA RNG in checkpoints), then
# CUDA graphs' (inductor compiles: a minute or more)
timeout 80 python3 -m pytest -q -m gpu -k "not cuda_graph" tests/test_gpu.py tests/test_memory.py \
  tests/test_checkpoint.py tests/test_lora_layer.py -p no:cacheprovider 2>&1 | tee -a "$LOG"
timeout 150 python3 -m pytest -q -m gpu -k cuda_graph tests/test_gpu.py -p no:cacheprovider 2>&1 | tee -a "$LOG"

# side by side (mid-size model, all modes, 3 implementations): about a minute, plus the first compiles of the
# block in the six -compile and two -cudagraphs runs (tens of seconds each); run.py writes its JSON and section after every mode
timeout 370 python3 benchmarks/run.py --device cuda --runs 10 --warmup 3 \
  --json "$OUT/bench_gpu.json" --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
fi

if part 2; then
# real size (60 blocks, 20.4B, bf16), 1024x1024, LoRA rank 32, gradient checkpointing, AdamW
timeout 80 python3 benchmarks/gpu.py --json "$OUT/gpu_real.json" --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
timeout 80 python3 benchmarks/gpu.py --gc-mode selective --json "$OUT/gpu_real_sgc.json" \
  --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
# every 2nd block checkpointed (--gradient-checkpointing-interval 2): about 30 GB more activations than whole blocks
timeout 80 python3 benchmarks/gpu.py --gc-interval 2 --json "$OUT/gpu_real_every2.json" \
  --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"

# the same with block swap: 22 blocks on the GPU = 22 x 0.68 GB = 15 GB of block weights (~16 GB budget);
# the other 38 blocks (26 GB) wait in pinned host memory
timeout 100 python3 benchmarks/gpu.py --block-swap 22 --json "$OUT/gpu_swap.json" --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"

# real-size inference step (bf16, true CFG: two DiT calls + combine + Euler step)
timeout 50 python3 benchmarks/gpu.py --infer --json "$OUT/gpu_infer.json" --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
# the same with a short negative prompt (64 tokens), one after the other and as one batch (--batch-cfg)
for batch in "" --batch-cfg; do
  timeout 50 python3 benchmarks/gpu.py --infer --negative-len 64 $batch --json "$OUT/gpu_infer_neg64$batch.json" \
    --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
done
fi

if part 3; then
# checkpointing modes alternated step by step (mid-size), eager and compiled
timeout 60 python3 benchmarks/checkpointing.py --device cuda --runs 10 --warmup 3 \
  --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
timeout 90 python3 benchmarks/checkpointing.py --device cuda --compile --runs 10 --warmup 3 \
  --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"

# real size with --compile: the MFU target's run (selective checkpointing recomputes the least), whole blocks,
# and inference; the first steps compile the block (warm-up 3)
timeout 110 python3 benchmarks/gpu.py --compile --gc-mode selective --warmup 3 --json "$OUT/gpu_real_sgc_compile.json" \
  --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
timeout 110 python3 benchmarks/gpu.py --compile --warmup 3 --json "$OUT/gpu_real_compile.json" \
  --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
timeout 100 python3 benchmarks/gpu.py --compile --no-gc --warmup 3 --json "$OUT/gpu_real_nogc_compile.json" \
  --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
timeout 80 python3 benchmarks/gpu.py --infer --compile --warmup 3 --json "$OUT/gpu_infer_compile.json" \
  --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
timeout 80 python3 benchmarks/gpu.py --infer --compile --attention-backend cudnn --warmup 3 \
  --json "$OUT/gpu_infer_compile_cudnn.json" --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
fi

if part 4; then
# --offload sequential's DiT: all 60 blocks (41 GB) in pinned host memory, each copied while the previous
# one computes; batched CFG moves each block once per step instead of twice
for batch in "" --batch-cfg; do
  timeout 120 python3 benchmarks/gpu.py --infer --block-swap 0 --negative-len 64 $batch \
    --json "$OUT/gpu_infer_streamed$batch.json" --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
done
# generate --block-swap 22 (sized for a 24 GB card): 38 blocks streamed, batched CFG (its default)
timeout 100 python3 benchmarks/gpu.py --infer --block-swap 22 --negative-len 64 --batch-cfg \
  --json "$OUT/gpu_infer_swap22.json" --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
# generate --fp8: resident (21 GB of weights), and streamed (half the bytes per step)
timeout 60 python3 benchmarks/gpu.py --infer --fp8 --negative-len 64 --batch-cfg \
  --json "$OUT/gpu_infer_fp8.json" --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
timeout 100 python3 benchmarks/gpu.py --infer --fp8 --block-swap 0 --negative-len 64 --batch-cfg \
  --json "$OUT/gpu_infer_fp8_streamed.json" --results "$OUT/RESULTS_gpu.md" 2>&1 | tee -a "$LOG"
fi

ls -la "$OUT"
