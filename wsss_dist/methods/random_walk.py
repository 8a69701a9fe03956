"""Random walk of class scores on a pixel-affinity graph (psa, notes §4.8).

psa builds a dense n×n affinity matrix A (n = h·w feature pixels) with
a_ij = exp(-mean_d |f_i - f_j|) for pixel pairs closer than ``radius``
(dy² + dx² < radius²), 1 on the diagonal, raises it to the power beta, normalises the
columns (T = A / Σ_i A_ij) and squares T ``logt`` times: scores · T^(2^logt).

Here the same operator is applied as a sparse stencil. Each column of T has only
K = 2·P + 1 non-zeros (P half-plane offsets, their mirror images and the pixel
itself; K = 69 for radius 5), so one step of v ← v · T is

    v'[c, j] = Σ_k W_k[j] · v[c, j + o_k],    W_k[j] = A(j, j + o_k)^β / Σ_k' A(j, j + o_k')^β

and 2^logt such steps equal the dense matrix power. Memory is O(K·n + C·n) instead of
O(n²), time O(2^logt · K · C · n) instead of O(logt · n³). Pairs that leave the map do
not exist (weight 0), exactly as in the dense matrix. Score channels that are zero
everywhere stay zero under a linear map and are not walked (CAM stacks usually hold
only a few non-zero classes).

The stencil runs on a flat, zero-padded copy of v with padded row width w + 2(r-1), so
every shift is a contiguous slice and a step is K fused multiply-adds (``addcmul_``)
over [C, h·(w + 2(r-1))], all preallocated. Nothing is looped over pixels.

Backends (``backend=``): "torch" is the step above in eager PyTorch (any device; the
reference in tests). "native" is a small C++ kernel (``random_walk_kernel.cpp``) that builds
the stencil (affinities read from the features in place, mirrored, normalised) and runs
all 2^logt steps in one call, with the walk's sum in the same order as "torch" (the
affinities' Σ_d runs in another order: float32 results differ by ~1e-6). Tiles of 32
pixels × up to 4 channels stay in registers across the K offsets; ``torch.get_num_threads()``
threads each take a share of the channels (≥ 2 channels per thread: independent walks, no
synchronisation) or else a range of tiles with one barrier per step (it spins briefly,
then sleeps, so on a busy machine waiting threads do not steal the time of the one they
wait for).
It replaces ~17,600 small eager calls per image (256 steps × 69 offsets) whose fixed
dispatch cost dominated. The kernel is compiled with the system C++ compiler on first
use (a few seconds, once per source and CPU model: the library is cached under
$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions) and loaded with ctypes once per
process; no torch headers are needed. "auto" (default) takes "native" for CPU tensors
when it builds and loads, else "torch" (accelerator tensors always use "torch").

Pair set: every in-bounds pair closer than ``radius``, in both directions. (psa's own
index helper only takes *sources* in rows [0, h-r+1) and columns [r-1, w-r+1), so its
dense matrix also lacks some in-bounds pairs whose source lies in that border band;
this module, its dense reference and the DESIGN contract use the full in-bounds set.)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from wsss_dist.methods.affinity import affinity_offsets

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 2**19  # feature values per pass when computing affinities (cache-sized)
_BACKENDS = ("auto", "native", "torch")
_NATIVE_MIN_WORK = 2**16  # C·m·K below this: one thread (a parallel region costs more than it saves)

_KERNEL_FILE = "random_walk_kernel.cpp"  # the native walk's C++, next to this file (package data)
# Tried in order; the first set that compiles is used (the second: no CPU-specific code).
_COMPILE_FLAGS = (
    ("-O3", "-march=native", "-pthread"),
    ("-O3", "-pthread"),
)


def _check_inputs(scores: torch.Tensor, features: torch.Tensor) -> None:
    """Validate shapes of scores [C, h, w] and features [D, h, w]."""
    if scores.dim() != 3 or features.dim() != 3:
        raise ValueError(
            f"need scores [C, h, w] and features [D, h, w]; got {tuple(scores.shape)}, "
            f"{tuple(features.shape)}"
        )
    if scores.shape[-2:] != features.shape[-2:]:
        raise ValueError(f"scores {tuple(scores.shape)} and features {tuple(features.shape)} differ in h, w")


def _compute_dtype(scores: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, else float32."""
    return torch.float64 if scores.dtype == torch.float64 else torch.float32


