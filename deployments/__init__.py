"""Ray Serve deployments: feature, model and SHAP steps, the FastAPI ingress,
the ingestion supervisor, the Gradio UI, and `app.py`, the one place where the
applications are bound. The top layer: it may import every other package, and
nothing imports it."""
