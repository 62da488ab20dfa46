"""What several test files share: a tiny codebook model and its tokens, a free port for runs of two
processes, and running a script (killed at a chosen step, if asked) and comparing what two runs wrote."""
import os
import re
import socket
import subprocess

import pytest
import torch

import codebook as cb
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = os.environ | {"CODEBOOK_EXT": "0", "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "0"}  # a progress line per step
TINY = dict(vocab_size=11, block_size=16, n_layer=2, n_head=4, d_model=32, d_mlp=64)


def tiny_model(seed=0, **codebooks):
    torch.manual_seed(seed)
    return cb.GPT(cb.GPTConfig(**TINY, codebooks=codebooks or {
        "attn": dict(num_codes=40, k=2), "mlp": dict(num_codes=30, k=1, layers=[1])}))


def tokens(n=4, seq=16, seed=1):
    return torch.randint(0, 11, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_thread():
    """torch on one thread within a test (its figures depend on the order of summation), as before after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command, stop=None, cwd=ROOT):
    """Run a command; with stop=(stage, step, signal), send the signal to it and every process
    below it once the progress bar of `stage` shows `step`. Returns (exit code, stderr)."""
    proc = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    seen = b""
    if stop:
        stage, step, sig = stop
        progress = re.compile(rf"{re.escape(stage)}:\s+\d+%\|[^|]*\|\s*(\d+)/".encode())
        while chunk := os.read(proc.stderr.fileno(), 65536):
            seen += chunk
            shown = progress.findall(seen[-8192:])
            if shown and int(shown[-1]) >= step:
                for pid in [proc.pid, *descendants(proc.pid)]:
                    os.kill(pid, sig)
                break
    seen += proc.stderr.read()  # to its end: every process holding the pipe has exited
    return proc.wait(timeout=120), seen.decode(errors="replace")


def descendants(pid):
    """The processes below pid, found through /proc: torchrun puts each worker in a process group of
    its own, so signalling the launcher's group would leave the workers running."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def flatten(data, prefix=""):
    """A checkpoint's nested dicts and lists as {path: leaf}."""
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in flatten(value, f"{prefix}{key}/").items()}
    if isinstance(data, (list, tuple)):
        return {k: v for i, value in enumerate(data) for k, v in flatten(value, f"{prefix}{i}/").items()}
    return {prefix: data}


def final_state(out):
    """Every file a run wrote: each .pt file's contents (weights, optimiser, RNG states, history,
    SAEs), and the other files' bytes; not the folder's lock file, which holds its last holder's pid."""
    files = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name.endswith(".pt"):
            files[name] = flatten(torch.load(path, weights_only=True))
        elif os.path.isfile(path) and name != runs.LOCK:
            files[name] = open(path, "rb").read()
    return files


def assert_same(a, b, context=""):
    assert a.keys() == b.keys(), context
    for name in a:
        if isinstance(a[name], bytes):
            assert a[name] == b[name], f"{context}{name}"
            continue
        assert a[name].keys() == b[name].keys(), f"{context}{name}"
        for key, value in a[name].items():
            same = torch.equal(value, b[name][key]) if torch.is_tensor(value) else value == b[name][key]
            assert same, f"{context}{name}: {key}"
