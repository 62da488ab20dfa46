"""
Tokenizers of pretrained models, written here (no tokenizer package at run time), with the
interface of text.ByteTokenizer so every script treats them alike; each is plain data in a
checkpoint (to_dict / tokenizer_from_dict). Two kinds:
- byte-level BPE (GPT-2, Pythia, MPT, Llama-3, SmolLM2, Qwen2/3, BLOOM, Falcon): BPETokenizer;
- SentencePiece BPE (Gemma, Llama-2, TinyLlama): SentencePieceBPE.
Both come from a model folder's tokenizer.json (load_tokenizer) or from a GGUF file's metadata
(tokenizer_from_gguf).
"""
import array
import heapq
import itertools
import os
import re
import unicodedata

import formats
import text

# ------------------------------------------------------------------------------------------------
# Pre-tokenisation patterns. The tokenizer files write them for Rust's and Oniguruma's regex engines,
# which know Unicode classes (\p{L} letters, \p{N} numbers, ...) that Python's re lacks: python_regex
# spells each class out as ranges of code points from unicodedata's categories. Characters newer than
# Python's Unicode tables (3.11: Unicode 14) belong to no class.

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
# OpenAI's o200k (GPT-4o): a word is cut before a capital that follows small letters (HTTPServer: HTTP, Server) and
# keeps its contraction; Mistral's tekken: the same words without contractions, digits one by one
_CAPITALS, _SMALL = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
O200K_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_CAPITALS}*{_SMALL}+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               rf"|[^\r\n\p{{L}}\p{{N}}]?{_CAPITALS}+{_SMALL}*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_CAPITALS}*{_SMALL}+|[^\r\n\p{{L}}\p{{N}}]?{_CAPITALS}+{_SMALL}*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek-V3's: digits in threes, then Chinese characters and kana, then this
DEEPSEEK3_SPLIT = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
                   r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
HAN_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
BLOOM_SPLIT = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"  # BLOOM's: anything but spaces and these stops
# tokenizers' Punctuation pre-tokenizer cuts at Unicode's punctuation and at ASCII's (Rust's is_ascii_punctuation,
# symbols too); its table of Unicode's punctuation (the unicode_categories crate's) is Unicode 8's: with U+166D and
# U+111C9 (since then So and Mn), without the punctuation added after it (U+061D, U+2E43.., ...), which \p{P} has here
# (Python 3.11's tables, Unicode 14; a later Python's adds more)
PUNCTUATION = ("(?![\\u061d\\u09fd\\u0a76\\u0c77\\u0c84\\u1b7d\\u1b7e\\u2e43-\\u2e4f\\u2e52-\\u2e5d\\U00010ead"
               "\\U00010f55-\\U00010f59\\U00010f86-\\U00010f89\\U0001144b-\\U0001144f\\U0001145a\\U0001145b"
               "\\U0001145d\\U00011660-\\U0001166c\\U000116b9\\U0001183b\\U00011944-\\U00011946\\U000119e2"
               "\\U00011a3f-\\U00011a46\\U00011a9a-\\U00011a9c\\U00011a9e-\\U00011aa2\\U00011c41-\\U00011c45"
               "\\U00011c70\\U00011c71\\U00011ef7\\U00011ef8\\U00011fff\\U00012ff1\\U00012ff2"
               "\\U00016e97-\\U00016e9a\\U00016fe2\\U0001e95e\\U0001e95f"
               "])[\\p{P}$+<=>^`|~\\u166d\\U000111c9]")
# Unicode's White_Space property: what \s matches there (Python's str.isspace() also counts U+001C..U+001F)
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_category_runs = []  # (first code point, last, category) of each run of one category
_classes = {}
_compiled = {}


def unicode_class(name):
    r"""The code points of \p{name} (a category such as Lu, or a major class such as L) as a
    character-class body for Python's re; the table of categories is built on first use (0.5 s)."""
    if not _category_runs:
        start, previous = 0, "Cc"
        for c in range(1, 0x110000):
            cat = unicodedata.category(chr(c))
            if cat != previous:
                _category_runs.append((start, c - 1, previous))
                start, previous = c, cat
        _category_runs.append((start, 0x10FFFF, previous))
    if name not in _classes:
        ranges = []
        for a, b, cat in _category_runs:
            if name in (cat, cat[0]):
                if ranges and ranges[-1][1] == a - 1:
                    ranges[-1][1] = b
                else:
                    ranges.append([a, b])
        if not ranges:
            raise ValueError(f"\\p{{{name}}}: unknown Unicode class (known: the categories and their major classes, e.g. L, Lu, N)")
        _classes[name] = "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)
    return _classes[name]


def python_regex(pattern):
    r"""A tokenizer file's pattern for Python's re: \p{..}, \P{..}, \s and \S spelt out, inside and outside [...]; a
    class inside a class (Oniguruma's union, as in BLOOM's [^(\s|[.,!?])]) joined to it (Python reads its [ as a
    character, its ] as the end)."""
    out, i, in_class, nested = [], 0, False, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            esc = pattern[i:i + 2]
            if esc in ("\\S", "\\P") and in_class:
                raise ValueError(f"pattern {pattern!r}: {esc} inside [...] is not implemented")
            if esc in ("\\p", "\\P") and pattern[i + 2:i + 3] == "{":
                end = pattern.index("}", i)
                ranges = unicode_class(pattern[i + 3:end])
                out.append(ranges if in_class else f"[{ranges}]" if esc == "\\p" else f"[^{ranges}]")
                i = end + 1
                continue
            out.append({"\\s": WHITESPACE if in_class else f"[{WHITESPACE}]", "\\S": f"[^{WHITESPACE}]"}.get(esc, esc))
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            out.append(c)
            i += 1
            if pattern[i:i + 1] == "^":
                out.append("^")
                i += 1
            continue
        if c == "[" and in_class:
            if pattern[i + 1:i + 2] == "^":
                raise ValueError(f"pattern {pattern!r}: a negated class inside [...] is not implemented")
            nested, i = nested + 1, i + 1
            continue
        if c == "]" and nested:
            nested, i = nested - 1, i + 1
            continue
        if c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def compiled(pattern):
    if pattern not in _compiled:
        try:
            _compiled[pattern] = re.compile(python_regex(pattern))
        except re.error as e:
            raise ValueError(f"pattern {pattern!r} does not translate to Python's re: {e}") from None
    return _compiled[pattern]


