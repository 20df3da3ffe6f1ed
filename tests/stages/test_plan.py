"""distill plan: its store size against stores stage one really wrote, and its arithmetic by hand."""

import json
import math

import pytest

from pipeline.models import count_parameters, load_model
from tests.conftest import ROOT, TOKENIZER, make_teacher, run_cli, write_corpus

SHIPPED = ROOT / "data" / "models" / "teacher"
LAYOUT = ("--rows-per-shard", "16", "--chunk-rows", "8")  # several shards and chunks, as a real store has
ROWS = 48


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def plan_json(*args) -> dict:
    output = ok(run_cli("plan", "--json", *args)).output
    return json.loads(output[output.index("{"):])


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, heldout_docs):
    """Real text the calibration never saw: the first 60 held-out documents (the calibration drew
    its rows from the train split), in rows of 128 tokens."""
    root = tmp_path_factory.mktemp("plan")
    corpus = write_corpus(root / "corpus.jsonl", heldout_docs[:60])
    ok(run_cli("prepare", "--input", corpus, "--out", root / "tokens", "--tokenizer", TOKENIZER, "--seq-len", "128"))
    make_teacher(root / "tiny")
    return root


def stage_one(root, out, teacher, rows, *flags):
    ok(run_cli("teacher", "--tokens-store", root / "tokens", "--teacher", teacher, "--out", out,
               "--max-rows", str(rows), *flags))
    return json.loads((out / "index.json").read_text())


def first_rows(rows: int) -> tuple[str, ...]:
    """The plan's corpus size for the first ``rows`` rows of 128 tokens (overlapping by one)."""
    return ("--tokens", str(rows * 127 + 1), "--seq-len", "128")


def relative_error(predicted: float, index: dict) -> float:
    return predicted / index["bytes"] - 1


FORMATS = {"sampled-n32": ("--kind", "sampled", "--samples", "32"), "topk-k16": ("--kind", "topk", "--top-k", "16"),
           "hybrid-k4-m24": ("--kind", "topk", "--top-k", "4", "--tail-samples", "24")}


@pytest.mark.parametrize("name", FORMATS)
def test_pilot_of_the_tiny_teacher_predicts_its_store_within_10_percent(tokens, tmp_path, name):
    """The acceptance check: a pilot store of 16 rows by the teacher (make_teacher's tiny Llama,
    whose peaked distributions compress unlike the shipped teacher's) sizes its store over the next
    rows too (48 in all, in shards of 16 rows and chunks of 8), on both backends, within 10% of
    index.json's bytes."""
    pilot = stage_one(tokens, tmp_path / "pilot", tokens / "tiny", 16, *FORMATS[name])
    assert pilot["rows"] == 16
    for backend in ("zarr", "arrow"):
        index = stage_one(tokens, tmp_path / backend, tokens / "tiny", ROWS, *FORMATS[name], *LAYOUT, "--backend", backend)
        plan = plan_json(*first_rows(ROWS), "--pilot", tmp_path / "pilot", *FORMATS[name], *LAYOUT, "--backend", backend)
        assert plan["inputs"]["rows"] == ROWS and plan["inputs"]["vocab_size"] == 8192  # the pilot's vocabulary
        error = relative_error(plan["store"]["bytes"], index)
        print(f"{name} {backend}: predicted {plan['store']['bytes']} B, stored {index['bytes']} B, error {error:+.1%}")
        assert abs(error) < 0.10, (name, backend, error)
        assert plan["store"]["calibration"].startswith(f"--pilot {tmp_path / 'pilot'}")


