"""The tests' fork server (tests/forkserver.py): a forked ``distill`` run says and returns what a
fresh interpreter does, in a session of its own; the server stays usable (single-threaded), so the
tests that spawn runs keep its saving; a run that changes an import-time variable starts fresh."""

import os
import subprocess

from tests import conftest
from tests.forkserver import ForkedProcess


def both(args):
    """(output, exit status) of ``distill ARGS`` forked and launched fresh."""
    results = []
    for fresh in (False, True):
        process = conftest.spawn(args, fresh=fresh)
        assert isinstance(process, subprocess.Popen) == fresh, type(process)
        output, _ = process.communicate(timeout=120)
        results.append((output, process.returncode))
    return results


def test_a_forked_run_says_and_exits_as_a_fresh_one(tmp_path):
    forked, fresh = both(["inspect", tmp_path])  # one error line, status 2
    assert forked == fresh and forked[1] == 2 and forked[0].startswith("error: "), (forked, fresh)
    forked, fresh = both(["--help"])
    assert forked == fresh and forked[1] == 0 and "prepare" in forked[0]
    forked, fresh = both(["no-such-command"])
    assert forked == fresh and forked[1] == 2


def test_the_server_is_single_threaded_and_each_run_has_its_own_session(tmp_path):
    env = conftest.run_env()
    server = conftest._fork_server(env)
    assert server.usable and server.launchable(env)  # a library that starts a thread on import would end it
    process = conftest.spawn(["inspect", tmp_path])
    assert isinstance(process, ForkedProcess)
    assert os.getsid(process.pid) == process.pid
    process.communicate(timeout=60)
    assert process.poll() == 2


def test_a_changed_import_time_variable_starts_fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_SHOW_CPP_STACKTRACES", "1")
    process = conftest.spawn(["inspect", tmp_path])
    assert isinstance(process, subprocess.Popen)
    assert process.communicate(timeout=120)[0].startswith("error: ") and process.returncode == 2
