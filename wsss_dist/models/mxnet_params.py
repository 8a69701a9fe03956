"""psa's MXNet ResNet-38d weights (``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``), read without mxnet.

An MXNet ``.params`` file is an NDArray list (little-endian):

* ``uint64`` list magic ``0x112``, ``uint64`` reserved;
* ``uint64`` count of arrays, then each array:

  - V2/V3 (``uint32`` magic ``0xF993FAC9`` / ``0xF993FACA``): ``int32`` storage type (0 = dense; sparse arrays
    are refused), shape (``uint32`` ndim + ndim × ``int64``), context (``int32`` device type, ``int32`` id),
    ``int32`` dtype flag, then the data (C order);
  - V1 (``uint32`` magic ``0xF993FAC8``): the same without the storage type;
  - legacy (no magic: the first ``uint32`` is ndim): ndim × ``uint32`` dims, context, dtype flag, data;
* ``uint64`` count of names, then each name as ``uint64`` length + bytes (``arg:`` for parameters, ``aux:`` for
  BatchNorm moving statistics).

:func:`read_params` returns ``{name: tensor}`` as stored; :func:`resnet38d_from_mxnet` renames psa's MXNet names
to ours (:mod:`wsss_dist.models.resnet38d`, psa's PyTorch names) and drops the ImageNet classifier ``linear1000``.
"""
from __future__ import annotations

import math
import mmap
import re
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from wsss_dist.errors import WeightsError

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA
# mshadow type flags → numpy dtypes (bfloat16, 12, is read as its raw 16 bits and viewed as torch.bfloat16)
DTYPES: dict[int, np.dtype] = {0: np.dtype("<f4"), 1: np.dtype("<f8"), 2: np.dtype("<f2"), 3: np.dtype("u1"),
                               4: np.dtype("<i4"), 5: np.dtype("i1"), 6: np.dtype("<i8"), 7: np.dtype("?"),
                               8: np.dtype("<i2"), 9: np.dtype("<u2"), 10: np.dtype("<u4"), 11: np.dtype("<u8"),
                               12: np.dtype("<i2")}
BFLOAT16 = 12


class MXNetFormatError(WeightsError, ValueError):
    """A file that is not an MXNet NDArray list (or holds sparse arrays)."""


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise MXNetFormatError(f"{self.path}: truncated MXNet .params file (at byte {self.pos})")
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return out

    def one(self, fmt: str) -> int:
        return self.take(fmt)[0]

    def array(self, dtype: np.dtype, count: int) -> np.ndarray:
        size = dtype.itemsize * count
        if self.pos + size > len(self.buf):
            raise MXNetFormatError(f"{self.path}: truncated MXNet .params file (array data at byte {self.pos})")
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += size
        return out


def _read_ndarray(r: _Reader, index: int) -> Tensor | None:
    magic = r.one("<I")
    if magic in (V2_MAGIC, V3_MAGIC):
        stype = r.one("<i")
        if stype != 0:
            raise MXNetFormatError(f"{r.path}: array {index} has sparse storage (type {stype}); only dense arrays "
                                   "are supported")
        ndim = r.one("<i")
        shape = r.take(f"<{ndim}q") if ndim > 0 else ()
        if ndim < 0 or (ndim == 0 and magic == V2_MAGIC):  # an empty (none) array
            return None
    elif magic == V1_MAGIC:
        ndim = r.one("<I")
        shape = r.take(f"<{ndim}q")
        if ndim == 0:
            return None
    else:  # legacy: the magic is ndim, dims are uint32
        ndim = magic
        if ndim > 32:
            raise MXNetFormatError(f"{r.path}: array {index}: unknown NDArray magic {magic:#x}")
        shape = r.take(f"<{ndim}I")
        if ndim == 0:
            return None
    r.take("<ii")  # context: device type, device id (data is always stored from the CPU copy)
    flag = r.one("<i")
    if flag not in DTYPES:
        raise MXNetFormatError(f"{r.path}: array {index}: unknown dtype flag {flag}")
    if any(d < 0 for d in shape):
        raise MXNetFormatError(f"{r.path}: array {index}: negative shape {tuple(shape)}")
    count = math.prod(int(d) for d in shape)  # exact (Python ints): a huge shape cannot wrap around to a small count
    data = torch.from_numpy(r.array(DTYPES[flag], count)).reshape(tuple(int(s) for s in shape))
    return data.view(torch.bfloat16) if flag == BFLOAT16 else data


