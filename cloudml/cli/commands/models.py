"""cloudml models: deploy SavedModels as online services and call them.

    cloudml models create -n linear -v v1 -u ./export [--public] [--replicas 2] [--wait]
    cloudml models list | describe linear | delete linear
    cloudml models versions create linear -v 2 -u s3://bucket/linear/2 --min-replicas 1 --max-replicas 4
    cloudml models versions list linear | versions describe linear 2 | versions delete linear 1
    cloudml models label linear stable 2
    cloudml models scale linear 2 --min 1 --max 4
    cloudml models update linear --traffic 1=90,2=10 | --default-version 2 | --public
    cloudml models predict linear [2] -d data.json
    cloudml models download linear -v 1 [-d DIR] | --label stable | --artifact tflite
    cloudml models export linear -v 1 --format tflite [--optimize none|dynamic-range|float16] [--wait]

A local directory given to -u is uploaded into the tenant's storage first
(ModelsService/UploadModel, streamed through the gateway, with a progress
line for large models; see `cloudml.Client.upload_model`); a URI (file://, s3://, ...) is
passed as is. Versions are TF Serving's numbers; `v1` means 1.
"""
from __future__ import annotations

import json
import sys

from cloudml import errors, serving, units
from cloudml.cli.base import (
    Context,
    UsageError,
    add_command,
    add_group,
    arg_type,
    enum_label,
    format_time,
    message_to_dict,
)

TENANT_HELP = "the tenant (default: your own; admin only for others)"
STATE_PREFIX = "MODEL_VERSION_STATE_"


def _pb():
    from cloudml.models.v1 import models_service_pb2 as pb  # noqa: PLC0415

    return pb


def _version_arg(text: str) -> int:
    return serving.parse_version(text)


def _positive(text: str) -> int:
    value = units.parse_count(text, "replicas")
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _add_spec_arguments(p, *, version_default: str) -> None:
    p.add_argument("-v", "--version", type=arg_type(_version_arg), default=_version_arg(version_default),
                   help=f"the version number (1 or the seed's v1; default {version_default}"
                        + (", meaning the next one)" if version_default == "0" else ")"))
    p.add_argument("-u", "--uri", required=True, metavar="URI_OR_DIR",
                   help="the SavedModel: a local directory (uploaded for you) or an fsspec URI "
                        "(file:///..., s3://...)")
    p.add_argument("--no-upload", action="store_true",
                   help="pass a local path to the service as is (the admin tenant may serve any local path)")
    p.add_argument("--description", default="", help="free text for the version")
    p.add_argument("--replicas", type=arg_type(_positive), help="a fixed number of replicas (default 1)")
    p.add_argument("--min-replicas", type=arg_type(_positive), help="autoscaling lower bound")
    p.add_argument("--max-replicas", type=arg_type(_positive), help="autoscaling upper bound")
    p.add_argument("--cpu", type=arg_type(units.parse_cpu), help=f"per replica: {units.CPU_HELP}")
    p.add_argument("--memory", type=arg_type(units.parse_memory), help=f"per replica: {units.MEMORY_HELP}")
    p.add_argument("--gpus", type=arg_type(lambda v: units.parse_count(v, "gpus")), help="per replica: whole GPUs")
    p.add_argument("--batching", action="store_true", help="batch concurrent requests server-side")
    p.add_argument("--max-batch-size", type=int, default=0, help="batching: largest batch (implies --batching)")
    p.add_argument("--batch-timeout-micros", type=int, default=0,
                   help="batching: how long a request waits for others (implies --batching)")
    p.add_argument("--max-enqueued-batches", type=int, default=0,
                   help="batching: batches that may wait; beyond, UNAVAILABLE (implies --batching)")
    p.add_argument("--num-batch-threads", type=int, default=0, help="batching: parallel batches (implies --batching)")
    p.add_argument("--wait", action="store_true",
                   help="wait until the version is AVAILABLE with all its --replicas ready "
                        "(exit 1 if it fails or --timeout passes first)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits (default 600)")
    p.add_argument("--tenant", default="", help=TENANT_HELP)


