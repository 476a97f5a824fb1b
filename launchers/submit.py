"""`b2b submit RECIPE`: the recipe becomes SLURM jobs rendered from the templates in slurm/.

The recipe stays the one source of truth: the job script names it (with its --set overrides),
its run directory and the resources, nothing else. Everything that can be wrong is checked on
the login node, before anything is queued: the recipe, `sbatch` on PATH, the partition, and
whether it has the nodes and the GPUs (or, on CPU nodes, the cores) asked for.

- Every training job waits (--dependency=afterok) for a CPU job that prepares its data (`b2b data
  prepare`, slurm/prepare.sbatch; --prepare-partition, --prepare-cpus), so that GPUs never wait
  on tokenisation; the training job then finds the cache entry built.
- An ordinary recipe: one training job. A two-stage recipe (stage1.steps > 0): two jobs, stage 1 stops
  at stage1.steps (train.stop_at) and stage 2 resumes from its checkpoint after it succeeded
  (--dependency=afterok).
- A recipe set (recipes/sets/*.yaml, see launchers/run.py): the source's job, a job array with
  one task per method and seed, then `b2b report` once every task succeeded.
- Every training job is submitted with --requeue and --signal=B:USR1@SECONDS: on the signal (or
  before the time limit) the workers checkpoint, the entrypoint requeues the job and the
  requeued job resumes from that checkpoint (`b2b train --resume auto`).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from growth import B2BError

from . import config, runlock
from .checkpoint import EXIT_STOPPED, RunDir

SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"


@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int | None = None  # processes per node: GPUs, or CPU processes on CPU-only nodes
    partition: str | None = None  # default: the cluster's default partition
    time: str = "1:00:00"
    account: str | None = None
    signal_seconds: int = 120  # USR1 this long before the time limit: time to save a checkpoint
    cpus_per_node: int | None = None  # default: the partition's (the smallest node's)
    prepare_partition: str | None = None  # the data preparation job's (default: the training partition)
    prepare_cpus: int | None = None  # its cores (default: that partition's smallest node's)


@dataclass
class Partition:
    name: str
    nodes: int
    cpus: int  # per node (the smallest node)
    gpus: int  # per node (the smallest node)


@dataclass
class Job:
    """One sbatch call: its script, and the jobs (by index in the plan) it waits for."""
    name: str
    script: str
    log: str
    after: list[int] = field(default_factory=list)
    tensorboard: str | None = None
    run_dirs: list[Path] = field(default_factory=list)  # what it trains


class ClusterError(B2BError):
    """What the cluster cannot do as asked: a partition too small, a refused submission."""


class NoController(ClusterError):
    """SLURM cannot be asked: its commands are missing or the controller does not answer."""


def read_partitions() -> dict[str, tuple[Partition, bool]]:
    """Every partition from sinfo: (its sizes, whether it is the default)."""
    if shutil.which("sinfo") is None:
        raise NoController("sinfo: not found on PATH; run b2b submit on a SLURM login node")
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%D|%c|%G"], capture_output=True, text=True)
    if out.returncode != 0:
        why = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode
        raise NoController(f"sinfo failed: {why}; is slurmctld reachable?")
    found: dict[str, tuple[Partition, bool]] = {}
    for line in out.stdout.splitlines():  # one line per group of alike nodes
        name, nodes, cpus, gres = line.strip().split("|")
        default, name, nodes, cpus = name.endswith("*"), name.rstrip("*"), int(nodes), int(cpus.rstrip("+"))
        gpus = sum(int(m) for m in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        if name in found:
            p = found[name][0]
            p.nodes, p.cpus, p.gpus = p.nodes + nodes, min(p.cpus, cpus), min(p.gpus, gpus)
        else:
            found[name] = (Partition(name, nodes, cpus, gpus), default)
    return found


def check_resources(res: Resources) -> Partition:
    """The partition the job goes to, once it is known to fit; fills res.gpus_per_node."""
    if shutil.which("sbatch") is None:
        raise NoController("sbatch: not found on PATH; run b2b submit on a SLURM login node "
                           "(or use --dry-run to see the job scripts)")
    partitions = read_partitions()
    name = res.partition or next((n for n, (_, default) in partitions.items() if default), None)
    if name not in partitions:
        raise ClusterError(f"--partition {name}: no such partition; this cluster has {', '.join(partitions)}")
    part = partitions[name][0]
    if res.nodes > part.nodes:
        raise ClusterError(f"--nodes {res.nodes}: partition {name} has {part.nodes} node(s)")
    per_node, what = (part.gpus, "GPU(s)") if part.gpus else (part.cpus, "CPU core(s) and no GPU")
    res.gpus_per_node = res.gpus_per_node or (part.gpus or 1)
    if res.gpus_per_node > per_node:
        raise ClusterError(f"--gpus-per-node {res.gpus_per_node}: the nodes of partition {name} have {per_node} {what}")
    if res.cpus_per_node is not None and res.cpus_per_node > part.cpus:
        raise ClusterError(f"--cpus-per-node {res.cpus_per_node}: the nodes of partition {name} have {part.cpus}")
    res.partition = name
    prep = res.prepare_partition or name
    if prep not in partitions:
        raise ClusterError(f"--prepare-partition {prep}: no such partition; this cluster has {', '.join(partitions)}")
    cores = partitions[prep][0].cpus
    if res.prepare_cpus is not None and res.prepare_cpus > cores:
        raise ClusterError(f"--prepare-cpus {res.prepare_cpus}: the nodes of partition {prep} have {cores}")
    res.prepare_partition, res.prepare_cpus = prep, res.prepare_cpus or cores
    return part


def assumed_partition(res: Resources) -> Partition:
    """What a dry run without a controller renders: the partition the flags describe."""
    procs = res.gpus_per_node or 1
    res.prepare_cpus = res.prepare_cpus or res.cpus_per_node or procs
    return Partition(res.partition or "(default)", res.nodes, res.cpus_per_node or procs, res.gpus_per_node or 0)


def render(template: str, **values: str) -> str:
    """slurm/<template> with each @NAME@ replaced; a placeholder without a value is a bug here."""
    text = (SLURM_DIR / template).read_text()
    missing = set(re.findall(r"@([A-Z_]+)@", text)) - set(values)
    if missing:
        raise KeyError(f"slurm/{template}: no value for {sorted(missing)}")
    return re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], text)


def header_values(name: str, log: Path, res: Resources, part: Partition, extra: list[str],
                  partition: str | None = None) -> dict:
    partition = partition or res.partition
    extra = [*extra, *([f"--partition={partition}"] if partition else []),
             *([f"--account={res.account}"] if res.account else [])]
    return dict(JOB_NAME=name, TIME=res.time, WORKDIR=shlex.quote(str(Path.cwd())),
                LOG=str(log), PYTHON=shlex.quote(sys.executable),
                EXTRA="\n".join(f"#SBATCH {x}" for x in extra))


def train_job(name: str, runs: list[tuple[str, Path, list[str]]], log: Path, res: Resources,
              part: Partition, after: list[int] = ()) -> Job:
    """A training job; with several runs, a job array whose task i trains runs[i]."""
    procs = res.gpus_per_node or 1
    extra = [f"--gres=gpu:{procs}"] if part.gpus else []
    if len(runs) > 1:
        extra.append(f"--array=0-{len(runs) - 1}")

    def select(recipe: str, run_dir: Path, sets: list[str]) -> str:
        args = " ".join(shlex.quote(f"--set={s}") for s in sets)
        return f"recipe={shlex.quote(recipe)} run_dir={shlex.quote(str(run_dir))} sets=({args})"
    if len(runs) == 1:
        choose = select(*runs[0])
    else:
        cases = "".join(f"    {i}) {select(*run)} ;;\n" for i, run in enumerate(runs))
        choose = f'case "$SLURM_ARRAY_TASK_ID" in\n{cases}esac'
    script = render("train.sbatch", **header_values(name, log, res, part, extra), NODES=str(res.nodes),
                    PROCS_PER_NODE=str(procs), CPUS_PER_TASK=str(max(1, (res.cpus_per_node or part.cpus) // procs)),
                    SIGNAL_SECONDS=str(res.signal_seconds), SELECT=choose,
                    ENTRYPOINT=shlex.quote(str(SLURM_DIR / "entrypoint.sh")))
    tensorboard = RunDir(runs[0][1]).tensorboard if len(runs) == 1 else RunDir(runs[0][1].parent / "*").tensorboard
    return Job(name, script, str(log), list(after), str(tensorboard), [run_dir for _, run_dir, _ in runs])


def prepare_job(name: str, runs: list[tuple[str, Path, list[str]]], log: Path, res: Resources, part: Partition,
                after: list[int] = ()) -> Job:
    """The CPU job that prepares the data of `runs` (each a cache hit once its entry is built)."""
    def command(recipe: str, sets: list[str]) -> str:
        args = " ".join(shlex.quote(f"--set={s}") for s in sets)
        return f"{shlex.quote(sys.executable)} -m launchers.cli data prepare {shlex.quote(recipe)} {args}".rstrip()
    commands = "\n".join(dict.fromkeys(command(recipe, sets) for recipe, _, sets in runs))
    script = render("prepare.sbatch", **header_values(name, log, res, part, [], partition=res.prepare_partition),
                    CPUS=str(res.prepare_cpus), COMMANDS=commands)
    return Job(name, script, str(log), list(after))


def recipe_jobs(path: str, sets: list[str], res: Resources, part: Partition) -> list[Job]:
    """The data's job, then one training job, or two for a two-stage recipe (stage 2 resumes
    stage 1's checkpoint)."""
    recipe = config.load(path, sets)
    run_dir = recipe.run_dir.resolve()
    path, sets = str(Path(path).resolve()), [*sets, f"out_dir={run_dir}"]  # the job may start elsewhere
    log, s1 = run_dir / "slurm-%j.out", recipe.stage1.steps
    jobs = [prepare_job(f"{recipe.name}-data", [(path, run_dir, sets)], log, res, part)]
    if 0 < s1 < recipe.train.steps and recipe.train.stop_at is None:
        return jobs + [train_job(f"{recipe.name}-stage1", [(path, run_dir, [*sets, f"train.stop_at={s1}"])],
                                 log, res, part, after=[0]),
                       train_job(f"{recipe.name}-stage2", [(path, run_dir, sets)], log, res, part, after=[1])]
    return jobs + [train_job(recipe.name, [(path, run_dir, sets)], log, res, part, after=[0])]


