"""bpe.py against the `tokenizers` library and transformers: tiny tokenizers trained by `tokenizers`
in the shapes today's models use (Llama-3's and Qwen2's split patterns, SmolLM2's digits, added
special tokens, templates adding bos, SentencePiece BPE with byte fallback) give the same ids on
~200 KB of this Python's standard library source and on non-ASCII text; so do the real SmolLM2 and
Gemma-3 GGUF files against transformers' tokenizers for them. The real-model tests skip where the
files or the test-only packages are missing, unless CODEBOOK_REQUIRE_MODELS=1 (as in CI)."""
import io
import json
import os
import re
import unicodedata

import numpy as np
import pytest
import torch

import bpe
import formats
import steer
from conftest import GEMMA3, SAMPLE, SMOLLM2, need, real_model, stdlib_text, trained_bpe

LONG_LINE = "".join(stdlib_text(0, 180_000).split())  # 130k characters, no space: one word of 130k characters to merge
SPECIALS = ["<|endoftext|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]


def trained(tmp_path, pre_tokenizer, normalizer=None, template=None, added=(), ignore_merges=False):
    """conftest's trained_bpe with SPECIALS, and a template of them around every text if given."""
    tok = trained_bpe(tmp_path, pre_tokenizer, normalizer, SPECIALS, added, ignore_merges=ignore_merges)
    if template:
        tok.post_processor = need("tokenizers").processors.TemplateProcessing(single=template, special_tokens=[
            (t, tok.token_to_id(t)) for t in SPECIALS if t in template])
        tok.save(str(tmp_path / "tokenizer.json"))
    return tok


def byte_level_cases(tk):
    pt, Regex = tk.pre_tokenizers, tk.Regex
    return {  # Llama-3 / Qwen2: the pattern, then bytes without GPT-2's pattern; SmolLM2: digits one by one first
        "llama3": dict(pre_tokenizer=pt.Sequence([pt.Split(Regex(bpe.LLAMA3_SPLIT), "isolated"), pt.ByteLevel(False, use_regex=False)]),
                       template="<|begin_of_text|> $A", ignore_merges=True),
        "qwen2": dict(pre_tokenizer=pt.Sequence([pt.Split(Regex(bpe.QWEN2_SPLIT), "isolated"), pt.ByteLevel(False, use_regex=False)]),
                      normalizer=tk.normalizers.NFC()),
        "smollm2": dict(pre_tokenizer=pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(False, use_regex=True)]),
                        added=["<think>", "    "]),
        # the other Split behaviours, digits in runs, a prefix space before every piece, a suffix template
        "behaviours": dict(pre_tokenizer=pt.Sequence([pt.Split(Regex(r"[.,;:!?]"), "merged_with_previous"),
                                                      pt.Split(Regex(r"\s+"), "merged_with_next"), pt.Digits(),
                                                      pt.Split(Regex(r"\p{Lu}"), "removed"),
                                                      pt.ByteLevel(add_prefix_space=True, use_regex=False)]),
                           template="<|im_start|> $A <|im_end|>"),
        # inverted Splits: cl100k's pattern as tiktoken conversions write it (what it matches kept, the rest
        # removed), then the text between runs of spaces joined to the run before and after it
        "inverted": dict(pre_tokenizer=pt.Sequence([pt.Split(Regex(bpe.LLAMA3_SPLIT), "removed", invert=True),
                                                    pt.Split(Regex(r"[^ ]+"), "merged_with_previous", invert=True),
                                                    pt.Split(Regex(r"[^\n]+"), "merged_with_next", invert=True),
                                                    pt.ByteLevel(False, use_regex=False)])),
        # BLOOM's tokenizer.json: its stops a class inside the class (Oniguruma's union), (, |, ) and spaces cut too
        "bloom": dict(pre_tokenizer=pt.Sequence([pt.Split(Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+"), "isolated"),
                                                 pt.ByteLevel(False, use_regex=False)])),
        # Falcon's tokenizer.json: runs of punctuation (ASCII's symbols too) apart, GPT-2's split, then digit runs and
        # threes of digits cut in the bytes as ByteLevel shows them (SAMPLE's "½", and the byte BD of other characters)
        "falcon": dict(pre_tokenizer=pt.Sequence([pt.Punctuation("contiguous"), pt.ByteLevel(False, use_regex=True),
                                                  pt.Digits(individual_digits=False), pt.Split(Regex("[0-9][0-9][0-9]"), "isolated")])),
    }


def as_byte_chars(pieces):
    """Pieces (text, or bytes where a step after ByteLevel cut a character) as tokenizers shows them: byte by byte."""
    return ["".join(bpe.BYTE_TO_CHAR[b] for b in (p if isinstance(p, bytes) else p.encode())) for p in pieces]


@pytest.mark.parametrize("case", ["llama3", "qwen2", "smollm2", "behaviours", "inverted", "bloom", "falcon"])
def test_pre_tokenizer_sequences_equal_the_tokenizers_library(case, tmp_path):
    tk = need("tokenizers")
    theirs = trained(tmp_path, **byte_level_cases(tk)[case])
    ours = bpe.load_tokenizer(str(tmp_path))
    assert [step["type"] for step in ours.pre_tokenizers].count("ByteLevel") == 1 and ours.vocab_size == theirs.get_vocab_size()
    assert (ours.pre_tokenizers[-1]["type"] == "ByteLevel") == (case != "falcon")
    unseen = stdlib_text(60, 200_000)  # source the tokenizer was not trained on
    for string in [unseen, LONG_LINE]:
        assert ours.encode(string, special=True) == theirs.encode(string).ids
    # the pieces themselves: a piece cut too coarsely can give the same ids, where no merge crosses the cut
    normalized = theirs.normalizer.normalize_str(SAMPLE) if theirs.normalizer else SAMPLE
    as_bytes = as_byte_chars(bpe.pre_tokenize(normalized, ours.pre_tokenizers))
    assert as_bytes == [piece for piece, _ in theirs.pre_tokenizer.pre_tokenize_str(normalized)]
    for string in [SAMPLE, SAMPLE + "<|im_start|>user\n" + SAMPLE[:80] + "<|im_end|><think>x", "", " ", "\x1c\x1d a 12345"]:
        ids = ours.encode(string, special=True)
        assert ids == theirs.encode(string).ids and ours.encode(string) == theirs.encode(string, add_special_tokens=False).ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids, skip_special=True) == theirs.decode(ids, skip_special_tokens=True)
        if case in ("llama3", "smollm2", "bloom", "falcon"):  # the others change the text: NFC, removed capitals, spaces put before pieces
            assert ours.decode(ours.encode(string)) == string
    if case == "llama3":
        assert ours.ignore_merges and json.loads((tmp_path / "tokenizer.json").read_text())["model"]["ignore_merges"]
        assert ours.bos == theirs.token_to_id("<|begin_of_text|>") and ours.prefix == [ours.bos] and ours.suffix == []
    again = bpe.tokenizer_from_dict(ours.to_dict())
    assert again.encode(SAMPLE, special=True) == ours.encode(SAMPLE, special=True) and again.bos == ours.bos
    if case == "smollm2":  # a checkpoint written before pre-tokenizer sequences: GPT-2's ByteLevel with its two options
        old = {k: v for k, v in ours.to_dict().items() if k not in ("pre_tokenizers", "eos", "prefix", "suffix")}
        old = bpe.tokenizer_from_dict(old | {"add_prefix_space": False, "use_regex": True})
        assert old.pre_tokenizers == [bpe.byte_level()] and old.encode("hello world") == ours.encode("hello world")


