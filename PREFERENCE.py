"""Preference tuning (DPO, --dpo): pairs of answers to one prompt, the loss, and the reference log-probabilities.

A pair is one training sequence of two segments, the chosen answer's conversation and then the rejected one's,
each seeing only itself (position ids restart, as packed documents do), so a pair goes through the model in one
forward. The loss is DPO's sigmoid loss (Rafailov et al., 2023; TRL's loss_type "sigmoid"):

    -log σ(β · ((log π(chosen) - log π_ref(chosen)) - (log π(rejected) - log π_ref(rejected))))

over the summed log-probabilities of each answer's target tokens (the mask SFT trains on). The reference
model's log-probabilities are computed once, in one pass before training (eval mode, no gradients; with LoRA
by the base with the adapter disabled), and cached beside the token cache, so the reference never takes a
second copy of the model in memory and a resumed or repeated run reads them back.
"""
import contextlib
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

import BATCHES
from ATOMIC import replacing
from BATCHES import Step
from REPORT import UserError, log


def answer_logps(logits, labels, position_ids):
    """(B, 2): the summed log-probabilities of the chosen and rejected answers' targets in each row.
    logits (B, T, V) predict labels (B, T) shifted by one; a row's first segment (positions restart at 0) is
    the chosen answer's, its second the rejected one's, the rest padding."""
    y = labels[:, 1:]
    logits = logits[:, :-1].float()
    token = logits.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (B, T-1)
    return segment_sums(token.masked_fill(y == -100, 0.0), position_ids)


def segment_sums(token_logps, position_ids):
    """(B, 2): token log-probabilities (B, T-1 or T; position t: the token after it, 0 where none) summed over
    each row's first segment (the chosen answer) and second (the rejected one); positions restart at 0 at each."""
    segment = (position_ids == 0).cumsum(1)[:, 1:]  # 1: chosen, 2: rejected, 3+: padding
    token = token_logps[:, :segment.shape[1]]
    return torch.stack([(token * (segment == 1)).sum(1), (token * (segment == 2)).sum(1)], dim=1)


def dpo_loss(policy, reference, beta):
    """-> (per-pair losses (B,), the implicit rewards β (log π - log π_ref) of chosen and rejected, each (B,))"""
    rewards = beta * (policy - reference.to(policy.dtype))
    return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards[:, 0].detach(), rewards[:, 1].detach()


class DPO:
    """Preference tuning, one objective of the loop (the parts are listed in SFT.py): a pair a sequence, the loss
    a mean over the global batch's pairs, and TRL's reward statistics."""
    KINDS = ("preference",)
    unit = "pairs"
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")

    def __init__(self, data, reference, run, t, pad_id):
        self.data, self.reference, self.run, self.t, self.pad_id = data, reference, run, t, pad_id
        self.val, self.size, self.per_step = None, len(data), t.batch_size * t.grad_accum * run.world

    def prepare(self, position):
        """The global batch's pairs, this rank's share of each micro-step with the reference log-probabilities of
        its pairs, and its share of the number of pairs."""
        idx = BATCHES.sample_indices(position, self.per_step, self.size, self.t.seed)
        batches = [BATCHES.on(self.run, b | {"reference": torch.from_numpy(self.reference[share])})
                   for share, b in BATCHES.micro_batches(self.data, idx, self.t, self.run, self.pad_id)]
        return Step(batches, torch.tensor(len(idx) / self.run.world, device=self.run.device),
                    int(self.data.lengths[idx].sum()), torch.zeros(len(self.names), device=self.run.device))

    def loss(self, model, batch, pairs):
        """Σ of the micro-batch's pair losses / the step's pairs (this rank's share), and its share of the
        statistics (sums over its pairs / the same count, so the ranks' and micro-steps' shares add up)."""
        tokens = model(batch["input_ids"], batch["position_ids"], batch["labels"], per_token=True)
        losses, chosen, rejected = dpo_loss(segment_sums(tokens, batch["position_ids"]), batch["reference"],
                                            self.t.dpo_beta)
        stats = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(),
                             (chosen - rejected).sum()])
        return losses.sum() / pairs, stats / pairs


def with_reference(cfg, run, scorer, seqs, pad_id, resume):
    """The reference log-probabilities of the pairs (N, 2): from the cache beside the token cache, or computed
    from the model as it starts (a resumed full fine-tune has moved away from the reference)."""
    path = cache_path(cfg, seqs)
    if resume and not cfg.lora.enabled and not os.path.exists(path):
        raise UserError(f"{path}: the reference log-probabilities of this DPO run are missing, and the resumed "
                        "model is no longer the reference - restore the file, or start the run again")
    return reference_logps(scorer, seqs, run, cfg.training.batch_size, pad_id, path)


def cache_path(cfg, seqs):
    """Where the reference log-probabilities of these pairs are kept: beside the token cache, keyed by its folder
    (itself a key of the files, tokenizer and template: DATA.token_cache), the pairs' token ranges, the reference
    model (its weight files' names, sizes and times) and the precision."""
    h = hashlib.sha256(seqs.segments.tobytes())
    h.update(os.path.basename(os.path.dirname(seqs.corpus.tokens.filename)).encode())
    h.update(json.dumps([cfg.model.name, model_files(cfg.model.name), cfg.model.dtype]).encode())
    return os.path.join(cfg.data.cache_dir, "reference-" + h.hexdigest()[:16] + ".npy")


def model_files(path):
    """[name, size, mtime] of a model directory's weight files (a hub id: nothing more than its name)."""
    if not os.path.isdir(path):
        return []
    return sorted([f, os.path.getsize(os.path.join(path, f)), os.path.getmtime(os.path.join(path, f))]
                  for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".gguf")))


@torch.no_grad()
def reference_logps(scorer, seqs, run, batch_size, pad_id, path):
    """(N, 2) float32: the reference model's answer log-probabilities of every pair, read from `path` or
    computed (eval mode, the adapter disabled where there is one) and written there."""
    if os.path.exists(path):
        log(f"reusing reference log-probabilities {path}")
        return np.load(path)
    model = scorer.model
    was_training = model.training
    model.eval()
    out = []
    adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with adapter_off, run.autocast:
        for start in range(0, len(seqs), batch_size):
            batch = BATCHES.on(run, BATCHES.collate(BATCHES.gather(seqs, range(start, min(start + batch_size,
                                                                                         len(seqs)))), pad_id))
            tokens = scorer(batch["input_ids"], batch["position_ids"], batch["labels"], per_token=True)
            out.append(segment_sums(tokens, batch["position_ids"]).cpu())
    model.train(was_training)
    result = torch.cat(out).numpy().astype(np.float32)
    if run.master:
        with replacing(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, result)
        log(f"reference log-probabilities of {len(result)} pairs -> {path}")
    return result
