"""Benchmark: the fused code search of csrc/ against the torch paths of codebook.py, side by side.

    python csrc/bench.py                  # the whole grid and the training steps (~17 min, 2 cores)
    python csrc/bench.py --quick          # a subset, under a minute
    python csrc/bench.py --json out.json  # also write every row and the summary figures
    python csrc/bench.py --device cuda    # the CUDA kernel at the paper's shapes (16 heads x 64 dims)

Each row of the grid times, in turn and interleaved, the torch reference (every score, then topk),
the chunked torch path, the extension and a plain matmul of the same shape into a preallocated
output (the ceiling for GFLOP/s: it computes every score and ranks none); each time is the best
of several runs. Memory is the peak resident memory a call adds above what was resident before it
(Linux VmHWM, reset before each call, with glibc made to hand freed memory back to the system), so
it counts every allocation of the call, torch's or not; memory allocated once and kept across
calls (BLAS packing buffers, thread stacks) is not counted. On CUDA every call is synchronised
before its clock stops, and memory is the peak of torch's allocator above what was allocated
before the call. Then whole training steps: the TokFSM model of the paper and the authors'
per-head layer shape, with the extension and with torch.
"""
import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codebook as cb  # noqa: E402
import runs  # noqa: E402
from csrc import dispatch, loader  # noqa: E402

GRID = [(n, d, c, k) for n in (4096, 16384) for d in (32, 64, 256) for c in (1024, 10000, 65536) for k in (1, 8, 32)]
PYTHIA = (16, 4096, 64, 10000, 8)  # heads, tokens, d, codes, k: a Pythia-410M layer's per-head codebooks
QUICK = [(4096, d, c, 8) for d in (32, 64) for c in (1024, 10000)]
# on a GPU: a Pythia-410M layer's 16 heads x 64 dims (the paper's shape), batches of 4k to 64k tokens
CUDA_GRID = [(16, n, 64, c, k) for n in (4096, 16384, 65536) for c in (1024, 10000, 65536) for k in (1, 8, 32)]
CUDA_QUICK = [(16, n, 64, 10000, 8) for n in (4096, 16384)]
DEVICE = torch.device("cpu")  # main() sets it from --device
AUTHORS = {"layer_s": 2.78, "tokfsm_step_s": 1.33, "tokfsm_plain_step_s": 0.82}  # the authors' code, timed on a 2-core CPU like this one

# --- measuring -------------------------------------------------------------------------------------

libc = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None
if libc is not None:  # for the search grid: blocks of 128 KiB and more are mmapped, and unmapped on free
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def _status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def run(fn):
    """(seconds, peak extra bytes or None) of one call of fn."""
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(DEVICE)
        seconds = time.perf_counter() - start
        del out
        return seconds, torch.cuda.max_memory_allocated(DEVICE) - base
    measure = libc is not None and os.path.exists("/proc/self/clear_refs")
    if measure:
        libc.malloc_trim(0)
        base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - base if measure else None
    del out
    return seconds, peak


def race(fns, budget=1.0, max_runs=5):
    """Times every fn in turn, round after round, until `budget` seconds or `max_runs` rounds have
    passed (at least two rounds, unless max_runs is 1); returns {name: (best seconds, largest peak extra bytes)}."""
    times = {name: [] for name in fns}
    peaks = {name: [] for name in fns}
    spent, rounds = 0.0, 0
    while rounds < min(2, max_runs) or (spent < budget and rounds < max_runs):
        for name, fn in fns.items():
            seconds, peak = run(fn)
            times[name].append(seconds)
            peaks[name].append(peak)
            spent += seconds
        rounds += 1
    return {name: (min(times[name]), None if None in peaks[name] else max(peaks[name])) for name in fns}


