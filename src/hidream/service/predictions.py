"""The prediction object the API returns, the progress stream sends and webhooks post: built in one place."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from hidream.service.settings import Settings
from hidream.service.storage import Storage, UrlSigner
from hidream.service.store import Store, utcnow

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def iso(ts: datetime | None) -> str | None:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if ts else None


def eta_s(row: dict[str, Any], now: datetime | None = None) -> float | None:
    """Seconds left, from the pace so far (None before the first step)."""
    step, total, started = row.get("progress_step") or 0, row.get("progress_total"), row.get("started_at")
    if row["status"] != "processing" or not total or step <= 0 or started is None:
        return None
    elapsed = max(((now or utcnow()) - started).total_seconds(), 0.0)
    return round(elapsed / step * (total - step), 2)


def progress_of(row: dict[str, Any]) -> dict[str, Any] | None:
    if row["status"] != "processing" or not row.get("progress_total"):
        return None
    return {"step": row["progress_step"] or 0, "total": row["progress_total"], "eta_s": eta_s(row)}


class Renderer:
    """Turns task rows into prediction objects: outputs as signed URLs (or data: URIs), webhook attempts."""

    def __init__(self, settings: Settings, store: Store, storage: Storage, signer: UrlSigner) -> None:
        self.settings, self.store, self.storage, self.signer = settings, store, storage, signer

    def one(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.many([row])[0]

    def many(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        attempts = self.store.webhook_attempts([r["id"] for r in rows if r.get("webhook_url")])
        return [self._render(r, attempts.get(r["id"], [])) for r in rows]

    def _render(self, row: dict[str, Any], attempts: list[dict[str, Any]]) -> dict[str, Any]:
        inp = row["input"]
        warnings = inp.get("warnings", [])  # kept with the input, shown beside it
        inp = {k: v for k, v in inp.items() if k != "warnings"}
        if row["status"] == "completed" and inp.get("enable_base64_output"):
            mime = MIME[inp["output_format"]]
            outputs = [f"data:{mime};base64,{base64.b64encode(self.storage.get(k)).decode()}" for k in row["outputs"]]
        else:
            outputs = [self.storage.public_url(k) or self.signer.url(k) for k in row["outputs"]]
        # Our own file URLs among the references are signed afresh: a reopened prediction still shows them.
        refs = [self.signer.url(k) if (k := self.signer.key_of(u)) is not None else u
                for u in inp.get("reference_image_urls", [])]
        if refs:
            inp = inp | {"reference_image_urls": refs}
        webhook = None
        if row.get("webhook_url"):
            webhook = {"url": row["webhook_url"], "state": row.get("webhook_state") or "waiting",
                       "attempts": [{"at": iso(a["at"]), "status_code": a["status_code"], "error": a["error"],
                                     "duration_ms": a["duration_ms"]} for a in attempts]}
        return {
            "id": row["id"], "model": row["model"], "status": row["status"], "input": inp, "outputs": outputs,
            "urls": {"get": f"{self.settings.base_url}/api/v1/model/prediction/{row['id']}"},
            "has_nsfw_contents": [False] * len(outputs), "error": row["error"] or "",
            "created_at": iso(row["created_at"]), "started_at": iso(row["started_at"]),
            "completed_at": iso(row["completed_at"]), "timings": {"inference": row["inference_ms"]},
            "progress": progress_of(row), "webhook": webhook, "warnings": warnings,
        }
