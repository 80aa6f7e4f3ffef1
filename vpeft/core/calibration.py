"""The calibration service: statistics of the base model on calibration data, computed for a method's ``prepare``.

Calibration data is what ``vpeft.apply_method(model, method, calibration=...)`` receives and the engine passes: an
iterable of items, each a callable that takes the model and returns a loss (a task's training loss on one batch,
``Task.calibration``), an ``(inputs, labels)`` pair (scored with cross-entropy on the logits) or a dict of model
keyword arguments (``model(**item)``; its ``loss`` output when there is one). At most ``limit`` items are used.

* :func:`input_covariance` (CorDA, data-aware SVDs): per module, ``sum over forward calls of X^T X`` divided by the
  number of calls, with ``X`` the module's input flattened to ``(rows, in)``. Forward hooks, no gradient, one
  ``(in, in)`` float64 accumulator per module (inputs are cast to float64 before the product), so a long stream of
  batches neither holds activations nor loses precision. ``scale="max"`` divides each call's ``X`` by ``|max(X)|``
  first, as the official CorDA code (``cordalib/act_aware_utils.py``) and Hugging Face PEFT's ``preprocess_corda`` do.
* :func:`weight_gradients` (LoRA-GA, SPT's sensitivity): per parameter, the sum over items of what ``fold`` makes of
  each item's gradient (by default the gradient itself, float32). A post-accumulate hook folds each gradient into its
  total the moment autograd has it and frees it, so the gradients of all scored weights are never alive together,
  only their totals. The model runs in train mode, as a training step would; its flags, modes and any ``.grad`` a
  caller had are restored.
* :func:`cached`: the result of a computation stored as a safetensors file (never pickle) in a directory, under a
  key made of the statistic's name and options, the model (class and the values of its state dict) and the data
  (:func:`fingerprint`), written atomically; a sweep that asks again with the same key reads it back.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import DataError
from ..files import atomic_write

log = logging.getLogger("vpeft")
CACHE_FORMAT = "vpeft.calibration/1"


def calibration_loss(model: nn.Module, item: Any, device: torch.device) -> Tensor:
    """The loss of one calibration item: a callable is called with the model; an ``(inputs, labels)`` pair is
    scored with cross-entropy on the logits (a classification setting); a dict is passed as keyword arguments and
    its output's ``loss`` taken."""
    if callable(item):
        return item(model)
    if isinstance(item, dict):
        out = model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in item.items()})
        loss = getattr(out, "loss", None)
        if loss is None:
            raise DataError(
                "a calibration item given as a dict of model inputs gave no loss (the output has no 'loss'); "
                "include the labels in it, or pass callables that take the model and return a loss."
            )
        return loss
    inputs, labels = item
    out = model(inputs.to(device))
    return F.cross_entropy(getattr(out, "logits", out), labels.to(device))


def items(calibration: Any, limit: int, who: str) -> Iterator[Any]:
    """The first ``limit`` items of ``calibration``; a clear error when there is none (``who``: the method)."""
    if calibration is None:
        raise DataError(f"{who} needs calibration data: pass calibration=batches to vpeft.apply_method.")
    used = 0
    for item in calibration:
        yield item
        used += 1
        if used == limit:
            break
    if used == 0:
        raise DataError(
            f"{who}: the calibration data yielded no batch; pass an iterable of (inputs, labels) pairs, of dicts of "
            "model inputs or of callables that take the model and return a loss."
        )


def _device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def input_covariance(
    model: nn.Module,
    modules: dict[str, nn.Module],
    calibration: Any,
    limit: int,
    who: str,
    scale: Literal["none", "max"] = "none",
) -> dict[str, Tensor]:
    """``{name: C}``, ``C = (1 / calls) sum_calls X^T X`` (float64, ``(in, in)``) of each module's input over the
    forward passes of at most ``limit`` calibration items (see the module docstring; ``scale="max"``: CorDA's
    per-call ``X / |max(X)|``). Modules listed under several names (slices of one fused projection) are hooked once.
    The model runs in eval mode and is left in the modes it had."""
    by_id: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in modules.items():
        by_id.setdefault(id(module), (module, []))[1].append(name)
    sums: dict[int, Tensor] = {}
    calls: dict[int, int] = dict.fromkeys(by_id, 0)

    def hook_for(key: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).double()
            if scale == "max":
                x = x / x.max().abs()
            if not torch.isfinite(x).all():
                raise DataError(f"{who}: a calibration input of {by_id[key][1][0]!r} is not finite.")
            total = sums.get(key)
            sums[key] = x.T @ x if total is None else total.addmm_(x.T, x)
            calls[key] += 1

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [module.register_forward_hook(hook_for(key)) for key, (module, _) in by_id.items()]
    device = _device(model)
    try:
        model.eval()
        for item in items(calibration, limit, who):
            calibration_loss(model, item, device)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    missing = [names[0] for key, (_, names) in by_id.items() if calls[key] == 0]
    if missing:
        raise DataError(f"{who}: the calibration batches never reached {missing[:3]}; their input is unknown.")
    for key, total in sums.items():
        total.div_(calls[key])  # in place: a second set of (in, in) float64 matrices would double the peak
    return {name: sums[key] for key, (_, names) in by_id.items() for name in names}


def add_gradient(total: Tensor, grad: Tensor, param: Tensor) -> None:
    """The default fold of :func:`weight_gradients`: the plain sum of the gradients."""
    total.add_(grad.float())


