"""text.py, train_lm.py and steer.py: the byte tokenizer, the memmap loader, the generated corpus, a tiny
run of both scripts end to end, and train_lm.py under torchrun with two CPU processes."""
import argparse
import json
import os
import re
import signal
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import codebook as cb
import models
import runs
import sae
import steer
import text
import train_lm
from conftest import ROOT, START_METHOD, assert_same, chat_bpe, final_state, free_port, run, tiny_model
from conftest import TINY as TINY_CONFIG, tokens as tiny_tokens

# a model small enough to train in seconds: every flag of train_lm.py
TINY = ["--stories", "1200", "--n_layer", "2", "--n_head", "2", "--d_model", "32", "--block_size", "64",
        "--batch_size", "8", "--base_steps", "30", "--codebook_steps", "10", "--num_codes", "32", "--k", "4",
        "--revive_every", "5", "--eval_windows", "16", "--kmeans_windows", "8", "--threads", "1", "--device", "cpu"]


def test_bytes_round_trip():
    rng = np.random.default_rng(0)
    for data in [b"", bytes(range(256)), rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()]:
        tokens = text.encode(data)
        assert tokens.dtype == np.int64 and len(tokens) == len(data) and tokens.max(initial=0) < 256
        assert text.decode_bytes(tokens) == data
        assert text.decode_bytes([text.BOS, *tokens, text.BOS]) == data  # specials dropped
    sample = "Grüße, 東京 🐉\n\t"
    assert text.decode(text.encode(sample)) == sample


def test_memmap_loader(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    docs = [f"<doc {i:03d}> " + "abc" * (i % 7) + "\xff\x01 end" for i in range(200)]
    for i, doc in enumerate(docs[:100]):
        (corpus / f"{i:03d}.txt").write_text(doc, encoding="latin-1")
    (corpus / "sub" / "many.txt").write_text("<|endoftext|>".join(docs[100:]), encoding="latin-1")
    (corpus / "skip.bin").write_bytes(b"not included")
    train, val, folder = text.prepare_data(str(corpus), str(tmp_path / "out"), 0.2, 0, 0, "*.txt", "<|endoftext|>", 16)
    assert isinstance(train.data, np.memmap)

    # the split: every document in exactly one split, whole, each preceded by BOS
    def documents(split):
        stream = split.tokens(0, split.num_tokens)
        cuts = np.flatnonzero(stream == text.BOS)
        assert cuts[0] == 0 and len(cuts) == len(split.bos_at)
        return [text.decode_bytes(part).decode("latin-1") for part in np.split(stream, cuts)[1:]]
    train_docs, val_docs = documents(train), documents(val)
    assert sorted(train_docs + val_docs) == sorted(docs) and 10 < len(val_docs) < 70
    assert len(train.data) + len(val.data) == sum(len(d.encode("latin-1")) for d in docs)

    # batches: windows of the stream, never reaching outside it (the last window ends at its end)
    stream = train.tokens(0, train.num_tokens)
    rng = np.random.default_rng(1)
    windows = train.random_windows(rng, 500, 17)
    assert windows.shape == (500, 17) and windows.dtype == torch.int64
    whole = stream.tobytes()
    for w in windows[:50]:
        assert w.numpy().tobytes() in whole
    last = train.windows([train.num_tokens - 17], 17)[0]
    assert torch.equal(last, torch.from_numpy(stream[-17:]))
    assert train.tokens(0, 3).tolist()[0] == text.BOS

    # a tokenizer that starts every text with a token (Gemma's <bos>): so does every window
    class Prefixed(text.ByteTokenizer):
        prefix = [7]
    first = text.Split(folder, "train", Prefixed()).random_windows(np.random.default_rng(1), 500, 17)
    assert (first[:, 0] == 7).all() and torch.equal(first[:, 1:], windows[:, 1:])

    # tokenised once: a second call reads the same folder, also after `touch` (the files' contents decide)
    os.utime(corpus / "000.txt", (1, 1))
    assert text.prepare_data(str(corpus), str(tmp_path / "out"), 0.2, 0, 0, "*.txt", "<|endoftext|>", 16)[2] == folder

    # clear errors
    with pytest.raises(ValueError, match="does not exist"):
        text.prepare_data(str(tmp_path / "missing"), str(tmp_path / "out"), 0.2, 0, 0, "*", "", 16)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        text.prepare_data(str(tmp_path / "empty"), str(tmp_path / "out"), 0.2, 0, 0, "*", "", 16)
    with pytest.raises(ValueError, match="no text files matching"):
        text.prepare_data(str(corpus), str(tmp_path / "out"), 0.2, 0, 0, "*.md", "", 16)
    with pytest.raises(ValueError, match="is the output folder too: give --out a folder of its own"):
        text.prepare_data(str(corpus), str(corpus), 0.2, 0, 0, "*.txt", "", 16)
    read, write = os.pipe()  # what `--data <(cat corpus.txt)` gives
    with pytest.raises(ValueError, match="is neither a file nor a folder: save the text to a file first"):
        text.prepare_data(f"/proc/self/fd/{read}", str(tmp_path / "out"), 0.2, 0, 0, "*", "", 16)
    os.close(read), os.close(write)
    (tmp_path / "model.bin").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="model.bin is not text"):
        text.prepare_data(str(tmp_path / "model.bin"), str(tmp_path / "out"), 0.2, 0, 0, "*", "", 16)
    (corpus / "notes.txt").write_text("some notes", encoding="utf-16")  # text, with a byte-order mark
    with pytest.raises(ValueError, match="notes.txt is UTF-16 or UTF-32 text: convert it to UTF-8"):
        text.prepare_data(str(corpus), str(tmp_path / "out"), 0.2, 0, 0, "*.txt", "", 16)


