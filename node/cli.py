"""The `carina` command. Every subcommand reads the same configuration:
--config PATH, else $CARINA_CONFIG, else config/carina.yaml."""
from __future__ import annotations

import argparse
import sys

from node.config import ConfigError, load_settings
from node.states import JobState


def _settings(args):
    try:
        return load_settings(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"carina: {exc}", file=sys.stderr)
        raise SystemExit(2)


def _db(settings):
    from node.db import Database

    db = Database(settings.database_url)
    db.create_schema()
    return db


def cmd_serve(args) -> int:
    settings = _settings(args)  # a bad key stops us before torch is even imported
    from node.service import serve

    serve(settings)
    return 0


def cmd_token_create(args) -> int:
    from node.api.auth import create_token

    try:
        token = create_token(_db(_settings(args)), args.name, args.role)
    except ValueError as exc:
        print(f"carina: {exc}", file=sys.stderr)
        return 2
    print(f"token {args.name!r} ({args.role}) created; it is shown once, store it now:")
    print(token)
    return 0


def cmd_jobs_list(args) -> int:
    from sqlalchemy import select

    from node.db import Job

    db = _db(_settings(args))
    with db.session() as s:
        stmt = select(Job).order_by(Job.id)
        if args.state:
            stmt = stmt.where(Job.state == args.state)
        for j in s.scalars(stmt):
            print(f"{j.id}\t{j.stage}\t{j.destination or '-'}\tstudy={j.study_id} v{j.study_version}\t{j.state}\tattempts={j.attempts}\t{j.last_error[:120]}")
    return 0


def cmd_jobs_retry(args) -> int:
    from node.jobs import requeue_dead

    count = requeue_dead(_db(_settings(args)), args.ids or None)
    print(f"re-queued {count} dead-letter job(s)")
    return 0


# --- carina model: the model registry ----------------------------------------------------


def _registry(args):
    from node.models import ModelRegistry

    return ModelRegistry.for_settings(_settings(args))


def cmd_model_import(args) -> int:
    from node.models import RegistryError

    registry = _registry(args)
    try:
        entry = registry.import_checkpoint(args.file, name=args.name, version=args.version, sha256=args.sha256)
        registry.ensure_demo()  # the demo stays an explicit entry (and the fallback ACTIVE if none was set)
        if args.activate:
            registry.activate(entry.ref)
    except RegistryError as exc:
        print(f"carina: model import refused: {exc}", file=sys.stderr)
        return 2
    print(f"imported {entry.ref}: {entry.weights} (source SHA-256 {entry.meta['source_sha256']})")
    if args.activate:
        print(f"{entry.ref} is now active; a running node switches to it within inference.model_poll_seconds")
    else:
        print(f"activate it with: carina model activate {entry.ref}")
    return 0


def cmd_model_list(args) -> int:
    registry = _registry(args)
    active = registry.active_ref()
    entries = registry.entries()
    if not entries:
        print(f"no models in {registry.root} yet (the demo entry is created when the node first starts)")
        return 0
    print("active	model	kind	imported	source SHA-256	weights	lineage")
    for e in entries:
        m = e.meta
        kind = "problem: " + m["problem"] if "problem" in m else ("DEMO (non-clinical)" if e.demo else "clinical")
        if "ensemble" == m.get("kind"):
            lineage = "ensemble of " + ", ".join(m.get("members", []))
        elif "calibration" in m:
            lineage = f"calibrated from {m.get('parent')}"
        elif "finetune" in m:
            lineage = f"fine-tuned from {m.get('parent')}"
        else:
            lineage = "-"
        print("\t".join([
            "*" if e.ref == active else "",
            e.ref,
            kind,
            m.get("imported_at") or m.get("created_at") or "-",
            (m.get("source_sha256") or "-")[:16],
            "-" if m.get("kind") == "ensemble" else str(e.weights),
            lineage,
        ]))
    if active and active not in {e.ref for e in entries}:
        print(f"warning: ACTIVE names {active}, which is not in the registry", file=sys.stderr)
    return 0


def cmd_model_activate(args) -> int:
    from node.models import ActivationRefused, RegistryError

    registry = _registry(args)
    try:
        from inference.model import MODEL_NAME, demo_version

        if args.ref == f"{MODEL_NAME}@{demo_version(0)}":
            registry.ensure_demo()
        previous = registry.active_ref()
        # The activation guard (node/models.py activation_guard) may refuse; --force
        # overrides it and the override is recorded in models/activations.jsonl.
        entry = registry.activate(args.ref, force=args.force)
    except ActivationRefused as exc:
        print(f"carina: {exc}", file=sys.stderr)
        return 3
    except RegistryError as exc:
        print(f"carina: {exc}", file=sys.stderr)
        return 2
    note = " — DEMO WEIGHTS, NOT FOR CLINICAL USE" if entry.demo else ""
    forced = registry.activations()[-1].get("forced") if registry.activations() else False
    print(f"active: {entry.ref}{note} (was {previous or 'none'}); "
          "a running node switches within inference.model_poll_seconds"
          + ("; the activation guard's objections were overridden with --force (recorded)" if forced else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: otherwise a subcommand's default None overwrites a --config
    # given before the subcommand name.
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML configuration (default: $CARINA_CONFIG or config/carina.yaml)")
    parser = argparse.ArgumentParser(prog="carina", description="Carina chest X-ray AI node", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the node (DICOM SCP, pipeline, HTTP API)")
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="API tokens").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", parents=[common], help="create a bearer token (printed once, last line)")
    create.add_argument("--name", required=True)
    create.add_argument("--role", default="integration", choices=["integration", "admin", "viewer"])
    create.set_defaults(func=cmd_token_create)

    jobs = sub.add_parser("jobs", help="pipeline jobs").add_subparsers(dest="action", required=True)
    jl = jobs.add_parser("list", parents=[common], help="list jobs")
    jl.add_argument("--state", choices=[state.value for state in JobState])
    jl.set_defaults(func=cmd_jobs_list)
    jr = jobs.add_parser("retry", parents=[common], help="re-queue dead-letter jobs (all, or the given ids)")
    jr.add_argument("ids", nargs="*", type=int)
    jr.set_defaults(func=cmd_jobs_retry)

    model = sub.add_parser("model", help="model registry: import, list, activate").add_subparsers(dest="action", required=True)
    mi = model.add_parser("import", parents=[common],
                          help="verify a torchxrayvision .pt by SHA-256 and convert it to safetensors (the only unpickling)")
    mi.add_argument("file", help="the torchxrayvision weights file (.pt)")
    mi.add_argument("--name", required=True, help="model name, e.g. densenet121-res224-all")
    mi.add_argument("--version", required=True, help="version label; NAME@VERSION is immutable once imported")
    mi.add_argument("--sha256", required=True, help="the SHA-256 published for FILE; a mismatch refuses the import")
    mi.add_argument("--activate", action="store_true", help="also make it the active model")
    mi.set_defaults(func=cmd_model_import)
    ml = model.add_parser("list", parents=[common], help="list models; * marks the active one")
    ml.set_defaults(func=cmd_model_list)
    ma = model.add_parser("activate", parents=[common], help="switch the active model (no restart needed)")
    ma.add_argument("ref", metavar="NAME@VERSION")
    ma.add_argument("--force", action="store_true",
                    help="activate although the activation guard objects (the override is recorded)")
    ma.set_defaults(func=cmd_model_activate)

    from node.governance.cli import register as register_governance

    register_governance(sub, model, common)  # eval, model calibrate|finetune|..., feedback export
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
