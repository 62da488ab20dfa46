"""
Pretrained language models with codebooks, from a local Hugging Face folder or a GGUF file:
GPT-2, GPT-Neo (the TinyStories models), GPT-NeoX (Pythia), GPT-J, GPT-BigCode (StarCoder, SantaCoder converted), Llama
(SmolLM2, TinyLlama, Llama-3.x), Mistral, Qwen2, Qwen3, SmolLM3, OLMo-2, OLMo-3, Phi-3, Gemma, Gemma-2, Gemma-3,
Granite, Command-R (Cohere), Command-R7B (Cohere2), StableLM, Phi-1 / Phi-1.5 / Phi-2, StarCoder2, OLMo, BLOOM, MPT,
ERNIE 4.5 (dense), Arcee (AFM), Falcon (7B, 40B, 180B, 11B, RW), Nemotron (Minitron), Ministral, Ministral 3 (text), GLM,
GLM-4, Apertus (Apertus 1.5's text model too), Helium, Seed-OSS, EXAONE 3.0 / 3.5, EXAONE 4.0 and the mixtures of
experts Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and gpt-oss (its experts in MXFP4 as released, dequantised as loaded),
each computing what transformers computes. The paper's language-model results finetune such models with codebooks (section 5).

    import models
    model = models.from_pretrained("models/pythia-70m")                  # logits as the original's
    model = models.from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf", codebooks={"attn": dict(num_codes=1000, k=8)})
    model, tok = models.load_pretrained("models/SmolLM2-135M")
    tok.decode(tok.encode("Once upon a time"))

A folder is what `huggingface-cli download NAME --local-dir DIR` or `save_pretrained(DIR)` writes:
config.json, the weights (model.safetensors or pytorch_model.bin, or the shards of either with its
index) and tokenizer.json (or vocab.json + merges.txt), with tokenizer_config.json's BOS and end of turn. A GGUF file (llama.cpp,
ollama, LM Studio) holds the same in one file: sizes and tokenizer in its metadata, weights
quantised in blocks (formats.py reads both; architectures gpt2, gptneox, llama (with experts: Mixtral; Ministral's, no
window recorded), qwen2, qwen3, smollm3, olmo2 (OLMo-2 and -3), phi3, gemma, gemma2, gemma3, granite, command-r, cohere2,
stablelm, phi2, starcoder2, olmo, qwen2moe, qwen3moe, olmoe, gpt-oss, gptj, starcoder, bloom, mpt, ernie4_5, arcee,
falcon, nemotron, glm4, chatglm, apertus, seed_oss, exaone, exaone4).
Nothing is downloaded and transformers is not needed.
Weights load as float32; dropout is left out, so the model computes the original in eval mode.

This file:
  1. parts        norms, rotary embedding, attention (ALiBi too), MLP (or a mixture of experts), the block and the Transformer
  2. families     per family a function from config.json to TransformerConfig fields and one
                  table from its tensor names to ours
  3. loading      a folder or a GGUF file -> a Transformer; a checkpoint -> its model and tokenizer
"""
import contextlib
import fractions
import functools
import math
import os
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import codebook as cb
import bpe
import formats
import runs
import text

# ------------------------------------------------------------------------------------------------
# 1. Parts. A Transformer is a codebook.CodebookModel: interventions, search, training and reports
# use it as they use codebook.GPT, with codebooks at the same three sites of every block.

def gelu_new(x):
    """tanh's GELU computed step by step in x's dtype, as transformers' gelu_new (Phi): gelu_tanh within 1e-6 in
    float32, but rounded at each step in bfloat16."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_bloom(x):
    """BLOOM's tanh GELU (transformers' bloom_gelu_forward) computed step by step in x's dtype, with its rounded constant
    0.79788456 for sqrt(2 / pi): gelu_tanh within 1e-6 in float32, but rounded at each step in bfloat16."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class XIELU(nn.Module):
    """xIELU (Apertus's activation) with its learned parameters, one set per layer, stored as transformers'
    XIELUActivation stores them: alpha_p and alpha_n (1,) before their softplus, beta and eps () as buffers. Computed
    as its Python path does, in x's dtype: softplus(alpha_p) x x + beta x where x > 0, else
    (expm1(min(x, eps)) - x) (beta + softplus(alpha_n)) + beta x (its CUDA kernel, where installed, is not followed)."""

    def __init__(self):
        super().__init__()
        # (transformers' starting values: softplus(alpha_p) 0.8, beta + softplus(alpha_n) 0.8, beta 0.5, eps -1e-6)
        self.alpha_p = nn.Parameter(torch.tensor([0.8]).expm1().log())
        self.alpha_n = nn.Parameter(torch.tensor([0.3]).expm1().log())
        self.register_buffer("beta", torch.tensor(0.5))
        self.register_buffer("eps", torch.tensor(-1e-6))

    def forward(self, x):
        linear = self.beta * x
        positive = F.softplus(self.alpha_p) * x * x + linear  # ((alpha x) x, rounded as transformers rounds it)
        negative = (torch.expm1(torch.minimum(x, self.eps)) - x) * (self.beta + F.softplus(self.alpha_n)) + linear
        return torch.where(x > 0, positive, negative)


# a class (xielu) is a module with parameters of its own: each MLP makes one
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "gelu_new": gelu_new,
               "gelu_bloom": gelu_bloom, "silu": F.silu, "relu2": lambda x: F.relu(x).square(),  # relu2: Arcee's
               "xielu": XIELU}