def register(subparsers) -> None:
    models = add_group(subparsers, "models", "Models: deploy SavedModels and call them")

    p = add_command(models, "create", create, "Create a model (if new) and a version of it",
                    description="Creates the model NAME unless it exists, then version VERSION from a "
                                "SavedModel, with 1 replica by default.")
    p.add_argument("-n", "--name", required=True, help="the model name (a DNS label)")
    p.add_argument("--public", action="store_true", help="allow Predict without a token (new models only)")
    p.add_argument("--model-description", default="", help="free text for a new model")
    _add_spec_arguments(p, version_default="1")

    p = add_command(models, "list", list_, "List models", aliases=["ls"])
    p.add_argument("--tenant", default="", help=TENANT_HELP)

    p = add_command(models, "describe", describe, "Show a model, its labels and versions", aliases=["get"])
    p.add_argument("name", metavar="NAME")
    p.add_argument("--tenant", default="", help=TENANT_HELP)

    p = add_command(models, "delete", delete, "Delete a model and all its versions (they drain first)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--wait", action="store_true", help="wait until every replica has stopped")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--tenant", default="", help=TENANT_HELP)

    p = add_command(models, "update", update, "Change a model's description, public flag, default version "
                                              "or traffic split")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--description")
    public = p.add_mutually_exclusive_group()
    public.add_argument("--public", dest="public", action="store_true", default=None)
    public.add_argument("--private", dest="public", action="store_false")
    p.add_argument("--default-version", type=arg_type(_version_arg), help="0 clears it")
    p.add_argument("--traffic", metavar="V=PCT,...", help="e.g. 1=90,2=10; 'none' clears the split")
    p.add_argument("--tenant", default="", help=TENANT_HELP)

    p = add_command(models, "label", label, "Point a label at a version (or remove it with --delete)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("label", metavar="LABEL")
    p.add_argument("version", metavar="VERSION", nargs="?", type=arg_type(_version_arg))
    p.add_argument("--delete", action="store_true", help="remove the label")
    p.add_argument("--allow-unavailable", action="store_true",
                   help="allow a version that is not AVAILABLE yet")
    p.add_argument("--tenant", default="", help=TENANT_HELP)

    p = add_command(models, "scale", scale, "Set a version's replica bounds")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", metavar="VERSION", type=arg_type(_version_arg))
    p.add_argument("--min", dest="min_replicas", type=arg_type(_positive))
    p.add_argument("--max", dest="max_replicas", type=arg_type(_positive))
    p.add_argument("--replicas", type=arg_type(_positive), help="a fixed count (min = max)")
    p.add_argument("--tenant", default="", help=TENANT_HELP)

    p = add_command(models, "predict", predict, "Call a model through the gateway's REST API",
                    description="POSTs data to /v1/models/NAME[/versions/N]:predict and prints the JSON answer. "
                                "The data is TF Serving's REST JSON ({\"instances\": ...} or {\"inputs\": ...}) "
                                "or the seed's {\"X_dtype\": \"float32\", \"X\": [[1.0]]}.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", metavar="VERSION", nargs="?", type=arg_type(_version_arg), default=0)
    p.add_argument("-d", "--data", required=True, help="a JSON file ('-' for stdin)")
    p.add_argument("--label", default="", help="call the version this label names")
    p.add_argument("--signature", default="", help="signature_name (default serving_default)")
    p.add_argument("--rest-endpoint", default="", help="the gateway's REST endpoint (default from credentials)")

    p = add_command(models, "download", download, "Download a version's SavedModel (or an artifact of it)",
                    description="Streams the version's SavedModel (or, with --artifact, e.g. tflite, that export's "
                                "file) through the gateway into DIR, checking every file's SHA-256. DIR appears "
                                "only once complete; a download cut short resumes when run again.")
    p.add_argument("name", metavar="NAME")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("-v", "--version", type=arg_type(_version_arg))
    which.add_argument("--label", help="the version this label names")
    p.add_argument("-d", "--dir", help="where to put it (default ./NAME-vVERSION[-ARTIFACT])")
    p.add_argument("--artifact", default="", help="an export's id (see `models describe`), e.g. tflite")
    p.add_argument("--tenant", default="", help=TENANT_HELP)

    p = add_command(models, "export", export, "Convert a version for devices (TensorFlow Lite)",
                    description="Converts the version with tf.lite.TFLiteConverter on the platform (as your "
                                "tenant's code, within its quota) and stores the result as an artifact of the "
                                "version: `models describe` lists it, `models download NAME -v V --artifact ID` "
                                "fetches it. Asking again with the same options returns the same export.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-v", "--version", type=arg_type(_version_arg), required=True)
    p.add_argument("--format", default="tflite", help="tflite (the only one)")
    p.add_argument("--signature", default="", help="the signature to convert (default serving_default)")
    p.add_argument("--optimize", default="none", help="none (default), dynamic-range or float16")
    p.add_argument("--wait", action="store_true", help="wait until it SUCCEEDED (exit 1 if it FAILED)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits (default 600)")
    p.add_argument("--tenant", default="", help=TENANT_HELP)

    versions = add_group(models, "versions", "Versions of a model")
    p = add_command(versions, "create", versions_create, "Create a version of an existing model")
    p.add_argument("name", metavar="NAME")
    _add_spec_arguments(p, version_default="0")
    p = add_command(versions, "list", versions_list, "List a model's versions", aliases=["ls"])
    p.add_argument("name", metavar="NAME")
    p.add_argument("--tenant", default="", help=TENANT_HELP)
    p = add_command(versions, "describe", versions_describe, "Show one version with its replicas", aliases=["get"])
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", metavar="VERSION", type=arg_type(_version_arg))
    p.add_argument("--tenant", default="", help=TENANT_HELP)
    p = add_command(versions, "delete", versions_delete, "Delete a version (it drains first)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", metavar="VERSION", type=arg_type(_version_arg))
    p.add_argument("--wait", action="store_true", help="wait until its replicas have stopped")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--tenant", default="", help=TENANT_HELP)


# --- display ------------------------------------------------------------------------------

def _state(value: int) -> str:
    return enum_label(_pb().ModelVersionState, value, STATE_PREFIX).upper()


def _ready(version) -> str:
    ready = sum(1 for r in version.replicas if r.state == _pb().MODEL_VERSION_STATE_AVAILABLE)
    return f"{ready}/{version.desired_replicas}"


VERSION_HEADERS = ["VERSION", "STATE", "READY", "MIN", "MAX", "URI", "CREATED"]


def _version_row(v) -> list:
    return [v.version, _state(v.state), _ready(v), v.min_replicas, v.max_replicas, v.model_uri,
            format_time(v.create_time)]


def _version_fields(v) -> list[tuple[str, object]]:
    r = v.resources
    fields = [
        ("Model", v.model), ("Tenant", v.tenant), ("Version", v.version), ("State", _state(v.state)),
        ("URI", v.model_uri), ("Description", v.description),
        ("Resources", f"cpu={units.format_cpu(r.cpu_millis)} memory={units.format_memory(r.memory_bytes)} "
                      f"gpus={r.gpus}"),
        ("Replicas", f"{_ready(v)} ready (min {v.min_replicas}, max {v.max_replicas})"),
        ("Batching", _batching_text(v.batching)), ("Created", format_time(v.create_time)),
    ]
    if v.status.code or v.status.message:
        fields.append(("Error", v.status.message))
    if v.HasField("delete_time"):
        fields.append(("Deleted", format_time(v.delete_time)))
    for replica in v.replicas:
        text = f"{_state(replica.state)} {replica.address or '-'}"
        if replica.status.message:
            text += f" ({replica.status.message})"
        fields.append((f"Replica {replica.id}", text))
    return fields


def _batching_text(b) -> str:
    if not b.enabled:
        return "off"
    parts = [f"{name}={getattr(b, name)}" for name in
             ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")
             if getattr(b, name)]
    return "on" + (" " + " ".join(parts) if parts else "")


def _model_fields(m) -> list[tuple[str, object]]:
    fields = [("Name", m.name), ("Tenant", m.tenant), ("Description", m.description),
              ("Public", "yes" if m.public else "no"),
              ("Default version", m.default_version or "-"),
              ("Labels", ", ".join(f"{k}={v}" for k, v in sorted(m.labels.items())) or "-"),
              ("Traffic split", ", ".join(f"{t.version}={t.percent}%" for t in m.traffic_split) or "-"),
              ("Created", format_time(m.create_time))]
    if m.HasField("delete_time"):
        fields.append(("Deleted", format_time(m.delete_time)))
    return fields


def _print_version(ctx: Context, v, created: bool | None = None) -> None:
    data = message_to_dict(v)
    if created is not None:
        data = {"model_version": data, "created": created}
    ctx.emit(data, fields=_version_fields(v))


# --- commands -------------------------------------------------------------------------------

def _spec(ctx: Context, model: str):
    args = ctx.args
    if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
        raise UsageError("give either --replicas or --min-replicas/--max-replicas")
    uri = args.uri
    if serving.is_local_source(uri) and not args.no_upload:
        import os  # noqa: PLC0415

        from cloudml.cli.commands.jobs import upload_progress  # noqa: PLC0415

        source = os.path.abspath(os.path.expanduser(uri))
        if not serving.is_saved_model_dir(source):
            raise errors.InvalidArgument(f"{source} is not a SavedModel directory (no saved_model.pb)")
        uri = ctx.client.upload_model(model, source, tenant=args.tenant or None,
                                      progress=upload_progress(ctx, os.path.basename(source.rstrip("/"))))
        ctx.note(f"uploaded {args.uri} to {uri}")
    elif serving.is_local_source(uri):
        import os  # noqa: PLC0415

        uri = os.path.abspath(uri)
    options = {name: getattr(args, name) for name in ("max_batch_size", "batch_timeout_micros",
                                                       "max_enqueued_batches", "num_batch_threads")
               if getattr(args, name)}
    return ctx.client.models.version_spec(
        uri, version=args.version, description=args.description, replicas=args.replicas,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        cpu=f"{args.cpu}m" if args.cpu else None, memory=args.memory or None, gpus=args.gpus or None,
        batching=options or bool(args.batching))


def _create_version(ctx: Context, model: str) -> None:
    args = ctx.args
    models = ctx.client.models
    version = models.deploy(model, spec=_spec(ctx, model), tenant=args.tenant)
    created = version.created
    if not created:
        ctx.note(f"version {version.version} of model {model} already exists with this spec")
    if args.wait:
        ctx.note(f"waiting for version {version.version} of model {model} to be AVAILABLE ...")
        version = models.wait(
            model, version.version, tenant=args.tenant, timeout=args.timeout,
            progress=lambda ready, wanted, state: ctx.note(f"  {state.lower()}: {ready}/{wanted} replicas ready"))
    _print_version(ctx, version.proto, created)


def create(ctx: Context) -> None:
    args = ctx.args
    model = ctx.client.models.ensure(args.name, public=args.public, description=args.model_description,
                                     tenant=args.tenant)
    if not model.created and args.public and not model.public:
        ctx.note(f"model {args.name} exists and is not public; use `cloudml models update {args.name} --public`")
    _create_version(ctx, args.name)


def versions_create(ctx: Context) -> None:
    _create_version(ctx, ctx.args.name)


def _all_models(ctx: Context, tenant: str) -> list:
    return [m.proto for m in ctx.client.models.list(tenant=tenant)]


def _all_versions(ctx: Context, tenant: str, name: str) -> list:
    return [v.proto for v in ctx.client.models.versions(name, tenant=tenant)]


def _model_status(model, versions) -> str:
    """"v1 AVAILABLE 2/2, v2 LOADING 0/1"; "DELETING"; "no versions"."""
    if model.HasField("delete_time"):
        return "DELETING"
    return ", ".join(f"v{v.version} {_state(v.state)} {_ready(v)}" for v in versions) or "no versions"


def list_(ctx: Context) -> None:
    models = _all_models(ctx, ctx.args.tenant)
    if ctx.json:
        ctx.emit([message_to_dict(m) for m in models])
        return
    rows = []
    for m in models:
        versions = _all_versions(ctx, m.tenant, m.name) if not m.HasField("delete_time") else []
        rows.append([m.name, "yes" if m.public else "no",
                     ", ".join(f"{k}={v}" for k, v in sorted(m.labels.items())) or "-", _model_status(m, versions),
                     format_time(m.create_time)])
    ctx.emit(None, table=(["NAME", "PUBLIC", "LABELS", "STATUS", "CREATED"], rows))


def describe(ctx: Context) -> None:
    args = ctx.args
    model = ctx.client.models.get(args.name, tenant=args.tenant).proto
    versions = _all_versions(ctx, args.tenant, args.name)
    exports = [e.proto for v in versions if not v.HasField("delete_time")
               for e in ctx.client.models.exports(args.name, v.version, tenant=args.tenant)]
    if ctx.json:
        ctx.emit({"model": message_to_dict(model), "model_versions": [message_to_dict(v) for v in versions],
                  "artifacts": [message_to_dict(e) for e in exports]})
        return
    ctx.emit(None, fields=_model_fields(model))
    ctx.stdout.write("\n")
    ctx.emit(None, table=(VERSION_HEADERS, [_version_row(v) for v in versions]))
    for v in versions:
        if v.status.message:
            ctx.stdout.write(f"\nversion {v.version} error: {v.status.message}\n")
    if exports:
        ctx.stdout.write("\nArtifacts:\n")
        ctx.emit(None, table=(ARTIFACT_HEADERS, [_artifact_row(e) for e in exports]))
        for e in exports:
            if e.state == _pb().EXPORT_STATE_FAILED:
                ctx.stdout.write(f"\nexport {e.id} of version {e.version} failed: {e.message}\n")


ARTIFACT_HEADERS = ["VERSION", "ARTIFACT", "FORMAT", "OPTIONS", "STATE", "SIZE", "SHA256", "CREATED"]


def _options_text(e) -> str:
    from cloudml.sdk.types import Export  # noqa: PLC0415

    text = f"optimize={Export(e).optimization}"
    return text + (f" signature={e.options.signature}" if e.options.signature else "")


def _artifact_row(e) -> list:
    pb = _pb()
    done = e.state == pb.EXPORT_STATE_SUCCEEDED
    return [e.version, e.id, enum_label(pb.ExportFormat, e.format, "EXPORT_FORMAT_").lower(), _options_text(e),
            enum_label(pb.ExportState, e.state, "EXPORT_STATE_").upper(),
            str(e.artifact.size_bytes) if done else "-",
            e.artifact.sha256[:16] if done else "-",
            format_time(e.artifact.create_time if done else e.create_time)]


def download(ctx: Context) -> None:
    import os  # noqa: PLC0415

    from cloudml.cli.commands.jobs import upload_progress  # noqa: PLC0415

    args = ctx.args
    target = args.dir or (f"{args.name}-" + (f"v{args.version}" if args.version else args.label)
                          + (f"-{args.artifact}" if args.artifact else ""))
    got = ctx.client.models.download(args.name, target, version=args.version or 0, label=args.label or "",
                                     artifact=args.artifact, tenant=args.tenant,
                                     progress=upload_progress(ctx, os.path.basename(target.rstrip("/")),
                                                              verb="downloading"))
    if got.resumed_bytes:
        ctx.note(f"resumed: {got.resumed_bytes} bytes were there from an earlier run")
    for rel in got.refetched or []:
        ctx.note(f"SHA-256 mismatch: {rel} (changed on this disk since); fetched it again")
    what = f"artifact {args.artifact}" if args.artifact else "SavedModel"
    text = (f"{got.path} already holds {what} of {args.name} v{got.version} (verified)" if got.already_there else
            f"downloaded {what} of {args.name} v{got.version} to {got.path}: {got.files} files, "
            f"{got.size_bytes} bytes, SHA-256 verified")
    ctx.emit({"path": got.path, "version": str(got.version), "artifact": got.artifact, "files": got.files,
              "size_bytes": str(got.size_bytes), "sha256": got.sha256, "resumed_bytes": str(got.resumed_bytes),
              "refetched": got.refetched or [], "already_there": got.already_there}, text=text)


def export(ctx: Context) -> None:
    args = ctx.args
    models = ctx.client.models
    result = models.export(args.name, args.version, format=args.format, optimize=args.optimize,
                           signature=args.signature, tenant=args.tenant)
    if not result.created:
        ctx.note(f"export {result.id} of {args.name} v{args.version} exists ({result.state})")
    if args.wait and not result.finished:
        ctx.note(f"waiting for export {result.id} of {args.name} v{args.version} ...")
        result = models.wait_export(args.name, args.version, result.id, tenant=args.tenant, timeout=args.timeout,
                                    progress=lambda e: ctx.note(f"  {e.state.lower()}"
                                                                + (f": {e.message}" if e.message else "")))
    elif args.wait and result.state == "FAILED":
        raise errors.FailedPrecondition(f"export {result.id} of {args.name} v{args.version} FAILED: {result.message}")
    e = result.proto
    fields = [("Model", e.model), ("Version", e.version), ("Artifact", e.id), ("Options", _options_text(e)),
              ("State", result.state), ("Attempts", e.attempts)]
    if e.message:
        fields.append(("Message", e.message))
    if result.state == "SUCCEEDED":
        fields += [("Size", f"{e.artifact.size_bytes} bytes"), ("SHA-256", e.artifact.sha256),
                   ("Download", f"cloudml models download {e.model} -v {e.version} --artifact {e.id}")]
    ctx.emit({"export": message_to_dict(e), "created": result.created}, fields=fields)


def delete(ctx: Context) -> None:
    args = ctx.args
    model = ctx.client.models.delete(args.name, wait=args.wait, timeout=args.timeout, tenant=args.tenant).proto
    ctx.emit({"model": message_to_dict(model), "deleted": bool(args.wait)},
             text=f"{'deleted' if args.wait else 'deleting'} model {args.name}")


def update(ctx: Context) -> None:
    pb = _pb()
    args = ctx.args
    changes, paths = pb.Model(), []
    if args.description is not None:
        changes.description = args.description
        paths.append("description")
    if args.public is not None:
        changes.public = args.public
        paths.append("public")
    if args.default_version is not None:
        changes.default_version = args.default_version
        paths.append("default_version")
    if args.traffic is not None:
        paths.append("traffic_split")
        if args.traffic.strip().lower() not in ("", "none"):
            for part in args.traffic.split(","):
                version, sep, percent = part.partition("=")
                try:
                    changes.traffic_split.add(version=serving.parse_version(version.strip()),
                                              percent=int(percent.strip().rstrip("%")))
                except ValueError:
                    raise UsageError(f"--traffic {args.traffic!r}: use VERSION=PERCENT,... e.g. 1=90,2=10") from None
                if not sep:
                    raise UsageError(f"--traffic {args.traffic!r}: use VERSION=PERCENT,... e.g. 1=90,2=10")
    if not paths:
        raise UsageError("nothing to change: give --description, --public/--private, --default-version or --traffic")
    model = ctx.client.models.update(args.name, paths=paths, changes=changes, tenant=args.tenant).proto
    ctx.emit(message_to_dict(model), fields=_model_fields(model))


def label(ctx: Context) -> None:
    args = ctx.args
    if args.delete:
        if args.version is not None:
            raise UsageError("--delete takes no VERSION")
        model = ctx.client.models.unlabel(args.name, args.label, tenant=args.tenant).proto
    else:
        if args.version is None:
            raise UsageError("give the VERSION the label points at (or --delete)")
        model = ctx.client.models.label(args.name, args.label, args.version,
                                        allow_unavailable=args.allow_unavailable, tenant=args.tenant).proto
    ctx.emit(message_to_dict(model), fields=_model_fields(model))


def scale(ctx: Context) -> None:
    args = ctx.args
    if args.replicas is not None:
        if args.min_replicas is not None or args.max_replicas is not None:
            raise UsageError("give either --replicas or --min/--max")
        low = high = args.replicas
    else:
        if args.min_replicas is None and args.max_replicas is None:
            raise UsageError("give --min and/or --max (or --replicas)")
        current = ctx.client.models.get_version(args.name, args.version, tenant=args.tenant).proto
        low = args.min_replicas if args.min_replicas is not None else min(current.min_replicas, args.max_replicas)
        high = args.max_replicas if args.max_replicas is not None else max(current.max_replicas, low)
    version = ctx.client.models.scale(args.name, args.version, min_replicas=low, max_replicas=high,
                                      tenant=args.tenant).proto
    _print_version(ctx, version)


def predict(ctx: Context) -> None:
    args = ctx.args
    try:
        if args.data == "-":
            data = json.load(sys.stdin)
        else:
            with open(args.data) as f:
                data = json.load(f)
    except OSError as err:
        raise UsageError(f"cannot read {args.data}: {err.strerror or err}") from None
    except ValueError as err:
        raise UsageError(f"{args.data} is not JSON: {err}") from None
    if args.version and args.label:
        raise UsageError("give either VERSION or --label")
    result = ctx.client.models.predict(args.name, data=data, version=args.version, label=args.label,
                                       signature_name=args.signature, rest_endpoint=args.rest_endpoint, raw=True)
    ctx.emit(result, text=json.dumps(result, indent=2))


def versions_list(ctx: Context) -> None:
    versions = _all_versions(ctx, ctx.args.tenant, ctx.args.name)
    ctx.emit([message_to_dict(v) for v in versions], table=(VERSION_HEADERS, [_version_row(v) for v in versions]))


def versions_describe(ctx: Context) -> None:
    args = ctx.args
    _print_version(ctx, ctx.client.models.get_version(args.name, args.version, tenant=args.tenant).proto)


def versions_delete(ctx: Context) -> None:
    args = ctx.args
    version = ctx.client.models.delete_version(args.name, args.version, wait=args.wait, timeout=args.timeout,
                                               tenant=args.tenant).proto
    ctx.emit({"model_version": message_to_dict(version), "deleted": bool(args.wait)},
             text=f"{'deleted' if args.wait else 'deleting'} version {args.version} of model {args.name}")
