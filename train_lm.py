"""
Finetune a language model with per-head attention codebooks (paper section 5).

Stage 1 trains a plain GPT on bytes, or loads one (--init_from), or loads a pretrained model (GPT-2,
GPT-Neo, GPT-NeoX, Llama, Qwen2, Qwen3) from a Hugging Face folder or a GGUF file with its tokenizer
(--hf, models.py). Stage 2 puts a codebook after
every attention head of every layer (k = 8 of --num_codes codes each), initialises the codes by
k-means on the heads' activations, and finetunes the whole model. For the paper's comparison the
base is also finetuned as long without codebooks (the control). The script prints the models'
validation loss and next-byte accuracy, their ratios and the share of dead codes, and saves
OUT/base.pt, OUT/finetuned.pt, OUT/codebook.pt and OUT/results.json. With --sae it also fits TopK
sparse autoencoders (sae.py) post hoc to the base model's attention heads, with the codebooks'
dictionary size and k, and prints the loss with all of them spliced in beside the codebooks'
(OUT/sae.pt).

    python train_lm.py                                  # generated stories, about 18 min on 2 CPU cores
    python train_lm.py --data corpus.txt                # a text file, or a folder of them
    torchrun --nproc_per_node 2 train_lm.py             # DDP, one shard of every batch per process
    python train_lm.py --device cuda                    # GPU, bf16 autocast
    python train_lm.py --hf models/pythia-70m --data corpus.txt   # codebooks on a pretrained model
    python train_lm.py --sae                            # and TopK SAEs on the base model, compared

Tokens are the 256 byte values plus BOS (text.py), so any text works and nothing is downloaded;
with --hf they are the model's BPE tokens (bpe.py), and BOS is its end-of-text token. Every
checkpoint holds its tokenizer, so steer.py and models.load_with_tokenizer need nothing else.
Every stage checkpoints as it goes; rerunning the same command resumes where it stopped.
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import codebook
import models
import runs
import sae
import text


@torch.no_grad()
def evaluate(model, windows, batch_size=32, autocast=None):
    """Mean cross-entropy (nats/token), next-token accuracy and {codebook address: dead fraction}."""
    model.eval()
    device = model.head.weight.device
    loss_sum, correct, count, usage = 0.0, 0, 0, {}
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device.type, dtype=autocast) if autocast else torch.no_grad():
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
        for address, ids in codebook.record_codes(model).items():
            num_codes = model.locate(address)[0].num_codes
            usage[address] = usage.get(address, 0) + codebook.count_codes(ids.cpu(), num_codes)
    dead = {a: (counts == 0).float().mean().item() for a, counts in usage.items()}
    return loss_sum / count, correct / count, dead


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--data", default="", help="text file or folder of text files; empty: generated stories")
parser.add_argument("--include", default="*", help="in a --data folder, read only files matching this glob, e.g. '*.py'")
parser.add_argument("--exclude", default="site-packages,__pycache__,.git", help="in a --data folder, skip folders with these names")
parser.add_argument("--separator", default="<|endoftext|>", help="documents inside a file are cut at this string")
parser.add_argument("--stories", type=int, default=30000, help="size of the generated corpus, in stories")
parser.add_argument("--val_fraction", type=float, default=0.05, help="share of documents held out for validation")
parser.add_argument("--out", default="out/lm", help="output folder")
parser.add_argument("--init_from", default="", help="skip stage 1: start from this base checkpoint (no codebooks)")
parser.add_argument("--hf", default="", help="skip stage 1: start from this Hugging Face model folder or GGUF file (GPT-2, "
                    "GPT-Neo, GPT-NeoX, Llama, Qwen2, Qwen3) and its tokenizer; --n_layer, --n_head, --d_model are then the model's")
parser.add_argument("--seed", type=int, default=0)
# the model (stage 1)
parser.add_argument("--n_layer", type=int, default=4)
parser.add_argument("--n_head", type=int, default=4)
parser.add_argument("--d_model", type=int, default=128)
parser.add_argument("--block_size", type=int, default=128, help="context length in tokens (with --hf, at most the model's)")
parser.add_argument("--batch_size", type=int, default=32, help="windows per step (per process under torchrun)")
parser.add_argument("--base_steps", type=int, default=2000)
parser.add_argument("--base_lr", type=float, default=3e-3)
# the codebooks (stage 2)
parser.add_argument("--num_codes", type=int, default=512, help="codes per head (the paper: 10,000 on a GPU)")
parser.add_argument("--k", type=int, default=8, help="codes active per head and position")
parser.add_argument("--codebook_steps", type=int, default=400)
parser.add_argument("--codebook_lr", type=float, default=1e-3)
parser.add_argument("--revive_every", type=int, default=100, help="re-initialise unused codes every this many steps (0: never)")
parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                    help="also finetune the base model without codebooks, same steps: the paper's comparison")
parser.add_argument("--kmeans_windows", type=int, default=64, help="training windows for the k-means init")
# the SAE comparison
parser.add_argument("--sae", action=argparse.BooleanOptionalAction, default=False,
                    help="also fit TopK SAEs to the base model's attention heads (same dictionary size and k) and splice them in")
parser.add_argument("--sae_steps", type=int, default=400, help="Adam steps of each SAE, 512 cached activations each")
parser.add_argument("--sae_windows", type=int, default=256, help="training windows whose activations the SAEs are fitted to")
# evaluation and machinery
parser.add_argument("--eval_windows", type=int, default=256, help="fixed validation windows for the final figures")
parser.add_argument("--eval_every", type=int, default=0, help="print a validation loss every this many steps (0: never)")
parser.add_argument("--ckpt_every", type=int, default=100, help="checkpoint every this many steps...")
parser.add_argument("--ckpt_seconds", type=int, default=120, help="...or this many seconds, whichever comes first")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)")


def main(argv=None):
    # --- settings, all checked before any work
    args = parser.parse_args(argv)
    t0 = time.time()
    runs.check_settings(args, positive=("stories", "n_layer", "n_head", "d_model", "block_size", "batch_size",
                                        "base_steps", "num_codes", "k", "codebook_steps", "kmeans_windows",
                                        "eval_windows", "ckpt_every", "sae_steps", "sae_windows"),
                        non_negative=("revive_every", "eval_every", "threads", "ckpt_seconds"),
                        rates=("base_lr", "codebook_lr"))
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val_fraction {args.val_fraction}: a share of documents, strictly between 0 and 1")
    runs.check_device(args.device)
    runs.check_out(args.out)
    codebook.check_codebook(args.num_codes, args.k)
    if args.data and not os.path.exists(args.data):
        raise ValueError(f"data path {args.data} does not exist")
    base_config = codebook.GPTConfig(vocab_size=text.VOCAB_SIZE, block_size=args.block_size, n_layer=args.n_layer,
                                     n_head=args.n_head, d_model=args.d_model, d_mlp=4 * args.d_model)
    tokenizer = text.ByteTokenizer()
    if args.init_from and args.hf:
        raise ValueError("--init_from and --hf both give the base model: choose one")
    if args.init_from:
        base, tokenizer = models.load_with_tokenizer(args.init_from, args.device)
        if base.codebook_layers():
            raise ValueError(f"--init_from {args.init_from} already has codebooks: give a base model")
        if base.config.block_size < args.block_size:
            raise ValueError(f"--init_from {args.init_from} has block_size {base.config.block_size} < --block_size {args.block_size}")
    if args.hf:
        try:
            base, tokenizer = models.load_pretrained(args.hf, block_size=args.block_size)
        except ValueError as e:
            raise ValueError(f"--hf {args.hf}: {e}") from None
        if tokenizer.bos is None:
            raise ValueError(f"--hf {args.hf}: its tokenizer has no <|endoftext|> token to separate documents with")
        base = base.to(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = codebook.distributed("nccl" if args.device.startswith("cuda") else "gloo")
    say = print if rank == 0 else (lambda *a, **k: None)
    autocast = torch.bfloat16 if args.device.startswith("cuda") else None
    torch.manual_seed(args.seed)

    # --- data: tokenised once by rank 0, then memory-mapped by every process
    def prepare():
        return text.prepare_data(args.data, args.out, args.val_fraction, args.seed, args.stories, args.include,
                                 args.separator, args.block_size, args.exclude.split(","), tokenizer)
    if rank == 0:
        train_split, val_split, folder = prepare()
    if world > 1:
        dist.barrier()
    if rank != 0:
        train_split, val_split, folder = prepare()
    say(f"data: {args.data or f'{args.stories} generated stories'} -> {folder}: "
        f"{len(train_split.data) / 1e6:.2f} M tokens train, {len(val_split.data) / 1e6:.2f} M validation ({tokenizer.kind})")

    def batches(stage):
        def get_batch(i, rank, world):
            """Micro-batch i of a stage: random windows, a different draw on every process."""
            rng = np.random.default_rng([args.seed, stage, i, rank])
            windows = train_split.random_windows(rng, args.batch_size, args.block_size + 1)
            return windows[:, :-1], windows[:, 1:]
        return get_batch

    eval_windows = val_split.random_windows(np.random.default_rng([args.seed, 10**9]), args.eval_windows, args.block_size + 1)
    train_windows = train_split.random_windows(np.random.default_rng([args.seed, 10**9 + 1]), args.eval_windows, args.block_size + 1)

    def eval_fn(model, step):
        loss, acc, _ = evaluate(model, eval_windows[:64], autocast=autocast)
        return {"val_loss": loss, "val_acc": acc}

    # what the batches depend on: resuming with another corpus or batch shape is refused
    data_settings = dict(data=os.path.basename(folder), batch_size=args.batch_size, block_size=args.block_size, seed=args.seed)
    common = dict(device=args.device, autocast=autocast, eval_fn=eval_fn, eval_every=args.eval_every, cosine=True,
                  ckpt_every=args.ckpt_every, ckpt_seconds=args.ckpt_seconds, settings=data_settings,
                  ckpt_extra={"tokenizer": tokenizer.to_dict()})
    finetune = common | {"warmup": min(50, args.codebook_steps // 10 + 1)}

    # --- stage 1: the base model, trained here or loaded
    if args.init_from or args.hf:
        if rank == 0:
            codebook.save_checkpoint(os.path.join(args.out, "base.pt"), base, step=0, init_from=args.init_from or args.hf,
                                     tokenizer=tokenizer.to_dict())
    else:
        base = codebook.train(codebook.GPT(base_config), batches(1), args.base_steps, args.base_lr,
                              ckpt_path=os.path.join(args.out, "base.pt"), desc="stage 1: base",
                              warmup=min(50, args.base_steps // 10 + 1), **common)

    # --- the control (the paper's comparison, section 5): the base finetuned without codebooks, as long
    control = None
    if args.control:
        control = type(base)(base.config).to(args.device)
        control.load_state_dict(base.state_dict())
        control = codebook.train(control, batches(2), args.codebook_steps, args.codebook_lr, desc="control: no codebooks",
                                 ckpt_path=os.path.join(args.out, "finetuned.pt"), **finetune)

    # --- stage 2: per-head attention codebooks in every layer, k-means init, finetune (section 3.2)
    torch.manual_seed(args.seed)  # the same k-means start on every process
    model = codebook.with_codebooks(base, {"attn": {"num_codes": args.num_codes, "k": args.k, "layers": None}})
    kmeans_tokens = train_split.random_windows(np.random.default_rng([args.seed, 10**9 + 2]),
                                               args.kmeans_windows, args.block_size)
    codebook.init_codebooks_kmeans(model, kmeans_tokens.to(model.head.weight.device))
    model = codebook.train(model, batches(2), args.codebook_steps, args.codebook_lr, revive_every=args.revive_every,
                           ckpt_path=os.path.join(args.out, "codebook.pt"), desc="stage 2: codebooks", **finetune)

    # --- evaluate and report (rank 0)
    results = None
    if rank == 0:
        base_loss, base_acc, _ = evaluate(base, eval_windows, autocast=autocast)
        base_train_loss, _, _ = evaluate(base, train_windows, autocast=autocast)
        columns = [("base", base_loss, base_acc)]
        if control is not None:
            control_loss, control_acc, _ = evaluate(control, eval_windows, autocast=autocast)
            columns.append(("finetuned", control_loss, control_acc))
        cb_loss, cb_acc, dead = evaluate(model, eval_windows, autocast=autocast)
        columns.append(("codebooks", cb_loss, cb_acc))
        ratio, mean_dead = cb_loss / base_loss, float(np.mean(list(dead.values())))
        if args.sae:  # TopK SAEs fitted post hoc to the base's heads, every one spliced in at once
            started = time.time()
            sizes = sae.codebook_sizes(model)
            sae_tokens = train_split.random_windows(np.random.default_rng([args.seed, 10**9 + 3]), args.sae_windows, args.block_size)
            saes = sae.fit_saes(os.path.join(args.out, "sae.pt"), base, sae_tokens, sizes, steps=args.sae_steps, seed=args.seed)
            sae_seconds = time.time() - started
            with codebook.replace_activations(base, saes):
                sae_loss, sae_acc, _ = evaluate(base, eval_windows, autocast=autocast)
            latents = sae.record_latents(base, saes, eval_windows[:, :-1])
            sae_dead = {a: sae.dead_fraction(ids, args.num_codes) for a, ids in latents.items()}
            columns.append(("SAEs", sae_loss, sae_acc))

        print(f"\nvalidation: {len(eval_windows)} windows x {args.block_size} tokens = "
              f"{len(eval_windows) * args.block_size} next-token predictions")
        print(f"{'':30s}" + "".join(f"{name:>12s}" for name, _, _ in columns))
        print(f"{'val loss (nats/token)':30s}" + "".join(f"{loss:12.4f}" for _, loss, _ in columns))
        print(f"{'val next-token accuracy':30s}" + "".join(f"{acc:12.2%}" for _, _, acc in columns))
        print(f"{'train loss (nats/token)':30s}{base_train_loss:12.4f}")
        print(f"loss ratio codebooks / base       {ratio:.3f}")
        if args.sae:
            print(f"loss ratio SAEs / base            {sae_loss / base_loss:.3f}   (TopK SAEs of the frozen base spliced in at every head, "
                  f"{args.num_codes} latents, k={args.k}; fitted in {sae_seconds:.0f} s)")
        if control is not None:
            print(f"loss ratio codebooks / finetuned  {cb_loss / control_loss:.3f}   (paper, Pythia-410M: 2.74 / 2.41 = 1.14)")
        print(f"dead codes                        {mean_dead:.2%} mean over {len(dead)} codebooks of {args.num_codes} "
              f"codes, k={args.k}, on the validation windows")
        for layer in range(model.config.n_layer):
            print(f"  L{layer}: " + "  ".join(f"H{h} {dead[f'L{layer}.H{h}']:6.1%}" for h in range(model.config.n_head)))
        if args.sae:
            print(f"dead SAE latents                  {np.mean(list(sae_dead.values())):.2%} mean over {len(sae_dead)} SAEs, "
                  "on the validation windows")

        results = {"base_val_loss": base_loss, "codebook_val_loss": cb_loss, "loss_ratio": ratio,
                   "base_val_accuracy": base_acc, "codebook_val_accuracy": cb_acc, "base_train_loss": base_train_loss,
                   "dead_code_fraction": dead, "mean_dead_code_fraction": mean_dead, "processes": world,
                   "data": args.data or "generated stories", "settings": vars(args),
                   "history": {"base": getattr(base, "history", []), "codebook": model.history}}
        if args.sae:
            results |= {"sae_val_loss": sae_loss, "sae_val_accuracy": sae_acc, "sae_loss_ratio": sae_loss / base_loss,
                        "sae_dead_latent_fraction": sae_dead}
        if control is not None:
            results |= {"finetuned_val_loss": control_loss, "finetuned_val_accuracy": control_acc,
                        "loss_ratio_finetuned": cb_loss / control_loss}
        runs.save_json(os.path.join(args.out, "results.json"), results)
        print(f"wall time {time.time() - t0:.0f} s ({world} process{'es' if world > 1 else ''}); "
              f"wrote {args.out}/results.json, base.pt, codebook.pt" + (", finetuned.pt" if control else ""))
    if dist.is_initialized():
        dist.barrier()  # every rank done with its collectives before any tears the group down
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    runs.run_main(main)
