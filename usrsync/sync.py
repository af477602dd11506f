"""diff / pull / push: the state machines that turn manifests into a verified, promoted dataset.

Every run ends in an audit document, also on failure. The live dataset is only ever touched
by an atomic promotion of a fully verified staging tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

import asyncssh
import msgspec
import structlog

from remote_agent import usrsync_agent as engine
from usrsync import audit, rsync
from usrsync.compare import EventsLines, EventsState, Policy, compare, events_relation
from usrsync.config import Remote
from usrsync.dataset import EVENTS, SECTIONS, local_dataset_dir
from usrsync.errors import (
    EXIT_INTERRUPTED,
    InterruptedByUser,
    LockedError,
    RemoteError,
    TransferError,
    UsrError,
    VerificationError,
)
from usrsync.locks import acquire_local_lock
from usrsync.manifest import KIND_FILE, Entry, ExpectedTree, HashProgress, Manifest, local_manifest
from usrsync.manifest import cached_algo as manifest_cached_algo
from usrsync.plan import MaxDelete, TransferPlan, plan_transfer
from usrsync.protocol import AgentCallError
from usrsync.session import RemoteSession, VerifyReply

log = structlog.get_logger("usrsync")
Action = Literal["diff", "pull", "push"]
# Files per rsync run. rsync holds its whole file list in memory on both ends, and we hold its
# itemized output, so a huge delta (a first pull of millions of files) moves in bounded steps.
RSYNC_BATCH_FILES = 100_000
# What a best-effort remote cleanup may meet; the next run's recover() removes what it leaves.
_REMOTE_CLEANUP_ERRORS = (UsrError, asyncssh.Error, OSError, asyncio.IncompleteReadError)


class SyncOptions(msgspec.Struct, kw_only=True):
    verify: Literal["hash", "auto", "size", "parquet"] = "hash"
    sidecars: bool = True
    content_hashes: bool = True
    primary_only: bool = False
    skip_snapshots: bool = False
    dry_run: bool = False
    jobs: int = 2
    wait: float = 0.0
    max_delete: MaxDelete = MaxDelete(percent=50.0)
    use_cache: bool = True


class Hooks(msgspec.Struct, kw_only=True):
    """How the run talks to the person at the terminal (the CLI fills these in)."""

    confirm: Callable[[audit.AuditData, TransferPlan], bool] | None = None
    hash_progress: Callable[[str, int, int, int, int], None] | None = None  # side, done, of totals
    transfer_progress: Callable[[int, int, int], None] | None = None


def new_txid() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


def resolve_policy(options: SyncOptions) -> tuple[Policy, list[str]]:
    notes: list[str] = []
    verify = options.verify
    if verify == "auto":
        verify = "hash"
        notes.append("--verify auto resolved to hash: content digests are available on both ends")
    policy = Policy(verify=verify, sidecars=options.sidecars, content_hashes=options.content_hashes,
                    primary_only=options.primary_only, skip_snapshots=options.skip_snapshots)
    return policy, notes


def require_pyarrow(remote_has_pyarrow: bool) -> None:
    """--verify parquet reads row and column counts with pyarrow on both ends."""
    if not (engine.has_pyarrow() and remote_has_pyarrow):
        missing = "this machine" if not engine.has_pyarrow() else "the remote"
        raise UsrError(f"--verify parquet needs pyarrow on both ends; {missing} has none",
                       "use --verify hash (content digests, the default) or install pyarrow")


class Run:
    """One diff, pull or push of one dataset against one remote."""

    def __init__(self, action: Action, dataset: str, remote: Remote, root: Path, options: SyncOptions,
                 hooks: Hooks | None = None, audit_out: Path | None = None):
        self.action = action
        self.audit_out = audit_out
        self.dataset = dataset
        self.remote = remote
        self.root = root
        self.options = options
        self.hooks = hooks or Hooks()
        self.txid = new_txid()
        self.local_dir = local_dataset_dir(root, dataset)
        self.session: RemoteSession | None = None
        self.local_lock: engine.Lock | None = None
        self.remote_locked = False
        self.algo = "sha256"
        self._speculation: tuple[str, threading.Event, asyncio.Task[Manifest]] | None = None
        self._hash_caches: dict[str, engine.HashCache] = {}  # per algo: this side's, loaded once per run
        self._local_rsync: asyncio.Task[rsync.RsyncInfo] | None = None
        self.log = log.bind(action=action, dataset=dataset, remote=remote.name, txid=self.txid)
        profile = remote.profile
        self.data = audit.AuditData(
            action=action, transfer_state="FAILED", dataset=dataset, txid=self.txid,
            remote=audit.RemoteInfo(name=remote.name, host=profile.host or "localhost", base_dir=profile.base_dir,
                                    type=profile.type, transport="local" if remote.is_local else profile.transport),
            verify=audit.VerifyInfo(primary=options.verify, sidecars="strict" if options.sidecars else "off",
                                    content_hashes="on" if options.content_hashes else "off", hash_algo=""),
            started_at=audit.utc_now(),
        )

    # --- the run -------------------------------------------------------------------------

    async def execute(self) -> tuple[audit.AuditDocument, int]:
        """Run to the end; the audit is written (and archived) whatever happens, Ctrl-C included."""
        exit_code = 0
        interrupted = False
        started = time.monotonic()
        try:
            exit_code = await self._run()
        except UsrError as exc:
            exit_code = self._fail(exc.kind, exc.message, exc.hint, exc.exit_code)
        except (asyncssh.Error, ConnectionError, asyncio.IncompleteReadError) as exc:
            exit_code = self._fail("remote", f"the connection to {self.remote.display_host} was lost ({exc})",
                                   "rerun the same command: nothing was promoted half-way", RemoteError.exit_code)
        except asyncio.TimeoutError:  # a single agent call outlived session.CALL_TIMEOUT
            exit_code = self._fail("remote", f"the remote agent on {self.remote.display_host} did not finish a call",
                                   "rerun the same command: nothing was promoted half-way", RemoteError.exit_code)
        except OSError as exc:  # this machine's filesystem: a full disk, a permission
            exit_code = self._fail("transfer", f"a local file operation failed: {exc}",
                                   "fix the cause (free space, permissions) and rerun the same command; the live "
                                   "dataset is the old or the new one, never a mix", TransferError.exit_code)
        except (KeyboardInterrupt, asyncio.CancelledError):
            interrupted = True
            exit_code = self._fail("interrupted", "interrupted", "rerun the same command to finish the sync",
                                   EXIT_INTERRUPTED)
        finally:
            await self._release()
            self.data.finished_at = audit.utc_now()
            doc = audit.AuditDocument(usr_output_version=audit.OUTPUT_VERSION, data=self.data)
            self._save(doc)
        t = self.data.transfer
        self.log.info("finished", transfer_state=self.data.transfer_state, exit_code=exit_code, files=t.files,
                      bytes=t.bytes, deleted=t.deleted, transfer_seconds=t.seconds, in_sync=self.data.post.in_sync,
                      seconds=round(time.monotonic() - started, 3), warnings=self.data.warnings)
        if interrupted:
            raise KeyboardInterrupt
        return doc, exit_code

    def _save(self, doc: audit.AuditDocument) -> None:
        if self.audit_out is not None:
            audit.write_atomic(self.audit_out, doc)
        try:
            audit.archive(doc)
        except OSError as exc:
            self.data.warnings.append(f"could not archive the audit: {exc}")

    def _fail(self, kind: str, message: str, hint: str | None, code: int) -> int:
        self.data.transfer_state = "FAILED"
        self.data.error = audit.ErrorReport(kind=kind, message=message, hint=hint, exit_code=code)
        self.log.info("failed", kind=kind, message=message, exit_code=code)
        return code

    async def _run(self) -> int:
        policy, notes = resolve_policy(self.options)
        transferring = self.action != "diff" and not self.options.dry_run
        if transferring:
            await self._lock_local()
            self._probe_local_rsync()
        self._speculate_local_manifest(policy)
        self.log.info("connecting", host=self.remote.display_host)
        self.session = await RemoteSession.open(self.remote)
        hello = self.session.hello
        self.algo = "xxh3_128" if "xxh3_128" in hello.hash_algos and engine.xxhash is not None else "sha256"
        if policy.verify == "parquet":
            require_pyarrow(await self.session.has_pyarrow())
        self.data.verify = audit.verify_info(policy, self.algo, notes)
        self.data.agent = audit.AgentInfo(version=hello.version, python=hello.python, hash_algo=self.algo,
                                          hostname=hello.hostname, rsync=(hello.rsync or "").split("\n")[0] or None)
        if transferring:
            await self._lock_remote()
            engine.checkpoint("after-lock")

        local, remote = await self._manifests(policy)
        engine.checkpoint("after-manifest")
        # Also out of scope: the audit reports a skipped section as it stands, like the others.
        events = await self._events_state(local, remote)
        shapes = await self._shapes() if policy.verify == "parquet" else None
        cmp = compare(local, remote, policy, events=events, primary_shapes=shapes)
        audit.fill_sections(self.data, cmp, shapes)
        if cmp.specials:
            self.data.warnings.append(f"{len(cmp.specials)} symlinks or special files are not transferred")
        self.log.info("compared", changed=cmp.changed_sections())

        if self.action == "diff":
            if not (cmp.local_exists or cmp.remote_exists):  # a typo must not pass a gate as "up to date"
                raise UsrError(f"dataset {self.dataset!r} exists neither here nor on remote {self.remote.name!r}",
                               "check the dataset id and the remote's base_dir (`usr remotes show NAME`)")
            self.data.transfer_state = "DIFF-ONLY"
            self.data.post = audit.PostReport(verified=False, in_sync=not cmp.changed)
            return 0
        plan = plan_transfer(cmp, self.action, policy, self.options.max_delete)
        self.data.transfer = audit.TransferReport(files=len(plan.copy), bytes=plan.bytes, deleted=len(plan.delete),
                                                  linked=plan.linked, subtree=None if plan.noop else plan.subtree)
        if plan.noop:
            self.data.transfer_state = "NO-OP"
            self.data.post = audit.PostReport(verified=True, in_sync=True)
            return 0
        if self.options.dry_run:
            self.data.transfer_state = "DRY-RUN"
            return 0
        if self.hooks.confirm is not None and not self.hooks.confirm(self.data, plan):
            raise InterruptedByUser(f"{self.action} declined; nothing was changed",
                                    "rerun with -y to skip the question")
        started = time.monotonic()
        if self.action == "pull":
            await self._pull(plan, policy, local, remote)
        else:
            await self._push(plan, policy, local, remote)
        self.data.transfer.seconds = round(time.monotonic() - started, 3)
        self.data.transfer_state = "TRANSFERRED"
        return 0

    # --- locks -----------------------------------------------------------------------------

    async def _lock_local(self) -> None:
        """Our lock on this side, then repair what a crashed run left here (before anything scans it)."""
        started = time.monotonic()
        lock = await asyncio.to_thread(acquire_local_lock, self.root, self.dataset, self.txid,
                                       self.remote.profile.lock_timeout, self.options.wait)
        self.local_lock = lock
        if lock.broken:
            self.data.lock.broken_stale.append({"side": "local", **lock.broken})
        self.data.lock.waited_seconds = round(time.monotonic() - started, 3)
        self._warn_recovered(await asyncio.to_thread(engine.recover, str(self.root), self.dataset))

    async def _lock_remote(self) -> None:
        assert self.session is not None
        started = time.monotonic()
        remaining = max(0.0, self.options.wait - self.data.lock.waited_seconds)
        reply = await self.session.lock(self.dataset, self.txid, timeout=self.remote.profile.lock_timeout,
                                        wait=remaining)
        self.remote_locked = True
        if reply.broken:
            self.data.lock.broken_stale.append({"side": "remote", **reply.broken})
        self.data.lock.waited_seconds = round(self.data.lock.waited_seconds + time.monotonic() - started, 3)
        self._warn_recovered(await self.session.recover(self.dataset))

    def _warn_recovered(self, repaired: list[str]) -> None:
        self.data.warnings.extend(f"recovered: {r}" for r in repaired)

    async def _release(self) -> None:
        await self._drop_speculation()
        await self._save_hash_caches()
        session = self.session
        if session is not None:
            try:
                if self.remote_locked:
                    await asyncio.wait_for(session.unlock(self.txid), 30)
            except (UsrError, asyncssh.Error, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                pass  # the agent drops its lock when the session ends anyway
            try:
                await asyncio.wait_for(session.close(), 30)
            except (asyncssh.Error, OSError, asyncio.TimeoutError):
                pass
        if self.local_lock is not None:
            self.local_lock.release()

    # --- manifests ---------------------------------------------------------------------------

    def _hash_progress(self, side: str) -> HashProgress | None:
        hook = self.hooks.hash_progress
        return functools.partial(hook, side) if hook else None

    async def _local_manifest(self, policy: Policy, *, algo: str | None = None,
                              trusted: engine.TrustedDigests | None = None, before: Manifest | None = None,
                              cancelled: threading.Event | None = None, progress: bool = True) -> Manifest:
        algo = algo or self.algo
        report = self._hash_progress("local") if progress else None

        def scan() -> Manifest:  # in a worker thread: loading the cache is I/O too
            cache = self._hash_cache(algo) if self.options.use_cache else None
            manifest = local_manifest(self.local_dir, algo, jobs=self.options.jobs, use_cache=self.options.use_cache,
                                      hash_sections=policy.hashed_sections(), trusted=trusted, progress=report,
                                      cancelled=cancelled, cache=cache, before=before)
            if cache is not None and self.action == "diff":
                # A diff scans once: keep what it hashed now, and let go of the cache (its keys and
                # digests, ~60 bytes a file; the entries hold its paths) before the remote manifest
                # is compared with, or decoded beside, this one.
                cache.save()
                self._hash_caches.pop(algo, None)
            return manifest

        return await asyncio.to_thread(scan)

    def _hash_cache(self, algo: str) -> engine.HashCache:
        """This side's hash cache for `algo`, shared by the run's scans (called in worker threads)."""
        cache = self._hash_caches.get(algo)
        if cache is None:
            cache = engine.HashCache(engine.default_cache_dir(), str(self.local_dir), algo)
            self._hash_caches[algo] = cache
        return cache

    async def _save_hash_caches(self) -> None:
        for cache in list(self._hash_caches.values()):
            await asyncio.to_thread(cache.save)  # only what changed is written

    def _speculate_local_manifest(self, policy: Policy) -> None:
        """Scan this side while we connect, in the algorithm of its newest hash cache (the one the
        last run agreed on with a remote). No cache, no guess: an unwarranted guess could mean
        hashing a whole dataset for nothing. Progress stays off: an MFA prompt may be showing."""
        algo = manifest_cached_algo(self.local_dir) if self.options.use_cache else None
        if algo is None:
            return
        cancelled = threading.Event()
        task = asyncio.create_task(self._local_manifest(policy, algo=algo, cancelled=cancelled, progress=False))
        self._speculation = (algo, cancelled, task)

    def _probe_local_rsync(self) -> None:
        """Ask the local rsync its version while the manifests are made: that and loading what runs
        rsync took 0.1-0.2 s right before the copy. A failure shows only if rsync is needed."""
        self._local_rsync = asyncio.create_task(asyncio.to_thread(rsync.local_rsync_info))
        self._local_rsync.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _drop_speculation(self) -> None:
        """Stop an unused speculative scan (it stops before its next file to hash) and reap it."""
        speculation, self._speculation = self._speculation, None
        if speculation is not None:
            _, cancelled, task = speculation
            cancelled.set()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task

    async def _local_manifest_now(self, policy: Policy) -> Manifest:
        """The speculative scan if it guessed this run's algorithm, else a fresh one."""
        if self._speculation is not None and self._speculation[0] == self.algo:
            _, _, task = self._speculation
            self._speculation = None
            return await task
        await self._drop_speculation()
        return await self._local_manifest(policy)

    async def _remote_manifest(self, policy: Policy, local: Awaitable[Manifest]) -> Manifest:
        assert self.session is not None
        return await self.session.manifest(self.dataset, self.algo, jobs=self.options.jobs,
                                           use_cache=self.options.use_cache, hash_sections=policy.hashed_sections(),
                                           progress=self._hash_progress("remote"), local=local)

    async def _manifests(self, policy: Policy) -> tuple[Manifest, Manifest]:
        started = time.monotonic()
        guessed = self._speculation[0] if self._speculation is not None else None
        scanning = asyncio.ensure_future(self._local_manifest_now(policy))
        local, remote = await asyncio.gather(scanning, self._remote_manifest(policy, scanning))
        await self._save_hash_caches()  # what this scan hashed is kept, whatever happens next
        local_scan = "fresh" if guessed is None else "early" if guessed == self.algo else f"fresh ({guessed} guessed)"
        self.log.info("manifests", local_files=len(local.entries), remote_files=len(remote.entries),
                      local_scan=local_scan, seconds=round(time.monotonic() - started, 3))
        return local, remote

    async def _events_state(self, local: Manifest, remote: Manifest) -> EventsState | None:
        assert self.session is not None
        lev, rev = local.get(EVENTS), remote.get(EVENTS)
        if lev is None and rev is None:
            return None
        if lev is not None and rev is not None and lev.digest == rev.digest and lev.size == rev.size:
            lines = await asyncio.to_thread(_newline_count, self.local_dir / EVENTS) if lev.kind == KIND_FILE else 0
            return EventsState(relation="equal", local_lines=lines, remote_lines=lines, common_lines=lines,
                               local_past_common=0, remote_past_common=0)
        digests, partial = (await asyncio.to_thread(engine.line_digests, str(self.local_dir / EVENTS)))
        local_lines = EventsLines(digests=digests, partial=partial)
        remote_lines = await self.session.events_lines(self.dataset) if rev is not None \
            else EventsLines(digests=[], partial=False)
        return events_relation(local_lines, remote_lines)

    async def _shapes(self) -> tuple:
        assert self.session is not None
        path = self.local_dir / "records.parquet"
        local = await asyncio.to_thread(engine.parquet_shape, str(path)) if path.is_file() else None
        return local, await self.session.parquet_shape(self.dataset)

    # --- transfers --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _file_list(self, entries: list[str], on_remote: bool) -> AsyncIterator[tuple[str, bool]]:
        """rsync's list of `entries` and their parents, as a file on the remote if `on_remote` (see
        rsync.lists_on_remote) and it can be written there, else here: (its path, whether remote).
        Removed once rsync is done with it (or by the next recover())."""
        assert self.session is not None
        names = files_with_parents(entries)
        if on_remote:
            try:
                path = await self.session.write_file_list(self.dataset, self.txid, names)
            except AgentCallError as exc:
                # A full quota or a read-only state dir on the cluster must not stop a pull: the
                # local list is only slower.
                self.log.info("file_list_here", reason=exc.agent_message)
                on_remote = False
        if not on_remote:
            path = engine.file_list_path(str(self.root), self.dataset, self.txid)
            engine.write_file_list(path, names)
        try:
            yield path, on_remote
        finally:
            if not on_remote:
                Path(path).unlink(missing_ok=True)
            else:
                with contextlib.suppress(*_REMOTE_CLEANUP_ERRORS):
                    await self.session.remove_file_list(self.dataset, self.txid)

    async def _rsync(self, plan: TransferPlan, source: str, dest: str, basis: str | None) -> None:
        assert self.session is not None
        transport = self.session.transport
        assert self._local_rsync is not None
        local_info = await self._local_rsync
        remote_text = self.session.hello.rsync
        if not remote_text:
            raise RemoteError(f"rsync was not found on {self.remote.display_host}",
                              f"install rsync there, or set rsync_path of remote {self.remote.name!r}")
        remote_info = local_info if self.remote.is_local else rsync.parse_version(remote_text)
        for info in {local_info, remote_info}:
            warning = rsync.security_warning(info)
            if warning and warning not in self.data.warnings:
                self.data.warnings.append(warning)
        staged = [plan.staged(p) for p in plan.copy]  # relative to what rsync copies
        batches = rsync_batches(rsync.list_entries(staged, {plan.staged(d) for d in plan.whole_dirs}))
        self.log.info("rsync", files=len(plan.copy), bytes=plan.bytes, runs=len(batches),
                      whole_dirs=len(plan.whole_dirs))
        await transport.prepare_rsync()  # rsync_rsh() below names the relay this starts
        moved = [0, 0]

        def on_change(change: rsync.ItemizedChange) -> None:
            if change.transferred:
                if not moved[0]:
                    engine.checkpoint("mid-rsync")  # blocks rsync's output: it stalls mid-transfer
                moved[0] += 1
                moved[1] += change.size
                if self.hooks.transfer_progress:
                    self.hooks.transfer_progress(moved[0], moved[1], plan.bytes)

        files = nbytes = 0
        remote_list = rsync.lists_on_remote(local_info, None if self.remote.is_local else remote_info,
                                            pull=self.action == "pull")
        for batch in batches:
            async with self._file_list(batch, remote_list) as (files_from, on_remote):
                argv = rsync.build_argv(local=local_info, remote=remote_info, source=source, dest=dest,
                                        files_from=files_from, remote_list=on_remote, rsh=transport.rsync_rsh(),
                                        rsync_path=transport.rsync_path(), basis_dir=basis,
                                        # Staging holds no listed file: with no basis either (a first
                                        # transfer), rsync has nothing to compare content with.
                                        checksum=basis is not None)
                result = await transport.run_rsync(argv, on_change=on_change)
            self.data.transfer.rsync_exit = result.exit_code
            if result.exit_code != 0:
                self._rsync_failed(result)
            files += result.files
            nbytes += result.bytes
        self.data.transfer.files = files
        self.data.transfer.bytes = nbytes

    def _rsync_failed(self, result: rsync.RsyncResult) -> None:
        tail = result.stderr_tail.strip().splitlines()
        hint = "nothing was promoted; rerun the same command (use -v for rsync's messages)"
        # Only system ssh hands rsync the shell's output; the asyncssh relay drops it.
        if self.data.remote.transport == "openssh" and "is your shell clean" in result.stderr_tail:
            hint = ("nothing was promoted; the remote login shell prints text for non-interactive sessions, "
                    'which breaks rsync over system ssh: set transport = "asyncssh" for remote '
                    f"{self.remote.name!r}, or silence the shell's startup files (~/.bashrc, ~/.profile) "
                    "for non-interactive sessions")
        raise TransferError(
            f"rsync failed with exit {result.exit_code} ({rsync.explain_exit(result.exit_code)})"
            + (f": {tail[-1]}" if tail else ""),
            hint,
        )

    def _check_verified(self, reply_problems: list, where: str) -> None:
        if reply_problems:
            shown = "; ".join(f"{p}: {why}" for p, why in reply_problems[:3])
            more = f" (and {len(reply_problems) - 3} more)" if len(reply_problems) > 3 else ""
            raise VerificationError(f"{where} does not match the source manifest: {shown}{more}",
                                    "nothing was promoted; rerun the same command")

    async def _changed_since(self, policy: Policy, side: str, before: Manifest,
                             trusted: engine.TrustedDigests | None = None, save_cache: bool = True) -> Manifest | None:
        """`side`'s manifest now, or None when the agent proved it unchanged by digest.
        `save_cache` false: the agent leaves its cache to a later call (this side's is saved when
        the run ends anyway)."""
        if side == "local":
            return await self._local_manifest(policy, trusted=trusted, before=before, progress=False)
        assert self.session is not None
        return await self.session.changed_since(self.dataset, before, jobs=self.options.jobs,
                                                use_cache=self.options.use_cache,
                                                hash_sections=policy.hashed_sections(), trusted=trusted,
                                                save_cache=save_cache)

    async def _check_before_promotion(self, policy: Policy, plan: TransferPlan, expected: ExpectedTree,
                                      verifying: Awaitable[VerifyReply], where: str, source: tuple[str, Manifest],
                                      dest: tuple[str, Manifest]) -> tuple[VerifyReply, engine.TrustedDigests | None]:
        """Verify the staged copy and scan both sides again, then refuse to promote when any of it
        fails: a source that changed while we copied it may have given a torn snapshot, and a
        destination write since its manifest would be lost in the exchange or left unaccounted for.
        The source is scanned while the destination side verifies, then scans itself.
        Returns the verification and the digests of the files staging linked (`linked_digests`)."""
        (source_side, source_before), (dest_side, dest_before) = source, dest

        async def verified_then_rescanned() -> tuple[VerifyReply, engine.TrustedDigests | None, Manifest | None]:
            result = await verifying
            if result.problems:
                return result, None, None  # refused anyway: no need to know more about the destination
            # Staging linked these files, which changed their ctime and so their hash cache key:
            # the rescan trusts their digests (and puts no key, which would move again when staging
            # goes); after promotion, verify's remember (push) or the end of the run (pull) keeps them.
            linked = linked_digests(plan, engine.VerifiedTree(expected.columns(), result.stats))
            return result, linked, await self._changed_since(policy, dest_side, dest_before, linked, save_cache=False)

        (result, linked, dest_now), source_now = await asyncio.gather(
            verified_then_rescanned(), self._changed_since(policy, source_side, source_before))
        # A source changed under rsync also fails verification: name that cause first.
        if source_now is not None and not same_files(source_now.entries, source_before.entries, policy):
            raise VerificationError(f"the {source_side} dataset changed during the transfer",
                                    "nothing was promoted; rerun when the writer on that side has finished")
        self._check_verified(result.problems, where)
        if dest_now is not None and not same_files(dest_now.entries, dest_before.entries):
            raise VerificationError(f"the {dest_side} dataset changed during the transfer",
                                    "nothing was promoted; rerun when the writer on that side has finished")
        engine.checkpoint("after-verify")
        return result, linked

    async def _pull(self, plan: TransferPlan, policy: Policy, local: Manifest, remote: Manifest) -> None:
        assert self.session is not None
        root = str(self.root)
        staged = await asyncio.to_thread(engine.stage, root, self.dataset, self.txid, plan.link(), plan.subtree)
        staging = staged["staging"]
        live = self.local_dir / plan.subtree  # the directory staging mirrors and replaces
        promoted = False
        try:
            engine.checkpoint("after-stage")
            if plan.copy:
                source = below(self.session.dataset_path(self.dataset), plan.subtree)
                basis = str(live) if live.is_dir() else None
                await self._rsync(plan, self.session.transport.rsync_endpoint(source + "/"), staging + "/", basis)
            engine.checkpoint("after-rsync")
            expected = plan.expected_tree()
            result, linked = await self._check_before_promotion(
                policy, plan, expected,
                asyncio.to_thread(verify_local, staging, expected, plan.reread, self.algo, plan.subtree,
                                  self.options.jobs),
                "the staged copy", ("remote", remote), ("local", local))
            method = await asyncio.to_thread(promote_local, self.root, self.dataset, self.txid, self.options.wait,
                                             plan.subtree)
            promoted = True
            self.data.transfer.promote = method
            self.log.info("promoted", method=method, subtree=plan.subtree)
            check = await asyncio.to_thread(verify_local, str(live), expected, [], self.algo, plan.subtree,
                                            self.options.jobs)
            self._post(policy, plan, local, remote, result, check.problems)
            if self.options.use_cache:  # the staged inodes are live now: the next scan need not read them
                proven = itertools.chain(linked.items() if linked else (), engine.reread_digests(
                    engine.VerifiedTree(expected.columns(), result.stats), plan.reread))
                await asyncio.to_thread(lambda: engine.remember_digests(
                    self._hash_cache(self.algo), proven, engine.VerifiedTree(expected.columns(), check.stats)))
        finally:
            if not promoted:
                await asyncio.to_thread(engine.remove_tree, staging)

    async def _push(self, plan: TransferPlan, policy: Policy, local: Manifest, remote: Manifest) -> None:
        session = self.session
        assert session is not None
        staged = await session.stage(self.dataset, self.txid, plan.link(), plan.subtree)
        promoted = False
        try:
            engine.checkpoint("after-stage")
            if plan.copy:
                live = below(session.dataset_path(self.dataset), plan.subtree)
                await self._rsync(plan, str(self.local_dir / plan.subtree) + "/",
                                  session.transport.rsync_endpoint(staged.staging + "/"),
                                  live if remote.exists else None)
            engine.checkpoint("after-rsync")
            expected = plan.expected_tree()
            await self._check_before_promotion(
                policy, plan, expected, session.verify(self.dataset, self.txid, expected=expected, reread=plan.reread,
                                       algo=self.algo, staging=True, subtree=plan.subtree,
                                       jobs=self.options.jobs),
                "the remote staged copy", ("local", local), ("remote", remote))
            method = await session.promote(self.dataset, self.txid, wait=self.options.wait, subtree=plan.subtree)
            promoted = True
            self.data.transfer.promote = method
            self.log.info("promoted", method=method, subtree=plan.subtree)
            # Re-verify the promoted live directory: reread what moved, check every path and size.
            # `remember`: the linked files' digests came with the rescan.
            check = await session.verify(self.dataset, self.txid, expected=expected, reread=plan.reread,
                                         algo=self.algo, staging=False, subtree=plan.subtree,
                                         jobs=self.options.jobs, remember=self.options.use_cache)
            self._post(policy, plan, remote, local, check, check.problems)
        finally:
            if not promoted:
                with contextlib.suppress(*_REMOTE_CLEANUP_ERRORS):
                    await session.cleanup(self.dataset, self.txid)

    def _post(self, policy: Policy, plan: TransferPlan, dest_before: Manifest, source: Manifest,
              reread: VerifyReply, live_problems: list) -> None:
        in_sync = not live_problems and in_sync_after_promotion(dest_before, source, plan, policy)
        self.data.post = audit.PostReport(verified=not live_problems, in_sync=in_sync, checked_files=reread.checked,
                                          checked_bytes=reread.bytes,
                                          problems=[f"{p}: {why}" for p, why in live_problems])
        if not in_sync:
            raise VerificationError("after promotion the destination does not equal the source manifest",
                                    "rerun the same command; if it persists, something else writes there")


