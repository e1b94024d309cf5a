"""Which values a piece of code reads back from its device: each is a GPU sync, and here it is seen on any device.

On a GPU the host queues kernels and runs ahead. Reading a value the GPU computed (`.item()`, `bool(t)`, `.cpu()`,
`.tolist()`, an op whose output size depends on the data, such as `nonzero` or a boolean mask) makes the host wait
until the GPU has run everything queued before it; in a launch-bound step the GPU then idles while the host queues
the next kernels. One such read hidden in transformers (`mask.all()`) sat in every training step until C9
(bench/RESULTS.md). `torch.cuda.set_sync_debug_mode` finds reads only on a GPU; `DeviceReads` finds them on the CPU
too, so tests can hold the training and prediction paths to none per step.

Tensors on the device are those moved with `.to(device)` (a model's parameters, the batches handed to it), those
marked with `mark`, and every tensor computed from them: they are followed through PyTorch's dispatcher, backward
passes included, and a host read of any of them is counted with the lines that made it. Not counted: `.to("cpu")`
(on a CPU run it cannot be told from a move to the compute device), and reads inside code that only runs on a GPU.
"""

from __future__ import annotations

import collections
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

T = TypeVar("T")

_aten = torch.ops.aten
# Ops that hand the host a value computed on the device. Under inference mode composite ops arrive whole (`item`,
# `is_nonzero`) rather than as the ops they are built of.
READ_OPS = {
    _aten._local_scalar_dense.default,  # .item(), bool(), int(), float()
    _aten.item.default,
    _aten.is_nonzero.default,
    _aten.equal.default,
    _aten.allclose.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
}
# Ops whose output size the host must read from the device, unless given it (`output_size`); `nonzero`, `unique*`
# and indexing by a boolean mask are others.
SIZED_BY_DATA = {_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor}
# Tensor methods that copy device data to the host: on a CPU run the first three dispatch no read, and under inference
# mode `item` and the conversions dispatch none either.
READ_METHODS = {
    torch.Tensor.cpu,
    torch.Tensor.tolist,
    torch.Tensor.__array__,
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
}
_SKIPPED_FILES = (str(Path(torch.__file__).parent), __file__)


def _site(depth: int = 3) -> str:
    """The innermost `depth` calling lines outside torch and this module, innermost first."""
    frames = [f for f in traceback.extract_stack() if not f.filename.startswith(_SKIPPED_FILES)]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-depth:]))


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, Mapping):  # transformers' BatchEncoding is a Mapping pytree does not open
        tree = dict(tree)
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


class DeviceReads:
    """`with DeviceReads() as reads:` count the host reads of device values (see the module's docstring).

    `reads.mark(x)` marks the tensors in `x` (a tensor, or a dict / list of them) as on the device and returns `x`,
    for tensors made on the device rather than moved there; `reads.sites` counts the reads by (op, calling lines) and
    `reads.total` adds them up.
    """

    def __init__(self) -> None:
        self.sites: collections.Counter[tuple[str, str]] = collections.Counter()
        self._on_device = WeakIdKeyDictionary()
        self._read = WeakIdKeyDictionary()  # tensor -> its version when last read
        self._modes = (_Dispatched(self), _Methods(self))

    def mark(self, tree: T) -> T:
        for tensor in _tensors(tree):
            self._on_device[tensor] = True
        return tree

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def clear(self) -> None:
        self.sites.clear()

    def on_device(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t for t in tensors if t in self._on_device]

    def count(self, what: str, tensor: torch.Tensor) -> None:
        """Count a read of `tensor`, unless it was read before and has not changed since: its value is on the host
        by then (on a CPU run `.cpu()` returns the tensor itself, whose `.tolist()` must not count again)."""
        version = tensor._version if not tensor.is_inference() else -1  # inference tensors keep no version
        if self._read.get(tensor) == version:
            return
        self._read[tensor] = version
        self.sites[(what, _site())] += 1

    def __enter__(self) -> DeviceReads:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


class _Dispatched(TorchDispatchMode):
    """Follows device values through every op (backward passes included) and counts the ops that read them."""

    def __init__(self, reads: DeviceReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        on_device = self.reads.on_device(_tensors((args, kwargs)))
        bool_index = func is _aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        sized_by_data = func in SIZED_BY_DATA and kwargs.get("output_size") is None
        if on_device and (func in READ_OPS or sized_by_data or "unique" in func.name() or bool_index):
            self.reads.count(func.name(), on_device[0])
        out = func(*args, **kwargs)
        if on_device:  # what is computed from device values is on the device, unless copied to the host
            devices = {t.device for t in on_device}
            self.reads.mark([t for t in _tensors(out) if t.device in devices])
        return out


class _Methods(TorchFunctionMode):
    """Marks what `.to(device)` moves as on the device, and counts the Tensor methods that copy a device value to the
    host."""

    def __init__(self, reads: DeviceReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in READ_METHODS and self.reads.on_device(_tensors(args[:1])):
            self.reads.count(f"Tensor.{func.__name__}", args[0])
        out = func(*args, **kwargs)
        if func is torch.Tensor.cuda or (func is torch.Tensor.to and _names_a_device(args[1:], kwargs)):
            self.reads.mark(out)
        return out


def _names_a_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether `Tensor.to(*args, **kwargs)` says where to (a device, its name or index, or another tensor)."""
    return "device" in kwargs or any(isinstance(a, (torch.device, str, int, torch.Tensor)) for a in args)
