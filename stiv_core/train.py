"""The headless STIV trainer.

    python stiv_core/train.py --config stiv_core/configs/tiny.toml [key=value ...]
    accelerate launch stiv_core/train.py --config FILE [key=value ...]     # DDP, many GPUs
    accelerate launch --use_fsdp --fsdp_version 2 stiv_core/train.py ...   # FSDP2: sharded weights

Reads top to bottom: build the model (optionally from a progressive-init checkpoint), the optimizer,
let accelerate wrap them, then the EMA (sharded as the model is) and the data; resume from the newest
complete checkpoint; then loop: one flow-matching step with the recipe's task mixture and condition
dropout, clip, step, EMA, log, checkpoint, sample. Devices, mixed precision and distribution are
accelerate's; checkpoints are ours (safetensors, full tensors whatever the sharding: a run resumes
on another number of processes, FSDP or not, see training/full_state.py; the data order then differs
from an uninterrupted run's, with a warning).
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make `stiv_core` importable, run this as its module
    import runpy
    import sys
    from pathlib import Path as _Path

    _here = _Path(__file__).resolve().parent
    sys.path = [p for p in sys.path if _Path(p or ".").resolve() != _here]  # no top-level `config`
    sys.path.insert(0, str(_here.parent))
    runpy.run_module("stiv_core.train", run_name="__main__", alter_sys=True)
    raise SystemExit(0)

import argparse
import importlib.util
import json
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from . import cli
from .data.config import DataKind
from .data.loader import build_dataset, build_loader, mix_seed
from .data.sample import SampleBatch
from .bundle import SamplingDefaults, TrainedWith, save_bare_model, save_bundle
from .encoders.vae import VAEFamily
from .encoders.words import WordTextEncoder
from .interfaces import TextEncoder, VideoVAE
from .model.transformer import STIVTransformer
from .dtypes import WEIGHT_DTYPES
from .training.cache import check_cache_source
from .training.config import ConfigError, TrainConfig, load_config
from .training.encoders import build_encoders
from .training.ema import EMA
from .training.init import initialize
from .training.optim import build_optimizer, build_scheduler
from .training.recipe import TrainBatch, frozen_parameter_names, training_loss
from .training.samples import write_samples
from .training.full_state import (configure_sharding, full_model_state, full_optimizer_state, load_full_model_state,
                                 load_full_optimizer_state, parameter_names)
from .training.state import (Snapshot, TrainerState, read_checkpoint, remove_incomplete, save_checkpoint,
                             usable_checkpoint)

log = logging.getLogger("stiv_core.train")


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)   # this process's losses, one per step run
    skipped: list[str] = field(default_factory=list)    # every unreadable / too-short file seen
    model_path: Optional[Path] = None                   # the exported EMA model


@cli.entry_point
def main(argv: Optional[Sequence[str]] = None) -> TrainResult:
    """A user error (a bad config value, an unwritable output_dir, no usable checkpoint) exits with status
    2 and one line before anything is built, or when the build finds it (see `cli`)."""
    parser = cli.ArgumentParser(prog="python stiv_core/train.py", description="Train or finetune a STIV model.")
    parser.add_argument("--config", required=True, help="TOML file (see stiv_core/configs/)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="same as resume=true/false")
    parser.add_argument("overrides", nargs="*", help="key=value or section.key=value (TOML values)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"resume={str(args.resume).lower()}"] if args.resume is not None else [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = load_config(args.config, overrides)   # a ConfigError: before anything is built
    try:
        return train(config)
    except Stopped as stopped:   # asked to stop and saved: a message and the signal's exit status, no traceback
        log.warning("%s; the same command resumes it", stopped)
        raise SystemExit(stopped.exit_status) from None


def train(config: TrainConfig) -> TrainResult:
    check_output_dir(config)
    accelerator = Accelerator(mixed_precision=config.mixed_precision.value,
                              log_with="tensorboard" if _has_tensorboard() else None,
                              project_dir=config.output_dir)
    try:
        return run(accelerator, config)
    finally:
        accelerator.end_training()
        # accelerate keeps its settings in a process-wide singleton; clear them (not the process
        # group) so another train() in this process may use other settings (tests, notebooks).
        AcceleratorState._reset_state(reset_partial_state=False)


def run(accelerator: Accelerator, config: TrainConfig) -> TrainResult:
    configure_sharding(accelerator)
    config.output_path.mkdir(parents=True, exist_ok=True)
    resume_from = _resume_point(config) if accelerator.is_main_process else None
    resume_from = _broadcast_path(accelerator, resume_from)

    torch.manual_seed(config.seed)  # the same initial weights on every process
    model = STIVTransformer(config.model)
    initialize(model, config.init)
    model.gradient_checkpointing = config.gradient_checkpointing
    for name in frozen_parameter_names(model, config.recipe):
        model.get_parameter(name).requires_grad_(False)
    optimizer = build_optimizer(model.parameters(), config.optim)
    scheduler = build_scheduler(optimizer, config.optim)  # stepped by us: once per optimizer step
    text_encoder, vae = build_encoders(config, accelerator.device)
    if accelerator.is_main_process:
        log.info("training on %d process(es), %s", accelerator.num_processes, accelerator.distributed_type)

    # Checkpoints are loaded after prepare(): FSDP2 replaces the parameters, so state is given to the
    # (possibly sharded) parameters the run trains, whatever wrote it (see training/full_state.py).
    raw_optimizer = optimizer
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(accelerator.unwrap_model(model), config.optim.ema_decay)  # sharded as the model is
    state = TrainerState()
    if resume_from is not None:
        snapshot = read_checkpoint(resume_from, parameter_names=parameter_names(accelerator.unwrap_model(model),
                                                                                raw_optimizer))
        state = _restore(snapshot, accelerator, model, ema, raw_optimizer, scheduler)
        log.info("resumed from %s at step %d", resume_from, state.step)
        if state.world is not None and state.world != accelerator.num_processes and accelerator.is_main_process:
            log.warning("resumed on %d process(es) from a checkpoint written by %d: weights, optimizer and schedule "
                        "continue exactly, but the data order does not (each step's samples are placed by process "
                        "count, so part of the current epoch is skipped or seen twice)",
                        accelerator.num_processes, state.world)
    dataset = build_dataset(config.data)
    check_cache_source(dataset, config)
    loader = build_loader(dataset, config.data, batch_size=config.batch_size, seed=config.seed,
                          start_step=state.step, rank=accelerator.process_index, world=accelerator.num_processes)
    if accelerator.is_main_process and _has_tensorboard():
        accelerator.init_trackers("stiv")

    result = TrainResult(state.step, skipped=state.skipped)
    save = lambda: _save(accelerator, config, model, ema, raw_optimizer, scheduler, state)
    bar = tqdm(total=config.max_steps, initial=state.step, disable=not accelerator.is_main_process,
               desc="train", dynamic_ncols=True)
    stop = StopRequest()
    previous_handlers = stop.install()
    saved_at = state.step if resume_from is not None else -1
    try:
        for step, sample_batch in zip(range(state.step, config.max_steps), loader):
            batch = encode_batch(sample_batch, text_encoder, vae, config, accelerator.device)
            loss = train_step(accelerator, model, optimizer, scheduler, batch, config, step)
            if not accelerator.optimizer_step_was_skipped:   # fp16: the scaler skips steps with inf grads
                ema.update(accelerator.unwrap_model(model))
            state.step = step + 1
            _note_skips(state, sample_batch)
            result.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", skipped=len(state.skipped))
            _log_metrics(accelerator, config, state, loss, scheduler.get_last_lr()[0])
            if state.step % config.checkpoint_every == 0 and state.step < config.max_steps:
                save()
                saved_at = state.step
            if config.sample_every and state.step % config.sample_every == 0:
                ema_model = _ema_model(ema, config, accelerator.device)  # gathered on every rank
                if ema_model is not None:
                    write_samples(ema_model, text_encoder, vae, config, state.step)
            if stop.agreed(accelerator):   # only here, between steps: model, EMA and counter agree
                log.warning("stopped by signal %s after step %d: saving a checkpoint before exiting",
                            stop.signum, state.step)
                if saved_at != state.step:
                    save()
                raise Stopped(stop.signum, state.step, config.output_dir)
    finally:
        stop.uninstall(previous_handlers)
        bar.close()
    if result.losses:  # a resumed run that was already complete has nothing new to save
        save()
    result.step, result.skipped = state.step, list(state.skipped)
    result.model_path = _export(accelerator, config, ema, text_encoder, vae)
    if state.skipped:
        log.warning("%d unreadable or too-short files were skipped, e.g. %s", len(state.skipped), state.skipped[:3])
    return result


def train_step(accelerator: Accelerator, model, optimizer, scheduler, batch: TrainBatch,
               config: TrainConfig, step: int) -> float:
    """One optimizer step. Its randomness is a function of (seed, step, rank): resumable exactly."""
    generator = torch.Generator().manual_seed(mix_seed(config.seed, step, accelerator.process_index, 4))
    # Code that draws from the global RNG (a dropout layer, a library) is then exact on resume too.
    torch.manual_seed(mix_seed(config.seed, step, accelerator.process_index, 5))
    model.train()
    with accelerator.autocast():
        loss, _ = training_loss(model, batch, config.recipe, step=step, generator=generator, config=config.model)
    accelerator.backward(loss)
    if config.optim.grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:   # a step the fp16 grad scaler skipped moves no schedule
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(loss.detach(), reduction="mean"))


def encode_batch(batch: SampleBatch, text_encoder: TextEncoder, vae: VideoVAE, config: TrainConfig,
                 device: torch.device) -> TrainBatch:
    """Pixels -> latents and captions -> text embeddings, with no gradient (both are frozen)."""
    if getattr(batch, "latents", None) is not None:  # from the cache: nothing to encode
        return TrainBatch(batch.latents.to(device), batch.text.to(device), batch.micro.to(device))
    with torch.no_grad():
        latents = vae.encode(batch.pixels.to(device)).float()
        text = text_encoder.encode(list(batch.captions)).fit(config.model.max_text_tokens).to(device)
    return TrainBatch(latents, text, batch.micro.to(device))


def check_output_dir(config: TrainConfig) -> None:
    """output_dir must be a folder this process can write (created if missing): a ConfigError before any work."""
    try:
        cli.writable_output(config.output_dir, folder=True)
    except (ValueError, OSError) as err:
        raise ConfigError(f"output_dir: {err}") from None


def _resume_point(config: TrainConfig) -> Optional[Path]:
    """The newest complete and readable checkpoint (damaged newer ones are logged and left in place)."""
    remove_incomplete(config.output_dir)
    found, damaged = usable_checkpoint(config.output_dir)
    if (found or damaged) and not config.resume:
        newest = damaged[0][0] if damaged else found
        raise ConfigError(f"resume is false but {config.output_dir} already holds checkpoints (newest "
                          f"{newest.name}): set resume=true to continue, or choose another output_dir")
    for path, why in damaged:
        log.warning("skipping the damaged checkpoint %s (%s); it is left in place", path.name, why)
    if found is None and damaged:
        raise ConfigError(f"no usable checkpoint to resume from in {config.output_dir}: every one is damaged "
                          f"({'; '.join(f'{p.name}: {why}' for p, why in damaged)}); to start fresh, choose "
                          f"another output_dir (or move the step_* folders out of {config.output_dir}/checkpoints)")
    return found


def _broadcast_path(accelerator: Accelerator, path: Optional[Path]) -> Optional[Path]:
    if accelerator.num_processes == 1:
        return path
    from accelerate.utils import broadcast_object_list
    box = [str(path) if path else None]
    broadcast_object_list(box)
    return Path(box[0]) if box[0] else None


def _save(accelerator, config, model, ema, optimizer, scheduler, state) -> None:
    """Every rank gathers (FSDP shards are collected), the main process writes."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda_{i}": r for i, r in enumerate(torch.cuda.get_rng_state_all())})
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    snapshot = Snapshot(model=full_model_state(unwrapped), ema=ema.full_state_dict(),
                        optimizer=full_optimizer_state(unwrapped, optimizer), scheduler=scheduler.state_dict(),
                        trainer=TrainerState(state.step, list(state.skipped), accelerator.num_processes),
                        scaler=scaler, rng=rng)
    if accelerator.is_main_process:
        path = save_checkpoint(config.output_dir, snapshot, config=config.model, keep_last=config.keep_last)
        log.info("saved %s", path)
    accelerator.wait_for_everyone()


