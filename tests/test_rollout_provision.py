"""scripts/provision --fleet-key: the fleet's public key goes to the device with its config naming it."""

from __future__ import annotations

from pathlib import Path

from test_provision import Setup, models_root, server, setup, steps, wheel_cache  # noqa: F401
from test_rollout import make_keys

from edge.config import load_config


def test_the_fleet_key_is_installed_and_named_in_the_config(setup: Setup, tmp_path: Path) -> None:  # noqa: F811
    from provisioning.config import render_config, set_keys  # test_provision put scripts/ on sys.path
    from provisioning.constants import DEV_CONFIG, FLEET_KEY

    keys = make_keys(tmp_path / "keys")
    root = setup.work / "with-fleet-key"
    proc = setup.provision(root, "--dry-run", "--fleet-key", keys.public)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = steps(proc.stdout)
    assert s["rollout"][0] == "would change" and FLEET_KEY in s["rollout"][1], proc.stdout
    assert not root.exists()
    text = set_keys(render_config((Path(DEV_CONFIG)).read_text(), "config/dev.toml", "booth-7", {}, False),
                    "rollout", {"public_key": FLEET_KEY})
    (tmp_path / "config.toml").write_text(text)
    cfg = load_config(tmp_path / "config.toml", environ={})
    assert cfg.rollout.public_key == FLEET_KEY == "/etc/edge-voice/fleet.pub"
    missing = setup.provision(root, "--dry-run", "--fleet-key", tmp_path / "nope.pub")
    assert missing.returncode == 2 and "--fleet-key" in missing.stderr and "no such file" in missing.stderr
