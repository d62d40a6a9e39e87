"""The `carina` command. Every subcommand reads the same configuration:
--config PATH, else $CARINA_CONFIG, else config/carina.yaml."""
from __future__ import annotations

import argparse
import sys

from node.config import ConfigError, check_serve, load_settings
from node.states import JobState


def _settings(args):
    try:
        return load_settings(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"carina: {exc}", file=sys.stderr)
        raise SystemExit(2)


def _db(settings):
    """The database, migrated to this Carina's schema (as `carina db upgrade` does)."""
    from node.db import Database
    from node.schema import SchemaError

    db = Database(settings.database_url)
    try:
        db.create_schema()
    except SchemaError as exc:
        print(f"carina: database: {exc}", file=sys.stderr)
        raise SystemExit(2)
    return db


def cmd_serve(args) -> int:
    settings = _settings(args)  # a bad key stops us before torch is even imported
    try:
        check_serve(settings, args.role)
        from node.service import serve

        # Also ConfigError: a TLS certificate or key that does not load, a schema that is not ours.
        serve(settings, args.role)
    except ConfigError as exc:
        print(f"carina: {exc}", file=sys.stderr)
        return 2
    return 0


# --- carina db: the schema ---------------------------------------------------------------------


def cmd_db_upgrade(args) -> int:
    """Migrate the configured database to this Carina's schema (node/schema.py); run once per
    release before the nodes of that release start. Safe to run concurrently and to repeat."""
    from node.db import Database
    from node.fhir_store import reindex_missing
    from node.schema import SchemaError, upgrade

    settings = _settings(args)
    db = Database(settings.database_url)
    try:
        before, after = upgrade(db)
        with db.session() as session:  # FHIR resources stored before the search index existed
            reindex_missing(session)
    except SchemaError as exc:
        print(f"carina: database: {exc}", file=sys.stderr)
        return 2
    finally:
        db.dispose()
    if before.state == "current":
        print(f"database schema already current (revision {after.current})")
    elif before.state == "legacy":
        print(f"database made before migrations: stamped at the baseline and upgraded to revision {after.current}")
    else:
        print(f"database schema upgraded from {before.current or 'nothing'} to revision {after.current}")
    return 0


def cmd_db_status(args) -> int:
    """Exit 0 when the schema is current, 1 otherwise (so a deployment can wait on it)."""
    from node.db import Database
    from node.schema import status

    db = Database(_settings(args).database_url)
    try:
        found = status(db)
    finally:
        db.dispose()
    print(found.describe())
    return 0 if found.state == "current" else 1


def _trail(settings, db):
    from node.context import trail_for

    return trail_for(settings, db)


def _when(value: str | None) -> str:
    import datetime as dt

    return "-" if value is None else dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --- carina token: API tokens ------------------------------------------------------------------


def cmd_token_create(args) -> int:
    from node.api.auth import create_token
    from node.audit import events, messages

    settings = _settings(args)
    days = settings.security.token_default_days if args.expires_days is None else args.expires_days
    if days > settings.security.token_max_days:
        print(f"carina: --expires-days {days} is over security.token_max_days ({settings.security.token_max_days})",
              file=sys.stderr)
        return 2
    db = _db(settings)
    try:
        token = create_token(db, args.name, args.role, days)
    except ValueError as exc:
        print(f"carina: {exc}", file=sys.stderr)
        return 2
    events.admin_action(_trail(settings, db), events.cli_actor(), messages.USER_SECURITY_ATTRIBUTES_CHANGED,
                        events.token_object(args.name), f"token created: role {args.role}, expires in {days:g} days")
    print(f"token {args.name!r} ({args.role}, expires in {days:g} days) created; it is shown once, store it now:")
    print(token)
    return 0


def cmd_token_list(args) -> int:
    from node.api.auth import list_tokens, token_problem
    from node.db import now

    rows = list_tokens(_db(_settings(args)))
    print("name\trole\tcreated\texpires\tlast used\tstate")
    for t in rows:
        state = token_problem(t, now()) or "active"
        print("\t".join([t.name, t.role, _when(t.created_at), _when(t.expires_at), _when(t.last_used_at), state]))
    return 0


