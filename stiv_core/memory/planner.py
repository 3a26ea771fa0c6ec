"""The memory planner: from the free device memory, the model, its quantization and the run's shape,
choose how many blocks to swap and whether to decode the VAE in chunks, and say it before the run.

Estimate of the device peak during sampling:
  weights   = non-block tensors + resident blocks + (ring of `prefetch + 1` block buffers if swapping)
  activations (one batched forward, no autograd) = N * (5 D + 2 H) * bytes + scores
    N = passes * batch * tokens (batched JIT-CFG is 2 passes, so it doubles activations; the caller says
    how many passes its guidance batches, the planner does not know guidance modes), D the width,
    H the FFN width: the FFN holds the residual, its norm and modulated input (3 D), fc1's output and
    its GELU (2 H), and a couple of D-wide temporaries; measured within 20% on the CPU (tests).
    scores: the math backend materializes `(B*T', heads, S, S)` float32 scores and their softmax;
    SDPA's flash / memory-efficient kernels do not.
  + the latent in/out tensors and a fixed workspace (cuBLAS, allocator slack on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import STIVConfig
from ..model.attention import AttentionBackend
from ..model.sizes import meta_model, tensor_bytes
from . import ram as host
from .quant import QuantConfig, quantize_blocks

MiB, GiB = 2 ** 20, 2 ** 30
CUDA_WORKSPACE = 512 * MiB   # cuBLAS workspaces, allocator fragmentation, kernels' scratch
CPU_WORKSPACE = 0         # measured: on the CPU the formula alone is within 1% (tests)


@dataclass(frozen=True)
class RunShape:
    """One sampling run in latent units: `(batch, C, frames, height, width)` latents, `passes` guidance
    passes batched in each forward (`len(GuidanceConfig.passes)`: none 1, cfg / JIT 2, SIT 3)."""

    frames: int
    height: int
    width: int
    batch: int = 1
    passes: int = 2              # the default guidance, JIT-CFG
    forwards_per_step: int = 1   # model evaluations per step (Euler 1, Heun 2)

    def __post_init__(self) -> None:
        if not (isinstance(self.passes, int) and self.passes >= 1):
            raise ValueError(f"RunShape.passes must be an int >= 1 (guidance passes per forward), got {self.passes!r}")

    @classmethod
    def from_pixels(cls, frames: int, height: int, width: int, *, vae_factor: int = 8, **kw) -> RunShape:
        return cls(frames, height // vae_factor, width // vae_factor, **kw)


@dataclass(frozen=True)
class VAEProfile:
    """Decode cost of the VAE. Defaults: an SD-style 8x VAE in float16 (an estimate, not measured:
    ~50M parameters, a peak of ~1.5 KB of activations per output pixel of one frame)."""

    weight_bytes: int = 100 * MiB
    bytes_per_pixel: float = 1536.0
    spatial_factor: int = 8


# The built-in model's pixel "VAE" (bundle.SUPPORTED_VAES): no weights, float32 RGB per pixel, factor 1.
PIXEL_VAE = VAEProfile(weight_bytes=0, bytes_per_pixel=12.0, spatial_factor=1)


@dataclass(frozen=True)
class Budget:
    """Free bytes on the device and in host RAM: what `probe` measures now (after anything else already
    there), or what `whole_device` assumes (the device as if nothing else were on it). None = unknown
    (`unknown` says why): the planner then does not check that memory, and says so in its reason."""

    device_free: Optional[int]
    ram_free: Optional[int]
    device_type: str = "cuda"
    unknown: str = ""

    @classmethod
    def probe(cls, device: torch.device | str) -> Budget:
        device = torch.device(device)
        ram = host.host_ram()
        if device.type == "cuda":
            free, _, why = _cuda_memory(device)
            return cls(free, ram.available, "cuda", _join(why, ram.unknown))
        return cls(ram.available, ram.available, device.type, ram.unknown)

    @classmethod
    def whole_device(cls, device: torch.device | str) -> Budget:
        """All of the device's memory and the host RAM available now: the budget of a run that frees the
        device's other models first (a plan made while they, or this model's own weights, are loaded would
        otherwise count them against it). On the CPU the device is the host RAM: all of it."""
        device = torch.device(device)
        ram = host.host_ram()
        if device.type == "cuda":
            _, total, why = _cuda_memory(device)
            return cls(total, ram.available, "cuda", _join(why, ram.unknown))
        return cls(ram.total, ram.available, device.type, ram.unknown)

    @classmethod
    def unbounded(cls, device_type: str = "cuda") -> Budget:
        """No limit: for what a run needs (its peak), not whether it fits."""
        return cls(UNBOUNDED, UNBOUNDED, device_type)

    def plus_held(self, held_bytes: int) -> Budget:
        """This budget with `held_bytes` of the model's own tensors, already in host RAM, given back: the
        plan counts them (in its peak on the CPU, where the device is the RAM; as the swapped blocks' host
        copies on a GPU), but what is available now no longer includes them."""
        if held_bytes == 0:
            return self
        add = lambda n: None if n is None else n + held_bytes
        device = add(self.device_free) if self.device_type == "cpu" else self.device_free
        return Budget(device, add(self.ram_free), self.device_type, self.unknown)

    @property
    def workspace(self) -> int:
        return CUDA_WORKSPACE if self.device_type == "cuda" else CPU_WORKSPACE


UNBOUNDED = 1 << 62


def _cuda_memory(device: torch.device) -> tuple[Optional[int], Optional[int], str]:
    """(free, total, why unknown) of a CUDA device; unknown where the query fails (no CUDA here)."""
    try:
        free, total = torch.cuda.mem_get_info(device)
        return free, total, ""
    except (RuntimeError, AssertionError) as err:   # torch without CUDA asserts
        return None, None, f"{device} memory unknown ({err})"


def _join(*reasons: str) -> str:
    return "; ".join(r for r in reasons if r)


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of one block and of everything outside the blocks, as stored (quantized or not)."""

    block_bytes: int
    other_bytes: int
    blocks: int

    @classmethod
    def of(cls, config: STIVConfig, quant: QuantConfig, dtype: torch.dtype) -> ModelSizes:
        model = meta_model(config, dtype)
        quantize_blocks(model, quant)
        blocks = model.all_blocks()
        block = tensor_bytes(blocks[0])
        return cls(block, tensor_bytes(model) - block * len(blocks), len(blocks))


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """The planner's decision (built by keyword: twelve numbers are easy to misorder). `budget_bytes`
    is None where the device's free memory was unknown (the verdict then says it was not checked)."""

    blocks: int
    blocks_to_swap: int
    ring: int
    block_bytes: int
    weight_bytes: int          # on the device: non-block + resident blocks + ring
    activation_bytes: int
    peak_bytes: int
    budget_bytes: Optional[int]
    ram_needed: int            # host RAM for the streamed blocks' pinned masters
    swap_bytes_per_step: int
    vae_chunk_frames: int
    fits: bool
    reason: str

    def describe(self) -> str:
        gb = lambda n: "unknown" if n is None else f"{n / GiB:.2f} GiB"
        lines = [f"memory plan: {'fits' if self.fits else 'DOES NOT FIT'} ({self.reason})",
                 f"  weights on device {gb(self.weight_bytes)} ({self.blocks - self.blocks_to_swap} of "
                 f"{self.blocks} blocks resident, {self.blocks_to_swap} swapped through a ring of {self.ring})",
                 f"  activations {gb(self.activation_bytes)}; peak {gb(self.peak_bytes)} of {gb(self.budget_bytes)}",
                 f"  swap traffic {gb(self.swap_bytes_per_step)} per step; pinned host RAM {gb(self.ram_needed)}",
                 f"  VAE decode: {self.vae_chunk_frames} frames at a time"]
        return "\n".join(lines)


