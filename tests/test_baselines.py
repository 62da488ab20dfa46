"""baselines.py against its definitions written out by hand: the neuron baseline on hand-made
cases and against a per-state loop, activation addition against a forward hook."""

import torch

import baselines
from conftest import precision_at_recall, tiny_model, tokens


def test_neuron_baseline_on_a_hand_made_case():
    mask = torch.tensor([True, True, True, True, False, False, False, False])
    acts = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 9.0], [0.0, 9.0],
                         [3.5, -1.0], [0.0, -1.0], [0.0, -1.0], [0.0, 9.0]])
    # recall 0.5: neuron 0 fires at >= 4 -> 2 hits / 2 fires; neuron 1 at >= 9 -> 2 / 3
    assert torch.allclose(baselines.neuron_precision_at_recall(acts, mask, 0.5), torch.tensor([1.0, 2 / 3]))
    # recall 0.75: neuron 0 fires at >= 3 -> 3 hits / 4 fires; negated, at >= 0 -> 4 hits / 7 fires
    assert torch.isclose(baselines.neuron_precision_at_recall(acts, mask, 0.75)[0], torch.tensor(0.75))
    # a neuron that fires negatively counts too: -1 marks the complement perfectly
    assert baselines.neuron_precision_at_recall(acts, ~mask, 0.75)[1] == 1.0
    # a code's recall comes as float32 (3 / 7 rounds up): a neuron firing on exactly those 3 hits is exact
    mask = torch.arange(12) < 7
    acts = torch.tensor([1.0, 1.0, 1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0])[:, None]
    assert baselines.neuron_precision_at_recall(acts, mask, torch.tensor(3 / 7).item(), (1,)) == 1.0
    # many masks at once, on random data with ties, against the definition written out
    g = torch.Generator().manual_seed(0)
    acts = torch.randint(-20, 20, (500, 7), generator=g).float()
    masks = torch.rand(5, 500, generator=g) < torch.tensor([0.01, 0.1, 0.3, 0.5, 0.9])[:, None]
    recalls = torch.tensor([1.0, 0.9, 0.5, 0.33, 0.1])
    for mask, recall, got in zip(masks, recalls, baselines.neuron_precision_at_recall(acts, masks, recalls)):
        expected = [max(precision_at_recall(signed[:, j], mask, recall.item()) for signed in (acts, -acts)) for j in range(7)]
        assert torch.allclose(got, torch.tensor(expected))


def test_add_vectors_equals_adding_the_vector_at_that_head_by_hand():
    model = tiny_model().eval()
    x, vector = tokens(), torch.randn(8)
    with torch.no_grad(), baselines.add_vectors(model, {"L1.H2": vector}):
        added = model(x)

    def add_at_head_2(module, args):  # W_O's input is the 4 heads' outputs side by side
        heads = args[0].unflatten(-1, (4, 8)).clone()
        heads[:, :, 2] += vector
        return (heads.flatten(-2),)
    handle = model.blocks[1].attn_out.register_forward_pre_hook(add_at_head_2)
    with torch.no_grad():
        by_hand = model(x)
    handle.remove()
    assert torch.equal(added, by_hand)
    with torch.no_grad():
        assert not torch.allclose(model(x), by_hand, atol=1e-4)