def test_a_glm4_shaped_tokenizer_json_equals_the_tokenizers_library(tmp_path):
    """GLM-4's tokenizer.json (glm-4-9b-chat-hf, GLM-4-0414): cl100k's split (LLAMA3 below, digits in runs of up to
    three), then the bytes without GPT-2's pattern, merges not ignored, a template putting [gMASK] and <sop> before every
    text, and its special tokens cut out of the text first."""
    tk = need("tokenizers")
    pt = tk.pre_tokenizers
    specials = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
                "<|observation|>"]
    theirs = trained_bpe(tmp_path, pt.Sequence([pt.Split(tk.Regex(LLAMA3), "isolated"), pt.ByteLevel(False, use_regex=False)]),
                         specials=specials, corpus=[stdlib_text(0, 100_000)])
    theirs.post_processor = tk.processors.TemplateProcessing(single="[gMASK] <sop> $A", special_tokens=[
        (t, theirs.token_to_id(t)) for t in ("[gMASK]", "<sop>")])
    theirs.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    ours = bpe.load_tokenizer(str(tmp_path))
    assert ours.prefix == [theirs.token_to_id("[gMASK]"), theirs.token_to_id("<sop>")] and not ours.ignore_merges
    assert ours.eos == theirs.token_to_id("<|endoftext|>")
    for string in [SAMPLE, "<|user|>\n" + SAMPLE[:120] + "<|assistant|>\n12345 x<|endoftext|>", stdlib_text(60, 50_000), "", " "]:
        assert ours.encode(string, special=True) == theirs.encode(string).ids
        assert ours.encode(string) == theirs.encode(string, add_special_tokens=False).ids


@pytest.mark.parametrize("name", ["exaone", "exaone4"])
def test_an_exaone_shaped_tokenizer_json_and_its_gguf_name_equal_the_tokenizers_library(name, tmp_path):
    """EXAONE's tokenizer.json in the shape llama.cpp's pre-tokenizer names imply (EXAONE 3's "exaone": digits one by
    one, then GPT-2's split; EXAONE 4's "exaone4": GPT-2's split), its special tokens ([BOS], [|endofturn|], [|user|], ...:
    brackets and bars, cut out of the text first), no template (nothing added before a text), BOS and EOS from
    tokenizer_config.json; and the same vocabulary and merges as a GGUF file's metadata with that tokenizer.ggml.pre."""
    tk = need("tokenizers")
    pt = tk.pre_tokenizers
    specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "[|system|]", "[|user|]", "[|assistant|]", "[|endofturn|]"]
    steps = ([pt.Digits(individual_digits=True)] if name == "exaone" else []) + [pt.ByteLevel(False, use_regex=True)]
    theirs = trained_bpe(tmp_path, pt.Sequence(steps), specials=specials, added=["<think>", "</think>"],
                         corpus=[stdlib_text(0, 100_000), SAMPLE * 20])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "[BOS]", "eos_token": "[|endofturn|]",
                                                                "pad_token": "[PAD]", "unk_token": "[UNK]"}))
    ours = bpe.load_tokenizer(str(tmp_path))
    assert (ours.bos, ours.eos) == (theirs.token_to_id("[BOS]"), theirs.token_to_id("[|endofturn|]")) and ours.prefix == []
    ids = theirs.get_vocab()
    tokens = sorted(ids, key=ids.get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(theirs.to_str())["model"]["merges"]]
    from_gguf = bpe.tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": name, "tokenizer.ggml.tokens": tokens,
                                         "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": [
                                             bpe.CONTROL if t in specials else bpe.NORMAL for t in tokens]})
    chat = "[|system|]x[|endofturn|]\n[|user|]" + SAMPLE[:160] + "[|endofturn|]\n[|assistant|]<think>\n\n</think>\n12345 "
    for string in [SAMPLE, chat, stdlib_text(60, 50_000), "", " 2024-06-01 x1y22z333"]:
        assert ours.encode(string, special=True) == theirs.encode(string).ids, string[:40]
        assert ours.encode(string) == theirs.encode(string, add_special_tokens=False).ids
        assert ours.decode(ours.encode(string, special=True)) == string
        if "[|" not in string:  # (the GGUF file's added tokens: its CONTROL ones, cut out only where asked)
            assert from_gguf.encode(string) == theirs.encode(string, add_special_tokens=False).ids


def test_split_behaviours_and_punctuation_cut_as_the_tokenizers_library():
    """bpe.split with each behaviour, inverted or not, cuts as tokenizers' Split (contiguous: neighbours of one kind as one
    piece, inverted matches too), and PUNCTUATION's class as its Punctuation (Unicode's punctuation, ASCII's symbols)."""
    pt, Regex = need("tokenizers").pre_tokenizers, need("tokenizers").Regex
    texts = [SAMPLE, "a..b!!c , d--e ...x. «y» $5+3=8 ^_^ `|~ a  b   c", "..x..", "", "x", " . "]
    for behavior in bpe.SPLIT_BEHAVIORS:
        for t in texts:
            assert bpe.split(t, bpe.PUNCTUATION, behavior) == [p for p, _ in pt.Punctuation(behavior).pre_tokenize_str(t)]
            for invert in (False, True):
                theirs = pt.Split(Regex(r"\s|\."), behavior, invert=invert).pre_tokenize_str(t)
                assert bpe.split(t, r"\s|\.", behavior, invert) == [p for p, _ in theirs], (behavior, invert, t)


def test_punctuation_is_the_tokenizers_library_s_character_for_character():
    """PUNCTUATION matches what tokenizers' Punctuation cuts at, every code point: its table of Unicode's punctuation is an
    older Unicode's (U+166D and U+111C9 in it, the punctuation added since, as U+2E53 and U+061D, not), not this Python's
    \\p{P}; and Falcon's pre-tokenizer cuts a text of those as tokenizers does."""
    if unicodedata.unidata_version != "14.0.0":  # PUNCTUATION leaves out what Unicode 9 to 14 added to \p{P}
        pytest.skip(f"PUNCTUATION's exceptions are written for Python 3.11's Unicode 14, not {unicodedata.unidata_version}")
    pt = need("tokenizers").pre_tokenizers
    chars = [chr(c) for c in range(0x21, 0x30000) if not 0xD800 <= c < 0xE000]
    theirs = [len(pt.Punctuation().pre_tokenize_str("a" + ch + "a")) == 3 for ch in chars]
    ours = [len(bpe.split("a" + ch + "a", bpe.PUNCTUATION, "isolated")) == 3 for ch in chars]
    assert [ch for ch, a, b in zip(chars, theirs, ours) if a != b] == []
    text = "x\u2e53\u2e43y, \u061d\u166d.a\U000111c9\u2e52 \u0f14\u2e42z"
    falcon = pt.Sequence([pt.Punctuation("contiguous"), pt.ByteLevel(False, use_regex=True), pt.Digits(individual_digits=False),
                          pt.Split(need("tokenizers").Regex("[0-9][0-9][0-9]"), "isolated")])
    assert as_byte_chars(bpe.pre_tokenize(text, bpe.GGUF_PRE_TOKENIZERS["falcon"])) == [p for p, _ in falcon.pre_tokenize_str(text)]


