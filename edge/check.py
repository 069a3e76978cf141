"""``edge-voice check``: is this config valid, and is everything it needs installed?

Prints one line per item and exits non-zero if anything is missing, so provisioning and
an operator's shell both get a clear answer without starting the daemon.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TextIO

from edge.config import Config
from edge.errors import ModelError

# Which Python package each role's backend needs, and the extra that installs it.
BACKENDS = {
    "wake": ("onnxruntime", "wake"),
    "stt": ("sherpa_onnx", "stt"),
    "vad": ("sherpa_onnx", "stt"),
    "llm": ("llama_cpp", "llm"),
    "lora": ("llama_cpp", "llm"),
    "tts": ("sherpa_onnx", "tts"),
    "faq": ("numpy", "device"),
}


def _check_pack(cfg: Config, out: TextIO) -> bool:
    """The venue's pack: every problem, with its file and line."""
    from edge.errors import EdgeError
    from edge.knowledge import check
    from edge.knowledge.store import PackStore

    spec = cfg.knowledge.pack
    try:
        root = Path(spec) if "/" in spec else PackStore(cfg.packs_dir).resolve(spec).pack.root
    except EdgeError as err:
        print(f"BAD      knowledge: {err.message}", file=out)
        return False
    problems = check(root)
    for p in problems:
        print(f"{'BAD' if p.severity == 'error' else 'WARNING':8} knowledge: {p}", file=out)
    if any(p.severity == "error" for p in problems):
        return False
    print(f"ok       knowledge: pack {spec} ({sum(p.severity == 'warning' for p in problems)} warning(s))", file=out)
    return True


def run_check(cfg: Config, out: TextIO = sys.stdout) -> int:
    from edge.models.registry import ModelRegistry

    ok = True
    print(f"ok       config {cfg.source} (device id {cfg.device_id})", file=out)
    registry = ModelRegistry(cfg.models_dir)
    for role, model_id in cfg.model_ids().items():
        module, extra = BACKENDS[role]
        if importlib.util.find_spec(module) is None:
            ok = False
            print(f"MISSING  {role}: Python package {module!r}; install it with "
                  f"`pip install 'edge-voice[{extra}]'`", file=out)
        try:
            model = registry.resolve(model_id)
        except ModelError as err:
            ok = False
            print(f"MISSING  {role}: {err.message}", file=out)
            continue
        print(f"ok       {role}: {model.id} ({model.version}) in {model.dir}", file=out)
    for role in ("stt", "llm", "tts"):
        if role not in cfg.model_ids():
            ok = False
            print(f"MISSING  {role}: no model id configured ([{role}] model)", file=out)
    if cfg.wake.engine != "none" and "wake" not in cfg.model_ids():
        ok = False
        print("MISSING  wake: no model id configured ([wake] model)", file=out)
    if cfg.knowledge.pack:
        ok = _check_pack(cfg, out) and ok
    print("check passed" if ok else "check FAILED", file=out)
    return 0 if ok else 1
