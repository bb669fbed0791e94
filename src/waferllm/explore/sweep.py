"""Run a sweep: one dry-run prediction per point, on Ray or in this process, into a CSV table.

Each row holds the point's inputs, every predicted figure (flattened: ``energy_j.static``,
``breakdown_s.meshgemm``, ``decode.bytes_per_pe.weights``, ...), the value and the
provenance status of every wafer constant the prediction used (``beta_cycles``,
``status.beta_cycles``), and how the point ended: ``status`` is ``ok``, ``error`` (the
inputs cannot be predicted, e.g. the model does not fit; ``error`` holds the message) or
``crash`` (anything else, e.g. a lost worker). Rows are written as batches finish, so an
interrupted sweep keeps what it did; a rerun skips every point that has an ``ok`` or
``error`` row and runs the rest (``crash`` rows are retried, or every failed one with
``retry_failed``).

Several points go to one Ray task (``batch``): a prediction takes 0.05-2 s, so one
task per point would pay Ray's per-task overhead for little work.
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from waferllm.errors import WaferLLMError
from waferllm.explore.spec import SweepError, SweepSpec, as_spec, point_id, wafer_keys

FINISHED = ("ok", "error")
#: columns every row starts with, in this order
HEAD = ["point_id", "status", "error"]
#: keys of a prediction that are not figures of the point, or that get their own columns
_SKIP = {"constants", "gpu_baselines", "model", "wafer", "input_len", "output_len", "dtype", "kv_scheme"}


# ----------------------------------------------------------------- one point


def evaluate_point(point: Mapping[str, Any]) -> dict:
    """Predict one point; a row (never raises for the point's own failures)."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {"point_id": point_id(point), "status": "ok", "error": ""}
    row.update({k: _cell(v) for k, v in point.items()})
    try:
        _predict(point, row)
    except WaferLLMError as exc:
        row.update(status="error", error=str(exc))
    except Exception as exc:  # recorded, not raised: one bad point must not lose the others
        row.update(status="crash", error=f"{type(exc).__name__}: {exc}")
    row["point_wall_s"] = time.perf_counter() - t0
    return row


def evaluate_batch(points: list[Mapping[str, Any]]) -> list[dict]:
    """Rows of several points (the unit of work of one Ray task)."""
    return [evaluate_point(p) for p in points]


def _predict(point: Mapping[str, Any], out: dict) -> None:
    """Fill ``out`` with the wafer's constants, then the prediction (what was filled stays on failure)."""
    from waferllm.engine.predict import check_request, predict_run
    from waferllm.engine.run_config import RunConfig
    from waferllm.engine.tuner import tune_grids
    from waferllm.hardware import get_wafer
    from waferllm.models.loader import resolve_config

    constants = set(wafer_keys())
    overrides = {k: v for k, v in point.items() if k in constants}
    wafer = get_wafer(point["wafer"], **overrides)
    if point.get("defect_rate"):
        from waferllm.hardware.defects import with_defect_rate

        wafer = with_defect_rate(wafer, float(point["defect_rate"]), int(point.get("defect_seed", 0)),
                                 point.get("defect_recovery"))
    for k, v in wafer.to_dict().items():
        if isinstance(v, dict):
            out[k] = _cell(v["value"])
            out[f"status.{k}"] = v["status"]
    cfg = resolve_config(point["model"])
    il, ol = point["input_len"], point["output_len"]
    beyond = bool(point.get("allow_beyond_context"))
    check_request(cfg, il, ol, point.get("layers"), beyond)
    pg = None if point["prefill_grid"] == "auto" else point["prefill_grid"]
    dg = None if point["decode_grid"] == "auto" else point["decode_grid"]
    run = RunConfig.for_request(il, ol, prefill_grid=pg, decode_grid=dg, dtype=point["dtype"],
                                kv_scheme=point["kv_scheme"], layers=point.get("layers"),
                                weights=point.get("weights", "fp16"))
    if pg is None or dg is None:
        run = tune_grids(cfg, wafer, run, il, ol)["run"]
    m = predict_run(cfg, wafer, run, il, ol, gpus=bool(point.get("gpus")), band=bool(point.get("band")),
                    allow_beyond_context=beyond)
    out["grids_tuned"] = pg is None or dg is None
    out["model_name"] = cfg.name
    out["model_params"] = cfg.param_count()
    out.update(flatten_prediction(m))


def flatten_prediction(m: Mapping[str, Any]) -> dict:
    """Every figure of a prediction as flat ``a.b.c`` columns (lists of numbers joined by ``;``)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any):
        if isinstance(v, Mapping):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, (list, tuple)):
            if all(isinstance(x, (int, float, str)) or x is None for x in v):
                out[prefix] = ";".join(str(_cell(x)) for x in v)
            elif prefix.endswith(".stages"):
                out[prefix] = "; ".join(f"{s['region']} layers {s['layers'][0]}-{s['layers'][1]} "
                                        f"vocab {s['vocab'][0]}-{s['vocab'][1]}" for s in v)
        else:
            out[prefix] = _cell(v)

    for k, v in m.items():
        if k in _SKIP:
            continue
        if k == "placement":
            for ph in ("prefill", "decode"):
                if v.get(ph):
                    walk(ph, v[ph])
            for kk in ("planned_kv_capacity_tokens", "planned_kv_capacity_tokens_concat", "notes"):
                if kk in v:
                    walk(kk, v[kk])
            continue
        if k == "energy_breakdown_j":
            walk("energy_j", v)
            continue
        if k == "band" and isinstance(v, Mapping):
            walk("band_info", v)
            continue
        walk(k, v)
    for g in m.get("gpu_baselines") or []:
        for kind in ("roofline", "calibrated"):
            e = g.get(kind)
            if not e:
                continue
            for fig in ("ttft_s", "tpot_s", "decode_tokens_per_s", "e2e_tokens_per_s", "energy_j", "fits"):
                if fig in e:
                    out[f"gpu.{g['setup']}.{kind}.{fig}"] = _cell(e[fig])
    return out


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    return v


# ----------------------------------------------------------------- the table


class ResultTable:
    """A CSV table of rows keyed by ``point_id``, written as rows arrive (union of the rows' columns)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.suffix.lower() in (".parquet", ".pq"):
            raise SweepError(f"{self.path}: results are written as CSV; name the output *.csv")
        self.columns: list[str] = []
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                for r in reader:
                    if r.get("point_id"):
                        self.rows[r["point_id"]] = dict(r)
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            raise SweepError(f"{self.path}: cannot read the results table to resume ({exc}); move it away or "
                             "choose another --out") from None
        if self.columns and "point_id" not in self.columns:
            raise SweepError(f"{self.path}: not a sweep results table (no point_id column); choose another --out")

    def status(self, pid: str) -> str | None:
        r = self.rows.get(pid)
        return r.get("status") if r else None

    def add(self, rows: Iterable[dict]) -> None:
        """Add (or replace) rows and write them: appended when the columns are unchanged, else rewritten."""
        rows = list(rows)
        new_cols = [c for r in rows for c in r if c not in self.columns]
        replaced = any(r["point_id"] in self.rows for r in rows)
        for c in new_cols:
            if c not in self.columns:
                self.columns.append(c)
        for r in rows:
            self.rows[r["point_id"]] = r
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if new_cols or replaced or not self.path.exists():
            self._rewrite()
        else:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=self.columns, restval="")
                w.writerows(rows)

    def _rewrite(self) -> None:
        order = HEAD + [c for c in self.columns if c not in HEAD]
        self.columns = order
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, restval="")
            w.writeheader()
            w.writerows(self.rows.values())
        os.replace(tmp, self.path)