@pytest.mark.parametrize("name,flags,backend", [
    ("sampled-n32-t1", FORMATS["sampled-n32"], "zarr"),
    # between the measured N = 32 and 50: interpolated
    ("sampled-n40-t2", ("--kind", "sampled", "--samples", "40", "--temperature", "2"), "arrow"),
    ("topk-k64", ("--kind", "topk", "--top-k", "64"), "zarr"),
    ("hybrid-k8-m48", ("--kind", "topk", "--top-k", "8", "--tail-samples", "48"), "arrow"),
])
def test_committed_calibration_predicts_the_shipped_teachers_store_within_10_percent(tokens, tmp_path, name, flags,
                                                                                      backend):
    """Without a pilot the plan reads bench/results/store_bytes_cpu.json (the shipped teacher on
    rows of the train split) to size the shipped teacher's store of held-out text."""
    index = stage_one(tokens, tmp_path / "store", SHIPPED, ROWS, *flags, *LAYOUT, "--backend", backend)
    plan = plan_json(*first_rows(ROWS), "--vocab-size", "8192", *flags, *LAYOUT, "--backend", backend)
    error = relative_error(plan["store"]["bytes"], index)
    print(f"{name} {backend}: predicted {plan['store']['bytes']} B, stored {index['bytes']} B, error {error:+.1%}")
    assert abs(error) < 0.10, (name, backend, error)
    assert "store_bytes_cpu.json" in plan["store"]["calibration"]


def test_raw_bytes_follow_the_format():
    """Raw bytes per position, as docs/FORMAT.md lays the arrays out (grid of 2 temperatures)."""
    def raw(*flags, vocab="8192"):
        return plan_json("--tokens", "1M", "--seq-len", "2048", "--vocab-size", vocab, *flags)["store"]["raw_bytes_per_token"]

    # input id 2 + ids k·2 + float16 log-probs k·2 + log-sum-exp 2·4 + tail 2·4 + target 4
    assert raw("--kind", "topk", "--top-k", "64") == 2 + 128 + 128 + 8 + 8 + 4
    # input id 2 + ids N·2 + uint8 counts N + log-sum-exp 2·4 + target 4
    assert raw("--kind", "sampled", "--samples", "32") == 2 + 64 + 32 + 8 + 4
    assert raw("--kind", "sampled", "--samples", "32", "--sample-logprobs") == 2 + 64 + 32 + 64 + 8 + 4
    assert raw("--kind", "sampled", "--samples", "300") == 2 + 600 + 600 + 8 + 4  # uint16 counts from 256 draws
    assert raw("--kind", "sampled", "--samples", "32", vocab="128256") == 4 + 128 + 32 + 8 + 4  # uint32 ids
    assert raw("--kind", "topk", "--top-k", "8", "--tail-samples", "24") == 2 + 16 + 16 + 48 + 24 + 8 + 8 + 4
    assert raw("--kind", "topk", "--top-k", "8", "--temperature-grid", "1,2,4") == 2 + 16 + 16 + 12 + 12 + 4


def test_stage_one_arithmetic_by_hand():
    """1e9 tokens in rows of 2048 at 1000 tokens/s per GPU on 8 GPUs, 10 h jobs, 20% margin, 6 min start-up."""
    plan = plan_json("--tokens", "1e9", "--seq-len", "2048", "--vocab-size", "32768", "--teacher-tokens-per-gpu-s",
                     "1000", "--gpus", "8", "--time-limit", "10:00:00", "--startup-minutes", "6")
    one, rows = plan["stage_one"], (10**9 - 1) // 2047
    assert plan["inputs"]["rows"] == rows == 488519 and plan["store"]["shards"] == math.ceil(rows / 256) == 1909
    shard_s = 256 * 2048 / 1000  # 524.288 s
    usable = 10 * 3600 * 0.8 - 360  # 28,440 s
    per_task = math.floor(usable / shard_s)  # 54 shards fit a task
    assert math.ceil(1909 / per_task) == 36  # the fewest tasks that fit, rounded up to whole waves of 8
    assert one["array_size"] == 40 and one["sbatch_array"] == "0-39"
    assert one["shards_per_task"] == math.ceil(1909 / 40) == 48 and one["waves"] == 5
    task_h = (360 + 48 * shard_s) / 3600
    assert one["task_hours"] == pytest.approx(task_h) and task_h <= 8
    assert one["wall_hours"] == pytest.approx(5 * task_h)
    assert one["gpu_hours"] == pytest.approx((rows * 2048 / 1000 + 40 * 360) / 3600)
    # a shard of 256 rows is 8.7 min: the advice halves it to keep within 5 min
    assert one["rows_per_shard_advice"]["suggested"] == 128


