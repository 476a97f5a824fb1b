"""A real SLURM cluster on this machine for the tests: munged, slurmctld and slurmd started from a
temporary directory (configuration, keys, state, logs and pid files all there, nothing in /etc),
and stopped again by their process ids.

Node `local` runs in this machine's network namespace (partition `debug`). When network namespaces
are available (root, iproute2), nodes `n1` and `n2` each run their slurmd inside their own namespace
and UTS namespace (own hostname, own address 10.77.0.1/2 on a bridge that also carries the
controller's 10.77.0.254), partition `multi`: two SLURM nodes that talk to each other over a
network, as on a cluster. `Cluster.multi_error` says why they could not be set up.

Debian's slurm-wlm and munge are installed with apt-get when slurmctld is missing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BRIDGE, CTL_ADDR, NODE_ADDRS = "b2bbr0", "10.77.0.254", {"n1": "10.77.0.1", "n2": "10.77.0.2"}
CPUS = 2


def sh(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, **kwargs)


def installed() -> bool:
    return bool(shutil.which("slurmctld") and shutil.which("munged"))


def install() -> None:
    """Debian's packages, only when they are missing (CI runs as root on a fresh Debian). One
    install at a time (an flock): conftest.py starts one in the background when the session
    starts, and the cluster fixture's call waits for it to end."""
    with open(Path(tempfile.gettempdir()) / "b2b-slurm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed():
            return
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sh("apt-get", "update", env=env)
        sh("apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge", env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.namespaces: list[str] = []
        self.multi_error: str | None = None
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ------------------------------------------------------------ start

    def start(self) -> Cluster:
        install()
        self.root.mkdir(parents=True, exist_ok=True)
        self._munge()
        try:
            self._network()
        except (OSError, subprocess.CalledProcessError) as err:
            self.multi_error = f"network namespaces: {getattr(err, 'stderr', '') or err}".strip()
            self._remove_network()
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd-local", ["slurmd", "-D", "-f", str(self.conf), "-N", "local"])
        for node in self.nodes[1:]:
            # own network and UTS namespaces: own address and hostname (nsenter, unlike `ip netns
            # exec`, keeps this machine's /sys, where slurmd finds its cgroups)
            self._spawn(f"slurmd-{node}", ["nsenter", f"--net=/run/netns/b2b-{node}", "unshare", "--uts", "sh", "-c",
                                            f"hostname {node} && exec slurmd -D -f {self.conf} -N {node}"])
        self.wait_idle()
        return self

    @property
    def nodes(self) -> list[str]:
        return ["local"] + ([] if self.multi_error else list(NODE_ADDRS))

    def _munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.socket = self.root / "munge.socket"
        self._spawn("munged", ["munged", "-F", "--force", f"--key-file={key}", f"--socket={self.socket}",
                               f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'munged.log'}",
                               f"--seed-file={self.root / 'munged.seed'}"])
        deadline = time.time() + 20
        while not self.socket.exists():
            if time.time() > deadline:
                raise RuntimeError(f"munged did not start: {(self.root / 'munged.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def _network(self) -> None:
        """A bridge holding the controller's address and one veth per node namespace."""
        self._remove_network()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{CTL_ADDR}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for node, addr in NODE_ADDRS.items():
            ns = f"b2b-{node}"
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "link", "add", f"b2bv-{node}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", f"b2bv-{node}", "master", BRIDGE, "up")
            for cmd in (["addr", "add", f"{addr}/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                        ["link", "set", "lo", "up"]):
                sh("ip", "netns", "exec", ns, "ip", *cmd)

    def _remove_network(self) -> None:
        sh("ip", "link", "del", BRIDGE, check=False)
        for node in NODE_ADDRS:
            sh("ip", "netns", "del", f"b2b-{node}", check=False)
        self.namespaces = []

    def _write_conf(self) -> None:
        r = self.root
        ctl = CTL_ADDR if not self.multi_error else "127.0.0.1"
        nodes = [f"NodeName=local NodeHostname={socket.gethostname()} NodeAddr={ctl} CPUs={CPUS} State=UNKNOWN"]
        nodes += [f"NodeName={n} NodeAddr={a} CPUs={CPUS} State=UNKNOWN" for n, a in NODE_ADDRS.items()
                  if n in self.nodes]
        parts = ["PartitionName=debug Nodes=local Default=YES MaxTime=INFINITE State=UP"]
        if not self.multi_error:
            parts.append("PartitionName=multi Nodes=n1,n2 MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join([
            "ClusterName=b2btest",
            f"SlurmctldHost={socket.gethostname()}({ctl})",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            # cred_expire: a requeued job waits this long before it may start again (default 120 s)
            "AuthType=auth/munge", f"AuthInfo=socket={self.socket},cred_expire=10", "CredType=cred/munge",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool-%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill", "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={r / 'jobcomp.txt'}",
            "MinJobAge=3600", "KillWait=10", "InactiveLimit=0", "SchedulerParameters=sched_interval=1",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            *nodes, *parts, ""]))
        (r / "plugstack.conf").write_text("")
        for d in ["state", *(f"spool-{n}" for n in self.nodes)]:
            (r / d).mkdir(exist_ok=True)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while True:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
            idle = dict(zip(states[::2], states[1::2]))
            if all(idle.get(n, "").startswith("idle") for n in self.nodes):
                return
            if time.time() > deadline:
                logs = "".join(p.read_text()[-1500:] for p in self.root.glob("*.out"))
                raise RuntimeError(f"SLURM nodes not idle after {timeout}s: {idle}\n{logs}")
            time.sleep(0.5)

    # ------------------------------------------------------------ use

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, check=check, env=self.env)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...): sacct needs slurmdbd."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait_job(self, job_id: str, timeout: float = 300, restarts: int = 0) -> dict:
        """The job's record once it has ended, after at least `restarts` requeues."""
        until = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until and int(info.get("Restarts", 0)) >= restarts:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout}s")

    # ------------------------------------------------------------ stop

    def stop(self) -> None:
        """Stop every daemon this cluster started, by process id, newest first; then the network."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []
        if not self.multi_error:
            self._remove_network()


if __name__ == "__main__" and sys.argv[1:] == ["install"]:  # conftest.py's background install
    install()