def read_results(path: str | os.PathLike) -> list[dict]:
    """The rows of a results table, numbers parsed back (empty cells are None)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"results table not found: {path}")
    return [{k: _parse(v) for k, v in r.items()} for r in ResultTable(path).rows.values()]


def _parse(v: Any) -> Any:
    if not isinstance(v, str):
        return v
    if v == "":
        return None
    if v in ("True", "False"):
        return v == "True"
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


# ----------------------------------------------------------------- running


@dataclass
class SweepResult:
    path: Path
    points: int  # points in the spec
    ran: int  # points predicted by this call
    skipped: int  # finished before this call
    ok: int  # ok rows of this spec's points after the call
    failed: int  # error/crash rows of this spec's points after the call
    wall_s: float
    backend: str  # "ray" or "serial"
    startup_s: float = 0.0  # of wall_s: starting or joining Ray
    rows: list[dict] = field(default_factory=list)  # this spec's rows, parsed

    @property
    def points_per_s(self) -> float:
        """Points predicted per second of wall time, Ray's start-up included."""
        return self.ran / self.wall_s if self.wall_s > 0 and self.ran else 0.0

    @property
    def points_per_s_running(self) -> float:
        """Points predicted per second once Ray was up."""
        t = self.wall_s - self.startup_s
        return self.ran / t if t > 0 and self.ran else 0.0