def activation_bytes(config: STIVConfig, shape: RunShape, dtype: torch.dtype,
                     backend: AttentionBackend = AttentionBackend.SDPA) -> int:
    """Peak activations of one batched forward (see the module docstring)."""
    p, pt = config.patch_size, config.temporal_patch
    frames, spatial = shape.frames // pt, (shape.height // p) * (shape.width // p)
    batch = shape.passes * shape.batch
    n = batch * frames * spatial
    elem = torch.finfo(dtype).bits // 8
    total = n * (5 * config.hidden_size + 2 * config.mlp_hidden) * elem
    if backend is AttentionBackend.MATH:
        total += 2 * batch * frames * config.num_heads * spatial ** 2 * 4
    latents = batch * config.latent_channels * shape.frames * shape.height * shape.width * 4
    return total + 3 * latents


def plan_memory(config: STIVConfig, shape: RunShape, budget: Budget, *, quant: QuantConfig = QuantConfig(),
                dtype: torch.dtype = torch.bfloat16, blocks_to_swap: Optional[int] = None, prefetch: int = 1,
                backend: AttentionBackend = AttentionBackend.SDPA, vae: VAEProfile = VAEProfile()) -> MemoryPlan:
    """The plan for this run. `blocks_to_swap=None` chooses the fewest swapped blocks that fit."""
    sizes = ModelSizes.of(config, quant, dtype)
    acts = activation_bytes(config, shape, dtype, backend) + budget.workspace
    fixed = sizes.other_bytes + acts
    free = UNBOUNDED if budget.device_free is None else budget.device_free

    def peak(swap: int) -> int:
        ring = min(prefetch + 1, swap)
        return fixed + (sizes.blocks - swap + ring) * sizes.block_bytes

    if blocks_to_swap is None:
        fitting = [s for s in range(sizes.blocks + 1) if peak(s) <= free]
        swap = fitting[0] if fitting else sizes.blocks
    else:
        if not 0 <= blocks_to_swap <= sizes.blocks:
            raise ValueError(f"blocks_to_swap must be in 0..{sizes.blocks}, got {blocks_to_swap}")
        swap = blocks_to_swap
    ring = min(prefetch + 1, swap)
    total = peak(swap)
    ram = swap * sizes.block_bytes
    fits, reason = _verdict(total, ram, budget, swap == sizes.blocks)
    resident = sizes.other_bytes + (sizes.blocks - swap + ring) * sizes.block_bytes
    return MemoryPlan(blocks=sizes.blocks, blocks_to_swap=swap, ring=ring, block_bytes=sizes.block_bytes,
                      weight_bytes=total - acts, activation_bytes=acts, peak_bytes=total,
                      budget_bytes=budget.device_free, ram_needed=ram,
                      swap_bytes_per_step=ram * shape.forwards_per_step if swap > ring else 0,
                      vae_chunk_frames=_vae_chunk(shape, free - resident, vae), fits=fits, reason=reason)


