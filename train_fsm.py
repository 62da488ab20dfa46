"""
TokFSM, the paper's first experiment (section 4.1): a transformer learns random walks on
a finite state machine written as digits; its codebooks then hold codes that *are* the FSM
states, and forcing another state's codes makes the model continue from that state.

    python train_fsm.py --preset quick       # a first run in a few minutes, into out/quick
    python train_fsm.py                      # CPU defaults (README: results and wall time), into out/fsm
    python train_fsm.py --preset paper --device cuda   # into out/fsm-paper

Trains (1) a baseline transformer and (2) the codebook model: the same weights plus per-head
attention and MLP codebooks (k = 1) in every layer, k-means initialised on the baseline's
activations and finetuned (the method is finetuning, section 3.2). Then (3, --sae) TopK sparse
autoencoders (sae.py) fitted post hoc to the frozen baseline at the same sites, with the same
dictionary size and k. Evaluates all of them and writes OUT/results.json, OUT/base.pt,
OUT/codebook.pt, OUT/sae.pt and OUT/fsm.json (for runs.load_model users).
Each stage checkpoints as it goes; rerunning the same command resumes where it stopped.

Two choices of this CPU default go beyond the paper (README: what each one changes):
- attention over the last 2 positions only (--attn_window 2). The FSM is Markov in its state, so
  this loses nothing, and a position learns of earlier states only through the position before
  it: its token and its codes;
- interchange training (--interchange 0.25): the codebook stage also trains on walks where a
  state's codes are another state's, so that forcing codes is what moves the model (section 4.1's
  intervention is then trained for, not only found).
"""
import argparse
import contextlib
import functools
import math
import os
import time

import torch
import torch.nn.functional as F

import baselines
import codebook as cb
import report as pages
import runs
import sae


