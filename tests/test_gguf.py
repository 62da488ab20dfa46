"""formats.py's GGUF reader. By hand: a file written here byte by byte, and bad files (one line each).
Against the `gguf` package (llama.cpp's own reader, writer and dequantisation; test-only): every block
format on random blocks, a file written by its GGUFWriter, and the two real models that
.ci/fetch_models puts in $CODEBOOK_MODELS. Without `gguf` or the model files those tests skip, unless
CODEBOOK_REQUIRE_HF=1 or CODEBOOK_REQUIRE_MODELS=1 (CI) makes their absence a failure."""
import struct

import numpy as np
import pytest
import torch

import formats
import models
from conftest import GEMMA3, SMOLLM2, need, real_model


def same_floats(a, b):
    """Equal bit for bit (so -0.0 and 0.0 differ, and equal NaNs are equal)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# --- a GGUF file by hand ------------------------------------------------------------------

def string(s):
    return struct.pack("<Q", len(s.encode())) + s.encode()


def gguf_bytes(version=3, n_tensors=None, q8_type=8, q8_dims=(32, 2), q8_offset=32):
    """A small GGUF file's bytes, written here from docs/gguf.md: three keys, an F32 tensor "a" of torch
    shape (2, 3) holding 0..5 and a Q8_0 tensor "b" of shape (2, 32) whose value j of row r is
    0.5 * (j - 16) * (r + 1). The arguments write wrong fields into it."""
    metadata = [string("general.architecture") + struct.pack("<I", 8) + string("llama"),
                string("llama.block_count") + struct.pack("<I", 4) + struct.pack("<I", 2),
                string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + string("a") + string("é")]
    a = np.arange(6, dtype=np.float32).tobytes()
    b = b"".join(np.float16(0.5 * (r + 1)).tobytes() + np.arange(-16, 16, dtype=np.int8).tobytes() for r in range(2))
    infos = [string("a") + struct.pack("<I2QIQ", 2, 3, 2, 0, 0),
             string("b") + struct.pack(f"<I{len(q8_dims)}QIQ", len(q8_dims), *q8_dims, q8_type, q8_offset)]
    head = b"GGUF" + struct.pack("<IQQ", version, 2 if n_tensors is None else n_tensors, 3) + b"".join(metadata + infos)
    head += bytes(-len(head) % 32)
    return head + a + bytes(32 - len(a)) + b


def write(tmp_path, data, name="model.gguf"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_a_file_written_by_hand(tmp_path, capfd):
    path = write(tmp_path, gguf_bytes())
    info = formats.read_gguf_info(path)
    assert info.metadata == {"general.architecture": "llama", "llama.block_count": 2, "tokenizer.ggml.tokens": ["a", "é"]}
    assert {n: (t.type, t.shape) for n, t in info.tensors.items()} == {"a": ("F32", (2, 3)), "b": ("Q8_0", (2, 32))}
    tensors = formats.read_gguf(path).tensors
    again = formats.read_gguf(path, info=info).tensors  # the header read once only
    assert again.keys() == tensors.keys() and all(torch.equal(again[n], tensors[n]) for n in tensors)
    assert torch.equal(tensors["a"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(tensors["b"], 0.5 * torch.arange(-16.0, 16.0) * torch.tensor([[1.0], [2.0]]))
    assert list(formats.read_gguf(path, names=["b"]).tensors) == ["b"]
    assert formats.read_gguf_info(write(tmp_path, gguf_bytes(version=2), "v2.gguf")) == info  # v2: the same layout
    assert capfd.readouterr() == ("", "")  # a library prints nothing


def one_line_error(path):
    with pytest.raises(ValueError) as e:
        formats.read_gguf(path)
    message = str(e.value)
    assert "\n" not in message and path in message
    return message


def test_bad_files_one_line_each(tmp_path):
    good = gguf_bytes()
    assert "is not a GGUF file" in one_line_error(write(tmp_path, b"PK\x03\x04" + good[4:], "zip.gguf"))
    assert "is not a GGUF file" in one_line_error(write(tmp_path, b"", "empty.gguf"))
    for cut in range(4, len(good)):  # every truncation, whether in the metadata, the tensor infos or the data
        assert "is truncated" in one_line_error(write(tmp_path, good[:cut], "cut.gguf")), cut
    assert "GGUF version 1; this reader reads versions 2 and 3" in one_line_error(write(tmp_path, gguf_bytes(version=1)))
    assert "big-endian" in one_line_error(write(tmp_path, gguf_bytes(version=3 << 24)))
    assert "tensor b is stored as IQ2_XXS (ggml type 16), a block format this reader does not read" in \
        one_line_error(write(tmp_path, gguf_bytes(q8_type=16)))
    assert "tensor b is stored as unknown (ggml type 99)" in one_line_error(write(tmp_path, gguf_bytes(q8_type=99)))
    assert "tensor b has rows of 16 values, not a whole number of Q8_0 blocks" in \
        one_line_error(write(tmp_path, gguf_bytes(q8_dims=(16, 2))))
    assert "tensor b starts at byte 40 of its data section, not a multiple of its alignment (32)" in \
        one_line_error(write(tmp_path, gguf_bytes(q8_offset=40)))
    # tensor counts and shapes that disagree with the data
    assert "tensor count (3) is wrong" in one_line_error(write(tmp_path, gguf_bytes(n_tensors=3)))
    assert "tensor count or shapes disagree with its data" in one_line_error(write(tmp_path, gguf_bytes(n_tensors=1)))
    assert "tensor shapes disagree with its data: tensor b (Q8_0, shape [3, 32])" in \
        one_line_error(write(tmp_path, gguf_bytes(q8_dims=(32, 3))))
    assert "tensor count or shapes disagree with its data" in \
        one_line_error(write(tmp_path, gguf_bytes(q8_dims=(32,))))
    with pytest.raises(ValueError, match="has no tensor named c$"):
        formats.read_gguf(write(tmp_path, good), names=["c"])


# --- against the gguf package -------------------------------------------------------------

# where each block format keeps its float16 scales and minimums: random bytes there could be NaN or
# infinite, so those fields get ordinary values; every other byte (the packed integers, the 6-bit and
# int8 sub-block scales) stays random
SCALE_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
                "Q5_K": [0, 2], "Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108], "IQ4_NL": [0], "IQ4_XS": [0],
                "MXFP4": []}  # (MXFP4's scale is a byte exponent: every value is one)


def random_blocks(name, n_blocks, rng):
    """n_blocks blocks of block format `name` (n_blocks, bytes per block) uint8."""
    _, _, block_bytes, _ = formats.GGML_TYPES[formats.GGML_TYPE_NUMBERS[name]]
    if name in ("F32", "F16", "BF16"):  # any finite floats, of every magnitude
        values = (rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-4, 4, n_blocks)).astype(np.float32)
        if name == "BF16":
            return values.view(np.uint16)[1::2].copy().view(np.uint8).reshape(n_blocks, 2)
        return values.astype(np.float16 if name == "F16" else np.float32).view(np.uint8).reshape(n_blocks, block_bytes)
    blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for at in SCALE_FIELDS[name]:
        blocks[:, at:at + 2] = (rng.standard_normal((n_blocks, 1)) * 0.05).astype(np.float16).view(np.uint8)
    return blocks


@pytest.mark.parametrize("name", sorted(formats.GGML_TYPE_NUMBERS))
def test_block_formats_match_gguf(name):
    gguf = need("gguf")
    blocks = random_blocks(name, 4096, np.random.default_rng(formats.GGML_TYPE_NUMBERS[name]))
    ours = formats.GGML_TYPES[formats.GGML_TYPE_NUMBERS[name]][3](blocks)
    with np.errstate(over="ignore"):  # (MXFP4's largest exponent overflows float32 to inf in both, as it should)
        theirs = gguf.quants.dequantize(blocks.reshape(-1), gguf.GGMLQuantizationType[name])
    assert same_floats(ours.reshape(-1), theirs)


# one quantisation step of each format gguf can quantise, per block (rows of 32 values) of the original
STEPS = {"Q8_0": lambda x: abs(x).max(-1, keepdims=True) / 127, "Q4_0": lambda x: abs(x).max(-1, keepdims=True) / 8,
         "Q5_0": lambda x: abs(x).max(-1, keepdims=True) / 16,
         "Q4_1": lambda x: np.ptp(x, -1, keepdims=True) / 15, "Q5_1": lambda x: np.ptp(x, -1, keepdims=True) / 31}


def test_a_file_written_by_gguf(tmp_path):
    """Metadata of every value type and tensors in every block format, written by gguf's GGUFWriter with
    64-byte alignment, read back: the metadata as written, each tensor equal to gguf's dequantisation
    and, where gguf quantised it from floats, within one quantisation step of them. (Rounding to the
    nearest level costs half a step; Q4_0 and Q5_0's levels reach one step less far on the side opposite
    the block's largest magnitude, so values there can be a step off; float16 scales add at most 2**-7
    of a step.) F16 and BF16 are within their rounding: 2**-11 and 2**-8 of the value."""
    gguf = need("gguf")
    rng = np.random.default_rng(0)
    path = str(tmp_path / "written.gguf")
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_custom_alignment(64)
    metadata = {"general.name": "tiny ☃", "u8": (gguf.GGUFValueType.UINT8, 255), "i8": (gguf.GGUFValueType.INT8, -128),
                "u16": (gguf.GGUFValueType.UINT16, 65535), "i16": (gguf.GGUFValueType.INT16, -32768),
                "u32": (gguf.GGUFValueType.UINT32, 2**32 - 1), "i32": (gguf.GGUFValueType.INT32, -2**31),
                "u64": (gguf.GGUFValueType.UINT64, 2**64 - 1), "i64": (gguf.GGUFValueType.INT64, -2**63),
                "f32": (gguf.GGUFValueType.FLOAT32, 1e-5), "f64": (gguf.GGUFValueType.FLOAT64, 1e-5),
                "yes": (gguf.GGUFValueType.BOOL, True), "no": (gguf.GGUFValueType.BOOL, False),
                "tokens": ["<s>", "▁the", "é", "\n", ""], "merges": ["a b", "ab c"], "types": [1, 3, -2],
                "scores": [0.5, -1.25, 1e-5], "flags": [True, False], "nested": [["a", "b"], ["c"]]}
    for key, value in metadata.items():
        if isinstance(value, tuple):
            writer.add_key_value(key, value[1], value[0])
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_string(key, value)
    originals, stored = {}, {}
    for name in sorted(formats.GGML_TYPE_NUMBERS):
        qtype = gguf.GGMLQuantizationType[name]
        if name in ("F32", "F16", "BF16", *STEPS):
            originals[name] = rng.standard_normal((3, 2, 64)).astype(np.float32)
            stored[name] = gguf.quants.quantize(originals[name], qtype)
        else:  # formats gguf cannot quantise: random blocks, two rows of 256 values
            values_per_block = formats.GGML_TYPES[formats.GGML_TYPE_NUMBERS[name]][1]
            stored[name] = random_blocks(name, 2 * 256 // values_per_block, rng).reshape(2, -1)
        writer.add_tensor(f"w.{name}", stored[name], raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    gguf_file = formats.read_gguf(path)
    expected = {key: value[1] if isinstance(value, tuple) else value for key, value in metadata.items()}
    expected["f32"], expected["scores"] = float(np.float32(1e-5)), [float(np.float32(v)) for v in metadata["scores"]]
    assert gguf_file.metadata == {"general.architecture": "llama", "general.alignment": 64, **expected}
    for name in sorted(formats.GGML_TYPE_NUMBERS):
        ours = gguf_file.tensors[f"w.{name}"].numpy()
        reference = gguf.quants.dequantize(stored[name], gguf.GGMLQuantizationType[name])
        assert same_floats(ours, reference), name
        if name in STEPS:
            x = originals[name].reshape(-1, 32)
            assert (abs(ours.reshape(-1, 32) - x) <= STEPS[name](x) * (1 + 2**-7)).all(), name
        elif name in originals:
            x = originals[name]
            assert (abs(ours - x) <= abs(x) * {"F32": 0, "F16": 2**-11, "BF16": 2**-8}[name]).all(), name
        assert ours.shape == (originals[name].shape if name in originals else (2, 256)), name


# --- the real models --------------------------------------------------------------------------

@pytest.mark.parametrize("file", [SMOLLM2, GEMMA3])
def test_real_models_match_gguf(file, monkeypatch):
    """Every key-value equal to the gguf package's reader's, every tensor's name, block format and shape
    too, and the values of a fixed sample equal bit for bit to gguf's dequantisation: the first two and
    the last tensor of each block format (7 tensors, 22% of the values of SmolLM2; 15, 66% of Gemma's,
    the embedding among them), where all would take gguf seconds more. gguf's reader parses a plain
    array view of the file, not a numpy.memmap, whose per-slice overhead more than doubles its time on
    these files (the same bytes, the same parser)."""
    path = real_model(file)
    gguf = need("gguf")
    info = formats.read_gguf_info(path)
    with monkeypatch.context() as patch:
        memmap = np.memmap
        patch.setattr(np, "memmap", lambda path, mode: np.asarray(memmap(path, mode=mode)))
        reader = gguf.GGUFReader(path)
    metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert info.metadata == metadata
    assert {n: (t.type, t.shape) for n, t in info.tensors.items()} == \
        {t.name: (t.tensor_type.name, tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    by_type = {}
    for t in reader.tensors:
        by_type.setdefault(t.tensor_type.name, []).append(t)
    sample = {t.name: t for ts in by_type.values() for t in ts[:2] + ts[-1:]}
    ours = formats.read_gguf(path, names=list(sample)).tensors
    for name, t in sample.items():
        assert same_floats(ours[name], gguf.quants.dequantize(t.data, t.tensor_type)), name


# --- what the reader and models.py take from a file, against gguf and transformers ---------------

def write_with_gguf(path, metadata=(), tensors=(), alignment=None):
    """A GGUF file of the llama architecture written by gguf's GGUFWriter: metadata (key, value type, value)
    and tensors (name, float32 array)."""
    gguf = need("gguf")
    writer = gguf.GGUFWriter(str(path), arch="llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    for key, kind, value in metadata:
        writer.add_key_value(key, value, kind)
    for name, array in tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_metadata_keeps_gguf_value_types(tmp_path):
    """A bool is read as a bool (not the int 1 or 0 that compares equal to it), an array of bools as bools,
    integers and floats as such: the types of gguf's reader's values."""
    gguf = need("gguf")
    t = gguf.GGUFValueType
    path = write_with_gguf(tmp_path / "types.gguf", [("yes", t.BOOL, True), ("no", t.BOOL, False), ("u8", t.UINT8, 1),
                                                      ("f32", t.FLOAT32, 2.0), ("flags", t.ARRAY, [True, False])])
    ours = formats.read_gguf_info(path).metadata
    theirs = {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items() if not key.startswith("GGUF.")}
    assert ours == theirs and repr(ours) == repr(theirs)
    assert ours["yes"] is True and ours["no"] is False and ours["flags"] == [True, False] and type(ours["flags"][0]) is bool


@pytest.mark.parametrize("alignment", [32, 64])
def test_layouts_gguf_writes(alignment, tmp_path):
    """Tensors of 1 to 4 dims, with the tensor infos ending exactly on the alignment (no padding before the
    data section) and not: every tensor where gguf's reader finds it, equal to its array."""
    gguf = need("gguf")
    rng = np.random.default_rng(0)
    arrays = {f"t{n}": rng.standard_normal((2, 3, 4, 5)[:n]).astype(np.float32) for n in (1, 2, 3, 4)}
    header_ends = set()
    for pad in range(alignment):  # a key of each length: the header ends at every offset modulo the alignment once
        path = write_with_gguf(tmp_path / "layout.gguf", [("pad", gguf.GGUFValueType.STRING, "x" * pad)], arrays.items(),
                               alignment)
        reader = gguf.GGUFReader(path)
        last = reader.tensors[-1].field
        header_end = last.offset + sum(int(part.nbytes) for part in last.parts)
        header_ends.add(header_end % alignment)
        if header_end % alignment not in (0, 1):
            continue
        info = formats.read_gguf(path)
        assert {n: t.shape for n, t in info.tensors.items()} == {n: a.shape for n, a in arrays.items()}
        assert all(torch.equal(info.tensors[n], torch.from_numpy(a)) for n, a in arrays.items())
        assert {n: t.offset for n, t in formats.read_gguf_info(path).tensors.items()} == \
            {t.name: t.data_offset for t in reader.tensors}
    assert {0, 1} <= header_ends


