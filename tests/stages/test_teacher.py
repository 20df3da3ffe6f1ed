import json

import numpy as np
import pytest
import pyarrow as pa
import torch
import zarr
from transformers import AutoModelForCausalLM

from pipeline.store.contract import open_store
from pipeline.teacher.topk import retemper
from tests.conftest import ROOT, TOKENIZER, kill_when, make_teacher, one_line_error, run_cli, spawn, tree_digest


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import gzip

    root = tmp_path_factory.mktemp("stage1")
    with gzip.open(ROOT / "data" / "corpus" / "heldout.jsonl.gz", "rt") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(12), f)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    result = run_cli("prepare", "--input", corpus, "--out", root / "tokens", "--tokenizer", TOKENIZER,
                     "--seq-len", "32", "--rows-per-shard", "40")
    assert result.exit_code == 0, result.output
    make_teacher(root / "teacher")
    return root


def teacher_args(setup, out, *extra):
    """The first 48 of the 262 rows (4 shards of 12, batches of 5, position chunks of 37); a later flag in
    ``extra`` wins (click keeps the last value)."""
    return ["teacher", "--tokens-store", setup / "tokens", "--teacher", setup / "teacher", "--out", out,
            "--kind", "topk", "--top-k", "16", "--rows-per-shard", "12", "--batch-size", "5", "--position-chunk", "37",
            "--max-rows", "48", *map(str, extra)]


def reference(setup, rows):
    model = AutoModelForCausalLM.from_pretrained(str(setup / "teacher"), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(rows.astype(np.int64))).logits.double()


def all_rows(store):
    return store.read_rows(0, store.rows)


