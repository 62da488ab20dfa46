"""How every run goes: the training loop (AdamW, schedule, code revival, DDP, checkpoints as it
goes, exact resume), checkpoints, settings checked before any work, one run per output folder,
files written atomically, SIGINT / SIGTERM turned into a checkpoint at the next step boundary, and
the one-line messages a user sees. The method itself is codebook.py.

Map of this file:
  1. settings          checked before any work, each failure one line naming the flag
  2. one run a folder  a lock on the output folder that goes with its holder
  3. files             atomic writes, torch files read with weights_only=True, checkpoints
  4. exact resume      what a checkpoint of the loop carries beyond weights and optimiser
  5. training loop     the loop every script uses (train), and next-token evaluation (evaluate)
  6. signals           stop at a step boundary with a checkpoint; run_main, the scripts' entry
"""
import contextlib
import datetime
import fcntl
import glob
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import zipfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import codebook as cb
from csrc import dispatch

dispatch.install()  # every run searches codes the fastest way that applies (csrc/), with the same results

# ------------------------------------------------------------------------------------------------
# 1. Settings, checked before any work: each failure is one ValueError line naming the flag.


def check_settings(args, positive=(), non_negative=(), rates=(), shares=(), finite=()):
    """args: an argparse Namespace. positive / non_negative: integer counts (a list value is
    checked item by item); rates: finite and > 0 (learning rates); shares: within [0, 1]."""
    def fail(name, value, what):
        raise ValueError(f"--{name} {value}: {what}")

    for name in positive + non_negative:
        values = getattr(args, name)
        for v in values if isinstance(values, list) else [values]:
            if not math.isfinite(v):
                fail(name, v, "must be a finite number")
            if name in positive and v < 1:
                fail(name, v, "must be a positive integer")
            if name in non_negative and v < 0:
                fail(name, v, "must be 0 or a positive integer")
    for name in rates:
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            fail(name, getattr(args, name), "a learning rate must be finite and greater than 0")
    for name in shares:
        if not 0 <= getattr(args, name) <= 1:
            fail(name, getattr(args, name), "a share, between 0 and 1")
    for name in finite:
        if not math.isfinite(getattr(args, name)):
            fail(name, getattr(args, name), "must be a finite number")


def refuse_unused(args, defaults, unused, mode):
    """A flag of `unused` (names) set away from its default (in `defaults`, a Namespace) would do nothing
    in this `mode` (e.g. "with --hf, which gives the base model"): one line, not silence. A flag typed
    at its default value changes nothing, so it passes."""
    given = [name for name in unused if getattr(args, name) != getattr(defaults, name)]
    if given:
        raise ValueError(f"--{given[0]} does nothing {mode}: drop it")


def check_device(name):
    """The device as torch names it, or a ValueError saying what this torch build offers."""
    offers = ["cpu"] + [f"cuda ({torch.cuda.device_count()} GPUs)"] * torch.cuda.is_available() + \
        ["mps"] * (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    try:
        device = torch.device(name)
        backend = getattr(torch, device.type, None)
        usable = device.type == "cpu" or (backend is not None and hasattr(backend, "is_available") and backend.is_available())
        if usable and device.type == "cuda" and device.index is not None:
            usable = device.index < torch.cuda.device_count()
    except RuntimeError:
        usable = False
    if not usable:
        raise ValueError(f"--device {name}: not available here; this torch build offers {', '.join(offers)}")
    return name


def check_out(path):
    """An output folder that is not a file and can be written, without creating anything yet; the
    checkpoints already there can be read (a damaged one is found now, not when its stage starts)."""
    if not path:
        raise ValueError("--out is empty: name a folder")
    if os.path.islink(path) and not os.path.exists(path):
        raise ValueError(f"--out {path}: is a link to {os.readlink(path)}, which does not exist")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path}: is a file; name a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: {parent} is not a writable folder")
    for checkpoint in sorted(glob.glob(os.path.join(glob.escape(path), "*.pt"))):
        load_torch_file(checkpoint, "move it out of --out, or delete it (a stage's checkpoint: the stage runs again)",
                        mmap=True)
    return path


