"""Label Studio review of bad answers, through `label-studio-sdk`.

Thumbs-down and low-confidence answers become review tasks: the prompt, the model's answer
and why it is there, with the user's correction (or else the answer) pre-filled in the
correction box as a prediction, so a reviewer edits rather than retypes. A reviewer chooses
approve, correct or reject. Finished reviews come back as `CuratedItem`s: approved answers as
they were, corrected ones with the reviewer's text.
Rejected and cancelled ones are counted and never used.

The server and its token come from `LABEL_STUDIO_URL` (default http://127.0.0.1:8080) and
`LABEL_STUDIO_API_KEY`; `make labelstudio` starts a local server with that token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from components.data.curated import CuratedItem
from components.inference.records import Answer
from components.paths import label_studio_dir, local_secret
from components.settings import settings

LABEL_CONFIG = """<View>
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Model answer"/>
  <Text name="answer" value="$answer"/>
  <Header value="Why it is here"/>
  <Text name="reason" value="$reason"/>
  <Choices name="verdict" toName="answer" choice="single-radio" showInline="true" required="true">
    <Choice value="approve" hint="The answer is right as it is"/>
    <Choice value="correct" hint="Edit the answer below into the right one"/>
    <Choice value="reject" hint="Not usable for training"/>
  </Choices>
  <Header value="Correction"/>
  <TextArea name="correction" toName="answer" editable="true" maxSubmissions="1" rows="5"/>