def test_a_folder_s_bos_and_eos_are_its_tokenizer_config_s(tmp_path):
    """SmolLM2-Instruct's tokenizer_config.json: bos <|im_start|> and eos <|im_end|>, neither <|endoftext|> (the
    default), each as a string or as an added-token dict; the ids as transformers' AutoTokenizer gives them."""
    transformers = need("transformers")
    trained(tmp_path, need("tokenizers").pre_tokenizers.ByteLevel(add_prefix_space=False))
    for config in [{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
                   {"bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True},
                    "eos_token": "<|endoftext|>"}]:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "PreTrainedTokenizerFast"}))
        ours, theirs = bpe.load_tokenizer(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        assert (ours.bos, ours.eos) == (theirs.bos_token_id, theirs.eos_token_id) and ours.bos != ours.eos
        assert ours.encode(SAMPLE, special=True) == theirs.encode(SAMPLE)  # no template: the bos is not added


def trained_sentencepiece(tmp_path, prepend=False):
    """A SentencePiece-style BPE trained by `tokenizers` as Gemma's tokenizer.json is made: spaces
    replaced by "▁" (Llama-2 style: also one put in front), byte-fallback tokens <0x00>..<0xFF> for
    what the 800-token vocabulary lacks, runs of newlines and tabs as user-defined tokens, <bos> first."""
    tk = need("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    replace = tk.normalizers.Replace(" ", bpe.SPACE)
    tok.normalizer = tk.normalizers.Sequence([tk.normalizers.Prepend(bpe.SPACE), replace]) if prepend else replace
    tok.pre_tokenizer = None if prepend else tk.pre_tokenizers.Split(" ", "merged_with_previous")
    trainer = tk.trainers.BpeTrainer(vocab_size=800, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                     show_progress=False, limit_alphabet=120)
    tok.train_from_iterator(re.findall(r" *[^ ]+", stdlib_text(0, 300_000)), trainer)  # words, as SentencePiece trains
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = tk.Tokenizer.from_str(json.dumps(spec))
    tok.add_tokens([tk.AddedToken(run, normalized=False) for c in "\n\t" for run in (c, c * 2, c * 3)])
    tok.decoder = tk.decoders.Sequence([tk.decoders.Replace(bpe.SPACE, " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
                                       + [tk.decoders.Strip(" ", 1, 0)] * prepend)
    tok.post_processor = tk.processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok


@pytest.mark.parametrize("variant", ["gemma", "llama2"])
def test_sentencepiece_bpe_equals_the_tokenizers_library(variant, tmp_path):
    theirs = trained_sentencepiece(tmp_path, prepend=variant == "llama2")
    ours = bpe.load_tokenizer(str(tmp_path))
    assert isinstance(ours, bpe.SentencePieceBPE) and ours.vocab_size == theirs.get_vocab_size()
    assert ours.dummy_prefix == ("always" if variant == "llama2" else "never") and ours.prefix == [ours.bos] == [2]
    for string in [stdlib_text(60, 200_000), LONG_LINE]:
        assert ours.encode(string, special=True) == theirs.encode(string).ids
    byte_ids = set(ours.byte_ids)
    for string in [SAMPLE, SAMPLE + "<eos>" + SAMPLE[:40] + "<bos>\n\n\n\n\t", "", " ", "  x  ", "\U0001F409\u00e9"]:
        ids = ours.encode(string, special=True)
        assert ids == theirs.encode(string).ids
        if variant == "gemma":  # (Llama-2's normalizer puts a "▁" before every stretch, after added tokens too)
            assert ours.decode(ids[1:]) == string  # round trip, the bos left out
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)
    assert ours.decode(ours.encode(" Hello  wörld, 1 ")) == " Hello  wörld, 1 "
    assert byte_ids & set(ours.encode(SAMPLE))  # the sample needs byte fallback: CJK and emoji are not in 800 tokens
    again = bpe.tokenizer_from_dict(through_checkpoint(ours.to_dict()))
    assert again.encode(SAMPLE, special=True) == ours.encode(SAMPLE, special=True) and again.merges == ours.merges
    # text.py keys tokenised corpora by the JSON of to_dict()
    assert bpe.tokenizer_from_dict(json.loads(json.dumps(ours.to_dict()))).to_dict() == ours.to_dict()


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_added_tokens_taking_the_whitespace_beside_them(kind, tmp_path):
    """Added tokens marked rstrip / lstrip (Phi-3's <|end|>, <|user|>, ...) take the whitespace after / before
    them, as the tokenizers library encodes it: also where an added token (a newline) starts inside it, and
    not U+001C..U+001F, which Python calls whitespace and Rust does not."""
    tk = need("tokenizers")
    theirs = trained_sentencepiece(tmp_path) if kind == "sentencepiece" else trained(tmp_path, None, added=["\n\n"])
    theirs.add_special_tokens([tk.AddedToken("<|end|>", rstrip=True, normalized=False, special=True),
                               tk.AddedToken("<|user|>", lstrip=True, rstrip=True, normalized=False, special=True)])
    theirs.add_tokens([tk.AddedToken("[L]", lstrip=True, normalized=False)])
    theirs.save(str(tmp_path / "tokenizer.json"))
    ours = bpe.load_tokenizer(str(tmp_path))
    again = bpe.tokenizer_from_dict(through_checkpoint(ours.to_dict()))
    for string in ["a <|end|>  \n\n b", "<|user|> hi\t<|end|>\u3000x\x1c y <|end|>\x1f", " \t<|user|>\n\n\t<|end|>",
                   "x<|end|>", "<|end|>", "  [L] [L]x \n\n[L]", SAMPLE + "<|user|>" + SAMPLE[:60]]:
        assert ours.encode(string) == again.encode(string) == theirs.encode(string, add_special_tokens=False).ids, repr(string)


def test_metaspace_prepending_first_equals_the_tokenizers_library(tmp_path):
    """Mistral's and Llama-2's (legacy=False) tokenizer.json: no normalizer, a Metaspace pre-tokenizer putting
    a "▁" before the text's first stretch only, and none where the text starts with a space (not "▁▁")."""
    tk = need("tokenizers")
    trained_sentencepiece(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = json.loads(tk.pre_tokenizers.Metaspace(prepend_scheme="first", split=False).__getstate__())
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    theirs, ours = tk.Tokenizer.from_file(str(tmp_path / "tokenizer.json")), bpe.load_tokenizer(str(tmp_path))
    assert ours.dummy_prefix == "first"
    assert theirs.encode(" Hello").tokens[:2] == ["<bos>", bpe.SPACE]  # one "▁", from the text's own space
    for string in [" Hello", "Hello world", "  two spaces", "\n\nx y", "x\n\n y", "<eos> a", SAMPLE]:
        assert ours.encode(string, special=True) == theirs.encode(string).ids, string
        assert ours.encode(string) == theirs.encode(string, add_special_tokens=False).ids, string


def through_checkpoint(data):
    """The data saved by torch.save and read back with weights_only=True, as checkpoints are."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_a_sample_shows_as_it_decodes_after_its_prompt(tmp_path):
    """steer.py's samples: a Llama-2 tokenizer drops the space a text starts with, not the one after a prompt."""
    trained_sentencepiece(tmp_path, prepend=True)
    ours = bpe.load_tokenizer(str(tmp_path))
    prompt, story = ours.encode("Once upon a time", special=True), ours.encode("Once upon a time there was", special=True)
    assert story[:len(prompt)] == prompt and ours.decode(story[len(prompt):]) == "there was"
    assert steer.generated_text(torch.tensor([story]), len(prompt), ours) == [" there was"]


def test_sentencepiece_merge_order_from_scores():
    """From GGUF metadata (tokens, scores, types): the merged token of higher score first, bytes for
    what the vocabulary lacks, user-defined tokens cut out first, bos as add_bos_token says."""
    tokens = ["<unk>", "<s>", "</s>", "\n\n", *(f"<0x{b:02X}>" for b in range(256)), "a", "b", "c", "▁", "ab", "bc", "▁a", "▁abc"]
    types = [bpe.UNKNOWN, bpe.CONTROL, bpe.CONTROL, bpe.USER_DEFINED, *[bpe.BYTE] * 256] + [bpe.NORMAL] * 8
    scores = [0.0] * 260 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0]
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_space_prefix": False}
    ids = {t: i for i, t in enumerate(tokens)}
    tok = bpe.tokenizer_from_gguf(metadata)
    # "abc": ab (-5) beats bc (-6); " abc": ▁a (-7) is worse than ab, so ▁ + ab + c, as no "▁ab" exists
    assert tok.encode("abc") == [ids["ab"], ids["c"]] and tok.encode(" abc") == [ids["▁"], ids["ab"], ids["c"]]
    scores[ids["▁a"]] = -4.5  # now ▁a first, then bc, and ▁a + bc make ▁abc
    tok = bpe.tokenizer_from_gguf(metadata)
    assert tok.encode(" abc") == [ids["▁abc"]] and tok.encode(" ab") == [ids["▁a"], ids["b"]]
    assert tok.encode("a\n\nd", special=True) == [1, ids["a"], ids["\n\n"], ids["<0x64>"]]  # llama.cpp's default: add bos
    assert tok.decode(tok.encode("x é\n\n")) == "x é\n\n" and tok.decode([1, ids["a"]], skip_special=True) == "a"
    assert bpe.tokenizer_from_gguf(metadata | {"tokenizer.ggml.add_bos_token": False}).encode("a", special=True) == [ids["a"]]
    prefixed = bpe.tokenizer_from_gguf(metadata | {"tokenizer.ggml.add_space_prefix": True})  # Llama-2's
    assert prefixed.encode("a") == [ids["▁a"]] and prefixed.encode(" a") == [ids["▁"], ids["▁a"]]  # as llama.cpp
    assert prefixed.encode("a\n\nd") == [ids["▁a"], ids["\n\n"], ids["▁"], ids["<0x64>"]]  # after a user-defined token too
    # numbers as a reader may give them (numpy): the tokenizer is plain data all the same
    as_numpy = {"tokenizer.ggml.token_type": np.array(types), "tokenizer.ggml.scores": np.array(scores, np.float32),
                "tokenizer.ggml.bos_token_id": np.int32(1)}
    again = bpe.tokenizer_from_dict(through_checkpoint(bpe.tokenizer_from_gguf(metadata | as_numpy).to_dict()))
    assert again.encode(" abc a\n\nd", special=True) == tok.encode(" abc a\n\nd", special=True)


def gguf_tokenizer(folder, metadata, architecture="llama"):
    """transformers' AutoTokenizer for a GGUF file holding only `metadata` (tokenizer keys), written to `folder`
    (one of its own: a tokenizer.json beside it would be read instead)."""
    transformers, gguf = need("transformers"), need("gguf")
    folder.mkdir(exist_ok=True)
    writer = gguf.GGUFWriter(str(folder / "m.gguf"), architecture)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file="m.gguf")


def sentencepiece_gguf(tmp_path):
    """trained_sentencepiece()'s vocabulary as the GGUF metadata of a SentencePiece model (scores falling with
    the ids, as the trainer made the tokens): no add_space_prefix, as most Llama-2 and TinyLlama files."""
    vocab = trained_sentencepiece(tmp_path).get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    kinds = {"<pad>": bpe.CONTROL, "<eos>": bpe.CONTROL, "<bos>": bpe.CONTROL, "<unk>": bpe.UNKNOWN}
    types = [kinds.get(t, bpe.BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else bpe.USER_DEFINED if t and not t.strip("\n\t")
                       else bpe.NORMAL) for t in tokens]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": [-float(i) for i in range(len(tokens))], "tokenizer.ggml.bos_token_id": vocab["<bos>"],
            "tokenizer.ggml.eos_token_id": vocab["<eos>"], "tokenizer.ggml.unknown_token_id": vocab["<unk>"]}


def test_sentencepiece_gguf_without_add_space_prefix_puts_a_space_first(tmp_path):
    """llama.cpp's default: a "▁" before the text (transformers reads these files with Metaspace "first", the same
    on text that neither starts with a space nor follows a special or user-defined token)."""
    metadata = sentencepiece_gguf(tmp_path)
    theirs, ours = gguf_tokenizer(tmp_path / "gguf", metadata), bpe.tokenizer_from_gguf(metadata)
    assert ours.dummy_prefix == "always" and theirs.convert_ids_to_tokens(theirs.encode("Hello"))[:2] == ["<bos>", bpe.SPACE]
    one_line = re.sub(r"\s", " ", SAMPLE + stdlib_text(60, 20_000)).strip()  # newlines and tabs are user-defined tokens
    for string in ["Hello", "Hello world", "a  b", "x\n\n", one_line]:
        assert ours.encode(string, special=True) == theirs.encode(string), string
        assert ours.encode(string) == theirs.encode(string, add_special_tokens=False), string
    assert ours.decode(ours.encode("Hello world")) == theirs.decode(theirs.encode("Hello world"), skip_special_tokens=True)


def test_gguf_user_defined_tokens_are_not_special(tmp_path):
    """User-defined tokens (<think>, runs of newlines) are cut out whole but are text: decoding that skips special
    tokens keeps them, as transformers reads these files; control tokens go."""
    vocab = trained_bpe(tmp_path, added=["<think>", "</think>"]).get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    kinds = {"<|endoftext|>": bpe.CONTROL, "<think>": bpe.USER_DEFINED, "</think>": bpe.USER_DEFINED}
    byte_level = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
                  "tokenizer.ggml.token_type": [kinds.get(t, bpe.NORMAL) for t in tokens],
                  "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m
                                            for m in json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"]],
                  "tokenizer.ggml.bos_token_id": vocab["<|endoftext|>"], "tokenizer.ggml.eos_token_id": vocab["<|endoftext|>"]}
    string = "<|endoftext|><think>x = 1</think>def f():\n\n\treturn 2<|endoftext|>"
    (tmp_path / "sp").mkdir()
    for name, metadata in [("byte_level", byte_level), ("sentencepiece", sentencepiece_gguf(tmp_path / "sp"))]:
        theirs, ours = gguf_tokenizer(tmp_path / name, metadata), bpe.tokenizer_from_gguf(metadata)
        ids = ours.encode(string)
        user_defined = {i for i, t in enumerate(metadata["tokenizer.ggml.token_type"]) if t == bpe.USER_DEFINED}
        assert user_defined & set(ids) and ours.decode(ids) == theirs.decode(ids), name
        if name == "byte_level":  # (SentencePiece: llama.cpp's "▁" after a user-defined token, not transformers')
            assert ids == theirs.encode(string, add_special_tokens=False) and ours.decode(ids) == string
        kept = ours.decode(ids, skip_special=True)
        assert kept == theirs.decode(ids, skip_special_tokens=True) and ("<think>" in kept or "\n\n" in kept), name


