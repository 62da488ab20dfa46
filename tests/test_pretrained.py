"""models.py on GGUF files: a tiny GPT-2, GPT-NeoX, GPT-J, GPT-BigCode, Llama, Qwen, Gemma, Gemma-2, Gemma-3, Granite,
Command-R, Command-R7B, StableLM, Phi-2, StarCoder2, OLMo, ERNIE 4.5, Arcee, Nemotron, Ministral (as llama), GLM-4, GLM
(chatglm), Apertus, Seed-OSS, EXAONE 3, EXAONE 4, BLOOM, MPT, Falcon, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and gpt-oss
(its experts in MXFP4) written by the `gguf` package's writer (laid out as llama.cpp's converter does) against
transformers' float32 original; files that disagree with themselves; and the real SmolLM2-135M-Instruct (Q4_1) and
Gemma-3-270M (Q4_K_M) of .ci/fetch_models against transformers' own GGUF loader, then finetuned with codebooks by
train_lm.py and steered by steer.py.
Test-only packages (transformers, gguf, accelerate) and the model files skip where absent, unless
CODEBOOK_REQUIRE_HF=1 or CODEBOOK_REQUIRE_MODELS=1 (CI) makes that a failure."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch

import formats
import models
import runs
from conftest import GEMMA3, LLAMA3, PHI3_LONGROPE, SMOLLM2, mxfp4, need, real_model, tiny_hf


# --- a tiny Llama as a GGUF file ------------------------------------------------------------

def permute(w, heads):
    """What llama.cpp's converter does to q / k rows: each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # GPT-2's matrices stored (in, out)
KEPT_F32 = re.compile(r"^position_embd\.|_norm\.weight$|\.ffn_gate_inp(_shexp)?\.")  # what the converter never quantises


def ggml_mxfp4(blocks, scales):
    """MXFP4 as released (per 32 values a scale byte and 16 bytes, byte j holding value 2j in its low nibble and 2j + 1 in
    its high one) laid out as ggml's MXFP4 blocks, as llama.cpp's converter repacks it: the scale byte as it is, then 16
    bytes whose low nibbles hold values 0-15 and high nibbles values 16-31; bytes (..., G * 17)."""
    codes = torch.stack([blocks & 0x0F, blocks >> 4], -1).flatten(-2)  # (..., G, 32): the codes in their values' order
    return torch.cat([scales[..., None], codes[..., :16] | codes[..., 16:] << 4], -1).flatten(-2).numpy()


