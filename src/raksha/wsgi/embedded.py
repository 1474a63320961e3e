"""The all-in-one server: API, scheduler, orchestration and agent in one process (SQLite, local vault)."""

from __future__ import annotations

import logging
import os
from typing import Any

from oslo_config import cfg

from raksha import conf as config
from raksha.api.app import Application
from raksha.api.policies import Policy
from raksha.db import Database
from raksha.db.migrate import upgrade
from raksha.domain.errors import InvalidInput
from raksha.hypervisor.strategy import Hooks
from raksha.rpc.inproc import InProcessTransport
from raksha.services import vaults
from raksha.services.agent import LibvirtAgent
from raksha.services.orchestrator import Orchestrator
from raksha.services.scheduler import Scheduler
from raksha.services.service import Service
from raksha.services.verification import Verifier

LOG = logging.getLogger(__name__)


def prepare_data_dir(conf: cfg.ConfigOpts) -> None:
    """The server's folder: traversable by all, its contents private, new VMs' disks reachable.

    QEMU runs as its own user (libvirt-qemu on Debian) and opens the disks a restore writes under
    ``restored/``, so the folders on the way only let others pass (0711); the database, the vault and
    its key, where they are the defaults in here, are the server's user's alone (an earlier version's
    folder was 0700 and left them readable inside)."""
    try:
        _prepare_data_dir(conf)
    except OSError as exc:
        raise InvalidInput(f"cannot use {exc.filename or conf.data_dir} as the server's data: {exc.strerror}",
                           code="DATA_DIR_UNUSABLE", path=exc.filename or conf.data_dir) from None


def _prepare_data_dir(conf: cfg.ConfigOpts) -> None:
    data = os.path.abspath(conf.data_dir)
    os.makedirs(data, mode=0o711, exist_ok=True)
    _let_pass(data)
    if not conf.database.connection:  # a new one is made private (db.engine); an earlier one is closed here
        path = config.database_url(conf).removeprefix("sqlite:///")
        for own in (path, f"{path}-wal", f"{path}-shm"):
            _private(own, 0o600)
    if not conf.vault.path:
        os.makedirs(config.vault_path(conf), mode=0o700, exist_ok=True)
        _private(config.vault_path(conf), 0o700)
    if not conf.vault.key_file:
        _private(config.vault_key_file(conf), 0o600)
    restored = os.path.abspath(config.restore_dir(conf))
    os.makedirs(restored, mode=0o711, exist_ok=True)
    folder = restored
    while folder != data and os.path.commonpath([data, folder]) == data:  # up to the data folder, if inside
        _let_pass(folder)
        folder = os.path.dirname(folder)


def _let_pass(folder: str) -> None:
    mode = os.stat(folder).st_mode
    if not mode & 0o001:
        try:
            os.chmod(folder, (mode | 0o001) & 0o7777)
        except OSError as exc:  # not ours: a restore to new VMs there says what QEMU cannot reach
            LOG.warning("cannot let others pass through %s: %s", folder, exc)


def _private(path: str, mode: int) -> None:
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, mode)
    except FileNotFoundError:
        pass
    except OSError as exc:
        LOG.warning("cannot make %s private to its owner: %s", path, exc)


class Embedded:
    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf
        prepare_data_dir(conf)
        url = config.database_url(conf)
        upgrade(url)
        self.db = Database(url)
        with self.db.begin() as s:
            vaults.ensure_default(s, config.vault_path(conf), encrypt=conf.vault.encrypt,
                                  key_file=config.vault_key_file(conf))
        self.transport = InProcessTransport(conf.scheduler.workers)
        self.agent = LibvirtAgent(conf.libvirt.uri, strategy=conf.libvirt.strategy,
                                  hooks=Hooks(conf.libvirt.pre_freeze_hook or None, conf.libvirt.post_thaw_hook or None,
                                              conf.libvirt.hook_timeout))
        self.orchestrator = Orchestrator(self.db, self.agent, restore_dir=config.restore_dir(conf))
        self.transport.register("orchestrator", self.orchestrator)
        self.transport.register("agent", self.agent)
        self.service = Service(self.db, self.transport, self.agent)
        self.app: Any = Application(self.service, auth_strategy=conf.api.auth_strategy,
                                    policy=Policy(policy_file=conf.api.policy_file))
        if conf.api.auth_strategy == "keystone":
            from keystonemiddleware import auth_token

            # delay_auth_decision: the middleware marks a missing or bad token (X-Identity-Status: Invalid)
            # and the API answers 401 AUTH_REQUIRED in its own JSON error form; the middleware then adds
            # WWW-Authenticate. Its options are read from [keystone_authtoken].
            config.register_keystone(conf)
            self.app = auth_token.AuthProtocol(self.app, {"oslo_config_config": conf, "delay_auth_decision": "true"})
        sched = conf.scheduler
        self.scheduler = Scheduler(self.db, self.transport, tick=sched.tick_seconds,
                                   gc_interval=sched.gc_interval_seconds, gc_grace=sched.gc_grace_seconds,
                                   gc_max_wait=sched.gc_max_wait_seconds)
        if sched.gc_after_retention:
            self.orchestrator.on_pruned = self.scheduler.request_gc
        self.verifier = Verifier(self.db, interval=sched.verify_interval_seconds, groups=sched.verify_groups)

    def start_background(self) -> None:
        self.scheduler.recover()
        self.scheduler.start()
        self.verifier.start()

    def stop(self) -> None:
        self.verifier.stop()
        self.scheduler.stop()
        self.transport.shutdown(wait=True)
        self.db.dispose()
