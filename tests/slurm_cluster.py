"""A single-node SLURM cluster for the tests: Debian's `munge` and `slurm-wlm` (installed with
apt-get when missing), started as root on this machine with a minimal `slurm.conf` in a temporary
folder, on loopback ports: munged, slurmctld and slurmd. `start` returns once `sinfo` shows the
node idle (not after a sleep); `stop` cancels what still runs and stops the three daemons.

    cluster = SlurmCluster.start()
    cluster.run("sbatch", "--parsable", "job.sbatch", cwd=folder)   # SLURM_CONF set for it
    ...
    cluster.stop()

The node is declared as `slurmd -C` measures the machine (2 CPUs here), as a real cluster's is,
so a request that does not fit a real small node is refused here too. Tasks are bound to their
CPUs (task/affinity: sched_setaffinity, no cgroups, which would need a cgroup.conf and a
delegated cgroup tree in this container); processes are tracked by their parent pids
(proctrack/linuxproc). The node has four fake GPUs, as SLURM's own test suite schedules them:
`gres.conf` with AutoDetect=off and File= naming character devices made here (copies of
/dev/null), so `--gres=gpu:1` is scheduled and CUDA_VISIBLE_DEVICES set, with no GPU behind it.
Accounting is SLURM's job completion log (jobcomp/filetxt), which `sacct --completion` reads:
slurmdbd would need a MySQL server. The log holds a job's last state, one record per run.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
COMMANDS = ["munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "scancel",
            "sacct"]
SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # the daemons are in sbin, which a user's PATH may lack

# %(name)s: filled in by `start`.
CONFIG = """\
ClusterName=searchtest
SlurmctldHost=%(node)s(127.0.0.1)
SlurmctldPort=%(ctld_port)d
SlurmdPort=%(slurmd_port)d
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=%(folder)s/munge.socket
StateSaveLocation=%(folder)s/state
SlurmdSpoolDir=%(folder)s/spool
SlurmctldPidFile=%(folder)s/slurmctld.pid
SlurmdPidFile=%(folder)s/slurmd.pid
SlurmctldLogFile=%(folder)s/slurmctld.log
SlurmdLogFile=%(folder)s/slurmd.log
# No cgroups in a container: processes are tracked by their parent pids; tasks are bound to
# the CPUs they were given with sched_setaffinity.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
# CPUs are what jobs are given; memory is not tracked (a job's --mem must only fit the node).
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Schedules at each submit and end (no backfill pass to wait for).
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=%(folder)s/jobcomp.log
# Jobs stay in slurmctld's memory (scontrol show job) long after they end.
MinJobAge=3600
ReturnToService=2
# The node as `slurmd -C` measures it (CPUs, sockets, cores, threads, memory), with four GPUs.
%(node_line)s NodeAddr=127.0.0.1 Gres=gpu:%(gpus)d State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
GPUS = 4
GRES_CONFIG = """\
AutoDetect=off
NodeName=%(node)s Name=gpu File=%(folder)s/fake-gpu[0-%(last)d]
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unavailable() -> str | None:
    """Why no cluster can be started here (a reason for pytest.skip), after installing the
    packages with apt-get where they are missing; None when it can."""
    if os.geteuid() != 0:
        return "a SLURM cluster is started as root (slurmd runs jobs as their users)"
    if all(shutil.which(command, path=SEARCH_PATH) for command in COMMANDS):
        return None
    if not shutil.which("apt-get"):
        return f"SLURM is not installed and there is no apt-get to install {' '.join(PACKAGES)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return f"could not install {' '.join(PACKAGES)}: {' '.join(command)} said {done.stderr[-500:]}"
    return None


class SlurmCluster:
    """munged, slurmctld and slurmd, each a child process of the test, on one config."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = folder / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """The environment SLURM's commands need to find this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.config))

    @classmethod
    def start(cls, timeout: float = 60) -> SlurmCluster:
        folder = Path(tempfile.mkdtemp(prefix="search-slurm-"))  # 0700: the munge key is here
        cluster = cls(folder)
        try:
            cluster._start(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self, timeout: float) -> None:
        folder = self.folder
        for name in ("state", "spool"):
            (folder / name).mkdir()
        key = folder / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)  # munged refuses a key others can read
        measured = subprocess.run([shutil.which("slurmd", path=SEARCH_PATH), "-C"],
                                  capture_output=True, text=True, timeout=30, check=True)
        node_line = re.sub(r"^NodeName=\S+", f"NodeName={self.node}", measured.stdout.splitlines()[0])
        for index in range(GPUS):  # character devices, as GPUs are: copies of /dev/null
            os.mknod(folder / f"fake-gpu{index}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (folder / "gres.conf").write_text(GRES_CONFIG % {"node": self.node, "folder": folder,
                                                         "last": GPUS - 1})
        self.config.write_text(CONFIG % {"node": self.node, "folder": folder, "node_line": node_line,
                                         "gpus": GPUS, "ctld_port": _free_port(),
                                         "slurmd_port": _free_port()})
        # In the foreground (-F, -D), so that each daemon is this process's child to stop.
        self._daemon("munged", ["munged", "-F", "--force", f"--key-file={key}",
                                f"--socket={folder / 'munge.socket'}",
                                f"--pid-file={folder / 'munged.pid'}",
                                f"--log-file={folder / 'munged.log'}",
                                f"--seed-file={folder / 'munged.seed'}"])
        self._wait(lambda: (folder / "munge.socket").exists(), "munged", timeout)
        self._daemon("slurmctld", ["slurmctld", "-D", "-i"])
        self._daemon("slurmd", ["slurmd", "-D"])
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).strip() == "idle",
                   "the node to be idle in sinfo", timeout)

    def _daemon(self, name: str, command: list[str]) -> None:
        with open(self.folder / f"{name}.out", "w") as out:
            self.processes[name] = subprocess.Popen(
                [shutil.which(command[0], path=SEARCH_PATH), *command[1:]], env=self.env,
                stdout=out, stderr=subprocess.STDOUT)

    def _wait(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.05)  # the poll interval
        raise RuntimeError(f"waited {timeout:.0f} s for {what}:\n{self.logs()}")

    def run(self, *command: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            check: bool = True) -> str:
        """A SLURM command (sbatch, squeue, scontrol, ...) on this cluster; its stdout."""
        done = subprocess.run([shutil.which(command[0], path=SEARCH_PATH), *command[1:]],
                              env={**(env or os.environ), "SLURM_CONF": str(self.config)},
                              cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}: {done.stderr}")
        return done.stdout

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
                         for path in sorted(self.folder.glob("*.log")) + sorted(self.folder.glob("*.out")))

    def stop(self) -> None:
        """Cancels the jobs still there, then stops slurmd, slurmctld and munged."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--user=root", check=False)
            deadline = time.monotonic() + 60
            while self.run("squeue", "-h", check=False).strip() and time.monotonic() < deadline:
                time.sleep(0.1)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