def test_one_text_file_holds_out_its_tail_and_a_run_never_reads_its_own_output(tmp_path):
    # one document, too few to hold any out at random: its last 20% is the validation split
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text_ = "".join(f"line {i} of one long file\n" for i in range(400))
    (corpus / "one.txt").write_text(text_)
    (corpus / "gone.txt").symlink_to(tmp_path / "nowhere")  # a broken link is no file to read
    (corpus / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" * 50)  # nor is a binary file
    out = corpus / "out"  # the run's output inside its own data folder
    train, val, folder = text.prepare_data(str(corpus), str(out), 0.2, 0, 0, "*", "<|endoftext|>", 16)
    assert bytes(train.data) + bytes(val.data) == text_.encode()
    assert len(val.data) == round(0.2 * len(text_)) and list(val.bos_at) == [0] and list(train.bos_at) == [0]
    (out / "data" / "copy.txt").write_text(text_)  # what a run writes under out/ is never read as data
    assert text.prepare_data(str(corpus), str(out), 0.2, 0, 0, "*", "<|endoftext|>", 16)[2] == folder
    for seed in range(6):  # the one document drawn for either split: the tail is held out all the same
        text.write_corpus([text_], tmp_path / str(seed), val_fraction=0.5, seed=seed)
        train, val = text.Split(tmp_path / str(seed), "train"), text.Split(tmp_path / str(seed), "val")
        assert bytes(train.data) == text_[:len(text_) // 2].encode() and bytes(val.data) == text_[len(text_) // 2:].encode()


def test_a_tail_held_out_at_a_document_s_start_leaves_no_bos_behind(tmp_path):
    """Documents all drawn for training (seeds 0, 3, 5, 6 of val_fraction 0.2): the last 20% of the 10 tokens (bytes)
    are held out, and the cut, 8, falls where the third document starts: it goes whole to "val", and "train" holds
    the other two, each after its BOS, with no BOS of an empty document after them."""
    for seed in (0, 3, 5, 6):
        folder = tmp_path / str(seed)
        assert text.write_corpus(["abc", "defgh", "ij"], folder, val_fraction=0.2, seed=seed) == {"train": 8, "val": 2}
        train, val = text.Split(folder, "train"), text.Split(folder, "val")
        assert bytes(train.data) == b"abcdefgh" and list(np.load(folder / "train_docs.npy")) == [0, 3]
        assert bytes(val.data) == b"ij" and list(np.load(folder / "val_docs.npy")) == [0]
        bos = text.BOS
        assert list(train.tokens(0, train.num_tokens)) == [bos, *b"abc", bos, *b"defgh"] and train.num_tokens == 10
        assert list(val.tokens(0, val.num_tokens)) == [bos, *b"ij"]


def test_a_data_folder_gives_each_file_once_never_other_runs_and_whole_characters(tmp_path, capsys, monkeypatch):
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    (corpus / "notes").mkdir(parents=True), elsewhere.mkdir()
    for i in range(3):
        (corpus / "notes" / f"{i}.txt").write_text(f"note {i}\n")
    (elsewhere / "far.txt").write_text("far away\n")
    (corpus / "again.txt").symlink_to(corpus / "notes" / "0.txt")  # a second way to a file
    (corpus / "linked").symlink_to(elsewhere)  # a linked folder is read
    (corpus / "notes" / "up").symlink_to(corpus)  # a link back up is not read again
    earlier = corpus / "runs" / "a"  # another run's output: its tokens are the corpus again, as text
    (earlier / "data").mkdir(parents=True)
    (earlier / runs.LOCK).write_text("123")
    (earlier / "data" / "train.bin").write_text("note 0\nnote 1\n")
    (corpus / "notes" / "tool").mkdir()  # another tool's lock file, not a run's, hides nothing
    (corpus / "notes" / "tool" / runs.LOCK).write_text("")
    (corpus / "notes" / "tool" / "t.txt").write_text("tool notes\n")
    files = text.list_files(str(corpus), out=str(corpus / "runs" / "b"))
    assert [os.path.relpath(f, corpus) for f in files] == ["again.txt", "linked/far.txt", "notes/1.txt", "notes/2.txt",
                                                           "notes/tool/t.txt"]
    assert [os.path.relpath(f, earlier) for f in text.list_files(str(earlier))] == ["data/train.bin"]  # a run given: not its lock

    # a long document is cut into pieces between characters; a file not in UTF-8 is named, for a BPE
    monkeypatch.setattr(text, "MAX_DOC_BYTES", 10)
    (tmp_path / "long.txt").write_text("x" + "\u00e9" * 30)  # a two-byte character at every odd byte
    pieces = list(text.iter_documents(str(tmp_path / "long.txt"), utf8=True))
    assert len(pieces) > 3 and all(p.decode("utf-8") for p in pieces) and b"".join(pieces) == ("x" + "\u00e9" * 30).encode()
    assert [len(p) for p in text.iter_documents(str(tmp_path / "long.txt"))] == [10] * 6 + [1]  # bytes as tokens: any byte
    (tmp_path / "latin.txt").write_bytes("Caf\u00e9 na\u00efve".encode("latin-1"))
    list(text.iter_documents(str(tmp_path / "latin.txt"), utf8=True))
    assert "latin.txt is not valid UTF-8 (2 bytes read as U+FFFD)" in capsys.readouterr().out
    list(text.iter_documents(str(tmp_path / "latin.txt")))  # bytes as tokens keep every byte: nothing to say
    assert capsys.readouterr().out == ""
    # steer's reference texts: at most --reference_bytes, the last document cut between characters
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "a.txt").write_text("short")
    (tmp_path / "refs" / "b.txt").write_text("\u00e9" * 40)
    assert steer.at_most(text.iter_documents(str(tmp_path / "refs")), 12) == [b"short", "\u00e9\u00e9\u00e9".encode()]
    assert steer.at_most([b"abcd", "\u00e9tait".encode(), b"xyz"], 5) == [b"abcd"]  # none after one cut to nothing


def test_a_data_file_changed_while_the_corpus_is_read_leaves_no_corpus(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(f"document {i} " * 200)
    hash_files = text.content_digests

    def hashed_then(change):
        def content_digests(files, cache):
            digests = hash_files(files, cache)
            change()  # after the files were hashed, before they are read
            return digests
        return content_digests

    for change, message in ((lambda: os.remove(corpus / "2.txt"), "2.txt was removed while the corpus was read"),
                            (lambda: (corpus / "1.txt").write_text("other"), "1.txt changed while the corpus was read")):
        monkeypatch.setattr(text, "content_digests", hashed_then(change))
        with pytest.raises(ValueError, match=message):
            text.prepare_data(str(corpus), str(tmp_path / "out"), 0.1, 0, 0, "*", "<|endoftext|>", 16)
        assert not [f for f in os.listdir(tmp_path / "out" / "data") if os.path.exists(tmp_path / "out" / "data" / f / "done")]
    # new bytes of the same size under the old modification time (cp -p, rsync -t) are hashed again
    monkeypatch.undo()
    cache, first = str(tmp_path / "digests.json"), str(corpus / "0.txt")
    before, times = text.content_digests([first], cache), os.stat(first)
    (corpus / "0.txt").write_text("document 9 " * 200)
    os.utime(first, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert text.content_digests([first], cache) != before


def test_reference_texts_are_cut_at_reference_bytes_before_they_are_labelled(capsys):
    """A reference story cut where --reference_bytes ends is labelled by what is left of it."""
    _, story = text.make_stories(1, seed=1)[0]  # steer's first reference story at --seed 0
    half = len(story) // 2
    late = next(w for w in re.findall(r"[a-z]{4,}", story[half:]) if not re.search(rf"\b{w}\b", story[:half]))
    regex = rf"\b{late}\b"  # a word of the story's second half alone; the story is cut before its first use
    args = argparse.Namespace(reference="", reference_stories=1, seed=0, topic_file="", regex=regex,
                              reference_bytes=re.search(regex, story).start())
    with pytest.raises(ValueError, match="no reference text is on the topic"):  # not "every reference text"
        steer.reference_set(args, text.ByteTokenizer(), 16, {regex: re.compile(regex)})


def test_reference_files_are_cut_at_reference_bytes_before_they_are_labelled(tmp_path, capsys):
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "a.txt").write_text("the dragon flew. " * 3)  # 51 bytes on the topic
    (refs / "b.txt").write_text("plain words here " * 10 + "dragon")  # the topic's word past the cut
    args = argparse.Namespace(reference=str(refs), reference_bytes=120, topic_file="", regex="dragon")
    _, position_topic = steer.reference_set(args, text.ByteTokenizer(), 16, {"dragon": text.topic_regex(["dragon"])})
    assert position_topic.numel() == 112 and int((position_topic == 0).sum()) == 51  # 122 tokens, 7 rows of 16


def test_train_lm_reports_each_corpus_by_its_own_name_and_says_when_held_out_windows_overlap(tmp_path, capsys):
    reference = tmp_path / "reference"  # a folder named as a --prose corpus
    reference.mkdir()
    (reference / "a.txt").write_text("some text " * 200)
    data = TINY[2:] + ["--data", str(reference), "--out", str(tmp_path / "o")]  # its text, not --stories
    with pytest.raises(ValueError, match="--stories does nothing with --data, whose text replaces the generated stories"):
        train_lm.settings(TINY + data[-4:])
    with pytest.raises(ValueError, match="--data .*reference and --prose reference would be reported under one name"):
        train_lm.settings(data + ["--prose", "reference"])
    args = train_lm.settings(data)
    (val,) = train_lm.load_data(args, text.ByteTokenizer(), 0, 1)[1].values()
    assert val.num_tokens == 101 and train_lm.overlapping(val, args)  # 16 windows of 65 tokens need 1,040
    assert "note: reference's held-out split holds 101 tokens, fewer than 16 windows of 65" in capsys.readouterr().out


def test_the_page_shows_the_printed_figures(tmp_path):
    """report.html's held-out table: the printed table's decimals, and the ratio a run without a control computed."""
    figures = {"base_val_loss": 2.0, "base_val_accuracy": 0.5625, "codebook_val_loss": 2.5, "codebook_val_accuracy": 0.2275,
               "loss_ratio": 1.25, "dead_code_fraction": {"L0.H0": 0.28125}}
    args = argparse.Namespace(out=str(tmp_path), hf="", init_from="")
    page = open(train_lm.write_page(figures | {"held_out": {"stories": figures}}, args, "python train_lm.py")).read()
    assert "codebooks / base" in page and "finetuned" not in page
    assert all(f">{shown}</td>" in page for shown in ("56.25%", "22.75%", "1.250", "28.12%"))


def test_the_page_of_a_run_with_a_control_and_patterns_shows_their_figures(tmp_path):
    """With the control, the ratio column is over the finetuned model; dead codes: the mean over the codebooks;
    a pattern row's precision and recall each in its own column."""
    figures = {"base_val_loss": 2.0, "base_val_accuracy": 0.5, "finetuned_val_loss": 2.2, "finetuned_val_accuracy": 0.45,
               "codebook_val_loss": 2.75, "codebook_val_accuracy": 0.25, "loss_ratio": 1.375, "loss_ratio_finetuned": 1.25,
               "dead_code_fraction": {"L0.H0": 0.125, "L0.H1": 0.5, "L1.H0": 0.0}}  # mean 20.83%
    rows = [{"pattern": "digit", "positions": 40, "code": "L1.H0.7", "precision": 0.9, "recall": 0.25, "neuron": "L0.H1[3]",
             "neuron_precision": 0.5, "sae": "SAE L0.H0[2]", "sae_precision": 0.625}]
    args = argparse.Namespace(out=str(tmp_path), hf="", init_from="")
    page = open(train_lm.write_page(figures | {"held_out": {"stories": figures}, "patterns": {"patterns": rows}}, args,
                                    "python train_lm.py")).read()
    cells = lambda row: re.findall(r"<td[^>]*>(.*?)</td>", row)
    (held,) = re.findall(r"<tr><td>stories</td>.*?</tr>", page)
    assert "codebooks / finetuned" in page
    assert cells(held) == ["stories", "2.0000", "2.2000", "2.7500", "50.00%", "45.00%", "25.00%", "1.250", "20.83%"]
    (pattern,) = re.findall(r"<tr><td>digit</td>.*?</tr>", page)
    assert cells(pattern) == ["digit", "40", "L1.H0.7", "90.00%", "25.00%", "L0.H1[3]", "50.00%", "SAE L0.H0[2]", "62.50%"]


def test_held_out_figures_recounted_dead_codes_averaged_over_codebooks():
    model, windows = tiny_model(), tiny_tokens(n=6, seq=17)
    model.history = []
    torch.manual_seed(1)
    base = cb.GPT(cb.GPTConfig(**TINY_CONFIG))
    args = argparse.Namespace(sae=False, data="", num_codes=40)
    results, _, _ = train_lm.evaluate(args, (base, None, model), {"stories": windows}, windows, None, None, 1)
    ids, _ = cb.record_dataset(model, windows[:, :-1])
    dead = {a: (torch.bincount(v.flatten(), minlength=model.locate(a)[0].num_codes) == 0).float().mean().item()
            for a, v in ids.items()}
    assert results["dead_code_fraction"] == pytest.approx(dead) and len(set(dead.values())) > 2
    assert results["mean_dead_code_fraction"] == pytest.approx(sum(dead.values()) / len(dead))
    assert results["loss_ratio"] == results["codebook_val_loss"] / results["base_val_loss"]


def test_the_printed_table_shows_the_figures(capsys):
    dead = {"L0.H0": 0.125, "L0.H1": 0.5, "L1.H0": 0.0, "L1.H1": 0.0}  # mean 15.62%
    figures = {"base_val_loss": 2.0, "base_val_accuracy": 0.5, "codebook_val_loss": 2.5, "codebook_val_accuracy": 0.25,
               "loss_ratio": 1.25, "dead_code_fraction": dead}
    r = figures | {"held_out": {"stories": figures}, "base_train_loss": 1.5, "mean_dead_code_fraction": 0.15625}
    args = argparse.Namespace(eval_windows=2, block_size=4, num_codes=8, k=2)
    train_lm.report(r, args, argparse.Namespace(n_layer=2, n_head=2), 0.0, {"stories": argparse.Namespace(num_tokens=100)})
    printed = capsys.readouterr().out
    assert re.search(r"val loss \(nats/token\) +2\.0000 +2\.5000\n", printed)
    assert re.search(r"val next-token accuracy +50\.00% +25\.00%\n", printed)
    assert "loss ratio codebooks / base       1.250\n" in printed
    assert printed.count("dead codes                        15.62% mean") == 2  # the corpus's line and the run's
    assert "L0: H0  12.5%  H1  50.0%" in printed


def test_a_topic_s_codes_are_its_best_on_the_heads_that_cover_it_most():
    args = argparse.Namespace(min_precision=0.5, min_recall=0.1, per_head=2, heads=2)
    one_topic = lambda *values: torch.tensor([values])
    stats = {"L0.H0": (one_topic(0.9, 0.9, 0.1), one_topic(0.2, 0.3, 0.9)),  # code 2 imprecise: 0 and 1 cover 0.5
             "L0.H1": (one_topic(0.6, 0.9, 0.9), one_topic(0.4, 0.05, 0.3)),  # code 1 too rare: 0 and 2 cover 0.7
             "L1.H0": (one_topic(1.0, 0.4, 0.4), one_topic(0.15, 0.9, 0.9)),  # code 0 alone: 0.15
             "L1.H1": (one_topic(0.2, 0.2, 0.2), one_topic(0.9, 0.9, 0.9))}  # none precise enough
    # per head its best codes by F1 (L0.H1: 0.48, then 0.45; L0.H0: 0.45, then 0.33), the heads by coverage
    assert list(steer.topic_codes(stats, 0, args, k=4).items()) == [("L0.H1", [0, 2]), ("L0.H0", [1, 0])]
    assert steer.topic_codes(stats, 0, args, k=1) == {"L0.H1": [0], "L0.H0": [1]}  # at most k codes a head


def test_a_topic_code_at_exactly_the_thresholds_is_kept():
    """--min_precision and --min_recall are floors a code may sit on ("at least")."""
    args = argparse.Namespace(min_precision=0.5, min_recall=0.25, per_head=4, heads=4)
    stats = {"L0.H0": (torch.tensor([[0.5, 0.25, 0.875, 1.0]]), torch.tensor([[0.5, 1.0, 0.25, 0.125]]))}
    # code 0 precision 0.5 (F1 0.5), code 2 recall 0.25 (F1 0.389); code 1 too imprecise, code 3 too rare
    assert steer.topic_codes(stats, 0, args, k=4) == {"L0.H0": [0, 2]}


def test_the_steering_table_s_means_and_rare_topics_counted_by_hand(capsys):
    figures = lambda base, steered, ppl: {"hit_rate_base": base, "hit_rate_steered": steered, "hit_rate_addition": 0.0,
                                          "hit_rate_prompting": 0.5, "ppl_base": ppl, "ppl_steered": 2 * ppl,
                                          "ppl_addition": 3.0, "ppl_prompting": ppl}
    results = {"a": figures(0.1, 1.0, 2.0), "b": figures(0.0, 0.5, 4.0), "c": figures(0.5, 0.2, 9.0)}
    r = steer.report(results)
    assert r["topics_rare_unsteered"] == ["a", "b"]  # "<= 10%": a topic at 10% exactly is rare
    assert r["mean_hit_rate_steered_rare"] == pytest.approx(0.75) and r["mean_hit_rate_prompting_rare"] == 0.5
    assert r["mean_hit_rate_steered"] == pytest.approx(1.7 / 3) and r["mean_ppl_base"] == pytest.approx(5.0)
    assert r["mean_ppl_steered"] == pytest.approx(10.0) and r["mean_hit_rate_base"] == pytest.approx(0.2)
    assert "2 of 3 topics have an unsteered hit rate <= 10%" in capsys.readouterr().out


def test_the_code_search_ranks_every_code_of_every_head_by_f1():
    one_topic = lambda *values: torch.tensor([values])
    stats = {"L0.H0": (one_topic(1.0, 0.5, 0.0), one_topic(0.25, 0.5, 0.0)),  # F1 0.4, 0.5, none
             "L1.H1": (one_topic(0.75, 0.2), one_topic(0.75, 1.0))}  # F1 0.75, 0.333
    ranked = steer.ranked_codes(stats, 0, n=3)
    assert [row["address"] for row in ranked] == ["L1.H1.0", "L0.H0.1", "L0.H0.0"]
    assert ranked[1] == {"address": "L0.H0.1", "precision": 0.5, "recall": 0.5}


def test_a_regex_topic_counts_its_words_in_any_case():
    """--regex hits as the corpus topics' (text.topic_regex): in any case."""
    args = steer.parser.parse_args(["--regex", r"\bdragons?\b"])
    (hit,) = steer.choose_topics(args).values()
    assert [bool(hit.search(t)) for t in ("Dragons flew", "a DRAGON", "dragonfly")] == [True, True, False]


def test_perplexity_is_of_the_generated_tokens_up_to_the_first_end_given_the_prompt():
    torch.manual_seed(0)
    model = cb.GPT(cb.GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, d_model=16, d_mlp=32,
                                codebooks={"attn": dict(num_codes=8, k=2)})).eval()
    B = text.BOS
    short = torch.tensor([[B, 65, 66, 67, 68, 69], [B, 65, 66, 70, B, 71]])  # BOS + a 2-byte prompt, then 3 generated
    long = torch.tensor([[B, 72, 73, 74, 75, B, 76]])  # a 3-byte prompt: the first generated byte ends the sample
    with torch.no_grad():
        logp_short, logp_long = (model(t[:, :-1]).log_softmax(-1) for t in (short, long))
    # by hand: each generated token's log-likelihood given everything before it, none after a BOS nor the BOS itself
    nll = -(logp_short[0, 2, 67] + logp_short[0, 3, 68] + logp_short[0, 4, 69] + logp_short[1, 2, 70] + logp_long[0, 3, 75])
    assert steer.perplexity(model, [(short, 3), (long, 4)]) == pytest.approx(np.exp(nll.item() / 5), rel=1e-5)


def test_score_counts_the_samples_on_topic_and_their_likelihood_up_to_the_end_of_a_turn():
    tok = chat_bpe()
    torch.manual_seed(0)
    model = cb.GPT(cb.GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16, d_mlp=32,
                                codebooks={"attn": dict(num_codes=8, k=2)})).eval()
    e = tok.eos
    rows = lambda prompt, *generated: torch.tensor([[tok.bos, *tok.encode(prompt), *g] for g in generated])
    samples = [(rows("A", [*tok.encode("dragon"), e, *tok.encode("x")], tok.encode("the cat!!!")), 2),  # a hit; none
               (rows("Be", [*tok.encode("x"), e, *tok.encode("dragon")], tok.encode("Dragons.")), 3)]  # after its end: none; a hit
    rate, ppl, texts = steer.score(model, tok, samples, text.topic_regex(["dragon"]))
    assert texts == ["dragon", "the cat!!!", "x", "Dragons."] and rate == 0.5  # 2 of the 4 samples
    nll, count = 0.0, 0
    for tokens, n in samples:
        with torch.no_grad():
            logp = model(tokens[:, :-1]).log_softmax(-1)
        for r, length in enumerate((6, 8) if n == 2 else (1, 8)):  # generated tokens before the end of a turn
            nll -= sum(logp[r, n - 1 + i, tokens[r, n + i]].item() for i in range(length))
            count += length
    assert ppl == pytest.approx(np.exp(nll / count), rel=1e-5)