# ------------------------------------------------------------------------------------------------
# 2. One run per output folder: two processes training into one folder would each resume from and
# overwrite the other's checkpoints.

LOCK = ".lock"  # the file in an output folder whose lock the run writing there holds


@contextlib.contextmanager
def one_run_per_folder(out):
    """Within the block this run holds the output folder `out` (created if need be): another run
    given the same folder stops with one line naming the holder's process id. The lock (flock)
    goes with its holder, so a killed run never blocks its rerun. Under torchrun (the process group
    started) rank 0 holds it for the whole run, and the other ranks stop with it when it cannot."""
    if int(os.environ.get("RANK", "0")) != 0:
        if _from_rank_0(None):  # rank 0 was refused the folder, and says why
            raise SystemExit(1)
        yield
        return
    fd = None
    try:
        created = not os.path.isdir(out)
        os.makedirs(out, exist_ok=True)
        fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {out}: another run (process {_lock_holder(fd)}) is writing to this folder; "
                             "wait for it to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except BaseException:
        _from_rank_0(True)
        if fd is not None:
            os.close(fd)
        raise
    _from_rank_0(False)
    try:
        yield
    except BaseException:
        if created and os.listdir(out) == [LOCK]:  # a run that stopped before writing anything leaves no folder
            os.remove(os.path.join(out, LOCK))
            os.rmdir(out)
        raise
    finally:
        os.close(fd)  # releases the lock


def _from_rank_0(value):
    """`value` as rank 0 gives it, on every rank of a started process group; else `value` itself."""
    if not dist.is_initialized():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _lock_holder(fd):
    """The process id the lock's holder wrote into the lock file (it writes it just after locking)."""
    for _ in range(100):
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.01)
    return "unknown"


# ------------------------------------------------------------------------------------------------
# 3. Files: written atomically, read with weights_only=True; checkpoints are plain dicts.

def write_atomically(path, write):
    """write(tmp_path), flushed to disk, then rename over `path`: readers see the old file or the new
    one, never half of one. A failed write (a full disk, a read-only folder) leaves the old file as it was;
    the half-written file of a run killed mid-write goes at the next write."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())  # on disk before the rename: a power cut leaves the old file or the new one
        os.replace(tmp, path)
        for leftover in glob.glob(glob.escape(path) + ".tmp*"):
            if not _writer_alive(leftover.rsplit(".tmp", 1)[1]):
                os.remove(leftover)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, RuntimeError) and shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2**20:
            reason = "no space left on device"  # torch's message for a full disk does not say so
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise ValueError(f"could not write {path} ({reason}); what was there before is unchanged") from None
    except BaseException:  # any other failure (a bug, Ctrl-C): no half-written file stays behind either
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _writer_alive(pid):
    """Whether the process named in a temporary file's suffix still runs (and may be writing it)."""
    if not pid.isdigit():
        return True  # not one of ours: leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    return True


def save_json(path, data):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
    write_atomically(path, write)


def load_torch_file(path, remedy, name=None, map_location="cpu", mmap=False):
    """torch.load(path, weights_only=True): plain data and tensors, never code. A file cut short,
    corrupt or not torch's is one ValueError line naming it (`name`, default the path) and `remedy`.
    mmap: the tensors stay in the file until read (torch's zip format only)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f"{name or path} is truncated, corrupt or not a torch file ({type(e).__name__}); {remedy}") from None


FORMAT = "codebook-features/1"


def save_checkpoint(path, model, optimizer=None, step=0, **extra):
    state = {"format": FORMAT, "config": model.config.to_dict(), "model": model.state_dict(),
             "step": step, "optimizer": optimizer.state_dict() if optimizer else None, **extra}
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, map_location="cpu", mmap=False):
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    state = load_torch_file(path, "re-create it", f"checkpoint {path}", map_location, mmap)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a {FORMAT} checkpoint (written by another program?)")
    return state


def check_intact(path):
    """Refuse a checkpoint whose bytes changed after it was written (a disk error, a bad copy): torch's
    zip format keeps a CRC-32 of each part, which torch.load does not check. Reads the whole file."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"checkpoint {path} is corrupt ({e}): delete it to redo its stage") from None
    if bad:
        raise ValueError(f"checkpoint {path} is corrupt (its part {bad} fails its checksum): delete it to redo its stage")


