"""
TokFSM, the paper's first experiment (section 4.1, SPEC 5): a transformer learns random walks on
a finite state machine written as digits; codebooks then hold codes that *are* the FSM states,
and forcing another state's codes makes the model continue from that state.

    python train_fsm.py                      # CPU defaults, about 8 minutes on 2 cores
    python train_fsm.py --preset paper --device cuda

Trains (1) a baseline transformer and (2) the codebook model: the same weights plus per-head
attention and MLP codebooks (k = 1) in every layer, k-means initialised on the baseline's
activations and finetuned (the method is finetuning, section 3.2), then evaluates both and
writes OUT/results.json, OUT/base.pt, OUT/codebook.pt and OUT/fsm.json.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import codebook as cb

# --- settings ------------------------------------------------------------------------------
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--preset", choices=["cpu", "paper"], default="cpu", help="paper: the paper's sizes, for a GPU")
p.add_argument("--num_states", type=int, default=100)
p.add_argument("--num_edges", type=int, default=10, help="successors of each state")
p.add_argument("--base", type=int, default=10, help="states are written in this base")
p.add_argument("--walk_length", type=int, default=64, help="states per sequence")
p.add_argument("--n_layer", type=int, default=4)
p.add_argument("--n_head", type=int, default=4)
p.add_argument("--d_model", type=int, default=64)
p.add_argument("--d_mlp", type=int, default=256)
p.add_argument("--num_codes", type=int, default=512, help="codes per codebook")
p.add_argument("--k", type=int, default=1)
p.add_argument("--batch_size", type=int, default=64)
p.add_argument("--base_steps", type=int, default=1500, help="baseline training steps")
p.add_argument("--codebook_steps", type=int, default=600, help="codebook finetuning steps")
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--codebook_lr", type=float, default=3e-3)
p.add_argument("--revive_every", type=int, default=100)
p.add_argument("--eval_seqs", type=int, default=1000, help="fixed validation sequences")
p.add_argument("--samples", type=int, default=200, help="sequences sampled for transition accuracy")
p.add_argument("--pairs", type=int, default=2000, help="(a, b) state pairs for interventions")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default="out/fsm")
args = p.parse_args()
if args.preset == "paper":  # SPEC 5: 4 layers, d_model 128, 4 heads, MLP 512, 10k codes, batch 512
    for name, value in dict(n_layer=4, d_model=128, n_head=4, d_mlp=512, num_codes=10000, batch_size=512,
                            base_steps=20000, codebook_steps=20000, lr=1e-3, codebook_lr=1e-3).items():
        setattr(args, name, value)
digits = 1 if args.num_states <= args.base else 2  # "08": two digits, zero padded
BOS = args.base  # tokens: the digits 0..base-1, then BOS
seq_len = 1 + digits * args.walk_length  # BOS + the walk's digits; the model reads seq_len - 1
started = time.time()


def fail(message):
    sys.exit(f"error: {message}")


if args.num_edges > args.num_states or min(args.num_states, args.num_edges, args.walk_length, args.base - 1) < 1:
    fail("need 1 <= num_edges <= num_states, walk_length >= 1 and base >= 2")
if args.num_states > args.base ** 2:
    fail(f"num_states={args.num_states} does not fit in two base-{args.base} digits: raise --base")


# --- the FSM and its data (SPEC 5) -----------------------------------------------------------
def make_fsm(num_states, num_edges, seed):
    """successors (num_states, num_edges): distinct next states, uniform, self-loops allowed."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_states, num_states, generator=g).argsort(-1)[:, :num_edges]


def random_walks(successors, n, length, g):
    """(n, length) states: a uniform random start, then a uniformly chosen successor each step."""
    states = [torch.randint(successors.shape[0], (n,), generator=g)]
    for _ in range(length - 1):
        states.append(successors[states[-1], torch.randint(successors.shape[1], (n,), generator=g)])
    return torch.stack(states, 1)


