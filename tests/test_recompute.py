"""RECOMPUTE.py: recomputing in backward (the cheap parts, or whole layers) gives the model's own loss and gradients."""
import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

import LOSS
import RECOMPUTE
from CONFIG import TrainingCfg
from conftest import train, weights
from test_loss import ARCHS, assert_same, batch, loss_and_grads, scorer_loss_and_grads, tiny


def seeded_loss_and_grads(model, b):
    torch.manual_seed(5)  # the same dropout masks on both sides: the recomputation must replay them exactly
    return loss_and_grads(model, b)


@pytest.mark.parametrize("mode", ["cheap", "all"])
@pytest.mark.parametrize("arch", ARCHS)
def test_same_loss_and_gradients_as_keeping_everything(arch, mode):
    model = tiny(arch).train()  # dropout on (gpt2's config default): layers recompute in training mode only
    scorer = LOSS.Scorer(model, chunked=True)  # as TRAIN.py computes the loss

    def seeded(b):
        torch.manual_seed(5)
        return scorer_loss_and_grads(scorer, b)
    b = batch(97)
    kept = seeded(b)
    assert "2 layers recompute" in RECOMPUTE.apply(model, mode)
    assert_same(kept, seeded(b))


def test_same_with_lora_where_only_the_adapters_train():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules="all-linear")).train()
    b = batch(97)
    kept = seeded_loss_and_grads(model, b)
    assert "2 layers recompute" in RECOMPUTE.apply(model, "cheap")
    recomputed = seeded_loss_and_grads(model, b)
    assert_same(kept, recomputed)
    assert all("lora_" in n for n in recomputed[1])


def test_cheap_recomputes_element_wise_ops_but_no_matmul():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):  # every aten op run, in order
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    def backward_ops(model):
        loss = model(**batch(97), use_cache=False).loss
        with Ops() as seen:
            loss.backward()
        return seen.ops
    torch.manual_seed(0)  # wide enough that every matmul's inner dimension is above RECOMPUTE.CHEAP_INNER
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=128,
        intermediate_size=256, vocab_size=97)).train()
    kept = backward_ops(model)
    RECOMPUTE.apply(model, "cheap")
    recomputed = backward_ops(model)
    forward_only = [op for op in recomputed if op not in kept]  # ops that only a forward runs: the replay
    assert torch.ops.aten.silu.default in forward_only and torch.ops.aten.rsqrt.default in forward_only
    assert recomputed.count(torch.ops.aten.mm.default) == kept.count(torch.ops.aten.mm.default)


def test_matmuls_are_kept_but_not_a_lora_rank_r_one():
    mm, x = torch.ops.aten.mm.default, torch.zeros(16, 576)
    assert RECOMPUTE.policy(None, mm, x, torch.zeros(576, 1536)) == CheckpointPolicy.MUST_SAVE
    assert RECOMPUTE.policy(None, mm, torch.zeros(16, 8), torch.zeros(8, 576)) == CheckpointPolicy.PREFER_RECOMPUTE
    assert RECOMPUTE.policy(None, torch.ops.aten.silu.default, x) == CheckpointPolicy.PREFER_RECOMPUTE


def test_training_says_what_it_recomputes_and_none_gives_the_same_weights(tmp_path):
    cheap = train(tmp_path / "cheap", "--dropout", "0", "--recompute", "cheap")
    none = train(tmp_path / "none", "--dropout", "0", "--recompute", "none")
    assert "recompute: cheap: 2 layers recompute element-wise results" in cheap.stderr
    assert "recompute: none" in none.stderr
    a, b = weights(tmp_path / "cheap"), weights(tmp_path / "none")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def smollm2_shape():
    return AutoConfig.for_model("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)


def test_auto_keeps_everything_unless_memory_calls_for_less():
    """SmolLM2-135M's shape at 2 x 1024: about 2.9 GB of activations kept whole, 1.7 GB with cheap recomputation."""
    config, tokens, GB = smollm2_shape(), 2 * 1024, 1e9
    assert RECOMPUTE.choose("auto", config, tokens, 24 * GB, 2 * GB)[0] == "none"
    assert RECOMPUTE.choose("auto", config, tokens, 6 * GB, 1 * GB)[0] == "cheap"  # 2.5 GB of room
    assert RECOMPUTE.choose("auto", config, tokens, 3 * GB, 1 * GB)[0] == "all"    # 1 GB of room
    assert RECOMPUTE.choose("auto", config, tokens, None, 0)[0] == "none"
    assert RECOMPUTE.choose("cheap", config, tokens, 24 * GB, 0)[0] == "cheap"     # what the user asked for


def saved_activation_bytes(model, ids):
    """Bytes of the tensors the body's forward saves for backward, its own weights left out (measured with
    autograd's saved-tensor hooks)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.base_model(input_ids=ids)
    return sum(saved.values())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_activation_estimate_is_what_the_forward_keeps(arch):
    config = {"gpt2": dict(n_layer=3, n_head=4, n_embd=128, n_positions=256, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0),
              "llama": dict(num_hidden_layers=3, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                            num_key_value_heads=2)}[arch]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=512, **config)).train()
    ids = torch.randint(0, 512, (2, 128))
    measured, estimate = saved_activation_bytes(model, ids), RECOMPUTE.activation_bytes(model.config, ids.numel(), "none")
    assert 0.7 < estimate / measured < 1.3, (estimate, measured)


def test_a_run_that_has_the_memory_keeps_everything():
    model = tiny("llama").train()
    t = TrainingCfg(batch_size=4, max_length=64)  # recompute "auto", the default
    mode, why = RECOMPUTE.plan(t, model, free_bytes=16e9)
    RECOMPUTE.apply(model, mode, why)
    assert mode == "none" and not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    mode, why = RECOMPUTE.plan(t, model, free_bytes=1e3)  # nothing to spare
    RECOMPUTE.apply(model, mode, why)
    assert mode == "all" and all(m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
