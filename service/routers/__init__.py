"""The API's routes, one router per resource: health and metrics, reconstructions and jobs,
models, admin. Each route reads its request, calls the core's or the stores' public
functions, and answers; what it depends on is in service/deps.py."""
