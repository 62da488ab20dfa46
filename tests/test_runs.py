"""runs.py: the training loop and its checkpoints against the step written out; runs that survive
being killed and refuse bad settings: the drill. A run killed at a random step of each stage and
rerun ends bit-identical to an uninterrupted one; SIGTERM writes a checkpoint and says how to
resume; every bad setting is one line on stderr, before any work; a second run given the folder of
a running one stops at once."""
import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import codebook as cb
import models
import runs
import steer
import train_fsm
import train_lm
from conftest import ENV, ROOT, START_METHOD, assert_same, final_state, free_port, run, tiny_model, tokens

TINY_FSM = ["--n_layer", "1", "--n_head", "2", "--d_model", "16", "--d_mlp", "32", "--attn_codes", "32",
            "--mlp_codes", "16", "--base_steps", "40", "--codebook_steps", "40", "--revive_every", "7",
            "--batch_size", "8", "--ckpt_every", "6", "--eval_seqs", "50", "--samples", "8", "--pairs", "40",
            "--walk_length", "16", "--sae_steps", "20", "--sae_seqs", "16", "--device", "cpu"]
TINY_LM = ["--stories", "600", "--n_layer", "1", "--n_head", "2", "--d_model", "32", "--block_size", "32",
           "--batch_size", "4", "--base_steps", "30", "--codebook_steps", "30", "--num_codes", "16", "--k", "2",
           "--revive_every", "5", "--eval_windows", "8", "--kmeans_windows", "4", "--ckpt_every", "4",
           "--threads", "1", "--device", "cpu"]


# --- the training loop and checkpoints -----------------------------------------------------

