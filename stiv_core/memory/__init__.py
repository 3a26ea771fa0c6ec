"""Low-VRAM machinery attached from outside the model: quantized weights (module swaps), block swap
with prefetch (hooks), the memory planner, and `apply_memory_options`, the one entry point used by the
CLI, the Loader node and the trainer.
"""
