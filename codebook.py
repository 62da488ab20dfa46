"""
Codebook Features: transformers whose hidden states pass through vector-quantisation bottlenecks.

Paper: Tamkin, Taufeeque, Goodman, "Codebook Features: Sparse and Discrete Interpretability for
Neural Networks", arXiv 2310.17230 (ICML 2024); section numbers below refer to it. A codebook
replaces an activation x by the mean of the k codes most similar to LayerNorm(x), so every hidden
state it sits on becomes a handful of discrete, readable and writable ids.

This file, in the paper's order:
  1. code search      the k best codes of every query (section 3.1, steps 2-3)
  2. codebook layer   LayerNorm, search, mean of k codes, straight-through, loss; dead-code revival
  3. transformer      what a model with codebooks provides (CodebookModel); a compact GPT
  4. addresses        "L1.H2", "L3.MLP", "L0.BLOCK", "L1.H2.517": one parser, one formatter
  5. interventions    record, force and disable codes; capture and replace activations (section 3.3)
  6. finetuning       a trained model plus codebooks, k-means initialised (section 3.2)
  7. finding codes    precision / recall of codes against a mask, top contexts (section 4)
Training and checkpoints: runs.py; pretrained families: models.py; the fused search: csrc/;
what codes are compared with (neurons, activation addition, sparse autoencoders): baselines.py, sae.py.
"""
import contextlib
import math
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

SITES = ("attn", "mlp", "block")  # where a codebook can sit in a transformer block
SIMILARITIES = ("cosine", "euclidean")
LOSSES = ("aeloss", "none", "commitment")

# ------------------------------------------------------------------------------------------------
# 1. Code search: for queries x (heads, tokens, d) and codebooks (heads, codes, d), the k best codes
# of every query, best first. Cosine scores x . c / |c| (section 3.1: the query's own norm does not
# change its ranking); euclidean scores -|x - c|.

def code_scores(x, codes, similarity, disabled=None):
    """The (heads, tokens, codes) scores; -inf for a NaN score (from a NaN or inf input, as in csrc/)
    and for the codes a (heads, codes) bool mask `disabled` sets."""
    if similarity == "cosine":
        s = x @ (codes / codes.norm(dim=-1, keepdim=True).clamp_min(1e-12)).transpose(1, 2)
    else:
        sq_dist = (x * x).sum(-1, keepdim=True) - 2 * x @ codes.transpose(1, 2) + (codes * codes).sum(-1)[:, None, :]
        s = -sq_dist.clamp_min(0).sqrt()
    s = s.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    return s if disabled is None else s.masked_fill(disabled[:, None, :], -math.inf)


def search_reference(x, codebook, k, similarity="cosine", disabled=None):
    """Every score materialised, then top-k: O(tokens x codes) memory. Written to be read."""
    return code_scores(x, codebook, similarity, disabled).topk(k, dim=-1)


# The search topk_codes runs: the reference above, until csrc/dispatch.install() (runs.py calls it) puts
# the fastest search that applies in its place, the fused extension or a tiled one: the same ids (exact
# ties aside) and scores, in less memory.
search = search_reference


def topk_codes(x, codebook, k, similarity="cosine", disabled=None):
    """(scores, ids), each (heads, tokens, k), without gradient: training differentiates through the
    gathered codes only (section 3.1). Searched by `search`, above, in float32 whatever x's dtype."""
    H, C, d = codebook.shape
    if x.dim() != 3 or x.shape[0] != H or x.shape[2] != d:
        raise ValueError(f"search queries must have shape (heads={H}, tokens, d={d}), got {tuple(x.shape)}")
    check_codebook(C, k, similarity)
    with torch.no_grad():
        return search(x.float(), codebook.float(), k, similarity, disabled)


def check_codebook(num_codes, k, similarity="cosine", loss="aeloss"):
    if not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes={num_codes!r} must be an int, at least 1")
    if not isinstance(k, int) or not 1 <= k <= num_codes:
        raise ValueError(f"k={k!r} must be an int between 1 and num_codes={num_codes}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity={similarity!r} is not one of {SIMILARITIES}")
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {LOSSES}")


def check_ids(ids, num_codes, what="code ids"):
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.numel() and (ids.min() < 0 or ids.max() >= num_codes):
        raise ValueError(f"{what} must be integers in [0, num_codes={num_codes})")


# ------------------------------------------------------------------------------------------------
# 2. The codebook layer (section 3.1). One layer holds `heads` independent codebooks (the per-head
# attention codebooks of one layer, or a single MLP / block codebook) as one parameter (heads,
# codes, d), searched in one call.