def test_training_with_forced_codes_is_a_step_taken_under_force_codes():
    x, y = random_batches(0, 0, 1)
    where = torch.zeros(8, 16, dtype=torch.bool)
    where[:, 5] = True  # interchange training: codes forced at chosen positions of each row
    codes = {"L1.MLP": torch.randint(0, 30, (8, 16, 1), generator=torch.Generator().manual_seed(2))}
    trained = runs.train(tiny_model(), lambda i, rank, world: (x, y, (codes, where)), steps=1, lr=1e-2)
    model = tiny_model().train()  # the same step written out: AdamW, decay on the matrices outside codebooks
    decayed = [p for name, p in model.named_parameters() if p.dim() == 2 and ".codebooks." not in name and name != "pos_emb.weight"]
    others = [p for p in model.parameters() if all(p is not q for q in decayed)]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95))
    with cb.force_codes(model, codes, positions=where):
        logits = model(x)
        (F.cross_entropy(logits.view(-1, 11), y.reshape(-1)) + model.codebook_loss()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    for (name, p), q in zip(model.named_parameters(), trained.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    unforced = runs.train(tiny_model(), lambda i, rank, world: (x, y), steps=1, lr=1e-2)
    assert not torch.allclose(unforced.blocks[1].codebooks["mlp"].codes, trained.blocks[1].codebooks["mlp"].codes)



def random_batches(i, rank, world, batch=8):
    g = torch.Generator().manual_seed(1000 + i)
    t = torch.randint(0, 11, (batch, 17), generator=g)
    shard = t[rank * batch // world:(rank + 1) * batch // world]
    return shard[:, :-1], shard[:, 1:]


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    path = str(tmp_path / "m.pt")
    model = runs.train(tiny_model(), random_batches, steps=4, ckpt_path=path, log_every=2)
    x = tokens()
    assert torch.equal(runs.load_model(path)(x), model(x))
    finished = torch.load(path, weights_only=True)
    assert finished["step"] == 4 and finished["optimizer"] is None  # only a run that goes on needs it
    assert [h["step"] for h in model.history] == [2, 4] and set(model.history[0]) == {"step", "loss", "dead", "mse"}
    layers = list(model.codebook_layers().values())  # the last entry: the statistics since the start (no revival)
    assert model.history[-1]["dead"] == pytest.approx(torch.cat([(l.usage == 0).float().mean(-1) for l in layers]).mean().item())
    assert model.history[-1]["mse"] == pytest.approx(sum(l.recon_sum.item() / l.token_count.item() for l in layers) / len(layers))
    again = runs.train(tiny_model(), random_batches, steps=4, ckpt_path=path)  # finished: loaded, not retrained
    assert torch.equal(again(x), model(x)) and again.history == model.history

    data = open(path, "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "foreign.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    for name, words in [("cut.pt", "truncated"), ("foreign.pt", "truncated"), ("other.pt", "not a"),
                        ("missing.pt", "does not exist")]:
        with pytest.raises(ValueError, match=words):
            runs.load_model(str(tmp_path / name))
    # resuming with other settings is refused, naming the setting and both values
    for change, words in [(dict(model=tiny_model(attn=dict(num_codes=8, k=2))), "config.codebooks.attn.num_codes: 40 in the checkpoint, 8 now"),
                          (dict(steps=9), "loop.steps: 4 in the checkpoint, 9 now"),
                          (dict(settings={"data": "other"}), "settings.data: 'unset' in the checkpoint, 'other' now")]:
        args = dict(model=tiny_model(), get_batch=random_batches, steps=4, ckpt_path=path) | change
        with pytest.raises(ValueError, match=re.escape(words)):
            runs.train(**args)
    # a checkpoint whose weights changed on disk (one bit of one number) is not gone on from
    at = data.find(model.tok_emb.weight.detach().numpy().tobytes())
    assert at > 0
    (tmp_path / "flipped.pt").write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    torch.load(tmp_path / "flipped.pt", weights_only=True)  # which torch.load alone does not notice
    for load in (lambda path: runs.train(tiny_model(), random_batches, steps=4, ckpt_path=path), runs.load_model,
                 models.load_with_tokenizer):  # nor loaded
        with pytest.raises(ValueError, match=r"flipped.pt is corrupt \(its part .*/data/\d+ fails its checksum\): delete it"):
            load(str(tmp_path / "flipped.pt"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: training on a GPU did not run"))])
def test_a_run_stopped_by_sigterm_resumes_to_the_same_weights(device, tmp_path):
    """SIGTERM mid-stage: a checkpoint at the step boundary, Interrupted; the rerun from it ends
    bit-identical to an uninterrupted run: weights, optimiser, code statistics, revivals, history
    (on a GPU under bf16 autocast, as the scripts train there)."""
    def batches(i, rank, world):
        if i == 5 and stop_at_5:
            os.kill(os.getpid(), signal.SIGTERM)
        return random_batches(i, rank, world)

    settings = dict(steps=11, lr=3e-3, warmup=2, cosine=True, revive_every=3, log_every=2, ckpt_every=4, device=device,
                    autocast=torch.bfloat16 if device == "cuda" else None)
    stop_at_5 = False
    straight = runs.train(tiny_model(), batches, **settings)
    stop_at_5 = True
    path = str(tmp_path / "run.pt")
    with pytest.raises(runs.Interrupted, match="SIGTERM: checkpoint .* written at step 6"):
        runs.train(tiny_model(), batches, ckpt_path=path, **settings)
    stopped = torch.load(path, weights_only=True)
    assert stopped["step"] == 6 and stopped["optimizer"]["state"]  # the resume below needs the moments
    stop_at_5 = False
    torch.manual_seed(123)  # the global RNG a rerun starts from does not matter: the checkpoint carries it
    resumed = runs.train(tiny_model(), batches, ckpt_path=path, **settings)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.history == straight.history
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after training


def test_a_signal_during_the_last_checkpoint_stops_the_run_after_it(tmp_path, monkeypatch):
    save = runs.save_checkpoint

    def slow_save(path, model, optimizer=None, step=0, **extra):
        if step == 4:  # the stage's last checkpoint: a signal arrives while it is written
            os.kill(os.getpid(), signal.SIGTERM)
        save(path, model, optimizer, step, **extra)

    monkeypatch.setattr(runs, "save_checkpoint", slow_save)
    path = str(tmp_path / "run.pt")
    with pytest.raises(runs.Interrupted, match="SIGTERM: checkpoint .* written at step 4"):
        runs.train(tiny_model(), random_batches, steps=4, ckpt_path=path)
    assert torch.load(path, weights_only=True)["step"] == 4


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "m.pt")
    runs.train(tiny_model(), random_batches, steps=2, ckpt_path=path)
    before = open(path, "rb").read()

    def disk_full(state, f):
        open(f, "wb").write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(ValueError, match=r"could not write .*m.pt \(No space left on device\); what was there before is unchanged"):
        runs.save_checkpoint(path, tiny_model())
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["m.pt"]

    def torch_disk_full(state, f):  # what torch.save says when the disk fills
        open(f, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 43072 vs 42964")
    monkeypatch.setattr(torch, "save", torch_disk_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(ValueError, match=r"could not write .*m.pt \(no space left on device\)"):
        runs.save_checkpoint(path, tiny_model())
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["m.pt"]

    def broken(tmp):  # any other failure too leaves no half-written file
        open(tmp, "w").write("half")
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        runs.write_atomically(path, broken)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["m.pt"]


def test_an_error_in_training_starts_a_line_of_its_own(capfd):
    def fails_at_step_2(i, rank, world):
        if i == 2:
            raise ValueError("no more data")
        return random_batches(i, rank, world)
    try:
        runs.train(tiny_model(), fails_at_step_2, steps=4)
    except ValueError as e:  # as run_main prints it, while the exception (and the loop's frame) is still held
        print(f"error: {e}", file=sys.stderr)
    assert "\nerror: no more data" in capfd.readouterr().err  # the progress bar closed first: not glued to it


def test_the_next_write_removes_what_a_killed_write_left(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"m.pt.tmp{finished.stdout.strip()}"  # a process that no longer runs wrote it
    live = tmp_path / f"m.pt.tmp{os.getppid()}"  # a running process may still be writing this one
    dead.write_bytes(b"half"), live.write_bytes(b"half")
    runs.save_checkpoint(str(tmp_path / "m.pt"), tiny_model())
    assert sorted(os.listdir(tmp_path)) == ["m.pt", live.name]


def test_weight_decay_falls_on_matrices_never_on_biases_not_even_stacked_expert_biases():
    """gpt-oss's experts have biases stacked (expert, out): 2-D, yet biases, so never decayed."""
    import models
    model = models.Transformer(dict(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_kv_head=2, d_model=16, d_head=8,
                                    d_mlp=16, norm="rmsnorm", mlp="gated", activation="silu", experts=4, experts_used=2,
                                    d_expert=16, experts_bias=True, router_top_logits=True, swiglu_limit=7.0,
                                    qkv_bias=True, attn_sinks=True, family="gpt_oss"))
    decayed = {id(p) for group in runs.make_optimizer(model, 1e-3).param_groups if group["weight_decay"] for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert "blocks.0.mlp.experts.gate.weight" in names and "blocks.0.attn.q.weight" in names
    assert not [name for name in names if name.endswith(".bias") or name.endswith("sinks")]


def test_each_group_s_learning_rate_warms_up_linearly_then_decays_by_a_cosine_to_a_tenth(monkeypatch):
    made, seen = [], []
    make = runs.make_optimizer
    monkeypatch.setattr(runs, "make_optimizer", lambda *args, **kw: made.append(make(*args, **kw)) or made[-1])

    def batches(i, rank, world):  # called once the step's rates are set
        seen.append([group["lr"] for group in made[0].param_groups])
        return random_batches(i, rank, world)
    model = tiny_model()
    runs.train(model, batches, steps=10, lr=1e-2, codebook_lr=3e-2, warmup=3, cosine=True)
    codebook = {id(p) for name, p in model.named_parameters() if ".codebooks." in name}
    bases = [3e-2 if all(id(p) in codebook for p in group["params"]) else 1e-2 for group in made[0].param_groups]
    assert sorted(bases) == [1e-2, 1e-2, 3e-2] and all(group["params"] for group in made[0].param_groups)
    warmup = [1 / 3, 2 / 3, 3 / 3]  # steps 0-2; then 7 steps from 1 towards 0.1 (never reached)
    cosine = [0.1 + 0.9 * (1 + math.cos(math.pi * t / 7)) / 2 for t in range(7)]
    assert seen == [pytest.approx([base * f for base in bases], rel=1e-9) for f in warmup + cosine]


def test_two_accumulated_micro_batches_make_the_step_of_their_concatenation():
    def both(i, rank, world):  # batch i of the run without accumulation: micro-batches 2i and 2i + 1
        halves = [random_batches(2 * i + micro, rank, world, batch=4) for micro in range(2)]
        return torch.cat([x for x, y in halves]), torch.cat([y for x, y in halves])
    # the gradient's norm: 4.6 at the first step, over 10 at the next: the clip binds from the second on
    settings = dict(steps=4, lr=1e-2, grad_clip=8.0)
    accumulated = runs.train(tiny_model(), lambda i, rank, world: random_batches(i, rank, world, batch=4),
                             grad_accum=2, **settings)
    whole = runs.train(tiny_model(), both, **settings)
    for (name, a), b in zip(accumulated.named_parameters(), whole.parameters()):
        if name.endswith("qkv.bias"):  # not the keys' biases: their gradient is 0 but for rounding, which Adam scales up
            a, b = a.view(3, -1)[[0, 2]], b.view(3, -1)[[0, 2]]
        assert torch.allclose(a, b, atol=1e-5), name


def test_no_revival_after_the_last_step():
    model = runs.train(tiny_model(), random_batches, steps=6, revive_every=3)
    # revived (and counted afresh) at step 3 only: the statistics hold steps 4-6, 3 batches of 8 x 16 tokens
    for layer in model.codebook_layers().values():
        assert layer.usage.sum(-1).tolist() == [3 * 128 * layer.k] * layer.heads
        assert layer.token_count.item() == 3 * 128 * layer.heads


def test_evaluate_is_the_mean_cross_entropy_and_accuracy_over_every_predicted_token():
    model, rows = tiny_model(), tokens(n=5, seq=17, seed=3)
    loss, accuracy, dead = runs.evaluate(model, rows, batch_size=2)  # batches of 2, 2 and 1 rows
    x, y = rows[:, :-1], rows[:, 1:]
    logits = model(x)
    assert loss == pytest.approx(F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1)).item(), rel=1e-5)
    assert accuracy == pytest.approx((logits.argmax(-1) == y).float().mean().item()) and 0 < accuracy < 1
    assert dead == pytest.approx({address: 1 - layer.last_ids[..., head, :].unique().numel() / layer.num_codes
                                  for address, layer, head in model.codebook_heads()})


def test_the_history_s_loss_is_the_cross_entropy_of_the_step_s_batch():
    model = runs.train(tiny_model(), random_batches, steps=2, lr=1e-2, log_every=1)
    after_one_step = runs.train(tiny_model(), random_batches, steps=1, lr=1e-2)
    for step, before in enumerate([tiny_model(), after_one_step]):  # the weights the step started from
        x, y = random_batches(step, 0, 1)
        ce = F.cross_entropy(before.train()(x).view(-1, 11), y.reshape(-1))
        assert model.history[step]["loss"] == pytest.approx(ce.item(), rel=1e-5)


def test_a_checkpoint_of_one_process_is_not_resumed_by_two(tmp_path, monkeypatch):
    def fails_at_step_2(i, rank, world):
        if i == 2:
            raise RuntimeError("stopped")
        return random_batches(i, rank, world)
    path = str(tmp_path / "run.pt")
    with pytest.raises(RuntimeError, match="stopped"):
        runs.train(tiny_model(), fails_at_step_2, steps=4, ckpt_path=path, ckpt_every=2)
    monkeypatch.setattr(runs, "distributed", lambda device="cpu": (0, 2))  # rank 0 of two
    with pytest.raises(ValueError, match=re.escape(f"{path} was written by 1 process(es), this run has 2: resume with as many")):
        runs.train(tiny_model(), random_batches, steps=4, ckpt_path=path, ckpt_every=2)


def test_a_share_may_be_0_or_1(tmp_path):
    for share in (0.0, 1.0):
        assert train_fsm.settings([*TINY_FSM, "--interchange", str(share), "--out", str(tmp_path / "out")]).interchange == share
    with pytest.raises(ValueError, match="--interchange 1.5: a share, between 0 and 1"):
        train_fsm.settings([*TINY_FSM, "--interchange", "1.5", "--out", str(tmp_path / "out")])


# --- DDP: two processes == one process on the combined batch --------------------------------

def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = runs.train(tiny_model(), random_batches, steps=5, lr=3e-3, log_every=5)
    counts = [layer.usage for layer in model.codebook_layers().values()]
    torch.save({"params": model.state_dict(), "counts": counts}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()  # both ranks done with gloo before either tears it down
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one_process_on_the_combined_batch(tmp_path):
    # forked, the workers start with torch already imported (spawned, each would import it anew)
    mp.start_processes(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method=START_METHOD)
    single = runs.train(tiny_model(), random_batches, steps=5, lr=3e-3)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, p in single.state_dict().items():
            assert torch.allclose(got["params"][name], p, atol=1e-5), name
        for mine, theirs in zip(got["counts"], (layer.usage for layer in single.codebook_layers().values())):
            assert torch.equal(mine, theirs)


def split_batches(i, rank, world, batch=8):
    """As random_batches, but the first half of the rows draws tokens 0-5, the second 5-10: each of two ranks its own
    tokens, so that some codes are used by one rank only."""
    g = torch.Generator().manual_seed(1000 + i)
    t = torch.cat([torch.randint(0, 6, (batch // 2, 17), generator=g), torch.randint(5, 11, (batch // 2, 17), generator=g)])
    shard = t[rank * batch // world:(rank + 1) * batch // world]
    return shard[:, :-1], shard[:, 1:]


def _ddp_revival_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    revived, revive, save = [], cb.CodebookLayer.revive_dead_codes, runs.save_checkpoint

    def recorded(layer, *args):  # this process's codes before and after each revival
        before = layer.codes.detach().clone()
        count = revive(layer, *args)
        revived.append([before, layer.codes.detach().clone()])
        return count

    def keep_step_4(path, model, optimizer=None, step=0, **extra):  # the checkpoint of a run stopped at step 4
        save(path, model, optimizer, step, **extra)
        if step == 4 and path.endswith("straight.pt"):
            shutil.copy(path, os.path.join(out_dir, "resumed.pt"))
    cb.CodebookLayer.revive_dead_codes, runs.save_checkpoint = recorded, keep_step_4  # in this forked process only
    settings = dict(steps=6, lr=3e-3, revive_every=3, log_every=1, ckpt_every=4)
    found = {}
    for name in ("straight", "resumed"):
        model = runs.train(tiny_model(), split_batches, ckpt_path=os.path.join(out_dir, f"{name}.pt"), **settings)
        found[name] = {"params": model.state_dict(), "history": model.history,
                       "usage": [layer.usage for layer in model.codebook_layers().values()]}
    torch.save(found | {"revived": revived}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ddp_revives_the_codes_no_rank_used_on_every_rank_alike_and_resumes_exactly(tmp_path):
    """Two processes, revival at step 3, a checkpoint at step 4 resumed: every rank revives the codes unused on
    both ranks (those unused by one process on the combined batch), keeps rank 0's revived codes, and the run
    resumed from step 4 ends as the one not stopped (weights, the code statistics summed over ranks, history)."""
    mp.start_processes(_ddp_revival_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method=START_METHOD)
    got = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    unused = [layer.usage == 0 for layer in runs.train(tiny_model(), split_batches, steps=3, lr=3e-3).codebook_layers().values()]
    assert any(dead.any() for dead in unused) and not all(dead.all() for dead in unused)
    for rank in range(2):
        assert len(got[rank]["revived"]) == len(unused)  # at step 3 only, in the run not stopped
        for (before, after), dead in zip(got[rank]["revived"], unused):
            assert torch.equal((before != after).any(-1), dead), rank
        for name in ("straight", "resumed"):
            for key, value in got[0]["straight"]["params"].items():
                assert torch.equal(got[rank][name]["params"][key], value), (rank, name, key)
            for mine, theirs in zip(got[rank][name]["usage"], got[0]["straight"]["usage"]):
                assert torch.equal(mine, theirs), (rank, name)
    # rank 0's history (its loss is its own shard's); the reconstruction error, floats summed over ranks in
    # another order after a resume, equal to rounding
    assert got[0]["resumed"]["history"] == [pytest.approx(h, rel=1e-6) for h in got[0]["straight"]["history"]]


# --- the drill: scripts killed, interrupted, given bad settings, started twice -------------

def test_a_run_killed_in_each_stage_resumes_to_identical_weights_and_results(tmp_path, monkeypatch, one_thread):
    # both runs write to "fsm" in their own working folder, so even the files naming it match byte
    # for byte; the uninterrupted one runs alongside the drill, on the other core
    command = [sys.executable, os.path.join(ROOT, "train_fsm.py"), *TINY_FSM, "--out", "fsm"]
    uninterrupted, drill = tmp_path / "uninterrupted", tmp_path / "drill"
    uninterrupted.mkdir(), drill.mkdir()
    with open(tmp_path / "uninterrupted.err", "wb") as err:
        reference = subprocess.Popen(command, cwd=uninterrupted, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    seed = int(os.environ.get("CODEBOOK_DRILL_SEED", random.randrange(10**6)))  # set to replay a failed drill
    chance = random.Random(seed)
    steps = {stage: chance.randint(1, 38) for stage in ("baseline", "codebook")}
    drill_was = f"CODEBOOK_DRILL_SEED={seed} (killed at {steps}): "
    for stage, step in steps.items():
        code, err = run(command, stop=(stage, step, signal.SIGKILL), cwd=drill)
        assert code == -signal.SIGKILL, f"{drill_was}{stage} not killed: {err[-2000:]}"
    # the rerun, in this process as the runs above would do it: one thread, the torch search
    monkeypatch.chdir(drill)
    monkeypatch.setenv("CODEBOOK_EXT", "0")
    train_fsm.main([*TINY_FSM, "--out", "fsm"])
    assert reference.wait(timeout=120) == 0, (tmp_path / "uninterrupted.err").read_text()[-2000:]
    assert_same(final_state(drill / "fsm"), final_state(uninterrupted / "fsm"), drill_was)


def test_sigterm_writes_a_checkpoint_at_a_step_boundary_and_the_rerun_finishes(tmp_path):
    out, flags = str(tmp_path / "lm"), [*TINY_LM, "--no-control"]
    command = [sys.executable, "train_lm.py", *flags, "--out", out]
    code, err = run(command, stop=("stage 2: codebooks", 9, signal.SIGTERM))
    assert code == 128 + signal.SIGTERM, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"SIGTERM: checkpoint {re.escape(out)}/codebook.pt written at step (\d+); to resume, "
                        rf"rerun the same command: python train_lm.py .*--out {re.escape(out)}", last), last
    written = int(re.search(r"at step (\d+)", last).group(1))
    assert 9 <= written < 30 and torch.load(f"{out}/codebook.pt", weights_only=True)["step"] == written
    assert not os.path.exists(f"{out}/results.json")
    train_lm.main([*flags, "--out", out])  # the rerun, in this process
    assert json.load(open(f"{out}/results.json"))["history"]["codebook"][-1]["step"] == 30


def test_sigterm_outside_the_training_loop_stops_the_run_and_says_how_to_resume():
    waiting = "import runs, time\nruns.run_main(lambda: (print('ready', flush=True), time.sleep(60)))"
    proc = subprocess.Popen([sys.executable, "-c", waiting], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert proc.stderr.read().strip().splitlines()[-1] == ("SIGTERM: the checkpoints written so far are kept; to resume, "
                                                           "rerun the same command: python -c")
    before = signal.getsignal(signal.SIGTERM)
    runs.run_main(lambda: None)
    assert signal.getsignal(signal.SIGTERM) is before  # a script's handler goes with its run


def test_a_file_that_cannot_be_read_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        runs.run_main(lambda: open(tmp_path))  # as a permission denied or a full disk would: an OSError
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 1 and err == [f"error: [Errno 21] Is a directory: {str(tmp_path)!r}"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: nccl did not run"))])
def test_torchrun_with_one_process_starts_the_process_group_too(device, monkeypatch):
    """torchrun --nproc_per_node 1 runs its one process in a process group: gloo, or nccl on a GPU. WORLD_SIZE
    set without torchrun (no run of its, no rendezvous) starts none."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert runs.distributed(device) == (0, 1) and not torch.distributed.is_initialized()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none"), monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1"), monkeypatch.setenv("MASTER_PORT", str(free_port()))
    try:
        assert runs.distributed(device) == (0, 1)
        assert torch.distributed.is_initialized()
        assert torch.distributed.get_backend() == ("nccl" if device == "cuda" else "gloo")
    finally:
        runs.end_distributed()
    assert not torch.distributed.is_initialized()


def test_steering_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="steer.py runs as one process: start it with python, not torchrun"):
        steer.settings([])


def _bad(script, flags, words, marks=()):
    return pytest.param(script, flags, words, id=f"{script.__name__} {' '.join(flags)}", marks=marks)


BAD_SETTINGS = [
    _bad(train_fsm, ["--k", "0"], "--k 0: must be a positive integer"),
    _bad(train_fsm, ["--k", "40"], "k=40 must be an int between 1 and num_codes=32"),
    _bad(train_fsm, ["--batch_size", "0"], "--batch_size 0: must be a positive integer"),
    _bad(train_fsm, ["--base_steps", "-5"], "--base_steps -5: must be a positive integer"),
    _bad(train_fsm, ["--codebook_steps", "0"], "--codebook_steps 0: must be a positive integer"),
    _bad(train_fsm, ["--mlp_codes", "16,0"], "--mlp_codes 0: must be a positive integer"),
    _bad(train_fsm, ["--mlp_codes", "4,4,4"], "--mlp_codes: 3 code counts for 1 layers"),
    _bad(train_fsm, ["--lr", "0"], "--lr 0.0: a learning rate must be finite and greater than 0"),
    _bad(train_fsm, ["--finetune_lr", "nan"], "--finetune_lr nan: a learning rate must be finite"),
    _bad(train_fsm, ["--codebook_lr", "inf"], "--codebook_lr inf: a learning rate must be finite"),
    _bad(train_fsm, ["--interchange", "1.5"], "--interchange 1.5: a share, between 0 and 1"),
    _bad(train_fsm, ["--beta", "-1"], "--beta -1.0: the commitment weight must be 0 or more"),
    _bad(train_fsm, ["--attn_window", "-1"], "--attn_window -1: must be 0 or a positive integer"),
    _bad(train_fsm, ["--revive_every", "-1"], "--revive_every -1: must be 0 or a positive integer"),
    _bad(train_fsm, ["--d_model", "15"], "d_model=15 must be divisible by n_head=2"),
    _bad(train_fsm, ["--num_edges", "200"], "need num_states >= 2, 1 <= num_edges <= num_states"),
    _bad(train_fsm, ["--num_states", "1", "--num_edges", "1"], "need num_states >= 2"),
    _bad(train_fsm, ["--num_states", "101"], "does not fit in two base-10 digits"),
    _bad(train_fsm, ["--walk_length", "1"], "walk_length >= 2"),
    _bad(train_fsm, ["--samples", "0"], "--samples 0: must be a positive integer"),
    _bad(train_fsm, ["--pairs", "0"], "--pairs 0: must be a positive integer"),
    _bad(train_fsm, ["--eval_seqs", "0"], "--eval_seqs 0: must be a positive integer"),
    _bad(train_fsm, ["--eval_seqs", "5"], "--eval_seqs 5: the first 5 evaluation walks (the neurons' and the codes') never "
                                          "reach states ["),
    _bad(train_fsm, ["--pairs", "10000"], "--pairs 10000: 100 states make only 9900 pairs (a, b) of distinct states"),
    _bad(train_fsm, ["--seed", "-1"], "--seed -1: must be between 0 and 2^40"),
    _bad(train_fsm, ["--seed", str(2**41)], f"--seed {2**41}: must be between 0 and 2^40"),
    _bad(train_fsm, ["--ckpt_every", "0"], "--ckpt_every 0: must be a positive integer"),
    _bad(train_fsm, ["--device", "cuda"], "--device cuda: not available here; this torch build offers cpu",
         marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: --device cuda is no error")),
    _bad(train_fsm, ["--device", "tpu"], "--device tpu: not available here; this torch build offers cpu"),
    _bad(train_lm, ["--num_codes", "0"], "--num_codes 0: must be a positive integer"),
    _bad(train_lm, ["--k", "17"], "k=17 must be an int between 1 and num_codes=16"),
    _bad(train_lm, ["--batch_size", "0"], "--batch_size 0: must be a positive integer"),
    _bad(train_lm, ["--block_size", "0"], "--block_size 0: must be a positive integer"),
    _bad(train_lm, ["--base_lr", "-1"], "--base_lr -1.0: a learning rate must be finite and greater than 0"),
    _bad(train_lm, ["--val_fraction", "1"], "--val_fraction 1.0: a share of documents, strictly between 0 and 1"),
    _bad(train_lm, ["--stories", "0"], "--stories 0: must be a positive integer"),
    _bad(train_lm, ["--eval_every", "-2"], "--eval_every -2: must be 0 or a positive integer"),
    _bad(train_lm, ["--threads", "-1"], "--threads -1: must be 0 or a positive integer"),
    _bad(train_lm, ["--seed", "-1"], "--seed -1: must be 0 or a positive integer"),
    _bad(train_lm, ["--codes_lr", "nan"], "--codes_lr nan: must be a finite number"),
    _bad(train_lm, ["--data", "no/such/corpus"], "data path no/such/corpus does not exist"),
    _bad(train_lm, ["--init_from", "no/such.pt"], "--n_layer does nothing with --init_from or --hf, which give the base model"),
    _bad(train_lm, ["--preset", "smollm2"], "--preset smollm2 finetunes SmolLM2: give --hf with its GGUF file or folder"),
    _bad(train_lm, ["--include", "*.py"], "--include does nothing without --data: drop it"),
    _bad(train_lm, ["--sae_windows", "8"], "--sae_windows does nothing without --sae: drop it"),
    _bad(train_lm, ["--pattern_windows", "8"], "--pattern_windows does nothing without --patterns: drop it"),
    _bad(train_fsm, ["--no-sae"], "--sae_steps does nothing without --sae: drop it"),
    _bad(train_fsm, ["--preset", "quick"], "--sae_steps does nothing without --sae"),  # the preset's sae=False
    _bad(steer, ["--topic_name", "flying cows"], "--topic_name does nothing without --regex, whose topic it names"),
    _bad(steer, ["--browse", "--reference", "texts", "--regex", "x", "--seed", "3"],
         "--seed does nothing with --browse of --reference texts: no story is generated, nothing sampled"),
    _bad(train_fsm, ["--codebook_loss", "aeloss", "--beta", "0.5"], "--beta does nothing with --codebook_loss aeloss"),
    _bad(train_lm, ["--device", "cuda:99"], "--device cuda:99: not available here"),
    _bad(steer, ["--temperature", "-1"], "--temperature -1.0: must be 0 (greedy) or at least 0.001"),
    _bad(steer, ["--temperature", "1e-39"], "--temperature 1e-39: must be 0 (greedy) or at least 0.001"),
    _bad(steer, ["--addition_scale", "1e30"], "--addition_scale 1e+30: at most 1000 times"),
    _bad(steer, ["--codes", "L0.H0.3", "--browse"], "--browse does nothing with --codes, which only samples --prompt with"),
    _bad(steer, ["--codes", "L0.H0.3", "--reference_stories", "9"], "--reference_stories does nothing with --codes"),
    _bad(steer, ["--codes", "L0.H0.3", "--heads", "2"], "--heads does nothing with --codes"),
    _bad(steer, ["--browse", "--samples", "3"], "--samples does nothing with --browse, which writes the code browser alone"),
    _bad(steer, ["--samples", "0"], "--samples 0: must be a positive integer"),
    _bad(steer, ["--heads", "0"], "--heads 0: must be a positive integer"),
    _bad(steer, ["--min_precision", "2"], "--min_precision 2.0: a share, between 0 and 1"),
    _bad(steer, ["--new_bytes", "-3"], "--new_bytes -3: must be 0 or a positive integer"),
    _bad(steer, ["--addition_scale", "nan"], "--addition_scale nan: must be a finite number"),
    _bad(steer, ["--ckpt", "no/such.pt"], "checkpoint no/such.pt does not exist"),
    _bad(steer, ["--topic_file", "x.txt"], "--topic_file needs --regex"),
    _bad(steer, ["--regex", "dragons?", "--topics", "dragons"], "--topics chooses topics of the generated corpus"),
    _bad(steer, ["--reference", "no/such/texts"], "--reference no/such/texts: no such file or folder"),
    _bad(steer, ["--reference", "texts", "--reference_stories", "60"], "--reference_stories counts generated stories"),
]


def test_a_missing_base_model_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train_lm.py", "--init_from", "no/such.pt", "--out", "out", "--device", "cpu"])
    with pytest.raises(SystemExit):
        runs.run_main(train_lm.main)
    assert capsys.readouterr().err.strip() == "error: checkpoint no/such.pt does not exist" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("script, flags, words", BAD_SETTINGS)
def test_a_bad_setting_is_one_line_before_any_work(script, flags, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may appear here
    tiny = {train_fsm: TINY_FSM, train_lm: TINY_LM, steer: []}[script]
    monkeypatch.setattr(sys, "argv", [script.__name__ + ".py", *tiny, *flags, "--out", "out"])
    with pytest.raises(SystemExit) as exit:
        runs.run_main(script.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 1 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert os.listdir(tmp_path) == []


def test_out_must_be_a_writable_folder(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file; name a folder"):
        runs.check_out(str(tmp_path / "file"))
    with pytest.raises(ValueError, match="is not a writable folder"):
        runs.check_out(str(tmp_path / "file" / "below"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "codebook.pt").write_bytes(b"PK\x03\x04 cut short")  # damaged on disk, or copied in part
    with pytest.raises(ValueError, match="codebook.pt is truncated, corrupt or not a torch file .*; move it out of --out, or delete it"):
        runs.check_out(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="--out is empty: name a folder"):
        runs.check_out("")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match="dangling: is a link to .*gone, which does not exist"):
        runs.check_out(str(tmp_path / "dangling"))


def test_the_command_line_prints_one_line_and_exits_1():
    run = subprocess.run([sys.executable, "train_fsm.py", "--batch_size", "0"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr == "error: --batch_size 0: must be a positive integer\n"


@pytest.mark.parametrize("script, flags", [(train_fsm, TINY_FSM), (train_lm, TINY_LM)], ids=["train_fsm", "train_lm"])
def test_a_second_run_in_the_same_folder_stops_before_any_work(script, flags, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", "import runs, sys, time\nwith runs.one_run_per_folder(sys.argv[1]):\n"
                               "    print('held', flush=True)\n    time.sleep(120)", out],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        monkeypatch.setattr(sys, "argv", [script.__name__ + ".py", *flags, "--out", out])
        with pytest.raises(SystemExit) as exit:
            runs.run_main(script.main)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 1 and err == [f"error: --out {out}: another run (process {holder.pid}) is writing to "
                                                "this folder; wait for it to end or choose another --out"], err
        assert os.listdir(out) == [runs.LOCK]  # nothing done
        monkeypatch.setenv("RANK", "1")  # under torchrun rank 0 alone holds the folder
        with runs.one_run_per_folder(out):
            pass
    finally:
        holder.kill()  # SIGKILL: no chance to let go of the lock itself
        holder.wait()
    monkeypatch.delenv("RANK")
    with runs.one_run_per_folder(out):  # the lock went with its holder
        assert open(os.path.join(out, runs.LOCK)).read() == str(os.getpid())


# --- settings, the lock, files and signals, each against what it should do written out by hand ---

def test_check_settings_refuses_each_kind_of_bad_value_and_lets_the_edges_through():
    ok = argparse.Namespace(count=1, counts=[3, 1], zero=0, lr=1e-9, share=0.0, full=1.0, scale=-2.5)
    runs.check_settings(ok, positive=("count", "counts"), non_negative=("zero",), rates=("lr",), shares=("share", "full"),
                        finite=("scale",))
    for kind, value, words in [("positive", 0, "--x 0: must be a positive integer"),
                               ("positive", [3, 0], "--x 0: must be a positive integer"),  # each item of a list
                               ("non_negative", -1, "--x -1: must be 0 or a positive integer"),
                               ("rates", 0.0, "--x 0.0: a learning rate must be finite and greater than 0"),
                               ("rates", math.inf, "--x inf: a learning rate must be finite"),
                               ("rates", math.nan, "--x nan: a learning rate must be finite"),
                               ("shares", -0.1, "--x -0.1: a share, between 0 and 1"),
                               ("shares", 1.5, "--x 1.5: a share, between 0 and 1"),
                               ("shares", math.nan, "--x nan: a share, between 0 and 1"),  # nan is no share
                               ("finite", math.inf, "--x inf: must be a finite number"),
                               ("finite", -math.inf, "--x -inf: must be a finite number")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            runs.check_settings(argparse.Namespace(x=value), **{kind: ("x",)})


def test_refuse_unused_refuses_any_value_but_the_default_even_0_or_empty():
    defaults = argparse.Namespace(sae_steps=200, include="*", sae=False)
    runs.refuse_unused(argparse.Namespace(sae_steps=200, include="*", sae=False), defaults, ("sae_steps", "include"), "x")
    for given, flag in [(dict(sae_steps=0), "sae_steps"), (dict(include=""), "include"), (dict(sae=True), "sae")]:
        args = argparse.Namespace(**vars(defaults) | given)
        with pytest.raises(ValueError, match=f"^--{flag} does nothing without --y: drop it$"):
            runs.refuse_unused(args, defaults, ("sae_steps", "include", "sae"), "without --y")


def test_check_stage_refuses_now_what_train_would_refuse_when_the_stage_came(tmp_path):
    path = str(tmp_path / "stage.pt")
    model = runs.train(tiny_model(), random_batches, steps=2, lr=1e-2, warmup=1, ckpt_path=path, settings={"data": "a"})
    config = model.config.to_dict()
    same = dict(config=config, steps=2, lr=1e-2, settings={"data": "a"}, warmup=1)
    runs.check_stage(path, **same, device="cpu", ckpt_every=7, ckpt_seconds=1, eval_every=3)  # options that do not shape training
    runs.check_stage(str(tmp_path / "none.pt"), **same | dict(warmup=0))  # no checkpoint: nothing to refuse
    other = tiny_model(attn=dict(num_codes=8, k=2)).config.to_dict()
    for change, words in [(dict(steps=3), "loop.steps: 2 in the checkpoint, 3 now"),
                          (dict(lr=1e-3), "loop.lr: 0.01 in the checkpoint, 0.001 now"),
                          (dict(warmup=2), "loop.warmup: 1 in the checkpoint, 2 now"),
                          (dict(revive_every=3), "loop.revive_every: 0 in the checkpoint, 3 now"),
                          (dict(grad_accum=2), "loop.grad_accum: 1 in the checkpoint, 2 now"),
                          (dict(settings={"data": "b"}), "settings.data: 'a' in the checkpoint, 'b' now"),
                          (dict(settings={}), "settings.data: 'a' in the checkpoint, 'unset' now"),  # a setting dropped
                          (dict(config=other), "config.codebooks.attn.num_codes: 40 in the checkpoint, 8 now")]:
        with pytest.raises(ValueError, match=re.escape(f"{path} was trained with other settings ({words})")):
            runs.check_stage(path, **same | change)
    with pytest.raises(ValueError, match=re.escape("settings.data: 'a' in the checkpoint, 'unset' now")):
        runs.train(tiny_model(), random_batches, steps=2, lr=1e-2, warmup=1, ckpt_path=path)  # as train does


def test_a_checkpoint_from_before_a_config_field_was_added_resumes_at_its_default_and_refuses_another_value(tmp_path):
    """A checkpoint written before TransformerConfig (or CodebookSpec) gained a field lacks it: a run at the
    field's default, which keeps the former behaviour, resumes it exactly and loads from it; a real difference
    is refused as before, in one line."""
    def model(**changes):
        torch.manual_seed(0)
        return models.Transformer(models.TransformerConfig(
            vocab_size=11, block_size=16, n_layer=2, n_head=4, d_model=32, d_mlp=64, norm="rmsnorm", rotary_dims=4,
            codebooks={"attn": dict(num_codes=16, k=2)}, **changes))

    def batches(i, rank, world):
        if i == 3 and stop_at_3:
            os.kill(os.getpid(), signal.SIGTERM)
        return random_batches(i, rank, world)

    def as_an_older_version_wrote_it(source, path, **changes):
        state = torch.load(source, weights_only=True)
        for config in (state["config"], state["run"]["config"]):
            for name in ("no_rotary_layers", "pre_norms", "qk_norm_across_heads", "qk_layernorm", "shared_norm",
                         "residual_scale", "logit_scale", "qkv_clip", "experts", "experts_used", "d_expert",
                         "experts_renormalised", "d_shared_expert", "dense_layers", "rotary_precision", "attn_sinks",
                         "experts_bias", "router_top_logits", "swiglu_limit", "swiglu_alpha", "norm_weight_float32",
                         "outputs_summed_first", "head_bias", "rotary_frequencies_float32", "alibi", "embed_norm",
                         "rotary_interleaved", "norm_plus_one", "norm_stepwise", "attn_scores_float32",
                         "query_scale_beta", "query_scale_period"):
                del config[name]
            del config["codebooks"]["attn"]["beta"]  # a nested codebook spec's field too
            config |= changes
        runs.write_atomically(path, lambda tmp: torch.save(state, tmp))
        return path

    settings = dict(steps=6, lr=3e-3, revive_every=2, log_every=1, ckpt_every=2)
    stop_at_3 = False
    straight = runs.train(model(), batches, **settings)
    stop_at_3 = True
    with pytest.raises(runs.Interrupted, match="written at step 4"):
        runs.train(model(), batches, ckpt_path=str(tmp_path / "run.pt"), **settings)
    stop_at_3 = False
    path = as_an_older_version_wrote_it(str(tmp_path / "run.pt"), str(tmp_path / "older.pt"))
    runs.check_stage(path, model().config.to_dict(), **settings)
    resumed = runs.train(model(), batches, ckpt_path=path, **settings)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.history == straight.history
    finished = as_an_older_version_wrote_it(path, str(tmp_path / "finished.pt"))
    assert torch.equal(runs.load_model(finished)(tokens()), straight(tokens()))
    for changes, now, words in [({}, dict(no_rotary_layers=[1]), "no_rotary_layers: [] in the checkpoint, [1] now"),
                                ({"pre_norms": False}, {}, "pre_norms: False in the checkpoint, True now")]:
        path = as_an_older_version_wrote_it(str(tmp_path / "run.pt"), str(tmp_path / "other.pt"), **changes)
        refused = re.escape(f"{path} was trained with other settings (config.{words})")
        with pytest.raises(ValueError, match=refused):
            runs.check_stage(path, model(**now).config.to_dict(), **settings)
        with pytest.raises(ValueError, match=refused):
            runs.train(model(**now), batches, ckpt_path=path, **settings)


def test_a_checkpoint_that_would_run_code_when_loaded_is_refused(tmp_path):
    class Runs:
        def __reduce__(self):
            return os.getpid, ()  # any function, called by the loading
    (tmp_path / "run[1]").mkdir()  # glob's special characters in a name
    path = tmp_path / "run[1]" / "code.pt"
    torch.save({"format": runs.FORMAT, "config": {}, "step": 0, "payload": Runs()}, path)
    with pytest.raises(ValueError, match=r"code.pt is truncated, corrupt or not a torch file \(UnpicklingError\)"):
        runs.load_checkpoint(str(path))
    with pytest.raises(ValueError, match=r"code.pt is truncated, corrupt or not a torch file \(UnpicklingError\)"):
        runs.check_out(str(tmp_path / "run[1]"))  # found before any work


def test_the_lock_goes_with_the_block_and_names_its_holder_and_an_empty_folder_of_its_own_goes_too(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / runs.LOCK).write_text("9" * 12)  # a longer process id, of a run long gone
    with runs.one_run_per_folder(str(out)):
        assert (out / runs.LOCK).read_text() == str(os.getpid())
        with pytest.raises(ValueError, match=rf"another run \(process {os.getpid()}\) is writing to this folder"):
            with runs.one_run_per_folder(str(out)):
                pass
    with runs.one_run_per_folder(str(out)):  # released at the block's end: the next run of this process holds it
        pass
    with pytest.raises(KeyError):  # a run that fails before writing anything: a folder it made goes, the user's stays
        with runs.one_run_per_folder(str(tmp_path / "new")), runs.one_run_per_folder(str(out)):
            raise KeyError("stop")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == [runs.LOCK]


def test_the_next_write_leaves_temporary_files_that_are_not_its_own(tmp_path):
    folder = tmp_path / "run[1]"  # glob's special characters in a name
    folder.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / f"m.pt.tmp{finished.stdout.strip()}").write_bytes(b"half")  # a killed write
    (folder / "m.pt.tmp.bak").write_bytes(b"the user's")  # not a temporary file of ours
    runs.save_json(str(folder / "m.pt"), {"a": 1})
    assert sorted(os.listdir(folder)) == ["m.pt", "m.pt.tmp.bak"] and json.load(open(folder / "m.pt")) == {"a": 1}


def test_the_rerun_command_quotes_what_a_shell_would_split(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "argv", ["train_lm.py", "--out", "my run", "--include", "*.py"])
    assert runs.command_line() == "python train_lm.py --out 'my run' --include '*.py'"
    assert runs.command_line("steer.py", ["--regex", "dragons?", "--seed", "3"]) == "python steer.py --regex 'dragons?' --seed 3"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert runs.command_line() == "torchrun ... train_lm.py --out 'my run' --include '*.py'"


def test_ctrl_c_exits_130_saying_how_to_resume_and_a_second_signal_stops_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "argv", ["train_fsm.py", "--out", "o"])

    def pressed():
        raise KeyboardInterrupt  # Ctrl-C outside the training loop
    with pytest.raises(SystemExit) as exit:
        runs.run_main(pressed)
    assert exit.value.code == 130 and capsys.readouterr().err.strip().splitlines()[-1] == (
        "SIGINT: the checkpoints written so far are kept; to resume, rerun the same command: python train_fsm.py --out o")

    def ctrl_c_at_step_1(i, rank, world):
        if i == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return random_batches(i, rank, world)
    path = str(tmp_path / "run.pt")
    with pytest.raises(SystemExit) as exit:
        runs.run_main(lambda: runs.train(tiny_model(), ctrl_c_at_step_1, steps=4, ckpt_path=path))
    assert exit.value.code == 130 and capsys.readouterr().err.strip().splitlines()[-1] == (
        f"SIGINT: checkpoint {path} written at step 2; to resume, rerun the same command: python train_fsm.py --out o")
    assert torch.load(path, weights_only=True)["step"] == 2

    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with pytest.raises(KeyboardInterrupt) as stopped:
        with runs.stop_on_signals() as requests:
            os.kill(os.getpid(), signal.SIGINT)
            assert requests == [signal.SIGINT]  # the first: a request, for the loop to stop at its step boundary
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("a second signal stops at once")
    assert stopped.value.args == (signal.SIGTERM,)  # which run_main turns into exit 143
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before
