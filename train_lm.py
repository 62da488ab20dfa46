"""
Finetune a language model with per-head attention codebooks (paper section 5).

Stage 1 trains a plain GPT on bytes, or loads one (--init_from), or loads a pretrained model (a family
models.py reads: GPT-2, Pythia, Llama, Qwen, Gemma, OLMo, Phi, ... and mixtures of experts) from a Hugging
Face folder or a GGUF file with its tokenizer (--hf). Stage 2 puts a codebook after every attention head
of every layer (k = 8 of --num_codes codes each), initialises the codes by k-means on the heads' activations, and finetunes the whole model. For the paper's
comparison the base is also finetuned as long without codebooks (the control). The script prints the
models' validation loss and next-token accuracy (bytes, or a pretrained model's tokens), their
ratios and the share of dead codes, and saves OUT/base.pt, OUT/finetuned.pt, OUT/codebook.pt and
OUT/results.json. With --sae it also fits TopK sparse autoencoders (sae.py) post hoc to the base
model's attention heads, with the codebooks' dictionary size and k, and prints the loss with all of
them spliced in beside the codebooks' (OUT/sae.pt).

    python train_lm.py                                  # generated stories, about 18 min on 2 CPU cores
    python train_lm.py --data corpus.txt                # a text file, or a folder of them
    torchrun --nproc_per_node 2 train_lm.py             # DDP, one shard of every batch per process
    python train_lm.py --device cuda                    # GPU, bf16 autocast
    python train_lm.py --hf models/pythia-70m --data corpus.txt   # codebooks on a pretrained model
    python train_lm.py --sae                            # and TopK SAEs on the base model, compared
    python train_lm.py --preset smollm2 --hf SmolLM2-135M-Instruct.Q4_1.gguf   # the real model, about 1 h on 2 cores

With --prose the real prose of text.py (Python's reference text, stdlib docstrings) is mixed into
training (each batch from one corpus in turn) and each held-out part is evaluated on its own.
With --patterns the table of section 4 (patterns.py): per pattern the best code beside the best
neuron and SAE latent, on held-out text of every corpus plus Python's LICENSE.txt (the one text
here with dates: years and months barely occur in the rest, and it is in no training set), and each
topic's words on the held-out stories. OUT/report.html shows the tables.

Tokens are the 256 byte values plus BOS (text.py), so any text works and nothing is downloaded;
with --hf they are the model's BPE tokens (bpe.py), BOS (which separates documents) is the BOS its
tokenizer names (SmolLM2-Instruct's: <|im_start|>), else its <|endoftext|>, and a model whose
tokenizer starts every text with a token (Gemma's <bos>) finds it first in every window. Every
checkpoint holds its tokenizer, so steer.py and models.load_with_tokenizer need nothing else.
Every stage checkpoints as it goes; rerunning the same command resumes where it stopped.
"""
import argparse
import copy
import functools
import os
import sysconfig
import time

import numpy as np
import torch
import torch.distributed as dist

import codebook as cb
import models
import patterns
import report as pages
import runs
import sae
import text

# --preset NAME: other defaults for a set of flags; a flag given on the command line wins over them.
# smollm2: SmolLM2-135M (30 layers x 9 heads) on 2 CPU cores in about an hour: a step of 4 x 128 tokens
# takes ~5-7 s, so 100 steps for the codebook model and as many for the control; 1024 codes per head (with
# 256 the codes are too coarse to name most of the patterns of section 4: README); everything evaluated
# on 32 held-out windows per corpus. The pretrained weights move at 1e-4, the codes, new, at 1e-3, so
# they settle within the few steps. Torch's default threads (one per core); on a CPU shared with other
# jobs, try --threads 1.
PRESETS = {
    "none": {},
    "smollm2": dict(out="out/smollm2", prose="reference,docstrings", stories=2000, block_size=128, batch_size=4,
                    num_codes=1024, k=8, codebook_steps=100, codebook_lr=1e-4, codes_lr=1e-3, revive_every=25, kmeans_windows=32,
                    sae=True, sae_steps=200, sae_windows=32, eval_windows=32, patterns=True, pattern_windows=16),
    "smollm2-gpu": dict(out="out/smollm2-gpu", prose="reference,docstrings", stories=30000, block_size=256, batch_size=32,
                        num_codes=10000, k=8, codebook_steps=2000, codebook_lr=1e-4, codes_lr=1e-3, revive_every=100, kmeans_windows=512,
                        sae=True, sae_steps=2000, sae_windows=512, eval_windows=256, patterns=True, pattern_windows=64),
}


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--preset", choices=list(PRESETS), default="none",
                    help="other defaults for a set of flags (PRESETS in this file); a flag given here wins over its preset")
