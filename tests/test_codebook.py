"""codebook.py against the computation written out by hand: each test replays one idea of the
paper in plain torch and asserts the library computes the same thing."""
import ast
import math
import os
import numpy as np

import pytest
import torch
import torch.nn.functional as F

import codebook as cb
from conftest import ROOT, TINY, tiny_model, tokens
from csrc import dispatch


# --- the transformer -----------------------------------------------------------------------

def test_codebooks_off_is_the_plain_transformer():
    model = tiny_model(attn=dict(num_codes=40, k=2), mlp=dict(num_codes=30), block=dict(num_codes=20, layers=[0]))
    plain = cb.GPT(cb.GPTConfig(**TINY))
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".codebooks." in u for u in unexpected)
    x = tokens()
    model(x)
    with cb.codebooks_off(model):
        assert torch.allclose(model(x), plain(x), atol=1e-6)
        assert cb.record_codes(model) == {}  # not the codes of the forward before
    assert not torch.allclose(model(x), plain(x), atol=1e-3)  # and on, they differ

    # the plain transformer itself, written out with torch's own attention module
    block = plain.blocks[0]
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    mha.in_proj_weight.data, mha.in_proj_bias.data = block.qkv.weight.data, block.qkv.bias.data
    mha.out_proj.weight.data, mha.out_proj.bias.data = block.attn_out.weight.data, block.attn_out.bias.data
    h = torch.randn(2, 16, 32)
    for window in (0, 1, 3):  # 0: full causal attention; w: a query sees its w - 1 predecessors too
        block.window = window
        i, j = torch.arange(16)[:, None], torch.arange(16)
        hidden = (j > i) | ((i - j >= window) if window else False)  # True: may not attend
        h1 = h + mha(block.ln1(h), block.ln1(h), block.ln1(h), attn_mask=hidden, need_weights=False)[0]
        expected = h1 + block.mlp_out(F.gelu(block.mlp_in(block.ln2(h1))))
        assert torch.allclose(block(h), expected, atol=1e-5)


def test_generate_respects_top_k_and_is_seeded():
    model = tiny_model().eval()
    prompt = tokens(2, 4)
    a = model.generate(prompt, 20, top_k=1)
    assert torch.equal(a, model.generate(prompt, 20, temperature=0))  # top-1 sampling is greedy
    top3 = model.generate(prompt, 12, top_k=3, generator=torch.Generator().manual_seed(0))  # within block_size
    logits = model(top3[:, :-1])[:, 3:]  # what each new token was drawn from
    drawn = top3[:, 4:, None]
    assert (logits.topk(3, dim=-1).indices == drawn).any(-1).all() and (drawn[..., 0] != logits.argmax(-1)).any()
    s1 = model.generate(prompt, 20, generator=torch.Generator().manual_seed(3))
    s2 = model.generate(prompt, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and s1.shape == (2, 24) and torch.equal(s1[:, :4], prompt)
    prompts = tokens(256, 4)  # a temperature divides the logits: each row's token drawn from softmax(logits / 0.5)
    with torch.no_grad():
        probs = F.softmax(model(prompts)[:, -1] / 0.5, -1)
    drawn = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(model.generate(prompts, 1, temperature=0.5, generator=torch.Generator().manual_seed(4))[:, -1:], drawn)



@pytest.mark.parametrize("window", [0, 3])
def test_generation_with_the_key_value_cache_is_the_full_recomputation(window):
    torch.manual_seed(0)
    model = cb.GPT(cb.GPTConfig(**TINY, attn_window=window, codebooks={"attn": dict(num_codes=40, k=2)}))
    model = model.double().eval()  # float64: the two orders of summation agree to ~1e-15
    x = tokens(2, 16)
    cache = {}
    steps = [model(x[:, :3], cache)] + [model(x[:, t:t + 1], cache) for t in range(3, 16)]
    assert torch.allclose(torch.cat(steps, 1), model(x), atol=1e-10)
    with pytest.raises(ValueError, match="one new token"):
        model(x[:, :2], {"length": 3})

    def recompute(idx, n, generator):  # generation as the definition: rerun the whole prefix
        for _ in range(n):
            probs = F.softmax(model(idx[:, -16:])[:, -1].float(), -1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], 1)
        return idx

    prompt = tokens(3, 5)
    for forcing in (dict(codes=["L0.H2.5"]), dict(codes=["L0.H2.5"], positions=[-1])):  # cached / not
        with cb.disable_codes(model, ["L0.H1.3"]), cb.force_codes(model, **forcing):
            expected = recompute(prompt, 14, torch.Generator().manual_seed(5))  # past block_size 16 too
            assert torch.equal(model.generate(prompt, 14, generator=torch.Generator().manual_seed(5)), expected)
    with cb.force_codes(model, ["L0.H2.5"], positions=[1, -1]):  # position 1 of the text would move
        assert model.generate(prompt, 12).shape == (3, 17)  # the last forward reads 16 tokens: nothing moved yet
        with pytest.raises(ValueError, match="would move once the text outgrows block_size=16"):
            model.generate(prompt, 13)
    with cb.force_codes(model, ["L0.H2.5"], positions=[]):
        assert model.generate(prompt, 14).shape == (3, 19)

    def patch_first_position(x):
        x = x.clone()
        x[:, 0] = 0.0
        return x

    with cb.replace_activations(model, {(1, "attn"): patch_first_position}):  # a position's patch: no cache
        expected = recompute(prompt, 6, torch.Generator().manual_seed(5))
        assert torch.equal(model.generate(prompt, 6, generator=torch.Generator().manual_seed(5)), expected)

