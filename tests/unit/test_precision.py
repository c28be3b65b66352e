import json

import pytest
import torch

from shitate.config import AdapterSpec
from shitate.models import precision
from shitate.models.adapters import prepare_for_training
from shitate.models.logprobs import decoder_states, linear_cross_entropy
from tiny_families import build_tiny


def test_auto_precision_takes_the_faster_matmul_measured_once_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("SHITATE_HOME", str(tmp_path))
    monkeypatch.setattr(precision, "bf16_supported", lambda device: True)
    measured = []
    speeds = {torch.bfloat16: 174.0, torch.float32: 330.0}  # the 2-core Xeon without AMX
    monkeypatch.setattr(precision, "_matmul_gflops", lambda dtype: measured.append(dtype) or speeds[dtype])
    assert precision.pick_precision("auto", "cpu")[0] == "fp32"
    assert precision.pick_precision("auto", "cpu")[0] == "fp32"
    assert len(measured) == 2  # bf16 and fp32 once; the second run read the file
    assert precision.pick_precision("auto", "cpu")[1] == "fp32 (this CPU's matmul: 330 GFLOP/s in fp32, 174 in bf16)"
    assert list(json.loads((tmp_path / "matmul-speeds.json").read_text()).values()) == [{"bf16": 174.0, "fp32": 330.0}]

    (tmp_path / "matmul-speeds.json").unlink()
    speeds = {torch.bfloat16: 955.0, torch.float32: 330.0}  # a Xeon with AMX
    assert precision.pick_precision("auto", "cpu")[0] == "bf16"
    (tmp_path / "matmul-speeds.json").unlink()
    speeds = {torch.bfloat16: 300.0, torch.float32: 330.0}  # within the margin: bf16 keeps half the activations
    assert precision.pick_precision("auto", "cpu")[0] == "bf16"

    assert precision.pick_precision("bf16", "cpu")[0] == "bf16"  # an explicit choice is kept
    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)
    assert precision.pick_precision("auto", "cpu")[0] == "fp32"  # bf16 emulated: not even measured


def test_the_frozen_base_stays_in_its_files_16_bits_under_fp32_arithmetic():
    assert precision.frozen_base_dtype("fp32", "bfloat16", full_fine_tune=False) == torch.bfloat16
    assert precision.frozen_base_dtype("fp32", torch.float16, full_fine_tune=False) == torch.float16
    assert precision.frozen_base_dtype("fp32", "float32", full_fine_tune=False) == torch.float32
    assert precision.frozen_base_dtype("fp32", None, full_fine_tune=False) == torch.float32
    assert precision.frozen_base_dtype("bf16", "float32", full_fine_tune=False) == torch.bfloat16
    assert precision.frozen_base_dtype("fp32", "bfloat16", full_fine_tune=True) == torch.float32


def _lora_model(folder, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    if dtype != torch.bfloat16:  # (.to(bf16) would round the fp32 rotary frequencies that loading keeps)
        model = model.to(dtype)
    model = prepare_for_training(model, AdapterSpec(r=4, dropout=0.0), packed_attention=False,
                                 activation_checkpointing=False, compute_dtype=torch.float32)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the same adapter on both (PEFT draws A in the base's dtype), B non-zero so that it matters
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2"])
def test_a_bf16_base_computed_in_fp32_matches_its_fp32_copy(family, tiny_model, tokenizer, tmp_path):
    # Gemma 3 (scaled embeddings, a tied output layer), a Llama (its own output layer), GPT-2 (Conv1D layers).
    folder = tiny_model if family == "gemma3" else build_tiny(family, tmp_path / family, tokenizer)
    narrow, wide = _lora_model(folder, torch.bfloat16), _lora_model(folder, torch.float32)
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(1))

    def loss_and_grads(model):
        base, states = decoder_states(model, ids[:, :-1])
        hidden = states.reshape(-1, states.shape[-1])
        loss = linear_cross_entropy(hidden, base.get_output_embeddings().weight, ids[:, 1:].reshape(-1))
        return loss, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    loss, grads = loss_and_grads(narrow)
    expected_loss, expected_grads = loss_and_grads(wide)
    # The same numbers: widening a bf16 weight to fp32 is exact, and every matmul ran in fp32.
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # ...while the weights that make up the model's size stayed in bf16.
    big = [p for p in narrow.parameters() if p.dim() == 2 and not p.requires_grad]
    assert big and all(p.dtype == torch.bfloat16 for p in big)
    # Generation runs too: the output layer computes in its own dtype and hands fp32 on.
    assert narrow(input_ids=ids).logits.dtype == torch.float32


def test_generation_decodes_in_the_weights_dtype_and_everything_else_stays_widened():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32)).to(torch.bfloat16).requires_grad_(False)
    precision.widen_arithmetic(layer, torch.float32)
    weight, bias = layer[0].weight, layer[0].bias
    decode, prompt = torch.randn(4, 1, 64), torch.randn(4, 40, 64)  # a decoding step of 4 rows; a batch of prompts

    def narrow(x):
        return torch.nn.functional.linear(x.bfloat16(), weight, bias).float()

    def wide(x):
        return torch.nn.functional.linear(x, weight.float(), bias.float())

    assert not torch.equal(narrow(decode), wide(decode))  # the two arithmetics tell apart on these numbers
    torch.testing.assert_close(layer(decode), wide(decode), rtol=0, atol=0)
    with precision.generating():
        torch.testing.assert_close(layer(decode), narrow(decode), rtol=0, atol=0)
        torch.testing.assert_close(layer(prompt), wide(prompt), rtol=0, atol=0)
    torch.testing.assert_close(layer(decode), wide(decode), rtol=0, atol=0)


