"""ComPEFT: compression of a fine-tuned adapter's update for transfer (Yadav, Choshen, Raffel and Bansal, "ComPEFT:
Compression for Communicating Parameter Efficient Updates via Sparsification and Quantization", arXiv:2311.13171,
Sec. 3, eq. 1-2).

For the task vector ``tau = theta_ft - theta_init`` (the adapter's tensors after training minus at initialisation):

    m = top-k(|tau|)  (the k = density * n largest magnitudes),    tau_hat = alpha * sigma(tau) * sign(tau) * m

a ternary code {-s, 0, +s} with one scale ``s = alpha * sigma(tau)`` (sigma: the standard deviation of the whole
task vector), with no retraining; ``theta_init + tau_hat`` is the decompressed adapter. The paper keeps k in 5-50 %
and picks alpha on validation data (its grid is 0.5 to 10; alpha near 1 works for large models). ``scope="global"``
is the paper's: one top-k and one sigma over all tensors of the adapter, concatenated; ``scope="tensor"`` gives each
tensor its own top-k and scale (one float per tensor more).

Storage (:func:`save_compressed`): a bit per entry for the mask and a bit per kept entry for its sign, packed
(``numpy.packbits``) in ``compeft.safetensors``, and the scales, keys and shapes in ``compeft_config.json``: about
``(1 + density) / 32`` of float32 storage. The paper entropy-codes the positions (Golomb), which is smaller at low
density; a mask bitmap is simpler and already 8x smaller at any density. ``theta_init`` is not stored: the receiver
rebuilds it (a LoRA's A and a head are seeded draws, B is zero; ``tools/compeft.py`` rebuilds the run's initial
adapter from its config and seed). Tensors the training did not change (a frozen FFA-LoRA A) cost nothing.

Tensors named in ``exact`` (``tools/compeft.py --exact head``) are stored as they are, beside the ternary code, and
take no part in its top-k or scales. A departure for models with a task head: ComPEFT compresses the update of
pre-trained weights (its T5 and LLaMA runs have no new head), while a classifier trained from random initialisation
is the whole of its tensor, and a ternary code of it costs more accuracy than the rest of the adapter together.

Measured on the lm suite's WordNet-16 LoRA (MiniLM, q and v, r = 8, with its 16-class head: 79,888 parameters,
323,983 bytes; ``configs/lm/wordnet16/lora_minilm.yaml``, seed 0; this 2-core CPU): validation accuracy 80.0 % (800
items) before compression, after (``V-PEFT-Bench/perf/compeft_grid.py``, each setting scored on the validation split):

    everything ternary
    scope global, density 0.1:  alpha 0.5 / 1 / 2 / 3             ->  42.5 / 59.4 / 70.9 / 74.1
    scope tensor, density 0.1:  alpha 2 / 3 / 4 / 6              ->  69.1 / 72.1 / 74.0 / 66.9
    scope tensor, density 0.3:  alpha 1 / 2 / 3 / 4              ->  71.9 / 78.4 / 76.5 / 60.1
    scope tensor, density 0.5:  alpha 1 / 1.25 / 1.5 / 1.75      ->  75.4 / 77.8 / 79.4 / 79.3
    scope tensor, density 0.7:  alpha 1 / 1.25 / 1.5             ->  77.4 / 78.3 / 78.0
    scope tensor, density 0.9:  alpha 1 / 1.25 / 1.5             ->  76.8 / 78.0 / 76.0
    the head exact (--exact head)
    scope tensor, density 0.1:  alpha 2 / 3 / 4                  ->  73.5 / 76.5 / 78.3
    scope tensor, density 0.3:  alpha 1.5 / 2 / 2.5              ->  77.9 / 80.4 / 79.6
    scope tensor, density 0.5:  alpha 1.25 / 1.5 / 1.75          ->  78.9 / 79.5 / 79.9
    scope global, density 0.3:  alpha 1.5 / 2                    ->  77.6 / 79.4

Test split (4,000 items; ``tools/compeft.py``, alpha picked on validation), against the original's 79.475 %:
everything ternary, global, density 0.1, alpha 3: 13,936 bytes (23.2x smaller), 74.05 % (-5.4 points); tensor, density
0.5, alpha 1.5: 17,927 bytes (18.1x), 78.025 % (-1.45). With the head exact (``--density 0.3 --alphas 1.5 2 2.5
--scope tensor --exact head``): 39,580 bytes (8.19x smaller: the float32 head is 24.6 kB of them), **79.40 % (-0.075
points)**. Density beyond 0.5 does not help: the single scale per tensor is what the ternary code loses, and the
head's code loses most (the paper reports that smaller models need more density and alpha).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import ConfigError, DataError, MissingFileError
from ..files import atomic_write

State = Mapping[str, Tensor]
CONFIG_FILE = "compeft_config.json"
WEIGHTS_FILE = "compeft.safetensors"
FORMAT = "vpeft.compeft"
SCOPES = ("global", "tensor")
EXACT_PREFIX = "exact."  # the names, in compeft.safetensors, of the tensors stored as they are


@dataclass
class Compressed:
    """A ternary task vector: per compressed tensor its shape, dtype and scale; packed mask and sign bits over the
    tensors' entries concatenated in ``keys`` order."""

    keys: list[str]
    shapes: list[list[int]]
    dtypes: list[str]
    scales: list[float]  # one per tensor (equal under scope "global")
    mask: np.ndarray  # packed bits, one per entry
    signs: np.ndarray  # packed bits, one per kept entry: 1 for +, 0 for -
    density: float
    alpha: float
    scope: str
    meta: dict[str, Any] = field(default_factory=dict)
    exact: dict[str, Tensor] = field(default_factory=dict)  # tensors stored as they are (``exact``), not ternary

    @property
    def entries(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes)


