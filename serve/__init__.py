"""The Ray Serve application that puts a saved SALM behind an OpenAI-style HTTP endpoint.

``serve.app`` wires the two deployments (``serve.ingress``: CPU, HTTP and audio decoding;
``serve.transcriber``: the model, batched); ``serve/config.yaml`` is the Ray Serve config file;
``serve.client`` talks to a running server; ``serve.cli`` adds ``salm serve``.
"""
