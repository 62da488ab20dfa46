"""
Codebook Features: transformers whose hidden states pass through vector-quantisation bottlenecks.

Paper: Tamkin, Taufeeque, Goodman, "Codebook Features: Sparse and Discrete Interpretability for
Neural Networks", arXiv 2310.17230 (ICML 2024); section numbers below refer to it. What codes are
compared with (neurons, activation addition, sparse autoencoders): baselines.py and sae.py.

A codebook replaces an activation x by the mean of the k codes most similar to LayerNorm(x), so
every hidden state it sits on becomes a handful of discrete, readable and writable ids.

This file, in the paper's order:
  1. code search      the k best codes of every query (section 3.1, steps 2-3)
  2. codebook layer   LayerNorm, search, mean of k codes, straight-through, codebook loss;
                      usage statistics and dead-code revival
  3. transformer      what a model with codebooks provides (CodebookModel); a compact GPT with
                      codebooks at attention heads / MLP / block outputs
  4. addresses        "L1.H2", "L3.MLP", "L0.BLOCK", "L1.H2.517": one parser, one formatter
  5. interventions    record, force and disable codes; capture and replace activations (section 3.3)
  6. finetuning       a trained model plus codebooks, k-means initialised (section 3.2)
  7. finding codes    precision / recall of codes against a mask, top contexts (section 4)
  8. checkpoints      plain dicts, atomic writes, weights_only loads
  9. training loop    AdamW, schedule, revival, DDP, checkpoints as it goes, exact resume
"""
import contextlib
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import runs

SITES = ("attn", "mlp", "block")  # where a codebook can sit in a transformer block
SIMILARITIES = ("cosine", "euclidean")
LOSSES = ("aeloss", "none", "commitment")
SCORE_MATRIX_BYTES = 256 * 2**20  # a larger score matrix is searched in tiles, never materialised

# ------------------------------------------------------------------------------------------------
# 1. Code search: for queries x (heads, tokens, d) and codebooks (heads, codes, d), the k best
# codes of every query row, best first. Cosine ranking scores x . c / |c| (section 3.1: the
# query's own norm does not change its ranking); euclidean scores -|x - c|. The torch versions
# here and the fused C++/CUDA one in csrc/ return the same ids (exact ties aside) and scores.

def _scores(x, codes, similarity):
    """The (heads, tokens, codes) score matrix, the quantity the top-k ranks. A NaN score (from a
    NaN or inf input) counts as -inf, never chosen before a real score; csrc/ does the same."""
    if similarity == "cosine":
        s = x @ (codes / codes.norm(dim=-1, keepdim=True).clamp_min(1e-12)).transpose(1, 2)
    else:
        sq_dist = (x * x).sum(-1, keepdim=True) - 2 * x @ codes.transpose(1, 2) + (codes * codes).sum(-1)[:, None, :]
        s = -sq_dist.clamp_min(0).sqrt()
    return s.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def search_reference(x, codebook, k, similarity="cosine", disabled=None):
    """Materialise every score, then top-k: O(tokens x codes) memory. Written to be read."""
    scores = _scores(x, codebook, similarity)
    if disabled is not None:
        scores = scores.masked_fill(disabled[:, None, :], -math.inf)
    return scores.topk(k, dim=-1)


def search_chunked(x, codebook, k, similarity="cosine", disabled=None, tile=4096):
    """Tile over the codes keeping a running top-k: O(tokens x (k + tile)) memory."""
    H, N, _ = x.shape
    best_scores = x.new_full((H, N, k), -math.inf)
    best_ids = torch.zeros(H, N, k, dtype=torch.long, device=x.device)
    for start in range(0, codebook.shape[1], tile):
        s = _scores(x, codebook[:, start:start + tile], similarity)
        if disabled is not None:
            s = s.masked_fill(disabled[:, None, start:start + tile], -math.inf)
        tile_ids = torch.arange(start, start + s.shape[-1], device=x.device).expand(H, N, -1)
        best_scores, pick = torch.cat([best_scores, s], -1).topk(k, dim=-1)
        best_ids = torch.cat([best_ids, tile_ids], -1).gather(-1, pick)
    return best_scores, best_ids


