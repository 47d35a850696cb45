"""Bound what an untrusted checkpoint's config may allocate by what the checkpoint holds.

A checkpoint's adapter_config.json says how big the adapter is (`r`, `rank_pattern`, `reduction_factor`, ...);
its weight file holds the tensors. Building the adapter first and comparing shapes afterwards (the loaders do
that, tensor by tensor) lets a config with `r: 10**9` or `reduction_factor: 1e-7` allocate gigabytes to
terabytes before any check runs. Every method builds its modules through torch's tensor factories, so one
generic check covers them all, whatever the config's names: while a loaded adapter is built, each factory call
(`torch.empty` in `nn.Linear`, `torch.zeros`, `new_empty`, ...) counts the elements it asks for, and a request
beyond what the checkpoint's tensors could fill (with room for initialisation temporaries and small buffers) is
refused as a UserError BEFORE it is allocated. The checkpoint's element count comes from the safetensors
header (no data read) or, for a pickle, from its file size (each element takes at least one byte).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch.overrides import TorchFunctionMode

from ..errors import UserError

# Room beyond the saved elements: an initialiser may build a temporary of a parameter's size, and methods keep
# small buffers (masks, scalings) a checkpoint does not store; 64M elements is 256 MB of float32.
FACTOR = 8
SLACK = 64 * 2**20

_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint,
              torch.empty_strided, torch.eye, torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones,
              torch.Tensor.new_full, torch.Tensor.new_tensor}
_SIZE_FIRST = {torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full}


def saved_elements(directory: Path) -> int:
    """An upper bound of the tensor elements stored in a checkpoint directory (all its weight files)."""
    total = 0
    for file in sorted(Path(directory).glob("*")):
        if not file.is_file():
            continue
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), "pt") as handle:
                    total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
                continue
            except Exception:  # a corrupt header: the reader refuses it later; count its bytes meanwhile
                pass
        if file.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            total += file.stat().st_size
    return total


def _requested(func, args, kwargs) -> int:
    """Elements a factory call asks for (0 where the size cannot be told: those calls are small)."""
    if func is torch.eye:
        rows = args[0] if args else kwargs.get("n", 0)
        cols = args[1] if len(args) > 1 and isinstance(args[1], int) else kwargs.get("m", rows)
        return rows * cols if isinstance(rows, int) and isinstance(cols, int) else 0
    if func is torch.Tensor.new_tensor:
        return 0
    if func is torch.randint:  # randint(high, size) or randint(low, high, size)
        size = kwargs.get("size", next((a for a in args if isinstance(a, tuple | list | torch.Size)), ()))
    else:
        rest = args[1:] if func in _SIZE_FIRST else args
        size = kwargs.get("size", rest[0] if len(rest) == 1 and isinstance(rest[0], tuple | list | torch.Size)
                          else rest)
        if func in (torch.full, torch.Tensor.new_full, torch.empty_strided):
            size = size[0] if size and isinstance(size[0], tuple | list | torch.Size) else size
    dims = [d for d in size if isinstance(d, int) and not isinstance(d, bool)]
    return math.prod(dims) if dims else 0


class _Bound(TorchFunctionMode):
    def __init__(self, saved: int, extra: int, what: str, path: str) -> None:
        super().__init__()
        self.saved, self.limit, self.what, self.path, self.used = saved, FACTOR * saved + SLACK + extra, what, path, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES:
            self.used += _requested(func, args, kwargs)
            if self.used > self.limit:
                raise UserError(
                    f"{self.path}: the config of {self.what} asks for more than {self.used:,} weights, but the "
                    f"checkpoint holds at most {self.saved:,}; its sizes (e.g. r, rank_pattern, "
                    "reduction_factor) disagree with its tensors. The checkpoint is damaged or hostile: use the "
                    "config it was saved with.")
        return func(*args, **kwargs)


@contextlib.contextmanager
def allocation_bound(directories: Iterable[Path], path: str, extra: int = 0) -> Iterator[None]:
    """Refuse (UserError naming `path`) tensor allocations beyond what the checkpoints in `directories` can fill;
    `extra` elements are allowed on top (e.g. for adapters of the same build that come from no checkpoint)."""
    directories = list(directories)
    saved = sum(saved_elements(d) for d in directories)
    what = "checkpoint " + ", ".join(str(d) for d in directories)
    with _Bound(saved, extra, what, path):
        yield