def set_jobs(path: str, sets: list[str], res: Resources, part: Partition) -> list[Job]:
    """A method comparison: the source's job, the methods' job array, the report."""
    from .run import expand, load_set
    s = load_set(Path(path))
    e = expand(s)
    out = e.out
    jobs = []
    if s.source:
        source_sets = [*sets, *e.source_sets]
        config.load(s.source, source_sets)
        source = [(s.source, e.source_dir, source_sets)]
        jobs.append(prepare_job(f"{s.name}-source-data", source, e.source_dir / "slurm-%j.out", res, part))
        jobs.append(train_job(f"{s.name}-source", source, e.source_dir / "slurm-%j.out", res, part, after=[0]))
    # a sweep's first phase (every setting at the sweep seeds); its best settings' other seeds
    # need these results: `b2b run SET` runs them afterwards, skipping what finished here. Their
    # data's job waits for the source, whose tokenizer a grown model's data may use
    runs = [(s.target, run_dir, [*sets, *run_sets]) for run_dir, run_sets in e.first]
    trained = [len(jobs) - 1] if s.source else []  # the source's training job
    jobs.append(prepare_job(f"{s.name}-data", runs, out / "slurm-%j.out", res, part, after=trained))
    jobs.append(train_job(f"{s.name}-methods", runs, out / "slurm-%A_%a.out", res, part, after=[len(jobs) - 1]))
    r = s.report
    args = [*(str(d) for _, d, _ in runs), "--smooth", str(r.smooth), "--baseline", r.baseline,
            "--out", str(out / "report"), *(["--target", str(r.target)] if r.target is not None else [])]
    report = render("report.sbatch", **header_values(f"{s.name}-report", out / "slurm-%j.out", res, part, []),
                    ARGS=" ".join(shlex.quote(a) for a in args))
    jobs.append(Job(f"{s.name}-report", report, str(out / "slurm-%j.out"), [len(jobs) - 1]))
    return jobs