class CodebookLayer(nn.Module):
    def __init__(self, heads, dim, num_codes, k=1, similarity="cosine", loss="aeloss", beta=0.25):
        super().__init__()
        if not all(isinstance(n, int) and n >= 1 for n in (heads, dim)):
            raise ValueError(f"heads={heads!r} and dim={dim!r} must be positive integers")
        check_codebook(num_codes, k, similarity, loss)
        self.heads, self.num_codes, self.dim, self.k = heads, num_codes, dim, k
        self.similarity, self.loss_kind, self.beta = similarity, loss, beta
        self.ln_weight = nn.Parameter(torch.ones(heads, dim))  # one LayerNorm per codebook
        self.ln_bias = nn.Parameter(torch.zeros(heads, dim))
        self.codes = nn.Parameter(torch.randn(heads, num_codes, dim))  # N(0,1): norm ~ sqrt(d), as LN output
        # training statistics since the last revival, per token; summed over DDP ranks by runs.train
        self.register_buffer("usage", torch.zeros(heads, num_codes, dtype=torch.long), persistent=False)
        self.register_buffer("recon_sum", torch.zeros(()), persistent=False)
        self.register_buffer("token_count", torch.zeros((), dtype=torch.long), persistent=False)
        self.enabled = True
        self.forced = []  # (head, codes (B|1, T|1, m), positions) set by force_codes()
        self.disabled = None  # (heads, codes) bool, set by disable_codes()
        self.last_ids = self.last_scores = self.last_input = self.last_error = None
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        """x (..., heads, dim) -> the same shape, each head's vector replaced by the mean of its k codes."""
        if x.shape[-2:] != (self.heads, self.dim) or not x.is_floating_point():
            raise ValueError(f"codebook input must be floating point ending in (heads={self.heads}, dim={self.dim}), "
                             f"got {x.dtype} {tuple(x.shape)}")
        if not self.enabled:
            self.last_ids = self.last_scores = None  # no codes were chosen: none to record, no loss
            self.aux_loss = x.new_zeros((), dtype=torch.float32)
            return x
        x_n = self.normalize(x)                                       # 1. LayerNorm
        scores, searched = self.search(x_n)                           # 2-3. score every code, keep the k best
        ids = self.apply_forcing(searched)                            # interventions (section 3.3)
        chosen = None                                                 # None: the search chose every code
        if self.forced:
            chosen = (ids == searched).all(-1)                        # heads whose codes were not forced
            scores = self.score_forced(scores, x_n.detach(), ids, ids != searched)  # a forced code: its own score
        self.last_ids, self.last_scores = ids, scores
        q = self.mean_of_codes(ids)                                   # 4. the mean of the k codes replaces x
        sq_err = (q - x_n.detach()).pow(2)
        self.aux_loss = self.codebook_loss(sq_err, q, x_n, chosen)    # 5. the codebook's own loss
        if self.training and torch.is_grad_enabled():  # a training step; recording, sampling count nothing
            self.count_usage(ids, chosen, sq_err, x_n)
        return StraightThrough.apply(q, x_n, chosen).to(x.dtype)      # 5. gradient straight through to x

    def normalize(self, x):
        return torch.addcmul(self.ln_bias, F.layer_norm(x, (self.dim,)), self.ln_weight)

    def search(self, x_n):
        """(scores, ids), each (..., heads, k): every head's k best codes, all heads in one call."""
        per_head = x_n.reshape(-1, self.heads, self.dim).transpose(0, 1)  # (heads, tokens, dim)
        scores, ids = topk_codes(per_head, self.codes, self.k, self.similarity, self.disabled)
        return [t.transpose(0, 1).reshape(*x_n.shape[:-1], self.k) for t in (scores, ids)]

    def score_forced(self, scores, x_n, ids, forced):
        """scores (..., heads, k) with the slots `forced` (a bool mask) scored as the search scores their codes."""
        codes = self.codes.detach().reshape(-1, self.dim)[self._rows(ids)[forced]].float()  # (n, dim)
        x = x_n.float()[..., None, :].expand(*ids.shape, self.dim)[forced]
        own = code_scores(x[:, None], codes[:, None], self.similarity)  # n pairs as n "heads" of one query, one code
        return scores.masked_scatter(forced, own.flatten())

    def mean_of_codes(self, ids):
        """One embedding_bag over all heads' codes: never the (..., heads, k, dim) gathered codes."""
        bags = self._rows(ids).reshape(-1, self.k)
        return F.embedding_bag(bags, self.codes.reshape(-1, self.dim), mode="mean").view(*ids.shape[:-1], self.dim)

    def _rows(self, ids):
        """Code ids (..., heads, k) as rows of codes.reshape(-1, dim): head h's codes start at h * num_codes."""
        return ids + torch.arange(self.heads, device=ids.device)[:, None] * self.num_codes

    def apply_forcing(self, ids):
        """Overwrite id slots with forced codes (section 3.3): a forcing's m codes take the m least similar
        slots not forced yet at its positions, so force_codes nested fills the slots before the outer one's.
        A forced code takes its slot also where the search chose it already: it then counts twice in the mean."""
        if self.forced and ids.dim() != 4:
            raise ValueError(f"codes are forced on inputs (batch, seq, heads, dim), got {ids.dim() - 1} dimensions")
        ids = ids.clone()  # a new tensor: the search's ids stay as they were, to compare with
        taken = torch.zeros(ids.shape[:-1], dtype=torch.long, device=ids.device)  # (..., heads): slots forced so far
        for head, codes, positions in self.forced:
            if any(size not in (1, n) for size, n in zip(codes.shape[:-1], ids.shape[:-2])):
                raise ValueError(f"forced codes of shape {tuple(codes.shape)} do not fit the input's (batch, seq) = "
                                 f"{tuple(ids.shape[:-2])}")
            where = forced_positions(positions, ids.shape[-3], ids.device)  # (batch | 1, seq, 1)
            if where.shape[0] not in (1, ids.shape[0]):
                raise ValueError(f"a mask of forced positions for {where.shape[0]} sequences, the input has {ids.shape[0]}")
            m = codes.shape[-1]
            first = self.k - taken[..., head, None] - m  # (batch, seq, 1): the slot the first code takes
            if (where & (first < 0)).any():
                raise ValueError(f"more codes forced at one position than its codebook's k={self.k} slots")
            slots = first.clamp_min(0) + torch.arange(m, device=ids.device)  # clamped where nothing is forced
            overwritten = ids[..., head, :].scatter(-1, slots, codes.to(ids.device).expand(slots.shape))
            ids[..., head, :] = torch.where(where, overwritten, ids[..., head, :])
            taken[..., head] += where[..., 0] * m
        return ids

    def codebook_loss(self, sq_err, q, x_n, chosen=None):
        """sq_err = (q - sg(x_n))^2 summed over dimensions, averaged over tokens, summed over heads
        ("aeloss"); `chosen` (..., heads) leaves out forced codes, not chosen for their input: their
        tokens add 0 and still count in the average."""
        if self.loss_kind == "none":
            return q.new_zeros(())
        if self.loss_kind == "commitment":  # VQ-VAE: also pull the inputs towards their codes
            sq_err = sq_err + self.beta * (x_n - q.detach()).pow(2)
        per_token = sq_err.sum(-1) if chosen is None else sq_err.sum(-1) * chosen
        return per_token.reshape(-1, self.heads).mean(0).sum()

    def count_usage(self, ids, chosen, sq_err, x_n):
        """Usage of the codes the search chose, reconstruction error, the inputs to revive codes at."""
        used = self._rows(ids) if chosen is None else self._rows(ids)[chosen]
        self.usage.view(-1).index_add_(0, used.reshape(-1), torch.ones(used.numel(), dtype=torch.long, device=ids.device))
        error = sq_err.detach().mean(-1)  # (..., heads)
        self.recon_sum += error.sum()
        self.token_count += error.numel()
        self.last_input = x_n.detach().reshape(-1, self.heads, self.dim).transpose(0, 1)
        self.last_error = error.reshape(-1, self.heads).T

    @torch.no_grad()
    def revive_dead_codes(self, noise=0.01):
        """Restart the codes unused since the last revival at recent inputs drawn in proportion to their
        squared error (one its code fits already would leave a new code unused), plus noise relative to
        the inputs' spread (a code outside a head's ball of inputs is never chosen). Returns how many
        were revived, and resets the statistics."""
        dead = self.usage == 0
        pool = self.last_input if self.token_count else None  # no training forward since the last revival: no usage
        if pool is not None and dead.any():
            weights = self.last_error.float() + 1e-12  # all equal when every input is fitted exactly
            pick = torch.multinomial(weights, self.num_codes, replacement=True)
            fresh = pool.gather(1, pick[..., None].expand(-1, -1, self.dim))
            spread = pool.std(1, correction=min(1, pool.shape[1] - 1), keepdim=True)  # one input: 0, not NaN
            fresh = fresh + noise * spread * torch.randn_like(fresh)
            self.codes.copy_(torch.where(dead[..., None], fresh.to(self.codes.dtype), self.codes))
        for statistic in (self.usage, self.recon_sum, self.token_count):
            statistic.zero_()
        return int(dead.sum()) if pool is not None else 0