@dataclass
class TransformerConfig:
    family: str = "llama"  # the model_type it was loaded as (a key of FAMILIES)
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4  # query heads
    n_kv_head: int = 0  # key / value heads, each shared by n_head / n_kv_head query heads; 0: n_head
    d_model: int = 64
    d_head: int = 0  # 0: d_model / n_head
    d_mlp: int = 256
    norm: str = "layernorm"  # or "rmsnorm" (computed in float32), "layernorm_nobias" (Cohere, MPT), "layernorm_noparams" (OLMo)
    norm_weight_float32: bool = False  # an RMSNorm's weight multiplied in float32, the product rounded once (gpt-oss)
    # an RMSNorm scales by 1 + its weight (stored as transformers' Gemma stores it), the sum and the product in float32,
    # rounded once; else by its weight (Gemma's loaded as that sum before: rounded to a lower precision as a sum); a
    # LayerNorm (norm "layernorm") likewise, the sum and the norm in the model's dtype (Nemotron's LayerNorm1P)
    norm_plus_one: bool = False
    # a LayerNorm without bias (and qk_layernorm's) computed step by step as transformers' Cohere writes it
    # (layer_norm_stepwise); else torch's, which differs in float32's last bits and so at times in bfloat16's
    norm_stepwise: bool = False
    norm_eps: float = 1e-5
    learned_positions: bool = False  # a learned position embedding is added to the token embedding
    rotary_dims: int = 0  # > 0: rotary embedding on each head's first rotary_dims query / key dims
    rotary_base: float = 10000.0
    # {"rope_type": "linear", "llama3", "yarn", "longrope" or "divisors", its parameters}
    rotary_scaling: dict = field(default_factory=dict)
    local_rotary_base: float = 0.0  # > 0: the layers with a window rotate by this base, unscaled (Gemma-3)
    no_rotary_layers: list = field(default_factory=list)  # layers without the rotary embedding (SmolLM3: every fourth)
    # what the rotary embedding computes in: "input", the queries' and keys' dtype (Llama); "float32", they are
    # widened, the cosines and sines rounded to their dtype first (Cohere); "float32_tables", the cosines and sines
    # kept in float32 (OLMo-2); either float32 rounded once at the end
    rotary_precision: str = "input"
    # the rotary frequencies kept in float32 when the model is cast to a lower precision (GPT-J: transformers computes its
    # table of sines and cosines in float32, then rounds them); else rounded with the model, as Llama's inv_freq buffer
    rotary_frequencies_float32: bool = False
    # the rotary embedding pairs dims (2i, 2i + 1) of each head, q and k as stored (GPT-J, Cohere, ERNIE 4.5); else
    # (i, i + rotary_dims / 2): the same rotation of reordered dims, but q . k summed in another order, other last bits in
    # bfloat16 or float16
    rotary_interleaved: bool = False
    qkv_bias: bool = False  # biases on the query, key and value projections
    out_bias: bool = False  # a bias on W_O
    qk_norm: bool = False  # an RMSNorm on each head's queries and keys, before the rotary embedding (Qwen3)
    qk_norm_across_heads: bool = False  # that norm spans all heads' queries (and keys) at once (OLMo-2)
    qk_layernorm: bool = False  # that norm is a LayerNorm without bias, with a weight for each head (Cohere, StableLM-2-12B)
    qkv_clip: float = 0.0  # > 0: queries, keys (after their norm) and values clamped to +-qkv_clip (OLMoE's clip_qkv)
    attn_scale: float | None = None  # attention scores are multiplied by this; None: 1/sqrt(d_head)
    attn_window: int | list = 0  # > 0: each position sees itself and the attn_window - 1 before it; or one per layer
    # > 0: each query, after the rotary embedding, times 1 + query_scale_beta ln(1 + floor(position / query_scale_period)),
    # computed in float32 and rounded to its dtype (Llama-4's scaling, Ministral 3's llama_4_scaling_beta)
    query_scale_beta: float = 0.0
    query_scale_period: int = 0
    attn_softcap: float = 0.0  # > 0: each attention score s becomes attn_softcap * tanh(s / attn_softcap) (Gemma-2)
    attn_sinks: bool = False  # a learned logit per head joins each softmax's denominator, its value dropped (gpt-oss's sinks)
    # queries and keys widened to float32 before their product: the scores, mask and softmax in float32, the weights
    # rounded once to the values' dtype (GPT-Neo); else the scores in the queries' dtype
    attn_scores_float32: bool = False
    logit_softcap: float = 0.0  # > 0: the same on the output logits
    # > 0: ALiBi (BLOOM, MPT): each head's score of key j from query i gets slope * (j - i) added, the heads' slopes
    # those of this maximum bias (alibi_slopes; 8 in BLOOM and MPT)
    alibi: float = 0.0
    embed_scale: float = 1.0  # the token embedding is multiplied by this (Gemma: sqrt(d_model))
    embed_norm: bool = False  # a norm on the token embedding (BLOOM's word_embeddings_layernorm)
    pre_norms: bool = True  # a norm on the attention's and the MLP's inputs (False: OLMo-2, normed after them only)
    sandwich_norms: bool = False  # a norm on the attention's and the MLP's outputs (Gemma: as well; OLMo-2: instead)
    mlp: str = "gelu"  # "gelu": down(act(up x)) (whatever act is); "gated": down(act(gate x) * up x) (SwiGLU with silu)
    activation: str = "gelu"  # a key of ACTIVATIONS
    mlp_bias: bool = True
    parallel_residual: bool = False  # attention and MLP both read the block's input (GPT-NeoX)
    shared_norm: bool = False  # and read it through one norm: norm2 is norm1 (Cohere, StableLM's parallel residual)
    # with parallel_residual: attention's and the MLP's outputs summed first, then the block's input added (Phi): the
    # same sum as adding each in turn, rounded otherwise (in bfloat16, often a different value)
    outputs_summed_first: bool = False
    residual_scale: float = 1.0  # what attention and the MLP add to the residual stream is multiplied by this (Granite)
    logit_scale: float = 1.0  # the output logits are multiplied by this (Cohere; Granite: 1 / logits_scaling)
    experts: int = 0  # > 0: the MLP is a sparse mixture of this many gated experts (MoE); 0: one dense MLP
    experts_used: int = 0  # each token goes to the experts_used experts its router scores highest
    d_expert: int = 0  # each expert's hidden width
    experts_renormalised: bool = False  # the chosen experts' router probabilities rescaled to sum to 1
    d_shared_expert: int = 0  # > 0: a gated MLP of this width every token goes through too, times a sigmoid gate (Qwen2-MoE)
    dense_layers: list = field(default_factory=list)  # layers with a dense MLP (of d_mlp) in a mixture-of-experts model
    experts_bias: bool = False  # biases on the router and on each expert's gate, up and down (gpt-oss)
    router_top_logits: bool = False  # the experts_used highest router logits chosen, weighted by a softmax over them (gpt-oss)
    swiglu_limit: float = 0.0  # > 0: each expert's activation is gpt-oss's clamped SwiGLU: gate clamped above at swiglu_limit,
    # up to +-swiglu_limit, then (up + 1) * gate * sigmoid(swiglu_alpha * gate)
    swiglu_alpha: float = 1.702
    tied_head: bool = False  # the output layer shares the token embedding's weight
    head_bias: bool = False  # a bias on the output layer (Phi)
    codebooks: dict = field(default_factory=dict)  # site ('attn', 'mlp', 'block') -> CodebookSpec

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_mlp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        self.n_kv_head, self.d_head = self.n_kv_head or self.n_head, self.d_head or self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        windows = self.attn_window if isinstance(self.attn_window, list) else [self.attn_window]
        if not all(isinstance(w, int) and w >= 0 for w in windows) or len(windows) not in (1, self.n_layer):
            raise ValueError(f"attn_window={self.attn_window!r} must be 0, a positive integer or a list of n_layer of them")
        for name, allowed in (("norm", ("layernorm", "rmsnorm", "layernorm_nobias", "layernorm_noparams")),
                              ("mlp", ("gelu", "gated")),
                              ("rotary_precision", ("input", "float32", "float32_tables")),
                              ("activation", tuple(ACTIVATIONS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        kinds = ("linear", "llama3", "yarn", "longrope", "divisors")
        if self.rotary_scaling and self.rotary_scaling.get("rope_type") not in kinds:
            raise ValueError(f"rotary_scaling={self.rotary_scaling!r}: its rope_type must be one of {kinds}")
        for name in ("norm_eps", "residual_scale", "logit_scale"):
            if not is_positive_number(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive number")
        if self.norm_plus_one and self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm_plus_one needs norm='rmsnorm' or 'layernorm', not {self.norm!r}")
        if self.norm_stepwise and self.norm != "layernorm_nobias":
            raise ValueError(f"norm_stepwise needs norm='layernorm_nobias', not {self.norm!r}")
        if self.qk_layernorm and (not self.qk_norm or self.qk_norm_across_heads):
            raise ValueError("qk_layernorm needs qk_norm, over each head (not qk_norm_across_heads)")
        if self.shared_norm and not (self.parallel_residual and self.pre_norms):
            raise ValueError("shared_norm needs parallel_residual and pre_norms: the MLP reads the attention's normed input")
        if self.outputs_summed_first and not self.parallel_residual:
            raise ValueError("outputs_summed_first needs parallel_residual: the MLP reads the block's input")
        if self.rotary_frequencies_float32 and self.rotary_scaling.get("rope_type") == "longrope":
            raise ValueError("rotary_frequencies_float32 with LongRoPE is not implemented")
        if self.rotary_dims % 2 or not 0 <= self.rotary_dims <= self.d_head:
            raise ValueError(f"rotary_dims={self.rotary_dims} must be even and at most d_head={self.d_head}")
        numbers = {"rotary_base": self.rotary_base} | {f"rotary_scaling's {name}": value for name, value in
                                                       self.rotary_scaling.items() if name not in ("rope_type", "truncate")}
        for name, value in numbers.items():
            if not all(map(is_positive_number, value if isinstance(value, list) else [value])):
                raise ValueError(f"{name}={value!r} must be a positive number")
        if not (self.local_rotary_base == 0 or is_positive_number(self.local_rotary_base)):
            raise ValueError(f"local_rotary_base={self.local_rotary_base!r} must be a positive number (or 0: none)")
        self.rotary_base, self.local_rotary_base = float(self.rotary_base), float(self.local_rotary_base)
        for name in ("no_rotary_layers", "dense_layers"):
            if not all(isinstance(i, int) and 0 <= i < self.n_layer for i in getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must list layers, each in 0 .. {self.n_layer - 1}")
        if self.query_scale_beta and not (isinstance(self.query_scale_period, int) and self.query_scale_period > 0):
            raise ValueError(f"query_scale_period={self.query_scale_period!r} must be a positive integer")
        for name in ("qkv_clip", "swiglu_limit", "alibi", "query_scale_beta"):
            if not (getattr(self, name) == 0 or is_positive_number(getattr(self, name))):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive number (or 0: none)")
        if self.alibi and (self.attn_softcap or self.attn_sinks or self.attn_scores_float32):
            raise ValueError("alibi with attn_softcap, attn_sinks or attn_scores_float32 is not implemented")
        if not is_positive_number(self.swiglu_alpha):
            raise ValueError(f"swiglu_alpha={self.swiglu_alpha!r} must be a positive number")
        for name in ("experts", "experts_used", "d_expert", "d_shared_expert"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a non-negative integer")
        if self.experts and isinstance(ACTIVATIONS[self.activation], type):
            raise ValueError(f"activation={self.activation!r} (with parameters of its own) in a mixture of experts is not "
                             f"implemented")
        if self.experts and not (1 <= self.experts_used <= self.experts and self.d_expert):
            raise ValueError(f"experts_used={self.experts_used} must be 1 .. experts={self.experts} and d_expert positive")
        self.codebooks = cb.codebook_specs(self.codebooks, self.n_layer)

    def to_dict(self):
        return asdict(self)  # plain Python types, safe for weights_only checkpoints


def is_positive_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, in float32 whatever x's dtype (as transformers' Llama: the
    normalised x rounded to x's dtype, then times the weight); weight_float32: the weight multiplied in
    float32 and the product rounded once (transformers' gpt-oss); plus_one: times 1 + weight, the sum and
    the product in float32, rounded once (transformers' Gemma)."""

    def __init__(self, dim, eps, weight_float32=False, plus_one=False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))  # (a scale of 1 either way)
        self.eps, self.weight_float32, self.plus_one = eps, weight_float32, plus_one

    def forward(self, x):
        if self.plus_one:
            return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1.0 + self.weight.float())).to(x.dtype)
        if self.weight_float32:
            return (self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)).to(x.dtype)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def layer_norm_stepwise(x, eps):
    """x's last dim normalised in float32 as transformers' Cohere writes it: minus the mean, times rsqrt of the mean
    squared deviation + eps."""
    x = x.float()
    centred = x - x.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)


class StepwiseLayerNorm(nn.Module):
    """A LayerNorm without bias as transformers' CohereLayerNorm: layer_norm_stepwise times the weight in float32,
    rounded once. A weight (dim,), or (heads, d_head) for x (..., heads, d_head): each head's own (Cohere's q / k norms)."""

    def __init__(self, shape, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(shape)), eps

    def forward(self, x):
        return (self.weight * layer_norm_stepwise(x, self.eps)).to(x.dtype)


class HeadLayerNorm(nn.Module):
    """A LayerNorm without bias over each head's dims, with a weight (heads, d_head) for each head, in
    float32 whatever x's dtype (StableLM's per-head nn.LayerNorms stacked)."""

    def __init__(self, heads, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(heads, dim)), eps

    def forward(self, x):  # x (..., heads, d_head)
        return (self.weight * F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)).to(x.dtype)


class BareLayerNorm(nn.Module):
    """A LayerNorm without weight or bias, in float32 whatever x's dtype, rounded once (OLMo's)."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class PlusOneLayerNorm(nn.LayerNorm):
    """A LayerNorm with bias scaling by 1 + its weight, as transformers' NemotronLayerNorm1P: the sum and the norm in
    the weights' and x's dtype (no float32 step); under autocast (where torch.is_autocast_enabled() says so: CUDA's, as
    transformers asks), x, 1 + weight and the bias cast to the autocast dtype and the norm computed in it, autocast off."""

    def __init__(self, dim, eps):
        super().__init__(dim, eps=eps)
        nn.init.zeros_(self.weight)  # (a scale of 1)

    def forward(self, x):
        args, device = [x, self.weight + 1.0, self.bias], x.device.type
        if torch.is_autocast_enabled():
            dtype = torch.get_autocast_dtype(device)
            args = [t.to(dtype) if t.is_floating_point() and t.device.type == device and t.dtype != torch.float64 else t
                    for t in args]
        off = torch.autocast(device, enabled=False) if device != "meta" and torch.is_autocast_enabled(device) else \
            contextlib.nullcontext()
        with off:
            return F.layer_norm(args[0], self.normalized_shape, args[1], args[2], self.eps)


def make_norm(cfg, dim=None):
    dim = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_weight_float32, cfg.norm_plus_one)
    if cfg.norm_plus_one:
        return PlusOneLayerNorm(dim, cfg.norm_eps)
    if cfg.norm == "layernorm_noparams":
        return BareLayerNorm(cfg.norm_eps)
    if cfg.norm_stepwise:
        return StepwiseLayerNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm == "layernorm")


def rotary_frequencies(dims, base, scaling, long=False):
    """The rotary embedding's angular frequencies (dims / 2,), base^(-2i / dims), rescaled for a
    longer context: "linear" divides them all by the factor; "longrope" (LongRoPE, Phi's) divides each by
    its own factor, of short_factor, or of long_factor where `long`; "llama3" divides those whose
    wavelength exceeds original_max_position_embeddings / low_freq_factor, keeps those under
    original_max_position_embeddings / high_freq_factor, and blends the two in between; "yarn" (YaRN)
    divides those turning fewer than beta_slow times in original_max_position_embeddings, keeps those
    turning more than beta_fast times, and ramps between them by dimension (from and to whole dimensions
    unless its "truncate" is False, as gpt-oss's); "divisors" divides each by
    its own divisor (llama.cpp's rope_freqs: how GGUF files hold "llama3")."""
    inv_freq = 1.0 / base ** (torch.arange(0, dims, 2).float() / dims)
    if scaling.get("rope_type") == "linear":
        return inv_freq / scaling["factor"]
    if scaling.get("rope_type") == "divisors":
        return inv_freq / torch.tensor(scaling["divisors"], dtype=torch.float)
    if scaling.get("rope_type") == "longrope":  # (factor times power in one division, as transformers rounds it)
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float)
        return 1.0 / (factors * base ** (torch.arange(0, dims, 2).float() / dims))
    if scaling.get("rope_type") == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        smooth = (context / wavelength - low) / (high - low)  # 0 at the long-wavelength edge of the band, 1 at the short
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(wavelength < context / high, inv_freq,
                           torch.where(wavelength > context / low, inv_freq / factor, blended))
    if scaling.get("rope_type") == "yarn":
        def dim_turning(times):  # the dimension whose wavelength fits `times` times into the original context
            return dims * math.log(scaling["original_max_position_embeddings"] / (times * 2 * math.pi)) / (2 * math.log(base))
        low, high = dim_turning(scaling["beta_fast"]), dim_turning(scaling["beta_slow"])
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dims - 1)
        ramp = ((torch.arange(dims // 2).float() - low) / (high - low if high != low else 0.001)).clamp(0, 1)
        kept = 1 - ramp  # the share of each frequency kept as it is (written as transformers does, to the last bit)
        return 1.0 / (scaling["factor"] * base ** (torch.arange(0, dims, 2).float() / dims)) * (1 - kept) + inv_freq * kept
    return inv_freq


def rotary(x, start, inv_freq, scale=1.0, precision="input", interleaved=False):
    """Queries or keys x (B, H, T, d_head) at positions start, start + 1, ... rotated: the first
    2 len(inv_freq) dims of each head, dim i paired with i + len(inv_freq) (the "rotate_half"
    layout of GPT-NeoX and transformers' Llama; interleaved: dim 2i with 2i + 1, GPT-J's), and multiplied by
    `scale` (YaRN's or LongRoPE's attention factor); the rest unchanged. In x's dtype, or in float32 rounded once
    (precision: TransformerConfig's rotary_precision)."""
    dims = 2 * inv_freq.shape[0]
    angles = torch.arange(start, start + x.shape[2], dtype=torch.float, device=x.device)[:, None] * inv_freq.float()
    angles = angles.repeat_interleave(2, -1) if interleaved else torch.cat([angles, angles], -1)
    cos, sin = (f(angles) * scale for f in (torch.cos, torch.sin))
    if precision != "float32_tables":
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot = x[..., :dims].float() if precision != "input" else x[..., :dims]
    if interleaved:  # (-x[2i + 1], x[2i]) at dims 2i, 2i + 1, as transformers' GPT-J turns them
        turned = torch.stack([-rot[..., 1::2], rot[..., ::2]], -1).flatten(-2)
    else:
        turned = torch.cat([-rot[..., dims // 2:], rot[..., :dims // 2]], -1)
    rotated = (rot * cos + turned * sin).to(x.dtype)
    return rotated if dims == x.shape[-1] else torch.cat([rotated, x[..., dims:]], -1)


def alibi_slopes(heads, max_bias, bloom=False):
    """ALiBi's slope of each head (float32) for a maximum bias: with p the largest power of two not above `heads`,
    2^(-max_bias (h + 1) / p) for the first p heads, then the odd powers 1, 3, 5, ... of 2^(-max_bias / 2p) for the
    others (a head count not a power of two). Rounded as the family's transformers rounds them (the two differ in the
    last bit for most head counts from 12 up, bloom-560m's 16 and BLOOM's 112 among them): MPT's as 1 / 2^x of
    float32 exponents x; bloom: BLOOM's as float32 powers of a float32 base (as llama.cpp computes both families')."""
    if bloom:
        p = 1 << (heads.bit_length() - 1)
        base = lambda n: torch.tensor(2 ** (-max_bias / n), dtype=torch.float32)
        return torch.cat([base(p) ** torch.arange(1, p + 1, dtype=torch.int32),
                          base(2 * p) ** torch.arange(1, 1 + 2 * (heads - p), 2, dtype=torch.int32)])
    p = 1 << (heads - 1).bit_length()
    slopes = 1.0 / torch.pow(2, torch.arange(1, p + 1).float() * (max_bias / p))
    return slopes if p == heads else torch.cat([slopes[1::2], slopes[::2]])[:heads]


class BiasAfterLinear(nn.Linear):
    """nn.Linear with its bias added to the product rounded first, as transformers' FalconLinear computes it: the same
    in float32, other last bits in bfloat16 (nn.Linear adds the bias within the product)."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


def linear_of(cfg):
    """The linear layer of the family's attention and MLP (Falcon's adds its biases after the product)."""
    return BiasAfterLinear if cfg.family == "falcon" else nn.Linear


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads; returns each head's output before W_O (self.o)."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.n_head, self.n_kv_head, self.d_head, self.scale = cfg.n_head, cfg.n_kv_head, cfg.d_head, cfg.attn_scale
        self.window = cfg.attn_window[layer] if isinstance(cfg.attn_window, list) else cfg.attn_window
        linear = linear_of(cfg)
        self.q = linear(cfg.d_model, cfg.n_head * cfg.d_head, bias=cfg.qkv_bias)
        self.k = linear(cfg.d_model, cfg.n_kv_head * cfg.d_head, bias=cfg.qkv_bias)
        self.v = linear(cfg.d_model, cfg.n_kv_head * cfg.d_head, bias=cfg.qkv_bias)
        self.o = linear(cfg.n_head * cfg.d_head, cfg.d_model, bias=cfg.out_bias)
        if cfg.qk_layernorm:
            self.q_norm, self.k_norm = (StepwiseLayerNorm((heads, cfg.d_head), cfg.norm_eps) if cfg.norm_stepwise else
                                        HeadLayerNorm(heads, cfg.d_head, cfg.norm_eps) for heads in (cfg.n_head, cfg.n_kv_head))
        elif cfg.qk_norm:
            across = cfg.qk_norm_across_heads
            self.q_norm, self.k_norm = (RMSNorm(heads * cfg.d_head if across else cfg.d_head, cfg.norm_eps,
                                                cfg.norm_weight_float32, cfg.norm_plus_one) for heads in (cfg.n_head, cfg.n_kv_head))
        self.qk_norm, self.clip, self.softcap = cfg.qk_norm, cfg.qkv_clip, cfg.attn_softcap
        self.query_scale_beta, self.query_scale_period = cfg.query_scale_beta, cfg.query_scale_period
        self.scores_float32 = cfg.attn_scores_float32
        self.sinks = nn.Parameter(torch.zeros(cfg.n_head)) if cfg.attn_sinks else None
        # its slopes and bias rounded as the family's transformers rounds them (MPT's, BLOOM's or Falcon's)
        self.alibi_rounding = cfg.family if cfg.family in ("bloom", "falcon") else "mpt"
        # ALiBi's float32 slopes held as their int32 bits: a buffer, moved with the model (no copy in a forward), which
        # casting the model leaves unrounded (it casts floating buffers only); not in the state_dict
        slopes = alibi_slopes(cfg.n_head, cfg.alibi, self.alibi_rounding != "mpt").view(torch.int32) if cfg.alibi else None
        self.register_buffer("alibi_bits", slopes, persistent=False)
        local = cfg.local_rotary_base and self.window
        base, scaling = (cfg.local_rotary_base, {}) if local else (cfg.rotary_base, cfg.rotary_scaling)
        rotates = cfg.rotary_dims and layer not in cfg.no_rotary_layers
        frequencies = rotary_frequencies(cfg.rotary_dims, base, scaling) if rotates else None
        self.register_buffer("inv_freq", frequencies, persistent=False)
        # LongRoPE's frequencies of its long factors, for a forward that reaches past the original context
        longrope = rotates and scaling.get("rope_type") == "longrope"
        self.register_buffer("long_inv_freq", rotary_frequencies(cfg.rotary_dims, base, scaling, long=True) if longrope
                             else None, persistent=False)
        self.original_context = scaling.get("original_max_position_embeddings") if longrope else None
        self.rotary_scale, self.rotary_precision = scaling.get("attention_factor", 1.0), cfg.rotary_precision
        self.rotary_interleaved = cfg.rotary_interleaved
        # rotary_frequencies_float32: their float32 bits as int32, a buffer that moves with the model and that casting
        # it leaves unrounded (as alibi_bits)
        bits = frequencies.clone().view(torch.int32) if rotates and cfg.rotary_frequencies_float32 else None
        self.register_buffer("inv_freq_bits", bits, persistent=False)

    def forward(self, x, start, cache=None):
        """x (B, T, D) -> heads (B, T, n_head, d_head); cache: a dict of earlier keys and values, or None."""
        B, T, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.qk_norm:  # each norm over its width: one head's dims, or all heads' (OLMo-2)
            q, k = (norm(t.unflatten(-1, (-1, norm.weight.shape[-1]))).flatten(-2)
                    for norm, t in ((self.q_norm, q), (self.k_norm, k)))
        if self.clip:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k, v = (t.view(B, T, -1, self.d_head).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d_head)
        if self.inv_freq is not None:
            # LongRoPE: the long factors where this forward's last position is past the original context, as transformers
            # chooses them, per forward by its largest position (with a cache, the earlier keys keep their rotation)
            long = self.long_inv_freq is not None and start + T > self.original_context
            inv_freq = self.long_inv_freq if long else self.inv_freq
            if self.inv_freq_bits is not None:
                inv_freq = self.inv_freq_bits.view(torch.float32)
            q, k = (rotary(t, start, inv_freq, self.rotary_scale, self.rotary_precision, self.rotary_interleaved)
                    for t in (q, k))
        if self.query_scale_beta:  # (written as transformers' Ministral 3, for its float32 bits)
            positions = torch.arange(start, start + T, device=x.device)
            scale = 1 + self.query_scale_beta * torch.log(1 + torch.floor(positions / self.query_scale_period))
            q = q * scale[:, None].to(q.dtype)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        if self.alibi_bits is not None:
            slopes = self.alibi_bits.view(torch.float32)
            return alibi_attention(q, k, v, self.window, self.scale, slopes, self.alibi_rounding).transpose(1, 2)
        if self.scores_float32:  # (softcapped_attention's softmax is in float32 and rounded once, as GPT-Neo's)
            q, k = q.float(), k.float()
        if self.softcap or self.sinks is not None or self.scores_float32:
            return softcapped_attention(q, k, v, self.window, self.scale, self.softcap, self.sinks).transpose(1, 2)
        return cb.causal_attention(q, k, v, self.window, self.scale).transpose(1, 2)


def alibi_attention(q, k, v, window, scale, slopes, rounding="mpt"):
    """codebook.causal_attention's result with ALiBi: each score (times `scale`) of key j from query i gets its head's
    slope * (j - i) added, up to a constant per query, then a float32 softmax. As MPT's transformers computes it: slope
    * (j - last), `last` the last key, added in float32 (for one new query after cached keys, j - i itself). rounding
    "bloom": as BLOOM's transformers computes it instead, slope * j, rounded to the scores' dtype and added within their
    product (baddbmm). "falcon": as Falcon's, slope * j with the slope and the product rounded to bfloat16 whatever the
    scores' dtype (in float32 too), then divided by sqrt(d_head) in the scores' dtype, added by scaled_dot_product_attention
    as its mask. The constant leaves the softmax unchanged but for rounding. slopes (H,): float32, on q's device."""
    B, H, T, S = *q.shape[:3], k.shape[2]
    k, v = (t.repeat_interleave(H // k.shape[1], 1) for t in (k, v))
    scale = scale or q.shape[-1] ** -0.5
    i, j = torch.arange(S - T, S, device=q.device)[:, None], torch.arange(S, device=q.device)
    slopes = slopes[:, None, None]  # (H, 1, 1)
    visible = (j <= i) & (j > i - window) if window else j <= i
    if rounding == "falcon":
        bias = (slopes.bfloat16() * j).to(q.dtype) / math.sqrt(q.shape[-1])  # (H, 1, S)
        mask = bias.masked_fill(~visible, torch.finfo(q.dtype).min).expand(B, H, T, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if rounding == "bloom":
        bias = (slopes * j).to(q.dtype).repeat(B, 1, 1)  # (B * H, 1, S)
        scores = torch.baddbmm(bias, q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), alpha=scale).view(B, H, T, S).float()
    else:
        scores = q @ k.transpose(2, 3) * scale + slopes * (j - (S - 1))  # (the bias (H, 1, S), broadcast)
    return scores.masked_fill(~visible, -math.inf).softmax(-1).to(v.dtype) @ v


def softcapped_attention(q, k, v, window, scale, cap, sinks=None):
    """codebook.causal_attention's result with each score s (times `scale`) replaced by
    cap * tanh(s / cap) before the mask: no score beyond +-cap (Gemma-2); cap 0: unchanged. With
    `sinks` (n_head,), each head's sink joins its softmax as one more score, whose probability is
    dropped: the weights of the positions sum to less than 1 (gpt-oss)."""
    T, S = q.shape[2], k.shape[2]
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    scores = q @ k.transpose(2, 3) * (scale or q.shape[-1] ** -0.5)
    if cap:
        scores = torch.tanh(scores / cap) * cap
    i, j = torch.arange(S - T, S, device=q.device)[:, None], torch.arange(S, device=q.device)
    visible = (j <= i) & (j > i - window) if window else j <= i
    scores = scores.masked_fill(~visible, -math.inf)
    if sinks is None:  # the softmax in float32, rounded once, as transformers' eager attention (Gemma-2's)
        return scores.softmax(-1, dtype=torch.float32).to(v.dtype) @ v
    sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    combined = torch.cat([scores, sink], -1)
    combined = combined - combined.max(-1, keepdim=True).values  # in their dtype, as transformers' gpt-oss (it rounds in bfloat16)
    return combined.softmax(-1)[..., :-1].to(v.dtype) @ v


class MLP(nn.Module):
    def __init__(self, cfg, width=None):
        super().__init__()
        width = width or cfg.d_mlp
        act = ACTIVATIONS[cfg.activation]
        self.act = act() if isinstance(act, type) else act
        linear = linear_of(cfg)
        self.up = linear(cfg.d_model, width, bias=cfg.mlp_bias)
        self.gate = linear(cfg.d_model, width, bias=cfg.mlp_bias) if cfg.mlp == "gated" else None
        self.down = linear(width, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down(self.act(self.up(x)) if self.gate is None else self.act(self.gate(x)) * self.up(x))


class Stacked(nn.Module):
    """n linear maps d_in -> d_out, held as one weight (n, d_out, d_in), as GGUF files stack them, and
    with bias one bias (n, d_out) (gpt-oss); else none."""

    def __init__(self, n, d_in, d_out, bias=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, d_out, d_in) * d_in ** -0.5)
        self.bias = nn.Parameter(torch.zeros(n, d_out)) if bias else None


class MoE(nn.Module):
    """A sparse mixture of experts in the MLP's place: the router scores every expert for each token, the
    softmax over all of them (in float32) gives each a probability, and the token goes to the experts_used
    most probable, whose gated MLPs' outputs are summed weighted by those probabilities (rescaled to sum to 1
    where experts_renormalised: taking the top k then a softmax over them is the same). With a shared expert
    (Qwen2-MoE), a gated MLP every token goes through is added, times sigmoid(shared_gate x). Each expert
    computes only the tokens sent to it, expert by expert, as transformers does. (The weights are rounded to
    the activations' dtype before they multiply, as Qwen2-MoE, Qwen3-MoE and OLMoE do; Mixtral multiplies by
    the float32 weights and rounds the product, as its transformers does: the same in float32, not in bfloat16.)
    gpt-oss's router has a bias and chooses by the logits, weighting the chosen by a softmax over their logits
    (router_top_logits); its experts have biases and the clamped SwiGLU of swiglu_limit and swiglu_alpha."""

    def __init__(self, cfg):
        super().__init__()
        self.act, self.k, self.renormalised = ACTIVATIONS[cfg.activation], cfg.experts_used, cfg.experts_renormalised
        self.round_weights = cfg.family != "mixtral"  # Mixtral multiplies by the float32 weights, then rounds
        self.top_logits, self.limit, self.alpha = cfg.router_top_logits, cfg.swiglu_limit, cfg.swiglu_alpha
        self.router = nn.Linear(cfg.d_model, cfg.experts, bias=cfg.experts_bias)
        self.experts = nn.ModuleDict({"gate": Stacked(cfg.experts, cfg.d_model, cfg.d_expert, cfg.experts_bias),
                                      "up": Stacked(cfg.experts, cfg.d_model, cfg.d_expert, cfg.experts_bias),
                                      "down": Stacked(cfg.experts, cfg.d_expert, cfg.d_model, cfg.experts_bias)})
        self.shared = MLP(cfg, cfg.d_shared_expert) if cfg.d_shared_expert else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.d_shared_expert else None

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])  # (tokens, d_model)
        if self.top_logits:  # the softmax over the chosen logits, in their dtype (gpt-oss)
            weights, chosen = self.router(x).topk(self.k, -1)
            weights = weights.softmax(-1)
        else:
            weights, chosen = self.router(x).float().softmax(-1).topk(self.k, -1)  # (tokens, k) each
        if self.renormalised and not self.top_logits:
            weights = weights / weights.sum(-1, keepdim=True)
        if self.round_weights:
            weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        # each stacked weight split into its experts' matrices once: its gradient is then gathered into one tensor
        # (weight[i] for each expert would make backward write a zero tensor of all experts' size per expert used)
        gate, up, down = (m.weight.unbind(0) for m in self.experts.values())
        gate_bias, up_bias, down_bias = (None if m.bias is None else m.bias.unbind(0) for m in self.experts.values())
        for i in chosen.unique().tolist():  # each expert that any token was sent to
            token, slot = torch.where(chosen == i)
            h = x[token]
            g, u = F.linear(h, gate[i]), F.linear(h, up[i])
            if gate_bias is not None:  # added apart, each product rounded first (gpt-oss's transformers)
                g, u = g + gate_bias[i], u + up_bias[i]
            if self.limit:  # gpt-oss's clamped SwiGLU
                g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
                a = (u + 1) * (g * torch.sigmoid(g * self.alpha))
            else:
                a = self.act(g) * u
            y = F.linear(a, down[i])
            if down_bias is not None:
                y = y + down_bias[i]
            out.index_add_(0, token, (y * weights[token, slot, None]).to(x.dtype))
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out.reshape(shape)


class Block(cb.CodebookBlock):
    """Pre-norm block: x + attention(norm1(x)), then + MLP(norm2(...)) (or MoE), codebooks at the three sites.
    With sandwich norms each output is normed (again, or only: OLMo-2) before it is added; the "mlp"
    site is then what the MLP adds to the residual stream, after its norm (and residual_scale: Granite).
    With shared_norm the MLP reads the attention's normed input (norm2 is norm1)."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        norm_if = lambda present: make_norm(cfg) if present else nn.Identity()
        self.norm1, self.attn, self.norm2 = norm_if(cfg.pre_norms), Attention(cfg, layer), norm_if(cfg.pre_norms)
        self.mlp = MoE(cfg) if cfg.experts and layer not in cfg.dense_layers else MLP(cfg)
        self.post_attn_norm, self.post_mlp_norm = norm_if(cfg.sandwich_norms), norm_if(cfg.sandwich_norms)
        if cfg.shared_norm:
            self.norm2 = self.norm1  # one module (its weights once in parameters(), under both names in the state_dict)
        self.residual_scale, self.outputs_summed_first = cfg.residual_scale, cfg.outputs_summed_first
        self.init_sites(cfg.codebooks, layer, cfg.n_head, cfg.d_head, cfg.d_model)

    def forward(self, x, start, cache=None):
        B, T, _ = x.shape
        heads = self.site("attn", self.attn(self.norm1(x), start, cache))  # (B, T, H, dh): before W_O
        attn = self.post_attn_norm(self.attn.o(heads.reshape(B, T, -1))) * self.residual_scale
        h = x + attn
        mlp = self.post_mlp_norm(self.mlp(self.norm2(x if self.parallel_residual else h)))
        mlp = self.site("mlp", (mlp * self.residual_scale)[:, :, None])[:, :, 0]
        x = (attn + mlp) + x if self.outputs_summed_first else h + mlp
        return self.site("block", x[:, :, None])[:, :, 0]


class Transformer(cb.CodebookModel):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config if isinstance(config, TransformerConfig) else TransformerConfig(**config)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.learned_positions else None
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tied_head:
            self.head.weight = self.tok_emb.weight

    def generate(self, idx, max_new_tokens, *args, **kwargs):
        """codebook.CodebookModel.generate. Under LongRoPE, as transformers' Phi-3 generate, the step whose input first
        reaches past the original context starts afresh (a second call, a new cache): the keys cached so far were rotated
        by the short factors, and the whole sequence is run again with the long ones."""
        scaling = self.config.rotary_scaling
        original = scaling["original_max_position_embeddings"] if scaling.get("rope_type") == "longrope" else None
        # (tokens not (batch, seq) are codebook's generate's one-line error)
        if original is not None and idx.dim() == 2 and idx.shape[1] <= original < idx.shape[1] + max_new_tokens - 1:
            before = original + 1 - idx.shape[1]  # the tokens generated before that step
            idx = super().generate(idx, before, *args, **kwargs)
            return super().generate(idx, max_new_tokens - before, *args, **kwargs)
        return super().generate(idx, max_new_tokens, *args, **kwargs)

    def forward(self, idx, cache=None):
        """idx (batch, seq) integer tokens -> logits (batch, seq, vocab); a cache as codebook.GPT's."""
        start, cfg = self.start_of(idx, cache), self.config
        x = self.tok_emb(idx.long())
        if cfg.embed_scale != 1.0:  # the scale rounded to the weights' dtype first, as transformers' Gemma does
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + idx.shape[1], device=idx.device))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for i, block in enumerate(self.blocks):
            x = block(x, start, None if cache is None else cache.setdefault(i, {}))
        if cache is not None:
            cache["length"] = start + idx.shape[1]
        logits = self.head(self.norm_f(x))
        if cfg.logit_scale != 1.0:
            logits = logits * cfg.logit_scale
        return torch.tanh(logits / cfg.logit_softcap) * cfg.logit_softcap if cfg.logit_softcap else logits


# What codebook.GPTConfig held while it also described the pretrained families: a compact model
# saved then holds them at these values, and loads.
FORMER_FIELDS = dict(attn_scale=None, qkv_bias=True, learned_positions=True, rotary_dims=0, rotary_base=10000.0,
                     parallel_residual=False, gelu="none", ln_eps=1e-5, tied_head=False)


def config_from_dict(config):
    """The config object of a checkpoint's config dict: a TransformerConfig (it names its family) or a
    codebook.GPTConfig, a field the dict lacks (a checkpoint written before the field was added) at its default."""
    return (TransformerConfig if "family" in config else cb.GPTConfig)(**config)


def model_from_config(config):
    """An untrained model of a checkpoint's config dict: a Transformer (it names its family) or a
    codebook.GPT (also one saved with FORMER_FIELDS)."""
    if "family" in config:
        return Transformer(config)
    former = {name: config[name] for name in FORMER_FIELDS if name in config}
    if any(value != FORMER_FIELDS[name] for name, value in former.items()):
        raise ValueError(f"this config ({former}) is a pretrained model saved by an earlier version: "
                         "load the model from its folder or GGUF file again (models.load_pretrained)")
    return cb.GPT({name: value for name, value in config.items() if name not in former})


# ------------------------------------------------------------------------------------------------
# 2. Families. Each maps config.json `c` to TransformerConfig fields and gives its table
# {our module name: theirs} ("{i}" stands for the layer) and the transforms some tensors need
# ({our module name: fn(tensor)}, on weights and biases alike). A family that needs another part
# (Gemma: norms scaling by 1 + weight, norms after attention and MLP, soft-capped scores) adds a
# TransformerConfig field and its few lines to the parts above, never a forward of its own.

GELUS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def _option(c, name, default, allowed, where):
    """config's `name`; a value this module does not implement is a one-line error."""
    value = c.get(name, default)
    if value not in allowed:
        raise ValueError(f"{where}: {name}={value!r} is not implemented (supported: {allowed})")
    return value


def _rope(c, where, dims, default_base=10000.0):
    """The rotary fields of config.json (transformers' rope_parameters, or the older rope_theta +
    rope_scaling); a scaling this module does not implement is a one-line error."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{where}: rope_scaling={rope!r} must be a dict of the rotary embedding's parameters")
    kind = _option(rope, "rope_type", rope.get("type", "default"), ["default", "linear", "llama3", "yarn"], where)
    needs = {"default": [], "linear": ["factor"], "yarn": ["factor", "original_max_position_embeddings"],
             "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}[kind]
    missing = [name for name in needs if name not in rope]
    if missing:
        raise ValueError(f"{where}: rope_type {kind!r} needs {missing}")
    scaling = {"rope_type": kind, **{name: rope[name] for name in needs}} if needs else {}
    if kind == "yarn":
        scaling |= _yarn(rope, c, where)
    return dict(rotary_dims=dims, rotary_base=rope.get("rope_theta", c.get("rope_theta", default_base)),
                rotary_scaling=scaling)


def _partial_rotary(c, where, default):
    """partial_rotary_factor, the share of each head's dims the rotary embedding turns, as transformers reads it: from
    the rope parameters (rope_parameters, or the older rope_scaling), else config.json's top level, else `default`."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    fraction = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", default)) if isinstance(rope, dict) else default
    if not isinstance(fraction, (int, float, fractions.Fraction)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
        raise ValueError(f"{where}: partial_rotary_factor={fraction!r} must be a number from 0 to 1")
    return fraction


def _yarn(rope, c, where):
    """YaRN's factor (if null: the context over the original one), its two ramp ends and its attention
    factor, which multiplies queries and keys (if not given: 0.1 ln(factor) + 1, or the ratio of two such
    terms with mscale and mscale_all_dim), as transformers takes them; truncate False (gpt-oss): the ramp's
    ends not rounded to whole dimensions."""
    truncate = _option(rope, "truncate", True, [True, False], where)
    for name in ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
                 "mscale_all_dim"):
        value = rope.get(name)
        if not (value is None or is_positive_number(value) or value == 0 and name.startswith("mscale")):
            raise ValueError(f"{where}: rope_scaling's {name}={value!r} must be a positive number")
    factor = rope["factor"] or c.get("max_position_embeddings", 0) / rope["original_max_position_embeddings"]
    term = lambda m: 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
    attention = rope.get("attention_factor")
    if attention is None:
        attention = term(rope["mscale"]) / term(rope["mscale_all_dim"]) if rope.get("mscale") and rope.get("mscale_all_dim") else term(1)
    return dict(factor=factor, beta_fast=rope.get("beta_fast") or 32, beta_slow=rope.get("beta_slow") or 1,
                attention_factor=attention) | ({} if truncate else {"truncate": False})


def names(model_level, per_layer, layer_prefix):
    """One table: model-level names as given, each per-layer one under blocks.{i}. and layer_prefix."""
    return model_level | {f"blocks.{{i}}.{ours}": layer_prefix + theirs for ours, theirs in per_layer.items()}


def gpt2(c, where):
    """GPT-2: fused qkv and every matrix stored transposed (Conv1D), tanh GELU (gelu_new), tied embeddings."""
    _option(c, "scale_attn_by_inverse_layer_idx", False, [False], where)
    _option(c, "add_cross_attention", False, [False], where)
    # SantaCoder's original repository: a gpt2 config of remote code, its multi-query attention's weights q_attn and kv_attn
    if c.get("attention_head_type", "multihead") != "multihead":
        raise ValueError(f"{where}: attention_head_type={c['attention_head_type']!r} is remote code's (GPT2CustomConfig, "
                         f"bigcode/santacoder's), not GPT-2's: give its conversion to gpt_bigcode, bigcode/gpt_bigcode-santacoder")
    d, act = c["n_embd"], _option(c, "activation_function", "gelu_new", list(GELUS), where)
    config = dict(vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"], n_head=c["n_head"],
                  d_model=d, d_mlp=c.get("n_inner") or 4 * d, norm_eps=c.get("layer_norm_epsilon", 1e-5),
                  # gelu_new step by step, as transformers computes it (the same bits in bfloat16)
                  activation="gelu_new" if act == "gelu_new" else GELUS[act],
                  attn_scale=None if c.get("scale_attn_weights", True) else 1.0, learned_positions=True,
                  qkv_bias=True, out_bias=True, tied_head=c.get("tie_word_embeddings", True))
    table = names({"tok_emb": "wte", "pos_emb": "wpe", "norm_f": "ln_f", "head": "lm_head"},
                  {"norm1": "ln_1", "norm2": "ln_2", "attn.q": "attn.c_attn", "attn.k": "attn.c_attn",
                   "attn.v": "attn.c_attn", "attn.o": "attn.c_proj", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"},
                  "h.{i}.")
    conv1d = lambda t: t.T if t.dim() == 2 else t  # Conv1D stores (in, out)
    part = lambda i: lambda t: conv1d(t).chunk(3)[i]  # q, k or v of the fused projection
    transforms = {"blocks.{i}.attn.q": part(0), "blocks.{i}.attn.k": part(1), "blocks.{i}.attn.v": part(2),
                  "blocks.{i}.attn.o": conv1d, "blocks.{i}.mlp.up": conv1d, "blocks.{i}.mlp.down": conv1d}
    return config, table, transforms


def gpt_neo(c, where):
    """GPT-Neo: separate q, k, v without bias, no 1/sqrt(d_head) score scaling, the scores in float32
    (attn_scores_float32), local attention (a window of window_size positions) on the layers attention_types marks
    local, gelu_new step by step, tied embeddings."""
    try:  # [[kinds, repeat], ...]; null: transformers' default
        layers = [kind for kinds, repeat in c.get("attention_types") or [[["global", "local"], 12]]
                  for _ in range(repeat) for kind in kinds]
    except (TypeError, ValueError):  # not pairs of a list of kinds and a count
        layers = None
    if layers is None or len(layers) != c["num_layers"] or set(layers) - {"global", "local"}:
        raise ValueError(f"{where}: attention_types {c.get('attention_types')} must give 'global' "
                         f"or 'local' for each of the {c['num_layers']} layers")
    d, act = c["hidden_size"], _option(c, "activation_function", "gelu_new", list(GELUS), where)
    config = dict(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["num_layers"],
                  n_head=c["num_heads"], d_model=d, d_mlp=c.get("intermediate_size") or 4 * d,
                  norm_eps=c.get("layer_norm_epsilon", 1e-5),
                  activation="gelu_new" if act == "gelu_new" else GELUS[act],  # (step by step, as transformers')
                  attn_window=[c.get("window_size", 256) if kind == "local" else 0 for kind in layers],
                  attn_scale=1.0, attn_scores_float32=True, learned_positions=True, out_bias=True,
                  tied_head=c.get("tie_word_embeddings", True))
    table = names({"tok_emb": "wte", "pos_emb": "wpe", "norm_f": "ln_f", "head": "lm_head"},
                  {"norm1": "ln_1", "norm2": "ln_2", "attn.q": "attn.attention.q_proj", "attn.k": "attn.attention.k_proj",
                   "attn.v": "attn.attention.v_proj", "attn.o": "attn.attention.out_proj", "mlp.up": "mlp.c_fc",
                   "mlp.down": "mlp.c_proj"}, "h.{i}.")
    return config, table, {}


def gpt_neox(c, where):
    """GPT-NeoX (Pythia): rotary embeddings on a fraction of each head's dims, no learned positions,
    parallel residual (or not), fused qkv laid out head by head, exact GELU, untied output layer."""
    _option(c, "attention_bias", True, [True], where)
    d, heads = c["hidden_size"], c["num_attention_heads"]
    d_head = d // heads
    rope = c.get("rope_parameters") or {}
    fraction = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", c.get("rotary_pct", 0.25)))
    base = c.get("rotary_emb_base", c.get("rope_theta", 10000.0))  # the family's own name wins, as in transformers
    # a parallel block sums its MLP's and attention's outputs, then adds its input, as transformers' (in bfloat16 not
    # always what adding each in turn gives)
    parallel = c.get("use_parallel_residual", True)
    config = dict(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["num_hidden_layers"],
                  n_head=heads, d_model=d, d_mlp=c["intermediate_size"], norm_eps=c.get("layer_norm_eps", 1e-5),
                  activation=GELUS[_option(c, "hidden_act", "gelu", list(GELUS), where)],
                  **_rope(c | {"rope_theta": base}, where, int(d_head * fraction)), qkv_bias=True, out_bias=True,
                  parallel_residual=parallel, outputs_summed_first=parallel, tied_head=c.get("tie_word_embeddings", False))
    table = names({"tok_emb": "embed_in", "norm_f": "final_layer_norm", "head": "embed_out"},
                  {"norm1": "input_layernorm", "norm2": "post_attention_layernorm", "attn.q": "attention.query_key_value",
                   "attn.k": "attention.query_key_value", "attn.v": "attention.query_key_value", "attn.o": "attention.dense",
                   "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"}, "layers.{i}.")
    return config, table, head_by_head(heads)


def head_by_head(heads):
    """The transforms taking q, k and v (weight or bias) out of one fused tensor laid out head by head: per head its
    q rows, then its k rows, then its v rows (GPT-NeoX's and BLOOM's query_key_value)."""
    part = lambda i: lambda t: t.reshape(heads, 3, -1, *t.shape[1:])[:, i].reshape(-1, *t.shape[1:])
    return {f"blocks.{{i}}.attn.{x}": part(i) for i, x in enumerate("qkv")}


LLAMA_NAMES = names({"tok_emb": "embed_tokens", "norm_f": "norm", "head": "lm_head"},
                    {"norm1": "input_layernorm", "norm2": "post_attention_layernorm",  # the norm before the MLP
                     "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
                     "attn.o": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm",
                     "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}, "layers.{i}.")


def llama(c, where):
    """Llama (SmolLM2, TinyLlama, Llama-3.x), Mistral (attention over a sliding window of the last
    sliding_window positions, where one is set), Qwen2 (biases on q, k, v), Qwen3 (an RMSNorm on
    each head's q and k before the rotary embedding) and SmolLM3 (no rotary embedding on the layers
    no_rope_layers marks 0: by default every fourth): RMSNorm, rotary embedding on whole heads,
    grouped-query attention, SwiGLU MLP."""
    family, n_layer = c["model_type"], c["num_hidden_layers"]
    rotary_on = [1] * n_layer
    if family == "smollm3":
        every = c.get("no_rope_layer_interval", 4)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"{where}: no_rope_layer_interval={every!r} must be a positive integer")
        rotary_on = c.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(n_layer)]
        if len(rotary_on) != n_layer or set(rotary_on) - {0, 1}:
            raise ValueError(f"{where}: no_rope_layers must give 1 (rotary) or 0 (none) for each of the {n_layer} layers")
    _option(c, "hidden_act", "silu", ["silu"], where)
    window = (c.get("sliding_window") or 0) if family == "mistral" else 0
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"{where}: sliding_window={window!r} must be a positive integer, or null for none")
    _option(c, "use_sliding_window", False, [False], where)
    d, heads = c["hidden_size"], c["num_attention_heads"]
    d_head = c.get("head_dim") or d // heads
    bias = c.get("attention_bias", False)
    config = dict(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=n_layer,
                  n_head=heads, n_kv_head=c.get("num_key_value_heads", 4 if family == "smollm3" else None) or heads,
                  d_model=d, d_head=d_head, d_mlp=c["intermediate_size"], norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6),
                  **_rope(c, where, d_head, 2e6 if family == "smollm3" else 10000.0),
                  no_rotary_layers=[i for i, on in enumerate(rotary_on) if not on],
                  qkv_bias=family == "qwen2" or bias, out_bias=family != "qwen2" and bias,
                  qk_norm=family == "qwen3", attn_window=window, mlp="gated", activation="silu",
                  mlp_bias=c.get("mlp_bias", False), tied_head=c.get("tie_word_embeddings", family == "smollm3"))
    return config, LLAMA_NAMES, {}


def mistral(c, where):
    """Mistral: Llama's parts with transformers' Mistral defaults where config.json leaves them out (8 key / value
    heads, a window of 4,096; null: as many as heads, no window)."""
    return llama({"num_key_value_heads": 8, "sliding_window": 4096} | c, where)


def qwen(c, where):
    """Qwen2 and Qwen3: Llama's parts with transformers' defaults where config.json leaves them out (32 key / value
    heads; Qwen3's head_dim 128; null: as many as heads, d_model / n_head)."""
    return llama({"num_key_value_heads": 32} | ({"head_dim": 128} if c["model_type"] == "qwen3" else {}) | c, where)


def ernie4_5(c, where):
    """ERNIE 4.5 (dense, as ERNIE-4.5-0.3B): Llama's parts, but the rotary embedding on interleaved pairs of q and k
    as stored, computed in float32 with float32 tables; use_bias puts a bias on every projection; head_dim 128, 2 key /
    value heads, eps 1e-5 and tied embeddings when config.json leaves them out (transformers' defaults; a null head_dim: d_model /
    n_head, null key / value heads: n_head)."""
    d_head = c.get("head_dim", 128) or c["hidden_size"] // c["num_attention_heads"]
    bias = _option(c, "use_bias", False, [True, False], where)
    config, table, _ = llama(c | {"model_type": "llama", "head_dim": d_head, "attention_bias": bias, "mlp_bias": bias,
                                  "num_key_value_heads": c.get("num_key_value_heads", 2), "rms_norm_eps": c.get("rms_norm_eps", 1e-5),
                                  "tie_word_embeddings": c.get("tie_word_embeddings", True)}, where)
    config |= _rope(c, where, d_head, 500000.0)  # (its default base)
    return config | dict(rotary_interleaved=True, rotary_precision="float32_tables"), table, {}


def arcee(c, where):
    """Arcee (AFM-4.5B): Llama without the MLP's gate, down(relu(up x)^2) (hidden_act relu2); YaRN where set."""
    _option(c, "hidden_act", "relu2", ["relu2"], where)
    config, table, _ = llama(c | {"model_type": "llama", "hidden_act": "silu"}, where)
    return config | dict(mlp="gelu", activation="relu2"), table, {}


APERTUS_NAMES = LLAMA_NAMES | names({}, {"norm1": "attention_layernorm", "norm2": "feedforward_layernorm",
                                        "mlp.act": "mlp.act_fn"}, "layers.{i}.")
# transformers' rotary embedding of Apertus where config.json gives neither rope_parameters nor rope_scaling (its base
# then 12e6, whatever rope_theta says)
APERTUS_ROPE = dict(rope_type="llama3", rope_theta=12000000.0, factor=8.0, original_max_position_embeddings=8192,
                    low_freq_factor=1.0, high_freq_factor=4.0)


def apertus(c, where):
    """Apertus (Apertus-8B / -70B): Llama's attention with an RMSNorm on each head's q and k (Qwen3's), biases on q, k,
    v and W_O where attention_bias says; an MLP without gate or biases, down(xIELU(up x)), the xIELU's parameters learned
    per layer (XIELU); Llama-3's rope scaling by default. Apertus 1.5's text model (apertus1p5_text; the multimodal
    apertus1p5's text_config) is the same where its output layer has a row for every token: one pruned to
    output_vocab_size rows is refused. Where config.json leaves them out, transformers' defaults: as many key / value
    heads as heads, eps 1e-5, untied."""
    _option(c, "hidden_act", "xielu", ["xielu"], where)
    bias = _option(c, "attention_bias", False, [True, False], where)
    rows = c.get("output_vocab_size")
    if c["model_type"] == "apertus1p5_text" and rows not in (None, c["vocab_size"]):
        raise ValueError(f"{where}: output_vocab_size={rows!r}: Apertus 1.5's output layer pruned to fewer rows than its "
                         f"vocabulary of {c['vocab_size']} is not implemented (one vocabulary in and out here)")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or APERTUS_ROPE
    config, _, _ = llama(c | {"model_type": "llama", "hidden_act": "silu", "rope_parameters": rope,
                              "rope_theta": c.get("rope_theta", APERTUS_ROPE["rope_theta"]),
                              "rms_norm_eps": c.get("rms_norm_eps", 1e-5)}, where)
    return config | dict(qk_norm=True, qkv_bias=bias, out_bias=bias, mlp="gelu", activation="xielu", mlp_bias=False), \
        APERTUS_NAMES, {}


def apertus1p5(c, where):
    """A multimodal Apertus 1.5 (apertus1p5: Apertus-v1.5-8B): its text model alone, config.json's text_config
    (apertus1p5_text), the vision and audio tokenizers left out, the output layer tied by the top-level flag (False where
    absent), as transformers ties it."""
    text = c.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{where}: an apertus1p5 config.json needs its language model's config under text_config")
    return apertus({**text, "model_type": "apertus1p5_text", "tie_word_embeddings": c.get("tie_word_embeddings", False)},
                   where)


def helium(c, where):
    """Helium (helium-1-2b, helium-1-preview-2b): Llama's parts with its RMSNorms' weights multiplied in float32
    (norm_weight_float32), the rotary embedding on interleaved pairs of q and k as stored (rotary_interleaved), biases on
    q, k, v where attention_bias says but none on W_O, which is d_model square (n_head * head_dim must be d_model). Where
    config.json leaves them out, transformers' defaults: head_dim 128, 20 key / value heads, eps 1e-8, base 100,000,
    untied; null for either size is refused, as transformers refuses it."""
    for name, default in (("head_dim", 128), ("num_key_value_heads", 20)):
        if c.get(name, default) is None:
            raise ValueError(f"{where}: {name}=None: transformers' helium needs a number (its default: {default})")
    d, heads, d_head = c["hidden_size"], c["num_attention_heads"], c.get("head_dim", 128)
    if heads * d_head != d:
        raise ValueError(f"{where}: num_attention_heads * head_dim = {heads} * {d_head} is not hidden_size={d}: "
                         f"transformers' helium's W_O is hidden_size square")
    bias = _option(c, "attention_bias", False, [True, False], where)
    config, table, _ = llama(c | {"model_type": "llama", "head_dim": d_head, "rms_norm_eps": c.get("rms_norm_eps", 1e-8),
                                  "num_key_value_heads": c.get("num_key_value_heads", 20),
                                  "rope_theta": c.get("rope_theta", 100000.0)}, where)
    return config | dict(norm_weight_float32=True, rotary_interleaved=True, qkv_bias=bias, out_bias=False), table, {}


def seed_oss(c, where):
    """Seed-OSS (Seed-OSS-36B-Base, -Instruct): Llama's parts with biases on q, k and v where attention_bias says (by
    default) and on W_O where attention_out_bias does (by default none); its attention and residual dropouts act in
    training only. Where config.json leaves them out, transformers' defaults: head_dim 128 (null: d_model / n_head), 8 key
    / value heads (null: n_head), eps 1e-6, base 10,000, untied."""
    qkv_bias = _option(c, "attention_bias", True, [True, False], where)
    out_bias = _option(c, "attention_out_bias", False, [True, False], where)
    d_head = c.get("head_dim", 128) or c["hidden_size"] // c["num_attention_heads"]
    config, table, _ = llama(c | {"model_type": "llama", "num_key_value_heads": c.get("num_key_value_heads", 8),
                                  "head_dim": d_head}, where)
    return config | dict(qkv_bias=qkv_bias, out_bias=out_bias), table, {}


def nemotron(c, where):
    """Nemotron (Minitron-4B / -8B, Nemotron-Mini-4B, Nemotron-3-8B converted): Llama's blocks with LayerNorms with bias
    scaling by 1 + weight (LayerNorm1P: norm_plus_one), a ReLU² MLP without gate (up, down), the rotary embedding on
    partial_rotary_factor of each head's dims (by default half), biases on q, k, v and W_O where attention_bias says and
    on the MLP where mlp_bias does, an untied output layer by default."""
    _option(c, "hidden_act", "relu2", ["relu2"], where)
    d, heads = c["hidden_size"], c["num_attention_heads"]
    d_head = c.get("head_dim") or d // heads
    fraction = _partial_rotary(c, where, 0.5)
    attention_bias = _option(c, "attention_bias", False, [True, False], where)
    mlp_bias = _option(c, "mlp_bias", False, [True, False], where)
    config = dict(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["num_hidden_layers"],
                  n_head=heads, n_kv_head=c.get("num_key_value_heads") or heads, d_model=d, d_head=d_head,
                  d_mlp=c["intermediate_size"], norm="layernorm", norm_plus_one=True, norm_eps=c.get("norm_eps", 1e-5),
                  **_rope(c, where, int(d_head * fraction)), qkv_bias=attention_bias, out_bias=attention_bias,
                  mlp="gelu", activation="relu2", mlp_bias=mlp_bias, tied_head=c.get("tie_word_embeddings", False))
    return config, LLAMA_NAMES, {}


def ministral(c, where):
    """Ministral (Ministral-8B-Instruct-2410): Mistral's parts with a window of sliding_window positions on the layers
    layer_types marks sliding (by default all of them where sliding_window is set, none where it is null), full attention
    on the others; no biases, whatever attention_bias or mlp_bias says; where config.json leaves them out, transformers'
    defaults: a window of 4,096, 8 key / value heads. Its head_dim is required (transformers leaves it None, which its
    attention cannot use)."""
    if c.get("head_dim") is None:
        raise ValueError(f"{where}: head_dim={c.get('head_dim')!r}: a ministral config needs it (transformers' "
                         f"MinistralConfig sets no default, and its attention cannot do without one)")
    window = c.get("sliding_window", 4096)
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"{where}: sliding_window={window!r} must be a positive integer, or null for none")
    kind = "sliding_attention" if window else "full_attention"
    layers = _layer_types(c | {"layer_types": c.get("layer_types") or [kind] * c["num_hidden_layers"]}, where, 1)
    config, table, _ = llama(c | {"model_type": "llama", "num_key_value_heads": c.get("num_key_value_heads", 8),
                                  "attention_bias": False, "mlp_bias": False}, where)
    windows = [(window or 0) if layer == "sliding_attention" else 0 for layer in layers]
    return config | dict(attn_window=windows), table, {}


# transformers' rotary embedding of Ministral 3 where config.json gives none
MINISTRAL3_ROPE = dict(rope_type="yarn", rope_theta=1000000.0, factor=16.0, original_max_position_embeddings=16384,
                       beta_fast=32.0, beta_slow=1.0, mscale_all_dim=1.0, mscale=1.0, llama_4_scaling_beta=0.1)


def ministral3(c, where):
    """Ministral 3 (ministral3: the text models of Ministral-3-3B / -8B / -14B): Mistral's parts (a window on every layer
    where sliding_window sets one; by default none), YaRN by default, and each query, after the rotary embedding, scaled
    by its position as Llama-4's (rope_parameters' llama_4_scaling_beta and original_max_position_embeddings, which
    transformers requires); no biases; where config.json leaves them out, transformers' defaults: head_dim 128, 8 key /
    value heads, eps 1e-5."""
    rope = c.get("rope_parameters") or MINISTRAL3_ROPE
    if not isinstance(rope, dict):
        raise ValueError(f"{where}: rope_parameters={rope!r} must be a dict of the rotary embedding's parameters")
    beta, period = rope.get("llama_4_scaling_beta"), rope.get("original_max_position_embeddings")
    if not (beta == 0 or is_positive_number(beta)):
        raise ValueError(f"{where}: rope_parameters' llama_4_scaling_beta={beta!r} must be a number, 0 or more: "
                         f"transformers' ministral3 scales its queries by it")
    if beta and (not isinstance(period, int) or isinstance(period, bool) or period < 1):
        raise ValueError(f"{where}: rope_parameters' original_max_position_embeddings={period!r} must be a positive "
                         f"integer: transformers' ministral3 scales its queries by the position over it")
    d_head = c.get("head_dim", 128) or c["hidden_size"] // c["num_attention_heads"]
    config, table, _ = llama(c | {"model_type": "mistral", "rope_parameters": rope, "head_dim": d_head,
                                  "num_key_value_heads": c.get("num_key_value_heads", 8),
                                  "rms_norm_eps": c.get("rms_norm_eps", 1e-5), "attention_bias": False,
                                  "mlp_bias": False}, where)
    return config | dict(query_scale_beta=beta, query_scale_period=period if beta else 0), table, {}


def mistral3(c, where):
    """A multimodal Mistral 3 (mistral3: Ministral-3-3B / -8B / -14B, Mistral-Small-3.1 / -3.2, as released): its text
    model alone, config.json's text_config (ministral3, or mistral, transformers' default where it names none), the
    vision tower and projector left out; the output layer tied by the top-level flag (True where absent), as
    transformers ties it, not by text_config's."""
    text = c.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{where}: a mistral3 config.json needs its language model's config under text_config")
    kind = text.get("model_type", "mistral")
    if kind not in ("ministral3", "mistral"):
        raise ValueError(f"{where}: text_config's model_type {kind!r} is not implemented in a mistral3 (supported: "
                         f"ministral3, mistral)")
    return FAMILIES[kind]({**text, "model_type": kind, "tie_word_embeddings": c.get("tie_word_embeddings", True)}, where)

PHI3_NAMES = LLAMA_NAMES | names({}, {"attn.q": "self_attn.qkv_proj", "attn.k": "self_attn.qkv_proj", "attn.v": "self_attn.qkv_proj",
                                     "mlp.gate": "mlp.gate_up_proj", "mlp.up": "mlp.gate_up_proj"}, "layers.{i}.")


def phi3(c, where):
    """Phi-3 and Phi-4: Mistral's parts (a sliding window where one is set), with q, k and v stored as one
    matrix and the MLP's gate and up as another, and the rotary embedding on partial_rotary_factor of
    each head's dims; LongRoPE, the scaling of the long-context models (Phi-3-128k, Phi-3.5, Phi-4-mini),
    as transformers reads it (_longrope)."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    # (transformers reads Phi-3's older types "su" and "yarn" as LongRoPE)
    longrope = isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("longrope", "su", "yarn")
    base = {"rope_parameters": {"rope_theta": rope.get("rope_theta", c.get("rope_theta", 10000.0))}} if longrope else {}
    config, _, _ = llama(c | base | {"model_type": "mistral", "rms_norm_eps": c.get("rms_norm_eps", 1e-5)}, where)
    fraction = _partial_rotary(c, where, 1.0)
    config["rotary_dims"] = int(config["d_head"] * fraction)
    if longrope:
        config["rotary_scaling"] = _longrope(rope, c, where, config["rotary_dims"])
    q, kv = config["n_head"] * config["d_head"], config["n_kv_head"] * config["d_head"]
    rows = lambda start, size: lambda t: t[start:start + size]
    return config, PHI3_NAMES, {"blocks.{i}.attn.q": rows(0, q), "blocks.{i}.attn.k": rows(q, kv),
                                "blocks.{i}.attn.v": rows(q + kv, kv), "blocks.{i}.mlp.gate": lambda t: t.chunk(2)[0],
                                "blocks.{i}.mlp.up": lambda t: t.chunk(2)[1]}


GLM_NAMES = LLAMA_NAMES | names({}, {"mlp.gate": "mlp.gate_up_proj", "mlp.up": "mlp.gate_up_proj"}, "layers.{i}.")
GLM4_NAMES = GLM_NAMES | names({}, {"post_attn_norm": "post_self_attn_layernorm", "post_mlp_norm": "post_mlp_layernorm"},
                               "layers.{i}.")


def glm(c, where):
    """GLM (glm: glm-4-9b-hf, glm-4-9b-chat-hf) and GLM-4 (glm4: GLM-4-0414, GLM-Z1): Llama's parts with the MLP's gate
    and up stored as one matrix (gate_up_proj, gate first), biases on q, k and v where attention_bias (its default) but
    none on W_O, and the rotary embedding on interleaved pairs of each head's first partial_rotary_factor of dims (by
    default half), q and k as stored; GLM-4 norms what attention and the MLP add before adding it too
    (post_self_attn_layernorm, post_mlp_layernorm). Where config.json leaves them out, transformers' defaults: head_dim
    128 (null: d_model / n_head), 2 key / value heads (null: n_head), eps 1.5625e-7, untied."""
    fraction = _partial_rotary(c, where, 0.5)
    bias = _option(c, "attention_bias", True, [True, False], where)
    d_head = c.get("head_dim", 128) or c["hidden_size"] // c["num_attention_heads"]
    config, _, _ = llama(c | {"model_type": "llama", "head_dim": d_head, "mlp_bias": False,
                              "num_key_value_heads": c.get("num_key_value_heads", 2),
                              "rms_norm_eps": c.get("rms_norm_eps", 1.5625e-7),
                              "tie_word_embeddings": c.get("tie_word_embeddings", False)}, where)
    config |= dict(rotary_dims=int(d_head * fraction), rotary_interleaved=True, qkv_bias=bias, out_bias=False,
                   sandwich_norms=c["model_type"] == "glm4")
    return config, GLM4_NAMES if c["model_type"] == "glm4" else GLM_NAMES, {
        "blocks.{i}.mlp.gate": lambda t: t.chunk(2)[0], "blocks.{i}.mlp.up": lambda t: t.chunk(2)[1]}


# EXAONE 3.x as its checkpoints name Llama's parts (transformers renames them as it loads: conversion_mapping's "exaone")
EXAONE_NAMES = names({"tok_emb": "wte", "norm_f": "ln_f", "head": "lm_head"},
                     {"norm1": "ln_1", "norm2": "ln_2", "attn.q": "attn.attention.q_proj", "attn.k": "attn.attention.k_proj",
                      "attn.v": "attn.attention.v_proj", "attn.o": "attn.attention.out_proj", "mlp.gate": "mlp.c_fc_0",
                      "mlp.up": "mlp.c_fc_1", "mlp.down": "mlp.c_proj"}, "h.{i}.")
# config.json's EXAONE names, which transformers' ExaoneConfig maps onto Llama's (attribute_map): they win where both are
EXAONE_ALIASES = {"num_hidden_layers": "num_layers", "rms_norm_eps": "layer_norm_epsilon", "hidden_act": "activation_function"}


def exaone(c, where):
    """EXAONE 3.0 and 3.5 (exaone: EXAONE-3.0-7.8B, EXAONE-3.5-2.4B / -7.8B / -32B): Llama, as transformers computes it
    (LlamaForCausalLM), its weights under EXAONE's names (EXAONE_NAMES; Llama's where saved in transformers' own layout),
    config.json's num_layers, layer_norm_epsilon and activation_function read as num_hidden_layers, rms_norm_eps and
    hidden_act; where config.json leaves them out, transformers' defaults: 8 key / value heads (null: n_head), eps 1e-5,
    base 500,000, untied."""
    if "activation_function" in c:  # (named as config.json names it)
        _option(c, "activation_function", "silu", ["silu"], where)
    c = c | {name: c[alias] for name, alias in EXAONE_ALIASES.items() if alias in c}
    config, _, _ = llama(c | {"model_type": "llama", "num_key_value_heads": c.get("num_key_value_heads", 8),
                              "rms_norm_eps": c.get("rms_norm_eps", 1e-5)}, where)
    return config | _rope(c, where, config["d_head"], 500000.0), EXAONE_NAMES, {}


def exaone4(c, where):
    """EXAONE 4.0 (exaone4: EXAONE-4.0-1.2B, -32B): OLMo-2's blocks (normed after attention and the MLP, not before), an
    RMSNorm on each head's queries and keys before the rotary embedding (Qwen3's), no biases whatever attention_bias says.
    With sliding_window set, a window on the layers layer_types marks sliding (by default all but every
    sliding_window_pattern-th) and the rotary embedding on those alone; with it null, full attention and the rotary
    embedding on every layer. Where config.json leaves them out, transformers' defaults: 32 key / value heads (null:
    n_head), eps 1e-5, base 10,000, a window of 4,096 on three layers in four, untied. What transformers' Exaone4Config
    or its attention fails on is refused: no layer_types with a null window or a pattern other than a positive integer
    (such as "LLLG"), sliding layers with a null window."""
    window = c.get("sliding_window", 4096)
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"{where}: sliding_window={window!r} must be a positive integer, or null for none")
    if window is None and not c.get("layer_types"):
        raise ValueError(f"{where}: sliding_window=null without layer_types: transformers' Exaone4Config cannot build "
                         f"the layer types (from a pattern of 0); give layer_types")
    layers = _layer_types(c, where, c.get("sliding_window_pattern", 4))
    if window is None and "sliding_attention" in layers:
        raise ValueError(f"{where}: layer_types marks sliding layers but sliding_window is null: transformers' exaone4 "
                         f"cannot build their mask")
    config, _, _ = llama(c | {"model_type": "llama", "num_key_value_heads": c.get("num_key_value_heads", 32),
                              "rms_norm_eps": c.get("rms_norm_eps", 1e-5), "attention_bias": False, "mlp_bias": False},
                         where)
    sliding = [kind == "sliding_attention" for kind in layers]
    config |= dict(qk_norm=True, pre_norms=False, sandwich_norms=True, attn_window=[window if s else 0 for s in sliding],
                   no_rotary_layers=[i for i, s in enumerate(sliding) if window and not s])  # global layers: no rotary
    return config, OLMO2_NAMES, {}


def _longrope(rope, c, where, dims):
    """LongRoPE's fields as transformers' Phi-3 takes them: a short and a long factor for each rotary frequency;
    original_max_position_embeddings, the context it was pretrained for, from config.json's top level (where
    transformers takes it, before the rope dict's); the attention factor, which multiplies queries and keys (if
    not given: sqrt(1 + ln(factor) / ln(original context)) for a factor over 1, else 1; the factor, if not given,
    the context over the original one)."""
    original = c.get("original_max_position_embeddings")
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise ValueError(f"{where}: LongRoPE needs original_max_position_embeddings, the context the model was pretrained "
                         f"for (4096 in Phi-3 and Phi-4), a positive integer at the top level, where transformers reads it "
                         f"(not in rope_scaling); it is {original!r}")
    for name in ("short_factor", "long_factor"):
        factors = rope.get(name)
        if not isinstance(factors, list) or len(factors) != dims // 2:
            size = f"{len(factors)} numbers" if isinstance(factors, list) else repr(factors)
            raise ValueError(f"{where}: rope_scaling's {name} must list one factor for each of the {dims // 2} rotary "
                             f"frequencies (half the rotary dims); it is {size}")
    for name in ("factor", "attention_factor"):
        if not (rope.get(name) is None or is_positive_number(rope[name])):
            raise ValueError(f"{where}: rope_scaling's {name}={rope[name]!r} must be a positive number")
    factor = rope.get("factor") or c["max_position_embeddings"] / original
    attention = rope.get("attention_factor")
    if attention is None:
        attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    return dict(rope_type="longrope", short_factor=rope["short_factor"], long_factor=rope["long_factor"],
                original_max_position_embeddings=original, attention_factor=attention)


def _layer_types(c, where, every):
    """config.json's layer_types, by default "full_attention" on every `every`-th layer and
    "sliding_attention" on the others."""
    n_layer, layers = c["num_hidden_layers"], c.get("layer_types")
    if not layers:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"{where}: sliding_window_pattern={every!r} must be a positive integer")
        layers = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layer)]
    if len(layers) != n_layer or set(layers) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"{where}: layer_types must give 'sliding_attention' or 'full_attention' for each of the {n_layer} layers")
    return layers


def _rope_by_layer_type(c, where, d_head, base, local_base):
    """(the rotary fields of the full-attention layers, the rotary base of the sliding-window ones, which
    are never scaled) from transformers' rope parameters per layer type, or from one set of them: then
    the sliding layers' base is local_base."""
    rope = c.get("rope_parameters") or {}
    if "full_attention" not in rope:
        return _rope(c, where, d_head, base), local_base
    local = rope.get("sliding_attention") or {}
    _option(local, "rope_type", "default", ["default"], f"{where} (sliding_attention)")
    return _rope(c | {"rope_parameters": rope["full_attention"]}, where, d_head, base), local.get("rope_theta", local_base)


