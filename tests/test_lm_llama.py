"""The paper's language-model experiments as README runs them on SmolLM2-135M, here on a tiny random
Llama-style model in seconds: train_lm.py with per-head attention codebooks, the control and SAEs on
the generated stories and real prose, each held-out corpus on its own; the pattern table of section 4;
steer.py's three methods (forcing codes, activation addition, prompting in the chat format); both
pages in headless Chromium. Every figure is checked against a recount by hand."""
import json
import os

import numpy as np
import pytest
import torch

import baselines
import codebook as cb
import models
import patterns
import runs
import sae
import steer
import text
import train_lm
from conftest import chat_bpe, count, page_errors, tiny_llama

TRAIN = ["--stories", "300", "--prose", "reference,docstrings", "--block_size", "128", "--batch_size", "4",
         "--codebook_steps", "6", "--num_codes", "16", "--k", "2", "--revive_every", "3", "--eval_windows", "8",
         "--kmeans_windows", "4", "--sae", "--sae_steps", "10", "--sae_windows", "6", "--patterns", "--pattern_windows", "4",
         "--threads", "1", "--device", "cpu"]
TOPICS = ["dragons", "sea"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Both scripts run once: (train_lm's argv, its results, steer's argv, its results)."""
    folder = tmp_path_factory.mktemp("llama")
    train_argv = TRAIN + ["--init_from", tiny_llama(folder / "tiny.pt"), "--out", str(folder / "lm")]
    trained = train_lm.main(train_argv)
    steer_argv = ["--ckpt", str(folder / "lm" / "codebook.pt"), "--out", str(folder / "steer"), "--topics", ",".join(TOPICS),
                  "--reference_stories", "48", "--samples", "2", "--new_bytes", "6", "--min_precision", "0", "--threads", "1",
                  "--device", "cpu"]
    steer.main(steer_argv)
    return train_argv, trained, steer_argv, json.load(open(folder / "steer" / "results.json"))


def test_each_corpus_is_held_out_on_its_own_with_every_model(pipeline):
    argv, r, _, _ = pipeline
    args = train_lm.settings(argv)
    assert r == json.load(open(os.path.join(args.out, "results.json"))) | {"settings": r["settings"]}
    assert list(r["held_out"]) == ["stories", "reference", "docstrings"]
    model, tok = models.load_with_tokenizer(os.path.join(args.out, "codebook.pt"))
    base, _ = models.load_with_tokenizer(os.path.join(args.out, "base.pt"))
    control, _ = models.load_with_tokenizer(os.path.join(args.out, "finetuned.pt"))
    saes = sae.load_saes(os.path.join(args.out, "sae.pt"))
    _, val_splits, _ = train_lm.load_data(args, tok, 0, 1)
    for corpus, figures in r["held_out"].items():
        windows = train_lm.fixed_windows(val_splits[corpus], args, 0, args.eval_windows, args.block_size + 1)
        for name, m in (("base", base), ("finetuned", control), ("codebook", model)):
            loss, accuracy, _ = runs.evaluate(m, windows)
            assert (figures[f"{name}_val_loss"], figures[f"{name}_val_accuracy"]) == (loss, accuracy), (corpus, name)
        with cb.replace_activations(base, saes):
            assert figures["sae_val_loss"] == runs.evaluate(base, windows)[0]
        assert figures["loss_ratio_finetuned"] == figures["codebook_val_loss"] / figures["finetuned_val_loss"]
        assert set(figures["dead_code_fraction"]) == {f"L{l}.H{h}" for l in range(2) for h in range(4)}
        assert figures["finetuned_val_loss"] < figures["base_val_loss"]  # six steps from random weights: it learns
    assert r["dead_code_fraction"] == r["held_out"]["stories"]["dead_code_fraction"]
    # all corpora together: a code is dead when it fires in no corpus's windows, recounted from the codes
    fired = [set() for _ in range(8)]
    for corpus in r["held_out"]:
        windows = train_lm.fixed_windows(val_splits[corpus], args, 0, args.eval_windows, args.block_size + 1)
        for i, ids in enumerate(cb.record_dataset(model, windows[:, :-1])[0].values()):
            fired[i] |= set(ids.flatten().tolist())
    together = sum(1 - len(codes) / args.num_codes for codes in fired) / 8
    assert r["mean_dead_code_fraction_all_corpora"] == pytest.approx(together)
    assert together <= min(np.mean(list(f["dead_code_fraction"].values())) for f in r["held_out"].values()) + 1e-9


def test_pattern_table_recounted_by_hand(pipeline):
    argv, r, _, _ = pipeline
    args = train_lm.settings(argv)
    assert [row["pattern"] for row in r["patterns"]["patterns"]] == list(patterns.PATTERNS)
    assert [row["pattern"] for row in r["patterns"]["topics"]] == list(patterns.topic_patterns())
    assert r["patterns"]["summary"] == patterns.pattern_summary(r["patterns"]["patterns"])
    model, tok = models.load_with_tokenizer(os.path.join(args.out, "codebook.pt"))
    _, val_splits, _ = train_lm.load_data(args, tok, 0, 1)
    eval_sets = {name: train_lm.fixed_windows(split, args, 0, args.eval_windows, args.block_size + 1)
                 for name, split in val_splits.items()}
    held = train_lm.pattern_text(args, tok, eval_sets)
    assert len(held) > 3 * args.pattern_windows  # LICENSE.txt after the corpora's windows
    masks = patterns.pattern_masks(held, tok, patterns.PATTERNS)
    codes = cb.record_dataset(model, held)[0]
    for row in r["patterns"]["patterns"]:
        assert row["positions"] == int(masks[row["pattern"]].sum())
        if row["code"] is None:
            continue
        address, code = row["code"].rsplit(".", 1)
        fires = (codes[address] == int(code)).any(-1)
        both = sum(bool(f and m) for f, m in zip(fires.flatten().tolist(), masks[row["pattern"]].flatten().tolist()))
        assert row["precision"] == pytest.approx(both / int(fires.sum()))
        assert row["recall"] == pytest.approx(both / row["positions"])
    # the neuron and SAE columns: of the base model and its SAEs (patterns.pattern_table's own test
    # recounts them by hand), not of the codebook model
    base, _ = models.load_with_tokenizer(os.path.join(args.out, "base.pt"))
    saes = sae.load_saes(os.path.join(args.out, "sae.pt"))
    again = patterns.pattern_table(model, held, masks, base=base, saes=saes)
    assert [(row["neuron_precision"], row["sae_precision"]) for row in again] == \
        [(row["neuron_precision"], row["sae_precision"]) for row in r["patterns"]["patterns"]]
    assert any(row["code"] is not None for row in r["patterns"]["patterns"])


def test_pattern_masks_of_a_short_text_counted_by_hand():
    tok = chat_bpe()
    string = 'In 1999 the cat (a tabby) walked. The dog: "if x == 1 or x >= 2" in May.\n'
    tokens = torch.tensor(tok.encode(string))
    masks = patterns.pattern_masks(tokens, tok, patterns.PATTERNS)
    by_hand = {"digit": 6, "year, its last digit": 1, "opening parenthesis": 1, "closing bracket": 1, "newline": 1,
               "capital starting a sentence": 1, "past tense -ed": 1, "the word 'the'": 1, "Python keyword": 1,
               "comparison": 2, "double quote": 2, "month": 1}
    assert {name: int(mask.sum()) for name, mask in masks.items()} == by_hand
    ends = [tok.decode(tokens[:i + 1].tolist()) for i in torch.nonzero(masks["the word 'the'"]).flatten().tolist()]
    assert ends == ["In 1999 the"]  # the merged token " the" holds the target; "The" is another word


def test_steering_by_codes_addition_and_prompting_recounted(pipeline, one_thread):
    _, _, argv, r = pipeline
    args = steer.settings(argv)[0]
    model, tok = models.load_with_tokenizer(args.ckpt)
    assert list(r["topics"]) == TOPICS
    topics = steer.choose_topics(args)
    reference, position_topic = steer.reference_set(args, tok, model.config.block_size, topics)
    ids, masks = cb.record_dataset(model, reference)[0], steer.topic_masks(position_topic, topics)
    unsteered = steer.sample_prompts(model, steer.PROMPTS, args, tok)
    for t, name in enumerate(TOPICS):
        figures, heads = r["topics"][name], {}
        for code in figures["codes"]:
            heads.setdefault(code.rsplit(".", 1)[0], []).append(code)
        with cb.force_codes(model, figures["codes"]):
            steered = steer.sample_prompts(model, steer.PROMPTS, args, tok)
        directions = {a: args.addition_scale * steer.addition_direction(model, a, ids[a], masks[t], model.config.codebooks["attn"].num_codes)
                      for a in heads}
        for a in heads:  # the direction as defined: the head's mean output on the topic's positions minus its mean
            layer, head = model.locate(a)
            outputs = layer.codes[head].detach()[ids[a]].mean(-2)  # (rows, seq, dim): each position's mean of k codes
            want = outputs[masks[t]].mean(0) - outputs.flatten(0, 1).mean(0)
            assert torch.allclose(directions[a], args.addition_scale * want, atol=1e-5)
        with baselines.add_vectors(model, directions):
            added = steer.sample_prompts(model, steer.PROMPTS, args, tok)
        for method, samples in (("base", unsteered), ("steered", steered), ("addition", added)):
            rate, ppl, _ = steer.score(model, tok, samples, topics[name])
            assert (figures[f"hit_rate_{method}"], figures[f"ppl_{method}"]) == (rate, ppl), (name, method)
        request = steer.topic_request(tok, name)
        assert tok.decode(request) == f"<|im_start|>user\nWrite a short story about {name}.<|im_end|>\n<|im_start|>assistant\n"
        asked = steer.sample_prompts(model, steer.PROMPTS, args, tok, request)
        regex = text.topic_regex(text.TOPICS[name]["words"])
        for (tokens, n), prompt in zip(asked, steer.PROMPTS):  # the request cut: BOS + prompt, then the samples
            assert tokens[:, :n].tolist() == [[tok.bos, *tok.encode(prompt)]] * args.samples
            assert tokens.shape[1] == n + args.new_bytes
        texts = [t for tokens, n in asked for t in steer.generated_text(tokens, n, tok)]
        figures = r["topics"][name]
        assert figures["hit_rate_prompting"] == sum(bool(regex.search(t)) for t in texts) / len(texts)
        assert figures["ppl_prompting"] == steer.perplexity(model, asked, steer.ends(tok))
    assert r["mean_hit_rate_prompting"] == np.mean([r["topics"][n]["hit_rate_prompting"] for n in TOPICS])
    # with --regex it asks about the regex's words, or --topic_name
    for given, asked in (([r"\b(sea|ocean)s?\b"], "sea or ocean"), ([r"\bdragons?\b", "--topic_name", "wyrms"], "wyrms")):
        flags = steer.parser.parse_args(["--regex", *given])
        assert steer.asked_about(flags.regex, flags) == asked
    # a byte model has no chat format: the request is a line after BOS
    assert steer.topic_request(text.ByteTokenizer(), "sea") == [text.BOS, *text.encode("Write a short story about sea.\n")]


def test_samples_end_at_the_end_of_a_turn():
    tok = chat_bpe()
    tokens = torch.tensor([[tok.bos, 65, 66, tok.eos, 67], [tok.bos, 65, tok.bos, 66, 67]])
    assert steer.generated_text(tokens, 1, tok) == ["AB", "A"]


def test_both_pages_in_a_browser(pipeline, browser):
    train_argv, trained, steer_argv, steered = pipeline
    browser.get("file://" + os.path.join(train_lm.settings(train_argv).out, "report.html"))
    assert page_errors(browser) == []
    assert count(browser, "section") == 3 and count(browser, "table") == 3
    assert count(browser, "table tbody tr") == 3 + len(patterns.PATTERNS) + len(text.TOPICS)
    browser.get("file://" + os.path.join(steer.parser.parse_args(steer_argv).out, "report.html"))
    assert page_errors(browser) == []
    headers = browser.execute_script("return Array.from(document.querySelectorAll('table')[0].querySelectorAll('th'), th => th.textContent)")
    assert headers.count("prompting") == 2  # its hit rate and perplexity
    assert count(browser, ".topic") == len(TOPICS) and count(browser, ".topic .samples > div") == 4 * len(TOPICS)


def test_a_folder_keeps_the_base_model_its_stages_started_from(pipeline, tmp_path):
    argv = pipeline[0]
    i = argv.index("--init_from")
    other = argv[:i + 1] + [tiny_llama(tmp_path / "other.pt", seed=1)] + argv[i + 2:]
    with pytest.raises(ValueError, match=r"base.pt is the base model of .*tiny.pt, not that of .*other.pt: rerun as before"):
        train_lm.settings(other)
    with pytest.raises(ValueError, match="not one trained here"):
        train_lm.settings(argv[:i] + argv[i + 2:])
    assert train_lm.settings(argv).init_from == argv[i + 1]  # the same base: it goes on
    train_lm.starting_model(train_lm.settings(argv))
    # the same file with other weights in it: the stages there started from the old ones
    kept = open(argv[i + 1], "rb").read()
    try:
        tiny_llama(argv[i + 1], seed=1)
        with pytest.raises(ValueError, match=r"tiny.pt holds other weights than when .*base.pt was made from it"):
            train_lm.starting_model(train_lm.settings(argv))
        tiny_llama(argv[i + 1], block_size=256)  # another shape: refused by its configuration, before any work
        with pytest.raises(ValueError, match=r"tiny.pt gives a model with block_size 256, .*base.pt was made from it with 128"):
            train_lm.starting_model(train_lm.settings(argv))
    finally:
        open(argv[i + 1], "wb").write(kept)


def test_presets_give_defaults_that_flags_override(tmp_path, capsys):
    for ask in ("--help", "--hel", "-h"):
        with pytest.raises(SystemExit):
            train_lm.settings(["--preset", "smollm2", ask])
        shown = " ".join(capsys.readouterr().out.split())
        assert "(default: 1024)" in shown and "(default: out/smollm2)" in shown  # --help shows the preset's defaults
    out = ["--out", str(tmp_path / "out")]
    smollm2 = ["--hf", str(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")]  # read when the run starts, after its settings
    args = train_lm.settings(["--preset", "smollm2", "--codebook_steps", "5"] + smollm2 + out)
    assert (args.codebook_steps, args.num_codes, args.k, args.prose, args.sae, args.patterns) == (5, 1024, 8, "reference,docstrings", True, True)
    assert train_lm.settings(out).num_codes == train_lm.parser.get_default("num_codes")  # the preset left the parser as it was
    assert (train_lm.settings(["--preset", "smollm2-gpu"] + smollm2 + out).num_codes, train_lm.PRESETS["smollm2-gpu"]["k"]) == (10000, 8)
    with pytest.raises(ValueError, match="--prose foo: no such corpus"):
        train_lm.settings(["--prose", "reference,foo"] + out)