def search_row(heads, tokens, d, codes, k, budget):
    g = torch.Generator().manual_seed(0)
    x, book = torch.randn(heads, tokens, d, generator=g).to(DEVICE), torch.randn(heads, codes, d, generator=g).to(DEVICE)
    score_bytes = heads * tokens * codes * 4
    fns, notes = {}, []
    if score_bytes * 2.5 < 0.6 * _mem_available():  # the matrix, its topk work space, and room for the rest
        fns["reference"] = lambda: cb.search_reference(x, book, k)
    else:
        notes.append(f"reference and matmul skipped: a {score_bytes / 2**30:.0f} GiB score matrix")
    if 3 * heads * tokens * (4096 + k) * 4 < 0.6 * _mem_available():  # a tile's scores, their top-k, the running one
        fns["chunked"] = lambda: dispatch.search_chunked(x, book, k)
    else:
        notes.append("chunked skipped: its tiles would not fit")
    fns["ext"] = lambda: dispatch.topk_codes(x, book, k, impl="ext")
    if "reference" in fns:
        normed = book / book.norm(dim=-1, keepdim=True)
        out = torch.empty(heads, tokens, codes, device=DEVICE)
        fns["matmul"] = lambda: torch.bmm(x, normed.transpose(1, 2), out=out)
    note = "; ".join(notes)
    result = race(fns, budget)
    flop = 2 * heads * tokens * codes * d
    row = dict(heads=heads, tokens=tokens, d=d, codes=codes, k=k, note=note,
               codebook_mib=heads * codes * d * 4 / 2**20, score_matrix_mib=score_bytes / 2**20)
    for name, (seconds, peak) in result.items():
        row[f"{name}_s"] = seconds
        row[f"{name}_mib"] = None if peak is None else peak / 2**20
    row["ext_gflops"] = flop / row["ext_s"] / 1e9
    if "reference" in result:
        row["matmul_gflops"] = flop / row["matmul_s"] / 1e9
        row["speedup_vs_reference"] = row["reference_s"] / row["ext_s"]
        row["efficiency"] = row["matmul_s"] / row["ext_s"]
    if "chunked" in result:
        row["speedup_vs_chunked"] = row["chunked_s"] / row["ext_s"]
    # the bound the extension's memory must keep to: the codebook + O(tokens x k) (+ fixed per-thread tiles)
    # on a GPU also the norms of the codes and queries (search.cpp's inputs), instead of the threads' tiles
    extra = heads * (tokens + codes) * 4 if DEVICE.type == "cuda" else 2 * 2**20 * torch.get_num_threads()
    row["ext_bound_mib"] = (heads * codes * d * 4 + heads * tokens * k * 12 + extra) / 2**20
    return row


def _mem_available():
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()  # what torch keeps cached for itself is free for the next row
        return torch.cuda.mem_get_info(DEVICE)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except OSError:
        return 8 * 2**30


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_header():
    head = (f"{'H':>2} {'tokens':>6} {'d':>4} {'codes':>6} {'k':>3} | {'ref ms':>8} {'chunk ms':>8} {'ext ms':>8} "
            f"{'mm ms':>8} | {'x ref':>6} {'x chunk':>7} | {'ext GF/s':>8} {'mm GF/s':>8} {'eff':>5} | "
            f"{'ref MiB':>8} {'chunk MiB':>9} {'ext MiB':>7} {'bound':>6}")
    print(head)
    print("-" * len(head))


def print_row(r):
    ms = lambda key: fmt(r.get(key) and r[key] * 1e3, ".1f")
    print(f"{r['heads']:>2} {r['tokens']:>6} {r['d']:>4} {r['codes']:>6} {r['k']:>3} | {ms('reference_s'):>8} "
          f"{ms('chunked_s'):>8} {ms('ext_s'):>8} {ms('matmul_s'):>8} | {fmt(r.get('speedup_vs_reference'), '.2f'):>6} "
          f"{fmt(r.get('speedup_vs_chunked'), '.2f'):>7} | {fmt(r['ext_gflops'], '.1f'):>8} "
          f"{fmt(r.get('matmul_gflops'), '.1f'):>8} {fmt(r.get('efficiency') and 100 * r['efficiency'], '.0f'):>4}% | "
          f"{fmt(r.get('reference_mib'), '.1f'):>8} {fmt(r.get('chunked_mib'), '.1f'):>9} {fmt(r['ext_mib'], '.1f'):>7} "
          f"{r['ext_bound_mib']:>6.1f}" + (f"  ({r['note']})" if r["note"] else ""), flush=True)


