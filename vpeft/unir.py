"""UniR: a small trained reasoner whose logits are added to a frozen language model's (Kim et al., "Universal
Reasoner: A Single, Composable Plug-and-Play Reasoner for Frozen LLMs", arXiv:2505.19075, Sec. 3, eq. 3-4):

    pi(y_t | x, y_<t)  proportional to  softmax(z_backbone(x, y_<t) + sum_i w_i z_reasoner_i(x, y_<t))

The backbone never trains (its tensors stay bit-identical: :class:`UniR` holds it frozen and in eval mode, and runs
it without gradients); the reasoners share its vocabulary and are the only trainable part (a whole small LM, or a
vpeft adapter on one). Several trained reasoners compose at inference by a weighted sum of their logits (eq. 4).

Training is GRPO on a verifiable reward, as the paper's (Shao et al., "DeepSeekMath", arXiv:2402.03300, eq. 3):
for each prompt, G completions are sampled from the combined policy, their rewards r_1..r_G are normalised within
the group, ``A_i = (r_i - mean(r)) / (std(r) + eps)``, and the loss is ``-mean_i mean_t A_i log pi(y_it | ...)``
over the completion tokens (:func:`grpo_loss`). Departures from the official code (``hangeol/UniR``, TRL's
GRPOTrainer): one policy-gradient step per sampled group, so the PPO ratio is 1 and its clipping inactive, and no KL
penalty (its coefficient is 0 in the paper's configs); sampling is plain multinomial at ``temperature``, no vLLM.
:func:`nll_loss` trains the reasoner on reference completions instead (the composed model's next-token loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError


def _logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out


def _vocab(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


class UniR(nn.Module):
    """The frozen ``backbone`` composed with trainable ``reasoners`` by a weighted sum of logits."""

    def __init__(
        self, backbone: nn.Module, reasoners: nn.Module | Sequence[nn.Module], weights: Sequence[float] | None = None
    ):
        super().__init__()
        reasoners = [reasoners] if isinstance(reasoners, nn.Module) else list(reasoners)
        weights = [1.0] * len(reasoners) if weights is None else list(weights)
        if not reasoners or len(weights) != len(reasoners):
            raise ConfigError(
                f"UniR needs at least one reasoner and one weight per reasoner, got {len(reasoners)} "
                f"reasoners and {len(weights)} weights."
            )
        vocab = _vocab(backbone)
        for i, r in enumerate(reasoners):
            if vocab is not None and _vocab(r) is not None and _vocab(r) != vocab:
                raise ConfigError(
                    f"UniR adds logits over one vocabulary: reasoner {i} has vocab_size {_vocab(r)}, the "
                    f"backbone {vocab}; the reasoner must use the backbone's tokenizer."
                )
        self.backbone = backbone.requires_grad_(False).eval()
        self.reasoners = nn.ModuleList(reasoners)
        self.weights = list(weights)

    def train(self, mode: bool = True) -> UniR:
        super().train(mode)
        self.backbone.eval()  # the frozen model never runs in training mode (no dropout, no statistics)
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The combined logits (batch, length, vocab), in float32."""
        with torch.no_grad():
            z = _logits(self.backbone, input_ids, attention_mask).float()
        for w, reasoner in zip(self.weights, self.reasoners, strict=True):
            z = z + w * _logits(reasoner, input_ids, attention_mask).float()
        return z

    @torch.no_grad()
    def sample(
        self, input_ids: Tensor, new_tokens: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """``input_ids`` (batch, length, unpadded) followed by ``new_tokens`` tokens sampled from the combined policy
        (greedy at temperature 0)."""
        ids = input_ids
        for _ in range(new_tokens):
            z = self(ids)[:, -1]
            if temperature == 0:
                nxt = z.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(F.softmax(z / temperature, -1), 1, generator=generator)
            ids = torch.cat([ids, nxt], 1)
        return ids


def completion_log_probs(model: UniR, sequences: Tensor, prompt_length: int) -> Tensor:
    """``log pi(y_t | ...)`` of each completion token (batch, new tokens) under the combined policy."""
    logp = F.log_softmax(model(sequences)[:, prompt_length - 1 : -1], -1)
    return logp.gather(-1, sequences[:, prompt_length:, None]).squeeze(-1)


def group_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """GRPO's ``(r - mean) / (std + eps)`` within each group (rows: prompts, columns: the group's completions)."""
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + eps)


def grpo_loss(
    model: UniR,
    prompts: Tensor,
    reward: Callable[[Tensor, Tensor], Tensor],
    group: int = 4,
    new_tokens: int = 4,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss, rewards): GRPO's policy-gradient loss for ``prompts`` (batch, length), each with ``group`` completions
    sampled from the combined policy. ``reward(prompts_repeated, completions)`` gives one reward per completion."""
    if group < 2:
        raise ConfigError(f"GRPO normalises rewards within a group of completions: group must be >= 2, got {group}.")
    repeated = prompts.repeat_interleave(group, 0)
    sequences = model.sample(repeated, new_tokens, temperature, generator)
    rewards = reward(repeated, sequences[:, prompts.shape[1] :]).float()
    advantages = group_advantages(rewards.view(-1, group)).flatten()
    logp = completion_log_probs(model, sequences, prompts.shape[1])
    return -(advantages[:, None] * logp).mean(), rewards


def nll_loss(model: UniR, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The composed model's next-token cross-entropy on ``input_ids`` (padding excluded)."""
    logits = model(input_ids, attention_mask)[:, :-1]
    targets = input_ids[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