def default_output(spec_path: str | os.PathLike) -> Path:
    return Path(spec_path).with_suffix(".csv")


def run_sweep(spec, out: str | os.PathLike, *, use_ray: bool = True, address: str | None = None,
              num_cpus: int | None = None, batch: int | None = None, retry_failed: bool = False,
              timeout_s: float | None = None, progress: bool = True,
              on_progress: Callable[[int, int], None] | None = None) -> SweepResult:
    """Predict every point of ``spec`` not yet in ``out`` and write the rows there.

    ``use_ray``: run on Ray (a local instance with ``num_cpus`` CPUs, default all cores,
    started and stopped here; or the cluster at ``address``; or the Ray this process already
    joined); else in this process, one point after another. ``batch``: points per Ray task
    (default: the spec's, else about four tasks per CPU, at most 8 points each).
    ``timeout_s``: stop waiting after that long; finished rows are kept and a rerun resumes.
    """
    spec = as_spec(spec)
    points = spec.points()
    if not points:
        raise SweepError("the sweep has no points")
    table = ResultTable(out)
    retry = ("error", "crash") if retry_failed else ("crash",)
    todo = [p for p in points if table.status(point_id(p)) not in FINISHED or table.status(point_id(p)) in retry]
    skipped = len(points) - len(todo)
    t0 = time.perf_counter()
    backend, startup = "serial", 0.0
    if todo:
        bar = _Progress(len(todo), skipped, enabled=progress, hook=on_progress)
        with bar:
            def sink(rows):
                table.add(rows)
                bar.advance(rows)

            if use_ray:
                backend = "ray"
                n = batch or spec.batch
                startup = _run_on_ray(todo, sink, address=address, num_cpus=num_cpus, batch=n, timeout_s=timeout_s,
                                      ready=bar.restart)
            else:
                deadline = None if timeout_s is None else t0 + timeout_s
                for p in todo:
                    if deadline is not None and time.perf_counter() > deadline:
                        raise SweepError(_timeout_msg(timeout_s, table, points))
                    sink([evaluate_point(p)])
    wall = time.perf_counter() - t0
    ids = {point_id(p) for p in points}
    rows = [{k: _parse(v) for k, v in table.rows[i].items()} for i in (point_id(p) for p in points) if i in table.rows]
    ok = sum(1 for r in rows if r["status"] == "ok")
    return SweepResult(path=table.path, points=len(points), ran=len(todo), skipped=skipped, ok=ok,
                       failed=sum(1 for i in ids if i in table.rows) - ok, wall_s=wall, backend=backend,
                       startup_s=startup, rows=rows)


def _timeout_msg(timeout_s, table: ResultTable, points) -> str:
    done = sum(1 for p in points if table.status(point_id(p)) in FINISHED)
    return (f"the sweep stopped after {timeout_s:g} s with {done} of {len(points)} points finished; they are saved "
            f"in {table.path}, and a rerun resumes with the rest")


