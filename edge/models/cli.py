"""``edge-voice models``: list, fetch, verify, activate, rollback, gc.

``add_models_parser(subparsers)`` adds the command to the edge-voice parser (it sets
``handler=run_models``); ``python -m edge.models.cli ...`` runs it on its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from edge import paths
from edge.errors import EdgeError, ModelError
from edge.models import manage
from edge.models.download import human
from edge.models.fetch import Fetcher, FetchResult
from edge.models.manifest import Manifest, ModelSpec, load_manifest
from edge.models.store import ModelStore

PROG = "edge-voice models"
MIRROR_ENV = "EDGE_VOICE_MODEL_MIRROR"


def _common(mirror: bool = False, select: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    if select:
        p.add_argument("--profile", help="a profile of the manifest (dev, pi5, jetson, ...)")
        p.add_argument("--model", action="append", default=[], metavar="ID",
                       help="a model id (repeatable)")
    p.add_argument("--root", type=Path,
                   help=f"the installed models (default: {paths.models_dir()})")
    p.add_argument("--manifest", type=Path, help="the model manifest (default: $EDGE_VOICE_MANIFEST, "
                   "else the one shipped with edge-voice)")
    if mirror:
        p.add_argument("--mirror", metavar="DIR|URL", default=os.environ.get(MIRROR_ENV) or None,
                       help=f"a mirror serving <mirror>/<dir>/<file>, tried before the manifest's sources "
                            f"(default: ${MIRROR_ENV})")
    return p


def _configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="COMMAND", required=True)
    listing = sub.add_parser("list", parents=[_common()], help="the models of a profile and their state")
    listing.add_argument("--json", action="store_true",
                         help="print one JSON object: model id -> its state (ok, not installed, not current, "
                              "changed on disk), versions, kind, size and whether the profile makes it optional")
    fetch = sub.add_parser("fetch", parents=[_common(mirror=True)],
                           help="download, check and install models (nothing is transferred twice)")
    fetch.add_argument("--trust-on-first-use", action="store_true",
                       help="install files that have no checksum in the manifest and record their hash")
    fetch.add_argument("--with-optional", action="store_true", help="include the profile's optional models")
    sub.add_parser("verify", parents=[_common()],
                   help="re-hash installed files (default: every installed model); non-zero if any is bad")
    activate = sub.add_parser("activate", parents=[_common(select=False)],
                              help="make an installed version current")
    activate.add_argument("--model", required=True, metavar="ID")
    activate.add_argument("--version", required=True, help="a version shown by `list`")
    sub.add_parser("rollback", parents=[_common()], help="switch back to each model's previous version")
    sub.add_parser("gc", parents=[_common()],
                   help="remove versions that are neither current nor previous, and partial downloads")


def add_models_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("models", help="install and manage models",
                                   description="Install, verify and switch model versions.")
    _configure(parser)
    parser.set_defaults(handler=run_models)
    return parser


def _selection(args: argparse.Namespace, manifest: Manifest, store: ModelStore,
               default_installed: bool) -> list[str]:
    if args.profile is None and not args.model:
        if default_installed:
            return store.installed_ids()
        raise ModelError("name the models: --profile NAME or --model ID", code="model.usage")
    return [s.id for s in manifest.select(args.profile, args.model, getattr(args, "with_optional", False))]


def _state_text(st: manage.Status) -> str:
    if st.current is None:
        return "not installed"
    text = f"current {st.current}" + ("" if st.matches else " (not the manifest's version)")
    if not st.intact:
        text += ", CHANGED since install: run verify"
    if st.previous:
        text += f", previous {st.previous}"
    others = len(set(st.versions) - {st.current, st.previous})
    if others:
        text += f", {others} more (gc removes them)"
    return text


def _size_text(spec: ModelSpec) -> str:
    if spec.install_size is not None:
        return human(spec.install_size)
    approx = spec.approx_size
    return f"~{human(approx)}" if approx else "size unknown"


def state_word(st: manage.Status) -> str:
    """One word for a model's state, for scripts: ok, not installed, not current, changed on disk."""
    if st.current is None:
        return "not installed"
    if not st.matches:
        return "not current"
    return "ok" if st.intact else "changed on disk"


def _list_json(specs: list[ModelSpec], optional: set[str], store: ModelStore) -> int:
    out = {}
    for spec in specs:
        st = manage.status(store, spec)
        out[spec.id] = {"state": state_word(st), "current": st.current, "previous": st.previous,
                        "versions": list(st.versions), "kind": spec.kind, "size": spec.install_size,
                        "optional": spec.id in optional}
    print(json.dumps(out, sort_keys=True))
    return 0