def walks_ending_in(successors, ends, length, g):
    """(len(ends), length) legal walks whose last state is ends[i]: walk the edges backwards."""
    n = successors.shape[0]
    is_edge = torch.zeros(n, n, dtype=torch.bool)
    is_edge[torch.arange(n)[:, None], successors] = True
    states = [ends]
    for _ in range(length - 1):
        preds = is_edge[:, states[-1]].T.float()  # (len, n): which states lead into the current one
        states.append(torch.multinomial(preds, 1, generator=g)[:, 0])
    return torch.stack(states[::-1], 1)


def encode(states):
    """states (n, L) -> tokens (n, 1 + digits * L): BOS, then each state's digits, zero padded."""
    powers = args.base ** torch.arange(digits - 1, -1, -1)
    body = (states[..., None] // powers % args.base).flatten(1)
    return torch.cat([torch.full((states.shape[0], 1), BOS), body], 1)


def decode(tokens):
    """digit tokens (n, digits * L), no BOS -> states (n, L); -1 where a 'digit' is BOS."""
    groups = tokens[:, : tokens.shape[1] // digits * digits].reshape(tokens.shape[0], -1, digits)
    powers = args.base ** torch.arange(digits - 1, -1, -1)
    states = (groups * powers).sum(-1)
    return torch.where((groups >= args.base).any(-1), -1, states)


successors = make_fsm(args.num_states, args.num_edges, args.seed)
legal = torch.zeros(args.num_states + 1, args.num_states, dtype=torch.bool)  # row -1 (invalid) is all False
legal[torch.arange(args.num_states)[:, None], successors] = True


def get_batch(i, rank, world):
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + i * world + rank + 1)
    tokens = encode(random_walks(successors, args.batch_size // world, args.walk_length, g))
    return tokens[:, :-1], tokens[:, 1:]


eval_tokens = encode(random_walks(successors, args.eval_seqs, args.walk_length, torch.Generator().manual_seed(10**6 + args.seed)))


# --- metrics ---------------------------------------------------------------------------------
def transition_accuracy(states):
    """Share of consecutive (state, next) pairs that are edges, and the same for the first pair."""
    a, b = states[:, :-1], states[:, 1:]
    ok = legal[a, b.clamp_min(0)] & (b >= 0)
    return ok.float().mean().item(), ok[:, 0].float().mean().item()


@torch.no_grad()
def sample_states(model, n, seed):
    g = torch.Generator(device=args.device).manual_seed(seed)
    bos = torch.full((n, 1), BOS, device=args.device)
    return decode(model.generate(bos, seq_len - 1, temperature=1.0, generator=g)[:, 1:].cpu())


@torch.no_grad()
def val_metrics(model, tokens=None):
    """Next-token loss and accuracy on the fixed validation set."""
    tokens = eval_tokens[:256] if tokens is None else tokens
    logits = torch.cat([model(tokens[i:i + 64, :-1].to(args.device)).cpu() for i in range(0, len(tokens), 64)])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    return {"val_loss": loss.item(), "val_acc": (logits.argmax(-1) == tokens[:, 1:]).float().mean().item()}


def state_masks(tokens):
    """(num_states, n, seq_len - 1) bool: input position is the last digit of state s."""
    states = decode(tokens[:, 1:])
    masks = torch.zeros(args.num_states, tokens.shape[0], seq_len - 1, dtype=torch.bool)
    last_digit = torch.arange(args.walk_length) * digits + digits  # input position of each state's last digit
    keep = last_digit < seq_len - 1
    n_idx, j_idx = torch.meshgrid(torch.arange(tokens.shape[0]), torch.arange(args.walk_length)[keep], indexing="ij")
    masks[states[n_idx, j_idx], n_idx, last_digit[keep][j_idx]] = True
    return masks


@torch.no_grad()
def next_state_logprobs(model, x, forced=None, position=None):
    """log P(next state) (n, num_states) after inputs x, exact over both digits. `forced`:
    {codebook address: per-row code ids (n, k)} forced at `position` in every forward."""
    def digit_logprobs(inputs, codes):
        force = cb.force_codes(model, codes, positions=[position]) if codes else contextlib.nullcontext()
        with force:
            return F.log_softmax(model(inputs.to(args.device))[:, -1, :args.base].float(), -1).cpu()

    lp = digit_logprobs(x, forced)
    if digits == 2:  # every first digit, then the second: the joint over all two-digit states
        x2 = torch.cat([x.repeat_interleave(args.base, 0), torch.arange(args.base).repeat(len(x))[:, None]], 1)
        codes2 = {a: ids.repeat_interleave(args.base, 0) for a, ids in forced.items()} if forced else None
        lp = (lp[:, :, None] + digit_logprobs(x2, codes2).view(-1, args.base, args.base)).flatten(1)
    return lp[:, : args.num_states]


@torch.no_grad()
def intervention_success(model, sites, pairs, walk_states=32, batch=200):
    """Section 4.1, Fig. 2: in a sequence ending in state a, force at its last position the codes
    recorded at the last position of a sequence ending in b; success = the most likely next state
    is a legal successor of b. `sites`: codebook addresses; none at all is no intervention."""
    g = torch.Generator().manual_seed(args.seed + 7)
    inputs = encode(walks_ending_in(successors, torch.arange(args.num_states), walk_states, g))
    last = inputs.shape[1] - 1
    model(inputs.to(args.device))
    recorded = {a: ids[:, last].cpu() for a, ids in cb.record_codes(model).items() if a in sites}
    hits = 0
    for a, b in (chunk.T for chunk in pairs.split(batch)):
        forced = {site: recorded[site][b] for site in sites}
        best = next_state_logprobs(model, inputs[a], forced, last).argmax(-1)
        hits += legal[b, best].sum().item()
    return hits / len(pairs)


def best_state_codes(precision, recall):
    """Per state, the code with the best F1: (precision, recall, code) each (num_states,)."""
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-9)
    code = f1.argmax(-1)
    return precision.gather(1, code[:, None])[:, 0], recall.gather(1, code[:, None])[:, 0], code


def pct(x):
    return f"{100 * x:6.2f}%"


# --- train --------------------------------------------------------------------------------------
try:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fsm.json"), "w") as f:
        json.dump({"num_states": args.num_states, "base": args.base, "bos": BOS, "digits": digits,
                   "successors": successors.tolist()}, f)
    torch.manual_seed(args.seed)
    config = dict(vocab_size=args.base + 1, block_size=seq_len - 1, n_layer=args.n_layer, n_head=args.n_head,
                  d_model=args.d_model, d_mlp=args.d_mlp)
    print(f"TokFSM: {args.num_states} states x {args.num_edges} edges, {seq_len - 1}-token sequences; "
          f"model {args.n_layer} layers x d_model {args.d_model}; codebooks k={args.k}, {args.num_codes} codes")
    base = cb.GPT(config)
    common = dict(device=args.device, warmup=100, cosine=True, eval_every=500, eval_fn=lambda m, s: val_metrics(m))
    base = cb.train(base, get_batch, args.base_steps, args.lr, ckpt_path=os.path.join(args.out, "base.pt"),
                    desc="baseline", **common)

    # stage two: the same weights plus codebooks, k-means initialised on the baseline's activations
    model = cb.with_codebooks(base, {site: dict(num_codes=args.num_codes, k=args.k) for site in ("attn", "mlp")})
    cb.init_codebooks_kmeans(model, get_batch(-1, 0, 1)[0].to(args.device))
    model = cb.train(model, get_batch, args.codebook_steps, args.lr, codebook_lr=args.codebook_lr,
                     revive_every=args.revive_every, ckpt_path=os.path.join(args.out, "codebook.pt"),
                     desc="codebook", **common)
except ValueError as e:
    fail(e)

# --- evaluate -----------------------------------------------------------------------------------
print("evaluating ...")
results = {"config": vars(args), "baseline": {}, "codebook": {}}
for name, m in (("baseline", base), ("codebook", model)):
    accuracy, first = transition_accuracy(sample_states(m, args.samples, args.seed + 1))
    results[name] |= {"transition_accuracy": accuracy, "first_transition_accuracy": first, **val_metrics(m)}

inputs = eval_tokens[:, :-1]
ids, _ = cb.record_dataset(model, inputs)
results["codebook"]["dead_code_fraction"] = {
    a: (cb.code_counts(v, args.num_codes) == 0).float().mean().item() for a, v in ids.items()}

masks = state_masks(eval_tokens)
per_codebook = {}
for address, v in ids.items():
    precision, recall, code = best_state_codes(*cb.code_precision_recall(v, masks, args.num_codes))
    per_codebook[address] = (precision, recall, code)
best = max(per_codebook, key=lambda a: (per_codebook[a][0] * per_codebook[a][1]).mean().item())
precision, recall, code = per_codebook[best]
results["codebook"] |= {
    "state_code_codebook": best, "state_code_precision": precision.mean().item(),
    "state_code_recall": recall.mean().item(),
    "state_code_precision_per_codebook": {a: v[0].mean().item() for a, v in per_codebook.items()},
    "state_code_recall_per_codebook": {a: v[1].mean().item() for a, v in per_codebook.items()}}

# the neuron baseline (section 4.1): every coordinate of the baseline's attention and MLP outputs
neuron_seqs = min(300, len(inputs))
with torch.no_grad(), cb.capture_activations(base) as acts:
    base(inputs[:neuron_seqs].to(args.device))
neurons = torch.cat([acts[i][site].flatten(2).flatten(0, 1).cpu() for i in acts for site in ("attn", "mlp")], 1)
sub_masks = masks[:, :neuron_seqs].flatten(1)
neuron_best = torch.stack([cb.neuron_precision_at_recall(neurons, sub_masks[s], recall[s].item()).max()
                           for s in range(args.num_states)])
results["codebook"]["neuron_precision"] = neuron_best.mean().item()

pairs = torch.cartesian_prod(torch.arange(args.num_states), torch.arange(args.num_states))
pairs = pairs[pairs[:, 0] != pairs[:, 1]]
pairs = pairs[torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed + 3))[: args.pairs]]
attn_sites = [a for a in ids if ".H" in a]
mlp_sites = [a for a in ids if a.endswith(".MLP")]
results["codebook"]["intervention_success"] = {
    name: intervention_success(model, sites, pairs)
    for name, sites in (("none", []), ("attn", attn_sites), ("mlp", mlp_sites), ("all", attn_sites + mlp_sites))}
