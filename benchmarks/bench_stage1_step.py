"""stage1_step: one epoch of stage 1's training steps (``laic.stage1.train_heads``), eager against the full-size
steps replayed from a CUDA graph (``Stage1Config.cuda_graph``; CUDA only). At N = 1.28M stage 1 runs one epoch of
5,005 steps (``laic.stage1.n_epochs``): where a step's launches take more host time than the GPU takes to run them, the graph is what brings
it to the GPU's own time. Each
call trains N / 256 steps (the 'notes' column) and also holds what a call of train_heads does once: the heads' final
pass over the N rows and the centres, and for the graph its 3 eager warm-up steps and the capture; so the table's
ms over the step count is an upper bound on a step's cost, close to it at 500 steps, not at 8. The space is random
(unit features, random neighbour lists): the steps' cost does not depend on what the features mean."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from common import Case
from laic.distributed.rows import RowBlocks
from laic.stage0 import SemanticSpace
from laic.stage1 import Stage1Config, train_heads
from laic_kernels import checks

BATCH = 256
# (steps in the epoch, K, D)
SIZES = {
    "small": [(8, 10, 512), (8, 100, 512)],
    "large": [(500, 100, 512), (500, 1000, 512)],
    "imagenet": [(500, 1000, 512)],
}
NEIGHBOURS = 10


def random_space(n: int, dim: int, device: torch.device, seed: int = 0) -> SemanticSpace:
    gen = torch.Generator(device=device).manual_seed(seed)
    images, texts = (F.normalize(torch.randn(n, dim, generator=gen, device=device), dim=1) for _ in range(2))
    neighbours = torch.randint(0, n, (n, NEIGHBOURS), generator=gen, device=device)
    mask = torch.rand(n, NEIGHBOURS, generator=gen, device=device) < 0.5
    mask[:, 0] = True
    empty = torch.empty(0, device=device)
    return SemanticSpace(mean=torch.zeros(dim, device=device), images=images, texts=texts,
                         text_mean=torch.zeros(dim, device=device), noun_index=empty.long(), nouns=empty,
                         image_neighbours=neighbours, text_neighbours=neighbours, neighbours=neighbours,
                         neighbour_mask=mask, agreement=0.5, rows=RowBlocks(n))


def one_epoch(space, anchor, k, graph: bool):
    config = Stage1Config(target_steps=1, min_epochs=1, max_epochs=1, cuda_graph=graph)
    with checks.values_checked():    # as LAIC.fit runs stage 1
        return train_heads(space, anchor, k, seed=0, config=config)


def cases(device: torch.device, scale: str):
    out = []
    for steps, k, dim in SIZES[scale]:
        n = steps * BATCH
        space = random_space(n, dim, device)
        anchor = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(1)).to(device)
        runs = {"eager": partial(one_epoch, space, anchor, k, False)}
        if device.type == "cuda":
            runs["cuda graph"] = partial(one_epoch, space, anchor, k, True)
        out.append(Case("stage1_step", f"N={n} K={k} D={dim} B={BATCH}", "float32", runs, baseline="eager",
                        notes={label: f"{steps} steps a call" for label in runs}))
    return out
