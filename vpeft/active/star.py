"""STAR's selection rule: dynamic uncertainty and the calibrated (Monte-Carlo dropout) estimate, as functions of
class probabilities, plus the two baselines' rules (plain entropy, random).

Paper: "STAR: Constraint LoRA with Dynamic Active Learning for Data-Efficient Fine-Tuning of Large Language Models"
(Zhang, Wu, Zhou and Xu, ACL Findings 2024, arXiv:2403.01165); code ``callanwu/STAR`` (``src/al_methods.py``,
``src/finetuning.py``), read to learn the rule. Each active-learning round trains LoRA on the labelled set, scores
every unlabelled item and labels the ``k`` most uncertain.

* Uncertainty (the code's ``Entropy`` criterion): the entropy of the predicted distribution,
  ``H(p) = -sum_c p_c log p_c`` with ``p_c`` clipped below at ``1e-6`` (the code's clip in its dynamic variant; here in
  every variant, so a zero probability gives a finite term). A generated answer sums ``H`` over its tokens; a class
  label is one "token".
* Calibrated estimate (the paper's Monte-Carlo dropout, its "hybrid regularisation" with the L2 constraint of
  :mod:`vpeft.plugins.lora_b_decay`): the fine-tuned model's uncertainty is the mean over ``T`` stochastic passes
  (dropout on) of each pass's entropy, ``u_ft = (1/T) sum_t H(p^(t))``, ``T = 3`` as in the code (a mean of the
  entropies, as the code computes it, not the entropy of the mean distribution).
* Dynamic uncertainty (the paper's remedy for the "uncertainty gap": early LoRA weights are under-trained, so the base
  model's uncertainty is trusted first)::

      u_i(t) = lambda_t * u_ft_i + (1 - lambda_t) * u_base_i,   lambda_t = min(1, step * (t + 1)),  step = 0.1

  for the ``t``-th selection (``t = 0`` after training on the initial set), then the ``k`` largest ``u_i`` are
  labelled. ``u_base`` is min-max normalised over the items it was computed on, as the code's ``normalize_list``.

Departures from the code: (1) ``u_ft`` is min-max normalised over the pool before the mix; the code mixes the raw
fine-tuned value (a sum over hundreds of answer tokens) with the normalised base value, which makes the base term
negligible whatever ``lambda_t`` and so voids the interpolation the paper describes. (2) The code's Monte-Carlo
passes run with the model left in eval mode, so its three passes coincide; here dropout is on, as the paper says.
(3) The code's ``PE`` criterion (the negative log-likelihood of the pool item's gold answer) needs the labels that an
unlabelled pool hides, so only the entropy criterion is offered. Ties are broken by the lower pool index.
"""

from __future__ import annotations

import numpy as np

CLIP = 1e-6  # smallest probability entered into -p log p (the code's np.clip(probs, a_min=1e-6))
MC_PASSES = 3  # the code's three stochastic passes
STEP = 0.1  # lambda_t = step * (t + 1), the code's 0.1 * (iter_num + 1)


def entropy(probs: np.ndarray) -> np.ndarray:
    """``H = -sum_c p_c log p_c`` over the last axis, each ``p_c`` clipped below at ``CLIP``: one value per row."""
    p = np.clip(np.asarray(probs, dtype=np.float64), CLIP, None)
    return -(p * np.log(p)).sum(-1)


def mc_entropy(passes: np.ndarray) -> np.ndarray:
    """The calibrated uncertainty ``(1/T) sum_t H(p^(t))`` of ``passes`` ``(T, n, classes)``: one value per item."""
    passes = np.asarray(passes, dtype=np.float64)
    if passes.ndim != 3:
        raise ValueError(f"mc_entropy: expected (passes, items, classes) probabilities, got shape {passes.shape}")
    return entropy(passes).mean(0)


def minmax(values: np.ndarray) -> np.ndarray:
    """``(v - min) / (max - min)``; all zeros when every value is equal (the code would divide by zero)."""
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min() if values.size else 0.0
    return np.zeros_like(values) if span == 0 else (values - values.min()) / span


def dynamic_weight(t: int, step: float = STEP) -> float:
    """``lambda_t = min(1, step * (t + 1))``: the fine-tuned model's share at the ``t``-th selection (0-based)."""
    if t < 0:
        raise ValueError(f"dynamic_weight: the selection index t counts from 0, got {t}")
    return min(1.0, step * (t + 1))


def dynamic_uncertainty(u_ft: np.ndarray, u_base: np.ndarray, t: int, step: float = STEP) -> np.ndarray:
    """``lambda_t * minmax(u_ft) + (1 - lambda_t) * u_base`` (``u_base`` already normalised, see the module's text)."""
    u_ft, u_base = np.asarray(u_ft, dtype=np.float64), np.asarray(u_base, dtype=np.float64)
    if u_ft.shape != u_base.shape:
        raise ValueError(f"dynamic_uncertainty: {u_ft.shape} fine-tuned and {u_base.shape} base values")
    weight = dynamic_weight(t, step)
    return weight * minmax(u_ft) + (1 - weight) * u_base


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest ``scores``, largest first; equal scores in position order."""
    scores = np.asarray(scores, dtype=np.float64)
    if not 0 <= k <= scores.size:
        raise ValueError(f"top_k: cannot pick {k} of {scores.size} items")
    return np.argsort(-scores, kind="stable")[:k]


def random_k(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct positions of ``n`` drawn uniformly with ``rng`` (the random baseline), in drawing order."""
    if not 0 <= k <= n:
        raise ValueError(f"random_k: cannot pick {k} of {n} items")
    return rng.permutation(n)[:k]
