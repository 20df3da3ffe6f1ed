"""The logits stage one, stage two and eval compute from hidden-state chunks are the model's own."""

import json

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


def test_output_head_of_a_model_offloaded_to_disk(tmp_path):
    """A teacher loaded with a device map that offloads layer 1 and the head to disk: accelerate
    hooks are attached and the weights sit on meta between calls; OutputHead computes on the head's
    execution device through the hook (no reused buffer: the weight is not there) and its chunked
    logits are the plain model's exactly."""
    from accelerate.hooks import AlignDevicesHook

    from pipeline.models import load_model, read_device_map
    from tests.conftest import make_teacher
    from tests.stages.test_teacher import DISK_MAP

    make_teacher(tmp_path / "teacher")
    plain = load_model(tmp_path / "teacher").eval()
    mapped = load_model(tmp_path / "teacher", device_map=read_device_map(json.dumps(DISK_MAP))).eval()
    assert mapped.hf_device_map == DISK_MAP
    for module in (mapped.lm_head, mapped.model.layers[1].mlp.up_proj, mapped.model.layers[1].input_layernorm):
        assert isinstance(module._hf_hook, AlignDevicesHook) and module._hf_hook.offload  # the leaves of a disk module
    assert mapped.lm_head.weight.device.type == "meta" and mapped.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    input_ids = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(3))
    head = OutputHead(mapped, input_ids[:1])
    assert head.mode == "head" and head.device == head.input_device == torch.device("cpu")
    with torch.no_grad():
        hidden = head.hidden(input_ids).reshape(-1, 32)
        assert head.logits_buffer(16, hidden) is None
        chunks = torch.cat([head.logits(hidden[i:i + 16]) for i in range(0, hidden.shape[0], 16)])
        assert torch.equal(chunks, plain(input_ids=input_ids).logits.reshape(-1, 8192))


def test_document_attention_check_refuses_a_model_that_ignores_position_ids(tmp_path):
    """The probe before --attention document: transformers' Llama keeps packed documents apart from
    per-document position ids; a model that drops them lets them see each other, and is refused."""
    import torch

    from pipeline.errors import DistillError
    from pipeline.models import check_document_attention, load_model
    from tests.conftest import make_model

    model = load_model(make_model(tmp_path / "llama", "llama", 300)).eval()
    check_document_attention(model, 7, "teacher")

    class IgnoresPositions(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, use_cache=False)

    with pytest.raises(DistillError, match="lets packed documents see each other"):
        check_document_attention(IgnoresPositions(model), 7, "teacher")


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "granite"])
def test_gradient_checkpointing_keeps_loss_and_gradients(model_type):
    """``--gradient-checkpointing``: the student's step gives the same loss and the same gradient of
    every parameter (1e-6, float32) with the layers recomputed in backward as without, in chunks of
    positions; and the layers are recomputed (the MLP of layer 0 runs twice per step, not once)."""
    from pipeline.models import enable_gradient_checkpointing

    input_ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(3))
    results = []
    for checkpointing in (False, True):
        model = tiny_model(model_type, head_scale=1.0).train()
        if checkpointing:
            enable_gradient_checkpointing(model, model_type)
        calls, mlp = [], model.get_decoder().layers[0].mlp
        forward = type(mlp).forward  # (hooks are not rerun by the recompute: count the forward itself)
        mlp.forward = lambda *args, **kwargs: (calls.append(1), forward(mlp, *args, **kwargs))[1]
        step = DistillStep(model, VOCAB, 1.0, 16, output=OutputHead(model, input_ids[:1]))
        calls.clear()  # the probe's forward
        ce_sum, _, count = step(input_ids, {})
        (ce_sum / count).backward()
        results.append((ce_sum / count, {n: p.grad for n, p in model.named_parameters()}, len(calls)))
    (loss, grads, plain_calls), (loss_ckpt, grads_ckpt, ckpt_calls) = results
    assert (plain_calls, ckpt_calls) == (1, 2)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and all(g is not None for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-6, msg=name)


def test_attn_implementation_refusals(tmp_path):
    """A misspelt --attn-implementation, flash-attention without its package (or without CUDA), and an
    architecture without the one asked for (Gemma 2 has no sdpa path: sdpa cannot soft-cap) are one
    line each, naming what to use instead; the others load and say what they run."""
    from pipeline.errors import DistillError
    from pipeline.models import attn_implementation, attn_implementation_problems, load_model

    assert "must be one of auto, sdpa, eager, flash_attention_2" in attn_implementation_problems("flash")[0]
    (flash,) = attn_implementation_problems("flash_attention_2", "cpu")
    assert "pip install flash-attn" in flash or "CUDA GPUs only" in flash
    assert "--dtype bfloat16" in attn_implementation_problems("flash_attention_2", "cpu", "float32")[1]
    for model_type in ("llama", "gemma2"):
        extra, _ = ARCHITECTURES[model_type]
        (tmp_path / f"{model_type}.json").write_text(json.dumps({"model_type": model_type, **COMMON, **extra}))
    with pytest.raises(DistillError, match=r"Gemma2ForCausalLM has no sdpa attention .* use --attn-implementation "
                                           r"eager, or auto"):
        load_model(tmp_path / "gemma2.json", attn_implementation="sdpa")
    with pytest.raises(DistillError, match="pip install flash-attn|CUDA GPUs only"):
        load_model(tmp_path / "llama.json", attn_implementation="flash_attention_2")
    ran = {(t, name): attn_implementation(load_model(tmp_path / f"{t}.json", attn_implementation=name))
           for t in ("llama", "gemma2") for name in ("auto", "eager", "sdpa") if (t, name) != ("gemma2", "sdpa")}
    assert ran == {("llama", "auto"): "sdpa", ("llama", "eager"): "eager", ("llama", "sdpa"): "sdpa",
                   ("gemma2", "auto"): "eager", ("gemma2", "eager"): "eager"}