def load_extension():
    """The fused search of csrc/ (csrc/loader.py: built on first use; CODEBOOK_EXT=0 / 1)."""
    from csrc.loader import load_extension
    return load_extension()


def topk_codes(x, codebook, k, similarity="cosine", disabled=None, impl="auto"):
    """(scores, ids), each (heads, tokens, k), slot 0 the most similar code. No gradient: training
    differentiates through the gathered codes only (section 3.1), never through the scores."""
    H, C, d = codebook.shape
    if x.dim() != 3 or x.shape[0] != H or x.shape[2] != d:
        raise ValueError(f"search queries must have shape (heads={H}, tokens, d={d}), got {tuple(x.shape)}")
    check_codebook(C, k, similarity)
    if impl not in ("auto", "reference", "chunked", "ext"):
        raise ValueError(f"impl={impl!r} is not one of 'auto', 'reference', 'chunked', 'ext'")
    with torch.no_grad():
        x, codebook = x.float(), codebook.float()
        ext = load_extension() if impl in ("auto", "ext") and disabled is None else None
        if impl == "ext" and ext is None:
            raise ValueError("impl='ext' needs the csrc extension (CODEBOOK_EXT not 0, a build that works) "
                             "and no disabled codes; use impl='auto'")
        if impl == "auto":
            fits = H * x.shape[1] * C * 4 <= SCORE_MATRIX_BYTES
            impl = "ext" if ext is not None and ext.supports(x, k) else "reference" if fits else "chunked"
        if impl == "reference":
            return search_reference(x, codebook, k, similarity, disabled)
        if impl == "chunked":
            return search_chunked(x, codebook, k, similarity, disabled)
        return ext.topk_codes(x, codebook, k, similarity)


# ------------------------------------------------------------------------------------------------
# 2. The codebook layer (section 3.1). One layer holds `heads` independent codebooks (the
# per-head attention codebooks of one layer, or a single MLP / block codebook), stored as one
# parameter (heads, codes, d) and searched in one call.

