"""Teacher requests: one per (question, sample index), named by what changes the answer.

A request id hashes exactly what changes the answer: backend, model, the rendered prompt
(template name, version and text), the sampling parameters, the question id and the sample
index. Never the API key, the endpoint's URL, the concurrency or the budget, so
- a changed temperature sends only the requests whose id changed,
- re-parsing downstream never calls the teacher again.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import pyarrow as pa

from storage.keys import code_version, digest, file_fingerprint, import_closure
from tasks.config.teacher import SAME_REQUESTS_AS, TeacherConfig
from tasks.core.prompts import Exemplar, Rendered, Template, answer_trigger, chat_as_text, get_template, with_reasoning
from tasks.teacher_backends.base import TeacherInputError, TeacherRequest

REQUEST_ID_VERSION = 1  # bump only if the request-id recipe itself changes
# each backend's module; its code version covers what it imports (storage.keys.import_closure)
BACKEND_MODULES: dict[str, str] = {
    "scripted": "tasks.teacher_backends.scripted",
    "openai": "tasks.teacher_backends.openai_backend",
    "replay": "tasks.teacher_backends.replay",
    "hf": "tasks.teacher_backends.hf",
    "openai_batch": "tasks.teacher_backends.openai_batch",
}


def backend_source(cfg: TeacherConfig) -> dict[str, Any]:
    """What identifies the backend's output beyond model and params, hashed into request ids.

    Free backends (scripted, replay, hf) include their code version and data, so editing the
    generator or the recorded file yields new rows; the paid `openai` backend includes nothing
    more (the endpoint URL and our client code never justify paying again).
    """
    if SAME_REQUESTS_AS.get(cfg.backend, cfg.backend) == "openai":
        return {}
    source: dict[str, Any] = {"code": code_version(import_closure(BACKEND_MODULES[cfg.backend]))}
    if cfg.backend == "scripted":
        source["error_rate"] = cfg.error_rate
    elif cfg.backend == "replay":
        if not os.path.isfile(str(cfg.replay_path)):
            raise TeacherInputError(f"teacher.replay_path: no such file {cfg.replay_path!r}")
        source.update(file=file_fingerprint(str(cfg.replay_path)), format=cfg.replay_format)
    elif cfg.backend == "hf":
        source["model_dir"] = cfg.hf_model
    return source


def sampling_params(cfg: TeacherConfig, sample: int) -> dict[str, Any]:
    """The parameters sent with sample `sample` (seeded samples get seed + sample).

    `top_logprobs` is a key only when set: it changes what the response holds, so it names a
    new request, while every request id made before the field existed stays what it was."""
    params: dict[str, Any] = {
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_tokens": cfg.max_tokens,
        "seed": None if cfg.seed is None else cfg.seed + sample,
        "stop": list(cfg.stop),
    }
    if cfg.top_logprobs is not None:
        params["top_logprobs"] = cfg.top_logprobs
    return params


def request_id(
    cfg: TeacherConfig,
    source: dict[str, Any],
    template: Template,
    body: dict[str, Any],
    params: dict[str, Any],
    question_id: str,
    sample: int,
) -> str:
    """The id of one request; `body` is what is sent ({"messages": ...} or {"prompt": ...})."""
    return digest(
        {
            "v": REQUEST_ID_VERSION,
            # openai_batch sends openai's requests: one id, so both share the ledger
            "backend": SAME_REQUESTS_AS.get(cfg.backend, cfg.backend),
            "source": source,
            "model": cfg.model,
            "api": cfg.api,
            "template": [template.name, template.version],
            **body,
            "params": params,
            "n": cfg.samples if cfg.use_n else 1,
            # two questions with the same text are still two rows of the table
            "question_id": question_id,
            "sample": sample,
        },
        length=24,
    )


def build_requests(questions: pa.Table, cfg: TeacherConfig) -> list[TeacherRequest]:
    """One request per (question in `cfg.splits`, sample index), in question order."""
    template = get_template(cfg.template)
    exemplars = [Exemplar(e.question, e.rationale, e.answer) for e in cfg.exemplars]
    source = backend_source(cfg)
    cols = questions.select(["question_id", "split", "question", "meta"]).to_pydict()
    wanted = set(cfg.splits)
    out: list[TeacherRequest] = []
    for qid, split, text, meta in zip(cols["question_id"], cols["split"], cols["question"], cols["meta"]):
        if split not in wanted:
            continue
        if not text:
            raise TeacherInputError(f"questions: row {qid!r} has an empty question")
        rendered = template.render(text, exemplars, cfg.system_prompt)
        body = {"messages": list(rendered.messages)} if cfg.api == "chat" else {"prompt": rendered.prompt}
        prompt = chat_as_text(rendered.messages) if cfg.api == "chat" else rendered.prompt
        part = "reasoning" if cfg.protocol == "two_stage" else "completion"
        for sample in range(cfg.samples):
            params = sampling_params(cfg, sample)
            # the reasoning request is the one-stage request itself: its id does not name the part
            rid = request_id(cfg, source, template, body, params, qid, sample)
            out.append(
                TeacherRequest(rid, qid, sample, rendered.messages, prompt, cfg.model, params, meta or "{}", part)
            )
    return out


def build_answer_requests(
    questions: pa.Table, cfg: TeacherConfig, reasoning: Sequence[TeacherRequest], completions: dict[str, str]
) -> list[TeacherRequest]:
    """Two-stage zero-shot-CoT's second requests: one per reasoning request with a completion
    (`completions`: request id -> reasoning text), its prompt continued by the reasoning and the
    answer trigger of the question's answer type. The id covers the reasoning text, so a new
    reasoning is a new request and a rerun pays for none."""
    template = get_template(cfg.template)
    exemplars = [Exemplar(e.question, e.rationale, e.answer) for e in cfg.exemplars]
    source = backend_source(cfg)
    cols = questions.select(["question_id", "question", "answer_type"]).to_pydict()
    info = {q: (t, k) for q, t, k in zip(cols["question_id"], cols["question"], cols["answer_type"])}
    out: list[TeacherRequest] = []
    for r in reasoning:
        if r.request_id not in completions:
            continue
        text, kind = info[r.question_id]
        first = template.render(text, exemplars, cfg.system_prompt)
        rendered: Rendered = with_reasoning(first, completions[r.request_id], answer_trigger(kind, text))
        body = {"messages": list(rendered.messages)} if cfg.api == "chat" else {"prompt": rendered.prompt}
        body["part"] = "answer"
        # the answer call's few tokens are no rationale: no log-probs asked (KD reads the reasoning)
        params = {**{k: v for k, v in r.params.items() if k != "top_logprobs"}, "max_tokens": cfg.answer_max_tokens}
        rid = request_id(cfg, source, template, body, params, r.question_id, r.sample)
        prompt = chat_as_text(rendered.messages) if cfg.api == "chat" else rendered.prompt
        out.append(TeacherRequest(rid, r.question_id, r.sample, rendered.messages, prompt, r.model, params, r.meta, "answer"))
    return out


def check_requests(requests: Sequence[TeacherRequest], cfg: TeacherConfig) -> None:
    """Refuse an empty request list and two requests with one id (a repeated question id)."""
    if not requests:
        raise TeacherInputError(f"teacher: the dataset has no questions in splits {cfg.splits} (teacher.splits)")
    seen: set[str] = set()
    for r in requests:
        if r.request_id in seen:
            raise TeacherInputError(f"questions: question_id {r.question_id!r} appears more than once")
        seen.add(r.request_id)