def saved_config(config):
    """A checkpoint's config dict as its class rebuilds it now: the fields added since it was written (a
    new field's default keeps the former behaviour), nested codebook specs' too, at their defaults, so
    that a run at those defaults goes on from it. One no config class takes (a field since removed, a
    value refused) stays as saved, for first_difference to name what differs."""
    import models  # here, not at the top: models.py reads checkpoints with this module
    try:
        return models.config_from_dict(config).to_dict()
    except (TypeError, ValueError, AttributeError):
        return config


def saved_run(state):
    """The settings that shaped a checkpoint `state` of the loop (config, data, loop; only the config in
    a checkpoint saved outside it), its config as saved_config gives it."""
    saved = state.get("run", {"config": state["config"]})
    return saved | {"config": saved_config(saved["config"])}


def load_model(path, device="cpu"):
    """Rebuild a model from a checkpoint (a codebook.GPT or a pretrained family's Transformer), in eval mode."""
    import models  # here, not at the top: models.py reads checkpoints with this module
    state = load_checkpoint(path, map_location=device)
    check_intact(path)
    model = models.model_from_config(state["config"]).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


# ------------------------------------------------------------------------------------------------
# 4. Exact resume: a checkpoint of the training loop carries what the next step depends on.

def loop_state(summed, world, device="cpu"):
    """What a resumed loop needs beyond weights and optimiser to continue exactly: every rank's RNG
    states (the GPUs' too in a run on one) and the tensors `summed` (statistics such as code usage),
    summed over ranks."""
    summed = [t.clone() for t in summed]
    if world > 1:
        for t in summed:
            torch.distributed.all_reduce(t)
    return {"rng": rng_states(world, str(device).startswith("cuda")), "summed": [t.cpu() for t in summed]}


def resume(path, state, run, model, optimizer, summed, rank, world):
    """Continue from a checkpoint `state` of the loop, refusing one whose `run` (the settings that
    shape training) differs from this run's; returns (step, history)."""
    refuse_other_settings(path, saved_run(state), run)
    saved_ranks = len(state["loop_state"]["rng"])
    if state["step"] < run["loop"]["steps"] and saved_ranks != world:
        raise ValueError(f"{path} was written by {saved_ranks} process(es), this run has {world}: resume with as many")
    model.load_state_dict(state["model"])
    if state["optimizer"] is not None:  # None in a finished stage's checkpoint
        optimizer.load_state_dict(state["optimizer"])
    restore_rng(state["loop_state"]["rng"][rank if rank < saved_ranks else 0])  # a finished stage may go on with more
    for tensor, saved in zip(summed, state["loop_state"]["summed"]):
        tensor.copy_(saved if rank == 0 else torch.zeros_like(saved))  # the sum over ranks stays the same
    return state["step"], state["history"]


def rng_states(world, gpus=False):
    """This process's RNG states, or under torchrun every rank's (a collective), as a list; the GPUs' only
    for a run on them (reading them starts CUDA, which a CPU run on a machine with a GPU need not)."""
    state = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if gpus else []}
    if world == 1:
        return [state]
    every = [None] * world
    torch.distributed.all_gather_object(every, state)
    return every


def restore_rng(state):
    """The states as rng_states saved them; a checkpoint loaded onto a GPU brings them there, torch takes them on the CPU."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def refuse_other_settings(path, saved, run):
    """A checkpoint at `path` whose `saved` settings (config, data, loop) are not this run's is one line."""
    differs = first_difference(saved, run)
    if differs:
        raise ValueError(f"{path} was trained with other settings ({differs}): rerun with the "
                         "checkpoint's settings, or choose another output folder")