def test_more_gpus_than_needed_means_one_task_per_gpu():
    plan = plan_json("--tokens", "1e8", "--seq-len", "2048", "--vocab-size", "32768", "--teacher-tokens-per-gpu-s",
                     "50000", "--gpus", "16", "--time-limit", "04:00:00")
    assert plan["stage_one"]["array_size"] == 16 and plan["stage_one"]["waves"] == 1


def test_gpus_per_task_and_the_flops_estimate():
    """70B in bfloat16 (140 GB + 20%) needs 2 GPUs of 80 GiB; throughput from FLOPs plus the measured reductions."""
    plan = plan_json("--tokens", "1B", "--seq-len", "4096", "--vocab-size", "32768", "--teacher-params", "70B",
                     "--dtype", "bfloat16", "--gpus", "8", "--gpu-tflops", "1000", "--mfu", "0.5")
    one = plan["stage_one"]
    assert one["gpus_per_task"] == 2 and one["concurrent_tasks"] == 4
    bench = json.loads((ROOT / "bench/results/stage_one_h200_realistic.json").read_text())
    reductions = (bench["stage_one_us_per_token_median"]["torch/sampled50"] - bench["bare_forward_us_per_token_median"]) * 1e-6
    task_rate = 1 / (2 * 70e9 / (1000e12 * 0.5) + reductions)
    assert one["task_tokens_per_s"] == pytest.approx(task_rate) and one["tokens_per_gpu_s"] == pytest.approx(task_rate / 2)
    assert "MFU 0.5 (assumed)" in one["throughput_source"] and "one GPU of a task's 2" in one["throughput_source"]


def test_stage_two_and_counting_parameters_from_configs():
    plan = plan_json("--tokens", "1e9", "--seq-len", "2048", "--vocab-size", "8192", "--teacher", SHIPPED,
                     "--student", ROOT / "data/models/student.json", "--student-tokens-per-gpu-s", "10000",
                     "--gpus", "8", "--epochs", "2", "--time-limit", "04:00:00")
    assert plan["stage_one"]["teacher_params"] == count_parameters(load_model(SHIPPED))  # counted without weights
    two, positions = plan["stage_two"], plan["inputs"]["positions"]
    assert two["student_params"] == count_parameters(load_model(ROOT / "data/models/student.json"))
    assert two["wall_hours"] == pytest.approx(2 * positions / (10000 * 8) / 3600)
    assert two["gpu_hours"] == pytest.approx(2 * positions / 10000 / 3600)
    assert two["jobs"] == math.ceil(two["wall_hours"] / (4 * 0.8))


def test_text_output_names_its_sources():
    result = ok(run_cli("plan", "--tokens", "2B", "--seq-len", "2048", "--vocab-size", "128256", "--teacher-params",
                        "8B", "--dtype", "bfloat16", "--gpus", "64", "--gpu-tflops", "989", "--time-limit",
                        "04:00:00", "--student-params", "1B"))
    for phrase in ("store_bytes_cpu.json", "MFU 0.4 (assumed)", "--array=0-", "ids scaled by log2 128,256",
                   "-13% (top-64) to +22%", "stage two"):
        assert phrase in result.output, result.output


def test_counts_and_time_limits_parse():
    from stages.plan import parse_count, parse_time_limit

    assert [parse_count(t) for t in ("2e9", "2B", "500M", "1.5T", "8k", "10_000", 7)] == \
        [2 * 10**9, 2 * 10**9, 5 * 10**8, 15 * 10**11, 8000, 10000, 7]
    assert parse_time_limit("04:00:00") == 4 * 3600 and parse_time_limit("1-02:03:04") == 93784


# --------------------------------------------------------------------------- stage two's memory

