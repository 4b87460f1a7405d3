"""The `teacher` section: which teacher writes rationales, how it is asked, and its runtime limits."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tasks.config.base import KpodModel, runtime_field


TemplateName = Literal["zero_shot_cot", "few_shot_cot"]
# worked examples each template needs (tasks/core/prompts.py renders them)
TEMPLATE_MIN_EXEMPLARS: dict[str, int] = {"zero_shot_cot": 0, "few_shot_cot": 1}


# fields that only the named backend reads: left out of the stage key for the other backends
BACKEND_ONLY_FIELDS: dict[str, tuple[str, ...]] = {
    "scripted": ("error_rate",),
    "replay": ("replay_path", "replay_format"),
    "hf": ("hf_model",),
}


# a backend that sends another backend's requests by another route (the Batch API): its request
# ids, ledger rows and stage key are that backend's, so a batch run and an online run of one
# config share the ledger and the cache
SAME_REQUESTS_AS: dict[str, str] = {"openai_batch": "openai"}


# ---- config ------------------------------------------------------------------------------
class Price(KpodModel):
    input_per_1k: float = Field(..., ge=0, description="US dollars per 1000 prompt tokens.")
    output_per_1k: float = Field(..., ge=0, description="US dollars per 1000 completion tokens.")


class PromptExemplar(KpodModel):
    question: str = Field(..., min_length=1, description="The exemplar's question.")
    rationale: str = Field(..., min_length=1, description="Its worked chain of thought.")
    answer: str = Field(..., min_length=1, description="Its final answer.")


class TeacherConfig(KpodModel):
    backend: Literal["scripted", "openai", "replay", "hf", "openai_batch"] = Field(
        "scripted",
        description="scripted: the offline teacher for synthetic questions; openai: any "
        "OpenAI-compatible endpoint; replay: recorded teacher output; hf: a local model; "
        "openai_batch: the openai backend's requests sent through the Batch API (files and "
        "batches, half price, results within 24 h; same request ids and ledger as openai).",
    )
    model: str = Field(
        "scripted", min_length=1, description="Model name sent to the endpoint (and the price table key)."
    )
    splits: list[Literal["train", "val", "test"]] = Field(
        default_factory=lambda: ["train"],
        min_length=1,
        description="Question splits to ask the teacher about (rationales train the student).",
    )
    samples: int = Field(1, ge=1, le=256, description="Rationales sampled per question.")
    protocol: Literal["one_stage", "two_stage"] = Field(
        "one_stage",
        description="one_stage: one request per rationale, graded on its text; two_stage: "
        "zero-shot-CoT as Kojima et al. 2022 (and the Fine-tune-CoT / Mentor-KD data): the "
        "reasoning request, then an answer-extraction request that appends the reasoning and the "
        "task's answer trigger ('Therefore, the answer (arabic numerals) is', 'Therefore, among A "
        "through E, the answer is', ...); the rationale is the reasoning, the teacher's answer the "
        "second call's. Both requests are ledgered and cached. Not for the replay backend (a "
        "recorded file's answer field is read by rationales.source_labels).",
    )
    answer_max_tokens: int = Field(
        32, ge=1, le=4096, description="two_stage: completion cap of the answer-extraction request "
        "(Kojima et al. use 32)."
    )
    template: TemplateName = Field(
        "zero_shot_cot", description="Prompt template from tasks/core/prompts.py (its version is hashed)."
    )
    exemplars: list[PromptExemplar] = Field(
        default_factory=list, description="Worked examples for the few_shot_cot template."
    )
    system_prompt: str | None = Field(
        None, description="Optional system message (chat) or first paragraph (completions)."
    )
    api: Literal["chat", "completions"] = Field(
        "chat", description="Chat completions, or legacy text completions for instruct models."
    )
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(512, ge=1, le=1_000_000, description="Completion length cap in tokens.")
    seed: int | None = Field(
        None, ge=0, description="Sampling seed; sample i is sent seed + i so samples differ."
    )
    stop: list[str] = Field(default_factory=list, max_length=4, description="Stop sequences.")
    top_logprobs: int | None = Field(
        None, ge=1, le=20,
        description="Ask for the log-probability of each generated token and of the k most likely "
        "tokens at its position (chat: logprobs + top_logprobs; completions: logprobs=k; OpenAI "
        "allows up to 20), stored in the table teacher_logprobs; mentor.kd.source teacher_topk "
        "trains on them. Part of each request id (the answer holds more), so turning it on sends "
        "the requests again. A server that ignores it leaves the table without those rows (one "
        "warning). openai and openai_batch backends only. None: off.",
    )
    use_n: bool = Field(
        False,
        description="Ask for all samples of a question in one call with the API's `n` "
        "(servers that ignore `n` get the rest as single requests).",
    )
    # runtime: the request id (hence the ledger) never held the endpoint, so a response paid for
    # at one endpoint already served every other; the stage key now agrees (see base_urls)
    base_url: str | None = runtime_field(
        None, "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (None: OpenAI). Not in the "
        "stage key: like base_urls it says where the model is served, not what it answers.",
    )
    error_rate: float = Field(
        0.1, ge=0, le=1, description="scripted backend: probability that a rationale is wrong."
    )
    replay_path: str | None = Field(None, description="replay backend: the recorded output file.")
    replay_format: Literal["auto", "jsonl", "gsm8k", "mentor_kd", "mentor_kd_raw"] = Field(
        "auto", description="replay backend: how to read replay_path (auto: from its name and shape)."
    )
    hf_model: str | None = Field(None, description="hf backend: a local transformers model directory.")

    # ---- runtime: none of these changes what a request returns -------------------------
    api_key_env: str | None = runtime_field(
        "OPENAI_API_KEY", "NAME of the environment variable holding the API key (never the key)."
    )
    api_key_block: str | None = runtime_field(
        None, "Name of a Prefect Secret block holding the API key (used instead of api_key_env)."
    )
    prices: dict[str, Price] = runtime_field(
        {}, "Price per model name; gives teacher_calls.cost_usd and enforces max_cost_usd."
    )
    concurrency: int = runtime_field(16, "Requests in flight at once.", ge=1, le=4096)
    rpm: float | None = runtime_field(None, "Requests-per-minute limit (None: unlimited).", gt=0)
    tpm: float | None = runtime_field(
        None, "Tokens-per-minute limit, prompt estimate + max_tokens (None: unlimited).", gt=0
    )
    max_retries: int = runtime_field(6, "Retries of a transient failure before recording it.", ge=0, le=100)
    backoff_s: float = runtime_field(1.0, "First retry delay; doubles per attempt, jittered.", gt=0)
    backoff_max_s: float = runtime_field(60.0, "Cap on one retry delay (Retry-After may exceed it).", gt=0)
    request_timeout_s: float = runtime_field(
        120.0, "Timeout of one try of a request, in seconds, until its whole response has arrived "
        "(a retry gets its own).", gt=0)
    flush_every: int = runtime_field(32, "Ledger flush after this many finished requests.", ge=1)
    flush_seconds: float = runtime_field(5.0, "Ledger flush at least this often (seconds).", gt=0)
    max_cost_usd: float | None = runtime_field(
        None, "Stop issuing requests before this spend would be exceeded (None: no budget).", ge=0
    )
    max_error_fraction: float = runtime_field(
        0.05,
        "If more than this fraction of requests fail after retries, end the stage incomplete "
        "(a rerun retries them) instead of committing.",
        ge=0,
        le=1,
    )
    # the Batch API (backend openai_batch): how requests are packed and waited for, and their price
    batch_max_requests: int = runtime_field(
        50_000, "openai_batch: requests per batch input file (the API allows 50,000).", ge=1, le=50_000
    )
    batch_max_bytes: int = runtime_field(
        200_000_000, "openai_batch: bytes per batch input file (the API allows 200 MB).", ge=1, le=200_000_000
    )
    batch_poll_s: float = runtime_field(30.0, "openai_batch: seconds between polls of submitted batches.", gt=0)
    batch_wait_s: float | None = runtime_field(
        None, "openai_batch: stop waiting after this many seconds and end the stage incomplete; a rerun "
        "reattaches to the same batches (None: wait until every batch ends).", gt=0,
    )
    batch_discount: float = runtime_field(
        0.5, "openai_batch: multiplies teacher.prices (cost_usd, max_cost_usd) for batch requests; "
        "OpenAI bills the Batch API at half the online price.", gt=0, le=1,
    )
    scripted_delay_s: float = runtime_field(
        0.0, "scripted backend: artificial latency per request (tests, benchmarks).", ge=0
    )
    # refusing a file writes nothing, so the limit cannot change a committed output
    replay_max_chars: int = runtime_field(
        20_000, "replay backend: the longest recorded rationale accepted, in characters; a longer "
        "one is refused naming its file and row (the whole file is read into memory).", ge=1,
    )

    base_urls: list[str] = runtime_field(
        [],
        "Several OpenAI-compatible endpoints serving the same model (vLLM replicas): each call goes "
        "to the healthy one with the fewest requests in flight; one failing with a transient error "
        "(connection refused, 5xx, 429) is backed off (backoff_s doubling to backoff_max_s, or its "
        "Retry-After) while the others carry on. Exclusive with base_url. Not in the stage key: "
        "replicas of one model answer alike, so adding, removing or swapping one reuses the cache.",
    )
    shards: int = runtime_field(
        1,
        "Split the requests still missing from the ledger into this many shards, each sent by its "
        "own dispatcher with its own ledger writer. In a flow run each shard is a Prefect task on a "
        "thread pool, or on a Dask cluster with `kpod run --dask ADDRESS` (flow parameter `dask`); "
        "elsewhere they run one after another. concurrency, rpm, tpm and max_cost_usd stay limits "
        "of the whole stage: each shard gets an equal part. Not for openai_batch.",
        ge=1,
        le=1024,
    )
    http_client: Literal["aiohttp", "httpx"] = runtime_field(
        "aiohttp",
        "openai backend: the HTTP transport under the official openai client. aiohttp "
        "(openai.DefaultAioHttpClient, the openai[aiohttp] extra) costs the client ~2.3 CPU ms per "
        "request at 256 in flight; httpx (the client's own default) ~4.5 ms, much of it in its "
        "connection pool (bench/teacher_throughput.py). Both keep `concurrency` connections alive.",
    )
    header_limits: bool = runtime_field(
        True,
        "Honour the x-ratelimit-remaining/-reset headers of each endpoint's responses (requests and "
        "tokens): a call that would pass what is left waits until the announced reset. The rpm/tpm "
        "buckets still apply; the stricter wins. Until an endpoint first answers, one call probes it.",
    )

    @model_validator(mode="after")
    def _check_endpoints(self) -> "TeacherConfig":
        if self.base_urls and self.base_url is not None:
            raise ValueError("teacher.base_url and teacher.base_urls are exclusive: list every endpoint in base_urls")
        for i, url in enumerate(self.base_urls):
            if not url.startswith(("http://", "https://")):  # the URL is not echoed: it may hold a password
                raise ValueError(f"teacher.base_urls[{i}] is not an http(s) URL")
        if len(set(self.base_urls)) != len(self.base_urls):
            raise ValueError("teacher.base_urls lists an endpoint twice")
        if self.base_urls and self.backend == "openai_batch":  # else it would go to api.openai.com
            raise ValueError("teacher.base_urls is for the openai backend; openai_batch uses one teacher.base_url")
        if self.shards > 1 and self.backend == "openai_batch":  # the provider already spreads a batch
            raise ValueError("teacher.shards is for online backends; openai_batch sends through the Batch API")
        return self

    @model_validator(mode="after")
    def _check(self) -> "TeacherConfig":
        need = TEMPLATE_MIN_EXEMPLARS[self.template]
        if len(self.exemplars) < need:
            raise ValueError(f"template {self.template!r} needs at least {need} exemplar(s) in teacher.exemplars")
        if self.backend == "replay" and not self.replay_path:
            raise ValueError("backend 'replay' needs teacher.replay_path")
        if self.backend == "replay" and self.protocol == "two_stage":
            raise ValueError("teacher.protocol 'two_stage' needs a backend that answers new requests, not 'replay'")
        if self.top_logprobs is not None and SAME_REQUESTS_AS.get(self.backend, self.backend) != "openai":
            raise ValueError(f"teacher.top_logprobs needs backend 'openai' or 'openai_batch', not {self.backend!r}")
        if self.backend == "hf" and not self.hf_model:
            raise ValueError("backend 'hf' needs teacher.hf_model")
        return self

    def hashable(self) -> dict[str, Any]:
        # another backend's settings cannot change this backend's output
        data = super().hashable()
        own = set(BACKEND_ONLY_FIELDS.get(self.backend, ()))  # a field two backends read stays
        for backend, fields in BACKEND_ONLY_FIELDS.items():
            if backend != self.backend:
                for name in fields:
                    if name not in own:
                        data.pop(name, None)
        data["backend"] = SAME_REQUESTS_AS.get(self.backend, self.backend)
        return data
