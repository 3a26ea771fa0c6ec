"""Block swap: the first N transformer blocks stay on the device, the rest stream from the CPU.

Attached from outside the model with forward hooks; the model's modules and attributes are never
changed while it samples. How it works:

- The CPU copy of every streamed block is the master: its tensors are pinned once (on CUDA, so
  copies can run asynchronously) and nothing is ever copied back to the CPU.
- A ring of `prefetch + 1` device buffers, each shaped like one block, is allocated when the swapper
  attaches and reused every step; `park()` frees it between runs (with the resident weights moved to
  the CPU) and `unpark()` allocates it again.
- Before streamed block j runs (pre-hook), its tensors' storage is pointed at the ring buffer holding
  it, and the copies of the next `prefetch` blocks are issued on a dedicated CUDA stream, so they
  overlap block j's compute. After block j (post-hook, also on error), its tensors point back at the
  master copy: a pointer swap, not a copy. The last block prefetches the first, for the next step.
- CUDA events order the two streams: compute waits for a buffer's copy, and a copy into a buffer
  waits until the compute that last read it is done.

With device = CPU the same ring, order and pointer swaps run with synchronous copies: that is how
the logic is tested on machines without a GPU. `cpu_copies=False` keeps that bookkeeping but points a
ring slot at the block's master instead of copying it (on the CPU the master already is in the
"device" memory): what the nodes and the CLI use when the device is the CPU, and how the benchmark
isolates the cost of the hooks from the cost of the copies. Inference only: autograd would keep references to
ring buffers that are later overwritten, so a streamed block refuses to run with gradients enabled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass
class _Slot:
    """One ring buffer: device tensors shaped like a block's, and the events that guard them."""

    tensors: list[torch.Tensor]
    loaded: Optional[torch.cuda.Event]     # recorded on the copy stream when the copy is issued
    released: Optional[torch.cuda.Event]   # recorded on the compute stream after the block ran
    block: Optional[int] = None            # the streamed block it holds


@dataclass
class SwapStats:
    loads: int = 0          # block copies issued host -> device
    bytes_copied: int = 0


def _block_tensors(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*block.named_parameters(), *((n, b) for n, b in block.named_buffers() if b is not None)]