@pytest.mark.parametrize("temperature,kernel", [(1.0, "native"), (2.0, "native"), (1.0, "torch"), (2.0, "torch")])
def test_store_equals_fresh_forward(setup, tmp_path, temperature, kernel):
    result = run_cli(*teacher_args(setup, tmp_path / "s", "--temperature", temperature, "--kernel", kernel,
                                   "--temperature-grid", "1", "--temperature-grid", "2"))
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "s", kind="topk")
    assert store.params["temperature_grid"] == [1.0, 2.0] and store.params["top_k"] == 16
    data = all_rows(store)
    assert data["topk_ids"].dtype == np.uint16 and data["topk_logprobs"].dtype == np.float16
    logits = reference(setup, data["input_ids"])  # [N, L, V] float64 reference
    grid = [1.0, 2.0]
    cache = grid.index(temperature)

    ref_lp_cache = torch.log_softmax(logits / temperature, dim=-1)
    ref_ids = torch.topk(logits, 16, dim=-1).indices
    np.testing.assert_array_equal(data["topk_ids"].astype(np.int64), ref_ids.numpy())
    kept = ref_lp_cache.gather(-1, ref_ids).numpy()
    np.testing.assert_allclose(data["topk_logprobs"].astype(np.float64), kept, rtol=1e-3, atol=2e-3)

    for g, t in enumerate(grid):
        ref_lp = torch.log_softmax(logits / t, dim=-1)
        kept_t = ref_lp.gather(-1, ref_ids)
        ref_tail = 1.0 - kept_t.exp().sum(-1)  # float64: fine at these magnitudes
        got_tail = np.exp(data["tail_logmass"][..., g].astype(np.float64))
        np.testing.assert_allclose(got_tail, ref_tail.numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(data["logsumexp"][..., g], torch.logsumexp(logits / t, -1).numpy(), rtol=1e-5)
        # Re-tempering from the stored cache-temperature values gives the reference at t.
        again = retemper(torch.from_numpy(data["topk_logprobs"]), torch.from_numpy(data["logsumexp"]),
                         temperature, cache, g, t).double()
        np.testing.assert_allclose(again.numpy(), kept_t.numpy(), rtol=2e-3, atol=4e-3)

    assert data["tail_logmass"].dtype == np.float32
    assert (data["tail_logmass"][..., 0] < np.log(0.5)).mean() > 0.5  # peaked: tails mostly small
    targets = ref_lp_cache[:, :-1].gather(-1, torch.from_numpy(data["input_ids"][:, 1:].astype(np.int64))[..., None])
    np.testing.assert_allclose(data["target_logprob"][:, :-1], targets[..., 0].numpy(), rtol=1e-5, atol=1e-5)
    assert np.isnan(data["target_logprob"][:, -1]).all()


def test_backends_hold_the_same_content_and_read_plainly(setup, tmp_path):
    for backend in ("zarr", "arrow"):
        assert run_cli(*teacher_args(setup, tmp_path / backend, "--backend", backend)).exit_code == 0
    zs, ar = open_store(tmp_path / "zarr"), open_store(tmp_path / "arrow")
    assert [s["sha256"] for s in zs.shards] == [s["sha256"] for s in ar.shards]
    shard = zs.shards[0]["name"]
    ids = zarr.open_group(str(tmp_path / "zarr" / shard), mode="r")["topk_ids"][:]
    with pa.memory_map(str(tmp_path / "arrow" / ar.shards[0]["name"])) as f:
        table = pa.ipc.open_file(f).read_all()
    shape = json.loads(table.schema.field("topk_ids").metadata[b"shape"])
    flat = table.column("topk_ids").combine_chunks().flatten().to_numpy()
    np.testing.assert_array_equal(flat.reshape(len(table), *shape), ids)


def hashes(path):
    return [s["sha256"] for s in open_store(path).shards]


def small_shards_args(setup, out, *extra):
    """32 rows in 16 shards of 2: moments enough to kill a run in, and two jobs of 8 shards each."""
    return teacher_args(setup, out, "--rows-per-shard", "2", "--max-rows", "32", *extra)


@pytest.fixture(scope="module")
def one_run(setup):
    """The shard hashes of one uninterrupted process (as the killed and parallel runs are processes)."""
    one = spawn(small_shards_args(setup, setup / "one"))
    output, _ = one.communicate(timeout=300)
    assert one.returncode == 0, output
    want = hashes(setup / "one")
    assert len(want) == 16
    return want


# The stage-one kill family's representative in make test is tests/faults/test_stage_one_faults.py's
# 2-kills case (kills at random moments, a reader watching throughout, reruns equal shard for shard).
@pytest.mark.slow
@pytest.mark.faults
def test_sigkill_and_rerun_match_one_run(setup, one_run, tmp_path):
    """Killed mid-way: every shard visible under its name is complete; the rerun finishes the rest."""
    want = one_run
    killed_args = small_shards_args(setup, tmp_path / "killed")
    part = tmp_path / "killed" / "index.part-00000-of-00001.json"
    kill_when(spawn(killed_args), lambda: part.exists() and len(json.loads(part.read_text())["shards"]) >= 2)
    assert not (tmp_path / "killed" / "index.json").exists()
    from pipeline.store.contract import READERS, content_hash

    recorded = {e["name"]: e["sha256"] for e in json.loads(part.read_text())["shards"]}
    for shard in sorted((tmp_path / "killed").glob("shard-*")):
        assert content_hash(READERS["zarr"](shard)) in want  # complete, never half-written
    assert all(h in want for h in recorded.values())
    rerun = spawn(killed_args)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert hashes(tmp_path / "killed") == want


def test_parallel_jobs_then_merge_match_one_run(setup, one_run, tmp_path):
    """Two concurrent jobs of an array, then merge: the store one process writes."""
    jobs = [spawn(small_shards_args(setup, tmp_path / "two", "--num-shards", "2", "--shard-index", str(i)))
            for i in (0, 1)]
    for job in jobs:
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, output
    merged = run_cli("merge", tmp_path / "two")
    assert merged.exit_code == 0, merged.output
    assert hashes(tmp_path / "two") == one_run


def test_merge_names_missing_shards(setup, tmp_path):
    result = run_cli(*teacher_args(setup, tmp_path / "half", "--num-shards", "2", "--shard-index", "1"))
    assert result.exit_code == 0 and "not merged yet" in result.output
    merged = run_cli("merge", tmp_path / "half")
    assert merged.exit_code == 2 and "shard-00000.zarr" in merged.output and "not finished" in merged.output



def test_a_job_that_owns_no_shard_says_so_and_exits_before_the_teacher_loads(setup, tmp_path):
    """6 jobs over a store of 4 shards (as `distill slurm` writes when it cannot know the count): jobs 4
    and 5 own nothing; each says so in one line and exits 0 at once, writing nothing; jobs 0-3 fill the
    store one process writes."""
    single = tmp_path / "single"
    assert run_cli(*teacher_args(setup, single)).exit_code == 0
    out = tmp_path / "six"
    for job in (4, 5):
        result = run_cli(*teacher_args(setup, out, "--num-shards", 6, "--shard-index", job))
        assert result.exit_code == 0, result.output
        assert (f"job {job} of 6 owns no shard: the store has 4 shards (48 rows, 12 a shard), so 2 of the 6 jobs "
                "have nothing to do; nothing to do here (set --num-shards to at most 4") in result.output, result.output
        assert not out.exists()  # no lock, no job config: the teacher never loaded
    for job in range(4):
        assert run_cli(*teacher_args(setup, out, "--num-shards", 6, "--shard-index", job)).exit_code == 0
    assert hashes(out) == hashes(single)  # job 3 merged: every shard was recorded

def test_padded_output_rows_are_dropped_or_refused(setup, tmp_path):
    make_teacher(tmp_path / "padded", vocab=8192 + 64)
    result = run_cli(*teacher_args(setup, tmp_path / "p", "--teacher", tmp_path / "padded"))
    assert result.exit_code == 0, result.output
    data = all_rows(open_store(tmp_path / "p"))
    assert int(data["topk_ids"].max()) < 8192
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "padded")).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(data["input_ids"].astype(np.int64))).logits[..., :8192].double()
    kept = torch.log_softmax(logits, -1).gather(-1, torch.topk(logits, 16, -1).indices).numpy()
    np.testing.assert_allclose(data["topk_logprobs"].astype(np.float64), kept, rtol=1e-3, atol=2e-3)

    make_teacher(tmp_path / "bad-pad", vocab=8192 + 64, padded_argmax=True)
    msg = one_line_error(run_cli(*teacher_args(setup, tmp_path / "q", "--teacher", tmp_path / "bad-pad")))
    assert "padded output row" in msg