class CodebookLayer(nn.Module):
    def __init__(self, heads, dim, num_codes, k=1, similarity="cosine", loss="aeloss", beta=0.25):
        super().__init__()
        check_codebook(num_codes, k, similarity, loss)
        self.heads, self.num_codes, self.dim, self.k = heads, num_codes, dim, k
        self.similarity, self.loss_kind, self.beta = similarity, loss, beta
        self.ln_weight = nn.Parameter(torch.ones(heads, dim))  # one LayerNorm per codebook
        self.ln_bias = nn.Parameter(torch.zeros(heads, dim))
        self.codes = nn.Parameter(torch.randn(heads, num_codes, dim))  # N(0,1): norm ~ sqrt(d), as LN output
        # training statistics since the last revival, per token; summed over DDP ranks by train()
        self.register_buffer("usage", torch.zeros(heads, num_codes, dtype=torch.long), persistent=False)
        self.register_buffer("recon_sum", torch.zeros(()), persistent=False)
        self.register_buffer("token_count", torch.zeros((), dtype=torch.long), persistent=False)
        self.enabled = True
        self.forced = []  # (head, codes (B|1, T|1, m), positions) set by force_codes()
        self.disabled = None  # (heads, codes) bool, set by disable_codes()
        self.last_ids = self.last_scores = self.last_input = self.last_error = None
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        """x (..., heads, dim) -> the same shape, each head's vector replaced by the mean of its
        k codes: the paper's steps 1-5 (section 3.1)."""
        if x.shape[-2:] != (self.heads, self.dim):
            raise ValueError(f"codebook input must end in (heads={self.heads}, dim={self.dim}), got {tuple(x.shape)}")
        if not self.enabled:
            return x
        x_n = self.normalize(x)                                       # 1. LayerNorm
        scores, searched = self.search(x_n)                           # 2-3. score every code, keep the k best
        ids = self.apply_forcing(searched)                            # interventions (section 3.3)
        chosen = (ids == searched).all(-1) if self.forced else None   # heads whose codes were not forced
        self.last_ids, self.last_scores = ids, scores
        q = self.mean_of_codes(ids)                                   # 4. the mean of the k codes replaces x
        sq_err = (q - x_n.detach()).pow(2)
        self.aux_loss = self.codebook_loss(sq_err, q, x_n, chosen)    # 5. the codebook's own loss
        if self.training:
            self.count_usage(ids, chosen, sq_err, x_n)
        return StraightThrough.apply(q, x_n, chosen)                  # 5. gradient straight through to x

    def normalize(self, x):
        return torch.addcmul(self.ln_bias, F.layer_norm(x, (self.dim,)), self.ln_weight)

    def search(self, x_n):
        """(scores, ids), each (..., heads, k): every head's k best codes, all heads in one call."""
        per_head = x_n.reshape(-1, self.heads, self.dim).transpose(0, 1)  # (heads, tokens, dim)
        scores, ids = topk_codes(per_head, self.codes, self.k, self.similarity, self.disabled)
        return [t.transpose(0, 1).reshape(*x_n.shape[:-1], self.k) for t in (scores, ids)]

    def mean_of_codes(self, ids):
        """codes[h][ids[..., h, :]].mean(-2) for every head h, as one embedding_bag over all heads'
        codes: it never materialises the (..., heads, k, dim) gathered codes, forward or backward."""
        bags = self._rows(ids).reshape(-1, self.k)
        return F.embedding_bag(bags, self.codes.reshape(-1, self.dim), mode="mean").view(*ids.shape[:-1], self.dim)

    def _rows(self, ids):
        """Code ids (..., heads, k) as rows of codes.reshape(-1, dim): head h's codes start at h * num_codes."""
        return ids + torch.arange(self.heads, device=ids.device)[:, None] * self.num_codes

    def apply_forcing(self, ids):
        """Overwrite id slots with forced codes, filling from the least similar slot (section 3.3)."""
        for head, codes, positions in self.forced:
            m = codes.shape[-1]
            slots = ids[..., head, self.k - m:]
            mask = _position_mask(positions, ids.shape[:-2], ids.device)
            ids = ids.clone()
            ids[..., head, self.k - m:] = torch.where(mask[..., None], codes.to(ids.device).expand_as(slots), slots)
        return ids

    def codebook_loss(self, sq_err, q, x_n, chosen=None):
        """sq_err = (q - sg(x_n))^2 summed over dimensions, averaged over tokens, summed over heads
        ("aeloss"); `chosen` (..., heads) leaves out forced codes, not chosen for their input."""
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

    def dead_fraction(self):
        """Per head, the share of codes not used since the last revival."""
        return (self.usage == 0).float().mean(-1)

    @torch.no_grad()
    def revive_dead_codes(self, noise=0.01):
        """Restart the codes unused since the last revival at recent inputs, drawn in proportion to
        their squared error (an input its code fits already would leave a new code unused), plus
        noise relative to the inputs' spread (a code outside a head's small ball of inputs is never
        chosen). Returns how many were revived, and resets the statistics."""
        dead = self.usage == 0
        pool = self.last_input
        if pool is not None and dead.any():
            weights = self.last_error.float() + 1e-12  # all equal when every input is fitted exactly
            pick = torch.multinomial(weights, self.num_codes, replacement=True)
            fresh = pool.gather(1, pick[..., None].expand(-1, -1, self.dim))
            fresh = fresh + noise * pool.std(1, keepdim=True) * torch.randn_like(fresh)
            self.codes.copy_(torch.where(dead[..., None], fresh.to(self.codes.dtype), self.codes))
        for statistic in (self.usage, self.recon_sum, self.token_count):
            statistic.zero_()
        return int(dead.sum()) if pool is not None else 0


