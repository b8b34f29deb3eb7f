"""LOSS.py: the Scorer gives the model's own loss, per-token log-probabilities and gradients, without full logits."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import LOSS
from conftest import same_weights, train

ARCHS = {  # tiny models of each kind of head: gpt2 (tied), llama untied, llama tied
    "gpt2": dict(model_type="gpt2", n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=97),
    "llama": dict(model_type="llama", num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  hidden_size=32, intermediate_size=64, vocab_size=97, tie_word_embeddings=False),
    "llama-tied": dict(model_type="llama", num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       hidden_size=32, intermediate_size=64, vocab_size=97, tie_word_embeddings=True),
}


def tiny(arch):
    torch.manual_seed(0)
    kw = dict(ARCHS[arch])
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw)).eval()


def batch(vocab, seed=1):
    """Two rows of unequal length: the second padded (label -100), and a target mask as conversations have."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 20), generator=g)
    labels = ids.clone()
    labels[1, 14:] = -100  # padding
    labels[0, :7] = -100  # a prompt: not a target
    return dict(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(int((labels[:, 1:] != -100).sum())))


def loss_and_grads(model, b):
    """The model's own loss (transformers' cross-entropy over its full logits) and its gradients."""
    model.zero_grad(set_to_none=True)
    loss = model(**b, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def scorer_loss_and_grads(scorer, b, per_token=False, temperature=1.0):
    """The same through the Scorer: Σ NLL / count, or per-token log-probabilities summed with fixed weights."""
    scorer.zero_grad(set_to_none=True)
    positions = torch.arange(b["input_ids"].shape[1]).repeat(len(b["input_ids"]), 1)
    out = scorer(b["input_ids"], positions, b["labels"], per_token=per_token, temperature=temperature)
    loss = (out * weights_of(out)).sum() if per_token else out / b["num_items_in_batch"]
    loss.backward()
    return loss.detach(), {n.removeprefix("model."): p.grad.clone() for n, p in scorer.named_parameters()
                           if p.grad is not None}


def weights_of(out):
    """Fixed, unequal weights per position, so that every token's gradient counts differently."""
    return torch.linspace(-1.0, 2.0, out.numel()).reshape(out.shape)


def logits_loss_and_grads(model, b, temperature=1.0):
    """Per-token log-probabilities from the model's full logits, weighted as in scorer_loss_and_grads."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=b["input_ids"], use_cache=False).logits.float() / temperature
    targets = torch.nn.functional.pad(b["labels"], (0, 1), value=-100)[:, 1:]
    logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets != -100)
    loss = (logps * weights_of(logps)).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(plain, chunked, scale=False):
    """The same loss and gradients to float precision; scale: each tensor to 1e-5 of its largest element (a
    weighted sum of log-probabilities cancels, so its small gradients carry only absolute precision)."""
    (lp, gp), (lc, gc) = plain, chunked
    assert torch.allclose(lc, lp, rtol=1e-5, atol=1e-5 if scale else 0), (lc, lp)
    assert gp.keys() == gc.keys() and gp
    for n in gp:
        assert torch.allclose(gc[n], gp[n], rtol=1e-5, atol=1e-5 * gp[n].abs().max() if scale else 1e-7), n


@pytest.mark.parametrize("arch", ARCHS)
def test_same_loss_and_gradients_as_the_models_own(arch, monkeypatch):
    monkeypatch.setattr(LOSS, "CHUNK_ELEMENTS", 97 * 5)  # chunks of 5 rows: several chunks per batch
    model = tiny(arch)
    b = batch(97)
    assert LOSS.chunks_exactly(model, "cpu") is None
    assert_same(loss_and_grads(model, b), scorer_loss_and_grads(LOSS.Scorer(model, chunked=True), b))
    assert_same(loss_and_grads(model, b), scorer_loss_and_grads(LOSS.Scorer(model, chunked=False), b))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunked", [True, False])
def test_per_token_log_probabilities_and_their_gradients_equal_the_full_logits(arch, chunked, monkeypatch):
    monkeypatch.setattr(LOSS, "CHUNK_ELEMENTS", 97 * 5)
    model = tiny(arch)
    b = batch(97)
    for temperature in (1.0, 0.7):
        assert_same(logits_loss_and_grads(model, b, temperature),
                    scorer_loss_and_grads(LOSS.Scorer(model, chunked), b, per_token=True, temperature=temperature),
                    scale=True)


def test_same_with_lora_where_only_the_adapters_train(monkeypatch):
    from peft import LoraConfig, get_peft_model
    monkeypatch.setattr(LOSS, "CHUNK_ELEMENTS", 97 * 5)
    model = get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules="all-linear"))
    b = batch(97)
    plain = loss_and_grads(model, b)
    assert LOSS.chunks_exactly(model, "cpu") is None
    chunked = scorer_loss_and_grads(LOSS.Scorer(model, chunked=True), b)
    assert_same(plain, chunked)
    assert chunked[1] and all("lora_" in n for n in chunked[1])
    assert_same(logits_loss_and_grads(model, b), scorer_loss_and_grads(LOSS.Scorer(model, True), b, per_token=True),
                scale=True)


def test_only_the_scored_positions_are_projected_and_no_gradient_under_no_grad():
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny("gpt2")
    head, hidden = model.get_output_embeddings(), torch.randn(40, 32, requires_grad=True)
    y = torch.randint(0, 97, (40,))

    def flops(grad_enabled):
        with torch.set_grad_enabled(grad_enabled), FlopCounterMode(display=False) as counter:
            LOSS.LinearCrossEntropy.apply(hidden, head.weight, head.bias, y, torch.is_grad_enabled())
        return counter.get_total_flops()
    assert flops(False) == 2 * 40 * 32 * 97  # the logits of the scored positions, nothing more
    assert flops(True) == 3 * flops(False)  # with gradients: also d hidden and d weight, computed in forward
    b = batch(97)
    positions = torch.arange(20).repeat(2, 1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        LOSS.Scorer(model, True)(b["input_ids"], positions, b["labels"])
    with torch.no_grad(), FlopCounterMode(display=False) as full:
        model(input_ids=b["input_ids"], use_cache=False)
    scored = int((b["labels"][:, 1:] != -100).sum())
    assert full.get_total_flops() - counter.get_total_flops() == 2 * (40 - scored) * 32 * 97  # unscored: no logits


def test_a_model_whose_loss_is_not_plain_cross_entropy_is_scored_from_its_logits():
    cfg = AutoConfig.for_model("gemma2", num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               hidden_size=32, intermediate_size=64, vocab_size=97, head_dim=16,
                               final_logit_softcapping=2.0)
    model = AutoModelForCausalLM.from_config(cfg)
    b = batch(97)
    why = LOSS.chunks_exactly(model, "cpu")
    assert why and "changed after it" in why
    with torch.no_grad():
        own = model(**b).loss
        scored = LOSS.Scorer(model, chunked=False)(b["input_ids"], torch.arange(20).repeat(2, 1), b["labels"])
    assert torch.allclose(scored / b["num_items_in_batch"], own, rtol=1e-5)


def test_training_with_it_gives_the_plain_runs_weights(tmp_path):
    chunked = train(tmp_path / "chunked", "--dropout", "0")
    plain = train(tmp_path / "plain", "--dropout", "0", "--no-chunked-loss")
    assert "chunked loss" in chunked.stderr and "chunked loss" not in plain.stderr
    assert same_weights(tmp_path / "chunked", tmp_path / "plain", rtol=1e-4, atol=1e-6)


def test_fused_gelu_leaves_gpt2_logits_unchanged_and_its_config_as_it_was(tmp_path):
    from MODEL import fuse_activations
    model = tiny("gpt2")
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert fuse_activations(model) == 2  # one per block
        after = model(input_ids=ids).logits
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-6)
    assert model.config.activation_function == "gelu_new"
    model.save_pretrained(tmp_path)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=ids).logits, before)
