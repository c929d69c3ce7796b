"""The communication manager of patch parallelism (DistriFusion, Li et al., CVPR 2024).

Every exchange between patches goes through one `CommManager` per pipeline: conv halos, GroupNorm
statistics, self-attention keys/values. Each exchanged tensor is an *entry*, named by its layer and
registered once per call signature (a *slot*: the UNet call's position within a step and its input
shape) during that slot's first, synchronous, call; the ranks swap their shapes then, so uneven
patches (any world size, any height) are padded to the largest and trimmed on receipt.

Synchronous calls (warm-up steps, `sync=True`, calls outside a pipeline loop) all-gather each entry
when the layer asks and wait for it: the result equals one process's. Asynchronous calls
(DistriFusion's displaced patch parallelism) hand each layer the *previous* step's tensors of the
other patches, already received, and queue the fresh local tensor into one flat byte buffer per
bucket; a bucket's `all_gather` is launched, asynchronously, as soon as its last entry is queued,
so communication overlaps the rest of the UNet, and it is waited for only when the next step reads
the bucket. Entries of mixed dtypes share a bucket as 16-byte aligned byte ranges.
Each entry's views into the buffers are made once, at lay-out, so an asynchronous exchange costs
one copy (or one cat, for a tensor handed over as pieces) and no view ops.

Under CUDA graphs (`RuntimeConfig(cuda_graph=True)`) the host-side choice of a call - its slot and
whether it is synchronous - is made by `prepare`, before the graph hook picks (or captures) the graph
for that choice; inside the call nothing depends on the host. A graph cannot leave work running
when it ends, so with `join_each_call` every launched all-gather is waited for at the end of its own
call: the exchange still overlaps the rest of that call's UNet, as in DistriFusion's graphs.
The first call of each slot registers its entries (a host sync) and runs eagerly.

The caller's launcher (torchrun / accelerate) creates the process group; `init_distributed` is the
small helper programs use to create it from the launcher's environment.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# Collectives per asynchronous step: enough to overlap most of the traffic, few enough to batch it.
NUM_BUCKETS = 8
_ALIGN = 16
_MAX_DIMS = 8


def _all_gather_flat(output: torch.Tensor, tensor: torch.Tensor, group, async_op: bool = False):
    """All-gather `tensor` into the flat `output` (world * numel); the newer name where torch has it."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, tensor, group=group, async_op=async_op)


