"""
Weight files read by hand, so that no package is needed at run time: safetensors (and PyTorch's
.bin through torch.load(weights_only=True)), and GGUF files (llama.cpp's format) with the block
formats people have.
"""
import collections
import functools
import json
import math
import mmap
import os
import struct
import zipfile

import numpy as np
import torch

import runs

# ------------------------------------------------------------------------------------------------
# safetensors: 8 bytes little-endian header length n, n bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the tensors' raw little-endian bytes.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_loaders(path):
    """{name: a function reading that tensor} of a .safetensors file, its header checked (a ValueError
    names what is wrong with a bad one): a model reads its weights one at a time, never holding two
    copies of them all."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        refuse_lfs_pointer(path, f.read(len(LFS_POINTER)))
        f.seek(0)
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} is corrupt: its header is not JSON; download it again") from None
    data = np.memmap(path, np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {entry.get('dtype')!r}, which this reader does not know")
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        expected = int(np.prod(entry["shape"])) * dtype.itemsize
        if end > len(data) or end - begin != expected:
            raise ValueError(f"{path} is truncated or corrupt: tensor {name} needs bytes {begin}..{end} of "
                             f"{len(data)} ({expected} for its shape); download it again")
        tensors[name] = functools.partial(_tensor_from_bytes, data, begin, end, dtype, entry["shape"])
    return tensors


def _tensor_from_bytes(data, begin, end, dtype, shape):
    return torch.from_numpy(data[begin:end].copy()).view(dtype).reshape(shape)  # a copy: aligned, and the file can go


def torch_loaders(path):
    """{name: a function giving that tensor} of a PyTorch .bin file (weights_only=True), memory-mapped
    where it is torch's zip format (since torch 1.6), so its tensors are read as they are asked for."""
    with open(path, "rb") as f:
        refuse_lfs_pointer(path, f.read(len(LFS_POINTER)))
    tensors = runs.load_torch_file(path, "download it again", mmap=zipfile.is_zipfile(path))
    return {name: (lambda t=t: t) for name, t in tensors.items()}


def weight_loaders(folder):
    """{name: a function reading that tensor} of model.safetensors or pytorch_model.bin in `folder`, or
    of the shards that either's index (model.safetensors.index.json, pytorch_model.bin.index.json) names."""
    for single, loaders in (("model.safetensors", safetensors_loaders), ("pytorch_model.bin", torch_loaders)):
        if os.path.isfile(os.path.join(folder, single)):
            return loaders(os.path.join(folder, single))
        index = os.path.join(folder, single + ".index.json")
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} is corrupt: it has no weight_map; download it again")
            shards = sorted(set(weight_map.values()))
            missing = [shard for shard in shards if not os.path.isfile(os.path.join(folder, shard))]
            if missing:
                raise ValueError(f"{folder} lacks {', '.join(missing)}, a shard {single}.index.json names; download it again")
            return {name: load for shard in shards for name, load in loaders(os.path.join(folder, shard)).items()}
    raise ValueError(f"{folder} holds no weights: expected model.safetensors or pytorch_model.bin, or the shards "
                     f"of either with its index")


LFS_POINTER = b"version https://git-lfs"  # what a file is in a clone made without `git lfs pull`


