"""Job execution: the Celery app, the job runner shared with the embedded mode,
the model pool and the row budget of continuous batching.

Only `lmq.workers.runner`, `lmq.workers.pool` and the task body import keras/torch, and
only when a job actually runs.
"""
