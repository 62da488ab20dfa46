"""TokFSM: the data, the metrics on hand-built cases, and a smoke run of the whole pipeline."""
import contextlib
import json
import math
import os
import re

import pytest
import torch

import codebook as cb
import runs
import sae
import train_fsm as T
from conftest import randomize


def test_walks_are_legal_and_digits_decode_back_to_states():
    fsm = T.TokFSM()
    assert fsm.successors.shape == (100, 10)
    assert all(len(set(row.tolist())) == 10 for row in fsm.successors)  # distinct successors
    states = fsm.random_walks(50, torch.Generator().manual_seed(0))
    tokens = fsm.encode(states)
    assert tokens.shape == (50, 129) and (tokens[:, 0] == fsm.bos).all() and (tokens[:, 1:] < 10).all()
    assert fsm.legal[states[:, :-1], states[:, 1:]].all()
    assert torch.equal(fsm.decode(tokens[:, 1:]), states)
    assert tokens[0, 1:3].tolist() == [states[0, 0] // 10, states[0, 0] % 10]  # "08": zero padded
    ends = torch.arange(100)
    back = fsm.walks_ending_in(ends, 5, torch.Generator().manual_seed(1))
    assert torch.equal(back[:, -1], ends) and fsm.legal[back[:, :-1], back[:, 1:]].all()


def test_seeded_reproducibility():
    assert torch.equal(T.TokFSM(seed=3).successors, T.TokFSM(seed=3).successors)
    assert not torch.equal(T.TokFSM(seed=3).successors, T.TokFSM(seed=4).successors)
    fsm = T.TokFSM()
    walk = lambda: fsm.random_walks(4, torch.Generator().manual_seed(9))
    assert torch.equal(walk(), walk())


def test_transition_accuracy_of_an_oracle_and_of_uniform_guessing():
    fsm = T.TokFSM()
    g = torch.Generator().manual_seed(0)
    oracle = fsm.random_walks(200, g)  # a sampler that only takes legal successors
    assert fsm.transition_accuracy(oracle) == (1.0, 1.0)
    uniform = fsm.decode(torch.randint(0, 10, (200, 128), generator=g))
    accuracy, _ = fsm.transition_accuracy(uniform)
    assert abs(accuracy - 0.10) < 0.02  # 10 legal successors out of 100
    broken = oracle.clone()
    broken[:, 1] = -1  # a BOS where a digit should be: both pairs around it are illegal
    assert fsm.transition_accuracy(broken)[1] == 0.0
    few = T.TokFSM(num_states=12, num_edges=3, base=10)  # "12" to "99" spell no state: illegal, not an error
    walk = few.random_walks(1, g, length=3)
    tokens = few.encode(walk)[:, 1:]
    tokens[0, 2:4] = torch.tensor([9, 2])
    assert few.decode(tokens).tolist() == [[walk[0, 0].item(), -1, walk[0, 2].item()]]
    assert few.transition_accuracy(few.decode(tokens)) == (0.0, 0.0)


def test_state_masks_and_precision_recall_on_a_hand_made_walk():
    fsm = T.TokFSM(num_states=12, num_edges=3, base=10, walk_length=3)
    states = torch.tensor([[fsm.successors[5, 0].item(), 5, 5]])
    states[0, 0] = 7
    states[0, 1] = fsm.successors[7, 0]
    states[0, 2] = fsm.successors[states[0, 1], 0]
    tokens = fsm.encode(states)  # BOS d d d d d d: state j's last digit is input position 2j + 2
    masks = fsm.state_masks(tokens)
    assert masks.shape == (12, 1, 6)
    assert masks[7, 0, 2] and masks[states[0, 1], 0, 4] and masks.sum() == 2  # the last state has no input
    ids = torch.tensor([[[0], [1], [2], [1], [3], [1]]])  # a codebook that fires code 2 at state 7's end
    precision, recall = cb.code_precision_recall(ids, masks, num_codes=4)
    assert precision[7].tolist() == [0, 0, 1, 0] and recall[7].tolist() == [0, 0, 1, 0]
    assert T.best_state_codes(precision, recall)[0][7] == 1.0


def test_intervention_on_a_hand_built_toy():
    # one layer whose *output* is quantised (a block codebook on the residual stream), one-digit
    # states: the prediction at a position is a function of the code there alone, so forcing b's
    # code at a's last position must give exactly b's prediction.
    fsm = T.TokFSM(num_states=8, num_edges=3, base=8, walk_length=12)
    torch.manual_seed(0)
    model = cb.GPT(dict(vocab_size=9, block_size=16, n_layer=1, n_head=2, d_model=16, d_mlp=32,
                        codebooks={"block": dict(num_codes=32, k=1)})).eval()
    pairs = torch.tensor([(a, b) for a in range(8) for b in range(8) if a != b])
    inputs = fsm.encode(fsm.walks_ending_in(torch.arange(8), 8, torch.Generator().manual_seed(7)))
    b_predicts = model(inputs)[:, -1, :8].argmax(-1)  # each b's own prediction
    expected = fsm.legal[pairs[:, 1], b_predicts[pairs[:, 1]]].float().mean().item()
    forced, _, forced_js = T.intervention_success(model, fsm, ["L0.BLOCK"], pairs)
    assert forced == pytest.approx(expected) and forced_js == pytest.approx(0, abs=1e-6)  # b's output exactly
    unforced = fsm.legal[pairs[:, 1], b_predicts[pairs[:, 0]]].float().mean().item()  # a's own prediction
    none, _, none_js = T.intervention_success(model, fsm, [], pairs)
    assert none == pytest.approx(unforced) and expected != pytest.approx(unforced)
    p = model(inputs)[:, -1, :8].log_softmax(-1)  # the divergence written out, from a's output to b's
    m = (p[pairs[:, 0]].exp() + p[pairs[:, 1]].exp()) / 2
    kl = lambda x: (x.exp() * (x - m.log())).sum(-1)
    assert none_js == pytest.approx((0.5 * kl(p[pairs[:, 0]]) + 0.5 * kl(p[pairs[:, 1]])).mean().item(), rel=1e-4)


def test_patching_activations_on_a_hand_built_toy():
    # the toy above without codebooks: writing b's residual stream (the block output) at a's last
    # position must give exactly b's prediction; writing an SAE's reconstruction of it there, the
    # prediction read from that reconstruction
    fsm = T.TokFSM(num_states=8, num_edges=3, base=8, walk_length=12)
    torch.manual_seed(0)
    model = cb.GPT(dict(vocab_size=9, block_size=16, n_layer=1, n_head=2, d_model=16, d_mlp=32)).eval()
    pairs = torch.tensor([(a, b) for a in range(8) for b in range(8) if a != b])
    inputs = fsm.encode(fsm.walks_ending_in(torch.arange(8), 8, torch.Generator().manual_seed(7)))
    with torch.no_grad(), cb.capture_activations(model) as acts:
        b_predicts = model(inputs)[:, -1, :8].argmax(-1)
    expected = fsm.legal[pairs[:, 1], b_predicts[pairs[:, 1]]].float().mean().item()
    patched, _, patched_js = T.intervention_success(model, fsm, [], pairs, patch={(0, "block"): lambda x: x})
    assert patched == pytest.approx(expected) and patched_js == pytest.approx(0, abs=1e-6)
    reconstruct = sae.TopKSAE(1, 16, 12, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reconstruct.b_pre.normal_(generator=torch.Generator().manual_seed(2))
        from_reconstruction = model.head(model.ln_f(reconstruct(acts[0]["block"][:, -1])[:, 0]))[:, :8].argmax(-1)
    expected = fsm.legal[pairs[:, 1], from_reconstruction[pairs[:, 1]]].float().mean().item()
    assert T.intervention_success(model, fsm, [], pairs, patch={(0, "block"): reconstruct})[0] == pytest.approx(expected)
    assert (from_reconstruction != b_predicts).any()  # the reconstruction is not b's activations


def test_interchange_batches_show_a_but_carry_b_codes_and_continue_from_b():
    fsm = T.TokFSM()
    torch.manual_seed(0)
    model = cb.GPT(dict(vocab_size=11, block_size=128, n_layer=2, n_head=2, d_model=16, d_mlp=32, attn_window=2,
                        codebooks={"attn": dict(num_codes=24), "mlp": dict(num_codes=40)}))
    walks = fsm.random_walks(16, torch.Generator().manual_seed(1))
    x, y, (codes, positions) = T.interchange_batch(model.train(), fsm, walks, 0.3, torch.Generator().manual_seed(2))
    assert model.training and all(layer.usage.sum() == 0 for layer in model.codebook_layers().values())
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == positions.shape == (16, 128)
    shown, true = fsm.decode(y), walks[:, :-1]  # y spells states 0 .. 63; state j ends at input 2j + 2
    swapped = positions[:, 2::2]
    assert not positions[:, 1::2].any() and positions[:, 0].sum() == 0 and 0.2 < swapped.float().mean() < 0.4
    assert torch.equal(shown[:, :-1][~swapped], true[~swapped]) and torch.equal(shown[:, -1], walks[:, -1])
    before = torch.cat([torch.zeros(16, 1, dtype=torch.long), true[:, :-1]], 1)
    assert fsm.legal[before, shown[:, :-1]][:, 1:][swapped[:, 1:]].all()  # a: a legal successor of the state before
    # the forced codes at a swapped end: all recorded together at one end of the same true state (clean walks)
    clean, _ = cb.record_dataset(model.eval(), fsm.encode(walks)[:, :-1])
    ends = {}
    for r, j in (~torch.zeros_like(swapped)).nonzero().tolist():
        ends.setdefault(true[r, j].item(), []).append(tuple(clean[a][r, 2 * j + 2].item() for a in clean))
    for r, j in swapped.nonzero().tolist():
        assert tuple(codes[a][r, 2 * j + 2].item() for a in clean) in ends[true[r, j].item()]


def test_smoke_run_of_the_whole_pipeline(tmp_path):
    argv = ["--n_layer", "1", "--n_head", "2", "--d_model", "16", "--d_mlp", "32", "--attn_codes", "32", "--mlp_codes", "16",
            "--base_steps", "6", "--codebook_steps", "4", "--revive_every", "2", "--batch_size", "8",
            "--eval_seqs", "50", "--samples", "8", "--pairs", "40", "--walk_length", "16",
            "--sae_steps", "5", "--sae_seqs", "16", "--device", "cpu", "--out", str(tmp_path)]
    T.main(argv)
    saved = json.loads((tmp_path / "results.json").read_text())
    # figures of results.json again from the files the run wrote: the models' validation loss, the
    # SAEs' spliced in, each state's best code's precision and recall
    args = T.settings(argv)
    fsm = T.TokFSM(args.num_states, args.num_edges, args.base, args.walk_length, args.seed)
    walks = T.evaluation_walks(fsm, args)
    model, base = runs.load_model(str(tmp_path / "codebook.pt")), runs.load_model(str(tmp_path / "base.pt"))
    saes = sae.load_saes(str(tmp_path / "sae.pt"))
    assert T.val_metrics(model, walks[:256]) == {k: saved["codebook"][k] for k in ("val_loss", "val_acc")}
    for name, m in (("baseline", base), ("codebook", model)):
        sampled = T.sample_states(m, fsm, args.samples, args.seed + 1)
        assert fsm.transition_accuracy(sampled) == (saved[name]["transition_accuracy"], saved[name]["first_transition_accuracy"])
    sites = {"none": [], "attn": ["L0.H0", "L0.H1"], "mlp": ["L0.MLP"], "all": ["L0.H0", "L0.H1", "L0.MLP"]}
    for name, at in sites.items():  # forcing b's codes at these codebooks, pair by pair
        success, first, js = T.intervention_success(model, fsm, at, T.intervention_pairs(args))
        assert (success, first, js) == (saved["codebook"]["intervention_success"][name],
                                        saved["codebook"]["intervention_first_digit_success"][name],
                                        saved["codebook"]["intervention_js_to_b"][name]), name
    with cb.replace_activations(base, saes):
        assert T.val_metrics(base, walks[:256]) == {k: saved["sae"][f"spliced_{k}"] for k in ("val_loss", "val_acc")}
    best = saved["codebook"]["state_code_codebook"]
    ids, _ = cb.record_dataset(model, walks[:, :-1])
    precision, recall = cb.code_precision_recall(ids[best], fsm.state_masks(walks), model.locate(best)[0].num_codes)
    for row in saved["codebook"]["states"]:
        code = cb.parse_code(row["code"]).code
        assert (row["precision"], row["recall"]) == (precision[row["state"], code].item(), recall[row["state"], code].item())
    assert saved["codebook"]["state_code_precision"] == pytest.approx(sum(r["precision"] for r in saved["codebook"]["states"]) / 100)
    assert saved["codebook"]["state_code_recall"] == pytest.approx(sum(r["recall"] for r in saved["codebook"]["states"]) / 100)
    for a, codes in ids.items():  # dead codes: the share of a codebook's codes that never fire on the walks, recounted
        num_codes = model.locate(a)[0].num_codes
        assert saved["codebook"]["dead_code_fraction"][a] == pytest.approx(len(set(range(num_codes)) - set(codes.flatten().tolist())) / num_codes)
    latents = sae.record_latents(base, saes, walks[:, :-1])
    assert saved["sae"]["dead_latent_fraction"] == {a: sae.dead_fraction(v, saes[cb.parse_address(a).layer, cb.parse_address(a).site]
                                                                          .num_latents) for a, v in latents.items()}
    pairs, identity = T.intervention_pairs(args), (lambda acts: acts)
    figures = lambda column, name: tuple(saved[column][f"intervention_{kind}"][name] for kind in
                                         ("success", "first_digit_success", "js_to_b"))
    for name, keys in (("mlp", [(0, "mlp")]), ("all", list(saes))):  # writing b's reconstructions, b's activations
        assert figures("sae", name) == T.intervention_success(base, fsm, [], pairs, patch={key: saes[key] for key in keys})
        assert figures("neurons", name) == T.intervention_success(base, fsm, [], pairs, patch={key: identity for key in keys})
    assert {key: (s.num_latents, s.k) for key, s in saes.items()} == {(0, "attn"): (32, 1), (0, "mlp"): (16, 1)}
    # the neurons at the SAE latents' recall: per state the best neuron (either sign) of the baseline's attention and
    # MLP outputs on the first walks, at the recall of the best SAE's best latent there (section 4.1), by definition
    best_sae, masks = saved["sae"]["state_latent_sae"], fsm.state_masks(walks)
    address = cb.parse_address(best_sae)
    _, sae_recall, _ = T.best_state_codes(*sae.latent_precision_recall(latents[best_sae], masks,
                                                                        saes[address.layer, address.site].num_latents))
    n = T.neuron_walks(args)
    with cb.capture_activations(base) as acts:
        base(walks[:n, :-1])
    neurons = torch.cat([acts[0][site].flatten(2).flatten(0, 1) for site in ("attn", "mlp")], 1)

    def best_neurons(recalls):  # per state, the best neuron's precision at that state's recall
        best = []
        for mask, recall in zip(masks[:, :n].flatten(1), recalls):
            need = next(hits for hits in range(1, int(mask.sum()) + 1) if hits / mask.sum() >= recall - 1e-6)
            for signed in (neurons, -neurons):  # each neuron fires at or above its need-th largest value on the state
                threshold = signed[mask].sort(0, descending=True).values[need - 1]
                fires = signed >= threshold
                best.append(((fires & mask[:, None]).sum(0) / fires.sum(0)).max().item())
        return list(map(max, zip(best[::2], best[1::2])))
    assert saved["neurons"]["precision_at_sae_recall"] == pytest.approx(sum(best_neurons(sae_recall.tolist())) / 100)
    assert saved["sae"]["state_latent_recall"] == pytest.approx(sae_recall.mean().item())
    at_code_recall = best_neurons([row["recall"] for row in saved["codebook"]["states"]])  # the codes' table
    assert [row["neuron_precision"] for row in saved["codebook"]["states"]] == pytest.approx(at_code_recall)
    assert saved["codebook"]["neuron_precision"] == saved["neurons"]["precision_at_code_recall"] == pytest.approx(sum(at_code_recall) / 100)
    # the SAEs change no codebook figure: the same evaluation without them (both stages resumed, done)
    at = argv.index("--sae_steps")
    without = T.main(argv[:at] + argv[at + 4:] + ["--no-sae", "--cards", "2"])  # and 2 cards per codebook on its page
    assert without["codebook"] == saved["codebook"] and "sae" not in without
    assert [h["step"] for h in saved["history"]["codebook"]] == [4] and saved["history"]["baseline"][-1]["step"] == 6
    fsm = json.loads((tmp_path / "fsm.json").read_text())
    assert len(fsm["successors"]) == fsm["num_states"] == 100
    with pytest.raises(ValueError, match=r"base.pt was trained with other settings \(settings.seed"):  # the first that differs
        T.main(argv + ["--seed", "1"])  # a rerun refused leaves the folder as it was
    assert json.loads((tmp_path / "fsm.json").read_text()) == fsm
    os.rename(tmp_path / "base.pt", tmp_path / "kept.pt")  # codebook.pt of other settings: refused before the baseline trains
    with pytest.raises(ValueError, match=r"codebook.pt was trained with other settings \(config.codebooks.attn.num_codes"):
        T.main(argv + ["--attn_codes", "16"])
    assert not (tmp_path / "base.pt").exists()
    os.rename(tmp_path / "kept.pt", tmp_path / "base.pt")
    model = runs.load_model(str(tmp_path / "codebook.pt"))  # other tools need nothing else
    assert model(torch.full((1, 1), fsm["bos"])).shape == (1, 1, 11)
    # report.html: every state's best code links to its card in the code browser
    page = (tmp_path / "report.html").read_text()
    assert len(saved["codebook"]["states"]) == 100
    for row in saved["codebook"]["states"]:
        assert f'href="#{row["code"]}"' in page and f'id="{row["code"]}"' in page
    assert set(re.findall(r'href="#([^"]+)"', page)) <= set(re.findall(r'id="([^"]+)"', page))  # no link leads nowhere


def test_a_flag_given_wins_over_its_preset(tmp_path, capsys):
    common = ["--device", "cpu", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        T.settings(["--preset", "paper", "--help"])
    assert "width of the residual stream (default: 128)" in " ".join(capsys.readouterr().out.split())  # the preset's
    assert T.settings(["--n_layer", "1", *common]).mlp_codes == [192]  # the default list, cut to the layers there are
    with pytest.raises(ValueError, match="--mlp_codes: 2 code counts for 1 layers"):  # a list typed is not cut
        T.settings(["--n_layer", "1", "--mlp_codes", "192,512", *common])
    with pytest.raises(ValueError, match="--eval_seqs 2000: the first 300 evaluation walks .* give a longer --walk_length"):
        T.settings(["--walk_length", "2", "--eval_seqs", "2000", *common])
    paper = T.settings(["--preset", "paper", *common])
    assert (paper.n_layer, paper.d_model, paper.attn_codes, paper.interchange) == (4, 128, [10000] * 4, 0.0)
    given = T.settings(["--preset", "paper", "--d_model", "64", "--attn_codes", "32", "--interchange", "0.5", *common])
    assert (given.n_layer, given.d_model, given.attn_codes, given.interchange) == (4, 64, [32] * 4, 0.5)
    assert given.base_config.d_model == 64 and given.batch_size == 512  # the flags not given: the preset's
    assert T.settings(common).d_model == 64 and T.settings(common).batch_size == 64  # no preset: the defaults
    # each preset writes to a folder of its own: `--preset quick` and then the full run never meet
    outs = [T.settings(["--device", "cpu", *preset]).out for preset in ([], ["--preset", "quick"], ["--preset", "paper"])]
    assert len(set(outs)) == 3 and outs[0] == "out/fsm"


# --- the reported figures against recounts written out, on small cases ------------------------------

def test_digits_of_states_and_what_spells_no_state_by_hand():
    fsm = T.TokFSM(num_states=12, num_edges=3, base=10)  # two digits; "12" .. "99" spell no state; 10 is BOS
    assert fsm.encode(torch.tensor([[8, 11, 0]])).tolist() == [[10, 0, 8, 1, 1, 0, 0]]
    tokens = torch.tensor([[1, 1, 1, 2, 0, 10, 10, 3, 10, 10, 9, 9, 1, 0]])
    # 11; 12 (just past the last state); a BOS as second, first or both digits; 99; 10
    assert fsm.decode(tokens).tolist() == [[11, -1, -1, -1, -1, -1, 10]]


def test_transition_accuracy_is_a_recount_of_legal_pairs():
    fsm = T.TokFSM(num_states=5, num_edges=2, base=10, walk_length=6)
    g = torch.Generator().manual_seed(0)
    states = torch.randint(-1, 5, (300, 6), generator=g)  # -1: no state (a BOS or digits past the states)
    states[:100] = fsm.random_walks(100, g)  # some legal walks too
    states[:50, 2] = -1  # the first pair legal, later ones not
    edge = lambda s, t: s >= 0 and t >= 0 and t in fsm.successors[s].tolist()
    pairs = [[edge(row[j], row[j + 1]) for j in range(5)] for row in states.tolist()]
    accuracy, first = fsm.transition_accuracy(states)
    assert accuracy == pytest.approx(sum(map(sum, pairs)) / 1500) and first == pytest.approx(sum(p[0] for p in pairs) / 300)


def test_walks_take_every_edge_about_equally_often():
    fsm = T.TokFSM(num_states=5, num_edges=3, base=10)
    walks = fsm.random_walks(6000, torch.Generator().manual_seed(0), length=2)  # uniform starts: ~400 steps per edge
    counts = torch.zeros(5, 5).index_put_((walks[:, 0], walks[:, 1]), torch.ones(6000), accumulate=True)
    taken = counts.gather(1, fsm.successors)
    assert counts.sum() == taken.sum() and ((taken / taken.sum(1, keepdim=True) - 1 / 3).abs() < 0.06).all()


def test_js_divergence_by_hand():
    p, q = torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    m = [0.7, 0.3]
    expected = 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)) + 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3))
    assert m and T.js_divergence(p.log(), q.log()).tolist() == pytest.approx([expected, 0], abs=1e-7)
    assert T.js_divergence(q.log(), p.log()).tolist() == pytest.approx([expected, 0], abs=1e-7)  # symmetric