# MXFP4 (OCP Microscaling FP4), in which gpt-oss's released checkpoints store their experts: per row, groups of 32 values,
# each group 16 bytes of two 4-bit E2M1 codes (the low nibble the even value, the high nibble the odd) and one byte of
# E8M0 scale, 2^(scale - 127); the codes' values are transformers' FP4_VALUES (integrations/mxfp4.py)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantise_mxfp4(blocks, scales):
    """float32 (..., G * 32) of MXFP4 blocks (..., G, 16) (uint8) and scales (..., G) (uint8), as transformers'
    convert_moe_packed_tensors computes them (before its transpose): each code's value times 2^(scale - 127)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} ({blocks.dtype}) and scales {tuple(scales.shape)} "
                         f"({scales.dtype}) must be uint8, (..., G, 16) and (..., G)")
    lut = torch.tensor(E2M1, dtype=torch.float32)
    values = torch.stack([lut[(blocks & 0x0F).int()], lut[(blocks >> 4).int()]], -1).flatten(-2)  # (..., G, 32)
    return torch.ldexp(values, scales.to(torch.int32)[..., None] - 127).flatten(-2)


def refuse_lfs_pointer(path, head):
    """A one-line ValueError if the file `path`, starting with the bytes `head`, is a git-lfs pointer."""
    if head.startswith(LFS_POINTER):
        raise ValueError(f"{path} is a git-lfs pointer, not the file: run `git lfs pull` in its folder, or download it again")


def read_json(path):
    """The JSON object in a file; one cut short, corrupt, not an object or a git-lfs pointer is a
    one-line ValueError."""
    with open(path, "rb") as f:
        data = f.read()
    refuse_lfs_pointer(path, data)
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; download it again")
    return value


# ------------------------------------------------------------------------------------------------
# GGUF (llama.cpp's docs/gguf.md), little-endian: b"GGUF", uint32 version (3; 2 is the same layout),
# uint64 tensor count, uint64 key-value count; the key-values (a string key, a uint32 value type, the
# value); per tensor its name, uint32 n_dims, n_dims uint64 dims (fastest-varying first), uint32 block
# format, uint64 offset into the data section; zero padding to general.alignment (default 32); the data
# section, each tensor at an aligned offset. A string is a uint64 length and UTF-8 bytes; an array a
# uint32 element type, a uint64 count and the elements.

GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                12: "<d"}  # value type: its struct (and numpy) format; 8 is a string, 9 an array
GGUF_STRING, GGUF_ARRAY = 8, 9

GGUF = collections.namedtuple("GGUF", "metadata tensors")
GGUFTensorInfo = collections.namedtuple("GGUFTensorInfo", "type shape offset nbytes")


def f16(blocks, at):
    """The float16 at byte `at` of each block, as a float32 column (n_blocks, 1)."""
    return blocks[:, at:at + 2].view("<f2").astype(np.float32)


def nibbles(packed):
    """Each byte's low 4 bits, then each byte's high 4 bits, along the last axis."""
    return np.concatenate([packed & 15, packed >> 4], axis=-1)


def fifth_bits(packed):
    """Bit j of the little-endian uint32 `packed` (4 bytes per block), for j = 0..31: (n_blocks, 32)."""
    return np.unpackbits(packed, axis=-1, bitorder="little")


BIT_PAIRS = np.array([0, 2, 4, 6], dtype=np.uint8)  # shifts to each 2-bit field of a byte


def k_scales(packed):
    """Q4_K and Q5_K's 12 bytes (n, 12) holding 8 six-bit scales and 8 six-bit minimums: bytes 0-3 hold
    scales 0-3 (low 6 bits), bytes 4-7 minimums 0-3; scales and minimums 4-7 have their low 4 bits in
    bytes 8-11 (scale low nibble, minimum high nibble) and their top 2 bits in the top bits of bytes
    0-3 (scales) and 4-7 (minimums). Returns (scales, minimums), float32 (n, 8)."""
    lo, mid, hi = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([lo & 63, (hi & 15) | (lo >> 6 << 4)], axis=-1)
    minimums = np.concatenate([mid & 63, (hi >> 4) | (mid >> 6 << 4)], axis=-1)
    return scales.astype(np.float32), minimums.astype(np.float32)


# Each dequantiser maps blocks (n_blocks, bytes per block) uint8 to their values (n_blocks, values per
# block) float32, with the arithmetic of ggml's reference dequantisation (the gguf package's too), so
# the floats are the same bit for bit. "d" is a block's scale, "m" its minimum (offset), q its integers.

# Q4_0: 32 values in 18 bytes: f16 d, then 16 bytes of 4-bit q (value j in byte j's low nibble, value
# j + 16 in its high one); value = d * (q - 8)
def dequantise_q4_0(b):
    return f16(b, 0) * (nibbles(b[:, 2:18]).astype(np.int8) - 8).astype(np.float32)


# Q4_1: 32 values in 20 bytes: f16 d, f16 m, 16 bytes of 4-bit q as in Q4_0; value = d * q + m
def dequantise_q4_1(b):
    return f16(b, 0) * nibbles(b[:, 4:20]).astype(np.float32) + f16(b, 2)


# Q5_0: 32 values in 22 bytes: f16 d, a uint32 whose bit j is value j's fifth bit, 16 bytes of the low 4 bits
# as in Q4_0; value = d * (q - 16)
def dequantise_q5_0(b):
    q = nibbles(b[:, 6:22]) | fifth_bits(b[:, 2:6]) << 4
    return f16(b, 0) * (q.astype(np.int8) - 16).astype(np.float32)


# Q5_1: 32 values in 24 bytes: f16 d, f16 m, then the fifth bits and low bits as in Q5_0; value = d * q + m
def dequantise_q5_1(b):
    return f16(b, 0) * (nibbles(b[:, 8:24]) | fifth_bits(b[:, 4:8]) << 4).astype(np.float32) + f16(b, 2)


# Q8_0: 32 values in 34 bytes: f16 d, 32 int8 q; value = d * q
def dequantise_q8_0(b):
    return b[:, 2:34].view(np.int8).astype(np.float32) * f16(b, 0)


def dequantise_q4_k(b):
    """256 values in 144 bytes: f16 d, f16 dmin, 12 bytes of 8 scales and 8 minimums (k_scales), then
    128 bytes of 4-bit q in 4 runs of 32 bytes: run r's low nibbles are sub-block 2r, its high nibbles
    sub-block 2r+1 (32 values each); value = d * scale * q - dmin * minimum of its sub-block."""
    scales, minimums = k_scales(b[:, 4:16])
    runs = b[:, 16:144].reshape(-1, 4, 1, 32)
    q = np.concatenate([runs & 15, runs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    return ((f16(b, 0) * scales)[:, :, None] * q - (f16(b, 2) * minimums)[:, :, None]).reshape(-1, 256)


def dequantise_q5_k(b):
    """256 values in 176 bytes: as Q4_K (f16 d, f16 dmin, 12 bytes of scales, 128 bytes of low 4 bits at
    byte 48) with 32 bytes at byte 16 of fifth bits: bit s of byte l is value l's of sub-block s."""
    scales, minimums = k_scales(b[:, 4:16])
    runs = b[:, 48:176].reshape(-1, 4, 1, 32)
    fifth = b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None] & 1
    q = (np.concatenate([runs & 15, runs >> 4], axis=2).reshape(-1, 8, 32) | fifth << 4).astype(np.float32)
    return ((f16(b, 0) * scales)[:, :, None] * q - (f16(b, 2) * minimums)[:, :, None]).reshape(-1, 256)