class BlockSwapper:
    """Streams the last `blocks_to_swap` blocks of `model` through a ring of device buffers.

    `attach()` moves everything else to `device`; `remove()` takes the hooks off (the streamed blocks
    stay on the CPU, their master copy).
    """

    def __init__(self, model: nn.Module, blocks_to_swap: int, *, device: torch.device | str,
                 prefetch: int = 1, cpu_copies: bool = True):
        blocks = model.all_blocks()   # run order: the last ones stream
        if not 0 <= blocks_to_swap <= len(blocks):
            raise ValueError(f"blocks_to_swap must be in 0..{len(blocks)} (the model's blocks), got {blocks_to_swap}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 (blocks loaded ahead), got {prefetch}")
        self.model, self.device, self.prefetch = model, torch.device(device), prefetch
        self.resident = blocks[: len(blocks) - blocks_to_swap]
        self.streamed = blocks[len(blocks) - blocks_to_swap:]
        self.stats = SwapStats()
        self._cuda = self.device.type == "cuda"
        self._alias = self.device.type == "cpu" and not cpu_copies  # slots point at the masters
        self._handles: list[RemovableHandle] = []
        self._objects: list[list[torch.Tensor]] = []   # per streamed block: its Parameter/buffer objects
        self._masters: list[list[torch.Tensor]] = []   # per streamed block: the CPU master tensors
        self._slots: list[_Slot] = []
        self._slot_of: dict[int, _Slot] = {}
        self._next_slot = 0
        self._copy_stream: Optional[torch.cuda.Stream] = None

    @property
    def ring_size(self) -> int:
        return min(self.prefetch + 1, len(self.streamed))

    @property
    def block_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._masters[0]) if self._masters else 0

    @torch.no_grad()
    def attach(self, *, parked: bool = False) -> BlockSwapper:
        """Hooks on and the streamed blocks' masters made; with `parked`, nothing goes to the device yet
        (the state `park()` leaves: `unpark()` before the first run)."""
        if self._handles:
            raise RuntimeError("this BlockSwapper is already attached")
        if self._cuda and not torch.cuda.is_available():
            raise RuntimeError(f"block swap to {self.device} needs CUDA, which is not available here")
        if not parked:
            self._move_resident(self.device)
        signature = None
        for j, block in enumerate(self.streamed):
            named = _block_tensors(block)
            sig = [(n, t.shape, t.dtype) for n, t in named]
            if signature is not None and sig != signature:
                raise ValueError("streamed blocks differ in their tensors (names, shapes or dtypes); "
                                 "block swap needs identical blocks (quantize all of them the same way)")
            signature = sig
            self._objects.append([t for _, t in named])
            self._masters.append([self._make_master(t) for _, t in named])
            handle_pre = block.register_forward_pre_hook(lambda m, a, j=j: self._before(j))
            handle_post = block.register_forward_hook(lambda m, a, o, j=j: self._after(j), always_call=True)
            self._handles += [handle_pre, handle_post]
        if self.streamed and not parked:
            self._allocate_ring()
        return self

    def _move_resident(self, device: torch.device) -> None:
        """Everything but the streamed blocks' tensors to `device`."""
        streamed_ids = {id(t) for b in self.streamed for _, t in _block_tensors(b)}
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            if id(tensor) not in streamed_ids:
                tensor.data = tensor.data.to(device)

    @torch.no_grad()
    def park(self) -> None:
        """Between runs: the ring freed and the resident tensors moved to the CPU (hooks stay on)."""
        self._release_ring()
        self._move_resident(torch.device("cpu"))

    @torch.no_grad()
    def unpark(self) -> None:
        """Undo `park`: the resident tensors back on the device and a fresh ring."""
        self._move_resident(self.device)
        if self.streamed and not self._slots:
            self._allocate_ring()

    def _release_ring(self) -> None:
        if self._copy_stream is not None:
            # the last block prefetched the first: that copy may still be writing into a ring buffer,
            # which must not go back to the allocator (and be reused) before it is done
            self._copy_stream.synchronize()
        self._slots.clear()
        self._slot_of.clear()
        self._next_slot = 0

    def _make_master(self, tensor: torch.Tensor) -> torch.Tensor:
        master = tensor.data.to("cpu")
        if self._cuda:
            master = master.pin_memory()  # page-locked: the host->device copy can be asynchronous
        tensor.data = master
        return master

    def _allocate_ring(self) -> None:
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
        for _ in range(self.ring_size):
            tensors = [] if self._alias else [torch.empty_like(m, device=self.device) for m in self._masters[0]]
            events = (torch.cuda.Event(), torch.cuda.Event()) if self._cuda else (None, None)
            self._slots.append(_Slot(tensors, *events))

    def remove(self) -> None:
        """Detach: hooks off, ring freed; streamed blocks keep their CPU master tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._release_ring()

    def _load(self, j: int) -> _Slot:
        """Issue the copy of streamed block j into the oldest ring buffer (aliasing: point it at the master)."""
        slot = self._slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        if slot.block is not None:
            del self._slot_of[slot.block]
        slot.block, self._slot_of[j] = j, slot
        self.stats.loads += 1
        if self._alias:
            slot.tensors = self._masters[j]
            return slot
        pairs = list(zip(slot.tensors, self._masters[j]))
        if self._cuda:
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(slot.released)  # the last reader of this buffer is done
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
                slot.loaded.record(self._copy_stream)
        else:
            for dst, src in pairs:
                dst.copy_(src)
        self.stats.bytes_copied += sum(src.numel() * src.element_size() for _, src in pairs)
        return slot

    def _before(self, j: int) -> None:
        if torch.is_grad_enabled() and any(t.requires_grad for t in self._objects[j]):
            raise RuntimeError("block swap is for inference: run under torch.no_grad()/inference_mode, "
                               "or freeze the model (requires_grad_(False))")
        slot = self._slot_of.get(j) or self._load(j)  # a cold start loads on demand
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.loaded)
        for obj, tensor in zip(self._objects[j], slot.tensors):
            obj.data = tensor
        for k in range(1, self.prefetch + 1):
            upcoming = (j + k) % len(self.streamed)
            if upcoming not in self._slot_of:
                self._load(upcoming)

    def _after(self, j: int) -> None:
        for obj, master in zip(self._objects[j], self._masters[j]):
            obj.data = master  # the master is already up to date: nothing is copied back
        slot = self._slot_of.get(j)
        if self._cuda and slot is not None:
            slot.released.record(torch.cuda.current_stream(self.device))