</View>"""


class ReviewError(RuntimeError):
    """Label Studio is not configured or not reachable."""


@dataclass(frozen=True)
class Review:
    """The latest annotation of one task."""

    task_id: int
    request_id: str
    prompt: str
    answer: str
    model_version: str
    verdict: str  # approve, correct, reject or cancelled
    correction: str


def label_studio_token(create: bool = False) -> str:
    """`LABEL_STUDIO_API_KEY`, else the local server's token (`$FLYWHEEL_HOME/labelstudio/
    token`), made first when `create` (the local server takes it on its first start); "" if
    there is none."""
    if key := settings().label_studio_api_key:
        return key
    token_file = label_studio_dir() / "token"
    if create or token_file.is_file():
        return local_secret(token_file)
    return ""


def label_studio_settings() -> tuple[str, str]:
    """The server URL and token: the environment, else the local server's token file."""
    url = settings().label_studio_url.rstrip("/")
    token = label_studio_token()
    if not token:
        raise ReviewError(
            "no Label Studio token: set LABEL_STUDIO_API_KEY (and LABEL_STUDIO_URL), "
            "or start a local server with `make labelstudio`"
        )
    return url, token


def review_candidates(
    answers: list[Answer],
    low_confidence: float,
    siblings_of: Callable[[str], str] | None = None,
) -> list[tuple[Answer, str]]:
    """Answers a person should look at, each with the reason: thumbs-down or low confidence.
    With `siblings_of` (the memory's), a correction's reason also lists the corrections of
    its family already served, so the reviewer sees a conflict before approving."""
    chosen = []
    for answer in answers:
        if answer.rating == "down":
            reason = "thumbs-down from a user"
            if answer.correction:
                reason += f"; the user's correction: {answer.correction}"
                if siblings_of is not None and (family := siblings_of(answer.correction)):
                    reason += f"; the memory already serves its siblings: {family}"
            if answer.comment:
                reason += f"; comment: {answer.comment}"
            chosen.append((answer, reason))
        elif answer.confidence is not None and answer.confidence < low_confidence:
            chosen.append((answer, f"low confidence {answer.confidence:.2f} < {low_confidence}"))
    return chosen


def _task(answer: Answer, reason: str) -> dict[str, Any]:
    prediction: dict[str, Any] = {
        "model_version": answer.model_version,
        "result": [
            {
                "from_name": "correction",
                "to_name": "answer",
                "type": "textarea",
                "value": {"text": [answer.correction or answer.response]},
            }
        ],
    }
    if answer.confidence is not None:
        prediction["score"] = answer.confidence
    return {
        "data": {
            "prompt": answer.prompt,
            "answer": answer.response,
            "reason": reason,
            "request_id": answer.request_id,
            "model_version": answer.model_version,
        },
        "predictions": [prediction],
    }


def _latest(annotations: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not annotations:
        return None
    return max(annotations, key=lambda a: (str(a.get("updated_at") or ""), a.get("id") or 0))


def parse_review(task: dict[str, Any]) -> Review | None:
    """The task's latest annotation as a `Review`; None if nobody has finished it."""
    annotation = _latest(task.get("annotations") or [])
    if annotation is None:
        return None
    data = task["data"]
    verdict, correction = "reject", ""
    for region in annotation.get("result") or []:
        value = region.get("value") or {}
        if region.get("from_name") == "verdict" and value.get("choices"):
            verdict = str(value["choices"][0])
        elif region.get("from_name") == "correction" and value.get("text"):
            correction = str(value["text"][-1]).strip()
    if annotation.get("was_cancelled"):
        verdict = "cancelled"
    return Review(
        task_id=int(task["id"]),
        request_id=str(data.get("request_id", "")),
        prompt=str(data.get("prompt", "")),
        answer=str(data.get("answer", "")),
        model_version=str(data.get("model_version", "")),
        verdict=verdict,
        correction=correction,
    )


def curated_items(reviews: list[Review]) -> tuple[list[CuratedItem], Counter[str]]:
    """Approved and corrected reviews as training items; the counts of every verdict."""
    counts: Counter[str] = Counter()
    items = []
    for review in reviews:
        verdict = review.verdict
        if verdict == "correct" and review.correction in ("", review.answer.strip()):
            verdict = "correct_without_change"  # nothing was corrected: not used
        counts[verdict] += 1
        if verdict in ("approve", "correct"):
            answer = review.answer if verdict == "approve" else review.correction
            items.append(CuratedItem.answering(review, answer, "label-studio", verdict, "reviewed"))
    return items, counts


class ReviewProject:
    """The review project on a Label Studio server, created on first use."""

    def __init__(self, client: Any, project_id: int, url: str) -> None:
        self.client = client
        self.id = project_id
        self.url = f"{url}/projects/{project_id}"

    @classmethod
    def connect(cls, title: str) -> ReviewProject:
        from label_studio_sdk import LabelStudio

        url, token = label_studio_settings()
        client: Any = LabelStudio(base_url=url, api_key=token)
        try:
            existing = [p for p in client.projects.list(title=title) if p.title == title]
        except Exception as exc:  # the SDK raises httpx and API errors alike
            raise ReviewError(f"cannot reach Label Studio at {url}: {exc}") from exc
        if existing:
            return cls(client, int(existing[0].id), url)
        project: Any = client.projects.create(
            title=title,
            description="Answers users rated down or the model was unsure of. "
            "Approve, correct or reject; approved and corrected ones become training data.",
            label_config=LABEL_CONFIG,
        )
        return cls(client, int(project.id), url)

    def tasks(self) -> list[dict[str, Any]]:
        """Every task with its annotations, as plain dicts."""
        pages = self.client.tasks.list(project=self.id, fields="all", page_size=100)
        return [task.model_dump() if hasattr(task, "model_dump") else dict(task) for task in pages]

    def push(self, candidates: list[tuple[Answer, str]], limit: int) -> int:
        """Add the candidates that are not in the project yet; returns how many were added."""
        present = {str(t["data"].get("request_id")) for t in self.tasks()}
        new = [(a, r) for a, r in candidates if a.request_id not in present][:limit]
        if new:
            self.client.projects.import_tasks(
                id=self.id, request=[_task(a, r) for a, r in new], return_task_ids=True
            )
        return len(new)

    def reviews(self) -> list[Review]:
        return [r for t in self.tasks() if (r := parse_review(t)) is not None]
