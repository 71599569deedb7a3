"""Training across GPUs: `finetune` in the processes that `accelerate launch` starts.

With `train.accelerate_config` in the profile (deployments/accelerate/), the fine-tune task
does not train in its own process. It writes what `finetune` needs to `launch.json` in the
run's output folder and runs

    accelerate launch --config_file <train.accelerate_config> -m components.train.launch launch.json

Every process loads the model and trains on its share of each batch (DDP, or FSDP sharding
the weights when the config says so); the main process logs to the MLflow run, writes the
adapter and `finetune_result.json`, which the task reads back. A rerun resumes from the last
checkpoint as a single-process run does.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from components.config import PipelineConfig
from components.model.base_model import BaseModelRef
from components.paths import REPO_ROOT, resolve_path
from components.registry.tracking import RunLogger
from components.train.finetune import FinetuneResult, finetune

log = logging.getLogger(__name__)

RESULT_FILE = "finetune_result.json"
# An exception as a launched process prints it: "[rank0]: ValueError: ...".
_EXCEPTION = re.compile(r"^(\[rank\d+\]: )?(?P<exception>[\w.]*(Error|Exception): .*)$")


@dataclass(frozen=True)
class LaunchSpec:
    """The arguments of `finetune`, as a file the launched processes read."""

    config: dict
    base: dict
    train_path: str
    validation_path: str | None
    output_dir: str
    run_id: str | None
    init_adapter: str | None
    stop_path: str | None


def launch_command(config_file: Path, spec_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "-m",
        "components.train.launch",
        str(spec_path),
    ]


def launched_finetune(
    config: PipelineConfig,
    base: BaseModelRef,
    train_path: str,
    validation_path: str | None,
    output_dir: Path,
    run_id: str | None = None,
    init_adapter: str | None = None,
    stop_path: str | None = None,
) -> FinetuneResult:
    """`finetune` through `accelerate launch` with the profile's `train.accelerate_config`;
    the launched processes' output goes to this process's log as it comes."""
    if not config.train.accelerate_config:
        raise ValueError("train.accelerate_config is not set: nothing to launch")
    output_dir.mkdir(parents=True, exist_ok=True)
    spec = LaunchSpec(
        config=config.model_dump(mode="json"),
        base=asdict(base),
        train_path=train_path,
        validation_path=validation_path,
        output_dir=str(output_dir),
        run_id=run_id,
        init_adapter=init_adapter,
        stop_path=stop_path,
    )
    spec_path = output_dir / "launch.json"
    spec_path.write_text(json.dumps(asdict(spec), indent=1))
    result_path = output_dir / RESULT_FILE
    result_path.unlink(missing_ok=True)
    command = launch_command(resolve_path(config.train.accelerate_config), spec_path)
    log.info("training with %s", " ".join(command[2:]))
    tail: deque[str] = deque(maxlen=40)
    errors: list[str] = []  # the processes' own exceptions, before the launcher's
    with subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            log.info("%s", line.rstrip())
            if match := _EXCEPTION.match(line):
                errors.append(match["exception"])
    if process.returncode != 0 or not result_path.is_file():
        cause = errors[0] if errors else "no exception printed"
        raise RuntimeError(
            f"accelerate launch exited with {process.returncode}: {cause}; its last lines:\n"
            + "\n".join(tail)
        )
    return FinetuneResult(**json.loads(result_path.read_text()))


def main(argv: list[str] | None = None) -> None:
    """One launched process: train, and (the main process) write the result."""
    from accelerate import PartialState

    (spec_file,) = argv if argv is not None else sys.argv[1:]
    spec = LaunchSpec(**json.loads(Path(spec_file).read_text()))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = finetune(
        PipelineConfig.model_validate(spec.config),
        BaseModelRef(**spec.base),
        spec.train_path,
        spec.validation_path,
        Path(spec.output_dir),
        on_log=RunLogger(spec.run_id).training_log if spec.run_id else None,
        init_adapter=spec.init_adapter,
        stop_path=spec.stop_path,
    )
    if PartialState().is_main_process:
        (Path(spec.output_dir) / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=1))


if __name__ == "__main__":
    main()