def read_params(path: str | Path) -> dict[str, Tensor]:
    """The arrays of an MXNet NDArray-list file (``mx.nd.save`` / ``Module.save_params``) by their stored names.

    Raises :class:`MXNetFormatError` (a :class:`~wsss_dist.errors.WeightsError`) naming the file when it is not
    such a file, is truncated, holds sparse arrays or has no names.
    """
    p = Path(path)
    with open(p, "rb") as f:
        try:
            buf: mmap.mmap | bytes = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            buf = b""
    try:
        r = _Reader(buf, p)
        header, _reserved = r.take("<QQ")
        if header != LIST_MAGIC:
            raise MXNetFormatError(f"{p}: not an MXNet .params file (list magic {header:#x}, expected {LIST_MAGIC:#x})")
        n = r.one("<Q")
        if n > 1_000_000:
            raise MXNetFormatError(f"{p}: not an MXNet .params file ({n} arrays)")
        arrays = [_read_ndarray(r, i) for i in range(n)]
        n_names = r.one("<Q")
        if n_names != n:
            raise MXNetFormatError(f"{p}: {n} arrays but {n_names} names (an unnamed NDArray list is not weights)")
        names = []
        for _ in range(n_names):
            length = r.one("<Q")
            if r.pos + length > len(buf):
                raise MXNetFormatError(f"{p}: truncated MXNet .params file (names)")
            try:
                names.append(bytes(buf[r.pos:r.pos + length]).decode("utf-8"))
            except UnicodeDecodeError as e:
                raise MXNetFormatError(f"{p}: array name {len(names)} is not UTF-8 ({e.reason} at byte {e.start})") from None
            r.pos += length
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()
    return {k: v for k, v in zip(names, arrays) if v is not None}


_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}
# res2a_branch1_weight, bn4b5_branch2b1_moving_var, res6a_branch2b2_weight: stage, block letter, block index, branch
_BLOCK = re.compile(r"^(res|bn)(\d)([a-z])(\d*)_(branch\w+?)_(weight|gamma|beta|moving_mean|moving_var)$")
DROPPED_PREFIXES = ("linear1000_",)  # the ImageNet classifier


def resnet38d_from_mxnet(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """psa's MXNet ResNet-38d arrays (``arg:``/``aux:`` names) → our ResNet-38d state dict (psa's PyTorch names).

    The renaming of psa's ``convert_mxnet_to_torch``: ``conv1a_weight`` → ``conv1a.weight``;
    ``res{s}a_branch{z}_weight`` → ``b{s}.conv_branch{z}.weight`` and ``res{s}b{i}_…`` → ``b{s}_{i}.…``;
    ``bn…_branch{z}_{gamma,beta,moving_mean,moving_var}`` → ``….bn_branch{z}.{weight,bias,running_mean,running_var}``;
    ``bn7_*`` → ``bn7.*``; ``linear1000_*`` (the ImageNet classifier) is dropped. A name of no other form is an
    error (:class:`MXNetFormatError`), so nothing is dropped silently.
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for name, v in params.items():
        k = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
        v = v.float() if v.is_floating_point() else v
        if k.startswith(DROPPED_PREFIXES):
            continue
        if k == "conv1a_weight":
            out["conv1a.weight"] = v
            continue
        if k.startswith("bn7_") and k[4:] in _BN:
            out[f"bn7.{_BN[k[4:]]}"] = v
            continue
        m = _BLOCK.match(k)
        if m is None or (m.group(1) == "res") != (m.group(6) == "weight"):
            unknown.append(name)
            continue
        kind, stage, letter, index, branch, last = m.groups()
        if letter == "a" and not index:
            block = f"b{stage}"
        elif letter == "b" and index:
            block = f"b{stage}_{index}"
        else:
            unknown.append(name)
            continue
        layer = "conv" if kind == "res" else "bn"
        out[f"{block}.{layer}_{branch}.{'weight' if kind == 'res' else _BN[last]}"] = v
    if unknown:
        raise MXNetFormatError(f"{len(unknown)} arrays are not psa's ResNet-38d MXNet names (e.g. "
                               f"{', '.join(unknown[:3])})")
    return out


__all__ = ["read_params", "resnet38d_from_mxnet", "MXNetFormatError", "LIST_MAGIC", "V2_MAGIC"]