def files_of(entries: Iterable[Entry], policy: Policy | None = None) -> Iterator[tuple[str, int, str]]:
    """(path, size, digest) of the files among `entries`, in order; those in `policy`'s scope when given."""
    sections = SECTIONS if policy is None else {s for s in SECTIONS if policy.in_scope(s)}
    return ((e.path, e.size, e.digest) for e in entries if e.kind == KIND_FILE and e.section in sections)


def same_files(a: Iterable[Entry], b: Iterable[Entry], policy: Policy | None = None) -> bool:
    """Whether two path-sorted runs of entries hold the same files (in `policy`'s scope when given),
    by content. Identical lists (mtimes included) are: the usual case costs one C-level pass.
    Others are compared as streams: at a million files, lists of (path, size, digest) took ~150 MB."""
    if a == b:
        return True
    end = object()
    return all(x == y for x, y in itertools.zip_longest(files_of(a, policy), files_of(b, policy), fillvalue=end))


def in_sync_after_promotion(dest_before: Manifest, source: Manifest, plan: TransferPlan, policy: Policy) -> bool:
    """Whether the destination's in-scope files equal the source's once `plan` is promoted and its
    directory checked: outside the subtree as its manifest showed them (rescanned right before the
    exchange, which touches nothing else), below it exactly `plan.expected()`."""
    return same_files(dest_before.outside(plan.prefix), source.outside(plan.prefix), policy) \
        and same_files(plan.expected(), source.below(plan.prefix), policy)