# --- code search ---------------------------------------------------------------------------

@pytest.mark.parametrize("similarity", cb.SIMILARITIES)
@pytest.mark.parametrize("heads,tokens_,codes,k,tile", [
    (3, 50, 100, 4, 32),  # codes not a multiple of the tile
    (1, 7, 1, 1, 4),  # a single code
    (2, 9, 13, 13, 5),  # k = num_codes
    (4, 33, 257, 1, 64),  # k = 1
])
def test_chunked_search_equals_reference(similarity, heads, tokens_, codes, k, tile):
    g = torch.Generator().manual_seed(0)
    x, book = torch.randn(heads, tokens_, 8, generator=g), torch.randn(heads, codes, 8, generator=g)
    want = cb.search_reference(x, book, k, similarity)
    got = dispatch.search_chunked(x, book, k, similarity, tile=tile)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("similarity", cb.SIMILARITIES)
def test_chunked_search_with_exact_ties(similarity):
    book = torch.randn(2, 6, 4).repeat(1, 5, 1)  # every code appears 5 times: scores tie exactly
    x = torch.randn(2, 20, 4)
    for k in (1, 3, 30):
        want, got = cb.search_reference(x, book, k, similarity), dispatch.search_chunked(x, book, k, similarity, tile=7)
        assert torch.allclose(got[0], want[0], atol=1e-5)
        assert torch.allclose(cb.code_scores(x, book, similarity).gather(-1, got[1]), got[0], atol=1e-5)
        assert all(len(set(row.tolist())) == k for row in got[1].reshape(-1, k))  # distinct ids


def test_chunked_search_returns_distinct_codes_where_scores_are_minus_inf():
    """A NaN query scores -inf everywhere; disabling leaves fewer real scores than k: the ids stay distinct."""
    x, book = torch.randn(1, 12, 4), torch.randn(1, 5000, 4)  # torch's top-k keeps placeholders at this size
    x[0, :3] = math.nan
    disabled = torch.ones(1, 5000, dtype=torch.bool)
    disabled[0, [7, 4500]] = False
    for mask in (None, disabled):
        for k in (2, 8):
            scores, ids = dispatch.search_chunked(x, book, k, disabled=mask)
            assert all(len(set(row.tolist())) == k for row in ids.reshape(-1, k))
    assert (ids[0, 3:, :2].sort(-1).values == torch.tensor([7, 4500])).all() and (scores[0, 3:, 2:] == -math.inf).all()


def test_search_honours_disabled_codes_and_ranks_by_cosine():
    x, book = torch.randn(1, 40, 6), torch.randn(1, 25, 6)
    disabled = torch.zeros(1, 25, dtype=torch.bool)
    disabled[0, ::2] = True
    for impl in ("reference", "chunked"):
        _, ids = dispatch.topk_codes(x, book, 3, disabled=disabled, impl=impl)
        assert not disabled[0, ids].any()
    cosine = F.cosine_similarity(x[0][:, None], book[0][None], dim=-1)
    assert torch.equal(dispatch.topk_codes(x, book, 5, impl="chunked")[1][0], cosine.topk(5).indices)


def test_codebook_py_imports_nothing_of_the_project_and_runs_plugs_the_fast_search_in():
    tree = ast.parse(open(os.path.join(ROOT, "codebook.py")).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} <= {"contextlib", "math", "re", "dataclasses", "torch"}, imported
    assert cb.search is dispatch.topk_codes  # runs.py (which conftest imports) installed it


# --- the codebook layer --------------------------------------------------------------------

def test_gradients_straight_through_and_explicit_codebook_loss():
    torch.manual_seed(0)
    layer = cb.CodebookLayer(heads=3, dim=8, num_codes=20, k=4)
    x = torch.randn(2, 5, 3, 8, requires_grad=True)
    w = torch.randn(2, 5, 3, 8)
    out = layer(x)
    ((out * w).sum() + layer.aux_loss).backward()

    # by hand: the output is the mean of the chosen codes; input gradient passes straight through
    x2 = x.detach().clone().requires_grad_()
    codes = layer.codes.detach().clone().requires_grad_()
    ln_w, ln_b = (p.detach().clone().requires_grad_() for p in (layer.ln_weight, layer.ln_bias))
    x_n = F.layer_norm(x2, (8,)) * ln_w + ln_b
    ids = layer.last_ids  # (2, 5, 3, 4)
    q = torch.stack([codes[h][ids[:, :, h]].mean(-2) for h in range(3)], dim=2)
    assert torch.allclose(out, q, atol=1e-6)
    recon = ((q - x_n.detach()) ** 2).sum(-1).mean(dim=(0, 1)).sum()  # per head: mean over tokens
    ((q * w).sum() + (x_n * w).sum() + recon).backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert torch.allclose(layer.codes.grad, codes.grad, atol=1e-5)
    assert torch.allclose(layer.ln_weight.grad, ln_w.grad, atol=1e-5)


