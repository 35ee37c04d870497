"""A no-op FastAPI ingress answering a constant: the floor that benchmarks compare /predict with."""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve

noop_app = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(noop_app)
class NoopIngress:
    @noop_app.post("/predict")
    async def predict(self, body: dict) -> dict:
        return {"risk_score": 0.5, "anomaly": False}