def auto_batch(n_points: int, cpus: int) -> int:
    """About four tasks per CPU (so the tail stays short), at most 8 points per task."""
    return max(1, min(8, math.ceil(n_points / (4 * max(1, cpus)))))


def _run_on_ray(todo: list[dict], sink, *, address, num_cpus, batch, timeout_s, ready=None) -> float:
    """Run the points on Ray; returns the seconds it took to start or join Ray."""
    t0 = time.perf_counter()
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        raise SweepError("the sweep runs on Ray, which is not installed (pip install ray), or use --no-ray") from None
    started = False
    if not ray.is_initialized():
        kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            if address:
                ray.init(address=address, **kw)
            else:  # a private instance on the loopback interface: nothing outside this machine can reach it
                try:
                    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, _node_ip_address="127.0.0.1", **kw)
                except TypeError:  # a Ray without that keyword
                    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kw)
        except ConnectionError as exc:
            raise SweepError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
        except (ValueError, RuntimeError) as exc:
            raise SweepError(f"cannot start Ray: {exc}") from None
        started = True
    startup = time.perf_counter() - t0
    if ready:
        ready()
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = batch or auto_batch(len(todo), cpus)
        task = ray.remote(num_cpus=1, max_retries=1)(evaluate_batch)
        batches = [todo[i:i + n] for i in range(0, len(todo), n)]
        pending = {task.remote(b): b for b in batches}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            done, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
            for ref in done:
                b = pending.pop(ref)
                try:
                    rows = ray.get(ref)
                except Exception as exc:  # a lost worker or a task that could not run: record every point
                    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                    rows = [{"point_id": point_id(p), "status": "crash", "error": msg,
                             **{k: _cell(v) for k, v in p.items()}} for p in b]
                sink(rows)
            if deadline is not None and time.monotonic() >= deadline and pending:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise SweepError(f"the sweep stopped after {timeout_s:g} s with {len(pending)} task(s) unfinished; "
                                 "the finished rows are saved, and a rerun resumes with the rest")
        return startup
    finally:
        if started:
            ray.shutdown()


class _Progress:
    """A rich progress bar on stderr: points done, ok/failed, points per second."""

    def __init__(self, total: int, skipped: int, enabled: bool, hook=None):
        self.total, self.skipped, self.enabled, self.hook = total, skipped, enabled, hook
        self.done = self.ok = self.failed = 0
        self._p = None
        self._t0 = time.perf_counter()

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._p = Progress(TextColumn("[bold]sweep[/]"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
                               TimeRemainingColumn(), console=Console(stderr=True))
            self._p.__enter__()
            self._task = self._p.add_task("sweep", total=self.total, stats=self._stats())
        return self

    def restart(self) -> None:
        """Count the rate from now (after Ray started)."""
        self._t0 = time.perf_counter()

    def _stats(self, rate: float = 0.0) -> str:
        s = f"ok {self.ok}, failed {self.failed}"
        if self.skipped:
            s += f", {self.skipped} done before"
        return s + (f", {rate:.2f} points/s" if rate else "")

    def advance(self, rows: list[dict]) -> None:
        self.done += len(rows)
        self.ok += sum(1 for r in rows if r.get("status") == "ok")
        self.failed += sum(1 for r in rows if r.get("status") != "ok")
        if self._p is not None:
            rate = self.done / max(1e-9, time.perf_counter() - self._t0)
            self._p.update(self._task, advance=len(rows), stats=self._stats(rate))
        if self.hook:
            self.hook(self.done, self.total)

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False


def describe_points(spec: SweepSpec) -> list[dict]:
    """The points with their ids (what ``sweep --list`` prints)."""
    return [{"point_id": point_id(p), **p} for p in spec.points()]


__all__ = ["evaluate_point", "evaluate_batch", "flatten_prediction", "ResultTable", "read_results", "SweepResult",
           "run_sweep", "default_output", "auto_batch", "describe_points"]
