"""The training loop: one function, :func:`train`, from a validated run config to a run directory.

Run directory: ``config.yaml`` (resolved), ``origin.json`` (the file and ``--set`` overrides it was resolved
from), ``classes.json`` (the training set's class names), ``metrics.jsonl``, ``tensorboard/``, ``checkpoint.pt``
(each epoch, atomic), ``adapter/`` (the core's adapter files, each epoch) and ``summary.json`` at the end.
``resume=True`` continues from the last checkpoint with the same data order, RNG streams and schedule, so on CPU the
loss curve equals an uninterrupted run; resuming a finished run changes nothing.

Controllers: at the start of every optimizer step the loop calls :func:`vpeft.control` (the method's ``control``
hook, then the ``callbacks`` passed to :func:`train`, each ``callable(ctx) -> str | None`` with a
:class:`vpeft.StepContext`: model, step, the step's first batch, the task's loss, the validation batches). What they
change in the trainable set the optimiser follows (vpeft/core/control.py), and each change is a line of
``metrics.jsonl``: ``{"step", "epoch", "trainable", "change"}``, ``trainable`` the number of elements that train
after it. A checkpoint holds the adapter's structure at the time, which ``--resume`` rebuilds before loading it.

After each epoch one log line says the epoch, mean training loss, validation metric, learning rate and seconds; tqdm
bars show only on a terminal.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset
from tqdm import tqdm

import vpeft

from ..core import trainable_count
from ..data import build_loader
from ..errors import ConfigError, DivergedError, ExistingPathError, MissingFileError
from ..files import atomic_write
from ..optim import OPTIMIZERS
from ..tasks import Task, build_task
from . import distributed
from .checkpoint import CHECKPOINT, load_checkpoint, restore_structure, save_checkpoint
from .config import RunConfig, config_diff, dump_config, load_config
from .logger import MetricsLog
from .optim import build_optimizer, cosine_with_warmup
from .system import environment, peak_memory_mb, reset_peak_memory

log = logging.getLogger("vpeft")
CONFIG = "config.yaml"
ORIGIN = "origin.json"
CLASSES = "classes.json"
SUMMARY = "summary.json"


def train(
    cfg: RunConfig,
    run_dir: str | os.PathLike,
    resume: bool = False,
    force: bool = False,
    origin: dict[str, Any] | None = None,
    callbacks: tuple[Callable[[vpeft.StepContext], str | None], ...] = (),
) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` and return the summary (also written to ``summary.json``).

    ``resume`` continues the run in ``run_dir``; a ``cfg`` that differs from the run's ``config.yaml`` needs
    ``force``, which then writes ``cfg`` (and ``origin``) into the run. A finished run (``summary.json`` present)
    resumed with its own config is left as it is and its summary returned. ``origin`` (``{"config": path, "set":
    [overrides]}``, None where not known) is stored as ``origin.json`` beside the config, so :func:`resume_config`
    can tell the first call's overrides from a change. ``callbacks`` run at the start of each optimizer step after
    the method's own ``control`` hook (see the module's text); they are not part of the config, so a resumed run must
    be given the same ones.
    """
    run_dir = Path(run_dir)
    dist = distributed.setup(cfg.train.device, cfg.train.parallel)
    if OPTIMIZERS[cfg.optim.name].projects and dist.world > 1 and cfg.train.parallel == "fsdp":
        dist.close()  # an SVD of a shard is not the shard of the matrix's SVD
        raise ConfigError(
            f"optim.name {cfg.optim.name} projects whole weight matrices, which train.parallel=fsdp shards across "
            "processes; use train.parallel=ddp (every process holds the whole model)."
        )
    changed = _check_run_dir(cfg, run_dir, resume, force)  # every rank checks before rank 0 writes anything
    if resume and not changed and (run_dir / SUMMARY).is_file():
        summary = json.loads((run_dir / SUMMARY).read_text())
        log.info("vpeft: %s already finished (%s epochs); nothing to do.", run_dir, summary.get("epochs"))
        dist.close()
        return summary
    dist.barrier()
    if dist.main:
        _make_run_dir(run_dir)
    device = dist.device
    start = time.perf_counter()

    task, model, datasets = build_run(cfg)
    model.to(device)  # first: adapters are made beside their base tensors, and calibration runs on the device
    calibration = _calibration_batches(cfg, task, datasets["train"], device) if _needs_calibration(cfg) else None
    options = task.method_options(cfg.method.options)
    report = vpeft.apply_method(model, cfg.method.name, calibration=calibration, plugins=cfg.plugins, **options)
    log.info("%s", report)
    if resume and (run_dir / CHECKPOINT).is_file():  # a controller may have pruned or grown the adapter since
        restore_structure(run_dir / CHECKPOINT, model)
    controlled = bool(callbacks) or _has_controller(cfg)
    if controlled and dist.world > 1:
        dist.close()
        raise ConfigError(
            f"method {cfg.method.name} (or a callback) changes the trainable set during training, which one process "
            "does and a data-parallel wrapper cannot follow; run it in one process (no torchrun)."
        )
    if cfg.model.grad_checkpointing:
        enable_grad_checkpointing(model)
    # nothing trainable (the method `frozen`: zero- and few-shot rows): no optimiser, no epochs, only the evaluations,
    # and no data-parallel wrapper (DDP refuses a model without a trainable tensor; each process evaluates its share)
    trainable = any(p.requires_grad for p in model.parameters())
    net = dist.wrap(model) if trainable else model  # DDP under torchrun, or the model sharded in place (FSDP)

    steps_per_epoch = math.ceil(len(_loader(cfg, task, datasets["train"], True, dist)) / cfg.optim.accumulate)
    total_steps = steps_per_epoch * cfg.train.epochs
    optim = cfg.optim
    optimizer = (
        build_optimizer(model, optim.lr, optim.weight_decay, optim.betas, optim.name, optim.head_lr, **optim.options)
        if trainable
        else None
    )
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    scheduler = cosine_with_warmup(optimizer, total_steps, warmup_steps, cfg.optim.min_lr) if trainable else None
    autocast = _autocast(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None

    counters = {"epoch": 0, "step": 0, "best": None, "images": 0, "train_seconds": 0.0}
    metrics = MetricsLog(run_dir, cfg.train.tensorboard) if dist.main else None
    if resume and trainable:
        counters = load_checkpoint(run_dir / CHECKPOINT, model, optimizer, scheduler, scaler)
        if dist.main:
            metrics.truncate_after(counters["step"])
        log.info("vpeft: resumed %s at epoch %d, step %d", run_dir, counters["epoch"], counters["step"])
    if dist.main:  # written once the run is built: a run that fails to build leaves its directory empty
        if not resume or changed:
            dump_config(cfg, run_dir / CONFIG)
            _write_json(run_dir / ORIGIN, origin or {"config": None, "set": None})  # None: not known
        classes = getattr(datasets["train"], "classes", None)
        if classes is not None and not (run_dir / CLASSES).is_file():
            _write_json(run_dir / CLASSES, [str(c) for c in classes])
    reset_peak_memory(device)
    val_batch = _val_batches(cfg, task, datasets.get("val"), device)

    checked = False
    for epoch in range(counters["epoch"], cfg.train.epochs if trainable else 0):
        model.train()
        loader = _loader(cfg, task, datasets["train"], True, dist, epoch)
        tic, seen = time.perf_counter(), 0
        epoch_losses = []
        quiet = None if dist.main else True  # None: tqdm shows a bar only when stderr is a terminal
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, dynamic_ncols=True, disable=quiet)
        batches = iter(bar)
        for _ in range(0, len(loader), cfg.optim.accumulate):
            # one optimizer step: its micro-batches (fewer in a short last group) are read first, so that each can be
            # weighted by its share of the step's loss terms over all processes before the first backward pass
            group = list(itertools.islice(batches, cfg.optim.accumulate))
            if controlled:
                ctx = vpeft.StepContext(model, counters["step"], total_steps, task.to_device(group[0], device),
                                        lambda b: task.loss(model, b), val_batch)  # fmt: skip
                # the controllers' own forward passes (dropout) draw from a fork: the training's random stream is
                # the same with and without them
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    notes = vpeft.control(model, ctx, callbacks)
                ctx.follow(optimizer)
                if notes and dist.main:
                    change = {"step": counters["step"], "epoch": epoch + 1, "trainable": trainable_count(model)}
                    metrics.log({**change, "change": "; ".join(notes)})
                    log.debug("vpeft: step %d: %s (%d trainable)", counters["step"], notes, change["trainable"])
            terms = [task.loss_terms(b) for b in group]
            total = max(dist.sum(torch.tensor([float(sum(terms))], dtype=torch.float64)).item(), 1.0)
            step_sum = torch.zeros(1, dtype=torch.float64, device=device)  # this process's share of the loss
            vpeft.perturb(model)  # plug-ins that train at perturbed weights (ggpo); restored before the step
            try:
                for batch, count in zip(group, terms, strict=True):
                    batch = task.to_device(batch, device)
                    with autocast:
                        # the step's forward pass, recorded for losses that read the model's outputs (ba_lora)
                        with vpeft.loss_context(model, batch) as context:
                            loss = task.loss(net, batch)
                        extra = vpeft.method_loss(model, context=context)
                    # DDP and FSDP average the processes' gradients, hence the factor world: the step's gradient is
                    # that of the mean over all its terms; a method's own loss counts once per step
                    objective = loss.mul(count * dist.world).div(total)
                    if extra is not None:
                        objective = objective + extra.div(len(group))
                    if not torch.isfinite(objective):
                        value = (loss if extra is None else loss + extra).item()
                        raise diverged(run_dir, value, counters["step"], epoch)
                    (scaler.scale(objective) if scaler else objective).backward()
                    seen += task.items(batch)
                    step_sum += objective.detach().double()
            finally:
                vpeft.restore(model)
            if not checked:
                check_gradients(model)
                checked = True
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip)
            vpeft.on_step(model, counters["step"], total_steps, optimizer)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            counters["step"] += 1
            lr = optimizer.param_groups[0]["lr"]
            step_loss = dist.sum(step_sum).item() / dist.world
            epoch_losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{seen / (time.perf_counter() - tic):.0f}")
            if counters["step"] % cfg.train.log_every == 0 and dist.main:
                metrics.log({"step": counters["step"], "epoch": epoch + 1, "loss": step_loss, "lr": lr})
            if cfg.train.max_steps and counters["step"] >= cfg.train.max_steps:
                break
        bar.close()
        counters["images"] += seen * dist.world
        counters["train_seconds"] += time.perf_counter() - tic
        counters["epoch"] = epoch + 1
        last = epoch + 1 == cfg.train.epochs or (cfg.train.max_steps and counters["step"] >= cfg.train.max_steps)
        val = None
        if "val" in datasets and ((epoch + 1) % cfg.train.eval_every == 0 or last):
            val = evaluate_split(cfg, task, model, datasets["val"], dist, autocast)
            if dist.main:
                metrics.log({"step": counters["step"], "epoch": epoch + 1, "split": "val", **val})
            if counters["best"] is None or val[task.metric] > counters["best"][task.metric]:
                counters["best"] = {"epoch": epoch + 1, **val}
        if dist.main:
            lr, seconds = optimizer.param_groups[0]["lr"], time.perf_counter() - tic
            log.info("%s", epoch_line(epoch + 1, cfg.train.epochs, epoch_losses, task.metric, val, lr, seconds))
        # every process takes part (FSDP gathers the sharded tensors); only rank 0 writes
        save_checkpoint(run_dir / CHECKPOINT, model, optimizer, scheduler, scaler, counters, write=dist.main)
        with dist.full_tensors(model):
            if dist.main:
                vpeft.save_adapter(model, run_dir / "adapter")
                task.export(run_dir / "adapter")
        dist.barrier()
        if last:
            break

    if not trainable:
        if "val" in datasets:
            val = evaluate_split(cfg, task, model, datasets["val"], dist, autocast)
            counters["best"] = {"epoch": 0, **val}
            if dist.main:
                metrics.log({"step": 0, "epoch": 0, "split": "val", **val})
        if dist.main:
            vpeft.save_adapter(model, run_dir / "adapter")  # the method's record: tools/test.py reopens the run
            task.export(run_dir / "adapter")
    hits: list[bool] | None = [] if dist.world == 1 else None  # one process holds the whole split
    test = evaluate_split(cfg, task, model, datasets["test"], dist, autocast, hits)
    if dist.main:
        metrics.log({"step": counters["step"], "epoch": counters["epoch"], "split": "test", **test})
        metrics.close()
    summary = {
        "test": test,
        "test_size": len(datasets["test"]),  # the n of a score's binomial standard error
        "test_hits": "".join("1" if h else "0" for h in hits) if hits else None,  # per test item: a paired test's data
        "best_val": counters["best"],
        "method": cfg.method.name,
        "plugins": [p["name"] for p in cfg.plugins],
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "task": cfg.task,
        "metric": task.metric,
        "trainable_params": report.trainable,
        "trainable_params_with_head": report.trainable + report.head,
        # after the controllers' changes (the numbers above are the adapter as it was built)
        "final_trainable_params": vpeft.report(model).trainable if trainable else 0,
        "total_params": report.base_total + report.trainable,
        "peak_memory_mb": peak_memory_mb(device),
        "wall_seconds": time.perf_counter() - start,
        "images_per_second": counters["images"] / max(counters["train_seconds"], 1e-9),
        "epochs": counters["epoch"],
        "steps": counters["step"],
        "device": str(device),
        "processes": dist.world,
        **environment(),
    }
    if dist.main:
        atomic_write(run_dir / SUMMARY, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    dist.close()
    return summary


def diverged(run_dir: Path, loss: float, step: int, epoch: int) -> DivergedError:
    kept = (run_dir / CHECKPOINT).is_file()
    return DivergedError(
        f"loss is {loss} at step {step} (epoch {epoch + 1}); stopped. "
        + (f"The last good checkpoint is {run_dir / CHECKPOINT}. " if kept else "No epoch had finished. ")
        + "Lower optim.lr or set optim.grad_clip."
    )


def epoch_line(
    epoch: int, epochs: int, losses: list[float], metric: str, val: dict[str, float] | None, lr: float, seconds: float
) -> str:
    """``epoch 3/15  train loss 0.4213  val top1 91.20  lr 1.85e-03  4.1 s``: the line a log file keeps per epoch.
    The mean loss is over the epoch's optimizer steps (after a resume: the steps since the resume)."""
    loss = f"{sum(losses) / len(losses):.4f}" if losses else "-"
    score = f"  val {metric} {val[metric]:.2f}" if val is not None else ""
    return f"epoch {epoch}/{epochs}  train loss {loss}{score}  lr {lr:.2e}  {seconds:.1f} s"


def resume_config(
    run_dir: str | os.PathLike, config: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[RunConfig, dict[str, Any]]:
    """The config to resume ``run_dir`` with, and its origin (what :func:`train` stores as ``origin.json``).

    Without ``config``: the run's own ``config.yaml`` with ``overrides`` on top. With ``config``: that file with the
    run's first ``--set`` overrides (from ``origin.json``) and then ``overrides``, so the first call's overrides need
    not be repeated and an edited file shows as a change (which :func:`train` accepts only with ``force``).
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise MissingFileError(f"--resume: {run_dir / CONFIG} does not exist; {run_dir} is not a run directory.")
    earlier = json.loads((run_dir / ORIGIN).read_text()) if (run_dir / ORIGIN).is_file() else {}
    sets = [*(earlier.get("set") or []), *overrides]
    if config is None:  # the saved config already holds the first call's overrides
        return load_config(run_dir / CONFIG, list(overrides)), {"config": earlier.get("config"), "set": sets}
    return load_config(config, sets), {"config": str(config), "set": sets}


def build_run(cfg: RunConfig) -> tuple[Task, nn.Module, dict[str, Any]]:
    """The task, its model (pretrained weights loaded, before any method) and its datasets.

    Seeds the RNGs first: without a pretrained file the backbone's random weights come from ``train.seed``, so
    ``tools/test.py`` rebuilds the very backbone the run trained on.
    """
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    task = build_task(cfg)
    model, datasets = task.build()
    return task, model, datasets


def evaluate_split(
    cfg: RunConfig,
    task: Task,
    model: nn.Module,
    dataset: Any,
    dist: distributed.Dist,
    autocast: contextlib.AbstractContextManager | None = None,
    hits: list[bool] | None = None,
) -> dict[str, float]:
    """The task's metrics on ``dataset``: each process evaluates its share (:func:`_loader`) and the sums are added.
    ``hits`` (one process only) is filled with the task's per-item hits in the split's order (``Task.evaluate``).

    A model sharded by FSDP gathers its tensors in every forward pass, a collective all processes must join: a process
    whose share has fewer batches (the split does not divide evenly) then runs the split's first batch again, not
    counted, until it has run as many as the others (``Task.evaluate``'s ``idle``). Without this the processes with
    more batches wait forever for the others.
    """
    loader = _loader(cfg, task, dataset, False, dist)
    idle: list[Any] = []
    if distributed.sharded(model):
        batch = cfg.data.eval_batch_size or cfg.data.batch_size
        most = math.ceil(math.ceil(len(dataset) / dist.world) / batch)  # rank 0's share is the largest
        if most > len(loader):
            idle = [next(iter(_loader(cfg, task, dataset, False)))] * (most - len(loader))
    if hits is not None:
        return task.evaluate(model, loader, dist.device, autocast, idle=idle, hits=hits)
    return task.evaluate(model, loader, dist.device, autocast, dist.sum, idle=idle)


def enable_grad_checkpointing(model: nn.Module) -> None:
    """``model.grad_checkpointing: true``: timm models and vpeft's heads through their ``set_grad_checkpointing``,
    Hugging Face models (a causal LM used as it is) through their own, non-reentrant (frozen inputs pass gradients)."""
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ConfigError(f"model.grad_checkpointing: {type(model).__name__} has no gradient checkpointing; set false.")


def check_gradients(model: nn.Module) -> None:
    """After the first backward pass, every trainable tensor must have a gradient; name the ones that do not."""
    # an empty tensor (a module a controller pruned to rank 0) has nothing to receive
    silent = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None and p.numel()]
    if silent:
        hint = ""
        if any(getattr(m, "grad_checkpointing", False) for m in model.modules()):
            hint = " Gradient checkpointing is on: a checkpointed block whose input needs no gradient passes none."
        raise RuntimeError(
            f"{len(silent)} trainable tensors got no gradient in the first step, e.g. {silent[:5]}: they are not "
            f"used in the forward pass, or the graph to them is cut.{hint}"
        )


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp fp16 needs a CUDA device; use bf16 on CPU.")
    # parameters stay fp32 (adapters and head included); autocast only lowers the precision of the matmuls
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _loader(
    cfg: RunConfig, task: Task, dataset: Any, train: bool, dist: distributed.Dist | None = None, epoch: int = 0
) -> Any:
    """Training: this process's shard of the ``(seed, epoch)`` permutation. Evaluation: every ``world``-th item from
    ``rank``, unpadded, so the summed counts over the processes are exact."""
    world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
    if not train:
        dataset = dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world))
        world, rank = 1, 0
    batch = cfg.data.batch_size if train else cfg.data.eval_batch_size or cfg.data.batch_size
    lengths = None
    if train and cfg.data.group_by_length:
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            raise ConfigError(
                f"data.group_by_length is true, but the {cfg.task} task's training data does not know its items' "
                "lengths (the text tasks do); set it to false."
            )
    return build_loader(
        dataset,
        batch,
        train=train,
        num_workers=cfg.data.num_workers,
        seed=cfg.train.seed,
        epoch=epoch,
        num_replicas=world,
        rank=rank,
        collate_fn=task.collate,
        lengths=lengths,
    )


def _has_controller(cfg: RunConfig) -> bool:
    from ..core import AdapterModule
    from ..methods import METHODS

    return METHODS[cfg.method.name].control.__func__ is not AdapterModule.control.__func__


def _val_batches(cfg: RunConfig, task: Task, dataset: Any, device: torch.device) -> Callable[[int], Any] | None:
    """``val_batch(i)``: the ``i``-th batch of the validation split (modulo their number) on ``device``, for a
    controller's data-driven decisions; the batches are read once, on first use, in the evaluation order."""
    if dataset is None:
        return None
    batches: list[Any] = []

    def val_batch(i: int) -> Any:
        if not batches:
            batches.extend(_loader(cfg, task, dataset, False))
        return task.to_device(batches[i % len(batches)], device)

    return val_batch


def _needs_calibration(cfg: RunConfig) -> bool:
    from ..methods import METHODS

    return METHODS[cfg.method.name].needs_calibration


def _calibration_batches(cfg: RunConfig, task: Task, dataset: Any, device: torch.device) -> list[Any]:
    """The first ``data.calibration_batches`` batches of the training split, in a fixed order, each as a callable
    that returns the task's loss on it."""
    count = cfg.data.calibration_batches or 16
    return [task.calibration(b, device) for b in itertools.islice(_loader(cfg, task, dataset, train=False), count)]


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2) + "\n"))


def _make_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` and make sure a file can be written there, before any work that would be lost."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as err:
        raise ConfigError(
            f"the run directory {run_dir} cannot be written ({err.strerror or err}); choose a --work-dir you can write."
        ) from None


def _check_run_dir(cfg: RunConfig, run_dir: Path, resume: bool, force: bool) -> list[str]:
    """The dotted keys where ``cfg`` differs from the resumed run's config (none for a new run)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ExistingPathError(f"{run_dir} is a file, not a run directory; choose another --work-dir.")
    if resume:
        if not (run_dir / CONFIG).is_file():
            raise MissingFileError(f"--resume: {run_dir / CONFIG} does not exist; {run_dir} is not a run directory.")
        changed = config_diff(load_config(run_dir / CONFIG), cfg)
        if changed and not force:
            raise ConfigError(
                f"--resume: the config differs from the run's in {changed} ({run_dir / CONFIG}); resume with the "
                "run's config, or pass --force to continue with the new one (it is then written into the run)."
            )
        return changed
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ExistingPathError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --work-dir."
        )
    return []
