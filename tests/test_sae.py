"""sae.py against its definition written out by hand, on a toy it must solve, and splicing
(codebook.replace_activations) against the forward written out by hand."""
import pytest
import torch
import torch.nn.functional as F

import codebook as cb
import sae as S


def random_sae(heads=2, dim=3, num_latents=5, k=2, seed=0):
    torch.manual_seed(seed)
    sae = S.TopKSAE(heads, dim, num_latents, k)
    with torch.no_grad():  # parameters away from their initial values: encoder != decoder^T, biases set
        for p in (sae.encoder, sae.b_enc, sae.b_pre, sae.decoder):
            p.normal_()
    sae.normalize_decoder()
    return sae


def by_hand(sae, x):
    """The SAE's definition, one position and one head at a time."""
    out = torch.empty_like(x)
    for t in range(x.shape[0]):
        for h in range(sae.heads):
            pre = sae.encoder[h] @ (x[t, h] - sae.b_pre[h]) + sae.b_enc[h]
            top = sorted(range(sae.num_latents), key=lambda i: -pre[i])[:sae.k]
            out[t, h] = sae.b_pre[h] + sum(max(pre[i], 0) * sae.decoder[h, i] for i in top)
    return out


def test_forward_is_its_definition_written_out_by_hand():
    sae = random_sae()
    x = torch.randn(7, 2, 3)
    with torch.no_grad():
        assert torch.allclose(sae(x), by_hand(sae, x), atol=1e-6)
        assert torch.allclose(sae.decoder.norm(dim=-1), torch.ones(2, 5))
        z = sae.encode(x)
        assert ((z > 0).sum(-1) <= 2).all() and (z >= 0).all()
        assert torch.equal(sae(x[None]), sae(x)[None])  # any leading shape
        # top_latents: the ids TopK chose; a slot the ReLU zeroed holds num_latents
        sae.b_enc[1] = -100.0  # head 1 never fires
        ids = sae.top_latents(x)
        assert ids.shape == (7, 2, 2) and (ids[:, 1] == 5).all()
        assert torch.equal(ids[:, 0].sort(-1).values, z[:, 0].topk(2, -1).indices.sort(-1).values)
    with pytest.raises(ValueError, match="must end in"):
        sae(torch.randn(4, 3, 3))


def test_auxk_is_zero_without_dead_latents_and_the_error_fitted_by_dead_ones_otherwise():
    sae = random_sae(heads=2, dim=4, num_latents=6, k=1)
    sae.k_aux = 2
    x = torch.randn(9, 2, 4)
    mse, aux = sae.eval().losses(x)
    assert aux.item() == 0.0 and mse.item() == pytest.approx((x - by_hand(sae, x)).pow(2).sum(-1).mean(0).sum().item(), rel=1e-5)
    dead = [[0, 3, 4], []]  # head 0: three dead latents; head 1: none
    sae.tokens_since_fired[0, dead[0]] = sae.dead_after
    _, aux = sae.losses(x)
    error = x - by_hand(sae, x)
    expected = 0.0
    for t in range(9):
        pre = sae.encoder[0] @ (x[t, 0] - sae.b_pre[0]) + sae.b_enc[0]
        top = sorted(dead[0], key=lambda i: -pre[i])[:2]
        error_hat = sum(max(pre[i], 0) * sae.decoder[0, i] for i in top)
        expected += (error[t, 0] - error_hat).pow(2).sum() / 9
    assert aux.item() == pytest.approx(expected.item(), rel=1e-5)


def test_auxk_with_fewer_dead_latents_than_k_aux_uses_only_those():
    sae = random_sae(heads=2, dim=4, num_latents=6, k=1)
    sae.k_aux = 3
    x = torch.randn(9, 2, 4)
    dead = [[2], [1, 5]]  # fewer than k_aux in each head: the live latents take no part
    for h, latents in enumerate(dead):
        sae.tokens_since_fired[h, latents] = sae.dead_after
    _, aux = sae.eval().losses(x)
    error = x - by_hand(sae, x)
    expected = 0.0
    for t in range(9):
        for h, latents in enumerate(dead):
            pre = sae.encoder[h] @ (x[t, h] - sae.b_pre[h]) + sae.b_enc[h]
            error_hat = sum(max(pre[i], 0) * sae.decoder[h, i] for i in latents)
            expected += (error[t, h] - error_hat).pow(2).sum() / 9
    assert aux.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_latent_chosen_but_zeroed_by_the_relu_has_not_fired():
    sae = random_sae(heads=2, dim=4, num_latents=6, k=2)
    with torch.no_grad():
        sae.b_enc[1] = -100.0  # head 1: its top latents are chosen, but never fire
    sae.tokens_since_fired[:, 3] = 7
    sae.train().losses(torch.randn(32, 2, 4))
    assert (sae.tokens_since_fired[1] == torch.tensor([32, 32, 32, 39, 32, 32])).all()
    assert (sae.tokens_since_fired[0] == 0).sum() >= 2