def write_gguf(path, model, quantisation="F32", arch="llama", rope_freqs=None, drop=(), qkv_apart=False, qkv_fused=False,
               mxfp4=None, xielu=None, **changes):
    """model (a transformers GPT-2, GPT-NeoX, GPT-J, GPT-BigCode, Llama, Qwen2, Qwen3, SmolLM3, OLMo-2, Phi-3, Gemma,
    Gemma2, Gemma3, Granite, Cohere, Cohere2, StableLM, Phi, StarCoder2, OLMo, ERNIE 4.5, Arcee, Nemotron, GLM, GLM-4,
    Apertus, Seed-OSS, EXAONE 3, EXAONE 4, BLOOM, MPT, Falcon, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE or gpt-oss) as
    llama.cpp's converter writes it:
    matrices in `quantisation` (norms, biases, a mixture's router and Qwen2-MoE's shared expert gate stay F32); each
    expert matrix of all experts stacked as one (experts, out, in) tensor; Phi-3's q / k / v fused (or apart: qkv_apart) and its
    gate / up fused; q / k rows permuted for
    the llama, smollm3, granite and arcee architectures (whose rotary llama.cpp computes on interleaved pairs; for the others
    it computes as transformers does: "rotate_half", or Cohere's interleaved pairs); metadata from its config
    (Granite's multipliers as scales; Cohere's logit scale; StableLM's rotary dims and parallel residual, and no
    rotary base or key_length, which its converter leaves out); `changes` overwrite metadata values, `drop` leaves keys out;
    rope_freqs: the divisor of each rotary frequency, as llama.cpp's converter stores Llama-3's rope
    scaling; Phi-3's LongRoPE factors as two tensors, its original context and attention factor in the metadata.
    Gemma's norm weights are stored as 1 + weight, Gemma-2's and -3's window and soft-caps in the metadata. GPT-2's
    Conv1D matrices are transposed to (out, in); GPT-NeoX's fused q / k / v, head by head, reordered to all q rows,
    all k rows, all v rows; StableLM's per-head q / k LayerNorms stacked to one tensor. GPT-J (gptj): its rotary_dim as
    rope.dimension_count, an MLP of 4 d_model, q / k rows as they are, as gguf-py's tensor map names them. GPT-BigCode
    (starcoder): an MLP of 4 d_model, one key / value head, c_attn as it is.
    Phi (phi2): an MLP of 4 d_model and as many key / value heads as heads whatever config.json says, rotary dims as
    partial_rotary_factor * d_model // heads, no rotary base or key_length; q, k and v as one tensor with qkv_fused,
    as older Phi-2 files hold them. OLMo (olmo): q / k rows permuted, no norm tensors, eps 1e-5, clip_qkv as
    attention.clamp_kqv.
    gpt-oss: its sinks as attn_sinks.weight, its window, YaRN and expert width in the metadata, its interleaved gate / up
    columns (and biases) split; its experts from `mxfp4` ({weight name: (blocks, scales)} as released), repacked
    (ggml_mxfp4), or without it its float weights.
    BLOOM (bloom): fused q / k / v reordered as GPT-NeoX's, its embedding norm token_embd_norm, the embedding written
    again as output, the context its n_embed (no seq_length here). MPT (mpt): an MLP of 4 d_model, eps 1e-5,
    attention.max_alibi_bias and clip_qkv as attention.clamp_kqv.
    GLM-4 (glm4) and GLM (chatglm): q / k rows as they are, gate_up_proj as ffn_up, the rotary dims as rope.dimension_count;
    GLM-4's norms after attention and the MLP as post_attention_norm and post_ffw_norm; GLM's converter (ChatGLM's) writes
    no key_length, eps 1e-5, base 10,000 and a context of d_model whatever config.json says.
    Nemotron (nemotron): its norm weights stored as 1 + weight (not its norm biases), q / k rows as they are,
    rope.dimension_count as partial_rotary_factor * d_model // heads, rope.scaling.type none or linear with its factor.
    Falcon (falcon): an MLP of 4 d_model, the context 2,048, no rotary base, head_count_kv num_kv_heads in the new decoder
    architecture (else 1), query_key_value's key / value groups regrouped to all q rows, all k rows, all v rows, ln_attn as
    attn_norm_2 and ln_mlp (or input_layernorm) as attn_norm.
    Apertus (apertus): q / k rows as they are, its norms attn_norm and ffn_norm, its xIELU parameters as metadata
    xielu.alpha_p, xielu.alpha_n, xielu.beta and xielu.eps (no architecture prefix; one number per layer), which
    `xielu` ({name: value, or None to leave it out}) overwrites; Llama-3's scaling as rope_freqs. Seed-OSS (seed_oss): q /
    k rows as they are, the MLP's norm as post_attention_norm. EXAONE 3 (exaone): q / k rows as they are (llama.cpp
    rotates their halves).
    EXAONE 4 (exaone4): q / k rows as they are, its norms after attention and the MLP as post_attention_norm and
    post_ffw_norm, a window (where set) as attention.sliding_window and the sliding layers as a list of booleans,
    attention.sliding_window_pattern."""
    gguf = need("gguf")
    c = model.config
    gemma = arch.startswith("gemma")
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    # (BLOOM's converter writes seq_length for the context, or where config.json has none, as here, n_embed; Falcon's 2,048)
    context = c.hidden_size if arch == "bloom" else c.max_seq_len if arch == "mpt" else 2048 if arch == "falcon" else \
        c.max_position_embeddings
    meta = {"block_count": c.num_hidden_layers, "context_length": context, "embedding_length": c.hidden_size,
            "feed_forward_length": 4 * c.hidden_size if arch in ("gpt2", "gptj", "starcoder", "bloom", "mpt", "falcon")
            else c.intermediate_size, "attention.head_count": c.num_attention_heads}
    if arch == "falcon":  # LayerNorms, no rotary base written; one key / value head but in the new decoder architecture (the
        # converter's: num_kv_heads, which the released 7B's config.json has not, else 1)
        meta |= {"attention.layer_norm_epsilon": c.layer_norm_epsilon, "tensor_data_layout": "jploski",
                 "attention.head_count_kv": c.num_kv_heads if c.new_decoder_architecture else 1}
    elif arch in ("gpt2", "gptneox", "gptj", "starcoder"):  # LayerNorms, no rotary base written
        meta |= {"attention.layer_norm_epsilon": c.layer_norm_eps if arch == "gptneox" else c.layer_norm_epsilon}
    elif arch in ("bloom", "mpt"):  # no rotary embedding; MPT's converter writes eps 1e-5 whatever config.json says, its
        # maximum ALiBi bias and clip_qkv as clamp_kqv; no head_count_kv (MPT) or as many as heads (BLOOM)
        meta |= {"attention.layer_norm_epsilon": c.layer_norm_epsilon if arch == "bloom" else 1e-5}
        meta |= {"attention.head_count_kv": c.num_attention_heads} if arch == "bloom" else \
            {"attention.max_alibi_bias": float(c.attn_config.alibi_bias_max)}
        if arch == "mpt" and c.attn_config.clip_qkv:
            meta |= {"attention.clamp_kqv": c.attn_config.clip_qkv}
    else:
        meta |= {"attention.head_count_kv": c.num_key_value_heads, "attention.key_length": head,
                 "rope.freq_base": c.rope_parameters.get("full_attention", c.rope_parameters)["rope_theta"]}
        meta |= ({"attention.layer_norm_epsilon": c.layer_norm_eps} if arch in ("command-r", "cohere2", "stablelm", "phi2")
                 else {"attention.layer_norm_epsilon": c.norm_epsilon} if arch == "starcoder2"
                 else {"attention.layer_norm_epsilon": c.norm_eps} if arch == "nemotron"
                 else {"attention.layer_norm_epsilon": 1e-5} if arch == "olmo"
                 else {"attention.layer_norm_rms_epsilon": c.rms_norm_eps})
    if arch in ("phi3", "gptneox", "stablelm", "glm4", "chatglm"):  # the rotary embedding on a part of each head
        meta |= {"rope.dimension_count": int(head * c.rope_parameters["partial_rotary_factor"])}
    if arch == "chatglm":
        meta = {key: value for key, value in meta.items() if key != "attention.key_length"} | {
            "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0, "context_length": c.hidden_size}
    if arch in ("gptneox", "stablelm"):
        meta |= {"use_parallel_residual": c.use_parallel_residual}
    if arch == "gptj":
        meta |= {"rope.dimension_count": c.rotary_dim}
    if arch == "starcoder":
        meta |= {"attention.head_count_kv": 1}
    longrope = arch == "phi3" and c.rope_parameters.get("long_factor")
    if arch == "phi3":  # its original context, always; with LongRoPE the attention factor, from the context over it
        scale = c.max_position_embeddings / c.original_max_position_embeddings
        meta |= {"rope.scaling.original_context_length": c.original_max_position_embeddings}
        if longrope:
            meta |= {"rope.scaling.attn_factor": math.sqrt(1 + math.log(scale) / math.log(c.original_max_position_embeddings))
                     if scale > 1 else 1.0}
    if arch == "phi2":
        meta |= {"feed_forward_length": 4 * c.hidden_size, "attention.head_count_kv": c.num_attention_heads,
                 "rope.dimension_count": int(c.rope_parameters["partial_rotary_factor"] * c.hidden_size) // c.num_attention_heads}
    if arch == "nemotron":  # (its converter counts the rotary dims from d_model, not head_dim)
        rope = c.rope_parameters
        meta |= {"rope.dimension_count": int(rope["partial_rotary_factor"] * c.hidden_size) // c.num_attention_heads}
        meta |= {"rope.scaling.type": "linear", "rope.scaling.factor": rope["factor"]} if rope["rope_type"] == "linear" else \
            {"rope.scaling.type": "none"}
    if arch in ("stablelm", "phi2"):  # their converters write no rotary base (llama.cpp's default, 10,000), no key_length
        meta = {key: value for key, value in meta.items() if key not in ("rope.freq_base", "attention.key_length")}
    if arch in ("starcoder2", "olmo"):  # no key_length (their config.json has no head_dim)
        del meta["attention.key_length"]
    if arch == "olmo" and c.clip_qkv:
        meta |= {"attention.clamp_kqv": c.clip_qkv}
    if arch == "granite":  # the multipliers as llama.cpp's scales; the logits are divided by logit_scale
        meta |= {"attention.scale": c.attention_multiplier, "embedding_scale": c.embedding_multiplier,
                 "residual_scale": c.residual_multiplier, "logit_scale": c.logits_scaling}
    if arch in ("command-r", "cohere2"):
        meta |= {"logit_scale": c.logit_scale}
    if arch == "cohere2":
        meta |= {"attention.sliding_window": c.sliding_window}
    if arch == "exaone4" and c.sliding_window is not None:  # the window, and the sliding layers listed
        meta |= {"attention.sliding_window": c.sliding_window,
                 "attention.sliding_window_pattern": [kind == "sliding_attention" for kind in c.layer_types]}
    if getattr(c, "num_experts", None):  # a mixture of experts: Mixtral's (arch llama) and OLMoE's experts of intermediate_size
        meta |= {"expert_count": c.num_experts, "expert_used_count": c.num_experts_per_tok}
        if arch in ("qwen2moe", "qwen3moe"):
            meta |= {"expert_feed_forward_length": c.moe_intermediate_size}
        if arch == "qwen2moe":
            meta |= {"expert_shared_feed_forward_length": c.shared_expert_intermediate_size}
    if arch == "gemma":  # no rotary base written: llama.cpp's default, 10,000
        del meta["rope.freq_base"]
    if arch in ("gemma2", "gemma3"):
        meta |= {"attention.sliding_window": c.sliding_window}
        meta |= {name: getattr(c, name) for name in ("attn_logit_softcapping", "final_logit_softcapping") if getattr(c, name)}
    if arch == "gpt-oss":  # (the current converter writes the ramp's ends too, from config.json; they are not read)
        rope = c.rope_parameters
        meta |= {"expert_feed_forward_length": c.intermediate_size, "attention.sliding_window": c.sliding_window,
                 "rope.scaling.type": "yarn", "rope.scaling.factor": rope["factor"],
                 "rope.scaling.original_context_length": rope["original_max_position_embeddings"],
                 "rope.scaling.yarn_beta_fast": rope["beta_fast"], "rope.scaling.yarn_beta_slow": rope["beta_slow"]}
    meta = {key: value for key, value in meta.items() if key not in drop} | changes
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        (writer.add_string if isinstance(value, str) else writer.add_bool if isinstance(value, bool) else
         writer.add_array if isinstance(value, list) else
         writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"{arch}.{key}", value)
    if arch == "apertus":  # (keys of no architecture)
        state = model.state_dict()
        values = {name: [state[f"model.layers.{i}.mlp.act_fn.{name}"].item() for i in range(c.num_hidden_layers)]
                  for name in ("alpha_p", "alpha_n", "beta", "eps")} | (xielu or {})
        for name, value in values.items():
            if value is not None:
                (writer.add_array if isinstance(value, list) else writer.add_float32)(f"xielu.{name}", value)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
             "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
             "ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up",
             "mlp.c_proj": "ffn_down", "gpt_neox.embed_in": "token_embd", "gpt_neox.final_layer_norm": "output_norm",
             "attention.query_key_value": "attn_qkv", "attention.dense": "attn_output", "mlp.dense_h_to_4h": "ffn_up",
             "mlp.dense_4h_to_h": "ffn_down", "self_attn.q_layernorm": "attn_q_norm", "self_attn.k_layernorm": "attn_k_norm",
             "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
             "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
             "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.router": "ffn_gate_inp", "self_attn.sinks": "attn_sinks",
             "model.final_layernorm": "output_norm", "self_attn.dense": "attn_output", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
             "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.out_proj": "attn_output",
             "mlp.fc_in": "ffn_up", "mlp.fc_out": "ffn_down",
             "transformer.word_embeddings": "token_embd", "transformer.word_embeddings_layernorm": "token_embd_norm",
             "self_attention.query_key_value": "attn_qkv", "self_attention.dense": "attn_output",
             "transformer.norm_f": "output_norm", "norm_1": "attn_norm", "norm_2": "ffn_norm", "attn.Wqkv": "attn_qkv",
             "ffn.up_proj": "ffn_up", "ffn.down_proj": "ffn_down", "ln_attn": "attn_norm_2", "ln_mlp": "attn_norm",
             "attention_layernorm": "attn_norm", "feedforward_layernorm": "ffn_norm"}
    if arch in ("gemma2", "gemma3", "olmo2", "gpt-oss", "seed_oss", "exaone4"):  # their norms after attention and the MLP
        # (gpt-oss's and Seed-OSS's: the MLP's)
        names |= {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                  "post_feedforward_layernorm": "post_ffw_norm"}
    if arch == "glm4":
        names |= {"post_self_attn_layernorm": "post_attention_norm", "post_mlp_layernorm": "post_ffw_norm"}
    kind = gguf.GGMLQuantizationType[quantisation]

    def add(gguf_name, w):  # the converter keeps position embeddings, norms (Cohere's per-head ones: 2-d) and routers F32
        if w.ndim >= 2 and kind != gguf.GGMLQuantizationType.F32 and not KEPT_F32.search(gguf_name):
            writer.add_tensor(gguf_name, gguf.quants.quantize(w, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(w))

    state = model.state_dict()
    for name in [name for name in state if ".norms.0." in name]:  # StableLM's per-head norms as one (heads, d_head) tensor
        stem = name.split(".norms.0.")[0]
        heads = sorted(n for n in state if n.startswith(stem + ".norms."))
        state = {n: t for n, t in state.items() if n not in heads} | {stem + ".weight": torch.stack([state[n] for n in heads])}
    if qkv_fused:  # each layer's q, k and v rows (and biases) as one tensor, named as Phi-3's
        for name in [name for name in state if ".q_proj." in name]:
            parts = [name.replace("q_proj", x) for x in ("q_proj", "k_proj", "v_proj")]
            state = {n: t for n, t in state.items() if n not in parts} | {
                name.replace("q_proj", "qkv_proj"): torch.cat([state[n] for n in parts])}
    for name, t in state.items():
        w = t.numpy()
        if name == "lm_head.weight" and c.tie_word_embeddings and arch != "bloom" or ".act_fn." in name:  # (BLOOM's
            continue  # converter writes the embedding again as output; Apertus's xIELU is in the metadata)
        if gemma and "norm" in name or arch == "nemotron" and name.endswith("norm.weight"):  # llama.cpp stores Gemma's
            w = w + 1  # and Nemotron's norm weights as 1 + weight
        if ("q_proj" in name or "k_proj" in name) and arch in ("llama", "smollm3", "granite", "olmo", "arcee"):
            w = permute(w, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
        if arch == "gpt2" and name.endswith(CONV1D):
            w = w.T
        if "query_key_value" in name and arch == "falcon":  # each key / value head's group (its queries, its key, its
            # value) to all q rows, all k rows, all v rows
            groups = w.reshape(meta["attention.head_count_kv"], -1, head, *w.shape[1:])
            w = np.concatenate([groups[:, :-2].reshape(-1, *w.shape[1:]), groups[:, -2:].swapaxes(0, 1).reshape(-1, *w.shape[1:])])
        elif "query_key_value" in name:  # (head, q / k / v, dim) to (q / k / v, head, dim) (GPT-NeoX's and BLOOM's)
            w = w.reshape(c.num_attention_heads, 3, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)
        oss = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj(_bias)?$", name)
        if arch == "gpt-oss" and oss:  # gate_up's gate the even columns (bias entries, MXFP4 rows), up the odd
            parts = {"ffn_down_exps": slice(None)} if oss[2] == "down" else \
                {"ffn_gate_exps": slice(0, None, 2), "ffn_up_exps": slice(1, None, 2)}
            for part, half in parts.items():
                if oss[3]:  # (experts, out)
                    writer.add_tensor(f"blk.{oss[1]}.{part}.bias", np.ascontiguousarray(w[:, half]))
                elif mxfp4:  # blocks (experts, out, G, 16), scales (experts, out, G)
                    blocks, scales = mxfp4[name]
                    writer.add_tensor(f"blk.{oss[1]}.{part}.weight", ggml_mxfp4(blocks[:, half], scales[:, half]),
                                      raw_dtype=gguf.GGMLQuantizationType.MXFP4)
                else:  # (experts, in, out) to (experts, out, in)
                    add(f"blk.{oss[1]}.{part}.weight", np.ascontiguousarray(w[:, :, half].swapaxes(1, 2)))
            continue
        experts = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj$", name)
        if experts:  # transformers' (experts, 2 ff, d) and (experts, d, ff): the converter's stacks of the stored experts
            parts = {"ffn_down_exps": w} if experts[2] == "down" else \
                dict(zip(("ffn_gate_exps", "ffn_up_exps"), np.split(w, 2, axis=1)))
            for part, stacked in parts.items():
                add(f"blk.{experts[1]}.{part}.weight", stacked)
            continue
        stem, suffix = name.rsplit(".", 1) if not name.endswith(".sinks") else (name, "weight")  # gpt-oss's: a parameter
        layer = re.match(r"(model\.layers|transformer\.h|gpt_neox\.layers|transformer\.blocks)\.(\d+)\.(.+)", stem)
        gguf_name = f"blk.{layer[2]}.{names[layer[3]]}.{suffix}" if layer else f"{names[stem]}.{suffix}"
        if qkv_apart and "qkv_proj" in name:
            q, kv = c.num_attention_heads * meta["attention.key_length"], c.num_key_value_heads * meta["attention.key_length"]
            for part, rows in zip(("attn_q", "attn_k", "attn_v"), np.split(w, [q, q + kv])):
                add(gguf_name.replace("attn_qkv", part), rows)
        else:
            add(gguf_name, w)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.numpy())
    if longrope:  # LongRoPE's factors, F32
        for kind in ("long", "short"):
            add(f"rope_factors_{kind}.weight", np.array(c.rope_parameters[f"{kind}_factor"], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def rounded(model, quantisation, exact=()):
    """A copy of the transformers model with every matrix rounded through the GGUF block format as write_gguf
    stores it (a mixture's stacked experts too, in blocks along their rows): GPT-2's Conv1D matrices and gpt-oss's
    (expert, in, out) experts in blocks along the rows of their (out, in) transpose; position embeddings, norms, biases
    (gpt-oss's experts' are matrices), routers (gpt-oss's mlp.router too) and Qwen2-MoE's shared expert gate not at all
    (the converter keeps them F32), nor the tensors named in `exact` (gpt-oss's MXFP4 experts, written as released)."""
    gguf = need("gguf")
    kind = gguf.GGMLQuantizationType[quantisation]
    rounding = lambda w: gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind)
    transposed = CONV1D if isinstance(model, need("transformers").GPT2LMHeadModel) else \
        ("experts.gate_up_proj", "experts.down_proj") if model.config.model_type == "gpt_oss" else ()

    def rounded_tensor(name, t):
        if t.dim() < 2 or name.endswith(("bias", "wpe.weight", "mlp.gate.weight", "mlp.router.weight",
                                         "shared_expert_gate.weight")) or "norm" in name or name in exact:
            return t
        if name.endswith(transposed):
            return torch.from_numpy(np.ascontiguousarray(rounding(t.numpy().swapaxes(-1, -2)).swapaxes(-1, -2)))
        return torch.from_numpy(rounding(t.numpy()))
    copy = type(model)(model.config).eval()
    copy.load_state_dict({name: rounded_tensor(name, t) for name, t in model.state_dict().items()})
    return copy


def assert_reads_as(ours, theirs, quantisation="F32", exact=()):
    """`ours` gives the logits (within 1e-4) and the 20 greedy tokens of `theirs` with its matrices rounded to
    `quantisation` as the file holds them (but those in `exact`); where they are rounded, the rounding is large enough
    to see."""
    x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(5))
    reference = theirs if quantisation == "F32" else rounded(theirs, quantisation, exact)
    with torch.no_grad():
        original, want, got = theirs(x).logits, reference(x).logits, ours(x)
    assert (got - want).abs().max() <= 1e-4 and want.std() > 1.0
    if quantisation != "F32":
        assert (want - original).abs().max() > 1e-2
    want_ids = reference.generate(x[:1, :8], max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
    assert torch.equal(ours.generate(x[:1, :8], 20, temperature=0), want_ids)


@pytest.mark.parametrize("arch,quantisation", [("llama", "F32"), ("llama", "Q8_0"), ("llama", "Q4_1"), ("llama3", "F32"),
                                               ("qwen2", "F32"), ("qwen3", "Q8_0"), ("smollm3", "Q8_0"),
                                               ("qwen3-yarn", "F32"), ("olmo2", "F32"), ("olmo3", "F32"),
                                               ("olmo3-pattern", "F32"), ("phi3", "Q8_0"), ("phi3-apart", "F32")])
def test_a_gguf_file_gives_its_original_logits(arch, quantisation, tmp_path):
    """F32: the original's logits within 1e-4. A block format: within 1e-4 of the original with its
    matrices rounded to the format (gguf's own dequantisation), which is not the original.
    - "llama3": Llama-3's rope scaling, stored as the ratios of transformers' frequencies before and after it.
    - "qwen3-yarn": YaRN, stored as its type, factor and original context; the ramp's ends, if written, are not
      read (llama.cpp reads them for other architectures only).
    - SmolLM3: four layers, the last without the rotary embedding, which llama.cpp implies (no metadata says so).
    - OLMo-3: stored as olmo2 with a window (of 5), which llama.cpp puts on three layers in four; "olmo3-pattern":
      the windowed layers other than those, as the converter marks them in attention.sliding_window_pattern.
    - Phi-3: the rotary embedding on half of each head; a window of 5 in the metadata, which llama.cpp leaves
      out (full attention); "phi3-apart": its q, k and v as three tensors, which llama.cpp reads too."""
    yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
    options = {"qwen3": dict(head_dim=32), "llama3": dict(rope_scaling=LLAMA3), "smollm3": dict(num_hidden_layers=4),
               "qwen3-yarn": dict(head_dim=32, rope_scaling=yarn),
               "olmo3": dict(num_hidden_layers=4, sliding_window=5),
               "olmo3-pattern": dict(num_hidden_layers=4, sliding_window=5, layer_types=[
                   "full_attention", "sliding_attention", "full_attention", "sliding_attention"]),
               "phi3": dict(partial_rotary_factor=0.5), "phi3-apart": dict(partial_rotary_factor=0.5)}.get(arch, {})
    theirs = tiny_hf(arch.replace("llama3", "llama").replace("-apart", "").replace("-yarn", "").replace("-pattern", ""),
                     tie_word_embeddings=False, **options)
    divisors = None
    if arch == "llama3":
        divisors = models.rotary_frequencies(16, 10000.0, {}) / theirs.model.rotary_emb.inv_freq
        assert divisors.min() == 1 and divisors.max() == 8 and ((divisors > 1) & (divisors < 8)).any()  # all 3 bands
        arch = "llama"
    family, changes = arch, {}
    if arch.startswith("olmo3"):
        family, arch, changes = "olmo3", "olmo2", {"attention.sliding_window": 5}
        if options.get("layer_types"):
            changes["attention.sliding_window_pattern"] = [kind == "sliding_attention" for kind in options["layer_types"]]
    if arch == "qwen3-yarn":
        family, arch, changes = "qwen3", "qwen3", {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
                                                   "rope.scaling.original_context_length": 16,
                                                   "rope.scaling.yarn_beta_fast": 1.0, "rope.scaling.yarn_beta_slow": 0.25}
    if arch.startswith("phi3"):
        family, arch, changes = "phi3", "phi3", {"attention.sliding_window": 5, "qkv_apart": arch == "phi3-apart"}
    path = write_gguf(tmp_path / f"tiny-{quantisation}.gguf", theirs, quantisation, arch, divisors, **changes)
    ours = models.from_pretrained(path)
    assert ours.config.family == family and ours.config.n_kv_head == 2 and not ours.config.tied_head
    assert_reads_as(ours, theirs, quantisation)


# OLMo-3 with YaRN on its full layers (its long-context releases'): an attention factor and ramp ends other than
# transformers' defaults, so that each read or left out shows; the full layers' base 1000, the windowed ones'
# transformers' default, 500000 (config.json giving one base); the older converter's original with the default ramp
# ends and one base
OLMO3_YARN = {"current": dict(num_hidden_layers=4, sliding_window=5, rope_theta=1000.0, rope_scaling=dict(
                  rope_type="yarn", factor=4.0, original_max_position_embeddings=16, attention_factor=1.5,
                  beta_fast=0.5, beta_slow=0.125)),  # (the ramp from frequency 1 to 4 of 8, not 0 to 2)
              "older": dict(num_hidden_layers=4, sliding_window=5, rope_scaling=dict(
                  rope_type="yarn", factor=4.0, original_max_position_embeddings=16, attention_factor=1.5))}


def olmo3_yarn_metadata(c, converter):
    """An OLMo-3's window and YaRN as llama.cpp's converter writes them: its window and pattern (True: windowed); the
    current converter's YaRN keys (with transformers 5's rope_parameters, the windowed layers' base too) or an older
    one's, which holds the attention factor in rope.scaling.attn_factor and writes no ramp ends."""
    full, sliding = c.rope_parameters["full_attention"], c.rope_parameters["sliding_attention"]
    meta = {"attention.sliding_window": c.sliding_window,
            "attention.sliding_window_pattern": [kind == "sliding_attention" for kind in c.layer_types],
            "rope.scaling.type": "yarn", "rope.scaling.factor": full["factor"],
            "rope.scaling.original_context_length": full["original_max_position_embeddings"]}
    if converter == "older":
        return meta | {"rope.scaling.attn_factor": full["attention_factor"]}
    return meta | {"rope.scaling.yarn_attn_factor": full["attention_factor"],
                   "rope.scaling.yarn_beta_fast": full["beta_fast"], "rope.scaling.yarn_beta_slow": full["beta_slow"],
                   "rope.freq_base_swa": sliding["rope_theta"]}


@pytest.mark.parametrize("converter,quantisation", [("current", "F32"), ("current", "Q8_0"), ("older", "F32")])
def test_an_olmo3_gguf_file_with_yarn_gives_its_original_logits(converter, quantisation, tmp_path):
    """OLMo-3's YaRN as the converter writes it (olmo3_yarn_metadata), read as transformers computes the original:
    on the full layers only, with the file's attention factor once (llama.cpp would multiply an older file's by its
    own 0.1 ln(factor) + 1) and ramp ends (llama.cpp's are 32 and 1 whatever the file says); the windowed layers
    unscaled, by rope.freq_base_swa where the file has it (llama.cpp rotates them by rope.freq_base)."""
    theirs = tiny_hf("olmo3", tie_word_embeddings=False, **OLMO3_YARN[converter])
    c = theirs.config
    assert c.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    path = write_gguf(tmp_path / f"olmo3-{quantisation}.gguf", theirs, quantisation, "olmo2",
                      **olmo3_yarn_metadata(c, converter))
    ours = models.from_pretrained(path)
    config = ours.config
    assert config.family == "olmo3" and config.attn_window == [5, 5, 5, 0]
    assert config.rotary_scaling["attention_factor"] == 1.5 and config.local_rotary_base == 500000.0
    assert (config.rotary_scaling["beta_fast"], config.rotary_scaling["beta_slow"]) == \
        ((0.5, 0.125) if converter == "current" else (32, 1))
    assert config.rotary_base == (1000.0 if converter == "current" else 500000.0)
    assert_reads_as(ours, theirs, quantisation)


def test_an_olmo3_gguf_file_with_scaling_it_cannot_read_is_refused(tmp_path):
    """Two attention factors that disagree (an older converter's key and the current one's), a rope scaling other than
    YaRN with a window, and a window pattern not one per layer, are refused in one line."""
    theirs = tiny_hf("olmo3", tie_word_embeddings=False, **OLMO3_YARN["current"])
    meta = olmo3_yarn_metadata(theirs.config, "current")
    linear = {key: value for key, value in meta.items() if not key.startswith("rope.scaling.")} | {
        "rope.scaling.type": "linear", "rope.scaling.factor": 2.0}
    assert_each_refused(theirs, "olmo2", [
        (meta | {"rope.scaling.attn_factor": 1.25}, "metadata olmo2.rope.scaling.attn_factor = 1.25 and "
                                                    "olmo2.rope.scaling.yarn_attn_factor = 1.5 disagree"),
        (linear, "an olmo2 file with a sliding window and linear rope scaling is not implemented"),
        (meta | {"attention.sliding_window_pattern": [True, False]},
         "olmo2.attention.sliding_window_pattern must give true or false for each of the 4 layers")], tmp_path)


def test_a_phi3_gguf_file_with_longrope_gives_its_original_logits(tmp_path):
    """Phi's LongRoPE as llama.cpp's converter writes it (rope_factors_short and rope_factors_long, the original
    context and the attention factor in the metadata), read as transformers computes the original: the short factors
    for a forward within the original context of 16, the long ones past it (llama.cpp would choose by the context
    it is run with instead); the inputs of assert_reads_as reach past it, and its generations cross it."""
    theirs = tiny_hf("phi3", tie_word_embeddings=False, **PHI3_LONGROPE)
    ours = models.from_pretrained(write_gguf(tmp_path / "longrope.gguf", theirs, arch="phi3"))
    assert ours.config.rotary_scaling["original_max_position_embeddings"] == 16 and ours.config.rotary_dims == 12
    x = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(7))
    for length in (16, 17):
        with torch.no_grad():
            want = theirs(x[:, :length]).logits
        assert want.std() > 1.0 and (ours(x[:, :length]) - want).abs().max() <= 1e-4, length
    assert_reads_as(ours, theirs)
    # rope.scaling.type = "longrope", as gguf-py names it (convert_hf_to_gguf's TextModel writes it for LongRoPE configs;
    # its Phi3MiniModel, writing its own keys, leaves it out), which llama.cpp reads: the same model, factors from tensors
    typed = models.from_pretrained(write_gguf(tmp_path / "typed.gguf", theirs, arch="phi3", **{"rope.scaling.type": "longrope"}))
    assert typed.config.rotary_scaling == ours.config.rotary_scaling
    with torch.no_grad():
        assert torch.equal(typed(x), ours(x))


# (family, GGUF architecture, tiny_hf options): each mixture as llama.cpp computes it, which renormalises the chosen
# experts' weights in Mixtral and Qwen3-MoE and not in Qwen2-MoE and OLMoE, whatever config.json says (their real
# models' norm_topk_prob agrees); OLMoE with as many key / value heads as query heads (llama.cpp's k norm spans d_model)
MOE_GGUF = {"mixtral": ("mixtral", "llama", {}), "qwen2moe": ("qwen2_moe", "qwen2moe", {}),
            "qwen3moe": ("qwen3_moe", "qwen3moe", dict(norm_topk_prob=True, head_dim=32)),
            "olmoe": ("olmoe", "olmoe", dict(num_key_value_heads=4))}


@pytest.mark.parametrize("arch,quantisation", [("mixtral", "F32"), ("mixtral", "Q8_0"), ("qwen2moe", "Q8_0"),
                                               ("qwen3moe", "F32"), ("qwen3moe", "Q4_1"), ("olmoe", "Q8_0")])
def test_a_mixture_of_experts_gguf_file_gives_its_original_logits(arch, quantisation, tmp_path):
    """llama.cpp's mixtures of experts: the router (ffn_gate_inp, F32), each expert matrix of all experts as one
    3-D tensor (ffn_gate_exps, ffn_up_exps, ffn_down_exps), Qwen2-MoE's shared expert (ffn_*_shexp) and its gate (ffn_gate_inp_shexp, F32); expert_count,
    expert_used_count, expert_feed_forward_length and expert_shared_feed_forward_length in the metadata. Mixtral is
    the llama architecture with experts, q / k rows permuted. Within 1e-4 of the original with its matrices
    (the experts' in blocks along their rows) rounded to the format."""
    family, gguf_arch, options = MOE_GGUF[arch]
    theirs = tiny_hf(family, **options)
    path = write_gguf(tmp_path / f"{arch}.gguf", theirs, quantisation, gguf_arch)
    ours = models.from_pretrained(path)
    config = ours.config
    assert config.family == family and (config.experts, config.experts_used) == (4, 2) and not config.tied_head
    assert config.experts_renormalised == (arch in ("mixtral", "qwen3moe"))
    assert config.d_shared_expert == (64 if arch == "qwen2moe" else 0) and config.qkv_bias == (arch == "qwen2moe")
    assert_reads_as(ours, theirs, quantisation)


def assert_each_refused(theirs, arch, cases, tmp_path):
    """Each (metadata changes, message) of `cases` written into theirs' GGUF file is refused in that one line."""
    for changes, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            models.from_pretrained(write_gguf(tmp_path / "bad.gguf", theirs, arch=arch, **changes))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("experts,quantisation", [("MXFP4", "F32"), ("F32", "F32"), ("MXFP4", "Q8_0"), ("MXFP4", "BF16"),
                                                  ("MXFP4", "F16"), ("F32", "Q8_0")])
def test_a_gpt_oss_gguf_file_gives_its_original_logits(experts, quantisation, tmp_path):
    """llama.cpp's gpt-oss: sinks (attn_sinks), the router and experts with biases (ffn_gate_inp, ffn_gate_exps,
    ffn_up_exps, ffn_down_exps), gate and up split from transformers' interleaved gate_up_proj, the MLP's norm
    post_attention_norm; the experts in MXFP4 as released (their blocks repacked to ggml's layout, which the gguf package
    reads as transformers reads the released ones) or, as the converter writes an unquantised checkpoint, in float32;
    the other matrices in float32, or in Q8_0, BF16 or F16 beside MXFP4 experts as the released files hold them
    (ggml-org's Q8_0, unsloth's F16 and Q8_0), or all in Q8_0 (a float checkpoint converted to it). The window (5,
    shorter than the inputs) on the even layers, which llama.cpp implies; YaRN as transformers computes gpt-oss's (its
    ramp's ends, 0.21 and 3.22, not rounded to whole dimensions as llama.cpp rounds them); the SwiGLU clamped at
    llama.cpp's 7, which the gates and ups here pass."""
    gguf, mxfp4_hf = need("gguf"), need("transformers.integrations.mxfp4")
    theirs, g, released = tiny_hf("gpt_oss", swiglu_limit=7.0), torch.Generator().manual_seed(9), {}
    with torch.no_grad():
        for i, layer in enumerate(theirs.model.layers):  # experts exactly MXFP4's values, as released (in float32 too)
            for name, rows, cols in (("gate_up_proj", 2 * 96, 64), ("down_proj", 64, 96)):
                blocks, scales = released[f"model.layers.{i}.mlp.experts.{name}"] = mxfp4((4, rows, cols // 32), g, (123, 127))
                weight = mxfp4_hf.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # (experts, in, out)
                getattr(layer.mlp.experts, name).copy_(weight)
                stored = gguf.quants.dequantize(ggml_mxfp4(blocks, scales), gguf.GGMLQuantizationType.MXFP4)
                assert np.array_equal(stored, weight.transpose(1, 2).numpy())
    x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # the clamp acts: without it the logits differ
        clamped = theirs(x).logits
        for layer in theirs.model.layers:
            layer.mlp.experts.limit = float("inf")
        assert (theirs(x).logits - clamped).abs().max() > 1e-2
        for layer in theirs.model.layers:
            layer.mlp.experts.limit = 7.0
    path = write_gguf(tmp_path / "gpt-oss.gguf", theirs, quantisation, arch="gpt-oss",
                      mxfp4=released if experts == "MXFP4" else None)
    stored = formats.read_gguf_info(path).tensors
    assert stored["blk.0.ffn_up_exps.weight"].type == (experts if experts == "MXFP4" else quantisation)
    assert stored["blk.0.attn_q.weight"].type == stored["token_embd.weight"].type == quantisation
    ours = models.from_pretrained(path)
    config = ours.config
    assert config.family == "gpt_oss" and (config.experts, config.experts_used, config.d_expert) == (4, 2, 96)
    assert config.attn_window == [5, 0] and config.attn_sinks and config.swiglu_limit == 7.0 and not config.tied_head
    assert config.rotary_scaling["truncate"] is False
    assert_reads_as(ours, theirs, quantisation, exact=released if experts == "MXFP4" else ())


def test_gpt_oss_metadata_as_llama_cpp_reads_it(tmp_path):
    """attention.sliding_window_pattern, which llama.cpp reads where present (absent: 2), windows every layer but the last
    of each period (0: every layer, as llama.cpp's set_swa_pattern; 1: none); what llama.cpp requires of a gpt-oss file,
    or reads and this module does not implement, is one line."""
    theirs = tiny_hf("gpt_oss", swiglu_limit=7.0)
    info = formats.read_gguf_info(write_gguf(tmp_path / "gpt-oss.gguf", theirs, arch="gpt-oss"))
    shapes = {name: t.shape for name, t in info.tensors.items()}
    sliding, full = "sliding_attention", "full_attention"
    for period, layers in [(3, [sliding, sliding, full] * 2), (0, [sliding] * 6), (1, [full] * 6)]:
        config = models.gguf_config(info.metadata | {"gpt-oss.block_count": 6,
                                                     "gpt-oss.attention.sliding_window_pattern": period}, shapes, "six.gguf")
        assert config["layer_types"] == layers, period
    every = tiny_hf("gpt_oss", swiglu_limit=7.0, layer_types=[sliding] * 2)  # 0 read as transformers computes it
    assert_reads_as(models.from_pretrained(write_gguf(tmp_path / "every.gguf", every, arch="gpt-oss",
                                                      **{"attention.sliding_window_pattern": 0})), every)
    cases = [(dict(drop=["attention.sliding_window"]), "metadata gpt-oss.attention.sliding_window is missing"),
             (dict(drop=["expert_feed_forward_length"]), "metadata gpt-oss.expert_feed_forward_length is missing"),
             (dict(drop=["expert_count"]), "metadata gpt-oss.expert_count is missing or 0"),
             ({"expert_used_count": 5}, "gpt-oss.expert_used_count = 5 exceeds its expert_count = 4"),
             ({"attention.sliding_window_pattern": 1.5}, "sliding_window_pattern = 1.5 must be a non-negative integer"),
             ({"attention.sliding_window": 2.5}, "gpt-oss.attention.sliding_window = 2.5 must be a positive integer"),
             ({"rope.freq_base_swa": 100.0}, "gpt-oss.rope.freq_base_swa = 100.0 differs from rope.freq_base")]
    assert_each_refused(theirs, "gpt-oss", cases, tmp_path)


@pytest.mark.parametrize("arch,quantisation", [("gpt2", "F32"), ("gpt2", "Q8_0"), ("gptneox", "Q8_0"),
                                               ("gptneox-sequential", "F32")])
def test_a_gpt2_or_gptneox_gguf_file_gives_its_original_logits(arch, quantisation, tmp_path):
    """llama.cpp's GPT-2 and GPT-NeoX (Pythia) layout: q, k and v in one tensor, all q rows, then all k, then all v
    (GPT-NeoX's stored head by head, reordered by the converter), matrices as (out, in) (GPT-2's Conv1D ones
    transposed by the converter), LayerNorms with biases. GPT-2: learned positions, no output tensor (tied);
    GPT-NeoX: the rotary embedding on half of each head (rope.dimension_count), its own output layer, a
    parallel residual or (use_parallel_residual false) not."""
    family = "gpt2" if arch == "gpt2" else "gpt_neox"
    theirs = tiny_hf(family, **({} if arch == "gpt2" else dict(use_parallel_residual=arch == "gptneox")))
    ours = models.from_pretrained(write_gguf(tmp_path / f"{arch}.gguf", theirs, quantisation, arch.removesuffix("-sequential")))
    assert ours.config.family == family and ours.config.tied_head == (arch == "gpt2")
    assert ours.config.rotary_dims == (0 if arch == "gpt2" else 8) and ours.config.parallel_residual == (arch == "gptneox")
    assert_reads_as(ours, theirs, quantisation)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_a_gemma_gguf_file_gives_its_original_logits(family, tmp_path):
    """llama.cpp's Gemma layout: norm weights stored as 1 + weight, q / k rows as they are, the window
    and Gemma-2's soft-caps in the metadata; the layer pattern (Gemma-3: five sliding layers, then a
    global one), the local rotary base and the score scale (1 / sqrt(head_dim)) implied. head_dim 24, not d_model / n_head
    (16), which llama.cpp takes for the 27B models only. Gemma (1): no window, soft-caps or rotary base in the
    metadata (10,000 implied), every layer global."""
    options = {"gemma": dict(head_dim=24, sliding_window=None),  # (transformers' cache would take conftest's window)
               "gemma2": dict(head_dim=24, query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=8.0),
               "gemma3": dict(head_dim=24, query_pre_attn_scalar=24, num_hidden_layers=6)}[family]
    theirs = tiny_hf(family, **options)
    ours = models.from_pretrained(write_gguf(tmp_path / f"{family}.gguf", theirs, arch=family))
    windows = {"gemma": [0, 0], "gemma2": [5, 0], "gemma3": [5] * 5 + [0]}[family]
    assert ours.config.family == family.replace("gemma3", "gemma3_text") and ours.config.attn_window == windows
    assert ours.config.tied_head
    assert_reads_as(ours, theirs)
    if family == "gemma2":  # an early converter's file, without the soft-caps: Gemma-2's own
        info = formats.read_gguf_info(tmp_path / f"{family}.gguf")
        metadata = {k: v for k, v in info.metadata.items() if "softcapping" not in k}
        config = models.gguf_config(metadata, {name: t.shape for name, t in info.tensors.items()}, "early.gguf")
        assert (config["attn_logit_softcapping"], config["final_logit_softcapping"]) == (50.0, 30.0)


# transformers' options of each: every Granite multiplier other than 1; Command-R's per-head q / k norms and a logit scale
# other than its default; Command-R7B's window of 5 on layers 0-2 (layer 3 global, without the rotary embedding);
# StableLM-2's q / k / v biases; StableLM-2-12B's parallel residual and per-head q / k norms
DENSE_GGUF = {"granite": ("granite", "granite", dict(embedding_multiplier=3.0, attention_multiplier=0.3,
                                                     residual_multiplier=0.5, logits_scaling=2.0, rope_theta=500.0)),
              "command-r": ("cohere", "command-r", dict(logit_scale=0.5, use_qk_norm=True, rope_theta=1000.0)),
              "cohere2": ("cohere2", "cohere2", dict(num_hidden_layers=4, sliding_window=5, logit_scale=0.5)),
              "stablelm": ("stablelm", "stablelm", dict(partial_rotary_factor=0.5, use_qkv_bias=True)),
              "stablelm-12b": ("stablelm", "stablelm", dict(partial_rotary_factor=0.5, use_parallel_residual=True,
                                                            qk_layernorm=True))}


@pytest.mark.parametrize("case,quantisation", [("granite", "Q8_0"), ("command-r", "F32"), ("command-r", "Q8_0"),
                                               ("cohere2", "F32"), ("stablelm", "Q8_0"), ("stablelm-12b", "F32")])
def test_a_granite_command_r_or_stablelm_gguf_file_gives_its_original_logits(case, quantisation, tmp_path):
    """llama.cpp's Granite (Llama's layout, q / k rows permuted, the multipliers as attention.scale,
    embedding_scale, residual_scale and logit_scale, the last dividing the logits), Command-R and
    Command-R7B (q / k rows as transformers has them: llama.cpp rotates interleaved pairs too; LayerNorms
    without bias, attn_norm read by attention and MLP, logit_scale, no output tensor; Command-R7B's
    window in the metadata, three layers in four windowed, implied) and StableLM (LayerNorms with bias,
    the rotary embedding on rope.dimension_count dims, use_parallel_residual, the per-head q / k norms
    stacked, no rotary base: 10,000 implied)."""
    family, arch, options = DENSE_GGUF[case]
    theirs = tiny_hf(family, **options)
    ours = models.from_pretrained(write_gguf(tmp_path / f"{case}.gguf", theirs, quantisation, arch))
    assert ours.config.family == family and ours.config.tied_head == (family in ("cohere", "cohere2"))
    assert_reads_as(ours, theirs, quantisation)


# (family, GGUF architecture, tiny_hf options, write_gguf options): Phi-2 with as many key / value heads as heads and an
# MLP of 4 d_model (what its converter writes whatever config.json says, as the released models have), the rotary
# embedding on 12 of 16 dims; its q, k and v apart (as converted from transformers' folder) or fused (older files)
GGUF_FAMILIES = {"phi2": ("phi", "phi2", dict(num_key_value_heads=4, intermediate_size=256, partial_rotary_factor=0.75), {}),
                 "phi2-fused": ("phi", "phi2", dict(num_key_value_heads=4, intermediate_size=256, partial_rotary_factor=0.75),
                                dict(qkv_fused=True)),
                 "starcoder2": ("starcoder2", "starcoder2", dict(rope_theta=500.0), {"attention.sliding_window": 5}),
                 "starcoder2-no-biases": ("starcoder2", "starcoder2", dict(use_bias=False, tie_word_embeddings=False), {}),
                 "olmo": ("olmo", "olmo", dict(clip_qkv=2.0, rope_theta=500.0), {}),
                 "olmo-tied": ("olmo", "olmo", dict(tie_word_embeddings=True), {}),
                 # ERNIE 4.5: q / k rows as they are (interleaved pairs), tied; with biases on every projection, untied
                 "ernie4_5": ("ernie4_5", "ernie4_5", dict(head_dim=16, rope_theta=500.0), {}),
                 "ernie4_5-biases": ("ernie4_5", "ernie4_5", dict(head_dim=24, use_bias=True, tie_word_embeddings=False), {}),
                 # Arcee: q / k rows permuted, as for llama; YaRN as its type, factor and original context
                 "arcee": ("arcee", "arcee", {}, {}),
                 "arcee-yarn": ("arcee", "arcee", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1000.0, factor=2.0,
                                                                           original_max_position_embeddings=32)),
                                {"rope.scaling.type": "yarn", "rope.scaling.factor": 2.0,
                                 "rope.scaling.original_context_length": 32})}


@pytest.mark.parametrize("case,quantisation", [("phi2", "Q8_0"), ("phi2-fused", "F32"), ("starcoder2", "Q8_0"),
                                               ("starcoder2-no-biases", "F32"), ("olmo", "Q8_0"), ("olmo-tied", "F32"),
                                               ("ernie4_5", "F32"), ("ernie4_5", "Q8_0"), ("ernie4_5-biases", "Q8_0"),
                                               ("arcee", "F32"), ("arcee", "Q8_0"), ("arcee-yarn", "F32")])
def test_a_phi_starcoder2_olmo_ernie_or_arcee_gguf_file_gives_its_original_logits(case, quantisation, tmp_path):
    """llama.cpp's Phi-2 (phi2): LayerNorms with bias, attn_norm read by attention and the MLP, biases on q, k, v
    (or the fused attn_qkv), attn_output, ffn_up, ffn_down and output; rope.dimension_count; no rotary base
    (10,000 implied). StarCoder2: LayerNorms with bias, biases where the file has them, no output tensor where tied;
    a window of 5 in the metadata, which llama.cpp leaves out (full attention). OLMo: no norm tensors (LayerNorms
    without parameters, eps 1e-5), q / k rows permuted, attention.clamp_kqv, no output tensor where tied. ERNIE 4.5: q / k
    rows as stored (its rotary on interleaved pairs, as llama.cpp's), biases where the file has them. Arcee: ffn_up and
    ffn_down (ReLU², no gate), q / k rows permuted, YaRN."""
    family, arch, options, writing = GGUF_FAMILIES[case]
    theirs = tiny_hf(family, **options)
    ours = models.from_pretrained(write_gguf(tmp_path / f"{case}.gguf", theirs, quantisation, arch, **writing))
    assert ours.config.family == family and ours.config.tied_head == (case in ("starcoder2", "olmo-tied", "ernie4_5"))
    assert ours.config.rotary_dims == {"phi": 12, "ernie4_5": options.get("head_dim")}.get(family, 16)
    assert ours.config.attn_window == 0 and ours.config.qkv_bias == (case in ("phi2", "phi2-fused", "starcoder2", "ernie4_5-biases"))
    assert ours.config.qkv_clip == (2.0 if case == "olmo" else 0.0)
    assert_reads_as(ours, theirs, quantisation)


# (family, GGUF architecture, tiny_hf options, write_gguf options): GLM-4 with biases on q, k, v, untied, its rotary
# embedding on half of each head; without biases, tied, on 18 of 24 dims; GLM as llama.cpp's chatglm (eps 1e-5 and base
# 10,000, which its converter writes whatever config.json says), q, k, v apart (glm-4-9b-hf) or fused (ChatGLM's own)
GLM_GGUF = {"glm4": ("glm4", "glm4", dict(head_dim=16), {}),
            "glm4-no-biases-tied": ("glm4", "glm4", dict(head_dim=24, attention_bias=False, tie_word_embeddings=True,
                                                         partial_rotary_factor=0.75), {}),
            "chatglm": ("glm", "chatglm", dict(head_dim=16, rms_norm_eps=1e-5), {}),
            "chatglm-fused": ("glm", "chatglm", dict(head_dim=16, rms_norm_eps=1e-5), dict(qkv_fused=True))}


@pytest.mark.parametrize("case,quantisation", [("glm4", "F32"), ("glm4", "Q8_0"), ("glm4-no-biases-tied", "F32"),
                                               ("chatglm", "Q8_0"), ("chatglm-fused", "F32")])
def test_a_glm4_or_chatglm_gguf_file_gives_its_original_logits(case, quantisation, tmp_path):
    """llama.cpp's GLM-4 (glm4) and GLM (chatglm): q / k rows as transformers has them (llama.cpp rotates interleaved
    pairs too, on rope.dimension_count dims), the MLP's gate and up as one tensor (ffn_up, gate first), biases on q, k, v
    where the file has them (attn_q, attn_k, attn_v, or the fused attn_qkv), none on attn_output; GLM-4's norms after
    attention and the MLP (post_attention_norm, post_ffw_norm); no output tensor where tied."""
    family, arch, options, writing = GLM_GGUF[case]
    theirs = tiny_hf(family, **options)
    ours = models.from_pretrained(write_gguf(tmp_path / f"{case}.gguf", theirs, quantisation, arch, **writing))
    config = ours.config
    assert config.family == family and config.rotary_interleaved and config.sandwich_norms == (family == "glm4")
    assert config.rotary_dims == (18 if case == "glm4-no-biases-tied" else 8) and config.tied_head == (case == "glm4-no-biases-tied")
    assert config.qkv_bias == (case != "glm4-no-biases-tied") and not config.out_bias
    assert_reads_as(ours, theirs, quantisation)
    if case == "glm4" and quantisation == "F32":  # what transformers' GLM-4 does not compute, or the file lacks, is one line
        assert_each_refused(theirs, "glm4", [
            ({"rope.dimension_sections": [4, 2, 2, 0]}, "glm4.rope.dimension_sections = [4, 2, 2, 0]: M-RoPE"),
            ({"nextn_predict_layers": 1}, "glm4.nextn_predict_layers = 1: next-token prediction layers"),
            (dict(drop=["attention.layer_norm_rms_epsilon"]), "metadata glm4.attention.layer_norm_rms_epsilon is missing"),
            ({"rope.dimension_count": 20}, "glm4.rope.dimension_count = 20 exceeds the 16 dims of a head")], tmp_path)


@pytest.mark.parametrize("case,quantisation", [("nemotron", "F32"), ("nemotron", "Q8_0"), ("nemotron-biases-linear", "Q8_0")])
def test_a_nemotron_gguf_file_gives_its_original_logits(case, quantisation, tmp_path):
    """llama.cpp's Nemotron (nemotron): LayerNorm1P's weights stored as 1 + weight, its biases as they are; q / k rows as
    stored (llama.cpp rotates their halves, as transformers); ffn_up and ffn_down (ReLU², no gate); the rotary embedding on
    rope.dimension_count dims (8 of 16; 12 with a factor of 0.75); biases on attn_q, attn_k, attn_v, attn_output, ffn_up
    and ffn_down where the file has them; linear scaling as its type and factor. A rotary dims count no model has is one
    line."""
    options = dict(attention_bias=True, mlp_bias=True, rope_parameters=dict(
        rope_type="linear", factor=2.0, partial_rotary_factor=0.75, rope_theta=500.0)) if case == "nemotron-biases-linear" else {}
    theirs = tiny_hf("nemotron", norm_eps=1e-3, **options)
    ours = models.from_pretrained(write_gguf(tmp_path / f"{case}.gguf", theirs, quantisation, "nemotron"))
    config = ours.config
    assert config.family == "nemotron" and config.norm_plus_one and config.norm == "layernorm" and not config.tied_head
    assert config.rotary_dims == (12 if options else 8) and config.qkv_bias == config.mlp_bias == bool(options)
    assert_reads_as(ours, theirs, quantisation)
    if case == "nemotron" and quantisation == "F32":
        assert_each_refused(theirs, "nemotron", [({"rope.dimension_count": 7}, "rotary_dims=7 must be even")], tmp_path)


# Apertus: Llama-3's scaling (as rope_freqs); with biases on q, k, v and W_O, YaRN and a head_dim of 24
APERTUS_GGUF = {"apertus": dict(rope_parameters=dict(LLAMA3, rope_theta=10000.0)),
                "apertus-biases-yarn": dict(attention_bias=True, head_dim=24, rope_parameters=dict(
                    rope_type="yarn", rope_theta=1000.0, factor=2.0, original_max_position_embeddings=32))}


@pytest.mark.parametrize("case,quantisation", [("apertus", "F32"), ("apertus", "Q8_0"), ("apertus-biases-yarn", "F32")])
def test_an_apertus_gguf_file_gives_its_original_logits(case, quantisation, tmp_path):
    """llama.cpp's Apertus (apertus): q / k rows as stored (llama.cpp rotates their halves, as transformers), attn_q_norm
    and attn_k_norm, ffn_up and ffn_down (no gate), the xIELU parameters of each layer from the metadata (xielu.alpha_p,
    alpha_n, beta, eps, before softplus as transformers stores them), Llama-3's scaling as rope_freqs or YaRN as its type,
    factor and original context, biases on attn_q, attn_k, attn_v and attn_output where the file has them. Metadata that
    gives no xIELU parameter for a layer is one line, and so is a tied model's file (no output tensor, which llama.cpp's
    apertus requires); one number for all layers is read as llama.cpp reads it."""
    theirs = tiny_hf("apertus", **APERTUS_GGUF[case])
    divisors, writing = None, {}
    if case == "apertus":
        divisors = models.rotary_frequencies(16, 10000.0, {}) / theirs.model.rotary_emb.inv_freq
        assert divisors.min() == 1 and divisors.max() == 8 and ((divisors > 1) & (divisors < 8)).any()  # all 3 bands
    else:
        writing = {"rope.scaling.type": "yarn", "rope.scaling.factor": 2.0, "rope.scaling.original_context_length": 32}
    ours = models.from_pretrained(write_gguf(tmp_path / f"{case}.gguf", theirs, quantisation, "apertus", divisors, **writing))
    config = ours.config
    assert config.family == "apertus" and config.activation == "xielu" and config.qk_norm and config.mlp == "gelu"
    assert config.qkv_bias == config.out_bias == (case != "apertus") and not config.tied_head
    assert [block.mlp.act.eps.item() for block in ours.blocks] == pytest.approx([-0.2, -0.4])
    assert_reads_as(ours, theirs, quantisation)
    if case == "apertus" and quantisation == "F32":
        one = models.from_pretrained(write_gguf(tmp_path / "one.gguf", theirs, "F32", "apertus", divisors, xielu={"eps": -0.1}))
        assert [block.mlp.act.eps.item() for block in one.blocks] == pytest.approx([-0.1, -0.1])
        assert_each_refused(theirs, "apertus", [
            (dict(xielu={"beta": None}), "metadata xielu.beta must give a number for each of the 2 layers (the xIELU "
                                         "activation's parameters); it is missing"),
            (dict(xielu={"alpha_p": [0.1, 0.2, 0.3]}), "metadata xielu.alpha_p must give a number for each of the 2 layers "
                                                       "(the xIELU activation's parameters); it is 3 values")], tmp_path)
        with pytest.raises(ValueError, match=re.escape("an apertus file without output.weight (tied) is not one llama.cpp reads")):
            models.from_pretrained(write_gguf(tmp_path / "tied.gguf", tiny_hf("apertus", tie_word_embeddings=True), arch="apertus"))


# Seed-OSS: biases on q, k, v; on W_O instead, tied, YaRN and a head_dim of 24
SEED_OSS_GGUF = {"seed_oss": dict(head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=500.0)),
                 "seed_oss-out-bias-tied-yarn": dict(head_dim=24, attention_bias=False, attention_out_bias=True,
                                                     tie_word_embeddings=True, rope_parameters=dict(
                     rope_type="yarn", rope_theta=1000.0, factor=2.0, original_max_position_embeddings=32))}


@pytest.mark.parametrize("case,quantisation", [("seed_oss", "F32"), ("seed_oss", "Q8_0"), ("seed_oss-out-bias-tied-yarn", "F32")])
def test_a_seed_oss_gguf_file_gives_its_original_logits(case, quantisation, tmp_path):
    """llama.cpp's Seed-OSS (seed_oss): q / k rows as stored (llama.cpp rotates their halves, as transformers), the MLP's
    norm post_attention_norm, biases on attn_q, attn_k, attn_v and, apart, on attn_output where the file has them, YaRN as
    its type, factor and original context, no output tensor where tied. A file with biases on the MLP, which llama.cpp's
    seed_oss does not read, is one line."""
    theirs = tiny_hf("seed_oss", **SEED_OSS_GGUF[case])
    writing = {} if case == "seed_oss" else {"rope.scaling.type": "yarn", "rope.scaling.factor": 2.0,
                                             "rope.scaling.original_context_length": 32}
    ours = models.from_pretrained(write_gguf(tmp_path / f"{case}.gguf", theirs, quantisation, "seed_oss", **writing))
    config = ours.config
    assert config.family == "seed_oss" and config.mlp == "gated" and not config.rotary_interleaved
    assert config.qkv_bias == (case == "seed_oss") and config.out_bias == config.tied_head == (case != "seed_oss")
    assert_reads_as(ours, theirs, quantisation)
    if case == "seed_oss" and quantisation == "F32":
        assert_each_refused(theirs, "seed_oss", [(dict(drop=["attention.layer_norm_rms_epsilon"]),
                                                 "metadata seed_oss.attention.layer_norm_rms_epsilon is missing")], tmp_path)
        biased = tiny_hf("seed_oss", head_dim=16, mlp_bias=True)
        with pytest.raises(ValueError, match=re.escape("a seed_oss file with biases on the MLP (blk.0.ffn_up.bias) is not one")):
            models.from_pretrained(write_gguf(tmp_path / "biased.gguf", biased, arch="seed_oss"))


@pytest.mark.parametrize("case,quantisation", [("exaone", "F32"), ("exaone", "Q8_0"), ("exaone-llama3-biases-tied", "Q8_0")])
def test_an_exaone_gguf_file_gives_its_original_logits(case, quantisation, tmp_path):
    """llama.cpp's EXAONE 3 (exaone): Llama's tensor names (the converter maps EXAONE's to them), q / k rows as stored
    (llama.cpp rotates their halves, as transformers: the converter does not permute them), biases on attn_q, attn_k,
    attn_v and attn_output where the file has them, Llama-3's scaling as rope_freqs, no output tensor where tied. A
    rotary dims count other than the head's, which llama.cpp's exaone refuses, is one line."""
    scaled = case != "exaone"
    theirs = tiny_hf("exaone", **dict(attention_bias=True, tie_word_embeddings=True, rope_scaling=LLAMA3, rope_theta=10000.0)
                     if scaled else dict(rms_norm_eps=1e-3))
    divisors = models.rotary_frequencies(16, 10000.0, {}) / theirs.model.rotary_emb.inv_freq if scaled else None
    ours = models.from_pretrained(write_gguf(tmp_path / f"{case}.gguf", theirs, quantisation, "exaone", divisors))
    config = ours.config
    assert config.family == "exaone" and config.n_kv_head == 2
    assert config.tied_head == config.qkv_bias == config.out_bias == scaled
    assert config.rotary_scaling.get("rope_type") == ("divisors" if scaled else None)
    assert config.norm_eps == pytest.approx(1e-5 if scaled else 1e-3)  # (float32 in the file)
    assert_reads_as(ours, theirs, quantisation)
    if not scaled and quantisation == "F32":
        assert_each_refused(theirs, "exaone", [({"rope.dimension_count": 8},
                                                "exaone.rope.dimension_count = 8 is not the head's 16 dims")], tmp_path)


# a 64-layer EXAONE 4 (the 32B's layer count, on which llama.cpp keys its windows), narrow so that it stays small
EXAONE4_64 = dict(num_hidden_layers=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=48,
                  sliding_window=5)


@pytest.mark.parametrize("case,quantisation", [("exaone4", "F32"), ("exaone4", "Q8_0"), ("exaone4-64-layers", "F32")])
def test_an_exaone4_gguf_file_gives_its_original_logits(case, quantisation, tmp_path):
    """llama.cpp's EXAONE 4 (exaone4): q / k rows as stored (llama.cpp rotates their halves), attn_q_norm and
    attn_k_norm, the norms after attention and the MLP (post_attention_norm, post_ffw_norm; no attn_norm or ffn_norm), no
    output tensor where tied. Without a window (EXAONE-4.0-1.2B's; tied, Llama-3's scaling as rope_freqs) the rotary
    embedding on every layer; with 64 layers, attention.sliding_window and the converter's list of the sliding layers
    (or the pattern as a number): the window on three layers in four, the fourth global without the rotary embedding.
    What is not read is one line: a rotary dims count other than the head's, a list of sliding layers not one boolean
    per layer, a base of the windowed layers' own."""
    windowed = case == "exaone4-64-layers"
    theirs = tiny_hf("exaone4", **EXAONE4_64 if windowed else dict(
        sliding_window=None, layer_types=["full_attention"] * 2, tie_word_embeddings=True, rope_scaling=LLAMA3))
    divisors = None if windowed else models.rotary_frequencies(16, 10000.0, {}) / theirs.model.rotary_emb.inv_freq
    path = write_gguf(tmp_path / f"{case}.gguf", theirs, quantisation, "exaone4", divisors)
    ours = models.from_pretrained(path)
    config = ours.config
    assert config.family == "exaone4" and config.qk_norm and not config.pre_norms and config.sandwich_norms
    assert config.tied_head == (not windowed) and config.rotary_scaling.get("rope_type") == (None if windowed else "divisors")
    assert config.attn_window == ([5, 5, 5, 0] * 16 if windowed else [0, 0])
    assert config.no_rotary_layers == (list(range(3, 64, 4)) if windowed else [])
    assert_reads_as(ours, theirs, quantisation)
    if windowed:  # the pattern as a number, as llama.cpp reads it: the same model
        numbered = models.from_pretrained(write_gguf(tmp_path / "numbered.gguf", theirs, arch="exaone4",
                                                     **{"attention.sliding_window_pattern": 4}))
        assert numbered.config == config
        assert_each_refused(theirs, "exaone4", [
            ({"rope.dimension_count": 8}, "exaone4.rope.dimension_count = 8 is not the head's 16 dims"),
            ({"attention.sliding_window_pattern": [True, False] * 31},
             "exaone4.attention.sliding_window_pattern must give true or false for each of the 64 layers"),
            ({"rope.freq_base_swa": 500.0}, "exaone4.rope.freq_base_swa = 500.0 differs from rope.freq_base")], tmp_path)


@pytest.mark.parametrize("kinds", [None, ["sliding_attention", "full_attention"] * 2, ["full_attention"] * 4])
def test_an_exaone4_gguf_file_of_any_layer_count_gives_its_original_windows(kinds, tmp_path):
    """An exaone4 file of 4 layers (not the 64 on which llama.cpp keys its windows) with the window its converter
    records (here 5) and the sliding layers it lists (by default layers 0-2; or every other; or none, the window set:
    no rotary embedding anywhere) gives transformers' windowed logits, which differ from the same weights' without
    windows; a file of 64 layers without the window (a null sliding_window, EXAONE-4.0-1.2B's) gives full attention and
    the rotary embedding on every layer, where llama.cpp windows three layers in four by 4,096."""
    windowed = tiny_hf("exaone4", num_hidden_layers=4, sliding_window=5, layer_types=kinds)
    full = tiny_hf("exaone4", num_hidden_layers=4, sliding_window=None, layer_types=["full_attention"] * 4)
    assert all(torch.equal(a, b) for a, b in zip(windowed.state_dict().values(), full.state_dict().values()))
    x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (windowed(x).logits - full(x).logits).abs().max() > 1e-2  # (the windows change the model)
    ours = models.from_pretrained(write_gguf(tmp_path / "exaone4.gguf", windowed, arch="exaone4"))
    sliding = [kind == "sliding_attention" for kind in windowed.config.layer_types]
    assert ours.config.attn_window == [5 if s else 0 for s in sliding]
    assert ours.config.no_rotary_layers == [i for i, s in enumerate(sliding) if not s]
    assert_reads_as(ours, windowed)
    if kinds is None:
        null = tiny_hf("exaone4", **EXAONE4_64 | dict(sliding_window=None, layer_types=["full_attention"] * 64))
        ours = models.from_pretrained(write_gguf(tmp_path / "null.gguf", null, arch="exaone4"))
        assert ours.config.attn_window == [0] * 64 and ours.config.no_rotary_layers == []
        assert_reads_as(ours, null)


@pytest.mark.parametrize("quantisation", ["F32", "Q8_0"])
def test_a_ministral_gguf_file_is_llama_without_its_window(quantisation, tmp_path):
    """Ministral as llama.cpp's converter writes it: the llama architecture, q / k rows permuted, no window recorded (nor
    read by llama.cpp for llama): full attention on every layer, the logits of transformers' Ministral of the same
    weights without its window (here a window of 5 on layer 0)."""
    windowed = tiny_hf("ministral", head_dim=16, sliding_window=5, layer_types=["sliding_attention", "full_attention"])
    full = tiny_hf("ministral", head_dim=16, sliding_window=5, layer_types=["full_attention"] * 2)
    assert all(torch.equal(a, b) for a, b in zip(windowed.state_dict().values(), full.state_dict().values()))
    x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (windowed(x).logits - full(x).logits).abs().max() > 1e-2  # (the window changes the model)
    ours = models.from_pretrained(write_gguf(tmp_path / "ministral.gguf", windowed, quantisation, "llama"))
    assert ours.config.family == "llama" and ours.config.attn_window == 0 and ours.config.n_kv_head == 2
    assert_reads_as(ours, full, quantisation)


@pytest.mark.parametrize("quantisation", ["F32", "Q8_0"])
def test_a_starcoder_gguf_file_gives_its_original_logits(quantisation, tmp_path):
    """GPT-BigCode (starcoder), as llama.cpp's converter writes it: c_attn as one tensor (attn_qkv: all q rows, then
    the key head's, then the value head's, as in the folder), head_count_kv 1, position_embd, LayerNorms and biases,
    no output tensor (tied); a file with another head_count_kv (which llama.cpp would split as q, k, v blocks, and
    transformers' multi_query false lays out head by head) is one line."""
    theirs = tiny_hf("gpt_bigcode")
    ours = models.from_pretrained(write_gguf(tmp_path / "starcoder.gguf", theirs, quantisation, "starcoder"))
    assert ours.config.family == "gpt_bigcode" and ours.config.n_kv_head == 1 and ours.config.tied_head
    assert ours.config.learned_positions and ours.config.qkv_bias
    assert_reads_as(ours, theirs, quantisation)
    with pytest.raises(ValueError, match=re.escape("starcoder.attention.head_count_kv = 4: only multi-query attention (1)")):
        models.from_pretrained(write_gguf(tmp_path / "bad.gguf", theirs, arch="starcoder", **{"attention.head_count_kv": 4}))


@pytest.mark.parametrize("case,quantisation", [("gptj", "F32"), ("gptj", "Q8_0"), ("gptj-whole-head", "F32")])
def test_a_gptj_gguf_file_gives_its_original_logits(case, quantisation, tmp_path):
    """GPT-J (gptj) as gguf-py's tensor map names it (llama.cpp declares the architecture but builds no graph for it:
    such files come from other converters): attn_norm read by attention and the MLP, attn_q, attn_k, attn_v and
    attn_output without biases, q / k rows as transformers has them (interleaved pairs, not permuted), ffn_up and
    ffn_down with biases, the output layer's bias; the rotary embedding on rope.dimension_count dims (12 of 16; absent,
    as the newer converters leave it where it is the whole head: all 16), no rotary base (10,000 implied)."""
    whole = case == "gptj-whole-head"
    theirs = tiny_hf("gptj", **(dict(rotary_dim=16) if whole else {}))
    path = write_gguf(tmp_path / f"{case}.gguf", theirs, quantisation, "gptj", drop=["rope.dimension_count"] if whole else ())
    ours = models.from_pretrained(path)
    assert ours.config.family == "gptj" and ours.config.rotary_dims == (16 if whole else 12)
    assert ours.config.head_bias and ours.config.shared_norm and not ours.config.tied_head
    assert_reads_as(ours, theirs, quantisation)
    if case == "gptj" and quantisation == "F32":  # what GPT-J does not have is one line
        assert_each_refused(theirs, "gptj", [({"rope.freq_base": 500.0}, "a gptj file with a rotary base other than 10000 or a rope"),
                                             ({"rope.scaling.type": "linear", "rope.scaling.factor": 2.0}, "or a rope scaling is not"),
                                             ({"rope.dimension_count": 20}, "rotary_dims=20 must be even and at most d_head=16")],
                            tmp_path)


@pytest.mark.parametrize("arch,quantisation", [("bloom", "F32"), ("bloom", "Q8_0"), ("mpt", "F32"), ("mpt", "Q8_0")])
def test_a_bloom_or_mpt_gguf_file_gives_its_original_logits(arch, quantisation, tmp_path):
    """llama.cpp's BLOOM and MPT (ALiBi, no positions): q, k and v in one tensor, all q rows, then all k, then all v
    (BLOOM's head-by-head rows reordered by the converter). BLOOM: the embedding's norm token_embd_norm, LayerNorms
    and biases, the embedding written again as output; its context the converter's (its n_embed, 64, where config.json
    has no seq_length). MPT: LayerNorms without bias, no biases, attention.max_alibi_bias, clip_qkv (2, within the
    spread of q, k and v) as attention.clamp_kqv, no output tensor (tied)."""
    theirs = tiny_hf(arch, **(dict(attn_config=dict(clip_qkv=2.0)) if arch == "mpt" else {}))
    ours = models.from_pretrained(write_gguf(tmp_path / f"{arch}.gguf", theirs, quantisation, arch))
    config = ours.config
    assert config.family == arch and config.alibi == 8.0 and config.tied_head == (arch == "mpt") and config.block_size == 64
    assert config.qkv_clip == (2.0 if arch == "mpt" else 0.0) and config.embed_norm == (arch == "bloom")
    assert_reads_as(ours, theirs, quantisation)


def test_mpt_metadata_as_llama_cpp_reads_it(tmp_path):
    """attention.max_alibi_bias absent (older llama.cpp requires it, today's reads none as 0) or other than
    transformers' 8 (0: no ALiBi), and fewer key / value heads than heads, which llama.cpp reads and transformers' MPT
    does not compute, are one line."""
    theirs = tiny_hf("mpt")
    cases = [(dict(drop=["attention.max_alibi_bias"]), "metadata mpt.attention.max_alibi_bias is missing"),
             ({"attention.max_alibi_bias": 16.0}, "mpt.attention.max_alibi_bias = 16.0: only ALiBi of maximum bias 8"),
             ({"attention.max_alibi_bias": 0.0}, "mpt.attention.max_alibi_bias = 0.0: only ALiBi of maximum bias 8"),
             ({"attention.head_count_kv": 2}, "mpt.attention.head_count_kv = 2 is not its head_count: grouped-query")]
    assert_each_refused(theirs, "mpt", cases, tmp_path)


# (tiny_hf options, metadata changes): Falcon-7B's layout (one key / value head, attn_norm alone); 40B's and 180B's (key /
# value groups, ln_attn as attn_norm_2, ln_mlp as attn_norm); Falcon-11B's (groups, one norm, untied, its rotary base, which
# the converter leaves out, written)
FALCON_GGUF = {"falcon-7b": ({}, {}), "falcon-40b": (dict(new_decoder_architecture=True, num_kv_heads=2), {}),
               "falcon-11b": (dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1,
                                   tie_word_embeddings=False, rope_theta=500.0), {"rope.freq_base": 500.0})}


@pytest.mark.parametrize("case,quantisation", [("falcon-7b", "F32"), ("falcon-7b", "Q8_0"), ("falcon-40b", "F32"),
                                               ("falcon-40b", "Q8_0"), ("falcon-11b", "F32")])
def test_a_falcon_gguf_file_gives_its_original_logits(case, quantisation, tmp_path):
    """llama.cpp's Falcon (falcon), as its converter writes it: attn_qkv all q rows, then all k, then all v (40B's key /
    value groups regrouped so), head_count_kv 1 for 7B; attention reads attn_norm_2 where the file has it, the MLP
    attn_norm; attention and the MLP in parallel, LayerNorms with bias, no other biases, the context 2,048 whatever the
    model's, an MLP of 4 d_model, no rotary base (10,000 implied), no output tensor where tied."""
    options, changes = FALCON_GGUF[case]
    theirs = tiny_hf("falcon", **options)
    ours = models.from_pretrained(write_gguf(tmp_path / f"{case}.gguf", theirs, quantisation, "falcon", **changes))
    config = ours.config
    assert config.family == "falcon" and config.n_kv_head == (1 if case == "falcon-7b" else 2) and config.block_size == 2048
    assert config.shared_norm == (case != "falcon-40b") and config.tied_head == (case != "falcon-11b")
    assert config.rotary_base == (500.0 if case == "falcon-11b" else 10000.0) and config.parallel_residual
    assert_reads_as(ours, theirs, quantisation)


def test_falcon_metadata_as_llama_cpp_reads_it(tmp_path):
    """What llama.cpp's Falcon cannot be is one line: biases (its converter writes none: Falcon-7B and -40B have none, and
    RW's ALiBi models, which have them, do not convert), a rotary embedding on part of each head."""
    assert_each_refused(tiny_hf("falcon", bias=True), "falcon", [({}, "a falcon file with biases (blk.0.attn_qkv.bias) is not one")],
                        tmp_path)
    assert_each_refused(tiny_hf("falcon"), "falcon", [({"rope.dimension_count": 8},
                                                       "falcon.rope.dimension_count = 8 is not the head's 16 dims")], tmp_path)


def test_granite_command_r_and_stablelm_metadata_as_llama_cpp_reads_it(tmp_path):
    """What llama.cpp reads as optional is read so (Granite without attention.scale: scores by head_dim^-1/2;
    without embedding_scale or residual_scale: unscaled); what it does not read is not read (StableLM's
    use_parallel_residual: llama.cpp's layers are parallel where there is no ffn_norm, whatever the key says,
    and the converter writes it true where config.json has none, as StableLM-3B-4E1T's); what it cannot be
    is one line."""
    granite = tiny_hf("granite", embedding_multiplier=3.0, attention_multiplier=0.25, residual_multiplier=0.5,
                      logits_scaling=2.0)
    plain = tiny_hf("granite", attention_multiplier=0.25, logits_scaling=2.0)  # scores by 16^-1/2: no attention.scale
    stablelm = tiny_hf("stablelm", partial_rotary_factor=0.5, use_parallel_residual=True, qk_layernorm=True)
    sequential = tiny_hf("stablelm", partial_rotary_factor=0.5, use_qkv_bias=True)  # its ffn_norm read after attention
    x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(5))
    for i, (theirs, arch, drop, changes) in enumerate([
            (plain, "granite", ["attention.scale", "embedding_scale", "residual_scale"], {}),
            (stablelm, "stablelm", ["use_parallel_residual"], {}), (stablelm, "stablelm", [], {"use_parallel_residual": False}),
            (sequential, "stablelm", [], {"use_parallel_residual": True}), (sequential, "stablelm", [], {"use_parallel_residual": 1})]):
        ours = models.from_pretrained(write_gguf(tmp_path / f"{i}.gguf", theirs, arch=arch, drop=drop, **changes))
        with torch.no_grad():
            assert (ours(x) - theirs(x).logits).abs().max() <= 1e-4
    command_r = tiny_hf("cohere", logit_scale=0.5)
    # a logit_scale of 0 llama.cpp's Command-R and Command-R7B take for none (Granite's it divides by: refused below)
    ours = models.from_pretrained(write_gguf(tmp_path / "unscaled.gguf", command_r, arch="command-r", logit_scale=0.0))
    with torch.no_grad():
        assert ours.config.logit_scale == 1.0 and (ours(x) - command_r(x).logits / 0.5).abs().max() <= 1e-4
    cases = [(granite, "granite", dict(drop=["logit_scale"]), "metadata granite.logit_scale is missing"),
             (granite, "granite", {"logit_scale": 0.0}, "logits_scaling=0.0 must be a positive number"),
             (granite, "granite", {"rope.scaling.finetuned": False}, "granite.rope.scaling.finetuned = False: a granite "
                                                                      "model without the rotary embedding is not implemented"),
             (command_r, "command-r", {"rope.dimension_count": 8}, "command-r.rope.dimension_count = 8 is not the head's 16"),
             (command_r, "command-r", {"logit_scale": -1.0}, "logit_scale=-1.0 must be a positive number"),
             (tiny_hf("cohere2", num_hidden_layers=4), "cohere2", {"rope.freq_base_swa": 100.0},
              "cohere2.rope.freq_base_swa = 100.0 differs from rope.freq_base"),
             (tiny_hf("olmo", attention_bias=True), "olmo", {}, "an olmo file with biases (blk.0.attn_output.bias) is not"),
             # GPT-NeoX's key llama.cpp requires (its layers all have an ffn_norm, parallel or not)
             (tiny_hf("gpt_neox"), "gptneox", dict(drop=["use_parallel_residual"]), "gptneox.use_parallel_residual is missing")]
    for theirs, arch, changes, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            models.from_pretrained(write_gguf(tmp_path / "bad.gguf", theirs, arch=arch, **changes))
        assert "\n" not in str(e.value)