OLMO2_NAMES = LLAMA_NAMES | names({}, {"post_attn_norm": "post_attention_layernorm",
                                      "post_mlp_norm": "post_feedforward_layernorm"}, "layers.{i}.")


def olmo2(c, where):
    """OLMo-2: Llama's parts, but normed after attention and the MLP rather than before, and with one
    RMSNorm over all heads' queries (and one over all keys) before the rotary embedding. OLMo-3 as
    well, with attention over a sliding window on the layers layer_types marks (by default three in
    four), which rotate by their own base, unscaled."""
    config, _, _ = llama(c | {"model_type": "llama", "rms_norm_eps": c.get("rms_norm_eps", 1e-5)}, where)
    config |= dict(qk_norm=True, qk_norm_across_heads=True, pre_norms=False, sandwich_norms=True,
                   norm_weight_float32=True, rotary_precision="float32_tables")  # where its transformers rounds
    if c["model_type"] == "olmo3":
        # transformers' default base, which its sliding layers also take where config.json gives one base for all
        rotary, local_base = _rope_by_layer_type(c, where, config["d_head"], c.get("rope_theta", 500000.0), 500000.0)
        window = c.get("sliding_window", 4096)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"{where}: sliding_window={window!r} must be a positive integer")
        config |= rotary | dict(local_rotary_base=local_base, attn_window=[window if kind == "sliding_attention" else 0
                                                                         for kind in _layer_types(c, where, 4)])
    return config, OLMO2_NAMES, {}


# a mixture of experts' router, its experts' matrices ({j}: the expert, stored one by one and stacked as loaded) and
# Qwen2-MoE's shared expert; its dense layers' MLP (Qwen's mlp_only_layers) is LLAMA_NAMES'
MOE_NAMES = LLAMA_NAMES | names({}, {"mlp.router": "mlp.gate", "mlp.experts.gate": "mlp.experts.{j}.gate_proj",
                                    "mlp.experts.up": "mlp.experts.{j}.up_proj", "mlp.experts.down": "mlp.experts.{j}.down_proj",
                                    "mlp.shared.gate": "mlp.shared_expert.gate_proj", "mlp.shared.up": "mlp.shared_expert.up_proj",
                                    "mlp.shared.down": "mlp.shared_expert.down_proj",
                                    "mlp.shared_gate": "mlp.shared_expert_gate"}, "layers.{i}.")
MIXTRAL_NAMES = LLAMA_NAMES | names({}, {"mlp.router": "block_sparse_moe.gate",
                                        "mlp.experts.gate": "block_sparse_moe.experts.{j}.w1",
                                        "mlp.experts.up": "block_sparse_moe.experts.{j}.w3",
                                        "mlp.experts.down": "block_sparse_moe.experts.{j}.w2"}, "layers.{i}.")


# transformers 5's own layout of a mixture (what it holds in memory, and what save_pretrained(save_original_format=False)
# writes and from_pretrained reads): each matrix of all experts as one (expert, out, in) tensor, named without .weight,
# gate and up as one gate_up_proj (all gate rows first); Mixtral's block_sparse_moe named mlp
MOE_FUSED = re.compile(r"\.mlp\.experts\.(gate_up|down)_proj$")
MOE_FUSED_NAMES = names({}, {"mlp.router": "mlp.gate", "mlp.experts.gate": "mlp.experts.gate_up_proj",
                             "mlp.experts.up": "mlp.experts.gate_up_proj", "mlp.experts.down": "mlp.experts.down_proj"},
                        "layers.{i}.")
MOE_FUSED_TRANSFORMS = {f"blocks.{{i}}.mlp.experts.{x}": (lambda i: lambda t: t.chunk(2, dim=1)[i])(i)
                        for i, x in enumerate(("gate", "up"))}


def moe(c, where):
    """Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE: the attention of Mistral (a window where sliding_window sets
    one), Qwen2 (biases on q, k, v unless qkv_bias is false), Qwen3 (an RMSNorm on each head's q and k) and
    OLMoE (Llama's, with an RMSNorm over all heads' queries and one over all keys, as OLMo-2's, then q, k, v
    clamped to clip_qkv), pre-norms, and a sparse mixture of SwiGLU experts (MoE) for the MLP:
    num_experts_per_tok of them per token, their router probabilities renormalised in Mixtral and where
    norm_topk_prob is set; Qwen2-MoE's gated shared expert too. Qwen's MLP is dense (of intermediate_size) on
    mlp_only_layers and on the layers decoder_sparse_step skips (or all, with no experts), as in transformers."""
    family = c["model_type"]
    attention = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3", "olmoe": "llama"}[family]
    defaults = dict(rms_norm_eps=1e-5 if family in ("mixtral", "olmoe") else 1e-6,
                    rope_theta=1e6 if family == "mixtral" else 10000.0)  # transformers' own (Mixtral's rotary base)
    config, _, _ = llama(defaults | c | {"model_type": attention}, where)
    n_layer, experts = c["num_hidden_layers"], c.get("num_experts", c.get("num_local_experts"))
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 0:
        raise ValueError(f"{where}: num_experts={experts!r} must be a non-negative integer")
    dense = []
    if family in ("qwen2_moe", "qwen3_moe"):
        step, only = c.get("decoder_sparse_step", 1), c.get("mlp_only_layers") or []
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"{where}: decoder_sparse_step={step!r} must be a positive integer")
        if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
            raise ValueError(f"{where}: mlp_only_layers={only!r} must list layers (whole numbers)")
        dense = [i for i in range(n_layer) if i in only or not (experts and (i + 1) % step == 0)]
    if family == "qwen2_moe":
        config["qkv_bias"] = c.get("qkv_bias", True)
    if len(dense) < n_layer:
        config |= dict(experts=experts, experts_used=c["num_experts_per_tok"], dense_layers=dense,
                       d_expert=c["moe_intermediate_size" if family.startswith("qwen") else "intermediate_size"],
                       experts_renormalised=family == "mixtral" or c.get("norm_topk_prob", False),
                       d_shared_expert=c["shared_expert_intermediate_size"] if family == "qwen2_moe" else 0)
    if family == "olmoe":
        config |= dict(qk_norm=True, qk_norm_across_heads=True, qkv_clip=c.get("clip_qkv") or 0.0)
    return config, MIXTRAL_NAMES if family == "mixtral" else MOE_NAMES, {}


# gpt-oss: its sinks a parameter of the attention (self_attn.sinks); router and experts with biases, each expert matrix of
# all experts as one tensor stored (expert, in, out), gate and up as one gate_up_proj, their columns interleaved
GPT_OSS_NAMES = LLAMA_NAMES | names({}, {"attn": "self_attn", "mlp.router": "mlp.router", "mlp.experts.gate": "mlp.experts.gate_up_proj",
                                        "mlp.experts.up": "mlp.experts.gate_up_proj",
                                        "mlp.experts.down": "mlp.experts.down_proj"}, "layers.{i}.")
# transformers' default rotary embedding of gpt-oss (GptOssConfig's rope_parameters when config.json gives none)
GPT_OSS_ROPE = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                    original_max_position_embeddings=4096, rope_theta=150000.0)


def gpt_oss(c, where):
    """OpenAI's gpt-oss: Llama's pre-norm blocks with biases on q, k, v and W_O, a learned sink logit per
    head in each softmax's denominator, sliding-window and full attention layers alternating (layer_types),
    YaRN (not truncated) on whole heads; the MLP a mixture of experts whose router (with a bias) chooses
    num_experts_per_tok by their logits and weighs them by a softmax over those, each expert with biases and
    the clamped SwiGLU (swiglu_limit, swiglu_alpha). Its experts stored in MXFP4 are dequantised as loaded
    (gpt_oss_weights)."""
    n_layer, d, heads = c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"]
    d_head = c.get("head_dim", 64) or d // heads  # left out: GptOssConfig's 64 (null: hidden_size / heads)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or GPT_OSS_ROPE
    window = c.get("sliding_window", 128) or 0
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"{where}: sliding_window={window!r} must be a positive integer, or null for none")
    experts, used = c.get("num_local_experts", c.get("num_experts", 128)), c.get("num_experts_per_tok", 4)
    bias = c.get("attention_bias", True)
    config = dict(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=n_layer, n_head=heads,
                  n_kv_head=c.get("num_key_value_heads", 8) or heads, d_model=d, d_head=d_head, d_mlp=c["intermediate_size"],
                  norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-5), norm_weight_float32=True,
                  **_rope(c | {"rope_parameters": rope}, where, d_head, 150000.0), qkv_bias=bias, out_bias=bias,
                  attn_window=[window if kind == "sliding_attention" else 0 for kind in _layer_types(c, where, 2)],
                  attn_sinks=True, mlp="gated", activation="silu", mlp_bias=False, experts=experts, experts_used=used,
                  d_expert=c["intermediate_size"], experts_renormalised=True, experts_bias=True, router_top_logits=True,
                  swiglu_limit=c.get("swiglu_limit", 7.0), swiglu_alpha=c.get("swiglu_alpha", 1.702),
                  tied_head=c.get("tie_word_embeddings", False))
    columns = lambda i: lambda t: (t.transpose(1, 2) if t.dim() == 3 else t)[:, i::2]  # gate: the even, up: the odd
    return config, GPT_OSS_NAMES, {"blocks.{i}.mlp.experts.gate": columns(0), "blocks.{i}.mlp.experts.up": columns(1),
                                   "blocks.{i}.mlp.experts.down": lambda t: t.transpose(1, 2) if t.dim() == 3 else t}


GPT_OSS_EXPERTS = re.compile(r"^(.*\.mlp\.experts\.(?:gate_up|down)_proj)(_bias|_blocks|_scales)?$")


def gpt_oss_weights(tensors, where):
    """gpt-oss's expert tensors under names build reads: gate_up_proj as gate_up_proj.weight, gate_up_proj_bias as
    gate_up_proj.bias (down_proj's alike); stored in MXFP4 (gate_up_proj_blocks and _scales, as the released
    checkpoints), dequantised (formats.dequantise_mxfp4) and laid out (expert, in, out) as transformers does."""
    renamed, quantised = {}, {}
    for name, load in tensors.items():
        match = GPT_OSS_EXPERTS.match(name)
        if not match:
            renamed[name] = load
        elif match[2] in ("_blocks", "_scales"):
            quantised.setdefault(match[1], {})[match[2]] = load
        else:
            renamed[match[1] + (".bias" if match[2] else ".weight")] = load
    last = {}  # the matrix last dequantised: gate and up both read gate_up_proj, one after the other (not twice)

    def load(name, parts):
        if name not in last:
            last.clear()
            last[name] = _dequantised_experts(name, parts, where)
        return last[name]

    for name, parts in quantised.items():
        if len(parts) != 2:
            raise ValueError(f"{where}: {name}{'_scales' if '_blocks' in parts else '_blocks'} is missing, which its "
                             f"MXFP4 weight needs; download it again")
        renamed[name + ".weight"] = (lambda name, parts: lambda: load(name, parts))(name, parts)
    return renamed


def _dequantised_experts(name, parts, where):
    """gpt-oss's expert matrix `name` of its MXFP4 _blocks (expert, out, G, 16) and _scales (expert, out, G), laid out
    (expert, in, out); a malformed pair is one ValueError line naming them and the folder."""
    blocks, scales = parts["_blocks"](), parts["_scales"]()
    try:
        if blocks.dim() != 4:
            raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} must be (expert, out, G, 16)")
        return formats.dequantise_mxfp4(blocks, scales).transpose(1, 2)
    except ValueError as e:
        raise ValueError(f"{where}: {name}_blocks and {name}_scales: {e}; download them again") from None


GEMMA_NAMES = LLAMA_NAMES | names({}, {"norm2": "pre_feedforward_layernorm", "post_attn_norm": "post_attention_layernorm",
                                        "post_mlp_norm": "post_feedforward_layernorm"}, "layers.{i}.")
# transformers' defaults for what a Gemma config.json may leave out (the multimodal Gemma-3s' text_config leaves out most)
GEMMA_DEFAULTS = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=256, max_position_embeddings=131072, rms_norm_eps=1e-6,
                        rope_theta=1_000_000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                        final_logit_softcapping=None, attn_logit_softcapping=None)}


def gemma(c, where):
    """Gemma-2 and Gemma-3 (gemma3_text; a multimodal gemma3's text_config): RMSNorm scaling by
    (1 + weight) in float32 (norm_plus_one); the embedding times sqrt(d_model); GeGLU MLP; scores
    scaled by query_pre_attn_scalar^-1/2; sandwich norms; sliding-window layers (Gemma-2: every
    other one, Gemma-3: five in six) with, in Gemma-3, their own unscaled rotary base and an RMSNorm
    on each head's q and k; Gemma-2's tanh soft-capping of attention scores and logits. Gemma (1) is
    Gemma-2 without the windows, the soft-caps and the norms after attention and the MLP, its scores
    scaled by head_dim^-1/2."""
    if c["model_type"] == "gemma3":
        if not isinstance(c.get("text_config"), dict):
            raise ValueError(f"{where}: a gemma3 config.json needs its language model's config under text_config")
        # transformers ties the output layer by the top-level flag (True when absent), not text_config's
        c = {"model_type": "gemma3_text", **c["text_config"], "tie_word_embeddings": c.get("tie_word_embeddings", True)}
    family = c["model_type"]
    c = GEMMA_DEFAULTS[family] | c
    gemma1 = family == "gemma"
    if gemma1:  # what transformers' Gemma (1) has not, whatever config.json says
        c |= dict(query_pre_attn_scalar=c["head_dim"], layer_types=None, attn_logit_softcapping=None, final_logit_softcapping=None)
    # Gemma (1)'s activation is hidden_act, whose "gelu" (its releases' config.json) transformers takes for tanh's
    act = _option(c, "hidden_act" if gemma1 else "hidden_activation", "gelu_pytorch_tanh", list(GELUS), where)
    activation = GELUS["gelu_pytorch_tanh" if gemma1 and act == "gelu" else act]
    _option(c, "use_bidirectional_attention", False, [False, None], where)
    n_layer, d, d_head = c["num_hidden_layers"], c["hidden_size"], c["head_dim"]
    every = 1 if gemma1 else 2 if family == "gemma2" else c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6))
    layers = _layer_types(c, where, every)  # every layer global in Gemma (1)
    rotary, local_base = _rope_by_layer_type(c, where, d_head, c["rope_theta"], c.get("rope_local_base_freq", 10000.0))
    config = dict(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=n_layer,
                  n_head=c["num_attention_heads"], n_kv_head=c["num_key_value_heads"], d_model=d, d_head=d_head,
                  d_mlp=c["intermediate_size"], norm="rmsnorm", norm_eps=c["rms_norm_eps"], **rotary,
                  local_rotary_base=local_base if family == "gemma3_text" else 0.0,
                  qkv_bias=c.get("attention_bias", False), out_bias=c.get("attention_bias", False),
                  qk_norm=family == "gemma3_text", attn_scale=c["query_pre_attn_scalar"] ** -0.5,
                  attn_window=[c["sliding_window"] if kind == "sliding_attention" else 0 for kind in layers],
                  attn_softcap=(c["attn_logit_softcapping"] or 0.0) if family == "gemma2" else 0.0,  # Gemma-3 has none
                  logit_softcap=c["final_logit_softcapping"] or 0.0,
                  embed_scale=d ** 0.5, sandwich_norms=not gemma1, mlp="gated", activation=activation, mlp_bias=False,
                  tied_head=c.get("tie_word_embeddings", True),
                  norm_plus_one=True)
    return config, LLAMA_NAMES if gemma1 else GEMMA_NAMES, {}


def granite(c, where):
    """Granite (IBM's granite-3.x dense models): Llama's parts, with the token embedding times
    embedding_multiplier, scores scaled by attention_multiplier (not 1/sqrt(d_head)), what attention and
    the MLP add to the residual stream times residual_multiplier, and the logits divided by logits_scaling."""
    config, _, _ = llama(c | {"model_type": "llama"}, where)
    scales = {name: c.get(name, 1.0) for name in ("embedding_multiplier", "attention_multiplier", "residual_multiplier",
                                                   "logits_scaling")}
    for name, value in scales.items():
        if not is_positive_number(value):
            raise ValueError(f"{where}: {name}={value!r} must be a positive number")
    return config | dict(embed_scale=scales["embedding_multiplier"], attn_scale=scales["attention_multiplier"],
                         residual_scale=scales["residual_multiplier"], logit_scale=1 / scales["logits_scaling"]), LLAMA_NAMES, {}


COHERE_NAMES = LLAMA_NAMES | names({}, {"norm2": "input_layernorm"}, "layers.{i}.")  # one norm before attention and MLP


def cohere(c, where):
    """Command-R (Cohere; Aya-23) and Command-R7B (Cohere2): LayerNorms without bias, computed step by step as
    transformers' (norm_stepwise); attention and a SwiGLU MLP in parallel, both reading the block's input through one
    norm; the logits times logit_scale; a tied output layer; the rotary embedding on interleaved pairs of dims
    (2i, 2i + 1) of q and k as stored (rotary_interleaved: q . k summed in transformers' order); Cohere's optional
    use_qk_norm (a LayerNorm on each head's q and k, each head with its own weight). Cohere2: attention over a
    sliding window on the layers layer_types marks (by default three in four), the others global and without the
    rotary embedding."""
    family, d, heads = c["model_type"], c["hidden_size"], c["num_attention_heads"]
    _option(c, "hidden_act", "silu", ["silu"], where)
    d_head = d // heads if family == "cohere2" else c.get("head_dim") or d // heads
    n_kv_head = c.get("num_key_value_heads") or heads
    bias, qk_norm = c.get("attention_bias", False), family == "cohere" and c.get("use_qk_norm", False)
    config = dict(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["num_hidden_layers"],
                  n_head=heads, n_kv_head=n_kv_head, d_model=d, d_head=d_head, d_mlp=c["intermediate_size"],
                  norm="layernorm_nobias", norm_stepwise=True, norm_eps=c.get("layer_norm_eps", 1e-5),
                  # transformers' default base: Cohere's config 500000, Cohere2's none of its own (10000)
                  **_rope(c, where, d_head, 10000.0 if family == "cohere2" else 500000.0),
                  qkv_bias=bias, out_bias=bias, qk_norm=qk_norm, qk_layernorm=qk_norm, mlp="gated", activation="silu",
                  mlp_bias=False, parallel_residual=True, shared_norm=True, logit_scale=c.get("logit_scale", 0.0625),
                  rotary_precision="float32", rotary_interleaved=True,  # (transformers rotates Cohere's q and k in float32)
                  tied_head=c.get("tie_word_embeddings", True))
    if family == "cohere2":
        window = c.get("sliding_window", 4096)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"{where}: sliding_window={window!r} must be a positive integer")
        layers = _layer_types(c, where, c.get("sliding_window_pattern", 4))
        config |= dict(attn_window=[window if kind == "sliding_attention" else 0 for kind in layers],
                       no_rotary_layers=[i for i, kind in enumerate(layers) if kind == "full_attention"])
    return config, COHERE_NAMES, {}


STABLELM_NAMES = LLAMA_NAMES | names({}, {"attn.q_norm": "self_attn.q_layernorm", "attn.k_norm": "self_attn.k_layernorm"},
                                     "layers.{i}.")


def stablelm(c, where):
    """StableLM (StableLM-2, its Zephyr, StableLM-2-12B): Llama's parts with LayerNorms (with bias), the
    rotary embedding on partial_rotary_factor of each head's dims, optional biases on q, k and v
    (use_qkv_bias), and optionally a parallel residual whose MLP reads the attention's normed input
    (use_parallel_residual) and a LayerNorm without bias on each head's q and k, each head with its own
    (qk_layernorm; stored as one nn.LayerNorm per head, stacked here by stablelm_weights)."""
    _option(c, "hidden_act", "silu", ["silu"], where)
    d, heads = c["hidden_size"], c["num_attention_heads"]
    d_head = d // heads  # whatever head_dim says
    fraction = _partial_rotary(c, where, 0.25)
    parallel, qk_norm = c.get("use_parallel_residual", False), c.get("qk_layernorm", False)
    config = dict(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["num_hidden_layers"],
                  n_head=heads, n_kv_head=c.get("num_key_value_heads") or heads, d_model=d, d_head=d_head,
                  d_mlp=c["intermediate_size"], norm="layernorm", norm_eps=c.get("layer_norm_eps", 1e-5),
                  **_rope(c, where, int(d_head * fraction)), qkv_bias=c.get("use_qkv_bias", False), qk_norm=qk_norm,
                  qk_layernorm=qk_norm, mlp="gated", activation="silu", mlp_bias=False, parallel_residual=parallel,
                  shared_norm=parallel, tied_head=c.get("tie_word_embeddings", False))
    return config, STABLELM_NAMES | (names({}, {"norm2": "input_layernorm"}, "layers.{i}.") if parallel else {}), {}


def stablelm_weights(tensors):
    """StableLM-2-12B's per-head q and k LayerNorms (self_attn.q_layernorm.norms.{h}.weight) as one
    (heads, d_head) weight per layer, as llama.cpp's converter stacks them."""
    stacked, per_head = {}, re.compile(r"^(.*\.self_attn\.[qk]_layernorm)\.norms\.(\d+)\.weight$")
    for name in tensors:
        if match := per_head.match(name):
            stacked.setdefault(match[1] + ".weight", {})[int(match[2])] = tensors[name]
    if not stacked:
        return tensors
    kept = {name: load for name, load in tensors.items() if not per_head.match(name)}
    return kept | {name: (lambda heads: lambda: torch.stack([heads[h]() for h in sorted(heads)]))(heads)
                   for name, heads in stacked.items()}


# Phi: attention and the MLP both read input_layernorm; W_O is dense, the MLP fc1 and fc2, the last norm final_layernorm
PHI_NAMES = names({"tok_emb": "embed_tokens", "norm_f": "final_layernorm", "head": "lm_head"},
                  {"norm1": "input_layernorm", "norm2": "input_layernorm", "attn.q": "self_attn.q_proj",
                   "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj", "attn.o": "self_attn.dense",
                   "mlp.up": "mlp.fc1", "mlp.down": "mlp.fc2"}, "layers.{i}.")


def phi(c, where):
    """Phi-1, Phi-1.5 and Phi-2: LayerNorms with bias; attention and a GELU MLP (tanh's, as gelu_new computes it)
    in parallel, both reading the block's input through one norm, their outputs summed before the residual is
    added; the rotary embedding on partial_rotary_factor of each head's dims; biases on q, k, v, W_O, the MLP
    and the output layer. qk_layernorm (a LayerNorm on q and k, which no released Phi has) is not implemented."""
    _option(c, "qk_layernorm", False, [False], where)
    d, heads = c["hidden_size"], c["num_attention_heads"]
    d_head = c.get("head_dim") or d // heads
    fraction = _partial_rotary(c, where, 0.5)
    act = _option(c, "hidden_act", "gelu_new", list(GELUS), where)
    config = dict(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["num_hidden_layers"],
                  n_head=heads, n_kv_head=c.get("num_key_value_heads") or heads, d_model=d, d_head=d_head,
                  d_mlp=c["intermediate_size"], norm="layernorm", norm_eps=c.get("layer_norm_eps", 1e-5),
                  **_rope(c, where, int(d_head * fraction)), qkv_bias=True, out_bias=True,
                  # gelu_new step by step, as transformers computes it (the same bits in bfloat16)
                  activation="gelu_new" if act == "gelu_new" else GELUS[act],
                  parallel_residual=True, shared_norm=True, outputs_summed_first=True, head_bias=True,
                  tied_head=c.get("tie_word_embeddings", False))
    return config, PHI_NAMES, {}


# GPT-J: attention and the MLP both read ln_1; W_O is out_proj, the MLP fc_in and fc_out
GPTJ_NAMES = names({"tok_emb": "wte", "norm_f": "ln_f", "head": "lm_head"},
                   {"norm1": "ln_1", "norm2": "ln_1", "attn.q": "attn.q_proj", "attn.k": "attn.k_proj",
                    "attn.v": "attn.v_proj", "attn.o": "attn.out_proj", "mlp.up": "mlp.fc_in", "mlp.down": "mlp.fc_out"},
                   "h.{i}.")


def gptj(c, where):
    """GPT-J (GPT-J-6B): Phi's block (attention and a GELU MLP in parallel, both reading the block's input through one
    LayerNorm, their outputs summed before the residual is added; gelu_new step by step), without biases on q, k, v
    and W_O, with them on the MLP and the output layer; the rotary embedding (base 10,000) on each head's first
    rotary_dim dims, on interleaved pairs (2i, 2i + 1), q and k as stored (rotary_interleaved), the head's other dims
    left as they are."""
    d, heads = c["n_embd"], c["n_head"]
    rotary = c.get("rotary_dim", 64)
    # (null: transformers' table spans n_embd dims, which fits a model of one head only)
    if not isinstance(rotary, int) or isinstance(rotary, bool) or rotary < 1:
        raise ValueError(f"{where}: rotary_dim={rotary!r} must be a positive integer")
    act = _option(c, "activation_function", "gelu_new", list(GELUS), where)
    config = dict(vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"], n_head=heads, d_model=d,
                  d_mlp=c.get("n_inner") or 4 * d, norm="layernorm", norm_eps=c.get("layer_norm_epsilon", 1e-5),
                  rotary_dims=rotary, rotary_frequencies_float32=True, rotary_interleaved=True, qkv_bias=False, out_bias=False,
                  activation="gelu_new" if act == "gelu_new" else GELUS[act],
                  parallel_residual=True, shared_norm=True, outputs_summed_first=True, head_bias=True,
                  tied_head=c.get("tie_word_embeddings", False))
    return config, GPTJ_NAMES, {}


def gpt_bigcode(c, where):
    """GPT-BigCode (StarCoder, StarCoderBase, tiny_starcoder, gpt_bigcode-santacoder; not bigcode/santacoder, a gpt2
    config of remote code, refused by gpt2()): GPT-2's blocks (learned positions, LayerNorms,
    biases on all but the tied output layer, tanh's GELU by default) with nn.Linear's (out, in) matrices and, with
    multi_query (the released models), one key / value head for all query heads, c_attn's rows all q, then k's, then
    v's; without it a key / value head per query head, c_attn's rows head by head (each head's q, k, v in turn).
    attention_softmax_in_fp32 and scale_attention_softmax_in_fp32 are accepted either way: transformers 5 reads them
    and computes the same (its attention functions never look at them)."""
    multi_query = _option(c, "multi_query", True, [True, False], where)
    for name in ("attention_softmax_in_fp32", "scale_attention_softmax_in_fp32"):
        _option(c, name, True, [True, False], where)
    config, table, _ = gpt2(c | {"activation_function": c.get("activation_function", "gelu_pytorch_tanh")}, where)
    d, heads = config["d_model"], config["n_head"]
    if not multi_query:
        return config | dict(n_kv_head=heads), table, head_by_head(heads)
    sizes = [d, d // heads, d // heads]
    part = lambda i: lambda t: t.split(sizes)[i]  # q, k or v (weight or bias)
    return config | dict(n_kv_head=1), table, {f"blocks.{{i}}.attn.{x}": part(i) for i, x in enumerate("qkv")}


STARCODER2_NAMES = LLAMA_NAMES | names({}, {"mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}, "layers.{i}.")


def starcoder2(c, where):
    """StarCoder2: Llama's pre-norm blocks with LayerNorms (with bias), biases on q, k, v, W_O and the MLP
    (use_bias), a GELU MLP without gate (c_fc, c_proj), attention over a sliding window where sliding_window
    sets one, grouped-query attention, the rotary embedding on whole heads."""
    d, heads = c["hidden_size"], c["num_attention_heads"]
    d_head = c.get("head_dim") or d // heads
    window = c.get("sliding_window") or 0
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"{where}: sliding_window={window!r} must be a positive integer, or null for none")
    bias = _option(c, "use_bias", True, [True, False], where)
    config = dict(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["num_hidden_layers"],
                  n_head=heads, n_kv_head=c.get("num_key_value_heads", 2) or heads, d_model=d, d_head=d_head,
                  d_mlp=c["intermediate_size"], norm="layernorm", norm_eps=c.get("norm_epsilon", 1e-5),
                  **_rope(c, where, d_head), qkv_bias=bias, out_bias=bias, attn_window=window, mlp="gelu",
                  activation=GELUS[_option(c, "hidden_act", "gelu_pytorch_tanh", list(GELUS), where)], mlp_bias=bias,
                  tied_head=c.get("tie_word_embeddings", True))
    return config, STARCODER2_NAMES, {}


def olmo(c, where):
    """OLMo (1) (e.g. allenai/OLMo-1B-hf): Llama's blocks with LayerNorms without weight or bias (eps 1e-5, whatever
    config.json says) computed in float32, q, k and v clamped to +-clip_qkv where it is set, the rotary embedding's
    cosines and sines kept in float32, biases on q, k, v and W_O where attention_bias says."""
    _option(c, "hidden_act", "silu", ["silu"], where)
    d, heads = c["hidden_size"], c["num_attention_heads"]
    d_head = c.get("head_dim") or d // heads
    bias = c.get("attention_bias", False)
    config = dict(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["num_hidden_layers"],
                  n_head=heads, n_kv_head=c.get("num_key_value_heads") or heads, d_model=d, d_head=d_head,
                  d_mlp=c["intermediate_size"], norm="layernorm_noparams", norm_eps=1e-5, **_rope(c, where, d_head),
                  rotary_precision="float32_tables", qkv_bias=bias, out_bias=bias, qkv_clip=c.get("clip_qkv") or 0.0,
                  mlp="gated", activation="silu", mlp_bias=False, tied_head=c.get("tie_word_embeddings", False))
    return config, LLAMA_NAMES, {}


BLOOM_NAMES = names({"tok_emb": "word_embeddings", "embed_norm": "word_embeddings_layernorm", "norm_f": "ln_f", "head": "lm_head"},
                    {"norm1": "input_layernorm", "norm2": "post_attention_layernorm",
                     "attn.q": "self_attention.query_key_value", "attn.k": "self_attention.query_key_value",
                     "attn.v": "self_attention.query_key_value", "attn.o": "self_attention.dense",
                     "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"}, "h.{i}.")


def bloom(c, where):
    """BLOOM (bigscience/bloom-560m to bloom, bloomz): no positions but ALiBi (maximum bias 8), a LayerNorm on the
    token embedding, LayerNorms with bias, q, k and v fused head by head (as GPT-NeoX), biases everywhere, BLOOM's
    tanh GELU in an MLP of 4 d_model, a tied output layer. Its context: seq_length where config.json gives it, else
    BLOOM's 2,048 (transformers sets none). pretraining_tp with slow_but_exact, which only sums W_O's and the MLP's
    products in slices (rounding otherwise), is left out; apply_residual_connection_post_layernorm (the residual
    taken after each norm), which no released BLOOM has, is not implemented."""
    _option(c, "apply_residual_connection_post_layernorm", False, [False], where)
    d = c["n_embed"] if c.get("n_embed") is not None else c["hidden_size"]  # (transformers: n_embed, where given, wins)
    heads = c["n_head"] if "n_head" in c else c["num_attention_heads"]
    config = dict(vocab_size=c["vocab_size"], block_size=c.get("seq_length") or 2048,
                  n_layer=c["n_layer"] if "n_layer" in c else c["num_hidden_layers"], n_head=heads, d_model=d, d_mlp=4 * d,
                  norm_eps=c.get("layer_norm_epsilon", 1e-5), attn_scale=1 / math.sqrt(d // heads), alibi=8.0,
                  embed_norm=True, qkv_bias=True, out_bias=True, activation="gelu_bloom",
                  tied_head=c.get("tie_word_embeddings", True))
    return config, BLOOM_NAMES, head_by_head(heads)


MPT_NAMES = names({"tok_emb": "wte", "norm_f": "norm_f", "head": "lm_head"},
                  {"norm1": "norm_1", "norm2": "norm_2", "attn.q": "attn.Wqkv", "attn.k": "attn.Wqkv", "attn.v": "attn.Wqkv",
                   "attn.o": "attn.out_proj", "mlp.up": "ffn.up_proj", "mlp.down": "ffn.down_proj"}, "blocks.{i}.")


def mpt(c, where):
    """MPT (mosaicml/mpt-7b, -30b and their finetunes): no positions but ALiBi, LayerNorms without bias, no biases, q, k
    and v fused (all q rows, then k, then v) and clamped to +-clip_qkv where it is set, scores scaled by softmax_scale
    where it is set, an exact-GELU MLP of expansion_ratio d_model (transformers' MPT builds 4 d_model whatever it says,
    and loads no other), a tied output layer. What transformers' MPT leaves out of the computation whatever config.json
    says, and MosaicML's own code computes, is refused where it would change the model: an alibi_bias_max other than 8,
    alibi false (positions instead), qk_ln (LayerNorms on q and k), grouped or multi-query attention (attn_type), prefix_lm
    (its generate lets the prompt attend both ways), a sliding window (llm-foundry's sliding_window_size), an RMSNorm
    (norm_type), biases (no_bias false) and logit_scale. learned_pos_emb is ignored, as transformers ignores it (mpt-7b's
    config.json says true and holds no position embedding), and so are attn_uses_sequence_id (used in training only)
    and attn_impl."""
    attn = c.get("attn_config") or {}
    if not isinstance(attn, dict):
        raise ValueError(f"{where}: attn_config={attn!r} must be a dict of the attention's settings")
    for name, default, allowed in (("alibi", True, [True]), ("alibi_bias_max", 8, [8]), ("qk_ln", False, [False]),
                                   ("attn_type", "multihead_attention", ["multihead_attention"]), ("prefix_lm", False, [False]),
                                   ("sliding_window_size", -1, [-1])):
        _option(attn, name, default, allowed, f"{where}: attn_config")
    _option(c, "norm_type", "low_precision_layernorm", ["low_precision_layernorm", "layernorm"], where)
    _option(c, "no_bias", True, [True], where)
    _option(c, "logit_scale", None, [None], where)
    d, heads, ratio = c["d_model"], c["n_heads"], c.get("expansion_ratio", 4)
    if not isinstance(ratio, (int, float, fractions.Fraction)) or isinstance(ratio, bool) or ratio <= 0:
        raise ValueError(f"{where}: expansion_ratio={ratio!r} must be a positive number")
    config = dict(vocab_size=c["vocab_size"], block_size=c.get("max_seq_len", 2048), n_layer=c["n_layers"], n_head=heads,
                  d_model=d, d_mlp=int(ratio * d), norm="layernorm_nobias", norm_eps=c.get("layer_norm_epsilon", 1e-5),
                  attn_scale=1 / math.sqrt(d / heads) if attn.get("softmax_scale") is None else attn["softmax_scale"], alibi=8.0,
                  qkv_clip=attn.get("clip_qkv") or 0.0, activation="gelu", mlp_bias=False,
                  tied_head=c.get("tie_word_embeddings", True))
    third = lambda i: lambda t: t.chunk(3)[i]
    return config, MPT_NAMES, {f"blocks.{{i}}.attn.{x}": third(i) for i, x in enumerate("qkv")}


FALCON_NAMES = names({"tok_emb": "word_embeddings", "norm_f": "ln_f", "head": "lm_head"},
                     {"norm1": "input_layernorm", "norm2": "post_attention_layernorm",
                      "attn.q": "self_attention.query_key_value", "attn.k": "self_attention.query_key_value",
                      "attn.v": "self_attention.query_key_value", "attn.o": "self_attention.dense",
                      "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"}, "h.{i}.")


def falcon(c, where):
    """Falcon (falcon-7b, -40b, -180B, Falcon-11B, falcon-rw-1b and -7b): LayerNorms with bias, q, k and v fused, a GELU MLP
    of ffn_hidden_size (4 d_model), biases (added after each product, as its FalconLinear adds them) where bias says, a tied
    output layer unless tie_word_embeddings says otherwise; the rotary embedding on whole heads, or ALiBi (alibi: BLOOM's
    slopes, the bias rounded to bfloat16 as its transformers rounds it). Three layouts, as transformers' Falcon reads
    config.json: new_decoder_architecture (40B, 180B, 11B): num_kv_heads key / value heads, query_key_value's rows in
    groups of a key / value head's queries, then its key, then its value; attention and the MLP in parallel, reading
    ln_attn and ln_mlp (num_ln_in_parallel_attn 2, its default) or both input_layernorm (1: Falcon-11B). Else multi_query
    (7B): one key / value head, all q rows, then k's, then v's; or a key / value head per query head, rows head by head
    (RW). parallel_attn: attention and the MLP in parallel from input_layernorm (7B), their outputs summed before the
    residual; or in turn, the MLP reading post_attention_layernorm (RW). What transformers does not compute is refused:
    apply_residual_connection_post_layernorm (the remote code's), parallel_attn false with new_decoder_architecture, ln_attn
    and ln_mlp without it; RefinedWeb's older names (n_head, n_layer, n_head_kv) where the newer are absent, which
    transformers 5 does not read (it would take its defaults)."""
    _option(c, "apply_residual_connection_post_layernorm", False, [False], where)
    for old, new in (("n_head", "num_attention_heads"), ("n_layer", "num_hidden_layers"), ("n_head_kv", "num_kv_heads")):
        if old in c and new not in c:
            raise ValueError(f"{where}: {old} is RefinedWeb's older name of {new}, which transformers 5 does not read "
                             f"(it takes its default instead): write it as {new}")
    d = c["n_embed"] if c.get("n_embed") is not None else c["hidden_size"]  # (transformers: n_embed, where given, wins)
    heads = c["num_attention_heads"]
    if d % heads:
        raise ValueError(f"{where}: hidden_size={d} must be a multiple of num_attention_heads={heads}")
    new_layout, multi_query, parallel, alibi, bias = (_option(c, name, default, [True, False], where) for name, default in (
        ("new_decoder_architecture", False), ("multi_query", True), ("parallel_attn", True), ("alibi", False), ("bias", False)))
    kv, norms = c.get("num_kv_heads") or heads, 1
    if new_layout:
        _option(c, "parallel_attn", True, [True], f"{where}: with new_decoder_architecture")
        norms = _option(c, "num_ln_in_parallel_attn", None, [None, 1, 2], where) or 2
    elif parallel:
        norms = _option(c, "num_ln_in_parallel_attn", None, [None, 1], f"{where}: without new_decoder_architecture")
    if not new_layout and not multi_query and kv != heads:
        raise ValueError(f"{where}: num_kv_heads={kv} is not num_attention_heads={heads}: without new_decoder_architecture "
                         f"or multi_query, query_key_value holds a key / value head per query head")
    n_kv_head = kv if new_layout else 1 if multi_query else heads
    d_head = d // heads
    act = _option(c, "activation", "gelu", list(GELUS), where)
    config = dict(vocab_size=c["vocab_size"], block_size=c.get("max_position_embeddings", 2048), n_layer=c["num_hidden_layers"],
                  n_head=heads, n_kv_head=n_kv_head, d_model=d, d_head=d_head, d_mlp=c.get("ffn_hidden_size") or 4 * d, norm="layernorm",
                  norm_eps=c.get("layer_norm_epsilon", 1e-5), attn_scale=1 / math.sqrt(d_head),
                  **(dict(alibi=8.0) if alibi else _rope(c, where, d_head)), qkv_bias=bias, out_bias=bias, mlp_bias=bias,
                  activation="gelu_new" if act == "gelu_new" else GELUS[act],
                  parallel_residual=new_layout or parallel, outputs_summed_first=new_layout or parallel,
                  shared_norm=(new_layout or parallel) and norms != 2, tied_head=c.get("tie_word_embeddings", True))
    table = FALCON_NAMES
    if config["shared_norm"]:
        table = table | names({}, {"norm2": "input_layernorm"}, "h.{i}.")
    elif new_layout:
        table = table | names({}, {"norm1": "ln_attn", "norm2": "ln_mlp"}, "h.{i}.")
    if new_layout:  # per key / value head: its queries' rows, then its key's, then its value's
        group = lambda i: lambda t: t.reshape(kv, -1, d_head, *t.shape[1:])[:, i].reshape(-1, *t.shape[1:])
        return config, table, {"blocks.{i}.attn.q": group(slice(0, -2)), "blocks.{i}.attn.k": group(-2),
                               "blocks.{i}.attn.v": group(-1)}
    if multi_query:
        sizes = [d, d_head, d_head]
        return config, table, {f"blocks.{{i}}.attn.{x}": (lambda i: lambda t: t.split(sizes)[i])(i) for i, x in enumerate("qkv")}
    return config, table, head_by_head(heads)


def gemma3_text_weights(tensors):
    """A multimodal Gemma-3's, Mistral 3's or Apertus 1.5's language-model weights, named as its ...ForCausalLM's (the
    vision tower and projector, or tokenizers, left out)."""
    text = re.compile(r"^(model\.)?language_model\.")
    return {text.sub("", name): t for name, t in tensors.items() if text.match(name) or name == "lm_head.weight"}


FAMILIES = {"gpt2": gpt2, "gpt_neo": gpt_neo, "gpt_neox": gpt_neox, "llama": llama, "mistral": mistral, "qwen2": qwen,
            "qwen3": qwen, "smollm3": llama, "olmo2": olmo2, "olmo3": olmo2, "phi3": phi3, "gemma": gemma, "gemma2": gemma,
            "gemma3_text": gemma, "gemma3": gemma, "granite": granite, "cohere": cohere, "cohere2": cohere,
            "stablelm": stablelm, "mixtral": moe, "qwen2_moe": moe, "qwen3_moe": moe, "olmoe": moe, "gpt_oss": gpt_oss,
            "phi": phi, "starcoder2": starcoder2, "olmo": olmo,
            "gptj": gptj, "gpt_bigcode": gpt_bigcode, "bloom": bloom, "mpt": mpt, "ernie4_5": ernie4_5, "arcee": arcee,
            "nemotron": nemotron, "ministral": ministral, "ministral3": ministral3, "mistral3": mistral3, "glm": glm,
            "glm4": glm, "falcon": falcon, "apertus": apertus, "apertus1p5_text": apertus, "apertus1p5": apertus1p5,
            "helium": helium, "seed_oss": seed_oss, "exaone": exaone, "exaone4": exaone4}


# ------------------------------------------------------------------------------------------------
# 3. Loading.

BUFFERS = re.compile(r"\.(attn|attention)\.bias$|\.masked_bias$|\.inv_freq$")  # saved masks and tables, not weights


class Weights(dict):
    """A file's tensors by name (the base model's prefix removed), each read (in float32) when asked
    for, from {name: a function reading it}; a missing one is a ValueError."""

    def __init__(self, loaders, where):
        super().__init__()
        for name, load in loaders.items():
            self[re.sub(r"^(transformer|gpt_neox|model)\.", "", name)] = load
        self.where, self.used = where, set()

    def __missing__(self, name):
        raise ValueError(f"{self.where}: weight {name!r} is missing; download it again")

    def __getitem__(self, name):
        self.used.add(name)
        return super().__getitem__(name)().float()


def build(config, family, weights, table, transforms, codebooks=None, block_size=None):
    """A Transformer of `config` (TransformerConfig fields) with each of its weights taken from
    `weights` as `table` and `transforms` say, one at a time; every weight there must be used, every
    shape fit."""
    if block_size is not None:
        if not 1 <= block_size <= config["block_size"]:
            raise ValueError(f"block_size {block_size} must be between 1 and the model's context, {config['block_size']}")
        config["block_size"] = block_size
    head = table["head"] + ".weight"
    if head not in weights and "lm_head.weight" in weights:  # GPT-NeoX's embed_out, as transformers 5 names it in memory
        table, head = table | {"head": "lm_head"}, "lm_head.weight"
    embedding = table["tok_emb"] + ".weight"
    if config.get("tied_head") and head in weights and not torch.equal(weights[head], weights[embedding]):
        config = dict(config, tied_head=False)  # as transformers: a stored output layer unlike the embedding is used
    if not config.get("tied_head") and head not in weights:
        raise ValueError(f"{weights.where}: there is no output layer ({head}): the weights are of a model without its "
                         f"language-model head; give a causal language model (e.g. ...ForCausalLM)")
    model = Transformer(dict(config, family=family, codebooks=codebooks or {}))
    ours = {name: p for name, p in model.state_dict().items() if ".codebooks." not in name}  # the parameters' storage
    for name, param in ours.items():
        if name == "head.weight" and config.get("tied_head"):
            continue
        module, kind = name.rsplit(".", 1)
        layer = re.match(r"blocks\.(\d+)\.", module)
        template = re.sub(r"^blocks\.\d+\.", "blocks.{i}.", module)
        theirs = table[template].format(i=layer[1] if layer else "", j="{j}") + "." + kind
        if "{j}" in theirs:  # a mixture's experts, stored one by one: stacked, expert j as row j
            stored = torch.stack([weights[theirs.format(j=j)] for j in range(param.shape[0])])
        else:
            stored = weights[theirs]
        try:
            tensor = transforms.get(template, lambda t: t)(stored)
        except RuntimeError:  # a reshape the stored shape does not fit: the config's sizes are not the weights'
            tensor = None
        if name == "pos_emb.weight":
            tensor = tensor[:config["block_size"]]  # positions past a shorter context are dropped
        if tensor is None or tensor.shape != param.shape:
            raise ValueError(f"{weights.where}: {theirs} has shape {tuple(stored.shape)}, which does not fit "
                             f"the model its configuration describes ({name}: {tuple(param.shape)})")
        param.copy_(tensor)
    unused = [n for n in weights if n not in weights.used and not (n == head and config.get("tied_head"))
              and not BUFFERS.search(n)]
    if unused:
        raise ValueError(f"{weights.where}: weights {unused[:3]} are not part of a {family} model this module knows")
    return model.eval()


def read_config(folder):
    """config.json of a model folder, checked to be one of FAMILIES."""
    path = os.path.join(folder, "config.json")
    if os.path.isfile(folder):
        raise ValueError(f"{folder} is a file but not a GGUF file: give a Hugging Face model folder or a GGUF file")
    if not os.path.isdir(folder):
        raise ValueError(f"model folder {folder} does not exist")
    if not os.path.isfile(path):
        gguf = sorted(name for name in os.listdir(folder) if name.lower().endswith(".gguf"))
        raise ValueError(f"{folder} has no config.json: give the folder a Hugging Face model was downloaded or saved to"
                         + (f", or the GGUF file itself: {os.path.join(folder, gguf[0])}" if gguf else ""))
    c = formats.read_json(path)
    if c.get("model_type") in ("RefinedWeb", "RefinedWebModel"):
        raise ValueError(f"{path}: model_type {c['model_type']!r} is Falcon's first remote code (RWForCausalLM), which "
                         f"transformers 5 does not read: give the model as its repository holds it now (model_type falcon)")
    if not isinstance(c.get("model_type"), str) or c["model_type"] not in FAMILIES:
        raise ValueError(f"{path}: model_type {c.get('model_type')!r} is not supported (supported: {', '.join(FAMILIES)})")
    # a rope_scaling added by hand to a config.json that transformers 5 saved (with rope_parameters): transformers then
    # takes the rope_scaling in place of the rope_parameters, and so does this module
    for part in (c, c.get("text_config")):
        if isinstance(part, dict) and part.get("rope_scaling") and part.get("rope_parameters"):
            del part["rope_parameters"]
    mxfp4 = c["model_type"] == "gpt_oss" and isinstance(c.get("quantization_config"), dict) and \
        c["quantization_config"].get("quant_method") == "mxfp4"  # gpt-oss's experts, dequantised as loaded
    if "quantization_config" in c and not mxfp4:
        method = c["quantization_config"].get("quant_method", "?") if isinstance(c["quantization_config"], dict) else "?"
        raise ValueError(f"{path}: the weights are quantised ({method}), which this module does not read: give the "
                         f"model's unquantised folder, or a GGUF file of it")
    return c


# the sizes the families divide by or multiply with before TransformerConfig checks them (GPT-2's and GPT-Neo's names
# too); the optional ones may be null (the family's default)
SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "n_embd", "n_head", "n_layer", "num_heads", "num_layers",
         "d_model", "n_heads", "n_layers")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "n_embed", "num_kv_heads", "ffn_hidden_size")


def family_config(c, where):
    """FAMILIES' (TransformerConfig fields, table, transforms) of config `c`; a field the family needs
    and `c` lacks, or a size that is not a positive integer, is a one-line error."""
    for name in [name for name in SIZES + OPTIONAL_SIZES if name in c]:  # (not a crash in a family's arithmetic)
        value = c[name]
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0 or value is None and name in OPTIONAL_SIZES):
            raise ValueError(f"{where}: {name}={value!r} must be a positive integer"
                             + (", or null for the model's default" if name in OPTIONAL_SIZES else ""))
    try:
        config, table, transforms = FAMILIES[c["model_type"]](c, where)
    except KeyError as e:
        raise ValueError(f"{where}: field {e.args[0]!r} is missing, which a {c['model_type']} model needs; "
                         f"download the model again") from None
    try:
        TransformerConfig(**config)  # every field checked before any weight is read
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    return config, table, transforms


