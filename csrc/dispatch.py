"""Which code search runs (after install(), codebook.topk_codes hands every search here):
the fused extension of this folder where it applies, else the reference search of codebook.py
while its score matrix is small, else a tiled torch search that never materialises it. All three
return the same ids (exact ties aside) and scores."""

import torch

import codebook
from csrc.loader import load_extension

SCORE_MATRIX_BYTES = 256 * 2**20  # a larger score matrix is searched in tiles, never materialised
IMPLS = ("auto", "reference", "chunked", "ext")


def search_chunked(x, book, k, similarity="cosine", disabled=None, tile=4096):
    """Tile over the codes keeping a running top-k, started from the first tile's (never from
    placeholders, which a top-k of -inf scores could keep): O(tokens x (k + tile)) memory."""
    H, N, _ = x.shape
    first = max(tile, k)
    best_scores, best_ids = codebook.search_reference(x, book[:, :first], k, similarity,
                                                      None if disabled is None else disabled[:, :first])
    for start in range(first, book.shape[1], tile):
        s = codebook.code_scores(x, book[:, start:start + tile], similarity,
                                 None if disabled is None else disabled[:, start:start + tile])
        tile_ids = torch.arange(start, start + s.shape[-1], device=x.device).expand(H, N, -1)
        best_scores, pick = torch.cat([best_scores, s], -1).topk(k, dim=-1)
        best_ids = torch.cat([best_ids, tile_ids], -1).gather(-1, pick)
    return best_scores, best_ids


def topk_codes(x, book, k, similarity="cosine", disabled=None, impl="auto"):
    """codebook.topk_codes for float32 queries x (heads, tokens, d) and codes `book` (heads, codes,
    d), by `impl`: "auto" (the extension when it is built and supports the case, no disabled codes;
    else the reference search or, over SCORE_MATRIX_BYTES, the tiled one), "reference", "chunked"
    or "ext"."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {', '.join(map(repr, IMPLS))}")
    ext = load_extension() if impl in ("auto", "ext") and disabled is None else None
    if impl == "ext" and ext is None:
        raise ValueError("impl='ext' needs the csrc extension (CODEBOOK_EXT not 0, a build that works) "
                         "and no disabled codes; use impl='auto'")
    if impl == "auto":
        fits = x.shape[0] * x.shape[1] * book.shape[1] * 4 <= SCORE_MATRIX_BYTES
        impl = "ext" if ext is not None and ext.supports(x, k) else "reference" if fits else "chunked"
    if impl == "reference":
        return codebook.search_reference(x, book, k, similarity, disabled)
    if impl == "chunked":
        return search_chunked(x, book, k, similarity, disabled)
    return ext.topk_codes(x, book, k, similarity)


def install():
    """From now on every codebook search (layers, k-means, recording codes) goes through topk_codes."""
    codebook.search = topk_codes
