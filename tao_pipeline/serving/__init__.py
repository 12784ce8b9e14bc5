"""Serving: the champion behind an OpenAI-compatible API (`tao serve`), its traffic logged into the inbox.

- ``engine``: what an engine is (requests in, whole or streamed text out, a swappable model);
- ``local``: the champion in this process, concurrent requests batched into one ``generate``;
- ``proxy``: in front of an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp);
- ``champion``: follows the registry and swaps the engine's model when the champion changes;
- ``request_log``: every answered request as a row in an inbox file, handed over whole;
- ``app`` and ``metrics``: the HTTP API and its Prometheus metrics; ``server`` assembles them.
"""