def test_loss_variants_are_per_layer():
    torch.manual_seed(0)
    none, commit = cb.CodebookLayer(1, 8, 10, loss="none"), cb.CodebookLayer(1, 8, 10, loss="commitment", beta=0.5)
    x = torch.randn(4, 1, 8)
    none(x), commit(x)
    assert none.aux_loss == 0
    q = commit.codes.detach()[0][commit.last_ids[:, 0, 0]]
    x_n = commit.normalize(x)[:, 0]
    assert torch.allclose(commit.aux_loss, 1.5 * ((x_n - q) ** 2).sum(-1).mean())  # codebook + 0.5 commitment


def test_usage_counted_per_token_and_revival_replaces_exactly_the_unused_codes():
    torch.manual_seed(0)
    layer = cb.CodebookLayer(heads=2, dim=4, num_codes=50, k=2).train()
    x = torch.randn(3, 7, 2, 4)
    layer(x)
    assert layer.usage.sum() == 3 * 7 * 2 * 2  # every token's every slot, per head
    for h in range(2):
        assert torch.equal(layer.usage[h], torch.bincount(layer.last_ids[..., h, :].flatten(), minlength=50))
    used = layer.usage > 0
    before = layer.codes.detach().clone()
    revived = layer.revive_dead_codes()
    assert revived == int((~used).sum())
    changed = (layer.codes != before).any(-1)
    assert torch.equal(changed, ~used)
    assert layer.usage.sum() == 0
    revived_codes = layer.codes.detach().clone()
    assert layer.revive_dead_codes() == 0 and torch.equal(layer.codes, revived_codes)  # no forward since: no usage seen
    layer.enabled = False
    layer(x)
    assert layer.aux_loss == 0  # off, it adds no loss (not the last forward's)
    # revived codes sit near real (normalised) inputs: within the noise of one of them
    pool = layer.normalize(x).reshape(-1, 2, 4).transpose(0, 1)
    dist_to_pool = torch.cdist(layer.codes.detach(), pool).min(-1).values
    assert (dist_to_pool[~used] < 0.1).all()


def test_recording_and_sampling_count_no_usage_and_leave_revival_alone():
    """Only a training step's forward (with gradient) counts usage; record_dataset and generate in a
    model left in training mode must not make dead codes look used, nor replace the inputs revival draws from."""
    model = tiny_model().train()
    model(tokens())
    layer = model.blocks[1].codebooks["mlp"]
    usage, pool = layer.usage.clone(), layer.last_input
    cb.record_dataset(model, tokens(seed=2))
    model.generate(tokens()[:, :4], 3)
    assert model.training and torch.equal(layer.usage, usage) and layer.last_input is pool
    with torch.no_grad():
        model(tokens(seed=3))
    assert torch.equal(layer.usage, usage)


def test_reconstruction_error_is_the_mean_squared_error_since_the_last_revival():
    torch.manual_seed(0)
    layer = cb.CodebookLayer(heads=3, dim=4, num_codes=5, k=2).train()
    for _ in range(2):
        x = torch.randn(2, 7, 3, 4)
        out = layer(x)
        assert torch.allclose(layer.recon_sum / layer.token_count, ((out - layer.normalize(x)) ** 2).mean())
        layer.revive_dead_codes()
        assert layer.recon_sum == 0 and layer.token_count == 0


def test_revived_codes_are_drawn_in_proportion_to_the_squared_error():
    torch.manual_seed(0)
    layer = cb.CodebookLayer(heads=1, dim=2, num_codes=4001, k=1).train()
    layer.usage[0, 0] = 1  # code 0 in use; 4,000 dead
    layer.token_count += 2
    layer.last_input = torch.tensor([[[0.0, 0.0], [10.0, 0.0]]])  # (heads, tokens, dim)
    layer.last_error = torch.tensor([[1.0, 3.0]])  # the second input fitted 3 times worse
    assert layer.revive_dead_codes(noise=0) == 4000
    assert abs((layer.codes[0, 1:, 0] > 5).float().mean().item() - 0.75) < 0.03


def test_k_equal_to_num_codes_takes_the_mean_of_every_code():
    layer = cb.CodebookLayer(heads=2, dim=4, num_codes=3, k=3)
    assert torch.allclose(layer(torch.randn(5, 2, 4)), layer.codes.detach().mean(1).expand(5, 2, 4))


def test_revival_noise_follows_the_inputs_spread():
    # a head whose inputs fill a tiny ball (its LayerNorm gain near 0, as finetuning can leave it):
    # codes revived with a fixed noise would all sit outside the ball, and one code would win all
    torch.manual_seed(0)
    layer = cb.CodebookLayer(heads=1, dim=8, num_codes=64, k=1, similarity="euclidean").train()
    with torch.no_grad():
        layer.ln_weight.fill_(1e-4)
    x = torch.randn(512, 1, 8)
    layer(x)
    assert (layer.usage > 0).sum() == 1
    layer.revive_dead_codes()
    layer(x)
    assert (layer.usage > 0).sum() > 32
    layer(x[:1])  # one input: no spread to scale the noise by, and no NaN either
    assert layer.revive_dead_codes() > 0 and torch.isfinite(layer.codes).all()


