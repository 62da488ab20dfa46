"""csrc/ against codebook.search_reference: the fused search returns the reference's top-k (exact
ties aside, which it breaks towards the lower code id), follows the NaN rule both share, and a
training step through it equals one through the torch path. CODEBOOK_EXT=0 skips the tests that
need the extension (saying so); otherwise a failed build fails them."""
import math
import os
import platform
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import codebook as cb
from conftest import ROOT
from csrc import dispatch, loader

SIMS = ("cosine", "euclidean")


@pytest.fixture(scope="module")
def ext():
    if os.environ.get("CODEBOOK_EXT") == "0":
        pytest.skip("CODEBOOK_EXT=0: the csrc extension is switched off")
    extension = loader.load_extension()
    assert extension is not None, "the csrc extension did not build (see the warning above)"
    return extension


def check(x, book, k, similarity, got, atol=1e-4):
    """got == the reference top-k: the same k best scores best first, each id really scoring what
    is returned, distinct ids, and the reference's very ids wherever its ranking has no near-tie."""
    scores, ids = got
    H, N, C = book.shape[0], x.shape[1], book.shape[1]
    assert scores.shape == ids.shape == (H, N, k) and scores.dtype == torch.float32 and ids.dtype == torch.long
    if N == 0:
        return
    full = cb.code_scores(x.float(), book.float(), similarity)
    want = full.topk(min(k + 1, C), dim=-1)
    torch.testing.assert_close(scores, want.values[..., :k], atol=atol, rtol=1e-5)
    torch.testing.assert_close(full.gather(-1, ids), scores, atol=atol, rtol=1e-5)
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all() and ids.min() >= 0 and ids.max() < C
    v = want.values
    gap_before = torch.cat([v.new_full((H, N, 1), math.inf), v[..., :-1]], -1) - v
    gap_after = v - torch.cat([v[..., 1:], v.new_full((H, N, 1), -math.inf)], -1)
    clear = ((gap_before > 10 * atol) & (gap_after > 10 * atol))[..., :k]
    assert torch.equal(ids[clear], want.indices[..., :k][clear])