def test_best_code_per_state_and_best_site_by_hand():
    # state 0: code 0 is the most precise, code 1 the best F1 (2 * .6 * .9 / 1.5 = .72 > .18)
    precision = torch.tensor([[1.0, 0.6, 0.0], [0.0, 0.2, 0.5]])
    recall = torch.tensor([[0.1, 0.9, 0.0], [0.0, 0.3, 0.4]])
    p, r, code = T.best_state_codes(precision, recall)
    assert (p.tolist(), r.tolist(), code.tolist()) == (pytest.approx([0.6, 0.5]), pytest.approx([0.9, 0.4]), [1, 2])
    worse = (torch.tensor([[0.5], [0.5]]), torch.tensor([[0.4], [0.2]]))  # mean precision x recall .15, the other's .37
    best, (p, r, code), precisions, recalls = T.best_site({"L0.H0": worse, "L1.MLP": (precision, recall), "L0.H1": worse})
    assert best == "L1.MLP" and code.tolist() == [1, 2]
    assert precisions == pytest.approx({"L0.H0": 0.5, "L1.MLP": 0.55, "L0.H1": 0.5})
    assert recalls == pytest.approx({"L0.H0": 0.3, "L1.MLP": 0.65, "L0.H1": 0.3})


def test_neuron_names_follow_the_columns_of_the_neuron_baseline():
    # the baseline's columns: per layer the heads' outputs side by side (d_model), then the MLP's (d_model)
    args = T.settings(["--n_layer", "2", "--n_head", "2", "--d_model", "16", "--device", "cpu"])
    names = [T.neuron_name(c, args) for c in range(64)]
    assert names[:17] == [f"L0.H{h}[{i}]" for h in range(2) for i in range(8)] + ["L0.MLP[0]"]
    assert (names[10], names[31], names[42], names[63]) == ("L0.H1[2]", "L0.MLP[15]", "L1.H1[2]", "L1.MLP[15]")