# The published config.json of each Gemma-2 and Gemma-3 size (google/gemma-2-*, google/gemma-3-*): layers, d_model, heads,
# head_dim, and the query_pre_attn_scalar transformers scales scores by, which a GGUF file does not store
GEMMA_SIZES = {"gemma-2-2b": ("gemma2", 26, 2304, 8, 256, 256), "gemma-2-9b": ("gemma2", 42, 3584, 16, 256, 256),
               "gemma-2-27b": ("gemma2", 46, 4608, 32, 128, 144), "gemma-3-1b": ("gemma3", 26, 1152, 4, 256, 256),
               "gemma-3-4b": ("gemma3", 34, 2560, 8, 256, 256), "gemma-3-12b": ("gemma3", 48, 3840, 16, 256, 256),
               "gemma-3-27b": ("gemma3", 62, 5376, 32, 128, 168)}


@pytest.mark.parametrize("size", GEMMA_SIZES)
def test_the_gemma_score_scale_a_gguf_file_implies(size):
    """What models.py takes for query_pre_attn_scalar from a Gemma GGUF file's metadata (llama.cpp's rule: d_model /
    n_head for the 27B models, else head_dim) is the model's own config.json value."""
    arch, layers, d_model, heads, head_dim, scalar = GEMMA_SIZES[size]
    metadata = {"general.architecture": arch} | {f"{arch}.{key}": value for key, value in dict(
        block_count=layers, context_length=8192, embedding_length=d_model, feed_forward_length=4 * d_model,
        **{"attention.head_count": heads, "attention.head_count_kv": heads // 2, "attention.key_length": head_dim,
           "attention.layer_norm_rms_epsilon": 1e-6, "attention.sliding_window": 4096 if arch == "gemma2" else 1024}).items()}
    config = models.gguf_config(metadata, {"token_embd.weight": (256000, d_model)}, f"{size}.gguf")
    assert config["query_pre_attn_scalar"] == scalar and config["head_dim"] == head_dim
    assert models.family_config(config, f"{size}.gguf")[0]["attn_scale"] == scalar ** -0.5