SPLIT_BEHAVIORS = ("isolated", "removed", "merged_with_previous", "merged_with_next", "contiguous")


def split(string, pattern, behavior, invert=False):
    """The pieces of `string` cut at the matches of `pattern` (with `invert`: at the text between them),
    as tokenizers' Split pre-tokenizer cuts them: those delimiters alone ('isolated'; 'contiguous': delimiters
    next to each other as one piece), dropped ('removed') or joined to the piece before or after, where that piece
    is not a delimiter too."""
    parts, start = [], 0  # the text before the first match, the match, the text before the next one, ...
    for m in compiled(pattern).finditer(string):
        if m.end() > m.start():
            parts += [string[start:m.start()], m.group()]
            start = m.end()
    parts.append(string[start:])
    if behavior == "isolated":
        return [part for part in parts if part]
    if behavior == "removed":
        return [part for part in parts[1 if invert else 0::2] if part]
    segments = [(part, i % 2 != invert) for i, part in enumerate(parts) if part]  # (part, whether it is a delimiter)
    if behavior == "contiguous":  # (tokenizers joins any two neighbours of one kind: with invert, matches next to each other)
        pieces = []
        for (part, delimiter), (_, before) in zip(segments, [("", None)] + segments):
            if delimiter == before:
                pieces[-1] += part
            else:
                pieces.append(part)
        return pieces
    with_next = behavior == "merged_with_next"
    pieces, beside_delimiter = [], False
    for part, delimiter in reversed(segments) if with_next else segments:
        if delimiter and pieces and not beside_delimiter:
            pieces[-1] = part + pieces[-1] if with_next else pieces[-1] + part
        else:
            pieces.append(part)
        beside_delimiter = delimiter
    return pieces[::-1] if with_next else pieces


def pre_tokenize(string, steps):
    """The words of `string` after each step in turn (a list of plain dicts: {"type": "Split",
    "pattern", "behavior", "invert"} or {"type": "ByteLevel", "add_prefix_space", "use_regex"}), each step
    cutting every piece the one before left, as tokenizers' Sequence does. A Split after the ByteLevel step cuts
    the bytes as that step shows them (BYTE_TO_CHAR), as tokenizers does: a character's UTF-8 bytes may part
    there (Falcon's digits: U+00B2 is both "²" and the last byte of "β"), so its words are bytes."""
    pieces, mapped = [string], False
    for step in steps:
        if step["type"] == "Split" and mapped:
            pieces = [bytes(CHAR_TO_BYTE[ch] for ch in q) for p in pieces for q in split(
                _byte_chars(p), step["pattern"], step["behavior"], step.get("invert", False))]
        elif step["type"] == "Split":
            pieces = [q for p in pieces for q in split(p, step["pattern"], step["behavior"], step.get("invert", False))]
        else:  # ByteLevel: GPT-2's pattern unless told otherwise
            mapped = True
            if step["add_prefix_space"]:
                pieces = [p if p.startswith(" ") else " " + p for p in pieces]
            if step["use_regex"]:
                pieces = [q for p in pieces for q in compiled(GPT2_SPLIT).findall(p)]
    return pieces


def _byte_chars(word):
    """A word's UTF-8 bytes (a str's, or bytes as they are) as ByteLevel shows them: one BYTE_TO_CHAR character each."""
    return (word if isinstance(word, bytes) else word.encode("utf-8")).decode("latin-1").translate(_LATIN1_TO_CHARS)


def byte_level(add_prefix_space=False, use_regex=True):
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "use_regex": use_regex}


def isolate(pattern):
    return {"type": "Split", "pattern": pattern, "behavior": "isolated"}


def splits(*patterns, then_gpt2=False):
    """Split steps (each pattern's matches cut out, in turn), then the bytes, cut by GPT-2's split too if then_gpt2."""
    return [isolate(p) for p in patterns] + [byte_level(use_regex=then_gpt2)]


# The pre-tokenisation a GGUF file names in tokenizer.ggml.pre, for byte-level BPE: llama.cpp's names and regex lists
# (its src/llama-vocab.cpp), grouped as it groups them, each list as the model's tokenizer.json writes it where
# llama.cpp quotes that beside its rewrite for its regex engine (the rewrites of tekken's and gpt-4o's cut capitals
# beyond ASCII and combining marks otherwise: the model's own is taken). Refused: the names whose split llama.cpp
# codes by hand (kimi-k2, afmoe, superbpe); tiny_aya (\b and \d, which Python's re reads otherwise); youtu and
# granite-embed-multi-97m (known here only as llama.cpp's rewrite, which reads \p{Lu} as any letter); deepseek-llm (a
# class of hundreds of literal ranges, not copied); and names read with more than a split (a separator, a <mask> taking
# the space before it, no byte mapping: roberta-bpe, jina-v1-en, jina-v2-*, modern-bert, granite-embed-multi-311m).
_LLAMA3_LIKE = ("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                "jina-v5-nano")
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_SPACE_RUNS = "|".join(rf"\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4)) + r"|\s{1,2}(?!\S)|\s{1}"
GGUF_PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "gigachat", "a.x-4.0", "mellum",
                     "exaone4", "trillion", "granite-docling"), splits(then_gpt2=True)),
    "default": splits(then_gpt2=True),  # no name: GPT-2's (llama.cpp's "default" cuts punctuation and digits first)
    # digits one by one, then GPT-2's split
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
                    splits(r"\p{N}", then_gpt2=True)),
    **dict.fromkeys(_LLAMA3_LIKE + ("dbrx", "smaug-bpe", "glm4", "chatglm-bpe"), splits(LLAMA3_SPLIT)),
    "jais-2": splits(LLAMA3_SPLIT.replace(r"\s+(?!\S)|\s+", _SPACE_RUNS)),  # runs of spaces cut in powers of two
    "minicpm5": splits(r"\p{N}{1,3}", LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}+")),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open",
                     "grok-2"), splits(QWEN2_SPLIT)),
    "laguna": splits(r"[^\n]+|[\n]+", QWEN2_SPLIT),  # lines and runs of newlines apart first
    "ufakzeka": splits(QWEN2_SPLIT.replace(_CONTRACTIONS + "|", "")),  # Qwen2's without contractions
    "qwen35": splits(_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                                     r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "seed-coder": splits(_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                                         r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
    # Ling's: possessive ?+ and ++ in its tokenizer.json, greedy here (the same cuts: nothing after them can fail)
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), splits(
        r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")),
    "exaone-moe": splits(_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                                         r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"),
    "tekken": splits(TEKKEN_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), splits(O200K_SPLIT)),
    # newlines, words with the space before them, punctuation runs, CJK and Hangul runs, digits one by one
    "deepseek-coder": splits(r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
                             r"\p{N}"),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "hy_v4", "joyai-llm"),
                    splits(r"\p{N}{1,3}", HAN_KANA, DEEPSEEK3_SPLIT)),
    "spark2_5": splits(r"\p{N}{1,3}", HAN_KANA, DEEPSEEK3_SPLIT.replace(r"[\r\n]*|\s*[\r\n]+|", r"|[\r\n]|"),
                       r"\p{N}"),  # DeepSeek-V3's, newlines one by one, digits one by one at last
    **dict.fromkeys(("bloom", "gpt3-finnish", "poro-chat"), splits(BLOOM_SPLIT)),
    "viking": splits(BLOOM_SPLIT, r"\p{N}"),
    # Falcon's tokenizer.json: runs of punctuation apart, GPT-2's split, then digit runs and threes of them cut in the bytes
    # as ByteLevel shows them (llama.cpp cuts the digits in the text instead, so not "²" out of "β")
    "falcon": [{"type": "Split", "pattern": PUNCTUATION, "behavior": "contiguous"}, byte_level(), isolate(r"\p{N}+"),
               isolate("[0-9][0-9][0-9]")],
    # sentinel and image tokens; a tab, newline, 4 or 2 spaces; digits; punctuation one by one; GPT-2's split
    "chameleon": splits(r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
                        r"[\p{P}!-/:-@\[-`{-~]", then_gpt2=True),
}
# The names llama.cpp reads taking a word that is a token as that token, whatever the merges (ignore_merges, as
# Llama-3's tokenizer.json has it), and those it adds BOS to unless the file says otherwise (add_bos_token)
GGUF_IGNORE_MERGES = frozenset(_LLAMA3_LIKE + ("tekken", "minicpm5"))
GGUF_ADD_BOS = frozenset(_LLAMA3_LIKE + ("tekken", "chameleon"))