def two_digit_toy():
    """12 states in two base-4 digits (BOS 4) and a random model, far from uniform, with a codebook per head
    of layer 0; layer 1 without, so that what is forced at a position changes the next one's prediction
    (a codebook there would often round the change away)."""
    fsm = T.TokFSM(num_states=12, num_edges=3, base=4, walk_length=6)
    torch.manual_seed(0)
    model = cb.GPT(dict(vocab_size=5, block_size=16, n_layer=2, n_head=2, d_model=16, d_mlp=32,
                        codebooks={"attn": dict(num_codes=8, k=1, layers=[0])}))
    return fsm, randomize(model, 3)


@torch.no_grad()
def next_state_by_hand(model, fsm, x, codes=None, position=None, values=None):
    """log P(next state) of each row of x, one row and one state at a time: log P(first digit) +
    log P(second digit | the first), with codes[a][i] forced and values[key][i] written at `position`
    in both forwards; and log P(first digit)."""
    joint, first = torch.empty(len(x), fsm.num_states), torch.empty(len(x), fsm.base)
    for i in range(len(x)):
        force = cb.force_codes(model, {a: ids[i].tolist() for a, ids in codes.items()}, positions=[position]) if codes \
            else contextlib.nullcontext()
        write = lambda v: (lambda acts: torch.cat([acts[:, :position], v[None, None], acts[:, position + 1:]], 1))
        patch = cb.replace_activations(model, {key: write(v[i]) for key, v in values.items()}) if values \
            else contextlib.nullcontext()
        with force, patch:
            first[i] = model(x[i:i + 1])[0, -1, :fsm.base].log_softmax(-1)
            for s in range(fsm.num_states):
                d1, d2 = divmod(s, fsm.base)
                joint[i, s] = first[i, d1] + model(torch.cat([x[i], torch.tensor([d1])])[None])[0, -1, :fsm.base].log_softmax(-1)[d2]
    return joint, first