# --- training steps --------------------------------------------------------------------------------

class search_in_torch:
    """Within this block codebook.py searches with torch (CODEBOOK_EXT=0), as without csrc/."""
    def __enter__(self):
        self.before = os.environ.get("CODEBOOK_EXT")
        os.environ["CODEBOOK_EXT"] = "0"

    def __exit__(self, *exc):
        if self.before is None:
            del os.environ["CODEBOOK_EXT"]
        else:
            os.environ["CODEBOOK_EXT"] = self.before


def tokfsm_step_time(num_codes, steps):
    """Seconds per optimiser step of the paper's TokFSM model (4 layers, d_model 128, 4 heads,
    MLP 512) on a batch of 64 x 128 tokens: without codebooks, and with per-head attention + MLP
    codebooks (k = 1, num_codes each) searched by the extension and by torch."""
    def model_and_step(codebooks):
        torch.manual_seed(0)
        model = cb.GPT(cb.GPTConfig(vocab_size=11, block_size=128, n_layer=4, n_head=4, d_model=128, d_mlp=512,
                                    codebooks=codebooks)).to(DEVICE).train()
        opt = runs.make_optimizer(model, 1e-3)
        idx = torch.randint(0, 11, (64, 129), generator=torch.Generator().manual_seed(0)).to(DEVICE)

        def step():
            logits = model(idx[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 11), idx[:, 1:].reshape(-1)) + model.codebook_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize()
        return step

    spec = dict(num_codes=num_codes, k=1)
    plain, with_codebooks = model_and_step({}), model_and_step({"attn": spec, "mlp": spec})
    with search_in_torch():
        torch_step = model_and_step({"attn": spec, "mlp": spec})
    # the ratio that matters, plain against extension, is timed interleaved; the torch path after
    # them, as its tokens x codes score matrices would otherwise evict their memory between steps
    # (each call re-enters search_in_torch so the env var holds during the step)
    times = {}
    for fns in ({"plain": plain, "ext": with_codebooks}, {"torch": lambda: _in_torch(torch_step)}):
        for fn in fns.values():
            fn()  # warm-up: first-touch allocations, the optimiser state
        times |= {name: [] for name in fns}
        for _ in range(steps):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def synchronize():
    if DEVICE.type == "cuda":  # a step's time includes its kernels, not only their launch
        torch.cuda.synchronize(DEVICE)


def _in_torch(fn):
    with search_in_torch():
        return fn()


def layer_time(reps, with_torch=True):
    """Forward + backward of one CodebookLayer at the authors' per-head shape: 4096 tokens x 16
    heads x 64 dims, 10,000 codes, k = 8 (their code: 2.78 s on this machine)."""
    torch.manual_seed(0)
    layer = cb.CodebookLayer(heads=16, dim=64, num_codes=10000, k=8).to(DEVICE).train()
    x = torch.randn(4096, 16, 64, device=DEVICE, requires_grad=True)

    def fwd_bwd():
        out = layer(x)
        (out.pow(2).mean() + layer.aux_loss).backward()
        x.grad = layer.codes.grad = layer.ln_weight.grad = layer.ln_bias.grad = None

    fns = {"ext": fwd_bwd, "torch": lambda: _in_torch(fwd_bwd)} if with_torch else {"ext": fwd_bwd}
    fwd_bwd()  # warm-up
    result = race(fns, budget=0, max_runs=reps)
    return {name: seconds for name, (seconds, _) in result.items()}


