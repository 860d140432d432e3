"""One-call accelerator benchmark suite: every row time-boxed, results written as they arrive.

What it measures (preset ``gpu``, the default), each row of the same shape as the benchmark it
comes from:

- ``throughput`` / ``throughput_e4``: ``benchmarks/throughput.py`` rows (``vmap``, ``chunked``,
  ``loop``, ``shard_map`` over every visible device, ``loop_baseline``,
  ``single_batch_limit``) for SmallCNN, batch 16, at 8, 64, 512, 2,048 and 10,000 clients, with
  1 and 4 local steps;
- ``dpresnet``: the same rows for DPResNet (4.8 M parameters) at 10 and 64 clients;
- ``dp_overhead``: ``benchmarks/dp_overhead.py`` (plain vs DP-SGD round) with the ``vmap``
  per-example path, clients vmapped;
- ``perfedavg``: ``benchmarks/round_cost.py`` seconds per round of FedAvg, Per-FedAvg FO and HF
  on ``configs/perfedavg_hetero.py`` (synthetic fallback data);
- ``many_clients``: ``benchmarks/many_clients.py``, 10,000 clients x 100 images of 28x28x3
  (9.4 GB, written once to a memory-mapped file in the temp directory) streamed to the device,
  every client in one round, the chunk chosen by ``jaxfl.memory`` for half the device's memory;
- ``multi_process``: ``benchmarks/multi_process.py``, 2 processes of one ``jax.distributed``
  job vs 1 process on the same mesh, on the host CPU (one accelerator cannot hold two
  collective ranks; on several GPUs or hosts, run ``experiments.run`` as README shows).

CKKS / SecAgg+ run on the host CPU (``benchmarks/secure_agg.py``) and are not part of it.

Rows run in a worker subprocess, one after another; the parent watches each row's deadline
(``timeout_s`` of the row, and the suite's ``--budget-s``). A row that overruns or crashes the
worker is recorded with an ``error`` and a fresh worker continues with the next row, so one
failure cannot eat the budget. Rows that the budget leaves out are recorded as skipped; run
again with ``--resume`` (and a new budget) to fill them in. After every row the suite rewrites
``OUT/gpu_suite.json`` (environment + rows) and ``OUT/gpu_suite.md`` (the tables), so an
interrupted run keeps what it measured.

Row fields: ``updates_per_s`` (client-steps per second), ``ratio_vs_loop`` (over the
``loop_baseline`` row of the same model, K and E: a Python loop over a jitted single-client
update, as fedjax / Flower run clients), ``fraction_of_limit`` (over ``single_batch_limit``: E
steps on one batch of K*B examples), ``peak_device_memory_mb``, ``error``.
``peak_device_memory_mb`` is the allocator's ``peak_bytes_in_use`` when the row raised the
process's peak (``peak_device_memory_source = "peak"``, exact), otherwise the highest
``bytes_in_use`` sampled every 5 ms while the row ran (``"sampled"``, a lower bound); it is
``null`` on CPU, whose client reports no memory statistics.

Run on a GPU machine (from the repository root, jaxfl installed or not)::

    python benchmarks/gpu_suite.py --out benchmarks/results/gpu
    python benchmarks/gpu_suite.py --out benchmarks/results/gpu --resume --budget-s 300
    python benchmarks/gpu_suite.py --out /tmp/s --sections throughput --clients 512,2048

CPU dry run (tiny sizes, well under a minute; the test suite runs it)::

    JAX_PLATFORMS=cpu python benchmarks/gpu_suite.py --preset cpu-dry --out /tmp/gpu_suite_dry
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# jaxfl from this checkout (installed or not) and the sibling benchmark modules.
sys.path[:0] = [str(ROOT), str(HERE)]

import throughput  # noqa: E402 - needs the path above; light (no jax at import)

SECTIONS = (
    "throughput",
    "dpresnet",
    "dp_overhead",
    "perfedavg",
    "throughput_e4",
    "many_clients",
    "multi_process",
)
THROUGHPUT_ROWS = ("loop_baseline", "single_batch_limit", "loop", "chunked", "vmap", "shard_map")
START, ROW, ENV = "@@START ", "@@ROW ", "@@ENV "
# Tests' fault injection: {"row id": "crash" | "hang"} makes the worker die or stall at that row.
INJECT_ENV = "JAXFL_GPU_SUITE_INJECT"
ROW_KEYS = ("updates_per_s", "ratio_vs_loop", "fraction_of_limit", "peak_device_memory_mb")

# Sizes per preset. ``gpu`` follows issue 11; ``cpu-dry`` exercises every row type in seconds.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {
        "clients": [8, 64, 512, 2048, 10000],
        "batch_size": 16,
        "image_size": 28,
        "chunk_size": 64,
        "repeats": 3,
        "dpresnet_clients": [10, 64],
        "dpresnet_rows": list(THROUGHPUT_ROWS),
        "e4_clients": [8, 64, 512, 2048, 10000],
        "e4_rows": list(THROUGHPUT_ROWS),
        "dp_clients": 64,
        "dp_examples": 64,
        "dp_models": ["cnn", "dpresnet"],
        "perfedavg_clients": 10,
        "perfedavg_n_train": 6000,
        "perfedavg_algorithms": ["fedavg", "perfedavg_fo", "perfedavg_hf"],
        "perfedavg_strategy": "auto",
        "many_clients": 10000,
        "many_per_client": 100,
        "many_image_size": 28,
        "many_memory_limit_gb": 0.0,
        "many_timeout_s": 240.0,
        "multi_clients": 64,
        "multi_n_train": 6400,
        "multi_rounds": 3,
        "multi_timeout_s": 150.0,
        "row_timeout_s": 75.0,
        "budget_s": 420.0,
    },
    "cpu-dry": {
        "clients": [4],
        "batch_size": 4,
        "image_size": 16,
        "chunk_size": 2,
        "repeats": 1,
        "dpresnet_clients": [2],
        "dpresnet_rows": ["vmap"],
        "e4_clients": [2],
        "e4_rows": ["loop", "vmap"],
        "dp_clients": 2,
        "dp_examples": 8,
        "dp_models": ["cnn"],
        "perfedavg_clients": 2,
        "perfedavg_n_train": 64,
        "perfedavg_algorithms": ["fedavg", "perfedavg_hf"],
        "perfedavg_strategy": "auto",
        "many_clients": 8,
        "many_per_client": 4,
        "many_image_size": 8,
        "many_memory_limit_gb": 0.05,
        "many_timeout_s": 90.0,
        "multi_clients": 4,
        "multi_n_train": 64,
        "multi_rounds": 2,
        "multi_timeout_s": 120.0,
        "row_timeout_s": 60.0,
        "budget_s": 240.0,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=False, help="output folder (gpu_suite.json, gpu_suite.md)")
    p.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of sections")
    p.add_argument("--clients", default=None, help="override the preset's throughput K list")
    p.add_argument("--budget-s", type=float, default=None, help="wall seconds for the whole run")
    p.add_argument("--row-timeout-s", type=float, default=None, help="seconds per row")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per row (median)")
    p.add_argument("--resume", action="store_true", help="keep finished rows of OUT's JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: rows file
    args = p.parse_args(argv)
    if args.worker is None and not args.out:
        p.error("--out is required: the folder to write gpu_suite.json and gpu_suite.md to")
    args.section_list = [s for s in args.sections.split(",") if s]
    unknown = set(args.section_list) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    settings = dict(PRESETS[args.preset])
    if args.clients:
        settings["clients"] = settings["e4_clients"] = [int(k) for k in args.clients.split(",")]
    for name in ("budget_s", "row_timeout_s", "repeats"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    args.settings = settings
    return args


# --------------------------------------------------------------------------- the rows


def plan_rows(sections: list[str], s: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row to run, in run order; each a plain dict with a unique ``id``."""
    rows: list[dict[str, Any]] = []

    def throughput(section, model, clients, steps, strategies=THROUGHPUT_ROWS) -> None:
        for k in clients:
            for strategy in strategies:
                rows.append(
                    {
                        "id": f"{section}/{model}/K={k}/E={steps}/{strategy}",
                        "section": section,
                        "kind": "throughput",
                        "model": model,
                        "clients": k,
                        "local_steps": steps,
                        "strategy": strategy,
                    }
                )

    for section in sections:
        if section == "throughput":
            throughput(section, "cnn", s["clients"], 1)
        elif section == "throughput_e4":
            throughput(section, "cnn", s["e4_clients"], 4, s["e4_rows"])
        elif section == "dpresnet":
            throughput(section, "dpresnet", s["dpresnet_clients"], 1, s["dpresnet_rows"])
        elif section == "dp_overhead":
            for model in s["dp_models"]:
                k = s["dp_clients"] if model == "cnn" else min(s["dpresnet_clients"])
                rows.append(
                    {
                        "id": f"dp_overhead/{model}/K={k}/vmap",
                        "section": section,
                        "kind": "dp_overhead",
                        "model": model,
                        "clients": k,
                        "local_steps": None,
                        "strategy": "vmap",
                    }
                )
        elif section == "perfedavg":
            for algorithm in s["perfedavg_algorithms"]:
                rows.append(
                    {
                        "id": f"perfedavg/{algorithm}/K={s['perfedavg_clients']}",
                        "section": section,
                        "kind": "round_cost",
                        "model": "cnn",
                        "algorithm": algorithm,
                        "clients": s["perfedavg_clients"],
                        "local_steps": None,
                        "strategy": s["perfedavg_strategy"],
                    }
                )
        elif section == "many_clients":
            rows.append(
                {
                    "id": f"many_clients/cnn/K={s['many_clients']}/stream_auto_chunk",
                    "section": section,
                    "kind": "many_clients",
                    "model": "cnn",
                    "clients": s["many_clients"],
                    "local_steps": None,
                    "strategy": "auto",
                    "timeout_s": s["many_timeout_s"],
                }
            )
        elif section == "multi_process":
            rows.append(
                {
                    "id": f"multi_process/cnn/K={s['multi_clients']}/2_processes_cpu",
                    "section": section,
                    "kind": "multi_process",
                    "model": "cnn",
                    "clients": s["multi_clients"],
                    "local_steps": None,
                    "strategy": "shard_map",
                    "timeout_s": s["multi_timeout_s"],
                }
            )
    return rows


