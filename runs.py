"""What makes a run survive and refuse bad input, shared by codebook.train and the scripts:
settings checked before any work, files written atomically, SIGINT / SIGTERM turned into a
checkpoint at the next step boundary, and the one-line messages a user sees."""
import contextlib
import glob
import json
import math
import os
import shlex
import signal
import sys
import threading

import torch

# ------------------------------------------------------------------------------------------------
# Settings, checked before any work: each failure is one ValueError line naming the flag.


def check_settings(args, positive=(), non_negative=(), rates=(), shares=(), finite=()):
    """args: an argparse Namespace. positive / non_negative: integer counts (a list value is
    checked item by item); rates: finite and > 0 (learning rates); shares: within [0, 1]."""
    def fail(name, value, what):
        raise ValueError(f"--{name} {value}: {what}")

    for name in positive + non_negative:
        values = getattr(args, name)
        for v in values if isinstance(values, list) else [values]:
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
    """An output folder that is not a file and can be written, without creating anything yet."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path}: is a file; name a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: {parent} is not a writable folder")
    return path


# ------------------------------------------------------------------------------------------------
# Files and settings that must match.

def write_atomically(path, write):
    """write(tmp_path), then rename over `path`: readers see the old file or the new one, never
    half of one. A failed write (a full disk, a read-only folder) leaves the old file as it was;
    the half-written file of a run killed mid-write goes at the next write."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
        for leftover in glob.glob(glob.escape(path) + ".tmp*"):
            if not _writer_alive(leftover.rsplit(".tmp", 1)[1]):
                os.remove(leftover)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"could not write {path} ({reason}); what was there before is unchanged") from None


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
# Exact resume: a checkpoint of the training loop carries what the next step depends on.

def loop_state(summed, world):
    """What a resumed loop needs beyond weights and optimiser to continue exactly: every rank's RNG
    states and the tensors `summed` (statistics such as code usage), summed over ranks."""
    summed = [t.clone() for t in summed]
    if world > 1:
        for t in summed:
            torch.distributed.all_reduce(t)
    return {"rng": rng_states(world), "summed": [t.cpu() for t in summed]}


def resume(path, state, run, model, optimizer, summed, rank, world):
    """Continue from a checkpoint `state` of the loop, refusing one whose `run` (the settings that
    shape training) differs from this run's; returns (step, history)."""
    differs = first_difference(state.get("run", {"config": state["config"]}), run)
    if differs:
        raise ValueError(f"{path} was trained with other settings ({differs}): rerun with the "
                         "checkpoint's settings, or choose another output folder")
    saved_ranks = len(state["loop_state"]["rng"])
    if state["step"] < run["loop"]["steps"] and saved_ranks != world:
        raise ValueError(f"{path} was written by {saved_ranks} process(es), this run has {world}: resume with as many")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(state["loop_state"]["rng"][rank if rank < saved_ranks else 0])  # a finished stage may go on with more
    for tensor, saved in zip(summed, state["loop_state"]["summed"]):
        tensor.copy_(saved if rank == 0 else torch.zeros_like(saved))  # the sum over ranks stays the same
    return state["step"], state["history"]


def rng_states(world):
    """This process's RNG states, or under torchrun every rank's (a collective), as a list."""
    state = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if world == 1:
        return [state]
    every = [None] * world
    torch.distributed.all_gather_object(every, state)
    return every


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------
# Signals: stop at a step boundary, with a checkpoint.

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
            raise KeyboardInterrupt
        requests.append(signum)

    before = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def run_main(main):
    """Run a script's main(): bad settings and bad files print one line (exit 1); an interrupted
    run says how to resume (exit 128 + the signal: 130 after Ctrl-C, 143 after SIGTERM)."""
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            launcher = "torchrun ... " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "python "
            print(f"\n{e}; to resume, rerun the same command: {launcher}{shlex.join(sys.argv)}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint written is kept", file=sys.stderr)
        sys.exit(130)
