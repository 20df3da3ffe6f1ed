"""Task fine-tuning (#15 part 2): prompt/response stores with a loss mask, through stage one and stage two."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.models import OutputHead, load_model
from pipeline.store.contract import open_store
from pipeline.train.teacher_signal import stored_teacher
from stages.student import DistillStep, TrainConfig, setup
from tests.conftest import TOKENIZER, make_teacher, run_cli, write_tiny_model_config

ALPHA = 0.5


def task_records(docs: list[str], n: int) -> list[dict]:
    """Prompt/response pairs cut from real text: a document's first words, then the next ones."""
    records = []
    for i, doc in enumerate(docs[:n]):
        words = doc.split()
        cut = 4 + i % 9
        records.append({"prompt": " ".join(words[:cut]) + "\nContinue:", "response": " " + " ".join(words[cut:cut + 3 + i % 7])})
    return records


@pytest.fixture(scope="module")
def task(tmp_path_factory, heldout_docs):
    """A prompt-response tokens store (rows of 32), a tiny teacher, and from it a sampled and a topk store."""
    root = tmp_path_factory.mktemp("finetune")
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_records(heldout_docs, 40)))
    rows = ("--rows-per-shard", "16", "--chunk-rows", "4")
    result = run_cli("prepare", "--input", root / "task.jsonl", "--out", root / "tokens", "--tokenizer", TOKENIZER,
                     "--seq-len", "32", "--format", "prompt-response", *rows)
    assert result.exit_code == 0, result.output
    make_teacher(root / "teacher")
    for name, flags in (("sampled", ("--samples", "4")), ("topk", ("--kind", "topk", "--top-k", "8"))):
        result = run_cli("teacher", "--tokens-store", root / "tokens", "--teacher", root / "teacher", "--out",
                         root / name, *rows, *flags)
        assert result.exit_code == 0, result.output
    write_tiny_model_config(root / "tiny.json")
    return root


def test_stage_one_copies_the_mask_and_keeps_every_position(task):
    tokens = open_store(task / "tokens").read_rows(0, open_store(task / "tokens").rows)
    for name in ("sampled", "topk"):
        store = open_store(task / name)
        assert store.params["format"] == "prompt-response" and store.index["format_version"] == 4
        assert store.index["arrays"]["loss_mask"] == {"dtype": "uint8", "shape": [32]}
        data = store.read_rows(0, store.rows)
        np.testing.assert_array_equal(data["loss_mask"], tokens["loss_mask"])
        np.testing.assert_array_equal(data["input_ids"], tokens["input_ids"])
        assert 0 < data["loss_mask"].mean() < 0.5  # prompts and padding outnumber responses here
    # Prompt positions are not skipped: every position holds its 4 draws.
    counts = open_store(task / "sampled").read_rows(0, 8)["sample_counts"]
    assert (counts.sum(-1) == 4).all()


def batch_of(store, rows: int) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind == "u" else v)
            for k, v in store.read_rows(0, rows).items()}


def dense_teacher(kind: str, batch: dict[str, torch.Tensor], vocab: int) -> torch.Tensor:
    """The stored teacher as a dense ``[B, L−1, V]`` distribution, built by hand: ``count/N`` on the
    drawn ids (sampled), or the top-k renormalised (topk, ``--tail renorm``)."""
    if kind == "sampled":
        ids, weights = batch["sample_ids"], batch["sample_counts"].double() / 4
    else:
        ids, weights = batch["topk_ids"], torch.softmax(batch["topk_logprobs"].double(), dim=-1)
    p = torch.zeros(*ids.shape[:2], vocab, dtype=torch.float64).scatter_add_(-1, ids, weights)
    return p[:, :-1]