def _restore(snapshot: Snapshot, accelerator: Accelerator, model, ema: EMA, optimizer, scheduler) -> TrainerState:
    """Give a checkpoint's full state to the live objects (each rank keeps its shard)."""
    unwrapped = accelerator.unwrap_model(model)
    load_full_model_state(unwrapped, snapshot.model)
    ema.load_full_state_dict(snapshot.ema)
    load_full_optimizer_state(unwrapped, optimizer, snapshot.optimizer)
    sched = scheduler.state_dict()
    sched.update(snapshot.scheduler)
    scheduler.load_state_dict(sched)
    if accelerator.scaler is not None:
        if snapshot.scaler:
            accelerator.scaler.load_state_dict(snapshot.scaler)
        else:
            log.warning("the checkpoint has no fp16 grad scaler state: the loss scale starts afresh")
    torch.set_rng_state(snapshot.rng["torch_cpu"])
    cuda = [snapshot.rng[k] for k in sorted(snapshot.rng) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return snapshot.trainer


def _ema_model(ema: EMA, config: TrainConfig, device: torch.device) -> Optional[STIVTransformer]:
    """The EMA weights as a model on the main process (None elsewhere). Every rank calls it."""
    state = ema.full_state_dict(device=device)
    if not state:
        return None
    with torch.device("meta"):
        model = STIVTransformer(config.model)
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def _export(accelerator: Accelerator, config: TrainConfig, ema: EMA, text_encoder: TextEncoder,
            vae: VideoVAE) -> Optional[Path]:
    """The EMA weights as the run's model (`output_dir/model.safetensors`, loadable by load_model);
    with the word encoder, a bundle that `python -m stiv_core.generate --model PATH` runs; otherwise a
    bare model whose metadata records the encoders it was trained with (`TrainedWith`) and its size."""
    ema_model = _ema_model(ema, config, torch.device("cpu"))  # gathered on every rank
    if not accelerator.is_main_process:
        return None
    path = config.output_path / "model.safetensors"
    frames, height, width = config.data.buckets[0]
    defaults = SamplingDefaults(num_frames=frames, height=height, width=width, steps=config.sample_steps,
                                multiview=config.data.kind == DataKind.OBJECTS, scale=config.sample_scale)
    dtype = WEIGHT_DTYPES[config.export_dtype]
    if isinstance(text_encoder, WordTextEncoder):
        save_bundle(path, ema_model, text_encoder, defaults=defaults, dtype=dtype)
    else:
        save_bare_model(path, ema_model, trained_with(config, text_encoder, vae), defaults=defaults, dtype=dtype)
    return path


def trained_with(config: TrainConfig, text_encoder: TextEncoder, vae: VideoVAE) -> TrainedWith:
    """The record of this run's encoders that a bare exported model carries."""
    families = {f.value for f in VAEFamily}
    family = config.vae_config.lower() if config.vae_config.lower() in families else ""  # not a config.json
    pooled_encoder = getattr(text_encoder, "pooled_encoder", text_encoder)  # a CombinedTextEncoder's second
    return TrainedWith(
        vae_kind=config.vae, latent_channels=int(vae.latent_channels),
        spatial_factor=int(vae.spatial_factor), scaling_factor=float(vae.scaling_factor),
        shift_factor=float(vae.shift_factor),
        vae_family=family, text_encoder=config.text_encoder,
        text_encoder_name=Path(config.text_encoder_path).name if config.text_encoder_path else "",
        text_dim=config.model.text_dim, pooled_text_dim=config.model.pooled_text_dim,
        pooled_from_clip=bool(getattr(pooled_encoder, "is_clip", False)))


def _note_skips(state: TrainerState, batch: SampleBatch) -> None:
    for path in batch.skipped:
        if path not in state.skipped:
            state.skipped.append(path)


def _log_metrics(accelerator: Accelerator, config: TrainConfig, state: TrainerState, loss: float, lr: float) -> None:
    if not accelerator.is_main_process or (state.step % config.log_every and state.step != config.max_steps):
        return
    metrics = {"step": state.step, "loss": loss, "lr": lr, "skipped": len(state.skipped)}
    with open(config.output_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")
    if _has_tensorboard():
        accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=state.step)


def _has_tensorboard() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class Stopped(KeyboardInterrupt):
    """The run stopped on request after saving step `step`; a KeyboardInterrupt, so that callers of
    `train()` see the Ctrl-C they sent, and `main` exits quietly with 128 + the signal number."""

    def __init__(self, signum: int | str, step: int, output_dir) -> None:
        super().__init__(f"stopped by signal {signum} at step {step}, checkpoint saved in {output_dir}")
        self.signum, self.step = signum, step
        self.exit_status = 128 + signum if isinstance(signum, int) else 1   # "on another process": no number


class StopRequest:
    """SIGTERM (a scheduler stopping the job) or Ctrl-C asks the run to stop after the current step with a
    checkpoint; a second signal stops at once, without one.

    The handler only records the request: an exception raised at an arbitrary line (between
    `optimizer.step()` and the step counter, or inside it) would save a checkpoint that is half one step
    and half the next, and under DDP/FSDP ranks would enter the save's collectives at different points.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int | str] = None

    def __call__(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {signum} again: stopping now, without a checkpoint")
        self.signum = signum
        log.warning("signal %d: stopping after this step, with a checkpoint (send it again to stop now)", signum)

    def install(self) -> dict:
        """Handle the signals (only the main thread can); returns the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self) for sig in self.SIGNALS}

    @staticmethod
    def uninstall(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop: every rank gets the same answer at the same step."""
        asked = self.signum is not None
        if accelerator.num_processes == 1:
            return asked
        flag = torch.tensor([1.0 if asked else 0.0], device=accelerator.device)
        anyone = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        if anyone and self.signum is None:
            self.signum = "on another process"
        return anyone


if __name__ == "__main__":
    main()