def test_metadata_llama_cpp_reads_as_optional(tmp_path):
    """What older converters leave out, or write under an older key, is read as llama.cpp reads it: no
    head_count_kv (as many as the heads), a rope factor without its type (linear) or as rope.scale_linear,
    no Gemma-2 window (4,096)."""
    every_head = tiny_hf("llama", num_key_value_heads=4, tie_word_embeddings=False)
    scaled = tiny_hf("llama", rope_scaling=dict(rope_type="linear", factor=4.0), tie_word_embeddings=False)
    x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(5))
    for i, (theirs, changes, drop) in enumerate([(every_head, {}, ["attention.head_count_kv"]),
                                                 (scaled, {"rope.scaling.factor": 4.0}, []),
                                                 (scaled, {"rope.scale_linear": 4.0}, [])]):
        ours = models.from_pretrained(write_gguf(tmp_path / f"{i}.gguf", theirs, drop=drop, **changes))
        with torch.no_grad():
            assert (ours(x) - theirs(x).logits).abs().max() <= 1e-4
    info = formats.read_gguf_info(write_gguf(tmp_path / "gemma2.gguf", tiny_hf("gemma2"), arch="gemma2",
                                             drop=["attention.sliding_window"]))
    assert models.gguf_config(info.metadata, {n: t.shape for n, t in info.tensors.items()}, "g.gguf")["sliding_window"] == 4096


