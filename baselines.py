"""
What codebook features are compared with, on the same model and the same evaluation sets:
single neurons (the paper's section 4.1 baseline) and activation addition (a steering baseline the
paper does not report, beside section 5's forcing). TopK sparse autoencoders, the third, are in sae.py.
"""
import contextlib
import math

import torch


def neuron_precision_at_recall(acts, masks, recalls, signs=(1, -1)):
    """The neuron baseline (section 4.1): for each neuron (column of acts (P, D)) and each sign,
    the threshold at which it fires on `recall` of the mask's positions; its precision there.
    masks (P,) or (S, P) bool with one recall each (a float or (S,)). Returns (D,) or (S, D):
    per neuron the better of its `signs` (an SAE latent, never negative, reads only as +1).
    Each column is sorted once for all the masks."""
    acts = acts.float()
    single = masks.dim() == 1
    masks = masks[None] if single else masks
    recalls = torch.as_tensor(recalls, dtype=torch.float64).reshape(-1).expand(len(masks))
    best = acts.new_zeros(len(masks), acts.shape[1])
    for signed in (sign * acts for sign in signs):
        ordered = signed.T.contiguous().sort(-1).values  # (D, P): how many positions reach a threshold
        for s, (mask, recall) in enumerate(zip(masks, recalls.tolist())):
            n_pos = int(mask.sum())
            if n_pos == 0:
                continue
            # mask positions that must be at or above it; a code's recall hits / n_pos comes as float32,
            # which may round it up: read to float32's precision, it asks for those hits, not one more
            need = max(1, math.ceil(recall * n_pos * (1 - 2**-23)))
            inside = signed[mask]
            threshold = inside.topk(need, dim=0).values[-1]  # (D,)
            fires = len(acts) - torch.searchsorted(ordered, threshold[:, None].contiguous())[:, 0]
            precision = (inside >= threshold).sum(0).float() / fires.float()
            best[s] = torch.maximum(best[s], precision)
    return best[0] if single else best


@contextlib.contextmanager
def add_vectors(model, vectors):
    """Activation addition, the steering baseline codes are compared with: {codebook address:
    vector (dim,)} added to that codebook's output at every position."""
    plan = {}
    for address, vector in vectors.items():
        cb, head = model.locate(address)
        plan.setdefault(cb, torch.zeros(cb.heads, cb.dim, device=cb.codes.device))[head] += vector.to(cb.codes.device)
    handles = [cb.register_forward_hook(lambda module, inputs, out, add=add: out + add.to(out.dtype))
               for cb, add in plan.items()]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
