"""Where the time of one training command goes, from the launcher's start to its exit, timed from
outside: the command runs unchanged (through the `deepspeed` launcher), every output line is
timestamped as it arrives and /proc is polled every 20 ms for the process tree.

  python benchmarks/phases.py --runs 3 --out DIR --command-file results/02_cifar10/h200-fast-fp32/command.sh
  python benchmarks/phases.py --out DIR -- deepspeed --num_gpus=1 02_cifar10/train_ds.py ... --output-dir {run_dir}

Each run gets its own output folder, DIR/runs/<k>: `{run_dir}` in the argv is replaced by it, and
RUN_DIR is set to it (a command.sh reads RUN_DIR). Times are seconds on the monotonic clock since the
command was started (t = 0: launcher start). Writes DIR/run<k>.json (phase times, the lines that
marked them, the processes seen), DIR/run<k>.log (every line with its time) and DIR/phases.md and
DIR/phases.json (the median, min and max of each phase's time over the runs).

Phases, in order; one that no run showed is left out of the table:
  launcher_start  t = 0, the command is started
  launch_start    a process with `deepspeed.launcher.launch` in its command line appears (/proc)
  worker_start    a rank process appears: its command line carries --local_rank (/proc, its start
                  time in /proc/<pid>/stat, 10 ms resolution)
  first_line      the first stdout line that is not a launcher or DeepSpeed log line
                  (`[YYYY-MM-DD hh:mm:ss,ms] [LEVEL] ...`), not an op build's chatter (BUILD_LINE)
                  and not a `phases:` line; 02 today: `Loading    : ...`
  data            a `phases: data ...` line, else the moment the worker closes a decoded-image
                  cache file (`.decoded-<key>.pt`, polled in /proc/<pid>/fd): the data is then in host
                  memory; its copy to the device falls into the next phase
  engine          the banner printed after deepspeed.initialize: a line starting `DeepSpeed CNN
                  training:` (or `phases: engine ...`)
  first_epoch     the first `epoch N/M` line
  last_epoch      the last `epoch N/M` line
  report          the last line starting `Saved:` (the final summary's last line), else
                  `Training finished`
  worker_exit     the last rank process exits (it is gone or a zombie in /proc)
  launcher_exit   the command exits
A line starting `phases:` may also carry in-process numbers (`phases: import 3.1 data 0.8s ...`,
`name=value` too): each `name value` pair is kept under "in_process" and tabulated; a name without a
number marks that phase at the line's arrival.

--py-spy PATH (a probe, not for timed runs): from the last epoch line until the worker exits, take
`py-spy dump --native` of the worker back to back; the dumps land in run<k>.json under "dumps".
"""

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ORDER = ("launcher_start", "launch_start", "worker_start", "first_line", "data", "engine",
         "first_epoch", "last_epoch", "report", "worker_exit", "launcher_exit")
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+\] \[[A-Z]+\]")
# what torch's extension builder and DeepSpeed's op loader print while building or loading an op
BUILD_LINE = re.compile(r"^(DeepSpeed deepspeed\.ops\.|Using \S+ as PyTorch extensions root|"
                        r"Emitting ninja|Building extension|Loading extension|Time to load|\[\d+/\d+\] )")
PHASES_LINE = re.compile(r"^\s*phases:\s*(.*)$")
PAIR = re.compile(r"([A-Za-z_][\w-]*)(?:\s*[=:]?\s*(-?\d+(?:\.\d+)?)\s*s?\b)?")
EPOCH = re.compile(r"^\s*epoch\s+(\d+)\s*/\s*(\d+)\b")
ENGINE = re.compile(r"^DeepSpeed CNN training:")
REPORT = re.compile(r"^Saved:")
FINISHED = re.compile(r"^Training finished")
CACHE_FILE = re.compile(r"\.decoded-[0-9a-f]+\.pt$")
POLL_S = 0.02
HZ = os.sysconf("SC_CLK_TCK")


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def stat(pid):
    """(state, parent pid, start time in boot-clock seconds) from /proc/<pid>/stat, or None."""
    raw = read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    rest = raw[raw.rindex(b")") + 2:].split()
    return rest[0].decode(), int(rest[1]), int(rest[19]) / HZ


def children(pid):
    """Child pids, from /proc/<pid>/task/*/children where the kernel has it, else a full scan."""
    tasks = f"/proc/{pid}/task"
    if os.path.exists(f"{tasks}/{pid}/children"):
        found = set()
        for tid in os.listdir(tasks) if os.path.isdir(tasks) else ():
            found |= {int(c) for c in (read(f"{tasks}/{tid}/children") or b"").split()}
        return found
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and (stat(p) or (0, 0))[1] == pid}


