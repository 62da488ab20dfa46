"""
Weight files read by hand, so that no package is needed at run time: safetensors (and PyTorch's
.bin through torch.load(weights_only=True)).
"""
import json
import os

import numpy as np
import torch

import runs

# ------------------------------------------------------------------------------------------------
# safetensors: safetensors: 8 bytes little-endian header length n, n bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the tensors' raw little-endian bytes.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} of a .safetensors file; a ValueError names what is wrong with a bad one."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} is corrupt: its header is not JSON; download it again") from None
        data = np.fromfile(f, dtype=np.uint8)
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
        raw = torch.from_numpy(data[begin:end].copy())  # a copy: aligned, and the file's buffer can go
        tensors[name] = raw.view(dtype).reshape(entry["shape"])
    return tensors


def read_weights(folder):
    """{name: tensor} from model.safetensors (or its shards) or pytorch_model.bin in `folder`."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return read_safetensors(os.path.join(folder, "model.safetensors"))
    if os.path.isfile(index):
        shards = sorted(set(json.load(open(index))["weight_map"].values()))
        return {name: t for shard in shards for name, t in read_safetensors(os.path.join(folder, shard)).items()}
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return runs.load_torch_file(os.path.join(folder, "pytorch_model.bin"), "download it again")
    raise ValueError(f"{folder} holds no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin")
