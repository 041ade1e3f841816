"""``/healthz``: liveness and load, for load balancers and operators."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .. import schemas as s
from ..deps import ServiceDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=s.HealthResponse, responses={})
async def healthz(request: Request, service: ServiceDep):
    """Liveness and load: no auth, no database access."""
    return {
        "status": "draining" if service.draining else "ok",
        "auth": "local-only" if request.app.state.keyring.local_only else "api-keys",
        "in_flight": service.in_flight,
        "agents_loaded": service.agents_loaded,
    }
