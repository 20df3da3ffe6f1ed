"""Causal LMs: build one from a config file (scratch) or load any local Hugging Face directory (on one
device, or across several with a device map), and run its output head by chunks of positions
(:class:`OutputHead`)."""

from __future__ import annotations

import difflib
import functools
import importlib.util
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


# ------------------------------------------------------------------ compute precision (--dtype, --tf32)

AUTO_DTYPE_HELP = ("'auto' is bfloat16 on a CUDA device that supports it (compute capability 8.0 and up: A100, "
                   "H100, …), float32 elsewhere (the CPU, older GPUs); what it resolved to is recorded.")
TF32_HELP = ("On CUDA, float32 matrix multiplies on TF32 tensor cores (torch.set_float32_matmul_precision('high'): "
             "10-bit mantissa products, float32 sums); --no-tf32 keeps them full float32. No effect on the CPU, "
             "nor on bfloat16/float16 compute.")


def dtype_problems(name: str, allowed: tuple[str, ...] = tuple(DTYPES)) -> list[str]:
    """What is wrong with a ``--dtype`` value (for a config's ``__post_init__``): 'auto' or one of
    ``allowed``."""
    if name == "auto" or name in allowed:
        return []
    names = ("auto", *allowed)
    return [f"dtype must be {', '.join(names[:-1])} or {names[-1]}, got {name!r}"]


def bf16_supported(device: torch.device) -> bool:
    """``device`` computes bfloat16 natively: ``torch.cuda.is_bf16_supported()`` of a CUDA device
    (compute capability 8.0 or more; the current device, which the stages set or which is alike on a
    node), not counting torch's emulation on older GPUs, which is slower than float32."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no emulation to leave out
        return torch.cuda.is_bf16_supported()


def resolve_dtype(requested: str, device: torch.device | str) -> str:
    """The compute dtype a stage runs in on ``device``, the one definition every stage uses:
    ``requested`` as it is, or for 'auto' bfloat16 where :func:`bf16_supported`, else float32 (the
    CPU, where bfloat16 matrix multiplies are slow, and GPUs before Ampere, where float16 would need
    loss scaling). What a stage records (store params, resolved config, metrics) is this result, so a
    store written with ``--dtype float32`` on a CPU is the one a rerun with ``auto`` there finds."""
    if requested != "auto":
        return requested
    return "bfloat16" if bf16_supported(torch.device(device)) else "float32"


def set_tf32(device: torch.device | str, enabled: bool) -> bool:
    """``--tf32``: on a CUDA device, float32 matrix multiplies on TF32 tensor cores ('high') or in full
    float32 ('highest', ``--no-tf32``; set explicitly, since the setting is global to the process and
    ``distill rounds`` runs stages one after another). Returns whether TF32 is in effect; nothing is
    changed on the CPU."""
    if torch.device(device).type != "cuda":
        return False
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    return enabled


def matmul_precision(device: torch.device | str, dtype: str, tf32: bool) -> str:
    """What a stage's matrix multiplies compute in, as recorded beside its resolved dtype: 'tf32'
    where ``--tf32`` reaches them (float32 compute on CUDA), else the dtype's own name."""
    return "tf32" if tf32 and dtype == "float32" and torch.device(device).type == "cuda" else dtype


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


def load_model(spec: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
               device_map: str | dict | None = None, max_memory: dict | None = None,
               attn_implementation: str = "auto"):
    """A causal LM: pretrained weights when ``spec`` is a directory holding them, else freshly
    initialised from the config (seed torch first for reproducible initialisation). ``device_map``
    (a preset such as ``"auto"`` or a mapping module → device, see :func:`read_device_map`) loads the
    weights straight onto their devices through accelerate, and ``max_memory`` caps a preset's use
    of each device. ``attn_implementation``: see :data:`ATTN_IMPLEMENTATIONS`; an architecture that
    lacks the one asked for is refused in one line before any weight is read."""
    from transformers import AutoModelForCausalLM

    path = Path(spec)
    torch_dtype = DTYPES[dtype]
    attention = attn_kwargs(attn_implementation)
    if has_weights(path):
        placement = {"device_map": device_map, "max_memory": max_memory} if device_map is not None else {}
        try:
            return AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code,
                **placement, **attention)
        except Exception as e:  # a missing, truncated or corrupt weight file (safetensors' own error type too)
            if isinstance(e, DistillError):
                raise
            refused_attention(e, attn_implementation, path)
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if device_map is not None:  # the map is as likely the cause as the files
                raise DistillError(f"cannot load model weights from {path} with device map {device_map!r} ({reason}); "
                                   "check the map and the devices' memory, or the weight files") from None
            raise DistillError(f"cannot load model weights from {path} ({reason}); "
                               "the weight files may be corrupt or incomplete: copy or save them again") from None
    config = hf_config(path, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                **attention)
    except (ValueError, ImportError) as e:
        refused_attention(e, attn_implementation, path)
        raise


