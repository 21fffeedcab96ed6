"""Probes: `/livez` (the process answers) and `/readyz` = `/healthz` (it can serve generations)."""

import logging

from fastapi import APIRouter

from hidream.service.context import Ctx, envelope
from hidream.service.worker import WorkerState

log = logging.getLogger("hidream.api")
router = APIRouter(include_in_schema=False)


@router.get("/livez")
async def livez():
    """200 while the process serves requests; it checks nothing else (a liveness probe)."""
    return envelope({"alive": True})


@router.get("/readyz")
@router.get("/healthz")
def readyz(ctx: Ctx):
    """200 when the database answers and the in-process worker, if any, has its model; else 503 naming why."""
    worker = ctx.worker
    state = worker.state.value if worker else None
    if worker is not None and worker.load_error is not None:
        return envelope({"ready": False, "worker": state}, 503, f"no model loaded: {worker.load_error}")
    if worker is not None and worker.state is WorkerState.STARTING:
        return envelope({"ready": False, "worker": state}, 503, "the worker is still loading the model")
    if worker is not None and worker.state in (WorkerState.STOPPING, WorkerState.STOPPED):
        return envelope({"ready": False, "worker": state}, 503, "the worker is shutting down")
    try:
        ctx.store.ping()
    except Exception as err:
        log.warning("readiness: the database does not answer (%s)", err)
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        return envelope({"ready": False, "worker": state}, 503,
                        f"database unreachable: {type(err).__name__}: {reason}")
    return envelope({"ready": True, "worker": state})