def test_teacher_of_another_vocabulary_is_refused(setup, tmp_path):
    make_teacher(tmp_path / "small-vocab", vocab=1000)
    msg = one_line_error(run_cli(*teacher_args(setup, tmp_path / "a", "--teacher", tmp_path / "small-vocab")))
    assert "predicts 1000 ids but the tokenizer has 8192" in msg


@pytest.mark.parametrize("flags,message", [
    (("--top-k", "9000"), "larger than the vocabulary"),
    (("--temperature", "0"), "temperature must be > 0"),
    (("--temperature-grid", "-1"), "temperature_grid"),
    (("--kernel", "fast"), "kernel must be one of auto, native, torch"),
], ids=["top-k", "temperature", "temperature-grid", "kernel"])
def test_bad_option(setup, tmp_path, flags, message):
    msg = one_line_error(run_cli(*teacher_args(setup, tmp_path / "a", *flags)))
    assert message in msg


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_nan_logits_are_refused_before_any_shard(setup, tmp_path, kernel):
    broken = AutoModelForCausalLM.from_pretrained(str(setup / "teacher"))
    with torch.no_grad():
        broken.lm_head.weight[5] = float("nan")
    broken.save_pretrained(str(tmp_path / "nan-teacher"))
    msg = one_line_error(run_cli(*teacher_args(setup, tmp_path / f"nan-{kernel}", "--teacher", tmp_path / "nan-teacher",
                                               "--kernel", kernel)))
    assert "logits hold NaN or infinity" in msg
    assert not list((tmp_path / f"nan-{kernel}").glob("shard-*"))


def test_tokens_store_without_index_is_refused(setup, tmp_path):
    (tmp_path / "no-index").mkdir()
    msg = one_line_error(run_cli("teacher", "--tokens-store", tmp_path / "no-index", "--teacher",
                                 setup / "teacher", "--out", tmp_path / "a"))
    assert "no index.json" in msg
    assert not (tmp_path / "a").exists()


def test_existing_store_other_params_refused_same_params_nothing_to_do(setup, tmp_path):
    assert run_cli(*teacher_args(setup, tmp_path / "done")).exit_code == 0
    before = tree_digest(tmp_path / "done")
    msg = one_line_error(run_cli(*teacher_args(setup, tmp_path / "done", "--top-k", "8")))
    assert "top_k: 16 vs 8" in msg and "--overwrite" in msg
    assert tree_digest(tmp_path / "done") == before
    again = run_cli(*teacher_args(setup, tmp_path / "done"))
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert tree_digest(tmp_path / "done") == before


