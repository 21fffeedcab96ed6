"""`hidream status`: the queue, running tasks, workers, throughput and why tasks wait, from the database."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from hidream.service.runtime import open_store
from hidream.service.settings import Settings
from hidream.service.worker import stale_after_s as _stale_after_s

WINDOWS = (("1m", "1 min"), ("5m", "5 min"), ("15m", "15 min"))


def stale_after_s(settings: Settings) -> float:
    """A worker that missed three heartbeats in a row is taken for gone."""
    return _stale_after_s(settings.lease_s)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart, indented by two."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in [headers, *rows]]


def _progress(step: int | None, total: int | None) -> str:
    if not total:
        return "starting"
    step = step or 0
    return f"{step}/{total} ({100 * step // total}%)"


def describe_engine(engine: dict[str, Any] | None) -> str:
    """How a worker's engine runs, from its `engine` column: `bf16, fp8 weights, offload layers`; `-` when it
    does not say (a worker registered before the column, or an engine without these facts)."""
    engine = engine or {}
    parts = [engine["precision"]] if engine.get("precision") else []
    if engine.get("quantize") and engine["quantize"] != "none":
        parts.append(f"{engine['quantize']} weights")
    if engine.get("offload") and engine["offload"] != "none":
        parts.append(f"offload {engine['offload']}")
    return ", ".join(parts) or "-"


def render_status(status: dict[str, Any]) -> str:
    """The dict of `Store.status` as text: one section per topic, then a line per stuck model."""
    lines = ["queue (tasks waiting per model)"]
    queue = status.get("queue") or {}
    lines += _table(["model", "waiting"], [[m, str(n)] for m, n in queue.items()]) if queue else ["  (empty)"]

    lines += ["", "running"]
    running = status.get("running") or []
    lines += _table(["task", "model", "worker", "progress", "started"],
                    [[r["id"], r["model"], r.get("worker") or "-", _progress(r.get("step"), r.get("total")),
                      _age(r.get("running_s"))] for r in running]) if running else ["  (none)"]

    lines += ["", f"workers (alive: a heartbeat within {status.get('stale_after_s', 0):g} s)"]
    workers = status.get("workers") or []
    lines += _table(["worker", "models", "device", "engine", "state", "task", "last heartbeat", "alive"],
                    [[w["id"], ", ".join(w["models"]), w["device"], describe_engine(w.get("engine")), w["state"],
                      w.get("current_task") or "-", _age(w.get("heartbeat_age_s")),
                      "yes" if w["alive"] else "NO (stale)"]
                     for w in workers]) if workers else ["  (none registered)"]

    lines += ["", "throughput (completed / failed)"]
    throughput = status.get("throughput") or {}
    lines += _table(["last", "completed", "failed"],
                    [[label, str(throughput.get(key, {}).get("completed", 0)),
                      str(throughput.get(key, {}).get("failed", 0))] for key, label in WINDOWS])

    stuck = status.get("stuck") or []
    if stuck:
        lines += ["", "stuck"]
        lines += [f"  {s['tasks']} task(s) for {s['model']} wait: no live worker serves it" for s in stuck]
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # naive UTC in the database
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def status_command(settings: Settings, as_json: bool) -> int:
    """Print the service's status (text, or JSON with --json); 0 when the database answered."""
    store = open_store(settings)
    try:
        status = store.status(stale_after_s(settings))
    finally:
        store.close()
    print(json.dumps(status, default=_json_default, indent=2) if as_json else render_status(status))
    return 0