# ------------------------------------------------------------------------------------------------
# What both kinds share: added tokens cut out of the text first, and the BPE merge loop.


def added_pattern(tokens, lstrip=(), rstrip=()):
    """(tokens, regex, lstrip, rstrip) finding the leftmost-longest of `tokens` (a dict {content: id}), or
    None; the contents in lstrip (rstrip) take the whitespace before (after) them, as split_added says. The
    regex is a trie of the contents, so thousands of them (Gemma has 6,384) cost little per character."""
    tokens = {content: i for content, i in tokens.items() if content}
    if not tokens:
        return None
    trie = {}
    for content in tokens:
        node = trie
        for ch in content:
            node = node.setdefault(ch, {})
        node[""] = {}

    def alternatives(node):
        branches = [re.escape(ch) + alternatives(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body  # greedy: the longer token first

    return tokens, re.compile(alternatives(trie)), frozenset(lstrip), frozenset(rstrip)


def split_added(string, added):
    """Yield (stretch, None) for plain stretches of the string and (content, id) for added tokens. A token
    marked lstrip (rstrip) also takes the whitespace before (after) it, which is dropped: where the next
    token starts inside that whitespace, it still counts, and what follows it is text again (as the
    tokenizers library does)."""
    if added is None:
        if string:
            yield string, None
        return
    ids, pattern, lstrip, rstrip = added
    start = 0
    for m in pattern.finditer(string):
        begin, end = m.start(), m.end()
        if m.group() in lstrip:
            while begin > start and is_whitespace(string[begin - 1]):
                begin -= 1
        if m.group() in rstrip:
            while end < len(string) and is_whitespace(string[end]):
                end += 1
        if begin > start:
            yield string[start:begin], None
        yield m.group(), ids[m.group()]
        start = end
    if start < len(string):
        yield string[start:], None


def is_whitespace(ch):
    """Whitespace as Rust (so the tokenizers library) has it: Python's, less the separators U+001C..U+001F."""
    return ch.isspace() and ch not in "\x1c\x1d\x1e\x1f"


def merge(parts, rank):
    """BPE: merge adjacent parts, the pair of lowest rank(pair) first (the leftmost among equals; rank
    returns None for a pair that never merges), until no pair is left: the tokenizers library's order.
    A heap of candidate pairs keeps this O(n log n), as a long line of CJK text without spaces needs."""
    parts, n = list(parts), len(parts)
    after, before = list(range(1, n + 1)), list(range(-1, n - 1))
    heap = [(r, i, left, right) for i, (left, right) in enumerate(zip(parts, parts[1:])) if (r := rank((left, right))) is not None]
    heapq.heapify(heap)
    while heap:
        _, i, left, right = heapq.heappop(heap)
        j = after[i]
        if parts[i] != left or j >= n or parts[j] != right:  # outdated: a part only grows, so it cannot match again
            continue
        parts[i], parts[j] = left + right, None
        after[i] = after[j]
        if after[i] < n:
            before[after[i]] = i
        for a, b in ((before[i], i), (i, after[i])):
            if a >= 0 and b < n and (r := rank((parts[a], parts[b]))) is not None:
                heapq.heappush(heap, (r, a, parts[a], parts[b]))
    return [p for p in parts if p is not None]


class Cache(dict):
    """Ids per word: texts repeat their words, so most are looked up, not merged."""

    def put(self, key, ids):
        if len(self) > 200_000:  # a bound on memory over a large corpus
            self.clear()
        self[key] = ids
        return ids


# ------------------------------------------------------------------------------------------------
# Byte-level BPE (GPT-2's): the text's UTF-8 bytes, each shown as a printable character, are cut
# into words by the pre-tokenizer, and each word's characters are merged pairwise, the pair with the
# lowest merge rank first, until no pair of the merge list is left.

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
NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")


class BPETokenizer:
    """Byte-level BPE with the vocabulary and merges of a GPT-2, Pythia, Llama-3, SmolLM2 or Qwen
    tokenizer. Added tokens (<|endoftext|>, <|im_start|>, ...) are cut out of the text first and
    encode to their own ids; `bos` starts (and so separates) documents as BOS does for bytes;
    `prefix` / `suffix` are the ids the model's own tokenizer puts around a text (encode(special=True))."""
    kind = "bpe"

    def __init__(self, vocab, merges, added_tokens=(), normalizers=(), pre_tokenizers=(byte_level(),),
                 ignore_merges=False, bos=None, eos=None, prefix=(), suffix=()):
        self.vocab, self.merges = dict(vocab), [list(m) for m in merges]
        self.added_tokens = [dict(t) for t in added_tokens]  # {"id", "content", "special", "normalized"[, "lstrip", "rstrip"]}
        self.normalizers, self.pre_tokenizers = list(normalizers), [dict(s) for s in pre_tokenizers]
        self.ignore_merges, self.bos, self.eos, self.prefix, self.suffix = ignore_merges, bos, eos, list(prefix), list(suffix)
        self.ranks = {tuple(m): rank for rank, m in enumerate(self.merges)}
        self.id_to_token = {i: t for t, i in self.vocab.items()} | {t["id"]: t["content"] for t in self.added_tokens}
        self.vocab_size = max(self.id_to_token) + 1
        self.token_bytes = {i: _token_bytes(t) for i, t in self.id_to_token.items()}
        self.special_ids = {t["id"] for t in self.added_tokens if t["special"]}
        # added tokens are matched longest first; unnormalised ones in the raw text, the rest after normalising
        self.raw_added, self.normalized_added = (
            added_pattern({t["content"]: t["id"] for t in self.added_tokens if t["normalized"] == normalized},
                          *({t["content"] for t in self.added_tokens if t.get(side)} for side in ("lstrip", "rstrip")))
            for normalized in (False, True))
        self.cache = Cache()

    def to_dict(self):
        """Plain Python data (for weights_only checkpoints); tokenizer_from_dict() rebuilds the tokenizer."""
        return {"kind": self.kind, "vocab": self.vocab, "merges": self.merges, "added_tokens": self.added_tokens,
                "normalizers": self.normalizers, "pre_tokenizers": self.pre_tokenizers,
                "ignore_merges": self.ignore_merges, "bos": self.bos, "eos": self.eos, "prefix": self.prefix,
                "suffix": self.suffix}

    def normalize(self, string):
        for form in self.normalizers:
            string = unicodedata.normalize(form, string)
        return string

    def encode(self, string, special=False):
        """str (or bytes, read as UTF-8) -> list of token ids; with special=True, between `prefix` and
        `suffix` as the model's own tokenizer gives them (transformers' add_special_tokens)."""
        if isinstance(string, bytes):
            string = string.decode("utf-8", errors="replace")
        ids = list(self.prefix) if special else []
        for raw, raw_id in split_added(string, self.raw_added):
            if raw_id is not None:
                ids.append(raw_id)
                continue
            for piece, piece_id in split_added(self.normalize(raw), self.normalized_added):
                if piece_id is not None:
                    ids.append(piece_id)
                    continue
                for word in pre_tokenize(piece, self.pre_tokenizers):
                    ids.extend(self.cache.get(word) or self._word_ids(word))
        return ids + self.suffix if special else ids

    def _word_ids(self, word):
        """A byte the vocabulary lacks (SmolLM2's has no 0x04, say) is dropped, as the tokenizers library does."""
        chars = _byte_chars(word)
        if self.ignore_merges and chars in self.vocab:
            return self.cache.put(word, [self.vocab[chars]])
        return self.cache.put(word, [self.vocab[p] for p in merge([c for c in chars if c in self.vocab], self.ranks.get)])

    def decode(self, ids, skip_special=False):
        """Token ids -> str (invalid UTF-8 as U+FFFD). Ids outside the vocabulary are dropped, and
        with skip_special the special tokens (<|endoftext|>, ...) too."""
        skip = self.special_ids if skip_special else ()
        return b"".join(self.bytes_of(i) for i in ids if int(i) not in skip).decode("utf-8", errors="replace")

    def bytes_of(self, token_id):
        """The bytes one token stands for (none for an id outside the vocabulary)."""
        return self.token_bytes.get(int(token_id), b"")


def _token_bytes(token):
    """The bytes a token stands for: its characters through CHAR_TO_BYTE, or, for an added token
    written as plain text (a run of spaces, say), its own UTF-8."""
    if all(ch in CHAR_TO_BYTE for ch in token):
        return bytes(CHAR_TO_BYTE[ch] for ch in token)
    return token.encode("utf-8")


# ------------------------------------------------------------------------------------------------
# SentencePiece BPE (Gemma, Llama-2): spaces become "▁" (U+2581), the characters of the text are
# merged pairwise, the pair whose merged token ranks best first (the merge list's order, or the
# merged token's score), and a character the vocabulary lacks is written as its UTF-8 bytes
# (<0x0A>-style tokens: byte fallback). Control tokens (<bos>, ...) and user-defined ones (Gemma's
# runs of newlines and tabs, HTML tags) are cut out of the raw text first, like added tokens.

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece's token types
DUMMY_PREFIXES = ("never", "first", "always")


def _hex(code, numbers):
    return array.array(code, numbers).tobytes().hex()


def _from_hex(code, data):
    numbers = array.array(code)
    numbers.frombytes(bytes.fromhex(data))
    return numbers.tolist()


class SentencePieceBPE:
    """SentencePiece BPE over `tokens` (by id) with their `types`; merge priority from `merges` (pairs,
    best first) or else from `scores` (higher first; for one merged token, the longer left part first,
    as transformers orders the merges it derives). `dummy_prefix`: a "▁" before the text's first
    stretch ("first", unless it starts with one) or before every stretch ("always"), or none. lstrip, rstrip:
    ids of added tokens that take the whitespace before or after them (split_added)."""
    kind = "sentencepiece"

    def __init__(self, tokens, types, scores=None, merges=None, bos=None, eos=None, unk=None, prefix=(), suffix=(),
                 dummy_prefix="never", lstrip=(), rstrip=()):
        if (scores is None) == (merges is None):
            raise ValueError("SentencePieceBPE takes either merges or scores, not both or neither")
        if dummy_prefix not in DUMMY_PREFIXES:
            raise ValueError(f"dummy_prefix={dummy_prefix!r} is not one of {DUMMY_PREFIXES}")
        self.tokens, self.types, self.scores = list(tokens), list(types), None if scores is None else list(scores)
        self.merges = None if merges is None else [list(m) for m in merges]
        self.bos, self.eos, self.unk, self.prefix, self.suffix = bos, eos, unk, list(prefix), list(suffix)
        self.dummy_prefix, self.vocab_size = dummy_prefix, len(self.tokens)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}  # a repeated token: its last id, as transformers
        self.pair_rank = self._score_rank if self.merges is None else {tuple(m): r for r, m in enumerate(self.merges)}.get
        self.byte_ids = [self.vocab.get(f"<0x{b:02X}>") for b in range(256)]
        self.special_ids = {i for i, t in enumerate(self.types) if t in (CONTROL, UNKNOWN)}
        self.lstrip, self.rstrip = sorted(lstrip), sorted(rstrip)
        self.added = added_pattern({self.tokens[i]: i for i, t in enumerate(self.types) if t in (CONTROL, UNKNOWN, USER_DEFINED)},
                                   {self.tokens[i] for i in self.lstrip}, {self.tokens[i] for i in self.rstrip})
        # where a vocabulary token with "▁" after another character (Gemma has one: ">▁</") starts: a merge
        # can cross the cut before that "▁"
        crossing = added_pattern({t: 0 for t in self.vocab if SPACE in t.lstrip(SPACE)})
        self.crossing = crossing and re.compile(f"(?=({crossing[1].pattern}))")
        self.cache, self.token_bytes = Cache(), None

    def _score_rank(self, pair):
        left, right = pair
        i = self.vocab.get(left + right)
        if i is None or left not in self.vocab or right not in self.vocab:
            return None
        return -self.scores[i], -len(left), -len(right), i

    def to_dict(self):
        """Plain Python data (for weights_only checkpoints; JSON too); from_dict() rebuilds the tokenizer.
        Compact: Gemma's 262k tokens as one string, numbers as hex, load in a tenth of a second (lists: 4 s)."""
        separator = next(c for c in map(chr, itertools.count()) if not any(c in t for t in self.tokens))
        ids = None if self.merges is None else [self.vocab[t] for pair in self.merges for t in pair]
        return {"kind": self.kind, "tokens": separator.join(self.tokens), "separator": separator,
                "types": "".join(map(str, self.types)), "scores": None if self.scores is None else _hex("f", self.scores),
                "merges": None if ids is None else _hex("I", ids), "bos": self.bos, "eos": self.eos, "unk": self.unk,
                "prefix": self.prefix, "suffix": self.suffix, "dummy_prefix": self.dummy_prefix} | {
                    # only where set: text.py keys corpora by to_dict()
                    side: ids for side, ids in (("lstrip", self.lstrip), ("rstrip", self.rstrip)) if ids}

    @classmethod
    def from_dict(cls, data):
        tokens = data["tokens"].split(data["separator"])
        scores, merges = (None if data[key] is None else _from_hex(code, data[key]) for key, code in (("scores", "f"), ("merges", "I")))
        return cls(tokens, list(map(int, data["types"])), scores=scores,
                   merges=None if merges is None else [(tokens[a], tokens[b]) for a, b in zip(merges[::2], merges[1::2])],
                   **{k: data[k] for k in ("bos", "eos", "unk", "prefix", "suffix", "dummy_prefix")},
                   **{k: data.get(k, ()) for k in ("lstrip", "rstrip")})

    def encode(self, string, special=False):
        """str (or bytes, read as UTF-8) -> list of token ids; with special=True, between `prefix` and
        `suffix` as the model's own tokenizer gives them (transformers' add_special_tokens)."""
        if isinstance(string, bytes):
            string = string.decode("utf-8", errors="replace")
        ids, first = list(self.prefix) if special else [], True
        for raw, raw_id in split_added(string, self.added):
            if raw_id is not None:
                ids.append(raw_id)
            else:
                piece = raw.replace(" ", SPACE)
                if self.dummy_prefix == "always" or (self.dummy_prefix == "first" and first and piece[0] != SPACE):
                    piece = SPACE + piece
                for chunk in self._chunks(piece):
                    ids.extend(self.cache.get(chunk) or self._chunk_ids(chunk))
            first = False
        return ids + self.suffix if special else ids

    def _chunks(self, piece):
        """The piece cut before each "▁" that follows another character (where no merge can cross: BPE
        over the whole piece gives the same tokens, but the chunks repeat and so are cached)."""
        cuts = [m.start() for m in re.finditer(f"(?<=[^{SPACE}]){SPACE}", piece)]
        if self.crossing is not None and cuts:
            inside = {c for m in self.crossing.finditer(piece) for c in range(m.start() + 1, m.start() + len(m.group(1)))}
            cuts = [c for c in cuts if c not in inside]
        return [piece[a:b] for a, b in zip([0, *cuts], [*cuts, len(piece)])]

    def _chunk_ids(self, chunk):
        ids = []
        for part in merge(list(chunk), self.pair_rank):
            i = self.vocab.get(part)
            if i is not None:
                ids.append(i)
            elif all(self.byte_ids[b] is not None for b in part.encode("utf-8")):  # decided per character
                ids.extend(self.byte_ids[b] for b in part.encode("utf-8"))
            elif self.unk is not None:
                if not ids or ids[-1] != self.unk:  # runs of unknown characters fuse into one <unk>
                    ids.append(self.unk)
            else:
                raise ValueError(f"the tokenizer has neither byte tokens nor an unknown token for {part!r}")
        return self.cache.put(chunk, ids)

    def decode(self, ids, skip_special=False):
        """Token ids -> str (invalid UTF-8 as U+FFFD). Ids outside the vocabulary are dropped, and with
        skip_special the control tokens (<bos>, ...) too."""
        skip = self.special_ids if skip_special else ()
        decoded = b"".join(self.bytes_of(i) for i in map(int, ids) if i not in skip).decode("utf-8", errors="replace")
        return decoded[1:] if self.dummy_prefix != "never" and decoded.startswith(" ") else decoded

    def bytes_of(self, token_id):
        """The bytes one token stands for, "▁" as a space (none for an id outside the vocabulary)."""
        if self.token_bytes is None:  # built on first use: 262k tokens take a moment
            self.token_bytes = [bytes([int(t[3:5], 16)]) if kind == BYTE else t.replace(SPACE, " ").encode("utf-8")
                                for t, kind in zip(self.tokens, self.types)]
        return self.token_bytes[token_id] if 0 <= token_id < self.vocab_size else b""


# ------------------------------------------------------------------------------------------------
# Loading: plain data, a model folder, GGUF metadata.

def tokenizer_from_dict(data):
    """The inverse of to_dict() for every tokenizer."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "bytes":
        return text.ByteTokenizer()
    classes = {"bpe": (BPETokenizer, ("vocab", "merges")), "sentencepiece": (SentencePieceBPE, ("tokens", "types"))}
    if kind not in classes:
        raise ValueError(f"tokenizer data of kind {kind!r} is not 'bytes', 'bpe' or 'sentencepiece'")
    cls, needed = classes[kind]
    missing = [key for key in needed if key not in data]
    if missing:
        raise ValueError(f"tokenizer data of kind {kind!r} lacks {', '.join(missing)}: it is not a tokenizer's to_dict()")
    if cls is SentencePieceBPE:
        return cls.from_dict(data)
    data = {k: v for k, v in data.items() if k != "kind"}
    if "pre_tokenizers" not in data:  # written before pre-tokenizer sequences: GPT-2's ByteLevel and its two options
        data["pre_tokenizers"] = [byte_level(data.pop("add_prefix_space", False), data.pop("use_regex", True))]
    return cls(**data)


def _normalizers(spec):
    """The flat list of a tokenizer.json's normalizers."""
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return [n for s in spec["normalizers"] for n in _normalizers(s)]
    return [spec]


def _pattern(spec, path):
    if "Regex" in spec:
        return spec["Regex"]
    if "String" in spec:
        return re.escape(spec["String"])
    raise ValueError(f"{path}: pattern {spec!r} is neither a Regex nor a String")


def _pre_tokenizers(spec, path):
    """A tokenizer.json's byte-level pre-tokenizer as pre_tokenize's steps."""
    kind = (spec or {}).get("type")
    if kind == "Sequence":
        return [step for s in spec["pretokenizers"] for step in _pre_tokenizers(s, path)]
    if kind == "ByteLevel":
        return [byte_level(spec.get("add_prefix_space", False), spec.get("use_regex", True))]
    if kind == "Digits":
        return [isolate(r"\p{N}" if spec.get("individual_digits") else r"\p{N}+")]
    if kind in ("Split", "Punctuation"):
        # MergedWithPrevious -> merged_with_previous (Punctuation's default: Isolated)
        behavior = re.sub(r"(?<!^)([A-Z])", r"_\1", spec.get("behavior", "Isolated")).lower()
        if behavior not in SPLIT_BEHAVIORS:
            raise ValueError(f"{path}: {kind} behavior {spec['behavior']!r} is not implemented (supported: "
                             f"{', '.join(SPLIT_BEHAVIORS)})")
        pattern = PUNCTUATION if kind == "Punctuation" else _pattern(spec["pattern"], path)
        step = {"type": "Split", "pattern": pattern, "behavior": behavior}
        step |= {"invert": True} if spec.get("invert") else {}  # only where set: text.py keys corpora by to_dict()
        compiled(step["pattern"])  # a pattern Python cannot take fails here, before any text
        return [step]
    raise ValueError(f"{path}: pre_tokenizer {kind!r} is not implemented (byte-level BPE takes Sequence, Split, "
                     f"Punctuation, Digits, ByteLevel)")


def _template(spec, path):
    """(prefix, suffix): the special-token ids a post-processor puts around a single text."""
    kind = (spec or {}).get("type")
    if kind in (None, "ByteLevel"):
        return [], []
    if kind == "Sequence":
        parts = [_template(s, path) for s in spec["processors"]]
        return [i for p, _ in parts for i in p], [i for _, s in parts for i in s]
    if kind == "TemplateProcessing":
        prefix, suffix, seen = [], [], False
        for item in spec["single"]:
            if "Sequence" in item:
                seen = True
            else:
                (suffix if seen else prefix).extend(spec["special_tokens"][item["SpecialToken"]["id"]]["ids"])
        return prefix, suffix
    raise ValueError(f"{path}: post_processor {kind!r} is not implemented (supported: TemplateProcessing, ByteLevel)")


def _sentencepiece_from_json(spec, path):
    """A tokenizer.json of SentencePiece BPE (byte fallback, spaces replaced by "▁") as SentencePieceBPE."""
    model, dummy, replaced = spec["model"], "never", False
    for n in _normalizers(spec.get("normalizer")):
        if n["type"] == "Prepend" and n["prepend"] == SPACE:
            dummy = "always"
        elif n["type"] == "Replace" and n["pattern"].get("String") == " " and n["content"] == SPACE:
            replaced = True
        else:
            raise ValueError(f"{path}: normalizer {n} is not implemented for SentencePiece BPE "
                             f"(supported: Replace ' ' by '▁', Prepend '▁')")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("replacement", SPACE) == SPACE and not pre.get("split") \
            and pre.get("prepend_scheme") in ("first", "never") and dummy == "never":
        dummy, replaced = pre["prepend_scheme"], True
    elif pre and not (pre.get("type") == "Split" and pre["pattern"].get("String") == " " and replaced):  # a no-op then
        raise ValueError(f"{path}: pre_tokenizer {pre} is not implemented for SentencePiece BPE (supported: none, "
                         f"Metaspace '▁' without split, prepending first or never; Split at ' ' after the Replace normalizer)")
    if not replaced:
        raise ValueError(f"{path}: BPE with byte_fallback but spaces are not written as '▁' (no Replace normalizer "
                         f"nor Metaspace pre-tokenizer): not SentencePiece BPE, which is all byte fallback is implemented for")
    tokens = [None] * (1 + max([*model["vocab"].values(), *(t["id"] for t in spec.get("added_tokens", []))]))
    types = [NORMAL] * len(tokens)
    for t, i in model["vocab"].items():
        tokens[i] = t
        if re.fullmatch(r"<0x[0-9A-F]{2}>", t):
            types[i] = BYTE
    for t in spec.get("added_tokens", []):
        if t.get("normalized") and (not t["special"] or t.get("lstrip") or t.get("rstrip")):
            raise ValueError(f"{path}: added token {t['content']!r} is normalized (and not special, or stripping "
                             f"whitespace), which is not implemented here")
        tokens[t["id"]], types[t["id"]] = t["content"], CONTROL if t["special"] else USER_DEFINED
    if None in tokens:
        raise ValueError(f"{path}: the vocabulary has no token of id {tokens.index(None)}")
    ids = {t: i for i, t in enumerate(tokens)}
    prefix, suffix = _template(spec.get("post_processor"), path)
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    strip = {side: [t["id"] for t in spec.get("added_tokens", []) if t.get(side)] for side in ("lstrip", "rstrip")}
    return SentencePieceBPE(tokens, types, merges=merges, bos=prefix[0] if prefix else ids.get("<s>", ids.get("<bos>")),
                            eos=ids.get("</s>", ids.get("<eos>")), unk=ids.get(model.get("unk_token")), prefix=prefix,
                            suffix=suffix, dummy_prefix=dummy, **strip)


def load_tokenizer(folder):
    """The tokenizer of a model folder: tokenizer.json (byte-level BPE, or SentencePiece BPE with byte
    fallback), or vocab.json + merges.txt (GPT-2's pre-tokenisation; added tokens from added_tokens.json
    and tokenizer_config.json). Its BOS and end of turn as tokenizer_config.json names them, if it does."""
    path, config = os.path.join(folder, "tokenizer_config.json"), {}
    if os.path.isfile(path):
        config = formats.read_json(path)
    tokenizer = _tokenizer_of_folder(folder, config)
    ids = tokenizer.vocab | {t["content"]: t["id"] for t in getattr(tokenizer, "added_tokens", ())}
    for key in ("bos", "eos"):
        name = config.get(f"{key}_token")
        name = name.get("content") if isinstance(name, dict) else name
        if name in ids:
            setattr(tokenizer, key, ids[name])
    return tokenizer


def _tokenizer_of_folder(folder, config):
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        spec = formats.read_json(path)
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: model type {model.get('type')!r} is not implemented (only 'BPE')")
        for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(option):
                raise ValueError(f"{path}: BPE option {option}={model[option]!r} is not implemented")
        for t in spec.get("added_tokens", []):
            if t.get("single_word"):
                raise ValueError(f"{path}: added token {t['content']!r} uses single_word, which is not implemented")
        if model.get("byte_fallback"):
            return _sentencepiece_from_json(spec, path)
        if (spec.get("decoder") or {}).get("type") not in ("ByteLevel", None):
            raise ValueError(f"{path}: decoder {spec['decoder']['type']!r} is not implemented (byte-level BPE "
                             f"takes ByteLevel; SentencePiece BPE needs byte_fallback)")
        pre_tokenizers = _pre_tokenizers(spec.get("pre_tokenizer"), path)
        if not any(step["type"] == "ByteLevel" for step in pre_tokenizers):
            raise ValueError(f"{path}: the pre_tokenizer has no ByteLevel step, so this is not byte-level BPE")
        if sum(step["type"] == "ByteLevel" for step in pre_tokenizers) > 1:
            raise ValueError(f"{path}: the pre_tokenizer maps the bytes twice (two ByteLevel steps), which is not implemented")
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        added = [{"id": t["id"], "content": t["content"], "special": t["special"], "normalized": t["normalized"]}
                 | {side: True for side in ("lstrip", "rstrip") if t.get(side)}
                 for t in spec.get("added_tokens", [])]
        normalizers = [n["type"] for n in _normalizers(spec.get("normalizer"))]
        if any(n not in NORMALIZERS for n in normalizers):
            raise ValueError(f"{path}: normalizers {normalizers} are not all implemented (supported: {', '.join(NORMALIZERS)})")
        vocab = model["vocab"]
        ids = {t["content"]: t["id"] for t in added} | vocab
        prefix, suffix = _template(spec.get("post_processor"), path)
        return BPETokenizer(vocab, merges, added, normalizers, pre_tokenizers, model.get("ignore_merges", False),
                            bos=prefix[0] if prefix else ids.get("<|endoftext|>"), prefix=prefix, suffix=suffix)
    if os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
        if config.get("tokenizer_class") not in (None, "GPT2Tokenizer", "GPT2TokenizerFast"):
            raise ValueError(f"{folder}: a {config['tokenizer_class']} from vocab.json + merges.txt, whose pre-tokenisation "
                             f"only its tokenizer.json spells out: save the tokenizer with it (transformers, once: "
                             f"AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
        vocab = formats.read_json(os.path.join(folder, "vocab.json"))
        with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
            merges = [line.split(" ") for line in f.read().splitlines() if line and not line.startswith("#version")]
        added = {t: {"id": vocab[t], "content": t, "special": True, "normalized": False} for t in ["<|endoftext|>"] if t in vocab}
        if os.path.isfile(os.path.join(folder, "added_tokens.json")):  # as slow tokenizers save the tokens added to them
            added |= {t: {"id": int(i), "content": t, "special": False, "normalized": False}
                      for t, i in formats.read_json(os.path.join(folder, "added_tokens.json")).items()}
        for i, t in config.get("added_tokens_decoder", {}).items():
            if t.get("single_word"):
                raise ValueError(f"{folder}/tokenizer_config.json: added token {t['content']!r} uses single_word, "
                                 f"which is not implemented")
            added[t["content"]] = {"id": int(i), "content": t["content"], "special": bool(t.get("special")),
                                   "normalized": bool(t.get("normalized"))}
            added[t["content"]] |= {side: True for side in ("lstrip", "rstrip") if t.get(side)}
        return BPETokenizer(vocab, merges, list(added.values()), bos=vocab.get("<|endoftext|>"))
    sentencepiece = os.path.isfile(os.path.join(folder, "tokenizer.model"))
    raise ValueError(f"{folder} has no tokenizer.json (nor vocab.json + merges.txt)" + (
        ": its tokenizer.model (SentencePiece) is not read here; write its tokenizer.json with transformers, once: "
        "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)" if sentencepiece else ""))


def tokenizer_from_gguf(metadata):
    """The tokenizer a GGUF file's metadata ({key: value}) describes: tokenizer.ggml.model "gpt2" is
    byte-level BPE (pre-tokenisation named by tokenizer.ggml.pre), "llama" SentencePiece BPE."""
    model = metadata.get("tokenizer.ggml.model")
    needs = {"gpt2": ("tokens", "merges"), "llama": ("tokens", "scores")}
    if model is None:
        raise ValueError("the GGUF file holds no tokenizer (no tokenizer.ggml.model in its metadata): give a GGUF file "
                         "converted with its tokenizer")
    if model not in needs:
        raise ValueError(f"GGUF tokenizer.ggml.model {model!r} is not implemented (supported: 'gpt2', byte-level "
                         f"BPE; 'llama', SentencePiece BPE)")
    for key in needs[model]:
        if f"tokenizer.ggml.{key}" not in metadata:
            raise ValueError(f"GGUF metadata has no tokenizer.ggml.{key}, which a {model!r} tokenizer needs")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
    # plain ints and floats (a reader may give numpy ones), so the tokenizer stays plain data
    bos, eos, unk = (None if metadata.get(f"tokenizer.ggml.{key}_token_id") is None
                     else int(metadata[f"tokenizer.ggml.{key}_token_id"]) for key in ("bos", "eos", "unknown"))
    pre = metadata.get("tokenizer.ggml.pre", "default")
    # llama.cpp adds BOS unless told otherwise to a SentencePiece vocabulary and to the byte-level ones GGUF_ADD_BOS
    # names (Llama-3's: as its tokenizer.json's template adds <|begin_of_text|>)
    add_bos = model == "llama" or (model == "gpt2" and pre in GGUF_ADD_BOS)
    prefix = [bos] if metadata.get("tokenizer.ggml.add_bos_token", add_bos) and bos is not None else []
    suffix = [eos] if metadata.get("tokenizer.ggml.add_eos_token", False) and eos is not None else []
    # llama.cpp gives a model named Phi-3 (general.name) special tokens that drop the whitespace after them, as its
    # tokenizer.json marks them rstrip: every control, user-defined and unknown token but <unk>, <s> and <|endoftext|>.
    # The whitespace is the tokenizer.json's (Unicode's; llama.cpp's is ASCII only), and a special token starting
    # inside it counts, as there (llama.cpp cuts the longer special tokens out first)
    phi3 = any(name in str(metadata.get("general.name", "")).lower() for name in ("phi-3", "phi3"))
    rstrip = {i for i, (t, kind) in enumerate(zip(tokens, types))
              if phi3 and kind in (CONTROL, USER_DEFINED, UNKNOWN) and t not in ("<unk>", "<s>", "<|endoftext|>")}
    if model == "gpt2":
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} is not implemented (supported: "
                             f"{', '.join(sorted(GGUF_PRE_TOKENIZERS))})")
        # control and user-defined tokens are added ones, but not those spelt outside the byte alphabet: mislabels
        # of llama.cpp's converter (as transformers reads these files)
        added = [{"id": i, "content": t, "special": kind == CONTROL, "normalized": False}
                 | ({"rstrip": True} if i in rstrip else {}) for i, (t, kind) in enumerate(zip(tokens, types))
                 if kind in (CONTROL, USER_DEFINED) and all(ch in CHAR_TO_BYTE for ch in t)]
        # a token spelt outside the byte alphabet stands for its UTF-8 (as transformers reads these files)
        vocab = {t if all(ch in CHAR_TO_BYTE for ch in t) else t.encode().decode("latin-1").translate(_LATIN1_TO_CHARS): i
                 for i, t in enumerate(tokens)}
        return BPETokenizer(vocab, [m.split(" ") for m in metadata["tokenizer.ggml.merges"]], added,
                            pre_tokenizers=GGUF_PRE_TOKENIZERS[pre], ignore_merges=pre in GGUF_IGNORE_MERGES,
                            bos=bos, eos=eos, prefix=prefix, suffix=suffix)
    scores = [float(x) for x in metadata["tokenizer.ggml.scores"]]
    if str(metadata.get("general.architecture", "")).startswith("gemma"):
        # Gemma's files spell runs of spaces with spaces, not "▁", and score user-defined tokens -1000 though they
        # merge first: its merge order is the order of its tokens (as transformers reads these files)
        for i, t in enumerate(tokens):
            if " " in t and not t.strip():
                tokens[i], types[i] = SPACE * len(t), NORMAL
        scores = [-float(i) for i in range(len(tokens))]
    # a "▁" before every stretch of text, after a special or user-defined token too, as llama.cpp reads these files
    # and as the same model's tokenizer.json (its Prepend normalizer) has it
    dummy = "always" if metadata.get("tokenizer.ggml.add_space_prefix", True) else "never"
    return SentencePieceBPE(tokens, types, scores=scores, bos=bos, eos=eos, unk=unk,
                            prefix=prefix, suffix=suffix, dummy_prefix=dummy, rstrip=rstrip)


def check_tokenizer(tokenizer, vocab_size, where):
    """The tokenizer, if its ids are ids of the model (whose vocabulary may be padded beyond). Special tokens
    past the model's vocabulary that the tokenizer never adds itself (Gemma-3's <image_soft_token>, of its
    image model) are dropped from it: a text that spells one out is read as plain text."""
    own = {getattr(tokenizer, "eos", None), tokenizer.bos, *getattr(tokenizer, "prefix", ()), *getattr(tokenizer, "suffix", ())}
    outside = sorted(i for i in own - {None} if not 0 <= i < tokenizer.vocab_size)
    if outside:
        raise ValueError(f"{where}: the tokenizer's BOS / EOS ids {outside} are not among its {tokenizer.vocab_size} tokens")
    beyond = set(range(vocab_size, tokenizer.vocab_size))
    if beyond - tokenizer.special_ids or beyond & own:
        raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary only "
                         f"{vocab_size}: they do not belong together")
    if not beyond:
        return tokenizer
    if tokenizer.kind == "bpe":
        return tokenizer_from_dict(tokenizer.to_dict() | {"added_tokens": [t for t in tokenizer.added_tokens if t["id"] < vocab_size]})
    return SentencePieceBPE(tokenizer.tokens[:vocab_size], tokenizer.types[:vocab_size],
                            scores=None if tokenizer.scores is None else tokenizer.scores[:vocab_size], merges=tokenizer.merges,
                            bos=tokenizer.bos, eos=tokenizer.eos, unk=tokenizer.unk, prefix=tokenizer.prefix,
                            suffix=tokenizer.suffix, dummy_prefix=tokenizer.dummy_prefix,
                            **{side: [i for i in getattr(tokenizer, side) if i < vocab_size] for side in ("lstrip", "rstrip")})