def dequantise_q6_k(b):
    """256 values in 210 bytes: 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales (one per
    16 values), f16 d; value = d * scale * (q - 32). Each half of 128 values takes 64 low bytes (values
    0-63 their low nibbles, 64-127 their high ones) and 32 high bytes (bit pairs 0-1, 2-3, 4-5, 6-7 for
    values 0-31, 32-63, 64-95, 96-127)."""
    low = nibbles(b[:, :128].reshape(-1, 2, 64))
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> BIT_PAIRS[:, None] & 3).reshape(-1, 2, 128)
    q = ((low | high << 4).astype(np.int8) - 32).reshape(-1, 16, 16).astype(np.float32)
    return ((f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32))[:, :, None] * q).reshape(-1, 256)


def dequantise_q2_k(b):
    """256 values in 84 bytes: 16 bytes of a 4-bit scale (low nibble) and minimum (high nibble) per 16
    values, 64 bytes of 2-bit q, f16 d, f16 dmin. Each half of 128 values takes 32 bytes of q: bit pairs
    0-1, 2-3, 4-5, 6-7 hold values 0-31, 32-63, 64-95, 96-127; value = d * scale * q - dmin * minimum."""
    q = (b[:, 16:80].reshape(-1, 2, 1, 32) >> BIT_PAIRS[:, None] & 3).reshape(-1, 16, 16).astype(np.float32)
    scales, minimums = (b[:, :16] & 15).astype(np.float32), (b[:, :16] >> 4).astype(np.float32)
    return ((f16(b, 80) * scales)[:, :, None] * q - (f16(b, 82) * minimums)[:, :, None]).reshape(-1, 256)