# ------------------------------------------------------------------ attention, checkpointing, compile

# What computes attention (--attn-implementation). 'auto' is transformers' own choice: sdpa wherever
# the architecture has it, else eager (Gemma 2: sdpa cannot soft-cap attention scores). Every one of
# them keeps --attention document: transformers turns per-document position ids into a block mask
# (sdpa, eager) or flash-attention's variable-length path (flash_attention_2).
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
ATTN_HELP = ("Attention kernel of every model this loads: 'auto' (sdpa where the architecture has it, else eager), "
             "'sdpa' (torch's fused attention), 'eager' (transformers' reference code) or 'flash_attention_2' "
             "(CUDA, the flash-attn package).")


def attn_implementation_problems(name: str, device: str = "auto", dtype: str = "") -> list[str]:
    """What is wrong with ``--attn-implementation`` before any model is built (for a config's
    ``__post_init__``): its spelling, or flash-attention without its package or a CUDA device, or in
    float32 (``dtype``: the stage's --dtype; flash-attention computes in bf16/fp16 only). Whether the
    architecture has it is checked as the model is built (:func:`load_model`)."""
    if name not in ATTN_IMPLEMENTATIONS:
        return [f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}"]
    if name != "flash_attention_2":
        return []
    problems = []
    if importlib.util.find_spec("flash_attn") is None:
        problems.append("--attn-implementation flash_attention_2 needs the flash-attn package, which is not "
                        "installed: pip install flash-attn --no-build-isolation (CUDA GPUs only), or use "
                        "--attn-implementation sdpa")
    elif device == "cpu" or not torch.cuda.is_available():
        problems.append("--attn-implementation flash_attention_2 runs on CUDA GPUs only and none is used here; "
                        "use --attn-implementation sdpa")
    if dtype == "float32":
        problems.append("--attn-implementation flash_attention_2 computes in bfloat16 or float16 only; pass "
                        "--dtype bfloat16 or use --attn-implementation sdpa")
    return problems


def attn_kwargs(name: str) -> dict:
    """``from_pretrained``/``from_config`` keywords for ``--attn-implementation``: none for 'auto'."""
    if problems := attn_implementation_problems(name):
        raise DistillError(problems[0])
    return {} if name == "auto" else {"attn_implementation": name}


def refused_attention(error: Exception, name: str, where: str | Path) -> None:
    """Turn transformers' refusal of an attention implementation the architecture lacks into one
    line naming what to use instead; any other error is left to the caller."""
    text = str(error)
    if name == "auto" or "does not support" not in text:
        return
    architecture = text.split(" does not support", 1)[0].split()[-1]
    instead = "eager" if name == "sdpa" else "sdpa (or eager)"
    why = " (sdpa cannot soft-cap attention scores)" if "Gemma2" in architecture and name == "sdpa" else ""
    raise DistillError(f"model {where}: {architecture} has no {name} attention in transformers{why}; use "
                       f"--attn-implementation {instead}, or auto (sdpa where the architecture has it, else "
                       "eager)") from None


