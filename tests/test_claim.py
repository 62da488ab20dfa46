"""The paper's central claim end to end (section 4.1), on a TokFSM small enough for a test: train_fsm.py
trains a codebook model whose codes are the FSM's states (each state's best code fires at that state and
hardly anywhere else) and forcing state b's codes at the end of state a makes the model go on from b."""
import torch

import codebook as cb
import runs
import train_fsm as T

# 16 states written as two base-4 digits, 3 successors each (so a guess is legal 3/16 of the time)
FSM = dict(num_states=16, num_edges=3, base=4, walk_length=32, seed=0)
# the default's method (attention window 2, interchange training) on a 3-layer model, d_model 48, with
# unused codes revived every 20 of its 150 codebook steps
SETTINGS = ["--n_layer", "3", "--n_head", "3", "--d_model", "48", "--d_mlp", "64", "--attn_codes", "16", "--mlp_codes", "64",
            "--interchange", "0.5", "--batch_size", "16", "--base_steps", "150", "--codebook_steps", "150", "--revive_every", "20",
            "--eval_seqs", "100", "--samples", "20", "--pairs", "200", "--cards", "1", "--no-sae", "--device", "cpu"]


def test_codes_are_the_states_and_forcing_them_moves_the_model(tmp_path, one_thread):
    results = T.main([f"--{name}={value}" for name, value in FSM.items()] + SETTINGS + ["--out", str(tmp_path)])
    chance = FSM["num_edges"] / FSM["num_states"]
    base, c = results["baseline"], results["codebook"]
    transitions = base["transition_accuracy"], c["transition_accuracy"]
    assert transitions[0] > 0.9 and transitions[1] > transitions[0] - 0.05, transitions
    assert c["state_code_precision"] >= 0.9 and c["state_code_recall"] >= 0.5, (c["state_code_precision"], c["state_code_recall"])
    success = c["intervention_success"]
    assert success["all"] >= 0.6 and abs(success["none"] - chance) < 0.15, success

    # the state codes on walks the evaluation never saw, against the same codes with the states shuffled
    fsm = T.TokFSM(**FSM)
    model = runs.load_model(str(tmp_path / "codebook.pt"))
    tokens = fsm.encode(fsm.random_walks(100, torch.Generator().manual_seed(123)))
    ids, _ = cb.record_dataset(model, tokens[:, :-1])
    best = c["state_code_codebook"]
    masks = fsm.state_masks(tokens).flatten(1)  # (states, positions)
    ends = masks.any(0).nonzero()[:, 0]  # the positions where a state ends; shuffled: each one labelled another's state
    shuffled = masks.clone()
    shuffled[:, ends] = masks[:, ends[torch.randperm(len(ends), generator=torch.Generator().manual_seed(1))]]
    codes = ids[best].flatten(0, 1)  # (positions, k)
    num_codes = model.locate(best)[0].num_codes
    held_out = T.best_state_codes(*cb.code_precision_recall(codes, masks, num_codes))[0].mean().item()
    control = T.best_state_codes(*cb.code_precision_recall(codes, shuffled, num_codes))[0].mean().item()
    assert held_out >= 0.85 and control < 0.3, (held_out, control)  # measured: 0.94 and 0.08