def is_mask(positions):
    """Whether forced positions are a (batch, seq) bool mask rather than a list of positions."""
    return torch.is_tensor(positions) and positions.dtype == torch.bool


def read_positions(positions):
    """force_codes' `positions` as None, a list of ints, or a bool mask (seq,) or (batch, seq). Any iterable
    is read once (a range, a set, an array); bools, also in a list or an array, are a mask, not the positions 0, 1;
    a list mixing bools and ints, or a dict, is neither."""
    if positions is None or is_mask(positions):
        mask = positions
    else:
        try:
            items = positions if hasattr(positions, "__array__") else list(positions)
            mixed = isinstance(items, list) and len({isinstance(v, bool) for v in items}) > 1
            values = None if mixed or isinstance(positions, dict) else torch.as_tensor(items)
        except (TypeError, ValueError, RuntimeError):  # not a sequence of numbers
            values = None
        if values is not None and values.dtype == torch.bool and values.numel():
            mask = values
        elif values is not None and values.dim() == 1 and not (values.is_floating_point() and values.numel()):
            return values.long().tolist()
        else:
            raise ValueError(f"positions must be None, a list of ints or a (batch, seq) bool mask, got {positions!r}")
    if mask is not None and mask.dim() > 2:
        raise ValueError(f"a mask of forced positions must be (batch, seq) or (seq,), got {tuple(mask.shape)}")
    return mask