def test_inspect_reports_and_verifies(setup, tmp_path):
    assert run_cli(*teacher_args(setup, tmp_path / "s")).exit_code == 0
    result = run_cli("inspect", tmp_path / "s", "--verify", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["kind"] == "topk" and report["verified_shards"] == len(open_store(tmp_path / "s").shards)
    assert 0 < report["kept_mass_T1"]["p50"] <= 1 and report["bytes_per_token"] > 0
    assert report["entropy_lower_bound_T1"]["mean"] <= report["entropy_upper_bound_T1"]["mean"]
    victim = sorted(p for p in (tmp_path / "s" / "shard-00001.zarr").rglob("*") if p.is_file() and p.name == "0")[0]
    raw = bytearray(victim.read_bytes())
    raw[-40:-20] = bytes(20)
    victim.write_bytes(bytes(raw))
    bad = run_cli("inspect", tmp_path / "s", "--verify")
    assert bad.exit_code == 2 and "shard-00001.zarr" in bad.output


def test_max_rows_takes_the_first_rows(setup, tmp_path):
    result = run_cli(*teacher_args(setup, tmp_path / "part", "--max-rows", "7"))
    assert result.exit_code == 0, result.output
    part, tokens = open_store(tmp_path / "part"), open_store(setup / "tokens")
    assert part.rows == 7 and part.params["rows"] == 7
    np.testing.assert_array_equal(all_rows(part)["input_ids"], tokens.read_rows(0, 7)["input_ids"])


# Layer 1 and the output head offloaded to disk: the split a CPU-only machine can run. (Two CPU
# entries alone make transformers skip accelerate's hooks: everything is on one device.)
DISK_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.norm": "cpu", "lm_head": "disk"}


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_device_map_writes_the_store_one_device_writes(setup, tmp_path, monkeypatch, kind):
    """--device-map: accelerate's AlignDevicesHook loads the offloaded layer's and head's weights from
    disk at every forward (counted), the head runs through its hook, and the store equals the one-device
    store shard for shard (content hashes), with the same params; the placement is recorded."""
    from accelerate.hooks import AlignDevicesHook

    offloaded_calls = []
    pre_forward = AlignDevicesHook.pre_forward

    def counting(self, module, *args, **kwargs):
        if self.offload:
            offloaded_calls.append(type(module).__name__)
        return pre_forward(self, module, *args, **kwargs)

    monkeypatch.setattr(AlignDevicesHook, "pre_forward", counting)
    (tmp_path / "map.json").write_text(json.dumps(DISK_MAP))
    flags = ("--kind", kind, "--max-rows", "20")
    assert run_cli(*teacher_args(setup, tmp_path / "one", *flags)).exit_code == 0
    assert not offloaded_calls
    result = run_cli(*teacher_args(setup, tmp_path / "map", *flags, "--device-map", tmp_path / "map.json"))
    assert result.exit_code == 0, result.output
    assert "2 module(s) on disk" in result.output and "logits reduced on cpu" in result.output
    # hooks sit on the leaves of a disk module: per forward of layer 1, 7 linear layers and 2 norms; then the head
    forwards = 1 + 3 + 2  # the probe, then 20 rows in shards of 12 + 8, in batches of 5
    assert offloaded_calls.count("LlamaRMSNorm") >= 2 * forwards and offloaded_calls.count("Linear") >= 8 * forwards
    assert hashes(tmp_path / "map") == hashes(tmp_path / "one")
    assert open_store(tmp_path / "map").params == open_store(tmp_path / "one").params
    resolved = json.loads((tmp_path / "map" / "config.part-00000.json").read_text())
    assert resolved["config"]["device_map"] == str(tmp_path / "map.json")
    assert resolved["placement"] == DISK_MAP


@pytest.mark.parametrize("arch,style", [("llama", "llama"), ("gemma2", "gemma")])
def test_document_attention_scores_each_packed_document_as_if_alone(tmp_path, arch, style):
    """A BOS-adding tokenizer and ``--attention document``: the stored predictions for a document packed
    after another equal a forward over that document alone (its BOS first), to 1e-5; read causally they
    do not (the first document leaks in)."""
    from transformers import AutoTokenizer

    from tests.conftest import bos_tokenizer, make_model, write_corpus

    tokenizer_dir = bos_tokenizer(tmp_path / "tok", style)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    teacher = make_model(tmp_path / "teacher", arch, len(tokenizer))
    docs = ["The river ran high that spring, and the mill stood idle.",
            "She counted the boats twice before the light went out.",
            "Nobody in the village remembered a winter so mild."] * 3
    corpus = write_corpus(tmp_path / "c.jsonl", docs)
    stored = {}
    for attention in ("document", "causal"):
        assert run_cli("prepare", "--input", corpus, "--out", tmp_path / f"tokens-{attention}", "--tokenizer",
                       tokenizer_dir, "--seq-len", "64", "--attention", attention).exit_code == 0
        result = run_cli("teacher", "--tokens-store", tmp_path / f"tokens-{attention}", "--teacher", teacher,
                         "--out", tmp_path / f"topk-{attention}", "--kind", "topk", "--top-k", "8",
                         "--logprob-dtype", "float32", "--batch-size", "2", "--position-chunk", "37")
        assert result.exit_code == 0, result.output
        store = open_store(tmp_path / f"topk-{attention}", kind="topk")
        assert store.params["attention"] == attention and store.params["document_start"] == "bos"
        stored[attention] = all_rows(store)
    ids = stored["document"]["input_ids"][0].astype(np.int64)
    eos = np.flatnonzero(ids == tokenizer.eos_token_id)
    start, end = eos[0] + 1, eos[1] + 1  # the second document: its BOS … its EOS
    assert ids[start] == tokenizer.bos_token_id and end - start > 10
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids[None, start:end])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    for attention, data in stored.items():
        gaps = [
            np.abs(data["logsumexp"][0, start:end, 0] - torch.logsumexp(logits, dim=-1).numpy()).max(),
            np.abs(data["topk_logprobs"][0, start:end] - logprobs.topk(8, dim=-1).values.numpy()).max(),
            np.abs(data["target_logprob"][0, start:end - 1]
                   - logprobs[:-1].gather(-1, torch.from_numpy(ids[start + 1:end, None])).squeeze(-1).numpy()).max(),
        ]
        if attention == "document":
            assert max(gaps) < 1e-5, gaps
        else:
            assert max(gaps) > 1e-3, gaps