def test_gguf_files_that_disagree_with_themselves(tmp_path):
    theirs = tiny_hf("llama", tie_word_embeddings=False)
    cases = [(dict(arch="mamba"), "architecture 'mamba' is not supported"),
             (dict(block_count=3), "weight 'blk.2.attn_norm.weight' is missing"),
             (dict(block_count=1), r"weights \['blk.1."),
             (dict(feed_forward_length=128), r"blk.0.ffn_up.weight has shape \(96, 64\), which does not fit"),
             (dict(**{"attention.head_count_kv": 4}), r"blk.0.attn_k.weight has shape \(32, 64\)"),
             (dict(**{"attention.head_count": 6, "attention.head_count_kv": 3}), r"blk.0.attn_q.weight has shape \(64, 64\)"),
             (dict(expert_count=4), "metadata llama.expert_used_count is missing"),  # a Mixtral, but without its experts
             (dict(expert_count=4, expert_used_count=2), "weight 'blk.0.ffn_gate_inp.weight' is missing"),
             (dict(expert_count=4, expert_used_count=5), "llama.expert_used_count = 5 exceeds its expert_count = 4"),
             (dict(expert_count=4, expert_used_count=2, expert_group_count=2),
              r"experts routed by groups \(llama.expert_group_count = 2, DeepSeek-style\) are not implemented"),
             (dict(**{"attention.head_count": 0}), "metadata llama.attention.head_count = 0 must be a positive integer"),
             (dict(**{"rope.freq_base": 0.0}), "rotary_base=0.0 must be a positive number"),
             (dict(**{"rope.scaling.type": "yarn", "rope.scaling.factor": 2.0, "rope.scaling.attn_factor": 1.2}),
              "YaRN with rope.scaling.attn_factor other than 1 is not implemented"),
             (dict(**{"rope.scaling.type": "longrope"}), r"type='longrope' is not implemented \(supported: \['none', 'linear', 'yarn'\]\)")]
    for changes, message in cases:
        path = write_gguf(tmp_path / "bad.gguf", theirs, **changes)
        with pytest.raises(ValueError, match=message) as e:
            models.from_pretrained(path)
        assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf"]  # nothing written
    with pytest.raises(ValueError, match=r"bad.gguf: the GGUF file holds no tokenizer \(no tokenizer.ggml.model"):
        models.load_pretrained(write_gguf(tmp_path / "bad.gguf", theirs))
    split = {"general.architecture": "llama", "split.no": 0, "split.count": 3}  # llama-gguf-split's first part
    with pytest.raises(ValueError, match=r"m-00001-of-00003.gguf is part 1 of 3 of a split GGUF file: merge the parts"):
        models.gguf_config(split, {}, "m-00001-of-00003.gguf")
    with pytest.raises(ValueError, match="m.gguf: metadata split.count = 'x' and split.no = 0 must be integers"):
        models.gguf_config(split | {"split.count": "x"}, {}, "m.gguf")
    phi3 = {"general.architecture": "phi3"} | {f"phi3.{key}": 64 for key in models.GGUF_CONFIG.values()} | {
        "phi3.attention.layer_norm_rms_epsilon": 1e-5}
    with pytest.raises(ValueError, match=r"m.gguf: a mixture-of-experts phi3 model \(phi3.expert_count = 16\) is not supported "
                                         r"\(mixtures of experts: llama, qwen2moe, qwen3moe, olmoe, gpt-oss\)"):
        models.gguf_config(phi3 | {"phi3.expert_count": 16}, {"token_embd.weight": (64, 64)}, "m.gguf")
    with pytest.raises(ValueError, match=r"m.gguf: metadata qwen3moe.expert_count is missing or 0: the file is not a qwen3moe"):
        models.gguf_config({"general.architecture": "qwen3moe"} | {f"qwen3moe.{key[5:]}": value for key, value in phi3.items()
                                                                   if key.startswith("phi3.")}, {"token_embd.weight": (64, 64)},
                           "m.gguf")
    # LongRoPE's factors: one of each per rotary frequency (4 here), with no other rope scaling
    longrope = phi3 | {"phi3.attention.head_count": 4, "phi3.rope.dimension_count": 8}
    for changes, factors, message in [
            ({}, {"rope_factors_long.weight": (4,)}, r"tensor rope_factors_short.weight is missing: LongRoPE needs one factor "
                                                     r"for each of the 4 rotary frequencies \(half of rope.dimension_count\)"),
            ({}, {"rope_factors_short.weight": (4,), "rope_factors_long.weight": (8,)},
             r"tensor rope_factors_long.weight has shape \(8,\): LongRoPE needs one factor for each of the 4"),
            ({"phi3.rope.scaling.factor": 2.0}, {"rope_factors_short.weight": (4,), "rope_factors_long.weight": (4,)},
             "LongRoPE's factors and rope.scaling.type = 'linear' together are not implemented"),
            ({"phi3.rope.scaling.type": "longrope", "phi3.rope.scaling.factor": 2.0},
             {"rope_factors_short.weight": (4,), "rope_factors_long.weight": (4,)},
             "rope.scaling.type = 'longrope' with rope.scaling.factor = 2.0 is not implemented")]:
        with pytest.raises(ValueError, match="^m.gguf: " + message) as e:
            models.gguf_config(longrope | changes, {"token_embd.weight": (64, 64)} | factors, "m.gguf")
        assert "\n" not in str(e.value)
    read = models.gguf_config(longrope, {"token_embd.weight": (64, 64), "rope_factors_short.weight": (4,),
                                         "rope_factors_long.weight": (4,)}, "m.gguf")  # llama.cpp's defaults for the rest
    assert read["original_max_position_embeddings"] == 64 and read["rope_scaling"]["attention_factor"] == 1.0
    # the rotary embedding on 30 of 44 dims: exactly the file's count (not 29, as 30 / 44 * 44 in floats)
    partial = models.gguf_config(phi3 | {"phi3.embedding_length": 88, "phi3.attention.head_count": 2,
                                         "phi3.rope.dimension_count": 30}, {"token_embd.weight": (64, 88)}, "m.gguf")
    assert models.family_config(partial, "m.gguf")[0]["rotary_dims"] == 30


