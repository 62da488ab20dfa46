"""
Codes that mean something (paper section 4), found by pattern: a regular expression whose first
capture group ends on the target token marks positions of held-out text, and each code, neuron and
SAE latent is scored against them. Shared by the language-model scripts (train_lm.py reports the
table, steer.py reads topic words the same way); kept out of baselines.py, which holds what codes
are compared *with*, because this is the search itself, for codes and baselines alike.

  PATTERNS, topic_patterns()   the patterns of the table: 12 token patterns, one per story topic
  pattern_masks, text_mask     regex -> boolean mask over tokens, for any tokenizer of text.py / bpe.py
  pattern_table                per pattern: the best code, the best neuron and SAE latent at its recall
  print_pattern_table          that table, printed; pattern_summary: the counts the claims rest on
"""
import codecs
import re

import numpy as np
import torch

import baselines
import codebook as cb
import sae as sae_lib
import text

# A regex's first group ends on the target token: the token holding the group's last character.
PATTERNS = {
    "digit": r"(\d)",
    "year, its last digit": r"\b(?:1[5-9]\d|20\d)(\d)\b",
    "opening parenthesis": r"(\()",
    "closing bracket": r"([)\]}])",
    "newline": r"(\n)",
    "capital starting a sentence": r"[.!?] ([A-Z])",
    "past tense -ed": r"\b[a-z]+(ed)\b",
    "the word 'the'": r"\b(the)\b",
    "Python keyword": r"\b(def|return|import|class|if|for)\b",
    "comparison": r"(==|!=|<=|>=)",
    "double quote": r'(")',
    "month": r"\b(January|February|March|April|May|June|July|August|September|October|November|December)\b",
}


def topic_patterns(topics=None):
    """{"topic <name>": regex} for the story topics of text.py (default: all): a word of the topic
    (with "s" or "es" after it: text.topic_regex), any case, ending on the word's last token, as steer.py counts a hit."""
    return {f"topic {name}": f"(?i)({text.topic_regex(text.TOPICS[name]['words']).pattern})"
            for name in (topics or sorted(text.TOPICS))}


# ------------------------------------------------------------------------------------------------
# Regex -> mask over tokens.

def token_pieces(tokenizer, tokens):
    """The text each token adds to the decoded text: a list of str, None for BOS and the other special
    tokens (they end a document, so no match spans them). A character whose UTF-8 bytes are split
    over several tokens belongs to the token that completes it; bytes that complete none read as
    U+FFFD. A token's bytes are the tokenizer's bytes_of(token) (SentencePiece's "▁" as a space, its
    dummy prefix kept: decoding a token alone would drop a word's leading space)."""
    special = set(getattr(tokenizer, "special_ids", ())) | {tokenizer.bos}
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pieces = []

    def flush():  # bytes left over at a document's end
        rest = decoder.decode(b"", final=True)
        if rest:
            pieces[-1] += rest

    for t in map(int, tokens):
        if t in special or (tokenizer.kind == "bytes" and not 0 <= t < 256):
            flush()
            pieces.append(None)
            continue
        pieces.append(decoder.decode(tokenizer.bytes_of(t)))
    flush()
    return pieces


def pattern_masks(tokens, tokenizer, patterns):
    """{name: bool tensor shaped like tokens} for patterns {name: regex (str or compiled)}: a
    position is a target when the last character of a match's first group falls in that token's
    text (token_pieces). tokens: (seq,) or (rows, seq), each row its own text."""
    compiled = {}
    for name, regex in patterns.items():
        try:
            compiled[name] = re.compile(regex)
        except re.error as e:
            raise ValueError(f"pattern {name!r}: {regex!r} is not a regular expression ({e})") from None
        if compiled[name].groups < 1:
            raise ValueError(f"pattern {name!r}: {regex!r} has no capture group; put one around the target, e.g. (the)")
    rows = torch.as_tensor(tokens).reshape(-1, torch.as_tensor(tokens).shape[-1])
    masks = {name: np.zeros(rows.shape, dtype=bool) for name in patterns}
    for r, row in enumerate(rows.tolist()):
        pieces = token_pieces(tokenizer, row) + [None]
        start = 0
        for stop in (i for i, p in enumerate(pieces) if p is None):  # each document's stretch of the row
            document = pieces[start:stop]
            ends = np.cumsum([len(p) for p in document])  # one past each token's last character
            joined = "".join(document)
            for name, regex in compiled.items():
                for m in regex.finditer(joined):
                    if m.end(1) > m.start(1):  # the group took part and is not empty
                        masks[name][r, start + np.searchsorted(ends, m.end(1) - 1, side="right")] = True
            start = stop + 1
    return {name: torch.from_numpy(mask).reshape(torch.as_tensor(tokens).shape) for name, mask in masks.items()}


