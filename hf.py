"""
Pretrained language models from a local Hugging Face folder: GPT-2, GPT-Neo (the TinyStories
models) and GPT-NeoX (Pythia) as a codebook.GPT, and their byte-level BPE tokenizer. The paper's
language-model results finetune such models with codebooks (section 5).

    import hf
    model = hf.from_pretrained("models/pythia-70m")                  # logits as the original's
    model = hf.from_pretrained("models/gpt2", codebooks={"attn": dict(num_codes=10000, k=8)})
    tok = hf.load_tokenizer("models/pythia-70m")
    tok.decode(tok.encode("Once upon a time"))

A folder is what `huggingface-cli download NAME --local-dir DIR` or `save_pretrained(DIR)` writes:
config.json, the weights (model.safetensors, sharded safetensors with model.safetensors.index.json,
or pytorch_model.bin) and tokenizer.json (or vocab.json + merges.txt). Nothing is downloaded and
transformers is not needed. Weights load as float32; dropout is left out, so the model computes
what the original computes in eval mode.

Map of this file:
  1. weights      safetensors read by hand (a length, a JSON header, raw tensors), .bin via torch
  2. models       config.json and weight names of each family -> GPTConfig and GPT's state_dict
  3. tokenizers   byte-level BPE (GPT-2's algorithm), as plain data like text.ByteTokenizer
  4. checkpoints  a model with its tokenizer, checked against each other
"""
import json
import os
import re
import unicodedata

import numpy as np
import torch

import codebook as cb
import text

# ------------------------------------------------------------------------------------------------
# 1. Weights. safetensors: 8 bytes little-endian header length n, n bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the tensors' raw little-endian bytes.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} of a .safetensors file; a ValueError names what is wrong with a bad one."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} is corrupt: its header is not JSON; download it again") from None
        data = np.fromfile(f, dtype=np.uint8)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {entry.get('dtype')!r}, which this reader does not know")
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        expected = int(np.prod(entry["shape"])) * dtype.itemsize
        if end > len(data) or end - begin != expected:
            raise ValueError(f"{path} is truncated or corrupt: tensor {name} needs bytes {begin}..{end} of "
                             f"{len(data)} ({expected} for its shape); download it again")
        raw = torch.from_numpy(data[begin:end].copy())  # a copy: aligned, and the file's buffer can go
        tensors[name] = raw.view(dtype).reshape(entry["shape"])
    return tensors