def test_gpt2_gptneox_and_gemma_metadata_of_the_wrong_kind_is_one_line(tmp_path):
    """A count that is not a whole number (a float, a string, 0) or a flag that is not a boolean is refused in one
    line naming the key, not a traceback from deep in the loader, nor read as something else (the string "false"
    as a parallel residual). GPT-NeoX's rotary dims are the file's count whatever its key_length says."""
    neox = need("transformers").GPTNeoXForCausalLM(need("transformers").GPTNeoXConfig(
        vocab_size=96, max_position_embeddings=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, rotary_pct=0.5)).eval()
    gemma = tiny_hf("gemma", sliding_window=None)
    cases = [(neox, "gptneox", {"rope.dimension_count": 8.0}, "metadata gptneox.rope.dimension_count = 8.0 must be a"),
             (neox, "gptneox", {"rope.dimension_count": "8"}, "metadata gptneox.rope.dimension_count = '8' must be a"),
             (neox, "gptneox", {"attention.key_length": 0}, "metadata gptneox.attention.key_length = 0 must be a"),
             (neox, "gptneox", {"use_parallel_residual": "false"}, "metadata gptneox.use_parallel_residual = 'false' must"),
             (gemma, "gemma", {"attention.key_length": 0}, "metadata gemma.attention.key_length = 0 must be a"),
             (gemma, "gemma", {"attention.key_length": "16"}, "metadata gemma.attention.key_length = '16' must be a"),
             (gemma, "gemma", {"attention.head_count_kv": 0.5}, "metadata gemma.attention.head_count_kv = 0.5 must be a")]
    for theirs, arch, changes, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            models.from_pretrained(write_gguf(tmp_path / "bad.gguf", theirs, arch=arch, **changes))
        assert "\n" not in str(e.value)
    # a key_length other than d_model / n_head (which GPT-NeoX's converter never writes) leaves the rotary dims the file's
    ours = models.from_pretrained(write_gguf(tmp_path / "neox.gguf", neox, arch="gptneox", **{"attention.key_length": 32}))
    assert ours.config.rotary_dims == 8