def test_widened_layers_of_one_shape_sharing_a_buffer_give_each_layer_s_own_numbers():
    # Every bf16 weight is widened into the one buffer its thread keeps for that shape: a layer must not see another's.
    import threading

    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, 16, bias=False).bfloat16().requires_grad_(False) for _ in range(3)]
    wide = [torch.nn.Linear(16, 16, bias=False).requires_grad_(False) for _ in range(3)]
    for narrow, copy in zip(layers, wide):
        copy.weight.copy_(narrow.weight.float())
        narrow.forward = precision._wide_linear_forward.__get__(narrow)
    x = torch.randn(4, 16, requires_grad=True)
    expected_x = x.detach().clone().requires_grad_(True)

    def chain(modules, inputs):
        for module in modules:
            inputs = torch.tanh(module(inputs))
        return inputs

    chain(layers, x).square().sum().backward()
    chain(wide, expected_x).square().sum().backward()
    torch.testing.assert_close(x.grad, expected_x.grad, rtol=1e-5, atol=1e-6)
    answers = {}
    worker = threading.Thread(target=lambda: answers.update(other=chain(layers, x.detach())))
    worker.start()
    worker.join()
    torch.testing.assert_close(answers["other"], chain(wide, x.detach()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_4_bit_layer_widened_in_place_multiplies_by_bitsandbytes_own_dequantised_weight(dtype):
    # Its C kernel is called into a kept buffer (bitsandbytes registers no CPU op that writes into one).
    bitsandbytes = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layers = []
    for _ in range(2):  # two layers of one shape: one buffer, each its own numbers
        layer = bitsandbytes.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", device="meta")
        layer.weight = bitsandbytes.nn.Params4bit(torch.randn(64, 64, dtype=torch.bfloat16), requires_grad=False,
                                                  quant_type="nf4", compress_statistics=True, module=layer)._quantize("cpu")
        layers.append(layer)
    def dequantised(weight):  # bitsandbytes' own CPU op, asked for `dtype` directly, as its training forward asks
        state = weight.quant_state
        absmax = bitsandbytes.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return torch.ops.bitsandbytes.dequantize_4bit.default(weight.data, absmax, state.blocksize, "nf4",
                                                              state.shape, dtype)

    expected = [dequantised(layer.weight) for layer in layers]
    for layer, weight in zip(layers, expected):
        assert torch.equal(precision._widened(layer.weight, dtype), weight)
    holder = torch.nn.Sequential(*layers)
    precision.widen_arithmetic(holder, dtype)
    x = torch.randn(5, 64, dtype=dtype, requires_grad=True)
    plain_x = x.detach().clone().requires_grad_(True)
    holder[1](torch.tanh(holder[0](x))).sum().backward()
    torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(plain_x, expected[0])), expected[1]).sum().backward()
    torch.testing.assert_close(x.grad, plain_x.grad)