def _half_plane_affinity(
    features: torch.Tensor, radius: int, beta: float
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """A^β for each half-plane offset o at every source j with j + o in the map → [P, h, w] (0 elsewhere)."""
    offsets = affinity_offsets(radius)
    d, h, w = features.shape
    aff = features.new_zeros(len(offsets), h, w)
    chunk = max(1, _CHUNK_ELEMENTS // (h * w))
    for p, (dy, dx) in enumerate(offsets):
        ys, yt = slice(0, h - dy), slice(dy, h)
        xs, xt = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w + min(0, dx))
        if ys.stop <= 0 or xs.stop <= xs.start:
            continue
        dist = aff[p, ys, xs]
        for c in range(0, d, chunk):  # channel chunks stay in cache: ~2x faster than one pass
            part = features[c : c + chunk]
            dist += (part[:, ys, xs] - part[:, yt, xt]).abs_().sum(0)
        torch.exp(dist.mul_(-beta / d), out=dist)  # exp(-mean_d |Δf|)^β = exp(-β mean_d |Δf|)
    return offsets, aff


def _transition_stencil(
    features: torch.Tensor, radius: int, beta: float
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Offsets o_k (self, half plane, mirrored half plane) and W_k [K, h, w] = column k of T."""
    half, aff = _half_plane_affinity(features, radius, beta)
    return _stencil_from_half(half, aff)


def _stencil_from_half(
    half: list[tuple[int, int]], aff: torch.Tensor
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Offsets o_k and W_k [K, h, w] from A^β [P, h, w] stored at each pair's source (0 where the target is outside)."""
    _, h, w = aff.shape
    mirrored = torch.zeros_like(aff)
    for p, (dy, dx) in enumerate(half):
        # A(j, j - o) = A(j - o, j): the value stored at source j - o, moved to j.
        if dy < h and abs(dx) < w:
            mirrored[p, dy:, max(0, dx) : w + min(0, dx)] = aff[p, : h - dy, max(0, -dx) : w - max(0, dx)]
    offsets = [(0, 0)] + half + [(-dy, -dx) for dy, dx in half]
    stencil = torch.cat([torch.ones_like(aff[:1]), aff, mirrored])
    stencil /= stencil.sum(0, keepdim=True)  # ≥ 1 thanks to the self loop
    return offsets, stencil


def _walk(
    v: torch.Tensor, stencil: torch.Tensor, offsets: list[tuple[int, int]], steps: int, pad: int
) -> torch.Tensor:
    """Apply v ← Σ_k W_k · shift_k(v) ``steps`` times; v [C, h, w], stencil [K, h, w]."""
    c, h, w = v.shape
    wp = w + 2 * pad  # padded row width
    m = h * wp  # interior rows incl. their pad columns
    base = pad * wp + pad  # flat index of (row pad, col 0) after `pad` leading elements
    length = (h + 2 * pad) * wp + 2 * pad
    weights = F.pad(stencil, (pad, pad)).reshape(len(offsets), m)  # 0 on pad columns
    bufs = [v.new_zeros(c, length), v.new_zeros(c, length)]
    bufs[0][:, base : base + m].view(c, h, wp)[:, :, pad : pad + w] = v
    shifts = [dy * wp + dx for dy, dx in offsets]
    plans = []
    for src, dst in ((bufs[0], bufs[1]), (bufs[1], bufs[0])):
        terms = [(src[:, base + s : base + s + m], weights[k]) for k, s in enumerate(shifts)]
        out = dst[:, base : base + m]
        plans.append((out, out.addcmul_, terms[0], terms[1:]))
    for step in range(steps):  # the hot loop: K in-place multiply-adds per step
        out, addcmul_, (src0, w0), rest = plans[step % 2]
        torch.mul(src0, w0, out=out)
        for src, wk in rest:
            addcmul_(src, wk)
    final = bufs[steps % 2][:, base : base + m].view(c, h, wp)[:, :, pad : pad + w]
    return final.contiguous()


def _cpu_signature() -> str:
    """Text that differs between CPU models (their flags), so -march=native builds are not shared across them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    """Where compiled kernels are kept: $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions, then /wsss_dist."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return Path(root) / "wsss_dist"


def _kernel_path() -> Path:
    """The native walk's C++ source, shipped next to this module."""
    return Path(__file__).with_name(_KERNEL_FILE)


def _build_kernel(cxx: str, out: Path) -> bool:
    """Compile ``random_walk_kernel.cpp`` into the shared library ``out`` (atomically); False if no flag set works."""
    out.parent.mkdir(parents=True, exist_ok=True)
    src = _kernel_path()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        for flags in _COMPILE_FLAGS:
            lib = Path(tmp) / "kernel.so"
            cmd = [cxx, *flags, "-std=c++17", "-shared", "-fPIC", str(src), "-o", str(lib)]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
            except (OSError, subprocess.TimeoutExpired) as err:
                logger.debug("random walk kernel: %s failed: %s", " ".join(cmd), err)
                continue
            if res.returncode == 0:
                os.replace(lib, out)  # atomic: concurrent builders (ranks) each rename a complete file
                logger.debug("random walk kernel built with %s", " ".join(flags))
                return True
            logger.debug("random walk kernel: %s failed:\n%s", " ".join(cmd), res.stderr[-2000:])
    return False


@functools.cache
def _native_library() -> ctypes.CDLL | None:
    """The compiled native walk (built on first use, once per process), or None where it cannot be built or loaded."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        logger.info("random walk: no C++ compiler found, using the PyTorch walk")
        return None
    try:
        key = hashlib.sha256("\0".join([_kernel_path().read_text(), repr(_COMPILE_FLAGS), cxx, platform.machine(),
                                         _cpu_signature()]).encode()).hexdigest()[:16]
        path = _cache_dir() / f"random_walk_{key}.so"
        if not path.exists() and not _build_kernel(cxx, path):
            logger.warning("random walk: the native kernel did not compile with %s; using the PyTorch walk", cxx)
            return None
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        logger.warning("random walk: native kernel unavailable (%s); using the PyTorch walk", err)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.rw_walk_f32, lib.rw_walk_f64):
        fn.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64]
        fn.restype = None
    for fn in (lib.rw_stencil_f32, lib.rw_stencil_f64):
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64, ctypes.c_double, i64]
        fn.restype = None
    lib.rw_tile.argtypes, lib.rw_tile.restype = [], i64
    return lib


def native_available() -> bool:
    """Whether the native (compiled C++) walk can be used in this process (compiles it on first call)."""
    return _native_library() is not None


def _threads(work: int) -> int:
    """Threads for a native call: torch's intra-op count, 1 for small work."""
    return 1 if work < _NATIVE_MIN_WORK else max(1, torch.get_num_threads())


def _native_layout(h: int, w: int, pad: int, tile: int) -> tuple[int, int, int, int]:
    """Padded row width wp, flat start ``base`` of the first map row, pixels m (whole tiles), buffer length."""
    wp = w + 2 * pad
    base = pad * wp + pad
    m = -(-h * wp // tile) * tile  # whole tiles; pixels past the map get weight 0 and stay 0
    return wp, base, m, base + m + pad * wp + pad  # every shifted read stays inside the buffer


def _stencil_native(
    lib: ctypes.CDLL, features: torch.Tensor, radius: int, beta: float
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Offsets o_k and W [K, m] as :func:`_transition_stencil`, in the native walk's padded flat layout."""
    d, h, w = features.shape
    features = features.contiguous()  # read in place by the kernel: no padded copy of the D channels
    tile = lib.rw_tile()
    wp, _, m, _ = _native_layout(h, w, radius - 1, tile)
    n0 = -(-h * w // tile) * tile
    half = affinity_offsets(radius)
    dys = torch.tensor([dy for dy, _ in half], dtype=torch.int64)
    dxs = torch.tensor([dx for _, dx in half], dtype=torch.int64)
    aff = features.new_empty(len(half), n0)
    weights = features.new_empty(2 * len(half) + 1, m)
    fn = lib.rw_stencil_f64 if features.dtype == torch.float64 else lib.rw_stencil_f32
    fn(features.data_ptr(), aff.data_ptr(), weights.data_ptr(), dys.data_ptr(), dxs.data_ptr(), len(half), d, h, w,
       wp, radius - 1, m, n0, -beta / d, _threads(d * h * w * len(half)))
    return [(0, 0)] + half + [(-dy, -dx) for dy, dx in half], weights


def _walk_native(
    lib: ctypes.CDLL, v: torch.Tensor, weights: torch.Tensor, offsets: list[tuple[int, int]], steps: int, pad: int
) -> torch.Tensor:
    """Same as :func:`_walk` (same sum order) in one call of the compiled kernel; weights from :func:`_stencil_native`."""
    c, h, w = v.shape
    wp, base, m, length = _native_layout(h, w, pad, lib.rw_tile())
    bufs = [v.new_zeros(c, length), v.new_zeros(c, length)]
    bufs[0][:, base : base + h * wp].view(c, h, wp)[:, :, pad : pad + w] = v
    shifts = torch.tensor([dy * wp + dx for dy, dx in offsets], dtype=torch.int64)
    fn = lib.rw_walk_f64 if v.dtype == torch.float64 else lib.rw_walk_f32
    fn(bufs[0].data_ptr(), bufs[1].data_ptr(), weights.data_ptr(), shifts.data_ptr(), len(offsets), c, length,
       base, m, steps, _threads(c * m * len(offsets)))
    return bufs[steps % 2][:, base : base + h * wp].view(c, h, wp)[:, :, pad : pad + w].contiguous()


def _library_for(backend: str, *tensors: torch.Tensor):
    """The native kernel's library when ``backend`` allows it and every tensor is on the CPU, else None (PyTorch);
    RuntimeError for ``backend="native"`` where it is unavailable."""
    lib = None
    if backend != "torch" and all(t.device.type == "cpu" for t in tensors):
        lib = _native_library()
    if backend == "native" and lib is None:
        raise RuntimeError("the native random walk needs CPU tensors and a working C++ compiler")
    return lib


def random_walk(
    scores: torch.Tensor,
    features: torch.Tensor,
    radius: int = 5,
    beta: float = 8,
    logt: int = 8,
    backend: str = "auto",
) -> torch.Tensor:
    """Propagate scores [C, h, w] (bg first) on the affinity graph of features [D, h, w].

    Equal to psa's dense ``scores · T^(2^logt)`` (see :func:`random_walk_dense`), computed
    with a sparse stencil on the device of the inputs, in float32 (float64 if the scores
    are float64). Returns [C, h, w]. ``backend``: "auto" (native kernel for CPU tensors
    when it builds, else PyTorch), "native" (raises where unavailable) or "torch".
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check_inputs(scores, features)
    dtype = _compute_dtype(scores)
    c, h, w = scores.shape
    out = torch.zeros(c, h, w, dtype=dtype, device=scores.device)
    active = scores.reshape(c, -1).ne(0).any(1)
    if not bool(active.any()):
        return out
    lib = _library_for(backend, scores, features)
    v = scores[active].to(dtype)
    if lib is not None:
        offsets, weights = _stencil_native(lib, features.to(dtype), radius, beta)
        out[active] = _walk_native(lib, v, weights, offsets, 2**logt, radius - 1)
    else:
        offsets, stencil = _transition_stencil(features.to(dtype), radius, beta)
        out[active] = _walk(v, stencil, offsets, 2**logt, radius - 1)
    return out


def random_walk_affinity(
    scores: torch.Tensor,
    affinity: torch.Tensor,
    radius: int = 5,
    beta: float = 10,
    logt: int = 8,
    backend: str = "auto",
) -> torch.Tensor:
    """Propagate scores [C, h, w] on given pair affinities: ``affinity`` [P, h, w] holds a(j, j + o_p) at source j
    for the half-plane offsets o_p of :func:`~wsss_dist.methods.affinity.affinity_offsets` (irn's boundary
    affinities). Same operator as :func:`random_walk` (self-affinity 1, A^β, column-normalised, 2^logt steps;
    pairs whose target leaves the map do not exist), with the native kernel's walk for CPU tensors."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    half = affinity_offsets(radius)
    if affinity.dim() != 3 or affinity.shape[0] != len(half) or affinity.shape[-2:] != scores.shape[-2:]:
        raise ValueError(f"affinity must be [{len(half)}, h, w] for radius {radius} and scores {tuple(scores.shape)}, "
                         f"got {tuple(affinity.shape)}")
    dtype = _compute_dtype(scores)
    c, h, w = scores.shape
    out = torch.zeros(c, h, w, dtype=dtype, device=scores.device)
    active = scores.reshape(c, -1).ne(0).any(1)
    if not bool(active.any()):
        return out
    aff = affinity.to(dtype).clamp_min(0).pow(beta)
    inside = torch.zeros_like(aff, dtype=torch.bool)
    for p, (dy, dx) in enumerate(half):  # pairs whose target leaves the map do not exist
        inside[p, : max(0, h - dy), max(0, -dx) : max(0, w - max(0, dx))] = True
    offsets, stencil = _stencil_from_half(half, aff * inside)
    lib = _library_for(backend, scores, affinity)
    v = scores[active].to(dtype)
    pad = radius - 1
    if lib is not None:
        wp, _, m, _ = _native_layout(h, w, pad, lib.rw_tile())
        weights = stencil.new_zeros(len(offsets), m)
        weights[:, : h * wp] = F.pad(stencil, (pad, pad)).reshape(len(offsets), h * wp)
        out[active] = _walk_native(lib, v, weights, offsets, 2**logt, pad)
    else:
        out[active] = _walk(v, stencil, offsets, 2**logt, pad)
    return out


def random_walk_dense(
    scores: torch.Tensor, features: torch.Tensor, radius: int = 5, beta: float = 8, logt: int = 8
) -> torch.Tensor:
    """psa's dense formulation (reference for tests and benchmarks only; O(n²) memory, O(n³) time)."""
    _check_inputs(scores, features)
    dtype = _compute_dtype(scores)
    c, h, w = scores.shape
    n = h * w
    feats = features.to(dtype)
    index = torch.arange(n, device=scores.device).view(h, w)
    aff_mat = torch.eye(n, dtype=dtype, device=scores.device)
    for dy, dx in affinity_offsets(radius):
        ys, yt = slice(0, h - dy), slice(dy, h)
        xs, xt = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w + min(0, dx))
        if ys.stop <= 0 or xs.stop <= xs.start:
            continue
        aff = torch.exp(-(feats[:, ys, xs] - feats[:, yt, xt]).abs().mean(0)).reshape(-1)
        i, j = index[ys, xs].reshape(-1), index[yt, xt].reshape(-1)
        aff_mat[i, j] = aff
        aff_mat[j, i] = aff
    trans = aff_mat.pow(beta)
    trans = trans / trans.sum(0, keepdim=True)
    for _ in range(logt):
        trans = trans @ trans
    return (scores.to(dtype).reshape(c, n) @ trans).reshape(c, h, w)


def propagate_labels(
    cams: torch.Tensor,
    classes: torch.Tensor,
    features: torch.Tensor,
    alpha: float = 16,
    beta: float = 8,
    logt: int = 8,
    radius: int = 5,
    stride: int = 8,
    backend: str = "auto",
) -> torch.Tensor:
    """Pseudo label map [H, W] (values 0..K: background and the class ids) from normalised CAMs [K, H, W] of classes [K].

    psa's inference: background (1 - max CAM)^alpha stacked before the CAMs, zero-padded
    to a multiple of ``stride``, average-pooled to the feature grid (features [D, h, w]
    with h = ceil(H / stride), w = ceil(W / stride)), random-walked, bilinearly upsampled
    back, cropped, argmax, channel index → class id (0 = background). ``backend``: see :func:`random_walk`.
    """
    if cams.dim() != 3 or classes.dim() != 1 or classes.numel() != cams.shape[0]:
        raise ValueError(
            f"need cams [K, H, W] and classes [K]; got {tuple(cams.shape)}, {tuple(classes.shape)}"
        )
    _, big_h, big_w = cams.shape
    h, w = math.ceil(big_h / stride), math.ceil(big_w / stride)
    if tuple(features.shape[-2:]) != (h, w):
        raise ValueError(
            f"features {tuple(features.shape)} do not match the CAM grid {h}x{w} at stride {stride}"
        )
    cams = cams.to(_compute_dtype(cams))
    cam_max = cams.amax(0) if cams.shape[0] else cams.new_zeros(big_h, big_w)
    scores = torch.cat([((1 - cam_max) ** alpha)[None], cams])
    scores = F.pad(scores, (0, w * stride - big_w, 0, h * stride - big_h))
    scores = F.avg_pool2d(scores[None], stride)[0]
    walked = random_walk(scores, features, radius=radius, beta=beta, logt=logt, backend=backend)
    up = F.interpolate(walked[None], size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    channel = up[0, :, :big_h, :big_w].max(0).indices  # first maximum, like argmax; ~10x faster on CPU
    lut = torch.cat([classes.new_zeros(1), classes]).to(device=channel.device, dtype=torch.long)
    return lut[channel]