def text_mask(string, tokenizer, regex):
    """(tokens, mask): the string's tokens (int64) and pattern_masks' mask of one regex over them."""
    tokens = torch.as_tensor(np.asarray(tokenizer.encode(string), dtype=np.int64))
    return tokens, pattern_masks(tokens, tokenizer, {"": regex})[""]


# ------------------------------------------------------------------------------------------------
# The table.

def best_codes(precision, recall, min_recall=0.1):
    """The best feature per pattern, from precision and recall (patterns, features): the most precise
    of those that fire on at least min_recall of the pattern's positions (ties: the larger recall);
    where none does, the best F1. Returns (index, key) per pattern, key a tuple that orders the
    picks of several codebooks. Why precision at a recall floor and not F1 (train_fsm.py's choice
    for states): section 4's claim is that single codes are precise detectors where neurons are
    not (superposition); the authors' code search likewise ranks codes above a recall floor (1%)
    by precision. 10% is the floor of the claim checked here, so rare codes cannot win by luck."""
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-9)
    score = torch.where(recall >= min_recall, 1 + precision, f1)  # any code above the floor beats all below it
    top = score.max(-1, keepdim=True).values
    index = torch.where(score == top, recall, -1.0).argmax(-1)
    keys = [(float(top[s]), float(recall[s, i])) for s, i in enumerate(index.tolist())]
    return index, keys


def _pick(best, address, index, keys):
    """Keep, per pattern, the better of best[s] and this site's pick (index[s] with keys[s])."""
    for s, (i, key) in enumerate(zip(index.tolist(), keys)):
        if best[s] is None or key > best[s][0]:
            best[s] = (key, address, i)


