"""train_lm.py and steer.py: the byte tokenizer, the memmap loader, the generated corpus, a tiny
run of both scripts end to end, and train_lm.py under torchrun with two CPU processes."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import steer  # noqa: E402
import train_lm  # noqa: E402

# a model small enough to train in seconds: every flag of train_lm.py
TINY = ["--stories", "1200", "--n_layer", "2", "--n_head", "2", "--d_model", "32", "--block_size", "64",
        "--batch_size", "8", "--base_steps", "30", "--codebook_steps", "10", "--num_codes", "32", "--k", "4",
        "--revive_every", "5", "--eval_windows", "16", "--kmeans_windows", "8", "--threads", "1", "--device", "cpu"]


def test_bytes_round_trip():
    rng = np.random.default_rng(0)
    for data in [b"", bytes(range(256)), rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()]:
        tokens = train_lm.encode(data)
        assert tokens.dtype == np.int64 and len(tokens) == len(data) and tokens.max(initial=0) < 256
        assert train_lm.decode_bytes(tokens) == data
        assert train_lm.decode_bytes([train_lm.BOS, *tokens, train_lm.BOS]) == data  # specials dropped
    text = "Grüße, 東京 🐉\n\t"
    assert train_lm.decode(train_lm.encode(text)) == text


def test_memmap_loader(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    docs = [f"<doc {i:03d}> " + "abc" * (i % 7) + "\xff\x00 end" for i in range(200)]
    for i, doc in enumerate(docs[:100]):
        (corpus / f"{i:03d}.txt").write_text(doc, encoding="latin-1")
    (corpus / "sub" / "many.txt").write_text("<|endoftext|>".join(docs[100:]), encoding="latin-1")
    (corpus / "skip.bin").write_bytes(b"not included")
    train, val, folder = train_lm.prepare_data(str(corpus), str(tmp_path / "out"), 0.2, 0, 0, "*.txt", "<|endoftext|>", 16)
    assert isinstance(train.data, np.memmap)

    # the split: every document in exactly one split, whole, each preceded by BOS
    def documents(split):
        stream = split.tokens(0, split.num_tokens)
        cuts = np.flatnonzero(stream == train_lm.BOS)
        assert cuts[0] == 0 and len(cuts) == len(split.bos_at)
        return [train_lm.decode_bytes(part).decode("latin-1") for part in np.split(stream, cuts)[1:]]
    train_docs, val_docs = documents(train), documents(val)
    assert sorted(train_docs + val_docs) == sorted(docs) and 10 < len(val_docs) < 70
    assert len(train.data) + len(val.data) == sum(len(d.encode("latin-1")) for d in docs)

    # batches: windows of the stream, never reaching outside it (the last window ends at its end)
    stream = train.tokens(0, train.num_tokens)
    rng = np.random.default_rng(1)
    windows = train.random_windows(rng, 500, 17)
    assert windows.shape == (500, 17) and windows.dtype == torch.int64
    text = stream.tobytes()
    for w in windows[:50]:
        assert w.numpy().tobytes() in text
    last = train.windows([train.num_tokens - 17], 17)[0]
    assert torch.equal(last, torch.from_numpy(stream[-17:]))
    assert train.tokens(0, 3).tolist()[0] == train_lm.BOS

    # tokenised once: a second call reads the same folder
    assert train_lm.prepare_data(str(corpus), str(tmp_path / "out"), 0.2, 0, 0, "*.txt", "<|endoftext|>", 16)[2] == folder

    # clear errors
    with pytest.raises(ValueError, match="does not exist"):
        train_lm.prepare_data(str(tmp_path / "missing"), str(tmp_path / "out"), 0.2, 0, 0, "*", "", 16)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        train_lm.prepare_data(str(tmp_path / "empty"), str(tmp_path / "out"), 0.2, 0, 0, "*", "", 16)
    with pytest.raises(ValueError, match="no files matching"):
        train_lm.prepare_data(str(corpus), str(tmp_path / "out"), 0.2, 0, 0, "*.md", "", 16)


def test_default_corpus():
    assert len(train_lm.TOPICS) >= 8
    stories = train_lm.make_stories(600, seed=3)
    assert stories == train_lm.make_stories(600, seed=3)
    assert stories != train_lm.make_stories(600, seed=4)
    assert len({story for _, story in stories}) == len(stories)  # no repeats
    regexes = {t: train_lm.topic_regex(spec["words"]) for t, spec in train_lm.TOPICS.items()}
    for topic, story in stories:
        assert len(regexes[topic].findall(story)) >= 3, story  # the topic's words recur
        assert not any(r.search(story) for t, r in regexes.items() if t != topic), story  # and no other's
    assert {t for t, _ in stories} == set(train_lm.TOPICS)


def test_tiny_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "lm")
    train_lm.main(TINY + ["--out", out])
    results = json.load(open(os.path.join(out, "results.json")))
    assert {"base_val_loss", "codebook_val_loss", "loss_ratio", "dead_code_fraction", "wall_seconds"} <= set(results)
    assert set(results["dead_code_fraction"]) == {f"L{l}.H{h}" for l in range(2) for h in range(2)}
    assert results["base_val_loss"] < np.log(256)  # it learned something
    assert os.path.exists(os.path.join(out, "base.pt")) and os.path.exists(os.path.join(out, "codebook.pt"))

    steer.main(["--ckpt", os.path.join(out, "codebook.pt"), "--out", str(tmp_path / "steer"), "--topics", "dragons",
                "--reference_stories", "60", "--samples", "2", "--new_bytes", "20", "--min_precision", "0",
                "--threads", "1"])
    steered = json.load(open(tmp_path / "steer" / "results.json"))
    r = steered["topics"]["dragons"]
    assert {"hit_rate_base", "hit_rate_steered", "ppl_base", "ppl_steered", "hit_rate_addition", "ppl_addition"} <= set(r)
    assert all(0 <= r[key] <= 1 for key in ("hit_rate_base", "hit_rate_steered", "hit_rate_addition"))
    assert all(r[key] > 1 for key in ("ppl_base", "ppl_steered", "ppl_addition"))
    assert "mean_hit_rate_steered" in steered and "mean_hit_rate_base" in steered
    printed = capsys.readouterr().out
    assert "precision" in printed and "recall" in printed and "dragons" in printed

    # codes by address: samples with and without
    code = r["codes"][0]
    steer.main(["--ckpt", os.path.join(out, "codebook.pt"), "--codes", code, "--prompt", "Once upon a time",
                "--samples", "1", "--new_bytes", "10"])
    assert f"with {code}" in capsys.readouterr().out


def test_clear_errors(tmp_path):
    run = subprocess.run([sys.executable, "train_lm.py", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, env=os.environ | {"CODEBOOK_EXT": "0"})
    assert run.returncode != 0 and run.stderr.strip().splitlines() == [f"error: data path {tmp_path / 'nothing'} does not exist"]
    with pytest.raises(ValueError, match="does not exist"):
        steer.main(["--ckpt", str(tmp_path / "none.pt")])


def test_torchrun_ddp_smoke(tmp_path):
    """Two CPU processes under torchrun (gloo): both train, rank 0 writes the results."""
    out = tmp_path / "ddp"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train_lm.py", *TINY, "--base_steps", "6", "--codebook_steps", "4", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=os.environ | {"CODEBOOK_EXT": "0", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.load(open(out / "results.json"))
    assert results["processes"] == 2 and np.isfinite(results["codebook_val_loss"])
    assert len(re.findall(r"loss ratio codebooks / base", run.stdout)) == 1  # only rank 0 prints the table