class Watch:
    """Polls the process tree under `root` until stop(): start and exit time of each process, its
    command line (re-read until it exits: a fork shows its parent's until exec) and, for rank
    processes until `stop_fd_scan` is set, when a decoded-image cache file was open."""

    def __init__(self, root, t0, boot_offset):
        self.root, self.t0, self.boot_offset = root, t0, boot_offset
        self.procs, self.cache_closed, self.open_cache = {}, None, set()
        self.stop_fd_scan, self.done = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def now(self):
        return time.monotonic() - self.t0

    def loop(self):
        while not self.done.is_set():
            self.poll()
            time.sleep(POLL_S)
        self.poll()

    def poll(self):
        t = self.now()
        alive, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            st = stat(pid)
            if st is None or st[0] == "Z":
                continue
            alive.add(pid)
            todo += children(pid)
            args = (read(f"/proc/{pid}/cmdline") or b"").decode(errors="replace").split("\0")
            p = self.procs.setdefault(pid, {"pid": pid, "ppid": st[1], "seen": round(t, 3),
                                            "role": "other"})
            started = st[2] - self.boot_offset
            # the stat start time is exact to 10 ms; trust it unless the clocks disagree
            p["start"] = round(started if -1 < started <= t + 0.05 else p["seen"], 3)
            if args == [""]:  # its memory is released: it is exiting (file closes come next)
                p.setdefault("exiting", round(t, 3))
                continue
            p["cmdline"] = " ".join(a for a in args if a)
            parent = self.procs.get(st[1], {})
            rank = any(a.startswith(("--local_rank", "--local-rank")) for a in args)
            p["role"] = "worker" if rank and parent.get("role") != "worker" else (
                "launch" if "deepspeed.launcher.launch" in args else "other")
            if p["role"] == "worker" and not self.stop_fd_scan.is_set():
                self.scan_fds(pid, t)
        for pid, p in self.procs.items():
            if pid not in alive and "exit" not in p:
                p["exit"] = round(t, 3)

    def scan_fds(self, pid, t):
        fds = f"/proc/{pid}/fd"
        try:
            targets = {os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)}
        except OSError:
            return
        now_open = {f for f in targets if CACHE_FILE.search(f)}
        if self.open_cache - now_open:
            self.cache_closed = round(t, 3)
        self.open_cache = now_open

    def stop(self):
        self.done.set()
        self.thread.join()


def parse_phases_line(text):
    """{name: number or None} from the text after `phases:`."""
    return {m[1]: float(m[2]) if m[2] else None for m in PAIR.finditer(text) if m[1]}


def spy(py_spy, watch, dumps):
    """py-spy dumps of the rank process, back to back, until it exits."""
    while True:
        workers = [p for p in watch.procs.values() if p["role"] == "worker" and "exit" not in p]
        if not workers:
            return
        t = watch.now()
        r = subprocess.run([py_spy, "dump", "--native", "--pid", str(workers[0]["pid"])],
                           capture_output=True, text=True)
        dumps.append({"t": round(t, 3), "t_end": round(watch.now(), 3), "rc": r.returncode,
                      "text": (r.stdout + r.stderr)[-6000:]})


def run_once(argv, run_dir, log_path, py_spy=None):
    env = {**os.environ, "RUN_DIR": str(run_dir)}
    argv = [a.replace("{run_dir}", str(run_dir)) for a in argv]
    lines, lock = [], threading.Lock()
    boot_offset = time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()
    t0 = time.monotonic()
    boot_offset += t0  # boot-clock seconds at t = 0
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    watch = Watch(proc.pid, t0, boot_offset)
    dumps, spying = [], []

    def reader(pipe, name):
        for raw in pipe:
            t = time.monotonic() - t0
            text = raw.decode(errors="replace").rstrip("\r\n")
            with lock:
                lines.append((round(t, 3), name, text))
            if ENGINE.match(text) or PHASES_LINE.match(text) and "engine" in text:
                watch.stop_fd_scan.set()
            m = EPOCH.match(text)
            if py_spy and m and m[1] == m[2] and not spying:
                spying.append(threading.Thread(target=spy, args=(py_spy, watch, dumps)))
                spying[0].start()

    readers = [threading.Thread(target=reader, args=(proc.stdout, "out")),
               threading.Thread(target=reader, args=(proc.stderr, "err"))]
    for r in readers:
        r.start()
    rc = proc.wait()
    exit_t = round(time.monotonic() - t0, 3)
    for r in readers:
        r.join()
    watch.stop()
    for s in spying:
        s.join()
    lines.sort(key=lambda x: x[0])
    with open(log_path, "w") as f:
        f.writelines(f"{t:9.3f} {name}| {text}\n" for t, name, text in lines)
    result = phases_of(lines, watch, exit_t)
    return {"rc": rc, "argv": argv, **result, "processes": list(watch.procs.values()), "dumps": dumps}