def data(heads, tokens, codes, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(heads, tokens, d, generator=g), torch.randn(heads, codes, d, generator=g)


@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("heads,tokens,codes,d,k", [
    (1, 1, 1, 1, 1),          # one of everything
    (2, 5, 7, 3, 7),          # k = number of codes
    (3, 257, 1025, 17, 5),    # past one block of rows and two tiles of codes, odd sizes
    (1, 300, 700, 64, 64),    # the largest k the CUDA kernel keeps
    (2, 40, 300, 8, 100),     # k above that, CPU only
    (1, 64, 5000, 32, 1),
    (2, 0, 10, 4, 3),         # no tokens
])
def test_equals_reference(ext, similarity, heads, tokens, codes, d, k):
    x, book = data(heads, tokens, codes, d)
    check(x, book, k, similarity, ext.topk_codes(x, book, k, similarity))


@pytest.mark.parametrize("similarity", SIMS)
def test_exact_ties_go_to_the_lower_id(ext, similarity):
    """Integer queries and +-1 codes of norm 4: every score is exact, many tie (copies of a code
    and distinct codes alike), and the order is score first, then the lower id."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (2, 50, 16), generator=g).float()
    book = (torch.randint(0, 2, (2, 6, 16), generator=g) * 2 - 1).float().repeat(1, 4, 1)  # c, c + 6, ... equal
    scores, ids = ext.topk_codes(x, book, 8, similarity)
    check(x, book, 8, similarity, (scores, ids))
    full = cb.code_scores(x, book, similarity)
    order = torch.sort(full, dim=-1, descending=True, stable=True).indices[..., :8]  # ties keep id order
    assert torch.equal(ids, order)
    same = torch.ones(1, 9, 4)  # all codes equal: ids 0..k-1 in order
    assert torch.equal(ext.topk_codes(x[:1, :3, :4], same, 5, similarity)[1], torch.arange(5).expand(1, 3, 5))


@pytest.mark.parametrize("similarity", SIMS)
def test_queries_equal_to_codes(ext, similarity):
    _, book = data(2, 0, 300, 32)
    x = book[:, :100] * 1.0  # every query is a code: cosine and euclidean both rank it first
    scores, ids = ext.topk_codes(x, book, 3, similarity)
    check(x, book, 3, similarity, (scores, ids), atol=1e-2)  # euclidean: -sqrt of a rounding error near 0
    assert torch.equal(ids[..., 0], torch.arange(100).expand(2, 100))


def test_non_contiguous_inputs_and_other_dtypes(ext):
    x, book = data(3, 200, 150, 24)
    layer_view = x.transpose(0, 1).contiguous().transpose(0, 1)  # (heads, tokens, d) view of (tokens, heads, d)
    strided = torch.randn(3, 200, 48)[..., ::2]
    book_t = book.transpose(1, 2).contiguous().transpose(1, 2)
    for similarity in SIMS:
        for q, b in [(layer_view, book), (strided, book_t), (x[:, ::3], book[:, 1::2])]:
            assert not (q.is_contiguous() and b.is_contiguous())
            check(q, b, 4, similarity, ext.topk_codes(q, b, 4, similarity))
        for dtype in (torch.float64, torch.bfloat16):  # computed in float32
            q, b = x.to(dtype), book.to(dtype)
            check(q, b, 4, similarity, ext.topk_codes(q, b, 4, similarity))


@pytest.mark.parametrize("similarity", SIMS)
def test_nan_and_inf_follow_the_documented_rule(ext, similarity):
    """A NaN score counts as -inf (both paths): a NaN query row gets codes 0..k-1 at -inf, a code
    with a NaN or inf coordinate is never chosen while real scores remain."""
    x, book = data(1, 6, 40, 8)
    x[0, 0, 3] = math.nan
    x[0, 1, 0] = math.inf
    x[0, 2, :] = -math.inf
    book[0, 5, 2] = math.nan
    book[0, 7, 1] = math.inf
    book[0, 9, 0] = -math.inf
    scores, ids = ext.topk_codes(x, book, 4, similarity)
    check(x, book, 4, similarity, (scores, ids))
    ref_scores, _ = cb.search_reference(x, book, 4, similarity)
    assert not scores.isnan().any() and not ref_scores.isnan().any()
    assert (scores[0, 0] == -math.inf).all() and torch.equal(ids[0, 0], torch.arange(4))
    assert not torch.isin(ids[0, 3:], torch.tensor([5, 7, 9])).any()  # the finite rows never pick them
    if similarity == "cosine":  # x = (inf, ...): every code with c_0 > 0 scores +inf; lowest ids first
        positive = (book[0, :, 0] > 0).nonzero().flatten()
        positive = positive[~torch.isin(positive, torch.tensor([5, 7]))][:4]
        assert (scores[0, 1] == math.inf).all() and torch.equal(ids[0, 1], positive)


def test_argument_errors(ext):
    x, book = data(2, 5, 7, 3)
    with pytest.raises(RuntimeError, match="k=8"):
        ext.topk_codes(x, book, 8, "cosine")
    with pytest.raises(RuntimeError, match="similarity"):
        ext.topk_codes(x, book, 2, "dot")
    with pytest.raises(RuntimeError, match="disagree"):
        ext.topk_codes(x[:1], book, 2, "cosine")


def test_topk_codes_uses_the_extension(ext, monkeypatch):
    calls = []
    real = ext.topk_codes
    monkeypatch.setattr(ext, "topk_codes", lambda *args: calls.append(args[2:]) or real(*args))
    x, book = data(2, 30, 50, 8)
    got = cb.topk_codes(x, book, 3, "euclidean")
    assert calls == [(3, "euclidean")]
    check(x, book, 3, "euclidean", got)
    cb.topk_codes(x, book, 3, disabled=torch.zeros(2, 50, dtype=torch.bool))  # disabled codes: torch path
    assert len(calls) == 1


def test_training_step_equals_the_torch_path(ext, monkeypatch):
    """One forward + backward of the GPT with per-head attention and MLP codebooks: the same loss
    and gradients whether the search runs in csrc/ or in torch."""
    def step(mode):
        monkeypatch.setenv("CODEBOOK_EXT", mode)
        torch.manual_seed(0)
        model = cb.GPT(cb.GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=4, d_model=32, d_mlp=64, codebooks={
            "attn": dict(num_codes=50, k=2), "mlp": dict(num_codes=40, k=1, similarity="euclidean")}))
        idx = torch.randint(0, 11, (4, 16), generator=torch.Generator().manual_seed(1))
        logits = model(idx)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 11), idx[:, 1:].reshape(-1)) + model.codebook_loss()
        loss.backward()
        ids = [layer.last_ids for layer in model.codebook_layers().values()]
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, ids

    calls = []
    real = ext.topk_codes
    monkeypatch.setattr(ext, "topk_codes", lambda *args: calls.append(1) or real(*args))
    loss_ext, grads_ext, ids_ext = step("1")
    assert len(calls) == 4  # 2 layers x (attention + MLP): the extension did the searching
    loss_torch, grads_torch, ids_torch = step("0")
    assert len(calls) == 4
    assert all(torch.equal(a, b) for a, b in zip(ids_ext, ids_torch))
    torch.testing.assert_close(loss_ext, loss_torch, atol=1e-6, rtol=1e-6)
    for name, g in grads_torch.items():
        torch.testing.assert_close(grads_ext[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_blas_engine_equals_reference(ext):
    """Without AVX-512 the CPU op multiplies BLAS tiles instead of running its micro-kernel. Build
    that engine as well (a second extension, cached like the first) and check it the same way."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("-mno-avx512f is an x86 flag; elsewhere the main build is the BLAS engine")
    script = ("import sys, torch, codebook as cb\n"
              "from csrc import loader\n"
              "from torch.utils.cpp_extension import load\n"
              "load('codebook_search_blas', [loader.HERE + '/search.cpp'], extra_cflags=['-O3', '-fopenmp', '-mno-avx512f'],\n"
              "     extra_ldflags=['-fopenmp'], is_python_module=False)\n"
              "sys.path.insert(0, 'tests')\n"
              "from test_extension import check, data\n"
              "for sim in ('cosine', 'euclidean'):\n"
              "    for h, n, c, d, k in [(3, 257, 1025, 17, 5), (1, 300, 700, 64, 64), (2, 5, 7, 3, 7)]:\n"
              "        x, book = data(h, n, c, d)\n"
              "        x[0, 0, 0] = float('nan')\n"
              "        check(x, book, k, sim, torch.ops.codebook.topk_codes(x, book, k, sim))\n"
              "print('blas engine ok')\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=os.environ | {"CODEBOOK_EXT": "0"})
    assert out.returncode == 0 and "blas engine ok" in out.stdout, out.stderr[-3000:]


def test_a_build_killed_half_way_holds_no_one_up(tmp_path, capsys):
    """torch waits on its build lock while the file exists; one left by a killed build is removed once
    old, and the wait is said."""
    lock = tmp_path / "lock"
    lock.write_text("")
    os.utime(lock, (time.time() - 700, time.time() - 700))
    loader.clear_stale_lock(str(lock))
    assert not lock.exists()
    lock.write_text("")  # a build under way: waited for until it is old
    started = time.time()
    loader.clear_stale_lock(str(lock), after=1.5)
    assert not lock.exists() and time.time() - started >= 1
    assert "waiting for another process's build of the code search extension" in capsys.readouterr().out
    loader.clear_stale_lock(str(lock))  # no lock: nothing to wait for
    assert capsys.readouterr().out == ""


def test_the_codebook_ext_switch(monkeypatch):
    """CODEBOOK_EXT=0 never builds csrc/ and searches in torch, with the same results; when the
    build fails, 1 raises and unset warns once, in one line, and searches in torch."""
    def broken():
        raise OSError("no compiler\nsecond line")
    monkeypatch.setattr(loader, "build_extension", broken)
    monkeypatch.setattr(loader, "_extension", None)
    x, book = data(1, 4, 6, 3)
    monkeypatch.setenv("CODEBOOK_EXT", "0")
    scores, ids = cb.topk_codes(x, book, 2)
    reference = cb.search_reference(x, book, 2)
    assert torch.equal(scores, reference.values) and torch.equal(ids, reference.indices)
    assert loader.load_extension() is None and loader._extension is None  # a build was never tried
    monkeypatch.setenv("CODEBOOK_EXT", "1")
    with pytest.raises(RuntimeError, match="CODEBOOK_EXT=1 but the csrc extension failed to build"):
        loader.load_extension()
    monkeypatch.delenv("CODEBOOK_EXT")
    with pytest.warns(UserWarning, match="OSError: no compiler\\); using the torch code search") as record:
        got = cb.topk_codes(x, book, 2)
        cb.topk_codes(x, book, 2)
    ours = [w for w in record if "csrc" in str(w.message)]
    assert len(ours) == 1 and "second line" not in str(ours[0].message)
    check(x, book, 2, "cosine", got)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: its build is loaded, and a second, CPU-only "
                    "build of the same operators cannot load beside it")
def test_a_cuda_kernel_that_does_not_build_leaves_the_cpu_search(monkeypatch):
    def cuda_fails(cuda):
        if cuda:
            raise RuntimeError("nvcc: unsupported toolkit\nmore")
        return built(cuda)
    built = loader.build
    monkeypatch.setattr(loader, "build", cuda_fails)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("torch.utils.cpp_extension.CUDA_HOME", "/usr/local/cuda")
    monkeypatch.delenv("CODEBOOK_EXT", raising=False)
    with pytest.warns(UserWarning, match=r"CUDA kernel of csrc/ did not build \(RuntimeError: nvcc: unsupported toolkit\)"):
        ext = loader.build_extension()
    x, book = data(1, 4, 6, 3)
    assert ext.supports(x, 2) and ext.supports(x, 256) and not ext.supports(x, 257) and not ext.supports(x.to("meta"), 2)
    check(x, book, 2, "cosine", ext.topk_codes(x, book, 2, "cosine"))
    monkeypatch.setenv("CODEBOOK_EXT", "1")
    with pytest.raises(RuntimeError, match="unsupported toolkit"):
        loader.build_extension()


def test_the_cuda_kernel_is_used_only_where_its_shared_memory_fits():
    # 65 KiB a block: V100 (7.0) and Xavier (7.2) give up to 96 KiB, A100 on 99 KiB or more; T4 (7.5) 64, P100 (6.0) 48
    fits = {(6, 0): False, (6, 1): False, (7, 0): True, (7, 2): True, (7, 5): False, (8, 0): True, (8, 6): True,
            (8, 9): True, (9, 0): True, (12, 0): True}
    assert {capability: loader.kernel_fits(capability) for capability in fits} == fits


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the CUDA kernel did not run")


@needs_cuda
@pytest.mark.parametrize("similarity", SIMS)
def test_cuda_kernel_equals_reference(ext, similarity):
    if not loader.kernel_fits(torch.cuda.get_device_capability()):
        pytest.skip("this GPU gives a block less shared memory than the kernel needs: the torch search runs on it")
    for heads, tokens, codes, d, k in [(1, 1, 1, 1, 1), (3, 257, 1025, 17, 5), (2, 300, 700, 64, 64),
                                       (16, 1000, 10000, 64, 8), (2, 100, 70, 200, 33)]:
        x, book = data(heads, tokens, codes, d)
        got = ext.topk_codes(x.cuda(), book.cuda(), k, similarity)
        check(x, book, k, similarity, tuple(t.cpu() for t in got))
        got = cb.topk_codes(x.cuda(), book.cuda(), k, similarity)  # the auto path
        check(x, book, k, similarity, tuple(t.cpu() for t in got))
    x, book = data(1, 6, 40, 8)
    x[0, 0, 3], book[0, 5, 2] = math.nan, math.inf
    got = ext.topk_codes(x.cuda(), book.cuda(), 4, similarity)
    check(x, book, 4, similarity, tuple(t.cpu() for t in got))
    assert torch.equal(got[1][0, 0].cpu(), torch.arange(4))
    layer_view = x.transpose(0, 1).contiguous().transpose(0, 1)
    check(x, book, 4, similarity, tuple(t.cpu() for t in ext.topk_codes(layer_view.cuda(), book.cuda(), 4, similarity)))
    assert not ext.supports(x.cuda(), 65) and ext.supports(x.cuda(), 64)
    with pytest.raises(RuntimeError, match="at most k=64 codes per row, got k=65"):  # a one-line error, no crash
        ext.topk_codes(x.cuda(), book.cuda(), 65, similarity)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: csrc/gpu_check.sh would run every stage")
def test_the_gpu_check_without_a_gpu_says_so_and_succeeds(tmp_path):
    done = subprocess.run(["bash", os.path.join(ROOT, "csrc", "gpu_check.sh"), str(tmp_path)], capture_output=True,
                          text=True, env=os.environ | {"PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"gpu_check: {sys.executable}'s torch sees no CUDA device; nothing to check"
    assert (tmp_path / "gpu_check.log").read_text() == done.stdout and not (tmp_path / "summary.txt").exists()


@needs_cuda
def test_a_cuda_training_step_equals_the_cpu_one_and_bf16_autocast_keeps_its_codes(ext):
    """One forward + backward of the GPT with per-head attention and MLP codebooks on the GPU (the
    kernel searching) against the CPU: the same codes, loss and gradients; under bf16 autocast
    mostly the same codes (a search on garbage would share ~k / num_codes of them) and loss."""
    def step(device, autocast=False):
        torch.manual_seed(0)
        model = cb.GPT(cb.GPTConfig(vocab_size=11, block_size=64, n_layer=2, n_head=4, d_model=64, d_mlp=128, codebooks={
            "attn": dict(num_codes=500, k=8), "mlp": dict(num_codes=300, k=1, similarity="euclidean")})).to(device)
        idx = torch.randint(0, 11, (2, 32), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(idx)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, 11), idx[:, 1:].reshape(-1)) + model.codebook_loss()
        loss.backward()
        ids = [layer.last_ids.cpu() for layer in model.codebook_layers().values()]
        return loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}, ids

    calls = []
    real = ext.topk_codes
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ext, "topk_codes", lambda *args: calls.append(args[0].device.type) or real(*args))
        loss_gpu, grads_gpu, ids_gpu = step("cuda")
        loss_cpu, grads_cpu, ids_cpu = step("cpu")
        loss_bf16, grads_bf16, ids_bf16 = step("cuda", autocast=True)
    assert calls == ["cuda"] * 4 + ["cpu"] * 4 + ["cuda"] * 4  # 2 layers x (attention + MLP): the kernel searched
    # the same k codes at every position (here the k-th best beats the next by far more than float32 rounding);
    # their order, which the mean does not depend on, may differ where two scores are within rounding
    assert all(torch.equal(a.sort(-1).values, b.sort(-1).values) for a, b in zip(ids_gpu, ids_cpu))
    torch.testing.assert_close(loss_gpu, loss_cpu, atol=1e-5, rtol=1e-5)
    for name, g in grads_cpu.items():
        torch.testing.assert_close(grads_gpu[name], g, atol=1e-5, rtol=1e-4, msg=name)
    shared = torch.cat([(a[..., None] == b[..., None, :]).any(-1).flatten() for a, b in zip(ids_bf16, ids_gpu)]).float().mean()
    assert shared >= 0.5, f"{shared:.1%} of the codes chosen under bf16 autocast are among the float32 ones"
    assert abs(loss_bf16 - loss_gpu) <= 0.05 * loss_gpu and all(g.isfinite().all() for g in grads_bf16.values())


