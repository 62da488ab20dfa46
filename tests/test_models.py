"""models.py against the industrial implementations (minGPT's test, once per family): a tiny random GPT-2, GPT-Neo,
GPT-NeoX, GPT-J, GPT-BigCode, Llama, Mistral, Qwen2, Qwen3, SmolLM3, OLMo-2, OLMo-3, Phi-3, Gemma, Granite, Cohere,
Cohere2, StableLM, Phi, StarCoder2, OLMo, ERNIE 4.5, Arcee, Nemotron, Ministral, Ministral 3, GLM, GLM-4, Apertus,
Helium, Seed-OSS, EXAONE 3, EXAONE 4, BLOOM, MPT, Falcon and the mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE and gpt-oss made and saved by `transformers`, loaded by models.py, give the same logits and the same greedy
generations; the BPE tokenizer gives the `tokenizers` library's ids on source code and non-ASCII text. transformers and
tokenizers are test-only: without them these tests skip, unless CODEBOOK_REQUIRE_HF=1 (as in CI) makes their absence a
failure (conftest.need)."""
import glob
import json
import os
import re
import types

import numpy as np
import pytest
import torch

import codebook as cb
import bpe
import formats
import models
import runs
import text
import conftest
from conftest import GEMMA, LLAMA3, PHI3_LONGROPE, SAMPLE, mxfp4, need, randomize, stdlib_text, tiny_hf


# --- models --------------------------------------------------------------------------------

# GPT-2 without 1/sqrt(d_head) on its scores (scale_attn_weights=False); Qwen3 with a head_dim other than d_model / n_head;
# LLAMA3 (conftest) for Llama-3's rope scaling; pretraining_tp, which changes only how older transformers summed a matmul;
# Gemma's GeGLU with the exact GELU instead of tanh's
CASES = {"gpt2": ("gpt2", {}), "gpt2-bin": ("gpt2", {}), "gpt2-unscaled": ("gpt2", dict(scale_attn_weights=False)),
         "gpt_neo": ("gpt_neo", {}),
         "gpt_neox-parallel": ("gpt_neox", dict(use_parallel_residual=True)),
         "gpt_neox-sequential": ("gpt_neox", dict(use_parallel_residual=False)),
         "gpt_neox-bin": ("gpt_neox", {}),  # transformers 5's state_dict names the output layer lm_head, not embed_out
         # GPT-J: the rotary embedding on interleaved pairs of 12 of 16 dims (conftest); on all 16, with a tied output layer
         # (its bias kept)
         "gptj": ("gptj", {}), "gptj-whole-head-tied": ("gptj", dict(rotary_dim=16, tie_word_embeddings=True)),
         # GPT-BigCode: multi-query attention; and without it (c_attn's rows head by head), with GPT-2's unscaled scores, an
         # MLP of 96 and the softmax options off (which change nothing transformers computes)
         "gpt_bigcode": ("gpt_bigcode", {}),
         "gpt_bigcode-mha-unscaled": ("gpt_bigcode", dict(multi_query=False, scale_attn_weights=False, n_inner=96,
                                                          attention_softmax_in_fp32=False,
                                                          scale_attention_softmax_in_fp32=False)),
         "llama": ("llama", dict(rope_scaling=LLAMA3, tie_word_embeddings=False, pretraining_tp=2)),
         "llama-linear-tied-biases": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0), tie_word_embeddings=True,
                                                    attention_bias=True, mlp_bias=True, rope_theta=500.0)),
         "llama-yarn": ("llama", dict(rope_theta=100.0, rope_scaling=dict(  # a ramp from frequency 2 to 6 of 8
             rope_type="yarn", factor=2.0, original_max_position_embeddings=32, beta_fast=1.5, beta_slow=0.25, mscale=2.0,
             mscale_all_dim=1.0))),
         "qwen3-yarn": ("qwen3", dict(head_dim=16, rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                     original_max_position_embeddings=16, attention_factor=1.5))),
         "mistral": ("mistral", dict(sliding_window=5)),  # a window shorter than the inputs
         "mistral-no-window": ("mistral", dict(sliding_window=None)),
         "qwen2": ("qwen2", {}), "qwen3": ("qwen3", dict(head_dim=24)),
         "smollm3": ("smollm3", dict(no_rope_layers=[1, 0])),  # layer 1 without the rotary embedding
         "smollm3-every-fourth": ("smollm3", dict(num_hidden_layers=4, tie_word_embeddings=False)),  # layer 3 without
         "olmo2": ("olmo2", {}), "olmo2-biases": ("olmo2", dict(attention_bias=True, rms_norm_eps=1e-6)),
         # layers 0-2 with a window of 5, layer 3 global with YaRN; transformers gives the windowed layers its default base
         "phi3": ("phi3", dict(sliding_window=5, partial_rotary_factor=0.5)), "phi3-no-window": ("phi3", {}),
         "phi3-longrope": ("phi3", PHI3_LONGROPE),  # inputs past its original context; generations reaching past it
         "olmo3": ("olmo3", dict(num_hidden_layers=4, sliding_window=5, rope_theta=1000.0, rope_scaling=dict(
             rope_type="yarn", factor=2.0, original_max_position_embeddings=32))),
         # as the long-context releases, an attention factor and ramp ends given (here not the defaults: each one shows)
         "olmo3-yarn": ("olmo3", dict(num_hidden_layers=4, sliding_window=5, rope_theta=1000.0, rope_scaling=dict(
             rope_type="yarn", factor=4.0, original_max_position_embeddings=16, attention_factor=1.5, beta_fast=0.5,
             beta_slow=0.125))),
         # conftest's score scale in its config, unused (Gemma (1) has none); its window too, but transformers' cache would take it
         "gemma": ("gemma", dict(sliding_window=None)),
         "gemma2": ("gemma2", dict(attn_logit_softcapping=5.0, final_logit_softcapping=8.0)),
         "gemma3": ("gemma3", dict(layer_types=["sliding_attention", "full_attention"], rope_local_base_freq=100.0,
                                   rope_scaling=dict(rope_type="linear", factor=8.0),
                                   attn_logit_softcapping=3.0)),  # in its config, unused: Gemma-3 does not soft-cap scores
         "gemma2-exact-gelu": ("gemma2", dict(hidden_activation="gelu")),
         "gemma3-exact-gelu": ("gemma3", dict(hidden_activation="gelu")),
         # every multiplier other than 1 (and the score scale other than 1/sqrt(d_head)), so that one dropped changes the logits
         "granite": ("granite", dict(embedding_multiplier=3.0, attention_multiplier=0.3, residual_multiplier=0.5,
                                     logits_scaling=2.0, rope_theta=500.0)),
         # Cohere's rotary on interleaved pairs, its per-head q / k LayerNorms, a logit scale other than its default
         "cohere": ("cohere", dict(logit_scale=0.5, use_qk_norm=True, layer_norm_eps=1e-3)),
         "cohere-biases": ("cohere", dict(logit_scale=0.5, attention_bias=True, rope_theta=1000.0)),
         "cohere2": ("cohere2", dict(num_hidden_layers=4, sliding_window=5, logit_scale=0.5)),  # layers 0-2 windowed, rotary
         "stablelm": ("stablelm", dict(partial_rotary_factor=0.5, use_qkv_bias=True, layer_norm_eps=1e-3)),
         "stablelm-parallel": ("stablelm", dict(partial_rotary_factor=0.5, use_parallel_residual=True, qk_layernorm=True)),
         # Phi: its parallel attention and MLP, the rotary embedding on 12 of 16 dims (not its default half), gelu_new
         "phi": ("phi", dict(partial_rotary_factor=0.75, layer_norm_eps=1e-3)),
         # StarCoder2: a window of 5, shorter than the inputs; and without biases (use_bias) and untied
         "starcoder2": ("starcoder2", dict(sliding_window=5, norm_epsilon=1e-3)),
         "starcoder2-no-biases": ("starcoder2", dict(use_bias=False, tie_word_embeddings=False, rope_theta=500.0)),
         # OLMo: q, k and v clamped to +-2 (well inside their spread); and with biases on q, k, v and W_O, tied
         "olmo": ("olmo", dict(clip_qkv=2.0, rope_theta=500.0)),
         "olmo-biases-tied": ("olmo", dict(attention_bias=True, tie_word_embeddings=True)),
         # ERNIE 4.5: interleaved rotary pairs (head_dim given: its default, 128, is wider than these heads); with biases
         # on every projection (use_bias), untied, YaRN
         "ernie4_5": ("ernie4_5", dict(head_dim=16)),
         "ernie4_5-biases-untied-yarn": ("ernie4_5", dict(head_dim=24, use_bias=True, tie_word_embeddings=False, rope_parameters=dict(
             rope_type="yarn", rope_theta=1000.0, factor=2.0, original_max_position_embeddings=32))),
         # Arcee: its ReLU² MLP without gate; with biases on q, k, v, W_O and the MLP, tied, YaRN
         "arcee": ("arcee", {}),
         "arcee-biases-tied-yarn": ("arcee", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True, rope_parameters=dict(
             rope_type="yarn", rope_theta=1000.0, factor=2.0, original_max_position_embeddings=32))),
         # GLM and GLM-4: the rotary embedding on interleaved pairs of half of each head (head_dim given: its default, 128,
         # is wider than these heads), biases on q, k, v, untied, GLM-4's norms after attention and the MLP; GLM on 3/4 of
         # each head, without biases, tied, YaRN; GLM-4 with its rotary embedding on all of each head
         "glm": ("glm", dict(head_dim=16)),
         "glm-no-biases-tied-yarn": ("glm", dict(head_dim=16, attention_bias=False, tie_word_embeddings=True, rope_parameters=dict(
             rope_type="yarn", rope_theta=1000.0, factor=2.0, original_max_position_embeddings=32, partial_rotary_factor=0.75))),
         "glm4": ("glm4", dict(head_dim=16)),
         "glm4-whole-head": ("glm4", dict(head_dim=24, partial_rotary_factor=1.0, rope_theta=500.0)),
         # Nemotron: LayerNorm1P (1 + weight, with bias), ReLU² without gate, the rotary embedding on half of each head; with
         # biases on q, k, v, W_O and the MLP, tied, linear scaling on 12 of 16 dims
         "nemotron": ("nemotron", dict(norm_eps=1e-3)),
         "nemotron-biases-tied-linear": ("nemotron", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True, rope_parameters=dict(
             rope_type="linear", factor=2.0, partial_rotary_factor=0.75, rope_theta=500.0))),
         # Ministral: a window of 5 on layer 0 only (layer_types), then on every layer (its default where sliding_window is
         # set), with YaRN; Ministral 3: its YaRN and its queries scaled by position past 16 (beta 0.5), then a window of 5
         # on every layer, the rotary embedding unscaled and the queries scaled past 8
         "ministral": ("ministral", dict(head_dim=16, sliding_window=5, layer_types=["sliding_attention", "full_attention"])),
         "ministral-all-sliding-yarn": ("ministral", dict(head_dim=24, sliding_window=5, rope_parameters=dict(
             rope_type="yarn", rope_theta=1000.0, factor=2.0, original_max_position_embeddings=32))),
         "ministral3": ("ministral3", dict(head_dim=16, rope_parameters=dict(
             rope_type="yarn", rope_theta=1000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
             beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.5))),
         "ministral3-window": ("ministral3", dict(head_dim=16, sliding_window=5, rope_parameters=dict(
             rope_type="default", rope_theta=500.0, llama_4_scaling_beta=0.3, original_max_position_embeddings=8))),
         # Apertus: xIELU (its parameters per layer, conftest's beta and eps too), q / k norms, Llama-3's scaling in its three
         # bands; with biases on q, k, v and W_O, tied, YaRN, a head_dim other than d_model / n_head; Apertus 1.5's text
         # model, its output layer a row for every token (output_vocab_size as vocab_size: unpruned)
         "apertus": ("apertus", dict(rope_parameters=dict(LLAMA3, rope_theta=10000.0))),
         "apertus-biases-tied-yarn": ("apertus", dict(attention_bias=True, tie_word_embeddings=True, head_dim=24, rope_parameters=dict(
             rope_type="yarn", rope_theta=1000.0, factor=2.0, original_max_position_embeddings=32))),
         "apertus1p5_text": ("apertus1p5_text", dict(output_vocab_size=96, rope_parameters=dict(rope_type="default", rope_theta=500.0))),
         # Helium: its RMSNorms' weights in float32, the rotary embedding on interleaved pairs (head_dim given: its default,
         # 128, is wider than these heads); with biases on q, k, v and the MLP, tied, linear scaling
         "helium": ("helium", dict(head_dim=16)),
         "helium-biases-tied-linear": ("helium", dict(head_dim=16, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                                      rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500.0))),
         # Seed-OSS: biases on q, k, v (its default; head_dim given: its default, 128, is wider than these heads); with a
         # bias on W_O and the MLP instead, tied, YaRN
         "seed_oss": ("seed_oss", dict(head_dim=16)),
         "seed_oss-out-bias-tied-yarn": ("seed_oss", dict(head_dim=24, attention_bias=False, attention_out_bias=True, mlp_bias=True,
                                                          tie_word_embeddings=True, rope_parameters=dict(
             rope_type="yarn", rope_theta=1000.0, factor=2.0, original_max_position_embeddings=32))),
         # EXAONE 3 (Llama under its own names): Llama-3's rope scaling; with biases on q, k, v, W_O and the MLP, tied
         "exaone": ("exaone", dict(rope_scaling=LLAMA3, rms_norm_eps=1e-3)),
         "exaone-biases-tied": ("exaone", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True, rope_theta=500.0)),
         # EXAONE 4: normed after attention and the MLP, q / k norms; a window of 5 on layers 0-2 (its default pattern of 4),
         # layer 3 global without the rotary embedding; windows on every other layer; no window (null), the rotary
         # embedding on every layer (EXAONE-4.0-1.2B's), a head_dim other than d_model / n_head, tied, Llama-3's scaling
         "exaone4": ("exaone4", dict(num_hidden_layers=4, sliding_window=5, rms_norm_eps=1e-3)),
         "exaone4-every-other": ("exaone4", dict(num_hidden_layers=3, sliding_window=5, sliding_window_pattern=2,
                                                 rope_theta=500.0)),
         "exaone4-global-tied-llama3": ("exaone4", dict(sliding_window=None, layer_types=["full_attention"] * 2, head_dim=24,
                                                        tie_word_embeddings=True, rope_scaling=LLAMA3)),
         # ALiBi: BLOOM with its embedding norm, fused q / k / v head by head; MPT with q, k, v clamped to +-2 (well inside
         # their spread), a score scale other than 1/sqrt(d_head), untied; test_alibi_* for head counts not a power of two
         "bloom": ("bloom", dict(layer_norm_epsilon=1e-3)),
         "mpt": ("mpt", {}),
         "mpt-clip-scaled-untied": ("mpt", dict(attn_config=dict(clip_qkv=2.0, softmax_scale=0.2), tie_word_embeddings=False)),
         # Falcon: 7B's multi-query attention, attention and the MLP in parallel from one norm; 40B's and 180B's key / value
         # groups in query_key_value, ln_attn and ln_mlp; Falcon-11B's groups with one norm, untied, its rotary base; RW's
         # ALiBi, q / k / v head by head, attention then the MLP, biases; a key / value head per query head in parallel,
         # with biases and linear rope scaling, untied
         "falcon-7b": ("falcon", {}),
         "falcon-40b": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),
         "falcon-11b": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1,
                                       tie_word_embeddings=False, rope_theta=500.0)),
         "falcon-rw": ("falcon", dict(alibi=True, bias=True, multi_query=False, parallel_attn=False)),
         "falcon-mha-biases-linear": ("falcon", dict(multi_query=False, bias=True, tie_word_embeddings=False,
                                                     rope_scaling=dict(rope_type="linear", factor=2.0))),
         # mixtures of experts (conftest.MOE: 4 experts, 2 per token): Mixtral renormalises the two chosen experts'
         # weights, always, and has Mistral's window; Qwen2-MoE adds its gated shared expert, and keeps a dense MLP on
         # mlp_only_layers and on the layers decoder_sparse_step skips (layer 0 here); Qwen3-MoE and OLMoE renormalise
         # where norm_topk_prob says; OLMoE norms q and k over all heads and clamps q, k, v to clip_qkv
         "mixtral": ("mixtral", dict(sliding_window=5)),
         "qwen2_moe": ("qwen2_moe", dict(num_hidden_layers=3, mlp_only_layers=[0])),
         "qwen2_moe-sparse-step-renormalised": ("qwen2_moe", dict(decoder_sparse_step=2, norm_topk_prob=True, qkv_bias=False)),
         "qwen3_moe": ("qwen3_moe", dict(head_dim=24, norm_topk_prob=True)),
         "qwen3_moe-dense-layer": ("qwen3_moe", dict(mlp_only_layers=[0], attention_bias=True)),
         "olmoe": ("olmoe", {}), "olmoe-clip-renormalised": ("olmoe", dict(clip_qkv=2.0, norm_topk_prob=True)),
         "gpt_oss": ("gpt_oss", {})}