# Llama 3.2 1B's shape: 1,235,814,400 parameters (a tied 128,256 × 2048 embedding, 16 layers of 60,821,504,
# the final norm's 2048)
LLAMA_1B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
            "max_position_embeddings": 131072, "tie_word_embeddings": True}
GIB = 2**30


def student_plan(tmp_path, *flags, config=LLAMA_1B) -> dict:
    path = tmp_path / "student.json"
    path.write_text(json.dumps(config))
    return plan_json("--tokens", "2B", "--seq-len", "2048", "--vocab-size", "128256", "--gpus", "8",
                     "--student", path, *flags)["stage_two"]


def test_student_memory_arithmetic_by_hand(tmp_path):
    """Each process of a 1B student at 16 rows of 2048 tokens in bfloat16 autocast (the default auto, on
    the GPUs a plan sizes): weights, gradients and AdamW's moments 16 bytes a parameter, bfloat16 weight
    copies 2, per layer c·B·L·d activations with c = 2·(13 + 2q + 2r + 4m), the loss chunk at 20 bytes a
    logit. It does not fit 80 GiB; 8 rows and 2 micro-batches per step keep the batch and do."""
    two = student_plan(tmp_path, "--gpu-memory", "80")
    memory, p = two["memory"], 1_235_814_400
    assert two["student_params"] == p
    vocab, d, layers, tokens = 128256, 2048, 16, 16 * 2048
    c = 2 * (13 + 2 * 2048 / 2048 + 2 * 512 / 2048 + 4 * 8192 / 2048)
    assert memory["activation_constant"] == c == 63
    layer = (p - vocab * d) // layers  # 60,821,632: a layer's 60,821,504 and a 16th of the final norm
    chunk = 2**26 // vocab  # 523 positions: distill student's --loss-chunk 0
    expected = {"weights": 4 * p, "gradients": 4 * p, "optimizer": 8 * p,
                "weight_copies": layers * 2 * layer + 2 * vocab * d,
                "activations": (layers * c + 12) * tokens * d,  # 68,451,041,280: 63.75 GiB
                "loss_chunk": chunk * vocab * 20}
    assert memory["bytes"] == expected and memory["loss_chunk_positions"] == chunk == 523
    assert memory["peak_bytes"] == sum(expected.values()) == 92_037_258_240  # 85.7 GiB
    assert memory["usable_bytes"] == pytest.approx((80 - 1) * 0.9 * GIB) and memory["fits"] is False
    eight = sum(expected.values()) - (layers * c + 12) * (tokens // 2) * d
    assert memory["suggested"] == {"fits": True, "micro_batch_size": 8, "grad_accum": 2,
                                   "gradient_checkpointing": False, "peak_bytes": eight,
                                   "global_batch_tokens": 16 * 8 * 2048}
    assert eight / GIB == pytest.approx(53.84, abs=0.01)


def test_gradient_checkpointing_keeps_each_layers_input_and_recomputes_one(tmp_path):
    two = student_plan(tmp_path, "--gpu-memory", "80", "--gradient-checkpointing", "--student-dtype", "float32")
    memory, p = two["memory"], 1_235_814_400
    c = 4 * (6 + 2 * 1 + 2 * 0.25 + 4 * 4)  # float32: every saved tensor 4 bytes
    assert memory["activation_constant"] == c == 98
    assert memory["bytes"]["activations"] == (16 * 4 + c + 12) * 16 * 2048 * 2048
    assert memory["bytes"]["weight_copies"] == 0 and memory["bytes"]["loss_chunk"] == 523 * 128256 * 16
    assert memory["fits"] and memory["gradient_checkpointing"] and memory["bytes"]["optimizer"] == 8 * p


def test_suggestions_keep_the_global_batch_and_say_when_nothing_fits(tmp_path):
    # 28 GiB: no micro-batch fits without checkpointing; 4 rows with it, 4 micro-batches of 8 GPUs × 2048 tokens
    small = student_plan(tmp_path, "--gpu-memory", "28")["memory"]["suggested"]
    assert small == {"fits": True, "micro_batch_size": 4, "grad_accum": 4, "gradient_checkpointing": True,
                     "peak_bytes": small["peak_bytes"], "global_batch_tokens": 262144}
    assert small["peak_bytes"] <= (28 - 1) * 0.9 * GIB
    # --global-batch-tokens 1M: 64 rows a GPU per step, reached by 8 micro-batches of 8 on 80 GiB
    big = student_plan(tmp_path, "--gpu-memory", "80", "--global-batch-tokens", "1M")["memory"]
    assert big["global_batch_tokens"] == 10**6 and big["global_batch_source"] == "--global-batch-tokens"
    assert (big["suggested"]["micro_batch_size"], big["suggested"]["grad_accum"]) == (8, 8)
    assert big["suggested"]["global_batch_tokens"] == 8 * 8 * 8 * 2048  # 1,048,576: rounded up to whole rows
    # an 8B student's weights, gradients and AdamW states alone are 16 bytes × 8.03e9 = 120 GiB
    llama_8b = {**LLAMA_1B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "head_dim": 128, "tie_word_embeddings": False}
    none = student_plan(tmp_path, "--gpu-memory", "80", config=llama_8b)["memory"]["suggested"]
    assert none["fits"] is False and none["states_bytes"] == 16 * 8_030_261_248 and "--fsdp" in none["why"]


def test_the_memory_is_printed_with_its_terms(tmp_path):
    path = tmp_path / "student.json"
    path.write_text(json.dumps(LLAMA_1B))
    text = ok(run_cli("plan", "--tokens", "2B", "--seq-len", "2048", "--vocab-size", "128256", "--gpus", "8",
                      "--student", path, "--gpu-memory", "80")).output
    assert "85.7 GiB per GPU at micro-batch 16 (bfloat16 autocast)" in text
    assert "c = 63 bytes × B·L·d per layer, 16 layers of d = 2048" in text
    assert "fits          NO: 71.1 GiB usable of 80 GiB" in text
    assert "suggested     --micro-batch-size 8 --grad-accum 2 (53.8 GiB; 262,144 tokens per step" in text
    # without the architecture there is no activation to count
    only = plan_json("--tokens", "2B", "--seq-len", "2048", "--vocab-size", "128256", "--student-params", "1B")
    assert "memory" not in only["stage_two"] and "--student CONFIG" in only["stage_two"]["memory_not_estimated"]


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_activation_constants_are_what_autograd_keeps(dtype, checkpointing):
    """The memory model's c against the bytes of every tensor the shipped student's decoder saves for
    backward (saved-tensor hooks, parameters excluded), training on the CPU under autocast for bfloat16
    as stage two does on CUDA: per layer c·B·L·d and its bfloat16 weight copies (with checkpointing its
    float32 input alone), and the final norm's 8·B·L·d (the other 4 of the 12 outside the layers are the
    hidden states stage two copies without the last position). Within 2%."""
    import torch

    from pipeline.models import hf_config
    from stages.plan import CHECKPOINTED_LAYER, activation_constant, student_shape

    config = hf_config(ROOT / "data" / "models" / "student.json")
    torch.manual_seed(0)
    model = load_model(ROOT / "data" / "models" / "student.json").train()
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        saved.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        return tensor

    rows, seq_len = 8, 256
    ids = torch.randint(0, config.vocab_size, (rows, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            model.model(input_ids=ids, use_cache=False)
    measured = sum(n for ptr, n in saved.items() if ptr not in parameters)
    shape = student_shape(config, count_parameters(model))
    tokens_d = rows * seq_len * shape.width
    copies = 2 * shape.layer_parameters if dtype == "bfloat16" else 0
    if checkpointing:
        per_layer = CHECKPOINTED_LAYER * tokens_d
    else:
        per_layer = activation_constant(shape, dtype) * tokens_d + copies
    predicted = shape.layers * per_layer + 8 * tokens_d
    print(f"{dtype}{' checkpointed' if checkpointing else ''}: measured {measured:,} B, predicted {predicted:,.0f} B")
    assert measured == pytest.approx(predicted, rel=0.02)