def test_activation_addition_adds_the_scaled_mean_difference_and_the_page_shows_the_table(tmp_path, monkeypatch, capsys):
    """steer_topics' addition baseline: at each head of the topic's codes, --addition_scale x (the head's mean
    output on the topic's positions - its mean everywhere), written out; report.html's table of its figures."""
    torch.manual_seed(0)
    model = cb.GPT(cb.GPTConfig(vocab_size=257, block_size=64, n_layer=1, n_head=2, d_model=16, d_mlp=32,
                                codebooks={"attn": dict(num_codes=8, k=2)})).eval()
    tok = text.ByteTokenizer()
    tokens = torch.randint(0, 256, (6, 64), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = text.BOS
    position_topic = torch.full((6, 64), -1)
    position_topic[:3, 1:] = 0
    recorded = cb.record_dataset(model, tokens)
    args = argparse.Namespace(samples=1, new_bytes=2, longest_request=1, temperature=1.0, seed=0, device="cpu", heads=2,
                              per_head=2, min_precision=0.0, min_recall=0.0, addition_scale=2.5, contexts=1, regex="",
                              topic_name="", out=str(tmp_path), ckpt="tiny.pt", cards=2)
    added, real = {}, steer.baselines.add_vectors
    monkeypatch.setattr(steer.baselines, "add_vectors", lambda model, vectors: added.update(vectors) or real(model, vectors))
    topics = {"dragons": text.topic_regex(["dragon"])}
    results, steering = steer.steer_topics(args, model, tok, ["Hi"], topics, tokens, position_topic, recorded)
    assert set(added) == {code.rsplit(".", 1)[0] for code in results["dragons"]["codes"]} and added
    for address, vector in added.items():
        layer, head = model.locate(address)
        outputs = layer.codes[head].detach()[recorded[0][address]].mean(-2)  # each position's output: the mean of its k codes
        want = outputs[position_topic == 0].mean(0) - outputs.flatten(0, 1).mean(0)
        assert torch.allclose(vector, 2.5 * want, atol=1e-5)
    page = open(steer.write_page(args, "python steer.py", model, tok, tokens, position_topic, ["dragons"], recorded,
                                 results, steering)).read()
    r = results["dragons"]
    methods = ("base", "steered", "addition", "prompting")
    shown = [f"{round(100 * r[f'hit_rate_{m}'])}%" for m in methods] + [f"{r[f'ppl_{m}']:.2f}" for m in methods]
    cells = lambda row: re.findall(r"<td[^>]*>(.*?)</td>", row)
    (topic_row,) = re.findall(r"<tr><td><a href=\"#topic-dragons\">dragons</a></td>.*?</tr>", page)
    (mean_row,) = re.findall(r"<tr><td>mean</td>.*?</tr>", page)
    assert cells(topic_row)[1:] == shown + [str(len(r["codes"]))] and cells(mean_row)[1:] == shown + [""]  # one topic: its own mean


def test_default_corpus():
    assert len(text.TOPICS) >= 8
    stories = text.make_stories(600, seed=3)
    assert stories == text.make_stories(600, seed=3)
    assert stories != text.make_stories(600, seed=4)
    assert len({story for _, story in stories}) == len(stories)  # no repeats
    regexes = {t: text.topic_regex(spec["words"]) for t, spec in text.TOPICS.items()}
    for topic, story in stories:
        assert len(regexes[topic].findall(story)) >= 3, story  # the topic's words recur
        assert not any(r.search(story) for t, r in regexes.items() if t != topic), story  # and no other's
    assert {t for t, _ in stories} == set(text.TOPICS)


def test_tiny_end_to_end(tmp_path, capsys, one_thread):
    out = str(tmp_path / "lm")
    train_lm.main(TINY + ["--out", out])
    results = json.load(open(os.path.join(out, "results.json")))
    # the losses again from the checkpoints, on the same held-out windows
    args = train_lm.settings(TINY + ["--out", out])
    (base, tok), (model, _) = (models.load_with_tokenizer(os.path.join(out, name)) for name in ("base.pt", "codebook.pt"))
    (val,) = train_lm.load_data(args, tok, 0, 1)[1].values()
    windows = train_lm.fixed_windows(val, args, 0, args.eval_windows, args.block_size + 1)
    assert (results["base_val_loss"], results["codebook_val_loss"]) == (runs.evaluate(base, windows)[0], runs.evaluate(model, windows)[0])
    assert results["loss_ratio"] == results["codebook_val_loss"] / results["base_val_loss"]
    ids, _ = cb.record_dataset(model, windows[:, :-1])  # dead codes: in no slot of any held-out position
    assert results["dead_code_fraction"] == {a: (torch.bincount(v.flatten(), minlength=32) == 0).float().mean().item()
                                             for a, v in ids.items()} and len(ids) == 4
    assert results["base_val_loss"] < 0.8 * np.log(256)  # it learned something (uniform guessing: ln 256)
    assert [h["step"] for h in results["history"]["codebook"]] == [10]
    assert os.path.exists(os.path.join(out, "base.pt")) and os.path.exists(os.path.join(out, "codebook.pt"))
    # a rerun on another corpus is refused before that corpus is tokenised
    corpora = sorted(os.listdir(os.path.join(out, "data")))
    with pytest.raises(ValueError, match=r"base.pt was trained with other settings \(settings.data: 'stories-\w+' in the "
                                         r"checkpoint, 'stories-\w+' among the corpora now\)"):
        train_lm.main(TINY[:1] + ["1000"] + TINY[2:] + ["--out", out])
    assert sorted(os.listdir(os.path.join(out, "data"))) == corpora
    with pytest.raises(ValueError, match=r"base.pt was trained with other settings \(config.n_layer: 2 in the checkpoint, 3 now"):
        train_lm.main(TINY + ["--out", out, "--n_layer", "3"])  # the first stage that differs is named
    # a later stage made with other settings is refused before the stages before it train (here the control)
    os.remove(os.path.join(out, "finetuned.pt"))
    with pytest.raises(ValueError, match=r"codebook.pt was trained with other settings \(config.codebooks.attn.num_codes: "
                                         r"32 in the checkpoint, 16 now\)"):
        train_lm.main(TINY + ["--out", out, "--num_codes", "16"])
    assert not os.path.exists(os.path.join(out, "finetuned.pt"))
    # the corpora a stage was trained on, read whole from its settings: names may hold a +
    runs.save_checkpoint(str(tmp_path / "codebook.pt"), model, run={"settings": {"data": "a+b-0123456789ab+python-0123456789ab"}})
    runs.save_checkpoint(str(tmp_path / "finetuned.pt"), model, run={"settings": {"data": "stories-0123456789ab"}})
    for corpus in ("a+b-0123456789ab", "python-0123456789ab"):  # finetuned.pt, not gone on from (--no-control), unread
        train_lm.refuse_new_corpus(str(tmp_path), ["codebook.pt"], str(tmp_path / "data" / corpus))
    with pytest.raises(ValueError, match="codebook.pt was trained with other settings"):
        train_lm.refuse_new_corpus(str(tmp_path), ["codebook.pt"], str(tmp_path / "data" / "c-0123456789ab"))

    # SAEs on the base's heads, spliced in (every stage resumed, done): the codebook figures stay
    with_saes = train_lm.main(TINY + ["--out", out, "--sae", "--sae_steps", "5", "--sae_windows", "8"])
    assert with_saes["codebook_val_loss"] == results["codebook_val_loss"]
    assert with_saes["sae_loss_ratio"] == pytest.approx(with_saes["sae_val_loss"] / results["base_val_loss"])
    assert set(with_saes["sae_dead_latent_fraction"]) == set(results["dead_code_fraction"])
    saes = sae.load_saes(os.path.join(out, "sae.pt"))
    data = open(os.path.join(out, "sae.pt"), "rb").read()  # one bit of one weight flipped on disk: refused
    at = data.find(next(saes[0, "attn"].parameters()).detach().numpy().tobytes())
    assert at > 0
    (tmp_path / "flipped.pt").write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    with pytest.raises(ValueError, match=r"flipped.pt is corrupt \(its part .* fails its checksum\)"):
        sae.load_saes(str(tmp_path / "flipped.pt"))
    assert {key: (s.heads, s.num_latents, s.k) for key, s in saes.items()} == {(0, "attn"): (2, 32, 4), (1, "attn"): (2, 32, 4)}

    steer_args = ["--ckpt", os.path.join(out, "codebook.pt"), "--out", str(tmp_path / "steer"), "--topics", "dragons",
                  "--reference_stories", "60", "--samples", "2", "--new_bytes", "20", "--min_precision", "0",
                  "--threads", "1", "--device", "cpu"]
    steer.main(steer_args)
    steered = json.load(open(tmp_path / "steer" / "results.json"))
    r = steered["topics"]["dragons"]
    # the unsteered figures are steer.score of steer.sample_prompts' samples; its hit rate and
    # perplexity written out by hand: the topic's regex, the generated bytes' likelihood up to BOS
    model, tok = models.load_with_tokenizer(os.path.join(out, "codebook.pt"))
    unsteered = steer.sample_prompts(model, steer.PROMPTS, steer.settings(steer_args)[0], tok)
    # without --new_bytes every method fills the window left after the longest request: prompting as the rest
    whole = steer.settings(steer_args[:steer_args.index("--new_bytes")] + steer_args[steer_args.index("--new_bytes") + 2:])[0]
    request = steer.topic_request(tok, "dragons")
    assert whole.longest_request == len(request) > 1
    with pytest.raises(ValueError, match=r"--seed -1: the reference stories \(seed 0\) would be the stories .* was trained on"):
        steer.settings(steer_args + ["--seed", "-1"])  # the run's training seed is 0
    steer.settings(["--ckpt", os.path.join(out, "codebook.pt"), "--codes", "L0.H0.1", "--seed", "-1", "--device", "cpu"])  # no reference read
    with pytest.raises(ValueError, match="--out does nothing with --codes, which only samples --prompt"):  # nor written
        steer.settings(["--ckpt", os.path.join(out, "codebook.pt"), "--codes", "L0.H0.1", "--out", str(tmp_path / "codes")])
    for asking in ((), request):
        tokens, n = steer.sample(model, steer.PROMPTS[:1], whole, 0, tok, asking)
        assert n == 1 + len(tok.encode(steer.PROMPTS[0])) and tokens.shape[1] == model.config.block_size + 1 - len(request)
    regex = text.topic_regex(text.TOPICS["dragons"]["words"])
    assert (r["hit_rate_base"], r["ppl_base"]) == steer.score(model, tok, unsteered, regex)[:2]
    hits, nll, count = [], 0.0, 0
    for tokens, n in unsteered:
        hits += [bool(regex.search(t)) for t in steer.generated_text(tokens, n)]
        with torch.no_grad():
            logp = model(tokens[:, :-1]).log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        for row, lp in zip(tokens, logp):
            length = list(row[n:]).index(text.BOS) if text.BOS in row[n:] else len(row) - n
            nll -= lp[n - 1:n - 1 + length].sum().item()
            count += length
    assert r["hit_rate_base"] == sum(hits) / len(hits)
    assert r["ppl_base"] == pytest.approx(np.exp(nll / count), rel=1e-4)
    assert steered["mean_hit_rate_base"] == r["hit_rate_base"] and r["codes"]
    printed = capsys.readouterr().out
    assert "precision" in printed and "recall" in printed and "dragons" in printed
    steer.settings(steer_args + ["--new_bytes", "1000"])  # more than fits: said, per prompt
    assert f"note: --new_bytes 1000: {64 - len(tok.encode(steer.PROMPTS[0])) - whole.longest_request} after prompt " \
           f"{steer.PROMPTS[0]!r}, what fits in block_size=64 after the prompting baseline's request" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--new_bytes does nothing with --browse"):  # it samples nothing
        steer.settings(steer_args[:4] + ["--browse", "--new_bytes", "1000"])
    # report.html: the forced codes link to their cards, and --browse writes the browser alone
    page = open(tmp_path / "steer" / "report.html").read()
    assert 'id="topic-dragons"' in page and all(f'href="#{c}"' in page and f'id="{c}"' in page for c in r["codes"])
    assert page.count(f"<p><b>{steer.PROMPTS[0]}</b>") == 4 * 2  # per condition the first prompt's samples, no other's
    # a topic without codes to force is reported as skipped; the means cover the others
    assert steer.report(steered["topics"], ["sea"])["topics_skipped"] == ["sea"]
    assert "skipped, no code precise enough to force (--min_precision): sea" in capsys.readouterr().out
    # texts on the topic alone leave no code to tell from the rest: one line, before sampling
    (tmp_path / "dragons.txt").write_text(" ".join(story for topic, story in text.make_stories(40) if topic == "dragons"))
    with pytest.raises(ValueError, match="every reference text is on the topic 'dragon', so no code can be told from the rest"):
        steer.main(steer_args[:4] + ["--regex", "dragon", "--topic_file", str(tmp_path / "dragons.txt"), "--reference_bytes", "500",
                                     "--device", "cpu"])
    steer.main(steer_args[:4] + ["--browse", "--cards", "3", "--reference_stories", "60", "--device", "cpu"])
    page = open(tmp_path / "steer" / "report.html").read()
    assert 'id="topic-dragons"' not in page and page.count('class="codebook"') == 4 and page.count('class="card"') == 4 * 3

    # codes by address: samples with and without
    code = r["codes"][0]
    steer.main(["--ckpt", os.path.join(out, "codebook.pt"), "--codes", code, "--prompt", "Once upon a time",
                "--samples", "1", "--new_bytes", "10", "--device", "cpu"])
    assert f"with {code}" in capsys.readouterr().out


def _rank(rank, world, port, folder, argv):
    """One rank of a two-process run, with the environment torchrun gives its workers, forked from
    this process (so it starts with torch imported)."""
    os.chdir(folder)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CODEBOOK_EXT="0")
    train_lm.main(argv)