class StraightThrough(torch.autograd.Function):
    """Value q; the output's gradient goes unchanged to q (so to the codes) and to the input x_n,
    where `passed` (..., heads) allows. What `q + x_n - x_n.detach()` computes, as one function
    because that expression costs two passes over the activations forward and one backward."""

    @staticmethod
    def forward(ctx, q, x_n, passed=None):
        ctx.save_for_backward(passed)
        return q.view_as(q)  # q itself, as a new tensor autograd can attach this function to

    @staticmethod
    def backward(ctx, grad):
        passed, = ctx.saved_tensors
        return grad, grad if passed is None else grad * passed[..., None], None


def check_codebook(num_codes, k, similarity="cosine", loss="aeloss"):
    if not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes={num_codes} must be at least 1")
    if not isinstance(k, int) or not 1 <= k <= num_codes:
        raise ValueError(f"k={k} must be between 1 and num_codes={num_codes}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity={similarity!r} is not one of {SIMILARITIES}")
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {LOSSES}")


def _position_mask(positions, shape, device):
    """positions: None (all), a list of ints (negatives count from the end) or a bool tensor."""
    seq = shape[-1]
    if positions is None:
        return torch.ones(1, 1, dtype=torch.bool, device=device)
    if torch.is_tensor(positions) and positions.dtype == torch.bool:
        return positions.to(device).view(-1 if positions.dim() == 2 else 1, seq)
    mask = torch.zeros(1, seq, dtype=torch.bool, device=device)
    idx = [p % seq for p in positions if -seq <= p < seq]
    mask[0, idx] = True
    return mask


# ------------------------------------------------------------------------------------------------
# 3. The transformer. CodebookModel is what every function of this file (and of report.py,
# sae.py, steer.py, ...) needs of a model with codebooks; GPT below, the compact model of the
# paper's experiments, and models.Transformer, the pretrained families, both provide it.

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
    """A transformer block's three codebook sites. A subclass computes the block and passes each
    site's activations through site(); init_sites() comes last in its __init__ (after its weights,
    so that their random initialisation does not depend on the codebooks)."""

    def init_sites(self, specs, layer, n_head, d_head, d_model):
        heads = {"attn": (n_head, d_head), "mlp": (1, d_model), "block": (1, d_model)}
        self.codebooks = nn.ModuleDict({
            site: CodebookLayer(*heads[site], spec.codes_in(layer), spec.k, spec.similarity, spec.loss, spec.beta)
            for site, spec in specs.items() if spec.layers is None or layer in spec.layers})
        self.captures = None  # a dict while capture_activations() is on
        self.replacements = {}  # site -> fn, set by replace_activations()

    def site(self, name, x):
        """Activations x (B, T, heads, dim) at site `name`: captured, replaced, quantised, as switched on.
        "attn": each head's output before W_O; "mlp": the MLP's output; "block": the block's output."""
        if self.captures is not None:
            self.captures[name] = x.detach()
        if name in self.replacements:
            x = self.replacements[name](x)
        return self.codebooks[name](x) if name in self.codebooks else x


class CodebookModel(nn.Module):
    """The interface of a model with codebooks. A subclass provides
      config    to_dict() (plain data that rebuilds the model: type(model)(config.to_dict())),
                vocab_size, block_size, n_layer, n_head and codebooks ({site: CodebookSpec})
      blocks    an nn.ModuleList of CodebookBlock
      head      the output nn.Linear (model.head.weight.device is the model's device)
      forward(idx, cache=None) -> logits (batch, seq, vocab), checked by start_of(idx, cache);
    it gets here what interventions, search, training and reports use of it."""

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
        """Sample continuations (temperature 0: greedy) under the forcing and disabling in effect.
        Keys and values are cached, unless a code is forced at chosen positions only."""
        whole_sequence = all(positions is None and codes.shape[1] == 1
                             for cb in self.codebook_layers().values() for _, codes, positions in cb.forced)
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