parser.add_argument("--data", default="", help="text file or folder of text files; empty: generated stories")
parser.add_argument("--include", default="*", help="in a --data folder, read only files matching this glob, e.g. '*.py'")
parser.add_argument("--exclude", default="site-packages,__pycache__,.git", help="in a --data folder, skip folders with these names")
parser.add_argument("--separator", default="<|endoftext|>", help="documents inside a file are cut at this string")
parser.add_argument("--prose", default="", help=f"comma-separated real prose corpora ({', '.join(text.PROSE)}) mixed "
                    "into training, each held-out part evaluated on its own")
parser.add_argument("--stories", type=int, default=30000, help="size of the generated corpus, in stories")
parser.add_argument("--val_fraction", type=float, default=0.05, help="share of documents held out for validation")
parser.add_argument("--out", default="out/lm", help="output folder")
parser.add_argument("--init_from", default="", help="skip stage 1: start from this base checkpoint (no codebooks)")
parser.add_argument("--hf", default="", help="skip stage 1: start from this Hugging Face model folder or GGUF file (a family "
                    "models.FAMILIES names) and its tokenizer; --n_layer, --n_head, --d_model are then the model's")
parser.add_argument("--seed", type=int, default=0, help="seed of the corpus, its split, the initialisation and every batch")
# the model (stage 1)
parser.add_argument("--n_layer", type=int, default=4, help="layers of the GPT trained in stage 1")
parser.add_argument("--n_head", type=int, default=4, help="its attention heads per layer")
parser.add_argument("--d_model", type=int, default=128, help="the width of its residual stream")
parser.add_argument("--block_size", type=int, default=128, help="context length in tokens (with --hf, at most the model's)")
parser.add_argument("--batch_size", type=int, default=32, help="windows per step (per process under torchrun)")
parser.add_argument("--base_steps", type=int, default=2000, help="stage 1's training steps")
parser.add_argument("--base_lr", type=float, default=3e-3, help="stage 1's learning rate")
# the codebooks (stage 2)
parser.add_argument("--num_codes", type=int, default=512, help="codes per head (the paper: 10,000 on a GPU)")
parser.add_argument("--k", type=int, default=8, help="codes active per head and position")
parser.add_argument("--codebook_steps", type=int, default=400, help="stage 2's finetuning steps (and the control's)")
parser.add_argument("--codebook_lr", type=float, default=1e-3, help="stage 2's learning rate (and the control's)")
parser.add_argument("--codes_lr", type=float, default=0.0, help="the codes' and their LayerNorms' own rate in stage 2 (0: --codebook_lr)")
parser.add_argument("--revive_every", type=int, default=100, help="re-initialise unused codes every this many steps (0: never)")
parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                    help="also finetune the base model without codebooks, same steps: the paper's comparison")
parser.add_argument("--kmeans_windows", type=int, default=64, help="training windows for the k-means init, as many from each corpus")
# the SAE comparison
parser.add_argument("--sae", action=argparse.BooleanOptionalAction, default=False,
                    help="also fit TopK SAEs to the base model's attention heads (same dictionary size and k) and splice them in")
parser.add_argument("--sae_steps", type=int, default=400, help="Adam steps of each SAE, 512 cached activations each")
parser.add_argument("--sae_windows", type=int, default=256, help="training windows whose activations the SAEs are fitted to, as many from each corpus")
parser.add_argument("--patterns", action=argparse.BooleanOptionalAction, default=False,
                    help="the pattern table of section 4: best code, neuron and SAE latent per pattern (patterns.py)")
parser.add_argument("--pattern_windows", type=int, default=16, help="held-out windows of each corpus the pattern table reads")
# evaluation and machinery
parser.add_argument("--eval_windows", type=int, default=256, help="fixed validation windows for the final figures")
parser.add_argument("--eval_every", type=int, default=0, help="print a validation loss every this many steps (0: never)")
parser.add_argument("--ckpt_every", type=int, default=100, help="checkpoint every this many steps...")
parser.add_argument("--ckpt_seconds", type=int, default=120, help="...or this many seconds, whichever comes first")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)")


