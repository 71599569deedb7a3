"""The BentoML service: serving the champion model (see bentofile.yaml)."""
