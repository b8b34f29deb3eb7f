"""What every objective's loss is made of, without the full logits: the model's body and its output head as one
module, `Scorer`, whose forward returns the summed NLL of the target tokens (SFT, validation) or each target
token's log-probability (DPO, GRPO). DDP, FSDP and torch.compile wrap the Scorer; checkpoints save the model
it holds, whose forward is never swapped: `model(...)` anywhere else returns its own logits.

transformers computes logits for every position (batch x seq x vocab, upcast to fp32) and keeps them, their
log-softmax and their gradient alive until backward: at 4 x 1024 tokens and SmolLM2's 49k vocabulary that
is 0.8 GB a copy, more than the model's fp32 weights. Here only the positions that have a target are projected
to the vocabulary, a few hundred rows at a time:

  - LinearCrossEntropy: Σ NLL, with that chunk's gradients computed in forward (backward only scales them);
  - LinearLogprobs: each row's log-probability; backward computes each chunk's logits again (one more matmul),
    since the loss of a DPO pair or a GRPO completion is not a plain sum of them.

Peak extra memory is one chunk's logits (CHUNK_ELEMENTS floats) instead of several full copies. `chunks_exactly`
checks on the model itself that this gives its own loss; where it does not (logit soft-capping, scaled logits,
a custom loss), and with --no-chunked-loss, the Scorer calls the model's own forward: its own loss for the NLL
sum, its full logits for per-token log-probabilities.
"""
import torch
import torch.nn.functional as F

from REPORT import log

CHUNK_ELEMENTS = 2 ** 24  # logits per chunk: 64 MB in fp32; a chunk of rows is CHUNK_ELEMENTS // vocab