@torch.no_grad()
def pattern_table(model, tokens, masks, base=None, saes=None, min_recall=0.1, batch_size=64):
    """Per pattern of masks ({name: bool (rows, seq)} over tokens (rows, seq), e.g. pattern_masks
    of held-out windows): the best code of any codebook of `model` (best_codes), and at that code's
    recall the precision of the best neuron of `base` (each coordinate of every layer's attention
    heads before W_O and MLP output: train_fsm.py's neuron baseline) and of the best latent of
    `saes` ({(layer, site): sae.TopKSAE} fitted to `base`), each thresholded as the neuron
    baseline does (baselines.neuron_precision_at_recall; latents on their positive side only).
    base None: no neuron or SAE column. Memory: base's activations at every site for all tokens
    at once (4 bytes x rows x seq x 2 d_model x n_layer), one site's SAE latents at a time.
    Returns a list of plain dicts, one per pattern, for results.json."""
    if saes is not None and base is None:
        raise ValueError("SAE latents are read from the model the SAEs were fitted to: pass it as base")
    if not masks or any(m.shape != tokens.shape for m in masks.values()):
        raise ValueError(f"give one mask shaped like the tokens {tuple(tokens.shape)} per pattern (pattern_masks "
                         f"of the same tokens), got {[tuple(m.shape) for m in masks.values()]}")
    if not 0 < min_recall <= 1:
        raise ValueError(f"min_recall={min_recall} must be in (0, 1]")
    if not model.codebook_layers():
        raise ValueError("the model has no codebooks to find codes in: give pattern_table a codebook model")
    names = list(masks)
    stacked = torch.stack([masks[n].bool() for n in names])  # (patterns, rows, seq)
    ids, _ = cb.record_dataset(model, tokens, batch_size)
    best = [None] * len(names)
    for address, recorded in ids.items():
        precision, recall = cb.code_precision_recall(recorded, stacked, model.locate(address)[0].num_codes)
        _pick(best, address, *best_codes(precision, recall, min_recall))
    rows = []
    for s, name in enumerate(names):
        row = {"pattern": name, "positions": int(stacked[s].sum()), "code": None, "precision": None, "recall": None}
        if row["positions"]:
            _, address, code = best[s]
            precision, recall = cb.code_precision_recall(ids[address], stacked[s], model.locate(address)[0].num_codes)
            row |= {"code": f"{address}.{code}", "precision": float(precision[code]), "recall": float(recall[code])}
        rows.append(row)
    found = [s for s, row in enumerate(rows) if row["code"] is not None]
    if base is None or not found:
        return rows

    recalls, flat = torch.tensor([rows[s]["recall"] for s in found]), stacked[found].flatten(1)  # (found, positions)
    picks = {"neuron": [None] * len(found), "sae": [None] * len(found)}

    def score(column, address, values, signs):  # values (positions, units) of one head
        top = baselines.neuron_precision_at_recall(values, flat, recalls, signs).max(-1)
        _pick(picks[column], address, top.indices, [(float(v),) for v in top.values])

    sites = [(layer, site) for layer in range(len(base.blocks)) for site in ("attn", "mlp")]
    acts = sae_lib.cache_activations(base, tokens, sites + [key for key in saes or {} if key not in sites], batch_size)
    for key, x in acts.items():  # x (positions, heads, dim)
        # (positions, heads, latents); the activations are kept on the CPU, the SAEs where train_lm.py trained them
        latents = saes[key].encode(x.to(saes[key].b_pre.device)).cpu() if saes and key in saes else None
        for h in range(x.shape[1]):
            address = str(cb.Address(*key, h))
            if key in sites:
                score("neuron", address, x[:, h], (1, -1))
            if latents is not None:
                score("sae", "SAE " + address, latents[:, h], (1,))
    for column, chosen in picks.items():
        for s, pick in zip(found, chosen):
            if pick is not None:
                (value,), address, unit = pick
                rows[s] |= {column: f"{address}[{unit}]", f"{column}_precision": value}
    return rows


def pattern_summary(rows, min_precision=0.8, min_recall=0.1):
    """The counts section 4's claims rest on: patterns found (some positions), those with a code at
    least min_precision precise at recall >= min_recall, and those whose code is more precise than
    the best neuron / SAE latent at its recall."""
    found = [r for r in rows if r["code"] is not None]
    return {"patterns": len(rows), "found": len(found),
            "precise_codes": sum(r["precision"] >= min_precision and r["recall"] >= min_recall for r in found),
            "min_precision": min_precision, "min_recall": min_recall,
            "code_beats_neuron": sum(r["precision"] > r["neuron_precision"] for r in found if "neuron" in r),
            "code_beats_sae": sum(r["precision"] > r["sae_precision"] for r in found if "sae" in r)}


def print_pattern_table(rows, title="patterns"):
    """The table as train_fsm.py prints its own: one line per pattern, then pattern_summary."""
    pct = lambda x: "" if x is None else f"{100 * x:6.2f}%"
    print(f"\n{title:30s}{'positions':>10s}  {'best code':16s}{'precision':>10s}{'recall':>9s}"
          f"{'neuron':>10s}{'SAE':>10s}   (neuron, SAE latent: precision at the code's recall)")
    for r in rows:
        print(f"{r['pattern'][:30]:30s}{r['positions']:10d}  {r['code'] or '-':16s}{pct(r['precision']):>10s}"
              f"{pct(r['recall']):>9s}{pct(r.get('neuron_precision')):>10s}{pct(r.get('sae_precision')):>10s}")
    s = pattern_summary(rows)
    print(f"{s['precise_codes']} of {s['patterns']} patterns have a code at least {s['min_precision']:.0%} precise at "
          f"recall >= {s['min_recall']:.0%}; the code beats the best neuron on {s['code_beats_neuron']}, "
          f"the best SAE latent on {s['code_beats_sae']}")