results["wall_seconds"] = time.time() - started

# --- report ---------------------------------------------------------------------------------------
b, c = results["baseline"], results["codebook"]
dead = c["dead_code_fraction"]
print(f"""
                                   baseline   codebook
transition accuracy                {pct(b['transition_accuracy'])}    {pct(c['transition_accuracy'])}
first-transition accuracy          {pct(b['first_transition_accuracy'])}    {pct(c['first_transition_accuracy'])}
validation loss                    {b['val_loss']:7.4f}    {c['val_loss']:7.4f}
validation next-token accuracy     {pct(b['val_acc'])}    {pct(c['val_acc'])}
dead codes, worst codebook                    {pct(max(dead.values()))} ({max(dead, key=dead.get)})
dead codes, mean over {len(dead):2d} codebooks              {pct(sum(dead.values()) / len(dead))}
state codes ({best}): precision            {pct(c['state_code_precision'])}
                        recall               {pct(c['state_code_recall'])}
best neuron, precision at that recall         {pct(c['neuron_precision'])}
intervention success  none / attn / mlp / all  {' / '.join(pct(v).strip() for v in c['intervention_success'].values())}
wall time                                     {results['wall_seconds']:.0f} s""")
with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
print(f"wrote {args.out}/results.json, base.pt, codebook.pt, fsm.json")