# --- main ------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset of the grid and short training runs")
    parser.add_argument("--json", help="write every row and the summary here")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: this torch sees no CUDA device; use --device cpu")
    ext = loader.load_extension()
    if ext is None or not ext.supports(torch.empty(1, 1, 1, device=DEVICE), 8):
        sys.exit(f"the csrc extension has no search for {DEVICE.type} here (CODEBOOK_EXT=0, the build failed, "
                 "or this GPU's shared memory is too small for the kernel): nothing to compare")

    cpu = DEVICE.type == "cpu"  # the authors' figures and the targets are a 2-core CPU's
    if cpu:
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at start")
    else:
        print(f"# {torch.cuda.get_device_name(DEVICE)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"# command: python csrc/bench.py {' '.join(sys.argv[1:])}".rstrip())
    if cpu:
        shapes = [(1, *s) for s in (QUICK if args.quick else GRID)] + ([] if args.quick else [PYTHIA])
    else:
        shapes = CUDA_QUICK if args.quick else CUDA_GRID
    rows = []
    print(f"\n## code search: cosine, float32, one head unless H says otherwise; times are the best of "
          f"{'2' if args.quick else '2-5'} runs")
    print_header()
    for h, n, d, c, k in shapes:
        rows.append(search_row(h, n, d, c, k, budget=0.2 if args.quick or not cpu else 1.0))
        print_row(rows[-1])

    ref_rows = [r for r in rows if "speedup_vs_reference" in r]
    summary = dict(
        median_speedup=statistics.median(r["speedup_vs_reference"] for r in ref_rows),
        speedup_at_65536=_median([r["speedup_vs_reference"] for r in ref_rows if r["codes"] == 65536]),
        matmul_efficiency=_median([r["efficiency"] for r in ref_rows if r["d"] >= 64 and r["codes"] >= 10000]),
        memory_within_bound=all(r["ext_mib"] is None or r["ext_mib"] <= r["ext_bound_mib"] for r in rows),
    )
    target = (lambda text: f" (target {text})") if cpu else (lambda text: "")  # the CPU extension's targets
    print(f"\nmedian speed-up over the reference {summary['median_speedup']:.2f}x{target('>= 2.5x')}; "
          f"at 65,536 codes {fmt(summary['speedup_at_65536'], '.2f')}x{target('>= 5x')}; "
          f"extension / matmul GFLOP/s for d >= 64, codes >= 10,000: {fmt(summary['matmul_efficiency'] and 100 * summary['matmul_efficiency'], '.0f')}%"
          f"{target('>= 85%')}; extension memory within codebook + O(tokens x k): {summary['memory_within_bound']}")

    print("\n## training steps")
    if libc is not None:  # back to roomy malloc settings: training allocates many mid-sized tensors
        libc.mallopt(-3, 32 * 2**20), libc.mallopt(-1, 64 * 2**20)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    steps = 10 if not cpu else 3 if args.quick else 5  # medians; a single step is too noisy even for a quick look
    training = {}
    for num_codes in ((1000,) if args.quick else (1000, 10000)):
        t = tokfsm_step_time(num_codes, steps)
        training[f"tokfsm_{num_codes}_codes"] = t
        print(f"TokFSM 4 x 128, batch 64 x 128, per-head attention + MLP codebooks, k=1, {num_codes} codes: "
              f"without codebooks {t['plain']:.3f} s/step; with, extension {t['ext']:.3f} s "
              f"({t['ext'] / t['plain']:.2f}x" + (f", target <= 1.5x; authors {AUTHORS['tokfsm_step_s']} s, target <= 0.66 s" if cpu else "") + "); "
              f"with, torch search {t['torch']:.3f} s ({t['torch'] / t['plain']:.2f}x)", flush=True)
    layer = layer_time(1 if args.quick else 3, with_torch=not args.quick or not cpu)
    training["per_head_layer"] = layer
    print(f"CodebookLayer 4096 tokens x 16 heads x 64 dims, 10,000 codes, k=8, forward + backward: "
          f"extension {layer['ext']:.3f} s" + (f" (authors {AUTHORS['layer_s']} s, target <= 0.7 s)" if cpu else "")
          + (f", torch search {layer['torch']:.3f} s" if "torch" in layer else ""))
    if cpu:
        print(f"# load average {os.getloadavg()[0]:.2f} at the end (the methods of a row run interleaved, so other load falls on each alike)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, **summary, training=training, authors=AUTHORS, quick=args.quick, device=str(DEVICE),
                           threads=torch.get_num_threads(), torch=torch.__version__), f, indent=1)


def _median(values):
    return statistics.median(values) if values else None


if __name__ == "__main__":
    main()
