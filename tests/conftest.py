import collections
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The fused GPU kernels (pipeline/teacher/fused_gpu.py) run on CPU tensors under Triton's interpreter,
# which triton reads when the kernels are defined: before any test imports the project. A machine
# with a GPU runs them compiled instead.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1") or not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer"
HELDOUT = ROOT / "data" / "corpus" / "heldout.jsonl.gz"


@pytest.fixture(scope="session")
def heldout_docs() -> list[str]:
    with gzip.open(HELDOUT, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def write_corpus(path: Path, docs: list[str]) -> Path:
    """``docs`` as a JSONL corpus (text under "text")."""
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def chat_tokenizer(path: Path, template: str = CHAT_TEMPLATE) -> Path:
    """A copy of the project's tokenizer (which has no chat template) with ``template`` as its chat template."""
    import shutil

    shutil.copytree(TOKENIZER, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": template}))
    return path


def write_tiny_model_config(path: Path) -> Path:
    """A Llama of ~0.3M parameters at the project's vocabulary: fast enough for loop tests on CPU."""
    path.write_text(json.dumps({
        "model_type": "llama", "vocab_size": 8192, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
    }))
    return path


@pytest.fixture
def small_corpus(tmp_path, heldout_docs) -> Path:
    """A real-text JSONL corpus of 60 held-out documents (about 18k tokens)."""
    return write_corpus(tmp_path / "corpus.jsonl", heldout_docs[:60])


@pytest.fixture
def tiny_model_config(tmp_path) -> Path:
    """:func:`write_tiny_model_config` in the test's directory."""
    return write_tiny_model_config(tmp_path / "tiny.json")


def make_teacher(path, vocab=8192, padded_argmax=False, scale=40.0):
    """A small random Llama whose output head is scaled up so its distributions are peaked (like a
    trained teacher's): tail masses then span many orders of magnitude."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                  max_position_embeddings=128, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
        if vocab > 8192:
            model.lm_head.weight[8192:] = 0.0 if not padded_argmax else model.lm_head.weight[:vocab - 8192] * 10
    model.save_pretrained(str(path))
    return path


def run_cli(*args: str):
    """Run ``distill ARGS`` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from stages.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    """The CLI's error: exit status 2, exactly one ``error: …`` line (progress bars may precede it),
    no traceback. Returns that line."""
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def reseal_index(path: Path, edit) -> Path:
    """Apply ``edit(body)`` to the index (or partial index) at ``path`` and write it back sealed with a
    fresh digest: what a tool that rewrites the index on purpose writes (so that the checks behind
    the digest are what a test reaches). Returns ``path``."""
    from pipeline.store.contract import sealed_text

    body = json.loads(Path(path).read_text())
    edit(body)
    Path(path).write_text(sealed_text(body))
    return Path(path)


def tree_digest(root: Path) -> str:
    """sha256 of every file's relative path and bytes: equal digests mean byte-identical trees."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


_FORK_SERVER = None


def run_env() -> dict[str, str]:
    """The environment of a ``distill`` run a test starts: this one, offline, the project importable,
    one thread."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _fork_server(env: dict[str, str]):
    """This pytest worker's fork server (tests/forkserver.py), started on first use; None where
    ``DISTILL_TEST_FRESH=1`` asks for a fresh interpreter every time."""
    global _FORK_SERVER
    if os.environ.get("DISTILL_TEST_FRESH") == "1":
        return None
    if _FORK_SERVER is None:
        import atexit

        from tests.forkserver import Server

        _FORK_SERVER = Server(ROOT, env)
        atexit.register(_FORK_SERVER.close)
    return _FORK_SERVER


def spawn(args, torchrun: bool = False, shell: str = "", fresh: bool = False):
    """``distill ARGS`` in a subprocess of its own session (one thread), output captured; with
    ``torchrun`` two processes under torch.distributed.run; with ``shell`` (say ``trap "" USR1; exec``)
    launched as ``bash -c 'SHELL launcher ARGS'``, as a batch script would.

    A plain run is forked from this worker's fork server (tests/forkserver.py: the same
    ``python -m stages.cli ARGS`` with its imports already done, which saves ~5 s of CPU a run);
    ``fresh`` (and torchrun, a shell) launches a new interpreter, for what only one can show."""
    env = run_env()
    args = [str(a) for a in args]
    if not (torchrun or shell or fresh):
        server = _fork_server(env)
        if server is not None and server.launchable(env):
            process = server.spawn(args, env, ROOT)
            if process is not None:
                return process
    launcher = [sys.executable, "-m", "stages.cli"]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(29500 + os.getpid() % 1000), "-m", "stages.cli"]
    if shell:
        launcher = ["bash", "-c", f'{shell} "$@"', "bash", *launcher]
    return subprocess.Popen(launcher + args, env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def spawn_ranks(args):
    """``distill ARGS`` as two ranks of one run (as ``spawn(torchrun=True)``), for a test of what several processes compute
    (the numbers, checkpoints, resume): forked from the fork server with the environment torchrun
    gives its workers (tests/forkserver.py, ``rank_env``), which saves the launcher and ~5 s of CPU a
    rank. What torchrun itself does (signals, pre-emption, batch scripts) is tested with
    ``spawn(torchrun=True)``; so is everything here where the server cannot fork."""
    import socket as socket_lib

    from tests.forkserver import RANK_VARIABLES, ForkedRanks, rank_env

    env = run_env()
    server = _fork_server(env)
    with socket_lib.socket() as probe:  # a free port for rank 0's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    envs = [rank_env(env, rank, 2, port) for rank in range(2)]
    if server is None or not all(server.launchable(e, RANK_VARIABLES) for e in envs):
        return spawn(args, torchrun=True)
    ranks = []
    for e in envs:
        process = server.spawn([str(a) for a in args], e, ROOT)
        if process is None:
            for started in ranks:
                started.kill()
            return spawn(args, torchrun=True)
        ranks.append(process)
    return ForkedRanks(ranks)


def kill_when(process, ready) -> None:
    """SIGKILL ``process`` (the trainer alone, as a preempting scheduler would) as soon as
    ``ready()`` is true; fails if the run ended first, since then nothing was interrupted."""
    deadline = time.time() + 120
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


# A tokenizer that begins every text with its BOS, as Llama 3's and Gemma's do (``style``: their
# special tokens' names; Gemma's also has a pad token), built from the project's vocabulary.
BOS_STYLES = {"llama": ("<|begin_of_text|>", "<|end_of_text|>", []),
              "gemma": ("<bos>", "<eos>", ["<pad>"])}


def bos_tokenizer(path: Path, style: str = "llama") -> Path:
    """The project's byte-level BPE with ``style``'s BOS and EOS added and a post-processor that puts
    the BOS before every text (``encode("x")`` begins with it); saved as a Hugging Face directory."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos, extra = BOS_STYLES[style]
    tokenizer = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    tokenizer.add_special_tokens([bos, eos, *extra])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos,
                                      pad_token=extra[0] if extra else None)
    wrapped.save_pretrained(str(path))
    return path


def make_model(path: Path, arch: str, vocab: int, **extra) -> Path:
    """A small random causal LM of ``arch`` (``llama`` or ``gemma2``: soft-capped logits and attention,
    every other layer a sliding window of 4 so that the window is exercised in short rows)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "gemma2":
        common |= dict(head_dim=16, sliding_window=4, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                       layer_types=["sliding_attention", "full_attention"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **(common | extra)))
    model.save_pretrained(str(path))
    return path


DURATIONS = ROOT / "tests" / "durations.json"  # seconds a file's tests take, for the scheduler below
_durations: collections.Counter = collections.Counter()


def pytest_runtest_logreport(report) -> None:
    """Each test's setup, call and teardown time, by file (under xdist the controller sees every worker's)."""
    _durations[report.nodeid.split("::", 1)[0]] += report.duration


def pytest_sessionfinish(session) -> None:
    """With ``DISTILL_TEST_DURATIONS=1`` (``make test-durations``), write each file's seconds to
    tests/durations.json, the order the scheduler dispatches files in."""
    if os.environ.get("DISTILL_TEST_DURATIONS") == "1" and _durations and not hasattr(session.config, "workerinput"):
        DURATIONS.write_text(json.dumps({k: round(v, 1) for k, v in sorted(_durations.items())}, indent=0) + "\n")


def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (`make test` runs two workers) a file's tests run on one worker, so that its
    module-scoped fixtures (a trained store, a teacher run) are built once, not once a worker; and the
    files that need the machine's one real SLURM cluster (tests/slurm/) run on one worker, one after
    another, first: they are the longest chain (~2.5 min), which must not start when the other worker
    has nothing left to do. The other files follow longest first, by tests/durations.json (a file it
    does not list counts 0.3 s a test), so that no long file is left for the end while the other
    worker idles.

    (The `xdist_group` marks this replaces did nothing here: pytest 9 keeps a test's id where xdist 3.8
    no longer writes the group into it, and every file's tests were spread over both workers.)"""
    from xdist.scheduler import LoadScopeScheduling

    known = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}

    class ByFileSlurmFirst(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/slurm" if path.startswith("tests/slurm/") else path

        def schedule(self) -> None:
            if self.collection is None and self.collection_is_completed and self.config.option.loadscopereorder:
                self.config.option.loadscopereorder = False  # the order below is the queue's
                for node, collection in self.registered_collections.items():
                    count = collections.Counter(map(self._split_scope, collection))
                    seconds = {scope: known.get(scope, 0.3 * n) for scope, n in count.items()}
                    seconds["tests/slurm"] = float("inf")  # first
                    self.registered_collections[node] = sorted(collection, key=lambda i: -seconds[self._split_scope(i)])
            super().schedule()

    return ByFileSlurmFirst(config, log)