def test_torchrun_ddp_runs_and_resumes_exactly(tmp_path):
    """Two CPU processes under torchrun (gloo), killed in stage 2 after a checkpoint and rerun, end
    with the weights and results of an uninterrupted two-process run; rank 0 alone writes them."""
    flags = [*TINY, "--base_steps", "6", "--codebook_steps", "12", "--ckpt_every", "3", "--out", "ddp"]
    uninterrupted, drill = tmp_path / "uninterrupted", tmp_path / "drill"
    uninterrupted.mkdir(), drill.mkdir()

    def two_processes(folder):
        mp.start_processes(_rank, args=(2, free_port(), str(folder), flags), nprocs=2, start_method=START_METHOD)
    two_processes(uninterrupted)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "train_lm.py"), *flags]
    code, err = run(command, stop=("stage 2: codebooks", 5, signal.SIGKILL), cwd=drill)
    assert code == -signal.SIGKILL, err[-3000:]
    assert 3 <= torch.load(drill / "ddp" / "codebook.pt", weights_only=True)["step"] < 12  # the rerun resumes
    two_processes(drill)
    assert json.load(open(drill / "ddp" / "results.json"))["processes"] == 2
    assert_same(final_state(drill / "ddp"), final_state(uninterrupted / "ddp"))


def test_under_torchrun_a_folder_in_use_stops_every_rank_with_one_line(tmp_path):
    with runs.one_run_per_folder(str(tmp_path / "ddp")):  # another run writes there
        code, err = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         os.path.join(ROOT, "train_lm.py"), *TINY, "--out", "ddp"], cwd=tmp_path)
    assert code != 0 and f"error: --out ddp: another run (process {os.getpid()}) is writing to this folder" in err
    assert "RuntimeError" not in err and err.count("error: --out") == 1  # rank 1 stopped with rank 0, silently


