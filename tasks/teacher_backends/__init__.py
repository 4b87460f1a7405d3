"""The teacher: backends that each turn a `TeacherRequest` into a `TeacherResult` (scripted,
openai_backend, replay, hf; `factory.make_backend` picks one; openai_batch sends openai's
requests through the Batch API instead), and the machinery around them:
`requests` builds the requests and their ids, `dispatcher` sends them (budget, retries, rate
limits, ledger appends), `teach` runs it all over the ledger for the teacher stage."""