def probe_precision(model):
    """The context a model's one-off probes run in (:class:`OutputHead`, :func:`check_document_attention`):
    bf16 autocast for a float32 model on flash-attention, which computes in bf16/fp16 only (training
    runs it under the same autocast, --dtype bfloat16); nothing otherwise."""
    import contextlib

    weights = next(model.parameters())
    if attn_implementation(model).startswith("flash") and weights.dtype == torch.float32:
        return torch.autocast(weights.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def attn_implementation(model) -> str:
    """The attention implementation a loaded model runs ('sdpa', 'eager', 'flash_attention_2', …)."""
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def enable_gradient_checkpointing(model, where: str | Path) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (transformers'
    own per-layer checkpointing, non-reentrant: it composes with DDP, FSDP and torch.compile, and
    needs no input that requires grad). Memory then holds one layer's activations plus each layer's
    input; the price is one more forward of the decoder per step. Active in training mode only.
    Call before the model is wrapped by FSDP, so that sharding sees the checkpointed layers."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise DistillError(f"model {where} ({type(model).__name__}) does not support gradient checkpointing in "
                           "transformers; drop --gradient-checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2's name for the same thing
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_layers(model) -> int:
    """``torch.compile`` each decoder layer in place (torchtune's recipes do the same): layers share
    one compiled graph, so compile time does not grow with depth, and a layer stays a module that FSDP
    shards and checkpointing recomputes. The embeddings, masks and output head run as before (the
    loss runs on chunks of positions of varying count, which would only recompile). Returns the number
    of layers compiled; 0 where the model has no decoder layers to find."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(body, "layers", None) or getattr(body, "h", None) or []
    name = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    if getattr(model, name, False):
        # transformers' layers set a context variable (the hub-kernels registry) inside the checkpointed
        # forward; the recompute in backward need not set it again, and without this dynamo refuses the
        # side effect and runs the whole layer uncompiled
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers:
        layer.compile()
    return len(layers)


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process so far: each frame's compile (dynamo,
    AOT autograd, inductor's forward) and the backward graphs inductor compiles at the first backward."""
    from torch._dynamo.utils import compilation_time_metrics

    timed = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")
    return sum(sum(compilation_time_metrics.get(name, ())) for name in timed)


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def skeleton(config, trust_remote_code: bool = False):
    """The model a transformers config describes, built on the meta device: its modules and
    parameter shapes without memory or weights (a 70B config takes seconds)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


# ------------------------------------------------------------------ a model over several devices

DEVICE_MAP_PRESETS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's, as transformers takes them


def accelerate_problems() -> list[str]:
    if importlib.util.find_spec("accelerate") is None:
        return ["--device-map needs accelerate, which is not installed: pip install 'accelerate>=0.26'"]
    return []


def read_device_map(spec: str | dict) -> str | dict[str, int | str]:
    """``--device-map`` as transformers takes it: a preset (``auto``: accelerate fills the visible
    GPUs in order, then CPU memory, then disk), or a mapping module name → device (a GPU index,
    ``cuda:N``, ``cpu`` or ``disk``) given inline as JSON, as a JSON or YAML file, or as a config
    file's mapping. GPU entries come back as indices."""
    import yaml

    where = "--device-map"
    if isinstance(spec, dict):
        mapping = spec
    elif spec in DEVICE_MAP_PRESETS:
        return spec
    elif spec.lstrip().startswith("{"):
        try:
            mapping = json.loads(spec)
        except json.JSONDecodeError as e:
            raise DistillError(f"--device-map is not valid JSON ({e}); pass a preset ({', '.join(DEVICE_MAP_PRESETS)}), "
                               "a JSON file or an inline mapping such as '{\"model.layers.0\": 0}'") from None
    else:
        path = Path(spec)
        if not path.is_file():
            raise DistillError(f"--device-map {spec}: no such file, and not a preset; pass "
                               f"{', '.join(DEVICE_MAP_PRESETS)}, a JSON/YAML file of module → device or an inline JSON mapping")
        where = f"device map {path}"
        try:
            mapping = yaml.safe_load(path.read_text())  # YAML reads JSON too
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise DistillError(f"{where} does not parse: {str(e).splitlines()[0]}; fix it (JSON or YAML)") from None
    if not isinstance(mapping, dict) or not mapping:
        raise DistillError(f"{where} must be a non-empty mapping of module name → device (a GPU index, cuda:N, cpu "
                           f"or disk), got {type(mapping).__name__}")
    out = {}
    for module, device in mapping.items():
        if isinstance(device, str) and (m := re.fullmatch(r"cuda(?::(\d+))?", device)):
            device = int(m.group(1) or 0)
        if not (device in ("cpu", "disk") or (isinstance(device, int) and not isinstance(device, bool) and device >= 0)):
            raise DistillError(f"{where}: module {module!r} has device {device!r}; use a GPU index (0, 1, …), "
                               "cuda:N, cpu or disk")
        out[str(module)] = device
    return out


def device_map_problems(spec: str | dict) -> list[str]:
    """What is wrong with a ``--device-map`` value as written (for a config's ``__post_init__``):
    accelerate missing or the map unreadable. Whether this machine has its devices is checked when
    the model loads (:func:`check_devices`): a login node that writes a job's scripts has no GPU."""
    if problems := accelerate_problems():
        return problems
    try:
        read_device_map(spec)
    except DistillError as e:
        return [str(e)]
    return []


def check_devices(device_map: str | dict) -> None:
    """The GPUs a device map asks for are visible here."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if isinstance(device_map, str):
        if not gpus:
            raise DistillError(f"--device-map {device_map} spreads the model over CUDA devices and none is visible; "
                               "drop --device-map to run on one device (--device cpu), or pass an explicit map of "
                               "module → cpu/disk")
        return
    wanted = sorted({d for d in device_map.values() if isinstance(d, int)})
    if wanted and wanted[-1] >= gpus:
        raise DistillError(f"--device-map places modules on GPU {wanted[-1]} but this machine has {gpus} CUDA "
                           "device(s); fix the map or the job's GPU request")


def check_device_map(device_map: dict, config, where: str, trust_remote_code: bool = False) -> None:
    """Every key of an explicit map names a module of the model, and every parameter has a device
    (transformers would otherwise load the missing ones wherever it likes, or fail deep inside)."""
    model = skeleton(config, trust_remote_code)
    modules = [name for name, _ in model.named_modules()]
    known = set(modules)
    for key in device_map:
        if key not in known:
            close = difflib.get_close_matches(key, modules, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"its top modules: {', '.join(n for n, _ in model.named_children())}"
            raise DistillError(f"{where}: {key!r} is not a module of the model ({hint}); fix the map")
    uncovered = [name for name, _ in model.named_parameters()
                 if not any(key == "" or name == key or name.startswith(key + ".") for key in device_map)]
    if uncovered:
        owners = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in uncovered))
        raise DistillError(f"{where} gives no device to {len(uncovered)} parameter(s) ({', '.join(uncovered[:4])}"
                           f"{', …' if len(uncovered) > 4 else ''}); add {', '.join(map(repr, owners[:4]))} "
                           "(or a module above them) to the map")


def parse_max_memory(items: tuple[str, ...]) -> dict[int | str, str]:
    """``--max-memory 0=70GiB,1=70GiB,cpu=200GiB`` → ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``."""
    out: dict[int | str, str] = {}
    for item in items:
        device, _, size = item.partition("=")
        device, size = device.strip(), size.strip().replace(" ", "")
        if not (device.isdigit() or device == "cpu") or not re.fullmatch(r"\d+(\.\d+)?([KMGT]i?B)?", size):
            raise DistillError(f"--max-memory {item!r}: write DEVICE=SIZE, DEVICE a GPU index or cpu, SIZE such as "
                               "70GiB or 200GB (e.g. --max-memory 0=70GiB,1=70GiB,cpu=200GiB)")
        out[int(device) if device.isdigit() else device] = size
    return out


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device (its weights may sit on the
    CPU or disk, on meta between calls), else the device of its first parameter."""
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        device = getattr(one, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next(module.parameters()).device


def placement(model) -> dict[str, str]:
    """Where each module of a dispatched model lives (``{"": device}`` for a model on one device)."""
    if hasattr(model, "hf_device_map"):
        return {name: str(device) for name, device in model.hf_device_map.items()}
    return {"": str(next(model.parameters()).device)}


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

    A model dispatched over several devices by accelerate (``hf_device_map``) takes its input ids on
    its input embedding's device and gives hidden states and logits on its output embedding's,
    :attr:`device`, where whatever reduces the logits should run.
    """

    def __init__(self, model, probe: torch.Tensor):
        self.model = model
        self.body = model.get_decoder() if hasattr(model, "get_decoder") else None
        self.head = model.get_output_embeddings()
        prefix = getattr(model, "base_model_prefix", "")
        self._body_name = prefix if self.body is not None and getattr(model, prefix, None) is self.body else None
        self.mode = "full"
        # A dispatched model: ids go where its embedding computes, everything after the body where its head does.
        dispatched = hasattr(model, "hf_device_map")
        self.input_device = execution_device(model.get_input_embeddings()) if dispatched else None
        self.device = execution_device(self.head if self.head is not None else model) if dispatched else None
        if self.body is not None and self.head is not None:
            was_training = model.training
            model.eval()
            with torch.no_grad(), probe_precision(model):
                full = self._here(model(input_ids=probe).logits.float())
                hidden = self._here(self.body(input_ids=probe).last_hidden_state)
                self.mode = self._choose(full, hidden.reshape(-1, hidden.shape[-1]))
            model.train(was_training)
        if self.mode == "full":
            warn_once(f"distill: {type(model).__name__}'s logits are not its output embedding of its decoder's "
                      "hidden states, nor its own forward of them; using its full forward ([batch, length, vocab] "
                      "logits in memory)")

    def _here(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the device of the output head (a no-op unless the model is dispatched)."""
        return tensor if self.device is None else tensor.to(self.device)

    def _choose(self, full: torch.Tensor, hidden: torch.Tensor) -> str:
        def matches(logits: torch.Tensor) -> bool:
            return torch.allclose(full, logits.float().reshape(full.shape), rtol=1e-4, atol=1e-4)

        head = self._here(self.head(hidden))
        if self._body_name is None:  # no decoder to swap: the head alone, if it matches
            return "head" if matches(head) else "full"
        own = self._here(self._own_forward(hidden))
        if not matches(own):
            return "head" if matches(head) else "full"
        # The head alone only where it is bit for bit the model's own forward: a soft-cap or a scale
        # of 1 + ε is within any tolerance on the small logits of a fresh model, not after training.
        return "head" if torch.equal(head, own) else "forward"

    @property
    def split(self) -> bool:
        return self.mode != "full"

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[B, L, H]``; with ``position_ids`` (``RowRule.position_ids``: reset at each
        document) and no cache, each token attends within its own document only (see
        :func:`check_document_attention`)."""
        if self.input_device is not None:
            input_ids = input_ids.to(self.input_device)
        # no cache: a scoring or training forward never reads one (and gradient checkpointing refuses it)
        documents = {"use_cache": False} if position_ids is None else {
            "position_ids": position_ids.to(input_ids.device), "use_cache": False}
        if self.split:
            return self._here(self.body(input_ids=input_ids, **documents).last_hidden_state)
        # fallback: the full logits are the "hidden" state
        return self._here(self.model(input_ids=input_ids, **documents).logits)

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
            return self._here(self._own_forward(hidden_chunk))
        if out is not None and out.shape[0] >= hidden_chunk.shape[0] and out.dtype == hidden_chunk.dtype:
            return torch.matmul(hidden_chunk, self.head.weight.t(), out=out[: hidden_chunk.shape[0]])
        return self._here(self.head(hidden_chunk))  # through accelerate's hook, if any: it loads offloaded weights

    def logits_buffer(self, positions: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """A buffer for :meth:`logits` of up to ``positions`` rows, or None where the head is not a
        plain bias-free linear layer (then it runs as the model defines it)."""
        plain = self.mode == "head" and type(self.head) is torch.nn.Linear and self.head.bias is None
        # (a head whose weights accelerate offloads sits on meta between calls: it runs through its hook)
        if not plain or self.head.weight.dtype != hidden.dtype or self.head.weight.device != hidden.device:
            return None
        return torch.empty(positions, self.head.weight.shape[0], dtype=hidden.dtype, device=hidden.device)


def document_position_ids(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``[B, L]`` positions counted from each document's start: 0 at position 0 and after every EOS
    (``RowRule.position_ids`` of ``pipeline/text/packing.py``, the rule's home)."""
    length = input_ids.shape[1]
    index = torch.arange(length, device=input_ids.device).expand_as(input_ids)
    after_eos = torch.zeros_like(input_ids, dtype=torch.bool)
    after_eos[:, 1:] = input_ids[:, :-1] == eos_token_id
    start = torch.where(after_eos, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start


@torch.no_grad()
def check_document_attention(model, eos_token_id: int, what: str) -> None:
    """Refuse (one line) a model that does not keep attention inside each document when given
    per-document ``position_ids``: transformers builds a block-diagonal mask from them (its
    packed-sequence masks, sliding windows included) or takes flash-attention's variable-length path,
    but a model with its own attention code may ignore them and let documents see each other. Checked
    on a probe: the second of two packed documents must score as it does alone."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    first = [i % vocab for i in (11, 12, 13, 14, eos_token_id)]
    second = [i % vocab for i in (21, 22, 23, 24, 25)]
    packed = torch.tensor([first + second], device=device)
    was_training = model.training
    model.eval()
    try:
        with probe_precision(model):
            together = model(input_ids=packed, position_ids=document_position_ids(packed, eos_token_id),
                             use_cache=False).logits
            alone = model(input_ids=packed[:, len(first):], use_cache=False).logits
    finally:
        model.train(was_training)
    tolerance = 1e-3 if together.dtype == torch.float32 else 5e-2  # (a leak moves logits by far more)
    if not torch.allclose(together[:, len(first):].float(), alone.float(), rtol=tolerance, atol=tolerance):
        raise DistillError(f"{what} ({type(model).__name__}) lets packed documents see each other even with "
                           "per-document position ids, so --attention document cannot be kept with it; prepare "
                           "the store with --attention causal, or use a model whose attention transformers builds")
