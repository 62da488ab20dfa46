"""What several test files share: a tiny codebook model and its tokens, a tiny random Llama-style model
with a BPE tokenizer that has a chat format, headless Chromium, a free port for runs of two processes,
and running a script (killed at a chosen step, if asked) and comparing what two runs wrote."""
import os
import re
import shutil
import socket
import subprocess
import tempfile

import pytest
import torch

import bpe
import codebook as cb
import models
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


def chat_bpe():
    """A byte-level BPE built by hand: every byte a token, a few merges, and SmolLM2's special tokens:
    <|endoftext|>, <|im_start|> (its BOS) and <|im_end|> (its end of turn), ChatML's turn markers."""
    chars = [bpe.BYTE_TO_CHAR[b] for b in range(256)]
    merges = [("t", "h"), ("th", "e"), ("Ġ", "the"), ("e", "d"), ("Ġ", "a"), ("i", "n")]
    vocab = {c: i for i, c in enumerate(chars + ["".join(m) for m in merges])}
    added = [{"id": len(vocab) + i, "content": t, "special": True, "normalized": False}
             for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])]
    return bpe.BPETokenizer(vocab, [list(m) for m in merges], added, bos=len(vocab) + 1, eos=len(vocab) + 2)


def tiny_llama(path, block_size=128, seed=0):
    """A random Llama-style models.Transformer (RMSNorm, rotary, grouped keys and values, SwiGLU, tied
    head; 2 layers, 4 heads) with chat_bpe(), saved as a base checkpoint for train_lm.py --init_from."""
    tok = chat_bpe()
    torch.manual_seed(seed)
    config = models.TransformerConfig(family="llama", vocab_size=tok.vocab_size, block_size=block_size, n_layer=2,
                                      n_head=4, n_kv_head=2, d_model=32, d_mlp=64, norm="rmsnorm", rotary_dims=8,
                                      mlp="gated", activation="silu", mlp_bias=False, tied_head=True)
    runs.save_checkpoint(str(path), models.Transformer(config), step=0, tokenizer=tok.to_dict())
    return str(path)


@pytest.fixture
def one_thread():
    """torch on one thread within a test (its figures depend on the order of summation), as before after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through selenium, one per test module; a skip (a failure under
    CODEBOOK_REQUIRE_BROWSER=1) where any part is missing."""
    required = os.environ.get("CODEBOOK_REQUIRE_BROWSER") == "1"
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    missing = ("selenium is not installed (pip install selenium)" if webdriver is None else
               "no Chromium binary on PATH (apt install chromium)" if binary is None else
               "no chromedriver on PATH (apt install chromium-driver)" if driver_path is None else None)
    if missing:
        (pytest.fail if required else pytest.skip)(f"browser test: {missing}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


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