def read_weights(folder):
    """{name: tensor} from model.safetensors (or its shards) or pytorch_model.bin in `folder`."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return read_safetensors(os.path.join(folder, "model.safetensors"))
    if os.path.isfile(index):
        shards = sorted(set(json.load(open(index))["weight_map"].values()))
        return {name: t for shard in shards for name, t in read_safetensors(os.path.join(folder, shard)).items()}
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        path = os.path.join(folder, "pytorch_model.bin")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is truncated, corrupt or not a torch file ({type(e).__name__}); download it again") from None
    raise ValueError(f"{folder} holds no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin")


# ------------------------------------------------------------------------------------------------
# 2. Models. Each family maps its config.json to GPTConfig fields and its weights to GPT's
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
# 3. Tokenizers. Byte-level BPE (GPT-2's): the text's UTF-8 bytes, each shown as a printable
# character, are cut into words by GPT-2's pattern, and each word's characters are merged pairwise,
# the pair with the lowest merge rank first, until no pair of the merge list is left.

def bytes_to_unicode():
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68
    bytes (controls, space, ...) for the characters from U+0100 on, so no token shows whitespace."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {ch: b for b, ch in BYTE_TO_CHAR.items()}
_LATIN1_TO_CHARS = str.maketrans({chr(b): ch for b, ch in BYTE_TO_CHAR.items()})
# Unicode's White_Space property: what GPT-2's \s matches (str.isspace() also counts U+001C..U+001F)
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_word_pattern = None


def word_pattern():
    r"""GPT-2's pre-tokenisation pattern
        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    for Python's re, which has no \p{L} (letters) or \p{N} (numbers): both are spelt out as ranges
    of code points from unicodedata's categories. Characters newer than Python's Unicode tables
    (3.11: Unicode 14) count as neither. Built on first use (0.3 s)."""
    global _word_pattern
    if _word_pattern is None:
        ranges = {"L": [], "N": []}
        for c in range(0x110000):
            group = ranges.get(unicodedata.category(chr(c))[0])
            if group is not None:
                if group and group[-1][1] == c - 1:
                    group[-1][1] = c
                else:
                    group.append([c, c])
        letters, numbers = ("".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges[g]) for g in "LN")
        s = WHITESPACE
        _word_pattern = re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{s}{letters}{numbers}]+"
                                   rf"|[{s}]+(?![^{s}])|[{s}]+")
    return _word_pattern


NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")


class BPETokenizer:
    """Byte-level BPE with the vocabulary and merges of a GPT-2, GPT-Neo or Pythia tokenizer.
    Added tokens (<|endoftext|>, ...) are cut out of the text first and encode to their own ids;
    `bos` is the end-of-text id, which starts (and so separates) documents as BOS does for bytes."""
    kind = "bpe"

    def __init__(self, vocab, merges, added_tokens=(), normalizers=(), add_prefix_space=False, use_regex=True,
                 ignore_merges=False, bos=None):
        self.vocab, self.merges = dict(vocab), [list(m) for m in merges]
        self.added_tokens = [dict(t) for t in added_tokens]  # {"id", "content", "special", "normalized"}
        self.normalizers, self.add_prefix_space, self.use_regex = list(normalizers), add_prefix_space, use_regex
        self.ignore_merges, self.bos = ignore_merges, bos
        self.ranks = {tuple(m): rank for rank, m in enumerate(self.merges)}
        self.id_to_token = {i: t for t, i in self.vocab.items()} | {t["id"]: t["content"] for t in self.added_tokens}
        self.vocab_size = max(self.id_to_token) + 1
        self.token_bytes = {i: _token_bytes(t) for i, t in self.id_to_token.items()}
        self.special_ids = {t["id"] for t in self.added_tokens if t["special"]}
        # added tokens are matched longest first; unnormalised ones in the raw text, the rest after normalising
        self.raw_added, self.normalized_added = (
            self._alternation({t["content"]: t["id"] for t in self.added_tokens if t["normalized"] == normalized})
            for normalized in (False, True))
        self.cache = {}

    @staticmethod
    def _alternation(tokens):
        if not tokens:
            return None
        return tokens, re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))

    def to_dict(self):
        """Plain Python data (for weights_only checkpoints); tokenizer_from_dict() rebuilds the tokenizer."""
        return {"kind": self.kind, "vocab": self.vocab, "merges": self.merges, "added_tokens": self.added_tokens,
                "normalizers": self.normalizers, "add_prefix_space": self.add_prefix_space, "use_regex": self.use_regex,
                "ignore_merges": self.ignore_merges, "bos": self.bos}

    def normalize(self, string):
        for form in self.normalizers:
            string = unicodedata.normalize(form, string)
        return string

    def _split_added(self, string, added):
        """Yield (stretch, None) for plain stretches of the string and (content, id) for added tokens."""
        if added is None:
            yield string, None
            return
        ids, pattern = added
        start = 0
        for m in pattern.finditer(string):
            if m.start() > start:
                yield string[start:m.start()], None
            yield m.group(), ids[m.group()]
            start = m.end()
        if start < len(string):
            yield string[start:], None

    def encode(self, string):
        """str (or bytes, read as UTF-8) -> list of token ids."""
        if isinstance(string, bytes):
            string = string.decode("utf-8", errors="replace")
        ids = []
        for raw, raw_id in self._split_added(string, self.raw_added):
            if raw_id is not None:
                ids.append(raw_id)
                continue
            for piece, piece_id in self._split_added(self.normalize(raw), self.normalized_added):
                if piece_id is not None:
                    ids.append(piece_id)
                    continue
                if self.add_prefix_space and not piece.startswith(" "):
                    piece = " " + piece
                words = word_pattern().findall(piece) if self.use_regex else [piece]
                for word in words:
                    ids.extend(self._word_ids(word))
        return ids

    def _word_ids(self, word):
        if word in self.cache:
            return self.cache[word]
        chars = word.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_CHARS)
        if self.ignore_merges and chars in self.vocab:
            parts = [chars]
        else:
            parts = list(chars)
            while len(parts) > 1:
                rank, pair = min((self.ranks.get(pair, len(self.ranks)), pair) for pair in zip(parts, parts[1:]))
                if rank == len(self.ranks):
                    break
                merged, i = [], 0
                while i < len(parts):  # every occurrence of the pair, left to right
                    if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                        merged.append(parts[i] + parts[i + 1])
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
        missing = [p for p in parts if p not in self.vocab]
        if missing:
            raise ValueError(f"the tokenizer's vocabulary lacks {missing[0]!r}: its vocabulary is not byte-level")
        ids = [self.vocab[p] for p in parts]
        if len(self.cache) > 200_000:  # a bound on memory over a large corpus
            self.cache.clear()
        self.cache[word] = ids
        return ids

    def decode(self, ids, skip_special=False):
        """Token ids -> str (invalid UTF-8 as U+FFFD). Ids outside the vocabulary are dropped, and
        with skip_special the special tokens (<|endoftext|>, ...) too."""
        skip = self.special_ids if skip_special else ()
        data = b"".join(self.token_bytes.get(int(i), b"") for i in ids if int(i) not in skip)
        return data.decode("utf-8", errors="replace")


def _token_bytes(token):
    """The bytes a token stands for: its characters through CHAR_TO_BYTE, or, for an added token
    written as plain text (a run of spaces, say), its own UTF-8."""
    if all(ch in CHAR_TO_BYTE for ch in token):
        return bytes(CHAR_TO_BYTE[ch] for ch in token)
    return token.encode("utf-8")


def tokenizer_from_dict(data):
    """The inverse of to_dict() for either tokenizer."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "bytes":
        return text.ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer(**{k: v for k, v in data.items() if k != "kind"})
    raise ValueError(f"tokenizer data of kind {kind!r} is not 'bytes' or 'bpe'")


