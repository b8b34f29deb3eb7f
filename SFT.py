"""Supervised training (pretraining and fine-tuning): the mean NLL of the target tokens, one objective of the
training loop. Each objective (SFT here, DPO in PREFERENCE.py, GRPO in GRPO.py) has the parts TRAIN.train calls:

    KINDS            the kinds of samples it trains on (DATA.kinds)
    names            the statistics it logs after the loss (metrics.jsonl, the progress bar)
    size, per_step   samples in an epoch, and taken by one optimizer step (its global batch); unit: what a
                     sample is (sequences, pairs, prompts)
    val              validation Sequences, or None
    prepare(pos)     the Step that begins at sample position `pos`: this rank's micro-batches and the count
                     its loss is a mean over
    loss(model, batch, count)   one micro-batch's share of the step's loss, and of its statistics
"""
import torch

import BATCHES
from BATCHES import Step


class SFT:
    KINDS = ("text", "messages", "prompt")
    unit = "sequences"

    def __init__(self, data, val, run, t, pad_id):
        self.data, self.val, self.run, self.t, self.pad_id = data, val, run, t, pad_id
        self.names = ()
        self.size, self.per_step = len(data), t.batch_size * t.grad_accum * run.world

    def prepare(self, position):
        """The global batch's sequences from `position` in the seeded order (the same on every rank), this rank's
        share of each micro-step, and its share of their target tokens."""
        idx = BATCHES.sample_indices(position, self.per_step, self.size, self.t.seed)
        # each micro-batch's loss is its token NLL sum over the global batch's target tokens, so accumulation and
        # ranks equal one big batch (DDP averages gradients over ranks: the count is divided by world)
        target_tokens = max(1, int(self.data.targets[idx].sum())) / self.run.world
        batches = BATCHES.micro_batches(self.data, idx, self.t, self.run, self.pad_id)
        return Step([BATCHES.on(self.run, b) for _, b in batches],
                    torch.tensor(target_tokens, device=self.run.device), int(self.data.lengths[idx].sum()),
                    torch.zeros(0, device=self.run.device))

    def loss(self, model, batch, target_tokens):
        """Σ of the micro-batch's token NLLs / the step's target tokens (this rank's share); no statistics."""
        nll = model(batch["input_ids"], batch["position_ids"], batch["labels"])
        return nll / target_tokens, torch.zeros(0, device=target_tokens.device)

