"""The training loss without the full logits: output projection and cross-entropy, chunk by chunk.

transformers computes logits for every position (batch x seq x vocab, upcast to fp32) and keeps them, their
log-softmax and their gradient alive until backward: at 4 x 1024 tokens and SmolLM2's 49k vocabulary that
is 0.8 GB a copy, more than the model's fp32 weights. Here the model's own forward runs unchanged (so DDP,
FSDP, peft and torch.compile see the same module call) with two swaps on the model instance:

  - the output head passes its input through: the "logits" reaching the loss are the last hidden states;
  - the model's loss_function (transformers' hook for it) is `chunked_loss`, which takes only the positions
    that have a target and, a few hundred rows at a time, projects them to the vocabulary, sums their NLL
    and computes that chunk's gradients at once; backward only scales the stored gradients.

Peak extra memory is one chunk's logits (CHUNK_ELEMENTS floats) instead of several full copies. `use_chunked`
checks the swap on the model itself (the same loss as the plain path on a probe batch) and keeps the
model's own loss where it is not equivalent (logit soft-capping, scaled logits, a custom loss).
"""
import types

import torch

from CONFIG import log

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
            logits = torch.nn.functional.linear(hc, weight, bias).float()  # (n, V); in autocast's dtype, then fp32
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


@torch.compiler.disable  # eager under --compile: it is matmuls already, and its row count varies per batch
def chunked_loss(head, hidden, labels, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **_):
    """transformers' ForCausalLMLoss (position t predicts labels[t+1]; Σ NLL / num_items_in_batch, else the
    mean), computed from the last hidden states (B, T, H) and the output head, only where there is a target."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    keep = (shift_labels != ignore_index).reshape(-1).to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])[keep]  # (N, H): the positions that are scored
    y = shift_labels.reshape(-1).to(hidden.device)[keep]
    nll = LinearCrossEntropy.apply(h, head.weight, head.bias, y, torch.is_grad_enabled())
    if num_items_in_batch is None:
        return nll / max(1, len(y))
    return nll / (num_items_in_batch.to(nll.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)


def unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the model it wraps


def is_chunked(model):
    """Whether use_chunked swapped the chunked loss into this model."""
    return "_loss_function" in vars(unwrap(model))


def _swap(model):
    """Install the two swaps on the (unwrapped) transformers model; -> a function that undoes them."""
    base = unwrap(model)
    head = base.get_output_embeddings()

    def undo():
        vars(head).pop("forward", None)
        vars(base).pop("_loss_function", None)
    try:
        head.forward = types.MethodType(lambda self, x: x, head)  # the "logits" are the hidden states
        base.loss_function = lambda logits, labels, vocab_size=None, **kw: chunked_loss(head, logits, labels, **kw)
    except Exception:  # e.g. a transformers without the loss_function setter
        undo()
        raise
    return undo


def use_chunked(model, device, seed=0):
    """Swap in the chunked loss where it gives this model's own loss on a probe batch. -> None, or why not
    (also said in one line on stderr)."""
    head = unwrap(model).get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return note(f"its output head is a {type(head).__name__}, not a plain Linear")
    vocab = head.weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=g).to(device)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=g).to(device) < 0.3, -100)
    was_training, undo = model.training, None
    model.eval()
    try:
        with torch.no_grad():
            plain = model(input_ids=ids, labels=labels, use_cache=False).loss.float()
            undo = _swap(model)
            chunked = model(input_ids=ids, labels=labels, use_cache=False).loss.float()
    except Exception as e:  # a model or transformers version this cannot drive: train with the model's own loss
        if undo:
            undo()
        return note(f"the probe failed ({type(e).__name__}: {str(e)[:120]})")
    finally:
        model.train(was_training)
    if torch.isclose(plain, chunked, rtol=1e-4, atol=1e-5):
        return None
    undo()
    return note(f"its own loss differs from plain cross-entropy of its head ({plain.item():.5f} vs {chunked.item():.5f})")


def note(why):
    log(f"note: keeping the model's own loss, not the chunked one: {why}")
    return why