def test_a_token_shows_in_a_context_as_what_it_holds():
    """Bytes of a character split over tokens, and control characters, as escapes; line breaks as signs."""
    shown = steer.token_text(text.ByteTokenizer())
    assert [shown(t) for t in (65, 10, 0, 0x7f, 0xe6, text.BOS)] == ["A", "↵", "\\x00", "\\x7f", "\\xe6", "¶"]
    tok = chat_bpe()  # every byte a token: "東" is three of them
    shown = steer.token_text(tok)
    assert [shown(t) for t in tok.encode("東 x\x1b\té")] == ["\\xe6", "\\x9d", "\\xb1", " ", "x", "\\x1b", "⇥", "\\xc3", "\\xa9"]
    assert shown(tok.eos) == "<|im_end|>" and shown(tok.bos) == "¶"


# --- corpora on disk: what a corpus holds, and when it is tokenised again --------------------

def _streams(train, val):
    return train.tokens(0, train.num_tokens).tolist(), val.tokens(0, val.num_tokens).tolist()


def test_a_corpus_is_tokenised_again_whenever_what_it_would_hold_changes(tmp_path):
    corpus, out = tmp_path / "corpus", str(tmp_path / "out")
    (corpus / "skip").mkdir(parents=True)
    (corpus / "a.txt").write_text("the one<|endoftext|>the two||the three")
    (corpus / "b.md").write_text("the four")
    (corpus / "skip" / "c.txt").write_text("the five")
    fewer_merges = chat_bpe()
    fewer_merges = type(fewer_merges)(fewer_merges.vocab, fewer_merges.merges[:2], fewer_merges.added_tokens,
                                      bos=fewer_merges.bos, eos=fewer_merges.eos)
    usual = ["the one", "the two||the three", "the four"]  # a.txt cut at the separator, then b.md; skip/ left out
    folders = []
    for change, documents in [({}, usual),
                              (dict(include="*.txt"), usual[:2]),
                              (dict(separator="||"), ["the one<|endoftext|>the two", "the three", "the four"]),
                              (dict(exclude=()), usual + ["the five"]),
                              (dict(seed=1), usual),
                              (dict(val_fraction=0.3), usual),
                              (dict(tokenizer=chat_bpe()), usual),
                              (dict(tokenizer=fewer_merges), usual),
                              (dict(new_text="the FOUR"), usual[:2] + ["the FOUR"])]:
        settings = dict(val_fraction=0.5, seed=0, include="*", separator="<|endoftext|>", exclude=("skip",),
                        tokenizer=None) | change
        if "new_text" in settings:  # the same name, other bytes
            (corpus / "b.md").write_text(settings.pop("new_text"))
        train, val, folder = text.prepare_data(str(corpus), out, settings["val_fraction"], settings["seed"], 0,
                                               settings["include"], settings["separator"], 1, settings["exclude"],
                                               settings["tokenizer"])
        expected = text.write_corpus([d.encode() for d in documents], tmp_path / f"expected{len(folders)}",
                                     settings["val_fraction"], settings["seed"], settings["tokenizer"])
        assert expected == {"train": len(train.data), "val": len(val.data)}, change
        assert _streams(train, val) == _streams(*(text.Split(tmp_path / f"expected{len(folders)}", s, settings["tokenizer"])
                                                  for s in ("train", "val"))), change
        folders.append(folder)
    assert len(set(folders)) == len(folders)  # each its own corpus


