"""Benchmark: a training step of a pretrained model from a GGUF file (models.py) against transformers'
model of the same file, and what per-head codebooks on every layer add to it.

    python csrc/bench_models.py                      # the SmolLM2 GGUF of .ci/fetch_models, 4 x 128 tokens
    python csrc/bench_models.py --gguf ~/.cache/codebook-features/gemma-3-270m-q4_k_m.gguf --batch 8
    python csrc/bench_models.py --gguf FILE --batch 4 --seq 128 --num_codes 512 --k 8 --reps 3
    python csrc/bench_models.py --sample_rows 20,320 --num_codes 1024   # sampling, not training

A step is forward, cross-entropy on next tokens, backward, on one fixed batch. The three models
run in turn, interleaved (ours, transformers', ours with codebooks), after one warm-up step each,
so that what the other jobs on the machine take falls on all alike; each figure is the median of
--reps steps. transformers, gguf and accelerate are needed here only
(pip install transformers gguf accelerate).

With --sample_rows, a sampling step instead (steer.py's: one forward of the new token of every row,
keys and values cached, codebooks on every head) at each batch size in turn, interleaved likewise:
what a generated token costs when that many rows are sampled together.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codebook as cb  # noqa: E402
import models  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
MODELS = os.environ.get("CODEBOOK_MODELS", os.path.expanduser("~/.cache/codebook-features"))
parser.add_argument("--gguf", default=os.path.join(MODELS, "SmolLM2-135M-Instruct.Q4_1.gguf"), help="the model")
parser.add_argument("--batch", type=int, default=4, help="sequences in the batch")
parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
parser.add_argument("--num_codes", type=int, default=512, help="codes per head (train_lm.py's default)")
parser.add_argument("--k", type=int, default=8, help="codes active per head and position")
parser.add_argument("--reps", type=int, default=3, help="timed steps of each model; the median is printed")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
parser.add_argument("--sample_rows", default="", help="time sampling at these batch sizes (e.g. 20,160) instead of training")
parser.add_argument("--new_tokens", type=int, default=16, help="with --sample_rows: tokens generated per timed step")


def transformers_twin(path):
    """transformers' own model of the same GGUF file (its GGUF loader dequantises through the gguf package)."""
    import transformers
    folder, name = os.path.split(os.path.abspath(path))
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def step(model, x, y, logits_of):
    """(wall seconds, CPU seconds of this process) of one forward + backward of the next-token loss."""
    start, cpu_start = time.perf_counter(), time.process_time()
    logits = logits_of(model, x)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
    if isinstance(model, cb.CodebookModel):
        loss = loss + model.codebook_loss()
    loss.backward()
    seconds = time.perf_counter() - start, time.process_time() - cpu_start
    model.zero_grad(set_to_none=True)
    return seconds


def sampling(model, rows, args):
    """Median wall seconds per generated token of a batch of each size in `rows`, sampling
    --new_tokens after a 5-token prompt, the sizes interleaved, after a warm-up round."""
    times = {n: [] for n in rows}
    for rep in range(args.reps + 1):
        for n in rows:
            prompt = torch.randint(0, model.config.vocab_size, (n, 5), generator=torch.Generator().manual_seed(rep))
            start = time.perf_counter()
            model.generate(prompt, args.new_tokens, generator=torch.Generator().manual_seed(0))
            if rep:
                times[n].append((time.perf_counter() - start) / args.new_tokens)
    return {n: statistics.median(t) for n, t in times.items()}


def main(argv=None):
    args = parser.parse_args(argv)
    if not os.path.isfile(args.gguf):
        raise SystemExit(f"{args.gguf} does not exist: .ci/fetch_models fetches it")
    try:
        rows = [int(n) for n in args.sample_rows.split(",") if n]
    except ValueError:
        raise SystemExit(f"--sample_rows {args.sample_rows}: give batch sizes separated by commas, e.g. 20,160") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    ours = models.from_pretrained(args.gguf, block_size=args.seq)
    if rows:
        coded = cb.with_codebooks(ours, {"attn": dict(num_codes=args.num_codes, k=args.k)}).eval()
        per_step = sampling(coded, rows, args)
        print(f"{os.path.basename(args.gguf)} with codebooks ({args.num_codes} codes, k={args.k}, every head), sampling "
              f"{args.new_tokens} tokens with keys and values cached, {torch.get_num_threads()} threads, median of {args.reps}")
        print(f"  {'rows':>6s}{'s a step':>10s}{'ms a token':>12s}{'vs ' + str(rows[0]) + ' rows':>14s}")
        for n in rows:
            print(f"  {n:6d}{per_step[n]:10.3f}{1000 * per_step[n] / n:12.2f}{(per_step[n] / n) / (per_step[rows[0]] / rows[0]):14.2f}")
        return
    theirs = transformers_twin(args.gguf)
    coded = cb.with_codebooks(ours, {"attn": dict(num_codes=args.num_codes, k=args.k)})
    tokens = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():  # the same model, so the comparison is fair
        assert (ours(x) - theirs(x, use_cache=False).logits).abs().max() < 1e-3
    runs = {"ours": (ours, lambda m, x: m(x)), "transformers": (theirs, lambda m, x: m(x, use_cache=False).logits),
            "ours + codebooks": (coded, lambda m, x: m(x))}
    for model, _ in runs.values():
        model.train()
    times = {name: [] for name in runs}
    for rep in range(args.reps + 1):
        for name, (model, logits_of) in runs.items():
            seconds = step(model, x, y, logits_of)
            if rep:  # the first round warms up
                times[name].append(seconds)
    wall, cpu = ({name: statistics.median(s[i] for s in t) for name, t in times.items()} for i in (0, 1))
    print(f"{os.path.basename(args.gguf)}, batch {args.batch} x {args.seq} tokens, forward + backward, "
          f"{torch.get_num_threads()} threads, median of {args.reps} interleaved steps")
    print(f"  {'':28s}{'wall':>8s}{'CPU':>8s}  (CPU: this process's CPU time, less moved by other jobs on the cores)")
    for name in runs:
        print(f"  {name:28s}{wall[name]:7.2f}s{cpu[name]:7.2f}s")
    ratios = {"ours / transformers": ("ours", "transformers"), "codebooks / ours": ("ours + codebooks", "ours")}
    for name, (a, b) in ratios.items():
        print(f"  {name:28s}{wall[a] / wall[b]:8.3f}{cpu[a] / cpu[b]:8.3f}")
    print(f"  (target for ours / transformers: at most 1.1; the codebooks: {args.num_codes} codes, k={args.k}, "
          f"on each of the {ours.config.n_layer} x {ours.config.n_head} heads)")


if __name__ == "__main__":
    main()
