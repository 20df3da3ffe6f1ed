"""contract.JobLock: it truncates and writes its file, so it opens only a regular file of this user
with one name, never through a link (a planted lock name must not reach anyone's file)."""

import os

import pytest

from pipeline.errors import DistillError
from pipeline.store.contract import JobLock

LOCK = ".lock.part-00000-of-00001"


def canary(tmp_path):
    path = tmp_path / "canary.txt"
    path.write_text("a user's file: must survive byte for byte\n")
    return path


def test_a_lock_is_created_held_and_written(tmp_path):
    lock = JobLock(tmp_path, 0, 1)
    assert (tmp_path / LOCK).read_text().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(DistillError, match="job 0 of 1 is already being written by pid"):
        JobLock(tmp_path, 0, 1)
    lock.release()
    JobLock(tmp_path, 0, 1).release()  # a lock left by a finished job is taken over


def test_a_symlink_planted_on_the_lock_name_is_refused(tmp_path):
    target = canary(tmp_path)
    (tmp_path / "out").mkdir()
    os.symlink(target, tmp_path / "out" / LOCK)
    with pytest.raises(DistillError, match=r"lock .*\.lock\.part-00000-of-00001 is a symbolic link: distill did not "
                                           r"write it"):
        JobLock(tmp_path / "out", 0, 1)
    assert target.read_text() == "a user's file: must survive byte for byte\n"
    os.unlink(tmp_path / "out" / LOCK)
    os.symlink(tmp_path / "nowhere", tmp_path / "out" / LOCK)  # dangling: O_CREAT would create the target
    with pytest.raises(DistillError, match="is a symbolic link"):
        JobLock(tmp_path / "out", 0, 1)
    assert not (tmp_path / "nowhere").exists()


def test_a_hard_link_to_a_users_file_is_refused(tmp_path):
    target = canary(tmp_path)
    (tmp_path / "out").mkdir()
    os.link(target, tmp_path / "out" / LOCK)
    with pytest.raises(DistillError, match="has 2 names"):
        JobLock(tmp_path / "out", 0, 1)
    assert target.read_text() == "a user's file: must survive byte for byte\n"


def test_a_lock_of_another_user_is_refused(tmp_path, monkeypatch):
    (tmp_path / LOCK).write_text("someone else's")
    if os.getuid() == 0:
        os.chown(tmp_path / LOCK, 12345, 12345)
    else:  # cannot give a file away: be someone else instead
        monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path / LOCK).st_uid + 1)
    with pytest.raises(DistillError, match=r"belongs to uid \d+, not to this user"):
        JobLock(tmp_path, 0, 1)
    assert (tmp_path / LOCK).read_text() == "someone else's"


def test_a_directory_under_the_lock_name_is_refused(tmp_path):
    (tmp_path / LOCK).mkdir()
    with pytest.raises(DistillError, match="is a directory"):
        JobLock(tmp_path, 0, 1)
