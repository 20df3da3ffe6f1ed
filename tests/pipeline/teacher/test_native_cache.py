"""The compiled stage-one kernel is loaded only from a directory, and a file, that are this user's alone.

Loading a shared library runs its constructors in the process, so a library another user planted
under the predictable name (``$TMPDIR/distill-native-<uid>/sparse_teacher-<key>.so``) must never be
loaded: the build is refused (stage one then uses torch operations) or compiled afresh."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pipeline.teacher import native

FLAGS = native.FLAGS  # the plain build: compiles everywhere cc does

PLANTED = r'''
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(CANARY, "w"); if (f) { fputs("planted library ran", f); fclose(f); }
}
'''

needs_cc = pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler")


@pytest.fixture
def tmp_only(tmp_path, monkeypatch) -> Path:
    """Make the first choice ($DISTILL_CACHE/native) unusable, so the build falls back to
    ``$TMPDIR/distill-native-<uid>``, with $TMPDIR in the test's directory."""
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DISTILL_CACHE", str(blocker))
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(mode=0o777)
    os.chmod(tmpdir, 0o1777)  # like /tmp: writable by all, sticky
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmpdir))
    return tmpdir / f"distill-native-{os.getuid()}"


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory) -> Path:
    """The kernel compiled once (the real compiler, the plain flags), for the stub compiler to hand out."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("prebuilt") / "kernel.so"
    subprocess.run([shutil.which("cc") or shutil.which("gcc"), "-O0", "-std=c11", "-fPIC", "-shared", str(native.SOURCE), "-o", str(out), "-lm"],
                   check=True)
    return out


@pytest.fixture(autouse=True)
def stub_compiler(tmp_path, monkeypatch, prebuilt) -> None:
    """$CC copies the prebuilt kernel to its -o argument: what is under test is where the library goes and
    what is loaded, not the compiler (one real compile per module instead of one per build)."""
    stub = tmp_path / "stub-cc"
    stub.write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "stub cc 1"; exit 0; }}\n'
                    f'while [ $# -gt 0 ]; do [ "$1" = -o ] && cp {prebuilt} "$2"; shift; done\n')
    stub.chmod(0o755)
    monkeypatch.setenv("CC", str(stub))


def library_name(tmp_path: Path, monkeypatch) -> str:
    """The name the build gives the kernel here (it hashes source, compiler, flags and CPU)."""
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "honest"))
    kernel, error = native.build(FLAGS)
    assert kernel is not None, error
    return kernel.path.name


def plant(directory: Path, name: str, canary: Path) -> Path:
    source = directory.parent / "planted.c"
    source.write_text(PLANTED)
    subprocess.run(["cc", f'-DCANARY="{canary}"', "-shared", "-fPIC", str(source), "-o", str(directory / name)],
                   check=True)
    return directory / name


@needs_cc
@pytest.mark.parametrize("how", ["other-users-dir", "symlink", "world-writable-parent"])
def test_a_directory_another_user_controls_is_never_used(tmp_path, monkeypatch, tmp_only, how):
    name = library_name(tmp_path, monkeypatch)
    canary = tmp_path / "canary"
    blocker = tmp_path / "cache-is-a-file"
    monkeypatch.setenv("DISTILL_CACHE", str(blocker))
    if how == "other-users-dir":
        if os.getuid() != 0:
            pytest.skip("making a directory of another user's needs root")
        tmp_only.mkdir(mode=0o777)
        plant(tmp_only, name, canary)
        os.chown(tmp_only, 12345, 12345)
        os.chown(tmp_only / name, 12345, 12345)
        expected = "belongs to uid 12345"
    elif how == "symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        plant(elsewhere, name, canary)
        tmp_only.symlink_to(elsewhere)
        expected = "symbolic link"
    else:
        os.chmod(tmp_only.parent, 0o777)  # writable by all, no sticky bit: the directory can be swapped
        tmp_only.mkdir(mode=0o700)
        plant(tmp_only, name, canary)
        expected = "without the sticky bit"
    kernel, error = native.build(FLAGS)
    assert kernel is None and expected in error, error
    assert not canary.exists()


@needs_cc
def test_a_library_this_user_did_not_write_is_compiled_afresh(tmp_path, monkeypatch, tmp_only):
    name = library_name(tmp_path, monkeypatch)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache-is-a-file"))
    canary = tmp_path / "canary"
    tmp_only.mkdir(mode=0o700)
    planted = plant(tmp_only, name, canary)
    os.chmod(planted, 0o777)  # in our own directory, but writable by anyone
    kernel, error = native.build(FLAGS)
    assert kernel is not None, error
    assert kernel.path == planted and stat.S_IMODE(planted.stat().st_mode) == 0o755
    assert not canary.exists()


@needs_cc
def test_the_fallback_is_created_private_and_works(tmp_path, monkeypatch, tmp_only):
    kernel, error = native.build(FLAGS)
    assert kernel is not None, error
    assert kernel.path.parent == tmp_only
    assert stat.S_IMODE(tmp_only.stat().st_mode) == 0o700


@needs_cc
def test_an_own_cache_made_under_a_lax_umask_is_closed(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "native").mkdir(parents=True)
    os.chmod(cache / "native", 0o777)
    monkeypatch.setenv("DISTILL_CACHE", str(cache))
    kernel, error = native.build(FLAGS)
    assert kernel is not None, error
    assert stat.S_IMODE((cache / "native").stat().st_mode) == 0o700
