"""scripts/provision: provision edge-voice kiosks over plain OpenSSH, one module per job.

- ``cli``: the command line, checked before any host is touched; ``main``.
- ``targets``: targets, the ``--hosts`` inventory and its groups.
- ``kinds``: which kind of device a host is, from its facts; unsupported systems are refused.
- ``wheels``: the edge-voice wheel, the llama-cpp-python wheel for each kind of device, constraints.
- ``config``: the device's config file (TOML edited in place) and the manifest's model profiles.
- ``packs``: knowledge packs given with ``--pack``, checked on this machine before they leave it.
- ``remote``: ssh (one control connection per host), rsync, the device program's requests, host logs.
- ``steps``: the steps for one host, each "check, then change if needed".
- ``fleet``: hosts in parallel and in waves.
- ``report``: the step lines and the summary.
- ``device``: the program sent to the device over ssh stdin (its own standard library only).

The laptop side uses the standard library only (and, for ``--pack``, this checkout's own
``edge.knowledge`` pack checker, which needs nothing else). See README.md here.
"""
