"""
Tokenizers of pretrained models, written here (no tokenizer package at run time), with the
interface of text.ByteTokenizer so every script treats them alike; each is plain data in a
checkpoint (to_dict / tokenizer_from_dict).
"""
import json
import os
import re
import unicodedata

import text

# ------------------------------------------------------------------------------------------------
# Byte-level BPE. Byte-level BPE (GPT-2's): the text's UTF-8 bytes, each shown as a printable
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


def check_tokenizer(tokenizer, vocab_size, where):
    """The tokenizer's ids must all be ids of the model (whose vocabulary may be padded beyond)."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary only "
                         f"{vocab_size}: they do not belong together")
    return tokenizer
