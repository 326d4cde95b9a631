"""Stage 2, self-enhancement: fine-tune the open_clip vision tower on the stage-1 model's confident pseudo-labels.

What it needs, and nothing more (so it stays independent of how stage 1 is built):
  - ``stage1``: any object with ``predict_proba(features) -> [N, K]`` (a fitted ``LAIC``), used once, for the first
    pseudo-labels and to initialise the image head (or those probabilities, when the caller has them already);
  - an open_clip model (only its vision tower is used; it is copied, the caller's model is left untouched);
  - the image paths (readable images; stream from disk, decoded by DataLoader workers);
  - optionally the frozen text counterparts ``[N, D]`` of the images (stage 1's semantic mixture of nouns): a
    contrastive term keeps each fine-tuned image embedding closest to its own text counterpart, which ties the
    encoder to language. Without them that term is off (``FineTuneResult.notes`` says so).

Training: the last ``n_blocks`` residual blocks of the vision tower, what follows them (``ln_post``, ``proj``) and a
cosine image head whose class vectors start at the centres of the confident stage-1 clusters; optionally LoRA
adapters of rank ``lora_rank`` on the attention projections of every block. The loss is cross-entropy with label
smoothing on a weak view (random resized crop, flip) and a strong view (plus colour jitter, grayscale, blur) of each
image, plus ``text_weight`` times the text term. Every epoch the current model relabels all images and, per cluster,
the most confident ``keep_fraction`` (at least ``min_per_cluster``) become that epoch's pseudo-labels, so small
clusters keep their share. AMP on CUDA (bf16, or fp16 with a gradient scaler); gradient accumulation
(``grad_accum_steps``) on any device.

Reproducibility and resuming: the shuffling of each epoch comes from a generator seeded by (seed, epoch), and each
image's augmentation from a seed of (seed, epoch, image index), so results do not depend on the number of workers or
on where a run was interrupted. After every epoch a checkpoint (trainable parameters, optimiser, scheduler, gradient
scaler, RNG states, pseudo-labels, history, epoch) replaces the previous one atomically; ``resume=True`` continues
from it and ends in the same state as an uninterrupted run (bitwise on the CPU, with the same ``eval_batch_size``).

In a process group (``torchrun``, or any initialised ``torch.distributed`` default group), :func:`fine_tune` called
on every rank with the same arguments trains one model together: DistributedDataParallel over the trainable modules,
each combined batch of ``batch_size`` images split among the ranks, relabelling sharded by rank and gathered; rank 0
writes the checkpoint, which resumes on any number of processes; a step that fails on one rank stops all of them
with one message (``laic.stage2.parallel`` says how the result matches one process's).

The modules, in the order a run uses them:
  config      Stage2Config, and the checks of array and path inputs
  data        the tower's preprocessing, weak and strong augmentations, seeded datasets
  encoder     the trainable tower and cosine head, inference over image files, FineTunedEncoder (the result)
  train       pseudo-labels, the losses, fine_tune (the loop)
  checkpoint  the per-epoch checkpoint that makes a run resumable
  parallel    the process-group side: batches shared among ranks, DDP, features gathered for the text term
  estimator   the LAIC side: fit_images (stages 0 to 2 on image files), Stage2Part (what a fitted LAIC keeps)
"""

from .checkpoint import CHECKPOINT_NAME
from .config import Stage2Config
from .encoder import FineTunedEncoder, check_tower, prepare_encoder, trainable_state
from .estimator import Stage2Part, fit_images, fit_laic_images, predict_images, predict_images_proba
from .train import FineTuneResult, fine_tune, select_confident

__all__ = ["Stage2Config", "fine_tune", "FineTuneResult", "FineTunedEncoder", "select_confident", "prepare_encoder",
           "check_tower", "trainable_state", "CHECKPOINT_NAME", "Stage2Part", "fit_images", "fit_laic_images",
           "predict_images", "predict_images_proba"]
