"""Loading the fused code search of this folder: compiled on first use with torch's JIT build
(cached by torch in ~/.cache/torch_extensions, rebuilt when a source changes).

CODEBOOK_EXT decides: unset, the extension if it builds, else one warning and the torch search
(same results); 0, never build it; 1, the extension must build, or the search raises."""
import contextlib
import hashlib
import os
import platform
import time
import types
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
_extension = None  # the loaded extension, False once its build failed


def load_extension():
    """The extension (with .supports(x, k) and .topk_codes(x, codebook, k, similarity)), or None
    when it is switched off or failed to build."""
    global _extension
    mode = os.environ.get("CODEBOOK_EXT", "")
    if mode == "0":
        return None
    if _extension is None:
        try:
            _extension = build_extension()
        except Exception as e:  # a missing compiler must not stop anyone: fall back, loudly
            if mode == "1":
                raise RuntimeError(f"CODEBOOK_EXT=1 but the csrc extension failed to build: {e}") from e
            warnings.warn(f"csrc extension unavailable ({type(e).__name__}: {first_line(e)}); "
                          "using the torch code search (same results)")
            _extension = False
    return _extension or None


def build_extension():
    """The extension with the CUDA kernel where there are a CUDA torch and toolkit; if the kernel does
    not build, the CPU search alone, with a warning (CODEBOOK_EXT=1: the error)."""
    from torch.utils.cpp_extension import CUDA_HOME
    cuda = torch.cuda.is_available() and CUDA_HOME is not None
    try:
        return build(cuda)
    except Exception as e:
        if not cuda or os.environ.get("CODEBOOK_EXT") == "1":
            raise
        warnings.warn(f"the CUDA kernel of csrc/ did not build ({type(e).__name__}: {first_line(e)}); "
                      "building the CPU search alone")
        return build(False)


def first_line(error):
    return (str(error).strip().splitlines() or [""])[0]


def build(cuda):
    """The JIT build adds no optimisation or OpenMP flags by itself: without them the C++ loops
    run ~70x slower, on one thread."""
    from torch.utils.cpp_extension import _get_build_directory, load
    sources = ["search.cpp"] + (["search.cu", "search_cuda.cpp"] if cuda else [])
    native = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []  # AVX-512/AVX2 compares
    name = f"codebook_search_{machine_key(cuda)}"
    clear_stale_lock(os.path.join(_get_build_directory(name, False), "lock"))
    load(name, [os.path.join(HERE, s) for s in sources], extra_cflags=["-O3", "-fopenmp", *native],
         extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3"], is_python_module=False)
    # the CUDA kernel keeps at most 64 codes per row; the CPU one inserts each of the first k codes in O(k),
    # slower than torch's top-k for a large k
    return types.SimpleNamespace(
        supports=lambda x, k: (x.device.type == "cpu" and k <= 256) or (cuda and x.device.type == "cuda" and k <= 64
                                                                     and kernel_fits(torch.cuda.get_device_capability(x.device))),
        topk_codes=torch.ops.codebook.topk_codes)


def machine_key(cuda):
    """torch keys its build cache on the sources and flags alone: a build for this CPU's instructions
    (-march=native) and this GPU's architecture gets a folder of its own, so a cache shared between
    machines (a network home, a container image) never hands one of them another's build."""
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("flags")), "")
    gpu = str(torch.cuda.get_device_capability()) if cuda else ""
    return hashlib.sha1(f"{platform.machine()} {cpu} {gpu}".encode()).hexdigest()[:10]


def clear_stale_lock(lock, after=600):
    """Wait while another process builds the extension; remove the lock of a build killed half-way
    (older than `after` seconds), on which torch would wait forever."""
    with contextlib.suppress(FileNotFoundError):  # no lock, or it was released
        age = time.time() - os.path.getmtime(lock)
        if age < after:
            print(f"waiting for another process's build of the code search extension (its lock {lock} is "
                  f"{age:.0f} s old; a build killed half-way leaves it, and it is removed at {after} s)", flush=True)
        while time.time() - os.path.getmtime(lock) < after:
            time.sleep(1)
        os.remove(lock)


def kernel_fits(capability):
    """Whether a GPU of this compute capability gives a block the kernel's 65 KiB of shared memory
    (search.cu's Shared): sm_70 and sm_72 up to 96 KiB, sm_80 on 99 KiB or more; sm_75 (T4, RTX 20xx)
    64 KiB and older GPUs 48 KiB, where the torch search runs instead."""
    major, minor = capability
    return major >= 8 or (major == 7 and minor < 5)