def _check(density: float, alpha: float, scope: str) -> None:
    if not 0 < density <= 1:
        raise ConfigError(
            f"ComPEFT's density (the share of entries kept) must be in (0, 1], got {density}; the paper "
            "uses 0.05 to 0.5."
        )
    if not alpha > 0:
        raise ConfigError(f"ComPEFT's alpha (the scale in units of sigma(tau)) must be > 0, got {alpha}.")
    if scope not in SCOPES:
        raise ConfigError(f"ComPEFT's scope must be one of {', '.join(SCOPES)}, got {scope!r}.")


def _topk_mask(tau: Tensor, density: float) -> Tensor:
    k = max(1, round(density * tau.numel()))
    mask = torch.zeros(tau.numel(), dtype=torch.bool)
    mask[tau.abs().topk(k).indices] = True
    return mask


def named_by(key: str, names: Sequence[str]) -> bool:
    """Whether ``key`` is one of ``names`` or under one (``head`` names ``head.weight`` and ``head.bias``)."""
    return any(key == name or key.startswith(name + ".") for name in names)


def compress(
    finetuned: State, init: State, density: float, alpha: float = 1.0, scope: str = "global", exact: Sequence[str] = ()
) -> Compressed:
    """ComPEFT of ``finetuned - init`` over the tensors that differ (module docstring); the tensors named by ``exact``
    are stored as they are instead."""
    _check(density, alpha, scope)
    if set(finetuned) != set(init):
        odd = sorted(set(finetuned) ^ set(init))[:5]
        raise DataError(
            f"the fine-tuned and initial adapters hold different tensors (e.g. {odd}); they must come from "
            "the same method and model."
        )
    unmatched = [name for name in exact if not any(named_by(k, [name]) for k in finetuned)]
    if unmatched:
        raise ConfigError(
            f"exact: {unmatched} name no tensor of the adapter, whose tensors are e.g. {sorted(finetuned)[:3]}; name "
            "a tensor or the module holding it (head)."
        )
    changed = sorted(k for k in finetuned if not torch.equal(finetuned[k].cpu(), init[k].cpu()))
    stored = {k: finetuned[k].detach().cpu().clone() for k in changed if named_by(k, exact)}
    keys = [k for k in changed if k not in stored]
    if not keys:
        raise DataError(
            "there is no update to compress: the fine-tuned adapter equals its initialisation"
            + (f" outside {list(exact)}, which are stored as they are." if exact else ".")
        )
    taus = [(finetuned[k].double().cpu() - init[k].double().cpu()).flatten() for k in keys]
    if scope == "global":
        flat = torch.cat(taus)
        mask = _topk_mask(flat, density)
        scales = [alpha * float(flat.std())] * len(keys)
    else:
        mask = torch.cat([_topk_mask(t, density) for t in taus])
        scales = [alpha * float(t.std()) if t.numel() > 1 else alpha * float(t.abs().max()) for t in taus]
        flat = torch.cat(taus)
    return Compressed(
        keys=keys,
        shapes=[list(finetuned[k].shape) for k in keys],
        dtypes=[str(finetuned[k].dtype).removeprefix("torch.") for k in keys],
        scales=scales,
        mask=np.packbits(mask.numpy()),
        signs=np.packbits((flat[mask] > 0).numpy()),
        density=density,
        alpha=alpha,
        scope=scope,
        exact=stored,
    )


def decompress(comp: Compressed, init: State) -> dict[str, Tensor]:
    """``theta_init + tau_hat``: every tensor of ``init``, the compressed ones updated."""
    missing = [k for k in comp.keys if k not in init]
    if missing:
        raise DataError(
            f"the initial adapter lacks {len(missing)} compressed tensors, e.g. {missing[:5]}: it is not "
            "the initialisation of the compressed adapter."
        )
    n = comp.entries
    mask = torch.from_numpy(np.unpackbits(comp.mask, count=n).astype(bool))
    signs = torch.from_numpy(np.unpackbits(comp.signs, count=int(mask.sum())).astype(np.float64) * 2 - 1)
    ternary = torch.zeros(n, dtype=torch.float64)
    ternary[mask] = signs
    out = {k: v.clone() for k, v in init.items()}
    offset = 0
    for key, shape, scale in zip(comp.keys, comp.shapes, comp.scales, strict=True):
        size = int(np.prod(shape))
        if list(init[key].shape) != shape:
            raise DataError(f"{key}: compressed shape {shape}, initial adapter {list(init[key].shape)}.")
        tau = (ternary[offset : offset + size] * scale).reshape(shape)
        out[key] = (init[key].double().cpu() + tau).to(init[key].dtype)
        offset += size
    for key, value in comp.exact.items():
        if key not in init or init[key].shape != value.shape:
            raise DataError(f"{key}: the stored tensor {list(value.shape)} has no match in the initial adapter.")
        out[key] = value.to(init[key].dtype)
    return out


def save_compressed(comp: Compressed, directory: str | os.PathLike) -> Path:
    """Write ``compeft.safetensors`` (the packed bits) and ``compeft_config.json``; atomically, bits first."""
    directory = Path(directory)
    bits = {"mask": torch.from_numpy(comp.mask.copy()), "signs": torch.from_numpy(comp.signs.copy())}
    bits.update({f"{EXACT_PREFIX}{k}": v.contiguous() for k, v in comp.exact.items()})
    meta = {
        "format": FORMAT,
        "density": comp.density,
        "alpha": comp.alpha,
        "scope": comp.scope,
        "keys": comp.keys,
        "shapes": comp.shapes,
        "dtypes": comp.dtypes,
        "scales": comp.scales,
        "meta": comp.meta,
    }
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(bits, tmp))
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, separators=(",", ":"))))
    return directory


def load_compressed(directory: str | os.PathLike) -> Compressed:
    """Read a directory written by :func:`save_compressed`."""
    directory = Path(directory)
    config, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config, weights):
        if not path.is_file():
            raise MissingFileError(
                f"{path} does not exist: {directory} is not a ComPEFT directory (tools/compeft.py "
                f"writes {CONFIG_FILE} and {WEIGHTS_FILE})."
            )
    try:
        meta = json.loads(config.read_text())
        bits = load_file(str(weights))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as err:
        raise DataError(f"{directory} holds a damaged ComPEFT file ({err}); compress the adapter again.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(
            f"{config} is not a ComPEFT config (format {meta.get('format') if isinstance(meta, dict) else None!r})."
        )
    return Compressed(
        keys=meta["keys"],
        shapes=meta["shapes"],
        dtypes=meta["dtypes"],
        scales=meta["scales"],
        mask=bits["mask"].numpy(),
        signs=bits["signs"].numpy(),
        density=meta["density"],
        alpha=meta["alpha"],
        scope=meta["scope"],
        meta=meta.get("meta", {}),
        exact={k.removeprefix(EXACT_PREFIX): v for k, v in bits.items() if k.startswith(EXACT_PREFIX)},
    )


def stored_bytes(directory: str | os.PathLike) -> int:
    """Bytes of the files in ``directory`` (an adapter or a ComPEFT directory)."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())