def test_training_keeps_decoder_rows_unit_norm_and_counts_tokens_since_firing():
    sae = random_sae(heads=2, dim=4, num_latents=6, k=1)
    x = torch.randn(32, 2, 4)
    mse, aux = sae.train().losses(x)
    assert (sae.tokens_since_fired == 0).sum() == (sae.encode(x) > 0).any(0).sum()
    assert (sae.tokens_since_fired[sae.tokens_since_fired > 0] == 32).all()
    mse.backward()
    sae.project_decoder_grad()
    assert torch.allclose((sae.decoder.grad * sae.decoder).sum(-1), torch.zeros(2, 6), atol=1e-5)
    S.train_sae(sae, torch.randn(200, 2, 4), steps=5, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sae.decoder.norm(dim=-1), torch.ones(2, 6), atol=1e-6)


def test_recovers_a_dictionary_from_its_sparse_combinations(one_thread):
    # activations that are exactly k = 2 positive combinations of 32 random unit atoms in 32
    # dimensions, plus an offset; an SAE of 64 latents, k = 2, started as Gao et al. start it
    # (random directions), must find every atom and fit them
    g = torch.Generator().manual_seed(0)
    atoms = F.normalize(torch.randn(32, 32, generator=g), dim=-1)
    which = torch.rand(8000, 32, generator=g).topk(2, -1).indices
    x = ((1 + torch.rand(8000, 2, 1, generator=g)) * atoms[which]).sum(1) + torch.randn(32, generator=g)
    saes = S.train_saes({(0, "mlp"): x[:, None]}, {(0, "mlp"): (64, 2)}, steps=300, batch_size=256, lr=3e-3,
                        data_directions=False, dead_after=4096)
    sae = saes[0, "mlp"]
    with torch.no_grad():
        relative_error = (sae(x[:, None]) - x[:, None]).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        best_cosine = (atoms @ sae.decoder[0].T).max(-1).values
    assert relative_error < 0.01 and best_cosine.min() > 0.99, (relative_error, best_cosine.min())


def test_fitting_on_two_threads_is_the_same_bit_for_bit_run_to_run():
    # a larger model's run (e.g. train_lm's SmolLM2 preset) fits its SAEs on torch's default threads;
    # the backward of indexing adds from racing threads, so the latents' rows must be gathered otherwise
    torch.set_num_threads(2)  # conftest's same_start restores the count after the test
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, 4, generator=g) @ torch.randn(4, 32, generator=g) + 1  # few directions: dead latents
    fits = [S.train_saes({(0, "attn"): x}, {(0, "attn"): (512, 8)}, steps=15, data_directions=False,
                         dead_after=600)[0, "attn"] for _ in range(2)]
    assert (fits[0].tokens_since_fired >= 600).any()  # the AuxK path ran too
    for a, b in zip(*(fit.parameters() for fit in fits)):
        assert torch.equal(a, b)


def test_initialisation_from_data():
    x = torch.randn(500, 2, 3, generator=torch.Generator().manual_seed(1)) + torch.tensor([5.0, -2.0, 1.0])
    x[:50] += 100  # outliers: they pull the mean far away, the median hardly
    sae = S.TopKSAE(2, 3, 7, 1)
    sae.init_from_data(x, generator=torch.Generator().manual_seed(0))
    # the geometric median, least summed distance: the directions from it to the points cancel (the mean: 0.8)
    assert (F.normalize(x - sae.b_pre, dim=-1).mean(0).norm(dim=-1) < 1e-4).all()
    assert torch.allclose(sae.encoder, sae.decoder) and torch.allclose(sae.decoder.norm(dim=-1), torch.ones(2, 7))
    picked = x[torch.randint(500, (7,), generator=torch.Generator().manual_seed(0))] - sae.b_pre  # (7, heads, 3)
    assert torch.allclose(sae.decoder, F.normalize(picked.transpose(0, 1), dim=-1), atol=1e-6)


# --- on a model: caching, training per site, reading latents -----------------------------------

TINY = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, d_model=16, d_mlp=32)


