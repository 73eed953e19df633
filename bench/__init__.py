"""The Mesh benchmark: ``make bench`` (``python -m bench``).

One run measures, on this machine and under the same load, the cache through the
typed client and the baselines it is judged against:

* cache GET through ``mesh.cache.get`` vs. a raw grpc.aio echo server that answers
  the same method with the same messages (the limit of one Python gRPC hop);
* MGet of 100 keys through ``mesh.cache.mget`` vs. redis-py pipelines of 100 GETs;
* redis-py GET, for orientation.

Modules: ``services`` starts the child processes (``echo_server`` is one of them),
``workloads`` defines the calls, ``timing`` times them, ``progress`` draws the bar
on stderr, ``report`` prints the Markdown table and writes ``results.json``.
"""