def check_stage(path, config, steps, lr, settings=None, **options):
    """Before any stage trains: a checkpoint at `path` that train(a model of `config`, steps, lr,
    settings=settings, **options) would refuse when it got there is refused now. What the options
    leave out (train's defaults) is not compared, nor are the options that do not shape training."""
    if os.path.exists(path):
        state = load_checkpoint(path, mmap=True)
        saved = saved_run(state)
        loop = {"steps": steps, "lr": lr} | {name: value for name, value in options.items() if name in LOOP}
        refuse_other_settings(path, saved | {"loop": {name: saved.get("loop", {}).get(name) for name in loop}},
                              {"config": config, "settings": settings or {}, "loop": loop})


def first_difference(saved, now, prefix=""):
    """The first setting that differs between two nested dicts, as 'name: a ... b', or None."""
    for key in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(key, "unset"), now.get(key, "unset")
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a!r} in the checkpoint, {b!r} now"
    return None


# ------------------------------------------------------------------------------------------------
# 5. The training loop every script uses.

def start(threads, device):
    """Where a script's work begins: torch's CPU threads (0 keeps torch's default), then under torchrun the
    process group. Returns (rank, world_size)."""
    if threads:
        torch.set_num_threads(threads)
    return distributed(device)


def distributed(device="cpu"):
    """(rank, world_size); launched by torchrun (one process too: torchrun names its run), the process group is
    started first: nccl for a GPU run, else gloo."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if launched and not dist.is_initialized():
        # rank 0 alone tokenises a corpus and evaluates while the others wait, which may take longer than the
        # default 30 minutes; a rank that fails is not waited for: torchrun stops them all
        gpu = None
        if backend == "nccl":  # each rank its own GPU (one process: the one --device names), before any collective
            index = torch.device(device).index
            gpu = torch.device("cuda", index if index is not None else int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(gpu)
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=24), device_id=gpu)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def end_distributed():
    """Under torchrun: wait until every rank is done with its collectives, then end the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def command_line(script=None, argv=None):
    """The command that started this run: `script` (by default as typed) with `argv` (by default the
    command line's), to print or show on its page."""
    words = [script or sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    return ("torchrun ... " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "python ") + shlex.join(words)


def make_optimizer(model, lr, weight_decay=0.1, codebook_lr=None, betas=(0.9, 0.95)):
    """AdamW; weight decay on matrices only, never on codebooks, LayerNorms or biases."""
    groups = {"decay": [], "no_decay": [], "codebook": []}
    for name, p in model.named_parameters():
        # (a mixture's stacked expert biases, (expert, out), are biases: 2-D, yet not decayed)
        matrix = p.dim() >= 2 and name != "pos_emb.weight" and not name.endswith(".bias")
        groups["codebook" if ".codebooks." in name else "decay" if matrix else "no_decay"].append(p)
    return torch.optim.AdamW([
        {"params": groups["decay"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["no_decay"], "weight_decay": 0.0, "lr": lr},
        {"params": groups["codebook"], "weight_decay": 0.0, "lr": codebook_lr or lr},
    ], lr=lr, betas=betas)


def lr_factor(step, steps, warmup, cosine):
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # decays to a tenth


def _sum_across_ranks(tensors):
    if dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


def _stats_buffers(codebooks):
    return [t for layer in codebooks for t in (layer.usage, layer.recon_sum, layer.token_count)]


# train()'s arguments that shape training, kept in each checkpoint with the model's config and the data's settings
LOOP = ("steps", "lr", "weight_decay", "codebook_lr", "warmup", "cosine", "grad_clip", "grad_accum", "revive_every")


def train(model, get_batch, steps, lr=1e-3, *, device="cpu", weight_decay=0.1, codebook_lr=None,
          warmup=0, cosine=False, grad_clip=1.0, grad_accum=1, revive_every=0, eval_fn=None,
          eval_every=0, ckpt_path=None, ckpt_every=100, ckpt_seconds=120, settings=None, log_every=10,
          desc="train", autocast=None, ckpt_extra=None):
    """Train `model` for `steps` optimiser steps; return it unwrapped, on `device`, in eval mode,
    with `model.history` ([{"step", "loss", "dead", "mse"}] every log_every steps).

    get_batch(i, rank, world_size) -> (inputs, targets) of micro-batch i, a function of its
    arguments alone (so a resumed run draws the same data; each torchrun rank its own shard),
    optionally plus (codes, positions) to train with those codes forced (interchange training).
    eval_fn(model) -> dict, printed by rank 0 every eval_every steps.

    With ckpt_path a checkpoint is written every ckpt_every steps or ckpt_seconds, at the end (without
    the optimiser state), and at SIGINT / SIGTERM (then Interrupted is raised). One already there is
    resumed exactly (weights, optimiser, RNG states, code statistics), or returned when finished; one
    made with another config, loop arguments or `settings` (plain data describing the batches) is refused.
    ckpt_extra: plain data every checkpoint also holds (train_lm.py: the tokenizer)."""
    from tqdm import tqdm
    rank, world = distributed(device)
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    model = model.to(device)
    optimizer = make_optimizer(model, lr, weight_decay, codebook_lr)
    codebooks = list(model.codebook_layers().values())
    run = {"config": model.config.to_dict(), "settings": settings or {},
           "loop": dict(steps=steps, lr=lr, weight_decay=weight_decay, codebook_lr=codebook_lr, warmup=warmup,
                        cosine=cosine, grad_clip=grad_clip, grad_accum=grad_accum, revive_every=revive_every)}
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resume loads the scheduled ones
    step, history = 0, []
    if ckpt_path and os.path.exists(ckpt_path):
        check_intact(ckpt_path)  # a run must not go on from weights that are no longer the ones it wrote
        state = load_checkpoint(ckpt_path, map_location=device)
        step, history = resume(ckpt_path, state, run, model, optimizer, _stats_buffers(codebooks), rank, world)

    def save():
        summed = loop_state(_stats_buffers(codebooks), world, device)  # a collective: every rank takes part
        if rank == 0:
            # the optimiser state (twice the weights' size) only matters to a run that goes on
            save_checkpoint(ckpt_path, model, optimizer if step < steps else None, step, run=run, history=history,
                            loop_state=summed, **(ckpt_extra or {}))

    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    last_save = time.monotonic()
    model.train()
    # the bar closes however the loop ends, so that what is printed next starts a line of its own
    with stop_on_signals() as stop_requests, tqdm(total=steps, initial=step, desc=desc, disable=rank != 0,
                                                  dynamic_ncols=True) as bar:
        while step < steps:
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * lr_factor(step, steps, warmup, cosine)
            for micro in range(grad_accum):
                x, y, *forced = get_batch(step * grad_accum + micro, rank, world)
                x, y = x.to(device), y.to(device)
                sync = contextlib.nullcontext() if micro == grad_accum - 1 or world == 1 else net.no_sync()
                amp = torch.autocast(device.split(":")[0], dtype=autocast) if autocast else contextlib.nullcontext()
                force = cb.force_codes(model, *forced[0]) if forced else contextlib.nullcontext()
                with sync, amp, force:
                    logits = net(x)
                    ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
                    loss = (ce + model.codebook_loss()) / grad_accum
                loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % log_every == 0 or step == steps:
                history.append({"step": step, "loss": ce.item()} | _codebook_stats(codebooks))
                bar.set_postfix({name: f"{value:.4f}" if name != "dead" else f"{value:.0%}"
                                 for name, value in history[-1].items() if name != "step"}, refresh=False)
            bar.update(1)
            if revive_every and step % revive_every == 0 and step < steps:
                _sum_across_ranks([layer.usage for layer in codebooks])
                for layer in codebooks:
                    layer.revive_dead_codes()
                    if world > 1:
                        dist.broadcast(layer.codes.data, 0)  # every rank keeps rank 0's revived codes
            if eval_fn and eval_every and step % eval_every == 0 and step < steps and rank == 0:
                model.eval()
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in eval_fn(model).items()))
                model.train()
            # every rank must agree on when to save and stop: take the most urgent of all ranks' wishes
            wishes = torch.tensor([time.monotonic() - last_save >= ckpt_seconds, bool(stop_requests)],
                                  dtype=torch.float, device=device)
            _sum_across_ranks([wishes])
            if ckpt_path and (step % ckpt_every == 0 or step == steps or wishes.any()):
                save()
                last_save = time.monotonic()
            if wishes[1] > 0:
                raise Interrupted(stop_requests[0] if stop_requests else None, step, ckpt_path)
        # a signal during the last step's checkpoint: the stage is done and saved, and the run stops here
        late = torch.tensor([bool(stop_requests)], dtype=torch.float, device=device)
        _sum_across_ranks([late])
        if late.any():
            raise Interrupted(stop_requests[0] if stop_requests else None, step, ckpt_path)
    _sum_across_ranks([layer.usage for layer in codebooks])  # every rank ends with the global counts
    model.history = history
    return model.eval()


