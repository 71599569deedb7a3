"""What each served model holds, for choosing `serve.memory_budget_gb`: loads the profile's
base model (the general model) under two names, one after the other, on the profile's engine,
and prints what each engine reports holding (weights and the KV cache it reserves) beside the
growth of this process's resident memory, and one greedy answer from each:

    .venv/bin/python -m benchmarks.fleet_memory --profile cpu-small
"""

from __future__ import annotations

import argparse

from components.config import load_profile
from components.serving.fleet import GB, ModelSet
from components.serving.protocol import GenerationInput


def resident_gb() -> float:
    """This process's resident memory (VmRSS)."""
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GB
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet_memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--profile", default="cpu-small")
    args = parser.parse_args(argv)

    config = load_profile(args.profile)
    models = ModelSet(config)
    question = GenerationInput(
        messages=[{"role": "user", "content": "What is a model registry?"}], max_new_tokens=16
    )
    print(f"profile {config.name}: engine {config.serve.engine.name}, {config.model.base_model}")
    print(f"{'model':<10} {'engine':<13} {'reported GB':>11} {'RSS growth GB':>13}  answer")
    for name in ("champion", "general"):
        before = resident_gb()
        loaded = models.load(name, "base")
        [out] = models.generate([question.model_copy(update={"model": name})])
        grown = resident_gb() - before
        reported = loaded.engine.memory_bytes / GB
        print(f"{name:<10} {loaded.engine.name:<13} {reported:>11.3f} {grown:>13.3f}  {out.text!r}")
    print(f"resident in all: {resident_gb():.3f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