TIED = {"gpt2": True, "gpt_neo": True, "gpt_neox": False, "gptj": False, "gpt_bigcode": True, "llama": False, "mistral": False, "qwen2": False, "qwen3": False,
        "smollm3": True, "olmo2": False, "olmo3": False, "phi3": False, "gemma": True, "gemma2": True, "gemma3": True,
        "granite": False, "cohere": True, "cohere2": True, "stablelm": False, "phi": False, "starcoder2": True, "olmo": False, "ernie4_5": True, "arcee": False,
        "nemotron": False, "ministral": False, "ministral3": False,
        "glm": False, "glm4": False, "apertus": False, "apertus1p5_text": False, "helium": False, "seed_oss": False,
        "exaone": False, "exaone4": False, "bloom": True, "mpt": True, "falcon": True, "mixtral": False, "qwen2_moe": False,
        "qwen3_moe": False, "olmoe": False, "gpt_oss": False}


# layer 1's modules in transformers: W_O, the one whose output the block adds as the MLP's (Gemma's after its norm), the block
LLAMA_SITES = ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp", "model.layers.1")
SITES = {"gpt2": ("transformer.h.1.attn.c_proj", "transformer.h.1.mlp", "transformer.h.1"),
         "gpt_neo": ("transformer.h.1.attn.attention.out_proj", "transformer.h.1.mlp", "transformer.h.1"),
         "gpt_neox": ("gpt_neox.layers.1.attention.dense", "gpt_neox.layers.1.mlp", "gpt_neox.layers.1"),
         "gptj": ("transformer.h.1.attn.out_proj", "transformer.h.1.mlp", "transformer.h.1"),
         "gpt_bigcode": ("transformer.h.1.attn.c_proj", "transformer.h.1.mlp", "transformer.h.1"),
         "llama": LLAMA_SITES, "mistral": LLAMA_SITES, "qwen2": LLAMA_SITES, "qwen3": LLAMA_SITES, "smollm3": LLAMA_SITES, "phi3": LLAMA_SITES,
         "gemma": LLAMA_SITES, "granite": LLAMA_SITES, "cohere": LLAMA_SITES, "cohere2": LLAMA_SITES, "stablelm": LLAMA_SITES,
         "mixtral": LLAMA_SITES, "qwen2_moe": LLAMA_SITES, "qwen3_moe": LLAMA_SITES, "olmoe": LLAMA_SITES,
         "gpt_oss": LLAMA_SITES, "starcoder2": LLAMA_SITES, "olmo": LLAMA_SITES, "ernie4_5": LLAMA_SITES, "arcee": LLAMA_SITES, "nemotron": LLAMA_SITES,
         "ministral": LLAMA_SITES, "ministral3": LLAMA_SITES, "glm": LLAMA_SITES, "apertus": LLAMA_SITES,
         "apertus1p5_text": LLAMA_SITES, "helium": LLAMA_SITES, "seed_oss": LLAMA_SITES, "exaone": LLAMA_SITES,
         "phi": ("model.layers.1.self_attn.dense", "model.layers.1.mlp", "model.layers.1"),
         "gemma2": (LLAMA_SITES[0], "model.layers.1.post_feedforward_layernorm", LLAMA_SITES[2]),
         # (BLOOM's and MPT's MLP modules add the residual themselves: their last linear is what the MLP adds)
         "bloom": ("transformer.h.1.self_attention.dense", "transformer.h.1.mlp.dense_4h_to_h", "transformer.h.1"),
         "mpt": ("transformer.blocks.1.attn.out_proj", "transformer.blocks.1.ffn.down_proj", "transformer.blocks.1"),
         "falcon": ("transformer.h.1.self_attention.dense", "transformer.h.1.mlp", "transformer.h.1")}
SITES["gemma3"] = SITES["olmo2"] = SITES["olmo3"] = SITES["exaone4"] = SITES["gemma2"]
SITES["glm4"] = (LLAMA_SITES[0], "model.layers.1.post_mlp_layernorm", LLAMA_SITES[2])


@pytest.mark.parametrize("case", CASES)
def test_same_logits_and_generations_as_transformers(case, tmp_path):
    family, options = CASES[case]
    theirs = tiny_hf(family, **options)
    theirs.save_pretrained(tmp_path)
    if case.endswith("-bin"):  # the older format: a torch pickle of the state_dict
        os.remove(tmp_path / "model.safetensors")
        torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    ours = models.from_pretrained(str(tmp_path))
    assert ours.config.tied_head == options.get("tie_word_embeddings", TIED[family])

    x = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = theirs(x).logits
    got = ours(x)
    assert want.std() > 1.0  # far from uniform: the comparison can tell the models apart
    assert (got - want).abs().max() <= 1e-4

    prompt = x[:2, :8]
    want_ids = theirs.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert want_ids.shape == (2, 28)
    assert torch.equal(ours.generate(prompt, 20, temperature=0), want_ids)

    # codebooks added and switched off: the same model again
    with_cb = cb.with_codebooks(ours, {"attn": dict(num_codes=16, k=2), "mlp": dict(num_codes=8), "block": dict(num_codes=8)})
    assert not torch.allclose(with_cb(x), want, atol=1e-2)  # on, they change the computation
    with cb.codebooks_off(with_cb):
        assert (with_cb(x) - want).abs().max() <= 1e-4
        assert torch.equal(with_cb.generate(prompt, 20, temperature=0), want_ids)
    acts = {}
    with cb.capture_activations(with_cb) as acts:
        with_cb(x)
    d_head = options.get("head_dim", 16)
    assert acts[1]["attn"].shape == (3, 40, 4, d_head) and acts[1]["mlp"].shape == acts[1]["block"].shape == (3, 40, 1, 64)
    # the sites are where transformers computes these: W_O's input, what the block adds as the MLP's output, the block's
    seen, modules = {}, dict(theirs.named_modules())
    w_o, mlp, block = (modules[name] for name in SITES[family])
    # (copies: Falcon's block adds attention's output into its MLP's in place)
    hooks = [w_o.register_forward_pre_hook(lambda module, args: seen.update(attn=args[0].clone())),
             mlp.register_forward_hook(lambda module, args, out: seen.update(mlp=(out[0] if isinstance(out, tuple) else out).clone())),
             block.register_forward_hook(lambda module, args, out: seen.update(block=(out[0] if isinstance(out, tuple) else out).clone()))]
    with torch.no_grad():
        theirs(x)
    for hook in hooks:
        hook.remove()
    if family == "granite":  # what the block adds as the MLP's output: its output times residual_multiplier
        seen["mlp"] = seen["mlp"] * theirs.config.residual_multiplier
    with cb.codebooks_off(with_cb), cb.capture_activations(with_cb) as acts:
        with_cb(x)
    for site in ("attn", "mlp", "block"):
        assert (acts[1][site].flatten(2) - seen[site]).abs().max() <= 1e-4, site
    assert type(with_cb) is models.Transformer and models.model_from_config(with_cb.config.to_dict()).config == with_cb.config


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the models did not run on a GPU")
@pytest.mark.parametrize("case", ["gpt2", "gpt_neox-parallel", "llama", "qwen3", "gemma2", "gemma3", "gptj", "gpt_bigcode",
                                  "gpt_neo", "cohere", "bloom", "mpt", "falcon-rw", "nemotron", "apertus"])
def test_cuda_same_logits_and_generations_as_transformers_and_bf16_autocast_near_them(case, tmp_path):
    family, options = CASES[case]
    theirs = tiny_hf(family, **options)
    theirs.save_pretrained(tmp_path)
    ours = models.from_pretrained(str(tmp_path)).cuda()
    x = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = theirs(x).logits
    got = ours(x.cuda()).cpu()
    assert want.std() > 1.0 and (got - want).abs().max() <= 1e-4
    prompt = x[:2, :8]
    want_ids = theirs.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours.generate(prompt.cuda(), 20, temperature=0).cpu(), want_ids)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as train_lm.py runs on a GPU
        low = ours(x.cuda()).float().cpu()
    loss = lambda logits: torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), x[:, 1:].reshape(-1))
    assert abs(loss(low) - loss(want)) <= 0.01 * loss(want) and (low.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


# config.json as transformers 4 wrote it (the tests' other configs are transformers 5's, with rope_parameters): the
# rotary base at the top level (rope_theta; GPT-NeoX's rotary_emb_base), the scaling under rope_scaling with its kind
# under "type" (older files) or "rope_type", GPT-NeoX's rotary fraction as rotary_pct
OLDER_CONFIGS = {
    "llama-linear": ("llama", dict(rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0})),
    # (conftest's LLAMA3 written out: transformers adds rope_theta to the dict a config is made with)
    "llama-llama3": ("llama", dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                          high_freq_factor=4.0, original_max_position_embeddings=32))),
    "gpt_neox": ("gpt_neox", dict(rotary_pct=0.75, rotary_emb_base=500.0)),
    # Gemma (1)'s published config.json: hidden_act "gelu", which transformers reads as tanh's GELU
    "gemma": ("gemma", dict(rope_theta=500.0, hidden_act="gelu")),
    # OLMo-3's long-context releases (written by transformers 4.57): YaRN under rope_scaling for the full layers, one
    # rotary base, which transformers 5 gives the full layers only (the windowed ones its default, 500000)
    "olmo3-yarn": ("olmo3", dict(rope_theta=1000.0, layer_types=["sliding_attention", "full_attention"],
                                 rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                                   attention_factor=1.5, beta_fast=0.5, beta_slow=0.125))),
}


@pytest.mark.parametrize("case", OLDER_CONFIGS)
def test_older_config_fields_as_transformers_reads_them(case, tmp_path):
    t = need("transformers")
    family, older = OLDER_CONFIGS[case]
    tiny_hf(family).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "rope_parameters"} | older))
    theirs = t.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    # transformers reads the older fields (into its rope_parameters), so it is the reference for them
    rope = theirs.config.rope_parameters
    rope = rope.get("full_attention", rope)  # (OLMo-3's: per layer type)
    assert rope["rope_theta"] == older.get("rope_theta", older.get("rotary_emb_base"))
    assert rope["rope_type"] == older.get("rope_scaling", {}).get("type", older.get("rope_scaling", {}).get("rope_type", "default"))
    if family == "gpt_neox":
        assert rope["partial_rotary_factor"] == older["rotary_pct"]
    ours = models.from_pretrained(str(tmp_path))
    assert_same_logits(ours, theirs, (2, 48), seed=6)


@pytest.mark.parametrize("family", ["llama", "glm4"])
def test_rope_scaling_beside_rope_parameters_replaces_them_as_in_transformers(family, tmp_path):
    """A transformers 5 config.json (rope_parameters) with a rope_scaling added by hand, as a model card's long-context
    snippet says: transformers takes rope_scaling in place of rope_parameters (the base then config.json's top-level
    rope_theta, else the family's default), and so does models.py."""
    t = need("transformers")
    tiny_hf(family, **({"head_dim": 16} if family == "glm4" else {})).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in config and "rope_scaling" not in config
    yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
    (tmp_path / "config.json").write_text(json.dumps(config | {"rope_scaling": yarn}))
    theirs = t.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert theirs.config.rope_parameters["rope_type"] == "yarn"
    ours = models.from_pretrained(str(tmp_path))
    assert ours.config.rotary_scaling["rope_type"] == "yarn"
    assert_same_logits(ours, theirs, (2, 48), seed=6)


# fields a config.json may leave out, which transformers then gives its family's defaults (SmolLM3: a tied head, base 2e6,
# 4 key / value heads; OLMo-3: base 500000 on every layer, a window on three in four; OLMo-2, Phi-3: norm eps 1e-5;
# Command-R7B: a tied head, base 10000 (not Command-R's 500000), a window of 4096 on three layers in four)
LEFT_OUT = ("tie_word_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters", "num_key_value_heads", "sliding_window",
            "layer_types", "no_rope_layers")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "olmo3", "phi3", "cohere2",
                                    "ernie4_5", "nemotron", "ministral", "ministral3", "glm", "glm4", "apertus", "helium",
                                    "seed_oss", "exaone", "exaone4"])