# GPT: pre-LayerNorm, learned positions, exact-GELU MLP, biases everywhere, untied output layer;
# attention causal over the whole prefix, or over a window of the last attn_window positions.

# What GPTConfig held while it also described pretrained families (now models.py): a config that
# holds them at these values is a compact model, saved before, and loads.
FORMER_FIELDS = dict(attn_scale=None, qkv_bias=True, learned_positions=True, rotary_dims=0, rotary_base=10000.0,
                     parallel_residual=False, gelu="none", ln_eps=1e-5, tied_head=False)


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

    @classmethod
    def from_dict(cls, d):
        """The config of to_dict()'s plain data (or of an earlier version's, FORMER_FIELDS)."""
        if "family" in d:
            raise ValueError(f"this config is a pretrained {d['family']} model's: models.model_from_config builds it")
        former = {name: d[name] for name in FORMER_FIELDS if name in d}
        if any(value != FORMER_FIELDS[name] for name, value in former.items()):
            raise ValueError(f"this config ({former}) is a pretrained model saved by an earlier version: "
                             "load the model from its folder or GGUF file again (models.load_pretrained)")
        return cls(**{name: value for name, value in d.items() if name not in former})

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


def causal_attention(q, k, v, window=0, scale=None):
    """Each query (B, H, T, dh) attends to the keys (B, H, T_past + T, dh) at or before its position,
    the last `window` of them when window > 0; scores times `scale` (None: 1/sqrt(dh))."""
    T, S = q.shape[2], k.shape[2]
    if window:  # key j is visible from query i when i - window < j <= i
        i = torch.arange(S - T, S, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)
        mask = (j <= i) & (j > i - window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    # one new query after cached positions may see all of them; otherwise causal
    return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class GPT(CodebookModel):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config if isinstance(config, GPTConfig) else GPTConfig.from_dict(config)
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
        """idx (batch, seq) integer tokens -> logits (batch, seq, vocab). With a cache (a dict,
        empty at first; generate() uses it) idx continues the tokens of the earlier calls."""
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

_ADDRESS = re.compile(r"^L(\d+)\.(?:H(\d+)|(MLP)|(BLOCK))(?:\.(\d+))?$")


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
        """The address without its code id."""
        return Address(self.layer, self.site, self.head)


def parse_address(text):
    """'L1.H2' -> Address(1, 'attn', 2); 'L3.MLP.7' -> Address(3, 'mlp', 0, 7)."""
    if isinstance(text, Address):
        return text
    m = _ADDRESS.match(str(text).strip())
    if m is None:
        raise ValueError(f"codebook address {text!r} is malformed: write L<layer>.H<head>, "
                         "L<layer>.MLP or L<layer>.BLOCK, with .<code> after it for one code")
    layer, head, mlp, block, code = m.groups()
    site = "attn" if head is not None else ("mlp" if mlp else "block")
    return Address(int(layer), site, int(head or 0), None if code is None else int(code))


# ------------------------------------------------------------------------------------------------
# 5. Interventions (section 3.3): read codes after a forward, force codes on, disable codes, and
# the tools around them. Every context manager undoes itself on exit, also after an exception.

def record_codes(model, scores=False):
    """After a forward: {address: ids (batch, seq, k)} of every codebook head (scores=True: their scores)."""
    return {address: (cb.last_scores if scores else cb.last_ids)[..., h, :]
            for address, cb, h in model.codebook_heads() if cb.last_ids is not None}


def _codes_by_codebook(model, codes):
    """{address: ids} or ["L1.H2.517", ...] -> {(CodebookLayer, head): LongTensor (B|1, T|1, m)}."""
    if not isinstance(codes, dict):
        grouped = {}
        for text in codes:
            a = parse_address(text)
            if a.code is None:
                raise ValueError(f"{a}: name a code, e.g. {a}.0")
            grouped.setdefault(str(a.codebook), []).append(a.code)
        codes = grouped
    out = {}
    for address, ids in codes.items():
        cb, head = model.locate(address)
        ids = torch.as_tensor(ids, dtype=torch.long)
        ids = ids.view(1, 1, -1) if ids.dim() <= 1 else (ids[:, None, :] if ids.dim() == 2 else ids)
        if ids.numel() and (ids.min() < 0 or ids.max() >= cb.num_codes):
            raise ValueError(f"{address}: forced code ids must be in [0, num_codes={cb.num_codes})")
        out[(cb, head)] = ids
    return out


@contextlib.contextmanager
def force_codes(model, codes, positions=None):
    """Force codes on: `codes` is {address: ids} (ids a list, or a (batch, m) / (batch, seq, m)
    tensor for per-example codes) or a list of code addresses. `positions`: None for every
    position, a list of positions (negative from the end), or a (batch, seq) bool mask."""
    plan = _codes_by_codebook(model, codes)
    for (cb, head), ids in plan.items():
        if ids.shape[-1] > cb.k:
            raise ValueError(f"{ids.shape[-1]} codes forced on one codebook, but it has only k={cb.k} slots")
    for (cb, head), ids in plan.items():
        cb.forced.append((head, ids, positions))
    try:
        yield model
    finally:
        for (cb, head), ids in plan.items():
            cb.forced = [f for f in cb.forced if f[1] is not ids]


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
    """Yield {layer: {site: activations (B, T, heads, dim)}} filled by the forwards inside:
    attention heads before W_O, MLP output, block output. What the neuron baseline reads."""
    acts = {i: {} for i in range(len(model.blocks))}
    with _set_within(model.blocks, "captures", list(acts.values())):
        yield acts


@contextlib.contextmanager
def replace_activations(model, replacements):
    """Within the block, {(layer, site): fn} replaces the activations x (B, T, heads, dim) at that
    site by fn(x), before its codebook if any: splicing a reconstruction in, or patching."""
    for layer, site in replacements:
        if not 0 <= layer < len(model.blocks) or site not in SITES:
            raise ValueError(f"cannot replace activations at ({layer}, {site!r}): layers are 0 .. "
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
    """The same model (a CodebookModel: GPT or models.Transformer) with codebooks added ({site:
    CodebookSpec or its dict}), for finetuning."""
    new = type(model)(model.config.to_dict() | {"codebooks": codebooks}).to(model.head.weight.device)
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
    the codes on the normalised x, all heads at once; a cluster that empties keeps its centre."""
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
    return torch.bincount(ids.reshape(-1), minlength=num_codes)


def code_precision_recall(ids, masks, num_codes):
    """Each code's precision and recall against boolean masks over positions: ids (..., k) recorded
    codes, masks (S, ...) S target sets at once or (...) one. With hits = mask positions where the
    code fires, precision = hits / positions where it fires, recall = hits / mask positions.
    Returns (precision, recall), each (S, num_codes), or (num_codes,) for one mask."""
    single = masks.dim() == ids.dim() - 1
    masks = masks[None] if single else masks
    which, *where = masks.nonzero(as_tuple=True)  # every (mask, position) pair that is set
    hits_idx = which[:, None] * num_codes + ids[tuple(where)]
    hits = torch.bincount(hits_idx.reshape(-1), minlength=masks.shape[0] * num_codes).view(-1, num_codes).float()
    fires = count_codes(ids, num_codes).float()
    precision = hits / fires.clamp_min(1)
    recall = hits / masks.flatten(1).sum(-1, keepdim=True).clamp_min(1)
    return (precision[0], recall[0]) if single else (precision, recall)


def top_contexts(ids, scores, code, n=5):
    """The n positions (row, pos, score) where `code` fires most strongly."""
    fires = ids == code
    strength = torch.where(fires, scores, torch.full_like(scores, -math.inf)).amax(-1).flatten()
    top = strength.topk(min(n, int(fires.any(-1).sum())))
    return [(int(i) // ids.shape[1], int(i) % ids.shape[1], float(s)) for s, i in zip(top.values, top.indices)]


# ------------------------------------------------------------------------------------------------
# 8. Checkpoints: plain dicts that torch.load(weights_only=True) reads; written atomically.

FORMAT = "codebook-features/1"


def save_checkpoint(path, model, optimizer=None, step=0, **extra):
    state = {"format": FORMAT, "config": model.config.to_dict(), "model": model.state_dict(),
             "step": step, "optimizer": optimizer.state_dict() if optimizer else None, **extra}
    runs.write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is truncated, corrupt or not a torch file "
                         f"({type(e).__name__}); re-create it") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a {FORMAT} checkpoint (written by another program?)")
    return state


def load_model(path, device="cpu"):
    """Rebuild a model from a checkpoint, in eval mode."""
    state = load_checkpoint(path, map_location=device)
    model = GPT(state["config"]).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


# ------------------------------------------------------------------------------------------------
# 9. The training loop every script uses.

def distributed(backend="gloo"):
    """(rank, world_size); starts the process group with `backend` when launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def make_optimizer(model, lr, weight_decay=0.1, codebook_lr=None, betas=(0.9, 0.95)):
    """AdamW; weight decay on matrices only, never on codebooks, LayerNorms or biases."""
    groups = {"decay": [], "no_decay": [], "codebook": []}
    for name, p in model.named_parameters():
        matrix = p.dim() >= 2 and name != "pos_emb.weight"
        groups["codebook" if ".codebooks." in name else "decay" if matrix else "no_decay"].append(p)
    return torch.optim.AdamW([
        {"params": groups["decay"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["no_decay"], "weight_decay": 0.0, "lr": lr},
        {"params": groups["codebook"], "weight_decay": 0.0, "lr": codebook_lr or lr},
    ], lr=lr, betas=betas)


def lr_factor(step, steps, warmup, cosine):
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # decays to a tenth


def _sum_across_ranks(tensors):
    if dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


def _stats_buffers(codebooks):
    return [t for cb in codebooks for t in (cb.usage, cb.recon_sum, cb.token_count)]


def train(model, get_batch, steps, lr=1e-3, *, device="cpu", weight_decay=0.1, codebook_lr=None,
          warmup=0, cosine=False, grad_clip=1.0, grad_accum=1, revive_every=0, eval_fn=None,
          eval_every=0, ckpt_path=None, ckpt_every=100, ckpt_seconds=120, settings=None, log_every=10,
          desc="train", autocast=None, ckpt_extra=None):
    """Train `model` for `steps` optimiser steps; return it unwrapped, on `device`, in eval mode,
    with `model.history` ([{"step", "loss", "dead", "mse"}] every log_every steps).

    get_batch(i, rank, world_size) -> (inputs, targets) of micro-batch i, a function of its
    arguments alone (so a resumed run draws the same data; each torchrun rank its own shard),
    optionally plus (codes, positions) to train with those codes forced (interchange training).
    eval_fn(model, step) -> dict, printed by rank 0.

    With ckpt_path a checkpoint is written every ckpt_every steps or ckpt_seconds, at the end, and
    at SIGINT / SIGTERM (then runs.Interrupted is raised). One already there is resumed exactly
    (weights, optimiser, RNG states, code statistics), or returned when finished; one made with
    another config, loop arguments or `settings` (plain data describing the batches) is refused.
    ckpt_extra: plain data every checkpoint also holds (train_lm.py: the tokenizer)."""
    from tqdm import tqdm
    rank, world = distributed("nccl" if device.startswith("cuda") else "gloo")
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    model = model.to(device)
    optimizer = make_optimizer(model, lr, weight_decay, codebook_lr)
    codebooks = list(model.codebook_layers().values())
    run = {"config": model.config.to_dict(), "settings": settings or {},
           "loop": dict(steps=steps, lr=lr, weight_decay=weight_decay, codebook_lr=codebook_lr, warmup=warmup,
                        cosine=cosine, grad_clip=grad_clip, grad_accum=grad_accum, revive_every=revive_every)}
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resume loads the scheduled ones
    step, history = 0, []
    if ckpt_path and os.path.exists(ckpt_path):
        state = load_checkpoint(ckpt_path, map_location=device)
        step, history = runs.resume(ckpt_path, state, run, model, optimizer, _stats_buffers(codebooks), rank, world)

    def save():
        loop_state = runs.loop_state(_stats_buffers(codebooks), world)  # a collective: every rank takes part
        if rank == 0:
            save_checkpoint(ckpt_path, model, optimizer, step, run=run, history=history, loop_state=loop_state,
                            **(ckpt_extra or {}))

    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    bar = tqdm(total=steps, initial=step, desc=desc, disable=rank != 0, dynamic_ncols=True)
    last_save = time.monotonic()
    model.train()
    with runs.stop_on_signals() as stop_requests:
        while step < steps:
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * lr_factor(step, steps, warmup, cosine)
            for micro in range(grad_accum):
                x, y, *forced = get_batch(step * grad_accum + micro, rank, world)
                x, y = x.to(device), y.to(device)
                sync = contextlib.nullcontext() if micro == grad_accum - 1 or world == 1 else net.no_sync()
                amp = torch.autocast(device.split(":")[0], dtype=autocast) if autocast else contextlib.nullcontext()
                force = force_codes(model, *forced[0]) if forced else contextlib.nullcontext()
                with sync, amp, force:
                    logits = net(x)
                    ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
                    loss = (ce + model.codebook_loss()) / grad_accum
                loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % log_every == 0 or step == steps:
                history.append({"step": step, "loss": ce.item()} | _codebook_stats(codebooks))
                bar.set_postfix({name: f"{value:.4f}" if name != "dead" else f"{value:.0%}"
                                 for name, value in history[-1].items() if name != "step"}, refresh=False)
            bar.update(1)
            if revive_every and step % revive_every == 0 and step < steps:
                _sum_across_ranks([cb.usage for cb in codebooks])
                for cb in codebooks:
                    cb.revive_dead_codes()
                    if world > 1:
                        dist.broadcast(cb.codes.data, 0)  # every rank keeps rank 0's revived codes
            if eval_fn and eval_every and step % eval_every == 0 and step < steps and rank == 0:
                model.eval()
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in eval_fn(model, step).items()))
                model.train()
            # every rank must agree on when to save and stop: take the most urgent of all ranks' wishes
            wishes = torch.tensor([time.monotonic() - last_save >= ckpt_seconds, bool(stop_requests)],
                                  dtype=torch.float, device=device)
            _sum_across_ranks([wishes])
            if ckpt_path and (step % ckpt_every == 0 or step == steps or wishes.any()):
                save()
                last_save = time.monotonic()
            if wishes[1] > 0:
                bar.close()
                raise runs.Interrupted(stop_requests[0] if stop_requests else None, step, ckpt_path)
    bar.close()
    _sum_across_ranks([cb.usage for cb in codebooks])  # every rank ends with the global counts
    model.history = history
    return model.eval()


def _codebook_stats(codebooks):
    """Mean dead share and reconstruction error since the last revival, over codebooks and ranks."""
    if not codebooks:
        return {}
    stats = [t.clone() for t in _stats_buffers(codebooks)]
    _sum_across_ranks(stats)
    usage, recon, tokens = stats[0::3], stats[1::3], stats[2::3]
    dead = torch.cat([(u == 0).float().mean(-1) for u in usage]).mean().item()
    mse = sum(r.item() / max(1, t.item()) for r, t in zip(recon, tokens)) / len(codebooks)
    return {"dead": dead, "mse": mse}
