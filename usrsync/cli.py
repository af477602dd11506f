"""The `usr` / `usrsync` command line: parse, call, render. Logic lives below this module.

Exit codes: 0 success (also NO-OP and DRY-RUN); 1 `diff --exit-code` found differences;
2 usage or configuration error; 3 remote unreachable, authentication failed, agent could not
start; 4 dataset locked by another sync; 5 verification failed, nothing promoted;
6 refused for safety (diverged .events.log, --max-delete, missing primary, unsafe paths);
130 interrupted or declined.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import gc
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click
import msgspec

from usrsync import __version__, audit, config, render
from usrsync.dataset import parse_dataset
from usrsync.errors import EXIT_DIFFERENT, EXIT_INTERRUPTED, EXIT_USAGE, UsrError
from usrsync.log import configure as configure_logging
from usrsync.plan import parse_max_delete

EXIT_CODES_HELP = """\b
Exit codes:
  0    success, including NO-OP and DRY-RUN
  1    diff --exit-code: differences found
  2    usage or configuration error
  3    remote unreachable, authentication failed, agent could not start
  4    dataset locked by another sync (after --wait)
  5    verification failed: nothing was promoted
  6    refused for safety: diverged .events.log, --max-delete exceeded,
       source primary missing, unsafe paths
  130  interrupted or declined
"""


class Globals(msgspec.Struct):
    root: str | None
    remotes_config: str | None
    log_format: str
    quiet: bool
    verbose: bool

    def config_path(self) -> Path:
        return config.remotes_path(self.remotes_config)

    def load(self) -> tuple[Path, config.RemotesFile]:
        path = self.config_path()
        return path, config.load_remotes(path)


class UsrGroup(click.Group):
    """Turns expected failures into `error:` + `hint:` lines and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsrError as exc:
            render.print_error(exc.message, exc.hint, exc.exit_code)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            render.print_error("interrupted", "rerun the same command to finish", EXIT_INTERRUPTED)
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:  # `usr … | head`: the reader left; nothing to report
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except Exception as exc:  # noqa: BLE001 - last resort: one line unless -v
            verbose = bool(ctx.obj and ctx.obj.verbose)
            if verbose:
                traceback.print_exc()
            render.print_error(f"internal error: {type(exc).__name__}: {exc}",
                               "rerun with -v for the traceback and report it", EXIT_USAGE)
            sys.exit(EXIT_USAGE)


