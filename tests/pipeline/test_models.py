"""The logits stage one, stage two and eval compute from hidden-state chunks are the model's own."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.models import OutputHead
from stages.student import DistillStep

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
# Architectures whose forward transforms the logits after the output embedding, and Llama, which does not.
ARCHITECTURES = {
    "llama": ({}, "head"),
    "granite": (dict(logits_scaling=8.0), "forward"),                  # logits / logits_scaling
    "gemma2": (dict(final_logit_softcapping=30.0, head_dim=8, query_pre_attn_scalar=8,
                    sliding_window=16), "forward"),                  # 30·tanh(logits / 30)
    "cohere": (dict(logit_scale=0.0625), "forward"),                   # logits · logit_scale
}


def tiny_model(model_type: str, head_scale: float = 100.0):
    extra, _ = ARCHITECTURES[model_type]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **COMMON, **extra))
    with torch.no_grad():  # large logits, where a soft-cap or a scale changes everything
        model.get_output_embeddings().weight.mul_(head_scale)
    return model


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_step_ce_equals_the_models_own_loss(model_type):
    """With the head ×100, stage two's CE is ``model(labels=…).loss`` for every architecture, in
    one pass and in chunks of positions (backward recomputation included)."""
    model = tiny_model(model_type)
    input_ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    output = OutputHead(model, input_ids[:1])
    assert output.mode == ARCHITECTURES[model_type][1]
    want = model(input_ids=input_ids, labels=input_ids).loss
    (grad_want,) = torch.autograd.grad(want, model.get_output_embeddings().weight)
    for chunk in (0, 16):
        ce_sum, _, count = DistillStep(model, VOCAB, 1.0, chunk, output=output)(input_ids, {})
        torch.testing.assert_close(ce_sum / count, want, rtol=1e-5, atol=1e-5)
        (grad,) = torch.autograd.grad(ce_sum / count, model.get_output_embeddings().weight)
        torch.testing.assert_close(grad, grad_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_output_head_logits_equal_the_full_forward(model_type):
    model = tiny_model(model_type).eval()
    input_ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    head = OutputHead(model, input_ids[:1])
    with torch.no_grad():
        hidden = head.hidden(input_ids).reshape(-1, COMMON["hidden_size"])
        chunks = [head.logits(hidden[i:i + 10]) for i in range(0, hidden.shape[0], 10)]
        full = model(input_ids=input_ids).logits.reshape(-1, VOCAB)
    torch.testing.assert_close(torch.cat(chunks), full, rtol=1e-5, atol=1e-4)


def test_a_fresh_softcapped_model_is_not_mistaken_for_a_plain_head():
    """At initialisation a soft-cap of 30 barely changes logits of size ~0.1 — within any tolerance
    — but the head alone is chosen only when it equals the model's own forward bit for bit."""
    model = tiny_model("gemma2", head_scale=1.0)
    head = OutputHead(model, torch.arange(20)[None])
    assert head.mode == "forward"