def test_revival_favours_the_inputs_the_codebook_fits_worst():
    # 500 inputs sit on code 0; 12 lie far away and must share a code. Revived codes placed
    # uniformly would mostly land on the 500 (and lose to code 0); error-weighted, on the 12
    torch.manual_seed(0)
    layer = cb.CodebookLayer(heads=1, dim=8, num_codes=16, k=1, similarity="euclidean").train()
    near, far = torch.randn(8), torch.randn(8) * 10
    with torch.no_grad():
        layer.ln_weight.fill_(1.0)
        x = torch.cat([near.expand(500, 8), far + 0.3 * torch.randn(12, 8)])[:, None]
        layer.codes.zero_()
        layer.codes[0, 0] = layer.normalize(near)
        layer.codes[0, 1:] = 50.0  # never chosen
    layer(x)
    layer.revive_dead_codes()
    far_n = layer.normalize(x[500:, 0]).detach()
    revived = layer.codes.detach()[0, 1:]
    assert (torch.cdist(revived, far_n).min(-1).values < 0.5).all()
    layer(x)
    assert (layer.usage[0, 1:] > 0).sum() >= 8  # most of them now win some of the 12


def test_forced_codes_are_neither_trained_towards_the_input_nor_counted():
    torch.manual_seed(0)
    layer = cb.CodebookLayer(heads=1, dim=4, num_codes=8, k=1, loss="commitment").train()
    layer.disabled = torch.zeros(1, 8, dtype=torch.bool)
    layer.disabled[0, 5] = True  # the search never picks code 5, so only forcing can put it there
    x = torch.randn(2, 6, 1, 4)
    where = torch.zeros(2, 6, dtype=torch.bool)
    where[:, :3] = True  # half the positions
    layer.forced = [(0, torch.tensor([[[5]]]), where)]
    layer(x)
    assert (layer.last_ids[:, :3, 0, 0] == 5).all()
    assert layer.usage.sum() == 6  # only the searched half
    layer.aux_loss.backward()
    assert layer.codes.grad[0, 5].abs().sum() == 0
    layer.forced = [(0, torch.tensor([[[5]]]), None)]
    layer(x)
    assert layer.aux_loss == 0
    wide = cb.CodebookLayer(heads=1, dim=4, num_codes=8, k=2).train()  # one of two slots forced: not chosen either
    wide.disabled, wide.forced = layer.disabled, [(0, torch.tensor([[[5]]]), None)]
    wide(x)
    assert (wide.last_ids[..., 0, 1] == 5).all() and wide.usage.sum() == 0 and wide.aux_loss == 0


def test_kmeans_init_beats_random_init_on_clustered_data():
    torch.manual_seed(0)
    centres = torch.randn(2, 16, 8) * 3
    x = (centres[:, torch.randint(16, (2000,))] + 0.1 * torch.randn(2, 2000, 8)).transpose(0, 1)  # (2000, 2, 8)

    def recon_error(layer):  # relative to the spread of the (normalised) inputs, whose scale init sets
        with torch.no_grad():
            x_n = layer.normalize(x)
            return (((layer(x) - x_n) ** 2).mean() / x_n.var()).item()

    layer = cb.CodebookLayer(heads=2, dim=8, num_codes=16, k=1)
    random_error = recon_error(layer)
    cb.kmeans_init(layer, x)
    assert recon_error(layer) < 0.25 * random_error


# --- interventions ------------------------------------------------------------------------

def test_forcing_sets_exactly_the_requested_slots_and_the_mean_by_hand():
    model = tiny_model().eval()
    x = tokens()
    model(x)
    clean = cb.record_codes(model)
    with cb.force_codes(model, ["L1.H2.7", "L1.H2.9"], positions=[3, -1]):
        model(x)
        forced = cb.record_codes(model)
    for pos in range(16):
        if pos in (3, 15):
            assert (forced["L1.H2"][:, pos] == torch.tensor([7, 9])).all()  # both (k=2) slots, in the order given
        else:
            assert torch.equal(forced["L1.H2"][:, pos], clean["L1.H2"][:, pos])
    for address in clean:
        if address != "L1.H2":
            assert torch.equal(forced[address][:, :3], clean[address][:, :3])  # upstream untouched
    with cb.force_codes(model, ["L1.H2.7"], positions=[3, -1]), cb.force_codes(model, ["L1.H2.9"], positions=[3, -1]):
        model(x)
        nested = cb.record_codes(model)["L1.H2"]
        assert (nested[:, [3, 15]] == torch.tensor([9, 7])).all()  # the inner code in the slot before the outer's
        assert torch.equal(nested[:, 4:15], clean["L1.H2"][:, 4:15])
        with cb.force_codes(model, ["L1.H2.5"], positions=[4]):  # another position: its least similar slot
            model(x)
            assert (cb.record_codes(model)["L1.H2"][:, 4] == torch.stack([clean["L1.H2"][:, 4, 0], torch.full((4,), 5)], -1)).all()
        with cb.force_codes(model, ["L1.H2.5"], positions=[3]), pytest.raises(ValueError, match="more codes forced at one "
                                                                               "position than its codebook's k=2 slots"):
            model(x)
    layer = model.blocks[1].codebooks["attn"]
    with cb.force_codes(model, {"L1.H2": [5]}):
        out = layer(torch.randn(4, 16, 4, 8))
        ids = layer.last_ids
        assert (ids[..., 2, 1] == 5).all()
        assert torch.allclose(out[..., 2, :], layer.codes[2][ids[..., 2, :]].mean(-2), atol=1e-6)
    assert layer.forced == []
    # per-example codes, as the FSM interventions use them
    per_example = torch.tensor([[1], [2], [3], [4]])
    with cb.force_codes(model, {"L1.MLP": per_example}, positions=[-1]):
        model(x)
        assert torch.equal(cb.record_codes(model)["L1.MLP"][:, -1], per_example)
    # a forced code's recorded score is the search's score of that code, as if it had been chosen
    with cb.force_codes(model, "L1.H2.7"), cb.capture_activations(model) as acts:
        model(x)
        recorded = cb.record_codes(model, scores=True)["L1.H2"][..., 1]
    x_n = layer.normalize(acts[1]["attn"])[..., 2, :].reshape(1, -1, 8)
    every = cb.code_scores(x_n, layer.codes[2:3].detach(), "cosine")[0]
    assert torch.allclose(recorded.flatten(), every[:, 7], atol=1e-5)
    euclidean = cb.CodebookLayer(2, 4, 8, k=2, similarity="euclidean")
    euclidean.forced = [(1, torch.tensor([[[5]]]), None)]
    inputs = torch.randn(3, 6, 2, 4)
    euclidean(inputs)
    every = cb.code_scores(euclidean.normalize(inputs).reshape(-1, 2, 4).transpose(0, 1), euclidean.codes.detach(), "euclidean")
    assert torch.allclose(euclidean.last_scores[..., 1, 1].flatten(), every[1, :, 5], atol=1e-5)
    with pytest.raises(ValueError, match=r"forced codes of shape \(3, 1, 1\) do not fit the input.s \(batch, seq\) = \(4, 16\)"):
        with cb.force_codes(model, {"L1.MLP": torch.tensor([[1], [2], [3]])}):
            model(x)
    with cb.force_codes(model, ["L1.MLP.1"], positions=torch.ones(1, 8, dtype=torch.bool)):
        assert model.generate(x[:1, :8], 1).shape == (1, 9)  # one forward, on the prompt the mask covers
        with pytest.raises(ValueError, match="fit one input, and the next one grows or slides"):
            model.generate(x[:1, :8], 2)  # the next forward would have one more position than the mask
    with cb.force_codes(model, ["L1.MLP.1"], positions=torch.ones(3, 16, dtype=torch.bool)), \
            pytest.raises(ValueError, match="a mask of forced positions for 3 sequences, the input has 4"):
        model(x)
    # a list of bools is a mask, not the positions 0 and 1
    with cb.force_codes(model, ["L1.H2.5"], positions=[False] * 3 + [True] + [False] * 12):
        model(x)
        as_mask = cb.record_codes(model)["L1.H2"]
    assert (as_mask[:, 3, 1] == 5).all() and torch.equal(as_mask[:, :3], clean["L1.H2"][:, :3])
    per_row = np.arange(16)[None].repeat(4, 0) == 3  # (batch, seq)
    for positions in (np.arange(16) == 3, per_row, per_row.tolist()):  # numpy's bools too, and nested lists
        with cb.force_codes(model, ["L1.H2.5"], positions=positions):
            model(x)
            assert torch.equal(cb.record_codes(model)["L1.H2"], as_mask)
    # generating under positions as a tensor of ints, as under their list; per-position codes whose input
    # never grows: a prompt of block_size tokens, the window sliding
    generated = []
    for positions in ([0, 2], torch.tensor([0, 2])):
        with cb.force_codes(model, ["L1.MLP.1"], positions=positions):
            generated.append(model.generate(x[:1, :8], 3, temperature=0))
    assert torch.equal(*generated)
    with cb.force_codes(model, {"L1.MLP": torch.ones(1, 16, 1, dtype=torch.long)}):
        assert model.generate(x[:1], 1, temperature=0).shape == (1, 17)
        with pytest.raises(ValueError, match="the next one grows or slides"):
            model.generate(x[:1], 2)  # the window slides: its codes would move against the text
    with cb.force_codes(model, ["L1.MLP.1"], positions={0, 2}):  # any iterable of positions
        assert torch.equal(model.generate(x[:1, :8], 3, temperature=0), generated[0])
    with cb.codebooks_off(model):  # codes forced by a mask on codebooks that are off: nothing is forced
        plain = model.generate(x[:1, :8], 3, temperature=0)
        with cb.force_codes(model, ["L1.MLP.1"], positions=torch.ones(1, 8, dtype=torch.bool)):
            assert torch.equal(model.generate(x[:1, :8], 3, temperature=0), plain)


def test_forced_positions_count_from_the_end_and_skip_those_outside_the_input():
    model = tiny_model().eval()
    x = tokens()
    model(x)
    clean = cb.record_codes(model)["L1.MLP"][..., 0]  # the last codebook: forcing one position moves no other
    for positions, where in (([-16], [0]), ([-1, 15], [15]), ([16], []), ([-17], []), ([], [])):
        with cb.force_codes(model, ["L1.MLP.3"], positions=positions):
            model(x)
        expected = clean.clone()
        expected[:, where] = 3
        assert torch.equal(cb.record_codes(model)["L1.MLP"][..., 0], expected), positions


