"""Over-the-air rollouts of models and knowledge packs, driven by the fleet over MQTT.

A rollout names a model (or a knowledge pack), a version and a mirror. The device fetches the
version's release manifest from the mirror and checks its Ed25519 signature against the fleet's
public key (:mod:`edge.rollout.release`), downloads the files it lists in the background
(throttled, paused while a visitor speaks or is answered) and checks each against the signed
size and sha256, installs them beside the current version, and then, between turns, switches to
it, loads it and runs a self-test (:mod:`edge.rollout.selftest`) on fresh stages that do not yet
serve visitors. A version that passes is put into service and confirmed; one that fails, or is
not confirmed within ``rollout.confirm_deadline_s``, is switched back. A journal on disk
(:mod:`edge.rollout.journal`) makes a restart in the middle boot on the previous version.
:mod:`edge.rollout.manager` runs all this on a thread of its own.
"""