def cmd_list(args: argparse.Namespace, manifest: Manifest, store: ModelStore) -> int:
    if args.profile is None and not args.model:
        specs = list(manifest.models.values())
    else:
        specs = manifest.select(args.profile, args.model, with_optional=True)
    profile = manifest.profile(args.profile) if args.profile else None
    optional = set(profile.optional) if profile is not None else set()
    if args.json:
        return _list_json(specs, optional, store)
    if profile is not None:
        print(f"profile {profile.name}: {profile.description}".rstrip(": "))
    print(f"models root: {store.root}")
    for spec in specs:
        tag = "  (optional)" if spec.id in optional else ""
        print(f"{spec.id:<30} {spec.kind:<14} {_size_text(spec):>10}  {_state_text(manage.status(store, spec))}{tag}")
        if spec.description:
            print(f"    {spec.description}")
        print(f"    licence: {spec.licence}")
        print("    sources: " + " | ".join(s.describe() for s in spec.sources))
        if spec.unpinned:
            pins = store.pins(spec.id)
            open_files = [n for n in spec.unpinned if n not in pins]
            if open_files and not any(s.type == "archive" and s.sha256 for s in spec.sources):
                print("    checksums: not published; fetch needs --trust-on-first-use")
    return 0


def _report_result(r: FetchResult) -> None:
    if r.action == "up-to-date":
        print(f"{r.model}: nothing to transfer (version {r.version} is installed and current)")
    elif r.action == "activated":
        print(f"{r.model}: nothing to transfer: made the installed version {r.version} current again")
    else:
        kept = f"; previous version {r.previous} kept for rollback" if r.previous else ""
        print(f"{r.model}: installed version {r.version} ({human(r.transferred)} transferred){kept}")
    for name, sha in r.pinned.items():
        print(f"{r.model}: recorded sha256 {sha} for {name} (trust on first use: compare it with the "
              f"publisher's and add it to the manifest)")
    sys.stdout.flush()


def _report_summary(results: list[FetchResult]) -> None:
    transferred = sum(r.transferred for r in results)
    installed = sum(r.action == "installed" for r in results)
    if not installed:
        print(f"fetch: all {len(results)} models are installed and current: nothing to transfer")
    else:
        print(f"fetch: {installed} installed, {len(results) - installed} already current, "
              f"{human(transferred)} transferred")


def cmd_fetch(args: argparse.Namespace, manifest: Manifest, store: ModelStore) -> int:
    specs = [manifest.model(i) for i in _selection(args, manifest, store, default_installed=False)]
    fetcher = Fetcher(store, paths.cache_dir() / "models", mirror=args.mirror,
                      trust_first_use=args.trust_on_first_use, say=lambda line: print(line, flush=True))
    _report_summary(fetcher.fetch(specs, on_result=_report_result))
    return 0


def cmd_verify(args: argparse.Namespace, manifest: Manifest, store: ModelStore) -> int:
    ids = _selection(args, manifest, store, default_installed=True)
    if not ids:
        print(f"verify: no models installed in {store.root}")
        return 0
    failed = []
    for r in manage.verify(store, ids):
        if not r.problems:
            print(f"ok      {r.model} {r.version}")
            continue
        failed.append(r.model)
        for problem in r.problems:
            where = f" in {r.dir}" if r.dir else f" in {store.root}"
            print(f"FAILED  {r.model} {r.version or ''}: {problem}{where}".replace("  :", ":"))
    if failed:
        raise ModelError(f"verification failed for {', '.join(failed)}: reinstall with "
                         f"`{PROG} fetch --model {failed[0]} --root {store.root}`", code="model.unverified")
    return 0


def cmd_activate(args: argparse.Namespace, manifest: Manifest, store: ModelStore) -> int:
    manifest.model(args.model)
    old = manage.activate(store, args.model, args.version)
    print(f"{args.model}: version {args.version} is current" + (f" (was {old})" if old and old != args.version else ""))
    return 0


def cmd_rollback(args: argparse.Namespace, manifest: Manifest, store: ModelStore) -> int:
    for model_id in _selection(args, manifest, store, default_installed=False):
        new, old = manage.rollback(store, model_id)
        print(f"{model_id}: rolled back to version {new}; {old} kept as previous")
    return 0


def cmd_gc(args: argparse.Namespace, manifest: Manifest, store: ModelStore) -> int:
    cache = paths.cache_dir() / "models"
    ids = _selection(args, manifest, store, default_installed=True)
    if args.profile is None and not args.model and cache.is_dir():
        ids = sorted(set(ids) | {p.name for p in cache.iterdir() if p.is_dir()})  # downloads never installed
    total = 0
    for model_id, removed, freed in manage.gc(store, ids, cache):
        total += freed
        if removed or freed:
            what = f"removed {', '.join(removed)}" if removed else "removed partial downloads"
            print(f"{model_id}: {what} ({human(freed)})")
    print(f"gc: freed {human(total)}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Manifest, ModelStore], int]] = {
    "list": cmd_list, "fetch": cmd_fetch, "verify": cmd_verify, "activate": cmd_activate,
    "rollback": cmd_rollback, "gc": cmd_gc,
}


def run_models(args: argparse.Namespace) -> int:
    """Run a parsed ``edge-voice models`` command. Errors: one line on stderr, non-zero exit."""
    try:
        manifest = load_manifest(args.manifest)
        store = ModelStore(args.root if args.root is not None else paths.models_dir())
        return COMMANDS[args.models_command](args, manifest, store)
    except EdgeError as err:
        print(f"{PROG}: error: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted: the current versions are unchanged", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader has gone, which is not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=PROG, description="Install, verify and switch edge-voice model versions.")
    _configure(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_models(args)


if __name__ == "__main__":
    raise SystemExit(main())
