"""fp32/bf16 linear layers packed for oneDNN (PACK.py), what INFER.py (and a --decode eager server) generates with
on a CPU: each layer computes what the plain layer computes, and fp32 greedy answers are transformers.generate's,
one at a time and batched with padding; a model that decodes compiled keeps its plain layers."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import CONFIG
import GENERATE
import PACK
from test_decode import PROMPTS, loaded, reference  # transformers' own greedy tokens

GREEDY = GENERATE.sampling_of(True, 0, 0, 1)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_packed_layer_computes_what_the_plain_layer_computes(kind):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48) if kind == "linear" else Conv1D(48, 64)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        want = layer(x)
    model = PACK.to_packed(nn.Sequential(layer))
    packed = model[0]
    assert isinstance(packed, PACK.PackedLinear) and packed.packed.layout == torch._mkldnn  # oneDNN's own layout
    with torch.no_grad():
        got = packed(x)
    assert got.shape == (3, 5, 48) and torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, torch.zeros_like(got))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_greedy_is_transformers_generate(models, arch):
    """GENERATE.load packs the fp32 model's linear layers; its greedy tokens are transformers.generate's for each
    prompt alone and for the prompts together (left-padded). Loaded to decode compiled, nothing is packed."""
    references = [reference(*loaded(models[arch]), prompt, 40) for prompt in PROMPTS]
    model, tok = GENERATE.load(CONFIG.ModelCfg(name=str(models[arch]), device="cpu", dtype="float32"), False)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, Conv1D, PACK.PackedLinear))]
    assert layers and all(isinstance(m, PACK.PackedLinear) for m in layers)
    rows = [GENERATE.Row(tok(p)["input_ids"], GENERATE.Options(40, GREEDY, [], [tok.eos_token_id])) for p in PROMPTS]
    assert [GENERATE.generate(model, tok, [row])[0].new_ids for row in rows] == references
    assert [a.new_ids for a in GENERATE.generate(model, tok, rows)] == references
    plain, _ = GENERATE.load(CONFIG.ModelCfg(name=str(models[arch]), device="cpu", dtype="float32"), True)
    assert not any(isinstance(m, PACK.PackedLinear) for m in plain.modules())


@pytest.mark.skipif(not GENERATE.native_bf16(torch.device("cpu")), reason="int8 needs a CPU with native bf16")
def test_an_int8_model_is_not_packed(models):
    """--dtype int8 quantizes every linear layer (QUANT.py): nothing is left to pack, and nothing is copied for it."""
    model, _ = GENERATE.load(CONFIG.ModelCfg(name=str(models["llama"]), device="cpu", dtype="int8"), False)
    assert not PACK.packable(model, True)
    assert not any(isinstance(m, (nn.Linear, PACK.PackedLinear)) for m in model.modules())


def test_beside_a_compiled_model_batches_get_a_packed_twin_that_shares_the_rest(models):
    """A server that decodes one row compiled generates batches with GENERATE.for_batches: a twin whose linear
    layers are packed and whose other tensors (the embedding) are the plain model's own, not copies; its batched
    greedy tokens are transformers.generate's, and the plain model is left as it was."""
    references = [reference(*loaded(models["llama"]), prompt, 40) for prompt in PROMPTS]
    model, tok = GENERATE.load(CONFIG.ModelCfg(name=str(models["llama"]), device="cpu", dtype="float32"), True)
    plain = {name: t.data_ptr() for name, t in model.state_dict().items()}
    twin = GENERATE.for_batches(model)
    assert any(isinstance(m, PACK.PackedLinear) for m in twin.modules())
    assert not any(isinstance(m, PACK.PackedLinear) for m in model.modules())
    assert twin.get_input_embeddings().weight is model.get_input_embeddings().weight
    assert {name: t.data_ptr() for name, t in model.state_dict().items()} == plain
    rows = [GENERATE.Row(tok(p)["input_ids"], GENERATE.Options(40, GREEDY, [], [tok.eos_token_id])) for p in PROMPTS]
    assert [a.new_ids for a in GENERATE.generate(twin, tok, rows)] == references
