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

    if args.ids and args.all:
        print("carina: give job ids or --all, not both", file=sys.stderr)
        return 2
    settings = _settings(args)
    if args.destination is not None and args.destination not in {d.name for d in settings.destinations}:
        print(f"carina: warning: no destination {args.destination!r} is configured", file=sys.stderr)
    count = requeue_dead(_db(settings), args.ids or None, destination=args.destination)
    where = f" for destination {args.destination!r}" if args.destination is not None else ""
    print(f"re-queued {count} dead-letter job(s){where}")
    return 0


# --- carina backup / retention: operations --------------------------------------------------


def cmd_backup_create(args) -> int:
    from node.backup import BackupError, create_backup

    try:
        manifest = create_backup(_settings(args), args.path, include_files=not args.no_files)
    except BackupError as exc:
        print(f"carina: backup failed: {exc}", file=sys.stderr)
        return 2
    print(f"backup written to {args.path}: {manifest['database']} database, {manifest['files']} file(s)"
          + (f", {len(manifest['missing_files'])} listed as missing (purged meanwhile)" if manifest["missing_files"] else ""))
    return 0


def cmd_backup_restore(args) -> int:
    from node.backup import BackupError, restore_backup

    settings = _settings(args)
    try:
        restored = restore_backup(settings, args.path)
    except BackupError as exc:
        print(f"carina: restore refused: {exc}", file=sys.stderr)
        return 2
    print(f"restored the backup of {restored['created_at']} into {settings.storage.data_dir}; "
          f"start the node with `carina serve` (the backup's settings are in {args.path}/config.yaml)")
    return 0


def cmd_retention_purge(args) -> int:
    from node.context import NodeContext
    from node.retention import purge

    settings = _settings(args)
    r = settings.retention
    if all(days is None for days in (r.instances_days, r.outputs_days, r.jobs_days)):
        print("retention: nothing configured (retention.instances_days, outputs_days, jobs_days are all null)")
        return 0
    report = purge(NodeContext(settings=settings, db=_db(settings)))
    print(f"purged {report.instances} instance(s) of {report.studies_instances} study(ies), {report.outputs} "
          f"output(s), {report.jobs} job row(s), {report.files} file(s); {len(report.protected)} study(ies) kept "
          "because their results are not delivered everywhere")
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
    print("active	model	kind	imported	source SHA-256	weights")
    for e in entries:
        m = e.meta
        kind = "problem: " + m["problem"] if "problem" in m else ("DEMO (non-clinical)" if e.demo else "clinical")
        print("\t".join([
            "*" if e.ref == active else "",
            e.ref,
            kind,
            m.get("imported_at") or "-",
            (m.get("source_sha256") or "-")[:16],
            str(e.weights),
        ]))
    if active and active not in {e.ref for e in entries}:
        print(f"warning: ACTIVE names {active}, which is not in the registry", file=sys.stderr)
    return 0


def cmd_model_activate(args) -> int:
    from node.models import RegistryError

    registry = _registry(args)
    try:
        from inference.model import MODEL_NAME, demo_version

        if args.ref == f"{MODEL_NAME}@{demo_version(0)}":
            registry.ensure_demo()
        previous = registry.active_ref()
        entry = registry.activate(args.ref)
    except RegistryError as exc:
        print(f"carina: {exc}", file=sys.stderr)
        return 2
    note = " — DEMO WEIGHTS, NOT FOR CLINICAL USE" if entry.demo else ""
    print(f"active: {entry.ref}{note} (was {previous or 'none'}); "
          "a running node switches within inference.model_poll_seconds")
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
    jr.add_argument("--all", action="store_true", help="every dead-letter job (the default without ids)")
    jr.add_argument("--destination", help="only the deliveries to this destination (e.g. after its outage)")
    jr.set_defaults(func=cmd_jobs_retry)

    backup = sub.add_parser("backup", help="consistent backup while the node runs, and restore").add_subparsers(
        dest="action", required=True)
    bc = backup.add_parser("create", parents=[common], help="write a backup directory at PATH (database, models, "
                                                           "configuration, received and encoded files)")
    bc.add_argument("path")
    bc.add_argument("--no-files", action="store_true", help="database, models and configuration only")
    bc.set_defaults(func=cmd_backup_create)
    br = backup.add_parser("restore", parents=[common], help="restore PATH into the configured (fresh) data directory")
    br.add_argument("path")
    br.set_defaults(func=cmd_backup_restore)

    retention = sub.add_parser("retention", help="retention purge").add_subparsers(dest="action", required=True)
    rp = retention.add_parser("purge", parents=[common], help="run the retention purge once, now")
    rp.set_defaults(func=cmd_retention_purge)

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
    ma.set_defaults(func=cmd_model_activate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
