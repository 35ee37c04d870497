"""The compiled Isolation Forest, its exact TreeSHAP explainer, risk semantics
(what `risk_score`, `anomaly` and an explanation's sign mean) and safe persistence."""
