"""Replicas of the engine on Ray Serve, behind one prefix-aware router.

    launch.py       `engine serve --replicas N`: Ray, Serve, the application, until a signal
    app.py          the application builder (`serve run engine.replicas.app:build ...`)
    ingress.py      the router deployment: OpenAI HTTP in, each request to a replica, /metrics of all
    replica.py      the engine deployment: one `engine serve` app per replica, driven in-process
    routing.py      which replica: Ray's prefix-cache affinity, else power of two choices
    asgi_bridge.py  drives an ASGI app in-process for one HTTP request, streaming its response
    metrics_board.py  each replica's Prometheus exposition, merged with a `replica` label
    autoscaling.py  Ray Serve's replica count from the engines' own queue and KV use

Routing is Ray Serve's PrefixCacheAffinityRouter (ray.serve.llm) with one change (routing.py): a
request goes to the replica whose past prompts share at least half its text, while the load stays
balanced; otherwise to the less loaded of two.  Every replica is a whole `engine serve` (same flags, same HTTP app): the router
translates nothing.
"""