def test_fields_left_out_as_transformers_reads_them(family, tmp_path):
    """(Llama: as many key / value heads as heads; Mistral: 8, and a window of 4,096; Qwen2 and Qwen3: 32, Qwen3's
    head_dim 128. ERNIE 4.5, GLM and GLM-4: their head_dim left out too, transformers' 128, not d_model / n_head; their 2 key / value
    heads; GLM's and GLM-4's biases on q, k, v and rotary embedding on half of each head, eps 1.5625e-7. Nemotron: its
    norm_eps left out too; the rotary embedding on half of each head, base 10000, untied. Ministral: 8 key / value heads,
    a window of 4,096 on every layer. Ministral 3: 8 key / value heads, its head_dim left out too, 128; YaRN of factor 16
    from 16,384 positions, its query scale of beta 0.1 from there; eps 1e-5. Apertus: as many key / value heads as heads,
    xIELU, no biases, Llama-3's scaling of factor 8 from 8,192 positions, base 12e6; eps 1e-5, untied. Helium: eps 1e-8,
    base 100,000, no biases, untied; its 20 key / value heads, kept here (they would not divide these 4 heads), seen in the
    config of a config.json of 40 heads; its head_dim, 128, kept too: its W_O, d_model square, leaves d_model / n_head
    the only head_dim (test_clear_errors refuses 128 for these heads). Seed-OSS: 8 key / value heads, head_dim 128,
    biases on q, k, v but not W_O, eps 1e-6, base 10,000, untied. EXAONE 3: 8 key / value heads, base 500,000, eps 1e-5. EXAONE 4: 32 key /
    value heads, its window pattern left out too: a window of 4,096 on three layers in four, the fourth without the
    rotary embedding, base 10,000, eps 1e-5)"""
    t = need("transformers")
    heads = dict(num_attention_heads=8, num_key_value_heads=4) if family == "smollm3" else dict(num_key_value_heads=4)
    if family in ("ernie4_5", "glm", "glm4"):  # their default: 2 key / value heads (16 query heads in the 0.3B)
        heads = dict(num_key_value_heads=2)
    if family in ("mistral", "ministral", "ministral3", "seed_oss", "exaone"):  # their default: 8 key / value heads
        # (Ministral 3's and Seed-OSS's head_dim 128)
        heads = dict(num_attention_heads=16, num_key_value_heads=8,
                     head_dim=128 if family in ("ministral3", "seed_oss") else 16)
    if family in ("llama", "qwen2", "qwen3", "exaone4"):  # Llama's: as many as heads (32 here); Qwen's, EXAONE 4's: 32
        heads = dict(num_attention_heads=32 if family in ("llama", "exaone4") else 64, num_key_value_heads=32,
                     head_dim=128 if family == "qwen3" else 16)
    if family == "helium":
        heads = dict(num_key_value_heads=4, head_dim=16)
    scale = dict(logit_scale=1.0) if family == "cohere2" else {}  # (kept: logits far enough from uniform to compare)
    tiny_hf(family, num_hidden_layers=4, **heads, **scale).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    left_out = LEFT_OUT + {"ernie4_5": ("head_dim",), "nemotron": ("norm_eps",), "ministral3": ("head_dim",),
                           "qwen3": ("head_dim",),
                           "glm": ("head_dim", "attention_bias", "partial_rotary_factor"),
                           "glm4": ("head_dim", "attention_bias", "partial_rotary_factor"),
                           "apertus": ("hidden_act", "attention_bias"),
                           "helium": ("hidden_act", "attention_bias", "mlp_bias"),
                           "seed_oss": ("head_dim", "attention_bias", "attention_out_bias", "mlp_bias"),
                           "exaone4": ("sliding_window_pattern",)}.get(family, ())
    if family in ("nemotron", "helium"):  # (num_key_value_heads kept: transformers 5's NemotronConfig leaves it None,
        # which its attention divides by; Helium's 20 would not divide these 4 heads)
        left_out = tuple(name for name in left_out if name != "num_key_value_heads")
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in left_out}))
    theirs = t.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ours = models.from_pretrained(str(tmp_path))
    assert ours.config.tied_head == (family in ("smollm3", "cohere2", "ernie4_5"))
    assert ours.config.n_kv_head == theirs.config.num_key_value_heads == {
        "ernie4_5": 2, "glm": 2, "glm4": 2, "ministral": 8, "ministral3": 8, "mistral": 8, "seed_oss": 8, "exaone": 8, "llama": 32,
        "qwen2": 32, "qwen3": 32, "exaone4": 32}.get(family, 4)
    if family in ("mistral", "qwen3"):
        assert ours.config.attn_window == (4096 if family == "mistral" else 0) and ours.config.d_head == theirs.config.head_dim
    if family in ("ernie4_5", "glm", "glm4"):
        assert ours.config.d_head == theirs.config.head_dim == 128
    if family in ("glm", "glm4"):
        assert ours.config.rotary_dims == 64 and ours.config.qkv_bias and ours.config.norm_eps == theirs.config.rms_norm_eps
    if family == "nemotron":
        assert ours.config.rotary_dims == 8 and ours.config.norm_eps == 1e-5
    if family == "apertus":
        assert ours.config.rotary_scaling == dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=8192)
        assert ours.config.rotary_base == 12e6 and ours.config.norm_eps == 1e-5 and not ours.config.qkv_bias
    if family == "helium":
        assert ours.config.norm_eps == 1e-8 and ours.config.rotary_base == 1e5
        assert not (ours.config.qkv_bias or ours.config.mlp_bias) and ours.config.rotary_interleaved
        sizes = dict(vocab_size=96, max_position_embeddings=64, hidden_size=2560, intermediate_size=96, num_hidden_layers=1,
                     num_attention_heads=40, head_dim=64)
        config = models.family_config(dict(sizes, model_type="helium"), "config.json")[0]
        assert config["n_kv_head"] == t.HeliumConfig(**sizes).num_key_value_heads == 20
    if family == "seed_oss":
        assert ours.config.d_head == theirs.config.head_dim == 128 and ours.config.qkv_bias and not ours.config.out_bias
        assert ours.config.norm_eps == 1e-6 and ours.config.rotary_base == 1e4 and not ours.config.mlp_bias
    if family == "ministral":
        assert ours.config.attn_window == [theirs.config.sliding_window] * 4 == [4096] * 4
    if family == "ministral3":
        assert ours.config.d_head == theirs.config.head_dim == 128 and ours.config.norm_eps == 1e-5
        assert ours.config.rotary_scaling["factor"] == 16 and ours.config.rotary_base == 1e6
        assert (ours.config.query_scale_beta, ours.config.query_scale_period) == (0.1, 16384)
    if family == "exaone":
        assert ours.config.rotary_base == 500000.0 and ours.config.norm_eps == 1e-5
    if family == "exaone4":
        assert ours.config.attn_window == [theirs.config.sliding_window] * 3 + [0] == [4096] * 3 + [0]
        assert ours.config.no_rotary_layers == [3] and ours.config.rotary_base == 10000.0 and ours.config.norm_eps == 1e-5
    if family == "olmo3":  # a window too long to see in these inputs: the config shows it
        assert ours.config.attn_window == [theirs.config.sliding_window] * 3 + [0] and theirs.config.sliding_window == 4096
    assert_same_logits(ours, theirs, (2, 48), seed=6)


@pytest.mark.parametrize("layout", ["exaone", "transformers"])
def test_an_exaone_config_as_released_reads_as_transformers_reads_it(layout, tmp_path):
    """EXAONE 3's config.json as released: the layer count, the norm's eps and the activation under its own names
    (num_layers, layer_norm_epsilon, activation_function), which transformers takes over Llama's names where both are
    (here Llama's too, with other values); Llama-3's scaling under rope_scaling, the base at the top level. Its weights
    as save_pretrained writes them, under EXAONE's names (transformer.h.N.attn.attention.q_proj, mlp.c_fc_0, ...), or in
    transformers' own layout (save_original_format=False): Llama's names."""
    t = need("transformers")
    tiny_hf("exaone").save_pretrained(tmp_path, save_original_format=layout == "exaone")
    stored = formats.safetensors_loaders(str(tmp_path / "model.safetensors"))
    assert ("transformer.h.1.mlp.c_fc_0.weight" in stored) == (layout == "exaone") != ("model.embed_tokens.weight" in stored)
    config = json.loads((tmp_path / "config.json").read_text())
    released = dict(num_layers=2, layer_norm_epsilon=1e-3, activation_function="silu", rope_theta=1e6, rope_scaling=LLAMA3)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "rope_parameters"} | released
                                                     | dict(num_hidden_layers=3, rms_norm_eps=0.5, hidden_act="gelu")))
    theirs = t.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ours = models.from_pretrained(str(tmp_path))
    assert theirs.config.num_hidden_layers == ours.config.n_layer == 2 and theirs.config.hidden_act == "silu"
    assert theirs.config.rms_norm_eps == ours.config.norm_eps == 1e-3 and ours.config.rotary_base == 1e6
    assert ours.config.rotary_scaling["rope_type"] == theirs.config.rope_parameters["rope_type"] == "llama3"
    assert_same_logits(ours, theirs, (2, 48), seed=6)


# EXAONE 4's config.json as released (4 layers here): the 32B's window pattern as a string beside its layer_types, the
# 1.2B's null window and pattern beside its layer_types, all global; Llama-3's scaling under rope_scaling, the base at
# the top level
EXAONE4_RELEASED = {"32b": dict(sliding_window=5, sliding_window_pattern="LLLG",
                                layer_types=["sliding_attention"] * 3 + ["full_attention"]),
                    "1.2b": dict(sliding_window=None, sliding_window_pattern=None, layer_types=["full_attention"] * 4,
                                 tie_word_embeddings=True)}


@pytest.mark.parametrize("size", EXAONE4_RELEASED)
def test_an_exaone4_config_as_released_reads_as_transformers_reads_it(size, tmp_path):
    """The layer types as given, the pattern (a string, which transformers cannot build them from) unread: the 32B's window
    on layers 0-2, layer 3 global without the rotary embedding; the 1.2B's full attention and the rotary embedding on
    every layer."""
    t = need("transformers")
    tied = EXAONE4_RELEASED[size].get("tie_word_embeddings", False)
    tiny_hf("exaone4", num_hidden_layers=4, sliding_window=5, tie_word_embeddings=tied).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    released = EXAONE4_RELEASED[size] | dict(rope_theta=1e6, rope_scaling=LLAMA3)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "rope_parameters"} | released))
    theirs = t.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ours = models.from_pretrained(str(tmp_path))
    windowed = size == "32b"
    assert ours.config.attn_window == ([5] * 3 + [0] if windowed else [0] * 4) and ours.config.tied_head == tied
    assert ours.config.no_rotary_layers == ([3] if windowed else []) and ours.config.rotary_scaling["rope_type"] == "llama3"
    assert_same_logits(ours, theirs, (2, 48), seed=6)


@pytest.mark.parametrize("family", ["gptj", "gpt_bigcode"])
def test_gptj_and_gpt_bigcode_fields_left_out_as_transformers_reads_them(family, tmp_path):
    """Their defaults, not GPT-2's: GPT-BigCode's multi-query attention and tanh's GELU; GPT-J's gelu_new and untied
    output layer."""
    t = need("transformers")
    tiny_hf(family).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    left_out = ("activation_function", "tie_word_embeddings", "layer_norm_epsilon", "n_inner", "multi_query",
                "num_key_value_heads", "scale_attn_weights", "attention_softmax_in_fp32", "scale_attention_softmax_in_fp32")
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in left_out}))
    theirs = t.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ours = models.from_pretrained(str(tmp_path))
    assert ours.config.n_kv_head == (1 if family == "gpt_bigcode" else 4) and ours.config.tied_head == (family == "gpt_bigcode")
    assert_same_logits(ours, theirs, (2, 48), seed=6)


def assert_same_logits(ours, theirs, shape, seed):
    """On random tokens of `shape` (seeded), ours gives transformers' logits within 1e-4 (logits that vary: std > 1)."""
    x = torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = theirs(x).logits
    assert want.std() > 1.0 and (ours(x) - want).abs().max() <= 1e-4


def assert_generates_as(ours, theirs, prompt, n):
    """Greedy generation of n tokens after `prompt` gives transformers' tokens, and its logits at every step (ours seen
    at the output layer, within 1e-4)."""
    out = theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt), output_logits=True, return_dict_in_generate=True)
    seen = []
    hook = ours.head.register_forward_hook(lambda module, args, out: seen.append(out[:, -1]))
    try:
        assert torch.equal(ours.generate(prompt, n, temperature=0), out.sequences)
    finally:
        hook.remove()
    assert len(seen) == n and (torch.stack(seen) - torch.stack(out.logits)).abs().max() <= 1e-4


def test_longrope_takes_its_short_or_long_factors_as_transformers_does(tmp_path):
    """Phi's LongRoPE: the short factors for a forward whose positions all lie within the original context
    (16 here), the long ones for a forward that reaches past it, whether its config.json names it "longrope" or,
    as older Phi-3 ones do, "su". With a cache, each step chooses by its own position, the keys cached before it
    keeping theirs, as transformers' forward computes; generate, as transformers' Phi-3 generate, runs the whole
    sequence again at the first step past the original context, so that every key takes the long factors."""
    t = need("transformers")
    tiny_hf("phi3", **PHI3_LONGROPE).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = {k: v for k, v in config["rope_parameters"].items() if k not in ("rope_type", "rope_theta", "partial_rotary_factor")}
    su = {k: v for k, v in config.items() if k != "rope_parameters"} | dict(rope_scaling=rope | {"type": "su"}, rope_theta=10000.0,
                                                                           partial_rotary_factor=0.75)
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(6))
    for written in (config, su):
        (tmp_path / "config.json").write_text(json.dumps(written))
        theirs = t.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
        ours = models.from_pretrained(str(tmp_path))
        scale = theirs.model.rotary_emb.attention_scaling
        assert ours.config.rotary_scaling["attention_factor"] == scale and abs(scale - 1.5 ** 0.5) < 1e-12
        for length in (16, 17):  # all within the original context (short factors), then one position past it (long)
            with torch.no_grad():
                want = theirs(x[:, :length]).logits
            assert want.std() > 1.0 and (ours(x[:, :length]) - want).abs().max() <= 1e-4, length
    # 12 tokens, then one at a time with a cache to position 23: positions 16 on take the long factors, 0-15 keep the short
    with torch.no_grad():
        step = theirs(x[:, :12], use_cache=True)
        want, past = [step.logits[:, -1]], step.cache
        for i in range(12, 24):
            step = theirs(x[:, i:i + 1], cache=past, use_cache=True)
            want.append(step.logits[:, -1])
    cache = {}
    got = [ours(x[:, :12], cache)[:, -1]] + [ours(x[:, i:i + 1], cache)[:, -1] for i in range(12, 24)]
    assert (torch.stack(got) - torch.stack(want)).abs().max() <= 1e-4
    # generate: the same tokens and the same logits at each step (ours seen at the output layer)
    assert_generates_as(ours, theirs, x[:, :12], 12)
    with pytest.raises(ValueError, match=r"tokens must be an integer tensor \(batch, seq\), got torch.int64 \(12,\)"):
        ours.generate(x[0, :12], 12)  # one sequence without its batch dimension: the one-line error of any model


def test_gpt_oss_fields_left_out_as_transformers_reads_them(tmp_path):
    """A gpt-oss config.json without its rotary embedding (then transformers' YaRN: factor 32 of 4,096 positions, base
    150,000, not truncated), window, layer types, clamp, norm eps, biases' flag or tied flag: transformers' defaults."""
    t = need("transformers")
    tiny_hf("gpt_oss", num_key_value_heads=8, num_attention_heads=8, head_dim=8, swiglu_limit=7.0).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    left_out = ("rope_parameters", "rope_theta", "sliding_window", "layer_types", "swiglu_limit", "swiglu_alpha", "rms_norm_eps",
                "attention_bias", "tie_word_embeddings", "num_key_value_heads")
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in left_out}))
    theirs = t.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ours = models.from_pretrained(str(tmp_path))
    assert ours.config.attn_window == [theirs.config.sliding_window, 0] == [128, 0] and ours.config.n_kv_head == 8
    assert ours.config.rotary_scaling["truncate"] is False and ours.config.rotary_base == 150000.0
    assert_same_logits(ours, theirs, (2, 48), seed=6)


def test_a_gpt_oss_without_head_dim_has_transformers_default_64(tmp_path):
    """GptOssConfig's head_dim defaults to 64 (the released models' 2,880 / 64 heads is not 64), not hidden_size / heads."""
    t = need("transformers")
    tiny_hf("gpt_oss", head_dim=64).save_pretrained(tmp_path)  # 4 heads of 64 on a width of 64
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "head_dim"}))
    theirs = t.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ours = models.from_pretrained(str(tmp_path))
    assert ours.config.d_head == theirs.config.head_dim == 64
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("case", ["llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "stablelm-parallel", "granite",
                                  "cohere", "cohere2", "olmo2", "olmo3", "olmo3-yarn", "phi", "starcoder2", "olmo",
                                  "phi3-longrope", "gptj",
                                  "gpt_bigcode", "gpt_bigcode-mha-unscaled", "bloom", "mpt-clip-scaled-untied", "gemma2",
                                  "gemma3", "gemma2-exact-gelu", "gemma3-exact-gelu", "gemma", "gpt2", "gpt2-unscaled",
                                  "gpt_neo", "gpt_neox-parallel", "gpt_neox-sequential", "ernie4_5",
                                  "ernie4_5-biases-untied-yarn", "arcee", "arcee-biases-tied-yarn", "glm",
                                  "glm-no-biases-tied-yarn", "glm4", "glm4-whole-head", "nemotron",
                                  "nemotron-biases-tied-linear", "ministral", "ministral3", "ministral3-window",
                                  "falcon-7b", "falcon-40b", "falcon-11b", "falcon-rw", "falcon-mha-biases-linear",
                                  "apertus", "apertus-biases-tied-yarn", "helium", "helium-biases-tied-linear", "seed_oss",
                                  "seed_oss-out-bias-tied-yarn", "exaone", "exaone-biases-tied", "exaone4",
                                  "exaone4-every-other", "exaone4-global-tied-llama3"])
