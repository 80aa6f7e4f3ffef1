"""Pretrain the tiny CLIP of the offline proof on captioned scenes (vpeft/data/scenes.py), contrastively, on CPU.

    nice -n 5 python tools/pretrain_clip.py --out checkpoints/clip_scenes_tiny.safetensors

reproduces the committed checkpoint (the defaults below; seed 0, one thread; about 40 minutes on a busy 2-core
machine). The model is open_clip's ``CustomTextCLIP`` built from ``configs/clip/scenes_tiny.json``: a 3-block ViT on
32 px with 8 x 8 patches and width 64, a 3-block text transformer of width 32 with open_clip's CLIP tokenizer, a 64-d
joint space. Each step draws ``--batch`` new scenes (item ``step * batch + i`` of the caption stream: no image
repeats) and minimises CLIP's symmetric cross-entropy over the batch's image-caption similarities, with a learned
temperature clamped at 100 (Radford et al., ICML 2021, Fig. 3). Captions never name the ``HELD_OUT`` colour-shape
pairs. The file is written in float16 (half the size; the task loads it into float32) and the tool ends with the
zero-shot top-1 it reaches, printed as JSON: on the held-out pairs (6 classes, chance 16.7%), on all 24 classes and
on the base and novel halves, in the clean and the cluttered domain.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from vpeft.backbones.open_clip import build_clip_model, clip_data_config, clip_tokenizer
from vpeft.data import build_loader, build_transform
from vpeft.data.scenes import CLASS_SETS, SceneDataset, caption_scene
from vpeft.engine import cli
from vpeft.engine.optim import cosine_with_warmup
from vpeft.files import atomic_write
from vpeft.tasks.clip import DEFAULT_TEMPLATES, ClipClassifier, tokenize_prompts

log = logging.getLogger("vpeft")
CONFIG = "configs/clip/scenes_tiny.json"


def zero_shot(clip: torch.nn.Module, tokenizer, classes: str, style: str) -> float:
    """Zero-shot top-1 (percent) of ``clip`` on the scenes test split of class set ``classes`` in ``style``."""
    transform = build_transform(clip_data_config(CONFIG), "none", train=False)
    data = SceneDataset(split="test", transform=transform, classes=classes, style=style)
    model = ClipClassifier(clip, tokenize_prompts(tokenizer, data.classes, DEFAULT_TEMPLATES)).eval()
    hits = 0
    with torch.no_grad():
        for images, labels in build_loader(data, 256, train=False, num_workers=0):
            hits += (model(images).argmax(dim=1) == labels).sum().item()
    return 100.0 * hits / len(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--config", default=CONFIG, help="open_clip model config (JSON)")
    parser.add_argument("--steps", type=cli.at_least(1), default=2500)
    parser.add_argument("--batch", type=cli.at_least(1), default=128)
    parser.add_argument("--lr", type=cli.at_least(0.0, float), default=1e-3)
    parser.add_argument("--weight-decay", type=cli.at_least(0.0, float), default=0.1)
    parser.add_argument("--warmup", type=cli.at_least(0), default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=cli.at_least(1), default=1, help="torch threads (one is fastest on a shared machine)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    clip = build_clip_model(args.config)
    tokenizer = clip_tokenizer(args.config)
    transform = build_transform(clip_data_config(args.config), "none", train=False)
    decay = [p for n, p in clip.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in clip.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=args.lr
    )
    scheduler = cosine_with_warmup(optimizer, args.steps, args.warmup, 0.0)
    targets = torch.arange(args.batch)
    tic = time.perf_counter()
    for step in range(args.steps):
        items = [caption_scene(step * args.batch + i, args.seed) for i in range(args.batch)]
        images = torch.stack([transform(Image.fromarray(array)) for array, _ in items])
        texts = tokenizer([caption for _, caption in items])
        image = F.normalize(clip.visual(images), dim=-1)
        text = F.normalize(clip.text(texts), dim=-1)
        logits = clip.logit_scale.exp() * image @ text.t()
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step + 1 == args.steps:
            log.info("step %d/%d  loss %.4f  scale %.1f  %.0f s", step + 1, args.steps, loss.item(),
                     clip.logit_scale.exp().item(), time.perf_counter() - tic)  # fmt: skip
    clip.eval()
    scores = {
        f"{classes}_{style}": zero_shot(clip, tokenizer, classes, style)
        for classes in ("held_out", "all", "base", "novel")
        for style in ("clean", "cluttered")
    }
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in clip.state_dict().items()}
    atomic_write(Path(args.out), lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    chance = {k: 100.0 / len(CLASS_SETS[k.rsplit("_", 1)[0]]) for k in scores}
    print(json.dumps({"out": args.out, "zero_shot_top1": scores, "chance": chance, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