@click.group(cls=UsrGroup, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", metavar="PATH", help="Local datasets root (else USR_ROOT, config `root`, platform dir).")
@click.option("--remotes-config", metavar="PATH", help="Remote profiles file (else USR_REMOTES_PATH, platform dir).")
@click.option("--log-format", type=click.Choice(["console", "json"]), default="console", show_default=True,
              help="json: one JSON object per event on stderr (cron, log shippers).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs and tracebacks.")
@click.version_option(__version__, prog_name="usrsync")
@click.pass_context
def cli(ctx: click.Context, root, remotes_config, log_format, quiet, verbose) -> None:
    """usrsync: move USR datasets between this machine and a remote over SSH, verified and atomic."""
    ctx.obj = Globals(root=root, remotes_config=remotes_config, log_format=log_format, quiet=quiet,
                      verbose=verbose)
    configure_logging(log_format, verbose=verbose, quiet=quiet)


def complete_remote(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of remote names from the remotes config (nothing when it is unreadable)."""
    try:
        cfg = config.load_remotes(config.remotes_path(ctx.find_root().params.get("remotes_config")))
    except UsrError:
        return []
    return [name for name in sorted(cfg.remotes) if name.startswith(incomplete)]


def sync_options(func):
    options = [
        click.option("--verify", type=click.Choice(["hash", "auto", "size", "parquet"]), default="hash",
                     show_default=True, help="How records.parquet is compared."),
        click.option("--verify-sidecars/--no-verify-sidecars", default=True, show_default=True,
                     help="Reread and check transferred sidecar files."),
        click.option("--verify-derived-hashes/--no-verify-derived-hashes", default=True, show_default=True,
                     help="Compare _derived and _auxiliary by content hash (else size and mtime)."),
        click.option("--primary-only", is_flag=True, help="Only records.parquet."),
        click.option("--skip-snapshots", is_flag=True, help="Leave _snapshots out."),
        click.option("--dry-run", is_flag=True, help="Show what would move; change nothing."),
        click.option("-y", "--yes", is_flag=True, help="Do not ask before transferring."),
        click.option("--audit-json-out", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
                     help="Write the audit JSON here (also on failure)."),
        click.option("--strict-bootstrap-id", is_flag=True,
                     help="Accepted for compatibility: dataset ids are never guessed."),
        click.option("--json", "as_json", is_flag=True, help="Print the audit document to stdout."),
        click.option("--jobs", type=click.IntRange(1, 64), default=2, show_default=True,
                     help="Hash workers (on a network filesystem: 4 stat and hash threads each)."),
        click.option("--wait", type=click.FloatRange(0), default=0, show_default=True, metavar="SECONDS",
                     help="Wait this long for a busy lock."),
        click.option("--max-delete", default="50%", show_default=True, metavar="N|PCT%",
                     help="Refuse a transfer that deletes more files."),
        click.option("--no-cache", is_flag=True, help="Rehash everything."),
        click.option("--progress/--no-progress", default=True, help="Progress bars (terminal only)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _sync_command(action: str):
    def command(obj: Globals, dataset: str, remote: str, **opts) -> None:
        from usrsync import sync
        from usrsync.progress import terminal_hooks

        # What the imports made lives as long as the run: out of the collector's reach, its full
        # collections skip those objects (30-40 ms of CPU in a pull of a 100k-file dataset).
        gc.freeze()
        path, cfg = obj.load()
        profile = config.get_remote(cfg, remote, path)
        root = config.resolve_root(obj.root, cfg)
        dataset_id = parse_dataset(dataset, root)
        interactive = sys.stdin.isatty()
        if action != "diff" and not opts["yes"] and not opts["dry_run"] and not interactive:
            raise UsrError(f"{action} changes files and needs confirmation, but there is no terminal to ask",
                           "add -y to confirm non-interactively (e.g. in cron), or --dry-run to preview")
        options = sync.SyncOptions(
            verify=opts["verify"], sidecars=opts["verify_sidecars"],
            content_hashes=opts["verify_derived_hashes"] and opts["verify_sidecars"],
            primary_only=opts["primary_only"], skip_snapshots=opts["skip_snapshots"], dry_run=opts["dry_run"],
            jobs=opts["jobs"], wait=opts["wait"], max_delete=parse_max_delete(opts["max_delete"]),
            use_cache=not opts["no_cache"],
        )
        show = not obj.quiet and not opts["as_json"]
        # JSON logs share stderr with the bars: a log shipper must see only JSON lines there.
        bars = opts["progress"] and show and obj.log_format == "console"
        with terminal_hooks(action, show_progress=bars, ask=not opts["yes"]) as hooks:
            doc, code = asyncio.run(sync.run(action, dataset_id, profile, root, options, hooks,
                                             opts["audit_json_out"]))
        if opts["as_json"]:
            sys.stdout.write(audit.encode(doc).decode())
        elif show:
            render.print_report(doc.data)
        if doc.data.error is not None:
            render.print_error(doc.data.error.message, doc.data.error.hint, code)
            sys.exit(code)
        if action == "diff" and opts["exit_code"] and not doc.data.post.in_sync:
            sys.exit(EXIT_DIFFERENT)

    return command


def _register_sync(action: str, help_text: str, extra: list | None = None) -> None:
    func = _sync_command(action)

    @click.pass_obj
    @functools.wraps(func)
    def wrapper(obj, **kwargs):
        if "exit_code" not in kwargs:
            kwargs["exit_code"] = False
        return func(obj, **kwargs)

    wrapper = sync_options(wrapper)
    for option in extra or []:
        wrapper = option(wrapper)
    wrapper = click.argument("remote", shell_complete=complete_remote)(wrapper)
    wrapper = click.argument("dataset")(wrapper)
    cli.command(action, help=help_text, epilog=EXIT_CODES_HELP)(wrapper)


_register_sync("diff", "Compare DATASET here and on REMOTE by content, section by section (read-only).",
               [click.option("--exit-code", is_flag=True, help="Exit 1 when anything differs (git-style).")])
_register_sync("pull", "Copy DATASET from REMOTE to here: staged, verified, promoted atomically.")
_register_sync("push", "Copy DATASET from here to REMOTE: staged, verified, promoted, re-verified.")


# --- remotes ------------------------------------------------------------------------------


@cli.group()
def remotes() -> None:
    """Manage remote profiles."""


@remotes.command("list")
@click.pass_obj
def remotes_list(obj: Globals) -> None:
    """One line per remote."""
    path, cfg = obj.load()
    if not cfg.remotes:
        click.echo(f"no remotes in {path}; add one with `usr remotes add NAME --host … --base-dir …`")
    for name, profile in sorted(cfg.remotes.items()):
        where = config.Remote(name=name, profile=profile).display_host
        click.echo(f"{name}\t{profile.type}\t{where}\tbase_dir={profile.base_dir}")


@remotes.command("show")
@click.argument("name", shell_complete=complete_remote)
@click.pass_obj
def remotes_show(obj: Globals, name: str) -> None:
    """Every setting of one remote, defaults included."""
    path, cfg = obj.load()
    remote = config.get_remote(cfg, name, path)
    click.echo(f"name = {name}")
    for key, value in msgspec.structs.asdict(remote.profile).items():
        if value is not None:
            click.echo(f"{key} = {json.dumps(value)}")
    click.echo(f"# from {path}")


@remotes.command("add")
@click.argument("name")
@click.option("--type", "kind", type=click.Choice(["ssh", "local"]), default="ssh", show_default=True)
@click.option("--host")
@click.option("--base-dir", required=True)
@click.option("--user")
@click.option("--port", type=int)
@click.option("--identity-file")
@click.option("--known-hosts")
@click.option("--python")
@click.option("--rsync-path")
@click.option("--transport", type=click.Choice(["asyncssh", "openssh"]))
@click.option("--lock-timeout", type=float)
@click.option("--replace", is_flag=True, help="Overwrite an existing remote of that name.")
@click.pass_obj
def remotes_add(obj: Globals, name: str, kind: str, replace: bool, **fields) -> None:
    """Add a remote profile (creates the file with mode 600)."""
    values = {k: v for k, v in fields.items() if v is not None}
    try:
        profile = msgspec.convert({"type": kind, **values}, config.RemoteProfile)
    except msgspec.ValidationError as exc:
        raise UsrError(f"invalid remote {name!r}: {exc}", "see `usr remotes add --help`") from None
    path = obj.config_path()
    config.add_remote(path, name, profile, replace=replace)
    if not obj.quiet:
        click.echo(f"added remote {name} to {path}")


@remotes.command("remove")
@click.argument("name", shell_complete=complete_remote)
@click.pass_obj
def remotes_remove(obj: Globals, name: str) -> None:
    """Remove a remote profile."""
    path = obj.config_path()
    config.remove_remote(path, name)
    if not obj.quiet:
        click.echo(f"removed remote {name} from {path}")


@remotes.command("doctor")
@click.option("--remote", "name", required=True, shell_complete=complete_remote)
@click.pass_obj
def remotes_doctor(obj: Globals, name: str) -> None:
    """Check everything a sync with this remote needs, one line each."""
    from usrsync.doctor import run_doctor

    path, cfg = obj.load()
    remote = config.get_remote(cfg, name, path)
    checks = asyncio.run(run_doctor(remote))
    failed = [c for c in checks if not c.ok]
    for check in checks:
        mark = "ok  " if check.ok else ("FAIL" if check.ran else "skip")
        click.echo(f"{mark} {check.name}: {check.detail}")
        if not check.ok and check.fix:
            click.echo(f"     fix: {check.fix}")
    if failed:
        sys.exit(failed[0].exit_code)


@remotes.command("ls")
@click.argument("name", shell_complete=complete_remote)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def remotes_ls(obj: Globals, name: str, as_json: bool) -> None:
    """Datasets present on a remote, with size, file count and last change."""
    from usrsync.session import RemoteSession

    path, cfg = obj.load()
    remote = config.get_remote(cfg, name, path)

    async def listing():
        session = await RemoteSession.open(remote)
        try:
            return await session.ls()
        finally:
            await session.close()

    datasets = asyncio.run(listing())
    if as_json:
        sys.stdout.write(msgspec.json.encode(datasets).decode() + "\n")
        return
    for d in datasets:
        changed = audit.dt.datetime.fromtimestamp(d.last_change_ns / 1e9, audit.dt.timezone.utc)
        click.echo(f"{d.dataset}\t{render.human_bytes(d.bytes)}\t{d.files} files\t"
                            f"{changed:%Y-%m-%dT%H:%M:%SZ}")


@remotes.command("warm-auth")
@click.option("--remote", "name", required=True, shell_complete=complete_remote)
@click.option("--idle-timeout", type=click.FloatRange(1), default=3600, show_default=True, metavar="SECONDS",
              help="Close the kept connection after this long without a run.")
@click.option("--stop", is_flag=True, help="Close the kept connection now.")
@click.pass_obj
def remotes_warm_auth(obj: Globals, name: str, idle_timeout: float, stop: bool) -> None:
    """Authenticate once (MFA) and keep the connection for later runs, cron included."""
    from usrsync import broker

    path, cfg = obj.load()
    remote = config.get_remote(cfg, name, path)
    if stop:
        stopped = asyncio.run(broker.stop(remote.name))
        click.echo(f"closed the kept connection to {remote.name}" if stopped
                            else f"no kept connection to {remote.name}")
        return
    existing = asyncio.run(broker.status(remote.name))
    status = existing or broker.start(path, remote, idle_timeout)
    if not obj.quiet:
        click.echo(f"{'already connected' if existing else 'connected'} to {status.host} "
                            f"(broker pid {status.pid}); later runs reuse this connection until "
                            f"{status.idle_timeout:g} s pass without one")


@remotes.command("status")
@click.option("--remote", "name", help="Only this remote.", shell_complete=complete_remote)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def remotes_status(obj: Globals, name: str | None, as_json: bool) -> None:
    """Kept (warm-auth) connections per remote."""
    from usrsync import broker

    path, cfg = obj.load()
    names = [config.get_remote(cfg, name, path).name] if name else sorted(cfg.remotes)
    found = {n: asyncio.run(broker.status(n)) for n in names}
    if as_json:
        sys.stdout.write(msgspec.json.encode(found).decode() + "\n")
        return
    for n, status in found.items():
        if status is None:
            click.echo(f"{n}\tnot connected")
        else:
            click.echo(f"{n}\tconnected to {status.host}\tpid {status.pid}\tsince {status.started_at}\t"
                                f"idle {status.idle_seconds:g}/{status.idle_timeout:g} s\t"
                                f"{status.active_channels} active")


# --- history, schema, demo ------------------------------------------------------------------


@cli.command()
@click.argument("dataset")
@click.option("--remote", help="Only runs against this remote.", shell_complete=complete_remote)
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the audit documents as a JSON array.")
@click.pass_obj
def history(obj: Globals, dataset: str, remote: str | None, limit: int, as_json: bool) -> None:
    """The archived audits of DATASET, newest first."""
    _, cfg = obj.load()
    dataset_id = parse_dataset(dataset, config.resolve_root(obj.root, cfg))
    docs = audit.load_history(dataset_id, remote, limit)
    if as_json:
        sys.stdout.write(msgspec.json.encode(docs).decode() + "\n")
        return
    for doc in docs:
        d = doc.data
        click.echo(f"{d.started_at}\t{d.action}\t{d.transfer_state}\t{d.remote.name}\t"
                            f"{d.transfer.files} files\t{render.human_bytes(d.transfer.bytes)}")


@cli.group()
def schema() -> None:
    """JSON Schemas of what usrsync writes."""


@schema.command("audit")
def schema_audit() -> None:
    """The JSON Schema of the audit document."""
    sys.stdout.write(json.dumps(audit.json_schema(), indent=2) + "\n")


@cli.command()
@click.option("--keep", is_flag=True, help="Keep the demo directory afterwards.")
def demo(keep: bool) -> None:
    """Run the audit loop (diff, pull, change, push, pull again, diff) on a throwaway local remote."""
    from usrsync.demo import run_demo

    sys.exit(run_demo(keep=keep))


def main() -> None:
    # At exit the interpreter runs the cyclic collector over everything still alive while it
    # tears modules down: 0.10-0.15 s of every run, 0.01-0.02 s with every object frozen out of
    # its reach. Nothing needs that collection by then: files are closed, the audit is written.
    atexit.register(gc.freeze)
    cli(prog_name="usr")
