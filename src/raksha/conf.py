"""Configuration (oslo.config): a file (``--config-file``) and flags; every option has a working default.

The defaults are the embedded all-in-one: no auth, SQLite and a local vault under ``data_dir``,
the API on 127.0.0.1:8791, libvirt at qemu:///system.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from oslo_config import cfg


def default_data_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/raksha"
    return os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "raksha")


DEFAULT_OPTS = [
    cfg.StrOpt("data_dir", default=default_data_dir(), help="Where the embedded server keeps its database and vault."),
]
API_OPTS = [
    cfg.HostAddressOpt("host", default="127.0.0.1", help="Address the API listens on."),
    cfg.PortOpt("port", default=8791, help="Port the API listens on."),
    cfg.StrOpt("auth_strategy", default="noauth", choices=["noauth", "keystone"],
               help="noauth: the path's tenant is the caller (embedded); keystone: auth_token middleware."),
    cfg.StrOpt("policy_file", default=None, help="A policy file overriding the default rules (oslo.policy)."),
    cfg.IntOpt("threads", default=8, min=1, help="WSGI worker threads."),
]
DATABASE_OPTS = [
    cfg.StrOpt("connection", default=None, secret=True,
               help="SQLAlchemy URL; default sqlite under data_dir."),
]
VAULT_OPTS = [
    cfg.StrOpt("path", default=None, help="Directory of the default local vault; default data_dir/vault."),
    cfg.BoolOpt("encrypt", default=True, help="Encrypt the default vault (a key file is made beside it)."),
    cfg.StrOpt("key_file", default=None, help="Key file of the default vault; default data_dir/vault.key."),
]
LIBVIRT_OPTS = [
    cfg.StrOpt("uri", default="qemu:///system", help="libvirt connection of the local agent."),
    cfg.StrOpt("strategy", default="pull", choices=["pull", "snapshot"],
               help="pull: checkpoints + pull backup (default); snapshot: the seed's external snapshots."),
    cfg.StrOpt("restore_dir", default=None, help="Where new VMs' disks are written; default data_dir/restored."),
    cfg.StrOpt("pre_freeze_hook", default="/etc/raksha/hooks/pre-freeze",
               help="Path in the guest of the script run (guest-exec, argument 'freeze') before the freeze; a "
                    "guest whose script exits 0 is backed up application-consistent. Empty: none."),
    cfg.StrOpt("post_thaw_hook", default="/etc/raksha/hooks/post-thaw",
               help="Path in the guest of the script run (argument 'thaw') after the thaw. Empty: none."),
    cfg.FloatOpt("hook_timeout", default=60.0, min=1.0,
                 help="Seconds a guest hook may run before it is killed (the guest is still frozen and backed up "
                      "filesystem-consistent)."),
]
SCHEDULER_OPTS = [
    cfg.FloatOpt("tick_seconds", default=5.0, min=0.1, help="How often schedules are checked."),
    cfg.IntOpt("workers", default=2, min=1, help="Runs and restores executed at once."),
    cfg.FloatOpt("gc_interval_seconds", default=86400.0, min=0,
                 help="How often every vault's unused chunks are collected (raksha vault gc); 0: never on a "
                      "timer. Safe while backups run."),
    cfg.BoolOpt("gc_after_retention", default=True,
                help="Also collect a vault's garbage soon after runs were deleted (retention, the API)."),
    cfg.FloatOpt("gc_grace_seconds", default=3600.0, min=0,
                 help="Packs younger than this are never collected (they may belong to a backup in progress)."),
    cfg.FloatOpt("gc_max_wait_seconds", default=600.0, min=0,
                 help="How long a collection waits for running backups before giving up (nothing deleted)."),
    cfg.FloatOpt("verify_interval_seconds", default=86400.0, min=0,
                 help="How often every local vault is verified (raksha vault verify --read-data-subset): one "
                      "group of its packs' data re-read and re-hashed, every other pack checked for presence "
                      "and size; damage is logged as an error naming the damaged backups. Runs at the "
                      "clock's multiples of it (daily: 00:00 UTC). 0: never."),
    cfg.IntOpt("verify_groups", default=7, min=1,
               help="Groups the packs are read in, one a verification: every pack's data is read once every "
                    "verify_groups intervals (by default once a week). 1: all of it every time."),
]


def register(conf: cfg.ConfigOpts) -> cfg.ConfigOpts:
    conf.register_opts(DEFAULT_OPTS)
    conf.register_opts(API_OPTS, group="api")
    conf.register_opts(DATABASE_OPTS, group="database")
    conf.register_opts(VAULT_OPTS, group="vault")
    conf.register_opts(LIBVIRT_OPTS, group="libvirt")
    conf.register_opts(SCHEDULER_OPTS, group="scheduler")
    return conf


KEYSTONE_GROUP = "keystone_authtoken"


def register_keystone(conf: cfg.ConfigOpts) -> cfg.ConfigOpts:
    """keystonemiddleware's ``[keystone_authtoken]`` options, with those of its ``password`` auth plugin.

    Registered only for ``auth_strategy = keystone`` (importing the middleware costs a quarter second):
    ``www_authenticate_uri``, ``auth_url``, ``auth_type = password``, ``username``, ``password``,
    ``project_name``, ``user_domain_name``/``project_domain_name``; ``memcached_servers`` unset keeps the
    token cache in process. Registering twice is harmless (oslo.config accepts equal options again).
    """
    from keystoneauth1 import loading
    from keystonemiddleware import auth_token

    for group, opts in auth_token.list_opts():
        conf.register_opts(opts, group=group)
    conf.register_opts(loading.get_auth_plugin_conf_options("password"), group=KEYSTONE_GROUP)
    return conf


def list_opts() -> list[tuple[str | None, Sequence[cfg.Opt]]]:
    """Every option, for ``oslo-config-generator --namespace raksha`` (a sample raksha.conf)."""
    return [(None, DEFAULT_OPTS), ("api", API_OPTS), ("database", DATABASE_OPTS), ("vault", VAULT_OPTS),
            ("libvirt", LIBVIRT_OPTS), ("scheduler", SCHEDULER_OPTS)]


def load(args: list[str] | None = None, *, config_files: list[str] | None = None) -> cfg.ConfigOpts:
    conf = register(cfg.ConfigOpts())
    conf(args or [], project="raksha", default_config_files=config_files or [])
    if conf.api.auth_strategy == "keystone":
        register_keystone(conf)
    return conf


def database_url(conf: cfg.ConfigOpts) -> str:
    return conf.database.connection or f"sqlite:///{os.path.join(conf.data_dir, 'raksha.sqlite')}"


def vault_path(conf: cfg.ConfigOpts) -> str:
    return conf.vault.path or os.path.join(conf.data_dir, "vault")


def vault_key_file(conf: cfg.ConfigOpts) -> str:
    return conf.vault.key_file or os.path.join(conf.data_dir, "vault.key")


def restore_dir(conf: cfg.ConfigOpts) -> str:
    return conf.libvirt.restore_dir or os.path.join(conf.data_dir, "restored")
