"""LOSS.py: the chunked linear + cross-entropy gives the model's own loss and gradients, without full logits."""
import copy

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
    model.zero_grad(set_to_none=True)
    loss = model(**b, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(plain, chunked):
    (lp, gp), (lc, gc) = plain, chunked
    assert torch.allclose(lc, lp, rtol=1e-5, atol=0), (lc, lp)
    assert gp.keys() == gc.keys() and gp
    for n in gp:
        assert torch.allclose(gc[n], gp[n], rtol=1e-5, atol=1e-7), n


@pytest.mark.parametrize("arch", ARCHS)
def test_same_loss_and_gradients_as_the_models_own(arch, monkeypatch):
    monkeypatch.setattr(LOSS, "CHUNK_ELEMENTS", 97 * 5)  # chunks of 5 rows: several chunks per batch
    model = tiny(arch)
    b = batch(97)
    plain = loss_and_grads(model, b)
    assert LOSS.use_chunked(model, "cpu") is None
    assert_same(plain, loss_and_grads(model, b))


def test_same_with_lora_where_only_the_adapters_train(monkeypatch):
    from peft import LoraConfig, get_peft_model
    monkeypatch.setattr(LOSS, "CHUNK_ELEMENTS", 97 * 5)
    model = get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules="all-linear"))
    b = batch(97)
    plain = loss_and_grads(model, b)
    assert LOSS.use_chunked(model, "cpu") is None
    chunked = loss_and_grads(model, b)
    assert_same(plain, chunked)
    assert all("lora_" in n for n in chunked[1])


def test_without_a_count_it_is_the_mean_and_under_no_grad_it_computes_no_gradients():
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny("gpt2")
    b = batch(97)
    del b["num_items_in_batch"]
    with torch.no_grad():
        plain = model(**b).loss
    assert LOSS.use_chunked(model, "cpu") is None and LOSS.is_chunked(model)
    with torch.no_grad():
        assert torch.allclose(model(**b).loss, plain, rtol=1e-5)
    head, hidden = model.get_output_embeddings(), torch.randn(2, 20, 32, requires_grad=True)

    def flops(grad_enabled):
        with torch.set_grad_enabled(grad_enabled), FlopCounterMode(display=False) as counter:
            LOSS.chunked_loss(head, hidden, b["labels"])
        return counter.get_total_flops()
    scored = int((b["labels"][:, 1:] != -100).sum())
    assert flops(False) == 2 * scored * 32 * 97  # the logits of the scored positions, nothing more
    assert flops(True) == 3 * flops(False)  # with gradients: also d hidden and d weight, computed in forward


def test_a_model_whose_loss_is_not_plain_cross_entropy_keeps_its_own():
    cfg = AutoConfig.for_model("gemma2", num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               hidden_size=32, intermediate_size=64, vocab_size=97, head_dim=16,
                               final_logit_softcapping=2.0)
    model = AutoModelForCausalLM.from_config(cfg)
    before = copy.deepcopy(model)
    b = batch(97)
    why = LOSS.use_chunked(model, "cpu")
    assert why and "differs" in why
    assert torch.equal(model(**b).logits, before(**b).logits)  # nothing swapped: real logits again


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
