"""Adaptive semantic centres from category-wise learnable prompts through the frozen open_clip text tower (Ma et
al.'s centres, CoOp's prompts): cluster c's centre is the text tower's output for ``[SOT] ctx_c,1 .. ctx_c,n noun_c .
[EOT]``, where ``noun_c`` is the kept noun nearest the cluster's noun mixture and the ``n`` context vectors (token
embeddings, initialised from "a photo of a") are the only trained parameters. The training is
``laic.semantic_centres.train_centres`` (pseudo-labels, neighbour consistency, balance); the tower's weights are
never changed (their ``requires_grad`` is off while training and restored after).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .semantic_centres import (TEXT_CENTRES, CentresConfig, CentresResult, cluster_mean_directions, confident_rows,
                               nearest_noun_names, train_centres)
from .stage0 import text_counterparts, unit_rows

CONTEXT_INIT = "a photo of a"   # CoOp's initialisation of the context vectors (4 tokens)
PROMPT_STEPS = 50                # each step runs the tower on K prompts: fewer steps than the continuous centres


def check_text_tower(model) -> None:
    import open_clip

    if not (isinstance(model, open_clip.CLIP) and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) == "argmax"):
        raise ValueError("semantic_centres with a text tower needs an open_clip CLIP model with a causal text tower "
                         f"pooled at the end-of-text token (as ViT-B-32), got {type(model).__name__}; fit on "
                         "features (LAIC.fit) for the continuous centres instead")


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No gradient reaches ``module``'s parameters inside; their ``requires_grad`` flags are restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class PromptCentres(nn.Module):
    """K prompts ``context_init + " " + names[c] + "."`` whose context token embeddings ``ctx [K, n_ctx, width]``
    are learnable; ``forward()`` is the text tower's output for them ``[K, D]`` (not normalised). The tower is held
    outside the module's parameters (a plain attribute), so ``parameters()`` is the context alone."""

    def __init__(self, model, tokenizer, names: Sequence[str], context_init: str = CONTEXT_INIT):
        super().__init__()
        check_text_tower(model)
        self.tower = [model]   # a list: not registered as a submodule
        n_ctx = int((tokenizer([context_init])[0] != 0).sum()) - 2   # minus start and end of text
        tokens = tokenizer([f"{context_init} {name}." for name in names]).to(model.positional_embedding.device)
        # The tower is causal and pools at the end-of-text token: positions after the longest prompt never count.
        positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
        self.length = int(((tokens != 0) * positions).max())
        tokens = tokens[:, :self.length]
        with torch.no_grad():
            embedded = model.token_embedding(tokens)
        self.register_buffer("tokens", tokens)
        self.register_buffer("prefix", embedded[:, :1].clone())
        self.register_buffer("suffix", embedded[:, 1 + n_ctx:].clone())
        self.ctx = nn.Parameter(embedded[:, 1:1 + n_ctx].clone())

    def forward(self) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        model = self.tower[0]
        cast_dtype = model.transformer.get_cast_dtype()
        x = torch.cat([self.prefix, self.ctx, self.suffix], dim=1).to(cast_dtype)
        x = x + model.positional_embedding[:self.length].to(cast_dtype)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:self.length, :self.length]))
        x = text_global_pool(x, self.tokens, "argmax")
        if isinstance(model.text_projection, nn.Linear):
            return model.text_projection(x).float()
        return (x if model.text_projection is None else x @ model.text_projection).float()


def prompt_centres(text_tower, images: torch.Tensor, nouns: torch.Tensor, noun_names: Sequence[str],
                   labels: torch.Tensor, probs: torch.Tensor, neighbours: torch.Tensor, neighbour_mask: torch.Tensor,
                   n_clusters: int, *, tau: float, seed: int = 0,
                   config: Optional[CentresConfig] = None) -> CentresResult:
    """Learn the K prompts on ``images`` (raw CLIP features of the tower's model) and the partition ``labels``;
    ``text_tower`` is ``(open_clip model, tokenizer)``. Each prompt's class word is the kept noun nearest the
    cluster's noun mixture (``nouns`` unit, ``noun_names`` their names)."""
    model, tokenizer = text_tower
    config = config or dataclasses.replace(TEXT_CENTRES, steps=PROMPT_STEPS)
    x = unit_rows(images)
    mixtures = cluster_mean_directions(text_counterparts(x, nouns, tau), labels, n_clusters)
    names = [row[0] for row in nearest_noun_names(mixtures, nouns, noun_names, 1)]
    confident = confident_rows(probs, labels, config.confident_fraction)
    with frozen(model):
        prompts = PromptCentres(model, tokenizer, names)
        # The prompts train where the tower is (a caller's tower may sit on another device than the fit's arrays);
        # the result comes back to the fit's device.
        device = prompts.ctx.device
        mask = None if neighbour_mask is None else neighbour_mask.to(device)
        result = train_centres(x.to(device), prompts, [prompts.ctx], labels.to(device), confident.to(device),
                               [(neighbours.to(device), mask)], config=config, seed=seed)
    result = dataclasses.replace(result, centres=result.centres.to(x.device),
                                 probabilities=result.probabilities.to(x.device), labels=result.labels.to(x.device))
    result.history["prompt_nouns"] = names
    return result