@torch.no_grad()
def evaluate(model, tokens, batch_size=32, autocast=None):
    """Next-token cross-entropy (nats/token) and accuracy of `model` on token rows (n, seq), and
    {codebook address: share of its codes that never fire there}. Puts the model in eval mode."""
    model.eval()
    device = model.head.weight.device
    loss_sum, correct, count, usage = 0.0, 0, 0, {}
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size].to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device.type, dtype=autocast) if autocast else torch.no_grad():
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
        for address, ids in cb.record_codes(model).items():
            usage[address] = usage.get(address, 0) + cb.count_codes(ids.cpu(), model.locate(address)[0].num_codes)
    return loss_sum / count, correct / count, {a: cb.dead_share(counts).item() for a, counts in usage.items()}


def _codebook_stats(codebooks):
    """Mean dead share and reconstruction error since the last revival, over codebooks and ranks."""
    if not codebooks:
        return {}
    stats = [t.clone() for t in _stats_buffers(codebooks)]
    _sum_across_ranks(stats)
    usage, recon, tokens = stats[0::3], stats[1::3], stats[2::3]
    dead = torch.cat([cb.dead_share(u) for u in usage]).mean().item()
    mse = sum(r.item() / max(1, t.item()) for r, t in zip(recon, tokens)) / len(codebooks)
    return {"dead": dead, "mse": mse}