def _throughput_row(row: dict, s: dict, budget_s: float) -> dict:
    argv = [
        f"--clients={row['clients']}",
        f"--batch-size={s['batch_size']}",
        f"--local-steps={row['local_steps']}",
        f"--chunk-size={s['chunk_size']}",
        f"--repeats={s['repeats']}",
        f"--model={row['model']}",
        f"--image-size={s['image_size']}",
    ]
    args = throughput.parse_args(argv)
    out = throughput.time_row(args, row["clients"], row["strategy"], budget_s)
    out["batch_size"] = s["batch_size"]
    return out


def _dp_row(row: dict, s: dict, budget_s: float) -> dict:
    import dp_overhead

    argv = [
        f"--clients={row['clients']}",
        f"--examples={s['dp_examples']}",
        "--batch-size=32" if s["dp_examples"] >= 32 else f"--batch-size={s['dp_examples']}",
        "--strategy=vmap",
        "--per-example=vmap",
        f"--image-size={s['image_size']}",
        f"--repeats={s['repeats']}",
    ]
    out = dp_overhead.measure(row["model"], dp_overhead.parse_args(argv))
    out["updates_per_s"] = out["dp_steps_per_s"]
    return out


def _round_cost_row(row: dict, s: dict, budget_s: float) -> dict:
    import round_cost

    config = round_cost.load_config(str(ROOT / "configs" / "perfedavg_hetero.py"))
    config.algorithm.name = row["algorithm"]
    config.num_clients = row["clients"]
    config.strategy = row["strategy"]
    config.data.n_train = s["perfedavg_n_train"]
    config.data.n_val = max(s["perfedavg_n_train"] // 10, 8)
    config.data.n_test = max(s["perfedavg_n_train"] // 10, 8)
    seconds, runner, metrics = round_cost.seconds_per_round(config, s["repeats"])
    steps = metrics.get("local_steps_mean", 0.0) * metrics.get("clients", 0)
    return {
        "seconds_per_round": seconds,
        "updates_per_s": steps / seconds if steps else None,
        "resolved": runner.strategy,
        "batch_size": config.local.batch_size,
    }


def _many_clients_row(row: dict, s: dict, budget_s: float) -> dict:
    """K clients x ``many_per_client`` images streamed from a memory-mapped file, every client
    each round, the chunk chosen by jaxfl.memory (``benchmarks/many_clients.py``)."""
    import many_clients

    k, n, size = row["clients"], s["many_per_client"], s["many_image_size"]
    path = many_clients.image_path(tempfile.gettempdir(), k, n, size)
    written = many_clients.write_images(path, k, n, size)
    out = many_clients.measure(
        path, k, per_client=n, memory_limit_gb=s["many_memory_limit_gb"], batch_size=16
    )
    steps = (out.get("local_steps_mean") or 0.0) * k
    out["updates_per_s"] = steps / out["seconds_per_round"] if steps else None
    out["first_round_s"] = out.get("warmup_round_s")
    out["resolved"] = out.get("backend")
    out["data_write_s"] = written
    return out


def _multi_process_row(row: dict, s: dict, budget_s: float) -> dict:
    """2 processes of one jax.distributed job vs 1 process, same mesh, on the host CPU: one
    accelerator cannot be shared by two collective ranks (``benchmarks/multi_process.py``)."""
    import multi_process

    argv = [
        f"--clients={row['clients']}",
        f"--n-train={s['multi_n_train']}",
        f"--rounds={s['multi_rounds']}",
        "--platform=cpu",
        f"--timeout-s={int(budget_s)}",
    ]
    runs = multi_process.main(argv)
    two = next(r for r in runs if r["processes"] == 2)
    return {
        "seconds_per_round": two["round_s_median"],
        "ratio_vs_one_process_mesh": two["ratio_vs_one_process_mesh"],
        "same_results": all(r["same_results"] for r in runs),
        "runs": runs,
        "resolved": "2 processes x 1 cpu device",
    }


RUNNERS = {
    "throughput": _throughput_row,
    "dp_overhead": _dp_row,
    "round_cost": _round_cost_row,
    "many_clients": _many_clients_row,
    "multi_process": _multi_process_row,
}


class _DeviceMemory:
    """Peak device memory of one row: the allocator's peak if the row raised it, else sampled."""

    def __init__(self):
        import jax

        self.device = jax.devices()[0]
        self._stop = threading.Event()
        self.sampled = 0

    def _stats(self) -> dict | None:
        try:
            return self.device.memory_stats()
        except Exception:  # noqa: BLE001 - some backends raise instead of returning None
            return None

    def __enter__(self):
        stats = self._stats()
        self.peak_before = stats.get("peak_bytes_in_use", 0) if stats else None
        self.thread = None
        if stats is not None:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            stats = self._stats() or {}
            self.sampled = max(self.sampled, stats.get("bytes_in_use", 0))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join()

    def result(self) -> dict:
        stats = self._stats()
        if stats is None or self.peak_before is None:
            return {"peak_device_memory_mb": None, "peak_device_memory_source": None}
        peak = stats.get("peak_bytes_in_use", 0)
        if peak > self.peak_before:
            return {"peak_device_memory_mb": peak / 2**20, "peak_device_memory_source": "peak"}
        return {
            "peak_device_memory_mb": self.sampled / 2**20,
            "peak_device_memory_source": "sampled",
        }


def environment() -> dict[str, Any]:
    """Device, versions and memory of this process's JAX backend."""
    import jax

    from jaxfl.backends import resolve_strategy

    device = jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001
        stats = {}
    return {
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "device_memory_limit_mb": stats.get("bytes_limit", 0) / 2**20 or None,
        "auto_strategy": resolve_strategy("auto"),
    }


def worker(rows_file: str, settings: dict) -> None:
    """Run the rows in ``rows_file`` in order, printing START / ROW protocol lines."""
    import gc

    from jaxfl.runtime import tune_cpu_malloc

    tune_cpu_malloc()  # as benchmarks/throughput.py does for every row
    rows = json.loads(Path(rows_file).read_text())
    print(ENV + json.dumps(environment()), flush=True)
    inject = json.loads(os.environ.get(INJECT_ENV, "{}"))
    for row in rows:
        print(START + row["id"], flush=True)
        t0 = time.perf_counter()
        if inject.get(row["id"]) == "crash":
            os._exit(3)
        if inject.get(row["id"]) == "hang":
            time.sleep(1e6)
        try:
            with _DeviceMemory() as mem:
                # Rows stop timing repeats with a margin before the parent's kill.
                limit = row.get("timeout_s", settings["row_timeout_s"])
                out = RUNNERS[row["kind"]](row, settings, 0.8 * limit)
            out.update(mem.result())
            out["error"] = None
        except Exception as e:  # noqa: BLE001 - record the failure, go on with the next row
            out = {"error": f"{type(e).__name__}: {e}"[:500]}
        out["row_wall_s"] = time.perf_counter() - t0
        print(ROW + json.dumps({**row, **out}, default=float), flush=True)
        gc.collect()


# --------------------------------------------------------------------------- the parent


class Suite:
    """Runs planned rows through workers, watching deadlines, and writes the results."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.settings = args.settings
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out / "gpu_suite.json"
        self.md_path = self.out / "gpu_suite.md"
        self.t0 = time.monotonic()
        self.deadline = self.t0 + self.settings["budget_s"]
        self.env: dict[str, Any] = {}
        self.results: dict[str, dict] = {}
        self.order: list[str] = []
        self.started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if args.resume and self.json_path.exists():
            old = json.loads(self.json_path.read_text())
            self.results = {r["id"]: r for r in old["rows"] if not r.get("error")}
            self.env = old.get("environment", {})

    def run(self) -> dict:
        rows = plan_rows(self.args.section_list, self.settings)
        self.order = [r["id"] for r in rows]
        pending = [r for r in rows if r["id"] not in self.results]
        print(
            f"gpu_suite: {len(rows)} rows ({len(rows) - len(pending)} kept from {self.json_path}), "
            f"budget {self.settings['budget_s']:.0f} s, row timeout "
            f"{self.settings['row_timeout_s']:.0f} s",
            flush=True,
        )
        while pending:
            if time.monotonic() >= self.deadline:
                for row in pending:
                    self._record({**row, "error": "skipped: suite budget spent (rerun --resume)"})
                break
            pending = self._run_worker(pending)
        self.write()
        return self.report()

    def _run_worker(self, rows: list[dict]) -> list[dict]:
        """Start a worker for ``rows``; return the rows still to run when it stops."""
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(rows, f)
        with tempfile.TemporaryFile("w+") as stderr:
            return self._watch(rows, f.name, stderr)

    def _watch(self, rows: list[dict], rows_file: str, stderr) -> list[dict]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", rows_file]
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "JAXFL_GPU_SUITE_SETTINGS": json.dumps(self.settings),
        }
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, start_new_session=True
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        by_id = {r["id"]: r for r in rows}
        current, row_deadline = None, self.deadline
        done: set[str] = set()
        try:
            while True:
                try:
                    line = lines.get(
                        timeout=max(0.0, min(row_deadline, self.deadline) - time.monotonic())
                    )
                except queue.Empty:
                    limit = by_id[current].get("timeout_s") if current else None
                    reason = (
                        f"timeout after {limit or self.settings['row_timeout_s']:.0f} s"
                        if row_deadline <= self.deadline
                        else "killed: suite budget spent"
                    )
                    _kill(proc)
                    if current is not None:
                        self._record({**by_id[current], "error": reason})
                        done.add(current)
                    break
                if line is None:  # the worker exited
                    proc.wait()
                    stderr.seek(0)
                    tail = [ln for ln in stderr.read().strip().splitlines() if ln][-3:]
                    msg = f"worker exited with code {proc.returncode}: " + " | ".join(tail)
                    if current is not None and current not in done:
                        self._record({**by_id[current], "error": msg[:500]})
                        done.add(current)
                    elif not done and proc.returncode != 0:
                        # It died before its first row (an import error, say): every row would
                        # fail the same way, so record them all instead of restarting forever.
                        for row in rows:
                            self._record({**row, "error": f"worker failed to start: {msg}"[:500]})
                        return []
                    break
                if line.startswith(ENV):
                    self.env = json.loads(line[len(ENV) :])
                elif line.startswith(START):
                    current = line[len(START) :].strip()
                    limit = by_id[current].get("timeout_s", self.settings["row_timeout_s"])
                    row_deadline = time.monotonic() + limit
                elif line.startswith(ROW):
                    result = json.loads(line[len(ROW) :])
                    self._record(result)
                    done.add(result["id"])
                    current, row_deadline = None, self.deadline
                else:
                    print(line.rstrip(), flush=True)
        finally:
            _kill(proc)
            os.unlink(rows_file)
        return [r for r in rows if r["id"] not in done]

    def _record(self, result: dict) -> None:
        for key in ROW_KEYS:
            result.setdefault(key, None)
        result.setdefault("error", None)
        self.results[result["id"]] = result
        ups, err = result.get("updates_per_s"), result.get("error")
        elapsed = time.monotonic() - self.t0
        shown = f"{ups:.1f} client-steps/s" if ups else ""
        print(f"[{elapsed:6.1f}s] {result['id']}: {shown} {err or ''}".rstrip(), flush=True)
        self.write()

    def rows(self) -> list[dict]:
        ordered = [self.results[i] for i in self.order if i in self.results]
        extra = [r for i, r in self.results.items() if i not in self.order]
        rows = ordered + extra
        throughput.add_ratios([r for r in rows if r["kind"] == "throughput"], key=_group)
        return rows

    def report(self) -> dict:
        rows = self.rows()
        return {
            "environment": {**self.env, **host_info()},
            "settings": {**self.settings, "preset": self.args.preset},
            "started_utc": self.started,
            "wall_s": time.monotonic() - self.t0,
            "fastest": fastest_rows(rows),
            "rows": rows,
        }

    def write(self) -> None:
        report = self.report()
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2, default=float))
        tmp.replace(self.json_path)
        self.md_path.write_text(markdown(report))


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,memory.total,driver_version",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            info["nvidia_smi"] = out or None
        except (OSError, subprocess.TimeoutExpired):
            info["nvidia_smi"] = None
    return info


def _group(row: dict) -> tuple:
    return (row["section"], row["model"], row["clients"], row.get("local_steps"))


def fastest_rows(rows: list[dict]) -> list[dict]:
    """Per throughput group: the fastest engine strategy, to compare with ``auto``'s choice."""
    best: dict[tuple, dict] = {}
    for r in rows:
        engine = ("vmap", "chunked", "loop", "shard_map")
        if r["kind"] != "throughput" or r["strategy"] not in engine:
            continue
        if r.get("updates_per_s") and (
            _group(r) not in best or r["updates_per_s"] > best[_group(r)]["updates_per_s"]
        ):
            best[_group(r)] = r
    return [
        {
            "section": g[0],
            "model": g[1],
            "clients": g[2],
            "local_steps": g[3],
            "fastest": r["strategy"],
            "updates_per_s": r["updates_per_s"],
        }
        for g, r in best.items()
    ]


def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    env, settings = report["environment"], report["settings"]
    lines = [
        "# jaxfl accelerator benchmark suite",
        "",
        f"- device: {env.get('device', '?')} ({env.get('backend', '?')}, "
        f"{env.get('device_count', '?')} device(s)); nvidia-smi: {env.get('nvidia_smi', '—')}",
        f"- jax {env.get('jax_version', '?')}, Python {env.get('python', '?')}, "
        f"{env.get('cpu_count', '?')} CPU cores, device memory limit "
        f"{_fmt(env.get('device_memory_limit_mb'), '.0f')} MiB",
        f"- started {report['started_utc']} UTC, wall {report['wall_s']:.0f} s, preset "
        f"{settings['preset']}, batch {settings['batch_size']}, chunk {settings['chunk_size']}, "
        f"repeats {settings['repeats']}; `auto` resolves to `{env.get('auto_strategy', '?')}`",
        "",
        "| section | model | K | E | strategy | resolved | client-steps/s | vs loop | of limit "
        "| s/round | 1st round s | peak device MiB | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        name = r.get("algorithm") or r["strategy"]
        lines.append(
            f"| {r['section']} | {r['model']} | {r['clients']} | {r.get('local_steps') or '—'} "
            f"| {name} | {r.get('resolved') or '—'} | {_fmt(r.get('updates_per_s'), '.1f')} "
            f"| {_fmt(r.get('ratio_vs_loop'), '.2f')} | {_fmt(r.get('fraction_of_limit'), '.2f')} "
            f"| {_fmt(r.get('seconds_per_round'), '.4f')} | {_fmt(r.get('first_round_s'), '.1f')} "
            f"| {_fmt(r.get('peak_device_memory_mb'), '.0f')} | {r.get('error') or ''} |"
        )
    dp = [r for r in report["rows"] if r["kind"] == "dp_overhead" and not r.get("error")]
    if dp:
        lines += [
            "",
            "| DP-SGD model | K | non-DP ex/s | DP ex/s | overhead |",
            "|---|---|---|---|---|",
        ]
        for r in dp:
            lines.append(
                f"| {r['model']} | {r['clients']} | {r['nondp_examples_per_s']:.1f} "
                f"| {r['dp_examples_per_s']:.1f} | {r['overhead']:.2f}× |"
            )
    if report["fastest"]:
        lines += [
            "",
            "| fastest engine strategy | K | E | strategy | client-steps/s |",
            "|---|---|---|---|---|",
        ]
        for f in report["fastest"]:
            lines.append(
                f"| {f['section']}/{f['model']} | {f['clients']} | {f['local_steps']} "
                f"| {f['fastest']} | {f['updates_per_s']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, json.loads(os.environ["JAXFL_GPU_SUITE_SETTINGS"]))
        return None
    report = Suite(args).run()
    errors = sum(1 for r in report["rows"] if r.get("error"))
    print(markdown(report))
    print(f"gpu_suite: {len(report['rows'])} rows, {errors} with an error; wrote {args.out}/")
    return report


if __name__ == "__main__":
    main()