def test_a_data_folder_leaves_out_excluded_folders_other_tools_locks_aside_and_itself_however_named(tmp_path):
    corpus = tmp_path / "corpus"
    for folder in (".git", "__pycache__", "site-packages", "vendor", "tool"):
        (corpus / folder).mkdir(parents=True)
        (corpus / folder / "x.txt").write_text("text\n")
    (corpus / "tool" / runs.LOCK).write_text("held by another tool\n")  # not a run's process id
    (corpus / "vendor" / "late.bin").write_bytes(b"x" * 4000 + b"\0")  # binary: a NUL byte in its first 8 KiB
    assert [os.path.relpath(f, corpus) for f in text.list_files(str(corpus))] == ["tool/x.txt", "vendor/x.txt"]
    assert [os.path.relpath(f, corpus) for f in text.list_files(str(corpus), exclude=("vendor",))] == [
        ".git/x.txt", "__pycache__/x.txt", "site-packages/x.txt", "tool/x.txt"]
    for out in (f"{corpus}/", f"{corpus}/../corpus"):  # the output folder named otherwise
        with pytest.raises(ValueError, match="is the output folder too"):
            text.list_files(str(corpus), out=out)


def test_documents_are_cut_at_the_separator_across_chunks_and_long_ones_between_characters(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_bytes(b"ab<|endoftext|>c\n\nd<|endoftext|><|endoftext|>efg<|endoftext|>")
    for chunk_bytes in (1, 3, 7, 100):  # a separator split between two reads is a separator all the same
        assert list(text.iter_documents(str(path), chunk_bytes=chunk_bytes)) == [b"ab", b"c\n\nd", b"", b"efg", b""]
    assert list(text.iter_documents(str(path), separator="")) == [path.read_bytes()]  # no separator: the file whole
    monkeypatch.setattr(text, "MAX_DOC_BYTES", 5)
    path.write_text("ab🐉🐉")  # 2 + 4 + 4 bytes: the first cut, at 5, goes back 3 bytes to the character's start
    assert [p.decode() for p in text.iter_documents(str(path), utf8=True)] == ["ab", "🐉", "🐉"]
    assert [text.character_boundary("a🐉".encode(), at) for at in range(6)] == [0, 1, 1, 1, 1, 5]


def test_a_split_holds_at_least_a_block_and_one_token_and_a_single_document_at_least_one_held_out_token(tmp_path):
    assert text.write_corpus([b"abc"], tmp_path / "one", val_fraction=0.1) == {"train": 2, "val": 1}  # round(2.7) = 3: no
    for fraction in (0, 1):
        with pytest.raises(ValueError, match=f"val_fraction={fraction} must be between 0 and 1"):
            text.write_corpus([b"abc"], tmp_path / "bad", val_fraction=fraction)
    text.write_corpus(["abcdefg", "xyz"], tmp_path / "two", split_of=lambda doc: "val" if doc == "xyz" else "train")
    train, val, _ = text.read_splits(tmp_path / "two", None, 3, "here")  # val: BOS x y z, 4 tokens, a window of 3 + 1
    assert bytes(val.data) == b"xyz" and val.num_tokens == 4 and train.num_tokens == 8
    with pytest.raises(ValueError, match=re.escape("the validation split holds 4 tokens, fewer than block_size + 1 = 5")):
        text.read_splits(tmp_path / "two", None, 4, "here")
