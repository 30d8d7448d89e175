"""The API's route handlers, one module per resource: jobs, presets (and architectures), health."""
