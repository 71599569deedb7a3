"""The named models one generator holds, within the profile's memory budget.

`serve.models` names them (the champion, and for example a general model for questions
outside its domain); with `serve.canary.enabled`, the version at the registry alias `canary`
is served too, as `canary`. A request names its model (`GenerationInput.model`: a name, or
`<registered name>:<version>` of a served version; one the router chose falls back to the
champion while it is not serving); without one it goes to the champion, or,
for the canary's share of users, to the canary: the same user (or conversation) id always lands
on the same side. Each model swaps on its own (`load`), and any but the champion can be
unloaded.

The registry is the source of truth: every `serve.follow_s` seconds each model served from an
alias (`@champion`, `@canary`, `models:/name@alias`) is checked against where the alias points
now, and a move is followed (`catch_up`): the version is loaded, passes the memory budget and
a smoke generation, and is swapped in. A version that fails is not served: the previous one
stays, `listing` and the version's tag `serve.refused` say why, and it is not tried again
until the alias points elsewhere. A canary alias that is gone stops being served.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Generator
from typing import Any

from components.config import PipelineConfig
from components.registry.aliases import CANARY, CHAMPION, version_at
from components.registry.tracking import mlflow_client
from components.serving.cache import ResponseCache
from components.serving.loading import (
    LoadedModel,
    ModelNotFound,
    default_model_uri,
    resolve_model_uri,
)
from components.serving.model import ServedModel, run_inputs
from components.serving.protocol import GenerationInput, GenerationOutput, failed

log = logging.getLogger("flywheel.generator")
GB = 2**30


class BudgetExceeded(RuntimeError):
    """Loading this model would take the served models past `serve.memory_budget_gb`."""


class CannotUnload(ValueError):
    """The champion is swapped, never unloaded; or the name is not served."""


class SmokeFailed(RuntimeError):
    """A loaded version could not answer one short question."""


def to_canary(user: str | None, share: float) -> bool:
    """Whether a request goes to the canary: a fixed function of its user or conversation id
    (the same id, the same side), a draw for a request without one."""
    if user is None:
        return random.random() < share
    digest = hashlib.sha256(user.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


class ModelSet:
    def __init__(self, config: PipelineConfig, warmup: bool = True) -> None:
        self.config, self.warmup = config, warmup
        self.cache = ResponseCache.from_config(config.serve.cache, config.registry.model_name)
        self.slots: dict[str, ServedModel] = {}
        self.refused: dict[str, tuple[str, str]] = {}  # name -> (version, why), while named
        self._loading = threading.Lock()  # one load at a time, so the budget sees every model

    def sources(self) -> dict[str, str]:
        """What each name serves when the generator starts (the champion first)."""
        sources = {**self.config.serve.models, CHAMPION: default_model_uri(self.config)}
        if self.config.serve.canary.enabled:
            sources[CANARY] = f"@{CANARY}"
        return {CHAMPION: sources.pop(CHAMPION), **sources}

    @classmethod
    def load_in_background(cls, config: PipelineConfig, warmup: bool = True) -> ModelSet:
        """Every named model starts loading, one after the other, in a thread; the champion
        first. A canary the registry does not have is simply not served."""
        models = cls(config, warmup)
        sources = models.sources()
        for name in sources:
            models.slots[name] = ServedModel(warmup, config, models.cache)

        def load_all() -> None:
            for name, uri in sources.items():
                with models._loading:
                    if name == CANARY and version_at(config.registry.model_name, CANARY) is None:
                        del models.slots[name]
                        log.info("no canary in the registry: none is served")
                        continue
                    models.slots[name].load(uri, models._admission(name))
            models.follow()

        threading.Thread(target=load_all, name="model-load", daemon=True).start()
        return models

    def follow(self) -> None:
        """Check the registry every `serve.follow_s` seconds, in a thread (`catch_up`)."""
        interval = self.config.serve.follow_s
        if not interval:
            return

        def follow_forever() -> None:
            while True:
                time.sleep(interval)
                try:
                    self.catch_up()
                except Exception:  # the registry unreachable, say: try again next time
                    log.exception("following the registry failed")

        threading.Thread(target=follow_forever, name="registry-follow", daemon=True).start()

    def catch_up(self) -> dict[str, str]:
        """Serve the version each alias names now; says what became of each move."""
        done = {}
        for name, uri in self.sources().items():
            if "@" not in uri:
                continue  # a pinned version, or the base model: nothing to follow
            slot = self.slots.get(name)
            served = slot.loaded if slot is not None else None
            try:
                registered, version = resolve_model_uri(uri, self.config)
            except ModelNotFound:
                if name == CANARY and slot is not None:
                    self.unload(name)
                    done[name] = "the canary alias is gone: no longer served"
                continue
            if served is not None and (served.name, served.version) == (registered, version):
                continue
            if self.refused.get(name, ("", ""))[0] == version:
                continue
            done[name] = self._follow(name, registered, version)
        return done

    def _follow(self, name: str, registered: str, version: str) -> str:
        try:
            self.load(name, f"models:/{registered}/{version}", smoke=True)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"[:500]
            self.refused[name] = (version, why)
            log.error("not serving %s v%s as %s: %s", registered, version, name, why)
            _tag_refused(registered, version, why)
            return f"refused v{version}: {why}"
        self.refused.pop(name, None)
        log.info("following the registry: %s v%s serves as %s", registered, version, name)
        return f"serves v{version}"

    @property
    def ready(self) -> bool:
        return self.slots[CHAMPION].ready

    def _admission(self, name: str, smoke: bool = False) -> Any:
        """The check a model loaded as `name` must pass: all served models, with it in the
        place of what `name` serves now, within the memory budget; with `smoke`, one short
        answer without an error."""

        def admit(loaded: LoadedModel) -> None:
            if smoke:
                hello = GenerationInput(
                    messages=[{"role": "user", "content": "How do I run the tests?"}],
                    max_new_tokens=4,
                )
                [answer] = run_inputs(loaded, [hello])
                if answer.error or not answer.completion_tokens:
                    raise SmokeFailed(f"the smoke generation failed: {answer.error or 'empty'}")
            budget = self.config.serve.memory_budget_gb
            if budget is None:
                return
            others = {
                other: served.engine.memory_bytes
                for other, slot in self.slots.items()
                if other != name and (served := slot.loaded) is not None
            }
            total = sum(others.values()) + loaded.engine.memory_bytes
            if total > budget * GB:
                held = ", ".join(f"{n} {b / GB:.2f}" for n, b in others.items()) or "nothing"
                raise BudgetExceeded(
                    f"{name} needs {loaded.engine.memory_bytes / GB:.2f} GB; with what is served "
                    f"({held}) that is {total / GB:.2f} GB, over serve.memory_budget_gb "
                    f"{budget:g}"
                )

        return admit

    def load(self, name: str, uri: str, smoke: bool = False) -> LoadedModel:
        """Serve `uri` as `name`: a new model, or a swap of the one `name` serves."""
        with self._loading:
            slot = self.slots.get(name) or ServedModel(self.warmup, self.config, self.cache)
            loaded = slot.swap(uri, self._admission(name, smoke))
            self.slots[name] = slot
            return loaded

    def unload(self, name: str) -> None:
        if name == CHAMPION:
            raise CannotUnload("the champion is swapped (POST /admin/reload), not unloaded")
        with self._loading:
            slot = self.slots.pop(name, None)
        if slot is None:
            raise CannotUnload(f"no model named {name!r} is served")
        slot.unload()

    def listing(self) -> list[dict[str, Any]]:
        """Each served model: name, version, engine, memory, and why it is not ready."""
        rows = []
        for name, slot in list(self.slots.items()):
            loaded = slot.loaded
            row: dict[str, Any] = {"name": name, "ready": slot.ready}
            if loaded is not None:
                row.update(
                    model_name=loaded.name,
                    version=loaded.version,
                    engine=loaded.engine.name,
                    memory_gb=round(loaded.engine.memory_bytes / GB, 3),
                )
            if not row["ready"]:
                row["error"] = (loaded and loaded.engine.failure) or slot.error or "loading"
            if name in self.refused:
                version, why = self.refused[name]
                row["refused"] = {"version": version, "reason": why}
            rows.append(row)
        return rows

    def pick(self, item: GenerationInput) -> tuple[str, ServedModel] | GenerationOutput:
        """(name, model) that answers `item`, or an error output naming the `model` field."""
        name = item.model
        if name is None:
            canary = self.slots.get(CANARY)
            share = self.config.serve.canary.share
            use_canary = canary is not None and canary.ready and to_canary(item.user, share)
            name = CANARY if use_canary else CHAMPION
        slot = self.slots.get(name)
        if slot is None:
            slot, name = self._by_version(name)
        if item.routed and (slot is None or not slot.ready):
            name, slot = CHAMPION, self.slots[CHAMPION]  # the router's model is not serving
        if slot is None:
            served = ", ".join(self.slots)
            return failed(
                f"model {item.model!r} is not served here; GET /v1/models lists {served}",
                "model_not_found",
                "model",
            )
        return name, slot

    def _by_version(self, model: str) -> tuple[ServedModel | None, str]:
        """The model serving `<registered name>:<version>`, if one does."""
        registered, _, version = model.rpartition(":")
        for name, slot in list(self.slots.items()):
            loaded = slot.loaded
            if loaded is not None and (loaded.name, loaded.version) == (registered, version):
                return slot, name
        return None, model

    def generate(self, inputs: list[GenerationInput]) -> list[GenerationOutput]:
        """Each model generates for its inputs in one batched call; outputs in input order."""
        outputs: list[GenerationOutput | None] = [None] * len(inputs)
        groups: dict[str, tuple[ServedModel, list[int]]] = {}
        for i, item in enumerate(inputs):
            picked = self.pick(item)
            if isinstance(picked, GenerationOutput):
                outputs[i] = picked
            else:
                groups.setdefault(picked[0], (picked[1], []))[1].append(i)
        for name, (slot, indices) in groups.items():
            answers = slot.generate([inputs[i] for i in indices])
            for i, out in zip(indices, answers, strict=True):
                outputs[i] = out.model_copy(update={"model": name})
        return [out for out in outputs if out is not None]

    def stream(self, item: GenerationInput) -> Generator[GenerationOutput, None, None]:
        picked = self.pick(item)
        if isinstance(picked, GenerationOutput):
            yield picked
            return
        name, slot = picked
        pieces = slot.stream(item)
        try:
            for piece in pieces:
                yield piece.model_copy(update={"model": name})
        finally:
            pieces.close()

    def count_tokens(self, item: GenerationInput, answer: str) -> GenerationOutput:
        """A fixed answer (a correction, the scope reply), counted by the named model or the
        champion (it speaks for the service; the canary's share is for generations)."""
        picked = self.pick(item.model_copy(update={"model": item.model or CHAMPION}))
        if isinstance(picked, GenerationOutput):
            return picked
        name, slot = picked
        return slot.count_tokens(item, answer).model_copy(update={"model": name})


def _tag_refused(model_name: str, version: str, why: str) -> None:
    """Say on the version, in the registry, why a replica did not serve it."""
    try:
        mlflow_client().set_model_version_tag(model_name, version, "serve.refused", why)
    except Exception as exc:  # the replica keeps serving; the log has it
        log.warning("could not tag %s v%s: %s", model_name, version, exc)
