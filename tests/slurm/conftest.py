"""A real single-node SLURM for the tests: slurmctld and slurmd from Debian's packages (`make
slurm-deps`), started in the foreground as root with a configuration of their own, torn down by
their process ids when the session ends. Where it cannot start, every test that needs it is
skipped with the reason — never passed silently.

Facts of this machine kind: no systemd or cgroups, so ``proctrack/linuxproc`` and ``task/none``;
``NodeName`` must equal ``hostname -s``; the state and spool directories are made fresh each time
(old jobs would come back); ``kill_invalid_depend`` cancels a job whose dependency failed instead of
leaving it pending forever; ``scontrol show job`` works without accounting storage, ``sacct`` would not.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

CONF = """\
ClusterName=distill-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldPort={port}
SlurmdPort={port1}
DependencyParameters=kill_invalid_depend
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={host} CPUs=8 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def run(self, *args: str) -> str:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60, check=True).stdout

    def job(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job`'s records (one per array task) as key=value dicts."""
        done = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True)
        records = []
        for line in done.stdout.splitlines():
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            records.append(fields)
        return records

    def wait(self, job_ids, timeout: float = 300, until=None) -> dict[str, list[str]]:
        """Wait until every job (every task of an array) has ended, or ``until()`` is true; their states."""
        deadline = time.time() + timeout
        while True:
            if until is not None and until():  # checked first and often: a moment not to miss
                return {}
            states = {j: [r.get("JobState", "?") for r in self.job(j)] for j in job_ids}
            if until is not None and until():
                return states
            ended = all(s and all(x in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
                                  for x in s) for s in states.values())
            if ended or time.time() > deadline:
                return states
            time.sleep(0.05 if until is not None else 1)


def _start(root: Path) -> Cluster | str:
    """A started cluster, or why not."""
    if os.geteuid() != 0:
        return "the SLURM daemons need root"
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed (make slurm-deps: apt-get install slurmctld slurmd slurm-client)"
    for sub in ("state", "spool"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True)
    port = 17000 + os.getpid() % 2000
    (root / "slurm.conf").write_text(CONF.format(host=socket.gethostname().split(".")[0], root=root,
                                                 port=port, port1=port + 1))
    cluster = Cluster(root)
    cluster.daemons = [subprocess.Popen([daemon, "-D", *extra], env=cluster.env, stdout=open(root / f"{daemon}.out", "w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
                       for daemon, extra in (("slurmctld", ["-i"]), ("slurmd", []))]
    deadline = time.time() + 30
    while time.time() < deadline:
        done = subprocess.run(["sinfo", "-h", "-o", "%t"], env=cluster.env, capture_output=True, text=True)
        if done.stdout.strip() in ("idle", "mix", "alloc"):
            return cluster
        time.sleep(0.5)
    _stop(cluster)
    tail = " | ".join((root / "slurmctld.out").read_text().splitlines()[-3:])
    return f"slurmctld/slurmd did not come up in 30 s ({tail})"


def _stop(cluster: Cluster) -> None:
    """Cancel what is left (a job step would outlive its slurmd), then stop the daemons."""
    subprocess.run(["scancel", "--user", "root"], env=cluster.env, capture_output=True)
    deadline = time.time() + 15
    while time.time() < deadline:
        done = subprocess.run(["squeue", "-h"], env=cluster.env, capture_output=True, text=True)
        if done.returncode != 0 or not done.stdout.strip():
            break
        time.sleep(0.5)
    for process in cluster.daemons:
        process.terminate()
    for process in cluster.daemons:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    started = _start(tmp_path_factory.mktemp("slurm"))
    if isinstance(started, str):
        pytest.skip(f"no SLURM: {started}")
    yield started
    _stop(started)