class LinearCrossEntropy(torch.autograd.Function):
    """Σ NLL of targets y (N,) under logits = h (N, H) @ W.T (V, H) (+ b), chunked over rows. The gradients
    are computed in forward (the logits are needed there anyway) and scaled by grad_output in backward."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, grad_enabled):
        # the caller's grad mode (forward always runs without it): under no_grad only the NLL is computed
        need_h, need_w, need_b = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        nll = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        for start in range(0, h.shape[0], chunk_rows):
            hc, yc = h[start:start + chunk_rows], y[start:start + chunk_rows]
            logits = F.linear(hc, weight, bias).float()  # (n, V); in autocast's dtype, then fp32
            lse = torch.logsumexp(logits, dim=-1)
            nll += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place: d nll / d logits = softmax - onehot
            grad[torch.arange(len(yc), device=h.device), yc] -= 1
            if grad_h is not None:
                grad_h[start:start + chunk_rows] = grad.to(weight.dtype) @ weight  # (n, H); autocast's dtype
            if grad_w is not None:
                grad_w += grad.to(hc.dtype).T @ hc  # (V, H), summed in fp32 over chunks
            if grad_b is not None:
                grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors  # scaled in place: no second weight-sized buffer
        scale = lambda g, dtype=None: None if g is None else g.mul_(grad_out).to(dtype or g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w, ctx.dtypes[0]), scale(grad_b, ctx.dtypes[1]), None, None


class LinearLogprobs(torch.autograd.Function):
    """log_softmax((h @ W.T + b) / temperature)[y] for each row (N,), chunked over rows in forward and again in
    backward, where d logp / d logits = onehot - softmax, each row scaled by its grad_output. Backward repeats
    forward's matmul in forward's dtype (autocast's, which is not active in backward)."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, temperature):
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            logits = F.linear(h[start:start + chunk_rows], weight, bias)  # (n, V), in autocast's dtype
            ctx.dtype = logits.dtype
            logits = logits.float() / temperature
            yc = y[start:start + chunk_rows]
            out[start:start + chunk_rows] = logits.gather(1, yc[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
        ctx.save_for_backward(h, weight, bias, y)
        ctx.temperature = temperature
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        h, weight, bias, y = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dt = getattr(ctx, "dtype", h.dtype)  # no rows: nothing to do
        w, b = weight.to(dt), None if bias is None else bias.to(dt)
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        for start in range(0, h.shape[0], chunk_rows):
            hc, yc = h[start:start + chunk_rows].to(dt), y[start:start + chunk_rows]
            logits = F.linear(hc, w, b).float() / ctx.temperature
            grad = logits.softmax(-1).neg_()  # d logp / d logits: onehot - softmax, then / temperature
            grad[torch.arange(len(yc), device=h.device), yc] += 1
            grad.mul_(grad_out[start:start + chunk_rows, None] / ctx.temperature)
            if grad_h is not None:
                grad_h[start:start + chunk_rows] = (grad.to(dt) @ w).to(h.dtype)  # (n, H)
            if grad_w is not None:
                grad_w += (grad.to(dt).T @ hc).float()  # (V, H), summed in fp32 over chunks
            if grad_b is not None:
                grad_b += grad.sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


class Scorer(torch.nn.Module):
    """A causal LM as the losses see it. forward(input_ids, position_ids, labels) -> Σ NLL of the labels (fp32
    scalar; position t predicts labels[t + 1], -100: no target); with per_token, the (B, T) log-probabilities
    of the labels at the positions that predict them (0 elsewhere), logits divided by `temperature` first."""

    def __init__(self, model, chunked):
        super().__init__()
        self.model = model      # the transformers model (or peft's wrapper of it): what checkpoints save
        self.chunked = chunked  # False: from the model's own full logits (see chunks_exactly)

    def forward(self, input_ids, position_ids, labels, per_token=False, temperature=1.0):
        targets = F.pad(labels, (0, 1), value=-100)[:, 1:]  # (B, T): what each position predicts
        if self.chunked:
            base = unwrap(self.model)
            hidden = base.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
            return head_scores(hidden, base.get_output_embeddings(), targets, per_token, temperature)
        if not per_token:  # the model's own loss: Σ NLL when divided by 1
            return self.model(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False,
                              num_items_in_batch=torch.tensor(1, device=labels.device)).loss
        logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        keep = targets != -100
        logps = (logits[keep].float() / temperature).log_softmax(-1).gather(1, targets[keep][:, None]).squeeze(1)
        return torch.zeros(keep.shape, dtype=logps.dtype, device=logps.device).masked_scatter(keep, logps)


@torch.compiler.disable  # eager under --compile: it is matmuls already, and its row count varies per batch
def head_scores(hidden, head, targets, per_token, temperature):
    """The head's Σ NLL of the targets (B, T) (-100: none), or their (B, T) log-probabilities (0 where none), from
    the hidden states (B, T, H): only the positions with a target are projected to the vocabulary."""
    keep = targets != -100
    h, y = hidden[keep], targets[keep]  # (N, H), (N,)
    if not per_token:
        return LinearCrossEntropy.apply(h, head.weight, head.bias, y, torch.is_grad_enabled())
    logps = LinearLogprobs.apply(h, head.weight, head.bias, y, temperature)
    return torch.zeros(keep.shape, dtype=logps.dtype, device=logps.device).masked_scatter(keep, logps)


def unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the model it wraps


def chunks_exactly(model, device, seed=0):
    """None where the chunked head gives this model's own loss on a probe batch, else why not (also said in one
    line on stderr): then the Scorer reads its full logits."""
    head = unwrap(model).get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return note(f"its output head is a {type(head).__name__}, not a plain Linear")
    vocab = head.weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=g).to(device)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=g).to(device) < 0.3, -100)
    positions = torch.arange(12, device=device).repeat(2, 1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels, use_cache=False)
            base = unwrap(model)
            mine = head(base.base_model(input_ids=ids, position_ids=positions, use_cache=False)[0]).float()
            chunked = Scorer(model, chunked=True)(ids, positions, labels) / (labels[:, 1:] != -100).sum()
    except Exception as e:  # a model or transformers version this cannot drive: its own full logits
        return note(f"the probe failed ({type(e).__name__}: {str(e)[:120]})")
    finally:
        model.train(was_training)
    if not torch.allclose(out.logits.float(), mine, rtol=1e-5, atol=1e-6):  # e.g. soft-capped or scaled logits
        return note("its logits are not its output head's (they are changed after it)")
    if not torch.isclose(out.loss.float(), chunked, rtol=1e-4, atol=1e-5):
        return note(f"its own loss differs from plain cross-entropy of its head ({out.loss.item():.5f} vs "
                    f"{chunked.item():.5f})")
    return None


def note(why):
    log(f"note: the loss is computed from the model's full logits, not chunk by chunk: {why}")
    return why
