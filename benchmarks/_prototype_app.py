"""What the original prototype did per request, as a single-process FastAPI app.

Per request: a one-row pandas frame, its features computed inside that frame,
sklearn `decision_function` and `predict`, `shap.TreeExplainer`, and one
database commit. Run by benchmarks as `uvicorn benchmarks._prototype_app:app`.
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pandas as pd
import shap
from fastapi import FastAPI
from sklearn.ensemble import IsolationForest
from sqlalchemy import create_engine, text

from features.definitions import FEATURE_NAMES
from features.transforms import compute_features

SAMPLE = os.environ.get("PROTOTYPE_SAMPLE", "data/sample_transactions.csv")
engine = create_engine(os.environ["PROTOTYPE_DATABASE_URL"])
with engine.begin() as conn:
    conn.execute(text("CREATE TABLE IF NOT EXISTS prototype_audit "
                      "(transaction_id text PRIMARY KEY, body jsonb)"))

_history = pd.read_csv(SAMPLE)
_X = compute_features(_history)[list(FEATURE_NAMES)].to_numpy()
model = IsolationForest(n_estimators=100, max_samples=256, contamination=0.02, random_state=0).fit(_X)
explainer = shap.TreeExplainer(model)
app = FastAPI()


@app.post("/predict")
def predict(body: dict) -> dict:
    frame = pd.DataFrame([body | {"transaction_id": body.get("transaction_id") or str(uuid.uuid4())}])
    X = compute_features(frame)[list(FEATURE_NAMES)].to_numpy()
    score = float(model.decision_function(X)[0])
    flag = bool(model.predict(X)[0] == -1)
    values = np.asarray(explainer.shap_values(X))[0]
    result = {"transaction_id": frame["transaction_id"][0], "score": score, "anomaly": flag,
              "explanation": dict(zip(FEATURE_NAMES, map(float, values)))}
    with engine.begin() as conn:  # one commit per request
        conn.execute(text("INSERT INTO prototype_audit VALUES (:t, CAST(:b AS jsonb))"),
                     {"t": result["transaction_id"], "b": json.dumps(result)})
    return result