# --- the FSM and its data ------------------------------------------------------------------------
class TokFSM:
    """num_states states, each with num_edges distinct successors (uniform, self-loops allowed),
    each state written as zero-padded base-`base` digits; token `base` is BOS."""

    def __init__(self, num_states=100, num_edges=10, base=10, walk_length=64, seed=0):
        if num_states < 2 or not 1 <= num_edges <= num_states or walk_length < 2 or base < 2:  # 2 states: one to force
            raise ValueError("need num_states >= 2, 1 <= num_edges <= num_states, walk_length >= 2 and base >= 2")
        if num_states > base ** 2:
            raise ValueError(f"num_states={num_states} does not fit in two base-{base} digits: raise --base")
        self.num_states, self.base, self.walk_length = num_states, base, walk_length
        self.digits = 1 if num_states <= base else 2  # state 8 of 100 is "08"
        self.bos = base
        self.seq_len = 1 + self.digits * walk_length  # BOS + the walk's digits
        g = torch.Generator().manual_seed(seed)
        self.successors = torch.rand(num_states, num_states, generator=g).argsort(-1)[:, :num_edges]
        self.legal = torch.zeros(num_states, num_states, dtype=torch.bool)
        self.legal[torch.arange(num_states)[:, None], self.successors] = True

    def random_walks(self, n, g, length=None):
        """(n, length) states: a uniform random start, then a uniformly chosen successor each step."""
        states = [torch.randint(self.num_states, (n,), generator=g)]
        for _ in range((length or self.walk_length) - 1):
            states.append(self.successors[states[-1], torch.randint(self.successors.shape[1], (n,), generator=g)])
        return torch.stack(states, 1)

    def walks_ending_in(self, ends, length, g):
        """(len(ends), length) legal walks whose last state is ends[i]: walk the edges backwards."""
        orphans = (~self.legal.any(0)).nonzero()[:, 0].tolist()
        if set(orphans) & set(ends.tolist()):
            raise ValueError(f"states {orphans} have no predecessor, so no walk ends in them: change --seed")
        states = [ends]
        for _ in range(length - 1):
            states.append(torch.multinomial(self.legal[:, states[-1]].T.float(), 1, generator=g)[:, 0])
        return torch.stack(states[::-1], 1)

    def encode(self, states):
        """states (n, L) -> tokens (n, 1 + digits * L): BOS, then each state's digits."""
        powers = self.base ** torch.arange(self.digits - 1, -1, -1)
        body = (states[..., None] // powers % self.base).flatten(1)
        return torch.cat([torch.full((states.shape[0], 1), self.bos), body], 1)

    def decode(self, tokens):
        """digit tokens (n, digits * L) without BOS -> states (n, L); -1 where a digit is BOS or the
        digits spell no state (past num_states)."""
        n = tokens.shape[1] // self.digits * self.digits
        groups = tokens[:, :n].reshape(tokens.shape[0], -1, self.digits)
        states = (groups * self.base ** torch.arange(self.digits - 1, -1, -1)).sum(-1)
        return torch.where((groups >= self.base).any(-1) | (states >= self.num_states), -1, states)

    def transition_accuracy(self, states):
        """Share of consecutive (state, next) pairs that are edges; and the same for the first pair."""
        a, b = states[:, :-1], states[:, 1:]
        ok = (a >= 0) & (b >= 0) & self.legal[a.clamp_min(0), b.clamp_min(0)]
        return ok.float().mean().item(), ok[:, 0].float().mean().item()

    def state_masks(self, tokens):
        """(num_states, n, seq_len - 1) bool over model inputs: position is the last digit of state s."""
        inputs = tokens[:, :-1]
        states = self.decode(tokens[:, 1:])  # states[:, j] ends at input position (j + 1) * digits
        masks = torch.zeros(self.num_states, *inputs.shape, dtype=torch.bool)
        ends = (torch.arange(states.shape[1]) + 1) * self.digits
        keep = ends < inputs.shape[1]
        rows = torch.arange(len(tokens))[:, None].expand(-1, int(keep.sum()))
        masks[states[:, keep], rows, ends[keep].expand_as(rows)] = True
        return masks

    def to_json(self):
        return {"num_states": self.num_states, "base": self.base, "bos": self.bos, "digits": self.digits,
                "walk_length": self.walk_length, "successors": self.successors.tolist()}


# --- interchange training ------------------------------------------------------------------------
def interchange_batch(model, fsm, walks, share, g):
    """Interchange intervention training (Geiger et al., 2022) for the intervention of section
    4.1: at a `share` of state ends the tokens spell another state a (a legal successor of the
    state before), while every codebook at a's last digit gets the codes recorded at an end of
    the true state b in a quarter of the batch's walks, unaltered; the targets go on from b.
    Without it the next position goes by a's digits, which it also sees, more than by the codes.
    Returns inputs, targets, (codes, positions)."""
    n, length = walks.shape
    ends = fsm.digits * torch.arange(1, length)  # input position of the last digit of states 0 .. length - 2
    sources = walks[:max(1, n // 4)]  # 16 walks of 64 states hold every state's end ~10 times
    ids, _ = cb.record_dataset(model, fsm.encode(sources)[:, :-1])  # counts no code usage: no gradient

    # each state's codes come from one of its ends in the source walks, drawn at random
    true = sources[:, :-1].flatten()
    order, count = true.argsort(), torch.bincount(true, minlength=fsm.num_states)
    first = count.cumsum(0) - count
    drawn = order[(first + (torch.rand(fsm.num_states, generator=g) * count).long()).clamp_max(len(true) - 1)]

    swap = (torch.rand(n, length - 1, generator=g) < share) & (count[walks[:, :-1]] > 0)
    before = torch.cat([torch.randint(fsm.num_states, (n, 1), generator=g), walks[:, :-2]], 1)
    shown = fsm.successors[before, torch.randint(fsm.successors.shape[1], before.shape, generator=g)]
    tokens = fsm.encode(torch.cat([torch.where(swap, shown, walks[:, :-1]), walks[:, -1:]], 1))
    source = drawn[walks[:, :-1][swap]]
    positions = torch.zeros(n, tokens.shape[1] - 1, dtype=torch.bool)
    positions[:, ends] = swap
    codes = {}
    for address, v in ids.items():
        forced = torch.zeros(*positions.shape, v.shape[-1], dtype=torch.long)
        forced[positions] = v[:, ends].flatten(0, 1)[source]
        codes[address] = forced
    return tokens[:, :-1], tokens[:, 1:], (codes, positions)


# --- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def next_state_logprobs(model, fsm, x, forced=None, position=None, patched=None):
    """log P(next state) (n, num_states) after inputs x, exact over both digits, and log P(next
    digit) (n, base). `forced`: {codebook address: per-row code ids (n, k)}, forced at `position`
    in every forward; `patched`: {(layer, site): per-row activations (n, heads, dim)}, written
    over the activations there at `position`."""
    device = model.head.weight.device

    def put_at_position(values):
        def put(acts):
            acts = acts.clone()
            acts[:, position] = values.to(acts.device, acts.dtype)
            return acts
        return put

    def digit_logprobs(inputs, codes, values):
        force = cb.force_codes(model, codes, positions=[position]) if codes else contextlib.nullcontext()
        patch = cb.replace_activations(model, {key: put_at_position(v) for key, v in values.items()}) if values \
            else contextlib.nullcontext()
        with force, patch:
            return F.log_softmax(model(inputs.to(device))[:, -1, :fsm.base].float(), -1).cpu()

    first = lp = digit_logprobs(x, forced, patched)
    if fsm.digits == 2:  # each first digit, then the second: the joint over all two-digit states
        x2 = torch.cat([x.repeat_interleave(fsm.base, 0), torch.arange(fsm.base).repeat(len(x))[:, None]], 1)
        codes2 = {a: ids.repeat_interleave(fsm.base, 0) for a, ids in forced.items()} if forced else None
        values2 = {key: v.repeat_interleave(fsm.base, 0) for key, v in patched.items()} if patched else None
        lp = (lp[:, :, None] + digit_logprobs(x2, codes2, values2).view(-1, fsm.base, fsm.base)).flatten(1)
    return lp[:, :fsm.num_states], first


def js_divergence(logp, logq):
    """Jensen-Shannon divergence in nats between rows of log-probabilities."""
    logm = torch.logaddexp(logp, logq) - math.log(2)
    kl = lambda a: (a.exp() * (a - logm)).sum(-1)
    return 0.5 * (kl(logp) + kl(logq))


@torch.no_grad()
def intervention_success(model, fsm, sites, pairs, batch=200, seed=7, patch=None):
    """Section 4.1, Fig. 2: in a sequence ending in state a, force at its last position the codes
    recorded at the last position of a sequence ending in b. Success: the most likely next state
    is a legal successor of b. `sites`: codebook addresses; none is no intervention. `patch`:
    {(layer, site): fn} to write activations instead: at a's last position each of those sites
    gets fn(b's activations there); fn an SAE gives b's reconstruction (its latents, decoded),
    the identity b's activations themselves. Returns the success rate, the same for the next
    digit alone, and the paper's own measure: the mean Jensen-Shannon divergence (nats) of the
    next digit's distribution to b's unforced one."""
    g = torch.Generator().manual_seed(seed)
    inputs = fsm.encode(fsm.walks_ending_in(torch.arange(fsm.num_states), min(8, fsm.walk_length - 1), g))  # fits the context
    last = inputs.shape[1] - 1
    with cb.capture_activations(model) as acts:
        clean = F.log_softmax(model(inputs.to(model.head.weight.device))[:, -1, :fsm.base].float(), -1).cpu()
    recorded = {a: ids[:, last].cpu() for a, ids in cb.record_codes(model).items() if a in sites}
    written = {(layer, site): fn(acts[layer][site][:, last]) for (layer, site), fn in (patch or {}).items()}
    first_digits = fsm.successors // fsm.base if fsm.digits == 2 else fsm.successors
    first_legal = torch.zeros(fsm.num_states, fsm.base, dtype=torch.bool)
    first_legal[torch.arange(fsm.num_states)[:, None], first_digits] = True
    hits = first_hits = js = 0
    for a, b in (chunk.T for chunk in pairs.split(batch)):
        forced = {site: recorded[site][b] for site in sites}
        logprobs, first = next_state_logprobs(model, fsm, inputs[a], forced, last, {key: v[b] for key, v in written.items()})
        hits += fsm.legal[b, logprobs.argmax(-1)].sum().item()
        first_hits += first_legal[b, first.argmax(-1)].sum().item()
        js += js_divergence(first, clean[b]).sum().item()
    return hits / len(pairs), first_hits / len(pairs), js / len(pairs)


def best_state_codes(precision, recall):
    """Per state (row), the code with the best F1: (precision, recall, code), each (num_states,)."""
    code = cb.f1_score(precision, recall).argmax(-1, keepdim=True)
    return precision.gather(1, code)[:, 0], recall.gather(1, code)[:, 0], code[:, 0]


def best_site(scores):
    """scores: {site address: (precision, recall) of its features per state, each (num_states,
    features)}. The site whose best features (by F1, per state) have the highest mean precision x
    recall: (its address, its best_state_codes, and every site's mean precision and mean recall)."""
    per_site = {a: best_state_codes(*pr) for a, pr in scores.items()}
    best = max(per_site, key=lambda a: (per_site[a][0] * per_site[a][1]).mean().item())
    return (best, per_site[best], {a: v[0].mean().item() for a, v in per_site.items()},
            {a: v[1].mean().item() for a, v in per_site.items()})


@torch.no_grad()
def sample_states(model, fsm, n, seed):
    device = model.head.weight.device
    bos = torch.full((n, 1), fsm.bos, device=device)
    tokens = model.generate(bos, fsm.seq_len - 1, temperature=1.0, generator=torch.Generator(device).manual_seed(seed))
    return fsm.decode(tokens[:, 1:].cpu())


def val_metrics(model, tokens):
    """Next-token loss and accuracy on fixed validation tokens."""
    loss, accuracy, _ = runs.evaluate(model, tokens, batch_size=64)
    return {"val_loss": loss, "val_acc": accuracy}


def per_layer_counts(text):
    """'64' -> [64]; '192,512' -> [192, 512]: layer 0, then every later layer."""
    return [int(n) for n in text.split(",")]


def main(argv=None):
    started = time.time()
    args = settings(argv)
    rank, _ = runs.start(args.threads, args.device)
    with runs.one_run_per_folder(args.out):
        # --- data: the FSM, training walks drawn on the fly (seeded by step and rank), fixed evaluation walks
        fsm = TokFSM(args.num_states, args.num_edges, args.base, args.walk_length, args.seed)
        get_batch = functools.partial(walk_batch, fsm, args)
        eval_tokens = evaluation_walks(fsm, args)
        print(f"TokFSM: {args.num_states} states x {args.num_edges} edges, {fsm.seq_len - 1}-token inputs; model "
              f"{args.n_layer} layers x d_model {args.d_model}; codebooks k={args.k}: {args.attn_codes} codes per head, "
              f"{args.mlp_codes} per MLP (layer 0, 1, ...); attention window {args.attn_window or 'full'}")

        # --- model and training: the baseline, then the same weights with codebooks (section 3.2)
        torch.manual_seed(args.seed)
        data = dict(fsm=[args.num_states, args.num_edges, args.base, args.walk_length], seed=args.seed, batch_size=args.batch_size)
        common = dict(device=args.device, warmup=100, cosine=True, eval_every=500, ckpt_every=args.ckpt_every,
                      ckpt_seconds=args.ckpt_seconds, eval_fn=functools.partial(val_metrics, tokens=eval_tokens[:256]))
        finetune = common | dict(codebook_lr=args.codebook_lr, revive_every=args.revive_every,
                                 settings=data | {"interchange": args.interchange})
        base_path, codebook_path = os.path.join(args.out, "base.pt"), os.path.join(args.out, "codebook.pt")
        runs.check_stage(base_path, args.base_config.to_dict(), args.base_steps, args.lr, settings=data, **common)
        runs.check_stage(codebook_path, args.codebook_config.to_dict(), args.codebook_steps, args.finetune_lr, **finetune)
        base = runs.train(cb.GPT(args.base_config), get_batch, args.base_steps, args.lr, desc="baseline",
                          ckpt_path=base_path, settings=data, **common)
        runs.save_json(os.path.join(args.out, "fsm.json"), fsm.to_json())  # once a checkpoint there has accepted the settings
        model = cb.with_codebooks(base, args.codebook_config.codebooks)
        kmeans_data = torch.cat([get_batch(-1 - i, 0, 1)[0] for i in range(max(1, 256 // args.batch_size))])
        cb.init_codebooks_kmeans(model, kmeans_data.to(args.device))
        model = runs.train(model, functools.partial(walk_batch, fsm, args, model=model) if args.interchange else get_batch,
                           args.codebook_steps, args.finetune_lr, ckpt_path=codebook_path, desc="codebook", **finetune)

        if rank != 0:  # under torchrun, rank 0 alone fits the SAEs, evaluates and reports
            return runs.end_distributed()

        # --- the comparison: TopK SAEs fitted post hoc to the frozen baseline, at the codebook sites
        saes, sae_seconds = fit_saes(base, model, get_batch, args) if args.sae else (None, 0.0)

        # --- evaluate and report
        print("evaluating ...")
        results = evaluate(base, model, fsm, eval_tokens, args, saes)  # only what a rerun reproduces: no times
        report(results, time.time() - started, sae_seconds)
        runs.save_json(os.path.join(args.out, "results.json"), results)
        page = write_page(results, fsm, model, eval_tokens, args, runs.command_line("train_fsm.py", argv))
        print(f"wrote {args.out}/results.json, base.pt, codebook.pt, fsm.json" + (", sae.pt" if saes else "") + f"\nreport: {page}")
    runs.end_distributed()
    return results


def evaluation_walks(fsm, args):
    """The fixed evaluation walks as tokens (--eval_seqs, seq_len), drawn apart from every batch."""
    return fsm.encode(fsm.random_walks(args.eval_seqs, torch.Generator().manual_seed(10**6 + args.seed)))


def neuron_walks(args):
    """How many of the evaluation walks the neuron baseline reads (every unit's activations are kept)."""
    return min(NEURON_WALKS, args.eval_seqs)


def walk_batch(fsm, args, i, rank, world, model=None):
    """Micro-batch i of random walks (inputs, targets) for `rank` of `world` processes, a function of
    its arguments alone (runs.train); with `model`, an interchange batch of it (--interchange)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + i * world + rank + 1)
    walks = fsm.random_walks(args.batch_size // world, g)
    if model is not None:
        return interchange_batch(model, fsm, walks, args.interchange, g)
    tokens = fsm.encode(walks)
    return tokens[:, :-1], tokens[:, 1:]


NEURON_WALKS = 300  # the neuron baseline keeps every unit's activations on this many evaluation walks

# --preset NAME: other defaults for a set of flags; a flag given on the command line wins over them
PRESETS = {
    "cpu": {},  # the defaults below: README's table, on a CPU
    "quick": dict(out="out/quick", base_steps=400, codebook_steps=500, eval_seqs=500, pairs=1000, sae=False),  # a first run: every claim, fewer steps
    "paper": dict(out="out/fsm-paper", n_layer=4, d_model=128, n_head=4, d_mlp=512, attn_codes=[10000], mlp_codes=[10000], batch_size=512,
                  base_steps=20000, codebook_steps=20000, lr=1e-3, finetune_lr=1e-3, codebook_lr=1e-3,
                  attn_window=0, interchange=0.0),  # the paper's sizes (section 4.1), for a GPU
}


def settings(argv):
    """The command line, every setting checked, and the two models' configurations built (so a bad
    codebook setting is refused before the baseline trains)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False,  # --help after the preset's defaults
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu",
                   help="other defaults for a set of flags (PRESETS in this file); a flag given here wins over its preset")
    p.add_argument("--num_states", type=int, default=100, help="states of the FSM")
    p.add_argument("--num_edges", type=int, default=10, help="successors of each state")
    p.add_argument("--base", type=int, default=10, help="states are written in this base")
    p.add_argument("--walk_length", type=int, default=64, help="states per sequence")
    p.add_argument("--n_layer", type=int, default=4, help="transformer layers")
    p.add_argument("--n_head", type=int, default=4, help="attention heads per layer")
    p.add_argument("--d_model", type=int, default=64, help="width of the residual stream")
    p.add_argument("--d_mlp", type=int, default=256, help="width of the MLPs' hidden layer")
    p.add_argument("--attn_window", type=int, default=2, help="0: full causal attention; w: each position sees itself and w - 1 before it")
    p.add_argument("--attn_codes", type=per_layer_counts, default=[64], help="codes per attention-head codebook (as --mlp_codes)")
    p.add_argument("--mlp_codes", type=per_layer_counts, default=[192, 512], help="codes per MLP codebook; a list gives layers 0, 1, ..., "
                   "its last count repeating (layer 0 of a window-2 model sees only ~200 digit pairs)")
    p.add_argument("--k", type=int, default=1, help="codes active per codebook and position")
    p.add_argument("--codebook_loss", choices=cb.LOSSES, default="commitment",
                   help="commitment: VQ-VAE style, also pulls activations towards their codes")
    p.add_argument("--beta", type=float, default=0.25, help="weight of the commitment term")
    p.add_argument("--batch_size", type=int, default=64, help="walks per step, shared out among processes under torchrun")
    p.add_argument("--base_steps", type=int, default=1000, help="baseline training steps")
    p.add_argument("--codebook_steps", type=int, default=1300, help="codebook finetuning steps")
    p.add_argument("--lr", type=float, default=3e-3, help="the baseline's learning rate")
    p.add_argument("--finetune_lr", type=float, default=1e-3, help="the model's weights in the codebook stage")
    p.add_argument("--codebook_lr", type=float, default=1.5e-3, help="codes and their LayerNorms; higher lets heads collapse onto few codes")
    p.add_argument("--interchange", type=float, default=0.25, help="share of states trained with another state's codes (0: off)")
    p.add_argument("--revive_every", type=int, default=50, help="revive unused codes every this many steps (0: never)")
    p.add_argument("--eval_seqs", type=int, default=1000, help="fixed validation sequences")
    p.add_argument("--samples", type=int, default=200, help="sequences sampled for transition accuracy")
    p.add_argument("--pairs", type=int, default=2000, help="(a, b) state pairs for interventions")
    p.add_argument("--ckpt_every", type=int, default=100, help="checkpoint every this many steps...")
    p.add_argument("--ckpt_seconds", type=int, default=120, help="...or this many seconds, whichever comes first")
    p.add_argument("--cards", type=int, default=0, help="code cards per codebook in report.html, most frequent first (0: every code that fires, up to 20,000 cards in all)")
    p.add_argument("--sae", action=argparse.BooleanOptionalAction, default=True,
                   help="also fit TopK SAEs to the frozen baseline at the codebook sites and compare")
    p.add_argument("--sae_steps", type=int, default=400, help="Adam steps of each SAE, 512 cached activations each")
    p.add_argument("--sae_seqs", type=int, default=256, help="training walks whose activations the SAEs are fitted to")
    p.add_argument("--sae_directions", choices=["data", "random"], default="data",
                   help="SAE decoder rows start along b_pre -> random activations, or random (Gao et al.)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); README's tables: 1")
    p.add_argument("--seed", type=int, default=0, help="seed of the FSM, the initialisation and every batch")
    p.add_argument("--out", default="out/fsm", help="output folder")
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])
    p.add_argument("-h", "--help", action="help", help="show this message, with the preset's defaults, and exit")
    args = p.parse_args(argv)

    runs.check_settings(args, positive=("num_states", "num_edges", "base", "walk_length", "n_layer", "n_head", "d_model",
                                        "d_mlp", "attn_codes", "mlp_codes", "k", "batch_size", "base_steps",
                                        "codebook_steps", "eval_seqs", "samples", "pairs", "ckpt_every", "sae_steps", "sae_seqs"),
                        non_negative=("attn_window", "revive_every", "ckpt_seconds", "cards", "threads"),
                        rates=("lr", "finetune_lr", "codebook_lr"), shares=("interchange",), finite=("beta",))
    if args.beta < 0:
        raise ValueError(f"--beta {args.beta}: the commitment weight must be 0 or more")
    if not 0 <= args.seed < 2**40:  # batch seeds are seed * 1,000,003 + step: within torch's 64 bits
        raise ValueError(f"--seed {args.seed}: must be between 0 and 2^40")
    defaults = p.parse_args([])  # the preset's
    if not args.sae:
        runs.refuse_unused(args, defaults, ("sae_steps", "sae_seqs", "sae_directions"), "without --sae")
    if args.codebook_loss != "commitment":
        runs.refuse_unused(args, defaults, ("beta",), f"with --codebook_loss {args.codebook_loss}")
    runs.check_device(args.device)
    runs.check_out(args.out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise ValueError(f"--batch_size {args.batch_size}: must divide among the {world} processes")
    for name in ("attn_codes", "mlp_codes"):  # one count per layer, the last one repeating
        counts = getattr(args, name)
        if len(counts) > args.n_layer and counts is not p.get_default(name):  # a default (not typed) is cut to the layers
            raise ValueError(f"--{name}: {len(counts)} code counts for {args.n_layer} layers")
        counts = counts[:args.n_layer]
        setattr(args, name, counts + counts[-1:] * (args.n_layer - len(counts)))
    fsm = TokFSM(args.num_states, args.num_edges, args.base, args.walk_length, args.seed)  # its own checks
    orphans = (~fsm.legal.any(0)).nonzero()[:, 0].tolist()
    if orphans:
        raise ValueError(f"--seed {args.seed}: states {orphans} of this FSM have no predecessor, so no walk ends "
                         "in them and the interventions cannot be measured: choose another --seed")
    unseen = (~fsm.state_masks(evaluation_walks(fsm, args)[:neuron_walks(args)]).flatten(1).any(1)).nonzero()[:, 0].tolist()
    if unseen:  # a state without positions would enter every mean as precision 0
        raise ValueError(f"--eval_seqs {args.eval_seqs}: the first {neuron_walks(args)} evaluation walks (the neurons' and "
                         f"the codes') never reach states {unseen}: give " + ("more --eval_seqs" if args.eval_seqs < NEURON_WALKS
                                                                           else "a longer --walk_length or another --seed"))
    if args.pairs > args.num_states * (args.num_states - 1):
        raise ValueError(f"--pairs {args.pairs}: {args.num_states} states make only "
                         f"{args.num_states * (args.num_states - 1)} pairs (a, b) of distinct states")
    digits = 1 if args.num_states <= args.base else 2
    args.base_config = cb.GPTConfig(vocab_size=args.base + 1, block_size=digits * args.walk_length, n_layer=args.n_layer,
                                    n_head=args.n_head, d_model=args.d_model, d_mlp=args.d_mlp, attn_window=args.attn_window)
    spec = dict(k=args.k, loss=args.codebook_loss, beta=args.beta)
    args.codebook_config = cb.GPTConfig(**args.base_config.to_dict() | {"codebooks": {
        "attn": dict(spec, num_codes=args.attn_codes), "mlp": dict(spec, num_codes=args.mlp_codes)}})
    return args


def fit_saes(base, model, get_batch, args):
    """TopK SAEs (sae.py) on the frozen baseline's activations at every codebook site, with that
    codebook's dictionary size and k, fitted to --sae_seqs training walks of their own; kept in
    OUT/sae.pt (a rerun reads them back). The SAEs draw from their own seeded generator, never
    from torch's global one. Returns ({(layer, site): TopKSAE}, seconds)."""
    started = time.time()
    batches = -1000 - torch.arange(math.ceil(args.sae_seqs / args.batch_size))  # apart from training's and k-means'
    tokens = torch.cat([get_batch(int(i), 0, 1)[0] for i in batches])[:args.sae_seqs]
    saes = sae.fit_saes(os.path.join(args.out, "sae.pt"), base, tokens, sae.codebook_sizes(model), steps=args.sae_steps,
                        data_directions=args.sae_directions == "data", seed=args.seed)
    seconds = time.time() - started
    print(f"SAEs: {len(saes)} sites, {sum(s.heads for s in saes.values())} SAEs, fitted (or read back) in {seconds:.0f} s")
    return saes, seconds


@torch.no_grad()
def evaluate(base, model, fsm, eval_tokens, args, saes=None):
    """Every figure of the table, for results.json."""
    results = {"config": {k: v for k, v in vars(args).items() if not k.endswith("_config")},
               "baseline": {}, "codebook": {}, "history": {"baseline": base.history, "codebook": model.history}}
    for name, m in (("baseline", base), ("codebook", model)):
        accuracy, first = fsm.transition_accuracy(sample_states(m, fsm, args.samples, args.seed + 1))
        results[name] |= {"transition_accuracy": accuracy, "first_transition_accuracy": first,
                          **val_metrics(m, eval_tokens[:256])}
    c = results["codebook"]

    ids, _ = cb.record_dataset(model, eval_tokens[:, :-1])
    num_codes = {a: model.locate(a)[0].num_codes for a in ids}
    c["dead_code_fraction"] = {a: cb.dead_share(cb.count_codes(v, num_codes[a])).item() for a, v in ids.items()}

    # state codes (section 4.1): per state the best code of each codebook; the best codebook's mean
    masks = fsm.state_masks(eval_tokens)
    best, (precision, recall, state_code), c["state_code_precision_per_codebook"], c["state_code_recall_per_codebook"] = \
        best_site({a: cb.code_precision_recall(v, masks, num_codes[a]) for a, v in ids.items()})
    c |= {"state_code_codebook": best, "state_code_precision": precision.mean().item(),
          "state_code_recall": recall.mean().item()}

    # the neuron baseline: every coordinate of the baseline's attention and MLP outputs, every layer
    n_seqs = neuron_walks(args)
    with cb.capture_activations(base) as acts:
        base(eval_tokens[:n_seqs, :-1].to(args.device))
    neurons = torch.cat([acts[i][site].flatten(2).flatten(0, 1).cpu() for i in acts for site in ("attn", "mlp")], 1)
    sub_masks = masks[:, :n_seqs].flatten(1)
    best_neuron = baselines.neuron_precision_at_recall(neurons, sub_masks, recall).max(-1)
    c["neuron_precision"] = best_neuron.values.mean().item()
    c["states"] = [{"state": s, "code": f"{best}.{int(state_code[s])}", "precision": precision[s].item(),
                    "recall": recall[s].item(), "neuron": neuron_name(int(best_neuron.indices[s]), args),
                    "neuron_precision": best_neuron.values[s].item()} for s in range(fsm.num_states)]

    # interventions: force b's codes at a's last position
    pairs = intervention_pairs(args)
    attn, mlp = [a for a in ids if ".H" in a], [a for a in ids if a.endswith(".MLP")]
    conditions = {name: intervention_success(model, fsm, sites, pairs)
                  for name, sites in (("none", []), ("attn", attn), ("mlp", mlp), ("all", attn + mlp))}
    c["intervention_success"] = {name: both[0] for name, both in conditions.items()}
    c["intervention_first_digit_success"] = {name: both[1] for name, both in conditions.items()}
    c["intervention_js_to_b"] = {name: both[2] for name, both in conditions.items()}

    # the same measures for TopK SAEs (post hoc, frozen baseline) and for neurons: detection by
    # each SAE's best latent per state, exactly as codes; splicing every site's reconstruction
    # in; interventions that write b's reconstruction (SAE) or b's activations (neurons) at a's
    # last position, at every site
    if saes:
        s = results["sae"] = {}
        with cb.replace_activations(base, saes):
            accuracy, first = fsm.transition_accuracy(sample_states(base, fsm, args.samples, args.seed + 1))
            s |= {"spliced_transition_accuracy": accuracy, "spliced_first_transition_accuracy": first,
                  **{f"spliced_{k}": v for k, v in val_metrics(base, eval_tokens[:256]).items()}}
        latents = sae.record_latents(base, saes, eval_tokens[:, :-1])
        sizes = {a: saes[cb.parse_address(a).layer, cb.parse_address(a).site].num_latents for a in latents}
        s["dead_latent_fraction"] = {a: sae.dead_fraction(v, sizes[a]) for a, v in latents.items()}
        best_sae, (sae_precision, sae_recall, _), s["state_latent_precision_per_sae"], s["state_latent_recall_per_sae"] = \
            best_site({a: sae.latent_precision_recall(v, masks, sizes[a]) for a, v in latents.items()})
        s |= {"state_latent_sae": best_sae, "state_latent_precision": sae_precision.mean().item(),
              "state_latent_recall": sae_recall.mean().item()}
        n = results["neurons"] = {"precision_at_code_recall": c["neuron_precision"],
                                  "precision_at_sae_recall": baselines.neuron_precision_at_recall(
                                      neurons, sub_masks, sae_recall).max(-1).values.mean().item()}
        keys = {"attn": [key for key in saes if key[1] == "attn"], "mlp": [key for key in saes if key[1] == "mlp"], "all": list(saes)}
        none = intervention_success(base, fsm, [], pairs)
        for column, write in ((s, lambda key: saes[key]), (n, lambda key: (lambda acts: acts))):
            outcomes = {"none": none} | {name: intervention_success(base, fsm, [], pairs, patch={key: write(key) for key in at})
                                         for name, at in keys.items()}
            column["intervention_success"] = {name: o[0] for name, o in outcomes.items()}
            column["intervention_first_digit_success"] = {name: o[1] for name, o in outcomes.items()}
            column["intervention_js_to_b"] = {name: o[2] for name, o in outcomes.items()}
    return results


def intervention_pairs(args):
    """--pairs (a, b) of distinct states, drawn at random (seeded) from all of them."""
    pairs = torch.cartesian_prod(torch.arange(args.num_states), torch.arange(args.num_states))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return pairs[torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed + 3))[:args.pairs]]


def neuron_name(column, args):
    """Column of the neuron baseline's activations -> 'L1.H2[5]' (a head's output before W_O) or 'L1.MLP[40]'."""
    block, unit = divmod(column, args.d_model)
    layer, site = divmod(block, 2)
    d_head = args.d_model // args.n_head
    return f"L{layer}.H{unit // d_head}[{unit % d_head}]" if site == 0 else f"L{layer}.MLP[{unit}]"


def pct(x):
    return f"{100 * x:6.2f}%"


def report(results, wall_seconds, sae_seconds=0.0):
    b, c = results["baseline"], results["codebook"]
    dead, best = c["dead_code_fraction"], c["state_code_codebook"]
    worst = max(dead, key=dead.get)
    success, first, js = c["intervention_success"], c["intervention_first_digit_success"], c["intervention_js_to_b"]
    print(f"""
                                          baseline   codebook
transition accuracy                       {pct(b['transition_accuracy'])}    {pct(c['transition_accuracy'])}
first-transition accuracy                 {pct(b['first_transition_accuracy'])}    {pct(c['first_transition_accuracy'])}
validation loss                           {b['val_loss']:7.4f}    {c['val_loss']:7.4f}
validation next-token accuracy            {pct(b['val_acc'])}    {pct(c['val_acc'])}
dead codes: worst codebook ({worst:>7})               {pct(dead[worst])}
dead codes: mean of {len(dead):2d} codebooks                      {pct(sum(dead.values()) / len(dead))}
state codes ({best:>7}): mean best-code precision      {pct(c['state_code_precision'])}
                         mean best-code recall         {pct(c['state_code_recall'])}
best neuron: precision at that recall                  {pct(c['neuron_precision'])}
intervention success (next state / its first digit) and the next digit's JS divergence to b's:""")
    for name, label in (("none", "none"), ("attn", "attention codes"), ("mlp", "MLP codes"), ("all", "all codes")):
        print(f"                      {label:21s} {pct(success[name])} / {pct(first[name])} / {js[name]:.3f}")
    if "sae" in results:
        report_comparison(results, sae_seconds)
    print(f"wall time                                              {wall_seconds:.0f} s")



@torch.no_grad()
def write_page(results, fsm, model, eval_tokens, args, command):
    """OUT/report.html: the table, the training curves, the state codes next to the best neurons,
    the interventions, the dead codes, and the code browser on the evaluation walks, each position
    at a state's last digit labelled with that state; `command` under the title. Returns its path."""
    b, c = results["baseline"], results["codebook"]
    best, dead = c["state_code_codebook"], c["dead_code_fraction"]
    table = pages.table([
        ["transition accuracy (sampled walks)", pages.pct(b["transition_accuracy"], 2), pages.pct(c["transition_accuracy"], 2)],
        ["first-transition accuracy", pages.pct(b["first_transition_accuracy"], 2), pages.pct(c["first_transition_accuracy"], 2)],
        ["validation loss", f"{b['val_loss']:.4f}", f"{c['val_loss']:.4f}"],
        ["validation next-token accuracy", pages.pct(b["val_acc"], 2), pages.pct(c["val_acc"], 2)],
        ["dead codes: mean over codebooks / worst", "", f"{pages.pct(sum(dead.values()) / len(dead), 2)} / {pages.pct(max(dead.values()), 2)}"],
        [pages.join(["state codes (", pages.link(best, best), "): mean best-code precision"]), "", pages.pct(c["state_code_precision"], 2)],
        ["state codes: mean best-code recall", "", pages.pct(c["state_code_recall"], 2)],
        ["best neuron: precision at that recall", pages.pct(c["neuron_precision"], 2), ""],
        ["intervention success, all codes (next state / its first digit)", "",
         f"{pages.pct(c['intervention_success']['all'], 2)} / {pages.pct(c['intervention_first_digit_success']['all'], 2)}"],
    ], ["", "baseline", "codebook"])

    history = results["history"]
    curve = lambda stage, key: {"name": stage, "x": [h["step"] for h in history[stage]], "y": [h.get(key) for h in history[stage]]}
    training = pages.row(
        pages.figure("Training loss", pages.line_chart([curve("baseline", "loss"), curve("codebook", "loss")], "step of its stage", "cross-entropy", width=360)),
        pages.figure("Dead codes (codebook stage)", pages.line_chart([curve("codebook", "dead")], "step", "share of codes unused", y_format=pages.pct, width=360),
                     "mean over codebooks, since the last revival"),
        pages.figure("Reconstruction error (codebook stage)", pages.line_chart([curve("codebook", "mse")], "step", "mean squared error", width=360)))

    # which code fires at each state's last digit, codes ordered by the state they fire at most
    tokens, masks = eval_tokens[:, :-1], fsm.state_masks(eval_tokens)
    ids, scores = cb.record_dataset(model, tokens)
    _, share = cb.code_precision_recall(ids[best], masks, model.locate(best)[0].num_codes)  # (states, codes)
    used = [code for code in range(share.shape[1]) if share[:, code].sum() > 0]
    used.sort(key=lambda code: (int(share[:, code].argmax()), -float(share[:, code].max())))
    heat = pages.heat_map(share[:, used].tolist(), [f"state {s}" for s in range(fsm.num_states)], [str(u) for u in used],
                          "FSM state", f"{best} code", col_links=[f"{best}.{u}" for u in used], width=560)
    states = pages.table([[f"state {r['state']}", pages.code_link(r["code"]), pages.pct(r["precision"]), pages.pct(r["recall"]),
                           r["neuron"], pages.pct(r["neuron_precision"])] for r in c["states"]],
                         ["state", "best code", "precision", "recall", "best neuron", "its precision"])

    conditions = ["none", "attn", "mlp", "all"]
    names = ["no intervention", "attention codes", "MLP codes", "all codes"]
    interventions = pages.row(
        pages.figure("Intervention success", pages.bar_chart(names, [
            {"name": "next state a successor of b", "values": [c["intervention_success"][n] for n in conditions]},
            {"name": "its first digit", "values": [c["intervention_first_digit_success"][n] for n in conditions]}],
            pages.pct, 1.0, width=480)),
        pages.figure("Next digit's JS divergence to b's", pages.bar_chart(
            names, [{"name": "nats", "values": [c["intervention_js_to_b"][n] for n in conditions]}], lambda v: f"{v:.3f}", width=400),
            "lower: the forced model predicts as if it were in b"))

    position_text = [[("^" if p == 0 else (" " if (p - 1) % fsm.digits == 0 else "") + str(t)) for p, t in enumerate(row)]
                     for row in tokens.tolist()]
    labels = torch.where(masks.any(0), masks.float().argmax(0), -1)
    browser = pages.code_browser_data(model, tokens, labels=labels, label_names=[f"state {s}" for s in range(fsm.num_states)],
                                      max_cards=args.cards or None, before=13, after=4, recorded=(ids, scores),
                                      always=[r["code"] for r in c["states"]] + [f"{best}.{u}" for u in used],  # the heat map's links
                                      position_text=position_text)

    return pages.write(os.path.join(args.out, "report.html"), "TokFSM: codebook features", [
        pages.section("Results", table, note=f"{fsm.num_states} states x {args.num_edges} edges; model {args.n_layer} layers x "
                      f"d_model {args.d_model}; codebooks k={args.k}; {args.eval_seqs} evaluation walks."),
        pages.section("Training", training),
        pages.section("State codes", pages.row(pages.figure(f"How often each {best} code fires at each state's last digit", heat,
                                                            "a good model: close to a permutation, one code per state"),
                                               pages.scroll(states, height=560)),
                      note="Per state, the code of the best codebook with the best F1 (section 4.1), beside the best "
                           "single neuron of the baseline at the same recall (its precision there)."),
        pages.section("Interventions", interventions, note="Force the codes recorded at the end of state b at the last "
                      f"position of a walk ending in state a, {args.pairs} pairs (a, b) (section 4.1, Fig. 2)."),
        pages.section("Dead codes", pages.bar_chart(list(dead), [{"name": "dead", "values": list(dead.values())}], pages.pct,
                                                    links=list(dead), width=520),
                      note="Share of each codebook's codes that never fire on the evaluation walks."),
        pages.section("Code browser", pages.code_browser(browser, "state")),
    ], subtitle=f"{command}; settings and every figure in results.json")


def report_comparison(results, sae_seconds):
    """Neurons, SAEs and codebooks side by side: detection, splicing, interventions."""
    b, c, s, n = results["baseline"], results["codebook"], results["sae"], results["neurons"]
    mean = lambda d: sum(d.values()) / len(d)

    def row(label, *cells):
        print(f"  {label:46s}" + "".join(f"{cell:>11s}" for cell in cells))

    print(f"""
neurons and TopK SAEs of the frozen baseline, codebooks finetuned, on the same evaluation sets
(SAEs at the codebook sites, same dictionary size and k; fitted, or read back, in {sae_seconds:.0f} s):""")
    row("", "neurons", "SAEs", "codebooks")
    row("states: each one's best feature, mean precision", pct(n["precision_at_sae_recall"]),
        pct(s["state_latent_precision"]), pct(c["state_code_precision"]))
    row("        at mean recall (neurons: the SAEs')", "", pct(s["state_latent_recall"]), pct(c["state_code_recall"]))
    row("        best site", "", s["state_latent_sae"], c["state_code_codebook"])
    row("        neurons at the codes' recall", pct(n["precision_at_code_recall"]))
    row("spliced in at every site (neurons: the baseline)")
    row("        validation loss", f"{b['val_loss']:.4f}", f"{s['spliced_val_loss']:.4f}", f"{c['val_loss']:.4f}")
    row("        validation next-token accuracy", pct(b["val_acc"]), pct(s["spliced_val_acc"]), pct(c["val_acc"]))
    row("        transition accuracy", pct(b["transition_accuracy"]), pct(s["spliced_transition_accuracy"]),
        pct(c["transition_accuracy"]))
    row("        dead features, mean over sites", "", pct(mean(s["dead_latent_fraction"])), pct(mean(c["dead_code_fraction"])))
    row("two-digit success when a's last position gets b's")
    row("  activations / reconstruction / codes at")
    for name, label in (("none", "no site"), ("attn", "the attention sites"), ("mlp", "the MLP sites"), ("all", "every site")):
        row(f"        {label}", pct(n["intervention_success"][name]), pct(s["intervention_success"][name]),
            pct(c["intervention_success"][name]))

if __name__ == "__main__":
    runs.run_main(main)