# ------------------------------------------------------------------------------------------------
# 6. Signals: stop at a step boundary, with a checkpoint.

class Interrupted(Exception):
    """The training loop stopped at a step boundary after SIGINT or SIGTERM, its checkpoint written."""

    def __init__(self, signum, step, ckpt_path):
        signum = signum or signal.SIGTERM  # another rank's signal
        self.signum, self.step, self.ckpt_path = signum, step, ckpt_path
        saved = f"checkpoint {ckpt_path} written at step {step}" if ckpt_path else f"stopped at step {step}, no checkpoint"
        super().__init__(f"{signal.Signals(signum).name}: {saved}")


@contextlib.contextmanager
def stop_on_signals():
    """Yields a list that SIGINT / SIGTERM append to, for a loop to stop at its next step
    boundary; a second signal stops at once (KeyboardInterrupt)."""
    requests = []
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return

    def request(signum, frame):
        if requests:
            raise KeyboardInterrupt(signum)
        requests.append(signum)

    before = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def run_main(main):
    """Run a script's main(): bad settings, and files that cannot be read or written (an OSError: a
    permission denied, a full disk), print one line (exit 1); an interrupted run says how to resume
    (exit 128 + the signal: 130 after Ctrl-C, 143 after SIGTERM). Outside the training loop SIGTERM
    stops the run at once, as Ctrl-C does."""
    def terminate(signum, frame):
        raise KeyboardInterrupt(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    rank = int(os.environ.get("RANK", "0"))
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        if rank == 0:
            print(f"\n{e}; to resume, rerun the same command: {command_line()}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args else signal.SIGINT
        if rank == 0:
            print(f"\n{signal.Signals(signum).name}: the checkpoints written so far are kept; to resume, rerun the "
                  f"same command: {command_line()}", file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)
