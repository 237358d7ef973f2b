#!/usr/bin/env bash
# Fetch, on this (networked) machine, the wheels benchmarks/gpu_job.sh needs on a GPU machine that has torch,
# transformers, peft, accelerate and einops but neither peer: diffusers (and importlib_metadata, which it
# imports) and diffsynth (pure Python; its hub client and dataset code are stubbed by benchmarks/common.py).
# They land in .whl/ (kept out of git); carry .whl with the device call that runs gpu_job.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d .whl diffusers==0.42.1 diffsynth==2.1.12 importlib_metadata==10.2.0
ls -la .whl
