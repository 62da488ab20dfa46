"""
TopK sparse autoencoders: the baseline codebooks are compared with.

Paper: Gao, la Tour, Tillman, Goh, Troll, Radford, Sutskever, Leike, Wu, "Scaling and evaluating
sparse autoencoders", arXiv 2406.04093. Section and appendix numbers below refer to it.

An SAE is trained post hoc on a frozen model's activations x at one site and rewrites each of them
as a sparse, non-negative combination of learned unit-norm directions:

    z     = ReLU(TopK_k(W_enc (x - b_pre) + b_enc))     the latents: at most k non-zero  (section 2.3)
    x_hat = W_dec z + b_pre                             each column of W_dec has unit norm
    loss  = |x - x_hat|^2 + alpha |e - e_hat|^2         e = x - x_hat; e_hat = W_dec z_aux, z_aux the
                                                        top k_aux dead latents (AuxK, appendix A.2)

Here the SAEs sit exactly where the codebooks do (each attention head before W_O, each MLP output)
with the codebook's dictionary size and k, so the two can be read, spliced in and written alike.
A TopK SAE with k = 1 is gain-shape vector quantisation: a direction and a length per position,
where a k = 1 codebook gives one vector. What is left to compare is mostly what *finetuning* the
model around its bottleneck buys: the codebook model is trained with its codes in place, the SAE
fits activations of a model that never saw it.

Map of this file:
  1. TopKSAE             `heads` independent SAEs in one module, (..., heads, dim) -> same shape
  2. training            train_sae (one module), train_saes (one per codebook site, cached activations),
                         fit_saes: the same, kept in a file; save_saes / load_saes
  3. reading latents     record_latents, latent_precision_recall, dead_fraction: as codebook.py
                         records and scores codes
"""
import hashlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import codebook as cb
import runs


def geometric_median(x, iters=20):
    """x (N, heads, dim) -> (heads, dim): per head the point with the least summed distance to the
    rows, by Weiszfeld's iteration (a distance-weighted mean, repeated) from the mean."""
    median = x.mean(0)
    for _ in range(iters):
        weights = 1 / (x - median).norm(dim=-1).clamp_min(1e-8)  # (N, heads)
        median = (weights[..., None] * x).sum(0) / weights.sum(0)[..., None]
    return median


# ------------------------------------------------------------------------------------------------
# 1. The SAE. One module holds `heads` independent SAEs (the per-head attention sites of one layer,
# or a single MLP site), stored as stacked parameters and run in one batched call, like
# codebook.CodebookLayer.