def test_a_gguf_file_is_known_by_its_first_bytes(tmp_path):
    """A GGUF file without the suffix (ollama's blobs) loads as itself; a missing *.gguf and a file
    that is neither GGUF nor a folder are one-line errors."""
    theirs = tiny_hf("llama", tie_word_embeddings=False)
    path = write_gguf(tmp_path / "tiny.gguf", theirs)
    blob = tmp_path / "sha256-0123abcd"
    blob.symlink_to(path)
    x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (models.from_pretrained(str(blob))(x) - theirs(x).logits).abs().max() <= 1e-4
    (tmp_path / "notes.txt").write_text("{}")
    cases = [(tmp_path / "missing.gguf", "GGUF file .*missing.gguf does not exist$"),
             (tmp_path / "notes.txt", "notes.txt is a file but not a GGUF file: give a Hugging Face model folder or a GGUF")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            models.from_pretrained(str(bad))
        with pytest.raises(ValueError, match=message):
            models.load_pretrained(str(bad))


# --- the real model -------------------------------------------------------------------------

def ours_and_theirs(name):
    """(our model, its tokenizer, transformers' model) of a real GGUF file, both float32."""
    transformers = need("transformers")
    need("gguf")  # transformers' GGUF loader asks for gguf and accelerate
    need("accelerate")
    path = real_model(name)
    ours, tok = models.load_pretrained(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                               dtype=torch.float32).eval()
    return ours, tok, theirs


def test_smollm2_gives_the_logits_and_generations_of_transformers():
    """SmolLM2-135M-Instruct (Q4_1, Q8_0 and F32 tensors) by models.py and by transformers'
    GGUF loader (which dequantises through `gguf`), both float32: logits within 1e-3 on English
    prose this Python ships, the same 20 greedy tokens after a story prompt."""
    ours, tok, theirs = ours_and_theirs(SMOLLM2)
    assert ours.config.n_layer == 30 and ours.config.n_kv_head == 3 and ours.config.tied_head
    from pydoc_data.topics import topics
    x = torch.tensor([tok.encode(topics["assert"])[:128]])
    with torch.no_grad():
        want, got = theirs(x).logits, ours(x)
    assert (got - want).abs().max() <= 1e-3 and want.std() > 1.0
    prompt = torch.tensor([tok.encode("Once upon a time, there was a little dragon who")])
    want_ids = theirs.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones_like(prompt))
    got_ids = ours.generate(prompt, 20, temperature=0)
    assert torch.equal(got_ids, want_ids), (tok.decode(got_ids[0]), tok.decode(want_ids[0]))