@pytest.mark.parametrize("kind", ["sampled", "topk"])
@pytest.mark.parametrize("loss_chunk", [0, 7])
def test_mask_gives_exactly_zero_gradient_from_prompt_positions(task, kind, loss_chunk):
    """DistillStep's loss and gradients equal a dense per-position loss computed by hand with the mask,
    the hidden state of every masked-out position gets exactly zero gradient, and the teacher's
    targets there change nothing."""
    store = open_store(task / kind)
    batch = batch_of(store, 6)
    input_ids, mask = batch["input_ids"], batch["loss_mask"][:, :-1].bool()
    assert 0 < mask.sum() < mask.numel()
    torch.manual_seed(0)
    model = load_model(task / "tiny.json")
    teacher = stored_teacher(kind, store.params, 1.0, tail="renorm")

    def step_loss(batch):
        model.zero_grad()
        output = OutputHead(model, input_ids[:1])
        hidden = output.hidden(input_ids)
        hidden.retain_grad()  # the gradient reaching each position's final hidden state
        output.hidden = lambda ids: hidden
        ce, kd, count = DistillStep(model, 8192, ALPHA, loss_chunk, teacher, output=output)(input_ids, batch)
        loss = (ALPHA * ce + (1 - ALPHA) * kd) / count
        loss.backward()
        return loss.detach(), count, hidden.grad, [p.grad.clone() for p in model.parameters()]

    loss, count, hidden_grad, grads = step_loss(batch)
    assert count == mask.sum()
    assert torch.equal(hidden_grad[:, :-1][~mask], torch.zeros_like(hidden_grad[:, :-1][~mask]))
    assert torch.equal(hidden_grad[:, -1], torch.zeros_like(hidden_grad[:, -1]))  # no target in the row
    assert (hidden_grad[:, :-1][mask].abs().sum(-1) > 0).all()

    # the dense reference: full logits, per-position CE and KL(p ‖ q), masked by hand
    model.zero_grad()
    logq = torch.log_softmax(model(input_ids=input_ids).logits[:, :-1].double(), dim=-1)
    ce_t = -logq.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    p = dense_teacher(kind, batch, 8192)
    kd_t = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - logq), 0.0).sum(-1)
    m = mask.double()
    reference = (ALPHA * (ce_t * m).sum() + (1 - ALPHA) * (kd_t * m).sum()) / m.sum()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, param in zip(grads, model.parameters()):
        torch.testing.assert_close(got, param.grad.float(), rtol=1e-4, atol=1e-6)

    # other teacher targets at the masked-out positions: the same loss and gradients, bit for bit
    spoiled = dict(batch)
    outside = ~batch["loss_mask"].bool()
    for name in ("sample_ids", "topk_ids"):
        if name in spoiled:
            spoiled[name] = torch.where(outside[..., None], torch.randint_like(spoiled[name], 8192), spoiled[name])
    for name in ("sample_counts", "topk_logprobs"):
        if name in spoiled:
            spoiled[name] = torch.where(outside[..., None], spoiled[name].flip(-1), spoiled[name])
    again = step_loss(spoiled)
    assert torch.equal(again[0], loss) and torch.equal(again[2], hidden_grad)
    assert all(torch.equal(a, b) for a, b in zip(again[3], grads))


def test_fine_tuning_starts_from_the_student_directory(task):
    """``--model DIR`` of an earlier student is the fine-tuning step: stage two starts from its weights
    (not a fresh init), trains on the response targets only and scores the held-out responses alone."""
    first = run_cli("student", "--train-store", task / "sampled", "--model", task / "tiny.json", "--out",
                    task / "first", "--max-steps", "3", "--micro-batch-size", "4", "--device", "cpu")
    assert first.exit_code == 0, first.output
    previous = load_file(task / "first" / "model" / "model.safetensors")

    def start(init: str) -> dict[str, torch.Tensor]:
        config = TrainConfig(train_store=str(task / "sampled"), model=str(task / "first" / "model"), init=init,
                             out=str(task / f"start-{init}"), max_steps=1, micro_batch_size=4, device="cpu")
        run = setup(config)
        run.loader.close()
        return run.model.state_dict()

    started = start("auto")
    assert all(torch.equal(started[name], previous[name]) for name in previous)
    scratch = start("scratch")
    assert not torch.equal(scratch["model.embed_tokens.weight"], previous["model.embed_tokens.weight"])

    tuned = run_cli("student", "--train-store", task / "sampled", "--eval-store", task / "tokens", "--model",
                    task / "first" / "model", "--out", task / "tuned", "--max-steps", "2", "--micro-batch-size", "4",
                    "--lr", "1e-4", "--warmup-steps", "1", "--device", "cpu")
    assert tuned.exit_code == 0, tuned.output
    after = load_file(task / "tuned" / "model" / "model.safetensors")
    moved = max((after[n] - previous[n]).abs().max().item() for n in previous)
    assert 0 < moved < 1e-3  # two small steps away from the earlier student, not from a fresh init
    final = json.loads((task / "tuned" / "metrics.json").read_text())
    assert final["heldout_tokens"] == open_store(task / "tokens").index["loss_tokens"]
