import pytest
import torch

from shitate.config import AdapterSpec
from shitate.models.adapters import attach
from shitate.models.lean import make_lean


def load(tiny_model, dropout):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = attach(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), AdapterSpec(r=4, dropout=dropout))
    with torch.no_grad():  # B starts at zero; give it values so the LoRA path matters
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return model


def loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    trainable = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, trainable)


def test_lean_forwards_match_peft_and_transformers(tiny_model):
    ids = torch.randint(5, 600, (2, 40))
    plain = load(tiny_model, dropout=0.0)
    lean = load(tiny_model, dropout=0.0)
    assert make_lean(lean).swapped == 2 * 7 + 2 * 6 + 2 + 1  # 7 adapted linears, 6 norms and an MLP a layer, the final norm
    expected_loss, expected_grads = loss_and_grads(plain, ids)
    loss, grads = loss_and_grads(lean, ids)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_lean_lora_dropout_is_seeded_and_scaled(tiny_model):
    ids = torch.randint(5, 600, (2, 40))
    lean = load(tiny_model, dropout=0.5)
    make_lean(lean)
    lean.train()
    torch.manual_seed(7)
    first = lean(input_ids=ids).logits
    torch.manual_seed(7)
    again = lean(input_ids=ids).logits
    torch.testing.assert_close(first, again)
    lean.eval()
    assert not torch.allclose(lean(input_ids=ids).logits, first)  # dropout is off in eval


def test_lora_inputs_remade_in_backward_are_not_kept_and_give_the_same_gradients(tiny_model, monkeypatch):
    """q, k, v, gate and up take a norm's output and down takes gelu(gate)·up: backward remakes them from what the
    norm and the MLP keep anyway, instead of keeping them (22% of a 270M model's activations)."""
    from shitate.models import lean as lean_module

    ids = torch.randint(5, 600, (2, 40))

    def run(remade: bool):
        model = load(tiny_model, dropout=0.05)
        with torch.no_grad():  # norm gains start at zero in a fresh model; make them matter
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.normal_(0, 0.3)
        make_lean(model)
        model.train()
        inputs = []  # what the adapted layers receive
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "v_proj", "gate_proj", "down_proj")) and hasattr(module, "lora_A"):
                module.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        kept = set()

        def keep(tensor):
            kept.add(tensor.untyped_storage().data_ptr())
            return tensor

        with monkeypatch.context() as patch:
            if not remade:
                patch.setattr(lean_module, "_mark_recomputable", lambda output, *remake: output)
            torch.manual_seed(11)  # the same dropout draws on both runs
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
                loss, grads = loss_and_grads(model, ids)
        return loss, grads, sum(t.untyped_storage().data_ptr() in kept for t in inputs), len(inputs)

    loss, grads, inputs_kept, inputs_seen = run(remade=True)
    expected_loss, expected_grads, kept_without, _ = run(remade=False)
    # All but layer 0's q and v: below its first norm nothing is trained, so autograd records no norm there to remake
    # its output from, and the adapter keeps that output itself.
    assert inputs_seen == 2 * 4 and inputs_kept == 2
    assert kept_without == inputs_seen  # the check sees a kept input
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_lean_norm_gradients_for_a_full_fine_tune(tiny_model):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(5, 600, (2, 40))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    lean = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        for a, b in zip(plain.parameters(), lean.parameters()):
            if a.ndim == 1:  # norm gains start at zero in a fresh model; make them matter
                a.normal_(0, 0.3)
                b.copy_(a)
    assert make_lean(lean).swapped == 15
    expected_loss, expected_grads = loss_and_grads(plain, ids)
    loss, grads = loss_and_grads(lean, ids)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_lora_dropout_mask_is_redrawn_identically_in_backward():
    from shitate.models.lean import _dropped_positions, _LoraAdd

    torch.manual_seed(0)
    x = torch.randn(2, 50, 32, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 50, 24, dtype=torch.float64, requires_grad=True)
    weight_a = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    weight_b = torch.randn(24, 4, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(11)
    out = _LoraAdd.apply(base, x, weight_a, weight_b, 2.0, 0.3)
    grads = torch.autograd.grad(out.square().sum(), (base, x, weight_a, weight_b))

    torch.manual_seed(11)  # the same seed draw, so the same positions, written out as a mask with plain ops
    positions = _dropped_positions(x.numel(), 0.3, int(torch.randint(0, 2**62, (1,))), x.device)
    dropped = torch.zeros(x.numel() + 1, dtype=torch.bool).index_fill_(0, positions, True)[:-1].view(x.shape)
    assert abs(dropped.double().mean().item() - 0.3) < 0.03
    expected = base + (x.masked_fill(dropped, 0) / 0.7) @ weight_a.T @ weight_b.T * 2.0
    expected_grads = torch.autograd.grad(expected.square().sum(), (base, x, weight_a, weight_b))
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_lora_dropout_positions_are_independent_bernoulli_draws(rate):
    from shitate.models.lean import _dropped_positions

    numel = 400_000
    positions = _dropped_positions(numel, rate, seed=3, device=torch.device("cpu"))
    assert int(positions[-1]) == numel  # the draw ran past the end: every element had its chance
    mask = torch.zeros(numel + 1, dtype=torch.bool).index_fill_(0, positions, True)[:-1].double()
    sigma = (rate * (1 - rate) / numel) ** 0.5
    assert abs(mask.mean().item() - rate) < 5 * sigma
    # Neighbours drop together as often as independence says (rate²), and the last element as often as the first.
    both = (mask[1:] * mask[:-1]).mean().item()
    assert abs(both - rate**2) < 5 * (rate**2 * (1 - rate**2) / numel) ** 0.5
    assert abs(mask[-numel // 10:].mean().item() - rate) < 5 * sigma * 10**0.5
    torch.testing.assert_close(positions, _dropped_positions(numel, rate, seed=3, device=torch.device("cpu")))


def test_lean_lora_on_a_4_bit_base_matches_peft_s_own_forward(tiny_model):
    # QLoRA's adapted layers are PEFT's bitsandbytes class, not LoraLinear; they ran PEFT's forward, which keeps a
    # copy of every layer's output and input (0.3 GB more than LoRA's peak on the default model).
    pytest.importorskip("bitsandbytes")
    from shitate.models.load import load_model, resolve

    def quantised():
        torch.manual_seed(3)
        model = attach(load_model(resolve(str(tiny_model), progress=False), dtype=torch.float32, four_bit=True),
                       AdapterSpec(method="qlora", r=4, dropout=0.0))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.1)
        return model

    ids = torch.randint(5, 600, (2, 40))
    plain, lean = quantised(), quantised()
    report = make_lean(lean)
    assert (report.swapped, report.skipped_adapters) == (2 * 7 + 2 * 6 + 2 + 1, 0)
    expected_loss, expected_grads = loss_and_grads(plain, ids)
    loss, grads = loss_and_grads(lean, ids)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert len(grads) == 2 * 7 * 2
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