def test_in_bfloat16_the_logits_of_transformers_in_bfloat16(case, tmp_path):
    """The model and transformers' both cast to bfloat16 compute the same logits, to the bit: each part rounds where
    transformers' rounds (the norms in float32, OLMo-2's weights too, Cohere's step by step; Cohere's rotary embedding
    in float32 on its interleaved pairs as stored, OLMo-2's with float32 tables, Llama's and StableLM's in bfloat16, and
    so Mistral's, Qwen2's, Qwen3's (its q / k norms too), SmolLM3's and Phi-3's (on part of each head); OLMo's bare
    LayerNorms in float32; Phi's gelu_new step by step, its attention's and MLP's outputs summed before the residual;
    LongRoPE's short and long frequencies both rounded to bfloat16 with the model, its attention factor applied to cos / sin in float32;
    GPT-J's frequencies kept in float32, its sines and cosines rounded to bfloat16, as its table is, its interleaved pairs turned as stored;
    ERNIE 4.5's interleaved pairs turned in float32 with float32 tables; Arcee's ReLU² in bfloat16; GLM's and GLM-4's
    interleaved pairs of part of each head turned in bfloat16, GLM-4's norms after attention and the MLP in float32;
    Nemotron's LayerNorm1P in bfloat16, its 1 + weight too; Ministral 3's query scale rounded to bfloat16 before it
    multiplies; Apertus's xIELU in bfloat16 step by step, its softplus of its parameters too; Helium's RMSNorm weights
    multiplied in float32, its interleaved pairs turned in bfloat16; Seed-OSS's as Llama's; EXAONE 4's norms
    after attention and the MLP and on each head's q and k in float32, their weights in bfloat16;
    MPT's ALiBi bias added in float32, BLOOM's rounded to bfloat16 within the scores' product, and BLOOM's GELU step by step;
    Falcon's biases added after each product, its ALiBi bias rounded to bfloat16 and given to scaled_dot_product_attention;
    Gemma's norms times 1 + weight in float32, Gemma-2's soft-capped scores' softmax in float32;
    GPT-2's gelu_new step by step, GPT-Neo's too, its scores in float32; GPT-NeoX's parallel attention's and MLP's outputs
    summed before the residual)."""
    family, options = CASES[case]
    theirs = tiny_hf(family, **options)
    theirs.save_pretrained(tmp_path)
    ours = models.from_pretrained(str(tmp_path)).to(torch.bfloat16)
    theirs = theirs.to(torch.bfloat16)
    x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for length in (16, 40):  # (LongRoPE: within its original context of 16, and past it)
            assert torch.equal(ours(x[:, :length]), theirs(x[:, :length]).logits), length


def test_nemotron_layernorm1p_under_autocast_is_transformers(monkeypatch):
    """Nemotron's LayerNorm1P (models.PlusOneLayerNorm) as transformers' NemotronLayerNorm1P computes it, to the bit and
    in its dtype: without autocast in x's dtype (float32, bfloat16); under autocast, x, 1 + weight and the bias cast to the
    autocast dtype where torch.is_autocast_enabled() says so (CUDA's autocast, as train_lm.py runs: here the CPU's
    standing in for it), and the norm then computed in that dtype with autocast off; under the CPU's autocast alone, in
    x's dtype."""
    nemotron = need("transformers.models.nemotron.modeling_nemotron")
    g = torch.Generator().manual_seed(0)
    theirs = nemotron.NemotronLayerNorm1P(64, eps=1e-3)
    ours = models.PlusOneLayerNorm(64, 1e-3)
    weight, bias = (0.3 * torch.randn(64, generator=g) for _ in range(2))
    with torch.no_grad():
        for module in (theirs, ours):
            module.weight.copy_(weight)
            module.bias.copy_(bias)
    x = 3 * torch.randn(4, 10, 64, generator=g)

    def same(x):
        want, got = theirs(x), ours(x)
        assert got.dtype == want.dtype and torch.equal(got, want), (x.dtype, want.dtype, got.dtype)

    for inputs in (x, x.bfloat16()):
        same(inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the CPU's autocast: not the one transformers looks at
            same(inputs)
    enabled = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: enabled(device_type or "cpu"))
    for inputs in (x, x.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            same(inputs)


def test_softcapped_attention_in_bfloat16_is_transformers_eager_attention():
    """Gemma-2's soft-capped attention in bfloat16 as transformers' eager attention (the one its from_pretrained takes)
    computes it, to the bit, with a window and without: its softmax in float32, rounded once (one in bfloat16 differs
    once in about a million probabilities, which these 64 sequences of 40 reach)."""
    gemma2 = need("transformers.models.gemma2.modeling_gemma2")
    module = types.SimpleNamespace(num_key_value_groups=2, training=False, head_dim=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (2 * torch.randn(64, heads, 40, 16, generator=g).bfloat16() for heads in (8, 4, 4))
    i, j = torch.arange(40)[:, None], torch.arange(40)
    for window in (0, 5):
        visible = (j <= i) & (j > i - window) if window else j <= i
        mask = torch.zeros(40, 40, dtype=torch.bfloat16).masked_fill(~visible, torch.finfo(torch.bfloat16).min)
        want, _ = gemma2.eager_attention_forward(module, q, k, v, mask, scaling=24 ** -0.5, softcap=5.0)
        assert torch.equal(models.softcapped_attention(q, k, v, window, 24 ** -0.5, 5.0).transpose(1, 2), want), window


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gptj_in_half_precision_the_logits_of_transformers_to_the_bit(dtype, tmp_path):
    """GPT-J's rotary embedding turns the interleaved pairs (2i, 2i + 1) of q and k as stored, each head's dims left in
    transformers' order, so the scores sum q . k in its order too: reordered to "rotate_half" pairs, the same products
    summed otherwise change the logits' last bits in bfloat16 and float16 (GPT-J-6B's float16 branch). Heads of 64 dims,
    GPT-J-6B's rotary_dim, on more inputs than the bfloat16 test above."""
    theirs = tiny_hf("gptj", n_embd=128, n_head=2, rotary_dim=64)
    theirs.save_pretrained(tmp_path)
    ours, theirs = models.from_pretrained(str(tmp_path)).to(dtype), theirs.to(dtype)
    x = torch.randint(0, 96, (8, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family,options", [("cohere", dict(use_qk_norm=True)), ("cohere2", dict(sliding_window=5))])
def test_cohere_in_half_precision_the_logits_of_transformers_to_the_bit(family, options, dtype, tmp_path):
    """Command-R's and Command-R7B's heads of 128 dims, as released: the rotary embedding turns their interleaved pairs
    as stored (q . k summed in transformers' order, not reordered to "rotate_half" pairs), and the LayerNorms (Command-R's
    per-head q / k norms too) normalise step by step as transformers' CohereLayerNorm (torch's layer_norm rounds
    otherwise in float32's last bits): either way otherwise, some of these inputs' logits differ in the last bits."""
    theirs = tiny_hf(family, hidden_size=256, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                     logit_scale=0.5, **options)
    theirs.save_pretrained(tmp_path)
    ours, theirs = models.from_pretrained(str(tmp_path)).to(dtype), theirs.to(dtype)
    assert ours.config.d_head == 128
    x = torch.randint(0, 96, (8, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_as_safetensors_reads_them(dtype, tmp_path):
    """A model saved in bfloat16 or float16 (as most checkpoints come): every tensor formats.py reads is
    the safetensors package's, its dtype included; and the model built from them gives the logits of
    the transformers model with those same half-precision weights (computed in float32)."""
    t, st = need("transformers"), need("safetensors.torch")
    theirs = tiny_hf("llama", tie_word_embeddings=False).to(dtype)
    theirs.save_pretrained(tmp_path)
    want = st.load_file(tmp_path / "model.safetensors")
    got = {name: load() for name, load in formats.safetensors_loaders(tmp_path / "model.safetensors").items()}
    assert set(got) == set(want) and all(w.dtype == dtype for w in want.values())
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    # every dtype safetensors writes that this reader knows, with values each dtype tells apart
    floats, ints = torch.tensor([[0.5, -1.25, 3.0], [1e-3, 250.0, -7.0]]), torch.tensor([[0, -1, 3], [100, 2, -7]])
    every = {str(d): floats.to(d) for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
    every |= {str(d): ints.to(d) for d in (torch.int64, torch.int32, torch.int16, torch.int8)}
    every |= {"uint8": ints.abs().to(torch.uint8) + 150, "bool": ints > 0}
    st.save_file(every, tmp_path / "every.safetensors")
    read = {name: load() for name, load in formats.safetensors_loaders(tmp_path / "every.safetensors").items()}
    for name, tensor in st.load_file(tmp_path / "every.safetensors").items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
    # (loaded again in float32: .float() on the model in memory would keep its rotary frequencies rounded to dtype)
    theirs = t.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert {p.dtype for p in theirs.parameters()} == {torch.float32}
    x = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = theirs(x).logits
    assert logits.std() > 1.0 and (models.from_pretrained(str(tmp_path))(x) - logits).abs().max() <= 1e-4


def test_the_text_model_of_a_multimodal_gemma3(tmp_path):
    """A Gemma3ForConditionalGeneration folder (its text model's config under text_config, its weights
    beside a vision tower's): the text model alone, with the logits and greedy tokens of the whole
    model on text."""
    t = need("transformers")
    text_config = dict(vocab_size=96, max_position_embeddings=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=96, bos_token_id=0, eos_token_id=0, sliding_window_pattern=2, **GEMMA)
    vision_config = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, image_size=28, patch_size=14)
    theirs = randomize(t.Gemma3ForConditionalGeneration(t.Gemma3Config(text_config=text_config, vision_config=vision_config,
                                                                        mm_tokens_per_image=4)), 5)
    theirs.save_pretrained(tmp_path)
    ours = models.from_pretrained(str(tmp_path))
    assert ours.config.family == "gemma3" and ours.config.attn_window == [5, 0] and ours.config.qk_norm
    assert_same_logits(ours, theirs, (2, 40), seed=4)
    assert_generates_as(ours, theirs, torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(4)), 20)


@pytest.mark.parametrize("text", ["ministral3", "mistral"])
@pytest.mark.parametrize("tied", [False, True])
def test_the_text_model_of_a_multimodal_mistral3(text, tied, tmp_path):
    """A Mistral3ForConditionalGeneration folder, as Ministral 3 (Ministral-3-3B / -8B / -14B: a ministral3 text model)
    and Mistral Small 3.1 / 3.2 (a mistral one) are released: the text model under text_config, its weights beside a
    Pixtral vision tower's; the text model alone, with the logits and greedy tokens of the whole model on text, its
    output layer tied by the top-level flag as transformers ties it (the 3B's tied, the 8B's and 14B's not)."""
    t = need("transformers")
    text_config = dict(model_type=text, vocab_size=96, max_position_embeddings=64, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96, bos_token_id=0,
                       eos_token_id=0, tie_word_embeddings=tied)
    if text == "ministral3":  # its YaRN and its queries scaled past position 16
        text_config["rope_parameters"] = dict(rope_type="yarn", rope_theta=1000.0, factor=4.0, original_max_position_embeddings=16,
                                              beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                              llama_4_scaling_beta=0.5)
    vision_config = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         head_dim=16, image_size=28, patch_size=14)
    randomize(t.Mistral3ForConditionalGeneration(t.Mistral3Config(text_config=text_config, vision_config=vision_config,
                                                                  tie_word_embeddings=tied)), 5).save_pretrained(tmp_path)
    theirs = t.Mistral3ForConditionalGeneration.from_pretrained(tmp_path).float().eval()
    ours = models.from_pretrained(str(tmp_path))
    assert ours.config.family == "mistral3" and ours.config.tied_head == tied
    assert (ours.config.query_scale_beta, ours.config.query_scale_period) == ((0.5, 16) if text == "ministral3" else (0.0, 0))
    assert_same_logits(ours, theirs, (2, 40), seed=4)
    assert_generates_as(ours, theirs, torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(4)), 20)
    config = json.loads((tmp_path / "config.json").read_text())
    for bad, message in [(dict(text_config=None), "a mistral3 config.json needs its language model's config under text_config"),
                         (dict(text_config=config["text_config"] | dict(model_type="llama")),
                          "text_config's model_type 'llama' is not implemented in a mistral3")]:
        (tmp_path / "config.json").write_text(json.dumps(config | bad))
        with pytest.raises(ValueError, match=message):
            models.from_pretrained(str(tmp_path))


def test_xielu_is_transformers_xielu_activation_to_the_bit():
    """models.XIELU (Apertus's activation) against transformers' XIELUActivation (its Python path) with the same
    parameters and buffers, to the bit in float32 and bfloat16: on inputs of both signs, around 0 and around eps (-0.3
    here), where min(x, eps) cuts in."""
    activations = need("transformers.activations")
    theirs, ours = activations.XIELUActivation(dtype=torch.float32), models.XIELU()
    with torch.no_grad():
        for module in (theirs, ours):
            module.alpha_p.fill_(0.4)
            module.alpha_n.fill_(-1.3)
            module.beta.fill_(0.7)
            module.eps.fill_(-0.3)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([3 * torch.randn(4000, generator=g), 0.4 * torch.rand(2000, generator=g) - 0.5,
                   torch.tensor([0.0, -0.0, -0.3, 1e-30, -1e-30])])
    for dtype in (torch.float32, torch.bfloat16):
        theirs, ours = theirs.to(dtype), ours.to(dtype)
        want, got = theirs(x.to(dtype)), ours(x.to(dtype))
        assert got.dtype == want.dtype == dtype and torch.equal(got, want), dtype
    assert (ours(x.bfloat16()) != models.XIELU().bfloat16()(x.bfloat16())).any()  # (the parameters matter)
    with pytest.raises(ValueError, match=r"activation='xielu' \(with parameters of its own\) in a mixture of experts is not"):
        models.TransformerConfig(norm="rmsnorm", experts=4, experts_used=2, d_expert=8, activation="xielu")


def test_apertus_xielu_parameters_load_and_a_checkpoint_carries_them(tmp_path):
    """Apertus's xIELU parameters (alpha_p, alpha_n, beta, eps of each layer) are weights: read from the folder, where
    config.json with only a top-level rope_theta takes transformers' Llama-3 scaling of base 12e6 all the same; they change
    the logits, and a checkpoint carries them, finetuned (alpha_p, alpha_n) or not (beta, eps: buffers, as transformers')."""
    t = need("transformers")
    tiny_hf("apertus").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "rope_parameters"} |
                                                     {"rope_theta": 500.0}))
    theirs = t.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ours = models.from_pretrained(str(tmp_path))
    assert ours.config.rotary_base == theirs.config.rope_parameters["rope_theta"] == 12e6
    assert ours.config.rotary_scaling["rope_type"] == "llama3"
    for mine, their in zip(ours.blocks, theirs.model.layers):
        assert all(torch.equal(getattr(mine.mlp.act, name), getattr(their.mlp.act_fn, name))
                   for name in ("alpha_p", "alpha_n", "beta", "eps"))
    assert [block.mlp.act.eps.item() for block in ours.blocks] == pytest.approx([-0.2, -0.4])
    assert_same_logits(ours, theirs, (2, 48), seed=6)
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    fresh = models.model_from_config(ours.config.to_dict())
    fresh.load_state_dict({k: v for k, v in ours.state_dict().items() if ".act." not in k}, strict=False)
    with torch.no_grad():
        assert (fresh(x) - ours(x)).abs().max() > 1e-2
        for block in ours.blocks:
            block.mlp.act.alpha_p.add_(0.5)
            block.mlp.act.beta.add_(0.25)
    runs.save_checkpoint(tmp_path / "run.pt", ours, step=1)
    state = runs.load_checkpoint(tmp_path / "run.pt")
    loaded = models.model_from_config(state["config"])
    loaded.load_state_dict(state["model"])
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), ours(x))