def dequantise_q3_k(b):
    """256 values in 110 bytes: 32 bytes of high bits (bit s of byte l: value 32 s + l's), 64 bytes of
    low 2 bits laid out as Q2_K's, 12 bytes of 16 six-bit scales, f16 d; value = d * (scale - 32) * (q - 4),
    q the three bits. Scale i has its low 4 bits in byte i % 8 of the first 8 (low nibble for i < 8, high
    nibble after), its top 2 bits at bit 2 (i // 4) of byte 8 + i % 4."""
    low, high = b[:, 96:104], b[:, 104:108]
    scales = np.concatenate([low & 15, low >> 4], axis=-1) | (high[:, None, :] >> BIT_PAIRS[:, None] & 3).reshape(-1, 16) << 4
    low_bits = (b[:, 32:96].reshape(-1, 2, 1, 32) >> BIT_PAIRS[:, None] & 3).reshape(-1, 256)
    high_bit = (b[:, None, :32] >> np.arange(8, dtype=np.uint8)[:, None] & 1).reshape(-1, 256)
    q = ((low_bits | high_bit << 2).astype(np.int8) - 4).reshape(-1, 16, 16).astype(np.float32)
    return ((f16(b, 108) * (scales.astype(np.int8) - 32).astype(np.float32))[:, :, None] * q).reshape(-1, 256)


# IQ4_NL and IQ4_XS: 4-bit q indexing 16 levels spaced more finely near 0, where most weights are
IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


# IQ4_NL: 32 values in 18 bytes: f16 d, 16 bytes of q as in Q4_0; value = d * IQ4_LEVELS[q]
def dequantise_iq4_nl(b):
    return f16(b, 0) * IQ4_LEVELS[nibbles(b[:, 2:18])]


def dequantise_iq4_xs(b):
    """256 values in 136 bytes: f16 d, a uint16 of the top 2 bits of 8 six-bit scales (bits 2 s, 2 s + 1 for
    sub-block s), 4 bytes of their low 4 bits (sub-block 2 i in byte i's low nibble, 2 i + 1 in its high
    one), 128 bytes of q, 16 per sub-block of 32 as in Q4_0; value = d * (scale - 32) * IQ4_LEVELS[q]."""
    top = b[:, 2:4].view("<u2") >> (2 * np.arange(8, dtype=np.uint16)) & 3
    scales = np.stack([b[:, 4:8] & 15, b[:, 4:8] >> 4], axis=-1).reshape(-1, 8) | top.astype(np.uint8) << 4
    q = IQ4_LEVELS[nibbles(b[:, 8:136].reshape(-1, 8, 16))]
    return ((f16(b, 0) * (scales.astype(np.float32) - 32))[:, :, None] * q).reshape(-1, 256)


# MXFP4 (ggml's, llama.cpp's gpt-oss): 32 values in 17 bytes: an E8M0 exponent e, 16 bytes of 4-bit E2M1 codes as in Q4_0
# (the low nibbles values 0-15, the high ones 16-31); value = MXFP4_LEVELS[q] (E2M1 doubled) * 2^(e - 128), as ggml's
# kvalues_mxfp4 and GGML_E8M0_TO_FP32_HALF (a finite 2^127 at e = 255, +0 for both zero codes)
MXFP4_LEVELS = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


def dequantise_ggml_mxfp4(b):
    with np.errstate(over="ignore"):  # 12 * 2^127 is infinite, as in ggml
        return np.ldexp(np.float32(1), b[:, :1].astype(np.int32) - 128).astype(np.float32) * MXFP4_LEVELS[nibbles(b[:, 1:17])]


def dequantise_bf16(b):  # bfloat16 is the top half of a float32
    return (b.view("<u2").astype(np.uint32) << 16).view(np.float32)


# ggml's type number: (name, values per block, bytes per block, dequantiser)
GGML_TYPES = {0: ("F32", 1, 4, lambda b: b.view("<f4").astype(np.float32)),
              1: ("F16", 1, 2, lambda b: b.view("<f2").astype(np.float32)),
              30: ("BF16", 1, 2, dequantise_bf16),
              2: ("Q4_0", 32, 18, dequantise_q4_0), 3: ("Q4_1", 32, 20, dequantise_q4_1),
              6: ("Q5_0", 32, 22, dequantise_q5_0), 7: ("Q5_1", 32, 24, dequantise_q5_1),
              8: ("Q8_0", 32, 34, dequantise_q8_0), 12: ("Q4_K", 256, 144, dequantise_q4_k),
              13: ("Q5_K", 256, 176, dequantise_q5_k), 14: ("Q6_K", 256, 210, dequantise_q6_k),
              10: ("Q2_K", 256, 84, dequantise_q2_k), 11: ("Q3_K", 256, 110, dequantise_q3_k),
              20: ("IQ4_NL", 32, 18, dequantise_iq4_nl), 23: ("IQ4_XS", 256, 136, dequantise_iq4_xs),
              39: ("MXFP4", 32, 17, dequantise_ggml_mxfp4)}