def test_a_gguf_phi3_s_special_tokens_drop_the_whitespace_after_them(tmp_path):
    """llama.cpp marks the special tokens of a model named Phi-3 (general.name; nothing else in the file says so)
    as taking the whitespace after them, as Phi-3's tokenizer.json marks them rstrip: all control, user-defined
    and unknown tokens but <unk>, <s> and <|endoftext|>. A model named otherwise keeps it. (Runs of
    newlines are plain tokens here, as in Phi-3: llama.cpp cuts the longer special token out first, with its
    whitespace, where the tokenizers library would still find a newline token starting inside that whitespace.)"""
    metadata = sentencepiece_gguf(tmp_path)
    metadata["tokenizer.ggml.token_type"] = [bpe.NORMAL if t == bpe.USER_DEFINED else t for t in metadata["tokenizer.ggml.token_type"]]
    extra = {"<s>": bpe.CONTROL, "</s>": bpe.CONTROL, "<|endoftext|>": bpe.CONTROL, "<|user|>": bpe.CONTROL,
             "<|end|>": bpe.CONTROL, "<|placeholder1|>": bpe.USER_DEFINED}
    metadata |= {"tokenizer.ggml.tokens": metadata["tokenizer.ggml.tokens"] + list(extra),
                 "tokenizer.ggml.token_type": metadata["tokenizer.ggml.token_type"] + list(extra.values()),
                 "tokenizer.ggml.scores": metadata["tokenizer.ggml.scores"] + [0.0] * len(extra)}
    phi3, other = (bpe.tokenizer_from_gguf(metadata | {"general.name": name}) for name in ("Phi-3 Mini 4k Instruct", "Llama"))
    again = bpe.tokenizer_from_dict(through_checkpoint(phi3.to_dict()))
    chat = "<|user|>\n Hi <|end|>\n\t</s> x<s>\n<|endoftext|> y<|placeholder1|>  z<unk>\nw<eos>\n\n\nv"
    stripped = "<|user|>Hi <|end|></s>x<s>\n<|endoftext|> y<|placeholder1|>z<unk>\nw<eos>v"
    assert phi3.encode(chat) == again.encode(chat) == other.encode(stripped) != other.encode(chat)


def test_a_gemma_token_spanning_a_space_merges_across_it(tmp_path):
    """Gemma-3's vocabulary holds ">▁</" (HTML's "<p> </p>"): its merges cross the space, so the text is not cut
    into stretches at its spaces there; as transformers reads a Gemma GGUF file (merge order: the tokens' order)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), "<", ">", "/", "p", "a", bpe.SPACE,
              "</", ">▁", ">▁</", "<p", "p>", "<p>", "▁</", "▁<", "</p", "</p>", "a>", "▁▁"]
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [0.0] * len(tokens),
                "tokenizer.ggml.token_type": [bpe.CONTROL] * 3 + [bpe.UNKNOWN] + [bpe.BYTE] * 256 + [bpe.NORMAL] * 18,
                "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
                "tokenizer.ggml.add_space_prefix": False}
    theirs = gguf_tokenizer(tmp_path, metadata, "gemma3")
    ours = bpe.tokenizer_from_gguf(metadata | {"general.architecture": "gemma3"})
    assert theirs.convert_ids_to_tokens(theirs.encode("<p> </p>", add_special_tokens=False)) == ["<p", ">▁</", "p>"]
    for string in ["<p> </p>", "<p>  </p>", "a> </p", "<p> </p> <p> </p>", "x> </", " </p> <", "> </ > </"]:
        assert ours.encode(string, special=True) == theirs.encode(string), string
        assert ours.decode(ours.encode(string)) == theirs.decode(theirs.encode(string), skip_special_tokens=True) == string


def test_merges_of_equal_score_take_the_longer_left_part_first(tmp_path):
    """GGUF scores that tie: transformers orders the merges it derives by score, then the longer left part first,
    whatever the tokens' ids or places. "abcd": ab, then abc (ab + c) before cd; "cabd": ab, then abd (ab + d)
    before cab (c + ab), though cab is further left (as llama.cpp would take it) and comes first in the vocabulary."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), bpe.SPACE, "a", "b", "c", "d",
              "ab", "cd", "cab", "abc", "abd"]
    scores = [0.0] * 259 + [-1.0] * 5 + [-2.0] + [-3.0] * 4
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.token_type": [bpe.UNKNOWN] + [bpe.CONTROL] * 2 + [bpe.BYTE] * 256 + [bpe.NORMAL] * 10,
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    theirs, ours = gguf_tokenizer(tmp_path, metadata), bpe.tokenizer_from_gguf(metadata)
    ids = {t: i for i, t in enumerate(tokens)}
    assert theirs.encode("abcd cabd", add_special_tokens=False) == [ids[t] for t in ["▁", "abc", "d", "▁", "c", "abd"]]
    for string in ["abcd", "cabd", "abcdcabd", "abcd cabd dcab", "cdab"]:
        assert ours.encode(string, special=True) == theirs.encode(string), string


def test_merges_of_equal_score_and_left_part_take_the_longer_right_part_first(tmp_path):
    """Scores and left parts that tie: transformers then takes the longer right part first ("abcd": bcd (b + cd)
    before ab, though ab comes first in the vocabulary)."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), bpe.SPACE, "a", "b", "c", "d", "cd", "ab", "bcd"]
    scores = [0.0] * 259 + [-1.0] * 5 + [-2.0, -3.0, -3.0]
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.token_type": [bpe.UNKNOWN] + [bpe.CONTROL] * 2 + [bpe.BYTE] * 256 + [bpe.NORMAL] * 8,
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    theirs, ours = gguf_tokenizer(tmp_path, metadata), bpe.tokenizer_from_gguf(metadata)
    assert theirs.encode("abcd", add_special_tokens=False) == [tokens.index(t) for t in ["▁", "a", "bcd"]]
    for string in ["abcd", "abcd abcd", "cdab bcd"]:
        assert ours.encode(string, special=True) == theirs.encode(string), string


def test_a_character_falls_back_to_bytes_where_the_vocabulary_has_all_of_its_bytes(tmp_path):
    """A vocabulary lacking some byte tokens (here <0xF0>..<0xFF>, which begin emoji): a character whose bytes are
    all there still falls back to them; the others become <unk>, a run of them one, as in `tokenizers`."""
    tk = need("tokenizers")
    spec = json.loads(trained_sentencepiece(tmp_path).to_str())
    vocab = spec["model"]["vocab"]
    for b in range(0xF0, 0x100):
        vocab[f"<unused{b}>"] = vocab.pop(f"<0x{b:02X}>")
    theirs = tk.Tokenizer.from_str(json.dumps(spec))
    theirs.save(str(tmp_path / "tokenizer.json"))
    ours = bpe.load_tokenizer(str(tmp_path))
    for string in ["é", "東京 é", "a🐉🔥b", "🐉 é x", "x 🐉🐉 東"]:
        assert ours.encode(string) == theirs.encode(string, add_special_tokens=False).ids, string


def test_a_repeated_token_is_read_as_its_last_id(tmp_path):
    """A GGUF vocabulary listing a token twice ("ab", and "▁" as a byte-fallback file may): text encodes to its last
    id, as transformers reads the file; both ids decode to it."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), bpe.SPACE, "a", "b", "ab", "c", "ab", "abc",
              bpe.SPACE]
    scores = [0.0] * 259 + [-1.0, -1.0, -1.0, -2.0, -1.0, -2.0, -3.0, -1.0]
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.token_type": [bpe.UNKNOWN] + [bpe.CONTROL] * 2 + [bpe.BYTE] * 256 + [bpe.NORMAL] * 8,
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    theirs, ours = gguf_tokenizer(tmp_path, metadata), bpe.tokenizer_from_gguf(metadata)
    assert theirs.encode("ab abc", add_special_tokens=False) == [len(tokens) - 1, 264, len(tokens) - 1, 265]
    for string in ["ab abc", "abab cab", "c a b", "ab  "]:
        ids = ours.encode(string, special=True)
        assert ids == theirs.encode(string), string
        assert ours.decode(ids, skip_special=True) == theirs.decode(ids, skip_special_tokens=True) == string
    assert ours.decode([262, 264]) == ours.decode([264, 264]) == "abab"


def test_llama3_gguf_tokenizer_ignores_merges_and_adds_bos():
    """GGUF metadata naming Llama-3's pre-tokenizer: a word that is a token encodes to it though no merge
    makes it, and BOS comes first unless add_bos_token says otherwise (llama.cpp's rule), as the `tokenizers`
    library's BPE(ignore_merges=True) with Llama-3's pre-tokenizer and template does on the same vocabulary."""
    tk = need("tokenizers")
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tokens = [bpe.BYTE_TO_CHAR[b] for b in range(256)] + ["he", "ll", "lo", "hello"] + specials
    merges = [("h", "e"), ("l", "l"), ("l", "o")]  # "hello" merges to he + ll + o
    ids = {t: i for i, t in enumerate(tokens)}
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": [bpe.NORMAL] * (len(tokens) - 2) + [bpe.CONTROL] * 2,
                "tokenizer.ggml.merges": [" ".join(m) for m in merges], "tokenizer.ggml.bos_token_id": ids[specials[0]],
                "tokenizer.ggml.eos_token_id": ids[specials[1]]}
    ours, bos = bpe.tokenizer_from_gguf(metadata), ids["<|begin_of_text|>"]
    assert ours.encode("hello", special=True) == [bos, ids["hello"]]
    merged = bpe.tokenizer_from_gguf(metadata | {"tokenizer.ggml.pre": "qwen2"})  # Llama-3's split but for digits
    assert merged.encode("hello", special=True) == [ids["he"], ids["ll"], ids["o"]]
    told = bpe.tokenizer_from_gguf(metadata | {"tokenizer.ggml.add_bos_token": False})
    assert told.encode("hello", special=True) == [ids["hello"]]

    theirs = tk.Tokenizer(tk.models.BPE({t: i for t, i in ids.items() if t not in specials}, merges, ignore_merges=True))
    theirs.add_special_tokens(specials)
    theirs.pre_tokenizer = byte_level_cases(tk)["llama3"]["pre_tokenizer"]
    theirs.post_processor = tk.processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                             special_tokens=[("<|begin_of_text|>", bos)])
    for string in ["hello", "hello, hello world!", " hello shell lo hellos", "<|end_of_text|>hello", SAMPLE]:
        assert ours.encode(string, special=True) == theirs.encode(string).ids
        assert ours.encode(string) == theirs.encode(string, add_special_tokens=False).ids


# The pre-tokenizers of the models' own tokenizer.json files, written out here rather than taken from bpe.py, as
# llama.cpp's src/llama-vocab.cpp lists them (the original where it quotes one beside its rewrite for its regex
# engine), and the GGUF names llama.cpp gives them (tokenizer.ggml.pre). A step is a pattern whose matches a Split cuts
# out, or "digits" (Digits, one by one); the bytes come last, cut by GPT-2's pattern too after "gpt2". Meta-Llama-3's
# is OpenAI's cl100k_base (digits in runs of up to three), Qwen2's the same with digits one by one; both read
# contractions in any case. o200k (GPT-4o) and tekken (Mistral-Nemo) cut a word before a capital after small letters.
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
UP, LOW = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
DEEPSEEK3 = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
             r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BLOOM = " ?[^(\\s|.,!?…。，、।۔،)]+"