@pytest.mark.parametrize("tied", [False, True])
def test_the_text_model_of_a_multimodal_apertus1p5(tied, tmp_path):
    """An Apertus1p5ForConditionalGeneration folder (Apertus 1.5: its text model under text_config, its weights beside a
    vision and an audio tokenizer's): the text model alone, with the logits and greedy tokens of the whole model on text,
    tied or not by the top-level flag as transformers ties it (text_config's says the opposite here); an output layer
    pruned to fewer rows than the vocabulary (text_config's output_vocab_size) is refused in one line."""
    t = need("transformers")
    text_config = dict(vocab_size=96, max_position_embeddings=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=96, bos_token_id=0, eos_token_id=0, pad_token_id=None,
                       rope_parameters=dict(rope_type="default", rope_theta=500.0), tie_word_embeddings=not tied)
    vision = dict(codebook_size=16, embed_dim=8, latent_channels=8, base_channels=32, channel_multiplier=[1, 1],
                  num_res_blocks=1, attn_resolutions=[], resolution=32)
    audio = dict(model_type="wavtokenizer_encoder", codebook_size=16, codebook_dim=32, hidden_size=32, num_filters=4,
                 upsampling_ratios=[2, 2], num_lstm_layers=1)
    theirs = randomize(t.Apertus1p5ForConditionalGeneration(t.Apertus1p5Config(
        text_config=text_config, vision_config=vision, audio_config=audio, image_token_offset=40, audio_token_offset=56,
        image_token_id=90, audio_token_id=91, tie_word_embeddings=tied)), 5)
    conftest.apertus_xielu(theirs.model.language_model.layers)
    theirs.save_pretrained(tmp_path)
    ours = models.from_pretrained(str(tmp_path))
    assert ours.config.family == "apertus1p5" and ours.config.tied_head == tied and ours.config.activation == "xielu"
    assert_same_logits(ours, theirs, (2, 40), seed=4)
    assert_generates_as(ours, theirs, torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(4)), 20)
    config = json.loads((tmp_path / "config.json").read_text())
    for bad, message in [(dict(text_config=None), "an apertus1p5 config.json needs its language model's config under text_config"),
                         (dict(text_config=config["text_config"] | dict(output_vocab_size=72)),
                          "output_vocab_size=72: Apertus 1.5's output layer pruned to fewer rows than its vocabulary of 96 "
                          "is not implemented")]:
        (tmp_path / "config.json").write_text(json.dumps(config | bad))
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            models.from_pretrained(str(tmp_path))
        assert "\n" not in str(e.value)


MOE_CASES = [case for case, (family, _) in CASES.items() if family in conftest.MOE]


@pytest.mark.parametrize("case", MOE_CASES)
def test_the_tiny_mixtures_of_experts_route_as_a_real_one(case, tmp_path):
    """What the mixture-of-experts cases above rely on to tell a wrong router from a right one: in each
    mixture layer every expert gets tokens, tokens go to different pairs of experts, the two chosen
    probabilities sum to less than 1 (renormalising them changes the weights) and Qwen2-MoE's shared
    expert's gate is neither shut nor open; the layers transformers makes dense are dense."""
    family, options = CASES[case]
    tiny_hf(family, **options).save_pretrained(tmp_path)
    ours = models.from_pretrained(str(tmp_path))
    config = ours.config
    assert config.experts == 4 and config.experts_used == 2
    assert config.experts_renormalised == (family == "mixtral" or options.get("norm_topk_prob", False))
    dense = options.get("mlp_only_layers", []) + ([0] if options.get("decoder_sparse_step") == 2 else [])
    assert [type(block.mlp) for block in ours.blocks] == [models.MLP if i in dense else models.MoE for i in range(config.n_layer)]
    inputs = {}
    hooks = [block.mlp.register_forward_pre_hook(lambda module, args, i=i: inputs.update({i: args[0].flatten(0, 1)}))
             for i, block in enumerate(ours.blocks) if isinstance(block.mlp, models.MoE)]
    with torch.no_grad():
        ours(torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(3)))
        for hook in hooks:
            hook.remove()
        for i, x in inputs.items():
            moe = ours.blocks[i].mlp
            top, chosen = moe.router(x).softmax(-1).topk(2, -1)
            assert chosen.unique().tolist() == [0, 1, 2, 3], i
            assert len(set(map(tuple, chosen.sort(-1).values.tolist()))) >= 4, i  # of the 6 pairs
            assert top.sum(-1).mean() < 0.95 and top.sum(-1).min() < 0.8, i
            if moe.shared is not None:
                gate = torch.sigmoid(moe.shared_gate(x))
                assert 0.05 < gate.mean() < 0.95 and gate.std() > 0.1, i


@pytest.mark.parametrize("family", list(conftest.MOE))
def test_a_mixture_saved_in_transformers_5s_own_layout_loads(family, tmp_path):
    """save_pretrained(save_original_format=False) writes a mixture as transformers 5 holds it, and its
    from_pretrained reads it: each expert matrix of all experts as one tensor named without .weight, gate and
    up as one gate_up_proj, Mixtral's block_sparse_moe as mlp. The same model as the experts one by one."""
    theirs = tiny_hf(family, **(dict(num_hidden_layers=3, mlp_only_layers=[0]) if family == "qwen2_moe" else {}))
    theirs.save_pretrained(tmp_path, save_original_format=False)
    stored = formats.weight_loaders(str(tmp_path))
    assert "model.layers.1.mlp.experts.gate_up_proj" in stored and "model.layers.1.mlp.gate.weight" in stored
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (models.from_pretrained(str(tmp_path))(x) - theirs(x).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("family", list(conftest.MOE) + ["gpt_oss"])
def test_a_mixture_in_bfloat16_is_transformers_expert_loop_exactly(family, tmp_path):
    """In bfloat16 each family weighs its experts' outputs as transformers' own loop over experts does
    (its "eager" experts): Qwen2-MoE, Qwen3-MoE and OLMoE by the weights rounded to bfloat16, Mixtral by the
    float32 weights, the product rounded. gpt-oss too, whose transformers rounds where Llama's does not: its
    RMSNorm multiplies the weight in float32, its experts add their biases after the rounded products, and its
    attention subtracts the largest score (sinks included) in bfloat16 before the softmax."""
    theirs = tiny_hf(family)
    theirs.save_pretrained(tmp_path)
    ours = models.from_pretrained(str(tmp_path)).to(torch.bfloat16)
    theirs = theirs.to(torch.bfloat16)
    theirs.set_experts_implementation("eager")
    x = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x).logits)


def test_mxfp4_dequantised_as_transformers_dequantises_it_to_the_bit():
    """formats.dequantise_mxfp4 (then laid out (expert, in, out)) is transformers' convert_moe_packed_tensors bit for bit,
    over every code in both nibbles and every scale but 255 (2^128: infinite, and 0 times it not a number)."""
    mxfp4_hf = need("transformers.integrations.mxfp4")
    blocks, scales = mxfp4((3, 10, 4), torch.Generator().manual_seed(8))
    scales[0, 0] = torch.tensor([0, 1, 127, 254])  # the extremes: 2^-127 (a float32 subnormal), 2^-126, 1, 2^127
    want = mxfp4_hf.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    got = formats.dequantise_mxfp4(blocks, scales).transpose(1, 2)
    assert want.shape == got.shape == (3, 128, 10) and got.dtype == torch.float32
    assert torch.equal(got.contiguous().view(torch.int32), want.view(torch.int32))  # -0.0 too


