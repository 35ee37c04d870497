"""Ray Serve deployments: feature, model and SHAP steps, the FastAPI ingress,
the Gradio UI, and `app.py`, the one place where the application is bound."""