def test_replaced_activations_equal_forward_hooks_that_write_them_and_nest():
    model = tiny_model(mlp=dict(num_codes=30, layers=[1])).eval()  # no codebook at the replaced sites
    x = tokens()
    with torch.no_grad():
        handles = [model.blocks[0].mlp_out.register_forward_hook(lambda m, a, out: 2 * out),
                   model.blocks[1].attn_out.register_forward_pre_hook(lambda m, a: (a[0] + 1,))]
        hooked = model(x)
        for handle in handles:
            handle.remove()
        double, shift = {(0, "mlp"): lambda a: 2 * a}, {(1, "attn"): lambda a: a + 1}
        with cb.replace_activations(model, double), cb.replace_activations(model, shift):
            nested = model(x)
        with cb.replace_activations(model, double | shift):
            together = model(x)
        assert torch.equal(nested, hooked) and torch.equal(together, hooked) and not torch.equal(model(x), hooked)


def test_disabled_codes_never_appear_and_everything_is_undone_after_an_exception():
    model = tiny_model().eval()
    x = tokens(8)
    model(x)
    common = torch.bincount(cb.record_codes(model)["L0.H1"].flatten(), minlength=40).topk(5).indices.tolist()
    with pytest.raises(RuntimeError, match="^boom$"):  # this very exception: no other error on the way
        with cb.disable_codes(model, [f"L0.H1.{c}" for c in common[:3]]), cb.force_codes(model, ["L1.MLP.3"]), \
                cb.disable_codes(model, [f"L0.H1.{c}" for c in common[3:]]):  # nested: the inner adds to the outer
            model(x)
            assert not torch.isin(cb.record_codes(model)["L0.H1"], torch.tensor(common)).any()
            generated = model.generate(x[:, :4], 8)  # acts during generation too
            model(generated)
            assert (cb.record_codes(model)["L1.MLP"] == 3).all()
            raise RuntimeError("boom")
    assert all(layer.disabled is None and layer.forced == [] for layer in model.codebook_layers().values())
    model(x)
    assert torch.isin(cb.record_codes(model)["L0.H1"], torch.tensor(common)).any()


def test_addresses_parse_and_format():
    for text in ("L1.H2", "L3.MLP", "L0.BLOCK", "L1.H2.517", "L10.MLP.0"):
        assert str(cb.parse_address(text)) == text
    assert cb.parse_address("L1.H2.517") == cb.Address(1, "attn", 2, 517)
    assert cb.parse_address("L1.H2.517").codebook == cb.Address(1, "attn", 2)


# --- finding codes ------------------------------------------------------------------------

def test_precision_recall_on_a_hand_made_mask():
    ids = torch.tensor([[[0], [1], [1], [2]], [[1], [0], [2], [2]]])  # (2 seqs, 4 positions, k=1)
    mask = torch.tensor([[True, True, False, False], [False, True, False, False]])
    precision, recall = cb.code_precision_recall(ids, mask, num_codes=4)
    # code 0 fires at (0,0), (1,1): both in the mask; code 1 at (0,1) in, (0,2), (1,0) out
    assert torch.allclose(precision, torch.tensor([1.0, 1 / 3, 0.0, 0.0]))
    assert torch.allclose(recall, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))
    both, _ = cb.code_precision_recall(ids, torch.stack([mask, ~mask]), num_codes=4)
    assert torch.allclose(both[0], precision) and torch.allclose(both[1], torch.tensor([0.0, 2 / 3, 1.0, 0.0]))
    # a code in two slots of one position (forced where the search chose it) fires there once
    twice = torch.cat([ids, torch.tensor([[[0], [1], [1], [3]], [[1], [0], [2], [3]]])], -1)
    precision, recall = cb.code_precision_recall(twice, mask, num_codes=4)
    assert torch.allclose(precision, torch.tensor([1.0, 1 / 3, 0.0, 0.0])) and torch.allclose(recall, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))


def test_f1_is_the_harmonic_mean_of_precision_and_recall():
    f1 = cb.f1_score(torch.tensor([0.5, 1.0, 0.0, 0.9]), torch.tensor([0.5, 0.0, 0.0, 0.3]))
    assert torch.allclose(f1, torch.tensor([0.5, 0.0, 0.0, 2 * 0.27 / 1.2]))


def test_top_contexts_rank_by_score():
    ids = torch.tensor([[[1, 2], [3, 1]], [[1, 0], [2, 3]]])
    scores = torch.tensor([[[0.9, 0.5], [0.8, 0.7]], [[0.2, 0.1], [0.6, 0.3]]])
    assert cb.top_contexts(ids, scores, code=1, n=5) == [(0, 0, pytest.approx(0.9)), (0, 1, pytest.approx(0.7)),
                                                        (1, 0, pytest.approx(0.2))]
    ids, scores = torch.tensor([[[0], [3], [0], [0], [0], [3]]]), torch.tensor([[[.1], [.8], [.2], [.3], [.4], [-math.inf]]])
    # a score of -inf (a NaN input's): the code fires there all the same, and at no other position
    assert cb.top_contexts(ids, scores, code=3, n=5) == [(0, 1, pytest.approx(0.8)), (0, 5, -math.inf)]


