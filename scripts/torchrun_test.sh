#!/bin/bash
# Test inference on all GPUs of one machine with torchrun (each rank scores every N-th image; rank 0
# computes the metrics). Usage: scripts/torchrun_test.sh NUM_GPUS test.py-arguments...
set -euo pipefail
NGPU=${1:?number of GPUs}; shift
torchrun --standalone --nproc_per_node "$NGPU" test.py "$@"