def main(argv=None):
    started = time.time()
    args = settings(argv)
    rank, world = runs.start(args.threads, args.device)
    autocast = torch.bfloat16 if args.device.startswith("cuda") else None
    with runs.one_run_per_folder(args.out):
        pretrained, tokenizer = starting_model(args)
        torch.manual_seed(args.seed)
        # --- data: tokenised once by rank 0, then memory-mapped by every process; fixed evaluation windows per corpus
        train_splits, val_splits, folder = load_data(args, tokenizer, rank, world)
        windows = args.eval_windows, args.block_size + 1
        eval_sets = {name: fixed_windows(split, args, 0, *windows) for name, split in val_splits.items()}
        eval_windows, train_windows = next(iter(eval_sets.values())), fixed_windows(train_splits[0], args, 1, *windows)
        stage1, stage2 = (functools.partial(window_batch, train_splits, args, stage) for stage in (1, 2))

        # --- training; what the batches depend on is in every checkpoint: resuming with another corpus is refused
        common = dict(device=args.device, autocast=autocast, eval_every=args.eval_every, cosine=True,
                      eval_fn=functools.partial(validation, windows=eval_windows[:64], autocast=autocast),
                      ckpt_every=args.ckpt_every, ckpt_seconds=args.ckpt_seconds, ckpt_extra={"tokenizer": tokenizer.to_dict()},
                      settings=dict(data=folder, batch_size=args.batch_size, block_size=args.block_size, seed=args.seed))
        from_scratch = common | {"warmup": min(50, args.base_steps // 10 + 1)}
        finetune = common | {"warmup": min(50, args.codebook_steps // 10 + 1)}
        with_codes = finetune | dict(codebook_lr=args.codes_lr or None, revive_every=args.revive_every,
                                     settings=common["settings"] | {"kmeans": args.kmeans_windows})
        refuse_changed_stages(args, pretrained, from_scratch, finetune, with_codes)
        base = base_model(args, pretrained, tokenizer, stage1, from_scratch, rank)
        control = finetuned_control(args, base, stage2, finetune) if args.control else None
        model = runs.train(codebook_model(args, base, train_splits), stage2, args.codebook_steps, args.codebook_lr,
                           ckpt_path=os.path.join(args.out, "codebook.pt"), desc="stage 2: codebooks", **with_codes)

        # --- evaluate and report (rank 0)
        results = None
        if rank == 0:
            results, saes, sae_seconds = evaluate(args, (base, control, model), eval_sets, train_windows, train_splits, autocast, world)
            report(results, args, model.config, sae_seconds, val_splits)
            if args.patterns:
                results["patterns"] = pattern_tables(args, tokenizer, (base, model, saes), eval_sets)
            runs.save_json(os.path.join(args.out, "results.json"), results)
            print(f"wall time {time.time() - started:.0f} s ({world} process{'es' if world > 1 else ''}); "
                  f"wrote {args.out}/results.json, base.pt, codebook.pt" + (", finetuned.pt" if control else ""))
            print(f"report: {write_page(results, args, runs.command_line('train_lm.py', argv))}")
    runs.end_distributed()
    return results


def settings(argv):
    """The command line, every setting checked before any work."""
    chooser = argparse.ArgumentParser(add_help=False)  # the preset first, so that --help shows its defaults
    chooser.add_argument("--preset", choices=list(PRESETS), default="none")
    with_preset = copy.deepcopy(parser)  # the module's parser stays as it is
    with_preset.set_defaults(**PRESETS[chooser.parse_known_args(argv)[0].preset])
    args = with_preset.parse_args(argv)
    runs.check_settings(args, positive=("stories", "n_layer", "n_head", "d_model", "block_size", "batch_size",
                                        "base_steps", "num_codes", "k", "codebook_steps", "kmeans_windows",
                                        "eval_windows", "ckpt_every", "sae_steps", "sae_windows", "pattern_windows"),
                        non_negative=("revive_every", "eval_every", "threads", "ckpt_seconds", "codes_lr", "seed"),
                        rates=("base_lr", "codebook_lr"))
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val_fraction {args.val_fraction}: a share of documents, strictly between 0 and 1")
    runs.check_device(args.device)
    runs.check_out(args.out)
    cb.check_codebook(args.num_codes, args.k)
    if args.data:
        text.list_files(args.data, args.include, args.exclude.split(","), args.out)  # exists, and holds files to read
    refuse_unused_flags(args, with_preset.parse_args([]))
    if args.patterns and args.pattern_windows > args.eval_windows:
        print(f"note: --pattern_windows {args.pattern_windows}: the pattern table reads the {args.eval_windows} held-out "
              "windows of each corpus there are (--eval_windows)")
    unknown = [name for name in prose_names(args) if name not in text.PROSE]
    if unknown:
        raise ValueError(f"--prose {','.join(unknown)}: no such corpus; choose among {', '.join(text.PROSE)}")
    if text.corpus_name(args.data) in prose_names(args):
        raise ValueError(f"--data {args.data} and --prose {text.corpus_name(args.data)} would be reported under one name: "
                         "rename the folder, or leave that corpus out of --prose")
    base_config(args)  # its own checks
    if args.init_from and args.hf:
        raise ValueError("--init_from and --hf both give the base model: choose one")
    base = os.path.join(args.out, "base.pt")
    if os.path.isfile(base):  # the later stages there started from that base: they must not meet another
        made_from, given = runs.load_checkpoint(base, mmap=True).get("init_from"), args.init_from or args.hf or None
        if (made_from and os.path.realpath(made_from)) != (given and os.path.realpath(given)):
            raise ValueError(f"{base} is the base model {'of ' + made_from if made_from else 'trained there'}, not "
                             f"{'that of ' + given if given else 'one trained here'}: rerun as before, or choose another --out")
    return args


def refuse_unused_flags(args, defaults):
    """A flag set away from its default (`defaults`: the preset's) that would do nothing in this run is one line."""
    if args.init_from or args.hf:
        runs.refuse_unused(args, defaults, ("n_layer", "n_head", "d_model", "base_steps", "base_lr"),
                           "with --init_from or --hf, which give the base model")
    elif args.preset != "none":
        raise ValueError(f"--preset {args.preset} finetunes SmolLM2: give --hf with its GGUF file or folder")
    if not args.sae:
        runs.refuse_unused(args, defaults, ("sae_steps", "sae_windows"), "without --sae")
    if not args.patterns:
        runs.refuse_unused(args, defaults, ("pattern_windows",), "without --patterns")
    if args.data:
        runs.refuse_unused(args, defaults, ("stories",), "with --data, whose text replaces the generated stories")
    else:
        runs.refuse_unused(args, defaults, ("include", "separator", "exclude"), "without --data")


def overlapping(val_split, args):
    """Whether a held-out split is too short for --eval_windows windows that do not overlap."""
    return val_split.num_tokens < args.eval_windows * (args.block_size + 1)


def prose_names(args):
    return [name.strip() for name in args.prose.split(",") if name.strip()]


def base_config(args):
    """The byte model stage 1 trains."""
    return cb.GPTConfig(vocab_size=text.VOCAB_SIZE, block_size=args.block_size, n_layer=args.n_layer,
                        n_head=args.n_head, d_model=args.d_model, d_mlp=4 * args.d_model)


def starting_model(args):
    """(the base model of --init_from or --hf, on --device, or None: trained here; its tokenizer), checked."""
    base, tokenizer = given_model(args)
    made_here = os.path.join(args.out, "base.pt")
    if base is not None and os.path.isfile(made_here):  # the later stages there started from what that file held then
        state, given = runs.load_checkpoint(made_here, mmap=True), args.init_from or args.hf
        before, now = runs.saved_config(state["config"]), base.config.to_dict()
        changed = [key for key in now if before.get(key) != now[key]]  # another --block_size, or another file
        if changed:
            raise ValueError(f"{given} gives a model with {changed[0]} {now[changed[0]]!r}, {made_here} was made from it "
                             f"with {before.get(changed[0])!r}: rerun with the settings and model as they were, or choose another --out")
        if any(not torch.equal(state["model"][name], p.cpu()) for name, p in base.state_dict().items()):
            raise ValueError(f"{given} holds other weights than when {made_here} was made from it: "
                             "rerun with the model as it was, or choose another --out")
    return base, tokenizer


def given_model(args):
    """starting_model's model and tokenizer, before they are compared with the folder's base.pt."""
    if args.init_from:
        base, tokenizer = models.load_with_tokenizer(args.init_from, args.device)
        if base.codebook_layers():
            raise ValueError(f"--init_from {args.init_from} already has codebooks: give a base model")
        if base.config.block_size < args.block_size:
            raise ValueError(f"--init_from {args.init_from} has block_size {base.config.block_size} < --block_size {args.block_size}")
        return base, tokenizer
    if args.hf:
        try:
            base, tokenizer = models.load_pretrained(args.hf, block_size=args.block_size)
        except ValueError as e:
            raise ValueError(f"--hf {args.hf}: {e}") from None
        if tokenizer.bos is None:
            raise ValueError(f"--hf {args.hf}: its tokenizer has no BOS (nor <|endoftext|>) to separate documents with")
        return base.to(args.device), tokenizer
    return None, text.ByteTokenizer()


def load_data(args, tokenizer, rank, world):
    """([train splits], {corpus name: validation split}, a name for them all): the corpus and the --prose
    corpora, each tokenised once into OUT/data/ by rank 0, then memory-mapped by every process."""
    if rank != 0:
        dist.barrier()  # rank 0 has tokenised them
    trained = ["base.pt", "codebook.pt"] + (["finetuned.pt"] if args.control else [])  # the stages this run goes on from
    new_corpus = functools.partial(refuse_new_corpus, args.out, trained)
    train_split, val_split, folder = text.prepare_data(args.data, args.out, args.val_fraction, args.seed, args.stories,
                                                       args.include, args.separator, args.block_size,
                                                       args.exclude.split(","), tokenizer, new_corpus)
    splits = {text.corpus_name(args.data): (train_split, val_split, folder)}
    splits |= {name: text.prepare_prose(name, args.out, args.block_size, tokenizer, before_tokenising=new_corpus)
               for name in prose_names(args)}
    if rank == 0 and world > 1:
        dist.barrier()
    if rank == 0:
        for name, (train, val, where) in splits.items():
            print(f"data: {name} -> {where}: {len(train.data) / 1e6:.2f} M tokens train, {len(val.data) / 1e6:.2f} M "
                  f"held out ({tokenizer.kind})")
            if overlapping(val, args):
                print(f"note: {name}'s held-out split holds {val.num_tokens} tokens, fewer than {args.eval_windows} windows "
                      f"of {args.block_size + 1}: they overlap, so its figures count tokens more than once (give more "
                      "text, or fewer --eval_windows)")
    return ([train for train, _, _ in splits.values()], {name: val for name, (_, val, _) in splits.items()},
            "+".join(os.path.basename(where) for _, _, where in splits.values()))


def refuse_new_corpus(out, stages, folder):
    """Before a corpus is tokenised into `folder`: a stage checkpointed in `out` on other data refuses it
    now, as runs.train would at that checkpoint, but before the tokenising."""
    for path in [os.path.join(out, stage) for stage in stages if os.path.isfile(os.path.join(out, stage))]:
        data = runs.load_checkpoint(path, mmap=True).get("run", {}).get("settings", {}).get("data")
        # data: the corpora's folders joined by "+", which a name may hold too: a corpus missed here is refused by
        # runs.train at the checkpoint, after tokenising; one taken for missing would refuse a run that is right
        if data is not None and f"+{os.path.basename(folder)}+" not in f"+{data}+":
            raise ValueError(f"{path} was trained with other settings (settings.data: {data!r} in the checkpoint, "
                             f"{os.path.basename(folder)!r} among the corpora now): rerun with the checkpoint's "
                             "settings, or choose another output folder")


def window_batch(splits, args, stage, i, rank, world):
    """Micro-batch i of a stage: random windows of one training split (the corpora in turn), a different
    draw on every process."""
    rng = np.random.default_rng([args.seed, stage, i, rank])
    windows = splits[i % len(splits)].random_windows(rng, args.batch_size, args.block_size + 1)
    return windows[:, :-1], windows[:, 1:]


def fixed_windows(split, args, which, count, length):
    """`count` windows of `length` tokens of a split, the same in every run with --seed, apart from
    every batch: which=0 the validation windows, 1 the training loss's, 2 k-means', 3 the SAEs'."""
    return split.random_windows(np.random.default_rng([args.seed, 10**9 + which]), count, length)


def every_corpus_windows(splits, args, which, count):
    """About `count` fixed windows (fixed_windows) of block_size tokens, as many from each training corpus:
    what k-means and the SAEs are fitted to must cover every kind of text the model is finetuned on."""
    per_corpus = -(-count // len(splits))
    return torch.cat([fixed_windows(split, args, which, per_corpus, args.block_size) for split in splits])


def validation(model, windows, autocast):
    """What training prints every --eval_every steps."""
    loss, accuracy, _ = runs.evaluate(model, windows, autocast=autocast)
    return {"val_loss": loss, "val_acc": accuracy}


def base_model(args, pretrained, tokenizer, get_batch, from_scratch, rank):
    """Stage 1: the base model trained here, or the one given (--init_from, --hf) kept as OUT/base.pt."""
    path = os.path.join(args.out, "base.pt")
    if pretrained is None:
        return runs.train(cb.GPT(base_config(args)), get_batch, args.base_steps, args.base_lr, ckpt_path=path,
                          desc="stage 1: base", **from_scratch)
    if rank == 0:
        runs.save_checkpoint(path, pretrained, step=0, init_from=os.path.realpath(args.init_from or args.hf),
                             tokenizer=tokenizer.to_dict())
    return pretrained


def finetuned_control(args, base, get_batch, finetune):
    """The paper's comparison (section 5): the base finetuned without codebooks, as long as stage 2."""
    control = type(base)(base.config).to(args.device)
    control.load_state_dict(base.state_dict())
    return runs.train(control, get_batch, args.codebook_steps, args.codebook_lr, desc="control: no codebooks",
                      ckpt_path=os.path.join(args.out, "finetuned.pt"), **finetune)


def refuse_changed_stages(args, pretrained, from_scratch, finetune, with_codes):
    """Each stage's checkpoint made with other settings is refused before any stage trains (a base.pt
    of --init_from or --hf is starting_model's to check)."""
    base = pretrained.config if pretrained is not None else base_config(args)
    stage = functools.partial(os.path.join, args.out)
    if pretrained is None:
        runs.check_stage(stage("base.pt"), base.to_dict(), args.base_steps, args.base_lr, **from_scratch)
    if args.control:
        runs.check_stage(stage("finetuned.pt"), base.to_dict(), args.codebook_steps, args.codebook_lr, **finetune)
    coded = type(base)(**base.to_dict() | {"codebooks": codebooks(args)}).to_dict()
    runs.check_stage(stage("codebook.pt"), coded, args.codebook_steps, args.codebook_lr, **with_codes)


def codebooks(args):
    """Stage 2's codebooks: one after every attention head."""
    return {"attn": {"num_codes": args.num_codes, "k": args.k, "layers": None}}


def codebook_model(args, base, train_splits):
    """Stage 2's start (section 3.2): the base with a codebook after every attention head, initialised
    by k-means on training windows of every corpus."""
    torch.manual_seed(args.seed)  # the same k-means start on every process
    model = cb.with_codebooks(base, codebooks(args))
    kmeans_tokens = every_corpus_windows(train_splits, args, 2, args.kmeans_windows)
    cb.init_codebooks_kmeans(model, kmeans_tokens.to(model.head.weight.device))
    return model


def held_out(models_by_name, windows, autocast):
    """({"<name>_val_loss", "<name>_val_accuracy"} of each model (None: skipped) on windows, the dead codes
    {codebook: share} of the one named "codebook" or None)."""
    figures, dead = {}, None
    for name, model in models_by_name.items():
        if model is not None:
            loss, accuracy, model_dead = runs.evaluate(model, windows, autocast=autocast)
            figures |= {f"{name}_val_loss": loss, f"{name}_val_accuracy": accuracy}
            dead = model_dead if name == "codebook" else dead
    return figures, dead


def evaluate(args, trained, eval_sets, train_windows, train_splits, autocast, world):
    """Every figure of the table for the trained (base, control or None, codebook model) on each held-out
    set, for results.json (with --sae, the SAEs fitted first, to windows of every training corpus);
    returns (results, the SAEs or None, the seconds they took)."""
    base, control, model = trained
    saes, sae_seconds = None, 0.0
    if args.sae:  # TopK SAEs fitted post hoc to the base's heads, every one spliced in at once
        started = time.time()
        sae_tokens = every_corpus_windows(train_splits, args, 3, args.sae_windows)
        saes = sae.fit_saes(os.path.join(args.out, "sae.pt"), base, sae_tokens, sae.codebook_sizes(model),
                            steps=args.sae_steps, seed=args.seed)
        sae_seconds = time.time() - started
    per_set = {}
    for name, windows in eval_sets.items():
        per_set[name], dead = held_out({"base": base, "finetuned": control, "codebook": model}, windows, autocast)
        if saes is not None:
            with cb.replace_activations(base, saes):
                per_set[name] |= held_out({"sae": base}, windows, autocast)[0]
        figures = per_set[name]
        figures |= {f"{ratio}": figures[f"{of}_val_loss"] / figures[f"{to}_val_loss"] for ratio, of, to in
                    (("loss_ratio", "codebook", "base"), ("loss_ratio_finetuned", "codebook", "finetuned"),
                     ("sae_loss_ratio", "sae", "base")) if f"{of}_val_loss" in figures and f"{to}_val_loss" in figures}
        figures["dead_code_fraction"] = dead
    first = next(iter(eval_sets))
    shape = {name: getattr(base.config, name) for name in ("n_layer", "n_head", "d_model")}  # --hf's, not the flags'
    results = per_set[first] | {"base_train_loss": runs.evaluate(base, train_windows, autocast=autocast)[0],
                                "held_out": per_set, "processes": world, "data": args.data or "generated stories",
                                "settings": vars(args) | shape,
                                "history": {"base": getattr(base, "history", []), "codebook": model.history}}
    results["mean_dead_code_fraction"] = float(np.mean(list(results["dead_code_fraction"].values())))
    if len(eval_sets) > 1:  # a code the model uses on one corpus only is alive: dead = fires on no held-out window
        ids, _ = cb.record_dataset(model, torch.cat([windows[:, :-1] for windows in eval_sets.values()]), batch_size=32)
        results["mean_dead_code_fraction_all_corpora"] = float(np.mean(
            [cb.dead_share(cb.count_codes(i, args.num_codes)).item() for i in ids.values()]))
    if saes is not None:
        latents = sae.record_latents(base, saes, eval_sets[first][:, :-1])
        results["sae_dead_latent_fraction"] = {a: sae.dead_fraction(ids, args.num_codes) for a, ids in latents.items()}
    return results, saes, sae_seconds


def pattern_tables(args, tokenizer, models_and_saes, eval_sets):
    """Section 4's table (patterns.py), printed: the 12 patterns on --pattern_windows held-out windows of
    every corpus and Python's LICENSE.txt, and each topic's words on the held-out stories (generated
    corpus only). Returns {"patterns": rows, "topics": rows or absent, "summary": counts}."""
    base, model, saes = models_and_saes
    held = pattern_text(args, tokenizer, eval_sets)
    tables = {"patterns": patterns.pattern_table(model, held, patterns.pattern_masks(held, tokenizer, patterns.PATTERNS),
                                                 base=base, saes=saes)}
    patterns.print_pattern_table(tables["patterns"], f"patterns ({held.numel()} tokens)")
    if not args.data:
        stories = eval_sets["stories"][:, :-1]
        tables["topics"] = patterns.pattern_table(model, stories, patterns.pattern_masks(stories, tokenizer, patterns.topic_patterns()),
                                                  base=base, saes=saes)
        patterns.print_pattern_table(tables["topics"], f"topic words ({stories.numel()} tokens)")
    return tables | {"summary": patterns.pattern_summary(tables["patterns"])}


def pattern_text(args, tokenizer, eval_sets):
    """The pattern table's tokens (rows, block_size): --pattern_windows held-out windows of each corpus,
    then Python's LICENSE.txt."""
    return torch.cat([windows[:args.pattern_windows, :-1] for windows in eval_sets.values()]
                     + [license_rows(tokenizer, args.block_size)])


def license_rows(tokenizer, block_size):
    """Python's LICENSE.txt (its history table holds most years and months of this Python's texts) as
    rows of block_size tokens, each starting with BOS; none where this Python lacks the file."""
    path = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    if not os.path.exists(path):
        return torch.zeros(0, block_size, dtype=torch.long)
    ids = tokenizer.encode(open(path, encoding="utf-8", errors="replace").read())
    step = block_size - 1
    return torch.tensor([[tokenizer.bos, *ids[i:i + step]] for i in range(0, len(ids) - step + 1, step)], dtype=torch.long)


LOSS_COLUMNS = [("base", "base"), ("finetuned", "finetuned"), ("codebooks", "codebook"), ("SAEs", "sae")]


def report(r, args, config, sae_seconds, val_splits):
    """The tables README shows, one per held-out corpus; `config` the codebook model's."""
    for corpus, figures in r["held_out"].items():
        columns = [(name, figures[f"{key}_val_loss"], figures[f"{key}_val_accuracy"])
                   for name, key in LOSS_COLUMNS if f"{key}_val_loss" in figures]
        print(f"\nheld out, {corpus}: {args.eval_windows} windows x {args.block_size} tokens = "
              f"{args.eval_windows * args.block_size} next-token predictions" +
              (f" (overlapping: the split holds {val_splits[corpus].num_tokens} tokens)" if overlapping(val_splits[corpus], args) else ""))
        print(f"{'':30s}" + "".join(f"{name:>12s}" for name, _, _ in columns))
        print(f"{'val loss (nats/token)':30s}" + "".join(f"{loss:12.4f}" for _, loss, _ in columns))
        print(f"{'val next-token accuracy':30s}" + "".join(f"{acc:12.2%}" for _, _, acc in columns))
        print(f"loss ratio codebooks / base       {figures['loss_ratio']:.3f}")
        if "sae_loss_ratio" in figures:
            print(f"loss ratio SAEs / base            {figures['sae_loss_ratio']:.3f}   (TopK SAEs of the frozen base spliced "
                  f"in at every head, {args.num_codes} latents, k={args.k}; fitted in {sae_seconds:.0f} s)")
        if "loss_ratio_finetuned" in figures:
            print(f"loss ratio codebooks / finetuned  {figures['loss_ratio_finetuned']:.3f}   (paper, Pythia-410M: 2.74 / 2.41 = 1.14)")
        print(f"dead codes                        {np.mean(list(figures['dead_code_fraction'].values())):.2%} mean")
    print(f"\ntrain loss of the base (nats/token) {r['base_train_loss']:.4f}")
    dead = r["dead_code_fraction"]
    print(f"dead codes                        {r['mean_dead_code_fraction']:.2%} mean over {len(dead)} codebooks of "
          f"{args.num_codes} codes, k={args.k}, on the first corpus's held-out windows")
    if "mean_dead_code_fraction_all_corpora" in r:
        print(f"dead codes                        {r['mean_dead_code_fraction_all_corpora']:.2%} mean, counted on the "
              f"held-out windows of all {len(r['held_out'])} corpora together (dead: fires on none of them)")
    for layer in range(config.n_layer):
        print(f"  L{layer}: " + "  ".join(f"H{h} {dead[f'L{layer}.H{h}']:6.1%}" for h in range(config.n_head)))
    if "sae_dead_latent_fraction" in r:
        sae_dead = r["sae_dead_latent_fraction"]
        print(f"dead SAE latents                  {np.mean(list(sae_dead.values())):.2%} mean over {len(sae_dead)} SAEs, "
              "on the first corpus's held-out windows")


def write_page(r, args, command):
    """OUT/report.html: the held-out table of every corpus and the pattern tables; `command` under the title.
    Returns its path."""
    rows = []
    for corpus, figures in r["held_out"].items():
        keys = [key for _, key in LOSS_COLUMNS if f"{key}_val_loss" in figures]
        rows.append([corpus] + [f"{figures[f'{key}_val_loss']:.4f}" for key in keys]
                    + [pages.pct(figures[f"{key}_val_accuracy"], 2) for key in keys]
                    + [f"{figures.get('loss_ratio_finetuned', figures['loss_ratio']):.3f}",
                       pages.pct(float(np.mean(list(figures["dead_code_fraction"].values()))), 2)])
    names = [name for name, key in LOSS_COLUMNS if f"{key}_val_loss" in r]
    ratio = "codebooks / finetuned" if "finetuned" in names else "codebooks / base"
    sections = [pages.section("Held-out loss", pages.table(rows, ["corpus", *names, *names, ratio, "dead codes"],
                                                            groups=[("", 1), ("loss (nats/token)", len(names)),
                                                                    ("next-token accuracy", len(names)), ("", 2)]),
                              note=f"Each corpus's held-out windows; {ratio}: the codebook model's loss over the "
                                   + ("model finetuned as long without codebooks." if "finetuned" in names else "base model's.")
                                   + (f" Dead codes on all corpora's held-out windows together (dead: fires on none): "
                                      f"{pages.pct(r['mean_dead_code_fraction_all_corpora'], 2)}."
                                      if "mean_dead_code_fraction_all_corpora" in r else ""))]
    for name, title in (("patterns", "Patterns"), ("topics", "Topic words")):
        if name in r.get("patterns", {}):
            sections.append(pages.section(title, pattern_rows_table(r["patterns"][name]), note=(
                "Per pattern the most precise code firing on at least 10% of its positions (section 4), and at that "
                "recall the precision of the best neuron and of the best SAE latent.")))
    return pages.write(os.path.join(args.out, "report.html"), f"Codebook LM: {args.hf or args.init_from or 'byte model'}",
                       sections, subtitle=f"{command}; figures in results.json")


def pattern_rows_table(rows):
    """A pattern table (patterns.pattern_table's rows) as an HTML table."""
    cell = lambda value: "" if value is None else pages.pct(value, 2)  # as the printed table
    return pages.table([[r["pattern"], r["positions"], r["code"] or "-", cell(r["precision"]), cell(r["recall"]),
                         r.get("neuron", ""), cell(r.get("neuron_precision")), r.get("sae", ""), cell(r.get("sae_precision"))]
                        for r in rows], ["pattern", "positions", "code", "precision", "recall", "neuron", "precision",
                                         "SAE latent", "precision"])


if __name__ == "__main__":
    runs.run_main(main)