@pytest.mark.parametrize("make, words", [
    (lambda: cb.CodebookLayer(1, 4, num_codes=3, k=4), "k=4 must be an int between 1 and num_codes=3"),
    (lambda: cb.CodebookLayer(1, 4, num_codes=0), "num_codes=0 must be an int, at least 1"),
    (lambda: cb.CodebookLayer(1, 4, num_codes=np.int64(8)), "8.? must be an int, at least 1"),
    (lambda: cb.CodebookLayer(1, 4, 8, similarity="dot"), "similarity"),
    (lambda: cb.GPTConfig(**TINY, codebooks={"attn": dict(layers=[5])}), r"layer 5 .*does not exist: n_layer=2"),
    (lambda: cb.GPTConfig(**TINY, codebooks={"ffn": {}}), "site 'ffn'"),
    (lambda: cb.GPTConfig(**{**TINY, "n_head": 5}), "divisible"),
    (lambda: cb.parse_address("L1.Q2"), "malformed"),
    (lambda: tiny_model().locate("L7.MLP"), "layer 7 does not exist"),
    (lambda: tiny_model().locate("L0.H4"), "head 4 does not exist"),
    (lambda: tiny_model().locate("L1.MLP.30"), "code 30 does not exist"),
    (lambda: tiny_model().locate("L0.BLOCK"), "no block codebook"),
    (lambda: tiny_model()(torch.zeros(2, 3)), "integer tensor"),
    (lambda: tiny_model()(torch.zeros(2, 3, 1, dtype=torch.long)), "integer tensor"),
    (lambda: tiny_model()(torch.zeros(2, 17, dtype=torch.long)), "block_size=16"),
    (lambda: tiny_model()(torch.full((2, 3), 11)), "vocab_size=11"),
    (lambda: cb.GPT(dict(TINY, attn_window=-1)), "attn_window=-1"),
    (lambda: cb.GPT(dict(TINY, codebooks={"mlp": dict(num_codes=[40])})), "1 code counts for n_layer=2"),
    (lambda: cb.GPT(dict(TINY, codebooks={"mlp": dict(num_codes=[40, 20])})).locate("L1.MLP.20"), "num_codes=20"),
    (lambda: cb.CodebookLayer(2, 4, 8)(torch.zeros(3, 1, 4)), r"heads=2, dim=4"),
    (lambda: cb.force_codes(tiny_model(), ["L1.MLP.1", "L1.MLP.2"]).__enter__(), "k=1 slots"),
    (lambda: cb.force_codes(tiny_model(), {"L1.MLP": [30]}).__enter__(), "num_codes=30"),
    (lambda: cb.force_codes(tiny_model(), ["L1.MLP"]).__enter__(), "name a code"),
    (lambda: cb.force_codes(tiny_model(), {"L1.MLP": [2.9]}).__enter__(), r"integer ids.*got torch.float32 \(1,\)"),
    (lambda: cb.force_codes(tiny_model(), {"L1.MLP": torch.ones(2, 4, 1, 1, dtype=torch.long)}).__enter__(), r"\(2, 4, 1, 1\)"),
    (lambda: tiny_model().generate(tokens(), 2, top_k=0), "top_k=0"),
    (lambda: tiny_model().generate(tokens(), 2, temperature=-1), "temperature=-1"),
    (lambda: cb.disable_codes(tiny_model(), [f"L1.MLP.{i}" for i in range(30)]).__enter__(), "fewer than k"),
    (lambda: cb.disable_codes(tiny_model(), [f"L0.H1.{i}" for i in range(39)]).__enter__(), "fewer than k=2"),
    (lambda: cb.topk_codes(torch.zeros(2, 3, 4), torch.zeros(1, 5, 4), 1), "heads=1"),
    (lambda: cb.code_precision_recall(torch.zeros(2, 4, 1, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), 4),
     r"masks of shape \(2, 3\) do not cover the ids' positions \(2, 4\)"),
    (lambda: cb.code_precision_recall(torch.tensor([[0], [5], [2]]), torch.ones(2, 3, dtype=torch.bool), 3),
     r"code ids must be integers in \[0, num_codes=3\)"),
    (lambda: cb.count_codes(torch.zeros(4, 1), 3), "code ids must be integers"),
    (lambda: cb.top_contexts(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), 1), r"\(rows, seq, k\), got \(3, 2\)"),
    (lambda: cb.top_contexts(torch.zeros(2, 3, 1, dtype=torch.long), torch.zeros(2, 3, 2), 0), r"got \(2, 3, 1\) and \(2, 3, 2\)"),
    (lambda: cb.CodebookLayer(1, -1, 8), "dim=-1 must be positive integers"),
    (lambda: cb.CodebookLayer(2.0, 4, 8), "heads=2.0"),
    (lambda: cb.CodebookLayer(1, 4, 8)(torch.zeros(3, 1, 4, dtype=torch.long)), "floating point"),
    (lambda: cb.kmeans_init(cb.CodebookLayer(2, 4, 8), torch.zeros(10, 8)), r"heads=2, dim=4\), got \(10, 8\)"),
    (lambda: cb.kmeans_init(cb.CodebookLayer(2, 4, 8), torch.zeros(0, 2, 4)), r"got \(0, 2, 4\)"),
    (lambda: tiny_model().generate(torch.zeros(4, dtype=torch.long), 2), r"integer tensor \(batch, seq\)"),
    (lambda: cb.force_codes(tiny_model(), {"L0.H1": [3], "L0.H1.9": [7]}).__enter__(), "name codebooks"),
    (lambda: cb.force_codes(tiny_model(), {"L0.H1": [3], " L0.H1": [7]}).__enter__(), "named twice"),
    (lambda: cb.force_codes(tiny_model(), {"L1.MLP": torch.tensor([True])}).__enter__(), "torch.bool"),
    (lambda: cb.force_codes(tiny_model(), ["L1.MLP.1"], positions=torch.ones(2, 16, dtype=torch.long)).__enter__(),
     r"a list of ints or a \(batch, seq\) bool mask"),
    (lambda: cb.force_codes(tiny_model(), ["L1.MLP.1"], positions=torch.tensor(3)).__enter__(), "list of ints"),
    (lambda: cb.force_codes(tiny_model(), ["L1.MLP.1"], positions=[1.5]).__enter__(), "list of ints"),
    (lambda: cb.force_codes(tiny_model(), ["L1.MLP.1"], positions=[True, 2]).__enter__(), "list of ints"),
    (lambda: cb.force_codes(tiny_model(), ["L1.MLP.1"], positions={0: 1}).__enter__(), "list of ints"),
    (lambda: cb.force_codes(tiny_model(), ["L1.MLP.1"], positions=torch.ones(1, 2, 16, dtype=torch.bool)).__enter__(),
     r"\(batch, seq\) or \(seq,\), got \(1, 2, 16\)"),
    (lambda: cb.replace_activations(tiny_model(), {"L1.MLP": abs}).__enter__(), r"name them \(layer, site\)"),
])
def test_clear_errors(make, words):
    with pytest.raises(ValueError, match=words):
        make()


