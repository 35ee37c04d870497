"""The transaction schema and the one definition of every feature: pure offline
transforms, the Ray Data pipeline, and the online state shared by replicas."""