def forced_positions(positions, seq, device):
    """Where codes are forced, as bool (batch | 1, seq, 1): positions None (all), a list (negatives count
    from the end) or a (batch, seq) bool mask."""
    if positions is None:
        return torch.ones(1, seq, 1, dtype=torch.bool, device=device)
    if is_mask(positions):
        if positions.shape[-1] != seq:
            raise ValueError(f"a mask of forced positions covers {positions.shape[-1]} positions, the input {seq}")
        return positions.to(device).view(-1, seq, 1)
    where = torch.zeros(1, seq, 1, dtype=torch.bool, device=device)
    where[0, [p % seq for p in map(int, positions) if -seq <= p < seq]] = True
    return where


class StraightThrough(torch.autograd.Function):
    """Value q; the gradient goes unchanged to q (so to the codes) and to x_n where `passed` (...,
    heads) allows: `q + x_n - x_n.detach()` as one function, one pass instead of three."""

    @staticmethod
    def forward(ctx, q, x_n, passed=None):
        ctx.save_for_backward(passed)
        return q.view_as(q)  # q itself, as a new tensor autograd can attach this function to

    @staticmethod
    def backward(ctx, grad):
        passed, = ctx.saved_tensors
        return grad, grad if passed is None else grad * passed[..., None], None


# ------------------------------------------------------------------------------------------------
# 3. The transformer. CodebookModel is what every function here needs of a model with codebooks; GPT,
# the compact model of the paper's experiments, and models.Transformer (pretrained families) provide it.

@dataclass
class CodebookSpec:
    """Where codebooks sit and how they search. layers=None means every layer."""
    layers: list | None = None
    num_codes: int | list = 1000  # or one count per layer of the model
    k: int = 1
    similarity: str = "cosine"
    loss: str = "aeloss"
    beta: float = 0.25

    def codes_in(self, layer):
        return self.num_codes if isinstance(self.num_codes, int) else self.num_codes[layer]


def codebook_specs(codebooks, n_layer):
    """{site: CodebookSpec} from {site: CodebookSpec or its dict}, every layer and count checked."""
    specs = {}
    for site, spec in codebooks.items():
        if site not in SITES:
            raise ValueError(f"codebook site {site!r} is not one of {SITES}")
        spec = spec if isinstance(spec, CodebookSpec) else CodebookSpec(**spec)
        if isinstance(spec.num_codes, list) and len(spec.num_codes) != n_layer:
            raise ValueError(f"{site} codebooks: {len(spec.num_codes)} code counts for n_layer={n_layer} layers")
        for layer in spec.layers if spec.layers is not None else range(n_layer):
            if not 0 <= layer < n_layer:
                raise ValueError(f"codebook layer {layer} at {site!r} does not exist: n_layer={n_layer}")
            try:
                check_codebook(spec.codes_in(layer), spec.k, spec.similarity, spec.loss)
            except ValueError as e:
                raise ValueError(f"{site} codebooks of layer {layer}: {e}") from None
        specs[site] = spec
    return specs


class CodebookBlock(nn.Module):
    """A transformer block's three codebook sites. A subclass passes each site's activations through
    site(), and calls init_sites() last in __init__ (its weights' random init must not depend on the codebooks)."""

    def init_sites(self, specs, layer, n_head, d_head, d_model):
        heads = {"attn": (n_head, d_head), "mlp": (1, d_model), "block": (1, d_model)}
        self.codebooks = nn.ModuleDict({
            site: CodebookLayer(*heads[site], spec.codes_in(layer), spec.k, spec.similarity, spec.loss, spec.beta)
            for site, spec in specs.items() if spec.layers is None or layer in spec.layers})
        self.captures = []  # a dict per capture_activations() block this forward is in
        self.replacements = {}  # site -> fn, set by replace_activations()

    def site(self, name, x):
        """Activations x (B, T, heads, dim) at site `name` ("attn": each head's output before W_O; "mlp":
        the MLP's output; "block": the block's output), captured, replaced, quantised as switched on."""
        for captured in self.captures:
            captured[name] = x.detach()
        if name in self.replacements:
            x = self.replacements[name](x)
        return self.codebooks[name](x) if name in self.codebooks else x


