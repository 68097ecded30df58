"""Which parameters of a transformer body train: all, or only its top blocks (CPU budgets).

Shared by the generator (``generator.train_top_layers``, stages 1-2) and the learner
(``evaluate.<family>.train_top_layers``, evaluation).
"""

from __future__ import annotations

from torch import nn


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer block list: the longest ModuleList in the model.

    Raises ValueError when the model has no ModuleList.
    """
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    return max(lists, key=len)


def train_top_blocks(model: nn.Module, top_blocks: int | None) -> list[nn.Parameter]:
    """Set ``requires_grad`` in place: every parameter for ``None``; else only the top
    ``top_blocks`` blocks and the last norm module (a decoder's final norm, which the top block
    feeds); ``0`` freezes the whole model.

    Returns the parameters left trainable. Raises ValueError as ``transformer_blocks`` does.
    """
    if top_blocks is None:
        model.requires_grad_(True)
        return list(model.parameters())
    model.requires_grad_(False)
    if top_blocks == 0:
        return []
    trainable = list(transformer_blocks(model)[-top_blocks:].parameters())
    norms = [m for m in model.modules() if "norm" in type(m).__name__.lower() or isinstance(m, nn.LayerNorm)]
    if norms:
        trainable += [p for p in norms[-1].parameters() if all(p is not q for q in trainable)]
    for p in trainable:
        p.requires_grad_(True)
    return trainable
