"""The governance subcommands of `carina` (registered by node/cli.py):

    carina eval NAME@VERSION --labels FILE --images DIR [--out DIR]
    carina model calibrate NAME@VERSION --labels FILE --images DIR --target-sensitivity LABEL=0.95 ...
    carina model finetune --from NAME@VERSION --labels FILE --images DIR --epochs N
    carina model ensemble --name NAME --version V MEMBER@VERSION MEMBER@VERSION ...
    carina model export-onnx NAME@VERSION
    carina model backend torch|onnxruntime|config
    carina model evaluations NAME@VERSION
    carina feedback export --out FILE
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _context(args):
    from node.cli import _settings
    from node.models import ModelManager, ModelRegistry

    settings = _settings(args)
    registry = ModelRegistry.for_settings(settings)
    registry.ensure_demo()  # the demo entry is always there to evaluate or compare against
    return settings, registry, ModelManager(settings, registry)


def _fail(message: str) -> int:
    print(f"carina: {message}", file=sys.stderr)
    return 2


def _scored(args, manager, ref: str, backend: str | None = None):
    from node.governance.labels import read_labels
    from node.governance.scoring import score_set

    labelled = read_labels(args.labels)
    engine = manager.engine_for(ref, backend)
    return labelled, score_set(engine, labelled, Path(args.images), progress=not args.no_progress)


def cmd_eval(args) -> int:
    from node.governance.evaluate import evaluation_record, registry_copy, write_outputs
    from node.governance.labels import LabelError
    from node.models import RegistryError

    settings, registry, manager = _context(args)
    try:
        backend = args.backend or manager.wanted_backend()
        labelled, scored = _scored(args, manager, args.ref, backend)
        record = evaluation_record(scored, labelled, Path(args.images), resamples=args.resamples, seed=args.seed,
                                   backend=backend)
        out = Path(args.out) if args.out else Path("evaluations") / f"{args.ref.replace('@', '_')}-{record['date'][:19].replace(':', '')}"
        outputs = write_outputs(record, scored, out)
        kept = registry.record_evaluation(args.ref, registry_copy(record, outputs))
    except (LabelError, RegistryError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    for label, row in record["pathologies"].items():
        if not row["evaluated"]:
            print(f"{label:20s} not evaluated ({row['reason']})")
        elif row["auroc"] is None:
            print(f"{label:20s} n={row['n']} {row['auroc_note']}")
        else:
            lo, hi = row["auroc_ci"]
            sens = "-" if row["sensitivity"] is None else f"{row['sensitivity']:.3f}"
            spec = "-" if row["specificity"] is None else f"{row['specificity']:.3f}"
            print(f"{label:20s} n={row['n']} prevalence={row['prevalence']:.3f} AUROC={row['auroc']:.3f} "
                  f"({lo:.3f}-{hi:.3f}) sens={sens} spec={spec} ECE={row['ece']:.3f}")
    print(f"report: {outputs['html']}\njson: {outputs['json']}\nregistry record: {kept}")
    return 0


def cmd_calibrate(args) -> int:
    from node.governance.calibrate import CalibrationError, calibrate, parse_targets
    from node.governance.labels import LabelError
    from node.models import RegistryError

    settings, registry, manager = _context(args)
    try:
        sens = parse_targets(args.target_sensitivity, "sensitivity")
        spec = parse_targets(args.target_specificity, "specificity")
        parent = registry.get(args.ref)
        labelled, scored = _scored(args, manager, parent.ref)
        thresholds, record = calibrate(scored, labelled, Path(args.images), parent.op_thresholds, sensitivity=sens,
                                       specificity=spec, resamples=args.resamples, seed=args.seed)
        entry = registry.create_calibrated(parent.ref, thresholds, record)
    except (CalibrationError, LabelError, RegistryError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    for t in record["targets"]:
        a = t["achieved"]
        print(f"{t['label']}: {t['target']} >= {t['value']} -> threshold {t['threshold']:.6f} (was {t['previous_threshold']:.4f}); "
              f"sensitivity {a['sensitivity']:.3f}, specificity {a['specificity']:.3f} on {t['n']} images")
    print(f"registered {entry.ref} (not active; {parent.ref} unchanged). Activate it with: carina model activate {entry.ref}")
    return 0


def cmd_finetune(args) -> int:
    from node.governance.finetune import finetune
    from node.governance.labels import LabelError, read_labels
    from node.models import RegistryError

    settings, registry, manager = _context(args)
    try:
        result = finetune(registry, manager, args.source, read_labels(args.labels), Path(args.images), epochs=args.epochs,
                          lr=args.lr, batch_size=args.batch_size, holdout=args.holdout, seed=args.seed,
                          device=args.device, version=args.version, resamples=args.resamples,
                          progress=not args.no_progress)
    except (LabelError, RegistryError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    r = result.record
    print(f"trained {r['trained']} on {r['device']}: training loss {r['training_loss_before']:.4f} -> "
          f"{r['training_loss_after']:.4f} over {r['epochs']} epoch(s) ({r['training_images']} images)")
    for label, row in result.heldout["pathologies"].items():
        lo, hi = row["delta_ci"]
        print(f"{label:20s} held-out AUROC {row['candidate_auroc']:.3f} vs parent {row['parent_auroc']:.3f} "
              f"(difference {row['delta']:+.3f}, 95% CI {lo:+.3f}..{hi:+.3f})")
    from node.models import activation_guard

    objections = activation_guard(registry, result.entry)
    print(f"registered {result.entry.ref} (not active)."
          + (f" The activation guard would refuse it: {len(objections)} pathology(ies) worse than {r['parent']}."
             if objections else f" Activate it with: carina model activate {result.entry.ref}"))
    return 0


def cmd_ensemble(args) -> int:
    from node.models import RegistryError

    _, registry, _ = _context(args)
    try:
        entry = registry.create_ensemble(args.name, args.version, args.members)
    except RegistryError as exc:
        return _fail(str(exc))
    print(f"registered ensemble {entry.ref} of {', '.join(entry.members)}; operating points: the members' mean. "
          f"Calibrate it with: carina model calibrate {entry.ref} --labels FILE --images DIR --target-sensitivity ...")
    return 0


def cmd_export_onnx(args) -> int:
    from inference.model import WeightsError
    from node.models import RegistryError

    _, registry, _ = _context(args)
    try:
        paths = registry.export_onnx(args.ref)
    except (RegistryError, WeightsError) as exc:
        return _fail(str(exc))
    for path in paths:
        meta = json.loads(Path(str(path) + ".json").read_text())
        print(f"exported {path} (max |dp| against torch at export: {meta['export_max_dp']:.2e})")
    print("run it with inference.backend: onnxruntime, or on a running node: carina model backend onnxruntime")
    return 0


def cmd_backend(args) -> int:
    from node.models import RegistryError

    settings, registry, _ = _context(args)
    try:
        registry.set_backend(None if args.backend == "config" else args.backend)
    except RegistryError as exc:
        return _fail(str(exc))
    wanted = registry.backend_override() or settings.inference.backend
    print(f"runtime: {wanted}; a running node switches within inference.model_poll_seconds "
          "(ONNX Runtime needs `carina model export-onnx` of the active model first)")
    return 0


def cmd_evaluations(args) -> int:
    from node.models import RegistryError

    _, registry, _ = _context(args)
    try:
        entry = registry.get(args.ref)
        records = registry.evaluations(entry.ref)
    except RegistryError as exc:
        return _fail(str(exc))
    for rec in records:
        evaluated = [l for l, row in rec["pathologies"].items() if row["evaluated"]]
        print(f"{rec['date']}\t{rec['user']}\tdataset {rec['dataset_sha256'][:16]}\t{rec['dataset']['images_scored']} images\t"
              f"{len(evaluated)} pathologies\t{rec.get('outputs', {}).get('html', '-')}")
    for key in ("calibration", "heldout"):
        if key in entry.meta:
            print(f"{key}: {json.dumps(entry.meta[key])[:400]}")
    return 0


def cmd_feedback_export(args) -> int:
    from node.cli import _db, _settings
    from node.feedback import export_labelled_set

    settings = _settings(args)
    count = export_labelled_set(_db(settings), Path(args.out), instances_dir=Path(settings.storage.data_dir) / "instances")
    print(f"wrote {count} labelled image(s) to {args.out}; use it with --labels {args.out} "
          f"--images {Path(settings.storage.data_dir) / 'instances'}")
    return 0


def register(sub, model, common) -> None:
    """Add the governance commands to `carina`'s parser (`sub`) and its `model` subparsers."""
    def labelled(p, images_help="directory the labels' image paths are relative to"):
        p.add_argument("--labels", required=True, help="CSV: image column + 0/1 per pathology, or NIH Data_Entry_2017.csv")
        p.add_argument("--images", required=True, help=images_help)
        p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for the 95%% CIs")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval", parents=[common], help="validate a model on local labelled images (JSON + HTML report)")
    ev.add_argument("ref", metavar="NAME@VERSION")
    labelled(ev)
    ev.add_argument("--out", help="output directory (default: evaluations/NAME_VERSION-DATE)")
    ev.add_argument("--backend", choices=["torch", "onnxruntime"], help="runtime (default: the node's)")
    ev.set_defaults(func=cmd_eval)

    mc = model.add_parser("calibrate", parents=[common], help="new version NAME@VERSION+calN with operating points for targets")
    mc.add_argument("ref", metavar="NAME@VERSION")
    labelled(mc)
    mc.add_argument("--target-sensitivity", action="append", metavar="LABEL=VALUE")
    mc.add_argument("--target-specificity", action="append", metavar="LABEL=VALUE")
    mc.set_defaults(func=cmd_calibrate)

    mf = model.add_parser("finetune", parents=[common], help="train a candidate from a model; compared on a held-out split")
    mf.add_argument("--from", dest="source", required=True, metavar="NAME@VERSION")
    labelled(mf)
    mf.add_argument("--epochs", type=int, required=True)
    mf.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate (default 1e-5)")
    mf.add_argument("--batch-size", type=int, default=8)
    mf.add_argument("--holdout", type=float, default=0.25, help="fraction of images held out (never trained on)")
    mf.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    mf.add_argument("--version", help="the candidate's version (default: PARENT_VERSION+ftN)")
    mf.set_defaults(func=cmd_finetune)

    me = model.add_parser("ensemble", parents=[common], help="register an ensemble of registered models")
    me.add_argument("members", nargs="+", metavar="MEMBER@VERSION")
    me.add_argument("--name", required=True)
    me.add_argument("--version", required=True)
    me.set_defaults(func=cmd_ensemble)

    mx = model.add_parser("export-onnx", parents=[common], help="export a model (each member of an ensemble) to ONNX")
    mx.add_argument("ref", metavar="NAME@VERSION")
    mx.set_defaults(func=cmd_export_onnx)

    mb = model.add_parser("backend", parents=[common], help="switch a running node's runtime (config: back to inference.backend)")
    mb.add_argument("backend", choices=["torch", "onnxruntime", "config"])
    mb.set_defaults(func=cmd_backend)

    mv = model.add_parser("evaluations", parents=[common], help="a model's evaluation records, calibration and held-out comparison")
    mv.add_argument("ref", metavar="NAME@VERSION")
    mv.set_defaults(func=cmd_evaluations)

    fb = sub.add_parser("feedback", help="radiologist feedback").add_subparsers(dest="action", required=True)
    fe = fb.add_parser("export", parents=[common], help="feedback as a labelled set (CSV: image + 0/1 per pathology)")
    fe.add_argument("--out", required=True)
    fe.set_defaults(func=cmd_feedback_export)