GGML_UNSUPPORTED = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
                    19: "IQ1_S", 21: "IQ3_S", 22: "IQ2_S", 24: "I8", 25: "I16",
                    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0"}
GGML_TYPE_NUMBERS = {name: number for number, (name, *_) in GGML_TYPES.items()}


def read_gguf_info(path):
    """GGUF(metadata, {name: GGUFTensorInfo(type, shape, offset, nbytes)}) of a GGUF file, reading only its
    header: nothing is dequantised. metadata maps each key to a str, int, float, bool or list (arrays,
    numeric ones too, are Python lists, which checkpoints can carry); type is the block format's name
    ("Q4_K"), shape the torch shape (the file's dims reversed), offset the tensor's first byte in the
    file. Raises a one-line ValueError for anything this reader cannot read, before any tensor is."""
    with open(path, "rb") as f:
        head = f.read(4)
        refuse_lfs_pointer(path, head + f.read(len(LFS_POINTER) - 4))
        if head != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it starts with {head!r}, not b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return parse_gguf_header(path, buf)


def parse_gguf_header(path, buf):
    """read_gguf_info's work on the file's bytes `buf`."""
    pos, what = 4, "header"

    def take(n):  # the offset of the next n bytes, which must be there
        nonlocal pos
        if n > len(buf) - pos:
            raise ValueError(f"{path} is truncated: it ends inside its {what} (byte {pos} + {n} of {len(buf)}); "
                             f"download it again")
        pos += n
        return pos - n

    def number(fmt):
        return struct.unpack_from(fmt, buf, take(struct.calcsize(fmt)))[0]

    def string():
        n = number("<Q")
        at = take(n)
        try:
            return buf[at:at + n].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path} is corrupt: its {what} holds a string that is not UTF-8") from None

    def value(kind):
        if kind in GGUF_SCALARS:
            return number(GGUF_SCALARS[kind])
        if kind == GGUF_STRING:
            return string()
        if kind == GGUF_ARRAY:
            kind, count = number("<I"), number("<Q")
            if kind in GGUF_SCALARS:
                dtype = np.dtype(GGUF_SCALARS[kind])
                return np.frombuffer(buf, dtype, count, take(count * dtype.itemsize)).tolist()
            return [value(kind) for _ in range(count)]
        raise ValueError(f"{path} is corrupt: its {what} has value type {kind}, which GGUF does not define")

    version = number("<I")
    if version in (2 << 24, 3 << 24):
        raise ValueError(f"{path} is a big-endian GGUF file; this reader reads little-endian ones (most are)")
    if version not in (2, 3):
        raise ValueError(f"{path} is GGUF version {version}; this reader reads versions 2 and 3: convert it "
                         f"again with a current llama.cpp")
    n_tensors, n_keys = number("<Q"), number("<Q")
    metadata = {}
    for i in range(n_keys):
        what = f"key-value {i + 1} of {n_keys}"
        key = string()
        what = f"key-value {key!r}"
        metadata[key] = value(number("<I"))
    alignment = metadata.get("general.alignment", 32)
    if type(alignment) is not int or alignment <= 0 or alignment % 8:
        raise ValueError(f"{path} is corrupt: general.alignment is {alignment!r}, not a positive multiple of 8")
    infos = {}
    for i in range(n_tensors):
        what = f"tensor info {i + 1} of {n_tensors}"
        name = string()
        n_dims = number("<I")
        if not 1 <= n_dims <= 4:
            raise ValueError(f"{path} is corrupt or its tensor count ({n_tensors}) is wrong: {what} ({name!r}) "
                             f"has {n_dims} dims, not 1 to 4")
        dims = list(struct.unpack_from(f"<{n_dims}Q", buf, take(8 * n_dims)))
        kind, offset = number("<I"), number("<Q")
        if kind not in GGML_TYPES:
            raise ValueError(f"{path}: tensor {name} is stored as {GGML_UNSUPPORTED.get(kind, 'unknown')} (ggml type "
                             f"{kind}), a block format this reader does not read (it reads "
                             f"{', '.join(sorted(GGML_TYPE_NUMBERS))}); requantise the model to one of those")
        type_name, block_values, block_bytes, _ = GGML_TYPES[kind]
        if dims[0] % block_values:
            raise ValueError(f"{path} is corrupt: tensor {name} has rows of {dims[0]} values, not a whole number "
                             f"of {type_name} blocks ({block_values} values)")
        if name in infos:
            raise ValueError(f"{path} is corrupt: it holds two tensors named {name}")
        infos[name] = GGUFTensorInfo(type_name, tuple(reversed(dims)), offset, math.prod(dims) // block_values * block_bytes)
    data_start = -(-pos // alignment) * alignment
    data_size = len(buf) - data_start
    end = 0
    for name, info in sorted(infos.items(), key=lambda item: item[1].offset):
        if info.offset % alignment:
            raise ValueError(f"{path} is corrupt: tensor {name} starts at byte {info.offset} of its data section, "
                             f"not a multiple of its alignment ({alignment})")
        if info.offset < end or info.offset + info.nbytes > data_size:
            raise ValueError(f"{path} is truncated or its tensor shapes disagree with its data: tensor {name} ({info.type}, "
                             f"shape {list(info.shape)}) would take bytes {info.offset}..{info.offset + info.nbytes} of a "
                             f"{data_size}-byte data section, after {end} bytes taken; download it again")
        end = info.offset + info.nbytes
    if data_size >= end + alignment:
        raise ValueError(f"{path} is corrupt: its {len(infos)} tensors' shapes account for {end} bytes of its "
                         f"{data_size}-byte data section; its tensor count or shapes disagree with its data, "
                         f"or bytes were appended to it")
    return GGUF(metadata, {name: info._replace(offset=data_start + info.offset) for name, info in infos.items()})


def read_gguf(path, names=None, info=None):
    """GGUF(metadata, {name: float32 tensor}) of a GGUF file: metadata as read_gguf_info gives it, and the
    tensors (only those in the list `names`, if given) under the names the file stores
    ("blk.0.attn_q.weight"), dequantised, in the file's dims reversed (as torch and the gguf package order
    them: a matrix is (out, in)). Stored as llama.cpp's converter wrote them: q/k rows permuted for its
    rotary layout, Gemma's norms with the 1 added; undoing that is the model's mapping's job. `info`:
    read_gguf_info(path), if already read (checking a header first costs nothing then)."""
    metadata, loaders = gguf_loaders(path, info)
    missing = sorted(set(names or ()) - set(loaders))
    if missing:
        raise ValueError(f"{path} has no tensor named {', '.join(missing)}")
    return GGUF(metadata, {name: load() for name, load in loaders.items() if names is None or name in names})


def gguf_loaders(path, info=None):
    """GGUF(metadata, {name: a function dequantising that tensor}): read_gguf's tensors one at a time."""
    metadata, infos = info or read_gguf_info(path)
    data = np.memmap(path, np.uint8, mode="r")
    return GGUF(metadata, {name: functools.partial(dequantise, data, t) for name, t in infos.items()})


def dequantise(data, info, chunk=1 << 16):
    """The float32 tensor that `info` (a GGUFTensorInfo) describes in the file's bytes `data`; `chunk`
    values at a time, so that the temporaries stay in the cache."""
    _, block_values, block_bytes, dequantise_blocks = GGML_TYPES[GGML_TYPE_NUMBERS[info.type]]
    blocks = np.asarray(data[info.offset:info.offset + info.nbytes]).reshape(-1, block_bytes)
    out = np.empty((len(blocks), block_values), np.float32)
    step = max(1, chunk // block_values)
    for i in range(0, len(blocks), step):
        out[i:i + step] = dequantise_blocks(blocks[i:i + step])
    return torch.from_numpy(out).reshape(info.shape)