def weight_gradients(
    model: nn.Module,
    params: dict[str, Tensor],
    calibration: Any,
    limit: int,
    who: str,
    fold: Callable[[Tensor, Tensor, Tensor], None] = add_gradient,
) -> tuple[dict[str, Tensor], int]:
    """``({name: sum over items of fold(gradient)}, items used)``: one backward pass of each item's loss (see
    :func:`calibration_loss`), the model in train mode, only ``params`` requiring grad. ``fold(total, grad, param)``
    adds one gradient into its float32 total in place (``total += g^2`` for a sensitivity score). A parameter the
    loss never reaches keeps a zero total. Flags, modes and any ``.grad`` of ``params`` are restored."""
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.grad for p in params.values()}  # a caller's gradients, restored afterwards
    device = _device(model)
    totals = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

    def fold_into(total: Tensor):
        def hook(p: Tensor) -> None:
            fold(total, p.grad, p.detach())
            p.grad = None  # freed at once: only the totals stay alive

        return hook

    handles, used = [], 0
    try:
        model.requires_grad_(False)
        for n, p in params.items():
            p.requires_grad_(True)
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(fold_into(totals[n])))
        model.train()
        with torch.enable_grad():
            for item in items(calibration, limit, who):
                calibration_loss(model, item, device).backward()
                used += 1
    finally:
        for h in handles:
            h.remove()
        for p, g in grads.items():
            p.grad = g
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.train(mode)
    return totals, used


# ---- the cache -------------------------------------------------------------------------------------------------
def fingerprint(value: Any, digest: Any = None) -> str | None:
    """A SHA-256 hex digest of ``value``: tensors by dtype, shape and bytes; lists, tuples and dicts by their
    elements; numbers, strings and None by their text; a ``functools.partial`` by its function and arguments; a
    function by its qualified name, code, default arguments and closure (so the engine's calibration lambdas and
    ``lambda model, batch=batch: ...`` are told apart by their batches). Any other object counts by its class name
    only (a task object inside a closure: its data is in the batch beside it). None when ``value`` holds a generator
    or iterator, which cannot be read without consuming it."""
    top = digest is None
    h = hashlib.sha256() if top else digest

    def feed(v: Any) -> bool:
        if isinstance(v, Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, (list, tuple)):
            h.update(f"L{len(v)}".encode())
            return all(feed(e) for e in v)
        elif isinstance(v, dict):
            h.update(f"D{len(v)}".encode())
            return all(feed(k) and feed(e) for k, e in v.items())
        elif v is None or isinstance(v, (bool, int, float, str, bytes, torch.device, torch.dtype)):
            h.update(f"P{type(v).__name__}:{v!r}".encode())
        elif hasattr(v, "func") and hasattr(v, "args") and hasattr(v, "keywords"):  # functools.partial
            return feed(v.func) and feed(list(v.args)) and feed(dict(v.keywords or {}))
        elif inspect.isfunction(v) or inspect.ismethod(v):
            f = getattr(v, "__func__", v)
            h.update(f"F{f.__module__}.{f.__qualname__}".encode() + f.__code__.co_code)
            cells = [c.cell_contents for c in (f.__closure__ or ()) if _filled(c)]
            return feed(list(f.__defaults__ or ())) and feed(cells) and feed(getattr(v, "__self__", None))
        elif isinstance(v, Iterator) or inspect.isgenerator(v):
            return False
        else:
            h.update(f"O{type(v).__module__}.{type(v).__qualname__}".encode())
        return True

    ok = feed(value)
    return (h.hexdigest() if ok else None) if top else None


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018  an empty cell raises
    except ValueError:
        return False
    return True


def cached(
    directory: str | None,
    what: str,
    options: dict[str, Any],
    model: nn.Module,
    calibration: Any,
    compute: Callable[[], dict[str, Tensor]],
) -> dict[str, Tensor]:
    """``compute()``, or what an earlier call with the same key stored in ``directory`` (None: no cache). Tensors
    read back are on the CPU.

    The key hashes ``what`` (the statistic, e.g. ``"input_covariance"``), ``options`` (JSON-able: limit, scale...),
    the model's class and every tensor of its state dict by value (an input covariance depends on all the layers
    before its module; hashing SmolLM2-135M's 540 MB takes about a second) and the calibration data
    (:func:`fingerprint`). Data that cannot be fingerprinted (a one-shot generator) is computed and not cached, with
    one log line. The file is ``<directory>/<what>-<key[:20]>.safetensors``, written atomically."""
    if directory is None:
        return compute()
    data = fingerprint(calibration if isinstance(calibration, (list, tuple)) else None)
    if data is None or not isinstance(calibration, (list, tuple)):
        log.info("vpeft: %s not cached: the calibration data is not a list whose items can be fingerprinted", what)
        return compute()
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "what": what, "options": options}, sort_keys=True).encode())
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    fingerprint(dict(sorted(model.state_dict().items())), h)
    h.update(data.encode())
    key = h.hexdigest()
    path = Path(directory) / f"{what}-{key[:20]}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        log.info("vpeft: %s read from %s", what, path)
        return stored
    result = compute()
    cpu = {k: v.detach().cpu().contiguous() for k, v in result.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata={"format": CACHE_FORMAT, "key": key, "what": what}))
    return result
