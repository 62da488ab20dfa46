#!/usr/bin/env bash
# The GPU path end to end, in one go, each stage under a time limit: the extension's CUDA build, the
# tests with a CUDA variant, the kernel's benchmark at the paper's shapes, train_fsm.py at the paper's
# sizes, train_lm.py on the byte model and steer.py on it, train_lm.py on a Pythia-410M-shaped model
# with the paper's codebooks (10,000 codes per head, k = 8; random weights, made with transformers:
# nothing is downloaded), torchrun with nccl, and the whole test suite; then a summary of what passed
# and each training stage's step time.
#
#     bash csrc/gpu_check.sh [LOG_FOLDER]     # default out/gpu_check
#
# LOG_FOLDER gets gpu_check.log (every stage's output), bench.json and summary.txt; each check's runs
# go to a folder of their own, out/gpu_check/runs/<date-time> (GPU_CHECK_RUNS: another parent), so no
# stage resumes an earlier check's checkpoints. PYTHON names the Python (default python3). Exit status 1
# when a stage failed or ran out of time; without a CUDA device it says so and exits 0.
set -u
LOGS=$(realpath -m "${1:-$(dirname "$0")/../out/gpu_check}")
cd "$(dirname "$0")/.."
RUNS=${GPU_CHECK_RUNS:-out/gpu_check/runs}/$(date +%Y%m%d-%H%M%S)
PY=${PYTHON:-python3}
mkdir -p "$LOGS"
LOG=$LOGS/gpu_check.log
: >"$LOG"
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $PY has no torch; give the Python to use as PYTHON=..." | tee -a "$LOG"
    exit 1
fi
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: $PY's torch sees no CUDA device; nothing to check" | tee -a "$LOG"
    exit 0
fi
mkdir -p "$RUNS"
export CODEBOOK_EXT=1 PYTHONUNBUFFERED=1  # an extension that does not build fails its stage instead of falling back
NAMES=() RESULTS=() SECONDS_TAKEN=()

stage() {  # stage NAME LIMIT_SECONDS COMMAND...: its output into the log, its last lines on the screen
    local name=$1 limit=$2 start rc seconds logged
    shift 2
    echo "== $name (at most ${limit} s): $(echo "$*" | head -n 1)" | tee -a "$LOG"
    logged=$(stat -c %s "$LOG")
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    seconds=$(($(date +%s) - start))
    NAMES+=("$name") SECONDS_TAKEN+=("$seconds")
    if [ "$rc" = 0 ]; then RESULTS+=(ok)
    elif [ "$seconds" -ge "$limit" ]; then RESULTS+=("timed out")
    else RESULTS+=("failed ($rc)"); fi
    tail -c +$((logged + 1)) "$LOG" | tail -c 4000 | tr '\r' '\n' | grep -av '^\s*$' | tail -n 6
    echo "== $name: ${RESULTS[-1]} in ${seconds} s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"; } 2>&1 | tee -a "$LOG"

# on a GPU without the kernel's shared memory (compute capability 7.5, below 7.0) the torch search serves it
stage build 300 "$PY" -c "
import torch
from csrc import loader
ext = loader.load_extension()
kernel = ext.supports(torch.empty(1, 1, 1, device='cuda'), 8)
print('CUDA tensors are searched by', 'the kernel of csrc/' if kernel else 'torch: this GPU is too small for the kernel')"
if [ "${RESULTS[-1]}" != ok ]; then  # the other stages still run, on the torch search
    export CODEBOOK_EXT=0
fi

stage tests 240 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_extension.py \
    "tests/test_models.py::test_cuda_same_logits_and_generations_as_transformers_and_bf16_autocast_near_them" \
    "tests/test_runs.py::test_a_run_stopped_by_sigterm_resumes_to_the_same_weights" \
    "tests/test_runs.py::test_torchrun_with_one_process_starts_the_process_group_too"

stage bench 240 "$PY" csrc/bench.py --device cuda --json "$LOGS/bench.json"