def test_saes_at_the_codebook_sites_with_their_sizes_without_touching_the_global_rng(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = cb.GPT(dict(TINY, codebooks={"attn": dict(num_codes=12, k=2), "mlp": dict(num_codes=[8, 10], k=1)})).eval()
    sizes = S.codebook_sizes(model)
    assert sizes == {(0, "attn"): (12, 2), (0, "mlp"): (8, 1), (1, "attn"): (12, 2), (1, "mlp"): (10, 1)}
    tokens = torch.randint(0, 11, (6, 16), generator=torch.Generator().manual_seed(1))
    base = cb.GPT(TINY).eval()
    base.load_state_dict(model.state_dict(), strict=False)
    acts = S.cache_activations(base, tokens, sizes, batch_size=4)
    assert acts[0, "attn"].shape == (96, 2, 8) and acts[1, "mlp"].shape == (96, 1, 16)
    rng = torch.get_rng_state()
    saes = S.train_saes(acts, sizes, steps=3, batch_size=32, seed=5)
    again = S.train_saes(acts, sizes, steps=3, batch_size=32, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the codebook stage draws the same numbers either way
    assert all(torch.equal(saes[key].decoder, again[key].decoder) for key in sizes)
    assert {key: (s.num_latents, s.k, s.heads) for key, s in saes.items()} == {
        (0, "attn"): (12, 2, 2), (0, "mlp"): (8, 1, 1), (1, "attn"): (12, 2, 2), (1, "mlp"): (10, 1, 1)}
    ids = S.record_latents(base, saes, tokens, batch_size=4)
    assert sorted(ids) == ["L0.H0", "L0.H1", "L0.MLP", "L1.H0", "L1.H1", "L1.MLP"]
    assert ids["L1.H1"].shape == (6, 16, 2)
    assert torch.equal(ids["L1.H1"], saes[1, "attn"].top_latents(acts[1, "attn"]).view(6, 16, 2, 2)[..., 1, :])
    with pytest.raises(ValueError, match="no cached activations"):
        S.train_saes({}, sizes)
    with pytest.raises(ValueError, match="steps=0: an SAE trains for at least one step"):
        S.train_saes(acts, sizes, steps=0)
    # fitted once and read back for the same tokens; the same tokens cut into other rows give other activations
    fits, train = [], S.train_saes
    monkeypatch.setattr(S, "train_saes", lambda *args, **kwargs: fits.append(1) or train(*args, **kwargs))
    for rows in (tokens, tokens, tokens.reshape(12, 8)):
        S.fit_saes(str(tmp_path / "sae.pt"), base, rows, sizes, steps=3, batch_size=32)
    assert len(fits) == 2


def test_latent_precision_recall_and_dead_fraction_leave_out_slots_where_nothing_fired():
    ids = torch.tensor([[[0], [1], [3], [1], [3]]])  # 3 latents; id 3: nothing fired
    mask = torch.tensor([[False, True, True, True, False]])
    precision, recall = S.latent_precision_recall(ids, mask, 3)
    assert precision.tolist() == [0, 1, 0] and recall.tolist() == pytest.approx([0, 2 / 3, 0])
    assert S.dead_fraction(ids, 3) == pytest.approx(1 / 3)


# --- splicing ----------------------------------------------------------------------------------

def test_splicing_the_identity_leaves_logits_unchanged_and_a_change_is_the_forward_by_hand():
    torch.manual_seed(0)
    model = cb.GPT(dict(TINY, n_layer=1)).eval()
    x = torch.randint(0, 11, (3, 16), generator=torch.Generator().manual_seed(2))
    logits = model(x)
    with cb.replace_activations(model, {(0, "attn"): lambda a: a, (0, "mlp"): lambda a: a}):
        assert torch.equal(model(x), logits)

    def shift(a):
        return 2 * a + 1

    block = model.blocks[0]  # the forward written out, with the MLP output replaced by shift()
    h = model.tok_emb(x) + model.pos_emb(torch.arange(16))
    q, k, v = block.qkv(block.ln1(h)).view(3, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
    h = h + block.attn_out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(3, 16, 16))
    mlp = block.mlp_out(F.gelu(block.mlp_in(block.ln2(h))))
    with cb.replace_activations(model, {(0, "mlp"): shift}), cb.capture_activations(model) as acts:
        assert torch.allclose(model(x), model.head(model.ln_f(h + shift(mlp))), atol=1e-5)
    assert torch.allclose(acts[0]["mlp"][:, :, 0], mlp, atol=1e-6)  # captures see x before its replacement
    assert block.replacements == {} and torch.equal(model(x), logits)
    with pytest.raises(RuntimeError), cb.replace_activations(model, {(0, "attn"): shift}):
        raise RuntimeError("restored after an exception too")
    assert block.replacements == {}
    with pytest.raises(ValueError, match="cannot replace"):
        with cb.replace_activations(model, {(1, "attn"): shift}):
            pass


def test_a_replacement_comes_before_the_codebook_at_its_site():
    torch.manual_seed(0)
    model = cb.GPT(dict(TINY, codebooks={"mlp": dict(num_codes=10, layers=[1])})).eval()
    x = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(3))
    sae = random_sae(heads=1, dim=16, num_latents=6, k=2)
    layer = model.blocks[1].codebooks["mlp"]
    with cb.capture_activations(model) as acts, cb.replace_activations(model, {(1, "mlp"): sae}):
        model(x)
    spliced = layer.last_ids.clone()
    with torch.no_grad():
        layer(sae(acts[1]["mlp"]))  # the codebook on the reconstruction of what the site saw
    assert torch.equal(layer.last_ids, spliced)
    model(x)
    assert not torch.equal(layer.last_ids, spliced)  # without the SAE, other inputs, other codes
