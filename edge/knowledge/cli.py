"""``edge-voice packs``: check, install, list and roll back knowledge packs.

A venue manager edits a pack directory; ``packs check DIR`` names every problem (file:line, what,
the fix); ``packs install DIR`` checks it again and makes it current, keeping the previous version
for ``packs rollback``. The daemon reads the current version of ``[knowledge] pack`` when it starts
or reloads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from edge import paths
from edge.errors import EdgeError
from edge.knowledge.pack import check_pack


def _root(args: argparse.Namespace) -> Path:
    if args.root is not None:
        return Path(args.root)
    if args.config is not None:
        from edge.config import load_config

        return load_config(args.config).packs_dir
    return paths.state_dir() / "packs"


def add_packs_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("packs", help="check, install, list and roll back venue knowledge packs")
    sub = p.add_subparsers(dest="packs_command", metavar="COMMAND", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--root", type=Path, help="installed packs (default: <state dir>/packs)")
    where.add_argument("--config", "-c", type=Path, metavar="FILE", help="use this config's state directory")
    check = sub.add_parser("check", help="list every problem of a pack directory (non-zero on an error)")
    check.add_argument("dir", type=Path, metavar="DIR")
    install = sub.add_parser("install", parents=[where], help="check a pack directory and make it current")
    install.add_argument("dir", type=Path, metavar="DIR")
    sub.add_parser("list", parents=[where], help="installed packs, their current and previous versions")
    rollback = sub.add_parser("rollback", parents=[where], help="go back to a pack's previous version")
    rollback.add_argument("--pack", required=True, metavar="ID")


def run_packs(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from edge.knowledge.store import PackStore

    cmd = args.packs_command
    if cmd == "check":
        problems = check_pack(args.dir)
        for problem in problems:
            print(f"{problem.severity.upper():8} {problem}", file=out)
        errors = sum(problem.severity == "error" for problem in problems)
        print(f"{args.dir}: {errors} error(s), {len(problems) - errors} warning(s)", file=out)
        return 1 if errors else 0
    store = PackStore(_root(args))
    if cmd == "install":
        installed, changed = store.install(args.dir)
        if changed:
            was = f"; previous version {installed.previous}" if installed.previous else ""
            print(f"installed {installed.pack.label} as version {installed.version} in {store.root}{was}", file=out)
        else:
            print(f"{installed.pack.label} is already current (version {installed.version})", file=out)
        return 0
    if cmd == "list":
        ids = store.installed()
        if not ids:
            print(f"no knowledge packs installed in {store.root}", file=out)
        for pack_id in ids:
            try:
                current = store.resolve(pack_id)
            except EdgeError as err:
                print(f"{pack_id:24} BROKEN   {err.message}", file=out)
                continue
            pack = current.pack
            print(f"{pack_id:24} {current.version}  {pack.label}  {len(pack.facts)} facts, {len(pack.faq)} FAQ"
                  f"{'  previous ' + current.previous if current.previous else ''}", file=out)
        return 0
    if cmd == "rollback":
        back = store.rollback(args.pack)
        print(f"{args.pack}: back to version {back.version} ({back.pack.label})", file=out)
        return 0
    raise AssertionError(cmd)