@pytest.mark.parametrize("similarity", SIMS)
def test_every_search_dispatch_runs_equals_the_full_top_k(similarity, monkeypatch):
    """dispatch.topk_codes without the extension, by impl "reference", "chunked" (5000 codes: two tiles) and
    "auto" over a score matrix above SCORE_MATRIX_BYTES (the tiled search): torch's top-k of the full matrix
    of scores computed independently (the query times the unit code, minus the euclidean distance)."""
    monkeypatch.setenv("CODEBOOK_EXT", "0")
    x, book = data(2, 30, 5000, 8)
    k = 6
    full = x @ F.normalize(book, dim=-1).transpose(1, 2) if similarity == "cosine" else -torch.cdist(x, book)
    want = full.topk(k, dim=-1)
    monkeypatch.setattr(dispatch, "SCORE_MATRIX_BYTES", 2 * 30 * 5000 * 4 - 1)
    for impl in ("reference", "chunked", "auto"):
        scores, ids = dispatch.topk_codes(x, book, k, similarity, impl=impl)
        torch.testing.assert_close(scores, want.values, atol=1e-4, rtol=1e-5, msg=impl)
        torch.testing.assert_close(full.gather(-1, ids), want.values, atol=1e-4, rtol=1e-5, msg=impl)
        check(x, book, k, similarity, (scores, ids))


