"""What several test files share: a tiny codebook model and its tokens; the test-only packages and
real models (a skip naming what is missing, a failure where CI requires it), tiny random transformers
models and text to compare tokenizers on; a tiny random Llama-style model with a BPE tokenizer that
has a chat format; headless Chromium; a free port for runs of two processes, and running a script
(killed at a chosen step, if asked) and comparing what two runs wrote."""
import copy
import glob
import importlib
import os
import re
import shutil
import socket
import subprocess
import sysconfig
import tempfile

import pytest
import torch

import bpe
import codebook as cb
import models
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = os.environ | {"CODEBOOK_EXT": "0", "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "0"}  # a progress line per step
# how tests start worker processes: forked (fast), but spawned where a GPU is, since a forked child cannot use CUDA
# once the parent has started it (and torch may, reading a device's state)
START_METHOD = "spawn" if torch.cuda.is_available() else "fork"
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


THREADS = torch.get_num_threads()  # torch's default here


@pytest.fixture(autouse=True)
def same_start():
    """Every test starts from the same global state, whatever ran before it (scripts run in-process
    set --threads, fixtures draw random numbers): torch's default thread count and its random
    generator seeded with 0; the generator is as before after the test."""
    torch.set_num_threads(THREADS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield
    torch.set_num_threads(THREADS)


@pytest.fixture
def one_thread():
    """torch on one thread within a test (its figures depend on the order of summation)."""
    torch.set_num_threads(1)


# --- test-only packages (transformers, tokenizers, gguf), the real models, tiny transformers models

REQUIRE_MODELS = os.environ.get("CODEBOOK_REQUIRE_MODELS") == "1"
REQUIRE_PACKAGES = REQUIRE_MODELS or os.environ.get("CODEBOOK_REQUIRE_HF") == "1"
MODELS = os.environ.get("CODEBOOK_MODELS", os.path.expanduser("~/.cache/codebook-features"))
SMOLLM2, GEMMA3 = "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"


def need(module):
    """A test-only package, imported; a skip where it is absent, or a failure under CODEBOOK_REQUIRE_HF=1
    or CODEBOOK_REQUIRE_MODELS=1."""
    if REQUIRE_PACKAGES:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (test-only: pip install {module})")


def real_model(name):
    """The path of the real model `name` in CODEBOOK_MODELS; a skip where it is absent, or a failure under
    CODEBOOK_REQUIRE_MODELS=1."""
    path = os.path.join(MODELS, name)
    if not os.path.isfile(path):
        (pytest.fail if REQUIRE_MODELS else pytest.skip)(f"{path} is absent: .ci/fetch_models fetches it")
    return path


def precision_at_recall(values, mask, recall):
    """The precision of one feature (values (P,)) thresholded to fire on `recall` of the positions of
    `mask` (P,), written out: the neuron baseline's definition (section 4)."""
    n = int(mask.sum())
    need = next(hits for hits in range(1, n + 1) if hits / n >= recall - 1e-6)  # a float32 recall may round hits / n up
    threshold = sorted(values[mask].tolist(), reverse=True)[need - 1]
    fires = values >= threshold
    return (fires & mask).sum().item() / fires.sum().item()


def randomize(model, seed):
    """Every parameter (biases and LayerNorms too) random and large enough that attention is far
    from uniform, so a wrong mask, scale, rotation or layout changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name or "ln" in name else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


# Llama-3's rope scaling with a context of 32 so that the 8 frequencies of a head fall in all three of
# its bands (kept, blended, divided)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
# Phi's LongRoPE (with Phi-4-mini's rotary embedding on 3/4 of each head): a short and a long factor for each of the 6
# rotary frequencies, the long ones taken by a forward reaching past the original context of 16 positions (of 64), and
# the attention factor that implies, sqrt(1 + ln 4 / ln 16)
PHI3_LONGROPE = dict(partial_rotary_factor=0.75, original_max_position_embeddings=16, rope_parameters=dict(
    rope_type="longrope", short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5], long_factor=[1.5, 2.5, 4.0, 6.0, 9.0, 12.0]))
# Gemma: a sliding window of 5, shorter than the inputs, on layer 0; layer 1 global; a score scale other than 1/sqrt(d_head)
# (Gemma (1) has neither: its config keeps both, which its forward does not use)
GEMMA = dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=24, pad_token_id=0)
# mixtures of experts: 4 experts (of width 32 where the family sets it apart), 2 per token; Qwen2-MoE's shared expert of 64
MOE = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
       "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
       "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
       "olmoe": dict(num_experts=4, num_experts_per_tok=2)}

# gpt-oss: layer 0 a window of 5 (shorter than the sequences), layer 1 full; YaRN not truncated, its ramp's ends (0.21 and
# 3.22 of 8 frequencies) not whole; the SwiGLU clamped at 3, within the gate's and up's spread, so that the clamp acts
GPT_OSS = dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=5, swiglu_limit=3.0,
               layer_types=["sliding_attention", "full_attention"],
               rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                                    truncate=False, original_max_position_embeddings=256))


def mxfp4(shape, g, scales=(0, 255)):
    """Random MXFP4 blocks (*shape, 16) (every byte, so every code in both nibbles) and scales (*shape) in `scales`."""
    return (torch.randint(0, 256, (*shape, 16), generator=g, dtype=torch.uint8),
            torch.randint(*scales, shape, generator=g, dtype=torch.uint8))


def tiny_hf(family, vocab_size=96, **options):
    """A tiny random transformers model of `family` (d 64, 4 heads, 2 layers, 64 positions; BLOOM none)."""
    t = need("transformers")
    options = copy.deepcopy(options)  # transformers writes into a config's dicts (rope_scaling gets rope_theta)
    if family == "gpt2":
        config = t.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, **options)
        return randomize(t.GPT2LMHeadModel(config), 0)
    if family == "gpt_neo":  # layer 0 global, layer 1 local: a window of 5, shorter than the sequences
        config = t.GPTNeoConfig(vocab_size=vocab_size, max_position_embeddings=64, hidden_size=64, num_layers=2, num_heads=4,
                                attention_types=[[["global", "local"], 1]], window_size=5, bos_token_id=0, eos_token_id=0, **options)
        return randomize(t.GPTNeoForCausalLM(config), 1)
    if family == "gpt_neox":
        config = t.GPTNeoXConfig(vocab_size=vocab_size, max_position_embeddings=64, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, rotary_pct=0.5, **options)
        return randomize(t.GPTNeoXForCausalLM(config), 2)
    if family == "gptj":  # the rotary embedding on 12 of each head's 16 dims (its default, 64, is wider than these heads)
        config = t.GPTJConfig(**dict(vocab_size=vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=12,
                                     bos_token_id=0, eos_token_id=0) | options)
        return randomize(t.GPTJForCausalLM(config), 6)
    if family == "gpt_bigcode":  # multi-query attention, its default: one key / value head
        config = t.GPTBigCodeConfig(**dict(vocab_size=vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                           bos_token_id=0, eos_token_id=0) | options)
        return randomize(t.GPTBigCodeForCausalLM(config), 7)
    if family == "bloom":
        config = t.BloomConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0,
                               **dict(hidden_size=64, n_layer=2, n_head=4) | options)
        return randomize(t.BloomForCausalLM(config), 6)
    if family == "mpt":
        config = t.MptConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0,
                             **dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=64) | options)
        return randomize(t.MptForCausalLM(config), 7)
    if family == "falcon":  # its defaults: Falcon-7B's layout (multi-query, attention and the MLP in parallel from one norm)
        config = t.FalconConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, **dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64) | options)
        return randomize(t.FalconForCausalLM(config), 8)
    # Llama, Mistral, Qwen2, Qwen3, SmolLM3, OLMo-2, OLMo-3, Phi-3, Gemma, Granite, Cohere, Cohere2, StableLM, Phi,
    # StarCoder2, OLMo, ERNIE 4.5, Arcee, Nemotron, Ministral, Ministral 3, GLM, GLM-4, Apertus, Helium, Seed-OSS,
    # EXAONE 3, EXAONE 4, the mixtures of experts (MOE): 4 query heads sharing 2 key / value heads
    sizes = dict(vocab_size=vocab_size, max_position_embeddings=64, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, bos_token_id=0, eos_token_id=0)
    if family in ("gemma", "gemma2", "gemma3"):  # Gemma-2's eager attention: the one that soft-caps scores
        config, model = {"gemma": (t.GemmaConfig, t.GemmaForCausalLM), "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM),
                         "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM)}[family]
        attention = "eager" if family == "gemma2" else "sdpa"
        return randomize(model(config(**sizes | GEMMA | options, attn_implementation=attention)), 4)
    if family == "exaone":  # transformers builds EXAONE 3 as Llama: a LlamaForCausalLM of an ExaoneConfig
        return randomize(t.AutoModelForCausalLM.from_config(t.ExaoneConfig(**sizes | options)), 3)
    if family == "gpt_oss":  # sinks made large enough to matter (randomize's 0.3 leaves them far under the scores)
        model = randomize(t.GptOssForCausalLM(t.GptOssConfig(**sizes | GPT_OSS | options)), 5)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.add_(3.0)
        return model
    model = {"llama": t.LlamaForCausalLM, "mistral": t.MistralForCausalLM, "qwen2": t.Qwen2ForCausalLM,
             "qwen3": t.Qwen3ForCausalLM, "smollm3": t.SmolLM3ForCausalLM, "olmo2": t.Olmo2ForCausalLM,
             "olmo3": t.Olmo3ForCausalLM, "phi3": t.Phi3ForCausalLM, "granite": t.GraniteForCausalLM,
             "cohere": t.CohereForCausalLM, "cohere2": t.Cohere2ForCausalLM, "stablelm": t.StableLmForCausalLM,
             "phi": t.PhiForCausalLM, "starcoder2": t.Starcoder2ForCausalLM, "olmo": t.OlmoForCausalLM,
             "mixtral": t.MixtralForCausalLM, "qwen2_moe": t.Qwen2MoeForCausalLM, "qwen3_moe": t.Qwen3MoeForCausalLM,
             "olmoe": t.OlmoeForCausalLM, "ernie4_5": t.Ernie4_5ForCausalLM,
             "arcee": t.ArceeForCausalLM, "nemotron": t.NemotronForCausalLM, "ministral": t.MinistralForCausalLM,
             "ministral3": t.Ministral3ForCausalLM, "glm": t.GlmForCausalLM, "glm4": t.Glm4ForCausalLM,
             "apertus": t.ApertusForCausalLM, "apertus1p5_text": t.Apertus1p5TextForCausalLM,
             "helium": t.HeliumForCausalLM, "seed_oss": t.SeedOssForCausalLM,
             "exaone4": t.Exaone4ForCausalLM}[family]
    if family in ("smollm3", "phi3", "stablelm", "glm", "glm4"):
        sizes["pad_token_id"] = None  # their defaults (128004, 32000, 151329) are past the tiny vocabulary (StableLM's: none)
    config = getattr(t, model.__name__.replace("ForCausalLM", "Config"))(**sizes | MOE.get(family, {}) | options)
    model = randomize(model(config), 3)
    if family.startswith("apertus"):
        apertus_xielu(model.model.layers)
    return model


def apertus_xielu(layers):
    """Apertus's xIELU buffers (randomize draws its parameters) other than their defaults and per layer: beta, and eps
    down to -0.2 or -0.4, so that min(x, eps) acts on the inputs near 0."""
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.mlp.act_fn.beta.fill_(0.3 + 0.4 * i)
            layer.mlp.act_fn.eps.fill_(-0.2 * (i + 1))


# --- text to compare tokenizers on, and tokenizers trained on it -----------------------------

SAMPLE = ("Café déjà vu, naïve façade; e\u0301 (decomposed), Œuvre, Straße, İstanbul.\n"
          "東京都の天気は晴れです。北京欢迎你！ 서울 Привет, мир! Γειά σου κόσμε. שָׁלוֹם עולם\n"
          "Emoji: 🐉🔥👩‍👩‍👧 ✨ 1️⃣ flags 🇫🇷\n"
          "Numbers: 3.14159, 1,000,000, ٣٤٥, ½ ¾, x²; 0x1F 1e-9 2024-06-01\n"
          "Contractions: I'm, you're, he's, we've, they'll, I'd, don't, it's, O'Neil's, 'TIS\n"
          "Whitespace:\ta\t\tb  c   d\r\n\r\n\n\x0b\x0c\u00a0nbsp\u2003em\u3000ideographic \u2028sep  \n   \t  end  ")
STDLIB = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def stdlib_text(first, size):
    """About `size` characters of this Python's standard library source, from file `first` on."""
    parts, total = [], 0
    for path in STDLIB[first:]:
        parts.append(open(path, encoding="utf-8", errors="replace").read())
        total += len(parts[-1])
        if total >= size:
            break
    return "".join(parts)[:size]


def trained_bpe(folder, pre_tokenizer=None, normalizer=None, specials=("<|endoftext|>",), added=(), corpus=None,
                ignore_merges=False):
    """A byte-level BPE of 700 ids trained by `tokenizers` on `corpus` (a list of texts; by default ~300 KB
    of stdlib source), then `added` tokens; saved as folder/tokenizer.json. pre_tokenizer: GPT-2's by default."""
    tk = need("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer or tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    if normalizer:
        tok.normalizer = normalizer
    trainer = tk.trainers.BpeTrainer(vocab_size=700, special_tokens=list(specials), show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus or [stdlib_text(0, 300_000)], trainer)
    tok.add_tokens(list(added))
    tok.save(str(folder / "tokenizer.json"))
    return tok


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


def page_errors(browser):
    """The errors the page's scripts logged since the last call."""
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def count(browser, selector):
    """How many elements of the page match a CSS selector."""
    return browser.execute_script(f"return document.querySelectorAll('{selector}').length")


# --- runs of the scripts --------------------------------------------------------------------

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
