"""Runs that survive being killed and refuse bad settings: the drill. A run killed at a random
step of each stage and rerun ends bit-identical to an uninterrupted one; SIGTERM writes a
checkpoint and says how to resume; every bad setting is one line on stderr, before any work."""
import json
import os
import random
import re
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import runs  # noqa: E402
import steer  # noqa: E402
import train_fsm  # noqa: E402
import train_lm  # noqa: E402

ENV = os.environ | {"CODEBOOK_EXT": "0", "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "0"}  # a progress line per step
TINY_FSM = ["--n_layer", "1", "--n_head", "2", "--d_model", "16", "--d_mlp", "32", "--attn_codes", "32",
            "--mlp_codes", "16", "--base_steps", "40", "--codebook_steps", "40", "--revive_every", "7",
            "--batch_size", "8", "--ckpt_every", "6", "--eval_seqs", "40", "--samples", "8", "--pairs", "40",
            "--walk_length", "16", "--sae_steps", "20", "--sae_seqs", "16", "--device", "cpu"]
TINY_LM = ["--stories", "600", "--n_layer", "1", "--n_head", "2", "--d_model", "32", "--block_size", "32",
           "--batch_size", "4", "--base_steps", "30", "--codebook_steps", "30", "--num_codes", "16", "--k", "2",
           "--revive_every", "5", "--eval_windows", "8", "--kmeans_windows", "4", "--ckpt_every", "4",
           "--threads", "1", "--device", "cpu"]


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
    SAEs), and the other files' bytes."""
    files = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name.endswith(".pt"):
            files[name] = flatten(torch.load(path, weights_only=True))
        elif os.path.isfile(path):
            files[name] = open(path, "rb").read()
    return files


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], bytes):
            assert a[name] == b[name], name
            continue
        assert a[name].keys() == b[name].keys(), name
        for key, value in a[name].items():
            same = torch.equal(value, b[name][key]) if torch.is_tensor(value) else value == b[name][key]
            assert same, f"{name}: {key}"


def test_a_run_killed_in_each_stage_resumes_to_identical_weights_and_results(tmp_path, monkeypatch):
    # both runs write to "fsm" in their own working folder, so even the files naming it match byte
    # for byte; the uninterrupted one runs alongside the drill, on the other core
    command = [sys.executable, os.path.join(ROOT, "train_fsm.py"), *TINY_FSM, "--out", "fsm"]
    uninterrupted, drill = tmp_path / "uninterrupted", tmp_path / "drill"
    uninterrupted.mkdir(), drill.mkdir()
    with open(tmp_path / "uninterrupted.err", "wb") as err:
        reference = subprocess.Popen(command, cwd=uninterrupted, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    chance = random.Random()
    for stage in ("baseline", "codebook"):
        step = chance.randint(1, 38)
        code, err = run(command, stop=(stage, step, signal.SIGKILL), cwd=drill)
        assert code == -signal.SIGKILL, f"killed in {stage} at step {step}: {err[-2000:]}"
    # the rerun, in this process as the runs above would do it: one thread, the torch search
    monkeypatch.chdir(drill)
    monkeypatch.setenv("CODEBOOK_EXT", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_fsm.main([*TINY_FSM, "--out", "fsm"])
    finally:
        torch.set_num_threads(threads)
    assert reference.wait(timeout=120) == 0, (tmp_path / "uninterrupted.err").read_text()[-2000:]
    assert_same(final_state(drill / "fsm"), final_state(uninterrupted / "fsm"))


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


def _bad(script, flags, words):
    return pytest.param(script, flags, words, id=f"{script.__name__} {' '.join(flags)}")


BAD_SETTINGS = [
    _bad(train_fsm, ["--k", "0"], "--k 0: must be a positive integer"),
    _bad(train_fsm, ["--k", "40"], "k=40 must be between 1 and num_codes=32"),
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
    _bad(train_fsm, ["--num_edges", "200"], "need 1 <= num_edges <= num_states"),
    _bad(train_fsm, ["--num_states", "101"], "does not fit in two base-10 digits"),
    _bad(train_fsm, ["--samples", "0"], "--samples 0: must be a positive integer"),
    _bad(train_fsm, ["--pairs", "0"], "--pairs 0: must be a positive integer"),
    _bad(train_fsm, ["--eval_seqs", "0"], "--eval_seqs 0: must be a positive integer"),
    _bad(train_fsm, ["--ckpt_every", "0"], "--ckpt_every 0: must be a positive integer"),
    _bad(train_fsm, ["--device", "cuda"], "--device cuda: not available here; this torch build offers cpu"),
    _bad(train_fsm, ["--device", "tpu"], "--device tpu: not available here; this torch build offers cpu"),
    _bad(train_lm, ["--num_codes", "0"], "--num_codes 0: must be a positive integer"),
    _bad(train_lm, ["--k", "17"], "k=17 must be between 1 and num_codes=16"),
    _bad(train_lm, ["--batch_size", "0"], "--batch_size 0: must be a positive integer"),
    _bad(train_lm, ["--block_size", "0"], "--block_size 0: must be a positive integer"),
    _bad(train_lm, ["--base_lr", "-1"], "--base_lr -1.0: a learning rate must be finite and greater than 0"),
    _bad(train_lm, ["--val_fraction", "1"], "--val_fraction 1.0: a share of documents, strictly between 0 and 1"),
    _bad(train_lm, ["--stories", "0"], "--stories 0: must be a positive integer"),
    _bad(train_lm, ["--eval_every", "-2"], "--eval_every -2: must be 0 or a positive integer"),
    _bad(train_lm, ["--threads", "-1"], "--threads -1: must be 0 or a positive integer"),
    _bad(train_lm, ["--data", "no/such/corpus"], "data path no/such/corpus does not exist"),
    _bad(train_lm, ["--init_from", "no/such.pt"], "checkpoint no/such.pt does not exist"),
    _bad(train_lm, ["--device", "cuda:3"], "--device cuda:3: not available here"),
    _bad(steer, ["--temperature", "-1"], "--temperature -1.0: must be 0 (greedy) or more"),
    _bad(steer, ["--samples", "0"], "--samples 0: must be a positive integer"),
    _bad(steer, ["--heads", "0"], "--heads 0: must be a positive integer"),
    _bad(steer, ["--min_precision", "2"], "--min_precision 2.0: a share, between 0 and 1"),
    _bad(steer, ["--new_bytes", "-3"], "--new_bytes -3: must be 0 or a positive integer"),
    _bad(steer, ["--addition_scale", "nan"], "--addition_scale nan: must be a finite number"),
    _bad(steer, ["--ckpt", "no/such.pt"], "checkpoint no/such.pt does not exist"),
    _bad(steer, ["--topic_file", "x.txt"], "--topic_file needs --regex"),
    _bad(steer, ["--reference", "no/such/texts"], "--reference no/such/texts: no such file or folder"),
]


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


def test_the_command_line_prints_one_line_and_exits_1():
    run = subprocess.run([sys.executable, "train_fsm.py", "--batch_size", "0"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr == "error: --batch_size 0: must be a positive integer\n"
