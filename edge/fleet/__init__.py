"""The operator's side of the fleet: ``edge-voice fleet devices|tail|cmd|record|simulate``.

Modules, bottom up: ``errors`` and ``config`` (connection options, a ``[fleet]`` file);
``client`` (one paho MQTT v5 connection); ``status`` (the retained statuses, device selection
by id and tag); ``tail``; ``waves`` (staged fan-out with an abort rule, which rollouts reuse)
and ``cmd`` (request/response to many devices); ``store`` (SQLite and PostgreSQL) and
``record``; ``simulate`` (devices built from the real bridge, for load tests) and ``loadtest``.

``import edge.fleet`` imports neither paho nor psycopg; each is imported where it is used.
"""