def _normalizers(spec, path):
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return [form for s in spec["normalizers"] for form in _normalizers(s, path)]
    if spec.get("type") in NORMALIZERS:
        return [spec["type"]]
    raise ValueError(f"{path}: normalizer {spec.get('type')!r} is not implemented (supported: {', '.join(NORMALIZERS)})")


def load_tokenizer(folder):
    """The BPETokenizer of a model folder: tokenizer.json, or vocab.json + merges.txt (GPT-2's
    pre-tokenisation, <|endoftext|> special)."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: model type {model.get('type')!r} is not implemented (only byte-level 'BPE')")
        for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
            if model.get(option):
                raise ValueError(f"{path}: BPE option {option}={model[option]!r} is not implemented")
        for part, allowed in (("pre_tokenizer", ("ByteLevel",)), ("decoder", ("ByteLevel", None)),
                              ("post_processor", ("ByteLevel", None))):
            kind = (spec.get(part) or {}).get("type")
            if kind not in allowed:
                raise ValueError(f"{path}: {part} {kind!r} is not implemented (byte-level BPE takes {allowed[0]})")
        for t in spec.get("added_tokens", []):
            for option in ("single_word", "lstrip", "rstrip"):
                if t.get(option):
                    raise ValueError(f"{path}: added token {t['content']!r} uses {option}, which is not implemented")
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        added = [{"id": t["id"], "content": t["content"], "special": t["special"], "normalized": t["normalized"]}
                 for t in spec.get("added_tokens", [])]
        normalizers = _normalizers(spec.get("normalizer"), path)
        options = dict(add_prefix_space=pre.get("add_prefix_space", False), use_regex=pre.get("use_regex", True),
                       ignore_merges=model.get("ignore_merges", False))
        vocab = model["vocab"]
    elif os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
            merges = [line.split(" ") for line in f.read().splitlines() if line and not line.startswith("#version")]
        added = [{"id": vocab[t], "content": t, "special": True, "normalized": False}
                 for t in ["<|endoftext|>"] if t in vocab]
        normalizers, options = [], {}
    else:
        raise ValueError(f"{folder} has no tokenizer.json (nor vocab.json + merges.txt)")
    ids = {t["content"]: t["id"] for t in added} | vocab
    return BPETokenizer(vocab, merges, added, normalizers, bos=ids.get("<|endoftext|>"), **options)


# ------------------------------------------------------------------------------------------------
# 4. A model and its tokenizer, together: from a folder, or from a checkpoint that stores the
# tokenizer's plain data under "tokenizer" (byte models may store none: text.ByteTokenizer).

def check_tokenizer(tokenizer, vocab_size, where):
    """The tokenizer's ids must all be ids of the model (whose vocabulary may be padded beyond)."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary only "
                         f"{vocab_size}: they do not belong together")
    return tokenizer


def load_pretrained(folder, codebooks=None, block_size=None):
    """(model, tokenizer) of a Hugging Face model folder, checked against each other before the weights load."""
    c = read_config(folder)
    tokenizer = check_tokenizer(load_tokenizer(folder), FAMILIES[c["model_type"]](c, folder)[0]["vocab_size"], folder)
    return from_pretrained(folder, codebooks, block_size), tokenizer


def load_with_tokenizer(path, device="cpu"):
    """(model, tokenizer) of a codebook checkpoint: cb.load_model plus the tokenizer stored with it."""
    state = cb.load_checkpoint(path)
    stored = state.get("tokenizer")
    if stored is None and state["config"].get("vocab_size") != text.VOCAB_SIZE:
        raise ValueError(f"{path} stores no tokenizer and is not a byte model (vocab_size {state['config'].get('vocab_size')})")
    tokenizer = check_tokenizer(text.ByteTokenizer() if stored is None else tokenizer_from_dict(stored),
                                state["config"]["vocab_size"], path)
    model = cb.GPT(state["config"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer
