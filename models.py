"""
Pretrained language models from a local Hugging Face folder: GPT-2, GPT-Neo (the TinyStories
models) and GPT-NeoX (Pythia) as a codebook.GPT, with their byte-level BPE tokenizer (bpe.py).
The paper's language-model results finetune such models with codebooks (section 5).

    import models
    model = models.from_pretrained("models/pythia-70m")                  # logits as the original's
    model = models.from_pretrained("models/gpt2", codebooks={"attn": dict(num_codes=10000, k=8)})
    model, tok = models.load_pretrained("models/pythia-70m")
    tok.decode(tok.encode("Once upon a time"))

A folder is what `huggingface-cli download NAME --local-dir DIR` or `save_pretrained(DIR)` writes:
config.json, the weights (model.safetensors, sharded safetensors with model.safetensors.index.json,
or pytorch_model.bin; formats.py reads them) and tokenizer.json (or vocab.json + merges.txt).
Nothing is downloaded and transformers is not needed. Weights load as float32; dropout is left
out, so the model computes what the original computes in eval mode.
"""
import json
import os
import re

import torch

import codebook as cb
import runs
import text
from formats import read_weights
from bpe import check_tokenizer, load_tokenizer, tokenizer_from_dict

# ------------------------------------------------------------------------------------------------
# Models. Each family maps its config.json to GPTConfig fields and its weights to GPT's
# state_dict. GPT keeps q, k, v as one (3 d_model, d_model) matrix, queries first, heads in order.

GELUS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
BUFFERS = re.compile(r"\.(attn|attention)\.bias$|\.masked_bias$|\.inv_freq$")  # saved masks and tables, not weights


class Weights(dict):
    """The folder's tensors by name (the base model's prefix removed); a missing one is a ValueError."""

    def __init__(self, tensors, folder):
        super().__init__()
        for name, t in tensors.items():
            self[re.sub(r"^(transformer|gpt_neox)\.", "", name)] = t
        self.folder, self.used = folder, set()

    def __missing__(self, name):
        raise ValueError(f"{self.folder}: weight {name!r} is missing from the checkpoint; download it again")

    def __getitem__(self, name):
        self.used.add(name)
        return super().__getitem__(name).float()


def _option(c, name, default, allowed, folder):
    """config.json's `name`; a value this module does not implement is a one-line error."""
    value = c.get(name, default)
    if value not in allowed:
        raise ValueError(f"{folder}/config.json: {name}={value!r} is not implemented (supported: {allowed})")
    return value


def _gelu(c, name, default, folder):
    return GELUS[_option(c, name, default, list(GELUS), folder)]


def gpt2(c, folder):
    """GPT-2: fused qkv and every matrix stored transposed (Conv1D), tanh GELU, tied embeddings."""
    _option(c, "scale_attn_by_inverse_layer_idx", False, [False], folder)
    _option(c, "add_cross_attention", False, [False], folder)
    d = c["n_embd"]
    config = dict(vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"], n_head=c["n_head"],
                  d_model=d, d_mlp=c.get("n_inner") or 4 * d, ln_eps=c.get("layer_norm_epsilon", 1e-5),
                  gelu=_gelu(c, "activation_function", "gelu_new", folder),
                  attn_scale=None if c.get("scale_attn_weights", True) else 1.0,
                  tied_head=c.get("tie_word_embeddings", True))

    def state_dict(w):
        sd = {"tok_emb.weight": w["wte.weight"], "pos_emb.weight": w["wpe.weight"],
              "ln_f.weight": w["ln_f.weight"], "ln_f.bias": w["ln_f.bias"]}
        for i in range(config["n_layer"]):
            h, b = f"h.{i}.", f"blocks.{i}."
            for ours, theirs in [("ln1", "ln_1"), ("ln2", "ln_2"), ("qkv", "attn.c_attn"), ("attn_out", "attn.c_proj"),
                                 ("mlp_in", "mlp.c_fc"), ("mlp_out", "mlp.c_proj")]:
                weight = w[h + theirs + ".weight"]
                sd[b + ours + ".weight"] = weight if ours.startswith("ln") else weight.T
                sd[b + ours + ".bias"] = w[h + theirs + ".bias"]
        return sd
    return config, state_dict


def gpt_neo(c, folder):
    """GPT-Neo: separate q, k, v without bias, no 1/sqrt(d_head) score scaling, local attention
    (a window of window_size positions) on the layers attention_types marks local, tied embeddings."""
    layers = [kind for kinds, repeat in c.get("attention_types", [[["global", "local"], 12]]) for _ in range(repeat)
              for kind in kinds]
    if len(layers) != c["num_layers"] or set(layers) - {"global", "local"}:
        raise ValueError(f"{folder}/config.json: attention_types {c.get('attention_types')} must give 'global' "
                         f"or 'local' for each of the {c['num_layers']} layers")
    d = c["hidden_size"]
    config = dict(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["num_layers"],
                  n_head=c["num_heads"], d_model=d, d_mlp=c.get("intermediate_size") or 4 * d,
                  ln_eps=c.get("layer_norm_epsilon", 1e-5), gelu=_gelu(c, "activation_function", "gelu_new", folder),
                  attn_window=[c.get("window_size", 256) if kind == "local" else 0 for kind in layers],
                  attn_scale=1.0, qkv_bias=False, tied_head=c.get("tie_word_embeddings", True))

    def state_dict(w):
        sd = {"tok_emb.weight": w["wte.weight"], "pos_emb.weight": w["wpe.weight"],
              "ln_f.weight": w["ln_f.weight"], "ln_f.bias": w["ln_f.bias"]}
        for i in range(config["n_layer"]):
            h, b = f"h.{i}.", f"blocks.{i}."
            sd[b + "qkv.weight"] = torch.cat([w[f"{h}attn.attention.{x}_proj.weight"] for x in "qkv"])
            for ours, theirs in [("ln1", "ln_1"), ("ln2", "ln_2"), ("attn_out", "attn.attention.out_proj"),
                                 ("mlp_in", "mlp.c_fc"), ("mlp_out", "mlp.c_proj")]:
                sd[b + ours + ".weight"], sd[b + ours + ".bias"] = w[h + theirs + ".weight"], w[h + theirs + ".bias"]
        return sd
    return config, state_dict


def gpt_neox(c, folder):
    """GPT-NeoX (Pythia): rotary embeddings on a fraction of each head's dims, no learned positions,
    parallel residual (or not), fused qkv laid out head by head, exact GELU, untied output layer."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    _option(rope, "rope_type", rope.get("type", "default"), ["default"], folder)
    _option(c, "attention_bias", True, [True], folder)
    d, heads = c["hidden_size"], c["num_attention_heads"]
    d_head = d // heads
    fraction = rope.get("partial_rotary_factor", c.get("rotary_pct", 0.25))
    config = dict(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["num_hidden_layers"],
                  n_head=heads, d_model=d, d_mlp=c["intermediate_size"], ln_eps=c.get("layer_norm_eps", 1e-5),
                  gelu=_gelu(c, "hidden_act", "gelu", folder), learned_positions=False,
                  rotary_dims=int(d_head * fraction), rotary_base=float(rope.get("rope_theta", c.get("rotary_emb_base", 10000))),
                  parallel_residual=c.get("use_parallel_residual", True), tied_head=c.get("tie_word_embeddings", False))

    def state_dict(w):
        sd = {"tok_emb.weight": w["embed_in.weight"], "ln_f.weight": w["final_layer_norm.weight"],
              "ln_f.bias": w["final_layer_norm.bias"]}
        for i in range(config["n_layer"]):
            h, b = f"layers.{i}.", f"blocks.{i}."
            qkv_w, qkv_b = w[h + "attention.query_key_value.weight"], w[h + "attention.query_key_value.bias"]
            sd[b + "qkv.weight"] = qkv_w.view(heads, 3, d_head, d).transpose(0, 1).reshape(3 * d, d)  # per head -> q, k, v
            sd[b + "qkv.bias"] = qkv_b.view(heads, 3, d_head).transpose(0, 1).reshape(3 * d)
            for ours, theirs in [("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm"),
                                 ("attn_out", "attention.dense"), ("mlp_in", "mlp.dense_h_to_4h"), ("mlp_out", "mlp.dense_4h_to_h")]:
                sd[b + ours + ".weight"], sd[b + ours + ".bias"] = w[h + theirs + ".weight"], w[h + theirs + ".bias"]
        return sd
    return config, state_dict


FAMILIES = {"gpt2": gpt2, "gpt_neo": gpt_neo, "gpt_neox": gpt_neox}


def read_config(folder):
    """config.json of a model folder, checked to be one of FAMILIES."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise ValueError(f"model folder {folder} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no config.json: give the folder a Hugging Face model was downloaded or saved to")
    with open(path) as f:
        c = json.load(f)
    if c.get("model_type") not in FAMILIES:
        raise ValueError(f"{path}: model_type {c.get('model_type')!r} is not supported (supported: {', '.join(FAMILIES)})")
    return c


def from_pretrained(folder, codebooks=None, block_size=None):
    """A codebook.GPT (eval mode, float32, on the CPU) computing the folder's model; with
    `codebooks` ({site: CodebookSpec fields}, as GPTConfig takes them) they are added, untrained.
    block_size: a shorter context than the model's (learned positions past it are dropped)."""
    c = read_config(folder)
    config, state_dict = FAMILIES[c["model_type"]](c, folder)
    if block_size is not None:
        if not 1 <= block_size <= config["block_size"]:
            raise ValueError(f"block_size {block_size} must be between 1 and the model's context, {config['block_size']}")
        config["block_size"] = block_size
    weights = Weights(read_weights(folder), folder)
    sd = state_dict(weights)
    if config.get("learned_positions", True):
        sd["pos_emb.weight"] = sd["pos_emb.weight"][:config["block_size"]]
    head = next((n for n in ("lm_head.weight", "embed_out.weight") if n in weights), None)
    sd["head.weight"] = sd["tok_emb.weight"] if config["tied_head"] else weights[head or "lm_head.weight"]
    unused = [n for n in weights if n not in weights.used and n != head and not BUFFERS.search(n)]
    if unused:
        raise ValueError(f"{folder}: weights {unused[:3]} are not part of a {c['model_type']} model this module knows")
    model = cb.GPT(cb.GPTConfig(**config))
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{folder}: the weights do not fit config.json ({str(e).splitlines()[-1].strip()})") from None
    return (cb.with_codebooks(model, codebooks) if codebooks else model).eval()


# ------------------------------------------------------------------------------------------------
# A model and its tokenizer, together: from a folder, or from a checkpoint that stores the
# tokenizer's plain data under "tokenizer" (byte models may store none: text.ByteTokenizer).

def load_pretrained(folder, codebooks=None, block_size=None):
    """(model, tokenizer) of a Hugging Face model folder, checked against each other before the weights load."""
    c = read_config(folder)
    tokenizer = check_tokenizer(load_tokenizer(folder), FAMILIES[c["model_type"]](c, folder)[0]["vocab_size"], folder)
    return from_pretrained(folder, codebooks, block_size), tokenizer


def load_with_tokenizer(path, device="cpu"):
    """(model, tokenizer) of a codebook checkpoint: runs.load_model plus the tokenizer stored with it."""
    state = runs.load_checkpoint(path)
    stored = state.get("tokenizer")
    if stored is None and state["config"].get("vocab_size") != text.VOCAB_SIZE:
        raise ValueError(f"{path} stores no tokenizer and is not a byte model (vocab_size {state['config'].get('vocab_size')})")
    tokenizer = check_tokenizer(text.ByteTokenizer() if stored is None else tokenizer_from_dict(stored),
                                state["config"]["vocab_size"], path)
    model = cb.GPT(state["config"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer
