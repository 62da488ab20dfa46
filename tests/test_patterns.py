"""patterns.py against counts done by hand: each regex's targets on a short text, with bytes and with a
tiny BPE; the pattern table on a tiny random model with a planted code, and its neuron and SAE columns
against the threshold search written out; text.py's prose corpora."""

import pytest
import torch

import bpe
import codebook as cb
import patterns
import sae
import text
from conftest import precision_at_recall

BYTES = text.ByteTokenizer()
TEXT = ('In 1987 (or 2024) the café’s cat jumped [twice].\n'
        'def f(x):\n    if x == 1 or x >= 2: return "ok"\n'
        'It rained in March 1492. Then the end!')

# For each pattern, the 4 bytes that end at each target byte, in order: counted by hand.
BY_HAND = {
    "digit": [b"In 1", b"n 19", b" 198", b"1987", b"or 2", b"r 20", b" 202", b"2024",
              b"== 1", b">= 2", b"ch 1", b"h 14", b" 149", b"1492"],
    "year, its last digit": [b"1987", b"2024"],  # 1492: before 1500, the pattern's first year
    "opening parenthesis": [b"987 (", b"ef f("],
    "closing bracket": [b"2024)", b"wice]", b"f(x)"],
    "newline": [b"e].\n", b"x):\n", b'ok"\n'],
    "capital starting a sentence": [b"92. T"],
    "past tense -ed": [b"umped", b"ained"],
    "the word 'the'": [b") the", b"n the"],
    "Python keyword": [b"def", b"  if", b"turn"],
    "comparison": [b"x ==", b"x >="],
    "double quote": [b'rn "', b'"ok"'],
    "month": [b"March"],
}


def suffixes(tokens, mask, tokenizer, n):
    """The last n bytes of the text up to and including each target token."""
    return [tokenizer.decode(tokens[:i + 1]).encode()[-n:] for i in mask.nonzero()[:, 0].tolist()]


def test_each_pattern_with_bytes_against_counts_by_hand():
    assert set(BY_HAND) == set(patterns.PATTERNS)
    data = TEXT.encode()
    for name, expected in BY_HAND.items():
        tokens, mask = patterns.text_mask(TEXT, BYTES, patterns.PATTERNS[name])
        assert mask.shape == tokens.shape and mask.dtype == torch.bool
        ends = mask.nonzero()[:, 0].tolist()
        assert len(ends) == len(expected) and all(data[:i + 1].endswith(e) for i, e in zip(ends, expected)), name


def tiny_bpe():
    """A byte-level BPE built by hand: every byte a token, plus a few merges (one inside 'é', two bytes)."""
    chars = [bpe.BYTE_TO_CHAR[b] for b in range(256)]
    merges = [("t", "h"), ("th", "e"), ("Ġ", "the"), ("1", "9"), ("19", "8"), ("e", "d"), ("=", "="),
              ("Ã", "©"), ("M", "a"), ("Ma", "r")]
    vocab = {c: i for i, c in enumerate(chars + ["".join(m) for m in merges])}
    added = [{"id": len(vocab), "content": "<|endoftext|>", "special": True, "normalized": False}]
    return bpe.BPETokenizer(vocab, [list(m) for m in merges], added, bos=len(vocab))


def test_masks_follow_tokens_of_several_bytes():
    tok = tiny_bpe()
    tokens = torch.tensor(tok.encode("In 1987 the café’s x == 1 March"))
    pieces = patterns.token_pieces(tok, tokens.tolist())
    assert "".join(pieces) == tok.decode(tokens.tolist())
    assert " the" in pieces and "198" in pieces and "é" in pieces and "==" in pieces
    # ’ (three bytes, no merge) is three tokens: the character belongs to the last
    assert pieces[pieces.index("é") + 1:pieces.index("é") + 4] == ["", "", "’"]

    def targets(regex):
        mask = patterns.pattern_masks(tokens, tok, {"": regex})[""]
        return [pieces[i] for i in range(len(pieces)) if mask[i]]
    assert targets(patterns.PATTERNS["digit"]) == ["198", "7", "1"]  # one token holds three digits: one target
    assert targets(patterns.PATTERNS["year, its last digit"]) == ["7"]
    assert targets(patterns.PATTERNS["the word 'the'"]) == [" the"]
    assert targets(patterns.PATTERNS["comparison"]) == ["=="]
    assert targets(patterns.PATTERNS["month"]) == ["h"]  # the token of the group's last character
    assert targets(r"caf(é)") == ["é"] and targets(r"(’)") == ["’"] and targets(r"(é’)s") == ["’"]
    # with bytes, the character's last byte
    tokens, mask = patterns.text_mask("café’s", BYTES, r"(é)")
    assert mask.nonzero()[:, 0].tolist() == [4] and tokens[4] == "é".encode()[-1]


def test_masks_with_a_sentencepiece_tokenizer():
    """Gemma's kind: "▁" is a space and the text's first word gets one too (the dummy prefix), which a
    token decoded alone loses; before and after anything else was decoded."""
    S = bpe.SPACE
    tokens = ["<unk>", "<bos>", "t", "h", "e", "c", "a", S, "th", "the", S + "the", "ca", "cat", S + "cat"]
    merges = [("t", "h"), ("th", "e"), (S, "the"), ("c", "a"), ("ca", "t"), (S, "cat")]
    tok = bpe.SentencePieceBPE(tokens, [bpe.UNKNOWN, bpe.CONTROL] + [bpe.NORMAL] * 12, merges=merges, bos=1, unk=0,
                               dummy_prefix="first")
    for _ in range(2):
        ids, mask = patterns.text_mask("the cat the cat", tok, r"\b(the)\b")
        assert [tokens[i] for i in ids] == [S + "the", S + "cat"] * 2 and mask.tolist() == [True, False, True, False]
        assert tok.decode(ids.tolist()) == "the cat the cat"


def test_documents_are_matched_apart_and_rows_alone():
    tok = tiny_bpe()
    for tokenizer in (BYTES, tok):
        a, b = tokenizer.encode("It ended. "), tokenizer.encode("The end. Then")
        row = torch.tensor([*a, tokenizer.bos, *b])
        mask = patterns.pattern_masks(torch.stack([row, row]), tokenizer, {"": patterns.PATTERNS["capital starting a sentence"]})[""]
        assert mask.shape == (2, len(row)) and torch.equal(mask[0], mask[1])
        assert mask.sum() == 2 and mask[0, -4]  # "T" of "Then" ("Then" is 4 tokens either way), not "The" after BOS
    with pytest.raises(ValueError, match="no capture group"):
        patterns.pattern_masks(row, tok, {"x": r"the"})
    with pytest.raises(ValueError, match="not a regular expression"):
        patterns.pattern_masks(row, tok, {"x": r"(the"})


def test_a_match_whose_group_is_empty_or_absent_marks_nothing():
    tokens, mask = patterns.text_mask("xz xyz x", BYTES, r"x(y?)")
    assert mask.nonzero()[:, 0].tolist() == [4]  # the "y" of "xyz" alone
    assert not patterns.text_mask("ab", BYTES, r"a(c)?")[1].any()


def test_topic_patterns_mark_the_words_of_each_topic():
    found = patterns.topic_patterns(["dragons", "sea"])
    tokens, mask = patterns.text_mask("Dragons! A dragon's cave. The seas were calm.", BYTES, found["topic dragons"])
    assert suffixes(tokens, mask, BYTES, 7) == [b"Dragons", b" dragon", b"'s cave"]
    assert patterns.text_mask("The seas were calm.", BYTES, found["topic sea"])[1].sum() == 1


# --- the table ----------------------------------------------------------------------------------

def test_best_code_is_the_most_precise_above_the_recall_floor_else_the_best_f1():
    precision = torch.tensor([[1.0, 0.9, 0.9, 0.5], [1.0, 0.2, 0.0, 0.0]])
    recall = torch.tensor([[0.05, 0.2, 0.3, 0.9], [0.05, 0.08, 0.0, 0.0]])
    index, keys = patterns.best_codes(precision, recall, min_recall=0.1)
    assert index.tolist() == [2, 1]  # 0.9 precise at recall 0.3 (not 0.2); below the floor, F1 0.114 > 0.095
    assert keys[0] > keys[1]


def test_a_code_on_the_recall_floor_is_above_it_and_beats_any_below():
    precision = torch.tensor([[0.5, 1.0, 0.25], [0.3, 1.0, 0.0]])
    recall = torch.tensor([[0.25, 0.125, 0.75], [0.5, 0.2, 0.0]])
    index, _ = patterns.best_codes(precision, recall, min_recall=0.25)
    # row 0: code 0 at recall 0.25 exactly is above the floor and more precise than code 2 (code 1 below it);
    # row 1: code 0, 30% precise above the floor, beats code 1 below it, whose F1 (0.333) is above that precision
    assert index.tolist() == [0, 0]


def test_the_summary_counts_by_hand():
    """Precise: precision and recall at least the floors; a win: strictly more precise than the neuron or latent."""
    rows = [{"code": "L0.H0.1", "precision": 0.8, "recall": 0.1, "neuron_precision": 0.8, "sae_precision": 0.9,
             "neuron": "n", "sae": "s"},  # on both floors; ties the neuron (no win), loses to the latent
            {"code": "L0.H1.2", "precision": 0.9, "recall": 0.5, "neuron_precision": 0.95, "sae_precision": 0.5,
             "neuron": "n", "sae": "s"},  # loses to the neuron, beats the latent
            {"code": "L1.H0.3", "precision": 0.75, "recall": 0.9},  # not precise; no neuron or SAE column
            {"code": None, "precision": None, "recall": None}]
    assert patterns.pattern_summary(rows) == {"patterns": 4, "found": 3, "precise_codes": 2, "min_precision": 0.8,
                                              "min_recall": 0.1, "code_beats_neuron": 0, "code_beats_sae": 1}


def test_pattern_table_finds_a_planted_code_and_scores_neurons_and_latents_by_hand():
    config = dict(vocab_size=257, block_size=32, n_layer=2, n_head=2, d_model=16, d_mlp=32)
    torch.manual_seed(0)
    model = cb.GPT(config | {"codebooks": {"attn": dict(num_codes=16, k=2), "mlp": dict(num_codes=8, k=1, layers=[1])}}).eval()
    base = cb.GPT(config).eval()
    stories = " ".join(story for _, story in text.make_stories(4))
    tokens = torch.tensor(BYTES.encode(stories)[:12 * 32]).view(12, 32)
    masks = patterns.pattern_masks(tokens, BYTES, {"the": patterns.PATTERNS["the word 'the'"], "space": r"( )"})
    the = masks["the"]
    planted = the & (the.cumsum(-1) <= 1)  # the first target of each row: a recall counted by hand below
    n_targets, n_planted = int(the.sum()), int(planted.sum())
    assert 0 < n_planted < n_targets

    g = torch.Generator().manual_seed(0)
    saes = {(0, "attn"): sae.TopKSAE(2, 8, 12, 2, generator=g), (1, "mlp"): sae.TopKSAE(1, 16, 10, 1, generator=g)}
    with cb.disable_codes(model, ["L1.H1.5"]), cb.force_codes(model, ["L1.H1.5"], positions=planted):
        rows = patterns.pattern_table(model, tokens, masks, base=base, saes=saes)
    row = rows[0]
    assert row == row | {"pattern": "the", "positions": n_targets, "code": "L1.H1.5", "precision": 1.0}
    assert row["recall"] == pytest.approx(n_planted / n_targets)

    # the best neuron and SAE latent at the code's recall, every one tried by hand
    with cb.capture_activations(base) as acts:
        base(tokens)
    flat = the.flatten()
    neurons = {f"{cb.Address(layer, site, h)}[{i}]": acts[layer][site][:, :, h, i].flatten()
               for layer in acts for site in ("attn", "mlp") for h in range(acts[layer][site].shape[2])
               for i in range(acts[layer][site].shape[3])}
    precision = lambda name: max(precision_at_recall(sign * neurons[name], flat, row["recall"]) for sign in (1, -1))
    neuron_best = max(map(precision, neurons))
    assert row["neuron_precision"] == pytest.approx(neuron_best) and precision(row["neuron"]) == pytest.approx(neuron_best)
    latents = {}
    for (layer, site), s in saes.items():
        z = s.encode(acts[layer][site]).flatten(0, 1)  # (positions, heads, latents)
        latents |= {f"SAE {cb.Address(layer, site, h)}[{i}]": z[:, h, i] for h in range(s.heads) for i in range(s.num_latents)}
    latent_best = max(precision_at_recall(v, flat, row["recall"]) for v in latents.values())
    assert row["sae_precision"] == pytest.approx(latent_best)
    assert precision_at_recall(latents[row["sae"]], flat, row["recall"]) == pytest.approx(latent_best)

    # the other pattern: its best code is the most precise of those at recall >= 10%, checked by hand
    ids, _ = cb.record_dataset(model, tokens)
    candidates = [(p.item(), r.item(), f"{a}.{c}") for a, v in ids.items()
                  for c, (p, r) in enumerate(zip(*cb.code_precision_recall(v, masks["space"], model.locate(a)[0].num_codes)))
                  if r >= 0.1]
    best = max(candidates)
    space = rows[1]
    assert (space["precision"], space["recall"]) == pytest.approx(best[:2])
    summary = patterns.pattern_summary(rows)
    assert summary["precise_codes"] == 1 + (space["precision"] >= 0.8) and summary["found"] == 2
    assert patterns.pattern_table(model, tokens, masks) == [{k: r[k] for k in ("pattern", "positions", "code", "precision", "recall")}
                                                            for r in patterns.pattern_table(model, tokens, masks, base=base)]