def phases_of(lines, watch, exit_t):
    """Phase times and the lines that marked them."""
    times, marks, in_process, epochs = {"launcher_start": 0.0}, {}, {}, []

    def mark(name, t, text):
        if name not in times:
            times[name], marks[name] = t, text

    for t, stream, text in lines:
        found = PHASES_LINE.match(text)
        if found:
            for name, value in parse_phases_line(found[1]).items():
                if value is None and name in ORDER:
                    mark(name, t, text)
                elif value is not None:
                    in_process[name] = value
            marks.setdefault("phases_line", text)
            continue
        if stream == "out" and text.strip() and not LOG_LINE.match(text) and not BUILD_LINE.match(text):
            mark("first_line", t, text)
        if ENGINE.match(text):
            mark("engine", t, text)
        m = EPOCH.match(text)
        if m:
            epochs.append((t, text))
        if REPORT.match(text) or (FINISHED.match(text) and "report" not in times):
            times["report"], marks["report"] = t, text
    if epochs:
        mark("first_epoch", *epochs[0])
        mark("last_epoch", *epochs[-1])
    if watch.cache_closed is not None:
        mark("data", watch.cache_closed, "(/proc: decoded-image cache file closed)")
    procs = watch.procs.values()
    for role, name in (("launch", "launch_start"), ("worker", "worker_start")):
        starts = [p["start"] for p in procs if p["role"] == role]
        if starts:
            mark(name, min(starts), f"(/proc: {role} process started)")
    exits = [p.get("exit", exit_t) for p in procs if p["role"] == "worker"]
    if exits:
        mark("worker_exit", max(exits), "(/proc: last rank process exited)")
    times["launcher_exit"] = exit_t
    ordered = {k: round(times[k], 3) for k in ORDER if k in times}
    return {"phases": ordered, "phase_lines": marks, "in_process": in_process,
            "epoch_lines": len(epochs)}


def summarize(runs):
    """Per phase: median, min and max of its time since launch and of the step from the phase
    before it (the previous one that every run showed)."""
    common = [k for k in ORDER if all(k in r["phases"] for r in runs)]
    rows, prev = [], None
    for k in common:
        at = [r["phases"][k] for r in runs]
        step = [r["phases"][k] - r["phases"][prev] for r in runs] if prev else [0.0] * len(runs)
        rows.append({"phase": k, "from": prev, "at_median": round(statistics.median(at), 3),
                     "step_median": round(statistics.median(step), 3),
                     "step_min": round(min(step), 3), "step_max": round(max(step), 3)})
        prev = k
    names = sorted({n for r in runs for n in r["in_process"]})
    in_process = {n: round(statistics.median(r["in_process"][n] for r in runs if n in r["in_process"]), 3)
                  for n in names}
    return {"rows": rows, "in_process_median": in_process}


def markdown(summary, runs, header):
    lines = [f"# Phases: median of {len(runs)} run(s)", "", *header, "",
             "| phase | from | step median s | step min-max s | at (median) s |", "|---|---|---|---|---|"]
    for r in summary["rows"]:
        spread = f"{r['step_min']:.2f}-{r['step_max']:.2f}"
        lines.append(f"| {r['phase']} | {r['from'] or '-'} | {r['step_median']:.2f} | {spread} | "
                     f"{r['at_median']:.2f} |")
    if summary["in_process_median"]:
        lines += ["", "In-process numbers from the `phases:` line (median):", ""]
        lines += [f"- {k}: {v:g}" for k, v in summary["in_process_median"].items()]
    return "\n".join(lines) + "\n"


def host():
    gpu = None
    if shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"gpu": gpu.stdout.strip() if gpu and gpu.returncode == 0 else "none",
            "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "commit": commit.stdout.strip() or "unknown",
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1, help="timed runs, one after another")
    ap.add_argument("--out", required=True, help="folder for run<k>.json/.log, phases.md/.json")
    ap.add_argument("--command-file", help="a command.sh to run with bash (else the argv after --)")
    ap.add_argument("--py-spy", help="py-spy binary: dump the worker from the last epoch to its exit")
    ap.add_argument("argv", nargs=argparse.REMAINDER, help="-- the command")
    a = ap.parse_args()
    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    if a.command_file:
        argv = ["bash", a.command_file]
    if not argv:
        ap.error("give --command-file or a command after --")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = host()
    runs = []
    for k in range(1, a.runs + 1):
        run_dir = (out / "runs" / str(k)).resolve()
        r = run_once(argv, run_dir, out / f"run{k}.log", a.py_spy)
        r = {"run": k, **r}
        (out / f"run{k}.json").write_text(json.dumps(r, indent=1) + "\n")
        runs.append(r)
        print(f"run {k}: rc={r['rc']} " + " ".join(f"{n}={t:.2f}" for n, t in r["phases"].items()),
              flush=True)
    summary = summarize(runs)
    command = a.command_file and Path(a.command_file).read_text().strip() or shlex.join(argv)
    header = [f"- command: `{shlex.join(argv)}`" + (f" ({a.command_file})" if a.command_file else ""),
              f"- host: {info['gpu']}; {info['cpus']} CPUs; Python {info['python']}",
              f"- commit: {info['commit']}; date (UTC): {info['date_utc']}",
              f"- exit codes: {[r['rc'] for r in runs]}",
              "- step = this phase's time minus the previous row's; at = time since launcher start"]
    (out / "phases.json").write_text(json.dumps(
        {**summary, "host": info, "command": command, "argv": argv,
         "runs": [{"run": r["run"], "rc": r["rc"], "phases": r["phases"]} for r in runs]},
        indent=1) + "\n")
    (out / "phases.md").write_text(markdown(summary, runs, header))
    print(markdown(summary, runs, header))
    return max(r["rc"] for r in runs)


if __name__ == "__main__":
    sys.exit(main())