# --- finetuning and the tools around interventions, against forward hooks -------------------

def hooked_activations(model):
    """What the paper's sites hold, read with torch's forward hooks: each head's output before W_O
    (the input of attn_out), the MLP output (the output of mlp_out), and each block's output."""
    acts, handles = {}, []
    for i, block in enumerate(model.blocks):
        H = block.n_head
        handles += [
            block.attn_out.register_forward_pre_hook(lambda m, a, i=i, H=H: acts.__setitem__((i, "attn"), a[0].unflatten(-1, (H, -1)))),
            block.mlp_out.register_forward_hook(lambda m, a, out, i=i: acts.__setitem__((i, "mlp"), out[:, :, None])),
            block.register_forward_hook(lambda m, a, out, i=i: acts.__setitem__((i, "block"), out[:, :, None]))]
    return acts, handles


def test_capture_activations_equals_what_forward_hooks_record():
    model = tiny_model(block=dict(num_codes=8, layers=[1])).eval()
    acts, handles = hooked_activations(model)
    with torch.no_grad(), cb.codebooks_off(model), cb.capture_activations(model) as captured:
        model(tokens())  # codebooks off: the hooks see what the codebooks would quantise
    for handle in handles:
        handle.remove()
    assert sorted((i, site) for i in captured for site in captured[i]) == sorted(acts)
    for (i, site), a in acts.items():
        assert torch.equal(captured[i][site], a), (i, site)
    with cb.capture_activations(model) as outer, cb.capture_activations(model) as inner:  # nested: both filled
        model(tokens())
    assert outer[1].keys() == inner[1].keys() == {"attn", "mlp", "block"} and torch.equal(outer[1]["mlp"], inner[1]["mlp"])


def test_with_codebooks_off_is_the_base_model_exactly():
    base = cb.GPT(cb.GPTConfig(**TINY, attn_window=3)).eval()
    model = cb.with_codebooks(base, {"attn": dict(num_codes=16, k=2), "mlp": dict(num_codes=8), "block": dict(num_codes=8)}).eval()
    x = tokens()
    with torch.no_grad(), cb.codebooks_off(model):
        assert torch.equal(model(x), base(x))
    with torch.no_grad():
        assert not torch.allclose(model(x), base(x), atol=1e-3)
    half = cb.with_codebooks(base.to(torch.bfloat16), {"mlp": dict(num_codes=8)})
    assert not half.training and {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad(), cb.codebooks_off(half):
        assert torch.equal(half(x), base(x))
    with pytest.raises(ValueError, match="has codebooks already"):
        cb.with_codebooks(model, {"mlp": dict(num_codes=8)})
    layer = cb.CodebookLayer(2, 4, 8)
    assert layer(torch.randn(3, 2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16  # a layer fits a bf16 network


def test_kmeans_init_sets_each_layernorm_to_the_scale_and_offset_of_its_inputs():
    model = cb.with_codebooks(cb.GPT(cb.GPTConfig(**TINY)), {"attn": dict(num_codes=16, k=2), "mlp": dict(num_codes=8)})
    x = tokens(8)
    acts, handles = hooked_activations(model)
    with torch.no_grad(), cb.codebooks_off(model):
        model(x)
    for handle in handles:
        handle.remove()
    cb.init_codebooks_kmeans(model, x)
    for (i, site), layer in model.codebook_layers().items():
        a = acts[(i, site)].reshape(-1, layer.heads, layer.dim)  # (tokens, heads, dim)
        scale = ((a - a.mean(-1, keepdim=True)) ** 2).mean(-1).sqrt().mean(0)  # per head: mean over tokens of each vector's std
        offset = a.mean(-1).mean(0)
        torch.testing.assert_close(layer.ln_weight, scale[:, None].expand(-1, layer.dim))
        torch.testing.assert_close(layer.ln_bias, offset[:, None].expand(-1, layer.dim))