def cmd_token_revoke(args) -> int:
    from node.api.auth import revoke_token
    from node.audit import events, messages

    settings = _settings(args)
    db = _db(settings)
    if not revoke_token(db, args.name):
        print(f"carina: no active token named {args.name!r}", file=sys.stderr)
        return 2
    events.admin_action(_trail(settings, db), events.cli_actor(), messages.USER_SECURITY_ATTRIBUTES_CHANGED,
                        events.token_object(args.name), "token revoked")
    print(f"token {args.name!r} revoked")
    return 0


# --- carina user: people who log in ------------------------------------------------------------


def _read_password(confirm: bool) -> str:
    """From a prompt on a terminal, else the first line of stdin: never from argv."""
    import getpass

    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if confirm and getpass.getpass("again: ") != first:
            raise SystemExit("carina: the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _user_change(args, change, description: str, event_type=None) -> int:
    from node.audit import events, messages
    from node.users import UserError

    settings = _settings(args)
    db = _db(settings)
    try:
        change(settings, db)
    except UserError as exc:
        print(f"carina: {exc}", file=sys.stderr)
        return 2
    events.admin_action(_trail(settings, db), events.cli_actor(),
                        event_type or messages.USER_SECURITY_ATTRIBUTES_CHANGED, events.user_object(args.name),
                        description)
    print(f"user {args.name!r}: {description}")
    return 0


def cmd_user_add(args) -> int:
    from node.audit import messages
    from node.users import add_user

    password = _read_password(confirm=True)
    return _user_change(args, lambda st, db: add_user(db, args.name, args.role, password,
                                                      min_length=st.security.password_min_length),
                        f"created with role {args.role}", messages.SECURITY_ROLES_CHANGED)


def cmd_user_passwd(args) -> int:
    from node.users import set_password

    password = _read_password(confirm=True)
    return _user_change(args, lambda st, db: set_password(db, args.name, password,
                                                          min_length=st.security.password_min_length),
                        "password changed; sessions ended")


def cmd_user_disable(args) -> int:
    from node.users import set_disabled

    return _user_change(args, lambda st, db: set_disabled(db, args.name, True), "disabled; sessions ended")


def cmd_user_enable(args) -> int:
    from node.users import set_disabled

    return _user_change(args, lambda st, db: set_disabled(db, args.name, False), "enabled")


def cmd_user_role(args) -> int:
    from node.audit import messages
    from node.users import set_role

    return _user_change(args, lambda st, db: set_role(db, args.name, args.role),
                        f"role set to {args.role}; sessions ended", messages.SECURITY_ROLES_CHANGED)


def cmd_user_list(args) -> int:
    from node.users import list_users

    print("name\trole\tcreated\tpassword changed\tstate")
    for u in list_users(_db(_settings(args))):
        state = "disabled" if u.disabled_at is not None else "active"
        print("\t".join([u.name, u.role, _when(u.created_at), _when(u.password_changed_at), state]))
    return 0


# --- carina audit: the audit trail -------------------------------------------------------------


def cmd_audit_verify(args) -> int:
    settings = _settings(args)
    result = _trail(settings, _db(settings)).verify()
    if not result.ok:
        print(f"audit trail BROKEN at {result.first_break} ({result.records} records)")
        return 1
    print(f"audit trail intact: {result.records} records, head {result.head_seq} {result.head_hash}")
    return 0


def cmd_audit_export(args) -> int:
    from node.api.admin import parse_when
    from node.audit import events, messages
    from node.audit.trail import to_csv

    settings = _settings(args)
    db = _db(settings)
    trail = _trail(settings, db)
    try:
        since, until = parse_when(args.since, "--since"), parse_when(args.until, "--until")
    except Exception as exc:
        print(f"carina: {getattr(exc, 'detail', exc)}", file=sys.stderr)
        return 2
    records = trail.records(since=since, until=until, patient_id=args.patient)
    sys.stdout.write(to_csv(records))
    query = f"since={args.since}" + (f"&until={args.until}" if args.until else "") + \
        (f"&patient={args.patient}" if args.patient else "")
    pairs = sorted({(p, "") for r in records for p in messages.patient_ids_in(r.xml)})
    events.exported(trail, events.cli_actor(), "audit-export.csv", pairs, query)
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
    from node.audit import events, messages
    from node.jobs import requeue_dead

    if args.ids and args.all:
        print("carina: give job ids or --all, not both", file=sys.stderr)
        return 2
    settings = _settings(args)
    if args.destination is not None and args.destination not in {d.name for d in settings.destinations}:
        print(f"carina: warning: no destination {args.destination!r} is configured", file=sys.stderr)
    db = _db(settings)
    count = requeue_dead(db, args.ids or None, destination=args.destination)
    where = f" for destination {args.destination!r}" if args.destination is not None else ""
    target = events.job_object(args.ids[0]) if len(args.ids) == 1 else messages.ParticipantObject(
        "jobs:" + (",".join(map(str, args.ids)) or f"all-dead{where}"), messages.URI, 2, 20)
    events.admin_action(_trail(settings, db), events.cli_actor(), messages.USE_OF_RESTRICTED_FUNCTION, target,
                        f"re-queued {count} dead-letter job(s){where}")
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


def cmd_jobs_show(args) -> int:
    """One job with the full text of each failed attempt (may quote a peer: PHI)."""
    from sqlalchemy import select

    from node.audit import events
    from node.db import Job, JobError, Study

    settings = _settings(args)
    db = _db(settings)
    with db.session() as s:
        job = s.get(Job, args.id)
        if job is None:
            print(f"carina: no job {args.id}", file=sys.stderr)
            return 2
        study = s.get(Study, job.study_id)
        print(f"job {job.id}: {job.stage} {job.destination or '-'} study={job.study_id} v{job.study_version} "
              f"{job.state} attempts={job.attempts}")
        print(f"last error: {job.last_error or '-'}")
        for e in s.scalars(select(JobError).where(JobError.job_id == job.id).order_by(JobError.id)):
            print(f"--- attempt {e.attempt} at {_when(e.at)}: {e.summary}\n{e.detail}")
        pair = (study.patient_id, study.study_uid) if study else ("", "")
    events.record_read(_trail(settings, db), events.cli_actor(), f"carina jobs show {args.id}", [pair])
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
    if args.activate:
        _audit_activation(args, entry.ref, None, imported=True)
    print(f"imported {entry.ref}: {entry.weights} (source SHA-256 {entry.meta['source_sha256']})")
    if args.activate:
        print(f"{entry.ref} is now active; a running node switches to it within inference.model_poll_seconds")
    else:
        print(f"activate it with: carina model activate {entry.ref}")
    return 0


def _audit_activation(args, ref: str, previous: str | None, imported: bool = False, forced: bool = False) -> None:
    from node.audit import events, messages

    settings = _settings(args)
    db = _db(settings)
    what = ("imported and activated" if imported else "activated") + (f" (was {previous})" if previous else "")
    if forced:
        what += "; the activation guard's objections were overridden with --force"
    events.admin_action(_trail(settings, db), events.cli_actor(), messages.SOFTWARE_CONFIGURATION,
                        events.model_object(ref), what)


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
    forced = bool(registry.activations()[-1].get("forced")) if registry.activations() else False
    _audit_activation(args, entry.ref, previous, forced=forced)
    note = " — DEMO WEIGHTS, NOT FOR CLINICAL USE" if entry.demo else ""
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

    from node.roles import ROLES

    serve = sub.add_parser("serve", parents=[common], help="run the node (DICOM SCP, pipeline, HTTP API)")
    serve.add_argument("--role", default="all", choices=ROLES,
                       help="receiver: DICOM SCP, intake and study completion; worker: infer/encode/capture/deliver jobs "
                            "with the model; api: HTTP, UI, FHIR, DICOMweb; all: everything in one process "
                            "(default). Every role serves /healthz, /readyz and /metrics on api.port")
    serve.set_defaults(func=cmd_serve)

    db = sub.add_parser("db", help="the database schema").add_subparsers(dest="action", required=True)
    du = db.add_parser("upgrade", parents=[common],
                       help="create or migrate the schema to this version's (stamps a database made before "
                            "migrations); run before starting the nodes of a new release")
    du.set_defaults(func=cmd_db_upgrade)
    dstat = db.add_parser("status", parents=[common], help="the schema's revision; exit 1 unless current")
    dstat.set_defaults(func=cmd_db_status)

    from node.api.policy import USER_ROLES, Role

    token = sub.add_parser("token", help="API tokens").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", parents=[common], help="create a bearer token (printed once, last line)")
    create.add_argument("--name", required=True)
    create.add_argument("--role", default="integration", choices=[r.value for r in Role])
    create.add_argument("--expires-days", type=float, default=None,
                        help="lifetime in days (default security.token_default_days; at most security.token_max_days)")
    create.set_defaults(func=cmd_token_create)
    tl = token.add_parser("list", parents=[common], help="list tokens: role, expiry, last use, state")
    tl.set_defaults(func=cmd_token_list)
    tr = token.add_parser("revoke", parents=[common], help="revoke a token at once")
    tr.add_argument("name")
    tr.set_defaults(func=cmd_token_revoke)

    user = sub.add_parser("user", help="people who log in to the web UI").add_subparsers(dest="action", required=True)
    ua = user.add_parser("add", parents=[common], help="add a user; the password comes from a prompt or stdin")
    ua.add_argument("name")
    ua.add_argument("--role", required=True, choices=[r.value for r in USER_ROLES])
    ua.set_defaults(func=cmd_user_add)
    ul = user.add_parser("list", parents=[common], help="list users")
    ul.set_defaults(func=cmd_user_list)
    for name, func, text in (("disable", cmd_user_disable, "disable a user and end their sessions"),
                             ("enable", cmd_user_enable, "enable a disabled user"),
                             ("passwd", cmd_user_passwd, "set a user's password (prompt or stdin)")):
        p = user.add_parser(name, parents=[common], help=text)
        p.add_argument("name")
        p.set_defaults(func=func)
    ur = user.add_parser("role", parents=[common], help="change a user's role")
    ur.add_argument("name")
    ur.add_argument("--role", required=True, choices=[r.value for r in USER_ROLES])
    ur.set_defaults(func=cmd_user_role)

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(dest="action", required=True)
    av = audit.add_parser("verify", parents=[common], help="check the hash chain; exit 1 naming the first broken record")
    av.set_defaults(func=cmd_audit_verify)
    ae = audit.add_parser("export", parents=[common], help="CSV of audit records: who saw which patient, and when")
    ae.add_argument("--since", required=True, help="YYYY-MM-DD or an ISO 8601 date-time (UTC unless stated)")
    ae.add_argument("--until", default=None)
    ae.add_argument("--patient", default=None, help="only records naming this patient ID")
    ae.set_defaults(func=cmd_audit_export)

    jobs = sub.add_parser("jobs", help="pipeline jobs").add_subparsers(dest="action", required=True)
    jl = jobs.add_parser("list", parents=[common], help="list jobs")
    jl.add_argument("--state", choices=[state.value for state in JobState])
    jl.set_defaults(func=cmd_jobs_list)
    jr = jobs.add_parser("retry", parents=[common], help="re-queue dead-letter jobs (all, or the given ids)")
    jr.add_argument("ids", nargs="*", type=int)
    jr.add_argument("--all", action="store_true", help="every dead-letter job (the default without ids)")
    jr.add_argument("--destination", help="only the deliveries to this destination (e.g. after its outage)")
    jr.set_defaults(func=cmd_jobs_retry)
    js = jobs.add_parser("show", parents=[common], help="one job with the full error text of each attempt (PHI)")
    js.add_argument("id", type=int)
    js.set_defaults(func=cmd_jobs_show)

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