stage train_fsm 240 "$PY" train_fsm.py --device cuda --preset paper --base_steps 300 --codebook_steps 300 \
    --eval_seqs 500 --samples 100 --pairs 500 --no-sae --cards 2 --out "$RUNS/fsm-paper"

stage train_lm 180 "$PY" train_lm.py --device cuda --base_steps 300 --codebook_steps 300 --sae --sae_steps 100 \
    --out "$RUNS/lm"

# every topic gets its best codes (a 300-step model may have none precise enough): the path is checked, not the figures
stage steer 180 "$PY" steer.py --device cuda --ckpt "$RUNS/lm/codebook.pt" --reference_stories 160 --min_precision 0 \
    --min_recall 0 --out "$RUNS/steer"

# Pythia-410M's shape (24 layers x 16 heads of 64 dims) with random weights, and a small BPE trained here
stage pythia_folder 120 "$PY" -c "
import sys, pathlib, torch, transformers
sys.path.insert(0, 'tests')
from conftest import trained_bpe
folder = pathlib.Path(sys.argv[1])
config = transformers.GPTNeoXConfig(vocab_size=50304, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    intermediate_size=4096, rotary_pct=0.25, max_position_embeddings=2048)
with torch.device('cuda'):
    model = transformers.GPTNeoXForCausalLM(config)
model.save_pretrained(folder)
trained_bpe(folder)
print(sum(p.numel() for p in model.parameters()) / 1e6, 'M parameters in', folder)" "$RUNS/pythia-410m-shape"

stage train_lm_pythia 240 "$PY" train_lm.py --device cuda --hf "$RUNS/pythia-410m-shape" --num_codes 10000 --k 8 \
    --codebook_steps 30 --batch_size 8 --block_size 512 --stories 3000 --kmeans_windows 32 --eval_windows 16 \
    --no-control --out "$RUNS/lm-pythia"

stage torchrun_nccl 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 train_lm.py --device cuda \
    --stories 3000 --base_steps 100 --codebook_steps 100 --out "$RUNS/lm-torchrun"

# README's test command where a GPU is (every test that has a CUDA variant runs it beside the CPU one)
stage suite 360 "$PY" -m pytest -q -p no:cacheprovider

{ echo
  echo "## summary: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
  printf '%-16s %-12s %8s\n' stage result seconds
  for i in "${!NAMES[@]}"; do printf '%-16s %-12s %8s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECONDS_TAKEN[$i]}"; done
  echo
  echo "test counts:"
  tr '\r' '\n' <"$LOG" | awk '/^== [a-z_]+ \(at most/ { stage = $2 } /^[0-9]+ (passed|failed)/ { print "  " stage ": " $0 }'
  "$PY" - "$LOG" <<'STEPS'
import re, sys
# each progress bar's two 100% lines: at its last step (tqdm's moving rate of the last steps), and when it
# closes (the whole bar's wall time over its steps: warm-up, and the checkpoint written at the end, included)
print("step times, ms a step: at the last steps / over the whole stage")
stage, bars = None, {}
for line in re.split(r"[\r\n]+", open(sys.argv[1], errors="replace").read()):
    if head := re.match(r"== (\w+) \(at most", line):
        stage = head[1]
    elif stage in ("tests", "suite"):  # bars in a failed test's captured output are no stage's
        continue
    elif bar := re.match(r"(.+?): 100%\|[^|]*\| (\d+)/\2 \[([\d:]+)<[^,]*,\s*([\d.]+)(it/s|s/it)", line):
        ms = 1000 / float(bar[4]) if bar[5] == "it/s" else 1000 * float(bar[4])
        bars.setdefault((stage, bar[1]), []).append((ms, bar[2], bar[3]))
for (stage, name), seen in bars.items():
    if not name.startswith("Writing"):  # transformers saving the Pythia-shaped folder
        print(f"  {stage:<16} {name:<22} {seen[0][0]:7.1f} / {seen[-1][0]:7.1f}   ({seen[-1][1]} steps in {seen[-1][2]})")
STEPS
} | tee "$LOGS/summary.txt"
for result in "${RESULTS[@]}"; do
    [ "$result" = ok ] || exit 1
done