def linked_digests(plan: TransferPlan, staged: engine.VerifiedTree) -> engine.TrustedDigests:
    """build_manifest's `trusted` for the files staging hard-linked: each one's digest from the
    manifest that planned the link, while its inode (as staged) still has that size and mtime."""
    paths: list[str] = []
    keys = bytearray()
    digests: list[str] = []
    for entry in plan.kept_entries():
        stat = staged.get(entry.path)
        if stat is not None and entry.digest and stat[1:3] == (entry.size, entry.mtime_ns):
            paths.append(entry.path)
            keys += engine.TRUSTED_KEY.pack(stat[0], entry.size, entry.mtime_ns)
            digests.append(entry.digest)
    return engine.TrustedDigests(paths, keys, digests)


def rsync_batches(entries: list[tuple[str, int]]) -> list[list[str]]:
    """rsync list entries (name, files it moves) in runs of about RSYNC_BATCH_FILES files each;
    a directory that alone moves more gets a run of its own."""
    batches: list[list[str]] = []
    files = RSYNC_BATCH_FILES
    for name, count in entries:
        if files + count > RSYNC_BATCH_FILES:
            batches.append([])
            files = 0
        batches[-1].append(name)
        files += count
    return batches


def files_with_parents(entries: list[str]) -> list[str]:
    """rsync's file list: the entries and every directory above them, sorted (parents first).
    A directory listed as "dir/" (its files copied) is not listed again as "dir"."""
    dirs: set[str] = set()
    for entry in entries:
        parent = entry.rstrip("/").rpartition("/")[0]
        while parent and parent not in dirs:  # siblings share their parents: each is added once
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    whole = {entry[:-1] for entry in entries if entry.endswith("/")}
    return sorted(dirs.difference(whole).union(entries))