def test_two_tensors_of_one_name_are_refused(tmp_path):
    twice = gguf_bytes().replace(string("b") + struct.pack("<I", 2), string("a") + struct.pack("<I", 2))
    assert "holds two tensors named a" in one_line_error(write(tmp_path, twice))


CONFIG_KEYS = {"block_count": 3, "context_length": 4096, "embedding_length": 64, "feed_forward_length": 96,
               "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 16,
               "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 500000.0}


@pytest.mark.parametrize("drop", [(), ("attention.key_length", "rope.freq_base", "output.weight"),
                                  ("attention.head_count_kv", "attention.key_length")])
def test_the_config_of_a_gguf_file_is_transformers(drop, tmp_path):
    """models.gguf_config against transformers' own GGUF loader's config of the same file: layers, sizes, key /
    value heads, head_dim, context length, norm epsilon, rotary base and tied embeddings, with every key given
    (none at a default, context length not d_model) and with the optional ones left out, read as llama.cpp does.
    (key_length is d_model / heads here: transformers' Llama mapping ignores the key, which llama.cpp reads.)"""
    gguf, transformers = need("gguf"), need("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    t = gguf.GGUFValueType
    metadata = [(f"llama.{key}", t.FLOAT32 if isinstance(value, float) else t.UINT32, value)
                for key, value in CONFIG_KEYS.items() if key not in drop]
    tensors = [(name, np.zeros((96, 64), np.float32)) for name in ("token_embd.weight", "output.weight") if name not in drop]
    path = write_with_gguf(tmp_path / "config.gguf", metadata, tensors)
    info = formats.read_gguf_info(path)
    ours = models.gguf_config(info.metadata, {name: t.shape for name, t in info.tensors.items()}, path)
    parsed = load_gguf_checkpoint(path, return_tensors=False)["config"]
    theirs = transformers.LlamaConfig(**{key: value for key, value in parsed.items() if key != "model_type"})
    fields = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"]
    assert {f: ours[f] for f in fields} == {f: getattr(theirs, f) for f in fields}
    assert ours["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert (ours["max_position_embeddings"], ours["tie_word_embeddings"]) == (4096, "output.weight" in drop)