def sbatch(job: Job, after: list[str]) -> str:
    flags = [f"--dependency=afterok:{':'.join(after)}"] if after else []
    out = subprocess.run(["sbatch", "--parsable", *flags], input=job.script, capture_output=True, text=True)
    if out.returncode != 0:
        raise ClusterError(f"sbatch refused {job.name}: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def submit(path: str, sets: list[str], res: Resources, dry_run: bool = False) -> int:
    is_set = "methods" in config.load_raw(Path(path))  # a set, or a set naming a base set
    try:
        part = check_resources(res)
    except NoController as err:
        if not dry_run:
            raise
        part = assumed_partition(res)
        print(f"b2b submit: could not check the partition ({err}); the scripts below follow the flags "
              f"({part.gpus} GPU(s) and {part.cpus} CPU(s) per node)", file=sys.stderr)
    jobs = (set_jobs if is_set else recipe_jobs)(path, sets, res, part)
    if dry_run:
        for i, job in enumerate(jobs):
            after = " ".join(f"--dependency=afterok:<job {j + 1}>" for j in job.after)
            print(f"# ---- job {i + 1} of {len(jobs)}: sbatch {after}".rstrip() + f"\n{job.script}")
        return 0
    for job in jobs:  # a job on a directory a live run holds would only fail when it starts
        for run_dir in job.run_dirs:
            runlock.check_free(run_dir)
    ids: list[str] = []
    for job in jobs:
        Path(job.log).parent.mkdir(parents=True, exist_ok=True)
        ids.append(sbatch(job, [ids[j] for j in job.after]))
        waits = f" after job {', '.join(ids[j] for j in job.after)}" if job.after else ""
        print(f"submitted job {ids[-1]} ({job.name}){waits}: log {job.log}"
              + (f", TensorBoard {job.tensorboard}" if job.tensorboard else ""), flush=True)
    return 0


def outcome(run_dir: Path) -> int:
    """What the job's batch shell does with a run the workers left: 0 finished (or stopped at
    train.stop_at, the end of a stage), EXIT_STOPPED stopped by a signal (requeue), 1 otherwise
    (a failure, or a stop a requeue would only repeat)."""
    from .report import run_state
    state = run_state(run_dir)
    if state == "stopped":
        stop_at = config.read_yaml(RunDir(run_dir).recipe).get("train", {}).get("stop_at")
        status = json.loads(RunDir(run_dir).status.read_text())
        if status["step"] == stop_at:
            return 0
        return EXIT_STOPPED if str(status.get("reason", "")).startswith("stopped by signal") else 1
    return 0 if state == "finished" else 1


if __name__ == "__main__":  # python -m launchers.submit outcome RUN_DIR (slurm/entrypoint.sh)
    if len(sys.argv) != 3 or sys.argv[1] != "outcome":
        sys.exit("usage: python -m launchers.submit outcome RUN_DIR")
    sys.exit(outcome(Path(sys.argv[2])))