def init_distributed(device: str = "auto") -> tuple[int, int, str]:
    """Create the default process group from a launcher's environment (torchrun, accelerate launch).

    Returns (rank, world size, device): NCCL and `cuda:LOCAL_RANK` on GPUs, gloo on CPU. Without a
    launcher (no WORLD_SIZE, or WORLD_SIZE=1) nothing is created and (0, 1, device) is returned.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = torch.cuda.is_available() and device != "cpu"
    if device == "auto":
        device = "cuda" if on_gpu else "cpu"
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return 0, 1, device
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if on_gpu else "gloo")
    if on_gpu:
        device = f"cuda:{torch.cuda.current_device()}"
    return dist.get_rank(), dist.get_world_size(), device


@dataclass
class Entry:
    """One exchanged tensor: its shape on every rank, and its byte range in its bucket."""

    key: str
    dtype: torch.dtype
    shapes: list[tuple[int, ...]]
    max_shape: tuple[int, ...]
    nbytes: int
    bucket: int = -1
    offset: int = 0
    # Views into the bucket's buffers, made once at lay-out: every rank's received tensor, and this
    # rank's send range, so an asynchronous exchange costs no view ops on the host.
    received: list[torch.Tensor] = field(default_factory=list)
    send: torch.Tensor | None = None


@dataclass
class Bucket:
    entries: list[Entry]
    nbytes: int
    send: torch.Tensor
    recv: torch.Tensor  # (world, nbytes) uint8
    queued: int = 0
    work: object = None


@dataclass
class Slot:
    """The entries of one UNet call signature and, once laid out, their buffers."""

    entries: dict[str, Entry] = field(default_factory=dict)
    staged: dict[str, torch.Tensor] = field(default_factory=dict)  # fresh tensors of the layout call
    buckets: list[Bucket] | None = None
    calls_this_run: int = 0  # calls within the current pipeline call; the first is always synchronous


class CommManager:
    """All patch-to-patch communication of one pipeline; see the module docstring.

    `index` is this rank's patch (0 = top rows) among `size` patches of `group`.
    """

    def __init__(self, group, index: int, size: int, num_buckets: int = NUM_BUCKETS):
        self.group = group
        self.index = index
        self.size = size
        self.num_buckets = num_buckets
        self.slots: dict[tuple, Slot] = {}
        self.slot: Slot | None = None
        self.fresh = True
        self.active = False
        self.timing = False  # benchmarks: time communication with CUDA events (reading them syncs)
        self.join_each_call = False  # wait for every launched all-gather at the end of its call (CUDA graphs)
        self._prepared: tuple[Slot, bool] | None = None
        self._ready: list[Bucket] = []
        self._events: list[tuple] = []
        self.reset_stats()

    # ---- calls ------------------------------------------------------------------------------

    def prepare(self, key: tuple | None, asynchronous: bool) -> tuple[bool, bool]:
        """Host-side bookkeeping of the next call on slot `key` (None: a throw-away slot), once per
        call, before it runs (or its CUDA graph replays). Returns (fresh, laid out): a call whose
        slot is not laid out yet registers its entries and must run eagerly."""
        slot = self.slots.setdefault(key, Slot()) if key is not None else Slot()
        fresh = not (asynchronous and slot.buckets is not None and slot.calls_this_run > 0)
        slot.calls_this_run += 1
        self._prepared = (slot, fresh)
        self.stats["calls"] += 1
        self.stats["sync_calls" if fresh else "async_calls"] += 1
        if slot.buckets is not None:  # what this call sends, counted here so graph replays count too
            sizes = [e.nbytes for e in slot.entries.values()] if fresh else [b.nbytes for b in slot.buckets]
            for nbytes in sizes:
                self._count(nbytes, "sync" if fresh else "async")
        return fresh, slot.buckets is not None

    def begin_call(self) -> None:
        """Start the prepared call (every execution of it: eager, graph warm-up and capture)."""
        if self._prepared is None:
            raise RuntimeError("patch parallelism: CommManager.begin_call without prepare")
        self.slot, self.fresh = self._prepared
        if self.fresh:
            self._wait_all(self.slot)  # a fresh call overwrites the receive buffers
        self.active = True

    def end_call(self) -> None:
        slot, self.active = self.slot, False
        self.slot = None
        if slot is None:
            return
        if self.fresh:
            if slot.buckets is None and slot.staged:
                self._lay_out(slot)
            return
        for bucket in slot.buckets:
            if bucket.work is None and bucket.queued:
                self._ready.append(bucket)  # a layer that did not run this step keeps its old data
        self._launch_ready()
        if self.join_each_call:
            self._wait_all(slot)

    def reset(self) -> None:
        """Start of a pipeline call: every slot's first call is synchronous again."""
        for slot in self.slots.values():
            self._wait_all(slot)
            slot.calls_this_run = 0

    def close(self) -> None:
        self.reset()
        self.slots.clear()

    # ---- the exchange -----------------------------------------------------------------------

    def exchange(self, key: str, local: torch.Tensor | list[torch.Tensor], cat_dim: int | None = None
                 ) -> list[torch.Tensor]:
        """Every patch's `key` tensor, in patch order, this rank's being `local` itself.

        With `cat_dim`, `local` is a list of pieces whose concatenation along that dim is exchanged;
        asynchronous calls write it straight into the send buffer (one kernel, no extra copy), and
        this rank's entry of the result is that concatenation.

        Fresh calls return the other patches' current tensors; asynchronous calls their tensors of
        the previous step. The returned views are valid until the next `exchange`: use them at once.
        """
        self._launch_ready()
        slot = self.slot
        entry = slot.entries.get(key)
        if self.fresh:
            if cat_dim is not None:
                local = torch.cat(local, dim=cat_dim)
            if entry is None:
                entry = slot.entries[key] = self._register(key, local)
            gathered = self._gather_now(entry, local)
            if slot.buckets is None:
                slot.staged[key] = gathered
            else:
                self._receive_view(slot.buckets[entry.bucket], entry).copy_(gathered)
            parts = [_trim(gathered[j].view(entry.dtype).view(entry.max_shape), entry.shapes[j]) for j in range(self.size)]
            parts[self.index] = local
            return parts
        if entry is None:
            raise RuntimeError(f"patch parallelism: layer {key} ran for the first time in an asynchronous step; "
                               "the set of layers that run must not change between steps")
        bucket = slot.buckets[entry.bucket]
        if bucket.work is not None:
            self._wait(bucket)
        parts = list(entry.received)
        send = entry.send
        if cat_dim is None:
            send.copy_(local)
        elif send.is_contiguous():
            torch.cat(local, dim=cat_dim, out=send)
        else:  # a trimmed (padded) range: concatenate, then copy
            send.copy_(torch.cat(local, dim=cat_dim))
        parts[self.index] = local if cat_dim is None else send
        bucket.queued += 1
        if bucket.queued == len(bucket.entries):
            self._ready.append(bucket)  # launched at the next exchange, once these views are used
        return parts

    def _register(self, key: str, local: torch.Tensor) -> Entry:
        if local.dim() > _MAX_DIMS:
            raise ValueError(f"patch parallelism exchanges tensors of at most {_MAX_DIMS} dims, got {local.dim()} ({key})")
        shape = torch.zeros(_MAX_DIMS + 1, dtype=torch.int64, device=local.device)
        shape[0] = local.dim()
        shape[1:local.dim() + 1] = torch.tensor(local.shape, dtype=torch.int64)
        shapes = torch.empty(self.size * (_MAX_DIMS + 1), dtype=torch.int64, device=local.device)
        _all_gather_flat(shapes, shape, self.group)
        rows = shapes.view(self.size, _MAX_DIMS + 1).tolist()  # once per entry and slot, at registration
        per_rank = [tuple(r[1:r[0] + 1]) for r in rows]
        if any(len(s) != local.dim() for s in per_rank):
            raise RuntimeError(f"patch parallelism: ranks disagree on the rank of tensor {key}: {per_rank}")
        max_shape = tuple(max(s[d] for s in per_rank) for d in range(local.dim()))
        nbytes = math.prod(max_shape) * local.element_size()
        return Entry(key, local.dtype, per_rank, max_shape, nbytes)

    def _gather_now(self, entry: Entry, local: torch.Tensor) -> torch.Tensor:
        """Blocking all-gather of `local`, padded to the entry's largest shape: (world, nbytes) bytes."""
        if tuple(local.shape) == entry.max_shape:
            padded = local.contiguous()
        else:
            padded = local.new_zeros(entry.max_shape)
            _trim(padded, tuple(local.shape)).copy_(local)
        out = torch.empty(self.size * entry.nbytes, dtype=torch.uint8, device=local.device)
        start = self._mark()
        _all_gather_flat(out, padded.view(-1).view(torch.uint8), self.group)
        self._record(start)
        if self.slot.buckets is None:  # laid-out slots were counted by `prepare`
            self._count(entry.nbytes, "sync")
        return out.view(self.size, entry.nbytes)

    # ---- buffers ----------------------------------------------------------------------------

    def _lay_out(self, slot: Slot) -> None:
        """After a slot's first call: split its entries, in execution order, into byte-balanced buckets."""
        entries = list(slot.entries.values())
        total = sum(_aligned(e.nbytes) for e in entries)
        target = max(1, math.ceil(total / max(1, min(self.num_buckets, len(entries)))))
        groups, current, size = [], [], 0
        for entry in entries:
            current.append(entry)
            size += _aligned(entry.nbytes)
            if size >= target:
                groups.append(current)
                current, size = [], 0
        if current:
            groups.append(current)
        device = next(iter(slot.staged.values())).device
        slot.buckets = []
        for index, group in enumerate(groups):
            offset = 0
            for entry in group:
                entry.bucket, entry.offset = index, offset
                offset += _aligned(entry.nbytes)
            bucket = Bucket(group, offset, torch.zeros(offset, dtype=torch.uint8, device=device),
                            torch.zeros(self.size, offset, dtype=torch.uint8, device=device))
            slot.buckets.append(bucket)
            for entry in group:
                received = self._receive_view(bucket, entry)
                received.copy_(slot.staged[entry.key])
                entry.received = [_trim(received[j].view(entry.dtype).view(entry.max_shape), entry.shapes[j])
                                  for j in range(self.size)]
                send = bucket.send[entry.offset:entry.offset + entry.nbytes].view(entry.dtype).view(entry.max_shape)
                entry.send = _trim(send, entry.shapes[self.index])
        slot.staged.clear()

    @staticmethod
    def _receive_view(bucket: Bucket, entry: Entry) -> torch.Tensor:
        return bucket.recv[:, entry.offset:entry.offset + entry.nbytes]

    def _launch_ready(self) -> None:
        ready, self._ready = self._ready, []
        for bucket in ready:
            bucket.work = _all_gather_flat(bucket.recv.view(-1), bucket.send, self.group, async_op=True)
            bucket.queued = 0

    def _wait(self, bucket: Bucket) -> None:
        start = self._mark()
        bucket.work.wait()
        self._record(start)
        bucket.work = None

    def _wait_all(self, slot: Slot) -> None:
        self._launch_ready()
        for bucket in slot.buckets or ():
            if bucket.work is not None:
                self._wait(bucket)
            bucket.queued = 0

    # ---- statistics -------------------------------------------------------------------------

    def reset_stats(self) -> None:
        self._events = []
        self.stats = {"calls": 0, "sync_calls": 0, "async_calls": 0, "collectives": 0, "bytes_sent": 0,
                      "bytes_received": 0, "wait_ms": 0.0}
        for kind in ("sync", "async"):  # the same counters split by the kind of call they happened in
            self.stats.update({f"bytes_sent_{kind}": 0, f"wait_ms_{kind}": 0.0})

    def _kind(self) -> str:
        return "sync" if self.fresh else "async"

    def _count(self, nbytes: int, kind: str) -> None:
        self.stats["collectives"] += 1
        self.stats["bytes_sent"] += nbytes
        self.stats[f"bytes_sent_{kind}"] += nbytes
        self.stats["bytes_received"] += (self.size - 1) * nbytes

    def _mark(self):
        if not self.timing or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return None  # a graph's waits cannot be timed with events read on the host
        if torch.cuda.is_available() and torch.cuda.is_initialized() and self.group is not None and \
                dist.get_backend(self.group) == "nccl":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _record(self, start) -> None:
        if start is None:
            return
        if isinstance(start, float):
            elapsed = (time.perf_counter() - start) * 1e3
            self.stats["wait_ms"] += elapsed
            self.stats[f"wait_ms_{self._kind()}"] += elapsed
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._events.append((start, end, self._kind()))

    def read_stats(self) -> dict:
        """The counters since `reset_stats`; `wait_ms` is the time the compute stream waited on
        communication (CUDA events on GPUs, host time on CPU), measured only while `timing` is set."""
        if self._events:
            torch.cuda.synchronize()
            for start, end, kind in self._events:
                self.stats["wait_ms"] += start.elapsed_time(end)
                self.stats[f"wait_ms_{kind}"] += start.elapsed_time(end)
            self._events = []
        return dict(self.stats)

    def bucket_bytes(self) -> list[int]:
        """Bytes each rank sends per asynchronous call, per bucket, over every laid-out slot."""
        return [b.nbytes for slot in self.slots.values() for b in slot.buckets or ()]

    def time_collectives(self, iters: int = 5) -> float:
        """Milliseconds for one asynchronous call's all-gathers run back to back, not overlapped
        (the communication that asynchronous steps hide); every rank must call it together."""
        buckets = [b for slot in self.slots.values() for b in slot.buckets or ()]
        if not buckets:
            return 0.0
        cuda = buckets[0].send.is_cuda
        times = []
        for _ in range(iters + 1):
            dist.barrier(group=self.group)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for bucket in buckets:
                _all_gather_flat(bucket.recv.view(-1), bucket.send, self.group)
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times[1:])[len(times[1:]) // 2]


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def _trim(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    return tensor[tuple(slice(0, d) for d in shape)]
