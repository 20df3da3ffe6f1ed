"""Student initialisation from the teacher's own layers (DistilBERT-style: every other layer).

Reads the teacher's tensors from its safetensors files directly — no teacher model is built — and
copies embeddings, final norm, output head and layers 0, 2, 4, … into a student whose config
equals the teacher's except for the number of layers.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pipeline.errors import DistillError
from pipeline.models import attn_kwargs, hf_config, refused_attention

LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks|layer)\.)(\d+)(\..*)$")
# Config fields allowed to differ between teacher and student (besides the layer count).
FREE = {"num_hidden_layers", "n_layer", "num_layers", "_name_or_path", "architectures", "dtype", "torch_dtype",
        "transformers_version", "layer_types", "use_cache"}


def init_from_teacher_layers(student_config, teacher_dir: Path, attn_implementation: str = "auto"):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    teacher_dir = Path(teacher_dir)
    files = sorted(teacher_dir.glob("*.safetensors")) if teacher_dir.is_dir() else []
    if not files:
        raise DistillError(f"--init teacher-layers needs the teacher's safetensors weights; {teacher_dir} has none "
                           "(pass --init-teacher DIR)")
    teacher_config = hf_config(teacher_dir)
    t, s = teacher_config.to_dict(), student_config.to_dict()
    different = sorted(k for k in set(t) | set(s) if k not in FREE and t.get(k) != s.get(k))
    if different:
        raise DistillError(f"--init teacher-layers needs the student's architecture to match the teacher's except "
                           f"for the layer count; they differ in {', '.join(different)}")
    n_teacher = teacher_config.num_hidden_layers
    n_student = student_config.num_hidden_layers
    picked = list(range(0, n_teacher, 2))[:n_student]
    if len(picked) < n_student:
        raise DistillError(f"the student has {n_student} layers; every other layer of a {n_teacher}-layer "
                           f"teacher gives only {len(picked)}")
    try:
        model = AutoModelForCausalLM.from_config(student_config, **attn_kwargs(attn_implementation))
    except (ValueError, ImportError) as e:
        refused_attention(e, attn_implementation, teacher_dir)
        raise
    wanted = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                match = LAYER.match(name)
                if match:
                    layer = int(match.group(2))
                    if layer not in picked:
                        continue
                    name = f"{match.group(1)}{picked.index(layer)}{match.group(3)}"
                if name in wanted:
                    loaded[name] = f.get_tensor(name).to(wanted[name].dtype)
    missing = [k for k in wanted if k not in loaded and not _tied(model, k)]
    if missing:
        raise DistillError(f"the teacher's weights lack {len(missing)} student tensors (e.g. {missing[0]}); "
                           "the architectures do not match")
    model.load_state_dict(loaded, strict=False)
    return model


def _tied(model, name: str) -> bool:
    """The output head tied to the input embedding is loaded through it."""
    return getattr(model.config, "tie_word_embeddings", False) and name.endswith("lm_head.weight")