def from_pretrained(path, codebooks=None, block_size=None):
    """A Transformer (eval mode, float32, on the CPU) computing the model of a Hugging Face folder
    or a GGUF file; with `codebooks` ({site: CodebookSpec fields}) they are added, untrained.
    block_size: a shorter context than the model's (learned positions past it are dropped)."""
    if is_gguf(path):
        return from_gguf(path, codebooks, block_size)
    c = read_config(path)
    config, table, transforms = family_config(c, f"{path}/config.json")
    tensors = formats.weight_loaders(path)
    if c["model_type"] in ("gemma3", "mistral3", "apertus1p5"):
        tensors = gemma3_text_weights(tensors)
    if c["model_type"] == "stablelm":
        tensors = stablelm_weights(tensors)
    if c["model_type"] == "gpt_oss":
        tensors = gpt_oss_weights(tensors, path)
    if c["model_type"] == "exaone" and "model.embed_tokens.weight" in tensors:  # saved in transformers' own layout
        table = LLAMA_NAMES
    if FAMILIES[c["model_type"]] is moe and any(MOE_FUSED.search(name) for name in tensors):
        tensors = {name + ".weight" if MOE_FUSED.search(name) else name: load for name, load in tensors.items()}
        table, transforms = table | MOE_FUSED_NAMES, transforms | MOE_FUSED_TRANSFORMS
    return build(config, c["model_type"], Weights(tensors, path), table, transforms, codebooks, block_size)


def load_pretrained(path, codebooks=None, block_size=None):
    """(model, tokenizer) of a Hugging Face model folder or a GGUF file, checked against each other."""
    if is_gguf(path):
        info = formats.read_gguf_info(path)
        vocab_size = gguf_config(info.metadata, {name: t.shape for name, t in info.tensors.items()}, path)["vocab_size"]
        try:
            tokenizer = bpe.check_tokenizer(bpe.tokenizer_from_gguf(info.metadata), vocab_size, path)
        except ValueError as e:
            raise ValueError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
        return from_gguf(path, codebooks, block_size, info), tokenizer
    c = read_config(path)
    vocab_size = family_config(c, f"{path}/config.json")[0]["vocab_size"]
    tokenizer = bpe.check_tokenizer(bpe.load_tokenizer(path), vocab_size, path)
    return from_pretrained(path, codebooks, block_size), tokenizer


# A GGUF file (llama.cpp's format) names the same tensors its own way and stores its sizes as
# metadata "{architecture}.{key}"; they are read into a config.json, so each family is described once.

GGUF_NAMES = names({"tok_emb": "token_embd", "norm_f": "output_norm", "head": "output"},
                   {"norm1": "attn_norm", "norm2": "ffn_norm", "attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v",
                    "attn.o": "attn_output", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
                    "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down",
                    "post_attn_norm": "post_attention_norm", "post_mlp_norm": "post_ffw_norm",
                    "mlp.act": "xielu"}, "blk.{i}.")  # (Apertus's xIELU parameters: from_gguf makes them of the metadata)
# a mixture of experts (MOE_NAMES): each matrix of all experts as one 3-D tensor (expert, out, in), router and shared
# expert's gate kept F32 by the converter
GGUF_NAMES |= names({}, {"mlp.router": "ffn_gate_inp", "mlp.experts.gate": "ffn_gate_exps", "mlp.experts.up": "ffn_up_exps",
                         "mlp.experts.down": "ffn_down_exps", "mlp.shared.gate": "ffn_gate_shexp", "mlp.shared.up": "ffn_up_shexp",
                         "mlp.shared.down": "ffn_down_shexp", "mlp.shared_gate": "ffn_gate_inp_shexp"}, "blk.{i}.")
GGUF_CONFIG = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",  # config.json: GGUF key
               "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
               "max_position_embeddings": "context_length"}
GGUF_PHI3_NAMES = GGUF_NAMES | names({}, {"attn.q": "attn_qkv", "attn.k": "attn_qkv", "attn.v": "attn_qkv", "mlp.gate": "ffn_up",
                                           "mlp.up": "ffn_up"}, "blk.{i}.")  # fused as in its config.json folder
# GPT-2 and GPT-NeoX: q, k and v in one tensor, all q rows, then all k, then all v (the converter reorders GPT-NeoX's
# head-by-head rows so, and transposes GPT-2's Conv1D matrices to nn.Linear's layout)
GGUF_QKV_NAMES = GGUF_NAMES | names({"pos_emb": "position_embd"}, {f"attn.{x}": "attn_qkv" for x in "qkv"}, "blk.{i}.")
# BLOOM and MPT: q, k and v in one tensor as GPT-2's (the converter reorders BLOOM's head-by-head rows so); BLOOM's
# embedding norm token_embd_norm
GGUF_QKV_NAMES |= {"embed_norm": "token_embd_norm"}
GGUF_ARCHITECTURES = ("gpt2", "gptneox", "llama", "qwen2", "qwen3", "smollm3", "olmo2", "phi3", "gemma", "gemma2", "gemma3",
                      "granite", "command-r", "cohere2", "stablelm", "qwen2moe", "qwen3moe", "olmoe", "gpt-oss", "phi2",
                      "starcoder2", "olmo", "gptj", "starcoder", "bloom", "mpt", "ernie4_5", "arcee", "nemotron", "glm4", "chatglm",
                      "falcon", "apertus", "seed_oss", "exaone", "exaone4")
# the architectures with LayerNorms (the others' are RMSNorms)
LAYERNORM_ARCHITECTURES = ("gpt2", "gptneox", "command-r", "cohere2", "stablelm", "phi2", "starcoder2", "olmo", "gptj",
                           "starcoder", "bloom", "mpt", "nemotron", "falcon")
# the architectures with experts, as the families name them (llama with experts is Mixtral), and whether llama.cpp's graph
# renormalises the chosen experts' weights (it reads no key for it: build_moe_ffn's norm_w, fixed per architecture)
# (gpt-oss's weights, a softmax over the chosen experts' logits, sum to 1 either way)
GGUF_MOE = {"llama": ("mixtral", True), "qwen2moe": ("qwen2_moe", False), "qwen3moe": ("qwen3_moe", True),
            "olmoe": ("olmoe", False), "gpt-oss": ("gpt_oss", False)}


