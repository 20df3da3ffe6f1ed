"""lm-evaluation-harness reads the demo sets through data/lm_eval/ and agrees with `distill eval`.

Slow and optional: needs the [lmeval] extra (`make test-slow` installs it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

# (distill task, distill metric, lm-eval task, lm-eval metric, transform of distill's value)
PAIRS = [
    ("heldout", "bits_per_byte", "distill_demo_heldout", "bits_per_byte", lambda v: v),
    ("heldout", "bits_per_byte", "distill_demo_heldout", "byte_perplexity", lambda v: 2 ** v),
    ("heldout", "word_ppl", "distill_demo_heldout", "word_perplexity", lambda v: v),
    ("lambada", "acc", "distill_demo_lambada", "acc", lambda v: v),
    ("lambada", "ppl", "distill_demo_lambada", "perplexity", lambda v: v),
    ("hellaswag", "acc", "distill_demo_hellaswag", "acc", lambda v: v),
    ("hellaswag", "acc_norm", "distill_demo_hellaswag", "acc_norm", lambda v: v),
    ("storycloze", "acc", "distill_demo_storycloze", "acc", lambda v: v),
    ("storycloze", "acc_norm", "distill_demo_storycloze", "acc_norm", lambda v: v),
]


def test_lm_eval_agrees_with_distill_eval(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    model, limit = ROOT / "data" / "models" / "teacher", "25"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    lm_eval = Path(sys.executable).with_name("lm_eval")
    subprocess.run([str(lm_eval), "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
                    "--include_path", "data/lm_eval", "--tasks", "distill_demo", "--limit", limit,
                    "--batch_size", "8", "--device", "cpu", "--output_path", str(tmp_path / "lm")],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    theirs = json.loads(next((tmp_path / "lm").rglob("results_*.json")).read_text())["results"]
    result = run_cli("eval", "--model", model, "--out", tmp_path / "ours.json", "--limit", limit,
                     "--tasks", "heldout,lambada,hellaswag,storycloze")
    assert result.exit_code == 0, result.output
    ours = json.loads((tmp_path / "ours.json").read_text())["tasks"]
    for task, metric, their_task, their_metric, transform in PAIRS:
        assert transform(ours[task][metric]) == pytest.approx(theirs[their_task][f"{their_metric},none"], rel=1e-4), \
            (task, metric)
