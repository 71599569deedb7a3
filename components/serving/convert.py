"""A registered version prepared for the OpenVINO engine: the adapter merged into the base
weights, exported to OpenVINO IR with compressed weights, cached per version.

The exporter (`optimum-intel`) pins an older transformers than the project's, so it runs in an
environment of its own (`make engine-setup` builds `.venv-export`; `FLYWHEEL_EXPORT_VENV`
names another). The service itself needs only the OpenVINO runtime.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path

from components.model.generation import load_for_inference
from components.settings import settings

log = logging.getLogger("flywheel.convert")
MARKER = "openvino_model.xml"


class ConversionUnavailable(RuntimeError):
    """The version cannot be converted here (no exporter, or the export failed)."""


def export_venv() -> Path:
    return settings().export_venv.resolve()


def openvino_folder(
    version_dir: Path, base_path: str, adapter_dir: str | None, weights: str
) -> Path:
    """`version_dir/openvino-<weights>`, exported once from base (+ adapter) and reused after."""
    out = version_dir / f"openvino-{weights}"
    if (out / MARKER).is_file():
        return out
    cli = export_venv() / "bin" / "optimum-cli"
    if not cli.is_file():
        raise ConversionUnavailable(f"no exporter at {cli}: run `make engine-setup`")

    with tempfile.TemporaryDirectory(dir=version_dir) as tmp:
        merged, exported = Path(tmp) / "merged", Path(tmp) / "openvino"
        model, tokenizer = load_for_inference(base_path, adapter_dir, device="cpu")
        model.save_pretrained(merged)
        tokenizer.save_pretrained(merged)
        del model
        command = [str(cli), "export", "openvino", "--model", str(merged)]
        command += ["--task", "text-generation-with-past", "--weight-format", weights]
        log.info("exporting %s to OpenVINO (%s weights)", version_dir.name, weights)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        done = subprocess.run(
            [*command, str(exported)], capture_output=True, text=True, env=env, check=False
        )
        if done.returncode != 0 or not (exported / MARKER).is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise ConversionUnavailable(f"OpenVINO export failed: {' | '.join(tail)}")
        exported.rename(out)
    return out
