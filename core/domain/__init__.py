"""The job service's rules, each stated once, for every front end: the HTTP server, the CLI,
the Batch API and the workers.

What a job request may hold (`requests`, built from `fields`, `generation` and `fit`),
how a checked request becomes a queued job (`jobs`), which presets a tenant may name
(`presets`), and the job as every front end shows it (`jobs.JobSummary`). Pydantic
and the store only: importing this loads neither keras nor torch.
"""