def test_next_state_logprobs_over_two_digits_by_hand():
    fsm, model = two_digit_toy()
    x = fsm.encode(fsm.random_walks(3, torch.Generator().manual_seed(1), length=4))[:, :7]  # BOS and 3 states
    for forced, values in ((None, None), ({"L0.H0": torch.tensor([[1], [5], [2]]), "L0.H1": torch.tensor([[7], [0], [3]])}, None),
                           (None, {(0, "mlp"): torch.randn(3, 1, 16, generator=torch.Generator().manual_seed(2))})):
        joint, first = T.next_state_logprobs(model, fsm, x, forced, 6, values)
        by_hand = next_state_by_hand(model, fsm, x, forced, 6, values)
        assert torch.allclose(joint, by_hand[0], atol=1e-5) and torch.allclose(first, by_hand[1], atol=1e-5)
        assert (joint.exp().sum(-1) < 1).all()  # 12 of the 16 spellings


def test_intervention_success_over_two_digits_by_hand():
    # two-digit states, every pair or a random third of them (not symmetric in a and b): the next state, its
    # first digit and the JS divergence to b's unforced next digit, recounted pair by pair
    fsm, model = two_digit_toy()
    inputs = fsm.encode(fsm.walks_ending_in(torch.arange(12), 5, torch.Generator().manual_seed(7)))  # as it draws them
    last = inputs.shape[1] - 1
    with torch.no_grad():
        model(inputs)
    recorded = cb.record_codes(model)
    all_pairs = torch.tensor([(a, b) for a in range(12) for b in range(12) if a != b])
    some = all_pairs[torch.randperm(132, generator=torch.Generator().manual_seed(0))[:40]]
    for sites, pairs in (([], all_pairs), (["L0.H0", "L0.H1"], some)):
        forced = {a: recorded[a][pairs[:, 1], last] for a in sites}
        joint, first = next_state_by_hand(model, fsm, inputs[pairs[:, 0]], forced, last)
        clean = next_state_by_hand(model, fsm, inputs[pairs[:, 1]])[1]
        hits = first_hits = js = 0
        for (a, b), j, f, c in zip(pairs.tolist(), joint, first, clean):
            hits += int(j.argmax()) in fsm.successors[b].tolist()
            first_hits += int(f.argmax()) in [s // fsm.base for s in fsm.successors[b].tolist()]
            m = (f.exp() + c.exp()) / 2
            js += 0.5 * (f.exp() * (f - m.log())).sum().item() + 0.5 * (c.exp() * (c - m.log())).sum().item()
        got = T.intervention_success(model, fsm, sites, pairs)
        assert got == pytest.approx((hits / len(pairs), first_hits / len(pairs), js / len(pairs)), rel=1e-4), sites
        assert 0 < got[1] < 1 and got[0] < got[1]  # neither all nor none: a wrong successor set shows
