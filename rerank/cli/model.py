"""`rerank model list|publish|rollback|unpin`: manage the versioned model registry."""

from __future__ import annotations

import argparse
import json
import time

from rerank.cli.errors import CommandError


def register(subparsers) -> None:
    model = subparsers.add_parser("model", help="list, publish and roll back model versions in a registry")
    sub = model.add_subparsers(dest="model_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--registry", required=True, metavar="URI",
                       help="registry location: a directory, file:///dir or s3://bucket/prefix")
        p.add_argument("--json", action="store_true", help="print the result as JSON")

    ls = sub.add_parser("list", help="list versions (newest last) and which one LATEST points to")
    common(ls)
    ls.set_defaults(func=run_list)

    pub = sub.add_parser("publish", help="publish a trained model directory as the next version")
    common(pub)
    pub.add_argument("--model", required=True, help="model directory (from `rerank train`)")
    pub.set_defaults(func=run_publish)

    rb = sub.add_parser("rollback", help="point LATEST at an older version and pin it (the trainer pauses)")
    common(rb)
    rb.add_argument("--version", required=True, type=int, help="version number to serve")
    rb.set_defaults(func=run_rollback)

    un = sub.add_parser("unpin", help="release a rollback pin: the trainer continues from the pinned version")
    common(un)
    un.set_defaults(func=run_unpin)


def _registry(args, create: bool = False):
    from rerank.models.registry import ModelRegistry, RegistryError

    try:
        return ModelRegistry(args.registry, create=create)
    except (OSError, ValueError, RegistryError) as err:
        raise CommandError(f"--registry {args.registry}: {err}") from None


def _emit(args, data: dict, text: str) -> int:
    print(json.dumps(data) if args.json else text)
    return 0


def run_list(args) -> int:
    from rerank.models.registry import RegistryError

    reg = _registry(args)
    try:
        rows = reg.describe()
    except RegistryError as err:
        raise CommandError(str(err)) from None
    if args.json:
        print(json.dumps({"registry": reg.uri, "versions": rows}))
        return 0
    if not rows:
        print(f"{reg.uri}: no versions")
        return 0
    print(f"{'version':>8}  {'latest':6}  {'created':19}  {'parent':>6}  {'events':>8}  trained_until")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])) if r["created_at"] else "-"
        mark = "pinned" if r["pinned"] else ("yes" if r["latest"] else "")
        print(f"{r['version']:>8}  {mark:6}  {created:19}  {str(r['parent'] or '-'):>6}  "
              f"{str(r['events_applied'] if r['events_applied'] is not None else '-'):>8}  {r['trained_until_id'] or r['trained_until'] or '-'}")
    return 0


def run_publish(args) -> int:
    from rerank.models.recommender import ModelLoadError, read_config
    from rerank.models.registry import RegistryError

    try:
        read_config(args.model)
    except ModelLoadError as err:
        raise CommandError(str(err)) from None
    reg = _registry(args, create=True)
    try:
        version = reg.publish_dir(args.model)
    except RegistryError as err:
        raise CommandError(str(err)) from None
    return _emit(args, {"registry": reg.uri, "version": version}, f"published {args.model} as v{version}")


def run_rollback(args) -> int:
    from rerank.models.registry import RegistryError

    reg = _registry(args)
    try:
        reg.rollback(args.version)
    except RegistryError as err:
        raise CommandError(str(err)) from None
    return _emit(args, {"registry": reg.uri, "latest": args.version, "pinned": True},
                 f"LATEST -> v{args.version} (pinned; `rerank model unpin` lets the trainer continue from it)")


def run_unpin(args) -> int:
    from rerank.models.registry import RegistryError

    reg = _registry(args)
    try:
        reg.unpin()
    except RegistryError as err:
        raise CommandError(str(err)) from None
    return _emit(args, {"registry": reg.uri, "latest": reg.latest(), "pinned": False},
                 f"LATEST v{reg.latest()} unpinned")