def below(path: str, subtree: str) -> str:
    """The directory `subtree` ("" = the dataset itself) of the dataset at `path`."""
    return f"{path}/{subtree}" if subtree else path


def _newline_count(path: Path) -> int:
    """The complete lines of a file (an equal .events.log on both sides: its line count for the audit)."""
    count = 0
    with os.fdopen(engine.open_nofollow(str(path)), "rb") as handle:
        for block in iter(functools.partial(handle.read, 1 << 20), b""):
            count += block.count(b"\n")
    return count


def verify_local(root: str, expected: ExpectedTree, reread: list[str], algo: str, subtree: str,
                 jobs: int) -> VerifyReply:
    return msgspec.convert(engine.verify_tree(root, expected.columns(), reread, algo, subtree, jobs), VerifyReply)


def promote_local(root: Path, dataset: str, txid: str, wait: float, subtree: str) -> str:
    try:
        return engine.promote(str(root), dataset, txid, wait, subtree)["method"]
    except engine.AgentError as exc:
        if exc.kind == "locked":
            raise LockedError(exc.message, "wait for that USR writer to finish or pass --wait SECONDS") from None
        raise VerificationError(exc.message, "nothing was promoted; rerun the same command") from None


async def run(action: Action, dataset: str, remote: Remote, root: Path, options: SyncOptions,
              hooks: Hooks | None = None, audit_out: Path | None = None) -> tuple[audit.AuditDocument, int]:
    return await Run(action, dataset, remote, root, options, hooks, audit_out).execute()