MODELS_OWN = {
    "gpt2": (["gpt2"], "gpt-2 phi-2 mpt olmo jais jina-es jina-de gigachat a.x-4.0 mellum exaone4 trillion "
                       "granite-docling"),
    "starcoder": (["digits", "gpt2"], "smollm starcoder refact command-r codeshell exaone minerva-7b mellum2"),
    "llama3": ([LLAMA3], "llama-bpe llama3 llama-v3 falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano"),
    "dbrx": ([LLAMA3], "dbrx smaug-bpe glm4 chatglm-bpe"),  # cl100k_base too, without ignore_merges
    "jais-2": ([r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
                r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"], "jais-2"),
    "minicpm5": ([r"\p{N}{1,3}", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
                                 r"|\s*[\r\n]+|\s+(?!\S)|\s+"], "minicpm5"),
    "qwen2": ([QWEN2], "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open grok-2"),
    "laguna": ([r"[^\n]+|[\n]+", QWEN2], "laguna"),
    "ufakzeka": ([r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"], "ufakzeka"),
    "qwen35": ([r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+"], "qwen35"),
    "seed-coder": ([r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                    r"|\s+(?!\S)|\s+"], "seed-coder"),
    "bailingmoe": ([r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)"
                    r"|\s+"], "bailingmoe bailingmoe2 llada-moe"),
    "exaone-moe": ([r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"], "exaone-moe"),
    "tekken": ([rf"[^\r\n\p{{L}}\p{{N}}]?{UP}*{LOW}+|[^\r\n\p{{L}}\p{{N}}]?{UP}+{LOW}*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"], "tekken"),
    "gpt-4o": ([rf"[^\r\n\p{{L}}\p{{N}}]?{UP}*{LOW}+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                rf"|[^\r\n\p{{L}}\p{{N}}]?{UP}+{LOW}*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
               "gpt-4o llama4 kanana2 talkie minimax-m2"),
    "deepseek-coder": ([r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", "digits"], "deepseek-coder"),
    "deepseek-v3": ([r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3], "deepseek-v3 hunyuan-dense hy_v4 joyai-llm"),
    "spark2_5": ([r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3.replace(r"[\r\n]*|\s*[\r\n]+|", r"|[\r\n]|"),
                  r"\p{N}"], "spark2_5"),
    "bloom": ([BLOOM], "bloom gpt3-finnish poro-chat"),
    "viking": ([BLOOM, r"\p{N}"], "viking"),
    "chameleon": ([r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
                   r"[\p{P}!-/:-@\[-`{-~]", "gpt2"], "chameleon"),
    # Falcon's: runs of punctuation, GPT-2's split, then runs of digits and threes of digits in the bytes ByteLevel shows
    "falcon": (["punctuation", "gpt2", "digit runs", "[0-9][0-9][0-9]"], "falcon"),
}
IGNORE_MERGES, ADD_BOS = {"llama3", "tekken", "minicpm5"}, {"llama3", "tekken", "chameleon"}  # llama.cpp's, by group
# runs of digits; contractions in capitals ("'TIS" is "'T" + "IS"); Unicode's spaces that are not ASCII (U+0085, U+00A0,
# U+1680, U+2000, U+202F, U+205F, U+3000), doubled before a letter and before punctuation, where they change the cuts
SPLIT_CASES = ["x 12345 I'M DON'T you're 3.14", "'TIS 'STOP O'NEIL'S WE'VE 'LLAMA 'Dog THEY'D 'RE 'M 1234567890",
               "a\u202f\u202fb x\u205f\u205f!! c\x85\x85d e\u1680\u1680f g\u2000\u2000h i\u3000\u3000j k\xa0\xa0l",
               "12\u202f345\u202f.\u205f,\u1680;\x85: end\u202f", " \u202f\n\u205f\t\u1680 \x85 z"]
# and what the other patterns cut at: capitals beyond ASCII and combining marks, symbols beside punctuation, CJK, kana
# and Hangul, the stops BLOOM cuts at, runs of 2, 4 and 600 spaces, slashes before newlines, Chameleon's tokens, emoji
GGUF_CASES = ["ÉCOLE École HTTPServer iPhone McDonald'S e\u0301te\u0301 ÉE\u0301COLE '\u017f '\u212a",
              "~!~~ a~b $+<=>^`| x~~y ¡¿",
              "한국어 텍스트 カタカナ ひらがな 漢字テスト 你好，世界。", "…。，、।۔، (a|b) 12²³ ½ ٣٤٥ x12345y",
              "\tx\t\ty    code\n        more  \n  end" + " " * 600 + "z", "a/b/\n/ c//\r\n\n\r\r\n",
              "<sentinel:12><sentinel:3> IMGIMGABZ IMGIMGABCDEFZ", "🐉🔥 👩‍👩‍👧 1️⃣ 🇫🇷 x\u200dy\u00ad !!!abc ?Abc .ABC"]


def models_own(tk, steps):
    """The steps as tokenizers' pre-tokenizers: the bytes where "gpt2" stands (cut by GPT-2's pattern), else last."""
    pt = tk.pre_tokenizers
    parts = [pt.ByteLevel(False, use_regex=True) if s == "gpt2" else pt.Digits(individual_digits=True) if s == "digits"
             else pt.Digits(individual_digits=False) if s == "digit runs" else pt.Punctuation("contiguous")
             if s == "punctuation" else pt.Split(tk.Regex(s), "isolated") for s in steps]
    return pt.Sequence(parts + [pt.ByteLevel(False, use_regex=False)] * ("gpt2" not in steps))


def test_every_gguf_pre_tokenizer_name_is_checked():
    names = {group: spelt.split() for group, (_, spelt) in MODELS_OWN.items()}
    assert sorted(n for group in names.values() for n in group) == sorted(set(bpe.GGUF_PRE_TOKENIZERS) - {"default"})
    assert bpe.GGUF_PRE_TOKENIZERS["default"] == [bpe.byte_level()]  # a file naming none: GPT-2's split
    assert bpe.GGUF_IGNORE_MERGES == {n for group in IGNORE_MERGES for n in names[group]}
    assert bpe.GGUF_ADD_BOS == {n for group in ADD_BOS for n in names[group]}


@pytest.mark.parametrize("group", list(MODELS_OWN))
def test_gguf_pre_tokenizers_are_the_models_own(group, tmp_path):
    """A GGUF file's tokenizer named by tokenizer.ggml.pre cuts text where the `tokenizers` library cuts it with the
    model's own pre-tokenizer (written out above, not bpe.py's), and gives its ids: a BPE trained by `tokenizers` with
    that pre-tokenizer (ignore_merges where llama.cpp reads it so), written as GGUF metadata; BOS first where llama.cpp
    adds it unless told otherwise."""
    tk = need("tokenizers")
    steps, names = MODELS_OWN[group]
    theirs_pre = models_own(tk, steps)
    theirs = trained_bpe(tmp_path, theirs_pre, ignore_merges=group in IGNORE_MERGES,
                         corpus=[stdlib_text(0, 100_000), "\n".join((SPLIT_CASES + GGUF_CASES) * 20)])
    ids = theirs.get_vocab()
    tokens = sorted(ids, key=ids.get)
    assert [ids[t] for t in tokens] == list(range(len(tokens)))
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(theirs.to_str())["model"]["merges"]]
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
                "tokenizer.ggml.token_type": [bpe.CONTROL if t == "<|endoftext|>" else bpe.NORMAL for t in tokens],
                "tokenizer.ggml.bos_token_id": ids["<|endoftext|>"]}
    if group in ("llama3", "qwen2"):  # runs of digits merge in Llama-3's only
        assert any(t.isdigit() and len(t) > 1 for t in tokens) == (group == "llama3")
    for i, pre in enumerate(names.split()):
        ours = bpe.tokenizer_from_gguf(metadata | {"tokenizer.ggml.pre": pre})
        assert ours.ignore_merges == (group in IGNORE_MERGES)
        assert ours.prefix == [ids["<|endoftext|>"]] * (group in ADD_BOS)
        for string in SPLIT_CASES + GGUF_CASES + [SAMPLE] + [stdlib_text(60, 10_000)] * (i == 0):
            as_bytes = as_byte_chars(bpe.pre_tokenize(string, ours.pre_tokenizers))
            assert as_bytes == [p for p, _ in theirs_pre.pre_tokenize_str(string)], (pre, string)
            assert ours.encode(string) == theirs.encode(string, add_special_tokens=False).ids, (pre, string)


# gpt-oss's o200k_harmony special tokens (ids 199998-200018 in its files, after its vocabulary; the converter fills the
# rest of its 201088 rows with "[PAD{id}]" tokens of type UNUSED)
HARMONY = ["<|startoftext|>", "<|endoftext|>"] + [
    {200002: "<|return|>", 200003: "<|constrain|>", 200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>",
     200008: "<|message|>", 200012: "<|call|>", 200018: "<|endofprompt|>"}.get(i, f"<|reserved_{i}|>")
    for i in range(200000, 200019)]


def test_a_gpt_oss_gguf_tokenizer_reads_as_its_own(tmp_path):
    """A gpt-oss GGUF file's tokenizer as llama.cpp's converter writes it (pre "gpt-4o", BOS <|startoftext|>, EOS
    <|return|>, padding <|endoftext|>, the harmony tokens CONTROL after the vocabulary, then [PAD] tokens UNUSED up to
    the model's rows, no add_bos_token) is read from the file, fits the model's vocabulary and encodes a harmony chat as
    the `tokenizers` library with o200k's own pre-tokenizer and as transformers' GGUF reader do, without BOS."""
    tk = need("tokenizers")
    theirs = trained_bpe(tmp_path, models_own(tk, MODELS_OWN["gpt-4o"][0]), specials=())
    vocab = theirs.get_vocab()
    tokens = sorted(vocab, key=vocab.get) + HARMONY
    rows = len(tokens) + 40
    ids = {t: i for i, t in enumerate(tokens)}
    metadata = {"general.architecture": "gpt-oss", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-4o",
                "tokenizer.ggml.tokens": tokens + [f"[PAD{i}]" for i in range(len(tokens), rows)],
                "tokenizer.ggml.token_type": [bpe.NORMAL] * len(vocab) + [bpe.CONTROL] * len(HARMONY)
                + [bpe.UNUSED] * (rows - len(tokens)),
                "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m
                                          for m in json.loads(theirs.to_str())["model"]["merges"]],
                "tokenizer.ggml.bos_token_id": ids["<|startoftext|>"], "tokenizer.ggml.eos_token_id": ids["<|return|>"],
                "tokenizer.ggml.padding_token_id": ids["<|endoftext|>"]}
    transformers_gguf = gguf_tokenizer(tmp_path / "gguf", metadata, "gpt-oss")
    stored = formats.read_gguf_info(str(tmp_path / "gguf" / "m.gguf")).metadata
    ours = bpe.check_tokenizer(bpe.tokenizer_from_gguf(stored), rows, "gpt-oss.gguf")
    assert (ours.bos, ours.eos, ours.vocab_size) == (ids["<|startoftext|>"], ids["<|return|>"], rows)
    theirs.add_special_tokens(HARMONY)
    chat = ("<|start|>system<|message|>You are ChatGPT, a large language model.\nReasoning: medium<|end|>"
            "<|start|>user<|message|>What's 2+2? Ünïcode 東京 HTTPServer's 12345<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>Sum.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>4<|return|>")
    got = ours.encode(chat, special=True)
    assert got == ours.encode(chat) == theirs.encode(chat, add_special_tokens=False).ids
    assert got == transformers_gguf.encode(chat)
    assert {ids[t] for t in ("<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>")} <= set(got)
    assert ours.decode(got) == chat and "<|" not in ours.decode(got, skip_special=True)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'bert' is not implemented"):
        bpe.tokenizer_from_gguf({"tokenizer.ggml.model": "bert"})
    # Kimi-K2's split, which llama.cpp codes by hand: refused
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'kimi-k2' is not implemented"):
        bpe.tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": [],
                                 "tokenizer.ggml.pre": "kimi-k2"})
    with pytest.raises(ValueError, match="no tokenizer.ggml.scores"):
        bpe.tokenizer_from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="the GGUF file holds no tokenizer"):
        bpe.tokenizer_from_gguf({})
    llama = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<s>", "a"], "tokenizer.ggml.scores": [0.0, 0.0]}
    assert bpe.check_tokenizer(bpe.tokenizer_from_gguf(llama | {"tokenizer.ggml.bos_token_id": 0}), 2, "m.gguf").prefix == [0]
    with pytest.raises(ValueError, match=r"m.gguf: the tokenizer's BOS / EOS ids \[5000\] are not among its 2 tokens"):
        bpe.check_tokenizer(bpe.tokenizer_from_gguf(llama | {"tokenizer.ggml.bos_token_id": 5000}), 2, "m.gguf")
    with pytest.raises(ValueError, match="lacks tokens, types"):
        bpe.tokenizer_from_dict({"kind": "sentencepiece"})
    spec = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, {"type": "ByteLevel"}]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="pre_tokenizer 'Whitespace' is not implemented"):
        bpe.load_tokenizer(str(tmp_path))
    spec["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": r"\p{Xx}"}, "behavior": "Isolated", "invert": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"unknown Unicode class"):
        bpe.load_tokenizer(str(tmp_path))
    spec["pre_tokenizer"]["pattern"] = {"Regex": "[a[^b]]+"}  # (a union with a negated class: not one class)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"a negated class inside \[...\] is not implemented"):
        bpe.load_tokenizer(str(tmp_path))
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "ByteLevel"}, {"type": "ByteLevel"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"maps the bytes twice \(two ByteLevel steps\), which is not implemented"):
        bpe.load_tokenizer(str(tmp_path))
    spec["pre_tokenizer"] = {"type": "ByteLevel"}
    spec["added_tokens"] = [{"id": 1, "content": "<x>", "special": True, "normalized": False, "single_word": True}]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="added token '<x>' uses single_word, which is not implemented"):
        bpe.load_tokenizer(str(tmp_path))
    # SentencePiece: a special token matched after the normaliser (spaces already "▁") that strips whitespace
    spec = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {"a": 0}, "merges": []},
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": bpe.SPACE},
            "added_tokens": [{"id": 1, "content": "<|end|>", "special": True, "normalized": True, "rstrip": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"added token '<\|end\|>' is normalized \(and not special, or stripping whitespace\)"):
        bpe.load_tokenizer(str(tmp_path))


# --- the real models ---------------------------------------------------------------------------

def gguf_metadata(path):
    """A GGUF file's metadata as plain Python values (what formats.read_gguf returns), read here by
    transformers' GGUF reader (seconds) or else the gguf package's (~20 s over Gemma's 262k tokens)."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:
        fields = need("gguf").GGUFReader(path).fields
        return {name: field.contents() for name, field in fields.items()}
    return read_gguf_metadata(path, [f"tokenizer.ggml.{key}" for key in ("tokens", "scores", "token_type", "merges")])[0]


def same_as_transformers(path, prepare=None):
    """Ours from the GGUF metadata against transformers' AutoTokenizer for the same file."""
    transformers = need("transformers")
    need("gguf")  # transformers reads GGUF files with it
    theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    if prepare:
        prepare(theirs)
    ours = bpe.tokenizer_from_gguf(gguf_metadata(path))
    unseen = stdlib_text(60, 200_000)
    for string in [unseen, SAMPLE, "<|im_start|>user\n" + SAMPLE[:60] + "<start_of_turn>", "", " x", "a\x04b\x1d\x1dc"]:
        ids = ours.encode(string, special=True)
        assert ids == theirs.encode(string)
        if "\x04" not in string:  # (a byte SmolLM2's vocabulary lacks: dropped, see below)
            assert ours.decode(ours.encode(string)) == string
    return ours, theirs


def test_smollm2_gguf_tokenizer():
    """SmolLM2's metadata names the pre-tokenizer "smollm": digits one by one, then GPT-2's split (llama.cpp's
    reading, and the Digits + ByteLevel sequence of the model's own tokenizer.json). transformers reads
    the name as plain ByteLevel, which differs where digits follow a space or a non-ASCII byte: its
    pre-tokenizer is set to the model's sequence before comparing."""
    def digits_first(theirs):
        pt = need("tokenizers").pre_tokenizers
        theirs.backend_tokenizer.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(False, use_regex=True)])
    ours, theirs = same_as_transformers(real_model(SMOLLM2), digits_first)
    assert ours.vocab_size == 49152 and ours.prefix == [] and (ours.bos, ours.eos) == (1, 2)
    assert ours.decode(ours.encode("<|im_start|>hi"), skip_special=True) == "hi"
    assert ours.decode(ours.encode("a\x04b\x1d\x1dc")) == "abc"  # bytes its vocabulary lacks are dropped, as by transformers


def test_gemma3_gguf_tokenizer():
    ours, theirs = same_as_transformers(real_model(GEMMA3))
    assert ours.vocab_size == 262144 and ours.prefix == [2] and (ours.bos, ours.eos) == (2, 1)
    data = ours.to_dict()
    again = bpe.tokenizer_from_dict(through_checkpoint(data))
    assert again.encode(SAMPLE) == ours.encode(SAMPLE) and again.to_dict() == data