class TopKSAE(nn.Module):
    def __init__(self, heads, dim, num_latents, k, k_aux=None, aux_alpha=1 / 32, dead_after=2**15, generator=None):
        super().__init__()
        if not 1 <= k <= num_latents:
            raise ValueError(f"k={k} must be between 1 and num_latents={num_latents}")
        self.heads, self.dim, self.num_latents, self.k = heads, dim, num_latents, k
        # AuxK (appendix A.2): k_aux a power of two near dim / 2; dead after `dead_after` tokens unfired
        self.k_aux = min(num_latents, k_aux or 2 ** max(0, (dim // 2).bit_length() - 1))
        self.aux_alpha, self.dead_after = aux_alpha, dead_after
        # appendix A.1: random unit-norm decoder directions, the encoder's the same (W_enc = W_dec^T),
        # b_enc zero; b_pre is set from data by init_b_pre()
        decoder = torch.randn(heads, num_latents, dim, generator=generator)
        decoder = decoder / decoder.norm(dim=-1, keepdim=True)
        self.decoder = nn.Parameter(decoder)  # (heads, latents, dim): row i is latent i's direction
        self.encoder = nn.Parameter(decoder.clone())  # (heads, latents, dim): row i reads latent i
        self.b_enc = nn.Parameter(torch.zeros(heads, num_latents))
        self.b_pre = nn.Parameter(torch.zeros(heads, dim))
        self.register_buffer("tokens_since_fired", torch.zeros(heads, num_latents, dtype=torch.long))

    def pre_activations(self, x):
        """x (..., heads, dim) -> W_enc (x - b_pre) + b_enc, (..., heads, latents)."""
        return torch.einsum("...hd,hld->...hl", x - self.b_pre, self.encoder) + self.b_enc

    def select(self, x, k, allowed=None):
        """The k largest pre-activations of each head (among its `allowed` (heads, latents) latents
        only, when given) after ReLU: (ids, values), each (..., heads, k). The ids are chosen
        without gradient, then only their pre-activations are recomputed with it: the values and
        gradients of top-k over all latents, at k / num_latents of the cost of the backward."""
        with torch.no_grad():
            pre = self.pre_activations(x)
            if allowed is not None:
                pre = pre.masked_fill(~allowed, -torch.inf)
            ids = pre.topk(k, dim=-1).indices
        values = ((x - self.b_pre)[..., None, :] * self.rows(self.encoder, ids)).sum(-1) + self.rows(self.b_enc, ids)
        if allowed is not None:
            values = values * self.rows(allowed.to(values.dtype), ids)  # a head with fewer than k allowed latents
        return ids, values.relu()

    def rows(self, table, ids):
        """table (heads, latents, ...) at latent ids (..., heads, k) of each head: (..., heads, k, ...).
        One embedding lookup, whose backward adds in a fixed order (indexing's adds race on two
        threads, and fitting then differs run to run in the last bits)."""
        flat = ids + torch.arange(self.heads, device=ids.device)[:, None] * self.num_latents
        return F.embedding(flat, table.reshape(self.heads * self.num_latents, -1)).view(*ids.shape, *table.shape[2:])

    def decode(self, ids, values, b_pre=True):
        """Latents (ids, values) (..., heads, k) -> W_dec z + b_pre (..., heads, dim)."""
        out = (values[..., None] * self.rows(self.decoder, ids)).sum(-2)
        return out + self.b_pre if b_pre else out

    def encode(self, x):
        """The latents z (..., heads, latents): k or fewer non-zero per head."""
        ids, values = self.select(x, self.k)
        return torch.zeros(*x.shape[:-1], self.num_latents, device=x.device).scatter(-1, ids, values)

    def forward(self, x):
        """x (..., heads, dim) -> its reconstruction, same shape and dtype: what is spliced in."""
        if x.shape[-2:] != (self.heads, self.dim):
            raise ValueError(f"SAE input must end in (heads={self.heads}, dim={self.dim}), got {tuple(x.shape)}")
        return self.decode(*self.select(x.float(), self.k)).to(x.dtype)

    def losses(self, x):
        """(mse, aux) on x (tokens, heads, dim), each summed over heads and averaged over tokens;
        in training mode also counts, per latent, the tokens since it last fired."""
        ids, values = self.select(x, self.k)
        error = x - self.decode(ids, values)
        mse = error.pow(2).sum(-1).mean(0).sum()
        if self.training:
            with torch.no_grad():
                self.tokens_since_fired += len(x)
                fired = values > 0
                head = torch.arange(self.heads, device=x.device)[:, None].expand_as(ids)
                self.tokens_since_fired[head[fired], ids[fired]] = 0
        dead = self.tokens_since_fired >= self.dead_after
        if not dead.any():
            return mse, mse.new_zeros(())
        # AuxK: the best k_aux dead latents reconstruct what the live ones missed (without b_pre:
        # the error is a difference); it gives dead latents a gradient, so they can come back
        error_hat = self.decode(*self.select(x, self.k_aux, allowed=dead), b_pre=False)
        aux = (error.detach() - error_hat).pow(2).sum(-1).mean(0)
        return mse, (aux * dead.any(-1)).sum()  # heads without a dead latent add nothing

    @torch.no_grad()
    def init_from_data(self, x, directions=True, generator=None):
        """From samples x (N, heads, dim): b_pre at their geometric median (appendix A.1); with
        `directions`, each latent's decoder and encoder rows along b_pre -> a random sample (the
        SAE's counterpart of the codebooks' k-means start). Gao et al. draw random directions;
        at k = 1 and this size most of those are never chosen and AuxK, which fits only the
        residual, does not bring them back (README: both measured)."""
        x = x.float()
        self.b_pre.copy_(geometric_median(x))
        if directions:
            picked = x[torch.randint(len(x), (self.num_latents,), generator=generator)] - self.b_pre
            rows = picked.transpose(0, 1) / picked.transpose(0, 1).norm(dim=-1, keepdim=True).clamp_min(1e-12)
            self.decoder.copy_(rows)
            self.encoder.copy_(rows)

    @torch.no_grad()
    def project_decoder_grad(self):
        """Remove each decoder row's gradient component along the row itself: that component only
        changes its norm, which normalize_decoder() undoes after the step (appendix A)."""
        if self.decoder.grad is not None:
            along = (self.decoder.grad * self.decoder).sum(-1, keepdim=True)
            self.decoder.grad -= along * self.decoder

    @torch.no_grad()
    def normalize_decoder(self):
        self.decoder /= self.decoder.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def top_latents(self, x):
        """x (..., heads, dim) -> ids (..., heads, k) of the latents TopK chose. A slot whose
        latent the ReLU zeroed (it did not fire) holds num_latents, an id no latent has."""
        ids, values = self.select(x.float(), self.k)
        return ids.masked_fill(values <= 0, self.num_latents)


# ------------------------------------------------------------------------------------------------
# 2. Training on cached activations. Adam (appendix A), no weight decay, gradient clipping at 1.

def train_sae(sae, acts, steps, batch_size=512, lr=3e-3, data_directions=True, generator=None):
    """Train `sae` on activations acts (N, heads, dim) for `steps` Adam steps of `batch_size`
    random rows (drawn with `generator`), started by init_from_data; the learning rate decays
    linearly to zero over the last fifth. Returns the SAE, in eval mode."""
    if steps < 1:
        raise ValueError(f"steps={steps}: an SAE trains for at least one step")
    acts = acts.float()
    sae.init_from_data(acts[torch.randperm(len(acts), generator=generator)[:4096]], data_directions, generator)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, 5 * (1 - step / steps)))
    sae.train()
    for _ in range(steps):
        batch = acts[torch.randint(len(acts), (batch_size,), generator=generator)]
        mse, aux = sae.losses(batch)
        (mse + sae.aux_alpha * aux).backward()
        sae.project_decoder_grad()
        nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        schedule.step()
    return sae.eval()


def codebook_sizes(model):
    """{(layer, site): (num_codes, k)} of a codebook model: the dictionary size and k an SAE gets
    at each site for a like-for-like comparison."""
    return {key: (layer.num_codes, layer.k) for key, layer in model.codebook_layers().items()}


@torch.no_grad()
def cache_activations(model, tokens, sites, batch_size=64):
    """Run tokens (n, seq) through the model; {(layer, site): activations (n * seq, heads, dim)} on
    the CPU, at each of `sites`, as the site sees them (before any codebook there)."""
    device = model.head.weight.device
    cached = {key: [] for key in sites}
    for start in range(0, len(tokens), batch_size):
        with cb.capture_activations(model) as acts:
            model(tokens[start:start + batch_size].to(device))
        for layer, site in sites:
            cached[layer, site].append(acts[layer][site].flatten(0, 1).float().cpu())
    return {key: torch.cat(v) for key, v in cached.items()}


def train_saes(acts, sizes, steps=400, batch_size=512, lr=3e-3, data_directions=True, seed=0, **sae_options):
    """One TopKSAE per site: acts {(layer, site): (N, heads, dim)}, sizes {(layer, site):
    (num_latents, k)} (codebook_sizes of the codebook model). All randomness comes from a
    generator seeded by `seed`, never from torch's global one. Returns {(layer, site): TopKSAE}."""
    missing = sorted(set(sizes) - set(acts))
    if missing:
        raise ValueError(f"no cached activations for the SAE sites {missing}")
    generator = torch.Generator().manual_seed(seed)
    saes = {}
    for key, (num_latents, k) in sizes.items():
        x = acts[key]
        sae = TopKSAE(x.shape[-2], x.shape[-1], num_latents, k, generator=generator, **sae_options)
        saes[key] = train_sae(sae, x.reshape(-1, *x.shape[-2:]), steps, batch_size, lr, data_directions, generator)
    return saes


FORMAT = "codebook-features-sae/1"


def save_saes(path, saes, settings):
    """{(layer, site): TopKSAE} and the settings they were fitted with, as plain data and tensors
    (torch.load(..., weights_only=True) reads them), written atomically."""
    state = {"format": FORMAT, "settings": settings, "saes": [
        {"layer": layer, "site": site, "shape": [s.heads, s.dim, s.num_latents, s.k],
         "options": {"k_aux": s.k_aux, "aux_alpha": s.aux_alpha, "dead_after": s.dead_after}, "state": s.state_dict()}
        for (layer, site), s in saes.items()]}
    runs.write_atomically(path, lambda tmp: torch.save(state, tmp))


def fit_saes(path, model, tokens, sizes, **fit):
    """train_saes on the model's activations on tokens (n, seq) at the sites of `sizes`, written
    to `path`; read back from there instead when the file holds SAEs fitted with the same
    options to the same model (its weights) and tokens. Returns {(layer, site): TopKSAE} on the
    model's device (they are fitted on the CPU)."""
    digest = hashlib.sha1(str(tuple(tokens.shape)).encode() + tokens.cpu().numpy().tobytes())
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    settings = dict(fit, sizes=[[*key, *size] for key, size in sizes.items()], digest=digest.hexdigest())
    saes = load_saes(path, settings) if os.path.exists(path) else None
    if saes is None:
        saes = train_saes(cache_activations(model, tokens, sizes), sizes, **fit)
        save_saes(path, saes, settings)
    return {key: s.to(model.head.weight.device) for key, s in saes.items()}


def load_saes(path, settings=None):
    """The SAEs save_saes wrote, in eval mode; None when `settings` are given and differ."""
    state = runs.load_torch_file(path, "delete it", f"SAE file {path}")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (written by another program?)")
    runs.check_intact(path)
    if settings is not None and state["settings"] != settings:
        return None
    saes = {}
    for entry in state["saes"]:
        s = TopKSAE(*entry["shape"], **entry["options"])
        s.load_state_dict(entry["state"])
        saes[entry["layer"], entry["site"]] = s.eval()
    return saes


# ------------------------------------------------------------------------------------------------
# 3. Reading latents the way codebook.py reads codes: ids per position and head, scored by the
# same precision / recall as codes.

@torch.no_grad()
def record_latents(model, saes, tokens, batch_size=64):
    """Run tokens (n, seq) through the (frozen) model: {address: ids (n, seq, k)} of each SAE's
    top latents at every position, one address per head ("L1.H2", "L0.MLP"), as
    codebook.record_dataset returns codes. A slot where no latent fired holds num_latents."""
    device = model.head.weight.device
    ids = {}
    for start in range(0, len(tokens), batch_size):
        with cb.capture_activations(model) as acts:
            model(tokens[start:start + batch_size].to(device))
        for (layer, site), sae in saes.items():
            top = sae.top_latents(acts[layer][site]).cpu()
            for h in range(sae.heads):
                ids.setdefault(str(cb.Address(layer, site, h)), []).append(top[..., h, :])
    return {a: torch.cat(v) for a, v in ids.items()}


def latent_precision_recall(ids, masks, num_latents):
    """codebook.code_precision_recall for latent ids from record_latents: (precision, recall) of
    every latent, each (S, num_latents), the 'no latent fired' id left out."""
    precision, recall = cb.code_precision_recall(ids, masks, num_latents + 1)
    return precision[..., :num_latents], recall[..., :num_latents]


def dead_fraction(ids, num_latents):
    """Share of the latents that never fire in recorded ids (..., k)."""
    return cb.dead_share(cb.count_codes(ids, num_latents + 1)[:num_latents]).item()