def test_a_gpt_oss_with_its_experts_in_mxfp4_loads(tmp_path, monkeypatch):
    """A gpt-oss folder as released: config.json's quantization_config mxfp4, each expert matrix stored as _blocks and
    _scales instead of gate_up_proj and down_proj. Its experts are the dequantised weights exactly, its logits the
    model's with them (transformers' own dequantisation written into its parameters)."""
    mxfp4_hf, st = need("transformers.integrations.mxfp4"), need("safetensors.torch")
    theirs, g, quantised = tiny_hf("gpt_oss"), torch.Generator().manual_seed(9), {}
    with torch.no_grad():
        for i, layer in enumerate(theirs.model.layers):
            for name, rows, cols in (("gate_up_proj", 2 * 96, 64), ("down_proj", 64, 96)):
                blocks, scales = mxfp4((4, rows, cols // 32), g, (122, 126))
                getattr(layer.mlp.experts, name).copy_(mxfp4_hf.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
                quantised |= {f"model.layers.{i}.mlp.experts.{name}_blocks": blocks, f"model.layers.{i}.mlp.experts.{name}_scales": scales}
    theirs.save_pretrained(tmp_path)
    stored = st.load_file(tmp_path / "model.safetensors")
    stored = {name: t for name, t in stored.items() if not name.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    st.save_file(stored | quantised, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    calls, dequantise = [], formats.dequantise_mxfp4
    monkeypatch.setattr(formats, "dequantise_mxfp4", lambda *args: calls.append(1) or dequantise(*args))
    ours = models.from_pretrained(str(tmp_path))
    assert len(calls) == 4  # each stored matrix once: gate and up share gate_up_proj's (gpt-oss-20b's: 2 GB, 10 s each)
    experts = theirs.model.layers[1].mlp.experts
    assert torch.equal(ours.blocks[1].mlp.experts["gate"].weight, experts.gate_up_proj[:, :, 0::2].transpose(1, 2))
    assert torch.equal(ours.blocks[1].mlp.experts["down"].weight, experts.down_proj.transpose(1, 2))
    assert_same_logits(ours, theirs, (2, 24), seed=4)


@pytest.mark.parametrize("change", ["2-D blocks", "int8 scales"])
def test_malformed_mxfp4_experts_are_one_line_naming_them(change, tmp_path):
    """A gpt-oss folder whose MXFP4 blocks lack the expert axis, or whose scales are not bytes: one ValueError line
    naming the folder and the tensors (not an IndexError, nor a message naming neither)."""
    st = need("safetensors.torch")
    theirs, g, quantised = tiny_hf("gpt_oss"), torch.Generator().manual_seed(9), {}
    for i in range(2):
        for name, rows, cols in (("gate_up_proj", 2 * 96, 64), ("down_proj", 64, 96)):
            blocks, scales = mxfp4((4, rows, cols // 32), g, (122, 126))
            quantised |= {f"model.layers.{i}.mlp.experts.{name}_blocks": blocks, f"model.layers.{i}.mlp.experts.{name}_scales": scales}
    bad = "model.layers.1.mlp.experts.down_proj"
    if change == "2-D blocks":
        quantised[bad + "_blocks"], quantised[bad + "_scales"] = quantised[bad + "_blocks"][0], quantised[bad + "_scales"][0]
    else:
        quantised[bad + "_scales"] = quantised[bad + "_scales"].to(torch.int8)
    theirs.save_pretrained(tmp_path)
    stored = st.load_file(tmp_path / "model.safetensors")
    stored = {name: t for name, t in stored.items() if not name.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    st.save_file(stored | {k: v.contiguous() for k, v in quantised.items()}, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "mxfp4"}}))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: {bad}_blocks and {bad}_scales: MXFP4 blocks")) as e:
        models.from_pretrained(str(tmp_path))
    assert "\n" not in str(e.value)


def test_a_mixtures_backward_writes_each_expert_matrix_gradient_once():
    """Finetuning a mixture: backward gathers the gradients of a stacked expert weight into one tensor, not a
    zero tensor of all experts' size for each expert used (with 128 experts, each step's backward took 40 times
    its forward). Counted as the elements every operation of backward writes."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Written(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.total += sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    torch.manual_seed(0)
    moe = models.MoE(models.TransformerConfig(family="olmoe", vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=32,
                                              d_mlp=32, norm="rmsnorm", mlp="gated", activation="silu", experts=32,
                                              experts_used=2, d_expert=32))
    loss = moe(torch.randn(64, 32)).square().sum()
    with Written() as written:
        loss.backward()
    experts = sum(m.weight.numel() for m in moe.experts.values())
    assert all(m.weight.grad.flatten(1).abs().sum(1).gt(0).sum() > 16 for m in moe.experts.values())  # most experts used
    assert written.total < 10 * experts  # was 68 times


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
def test_alibi_slopes_for_any_head_count_as_transformers_computes_them(family, tmp_path):
    """ALiBi's slopes (models.alibi_slopes) are BLOOM's and MPT's transformers', to the bit, for 1 to 128 heads, a power
    of two or not (the heads past the largest power of two then take the odd powers of a second base; the two round
    them apart from 12 heads, bloom-560m's 16 and BLOOM's 112 among them); Falcon's are BLOOM's rounded to bfloat16, as
    its transformers rounds them (whatever the model's dtype). A tiny model with 12 heads (Falcon's: RW's, biases, attention
    then the MLP; the slopes of 4 of its heads, and so slope * j, not exact in bfloat16) gives transformers' float32
    logits to the bit (MPT's bias counted from the last key, as its transformers counts it), and generating past its
    prompt with the cache, transformers' tokens and its logits at every step (each new query biased by its distance to
    every cached key)."""
    hf = need(f"transformers.models.{family}.modeling_{family}")
    for heads in range(1, 129):
        theirs = hf._get_alibi_slopes(heads, "cpu") if family == "bloom" else -hf.build_mpt_alibi_tensor(heads, 2)[:, 0, 0] \
            if family == "mpt" else hf.build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]
        ours = models.alibi_slopes(heads, 8.0, bloom=family != "mpt")
        assert torch.equal(ours.bfloat16().float() if family == "falcon" else ours, theirs), heads
    theirs = tiny_hf(family, **{"bloom": dict(n_head=12, hidden_size=48), "mpt": dict(n_heads=12, d_model=48),
                                "falcon": dict(num_attention_heads=12, hidden_size=48, alibi=True, bias=True, multi_query=False,
                                               parallel_attn=False)}[family])
    theirs.save_pretrained(tmp_path)
    ours = models.from_pretrained(str(tmp_path))
    assert ours.config.n_head == 12
    x = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = theirs(x).logits
    assert want.std() > 1.0 and torch.equal(ours(x), want)
    assert_generates_as(ours, theirs, x[:, :8], 20)


@pytest.mark.parametrize("family", ["bloom", "mpt", "gptj"])
def test_alibi_slopes_and_gptj_frequencies_move_with_the_model_and_stay_float32(family, tmp_path):
    """ALiBi's slopes and GPT-J's float32 rotary frequencies move with the model, outside its state_dict, so that a
    forward on another device copies nothing onto it from the host: on the meta device (an accelerator's stand-in) a
    block's forward, and a step with the cache, copy no tensor from the CPU (each copy between devices recorded; the
    model's own forward reads its tokens' values, which meta tensors lack). Cast to bfloat16, they stay float32: 12
    heads (slopes not all powers of two, which bfloat16 would round), and GPT-J's frequencies, give transformers'
    bfloat16 logits to the bit."""
    dispatch = need("torch.utils._python_dispatch")

    class Copies(dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in (*args, out) if isinstance(t, torch.Tensor)]
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and \
                    len({t.device for t in tensors}) > 1:
                self.copied.append(func)
            return out

    sizes = {"bloom": dict(n_head=12, hidden_size=48), "mpt": dict(n_heads=12, d_model=48), "gptj": dict(n_embd=48)}
    theirs = tiny_hf(family, **sizes[family])
    theirs.save_pretrained(tmp_path)
    ours = models.from_pretrained(str(tmp_path))
    assert not [name for name in ours.state_dict() if "alibi" in name or "freq" in name]
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x).logits)
    block = ours.blocks[0].to("meta")
    h = torch.zeros(2, 8, 48, dtype=torch.bfloat16, device="meta")
    with torch.no_grad(), Copies() as copies:
        copies.copied = []
        block(h, 0)
        cache = {}
        block(h, 0, cache)
        block(h[:, :1], 8, cache)
    assert copies.copied == []


# config.json as released (shrunk to 2 layers of 64, 16 heads, 96 tokens), with the fields transformers does not read:
# bloom-560m (hidden_size, n_head, no seq_length), bloom-1b7 (n_embed, num_attention_heads, seq_length, pretraining_tp 2
# without slow_but_exact); mpt-7b (clip_qkv null), mpt-7b-8k (clip_qkv the whole number 6, llm-foundry's fields)
MEGATRON = dict(apply_residual_connection_post_layernorm=False, attention_dropout=0.0, attention_softmax_in_fp32=True,
                bias_dropout_fusion=True, bos_token_id=1, eos_token_id=2, pad_token_id=3, unk_token_id=0, hidden_dropout=0.0,
                initializer_range=0.02, layer_norm_epsilon=1e-05, masked_softmax_fusion=True, model_type="bloom", n_inner=None,
                n_layer=2, offset_alibi=100, skip_bias_add=True, skip_bias_add_qkv=False, use_cache=True, vocab_size=96)
MOSAIC_ATTN = dict(alibi=True, alibi_bias_max=8, attn_impl="torch", attn_pdrop=0, attn_type="multihead_attention",
                   attn_uses_sequence_id=False, clip_qkv=None, prefix_lm=False, qk_ln=False, softmax_scale=None)
MOSAIC = dict(architectures=["MPTForCausalLM"], d_model=64, emb_pdrop=0, embedding_fraction=1.0, expansion_ratio=4,
              init_config=dict(fan_mode="fan_in", init_div_is_residual=True, init_gain=0, init_nonlinearity="relu",
                               init_std=0.02, name="kaiming_normal_"), init_device="cpu", learned_pos_emb=True,
              logit_scale=None, max_seq_len=2048, model_type="mpt", n_heads=16, n_layers=2, no_bias=True,
              norm_type="low_precision_layernorm", resid_pdrop=0, tokenizer_name="EleutherAI/gpt-neox-20b", use_cache=False,
              verbose=0, vocab_size=96)
RELEASED = {"bloom-560m": MEGATRON | dict(hidden_size=64, n_head=16, pretraining_tp=1, slow_but_exact=False),
            "bloom-1b7": MEGATRON | dict(n_embed=64, num_attention_heads=16, pretraining_tp=2, seq_length=4096),
            "mpt-7b": MOSAIC | dict(attn_config=MOSAIC_ATTN),
            "mpt-7b-8k": MOSAIC | dict(attn_config=MOSAIC_ATTN | dict(attn_impl="triton", clip_qkv=6, sliding_window_size=-1),
                                       fc_type="torch", ffn_config=dict(ffn_type="mptmlp"), max_seq_len=8192)}


@pytest.mark.parametrize("name", list(RELEASED))
def test_a_released_bloom_or_mpt_config_loads_with_all_its_fields(name, tmp_path):
    """Each config.json of RELEASED loads, its context as its transformers' (BLOOM's 2,048 where it sets none), and
    gives transformers' logits to the bit (transformers 5 reads mpt-7b-8k's clip_qkv only as the float 6.0)."""
    t = need("transformers")
    config = RELEASED[name]
    family = config["model_type"]
    readable = config | ({"attn_config": config["attn_config"] | dict(clip_qkv=6.0)} if name == "mpt-7b-8k" else {})
    theirs = randomize((t.BloomForCausalLM if family == "bloom" else t.MptForCausalLM)(
        (t.BloomConfig if family == "bloom" else t.MptConfig).from_dict(readable)), 5)
    theirs.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = models.from_pretrained(str(tmp_path))
    assert (ours.config.n_head, ours.config.d_model, ours.config.block_size) == (
        16, 64, {"bloom-560m": 2048, "bloom-1b7": 4096, "mpt-7b": 2048, "mpt-7b-8k": 8192}[name])
    assert ours.config.qkv_clip == (6 if name == "mpt-7b-8k" else 0)
    x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x).logits)


# Falcon's config.json files as released (shrunk to 2 layers of 64, 4 heads, 96 tokens), with the fields transformers does
# not read (the remote code's auto_map, apply_residual_connection_post_layernorm, dropouts): falcon-7b's, falcon-40b's and
# falcon-rw-1b's leave out the context, the MLP's width, the activation, the rotary base and the tied flag; Falcon-11B's
# give them, with one norm per layer (num_ln_in_parallel_attn 1) and rope_scaling null
TII = dict(alibi=False, apply_residual_connection_post_layernorm=False, architectures=["FalconForCausalLM"], attention_dropout=0.0,
           auto_map={"AutoConfig": "configuration_falcon.FalconConfig", "AutoModelForCausalLM": "modeling_falcon.FalconForCausalLM"},
           bias=False, bos_token_id=11, eos_token_id=11, hidden_dropout=0.0, hidden_size=64, initializer_range=0.02,
           layer_norm_epsilon=1e-05, model_type="falcon", num_attention_heads=4, num_hidden_layers=2, torch_dtype="bfloat16",
           transformers_version="4.27.4", use_cache=True, vocab_size=96)
FALCON_RELEASED = {"falcon-7b": TII | dict(multi_query=True, new_decoder_architecture=False, parallel_attn=True),
                   "falcon-40b": TII | dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True),
                   "falcon-rw-1b": TII | dict(alibi=True, bias=True, bos_token_id=1, eos_token_id=2, multi_query=False,
                                              new_decoder_architecture=False, parallel_attn=False),
                   "falcon-11b": TII | dict(activation="gelu", ffn_hidden_size=256, max_position_embeddings=8192,
                                            new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1,
                                            parallel_attn=True, rope_scaling=None, rope_theta=500042.0, tie_word_embeddings=False,
                                            transformers_version="4.40.2")}


@pytest.mark.parametrize("name", list(FALCON_RELEASED))
def test_a_released_falcon_config_loads_with_all_its_fields(name, tmp_path):
    """Each config.json of FALCON_RELEASED loads as transformers reads it (the fields left out at its defaults: 2,048
    positions, an MLP of 4 d_model, exact GELU, base 10,000, tied) and gives its logits to the bit."""
    t = need("transformers")
    config = FALCON_RELEASED[name]
    theirs = randomize(t.FalconForCausalLM(t.FalconConfig.from_dict(config)), 5)
    theirs.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = models.from_pretrained(str(tmp_path))
    assert (ours.config.block_size, ours.config.tied_head, ours.config.n_kv_head) == {
        "falcon-7b": (2048, True, 1), "falcon-40b": (2048, True, 2), "falcon-rw-1b": (2048, True, 4),
        "falcon-11b": (8192, False, 2)}[name]
    assert ours.config.rotary_base == (500042.0 if name == "falcon-11b" else 10000.0) and ours.config.d_mlp == 256
    x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x).logits)


def test_the_parts_keep_generation_with_the_cache_exact():
    """Partial rotary, parallel residual, per-layer windows, grouped-query heads, q/k norms, no score
    scale, tied head (and Cohere's and Granite's parts, and ALiBi): the key-value cache still computes what the
    whole prefix does, and rotary scores depend only on the offset."""
    torch.manual_seed(0)
    config = dict(vocab_size=50, block_size=24, n_layer=3, n_head=4, n_kv_head=2, d_model=16, d_head=6, d_mlp=32,
                  attn_window=[0, 4, 2], attn_scale=1.0, rotary_dims=4, parallel_residual=True, norm="rmsnorm",
                  qk_norm=True, mlp="gated", activation="gelu_tanh", norm_eps=1e-6, tied_head=True,
                  codebooks={"attn": dict(num_codes=20, k=2)})
    model = models.Transformer(config).double().eval()
    assert model.head.weight is model.tok_emb.weight and "pos_emb.weight" not in model.state_dict()
    x = torch.randint(0, 50, (2, 24))
    cache = {}
    steps = [model(x[:, :5], cache)] + [model(x[:, t:t + 1], cache) for t in range(5, 24)]
    assert torch.allclose(torch.cat(steps, 1), model(x), atol=1e-10)
    # Cohere's and Granite's parts: one norm (a LayerNorm without bias) read by attention and MLP, per-head LayerNorms on
    # q and k, the residual and the logits scaled, a layer without the rotary embedding
    config |= dict(norm="layernorm_nobias", shared_norm=True, qk_layernorm=True, residual_scale=0.5, logit_scale=0.25,
                   no_rotary_layers=[2])
    model = models.Transformer(config).double().eval()
    assert model.blocks[0].norm2 is model.blocks[0].norm1 and model.blocks[0].norm1.bias is None
    cache = {}
    steps = [model(x[:, :5], cache)] + [model(x[:, t:t + 1], cache) for t in range(5, 24)]
    assert torch.allclose(torch.cat(steps, 1), model(x), atol=1e-10)

    # ALiBi as MPT, BLOOM and Falcon compute it, 6 heads (not a power of two) sharing 3 key / value heads, an embedding norm
    for family in ("mpt", "bloom", "falcon"):
        model = models.Transformer(dict(family=family, vocab_size=50, block_size=24, n_layer=2, n_head=6, n_kv_head=3,
                                        d_model=24, d_mlp=32, alibi=8.0, embed_norm=True, tied_head=True)).double().eval()
        cache = {}
        steps = [model(x[:, :5], cache)] + [model(x[:, t:t + 1], cache) for t in range(5, 24)]
        assert torch.allclose(torch.cat(steps, 1), model(x), atol=1e-10), family

    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64).unbind(0)
    inv_freq = models.rotary_frequencies(4, 10000.0, {})
    score = lambda i, j: (models.rotary(q, i, inv_freq) * models.rotary(k, j, inv_freq)).sum()
    assert torch.allclose(score(3, 1), score(10, 8)) and not torch.allclose(score(3, 1), score(3, 2))
    assert torch.equal(models.rotary(q, 5, inv_freq)[..., 4:], q[..., 4:])  # dims past rotary_dims untouched


# --- tokenizer -----------------------------------------------------------------------------

def trained_bpe(tmp_path, normalize=False, prefix_space=False, corpus=None):
    """A byte-level BPE trained by `tokenizers` (on ~300 KB of stdlib source unless `corpus`, a list
    of texts), with <|endoftext|> special; Pythia-like when `normalize` (NFC, runs of spaces as added tokens)."""
    tk = need("tokenizers")
    tok = conftest.trained_bpe(tmp_path, tk.pre_tokenizers.ByteLevel(add_prefix_space=prefix_space),
                               tk.normalizers.NFC() if normalize else None, added=["    ", "        "] if normalize else (),
                               corpus=corpus)
    tok.model.save(str(tmp_path))  # vocab.json, merges.txt
    return tok


@pytest.mark.parametrize("variant", ["gpt2", "pythia", "prefix_space"])
def test_tokenizer_equals_the_tokenizers_library(variant, tmp_path):
    theirs = trained_bpe(tmp_path, normalize=variant == "pythia", prefix_space=variant == "prefix_space")
    ours = bpe.load_tokenizer(str(tmp_path))
    unseen = stdlib_text(60, 200_000)  # source the tokenizer was not trained on
    for string in [unseen, SAMPLE, SAMPLE + "<|endoftext|>" + SAMPLE[:50] + "<|endoftext|>", "", " ", "\x1c\x1d a"]:
        ids = ours.encode(string)
        assert ids == theirs.encode(string).ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)
        if variant != "prefix_space":  # which writes a space before every stretch of text
            assert ours.decode(ids) == (theirs.normalizer.normalize_str(string) if variant == "pythia" else string)
    assert ours.bos == theirs.token_to_id("<|endoftext|>") and ours.vocab_size == theirs.get_vocab_size()
    ids = ours.encode("a<|endoftext|>b")
    assert ours.decode(ids, skip_special=True) == theirs.decode(ids, skip_special_tokens=True)

    # the same tokenizer from plain data, and (GPT-2 style) from vocab.json + merges.txt
    again = bpe.tokenizer_from_dict(ours.to_dict())
    assert again.encode(SAMPLE) == ours.encode(SAMPLE) and again.bos == ours.bos
    if variant == "gpt2":
        os.remove(tmp_path / "tokenizer.json")
        assert bpe.load_tokenizer(str(tmp_path)).encode(unseen[:50_000] + SAMPLE) == theirs.encode(unseen[:50_000] + SAMPLE).ids
        # tokens added to it, as a slow tokenizer saves them (added_tokens.json, tokenizer_config.json)
        (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_start|>": 700, "<|im_end|>": 701}))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GPT2Tokenizer", "eos_token": "<|im_end|>",
            "added_tokens_decoder": {"702": {"content": "<pad>", "special": True, "normalized": False}}}))
        theirs.add_tokens(["<|im_start|>", "<|im_end|>"])
        theirs.add_special_tokens(["<pad>"])
        chat = bpe.load_tokenizer(str(tmp_path))
        string = "<|im_start|>user\n" + SAMPLE[:300] + "<|im_end|><pad>"
        assert chat.encode(string) == theirs.encode(string).ids and (chat.eos, chat.vocab_size) == (701, 703)
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
        with pytest.raises(ValueError, match=r"a Qwen2Tokenizer from vocab.json \+ merges.txt, whose pre-tokenisation"):
            bpe.load_tokenizer(str(tmp_path))


def test_byte_tokenizer():
    tok = bpe.tokenizer_from_dict(text.ByteTokenizer().to_dict())
    assert list(tok.encode(SAMPLE)) == list(SAMPLE.encode()) and tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.decode([tok.bos, *tok.encode("hi"), 300, -1]) == "hi" and tok.vocab_size == 257


# --- bad input -----------------------------------------------------------------------------

def test_the_output_layer_transformers_uses(tmp_path):
    """Where a config's tie flag and the stored weights disagree, the output layer transformers uses:
    a stored lm_head unlike the embedding (a finetune saved with a stale flag), and a multimodal
    Gemma-3's top-level flag rather than its text_config's."""
    t = need("transformers")
    stale = tmp_path / "stale"
    tiny_hf("llama", tie_word_embeddings=False).save_pretrained(stale)
    config = json.loads((stale / "config.json").read_text())
    (stale / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    multimodal = tmp_path / "multimodal"
    text_config = dict(vocab_size=96, max_position_embeddings=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=96, sliding_window_pattern=2, tie_word_embeddings=True, **GEMMA)
    vision_config = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, image_size=28, patch_size=14)
    randomize(t.Gemma3ForConditionalGeneration(t.Gemma3Config(
        text_config=text_config, vision_config=vision_config, mm_tokens_per_image=4, tie_word_embeddings=False)), 6
              ).save_pretrained(multimodal)
    x = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(5))
    for folder, reference in ((stale, t.AutoModelForCausalLM), (multimodal, t.Gemma3ForConditionalGeneration)):
        ours, theirs = models.from_pretrained(str(folder)), reference.from_pretrained(folder).float().eval()
        with torch.no_grad():
            want = theirs(x).logits
        assert not ours.config.tied_head and want.std() > 1.0 and (ours(x) - want).abs().max() <= 1e-4, folder.name


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        models.from_pretrained(str(tmp_path))
    (tmp_path / "tiny.Q4_0.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=f"has no config.json: .*, or the GGUF file itself: {tmp_path / 'tiny.Q4_0.gguf'}$"):
        models.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type 'mamba' is not supported"):
        models.from_pretrained(str(tmp_path))
    for config, message in [({"model_type": "gemma3"}, "its language model's config under text_config"),
                            ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
                            ({"model_type": "gemma2", "layer_types": ["full_attention"]}, "layer_types must give"),
                            (dict(model_type="llama", vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                  num_hidden_layers=2, num_attention_heads=4),
                             "config.json: field 'intermediate_size' is missing, which a llama model needs"),
                            (dict(model_type="llama", vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, rms_norm_eps=None),
                             "config.json: norm_eps=None must be a positive number"),
                            (dict(model_type="llama", vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=3),
                             "config.json: n_head=4 must be a multiple of n_kv_head=3"),
                            (dict(model_type="mistral", vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, sliding_window=-3),
                             "config.json: sliding_window=-3 must be a positive integer, or null for none"),
                            (dict(model_type="phi3", vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  rope_scaling=dict(type="su", short_factor=[1.0] * 8, long_factor=[2.0] * 8,
                                                    original_max_position_embeddings=16)),
                             r"config.json: LongRoPE needs original_max_position_embeddings, .* at the top level, where "
                             r"transformers reads it \(not in rope_scaling\); it is None"),
                            (dict(model_type="smollm3", vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, no_rope_layer_interval=0),
                             "config.json: no_rope_layer_interval=0 must be a positive integer"),
                            (dict(model_type="olmo3", vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, sliding_window=None),
                             "config.json: sliding_window=None must be a positive integer"),
                            (dict(model_type="smollm3", vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, no_rope_layers=[1, 0, 1]),
                             "config.json: no_rope_layers must give 1 \\(rotary\\) or 0 \\(none\\) for each of the 2 layers"),
                            (dict(model_type=["llama"]), r"model_type \['llama'\] is not supported"),
                            (dict(model_type="qwen3_moe", vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=0),
                             "config.json: decoder_sparse_step=0 must be a positive integer"),
                            (dict(model_type="qwen2_moe", vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                  mlp_only_layers=1), r"config.json: mlp_only_layers=1 must list layers \(whole numbers\)"),
                            (dict(model_type="mixtral", vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_local_experts=4,
                                  num_experts_per_tok=5), "config.json: experts_used=5 must be 1 .. experts=4"),
                            (dict(model_type="olmoe", vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_experts=4),
                             "config.json: field 'num_experts_per_tok' is missing, which a olmoe model needs")] + [
                            (dict(model_type=family, vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=4, num_attention_heads=4) | bad, message)
                            for family, bad, message in [
                                ("cohere2", dict(sliding_window_pattern=0), "sliding_window_pattern=0 must be a positive integer"),
                                ("cohere2", dict(sliding_window_pattern="4"), "sliding_window_pattern='4' must be a positive"),
                                ("cohere2", dict(sliding_window_pattern=None), "sliding_window_pattern=None must be a positive"),
                                ("phi3", dict(original_max_position_embeddings=16, rope_scaling=dict(
                                    type="longrope", short_factor=[1.0] * 7, long_factor=[2.0] * 8)),
                                 r"rope_scaling's short_factor must list one factor for each of the 8 rotary frequencies "
                                 r"\(half the rotary dims\); it is 7 numbers"),
                                ("phi3", dict(original_max_position_embeddings=16, partial_rotary_factor=0.5, rope_scaling=dict(
                                    type="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 8)),
                                 "long_factor must list one factor for each of the 4 rotary frequencies"),
                                ("phi3", dict(original_max_position_embeddings=16, rope_scaling=dict(
                                    type="longrope", short_factor=[1.0] * 8, long_factor=None)), "long_factor must list .*; it is None"),
                                ("phi3", dict(original_max_position_embeddings=16, rope_scaling=dict(
                                    type="longrope", short_factor=[1.0] * 7 + [0.0], long_factor=[2.0] * 8)),
                                 r"short_factor=\[1.0, .*, 0.0\] must be a positive number"),
                                ("phi3", dict(original_max_position_embeddings=16, rope_scaling=dict(
                                    type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8, attention_factor=-1)),
                                 "rope_scaling's attention_factor=-1 must be a positive number"),
                                ("stablelm", dict(partial_rotary_factor=None), "partial_rotary_factor=None must be a number"),
                                ("stablelm", dict(partial_rotary_factor="0.25"), "partial_rotary_factor='0.25' must be a number"),
                                ("stablelm", dict(rope_parameters=dict(rope_type="default", partial_rotary_factor=2)),
                                 "partial_rotary_factor=2 must be a number from 0 to 1"),
                                ("phi", dict(qk_layernorm=True), r"config.json: qk_layernorm=True is not implemented"),
                                ("phi", dict(partial_rotary_factor=None), "partial_rotary_factor=None must be a number"),
                                ("starcoder2", dict(sliding_window=-3), "sliding_window=-3 must be a positive integer"),
                                ("starcoder2", dict(use_bias="no"), r"config.json: use_bias='no' is not implemented"),
                                ("olmo", dict(clip_qkv="8"), "config.json: qkv_clip='8' must be a positive number"),
                                ("olmo", dict(hidden_act="gelu"), r"config.json: hidden_act='gelu' is not implemented"),
                                # GLM's and GLM-4's options transformers does not compute
                                ("glm", dict(partial_rotary_factor=2), "config.json: partial_rotary_factor=2 must be a number "
                                                                       "from 0 to 1"),
                                ("glm4", dict(rope_parameters=dict(rope_type="default", partial_rotary_factor=None)),
                                 "config.json: partial_rotary_factor=None must be a number"),
                                ("glm", dict(attention_bias="yes"), r"config.json: attention_bias='yes' is not implemented"),
                                ("glm4", dict(hidden_act="gelu"), r"config.json: hidden_act='gelu' is not implemented"),
                                ("glm4", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)),
                                 r"config.json: rope_type='dynamic' is not implemented"),
                                ("nemotron", dict(hidden_act="silu"), r"config.json: hidden_act='silu' is not implemented"),
                                ("nemotron", dict(partial_rotary_factor="0.5"), "partial_rotary_factor='0.5' must be a number"),
                                ("nemotron", dict(rope_parameters=dict(rope_type="default", partial_rotary_factor=0.3125)),
                                 "config.json: rotary_dims=5 must be even and at most d_head=16"),
                                ("nemotron", dict(attention_bias="yes"), r"config.json: attention_bias='yes' is not implemented"),
                                ("nemotron", dict(mlp_bias=None), r"config.json: mlp_bias=None is not implemented"),
                                ("ministral", {}, "config.json: head_dim=None: a ministral config needs it"),
                                ("ministral", dict(head_dim=16, layer_types=["full_attention"]), "layer_types must give"),
                                ("ministral", dict(head_dim=16, sliding_window="5"), "sliding_window='5' must be a positive"),
                                ("ministral3", dict(rope_parameters=dict(rope_type="default", llama_4_scaling_beta=None)),
                                 "config.json: rope_parameters' llama_4_scaling_beta=None must be a number, 0 or more"),
                                ("ministral3", dict(rope_parameters=dict(rope_type="default", llama_4_scaling_beta=0.1)),
                                 "rope_parameters' original_max_position_embeddings=None must be a positive integer"),
                                ("ministral3", dict(rope_parameters="yarn"), "rope_parameters='yarn' must be a dict"),
                                # Helium: W_O not square (its default head_dim, 128, or another), null sizes
                                ("helium", {}, r"config.json: num_attention_heads \* head_dim = 4 \* 128 is not hidden_size=64"),
                                ("helium", dict(head_dim=24), r"num_attention_heads \* head_dim = 4 \* 24 is not hidden_size=64"),
                                ("helium", dict(head_dim=None), "config.json: head_dim=None: transformers' helium needs a number"),
                                ("helium", dict(head_dim=16, num_key_value_heads=None),
                                 "config.json: num_key_value_heads=None: transformers' helium needs a number"),
                                ("helium", dict(head_dim=16, hidden_act="gelu"), r"hidden_act='gelu' is not implemented"),
                                ("helium", dict(head_dim=16, attention_bias="no"), r"attention_bias='no' is not implemented"),
                                ("seed_oss", dict(attention_out_bias="no"), r"config.json: attention_out_bias='no' is not"),
                                ("seed_oss", dict(attention_bias=None), r"config.json: attention_bias=None is not implemented"),
                                ("seed_oss", dict(hidden_act="gelu"), r"config.json: hidden_act='gelu' is not implemented"),
                                # Apertus: an activation other than xIELU; Apertus 1.5's pruned output layer
                                ("apertus", dict(hidden_act="silu"), r"config.json: hidden_act='silu' is not implemented"),
                                ("apertus", dict(attention_bias=None), r"config.json: attention_bias=None is not implemented"),
                                ("apertus", dict(rope_parameters=dict(rope_type="dynamic", factor=2.0)),
                                 r"config.json: rope_type='dynamic' is not implemented"),
                                ("apertus1p5_text", dict(output_vocab_size=64), "config.json: output_vocab_size=64: Apertus "
                                                                              "1.5's output layer pruned to fewer rows"),
                                # EXAONE 3: its activation under its own name; its layer count too
                                ("exaone", dict(activation_function="gelu"),
                                 r"config.json: activation_function='gelu' is not implemented"),
                                ("exaone", dict(hidden_act="gelu"), r"config.json: hidden_act='gelu' is not implemented"),
                                ("exaone", dict(num_layers="2"), "config.json: num_layers='2' must be a positive integer"),
                                # EXAONE 4: what transformers' Exaone4Config or its attention fails on (its 32 key / value
                                # heads by default: 2 given)
                                ("exaone4", dict(num_key_value_heads=2, sliding_window=None),
                                 "sliding_window=null without layer_types: transformers' Exaone4Config cannot build the layer"),
                                ("exaone4", dict(num_key_value_heads=2, sliding_window_pattern="LLLG"),
                                 "config.json: sliding_window_pattern='LLLG' must be a positive integer"),
                                ("exaone4", dict(num_key_value_heads=2, sliding_window=None, layer_types=["sliding_attention"] * 4),
                                 "config.json: layer_types marks sliding layers but sliding_window is null"),
                                ("exaone4", dict(num_key_value_heads=2, sliding_window="5"),
                                 "config.json: sliding_window='5' must be a positive integer"),
                                ("exaone4", dict(num_key_value_heads=2, layer_types=["full_attention"]),
                                 "config.json: layer_types must give"),
                                ("exaone4", dict(num_key_value_heads=2, hidden_act="gelu"),
                                 r"config.json: hidden_act='gelu' is not implemented"),
                                # sizes a family divides by: checked before it does (not a ZeroDivisionError or TypeError)
                                ("phi", dict(num_attention_heads=0), "config.json: num_attention_heads=0 must be a positive integer"),
                                ("phi", dict(head_dim="16"), r"head_dim='16' must be a positive integer, or null"),
                                ("starcoder2", dict(hidden_size=None), "config.json: hidden_size=None must be a positive integer"),
                                ("olmo", dict(num_attention_heads=4.0), "num_attention_heads=4.0 must be a positive integer"),
                                ("llama", dict(num_attention_heads="4"), "num_attention_heads='4' must be a positive integer")]] + [
                            (dict(model_type="gptj", vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4) | bad, message)
                            for bad, message in [
                                (dict(rotary_dim=None), "config.json: rotary_dim=None must be a positive integer"),
                                (dict(rotary_dim=20), "config.json: rotary_dims=20 must be even and at most d_head=16"),
                                (dict(n_head=0), "config.json: n_head=0 must be a positive integer"),
                                (dict(activation_function="relu"), r"activation_function='relu' is not implemented")]] + [
                            (dict(model_type="gpt_bigcode", vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4) | bad,
                             message) for bad, message in [
                                (dict(multi_query="yes"), r"config.json: multi_query='yes' is not implemented"),
                                (dict(add_cross_attention=True), r"config.json: add_cross_attention=True is not implemented"),
                                (dict(attention_softmax_in_fp32=None), "attention_softmax_in_fp32=None is not implemented"),
                                (dict(n_embd=None), "config.json: n_embd=None must be a positive integer")]] + [
                            # SantaCoder's original repository (bigcode/santacoder): a gpt2 config of remote code, multi-query
                            # attention with q_attn and kv_attn apart; its conversion, bigcode/gpt_bigcode-santacoder, loads
                            (dict(model_type="gpt2", vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  attention_head_type="multiquery"),
                             r"config.json: attention_head_type='multiquery' is remote code's \(GPT2CustomConfig, "
                             r"bigcode/santacoder's\), not GPT-2's: give its conversion to gpt_bigcode, "
                             r"bigcode/gpt_bigcode-santacoder")] + [
                            (dict(model_type="llama", vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) | rope, message)
                            for rope, message in [(dict(rope_theta=None), "rotary_base=None must be a positive number"),
                                                  (dict(rope_scaling="linear"), "rope_scaling='linear' must be a dict"),
                                                  (dict(rope_scaling=dict(type="linear", factor="2")),
                                                   "rotary_scaling's factor='2' must be a positive number"),
                                                  (dict(rope_scaling=dict(rope_type="yarn", factor="2",
                                                                          original_max_position_embeddings=32)),
                                                   "rope_scaling's factor='2' must be a positive number"),
                                                  (dict(rope_scaling=dict(rope_type="yarn", factor=None,
                                                                          original_max_position_embeddings=0)),
                                                   "rope_scaling's original_max_position_embeddings=0 must be a positive"),
                                                  (dict(rope_scaling=dict(rope_type="yarn", factor=2.0)),
                                                   r"rope_type 'yarn' needs \['original_max_position_embeddings'\]"),
                                                  (dict(rope_scaling=dict(rope_type="yarn", factor=2.0, truncate="no",
                                                                          original_max_position_embeddings=32)),
                                                   "truncate='no' is not implemented")]] + [
                            # BLOOM's and MPT's options transformers does not compute (MosaicML's code computes MPT's)
                            (dict(model_type="bloom", vocab_size=96, hidden_size=64, n_layer=2, n_head=4) | bad, message)
                            for bad, message in [(dict(apply_residual_connection_post_layernorm=True),
                                                  "config.json: apply_residual_connection_post_layernorm=True is not implemented"),
                                                 (dict(n_embed=0), "config.json: n_embed=0 must be a positive integer, or null")]] + [
                            (dict(model_type="mpt", vocab_size=96, d_model=64, n_layers=2, n_heads=4) | bad, message)
                            for bad, message in [(dict(attn_config=dict(alibi_bias_max=16)),
                                                  r"config.json: attn_config: alibi_bias_max=16 is not implemented"),
                                                 (dict(attn_config=dict(qk_ln=True)), "attn_config: qk_ln=True is not"),
                                                 (dict(attn_config=dict(prefix_lm=True)), "attn_config: prefix_lm=True is not"),
                                                 (dict(attn_config=dict(sliding_window_size=16)),
                                                  "attn_config: sliding_window_size=16 is not implemented"),
                                                 (dict(norm_type="low_precision_rmsnorm"),
                                                  "config.json: norm_type='low_precision_rmsnorm' is not implemented"),
                                                 (dict(attn_config=dict(alibi=False)), "attn_config: alibi=False is not"),
                                                 (dict(attn_config=dict(attn_type="grouped_query_attention", kv_n_heads=2)),
                                                  "attn_config: attn_type='grouped_query_attention' is not implemented"),
                                                 (dict(no_bias=False), "config.json: no_bias=False is not implemented"),
                                                 (dict(logit_scale="inv_sqrt_d_model"), "logit_scale='inv_sqrt_d_model' is not"),
                                                 (dict(expansion_ratio="4"), "expansion_ratio='4' must be a positive"),
                                                 (dict(n_heads=0), "config.json: n_heads=0 must be a positive integer")]] + [
                            # Falcon: what transformers' Falcon does not compute (the remote code's residual after the norm;
                            # new_decoder_architecture without parallel_attn, or ln_attn / ln_mlp without it, on which it
                            # fails), RefinedWeb's older names, which transformers 5 no longer reads
                            (dict(model_type="falcon", vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
                             | bad, message) for bad, message in [
                                (dict(apply_residual_connection_post_layernorm=True),
                                 "config.json: apply_residual_connection_post_layernorm=True is not implemented"),
                                (dict(new_decoder_architecture=True, parallel_attn=False),
                                 "config.json: with new_decoder_architecture: parallel_attn=False is not implemented"),
                                (dict(num_ln_in_parallel_attn=2),
                                 "config.json: without new_decoder_architecture: num_ln_in_parallel_attn=2 is not implemented"),
                                (dict(new_decoder_architecture=True, num_ln_in_parallel_attn=3),
                                 "config.json: num_ln_in_parallel_attn=3 is not implemented"),
                                (dict(multi_query=False, num_kv_heads=2), "config.json: num_kv_heads=2 is not num_attention_heads=4"),
                                (dict(new_decoder_architecture=True, num_kv_heads=3), "n_head=4 must be a multiple of n_kv_head=3"),
                                (dict(num_kv_heads="2"), "config.json: num_kv_heads='2' must be a positive integer, or null"),
                                (dict(num_attention_heads=5), "config.json: hidden_size=64 must be a multiple of num_attention_heads=5"),
                                (dict(alibi="yes"), "config.json: alibi='yes' is not implemented"),
                                (dict(activation="relu"), "config.json: activation='relu' is not implemented"),
                                (dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), "rope_type='dynamic' is not implemented"),
                                (dict(num_attention_heads=None), "num_attention_heads=None must be a positive integer")]] + [
                            (dict(model_type="falcon", vocab_size=96, hidden_size=64, num_hidden_layers=2, n_head=4),
                             "config.json: n_head is RefinedWeb's older name of num_attention_heads, which transformers 5 does "
                             "not read"),
                            (dict(model_type="RefinedWebModel", vocab_size=96, n_embed=64, n_layer=2, n_head=4),
                             r"config.json: model_type 'RefinedWebModel' is Falcon's first remote code \(RWForCausalLM\), which "
                             r"transformers 5 does not read")]:
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message) as e:
            models.from_pretrained(str(tmp_path))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        bpe.load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"")  # Llama-2's SentencePiece model alone
    with pytest.raises(ValueError, match=r"its tokenizer.model \(SentencePiece\) is not read here; write its tokenizer.json"):
        bpe.load_tokenizer(str(tmp_path))
    (tmp_path / "config.json").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(ValueError, match="config.json is a git-lfs pointer, not the file: run `git lfs pull`"):
        models.from_pretrained(str(tmp_path))
    readers = {"model.safetensors": formats.safetensors_loaders, "pytorch_model.bin": formats.torch_loaders,
               "model.gguf": formats.read_gguf_info}
    for name, read in readers.items():  # the weights of a clone without `git lfs pull`
        (tmp_path / name).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
        with pytest.raises(ValueError, match=f"{name} is a git-lfs pointer, not the file"):
            read(str(tmp_path / name))
        os.remove(tmp_path / name)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ValueError, match="config.json holds a JSON list, not an object"):
        models.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="of kind 'sentencepiece'"):
        bpe.tokenizer_from_dict({"kind": "sentencepiece"})


def test_clear_errors_from_broken_folders(tmp_path):
    tiny_hf("gpt_neo").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for kinds in (None, "global", [["global", 1]], [[["global", "local"], "1"]]):  # (null: the default's 24 layers)
        (tmp_path / "config.json").write_text(json.dumps(config | {"attention_types": kinds}))
        with pytest.raises(ValueError, match=r"config.json: attention_types .* must give 'global' or 'local' for each of "
                                             r"the 2 layers$"):
            models.from_pretrained(str(tmp_path))
    model = tiny_hf("gpt_neox")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}))
    with pytest.raises(ValueError, match="rope_type='dynamic' is not implemented"):
        models.from_pretrained(str(tmp_path))
    # an older config.json with both names of the rotary base: transformers takes GPT-NeoX's own
    older = {k: v for k, v in config.items() if k != "rope_parameters"} | dict(rotary_pct=0.5, rotary_emb_base=100.0,
                                                                              rope_theta=10000.0)
    (tmp_path / "config.json").write_text(json.dumps(older))
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = need("transformers").AutoModelForCausalLM.from_pretrained(tmp_path).eval()(x).logits
    assert (models.from_pretrained(str(tmp_path))(x) - want).abs().max() <= 1e-4
    (tmp_path / "config.json").write_text(json.dumps(config))

    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[:len(weights) - 1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        models.from_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(weights[:5])
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        models.from_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(weights)
    sd = model.state_dict()
    del sd["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    sd["embed_out.weight"] = sd.pop("lm_head.weight")  # as Pythia's files name it (and save_pretrained writes it)
    os.remove(tmp_path / "model.safetensors")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="'layers.1.mlp.dense_4h_to_h.bias' is missing"):
        models.from_pretrained(str(tmp_path))

    # weights in shards: they load, and a shard the index names but the folder lacks is a one-line error
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert (models.from_pretrained(str(sharded))(x) - model(x).logits).abs().max() <= 1e-4
    # the same shards as PyTorch .bin files with pytorch_model.bin.index.json, as older checkpoints come
    binned, weight_map = tmp_path / "binned", {}
    binned.mkdir()
    (binned / "config.json").write_text(json.dumps(config))
    for i, shard in enumerate(shards):
        tensors = {name: load() for name, load in formats.safetensors_loaders(sharded / shard).items()}
        torch.save(tensors, binned / f"pytorch_model-{i}.bin")
        weight_map |= {name: f"pytorch_model-{i}.bin" for name in tensors}
    (binned / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with torch.no_grad():
        assert (models.from_pretrained(str(binned))(x) - model(x).logits).abs().max() <= 1e-4
    # a model without its language-model head (a GPTNeoXModel); quantised weights
    (binned / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {n: f for n, f in weight_map.items() if n != "embed_out.weight"}}))
    with pytest.raises(ValueError, match=r"there is no output layer \(embed_out.weight\): the weights are of a model without"):
        models.from_pretrained(str(binned))
    (binned / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(ValueError, match="the weights are quantised \\(gptq\\), which this module does not read"):
        models.from_pretrained(str(binned))
    os.remove(sharded / shards[1])
    with pytest.raises(ValueError, match=f"lacks {shards[1]}, a shard model.safetensors.index.json names; download it again$"):
        models.from_pretrained(str(sharded))
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": ')  # cut short
    with pytest.raises(ValueError, match="model.safetensors.index.json is not valid JSON .*; download it again$"):
        models.from_pretrained(str(sharded))


def test_a_checkpoint_carries_its_tokenizer(tmp_path):
    """Where the tokenizer is checked against the model: models.load_with_tokenizer (checkpoints) and
    models.load_pretrained (folders), whenever a model and a tokenizer come together."""
    trained_bpe(tmp_path)  # 700 ids
    tokenizer = bpe.load_tokenizer(str(tmp_path))
    config = dict(vocab_size=704, block_size=16, n_layer=1, n_head=2, d_model=16, d_mlp=32)
    runs.save_checkpoint(tmp_path / "good.pt", cb.GPT(config), tokenizer=tokenizer.to_dict())
    model, loaded = models.load_with_tokenizer(str(tmp_path / "good.pt"))
    assert loaded.encode(SAMPLE) == tokenizer.encode(SAMPLE) and model.config.vocab_size == 704
    runs.save_checkpoint(tmp_path / "bad.pt", cb.GPT(config | {"vocab_size": 600}), tokenizer=tokenizer.to_dict())
    with pytest.raises(ValueError, match="the tokenizer has 700 ids but the model's vocabulary only 600"):
        models.load_with_tokenizer(str(tmp_path / "bad.pt"))
    # a special token past the model's vocabulary that the tokenizer never adds itself (Gemma-3's
    # <image_soft_token>) is dropped, a text spelling it is plain text; BOS, an end of turn or an
    # ordinary token there are refused
    plain = conftest.chat_bpe().to_dict()  # 256 bytes, 6 merges, 3 special tokens (BOS 263, end of turn 264)
    plain["added_tokens"].append({"id": 265, "content": "<image_soft_token>", "special": True, "normalized": False})
    image = bpe.tokenizer_from_dict(plain)
    spelled = "the <image_soft_token><|im_end|>"
    assert image.encode(spelled)[-2:] == [265, 264]
    kept = bpe.check_tokenizer(image, 265, "here")
    assert kept.vocab_size == 265 and kept.encode(spelled) == conftest.chat_bpe().encode(spelled)
    pieces = bpe.SentencePieceBPE(["<unk>", "<bos>", "▁", "<image_soft_token>"], [bpe.UNKNOWN, bpe.CONTROL, bpe.NORMAL,
                                  bpe.CONTROL], scores=[0, 0, 0, 0], bos=1, unk=0, prefix=[1])
    assert pieces.encode("<image_soft_token> ") == [3, 2]
    assert bpe.check_tokenizer(pieces, 3, "here").encode("<image_soft_token> ") == [0, 2]  # unknown characters
    for vocab_size in (264, 261):
        with pytest.raises(ValueError, match=f"the tokenizer has 266 ids but the model's vocabulary only {vocab_size}"):
            bpe.check_tokenizer(image, vocab_size, "here")
    runs.save_checkpoint(tmp_path / "bytes.pt", cb.GPT(config | {"vocab_size": 257}))
    assert isinstance(models.load_with_tokenizer(str(tmp_path / "bytes.pt"))[1], text.ByteTokenizer)
    runs.save_checkpoint(tmp_path / "none.pt", cb.GPT(config))
    with pytest.raises(ValueError, match="stores no tokenizer"):
        models.load_with_tokenizer(str(tmp_path / "none.pt"))


# --- train_lm.py --hf and steer.py ---------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_train_lm_and_steer_on_a_saved_model(family, tmp_path, capsys):
    """train_lm.py --hf on a tiny saved GPT-2-style and Pythia-style folder (BPE trained on the
    generated stories; for Pythia NFC, added space tokens and a padded vocabulary), then steer.py."""
    import steer
    import train_lm
    folder, out = tmp_path / "model", tmp_path / "lm"
    folder.mkdir()
    theirs = trained_bpe(folder, normalize=family == "gpt_neox", corpus=[s for _, s in text.make_stories(300)])
    model = tiny_hf(family, vocab_size=theirs.get_vocab_size() + (16 if family == "gpt_neox" else 0))
    model.save_pretrained(folder)
    flags = ["--hf", str(folder), "--out", str(out), "--stories", "300", "--block_size", "32", "--batch_size", "4",
             "--codebook_steps", "3", "--num_codes", "16", "--k", "2", "--revive_every", "2", "--eval_windows", "8",
             "--kmeans_windows", "4", "--threads", "1", "--device", "cpu"]
    train_lm.main(flags)
    results = json.load(open(out / "results.json"))

    # stage 1 is the loaded model, its context cut to --block_size; every checkpoint holds the tokenizer
    base, tok = models.load_with_tokenizer(str(out / "base.pt"))
    x = torch.randint(0, theirs.get_vocab_size(), (2, 32))
    with torch.no_grad():
        assert (base(x) - model(x).logits).abs().max() <= 1e-4 and base.config.block_size == 32
    for name in ("base.pt", "finetuned.pt", "codebook.pt"):
        assert runs.load_checkpoint(str(out / name))["tokenizer"] == tok.to_dict()

    # the corpus: 16-bit token ids, tokenised once, each document after the end-of-text id
    data, = glob.glob(str(out / "data" / "stories-*"))
    stream = np.fromfile(os.path.join(data, "train.bin"), dtype=np.uint16)
    first = stream[:np.load(os.path.join(data, "train_docs.npy"))[1]]
    assert tok.decode(first) in [s for _, s in text.make_stories(300)]
    assert text.Split(data, "train", tok).tokens(0, 3)[0] == tok.bos == theirs.token_to_id("<|endoftext|>")
    # the base's validation loss is the original's (transformers) on the same windows of the same tokens
    args = train_lm.parser.parse_args(flags)
    windows = train_lm.fixed_windows(text.Split(data, "val", tok), args, 0, args.eval_windows, args.block_size + 1)
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert results["base_val_loss"] == pytest.approx(expected, rel=1e-5)
    assert {name: results["settings"][name] for name in ("n_layer", "n_head", "d_model")} == dict(  # the model's, not the flags'
        n_layer=model.config.num_hidden_layers, n_head=model.config.num_attention_heads, d_model=model.config.hidden_size)

    capsys.readouterr()
    steer.main(["--ckpt", str(out / "codebook.pt"), "--codes", "L1.H2.3", "--prompt", "Once upon a time",
                "--samples", "2", "--new_bytes", "6", "--threads", "1", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "with L1.H2.3" in printed and printed.count("    Once upon a time") == 4
    steer.main(["--ckpt", str(out / "codebook.pt"), "--out", str(tmp_path / "steer"), "--topics", "dragons,sea",
                "--reference_stories", "40", "--samples", "2", "--new_bytes", "6", "--min_precision", "0", "--threads", "1",
                "--device", "cpu"])
    steered = json.load(open(tmp_path / "steer" / "results.json"))
    assert set(steered["topics"]) == {"dragons", "sea"} and steered["topics"]["sea"]["codes"]
    page = open(tmp_path / "steer" / "report.html", encoding="utf-8").read()  # BPE tokens in the code browser
    assert 'id="topic-sea"' in page and all(f'id="{c}"' in page for c in steered["topics"]["sea"]["codes"])


def test_token_widths():
    wide = type("Tokenizer", (), {"kind": "bpe", "vocab_size": 70_000})
    assert text.token_dtype(text.ByteTokenizer()) == np.uint8 and text.token_dtype(wide) == np.uint32
    assert text.token_dtype(type("Tokenizer", (), {"kind": "bpe", "vocab_size": 2**16})) == np.uint16


def test_a_compact_model_saved_with_the_former_config_fields_loads():
    """GPTConfig once held the pretrained families' fields too: a compact model's config that holds
    them at the compact model's values loads; one that describes a pretrained family is a clear error."""
    config = dict(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=8, d_mlp=16)
    model = models.model_from_config(config | models.FORMER_FIELDS)
    assert type(model) is cb.GPT and model.config == cb.GPTConfig(**config)
    with pytest.raises(ValueError, match="pretrained model saved by an earlier version"):
        models.model_from_config(config | models.FORMER_FIELDS | {"rotary_dims": 4})
    with pytest.raises(TypeError, match="family"):  # models.model_from_config builds a pretrained family's model
        cb.GPT(models.TransformerConfig(family="llama").to_dict())