def is_gguf(path):
    """Whether `path` is a GGUF file: named *.gguf, or starting with b"GGUF" whatever its name (ollama
    keeps its models as blobs without a suffix). A *.gguf that does not exist is a one-line error."""
    if os.path.isdir(path):
        return False
    if str(path).endswith(".gguf"):
        if not os.path.isfile(path):
            raise ValueError(f"GGUF file {path} does not exist")
        return True
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def gguf_config(metadata, shapes, path):
    """config.json's fields from a GGUF file's metadata and {tensor name: shape}; an architecture or
    option not implemented is a one-line error."""
    arch = metadata.get("general.architecture")
    parts, part = metadata.get("split.count", 1), metadata.get("split.no", 0)
    if not isinstance(parts, int) or not isinstance(part, int):
        raise ValueError(f"{path}: metadata split.count = {parts!r} and split.no = {part!r} must be integers")
    if parts > 1:
        raise ValueError(f"{path} is part {part + 1} of {parts} of a split "
                         f"GGUF file: merge the parts into one first (llama-gguf-split --merge {path} merged.gguf)")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})")

    def get(key, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None or isinstance(value, list):
            raise ValueError(f"{path}: metadata {arch}.{key} is {'missing' if value is None else 'a list (per layer)'}: "
                             f"the file is not a {arch} model this module can read")
        return value

    def count(key, default=None, least=1):  # a whole number of at least `least`
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{path}: metadata {arch}.{key} = {value!r} must be a "
                             f"{'positive' if least else 'non-negative'} integer")
        return value

    c = {name: count(key) for name, key in GGUF_CONFIG.items()} | {"model_type": arch}
    experts = count("expert_count", 0, least=0)
    if experts and arch not in GGUF_MOE:
        raise ValueError(f"{path}: a mixture-of-experts {arch} model ({arch}.expert_count = {experts}) is not supported "
                         f"(mixtures of experts: {', '.join(GGUF_MOE)})")
    if arch in GGUF_MOE and arch != "llama" and not experts:
        raise ValueError(f"{path}: metadata {arch}.expert_count is missing or 0: the file is not a {arch} model")
    if experts:
        c |= moe_gguf_config(c, arch, experts, count, path)
    c["num_key_value_heads"] = count("attention.head_count_kv", c["num_attention_heads"])  # absent: as many as heads
    c["head_dim"] = count("attention.key_length", c["hidden_size"] // c["num_attention_heads"])
    if arch in LAYERNORM_ARCHITECTURES:  # (GPT-2's eps under its own name below)
        c["layer_norm_eps"] = get("attention.layer_norm_epsilon")
    else:
        c["rms_norm_eps"] = get("attention.layer_norm_rms_epsilon")
    c["rope_theta"] = get("rope.freq_base", 10000.0)
    # as llama.cpp reads them: a factor (in older files, rope.scale_linear) with no type is linear; "longrope" (gguf-py's
    # name for Phi-3's LongRoPE, which llama.cpp reads) changes nothing by itself: a phi3 file's factor tensors say it
    factor = metadata.get(f"{arch}.rope.scaling.factor", metadata.get(f"{arch}.rope.scale_linear"))
    kind = _option({"type": get("rope.scaling.type", "linear" if factor else "none")}, "type", "none",
                   ["none", "linear", "yarn"] + (["longrope"] if arch == "phi3" else []), path)
    if kind == "longrope" and factor:  # (llama.cpp would divide every frequency by it too)
        raise ValueError(f"{path}: rope.scaling.type = 'longrope' with rope.scaling.factor = {factor} is not implemented")
    if kind == "linear":
        c["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor", factor)}
    window = metadata.get(f"{arch}.attention.sliding_window")
    olmo3 = arch == "olmo2" and window  # OLMo-3, as llama.cpp stores it (its YaRN: olmo3_gguf_config)
    if kind == "yarn":
        # llama.cpp's YaRN is transformers' with its default ramp ends (for these architectures it reads no
        # yarn_beta_* keys): queries and keys times 0.1 ln(factor) + 1, and by rope.scaling.attn_factor, not taken here
        if not olmo3 and get("rope.scaling.attn_factor", 1.0) != 1.0:
            raise ValueError(f"{path}: YaRN with rope.scaling.attn_factor other than 1 is not implemented")
        c["rope_scaling"] = {"rope_type": "yarn", "factor": get("rope.scaling.factor"),
                             "original_max_position_embeddings": get("rope.scaling.original_context_length",
                                                                     c["max_position_embeddings"])}
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{path}: tensor token_embd.weight is missing; the file is truncated or not a language model")
    c["vocab_size"] = shapes["token_embd.weight"][0]
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != c["vocab_size"]:
        raise ValueError(f"{path}: the metadata lists {len(tokens)} tokens but token_embd.weight has {c['vocab_size']} rows")
    c["tie_word_embeddings"] = "output.weight" not in shapes
    c["attention_bias"] = "blk.0.attn_output.bias" in shapes
    if arch == "arcee":  # its ReLU² MLP (ffn_up, ffn_down; no gate)
        c["hidden_act"] = "relu2"
    if arch == "nemotron":  # (its q / k rows as stored: llama.cpp rotates their halves, as transformers)
        c["norm_eps"] = c["layer_norm_eps"]
    if arch == "ernie4_5":  # use_bias: biases on every projection, as the file holds them; its q / k rows as
        # transformers' (interleaved pairs, llama.cpp's rotary layout too: the converter leaves them), so not unpermuted
        c["use_bias"] = c["attention_bias"]
    if arch == "qwen2moe":  # Qwen2's biases on q, k and v, as the file holds them
        c["qkv_bias"] = "blk.0.attn_q.bias" in shapes
    c["mlp_bias"] = "blk.0.ffn_up.bias" in shapes
    if arch in ("gemma2", "gemma3"):  # Gemma (1) has nothing more to read: no window, no soft-caps, scores by head_dim^-1/2
        c |= gemma_gguf_config(c, get)
    if arch in ("phi3", "gptneox", "stablelm", "phi2", "nemotron", "glm4", "chatglm"):  # a Fraction, so that d_head
        # (GPT-NeoX's and StableLM's: d_model / n_head) times it is exactly the file's count (Nemotron's converter counts it
        # from hidden_size / heads, not head_dim, as llama.cpp then rotates)
        head = max(1, c["hidden_size"] // c["num_attention_heads"]) if arch in ("gptneox", "stablelm") else c["head_dim"]
        dims = count("rope.dimension_count", head, least=0)
        if dims > head:
            raise ValueError(f"{path}: metadata {arch}.rope.dimension_count = {dims} exceeds the {head} dims of a head")
        c["partial_rotary_factor"] = fractions.Fraction(dims, head)
    if arch in ("gpt2", "gptj", "starcoder"):  # config.json's GPT-2 names (GPT-J's and GPT-BigCode's too)
        c |= dict(n_embd=c["hidden_size"], n_inner=c["intermediate_size"], n_layer=c["num_hidden_layers"],
                  n_head=c["num_attention_heads"], n_positions=c["max_position_embeddings"],
                  layer_norm_epsilon=get("attention.layer_norm_epsilon"))
    if arch == "gptj":  # the rotary embedding on rope.dimension_count dims of each head (absent: all), by GPT-J's base
        if c["rope_theta"] != 10000.0 or "rope_scaling" in c:
            raise ValueError(f"{path}: a gptj file with a rotary base other than 10000 or a rope scaling is not implemented")
        c["rotary_dim"] = count("rope.dimension_count", c["head_dim"])
    if arch == "starcoder":  # one key / value head: llama.cpp's converter writes head_count_kv 1, whatever the model
        if c["num_key_value_heads"] != 1:
            raise ValueError(f"{path}: metadata starcoder.attention.head_count_kv = {c['num_key_value_heads']}: only "
                             f"multi-query attention (1) is implemented")
        c |= dict(model_type="gpt_bigcode", multi_query=True)
    if arch == "gptneox":
        parallel = get("use_parallel_residual")
        if not isinstance(parallel, bool):
            raise ValueError(f"{path}: metadata {arch}.use_parallel_residual = {parallel!r} must be a boolean")
        c |= dict(model_type="gpt_neox", use_parallel_residual=parallel)
    if arch == "stablelm":  # llama.cpp reads no use_parallel_residual (the converter writes it true where config.json has
        # none, as StableLM-3B-4E1T's): its layers without ffn_norm are parallel, the others not; q / k norms per head
        c |= dict(use_parallel_residual="blk.0.ffn_norm.weight" not in shapes, use_qkv_bias="blk.0.attn_q.bias" in shapes,
                  qk_layernorm="blk.0.attn_q_norm.weight" in shapes)
    if arch == "granite":
        c |= granite_gguf_config(c, get, path)
    if arch in ("command-r", "cohere2"):  # llama.cpp rotates its q / k on interleaved pairs, as transformers: rows unchanged
        if count("rope.dimension_count", c["head_dim"], least=0) != c["head_dim"]:
            raise ValueError(f"{path}: metadata {arch}.rope.dimension_count = {get('rope.dimension_count')} is not the "
                             f"head's {c['head_dim']} dims: a partial rotary embedding is not implemented for {arch}")
        # (a logit_scale of 0 llama.cpp takes for none: it scales the logits `if (f_logit_scale)`)
        c |= dict(model_type="cohere" if arch == "command-r" else arch, logit_scale=get("logit_scale") or 1.0,
                  use_qk_norm="blk.0.attn_q_norm.weight" in shapes)
    if arch == "cohere2":  # llama.cpp's Command-R7B: the rotary embedding on the sliding layers only, by rope.freq_base
        if get("rope.freq_base_swa", c["rope_theta"]) != c["rope_theta"]:
            raise ValueError(f"{path}: metadata cohere2.rope.freq_base_swa = {get('rope.freq_base_swa')} differs from "
                             f"rope.freq_base, which llama.cpp rotates by; not implemented")
        c |= dict(sliding_window=get("attention.sliding_window"),
                  sliding_window_pattern=count("attention.sliding_window_pattern", 4))
    if olmo3:
        c |= olmo3_gguf_config(c, metadata, get, window, path)
    if arch == "gpt-oss":
        c |= gpt_oss_gguf_config(c, get, count, path)
    if arch == "phi3" and {"rope_factors_long.weight", "rope_factors_short.weight"} & set(shapes):
        c |= longrope_gguf_config(c, get, count, shapes, path)
    if arch == "phi2":
        c["model_type"] = "phi"
    if arch in ("glm4", "chatglm"):
        c |= glm_gguf_config(metadata, count, shapes, arch, path)
    if arch == "olmo":  # llama.cpp's OLMo has no biases; q, k, v clamped where attention.clamp_kqv says
        if c["attention_bias"]:
            raise ValueError(f"{path}: an olmo file with biases (blk.0.attn_output.bias) is not one llama.cpp reads")
        c["clip_qkv"] = get("attention.clamp_kqv", 0.0)
    if arch == "starcoder2":  # no window: llama.cpp leaves StarCoder2's out (the released models': 4,096 of 16,384 positions)
        c |= dict(norm_epsilon=c["layer_norm_eps"], use_bias="blk.0.attn_output.bias" in shapes, sliding_window=None)
    if arch == "bloom":  # (llama.cpp's BLOOM: ALiBi of maximum bias 8, a constant, as transformers')
        c |= dict(seq_length=c["max_position_embeddings"], layer_norm_epsilon=c["layer_norm_eps"])
    if arch == "mpt":
        c |= mpt_gguf_config(c, get, path)
    if arch == "falcon":
        c |= falcon_gguf_config(c, count, shapes, path)
    if arch == "apertus":  # q / k rows as stored (llama.cpp rotates their halves, as transformers); its rotary embedding
        # as the file gives it (Llama-3's scaling as rope_freqs), not transformers' default; its xIELU's from_gguf reads
        if c["tie_word_embeddings"]:
            raise ValueError(f"{path}: an apertus file without output.weight (tied) is not one llama.cpp reads")
        c |= dict(hidden_act="xielu", rope_parameters=(c.pop("rope_scaling", None) or {"rope_type": "default"}) |
                  {"rope_theta": c["rope_theta"]})
    if arch == "seed_oss":  # q / k rows as stored (llama.cpp rotates their halves, as transformers); biases where the file
        # has them: on attn_q, attn_k, attn_v, and apart on attn_output; none on the MLP, which llama.cpp leaves out
        if c["mlp_bias"]:
            raise ValueError(f"{path}: a seed_oss file with biases on the MLP (blk.0.ffn_up.bias) is not one llama.cpp reads")
        c |= dict(attention_bias="blk.0.attn_q.bias" in shapes, attention_out_bias="blk.0.attn_output.bias" in shapes)
    if arch in ("exaone", "exaone4"):  # q / k rows as transformers has them (llama.cpp rotates their halves): not unpermuted
        _whole_head_rotary(c, count, arch, path)
    if arch == "exaone4":
        c |= exaone4_gguf_config(c, metadata, get, count, path)
    if arch == "phi3":
        # no window: llama.cpp leaves Phi-3's out (transformers applies it, past 2,047 tokens for Phi-3-mini-4k)
        c["sliding_window"] = None
    return c


def olmo3_gguf_config(c, metadata, get, window, path):
    """OLMo-3's config.json fields from an olmo2 file with a window, as transformers computes the original: the window
    on the layers attention.sliding_window_pattern marks true, as the converter writes them (absent: three layers in
    four, every fourth global, as llama.cpp sets it whatever the file says); the full layers rotated by rope.freq_base, with
    YaRN where the file has it, its attention factor and ramp ends as the converter writes them from config.json
    (rope.scaling.yarn_attn_factor, yarn_beta_fast, yarn_beta_slow; an older converter's rope.scaling.attn_factor),
    transformers' defaults where absent; the windowed layers unscaled, by rope.freq_base_swa (absent: rope.freq_base).
    llama.cpp's olmo2 reads none of the yarn_* keys: its ramp runs from 32 to 1 turns and it scales queries and keys by
    0.1 ln(factor) + 1 (the released models' values), times rope.scaling.attn_factor (so the older converter's files get
    the released 1.208 twice over); its windowed layers rotate by rope.freq_base."""
    scaling = c.pop("rope_scaling", {"rope_type": "default"})
    if scaling["rope_type"] not in ("default", "yarn"):
        raise ValueError(f"{path}: an olmo2 file with a sliding window and {scaling['rope_type']} rope scaling is not "
                         f"implemented")
    if scaling["rope_type"] == "yarn":
        key = lambda name: f"olmo2.rope.scaling.{name}"
        names = {"attention_factor": "yarn_attn_factor", "beta_fast": "yarn_beta_fast", "beta_slow": "yarn_beta_slow"}
        scaling |= {ours: metadata[key(name)] for ours, name in names.items() if key(name) in metadata}
        older = metadata.get(key("attn_factor"))
        if older is not None and scaling.setdefault("attention_factor", older) != older:
            raise ValueError(f"{path}: metadata {key('attn_factor')} = {older} and {key('yarn_attn_factor')} = "
                             f"{scaling['attention_factor']} disagree on YaRN's attention factor")
    pattern = metadata.get("olmo2.attention.sliding_window_pattern")  # the converter's per layer (True: windowed)
    layers = {}
    if isinstance(pattern, list):
        if len(pattern) != c["num_hidden_layers"] or not all(isinstance(p, bool) for p in pattern):
            raise ValueError(f"{path}: metadata olmo2.attention.sliding_window_pattern must give true or false for each "
                             f"of the {c['num_hidden_layers']} layers, got {pattern!r}")
        layers = {"layer_types": ["sliding_attention" if p else "full_attention" for p in pattern]}
    return layers | dict(model_type="olmo3", sliding_window=window, rope_parameters={
        "full_attention": scaling | {"rope_theta": c["rope_theta"]},
        "sliding_attention": {"rope_type": "default", "rope_theta": get("rope.freq_base_swa", c["rope_theta"])}})


def xielu_gguf_tensors(metadata, n_layer, path):
    """Apertus's xIELU parameters of each layer as llama.cpp's converter writes them: metadata xielu.alpha_p,
    xielu.alpha_n, xielu.beta and xielu.eps (no architecture prefix), each a list of one number per layer (or one number
    for all, which llama.cpp reads too), alpha_p and alpha_n before their softplus, as transformers stores them; as
    tensors named as build reads them of GGUF_NAMES: blk.{i}.xielu.alpha_p and alpha_n (1,), beta and eps ()."""
    values = {}
    for name in ("alpha_p", "alpha_n", "beta", "eps"):
        value = metadata.get(f"xielu.{name}")
        value = [value] * n_layer if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not (isinstance(value, list) and len(value) == n_layer and
                all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            found = "missing" if value is None else f"{len(value)} values" if isinstance(value, list) else repr(value)
            raise ValueError(f"{path}: metadata xielu.{name} must give a number for each of the {n_layer} layers (the "
                             f"xIELU activation's parameters); it is {found}")
        values[name] = value
    tensor = lambda v, shape: lambda: torch.tensor(v, dtype=torch.float32).reshape(shape)
    return {f"blk.{i}.xielu.{name}": tensor(value[i], (1,) if name.startswith("alpha") else ())
            for name, value in values.items() for i in range(n_layer)}


def exaone4_gguf_config(c, metadata, get, count, path):
    """EXAONE 4.0's config.json fields from a GGUF file, as transformers computes the original: llama.cpp's converter
    writes attention.sliding_window only where config.json's sliding_window is set, and with it the sliding layers,
    attention.sliding_window_pattern, one boolean per layer (from layer_types, or from the pattern). So, with the
    window: the window on the layers the list marks (a number in its place: every layer but the last of each such
    period, 0 every layer; absent: transformers' default, every layer but each fourth), the rotary embedding on those
    alone; without it (EXAONE-4.0-1.2B's): full attention and the rotary embedding on every layer, whatever the layer
    count. llama.cpp keys the windows on 64 layers instead (EXAONE-4.0-32B's count): there three layers in four,
    whatever the list says, with the file's window or 4,096; at any other count none, whatever window the file records."""
    n_layer = c["num_hidden_layers"]
    if "exaone4.attention.sliding_window" not in metadata:
        return dict(sliding_window=None, layer_types=["full_attention"] * n_layer)
    if get("rope.freq_base_swa", c["rope_theta"]) != c["rope_theta"]:
        raise ValueError(f"{path}: metadata exaone4.rope.freq_base_swa = {get('rope.freq_base_swa')} differs from "
                         f"rope.freq_base, which transformers' exaone4 rotates every layer by; not implemented")
    pattern = metadata.get("exaone4.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # the converter's, one per layer (true: sliding)
        if len(pattern) != n_layer or not all(isinstance(p, bool) for p in pattern):
            raise ValueError(f"{path}: metadata exaone4.attention.sliding_window_pattern must give true or false for "
                             f"each of the {n_layer} layers, got {pattern!r}")
        sliding = pattern
    else:
        period = count("attention.sliding_window_pattern", 4, least=0)
        sliding = [period == 0 or i % period < period - 1 for i in range(n_layer)]
    return dict(sliding_window=count("attention.sliding_window"),
                layer_types=["sliding_attention" if s else "full_attention" for s in sliding])


def _whole_head_rotary(c, count, arch, path):
    """A file whose rope.dimension_count is not the head's dims is refused: llama.cpp's graph for `arch` asserts they are
    equal (and transformers rotates whole heads)."""
    if count("rope.dimension_count", c["head_dim"], least=0) != c["head_dim"]:
        raise ValueError(f"{path}: metadata {arch}.rope.dimension_count = {count('rope.dimension_count')} is not the "
                         f"head's {c['head_dim']} dims, which llama.cpp's {arch} requires")


def mpt_gguf_config(c, get, path):
    """MPT's config.json fields from a GGUF file, as llama.cpp reads them: attention.max_alibi_bias (0: no ALiBi;
    absent: required by older llama.cpp, 0 for today's), attention.clamp_kqv (absent: none), the MLP's width its
    feed_forward_length. What transformers' MPT does not compute is refused: a maximum bias other than 8 (or none),
    fewer key / value heads than heads (attention.head_count_kv)."""
    bias = get("attention.max_alibi_bias")
    if bias != 8:
        raise ValueError(f"{path}: metadata mpt.attention.max_alibi_bias = {bias!r}: only ALiBi of maximum bias 8, "
                         f"which transformers' MPT computes, is implemented")
    if c["num_key_value_heads"] != c["num_attention_heads"]:
        raise ValueError(f"{path}: metadata mpt.attention.head_count_kv = {c['num_key_value_heads']} is not its "
                         f"head_count: grouped-query attention, which transformers' MPT does not have, is not implemented")
    return dict(d_model=c["hidden_size"], n_heads=c["num_attention_heads"], n_layers=c["num_hidden_layers"],
                max_seq_len=c["max_position_embeddings"], expansion_ratio=fractions.Fraction(c["intermediate_size"], c["hidden_size"]),
                layer_norm_epsilon=c["layer_norm_eps"], no_bias=not c["attention_bias"],
                attn_config=dict(clip_qkv=get("attention.clamp_kqv", 0.0) or None))


def glm_gguf_config(metadata, count, shapes, arch, path):
    """GLM-4's (glm4) and GLM's (chatglm, as llama.cpp's converter writes glm-4-9b-hf and THUDM's ChatGLM) config.json
    fields as llama.cpp reads them: biases on q, k and v where the file holds them (attn_q, or the fused attn_qkv, which
    llama.cpp reads too), none on W_O; q / k rows as stored (interleaved pairs for llama.cpp's rotary embedding and
    transformers' alike: the converter leaves them). What transformers' GLM-4 does not compute is refused: M-RoPE
    (rope.dimension_sections, GLM-4V's) and next-token prediction layers (nextn_predict_layers, GLM-OCR's)."""
    sections = metadata.get(f"{arch}.rope.dimension_sections")
    if sections and any(sections):
        raise ValueError(f"{path}: metadata {arch}.rope.dimension_sections = {list(sections)}: M-RoPE (a vision-language "
                         f"model's, GLM-4V) is not implemented")
    layers = count("nextn_predict_layers", 0, least=0)
    if layers:
        raise ValueError(f"{path}: metadata {arch}.nextn_predict_layers = {layers}: next-token prediction layers "
                         f"(GLM-OCR's) are not implemented")
    return dict(model_type="glm4" if arch == "glm4" else "glm",
                attention_bias="blk.0.attn_q.bias" in shapes or "blk.0.attn_qkv.bias" in shapes)


def falcon_gguf_config(c, count, shapes, path):
    """Falcon's config.json fields from a GGUF file, as llama.cpp reads them: attention and the MLP in parallel, reading
    attn_norm_2 (ln_attn) and attn_norm (ln_mlp) where the file has attn_norm_2 (40B, 180B), else both attn_norm; the
    rotary embedding on whole heads; attention.head_count_kv key / value heads (the converter writes 1 for 7B), the
    converter's attn_qkv all q rows, then all k, then all v (from_gguf splits it so). A file with biases, or with
    rope.dimension_count other than the head's dims, is not one llama.cpp reads."""
    if "blk.0.attn_qkv.bias" in shapes or "blk.0.attn_output.bias" in shapes:
        raise ValueError(f"{path}: a falcon file with biases (blk.0.attn_qkv.bias) is not one llama.cpp reads")
    if count("rope.dimension_count", c["head_dim"], least=0) != c["head_dim"]:
        raise ValueError(f"{path}: metadata falcon.rope.dimension_count = {count('rope.dimension_count')} is not the "
                         f"head's {c['head_dim']} dims: a partial rotary embedding is not implemented for falcon")
    return dict(layer_norm_epsilon=c["layer_norm_eps"], ffn_hidden_size=c["intermediate_size"], new_decoder_architecture=True,
                num_kv_heads=c["num_key_value_heads"], num_ln_in_parallel_attn=2 if "blk.0.attn_norm_2.weight" in shapes else 1)


def longrope_gguf_config(c, get, count, shapes, path):
    """LongRoPE's config.json fields as llama.cpp's converter writes them for Phi-3: its short and long factors
    as two tensors (from_gguf reads them into the lists), one factor per rotary frequency; the original context
    (absent: the context, as llama.cpp takes it) and the attention factor (absent: 1, as llama.cpp takes it), taken as
    the file gives it: the converter computes it from the context over the original one, as transformers does where
    config.json gives no factor or attention_factor (but for Phi-3's older type "yarn" 0.1 ln(factor) + 1, where
    transformers takes the square root as for "longrope")."""
    if "rope_scaling" in c:
        raise ValueError(f"{path}: LongRoPE's factors and rope.scaling.type = {get('rope.scaling.type', 'linear')!r} "
                         f"together are not implemented")
    frequencies = count("rope.dimension_count", c["head_dim"], least=0) // 2
    for name in ("rope_factors_short.weight", "rope_factors_long.weight"):
        if tuple(shapes.get(name, ())) != (frequencies,):
            found = f"has shape {tuple(shapes[name])}" if name in shapes else "is missing"
            raise ValueError(f"{path}: tensor {name} {found}: LongRoPE needs one factor for each of the {frequencies} "
                             f"rotary frequencies (half of rope.dimension_count)")
    return dict(original_max_position_embeddings=count("rope.scaling.original_context_length", c["max_position_embeddings"]),
                rope_scaling={"rope_type": "longrope", "attention_factor": get("rope.scaling.attn_factor", 1.0)})


def granite_gguf_config(c, get, path):
    """Granite's config.json multipliers from a GGUF file's scales, as llama.cpp reads them: no (or a 0)
    attention.scale scales scores by head_dim^-1/2; no embedding_scale or residual_scale scales nothing;
    logit_scale, which the logits are divided by, is required. A file whose rope.scaling.finetuned is
    false (a Granite-4 without the rotary embedding, converted to granite) is refused."""
    if get("rope.scaling.finetuned", True) is not True:
        raise ValueError(f"{path}: metadata granite.rope.scaling.finetuned = {get('rope.scaling.finetuned')!r}: a granite "
                         f"model without the rotary embedding is not implemented")
    return dict(attention_multiplier=get("attention.scale", 0.0) or c["head_dim"] ** -0.5,
                embedding_multiplier=get("embedding_scale", 0.0) or 1.0,
                residual_multiplier=get("residual_scale", 0.0) or 1.0, logits_scaling=get("logit_scale"))


def gpt_oss_gguf_config(c, get, count, path):
    """gpt-oss's config.json fields from a GGUF file, as llama.cpp reads them: experts of expert_feed_forward_length;
    the window on every layer but the last of each attention.sliding_window_pattern (absent: 2, the even layers windowed,
    the odd ones full, as transformers' default layer_types; 0: every layer, as llama.cpp's set_swa_pattern); one
    rotary base for all layers; the clamped SwiGLU's limit and alpha llama.cpp's constants, 7 and 1.702 (no key holds
    them; the released models' config.json has the same).
    YaRN's ramp ends are transformers' for gpt-oss (truncate false), not rounded to whole dimensions as llama.cpp's."""
    if get("rope.freq_base_swa", c["rope_theta"]) != c["rope_theta"]:
        raise ValueError(f"{path}: metadata gpt-oss.rope.freq_base_swa = {get('rope.freq_base_swa')} differs from "
                         f"rope.freq_base, which transformers' gpt-oss rotates every layer by; not implemented")
    period = count("attention.sliding_window_pattern", 2, least=0)
    rope = c.get("rope_scaling") or {"rope_type": "default"}  # (none given, gpt_oss() would take transformers' default YaRN)
    if rope["rope_type"] == "yarn":
        rope = rope | {"truncate": False}
    return dict(intermediate_size=count("expert_feed_forward_length"), sliding_window=count("attention.sliding_window"),
                layer_types=["sliding_attention" if period == 0 or i % period < period - 1 else "full_attention"
                             for i in range(c["num_hidden_layers"])],
                rope_parameters=rope | {"rope_theta": c["rope_theta"]}, swiglu_limit=7.0, swiglu_alpha=1.702)


def moe_gguf_config(c, arch, experts, count, path):
    """The mixture-of-experts fields of config.json a GGUF file gives or implies, as llama.cpp reads them:
    every layer a mixture; Mixtral's (llama's) and OLMoE's experts of feed_forward_length, Qwen's of
    expert_feed_forward_length (absent: feed_forward_length / expert_used_count); Qwen2-MoE's shared expert of
    expert_shared_feed_forward_length (absent: feed_forward_length); the chosen weights renormalised in Mixtral
    and Qwen3-MoE only (GGUF_MOE). Grouped routing (DeepSeek's expert_group_count) is refused."""
    if count("expert_group_count", 0, least=0) > 1:
        raise ValueError(f"{path}: experts routed by groups ({arch}.expert_group_count = {count('expert_group_count')}, "
                         f"DeepSeek-style) are not implemented")
    family, renormalised = GGUF_MOE[arch]
    used, ff = count("expert_used_count"), c["intermediate_size"]
    if used > experts:
        raise ValueError(f"{path}: metadata {arch}.expert_used_count = {used} exceeds its expert_count = {experts}")
    c = dict(model_type=family, num_experts=experts, num_experts_per_tok=used, norm_topk_prob=renormalised)
    if arch in ("qwen2moe", "qwen3moe"):
        c["moe_intermediate_size"] = count("expert_feed_forward_length", max(1, ff // used))
    if arch == "qwen2moe":
        c["shared_expert_intermediate_size"] = count("expert_shared_feed_forward_length", ff)
    return c


def gemma_gguf_config(c, get):
    """The Gemma fields of config.json that a GGUF file gives or implies. llama.cpp stores no
    query_pre_attn_scalar (it scales scores by d_model / n_head in the 27B models, Gemma-2's 46
    layers and Gemma-3's 62, else by head_dim), no layer pattern (Gemma-2 alternates, Gemma-3 has
    every sixth layer global) and no local rotary base (10,000); its norm weights hold 1 + weight
    (from_gguf takes the 1 off: the model's norms add it). Gemma-2's soft-caps, where an early converter left them out, are the
    model's own (50 and 30), and so is its window (4,096), as llama.cpp takes them."""
    gemma2 = c["model_type"] == "gemma2"
    big = c["num_hidden_layers"] == (46 if gemma2 else 62)
    return dict(model_type="gemma2" if gemma2 else "gemma3_text",
                sliding_window=get("attention.sliding_window", 4096 if gemma2 else None),
                query_pre_attn_scalar=c["hidden_size"] // c["num_attention_heads"] if big else c["head_dim"],
                attn_logit_softcapping=get("attn_logit_softcapping", 50.0 if gemma2 else 0.0),
                final_logit_softcapping=get("final_logit_softcapping", 30.0 if gemma2 else 0.0))


def unpermute(heads):
    """llama.cpp's converter reorders each head's q / k rows from the "rotate_half" layout (dim i
    paired with i + d/2) to interleaved pairs (2i, 2i + 1), its rotary layout; this puts them back."""
    return lambda t: t.reshape(heads, t.shape[0] // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def from_gguf(path, codebooks=None, block_size=None, info=None):
    """A Transformer of a GGUF file (as from_pretrained): its architecture and sizes checked on the
    header, then its tensors dequantised to float32. `info`: formats.read_gguf_info(path), if already read."""
    info = info or formats.read_gguf_info(path)
    c = gguf_config(info.metadata, {name: t.shape for name, t in info.tensors.items()}, path)
    tensors = formats.gguf_loaders(path, info).tensors
    if c.get("rope_scaling", {}).get("rope_type") == "longrope":  # its factors, as config.json lists them
        c["rope_scaling"] |= {f"{kind}_factor": tensors.pop(f"rope_factors_{kind}.weight")().flatten().tolist()
                              for kind in ("short", "long")}
    config, _, family_transforms = family_config(c, path)
    if "rope_freqs.weight" in tensors:  # one divisor per rotary frequency (Llama-3's rule, computed by the converter)
        divisors = tensors.pop("rope_freqs.weight")().flatten().tolist()
        if config["rotary_scaling"] or 2 * len(divisors) != config["rotary_dims"]:
            raise ValueError(f"{path}: rope_freqs holds {len(divisors)} divisors for {config['rotary_dims'] // 2} rotary "
                             f"frequencies{' and the metadata scales them too' if config['rotary_scaling'] else ''}")
        config["rotary_scaling"] = {"rope_type": "divisors", "divisors": divisors}
    table, transforms = GGUF_NAMES, {}
    if config.get("norm_plus_one"):  # the converter stored each norm's weight as 1 + weight (Gemma's, Nemotron's; not
        # Nemotron's biases)
        minus_one = lambda load: lambda: load().float() - 1.0
        tensors = {name: minus_one(load) if name.endswith("_norm.weight") else load for name, load in tensors.items()}
    if config.get("shared_norm"):  # attention and MLP read attn_norm (Command-R, StableLM-2-12B)
        table = table | names({}, {"norm2": "attn_norm"}, "blk.{i}.")
    if c["model_type"] in ("llama", "smollm3", "granite", "mixtral", "olmo", "arcee"):  # the converter permuted their q / k rows for
        # llama.cpp's rotary on interleaved pairs (Command-R's it leaves as they are: interleaved for transformers too, as
        # cohere() reads)
        transforms = {"blocks.{i}.attn.q": unpermute(config["n_head"]), "blocks.{i}.attn.k": unpermute(config["n_kv_head"])}
    if c["model_type"] == "gpt_bigcode":  # c_attn as the folder's, all q rows, then the k head's, then the v head's
        table, transforms = GGUF_QKV_NAMES, family_transforms
    if c["model_type"] in ("gpt2", "gpt_neox"):
        third = lambda i: lambda t: t.chunk(3)[i]  # q, k or v (weight or bias)
        table, transforms = GGUF_QKV_NAMES, {f"blocks.{{i}}.attn.{x}": third(i) for i, x in enumerate("qkv")}
    if c["model_type"] in ("bloom", "mpt"):  # q, k, v as one tensor, all q rows, then all k, then all v
        third = lambda i: lambda t: t.chunk(3)[i]
        table, transforms = GGUF_QKV_NAMES, {f"blocks.{{i}}.attn.{x}": third(i) for i, x in enumerate("qkv")}
    if c["model_type"] == "falcon":  # attn_qkv all q rows, then all k, then all v (the converter regroups 40B's); the MLP
        # reads attn_norm, attention attn_norm_2 where the file has it
        sizes = [config["n_head"] * config["d_head"]] + [config["n_kv_head"] * config["d_head"]] * 2
        table = GGUF_QKV_NAMES | names({}, {"norm1": "attn_norm" if config["shared_norm"] else "attn_norm_2",
                                            "norm2": "attn_norm"}, "blk.{i}.")
        transforms = {f"blocks.{{i}}.attn.{x}": (lambda i: lambda t: t.split(sizes)[i])(i) for i, x in enumerate("qkv")}
    if c["model_type"] == "apertus":
        tensors = tensors | xielu_gguf_tensors(info.metadata, config["n_layer"], path)
    if c["model_type"] == "seed_oss":  # its MLP reads post_attention_norm (the converter's name for it)
        table = table | names({}, {"norm2": "post_attention_norm"}, "blk.{i}.")
    if c["model_type"] == "gpt_oss":  # its MLP reads post_attention_norm; its sinks (attn_sinks) renamed as build reads them
        table = table | names({}, {"norm2": "post_attention_norm", "attn": "attn"}, "blk.{i}.")
        tensors = {re.sub(r"\.attn_sinks\.weight$", ".attn.sinks", name): load for name, load in tensors.items()}
    if c["model_type"] == "qwen2_moe":  # the shared expert's gate, a row (1, d_model) or (as llama.cpp also reads it) a vector
        transforms["blocks.{i}.mlp.shared_gate"] = lambda t: t.reshape(1, -1)
    if c["model_type"] == "phi3":  # the MLP's gate and up stored as one tensor; q, k and v too, or apart
        fused = [f"blocks.{{i}}.{name}" for name in ("mlp.gate", "mlp.up")]
        fused += [f"blocks.{{i}}.attn.{x}" for x in "qkv" if "blk.0.attn_qkv.weight" in tensors]
        table, transforms = table | {name: GGUF_PHI3_NAMES[name] for name in fused}, {name: family_transforms[name] for name in fused}
    if c["model_type"] in ("glm", "glm4"):  # the MLP's gate and up as one tensor, ffn_up, as in the folder
        fused = [f"blocks.{{i}}.{name}" for name in ("mlp.gate", "mlp.up")]
        table, transforms = table | {name: GGUF_PHI3_NAMES[name] for name in fused}, family_transforms
    if c["model_type"] in ("phi", "glm", "glm4") and "blk.0.attn_qkv.weight" in tensors:  # (older Phi-2 files, ChatGLM's)
        # q, k, v as one tensor: all q rows, then all k rows, then all v rows, weight and bias
        sizes = [config["n_head"] * config["d_head"]] + [config["n_kv_head"] * config["d_head"]] * 2
        table = table | names({}, {f"attn.{x}": "attn_qkv" for x in "qkv"}, "blk.{i}.")
        transforms = transforms | {f"blocks.{{i}}.attn.{x}": (lambda i: lambda t: t.split(sizes)[i])(i) for i, x in enumerate("qkv")}
    return build(config, c["model_type"], Weights(tensors, path), table, transforms, codebooks, block_size)


# ------------------------------------------------------------------------------------------------
# A model and its tokenizer from a checkpoint that stores the tokenizer's plain data under
# "tokenizer" (byte models may store none: text.ByteTokenizer).

def load_with_tokenizer(path, device="cpu"):
    """(model, tokenizer) of a codebook checkpoint (a codebook.GPT or a Transformer) and the tokenizer stored with it."""
    state = runs.load_checkpoint(path)
    runs.check_intact(path)
    stored = state.get("tokenizer")
    if stored is None and state["config"].get("vocab_size") != text.VOCAB_SIZE:
        raise ValueError(f"{path} stores no tokenizer and is not a byte model (vocab_size {state['config'].get('vocab_size')})")
    tokenizer = bpe.check_tokenizer(text.ByteTokenizer() if stored is None else bpe.tokenizer_from_dict(stored),
                                state["config"]["vocab_size"], path)
    model = model_from_config(state["config"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer
