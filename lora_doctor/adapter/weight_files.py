"""Where every tensor of a model folder sits on disk, and reading them in row chunks of bounded size.

A model folder holds one `model.safetensors` or shards named by `model.safetensors.index.json`.
Reading goes through plain file reads into a few reusable buffers, not through safetensors' memory
map: the pages of a memory-mapped file stay resident in the process for as long as the file is open,
so reading a multi-GB model through the map would hold all of it in RSS. A safetensors file is an
8-byte little-endian header length, a JSON header (dtype, shape, byte range of every tensor), then
the data.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadInput
from .dtypes import SAFETENSORS_DTYPES, dtype_name
from .modules import layer_index

INDEX_FILE = "model.safetensors.index.json"

# A real header is a few hundred kB even for large models; a larger length means a corrupt file.
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's place in a safetensors file: bytes [start, end) of `path`."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


def model_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Tensor name → where it sits, for every safetensors file of a model folder (headers only)."""
    if not folder.exists():
        raise BadInput(f"no such path: {folder}")
    if not folder.is_dir():
        raise BadInput(f"{folder} is not a folder; pass the model folder that holds the *.safetensors weights")
    index = folder / INDEX_FILE
    weight_map = _weight_map(index) if index.is_file() else None  # the index read once
    if weight_map is not None:
        files = _indexed_files(index, weight_map)
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BadInput(f"{folder} has no *.safetensors weights")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(file).items():
            if name in tensors:
                raise BadInput(f"{folder}: tensor {name} is in both {tensors[name].path.name} and {file.name}")
            tensors[name] = info
    if weight_map is not None:
        _check_index(index, weight_map, tensors)
    return tensors


def _indexed_files(index: Path, weight_map: dict[str, str]) -> list[Path]:
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise BadInput(f"{index} names shard {absent[0]}, which is not in {index.parent}")
    return files


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise BadInput(f"{index} is not a safetensors index (no readable weight_map: {error})") from None
    if not isinstance(weight_map, dict):
        raise BadInput(f"{index}: weight_map is not an object")
    return weight_map


def _check_index(index: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    for name, file in weight_map.items():
        if name not in tensors or tensors[name].path.name != file:
            raise BadInput(f"{index} puts {name} in {file}, but that shard does not hold it")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name → TensorInfo from one safetensors file's header."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError("header length out of range")
            header = json.loads(handle.read(length))
        data_start = 8 + length
        tensors = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = (data_start + offset for offset in meta["data_offsets"])
            if meta["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"unsupported dtype {meta['dtype']} of {name}")
            if not data_start <= begin <= end <= size:
                raise ValueError(f"byte range of {name} lies outside the file")
            tensors[name] = TensorInfo(name, path, SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"]), begin, end)
        return tensors
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise BadInput(f"{path} is not a readable safetensors file ({error})") from None


@dataclass
class Chunk:
    """Rows [row_start, row_end) of one group of tensors read together (e.g. an export's tensor and its base)."""

    group: int
    row_start: int
    row_end: int
    tensors: list[torch.Tensor]
    last: bool


def read_chunks(groups: list[list[TensorInfo]], chunk_bytes: int, read_ahead: int = 2) -> Iterator[Chunk]:
    """Yield every group's tensors in row chunks of at most `chunk_bytes` per tensor (at least one row).

    Tensors of one group must have the same number of rows. A thread reads up to `read_ahead` chunks
    ahead while the caller computes; a chunk's tensors are valid until the caller asks for the next
    one (their buffers are then reused), so at most `read_ahead + 1` chunks are in memory.
    """
    width = max((len(group) for group in groups), default=0)
    largest = max((_chunk_rows(group, chunk_bytes) * info.row_bytes for group in groups for info in group), default=0)
    free: queue.Queue = queue.Queue()
    for _ in range(read_ahead + 1):
        free.put([torch.empty(largest, dtype=torch.uint8) for _ in range(width)])
    ready: queue.Queue = queue.Queue(maxsize=read_ahead + 1)
    stop = threading.Event()
    reader = threading.Thread(target=_read_into, args=(groups, chunk_bytes, free, ready, stop), daemon=True)
    reader.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            chunk, buffers = item
            yield chunk
            free.put(buffers)
    finally:
        stop.set()
        while reader.is_alive():
            # Unblock a reader waiting for a free buffer or for room in `ready`.
            try:
                ready.get_nowait()
            except queue.Empty:
                free.put([])
            reader.join(timeout=0.05)


def _chunk_rows(group: list[TensorInfo], chunk_bytes: int) -> int:
    widest = max(info.row_bytes for info in group)
    return max(1, chunk_bytes // widest) if widest else 1


def _read_into(groups, chunk_bytes, free: queue.Queue, ready: queue.Queue, stop: threading.Event) -> None:
    handles: dict[Path, object] = {}
    try:
        for index, group in enumerate(groups):
            rows = group[0].rows
            if any(info.rows != rows for info in group):
                raise ValueError(f"tensors {[info.name for info in group]} differ in row count")
            step = _chunk_rows(group, chunk_bytes)
            for row_start in range(0, max(rows, 1), step):
                row_end = min(row_start + step, rows)
                buffers = free.get()
                if stop.is_set():
                    return
                views = []
                for info, buffer in zip(group, buffers):
                    begin = info.start + row_start * info.row_bytes
                    size = (row_end - row_start) * info.row_bytes if info.shape else info.nbytes
                    handle = _open(handles, info.path)
                    handle.seek(begin)
                    target = buffer[:size]
                    if handle.readinto(memoryview(target.numpy())) != size:
                        raise BadInput(f"{info.path} ends inside tensor {info.name}: truncated file")
                    views.append(_as_tensor(target, info, row_end - row_start))
                chunk = Chunk(index, row_start, row_end, views, last=row_end >= rows)
                ready.put((chunk, buffers))
        ready.put(None)
    except OSError as error:
        ready.put(BadInput(f"cannot read {error.filename or 'a weight file'} ({error.strerror or error})"))
    except BaseException as error:  # handed to the caller's thread, which raises it
        ready.put(error)
    finally:
        for handle in handles.values():
            handle.close()


def _open(handles: dict, path: Path):
    if path not in handles:
        handles[path] = path.open("rb", buffering=0)
    return handles[path]


def _as_tensor(raw: torch.Tensor, info: TensorInfo, rows: int) -> torch.Tensor:
    shape = (rows, *info.shape[1:]) if info.shape else ()
    return raw.view(info.dtype).view(shape)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor's value, read from its file into memory of its own (no memory map: the rest of the
    file stays out of RSS, and the tensor is freed as soon as its last user drops it)."""
    return read_tensors([info])[info.name]


def read_tensors(infos: list[TensorInfo]) -> dict[str, torch.Tensor]:
    """Several tensors' values by key, as `read_tensor` reads one, each file opened once (its header,
    already read, is not parsed again)."""
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in infos:
        by_file.setdefault(info.path, []).append(info)
    values = {}
    for path, group in by_file.items():
        try:
            with path.open("rb", buffering=0) as handle:
                values.update((info.name, _read_at(handle, info)) for info in group)
        except OSError as error:
            raise BadInput(f"cannot read {path} ({error.strerror or error})") from None
    return values


def _read_at(handle, info: TensorInfo) -> torch.Tensor:
    value = torch.empty(info.nbytes, dtype=torch.uint8)
    handle.seek(info.start)
    if handle.readinto(memoryview(value.numpy())) != info.nbytes:
        raise BadInput(f"{info.path} ends inside tensor {info.name}: truncated file")
    return value.view(info.dtype).view(info.shape)


class StreamedWeights:
    """Every tensor of a model folder as (name, value), read one at a time when iterated.

    Iterable any number of times and small to pickle (it holds where the tensors are, not their
    values), so it can be handed to an engine's workers: a full sync then holds one tensor at a time
    beside the engine instead of a copy of the model. The order is the files', then the names'
    (sorted), which keeps a layer's weights together as vLLM's layerwise reload wants them.
    """

    def __init__(self, tensors: dict[str, TensorInfo]):
        self.tensors = dict(sorted(tensors.items(), key=lambda item: (str(item[1].path), item[0])))

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, info in layer_by_layer(self.tensors):
            yield name, read_tensor(info)


def layer_by_layer(items: dict) -> Iterator:
    """`items`' (name, value) pairs, in their order; whenever the decoder layer changes, the memory
    freed since goes back to the system (`give_back_freed_memory`).

    A push's tensors and what the engine allocates while it reloads each layer are freed as the next
    layer arrives, but glibc keeps the freed heap pages for reuse and the heap's free space fragments
    across layers: a full sync of the 242M model of bench/check_model_scale.py grew the process by
    +0.47 GB while it ran (half its float32 size), +0.1 GB with a trim at each layer."""
    current = None
    for name, value in items.items():
        layer = layer_index(name)
        if layer != current:
            give_back_freed_memory()
            current = layer
        yield name, value


# glibc's mallopt parameter for the size above which an allocation gets pages of its own (mmap), which
# a free hands back to the system; below it, freed memory stays in the heap for reuse.
_M_MMAP_THRESHOLD = -3
# What glibc's own threshold grows to at most on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): where it stands
# once a process has freed a few large tensors, as every engine start does.
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
# A streamed push's tensors (one module's weights, ΔW, the engine's copies of them) are larger.
_STREAMED_MMAP_THRESHOLD = 2**20


@contextmanager
def freed_tensors_returned() -> Iterator[None]:
    """While streaming weights one module at a time, give each freed tensor's memory back to the system.

    glibc serves allocations below its mmap threshold (up to 32 MiB once it has adapted) from the heap
    and keeps what is freed there: a push of thousands of module-sized tensors with interleaved
    lifetimes fragments it, and the process kept ~0.4 of the model's float32 size after a full sync of
    a model whose modules are all under 32 MiB (measured: bench/check_model_scale.py, docs/memory.md).
    The heap's free pages are released before (`malloc_trim`) and after; afterwards the threshold goes
    back to where glibc's own would stand. No-op without glibc.
    """
    libc = _glibc()
    give_back_freed_memory()  # what the heap kept before (an engine start's): not to be reused piecewise
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _STREAMED_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
        give_back_freed_memory()


def give_back_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim`, every arena); no-op
    without glibc. Costs a walk of the heap: call it between modules or layers, not per tensor."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None
