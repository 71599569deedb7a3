"""The MLflow pyfunc model of a Flywheel version: base model + LoRA adapter.

Logged as "models from code": MLflow executes this file when it loads a version, and
`set_model` below tells it which object to use. Input: a DataFrame with a `prompt` column.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from components.config import ModelConfig
from components.model.base_model import resolve_base_model
from components.model.generation import generate_chat, load_for_inference


class FlywheelAdapterModel(PythonModel):
    def load_context(self, context):
        ref = json.loads(Path(context.artifacts["base_model"]).read_text())
        base = resolve_base_model(ModelConfig(base_model=ref["name"], revision=ref["revision"]))
        self.model, self.tokenizer = load_for_inference(base.path, context.artifacts["adapter"])

    def predict(self, context, model_input, params=None):
        max_new_tokens = int((params or {}).get("max_new_tokens", 64))
        conversations = [[{"role": "user", "content": p}] for p in model_input["prompt"]]
        return [
            g.text for g in generate_chat(self.model, self.tokenizer, conversations, max_new_tokens)
        ]


set_model(FlywheelAdapterModel())