def test_auto_materialises_the_score_matrix_only_within_its_bound(monkeypatch):
    """impl="auto" without the extension: the reference search while the heads x tokens x codes float32 scores
    fit in SCORE_MATRIX_BYTES (256 MiB), the tiled one beyond (the searches are spies here: nothing runs)."""
    monkeypatch.setenv("CODEBOOK_EXT", "0")
    calls = []
    monkeypatch.setattr(cb, "search_reference", lambda *args: calls.append("reference"))
    monkeypatch.setattr(dispatch, "search_chunked", lambda *args: calls.append("chunked"))
    assert dispatch.SCORE_MATRIX_BYTES == 256 * 2**20
    for heads, tokens, codes in [(1, 2**14, 2**12), (1, 2**14, 2**12 + 1), (2, 2**13, 2**12), (2, 2**13, 2**12 + 1)]:
        dispatch.topk_codes(torch.empty(heads, tokens, 1), torch.empty(heads, codes, 1), 1)
    assert calls == ["reference", "chunked", "reference", "chunked"]


def test_auto_gives_the_extension_only_the_k_it_supports(ext, monkeypatch):
    """On the CPU the extension keeps at most 256 codes per query: a larger k is searched in torch."""
    calls = []
    real = ext.topk_codes
    monkeypatch.setattr(ext, "topk_codes", lambda *args: calls.append(args[2]) or real(*args))
    x, book = data(1, 5, 300, 4)
    for k in (256, 257):
        check(x, book, k, "cosine", cb.topk_codes(x, book, k))
    assert calls == [256]