@pytest.mark.parametrize("arch,style", [("llama", "llama"), ("gemma2", "gemma")])
def test_attn_implementation_keeps_document_attention(tmp_path, arch, style):
    """``--attn-implementation eager`` under ``--attention document``: the stored predictions equal
    the default's (sdpa for Llama; Gemma 2, which transformers gives no sdpa path, runs eager either
    way) to 1e-5, so each packed document is still scored alone; ``sdpa`` asked of Gemma 2 is one
    line naming eager, with nothing written. (flash_attention_2 needs CUDA and flash-attn: untested here.)"""
    from transformers import AutoTokenizer

    from tests.conftest import bos_tokenizer, make_model, write_corpus

    tokenizer_dir = bos_tokenizer(tmp_path / "tok", style)
    teacher = make_model(tmp_path / "teacher", arch, len(AutoTokenizer.from_pretrained(str(tokenizer_dir))))
    docs = ["The river ran high that spring, and the mill stood idle.",
            "She counted the boats twice before the light went out.",
            "Nobody in the village remembered a winter so mild."] * 3
    corpus = write_corpus(tmp_path / "c.jsonl", docs)
    assert run_cli("prepare", "--input", corpus, "--out", tmp_path / "tokens", "--tokenizer", tokenizer_dir,
                   "--seq-len", "64", "--attention", "document").exit_code == 0
    implementations = {"llama": ("sdpa", "eager"), "gemma2": ("auto", "eager")}[arch]
    stored = {}
    for name in implementations:
        result = run_cli("teacher", "--tokens-store", tmp_path / "tokens", "--teacher", teacher, "--out",
                         tmp_path / f"topk-{name}", "--kind", "topk", "--top-k", "8", "--logprob-dtype", "float32",
                         "--batch-size", "2", "--attn-implementation", name)
        assert result.exit_code == 0, result.output
        stored[name] = all_rows(open_store(tmp_path / f"topk-{name}", kind="topk"))
    first, second = (stored[name] for name in implementations)
    np.testing.assert_array_equal(first["topk_ids"], second["topk_ids"])
    for field in ("topk_logprobs", "logsumexp", "target_logprob"):
        np.testing.assert_allclose(first[field], second[field], rtol=0, atol=1e-5, err_msg=field)
    if arch == "gemma2":
        msg = one_line_error(run_cli("teacher", "--tokens-store", tmp_path / "tokens", "--teacher", teacher, "--out",
                                     tmp_path / "topk-sdpa", "--kind", "topk", "--attn-implementation", "sdpa"))
        assert "Gemma2ForCausalLM has no sdpa attention" in msg and "--attn-implementation eager" in msg
        assert not (tmp_path / "topk-sdpa").exists()
