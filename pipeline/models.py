"""Build or load causal LMs: from a config file (scratch) or any local Hugging Face directory."""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

import torch

from pipeline.errors import DistillError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    print(message, file=sys.stderr)


def read_model_config(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except Exception as e:
        raise DistillError(f"model config {path} does not parse: {str(e).splitlines()[0]}; fix it (JSON, or YAML "
                           "for .yaml/.yml)") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise DistillError(f"model config {path} must be a mapping with a 'model_type' (e.g. llama, gpt2)")
    return data


def hf_config(spec: str | Path, trust_remote_code: bool = False):
    """The transformers config of a model spec (config file or local directory)."""
    from transformers import AutoConfig

    path = Path(spec)
    if path.is_file():
        data = dict(read_model_config(path))
        model_type = data.pop("model_type")
        try:
            return AutoConfig.for_model(model_type, **data)
        except (ValueError, KeyError) as e:
            raise DistillError(f"model config {path}: {e}") from None
    if path.is_dir() and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    raise DistillError(f"model {path} is neither a model config file nor a local Hugging Face directory "
                       "with config.json; check the path")


def has_weights(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in WEIGHT_FILES)


def load_model(spec: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    """A causal LM: pretrained weights when ``spec`` is a directory holding them, else freshly
    initialised from the config (seed torch first for reproducible initialisation)."""
    from transformers import AutoModelForCausalLM

    path = Path(spec)
    torch_dtype = DTYPES[dtype]
    if has_weights(path):
        try:
            return AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception as e:  # a missing, truncated or corrupt weight file (safetensors' own error type too)
            if isinstance(e, DistillError):
                raise
            raise DistillError(f"cannot load model weights from {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                               "the weight files may be corrupt or incomplete: copy or save them again") from None
    config = hf_config(path, trust_remote_code)
    return AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def device_problems(name: str) -> list[str]:
    """What is wrong with a ``--device`` value (for a config's ``__post_init__``): its spelling, or a
    CUDA device this machine does not have."""
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name in ("auto", "cpu"):
        return []
    if match is None:
        return [f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}"]
    if not torch.cuda.is_available():
        return [f"--device {name} asked for, but no CUDA device is visible; use --device cpu"]
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        return [f"--device {name} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s); "
                "use --device cuda:0 or auto"]
    return []


def resolve_device(name: str) -> torch.device:
    if problems := device_problems(name):
        raise DistillError(problems[0])
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _GivenHidden(torch.nn.Module):
    """Stands in for a model's decoder: returns hidden states computed earlier (see OutputHead)."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(last_hidden_state=self.hidden)


class OutputHead:
    """Logits for chunks of positions, as the model's own forward computes them, without ``[B, L, V]``.

    The decoder body runs once (:meth:`hidden`); :meth:`logits` turns a chunk of its hidden states
    into logits one of three ways, chosen once by comparing each with ``model(probe).logits``:

    - ``head``: the output embedding alone — most architectures (Llama, GPT-2, Qwen, …);
    - ``forward``: the model's own forward with its decoder swapped for the chunk's hidden states,
      so whatever it does after the head is done exactly as it does it — Granite divides by
      ``logits_scaling``, Gemma 2/3 soft-cap, Cohere multiplies by ``logit_scale``;
    - ``full``: where neither matches, the full forward's logits stand in for the hidden states
      (exact, but memory holds ``[B, L, V]``); a one-line warning says so.

    The probe runs in eval mode (no dropout), without gradients; works for students (gradients
    flow through :meth:`logits`) and teachers alike.
    """

    def __init__(self, model, probe: torch.Tensor):
        self.model = model
        self.body = model.get_decoder() if hasattr(model, "get_decoder") else None
        self.head = model.get_output_embeddings()
        prefix = getattr(model, "base_model_prefix", "")
        self._body_name = prefix if self.body is not None and getattr(model, prefix, None) is self.body else None
        self.mode = "full"
        if self.body is not None and self.head is not None:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                full = model(input_ids=probe).logits.float()
                hidden = self.body(input_ids=probe).last_hidden_state
                self.mode = self._choose(full, hidden.reshape(-1, hidden.shape[-1]))
            model.train(was_training)
        if self.mode == "full":
            warn_once(f"distill: {type(model).__name__}'s logits are not its output embedding of its decoder's "
                      "hidden states, nor its own forward of them; using its full forward ([batch, length, vocab] "
                      "logits in memory)")

    def _choose(self, full: torch.Tensor, hidden: torch.Tensor) -> str:
        def matches(logits: torch.Tensor) -> bool:
            return torch.allclose(full, logits.float().reshape(full.shape), rtol=1e-4, atol=1e-4)

        head = self.head(hidden)
        if self._body_name is None:  # no decoder to swap: the head alone, if it matches
            return "head" if matches(head) else "full"
        own = self._own_forward(hidden)
        if not matches(own):
            return "head" if matches(head) else "full"
        # The head alone only where it is bit for bit the model's own forward: a soft-cap or a scale
        # of 1 + ε is within any tolerance on the small logits of a fresh model, not after training.
        return "head" if torch.equal(head, own) else "forward"

    @property
    def split(self) -> bool:
        return self.mode != "full"

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.split:
            return self.body(input_ids=input_ids).last_hidden_state
        return self.model(input_ids=input_ids).logits  # fallback: the full logits are the "hidden" state

    def _own_forward(self, hidden_chunk: torch.Tensor) -> torch.Tensor:
        """``model.forward`` on ``[P, H]`` hidden states, its decoder swapped out for the duration."""
        body = getattr(self.model, self._body_name)
        setattr(self.model, self._body_name, _GivenHidden(hidden_chunk[None]))
        try:
            dummy = torch.zeros(1, hidden_chunk.shape[0], dtype=torch.long, device=hidden_chunk.device)
            return self.model(input_ids=dummy, use_cache=False).logits[0]
        finally:
            setattr(self.model, self._body_name, body)

    def logits(self, hidden_chunk: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[P, V]`` of a chunk of hidden states; written into ``out[:P]`` when given a
        reused ``[chunk, V]`` buffer from :meth:`logits_buffer` (a plain bias-free head). On a CPU a fresh
        32 MB tensor per chunk is a fresh mapping from the allocator: its page faults cost stage
        one 26 µs of system time per token with the shipped teacher, 10 with the buffer."""
        if self.mode == "full":
            return hidden_chunk
        if self.mode == "forward":
            return self._own_forward(hidden_chunk)
        if out is not None and out.shape[0] >= hidden_chunk.shape[0] and out.dtype == hidden_chunk.dtype:
            return torch.matmul(hidden_chunk, self.head.weight.t(), out=out[: hidden_chunk.shape[0]])
        return self.head(hidden_chunk)

    def logits_buffer(self, positions: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """A buffer for :meth:`logits` of up to ``positions`` rows, or None where the head is not a
        plain bias-free linear layer (then it runs as the model defines it)."""
        plain = self.mode == "head" and type(self.head) is torch.nn.Linear and self.head.bias is None
        if not plain or self.head.weight.dtype != hidden.dtype:
            return None
        return torch.empty(positions, self.head.weight.shape[0], dtype=hidden.dtype, device=hidden.device)
