"""OpenAI's fine-tuning jobs (/v1/fine_tuning/jobs) as lmq fit jobs."""