def _verdict(peak: int, ram: int, budget: Budget, all_swapped: bool) -> tuple[bool, str]:
    """Fits or not, and why, in words for the person who has to change something."""
    free, ram_free, gb = budget.device_free, budget.ram_free, lambda n: f"{n / GiB:.2f} GiB"
    if free is None:
        return True, f"needs {gb(peak)}; not checked: {budget.unknown or 'free memory unknown'}"
    if peak > free:
        if budget.device_type == "cpu":   # the blocks already live in RAM: swapping them saves nothing
            return False, (f"needs {gb(peak)}, {gb(free)} of RAM free: lower the frames, resolution or batch, "
                           f"or quantize (fp8 / nf4); block swap saves no memory on the CPU")
        hint = "even with every block swapped; " if all_swapped else ""
        return False, (f"needs {gb(peak)}, {gb(free)} free: {hint}swap more blocks, "
                       f"quantize (fp8 / nf4), or lower the resolution, frames or batch")
    if ram_free is not None and ram > ram_free:
        return False, f"the swapped blocks need {gb(ram)} of host RAM, {gb(ram_free)} free"
    unchecked = f"; host RAM not checked: {budget.unknown}" if ram and ram_free is None else ""
    return True, f"{gb(peak)} of {gb(free)}{unchecked}"


def _vae_chunk(shape: RunShape, free_for_vae: int, vae: VAEProfile) -> int:
    """Frames decoded at once: all of them if they fit next to the resident weights, else fewer."""
    pixels = shape.height * shape.width * vae.spatial_factor ** 2 * shape.batch
    per_frame = max(1, int(pixels * vae.bytes_per_pixel))
    fit = (free_for_vae - vae.weight_bytes) // per_frame
    return int(max(1, min(shape.frames, fit)))