@pytest.mark.parametrize("name", ["SmolLM2", "Gemma-3"])
def test_train_lm_and_steer_on_a_real_model(name, tmp_path, capsys):
    """train_lm.py --hf on the GGUF file, as small as its flags allow (16-token windows, 2 per step,
    2 codebook steps, 8 codes per head), then steer.py forcing a code of its checkpoint."""
    import steer
    import train_lm
    path, layers, heads, family = {"SmolLM2": (SMOLLM2, 30, 9, "llama"), "Gemma-3": (GEMMA3, 18, 4, "gemma3_text")}[name]
    path, out = real_model(path), tmp_path / "lm"
    train_lm.main(["--hf", path, "--out", str(out), "--stories", "200", "--block_size", "16", "--batch_size", "2",
                   "--codebook_steps", "2", "--num_codes", "8", "--k", "1", "--revive_every", "0", "--eval_windows", "4",
                   "--kmeans_windows", "2", "--no-control", "--threads", "2", "--device", "cpu"])
    results, config = json.load(open(out / "results.json")), runs.load_checkpoint(str(out / "codebook.pt"))["config"]
    # the pretrained model predicts the stories (measured: 4.9 and 6.0 nats, 30% and 25% of the tokens);
    # a wrong weight or tokenizer guesses: ln(vocab) = 10.8 and 12.5 nats
    assert results["base_val_loss"] < 0.6 * np.log(config["vocab_size"]) and results["base_val_accuracy"] > 0.15
    # with a codebook of 8 codes on every head after 2 steps it still predicts (measured: 6.5 and 9.6 nats)
    assert results["codebook_val_loss"] < 0.85 * np.log(config["vocab_size"])
    assert results["loss_ratio"] == results["codebook_val_loss"] / results["base_val_loss"]
    assert len(results["dead_code_fraction"]) == layers * heads  # a codebook on every head of every layer
    assert config["family"] == family
    capsys.readouterr()
    steer.main(["--ckpt", str(out / "codebook.pt"), "--codes", "L1.H2.3", "--prompt", "Once upon a time",
                "--samples", "2", "--new_bytes", "6", "--threads", "2", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "with L1.H2.3" in printed and printed.count("    Once upon a time") == 4


# --- Gemma-3-270M ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma3():
    """(ours, its tokenizer, transformers' model) of Gemma-3-270M (Q8_0, Q5_0, Q4_K, Q6_K and F32
    tensors), loaded once: transformers' GGUF loader dequantises through `gguf` (about a minute)."""
    return ours_and_theirs(GEMMA3)


def test_gemma3_gives_the_logits_of_transformers(gemma3):
    """Logits within 1e-3 over 530 tokens of prose this Python ships, past the 512-token window of
    its sliding layers (five in six; every sixth layer global, with its own rotary base)."""
    ours, tok, theirs = gemma3
    assert ours.config.n_layer == 18 and ours.config.n_kv_head == 1 and ours.config.attn_window[:6] == [512] * 5 + [0]
    from pydoc_data.topics import topics
    ids = tok.encode(topics["compound"], special=True)[:530]
    assert ids[0] == tok.bos == 2 and len(ids) == 530
    with torch.no_grad():
        want, got = theirs(torch.tensor([ids])).logits, ours(torch.tensor([ids]))
    assert (got - want).abs().max() <= 1e-3 and want.std() > 1.0


def test_gemma3_gives_the_generations_of_transformers(gemma3):
    ours, tok, theirs = gemma3
    prompt = torch.tensor([tok.encode("Once upon a time, there was a little dragon who", special=True)])
    want_ids = theirs.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones_like(prompt))
    got_ids = ours.generate(prompt, 20, temperature=0)
    assert torch.equal(got_ids, want_ids), (tok.decode(got_ids[0]), tok.decode(want_ids[0]))