def test_pattern_table_without_targets_and_bad_input(capsys):
    model = cb.GPT(dict(vocab_size=257, block_size=16, n_layer=1, n_head=2, d_model=8, d_mlp=16,
                        codebooks={"attn": dict(num_codes=8, k=1)})).eval()
    tokens = torch.tensor(BYTES.encode("no digits in here, none at all!")[:16])[None]
    masks = patterns.pattern_masks(tokens, BYTES, {"digit": patterns.PATTERNS["digit"]})
    rows = patterns.pattern_table(model, tokens, masks, base=model)
    assert rows == [{"pattern": "digit", "positions": 0, "code": None, "precision": None, "recall": None}]
    patterns.print_pattern_table(rows)
    assert "0 of 1 patterns" in capsys.readouterr().out
    with pytest.raises(ValueError, match="pass it as base"):
        patterns.pattern_table(model, tokens, masks, saes={})
    with pytest.raises(ValueError, match="one mask shaped like the tokens"):
        patterns.pattern_table(model, tokens, {"digit": masks["digit"][:, :8]})
    with pytest.raises(ValueError, match="min_recall"):
        patterns.pattern_table(model, tokens, masks, min_recall=0)
    with pytest.raises(ValueError, match="the model has no codebooks"):
        patterns.pattern_table(cb.GPT(dict(model.config.to_dict(), codebooks={})), tokens, masks)


# --- the prose corpora --------------------------------------------------------------------------

def test_prose_corpora_split_by_document_the_same_way_every_time(tmp_path):
    for name in text.PROSE:
        train, held = text.prose(name)
        assert train == sorted(train) and held == sorted(held) and not set(train) & set(held)
        share = sum(len(d.encode()) for d in held) / sum(len(d.encode()) for d in train + held)
        assert 0.1 <= share < 0.2, name
    reference = text.reference_documents()
    assert sum(map(len, reference)) > 300_000 and len(set(reference)) == len(reference)
    assert any(doc.startswith('The "if" statement\n==================') for doc in reference)
    assert text.prose("reference") == text.prose("reference") and sorted(sum(text.prose("reference"), [])) == reference
    docstrings = text.docstring_documents(20_000)
    assert 20_000 <= sum(len(d.encode()) for d in docstrings) < 40_000 and docstrings == sorted(set(docstrings))
    assert docstrings == text.docstring_documents(20_000)

    train_split, val_split, folder = text.prepare_prose("reference", str(tmp_path), 64)
    _, held = text.prose("reference")
    assert val_split.tokens(0, 1)[0] == text.BOS and len(val_split.data) == sum(len(d.encode()) for d in held)
    assert val_split.num_tokens == len(val_split.data) + len(held)
    assert text.prepare_prose("reference", str(tmp_path), 64)[2] == folder
    with pytest.raises(ValueError, match="no prose corpus"):
        text.prose("wiki")
    with pytest.raises(ValueError, match="held-out fraction"):
        text.prose("reference", 1.0)
    with pytest.raises(ValueError, match="max_bytes"):
        text.docstring_documents(0)