class CodebookModel(nn.Module):
    """The interface of a model with codebooks. A subclass provides
      config    to_dict() (plain data: type(model)(config.to_dict()) rebuilds the model),
                vocab_size, block_size, n_layer, n_head and codebooks ({site: CodebookSpec})
      blocks    an nn.ModuleList of CodebookBlock
      head      the output nn.Linear (model.head.weight.device is the model's device)
      forward(idx, cache=None) -> logits (batch, seq, vocab), checked by start_of(idx, cache)."""

    def start_of(self, idx, cache):
        """The position of idx's first token (after the cached ones); a ValueError for bad tokens."""
        if idx.dim() != 2 or idx.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            raise ValueError(f"tokens must be an integer tensor (batch, seq), got {idx.dtype} {tuple(idx.shape)}")
        start = cache.get("length", 0) if cache is not None else 0
        if not 1 <= start + idx.shape[1] <= self.config.block_size:
            raise ValueError(f"sequence length {start + idx.shape[1]} must be between 1 and block_size={self.config.block_size}")
        if start and idx.shape[1] != 1:
            raise ValueError("after the first call with a cache, pass one new token at a time")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, vocab_size={self.config.vocab_size})")
        return start

    def codebook_loss(self):
        """The sum of every codebook's auxiliary loss from the last forward."""
        losses = [cb.aux_loss for cb in self.codebook_layers().values() if cb.enabled]
        return sum(losses) if losses else torch.zeros((), device=self.head.weight.device)

    def codebook_layers(self):
        """{(layer, site): CodebookLayer} in model order."""
        return {(i, site): cb for i, b in enumerate(self.blocks) for site, cb in b.codebooks.items()}

    def codebook_heads(self):
        """(address string, CodebookLayer, head) for every codebook, heads of a layer separately."""
        return [(str(Address(i, site, h)), cb, h) for (i, site), cb in self.codebook_layers().items() for h in range(cb.heads)]

    def locate(self, address):
        """Address (or its text) -> (CodebookLayer, head index); clear errors for what is missing."""
        a = parse_address(address)
        if not 0 <= a.layer < len(self.blocks):
            raise ValueError(f"{a}: layer {a.layer} does not exist (n_layer={len(self.blocks)})")
        if a.site not in self.blocks[a.layer].codebooks:
            there = ", ".join(name for name, _, _ in self.codebook_heads()) or "none"
            raise ValueError(f"{a}: layer {a.layer} has no {a.site} codebook (codebooks: {there})")
        cb = self.blocks[a.layer].codebooks[a.site]
        if not 0 <= a.head < cb.heads:
            raise ValueError(f"{a}: head {a.head} does not exist (n_head={cb.heads})")
        if a.code is not None and not 0 <= a.code < cb.num_codes:
            raise ValueError(f"{a}: code {a.code} does not exist (num_codes={cb.num_codes})")
        return cb, a.head

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample continuations (temperature 0: greedy) under the forcing, disabling and replacing in
        effect. Keys and values are cached, unless codes are forced at chosen positions only or per
        position, or activations are replaced."""
        self.start_of(idx[:, -self.config.block_size:] if idx.dim() == 2 else idx, None)  # the first forward's tokens
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"temperature={temperature} must be at least 0 and top_k={top_k} at least 1 (or None)")
        forced = [(codes, positions) for cb in self.codebook_layers().values() if cb.enabled  # off: forces nothing
                  for _, codes, positions in cb.forced]
        if max_new_tokens > 1 and any(is_mask(positions) or codes.shape[1] > 1 for codes, positions in forced):
            raise ValueError("codes forced by a mask or per position fit one input, and the next one grows or slides: to "
                             "generate more than one token, force them at every position or at a list of positions")
        counted_from_start = [positions for _, positions in forced if positions is not None and (
            is_mask(positions) or any(int(p) >= 0 for p in positions))]  # these move when the window slides
        if counted_from_start and idx.shape[1] + max_new_tokens - 1 > self.config.block_size:  # the last input outgrows it
            raise ValueError(f"codes forced at chosen positions would move once the text outgrows block_size="
                             f"{self.config.block_size}: generate fewer tokens, or force at every position or from the end")
        whole_sequence = all(positions is None and codes.shape[1] == 1 for codes, positions in forced) \
            and not any(block.replacements for block in self.blocks)
        cache = {} if whole_sequence else None
        for _ in range(max_new_tokens):
            if cache is not None and idx.shape[1] <= self.config.block_size:
                logits = self(idx[:, cache.get("length", 0):], cache)[:, -1].float()
            else:  # the sequence outgrew the cache: rerun the last block_size tokens
                logits = self(idx[:, -self.config.block_size:])[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def causal_attention(q, k, v, window=0, scale=None):
    """Each query (B, H, T, dh) attends to the keys (B, H, T_past + T, dh) at or before its position,
    the last `window` of them when window > 0; scores times `scale` (None: 1/sqrt(dh))."""
    T, S = q.shape[2], k.shape[2]
    mask = None
    if window:  # key j is visible from query i when i - window < j <= i
        i, j = torch.arange(S - T, S, device=q.device)[:, None], torch.arange(S, device=q.device)
        mask = (j <= i) & (j > i - window)
    # without a window, one new query after cached positions sees all of them; more queries are causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


# GPT: pre-LayerNorm, learned positions, exact-GELU MLP, biases but in the untied output layer;
# attention causal over the whole prefix, or over a window of the last attn_window positions.

@dataclass
class GPTConfig:
    vocab_size: int = 11
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_mlp: int = 512
    attn_window: int | list = 0  # > 0: each position attends to itself and the attn_window - 1 before it; or one per layer
    codebooks: dict = field(default_factory=dict)  # site ('attn', 'mlp', 'block') -> CodebookSpec

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_mlp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        windows = self.attn_window if isinstance(self.attn_window, list) else [self.attn_window]
        if not all(isinstance(w, int) and w >= 0 for w in windows) or len(windows) not in (1, self.n_layer):
            raise ValueError(f"attn_window={self.attn_window!r} must be 0 (full causal attention), a positive integer "
                             f"or a list of n_layer={self.n_layer} of them")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        self.codebooks = codebook_specs(self.codebooks, self.n_layer)

    def to_dict(self):
        return asdict(self)  # plain Python types, safe for weights_only checkpoints


class Block(CodebookBlock):
    def __init__(self, cfg, layer):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_model // cfg.n_head
        self.window = cfg.attn_window[layer] if isinstance(cfg.attn_window, list) else cfg.attn_window
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model)  # W_O
        self.mlp_in, self.mlp_out = nn.Linear(cfg.d_model, cfg.d_mlp), nn.Linear(cfg.d_mlp, cfg.d_model)
        self.init_sites(cfg.codebooks, layer, cfg.n_head, self.d_head, cfg.d_model)

    def forward(self, x, cache=None):
        """x (B, T, D); cache: a dict holding the keys and values of earlier positions, or None."""
        B, T, D = x.shape  # batch, sequence length, d_model
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)  # (B, H, T, dh)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)  # (B, H, T_past + T, dh)
            cache["k"], cache["v"] = k, v
        heads = causal_attention(q, k, v, self.window)
        heads = self.site("attn", heads.transpose(1, 2))  # (B, T, H, dh): each head's output before W_O
        h = x + self.attn_out(heads.reshape(B, T, D))
        x = h + self.site("mlp", self.mlp_out(F.gelu(self.mlp_in(self.ln2(h))))[:, :, None])[:, :, 0]  # one "head" of D
        return self.site("block", x[:, :, None])[:, :, 0]


class GPT(CodebookModel):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config if isinstance(config, GPTConfig) else GPTConfig(**config)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2 and "codebooks" not in name:
                nn.init.normal_(p, std=0.02)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def forward(self, idx, cache=None):
        """idx (batch, seq) integer tokens -> logits (batch, seq, vocab). With a cache (a dict, empty
        at first; generate() uses it) idx continues the tokens of the earlier calls."""
        start = self.start_of(idx, cache)
        idx = idx.long()
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(start, start + idx.shape[1], device=idx.device))
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.setdefault(i, {}))
        if cache is not None:
            cache["length"] = start + idx.shape[1]
        return self.head(self.ln_f(x))


# ------------------------------------------------------------------------------------------------
# 4. Addresses. A codebook is "L<layer>.H<head>" (one attention head), "L<layer>.MLP" or
# "L<layer>.BLOCK"; a code appends its id: "L1.H2.517".

@dataclass(frozen=True)
class Address:
    layer: int
    site: str  # one of SITES
    head: int = 0  # attention head; 0 for the MLP and block codebooks
    code: int | None = None

    def __str__(self):
        place = f"H{self.head}" if self.site == "attn" else self.site.upper()
        return f"L{self.layer}.{place}" + ("" if self.code is None else f".{self.code}")

    @property
    def codebook(self):
        return Address(self.layer, self.site, self.head)  # the address without its code id


def parse_address(text):
    """'L1.H2' -> Address(1, 'attn', 2); 'L3.MLP.7' -> Address(3, 'mlp', 0, 7)."""
    if isinstance(text, Address):
        return text
    m = re.fullmatch(r"L(\d+)\.(?:H(\d+)|(MLP|BLOCK))(?:\.(\d+))?", str(text).strip())
    if m is None:
        raise ValueError(f"codebook address {text!r} is malformed: write L<layer>.H<head>, "
                         "L<layer>.MLP or L<layer>.BLOCK, with .<code> after it for one code")
    layer, head, site, code = m.groups()
    site = "attn" if site is None else site.lower()
    return Address(int(layer), site, int(head or 0), None if code is None else int(code))


def parse_code(text):
    """A code's address: 'L1.H2.517' -> Address(1, 'attn', 2, 517); a codebook's alone is refused."""
    a = parse_address(text)
    if a.code is None:
        raise ValueError(f"{a}: name a code, e.g. {a}.0")
    return a


# ------------------------------------------------------------------------------------------------
# 5. Interventions (section 3.3): read codes after a forward, force codes on, disable codes, and
# the tools around them. Every context manager undoes itself on exit, also after an exception.

def record_codes(model, scores=False):
    """After a forward: {address: ids (batch, seq, k)} of every codebook head (scores=True: their scores)."""
    return {address: (cb.last_scores if scores else cb.last_ids)[..., h, :]
            for address, cb, h in model.codebook_heads() if cb.last_ids is not None}


def _codes_by_codebook(model, codes):
    """{address: ids} or ["L1.H2.517", ...] -> {(CodebookLayer, head): LongTensor (B|1, T|1, m)}."""
    codes = [codes] if isinstance(codes, str) else codes
    if isinstance(codes, dict) and any(parse_address(a).code is not None for a in codes):
        raise ValueError(f"{list(codes)}: with ids given, name codebooks (e.g. L1.H2), not codes")
    if not isinstance(codes, dict):
        grouped = {}
        for a in map(parse_code, codes):
            grouped.setdefault(str(a.codebook), []).append(a.code)
        codes = grouped
    out = {}
    for address, ids in codes.items():
        cb, head = model.locate(address)
        if (cb, head) in out:
            raise ValueError(f"{address}: this codebook is named twice; give all its codes under one name")
        ids = torch.as_tensor(ids)
        if ids.dim() > 3 or (ids.numel() and (ids.is_floating_point() or ids.dtype == torch.bool)):
            raise ValueError(f"{address}: forced codes must be integer ids, a list or a (batch, m) or (batch, seq, m) "
                             f"tensor, got {ids.dtype} {tuple(ids.shape)}")
        ids = ids.long()
        check_ids(ids, cb.num_codes, f"{address}: forced code ids")
        out[(cb, head)] = ids.view(1, 1, -1) if ids.dim() <= 1 else (ids[:, None, :] if ids.dim() == 2 else ids)
    return out


@contextlib.contextmanager
def force_codes(model, codes, positions=None):
    """Force codes on: `codes` is {address: ids} (ids a list, or a (batch, m) / (batch, seq, m) tensor
    for per-example codes) or a list of code addresses. `positions`: None for every position, a list
    of positions (negative from the end; those outside the input are skipped, as text grows in
    generate), or a (batch, seq) bool mask."""
    positions = read_positions(positions)
    forced = {}
    for (cb, head), ids in _codes_by_codebook(model, codes).items():
        if ids.shape[-1] > cb.k:
            raise ValueError(f"{ids.shape[-1]} codes forced on one codebook, but it has only k={cb.k} slots")
        forced.setdefault(cb, list(cb.forced)).append((head, ids, positions))
    with _set_within(list(forced), "forced", list(forced.values())):
        yield model


@contextlib.contextmanager
def disable_codes(model, codes):
    """Disable codes (a list of code addresses): they score -inf, the next best takes their slot."""
    masks = {cb: cb.disabled for cb in model.codebook_layers().values()}
    for (cb, head), ids in _codes_by_codebook(model, codes).items():
        mask = masks[cb].clone() if masks[cb] is not None else torch.zeros(
            cb.heads, cb.num_codes, dtype=torch.bool, device=cb.codes.device)
        mask[head, ids.flatten()] = True
        if (~mask).sum(-1).min() < cb.k:
            raise ValueError(f"disabling leaves fewer than k={cb.k} codes in a codebook")
        masks[cb] = mask
    with _set_within(list(masks), "disabled", list(masks.values())):
        yield model


@contextlib.contextmanager
def codebooks_off(model):
    """Within the block, every codebook is off: the model is the plain transformer."""
    layers = list(model.codebook_layers().values())
    with _set_within(layers, "enabled", [False] * len(layers)):
        yield model


@contextlib.contextmanager
def capture_activations(model):
    """Yield {layer: {site: activations (B, T, heads, dim)}}, filled by the forwards inside."""
    acts = {i: {} for i in range(len(model.blocks))}
    with _set_within(model.blocks, "captures", [block.captures + [acts[i]] for i, block in enumerate(model.blocks)]):
        yield acts


@contextlib.contextmanager
def replace_activations(model, replacements):
    """Within the block, {(layer, site): fn} replaces the activations x (B, T, heads, dim) at that
    site by fn(x), before its codebook if any: splicing a reconstruction in, or patching."""
    for key in replacements:
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] in range(len(model.blocks)) and key[1] in SITES):
            raise ValueError(f"cannot replace activations at {key!r}: name them (layer, site), layers 0 .. "
                             f"{len(model.blocks) - 1}, sites {SITES}")
    within = [dict(block.replacements) for block in model.blocks]  # nested blocks add to the outer ones
    for (layer, site), fn in replacements.items():
        within[layer][site] = fn
    with _set_within(model.blocks, "replacements", within):
        yield model


@contextlib.contextmanager
def _set_within(objects, name, values):
    """Set attribute `name` of each object to its value within the block, and back after it."""
    before = [getattr(o, name) for o in objects]
    for o, v in zip(objects, values):
        setattr(o, name, v)
    try:
        yield
    finally:
        for o, v in zip(objects, before):
            setattr(o, name, v)


# ------------------------------------------------------------------------------------------------
# 6. Finetuning with codebooks (section 3.2): train (or load) a model, add codebooks, initialise
# each by k-means on the activations it will quantise, finetune the whole model.

def with_codebooks(model, codebooks):
    """The same model (GPT or models.Transformer) with codebooks added ({site: CodebookSpec or its dict})."""
    if model.codebook_layers():
        raise ValueError("the model has codebooks already: give with_codebooks the model without them")
    new = type(model)(model.config.to_dict() | {"codebooks": codebooks})
    new.to(model.head.weight.device, model.head.weight.dtype).train(model.training)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".codebooks." in name for name in missing)
    return new


@torch.no_grad()
def init_codebooks_kmeans(model, tokens, iters=10):
    """Initialise every codebook from the activations it sees on `tokens` with codebooks off."""
    with codebooks_off(model), capture_activations(model) as acts:
        model(tokens)
    for (layer, site), cb in model.codebook_layers().items():
        kmeans_init(cb, acts[layer][site], iters)


@torch.no_grad()
def kmeans_init(cb, x, iters=10):
    """Set the LayerNorm affine to the typical scale and offset of the activations x (..., heads,
    dim), so the output starts at the scale the next layer was trained on; then k-means (Lloyd)
    the codes on the normalised x, all heads at once; a cluster that empties keeps its centre. (The
    paper does not say how the LayerNorm starts: this choice is the project's.)"""
    if x.shape[-2:] != (cb.heads, cb.dim) or not x.numel():
        raise ValueError(f"k-means needs activations (..., heads={cb.heads}, dim={cb.dim}), got {tuple(x.shape)}")
    per_token = x.reshape(-1, cb.heads, cb.dim).float()
    cb.ln_weight.copy_(per_token.std(-1, unbiased=False).mean(0)[:, None].expand_as(cb.ln_weight))
    cb.ln_bias.copy_(per_token.mean(-1).mean(0)[:, None].expand_as(cb.ln_bias))
    data = cb.normalize(x).reshape(-1, cb.heads, cb.dim).transpose(0, 1).float()
    H, N, C = cb.heads, data.shape[1], cb.num_codes
    centres = data.gather(1, torch.randint(N, (H, C, 1), device=data.device).expand(-1, -1, cb.dim))
    centres = centres + 0.01 * torch.randn_like(centres)  # distinct even when N < C
    offsets = torch.arange(H, device=data.device)[:, None] * C
    for _ in range(iters):
        _, ids = topk_codes(data, centres, 1, cb.similarity)
        flat = (ids[..., 0] + offsets).reshape(-1)
        sums = torch.zeros(H * C, cb.dim, device=data.device).index_add_(0, flat, data.reshape(-1, cb.dim))
        counts = torch.bincount(flat, minlength=H * C).float()[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres.reshape(H * C, -1)).view(H, C, -1)
    cb.codes.copy_(centres)


# ------------------------------------------------------------------------------------------------
# 7. Finding codes that mean something (section 4).

@torch.no_grad()
def record_dataset(model, tokens, batch_size=64):
    """tokens (n, seq) through the model: ({address: ids (n, seq, k)}, {address: scores}) on the CPU."""
    ids, scores = {}, {}
    for start in range(0, tokens.shape[0], batch_size):
        model(tokens[start:start + batch_size].to(model.head.weight.device))
        for store, values in ((ids, record_codes(model)), (scores, record_codes(model, scores=True))):
            for address, v in values.items():
                store.setdefault(address, []).append(v.cpu())
    return ({a: torch.cat(v) for a, v in ids.items()}, {a: torch.cat(v) for a, v in scores.items()})


def count_codes(ids, num_codes):
    """How often each code fires over recorded ids (..., k)."""
    check_ids(ids, num_codes)
    return torch.bincount(ids.reshape(-1), minlength=num_codes)


def dead_share(counts):
    """The share of codes that never fired, from counts (..., codes) such as count_codes': (...)."""
    return (counts == 0).float().mean(-1)


def f1_score(precision, recall):
    """2 P R / (P + R), elementwise (0 where both are 0): how well a code matches a feature."""
    return 2 * precision * recall / (precision + recall).clamp_min(1e-9)


def code_precision_recall(ids, masks, num_codes):
    """(precision, recall) of every code, each (S, num_codes), against S boolean masks (S, ...) over the
    positions of ids (..., k) at once, or (num_codes,) against one mask (...): with hits = mask positions
    where the code fires, precision = hits / positions where it fires, recall = hits / mask positions."""
    single = masks.shape == ids.shape[:-1]
    if not single and masks.shape[1:] != ids.shape[:-1]:
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not cover the ids' positions {tuple(ids.shape[:-1])}")
    check_ids(ids, num_codes)
    masks = masks[None] if single else masks
    # a code fires once per position: one in an earlier slot too (forced twice) goes to a spare bin past the codes
    repeated = (ids[..., :, None] == ids[..., None, :]).triu(1).any(-2)
    ids, bins = ids.masked_fill(repeated, num_codes), num_codes + 1
    which, *where = masks.nonzero(as_tuple=True)  # every (mask, position) pair that is set
    hits_idx = which[:, None] * bins + ids[tuple(where)]
    hits = torch.bincount(hits_idx.reshape(-1), minlength=masks.shape[0] * bins).view(-1, bins)[:, :num_codes].float()
    fires = count_codes(ids, bins)[:num_codes].float()
    precision = hits / fires.clamp_min(1)
    recall = hits / masks.flatten(1).sum(-1, keepdim=True).clamp_min(1)
    return (precision[0], recall[0]) if single else (precision, recall)


def top_contexts(ids, scores, code, n=5):
    """The n positions (row, pos, score) where `code` fires most strongly, from record_dataset's ids and
    scores (rows, seq, k)."""
    if ids.dim() != 3 or scores.shape != ids.shape:
        raise ValueError(f"ids and scores must both be (rows, seq, k), got {tuple(ids.shape)} and {tuple(scores.shape)}")
    fires = ids == code
    strength = torch.where(fires, scores, torch.full_like(scores, -math.inf)).amax(-1).flatten()
    where = fires.any(-1).flatten().nonzero()[:, 0]
    top = where[strength[where].argsort(descending=True, stable=True)[:max(n, 0)]]
    return [(int(i) // ids.shape[1], int(i) % ids.shape[1], float(strength[i])) for i in top]
